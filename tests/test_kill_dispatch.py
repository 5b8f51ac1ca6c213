"""The cost model of the dispatcher (kronlayers.functional._dispatch) against its documented
closed forms: each op's seconds, the tie-break of ``choose``, the fallbacks of
``cost_model``, ``static_rows`` / ``check_path`` / ``force_path``, and what ``calibrate``
derives from its timings (the timer replaced by fixed figures)."""

from __future__ import annotations

import types

import pytest
import torch

from kronlayers.functional import _dispatch
from kronlayers.functional._dispatch import (
    DEFAULT_MODELS,
    PATHS,
    SYMBOLIC_ROWS,
    CostModel,
    Gemm,
    Node,
    Pass,
    PyFunction,
    calibrate,
    check_path,
    choose,
    cost_model,
    estimate,
    force_path,
    forced_path,
    plan_generation,
    static_rows,
)

# Distinct constants, so that every term of the formula shows in the result.
MODEL = CostModel(
    gemm_flops=1e9,
    bytes_per_s=1e8,
    cache_bytes_per_s=4e8,
    cache_bytes=4096,
    alloc_bytes_per_s=5e7,
    alloc_bytes=1 << 16,
    op_s=3e-6,
    batch_item_s=7e-7,
    node_s=11e-6,
    function_s=13e-6,
)


def _traffic(model: CostModel, nbytes: float) -> float:
    rate = model.cache_bytes_per_s if nbytes <= model.cache_bytes else model.bytes_per_s
    return nbytes / rate


def _alloc(model: CostModel, nbytes: float) -> float:
    if model.alloc_bytes_per_s <= 0 or nbytes <= model.alloc_bytes:
        return 0.0
    return nbytes / model.alloc_bytes_per_s


def _gemm_seconds(model: CostModel, g: Gemm, itemsize: int) -> float:
    """The documented GEMM cost: launch + per-matrix + max(compute, traffic) + allocation."""
    flops = model.gemm_flops / 2 if itemsize == 8 else model.gemm_flops
    tile = min(g.m, g.n, g.k)
    eff = getattr(g, "efficiency", 1.0) * (1.0 if tile >= 64 else (max(tile, 1) ** 0.5) / 8)
    compute = 2 * g.m * g.n * g.k * g.batch / (flops * eff)
    out = itemsize * g.batch * g.m * g.n
    ins = itemsize * g.batch * (g.m * g.k + g.k * g.n)
    cached = itemsize * g.in_cached + (out if g.out_cached else 0)
    traffic = _traffic(model, ins + out - cached) + cached / model.cache_bytes_per_s
    alloc = 0.0 if g.out_cached else _alloc(model, out)
    return model.op_s + g.batch * model.batch_item_s + max(compute, traffic) + alloc


GEMMS = [
    Gemm(128, 96, 80),  # large tiles, compute-bound
    Gemm(128, 96, 80, batch=3),  # a bmm
    Gemm(8, 200, 300),  # small result tile: reduced rate
    Gemm(100, 0, 70),  # empty: the rate's tile is clamped to 1
    Gemm(64, 64, 64),  # exactly the full-rate tile
    Gemm(63, 200, 200),  # just under it
    Gemm(4000, 1, 2),  # traffic-bound (tiny contraction, big operands)
    Gemm(4000, 3, 2, batch=5, in_cached=4000),  # part of the inputs in cache
    Gemm(300, 300, 16, out_cached=True),  # result consumed from cache: no allocation
    Gemm(8, 8, 8),  # everything fits in cache
    Gemm(200, 200, 200, batch=2, in_cached=100, out_cached=True),
]
if "efficiency" in Gemm.__dataclass_fields__:  # a measured fraction of the modelled rate
    GEMMS += [Gemm(128, 96, 80, efficiency=0.5), Gemm(8, 200, 300, batch=2, efficiency=0.25)]


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_gemm_seconds_follow_the_documented_formula(itemsize):
    for g in GEMMS:
        want = _gemm_seconds(MODEL, g, itemsize)
        assert MODEL.time([g], itemsize) == pytest.approx(want, rel=1e-12), g
    # the sum of the ops
    total = sum(_gemm_seconds(MODEL, g, itemsize) for g in GEMMS)
    assert MODEL.time(GEMMS, itemsize) == pytest.approx(total, rel=1e-12)


def test_ops_and_models_are_immutable_hashable_values():
    import dataclasses

    for value in (Gemm(1, 2, 3), Pass(4), Node(2), PyFunction(True), MODEL):
        assert hash(value) == hash(dataclasses.replace(value))
        field = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field, 0)
    assert len({Gemm(1, 2, 3), Gemm(1, 2, 3), Gemm(1, 2, 3, batch=2)}) == 2


def test_gemm_defaults_are_one_uncached_matrix():
    g = Gemm(5, 6, 7)
    assert (g.batch, g.in_cached, g.out_cached) == (1, 0, False)
    assert getattr(g, "efficiency", 1.0) == 1.0
    assert MODEL.time([g]) == pytest.approx(_gemm_seconds(MODEL, Gemm(5, 6, 7, 1, 0, False), 4))
    assert MODEL.time([g]) == MODEL.time([g], 4)  # float32 is the default item size


def test_gemm_terms_one_by_one():
    # compute-bound, float32: 2 m n k / rate, full rate for tiles >= 64
    m = CostModel(1e9, 1e20, 1e20, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    assert m.time([Gemm(64, 64, 64)]) == pytest.approx(2 * 64**3 / 1e9, rel=1e-12)
    assert m.time([Gemm(64, 64, 64)], 8) == pytest.approx(2 * 2 * 64**3 / 1e9, rel=1e-12)
    # a 16-wide tile runs at sqrt(16 / 64) = 1/2 the rate
    assert m.time([Gemm(16, 128, 128)]) == pytest.approx(2 * 2 * 16 * 128 * 128 / 1e9)
    # traffic-bound: bytes moved at the streaming rate (no cache)
    t = CostModel(1e20, 1e6, 1e9, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    moved = 4 * (10 * 20 + 20 * 30 + 10 * 30)
    assert t.time([Gemm(10, 30, 20)]) == pytest.approx(moved / 1e6, rel=1e-12)
    # cached inputs and a cached result move at the cache rate
    cached = 4 * 100 + 4 * 10 * 30
    want = (moved - cached) / 1e6 + cached / 1e9
    assert t.time([Gemm(10, 30, 20, in_cached=100, out_cached=True)]) == pytest.approx(want)
    # fixed costs: launch and per matrix
    f = CostModel(1e20, 1e20, 1e20, 0, 0.0, 0, 2.0, 3.0, 0.0, 0.0)
    assert f.time([Gemm(1, 1, 1, batch=5)]) == pytest.approx(2.0 + 5 * 3.0)


def test_pass_node_and_function_seconds():
    for elements in (0, 10, 512, 513, 100_000, (1 << 16) // 4, (1 << 16) // 4 + 1):
        for itemsize in (2, 4, 8):
            nbytes = itemsize * elements
            want = MODEL.op_s + _traffic(MODEL, 2 * nbytes) + _alloc(MODEL, nbytes)
            assert MODEL.time([Pass(elements)], itemsize) == pytest.approx(want, rel=1e-12)
    # the cache boundary is inclusive: 2 * 4 * 512 bytes = cache_bytes
    assert MODEL.time([Pass(512)]) == pytest.approx(MODEL.op_s + 4096 / 4e8)
    assert MODEL.time([Pass(513)]) == pytest.approx(MODEL.op_s + 4104 / 1e8)
    # so is the allocation threshold: 4 * 16384 bytes = alloc_bytes
    assert MODEL.time([Pass(16384)]) == pytest.approx(MODEL.op_s + 2 * 65536 / 1e8)
    assert MODEL.time([Pass(16385)]) == pytest.approx(MODEL.op_s + 2 * 65540 / 1e8 + 65540 / 5e7)
    assert MODEL.time([Node()]) == pytest.approx(MODEL.node_s)
    assert MODEL.time([Node(4)]) == pytest.approx(4 * MODEL.node_s)
    assert MODEL.time([Node(0)]) == 0.0
    assert MODEL.time([PyFunction()]) == pytest.approx(MODEL.function_s)
    assert MODEL.time([PyFunction(True)]) == pytest.approx(2 * MODEL.function_s)
    assert MODEL.time([]) == 0.0
    ops = [Node(2), PyFunction(True), Pass(7), Gemm(3, 4, 5)]
    want = (
        2 * MODEL.node_s
        + 2 * MODEL.function_s
        + MODEL.op_s
        + _traffic(MODEL, 56)
        + _gemm_seconds(MODEL, Gemm(3, 4, 5), 4)
    )
    assert MODEL.time(ops) == pytest.approx(want, rel=1e-12)


def test_no_allocation_cost_without_a_rate():
    free = CostModel(1e9, 1e8, 1e8, 0, 0.0, 0, 0.0, 0.0, 0.0, 0.0)
    assert free.time([Pass(1 << 20)]) == pytest.approx(8 * (1 << 20) / 1e8)
    # a zero threshold with a rate: every byte pays
    paid = CostModel(1e9, 1e8, 1e8, 0, 1e8, 0, 0.0, 0.0, 0.0, 0.0)
    assert paid.time([Pass(10)]) == pytest.approx(80 / 1e8 + 40 / 1e8)


def test_default_cpu_model_thresholds():
    cpu = DEFAULT_MODELS["cpu"]
    # "~40 GB/s within 1 MiB", "results over 32 MiB ... page faults"
    assert cpu.cache_bytes == 1 << 20
    assert cpu.alloc_bytes == 32 << 20
    assert cpu.time([Pass((1 << 20) // 8)]) == pytest.approx(cpu.op_s + (1 << 20) / 40e9)
    assert cpu.time([Pass(8 << 20)]) == pytest.approx(cpu.op_s + (64 << 20) / 10e9)
    assert cpu.time([Pass((8 << 20) + 1)]) > cpu.op_s + (64 << 20) / 10e9 + (32 << 20) / 4e9
    cuda = DEFAULT_MODELS["cuda"]
    assert cuda.time([Pass(1 << 30)]) == pytest.approx(cuda.op_s + (8 << 30) / 1e12)


def test_cost_model_for_each_device_type():
    assert cost_model("cpu") is _dispatch._MODELS["cpu"]
    assert cost_model("cuda") is _dispatch._MODELS["cuda"]
    assert cost_model("meta") is _dispatch._MODELS["cpu"]  # host types: the CPU's
    assert cost_model("xpu") is _dispatch._MODELS["cuda"]  # other accelerators: CUDA's
    assert cost_model("mps") is _dispatch._MODELS["cuda"]


def test_choose_takes_the_cheapest_and_the_first_on_ties():
    cheap, dear = [Pass(10)], [Pass(10), Pass(10)]
    assert choose({"a": cheap, "b": dear}, 4, "cpu") == "a"
    assert choose({"a": dear, "b": cheap}, 4, "cpu") == "b"
    assert choose({"a": dear, "b": dear, "c": cheap, "d": cheap}, 4, "cpu") == "c"
    assert choose({"a": cheap, "b": list(cheap)}, 4, "cpu") == "a"  # tie: the first
    assert choose({"only": dear}, 4, "cpu") == "only"
    assert choose({}, 4, "cpu") == ""
    # a candidate with no ops costs 0 s and wins
    assert choose({"a": cheap, "b": []}, 4, "cpu") == "b"
    # itemsize and device type reach the model: float64 halves the GEMM rate
    big = [Gemm(1024, 1024, 1024)]
    passes = [Pass(3 << 20)] * 40
    t_gemm = cost_model("cpu").time(big, 8)
    assert t_gemm == pytest.approx(2 * cost_model("cpu").time(big, 4), rel=0.05)
    assert choose({"gemm": big, "passes": passes}, 4, "cpu") == (
        "gemm" if cost_model("cpu").time(big, 4) < cost_model("cpu").time(passes, 4) else "passes"
    )
    est = estimate({"gemm": big, "passes": passes}, 8, "cuda")
    assert est == {
        "gemm": cost_model("cuda").time(big, 8),
        "passes": cost_model("cuda").time(passes, 8),
    }


def test_static_rows():
    assert static_rows((24,)) == 1
    assert static_rows((3, 24)) == 3
    assert static_rows((3, 4, 24)) == 12
    assert static_rows((2, 0, 5)) == 0
    assert static_rows((None, 24)) is None
    assert static_rows((3, None, 24)) is None
    assert static_rows((24, None)) == 24  # only the leading sizes count
    assert SYMBOLIC_ROWS == 1024


def test_check_path_and_force_path():
    assert check_path(None) is None
    for p in PATHS:
        assert check_path(p) == p
    with pytest.raises(TypeError, match="path must be a str or None"):
        check_path(0)
    with pytest.raises(ValueError, match="path must be one of"):
        check_path("sparse")
    assert forced_path() is None
    with force_path("dense"):
        assert forced_path() == "dense"
        with force_path(None):
            assert forced_path() is None
        assert forced_path() == "dense"
    with pytest.raises(RuntimeError), force_path("factorized"):
        assert forced_path() == "factorized"
        raise RuntimeError("restored on error")
    assert forced_path() is None
    with pytest.raises(ValueError, match="path must be one of"), force_path("fast"):
        pass
    assert forced_path() is None


def test_force_kernel():
    if not hasattr(_dispatch, "force_kernel"):
        pytest.skip("no force_kernel in this version")
    force_kernel, forced_kernel = _dispatch.force_kernel, _dispatch.forced_kernel
    assert forced_kernel() is None
    for kernel in _dispatch.KERNELS:
        with force_kernel(kernel):
            assert forced_kernel() == kernel
            with force_kernel(None):
                assert forced_kernel() is None
            assert forced_kernel() == kernel
        assert forced_kernel() is None
    with pytest.raises(RuntimeError), force_kernel("ops"):
        raise RuntimeError("restored on error")
    assert forced_kernel() is None
    with pytest.raises(ValueError, match="kernel must be one of"), force_kernel("sparse"):
        pass
    assert forced_kernel() is None and forced_path() is None


def test_best_time_is_the_fastest_mean_of_the_repetitions(monkeypatch):
    clock = {"now": 0.0, "calls": 0}
    costs = [5.0, 1.0, 1.0, 3.0, 3.0, 2.0, 2.0]  # per call, after the warm-up call

    def fn():
        clock["now"] += costs[clock["calls"] % len(costs)]
        clock["calls"] += 1

    monkeypatch.setattr(_dispatch, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    # repeat=3, number=2: warm-up 5.0, then means of (1, 1), (3, 3), (2, 2)
    assert _dispatch._best_time(fn, repeat=3, number=2) == pytest.approx(1.0)
    assert clock["calls"] == 1 + 3 * 2
    clock.update(now=0.0, calls=0)
    # repeat=2, number=3: means of (1, 1, 3) and (3, 2, 2)
    assert _dispatch._best_time(fn, repeat=2, number=3) == pytest.approx(5 / 3)
    assert clock["calls"] == 1 + 2 * 3


def _fake_timer(values, calls):
    def fake(fn, repeat=9, number=5):
        fn()  # run it once, as the real timer does
        calls.append(fn)
        return values[len(calls) - 1]

    return fake


def test_calibrate_derives_the_constants_from_its_timings(monkeypatch):
    # mm, copy, tiny mm, bmm, backward of x.sum(), of x.mul(2).sum(), through a Function
    t_mm, t_copy, t_op, t_bmm = 0.02, 0.004, 3e-6, 3e-6 + 4096 * 2e-7
    t_base, t_node, t_fn = 50e-6, 4e-6, 30e-6
    values = [t_mm, t_copy, t_op, t_bmm, t_base, t_base + t_op + t_node, t_base + t_op + 2 * t_fn]
    calls: list = []
    monkeypatch.setattr(_dispatch, "_best_time", _fake_timer(values, calls))
    monkeypatch.setattr(_dispatch, "_MODELS", dict(DEFAULT_MODELS))
    monkeypatch.setattr(_dispatch._STATE, "generation", 7)
    model = calibrate("cpu", install=False)
    assert len(calls) == 7
    assert model.gemm_flops == pytest.approx(2 * 1024**3 / t_mm)
    assert model.bytes_per_s == pytest.approx(2 * 4 * (1 << 22) / t_copy)
    assert model.op_s == pytest.approx(t_op)
    assert model.batch_item_s == pytest.approx(2e-7)
    assert model.node_s == pytest.approx(t_node)
    assert model.function_s == pytest.approx(t_fn)
    cpu = DEFAULT_MODELS["cpu"]
    assert (model.cache_bytes_per_s, model.cache_bytes) == (cpu.cache_bytes_per_s, 1 << 20)
    assert (model.alloc_bytes_per_s, model.alloc_bytes) == (cpu.alloc_bytes_per_s, 32 << 20)
    assert cost_model("cpu") is DEFAULT_MODELS["cpu"] and plan_generation() == 7
    # installing it: the model in use, and a new plan generation
    calls.clear()
    installed = calibrate(torch.device("cpu"))
    assert installed == model and cost_model("cpu") is installed
    assert cost_model("meta") is installed
    assert cost_model("cuda") is DEFAULT_MODELS["cuda"]
    assert plan_generation() == 8
    calls.clear()
    calibrate("cpu")
    assert plan_generation() == 9


def test_calibrate_clamps_negative_overheads(monkeypatch):
    # a noisy machine: the bmm and the backward passes faster than their baselines
    values = [0.02, 0.004, 5e-6, 1e-6, 60e-6, 40e-6, 30e-6]
    calls: list = []
    monkeypatch.setattr(_dispatch, "_best_time", _fake_timer(values, calls))
    model = calibrate("cpu", install=False)
    assert model.batch_item_s == 0.0 and model.node_s == 0.0 and model.function_s == 0.0
    # just above the baselines
    values[3:] = [5e-6 + 4096e-9, 60e-6, 60e-6 + 5e-6 + 1e-6, 60e-6 + 5e-6 + 4e-6]
    calls.clear()
    model = calibrate("cpu", install=False)
    assert model.batch_item_s == pytest.approx(1e-9)
    assert model.node_s == pytest.approx(1e-6)
    assert model.function_s == pytest.approx(2e-6)
