"""Tucker-2 decomposition of a convolution kernel: HOSVD, refined by HOOI."""

from __future__ import annotations

import torch

from .._validation import check_int, check_real, check_tensor

__all__ = ["tucker2_decompose"]


def _leading_left_vectors(m: torch.Tensor, r: int) -> torch.Tensor:
    # Eigenvectors of the small Gram matrix m m^T: cheaper than an SVD of the wide unfolding
    # (C x C*k*k) and exact up to rounding in float64.
    _, vecs = torch.linalg.eigh(m @ m.T)
    return vecs[:, -r:].flip(1)


def tucker2_decompose(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    *,
    n_iter_max: int = 20,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tucker-2 approximation of a ``(C_out, C_in, kh, kw)`` kernel on its channel modes.

    ``W ≈ core ×_0 U_out ×_1 U_in``: ``U_out`` ``(C_out, R_out)`` and ``U_in`` ``(C_in, R_in)``
    with orthonormal columns, ``core = W ×_0 U_outᵀ ×_1 U_inᵀ`` ``(R_out, R_in, kh, kw)``.
    Initialised by the truncated HOSVD (leading singular vectors of each channel unfolding,
    the Tucker conversion of Kim et al. 2016), then refined by higher-order orthogonal
    iteration (HOOI), which never increases the error, until the relative error improves by
    less than ``tol`` or after ``n_iter_max`` sweeps. Runs in float64 on the kernel's device;
    no TensorLy needed.

    Args:
        kernel: ``(C_out, C_in, kh, kw)``.
        ranks: ``(R_in, R_out)`` with ``1 <= R_in <= C_in`` and ``1 <= R_out <= C_out``.
        n_iter_max: the HOOI sweep cap, an int ``>= 0`` (0: plain HOSVD).
        tol: stop when the relative error improves by less than this (a finite real
            ``>= 0``).

    Returns:
        ``(core, in_factor, out_factor, rel_error)``: ``(R_out, R_in, kh, kw)``,
        ``(C_in, R_in)``, ``(C_out, R_out)`` in the kernel's dtype, and
        ``||W - W_tucker||_F / ||W||_F`` (``0.0`` for an all-zero kernel).
    """
    check_tensor("kernel", kernel)
    if kernel.dim() != 4:
        raise ValueError(f"kernel must have shape (C_out, C_in, kh, kw), got {tuple(kernel.shape)}")
    if not kernel.is_floating_point():
        raise TypeError(f"kernel must be a floating-point tensor, got dtype {kernel.dtype}")
    c_out, c_in = kernel.shape[:2]
    r_in = check_int("ranks[0]", ranks[0], minimum=1)
    r_out = check_int("ranks[1]", ranks[1], minimum=1)
    if r_in > c_in or r_out > c_out:
        raise ValueError(
            f"ranks (R_in, R_out) must be at most (C_in, C_out) = {(c_in, c_out)}, got "
            f"{(r_in, r_out)}"
        )
    n_iter_max = check_int("n_iter_max", n_iter_max, minimum=0)
    tol = check_real("tol", tol, minimum=0.0)
    w = kernel.detach().to(torch.float64)
    norm = w.norm()
    u_out = _leading_left_vectors(w.reshape(c_out, -1), r_out)
    u_in = _leading_left_vectors(w.transpose(0, 1).reshape(c_in, -1), r_in)

    def core_of(u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oihw,ob,ia->bahw", w, u_out, u_in)

    def error(core: torch.Tensor) -> float:
        # Orthonormal factors: ||W - W_t||^2 = ||W||^2 - ||core||^2.
        if norm == 0:
            return 0.0
        return float((norm**2 - core.norm() ** 2).clamp_min(0).sqrt() / norm)

    core = core_of(u_out, u_in)
    err = error(core)
    for _ in range(n_iter_max):
        # HOOI: each factor is the leading subspace of W projected on the other one.
        proj = torch.einsum("oihw,ia->oahw", w, u_in)
        u_out = _leading_left_vectors(proj.reshape(c_out, -1), r_out)
        proj = torch.einsum("oihw,ob->ibhw", w, u_out)
        u_in = _leading_left_vectors(proj.reshape(c_in, -1), r_in)
        core = core_of(u_out, u_in)
        new_err = error(core)
        done = err - new_err < tol
        err = new_err
        if done:
            break
    dtype = kernel.dtype
    return core.to(dtype), u_in.to(dtype), u_out.to(dtype), err
