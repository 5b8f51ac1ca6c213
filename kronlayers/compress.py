"""Model surgery: swap the dense layers of a trained model for compressed ones, in one line.

Example::

    model, report = kronlayers.compress(model, method="kronecker", ratio=0.1)
    print(report)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ._validation import check_rank
from .plan import Plan, PlanEntry, conv1d_as_linear, dense_kind, is_conv1d
from .registry import methods, registered_layers

if TYPE_CHECKING:
    from .calibration import CalibrationStats

__all__ = ["CompressionReport", "DenseRecord", "LayerRecord", "compress"]


@dataclass
class LayerRecord:
    """What :func:`compress` did with one layer.

    Attributes:
        name: fully qualified name of the layer (its first name when it is shared).
        kind: the original layer's class name (``"Linear"``, ``"Conv2d"``, ...).
        old_params: parameters of the original layer (weight and bias).
        new_params: parameters of the replacement (factors and bias); ``old_params`` when
            skipped.
        error: relative reconstruction error ``||W - W_new||_F / ||W||_F`` of the weight,
            ``None`` when skipped.
        skipped: ``True`` when the layer was left as it was.
        reason: why it was skipped (empty otherwise).
        new_kind: class name of the replacement (empty when skipped).
        config: the factorization chosen, the new layer's ``rank_label()``, e.g.
            ``"in_shape=(28, 28), out_shape=(25, 25), rank=2"``.
        aliases: further names of the same module object (shared modules).
        output_error: with ``calibration``, the relative error of the layer's outputs on the
            calibration data, ``||X Wᵀ - X Ŵᵀ||_F / ||X Wᵀ||_F``; ``None`` otherwise.
        note: how the layer was converted or chosen (calibration, ``method="auto"``).
    """

    name: str
    kind: str
    old_params: int
    new_params: int
    error: float | None = None
    skipped: bool = False
    reason: str = ""
    new_kind: str = ""
    config: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    output_error: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float:
        """``new_params / old_params`` (1.0 when skipped)."""
        return self.new_params / self.old_params if self.old_params else 1.0


@dataclass
class DenseRecord:
    """A module holding a parameter-heavy tensor (2-D or more) that :func:`compress` left
    dense, with the reason.

    Attributes:
        name: its (first) qualified name.
        kind: its class name.
        params: its direct parameters (each shared parameter counted at its first module).
        reason: why it stays dense.
        skipped: ``True`` when it is a skipped :class:`LayerRecord` of the report's table.
    """

    name: str
    kind: str
    params: int
    reason: str
    skipped: bool = False


class CompressionReport(list):
    """The list of :class:`LayerRecord` s returned by :func:`compress`, printable as a table.

    Attributes:
        plan: the :class:`~kronlayers.plan.Plan` of the converted layers (save it with
            ``report.plan.save(path)``; replay with ``compress(model, plan=...)``).
        left_dense: every module with a 2-D (or larger) parameter left dense, with the reason
            (:class:`DenseRecord`: skipped layers, embeddings, ``nn.MultiheadAttention``'s
            ``in_proj_weight``, layers the method has no replacement for, ...).
        model_params: parameters of the whole model before compression (each shared
            parameter once).
        method: the ``compress`` method (``None`` for a replayed plan).
    """

    plan: Plan | None = None
    left_dense: tuple[DenseRecord, ...] | list[DenseRecord] = ()
    model_params: int = 0
    method: str | None = None

    @property
    def coverage(self) -> float:
        """Fraction of the model's parameters (before compression) that were in converted
        layers; ``0.0`` when nothing was converted."""
        converted = sum(r.old_params for r in self.converted)
        return converted / self.model_params if self.model_params else 0.0

    def _coverage_lines(self) -> list[str]:
        if not self.model_params:
            return []
        converted = sum(r.old_params for r in self.converted)
        lines = []
        if not self and self.method is not None:
            lines.append(f"no layer of the model has a {self.method!r} replacement")
        listed = [d for d in self.left_dense if not d.skipped]
        in_skipped = sum(d.params for d in self.left_dense if d.skipped)
        in_listed = sum(d.params for d in listed)
        other = self.model_params - converted - in_skipped - in_listed
        lines.append(
            f"coverage: {self.coverage:.1%} of the model's {self.model_params:,} parameters "
            f"were in converted layers; left dense: {in_skipped:,} in skipped layers, "
            f"{in_listed:,} in the {len(listed)} modules below, {other:,} in other modules' "
            "vectors (biases, norms, ...)"
        )
        if listed:
            cells = [(d.name or "(root)", d.kind, f"{d.params:,}") for d in listed]
            widths = [max(len(c[k]) for c in cells) for k in range(3)]
            for (name, kind, params), d in zip(cells, listed, strict=True):
                lines.append(
                    f"  {name.ljust(widths[0])}  {kind.ljust(widths[1])}  "
                    f"{params.rjust(widths[2])}  {d.reason}"
                )
        return lines

    @property
    def converted(self) -> list[LayerRecord]:
        """Records of the layers that were replaced."""
        return [r for r in self if not r.skipped]

    @property
    def skipped(self) -> list[LayerRecord]:
        """Records of the layers that were left as they were."""
        return [r for r in self if r.skipped]

    @property
    def old_params(self) -> int:
        """Parameters of the selected layers before compression."""
        return sum(r.old_params for r in self)

    @property
    def new_params(self) -> int:
        """Parameters of the selected layers after compression (skipped ones unchanged)."""
        return sum(r.new_params for r in self)

    def __str__(self) -> str:
        header = ("layer", "kind", "new kind", "params", "new params", "ratio", "error", "config")
        rows = [header]
        for r in self:
            name = (r.name or "(root)") + (" (= " + ", ".join(r.aliases) + ")" if r.aliases else "")
            if r.skipped:
                rows.append((name, r.kind, "skipped", f"{r.old_params:,}", "", "", "", r.reason))
                continue
            error = f"{r.error:.3e}" if r.error is not None else ""
            if r.output_error is not None:  # calibrated: the output error on the data too
                error += f" (out {r.output_error:.3e})"
            params = (f"{r.old_params:,}", f"{r.new_params:,}", f"{r.ratio:.3f}")
            config = r.config + (f"  [{r.note}]" if r.note else "")
            rows.append((name, r.kind, r.new_kind, *params, error, config))
        # The last column (config or skip reason) is free text: not padded.
        widths = [max(len(row[c]) for row in rows) for c in range(len(header) - 1)]
        lines = [
            "  ".join(
                [*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]
            ).rstrip()
            for row in rows
        ]
        # Long skip reasons overflow the rule rather than stretching it.
        rule = "-" * max(
            len(line) for line, row in zip(lines, rows, strict=True) if row[2] != "skipped"
        )
        total = self.old_params
        summary = (
            f"{len(self.converted)} converted, {len(self.skipped)} skipped; selected layers: "
            f"{total:,} -> {self.new_params:,} params"
            + (f" ({self.new_params / total:.3f})" if total else "")
        )
        return "\n".join([lines[0], rule, *lines[1:], rule, summary, *self._coverage_lines()])


def _num_params(module: nn.Module) -> int:
    # Parameters of an uninitialized lazy module have no size yet: count them as 0.
    lazy = nn.parameter.UninitializedParameter
    return sum(p.numel() for p in module.parameters() if not isinstance(p, lazy))


def _check_ratio(ratio: float | None) -> float | None:
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in (0, 1) or None, got {type(ratio).__name__}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1) (compressed / dense params), got {ratio}")
    return float(ratio)


def compress(
    model: nn.Module,
    method: str = "kronecker",
    *,
    rank: int | float | tuple[int, ...] = 1,
    ratio: float | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    inplace: bool = True,
    calibration: Iterable[object] | CalibrationStats | None = None,
    budget: int | float | None = None,
    progress: bool = False,
    plan: Plan | None = None,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the dense layers of ``model`` by compressed layers built from their weights.

    ``method`` names a family of registered layers (:mod:`kronlayers.registry`):
    ``"kronecker"`` (:class:`~kronlayers.KroneckerLinear` for ``nn.Linear``), ``"cp"``
    (``CPLinear`` for ``nn.Linear``, ``CPConv2d`` for ``nn.Conv2d``), ``"tucker"``
    (``TuckerConv2d`` for ``nn.Conv2d``) and ``"lowrank"`` (``LowRankLinear``, ``U Vᵀ`` by
    truncated SVD); ``"auto"`` chooses per layer within a ``budget`` (below). Every module
    selected by ``filter_fn`` whose type a layer of that family replaces is swapped for the
    layer its ``from_dense`` builds from the trained weights (nearest Kronecker sum, CP by
    ALS, Tucker-2 by HOSVD/HOOI, truncated SVD; with ``calibration``, fitted to the outputs
    on data instead). Input and output sizes never change, so the rest of the model, the
    optimizer setup, checkpoints of other layers etc. are untouched. Forward hooks registered
    on a replaced layer are not carried over.

    **In place by default**: ``model`` itself is modified (its submodules are replaced) and
    returned; pass ``inplace=False`` to work on a ``copy.deepcopy`` and leave ``model`` as is.

    Rank: ``rank`` is passed to each layer's ``compress_config`` and means what the layer's
    own ``rank`` argument means: an int (number of Kronecker terms, CP rank, or both Tucker
    ranks), a float in ``(0, 1]`` (the fraction of the dense weights to keep; for
    ``kronecker`` every two-factor split is searched for the largest weight count within the
    fraction, for ``cp`` TensorLy's rule ``R = round(f * prod(dims) / sum(dims))`` applies,
    for ``tucker`` ``R_in / C_in = R_out / C_out`` is kept), or a tuple where the structure
    has several ranks (``tucker``: ``(R_in, R_out)``). ``ratio=f`` is the same as
    ``rank=f`` (kept for compatibility; it overrides ``rank``). Shapes are the layers'
    defaults (most balanced two-way tensorization for linear layers; kernels as they are).
    The bias is copied and left out of the budget.

    Skipped, and reported with the reason (the layer stays dense): layers that would not be
    smaller than the dense one (e.g. prime feature counts, whose only split ``(1, n)`` gives
    no compression), no configuration within the fraction, a weight tied to another module's
    parameter (replacing it would untie them), a weight on the meta device, uninitialized
    lazy modules, and subclasses of the dense types (they may override ``forward`` or be read
    directly by their parent, e.g. ``nn.MultiheadAttention.out_proj``). A module object
    reachable under several names is converted once and stays shared. ``requires_grad`` of
    the weight / bias and the training flag carry over to the new layer.

    Args:
        model: the model; if it is itself a selected layer, the returned model is the new
            layer.
        method: one of :func:`kronlayers.registry.methods` (``"kronecker"``, ``"cp"``,
            ``"tucker"``, ``"lowrank"``) or ``"auto"`` (with ``budget``).
        rank: an int, a float fraction in ``(0, 1]`` or a tuple, as described above.
        ratio: same as a float ``rank``, in ``(0, 1)``; ``None`` to use ``rank``.
        filter_fn: ``filter_fn(name, module) -> bool``, called once per candidate layer
            object with its (first) fully qualified name; only layers for which it returns
            ``True`` are converted or reported. ``None`` selects all. (The idea of torchao's
            ``quantize_`` filter, with the name first as this project's API specifies; note
            that torchao itself passes ``(module, fqn)``.)
        inplace: modify ``model`` (``True``, the default) or a ``copy.deepcopy`` of it.
        calibration: ``None`` (data-free: each layer minimises ``||W - Ŵ||_F``), or an
            iterable of model inputs (a tensor batch runs ``model(x)``, a tuple / list
            ``model(*x)``, a dict ``model(**x)``), or statistics already collected by
            :func:`kronlayers.calibration.collect_statistics`. The input Gram matrix of every
            selected layer is streamed over the batches and each layer is fitted to the error
            of its **outputs on that data**, ``||X Wᵀ - X Ŵᵀ||_F`` (see
            :mod:`kronlayers.calibration`); the report gives that relative output error.
        budget: with ``method="auto"`` only: the total weights of the selected layers after
            compression, a float fraction in ``(0, 1)`` of their dense weights or an int
            count. :func:`kronlayers.budget.plan_budget` chooses per layer the structure
            (low rank, Kronecker, CP; Tucker, CP for convolutions; or dense) and its size to
            minimise the sum of the layers' relative squared output errors within the budget,
            never a configuration with more weights or FLOPs than the dense layer; the
            report's ``note`` says what was chosen and why. Needs ``calibration`` (without
            it the weight errors are used).
        progress: show tqdm progress bars (calibration batches, layers).
        plan: a :class:`~kronlayers.plan.Plan` (``report.plan`` of an earlier call, or
            ``Plan.load(path)``) to replay instead of deciding: the layers it names are
            replaced by their recorded layers, built **uninitialised** with no decomposition,
            calibration or data (load the fine-tuned ``state_dict`` afterwards). Every entry is
            checked first; a name missing from ``model`` or a dense layer of another type or
            shape raises a ``ValueError`` naming the first layer that differs, and leaves
            ``model`` untouched. ``method`` and ``rank`` are ignored (the plan records each
            layer's); ``ratio``, ``filter_fn``, ``calibration`` and ``budget`` must not be
            given.

    Returns:
        ``(model, report)``: the (possibly new) model and a :class:`CompressionReport`, one
        :class:`LayerRecord` per selected layer (name, kind, old / new params, relative
        reconstruction error, skipped + reason). ``print(report)`` shows a table, the
        coverage (fraction of the model's parameters converted) and every parameter-heavy
        module left dense with the reason (``report.left_dense``); ``report.plan`` is the
        :class:`~kronlayers.plan.Plan` to save. Hugging Face ``Conv1D`` layers (GPT-2's,
        weight stored ``(in, out)``) are converted as the ``nn.Linear`` of weight
        ``weight.T``; with ``calibration`` they are converted data-free (noted).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if plan is not None:
        given = {"ratio": ratio, "filter_fn": filter_fn, "calibration": calibration}
        given["budget"] = budget
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise ValueError(f"compress(plan=...) replays a plan: {', '.join(extra)} must be None")
        from .plan import replay

        return replay(model, plan, inplace=inplace)
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a str, one of {(*methods(), 'auto')}, got "
            f"{type(method).__name__} {method!r}"
        )
    if method not in (*methods(), "auto"):
        raise ValueError(f"method must be one of {(*methods(), 'auto')}, got {method!r}")
    from .budget import check_budget
    from .calibration import Pending, convert_pending, prepare_statistics

    budget = check_budget(budget, method)
    # Each layer checks what its own rank means; here only the form (int, float or ints).
    parts = len(rank) if isinstance(rank, (tuple, list)) and len(rank) > 1 else 2
    rank = check_rank(rank, parts=parts)
    ratio = _check_ratio(ratio)
    if ratio is not None:
        rank = ratio
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable or None, got {type(filter_fn).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = tuple(
        dict.fromkeys(
            cls.dense_type
            for cls in registered_layers()
            if cls.method == method or method == "auto"
        )
    )

    # Every (parent, attribute) through which each module is reachable, and its names.
    names: dict[int, list[str]] = {}
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
        modules[id(module)] = module
        for child_name, child in module._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((module, child_name))
    # Which modules own each parameter directly, to detect weights tied across modules.
    owners: dict[int, set[int]] = {}
    for key, module in modules.items():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(key)

    report = CompressionReport()
    new_plan = Plan()
    entries = new_plan.layers
    replaced: dict[int, nn.Module] = {}
    pending: list[Pending] = []
    filtered: set[int] = set()
    for key, module in modules.items():
        # Hugging Face Conv1D (weight (in, out)) is converted as the nn.Linear of weight.T.
        conv1d = nn.Linear in targets and is_conv1d(module)
        if not (isinstance(module, targets) or conv1d):
            continue
        name, *aliases = names[key]
        if filter_fn is not None and not filter_fn(name, module):
            filtered.add(key)
            continue
        record = LayerRecord(
            name=name,
            kind=type(module).__name__,
            old_params=_num_params(module),
            new_params=_num_params(module),
            aliases=tuple(aliases),
        )
        report.append(record)
        reason = ""
        if isinstance(module, nn.modules.lazy.LazyModuleMixin):
            reason = "uninitialized lazy module (run one forward pass first)"
        elif type(module) not in targets and not conv1d:
            base = next(t for t in targets if isinstance(module, t))
            reason = (
                f"subclass of nn.{base.__name__} (may override forward or be read directly by "
                "its parent, e.g. nn.MultiheadAttention.out_proj)"
            )
        elif any(p is not None and owners[id(p)] != {key} for p in module._parameters.values()):
            reason = _tied_reason(module, key, owners, names)
        elif module.weight.is_meta:
            reason = "weight is on the meta device (no values to decompose)"
        if reason:
            record.skipped, record.reason = True, reason
            continue
        pending.append(Pending(key, name, conv1d_as_linear(module) if conv1d else module, record))

    # Calibration statistics (one pass of the dense model), then the conversions.
    # The hooks go on the modules of the model itself (for a Conv1D, not its Linear view).
    stats = prepare_statistics(
        model, calibration, {p.name: modules[p.key] for p in pending}, progress
    )
    for p, new, reason in convert_pending(
        pending, method, rank, stats=stats, budget=budget, progress=progress
    ):
        record = p.record
        record.note = "; ".join(p.notes)
        if new is None:
            record.skipped, record.reason = True, reason
            continue
        _carry_over(p.module, new)
        record.new_kind = type(new).__name__
        record.new_params = _num_params(new)
        record.error = new.reconstruction_error
        record.output_error = getattr(new, "output_error", None)
        record.config = new.rank_label()
        replaced[p.key] = new
        try:
            entries.append(PlanEntry.from_layer(p.name, modules[p.key], new, record.aliases))
        except ValueError as e:
            new_plan.problems[p.name] = str(e)

    report.method, report.plan = method, new_plan
    report.model_params = _model_params(model)
    report.left_dense = _left_dense(model, replaced, report, method=method, filtered=filtered)
    for key, new in replaced.items():
        for parent, child_name in slots.get(key, []):
            setattr(parent, child_name, new)
    if id(model) in replaced:
        model = replaced[id(model)]
    return model, report


def _carry_over(old: nn.Module, new: nn.Module) -> None:
    """Copy the training flag and the weight / bias ``requires_grad`` to the new layer."""
    new.train(old.training)
    if not old.weight.requires_grad:
        for name, p in new.named_parameters():
            if name != "bias":
                p.requires_grad_(False)
    if old.bias is not None and new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)


def _model_params(model: nn.Module) -> int:
    """Parameters of ``model``, each shared parameter once (lazy ones count 0)."""
    return _num_params(model)


def _tied_reason(
    module: nn.Module, key: int, owners: dict[int, set[int]], names: dict[int, list[str]]
) -> str:
    for pname, p in module._parameters.items():
        others = sorted(names[k][0] or "(root)" for k in owners.get(id(p), ()) if k != key)
        if p is not None and others:
            return f"{pname} is tied to {', '.join(others)} (replacing it would untie them)"
    return "a parameter is tied to another module (replacing it would untie them)"


def _dense_reason(module: nn.Module, method: str | None, filtered: bool) -> str:
    """Why ``compress`` leaves ``module`` (which holds a 2-D parameter) dense."""
    if filtered:
        return "not selected by filter_fn"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"nn.{type(module).__name__}: no factorized layer replaces embeddings"
    if isinstance(module, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention reads its in_proj_weight (q, k, v projections) directly in "
            "forward: no submodule to replace"
        )
    kind = dense_kind(module)
    if kind in ("Linear", "Conv1D", "Conv2d"):
        dense = nn.Conv2d if kind == "Conv2d" else nn.Linear
        have = [m for m in methods() if any(
            c.method == m and issubclass(dense, c.dense_type) for c in registered_layers()
        )]  # fmt: skip
        return f"no {method!r} layer for {kind} (methods with one: {', '.join(have)})"
    heavy = [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    return f"{', '.join(heavy)} held by {type(module).__name__}: no factorized layer for it"


def _left_dense(
    model: nn.Module,
    converted: dict[int, nn.Module],
    report: CompressionReport,
    *,
    method: str | None = None,
    filtered: set[int] | frozenset[int] = frozenset(),
    reason: str = "",
) -> list[DenseRecord]:
    """Every module of ``model`` (before the replacements) holding a 2-D (or larger)
    parameter that is not in ``converted``, with the reason it stays dense."""
    from .modules._base import FactorizedLayer

    lazy = nn.parameter.UninitializedParameter
    named = list(model.named_modules())
    owners: dict[int, list[str]] = {}
    for name, module in named:
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    records = {r.name: r for r in report}
    seen: set[int] = set()
    out: list[DenseRecord] = []
    for name, module in named:
        if id(module) in converted or isinstance(module, FactorizedLayer):
            continue
        direct = [
            (n, p)
            for n, p in module._parameters.items()
            if p is not None and not isinstance(p, lazy)
        ]
        if not any(p.dim() >= 2 for _, p in direct):
            continue
        params = sum(p.numel() for _, p in direct if id(p) not in seen)
        seen.update(id(p) for _, p in direct)
        record = records.get(name)
        if record is not None and record.skipped:
            out.append(DenseRecord(name, type(module).__name__, params, record.reason, True))
            continue
        why = reason or _dense_reason(module, method, id(module) in filtered)
        own = {f"{name}.{n}" if name else n for n, _ in direct}
        for n, p in direct:
            others = [o for o in owners[id(p)] if o not in own]
            if p.dim() >= 2 and others:
                why += f"; {n} tied to {', '.join(others)}"
        out.append(DenseRecord(name, type(module).__name__, params, why))
    return out
