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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._shapes import conv2d_output_size, conv2d_padding, prod
from .._validation import (
    check_bias,
    check_conv2d_extent,
    check_conv2d_input,
    check_factor_list,
    check_like,
    check_pair,
)
from ..ops.khatri_rao import khatri_rao, khatri_rao_grads
from ._amp import _autocast_dtype, apply_autocast, balance_cp_stages, compute_dtype
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
from ._function import split_needs

__all__ = [
    "CPConv2dConfig",
    "CPConv2dFunction",
    "cp_conv2d",
    "cp_conv2d_flops",
    "cp_conv2d_kernel",
    "cp_conv2d_plan",
]


@dataclass(frozen=True)
class CPConv2dConfig:
    """The static part of a :class:`CPConv2dFunction` call (hashable, no tensors).

    ``stride``/``dilation``: ``(h, w)`` pairs; ``padding``: resolved ``(top, bottom, left,
    right)``; ``n_in``: how many of the factors are input-channel factors (the rest, before
    the two kernel factors, are output-channel factors).
    """

    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    n_in: int


def cp_conv2d_kernel(
    in_factors: Sequence[torch.Tensor],
    out_factors: Sequence[torch.Tensor],
    kernel_factors: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The dense ``(C_out, C_in, kh, kw)`` kernel of a CP convolution (differentiable).

    It is the CP tensor ``(out_1..out_D, in_1..in_D, kh, kw)`` reshaped row-major.
    """
    kh, kw = kernel_factors
    # One GEMM over the rank, K_out (C_out, R) @ (C_in * kh * kw, R)^T: contiguous, as
    # F.conv2d's CPU backward needs ("slow_conv2d: grad_weight must be contiguous"), and
    # several times faster than a four-operand einsum (its path search dominates small sizes).
    taps = khatri_rao([*in_factors, kh, kw])
    w = khatri_rao(out_factors) @ taps.t()
    return w.view(w.shape[0], -1, kh.shape[0], kw.shape[0])


def _depthwise_kernel(kh: torch.Tensor, kw: torch.Tensor) -> torch.Tensor:
    # (R, 1, kh, kw): channel r's kernel is the outer product kh[:, r] ∘ kw[:, r].
    # Contiguous: the einsum result is laid out (kh, kw, R), which convolutions would reorder.
    return torch.einsum("ir,jr->rij", kh, kw).unsqueeze(1).contiguous()


class CPConv2dFunction(torch.autograd.Function):
    """CP convolution with a hand-written backward (see :func:`cp_conv2d` for the maths).

    ``apply(x, bias, kh_factor, kw_factor, stride, padding, dilation, n_in, *in_factors,
    *out_factors)`` with ``x`` 4-D, ``stride``/``dilation`` pairs and ``padding`` a resolved
    ``(top, bottom, left, right)`` tuple. Returns ``(y, u)``; ``u`` (the rank-``R`` projection of
    the input, zero-padded) is returned only so that it can be saved for backward (the
    ``setup_context`` way of saving an intermediate) and is not differentiable (so that ``y``,
    the only differentiable output, may be modified in place).

    What is saved, and why:

    * the input ``x`` (only if an input-channel factor needs a gradient), as ``nn.Conv2d``
      does, for the input factors' gradient; also when ``x`` itself needs a gradient and ``u``
      is saved, so that a differentiated backward can recompute ``u`` (see below);
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

    Composability: the backward is made of differentiable ops (GEMMs, einsums, ``F.conv2d``,
    ``F.conv_transpose2d`` and ``aten.convolution_backward``, padding and slicing), so
    ``create_graph=True`` gives exact higher derivatives. The saved ``u`` carries no graph back
    to ``x`` and the input factors, so a differentiated backward (grad mode on inside it, i.e.
    ``create_graph=True``) that reads ``u`` while ``x`` or an input factor needs a gradient
    recomputes ``u`` from ``x`` (one input GEMM more, only then); for that, ``x`` is also saved
    when it needs a gradient and ``u`` is saved. ``torch.func.vmap`` / ``jacrev`` work
    through ``generate_vmap_rule`` (inside ``torch.func`` transforms the intermediates are
    NCHW, as the memory format of functorch tensors cannot be queried). Forward-mode AD
    raises PyTorch's error asking for a ``jvp`` staticmethod.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        bias: torch.Tensor | None,
        config: CPConv2dConfig,
        *factors: torch.Tensor,
    ):
        stride, padding, dilation, n_in = (
            config.stride, config.padding, config.dilation, config.n_in
        )  # fmt: skip
        *channel_factors, kh_factor, kw_factor = factors
        rank = kh_factor.shape[1]
        k_out = khatri_rao(channel_factors[n_in:])
        u = _project_input(x, channel_factors[:n_in], padding)
        conv_pad = _conv_padding(padding)
        kernel = _depthwise_kernel(kh_factor, kw_factor)
        v = F.conv2d(u, kernel, None, stride, conv_pad, dilation, rank)
        y = contract_channels(v, k_out, is_channels_last(x), bias, fresh=True)
        return y, u

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, bias, config, *factors = inputs
        *channel_factors, kh, kw = factors
        _, u = output
        ctx.mark_non_differentiable(u)
        # u's gradient is always absent; without this autograd would allocate a zero tensor
        # of u's size for it on every backward.
        ctx.set_materialize_grads(False)
        _, _, needs = split_needs(ctx)
        n_in = config.n_in
        need_in = any(needs[:n_in])
        need_u = any(needs[n_in:])  # out-channel and kernel factors read u
        # x: for the input factors' gradient, or to recompute u in a differentiated backward.
        need_x = need_in or (need_u and ctx.needs_input_grad[0])
        # Save only what the requested gradients read (a frozen layer keeps nothing big).
        ctx.save_for_backward(
            x if need_x else None, u if need_u else None, kh, kw, *channel_factors
        )
        ctx.conf = (config.stride, config.padding, config.dilation, n_in, bias is not None)
        ctx.x_channels_last = is_channels_last(x)
        ctx.u_shape = u.shape
        ctx.u_channels_last = is_channels_last(u)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor | None, _grad_u: torch.Tensor | None):
        x, u, kh, kw, *factors = ctx.saved_tensors
        stride, padding, dilation, n_in, has_bias = ctx.conf
        if grad_y is None:  # (grads are not materialized) nothing flows back
            return (None,) * (5 + len(factors))
        in_factors, out_factors = factors[:n_in], factors[n_in:]
        need_x, need_bias, need_factors = split_needs(ctx)
        need_in, need_out = need_factors[:n_in], need_factors[n_in:-2]
        need_kh, need_kw = need_factors[-2], need_factors[-1]
        rank = kh.shape[1]
        conv_pad = _conv_padding(padding)

        if u is not None and (need_x or any(need_in)) and torch.is_grad_enabled():
            # Differentiated backward (create_graph=True): u as a differentiable function of
            # x and the input factors, so that double backward through u is exact.
            u = _project_input(x, in_factors, padding)

        # A grad of unusual strides (e.g. the expanded one of `y.sum()`) becomes a plain layout
        # once here instead of in every GEMM below.
        if not (grad_y.is_contiguous() or is_channels_last(grad_y)):
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
            grad_out = khatri_rao_grads(channel_grad(grad_y, v), out_factors, need_out)
            del v

        need_u_grad = need_x or any(need_in)
        if need_u_grad or need_kh or need_kw:
            grad_v = contract_channels(grad_y, k_out.t(), ctx.u_channels_last)
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
                    grad_in = khatri_rao_grads(channel_grad(x, grad_u), in_factors, need_in)
                if need_x:
                    k_in = khatri_rao(in_factors)
                    grad_x = contract_channels(grad_u, k_in, ctx.x_channels_last)

        return (grad_x, grad_bias, None, *grad_in, *grad_out, grad_kh, grad_kw)


def _project_input(
    x: torch.Tensor, in_factors: Sequence[torch.Tensor], padding: tuple[int, int, int, int]
) -> torch.Tensor:
    """``u``: the input contracted to the ``R`` channels, with the asymmetric padding."""
    u = contract_channels(x, khatri_rao(in_factors).t(), rank_channels_last(x))
    return _pad_asymmetric(u, padding)[0]


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
    """Input and weight gradients of ``F.conv2d(u, kernel, None, stride, padding, dilation, R)``.

    Every branch is a differentiable op (the backward must be, for double backward).
    """
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
    if need_weight:
        # u is saved whenever the weight gradient is requested.
        gi, gw, _ = torch.ops.aten.convolution_backward(
            grad_v, u, kernel, None, list(stride), list(padding), list(dilation),
            False, [0, 0], rank, [need_input, True, False],
        )  # fmt: skip
        grad_u = gi if need_input else grad_u
        grad_kernel = gw
    elif need_input:
        # The transposed convolution; output_padding restores the rows / columns the stride
        # dropped (u itself may not have been saved, only its shape).
        full = [
            (o - 1) * s - 2 * p + d * (k - 1) + 1
            for o, s, p, d, k in zip(
                grad_v.shape[2:], stride, padding, dilation, kernel.shape[2:], strict=True
            )
        ]
        out_pad = (u_shape[2] - full[0], u_shape[3] - full[1])
        grad_u = F.conv_transpose2d(grad_v, kernel, None, stride, padding, out_pad, rank, dilation)
    return grad_u, grad_kernel


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


def cp_conv2d(
    input: torch.Tensor,
    in_factors: Sequence[torch.Tensor],
    out_factors: Sequence[torch.Tensor],
    kernel_factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    *,
    path: str | None = None,
) -> torch.Tensor:
    r"""2-D convolution with the CP kernel ``sum_r out[:, r] ∘ in[:, r] ∘ kh[:, r] ∘ kw[:, r]``.

    Equal to ``F.conv2d(input, cp_conv2d_kernel(in_factors, out_factors, kernel_factors), bias,
    stride, padding, dilation)`` without forming the kernel: the input channels are contracted
    to ``R``, each of the ``R`` channels is convolved with its rank-one ``kh x kw`` kernel
    (depthwise), and ``R`` is expanded to the output channels. About
    ``R * (C_in + kh*kw + C_out * H_out W_out / (H_in W_in))`` multiply-adds per input pixel
    instead of ``C_in * C_out * kh * kw`` per output pixel. Forward and backward are hand-written
    (:class:`CPConv2dFunction`). When the rank is so high that forming the kernel and running
    one ``F.conv2d`` is clearly faster (the cost model of :mod:`kronlayers.functional._dispatch`,
    see :func:`cp_conv2d_plan`), that dense path runs instead, so the layer is never much
    slower than the convolution it replaces.

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
        path: ``None`` (automatic), ``"factorized"`` or ``"dense"``; overrides
            :func:`~kronlayers.functional._dispatch.force_kernel` and
            :func:`~kronlayers.functional._dispatch.force_path`.

    Shape:
        - Input: ``(N, C_in, H_in, W_in)`` or ``(C_in, H_in, W_in)``
        - Output: ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)`` where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in} + p_{top} + p_{bottom} - \text{dilation}[0]
              \times (kh - 1) - 1}{\text{stride}[0]} + 1\right\rfloor

          and likewise ``W_out`` with ``kw``, ``p_left``, ``p_right``, ``stride[1]``,
          ``dilation[1]``.

    The output has the input's memory format (channels-last in, channels-last out).

    Guarantees:

    * Derivatives of every order are exact (the backward is differentiable): gradient
      penalties, ``gradgradcheck``, ``torch.func.vmap`` / ``grad`` / ``jacrev`` work.
      Forward-mode AD (``jvp``, ``jacfwd``) raises PyTorch's error asking for a ``jvp``.
    * float32 / float64: the kernel runs on the factors as given (bit-identical to calling
      :class:`CPConv2dFunction` directly).
    * float16 / bfloat16 (the input's dtype, or the autocast dtype): the factors are first
      rescaled per rank term, in float32 and without changing the kernel, so that the three
      stages (input channels, the ``kh x kw`` kernel, output channels) each carry the cube
      root of the rank-one term's norm ``P_r = prod ||column r||``
      (:func:`kronlayers.functional._amp.balance_cp_stages`). Each term's intermediates ``u``
      and ``v`` then scale like ``P_r ** (1/3)`` and ``P_r ** (2/3)`` times the input: between
      the input's and the output's scale, so badly balanced factors (norms ``1e3`` and
      ``1e-3``) no longer overflow where the dense convolution stays finite. Not guaranteed:
      finiteness when a term itself exceeds the format even if terms cancel in the output,
      or accuracy beyond the format's.
    * Meta tensors: meta input and factors give a meta output of the right shape (shape
      inference); mixing devices raises ``ValueError`` naming the argument.

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
    path = check_path(path)
    in_factors = check_factor_list("in_factors", in_factors, 2, "(d_k, rank)")
    out_factors = check_factor_list("out_factors", out_factors, 2, "(d_k, rank)")
    if isinstance(kernel_factors, (torch.Tensor, str)) or not isinstance(kernel_factors, Sequence):
        raise TypeError(
            "kernel_factors must be a pair (kh_factor, kw_factor) of tensors, got "
            f"{type(kernel_factors).__name__}"
        )
    if len(kernel_factors) != 2:
        raise ValueError(
            f"kernel_factors must be a pair (kh_factor, kw_factor), got {len(kernel_factors)} "
            "tensors"
        )
    kh_factor, kw_factor = check_factor_list("kernel_factors", kernel_factors, 2, "(k, rank)")
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
        if f.shape[0] < 1:
            raise ValueError(f"{name} must have shape (d, rank) with d >= 1, got {tuple(f.shape)}")

    c_in = prod([f.shape[0] for f in in_factors])
    c_out = prod([f.shape[0] for f in out_factors])
    check_conv2d_input(input, c_in, "C_in = the product of the in_factors' sizes")
    # Under autocast apply_autocast casts everything to one dtype; only devices must agree.
    autocast = _autocast_dtype(input.device.type) is not None
    for name, f in named:
        check_like(name, f, input, autocast=autocast)
    check_bias(bias, c_out, input, autocast=autocast)

    kernel_size = (kh_factor.shape[0], kw_factor.shape[0])
    stride = check_pair("stride", stride, 1)
    dilation = check_pair("dilation", dilation, 1)
    pads = conv2d_padding(padding, kernel_size, stride, dilation)
    check_conv2d_extent(input, pads, kernel_size, dilation)

    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    config = CPConv2dConfig(stride, pads, dilation, len(in_factors))
    # fp16 / bf16 only: equalize the three stages' share of each rank term's norm (the kernel
    # is unchanged; float32 / float64 calls get the very same tensors).
    in_factors, (kh_factor, kw_factor), out_factors = balance_cp_stages(
        [list(in_factors), [kh_factor, kw_factor], list(out_factors)], compute_dtype(input)
    )
    factors = (*in_factors, *out_factors, kh_factor, kw_factor)
    needs = call_needs(x, factors, bias)
    factorized, dense = _path_ops(
        conv_batch(x.shape[0]), c_in, c_out, rank, kernel_size, (x.shape[2], x.shape[3]),
        config, needs,
    )  # fmt: skip
    if choose_conv_path(factorized, dense, x.dtype.itemsize, x.device.type, path) == "dense":
        weight = cp_conv2d_kernel(in_factors, out_factors, (kh_factor, kw_factor))
        y = dense_conv(x, weight, bias, stride, pads, dilation)
    else:
        y, _ = apply_autocast(CPConv2dFunction, x, bias, config, *factors)
    return y.squeeze(0) if unbatched else y


def _path_ops(n, c_in, c_out, rank, kernel_size, size, config, needs):
    """The factorized and dense paths' ops for ``n`` samples of spatial ``size``."""
    h_out, w_out = conv2d_output_size(size, kernel_size, config.stride, config.padding,
                                      config.dilation)  # fmt: skip
    p_in, p_out = size[0] * size[1], h_out * w_out
    taps = kernel_size[0] * kernel_size[1]
    need_x, need_factors, need_bias = needs
    # Measured on CPU (64 channels, 32 x 32, ranks 32-138): the per-sample channel GEMMs
    # run at about half the large-GEMM rate, and a depthwise convolution call costs about
    # two passes over its input and output (four reads / writes of the rank-R tensor).
    # Forward: besides those, about ten small ops (Khatri-Rao products, padding, the
    # depthwise kernel, layout views).
    half = 0.5
    u_in, u_out = n * rank * p_in, n * rank * p_out
    depthwise = [*conv_call(), Pass(u_in), Pass(u_out)]
    fact: list[Op] = [
        PyFunction(any(needs)), *launches(10), *depthwise,
        Gemm(n * p_in, rank, c_in, efficiency=half), Gemm(n * p_out, c_out, rank, efficiency=half),
    ]  # fmt: skip
    if need_x or need_factors:  # back through the output GEMM and the depthwise stage
        fact += [Gemm(n * p_out, rank, c_out, efficiency=half), *launches(10), *depthwise]
    if need_x:
        fact.append(Gemm(n * p_in, c_in, rank, efficiency=half))
    if need_factors:  # recompute v, the kernel's gradient; the two channel GEMMs' gradients
        fact += [*depthwise, *depthwise]
        fact += [
            Gemm(c_out, rank, n * p_out, efficiency=half),
            Gemm(rank, c_in, n * p_in, efficiency=half),
        ]
    if need_bias:
        fact.append(Pass(n * c_out * p_out))
    form = [*launches(4), Gemm(c_out, c_in * taps, rank)]
    form_grad = [Gemm(c_out, rank, c_in * taps), Gemm(c_in * taps, rank, c_out)]
    dense = dense_conv_ops(n, c_in, c_out, taps, p_in, p_out, form, form_grad, needs)
    return fact, dense


def cp_conv2d_plan(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    rank: int,
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
    """What :func:`cp_conv2d` does for an input of ``input_shape`` (``(N, C, H, W)`` or
    ``(C, H, W)``): ``path`` (``"factorized"`` or ``"dense"``) and ``seconds`` (the cost
    model's estimate of each path, forward plus the backward the gradient flags imply;
    ``factor_grad`` also stands for the bias). A symbolic batch counts as
    :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` samples."""
    k = check_pair("kernel_size", kernel_size, 1)
    stride = check_pair("stride", stride, 1)
    dilation = check_pair("dilation", dilation, 1)
    config = CPConv2dConfig(stride, conv2d_padding(padding, k, stride, dilation), dilation, 1)
    return conv_plan(
        lambda n, size, needs: _path_ops(n, in_channels, out_channels, int(rank), k, size,
                                         config, needs),
        input_shape, dtype, device_type, (input_grad, factor_grad, factor_grad and bias), path,
    )  # fmt: skip


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
    k = check_pair("kernel_size", kernel_size, 1)
    s = check_pair("stride", stride, 1)
    d = check_pair("dilation", dilation, 1)
    h, w = input_size
    h_out, w_out = conv2d_output_size((h, w), k, s, conv2d_padding(padding, k, s, d), d)
    per_sample = in_channels * h * w + (k[0] * k[1] + out_channels) * h_out * w_out
    return 2 * batch * rank * per_sample
