"""CP (CANDECOMP/PARAFAC) decomposition of dense tensors: alternating least squares in torch.

:func:`cp_als` is a plain-torch CP-ALS (no TensorLy at runtime): SVD (HOSVD) or given
(warm-start) initial factors, a relative-improvement tolerance and an iteration cap, and a
dimension-tree MTTKRP, so that one sweep over all modes costs two GEMMs of
``numel * rank`` multiply-adds whatever the number of modes (TensorLy's ``parafac`` pays one
such product per mode, and unfolds the tensor again for each). :func:`cp_decompose` is the
conversion entry point used by the layers (balanced factor scales, relative error).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._shapes import prod
from .._validation import check_int, check_real, check_tensor
from ..ops.khatri_rao import khatri_rao

__all__ = [
    "CPResult",
    "balance_cp_factors",
    "cp_als",
    "cp_decompose",
    "cp_max_rank",
    "cp_rank_from_fraction",
    "cp_to_tensor",
]

#: Below this many multiply-adds per sweep (``numel * rank``) the ALS runs in float64;
#: above, the two big GEMMs of each sweep run in float32 (the small normal equations stay in
#: float64). A float64 input always runs in float64.
FLOAT32_ABOVE = 20_000_000
#: Up to this many ``numel * rank`` the error is computed from the residual each sweep (one
#: more GEMM); above, from the MTTKRP (free, but it loses digits near zero by cancellation).
EXACT_ERROR_BELOW = 2_000_000


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


def cp_max_rank(tensor_shape: Sequence[int]) -> int:
    """The largest CP rank a tensor of ``tensor_shape`` can use.

    Every tensor is the sum of its slices along its largest mode, each a (matrix-shaped)
    tensor of rank at most the product of the remaining modes, so the rank of any tensor is at
    most ``prod(shape) / max(shape)``: rank-one terms beyond that only add weights (and make
    the ALS normal equations singular).
    """
    shape = [int(s) for s in tensor_shape]
    return max(1, prod(shape) // max(shape))


def cp_to_tensor(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense tensor ``sum_r f_1[:, r] ∘ ... ∘ f_K[:, r]`` from factors ``(d_k, R)``.

    Shape: ``(d_1, ..., d_K)``. Differentiable.
    """
    letters = "abcdefghijklmnopqrstuvwxy"[: len(factors)]
    spec = ",".join(f"{c}z" for c in letters) + "->" + letters
    return torch.einsum(spec, *factors)


@dataclass
class CPResult:
    """What :func:`cp_als` returns.

    Attributes:
        factors: ``K`` tensors ``(d_k, R)`` in the input's dtype.
        rel_error: ``||T - T_cp||_F / ||T||_F`` (recomputed exactly at the end).
        n_iter: sweeps run.
        converged: ``True`` when the tolerance stopped the iterations (not the cap).
    """

    factors: list[torch.Tensor]
    rel_error: float
    n_iter: int
    converged: bool


def _hadamard_grams(grams: Sequence[torch.Tensor], skip: int) -> torch.Tensor:
    out = None
    for k, g in enumerate(grams):
        if k == skip:
            continue
        out = g.clone() if out is None else out * g
    return out


def solve_normal(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``m @ inv(v)`` for a symmetric PSD ``v`` ``(R, R)``, in float64: Cholesky, with a
    ``1e-12 tr(v) / R`` ridge only if ``v`` is numerically singular, a pseudo-inverse if even
    that fails."""
    v64 = v.to(torch.float64)
    m64 = m.to(torch.float64)
    r = v64.shape[0]
    eye = torch.eye(r, dtype=v64.dtype, device=v64.device)
    for ridge in (0.0, 1e-12 * float(v64.diagonal().sum()) / r + torch.finfo(torch.float64).tiny):
        chol, info = torch.linalg.cholesky_ex(v64 + ridge * eye if ridge else v64)
        if int(info) == 0:
            return torch.cholesky_solve(m64.T, chol).T.to(m.dtype)
    return (m64 @ torch.linalg.pinv(v64, hermitian=True)).to(m.dtype)


def mttkrp_within(p: torch.Tensor, dims: Sequence[int], factors: Sequence[torch.Tensor], n: int):
    """Contract ``p`` ``(prod dims, R)`` with ``factors[j]`` over every mode ``j != n``.

    Returns ``(dims[n], R)``. Largest other mode first (each step shrinks the tensor most).
    """
    t = p.reshape(*dims, p.shape[-1])
    alive = list(range(len(dims)))
    for j in sorted((j for j in alive if j != n), key=lambda j: -dims[j]):
        axis = alive.index(j)
        shape = [1] * t.dim()
        shape[axis], shape[-1] = factors[j].shape
        t = (t * factors[j].reshape(shape)).sum(axis)
        alive.remove(j)
    return t


def _svd_init(
    t: torch.Tensor, rank: int, generator: torch.Generator, skip: int
) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding (HOSVD); columns beyond a mode's size
    are random (unit expected norm). Mode ``skip`` (the first one ALS updates) is left random:
    its initial value is never used."""
    factors = []
    for n, d in enumerate(t.shape):
        extra = torch.randn(d, rank, generator=generator, dtype=torch.float64) / math.sqrt(d)
        extra = extra.to(device=t.device, dtype=t.dtype)
        if n == skip:
            factors.append(extra)
            continue
        unfold = t.movedim(n, 0).reshape(d, -1)
        gram = (unfold @ unfold.T).to(torch.float64)
        _, vecs = torch.linalg.eigh(gram)
        k = min(rank, d)
        lead = vecs[:, -k:].flip(1).to(t.dtype)
        factors.append(torch.cat([lead, extra[:, k:]], dim=1) if k < rank else lead)
    return factors


def balance_cp_factors(factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Give every rank-one term the same column norm in each factor (signs kept in place).

    The product is unchanged; equal scales condition fine-tuning better.
    """
    tiny = torch.finfo(torch.float64).tiny
    f64 = [f.to(torch.float64) for f in factors]
    norms = torch.stack([f.norm(dim=0) for f in f64])  # (K, R)
    geo = norms.clamp_min(tiny).log().mean(0).exp()
    zero = (norms == 0).any(0)
    geo = torch.where(zero, torch.zeros_like(geo), geo)
    out = [f * (geo / n.clamp_min(tiny)) for f, n in zip(f64, norms, strict=True)]
    return [o.to(f.dtype) for o, f in zip(out, factors, strict=True)]


def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    init: str | Sequence[torch.Tensor] = "svd",
    n_iter_max: int = 100,
    tol: float = 1e-5,
    random_state: int | None = 0,
) -> CPResult:
    """Rank-``rank`` CP decomposition of ``tensor`` by alternating least squares (torch only).

    Each mode update solves its normal equations exactly
    (``A_n = MTTKRP_n V_n^{-1}``, ``V_n`` the Hadamard product of the other factors' Grams,
    float64; :func:`solve_normal`). The MTTKRPs use a dimension tree: the modes are
    split into a left and a right half, the tensor is multiplied once by the Khatri-Rao
    product of the right half (then every left mode's MTTKRP is a small contraction), then
    once by that of the updated left half. The error is tracked from the MTTKRP of the last
    mode (no reconstruction; small problems use the residual, and there each sweep starts with
    a line search extrapolating the previous step, Bro's acceleration) and the iterations stop
    when it improves by less than
    ``tol`` relative (``(e_prev - e) / e_prev < tol``), when it falls below ``1e-12``, or after
    ``n_iter_max`` sweeps. Large problems (``numel * rank`` above :data:`FLOAT32_ABOVE`) run
    their GEMMs in float32 unless the input is float64.

    Args:
        tensor: ``(d_1, ..., d_K)``, ``K >= 2``.
        rank: ``R >= 1``.
        init: ``"svd"`` (leading singular vectors of each unfolding, random columns beyond a
            mode's size, as TensorLy), ``"random"``, or a list of ``K`` factors ``(d_k, R')``
            to warm-start from (``R' <= R``; missing columns are drawn at random with a small
            scale, so a rank-``R'`` solution warm-starts rank ``R``).
        n_iter_max: sweep cap, an int ``>= 0``.
        tol: relative-improvement tolerance, a finite real ``>= 0``.
        random_state: seed of the random columns.

    Returns:
        A :class:`CPResult`; the factors are balanced (:func:`balance_cp_factors`).
    """
    check_tensor("tensor", tensor)
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have at least 2 dims, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point tensor, got dtype {tensor.dtype}")
    rank = check_int("rank", rank, minimum=1)
    n_iter_max = check_int("n_iter_max", n_iter_max, minimum=0)
    # A NaN tolerance never stops early and a negative one never converges: both silent.
    tol = check_real("tol", tol, minimum=0.0)
    dims = list(tensor.shape)
    k_modes = len(dims)
    big = tensor.numel() * rank > FLOAT32_ABOVE and tensor.dtype != torch.float64
    work = torch.float32 if big else torch.float64
    t = tensor.detach().to(work)
    generator = torch.Generator().manual_seed(0 if random_state is None else random_state)
    if isinstance(init, str):
        if init == "svd":
            factors = _svd_init(t, rank, generator, skip=0)
        elif init == "random":
            factors = [
                (torch.randn(d, rank, generator=generator, dtype=torch.float64) / math.sqrt(d)).to(
                    device=t.device, dtype=work
                )
                for d in dims
            ]
        else:
            raise ValueError(f"init must be 'svd', 'random' or a list of factors, got {init!r}")
    else:
        factors = _warm_start(init, dims, rank, generator, t)

    left = list(range(max(1, k_modes // 2)))
    right = list(range(len(left), k_modes))
    n_left = prod(dims[: len(left)])
    t_mat = t.reshape(n_left, -1)
    norm2 = float((t.to(torch.float64) ** 2).sum())
    grams = [f.T @ f for f in factors]
    exact = t.numel() * rank <= EXACT_ERROR_BELOW
    err_prev = math.inf
    n_iter, converged = 0, False

    def residual_error(fs: Sequence[torch.Tensor]) -> float:
        resid = t_mat - khatri_rao(fs[: len(left)]) @ khatri_rao(fs[len(left) :]).T
        return math.sqrt(float((resid.to(torch.float64) ** 2).sum()) / norm2) if norm2 else 0.0

    previous: list[torch.Tensor] | None = None
    for n_iter in range(1, n_iter_max + 1):
        if exact and previous is not None and n_iter > 3:
            # Line search (Bro 1998; TensorLy's linesearch): extrapolate along the last
            # sweep's step by n^(1/3) and keep it if it is better; crosses ALS swamps.
            step = n_iter ** (1.0 / 3.0)
            trial = [f + step * (f - q) for f, q in zip(factors, previous, strict=True)]
            if residual_error(trial) < err_prev:
                factors = trial
                grams = [f.T @ f for f in factors]
        previous = [f.clone() for f in factors] if exact else None
        p = t_mat @ khatri_rao([factors[j] for j in right])
        for n in left:
            m = mttkrp_within(p, dims[: len(left)], [factors[j] for j in left], n)
            factors[n] = solve_normal(m, _hadamard_grams(grams, n))
            grams[n] = factors[n].T @ factors[n]
        p = t_mat.T @ khatri_rao([factors[j] for j in left])
        for n in right:
            m = mttkrp_within(p, dims[len(left) :], [factors[j] for j in right], n - len(left))
            factors[n] = solve_normal(m, _hadamard_grams(grams, n))
            grams[n] = factors[n].T @ factors[n]
        if exact:  # small problems: the residual itself (no cancellation near zero)
            err = residual_error(factors)
        else:  # ||T||^2 - 2 <T, T_cp> + ||T_cp||^2 from the last MTTKRP and the Grams
            inner = float((m.to(torch.float64) * factors[right[-1]].to(torch.float64)).sum())
            hat2 = float(_hadamard_grams([g.to(torch.float64) for g in grams], -1).sum())
            err = math.sqrt(max(norm2 - 2 * inner + hat2, 0.0) / norm2) if norm2 > 0 else 0.0
        if err < 1e-12 or (err_prev - err) < tol * err_prev:
            converged = True
            break
        err_prev = err
    factors = balance_cp_factors(factors)
    # The exact error (the tracked one loses digits to cancellation near zero).
    approx = cp_to_tensor([f.to(torch.float64) for f in factors])
    ref = tensor.detach().to(torch.float64)
    denom = float(ref.norm())
    rel = float((ref - approx).norm()) / denom if denom > 0 else float(approx.norm())
    return CPResult([f.to(tensor.dtype) for f in factors], rel, n_iter, converged)


def _warm_start(
    init: Sequence[torch.Tensor],
    dims: Sequence[int],
    rank: int,
    generator: torch.Generator,
    t: torch.Tensor,
) -> list[torch.Tensor]:
    if isinstance(init, torch.Tensor) or not isinstance(init, Sequence):
        raise TypeError(f"init must be a string or a list of tensors, got {type(init).__name__}")
    if len(init) != len(dims):
        raise ValueError(f"init must hold {len(dims)} factors, got {len(init)}")
    out = []
    for k, (f, d) in enumerate(zip(init, dims, strict=True)):
        check_tensor(f"init[{k}]", f)
        if f.dim() != 2 or f.shape[0] != d or f.shape[1] > rank:
            raise ValueError(
                f"init[{k}] must have shape ({d}, R') with R' <= {rank}, got {tuple(f.shape)}"
            )
        f = f.detach().to(device=t.device, dtype=t.dtype)
        missing = rank - f.shape[1]
        if missing:
            scale = float(f.norm(dim=0).mean()) if f.numel() else 1.0
            extra = torch.randn(d, missing, generator=generator, dtype=torch.float64)
            extra = extra.to(device=t.device, dtype=t.dtype) * (1e-2 * scale / math.sqrt(d))
            f = torch.cat([f, extra], dim=1)
        out.append(f.clone())
    return out


def cp_decompose(
    tensor: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-5,
    random_state: int | None = 0,
    init: str | Sequence[torch.Tensor] = "svd",
) -> tuple[list[torch.Tensor], float]:
    """Rank-``rank`` CP decomposition of ``tensor`` by alternating least squares.

    Runs :func:`cp_als` (torch only: HOSVD initialisation or a warm start, at most
    ``n_iter_max`` sweeps, stopping when the error improves by less than ``tol`` relative)
    on the tensor's device. The norm of each rank-one term is split evenly across its
    factors, which keeps factor scales comparable (better conditioned for fine-tuning).

    ALS finds a local optimum, not necessarily the best rank-``rank`` approximation (which
    may not exist for CP); for an exactly low-rank input it usually recovers it.

    Args:
        tensor: ``(d_1, ..., d_K)`` with ``K >= 2``.
        rank: the number of rank-one terms ``R >= 1``.
        n_iter_max: sweep cap, an int ``>= 0``.
        tol: relative-improvement tolerance, a finite real ``>= 0``.
        random_state: seed of the random initial columns.
        init: ``"svd"``, ``"random"`` or warm-start factors (see :func:`cp_als`).

    Returns:
        ``(factors, rel_error)``: ``K`` tensors of shape ``(d_k, R)`` in the input's dtype, and
        ``||tensor - cp_to_tensor(factors)||_F / ||tensor||_F``.
    """
    check_tensor("tensor", tensor)
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have at least 2 dims, got shape {tuple(tensor.shape)}")
    rank = check_int("rank", rank, minimum=1)
    n_iter_max = check_int("n_iter_max", n_iter_max, minimum=0)
    tol = check_real("tol", tol, minimum=0.0)
    res = cp_als(tensor, rank, init=init, n_iter_max=n_iter_max, tol=tol, random_state=random_state)
    return res.factors, res.rel_error
