"""The cost descriptions behind CPLinear's and CPConv2d's dispatch, op by op.

The dispatchers pick the kernel a call runs; a wrong description silently makes a layer
slower (never wrong: tests/test_cp_linear.py and tests/test_conv_dispatch.py prove every
kernel exact). These tests pin the descriptions to what the kernels do.
"""

from __future__ import annotations

import math

import pytest

from kronlayers.functional import cp_conv2d_plan
from kronlayers.functional._dispatch import Gemm, Pass, cost_model
from kronlayers.functional.cp_linear import (
    _input_side,
    _kr_build,
    _launches,
    _Needs,
    _output_side,
    make_plan,
)


def test_khatri_rao_build_writes_each_growing_prefix_once():
    # (4, 5, 6) at rank 3: products of 4 x 5 then of 20 x 6 rows.
    ops = _kr_build((4, 5, 6), 3)
    assert ops == [Pass(20 * 3), Pass(120 * 3)]
    assert _kr_build((7,), 3) == []


def test_launches_count_real_ops_not_einsum_overhead():
    ops = [Pass(0), Pass(5), Gemm(2, 3, 4), Pass(1)]
    assert _launches(ops) == 3
    assert _launches([Pass(0), Pass(0)]) == 0
    assert _launches([]) == 0


@pytest.mark.parametrize(
    ("needs", "hadamard"),
    [(_Needs(True, False, False), True), (_Needs(False, True, False), True),
     (_Needs(True, True, False), True), (_Needs(False, False, True), False)],
)  # fmt: skip
def test_modewise_input_backward_runs_the_hadamard_steps_when_the_core_needs_a_gradient(
    needs, hadamard
):
    # Mode-wise input side of (4, 5, 6) for 7 rows at rank 3: the backward goes back through
    # the two Hadamard steps (3 passes each) whenever x or a factor needs a gradient.
    _, bwd = _input_side((4, 5, 6), 3, 7, False, needs)
    passes = [op for op in bwd if isinstance(op, Pass) and op.elements > 0]
    assert len(passes) == (6 if hadamard else 0)
    gemms = [op for op in bwd if isinstance(op, Gemm)]
    assert len(gemms) == int(needs.x) + int(needs.factors)


@pytest.mark.parametrize(
    ("side", "shape", "rank", "n"),
    [("in", (2, 32), 1024, 8), ("in", (8, 64), 64, 8), ("out", (4, 128), 64, 8),
     ("out", (16, 16), 256, 8)],
)  # fmt: skip
def test_route_choice_weighs_the_backward_too(side, shape, rank, n):
    # Sides where forward-only and forward+backward disagree on the cheaper route (found by
    # a scan of the model): the plan follows forward+backward (a layer is trained).
    model = cost_model("cpu")
    full = _Needs(True, True, True)
    times = {}
    for kr in (True, False):
        if side == "in":
            fwd, bwd = _input_side(shape, rank, n, kr, full)
        else:
            fwd, bwd = _output_side(shape, rank, n, kr, full, False)
        times[kr] = (model.time(fwd), model.time(fwd) + model.time(bwd))
    by_fwd = times[True][0] <= times[False][0]
    by_full = times[True][1] <= times[False][1]
    assert by_fwd != by_full
    if side == "in":
        assert make_plan(shape, (3,), rank, n).in_khatri_rao == by_full
    else:
        assert make_plan((3,), shape, rank, n).out_khatri_rao == by_full


def test_output_side_bias_gradient_is_one_pass_over_the_output():
    fwd, bwd = _output_side((4, 5), 3, 7, True, _Needs(False, False, True), True)
    assert bwd == [Pass(7 * 20)]
    assert Gemm(7, 20, 3) in fwd


def test_conv_plan_counts_both_kernel_sides():
    # A 1 x 9 and a 9 x 1 kernel with 'same' padding have the same taps and output: the
    # dense path costs the same (C_in * kh * kw taps, not kh squared or kw squared).
    a = cp_conv2d_plan(8, 8, (1, 9), 4, (2, 8, 16, 16), padding="same", factor_grad=True)
    b = cp_conv2d_plan(8, 8, (9, 1), 4, (2, 8, 16, 16), padding="same", factor_grad=True)
    assert math.isclose(a["seconds"]["dense"], b["seconds"]["dense"], rel_tol=1e-12)
    c = cp_conv2d_plan(8, 8, (3, 3), 4, (2, 8, 16, 16), padding="same", factor_grad=True)
    assert math.isclose(c["seconds"]["dense"], a["seconds"]["dense"], rel_tol=1e-12)
    # Transposed inputs have as many pixels: every path costs the same.
    d = cp_conv2d_plan(8, 8, 3, 4, (2, 8, 16, 24), padding="same", input_grad=True)
    e = cp_conv2d_plan(8, 8, 3, 4, (2, 8, 24, 16), padding="same", input_grad=True)
    for path in ("factorized", "dense"):
        assert math.isclose(d["seconds"][path], e["seconds"][path], rel_tol=1e-12)
    with pytest.raises(ValueError, match="stride"):
        cp_conv2d_plan(8, 8, 3, 4, (2, 8, 16, 16), stride=0)
