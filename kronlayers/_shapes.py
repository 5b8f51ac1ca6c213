"""Shape helpers shared by every layer: balanced factorizations and argument checks.

These live apart from the kernels so that the modules, the functional forms and the
conversion code all raise the same errors with the same wording.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

__all__ = [
    "balanced_factorization",
    "check_rank",
    "check_shape",
    "prod",
]


def prod(values: Sequence[int]) -> int:
    """Product of a sequence of ints (1 for an empty one)."""
    # A list, not a generator: Dynamo (torch.compile fullgraph) cannot trace generators.
    return math.prod([int(v) for v in values])


@lru_cache(maxsize=1024)
def _factorizations(n: int, d: int, smallest: int) -> tuple[tuple[int, ...], ...]:
    # All non-decreasing d-tuples >= smallest whose product is n; n is small enough in
    # practice (feature counts) that enumerating divisors is instant.
    if d == 1:
        return ((n,),) if n >= smallest else ()
    out = []
    f = smallest
    while f**d <= n:
        if n % f == 0:
            out.extend((f, *rest) for rest in _factorizations(n // f, d - 1, f))
        f += 1
    return tuple(out)


def balanced_factorization(n: int, d: int = 2) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors that are as equal as possible.

    "As equal as possible" means the factorization with the smallest spread of
    ``log(factor)``; ties go to the one with the smaller largest factor. Factors are
    returned in non-decreasing order, e.g. ``balanced_factorization(784) == (28, 28)``,
    ``balanced_factorization(1000, 3) == (10, 10, 10)``. A prime ``n`` gives ``(1, ..., n)``.

    Args:
        n: the number to split, ``n >= 1``.
        d: the number of factors, ``d >= 1``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d must be a positive int, got {d!r}")
    candidates = _factorizations(n, d, 1)

    def spread(shape: tuple[int, ...]) -> tuple[float, int]:
        logs = [math.log(s) for s in shape]
        mean = sum(logs) / d
        return (sum((v - mean) ** 2 for v in logs), max(shape))

    return min(candidates, key=spread)


def check_shape(name: str, shape: Sequence[int] | None, total: int, total_name: str) -> tuple:
    """Validate a tensorized shape: positive ints whose product is ``total``."""
    if shape is None:
        raise ValueError(f"{name} must be given")
    if isinstance(shape, int) or not isinstance(shape, Sequence) or len(shape) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {shape!r}")
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in shape):
        raise ValueError(f"{name} must contain positive ints, got {tuple(shape)!r}")
    if prod(shape) != total:
        raise ValueError(
            f"{name}={tuple(shape)!r} has product {prod(shape)}, "
            f"but it must equal {total_name}={total}"
        )
    return tuple(int(s) for s in shape)


def check_rank(rank: int) -> int:
    """Validate an integer rank (>= 1)."""
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    return rank


def check_linear_args(
    input: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: int,
    source: str,
) -> None:
    """Check a linear map's ``input`` ``(*, in_features)`` and ``bias`` ``(out_features,)``.

    ``source`` says where ``in_features`` comes from, for the error message.
    """
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(
            f"input must have shape (*, {in_features}) ({source}), got {tuple(input.shape)}"
        )
    if bias is not None:
        check_tensor("bias", bias)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")


def check_tensor(name: str, value: object) -> torch.Tensor:
    """Raise a TypeError naming the argument when ``value`` is not a tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value
