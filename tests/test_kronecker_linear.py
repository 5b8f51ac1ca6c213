"""kronecker_linear (functional, hand-written backward) and the KroneckerLinear module."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronlayers import KroneckerLinear, kron_dense
from kronlayers.functional import kronecker_linear, kronecker_linear_flops

F64 = torch.float64

# (in_shape, out_shape): non-square, unequal, degenerate size-1 factors, d = 1..3.
SHAPES = [
    ((4, 6), (3, 5)),
    ((6, 4), (5, 3)),
    ((1, 5), (3, 1)),
    ((2, 3, 4), (3, 1, 2)),
    ((3, 2, 2), (2, 4, 3)),
    ((7,), (3,)),
]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def make_factors(in_shape, out_shape, rank, dtype=F64, device="cpu"):
    return [
        torch.randn(rank, o, i, dtype=dtype, device=device, requires_grad=True)
        for o, i in zip(out_shape, in_shape, strict=True)
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("use_bias", [True, False])
def test_forward_and_backward_match_dense(device, dtype, shapes, rank, use_bias):
    in_shape, out_shape = shapes
    fs = make_factors(in_shape, out_shape, rank, dtype, device)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    bias = torch.randn(n_out, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    x = torch.randn(2, 3, n_in, dtype=dtype, device=device, requires_grad=True)
    params = [x, *fs] + ([bias] if use_bias else [])

    y = kronecker_linear(x, fs, bias)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, g)

    y_ref = F.linear(x, kron_dense(fs), bias)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("rank", [1, 2])
def test_gradcheck(shapes, rank):
    in_shape, out_shape = shapes
    fs = make_factors(in_shape, out_shape, rank)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    x = torch.randn(3, math.prod(in_shape), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b, *f: kronecker_linear(x, list(f), b), (x, bias, *fs)
    )


def test_needs_input_grad_is_respected():
    fs = make_factors((4, 6), (3, 5), 2)
    fs[1].requires_grad_(False)
    x = torch.randn(5, 24, dtype=F64)  # no grad wanted for the input
    y = kronecker_linear(x, fs)
    y.sum().backward()
    assert fs[0].grad is not None
    assert fs[1].grad is None
    assert x.grad is None


def test_only_input_grad():
    fs = [f.detach() for f in make_factors((4, 6), (3, 5), 2)]
    x = torch.randn(5, 24, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(kronecker_linear(x, fs).sum(), [x])
    torch.testing.assert_close(gx, torch.ones(5, 15, dtype=F64) @ kron_dense(fs))


def test_shared_factor_gradients_sum():
    f = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    x = torch.randn(5, 16, dtype=F64)
    kronecker_linear(x, [f, f]).square().sum().backward()
    g = f.grad.clone()
    f.grad = None
    F.linear(x, kron_dense([f, f])).square().sum().backward()
    torch.testing.assert_close(g, f.grad, rtol=1e-10, atol=1e-10)


def test_low_precision_forward_cpu():
    fs = [f.detach() for f in make_factors((8, 8), (4, 8), 2, dtype=torch.float32)]
    x = torch.randn(4, 64)
    ref = F.linear(x, kron_dense(fs))
    y = kronecker_linear(x.bfloat16(), [f.bfloat16() for f in fs])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_forward_backward(device):
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    m = KroneckerLinear(64, 32, rank=2, device=device)
    x = torch.randn(4, 64, device=device)
    ref = m(x)
    m16 = KroneckerLinear(64, 32, rank=2, device=device, dtype=dtype)
    m16.load_state_dict({k: v.to(dtype) for k, v in m.state_dict().items()})
    y = m16(x.to(dtype))
    y.float().sum().backward()
    assert y.dtype == dtype
    assert all(p.grad.dtype == dtype for p in m16.parameters())
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_functional_errors():
    fs = [torch.ones(1, 3, 4), torch.ones(1, 5, 6)]
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        kronecker_linear([1.0], fs)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 24\)"):
        kronecker_linear(torch.ones(2, 23), fs)
    with pytest.raises(ValueError, match=r"bias must have shape \(15,\)"):
        kronecker_linear(torch.ones(2, 24), fs, torch.ones(16))
    with pytest.raises(ValueError, match="share the rank"):
        kronecker_linear(torch.ones(2, 24), [torch.ones(1, 3, 4), torch.ones(2, 5, 6)])
    with pytest.raises(ValueError, match=r"factors\[1\] must have shape \(rank, out_k, in_k\)"):
        kronecker_linear(torch.ones(2, 24), [torch.ones(1, 3, 4), torch.ones(5, 6)])
    with pytest.raises(ValueError, match="at least one factor"):
        kronecker_linear(torch.ones(2, 24), [])
    with pytest.raises(TypeError, match="factors must be a list"):
        kronecker_linear(torch.ones(2, 24), torch.ones(1, 3, 4))


def test_functional_dtype_and_device_must_match_the_input():
    fs = [torch.ones(1, 3, 4), torch.ones(1, 5, 6)]
    x = torch.ones(2, 24)
    with pytest.raises(
        TypeError,
        match=r"factors\[0\] must have the input's dtype torch.float32, got torch.float64",
    ):
        kronecker_linear(x, [fs[0].double(), fs[1]])
    with pytest.raises(
        TypeError,
        match=r"factors\[1\] must have the input's dtype torch.float64, got torch.float32",
    ):
        kronecker_linear(x.double(), [fs[0].double(), fs[1]])
    with pytest.raises(TypeError, match="bias must have the input's dtype torch.float32"):
        kronecker_linear(x, fs, torch.ones(15, dtype=F64))
    with pytest.raises(
        ValueError, match=r"factors\[1\] must be on the input's device cpu, got meta"
    ):
        kronecker_linear(x, [fs[0], torch.ones(1, 5, 6, device="meta")])
    with pytest.raises(ValueError, match="bias must be on the input's device cpu, got meta"):
        kronecker_linear(x, fs, torch.ones(15, device="meta"))
    with pytest.raises(TypeError, match=r"factors\[0\] must be a floating-point tensor"):
        kronecker_linear(x, [torch.ones(1, 3, 4, dtype=torch.long), fs[1]])


def test_flops_formula():
    # 64x64 (x) 64x64 at batch 256: two contractions of 256*64*64*64 multiply-adds.
    assert kronecker_linear_flops((64, 64), (64, 64), 1, 256) == 2 * 2 * 256 * 64**3
    # shrink first: (in 10 -> out 2) before (in 3 -> out 30)
    assert kronecker_linear_flops((10, 3), (2, 30), 1, 1) == 2 * (30 * 2 + 6 * 30)
    assert kronecker_linear_flops((10, 3), (2, 30), 3, 5) == 15 * 2 * (30 * 2 + 6 * 30)


# ---------------------------------------------------------------- module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(rank=3),
        dict(in_shape=(4, 6), out_shape=(3, 5)),
        dict(in_shape=(2, 3, 4), out_shape=(5, 1, 3)),
        dict(in_shape=(2, 3, 4)),
        dict(bias=False, rank=2),
    ],
)
def test_module_matches_linear(device, kwargs):
    m = KroneckerLinear(24, 15, device=device, dtype=F64, **kwargs)
    x = torch.randn(2, 1, 3, 24, dtype=F64, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 1, 3, 15)
    w = m.weight
    assert w.shape == (15, 24)
    torch.testing.assert_close(y, F.linear(x, w, m.bias), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    params = [x, *m.parameters()]
    got = torch.autograd.grad(y, params, g)
    ref = torch.autograd.grad(F.linear(x, m.weight, m.bias), params, g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_module_unbatched_input():
    m = KroneckerLinear(24, 15, dtype=F64)
    x = torch.randn(24, dtype=F64)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))


def test_default_shapes_are_balanced():
    m = KroneckerLinear(784, 625)
    assert m.in_shape == (28, 28) and m.out_shape == (25, 25)
    m = KroneckerLinear(4096, 4096)
    assert [tuple(p.shape) for p in m.factors] == [(1, 64, 64), (1, 64, 64)]
    assert m.compression_ratio == pytest.approx(4096 * 4096 / 8192)
    m = KroneckerLinear(1000, 27, out_shape=(3, 3, 3))
    assert m.in_shape == (10, 10, 10)


def test_shared_factors():
    m = KroneckerLinear(784, 625, shared_factors=True, bias=False, dtype=F64)
    assert len(m.factors) == 1
    assert sum(p.numel() for p in m.parameters()) == 25 * 28
    f = m.factors[0]
    torch.testing.assert_close(m.weight, torch.kron(f[0], f[0]))
    x = torch.randn(3, 784, dtype=F64)
    torch.testing.assert_close(m(x), x @ m.weight.T, rtol=1e-10, atol=1e-10)
    m(x).square().sum().backward()
    g = f.grad.clone()
    f.grad = None
    (x @ m.weight.T).square().sum().backward()
    torch.testing.assert_close(g, f.grad, rtol=1e-10, atol=1e-10)


def test_init_variance_matches_nn_linear():
    # nn.Linear's default weights are U(-1/sqrt(in), 1/sqrt(in)): variance 1 / (3 in).
    for rank, shapes in [(1, None), (4, (8, 4, 8))]:
        variances = []
        for seed in range(5):
            torch.manual_seed(seed)
            kw = dict(in_shape=shapes, out_shape=shapes) if shapes else {}
            m = KroneckerLinear(256, 256, rank=rank, **kw)
            variances.append(m.weight.detach().var().item())
        target = 1 / (3 * 256)
        assert abs(sum(variances) / len(variances) / target - 1) < 0.15
        bias_bound = 1 / math.sqrt(256)
        assert m.bias.abs().max() <= bias_bound


def test_extra_repr():
    r = repr(KroneckerLinear(4096, 4096, rank=2))
    assert "in_shape=(64, 64)" in r and "rank=2" in r and "compression=1024.0x" in r


def test_state_dict_round_trip():
    m = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=2)
    m2 = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=2)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 24)
    torch.testing.assert_close(m(x), m2(x), rtol=0, atol=0)
    assert set(m.state_dict()) == {"factors.0", "factors.1", "bias"}


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(in_shape=(4, 5)), ValueError, r"in_shape=\(4, 5\) has product 20.*in_features=24"),
        (dict(out_shape=(2, 2)), ValueError, r"out_shape=\(2, 2\) has product 4.*out_features=15"),
        (dict(rank=0), ValueError, "rank must be >= 1"),
        (dict(rank=1.5), ValueError, r"rank as a float .* in \(0, 1\], got 1.5"),
        (dict(rank=0.0), ValueError, r"rank as a float .* in \(0, 1\], got 0.0"),
        (dict(rank="2"), TypeError, "rank must be an int"),
        (dict(rank=True), TypeError, "rank must be an int"),
        (dict(in_shape=(4, 6), out_shape=(15,)), ValueError, "same number of factors"),
        (dict(shared_factors=True), ValueError, "shared_factors=True requires"),
        (dict(in_shape=(0, 24)), ValueError, "in_shape must contain positive ints"),
        (dict(in_shape=24), TypeError, "in_shape must be a non-empty sequence"),
    ],
)
def test_module_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KroneckerLinear(24, 15, **kwargs)


def test_module_bad_input():
    m = KroneckerLinear(24, 15)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 24\) .*, got \(3, 25\)"):
        m(torch.ones(3, 25))
    with pytest.raises(ValueError, match="in_features must be >= 1, got 0"):
        KroneckerLinear(0, 15)


def test_module_accepts_numpy_ints_and_rejects_other_types():
    m = KroneckerLinear(
        np.int64(24), np.int64(15), in_shape=(np.int64(4), 6), out_shape=(3, 5), rank=np.int64(2)
    )
    assert (m.in_features, m.out_features, m.rank) == (24, 15, 2)
    assert all(type(v) is int for v in (m.in_features, m.out_features, m.rank, *m.in_shape))
    assert m.in_shape == (4, 6) and m.out_shape == (3, 5)
    x = torch.randn(3, 24)
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
    with pytest.raises(TypeError, match="in_features must be an int, got float"):
        KroneckerLinear(24.0, 15)
    with pytest.raises(TypeError, match="out_features must be an int, got bool"):
        KroneckerLinear(24, True)
    with pytest.raises(TypeError, match=r"in_shape must contain ints, got \(4, 6.0\)"):
        KroneckerLinear(24, 15, in_shape=(4, 6.0))


def test_float_rank_is_a_fraction_of_the_dense_weights():
    # R = max(1, floor(f * in * out / sum_k out_k * in_k)), here sum_k = 3*4 + 5*6 = 42.
    kw = dict(in_shape=(4, 6), out_shape=(3, 5))
    assert KroneckerLinear(24, 15, rank=0.5, **kw).rank == math.floor(0.5 * 360 / 42) == 4
    assert KroneckerLinear(24, 15, rank=1.0, **kw).rank == math.floor(360 / 42) == 8
    assert KroneckerLinear(24, 15, rank=0.01, **kw).rank == 1
    m = KroneckerLinear(24, 15, rank=0.5, **kw)
    assert [tuple(f.shape) for f in m.factors] == [(4, 3, 4), (4, 5, 6)]
    assert m.num_weights() <= 0.5 * 24 * 15
    lin = nn.Linear(24, 15)
    assert KroneckerLinear.from_linear(lin, rank=0.5, **kw).rank == 4


@pytest.mark.parametrize("rank", [1, 2])
def test_from_linear_recovers_exact_kronecker(rank):
    fs = [torch.randn(rank, o, i, dtype=F64) for o, i in [(3, 4), (5, 6)]]
    lin = nn.Linear(24, 15, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(kron_dense(fs))
    m = KroneckerLinear.from_linear(lin, in_shape=(4, 6), out_shape=(3, 5), rank=rank)
    assert m.reconstruction_error < 1e-12
    torch.testing.assert_close(m.bias, lin.bias, rtol=0, atol=0)
    x = torch.randn(7, 24, dtype=F64)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-10, atol=1e-10)


def test_from_linear_error_and_type():
    lin = nn.Linear(24, 15, bias=False)
    m = KroneckerLinear.from_linear(lin, rank=2)
    assert m.bias is None and 0 < m.reconstruction_error < 1
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        KroneckerLinear.from_linear(nn.Conv2d(1, 1, 1))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3),
    st.integers(1, 3),
    st.booleans(),
)
def test_random_configurations(pairs, rank, use_bias):
    in_shape = tuple(i for i, _ in pairs)
    out_shape = tuple(o for _, o in pairs)
    m = KroneckerLinear(
        math.prod(in_shape),
        math.prod(out_shape),
        bias=use_bias,
        in_shape=in_shape,
        out_shape=out_shape,
        rank=rank,
        dtype=F64,
    )
    x = torch.randn(3, m.in_features, dtype=F64, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), rtol=1e-10, atol=1e-10)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(gx, torch.ones_like(y) @ m.weight, rtol=1e-10, atol=1e-10)
