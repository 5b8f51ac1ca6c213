"""Mode-by-mode contraction of a tensor with a (sum of) Kronecker product(s).

This is the vec trick written for row-major tensors. A matrix ``W = F_1 ⊗ ... ⊗ F_d`` with
``F_k`` of shape ``(out_k, in_k)`` has entries ``W[(o_1..o_d), (i_1..i_d)] = prod_k F_k[o_k, i_k]``
where the multi-indices are flattened row-major (``i_1`` slowest), exactly as ``torch.kron``
and ``Tensor.reshape`` flatten them. So ``x @ W.T`` is obtained by viewing ``x`` as
``(N, in_1, ..., in_d)`` and replacing axis ``k`` by its product with ``F_k``, one axis at a
time, in any order; no transpose of the result is needed because every axis stays in place.
(The textbook ``(A ⊗ B) x = vec(B X Aᵀ)`` assumes column-major ``vec``; using it with
``reshape`` silently permutes the output.)

A rank dimension ``r`` is carried along for sums of Kronecker products and contracted in the
last step.

Two factors (the common case, and every layer :func:`kronlayers.compress` builds) have their
own kernels, :func:`kron2_forward` / :func:`kron2_backward`, in which every step is one GEMM
on views, all rank terms at once (see the notes above :func:`kron2_forward`), run over row
blocks that keep the partial products in cache where nothing records the ops.
:func:`kron_weight` forms the dense matrix for the dense path of the dispatcher, and
:func:`kron_factorized_ops` / :func:`kron_dense_ops` describe both paths to the cost model
(:mod:`kronlayers.functional._dispatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._shapes import prod
from ._dispatch import Gemm, Node, Op, Pass, PyFunction

_MODE_LETTERS = "abcdefghijklm"
MAX_FACTORS = len(_MODE_LETTERS)


def contraction_order(sizes_from: Sequence[int], sizes_to: Sequence[int]) -> list[int]:
    """Order of axes that minimises the FLOPs of mapping axis sizes ``from -> to``.

    Contracting axis ``k`` when the tensor has ``T`` entries costs ``T * to_k`` multiply-adds
    (times batch and rank, which are common factors) and scales ``T`` by ``to_k / from_k``.
    Swapping two neighbours ``a, b`` shows that ``a`` goes first iff
    ``1/to_a - 1/from_a > 1/to_b - 1/from_b``, so sorting by that key is optimal
    (an exchange argument; the test suite checks it against brute force).
    """
    keys = [1.0 / t - 1.0 / f for f, t in zip(sizes_from, sizes_to, strict=True)]
    return sorted(range(len(keys)), key=lambda k: -keys[k])


def order_cost(sizes_from: Sequence[int], sizes_to: Sequence[int], order: Sequence[int]) -> int:
    """Multiply-adds per batch row and rank term of contracting the axes in ``order``."""
    total = 1
    for s in sizes_from:
        total *= s
    cost = 0
    for k in order:
        cost += total * sizes_to[k]
        total = total // sizes_from[k] * sizes_to[k]
    return cost


def contract_modes(
    t: torch.Tensor,
    factors: Sequence[torch.Tensor],
    modes: Sequence[int],
    *,
    has_rank: bool,
    transpose: bool,
    reduce_rank: bool,
) -> torch.Tensor:
    """Contract axes ``modes`` of ``t`` with the matching factors, in the given order.

    Args:
        t: ``(N, d_1, ..., d_d)``, or ``(N, R, d_1, ..., d_d)`` when ``has_rank``.
        factors: ``d`` tensors; ``factors[k]`` is ``(R, out_k, in_k)``, or ``(out_k, in_k)``
            for a single Kronecker product (then no rank axis is ever created).
        modes: which axes (0-based over the ``d`` tensor axes) to contract, in order.
        transpose: map ``out_k -> in_k`` with ``F_k^T`` instead of ``in_k -> out_k``.
        reduce_rank: sum over the rank axis in the last contraction.

    Returns:
        ``t`` with every axis in ``modes`` replaced by its image, rank axis present unless
        ``reduce_rank`` (or the factors carry no rank).
    """
    d = len(factors)
    ranked = factors[0].dim() == 3
    if not ranked:
        return _contract_modes_matmul(t, factors, modes, transpose=transpose)
    letters = _MODE_LETTERS[:d]
    rank_here = has_rank and ranked
    for step, k in enumerate(modes):
        last = step == len(modes) - 1
        lk = letters[k]
        # Letters are positional and each einsum is independent, so the image of axis k
        # is called "z" in this step and "letters[k]" again in the next.
        t_sub = "n" + ("r" if rank_here else "") + letters
        f_sub = ("r" if ranked else "") + (lk + "z" if transpose else "z" + lk)
        keep_rank = ranked and not (last and reduce_rank)
        o_sub = "n" + ("r" if keep_rank else "") + letters.replace(lk, "z")
        t = torch.einsum(f"{t_sub},{f_sub}->{o_sub}", t, factors[k])
        rank_here = keep_rank
    return t


def _contract_modes_matmul(
    t: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int], *, transpose: bool
) -> torch.Tensor:
    # Single Kronecker product: view t as (B, d_k, S) around axis k and left-multiply by the
    # factor, a (broadcast) GEMM on a view. No permutation is ever materialised, unlike an
    # einsum, which copies the operand to bring the contracted axis last (measured 1.6x
    # slower for 64x64 (x) 64x64 at batch 256 on CPU).
    for k in modes:
        # A transposed (strided) left operand sends the broadcast GEMM down a slow path;
        # the factor is tiny, so make it contiguous.
        f = factors[k].T.contiguous() if transpose else factors[k]  # (to, from)
        shape = t.shape
        size_from = shape[1 + k]
        after = 1
        for s in shape[2 + k :]:
            after *= s
        if after == 1:
            t = t.reshape(-1, size_from) @ f.T
        else:
            t = torch.matmul(f, t.reshape(-1, size_from, after))
        t = t.reshape(*shape[: 1 + k], f.shape[0], *shape[2 + k :])
    return t


# -- two factors: every step one GEMM over all rank terms ------------------------------------
#
# Notation: x is (M, i1, i2), g = dL/dy is (M, o1, o2), A = factors[0] is (R, o1, i1),
# B = factors[1] is (R, o2, i2), y[m, a, b] = sum_{r, i, j} A[r, a, i] B[r, b, j] x[m, i, j].
# The rank terms are stacked along an axis of a factor so that each step is one GEMM whose
# operands are views (row-major, no permuting copy of any activation), whatever R is:
#
# "B first" (first == 1): T = x.view(M*i1, i2) @ [B_1; ...; B_R]^T        (M*i1, R*o2)
#                          y[m] = A_cat @ T.view(M, i1*R, o2)[m]           (a bmm over m)
#     with A_cat[a, (i, r)] = A[r, a, i]: contracting (i, r) together sums the rank terms.
# "A first" (first == 0): S[m] = A_stk @ x[m], A_stk[(a, r), i] = A[r, a, i]  (M, o1*R, i2)
#                          y = S.view(M*o1, R*i2) @ B_cat,  B_cat[(r, j), b] = B[r, b, j]
#
# Only the factors (R * out_k * in_k entries) are ever permuted.


def _a_cat(a: torch.Tensor, r: int, o1: int, i1: int) -> torch.Tensor:
    # (R, o1, i1) -> (o1, i1*R), [a, (i, r)] = A[r, a, i]; a view when R == 1.
    if r == 1:
        return a.reshape(o1, i1)
    return a.permute(1, 2, 0).reshape(o1, i1 * r)


def _a_stack(a: torch.Tensor, r: int, o1: int, i1: int) -> torch.Tensor:
    # (R, o1, i1) -> (o1*R, i1), [(a, r), i] = A[r, a, i]; a view when R == 1.
    if r == 1:
        return a.reshape(o1, i1)
    return a.permute(1, 0, 2).reshape(o1 * r, i1)


def _b_cat(b: torch.Tensor, r: int, o2: int, i2: int) -> torch.Tensor:
    # (R, o2, i2) -> (R*i2, o2), [(r, j), b] = B[r, b, j]; a transposed view when R == 1.
    if r == 1:
        return b.reshape(o2, i2).t()
    return b.permute(0, 2, 1).reshape(r * i2, o2)


def _bmm_left(left: torch.Tensor, right: torch.Tensor, m: int, bias=None) -> torch.Tensor:
    """``left @ right[k]`` for every ``k``: ``left`` (p, q) shared, ``right`` (M, q, s).

    One bmm with a stride-0 batch for ``left`` (no copy), or for one row a plain mm whose
    (p, s) result is returned as is (callers reshape); ``bias`` (p, s) is added in the
    same call.
    """
    p, q = left.shape
    if m == 1:
        r2 = right.reshape(q, -1)
        return torch.mm(left, r2) if bias is None else torch.addmm(bias, left, r2)
    s = right.shape[2]
    lb = left.expand(m, p, q)
    if bias is None:
        return torch.bmm(lb, right)
    return torch.baddbmm(bias.view(1, p, s), lb, right)


# Per-matrix multiply-adds from which _reduced_bmm accumulates with addbmm.
_ADDBMM_MIN_MACS = 32768


def _reduced_bmm(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sum_m p[m] @ q[m]`` for ``p`` (M, a, k) and ``q`` (M, k, b)."""
    # No single GEMM view exists (the sum runs over m and k, not adjacent in p); einsum /
    # tensordot would permute both operands into one GEMM (two activation-sized copies,
    # measured 7x slower). torch.addbmm accumulates one GEMM per m into the (a, b) result
    # with no temporary (1.4x-2.5x faster than bmm + sum for 64x64x64 and larger
    # matrices); for small matrices its per-m call overhead dominates and one bmm with a
    # sum over an (M, a, b) temporary is faster (7x for 16x16x16).
    m, a, k = p.shape
    b = q.shape[2]
    if m == 1:
        return torch.mm(p.reshape(a, k), q.reshape(k, b))
    if a * k * b >= _ADDBMM_MIN_MACS:
        return torch.addbmm(p.new_zeros(a, b), p, q)
    return torch.bmm(p, q).sum(0)


def kron2_dims(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, int, int, int]:
    """``(R, o1, i1, o2, i2)`` of two factors ``A`` (R, o1, i1) and ``B`` (R, o2, i2)."""
    r, o1, i1 = a.shape
    return r, o1, i1, b.shape[1], b.shape[2]


def kron2_partial(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: int, dims: tuple, m
) -> torch.Tensor:
    """The first contraction of :func:`kron2_forward`: ``T`` (M, i1*R, o2) for
    ``first == 1``, ``S`` (M, o1*R, i2) for ``first == 0``. ``x`` has ``M * i1 * i2``
    entries (any shape; a view when contiguous)."""
    r, o1, i1, o2, i2 = dims
    if first == 1:
        t = torch.mm(x.reshape(m * i1, i2), b.reshape(r * o2, i2).t())
        return t.view(m, i1 * r, o2)
    return _bmm_left(_a_stack(a, r, o1, i1), x.reshape(m, i1, i2), m)


# Blocking of the two-factor kernels over rows. A partial product larger than
# UNBLOCKED_ENTRIES (4 MiB in float32, the size of one 64x64 (x) 64x64 layer's at batch 256)
# runs in row blocks of about BLOCK_ENTRIES (2 MiB), which stay in L2 between the GEMM that
# writes a block and the one that reads it. Measured forward: rank 32 at batch 256 (a
# 128 MiB partial, fresh pages from the OS on every call) 2x faster; batch 8192 1.3x
# faster; smaller partials stay in the shared cache anyway and blocking only adds calls
# (5% slower at batch 256).
BLOCK_ENTRIES = 1 << 19
UNBLOCKED_ENTRIES = 1 << 20


def kron2_block_rows(per_row: int, m) -> int | None:
    """Rows per block for a partial of ``per_row`` entries per row, or ``None`` to run
    unblocked (the partial is small, the size is symbolic, or the blocked kernels cannot
    run: under torch.compile, functorch transforms, or autograd recording the ops, since
    blocks are written in place)."""
    if not isinstance(m, int) or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if torch._C._are_functorch_transforms_active():
        return None
    return kron2_blocks(per_row, m)


def kron2_blocks(per_row: int, m: int) -> int | None:
    """The row-block size rule of :func:`kron2_block_rows` (``None``: unblocked)."""
    if m * per_row <= UNBLOCKED_ENTRIES:
        return None
    rows = max(1, BLOCK_ENTRIES // per_row)
    return rows if rows < m else None


def kron2_forward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None,
    first: int,
    dims: tuple,
    m,
    keep_partial: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y = x @ (sum_r A[r] ⊗ B[r]).T + bias`` for ``x`` (M, i1*i2); returns ``(y, partial)``.

    Two GEMMs, whichever the rank (see the notes above): ``first == 1`` contracts ``B``
    first (one 2-D GEMM ``(M*i1, i2) @ (i2, R*o2)``, then a bmm over the rows with the bias
    folded in), ``first == 0`` contracts ``A`` first (a bmm, then one 2-D GEMM
    ``(M*o1, R*i2) @ (R*i2, o2)``). ``partial`` is the first product (see
    :func:`kron2_partial`), which :func:`kron2_backward` can reuse. ``dims`` is
    :func:`kron2_dims`, ``m`` the number of rows (``x`` may have any shape with
    ``m * i1 * i2`` entries); ``y`` is contiguous with ``m * o1 * o2`` entries in some
    shape (the caller views it; one view instead of two).

    Without ``keep_partial`` (and outside autograd recording, see
    :func:`kron2_block_rows`) the rows are processed in blocks whose partial product
    stays in cache, each block's result written into its slice of ``y``; ``partial`` is
    then ``None``.
    """
    r, o1, i1, o2, i2 = dims
    per_row = (i1 * o2 if first == 1 else o1 * i2) * r
    block = None if keep_partial else kron2_block_rows(per_row, m)
    if block is not None:
        return _kron2_forward_blocked(x, a, b, bias, first, dims, m, block), None
    partial = kron2_partial(x, a, b, first, dims, m)
    if first == 1:
        bias2 = None if bias is None else bias.view(o1, o2)
        return _bmm_left(_a_cat(a, r, o1, i1), partial, m, bias2), partial
    y = torch.mm(partial.view(m * o1, r * i2), _b_cat(b, r, o2, i2))
    if bias is not None:
        y = y.view(m, o1 * o2) + bias
    return y, partial


def _kron2_forward_blocked(x, a, b, bias, first, dims, m, block):
    r, o1, i1, o2, i2 = dims
    x2 = x.reshape(m, i1 * i2)
    y = x2.new_empty(m, o1, o2)
    if first == 1:
        a_cat, bias2 = _a_cat(a, r, o1, i1), None if bias is None else bias.view(1, o1, o2)
        b_st = b.reshape(r * o2, i2).t()
        for start in range(0, m, block):
            k = min(block, m - start)
            t = torch.mm(x2[start : start + k].reshape(k * i1, i2), b_st).view(k, i1 * r, o2)
            left = a_cat.expand(k, o1, i1 * r)
            if bias2 is None:
                torch.bmm(left, t, out=y[start : start + k])
            else:
                torch.baddbmm(bias2, left, t, out=y[start : start + k])
        return y
    a_stk, b_cat = _a_stack(a, r, o1, i1), _b_cat(b, r, o2, i2)
    y2 = y.view(m * o1, o2)
    for start in range(0, m, block):
        k = min(block, m - start)
        s = torch.bmm(a_stk.expand(k, o1 * r, i1), x2[start : start + k].view(k, i1, i2))
        torch.mm(s.view(k * o1, r * i2), b_cat, out=y2[start * o1 : (start + k) * o1])
    if bias is not None:
        y.view(m, o1 * o2).add_(bias)
    return y


def kron2_runner(first: int, dims: tuple, m: int, out_shape: tuple):
    """:func:`kron2_forward` for one call signature, as a function ``(x, a, b, bias) -> y``
    with ``y`` of ``out_shape``: for one row and one term, ``A @ X @ B^T + bias`` as two
    plain GEMMs with no batched or reshaping step in between (the per-call overhead case);
    otherwise :func:`kron2_forward`. Plain differentiable ops either way."""
    r, o1, i1, o2, i2 = dims
    if m == 1 and r == 1:
        if first == 1:

            def run(x, a, b, bias):
                t = torch.mm(x.reshape(i1, i2), b.reshape(o2, i2).t())
                a2 = a.reshape(o1, i1)
                y = torch.mm(a2, t) if bias is None else torch.addmm(bias.view(o1, o2), a2, t)
                return y.view(out_shape)

            return run

        def run(x, a, b, bias):
            s = torch.mm(a.reshape(o1, i1), x.reshape(i1, i2))
            bt = b.reshape(o2, i2).t()
            y = torch.mm(s, bt) if bias is None else torch.addmm(bias.view(o1, o2), s, bt)
            return y.view(out_shape)

        return run

    def run(x, a, b, bias):
        return kron2_forward(x, a, b, bias, first, dims, m, False)[0].view(out_shape)

    return run


def kron2_backward(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    first: int,
    dims: tuple,
    m,
    partial: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(x, A, B)`` of :func:`kron2_forward` for ``g`` = dL/dy (M, o1*o2); the
    input gradient comes back with ``M * i1 * i2`` entries in some shape (reshape it).

    ``needs`` says which are wanted. ``partial`` is the forward's first product, or ``None``
    to recompute it (only the gradient of the factor contracted second needs it). Every
    step is one GEMM on views, as in the forward; the gradient of the factor contracted
    second is the only one that sums over the rows with a batched product (its contraction
    runs over the row index and the last axis, which no single GEMM view can merge). Made
    of differentiable ops, so it can itself be differentiated (double backward).
    """
    need_x, need_a, need_b = needs
    r, o1, i1, o2, i2 = dims
    # A broadcast gradient (e.g. of y.sum(): stride 0 everywhere) would make every batched
    # product below copy each of its matrices (measured 4x slower for 16x16 factors).
    g = g.contiguous()
    per_row = (i1 * o2 if first == 1 else o1 * i2) * r
    block = kron2_block_rows(per_row, m)
    if block is not None:
        return _kron2_backward_blocked(x, a, b, g, first, dims, m, partial, needs, block)
    gx = ga = gb = None
    if first == 1:
        g3 = g.reshape(m, o1, o2)
        if need_x or need_b:
            # U[m] = A_cat^T @ g[m]: (M, i1*R, o2) = (M*i1, R*o2), the layout of T.
            a_cat_t = _a_cat(a, r, o1, i1).t().contiguous()  # strided left: slow bmm
            u = _bmm_left(a_cat_t, g3, m).view(m * i1, r * o2)
            if need_x:
                gx = torch.mm(u, b.reshape(r * o2, i2))
            if need_b:
                gb = torch.mm(u.t(), x.reshape(m * i1, i2)).view(r, o2, i2)
        if need_a:
            t = partial if partial is not None else kron2_partial(x, a, b, first, dims, m)
            ga_cat = _reduced_bmm(g3, t.transpose(1, 2))  # (o1, i1*R)
            ga = ga_cat.view(o1, i1, r).permute(2, 0, 1) if r > 1 else ga_cat.view(1, o1, i1)
        return gx, ga, gb
    g2 = g.reshape(m * o1, o2)
    if need_x or need_a:
        # V = g @ B_cat^T: (M*o1, R*i2) = (M, o1*R, i2), the layout of S.
        v = torch.mm(g2, _b_cat(b, r, o2, i2).t()).view(m, o1 * r, i2)
        if need_x:
            a_stk_t = _a_stack(a, r, o1, i1).t().contiguous()  # (i1, o1*R)
            gx = _bmm_left(a_stk_t, v, m)
        if need_a:
            ga_stk = _reduced_bmm(v, x.reshape(m, i1, i2).transpose(1, 2))  # (o1*R, i1)
            ga = ga_stk.view(o1, r, i1).permute(1, 0, 2) if r > 1 else ga_stk.view(1, o1, i1)
    if need_b:
        s = partial if partial is not None else kron2_partial(x, a, b, first, dims, m)
        gb_cat = torch.mm(s.view(m * o1, r * i2).t(), g2)  # (R*i2, o2)
        gb = gb_cat.view(r, i2, o2).permute(0, 2, 1) if r > 1 else gb_cat.t().unsqueeze(0)
    return gx, ga, gb


def _kron2_backward_blocked(x, a, b, g, first, dims, m, partial, needs, block):
    # kron2_backward row block by row block: the per-block products stay in cache; the
    # factor gradients accumulate in place, the input gradient is written block by block.
    need_x, need_a, need_b = needs
    r, o1, i1, o2, i2 = dims
    x2 = x.reshape(m, i1 * i2)
    g2 = g.view(m, o1 * o2)
    gx = x2.new_empty(m, i1 * i2) if need_x else None
    if first == 1:
        a_cat = _a_cat(a, r, o1, i1)
        a_cat_t = a_cat.t().contiguous()
        b_st = b.reshape(r * o2, i2)
        gb = x2.new_zeros(r * o2, i2) if need_b else None
        ga = x2.new_zeros(o1, i1 * r) if need_a else None
        for start in range(0, m, block):
            k = min(block, m - start)
            g3 = g2[start : start + k].view(k, o1, o2)
            xb = x2[start : start + k].view(k * i1, i2)
            if need_x or need_b:
                u = torch.bmm(a_cat_t.expand(k, i1 * r, o1), g3).view(k * i1, r * o2)
                if need_x:
                    torch.mm(u, b_st, out=gx[start : start + k].view(k * i1, i2))
                if need_b:
                    gb.addmm_(u.t(), xb)
            if need_a:
                if partial is not None:
                    t = partial[start : start + k]
                else:
                    t = torch.mm(xb, b_st.t()).view(k, i1 * r, o2)
                ga += _reduced_bmm(g3, t.transpose(1, 2))
        ga = None if ga is None else ga.view(o1, i1, r).permute(2, 0, 1)
        gb = None if gb is None else gb.view(r, o2, i2)
        return gx, ga, gb
    a_stk = _a_stack(a, r, o1, i1)
    a_stk_t = a_stk.t().contiguous()
    b_cat = _b_cat(b, r, o2, i2)
    ga = x2.new_zeros(o1 * r, i1) if need_a else None
    gb = x2.new_zeros(r * i2, o2) if need_b else None
    for start in range(0, m, block):
        k = min(block, m - start)
        gb2 = g2[start : start + k].view(k * o1, o2)
        x3 = x2[start : start + k].view(k, i1, i2)
        if need_x or need_a:
            v = torch.mm(gb2, b_cat.t()).view(k, o1 * r, i2)
            if need_x:
                torch.bmm(
                    a_stk_t.expand(k, i1, o1 * r), v, out=gx[start : start + k].view(k, i1, i2)
                )
            if need_a:
                ga += _reduced_bmm(v, x3.transpose(1, 2))
        if need_b:
            if partial is not None:
                sb = partial[start : start + k]
            else:
                sb = torch.bmm(a_stk.expand(k, o1 * r, i1), x3)
            gb.addmm_(sb.reshape(k * o1, r * i2).t(), gb2)
    ga = None if ga is None else ga.view(o1, r, i1).permute(1, 0, 2)
    gb = None if gb is None else gb.view(r, i2, o2).permute(0, 2, 1)
    return gx, ga, gb


def kron2_partial_numel(
    in_shape: Sequence[int], out_shape: Sequence[int], rank: int, first: int
) -> int:
    """Entries per row of :func:`kron2_partial`."""
    return (in_shape[0] * out_shape[1] if first == 1 else out_shape[0] * in_shape[1]) * rank


# -- the dense weight ---------------------------------------------------------------------


def _kron_batched(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # (R, m, n) x (R, k, l) -> (R, m*k, n*l), one broadcast product per rank term.
    r, m, n = p.shape
    _, k, l = q.shape
    return (p[:, :, None, :, None] * q[:, None, :, None, :]).reshape(r, m * k, n * l)


def kron_weight(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Dense ``W = sum_r F_1[r] ⊗ ... ⊗ F_d[r]`` (``(prod out_k, prod in_k)``), differentiable.

    Unlike a per-term product summed at the end (``rank`` dense-sized temporaries), the sum
    over the rank is one GEMM ``(o*i, R) @ (R, o'*i')`` between the largest end factor and
    the per-term product of the others, followed by one permuting copy into the row-major
    layout; a single term (R = 1) is broadcast products only. Cost about
    ``R * H_out * H_in`` multiply-adds plus one copy of ``W``.
    """
    d = len(factors)
    r = factors[0].shape[0]
    if d == 1:
        return factors[0].sum(0)
    if r == 1:
        w = factors[0]
        for f in factors[1:]:
            w = _kron_batched(w, f)
        return w[0]
    sizes = [f.shape[1] * f.shape[2] for f in factors]
    if sizes[0] >= sizes[-1]:  # W = F_1 ⊗ Q with Q the per-term product of the rest
        big, rest, big_first = factors[0], factors[1:], True
    else:  # W = P ⊗ F_d
        big, rest, big_first = factors[-1], factors[:-1], False
    q = rest[0]
    for f in rest[1:]:
        q = _kron_batched(q, f)
    _, ob, ib = big.shape
    _, oq, iq = q.shape
    if big_first:
        w4 = torch.mm(big.reshape(r, ob * ib).t(), q.reshape(r, oq * iq)).view(ob, ib, oq, iq)
        return w4.permute(0, 2, 1, 3).reshape(ob * oq, ib * iq)
    w4 = torch.mm(q.reshape(r, oq * iq).t(), big.reshape(r, ob * ib)).view(oq, iq, ob, ib)
    return w4.permute(0, 2, 1, 3).reshape(oq * ob, iq * ib)


# -- cost descriptions for the dispatcher ---------------------------------------------------


def kron_weight_ops(
    in_shape: Sequence[int], out_shape: Sequence[int], rank: int, backward: bool
) -> list[Op]:
    """The operations of :func:`kron_weight` (and, with ``backward``, of its gradient)."""
    d = len(in_shape)
    h = prod(in_shape) * prod(out_shape)
    sizes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    ops: list[Op] = []
    if d == 1:
        ops.append(Pass(rank * h))
        return ops + ([Pass(rank * h)] if backward else [])
    if rank == 1:
        partial = sizes[0]
        for s in sizes[1:]:
            partial *= s
            ops.append(Pass(partial))
        if backward:  # each broadcast product: one product and one reduction per operand
            ops += [Pass(2 * p) for p in (op.elements for op in list(ops))]
        return ops
    big = sizes[0] if sizes[0] >= sizes[-1] else sizes[-1]
    rest = h // big
    if d > 2:  # the per-term product of the other factors
        ops.append(Pass(rank * rest))
    ops += [Gemm(big, rest, rank), Pass(h)]
    if backward:
        ops += [Pass(h), Gemm(big, rank, rest), Gemm(rank, rest, big)]
        if d > 2:
            ops.append(Pass(2 * rank * rest))
    return ops


def kron_factorized_ops(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    rows: int,
    order: Sequence[int],
    save_partial: bool,
    needs: tuple[bool, ...],
    has_bias: bool,
    autograd: bool = False,
) -> list[Op]:
    """The operations of the factorized kernel on ``rows`` rows (forward, and the backward
    for ``needs = (input, bias, *factors)``; all ``False`` for inference). ``autograd``:
    the same GEMMs recorded op by op by autograd instead of one Python Function."""
    need_x, need_bias, *need_f = needs
    backward = any(needs)
    r = rank
    if not backward:
        ops: list[Op] = [Node(0)]
    elif autograd:
        ops = [Node(10 if len(in_shape) == 2 else 3 * len(in_shape))]
    else:
        ops = [PyFunction(True)]
    if len(in_shape) == 2:
        (i1, i2), (o1, o2) = in_shape, out_shape
        first = order[0]
        # The blocked kernels (see kron2_block_rows) keep the partial products in cache.
        per_row = (i1 * o2 if first == 1 else o1 * i2) * r
        partial = rows * per_row
        blocks = kron2_blocks(per_row, rows) is not None
        fwd_blk = blocks and not save_partial and not (autograd and backward)
        bwd_blk = blocks and backward and not autograd
        f_in = partial if fwd_blk else 0
        b_in = partial if bwd_blk else 0
        small_reduce = autograd or o1 * i1 * r * (o2 if first == 1 else i2) < _ADDBMM_MIN_MACS
        if first == 1:
            ops += [
                Gemm(rows * i1, r * o2, i2, out_cached=fwd_blk),
                Gemm(o1, o2, i1 * r, batch=rows, in_cached=f_in),
            ]
            if r > 1:
                ops.append(Pass(o1 * i1 * r))
            if need_x or need_f[1]:
                ops += [Pass(o1 * i1 * r), Gemm(i1 * r, o2, o1, batch=rows, out_cached=bwd_blk)]
            if need_x:
                ops.append(Gemm(rows * i1, i2, r * o2, in_cached=b_in))
            if need_f[1]:
                ops.append(Gemm(r * o2, i2, rows * i1, in_cached=b_in))
            if need_f[0]:
                if not save_partial:
                    ops.append(Gemm(rows * i1, r * o2, i2, out_cached=bwd_blk))
                ops.append(Gemm(o1, i1 * r, o2, batch=rows, in_cached=b_in))
                if small_reduce:
                    ops.append(Pass(rows * o1 * i1 * r))
        else:
            ops += [
                Gemm(o1 * r, i2, i1, batch=rows, out_cached=fwd_blk),
                Gemm(rows * o1, o2, r * i2, in_cached=f_in),
            ]
            if has_bias:
                ops.append(Pass(rows * o1 * o2))
            if need_x or need_f[0]:
                ops.append(Gemm(rows * o1, r * i2, o2, out_cached=bwd_blk))
            if need_x:
                ops += [Pass(o1 * i1 * r), Gemm(i1, i2, o1 * r, batch=rows, in_cached=b_in)]
            if need_f[0]:
                ops.append(Gemm(o1 * r, i1, i2, batch=rows, in_cached=b_in))
                if small_reduce:
                    ops.append(Pass(rows * o1 * i1 * r))
            if need_f[1]:
                if not save_partial:
                    ops.append(Gemm(o1 * r, i2, i1, batch=rows, out_cached=bwd_blk))
                ops.append(Gemm(r * i2, o2, rows * o1, in_cached=b_in))
    else:
        # Generic engine: one (batched) contraction per mode; with several rank terms each
        # einsum also permutes its operand and result.
        fwd: list[Op] = []
        total = prod(in_shape)
        for k in order:
            nxt = total // in_shape[k] * out_shape[k]
            fwd.append(Gemm(rows * r * (total // in_shape[k]), out_shape[k], in_shape[k]))
            if r > 1:
                fwd.append(Pass(rows * r * (total + nxt)))
            total = nxt
        if has_bias:
            fwd.append(Pass(rows * total))
        ops += fwd
        # grad input: the same chain transposed; each factor: about one more chain.
        ops += fwd * (int(need_x) + sum(int(n) for n in need_f))
    if need_bias:
        ops.append(Pass(rows * prod(out_shape)))
    return ops


def kron_dense_ops(
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    rank: int,
    rows: int,
    needs: tuple[bool, ...],
    weight_cached: bool = False,
) -> list[Op]:
    """The operations of the dense path (form ``W``, one GEMM; autograd for the backward).
    ``weight_cached``: ``W`` is already formed (an inference cache), only the GEMM runs."""
    need_x, need_bias, *need_f = needs
    h_in, h_out = prod(in_shape), prod(out_shape)
    any_f = any(need_f)
    ops = [] if weight_cached else kron_weight_ops(in_shape, out_shape, rank, backward=any_f)
    ops.append(Gemm(rows, h_out, h_in))
    if any(needs):
        ops.append(Node(8))
    if need_x:
        ops.append(Gemm(rows, h_in, h_out))
    if any_f:
        ops.append(Gemm(h_out, h_in, rows))
    if need_bias:
        ops.append(Pass(rows * h_out))
    return ops
