"""``kronecker_linear``: a linear map whose weight is a sum of Kronecker products."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers

from .._shapes import MAX_MODES, prod
from .._validation import check_bias, check_factor_list, check_like, check_linear_input
from ._amp import _LOW_PRECISION, _autocast_dtype, apply_autocast, balance_kron_factors
from ._dispatch import (
    SYMBOLIC_ROWS,
    check_path,
    estimate,
    forced_path,
    plan_generation,
    static_rows,
)
from ._function import split_needs
from ._kron_engine import (
    contract_modes,
    contraction_order,
    kron2_backward,
    kron2_forward,
    kron2_partial_numel,
    kron2_runner,
    kron_dense_ops,
    kron_factorized_ops,
    kron_weight,
    order_cost,
)

__all__ = [
    "KroneckerLinearConfig",
    "KroneckerLinearFunction",
    "check_kron_factors",
    "kronecker_linear",
    "kronecker_linear_flops",
    "kronecker_linear_plan",
]


@dataclass(frozen=True)
class KroneckerLinearConfig:
    """The static part of a :class:`KroneckerLinearFunction` call (hashable, no tensors).

    ``in_shape`` / ``out_shape``: ``(in_1, ..., in_d)`` / ``(out_1, ..., out_d)``; ``rank``: the
    number of Kronecker terms. ``order``: the order in which the modes are contracted
    (``None``: the one with the fewest FLOPs); for two factors ``(1, 0)`` contracts the
    second factor first. ``save_partial``: keep the first contraction of a two-factor
    forward for the backward (then ``forward`` returns ``(y, partial)``).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    rank: int
    order: tuple[int, ...] | None = None
    save_partial: bool = False


def check_kron_factors(factors: Sequence[torch.Tensor], name: str = "factors") -> tuple:
    """Validate Kronecker factors ``(rank, out_k, in_k)``; return ``(in_shape, out_shape)``."""
    factors = check_factor_list(name, factors, 3, "(rank, out_k, in_k)")
    if len(factors) > MAX_MODES:
        raise ValueError(f"{name} may hold at most {MAX_MODES} factors, got {len(factors)}")
    rank = factors[0].shape[0]
    for k, f in enumerate(factors):
        if f.shape[0] != rank:
            raise ValueError(
                f"all {name} must share the rank (dim 0): {name}[0] has {rank}, "
                f"{name}[{k}] has {f.shape[0]}"
            )
    if rank < 1:
        raise ValueError(f"{name} must have rank >= 1 (dim 0), got {rank}")
    for k, f in enumerate(factors):
        if f.shape[1] < 1 or f.shape[2] < 1:
            raise ValueError(
                f"{name}[{k}] must have non-zero sizes (rank, out_k, in_k), got {tuple(f.shape)}"
            )
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

    Two factors (:func:`~kronlayers.functional._kron_engine.kron2_forward` /
    ``kron2_backward``): two GEMMs per direction whatever the rank, the rank terms stacked
    along a factor axis so that every step is one GEMM on views of the activations (only
    the factors are ever permuted); the factor contracted second gets its gradient from
    one batched product summed over the rows (``addbmm``). More factors: one contraction
    per mode (a plain GEMM for a single term, an einsum over the rank axis otherwise).

    Row blocks: when the partial product (``rows * R * in_1 * out_2`` entries when the
    second factor goes first) exceeds 2^20 entries, forward and backward run over blocks
    of rows whose partials stay in cache (2^19 entries per block), writing each block's
    output into its slice and accumulating the factor gradients in place. Unblocked, a
    partial that large goes through memory, and past 32 MiB comes from freshly faulted-in
    pages on every call: blocking halved the time at rank 32 for 4096 features at batch
    256. Not under ``create_graph`` (the backward must then be recorded), torch.compile
    or functorch transforms, which run the same ops unblocked.

    Memory / time trade in backward: with ``config.save_partial`` (two factors only) the
    forward runs unblocked and also returns its first contraction, marked
    non-differentiable and saved, and the backward reuses it for the gradient of the other
    factor instead of recomputing it: one GEMM of ``rows * R * in_1 * in_2 * out_2``
    multiply-adds (for the second factor first) saved, at the price of keeping the partial
    alive until backward. The dispatcher (:func:`kronecker_linear_plan`) weighs both
    variants, and offers the saving one only when that factor needs a gradient and the
    partial is at most as large as the input and output together (so the saved
    activations stay within twice ``nn.Linear``'s). Otherwise only the input and the
    factors are saved and the partial is recomputed, block by block.

    Composability: the backward is made of differentiable torch ops, so double backward
    (``create_graph=True``, ``gradgradcheck``) works; under ``create_graph`` the partial is
    always recomputed (the saved one carries no graph). ``torch.func.vmap`` (and per-sample
    gradients with ``vmap(grad(...))``) works through ``generate_vmap_rule``, which vmaps the
    plain-torch forward and backward. Forward-mode AD (``jvp``, ``jacfwd``) is not
    implemented here and raises PyTorch's error asking for a ``jvp`` staticmethod; under
    functorch transforms :func:`kronecker_linear` (and the module) run the same GEMMs as
    plain ops instead of this Function, so ``jacfwd`` works through them.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        bias: torch.Tensor | None,
        config: KroneckerLinearConfig,
        *factors: torch.Tensor,
    ):
        in_shape, out_shape = config.in_shape, config.out_shape
        lead = x.shape[:-1]
        if len(in_shape) == 2:
            m = x.numel() // prod(in_shape)
            y, partial = kron2_forward(
                x,
                factors[0],
                factors[1],
                bias,
                _first_mode(config),
                _dims(config),
                m,
                config.save_partial,
            )
            y = y.view(*lead, prod(out_shape))
            if config.save_partial:
                return y, partial
            return y
        t = x.reshape(-1, *in_shape)
        fs = _maybe_squeeze_rank(factors)
        order = _order(config)
        y = contract_modes(t, fs, order, has_rank=False, transpose=False, reduce_rank=True)
        y = y.reshape(*lead, prod(out_shape))
        if bias is not None:
            y = y + bias
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, config, *factors = inputs
        if config.save_partial:
            partial = output[1]
            ctx.mark_non_differentiable(partial)
            ctx.save_for_backward(x, partial, *factors)
        else:
            ctx.save_for_backward(x, *factors)
        # The partial output never receives a gradient: do not allocate zeros for it.
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        ctx.config = config

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, *_unused):
        config = ctx.config
        in_shape, out_shape = config.in_shape, config.out_shape
        saved = ctx.saved_tensors
        if config.save_partial:
            x, partial, *factors = saved
        else:
            (x, *factors), partial = saved, None
        need_x, need_bias, need_factors = split_needs(ctx)
        if grad_out is None:
            return (None, None, None, *(None for _ in factors))
        # An expanded gradient (of y.sum()) would send the batched GEMMs below down a slow
        # per-entry path: one copy here instead (see plain_grad).
        grad_out = grad_out.contiguous()
        grad_x = grad_bias = None
        if ctx.has_bias and need_bias:
            grad_bias = grad_out.reshape(-1, prod(out_shape)).sum(0)
        if len(in_shape) == 2:
            if torch.is_grad_enabled():
                partial = None  # create_graph: recompute it with a graph
            gx, ga, gb = kron2_backward(
                x,
                factors[0],
                factors[1],
                grad_out,
                _first_mode(config),
                _dims(config),
                x.numel() // prod(in_shape),
                partial,
                (need_x, need_factors[0], need_factors[1]),
            )
            if gx is not None:
                grad_x = gx.reshape(x.shape)
            return (grad_x, grad_bias, None, ga, gb)
        g = grad_out.reshape(-1, *out_shape)
        fs = _maybe_squeeze_rank(factors)
        if need_x:
            order = contraction_order(out_shape, in_shape)
            gx = contract_modes(g, fs, order, has_rank=False, transpose=True, reduce_rank=True)
            grad_x = gx.reshape(x.shape)
        grad_factors = []
        t = None
        for k, f in enumerate(factors):
            if not need_factors[k]:
                grad_factors.append(None)
                continue
            if t is None:
                t = x.reshape(-1, *in_shape)
            gk = _factor_grad(t, g, fs, k)
            grad_factors.append(gk.reshape(f.shape))
        return (grad_x, grad_bias, None, *grad_factors)


def _order(config: KroneckerLinearConfig) -> tuple[int, ...]:
    if config.order is not None:
        return config.order
    return tuple(contraction_order(config.in_shape, config.out_shape))


def _first_mode(config: KroneckerLinearConfig) -> int:
    return _order(config)[0]


def _dims(config: KroneckerLinearConfig) -> tuple[int, int, int, int, int]:
    (i1, i2), (o1, o2) = config.in_shape, config.out_shape
    return config.rank, o1, i1, o2, i2


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
    *,
    path: str | None = None,
) -> torch.Tensor:
    r"""Apply ``y = x W^T + b`` with ``W = sum_r F_1[r] ⊗ F_2[r] ⊗ ... ⊗ F_d[r]``.

    Two ways to compute it, chosen per call shape by a cost model
    (:mod:`kronlayers.functional._dispatch`, see :func:`kronecker_linear_plan`):

    - ``"factorized"``: ``W`` is never formed: the input is viewed as a ``d``-way tensor
      and each axis is multiplied by its factor (the vec trick), with hand-written forward
      and backward kernels (see :class:`KroneckerLinearFunction`);
    - ``"dense"``: ``W`` is formed from the factors (about ``rank * H_out * H_in``
      multiply-adds) and applied with one GEMM; autograd differentiates both steps (exact,
      double backward included). Chosen when the rank is high enough, or the batch small
      enough, that the factorized contractions cost more.

    Args:
        input: ``(*, H_in)`` with ``H_in = prod_k in_k``.
        factors: ``d`` tensors, factor ``k`` of shape ``(rank, out_k, in_k)``. The same tensor
            may appear several times (shared factors); its gradients are summed.
        bias: optional ``(H_out,)`` with ``H_out = prod_k out_k``.
        path: ``None`` (automatic), ``"factorized"`` or ``"dense"``; overrides
            :func:`~kronlayers.functional._dispatch.force_path`.

    Returns:
        ``(*, H_out)``.

    Guarantees:

    * float32 / float64: the kernels run on the factors as given (bit-identical to calling
      :class:`KroneckerLinearFunction`, or ``F.linear`` with the formed weight, directly).
    * float16 / bfloat16 (the input's dtype, or the autocast dtype): the factors are first
      rescaled per rank term, in float32 and without changing ``W`` (``(c A) ⊗ (B / c) =
      A ⊗ B``), so that every factor of term ``r`` has the norm ``P_r ** (1 / d)``, ``P_r =
      prod_k ||F_k[r]||_F`` (:func:`kronlayers.functional._amp.balance_kron_factors`), on
      both paths and in the module's cached calls. After ``j`` of the ``d`` steps an
      intermediate of term ``r`` is then at most ``||x|| P_r ** (j / d)``, between the
      input's and the output's scale, so badly balanced factors (norms ``1e3`` and
      ``1e-3``) no longer overflow where the dense layer stays finite; gradients with
      respect to the original factors are exact up to rounding. Not guaranteed:
      finiteness when a term itself exceeds the format (``||x|| P_r`` above ~65504 for
      fp16) even if the terms cancel in ``y``, accuracy beyond the format's (about 3 and 2
      significant digits), or balancing when a factor norm exceeds float32's range.

    Example::

        >>> a, b = torch.randn(1, 3, 4), torch.randn(1, 5, 6)
        >>> x = torch.randn(8, 24)
        >>> y = kronecker_linear(x, [a, b])
        >>> torch.allclose(y, x @ torch.kron(a[0], b[0]).T, atol=1e-5)
        True
    """
    in_shape, out_shape = check_kron_factors(factors)
    check_linear_input(input, prod(in_shape), f"the product of the factors' in sizes {in_shape}")
    autocast = _autocast_dtype(input.device.type) is not None
    for k, f in enumerate(factors):
        check_like(f"factors[{k}]", f, input, autocast=autocast)
    check_bias(bias, prod(out_shape), input, autocast=autocast)
    path = check_path(path)
    config = KroneckerLinearConfig(in_shape, out_shape, factors[0].shape[0])
    return kronecker_linear_call(input, bias, config, tuple(factors), path)


def kronecker_linear_call(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    config: KroneckerLinearConfig,
    factors: tuple[torch.Tensor, ...],
    path: str | None = None,
    plans: dict | None = None,
) -> torch.Tensor:
    """The dispatching kernel call without argument checks (the module's hot path).

    The caller guarantees that the factors and bias match ``config`` and share one dtype
    and device. ``plans``: a dict owned by the caller (a module keeps one per layer) in
    which a ready-made runner is cached per call signature (input shape, dtype, device,
    which gradients, forced path); the input is validated (by :func:`kronecker_linear`'s
    checks, which raise its errors) when its signature is first seen. Without ``plans``
    the caller must have validated the input too; the plan then comes from a process-wide
    cache and is dispatched on every call.

    In float16 / bfloat16 (the input's dtype or the autocast dtype) the factors are balanced
    first (:func:`kronlayers.functional._amp.balance_kron_factors`), on every path.
    """
    device_type = input.device.type
    amp = _autocast_dtype(device_type)
    if plans is not None and amp is not None:
        # Autocast calls bypass the cached runners, whose first call validates the input:
        # validated here (else a wrong input fails inside a GEMM, without naming it).
        _check_call(input, factors, bias, config)
    # fp16 / bf16 only (autocast leaves a float64 input alone): equalize the factor norms per
    # rank term so that no intermediate overflows where the dense layer stays finite. The
    # weight is unchanged, and float32 / float64 calls get the very same tensors.
    dtype = input.dtype if amp is None or input.dtype == torch.float64 else amp
    if dtype in _LOW_PRECISION:
        factors = balance_kron_factors(factors, dtype)
    if torch.is_grad_enabled():
        needs = (
            input.requires_grad,
            bias is not None and bias.requires_grad,
            *[f.requires_grad for f in factors],
        )
    else:
        needs = _NO_NEEDS[len(factors)]
    forced = path if path is not None else forced_path()
    if torch.compiler.is_compiling():
        # Compiled and exported graphs run at batch sizes other than the example's, and a
        # decision on a symbolic batch would be a guard (a recompilation at every switch
        # point, or an export constraint violation); under Dynamo a symbolic size passes for
        # an int, so static_rows cannot tell. So plan for SYMBOLIC_ROWS, as every layer
        # does while compiling: one graph for every batch size. The plan is plain Python
        # on static sizes, which Dynamo folds (a cache lookup would graph-break).
        rows = None
        chosen, fconfig = _plan(
            config, rows, input.dtype.itemsize, device_type, needs, bias is not None, forced
        )
        return _dispatch(chosen, fconfig, input, bias, factors, device_type)
    exporting = torch.compiler.is_exporting()  # non-strict export: symbolic sizes, eager
    if (
        plans is not None
        and not exporting
        and amp is None
        and not torch._C._are_functorch_transforms_active()  # per-sample shapes
    ):
        key = (input.shape, input.dtype, input.device, needs, bias is not None, forced)
        entry = plans.get(key)
        if entry is None or entry[0] != plan_generation():
            _check_call(input, factors, bias, config)
            if len(plans) >= _MAX_PLANS:
                plans.clear()
            rows = static_rows(input.shape)
            chosen, fconfig = _plan(
                config, rows, input.dtype.itemsize, device_type, needs, key[4], forced
            )
            entry = plans[key] = (plan_generation(), _runner(chosen, fconfig, input.shape))
        return entry[1](input, bias, factors)
    rows = None if exporting else static_rows(input.shape)
    key = (rows, input.dtype, device_type, needs, bias is not None, forced, plan_generation())
    chosen, fconfig = _plan_cached(config, *key)
    return _dispatch(chosen, fconfig, input, bias, factors, device_type)


def _check_call(input, factors, bias, config) -> None:
    """What :func:`kronecker_linear` checks about the input (same errors)."""
    h_in = prod(config.in_shape)
    check_linear_input(input, h_in, f"the product of the factors' in sizes {config.in_shape}")
    autocast = _autocast_dtype(input.device.type) is not None
    for k, f in enumerate(factors):
        check_like(f"factors[{k}]", f, input, autocast=autocast)
    check_bias(bias, prod(config.out_shape), input, autocast=autocast)


def _inference_state(device_type: str) -> tuple | None:
    """What a cached no-grad runner depends on besides its arguments (``None`` under
    autocast, where no runner is cached)."""
    if _autocast_dtype(device_type) is not None:
        return None
    return (forced_path(), plan_generation())


def _inference_runner(config, input, bias, factors, params):
    """For a no-grad call of one row through two single-term factors on the factorized
    path: ``(input shape, dtype, device, (*params, bias), their storage pointers, state,
    run)`` where ``run(x)`` computes ``A @ X @ B^T + bias`` with views of the factors made
    once (two GEMM calls and two views per call). ``None`` for any other call, and in
    float16 / bfloat16."""
    in_shape, out_shape = config.in_shape, config.out_shape
    state = _inference_state(input.device.type)
    if len(in_shape) != 2 or config.rank != 1 or state is None or input.dim() == 0:
        return None
    if input.dtype in _LOW_PRECISION:
        # Its views of the raw factors would skip the balancing kronecker_linear_call does
        # in half precision (and balanced copies would not see in-place updates).
        return None
    if static_rows(input.shape) != 1 or torch.compiler.is_exporting():
        return None
    needs = _NO_NEEDS[len(factors)]
    chosen, fconfig = _plan_cached(
        config, 1, input.dtype, input.device.type, needs, bias is not None, state[0], state[1]
    )
    if chosen != "ops":
        return None
    (i1, i2), (o1, o2) = in_shape, out_shape
    shape_x, shape_y = (i1, i2), (*input.shape[:-1], o1 * o2)
    with torch.no_grad():
        a = factors[0].view(o1, i1)
        bt = factors[1].view(o2, i2).t()
        b2 = None if bias is None else bias.view(o1, o2)
    if fconfig.order[0] == 1:
        if b2 is None:

            def run(x):
                return torch.mm(a, torch.mm(x.reshape(shape_x), bt)).view(shape_y)
        else:

            def run(x):
                return torch.addmm(b2, a, torch.mm(x.reshape(shape_x), bt)).view(shape_y)
    elif b2 is None:

        def run(x):
            return torch.mm(torch.mm(a, x.reshape(shape_x)), bt).view(shape_y)
    else:

        def run(x):
            return torch.addmm(b2, torch.mm(a, x.reshape(shape_x)), bt).view(shape_y)

    ptrs = (*[p.data_ptr() for p in params], 0 if bias is None else bias.data_ptr())
    return (input.shape, input.dtype, input.device, (*params, bias), ptrs, state, run)


def _dispatch(chosen, fconfig, input, bias, factors, device_type):
    if chosen == "dense":
        return F.linear(input, kron_weight(factors), bias)
    if _autocast_dtype(device_type) is not None:
        out = apply_autocast(KroneckerLinearFunction, input, bias, fconfig, *factors)
        return out[0] if fconfig.save_partial else out
    if chosen == "function" and (
        torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active()
    ):
        out = _apply(KroneckerLinearFunction, input, bias, fconfig, *factors)
        return out[0] if fconfig.save_partial else out
    # The "ops" kernel: the same GEMMs as plain ops (recorded by autograd if needed). Also
    # under functorch transforms (vmap, grad, jacrev, jacfwd): plain ops have every rule,
    # forward-mode AD included, which the hand-written Function lacks.
    return plain_grad(_factorized(input, bias, fconfig, factors))


def plain_grad(y: torch.Tensor) -> torch.Tensor:
    """``y``, whose gradient will reach the ops before it contiguous.

    The gradient of ``y.sum()`` or ``y.mean()`` is an expanded tensor (all strides 0); a
    batched GEMM on such an operand falls back to one small product per batch entry with a
    copy each (3x the whole backward of a 256 x 256 layer at batch 256, measured). A hook
    makes it contiguous once, at the cost of one pass over ``y``'s gradient, which every
    later GEMM then reads at full speed. Eager mode only (compiled graphs handle strides
    themselves; hooks do not compose with ``torch.func`` transforms)."""
    if (
        y.requires_grad
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    ):
        y.register_hook(_contiguous)
    return y


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _runner(chosen, fconfig, input_shape):
    """A function ``(input, bias, factors) -> y`` for one call signature: the dispatch
    decided once, the sizes baked in (no autocast: callers check it first)."""
    if chosen == "dense":
        return lambda x, bias, fs: F.linear(x, kron_weight(fs), bias)
    if chosen == "function":
        fn, save = KroneckerLinearFunction, fconfig.save_partial
        if save:
            return lambda x, bias, fs: _apply(fn, x, bias, fconfig, *fs)[0]
        return lambda x, bias, fs: _apply(fn, x, bias, fconfig, *fs)
    if len(fconfig.in_shape) != 2:
        return lambda x, bias, fs: plain_grad(
            KroneckerLinearFunction.forward(x, bias, fconfig, *fs)
        )
    dims = _dims(fconfig)
    out_shape = (*input_shape[:-1], dims[1] * dims[3])
    run = kron2_runner(fconfig.order[0], dims, prod(input_shape[:-1]), out_shape)
    return lambda x, bias, fs: plain_grad(run(x, fs[0], fs[1], bias))


def _factorized(input, bias, config, factors):
    if len(config.in_shape) == 2:
        dims = _dims(config)
        _, o1, i1, o2, i2 = dims
        m = input.numel() // (i1 * i2)
        y = kron2_forward(input, factors[0], factors[1], bias, config.order[0], dims, m, False)[0]
        return y.view(*input.shape[:-1], o1 * o2)
    return KroneckerLinearFunction.forward(input, bias, config, *factors)  # d != 2


_NO_NEEDS = tuple((False,) * (d + 2) for d in range(MAX_MODES + 1))
_MAX_PLANS = 256


def _apply(function: type[torch.autograd.Function], *args):
    # Function.apply binds the arguments to forward's signature on every call (for
    # setup_context-style Functions), which costs more than a small layer's forward. The
    # binding only fills in defaults, and forward here has none, so outside functorch
    # transforms and compilation go straight to the C++ apply, as Function.apply then does.
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return _BASE_APPLY(function, *_unwrap_dead_wrappers(args))


def _base_apply(function, *args):
    return super(torch.autograd.Function, function).apply(*args)


_BASE_APPLY = _base_apply


_ORDER_MARGIN = 0.9

# The dense path must beat the factorized one by this factor to be chosen: near the switch
# point the two cost about the same, and the factorized path keeps activations small.
DENSE_MARGIN = 0.9


def _plan(config, rows, itemsize, device_type, needs, has_bias, forced, weight_cached=False):
    """``(kernel, factorized config)``: ``kernel`` is ``"dense"``, ``"function"`` (the
    hand-written :class:`KroneckerLinearFunction`) or ``"ops"`` (the same GEMMs as plain
    torch ops, which autograd records when a gradient is needed: no Python autograd node,
    so less fixed cost per call, but autograd keeps the partial product; always the
    kernel without gradients)."""
    return _plan_times(config, rows, itemsize, device_type, needs, has_bias, forced, weight_cached)[
        :2
    ]


def _plan_times(config, rows, itemsize, device_type, needs, has_bias, forced, weight_cached=False):
    in_shape, out_shape, rank = config.in_shape, config.out_shape, config.rank
    n = SYMBOLIC_ROWS if rows is None else rows
    grad = True in needs
    size = prod(in_shape) + prod(out_shape)
    candidates = {}
    if len(in_shape) == 2:
        for first in (1, 0):
            # The partial serves the factor contracted second: A (0) when B goes first.
            user = 0 if first == 1 else 1
            fits = kron2_partial_numel(in_shape, out_shape, rank, first) <= size
            save = needs[2 + user] and fits
            order = (first, 1 - first)
            if fits or not grad:  # autograd saves the partial: only where it is small
                candidates[("ops", order, save)] = kron_factorized_ops(
                    in_shape, out_shape, rank, n, order, True, needs, has_bias, autograd=True
                )
            if grad:
                # Saving the partial spares its recomputation in backward but keeps the
                # forward from running in cache-sized row blocks: both are candidates.
                for keep in (True, False) if save else (False,):
                    candidates[("function", order, keep)] = kron_factorized_ops(
                        in_shape, out_shape, rank, n, order, keep, needs, has_bias
                    )
    else:
        order = tuple(contraction_order(in_shape, out_shape))
        candidates[("function" if grad else "ops", order, False)] = kron_factorized_ops(
            in_shape, out_shape, rank, n, order, False, needs, has_bias
        )
    times = estimate(candidates, itemsize, device_type)
    # Candidates come in order of preference (second factor first, then plain ops); a
    # later one must be clearly cheaper to win. The model cannot tell apart what makes
    # the preferred ones faster in practice (for 64x64 (x) 64x64 at batch 256, forward +
    # backward: second factor first 20-25% faster; its plain ops 0-5% faster than the
    # Function), and the margin keeps choices stable near a tie.
    best = None
    for key, t in times.items():  # not min(key=...): Dynamo cannot trace that
        if best is None or t < _ORDER_MARGIN * times[best]:
            best = key
    impl, order, save = best
    fconfig = KroneckerLinearConfig(in_shape, out_shape, rank, order, save and impl == "function")
    dense_ops = kron_dense_ops(in_shape, out_shape, rank, n, needs, weight_cached and not grad)
    t_dense = estimate({"dense": dense_ops}, itemsize, device_type)["dense"]
    if forced == "dense" or (forced != "factorized" and t_dense < DENSE_MARGIN * times[best]):
        impl = "dense"
    return impl, fconfig, times[best], t_dense


@functools.lru_cache(maxsize=4096)
def _plan_cached(
    config, rows, dtype, device_type, needs, has_bias, forced, generation, weight_cached=False
):
    return _plan(config, rows, dtype.itemsize, device_type, needs, has_bias, forced, weight_cached)


def kronecker_linear_plan(
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
    path: str | None = None,
    weight_cached: bool = False,
) -> dict:
    """What :func:`kronecker_linear` does for an input of ``input_shape``.

    Returns a dict: ``path`` (``"factorized"`` or ``"dense"``), ``kernel`` (``"dense"``,
    ``"function"``: the hand-written :class:`KroneckerLinearFunction`, or ``"ops"``: the
    same GEMMs as plain ops, recorded by autograd, cheaper per call for small problems and
    the only kernel without gradients), ``order`` (the mode contraction order of the
    factorized kernel), ``save_partial`` and ``seconds`` (the cost model's estimate of
    each path, forward plus the backward the gradient flags imply; for the factorized path
    its best kernel). ``input_grad`` / ``factor_grad`` say which gradients are needed
    (``factor_grad`` also for the bias); ``path`` forces a path as the argument of
    :func:`kronecker_linear` does; ``weight_cached``: the dense weight is already formed
    (:attr:`KroneckerLinear.cache_dense_weight`, no-gradient calls only). A symbolic or
    ``None`` batch size counts as :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS`.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    config = KroneckerLinearConfig(in_shape, out_shape, int(rank))
    d = len(in_shape)
    needs = (bool(input_grad), bool(factor_grad and bias), *((bool(factor_grad),) * d))
    rows = static_rows(tuple(input_shape))
    forced = check_path(path) or forced_path()
    impl, fconfig, t_fact, t_dense = _plan_times(
        config, rows, dtype.itemsize, device_type, needs, bias, forced, weight_cached
    )
    return {
        "path": "dense" if impl == "dense" else "factorized",
        "kernel": impl,
        "order": fconfig.order,
        "save_partial": fconfig.save_partial,
        "seconds": {"factorized": t_fact, "dense": t_dense},
    }


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
