"""The two-factor Kronecker kernels and their cost descriptions (kronlayers.functional.
_kron_engine): the row-blocked forward and backward against dense float64 references, the
block-size rule, the GEMM FLOPs each op list declares against FlopCounterMode on the
kernel it describes, the dense weight, and the contraction order against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kronlayers import kron_dense
from kronlayers.functional import _kron_engine as eng
from kronlayers.functional._dispatch import Gemm
from kronlayers.functional.kronecker_linear import (
    KroneckerLinearConfig,
    KroneckerLinearFunction,
    _factorized,
    kronecker_linear,
    kronecker_linear_flops,
    kronecker_linear_plan,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _gemm_flops(ops) -> int:
    return sum(2 * o.m * o.n * o.k * o.batch for o in ops if isinstance(o, Gemm))


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _factors(rank, out_shape, in_shape, needs=None):
    needs = needs or (False,) * len(in_shape)
    return [
        torch.randn(rank, o, i, dtype=F64).requires_grad_(n)
        for o, i, n in zip(out_shape, in_shape, needs, strict=True)
    ]


# --------------------------------------------------------------------------- blocking


def test_block_size_rule():
    unblocked, block = eng.UNBLOCKED_ENTRIES, eng.BLOCK_ENTRIES
    assert (unblocked, block) == (1 << 20, 1 << 19)
    assert eng.kron2_blocks(1024, 1024) is None  # exactly 2^20 entries: unblocked
    assert eng.kron2_blocks(1024, 1025) == 512
    assert eng.kron2_blocks(1000, 1049) == 524
    assert eng.kron2_blocks(4096, 300) == 128
    assert eng.kron2_blocks(1 << 20, 2) == 1  # at least one row per block
    assert eng.kron2_blocks(1 << 21, 1) is None  # one block would hold every row
    assert eng.kron2_blocks(1 << 19, 3) == 1
    assert eng.kron2_blocks(1 << 18, 5) == 2
    assert eng.kron2_blocks((1 << 19) // 3, 7) == 3
    assert eng.kron2_blocks((1 << 19) // 3 + 1, 7) == 2
    assert eng.kron2_blocks(300, 4000) == 1747
    assert eng.kron2_blocks(300, 3496) == 1747


def test_block_rows_only_outside_autograd_recording():
    with torch.no_grad():
        assert eng.kron2_block_rows(1024, 1025) == 512
        assert eng.kron2_block_rows(1024, 1024) is None
        assert eng.kron2_block_rows(1024, None) is None  # symbolic size
    with torch.enable_grad():
        assert eng.kron2_block_rows(1024, 1025) is None


def test_partial_numel():
    assert eng.kron2_partial_numel((3, 4), (5, 6), 2, 1) == 3 * 6 * 2
    assert eng.kron2_partial_numel((3, 4), (5, 6), 2, 0) == 5 * 4 * 2


# (o1, i1, o2, i2): unequal sizes, so that any transposed or swapped operand shows.
DIMS = (12, 16, 20, 10)
# For the blocked kernels: a large partial per row (i1 * o2 when B goes first, o1 * i2
# when A does), so that a few hundred rows exceed UNBLOCKED_ENTRIES.
BLOCKED_DIMS = {1: (6, 96, 80, 5), 0: (96, 6, 5, 80)}


def _blocked_case(first, rank):
    o1, i1, o2, i2 = BLOCKED_DIMS[first]
    per_row = (i1 * o2 if first == 1 else o1 * i2) * rank
    m = eng.UNBLOCKED_ENTRIES // per_row + 7  # a few blocks, the last one partial
    block = eng.kron2_blocks(per_row, m)
    assert block is not None and m % block != 0 and m // block >= 2
    a = torch.randn(rank, o1, i1, dtype=F64)
    b = torch.randn(rank, o2, i2, dtype=F64)
    x = torch.randn(m, i1 * i2, dtype=F64)
    return a, b, x, m, (rank, o1, i1, o2, i2)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("first", [1, 0])
def test_blocked_forward_matches_dense(first, rank):
    a, b, x, m, dims = _blocked_case(first, rank)
    w = kron_dense([a, b])
    bias = torch.randn(w.shape[0], dtype=F64)
    with torch.no_grad():
        for bb in (None, bias):
            y, partial = eng.kron2_forward(x, a, b, bb, first, dims, m, keep_partial=False)
            assert partial is None
            torch.testing.assert_close(y.reshape(m, -1), F.linear(x, w, bb), **TOL)
            # the unblocked kernel, with its partial
            y2, partial = eng.kron2_forward(x, a, b, bb, first, dims, m, keep_partial=True)
            torch.testing.assert_close(y2.reshape(m, -1), F.linear(x, w, bb), **TOL)
            torch.testing.assert_close(partial, eng.kron2_partial(x, a, b, first, dims, m))
            run = eng.kron2_runner(first, dims, m, (m, w.shape[0]))
            torch.testing.assert_close(run(x, a, b, bb), F.linear(x, w, bb), **TOL)


def _dense_grads(x, a, b, g):
    xs, as_, bs = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    y = F.linear(xs, kron_dense([as_, bs]))
    return torch.autograd.grad(y, (xs, as_, bs), g)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("first", [1, 0])
def test_blocked_backward_matches_dense(first, rank):
    a, b, x, m, dims = _blocked_case(first, rank)
    g = torch.randn(m, dims[1] * dims[3], dtype=F64)
    want = _dense_grads(x, a, b, g)
    partial = eng.kron2_partial(x, a, b, first, dims, m)
    for needs in itertools.product([False, True], repeat=3):
        for p in (None, partial):
            with torch.no_grad():
                got = eng.kron2_backward(x, a, b, g, first, dims, m, p, needs)
            for need, gt, wt in zip(needs, got, want, strict=True):
                if not need:
                    assert gt is None
                    continue
                torch.testing.assert_close(gt.reshape(wt.shape), wt, **TOL)
    # recorded by autograd (grad mode on): the unblocked kernel, same values
    got = eng.kron2_backward(x, a, b, g, first, dims, m, None, (True, True, True))
    for gt, wt in zip(got, want, strict=True):
        torch.testing.assert_close(gt.reshape(wt.shape), wt, **TOL)


@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_function_on_a_blocked_batch_matches_dense(order, save):
    rank = 2
    a, b, x, _, dims = _blocked_case(order[0], rank)
    a.requires_grad_(True)
    b.requires_grad_(True)
    x.requires_grad_(True)
    _, o1, i1, o2, i2 = dims
    bias = torch.randn(o1 * o2, dtype=F64, requires_grad=True)
    config = KroneckerLinearConfig((i1, i2), (o1, o2), rank, order, save)
    out = KroneckerLinearFunction.apply(x, bias, config, a, b)
    y = out[0] if save else out
    ref = F.linear(x, kron_dense([a, b]), bias)
    torch.testing.assert_close(y, ref, **TOL)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bias, a, b), g)
    want = torch.autograd.grad(ref, (x, bias, a, b), g)
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("sizes", [(5, 3, 4, 6), (4, 40, 32, 30)])
def test_reduced_bmm(sizes):
    m, a, k, b = sizes
    assert (a * k * b >= eng._ADDBMM_MIN_MACS) == (sizes[1] == 40)
    p = torch.randn(m, a, k, dtype=F64)
    q = torch.randn(m, k, b, dtype=F64)
    torch.testing.assert_close(eng._reduced_bmm(p, q), torch.einsum("mak,mkb->ab", p, q), **TOL)
    torch.testing.assert_close(eng._reduced_bmm(p[:1], q[:1]), p[0] @ q[0], **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("first", [1, 0])
def test_single_row_runner(first, bias):
    o1, i1, o2, i2 = DIMS
    bb = torch.randn(o1 * o2, dtype=F64) if bias else None
    # one row and one term: two plain GEMMs; otherwise the general kernel
    for rows, rank in ((1, 1), (2, 1), (1, 2), (3, 2)):
        a, b = torch.randn(rank, o1, i1, dtype=F64), torch.randn(rank, o2, i2, dtype=F64)
        x = torch.randn(rows, i1 * i2, dtype=F64)
        run = eng.kron2_runner(first, (rank, o1, i1, o2, i2), rows, (rows, o1 * o2))
        want = F.linear(x, kron_dense([a, b]), bb)
        torch.testing.assert_close(run(x, a, b, bb), want, **TOL)


# --------------------------------------------------------------------------- dense weight


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize(
    "shapes",
    [
        [(3, 4)],
        [(2, 3), (4, 5)],  # first factor smaller than the last
        [(4, 5), (2, 3)],  # first factor larger
        [(3, 3), (3, 3)],  # equal: the first is the big one
        [(2, 3), (3, 2), (2, 4)],
        [(3, 4), (2, 2), (1, 3)],
        [(1, 2), (2, 2), (2, 3), (3, 1)],
    ],
)
def test_kron_weight_is_the_sum_of_kronecker_products(shapes, rank):
    fs = [torch.randn(rank, o, i, dtype=F64, requires_grad=True) for o, i in shapes]
    want = sum(_kron_all(fs, r) for r in range(rank))
    w = eng.kron_weight(fs)
    torch.testing.assert_close(w, want, **TOL)
    g = torch.randn_like(w)
    got = torch.autograd.grad(w, fs, g)
    ref = torch.autograd.grad(want, fs, g)
    for p, q in zip(got, ref, strict=True):
        torch.testing.assert_close(p, q, **TOL)


def _kron_all(fs, r):
    out = fs[0][r]
    for f in fs[1:]:
        out = torch.kron(out, f[r])
    return out


# --------------------------------------------------------------------------- FLOPs


def _needs_list(d):
    return list(itertools.product([False, True], repeat=d + 2))


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_factorized_ops_declare_the_kernels_flops(order, rank):
    in_shape, out_shape = (6, 4), (3, 5)
    rows = 7
    user = 2 + (0 if order[0] == 1 else 1)  # the factor whose gradient uses the partial
    for needs in _needs_list(2):
        for save, autograd in ((False, False), (True, False), (True, True)):
            if save and not autograd and not needs[user]:
                continue
            x = torch.randn(rows, 24, dtype=F64, requires_grad=needs[0])
            bias = torch.randn(15, dtype=F64, requires_grad=needs[1])
            fs = _factors(rank, out_shape, in_shape, needs[2:])
            config = KroneckerLinearConfig(in_shape, out_shape, rank, order, save and not autograd)

            def run(x=x, bias=bias, fs=fs, config=config, autograd=autograd):
                if autograd:  # the "ops" kernel, recorded by autograd
                    y = _factorized(x, bias, config, tuple(fs))
                else:
                    y = KroneckerLinearFunction.apply(x, bias, config, *fs)
                    y = y[0] if config.save_partial else y
                if y.requires_grad:
                    y.backward(torch.ones_like(y))

            ops = eng.kron_factorized_ops(
                in_shape, out_shape, rank, rows, order, save, needs, True, autograd=autograd
            )
            assert _counted(run) == _gemm_flops(ops), (needs, save, autograd)


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_factorized_ops_flops_on_a_blocked_batch(order):
    # (FlopCounterMode counts neither addbmm nor the in-place addmm_ that accumulate the
    # factor gradients block by block: the input gradient and the forward only)
    rank = 2
    a, b, x, m, dims = _blocked_case(order[0], rank)
    _, o1, i1, o2, i2 = dims
    in_shape, out_shape = (i1, i2), (o1, o2)
    config = KroneckerLinearConfig(in_shape, out_shape, rank, order, False)
    x.requires_grad_(True)

    def run():
        y = KroneckerLinearFunction.apply(x, None, config, a, b)
        y.backward(torch.ones_like(y))

    needs = (True, False, False, False)
    ops = eng.kron_factorized_ops(in_shape, out_shape, rank, m, order, False, needs, False)
    assert _counted(run) == _gemm_flops(ops)
    with torch.no_grad():
        ops = eng.kron_factorized_ops(
            in_shape, out_shape, rank, m, order, False, (False,) * 4, True
        )
        bias = torch.randn(o1 * o2, dtype=F64)
        assert _counted(lambda: _factorized(x, bias, config, (a, b))) == _gemm_flops(ops)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("shapes", [((2, 3, 4), (3, 2, 5)), ((2, 3, 2, 2), (3, 2, 2, 2))])
def test_factorized_ops_forward_flops_beyond_two_factors(shapes, rank):
    in_shape, out_shape = shapes
    rows = 5
    order = tuple(eng.contraction_order(in_shape, out_shape))
    fs = _factors(rank, out_shape, in_shape)
    x = torch.randn(rows, math.prod(in_shape), dtype=F64)
    needs = (False,) * (2 + len(in_shape))
    for has_bias in (False, True):
        ops = eng.kron_factorized_ops(
            in_shape, out_shape, rank, rows, order, False, needs, has_bias
        )
        bias = torch.randn(math.prod(out_shape), dtype=F64) if has_bias else None
        got = _counted(lambda bias=bias: kronecker_linear(x, fs, bias, path="factorized"))
        assert got == _gemm_flops(ops) == kronecker_linear_flops(in_shape, out_shape, rank, rows)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("shapes", [((6, 4), (3, 5)), ((4, 6), (5, 3)), ((2, 3, 4), (3, 2, 5))])
def test_dense_ops_declare_the_dense_paths_flops(shapes, rank):
    in_shape, out_shape = shapes
    d = len(in_shape)
    rows = 7
    for need_x, need_bias, need_f in itertools.product([False, True], repeat=3):
        needs = (need_x, need_bias, *(need_f,) * d)
        x = torch.randn(rows, math.prod(in_shape), dtype=F64, requires_grad=need_x)
        bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=need_bias)
        fs = _factors(rank, out_shape, in_shape, (need_f,) * d)

        def run(x=x, bias=bias, fs=fs):
            y = F.linear(x, eng.kron_weight(fs), bias)
            if y.requires_grad:
                y.backward(torch.ones_like(y))

        ops = eng.kron_dense_ops(in_shape, out_shape, rank, rows, needs)
        assert _counted(run) == _gemm_flops(ops), needs
        # with the weight cached only the GEMM (and its backward) remains
        cached = eng.kron_dense_ops(in_shape, out_shape, rank, rows, needs, weight_cached=True)
        w = eng.kron_weight(fs).detach()
        assert _counted(lambda x=x, w=w, b=bias: F.linear(x, w, b)) == _gemm_flops(cached[:1])
    # the weight's own ops
    for backward in (False, True):
        fs = _factors(rank, out_shape, in_shape, (backward,) * d)

        def form(fs=fs, backward=backward):
            w = eng.kron_weight(fs)
            if backward:
                w.backward(torch.ones_like(w))

        assert _counted(form) == _gemm_flops(
            eng.kron_weight_ops(in_shape, out_shape, rank, backward)
        )


# --------------------------------------------------------------------------- orders


@pytest.mark.parametrize("seed", range(6))
def test_contraction_order_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    d = 2 + seed % 3
    sizes_in = torch.randint(1, 9, (d,), generator=g).tolist()
    sizes_out = torch.randint(1, 9, (d,), generator=g).tolist()
    chosen = eng.order_cost(sizes_in, sizes_out, eng.contraction_order(sizes_in, sizes_out))
    best = min(eng.order_cost(sizes_in, sizes_out, p) for p in itertools.permutations(range(d)))
    assert chosen == best


def test_order_cost_closed_form():
    # (2, 3, 4) -> (5, 1, 6) in order (1, 0, 2): 24*1, then 8*5, then 20*6
    assert eng.order_cost((2, 3, 4), (5, 1, 6), (1, 0, 2)) == 24 * 1 + 8 * 5 + 20 * 6
    assert eng.contraction_order((2, 3, 4), (5, 1, 6))[0] == 1  # the shrinking axis first
    assert eng.contraction_order((4, 4), (2, 8)) == [0, 1]
    assert eng.contraction_order((2, 8), (4, 4)) == [1, 0]


@pytest.mark.parametrize("rank", [1, 2])
def test_more_factors_forward_and_backward_match_dense(rank):
    in_shape, out_shape = (2, 3, 4), (3, 2, 5)
    for needs in [(True, True, True, True, True), (False, False, False, True, False)]:
        fs = _factors(rank, out_shape, in_shape, needs[2:])
        x = torch.randn(4, 24, dtype=F64, requires_grad=needs[0])
        bias = torch.randn(30, dtype=F64, requires_grad=needs[1])
        for order in itertools.permutations(range(3)):
            config = KroneckerLinearConfig(in_shape, out_shape, rank, order, False)
            y = KroneckerLinearFunction.apply(x, bias, config, *fs)
            ref = F.linear(x, kron_dense(fs), bias)
            torch.testing.assert_close(y, ref, **TOL)
            g = torch.randn_like(y)
            leaves = [t for t in (x, bias, *fs) if t.requires_grad]
            got = torch.autograd.grad(y, leaves, g)
            want = torch.autograd.grad(ref, leaves, g)
            for p, q in zip(got, want, strict=True):
                torch.testing.assert_close(p, q, **TOL)


def test_plan_offers_saving_the_partial_only_when_it_is_small():
    # 64x64 (x) 64x64, rank 1: the partial (64 * 64 per row) fits in in + out (8192)
    plan = kronecker_linear_plan((64, 64), (64, 64), 1, (256, 4096), input_grad=True)
    assert plan["path"] == "factorized" and plan["order"] in ((1, 0), (0, 1))
    # rank 8: 8 * 64 * 64 per row does not fit: never saved
    plan = kronecker_linear_plan((64, 64), (64, 64), 8, (256, 4096), input_grad=True)
    assert plan["save_partial"] is False
    assert plan["kernel"] == "function"  # autograd would keep the large partial
    # no gradient: no Function, no saved partial
    plan = kronecker_linear_plan((64, 64), (64, 64), 8, (256, 4096), factor_grad=False)
    assert plan["kernel"] == "ops" and plan["save_partial"] is False


# --------------------------------------------------------------------------- kronecker_linear

SAVING = [((3, 16), (256, 16), 4, 64, (1, 0)), ((64, 2), (256, 64), 2, 8, (0, 1))]


@pytest.mark.parametrize("case", SAVING)
def test_saved_partial_kernel_matches_dense(case):
    in_shape, out_shape, rank, rows, order = case
    h_in = math.prod(in_shape)
    plan = kronecker_linear_plan(
        in_shape, out_shape, rank, (rows, h_in), input_grad=True, dtype=F64
    )
    assert (plan["kernel"], plan["order"], plan["save_partial"]) == ("function", order, True)
    fs = _factors(rank, out_shape, in_shape, (True, True))
    x = torch.randn(rows, h_in, dtype=F64, requires_grad=True)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    y = kronecker_linear(x, fs, bias)
    ref = F.linear(x, kron_dense(fs), bias)
    torch.testing.assert_close(y, ref, **TOL)
    g = torch.randn_like(y)
    for p, q in zip(
        torch.autograd.grad(y, (x, bias, *fs), g),
        torch.autograd.grad(ref, (x, bias, *fs), g),
        strict=True,
    ):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("case", SAVING)
def test_saved_partial_kernel_under_autocast(case):
    in_shape, out_shape, rank, rows, _ = case
    h_in = math.prod(in_shape)
    plan = kronecker_linear_plan(in_shape, out_shape, rank, (rows, h_in), input_grad=True)
    assert plan["kernel"] == "function" and plan["save_partial"]
    fs = [f.float() for f in _factors(rank, out_shape, in_shape, (True, True))]
    x = torch.randn(rows, h_in, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kronecker_linear(x, fs)
    ref = F.linear(x.double(), kron_dense([f.double() for f in fs]))
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    err = float((y.detach().double() - ref.detach()).norm() / ref.detach().norm())
    assert err < 3e-2


def test_saving_needs_the_gradient_of_the_factor_contracted_second():
    in_shape, out_shape, rank, rows, _ = SAVING[0]
    shape = (rows, math.prod(in_shape))
    # only the input gradient: nothing to reuse the partial for
    plan = kronecker_linear_plan(
        in_shape, out_shape, rank, shape, input_grad=True, factor_grad=False
    )
    assert plan["save_partial"] is False
    plan = kronecker_linear_plan(in_shape, out_shape, rank, shape, factor_grad=False)
    assert plan["save_partial"] is False and plan["kernel"] == "ops"


def test_plan_defaults():
    for shape in ((64, 48), (None, 48), (5, 3, 48)):
        dflt = kronecker_linear_plan((6, 8), (4, 12), 3, shape)
        expl = kronecker_linear_plan(
            (6, 8), (4, 12), 3, shape, dtype=torch.float32, device_type="cpu", input_grad=False,
            factor_grad=True, bias=True, path=None, weight_cached=False,
        )  # fmt: skip
        assert dflt == expl
    # the gradient flags count: a factor gradient costs more than none
    a = kronecker_linear_plan((6, 8), (4, 12), 3, (64, 48))
    b = kronecker_linear_plan((6, 8), (4, 12), 3, (64, 48), factor_grad=False)
    assert a["seconds"]["factorized"] > b["seconds"]["factorized"]
    assert a["seconds"]["dense"] > b["seconds"]["dense"]
    c = kronecker_linear_plan((6, 8), (4, 12), 3, (64, 48), bias=False)
    assert c["seconds"]["factorized"] < a["seconds"]["factorized"]
    # a forced path, and the dense path's reported kernel
    d = kronecker_linear_plan((6, 8), (4, 12), 3, (64, 48), path="dense")
    assert (d["path"], d["kernel"]) == ("dense", "dense")
    f = kronecker_linear_plan((6, 8), (4, 12), 3, (64, 48), path="factorized")
    assert f["path"] == "factorized" and f["kernel"] in ("function", "ops")
    assert f["order"] in ((1, 0), (0, 1)) and f["seconds"] == a["seconds"]


def test_most_modes_without_gradients():
    from kronlayers._shapes import MAX_MODES

    fs = [torch.randn(1, 1 + k % 2, 2 - k % 2, dtype=F64) for k in range(MAX_MODES)]
    x = torch.randn(2, math.prod(f.shape[2] for f in fs), dtype=F64)
    with torch.no_grad():
        y = kronecker_linear(x, fs)
    torch.testing.assert_close(y, F.linear(x, kron_dense(fs)), **TOL)


def test_several_terms_with_a_unit_first_mode():
    # rank 2 with out_1 == 1 (the rank axis must stay), and rank 1 with out_1 == 2
    for rank, out_shape in ((2, (1, 3, 2)), (1, (2, 3, 1))):
        fs = _factors(rank, out_shape, (2, 3, 2), (True,) * 3)
        x = torch.randn(3, 12, dtype=F64, requires_grad=True)
        for path in ("factorized", None):
            y = kronecker_linear(x, fs, path=path)
            ref = F.linear(x, kron_dense(fs))
            torch.testing.assert_close(y, ref, **TOL)
            g = torch.randn_like(y)
            for p, q in zip(
                torch.autograd.grad(y, (x, *fs), g),
                torch.autograd.grad(ref, (x, *fs), g),
                strict=True,
            ):
                torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("shapes", [((4, 6), (3, 5)), ((4, 256), (2, 256))])
def test_single_row_inference_runner(shapes):
    from kronlayers import KroneckerLinear

    in_shape, out_shape = shapes
    h_in, h_out = math.prod(in_shape), math.prod(out_shape)
    order = kronecker_linear_plan(in_shape, out_shape, 1, (1, h_in), factor_grad=False)["order"]
    assert order == ((1, 0) if in_shape[1] == 6 else (0, 1))
    m = KroneckerLinear(h_in, h_out, in_shape=in_shape, out_shape=out_shape, dtype=F64)
    x = torch.randn(1, h_in, dtype=F64)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias), **TOL)
            torch.testing.assert_close(m(x[0]), F.linear(x[0], m.weight, m.bias), **TOL)
        m.bias = None
        for _ in range(2):
            torch.testing.assert_close(m(x), F.linear(x, m.weight), **TOL)


def test_no_partial_is_saved_for_a_frozen_second_factor():
    # (64, 2) -> (256, 64), rank 2, 8 rows, A and the input trainable: the Function kernel
    # contracting A first; the partial would only serve B's gradient, so it is not kept
    in_shape, out_shape, rank, rows = (64, 2), (256, 64), 2, 8
    a = torch.randn(rank, 256, 64, dtype=F64, requires_grad=True)
    b = torch.randn(rank, 64, 2, dtype=F64)
    x = torch.randn(rows, 128, dtype=F64, requires_grad=True)
    partial = rows * out_shape[0] * rank * in_shape[1]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kronecker_linear(x, [a, b])
    assert partial not in saved and saved
    ref = F.linear(x, kron_dense([a, b]))
    torch.testing.assert_close(y, ref, **TOL)
    got, want = torch.autograd.grad(y.sum(), (x, a)), torch.autograd.grad(ref.sum(), (x, a))
    for p, q in zip(got, want, strict=True):
        torch.testing.assert_close(p, q, **TOL)


def test_factors_of_rank_zero_are_an_error():
    fs = [torch.zeros(0, 2, 3), torch.zeros(0, 3, 2)]
    with pytest.raises(ValueError, match="rank >= 1"):
        kronecker_linear(torch.randn(4, 6), fs)


def test_kron2_dims():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 5, 6)
    assert eng.kron2_dims(a, b) == (2, 3, 4, 5, 6)


@pytest.mark.parametrize("order", [(1, 0), (0, 1)])
def test_declared_cache_use_matches_the_blocked_kernels(order, monkeypatch):
    # The op list marks a partial product as staying in cache exactly when the kernel
    # it describes runs row-blocked (forward and backward separately).
    ran = {"fwd": 0, "bwd": 0}
    fwd, bwd = eng._kron2_forward_blocked, eng._kron2_backward_blocked

    def fwd_spy(*args):
        ran["fwd"] += 1
        return fwd(*args)

    def bwd_spy(*args):
        ran["bwd"] += 1
        return bwd(*args)

    monkeypatch.setattr(eng, "_kron2_forward_blocked", fwd_spy)
    monkeypatch.setattr(eng, "_kron2_backward_blocked", bwd_spy)
    rank = 2
    a, b, x, m, dims = _blocked_case(order[0], rank)
    _, o1, i1, o2, i2 = dims
    in_shape, out_shape = (i1, i2), (o1, o2)
    cases = [  # (needs, save, autograd kernel)
        ((False,) * 4, False, False),
        ((True, False, True, True), False, False),
        ((True, False, True, True), True, False),
        ((True, False, True, True), True, True),
        ((True, False, False, False), False, False),
    ]
    for needs, save, autograd in cases:
        ran.update(fwd=0, bwd=0)
        xs = x.detach().requires_grad_(needs[0])
        fs = [a.detach().requires_grad_(needs[2]), b.detach().requires_grad_(needs[3])]
        config = KroneckerLinearConfig(in_shape, out_shape, rank, order, save and not autograd)
        with torch.set_grad_enabled(any(needs)):
            if autograd or not any(needs):
                y = _factorized(xs, None, config, tuple(fs))
            else:
                y = KroneckerLinearFunction.apply(xs, None, config, *fs)
                y = y[0] if config.save_partial else y
            if any(needs):
                y.backward(torch.ones_like(y))
        ops = eng.kron_factorized_ops(
            in_shape, out_shape, rank, m, order, save, needs, False, autograd=autograd
        )
        gemms = [o for o in ops if isinstance(o, Gemm)]
        declared_fwd = gemms[0].out_cached and gemms[1].in_cached > 0
        declared_bwd = any(g.out_cached or g.in_cached for g in gemms[2:])
        assert (declared_fwd, declared_bwd) == (ran["fwd"] > 0, ran["bwd"] > 0), (needs, save)


def test_autograd_kernel_only_where_the_partial_is_small():
    # The "ops" kernel (autograd keeps the partial) is a candidate only when the partial is
    # at most the input and output together: (2, 64) -> (2, 16) with B first keeps
    # i1 * o2 * R = 32 R entries per row, against 128 + 32.
    shape = (4, 128)
    for rank, kernel in ((2, "ops"), (4, "ops"), (8, "function")):
        assert eng.kron2_partial_numel((2, 64), (2, 16), rank, 1) == 32 * rank
        plan = kronecker_linear_plan(
            (2, 64), (2, 16), rank, shape, input_grad=True, path="factorized"
        )
        assert plan["kernel"] == kernel, rank
        if kernel == "ops":
            assert plan["order"] == (1, 0)


def test_inference_plan_has_no_autograd_cost():
    # without gradients the factorized kernel is plain ops: no Python autograd.Function
    from kronlayers.functional._dispatch import cost_model

    plan = kronecker_linear_plan((4, 6), (3, 5), 1, (1, 24), factor_grad=False)
    assert plan["kernel"] == "ops"
    assert plan["seconds"]["factorized"] < cost_model("cpu").function_s
    plan = kronecker_linear_plan((2, 3, 4), (3, 2, 5), 2, (1, 24), factor_grad=False)
    assert plan["seconds"]["factorized"] < cost_model("cpu").function_s
    assert kronecker_linear_flops((4, 6), (3, 5)) == kronecker_linear_flops((4, 6), (3, 5), 1, 1)


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("shapes", [((2, 3, 4), (3, 2, 5)), ((2, 3, 2, 2), (3, 2, 2, 2))])
def test_declared_backward_flops_beyond_two_factors_are_close(shapes, rank):
    # the generic engine's backward is described as about one chain per gradient: within
    # 15% of what the kernel runs
    in_shape, out_shape = shapes
    d, rows = len(in_shape), 5
    order = tuple(eng.contraction_order(in_shape, out_shape))
    for needs in itertools.product([False, True], repeat=d + 2):
        if not any(needs):
            continue
        x = torch.randn(rows, math.prod(in_shape), dtype=F64, requires_grad=needs[0])
        bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=needs[1])
        fs = _factors(rank, out_shape, in_shape, needs[2:])
        config = KroneckerLinearConfig(in_shape, out_shape, rank, order, False)

        def run(x=x, bias=bias, fs=fs, config=config):
            KroneckerLinearFunction.apply(x, bias, config, *fs).sum().backward()

        ops = eng.kron_factorized_ops(in_shape, out_shape, rank, rows, order, False, needs, True)
        got, want = _counted(run), _gemm_flops(ops)
        assert abs(want - got) <= 0.15 * got, (needs, got, want)


def test_rank_one_dense_weight_passes_are_its_products():
    # W = F_1 (x) ... (x) F_d for one term: broadcast products, each declared as a pass
    # over its result
    from torch.utils._python_dispatch import TorchDispatchMode

    from kronlayers.functional._dispatch import Pass

    class Writes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mul.Tensor:
                self.sizes.append(out.numel())
            return out

    for in_shape, out_shape in (((4, 6), (3, 5)), ((2, 3, 4), (3, 2, 5))):
        fs = _factors(1, out_shape, in_shape)
        with Writes() as rec:
            eng.kron_weight(fs)
        declared = [o.elements for o in eng.kron_weight_ops(in_shape, out_shape, 1, False)]
        assert all(isinstance(o, Pass) for o in eng.kron_weight_ops(in_shape, out_shape, 1, False))
        assert declared == rec.sizes


def test_single_row_module_call_under_autocast():
    from kronlayers import KroneckerLinear

    m = KroneckerLinear(24, 15, in_shape=(4, 6), out_shape=(3, 5))
    x = torch.randn(1, 24)
    with torch.no_grad():
        m(x)  # the float32 single-row runner is in place
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, m.weight, m.bias), rtol=3e-2, atol=3e-2)


def test_factor_gradient_takes_the_cheaper_route():
    # Beyond two factors a factor's gradient either pushes x through the other factors and
    # meets g, or pulls g back and meets x, "whichever costs fewer FLOPs": the measured
    # FLOPs of the kernel are the cheaper route's, measured by running both.
    in_shape, out_shape, k, rows = (6, 6, 6), (2, 2, 6), 2, 3
    fs = _factors(1, out_shape, in_shape, (False, False, True))
    sq = [f[0].detach() for f in fs]
    x = torch.randn(rows, *in_shape, dtype=F64)
    g = torch.randn(rows, *out_shape, dtype=F64)
    others = [j for j in range(3) if j != k]

    def route(t, other_t, src, dst, transpose):
        order = eng.contraction_order([src[j] for j in others], [dst[j] for j in others])
        modes = [others[j] for j in order]
        p = eng.contract_modes(t, sq, modes, has_rank=False, transpose=transpose, reduce_rank=False)
        rest = [0] + [1 + j for j in others]
        torch.tensordot(p, other_t, dims=(rest, rest))

    push = _counted(lambda: route(x, g, in_shape, out_shape, False))
    pull = _counted(lambda: route(g, x, out_shape, in_shape, True))
    assert push < pull
    config = KroneckerLinearConfig(in_shape, out_shape, 1, None, False)

    def grad_only():
        xs = x.reshape(rows, -1)
        y = KroneckerLinearFunction.apply(xs, None, config, *fs)
        (gk,) = torch.autograd.grad(y, fs[k], g.reshape(rows, -1))
        return gk

    forward = _counted(
        lambda: KroneckerLinearFunction.apply(x.reshape(rows, -1), None, config, *fs).detach()
    )
    assert _counted(grad_only) - forward == min(push, pull)
    want = torch.autograd.grad(F.linear(x.reshape(rows, -1), kron_dense(fs)), fs[k],
                               g.reshape(rows, -1))[0]  # fmt: skip
    torch.testing.assert_close(grad_only(), want, **TOL)


def test_factors_with_an_empty_side_are_an_error():
    x = torch.randn(4, 6)
    for fs in (
        [torch.zeros(1, 0, 3), torch.zeros(1, 3, 2)],
        [torch.zeros(1, 2, 3), torch.zeros(1, 3, 0)],
    ):
        with pytest.raises(ValueError, match="non-zero sizes"):
            kronecker_linear(x, fs)


@pytest.mark.parametrize("first", [1, 0])
def test_runner_on_an_empty_batch(first):
    o1, i1, o2, i2 = DIMS
    a, b = torch.randn(1, o1, i1, dtype=F64), torch.randn(1, o2, i2, dtype=F64)
    run = eng.kron2_runner(first, (1, o1, i1, o2, i2), 0, (0, o1 * o2))
    y = run(torch.zeros(0, i1 * i2, dtype=F64), a, b, None)
    assert y.shape == (0, o1 * o2)
