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
other devices the intermediates follow the input's layout.
"""

from __future__ import annotations

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

__all__ = [
    "TuckerConv2dConfig",
    "TuckerConv2dFunction",
    "tucker_conv2d",
    "tucker_conv2d_flops",
    "tucker_conv2d_kernel",
]

# Below this many output channels an NCHW -> NHWC channel GEMM (whose result is a narrow
# (H*W, o) matrix) was several times slower in MKL than the NCHW GEMM followed by a
# transposing copy of its small result (measured for cp_conv2d, which shares the pattern).
_NHWC_GEMM_MIN_CHANNELS = 16


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


# ----------------------------------------------------------------------------------------------
# Building blocks. Every one is an ordinary differentiable op on its arguments, because the
# backward is built from them and must itself be differentiable (double backward).
# ----------------------------------------------------------------------------------------------


def _is_channels_last(t: torch.Tensor) -> bool:
    # Strictly channels-last: a tensor contiguous in both senses (C == 1 or H*W == 1) takes the
    # NCHW paths, where it is a view just the same.
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _rank_channels_last(x: torch.Tensor) -> bool:
    # See the module docstring: NHWC intermediates on CPU, the input's layout elsewhere.
    return x.device.type == "cpu" or _is_channels_last(x)


def _contract(
    t: torch.Tensor,
    m: torch.Tensor,
    channels_last: bool,
    bias: torch.Tensor | None = None,
    fresh: bool = False,
) -> torch.Tensor:
    """``out[n, o, h, w] = sum_c m[o, c] t[n, c, h, w] (+ bias[o])``, laid out as requested.

    ``t.reshape(n, c, h*w)`` is a view for NCHW and NHWC alike (it only merges ``h`` and
    ``w``), so every layout combination is one (batched) GEMM on views; which layout comes out
    is decided by which operand goes first. ``mm``/``bmm`` rather than ``torch.matmul``: matmul
    picks its strategy from ``requires_grad`` (set on the inputs inside ``Function.forward``)
    and then folds a transposed operand with a copy.

    ``fresh=True`` (the forward's output only, where grad mode is off) writes the GEMM into a
    newly allocated tensor of the final layout instead of returning a view of the GEMM's
    result: a Function output that is a view of a tensor made inside ``forward`` cannot be
    modified in place (``nn.ReLU(inplace=True)`` after the layer would raise).
    """
    n, c, h, w = t.shape
    o = m.shape[0]
    if channels_last and (_is_channels_last(t) or o >= _NHWC_GEMM_MIN_CHANNELS) and fresh:
        y = torch.empty((n, o, h, w), dtype=t.dtype, device=t.device)
        y = y.contiguous(memory_format=torch.channels_last)
        if _is_channels_last(t):
            rows = t.permute(0, 2, 3, 1).reshape(n * h * w, c)
            dst = y.permute(0, 2, 3, 1).view(n * h * w, o)
            if bias is None:
                torch.mm(rows, m.t(), out=dst)
            else:
                torch.addmm(bias, rows, m.t(), out=dst)
        else:
            dst = y.permute(0, 2, 3, 1).view(n, h * w, o)
            t3 = t.reshape(n, c, h * w).transpose(1, 2)
            if bias is None:
                torch.bmm(t3, m.t().expand(n, c, o), out=dst)
            else:
                torch.baddbmm(bias.view(1, 1, o), t3, m.t().expand(n, c, o), out=dst)
        return y
    if channels_last and _is_channels_last(t):
        # NHWC to NHWC: all pixels are rows of one GEMM.
        rows = t.permute(0, 2, 3, 1).reshape(n * h * w, c)
        out = torch.mm(rows, m.t()) if bias is None else torch.addmm(bias, rows, m.t())
        return out.view(n, h, w, o).permute(0, 3, 1, 2)
    t3 = t.reshape(n, c, h * w)
    if channels_last and o >= _NHWC_GEMM_MIN_CHANNELS:
        mt = m.t().expand(n, c, o)
        if bias is None:
            out = torch.bmm(t3.transpose(1, 2), mt)
        else:
            out = torch.baddbmm(bias.view(1, 1, o), t3.transpose(1, 2), mt)
        return out.view(n, h, w, o).permute(0, 3, 1, 2)
    if bias is None:
        out = torch.bmm(m.expand(n, o, c), t3)
    else:
        out = torch.baddbmm(bias.view(1, o, 1), m.expand(n, o, c), t3)
    # _unsafe_view: the same memory without view tracking (see ``fresh`` above).
    out = torch.ops.aten._unsafe_view(out, (n, o, h, w)) if fresh else out.view(n, o, h, w)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _channel_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{n,h,w} a[n, i, h, w] b[n, j, h, w]``: the ``(I, J)`` gradient of a channel GEMM.

    The smaller of ``I``, ``J`` indexes the GEMM's rows (MKL is markedly slower with a narrow
    result); transposing the small result back is free.
    """
    if a.shape[1] > b.shape[1]:
        return _channel_grad(b, a).t()
    n, i, h, w = a.shape
    j = b.shape[1]
    if _is_channels_last(a) and _is_channels_last(b):
        a2 = a.permute(0, 2, 3, 1).reshape(n * h * w, i)
        b2 = b.permute(0, 2, 3, 1).reshape(n * h * w, j)
        return torch.mm(a2.t(), b2)
    # One small (I, J) GEMM per sample, then a sum: views only, whatever the two layouts.
    a3 = a.reshape(n, i, h * w)
    b3 = b.reshape(n, j, h * w)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


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

    @staticmethod
    def forward(
        input: torch.Tensor,
        bias: torch.Tensor | None,
        config: TuckerConv2dConfig,
        core: torch.Tensor,
        in_factor: torch.Tensor,
        out_factor: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rank_cl = _rank_channels_last(input)
        u = _pad_excess(_contract(input, in_factor.t(), rank_cl), config)
        v = F.conv2d(u, core, None, config.stride, config.conv_padding, config.dilation)
        y = _contract(v, out_factor, _is_channels_last(input), bias, fresh=True)
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
        ctx.x_channels_last = _is_channels_last(input)
        ctx.rank_channels_last = _rank_channels_last(input)
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
                grad_out = _channel_grad(grad_y, v)

        # The gradient reaching v: from y through out_factor, plus any that reached the saved
        # v directly (double backward).
        gv = None
        if need_gv and grad_y is not None:
            gv = _contract(grad_y, out_factor.t(), ctx.rank_channels_last)
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
                grad_in = _channel_grad(x, gu)
            if need_x:
                grad_x = _contract(gu, in_factor, ctx.x_channels_last)

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
    return torch.einsum("ob,bahw,ia->oihw", out_factor, core, in_factor)


def tucker_conv2d(
    input: torch.Tensor,
    core: torch.Tensor,
    in_factor: torch.Tensor,
    out_factor: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    r"""2-D convolution with the Tucker-2 kernel ``core ×_0 out_factor ×_1 in_factor``.

    Equal to ``F.conv2d(input, tucker_conv2d_kernel(core, in_factor, out_factor), bias, stride,
    padding, dilation)`` without forming the kernel: a 1x1 convolution ``C_in -> R_in``, the
    ``kh x kw`` core convolution ``R_in -> R_out`` (with the stride, padding and dilation) and
    a 1x1 convolution ``R_out -> C_out`` plus bias, as in Kim et al. (2016) and TensorLy-Torch's
    Tucker ``FactorizedConv``. That is
    ``C_in R_in H_in W_in + (R_in R_out kh kw + R_out C_out) H_out W_out`` multiply-adds per
    sample instead of ``C_out C_in kh kw H_out W_out``. Forward and backward are hand-written
    (:class:`TuckerConv2dFunction`) and twice differentiable.

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
    y, _, _ = apply_autocast(TuckerConv2dFunction, x, bias, config, core, in_factor, out_factor)
    return y.squeeze(0) if unbatched else y


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
