"""Channel contractions shared by the convolution kernels (CP and Tucker): layout-aware.

A factorized convolution's channel stages are GEMMs over the channel axis of an
``(N, C, H, W)`` tensor. NCHW and NHWC (channels-last) only differ by which GEMM operand is
transposed, so every layout combination is one (batched) GEMM on views, with no copies;
these helpers pick it. On CPU the rank-channel intermediates are kept NHWC (oneDNN's
depthwise and small convolutions run 1.5-10x faster on NHWC, see
``kronlayers.functional.cp_conv2d``); on CUDA they follow the input's layout. Inside
``torch.func`` transforms, where a tensor's memory format cannot be queried, everything is
treated as NCHW (correct for any layout).

Every helper is made of differentiable ops: the kernels' backward passes are built from
them and must themselves be differentiable (double backward).
"""

from __future__ import annotations

import torch
from torch._C import _functorch

__all__ = [
    "NHWC_GEMM_MIN_CHANNELS",
    "channel_grad",
    "contract_channels",
    "is_channels_last",
    "layout_unknown",
    "rank_channels_last",
]

# Channel count from which an NCHW -> NHWC channel contraction is one GEMM with an (HW, o)
# output; below it the narrow output makes MKL several times slower (7x at o = 8), and the NCHW
# GEMM plus a transposing copy of the (small) result is faster.
NHWC_GEMM_MIN_CHANNELS = 16


# A private torch API (present since torch 2.0); without it no tensor counts as wrapped.
_is_functorch_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)


def layout_unknown(t: torch.Tensor) -> bool:
    # Inside torch.func transforms (vmap, grad, jacrev) a tensor is a functorch wrapper whose
    # memory format cannot be queried (vmap raises): such tensors take the NCHW paths, which
    # are correct for any layout. (Skipped while compiling: Dynamo sees no wrappers.)
    return not torch.compiler.is_compiling() and _is_functorch_wrapped(t)


def is_channels_last(t: torch.Tensor) -> bool:
    # Strictly channels-last: a tensor that is contiguous in both senses (C == 1 or H*W == 1)
    # is handled by the NCHW branch, where it is equally a view.
    if layout_unknown(t):
        return False
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def contract_channels(
    t: torch.Tensor,
    m: torch.Tensor,
    channels_last: bool,
    bias: torch.Tensor | None = None,
    fresh: bool = False,
) -> torch.Tensor:
    """``out[n, o, h, w] = sum_c m[o, c] t[n, c, h, w] (+ bias[o])`` in the requested layout.

    Each layout combination is one (batched) GEMM: NCHW and NHWC only differ by which GEMM
    operand is transposed, which BLAS handles without copies. ``bmm``/``mm`` are called
    directly because ``torch.matmul`` picks its strategy from ``requires_grad`` (still set on
    the inputs inside ``Function.forward``) and then folds a transposed operand with a copy.

    ``fresh=True`` (the forward's output only) returns a tensor that is not a view: the GEMM
    writes into a newly allocated tensor of the final layout, or its result is reshaped with
    ``_unsafe_view``. A Function output that is a view of a tensor made inside ``forward``
    cannot be modified in place (``nn.ReLU(inplace=True)`` after the layer would raise).
    """
    n, c, h, w = t.shape
    o = m.shape[0]
    if fresh and channels_last and (is_channels_last(t) or o >= NHWC_GEMM_MIN_CHANNELS):
        y = torch.empty(
            (n, o, h, w), dtype=t.dtype, device=t.device, memory_format=torch.channels_last
        )
        rows = y.permute(0, 2, 3, 1)  # (n, h, w, o), contiguous
        if is_channels_last(t):
            t2 = t.permute(0, 2, 3, 1).reshape(n * h * w, c)
            dst = rows.view(n * h * w, o)
            if bias is None:
                torch.mm(t2, m.t(), out=dst)
            else:
                torch.addmm(bias, t2, m.t(), out=dst)
        else:
            t3 = t.reshape(n, c, h * w).transpose(1, 2)
            dst = rows.view(n, h * w, o)
            if bias is None:
                torch.bmm(t3, m.t().expand(n, c, o), out=dst)
            else:
                torch.baddbmm(bias.view(1, 1, o), t3, m.t().expand(n, c, o), out=dst)
        return y
    if is_channels_last(t):
        t2 = t.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view
        if channels_last:
            out = torch.mm(t2, m.t()) if bias is None else torch.addmm(bias, t2, m.t())
            return out.view(n, h, w, o).permute(0, 3, 1, 2)
        t3 = t2.view(n, h * w, c).transpose(1, 2)
    else:
        t3 = t.reshape(n, c, h * w)
        if channels_last and o >= NHWC_GEMM_MIN_CHANNELS:
            out = torch.bmm(t3.transpose(1, 2), m.t().expand(n, c, o))
            if bias is not None:
                out += bias
            return out.view(n, h, w, o).permute(0, 3, 1, 2)
    if bias is None:
        out = torch.bmm(m.expand(n, o, c), t3)
    else:
        out = torch.baddbmm(bias.view(1, o, 1), m.expand(n, o, c), t3)
    out = torch.ops.aten._unsafe_view(out, (n, o, h, w)) if fresh else out.view(n, o, h, w)
    if channels_last:
        # Few output channels: the NCHW GEMM plus a transposing copy of the small result is
        # several times faster than a GEMM with a narrow (H*W, o) output.
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def channel_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_{n,h,w} a[n, i, h, w] b[n, j, h, w]``: ``(I, J)``, the gradient of a channel GEMM.

    The GEMM is oriented so that the smaller of ``I``, ``J`` indexes the result's rows (MKL is
    about 3x slower with a narrow result at R = 8); transposing the small result is free.
    """
    if a.shape[1] > b.shape[1]:
        return channel_grad(b, a).t()
    if is_channels_last(a) and is_channels_last(b):
        a2 = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
        b2 = b.permute(0, 2, 3, 1).reshape(-1, b.shape[1])
        return torch.mm(a2.t(), b2)
    # One small (I, J) GEMM per sample, then a sum: no (N*HW)-sized copy of either operand.
    # Explicit sizes, not -1: an empty batch (N = 0) makes -1 ambiguous.
    n, hw = a.shape[0], a.shape[2] * a.shape[3]
    a3 = a.reshape(n, a.shape[1], hw)
    b3 = b.reshape(n, b.shape[1], hw)
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


def rank_channels_last(x: torch.Tensor) -> bool:
    # On CPU oneDNN's depthwise convolution is 1.5-10x faster on NHWC than on NCHW at every
    # rank (see the module docstring); on CUDA keep the input's layout. Inside torch.func
    # transforms, NCHW (see layout_unknown).
    if layout_unknown(x):
        return False
    return x.device.type == "cpu" or is_channels_last(x)
