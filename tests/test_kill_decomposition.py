"""The data-free decompositions (kronlayers.decomposition.cp / nearest_kronecker / tucker)
against closed forms: CP ranks and initialisations reproduced from their documented rules,
the stopping rule replayed from the error sequence, the normal-equation solve, the balanced
scales, Van Loan-Pitsianis's SVD optimum, and HOSVD / HOOI subspaces."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kronlayers import kron_dense
from kronlayers.decomposition import cp as cp_mod
from kronlayers.decomposition.cp import (
    balance_cp_factors,
    cp_als,
    cp_decompose,
    cp_max_rank,
    cp_rank_from_fraction,
    cp_to_tensor,
    mttkrp_within,
    solve_normal,
)
from kronlayers.decomposition.nearest_kronecker import kron_rearrange, nearest_kronecker
from kronlayers.decomposition.tucker import tucker2_decompose

F64 = torch.float64


# --------------------------------------------------------------------------- CP ranks


def test_cp_rank_rules():
    # R = round(fraction * prod / sum), at least 1
    assert cp_rank_from_fraction(0.5, (8, 9, 10)) == round(0.5 * 720 / 27)
    assert cp_rank_from_fraction(1.0, (4, 6)) == round(24 / 10)
    assert cp_rank_from_fraction(0.01, (2, 2)) == 1
    assert cp_rank_from_fraction(0.3, (10, 10)) == 2  # 1.5 rounds to even
    with pytest.raises(TypeError):
        cp_rank_from_fraction(1, (4, 6))
    with pytest.raises(TypeError):
        cp_rank_from_fraction(True, (4, 6))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            cp_rank_from_fraction(bad, (4, 6))
    assert cp_max_rank((4, 6)) == 4 and isinstance(cp_max_rank((4, 6)), int)
    assert cp_max_rank((3, 5, 7)) == 15
    assert cp_max_rank((1, 1)) == 1
    assert cp_max_rank((9,)) == 1


def test_cp_to_tensor_is_the_sum_of_outer_products():
    fs = [torch.randn(d, 3, dtype=F64) for d in (2, 3, 4)]
    want = sum(torch.einsum("i,j,k->ijk", *(f[:, r] for f in fs)) for r in range(3))
    torch.testing.assert_close(cp_to_tensor(fs), want)


def test_solve_normal():
    v = torch.randn(4, 6, dtype=F64)
    v = v @ v.T
    m = torch.randn(5, 4, dtype=F64)
    torch.testing.assert_close(solve_normal(m, v) @ v, m, rtol=1e-10, atol=1e-10)
    assert solve_normal(m.float(), v).dtype == torch.float32
    # singular: the pseudo-inverse's solution for a right-hand side in v's range
    u = torch.randn(4, 2, dtype=F64)
    v = u @ u.T
    m = torch.randn(5, 2, dtype=F64) @ u.T
    x = solve_normal(m, v)
    torch.testing.assert_close(x @ v, m, rtol=1e-5, atol=1e-5)
    # indefinite beyond the ridge (as rounding can make a Gram): the pseudo-inverse
    v = torch.tensor([[1.0, 1.0 + 1e-6], [1.0 + 1e-6, 1.0]], dtype=F64)
    m = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(solve_normal(m, v), m @ torch.linalg.pinv(v, hermitian=True))
    zero = solve_normal(torch.zeros(2, 3, dtype=F64), torch.zeros(3, 3, dtype=F64))
    assert torch.all(zero == 0)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_mttkrp_within(n):
    dims = (3, 5, 4)
    p = torch.randn(math.prod(dims), 2, dtype=F64)
    fs = [torch.randn(d, 2, dtype=F64) for d in dims]
    t = p.reshape(*dims, 2)
    specs = {0: "abcr,br,cr->ar", 1: "abcr,ar,cr->br", 2: "abcr,ar,br->cr"}
    others = [fs[j] for j in range(3) if j != n]
    torch.testing.assert_close(mttkrp_within(p, dims, fs, n), torch.einsum(specs[n], t, *others))


def test_balance_cp_factors():
    fs = [torch.randn(d, 3, dtype=F64) for d in (2, 3, 4)]
    fs[1][:, 2] *= 100.0
    fs[2][:, 0] *= -1e-3
    out = balance_cp_factors(fs)
    torch.testing.assert_close(cp_to_tensor(out), cp_to_tensor(fs))
    norms = torch.stack([f.norm(dim=0) for f in out])
    geo = torch.stack([f.norm(dim=0) for f in fs]).log().mean(0).exp()
    torch.testing.assert_close(norms, geo.expand_as(norms))
    for f, o in zip(fs, out, strict=True):
        assert torch.equal(torch.sign(f), torch.sign(o))
    # a zero column zeroes its whole term
    fs[0][:, 1] = 0.0
    out = balance_cp_factors([f.float() for f in fs])
    assert all(torch.all(o[:, 1] == 0) for o in out) and out[0].dtype == torch.float32
    assert torch.all(torch.stack([o[:, 0].norm() for o in out]) > 0)


# --------------------------------------------------------------------------- CP-ALS


def _tensor(shape=(4, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def test_svd_initialisation_is_the_hosvd():
    t = _tensor()
    rank = 5  # more than mode 0's size
    fs = cp_als(t, rank, n_iter_max=0).factors
    for n in (1, 2):
        d = t.shape[n]
        u = torch.linalg.svd(t.movedim(n, 0).reshape(d, -1))[0]
        k = min(rank, d)
        cols = fs[n][:, :k] / fs[n][:, :k].norm(dim=0)
        torch.testing.assert_close(cols.abs(), u[:, :k].abs(), rtol=1e-8, atol=1e-8)
    # mode 0 is drawn at random (it is updated first), reproducibly
    again = cp_als(t, rank, n_iter_max=0).factors
    assert all(torch.equal(p, q) for p, q in zip(fs, again, strict=True))


def test_svd_initialisation_pads_with_random_columns():
    t = _tensor((2, 3, 4))
    fs = cp_als(t, 4, n_iter_max=0, random_state=3).factors
    g = torch.Generator().manual_seed(3)
    extras = [torch.randn(d, 4, generator=g, dtype=F64) / math.sqrt(d) for d in (2, 3, 4)]
    # mode 1 (size 3 < rank 4): three singular vectors, then the random column
    want_dir = extras[1][:, 3] / extras[1][:, 3].norm()
    got_dir = fs[1][:, 3] / fs[1][:, 3].norm()
    torch.testing.assert_close(got_dir, want_dir)
    # mode 0: all random
    torch.testing.assert_close(fs[0] / fs[0].norm(dim=0), extras[0] / extras[0].norm(dim=0))
    # random columns of unit expected norm (randn / sqrt(d)); balancing keeps the product of
    # a term's column norms, here the two random ones times a unit singular vector
    prod_norms = fs[0][:, 3].norm() * fs[1][:, 3].norm() * fs[2][:, 3].norm()
    want = extras[0][:, 3].norm() * extras[1][:, 3].norm()
    torch.testing.assert_close(prod_norms, want)


def test_random_initialisation_is_reproducible():
    t = _tensor((3, 4, 5))
    for seed, state in ((0, None), (0, 0), (7, 7)):
        fs = cp_als(t, 2, init="random", n_iter_max=0, random_state=state).factors
        g = torch.Generator().manual_seed(seed)
        want = [torch.randn(d, 2, generator=g, dtype=F64) / math.sqrt(d) for d in (3, 4, 5)]
        for p, q in zip(fs, balance_cp_factors(want), strict=True):
            torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="init must be"):
        cp_als(t, 2, init="hosvd")


def test_warm_start_pads_with_small_random_columns():
    t = _tensor((3, 4, 5))
    init = [torch.randn(d, 1, dtype=F64) for d in (3, 4, 5)]
    res = cp_als(t, 3, init=init, n_iter_max=0, random_state=5)
    g = torch.Generator().manual_seed(5)
    want = []
    for f, d in zip(init, (3, 4, 5), strict=True):
        scale = float(f.norm(dim=0).mean())
        extra = torch.randn(d, 2, generator=g, dtype=F64) * (1e-2 * scale / math.sqrt(d))
        want.append(torch.cat([f, extra], dim=1))
    torch.testing.assert_close(cp_to_tensor(res.factors), cp_to_tensor(want))
    full = cp_als(t, 1, init=init, n_iter_max=0)
    torch.testing.assert_close(cp_to_tensor(full.factors), cp_to_tensor(init))
    with pytest.raises(ValueError, match="must hold 3 factors"):
        cp_als(t, 3, init=init[:2])
    with pytest.raises(ValueError, match=r"init\[1\] must have shape"):
        cp_als(t, 3, init=[init[0], torch.randn(5, 1), init[2]])
    with pytest.raises(ValueError, match=r"init\[0\] must have shape"):
        cp_als(t, 1, init=[torch.randn(3, 2), init[1], init[2]])
    with pytest.raises(TypeError, match="init must be a string or a list"):
        cp_als(t, 3, init=torch.randn(3, 3))


def test_exact_low_rank_tensor_is_recovered():
    fs = [torch.randn(d, 2, dtype=F64) for d in (4, 5, 6)]
    t = cp_to_tensor(fs)
    res = cp_als(t, 2, n_iter_max=200, tol=1e-12)
    assert res.rel_error < 1e-8 and res.converged and res.n_iter < 200
    torch.testing.assert_close(cp_to_tensor(res.factors), t, rtol=1e-7, atol=1e-7)
    err = float((cp_to_tensor(res.factors) - t).norm() / t.norm())
    assert res.rel_error == pytest.approx(err, abs=1e-14)
    facs, rel = cp_decompose(t, 2, n_iter_max=200, tol=1e-12)
    assert rel < 1e-8 and len(facs) == 3
    # an all-zero tensor: zero error, stops at once
    zero = cp_als(torch.zeros(3, 4, dtype=F64), 2)
    assert zero.rel_error == 0.0 and zero.n_iter == 1 and zero.converged


@pytest.mark.parametrize("exact", [True, False])
def test_stopping_rule_replayed_from_the_errors(monkeypatch, exact):
    # The error after k sweeps (no tolerance: the trajectory is the same for any cap),
    # then the sweep at which tol stops: the first with (e_prev - e) < tol * e_prev.
    if not exact:  # track the error from the MTTKRP (large problems) on a small one
        monkeypatch.setattr(cp_mod, "EXACT_ERROR_BELOW", 0)
    t = _tensor((4, 5, 6), seed=1)
    errs = [cp_als(t, 3, n_iter_max=k, tol=0.0).rel_error for k in range(1, 16)]
    capped = cp_als(t, 3, n_iter_max=15, tol=0.0)
    assert capped.n_iter == 15 and not capped.converged
    gains = [(a - b) / a for a, b in itertools.pairwise(errs)]
    # the sweeps (1-based) at which some tolerance stops: a gain below all earlier ones
    stops = [s for s in range(3, 16) if gains[s - 2] < 0.9 * min(gains[: s - 2])]
    assert len(stops) >= 2
    for stop in stops[:3]:
        lo, hi = gains[stop - 2], min(gains[: stop - 2])
        tol = math.sqrt(max(lo, 1e-300) * hi)
        res = cp_als(t, 3, n_iter_max=15, tol=tol)
        assert res.converged and res.n_iter == stop, (stop, gains)
        assert res.rel_error == pytest.approx(errs[stop - 1], rel=1e-10)


def test_float32_threshold(monkeypatch):
    t = _tensor((4, 5, 6), seed=2)
    ref64 = cp_als(t, 3, n_iter_max=5, tol=0.0)
    ref32 = cp_als(t.float(), 3, n_iter_max=5, tol=0.0)
    monkeypatch.setattr(cp_mod, "FLOAT32_ABOVE", 0)
    big64 = cp_als(t, 3, n_iter_max=5, tol=0.0)  # float64 input: float64 anyway
    assert all(torch.equal(p, q) for p, q in zip(ref64.factors, big64.factors, strict=True))
    big32 = cp_als(t.float(), 3, n_iter_max=5, tol=0.0)  # float32 GEMMs
    assert not all(torch.equal(p, q) for p, q in zip(ref32.factors, big32.factors, strict=True))
    assert big32.rel_error == pytest.approx(ref64.rel_error, rel=1e-4)
    monkeypatch.setattr(cp_mod, "FLOAT32_ABOVE", t.numel() * 3)  # at the threshold: float64
    at = cp_als(t.float(), 3, n_iter_max=5, tol=0.0)
    assert all(torch.equal(p, q) for p, q in zip(ref32.factors, at.factors, strict=True))


def test_two_way_and_four_way_tensors():
    for shape in ((5, 7), (2, 3, 2, 3)):
        fs = [torch.randn(d, 2, dtype=F64) for d in shape]
        t = cp_to_tensor(fs)
        res = cp_als(t, 2, n_iter_max=300, tol=1e-14)
        assert res.rel_error < 1e-6, shape


def test_cp_argument_checks():
    t = _tensor((3, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        cp_als(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="at least 2 dims"):
        cp_decompose(torch.zeros(3), 1)
    with pytest.raises(TypeError, match="floating-point"):
        cp_als(torch.zeros(3, 4, dtype=torch.int64), 1)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank"):
            cp_decompose(t, bad)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="rank"):
            cp_decompose(t, bad)
    with pytest.raises(TypeError, match="tol"):
        cp_als(t, 1, tol="1e-3")
    with pytest.raises(TypeError, match="tol"):
        cp_als(t, 1, tol=True)


# --------------------------------------------------------------------------- Kronecker


def test_kron_rearrange_turns_kronecker_products_into_outer_products():
    fs = [torch.randn(1, o, i, dtype=F64) for o, i in ((2, 3), (4, 2), (3, 3))]
    r = kron_rearrange(kron_dense(fs), (2, 4, 3), (3, 2, 3))
    want = torch.einsum("a,b,c->abc", *(f[0].reshape(-1) for f in fs))
    torch.testing.assert_close(r, want)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_nearest_kronecker_is_the_truncated_svd(rank):
    out_shape, in_shape = (2, 3), (4, 2)
    w = torch.randn(6, 8, dtype=torch.float32)
    fs = nearest_kronecker(w, out_shape, in_shape, rank)
    assert [tuple(f.shape) for f in fs] == [(rank, 2, 4), (rank, 3, 2)]
    assert all(f.dtype == torch.float32 and f.is_contiguous() for f in fs)
    s = torch.linalg.svdvals(kron_rearrange(w.to(F64), out_shape, in_shape))
    err2 = float(((w.to(F64) - kron_dense([f.to(F64) for f in fs])) ** 2).sum())
    assert err2 == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-5, abs=1e-5)
    # sqrt(sigma_r) on each side
    for f in fs:
        torch.testing.assert_close(
            f.to(F64).reshape(rank, -1).norm(dim=1), s[:rank].sqrt(), rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match=r"rank must be <= min\(out_1\*in_1, out_2\*in_2\) = 6"):
        nearest_kronecker(w, out_shape, in_shape, 7)
    assert len(nearest_kronecker(w, out_shape, in_shape, 6)) == 2


def test_nearest_kronecker_of_one_or_three_factors():
    w = torch.randn(3, 4, dtype=F64)
    (f,) = nearest_kronecker(w, (3,), (4,), 2)
    torch.testing.assert_close(f, torch.stack([w / 2, w / 2]))
    fs = [torch.randn(1, o, i, dtype=F64) for o, i in ((2, 3), (3, 2), (2, 2))]
    w3 = kron_dense(fs)
    got = nearest_kronecker(w3, (2, 3, 2), (3, 2, 2))
    torch.testing.assert_close(kron_dense(got), w3, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="same length"):
        nearest_kronecker(w3, (2, 3, 2), (6, 2))
    with pytest.raises(ValueError, match="2-D"):
        nearest_kronecker(w3[0], (3,), (4,))
    with pytest.raises(TypeError, match="floating-point"):
        nearest_kronecker(torch.zeros(6, 6, dtype=torch.int64), (2, 3), (3, 2))


# --------------------------------------------------------------------------- Tucker-2


def _tucker_approx(core, u_in, u_out):
    return torch.einsum("bahw,ob,ia->oihw", core, u_out, u_in)


def test_hosvd_and_hooi():
    k = torch.randn(6, 5, 3, 3, dtype=F64)
    core, u_in, u_out, err = tucker2_decompose(k, (2, 3), n_iter_max=0)
    assert core.shape == (3, 2, 3, 3) and u_in.shape == (5, 2) and u_out.shape == (6, 3)
    # HOSVD: the leading left singular vectors of each channel unfolding
    uo = torch.linalg.svd(k.reshape(6, -1))[0][:, :3]
    ui = torch.linalg.svd(k.transpose(0, 1).reshape(5, -1))[0][:, :2]
    torch.testing.assert_close(u_out.abs(), uo.abs(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(u_in.abs(), ui.abs(), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(core, torch.einsum("oihw,ob,ia->bahw", k, u_out, u_in))
    approx = _tucker_approx(core, u_in, u_out)
    assert err == pytest.approx(float((k - approx).norm() / k.norm()), rel=1e-10)
    # HOOI never increases the error; one sweep differs from none; tol stops it
    errs = [tucker2_decompose(k, (2, 3), n_iter_max=n, tol=0.0)[3] for n in range(4)]
    assert all(b <= a + 1e-14 for a, b in itertools.pairwise(errs))
    assert errs[1] < errs[0]
    one = tucker2_decompose(k, (2, 3), n_iter_max=1, tol=0.0)
    stop = tucker2_decompose(k, (2, 3), n_iter_max=5, tol=1.0)
    assert all(torch.equal(p, q) for p, q in zip(one[:3], stop[:3], strict=True))
    res = tucker2_decompose(k, (2, 3), n_iter_max=1)
    c, i, o, e = res
    assert e == pytest.approx(float((k - _tucker_approx(c, i, o)).norm() / k.norm()), rel=1e-9)
    # HOOI's factors: the leading subspace of W projected on the other factor
    proj = torch.einsum("oihw,ia->oahw", k, u_in).reshape(6, -1)
    torch.testing.assert_close(
        o.abs(), torch.linalg.svd(proj)[0][:, :3].abs(), rtol=1e-8, atol=1e-8
    )


def test_tucker_exact_zero_and_checks():
    u_in = torch.linalg.qr(torch.randn(5, 2, dtype=F64))[0]
    u_out = torch.linalg.qr(torch.randn(4, 3, dtype=F64))[0]
    k = _tucker_approx(torch.randn(3, 2, 2, 2, dtype=F64), u_in, u_out)
    core, ui, uo, err = tucker2_decompose(k.float(), (2, 3))
    assert err < 1e-6 and core.dtype == torch.float32
    torch.testing.assert_close(_tucker_approx(core, ui, uo), k.float(), rtol=1e-5, atol=1e-5)
    assert tucker2_decompose(torch.zeros(3, 3, 1, 1), (1, 1))[3] == 0.0
    with pytest.raises(ValueError, match="at most"):
        tucker2_decompose(k, (6, 1))
    with pytest.raises(ValueError, match="at most"):
        tucker2_decompose(k, (1, 5))
    with pytest.raises(ValueError, match="kernel must have shape"):
        tucker2_decompose(k[0], (1, 1))
    with pytest.raises(TypeError, match="floating-point"):
        tucker2_decompose(torch.zeros(2, 2, 1, 1, dtype=torch.int64), (1, 1))


def test_exact_error_threshold_is_inclusive(monkeypatch):
    # numel * rank up to EXACT_ERROR_BELOW (2e6): residual errors and the line search;
    # one more: the error from the MTTKRP, no line search (a different trajectory)
    assert cp_mod.EXACT_ERROR_BELOW == 2_000_000
    gen = torch.Generator().manual_seed(0)
    for cols, exact in ((666_667, False), (1_000_000, True)):
        # (the long mode first: the HOSVD initialisation skips it)
        t = torch.randn(cols, 3 if cols == 666_667 else 2, generator=gen, dtype=F64)
        assert (t.numel() <= 2_000_000) == exact
        got = cp_als(t, 1, n_iter_max=5, tol=0.0)
        monkeypatch.setattr(cp_mod, "EXACT_ERROR_BELOW", 10**12)
        forced = cp_als(t, 1, n_iter_max=5, tol=0.0)
        monkeypatch.undo()
        same = all(torch.equal(p, q) for p, q in zip(got.factors, forced.factors, strict=True))
        assert same == exact


def test_cp_defaults():
    # rank 8 of a random (4, 5, 6) tensor: still improving after 100 sweeps
    t = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    dflt = cp_als(t, 8)
    assert dflt.n_iter == 100 and not dflt.converged
    expl = cp_als(t, 8, init="svd", n_iter_max=100, tol=1e-5, random_state=0)
    assert all(torch.equal(p, q) for p, q in zip(dflt.factors, expl.factors, strict=True))
    facs, err = cp_decompose(t, 8)
    assert err == dflt.rel_error
    assert all(torch.equal(p, q) for p, q in zip(facs, dflt.factors, strict=True))
    # the random columns depend on the seed
    other = cp_als(t, 8, random_state=1)
    assert not torch.equal(other.factors[0], dflt.factors[0])


def test_tolerance_free_stop_is_on_the_relative_error():
    # an exact rank-2 tensor scaled by 1000: the relative error falls below 1e-12
    fs = [torch.randn(d, 2, dtype=F64) for d in (4, 5, 6)]
    res = cp_als(cp_to_tensor(fs) * 1000, 2, n_iter_max=500, tol=0.0)
    assert res.converged and res.n_iter < 500 and res.rel_error < 1e-11


def test_line_search_starts_at_the_fourth_sweep(monkeypatch):
    # (the fourth sweep's extrapolation is accepted for this tensor and rank)
    t = _tensor((4, 5, 6), seed=2)

    def runs():
        return [cp_als(t, 2, n_iter_max=k, tol=0.0).factors for k in range(1, 5)]

    exact = runs()
    monkeypatch.setattr(cp_mod, "EXACT_ERROR_BELOW", 0)  # no line search
    plain = runs()
    same = [
        all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        for a, b in zip(exact, plain, strict=True)
    ]
    assert same == [True, True, True, False]


def test_more_argument_checks():
    t = _tensor((3, 4))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        cp_als(t, 0)
    for bad in (5, {"a": 1}):
        with pytest.raises(TypeError, match="init must be a string or a list"):
            cp_als(t, 1, init=bad)
    fs = nearest_kronecker(torch.randn(6, 6, dtype=F64), (2, 3), (3, 2))
    assert [tuple(f.shape) for f in fs] == [(1, 2, 3), (1, 3, 2)]


def test_tucker_defaults_and_tolerance():
    # HOOI still improving (by ~2e-6) after 20 sweeps
    k = torch.randn(8, 7, 3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    dflt = tucker2_decompose(k, (3, 3))
    expl = tucker2_decompose(k, (3, 3), n_iter_max=20, tol=1e-8)
    assert all(torch.equal(p, q) for p, q in zip(dflt[:3], expl[:3], strict=True))
    more = tucker2_decompose(k, (3, 3), n_iter_max=21, tol=1e-8)
    assert not torch.equal(more[1], dflt[1])
    # the tolerance is on the improvement, not on the error itself
    errs = [tucker2_decompose(k, (3, 3), n_iter_max=n, tol=0.0)[3] for n in range(3)]
    gain = errs[0] - errs[1]
    assert gain < errs[1] / 2
    stop = tucker2_decompose(k, (3, 3), n_iter_max=10, tol=errs[1] / 2)
    one = tucker2_decompose(k, (3, 3), n_iter_max=1, tol=0.0)
    assert all(torch.equal(p, q) for p, q in zip(stop[:3], one[:3], strict=True))
