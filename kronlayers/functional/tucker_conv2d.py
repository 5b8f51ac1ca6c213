"""``tucker_conv2d``: a 2-D convolution whose kernel is a Tucker-2 tensor (Kim et al., 2016).

The kernel ``W[o, i, h, w] = sum_{b,a} out_factor[o, b] core[b, a, h, w] in_factor[i, a]`` is
never formed. The convolution runs as the three convolutions of TensorLy-Torch's Tucker
``FactorizedConv``:

1. ``u = in_factor^T x``: a 1x1 convolution ``C_in -> R_in`` (one GEMM over the channels),
2. ``v = conv2d(u, core)``: a dense ``kh x kw`` convolution ``R_in -> R_out`` carrying the
   stride, padding and dilation,
3. ``y = out_factor v + bias``: a 1x1 convolution ``R_out -> C_out`` (one GEMM).

Forward and backward are written by hand (:class:`TuckerConv2dFunction`); the backward is
itself made of differentiable ops, so double backward is exact.

Layout: the input and output keep the caller's memory format (like ``F.conv2d``). On CPU the
rank-channel intermediates ``u`` and ``v`` are channels-last whatever the input's layout:
oneDNN ran the core convolution and its backward about 2x faster on NHWC than on NCHW
(``R = 16..64``, ``3 x 3``), and the layout change costs (almost) nothing because the channel
GEMMs can write either layout (NCHW vs NHWC is only which GEMM operand is transposed). On
other devices the intermediates follow the input's layout (the channel GEMMs are shared with
``cp_conv2d``: :mod:`kronlayers.functional._channels`).

``torch.func`` (``vmap``, ``grad``, ``jacrev``, per-sample gradients) works through
``generate_vmap_rule``: inside a transform the intermediates are NCHW, as the memory format
of functorch tensors cannot be queried. Forward-mode AD raises PyTorch's error asking for a
``jvp`` staticmethod (the dense path, taken at high ranks, supports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._shapes import conv2d_output_size, conv2d_padding
from .._validation import (
    check_bias,
    check_conv2d_extent,
    check_conv2d_input,
    check_int,
    check_like,
    check_pair,
    check_rank,
    check_tensor,
)
from ._amp import _autocast_dtype, apply_autocast
from ._channels import (
    channel_grad,
    contract_channels,
    is_channels_last,
    rank_channels_last,
)
from ._conv_dispatch import (
    choose_conv_path,
    conv_batch,
    conv_call,
    conv_plan,
    dense_conv,
    dense_conv_ops,
    launches,
)
from ._dispatch import Gemm, Op, Pass, PyFunction, call_needs, check_path

__all__ = [
    "TuckerConv2dConfig",
    "TuckerConv2dFunction",
    "tucker_conv2d",
    "tucker_conv2d_flops",
    "tucker_conv2d_kernel",
    "tucker_conv2d_plan",
]


@dataclass(frozen=True)
class TuckerConv2dConfig:
    """The non-tensor arguments of :class:`TuckerConv2dFunction`, already validated.

    Hashable and tensor-free, so that it can be passed through ``Function.apply`` and used as
    a cache / compilation key. The batch size is deliberately not part of it.

    Attributes:
        stride: ``(sh, sw)``, each ``>= 1``.
        padding: resolved zero padding ``(top, bottom, left, right)``; see
            :func:`kronlayers._shapes.conv2d_padding`.
        dilation: ``(dh, dw)``, each ``>= 1``.
    """

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def conv_padding(self) -> tuple[int, int]:
        """The symmetric part of the padding, left to the core convolution (implicit zeros)."""
        top, bottom, left, right = self.padding
        return (min(top, bottom), min(left, right))

    @property
    def excess_padding(self) -> tuple[int, int, int, int]:
        """The rest of the padding, ``(left, right, top, bottom)`` as ``F.pad`` takes it."""
        top, bottom, left, right = self.padding
        ph, pw = self.conv_padding
        return (left - pw, right - pw, top - ph, bottom - ph)


def _pad_excess(u: torch.Tensor, config: TuckerConv2dConfig) -> torch.Tensor:
    # Zero padding commutes with the 1x1 channel contraction, so the asymmetric excess ('same'
    # with an even effective kernel) is applied to the R_in-channel intermediate: a smaller copy
    # than padding the input, and none at all in the symmetric case.
    extra = config.excess_padding
    return F.pad(u, extra) if any(extra) else u


def _crop_excess(grad: torch.Tensor, config: TuckerConv2dConfig) -> torch.Tensor:
    left, right, top, bottom = config.excess_padding
    if not (left or right or top or bottom):
        return grad
    return grad[:, :, top : grad.shape[2] - bottom, left : grad.shape[3] - right]


def _core_conv_backward(
    grad_v: torch.Tensor,
    u: torch.Tensor | None,
    u_shape: torch.Size,
    core: torch.Tensor | None,
    config: TuckerConv2dConfig,
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input and weight gradients of ``F.conv2d(u, core, None, stride, conv_padding, dilation)``.

    ``convolution_backward`` (one oneDNN call for both, and differentiable) when ``u`` was
    saved; otherwise only the input gradient can be asked for, and it is the transposed
    convolution, whose ``output_padding`` restores the rows / columns the stride dropped.
    """
    stride, pad, dilation = config.stride, config.conv_padding, config.dilation
    if need_weight:
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_v, u, core, None, list(stride), list(pad), list(dilation),
            False, [0, 0], 1, [need_input, True, False],
        )  # fmt: skip
        return (gi if need_input else None), gw
    if not need_input:
        return None, None
    kh, kw = core.shape[2:]
    full = [
        (o - 1) * s - 2 * p + d * (k - 1) + 1
        for o, s, p, d, k in zip(grad_v.shape[2:], stride, pad, dilation, (kh, kw), strict=True)
    ]
    out_pad = (u_shape[2] - full[0], u_shape[3] - full[1])
    gi = F.conv_transpose2d(grad_v, core, None, stride, pad, out_pad, 1, dilation)
    return gi, None


# ----------------------------------------------------------------------------------------------
# The autograd Function
# ----------------------------------------------------------------------------------------------


class TuckerConv2dFunction(torch.autograd.Function):
    """Tucker-2 convolution with hand-written forward and backward.

    ``apply(input, bias, config, core, in_factor, out_factor)`` with ``input`` 4-D
    ``(N, C_in, H, W)``, ``bias`` ``(C_out,)`` or ``None``, ``config`` a
    :class:`TuckerConv2dConfig`, ``core`` ``(R_out, R_in, kh, kw)``, ``in_factor``
    ``(C_in, R_in)`` and ``out_factor`` ``(C_out, R_out)``. Returns ``(y, u, v)``: the output,
    and the two rank-channel intermediates ``u = pad(in_factor^T input)`` (only the asymmetric
    part of the padding) and ``v = conv2d(u, core)``. ``u`` and ``v`` are real, differentiable
    outputs: they are returned so that ``setup_context`` can save them (the way to save an
    intermediate in this style), and being outputs of this node keeps double backward exact
    (a gradient reaching a saved ``u`` or ``v`` flows back into this node's ``backward``).
    :func:`tucker_conv2d` drops them.

    What is saved, and why (each only when a gradient that reads it is requested, per
    ``ctx.needs_input_grad``; a frozen layer with a trainable input keeps no activation):

    * ``input``, only for ``in_factor``'s gradient (``sum x ⊗ grad_u``), as ``nn.Conv2d``
      saves its input for the weight gradient;
    * ``u`` (``R_in`` channels at the input resolution, ``R_in / C_in`` times the input's
      memory), only for ``core``'s gradient. Recomputing it would need the input saved anyway
      and redo the ``C_in -> R_in`` GEMM;
    * ``v`` (``R_out`` channels at the output resolution), only for ``out_factor``'s gradient.
      Unlike the depthwise stage of :func:`cp_conv2d`, recomputing ``v`` means rerunning the
      dense core convolution, usually the largest of the three stages, so it is kept;
    * the parameter-sized ``core`` / ``in_factor`` / ``out_factor``, where a gradient passes
      through them (``core`` also for its own gradient: ``convolution_backward`` reads its
      shape).

    So with everything trainable the layer holds ``x``, ``u`` and ``v`` between forward and
    backward: ``1 + R_in / C_in + R_out H_out W_out / (C_in H W)`` times the input, the same
    three activations autograd would keep through the three-convolution pipeline (which also
    keeps the padded copy in the asymmetric case), versus ``1x`` for ``nn.Conv2d``.

    The backward is made of differentiable ops (GEMMs, ``F.pad``/slicing, ``F.conv2d``'s
    ``aten.convolution_backward`` and ``F.conv_transpose2d``, all with derivatives in
    PyTorch), so ``create_graph=True`` gives exact second derivatives.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: torch.Tensor,
        bias: torch.Tensor | None,
        config: TuckerConv2dConfig,
        core: torch.Tensor,
        in_factor: torch.Tensor,
        out_factor: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rank_cl = rank_channels_last(input)
        u = _pad_excess(contract_channels(input, in_factor.t(), rank_cl), config)
        v = F.conv2d(u, core, None, config.stride, config.conv_padding, config.dilation)
        y = contract_channels(v, out_factor, is_channels_last(input), bias, fresh=True)
        return y, u, v

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, bias, config, core, in_factor, out_factor = inputs
        _, u, v = output
        # u and v rarely get a gradient (only in double backward or if a caller uses them):
        # without this autograd would allocate zero tensors of their size on every backward.
        ctx.set_materialize_grads(False)
        need_x, _, _, need_core, need_in, need_out = ctx.needs_input_grad
        need_gu = need_x or need_in  # the gradient must reach u
        need_gv = need_gu or need_core  # ... or at least v
        ctx.save_for_backward(
            input if need_in else None,
            u if need_core else None,
            v if need_out else None,
            core if need_gv else None,
            in_factor if need_x else None,
            out_factor if need_gv else None,
        )
        ctx.config = config
        ctx.has_bias = bias is not None
        ctx.x_channels_last = is_channels_last(input)
        ctx.rank_channels_last = rank_channels_last(input)
        ctx.u_shape = u.shape

    @staticmethod
    def backward(
        ctx,
        grad_y: torch.Tensor | None,
        grad_u: torch.Tensor | None,
        grad_v: torch.Tensor | None,
    ):
        x, u, v, core, in_factor, out_factor = ctx.saved_tensors
        config = ctx.config
        need_x, need_bias, _, need_core, need_in, need_out = ctx.needs_input_grad
        need_gu = need_x or need_in
        need_gv = need_gu or need_core
        grad_x = grad_bias = grad_core = grad_in = grad_out = None

        if grad_y is not None:
            # One copy here for a grad of odd strides (e.g. the expanded one of y.sum()) rather
            # than one in every GEMM that reads it.
            fmt = torch.channels_last if ctx.x_channels_last else torch.contiguous_format
            if not grad_y.is_contiguous(memory_format=fmt):
                grad_y = grad_y.contiguous(memory_format=fmt)
            if need_bias and ctx.has_bias:
                grad_bias = grad_y.sum((0, 2, 3))
            if need_out:
                grad_out = channel_grad(grad_y, v)

        # The gradient reaching v: from y through out_factor, plus any that reached the saved
        # v directly (double backward).
        gv = None
        if need_gv and grad_y is not None:
            gv = contract_channels(grad_y, out_factor.t(), ctx.rank_channels_last)
        if need_gv and grad_v is not None:
            gv = grad_v if gv is None else gv + grad_v

        gu = None
        if gv is not None:
            gu, grad_core = _core_conv_backward(
                gv, u, ctx.u_shape, core, config, need_gu, need_core
            )
        if need_gu and grad_u is not None:
            gu = grad_u if gu is None else gu + grad_u

        if gu is not None:
            gu = _crop_excess(gu, config)
            if need_in:
                grad_in = channel_grad(x, gu)
            if need_x:
                grad_x = contract_channels(gu, in_factor, ctx.x_channels_last)

        return grad_x, grad_bias, None, grad_core, grad_in, grad_out


# ----------------------------------------------------------------------------------------------
# Public functional form
# ----------------------------------------------------------------------------------------------


def _check_factor(name: str, t: object, layout: str, ndim: int) -> torch.Tensor:
    check_tensor(name, t)
    if t.dim() != ndim or 0 in t.shape:
        raise ValueError(
            f"{name} must have shape {layout} with non-zero sizes, got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _check_ranks(core: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor) -> None:
    if core.shape[1] != in_factor.shape[1]:
        raise ValueError(
            f"in_factor must have core's input rank R_in = core.shape[1] = {core.shape[1]} "
            f"columns, got in_factor of shape {tuple(in_factor.shape)}"
        )
    if core.shape[0] != out_factor.shape[1]:
        raise ValueError(
            f"out_factor must have core's output rank R_out = core.shape[0] = {core.shape[0]} "
            f"columns, got out_factor of shape {tuple(out_factor.shape)}"
        )


_CORE = "(R_out, R_in, kh, kw)"
_IN = "(C_in, R_in)"
_OUT = "(C_out, R_out)"


def tucker_conv2d_kernel(
    core: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor
) -> torch.Tensor:
    """The dense ``(C_out, C_in, kh, kw)`` kernel of a Tucker-2 convolution (differentiable).

    ``W[o, i, h, w] = sum_{b,a} out_factor[o, b] core[b, a, h, w] in_factor[i, a]``, i.e.
    ``core`` multiplied by ``out_factor`` along mode 0 and by ``in_factor`` along mode 1.
    """
    _check_factor("core", core, _CORE, 4)
    _check_factor("in_factor", in_factor, _IN, 2)
    _check_factor("out_factor", out_factor, _OUT, 2)
    _check_ranks(core, in_factor, out_factor)
    # Two GEMMs, no einsum path search: out_factor (C_out, R_out) @ core (R_out, R_in*kh*kw),
    # then in_factor (C_in, R_in) @ each output channel's (R_in, kh*kw) slice.
    r_out, r_in, kh, kw = core.shape
    g = (out_factor @ core.reshape(r_out, r_in * kh * kw)).view(-1, r_in, kh * kw)
    return torch.matmul(in_factor, g).view(-1, in_factor.shape[0], kh, kw)


def tucker_conv2d(
    input: torch.Tensor,
    core: torch.Tensor,
    in_factor: torch.Tensor,
    out_factor: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    *,
    path: str | None = None,
) -> torch.Tensor:
    r"""2-D convolution with the Tucker-2 kernel ``core ×_0 out_factor ×_1 in_factor``.

    Equal to ``F.conv2d(input, tucker_conv2d_kernel(core, in_factor, out_factor), bias, stride,
    padding, dilation)`` without forming the kernel: a 1x1 convolution ``C_in -> R_in``, the
    ``kh x kw`` core convolution ``R_in -> R_out`` (with the stride, padding and dilation) and
    a 1x1 convolution ``R_out -> C_out`` plus bias, as in Kim et al. (2016) and TensorLy-Torch's
    Tucker ``FactorizedConv``. That is
    ``C_in R_in H_in W_in + (R_in R_out kh kw + R_out C_out) H_out W_out`` multiply-adds per
    sample instead of ``C_out C_in kh kw H_out W_out``. Forward and backward are hand-written
    (:class:`TuckerConv2dFunction`) and twice differentiable. When the ranks are so high
    that forming the kernel and running one ``F.conv2d`` is clearly faster (the cost model
    of :mod:`kronlayers.functional._dispatch`, see :func:`tucker_conv2d_plan`), that dense
    path runs instead, so the layer is never much slower than the convolution it replaces.

    Args:
        input: ``(N, C_in, H_in, W_in)`` or unbatched ``(C_in, H_in, W_in)``; ``N = 0`` is
            allowed.
        core: ``(R_out, R_in, kh, kw)``, the core kernel.
        in_factor: ``(C_in, R_in)``, the input-channel factor.
        out_factor: ``(C_out, R_out)``, the output-channel factor.
        bias: optional ``(C_out,)``.
        stride, dilation: an int or an ``(h, w)`` pair of positive ints. Default: 1.
        padding: an int or an ``(h, w)`` pair of non-negative ints (zeros on both sides),
            ``'valid'`` (none) or ``'same'`` (stride 1 only; an odd total goes to the bottom /
            right, as in ``F.conv2d``). For other padding modes pad the input with ``F.pad``
            first. Default: 0.
        path: ``None`` (automatic), ``"factorized"`` or ``"dense"``; overrides
            :func:`~kronlayers.functional._dispatch.force_kernel` and
            :func:`~kronlayers.functional._dispatch.force_path`.

    Every tensor must share the input's device (``ValueError``) and dtype (``TypeError``;
    under autocast all are cast to the autocast dtype instead). Arguments of the wrong type
    raise ``TypeError``, of the wrong value or shape ``ValueError``, naming the argument.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in} + p_{top} + p_{bottom} - \text{dilation}[0]
              \times (kh - 1) - 1}{\text{stride}[0]} + 1\right\rfloor

          and likewise :math:`W_{out}` with ``kw``, :math:`p_{left}`, :math:`p_{right}`,
          ``stride[1]``, ``dilation[1]``.

    The output has the input's memory format (channels-last in, channels-last out).

    Example::

        >>> core = torch.randn(6, 4, 3, 3)  # R_out = 6, R_in = 4
        >>> in_factor, out_factor = torch.randn(8, 4), torch.randn(16, 6)
        >>> x = torch.randn(2, 8, 10, 10)
        >>> y = tucker_conv2d(x, core, in_factor, out_factor, padding=1)
        >>> y.shape
        torch.Size([2, 16, 10, 10])
        >>> w = tucker_conv2d_kernel(core, in_factor, out_factor)  # (16, 8, 3, 3)
        >>> torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4)
        True
    """
    path = check_path(path)
    check_tensor("input", input)
    _check_factor("core", core, _CORE, 4)
    _check_factor("in_factor", in_factor, _IN, 2)
    _check_factor("out_factor", out_factor, _OUT, 2)
    _check_ranks(core, in_factor, out_factor)
    check_conv2d_input(input, in_factor.shape[0], "C_in = in_factor.shape[0]")
    # Under autocast apply_autocast casts every floating tensor to one dtype: only the devices
    # have to agree beforehand.
    autocast = _autocast_dtype(input.device.type) is not None
    for name, t in (("core", core), ("in_factor", in_factor), ("out_factor", out_factor)):
        check_like(name, t, input, autocast=autocast)
    check_bias(bias, out_factor.shape[0], input, autocast=autocast)

    kernel_size = (core.shape[2], core.shape[3])
    stride = check_pair("stride", stride, 1)
    dilation = check_pair("dilation", dilation, 1)
    pads = conv2d_padding(padding, kernel_size, stride, dilation)
    check_conv2d_extent(input, pads, kernel_size, dilation)
    config = TuckerConv2dConfig(stride=stride, padding=pads, dilation=dilation)

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    needs = call_needs(x, (core, in_factor, out_factor), bias)
    factorized, dense = _path_ops(
        conv_batch(x.shape[0]), in_factor.shape[0], out_factor.shape[0], core.shape,
        (x.shape[2], x.shape[3]), config, needs,
    )  # fmt: skip
    if choose_conv_path(factorized, dense, x.dtype.itemsize, x.device.type, path) == "dense":
        weight = tucker_conv2d_kernel(core, in_factor, out_factor)
        y = dense_conv(x, weight, bias, stride, pads, dilation)
    else:
        y, _, _ = apply_autocast(TuckerConv2dFunction, x, bias, config, core, in_factor, out_factor)
    return y.squeeze(0) if unbatched else y


def _path_ops(n, c_in, c_out, core_shape, size, config, needs) -> tuple[list[Op], list[Op]]:
    """The factorized and dense paths' ops for ``n`` samples of spatial ``size``."""
    r_out, r_in, kh, kw = core_shape
    h_out, w_out = conv2d_output_size(size, (kh, kw), config.stride, config.padding,
                                      config.dilation)  # fmt: skip
    p_in, p_out, taps = size[0] * size[1], h_out * w_out, kh * kw
    need_x, need_factors, need_bias = needs
    fact: list[Op] = [
        PyFunction(any(needs)), *launches(6), *conv_call(),
        Gemm(n * p_in, r_in, c_in), Gemm(n * p_out, r_out, r_in * taps),
        Gemm(n * p_out, c_out, r_out),
    ]  # fmt: skip
    if need_x or need_factors:  # each stage's input gradient, back to the one needed
        fact += [Gemm(n * p_out, r_out, c_out), Gemm(n * p_in, r_in * taps, r_out)]
        fact += [*launches(6), *conv_call()]
    if need_x:
        fact.append(Gemm(n * p_in, c_in, r_in))
    if need_factors:  # each stage's weight gradient
        fact += [
            Gemm(c_out, r_out, n * p_out), Gemm(r_out, r_in * taps, n * p_out),
            Gemm(r_in, c_in, n * p_in),
        ]  # fmt: skip
    if need_bias:
        fact.append(Pass(n * c_out * p_out))
    form = [*launches(3), Gemm(c_out, r_in * taps, r_out), Gemm(c_out * taps, c_in, r_in)]
    form_grad = [Gemm(c_out * taps, r_in, c_in), Gemm(r_out, r_in * taps, c_out)]
    dense = dense_conv_ops(n, c_in, c_out, taps, p_in, p_out, form, form_grad, needs)
    return fact, dense


def tucker_conv2d_plan(
    core_shape: Sequence[int],
    in_channels: int,
    out_channels: int,
    input_shape: Sequence[int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    *,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    input_grad: bool = False,
    factor_grad: bool = True,
    bias: bool = True,
    path: str | None = None,
) -> dict:
    """What :func:`tucker_conv2d` does for an input of ``input_shape`` (``(N, C, H, W)`` or
    ``(C, H, W)``): ``path`` (``"factorized"`` or ``"dense"``) and ``seconds`` (the cost
    model's estimate of each path, forward plus the backward the gradient flags imply;
    ``factor_grad`` also stands for the bias). A symbolic batch counts as
    :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` samples."""
    core_shape = tuple(int(v) for v in core_shape)
    stride = check_pair("stride", stride, 1)
    dilation = check_pair("dilation", dilation, 1)
    pads = conv2d_padding(padding, core_shape[2:], stride, dilation)
    config = TuckerConv2dConfig(stride=stride, padding=pads, dilation=dilation)
    return conv_plan(
        lambda n, size, needs: _path_ops(n, in_channels, out_channels, core_shape, size,
                                         config, needs),
        input_shape, dtype, device_type, (input_grad, factor_grad, factor_grad and bias), path,
    )  # fmt: skip


def tucker_conv2d_flops(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    rank: tuple[int, int],
    input_size: tuple[int, int],
    batch: int = 1,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> int:
    """Forward FLOPs (2 per multiply-add, bias excluded) of :func:`tucker_conv2d`.

    ``2 N (C_in R_in H W + R_out R_in kh kw H_out W_out + R_out C_out H_out W_out)``: the
    input GEMM runs at the input resolution, the core convolution and the output GEMM at the
    output one. Compare ``2 N C_out C_in kh kw H_out W_out`` for ``F.conv2d``. The backward
    costs about twice the forward (two products per forward product, fewer for frozen
    tensors).

    Args:
        in_channels, out_channels: ``C_in``, ``C_out``.
        kernel_size: ``kh``/``kw``, an int or a pair.
        rank: ``(R_in, R_out)``, or one int for both.
        input_size: ``(H, W)``.
        batch: ``N``.
        stride, padding, dilation: as for :func:`tucker_conv2d`.
    """
    c_in = check_int("in_channels", in_channels, minimum=1)
    c_out = check_int("out_channels", out_channels, minimum=1)
    n = check_int("batch", batch, minimum=0)
    r = check_rank(rank, allow_float=False, parts=2)
    r_in, r_out = (r, r) if isinstance(r, int) else r
    k = check_pair("kernel_size", kernel_size, 1)
    s = check_pair("stride", stride, 1)
    d = check_pair("dilation", dilation, 1)
    h, w = check_pair("input_size", input_size, 1)
    pads = conv2d_padding(padding, k, s, d)
    h_out, w_out = conv2d_output_size((h, w), k, s, pads, d)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"input_size={(h, w)} with padding {pads} is smaller than the dilated kernel "
            f"extent {(d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)}"
        )
    out_pixels = h_out * w_out
    per_sample = c_in * r_in * h * w + (r_out * r_in * k[0] * k[1] + r_out * c_out) * out_pixels
    return 2 * n * per_sample
