r"""Data-aware (calibrated) fits: approximations that minimise the error of a layer's outputs.

For a layer ``y = x W^T`` and calibration inputs ``X`` (rows ``x``), the error of an
approximation ``Ŵ`` on that data is

.. math::
    \|X W^T - X Ŵ^T\|_F^2 = \operatorname{tr}\big((W - Ŵ)\, G\, (W - Ŵ)^T\big),
    \qquad G = X^T X,

so only the input Gram (second-moment) matrix ``G`` is needed, never the activations
(:mod:`kronlayers.calibration` streams it). Every function here minimises that objective for
one structure, with ``G`` damped to ``G + λ mean(diag G) I`` (``damping=λ``, default 0.01,
which keeps directions the data never excites close to the dense weight instead of
arbitrary, and makes ``G`` invertible):

- low rank (:func:`whitened_low_rank`): the closed form. With ``G = L L^T`` (Cholesky),
  ``‖(W - Ŵ) L‖`` is minimised over rank ``r`` by truncating the SVD of ``W L`` and mapping
  back with ``L^{-1}`` (optimal: Eckart–Young in the whitened space). The whitened singular
  values give the whole error-versus-rank curve at once (:func:`whitened_svd`).
- sums of Kronecker products (:func:`whitened_nearest_kronecker`): initialised in the
  whitened space of a Kronecker-factored ``G ≈ G_1 ⊗ G_2`` (the optimum for such a ``G``),
  then refined by exact alternating least squares on the full ``G`` (each half-step solves
  one small linear system, so the objective never increases).
- CP (:func:`whitened_cp`): CP-ALS of the weight whitened mode by mode (Kronecker-factored
  ``G``), then sweeps on the full ``G``: exact updates of the output factors, a few
  preconditioned conjugate-gradient steps for the input factors (the Kronecker-factored
  solve as preconditioner).
- Tucker-2 of a convolution (:func:`whitened_tucker2`): HOOI of the whitened kernel, then the
  output factor and the core solved exactly on the full ``G`` for the input factor found
  (a reduced-rank regression).

Errors returned are relative output errors on the calibration data,
``sqrt(tr(E G E^T) / tr(W G W^T))`` with the undamped ``G``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._validation import check_int, check_real, check_tensor
from ..ops.khatri_rao import khatri_rao
from .cp import balance_cp_factors, cp_als, cp_decompose, mttkrp_within, solve_normal
from .nearest_kronecker import nearest_kronecker

__all__ = [
    "DEFAULT_DAMPING",
    "WhitenedSVD",
    "check_cp_fit_options",
    "damped_cholesky",
    "fit_cp",
    "mode_grams",
    "output_error",
    "whitened_cp",
    "whitened_low_rank",
    "whitened_nearest_kronecker",
    "whitened_svd",
    "whitened_tucker2",
]

#: Default damping ``λ``: ``G + λ mean(diag G) I``.
DEFAULT_DAMPING = 1e-2

F64 = torch.float64


def _check_gram(gram: object, n: int, name: str = "input_gram") -> torch.Tensor:
    check_tensor(name, gram)
    if gram.dim() != 2 or tuple(gram.shape) != (n, n):
        raise ValueError(f"{name} must have shape ({n}, {n}), got {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {gram.dtype}")
    return gram


def _check_damping(damping: object) -> float:
    return check_real("damping", damping, minimum=0.0)


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``G + damping * mean(diag G) * I`` in float64 (symmetrised)."""
    g = gram.detach().to(F64)
    g = (g + g.T) / 2
    mean = float(g.diagonal().mean()) if g.numel() else 0.0
    if mean <= 0:
        mean = 1.0
    return g + (damping * mean) * torch.eye(g.shape[0], dtype=F64, device=g.device)


def _damped_cholesky(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    lam = damping
    for _ in range(12):
        g = damped(gram, lam)
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            mean = float(gram.detach().to(F64).diagonal().mean()) if gram.numel() else 0.0
            return chol, lam * (mean if mean > 0 else 1.0)
        lam = max(lam * 10, 1e-8)
    raise ValueError("input_gram is not a finite positive semi-definite matrix")


def damped_cholesky(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of the damped Gram, float64: ``G + λ mean(diag G) I = L Lᵀ``.

    If the factorization fails (``damping=0`` with a singular ``G``, or rounding), the damping
    is raised tenfold from ``1e-8`` until it succeeds.
    """
    return _damped_cholesky(gram, _check_damping(damping))[0]


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))``, ``E = W - approx``.

    ``weight`` and ``approx`` are ``(out, in)``; ``gram`` is ``(in, in)``. ``E`` is formed in
    float64; the products with ``G`` run in float32 for large layers (more than a million
    weights), which leaves the relative error accurate to about ``1e-6``.
    """
    w = weight.detach().to(F64)
    e = w - approx.detach().to(F64)
    work = torch.float32 if w.numel() > 1_000_000 else F64
    g = gram.detach().to(work)
    num = float(((e.to(work) @ g).to(F64) * e).sum())
    den = float(((w.to(work) @ g).to(F64) * w).sum())
    if den <= 0:
        return math.sqrt(max(num, 0.0))
    return math.sqrt(max(num, 0.0) / den)


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of a float64 matrix from the eigendecomposition of its smaller Gram
    (several times faster than LAPACK's SVD on CPU; singular values below about
    ``1e-8 s_max`` lose their relative accuracy, which truncation does not need). ``S`` is
    descending. For zero singular values the side computed from the other (``U`` when
    ``m`` is tall or square, else ``Vh``) has zero columns (rows); the side from the
    eigendecomposition stays orthonormal."""
    p, q = m.shape
    tiny = torch.finfo(F64).tiny
    if p >= q:
        evals, v = torch.linalg.eigh(m.T @ m)
        s = evals.flip(0).clamp_min(0).sqrt()
        v = v.flip(1)
        u = (m @ v) / s.clamp_min(tiny)
        u = torch.where(s > 0, u, torch.zeros_like(u))
        return u, s, v.T
    evals, u = torch.linalg.eigh(m @ m.T)
    s = evals.flip(0).clamp_min(0).sqrt()
    u = u.flip(1)
    v = (m.T @ u) / s.clamp_min(tiny)
    v = torch.where(s > 0, v, torch.zeros_like(v))
    return u, s, v.T


# --------------------------------------------------------------------------- low rank


@dataclass
class WhitenedSVD:
    """SVD of the whitened weight ``W L = U diag(S) Vh`` (float64), ``L Lᵀ = G + shift I``.

    Attributes:
        u: ``(out, k)``; s: ``(k,)``; vh: ``(k, in)``; chol: ``L`` ``(in, in)``, lower;
        shift: the damping added to ``G``'s diagonal; weight_norm2: ``||W||_F^2``.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    chol: torch.Tensor
    shift: float = 0.0
    weight_norm2: float = 0.0

    def rel_errors(self) -> torch.Tensor:
        """``e[r]`` = relative (damped-objective) error of rank ``r``, ``r = 0..k``:
        ``sqrt(sum_{j >= r} s_j^2 / sum_j s_j^2)``."""
        s2 = self.s.to(F64) ** 2
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        total = float(s2.sum())
        return (tail / total).clamp_min(0).sqrt() if total > 0 else torch.zeros_like(tail)

    def output_errors(self) -> torch.Tensor:
        """``e[r]`` = relative output error ``sqrt(tr(E_r G E_rᵀ) / tr(W G Wᵀ))`` of the rank-``r``
        whitened truncation on the **undamped** ``G``, for every ``r = 0..k`` at once.

        ``E_r L = sum_{j >= r} u_j s_j v_jᵀ``, so ``tr(E_r G_λ E_rᵀ) = sum_{j >= r} s_j^2`` and
        ``||E_r||_F^2 = sum_{j >= r} s_j^2 ||L^{-T} v_j||^2`` (the ``u_j`` are orthonormal);
        the undamped objective is ``tr(E G_λ Eᵀ) - shift ||E||_F^2``.
        """
        s2 = self.s.to(F64) ** 2
        z = torch.linalg.solve_triangular(self.chol.T, self.vh.T, upper=True)
        terms = s2 - self.shift * s2 * (z * z).sum(0)
        tail = torch.cat([terms.flip(0).cumsum(0).flip(0), terms.new_zeros(1)])
        den = float(s2.sum()) - self.shift * self.weight_norm2
        if den <= 0:
            return tail.clamp_min(0).sqrt()
        return (tail / den).clamp_min(0).sqrt()

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out_factor (out, r), in_factor (in, r))`` with ``Ŵ = out_factor in_factorᵀ``,
        ``sqrt(s)`` given to each side."""
        root = self.s[:rank].sqrt()
        left = self.u[:, :rank] * root
        # in_factor = L^{-T} V_r sqrt(S_r): a triangular solve, no inverse formed.
        right = torch.linalg.solve_triangular(self.chol.T, self.vh[:rank].T * root, upper=True)
        return left, right


def whitened_svd(
    weight: torch.Tensor, gram: torch.Tensor, damping: float = DEFAULT_DAMPING
) -> WhitenedSVD:
    """The SVD of ``W L`` (``G + λ mean(diag G) I = L Lᵀ``), float64; see :class:`WhitenedSVD`."""
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out, in) matrix, got {tuple(weight.shape)}")
    _check_gram(gram, weight.shape[1])
    chol, shift = _damped_cholesky(gram, _check_damping(damping))
    w = weight.detach().to(F64)
    u, s, vh = thin_svd(w @ chol)
    return WhitenedSVD(u, s, vh, chol, shift, float((w * w).sum()))


def whitened_low_rank(
    weight: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-``rank`` ``Ŵ = B Aᵀ`` minimising ``‖(W - Ŵ) L‖_F`` (closed form).

    With ``G_λ = L Lᵀ`` and ``W L = U S Vᵀ``: ``Ŵ = U_r S_r V_rᵀ L^{-1}`` (Eckart–Young in the
    whitened space), the optimum of ``tr((W - Ŵ) G_λ (W - Ŵ)ᵀ)`` over rank ``r``; for
    ``damping=0`` and an invertible ``G = XᵀX`` it minimises ``‖X Wᵀ - X Ŵᵀ‖_F`` exactly.

    Returns:
        ``(B (out, r), A (in, r), rel_output_error)`` in the weight's dtype, ``sqrt(s_r)`` on
        each side; the error uses the undamped ``G`` (computed from the spectrum, no
        ``(out, in, in)`` product).
    """
    rank = check_int("rank", rank, minimum=1)
    svd = whitened_svd(weight, gram, damping)
    rank = min(rank, svd.s.shape[0])
    b, a = svd.factors(rank)
    w = weight.detach().to(F64)
    # ||E||^2 = ||W||^2 - 2 tr(Bᵀ W A) + tr(BᵀB AᵀA), then the undamped objective.
    e2 = svd.weight_norm2 - 2 * float((b * (w @ a)).sum()) + float(((b.T @ b) * (a.T @ a)).sum())
    s2 = svd.s**2
    num = float(s2[rank:].sum()) - svd.shift * max(e2, 0.0)
    den = float(s2.sum()) - svd.shift * svd.weight_norm2
    err = math.sqrt(max(num, 0.0) / den) if den > 0 else math.sqrt(max(num, 0.0))
    return b.to(weight.dtype), a.to(weight.dtype), err


# --------------------------------------------------------------------------- mode Grams


def mode_grams(gram: torch.Tensor, shape: Sequence[int]) -> list[torch.Tensor]:
    """Per-mode Grams of a Gram over a row-major tensorized input ``shape``: partial traces.

    ``G_q[i, k] = sum over the other modes j of G[(.., i, ..), (.., k, ..)]`` (same ``j`` on
    both sides). They are PSD when ``G`` is, and ``G ≈ G_1 ⊗ ... ⊗ G_Q / tr(G)^{Q-1}`` is exact
    when ``G`` is a Kronecker product (the Kronecker-factored approximation, as in K-FAC).
    """
    shape = [int(s) for s in shape]
    q_modes = len(shape)
    g = gram.detach().to(F64).reshape(*shape, *shape)
    out = []
    for q in range(q_modes):
        t = g
        # Trace out every other mode (largest index first keeps the axis numbers valid).
        for j in sorted((j for j in range(q_modes) if j != q), reverse=True):
            half = t.dim() // 2
            t = t.diagonal(dim1=j, dim2=half + j).sum(-1)
        out.append((t + t.T) / 2)
    return out


def _mode_cholesky(grams: Sequence[torch.Tensor], damping: float) -> list[torch.Tensor]:
    return [damped_cholesky(g, damping) for g in grams]


def _apply_modes(t: torch.Tensor, mats: Sequence[torch.Tensor | None], first: int) -> torch.Tensor:
    """Multiply modes ``first, first+1, ...`` of ``t`` by ``mats`` (``t ×_k M_kᵀ``: index
    ``i_k`` becomes ``j_k`` with ``sum_i t[.., i, ..] M[i, j]``); ``None`` skips a mode."""
    for k, m in enumerate(mats):
        if m is None:
            continue
        axis = first + k
        t = torch.tensordot(t, m, dims=([axis], [0])).movedim(-1, axis)
    return t


# --------------------------------------------------------------------------- Kronecker


def whitened_nearest_kronecker(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    rank: int = 1,
    *,
    damping: float = DEFAULT_DAMPING,
    n_iter_max: int = 10,
    tol: float = 1e-4,
    compare_data_free: bool = True,
) -> tuple[list[torch.Tensor], float]:
    """``sum_r F_1[r] ⊗ ... ⊗ F_d[r]`` minimising the output error ``tr(E G_λ Eᵀ)``.

    Initialisation: with the Kronecker-factored ``G ≈ G_1 ⊗ ... ⊗ G_d`` (partial traces,
    :func:`mode_grams`) and ``G_k = L_k L_kᵀ``, the objective is ``‖(W - Ŵ)(L_1 ⊗ ... ⊗ L_d)‖``
    and ``(F_1 ⊗ F_2)(L_1 ⊗ L_2) = F_1 L_1 ⊗ F_2 L_2``: the nearest Kronecker sum of the
    whitened ``W (L_1 ⊗ ... ⊗ L_d)`` (:func:`nearest_kronecker`, an SVD for ``d = 2``) mapped
    back by ``L_k^{-1}`` is its optimum (the data-free nearest Kronecker sum is taken instead
    when it is better on the full ``G``, unless ``compare_data_free=False``). For ``d = 2`` it
    is then refined by alternating least squares on the full ``G_λ``: with ``F_2`` fixed the
    objective is quadratic in ``F_1`` and decouples over the rows of ``F_1`` with one shared
    ``(R in_1) x (R in_1)`` Hessian (and vice versa), so each half-step is an exact
    minimisation (the objective never increases); it stops after ``n_iter_max`` sweeps or when
    the objective improves by less than ``tol`` relative.

    Returns:
        ``(factors, rel_output_error)``: ``d`` tensors ``(R, out_k, in_k)`` in the weight's dtype.
    """
    check_tensor("weight", weight)
    _check_gram(gram, weight.shape[1])
    damping = _check_damping(damping)
    n_iter_max = check_int("n_iter_max", n_iter_max, minimum=0)
    tol = check_real("tol", tol, minimum=0.0)
    out_shape = tuple(int(s) for s in out_shape)
    in_shape = tuple(int(s) for s in in_shape)
    d = len(in_shape)
    w = weight.detach().to(F64)
    g_d = damped(gram, damping)
    chols = _mode_cholesky(mode_grams(gram, in_shape), damping)
    w_t = w.reshape(*out_shape, *in_shape)
    w_white = _apply_modes(w_t, chols, d).reshape(w.shape)
    factors = nearest_kronecker(w_white, out_shape, in_shape, rank=rank)
    # F_k = F~_k L_k^{-1}:  F~ = F L  =>  F = solve(L^T, F~^T)^T.
    factors = [
        torch.linalg.solve_triangular(c.T, f.transpose(1, 2), upper=True).transpose(1, 2)
        for f, c in zip(factors, chols, strict=True)
    ]
    # Keep the data-free solution instead if it is better on the full G (the ALS below then
    # never ends worse than the data-free fit).
    if compare_data_free:
        free = [f.to(F64) for f in nearest_kronecker(w, out_shape, in_shape, rank=rank)]

        def objective(fs: Sequence[torch.Tensor]) -> float:
            e = w - _kron_sum(fs)
            return float(((e @ g_d) * e).sum())

        factors = min((factors, free), key=objective)
    if d == 2 and n_iter_max > 0:
        factors = _kron_als(w, g_d, factors, out_shape, in_shape, n_iter_max, tol)
    approx = _kron_sum(factors)
    err = output_error(w, approx, gram)
    return [f.to(weight.dtype).contiguous() for f in factors], err


def _kron_sum(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    from ..ops.kron import kron_dense

    return kron_dense(list(factors))


def _kron_als(w, g_d, factors, out_shape, in_shape, n_iter_max, tol):
    (o1, o2), (i1, i2) = out_shape, in_shape
    a, b = factors  # (R, o1, i1), (R, o2, i2)
    rank = a.shape[0]
    g4 = g_d.reshape(i1, i2, i1, i2)
    wg = (w @ g_d).reshape(o1, o2, i1, i2)
    base = float(((w @ g_d) * w).sum())
    prev = math.inf
    for _ in range(n_iter_max):
        # A-step: H[(r,i1),(s,k1)] = sum C[r,i2,s,k2] G[i1,i2,k1,k2], C = sum_o2 B B.
        c = torch.einsum("rpa,spb->rasb", b, b)
        h = torch.einsum("rasb,iakb->risk", c, g4).reshape(rank * i1, rank * i1)
        rhs = torch.einsum("pqia,rqa->pri", wg, b).reshape(o1, rank * i1)
        x = _spd_solve(h, rhs)
        a = x.reshape(o1, rank, i1).transpose(0, 1).contiguous()
        # B-step.
        c = torch.einsum("rpa,spb->rasb", a, a)
        h = torch.einsum("rasb,akbl->rksl", c, g4).reshape(rank * i2, rank * i2)
        rhs = torch.einsum("pqai,rpa->qri", wg, a).reshape(o2, rank * i2)
        x = _spd_solve(h, rhs)
        b = x.reshape(o2, rank, i2).transpose(0, 1).contiguous()
        # At the optimum of the half-step the objective is base - <rhs, x>.
        obj = base - float((rhs * x).sum())
        if prev - obj < tol * max(abs(prev), 1e-300) or obj <= 1e-14 * base:
            break
        prev = obj
    return [a, b]


def _spd_solve(h: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``x`` with ``H x_i = rhs_i`` for each row ``rhs_i`` (``H`` symmetric PSD)."""
    h = (h + h.T) / 2
    n = h.shape[0]
    ridge = 1e-12 * float(h.diagonal().mean()) + torch.finfo(F64).tiny
    chol, info = torch.linalg.cholesky_ex(h + ridge * torch.eye(n, dtype=h.dtype, device=h.device))
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, chol).T
    return rhs @ torch.linalg.pinv(h, hermitian=True)


# --------------------------------------------------------------------------- CP


def check_cp_fit_options(
    damping: object, n_iter_max: object, tol: object, refine_iter: object
) -> tuple[float, int, float, int]:
    """The options of :func:`fit_cp`, checked (``TypeError`` / ``ValueError`` naming each).

    The converters check them up front: without an input Gram ``damping`` and
    ``refine_iter`` would be accepted and ignored, and a NaN or negative ``tol`` would run
    the ALS without any error."""
    return (
        _check_damping(damping),
        check_int("n_iter_max", n_iter_max, minimum=0),
        check_real("tol", tol, minimum=0.0),
        check_int("refine_iter", refine_iter, minimum=0),
    )


def fit_cp(
    weight: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    rank: int,
    *,
    input_gram: torch.Tensor | None,
    damping: float,
    n_iter_max: int,
    tol: float,
    refine_iter: int,
    init: Sequence[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], float | None]:
    """CP factors of a layer's ``(H_out, H_in)`` weight matrix viewed as the tensor
    ``(*out_shape, *in_shape)``, and the relative output error on the calibration data.

    Data-free (``input_gram=None``): :func:`kronlayers.decomposition.cp_decompose` of the
    tensor (initialised by ``init``, else HOSVD), minimising ``||W - Ŵ||_F``; the error is
    ``None``. Calibrated: :func:`whitened_cp` with the ``(H_in, H_in)`` Gram, minimising the
    output error. The factors come out modes first (``out_shape``, then ``in_shape``), each
    ``(d_k, rank)``; ``weight`` is not differentiated."""
    weight = weight.detach()
    if input_gram is not None:
        check_tensor("input_gram", input_gram)
        return whitened_cp(
            weight.reshape(weight.shape[0], -1),
            input_gram.to(weight.device),
            out_shape,
            in_shape,
            rank,
            damping=damping,
            n_iter_max=n_iter_max,
            tol=tol,
            refine_iter=refine_iter,
            init=init,
        )
    factors, _ = cp_decompose(
        weight.reshape(*out_shape, *in_shape),
        rank,
        n_iter_max=n_iter_max,
        tol=tol,
        init="svd" if init is None else init,
    )
    return list(factors), None


def whitened_cp(
    weight: torch.Tensor,
    gram: torch.Tensor,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
    n_iter_max: int = 100,
    tol: float = 1e-5,
    whiten_iter: int = 0,
    refine_iter: int = 10,
    pcg_iter: int = 3,
    init: Sequence[torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], float]:
    """CP factors of the tensorized ``weight`` (``(*out_shape, *in_shape)``, out modes first)
    minimising the output error ``tr(E G_λ Eᵀ)`` over the inputs ``in_shape`` tensorizes.

    1. Start: the data-free CP-ALS of the weight (:func:`kronlayers.decomposition.cp.cp_als`,
       ``n_iter_max`` sweeps, ``tol``; HOSVD initialisation or the warm start ``init``, whose
       rank may be lower).
    2. Optionally (``whiten_iter > 0``; measured to add little once step 3 runs, so off by
       default) sweeps of CP-ALS in the mode-whitened space, warm-started there: with
       the Kronecker-factored ``G ≈ ⊗ G_q`` (:func:`mode_grams`), ``G_q = L_q L_qᵀ``, the
       objective is the plain CP fit of the weight with every input mode multiplied by
       ``L_q``; the input factors map back by ``L_q^{-T}``. Of the start and this result, the
       one with the lower full objective is kept.
    3. ``refine_iter`` sweeps on the full ``G_λ``. Writing ``Ŵ = K_out K_inᵀ`` (Khatri-Rao
       products of the output / input factors), each output factor has the exact update
       ``B_p = MTTKRP_p(W G K_in) (K_inᵀ G K_in * prod_{p' != p} B_{p'}ᵀ B_{p'})^{-1}``; an
       input factor ``A_q`` enters through ``G`` on both sides, so its normal equations
       (``i_q R`` unknowns) are solved approximately by ``pcg_iter`` steps of conjugate
       gradients warm-started at the current ``A_q`` and preconditioned by the
       Kronecker-factored solve. Every step lowers the objective (a sweep that would not is
       undone, and the refinement stops when a sweep gains less than ``1e-4`` relative), so
       the result is never worse on the calibration data than the start, e.g. the data-free
       decomposition.

    Returns:
        ``(factors, rel_output_error)``: ``P + Q`` factors ``(d, R)`` (out modes first), in
        the weight's dtype, balanced; the error uses the undamped ``G``.
    """
    check_tensor("weight", weight)
    _check_gram(gram, weight.shape[1])
    damping = _check_damping(damping)
    rank = check_int("rank", rank, minimum=1)
    # Checked here, not only where used: refine_iter=-1 or whiten_iter=None would otherwise
    # skip a step silently (or fail on a comparison without naming the argument).
    n_iter_max = check_int("n_iter_max", n_iter_max, minimum=0)
    tol = check_real("tol", tol, minimum=0.0)
    whiten_iter = check_int("whiten_iter", whiten_iter, minimum=0)
    refine_iter = check_int("refine_iter", refine_iter, minimum=0)
    pcg_iter = check_int("pcg_iter", pcg_iter, minimum=0)
    out_shape = tuple(int(s) for s in out_shape)
    in_shape = tuple(int(s) for s in in_shape)
    n_out = len(out_shape)
    w = weight.detach().to(F64)
    big = w.numel() * rank > 20_000_000
    g_d = damped(gram, damping)
    start = cp_als(
        w.reshape(*out_shape, *in_shape).to(torch.float32 if big else F64),
        rank,
        init="svd" if init is None else init,
        n_iter_max=n_iter_max,
        tol=tol,
    ).factors
    start = [f.detach().to(F64) for f in start]
    candidates = [start]
    grams_q = mode_grams(gram, in_shape)
    if whiten_iter > 0:
        chols = _mode_cholesky(grams_q, damping)
        tensor = _apply_modes(w.reshape(*out_shape, *in_shape), chols, n_out)
        warm = start[:n_out] + [c.T @ f for f, c in zip(start[n_out:], chols, strict=True)]
        res = cp_als(
            tensor.to(torch.float32) if big else tensor,
            rank,
            init=warm,
            n_iter_max=whiten_iter,
            tol=tol,
        )
        factors = [f.to(F64) for f in res.factors]
        factors[n_out:] = [
            torch.linalg.solve_triangular(c.T, f, upper=True)
            for f, c in zip(factors[n_out:], chols, strict=True)
        ]
        candidates.append(factors)

    def objective(fs: Sequence[torch.Tensor]) -> float:
        e = w - khatri_rao(fs[:n_out]) @ khatri_rao(fs[n_out:]).T
        return float(((e @ g_d) * e).sum())

    factors = candidates[0] if len(candidates) == 1 else min(candidates, key=objective)
    if refine_iter > 0:
        factors = _refine_cp(
            w, g_d, factors, out_shape, in_shape, grams_q, damping, refine_iter, pcg_iter
        )
    factors = balance_cp_factors(factors)
    approx = khatri_rao(factors[:n_out]) @ khatri_rao(factors[n_out:]).T
    err = output_error(w, approx, gram)
    return [f.to(weight.dtype) for f in factors], err


def _refine_cp(w, g_d, factors, out_shape, in_shape, grams_q, damping, sweeps, pcg_iter):
    """Sweeps on the full damped Gram (see :func:`whitened_cp`, step 3).

    ``W G`` is formed once; ``G K_in`` is kept current through the input-factor updates (the
    Khatri-Rao product is linear in each factor, so the PCG steps update it for free), so a
    sweep costs two ``(out, in, R)`` products and one ``(in, in, R)`` product per PCG step.
    """
    n_out = len(out_shape)
    b_fs, a_fs = list(factors[:n_out]), list(factors[n_out:])
    # The big products run in float32 when the layer is large (the small solves in float64).
    big = w.numel() * a_fs[0].shape[1] > 20_000_000
    wd = torch.float32 if big else F64
    g_w = g_d.to(wd)
    wg = w.to(wd) @ g_w  # W G, (out, in)
    base = float((wg.to(F64) * w).sum())
    pre = [damped(g, damping) for g in grams_q]  # preconditioner blocks (scale irrelevant)
    k_in = khatri_rao(a_fs)
    gk = (g_w @ k_in.to(wd)).to(F64)  # G K_in
    k_out = khatri_rao(b_fs)
    gn = (wg.T @ k_out.to(wd)).to(F64)  # G Wᵀ K_out
    best = base - 2 * float((gn * k_in).sum()) + float(((k_out.T @ k_out) * (k_in.T @ gk)).sum())
    for _ in range(sweeps):
        new_b, new_a = list(b_fs), list(a_fs)
        # Output factors: exact.
        qm = k_in.T @ gk
        mo = (wg @ k_in.to(wd)).to(F64)  # W G K_in
        gb = [f.T @ f for f in new_b]
        for p in range(n_out):
            v = qm.clone()
            for j, g in enumerate(gb):
                if j != p:
                    v = v * g
            m = mttkrp_within(mo, out_shape, new_b, p)
            new_b[p] = solve_normal(m, v)
            gb[p] = new_b[p].T @ new_b[p]
        # Input factors: PCG on the normal equations, warm-started.
        new_k_out = khatri_rao(new_b)
        qo = new_k_out.T @ new_k_out
        gn = (wg.T @ new_k_out.to(wd)).to(F64)
        new_gk = gk
        for q in range(len(in_shape)):
            new_a[q], new_gk = _pcg_in_factor(
                g_w, wd, gn, qo, new_a, q, in_shape, pre, pcg_iter, new_gk
            )
        new_k_in = khatri_rao(new_a)
        obj = base - 2 * float((gn * new_k_in).sum()) + float((qo * (new_k_in.T @ new_gk)).sum())
        if not obj < best:
            break
        improved = best - obj
        b_fs, a_fs, best = new_b, new_a, obj
        k_in, gk = new_k_in, new_gk
        if improved < 1e-4 * max(abs(best), 1e-300):
            break
    return [*b_fs, *a_fs]


def _pcg_in_factor(g_w, wd, gn, qo, a_fs, q, in_shape, pre, iters, gk):
    """A few PCG steps on ``H(A_q) = b`` for input factor ``q`` (see :func:`whitened_cp`).

    ``gk`` is ``G K_in`` for the current factors; returns the new factor and the updated
    ``G K_in``."""

    def g_times(v):
        fs = list(a_fs)
        fs[q] = v
        return (g_w @ khatri_rao(fs).to(wd)).to(F64)

    def project(y):
        return mttkrp_within(y @ qo, in_shape, a_fs, q)

    # Kronecker-factored preconditioner: G_q^{-1} X M^{-1}, M = Qo * prod_j A_jᵀ G_j A_j
    # (both factorised once per call).
    m = qo.clone()
    for j, f in enumerate(a_fs):
        if j != q:
            m = m * (f.T @ pre[j] @ f)
    chol_q = torch.linalg.cholesky(pre[q])
    m = (m + m.T) / 2
    chol_m, info = torch.linalg.cholesky_ex(m)
    if int(info) != 0:
        chol_m = torch.linalg.cholesky(m + 1e-10 * float(m.diagonal().mean()) * torch.eye(
            m.shape[0], dtype=m.dtype, device=m.device))  # fmt: skip

    def precond(x):
        return torch.cholesky_solve(torch.cholesky_solve(x, chol_q).T, chol_m).T

    b = mttkrp_within(gn, in_shape, a_fs, q)
    x = a_fs[q]
    r = b - project(gk)  # H(x) = S_qᵀ(G K_in Qo) at the current factor
    z = precond(r)
    p = z
    rz = float((r * z).sum())
    for _ in range(iters):
        if rz <= 0:
            break
        gp = g_times(p)
        hp = project(gp)
        php = float((p * hp).sum())
        if php <= 0:
            break
        alpha = rz / php
        x = x + alpha * p
        gk = gk + alpha * gp
        r = r - alpha * hp
        z = precond(r)
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, gk


# --------------------------------------------------------------------------- Tucker-2


def whitened_tucker2(
    kernel: torch.Tensor,
    gram: torch.Tensor,
    ranks: tuple[int, int],
    *,
    damping: float = DEFAULT_DAMPING,
    n_iter_max: int = 20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Tucker-2 of a ``(C_out, C_in, kh, kw)`` kernel minimising the output error over
    unfolded input patches with Gram ``gram`` ``(C_in kh kw, C_in kh kw)``.

    1. HOOI (:func:`kronlayers.decomposition.tucker2_decompose`) of the kernel whitened by the
       Kronecker-factored ``G ≈ G_channels ⊗ G_spatial`` (partial traces), mapped back:
       ``U_in = L_c^{-T} Ũ_in``, core spatial modes by ``L_s^{-T}``.
    2. For that ``U_in``, and for the data-free HOOI's, the output factor and core solved
       exactly on the full ``G_λ``: ``Ŵ = X (U_in ⊗ I)ᵀ`` with ``X`` of rank ``R_out``, a
       reduced-rank regression (``X* = W G Φ (Φᵀ G Φ)^{-1}``, ``Φ = U_in ⊗ I``, truncated in
       the ``Φᵀ G Φ`` metric); the better of the two is returned (so never worse on the
       calibration data than the data-free decomposition).

    Returns:
        ``(core (R_out, R_in, kh, kw), in_factor (C_in, R_in), out_factor (C_out, R_out),
        rel_output_error)`` in the kernel's dtype; ``out_factor`` has orthonormal columns.
    """
    from .tucker import tucker2_decompose

    check_tensor("kernel", kernel)
    if kernel.dim() != 4:
        raise ValueError(f"kernel must have shape (C_out, C_in, kh, kw), got {tuple(kernel.shape)}")
    c_out, c_in, kh, kw = kernel.shape
    k = kh * kw
    _check_gram(gram, c_in * k)
    damping = _check_damping(damping)
    r_in, r_out = int(ranks[0]), int(ranks[1])
    w = kernel.detach().to(F64)
    g_c, g_s = mode_grams(gram, (c_in, k))
    l_c, l_s = _mode_cholesky([g_c, g_s], damping)
    w_white = _apply_modes(w.reshape(c_out, c_in, k), [l_c, l_s], 1).reshape(c_out, c_in, kh, kw)
    _, u_in_t, _, _ = tucker2_decompose(w_white, (r_in, r_out), n_iter_max=n_iter_max)
    u_white = torch.linalg.solve_triangular(l_c.T, u_in_t.to(F64), upper=True)
    _, u_free, _, _ = tucker2_decompose(w, (r_in, r_out), n_iter_max=n_iter_max)
    g_d = damped(gram, damping)
    wm = w.reshape(c_out, c_in * k)
    eye_k = torch.eye(k, dtype=F64, device=w.device)

    def solve_rest(u_in: torch.Tensor):
        # Reduced-rank regression for (U_out, core) given U_in; Φ = U_in ⊗ I_k,
        # (C_in k, R_in k): row (i, s), column (a, s).
        u_in = torch.linalg.qr(u_in)[0].contiguous()
        phi = (u_in[:, None, :, None] * eye_k[None, :, None, :]).reshape(c_in * k, r_in * k)
        gphi = g_d @ phi
        l_phi = torch.linalg.cholesky(phi.T @ gphi)
        x_star = torch.cholesky_solve((wm @ gphi).T, l_phi).T  # (C_out, R_in k)
        u, _, _ = torch.linalg.svd(x_star @ l_phi, full_matrices=False)
        u_out = u[:, :r_out]
        core = (u_out.T @ x_star).reshape(r_out, r_in, kh, kw)
        e = wm - u_out @ core.reshape(r_out, -1) @ phi.T
        return float(((e @ g_d) * e).sum()), core, u_in, u_out, wm - e

    # The whitened HOOI's input subspace or the data-free one, whichever fits better.
    _, core, u_in, u_out, approx = min(
        (solve_rest(u_white), solve_rest(u_free.to(F64))), key=lambda t: t[0]
    )
    err = output_error(wm, approx, gram)
    dtype = kernel.dtype
    return core.to(dtype), u_in.to(dtype), u_out.to(dtype), err
