"""CP (CANDECOMP/PARAFAC) decomposition of dense tensors, through TensorLy's ``parafac``."""

from __future__ import annotations

from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import parafac

from .._shapes import check_tensor, prod

__all__ = ["cp_decompose", "cp_rank_from_fraction", "cp_to_tensor"]


def cp_rank_from_fraction(fraction: float, tensor_shape: Sequence[int]) -> int:
    """The CP rank whose factors hold about ``fraction`` of a dense tensor's parameters.

    A rank-``R`` CP tensor of shape ``(d_1, ..., d_K)`` has ``R * sum(d_k)`` parameters, so
    ``R = round(fraction * prod(d_k) / sum(d_k))`` (at least 1), the rule TensorLy and
    TensorLy-Torch use for a float rank.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, float):
        raise TypeError(f"rank as a fraction must be a float, got {type(fraction).__name__}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"rank as a float must be in (0, 1], got {fraction}")
    return max(1, round(fraction * prod(tensor_shape) / sum(tensor_shape)))


def cp_to_tensor(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``sum_r f_1[:, r] ∘ ... ∘ f_K[:, r]`` from factors ``(d_k, R)``.

    Shape: ``(d_1, ..., d_K)``. Differentiable.
    """
    letters = "abcdefghijklmnopqrstuvwxy"[: len(factors)]
    spec = ",".join(f"{c}z" for c in letters) + "->" + letters
    return torch.einsum(spec, *factors)


def cp_decompose(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 200,
    tol: float = 1e-10,
    random_state: int | None = 0,
) -> tuple[list[torch.Tensor], float]:
    """Rank-``rank`` CP decomposition of ``tensor`` by alternating least squares.

    Runs :func:`tensorly.decomposition.parafac` (SVD initialisation, TensorLy's PyTorch
    backend, float64 internally) on the tensor's device. The CP weights are absorbed into the
    factors and the norm of each rank-one term is split evenly across its factors, which keeps
    factor scales comparable (better conditioned for fine-tuning).

    ALS finds a local optimum, not necessarily the best rank-``rank`` approximation (which
    may not exist for CP); for an exactly low-rank input it usually recovers it.

    Args:
        tensor: ``(d_1, ..., d_K)`` with ``K >= 2``.
        rank: the number of rank-one terms ``R >= 1``.

    Returns:
        ``(factors, rel_error)``: ``K`` tensors of shape ``(d_k, R)`` in the input's dtype, and
        ``||tensor - cp_to_tensor(factors)||_F / ||tensor||_F``.
    """
    check_tensor("tensor", tensor)
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have at least 2 dims, got shape {tuple(tensor.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    work = tensor.detach().to(torch.float64)
    with tl.backend_context("pytorch"):
        cp = parafac(
            work,
            rank,
            n_iter_max=n_iter_max,
            init="svd",
            tol=tol,
            random_state=random_state,
            normalize_factors=False,
        )
    weights, factors = cp
    factors = [f.clone() for f in factors]
    factors[0] = factors[0] * weights
    # Balance each rank-one term: same column norm in every factor, signs kept in place.
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (K, R)
    geo = norms.clamp_min(torch.finfo(torch.float64).tiny).log().mean(0).exp()
    factors = [
        f * (geo / n.clamp_min(torch.finfo(torch.float64).tiny))
        for f, n in zip(factors, norms, strict=True)
    ]
    approx = cp_to_tensor(factors)
    denom = work.norm()
    rel_error = float((work - approx).norm() / denom) if denom > 0 else float(approx.norm())
    return [f.to(tensor.dtype) for f in factors], rel_error
