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

from .._shapes import LETTERS, MAX_MODES, UPPER_LETTERS, prod
from .._validation import check_bias, check_factor_list, check_like, check_linear_input
from ..ops.khatri_rao import khatri_rao as _khatri_rao
from ._amp import _autocast_dtype, apply_autocast, balance_cp_stages, compute_dtype
from ._function import split_needs

__all__ = ["CPLinearFunction", "check_cp_factors", "cp_linear", "cp_linear_flops"]

_IN_LETTERS = LETTERS
_OUT_LETTERS = UPPER_LETTERS
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

    ``n`` may be symbolic (the batch size of ``torch.export`` with a dynamic dimension or of
    ``torch.compile(dynamic=True)``). A comparison of costs that the symbolic shape's range
    does not decide on its own is then settled by the cost model's large-batch limit, the
    Khatri-Rao route, rather than by the example's value: the plan adds no guard on ``n``,
    so one graph serves every batch size (no recompilation at a plan switch).
    """
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a str, one of {_STRATEGIES}, got {type(strategy).__name__} "
            f"{strategy!r}"
        )
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if isinstance(n, int) and not torch.compiler.is_compiling():
        # Concrete: cached (plans are pure functions of hashable shapes), off every call's
        # path. (Dynamo reports a SymInt as an int, hence the is_compiling check.)
        return _make_plan_cached(tuple(in_shape), tuple(out_shape), rank, n, strategy)
    return _make_plan(tuple(in_shape), tuple(out_shape), rank, n, strategy)


def _prefer_khatri_rao(khatri_rao_cost, modewise_cost) -> bool:
    # statically_known_true is the plain comparison for ints; for a symbolic batch size it is
    # True only where the comparison holds for every value in the shape's range (no guard),
    # and then, unless the mode-wise route is known to be cheaper throughout, Khatri-Rao.
    cheaper = khatri_rao_cost <= modewise_cost
    if isinstance(cheaper, bool) and not torch.compiler.is_compiling():
        return cheaper
    # Only symbolic shapes get here (sympy, which this imports, is loaded by then anyway).
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if statically_known_true(cheaper):
        return True
    return not statically_known_true(khatri_rao_cost > modewise_cost)


def _make_plan(in_shape, out_shape, rank, n, strategy) -> CPLinearPlan:
    in_order, in_mode_cost = _modewise_in(in_shape, n, rank)
    out_order, out_mode_cost = _modewise_out(out_shape, n, rank)
    if strategy == "auto":
        in_kr = _prefer_khatri_rao(
            _khatri_rao_cost(in_shape, rank) + n * prod(in_shape) * rank, in_mode_cost
        )
        out_kr = _prefer_khatri_rao(
            _khatri_rao_cost(out_shape, rank) + n * prod(out_shape) * rank, out_mode_cost
        )
    else:
        in_kr = out_kr = strategy == "khatri_rao"
    return CPLinearPlan(in_shape, out_shape, rank, in_kr, in_order, out_kr, out_order)


_make_plan_cached = lru_cache(maxsize=256)(_make_plan)


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


def _contract_input(
    x2: torch.Tensor, a_fs: Sequence[torch.Tensor], plan: CPLinearPlan
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The input side ``c = x K_in`` (``(N, R)``) and the partial contractions kept for backward.

    Khatri-Rao route: one GEMM, nothing kept. Mode-wise route: one GEMM against the first mode
    of ``plan.in_order``, then Hadamard-in-``R`` contractions of the others; the tensors before
    each of those are returned (``ts[j]`` holds the modes ``in_order[j + 1:]`` in natural
    order). Plain differentiable ops: the backward reruns it to differentiate through ``c``.
    """
    n_in = len(plan.in_shape)
    saved: list[torch.Tensor] = []
    if plan.in_khatri_rao:
        return x2 @ _khatri_rao(a_fs), saved
    k = plan.in_order[0]
    rest = [m for m in range(n_in) if m != k]
    sub = _IN_LETTERS[:n_in]
    out = "".join(_IN_LETTERS[m] for m in rest)
    # The one GEMM of this route; the surviving modes stay in natural order.
    t = torch.einsum(
        f"n{sub},{_IN_LETTERS[k]}r->n{out}r", x2.view(x2.shape[0], *plan.in_shape), a_fs[k]
    )
    for k in plan.in_order[1:]:
        saved.append(t)
        t = _contract(t, a_fs[k], 1 + rest.index(k))
        rest.remove(k)
    return t, saved


class CPLinearFunction(torch.autograd.Function):
    """``y = x @ W.T + bias`` for a CP-factorized ``W``, with a hand-written backward.

    Called as ``CPLinearFunction.apply(x, bias, plan, *in_factors, *out_factors)`` (see
    :func:`make_plan`); returns ``(y, c, *saved)`` where only ``y`` is differentiable:
    ``c = x K_in`` is the ``(N, R)`` core and ``saved`` the partial contractions kept for
    backward, returned so that ``setup_context`` can save them (the way to save an
    intermediate in this style). Use :func:`cp_linear`, which validates the arguments and
    returns ``y`` alone. (A single differentiable output also lets ``y`` be modified in place,
    e.g. by ``nn.ReLU(inplace=True)``.)

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

    Composability: the backward is made of differentiable ops (GEMMs, einsums, elementwise
    products and sums), so ``create_graph=True`` (gradient penalties, ``gradgradcheck``,
    ``torch.func.jacrev`` of ``jacrev``) gives exact higher derivatives. The saved ``c`` and
    partial contractions are non-differentiable (they carry no graph back to ``x`` and
    ``A_q``), so when the backward is itself differentiated (grad mode on inside it, i.e.
    ``create_graph=True``) and ``x`` or an ``A_q`` needs a gradient, it recomputes them from
    ``x`` and the factors with the forward's ops (one more input-side pass, about
    ``N R H_in`` multiply-adds, only in that case); a first-order backward reads the saved
    ones. ``torch.func.vmap`` (and ``jacrev``, per-sample gradients) works through
    ``generate_vmap_rule``, which vmaps the plain-torch forward and backward. Forward-mode
    AD (``jvp``, ``jacfwd``, ``hessian``) is not implemented and raises PyTorch's error
    asking for a ``jvp`` staticmethod.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, bias: torch.Tensor | None, plan: CPLinearPlan, *factors):
        n_in = len(plan.in_shape)
        a_fs, b_fs = factors[:n_in], factors[n_in:]
        in_features, out_features = prod(plan.in_shape), prod(plan.out_shape)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        n = x2.shape[0]
        c, saved = _contract_input(x2, a_fs, plan)

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
        # _unsafe_view: not a view of a tensor made here, so that y may be modified in place
        # (nn.ReLU(inplace=True) after the layer); nothing else refers to its memory.
        y = torch.ops.aten._unsafe_view(y.contiguous(), (*lead, out_features))
        return (y, c, *saved)

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
    def backward(ctx, grad_out: torch.Tensor | None, *_unused):
        plan: CPLinearPlan = ctx.plan
        n_in, n_out = len(plan.in_shape), len(plan.out_shape)
        x, c, *rest = ctx.saved_tensors
        a_fs, b_fs, saved = rest[:n_in], rest[n_in : n_in + n_out], rest[n_in + n_out :]
        need_x, need_bias, need_factors = split_needs(ctx)
        need_bias = need_bias and ctx.has_bias
        need_a, need_b = list(need_factors[:n_in]), list(need_factors[n_in:])
        grads_a: list[torch.Tensor | None] = [None] * n_in
        grads_b: list[torch.Tensor | None] = [None] * n_out
        if grad_out is None:
            return (None, None, None, *grads_a, *grads_b)
        need_c = need_x or any(need_a)
        in_features, out_features = prod(plan.in_shape), prod(plan.out_shape)
        n = x.numel() // in_features
        if need_c and torch.is_grad_enabled():
            # Differentiated backward (create_graph=True): c and the partial contractions as
            # differentiable functions of x and the factors, so that the gradients reaching
            # them in double backward flow on (see the class docstring).
            c, saved = _contract_input(x.reshape(n, in_features), a_fs, plan)
        ts = saved  # partial input contractions (mode-wise input route only)

        # Output side: from dL/dy to dL/dB_p and dL/dc.
        g2 = grad_out.reshape(n, out_features)
        dc = None
        grad_bias = g2.sum(0) if need_bias else None
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
                    grad_k = (dc.t() @ x.reshape(n, in_features)).t()
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
    if isinstance(factors, nn.ParameterList):
        factors = list(factors)
    factors = check_factor_list(name, factors, 2, "(d_k, R)")
    if len(factors) > MAX_MODES:
        raise ValueError(f"{name} may hold at most {MAX_MODES} factors, got {len(factors)}")
    for k, f in enumerate(factors):
        if f.shape[0] < 1 or f.shape[1] < 1:
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
    node (:func:`kronlayers.functional._amp.apply_autocast`).

    Guarantees:

    * Derivatives of every order are exact (the backward is differentiable): gradient
      penalties, ``gradgradcheck``, ``torch.func.vmap`` / ``grad`` / ``jacrev`` work.
      Forward-mode AD (``jvp``, ``jacfwd``) raises PyTorch's error asking for a ``jvp``.
    * float32 / float64: the kernel runs on the factors as given (bit-identical to calling
      :class:`CPLinearFunction` directly).
    * float16 / bfloat16 (the input's dtype, or the autocast dtype): the factors are first
      rescaled per rank term, in float32 and without changing ``W``, so that ``K_in`` and
      ``K_out`` carry equal shares of each rank-one term's norm ``P_r = prod ||column r||``
      (:func:`kronlayers.functional._amp.balance_cp_stages`). Then each term's core
      ``|c_r| <= ||x|| sqrt(P_r)`` lies between the input's and the output's scale, so badly
      balanced factors (norms ``1e3`` and ``1e-3``) no longer overflow the core where the
      dense layer stays finite. Not guaranteed: finiteness when the terms themselves exceed
      the format (``||x|| sqrt(P_r)`` above ~65504 for fp16) even if they cancel in ``y``, or
      accuracy beyond the format's (about 3 and 2 significant digits).
    * Meta tensors: meta input and factors give a meta output of the right shape (shape
      inference); mixing devices raises ``ValueError`` naming the argument.
    * ``strategy="auto"`` with a symbolic batch size (``torch.export`` with a dynamic batch,
      ``torch.compile(dynamic=True)``) takes the large-batch route, so one graph serves
      every batch size; concrete batch sizes use the cost model (:func:`make_plan`).

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
    in_shape, rank = check_cp_factors(in_factors, "in_factors")
    out_shape, out_rank = check_cp_factors(out_factors, "out_factors")
    if out_rank != rank:
        raise ValueError(
            f"in_factors and out_factors must share the rank (dim 1): in_factors have {rank}, "
            f"out_factors have {out_rank}"
        )
    check_linear_input(input, prod(in_shape), f"the product of the in_factors' sizes {in_shape}")
    # Under autocast apply_autocast casts every argument to one dtype, so only the device
    # has to match there.
    autocast = _autocast_dtype(input.device.type) is not None
    for k, f in enumerate(in_factors):
        check_like(f"in_factors[{k}]", f, input, autocast=autocast)
    for k, f in enumerate(out_factors):
        check_like(f"out_factors[{k}]", f, input, autocast=autocast)
    check_bias(bias, prod(out_shape), input, autocast=autocast)
    # fp16 / bf16 only: equalize the factors' column norms per rank term (the weight is
    # unchanged; float32 / float64 calls get the very same tensors).
    in_factors, out_factors = balance_cp_stages(
        [list(in_factors), list(out_factors)], compute_dtype(input)
    )
    n = input.numel() // prod(in_shape)  # symbolic under torch.export / dynamic compile
    plan = make_plan(in_shape, out_shape, rank, n, strategy)
    return apply_autocast(CPLinearFunction, input, bias, plan, *in_factors, *out_factors)[0]
