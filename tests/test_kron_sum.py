"""Kronecker sums: dense, diagonal, implicit matmul, solve, and the nearest-sum projection.

References are dense definitions built from torch.kron and torch.eye; the projection is also
checked against a brute-force least-squares fit over a basis of the Kronecker-sum subspace.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kronlayers
from kronlayers.ops.kron_sum import (
    kron_sum,
    kron_sum_diag,
    kron_sum_matmul,
    kron_sum_solve,
    ks_project,
    ks_project_diag,
)

# the module, not the function of the same name that kronlayers.ops re-exports
ks_mod = importlib.import_module("kronlayers.ops.kron_sum")

F64 = torch.float64
F32 = torch.float32
TOL = {F64: dict(rtol=1e-12, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)}
DIMS = [(3,), (2, 3), (3, 2, 4), (2, 3, 4, 5)]

CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[CUDA_SKIP, pytest.mark.cuda])])
def device(request):
    return torch.device(request.param)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=F64, device="cpu"):
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def dense2(a, b):
    # the definition, A ⊕ B = A ⊗ I_b + I_a ⊗ B
    ia = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    ib = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    return torch.kron(a, ib) + torch.kron(ia, b)


def dense(*mats):
    out = mats[0]
    for m in mats[1:]:
        out = dense2(out, m)
    return out


def rand_mats(dims, g, dtype=F64, device="cpu", batch=()):
    return [randn(*batch, d, d, g=g, dtype=dtype, device=device) for d in dims]


def rand_sym(dims, g, dtype=F64, device="cpu", shift=0.0):
    out = []
    for d in dims:
        a = randn(d, d, g=g, dtype=dtype)
        a = (a + a.T) / 2 + shift * torch.eye(d, dtype=dtype)
        out.append(a.to(device))
    return out


def close(a, b, dtype=F64):
    torch.testing.assert_close(a, b, **TOL[dtype])


# ------------------------------------------------------------------------------ kron_sum


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_kron_sum_matches_dense(dims, dtype, device):
    mats = rand_mats(dims, gen(1), dtype, device)
    out = kron_sum(*mats)
    n = math.prod(dims)
    assert out.shape == (n, n) and out.dtype == dtype and out.device.type == device.type
    close(out, dense(*mats), dtype)


def test_kron_sum_two_factors_is_the_definition():
    a, b = rand_mats((3, 4), gen(2))
    expected = torch.kron(a, torch.eye(4, dtype=F64)) + torch.kron(torch.eye(3, dtype=F64), b)
    close(kron_sum(a, b), expected)


def test_kron_sum_associative():
    a, b, c = rand_mats((2, 3, 4), gen(3))
    s = kron_sum(a, b, c)
    close(s, kron_sum(kron_sum(a, b), c))
    close(s, kron_sum(a, kron_sum(b, c)))


def test_kron_sum_batched_broadcast(device):
    g = gen(4)
    a = randn(2, 1, 3, 3, g=g, device=device)
    b = randn(4, 4, g=g, device=device)
    c = randn(5, 2, 2, g=g, device=device)
    out = kron_sum(a, b, c)
    assert out.shape == (2, 5, 24, 24)
    for i in range(2):
        for j in range(5):
            close(out[i, j], dense(a[i, 0], b, c[j]))


def test_kron_sum_promotes_dtypes():
    a = torch.randn(2, 2, generator=gen(5), dtype=F32)
    b = torch.randn(3, 3, generator=gen(6), dtype=F64)
    out = kron_sum(a, b)
    assert out.dtype == F64
    close(out, dense(a.double(), b))


def test_kron_sum_gradcheck():
    mats = [m.requires_grad_() for m in rand_mats((2, 3), gen(7))]
    assert torch.autograd.gradcheck(kron_sum, mats)


# ------------------------------------------------------------------------------ kron_sum_diag


@pytest.mark.parametrize("dims", [*DIMS, (1, 5), (4, 1, 3), (300, 2)])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_kron_sum_diag_matches_dense(dims, dtype, device):
    g = gen(10)
    vecs = [randn(d, g=g, dtype=dtype, device=device) for d in dims]
    expected = torch.diagonal(dense(*[torch.diag(v) for v in vecs]))
    out = kron_sum_diag(*vecs)
    assert out.shape == (math.prod(dims),) and out.dtype == dtype
    close(out, expected, dtype)


def test_kron_sum_diag_small_example():
    out = kron_sum_diag(torch.tensor([0.0, 10.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert out.tolist() == [1.0, 2.0, 3.0, 11.0, 12.0, 13.0]
    out = kron_sum_diag(*(torch.arange(d, dtype=F64) for d in (2, 3, 4)))
    # out[i, j, k] = i + j + k in row-major order
    i, j, k = torch.meshgrid(*(torch.arange(d) for d in (2, 3, 4)), indexing="ij")
    assert out.tolist() == (i + j + k).flatten().double().tolist()


def test_kron_sum_diag_single_factor_is_a_copy():
    v = torch.randn(5, generator=gen(11))
    out = kron_sum_diag(v)
    close(out, v, F32)
    assert out.data_ptr() != v.data_ptr()


def test_kron_sum_diag_batched(device):
    g = gen(12)
    a = randn(3, 1, 2, g=g, device=device)
    b = randn(4, 3, g=g, device=device)
    c = randn(5, g=g, device=device)
    out = kron_sum_diag(a, b, c)
    assert out.shape == (3, 4, 30)
    for i in range(3):
        for j in range(4):
            close(out[i, j], kron_sum_diag(a[i, 0], b[j], c))


@pytest.mark.parametrize("dims", [(3,), (2, 3), (3, 2, 4), (2, 3, 4, 5)])
def test_kron_sum_diag_out(dims, device):
    g = gen(13)
    vecs = [randn(d, g=g, device=device) for d in dims]
    buf = torch.full((math.prod(dims),), float("nan"), dtype=F64, device=device)
    ptr = buf.data_ptr()
    for _ in range(2):  # reuse, as in an iterative loop
        res = kron_sum_diag(*vecs, out=buf)
        assert res is buf and buf.data_ptr() == ptr
        close(buf, kron_sum_diag(*vecs))
        vecs = [v * 2 for v in vecs]


def test_kron_sum_diag_out_batched():
    g = gen(14)
    a, b = randn(2, 3, g=g), randn(4, g=g)
    buf = torch.empty(2, 12, dtype=F64)
    kron_sum_diag(a, b, out=buf)
    close(buf, kron_sum_diag(a, b))


def test_kron_sum_diag_out_allowed_under_no_grad():
    v = torch.randn(3, dtype=F64, requires_grad=True)
    buf = torch.empty(9, dtype=F64)
    with torch.no_grad():
        kron_sum_diag(v, v, out=buf)
    close(buf, kron_sum_diag(v, v).detach())


@pytest.mark.parametrize("dims", [(2, 3), (3, 2, 4), (17, 19, 3), (300, 2)])
def test_kron_sum_diag_non_contiguous(dims):
    g = gen(16)
    vecs = [randn(2 * d, g=g)[::2] for d in dims]
    assert not any(v.is_contiguous() for v in vecs if v.numel() > 1)
    expected = torch.diagonal(dense(*[torch.diag(v) for v in vecs]))
    close(kron_sum_diag(*vecs), expected)
    buf = torch.empty(math.prod(dims), dtype=F64)
    close(kron_sum_diag(*vecs, out=buf), expected)
    # batched factors stored column-major, (2, d) with strides (1, 2)
    batched = [randn(d, 2, g=g).T for d in dims]
    out = torch.empty(2, math.prod(dims), dtype=F64)
    kron_sum_diag(*batched, out=out)
    for i in range(2):
        ref = torch.diagonal(dense(*[torch.diag(v[i]) for v in batched]))
        close(out[i], ref)
        close(kron_sum_diag(*batched)[i], ref)


def test_kron_sum_diag_out_must_not_overlap_inputs():
    out = torch.zeros(6, dtype=F64)
    b = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"out must not overlap vecs\[0\]"):
        kron_sum_diag(out[:2], b, out=out)
    big = torch.zeros(20, dtype=F64)
    with pytest.raises(ValueError, match=r"out must not overlap vecs\[1\]"):
        kron_sum_diag(torch.ones(2, dtype=F64), big[5:8], out=big[:6])
    with pytest.raises(ValueError, match=r"out must not overlap vecs\[1\]"):
        kron_sum_diag(b, big[2:9:2], out=big[8:20])  # strided vec at 2, 4, 6, 8
    v = torch.ones(4, dtype=F64)
    with pytest.raises(ValueError, match=r"out must not overlap vecs\[0\]"):
        kron_sum_diag(v, out=v)
    batched = torch.zeros(2, 6, dtype=F64)
    with pytest.raises(ValueError, match=r"out must not overlap vecs\[0\]"):
        kron_sum_diag(batched[:, :2], torch.ones(3, dtype=F64), out=batched)
    # meta tensors have no memory to overlap
    meta = [torch.ones(d, device="meta", dtype=F64) for d in (2, 3)]
    assert kron_sum_diag(*meta, out=torch.empty(6, device="meta", dtype=F64)).shape == (6,)
    # disjoint slices of one buffer are fine
    big = torch.randn(20, generator=gen(17), dtype=F64)
    a, c = big[10:12], big[12:15]
    res = kron_sum_diag(a, c, out=big[:6])
    assert res.data_ptr() == big.data_ptr()
    close(big[:6], kron_sum_diag(a.clone(), c.clone()))
    close(big[10:15], torch.cat([a, c]))  # inputs untouched
    # adjacent on both sides, still disjoint
    a, c = big[4:6], big[12:15]
    kron_sum_diag(a, c, out=big[6:12])
    close(big[6:12], kron_sum_diag(big[4:6].clone(), c.clone()))


def test_kron_sum_diag_gradcheck():
    g = gen(15)
    vecs = [randn(d, g=g).requires_grad_() for d in (2, 3, 2)]
    assert torch.autograd.gradcheck(kron_sum_diag, vecs)
    batched = [randn(2, 2, g=g).requires_grad_(), randn(3, g=g).requires_grad_()]
    assert torch.autograd.gradcheck(kron_sum_diag, batched)


# ------------------------------------------------------------------------------ matmul


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_kron_sum_matmul_matches_dense(dims, dtype, device):
    g = gen(20)
    mats = rand_mats(dims, g, dtype, device)
    n = math.prod(dims)
    s = dense(*mats)
    x = randn(n, 3, g=g, dtype=dtype, device=device)
    close(kron_sum_matmul(mats, x), s @ x, dtype)
    v = randn(n, g=g, dtype=dtype, device=device)
    out = kron_sum_matmul(mats, v)
    assert out.shape == (n,)
    close(out, s @ v, dtype)


def test_kron_sum_matmul_batched(device):
    g = gen(21)
    mats = [randn(2, 1, 3, 3, g=g, device=device), randn(4, 4, g=g, device=device)]
    x = randn(5, 12, 2, g=g, device=device)
    out = kron_sum_matmul(mats, x)
    assert out.shape == (2, 5, 12, 2)
    close(out, kron_sum(*mats) @ x)
    v = randn(12, g=g, device=device)
    close(kron_sum_matmul(mats, v), kron_sum(*mats) @ v)


def test_kron_sum_matmul_non_contiguous_x():
    g = gen(22)
    mats = rand_mats((3, 4), g)
    x = randn(3, 12, g=g).T  # (12, 3), transposed view
    assert not x.is_contiguous()
    close(kron_sum_matmul(mats, x), dense(*mats) @ x)


def test_kron_sum_matmul_does_not_modify_inputs():
    g = gen(23)
    mats = rand_mats((2, 3), g)
    x = randn(6, 2, g=g)
    before = [m.clone() for m in mats], x.clone()
    kron_sum_matmul(mats, x)
    for m, m0 in zip(mats, before[0], strict=True):
        assert torch.equal(m, m0)
    assert torch.equal(x, before[1])


def test_kron_sum_matmul_gradcheck():
    g = gen(24)
    mats = [m.requires_grad_() for m in rand_mats((2, 3), g)]
    x = randn(6, 2, g=g).requires_grad_()

    def f(a, b, x):
        return kron_sum_matmul([a, b], x)

    assert torch.autograd.gradcheck(f, (*mats, x))
    v = randn(6, g=g).requires_grad_()
    assert torch.autograd.gradcheck(f, (*mats, v))


# ------------------------------------------------------------------------------ solve


@pytest.mark.parametrize("dims", DIMS)
def test_kron_sum_solve_matches_linalg_solve(dims, device):
    g = gen(30)
    mats = rand_sym(dims, g, device=device, shift=3.0)
    n = math.prod(dims)
    s = dense(*mats)
    y = randn(n, 2, g=g, device=device)
    x = kron_sum_solve(mats, y)
    torch.testing.assert_close(x, torch.linalg.solve(s, y), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s @ x, y, rtol=1e-10, atol=1e-10)
    v = randn(n, g=g, device=device)
    xv = kron_sum_solve(mats, v)
    assert xv.shape == (n,)
    torch.testing.assert_close(xv, torch.linalg.solve(s, v), rtol=1e-10, atol=1e-10)


def test_kron_sum_solve_indefinite_and_float32():
    # indefinite but non-singular sum; float32 with looser tolerance
    g = gen(31)
    mats = rand_sym((3, 4, 2), g)
    s = dense(*mats)
    y = randn(24, 3, g=g)
    torch.testing.assert_close(kron_sum_solve(mats, y), torch.linalg.solve(s, y))
    m32 = [(m + 4 * torch.eye(m.shape[0], dtype=F64)).float() for m in mats]
    x32 = kron_sum_solve(m32, y.float())
    ref = torch.linalg.solve(dense(*[m.double() for m in m32]), y)
    torch.testing.assert_close(x32.double(), ref, rtol=1e-4, atol=1e-4)


def test_kron_sum_solve_batched():
    g = gen(32)
    a = torch.stack(rand_sym((3, 3), g, shift=3.0))  # (2, 3, 3)
    b = rand_sym((4,), g, shift=3.0)[0]
    y = randn(5, 1, 12, 2, g=g)
    x = kron_sum_solve([a, b], y)
    assert x.shape == (5, 2, 12, 2)
    torch.testing.assert_close(kron_sum_matmul([a, b], x), y.expand(5, 2, 12, 2))


def test_kron_sum_solve_complex_hermitian():
    g = gen(33)
    mats = []
    for d in (2, 3):
        z = torch.complex(randn(d, d, g=g), randn(d, d, g=g))
        mats.append(z + z.mH + 5 * torch.eye(d, dtype=z.dtype))
    y = torch.complex(randn(6, g=g), randn(6, g=g))
    torch.testing.assert_close(kron_sum_solve(mats, y), torch.linalg.solve(dense(*mats), y))


def test_kron_sum_solve_singular_raises():
    a = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    b = torch.diag(torch.tensor([-1.0, 3.0], dtype=F64))  # 1 + (-1) = 0 exactly
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        kron_sum_solve([a, b], torch.ones(4, dtype=F64))
    # singular only up to rounding (rotated factors): caught by the default tolerance
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen(34), dtype=F64))
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=F64)) @ q.T
    with pytest.raises(torch.linalg.LinAlgError, match="singular"):
        kron_sum_solve([a, -a], torch.ones(9, dtype=F64))
    with pytest.raises(torch.linalg.LinAlgError):
        kron_sum_solve([torch.zeros(2, 2)], torch.ones(2))


def test_kron_sum_solve_rtol():
    a = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    b = torch.diag(torch.tensor([-0.999, 3.0], dtype=F64))  # smallest |λ| = 1e-3
    y = torch.ones(4, dtype=F64)
    torch.testing.assert_close(kron_sum_solve([a, b], y), torch.linalg.solve(kron_sum(a, b), y))
    with pytest.raises(torch.linalg.LinAlgError):
        kron_sum_solve([a, b], y, rtol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        kron_sum_solve([a, b], y, rtol=-1.0)


def test_kron_sum_solve_gradcheck():
    g = gen(35)
    a0, b0 = rand_sym((2, 3), g, shift=3.0)
    y = randn(6, 2, g=g).requires_grad_()

    def f(a, b, y):
        # eigh reads one triangle; symmetrize so gradcheck's one-entry perturbations stay
        # inside the domain the function is defined on
        return kron_sum_solve([(a + a.T) / 2, (b + b.T) / 2], y)

    assert torch.autograd.gradcheck(f, (a0.requires_grad_(), b0.requires_grad_(), y))


# ------------------------------------------------------------------------------ projection


def ls_projection(mat, dims):
    # brute force: least squares over a basis of the Kronecker-sum subspace
    basis = []
    for k, d in enumerate(dims):
        for i in range(d):
            for j in range(d):
                e = torch.zeros(d, d, dtype=mat.dtype)
                e[i, j] = 1
                fs = [torch.zeros(dd, dd, dtype=mat.dtype) for dd in dims]
                fs[k] = e
                basis.append(dense(*fs).flatten())
    b = torch.stack(basis, 1)
    # the basis is redundant (I_n appears K times): an explicit rcond keeps the rank decision
    # away from rounding noise
    coef = torch.linalg.lstsq(b, mat.flatten().unsqueeze(1), rcond=1e-10, driver="gelsd").solution
    return (b @ coef).reshape(mat.shape)


def inner(a, b):
    return (a * b).sum()


@pytest.mark.parametrize("dims", [(3,), (2, 3), (3, 2, 4), (2, 3, 2, 2)])
def test_ks_project_is_the_least_squares_projection(dims, device):
    n = math.prod(dims)
    m = randn(n, n, g=gen(40))
    facs = ks_project(m.to(device), dims)
    assert [tuple(f.shape) for f in facs] == [(d, d) for d in dims]
    close(kron_sum(*facs).cpu(), ls_projection(m, dims))


@pytest.mark.parametrize("dims", [(2, 3), (3, 2, 4), (2, 3, 4, 5)])
def test_ks_project_idempotent_and_residual_orthogonal(dims, device):
    g = gen(41)
    n = math.prod(dims)
    m = randn(n, n, g=g, device=device)
    p = kron_sum(*ks_project(m, dims))
    close(kron_sum(*ks_project(p, dims)), p)
    residual = m - p
    scale = m.norm()
    for _ in range(3):
        s = kron_sum(*rand_mats(dims, g, device=device))
        assert abs(inner(residual, s)) <= 1e-12 * scale * s.norm()
    # the identity component is split evenly: every factor has mean eigenvalue tr(m)/n/K
    for f in ks_project(m, dims):
        close(torch.trace(f) / f.shape[0], torch.trace(m) / n / len(dims))


@pytest.mark.parametrize("dims", [(2, 3), (3, 2, 4), (2, 3, 4, 5)])
def test_ks_project_recovers_trace_free_factors(dims, device):
    mats = []
    for a in rand_mats(dims, gen(42), device=device):
        mats.append(
            a - torch.trace(a) / a.shape[0] * torch.eye(a.shape[0], dtype=F64, device=device)
        )
    s = kron_sum(*mats)
    for f, a in zip(ks_project(s, dims), mats, strict=True):
        close(f, a)
    # any Kronecker sum is a fixed point (its factors up to the identity gauge)
    general = rand_mats(dims, gen(43), device=device)
    s = kron_sum(*general)
    facs = ks_project(s, dims)
    close(kron_sum(*facs), s)
    for f, a in zip(facs, general, strict=True):
        d = a.shape[0]
        diff = f - a
        close(diff, diff.diagonal().mean() * torch.eye(d, dtype=F64, device=device))


def test_ks_project_float32_and_batched():
    g = gen(44)
    dims = (2, 3, 4)
    m = randn(2, 24, 24, g=g)
    facs = ks_project(m, dims)
    assert [tuple(f.shape) for f in facs] == [(2, d, d) for d in dims]
    for i in range(2):
        for f, fi in zip(facs, ks_project(m[i], dims), strict=True):
            close(f[i], fi)
    f32 = ks_project(m[0].float(), dims)
    for a, b in zip(f32, ks_project(m[0], dims), strict=True):
        assert a.dtype == F32
        close(a.double(), b, F32)


def test_ks_project_gradcheck():
    m = randn(6, 6, g=gen(45)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m: ks_project(m, (2, 3)), (m,))


# ------------------------------------------------------------------------------ projection, diag


@pytest.mark.parametrize("dims", [(5,), (2, 3), (3, 2, 4), (2, 3, 4, 5), (1, 4, 1)])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_ks_project_diag_matches_ks_project(dims, dtype, device):
    v = randn(math.prod(dims), g=gen(50), dtype=dtype, device=device)
    got = ks_project_diag(v, dims)
    ref = ks_project(torch.diag(v), dims)
    assert len(got) == len(dims)
    for a, b, d in zip(got, ref, dims, strict=True):
        assert a.shape == (d,) and a.dtype == dtype
        close(a, torch.diagonal(b), dtype)
        # the projection of a diagonal matrix has diagonal factors
        close(b, torch.diag(torch.diagonal(b)), dtype)


def test_ks_project_diag_recovers_and_is_idempotent(device):
    dims = (3, 2, 4)
    g = gen(51)
    vecs = [randn(d, g=g, device=device) for d in dims]
    vecs = [v - v.mean() for v in vecs]
    for f, v in zip(ks_project_diag(kron_sum_diag(*vecs), dims), vecs, strict=True):
        close(f, v)
    x = randn(24, g=g, device=device)
    p = kron_sum_diag(*ks_project_diag(x, dims))
    close(kron_sum_diag(*ks_project_diag(p, dims)), p)
    for _ in range(3):
        s = kron_sum_diag(*(randn(d, g=g, device=device) for d in dims))
        assert abs(inner(x - p, s)) <= 1e-12 * x.norm() * s.norm()


def test_ks_project_diag_batched():
    g = gen(52)
    x = randn(2, 3, 24, g=g)
    got = ks_project_diag(x, (2, 3, 4))
    assert [tuple(f.shape) for f in got] == [(2, 3, d) for d in (2, 3, 4)]
    for i in range(2):
        for j in range(3):
            for a, b in zip(got, ks_project_diag(x[i, j], (2, 3, 4)), strict=True):
                close(a[i, j], b)


def ks_project_diag_dense(v, dims):
    # the reference: the dense projection of diag(v), its factors' diagonals
    return [torch.diagonal(f) for f in ks_project(torch.diag(v), dims)]


@pytest.fixture(params=["sums", "blas"])
def reduction(request, monkeypatch):
    # "blas": the two gemv passes that inputs of >= _BLAS_MIN_NUMEL entries take, forced
    if request.param == "blas":
        monkeypatch.setattr(ks_mod, "_BLAS_MIN_NUMEL", 1)
    return request.param


@pytest.mark.parametrize("dims", [(37, 11), (5, 7, 13), (3, 2, 50, 3), (300, 2), (2, 300)])
@pytest.mark.parametrize("dtype", [F64, F32, torch.complex128])
def test_ks_project_diag_larger_matches_dense(dims, dtype, reduction):
    v = randn(math.prod(dims), g=gen(53), dtype=dtype)
    for a, b in zip(ks_project_diag(v, dims), ks_project_diag_dense(v, dims), strict=True):
        close(a, b, F32 if dtype == F32 else F64)


def test_ks_project_diag_blas_path_is_taken(monkeypatch):
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a, **k: calls.append(1) or real_mv(*a, **k))
    v = randn(2 * ks_mod._BLAS_MIN_NUMEL, g=gen(59))
    ks_project_diag(v, (1024, 2 * ks_mod._BLAS_MIN_NUMEL // 1024))
    assert len(calls) == 2
    calls.clear()
    ks_project_diag(v[: 64 * 64], (64, 64))  # small: sums
    ks_project_diag(v[::2], (1024, ks_mod._BLAS_MIN_NUMEL // 1024))  # strided: sums
    assert not calls


@pytest.mark.parametrize("dims", [(37, 11), (5, 7, 13), (2, 3, 4, 5)])
def test_ks_project_diag_non_contiguous(dims):
    # strided inputs take the plain reductions; same results as a contiguous copy
    g = gen(55)
    n = math.prod(dims)
    v = randn(3 * n, g=g)[1::3]
    assert not v.is_contiguous()
    for a, b in zip(ks_project_diag(v, dims), ks_project_diag_dense(v, dims), strict=True):
        close(a, b)
    # a batch stored column-major: (2, n) with strides (1, 2)
    x = randn(n, 2, g=g).T
    assert x.stride() == (1, 2)
    got = ks_project_diag(x, dims)
    for i in range(2):
        for a, b in zip(got, ks_project_diag_dense(x[i], dims), strict=True):
            close(a[i], b)


def test_ks_project_diag_paths_agree(monkeypatch):
    # the same input through mv (contiguous), sums (strided) and autograd (mv)
    monkeypatch.setattr(ks_mod, "_BLAS_MIN_NUMEL", 1)
    dims = (40, 30)
    v = randn(1200, g=gen(56))
    strided = torch.stack([v, torch.zeros_like(v)], -1)[:, 0]
    with_grad = v.clone().requires_grad_()
    for a, b, c in zip(
        ks_project_diag(v, dims),
        ks_project_diag(strided, dims),
        ks_project_diag(with_grad, dims),
        strict=True,
    ):
        close(a, b)
        close(a, c.detach())


def test_ks_project_diag_half_precision_uses_sums():
    # dtypes without BLAS gemv take the sum kernels (float accumulation)
    dims = (8, 6, 5)
    v = randn(240, g=gen(57))
    for a, b in zip(
        ks_project_diag(v.to(torch.bfloat16), dims), ks_project_diag(v, dims), strict=True
    ):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=0.02, atol=0.02)


def test_ks_project_diag_gradcheck(reduction):
    v = randn(24, g=gen(54)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: ks_project_diag(v, (2, 3, 4)), (v,))
    batched = randn(2, 12, g=gen(58)).requires_grad_()  # always the sum kernels
    assert torch.autograd.gradcheck(lambda v: ks_project_diag(v, (3, 4)), (batched,))


# ------------------------------------------------------------------------------ hypothesis

dims_st = st.lists(st.integers(1, 5), min_size=1, max_size=4).filter(lambda d: math.prod(d) <= 150)


@settings(max_examples=25, deadline=None)
@given(dims=dims_st, seed=st.integers(0, 2**16))
def test_property_diag_and_matmul(dims, seed):
    g = gen(seed)
    vecs = [randn(d, g=g) for d in dims]
    close(kron_sum_diag(*vecs), torch.diagonal(dense(*[torch.diag(v) for v in vecs])))
    mats = rand_mats(dims, g)
    x = randn(math.prod(dims), 2, g=g)
    close(kron_sum_matmul(mats, x), dense(*mats) @ x)


@settings(max_examples=25, deadline=None)
@given(dims=dims_st, seed=st.integers(0, 2**16))
def test_property_projection(dims, seed):
    g = gen(seed)
    n = math.prod(dims)
    m = randn(n, n, g=g)
    p = kron_sum(*ks_project(m, dims))
    close(kron_sum(*ks_project(p, dims)), p)
    s = kron_sum(*rand_mats(dims, g))
    assert abs(inner(m - p, s)) <= 1e-12 * m.norm() * s.norm()
    v = randn(n, g=g)
    for a, b in zip(ks_project_diag(v, dims), ks_project(torch.diag(v), dims), strict=True):
        close(a, torch.diagonal(b))


@settings(max_examples=20, deadline=None)
@given(dims=dims_st.filter(lambda d: math.prod(d) <= 60), seed=st.integers(0, 2**16))
def test_property_solve(dims, seed):
    g = gen(seed)
    mats = rand_sym(dims, g, shift=2.0 * len(dims) + 2.0)  # diagonally dominant -> SPD
    y = randn(math.prod(dims), g=g)
    torch.testing.assert_close(
        kron_sum_solve(mats, y), torch.linalg.solve(dense(*mats), y), rtol=1e-10, atol=1e-10
    )


# ------------------------------------------------------------------------------ errors


def test_exports():
    names = ["kron_sum", "kron_sum_diag", "kron_sum_matmul", "kron_sum_solve"]
    names += ["ks_project", "ks_project_diag"]
    for name in names:
        assert getattr(kronlayers, name) is getattr(ks_mod, name)
        assert name in kronlayers.__all__
        assert getattr(kronlayers.ops, name) is getattr(ks_mod, name)


def test_errors_no_factors():
    with pytest.raises(ValueError, match="at least one factor"):
        kron_sum()
    with pytest.raises(ValueError, match="at least one factor"):
        kron_sum_diag()
    with pytest.raises(ValueError, match=r"mats must hold at least one"):
        kron_sum_matmul([], torch.ones(3))
    with pytest.raises(ValueError, match=r"mats must hold at least one"):
        kron_sum_solve((), torch.ones(3))


def test_errors_factor_types():
    a = torch.eye(2)
    with pytest.raises(TypeError, match="separate arguments"):
        kron_sum([a, a])
    with pytest.raises(TypeError, match="separate arguments"):
        kron_sum_diag((torch.ones(2), torch.ones(2)))
    with pytest.raises(TypeError, match=r"mats\[1\] must be a torch.Tensor"):
        kron_sum(a, [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(TypeError, match=r"vecs\[0\] must be a torch.Tensor"):
        kron_sum_diag(3.0, torch.ones(2))
    with pytest.raises(TypeError, match="mats must be a list or tuple"):
        kron_sum_matmul(a, torch.ones(2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        kron_sum_matmul([a], [1.0, 2.0])
    with pytest.raises(TypeError, match="mat must be a torch.Tensor"):
        ks_project([[1.0]], (1,))


def test_errors_non_square():
    sq = torch.eye(2)
    for bad in (torch.ones(2, 3), torch.ones(3), torch.ones(0, 0)):
        with pytest.raises(ValueError, match=r"mats\[1\] must .*\(\*, d, d\)"):
            kron_sum(sq, bad)
        with pytest.raises(ValueError, match=r"mats\[1\] must .*\(\*, d, d\)"):
            kron_sum_matmul([sq, bad], torch.ones(4))
        with pytest.raises(ValueError, match=r"mats\[1\] must .*\(\*, d, d\)"):
            kron_sum_solve([sq, bad], torch.ones(4))
    with pytest.raises(ValueError, match=r"mat must .*\(\*, d, d\)"):
        ks_project(torch.ones(4, 6), (2, 2))


def test_errors_vectors():
    with pytest.raises(ValueError, match=r"vecs\[1\] must have shape \(\*, d\)"):
        kron_sum_diag(torch.ones(2), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"vecs\[0\] must have shape \(\*, d\) with d >= 1"):
        kron_sum_diag(torch.ones(0), torch.ones(2))
    with pytest.raises(ValueError, match=r"vec must have shape \(\*, d\)"):
        ks_project_diag(torch.tensor(1.0), (1,))


def test_errors_dims():
    v, m = torch.ones(12), torch.eye(12)
    for f, x, name in ((ks_project_diag, v, "vec"), (ks_project, m, "mat")):
        with pytest.raises(ValueError, match=rf"product 10, but it must equal {name}.shape"):
            f(x, (2, 5))
        with pytest.raises(ValueError, match="positive ints"):
            f(x, (12, 1, 0))
        with pytest.raises(ValueError, match="positive ints"):
            f(x, (-3, -4))
        with pytest.raises(TypeError, match="dims must be a non-empty sequence"):
            f(x, 12)
        with pytest.raises(TypeError, match="dims must be a non-empty sequence"):
            f(x, torch.tensor([3, 4]))
        with pytest.raises(TypeError, match="dims must contain ints"):
            f(x, (3.0, 4))
        # an empty sequence: TypeError before the shared validator moved to _validation,
        # ValueError (right type, wrong value) since
        with pytest.raises((TypeError, ValueError), match="non-empty sequence"):
            f(x, ())
    # numpy-style integers are fine
    assert len(ks_project_diag(v, (torch.tensor(3), 4))) == 2


def test_errors_rhs_shape():
    mats = [torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)]
    for f in (kron_sum_matmul, kron_sum_solve):
        name = "x" if f is kron_sum_matmul else "y"
        for bad in (torch.ones(5, dtype=F64), torch.ones(6, 6, 2, dtype=F64).mT, torch.tensor(1.0)):
            with pytest.raises(ValueError, match=rf"{name} must have shape \(6,\) or \(\*, 6, m\)"):
                f(mats, bad)
        with pytest.raises(TypeError, match="dtype"):
            f(mats, torch.ones(6, dtype=F32))


def test_errors_dtype_and_symmetry():
    with pytest.raises(TypeError, match="mats\\[1\\] has dtype"):
        kron_sum_matmul([torch.eye(2, dtype=F64), torch.eye(2, dtype=F32)], torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        ks_project(torch.eye(4, dtype=torch.int64), (2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        ks_project_diag(torch.ones(4, dtype=torch.int64), (2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        kron_sum_solve([torch.eye(2, dtype=torch.int64)], torch.ones(2, dtype=torch.int64))
    nonsym = torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"mats\[1\] must be symmetric"):
        kron_sum_solve([torch.eye(2, dtype=F64), nonsym], torch.ones(4, dtype=F64))


def test_errors_batch_and_device():
    with pytest.raises(ValueError, match="batch dims of mats do not broadcast"):
        kron_sum(torch.ones(2, 3, 3), torch.ones(4, 2, 2))
    with pytest.raises(ValueError, match="batch dims of vecs do not broadcast"):
        kron_sum_diag(torch.ones(2, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="batch dims of mats and x do not broadcast"):
        kron_sum_matmul([torch.ones(2, 3, 3)], torch.ones(4, 3, 1))
    meta = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match=r"vecs\[1\] is on meta, but vecs\[0\] is on cpu"):
        kron_sum_diag(torch.ones(2), meta)
    with pytest.raises(ValueError, match=r"x is on meta"):
        kron_sum_matmul([torch.eye(2)], meta)


def test_errors_out():
    a, b = torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=r"out must have shape \(6,\)"):
        kron_sum_diag(a, b, out=torch.empty(5, dtype=F64))
    with pytest.raises(ValueError, match=r"out must have shape \(6,\)"):
        kron_sum_diag(a, b, out=torch.empty(2, 3, dtype=F64))
    with pytest.raises(TypeError, match="out must have dtype torch.float64"):
        kron_sum_diag(a, b, out=torch.empty(6, dtype=F32))
    with pytest.raises(ValueError, match="out must be contiguous"):
        kron_sum_diag(a, b, out=torch.empty(12, dtype=F64)[::2])
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        kron_sum_diag(a, b, out=[0.0] * 6)
    with pytest.raises(ValueError, match="out= is not differentiable"):
        kron_sum_diag(a.requires_grad_(), b, out=torch.empty(6, dtype=F64))
