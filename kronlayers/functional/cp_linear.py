"""``cp_linear``: a linear map whose tensorized weight is a CP (CANDECOMP/PARAFAC) tensor.

The ``(H_out, H_in)`` weight is viewed row-major as ``(out_1, ..., out_P, in_1, ..., in_Q)``
(the layout of TensorLy-Torch's ``CPTensorized.to_matrix()``) and equals

    ``W = sum_r B_1[:, r] ∘ ... ∘ B_P[:, r] ∘ A_1[:, r] ∘ ... ∘ A_Q[:, r]``

with input factors ``A_q`` of shape ``(in_q, R)`` and output factors ``B_p`` of shape
``(out_p, R)``. Equivalently ``W = K_out K_in^T`` where ``K_in = A_1 ⊙ ... ⊙ A_Q`` is the
``(H_in, R)`` Khatri-Rao product (row-major, ``A_1`` slowest) and ``K_out`` likewise, so
``x W^T = (x K_in) K_out^T``: an ``(N, R)`` core in between, about ``N * R * (H_in + H_out)``
multiply-adds instead of ``N * H_in * H_out``. ``W`` is never formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .._shapes import check_linear_args, check_tensor, prod
from ._amp import _autocast_dtype, apply_autocast

__all__ = ["CPLinearFunction", "check_cp_factors", "cp_linear", "cp_linear_flops"]

_IN_LETTERS = "abcdefghijklm"
_OUT_LETTERS = "ABCDEFGHIJKLM"
MAX_MODES = len(_IN_LETTERS)
_STRATEGIES = ("auto", "khatri_rao", "modewise")


@dataclass(frozen=True)
class CPLinearPlan:
    """How one call contracts the input side and expands the output side.

    ``*_khatri_rao``: multiply by the Khatri-Rao product of the factors (one large GEMM).
    Otherwise mode by mode: ``in_order`` lists the input modes in contraction order (the
    first is a GEMM against ``x``, the rest are Hadamard-in-``R`` contractions) and
    ``out_order`` the output modes in expansion order (the last one is the GEMM).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    rank: int
    in_khatri_rao: bool
    in_order: tuple[int, ...]
    out_khatri_rao: bool
    out_order: tuple[int, ...]


def _khatri_rao_cost(shape: Sequence[int], rank: int) -> int:
    # Building (d_1 * ... * d_j, R) for j = 2..D, one broadcast multiply each.
    cost, size = 0, shape[0]
    for d in shape[1:]:
        size *= d
        cost += size * rank
    return cost


def _modewise_in(shape: Sequence[int], n: int, rank: int) -> tuple[tuple[int, ...], int]:
    # Largest mode first: the first GEMM always costs N * H_in * R, and every later
    # Hadamard contraction costs the size of what is left, which is smallest this way.
    # Among equal sizes the last mode goes first, so that step is a plain matmul on a view.
    order = tuple(sorted(range(len(shape)), key=lambda k: (-shape[k], -k)))
    left = prod(shape)
    cost = 0
    for k in order:
        cost += n * left * rank
        left //= shape[k]
    return order, cost


def _modewise_out(shape: Sequence[int], n: int, rank: int) -> tuple[tuple[int, ...], int]:
    # Mirror image of the input side: expand the smallest modes first and finish with the
    # GEMM over the largest one, so the tensor fed to that GEMM is as small as possible.
    order = tuple(sorted(range(len(shape)), key=lambda k: (shape[k], k)))
    cost, size = 0, 1
    for k in order[:-1]:
        size *= shape[k]
        cost += n * size * rank
    return order, cost + n * prod(shape) * rank


def make_plan(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    n: int,
    strategy: str = "auto",
) -> CPLinearPlan:
    """Pick the cheapest route (in multiply-adds) for ``n`` rows, or force ``strategy``.

    The Khatri-Rao route pays ``~H * R`` once per call to build ``K`` and then runs one
    large GEMM; the mode-wise route pays ``~N * R * H / d_max`` for the Hadamard steps. So
    Khatri-Rao wins for batches larger than about the largest mode size, mode-wise for
    small batches (single-sample inference); ties go to Khatri-Rao (bigger GEMMs run closer
    to peak).
    """
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    return _make_plan(tuple(in_shape), tuple(out_shape), rank, n, strategy)


# Plans are pure functions of hashable shapes; caching keeps them off every call's path.
@lru_cache(maxsize=256)
def _make_plan(in_shape, out_shape, rank, n, strategy) -> CPLinearPlan:
    in_order, in_mode_cost = _modewise_in(in_shape, n, rank)
    out_order, out_mode_cost = _modewise_out(out_shape, n, rank)
    if strategy == "auto":
        in_kr = _khatri_rao_cost(in_shape, rank) + n * prod(in_shape) * rank <= in_mode_cost
        out_kr = _khatri_rao_cost(out_shape, rank) + n * prod(out_shape) * rank <= out_mode_cost
    else:
        in_kr = out_kr = strategy == "khatri_rao"
    return CPLinearPlan(in_shape, out_shape, rank, in_kr, in_order, out_kr, out_order)


def cp_linear_flops(
    in_shape: Sequence[int], out_shape: Sequence[int], rank: int, n: int, strategy: str = "auto"
) -> int:
    """Forward FLOPs (2 per multiply-add) of :func:`cp_linear` on ``n`` rows, bias excluded.

    The backward costs about twice as much (two GEMMs per forward GEMM).
    """
    plan = make_plan(in_shape, out_shape, rank, n, strategy)
    if plan.in_khatri_rao:
        cost = _khatri_rao_cost(in_shape, rank) + n * prod(in_shape) * rank
    else:
        cost = _modewise_in(in_shape, n, rank)[1]
    if plan.out_khatri_rao:
        cost += _khatri_rao_cost(out_shape, rank) + n * prod(out_shape) * rank
    else:
        cost += _modewise_out(out_shape, n, rank)[1]
    return 2 * cost


def _khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-major Khatri-Rao product ``(prod d_k, R)`` of factors ``(d_k, R)``."""
    # A broadcast multiply writes the result contiguous in the (d_1, ..., d_k, R) order the
    # GEMM needs; a two-operand einsum would batch over R and leave it permuted.
    k = factors[0]
    for f in factors[1:]:
        k = (k.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, f.shape[1])
    return k


# Hadamard-in-R steps (a mode contracted or created while the rank axis is carried along)
# are written as broadcast multiply + sum: torch.einsum lowers them to a bmm batched over R,
# which on CPU runs R tiny matrix-vector products one by one (measured ~5 us per rank term).
# The true GEMM steps stay einsum/matmul. ``t`` always has the rank axis last.


def _along(f: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """View factor ``(d, R)`` to broadcast against an ``ndim``-d tensor along ``dim``."""
    shape = [1] * ndim
    shape[dim], shape[-1] = f.shape[0], f.shape[1]
    return f.view(shape)


def _contract(t: torch.Tensor, f: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum_a t[.., a, .., r] * f[a, r]`` over axis ``dim``."""
    return (t * _along(f, dim, t.dim())).sum(dim)


def _expand_mode(t: torch.Tensor, f: torch.Tensor, dim: int) -> torch.Tensor:
    """``t[.., r] * f[a, r]`` with the new axis ``a`` inserted at ``dim``."""
    return t.unsqueeze(dim) * _along(f, dim, t.dim() + 1)


def _factor_grad(big: torch.Tensor, small: torch.Tensor, dim: int) -> torch.Tensor:
    """``(d, R)`` sum of ``big * small`` (``small`` lacks axis ``dim``) over all other axes.

    The gradient of the factor of either Hadamard step: ``big`` carries the factor's mode.
    """
    prod_ = big * small.unsqueeze(dim)
    axes = [a for a in range(prod_.dim() - 1) if a != dim]
    return prod_.sum(axes) if axes else prod_


def _khatri_rao_factor_grad(
    grad_k: torch.Tensor, factors: Sequence[torch.Tensor], k: int
) -> torch.Tensor:
    """Gradient for ``factors[k]`` given the gradient ``(prod d_j, R)`` of their Khatri-Rao."""
    shape = [f.shape[0] for f in factors]
    t = grad_k.reshape(*shape, -1)
    alive = list(range(len(factors)))
    # Largest other mode first: each step shrinks the tensor the most.
    for j in sorted((j for j in alive if j != k), key=lambda j: -shape[j]):
        t = _contract(t, factors[j], alive.index(j))
        alive.remove(j)
    return t


def _expand(c: torch.Tensor, out_factors: Sequence[torch.Tensor], plan: CPLinearPlan) -> list:
    """Mode-wise output side before the final GEMM: ``[c, u_1, ..., u_{P-1}]``.

    ``u_j`` is ``(N, *modes, R)`` with the expanded modes in natural order.
    """
    us = [c]
    alive: list[int] = []
    for k in plan.out_order[:-1]:
        alive = sorted([*alive, k])
        us.append(_expand_mode(us[-1], out_factors[k], 1 + alive.index(k)))
    return us


class CPLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + bias`` for a CP-factorized ``W``, with a hand-written backward.

    Called as ``CPLinearFunction.apply(x, bias, plan, *in_factors, *out_factors)`` (see
    :func:`make_plan`); returns ``(y, c, *saved)`` where only ``y`` is differentiable:
    ``c = x K_in`` is the ``(N, R)`` core and ``saved`` the intermediates kept for backward.
    Use :func:`cp_linear`, which validates the arguments and returns ``y`` alone.

    Saved for backward: the input, the factors and the ``(N, R)`` core ``c``, plus, on the
    mode-wise input route only, the partial contractions of the input (``N * R * H_in /
    d_max`` entries for the first, the rest geometrically smaller; that route is only taken
    when ``N`` is below about ``d_max``, so they are smaller than ``K_in``). Recomputing those
    would cost another ``N * R * H_in`` GEMM, half the forward, so they are kept. Everything
    else is rebuilt in backward because it is cheap next to the backward's four GEMMs: the
    Khatri-Rao products ``K_in``, ``K_out`` (``~(H_in + H_out) * R`` multiplies, 1/N of a GEMM,
    versus keeping ``(H_in + H_out) * R`` entries per layer alive from forward to backward)
    and the mode-wise output expansions (elementwise products of ``c``). So the activation
    memory of the layer is the input plus ``N * R``, as for a dense layer plus a sliver.
    The backward is not itself differentiable (double backward raises).
    """

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, plan: CPLinearPlan, *factors):
        n_in = len(plan.in_shape)
        a_fs, b_fs = factors[:n_in], factors[n_in:]
        in_features, out_features = prod(plan.in_shape), prod(plan.out_shape)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        n = x2.shape[0]
        saved: list[torch.Tensor] = []

        if plan.in_khatri_rao:
            c = x2 @ _khatri_rao(a_fs)
        else:
            k = plan.in_order[0]
            rest = [m for m in range(n_in) if m != k]
            sub = _IN_LETTERS[:n_in]
            out = "".join(_IN_LETTERS[m] for m in rest)
            # The one GEMM of this route; the surviving modes stay in natural order.
            t = torch.einsum(
                f"n{sub},{_IN_LETTERS[k]}r->n{out}r", x2.view(n, *plan.in_shape), a_fs[k]
            )
            for k in plan.in_order[1:]:
                saved.append(t)
                t = _contract(t, a_fs[k], 1 + rest.index(k))
                rest.remove(k)
            c = t

        if plan.out_khatri_rao:
            k_out = _khatri_rao(b_fs)
            # addmm fuses the bias into the GEMM's output pass.
            y = c @ k_out.t() if bias is None else torch.addmm(bias, c, k_out.t())
        else:
            u = _expand(c, b_fs, plan)[-1]
            k = plan.out_order[-1]
            before = "".join(_OUT_LETTERS[m] for m in sorted(plan.out_order[:-1]))
            full = _OUT_LETTERS[: len(b_fs)]
            y = torch.einsum(f"n{before}r,{_OUT_LETTERS[k]}r->n{full}", u, b_fs[k])
            y = y.reshape(n, out_features)
            if bias is not None:
                y = y + bias
        return (y.view(*lead, out_features), c, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, plan, *factors = inputs
        _, c, *saved = output
        ctx.mark_non_differentiable(c, *saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, c, *factors, *saved)
        ctx.plan = plan
        ctx.has_bias = bias is not None

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor | None, *_unused):
        plan: CPLinearPlan = ctx.plan
        n_in, n_out = len(plan.in_shape), len(plan.out_shape)
        x, c, *rest = ctx.saved_tensors
        a_fs, b_fs, saved = rest[:n_in], rest[n_in : n_in + n_out], rest[n_in + n_out :]
        needs = ctx.needs_input_grad
        need_x, need_bias = needs[0], needs[1] and ctx.has_bias
        need_a, need_b = list(needs[3 : 3 + n_in]), list(needs[3 + n_in :])
        grads_a: list[torch.Tensor | None] = [None] * n_in
        grads_b: list[torch.Tensor | None] = [None] * n_out
        if grad_out is None:
            return (None, None, None, *grads_a, *grads_b)

        in_features, out_features = prod(plan.in_shape), prod(plan.out_shape)
        g2 = grad_out.reshape(-1, out_features)
        n = g2.shape[0]
        need_c = need_x or any(need_a)
        grad_bias = g2.sum(0) if need_bias else None
        ts = saved  # partial input contractions (mode-wise input route only)

        # Output side: from dL/dy to dL/dB_p and dL/dc.
        dc = None
        if plan.out_khatri_rao:
            if any(need_b):
                # (R, N) @ (N, H) keeps the long axis as the GEMM's output columns, about
                # twice as fast on CPU as (H, N) @ (N, R) for small R.
                grad_k = (c.t() @ g2).t()
                for p in range(n_out):
                    if need_b[p]:
                        grads_b[p] = _khatri_rao_factor_grad(grad_k, b_fs, p)
                del grad_k
            if need_c:
                dc = g2 @ _khatri_rao(b_fs)
        elif need_c or any(need_b):
            us = _expand(c, b_fs, plan)
            order = plan.out_order
            k = order[-1]
            lk = _OUT_LETTERS[k]
            full = _OUT_LETTERS[:n_out]
            u_sub = "".join(_OUT_LETTERS[m] for m in sorted(order[:-1]))
            g = g2.view(n, *plan.out_shape)
            if need_b[k]:
                grads_b[k] = torch.einsum(f"n{full},n{u_sub}r->{lk}r", g, us[-1])
            du = None
            if need_c or any(need_b[m] for m in order[:-1]):
                du = torch.einsum(f"n{full},{lk}r->n{u_sub}r", g, b_fs[k])
                for step in range(n_out - 2, -1, -1):
                    k = order[step]
                    pos = 1 + sorted(order[: step + 1]).index(k)
                    if need_b[k]:
                        grads_b[k] = _factor_grad(du, us[step], pos)
                    if not (need_c or any(need_b[m] for m in order[:step])):
                        break
                    du = _contract(du, b_fs[k], pos)
            dc = du if need_c else None

        # Input side: from dL/dc to dL/dA_q and dL/dx.
        grad_x = None
        if need_c:
            if plan.in_khatri_rao:
                if any(need_a):
                    grad_k = (dc.t() @ x.reshape(-1, in_features)).t()
                    for q in range(n_in):
                        if need_a[q]:
                            grads_a[q] = _khatri_rao_factor_grad(grad_k, a_fs, q)
                    del grad_k
                # Last, so the largest result is allocated when the least else is alive.
                if need_x:
                    grad_x = (dc @ _khatri_rao(a_fs).t()).view(x.shape)
            else:
                order = plan.in_order
                dt = dc
                for step in range(n_in - 1, 0, -1):
                    # ts[step - 1] holds the modes order[step:], in natural order.
                    k = order[step]
                    pos = 1 + sorted(order[step:]).index(k)
                    if need_a[k]:
                        grads_a[k] = _factor_grad(ts[step - 1], dt, pos)
                    if not (need_x or any(need_a[m] for m in order[:step])):
                        dt = None
                        break
                    dt = _expand_mode(dt, a_fs[k], pos)
                if dt is not None:
                    k = order[0]
                    lk = _IN_LETTERS[k]
                    sub = _IN_LETTERS[:n_in]
                    rest = sub.replace(lk, "")
                    if need_a[k]:
                        x_t = x.reshape(n, *plan.in_shape)
                        grads_a[k] = torch.einsum(f"n{rest}r,n{sub}->{lk}r", dt, x_t)
                    if need_x:
                        grad_x = torch.einsum(f"n{rest}r,{lk}r->n{sub}", dt, a_fs[k])
                        grad_x = grad_x.reshape(x.shape)
        return (grad_x, grad_bias, None, *grads_a, *grads_b)


def check_cp_factors(factors: Sequence[torch.Tensor], name: str) -> tuple[tuple[int, ...], int]:
    """Validate CP factors ``(d_k, R)`` sharing ``R``; return ``(shape, R)``."""
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence | nn.ParameterList):
        raise TypeError(
            f"{name} must be a list or tuple of (d_k, R) tensors, got {type(factors).__name__}"
        )
    factors = list(factors)
    if len(factors) == 0:
        raise ValueError(f"{name} must hold at least one factor")
    if len(factors) > MAX_MODES:
        raise ValueError(f"{name} may hold at most {MAX_MODES} factors, got {len(factors)}")
    for k, f in enumerate(factors):
        check_tensor(f"{name}[{k}]", f)
        if f.dim() != 2 or f.shape[0] < 1 or f.shape[1] < 1:
            raise ValueError(
                f"{name}[{k}] must have shape (d_k, R) with d_k, R >= 1, got {tuple(f.shape)}"
            )
    rank = factors[0].shape[1]
    for k, f in enumerate(factors):
        if f.shape[1] != rank:
            raise ValueError(
                f"all CP factors must share the rank (dim 1): {name}[0] has {rank}, "
                f"{name}[{k}] has {f.shape[1]}"
            )
    return tuple(int(f.shape[0]) for f in factors), int(rank)


def cp_linear(
    input: torch.Tensor,
    in_factors: Sequence[torch.Tensor],
    out_factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    strategy: str = "auto",
) -> torch.Tensor:
    r"""Apply ``y = x W^T + b`` with a CP-factorized, tensorized weight ``W``.

    ``W`` reshaped to ``(out_1, ..., out_P, in_1, ..., in_Q)`` (row-major, as TensorLy-Torch's
    ``to_matrix()``) is ``sum_r B_1[:, r] ∘ ... ∘ B_P[:, r] ∘ A_1[:, r] ∘ ... ∘ A_Q[:, r]``. It
    is never formed: the input is reduced to an ``(N, R)`` core through the input factors and
    expanded through the output factors, at about ``N * R * (H_in + H_out)`` multiply-adds
    (see :func:`cp_linear_flops`). Forward and backward are hand-written
    (:class:`CPLinearFunction`), each step a GEMM, a two-operand einsum or an elementwise
    product. Under autocast every floating argument is cast to the autocast dtype and both
    passes run in it; when no gradient can be needed the kernel runs without an autograd
    node (:func:`kronlayers.functional._amp.apply_autocast`). Double backward is not
    supported (it raises).

    Args:
        input: ``(*, H_in)`` with ``H_in = prod_q in_q``.
        in_factors: ``Q`` tensors ``A_q`` of shape ``(in_q, R)``.
        out_factors: ``P`` tensors ``B_p`` of shape ``(out_p, R)``, same ``R``.
        bias: optional ``(H_out,)`` with ``H_out = prod_p out_p``.
        strategy: ``"auto"`` (the cheapest in FLOPs for this batch size), ``"khatri_rao"``
            (multiply by the ``(H, R)`` Khatri-Rao product of each side's factors: one large
            GEMM, best for batches larger than the mode sizes) or ``"modewise"`` (contract
            the input modes one at a time, largest first, and expand the output modes one at
            a time; best for a few rows).

    Returns:
        ``(*, H_out)``.

    Example::

        >>> a = [torch.randn(4, 3), torch.randn(5, 3)]  # H_in = 20, R = 3
        >>> b = [torch.randn(2, 3), torch.randn(3, 3)]  # H_out = 6
        >>> x = torch.randn(8, 20)
        >>> y = cp_linear(x, a, b)
        >>> w = torch.einsum("pr,qr,ir,jr->pqij", *b, *a).reshape(6, 20)
        >>> torch.allclose(y, x @ w.T, atol=1e-4)
        True
    """
    check_tensor("input", input)
    in_shape, rank = check_cp_factors(in_factors, "in_factors")
    out_shape, out_rank = check_cp_factors(out_factors, "out_factors")
    if out_rank != rank:
        raise ValueError(
            f"in_factors and out_factors must share the rank (dim 1): in_factors have {rank}, "
            f"out_factors have {out_rank}"
        )
    check_linear_args(
        input,
        bias,
        prod(in_shape),
        prod(out_shape),
        f"the product of the in_factors' sizes {in_shape}",
    )
    factors = [*in_factors, *out_factors]
    named = [(f"in_factors[{k}]", f) for k, f in enumerate(in_factors)]
    named += [(f"out_factors[{k}]", f) for k, f in enumerate(out_factors)]
    if bias is not None:
        named.append(("bias", bias))
    # Under autocast apply_autocast casts every argument to one dtype, so only the device
    # has to match there.
    autocast = _autocast_dtype(input.device.type) is not None
    for name, t in named:
        if t.device != input.device or (t.dtype != input.dtype and not autocast):
            raise TypeError(
                f"{name} has dtype {t.dtype} on {t.device}, but input has dtype {input.dtype} "
                f"on {input.device}; they must match"
            )
    n = input.numel() // prod(in_shape)
    plan = make_plan(in_shape, out_shape, rank, n, strategy)
    return apply_autocast(CPLinearFunction, input, bias, plan, *factors)[0]
