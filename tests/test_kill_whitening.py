"""The data-aware fits of kronlayers.decomposition.whitening against closed forms and
independent references: the damped Gram and its Cholesky retries, the output error, the
whitened SVD and its error curves, mode Grams, the Kronecker initialisation (optimal for a
Kronecker Gram) and its exact ALS half-steps, the CP refinement's exact block updates and
the Tucker-2 reduced-rank regression (all float64, small sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from kronlayers import kron_dense
from kronlayers.decomposition.cp import balance_cp_factors, cp_als
from kronlayers.decomposition.nearest_kronecker import kron_rearrange, nearest_kronecker
from kronlayers.decomposition.tucker import tucker2_decompose
from kronlayers.decomposition.whitening import (
    DEFAULT_DAMPING,
    WhitenedSVD,
    _spd_solve,
    damped,
    damped_cholesky,
    mode_grams,
    output_error,
    thin_svd,
    whitened_cp,
    whitened_low_rank,
    whitened_nearest_kronecker,
    whitened_svd,
    whitened_tucker2,
)
from kronlayers.ops.khatri_rao import khatri_rao

F64 = torch.float64


def _data(n, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0]
    scales = torch.logspace(0, -1.5, dim, dtype=F64)
    return (torch.randn(n, dim, generator=g, dtype=F64) * scales) @ basis.T + 0.2


def _gram(dim, seed=0, n=None):
    x = _data(n or 3 * dim, dim, seed)
    return x.T @ x


def _obj(w, approx, g):
    e = w - approx
    return float(((e @ g) * e).sum())


def _rel(w, approx, g):
    return math.sqrt(_obj(w, approx, g) / _obj(w, torch.zeros_like(w), g))


def _block_minimiser(f, x0):
    """The exact minimiser of a convex quadratic ``f`` of one tensor (autograd Hessian)."""
    flat = x0.reshape(-1).detach().clone()

    def fl(v):
        return f(v.reshape(x0.shape))

    h = torch.autograd.functional.hessian(fl, flat)
    grad0 = torch.autograd.functional.jacobian(fl, torch.zeros_like(flat))
    return torch.linalg.solve(h, -grad0).reshape(x0.shape)


# --------------------------------------------------------------------------- damping


def test_damped_is_the_symmetrised_gram_plus_a_scaled_identity():
    g = torch.randn(5, 5, dtype=torch.float32)
    g[0, 0] = 7.0
    sym = (g.to(F64) + g.to(F64).T) / 2
    mean = float(sym.diagonal().mean())
    want = sym + 0.3 * mean * torch.eye(5, dtype=F64)
    got = damped(g, 0.3)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    # no damping: only the symmetrisation
    torch.testing.assert_close(damped(g, 0.0), sym, rtol=0, atol=0)
    # a Gram with a non-positive mean diagonal is damped with a unit scale
    torch.testing.assert_close(damped(torch.zeros(3, 3), 0.5), 0.5 * torch.eye(3, dtype=F64))
    # a small but positive mean diagonal is the scale itself
    small = 0.1 * torch.eye(3, dtype=F64)
    torch.testing.assert_close(damped(small, 0.5), 0.15 * torch.eye(3, dtype=F64))
    neg = -torch.eye(2, dtype=F64)
    torch.testing.assert_close(damped(neg, 2.0), neg + 2.0 * torch.eye(2, dtype=F64))
    assert damped(torch.zeros(0, 0), 1.0).shape == (0, 0)


def test_damped_cholesky_and_its_retries():
    g = _gram(6)
    mean = float(g.diagonal().mean())
    chol = damped_cholesky(g, 0.05)
    assert torch.equal(chol, torch.tril(chol))
    torch.testing.assert_close(chol @ chol.T, g + 0.05 * mean * torch.eye(6, dtype=F64))
    torch.testing.assert_close(damped_cholesky(g), damped_cholesky(g, DEFAULT_DAMPING))
    assert DEFAULT_DAMPING == 1e-2
    # singular G without damping: raised to 1e-8 (then tenfold)
    v = torch.arange(1.0, 5.0, dtype=F64)[:, None]
    sing = v @ v.T
    chol = damped_cholesky(sing, 0.0)
    torch.testing.assert_close(
        chol @ chol.T, sing + 1e-8 * 7.5 * torch.eye(4, dtype=F64), rtol=1e-12, atol=1e-12
    )
    # an indefinite "Gram" that needs the twelfth try (damping 100): diag(1000, -900)
    ind = torch.diag(torch.tensor([1000.0, -900.0], dtype=F64))
    chol = damped_cholesky(ind, 0.0)
    torch.testing.assert_close(chol @ chol.T, ind + 5000 * torch.eye(2, dtype=F64))
    # ... and one that would need a thirteenth: an error
    with pytest.raises(ValueError, match="not a finite positive semi-definite"):
        damped_cholesky(torch.diag(torch.tensor([1000.0, -990.0], dtype=F64)), 0.0)
    with pytest.raises(ValueError, match="not a finite positive semi-definite"):
        damped_cholesky(torch.full((2, 2), float("nan"), dtype=F64), 0.1)


def test_whitened_svd_shift_is_the_absolute_damping():
    w = torch.randn(3, 4, dtype=F64)
    g = _gram(4)
    svd = whitened_svd(w, g, 0.2)
    assert svd.shift == pytest.approx(0.2 * float(g.diagonal().mean()), rel=1e-14)
    assert svd.weight_norm2 == pytest.approx(float((w * w).sum()), rel=1e-14)
    # a zero Gram is damped with a unit scale: the shift is the damping itself
    assert whitened_svd(w, torch.zeros(4, 4, dtype=F64), 0.5).shift == pytest.approx(0.5)
    # retried damping: the shift that was actually added
    v = torch.arange(1.0, 5.0, dtype=F64)[:, None]
    assert whitened_svd(w, v @ v.T, 0.0).shift == pytest.approx(1e-8 * 7.5)


def test_argument_checks():
    w = torch.randn(3, 4, dtype=F64)
    g = _gram(4)
    for bad in (torch.zeros(4, 5), torch.zeros(5, 5), torch.zeros(4), torch.zeros(2, 4, 4)):
        with pytest.raises(ValueError, match=r"input_gram must have shape \(4, 4\)"):
            whitened_svd(w, bad)
    with pytest.raises(TypeError, match="input_gram must be a floating-point"):
        whitened_svd(w, torch.zeros(4, 4, dtype=torch.int64))
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="damping must be"):
            whitened_svd(w, g, bad)
    for bad in (-1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be"):
            whitened_svd(w, g, bad)
    assert whitened_svd(w, g, 0).shift == 0.0  # an int is accepted
    for fit in (
        lambda r: whitened_low_rank(w, g, r),
        lambda r: whitened_cp(w, g, (3,), (2, 2), r),
    ):
        with pytest.raises(ValueError, match="rank must be >= 1"):
            fit(0)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        whitened_svd(w[0], g)
    with pytest.raises(ValueError, match="kernel must have shape"):
        whitened_tucker2(w, g, (1, 1))


# --------------------------------------------------------------------------- output error


def test_output_error_is_the_relative_error_on_the_data():
    x = _data(40, 6)
    w, a = torch.randn(5, 6, dtype=F64), torch.randn(5, 6, dtype=F64)
    want = float((x @ w.T - x @ a.T).norm() / (x @ w.T).norm())
    assert output_error(w, a, x.T @ x) == pytest.approx(want, rel=1e-12)
    assert output_error(w.float(), a.float(), (x.T @ x).float()) == pytest.approx(want, rel=1e-5)
    # a zero weight: the absolute error
    want0 = float((x @ a.T).norm())
    assert output_error(torch.zeros_like(w), a, x.T @ x) == pytest.approx(want0, rel=1e-12)


def test_output_error_runs_large_products_in_float32():
    # e = 1 + 2^-30 (not a float32), w = 3: exactly (1 + 2^-30) / 3 in float64; with e
    # rounded to float32 on one side, sqrt(1 + 2^-30) / 3.
    eps = 2.0**-30
    g = torch.ones(1, 1, dtype=F64)
    for n, want in ((1_000_000, (1 + eps) / 3), (1_000_001, math.sqrt(1 + eps) / 3)):
        w = torch.full((n, 1), 3.0, dtype=F64)
        approx = w - (1 + eps)
        assert abs(output_error(w, approx, g) - want) < 1e-14, n


# --------------------------------------------------------------------------- SVD


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
def test_thin_svd_matches_the_svd(shape):
    m = torch.randn(*shape, dtype=F64)
    u, s, vh = thin_svd(m)
    k = min(shape)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    torch.testing.assert_close(s, torch.linalg.svdvals(m), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u * s @ vh, m, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
    # rank deficient: the vectors computed from the other side (U when p >= q, Vh when
    # p < q) are zero for zero singular values; the eigenvector side stays orthonormal
    low = torch.zeros(*shape, dtype=F64)
    low[0, 0] = 2.0
    u, s, vh = thin_svd(low)
    assert s.tolist() == [2.0] + [0.0] * (k - 1)
    if shape[0] != shape[1]:
        derived = u[:, 1:] if shape[0] > shape[1] else vh[1:]
        assert torch.all(derived == 0)
    else:  # either side may be the derived one
        assert torch.all(u[:, 1:] == 0) or torch.all(vh[1:] == 0)
    torch.testing.assert_close(u * s @ vh, low, rtol=0, atol=1e-12)


def _truncation(svd: WhitenedSVD, r: int) -> torch.Tensor:
    b, a = svd.factors(r)
    return b @ a.T


def test_whitened_svd_error_curves_are_the_truncation_errors():
    w = torch.randn(5, 6, dtype=F64)
    g = _gram(6, n=8)
    for damping in (0.0, 0.1):
        svd = whitened_svd(w, g, damping)
        s2 = svd.s**2
        k = s2.shape[0]
        rel = svd.rel_errors()
        out = svd.output_errors()
        assert rel.shape == (k + 1,) and out.shape == (k + 1,)
        g_d = damped(g, damping)
        for r in range(k + 1):
            approx = _truncation(svd, r) if r else torch.zeros_like(w)
            # the damped objective: the whitened tail
            tail = float(s2[r:].sum()) / float(s2.sum())
            assert float(rel[r]) == pytest.approx(math.sqrt(tail), abs=1e-12)
            assert _obj(w, approx, g_d) == pytest.approx(float(s2[r:].sum()), rel=1e-9, abs=1e-9)
            # the undamped output error
            assert float(out[r]) == pytest.approx(output_error(w, approx, g), abs=1e-9)
        # Eckart-Young in the whitened space: W_r = (W L)_r L^{-1}
        u, s, vh = torch.linalg.svd(w @ svd.chol)
        w2 = (u[:, :2] * s[:2]) @ vh[:2] @ torch.linalg.inv(svd.chol)
        torch.testing.assert_close(_truncation(svd, 2), w2, rtol=1e-9, atol=1e-10)
        # sqrt(s) on each side
        b, a = svd.factors(2)
        torch.testing.assert_close(b.norm(dim=0) ** 2, svd.s[:2], rtol=1e-12, atol=0)
        torch.testing.assert_close((svd.chol.T @ a).norm(dim=0) ** 2, svd.s[:2])


def test_error_curves_of_a_zero_weight_are_zero():
    z = torch.zeros(3, 4, dtype=F64)
    svd = whitened_svd(z, _gram(4), 0.1)
    assert torch.equal(svd.rel_errors(), torch.zeros(4, dtype=F64))
    assert torch.equal(svd.output_errors(), torch.zeros(4, dtype=F64))
    b, a, err = whitened_low_rank(z, _gram(4), 2, 0.1)
    assert err == 0.0 and torch.all(b @ a.T == 0)


def test_whitened_low_rank_error_is_its_output_error():
    w = torch.randn(6, 5, dtype=torch.float32)
    g = _gram(5, n=7)
    for damping in (0.0, 0.05, 1.0):
        svd = whitened_svd(w, g, damping)
        for rank in (1, 3, 5, 9):
            b, a, err = whitened_low_rank(w, g, rank, damping)
            r = min(rank, 5)
            assert b.shape == (6, r) and a.shape == (5, r) and b.dtype == torch.float32
            want_approx = _truncation(svd, r)
            torch.testing.assert_close((b @ a.T).to(F64), want_approx, rtol=1e-5, atol=1e-5)
            assert err == pytest.approx(output_error(w, want_approx, g), abs=1e-9)
            assert err == pytest.approx(float(svd.output_errors()[r]), abs=1e-9)


# --------------------------------------------------------------------------- mode Grams


def test_mode_grams_are_partial_traces():
    shape = (2, 3, 4)
    g = _gram(24, n=30)
    t = g.reshape(*shape, *shape)
    want = [
        torch.einsum("ajkbjk->ab", t),
        torch.einsum("iajibj->ab", t),
        torch.einsum("ijaijb->ab", t),
    ]
    for got, w in zip(mode_grams(g, shape), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
    # symmetrised
    asym = torch.randn(6, 6, dtype=F64)
    for got in mode_grams(asym, (2, 3)):
        torch.testing.assert_close(got, got.T, rtol=0, atol=0)
    g1, _ = mode_grams(asym, (2, 3))
    t = asym.reshape(2, 3, 2, 3)
    torch.testing.assert_close(g1, (torch.einsum("ajbj->ab", t) + torch.einsum("ajbj->ba", t)) / 2)


# --------------------------------------------------------------------------- Kronecker


def _kron_gram(shapes, seed=0):
    grams = [_gram(n, seed=seed + k) for k, n in enumerate(shapes)]
    return grams, torch.kron(grams[0], grams[1])


@pytest.mark.parametrize("rank", [1, 2])
def test_kronecker_init_is_optimal_for_a_kronecker_gram(rank):
    out_shape, in_shape = (2, 3), (3, 2)
    w = torch.randn(6, 6, dtype=F64)
    (g1, g2), g = _kron_gram(in_shape)
    # the optimum: the nearest Kronecker sum of W (L_1 (x) L_2), mapped back
    l1, l2 = torch.linalg.cholesky(g1), torch.linalg.cholesky(g2)
    white = w @ torch.kron(l1, l2)
    s = torch.linalg.svdvals(kron_rearrange(white, out_shape, in_shape))
    want = math.sqrt(float((s[rank:] ** 2).sum()) / float((s**2).sum()))
    for n_iter in (0, 3):
        factors, err = whitened_nearest_kronecker(
            w, g, out_shape, in_shape, rank, damping=0.0, n_iter_max=n_iter,
            compare_data_free=False,
        )  # fmt: skip
        assert [tuple(f.shape) for f in factors] == [(rank, 2, 3), (rank, 3, 2)]
        assert err == pytest.approx(want, rel=1e-7, abs=1e-9)
        assert err == pytest.approx(output_error(w, kron_dense(factors), g), rel=1e-10)


def test_kronecker_fit_of_an_exact_kronecker_weight():
    a, b = torch.randn(1, 2, 3, dtype=F64), torch.randn(1, 4, 2, dtype=F64)
    w = kron_dense([a, b])
    g = _gram(6, n=4)  # singular: rank 4 of 6
    factors, err = whitened_nearest_kronecker(w, g, (2, 4), (3, 2), 1)
    assert err < 1e-9
    torch.testing.assert_close(kron_dense(factors), w, rtol=1e-9, atol=1e-9)
    # three factors (no ALS): still exact
    c = torch.randn(1, 2, 2, dtype=F64)
    w3 = kron_dense([a, b, c])
    factors, err = whitened_nearest_kronecker(w3, _gram(12, n=20), (2, 4, 2), (3, 2, 2), 1)
    assert err < 1e-7 and len(factors) == 3


def _als_reference(w, g_d, a, b, sweeps):
    """Exact block coordinate descent on tr(E G E^T): A given B, then B given A."""

    def obj_a(x):
        e = w - kron_dense([x, b])
        return ((e @ g_d) * e).sum()

    def obj_b(x):
        e = w - kron_dense([a, x])
        return ((e @ g_d) * e).sum()

    for _ in range(sweeps):
        a = _block_minimiser(obj_a, a)
        b = _block_minimiser(obj_b, b)
    return a, b


@pytest.mark.parametrize("rank", [1, 2])
def test_kronecker_als_sweeps_are_exact_half_steps(rank):
    out_shape, in_shape = (2, 3), (3, 2)
    w = torch.randn(6, 6, dtype=F64)
    g = _gram(6, n=9, seed=3)
    damping = 0.05
    kw = dict(damping=damping, compare_data_free=False, tol=0.0)
    init, _ = whitened_nearest_kronecker(w, g, out_shape, in_shape, rank, n_iter_max=0, **kw)
    g_d = damped(g, damping)
    for sweeps in (1, 2):
        got, err = whitened_nearest_kronecker(
            w, g, out_shape, in_shape, rank, n_iter_max=sweeps, **kw
        )
        a, b = _als_reference(w, g_d, *init, sweeps)
        torch.testing.assert_close(kron_dense(got), kron_dense([a, b]), rtol=1e-8, atol=1e-9)
        assert err == pytest.approx(output_error(w, kron_dense([a, b]), g), rel=1e-8)
    # the tolerance: with tol=1 the second sweep's gain (less than 100%) stops it
    two, _ = whitened_nearest_kronecker(w, g, out_shape, in_shape, rank, n_iter_max=2, **kw)
    kw["tol"] = 1.0
    stop, _ = whitened_nearest_kronecker(w, g, out_shape, in_shape, rank, n_iter_max=9, **kw)
    torch.testing.assert_close(kron_dense(stop), kron_dense(two), rtol=1e-12, atol=1e-12)
    kw["tol"] = 0.0
    three, _ = whitened_nearest_kronecker(w, g, out_shape, in_shape, rank, n_iter_max=3, **kw)
    assert (kron_dense(three) - kron_dense(two)).abs().max() > 1e-8


def test_kronecker_als_stopping_rule_replayed():
    # the objective after k sweeps (tol=0: the same first k sweeps for any cap), then the
    # sweep at which a tolerance stops: the first with (obj_prev - obj) < tol * obj_prev
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = _gram(6, n=7, seed=4)
    g_d = damped(g, DEFAULT_DAMPING)
    kw = dict(compare_data_free=False)
    args = (w, g, (2, 3), (3, 2), 2)
    objs = []
    for k in range(13):
        fs, _ = whitened_nearest_kronecker(*args, n_iter_max=k, tol=0.0, **kw)
        objs.append(_obj(w, kron_dense(fs), g_d))
    gains = [(objs[k - 1] - objs[k]) / objs[k - 1] for k in range(2, 13)]  # sweeps 2..12
    stops = [s for s in range(3, 13) if gains[s - 2] < 0.9 * min(gains[: s - 2])]
    assert stops
    for stop in stops[:3]:
        tol = math.sqrt(max(gains[stop - 2], 1e-300) * min(gains[: stop - 2]))
        fs, _ = whitened_nearest_kronecker(*args, n_iter_max=12, tol=tol, **kw)
        assert _obj(w, kron_dense(fs), g_d) == pytest.approx(objs[stop], rel=1e-12)


def test_kronecker_keeps_the_better_of_whitened_and_data_free():
    out_shape, in_shape = (2, 3), (3, 2)
    w = torch.randn(6, 6, dtype=F64)
    g = _gram(6, n=10, seed=5)
    damping = 0.02
    g_d = damped(g, damping)
    free = nearest_kronecker(w, out_shape, in_shape, 1)
    white, _ = whitened_nearest_kronecker(
        w, g, out_shape, in_shape, 1, damping=damping, n_iter_max=0, compare_data_free=False
    )
    best, _ = whitened_nearest_kronecker(
        w, g, out_shape, in_shape, 1, damping=damping, n_iter_max=0
    )
    want = min(_obj(w, kron_dense(free), g_d), _obj(w, kron_dense(white), g_d))
    assert _obj(w, kron_dense(best), g_d) == pytest.approx(want, rel=1e-10)
    # with the identity Gram the data-free fit is the optimum: picked
    eye = torch.eye(6, dtype=F64)
    best, _ = whitened_nearest_kronecker(w, eye, out_shape, in_shape, 1, n_iter_max=0)
    torch.testing.assert_close(kron_dense(best), kron_dense(free), rtol=1e-10, atol=1e-10)
    # defaults: 10 sweeps, tol 1e-4, the comparison on
    dflt, _ = whitened_nearest_kronecker(w, g, out_shape, in_shape)
    expl, _ = whitened_nearest_kronecker(
        w, g, out_shape, in_shape, 1, damping=DEFAULT_DAMPING, n_iter_max=10, tol=1e-4,
        compare_data_free=True,
    )  # fmt: skip
    assert all(torch.equal(p, q) for p, q in zip(dflt, expl, strict=True))


@pytest.mark.parametrize("case", [(2, 1), (0, 2)])
def test_kronecker_data_free_start_and_defaults(case):
    # Grams far from a Kronecker product, where the data-free fit is the better start and
    # the ALS is still improving after 10 sweeps
    seed, rank = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 6, generator=gen, dtype=F64)
    if seed == 0:
        g = torch.diag(torch.rand(6, generator=gen, dtype=F64) ** 6)
    else:
        v = torch.randn(6, 1, generator=gen, dtype=F64)
        g = v @ v.T + 1e-3 * torch.eye(6, dtype=F64)
    g_d = damped(g, DEFAULT_DAMPING)
    args = (w, g, (2, 3), (3, 2), rank)
    free = nearest_kronecker(w, (2, 3), (3, 2), rank)
    white, _ = whitened_nearest_kronecker(*args, n_iter_max=0, compare_data_free=False)
    assert _obj(w, kron_dense(free), g_d) < _obj(w, kron_dense(white), g_d)
    start, _ = whitened_nearest_kronecker(*args, n_iter_max=0)
    torch.testing.assert_close(kron_dense(start), kron_dense(free), rtol=1e-12, atol=1e-12)
    dflt, err = whitened_nearest_kronecker(*args)
    expl, err2 = whitened_nearest_kronecker(
        *args, damping=DEFAULT_DAMPING, n_iter_max=10, tol=1e-4, compare_data_free=True
    )
    assert err == err2 and all(torch.equal(p, q) for p, q in zip(dflt, expl, strict=True))
    for other in (dict(n_iter_max=11), dict(compare_data_free=False)):
        alt, _ = whitened_nearest_kronecker(*args, **other)
        assert not torch.equal(kron_dense(alt), kron_dense(dflt)), other


def test_spd_solve_solves_each_row():
    h = _gram(5)
    rhs = torch.randn(3, 5, dtype=F64)
    torch.testing.assert_close(_spd_solve(h, rhs) @ h, rhs, rtol=1e-9, atol=1e-9)
    # singular H: a least-squares solution on its range
    v = torch.randn(5, 2, dtype=F64)
    h = v @ v.T
    rhs = torch.randn(3, 2, dtype=F64) @ v.T
    x = _spd_solve(h, rhs)
    torch.testing.assert_close(x @ h, rhs, rtol=1e-5, atol=1e-5)
    # indefinite beyond the ridge: the pseudo-inverse
    h = torch.tensor([[1.0, 1.0 + 1e-6], [1.0 + 1e-6, 1.0]], dtype=F64)
    rhs = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(_spd_solve(h, rhs), rhs @ torch.linalg.pinv(h, hermitian=True))


# --------------------------------------------------------------------------- CP


CP_OUT, CP_IN = (2, 3), (3, 2)


def _cp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 6, generator=g, dtype=F64)
    return w, _gram(6, n=9, seed=seed + 1)


def _cp_approx(fs, n_out=2):
    return khatri_rao(fs[:n_out]) @ khatri_rao(fs[n_out:]).T


def _cp_start(w, rank, **kw):
    t = w.reshape(*CP_OUT, *CP_IN)
    return [f.to(F64) for f in cp_als(t, rank, **kw).factors]


def _bcd_reference(w, g_d, fs, order):
    """Exact minimisation over each factor in ``order`` (the others fixed)."""
    fs = list(fs)
    for k in order:

        def f(x, k=k):
            trial = list(fs)
            trial[k] = x
            e = w - _cp_approx(trial)
            return ((e @ g_d) * e).sum()

        fs[k] = _block_minimiser(f, fs[k])
    return fs


def test_cp_start_is_the_data_free_als():
    w, g = _cp_problem()
    fs, err = whitened_cp(w, g, CP_OUT, CP_IN, 2, refine_iter=0)
    start = _cp_start(w, 2)
    torch.testing.assert_close(_cp_approx(fs), _cp_approx(start), rtol=1e-10, atol=1e-10)
    assert err == pytest.approx(output_error(w, _cp_approx(start), g), rel=1e-10)
    # balanced, in the weight's dtype
    norms = torch.stack([f.norm(dim=0) for f in fs])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-10, atol=0)
    f32, _ = whitened_cp(w.float(), g, CP_OUT, CP_IN, 2, refine_iter=0)
    assert all(f.dtype == torch.float32 for f in f32)
    # a warm start (of lower rank) and the ALS options reach cp_als
    init = [f[:, :1] for f in start]
    fs, _ = whitened_cp(w, g, CP_OUT, CP_IN, 2, refine_iter=0, init=init, n_iter_max=3, tol=0.0)
    want = _cp_start(w, 2, init=init, n_iter_max=3, tol=0.0)
    torch.testing.assert_close(_cp_approx(fs), _cp_approx(want), rtol=1e-10, atol=1e-10)


def test_cp_refinement_output_factors_are_exact_updates():
    w, g = _cp_problem(1)
    damping = 0.03
    g_d = damped(g, damping)
    start = _cp_start(w, 2, n_iter_max=2)
    fs, err = whitened_cp(
        w, g, CP_OUT, CP_IN, 2, damping=damping, n_iter_max=2, refine_iter=1, pcg_iter=0
    )
    want = _bcd_reference(w, g_d, start, [0, 1])
    torch.testing.assert_close(_cp_approx(fs), _cp_approx(want), rtol=1e-8, atol=1e-9)
    assert err == pytest.approx(output_error(w, _cp_approx(want), g), rel=1e-8)


def test_cp_refinement_with_converged_cg_is_block_coordinate_descent():
    w, g = _cp_problem(2)
    damping = 0.03
    g_d = damped(g, damping)
    start = _cp_start(w, 2, n_iter_max=2)
    # CG on 3 * 2 = 6 unknowns is exact after 6 steps
    fs, _ = whitened_cp(
        w, g, CP_OUT, CP_IN, 2, damping=damping, n_iter_max=2, refine_iter=1, pcg_iter=12
    )
    want = _bcd_reference(w, g_d, start, [0, 1, 2, 3])
    torch.testing.assert_close(_cp_approx(fs), _cp_approx(want), rtol=1e-6, atol=1e-7)
    two, _ = whitened_cp(
        w, g, CP_OUT, CP_IN, 2, damping=damping, n_iter_max=2, refine_iter=2, pcg_iter=12
    )
    want = _bcd_reference(w, g_d, want, [0, 1, 2, 3])
    torch.testing.assert_close(_cp_approx(two), _cp_approx(want), rtol=1e-6, atol=1e-7)


def test_cp_refinement_never_increases_the_objective():
    w, g = _cp_problem(3)
    g_d = damped(g, DEFAULT_DAMPING)
    objs = []
    for sweeps in (0, 1, 2, 5):
        for pcg in (1, 3):
            fs, _ = whitened_cp(w, g, CP_OUT, CP_IN, 2, n_iter_max=2, refine_iter=sweeps,
                                pcg_iter=pcg)  # fmt: skip
            objs.append((sweeps, pcg, _obj(w, _cp_approx(fs), g_d)))
    base = objs[0][2]
    assert all(o <= base * (1 + 1e-12) for _, _, o in objs)
    by = {(s, p): o for s, p, o in objs}
    assert by[(1, 3)] < base and by[(5, 3)] <= by[(2, 3)] * (1 + 1e-12) <= by[(1, 3)] * (1 + 1e-9)
    # one PCG step differs from three
    assert by[(1, 1)] != pytest.approx(by[(1, 3)], rel=1e-9)


def test_cp_defaults():
    w, g = _cp_problem(4)
    dflt, e1 = whitened_cp(w, g, CP_OUT, CP_IN, 2)
    expl, e2 = whitened_cp(
        w, g, CP_OUT, CP_IN, 2, damping=1e-2, n_iter_max=100, tol=1e-5, whiten_iter=0,
        refine_iter=10, pcg_iter=3, init=None,
    )  # fmt: skip
    assert e1 == e2 and all(torch.equal(p, q) for p, q in zip(dflt, expl, strict=True))


def test_cp_whitened_als_candidate():
    w, g = _cp_problem(5)
    damping = 0.02
    g_d = damped(g, damping)
    start = _cp_start(w, 2, n_iter_max=3)
    grams = mode_grams(g, CP_IN)
    chols = [damped_cholesky(gq, damping) for gq in grams]
    t = w.reshape(*CP_OUT, *CP_IN)
    t = torch.einsum("abij,ik,jl->abkl", t, chols[0], chols[1])
    warm = start[:2] + [c.T @ f for f, c in zip(start[2:], chols, strict=True)]
    for sweeps in (1, 4):
        res = cp_als(t, 2, init=warm, n_iter_max=sweeps, tol=1e-5).factors
        white = res[:2] + [
            torch.linalg.solve_triangular(c.T, f, upper=True)
            for f, c in zip(res[2:], chols, strict=True)
        ]
        best = min((start, white), key=lambda fs: _obj(w, _cp_approx(fs), g_d))
        fs, err = whitened_cp(
            w, g, CP_OUT, CP_IN, 2, damping=damping, n_iter_max=3, whiten_iter=sweeps,
            refine_iter=0,
        )  # fmt: skip
        torch.testing.assert_close(_cp_approx(fs), _cp_approx(best), rtol=1e-8, atol=1e-9)
        assert err == pytest.approx(output_error(w, _cp_approx(best), g), rel=1e-8)


def test_cp_of_an_exact_cp_weight_and_a_kronecker_gram():
    fs = [torch.randn(d, 2, dtype=F64) for d in (*CP_OUT, *CP_IN)]
    w = _cp_approx(fs)
    (_, _), g = _kron_gram(CP_IN, seed=2)
    got, err = whitened_cp(w, g, CP_OUT, CP_IN, 2, damping=0.0, whiten_iter=2)
    assert err < 1e-6
    torch.testing.assert_close(_cp_approx(got), w, rtol=1e-6, atol=1e-6)
    bal = balance_cp_factors(got)
    for p, q in zip(got, bal, strict=True):
        torch.testing.assert_close(p, q)


# --------------------------------------------------------------------------- Tucker-2


def test_tucker2_is_the_reduced_rank_regression_for_its_input_factor():
    c_out, c_in, kh, kw = 4, 3, 2, 2
    k = torch.randn(c_out, c_in, kh, kw, dtype=F64)
    n = c_in * kh * kw
    g = _gram(n, n=n + 3, seed=7)
    damping = 0.05
    g_d = damped(g, damping)
    core, u_in, u_out, err = whitened_tucker2(k, g, (2, 3), damping=damping)
    assert core.shape == (3, 2, kh, kw) and u_in.shape == (3, 2) and u_out.shape == (4, 3)
    torch.testing.assert_close(u_out.T @ u_out, torch.eye(3, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(u_in.T @ u_in, torch.eye(2, dtype=F64), rtol=0, atol=1e-10)
    eye_k = torch.eye(kh * kw, dtype=F64)
    phi = torch.kron(u_in, eye_k)  # rows (i, s), columns (a, s)
    wm = k.reshape(c_out, n)

    def approx_of(c, uo):
        return uo @ c.reshape(uo.shape[1], -1) @ phi.T

    approx = approx_of(core, u_out)
    assert err == pytest.approx(output_error(wm, approx, g), rel=1e-10)

    # the core is optimal for the factors (zero gradient of the damped objective)
    c = core.clone().requires_grad_(True)
    e = wm - approx_of(c, u_out)
    (grad,) = torch.autograd.grad(((e @ g_d) * e).sum(), c)
    assert grad.abs().max() < 1e-9 * float(wm.abs().max()) * float(g_d.abs().max())
    # the output factor too: the optimum of rank R_out given U_in (reduced-rank regression)
    m = phi.T @ g_d @ phi
    x_star = torch.linalg.solve(m, (wm @ g_d @ phi).T).T
    chol = torch.linalg.cholesky(m)
    s = torch.linalg.svdvals(x_star @ chol)
    base = _obj(wm, torch.zeros_like(wm), g_d)
    want = base - float((s[:3] ** 2).sum())
    assert _obj(wm, approx, g_d) == pytest.approx(want, rel=1e-8, abs=1e-10)


def test_tucker2_never_worse_than_the_data_free_hooi():
    k = torch.randn(5, 4, 3, 3, dtype=F64)
    g = _gram(36, n=40, seed=8)
    g_d = damped(g, 0.01)
    wm = k.reshape(5, 36)
    core, u_in, u_out, err = whitened_tucker2(k, g, (2, 2))
    approx = u_out @ core.reshape(2, -1) @ torch.kron(u_in, torch.eye(9, dtype=F64)).T
    fc, fi, fo, _ = tucker2_decompose(k, (2, 2))
    free = torch.einsum("bahw,ob,ia->oihw", fc, fo, fi).reshape(5, 36)
    assert _obj(wm, approx, g_d) <= _obj(wm, free, g_d) * (1 + 1e-12)
    # exact Tucker kernel: recovered
    exact = torch.einsum("bahw,ob,ia->oihw", fc, fo, fi)
    core, u_in, u_out, err = whitened_tucker2(exact, g, (2, 2), n_iter_max=3)
    assert err < 1e-9
    f32 = whitened_tucker2(k.float(), g, (2, 2))
    assert all(t.dtype == torch.float32 for t in f32[:3])


def test_thin_svd_of_a_numerically_rank_deficient_matrix():
    # rank one in floating point: the Gram's other eigenvalues are rounding noise, some
    # clamped to zero; their singular vectors must come out zero, not noise / tiny
    for shape in ((7, 4), (4, 7)):
        m = torch.randn(shape[0], 1, dtype=F64) @ torch.randn(1, shape[1], dtype=F64)
        u, s, vh = thin_svd(m)
        assert torch.isfinite(u).all() and torch.isfinite(vh).all()
        torch.testing.assert_close(u * s @ vh, m, rtol=1e-10, atol=1e-10)
        derived = u if shape[0] > shape[1] else vh.T
        assert derived.abs().max() <= 1.0 + 1e-12
        assert torch.all(derived[:, s == 0] == 0)


def test_cp_defaults_on_a_slow_problem():
    # rank 4: the ALS start still improves after 100 sweeps, the refinement after 10
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 6, generator=gen, dtype=F64)
    g = _gram(6, n=9, seed=1)
    dflt, _ = whitened_cp(w, g, CP_OUT, CP_IN, 4)
    for other in (dict(n_iter_max=101), dict(refine_iter=11)):
        alt, _ = whitened_cp(w, g, CP_OUT, CP_IN, 4, **other)
        assert not torch.equal(_cp_approx(alt), _cp_approx(dflt)), other


def test_cp_refinement_stops_when_a_sweep_gains_little():
    # Replayed from the objective after k sweeps (refine_iter=k runs the same first k
    # sweeps): the refinement ends at the first sweep that gains less than 1e-4 relative
    # (or does not gain at all, then undone), and not before.
    w, g = _cp_problem(6)
    g_d = damped(g, DEFAULT_DAMPING)
    objs = []
    for k in range(25):
        fs, _ = whitened_cp(w, g, CP_OUT, CP_IN, 2, n_iter_max=3, refine_iter=k, pcg_iter=2)
        objs.append(_obj(w, _cp_approx(fs), g_d))
    stop = next(k for k in range(1, 24) if objs[k + 1] == objs[k])
    gains = [(objs[k - 1] - objs[k]) / objs[k] for k in range(1, stop + 1)]
    assert stop > 1 and all(x >= 1e-4 for x in gains[:-1])
    assert gains[-1] < 1e-4
    assert all(o == objs[stop] for o in objs[stop:])


def test_tucker2_keeps_the_better_input_subspace():
    c_out, c_in, kh, kw = 5, 4, 2, 2
    k = torch.randn(c_out, c_in, kh, kw, dtype=F64)
    n = c_in * kh * kw
    damping = 0.05
    for seed in range(3):
        g = _gram(n, n=n + 2, seed=10 + seed)
        g_d = damped(g, damping)
        wm = k.reshape(c_out, n)
        # step 1 by hand: HOOI of the whitened kernel, mapped back; and the data-free HOOI
        l_c, l_s = (damped_cholesky(m, damping) for m in mode_grams(g, (c_in, kh * kw)))
        white = torch.einsum("oik,ij,kl->ojl", k.reshape(c_out, c_in, -1), l_c, l_s)
        _, u_t, _, _ = tucker2_decompose(white.reshape(k.shape).contiguous(), (2, 3))
        u_white = torch.linalg.solve_triangular(l_c.T, u_t, upper=True)
        _, u_free, _, _ = tucker2_decompose(k, (2, 3))

        def best_obj(u_in, wm=wm, g_d=g_d):
            # the reduced-rank regression optimum for the subspace of u_in
            phi = torch.kron(torch.linalg.qr(u_in)[0].contiguous(), torch.eye(kh * kw, dtype=F64))
            m = phi.T @ g_d @ phi
            x_star = torch.linalg.solve(m, (wm @ g_d @ phi).T).T
            s = torch.linalg.svdvals(x_star @ torch.linalg.cholesky(m))
            return _obj(wm, torch.zeros_like(wm), g_d) - float((s[:3] ** 2).sum())

        core, u_in, u_out, _ = whitened_tucker2(k, g, (2, 3), damping=damping)
        approx = u_out @ core.reshape(3, -1) @ torch.kron(u_in, torch.eye(kh * kw, dtype=F64)).T
        want = min(best_obj(u_white), best_obj(u_free))
        assert _obj(wm, approx, g_d) == pytest.approx(want, rel=1e-9)


def test_tucker2_defaults():
    k = torch.randn(8, 7, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = _gram(63, n=70, seed=3)
    dflt = whitened_tucker2(k, g, (3, 3))
    expl = whitened_tucker2(k, g, (3, 3), damping=DEFAULT_DAMPING, n_iter_max=20)
    assert all(torch.equal(p, q) for p, q in zip(dflt[:3], expl[:3], strict=True))
    more = whitened_tucker2(k, g, (3, 3), n_iter_max=21)
    assert not torch.equal(more[0], dflt[0])
