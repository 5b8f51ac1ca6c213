"""The cost-model dispatcher of kronecker_linear: every path and kernel computes the same
function and gradients as the dense reference, and the choice composes with autograd,
torch.compile, torch.export and vmap."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kronlayers import KroneckerLinear, kron_dense
from kronlayers.functional import _kron_engine, kronecker_linear, kronecker_linear_plan
from kronlayers.functional._dispatch import (
    DEFAULT_MODELS,
    SYMBOLIC_ROWS,
    CostModel,
    Gemm,
    Pass,
    calibrate,
    cost_model,
    force_path,
    forced_path,
    static_rows,
)
from kronlayers.functional._kron_engine import kron_weight
from kronlayers.functional.kronecker_linear import (
    KroneckerLinearConfig,
    KroneckerLinearFunction,
    _factorized,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

# (in_shape, out_shape): two factors (non-square, unequal) and three factors.
SHAPES = [((4, 6), (3, 5)), ((2, 3, 4), (3, 2, 2))]
RANKS = [1, 3, 40]


def _factors(in_shape, out_shape, rank, requires_grad=True):
    # Scaled so that rank 40 keeps entries of W of order one.
    scale = rank ** (-0.5 / len(in_shape))
    return [
        (torch.randn(rank, o, i, dtype=F64) * scale).requires_grad_(requires_grad)
        for o, i in zip(out_shape, in_shape, strict=True)
    ]


def _kernels(in_shape, out_shape, rank):
    """Every way to compute the layer: ``name -> f(x, bias, factors)``."""

    def auto(x, b, fs):
        return kronecker_linear(x, fs, b)

    def dense(x, b, fs):
        return kronecker_linear(x, fs, b, path="dense")

    def factorized(x, b, fs):
        return kronecker_linear(x, fs, b, path="factorized")

    kernels = {"auto": auto, "dense": dense, "factorized": factorized}
    orders = [(1, 0), (0, 1)] if len(in_shape) == 2 else [None]
    for order in orders:
        for save in (False, True) if order is not None else (False,):
            config = KroneckerLinearConfig(in_shape, out_shape, rank, order, save)

            def function(x, b, fs, config=config):
                out = KroneckerLinearFunction.apply(x, b, config, *fs)
                return out[0] if config.save_partial else out

            kernels[f"function-{order}-{'save' if save else 'recompute'}"] = function
        if order is not None:
            config = KroneckerLinearConfig(in_shape, out_shape, rank, order, False)

            def ops(x, b, fs, config=config):
                return _factorized(x, b, config, tuple(fs))

            kernels[f"ops-{order}"] = ops
    return kernels


CASES = [(s, r) for s in SHAPES for r in RANKS]
CASE_IDS = [f"{len(s[0])}f-r{r}" for s, r in CASES]


@pytest.fixture(params=["unblocked", "blocked"])
def blocking(request, monkeypatch):
    """Run a test with the default row blocks (one block for these small inputs) and with
    blocks of a few rows (the blocked kernels, with a last partial block)."""
    if request.param == "blocked":
        monkeypatch.setattr(_kron_engine, "BLOCK_ENTRIES", 40)
        monkeypatch.setattr(_kron_engine, "UNBLOCKED_ENTRIES", 0)
    return request.param


@pytest.mark.parametrize("shapes,rank", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("rows", [1, 5])
def test_every_kernel_matches_dense(shapes, rank, rows, blocking):
    in_shape, out_shape = shapes
    fs = _factors(in_shape, out_shape, rank)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    x = torch.randn(rows, math.prod(in_shape), dtype=F64, requires_grad=True)
    ref = F.linear(x, kron_dense(fs), bias)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x, bias, *fs], g)
    for name, fn in _kernels(in_shape, out_shape, rank).items():
        with torch.no_grad():  # inference runs the blocked kernels too
            torch.testing.assert_close(fn(x, bias, fs), ref, **TOL, msg=name)
            torch.testing.assert_close(fn(x, None, fs), ref - bias, **TOL, msg=name)
        y = fn(x, bias, fs)
        torch.testing.assert_close(y, ref, **TOL, msg=name)
        grads = torch.autograd.grad(y, [x, bias, *fs], g)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **TOL, msg=name)


@pytest.mark.parametrize("shapes,rank", CASES, ids=CASE_IDS)
def test_every_subset_of_trainable_tensors(shapes, rank, blocking):
    in_shape, out_shape = shapes
    fs0 = _factors(in_shape, out_shape, rank, requires_grad=False)
    b0 = torch.randn(math.prod(out_shape), dtype=F64)
    x0 = torch.randn(2, 3, math.prod(in_shape), dtype=F64)
    names = ["input", "bias"] + [f"factor{k}" for k in range(len(fs0))]
    xr, br = x0.clone().requires_grad_(), b0.clone().requires_grad_()
    fr = [f.clone().requires_grad_() for f in fs0]
    ref = F.linear(xr, kron_dense(fr), br)
    g = torch.randn_like(ref)
    ref_grads = dict(zip(names, torch.autograd.grad(ref, [xr, br, *fr], g), strict=True))
    for name, fn in _kernels(in_shape, out_shape, rank).items():
        for size in range(1, len(names) + 1):
            for subset in itertools.combinations(names, size):
                x = x0.clone().requires_grad_("input" in subset)
                b = b0.clone().requires_grad_("bias" in subset)
                fs = [f.clone().requires_grad_(f"factor{k}" in subset) for k, f in enumerate(fs0)]
                tensors = dict(zip(names, [x, b, *fs], strict=True))
                fn(x, b, fs).backward(g)
                for n, t in tensors.items():
                    if n in subset:
                        assert t.grad is not None, (name, subset, n)
                        torch.testing.assert_close(t.grad, ref_grads[n], **TOL)
                    else:
                        assert t.grad is None, (name, subset, n)


@pytest.mark.parametrize("shapes,rank", CASES, ids=CASE_IDS)
def test_double_backward_on_every_kernel(shapes, rank, blocking):
    in_shape, out_shape = shapes
    if rank == 40:  # gradgradcheck is O(numel^2): fewer rank terms, same code paths
        rank = 5
    fs = _factors(in_shape, out_shape, rank)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    x = torch.randn(3, math.prod(in_shape), dtype=F64, requires_grad=True)
    for name, fn in _kernels(in_shape, out_shape, rank).items():

        def f(x, b, *fs, fn=fn):
            return fn(x, b, list(fs))

        assert torch.autograd.gradgradcheck(f, (x, bias, *fs)), name


def test_create_graph_gradient_penalty_matches_dense():
    # A typical double-backward use: the norm of the input gradient as a loss term.
    fs = _factors((4, 6), (3, 5), 3)
    x = torch.randn(4, 24, dtype=F64, requires_grad=True)
    results = {}
    for name, fn in _kernels((4, 6), (3, 5), 3).items():
        (gx,) = torch.autograd.grad(fn(x, None, fs).square().sum(), x, create_graph=True)
        results[name] = torch.autograd.grad(gx.square().sum(), fs)
    (gx,) = torch.autograd.grad(F.linear(x, kron_dense(fs)).square().sum(), x, create_graph=True)
    ref = torch.autograd.grad(gx.square().sum(), fs)
    for name, grads in results.items():
        for got, want in zip(grads, ref, strict=True):
            torch.testing.assert_close(got, want, **TOL, msg=name)


def _switch_rows(in_shape, out_shape, rank, grad):
    """The smallest row count at which the automatic choice is the dense path."""
    for rows in range(1, 4097):
        plan = kronecker_linear_plan(
            in_shape, out_shape, rank, (rows, math.prod(in_shape)), factor_grad=grad
        )
        if plan["path"] == "dense":
            return rows
    return None


@pytest.mark.parametrize("grad", [False, True])
def test_same_function_at_the_switch_point(grad):
    in_shape, out_shape, rank = (16, 24), (32, 48), 40
    switch = _switch_rows(in_shape, out_shape, rank, grad)
    assert switch is not None and switch > 1  # one row: the factorized path
    fs = _factors(in_shape, out_shape, rank, requires_grad=grad)
    bias = torch.randn(math.prod(out_shape), dtype=F64)
    w = kron_dense(fs)
    seen = set()
    for rows in (switch - 1, switch):
        plan = kronecker_linear_plan(
            in_shape, out_shape, rank, (rows, math.prod(in_shape)), factor_grad=grad
        )
        seen.add(plan["path"])
        x = torch.randn(rows, math.prod(in_shape), dtype=F64)
        with torch.set_grad_enabled(grad):
            y = kronecker_linear(x, fs, bias)
            torch.testing.assert_close(y, F.linear(x, w, bias), **TOL)
            for path in ("factorized", "dense"):
                torch.testing.assert_close(kronecker_linear(x, fs, bias, path=path), y, **TOL)
        if grad:
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, fs, g)
            want = torch.autograd.grad(F.linear(x, kron_dense(fs), bias), fs, g)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **TOL)
    assert seen == {"factorized", "dense"}


# ---------------------------------------------------------------- the choice


def test_choice_follows_the_costs():
    # One Kronecker product of 64x64 factors: 1/32 of the dense FLOPs, never dense.
    for rows in (1, 256, 8192):
        for grad in (False, True):
            plan = kronecker_linear_plan((64, 64), (64, 64), 1, (rows, 4096), factor_grad=grad)
            assert plan["path"] == "factorized"
    # compress(rank=0.5)-like ranks save no FLOPs: dense once the batch amortises W.
    plan = kronecker_linear_plan((16, 24), (32, 48), 177, (1024, 384))
    assert plan["path"] == "dense"
    plan = kronecker_linear_plan((16, 24), (32, 48), 177, (1, 384), factor_grad=False)
    assert plan["path"] == "factorized"
    assert set(plan["seconds"]) == {"factorized", "dense"}
    assert plan["kernel"] in ("ops", "function")


def test_symbolic_batch_plans_for_symbolic_rows():
    assert static_rows((3, 4, 24)) == 12
    assert static_rows((None, 24)) is None
    plan = kronecker_linear_plan((16, 24), (32, 48), 177, (None, 384))
    same = kronecker_linear_plan((16, 24), (32, 48), 177, (SYMBOLIC_ROWS, 384))
    assert plan == same


def test_force_path_and_path_argument():
    fs = _factors((4, 6), (3, 5), 2, requires_grad=False)
    x = torch.randn(3, 24, dtype=F64)
    assert forced_path() is None
    with force_path("dense"):
        assert forced_path() == "dense"
        plan = kronecker_linear_plan((64, 64), (64, 64), 1, (256, 4096))
        assert plan["path"] == "dense"
        # the argument wins over the context manager
        y = kronecker_linear(x, fs, path="factorized")
        with force_path("factorized"):
            assert forced_path() == "factorized"
        assert forced_path() == "dense"
    assert forced_path() is None
    torch.testing.assert_close(y, F.linear(x, kron_dense(fs)), **TOL)
    with pytest.raises(ValueError, match="path must be one of"):
        kronecker_linear(x, fs, path="fast")
    with pytest.raises(TypeError, match="path must be a str or None"):
        kronecker_linear(x, fs, path=1)
    with pytest.raises(ValueError, match="path must be one of"), force_path("sparse"):
        pass


def test_module_dispatch_path():
    low = KroneckerLinear(4096, 4096, bias=False, device="meta")
    assert low.dispatch_path((256, 4096)) == "factorized"
    high = KroneckerLinear(384, 1536, in_shape=(16, 24), out_shape=(48, 32), rank=177)
    assert high.dispatch_path((4096, 384)) == "dense"
    assert high.dispatch_path((1, 384), requires_grad=False) == "factorized"
    assert high.dispatch_path((None, 384)) in ("factorized", "dense")
    with force_path("factorized"):
        assert high.dispatch_path((4096, 384)) == "factorized"
    plan = high.dispatch_plan((4096, 384))
    assert plan["path"] == "dense" and plan["seconds"]["dense"] < plan["seconds"]["factorized"]


def test_module_follows_its_dispatch_path():
    m = KroneckerLinear(384, 1536, in_shape=(16, 24), out_shape=(48, 32), rank=40, dtype=F64)
    for rows in (1, 2048):
        x = torch.randn(rows, 384, dtype=F64)
        path = m.dispatch_path((rows, 384), requires_grad=True)
        y = m(x)
        # the dense path ends in F.linear (addmm), the factorized one does not
        assert (type(y.grad_fn).__name__ == "AddmmBackward0") == (path == "dense")
        torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), **TOL)


def test_cost_model_terms():
    model = DEFAULT_MODELS["cpu"]
    assert cost_model("cpu") is model
    small, big = Gemm(8, 8, 8), Gemm(1024, 1024, 1024)
    assert model.time([small]) < model.time([big])
    assert model.time([Gemm(8, 8, 8, batch=64)]) > model.time([small])
    assert model.time([Pass(1 << 26)]) > model.time([Pass(1 << 10)])
    assert model.time([big], itemsize=8) > model.time([big], itemsize=4)


def test_calibrate_returns_a_model_without_installing_it():
    before = cost_model("cpu")
    model = calibrate("cpu", install=False)
    assert isinstance(model, CostModel)
    assert model.gemm_flops > 0 and model.bytes_per_s > 0 and model.op_s > 0
    assert cost_model("cpu") is before


# ---------------------------------------------------------------- composability


def _layers():
    # One layer that dispatches to each path for a batch of 8 with gradients.
    low = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=1)
    high = KroneckerLinear(384, 1536, in_shape=(16, 24), out_shape=(48, 32), rank=177)
    return [low, high]


@pytest.mark.parametrize("path", [None, "factorized", "dense"])
def test_compile_fullgraph_on_every_path(path):
    for layer in _layers():
        x = torch.randn(8, layer.in_features, requires_grad=True)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        with force_path(path):
            y = compiled(x)
            ref = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_a_dynamic_batch(strict):
    for layer in _layers():
        batch = torch.export.Dim("batch")
        x = torch.randn(4, layer.in_features)
        ep = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},), strict=strict)
        for rows in (2, 9, 33):
            x = torch.randn(rows, layer.in_features)
            torch.testing.assert_close(ep.module()(x), layer(x), rtol=1e-4, atol=1e-4)


def test_compile_with_a_dynamic_batch_is_one_graph_across_the_switch():
    # Eager calls switch path between 2 and 3000 rows; a compiled graph is planned for
    # SYMBOLIC_ROWS and serves every batch size without recompiling.
    import torch._dynamo

    layer = _layers()[1]
    assert layer.dispatch_path((2, 384)) != layer.dispatch_path((3000, 384))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (2, 3, 3000):
            x = torch.randn(rows, 384)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["factorized", "dense"])
def test_vmap_per_sample_gradients(path):
    layer = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=3, dtype=F64)
    params = dict(layer.named_parameters())
    x = torch.randn(5, 24, dtype=F64)

    def loss(p, xi):
        return torch.func.functional_call(layer, p, (xi[None],)).square().sum()

    with force_path(path):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
        torch.testing.assert_close(torch.func.vmap(layer)(x), layer(x), **TOL)
    for name, p in params.items():
        want = torch.stack([torch.autograd.grad(loss(params, x[i]), p)[0] for i in range(5)])
        torch.testing.assert_close(per_sample[name], want, **TOL)


@pytest.mark.parametrize("path", [None, "factorized", "dense"])
@pytest.mark.parametrize("rank", [1, 40])
def test_jacobians_forward_and_reverse_mode(path, rank):
    # Under functorch transforms the factorized path runs as plain ops (forward-mode AD
    # included); the hand-written Function has no jvp rule.
    layer = KroneckerLinear(12, 6, in_shape=(3, 4), out_shape=(2, 3), rank=rank, dtype=F64)
    x = torch.randn(12, dtype=F64)
    w = layer.weight.detach()
    with force_path(path):
        torch.testing.assert_close(torch.func.jacfwd(layer)(x), w, **TOL)
        torch.testing.assert_close(torch.func.jacrev(layer)(x), w, **TOL)


# ---------------------------------------------------------------- the module's hot path


def test_hot_path_keeps_the_documented_errors():
    m = KroneckerLinear(24, 15)
    m(torch.randn(3, 24))  # warm the per-signature cache
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 24\)"):
        m(torch.randn(3, 25))
    with pytest.raises(TypeError, match="factors\\[0\\] must have the input's dtype"):
        m(torch.randn(3, 24, dtype=F64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        m([1.0] * 24)
    m(torch.randn(3, 24))  # still fine


def test_hot_path_sees_dtype_changes_and_replaced_factors():
    m = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=2)
    x = torch.randn(3, 24)
    m(x)
    m.double()
    xd = x.double()
    torch.testing.assert_close(m(xd), F.linear(xd, m.weight, m.bias), **TOL)
    new = torch.nn.Parameter(torch.randn(2, 3, 4, dtype=F64))
    m.factors[0] = new
    torch.testing.assert_close(m(xd), F.linear(xd, kron_dense([new, m.factors[1]]), m.bias))
    m.factors[0] = torch.nn.Parameter(torch.randn(2, 3, 5, dtype=F64))  # wrong shape
    with pytest.raises(ValueError):
        m(xd)


def test_hot_path_follows_in_place_updates():
    m = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), rank=2, dtype=F64)
    x = torch.randn(3, 24, dtype=F64)
    with torch.no_grad():
        m(x)
        m.factors[1].mul_(2.0)
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), **TOL)


def test_kron_weight_matches_kron_dense():
    for in_shape, out_shape in [((4, 6), (3, 5)), ((2, 3, 4), (3, 1, 2)), ((7,), (3,))]:
        for rank in (1, 3):
            fs = _factors(in_shape, out_shape, rank)
            torch.testing.assert_close(kron_weight(fs), kron_dense(fs), **TOL)
    # the largest end factor may be the last one
    fs = _factors((2, 3, 8), (2, 1, 8), 3)
    torch.testing.assert_close(kron_weight(fs), kron_dense(fs), **TOL)


def test_single_row_inference_path_sees_every_change():
    # The no-grad single-row runner keeps views of the factors: in-place updates, storage
    # swaps, replaced parameters, dtype changes and a forced path must all be honoured.
    m = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5), dtype=F64)
    x = torch.randn(1, 24, dtype=F64)

    def check():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), **TOL)

    with torch.no_grad():
        check()
        assert m._fast is not None  # the runner is in place
        check()
        m.factors[0].mul_(3.0)
        check()
        m.factors[1].data = torch.randn(1, 5, 6, dtype=F64)
        check()
        m.bias.data = torch.randn(15, dtype=F64)
        check()
        m.factors[0] = torch.nn.Parameter(torch.randn(1, 3, 4, dtype=F64))
        check()
        m.bias = None
        check()
        with force_path("dense"):
            y = m(x)
            assert torch.is_tensor(y)
            check()
        m.float()
        x = x.float()
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
        with pytest.raises(ValueError, match=r"input must have shape \(\*, 24\)"):
            m(torch.randn(1, 23))
    # with gradients the runner is not used
    y = m(x.requires_grad_())
    assert y.grad_fn is not None


def test_cache_dense_weight_for_inference():
    m = KroneckerLinear(384, 1536, in_shape=(16, 24), out_shape=(48, 32), rank=40, dtype=F64)
    x = torch.randn(64, 384, dtype=F64)
    assert not m.cache_dense_weight
    m.cache_dense_weight = True
    assert m.dispatch_path((64, 384), requires_grad=False) == "dense"
    with torch.no_grad():
        y = m(x)
        cached = m._weight_cache
        assert cached is not None
        torch.testing.assert_close(y, F.linear(x, m.weight, m.bias), **TOL)
        m(x)
        assert m._weight_cache is cached  # reused
        m.factors[0].mul_(2.0)  # in place: the version counter changes
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), **TOL)
        assert m._weight_cache is not cached
        m.factors[1] = torch.nn.Parameter(m.factors[1] * 0.5)
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), **TOL)
    # gradients: never the cache
    y = m(x)
    y.sum().backward()
    assert m.factors[0].grad is not None
    m.cache_dense_weight = False
    assert m._weight_cache is None
