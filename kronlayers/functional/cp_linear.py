"""``cp_linear``: a linear map whose tensorized weight is a CP (CANDECOMP/PARAFAC) tensor.

The ``(H_out, H_in)`` weight is viewed row-major as ``(out_1, ..., out_P, in_1, ..., in_Q)``
(the layout of TensorLy-Torch's ``CPTensorized.to_matrix()``) and equals

    ``W = sum_r B_1[:, r] ∘ ... ∘ B_P[:, r] ∘ A_1[:, r] ∘ ... ∘ A_Q[:, r]``

with input factors ``A_q`` of shape ``(in_q, R)`` and output factors ``B_p`` of shape
``(out_p, R)``. Equivalently ``W = K_out K_in^T`` where ``K_in = A_1 ⊙ ... ⊙ A_Q`` is the
``(H_in, R)`` Khatri-Rao product (row-major, ``A_1`` slowest) and ``K_out`` likewise, so
``x W^T = (x K_in) K_out^T``: an ``(N, R)`` core in between, about ``N * R * (H_in + H_out)``
multiply-adds instead of ``N * H_in * H_out``, ``W`` never formed; the dispatcher forms it
(one GEMM over the rank) only where that is faster (see :func:`cp_linear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._shapes import LETTERS, MAX_MODES, UPPER_LETTERS, prod
from .._validation import check_bias, check_factor_list, check_like, check_linear_input
from ..ops.khatri_rao import khatri_rao as _khatri_rao
from ..ops.khatri_rao import khatri_rao_grads
from ._amp import _autocast_dtype, apply_autocast, balance_cp_stages, compute_dtype
from ._dispatch import (
    SYMBOLIC_ROWS,
    Gemm,
    Node,
    Op,
    Pass,
    PyFunction,
    call_needs,
    check_path,
    cost_model,
    estimate,
    forced_kernel,
    forced_path,
    plan_generation,
    static_rows,
)
from ._function import split_needs

__all__ = [
    "CPLinearFunction",
    "check_cp_factors",
    "cp_linear",
    "cp_linear_call",
    "cp_linear_flops",
    "cp_linear_plan",
    "cp_linear_weight",
]

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
    n: object,
    strategy: str = "auto",
    *,
    itemsize: int = 4,
    device_type: str = "cpu",
) -> CPLinearPlan:
    """Pick each side's route for ``n`` rows by the cost model, or force ``strategy``.

    The Khatri-Rao route builds ``K`` (``~H * R`` entries, once per call) and runs one large
    GEMM; the mode-wise route runs an einsum GEMM plus Hadamard steps of ``~N * R * H / d``
    entries. Which is faster is a matter of fixed costs as much as of FLOPs (an einsum costs
    several plain ops; an elementwise step runs far below GEMM speed), so each side takes the
    route the :mod:`~kronlayers.functional._dispatch` cost model finds faster for
    ``itemsize``-byte entries on ``device_type``, forward plus a full backward. Measured on
    CPU (1 thread): the Khatri-Rao route wins for every batch size at ``H = 256`` and
    ``1024``; the mode-wise route only when ``K`` is large and the batch tiny.

    ``n`` may be symbolic (the batch size of ``torch.export`` with a dynamic dimension or of
    ``torch.compile(dynamic=True)``): then, and whenever compiling, the plan is made for
    :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` rows, so it adds no guard on
    ``n`` and one graph serves every batch size.
    """
    _check_strategy(strategy)
    rows = _concrete_rows(n)
    return _make_plan(tuple(in_shape), tuple(out_shape), rank, rows, strategy, itemsize,
                      device_type, plan_generation())  # fmt: skip


def _check_strategy(strategy: object) -> None:
    if not isinstance(strategy, str):
        raise TypeError(
            f"strategy must be a str, one of {_STRATEGIES}, got {type(strategy).__name__} "
            f"{strategy!r}"
        )
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")


def _concrete_rows(n: object) -> int:
    # Dynamo reports a SymInt as an int, hence the is_compiling check.
    if isinstance(n, int) and not torch.compiler.is_compiling():
        return n
    return SYMBOLIC_ROWS


def _make_plan(*key) -> CPLinearPlan:
    # Plans are pure functions of hashable sizes: cached in eager mode. While compiling, the
    # plain function (Dynamo would bypass the cache anyway, with a warning).
    if torch.compiler.is_compiling():
        return _plan_routes(*key)
    return _plan_routes_cached(*key)


def _plan_routes(in_shape, out_shape, rank, n, strategy, itemsize, device_type, generation):
    in_order = _modewise_in(in_shape, n, rank)[0]
    out_order = _modewise_out(out_shape, n, rank)[0]
    if strategy == "auto":
        model = cost_model(device_type)
        full = _Needs(True, True, True)

        def kr_cheaper(side, *args) -> bool:
            # Ties go to Khatri-Rao: bigger GEMMs run closer to peak than modelled.
            kr_fwd, kr_bwd = side(*args[:2], n, True, *args[2:])
            mw_fwd, mw_bwd = side(*args[:2], n, False, *args[2:])
            kr = model.time(kr_fwd, itemsize) + model.time(kr_bwd, itemsize)
            return kr <= model.time(mw_fwd, itemsize) + model.time(mw_bwd, itemsize)

        in_kr = kr_cheaper(_input_side, in_shape, rank, full)
        out_kr = kr_cheaper(_output_side, out_shape, rank, full, False)
    else:
        in_kr = out_kr = strategy == "khatri_rao"
    return CPLinearPlan(in_shape, out_shape, rank, in_kr, in_order, out_kr, out_order)


_plan_routes_cached = lru_cache(maxsize=1024)(_plan_routes)


# --- Cost model of each kernel (see kronlayers.functional._dispatch) ----------------------

# torch.einsum's Python-side planning and permutations cost several plain ops (~12 us on
# CPU, measured): counted as that many extra launches.
_EINSUM_LAUNCHES = 6
# The dense kernel must beat the factorized one by this factor to be chosen: near the
# switch point both cost about the same, and the factorized kernel keeps activations small.
DENSE_MARGIN = 0.9


class _Needs(NamedTuple):
    """Which gradients a call computes (a tuple: hashed on every call)."""

    x: bool  # the input's gradient
    factors: bool  # any factor's gradient
    bias: bool  # the bias' gradient

    @property
    def any(self) -> bool:
        return self.x or self.factors or self.bias


def _einsum(m: int, n: int, k: int) -> list[Op]:
    return [Gemm(m, n, k), *[Pass(0)] * _EINSUM_LAUNCHES]


def _launches(ops: Sequence[Op]) -> int:
    """Ops that are real tensor operations (not an einsum's planning overhead)."""
    return sum(1 for op in ops if not (isinstance(op, Pass) and op.elements == 0))


def _kr_build(shape: Sequence[int], rank: int) -> list[Op]:
    """Forming the Khatri-Rao product: one broadcast multiply per mode after the first."""
    ops: list[Op] = []
    size = shape[0]
    for d in shape[1:]:
        size *= d
        ops.append(Pass(size * rank))
    return ops


def _kr_adjoint(shape: Sequence[int], rank: int) -> list[Op]:
    """Every factor's gradient from the ``(H, R)`` gradient of the Khatri-Rao product."""
    ops: list[Op] = []
    if len(shape) < 2:
        return ops
    for k in range(len(shape)):
        size = prod(shape)
        for j in sorted((j for j in range(len(shape)) if j != k), key=lambda j: -shape[j]):
            ops += [Pass(size * rank), Pass(size * rank // shape[j])]  # multiply, then sum
            size //= shape[j]
    return ops


def _input_side(shape, rank, n, khatri_rao, needs: _Needs) -> tuple[list[Op], list[Op]]:
    """Forward and backward ops of ``c = x K_in`` on ``n`` rows."""
    h = prod(shape)
    fwd: list[Op] = []
    bwd: list[Op] = []
    grad_c = needs.x or needs.factors
    if khatri_rao:
        fwd += [*_kr_build(shape, rank), Gemm(n, rank, h)]
        if needs.factors:
            bwd += [Gemm(h, rank, n), *_kr_adjoint(shape, rank)]
        if needs.x:
            bwd.append(Gemm(n, h, rank))
        return fwd, bwd
    order = _modewise_in(shape, n, rank)[0]
    first = order[0]
    fwd += _einsum(n * h // shape[first], rank, shape[first])
    left = h // shape[first]
    for k in order[1:]:
        fwd += [Pass(n * left * rank), Pass(n * left * rank // shape[k])]
        if grad_c:  # the factor's gradient (multiply, sum) and the expansion back
            bwd += [Pass(n * left * rank)] * 3
        left //= shape[k]
    if needs.factors:
        bwd += _einsum(shape[first], rank, n * h // shape[first])
    if needs.x:
        bwd += _einsum(n * h // shape[first], shape[first], rank)
    return fwd, bwd


def _output_side(shape, rank, n, khatri_rao, needs: _Needs, bias: bool):
    """Forward and backward ops of ``y = c K_out^T (+ bias)`` on ``n`` rows."""
    h = prod(shape)
    fwd: list[Op] = []
    bwd: list[Op] = []
    grad_c = needs.x or needs.factors
    if needs.bias:
        bwd.append(Pass(n * h))
    if khatri_rao:
        fwd += [*_kr_build(shape, rank), Gemm(n, h, rank)]  # addmm: the bias is fused
        if needs.factors:
            bwd += [Gemm(h, rank, n), *_kr_adjoint(shape, rank)]
        if grad_c:
            bwd.append(Gemm(n, rank, h))
        return fwd, bwd
    order = _modewise_out(shape, n, rank)[0]
    size = 1
    for k in order[:-1]:
        size *= shape[k]
        fwd.append(Pass(n * size * rank))
        if grad_c or needs.factors:
            bwd += [Pass(n * size * rank)] * 3
    last = order[-1]
    fwd += _einsum(n * h // shape[last], shape[last], rank)
    if bias:
        fwd.append(Pass(n * h))
    if needs.factors:
        bwd += _einsum(shape[last], rank, n * h // shape[last])
    if grad_c or needs.factors:
        bwd += _einsum(n * h // shape[last], rank, shape[last])
    return fwd, bwd


def _kernel_ops(plan: CPLinearPlan, n: int, needs: _Needs, bias: bool) -> dict[str, list[Op]]:
    """The op lists of the three kernels (forward plus the backward ``needs`` implies)."""
    r = plan.rank
    in_fwd, in_bwd = _input_side(plan.in_shape, r, n, plan.in_khatri_rao, needs)
    out_fwd, out_bwd = _output_side(plan.out_shape, r, n, plan.out_khatri_rao, needs, bias)
    fwd, bwd = in_fwd + out_fwd, (in_bwd + out_bwd if needs.any else [])
    # The Function keeps only x and the core: its backward rebuilds the Khatri-Rao products
    # (and the mode-wise expansions) that autograd would keep.
    rebuild: list[Op] = []
    if needs.any:
        if plan.out_khatri_rao and (needs.x or needs.factors):
            rebuild += _kr_build(plan.out_shape, r)
        if plan.in_khatri_rao and needs.x:
            rebuild += _kr_build(plan.in_shape, r)
    # Autograd records about two nodes per op of the forward (views included).
    ops_nodes = [Node(2 * _launches(fwd))] if needs.any else []
    h_in, h_out = prod(plan.in_shape), prod(plan.out_shape)
    dense_fwd = [
        *_kr_build(plan.in_shape, r), *_kr_build(plan.out_shape, r),
        Gemm(h_out, h_in, r), Gemm(n, h_out, h_in),
    ]  # fmt: skip
    dense_bwd: list[Op] = []
    if needs.x:
        dense_bwd.append(Gemm(n, h_in, h_out))
    if needs.factors:
        dense_bwd += [
            Gemm(h_out, h_in, n), Gemm(h_out, r, h_in), Gemm(h_in, r, h_out),
            *_kr_adjoint(plan.in_shape, r), *_kr_adjoint(plan.out_shape, r),
        ]  # fmt: skip
    if needs.bias:
        dense_bwd.append(Pass(n * h_out))
    dense_nodes = [Node(2 * _launches(dense_fwd))] if needs.any else []
    return {
        "function": [PyFunction(needs.any), *fwd, *bwd, *rebuild],
        "ops": [*ops_nodes, *fwd, *bwd],
        "dense": [*dense_nodes, *dense_fwd, *dense_bwd],
    }


def _choose_kernel(*key) -> tuple[str, CPLinearPlan, dict[str, float]]:
    """``(kernel, plan, estimated seconds per kernel)`` for a call signature (cached in eager
    mode, see :func:`_make_plan`)."""
    if torch.compiler.is_compiling():
        return _choose(*key)
    return _choose_cached(*key)


def _choose(
    in_shape, out_shape, rank, rows, strategy, itemsize, device_type, needs, bias, forced,
    generation,
) -> tuple[str, CPLinearPlan, dict[str, float]]:  # fmt: skip
    plan = _make_plan(in_shape, out_shape, rank, rows, strategy, itemsize, device_type,
                      generation)  # fmt: skip
    times = estimate(_kernel_ops(plan, rows, needs, bias), itemsize, device_type)
    if not needs.any:
        # Without gradients the Function's forward is called directly: one kernel.
        times["function"] = times["ops"]
    if forced in ("function", "ops", "dense"):
        return forced, plan, times
    kernel = "ops" if times["ops"] <= times["function"] or not needs.any else "function"
    dense_allowed = forced != "factorized" and strategy == "auto"
    if forced == "dense" or (dense_allowed and times["dense"] < DENSE_MARGIN * times[kernel]):
        kernel = "dense"
    return kernel, plan, times


_choose_cached = lru_cache(maxsize=4096)(_choose)


def _forced(path: str | None) -> str | None:
    """The pinned choice: a ``path=`` argument, else :func:`force_kernel`, else
    :func:`force_path`."""
    if path is not None:
        return path
    return forced_kernel() or forced_path()


def cp_linear_plan(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    input_grad: bool = False,
    factor_grad: bool = True,
    bias: bool = True,
    strategy: str = "auto",
    path: str | None = None,
) -> dict:
    """What :func:`cp_linear` does for an input of ``input_shape``.

    Returns a dict: ``path`` (``"factorized"`` or ``"dense"``), ``kernel`` (``"function"``:
    the hand-written :class:`CPLinearFunction`; ``"ops"``: the same forward's ops
    differentiated by autograd, no Python autograd node; ``"dense"``: the weight formed
    from the factors, then one GEMM), ``plan`` (the factorized route, a
    :class:`CPLinearPlan`) and ``seconds`` (the cost model's estimate of each kernel,
    forward plus the backward the gradient flags imply). ``input_grad`` / ``factor_grad``
    say which gradients are needed (``factor_grad`` also for the bias); ``path`` forces a
    path as the argument of :func:`cp_linear` does. A symbolic batch counts as
    :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` rows.
    """
    path = check_path(path)
    _check_strategy(strategy)
    rows = static_rows(tuple(input_shape))
    needs = _Needs(bool(input_grad), bool(factor_grad), bool(factor_grad and bias))
    kernel, plan, times = _choose_kernel(
        tuple(in_shape), tuple(out_shape), int(rank),
        SYMBOLIC_ROWS if rows is None else rows, strategy, dtype.itemsize, device_type,
        needs, bool(bias), _forced(path), plan_generation(),
    )  # fmt: skip
    return {
        "path": "dense" if kernel == "dense" else "factorized",
        "kernel": kernel,
        "plan": plan,
        "seconds": times,
    }


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
                # (H, N) @ (N, R): contiguous with the rank axis innermost, the layout in
                # which the factor gradients' contractions vectorise (see khatri_rao_grads).
                grads_b = khatri_rao_grads(g2.t() @ c, b_fs, need_b)
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
                    grads_a = khatri_rao_grads(x.reshape(n, in_features).t() @ dc, a_fs, need_a)
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
    path: str | None = None,
) -> torch.Tensor:
    r"""Apply ``y = x W^T + b`` with a CP-factorized, tensorized weight ``W``.

    ``W`` reshaped to ``(out_1, ..., out_P, in_1, ..., in_Q)`` (row-major, as TensorLy-Torch's
    ``to_matrix()``) is ``sum_r B_1[:, r] ∘ ... ∘ B_P[:, r] ∘ A_1[:, r] ∘ ... ∘ A_Q[:, r]``. It
    is contracted through the input factors to an ``(N, R)`` core and expanded through the
    output factors, at about ``N * R * (H_in + H_out)`` multiply-adds (see
    :func:`cp_linear_flops`), by one of three kernels that the cost model of
    :mod:`kronlayers.functional._dispatch` picks per call shape, dtype, device and the
    gradients needed (:func:`cp_linear_plan` tells which):

    * ``"function"``: :class:`CPLinearFunction`, hand-written forward and backward, each step
      a GEMM, a two-operand einsum or an elementwise product; between forward and backward
      it keeps only the input and the core;
    * ``"ops"``: the same forward's ops, differentiated by autograd: no Python autograd node
      (about 0.1 ms less per call on CPU) and the Khatri-Rao products kept rather than
      rebuilt; the only kernel when no gradient is needed;
    * ``"dense"``: ``W`` formed from the factors (one GEMM over the rank), then
      ``F.linear``: chosen when the rank is so high that this is faster (it must be
      clearly faster, :data:`DENSE_MARGIN`), so the layer is never much slower than
      the dense layer it replaces.

    Under autocast every floating argument is cast to the autocast dtype and both passes run
    in it (:func:`kronlayers.functional._amp.apply_autocast`).

    Guarantees:

    * Derivatives of every order are exact (the backward is differentiable): gradient
      penalties, ``gradgradcheck``, ``torch.func.vmap`` / ``grad`` / ``jacrev`` work.
      Forward-mode AD (``jvp``, ``jacfwd``) raises PyTorch's error asking for a ``jvp``.
    * Every kernel computes the same function and gradients (the factorized ones
      bit-identically in forward: they run the same ops); tests compare each against the
      dense reference in float64.
    * float32 / float64: the factorized kernels run on the factors as given (bit-identical
      to calling :class:`CPLinearFunction` directly).
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
    * A symbolic batch size (``torch.export`` with a dynamic batch,
      ``torch.compile(dynamic=True)``), and any call while compiling, is planned for
      :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` rows, so one graph serves every
      batch size; concrete batch sizes in eager mode are planned for their size.

    Args:
        input: ``(*, H_in)`` with ``H_in = prod_q in_q``.
        in_factors: ``Q`` tensors ``A_q`` of shape ``(in_q, R)``.
        out_factors: ``P`` tensors ``B_p`` of shape ``(out_p, R)``, same ``R``.
        bias: optional ``(H_out,)`` with ``H_out = prod_p out_p``.
        strategy: the route of the factorized kernels: ``"auto"`` (per side, the faster
            under the cost model, see :func:`make_plan`), ``"khatri_rao"`` (multiply by the
            ``(H, R)`` Khatri-Rao product of each side's factors: one large GEMM) or
            ``"modewise"`` (contract the input modes one at a time, largest first, and
            expand the output modes one at a time). A route other than ``"auto"`` asks for
            the factorized kernels: the dense kernel is then only taken when forced.
        path: ``None`` (automatic), ``"factorized"`` or ``"dense"``; overrides
            :func:`~kronlayers.functional._dispatch.force_kernel` and
            :func:`~kronlayers.functional._dispatch.force_path`.

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
    path = check_path(path)
    _check_strategy(strategy)
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
    factors = (*in_factors, *out_factors)
    needs = _Needs(*call_needs(input, factors, bias))
    device_type = input.device.type
    n = input.numel() // prod(in_shape)  # symbolic under torch.export / dynamic compile
    kernel, plan, _ = _choose_kernel(
        in_shape, out_shape, rank, _concrete_rows(n), strategy, input.dtype.itemsize,
        device_type, needs, bias is not None, _forced(path), plan_generation(),
    )  # fmt: skip
    if kernel == "dense":
        return F.linear(input, cp_linear_weight(in_factors, out_factors), bias)
    if kernel == "ops" and _autocast_dtype(device_type) is None:
        # The forward's ops, recorded by autograd when a gradient is needed.
        return CPLinearFunction.forward(input, bias, plan, *factors)[0]
    return apply_autocast(CPLinearFunction, input, bias, plan, *factors)[0]


_MAX_PLANS = 256


def cp_linear_call(
    input: object,
    bias: torch.Tensor | None,
    factors: tuple[torch.Tensor, ...],
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    plans: dict,
) -> torch.Tensor | None:
    """:func:`cp_linear` without the per-call argument checks (a module's hot path).

    The caller guarantees that ``factors`` (the ``Q`` input factors, then the output
    factors) and ``bias`` are valid CP factors of ``in_shape`` / ``out_shape`` with one
    dtype and device. ``plans``: a dict the caller owns, in which the kernel and route are
    cached per call signature (input shape, dtypes, device, gradients needed, forced
    kernel); the input is checked (with :func:`cp_linear`'s errors) when its signature is
    first seen. Returns ``None`` where the full :func:`cp_linear` must run instead: autocast,
    half precision (factor balancing), ``torch.func`` transforms, compilation or export.
    """
    if (
        type(input) is not torch.Tensor
        or input.dtype not in _FULL_PRECISION
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._are_functorch_transforms_active()
        or _autocast_dtype(input.device.type) is not None
    ):
        return None
    first = factors[0]
    needs = _Needs(*call_needs(input, factors, bias))
    forced = _forced(None)
    key = (input.shape, input.dtype, input.device, first.dtype, first.device, needs, forced)
    entry = plans.get(key)
    if entry is None or entry[0] != plan_generation():
        check_linear_input(
            input, prod(in_shape), f"the product of the in_factors' sizes {in_shape}"
        )
        check_like("in_factors[0]", first, input, autocast=False)
        check_bias(bias, prod(out_shape), input, autocast=False)
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        kernel, plan, _ = _choose_kernel(
            in_shape, out_shape, first.shape[1], input.numel() // prod(in_shape), "auto",
            input.dtype.itemsize, input.device.type, needs, bias is not None, forced,
            plan_generation(),
        )  # fmt: skip
        entry = plans[key] = (plan_generation(), kernel, plan)
    _, kernel, plan = entry
    if kernel == "dense":
        n_in = len(in_shape)
        return F.linear(input, cp_linear_weight(factors[:n_in], factors[n_in:]), bias)
    if not needs.any and plan.in_khatri_rao and plan.out_khatri_rao:
        return _inference_khatri_rao(input, bias, factors, len(in_shape))
    if kernel == "ops" or not needs.any:
        return CPLinearFunction.forward(input, bias, plan, *factors)[0]
    return apply_autocast(CPLinearFunction, input, bias, plan, *factors)[0]


def _inference_khatri_rao(input, bias, factors, n_in) -> torch.Tensor:
    # The no-gradient Khatri-Rao route with no Python beyond the ops: on a small layer the
    # call's fixed costs are most of its time. (The products are rebuilt on every call: a
    # cache keyed on the factors' version counters would go stale after an in-place write
    # through ``.data``, which bumps no counter.)
    k_in = _khatri_rao(factors[:n_in])
    flat = input.dim() == 2
    c = (input if flat else input.reshape(-1, k_in.shape[0])) @ k_in
    k_out_t = _khatri_rao(factors[n_in:]).t()
    y = c @ k_out_t if bias is None else torch.addmm(bias, c, k_out_t)
    return y if flat else y.view(*input.shape[:-1], k_out_t.shape[1])


_FULL_PRECISION = (torch.float32, torch.float64)


def cp_linear_weight(
    in_factors: Sequence[torch.Tensor], out_factors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The dense ``(H_out, H_in)`` weight ``K_out K_in^T`` of :func:`cp_linear`
    (differentiable; one GEMM over the rank)."""
    return _khatri_rao(out_factors) @ _khatri_rao(in_factors).t()
