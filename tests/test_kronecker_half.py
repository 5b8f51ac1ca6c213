"""KroneckerLinear in float16 / bfloat16 with badly balanced factors (issue 14).

``W = sum_r F_1[r] ⊗ ... ⊗ F_d[r]`` is unchanged when one factor of a term is multiplied by
``c`` and another divided by it, so factors with entries ``1e-3`` and ``1e3`` give an
ordinary weight, which the dense fp16 layer applies without trouble, while the factorized
kernel's intermediates (the input times the large factor) overflow fp16. In half precision
the kernels balance the factors per rank term first
(:func:`kronlayers.functional._amp.balance_kron_factors`); float32 / float64 calls must be
bit-identical to the unbalanced kernels.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kronlayers import KroneckerLinear
from kronlayers.functional import kronecker_linear
from kronlayers.functional._amp import balance_kron_factors
from kronlayers.functional._dispatch import force_path
from kronlayers.functional._kron_engine import kron_weight
from kronlayers.functional.kronecker_linear import (
    KroneckerLinearConfig,
    KroneckerLinearFunction,
    _factorized,
    kronecker_linear_plan,
)

F64, F16, BF16 = torch.float64, torch.float16, torch.bfloat16

# (in_shape, out_shape, rank, scale of each factor's entries, scale of the input). Each case
# overflows fp16 somewhere without balancing: the first three in the factorized kernel (the
# large factor is the one contracted first), "3f-weight" where the weight is formed (the
# product of the two large factors, before the small one).
CASES = {
    "2f-r2": ((16, 64), (8, 16), 2, (1e-3, 1e3), 4.0),
    "2f-r1": ((16, 64), (8, 16), 1, (1e-3, 1e3), 4.0),
    "3f-r2": ((8, 8, 32), (8, 8, 8), 2, (1e-2, 1e-2, 1e3), 4.0),
    "3f-weight": ((8, 8, 32), (8, 8, 8), 2, (3e2, 3e2, 1e-3), 1.0),
}


def _case(name, seed=0):
    in_shape, out_shape, rank, scales, x_scale = CASES[name]
    g = torch.Generator().manual_seed(seed)
    factors = [
        torch.randn(rank, o, i, generator=g, dtype=F64) * s
        for o, i, s in zip(out_shape, in_shape, scales, strict=True)
    ]
    x = torch.randn(32, math.prod(in_shape), generator=g, dtype=F64) * x_scale
    bias = torch.randn(math.prod(out_shape), generator=g, dtype=F64)
    return x, factors, bias


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _raw_kernel(x, factors, bias):
    """The factorized kernel the dispatcher picks, run on the factors as given."""
    in_shape = tuple(f.shape[2] for f in factors)
    out_shape = tuple(f.shape[1] for f in factors)
    rank = factors[0].shape[0]
    grad = torch.is_grad_enabled()
    plan = kronecker_linear_plan(
        in_shape, out_shape, rank, tuple(x.shape), dtype=x.dtype,
        input_grad=grad and x.requires_grad,
        factor_grad=grad and any(f.requires_grad for f in factors),
        bias=bias is not None,
    )  # fmt: skip
    config = KroneckerLinearConfig(in_shape, out_shape, rank, plan["order"], plan["save_partial"])
    if plan["kernel"] == "function":
        y = KroneckerLinearFunction.apply(x, bias, config, *factors)
        return y[0] if config.save_partial else y
    return _factorized(x, bias, config, factors)


@pytest.mark.parametrize("name", list(CASES))
def test_fp16_unbalanced_factors_stay_finite(name):
    x, factors, bias = _case(name)
    ref = F.linear(x, kron_weight(factors), bias)
    xh, fh, bh = x.half(), [f.half() for f in factors], bias.half()
    dense = F.linear(xh, kron_weight(factors).half(), bh)
    assert dense.isfinite().all()  # the weight itself is ordinary
    # The issue: on the factors as given, the kernel or the formed weight overflowed.
    raw = {"factorized": _raw_kernel(xh, fh, bh), "dense": F.linear(xh, kron_weight(fh), bh)}
    assert not all(y.isfinite().all() for y in raw.values())
    for path in ("factorized", "dense"):
        y = kronecker_linear(xh, fh, bh, path=path)
        assert y.dtype == F16 and y.isfinite().all()
        assert _rel(y, ref) < 10 * _rel(dense, ref) + 1e-3
        # float32 agrees with float64 tightly (the reference is no fluke).
        y32 = kronecker_linear(x.float(), [f.float() for f in factors], bias.float(), path=path)
        assert _rel(y32, ref) < 1e-5


# "3f-weight": the small factor's true gradient (it scales with the two large factors)
# does not fit in float16 itself.
@pytest.mark.parametrize("name", ["2f-r2", "2f-r1", "3f-r2"])
def test_fp16_gradients_match_float64(name):
    x, factors, bias = _case(name)

    def grads(dtype):
        ts = [t.detach().to(dtype).requires_grad_(True) for t in (x, bias, *factors)]
        y = kronecker_linear(ts[0], ts[2:], ts[1])
        # Scaled (as loss scaling would) so that every true gradient is a normal float16:
        # the tiny factor's is large (it scales with the large factor), the rest small.
        (y.to(F64 if dtype == F64 else torch.float32) / 100).pow(2).sum().div(len(x)).backward()
        return [t.grad for t in ts]

    g64 = grads(F64)
    assert all(g.abs().max() < 3e4 for g in g64)  # the true gradients fit in float16
    assert all(g.abs().median() > torch.finfo(F16).tiny for g in g64)  # mostly normal
    for g, ref in zip(grads(F16), g64, strict=True):
        assert g.dtype == F16 and g.isfinite().all()
        assert _rel(g, ref) < 0.02


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_matches_float64(name):
    x, factors, bias = _case(name)
    ref = F.linear(x, kron_weight(factors), bias)
    dense = F.linear(x.to(BF16), kron_weight(factors).to(BF16), bias.to(BF16))
    y = kronecker_linear(x.to(BF16), [f.to(BF16) for f in factors], bias.to(BF16))
    assert y.dtype == BF16 and y.isfinite().all()
    assert _rel(y, ref) < 10 * _rel(dense, ref) + 1e-2


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_autocast_balances_float32_factors(dtype):
    x, factors, bias = _case("2f-r2")
    ref = F.linear(x, kron_weight(factors), bias)
    leaves = [f.float().requires_grad_(True) for f in factors]
    with torch.autocast("cpu", dtype=dtype):
        y = kronecker_linear(x.float(), leaves, bias.float())
    assert y.dtype == dtype and y.isfinite().all()
    assert _rel(y, ref) < (2e-3 if dtype == F16 else 2e-2)
    (y.float() / 100).pow(2).mean().backward()
    # The parameters stay float32 and get float32 gradients through the balancing.
    assert all(f.grad.dtype == torch.float32 and f.grad.isfinite().all() for f in leaves)


def _half_layer(name, dtype=F16, **kwargs):
    x, factors, bias = _case(name)
    in_shape, out_shape, rank, _, _ = CASES[name]
    layer = KroneckerLinear(
        math.prod(in_shape), math.prod(out_shape), in_shape=in_shape, out_shape=out_shape,
        rank=rank, dtype=dtype, **kwargs,
    )  # fmt: skip
    with torch.no_grad():
        for p, f in zip(layer.factors, factors, strict=True):
            p.copy_(f)
        layer.bias.copy_(bias)
    return layer, x, F.linear(x, kron_weight(factors), bias)


@pytest.mark.parametrize("name", list(CASES))
def test_module_fp16_paths_stay_finite(name):
    layer, x, ref = _half_layer(name)
    xh = x.half()
    # Grad mode: the cached plan of the hot path; twice, the second from the cache.
    for _ in range(2):
        y = layer(xh)
        assert y.isfinite().all() and _rel(y, ref) < 2e-3
    # No grad: the inference runners; repeated single rows are the latency path (rank 1
    # keeps a runner for it).
    with torch.no_grad():
        for rows in (32, 1, 1, 1, 32, 32):
            y = layer(xh[:rows])
            assert y.isfinite().all() and _rel(y, ref[:rows]) < 2e-3
    # The cached dense weight (its path forced: the cost model might prefer the other).
    layer.cache_dense_weight = True
    with torch.no_grad(), force_path("dense"):
        for _ in range(2):
            y = layer(xh)
            assert y.isfinite().all() and _rel(y, ref) < 2e-3
    # The weight property.
    w = layer.weight
    assert w.dtype == F16 and w.isfinite().all()
    assert _rel(w, kron_weight(_case(name)[1])) < 2e-3
    # Gradients reach the parameters, finite.
    layer.zero_grad()
    (layer(xh).float() / 100).pow(2).mean().backward()
    assert all(p.grad.isfinite().all() for p in layer.parameters())


def test_module_autocast_fp16():
    layer, x, ref = _half_layer("2f-r2", dtype=torch.float32)
    with torch.autocast("cpu", dtype=F16):
        y = layer(x.float())
        with torch.no_grad():
            y1 = layer(x[:1].float())
    assert y.dtype == F16 and y.isfinite().all() and _rel(y, ref) < 2e-3
    assert y1.isfinite().all() and _rel(y1, ref[:1]) < 2e-3


def test_module_shared_factors_fp16():
    # One parameter used twice: each occurrence is balanced on its own (a no-op in exact
    # arithmetic, the norms being equal), gradients summed.
    g = torch.Generator().manual_seed(0)
    layer = KroneckerLinear(64, 64, in_shape=(8, 8), out_shape=(8, 8), rank=2, dtype=F16,
                            shared_factors=True)  # fmt: skip
    f = torch.randn(2, 8, 8, generator=g, dtype=F64) * 30
    with torch.no_grad():
        layer.factors[0].copy_(f)
    x = torch.randn(4, 64, generator=g, dtype=F64)
    ref = F.linear(x, kron_weight([f, f]), layer.bias.double())
    y = layer(x.half())
    assert y.isfinite().all() and _rel(y, ref) < 2e-3


# --- float32 / float64: untouched ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(CASES))
def test_full_precision_is_bit_identical(dtype, name):
    x, factors, bias = _case(name)
    x, bias = x.to(dtype).requires_grad_(True), bias.to(dtype).requires_grad_(True)
    factors = [f.to(dtype).requires_grad_(True) for f in factors]
    assert balance_kron_factors(factors, dtype) is factors
    # Factorized: the unbalanced kernel itself, outputs and gradients.
    y = kronecker_linear(x, factors, bias, path="factorized")
    ref = _raw_kernel(x, factors, bias)
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, bias, *factors], g)
    want = torch.autograd.grad(ref, [x, bias, *factors], g)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # Dense: F.linear with the weight formed from the factors as given.
    y = kronecker_linear(x, factors, bias, path="dense")
    assert torch.equal(y, F.linear(x, kron_weight(factors), bias))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_module_full_precision_is_bit_identical(dtype):
    layer, x, _ = _half_layer("2f-r1", dtype=dtype)
    x = x.to(dtype)
    factors = list(layer.factors)
    with torch.no_grad():
        want = _raw_kernel(x, factors, layer.bias)
        assert torch.equal(layer(x), want)
        assert torch.equal(layer(x), want)  # the cached plan
        assert torch.equal(layer(x[:1]), _raw_kernel(x[:1], factors, layer.bias))
    assert torch.equal(layer.weight, kron_weight(factors))
    with torch.autocast("cpu", dtype=BF16):  # a float64 input is left alone by autocast
        if dtype == F64:
            assert torch.equal(layer(x), layer(x)) and layer(x).dtype == F64


def test_balance_kron_factors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=g) * 1e3
    b = torch.randn(3, 2, 3, generator=g) * 1e-3
    c = torch.randn(3, 3, 2, generator=g)
    a[2] = 0  # a zero term is left alone
    ba, bb, bc = balance_kron_factors([a, b, c], F16)
    torch.testing.assert_close(kron_weight([ba, bb, bc]), kron_weight([a, b, c]), rtol=1e-5,
                               atol=1e-9)  # fmt: skip
    p = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1) * c.flatten(1).norm(dim=1)
    for r in range(2):
        for f in (ba, bb, bc):
            torch.testing.assert_close(f[r].norm(), p[r] ** (1 / 3), rtol=1e-4, atol=0)
    assert torch.equal(bb[2], b[2]) and torch.equal(bc[2], c[2])
    # fp16 factors come back fp16; one factor (d = 1) is returned as is.
    assert all(t.dtype == F16 for t in balance_kron_factors([a.half(), b.half()], F16))
    single = [a]
    assert balance_kron_factors(single, F16) is single
