"""Per-layer parameters and forward FLOPs of a model, dense vs compressed.

Example::

    print(kronlayers.summary(model, (1, 784)))
    print(kronlayers.summary(hf_model, input_data={"input_ids": ids, "attention_mask": mask}))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .modules._base import FactorizedLayer
from .plan import is_conv1d

__all__ = ["LayerSummary", "ModelSummary", "summary"]

aten = torch.ops.aten


@dataclass
class LayerSummary:
    """One forward call of one layer.

    Attributes:
        name: fully qualified module name (``""`` for the root).
        kind: class name.
        input_shape: shape of the first tensor input (positional, else keyword).
        output_shape: shape of the output (of its first tensor for tuple / dict outputs), or
            ``None``.
        params: parameters of the layer (its own and its submodules'; for an ``ops`` row its
            direct parameters only).
        flops: forward FLOPs (2 per multiply-add) of this call (bias additions excluded), or
            ``None`` when it ran no counted operation (norms, activations, embeddings).
        dense_params: parameters of the equivalent dense layer (``params`` for dense layers).
        dense_flops: forward FLOPs (2 per multiply-add) of the equivalent dense layer.
        compressed: ``True`` for the kronlayers layers.
        path: for a kronlayers layer, the kernel path it takes on this input
            (``"factorized"`` or ``"dense"``, its ``dispatch_path``), shown after its kind;
            ``None`` for other modules.
        ops: ``True`` for a row that counts a module's own tensor operations, outside its
            submodules (e.g. the attention matmuls of a transformer's attention block).
        uncounted: operations this call ran that have no FLOP formula (``flops`` is then a
            lower bound); empty when everything was counted.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    flops: int | None
    dense_params: int
    dense_flops: int | None
    compressed: bool
    ops: bool = False
    uncounted: tuple[str, ...] = ()
    path: str | None = None


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _direct_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module._parameters.values() if p is not None)


# -- analytic counts of the counted layer types -----------------------------------------------


def _is_counted(module: nn.Module) -> bool:
    """Layers counted analytically (the operations they run are not counted again)."""
    return isinstance(module, (FactorizedLayer, nn.Linear, nn.Conv2d, nn.MultiheadAttention)) or (
        is_conv1d(module)
    )


def _conv_flops(module: nn.Conv2d, y: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return 2 * y.numel() * (module.in_channels // module.groups) * kh * kw


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> object:
    return args[index] if len(args) > index else kwargs.get(name)


def _mha_flops(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> int | None:
    """The q/k/v and output projections and the two attention matmuls (``Q Kᵀ``, ``P V``)."""
    q, k, v = (_argument(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    if q.dim() == 3:
        n, tgt = (q.shape[0], q.shape[1]) if module.batch_first else (q.shape[1], q.shape[0])
        src = k.shape[1] if module.batch_first else k.shape[0]
    else:
        n, tgt, src = 1, q.shape[0], k.shape[0]
    e = module.embed_dim
    projections = 2 * n * (tgt * e * e + src * module.kdim * e + src * module.vdim * e)
    keys = src + (module.bias_k is not None) + bool(module.add_zero_attn)
    attention = 2 * 2 * n * tgt * keys * e
    return projections + attention + 2 * n * tgt * e * e


def _path_of(module: nn.Module, x: torch.Tensor | None) -> str | None:
    """The kernel path a kronlayers layer took for this input (``"factorized"``/``"dense"``)."""
    if not isinstance(module, FactorizedLayer) or x is None:
        return None
    return module.dispatch_path(tuple(x.shape), requires_grad=False)


def _count(
    module: nn.Module,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    args: tuple,
    kwargs: dict,
) -> tuple[int | None, int, int | None, bool]:
    """``(flops, dense_params, dense_flops, compressed)`` of one call of a counted layer."""
    params = _params(module)
    if isinstance(module, FactorizedLayer):
        if x is None:
            return None, params, None, True
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        shape = tuple(x.shape)
        dense_params = module.dense_num_weights() + bias
        return module.flops(shape), dense_params, module.dense_flops(shape), True
    flops: int | None = None
    if isinstance(module, nn.Linear) and x is not None:
        flops = 2 * (x.numel() // module.in_features) * module.in_features * module.out_features
    elif isinstance(module, nn.Conv2d) and y is not None:
        flops = _conv_flops(module, y)
    elif isinstance(module, nn.MultiheadAttention):
        flops = _mha_flops(module, args, kwargs)
    elif is_conv1d(module) and x is not None:
        n_in, n_out = module.weight.shape
        flops = 2 * (x.numel() // n_in) * n_in * n_out
    return flops, params, flops, False


# -- counting the other operations ------------------------------------------------------------


def _sdpa_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_, **__) -> int:
    # Q Kᵀ and P V, as torch.utils.flop_counter.sdpa_flop_count.
    batch = math.prod(query.shape[:-2])
    tgt, e = query.shape[-2], query.shape[-1]
    src, ev = key.shape[-2], value.shape[-1]
    return 2 * batch * tgt * src * e + 2 * batch * tgt * src * ev


# Kernels FlopCounterMode does not know (CPU scaled-dot-product attention).
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
# Operations with no formula whose cost is not negligible: reported as uncounted.
_HEAVY = ("mm", "matmul", "conv", "attention", "einsum", "linear", "lstm", "gru", "rnn",
          "transformer", "tensordot", "cdist", "multi_head")  # fmt: skip


def _heavy(name: str) -> bool:
    name = name.split("::")[-1].split(".")[-1]
    return any(h in name for h in _HEAVY) and "convert" not in name


@dataclass
class _Frame:
    module: nn.Module
    inside: bool  # called inside an analytically counted layer: no row
    analytic: bool
    flops: int = 0
    ran: bool = False
    uncounted: tuple[str, ...] = ()


class _OpCounter(TorchDispatchMode):
    """Counts the FLOPs of every aten operation (torch.utils.flop_counter's formulas) into the
    innermost running module, except inside analytically counted layers."""

    def __init__(self, stack: list[_Frame], depth: list[int]) -> None:
        super().__init__()
        self.stack = stack
        self.depth = depth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and packet not in _EXTRA_FORMULAS:
            # As FlopCounterMode: count the decomposition of composite operations.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if self.depth[0] > 0 or not self.stack:
            return out
        frame = self.stack[-1]
        if packet in flop_registry:
            frame.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
            frame.ran = True
        elif packet in _EXTRA_FORMULAS:
            frame.flops += int(_EXTRA_FORMULAS[packet](*args, **kwargs))
            frame.ran = True
        elif _heavy(str(packet)) and str(packet) not in frame.uncounted:
            frame.uncounted = (*frame.uncounted, str(packet))
        return out


# -- the result -------------------------------------------------------------------------------


class ModelSummary:
    """Result of :func:`summary`: ``rows`` (one :class:`LayerSummary` per layer call) and
    totals; ``str()`` is a table.

    Attributes:
        rows: the per-call rows, in execution order (a module's ``ops`` row after those of
            its submodules).
        total_params: parameters of the model (each shared parameter once), equal to
            ``sum(p.numel() for p in model.parameters())``.
        total_flops: sum of the rows' forward FLOPs (rows without a count add 0).
        total_dense_params: ``total_params`` with every compressed layer replaced by its dense
            equivalent.
        total_dense_flops: ``total_flops`` likewise.
        uncounted: the rows that ran operations without a FLOP formula (the FLOP totals are
            then lower bounds); empty when every operation was counted.
        input_size: the input shapes (of the tensors of ``input_data``).
    """

    def __init__(
        self,
        rows: list[LayerSummary],
        model: nn.Module,
        input_size: list,
        input_text: str | None = None,
    ) -> None:
        self.rows = rows
        self.input_size = input_size
        self.input_text = (
            input_text if input_text is not None else ", ".join(str(list(s)) for s in input_size)
        )
        self.total_params = _params(model)
        self.total_flops = sum(r.flops or 0 for r in rows)
        self.total_dense_flops = sum(
            (r.dense_flops if r.dense_flops is not None else r.flops) or 0 for r in rows
        )
        seen: dict[str, LayerSummary] = {}
        for r in rows:
            if r.compressed:
                seen.setdefault(r.name, r)
        self.total_dense_params = self.total_params + sum(
            r.dense_params - r.params for r in seen.values()
        )
        self.uncounted = [r for r in rows if r.uncounted]

    def __str__(self) -> str:
        def num(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        def flops(v: int | None, uncounted: bool) -> str:
            return (num(v) if v is not None else "") + "+?" if uncounted else num(v)

        def shape(s: tuple[int, ...] | None) -> str:
            return "-" if s is None else str(list(s))

        header = ("layer", "kind", "input", "output", "params", "FLOPs", "dense params")
        header += ("dense FLOPs",)
        rows = [header]
        for r in self.rows:
            dense = (num(r.dense_params), num(r.dense_flops)) if r.compressed else ("", "")
            kind = r.kind + (" (ops)" if r.ops else "") + (f" [{r.path}]" if r.path else "")
            where = (r.name or "(root)", kind, shape(r.input_shape), shape(r.output_shape))
            rows.append((*where, num(r.params), flops(r.flops, bool(r.uncounted)), *dense))
        partial = bool(self.uncounted)
        total = ("total", "", "", "", num(self.total_params), flops(self.total_flops, partial))
        total += (num(self.total_dense_params), flops(self.total_dense_flops, partial))
        rows.append(total)
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        right = {4, 5, 6, 7}
        lines = [
            "  ".join(
                cell.rjust(w) if c in right else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ]
        rule = "-" * max(len(line) for line in lines)
        out = [lines[0], rule, *lines[1:-1], rule, lines[-1]]
        if partial:
            where = "; ".join(
                f"{r.name or '(root)'} ({', '.join(r.uncounted)})" for r in self.uncounted
            )
            out.append(
                f"FLOPs not counted (no formula; marked +?, totals are lower bounds): {where}"
            )
        if self.total_params and self.total_flops:
            out.append(
                f"compression: {self.total_dense_params / self.total_params:.2f}x params, "
                f"{self.total_dense_flops / self.total_flops:.2f}x FLOPs "
                f"(forward FLOPs, 2 per multiply-add; input {self.input_text})"
            )
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"ModelSummary(rows={len(self.rows)}, total_params={self.total_params}, "
            f"total_flops={self.total_flops})"
        )


# -- arguments --------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_input_size(input_size: Sequence) -> list[tuple[int, ...]]:
    def is_shape(s: object) -> bool:
        return isinstance(s, Sequence) and not isinstance(s, str) and all(_is_int(v) for v in s)

    what = (
        "input_size must be a shape (a non-empty sequence of ints, batch dimension included) "
        f"or a sequence of shapes, got {input_size!r}"
    )
    if isinstance(input_size, str) or not isinstance(input_size, Sequence):
        raise TypeError(what)
    # An empty shape is a sequence of the right type with a wrong length: a ValueError.
    if len(input_size) == 0:
        raise ValueError(what)
    if is_shape(input_size):
        sizes = [tuple(int(v) for v in input_size)]
    elif all(is_shape(s) for s in input_size):
        if any(len(s) == 0 for s in input_size):
            raise ValueError(what)
        sizes = [tuple(int(v) for v in s) for s in input_size]
    else:
        raise TypeError(what)
    for s in sizes:
        if any(v < 0 for v in s):
            raise ValueError(f"input_size must contain non-negative sizes, got {s}")
    return sizes


def _check_dtype(name: str, dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    return dtype


def _to_device(data: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return data
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        return {k: _to_device(v, device) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(_to_device(v, device) for v in data)
    if isinstance(data, list):
        return [_to_device(v, device) for v in data]
    return data


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return type(value).__name__


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _first_tensor(*values: Any) -> torch.Tensor | None:
    for value in values:
        found = _tensors(value)
        if found:
            return found[0]
    return None


def _default_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _inputs(
    model: nn.Module,
    input_size: object,
    input_data: object,
    dtypes: object,
    dtype: object,
    device: torch.device | str | None,
) -> tuple[tuple, dict, list[tuple[int, ...]], str]:
    """``(args, kwargs, shapes, description)`` of the forward call."""
    if input_data is not None:
        if input_size is not None:
            raise ValueError("give input_size or input_data, not both")
        if dtypes is not None or dtype is not None:
            raise ValueError("dtype / dtypes apply to input_size (input_data has its own)")
        data = _to_device(input_data, device)
        if isinstance(data, torch.Tensor):
            args, kwargs = (data,), {}
            text = _describe(data)
        elif isinstance(data, Mapping):
            if not all(isinstance(k, str) for k in data):
                raise TypeError("input_data as a dict must have str keys (keyword arguments)")
            args, kwargs = (), dict(data)
            text = ", ".join(f"{k} {_describe(v)}" for k, v in kwargs.items())
        elif isinstance(data, (tuple, list)):
            args, kwargs = tuple(data), {}
            text = ", ".join(_describe(v) for v in args)
        else:
            raise TypeError(
                "input_data must be a tensor, a tuple / list (positional arguments) or a dict "
                f"(keyword arguments), got {type(input_data).__name__}"
            )
        return args, kwargs, [tuple(t.shape) for t in _tensors((args, kwargs))], text
    if input_size is None:
        raise TypeError("summary() needs input_size or input_data")
    sizes = _check_input_size(input_size)
    if dtypes is not None and dtype is not None:
        raise ValueError("give dtype or dtypes, not both")
    if dtypes is not None:
        if isinstance(dtypes, torch.dtype) or not isinstance(dtypes, Sequence):
            raise TypeError(f"dtypes must be a list of torch.dtype, got {dtypes!r}")
        kinds = [_check_dtype(f"dtypes[{i}]", d) for i, d in enumerate(dtypes)]
        if len(kinds) != len(sizes):
            raise ValueError(
                f"dtypes must hold one dtype per input ({len(sizes)}), got {len(kinds)}"
            )
    else:
        kinds = [_check_dtype("dtype", dtype if dtype is not None else torch.float32)] * len(sizes)
    device = device if device is not None else _default_device(model)
    args = tuple(torch.zeros(s, dtype=d, device=device) for s, d in zip(sizes, kinds, strict=True))
    return args, {}, sizes, ", ".join(str(list(s)) for s in sizes)


# -- summary ----------------------------------------------------------------------------------


def summary(
    model: nn.Module,
    input_size: Sequence[int] | Sequence[Sequence[int]] | None = None,
    *,
    input_data: torch.Tensor | Sequence[Any] | Mapping[str, Any] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ModelSummary:
    """Parameters and forward FLOPs of every layer of ``model`` for one input.

    The input follows torchinfo's conventions: either ``input_size`` (zeros of that shape,
    ``dtypes`` one dtype per input, default float32) or ``input_data``: a tensor
    (``model(x)``), a tuple / list (``model(*args)``) or a dict (``model(**kwargs)``, e.g. the
    ``input_ids`` and ``attention_mask`` of a Hugging Face model). Runs one forward pass
    (under ``torch.no_grad()``, in eval mode, with PyTorch's fused ``nn.MultiheadAttention``
    / ``nn.TransformerEncoderLayer`` fast path off; training flags and the fast-path setting
    are restored afterwards) and records, through forward hooks, the input and output shape
    of each layer call.

    FLOPs count 2 per multiply-add (the unit of ``torch.utils.flop_counter``), bias additions
    and elementwise operations excluded:

    - ``nn.Linear`` and Hugging Face ``Conv1D`` (GPT-2's; recognised without importing
      ``transformers``): ``2 * N * in * out`` (``N`` = input rows, all leading dims).
    - ``nn.Conv2d``: ``2 * out.numel() * in_channels / groups * kh * kw``.
    - ``nn.MultiheadAttention``: the q, k, v projections (``in_proj_weight``), the two
      attention matmuls ``Q Kᵀ`` and ``P V``, and ``out_proj``.
    - every kronlayers layer (:class:`~kronlayers.FactorizedLayer`): its own ``flops`` (the
      cost of its kernel's contraction), with ``dense_flops`` and the dense parameter count
      of the module it replaces as the dense equivalents.
    - every other operation (the attention matmuls written inline in a transformer block, a
      leaf module's own matmul, ...): counted as ``torch.utils.flop_counter.FlopCounterMode``
      counts it (matmuls, convolutions, scaled-dot-product attention, including the CPU
      kernel FlopCounterMode misses), attributed to the innermost module that runs it.
      An operation with no formula that looks costly (a fused or custom kernel) is
      listed in the row's ``uncounted`` and under the totals: the totals are then lower
      bounds, never a silent undercount.

    Rows are the calls of the counted layers above, of every other leaf module (``flops``
    ``None`` when it runs no counted operation) and, as ``ops`` rows, of any other module
    that runs counted operations itself. A module called twice gives two rows;
    ``total_params`` counts each parameter once.

    Args:
        model: the model.
        input_size: the input shape including the batch dimension, e.g. ``(1, 3, 32, 32)``,
            or a list of shapes for a model taking several inputs.
        input_data: the actual input(s) instead of ``input_size``.
        dtypes: with ``input_size``: the dtype of each input (e.g. ``[torch.long]`` for
            token ids).
        dtype: with ``input_size``: one dtype for every input (``dtypes`` or ``dtype``).
        device: where to create the ``input_size`` zeros (default: the device of the
            model's first parameter or buffer, else the CPU); with ``input_data``, where to
            move its tensors (default: left where they are). The model is not moved.

    Returns:
        A :class:`ModelSummary` (``.rows``, ``.total_params``, ``.total_flops``,
        ``.total_dense_params``, ``.total_dense_flops``, ``.uncounted``; ``print`` it for a
        table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    args, kwargs, sizes, text = _inputs(model, input_size, input_data, dtypes, dtype, device)

    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    stack: list[_Frame] = []
    depth = [0]  # how many analytically counted layers are running
    rows: list[LayerSummary] = []

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        analytic = _is_counted(module)
        stack.append(_Frame(module, inside=depth[0] > 0, analytic=analytic))
        if analytic:
            depth[0] += 1

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not stack or stack[-1].module is not module:
            return  # a hook of a call that did not go through pre_hook (should not happen)
        frame = stack.pop()
        if frame.analytic:
            depth[0] -= 1
        if frame.inside:
            return
        x = _first_tensor(args, kwargs)
        y = _first_tensor(output)
        leaf = next(iter(module.children()), None) is None
        uncounted = frame.uncounted
        ops = False
        if frame.analytic:
            flops, dense_params, dense_flops, compressed = _count(module, x, y, args, kwargs)
            if flops is None:
                uncounted = (*uncounted, "no tensor input to count")
            params = _params(module)
        elif leaf or frame.ran or uncounted:
            flops = frame.flops if frame.ran else None
            ops = not leaf
            params = _params(module) if leaf else _direct_params(module)
            dense_params, dense_flops, compressed = params, flops, False
        else:
            return
        rows.append(
            LayerSummary(
                name=names.get(id(module), "?"),
                kind=type(module).__name__,
                path=_path_of(module, x),
                input_shape=None if x is None else tuple(x.shape),
                output_shape=None if y is None else tuple(y.shape),
                params=params,
                flops=flops,
                dense_params=dense_params,
                dense_flops=dense_flops,
                compressed=compressed,
                ops=ops,
                uncounted=tuple(uncounted),
            )
        )

    training = {id(m): m.training for m in model.modules()}
    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(m.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), _OpCounter(stack, depth):
            model(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = training[id(m)]
    return ModelSummary(rows, model, sizes, text)
