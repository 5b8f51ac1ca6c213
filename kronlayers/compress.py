"""Model surgery: swap the dense layers of a trained model for compressed ones, in one line.

Example::

    model, report = kronlayers.compress(model, method="kronecker", ratio=0.1)
    print(report)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ._shapes import balanced_factorization, prod
from .decomposition.cp import cp_rank_from_fraction
from .modules.cp_conv2d import CPConv2d
from .modules.cp_linear import CPLinear
from .modules.kronecker_linear import KroneckerLinear

__all__ = ["CompressionReport", "LayerRecord", "compress"]

_METHODS = ("kronecker", "cp")


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
        config: the factorization chosen, e.g. ``"in (28, 28) out (16, 16) rank 2"``.
        aliases: further names of the same module object (shared modules).
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

    @property
    def ratio(self) -> float:
        """``new_params / old_params`` (1.0 when skipped)."""
        return self.new_params / self.old_params if self.old_params else 1.0


class CompressionReport(list):
    """The list of :class:`LayerRecord` s returned by :func:`compress`, printable as a table."""

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
            params = (f"{r.old_params:,}", f"{r.new_params:,}", f"{r.ratio:.3f}")
            rows.append((name, r.kind, r.new_kind, *params, error, r.config))
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
        return "\n".join([lines[0], rule, *lines[1:], rule, summary])


def _num_params(module: nn.Module) -> int:
    # Parameters of an uninitialized lazy module have no size yet: count them as 0.
    lazy = nn.parameter.UninitializedParameter
    return sum(p.numel() for p in module.parameters() if not isinstance(p, lazy))


def _kron_weights(in_shape: tuple, out_shape: tuple, rank: int) -> int:
    return rank * sum(o * i for o, i in zip(out_shape, in_shape, strict=True))


def _splits2(n: int) -> list[tuple[int, int]]:
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def _log_spread(shape: tuple[int, ...]) -> float:
    logs = [math.log(s) for s in shape]
    mean = sum(logs) / len(logs)
    return sum((v - mean) ** 2 for v in logs)


def _kronecker_config(linear: nn.Linear, rank: int, ratio: float | None) -> tuple:
    """``(in_shape, out_shape, rank)`` for a ``KroneckerLinear``, or ``(None, reason)``."""
    n_in, n_out = linear.in_features, linear.out_features
    dense = n_in * n_out
    if ratio is None:
        in_shape = balanced_factorization(n_in, 2)
        out_shape = balanced_factorization(n_out, 2)
        pairs = list(zip(out_shape, in_shape, strict=True))
        if any(o * i == 1 for o, i in pairs):
            return None, (
                f"no useful Kronecker split of in_features={n_in}, out_features={n_out} "
                f"(prime: only the trivial split in {in_shape} out {out_shape})"
            )
        max_rank = min(o * i for o, i in pairs)
        if rank > max_rank:
            return None, (
                f"rank {rank} exceeds the maximum {max_rank} for in {in_shape} out {out_shape}"
            )
        weights = _kron_weights(in_shape, out_shape, rank)
        if weights >= dense:
            return None, (
                f"rank {rank} with in {in_shape} out {out_shape} needs {weights:,} weights, "
                f"not fewer than the dense {dense:,}"
            )
        return in_shape, out_shape, rank
    budget = math.floor(ratio * dense)
    best_key, best = None, None
    for in_shape in _splits2(n_in):
        for out_shape in _splits2(n_out):
            sizes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
            if min(sizes) == 1:  # a 1x1 (scalar) factor: no structure, never smaller
                continue
            r = min(budget // sum(sizes), min(sizes))
            if r < 1:
                continue
            weights = r * sum(sizes)
            if weights >= dense:
                continue
            # Most weights within budget first, then the most balanced split (the default
            # shapes of KroneckerLinear), then the smaller rank; the rest is a fixed order.
            key = (-weights, _log_spread(in_shape) + _log_spread(out_shape), r, in_shape)
            if best_key is None or key < best_key:
                best_key, best = key, (in_shape, out_shape, r)
    if best is None:
        return None, (
            f"no Kronecker layer of in_features={n_in}, out_features={n_out} fits "
            f"ratio={ratio} ({budget:,} of {dense:,} weights)"
        )
    return best


def _convert(module: nn.Module, method: str, rank: int, ratio: float | None):
    """Return ``(new_module, config_string)`` or ``(None, reason)``."""
    if method == "kronecker":
        cfg = _kronecker_config(module, rank, ratio)
        if cfg[0] is None:
            return None, cfg[1]
        in_shape, out_shape, r = cfg
        new = KroneckerLinear.from_linear(module, in_shape=in_shape, out_shape=out_shape, rank=r)
        return new, f"in {in_shape} out {out_shape} rank {r}"
    return _convert_cp(module, rank, ratio)


def _convert_cp(module: nn.Module, rank: int, ratio: float | None):
    """CP conversion; the shapes and the rank are fixed here, before any decomposition runs."""
    if isinstance(module, nn.Linear):
        # CPLinear's defaults: the most balanced two-way split of each side.
        in_shape = balanced_factorization(module.in_features, 2)
        out_shape = balanced_factorization(module.out_features, 2)
        tensor_shape = (*out_shape, *in_shape)
        config = f"in {in_shape} out {out_shape}"
    else:
        if module.groups != 1:
            return None, f"grouped convolution (groups={module.groups}) is not CP-factorized"
        tensor_shape = (module.out_channels, module.in_channels, *module.kernel_size)
        config = f"kernel {tensor_shape}"
    r = rank if ratio is None else cp_rank_from_fraction(ratio, tensor_shape)
    weights, dense = r * sum(tensor_shape), prod(tensor_shape)
    if weights >= dense:
        return None, (
            f"CP rank {r} of {config} needs {weights:,} weights, not fewer than the dense {dense:,}"
        )
    if isinstance(module, nn.Linear):
        new = CPLinear.from_linear(module, rank=r, in_shape=in_shape, out_shape=out_shape)
    else:
        new = CPConv2d.from_conv(module, rank=r)
    return new, f"{config} rank {r}"


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
    rank: int = 1,
    ratio: float | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    inplace: bool = True,
) -> tuple[nn.Module, CompressionReport]:
    """Replace the dense layers of ``model`` by compressed layers built from their weights.

    Every ``nn.Linear`` (and, for ``method="cp"``, every ``nn.Conv2d``) selected by
    ``filter_fn`` is replaced by the layer that ``from_linear`` / ``from_conv`` builds from
    its trained weights: :class:`~kronlayers.KroneckerLinear` (Van Loan–Pitsianis nearest
    Kronecker sum, two factors), or ``CPLinear`` / ``CPConv2d``. Input and output sizes never
    change, so the rest of the model, the optimizer setup, checkpoints of other layers etc.
    are untouched. Forward hooks registered on a replaced layer are not carried over.

    Shapes: ``kronecker`` and ``CPLinear`` tensorize ``in`` and ``out`` into the most balanced
    two factors each (the layers' defaults, e.g. 784 -> (28, 28)); ``CPConv2d`` decomposes the
    ``(C_out, C_in, kh, kw)`` kernel as is (grouped convolutions are skipped).

    Rank selection:
        - ``ratio=None``: ``kronecker`` uses ``rank`` Kronecker terms; ``cp`` uses CP rank
          ``rank``.
        - ``ratio`` given (compressed / dense parameter fraction, in ``(0, 1)``; overrides
          ``rank``): ``kronecker`` searches every two-factor split ``in = i1*i2``,
          ``out = o1*o2`` (no 1x1 factor) and rank ``R <= min(o1*i1, o2*i2)`` and takes the
          one whose weight count ``R * (o1*i1 + o2*i2)`` is closest to, but not above,
          ``floor(ratio * in * out)``; ties go to the most balanced split (smallest spread
          of ``log`` factor sizes, i.e. the default shapes), then to the smaller rank.
          ``cp`` uses the float-rank rule of TensorLy (and of ``CPLinear(rank=0.1)``),
          ``R = max(1, round(ratio * prod(dims) / sum(dims)))`` over the dims of the
          tensorized weight, which can land slightly above the budget (rounding).
          Bias is left out of the budget (it is kept as is).

    Skipped, and reported with the reason (the layer stays dense): layers that would not be
    smaller than the dense one (e.g. prime feature counts, whose only split ``(1, n)`` gives
    no compression), no configuration within ``ratio``, a weight tied to another module's
    parameter (replacing it would untie them), a weight on the meta device, uninitialized
    lazy modules, and subclasses
    of ``nn.Linear`` / ``nn.Conv2d`` (they may override ``forward`` or be read directly by
    their parent, e.g. ``nn.MultiheadAttention.out_proj``). A module object reachable under
    several names is converted once and stays shared. ``requires_grad`` of the weight / bias
    and the training flag carry over to the new layer.

    Args:
        model: the model; if it is itself a selected layer, the returned model is the new
            layer.
        method: ``"kronecker"`` or ``"cp"``.
        rank: Kronecker / CP rank (``>= 1``) when ``ratio`` is ``None``.
        ratio: target ``compressed / dense`` parameter fraction per layer, or ``None``.
        filter_fn: ``filter_fn(name, module) -> bool``, called once per candidate layer
            object with its (first) fully qualified name; only layers for which it returns
            ``True`` are converted or reported. ``None`` selects all. (The idea of torchao's
            ``quantize_`` filter, with the name first as this project's API specifies; note
            that torchao itself passes ``(module, fqn)``.)
        inplace: modify ``model`` (``True``) or a ``copy.deepcopy`` of it (``False``).

    Returns:
        ``(model, report)``: the (possibly new) model and a :class:`CompressionReport`, one
        :class:`LayerRecord` per selected layer (name, kind, old / new params, relative
        reconstruction error, skipped + reason). ``print(report)`` shows a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    ratio = _check_ratio(ratio)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable or None, got {type(filter_fn).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    targets = (nn.Linear, nn.Conv2d) if method == "cp" else (nn.Linear,)

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
    replaced: dict[int, nn.Module] = {}
    for key, module in modules.items():
        if not isinstance(module, targets):
            continue
        name, *aliases = names[key]
        if filter_fn is not None and not filter_fn(name, module):
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
        elif type(module) not in targets:
            base = "nn.Linear" if isinstance(module, nn.Linear) else "nn.Conv2d"
            reason = (
                f"subclass of {base} (may override forward or be read directly by its "
                "parent, e.g. nn.MultiheadAttention.out_proj)"
            )
        elif any(p is not None and owners[id(p)] != {key} for p in module._parameters.values()):
            reason = "a parameter is tied to another module (replacing it would untie them)"
        elif module.weight.is_meta:
            reason = "weight is on the meta device (no values to decompose)"
        if not reason:
            new, info = _convert(module, method, rank, ratio)
            if new is None:
                reason = info
        if reason:
            record.skipped, record.reason = True, reason
            continue
        _carry_over(module, new)
        record.new_kind = type(new).__name__
        record.new_params = _num_params(new)
        record.error = getattr(new, "reconstruction_error", None)
        record.config = info
        replaced[key] = new

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
