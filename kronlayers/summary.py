"""Per-layer parameters and forward FLOPs of a model, dense vs compressed.

Example::

    print(kronlayers.summary(model, (1, 784)))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .functional.cp_conv2d import conv2d_padding, cp_conv2d_flops
from .functional.cp_linear import cp_linear_flops
from .functional.kronecker_linear import kronecker_linear_flops
from .modules.cp_conv2d import CPConv2d
from .modules.cp_linear import CPLinear
from .modules.kronecker_linear import KroneckerLinear

__all__ = ["LayerSummary", "ModelSummary", "summary"]


@dataclass
class LayerSummary:
    """One forward call of one layer.

    Attributes:
        name: fully qualified module name (``""`` for the root).
        kind: class name.
        input_shape: shape of the first tensor input.
        output_shape: shape of the output (of its first tensor for tuple outputs), or ``None``.
        params: parameters of the layer (its own and its submodules').
        flops: forward multiply-adds of this call (bias additions excluded), or ``None`` for
            layer types without an analytic count.
        dense_params: parameters of the equivalent dense layer (``params`` for dense layers).
        dense_flops: forward multiply-adds of the equivalent dense layer.
        compressed: ``True`` for the kronlayers layers.
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


def _linear_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    batch = x.numel() // module.in_features
    return batch, batch * module.in_features * module.out_features


def _conv_macs(module: nn.Module, y: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return y.numel() * (module.in_channels // module.groups) * kh * kw


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dense_linear_params(module: nn.Module) -> int:
    bias = module.out_features if getattr(module, "bias", None) is not None else 0
    return module.in_features * module.out_features + bias


def _count(
    module: nn.Module, x: torch.Tensor | None, y: torch.Tensor | None
) -> tuple[int | None, int, int | None, bool]:
    """``(flops, dense_params, dense_flops, compressed)`` of one call of ``module``."""
    params = _params(module)
    if x is not None and isinstance(module, (KroneckerLinear, CPLinear)):
        batch, dense = _linear_flops(module, x)
        if isinstance(module, KroneckerLinear):
            flops = kronecker_linear_flops(module.in_shape, module.out_shape, module.rank, batch)
        else:
            flops = cp_linear_flops(module.in_shape, module.out_shape, module.rank, batch)
        flops //= 2  # the kernels' *_flops count 2 FLOPs per multiply-add
        return flops, _dense_linear_params(module), dense, True
    if x is not None and y is not None and isinstance(module, CPConv2d):
        return _count_cp_conv(module, x, y)
    if isinstance(module, nn.Linear) and x is not None:
        flops = _linear_flops(module, x)[1]
        return flops, params, flops, False
    if isinstance(module, nn.Conv2d) and y is not None:
        macs = _conv_macs(module, y)
        return macs, params, macs, False
    return None, params, None, False


def _count_cp_conv(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    h, w = x.shape[-2:]
    padding = module.padding
    if module.padding_mode != "zeros":  # the input is padded first, then convolved unpadded
        top, bottom, left, right = conv2d_padding(
            padding, module.kernel_size, module.stride, module.dilation
        )
        h, w, padding = h + top + bottom, w + left + right, 0
    batch = x.shape[0] if x.dim() == 4 else 1
    flops = cp_conv2d_flops(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.rank,
        (h, w),
        batch,
        module.stride,
        padding,
        module.dilation,
    )
    kh, kw = module.kernel_size
    dense_params = module.out_channels * module.in_channels * kh * kw
    dense_params += module.out_channels if module.bias is not None else 0
    dense_flops = y.numel() * module.in_channels * kh * kw
    return flops // 2, dense_params, dense_flops, True  # cp_conv2d_flops: 2 per multiply-add


class ModelSummary:
    """Result of :func:`summary`: ``rows`` (one :class:`LayerSummary` per layer call) and
    totals; ``str()`` is a table.

    Attributes:
        rows: the per-call rows, in execution order.
        total_params: parameters of the model (each shared parameter once).
        total_flops: sum of the rows' forward multiply-adds (rows without a count add 0).
        total_dense_params: ``total_params`` with every compressed layer replaced by its dense
            equivalent.
        total_dense_flops: ``total_flops`` likewise.
    """

    def __init__(self, rows: list[LayerSummary], model: nn.Module, input_size: list) -> None:
        self.rows = rows
        self.input_size = input_size
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

    def __str__(self) -> str:
        def num(v: int | None) -> str:
            return "-" if v is None else f"{v:,}"

        def shape(s: tuple[int, ...] | None) -> str:
            return "-" if s is None else str(list(s))

        header = ("layer", "kind", "input", "output", "params", "FLOPs", "dense params")
        header += ("dense FLOPs",)
        rows = [header]
        for r in self.rows:
            dense = (num(r.dense_params), num(r.dense_flops)) if r.compressed else ("", "")
            where = (r.name or "(root)", r.kind, shape(r.input_shape), shape(r.output_shape))
            rows.append((*where, num(r.params), num(r.flops), *dense))
        total = ("total", "", "", "", num(self.total_params), num(self.total_flops))
        total += (num(self.total_dense_params), num(self.total_dense_flops))
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
        if self.total_params and self.total_flops:
            out.append(
                f"compression: {self.total_dense_params / self.total_params:.2f}x params, "
                f"{self.total_dense_flops / self.total_flops:.2f}x FLOPs "
                "(FLOPs are forward multiply-adds; input "
                + ", ".join(str(list(s)) for s in self.input_size)
                + ")"
            )
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"ModelSummary(rows={len(self.rows)}, total_params={self.total_params}, "
            f"total_flops={self.total_flops})"
        )


def _check_input_size(input_size: Sequence) -> list[tuple[int, ...]]:
    def is_shape(s: object) -> bool:
        return (
            isinstance(s, Sequence)
            and not isinstance(s, str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
        )

    if is_shape(input_size) and len(input_size) > 0:
        sizes = [tuple(input_size)]
    elif (
        isinstance(input_size, Sequence)
        and len(input_size) > 0
        and all(is_shape(s) and len(s) > 0 for s in input_size)
    ):
        sizes = [tuple(s) for s in input_size]
    else:
        raise TypeError(
            "input_size must be a shape (a non-empty sequence of ints, batch dimension "
            f"included) or a sequence of shapes, got {input_size!r}"
        )
    for s in sizes:
        if any(v < 0 for v in s):
            raise ValueError(f"input_size must contain non-negative sizes, got {s}")
    return sizes


def summary(
    model: nn.Module,
    input_size: Sequence[int] | Sequence[Sequence[int]],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> ModelSummary:
    """Parameters and forward FLOPs of every layer of ``model`` for one input shape.

    Runs one forward pass (under ``torch.no_grad()``, in eval mode; every module's training
    flag is restored afterwards) on zeros of ``input_size`` and records, through forward
    hooks, the input and output shape of each layer call. FLOPs are multiply-adds of the
    forward pass, bias additions excluded, counted analytically per layer type:

    - ``nn.Linear``: ``N * in * out`` (``N`` = input rows, all leading dims).
    - ``nn.Conv2d``: ``out.numel() * in_channels / groups * kh * kw``.
    - :class:`~kronlayers.KroneckerLinear`:
      :func:`kronlayers.functional.kronecker_linear_flops` (the kernel's contraction
      order); its dense-equivalent params and FLOPs are those of ``nn.Linear``.
    - ``CPLinear`` / ``CPConv2d``: the cost of their contraction (their ``*_flops`` helpers,
      converted to multiply-adds); dense equivalents as above.

    Rows are the calls of the kronlayers layers, of ``nn.Linear`` / ``nn.Conv2d`` and of every
    other leaf module (those show no FLOPs and add none to the total). A module called twice
    gives two rows; ``total_params`` counts each parameter once.

    Args:
        model: the model.
        input_size: the input shape including the batch dimension, e.g. ``(1, 3, 32, 32)``,
            or a list of shapes for a model taking several inputs.
        dtype: dtype of the zeros input(s) (e.g. ``torch.long`` for token ids).
        device: where to create the input(s); default: the device of the model's first
            parameter or buffer, else the CPU.

    Returns:
        A :class:`ModelSummary` (``.rows``, ``.total_params``, ``.total_flops``,
        ``.total_dense_params``, ``.total_dense_flops``; ``print`` it for a table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sizes = _check_input_size(input_size)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if device is None:
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
    inputs = [torch.zeros(s, dtype=dtype, device=device) for s in sizes]

    counted = (nn.Linear, nn.Conv2d, KroneckerLinear, CPLinear, CPConv2d)
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    # Hook the counted layers and every other leaf, but nothing inside a counted layer.
    hooked: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, counted):
            hooked.append(module)
            inside.update(id(m) for m in module.modules())
        elif next(iter(module.children()), None) is None:
            hooked.append(module)

    rows: list[LayerSummary] = []

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        y = output if isinstance(output, torch.Tensor) else None
        if y is None and isinstance(output, (tuple, list)):
            y = next((o for o in output if isinstance(o, torch.Tensor)), None)
        flops, dense_params, dense_flops, compressed = _count(module, x, y)
        rows.append(
            LayerSummary(
                name=names.get(id(module), "?"),
                kind=type(module).__name__,
                input_shape=None if x is None else tuple(x.shape),
                output_shape=None if y is None else tuple(y.shape),
                params=_params(module),
                flops=flops,
                dense_params=dense_params,
                dense_flops=dense_flops,
                compressed=compressed,
            )
        )

    training = {id(m): m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in hooked]
    try:
        model.eval()
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m in model.modules():
            m.training = training[id(m)]
    return ModelSummary(rows, model, sizes)
