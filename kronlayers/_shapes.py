"""Pure shape arithmetic shared by kernels, modules, conversion and summaries.

Nothing here raises on user input except through :mod:`kronlayers._validation`; these are
the integer helpers: products, balanced factorizations, convolution padding and output sizes,
and the einsum letters every kernel draws from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

__all__ = [
    "LETTERS",
    "MAX_MODES",
    "balanced_factorization",
    "conv2d_output_size",
    "conv2d_padding",
    "prod",
]

# One alphabet for every einsum spec in the package. Kernels that need two disjoint sets of
# mode letters (input and output modes) take the lower- and upper-case halves of it, so the
# number of modes per side is capped at MAX_MODES everywhere.
LETTERS = "abcdefghijklm"
UPPER_LETTERS = LETTERS.upper()
MAX_MODES = len(LETTERS)


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
    from ._validation import check_int

    n = check_int("n", n, minimum=1)
    d = check_int("d", d, minimum=1)
    candidates = _factorizations(n, d, 1)

    def spread(shape: tuple[int, ...]) -> tuple[float, int]:
        logs = [math.log(s) for s in shape]
        mean = sum(logs) / d
        return (sum((v - mean) ** 2 for v in logs), max(shape))

    return min(candidates, key=spread)


def conv2d_padding(
    padding: object,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int, int, int]:
    """Resolve a ``padding`` argument to ``(top, bottom, left, right)`` zero padding.

    Accepts what ``nn.Conv2d`` accepts: an int, an ``(h, w)`` pair, ``'valid'`` (no padding) or
    ``'same'`` (output size = input size; stride 1 only). For ``'same'`` the total padding
    ``dilation * (k - 1)`` is split like ``F.conv2d`` does it: the extra element of an odd total
    (even kernels) goes to the bottom / right. Bad values raise ``ValueError`` / ``TypeError``
    naming ``padding``.
    """
    from ._validation import check_pair

    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(
                f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}"
            )
        if padding == "valid":
            return (0, 0, 0, 0)
        if stride != (1, 1):
            raise ValueError(
                f"padding='same' is not supported for strided convolutions (stride={stride})"
            )
        out = []
        for d, k in zip(dilation, kernel_size, strict=True):
            total = d * (k - 1)
            out.extend((total // 2, total - total // 2))
        return (out[0], out[1], out[2], out[3])
    ph, pw = check_pair("padding", padding, minimum=0)
    return (ph, ph, pw, pw)


def conv2d_output_size(
    size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """``(H_out, W_out)`` of a convolution with resolved ``(top, bottom, left, right)`` padding.

    ``H_out = floor((H + top + bottom - dilation[0] * (kh - 1) - 1) / stride[0]) + 1``.
    """
    h, w = size
    top, bottom, left, right = padding
    h_out = (h + top + bottom - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    w_out = (w + left + right - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return (h_out, w_out)
