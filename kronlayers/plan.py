"""Compression plans: what :func:`kronlayers.compress` decided, saved and replayed.

A :class:`Plan` lists, for every layer that ``compress`` replaced, its qualified name, the
dense layer it replaced (type and shapes), the class of the new layer and that class'
constructor arguments (shapes, ranks, bias, padding mode, ...), the method and the dtype. It
is a small JSON file. ``compress(model, plan=plan)`` replays it on a freshly built dense
model **without any decomposition**: each new layer is constructed on the ``meta`` device
from its recorded arguments and materialised uninitialised (``to_empty``) on the dense
weight's device, so that ``load_state_dict`` then restores the fine-tuned weights exactly.

Example::

    model, report = kronlayers.compress(build_model(), "kronecker", rank=0.1)
    ...  # fine-tune
    report.plan.save("plan.json")
    torch.save(model.state_dict(), "weights.pt")

    # later, in another process: no decomposition, no data
    model, _ = kronlayers.compress(build_model(), plan=Plan.load("plan.json"))
    model.load_state_dict(torch.load("weights.pt", weights_only=True))

The layer constructors are generic: the class is looked up by name in
:mod:`kronlayers.registry` and called as ``cls(**kwargs)``; the arguments are read, when the
plan is made, from the public attributes of the built layer named like the parameters of
its ``__init__`` (``in_features``, ``in_shape``, ``rank``, ``padding_mode``, ...; ``bias``
from the presence of the bias), and checked by building the layer again on ``meta`` and
comparing every parameter shape.

This module also holds the recognition of Hugging Face ``transformers``' ``Conv1D`` (a
linear layer whose weight is stored ``(in_features, out_features)``), without importing
``transformers``: :func:`is_conv1d`, :func:`conv1d_as_linear`.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .modules._base import FactorizedConv2d, FactorizedLayer, FactorizedLinear
from .registry import registered_layers

if TYPE_CHECKING:
    from .compress import CompressionReport

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "Plan",
    "PlanEntry",
    "constructor_kwargs",
    "conv1d_as_linear",
    "dense_geometry",
    "dense_kind",
    "is_conv1d",
]

PLAN_FORMAT = "kronlayers.plan"
PLAN_VERSION = 1

_LINEAR_KEYS = ("in_features", "out_features", "bias")
_CONV2D_KEYS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)


# -- dense layers -----------------------------------------------------------------------------


def is_conv1d(module: object) -> bool:
    """Whether ``module`` is Hugging Face ``transformers``' ``Conv1D`` (GPT-2's projections).

    Recognised without importing ``transformers``: the class is named ``Conv1D``, has the
    attribute ``nf`` (the output size) and a 2-D ``weight`` stored ``(in_features, nf)``; it
    computes ``x @ weight + bias``, i.e. an ``nn.Linear`` with weight ``weight.T``.
    """
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == module.nf


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` sharing ``Conv1D`` ``module``'s values: weight ``module.weight.T`` (a
    view, no copy) and the same bias parameter; for reading by ``from_dense`` only."""
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    linear.bias = module.bias
    return linear


def dense_kind(module: nn.Module) -> str:
    """The dense layer type a plan records: ``"Linear"``, ``"Conv1D"`` (Hugging Face),
    ``"Conv2d"``, else the class name."""
    if is_conv1d(module):
        return "Conv1D"
    for base in (nn.Linear, nn.Conv2d):
        if isinstance(module, base):
            return base.__name__
    return type(module).__name__


def dense_geometry(module: nn.Module) -> dict[str, Any]:
    """The shapes of a dense layer, or of the dense layer a factorized one replaces.

    ``nn.Linear`` / ``Conv1D`` / :class:`FactorizedLinear`: ``in_features``,
    ``out_features``, ``bias`` (present or not); ``nn.Conv2d`` / :class:`FactorizedConv2d`:
    ``nn.Conv2d``'s constructor arguments (pairs as tuples, ``padding`` a pair or a string).
    """
    bias = getattr(module, "bias", None) is not None
    if is_conv1d(module):
        return {"in_features": int(module.weight.shape[0]), "out_features": int(module.nf),
                "bias": bias}  # fmt: skip
    if isinstance(module, (nn.Linear, FactorizedLinear)):
        keys = _LINEAR_KEYS
    elif isinstance(module, (nn.Conv2d, FactorizedConv2d)):
        keys = _CONV2D_KEYS
    else:
        raise TypeError(f"no dense geometry for {type(module).__name__}")
    return {k: bias if k == "bias" else _frozen(getattr(module, k)) for k in keys}


def _frozen(value: object) -> object:
    """JSON-loaded or attribute values in one form: lists as tuples, ints as ``int``."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _frozen(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, type)):
        return int(value)
    raise TypeError(f"not a JSON value: {type(value).__name__} {value!r}")


def _jsonable(value: object) -> object:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


# -- constructor arguments --------------------------------------------------------------------

_FACTORY = ("device", "dtype")


def constructor_kwargs(layer: FactorizedLayer) -> dict[str, Any]:
    """The arguments of ``type(layer)(**kwargs)`` that rebuild ``layer``'s structure.

    Every parameter of the class' ``__init__`` (``device`` / ``dtype`` excepted) is read from
    the attribute of the same name (``bias`` from the presence of the bias); a parameter with
    a default and no such attribute is left to its default. The result is checked by
    building the layer on ``meta`` and comparing every parameter and buffer shape.

    Raises:
        ValueError: an argument without default has no attribute, an attribute is not a
            plain value, or the rebuilt layer's shapes differ (the layer should expose its
            constructor arguments as attributes).
    """
    cls = type(layer)
    kwargs: dict[str, Any] = {}
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _FACTORY:
            continue
        if p.name == "bias":
            kwargs["bias"] = getattr(layer, "bias", None) is not None
            continue
        if hasattr(layer, p.name):
            try:
                kwargs[p.name] = _frozen(getattr(layer, p.name))
                continue
            except TypeError as e:
                raise ValueError(
                    f"{cls.__name__}.{p.name} is not a plain value, so the constructor argument "
                    f"{p.name!r} cannot be recorded in a plan ({e})"
                ) from None
        if p.default is p.empty:
            raise ValueError(
                f"{cls.__name__} has no attribute {p.name!r}, so its constructor argument "
                f"{p.name!r} cannot be recorded in a plan"
            )
    rebuilt = _construct(cls, kwargs, dtype=None)
    want = _shapes(layer)
    got = _shapes(rebuilt)
    if got != want:
        diff = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
        raise ValueError(
            f"{cls.__name__}(**{kwargs}) does not rebuild the layer: {diff!r} has shape "
            f"{got.get(diff)} instead of {want.get(diff)} (an __init__ argument is not exposed "
            "as an attribute of the same name)"
        )
    return kwargs


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def _construct(
    cls: type[FactorizedLayer], kwargs: dict[str, Any], dtype: torch.dtype | None
) -> FactorizedLayer:
    """``cls(**kwargs)`` on the meta device (no memory, no initialisation cost)."""
    accepts = inspect.signature(cls.__init__).parameters
    extra = {"dtype": dtype} if dtype is not None and "dtype" in accepts else {}
    with torch.device("meta"):
        return cls(**kwargs, **extra)


def _layer_class(name: str) -> type[FactorizedLayer]:
    for cls in registered_layers():
        if cls.__name__ == name:
            return cls
    names = [cls.__name__ for cls in registered_layers()]
    raise ValueError(f"layer class {name!r} of the plan is not registered (registered: {names})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """What :func:`kronlayers.compress` did with one layer.

    Attributes:
        name: qualified name of the replaced layer (its first name when shared).
        dense_type: the dense layer replaced: ``"Linear"``, ``"Conv1D"`` (Hugging Face) or
            ``"Conv2d"``.
        dense_shape: its shapes (:func:`dense_geometry`).
        layer: class name of the new layer (a :mod:`kronlayers.registry` class).
        kwargs: the new layer's constructor arguments (:func:`constructor_kwargs`).
        method: the ``compress`` method.
        dtype: the dtype of the new layer's weights when the plan was made (informative:
            a replay uses the dtype of the model it is applied to).
        aliases: further names of the same module (shared modules).
        dispatch_path: the layer's ``dispatch_path`` when it is a stored plain value
            (restored on replay when settable), else ``None`` (e.g. when it is a method that
            decides per input shape at run time, as ``KroneckerLinear.dispatch_path``).
    """

    name: str
    dense_type: str
    dense_shape: dict[str, Any]
    layer: str
    kwargs: dict[str, Any]
    method: str
    dtype: str
    aliases: tuple[str, ...] = ()
    dispatch_path: Any = None

    @classmethod
    def from_layer(
        cls, name: str, dense: nn.Module, layer: FactorizedLayer, aliases: tuple[str, ...] = ()
    ) -> PlanEntry:
        """The entry for ``layer``, built to replace ``dense`` (found at ``name``)."""
        # A stored dispatch choice is recorded; a method (the path decided per input shape
        # at run time, as KroneckerLinear.dispatch_path) needs nothing: replay rebuilds the
        # same layer, which decides the same way.
        dispatch = getattr(layer, "dispatch_path", None)
        if callable(dispatch):
            dispatch = None
        if dispatch is not None:
            try:
                dispatch = _frozen(dispatch)
            except TypeError:
                dispatch = None
        first = next(iter(layer.parameters()), None)
        return cls(
            name=name,
            dense_type=dense_kind(dense),
            dense_shape=dense_geometry(dense),
            layer=type(layer).__name__,
            kwargs=constructor_kwargs(layer),
            method=layer.method,
            dtype=_dtype_name(first.dtype if first is not None else torch.get_default_dtype()),
            aliases=tuple(aliases),
            dispatch_path=dispatch,
        )

    def build(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FactorizedLayer:
        """The new layer, uninitialised (``to_empty``) on ``device`` with ``dtype`` (default:
        the current default device, the recorded dtype). Load its weights afterwards."""
        cls = _layer_class(self.layer)
        dtype = dtype if dtype is not None else getattr(torch, self.dtype)
        device = torch.device(device) if device is not None else torch.get_default_device()
        layer = _construct(cls, dict(self.kwargs), dtype)
        if any(m._non_persistent_buffers_set for m in layer.modules()):
            # A buffer computed in __init__ and absent from the state_dict: build for real.
            accepts = inspect.signature(cls.__init__).parameters
            extra = {k: v for k, v in (("device", device), ("dtype", dtype)) if k in accepts}
            layer = cls(**self.kwargs, **extra)
        else:
            layer = layer.to_empty(device=device)
        if self.dispatch_path is not None and not callable(getattr(layer, "dispatch_path", None)):
            try:
                layer.dispatch_path = self.dispatch_path
            except AttributeError:
                pass  # a read-only property: the layer decides by itself
        return layer

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "dense_type": self.dense_type,
            "dense_shape": _jsonable(self.dense_shape),
            "layer": self.layer,
            "method": self.method,
            "kwargs": _jsonable(self.kwargs),
            "dtype": self.dtype,
            "dispatch_path": _jsonable(self.dispatch_path),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanEntry:
        if not isinstance(data, dict):
            raise TypeError(f"a plan layer must be a dict, got {type(data).__name__}")
        required = ("name", "dense_type", "dense_shape", "layer", "kwargs", "method", "dtype")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"plan layer {data.get('name', '?')!r} lacks {missing}")
        dtype = data["dtype"]
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"plan layer {data['name']!r}: unknown dtype {dtype!r}")
        return cls(
            name=str(data["name"]),
            dense_type=str(data["dense_type"]),
            dense_shape=_frozen(data["dense_shape"]),
            layer=str(data["layer"]),
            kwargs=_frozen(data["kwargs"]),
            method=str(data["method"]),
            dtype=str(dtype),
            aliases=tuple(str(a) for a in data.get("aliases", ())),
            dispatch_path=_frozen(data.get("dispatch_path")),
        )

    def describe_dense(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.dense_shape.items())
        return f"{self.dense_type}({args})"


@dataclass
class Plan:
    """The layers :func:`kronlayers.compress` replaced, as :class:`PlanEntry` s (model order).

    ``report.plan`` after ``compress``; ``save`` / ``load`` as JSON; replay with
    ``compress(model, plan=plan)`` (or ``plan.apply(model)``).

    Attributes:
        layers: the entries.
        problems: ``{name: reason}`` for converted layers whose constructor arguments could not
            be recorded (see :func:`constructor_kwargs`); ``save`` and replaying refuse a plan
            with problems. Not saved.
    """

    layers: list[PlanEntry] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.layers)

    @classmethod
    def from_model(cls, model: nn.Module) -> Plan:
        """The plan of a model that already holds kronlayers layers (built by hand, or by
        ``compress`` without the report at hand): one entry per factorized layer, its dense
        type the layer's ``dense_type`` (so ``Conv1D`` origins read as ``Linear``)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        names: dict[int, list[str]] = {}
        layers: dict[int, FactorizedLayer] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, FactorizedLayer):
                names.setdefault(id(module), []).append(name)
                layers[id(module)] = module
        plan = cls()
        for key, layer in layers.items():
            first, *aliases = names[key]
            try:
                entry = PlanEntry.from_layer(first, layer, layer, tuple(aliases))
            except ValueError as e:
                plan.problems[first] = str(e)
                continue
            plan.layers.append(
                PlanEntry(**{**entry.__dict__, "dense_type": layer.dense_type.__name__})
            )
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "layers": [e.to_dict() for e in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f'not a kronlayers plan (no "format": {PLAN_FORMAT!r})')
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {data.get('version')!r} is not supported (this kronlayers "
                f"reads version {PLAN_VERSION})"
            )
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise ValueError('plan "layers" must be a list')
        return cls([PlanEntry.from_dict(e) for e in layers])

    def to_json(self) -> str:
        self._check_problems()
        data = self.to_dict()
        # One line per layer: readable, and diffs show which layers changed.
        layers = ",\n".join("  " + json.dumps(e) for e in data["layers"])
        head = {k: v for k, v in data.items() if k != "layers"}
        return json.dumps(head)[:-1] + ', "layers": [\n' + layers + ("\n" if layers else "") + "]}"

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON to ``path``."""
        text = self.to_json()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read a plan written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)!r} is not a JSON plan: {e}") from None
        return cls.from_dict(data)

    def apply(
        self, model: nn.Module, *, inplace: bool = True
    ) -> tuple[nn.Module, CompressionReport]:
        """Same as ``kronlayers.compress(model, plan=self, inplace=inplace)``."""
        from .compress import compress

        return compress(model, plan=self, inplace=inplace)

    def _check_problems(self) -> None:
        if self.problems:
            name, reason = next(iter(self.problems.items()))
            raise ValueError(f"the plan cannot record layer {name!r}: {reason}")


# -- replay -----------------------------------------------------------------------------------


def _mismatch(entry: PlanEntry, what: str) -> ValueError:
    return ValueError(f"plan does not fit the model at layer {entry.name!r}: {what}")


def replay(
    model: nn.Module, plan: Plan, *, inplace: bool = True
) -> tuple[nn.Module, CompressionReport]:
    """Apply ``plan`` to ``model`` (see :func:`kronlayers.compress` with ``plan=``).

    Every entry is checked before the model is touched: the layer must exist under its name
    (and aliases, as the same module), be of the recorded dense type and have the recorded
    shapes; the first entry that differs raises a ``ValueError`` naming it. Then each layer is
    replaced by its new layer built uninitialised (:meth:`PlanEntry.build`) on the dense
    weight's device and dtype; ``requires_grad`` and the training flag carry over.
    """
    from .compress import (
        CompressionReport,
        LayerRecord,
        _carry_over,
        _left_dense,
        _model_params,
        _num_params,
    )

    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a kronlayers.plan.Plan, got {type(plan).__name__}")
    plan._check_problems()
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    by_name: dict[str, nn.Module] = {}
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        by_name.setdefault(name, module)
        for child_name, child in module._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((module, child_name))

    targets: list[tuple[PlanEntry, nn.Module]] = []
    seen: dict[int, str] = {}
    for entry in plan.layers:
        module = by_name.get(entry.name)
        if module is None:
            raise _mismatch(entry, "no module of that name in the model")
        if isinstance(module, FactorizedLayer):
            raise _mismatch(entry, f"it is already a {type(module).__name__}")
        kind = dense_kind(module)
        if kind != entry.dense_type:
            raise _mismatch(entry, f"the plan has a {entry.dense_type}, the model a {kind}")
        geometry = dense_geometry(module)
        if geometry != entry.dense_shape:
            key = next(
                (k for k in entry.dense_shape if entry.dense_shape[k] != geometry.get(k)), None
            )
            if key is None:
                what = f"the model has {kind}({geometry}), the plan {entry.describe_dense()}"
            else:
                what = (
                    f"{key}={geometry.get(key)!r} in the model, {entry.dense_shape[key]!r} in the "
                    f"plan (plan: {entry.describe_dense()})"
                )
            raise _mismatch(entry, what)
        for alias in entry.aliases:
            if by_name.get(alias) is not module:
                raise _mismatch(entry, f"its alias {alias!r} is not the same module in the model")
        if id(module) in seen:
            raise _mismatch(entry, f"the same module as {seen[id(module)]!r}, listed twice")
        seen[id(module)] = entry.name
        _layer_class(entry.layer)
        targets.append((entry, module))

    report = CompressionReport()
    before = _model_params(model)
    converted: dict[int, nn.Module] = {}
    for entry, module in targets:
        weight = module.weight
        try:
            new = entry.build(device=weight.device, dtype=weight.dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"plan layer {entry.name!r}: {entry.layer}(**{entry.kwargs}) fails: {e}"
            ) from e
        _carry_over(module, new)
        report.append(
            LayerRecord(
                name=entry.name,
                kind=type(module).__name__,
                old_params=_num_params(module),
                new_params=_num_params(new),
                new_kind=type(new).__name__,
                config=new.rank_label(),
                aliases=entry.aliases,
            )
        )
        converted[id(module)] = new
    report.left_dense = _left_dense(model, converted, report, reason="not in the plan")
    report.model_params = before
    report.plan = plan
    for key, new in converted.items():
        for parent, child_name in slots.get(key, []):
            setattr(parent, child_name, new)
    root = by_name.get("")
    if root is not None and id(root) in converted:
        model = converted[id(root)]
    return model, report
