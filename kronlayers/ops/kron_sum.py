r"""Kronecker sums: dense, diagonal, implicit matmul, solve, and the nearest-sum projection.

The Kronecker sum of square matrices ``A_k`` of sizes ``d_k`` is

.. math::
    A_1 \oplus \dots \oplus A_K = \sum_k I_{d_1} \otimes \dots \otimes A_k \otimes \dots
    \otimes I_{d_K},

an ``n x n`` matrix with ``n = prod_k d_k``; for two factors ``A ⊕ B = A ⊗ I_b + I_a ⊗ B``,
and the operation is associative. Indices follow :func:`torch.kron` (row-major): entry ``i``
of a length-``n`` vector is the multi-index ``(i_1, ..., i_K)`` of a ``(d_1, ..., d_K)`` view.

Since ``⊕_k A_k = (⊗_k V_k) (⊕_k Λ_k) (⊗_k V_k)ᵀ`` for symmetric ``A_k = V_k Λ_k V_kᵀ``,
iterative algorithms (TeraLasso and friends) mostly work with Kronecker sums of diagonals,
so :func:`kron_sum_diag` and :func:`ks_project_diag` are written for speed and allocation
reuse; the rest are differentiable compositions of torch ops.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from functools import lru_cache

import torch

from .._shapes import prod
from .._validation import check_shape, check_tensor

__all__ = [
    "kron_sum",
    "kron_sum_diag",
    "kron_sum_matmul",
    "kron_sum_solve",
    "ks_project",
    "ks_project_diag",
]

# ks_project_diag takes BLAS gemv for its two reductions from this many entries on, for these
# dtypes. Below, the sum kernels are as fast or faster (measured on one core: sums win up to
# ~2**19 entries, and at 50 x 15000); above, the column sum kernel falls well behind gemv on
# long columns (2x at 2000 x 2000, 2.5x at 4000 x 4000).
_BLAS_MIN_NUMEL = 1 << 20
_BLAS_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
_MIN_ROW = 256


# --------------------------------------------------------------------------------------------
# argument checks


def _check_square(name: str, m: object) -> torch.Tensor:
    check_tensor(name, m)
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"{name} must be a square matrix of shape (*, d, d), got {tuple(m.shape)}")
    if m.shape[-1] == 0:
        raise ValueError(f"{name} must have d >= 1 in shape (*, d, d), got {tuple(m.shape)}")
    return m


def _check_vector(name: str, v: object) -> torch.Tensor:
    check_tensor(name, v)
    if v.dim() < 1 or v.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (*, d) with d >= 1, got {tuple(v.shape)}")
    return v


def _check_factor_list(name: str, mats: object) -> list[torch.Tensor]:
    if isinstance(mats, torch.Tensor) or not isinstance(mats, Sequence):
        raise TypeError(
            f"{name} must be a list or tuple of square (*, d_k, d_k) tensors, "
            f"got {type(mats).__name__}"
        )
    if len(mats) == 0:
        raise ValueError(f"{name} must hold at least one (*, d_k, d_k) factor, got none")
    return [_check_square(f"{name}[{k}]", m) for k, m in enumerate(mats)]


def _check_varargs(fname: str, name: str, args: tuple, check) -> list[torch.Tensor]:
    if len(args) == 0:
        raise ValueError(f"{fname}() needs at least one factor in *{name}, got none")
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        raise TypeError(
            f"{fname}() takes the factors as separate arguments: {fname}(*{name}), "
            f"got a single {type(args[0]).__name__}"
        )
    return [check(f"{name}[{k}]", a) for k, a in enumerate(args)]


def _names(name: str, k: int, *extra: str) -> list[str]:
    return [*(f"{name}[{i}]" for i in range(k)), *extra]


def _same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> torch.device:
    device = tensors[0].device
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, but {names[0]} is on {device}")
    return device


def _same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    # matmul does not promote, so mixed dtypes would fail deep inside with no argument name
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, but {names[0]} has {tensors[0].dtype}")


def _batch_shape(what: str, shapes: Sequence[Sequence[int]]) -> torch.Size:
    if not any(shapes):
        # the common unbatched case; broadcast_shapes costs ~10 us of Python per call
        return torch.Size()
    try:
        return torch.broadcast_shapes(*shapes)
    except RuntimeError as err:
        got = ", ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"leading batch dims of {what} do not broadcast: {got}") from err


def _check_dims(dims: object, total: int, total_name: str) -> tuple[int, ...]:
    if type(dims) is tuple and all(type(d) is int and d > 0 for d in dims):
        if dims and prod(dims) == total:
            return dims  # the common case, without the generic checks' Python overhead
    if isinstance(dims, (int, torch.Tensor)) or not isinstance(dims, Sequence):
        raise TypeError(
            f"dims must be a non-empty sequence of ints (d_1, ..., d_K), got {type(dims).__name__}"
        )
    try:
        dims = tuple(operator.index(d) for d in dims)
    except TypeError as err:
        raise TypeError(f"dims must contain ints, got {tuple(dims)!r}") from err
    return check_shape("dims", dims, total, total_name)


def _check_floating(name: str, t: torch.Tensor) -> None:
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{name} must be a floating-point or complex tensor, got {t.dtype}")


@lru_cache(maxsize=256)
def _plan(dims: tuple[int, ...]) -> tuple[int, int, int]:
    # (j, L, n) for dims: the split of _split (none for one factor) and the product
    n = prod(dims)
    return (*_split(dims), n) if len(dims) > 1 else (1, n, n)


def _split(dims: Sequence[int]) -> tuple[int, int]:
    # Index j (1 <= j < K) that splits the factors into a prefix and a suffix group of
    # sizes L = prod(dims[:j]) and R = n / L, so that a length-n vector is an (L, R) matrix:
    # kron_sum_diag writes it once as an outer sum of the groups' (L,) and (R,) sums, and
    # ks_project_diag reads it as row and column sums. Rows of >= _MIN_ROW entries come
    # first (TensorIterator pays per row, and the inner loop needs length to vectorize),
    # then the smallest L + R (the side buffers, ~2 sqrt(n) for balanced dims). Returns (j, L).
    n = prod(dims)
    best, left = None, 1
    for j in range(1, len(dims)):
        left *= dims[j - 1]
        key = (n // left < _MIN_ROW, left + n // left, j, left)
        best = key if best is None else min(best, key)
    return best[2], best[3]


# --------------------------------------------------------------------------------------------
# Kronecker sums


def kron_sum(*mats: torch.Tensor) -> torch.Tensor:
    r"""Dense Kronecker sum ``A_1 ⊕ A_2 ⊕ ... ⊕ A_K``.

    ``A ⊕ B = A ⊗ I_b + I_a ⊗ B`` (the :func:`torch.kron` convention), extended
    associatively to ``K`` factors. Meant for tests, inspection and small sizes: the output
    has ``n²`` entries. Each factor is added only on its ``n d_k`` structurally non-zero
    entries (through a diagonal view), so no ``n x n`` temporaries are made.

    Args:
        *mats: ``K >= 1`` square matrices, ``A_k`` of shape ``(*B_k, d_k, d_k)``; leading
            batch dims broadcast.

    Shape:
        - mats[k]: ``(*B_k, d_k, d_k)``
        - Output: ``(*B, n, n)`` with ``B = broadcast(B_1, ..., B_K)``, ``n = prod_k d_k``,
          dtype the promotion of the factors' dtypes.

    Example::

        >>> a, b = torch.randn(2, 2), torch.randn(3, 3)
        >>> s = kron_sum(a, b)
        >>> torch.allclose(s, torch.kron(a, torch.eye(3)) + torch.kron(torch.eye(2), b))
        True
    """
    mats = _check_varargs("kron_sum", "mats", mats, _check_square)
    device = _same_device(_names("mats", len(mats)), mats)
    dims = [m.shape[-1] for m in mats]
    batch = _batch_shape("mats", [m.shape[:-2] for m in mats])
    n = prod(dims)
    dtype = mats[0].dtype
    for m in mats[1:]:
        dtype = torch.promote_types(dtype, m.dtype)
    out = torch.zeros(*batch, n, n, dtype=dtype, device=device)
    for k, a in enumerate(mats):
        left, d, right = prod(dims[:k]), dims[k], prod(dims[k + 1 :])
        # Entry ((l, i, r), (l', j, r')) of I_left ⊗ A ⊗ I_right is A[i, j] δ(l, l') δ(r, r'):
        # two diagonals of the 6-D view select exactly those entries, as a (d, d, L, R) view.
        v = out.view(*batch, left, d, right, left, d, right)
        v = torch.diagonal(v, dim1=-6, dim2=-3)  # (*B, d, R, d, R, L)
        v = torch.diagonal(v, dim1=-4, dim2=-2)  # (*B, d, d, L, R)
        v.add_(a[..., None, None])
    return out


def kron_sum_diag(*vecs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    r"""Diagonal of ``diag(v_1) ⊕ ... ⊕ diag(v_K)``, i.e. ``out[i_1..i_K] = sum_k v_k[i_k]``.

    Written in one pass over the output. The factors are split into a prefix and a suffix
    group (sizes ``L`` and ``R``, ``L R = n``; ``L + R`` as small as possible, ~``2 sqrt(n)``
    for balanced dims, with rows of a few hundred entries preferred), each group's
    Kronecker sum is built in a small buffer (``L`` resp. ``R`` entries, by broadcasting adds
    that never repeat or tile), and the output, viewed as ``(L, R)``, is filled by a single
    broadcast add of the two. No recursion over the output, no ``n``-sized temporaries.

    Args:
        *vecs: ``K >= 1`` vectors, ``v_k`` of shape ``(*B_k, d_k)``; batch dims broadcast.
        out: optional preallocated contiguous output of shape ``(*B, n)`` and the result
            dtype, overwritten and returned. Use it to avoid reallocating (and, for outputs
            beyond the allocator's reuse threshold, page-faulting) ``n`` entries per call in
            iterative loops. It must not overlap the memory of any input (``ValueError``).
            Not differentiable: raises if an input requires grad.

    Shape:
        - vecs[k]: ``(*B_k, d_k)``
        - Output: ``(*B, n)`` with ``B = broadcast(B_1, ..., B_K)``, ``n = prod_k d_k``.

    Example::

        >>> kron_sum_diag(torch.tensor([0., 10.]), torch.tensor([1., 2., 3.]))
        tensor([ 1.,  2.,  3., 11., 12., 13.])
    """
    dims, batch, device = _check_diag_factors(vecs)
    j, L, n = _plan(dims)
    if out is not None:
        _check_out(out, vecs, (*batch, n), device)

    if len(vecs) == 1:
        v = vecs[0]
        if out is None:
            return v.clone()
        return out.copy_(v)

    # the prefix group's sum as a column (L, 1), the suffix group's as a row (R,)
    left, right = _group_sum(vecs[:j]), _group_sum(vecs[j:])
    if batch:
        left, right = left.unsqueeze(-1), right.unsqueeze(-2)
    else:
        left = left.view(L, 1)
    if out is None:
        return (left + right).view(*batch, n)
    torch.add(left, right, out=out.view(*batch, L, n // L))
    return out


def _check_diag_factors(vecs: tuple) -> tuple[tuple[int, ...], tuple[int, ...], torch.device]:
    # Same checks as _check_varargs/_same_device/_batch_shape, in one loop with messages
    # formatted only on error: this runs once per call inside iterative solvers, where a
    # few microseconds of Python matter at the smaller sizes.
    if len(vecs) == 0 or (len(vecs) == 1 and isinstance(vecs[0], (list, tuple))):
        _check_varargs("kron_sum_diag", "vecs", vecs, _check_vector)
    dims, batched, device = [], False, None
    for k, v in enumerate(vecs):
        shape = v.shape if isinstance(v, torch.Tensor) else None
        if not shape or shape[-1] == 0:
            _check_vector(f"vecs[{k}]", v)
        if device is None:
            device = v.device
        elif v.device != device:
            raise ValueError(f"vecs[{k}] is on {v.device}, but vecs[0] is on {device}")
        if len(shape) > 1:
            batched = True
        dims.append(shape[-1])
    if not batched:
        return tuple(dims), (), device
    return tuple(dims), _batch_shape("vecs", [v.shape[:-1] for v in vecs]), device


def _group_sum(vecs: Sequence[torch.Tensor]) -> torch.Tensor:
    # Kronecker sum of a group's diagonals, (*B_group, prod d_k). Each step is one broadcast
    # add (acc[:, None] + v[None, :]); the sizes grow geometrically, so the total work is
    # below twice the group's final size, which is ~sqrt(n) for the balanced split.
    acc = vecs[0]
    for v in vecs[1:]:
        if acc.dim() == 1 and v.dim() == 1:
            acc = (acc.view(-1, 1) + v).view(-1)
        else:
            acc = (acc.unsqueeze(-1) + v.unsqueeze(-2)).flatten(-2)  # (*B, size * d)
    return acc


def _check_out(
    out: object, inputs: Sequence[torch.Tensor], shape: tuple, device: torch.device
) -> None:
    # One pass over the inputs for the result dtype, autograd and memory overlap: like
    # _check_diag_factors, this runs once per call in iterative loops.
    check_tensor("out", out)
    if out.shape != shape:
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"out must be on {device} like the factors, got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    grad = torch.is_grad_enabled()
    # out is written while a single-factor group is still read from its input, so no input
    # may have an element in out's memory; checked on the spans (first to last element).
    # Meta tensors have no memory (data_ptr() is 0).
    lo = hi = 0
    if device.type != "meta":
        lo = out.data_ptr()
        hi = lo + out.numel() * out.element_size()
    dtype = inputs[0].dtype
    for k, v in enumerate(inputs):
        if v.dtype != dtype:
            dtype = torch.promote_types(dtype, v.dtype)
        if grad and v.requires_grad:
            grad = None
        start = v.data_ptr()
        if lo <= start < hi:
            raise ValueError(f"out must not overlap vecs[{k}] in memory")
        if start < lo:
            if v.dim() == 1:
                last = (v.shape[0] - 1) * v.stride(0)
            else:
                last = sum((size - 1) * st for size, st in zip(v.shape, v.stride(), strict=True))
            if start + (last + 1) * v.element_size() > lo:
                raise ValueError(f"out must not overlap vecs[{k}] in memory")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} (the factors' result type), got {out.dtype}")
    if grad is None or (grad and out.requires_grad):
        raise ValueError(
            "out= is not differentiable (autograd does not track writes into out); "
            "call without out= when an input requires grad"
        )


# --------------------------------------------------------------------------------------------
# implicit products and solves


def _as_columns(name: str, x: object, n: int) -> tuple[torch.Tensor, bool]:
    check_tensor(name, x)
    if x.dim() == 1:
        if x.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) or (*, {n}, m), got {tuple(x.shape)}")
        return x.unsqueeze(-1), True
    if x.dim() == 0 or x.shape[-2] != n:
        raise ValueError(f"{name} must have shape ({n},) or (*, {n}, m), got {tuple(x.shape)}")
    return x, False


def _along_axis(a: torch.Tensor, x: torch.Tensor, dims: Sequence[int], k: int) -> torch.Tensor:
    # a (*B_a, d, d) applied to axis k of x (*B_x, n, m) viewed as (*B_x, L, d, R*m). As a
    # batch of L matmuls (d, d) @ (d, R*m) this needs no transpose or copy of x; when
    # R*m == 1 (last axis, one column) it is instead one (L, d) @ (d, d)ᵀ GEMM.
    left, d = prod(dims[:k]), dims[k]
    xv = x.reshape(*x.shape[:-2], left, d, -1)
    if xv.shape[-1] == 1:
        y = xv.squeeze(-1) @ a.mT  # (*B, L, d)
        batch = y.shape[:-2]
    else:
        y = a.unsqueeze(-3) @ xv  # (*B, L, d, R*m)
        batch = y.shape[:-3]
    return y.reshape(*batch, x.shape[-2], x.shape[-1])


def kron_sum_matmul(mats: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    r"""``(A_1 ⊕ ... ⊕ A_K) @ x`` without forming the ``n x n`` sum.

    Shapes follow :func:`torch.matmul` with the sum on the left: ``x`` is a vector
    ``(n,)`` or a (batch of) matrices ``(*, n, m)`` whose columns are multiplied. Each
    factor is applied along its axis of ``x`` viewed as ``(*, d_1, ..., d_K, m)`` and the
    ``K`` results are added: ``n m sum_k d_k`` multiply-adds instead of ``n² m``.

    Args:
        mats: ``K >= 1`` square factors, ``A_k`` of shape ``(*B_k, d_k, d_k)``.
        x: ``(n,)`` or ``(*B_x, n, m)`` with ``n = prod_k d_k``.

    Shape:
        - mats[k]: ``(*B_k, d_k, d_k)``
        - x: ``(n,)`` or ``(*B_x, n, m)``
        - Output: ``(*B, n)`` for vector ``x``, else ``(*B, n, m)``;
          ``B = broadcast(B_1, ..., B_K[, B_x])``.
    """
    mats = _check_factor_list("mats", mats)
    dims = [m.shape[-1] for m in mats]
    x, vector = _as_columns("x", x, prod(dims))
    names = _names("mats", len(mats), "x")
    _same_device(names, [*mats, x])
    _same_dtype(names, [*mats, x])
    _batch_shape("mats and x", [*(m.shape[:-2] for m in mats), x.shape[:-2]])
    out = None
    for k, a in enumerate(mats):
        term = _along_axis(a, x, dims, k)
        if out is None:
            out = term
        elif out.shape == term.shape and out.dtype == term.dtype:
            # out is a fresh matmul result that autograd does not save, so adding in place
            # is safe and saves a temporary per factor.
            out = out.add_(term)
        else:
            out = out + term
    return out.squeeze(-1) if vector else out


def kron_sum_solve(
    mats: Sequence[torch.Tensor], y: torch.Tensor, *, rtol: float | None = None
) -> torch.Tensor:
    r"""Solve ``(A_1 ⊕ ... ⊕ A_K) x = y`` for symmetric (Hermitian) factors.

    With ``A_k = V_k Λ_k V_kᴴ`` (:func:`torch.linalg.eigh`),
    ``x = (⊗V_k) [((⊗V_kᴴ) y) / (Λ_1 ⊕ ... ⊕ Λ_K)]``: the eigenvalues combine with
    :func:`kron_sum_diag` and the eigenvectors are applied axis by axis, so the ``n x n``
    sum is never formed (``O(sum_k d_k³ + n m sum_k d_k)`` work). Differentiable through
    ``eigh`` (whose gradient is ill-defined for repeated eigenvalues within a factor).

    Singular sums raise :class:`torch.linalg.LinAlgError` (as :func:`torch.linalg.solve`
    does) when some combined eigenvalue ``λ`` has ``|λ| <= rtol * sum_k max|Λ_k|`` - the
    scale of the rounding error of the combined eigenvalues. The symmetry and singularity
    checks read back a scalar each, i.e. synchronize with the device ``K + 1`` times.

    Args:
        mats: ``K >= 1`` symmetric factors, ``A_k`` of shape ``(*B_k, d_k, d_k)``; a factor
            more asymmetric than ``sqrt(eps) * max|A_k|`` raises ``ValueError``.
        y: right-hand side, ``(n,)`` or ``(*B_y, n, m)`` (as :func:`kron_sum_matmul`).
        rtol: relative singularity tolerance; default ``K * max_k d_k * eps(dtype)``.
            ``0`` raises only on exactly zero combined eigenvalues.

    Shape:
        - mats[k]: ``(*B_k, d_k, d_k)``
        - y: ``(n,)`` or ``(*B_y, n, m)``
        - Output: same as ``kron_sum_matmul(mats, y)``.
    """
    mats = _check_factor_list("mats", mats)
    dims = [m.shape[-1] for m in mats]
    y, vector = _as_columns("y", y, prod(dims))
    names = _names("mats", len(mats), "y")
    _same_device(names, [*mats, y])
    _same_dtype(names, [*mats, y])
    _batch_shape("mats and y", [*(m.shape[:-2] for m in mats), y.shape[:-2]])
    for k, a in enumerate(mats):
        _check_floating(f"mats[{k}]", a)
        eps = torch.finfo(a.dtype).eps
        with torch.no_grad():
            asym = (a - a.mH).abs().amax()
            scale = a.abs().amax()
        if bool(asym > eps**0.5 * scale):
            raise ValueError(
                f"mats[{k}] must be symmetric (Hermitian), shape (*, d, d); "
                f"max |A - Aᴴ| = {float(asym):.3g} vs max |A| = {float(scale):.3g}"
            )
    _check_floating("y", y)

    evals, evecs = zip(*(torch.linalg.eigh(a) for a in mats), strict=True)
    lam = kron_sum_diag(*evals)  # (*B_λ, n), real
    if rtol is None:
        rtol = len(mats) * max(dims) * torch.finfo(lam.dtype).eps
    elif not isinstance(rtol, (int, float)) or rtol < 0:
        raise ValueError(f"rtol must be a non-negative float, got {rtol!r}")
    with torch.no_grad():
        scale = sum(e.abs().amax(-1) for e in evals)  # (*B_λ,)
        bad = lam.abs().amin(-1) <= rtol * scale
    if bool(bad.any()):
        raise torch.linalg.LinAlgError(
            "kron_sum_solve: the Kronecker sum of mats is singular (a combined eigenvalue "
            f"is within rtol={rtol:.3g} of zero relative to sum_k max|eig(A_k)|)"
        )

    z = y
    for k, v in enumerate(evecs):
        z = _along_axis(v.mH, z, dims, k)
    z = z / lam.unsqueeze(-1)
    for k, v in enumerate(evecs):
        z = _along_axis(v, z, dims, k)
    return z.squeeze(-1) if vector else z


# --------------------------------------------------------------------------------------------
# nearest Kronecker sum (TeraLasso projection)
#
# Derivation. Split each factor into its identity and trace-free parts, A_k = c_k I + Ã_k.
# The Kronecker sums then form the orthogonal direct sum span{I_n} ⊕ (⊕_k T_k), with
# T_k = {I ⊗ Ã ⊗ I : tr Ã = 0}: <I⊗Ã⊗I, I⊗B̃⊗I> (different axes) = tr Ã tr B̃ (...) = 0 and
# <I_n, I⊗Ã⊗I> = tr Ã n/d_k = 0. So the Frobenius projection is the sum of the projections
# on the pieces. On span{I_n}: (tr M / n) I_n. On T_k: <M, I⊗B⊗I> = (n/d_k) <P_k(M), B> and
# ||I⊗B⊗I||² = (n/d_k) ||B||², where P_k is the partial average (partial trace over the other
# axes divided by n/d_k); the optimum over trace-free B is the trace-free part of P_k(M),
# P_k(M) - (tr P_k(M)/d_k) I = P_k(M) - (tr M / n) I. Summing, and splitting the identity
# coefficient tr M / n evenly over the K factors:
#     A_k = P_k(M) - (K - 1)/K (tr M / n) I_{d_k}.
# Idempotent and with residual orthogonal to every Kronecker sum by construction; the
# projection of a Kronecker sum is itself (its factors come back up to the identity gauge,
# exactly when they are trace-free).


def ks_project(mat: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    r"""Factors of the Kronecker sum nearest to ``mat`` in Frobenius norm.

    Returns ``A_1, ..., A_K`` minimizing ``||mat - A_1 ⊕ ... ⊕ A_K||_F`` (Greenewald, Zhou &
    Hero 2017): ``A_k = P_k(mat) - (K-1)/K (tr(mat)/n) I``, where ``P_k`` averages ``mat``
    over the other axes (partial trace divided by ``n / d_k``). The identity component,
    which the factors can trade freely, is split evenly; trace-free factors are recovered
    exactly. Reads only the ``n sum_k d_k`` entries that the partial averages need.

    Args:
        mat: ``(*B, n, n)`` floating or complex, ``n = prod(dims)``.
        dims: ``(d_1, ..., d_K)``, positive ints.

    Shape:
        - mat: ``(*B, n, n)``
        - Output: ``K`` tensors, ``(*B, d_k, d_k)``.
    """
    _check_square("mat", mat)
    _check_floating("mat", mat)
    n = mat.shape[-1]
    dims = _check_dims(dims, n, "mat.shape[-1]")
    batch = mat.shape[:-2]
    K = len(dims)
    shift = (K - 1) / K * torch.diagonal(mat, dim1=-2, dim2=-1).mean(-1)  # (*B,)
    out = []
    for k, d in enumerate(dims):
        left, right = prod(dims[:k]), prod(dims[k + 1 :])
        v = mat.reshape(*batch, left, d, right, left, d, right)
        v = torch.diagonal(v, dim1=-6, dim2=-3)  # (*B, d, R, d, R, L)
        v = torch.diagonal(v, dim1=-4, dim2=-2)  # (*B, d, d, L, R)
        a = v.mean((-2, -1))
        if K > 1:
            eye = torch.eye(d, dtype=mat.dtype, device=mat.device)
            a = a - shift[..., None, None] * eye
        out.append(a)
    return tuple(out)


def ks_project_diag(vec: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    r""":func:`ks_project` of ``diag(vec)``, returning the factors' diagonals.

    ``a_k = mean of vec viewed as (d_1, ..., d_K) over all axes but k, minus
    (K-1)/K mean(vec)``; the projection of a diagonal matrix has diagonal factors.

    Every marginal comes from two reductions of ``vec`` viewed as ``(L, R)`` (prefix and
    suffix factor groups, as in :func:`kron_sum_diag`): its row sums are the prefix group's
    joint marginal and its column sums the suffix group's, both small, and each factor's
    marginal follows from its group's. So the input is read twice for any ``K`` (one
    strided mean per factor reads it ``K`` times): by two BLAS matrix-vector products
    (``x @ 1`` and ``xᵀ @ 1``, both streaming at memory speed) for an unbatched
    contiguous float or complex input of at least ``2**20`` entries, else by two sums.
    Reading it once would take a fused kernel: two torch reductions per cache-sized block
    measured no faster than the two BLAS passes (the second reduction over a cached block
    costs about half a pass, and each block adds two parallel regions).

    Args:
        vec: ``(*B, n)`` floating or complex, ``n = prod(dims)``.
        dims: ``(d_1, ..., d_K)``, positive ints.

    Shape:
        - vec: ``(*B, n)``
        - Output: ``K`` tensors, ``(*B, d_k)``.
    """
    _check_vector("vec", vec)
    _check_floating("vec", vec)
    n = vec.shape[-1]
    dims = _check_dims(dims, n, "vec.shape[-1]")
    K = len(dims)
    if K == 1:
        return (vec.clone(),)
    j, L, _ = _plan(dims)
    rows, cols = _row_col_sums(vec.reshape(*vec.shape[:-1], L, n // L))
    sums = [*_axis_sums(rows, dims[:j]), *_axis_sums(cols, dims[j:])]
    # a_k = sums_k / (n / d_k) - (K - 1)/K * sum(vec) / n, one op per factor
    shift = rows.sum(-1, keepdim=True) * (-(K - 1) / (K * n))
    return tuple(torch.add(shift, s, alpha=d / n) for s, d in zip(sums, dims, strict=True))


def _axis_sums(joint: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    # Per-axis sums of a group's small joint marginal (*B, prod dims).
    if len(dims) == 1:
        return [joint]
    v = joint.reshape(*joint.shape[:-1], *dims)
    axes = range(-len(dims), 0)
    return [v.sum(tuple(a for a in axes if a != ax)) for ax in axes]


def _row_col_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Row and column sums of x (*B, L, R). A large row-major matrix takes two BLAS gemv
    # passes (x @ 1 and xᵀ @ 1), which stream x at memory speed; the sum kernels do not for
    # the outer (column) reduction. Small, batched, strided inputs and other dtypes: sums.
    if x.dim() == 2 and x.stride(1) == 1 and x.dtype in _BLAS_DTYPES:
        L, R = x.shape
        if L * R >= _BLAS_MIN_NUMEL:
            ones = torch.empty(max(L, R), dtype=x.dtype, device=x.device).fill_(1)
            return torch.mv(x, ones[:R]), torch.mv(x.T, ones[:L])
    return x.sum(-1), x.sum(-2)
