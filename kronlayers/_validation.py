"""The one validation layer: every public entry point checks its arguments through here.

The error discipline, the same in every layer, functional form and conversion:

- an argument of the wrong Python type (a list where a tensor is expected, a float where an
  int is expected) raises ``TypeError``;
- an argument of the right type with a wrong value (a negative size, a shape that does not
  fit, a rank out of range) raises ``ValueError``;
- a tensor whose dtype differs from the input's raises ``TypeError``, one on another device
  raises ``ValueError``.

Every message names the argument, says what was expected and what was got:
``"bias must have shape (8,), got (7,)"``. Integers may be any ``numbers.Integral`` (Python
or NumPy ints, like ``nn.Linear`` accepts) except ``bool``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ._shapes import prod

__all__ = [
    "check_bias",
    "check_conv2d_extent",
    "check_conv2d_input",
    "check_factor_list",
    "check_int",
    "check_like",
    "check_linear_input",
    "check_module",
    "check_pair",
    "check_rank",
    "check_real",
    "check_shape",
    "check_tensor",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (``TypeError`` if not integral, ``ValueError`` below ``minimum``)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value: object, minimum: float | None = None) -> float:
    """``value`` as a finite ``float``: ``TypeError`` unless a real number (``bool`` and
    tensors are not), ``ValueError`` for NaN, an infinity or a value below ``minimum``.

    For numeric options such as tolerances, which a NaN or a negative value would otherwise
    turn into "never stop" or "stop at once" without any error.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` (an int or a pair of ints, each ``>= minimum``) as an ``(h, w)`` pair."""
    if _is_int(value):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pair = tuple(value)
        if len(pair) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        if not all(_is_int(v) for v in pair):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Raise a ``TypeError`` naming the argument when ``value`` is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_module(name: str, value: object, expected: type | tuple[type, ...]) -> None:
    """Raise a ``TypeError`` naming the argument when ``value`` is not an ``expected``."""
    if not isinstance(value, expected):
        names = (
            " or ".join(t.__name__ for t in expected)
            if isinstance(expected, tuple)
            else expected.__name__
        )
        raise TypeError(f"{name} must be an nn.{names}, got {type(value).__name__}")


def check_shape(
    name: str, shape: Sequence[int] | None, total: int, total_name: str
) -> tuple[int, ...]:
    """Validate a tensorized shape: a non-empty sequence of positive ints with product ``total``."""
    if shape is None:
        raise ValueError(f"{name} must be given")
    if _is_int(shape) or isinstance(shape, str) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {shape!r}")
    if len(shape) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {shape!r}")
    if not all(_is_int(s) for s in shape):
        raise TypeError(f"{name} must contain ints, got {tuple(shape)!r}")
    if any(s < 1 for s in shape):
        raise ValueError(f"{name} must contain positive ints, got {tuple(shape)!r}")
    shape = tuple(int(s) for s in shape)
    if prod(shape) != total:
        raise ValueError(
            f"{name}={shape!r} has product {prod(shape)}, but it must equal {total_name}={total}"
        )
    return shape


def check_rank(
    value: object, *, allow_float: bool = True, parts: int = 1, name: str = "rank"
) -> int | float | tuple[int, ...]:
    """A rank argument: an int ``>= 1``, a float fraction in ``(0, 1]``, or ``parts`` ints.

    Returns the int, the float, or (for ``parts > 1``) the tuple of ints as given; a single int
    is accepted where ``parts > 1`` (the caller uses it for every part).
    """
    if isinstance(value, float) and not isinstance(value, bool):
        if not allow_float:
            raise TypeError(f"{name} must be an int, got float {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name} as a float is a fraction of the dense parameters, in (0, 1], got {value!r}"
            )
        return float(value)
    if _is_int(value):
        return check_int(name, value, minimum=1)
    if parts > 1 and isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != parts:
            raise ValueError(f"{name} must hold {parts} ints, got {tuple(value)!r}")
        return tuple(check_int(f"{name}[{k}]", v, minimum=1) for k, v in enumerate(value))
    kinds = "an int >= 1" + (", a float in (0, 1]" if allow_float else "")
    kinds += f" or a tuple of {parts} ints" if parts > 1 else ""
    raise TypeError(f"{name} must be {kinds}, got {type(value).__name__} {value!r}")


def check_factor_list(
    name: str, factors: object, ndim: int, layout: str, *, min_len: int = 1
) -> list[torch.Tensor]:
    """A non-empty list/tuple of ``ndim``-d tensors; ``layout`` names the dims for messages."""
    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(factors).__name__}")
    if len(factors) < min_len:
        what = "one factor" if min_len == 1 else f"{min_len} factors"
        raise ValueError(f"{name} must hold at least {what}, got {len(factors)}")
    for k, f in enumerate(factors):
        check_tensor(f"{name}[{k}]", f)
        if f.dim() != ndim:
            raise ValueError(f"{name}[{k}] must have shape {layout}, got {tuple(f.shape)}")
        if not f.is_floating_point():
            raise TypeError(f"{name}[{k}] must be a floating-point tensor, got dtype {f.dtype}")
    return list(factors)


def check_like(name: str, t: torch.Tensor, input: torch.Tensor, *, autocast: bool) -> None:
    """``t`` must have ``input``'s device (``ValueError``) and dtype (``TypeError``).

    Under autocast every floating argument except float64 ones is cast to the autocast dtype
    before the kernel runs (``torch.amp.custom_fwd``'s rule), so there only a float64 tensor
    mixed with another dtype is a dtype mismatch.
    """
    if t.device != input.device:
        raise ValueError(f"{name} must be on the input's device {input.device}, got {t.device}")
    if t.dtype != input.dtype and not (autocast and torch.float64 not in (t.dtype, input.dtype)):
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {t.dtype}")


def check_linear_input(input: object, in_features: int, source: str) -> torch.Tensor:
    """``input`` must be a floating tensor of shape ``(*, in_features)``.

    ``source`` says where ``in_features`` comes from, for the error message.
    """
    check_tensor("input", input)
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"input must have shape (*, {in_features}) ({source}), got {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    return input


def check_bias(bias: object, out_features: int, input: torch.Tensor, *, autocast: bool) -> None:
    """``bias`` must be ``None`` or a ``(out_features,)`` tensor like ``input``."""
    if bias is None:
        return
    check_tensor("bias", bias)
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    check_like("bias", bias, input, autocast=autocast)


def check_conv2d_input(input: object, in_channels: int, source: str) -> torch.Tensor:
    """``input`` must be a floating ``(N, C_in, H, W)`` or ``(C_in, H, W)`` tensor."""
    check_tensor("input", input)
    if input.dim() not in (3, 4) or input.shape[-3] != in_channels:
        raise ValueError(
            f"input must have shape (N, {in_channels}, H, W) or ({in_channels}, H, W) "
            f"({source}), got {tuple(input.shape)}"
        )
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    return input


def check_conv2d_extent(
    input: torch.Tensor,
    padding: tuple[int, int, int, int],
    kernel_size: tuple[int, int],
    dilation: tuple[int, int],
) -> None:
    """The padded input must be at least as large as the dilated kernel (``ValueError``)."""
    top, bottom, left, right = padding
    for axis, size, pad, d, k in (
        ("H", input.shape[-2], top + bottom, dilation[0], kernel_size[0]),
        ("W", input.shape[-1], left + right, dilation[1], kernel_size[1]),
    ):
        if size + pad < d * (k - 1) + 1:
            raise ValueError(
                f"input {axis}={size} with padding {pad} is smaller than the dilated kernel "
                f"extent {d * (k - 1) + 1}"
            )
