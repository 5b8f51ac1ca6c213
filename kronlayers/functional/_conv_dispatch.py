"""Factorized-or-dense dispatch shared by the convolution kernels (CP and Tucker).

A factorized convolution runs as a chain of cheap convolutions (channel GEMMs and a small
spatial convolution). When its ranks are high the chain costs more than forming the dense
``(C_out, C_in, kh, kw)`` kernel and running one ``F.conv2d``; the kernels then take that
dense path, so a layer is never much slower than the convolution it replaces. Both paths are
described with the operations of :mod:`kronlayers.functional._dispatch` and compared under
its cost model, like :func:`kronlayers.functional.kronecker_linear`'s dispatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ._dispatch import (
    SYMBOLIC_ROWS,
    Gemm,
    Node,
    Op,
    Pass,
    check_path,
    estimate,
    forced_kernel,
    forced_path,
)

__all__ = [
    "DENSE_MARGIN",
    "choose_conv_path",
    "conv_batch",
    "conv_call",
    "conv_plan",
    "dense_conv",
    "dense_conv_ops",
    "launches",
]

# The dense path must beat the factorized one by this factor to be chosen: near the switch
# point both cost about the same, and the factorized path keeps activations small.
DENSE_MARGIN = 0.9


# A convolution call (oneDNN / cuDNN) has a fixed cost of its own, primitive lookup and
# layout checks: on the development CPU about 15 small ops' worth (~40-70 us at 1 thread,
# measured on 16-channel 16x16 inputs); it decides small problems, where a factorized path
# that runs three or four convolutions loses to one dense one.
_CONV_LAUNCHES = 15


def launches(count: int) -> list[Op]:
    """``count`` small ops' fixed cost (views, pads, tiny products): no memory traffic."""
    return [Pass(0)] * count


def conv_call() -> list[Op]:
    """The fixed cost of one convolution call (its arithmetic is modelled as a GEMM)."""
    return launches(_CONV_LAUNCHES)


def conv_batch(n: object) -> int:
    """The batch size to plan for: ``n`` when it is a concrete int in eager mode, else
    :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` (a symbolic batch under export or
    ``torch.compile(dynamic=True)``; while compiling, so that no guard depends on it)."""
    if isinstance(n, int) and not torch.compiler.is_compiling():
        return n
    return SYMBOLIC_ROWS


def dense_conv_ops(
    n: int,
    c_in: int,
    c_out: int,
    taps: int,
    pixels_in: int,
    pixels_out: int,
    form: Sequence[Op],
    form_grad: Sequence[Op],
    needs: tuple[bool, bool, bool],
) -> list[Op]:
    """The dense path: form the kernel (``form``), one convolution (a GEMM of
    ``n * pixels_out`` rows, ``C_out`` columns and ``C_in * taps`` depth, as oneDNN / cuDNN
    run it), and the backward ``needs = (input, factors, bias)`` implies (``form_grad``:
    the factors' gradients from the kernel's)."""
    need_x, need_factors, need_bias = needs
    k = c_in * taps
    ops: list[Op] = [*form, *conv_call(), Gemm(n * pixels_out, c_out, k)]
    if any(needs):  # one convolution_backward call for every gradient
        ops += conv_call()
    if need_x:
        ops.append(Gemm(n * pixels_in, k, c_out))
    if need_factors:
        ops += [Gemm(c_out, k, n * pixels_out), *form_grad]
    if need_bias:
        ops.append(Pass(n * c_out * pixels_out))
    if any(needs):
        ops.append(Node(2 * len(form) + 2))
    return ops


def choose_conv_path(
    factorized: Sequence[Op],
    dense: Sequence[Op],
    itemsize: int,
    device_type: str,
    path: str | None,
) -> str:
    """``"factorized"`` or ``"dense"``: ``path`` if given (a ``path=`` argument), else the
    kernel pinned by :func:`~kronlayers.functional._dispatch.force_kernel` (``"function"``
    and ``"ops"`` mean the factorized kernel here), else the path pinned by
    :func:`~kronlayers.functional._dispatch.force_path`, else the cheaper under the cost
    model (the dense one only if clearly cheaper, :data:`DENSE_MARGIN`)."""
    forced = path or forced_kernel() or forced_path()
    if forced is not None:
        return "dense" if forced == "dense" else "factorized"
    t = estimate({"factorized": factorized, "dense": dense}, itemsize, device_type)
    return "dense" if t["dense"] < DENSE_MARGIN * t["factorized"] else "factorized"


def conv_plan(
    path_ops: Callable[[int, tuple[int, int], tuple[bool, bool, bool]], tuple[list, list]],
    input_shape: Sequence[int],
    dtype: torch.dtype,
    device_type: str,
    needs: tuple[bool, bool, bool],
    path: str | None,
) -> dict:
    """A kernel's ``*_plan`` answer for ``input_shape`` (``(N, C, H, W)`` or ``(C, H, W)``):
    ``path`` and the estimated ``seconds`` of each, from ``path_ops(n, (H, W), needs)``, the
    kernel's ``(factorized ops, dense ops)``."""
    path = check_path(path)
    shape = tuple(input_shape)
    n = conv_batch(shape[0]) if len(shape) == 4 else 1
    needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]))
    fact, dense = path_ops(n, (shape[-2], shape[-1]), needs)
    return {
        "path": choose_conv_path(fact, dense, dtype.itemsize, device_type, path),
        "seconds": estimate({"factorized": fact, "dense": dense}, dtype.itemsize, device_type),
    }


def dense_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``F.conv2d`` with a resolved ``(top, bottom, left, right)`` padding (an asymmetric one,
    from ``padding='same'`` with an even kernel, is applied with ``F.pad`` first)."""
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation)
