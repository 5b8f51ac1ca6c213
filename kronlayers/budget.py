r"""A whole-model weight budget: choose every layer's structure and size together.

``compress(model, method="auto", budget=0.1, calibration=batches)`` gives the selected layers
10% of their dense weights in total and lets this module decide how to spend them.

For every layer a few candidate configurations are evaluated on the calibration statistics
(:mod:`kronlayers.calibration`), each with its weight count and its relative output error
``e = ||X Wᵀ - X Ŵᵀ||_F / ||X Wᵀ||_F`` on the calibration data:

- ``nn.Linear``: low rank at **every** rank (the whitened SVD gives the whole
  error-versus-rank curve from one decomposition,
  :meth:`kronlayers.decomposition.whitening.WhitenedSVD.output_errors`), Kronecker sums at
  half, once and twice the budget's overall weight fraction, CP at that fraction;
- ``nn.Conv2d``: Tucker-2 at half, once and twice the fraction and CP at it;
- always the dense layer itself (error 0).

Candidates with at least the dense layer's weights or forward FLOPs (on the input shape seen
during calibration) are dropped. The allocation minimises ``sum_layers e_layer^2`` subject to
``sum_layers weights <= budget`` exactly on a grid of 4096 budget units (a multiple-choice
knapsack solved by dynamic programming; weights are rounded **up** to the grid, so the budget
is never exceeded). Without calibration statistics a layer's errors are weight errors
(``G = I``). Kronecker / CP / Tucker candidates are fitted exactly as
:func:`kronlayers.compress` fits them and the chosen one is reused, except large ones
(:data:`KRONECKER_FULL_FIT`, :data:`CP_FULL_FIT`), estimated by shorter fits and refitted if
chosen (their estimates lean towards low rank, whose curve is exact). The report's
``note`` says what was chosen, its estimated error, and the best alternative of each other
structure within the same weight count.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import FitEffort
from .decomposition.whitening import (
    DEFAULT_DAMPING,
    whitened_cp,
    whitened_nearest_kronecker,
    whitened_svd,
)
from .functional.cp_linear import cp_linear_flops
from .modules._base import NotCompressible

__all__ = ["Candidate", "check_budget", "layer_candidates", "plan_budget"]

#: Weight fractions at which Kronecker / CP / Tucker candidates are evaluated, as multiples
#: of the budget's overall fraction (a layer rarely gets far from it), capped to (0, 0.9].
KRONECKER_FRACTIONS = (0.5, 1.0, 2.0)
CP_FRACTIONS = (1.0,)
TUCKER_FRACTIONS = (0.5, 1.0, 2.0)
GRID = 4096
#: Kronecker candidates whose ALS Hessians have at most this many rows (``R * max(in_k)``)
#: and CP candidates with at most this many ``weights * rank`` are fitted exactly as
#: :func:`kronlayers.compress` fits them (and reused if chosen); larger ones are estimated
#: by a shorter fit (the whitened initialisation; 8 CP-ALS + 1 refinement sweep).
KRONECKER_FULL_FIT = 1024
CP_FULL_FIT = 150_000_000


@dataclass
class Candidate:
    """One configuration of one layer.

    Attributes:
        structure: ``"dense"``, ``"lowrank"``, ``"kronecker"``, ``"cp"`` or ``"tucker"``.
        cls: the layer class (``None`` for dense).
        options: its ``from_dense`` keywords.
        weights: weight count (bias excluded).
        flops: forward FLOPs on the calibration input shape.
        error: relative output error on the calibration data (an estimate where the fit
            was shortened).
        layer: the fitted layer when it was built with :func:`kronlayers.compress`'s own
            settings (then reused if chosen), else ``None``.
    """

    structure: str
    cls: type | None
    options: dict[str, Any]
    weights: int
    flops: int
    error: float
    label: str = ""
    layer: nn.Module | None = None


@dataclass
class _LayerPlan:
    candidates: list[Candidate] = field(default_factory=list)
    dense_weights: int = 0


def check_budget(budget: object, method: str) -> int | float | None:
    """``budget`` validated for ``method``: ``None`` unless ``method="auto"``, which needs a
    float in ``(0, 1)`` or an int ``>= 1``."""
    # The type first, whatever the method: budget="x" is a wrong type even where no budget
    # is used.
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)):
        raise TypeError(
            f"budget must be a float in (0, 1) or an int >= 1, got {type(budget).__name__} "
            f"{budget!r}"
        )
    if method != "auto":
        if budget is not None:
            raise ValueError(f"budget is only used with method='auto', got method={method!r}")
        return None
    if budget is None:
        raise ValueError("method='auto' needs a budget (a float fraction or an int weight count)")
    if not isinstance(budget, numbers.Integral):
        budget = float(budget)
        if not 0.0 < budget < 1.0:
            raise ValueError(f"budget as a float must be in (0, 1), got {budget}")
        return float(budget)
    if budget < 1:
        raise ValueError(f"budget as an int must be >= 1, got {budget}")
    return int(budget)


def _input_shape(module: nn.Module, stats: Any) -> tuple[int, ...]:
    if stats is not None and stats.input_shape is not None:
        return tuple(stats.input_shape)
    if isinstance(module, nn.Conv2d):
        return (1, module.in_channels, 32, 32)
    return (1, module.in_features)


def _meta(cls: type, module: nn.Module, options: dict[str, Any]) -> nn.Module:
    """The candidate layer on the meta device (sizes and FLOPs only, no memory)."""
    if isinstance(module, nn.Conv2d):
        return cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
            padding_mode=module.padding_mode, device="meta", **options,
        )  # fmt: skip
    return cls(
        module.in_features, module.out_features, bias=module.bias is not None, device="meta",
        **options,
    )  # fmt: skip


def _dense_flops(module: nn.Module, shape: Sequence[int]) -> int:
    if isinstance(module, nn.Conv2d):
        from ._shapes import conv2d_output_size

        batch = int(shape[0]) if len(shape) == 4 else 1
        pad = module._reversed_padding_repeated_twice
        h, w = conv2d_output_size(
            (int(shape[-2]), int(shape[-1])),
            module.kernel_size,
            module.stride,
            (pad[2], pad[3], pad[0], pad[1]),
            module.dilation,
        )
        return 2 * batch * module.weight.numel() * h * w
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return 2 * rows * module.weight.numel()


def _candidate(structure, cls, module, options, error, shape, layer=None) -> Candidate:
    meta = _meta(cls, module, options)
    return Candidate(
        structure, cls, dict(options), meta.num_weights(), meta.flops(shape), float(error),
        meta.rank_label(), layer,
    )  # fmt: skip


def layer_candidates(
    module: nn.Module,
    gram: torch.Tensor | None,
    *,
    input_shape: Sequence[int],
    damping: float = DEFAULT_DAMPING,
    structures: Sequence[str] | None = None,
    fraction: float = 0.1,
    effort: FitEffort | None = None,
) -> list[Candidate]:
    """Every candidate configuration of ``module`` with its estimated output error (see the
    module docstring); ``gram`` ``None`` means weight errors. Always includes dense.

    Low rank is evaluated at every rank; the other structures at the multiples
    :data:`KRONECKER_FRACTIONS`, :data:`CP_FRACTIONS`, :data:`TUCKER_FRACTIONS` of
    ``fraction`` (the budget's overall fraction). ``effort``: the sweep caps of the CP fits
    (default: the full :class:`kronlayers.calibration.FitEffort`)."""

    def fractions(multiples: Sequence[float]) -> list[float]:
        return sorted({min(0.9, max(1e-4, m * fraction)) for m in multiples})

    from .modules.cp_conv2d import CPConv2d
    from .modules.cp_linear import CPLinear
    from .modules.kronecker_linear import KroneckerLinear
    from .modules.lowrank_linear import LowRankLinear, max_useful_rank
    from .modules.tucker_conv2d import TuckerConv2d

    conv = isinstance(module, nn.Conv2d)
    if structures is None:
        structures = ("tucker", "cp") if conv else ("lowrank", "kronecker", "cp")
    w = module.weight.detach()
    w_mat = w.reshape(w.shape[0], -1).to(torch.float64)
    n_in = w_mat.shape[1]
    given_gram = gram
    if gram is None:
        gram = torch.eye(n_in, dtype=torch.float64, device=w.device)
    gram = gram.to(device=w.device, dtype=torch.float64)
    shape = tuple(input_shape)
    dense_w, dense_f = w.numel(), _dense_flops(module, shape)
    out = [Candidate("dense", None, {}, dense_w, dense_f, 0.0, "dense")]

    def add(c: Candidate) -> None:
        if c.weights < dense_w and c.flops < dense_f:
            out.append(c)

    if not conv and "lowrank" in structures:
        cap = max_useful_rank(module.in_features, module.out_features)
        if cap >= 1:
            svd = whitened_svd(w_mat, gram, damping)
            errors = svd.output_errors().tolist()
            n_in, n_out = module.in_features, module.out_features
            rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
            for r in range(1, cap + 1):
                # The counts of LowRankLinear (one-mode CP), without building each layer.
                flops = cp_linear_flops((n_in,), (n_out,), r, rows)
                c = Candidate("lowrank", LowRankLinear, {"rank": r}, r * (n_in + n_out), flops,
                              errors[r], f"rank={r}")  # fmt: skip
                add(c)
    have_gram = given_gram is not None

    def fitted(cls: type, cfg: dict[str, Any]) -> tuple[nn.Module, float]:
        # Built exactly as compress builds it, so that it is reused if chosen.
        from .calibration import calibrated_layer

        fit = (effort or FitEffort()).options(cls, calibrated=have_gram)
        if have_gram:
            layer = calibrated_layer(cls, module, gram, damping=damping, **cfg, **fit)
            return layer, float(layer.output_error)
        layer = cls.from_dense(module, **cfg, **fit)
        return layer, float(layer.reconstruction_error)

    if not conv and "kronecker" in structures:
        seen = set()
        for f in fractions(KRONECKER_FRACTIONS):
            try:
                cfg = KroneckerLinear.compress_config(module, f)
            except NotCompressible:
                continue
            key = (cfg["in_shape"], cfg["out_shape"], cfg["rank"])
            if key in seen:
                continue
            seen.add(key)
            if cfg["rank"] * max(cfg["in_shape"]) <= KRONECKER_FULL_FIT:
                layer, err = fitted(KroneckerLinear, cfg)
            else:  # large ALS Hessians: the whitened initialisation as the estimate
                layer = None
                _, err = whitened_nearest_kronecker(
                    w_mat, gram, cfg["out_shape"], cfg["in_shape"], cfg["rank"],
                    damping=damping, n_iter_max=0, compare_data_free=False,
                )  # fmt: skip
            add(_candidate("kronecker", KroneckerLinear, module, cfg, err, shape, layer=layer))
    if "cp" in structures:
        cls = CPConv2d if conv else CPLinear
        for f in fractions(CP_FRACTIONS):
            try:
                cfg = cls.compress_config(module, f)
            except NotCompressible:
                continue
            meta = _meta(cls, module, cfg)
            if meta.num_weights() >= dense_w or meta.flops(shape) >= dense_f:
                continue
            if dense_w * meta.rank <= CP_FULL_FIT:
                layer, err = fitted(cls, cfg)
            else:  # a short fit as the estimate (the final fit runs longer)
                layer = None
                in_modes = (*meta.in_shape, *meta.kernel_size) if conv else meta.in_shape
                _, err = whitened_cp(
                    w_mat, gram, meta.out_shape, in_modes, meta.rank, damping=damping,
                    n_iter_max=8, tol=1e-4, refine_iter=1, pcg_iter=2,
                )  # fmt: skip
            add(_candidate("cp", cls, module, cfg, err, shape, layer=layer))
    if conv and "tucker" in structures:
        seen = set()
        for f in fractions(TUCKER_FRACTIONS):
            try:
                cfg = TuckerConv2d.compress_config(module, f)
            except NotCompressible:
                continue
            if cfg["rank"] in seen:
                continue
            seen.add(cfg["rank"])
            layer, err = fitted(TuckerConv2d, cfg)
            add(_candidate("tucker", TuckerConv2d, module, cfg, err, shape, layer=layer))
    return out


def _effort_at(pending: Sequence[Any], fraction: float) -> FitEffort:
    """The fit effort of :func:`kronlayers.compress` if every layer were CP at ``fraction``."""
    from .modules.cp_conv2d import CPConv2d
    from .modules.cp_linear import CPLinear

    layers = []
    for p in pending:
        cls = CPConv2d if isinstance(p.module, nn.Conv2d) else CPLinear
        try:
            layers.append((p.module, cls, cls.compress_config(p.module, fraction)))
        except NotCompressible:
            continue
    return FitEffort.for_layers(layers)


def _allocate(plans: Sequence[_LayerPlan], budget: int) -> list[int] | None:
    """Indices of the chosen candidates minimising ``sum error^2`` with ``sum weights <=
    budget`` on a grid of :data:`GRID` units (weights rounded up); ``None`` if infeasible."""
    unit = budget / GRID
    best = torch.zeros(GRID + 1, dtype=torch.float64)
    choices = []
    costs = []
    for plan in plans:
        new = torch.full((GRID + 1,), math.inf, dtype=torch.float64)
        arg = torch.full((GRID + 1,), -1, dtype=torch.int64)
        cost_l = []
        for ci, c in enumerate(plan.candidates):
            k = math.ceil(c.weights / unit - 1e-9)
            cost_l.append(k)
            if k > GRID:
                continue
            val = best[: GRID + 1 - k] + c.error**2
            seg = new[k:]
            better = val < seg
            new[k:] = torch.where(better, val, seg)
            arg[k:] = torch.where(better, torch.full_like(arg[k:], ci), arg[k:])
        best = new
        choices.append(arg)
        costs.append(cost_l)
    if not math.isfinite(float(best[GRID])):
        return None
    picked = []
    b = GRID
    for arg, cost_l in zip(reversed(choices), reversed(costs), strict=True):
        ci = int(arg[b])
        picked.append(ci)
        b -= cost_l[ci]
    return picked[::-1]


def plan_budget(
    pending: Sequence[Any],
    budget: int | float,
    *,
    damping: float = DEFAULT_DAMPING,
    progress: bool = False,
    structures: Sequence[str] | None = None,
) -> None:
    """Choose every pending layer's configuration within ``budget`` (see the module
    docstring). Sets ``p.choice = (cls, options)`` (``None``: stays dense) and appends the
    explanation to ``p.notes``. ``budget``: a float fraction of the pending layers' dense
    weights or an int weight count. ``ValueError`` if even the smallest candidates exceed it.
    """
    from .calibration import progress_bar

    plans = []
    total = sum(p.module.weight.numel() for p in pending)
    if not pending:
        return
    limit = math.floor(budget * total) if isinstance(budget, float) else int(budget)
    fraction = min(0.9, max(limit / total, 1e-4))
    effort = _effort_at(pending, fraction)
    for p in progress_bar(list(pending), enabled=progress, desc="budget: candidates", unit="layer"):
        gram = p.stats.second_moment if p.stats is not None else None
        cands = layer_candidates(
            p.module,
            gram,
            input_shape=_input_shape(p.module, p.stats),
            damping=p.stats.damping(damping) if p.stats is not None else damping,
            structures=structures,
            fraction=fraction,
            effort=effort,
        )
        plans.append(_LayerPlan(cands, p.module.weight.numel()))
    picked = _allocate(plans, limit)
    if picked is None:
        smallest = sum(min(c.weights for c in pl.candidates) for pl in plans)
        raise ValueError(
            f"budget={budget!r} ({limit:,} weights) is below the smallest configuration of the "
            f"selected layers ({smallest:,} of {total:,} dense weights)"
        )
    spent = sum(pl.candidates[ci].weights for pl, ci in zip(plans, picked, strict=True))
    for p, pl, ci in zip(pending, plans, picked, strict=True):
        c = pl.candidates[ci]
        alternatives = []
        for s in dict.fromkeys(x.structure for x in pl.candidates):
            if s in (c.structure, "dense"):
                continue
            fits = [x for x in pl.candidates if x.structure == s and x.weights <= c.weights]
            if fits:
                alt = min(fits, key=lambda x: x.error)
                alternatives.append(f"{s} {alt.error:.3f} at {alt.weights:,}")
        why = (
            f"auto: {c.structure} {c.label} ({c.weights:,} of {pl.dense_weights:,} weights, "
            f"est. output error {c.error:.3f})"
        )
        if c.structure == "dense":
            why += " — kept dense: the error it saves is worth its weights in this budget"
        if alternatives:
            why += "; best alternatives within its weights: " + ", ".join(alternatives)
        why += f"; budget {limit:,} weights, {spent:,} allocated"
        p.notes.append(why)
        p.choice = None if c.cls is None else (c.cls, c.options, c.layer)
