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

from .._shapes import check_shape, check_tensor, prod

__all__ = [
    "kron_sum",
    "kron_sum_diag",
    "kron_sum_matmul",
    "kron_sum_solve",
    "ks_project",
    "ks_project_diag",
]

# ks_project_diag on CPU reads its input in row blocks of about this many bytes, so that the
# second reduction over a block (column sums) hits cache instead of DRAM or L3: ~ the L2 of
# a core or two on current x86 servers. Inputs of fewer than _CHUNK_MIN blocks take the
# plain path, two whole-input reductions. Blocks are not made smaller: each is two parallel
# BLAS calls, and on an oversubscribed machine every parallel region can stall on a
# descheduled thread (1 MiB blocks measured clearly slower than 2 MiB ones under load).
_CHUNK_BYTES = 2 << 20
_CHUNK_MIN = 2
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
def _split_cached(dims: tuple[int, ...]) -> tuple[int, int]:
    return _split(dims)


def _split(dims: Sequence[int]) -> tuple[int, int]:
    # Index j (1 <= j < K) that splits the factors into a prefix and a suffix group of
    # sizes L = prod(dims[:j]) and R = n / L, so that a length-n vector is an (L, R) matrix:
    # kron_sum_diag writes it once as an outer sum of the groups' (L,) and (R,) sums, and
    # ks_project_diag reads it as row and column means. Rows of >= _MIN_ROW entries come
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
            iterative loops. Not differentiable: raises if an input requires grad.

    Shape:
        - vecs[k]: ``(*B_k, d_k)``
        - Output: ``(*B, n)`` with ``B = broadcast(B_1, ..., B_K)``, ``n = prod_k d_k``.

    Example::

        >>> kron_sum_diag(torch.tensor([0., 10.]), torch.tensor([1., 2., 3.]))
        tensor([ 1.,  2.,  3., 11., 12., 13.])
    """
    dims, batch, device = _check_diag_factors(vecs)
    n = prod(dims)
    if out is not None:
        _check_out(out, vecs, (*batch, n), device)

    if len(vecs) == 1:
        v = vecs[0]
        if out is None:
            return v.clone()
        return out.copy_(v)

    j, L = _split_cached(tuple(dims))
    left, right = _group_sum(vecs[:j]), _group_sum(vecs[j:])
    if batch:
        left, right = left.unsqueeze(-1), right.unsqueeze(-2)
    else:
        left = left.view(L, 1)  # cheaper than unsqueeze on both sides, which batches need
    if out is None:
        return (left + right).view(*batch, n)
    torch.add(left, right, out=out.view(*batch, L, n // L))
    return out


def _check_diag_factors(vecs: tuple) -> tuple[list[int], torch.Size, torch.device]:
    # Same checks as _check_varargs/_same_device/_batch_shape, in one loop with messages
    # formatted only on error: this runs once per call inside iterative solvers, where a
    # few microseconds of Python matter at the smaller sizes.
    if len(vecs) == 0 or (len(vecs) == 1 and isinstance(vecs[0], (list, tuple))):
        _check_varargs("kron_sum_diag", "vecs", vecs, _check_vector)
    dims, batched, device = [], False, None
    for k, v in enumerate(vecs):
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] == 0:
            _check_vector(f"vecs[{k}]", v)
        if device is None:
            device = v.device
        elif v.device != device:
            raise ValueError(f"vecs[{k}] is on {v.device}, but vecs[0] is on {device}")
        batched = batched or v.dim() > 1
        dims.append(v.shape[-1])
    if not batched:
        return dims, torch.Size(), device
    return dims, _batch_shape("vecs", [v.shape[:-1] for v in vecs]), device


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
    check_tensor("out", out)
    dtype = inputs[0].dtype
    for v in inputs[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype} (the factors' result type), got {out.dtype}")
    if out.device != device:
        raise ValueError(f"out must be on {device} like the factors, got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    if torch.is_grad_enabled() and any(v.requires_grad for v in (*inputs, out)):
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

    All marginal means come from two reductions over the input: viewed as ``(L, R)``
    (prefix and suffix factor groups), its row means hold the prefix group's joint
    marginal and its column means the suffix group's, both small, from which each factor's
    mean follows. On CPU, large inputs without autograd are read in cache-sized row blocks
    and both reductions are done per block, so the input crosses the memory bus once.

    Args:
        vec: ``(*B, n)`` floating or complex, ``n = prod(dims)``.
        dims: ``(d_1, ..., d_K)``, positive ints.

    Shape:
        - vec: ``(*B, n)``
        - Output: ``K`` tensors, ``(*B, d_k)``.
    """
    _check_vector("vec", vec)
    _check_floating("vec", vec)
    dims = _check_dims(dims, vec.shape[-1], "vec.shape[-1]")
    K = len(dims)
    if K == 1:
        return (vec.clone(),)
    batch = vec.shape[:-1]
    j, L = _split_cached(dims)
    rows, cols = _row_col_means(vec.reshape(*batch, L, -1))
    means = [*_group_marginals(rows, dims[:j]), *_group_marginals(cols, dims[j:])]
    mean = rows.mean(-1, keepdim=True)  # = mean(vec)
    if torch.is_grad_enabled() and vec.requires_grad:
        return tuple(m - (K - 1) / K * mean for m in means)
    # the marginals are fresh tensors: shift them in place, one op per factor
    return tuple(m.sub_(mean, alpha=(K - 1) / K) for m in means)


def _group_marginals(joint: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    # Per-axis means of a group's small joint marginal (*B, prod dims).
    if len(dims) == 1:
        return [joint]
    v = joint.reshape(*joint.shape[:-1], *dims)
    axes = range(-len(dims), 0)
    return [v.mean(tuple(a for a in axes if a != ax)) for ax in axes]


def _row_col_means(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    L, R = x.shape[-2:]
    fast = (
        x.device.type == "cpu"
        and x.dim() == 2
        and x.is_contiguous()
        and not (torch.is_grad_enabled() and x.requires_grad)
        and x.numel() * x.element_size() >= _CHUNK_MIN * _CHUNK_BYTES
    )
    if not fast:
        return x.mean(-1), x.mean(-2)
    # Two plain reductions would stream the (L, R) matrix from DRAM twice; instead take
    # row blocks of ~_CHUNK_BYTES and do both reductions on a block while it is in cache.
    # mv/addmv (BLAS) beat sum(dim) here, notably for the outer (column) reduction.
    b = max(1, _CHUNK_BYTES // (R * x.element_size()))
    rows = torch.empty(L, dtype=x.dtype)
    cols = torch.zeros(R, dtype=x.dtype)
    ones_r = torch.full((R,), 1.0 / R, dtype=x.dtype)
    ones_b = torch.full((b,), 1.0 / L, dtype=x.dtype)
    for block, r in zip(x.split(b), rows.split(b), strict=True):
        torch.mv(block, ones_r, out=r)
        cols.addmv_(block.T, ones_b if block.shape[0] == b else ones_b[: block.shape[0]])
    return rows, cols
