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
from typing import Any

import torch

__all__ = ["apply_autocast"]


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
