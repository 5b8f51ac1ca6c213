"""How the functional wrappers call their ``torch.autograd.Function``: autocast and no-grad.

Autocast only rewrites the dtypes of the ATen ops it knows; inside a custom
``torch.autograd.Function`` the forward would see fp32 parameters next to a low-precision
input, and the backward (which runs outside the autocast region) would mix dtypes again.
:func:`apply_autocast` does what ``torch.amp.custom_fwd(cast_inputs=...)`` does, for any
device type, without a per-Function decorator: when autocast is enabled for the inputs'
device type it casts the floating tensor arguments to the autocast dtype and runs the
Function with autocast disabled, so forward and backward run entirely in that dtype. The
casts are ordinary differentiable ops, so the gradients of fp32 parameters come back in
fp32.

When no gradient can be needed (grad mode off, or no tensor argument requires grad) it calls
the Function's ``forward`` directly instead of ``apply``: the same kernel and the same result,
without an autograd node. This also sidesteps a ``torch.compile`` bug (seen in torch 2.13):
under ``torch.no_grad()``, Dynamo passes a ``ctx`` argument to a ``setup_context``-style
``forward`` that takes ``*args``, which misbinds every argument (``IndexError`` while
tracing), so compiled inference would crash.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["apply_autocast", "balance_cp_stages", "balance_kron_factors", "compute_dtype"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_MAX_LOG_SCALE = 80.0


# Device types autocast knows, found once at import: the queries below raise for others
# (e.g. "meta"), and torch.amp.is_autocast_available itself cannot be traced by Dynamo in
# torch < 2.13 (a graph break, so fullgraph compilation failed on CUDA with torch 2.11).
_AUTOCAST_DEVICE_TYPES = frozenset(
    d
    for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "privateuseone")
    if torch.amp.is_autocast_available(d)
)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype for ``device_type``, or ``None`` when autocast is off there."""
    if device_type not in _AUTOCAST_DEVICE_TYPES:
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _apply(function: type[torch.autograd.Function], args: tuple) -> Any:
    # Only a setup_context-style forward (no ctx argument) can be called on its own. (The
    # check is skipped while compiling: Dynamo cannot compare the staticmethods.)
    if (
        not torch.compiler.is_compiling()
        and function.setup_context is torch.autograd.Function.setup_context
    ):
        raise TypeError(
            f"{function.__name__} must define setup_context (a forward without ctx) to be "
            "called through apply_autocast"
        )
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )
    if needs_grad:
        if not torch.compiler.is_compiling():
            _cache_forward_signature(function)
        return function.apply(*args)
    return function.forward(*args)


def _cache_forward_signature(function: type[torch.autograd.Function]) -> None:
    # Function.apply (setup_context style) binds its arguments with inspect.signature(forward)
    # on every call: ~100-200 us, more than a small layer's whole forward. inspect.signature
    # returns a function's __signature__ as is, so compute it once per Function.
    forward = function.forward
    if "__signature__" not in getattr(forward, "__dict__", {}):
        forward.__signature__ = inspect.signature(forward)


def apply_autocast(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``function.apply(*args)``, autocast-aware.

    The device type is that of the first tensor in ``args``. If autocast is enabled for it,
    every floating-point tensor argument except float64 ones (autocast leaves those alone,
    as ``torch.amp.custom_fwd`` does) is cast to ``torch.get_autocast_dtype(device_type)``
    and the Function runs inside ``torch.autocast(device_type, enabled=False)``; non-tensor
    and non-floating arguments pass through unchanged. When no gradient can be needed (grad
    mode off or no tensor argument requiring grad), ``function.forward(*args)`` is called
    instead of ``apply``: same result, no autograd node (see the module docstring).

    Args:
        function: a ``torch.autograd.Function`` subclass with a ``setup_context``
            staticmethod (its ``forward`` takes no ``ctx``); ``TypeError`` otherwise.
        *args: the arguments of ``function.apply``.

    Returns:
        Whatever ``function.apply`` returns (in the autocast dtype under autocast).
    """
    device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), None)
    dtype = None if device_type is None else _autocast_dtype(device_type)
    if dtype is None:
        return _apply(function, args)
    cast = tuple(
        a.to(dtype)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
        else a
        for a in args
    )
    with torch.autocast(device_type, enabled=False):
        return _apply(function, cast)


def compute_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype a kernel called through :func:`apply_autocast` with ``input`` computes in.

    The autocast dtype where autocast is enabled for ``input``'s device type (except for a
    float64 input, which autocast leaves alone), ``input.dtype`` otherwise.
    """
    dtype = _autocast_dtype(input.device.type)
    if dtype is None or input.dtype == torch.float64:
        return input.dtype
    return dtype


def balance_cp_stages(
    stages: list[list[torch.Tensor]], dtype: torch.dtype
) -> list[list[torch.Tensor]]:
    """Rescale CP factors so that each stage of the pipeline carries an equal share of each
    rank term's norm; a no-op (the same tensor objects) unless ``dtype`` is fp16 / bf16.

    ``stages`` lists, in the order the kernel applies them, groups of ``(d, R)`` factors of one
    CP tensor (e.g. ``[in_factors, out_factors]`` for a linear layer). The CP tensor is
    invariant under rescaling column ``r`` of each factor by ``s_k[r]`` with
    ``prod_k s_k[r] = 1``. With ``n_k[r]`` the column norms and ``P[r] = prod_k n_k[r]`` the
    norm of the ``r``-th rank-one term, every factor of stage ``j`` (which holds ``m_j``
    factors, of ``S`` stages) is rescaled to the column norm ``P[r] ** (1 / (S m_j))``: each
    stage then multiplies a term's magnitude by ``P[r] ** (1 / S)``, so the intermediates of
    every stage lie between the input's and the output's scale instead of overflowing (or
    underflowing) when the factors are badly balanced (norms ``1e3`` next to ``1e-3``).

    The scales are computed in float32 without autograd (a rank term with a zero or
    non-finite column is left alone) and applied in float32, then cast back to each factor's
    dtype. Because the scales' product is exactly ``1`` in every term, the function of the
    factors that the kernel computes is unchanged, so gradients, and higher derivatives, with
    respect to the original factors are exact (up to rounding) through the constant scales.
    """
    if dtype not in _LOW_PRECISION:
        return stages
    with torch.no_grad():
        logs = [[f.detach().float().norm(dim=0).log() for f in stage] for stage in stages]
        total = sum(sum(stage) for stage in logs)  # log P[r], (R,)
        log_scales = [[total / (len(stages) * len(stage)) - lg for lg in stage] for stage in logs]
        # Zero / non-finite columns (log P not finite) and scales beyond float32's range
        # (exp(88) overflows) leave the term as it is.
        ok = torch.isfinite(total)
        for stage in log_scales:
            for lg in stage:
                ok = ok & (lg.abs() <= _MAX_LOG_SCALE)
        scales = [[torch.where(ok, lg.exp(), 1.0) for lg in stage] for stage in log_scales]
    return [
        [(f.float() * s).to(f.dtype) for f, s in zip(stage, ss, strict=True)]
        for stage, ss in zip(stages, scales, strict=True)
    ]


def balance_kron_factors(
    factors: Sequence[torch.Tensor], dtype: torch.dtype
) -> Sequence[torch.Tensor]:
    """Rescale Kronecker factors so that, in each rank term, every factor has the same norm;
    a no-op (the same sequence) unless ``dtype`` is fp16 / bf16.

    ``factors``: ``d`` tensors ``(R, out_k, in_k)`` of ``W = sum_r F_1[r] ⊗ ... ⊗ F_d[r]``.
    ``(c A) ⊗ (B / c) = A ⊗ B``, so each term is invariant under scales ``s_k[r]`` with
    ``prod_k s_k[r] = 1``; with ``n_k[r] = ||F_k[r]||_F`` and ``P[r] = prod_k n_k[r]`` (the
    norm of the term), every ``F_k[r]`` is rescaled to the norm ``P[r] ** (1 / d)``. The
    kernels apply one factor per step, and step ``k`` multiplies a term's magnitude by at
    most ``||F_k[r]||``, so each intermediate is bounded by ``||x|| P[r] ** (j / d)`` after
    ``j`` steps, between the input's and the output's scale, instead of overflowing (or
    underflowing) when the factors are badly balanced. The same bound holds for the partial
    products when the weight is formed.

    This is :func:`balance_cp_stages` with one stage per factor (each factor flattened to
    ``(out_k * in_k, R)``): scales computed in float32 without autograd (a term with a zero
    or non-finite factor is left alone), applied in float32, cast back to each factor's
    dtype; gradients with respect to the original factors are exact through the constant
    scales. A tensor passed several times (shared factors) gets one copy per occurrence,
    whose gradients autograd sums.
    """
    if dtype not in _LOW_PRECISION or len(factors) < 2:
        return factors
    stages = [[f.reshape(f.shape[0], -1).t()] for f in factors]
    balanced = balance_cp_stages(stages, dtype)
    return tuple(b.t().reshape(f.shape) for (b,), f in zip(balanced, factors, strict=True))
