r"""Calibration: fit compressed layers to the outputs of the dense ones on real inputs.

A data-free conversion minimises ``||W - Ŵ||_F``, which treats every input direction alike;
trained networks see very anisotropic inputs, so most of that effort goes to directions the
data never excites. Calibrated conversion minimises the error of each layer's **outputs on
calibration data** instead,

.. math::
    \|X W^T - X \hat W^T\|_F^2 = \operatorname{tr}\big((W - \hat W)\, G\, (W - \hat W)^T\big),
    \qquad G = X^T X / n,

which needs only the second-moment (Gram) matrix ``G`` of each layer's inputs. This module
streams those matrices with forward pre-hooks (:func:`collect_statistics`) and builds the
calibrated layers (:func:`calibrated_layer`); :func:`kronlayers.compress` does both when
given ``calibration=batches``.

Statistics (bounded memory, activations never stored):

- ``nn.Linear``: the ``(in, in)`` Gram of the inputs' rows (every leading dimension is a
  row: tokens, batch).
- ``nn.Conv2d``: the Gram of the **unfolded input patches**, ``(C_in kh kw)`` square, in
  ``F.unfold`` order (channel, then kernel row, then column), padding applied as the layer
  does (padding mode included), with the layer's stride and dilation: exactly the objective
  of the convolution's outputs. (The channel-only Gram would ignore the spatial
  correlations of the patches; the patch Gram is affordable for the small kernels
  compressed here.) Layers whose fan-in exceeds ``max_features`` (default 8192, a 512 MiB
  float64 Gram) get no statistics and are converted data-free (reported).

The Grams are accumulated in float64 from float32 (or float64) batch products, over the
**dense** model's inputs (one pass; each layer is fitted to the dense layer's outputs on its
dense inputs), in eval mode (dropout off), under ``torch.no_grad``. Modules fed the same
tensor in one forward (e.g. the query, key and value projections) share one product.

Per structure (:mod:`kronlayers.decomposition.whitening`): low rank by the closed-form
whitened SVD; Kronecker sums by a whitened nearest-Kronecker initialisation refined by exact
ALS on the full ``G``; CP by CP-ALS refined on the full ``G``; Tucker-2 by whitened HOOI
and an exact output-side solve. ``G`` is damped by ``λ mean(diag G)``, with ``λ`` the larger
of 0.01 and the Ledoit–Wolf shrinkage of the estimate (:attr:`InputStatistics.shrinkage`,
from the fourth moments also streamed): a layer that saw few rows (a pooler fed one token per
sequence) is fitted closer to its weights instead of over-fitting the directions those rows
happen to span.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .decomposition.whitening import DEFAULT_DAMPING, whitened_nearest_kronecker

__all__ = [
    "DEFAULT_MAX_FEATURES",
    "CalibrationStats",
    "InputStatistics",
    "calibrated_layer",
    "collect_statistics",
    "progress_bar",
    "register_calibrated_fit",
    "run_batch",
]

DEFAULT_MAX_FEATURES = 8192

_ROWS_PER_CHUNK = 65_536


@dataclass
class InputStatistics:
    """Streamed second moments of one layer's inputs.

    Attributes:
        gram: ``sum_rows x xᵀ``, float64, ``(n, n)`` with ``n = in_features`` (Linear) or
            ``C_in kh kw`` (Conv2d, unfolded patches).
        count: number of rows (tokens, patches) summed.
        input_shape: the shape of the last input seen (FLOP counts of candidates).
    """

    gram: torch.Tensor
    count: int = 0
    input_shape: tuple[int, ...] | None = None
    norm4: float = 0.0

    @property
    def second_moment(self) -> torch.Tensor:
        """``gram / count``: the Gram of the calibration inputs per row."""
        return self.gram / max(self.count, 1)

    @property
    def shrinkage(self) -> float:
        """Ledoit–Wolf shrinkage intensity ``α`` of the second-moment estimate towards
        ``mean(diag) I``: ``min(1, β / γ)`` with ``γ = ||S - μ I||_F^2`` and
        ``β = (sum_rows ||x||^4 / n - ||S||_F^2) / n`` (Ledoit & Wolf 2004). Small when the
        rows determine ``S`` well (1,000 MNIST images for 784 pixels: 0.009), large when they
        do not (50 rows for 384 features: 0.57)."""
        n = self.count
        if n < 2:
            return 1.0
        s = self.second_moment
        p = s.shape[0]
        mu = float(s.diagonal().mean())
        s2 = float((s * s).sum())
        gamma = s2 - 2 * mu * float(s.diagonal().sum()) + mu * mu * p
        beta = (self.norm4 / n - s2) / n
        if gamma <= 0:
            return 1.0
        return min(1.0, max(0.0, beta / gamma))

    def damping(self, minimum: float = 0.0) -> float:
        """The damping ``λ`` of the fits (``G + λ mean(diag G) I``): the Ledoit–Wolf shrinkage
        as a damping, ``α / (1 - α)``, or ``minimum`` if larger."""
        a = self.shrinkage
        return max(minimum, a / (1.0 - a) if a < 1.0 else 1e6)


class CalibrationStats(dict):
    """``{module name: InputStatistics}`` from :func:`collect_statistics`.

    Attributes:
        batches: number of batches run.
        skipped: ``{module name: reason}`` for observed layers without statistics.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches = 0
        self.skipped: dict[str, str] = {}


def run_batch(model: nn.Module, batch: object) -> object:
    """``model(batch)`` for a tensor, ``model(*batch)`` for a tuple or list,
    ``model(**batch)`` for a mapping."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def progress_bar(iterable: Iterable, *, enabled: bool, **kwargs: Any) -> Iterable:
    """``tqdm(iterable, **kwargs)`` when ``enabled`` and tqdm is installed, else ``iterable``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an optional dependency
        warnings.warn("progress=True needs tqdm (pip install tqdm)", stacklevel=3)
        return iterable
    return tqdm(iterable, **kwargs)


def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    if not hasattr(module, "in_features"):  # Hugging Face Conv1D: weight (in, out)
        return module.weight.shape[0]
    return module.in_features


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows whose Gram is the layer's statistic: ``(rows, fan_in)``."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=0, stride=module.stride
        )  # (N, C kh kw, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _batch_gram(rows: torch.Tensor) -> torch.Tensor:
    work = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = None
    for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
        chunk = rows[start : start + _ROWS_PER_CHUNK].to(work)
        g = (chunk.T @ chunk).to(torch.float64)
        out = g if out is None else out + g
    if out is None:
        out = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    return out


def _default_targets(model: nn.Module) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d) and id(module) not in seen:
            seen.add(id(module))
            out[name] = module
    return out


def collect_statistics(
    model: nn.Module,
    batches: Iterable[object],
    *,
    modules: Mapping[str, nn.Module] | Iterable[str] | None = None,
    max_features: int = DEFAULT_MAX_FEATURES,
    max_batches: int | None = None,
    progress: bool = False,
) -> CalibrationStats:
    """Stream the input Gram matrices of ``model``'s layers over ``batches``.

    Runs ``model`` on every batch (:func:`run_batch`: a tensor is ``model(x)``, a tuple or
    list ``model(*x)``, a dict ``model(**x)``) in eval mode under ``torch.no_grad`` (the
    training flags are restored afterwards), with a forward pre-hook on each observed layer
    that adds the Gram of its input rows to a float64 accumulator (see the module docstring
    for what the rows are); activations are never stored.

    Args:
        model: the dense model.
        batches: an iterable of model inputs (a list, a ``DataLoader``, a generator).
        modules: the layers to observe, ``{name: module}`` or names; default: every
            ``nn.Linear`` and ``nn.Conv2d`` (exact types) by its first name.
        max_features: layers with a larger fan-in get no statistics (listed in
            ``stats.skipped``).
        max_batches: stop after this many batches (``None``: all).
        progress: show a tqdm bar over the batches.

    Returns:
        :class:`CalibrationStats`, ``{name: InputStatistics}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batches, (torch.Tensor, Mapping)) or not isinstance(batches, Iterable):
        raise TypeError(
            "calibration must be an iterable of model inputs (a list of batches, a DataLoader, "
            f"...), got {type(batches).__name__}"
        )
    if isinstance(max_features, bool) or not isinstance(max_features, int):
        raise TypeError(f"max_features must be an int, got {type(max_features).__name__}")
    if modules is None:
        targets = _default_targets(model)
    elif isinstance(modules, Mapping):
        targets = dict(modules)
    else:
        named = dict(model.named_modules())
        targets = {}
        for name in modules:
            if name not in named:
                raise ValueError(f"modules: no submodule named {name!r}")
            targets[name] = named[name]
    stats = CalibrationStats()
    cache: dict[tuple, torch.Tensor] = {}
    handles = []

    def make_hook(name: str, module: nn.Module) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            geometry: tuple = ()
            if isinstance(mod, nn.Conv2d):
                pad = tuple(mod._reversed_padding_repeated_twice)
                geometry = (mod.kernel_size, mod.stride, mod.dilation, pad, mod.padding_mode)
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype, geometry)
            cached = cache.get(key)
            if cached is None:
                rows = _rows(mod, x.detach())
                sq = (rows.to(torch.float64) ** 2).sum(1) if rows.numel() else rows.new_zeros(0)
                cached = cache[key] = (_batch_gram(rows), float((sq * sq).sum()), rows.shape[0])
            g, norm4, n = cached
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = InputStatistics(torch.zeros_like(g))
            entry.gram += g
            entry.count += n
            entry.norm4 += norm4
            entry.input_shape = tuple(x.shape)

        return hook

    for name, module in targets.items():
        fan_in = _fan_in(module)
        if fan_in > max_features:
            stats.skipped[name] = (
                f"fan-in {fan_in:,} > max_features={max_features:,}: no calibration statistics"
            )
            continue
        handles.append(module.register_forward_pre_hook(make_hook(name, module)))
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(
                progress_bar(batches, enabled=progress, desc="calibration", unit="batch")
            ):
                if max_batches is not None and i >= max_batches:
                    break
                run_batch(model, batch)
                cache.clear()
                stats.batches += 1
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    if stats.batches == 0:
        raise ValueError("calibration: the batches iterable was empty")
    return stats


# --------------------------------------------------------------------------- fitting

_FITTERS: dict[type, Callable[..., nn.Module]] = {}


def register_calibrated_fit(cls: type, fit: Callable[..., nn.Module]) -> None:
    """Register ``fit(module, *, input_gram, damping, **options) -> layer`` as the calibrated
    conversion of layer class ``cls`` (for layers whose ``from_dense`` does not take
    ``input_gram``)."""
    _FITTERS[cls] = fit


def _accepts_gram(cls: type) -> bool:
    name = "from_conv" if cls.dense_type is nn.Conv2d else "from_linear"
    fn = getattr(cls, name, None)
    if fn is None:
        return False
    return "input_gram" in inspect.signature(fn).parameters


def calibrated_layer(
    cls: type,
    module: nn.Module,
    input_gram: torch.Tensor,
    *,
    damping: float = DEFAULT_DAMPING,
    **options: Any,
) -> nn.Module:
    """``cls`` built from ``module`` to minimise the output error on data with Gram
    ``input_gram``: the layer's own ``from_dense(..., input_gram=...)`` or a registered fit
    (:func:`register_calibrated_fit`; ``KroneckerLinear`` is fitted here). ``options`` are
    the layer's ``from_dense`` keywords (shapes, ``rank``). The result has ``output_error``
    set to the relative output error on the calibration data."""
    fit = _FITTERS.get(cls)
    if fit is not None:
        return fit(module, input_gram=input_gram, damping=damping, **options)
    if _accepts_gram(cls):
        return cls.from_dense(module, input_gram=input_gram, damping=damping, **options)
    raise TypeError(f"{cls.__name__} has no calibrated conversion (register one)")


def fit_kronecker_linear(
    linear: nn.Linear,
    *,
    input_gram: torch.Tensor,
    damping: float = DEFAULT_DAMPING,
    in_shape: tuple[int, ...] | None = None,
    out_shape: tuple[int, ...] | None = None,
    rank: int | float = 1,
    n_iter_max: int = 2,
) -> nn.Module:
    """Calibrated ``KroneckerLinear``: the Kronecker sum minimising the output error on data
    with Gram ``input_gram``
    (:func:`kronlayers.decomposition.whitening.whitened_nearest_kronecker`: whitened by the
    Kronecker-factored Gram, then at most ``n_iter_max`` exact ALS sweeps on the full Gram
    for two factors). Sets ``reconstruction_error`` and ``output_error``.

    (Lives here rather than in ``KroneckerLinear.from_linear``, whose module belongs to
    another part of the package; a ``from_linear(..., input_gram=...)`` hook there would
    simply call this.)
    """
    from .modules.kronecker_linear import KroneckerLinear

    KroneckerLinear._check_dense(linear)
    w = linear.weight
    layer = KroneckerLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        in_shape=in_shape,
        out_shape=out_shape,
        rank=rank,
        device=w.device,
        dtype=w.dtype,
    )
    factors, err = whitened_nearest_kronecker(
        w.detach(),
        input_gram.to(w.device),
        layer.out_shape,
        layer.in_shape,
        layer.rank,
        damping=damping,
        n_iter_max=n_iter_max,
    )
    with torch.no_grad():
        for p, f in zip(layer.factors, factors, strict=True):
            p.copy_(f)
    layer._copy_bias_from(linear)
    layer._record_error(w)
    layer.output_error = err
    return layer


def _register_builtin() -> None:
    from .modules.kronecker_linear import KroneckerLinear

    register_calibrated_fit(KroneckerLinear, fit_kronecker_linear)


_register_builtin()


# --------------------------------------------------------------------------- compress glue


@dataclass
class Pending:
    """A layer :func:`kronlayers.compress` has selected and found convertible."""

    key: int
    name: str
    module: nn.Module
    record: Any  # compress.LayerRecord
    stats: InputStatistics | None = None
    choice: tuple[type, dict[str, Any], nn.Module | None] | None = None
    notes: list[str] = field(default_factory=list)


def prepare_statistics(
    model: nn.Module,
    calibration: object,
    targets: Mapping[str, nn.Module],
    progress: bool,
) -> CalibrationStats | None:
    """The statistics :func:`kronlayers.compress` uses: ``calibration`` itself if it is a
    :class:`CalibrationStats`, else :func:`collect_statistics` over it for ``targets``."""
    if calibration is None:
        return None
    if isinstance(calibration, CalibrationStats):
        return calibration
    return collect_statistics(model, calibration, modules=targets, progress=progress)


def convert_pending(
    pending: list[Pending],
    method: str,
    rank: object,
    *,
    stats: CalibrationStats | None,
    budget: int | float | None,
    progress: bool,
    damping: float = DEFAULT_DAMPING,
) -> Iterator[tuple[Pending, nn.Module | None, str]]:
    """Convert every pending layer: yields ``(pending, new layer or None, skip reason)``.

    ``method="auto"`` asks :func:`kronlayers.budget.plan_budget` for the structure and size of
    every layer first; otherwise each layer's ``compress_config`` decides. A layer with
    statistics is fitted by :func:`calibrated_layer`, one without by ``from_dense``.
    """
    from .modules._base import NotCompressible
    from .registry import layer_for

    if stats is not None:
        for p in pending:
            p.stats = stats.get(p.name)
            if p.stats is None and p.name in stats.skipped:
                p.notes.append(stats.skipped[p.name])
            elif p.stats is None:
                p.notes.append(
                    "no calibration statistics (not run by the batches, or converted through a "
                    "copy such as Conv1D's): data-free"
                )
    if method == "auto":
        from .budget import plan_budget

        plan_budget(pending, budget, damping=damping, progress=progress)
    # The configurations first (cheap), so that the iterative fits share one work budget.
    configs: dict[int, tuple[type, dict[str, Any]] | str] = {}
    for p in pending:
        if method == "auto":
            if p.choice is not None:
                configs[id(p)] = (p.choice[0], p.choice[1])
            continue
        cls = layer_for(method, p.module)
        try:
            configs[id(p)] = (cls, cls.compress_config(p.module, rank))
        except NotCompressible as e:
            configs[id(p)] = str(e)
    effort = FitEffort.for_layers(
        [(p.module, *c) for p in pending if isinstance(c := configs.get(id(p)), tuple)]
    )
    bar = progress_bar(pending, enabled=progress, desc=f"compress ({method})", unit="layer")
    for p in bar:
        if method == "auto":
            if p.choice is None:
                yield p, None, "; ".join(p.notes) or "kept dense by the budget"
                continue
            if p.choice[2] is not None:  # fitted by the planner with the same settings
                yield p, p.choice[2], ""
                continue
        config = configs[id(p)]
        if isinstance(config, str):
            yield p, None, config
            continue
        cls, options = config
        fit = effort.options(cls, calibrated=p.stats is not None)
        if p.stats is not None:
            new = calibrated_layer(
                cls, p.module, p.stats.second_moment, damping=p.stats.damping(damping),
                **options, **fit,
            )  # fmt: skip
        else:
            new = cls.from_dense(p.module, **options, **fit)
        yield p, new, ""


@dataclass
class FitEffort:
    """Sweep caps of the iterative (CP) fits of one :func:`kronlayers.compress` call.

    The conversion of a whole model is bounded by a work budget shared by its layers:
    ``ALS_WORK`` multiply-adds of CP-ALS (a sweep costs ``2 * weights * rank``) and
    ``REFINE_WORK`` of calibrated refinement (a sweep costs about
    ``2 * weights * rank + 4 * fan_in^2 * rank``), spread evenly in sweeps: every layer gets
    ``clamp(ALS_WORK / total, 10, 100)`` ALS sweeps and ``clamp(REFINE_WORK / total, 2, 10)``
    refinement sweeps. One MNIST-sized layer gets the full 100 / 10; the 37 Linear layers of a
    384-wide transformer (10.8 M weights) at 10% get 12 / 3, about 25 s on one loaded CPU
    core. (Measured: the refinement is what lowers the calibrated output error most; more ALS
    sweeps mostly help smaller models, where they are cheap.)
    """

    n_iter_max: int = 100
    refine_iter: int = 10

    ALS_WORK: ClassVar[float] = 1e11
    REFINE_WORK: ClassVar[float] = 1.5e11

    @classmethod
    def for_layers(cls, layers: list[tuple[nn.Module, type, dict[str, Any]]]) -> FitEffort:
        als = refine = 0.0
        for module, layer_cls, options in layers:
            rank = options.get("rank")
            params = _params_of(layer_cls) or {}
            if not isinstance(rank, int) or not {"n_iter_max", "refine_iter"} <= set(params):
                continue
            numel = module.weight.numel()
            fan_in = numel // module.weight.shape[0]
            als += 2.0 * numel * rank
            refine += 2.0 * numel * rank + 4.0 * fan_in * fan_in * rank
        n_iter = 100 if als == 0 else int(min(100, max(10, cls.ALS_WORK / als)))
        n_refine = 10 if refine == 0 else int(min(10, max(2, cls.REFINE_WORK / refine)))
        return cls(n_iter, n_refine)

    def options(self, layer_cls: type, calibrated: bool) -> dict[str, Any]:
        """The keywords of ``layer_cls``'s converter that this effort sets."""
        params = _params_of(layer_cls) or {}
        out: dict[str, Any] = {}
        if "n_iter_max" in params and "refine_iter" in params:  # the CP converters
            out["n_iter_max"] = self.n_iter_max
            if calibrated:
                out["refine_iter"] = self.refine_iter
        return out


def _params_of(layer_cls: type) -> Mapping[str, inspect.Parameter] | None:
    name = "from_conv" if layer_cls.dense_type is nn.Conv2d else "from_linear"
    fn = getattr(layer_cls, name, None)
    return None if fn is None else inspect.signature(fn).parameters
