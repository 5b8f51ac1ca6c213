"""Error paths for bad arguments (issue 14): every layer raises the same class for the same
mistake, the message names the argument, and valid values of other numeric types (NumPy
scalars) still work and give the same result.

The discipline (``kronlayers/_validation.py``): a wrong Python type is a ``TypeError``, a
wrong value a ``ValueError``. ``scripts/fuzz_inputs.py`` throws thousands of such inputs at
the public API; these tests pin the paths it found broken.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from layer_specs import SPECS
from torch import nn

import kronlayers
from kronlayers._validation import check_real
from kronlayers.budget import check_budget
from kronlayers.decomposition.cp import cp_als, cp_decompose
from kronlayers.decomposition.tucker import tucker2_decompose
from kronlayers.decomposition.whitening import whitened_cp, whitened_nearest_kronecker
from kronlayers.registry import registered_layers

F64 = torch.float64
LAYERS = registered_layers()
CONV_LAYERS = [c for c in LAYERS if c.dense_type is nn.Conv2d]
SHAPED_LAYERS = [c for c in LAYERS if "in_shape" in inspect.signature(c.__init__).parameters]


def _spec(cls):
    return next(s for s in SPECS if s.cls is cls)


def _from_dense_args(cls):
    """A dense module and the ``from_dense`` options that rebuild a spec layer exactly."""
    layer = _spec(cls).make(dtype=F64)
    return layer.to_dense(), dict(_spec(cls).convert(layer))


def _options(cls) -> set[str]:
    method = cls.from_linear if cls.dense_type is nn.Linear else cls.from_conv
    return set(inspect.signature(method).parameters)


def _layers_with(option):
    return [c for c in LAYERS if option in _options(c)]


# --- numeric options of the conversions ---------------------------------------------------

BAD_REALS = [
    (-1.0, ValueError),
    (math.nan, ValueError),
    (math.inf, ValueError),
    (-1e-12, ValueError),
    ("x", TypeError),
    (None, TypeError),
    (True, TypeError),
    ([], TypeError),
    (torch.tensor(0.1), TypeError),
]
BAD_COUNTS = [
    (-1, ValueError),
    (2.5, TypeError),
    (3.0, TypeError),
    ("4", TypeError),
    (None, TypeError),
    (True, TypeError),
    (math.nan, TypeError),
]


def _check_raises(fn, exc, name):
    with pytest.raises(exc) as info:
        fn()
    assert type(info.value) is exc  # not a subclass standing in for the other class
    assert name in str(info.value)


@pytest.mark.parametrize("cls", _layers_with("tol"), ids=lambda c: c.__name__)
@pytest.mark.parametrize(("value", "exc"), BAD_REALS, ids=lambda v: repr(v))
def test_from_dense_checks_tol_up_front(cls, value, exc):
    dense, options = _from_dense_args(cls)
    _check_raises(lambda: cls.from_dense(dense, **options, tol=value), exc, "tol")


@pytest.mark.parametrize("cls", _layers_with("damping"), ids=lambda c: c.__name__)
@pytest.mark.parametrize(("value", "exc"), BAD_REALS, ids=lambda v: repr(v))
def test_from_dense_checks_damping_up_front(cls, value, exc):
    dense, options = _from_dense_args(cls)
    _check_raises(lambda: cls.from_dense(dense, **options, damping=value), exc, "damping")


COUNT_CASES = [
    pytest.param(cls, option, id=f"{cls.__name__}-{option}")
    for option in ("n_iter_max", "refine_iter")
    for cls in _layers_with(option)
]


def test_count_cases_are_not_vacuous():
    assert {option for _, option in (p.values for p in COUNT_CASES)} == {
        "n_iter_max",
        "refine_iter",
    }


@pytest.mark.parametrize(("cls", "option"), COUNT_CASES)
@pytest.mark.parametrize(("value", "exc"), BAD_COUNTS, ids=lambda v: repr(v))
def test_from_dense_checks_iteration_counts(cls, option, value, exc):
    dense, options = _from_dense_args(cls)
    _check_raises(lambda: cls.from_dense(dense, **options, **{option: value}), exc, option)


@pytest.mark.parametrize("cls", _layers_with("tol"), ids=lambda c: c.__name__)
def test_numpy_and_int_options_give_the_same_layer(cls):
    # Any real tolerance / integral count is accepted and means the same as the float / int.
    dense, options = _from_dense_args(cls)
    ref = cls.from_dense(dense, **options, tol=1e-5, n_iter_max=5)
    alt = cls.from_dense(dense, **options, tol=np.float64(1e-5), n_iter_max=np.int64(5))
    for p, q in zip(ref.factor_parameters(), alt.factor_parameters(), strict=True):
        assert torch.equal(p, q)
    cls.from_dense(dense, **options, tol=np.float32(1e-5), n_iter_max=np.int32(5))
    # tol=0 (run every sweep) is valid: more sweeps, no worse a fit, and the layer computes
    # its own dense weight's map.
    more = cls.from_dense(dense, **options, tol=0, n_iter_max=30)
    assert more.reconstruction_error <= ref.reconstruction_error + 1e-12
    x = torch.randn(_spec(cls).input_shape, dtype=F64)
    torch.testing.assert_close(more(x), more.to_dense()(x), rtol=1e-10, atol=1e-12)


def test_decompositions_check_tol():
    t = torch.randn(3, 4, 5, dtype=F64)
    kernel = torch.randn(4, 3, 3, 3, dtype=F64)
    for fn in (
        lambda tol: cp_als(t, 2, tol=tol),
        lambda tol: cp_decompose(t, 2, tol=tol),
        lambda tol: tucker2_decompose(kernel, (2, 2), tol=tol),
    ):
        for value, exc in BAD_REALS:
            _check_raises(lambda fn=fn, value=value: fn(value), exc, "tol")


def test_cp_decompose_accepts_numpy_rank():
    t = torch.randn(3, 4, 5, dtype=F64)
    f_ref, e_ref = cp_decompose(t, 2, n_iter_max=5)
    f_np, e_np = cp_decompose(t, np.int64(2), n_iter_max=np.int32(5))
    assert e_np == e_ref and all(torch.equal(a, b) for a, b in zip(f_ref, f_np, strict=True))
    _check_raises(lambda: cp_decompose(t, 2.0), TypeError, "rank")
    _check_raises(lambda: cp_decompose(t, 0), ValueError, "rank")


@pytest.mark.parametrize("option", ["n_iter_max", "whiten_iter", "refine_iter", "pcg_iter"])
def test_whitened_cp_checks_counts(option):
    w, g = torch.randn(6, 4, dtype=F64), torch.eye(4, dtype=F64)
    _check_raises(lambda: whitened_cp(w, g, (2, 3), (4,), 2, **{option: -1}), ValueError, option)
    _check_raises(lambda: whitened_cp(w, g, (2, 3), (4,), 2, **{option: 1.5}), TypeError, option)
    _check_raises(lambda: whitened_cp(w, g, (2, 3), (4,), 2, tol=math.nan), ValueError, "tol")


def test_whitened_nearest_kronecker_checks_options():
    w, g = torch.randn(6, 4, dtype=F64), torch.eye(4, dtype=F64)
    args = (w, g, (2, 3), (2, 2))
    _check_raises(lambda: whitened_nearest_kronecker(*args, n_iter_max=-2), ValueError, "n_iter")
    _check_raises(lambda: whitened_nearest_kronecker(*args, tol=-1.0), ValueError, "tol")
    _check_raises(lambda: whitened_nearest_kronecker(*args, tol="x"), TypeError, "tol")


def test_check_real():
    assert check_real("tol", np.float32(0.5)) == 0.5
    assert check_real("tol", np.int64(3)) == 3.0 and check_real("tol", 0, minimum=0.0) == 0.0
    for value, exc in BAD_REALS:
        _check_raises(lambda value=value: check_real("tol", value, minimum=0.0), exc, "tol")


# --- shapes ---------------------------------------------------------------------------------

BAD_SHAPES = [
    (7, TypeError),
    ("ab", TypeError),
    ([2.5], TypeError),
    ([[24]], TypeError),
    ([True], TypeError),
    ([], ValueError),
    ([0, 24], ValueError),
    ([-24], ValueError),
]


@pytest.mark.parametrize("cls", [c for c in SHAPED_LAYERS if c.dense_type is nn.Linear])
@pytest.mark.parametrize("name", ["in_shape", "out_shape"])
@pytest.mark.parametrize(("value", "exc"), BAD_SHAPES, ids=lambda v: repr(v))
def test_linear_shape_arguments(cls, name, value, exc):
    _check_raises(lambda: cls(24, 24, rank=1, **{name: value}), exc, name)
    if name in _options(cls):
        dense = nn.Linear(24, 24)
        _check_raises(lambda: cls.from_dense(dense, rank=1, **{name: value}), exc, name)


def test_lowrank_shape_must_be_single_mode():
    _check_raises(lambda: kronlayers.LowRankLinear(24, 15, rank=2, in_shape=(4, 6)), ValueError,
                  "in_shape")  # fmt: skip
    # The one valid form (or None) is accepted, NumPy ints included.
    layer = kronlayers.LowRankLinear(24, 15, rank=2, in_shape=(np.int64(24),), out_shape=[15])
    assert layer.in_shape == (24,) and layer.out_shape == (15,)


# --- other constructor arguments ------------------------------------------------------------


@pytest.mark.parametrize("cls", CONV_LAYERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("value", "exc"),
    [(3, TypeError), (None, TypeError), (b"zeros", TypeError), ("bogus", ValueError),
     ("Zeros", ValueError)],
    ids=repr,
)  # fmt: skip
def test_padding_mode(cls, value, exc):
    kwargs = dict(_spec(cls).kwargs, padding_mode=value)
    _check_raises(lambda: cls(**kwargs), exc, "padding_mode")


@pytest.mark.parametrize("value", ["yes", 2, None, 1])
def test_shared_factors_must_be_a_bool(value):
    _check_raises(
        lambda: kronlayers.KroneckerLinear(16, 16, in_shape=(4, 4), out_shape=(4, 4),
                                           shared_factors=value),
        TypeError,
        "shared_factors",
    )  # fmt: skip


def test_shared_factors_bool_still_works():
    layer = kronlayers.KroneckerLinear(16, 9, in_shape=(4, 4), out_shape=(3, 3),
                                       shared_factors=True, dtype=F64)  # fmt: skip
    x = torch.randn(5, 16, dtype=F64)
    f = layer.factors[0]
    w = sum(torch.kron(f[r], f[r]) for r in range(layer.rank))
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, rtol=1e-12, atol=1e-12)


# --- compress, budget, summary ----------------------------------------------------------------


def _model():
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"method": 3}, TypeError, "method"),
        ({"method": None}, TypeError, "method"),
        ({"method": ["cp"]}, TypeError, "method"),
        ({"method": "svd"}, ValueError, "method"),
        ({"budget": "x"}, TypeError, "budget"),
        ({"budget": []}, TypeError, "budget"),
        ({"budget": True}, TypeError, "budget"),
        ({"method": "auto", "budget": "x"}, TypeError, "budget"),
        ({"budget": 0.5}, ValueError, "budget"),  # a budget without method="auto"
        ({"method": "auto", "budget": -1}, ValueError, "budget"),
        ({"method": "auto", "budget": math.nan}, ValueError, "budget"),
        ({"method": "auto", "budget": 1.5}, ValueError, "budget"),
        ({"method": "tucker", "rank": []}, ValueError, "rank"),  # a tuple rank of length 0
        ({"rank": "2"}, TypeError, "rank"),
    ],
)
def test_compress_argument_errors(kwargs, exc, name):
    model = _model()
    before = [p.clone() for p in model.parameters()]
    _check_raises(lambda: kronlayers.compress(model, **kwargs), exc, name)
    # Rejected before anything was converted: the model is untouched.
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_check_budget_accepts_numpy_numbers():
    assert check_budget(np.int64(100), "auto") == 100
    assert check_budget(np.float32(0.25), "auto") == 0.25
    assert check_budget(None, "kronecker") is None


@pytest.mark.parametrize(
    ("input_size", "exc"),
    [
        ([], ValueError),
        ((), ValueError),
        ([(2, 24), ()], ValueError),
        ([()], ValueError),
        (None, TypeError),  # neither input_size nor input_data: a missing argument
        ("abc", TypeError),
        ({}, TypeError),
        (24, TypeError),
        ([(2, 24), "x"], TypeError),
        ((2.5, 24), TypeError),
        ((2, -24), ValueError),
    ],
    ids=repr,
)
def test_summary_input_size(input_size, exc):
    with pytest.raises(exc) as info:
        kronlayers.summary(_model(), input_size=input_size)
    assert type(info.value) is exc
    assert "input_size" in str(info.value) or "input_data" in str(info.value)


def test_summary_valid_input_size_forms_agree():
    # A shape, a one-shape list and NumPy ints: the same summary.
    totals = {
        kronlayers.summary(_model(), input_size=size).total_flops
        for size in [(2, 24), [(2, 24)], (np.int64(2), np.int64(24))]
    }
    assert totals == {2 * 2 * (24 * 16 + 16 * 8)}


# --- forward under autocast -----------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_forward_under_autocast_validates_the_input(spec):
    # Autocast calls take other paths than the cached ones; the same errors must come out.
    layer = spec.make()
    shape = list(spec.input_shape)
    wrong = list(shape)
    wrong[-1 if layer.dense_type is nn.Linear else -3] += 1
    x = torch.randn(shape)
    for _ in range(2):  # the second call after a valid one (runners cached)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
            _check_raises(lambda: layer(torch.randn(wrong)), ValueError, "input")
            _check_raises(lambda: layer(x.long()), TypeError, "input")
            # float64 is left alone by autocast: next to float32 factors, a dtype mismatch.
            _check_raises(lambda: layer(x.double()), TypeError, "dtype")
