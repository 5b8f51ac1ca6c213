"""``cp_conv2d``: a 2-D convolution whose kernel is a CP (CANDECOMP/PARAFAC) tensor.

The kernel is never formed. With ``K_in = in_1 ⊙ ... ⊙ in_D`` and ``K_out = out_1 ⊙ ... ⊙ out_D``
(row-major Khatri-Rao products, ``(C_in, R)`` and ``(C_out, R)``), the convolution is

1. ``u = K_in^T x``: contract the input channels to ``R`` (one GEMM over the channel axis),
2. ``v = depthwise_conv(u)``: each of the ``R`` channels is convolved with its own rank-one
   ``kh x kw`` kernel ``kh_factor[:, r] ∘ kw_factor[:, r]`` (``groups=R``),
3. ``y = K_out v + bias``: expand ``R`` to the output channels (one GEMM).

Departures from the textbook "``kh x 1`` conv then ``1 x kw`` conv" pipeline, each measured on
CPU (``benchmarks/bench_cp_conv2d.py --stages``; numbers in
``benchmarks/results/cp_conv2d_cpu.md``):

* The two 1-D depthwise convolutions are fused into one ``kh x kw`` depthwise convolution whose
  per-channel kernel is the rank-one outer product (the gradient is chained back to the two
  factors by hand). It costs ``kh*kw`` instead of ``kh + kw`` multiply-adds per output, but it
  is one pass over memory instead of two and one intermediate fewer; with oneDNN it was as
  fast or up to 1.7x faster than the pair.
* On CPU the ``R``-channel intermediates are channels-last (NHWC): oneDNN's depthwise
  convolution was 1.5-2x faster on NHWC than on NCHW, and up to 10x with glibc's default
  allocator (its NCHW path allocates reorder buffers, i.e. page faults). The channel
  contractions read and write NHWC at GEMM speed (NHWC vs NCHW is only which GEMM operand is
  transposed), except that a GEMM with a narrow ``(H*W, R)`` output is slow for small ``R``:
  there the NCHW GEMM plus a transposing copy of the small result is used. On CUDA the
  intermediates follow the input's layout. Input and output keep the caller's memory format
  (like ``F.conv2d``).
* For stride 1 the depthwise input gradient is the forward convolution with the flipped
  kernel, up to 1.8x faster than oneDNN's backward-data pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._shapes import check_tensor, prod
from ._amp import _autocast_dtype, apply_autocast

__all__ = [
    "CPConv2dFunction",
    "conv2d_padding",
    "cp_conv2d",
    "cp_conv2d_flops",
    "cp_conv2d_kernel",
    "khatri_rao",
    "pair_arg",
]

# Channel count from which an NCHW -> NHWC channel contraction is one GEMM with an (HW, o)
# output; below it the narrow output makes MKL several times slower (7x at o = 8), and the NCHW
# GEMM plus a transposing copy of the (small) result is faster.
_NHWC_GEMM_MIN_CHANNELS = 16

_PADDING_STRINGS = ("same", "valid")


# ----------------------------------------------------------------------------------------------
# Argument normalisation (shared with kronlayers.modules.cp_conv2d)
# ----------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def pair_arg(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` as an ``(h, w)`` pair of ints ``>= minimum``; ``ValueError`` naming ``name``."""
    if _is_int(value):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not all(_is_int(v) for v in pair):
        raise ValueError(f"{name} must contain ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def conv2d_padding(
    padding: object,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Resolve a ``padding`` argument to ``(top, bottom, left, right)`` zero padding.

    Accepts what ``nn.Conv2d`` accepts: an int, an ``(h, w)`` pair, ``'valid'`` (no padding) or
    ``'same'`` (output size = input size; stride 1 only). For ``'same'`` the total padding
    ``dilation * (k - 1)`` is split like ``F.conv2d`` does it: the extra element of an odd total
    (even kernels) goes to the bottom / right.
    """
    if isinstance(padding, str):
        if padding not in _PADDING_STRINGS:
            raise ValueError(
                f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
            )
        if padding == "valid":
            return (0, 0, 0, 0)
        if stride != (1, 1):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions (stride={stride})"
            )
        out = []
        for d, k in zip(dilation, kernel_size, strict=True):
            total = d * (k - 1)
            out.extend((total // 2, total - total // 2))
        return (out[0], out[1], out[2], out[3])
    ph, pw = pair_arg("padding", padding, 0)
    return (ph, ph, pw, pw)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


def khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-major Khatri-Rao product of factors ``(d_k, R)``: ``(prod d_k, R)``.

    Row ``(i_1, ..., i_D)`` (``i_1`` slowest) of the result is ``prod_k factors[k][i_k, :]``, so
    reshaping it to ``(d_1, ..., d_D, R)`` gives the CP tensor's mode-wise factors back.
    """
    out = factors[0]
    for f in factors[1:]:
        out = (out.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, f.shape[1])
    return out


def _khatri_rao_grads(
    grad: torch.Tensor, factors: Sequence[torch.Tensor], needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Gradients of ``<grad, khatri_rao(factors)>`` w.r.t. each factor (parameter-sized work)."""
    if len(factors) == 1:
        return [grad if needs[0] else None]
    letters = "abcdefghijklmnopqrstuvwxy"[: len(factors)]
    g = grad.reshape(*(f.shape[0] for f in factors), grad.shape[1])
    out: list[torch.Tensor | None] = []
    for k, need in enumerate(needs):
        if not need:
            out.append(None)
            continue
        others = [j for j in range(len(factors)) if j != k]
        spec = f"{letters}z," + ",".join(f"{letters[j]}z" for j in others) + f"->{letters[k]}z"
        out.append(torch.einsum(spec, g, *(factors[j] for j in others)))
    return out


def cp_conv2d_kernel(
    in_factors: Sequence[torch.Tensor],
    out_factors: Sequence[torch.Tensor],
    kernel_factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The dense ``(C_out, C_in, kh, kw)`` kernel of a CP convolution (differentiable).

    It is the CP tensor ``(out_1..out_D, in_1..in_D, kh, kw)`` reshaped row-major.
    """
    kh, kw = kernel_factors
    return torch.einsum(
        "or,ir,hr,wr->oihw", khatri_rao(out_factors), khatri_rao(in_factors), kh, kw
    )


def _depthwise_kernel(kh: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:
    # (R, 1, kh, kw): channel r's kernel is the outer product kh[:, r] ∘ kw[:, r].
    # Contiguous: the einsum result is laid out (kh, kw, R), which convolutions would reorder.
    return torch.einsum("ir,jr->rij", kh, kw).unsqueeze(1).contiguous()


def _is_channels_last(t: torch.Tensor) -> bool:
    # Strictly channels-last: a tensor that is contiguous in both senses (C == 1 or H*W == 1)
    # is handled by the NCHW branch, where it is equally a view.
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _contract_channels(
    t: torch.Tensor, m: torch.Tensor, channels_last: bool, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[n, o, h, w] = sum_c m[o, c] t[n, c, h, w] (+ bias[o])`` in the requested layout.

    Each layout combination is one (batched) GEMM: NCHW and NHWC only differ by which GEMM
    operand is transposed, which BLAS handles without copies. ``bmm``/``mm`` are called
    directly because ``torch.matmul`` picks its strategy from ``requires_grad`` (still set on
    the inputs inside ``Function.forward``) and then folds a transposed operand with a copy.
    """
    n, c, h, w = t.shape
    o = m.shape[0]
    if _is_channels_last(t):
        t2 = t.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
        if channels_last:
            out = torch.mm(t2, m.t()) if bias is None else torch.addmm(bias, t2, m.t())
            return out.view(n, h, w, o).permute(0, 3, 1, 2)
        t3 = t2.view(n, h * w, c).transpose(1, 2)
    else:
        t3 = t.reshape(n, c, h * w)
        if channels_last and o >= _NHWC_GEMM_MIN_CHANNELS:
            out = torch.bmm(t3.transpose(1, 2), m.t().expand(n, c, o))
            if bias is not None:
                out += bias
            return out.view(n, h, w, o).permute(0, 3, 1, 2)
    if bias is None:
        out = torch.bmm(m.expand(n, o, c), t3)
    else:
        out = torch.baddbmm(bias.view(1, o, 1), m.expand(n, o, c), t3)
    out = out.view(n, o, h, w)
    if channels_last:
        # Few output channels: the NCHW GEMM plus a transposing copy of the small result is
        # several times faster than a GEMM with a narrow (H*W, o) output.
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _channel_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{n,h,w} a[n, i, h, w] b[n, j, h, w]``: ``(I, J)``, the gradient of a channel GEMM.

    The GEMM is oriented so that the smaller of ``I``, ``J`` indexes the result's rows (MKL is
    about 3x slower with a narrow result at R = 8); transposing the small result is free.
    """
    if a.shape[1] > b.shape[1]:
        return _channel_grad(b, a).t()
    if _is_channels_last(a) and _is_channels_last(b):
        a2 = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        b2 = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1])
        return torch.mm(a2.t(), b2)
    # One small (I, J) GEMM per sample, then a sum: no (N*HW)-sized copy of either operand.
    n = a.shape[0]
    a3 = a.reshape(n, a.shape[1], -1)
    b3 = b.reshape(n, b.shape[1], -1)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


class CPConv2dFunction(torch.autograd.Function):
    """CP convolution with a hand-written backward (see :func:`cp_conv2d` for the maths).

    ``apply(x, bias, kh_factor, kw_factor, stride, padding, dilation, n_in, *in_factors,
    *out_factors)`` with ``x`` 4-D, ``stride``/``dilation`` pairs and ``padding`` a resolved
    ``(top, bottom, left, right)`` tuple. Returns ``(y, u)``; ``u`` (the rank-``R`` projection of
    the input, zero-padded) is returned only so that it can be saved for backward (the
    ``setup_context`` way of saving an intermediate) and is not differentiable.

    What is saved, and why:

    * the input ``x`` (only if an input-channel factor needs a gradient), as ``nn.Conv2d``
      does, for the input factors' gradient;
    * ``u``, the input projected to ``R`` channels (only if a kernel or output-channel factor
      needs a gradient); it is what the depthwise convolution reads. It costs ``R / C_in``
      times the input's memory, and keeping it avoids recomputing the ``C_in -> R`` GEMM in
      the backward (about half of the forward's FLOPs when ``C_in ~ C_out``: the two GEMMs
      dominate);
    * not ``v``, the depthwise convolution's output: the backward recomputes it from ``u``
      for the output factors' gradient, a ``kh*kw`` per-element depthwise convolution that is
      far cheaper than storing another ``R``-channel activation across the whole
      forward/backward interval.

    So between forward and backward the layer holds ``(1 + R / C_in)`` times its input, versus
    ``1x`` for ``nn.Conv2d`` and about ``(1 + 4 R / C_in)x`` for autograd through the same
    pipeline (TensorLy-Torch's 'factorized' CP convolution). During the backward, up to three
    ``R``-channel tensors are alive at once (``u``, the gradients of ``v`` and of ``u``), so for
    ``R > C_in`` the transient peak exceeds a dense convolution's.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        bias: torch.Tensor | None,
        kh_factor: torch.Tensor,
        kw_factor: torch.Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int, int, int],
        dilation: tuple[int, int],
        n_in: int,
        *factors: torch.Tensor,
    ):
        rank = kh_factor.shape[1]
        k_in = khatri_rao(factors[:n_in])
        k_out = khatri_rao(factors[n_in:])
        rank_cl = _rank_channels_last(x)
        u = _contract_channels(x, k_in.t(), rank_cl)
        u, conv_pad = _pad_asymmetric(u, padding)
        kernel = _depthwise_kernel(kh_factor, kw_factor)
        v = F.conv2d(u, kernel, None, stride, conv_pad, dilation, rank)
        y = _contract_channels(v, k_out, _is_channels_last(x), bias)
        return y, u

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, bias, kh, kw, stride, padding, dilation, n_in, *factors = inputs
        _, u = output
        ctx.mark_non_differentiable(u)
        # u's gradient is always absent; without this autograd would allocate a zero tensor
        # of u's size for it on every backward.
        ctx.set_materialize_grads(False)
        needs = ctx.needs_input_grad
        need_in = any(needs[8 : 8 + n_in])
        need_u = needs[2] or needs[3] or any(needs[8 + n_in :])
        # Save only what the requested gradients read (a frozen layer keeps nothing big).
        ctx.save_for_backward(x if need_in else None, u if need_u else None, kh, kw, *factors)
        ctx.conf = (stride, padding, dilation, n_in, bias is not None)
        ctx.x_channels_last = _is_channels_last(x)
        ctx.u_shape = u.shape
        ctx.u_channels_last = _is_channels_last(u)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor, _grad_u: torch.Tensor | None):
        x, u, kh, kw, *factors = ctx.saved_tensors
        stride, padding, dilation, n_in, has_bias = ctx.conf
        if grad_y is None:  # (grads are not materialized) nothing flows back
            return (None,) * (8 + len(factors))
        in_factors, out_factors = factors[:n_in], factors[n_in:]
        needs = ctx.needs_input_grad
        need_x, need_bias, need_kh, need_kw = needs[0], needs[1], needs[2], needs[3]
        need_in, need_out = needs[8 : 8 + n_in], needs[8 + n_in :]
        rank = kh.shape[1]
        conv_pad = _conv_padding(padding)

        # A grad of unusual strides (e.g. the expanded one of `y.sum()`) becomes a plain layout
        # once here instead of in every GEMM below.
        if not (grad_y.is_contiguous() or grad_y.is_contiguous(memory_format=torch.channels_last)):
            fmt = torch.channels_last if ctx.x_channels_last else torch.contiguous_format
            grad_y = grad_y.contiguous(memory_format=fmt)

        grad_x = grad_bias = grad_kh = grad_kw = None
        grad_in: list[torch.Tensor | None] = [None] * n_in
        grad_out: list[torch.Tensor | None] = [None] * len(out_factors)

        if has_bias and need_bias:
            grad_bias = grad_y.sum((0, 2, 3))

        kernel = _depthwise_kernel(kh, kw)
        k_out = khatri_rao(out_factors)
        if any(need_out):
            v = F.conv2d(u, kernel, None, stride, conv_pad, dilation, rank)  # recomputed
            grad_out = _khatri_rao_grads(_channel_grad(grad_y, v), out_factors, need_out)
            del v

        need_u_grad = need_x or any(need_in)
        if need_u_grad or need_kh or need_kw:
            grad_v = _contract_channels(grad_y, k_out.t(), ctx.u_channels_last)
            grad_u, grad_kernel = _depthwise_backward(
                grad_v, u, ctx.u_shape, kernel, stride, conv_pad, dilation,
                need_u_grad, need_kh or need_kw,
            )  # fmt: skip
            del grad_v
            if need_kh or need_kw:
                gk = grad_kernel[:, 0]  # (R, kh, kw); the chain rule through the outer product
                grad_kh = torch.einsum("rij,jr->ir", gk, kw) if need_kh else None
                grad_kw = torch.einsum("rij,ir->jr", gk, kh) if need_kw else None
            if need_u_grad:
                grad_u = _crop_asymmetric(grad_u, padding)
                if any(need_in):
                    grad_in = _khatri_rao_grads(_channel_grad(x, grad_u), in_factors, need_in)
                if need_x:
                    k_in = khatri_rao(in_factors)
                    grad_x = _contract_channels(grad_u, k_in, ctx.x_channels_last)

        return (
            grad_x,
            grad_bias,
            grad_kh,
            grad_kw,
            None,
            None,
            None,
            None,
            *grad_in,
            *grad_out,
        )


def _depthwise_backward(
    grad_v: torch.Tensor,
    u: torch.Tensor | None,
    u_shape: torch.Size,
    kernel: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    need_input: bool,
    need_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Input and weight gradients of ``F.conv2d(u, kernel, None, stride, padding, dilation, R)``."""
    rank = kernel.shape[0]
    grad_u = grad_kernel = None
    flip_pad = [
        d * (k - 1) - p for d, k, p in zip(dilation, kernel.shape[2:], padding, strict=True)
    ]
    if need_input and stride == (1, 1) and min(flip_pad) >= 0:
        # Unstrided: the input gradient is the forward convolution with the flipped kernel,
        # which oneDNN runs up to ~1.8x faster than its depthwise backward-data pass.
        grad_u = F.conv2d(grad_v, kernel.flip(2, 3), None, 1, flip_pad, dilation, rank)
        need_input = False
    if need_input or need_weight:
        # convolution_backward only reads the input's shape when the weight gradient is not
        # requested, which is when u was not saved.
        u_arg = u if u is not None else grad_v.new_empty(1).expand(u_shape)
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_v, u_arg, kernel, None, list(stride), list(padding), list(dilation),
            False, [0, 0], rank, [need_input, need_weight, False],
        )  # fmt: skip
        grad_u = gi if need_input else grad_u
        grad_kernel = gw
    return grad_u, grad_kernel


def _rank_channels_last(x: torch.Tensor) -> bool:
    # On CPU oneDNN's depthwise convolution is 1.5-10x faster on NHWC than on NCHW at every
    # rank (see the module docstring); on CUDA keep the input's layout.
    return x.device.type == "cpu" or _is_channels_last(x)


def _conv_padding(padding: tuple[int, int, int, int]) -> tuple[int, int]:
    # The symmetric part of the padding, left to the convolution itself (implicit zeros).
    top, bottom, left, right = padding
    return (min(top, bottom), min(left, right))


def _pad_asymmetric(
    u: torch.Tensor, padding: tuple[int, int, int, int]
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Explicitly zero-pad the asymmetric excess; return ``(u, symmetric conv padding)``.

    Zero padding commutes with the channel contraction, so it is applied to the ``R``-channel
    ``u`` rather than to the ``C_in``-channel input: a smaller copy, and only for the asymmetric
    case ('same' with an even effective kernel).
    """
    top, bottom, left, right = padding
    sym = _conv_padding(padding)
    extra = (left - sym[1], right - sym[1], top - sym[0], bottom - sym[0])
    if any(extra):
        u = F.pad(u, extra)
    return u, sym


def _crop_asymmetric(grad: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = padding
    sym = _conv_padding(padding)
    t, b, le, r = top - sym[0], bottom - sym[0], left - sym[1], right - sym[1]
    if not (t or b or le or r):
        return grad
    return grad[:, :, t : grad.shape[2] - b, le : grad.shape[3] - r]


# ----------------------------------------------------------------------------------------------
# Public functional form
# ----------------------------------------------------------------------------------------------


def _check_factor_list(name: str, factors: object) -> list[torch.Tensor]:
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(factors).__name__}")
    if len(factors) == 0:
        raise ValueError(f"{name} must hold at least one factor")
    for k, f in enumerate(factors):
        check_tensor(f"{name}[{k}]", f)
        if f.dim() != 2:
            raise ValueError(f"{name}[{k}] must have shape (d_{k}, rank), got {tuple(f.shape)}")
    return list(factors)


def cp_conv2d(
    input: torch.Tensor,
    in_factors: Sequence[torch.Tensor],
    out_factors: Sequence[torch.Tensor],
    kernel_factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    r"""2-D convolution with the CP kernel ``sum_r out[:, r] ∘ in[:, r] ∘ kh[:, r] ∘ kw[:, r]``.

    Equal to ``F.conv2d(input, cp_conv2d_kernel(in_factors, out_factors, kernel_factors), bias,
    stride, padding, dilation)`` without forming the kernel: the input channels are contracted
    to ``R``, each of the ``R`` channels is convolved with its rank-one ``kh x kw`` kernel
    (depthwise), and ``R`` is expanded to the output channels. About
    ``R * (C_in + kh*kw + C_out * H_out W_out / (H_in W_in))`` multiply-adds per input pixel
    instead of ``C_in * C_out * kh * kw`` per output pixel. Forward and backward are hand-written
    (:class:`CPConv2dFunction`).

    Channels may be tensorized: with ``D`` input factors of shapes ``(in_d, R)``, the input
    channel factor is their row-major Khatri-Rao product (``C_in = prod_d in_d``), i.e. the
    dense kernel is the CP tensor ``(out_1..out_E, in_1..in_D, kh, kw)`` reshaped to
    ``(C_out, C_in, kh, kw)``.

    Args:
        input: ``(N, C_in, H_in, W_in)`` or unbatched ``(C_in, H_in, W_in)``.
        in_factors: ``D >= 1`` tensors ``(in_d, R)`` with ``prod_d in_d = C_in``.
        out_factors: ``E >= 1`` tensors ``(out_e, R)`` with ``prod_e out_e = C_out``.
        kernel_factors: ``(kh_factor, kw_factor)`` of shapes ``(kh, R)`` and ``(kw, R)``.
        bias: optional ``(C_out,)``.
        stride, dilation: an int or an ``(h, w)`` pair of positive ints.
        padding: an int or an ``(h, w)`` pair of non-negative ints (zeros on both sides),
            ``'valid'`` (none) or ``'same'`` (stride 1 only; an odd total goes bottom/right, as
            in ``F.conv2d``). For other padding modes pad the input with ``F.pad`` first.

    Shape:
        - Input: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``
        - Output: ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)`` where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in} + p_{top} + p_{bottom} - \text{dilation}[0]
              \times (kh - 1) - 1}{\text{stride}[0]} + 1\right\rfloor

          and likewise ``W_out`` with ``kw``, ``p_left``, ``p_right``, ``stride[1]``,
          ``dilation[1]``.

    The output has the input's memory format (channels-last in, channels-last out).

    Example::

        >>> r = 4
        >>> ins, outs = [torch.randn(8, r)], [torch.randn(16, r)]
        >>> ks = (torch.randn(3, r), torch.randn(3, r))
        >>> x = torch.randn(2, 8, 10, 10)
        >>> y = cp_conv2d(x, ins, outs, ks, padding=1)
        >>> w = cp_conv2d_kernel(ins, outs, ks)  # (16, 8, 3, 3)
        >>> torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-4)
        True
    """
    check_tensor("input", input)
    in_factors = _check_factor_list("in_factors", in_factors)
    out_factors = _check_factor_list("out_factors", out_factors)
    if isinstance(kernel_factors, torch.Tensor) or not isinstance(kernel_factors, Sequence):
        raise TypeError("kernel_factors must be a pair (kh_factor, kw_factor) of tensors")
    if len(kernel_factors) != 2:
        raise ValueError(
            f"kernel_factors must be a pair (kh_factor, kw_factor), got {len(kernel_factors)} "
            "tensors"
        )
    kh_factor, kw_factor = kernel_factors
    for name, f in (("kernel_factors[0]", kh_factor), ("kernel_factors[1]", kw_factor)):
        check_tensor(name, f)
        if f.dim() != 2:
            raise ValueError(f"{name} must have shape (k, rank), got {tuple(f.shape)}")

    # Under autocast apply_autocast casts everything to one dtype; only devices must agree.
    autocast = _autocast_dtype(input.device.type) is not None
    named = [(f"in_factors[{k}]", f) for k, f in enumerate(in_factors)]
    named += [(f"out_factors[{k}]", f) for k, f in enumerate(out_factors)]
    named += [("kernel_factors[0]", kh_factor), ("kernel_factors[1]", kw_factor)]
    rank = kh_factor.shape[1]
    if rank < 1:
        raise ValueError(f"the factors must have rank >= 1 (dim 1), got {rank}")
    for name, f in named:
        if f.shape[1] != rank:
            raise ValueError(
                f"all factors must share the rank (dim 1): kernel_factors[0] has {rank}, "
                f"{name} has {f.shape[1]}"
            )
        if f.device != input.device or (f.dtype != input.dtype and not autocast):
            raise ValueError(
                f"{name} ({f.dtype}, {f.device}) must have the input's dtype and device "
                f"({input.dtype}, {input.device})"
            )

    c_in = prod(f.shape[0] for f in in_factors)
    c_out = prod(f.shape[0] for f in out_factors)
    if input.dim() not in (3, 4) or input.shape[-3] != c_in:
        raise ValueError(
            f"input must have shape (N, {c_in}, H, W) or ({c_in}, H, W) (C_in = the product "
            f"of the in_factors' sizes), got {tuple(input.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape ({c_out},), got {tuple(bias.shape)}")
        if bias.device != input.device or (bias.dtype != input.dtype and not autocast):
            raise ValueError("bias must have the input's dtype and device")

    kernel_size = (kh_factor.shape[0], kw_factor.shape[0])
    stride = pair_arg("stride", stride, 1)
    dilation = pair_arg("dilation", dilation, 1)
    pads = conv2d_padding(padding, kernel_size, stride, dilation)
    for axis, size, pad, d, k in (
        ("H", input.shape[-2], pads[0] + pads[1], dilation[0], kernel_size[0]),
        ("W", input.shape[-1], pads[2] + pads[3], dilation[1], kernel_size[1]),
    ):
        if size + pad < d * (k - 1) + 1:
            raise ValueError(
                f"input {axis}={size} with padding {pad} is smaller than the dilated kernel "
                f"extent {d * (k - 1) + 1}"
            )

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    y, _ = apply_autocast(
        CPConv2dFunction, x, bias, kh_factor, kw_factor, stride, pads, dilation, len(in_factors),
        *in_factors, *out_factors,
    )  # fmt: skip
    return y.squeeze(0) if unbatched else y


def cp_conv2d_flops(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    rank: int,
    input_size: tuple[int, int],
    batch: int = 1,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
) -> int:
    """Forward FLOPs (2 per multiply-add) of :func:`cp_conv2d`, bias and the parameter-sized
    Khatri-Rao products excluded.

    ``2 N R (C_in H_in W_in + kh kw H_out W_out + C_out H_out W_out)``: the input GEMM runs at
    the input resolution, the depthwise convolution and the output GEMM at the output one.
    Compare with ``2 N C_out C_in kh kw H_out W_out`` for ``F.conv2d``. The backward costs
    about twice the forward (two GEMMs per forward GEMM, two depthwise passes), plus one
    depthwise forward to recompute its output.
    """
    k = pair_arg("kernel_size", kernel_size, 1)
    s = pair_arg("stride", stride, 1)
    d = pair_arg("dilation", dilation, 1)
    top, bottom, left, right = conv2d_padding(padding, k, s, d)
    h, w = input_size
    h_out = (h + top + bottom - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (w + left + right - d[1] * (k[1] - 1) - 1) // s[1] + 1
    per_sample = in_channels * h * w + (k[0] * k[1] + out_channels) * h_out * w_out
    return 2 * batch * rank * per_sample
