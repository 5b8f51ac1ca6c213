"""Calibrated conversion, low rank, fast CP-ALS, the weight budget and distillation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kronlayers
from kronlayers import LowRankLinear, compress
from kronlayers.budget import layer_candidates
from kronlayers.calibration import CalibrationStats, FitEffort, collect_statistics
from kronlayers.decomposition.cp import cp_als, cp_max_rank, cp_to_tensor
from kronlayers.decomposition.whitening import (
    mode_grams,
    output_error,
    whitened_low_rank,
    whitened_svd,
)
from kronlayers.distill import distill

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: OpenMP spin-waits dominate on a shared machine with several threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a decaying, rotated spectrum and a mean (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0]
    scales = torch.logspace(0, -2.5, dim, dtype=F64)
    return (torch.randn(n, dim, generator=g, dtype=F64) * scales) @ basis.T + 0.3


# --------------------------------------------------------------------------- low rank


def test_whitened_low_rank_is_the_least_squares_optimum():
    torch.manual_seed(0)
    x = correlated(200, 12)
    w = torch.randn(9, 12, dtype=F64)
    gram = x.T @ x
    rank = 3
    b, a, err = whitened_low_rank(w, gram, rank, damping=0.0)
    w_hat = b @ a.T
    # Closed form by another route: X = Q R, ||X Wᵀ - X Ŵᵀ|| = ||R Wᵀ - R Ŵᵀ||, so R Ŵᵀ is
    # the rank-r truncation of R Wᵀ (Eckart–Young).
    _, r_fac = torch.linalg.qr(x)
    u, s, vh = torch.linalg.svd(r_fac @ w.T)
    best_t = torch.linalg.solve(r_fac, (u[:, :rank] * s[:rank]) @ vh[:rank])
    torch.testing.assert_close(w_hat, best_t.T, rtol=1e-8, atol=1e-8)

    def loss(m: torch.Tensor) -> float:
        return float((x @ w.T - x @ m.T).norm())

    assert err == pytest.approx(loss(w_hat) / float((x @ w.T).norm()), rel=1e-9)
    # Brute force: gradient descent on the factors from the optimum and random perturbations
    # of it never find anything lower.
    b_p = b.clone().requires_grad_(True)
    a_p = a.clone().requires_grad_(True)
    opt = torch.optim.SGD([b_p, a_p], lr=1e-4)
    for _ in range(50):
        opt.zero_grad()
        value = ((x @ w.T - x @ (b_p @ a_p.T).T) ** 2).sum()
        value.backward()
        opt.step()
    assert loss((b_p @ a_p.T).detach()) >= loss(w_hat) - 1e-9
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        db = 1e-3 * torch.randn(b.shape, generator=g, dtype=F64)
        da = 1e-3 * torch.randn(a.shape, generator=g, dtype=F64)
        assert loss((b + db) @ (a + da).T) >= loss(w_hat) - 1e-12
    # The whitened spectrum gives the error of every rank at once.
    svd = whitened_svd(w, gram, damping=0.0)
    errors = svd.output_errors()
    assert float(errors[rank]) == pytest.approx(err, rel=1e-8)
    assert float(errors[0]) == pytest.approx(1.0, rel=1e-9)
    assert float(errors[-1]) == pytest.approx(0.0, abs=1e-7)


def test_lowrank_layer_from_linear_is_the_truncated_svd():
    torch.manual_seed(0)
    lin = nn.Linear(20, 12, dtype=F64)
    layer = LowRankLinear.from_linear(lin, rank=4)
    u, s, vh = torch.linalg.svd(lin.weight.detach())
    torch.testing.assert_close(layer.weight, (u[:, :4] * s[:4]) @ vh[:4])
    assert layer.reconstruction_error == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-9)
    assert layer.num_weights() == 4 * 32 and layer.in_factor.shape == (20, 4)
    x = torch.randn(3, 20, dtype=F64)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, lin.bias))
    full = LowRankLinear.from_linear(lin, rank=12)
    assert full.reconstruction_error < 1e-12


def test_lowrank_compress_config_caps_the_rank():
    lin = nn.Linear(30, 20)
    assert LowRankLinear.compress_config(lin, 4) == {"rank": 4}
    # a fraction near 1 is capped where the weights stay below the dense count
    r = LowRankLinear.compress_config(lin, 0.99)["rank"]
    assert r * 50 < 600 and (r + 1) * 50 >= 600
    with pytest.raises(kronlayers.modules.NotCompressible, match="not fewer than the dense"):
        LowRankLinear.compress_config(lin, 12)
    with pytest.raises(ValueError, match="in_shape must be None"):
        LowRankLinear(30, 20, rank=2, in_shape=(5, 6))


def test_cp_rank_is_capped_for_a_float_rank():
    lin = nn.Linear(8, 6)  # (2, 3, 2, 4): at most 2 * 3 * 2 = 12 useful rank-one terms
    cfg = kronlayers.CPLinear.compress_config(lin, 0.9)
    assert cfg["rank"] <= cp_max_rank((2, 3, 2, 4)) == 12
    with pytest.raises(kronlayers.modules.NotCompressible):
        kronlayers.CPLinear.compress_config(lin, 13)


# --------------------------------------------------------------------------- statistics


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x, scale=1.0):
        return self.head(torch.relu(self.fc(x * scale)))


def test_streaming_gram_equals_the_full_one_and_batch_formats_agree():
    torch.manual_seed(0)
    model = TwoInputs()
    xs = [torch.randn(4, 3, 6) for _ in range(5)]
    full = torch.cat([x.reshape(-1, 6) for x in xs]).double()
    expected = full.T @ full
    for batches in (xs, [(x, 1.0) for x in xs], [{"x": x, "scale": 1.0} for x in xs]):
        stats = collect_statistics(model, batches)
        assert isinstance(stats, CalibrationStats) and stats.batches == 5
        torch.testing.assert_close(stats["fc"].gram, expected, rtol=1e-5, atol=1e-4)
        assert stats["fc"].count == 60
        assert stats["fc"].input_shape == (4, 3, 6)
        torch.testing.assert_close(stats["fc"].second_moment, expected / 60, rtol=1e-5, atol=1e-6)
        assert set(stats) == {"fc", "head"}
    # A generator (one pass) works too; the training flag is restored.
    model.train()
    stats = collect_statistics(model, (x for x in xs), modules=["fc"])
    assert set(stats) == {"fc"} and model.training


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": 1},
        {"padding": "same", "padding_mode": "reflect"},
        {"stride": 2, "dilation": 2, "padding": 2, "padding_mode": "circular"},
    ],
)
def test_conv_patch_gram_is_the_unfolded_gram(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, **kwargs)
    xs = [torch.randn(2, 3, 7, 6) for _ in range(3)]
    stats = collect_statistics(conv, xs)
    rows = []
    for x in xs:
        padded = F.pad(
            x,
            conv._reversed_padding_repeated_twice,
            mode=("constant" if conv.padding_mode == "zeros" else conv.padding_mode),
        )
        p = F.unfold(padded, 3, dilation=conv.dilation, stride=conv.stride)
        rows.append(p.transpose(1, 2).reshape(-1, 27))
    rows = torch.cat(rows).double()
    torch.testing.assert_close(stats[""].gram, rows.T @ rows, rtol=1e-5, atol=1e-4)
    assert stats[""].count == rows.shape[0]
    # The patch Gram is the conv's output objective: tr(W G Wᵀ) = ||conv(x) - bias||².
    w = conv.weight.detach().double().reshape(4, -1)
    energy = float(((w @ stats[""].gram) * w).sum())
    with torch.no_grad():
        out = sum(float(((conv(x) - conv.bias.view(1, -1, 1, 1)) ** 2).sum()) for x in xs)
    assert energy == pytest.approx(out, rel=1e-4)


def test_calibration_argument_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="calibration must be an iterable"):
        compress(model, "lowrank", rank=1, calibration=torch.randn(2, 4))
    with pytest.raises(ValueError, match="empty"):
        compress(model, "lowrank", rank=1, calibration=[])
    with pytest.raises(ValueError, match="budget is only used with method='auto'"):
        compress(model, "lowrank", rank=1, budget=0.5)
    with pytest.raises(ValueError, match="needs a budget"):
        compress(model, "auto")
    with pytest.raises(TypeError, match="budget must be"):
        compress(model, "auto", budget="half")
    with pytest.raises(ValueError, match=r"budget as a float must be in \(0, 1\)"):
        compress(model, "auto", budget=1.5)


def test_mode_grams_of_a_kronecker_gram():
    a = correlated(50, 3)
    b = correlated(50, 4, seed=1)
    ga, gb = a.T @ a, b.T @ b
    g1, g2 = mode_grams(torch.kron(ga, gb), (3, 4))
    torch.testing.assert_close(g1, ga * torch.trace(gb))
    torch.testing.assert_close(g2, gb * torch.trace(ga))


# --------------------------------------------------------------------------- every method


def _linear_error(layer: nn.Module, dense: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - dense(x)).norm() / (dense(x) - dense.bias).norm())


@pytest.mark.parametrize(
    ("method", "rank"), [("lowrank", 3), ("kronecker", 2), ("cp", 6), ("kronecker", 0.3)]
)
def test_calibrated_linear_error_is_below_data_free(method, rank):
    torch.manual_seed(0)
    x = correlated(300, 24)
    dense = nn.Linear(24, 15, dtype=F64)
    free, _ = compress(nn.Sequential(dense), method, rank=rank, inplace=False)
    cal, report = compress(
        nn.Sequential(dense), method, rank=rank, inplace=False, calibration=[x[:150], x[150:]]
    )
    e_free, e_cal = _linear_error(free[0], dense, x), _linear_error(cal[0], dense, x)
    assert e_cal <= e_free + 1e-9
    assert e_cal < 0.9 * e_free  # and clearly so on these inputs
    assert report[0].output_error == pytest.approx(e_cal, rel=1e-3)
    assert "out " in str(report)
    assert free[0].rank_label() == cal[0].rank_label()


@pytest.mark.parametrize(("method", "rank"), [("tucker", (2, 3)), ("cp", 4)])
def test_calibrated_conv_error_is_below_data_free(method, rank):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=F64)
    mix = torch.randn(4, 4, dtype=F64)
    xs = [torch.einsum("nchw,dc->ndhw", torch.randn(4, 4, 8, 8, dtype=F64), mix).cumsum(-1)]
    xs = [x + 0.5 for x in xs]
    free, _ = compress(nn.Sequential(conv), method, rank=rank, inplace=False)
    cal, report = compress(nn.Sequential(conv), method, rank=rank, inplace=False, calibration=xs)

    def err(m):
        with torch.no_grad():
            return float(sum((m(x) - conv(x)).norm() ** 2 for x in xs) ** 0.5)

    assert err(cal) <= err(free) * (1 + 1e-6)
    assert report[0].output_error is not None


def test_small_stack_converts_with_every_method_and_progress(capsys):
    torch.manual_seed(0)

    def stack():
        torch.manual_seed(0)
        layers = []
        for _ in range(3):
            layers += [nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)]
        return nn.Sequential(*layers)

    x = [torch.randn(8, 5, 32) for _ in range(3)]
    for method in ("lowrank", "kronecker", "cp"):
        model, report = compress(stack(), method, rank=0.2, calibration=x, progress=True)
        assert len(report.converted) == 6
        assert model(x[0]).shape == (8, 5, 32)
    model, report = compress(stack(), "auto", budget=0.2, calibration=x, progress=True)
    biases = sum(m.bias.numel() for m in stack() if isinstance(m, nn.Linear))
    dense_weights = sum(m.weight.numel() for m in stack() if isinstance(m, nn.Linear))
    assert report.new_params - biases <= 0.2 * dense_weights
    assert all("auto:" in r.note for r in report)


# --------------------------------------------------------------------------- CP-ALS


def test_fast_cp_matches_tensorly_on_exact_low_rank_tensors():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    g = torch.Generator().manual_seed(0)
    for shape, rank in (((5, 6, 7), 3), ((4, 5, 3, 6), 4)):
        factors = [torch.randn(d, rank, generator=g, dtype=F64) for d in shape]
        t = cp_to_tensor(factors)
        res = cp_als(t, rank, n_iter_max=300, tol=1e-12)
        with tl.backend_context("pytorch"):
            ref = parafac(t, rank, n_iter_max=300, init="svd", tol=1e-12)
        ref_err = float((t - tl.cp_to_tensor(ref)).norm() / t.norm())
        assert res.rel_error < 1e-6
        assert res.rel_error <= max(ref_err, 1e-8) * 10
        # a noisy one: same quality as TensorLy (within 1%)
        noisy = t + 0.05 * t.norm() / math.sqrt(t.numel()) * torch.randn(
            shape, generator=g, dtype=F64
        )
        res = cp_als(noisy, rank, n_iter_max=300, tol=1e-10)
        with tl.backend_context("pytorch"):
            ref = parafac(noisy, rank, n_iter_max=300, init="svd", tol=1e-10)
        ref_err = float((noisy - tl.cp_to_tensor(ref)).norm() / noisy.norm())
        assert res.rel_error <= ref_err * 1.01


def test_cp_als_warm_start_and_iteration_cap():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 7, 8, generator=g, dtype=F64)
    low = cp_als(t, 3, n_iter_max=30)
    warm = cp_als(t, 5, init=low.factors, n_iter_max=30)
    assert warm.rel_error < low.rel_error
    capped = cp_als(t, 5, n_iter_max=2, tol=0.0)
    assert capped.n_iter == 2 and not capped.converted if hasattr(capped, "converted") else True
    with pytest.raises(ValueError, match="init"):
        cp_als(t, 3, init=[torch.randn(6, 3)])


# --------------------------------------------------------------------------- budget


def _stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


@pytest.mark.parametrize("budget", [0.1, 0.3, 2_000])
def test_budget_is_never_exceeded_nor_the_dense_size(budget):
    x = [correlated(64, 48, seed=s).float() for s in range(2)]
    model = _stack()
    dense = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = sum(dense.values())
    limit = math.floor(budget * total) if isinstance(budget, float) else budget
    model, report = compress(model, "auto", budget=budget, calibration=x)
    used = 0
    for r in report:
        m = model.get_submodule(r.name)
        weights = m.weight.numel() if isinstance(m, nn.Linear) else m.num_weights()
        assert weights <= dense[r.name]
        if not isinstance(m, nn.Linear):
            assert weights < dense[r.name]
            assert m.flops((64, 48 if r.name == "0" else 64)) < m.dense_flops(
                (64, 48 if r.name == "0" else 64)
            )
        assert "auto:" in r.note and "est. output error" in r.note
        used += weights
    assert used <= limit
    assert used >= 0.8 * limit  # and it is spent
    assert model(x[0]).shape == (64, 10)


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError, match="below the smallest configuration"):
        compress(_stack(), "auto", budget=10, calibration=[torch.randn(8, 48)])


def test_candidates_never_exceed_dense_weights_or_flops():
    lin = nn.Linear(40, 30)
    cands = layer_candidates(lin, None, input_shape=(16, 40))
    assert {c.structure for c in cands} >= {"dense", "lowrank", "kronecker", "cp"}
    for c in cands:
        if c.structure != "dense":
            assert c.weights < 1200 and c.flops < 2 * 16 * 1200
    lowrank = sorted((c for c in cands if c.structure == "lowrank"), key=lambda c: c.weights)
    assert all(a.error >= b.error - 1e-12 for a, b in itertools.pairwise(lowrank))


# --------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_distill_reduces_the_loss(loss):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(32, 16) for _ in range(4)]
    student, _ = compress(teacher, "lowrank", rank=2, inplace=False)
    frozen = [p.clone() for p in teacher.parameters()]
    result = distill(student, teacher, batches, steps=100, lr=1e-2, loss=loss, progress=False)
    assert result.steps == 100 and len(result.losses) == 100
    assert result.last_loss < 0.85 * result.first_loss
    for p, q in zip(teacher.parameters(), frozen, strict=True):
        assert torch.equal(p, q)
    # a one-shot iterator ends early
    short = distill(student, teacher, iter(batches), steps=10, progress=False)
    assert short.steps == 4
    with pytest.raises(ValueError, match="loss must be one of"):
        distill(student, teacher, batches, steps=1, loss="l1")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        distill(student, teacher, batches, steps=0)


def test_output_error_helper():
    w = torch.randn(3, 4, dtype=F64)
    g = torch.eye(4, dtype=F64)
    assert output_error(w, w, g) == 0.0
    assert output_error(w, torch.zeros_like(w), g) == pytest.approx(1.0)


def test_fit_effort_is_shared_by_the_layers_of_a_model():
    small = [(nn.Linear(784, 625), kronlayers.CPLinear, {"rank": 92})]
    assert FitEffort.for_layers(small) == FitEffort(100, 10)
    big = [(nn.Linear(1536, 384), kronlayers.CPLinear, {"rank": 492})] * 12
    effort = FitEffort.for_layers(big)
    assert 10 <= effort.n_iter_max < 100 and 2 <= effort.refine_iter < 10
    assert FitEffort.for_layers(big * 4) == FitEffort(10, 2)  # the floors
    # only the CP converters take these keywords
    assert effort.options(LowRankLinear, calibrated=True) == {}
    assert set(effort.options(kronlayers.CPLinear, calibrated=True)) == {
        "n_iter_max",
        "refine_iter",
    }


def test_damping_follows_the_ledoit_wolf_shrinkage():
    lin = nn.Linear(64, 8)
    few = collect_statistics(lin, [correlated(20, 64).float()])[""]
    many = collect_statistics(lin, [correlated(4000, 64).float()])[""]
    assert few.shrinkage > 0.05 > many.shrinkage >= 0.0
    assert few.shrinkage > 10 * many.shrinkage
    assert few.damping(0.01) > 0.05 and many.damping(0.01) == pytest.approx(
        max(0.01, many.shrinkage / (1 - many.shrinkage))
    )
