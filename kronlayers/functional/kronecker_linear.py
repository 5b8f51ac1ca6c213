"""``kronecker_linear``: a linear map whose weight is a sum of Kronecker products."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._shapes import check_linear_args, check_tensor, prod
from ._amp import apply_autocast
from ._kron_engine import MAX_FACTORS, contract_modes, contraction_order, order_cost

__all__ = [
    "KroneckerLinearFunction",
    "check_kron_factors",
    "kronecker_linear",
    "kronecker_linear_flops",
]


def check_kron_factors(factors: Sequence[torch.Tensor], name: str = "factors") -> tuple:
    """Validate Kronecker factors ``(rank, out_k, in_k)``; return ``(in_shape, out_shape)``."""
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(factors).__name__}")
    if len(factors) == 0:
        raise ValueError(f"{name} must hold at least one factor")
    if len(factors) > MAX_FACTORS:
        raise ValueError(f"{name} may hold at most {MAX_FACTORS} factors, got {len(factors)}")
    for k, f in enumerate(factors):
        check_tensor(f"{name}[{k}]", f)
        if f.dim() != 3:
            raise ValueError(
                f"{name}[{k}] must have shape (rank, out_k, in_k), got {tuple(f.shape)}"
            )
    rank = factors[0].shape[0]
    for k, f in enumerate(factors):
        if f.shape[0] != rank:
            raise ValueError(
                f"all {name} must share the rank (dim 0): {name}[0] has {rank}, "
                f"{name}[{k}] has {f.shape[0]}"
            )
    if rank < 1:
        raise ValueError(f"{name} must have rank >= 1 (dim 0), got {rank}")
    return tuple(f.shape[2] for f in factors), tuple(f.shape[1] for f in factors)


def _factor_grad(
    x: torch.Tensor, g: torch.Tensor, factors: Sequence[torch.Tensor], k: int
) -> torch.Tensor:
    """Gradient of ``sum(g * (x @ W.T))`` w.r.t. factor ``k``, without forming ``W``.

    ``x``: (N, in_1..in_d), ``g``: (N, out_1..out_d). Either push ``x`` through every other
    factor (in -> out) and contract with ``g``, or pull ``g`` back through every other factor
    (out -> in) and contract with ``x``; whichever costs fewer FLOPs.
    """
    d = len(factors)
    in_shape = [f.shape[-1] for f in factors]
    out_shape = [f.shape[-2] for f in factors]
    others = [j for j in range(d) if j != k]
    o_in = [in_shape[j] for j in others]
    o_out = [out_shape[j] for j in others]
    fwd_order = contraction_order(o_in, o_out)
    bwd_order = contraction_order(o_out, o_in)
    # Both routes end in a contraction over N and all axes but k; compare their totals.
    fwd_cost = order_cost(o_in, o_out, fwd_order) * in_shape[k] + prod(out_shape) * in_shape[k]
    bwd_cost = order_cost(o_out, o_in, bwd_order) * out_shape[k] + prod(in_shape) * out_shape[k]
    letters = "abcdefghijklm"[:d]
    lk = letters[k]
    if fwd_cost <= bwd_cost:
        modes = [others[j] for j in fwd_order]
        p = contract_modes(x, factors, modes, has_rank=False, transpose=False, reduce_rank=False)
        a, b = p, g  # p: (N, R?, out.. with in_k at k), g: (N, out..)
        a_sub = letters.replace(lk, "i")
        b_sub = letters.replace(lk, "o")
    else:
        modes = [others[j] for j in bwd_order]
        p = contract_modes(g, factors, modes, has_rank=False, transpose=True, reduce_rank=False)
        a, b = p, x  # p: (N, R?, in.. with out_k at k), x: (N, in..)
        a_sub = letters.replace(lk, "o")
        b_sub = letters.replace(lk, "i")
    if p.dim() == d + 2:  # carries the rank axis
        return torch.einsum(f"nr{a_sub},n{b_sub}->roi", a, b)
    # Unranked: contract over the batch and every axis but k. tensordot folds this into one
    # GEMM over permuted views; einsum took 4x longer for 64x64 (x) 64x64 at batch 256.
    rest = [0] + [1 + j for j in others]
    grad = torch.tensordot(a, b, dims=(rest, rest))  # (a's axis k, b's axis k)
    grad = grad if a_sub[k] == "o" else grad.T
    if factors[0].dim() == 3:
        # d == 1 with several rank terms: W = sum_r F[r], so each term gets the same gradient.
        return grad.unsqueeze(0).expand(factors[0].shape[0], -1, -1).contiguous()
    return grad


class KroneckerLinearFunction(torch.autograd.Function):
    """``y = x @ (sum_r F_1[r] ⊗ ... ⊗ F_d[r]).T + bias`` with a hand-written backward.

    Saved for backward: the input and the factors only (no intermediate contractions). The
    backward recomputes the partial contractions it needs, which costs about one extra
    forward per factor but keeps the activation memory of the layer equal to ``nn.Linear``'s
    (just the input), instead of storing ``d - 1`` intermediates of up to ``rank`` times the
    input size.

    Composability: the backward is made of differentiable torch ops, so double backward
    (``create_graph=True``, ``gradgradcheck``) works. ``torch.func.vmap`` (and per-sample
    gradients with ``vmap(grad(...))``) works through ``generate_vmap_rule``, which vmaps the
    plain-torch forward and backward. Forward-mode AD (``jvp``, ``jacfwd``) is not
    implemented and raises PyTorch's error asking for a ``jvp`` staticmethod.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, *factors: torch.Tensor):
        in_shape = [f.shape[2] for f in factors]
        out_shape = [f.shape[1] for f in factors]
        lead = x.shape[:-1]
        t = x.reshape(-1, *in_shape)
        fs = _maybe_squeeze_rank(factors)
        order = contraction_order(in_shape, out_shape)
        y = contract_modes(t, fs, order, has_rank=False, transpose=False, reduce_rank=True)
        y = y.reshape(*lead, prod(out_shape))
        if bias is not None:
            y = y + bias
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, *factors = inputs
        ctx.save_for_backward(x, *factors)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *factors = ctx.saved_tensors
        in_shape = [f.shape[2] for f in factors]
        out_shape = [f.shape[1] for f in factors]
        needs = ctx.needs_input_grad
        g = grad_out.reshape(-1, *out_shape)
        fs = _maybe_squeeze_rank(factors)

        grad_x = grad_bias = None
        if needs[0]:
            order = contraction_order(out_shape, in_shape)
            gx = contract_modes(g, fs, order, has_rank=False, transpose=True, reduce_rank=True)
            grad_x = gx.reshape(x.shape)
        if ctx.has_bias and needs[1]:
            grad_bias = grad_out.reshape(-1, prod(out_shape)).sum(0)
        grad_factors = []
        t = None
        for k, f in enumerate(factors):
            if not needs[2 + k]:
                grad_factors.append(None)
                continue
            if t is None:
                t = x.reshape(-1, *in_shape)
            gk = _factor_grad(t, g, fs, k)
            grad_factors.append(gk.reshape(f.shape))
        return (grad_x, grad_bias, *grad_factors)


def _maybe_squeeze_rank(factors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    # A single Kronecker product needs no rank axis; dropping it lets every step be a plain
    # matmul instead of a batched one.
    if factors[0].shape[0] == 1:
        return [f[0] for f in factors]
    return factors


def kronecker_linear(
    input: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Apply ``y = x W^T + b`` with ``W = sum_r F_1[r] ⊗ F_2[r] ⊗ ... ⊗ F_d[r]``.

    ``W`` is never formed: the input is viewed as a ``d``-way tensor and each axis is
    multiplied by its factor (the vec trick), in the order that needs the fewest FLOPs.
    Forward and backward are hand-written (see :class:`KroneckerLinearFunction`).

    Args:
        input: ``(*, H_in)`` with ``H_in = prod_k in_k``.
        factors: ``d`` tensors, factor ``k`` of shape ``(rank, out_k, in_k)``. The same tensor
            may appear several times (shared factors); its gradients are summed.
        bias: optional ``(H_out,)`` with ``H_out = prod_k out_k``.

    Returns:
        ``(*, H_out)``.

    Example::

        >>> a, b = torch.randn(1, 3, 4), torch.randn(1, 5, 6)
        >>> x = torch.randn(8, 24)
        >>> y = kronecker_linear(x, [a, b])
        >>> torch.allclose(y, x @ torch.kron(a[0], b[0]).T, atol=1e-5)
        True
    """
    check_tensor("input", input)
    in_shape, out_shape = check_kron_factors(factors)
    check_linear_args(
        input,
        bias,
        prod(in_shape),
        prod(out_shape),
        f"the product of the factors' in sizes {in_shape}",
    )
    return apply_autocast(KroneckerLinearFunction, input, bias, *factors)


def kronecker_linear_flops(
    in_shape: Sequence[int], out_shape: Sequence[int], rank: int = 1, batch: int = 1
) -> int:
    """Forward FLOPs (2 per multiply-add) of :func:`kronecker_linear` on ``batch`` rows.

    ``2 * batch * rank * sum_j T_j * out_{k_j}`` over the contraction order chosen by the
    kernel, where ``T_j`` is the size of the intermediate before step ``j``; bias excluded.
    Compare with ``2 * batch * prod(in_shape) * prod(out_shape)`` for the dense layer. The
    same unit as :func:`cp_linear_flops` and :func:`cp_conv2d_flops`.
    """
    order = contraction_order(in_shape, out_shape)
    return 2 * batch * rank * order_cost(in_shape, out_shape, order)
