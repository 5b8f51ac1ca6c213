"""Kronecker products: the batched dense product and the implicit (vec-trick) matmul."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_tensor

__all__ = ["kron", "kron_dense", "kron_matmul"]


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Batched Kronecker product of the last two dimensions.

    ``out[..., i*p + k, j*q + l] = a[..., i, j] * b[..., k, l]``; on 2-D inputs this is
    :func:`torch.kron`.

    Shapes:
        - a: ``(*A, m, n)``
        - b: ``(*B, p, q)``, with ``A`` and ``B`` broadcastable
        - output: ``(*broadcast(A, B), m*p, n*q)``
    """
    check_tensor("a", a)
    check_tensor("b", b)
    if a.dim() < 2:
        raise ValueError(f"a must have at least 2 dims (..., m, n), got shape {tuple(a.shape)}")
    if b.dim() < 2:
        raise ValueError(f"b must have at least 2 dims (..., p, q), got shape {tuple(b.shape)}")
    m, n = a.shape[-2:]
    p, q = b.shape[-2:]
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as err:
        raise ValueError(
            f"batch dims of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} do not broadcast"
        ) from err
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*batch, m * p, n * q)


def kron_dense(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense ``sum_r F_1[r] ⊗ ... ⊗ F_d[r]`` from factors ``(rank, out_k, in_k)``.

    Shape: ``(prod out_k, prod in_k)``. Differentiable; meant for inspection and export, it
    allocates the full matrix.
    """
    from ..functional.kronecker_linear import check_kron_factors

    check_kron_factors(factors)
    w = factors[0]
    for f in factors[1:]:
        w = kron(w, f)
    return w.sum(0)


def kron_matmul(factors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""``x @ (F_1 ⊗ ... ⊗ F_d).T`` without forming the Kronecker product.

    Each axis of ``x`` viewed as ``(*, in_1, ..., in_d)`` (row-major, as :func:`torch.kron`
    flattens) is multiplied by its factor, one axis at a time, in the order with the fewest
    FLOPs. Forward and backward are the hand-written kernels of
    :func:`kronlayers.functional.kronecker_linear`.

    Args:
        factors: ``d`` 2-D tensors, ``F_k`` of shape ``(out_k, in_k)``.
        x: ``(*, prod_k in_k)``.

    Returns:
        ``(*, prod_k out_k)``.
    """
    from ..functional.kronecker_linear import kronecker_linear

    if isinstance(factors, torch.Tensor) or not isinstance(factors, Sequence):
        raise TypeError(f"factors must be a list or tuple of 2-D tensors, got {type(factors)}")
    for k, f in enumerate(factors):
        check_tensor(f"factors[{k}]", f)
        if f.dim() != 2:
            raise ValueError(f"factors[{k}] must be 2-D (out_k, in_k), got {tuple(f.shape)}")
    return kronecker_linear(x, [f.unsqueeze(0) for f in factors])
