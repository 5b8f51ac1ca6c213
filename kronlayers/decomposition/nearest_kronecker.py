"""Nearest sum of Kronecker products to a dense matrix (Van Loan–Pitsianis)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._validation import check_int, check_shape, check_tensor
from .cp import cp_decompose

__all__ = ["kron_rearrange", "nearest_kronecker"]


def kron_rearrange(
    weight: torch.Tensor, out_shape: Sequence[int], in_shape: Sequence[int]
) -> torch.Tensor:
    """Rearrange a ``(prod out_k, prod in_k)`` matrix into a ``(out_1*in_1, ..., out_d*in_d)``
    tensor.

    Under this rearrangement ``F_1 ⊗ ... ⊗ F_d`` becomes the outer product
    ``vec(F_1) ∘ ... ∘ vec(F_d)`` (row-major ``vec``), so a sum of ``R`` Kronecker products
    is a rank-``R`` CP tensor, and for ``d = 2`` a rank-``R`` matrix.
    """
    d = len(out_shape)
    t = weight.reshape(*out_shape, *in_shape)
    perm = [p for k in range(d) for p in (k, d + k)]
    return t.permute(perm).reshape([o * i for o, i in zip(out_shape, in_shape, strict=True)])


def nearest_kronecker(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    rank: int = 1,
) -> list[torch.Tensor]:
    r"""Best Frobenius-norm approximation of ``weight`` by ``sum_r F_1[r] ⊗ ... ⊗ F_d[r]``.

    The matrix is rearranged so that Kronecker products become outer products
    (:func:`kron_rearrange`, Van Loan & Pitsianis 1993). Then:

    - ``d = 2``: a truncated SVD of the rearranged ``(out_1*in_1, out_2*in_2)`` matrix; the
      result is optimal (Eckart–Young), and the squared error is the sum of the discarded
      squared singular values. ``sqrt(sigma_r)`` is given to each factor.
    - ``d > 2``: a rank-``rank`` CP decomposition of the rearranged ``d``-way tensor by
      alternating least squares (plain-torch CP-ALS with SVD initialisation, see
      :func:`kronlayers.decomposition.cp_decompose`). Exact on an exact Kronecker sum in
      practice, but in general a local optimum: the best approximation of ``d >= 3`` tensors
      is NP-hard and may not exist for ``rank > 1``.
    - ``d = 1``: the matrix itself, split evenly over the rank terms.

    Args:
        weight: ``(H_out, H_in)`` with ``H_out = prod(out_shape)``, ``H_in = prod(in_shape)``.
        out_shape: ``(out_1, ..., out_d)``.
        in_shape: ``(in_1, ..., in_d)``, same length as ``out_shape``.
        rank: number of Kronecker terms ``R >= 1``; for ``d = 2`` at most
            ``min(out_1*in_1, out_2*in_2)``.

    Returns:
        ``d`` tensors, factor ``k`` of shape ``(R, out_k, in_k)``, same dtype and device as
        ``weight``. Detached from autograd.
    """
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (H_out, H_in) matrix, got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    out_shape = check_shape("out_shape", out_shape, weight.shape[0], "weight.shape[0]")
    in_shape = check_shape("in_shape", in_shape, weight.shape[1], "weight.shape[1]")
    if len(out_shape) != len(in_shape):
        raise ValueError(f"out_shape {out_shape} and in_shape {in_shape} must have the same length")
    rank = check_int("rank", rank, minimum=1)
    d = len(out_shape)
    w = weight.detach()
    if d == 1:
        return [(w / rank).unsqueeze(0).expand(rank, -1, -1).clone()]
    sizes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    r_mat = kron_rearrange(w, out_shape, in_shape)
    if d == 2:
        max_rank = min(sizes)
        if rank > max_rank:
            raise ValueError(
                f"rank must be <= min(out_1*in_1, out_2*in_2) = {max_rank} for these shapes, "
                f"got {rank}"
            )
        # SVD in float64 at least: float32 singular vectors of nearly equal singular values
        # are noisy, and half precision has no SVD at all.
        work = r_mat.to(torch.promote_types(r_mat.dtype, torch.float64))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        root = s[:rank].sqrt()
        cols = [u[:, :rank] * root, (vh[:rank].T * root)]
    else:
        cols, _ = cp_decompose(r_mat, rank)
    return [
        c.T.reshape(rank, o, i).to(weight.dtype).contiguous()
        for c, o, i in zip(cols, out_shape, in_shape, strict=True)
    ]
