"""cp_linear (functional, hand-written backward) and the CPLinear module."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kronlayers import CPLinear
from kronlayers.decomposition import cp_to_tensor
from kronlayers.functional import CPLinearFunction, cp_linear, cp_linear_flops
from kronlayers.functional._dispatch import force_kernel, force_path
from kronlayers.functional.cp_linear import cp_linear_plan, make_plan

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Every tensor here is tiny; with several OpenMP threads on a shared, busy machine the
    # spin-waits dominate (TensorLy's ALS in from_linear ran ~20x slower with 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}

# (in_shape, out_shape): orders 1..3, non-square, unequal, size-1 modes, unequal mode counts.
SHAPES = [
    ((7,), (3,)),
    ((4, 6), (3, 5)),
    ((6, 4), (5, 2)),
    ((1, 5), (3, 1)),
    ((2, 3, 4), (3, 1, 2)),
    ((3, 2, 2), (2, 4, 3)),
    ((4, 3), (2, 3, 2)),
]
STRATEGIES = ["auto", "khatri_rao", "modewise"]
KERNELS = ["function", "ops", "dense"]


def make_factors(in_shape, out_shape, rank, dtype=F64, device="cpu"):
    a = [torch.randn(d, rank, dtype=dtype, device=device, requires_grad=True) for d in in_shape]
    b = [torch.randn(d, rank, dtype=dtype, device=device, requires_grad=True) for d in out_shape]
    return a, b


def dense(a, b):
    """The reference weight, through cp_to_tensor (an einsum over all factors at once)."""
    n_in = math.prod(f.shape[0] for f in a)
    n_out = math.prod(f.shape[0] for f in b)
    return cp_to_tensor([*b, *a]).reshape(n_out, n_in)


# --------------------------------------------------------------------------- functional


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])  # "auto": hypothesis below
@pytest.mark.parametrize(("lead", "use_bias"), [((1,), True), ((2, 3), False)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_and_backward_match_dense(
    device, dtype, shapes, rank, strategy, lead, use_bias, kernel
):
    in_shape, out_shape = shapes
    a, b = make_factors(in_shape, out_shape, rank, dtype, device)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    bias = torch.randn(n_out, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    x = torch.randn(*lead, n_in, dtype=dtype, device=device, requires_grad=True)
    params = [x, *a, *b] + ([bias] if use_bias else [])

    with force_kernel(kernel):
        y = cp_linear(x, a, b, bias, strategy=strategy)
        assert y.shape == (*lead, n_out)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, g)

    y_ref = F.linear(x, dense(a, b), bias)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, **TOL[dtype])


@pytest.mark.parametrize("shapes", [((4, 6), (3, 5)), ((2, 3, 2), (3, 2)), ((5,), (2, 2, 2))])
@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck(shapes, strategy, kernel):
    in_shape, out_shape = shapes
    a, b = make_factors(in_shape, out_shape, 2)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    x = torch.randn(3, math.prod(in_shape), dtype=F64, requires_grad=True)
    n = len(a)

    def fn(x, bias, *fs):
        return cp_linear(x, fs[:n], fs[n:], bias, strategy=strategy)

    with force_kernel(kernel):
        assert torch.autograd.gradcheck(fn, (x, bias, *a, *b))
        assert torch.autograd.gradgradcheck(fn, (x, bias, *a, *b))


def test_plan_picks_modewise_only_for_large_factors_at_tiny_batches():
    # Measured on CPU: for small Khatri-Rao products the one-GEMM route wins at every batch
    # size (the einsum and the Hadamard steps cost more than forming K); mode-wise wins
    # when K is large (here 4096 x 256) and only a row or a few go through.
    assert make_plan((16, 16), (16, 16), 16, n=1).in_khatri_rao
    small = make_plan((64, 64), (64, 64), 256, n=1)
    large = make_plan((64, 64), (64, 64), 256, n=256)
    assert not small.in_khatri_rao and not small.out_khatri_rao
    assert large.in_khatri_rao and large.out_khatri_rao
    # Largest input mode contracted first, largest output mode expanded last.
    assert make_plan((2, 8, 4), (3, 9, 5), 4, n=1).in_order == (1, 2, 0)
    assert make_plan((2, 8, 4), (3, 9, 5), 4, n=1).out_order == (0, 2, 1)


def test_dispatch_takes_the_dense_kernel_only_where_it_is_faster():
    # Low rank: the factorized kernels; rank far above the batch (as compress(ratio=0.5)
    # picks for CP): forming W and one GEMM is cheaper.
    low = cp_linear_plan((32, 32), (32, 32), 16, (256, 1024), input_grad=True)
    high = cp_linear_plan((32, 32), (32, 32), 4096, (1024, 1024), input_grad=True)
    assert low["path"] == "factorized" and low["kernel"] in ("function", "ops")
    assert high["path"] == "dense" and high["kernel"] == "dense"
    assert high["seconds"]["dense"] < high["seconds"]["ops"]
    # Forcing: the path argument first, then force_kernel, then force_path.
    with force_path("dense"):
        assert cp_linear_plan((32, 32), (32, 32), 16, (256, 1024))["kernel"] == "dense"
        with force_kernel("function"):
            assert cp_linear_plan((32, 32), (32, 32), 16, (256, 1024))["kernel"] == "function"
            plan = cp_linear_plan((32, 32), (32, 32), 16, (256, 1024), path="dense")
            assert plan["kernel"] == "dense"
    # An explicit route asks for the factorized kernels.
    assert (
        cp_linear_plan((32, 32), (32, 32), 4096, (1024, 1024), strategy="khatri_rao")["path"]
        == "factorized"
    )
    with pytest.raises(ValueError, match="path must be one of"):
        cp_linear_plan((2,), (2,), 1, (1, 2), path="sparse")


@pytest.mark.parametrize("rank", [1, 3, 40])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_every_kernel_agrees_at_and_around_the_switch_points(rank, n):
    # Whatever the dispatcher picks for a shape, each kernel computes the same function and
    # gradients (float64 against the dense reference), including shapes near a switch.
    a, b = make_factors((4, 5), (3, 6), rank)
    bias = torch.randn(18, dtype=F64, requires_grad=True)
    x = torch.randn(n, 20, dtype=F64, requires_grad=True)
    params = [x, bias, *a, *b]
    y_ref = F.linear(x, dense(a, b), bias)
    g = torch.randn_like(y_ref)
    ref = torch.autograd.grad(y_ref, params, g)
    for kernel in (None, *KERNELS):
        with force_kernel(kernel):
            y = cp_linear(x, a, b, bias)
            torch.testing.assert_close(y, y_ref, **TOL[F64])
            for got, r in zip(torch.autograd.grad(y, params, g), ref, strict=True):
                torch.testing.assert_close(got, r, **TOL[F64])


@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])
def test_gemm_flops_scale_with_rank_not_with_the_dense_product(strategy):
    in_shape, out_shape, rank, n = (8, 16), (4, 8), 5, 64
    a, b = make_factors(in_shape, out_shape, rank, dtype=torch.float32)
    x = torch.randn(n, 128)
    with FlopCounterMode(display=False) as counter:
        cp_linear(x, a, b, strategy=strategy)
    gemm = counter.get_total_flops()
    # The GEMMs alone cost 2 * N * R * (H_in + H_out); the Hadamard / Khatri-Rao steps are
    # elementwise and not counted by FlopCounterMode, but are by cp_linear_flops.
    assert gemm == 2 * n * rank * (128 + 32)
    assert gemm < cp_linear_flops(in_shape, out_shape, rank, n, strategy) < 2 * gemm
    assert gemm < 2 * n * 128 * 32 / 4


@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])
@pytest.mark.parametrize("kernel", ["function", "ops"])
def test_needs_input_grad_skips_unneeded_work(strategy, kernel):
    in_shape, out_shape, rank, n = (8, 16), (4, 8), 5, 64
    a, b = make_factors(in_shape, out_shape, rank, dtype=torch.float32)
    bias = torch.randn(32, requires_grad=True)
    x = torch.randn(n, 128)
    h_in, h_out = 128, 32

    def backward_flops(x, a, b, bias):
        with force_kernel(kernel):
            y = cp_linear(x, a, b, bias, strategy=strategy)
        with FlopCounterMode(display=False) as counter:
            y.backward(torch.ones_like(y))
        return counter.get_total_flops()

    frozen = [f.detach() for f in a + b]
    # Only the input: dL/dc through the output factors, then dL/dx.
    xg = x.clone().requires_grad_()
    assert backward_flops(xg, frozen[:2], frozen[2:], None) == 2 * n * rank * (h_in + h_out)
    assert all(f.grad is None for f in frozen)
    # Only the output factors: nothing on the input side. Khatri-Rao: one GEMM against the
    # saved core; mode-wise: the last factor's GEMM and the GEMM back to the expansions.
    b_only = [f.detach().requires_grad_() for f in b]
    n_gemms = 1 if strategy == "khatri_rao" else 2
    assert backward_flops(x, frozen[:2], b_only, None) == n_gemms * 2 * n * rank * h_out
    assert all(f.grad is not None for f in b_only)
    # Only the bias: no GEMM at all.
    assert backward_flops(x, frozen[:2], frozen[2:], bias) == 0
    torch.testing.assert_close(bias.grad, torch.full((32,), float(n)))
    # One input factor: x is not differentiated, but the other factors' values are used.
    a_mixed = [a[0].detach(), a[1].detach().requires_grad_()]
    with force_kernel(kernel):
        y = cp_linear(x, a_mixed, frozen[2:], strategy=strategy)
    y.backward(torch.ones_like(y))
    w = dense(a_mixed, frozen[2:])
    (ref,) = torch.autograd.grad(F.linear(x, w).sum(), a_mixed[1])
    torch.testing.assert_close(a_mixed[1].grad, ref, rtol=1e-4, atol=1e-4)
    assert a_mixed[0].grad is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_double_backward_matches_the_dense_reference(kernel):
    # The backward is made of differentiable ops: a gradient penalty reaches the factors.
    a, b = make_factors((3, 4), (2, 3), 2)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    with force_kernel(kernel):
        (gx,) = torch.autograd.grad(cp_linear(x, a, b).pow(2).sum(), x, create_graph=True)
    got = torch.autograd.grad(gx.pow(2).sum(), [*a, *b])
    (gx_ref,) = torch.autograd.grad(F.linear(x, dense(a, b)).pow(2).sum(), x, create_graph=True)
    ref = torch.autograd.grad(gx_ref.pow(2).sum(), [*a, *b])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, **TOL[F64])


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_batch_and_non_contiguous_input(kernel):
    a, b = make_factors((3, 4), (2, 3), 2)
    x0 = torch.randn(0, 12, dtype=F64, requires_grad=True)
    with force_kernel(kernel):
        y0 = cp_linear(x0, a, b)
    assert y0.shape == (0, 6)
    y0.sum().backward()
    assert torch.equal(a[0].grad, torch.zeros_like(a[0]))
    xt = torch.randn(12, 7, dtype=F64).t()  # (7, 12), not contiguous
    torch.testing.assert_close(cp_linear(xt, a, b), xt @ dense(a, b).t(), **TOL[F64])


@pytest.mark.parametrize("kernel", KERNELS)
def test_shared_factor_gradients_are_summed(kernel):
    f = torch.randn(3, 2, dtype=F64, requires_grad=True)
    g = torch.randn(4, 2, dtype=F64, requires_grad=True)
    x = torch.randn(5, 9, dtype=F64)
    with force_kernel(kernel):
        (got,) = torch.autograd.grad(cp_linear(x, [f, f], [g]).sum(), f)
    (ref,) = torch.autograd.grad(F.linear(x, dense([f, f], [g])).sum(), f)
    torch.testing.assert_close(got, ref, **TOL[F64])


@settings(max_examples=25, deadline=None)
@given(
    in_shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    out_shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    rank=st.integers(1, 4),
    lead=st.lists(st.integers(0, 3), min_size=0, max_size=2),
    strategy=st.sampled_from(STRATEGIES),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    kernel=st.sampled_from([None, *KERNELS]),
)
def test_random_configurations_match_dense(
    in_shape, out_shape, rank, lead, strategy, use_bias, seed, kernel
):
    torch.manual_seed(seed)
    a, b = make_factors(in_shape, out_shape, rank)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    bias = torch.randn(n_out, dtype=F64, requires_grad=True) if use_bias else None
    x = torch.randn(*lead, n_in, dtype=F64, requires_grad=True)
    params = [x, *a, *b] + ([bias] if use_bias else [])
    with force_kernel(kernel):
        y = cp_linear(x, a, b, bias, strategy=strategy)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, params, g)
    y_ref = F.linear(x, dense(a, b), bias)
    torch.testing.assert_close(y, y_ref, **TOL[F64])
    for got, ref in zip(grads, torch.autograd.grad(y_ref, params, g), strict=True):
        torch.testing.assert_close(got, ref, **TOL[F64])


def test_bfloat16_on_cpu():
    a, b = make_factors((4, 8), (4, 4), 3, dtype=torch.float32)
    x = torch.randn(6, 32)
    ref = cp_linear(x, a, b)
    a16 = [f.detach().bfloat16().requires_grad_() for f in a]
    b16 = [f.detach().bfloat16().requires_grad_() for f in b]
    y = cp_linear(x.bfloat16(), a16, b16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    y.sum().backward()
    assert all(f.grad.dtype == torch.bfloat16 and f.grad.isfinite().all() for f in a16 + b16)


def test_autocast_runs_both_passes_in_the_autocast_dtype():
    layer = CPLinear(32, 24, rank=4)
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
    ref = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **TOL[torch.float32])


def test_function_returns_only_y_as_differentiable():
    a, b = make_factors((3, 4), (2, 3), 2)
    x = torch.randn(5, 12, dtype=F64)
    plan = make_plan((3, 4), (2, 3), 2, 5, "modewise")
    y, c, *saved = CPLinearFunction.apply(x, None, plan, *a, *b)
    assert y.requires_grad and not c.requires_grad and not any(s.requires_grad for s in saved)
    assert c.shape == (5, 2)


# ------------------------------------------------------------------------- validation


def test_functional_errors():
    a, b = make_factors((3, 4), (2, 3), 2)
    x = torch.randn(5, 12, dtype=F64)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        cp_linear(x.numpy(), a, b)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 12\)"):
        cp_linear(torch.randn(5, 11, dtype=F64), a, b)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 12\)"):
        cp_linear(torch.tensor(1.0, dtype=F64), a, b)
    with pytest.raises(TypeError, match="in_factors must be a list or tuple"):
        cp_linear(x, a[0], b)
    with pytest.raises(ValueError, match="out_factors must hold at least one factor"):
        cp_linear(x, a, [])
    with pytest.raises(TypeError, match=r"out_factors\[1\] must be a torch.Tensor"):
        cp_linear(x, a, [b[0], 3])
    with pytest.raises(ValueError, match=r"in_factors\[0\] must have shape \(d_k, R\)"):
        cp_linear(x, [torch.randn(3, 4, 2, dtype=F64), a[1]], b)
    with pytest.raises(ValueError, match=r"in_factors\[1\] has 3"):
        cp_linear(x, [a[0], torch.randn(4, 3, dtype=F64)], b)
    with pytest.raises(ValueError, match="in_factors have 2, out_factors have 3"):
        cp_linear(x, a, [torch.randn(2, 3, dtype=F64), torch.randn(3, 3, dtype=F64)])
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        cp_linear(x, a, b, torch.randn(5, dtype=F64))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        cp_linear(x, a, b, [0.0] * 6)
    with pytest.raises(
        TypeError,
        match=r"in_factors\[0\] must have the input's dtype torch.float64, got torch.float32",
    ):
        cp_linear(x, [a[0].float(), a[1]], b)
    with pytest.raises(
        TypeError, match="bias must have the input's dtype torch.float64, got torch.float32"
    ):
        cp_linear(x, a, b, torch.randn(6))
    with pytest.raises(ValueError, match="strategy must be one of"):
        cp_linear(x, a, b, strategy="greedy")
    with pytest.raises(ValueError, match="at most 13 factors"):
        cp_linear(torch.randn(2, 1, dtype=F64), [torch.randn(1, 2, dtype=F64)] * 14, b)


def test_functional_dtype_and_device_must_match_the_input():
    a, b = make_factors((3, 4), (2, 3), 2, dtype=torch.float32)
    x = torch.randn(5, 12)
    with pytest.raises(
        TypeError,
        match=r"out_factors\[1\] must have the input's dtype torch.float32, got torch.float64",
    ):
        cp_linear(x, a, [b[0], b[1].double()])
    with pytest.raises(
        TypeError,
        match=r"in_factors\[1\] must have the input's dtype torch.float32, got torch.float64",
    ):
        cp_linear(x, [a[0], a[1].double()], b)
    with pytest.raises(
        ValueError, match=r"in_factors\[0\] must be on the input's device cpu, got meta"
    ):
        cp_linear(x, [torch.empty(3, 2, device="meta"), a[1]], b)
    with pytest.raises(ValueError, match="bias must be on the input's device cpu, got meta"):
        cp_linear(x, a, b, torch.empty(6, device="meta"))
    with pytest.raises(TypeError, match=r"in_factors\[0\] must be a floating-point tensor"):
        cp_linear(x, [torch.ones(3, 2, dtype=torch.long), a[1]], b)


def test_module_accepts_numpy_ints():
    layer = CPLinear(np.int64(8), np.int64(6), rank=np.int64(2), in_shape=(np.int64(2), 4))
    assert (layer.in_features, layer.out_features, layer.rank) == (8, 6, 2)
    assert all(type(v) is int for v in (layer.in_features, layer.out_features, layer.rank))
    assert layer.in_shape == (2, 4) and all(type(v) is int for v in layer.in_shape)
    assert CPLinear(8, 6, rank=2, order=np.int64(1)).in_shape == (8,)
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        layer(x), F.linear(x, layer.weight, layer.bias), **TOL[torch.float32]
    )


def test_module_errors():
    with pytest.raises(ValueError, match="rank must be >= 1, got 0"):
        CPLinear(8, 8, rank=0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        CPLinear(8, 8, rank=-2)
    with pytest.raises(ValueError, match=r"rank as a float .* in \(0, 1\], got 1.5"):
        CPLinear(8, 8, rank=1.5)
    with pytest.raises(ValueError, match=r"rank as a float .* in \(0, 1\], got 0.0"):
        CPLinear(8, 8, rank=0.0)
    with pytest.raises(TypeError, match=r"rank must be an int >= 1, a float in \(0, 1\]"):
        CPLinear(8, 8, rank="4")
    with pytest.raises(TypeError, match=r"rank must be an int >= 1, a float in \(0, 1\]"):
        CPLinear(8, 8, rank=True)
    with pytest.raises(TypeError, match=r"rank must be an int >= 1, a float in \(0, 1\]"):
        CPLinear(8, 8, rank=None)
    with pytest.raises(ValueError, match=r"in_shape=\(2, 3\) has product 6, .* in_features=8"):
        CPLinear(8, 8, rank=2, in_shape=(2, 3))
    with pytest.raises(ValueError, match=r"out_shape=\(4, 4\) has product 16, .*out_features=8"):
        CPLinear(8, 8, rank=2, out_shape=(4, 4))
    with pytest.raises(TypeError, match="in_shape must be a non-empty sequence"):
        CPLinear(8, 8, rank=2, in_shape=8)
    with pytest.raises(TypeError, match=r"in_shape must contain ints, got \(8, 1.0\)"):
        CPLinear(8, 8, rank=2, in_shape=(8, 1.0))
    with pytest.raises(ValueError, match="in_shape must contain positive ints"):
        CPLinear(8, 8, rank=2, in_shape=(8, 0))
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        CPLinear(0, 8, rank=2)
    with pytest.raises(TypeError, match="out_features must be an int"):
        CPLinear(8, 8.0, rank=2)
    with pytest.raises(ValueError, match="order must be >= 1, got 0"):
        CPLinear(8, 8, rank=2, order=0)
    with pytest.raises(TypeError, match="order must be an int, got float"):
        CPLinear(8, 8, rank=2, order=2.0)
    layer = CPLinear(8, 6, rank=2)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 8\)"):
        layer(torch.randn(3, 6))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        CPLinear.from_linear(layer, rank=2)
    with pytest.raises(TypeError, match="layer must be a tltorch.FactorizedLinear"):
        CPLinear.from_tltorch(nn.Linear(8, 6))


# ----------------------------------------------------------------------------- module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("batch", [(1,), (2, 3)])
def test_module_matches_its_dense_weight(device, dtype, order, use_bias, batch):
    layer = CPLinear(24, 30, bias=use_bias, rank=4, order=order, device=device, dtype=dtype)
    assert len(layer.in_shape) == len(layer.out_shape) == order
    x = torch.randn(*batch, 24, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    params = [x, *layer.parameters()]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)
    y_ref = F.linear(x, layer.weight, layer.bias)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, **TOL[dtype])


def test_module_attributes_and_repr():
    layer = CPLinear(1024, 512, rank=32)
    assert (layer.in_shape, layer.out_shape) == ((32, 32), (16, 32))
    assert [tuple(f.shape) for f in layer.in_factors] == [(32, 32), (32, 32)]
    assert [tuple(f.shape) for f in layer.out_factors] == [(16, 32), (32, 32)]
    assert layer.weight.shape == (512, 1024)
    assert layer.rank == 32 and layer.reconstruction_error is None
    ratio = 1024 * 512 / (32 * (32 + 32 + 16 + 32))
    assert layer.compression_ratio == pytest.approx(ratio)
    rep = repr(layer)
    assert layer.extra_repr() == (
        "in_features=1024, out_features=512, bias=True, in_shape=(32, 32), out_shape=(16, 32), "
        f"rank=32, compression={ratio:.1f}x"
    )
    for part in ("in_shape=(32, 32)", "out_shape=(16, 32)", "rank=32", f"compression={ratio:.1f}x"):
        assert part in rep
    custom = CPLinear(24, 30, bias=False, rank=3, in_shape=(2, 3, 4), out_shape=(5, 6))
    assert custom.bias is None and len(custom.in_factors) == 3 and len(custom.out_factors) == 2
    assert sum(p.numel() for p in custom.parameters()) == 3 * (2 + 3 + 4 + 5 + 6)


def test_float_rank_is_a_fraction_of_the_dense_parameters():
    layer = CPLinear(1024, 512, rank=0.1)
    # R * (32 + 32 + 16 + 32) parameters ~ 10% of 1024 * 512.
    assert layer.rank == round(0.1 * 1024 * 512 / 112) == 468
    n_params = sum(f.numel() for f in [*layer.in_factors, *layer.out_factors])
    assert abs(n_params / (1024 * 512) - 0.1) < 0.001
    assert CPLinear(6, 4, rank=0.001).rank == 1
    assert CPLinear(6, 4, rank=1.0, in_shape=(2, 3), out_shape=(2, 2)).rank == round(24 / 9)


@pytest.mark.parametrize("order", [2, 3])
def test_init_matches_nn_linear_weight_variance(order):
    target = 1 / (3 * 1024)
    variances, means = [], []
    for seed in range(6):
        torch.manual_seed(seed)
        w = CPLinear(1024, 1024, rank=64, order=order, dtype=F64).weight.detach()
        variances.append(w.var().item())
        means.append(w.mean().item())
    assert sum(variances) / len(variances) == pytest.approx(target, rel=0.1)
    assert abs(sum(means) / len(means)) < 0.05 * math.sqrt(target)
    layer = CPLinear(100, 7, rank=3)
    assert layer.bias.abs().max() <= 1 / math.sqrt(100)
    before = [p.detach().clone() for p in layer.parameters()]
    layer.reset_parameters()
    assert all(not torch.equal(p, q) for p, q in zip(before, layer.parameters(), strict=True))


def test_state_dict_round_trip():
    layer = CPLinear(24, 30, rank=3, in_shape=(4, 6), out_shape=(5, 6))
    sd = layer.state_dict()
    assert set(sd) == {
        "in_factors.0",
        "in_factors.1",
        "out_factors.0",
        "out_factors.1",
        "bias",
    }
    other = CPLinear(24, 30, rank=3, in_shape=(4, 6), out_shape=(5, 6))
    other.load_state_dict(sd)
    x = torch.randn(4, 24)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        CPLinear(24, 30, rank=4, in_shape=(4, 6), out_shape=(5, 6)).load_state_dict(sd)


# ------------------------------------------------------------------------- conversion


def test_from_linear_recovers_an_exact_low_rank_weight():
    a, b = make_factors((4, 6), (3, 5), 3)
    linear = nn.Linear(24, 15, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(dense(a, b))
    layer = CPLinear.from_linear(linear, rank=3, in_shape=(4, 6), out_shape=(3, 5))
    assert layer.reconstruction_error < 1e-6
    assert layer.weight.dtype == F64
    torch.testing.assert_close(layer.bias, linear.bias, rtol=0, atol=0)
    x = torch.randn(7, 24, dtype=F64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-6, atol=1e-6)


def test_from_linear_reports_the_relative_error():
    linear = nn.Linear(24, 15, bias=False)
    layer = CPLinear.from_linear(linear, rank=2, order=2)
    w = linear.weight.detach().double()
    rel = ((w - layer.weight.detach().double()).norm() / w.norm()).item()
    assert 0.05 < layer.reconstruction_error < 1.0
    assert layer.reconstruction_error == pytest.approx(rel, rel=1e-4)
    assert layer.bias is None
    higher = CPLinear.from_linear(linear, rank=0.2, order=2)
    assert higher.rank == round(0.2 * 24 * 15 / (3 + 5 + 4 + 6)) == 4
    assert higher.reconstruction_error < layer.reconstruction_error


def _tltorch():
    return pytest.importorskip("tltorch")


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed"])
def test_to_tltorch_gives_the_same_outputs(implementation):
    _tltorch()
    layer = CPLinear(24, 30, rank=3, in_shape=(2, 3, 4), out_shape=(5, 6), dtype=F64)
    tl_layer = layer.to_tltorch(implementation=implementation)
    assert tl_layer.weight.tensorized_shape == ((5, 6), (2, 3, 4))
    x = torch.randn(2, 5, 24, dtype=F64)
    torch.testing.assert_close(tl_layer(x), layer(x), **TOL[F64])
    torch.testing.assert_close(tl_layer.weight.to_matrix(), layer.weight, **TOL[F64])


def test_from_tltorch_absorbs_the_cp_weights_and_round_trips():
    tltorch = _tltorch()
    tl_layer = tltorch.FactorizedLinear((4, 6), (5, 3), factorization="cp", rank=4, dtype=F64)
    with torch.no_grad():
        tl_layer.weight.weights.copy_(torch.tensor([2.0, -0.5, 0.0, 3.0]))
    layer = CPLinear.from_tltorch(tl_layer)
    assert (layer.in_shape, layer.out_shape, layer.rank) == ((4, 6), (5, 3), 4)
    x = torch.randn(8, 24, dtype=F64)
    torch.testing.assert_close(layer(x), tl_layer(x), **TOL[F64])
    back = layer.to_tltorch()
    torch.testing.assert_close(back(x), tl_layer(x), **TOL[F64])
    again = CPLinear.from_tltorch(back)
    torch.testing.assert_close(again(x), layer(x), **TOL[F64])
    # float32 and no bias; unequal numbers of in and out modes.
    tl32 = tltorch.FactorizedLinear((4, 8), (6,), bias=False, factorization="cp", rank=5)
    layer32 = CPLinear.from_tltorch(tl32)
    assert layer32.bias is None and layer32.in_shape == (4, 8) and layer32.out_shape == (6,)
    x32 = torch.randn(3, 32)
    torch.testing.assert_close(layer32(x32), tl32(x32), **TOL[torch.float32])


def test_from_tltorch_rejects_batched_and_non_cp_layers():
    tltorch = _tltorch()
    batched = tltorch.FactorizedLinear((4, 6), (5, 3), factorization="cp", rank=4, n_layers=2)
    with pytest.raises(ValueError, match="n_layers=2"):
        CPLinear.from_tltorch(batched)
    tucker = tltorch.FactorizedLinear((4, 6), (5, 3), factorization="tucker", rank=0.5)
    with pytest.raises(ValueError, match="factorization='cp'"):
        CPLinear.from_tltorch(tucker)


@pytest.mark.parametrize("device", DEVICES)
def test_tltorch_round_trip_on_device(device):
    _tltorch()
    layer = CPLinear(32, 24, rank=5, device=device)
    back = CPLinear.from_tltorch(layer.to_tltorch())
    assert back.in_factors[0].device.type == torch.device(device).type
    x = torch.randn(4, 32, device=device)
    torch.testing.assert_close(back(x), layer(x), **TOL[torch.float32])


def test_compress_rank_fraction_is_capped_where_the_layer_would_cost_more_than_dense():
    # rank=0.5 of a 384 x 1536 layer by the parameter rule would be rank 2458: 8x the dense
    # FLOPs per row. The fraction is capped at H_in H_out / (H_in + H_out).
    dense = nn.Linear(384, 1536)
    config = CPLinear.compress_config(dense, 0.5)
    assert config["rank"] == 384 * 1536 // (384 + 1536)
    layer = CPLinear.like(dense, **config)
    assert layer.flops((64, 384)) <= 1.05 * layer.dense_flops((64, 384))
    # Low fractions are below the cap and keep the parameter rule.
    assert CPLinear.compress_config(dense, 0.05)["rank"] == round(0.05 * 384 * 1536 / 120)
    # An explicit int rank is the user's choice.
    assert CPLinear.compress_config(dense, 1000)["rank"] == 1000


@pytest.mark.parametrize("grad", [False, True])
def test_hot_path_never_serves_stale_factors(grad):
    # The module caches its validation and kernel choice per call signature; every way of
    # changing the factors must show in the next call (compared with the dense weight).
    torch.manual_seed(0)
    layer = CPLinear(12, 10, rank=3, in_shape=(3, 4), out_shape=(2, 5))
    x = torch.randn(4, 12)

    def check():
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))

    check()
    with torch.no_grad():
        layer.in_factors[0].mul_(2)  # in place (an optimizer step)
    check()
    layer.out_factors[1].data.mul_(-3)  # through .data: no version-counter bump
    check()
    layer.out_factors[0] = nn.Parameter(torch.randn(2, 3))  # a new tensor
    check()
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).pow(2).sum().backward()
    opt.step()
    check()
    layer.double()
    x = x.double()
    check()
    # A factor of another shape, dtype or device is the functional path's error.
    layer.in_factors[1] = nn.Parameter(torch.randn(4, 3))  # float32 next to float64
    with pytest.raises(TypeError, match="in_factors"):
        layer(x)
    layer.in_factors[1] = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="in_factors"):
        layer(x)


def test_hot_path_checks_the_input_like_the_functional_form():
    layer = CPLinear(12, 10, rank=3)
    layer(torch.randn(2, 12))  # signature seen once
    with pytest.raises(ValueError, match="12"):
        layer(torch.randn(2, 11))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 12, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        layer([[0.0] * 12])


def test_fit_cp_recovers_an_exact_cp_weight_data_free_and_calibrated():
    from kronlayers.decomposition.whitening import check_cp_fit_options, fit_cp

    torch.manual_seed(0)
    a, b = make_factors((3, 4), (2, 5), 2)
    w = dense(a, b).detach()  # (10, 12), exactly rank 2 as (2, 5, 3, 4)
    opts = dict(damping=1e-6, n_iter_max=200, tol=1e-12, refine_iter=5, init=None)
    for gram in (None, torch.eye(12, dtype=F64)):
        factors, err = fit_cp(w, (2, 5), (3, 4), 2, input_gram=gram, **opts)
        assert [tuple(f.shape) for f in factors] == [(2, 2), (5, 2), (3, 2), (4, 2)]
        torch.testing.assert_close(dense(factors[2:], factors[:2]), w, rtol=1e-6, atol=1e-8)
        assert (err is None) == (gram is None)
    assert check_cp_fit_options(0.1, 3, 1e-4, 2) == (0.1, 3, 1e-4, 2)
    with pytest.raises(ValueError, match="tol"):
        check_cp_fit_options(0.1, 3, float("nan"), 2)
    with pytest.raises(TypeError, match="n_iter_max"):
        check_cp_fit_options(0.1, 3.5, 1e-4, 2)
