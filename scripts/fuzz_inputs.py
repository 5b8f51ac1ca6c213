"""Throw bad inputs at every public entry point of kronlayers and classify the reactions.

Entry points: the constructor, ``forward`` and ``from_dense`` of every registered layer
(:func:`kronlayers.registry.registered_layers`, small valid instances from
``tests/layer_specs.py``), the functional forms (``kronecker_linear``, ``cp_linear``,
``cp_conv2d``, ``tucker_conv2d``), ``compress``, ``summary``, ``nearest_kronecker`` and
``kron``. For each one a valid baseline call is built (and checked to work); then one
argument at a time is replaced by a value that is invalid for it: first a fixed catalogue
per kind of argument (wrong Python type, wrong value, wrong shape / dtype / device, ...), then
seeded random invalid values of the same kinds, until every entry point got ``--per-entry``
(default 200) distinct bad inputs.

Each reaction is classified:

* GOOD: ``ValueError`` / ``TypeError`` whose message names the argument (or, for a mismatch
  between two arguments, one of them). Whether the class follows the package's discipline
  (wrong type -> ``TypeError``, wrong value -> ``ValueError``) is reported separately;
* BAD: another exception, or a message that does not name the argument;
* WORST: the call returned silently;
* SAME: the bad input is treated exactly as PyTorch treats it in the dense module (e.g.
  ``nn.Linear(bias="yes")`` is accepted as truthy, a ``device`` string PyTorch does not know
  raises PyTorch's ``RuntimeError``, NaN inputs propagate): listed, not counted as failures.

Writes ``scripts/results/fuzz.md``. Run (a few seconds on one core)::

    python scripts/fuzz_inputs.py [--per-entry 200] [--seed 0] [--out scripts/results/fuzz.md]
"""

from __future__ import annotations

import argparse
import inspect
import random
import sys
import time
import types
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import kronlayers  # noqa: E402
from kronlayers import functional as KF  # noqa: E402
from kronlayers.registry import registered_layers  # noqa: E402

warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------------
# Cases and outcomes
# ----------------------------------------------------------------------------------------------


@dataclass
class Bad:
    """One bad value for one argument."""

    what: str  # short description of the value
    value: Any  # the value, or a callable(baseline value) -> value
    expect: type  # the class the discipline asks for (TypeError / ValueError)
    names: tuple[str, ...] = ()  # extra acceptable names in the message
    same: str | None = None  # PyTorch treats it the same way: the reference behaviour


@dataclass
class Entry:
    """A public entry point: ``call(**args)`` with a valid baseline ``args``."""

    name: str
    call: Callable[..., Any]
    args: dict[str, Any]
    kinds: dict[str, str]  # argument -> kind (selects the catalogue of bad values)
    cross: dict[str, tuple[str, ...]] = field(default_factory=dict)  # mismatch partners


@dataclass
class Result:
    entry: str
    arg: str
    what: str
    expect: str
    verdict: str  # GOOD / BAD / WORST / SAME
    detail: str
    discipline_ok: bool = True


def classify(entry: Entry, arg: str, bad: Bad) -> Result:
    args = dict(entry.args)
    base = args.get(arg)
    try:
        # A plain function is a transform of the baseline value (modules, classes are values).
        value = bad.value(base) if isinstance(bad.value, types.FunctionType) else bad.value
    except Exception as e:  # the catalogue cannot build this value for this baseline
        return Result(entry.name, arg, bad.what, "-", "SKIP", f"{type(e).__name__}: {e}")
    args[arg] = value
    names = (arg.split("[")[0], *bad.names, *entry.cross.get(arg, ()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry.call(**args)
    except (TypeError, ValueError) as e:
        msg = str(e)
        named = any(n in msg for n in names)
        verdict = "GOOD" if named else ("SAME" if bad.same else "BAD")
        detail = f"{type(e).__name__}: {msg}"
        return Result(
            entry.name, arg, bad.what, bad.expect.__name__, verdict, detail,
            isinstance(e, bad.expect),
        )  # fmt: skip
    except Exception as e:
        verdict = "SAME" if bad.same else "BAD"
        return Result(entry.name, arg, bad.what, bad.expect.__name__, verdict,
                      f"{type(e).__name__}: {str(e)[:300]}")  # fmt: skip
    verdict = "SAME" if bad.same else "WORST"
    return Result(entry.name, arg, bad.what, bad.expect.__name__, verdict,
                  "returned" + (f" ({bad.same})" if bad.same else ""))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Catalogues of bad values, per kind of argument
# ----------------------------------------------------------------------------------------------

T, V = TypeError, ValueError
NAN, INF = float("nan"), float("inf")


def _catalogue(kind: str) -> list[Bad]:
    c = {
        "size": [
            Bad("0", 0, V),
            Bad("-1", -1, V),
            Bad("-7", -7, V),
            Bad("2.5", 2.5, T),
            Bad("'4'", "4", T),
            Bad("None", None, T),
            Bad("True", True, T),
            Bad("[3]", [3], T),
            Bad("nan", NAN, T),
            Bad("4.0", 4.0, T),
            Bad("tensor(4)", torch.tensor(4), T),
            Bad("complex", 3 + 0j, T),
        ],
        "count": [  # an int >= 0 (n_iter_max: 0 sweeps is valid, the initialisation)
            Bad("-1", -1, V),
            Bad("-7", -7, V),
            Bad("2.5", 2.5, T),
            Bad("'4'", "4", T),
            Bad("None", None, T),
            Bad("True", True, T),
            Bad("[3]", [3], T),
            Bad("nan", NAN, T),
        ],
        "pair_size": [
            Bad("0", 0, V),
            Bad("-3", -3, V),
            Bad("(3,)", (3,), V),
            Bad("(3,3,3)", (3, 3, 3), V),
            Bad("(0,3)", (0, 3), V),
            Bad("'3'", "3", T),
            Bad("2.5", 2.5, T),
            Bad("None", None, T),
            Bad("(2.5,3)", (2.5, 3), T),
            Bad("True", True, T),
            Bad("{}", {}, T),
        ],
        "pair": [
            Bad("0", 0, V),
            Bad("-1", -1, V),
            Bad("(1,)", (1,), V),
            Bad("(1,1,1)", (1, 1, 1), V),
            Bad("(0,1)", (0, 1), V),
            Bad("'1'", "1", T),
            Bad("1.5", 1.5, T),
            Bad("None", None, T),
            Bad("(1,'a')", (1, "a"), T),
            Bad("True", True, T),
        ],
        "padding": [
            Bad("-1", -1, V),
            Bad("(1,-1)", (1, -1), V),
            Bad("'bogus'", "bogus", V),
            Bad("'SAME'", "SAME", V),
            Bad("1.5", 1.5, T),
            Bad("None", None, T),
            Bad("(1,2,3)", (1, 2, 3), V),
            Bad("(1.0,1)", (1.0, 1), T),
            Bad("[]", [], V),
        ],
        "padding_mode": [
            Bad("'bogus'", "bogus", V),
            Bad("3", 3, T),
            Bad("None", None, T),
            Bad("'Zeros'", "Zeros", V),
        ],
        "groups": [
            Bad("2", 2, V),
            Bad("0", 0, V),
            Bad("-1", -1, V),
            Bad("1.5", 1.5, T),
            Bad("'1'", "1", T),
        ],
        "bool": [
            Bad("'yes'", "yes", T, same="truthy, as nn.Linear/nn.Conv2d(bias='yes')"),
            Bad("2", 2, T, same="truthy, as nn.Linear/nn.Conv2d(bias=2)"),
            Bad("None", None, T, same="falsy, as nn.Linear/nn.Conv2d(bias=None)"),
        ],
        # A kronlayers-only flag: no PyTorch precedent to follow, so a non-bool is a TypeError.
        "strict_bool": [Bad("'yes'", "yes", T), Bad("2", 2, T), Bad("None", None, T)],
        "rank": [
            Bad("0", 0, V),
            Bad("-2", -2, V),
            Bad("1.5", 1.5, V),
            Bad("0.0", 0.0, V),
            Bad("-0.5", -0.5, V),
            Bad("'2'", "2", T),
            Bad("None", None, T),
            Bad("True", True, T),
            Bad("nan", NAN, V),
            Bad("inf", INF, V),
            Bad("[]", [], T),
            Bad("tensor(2)", torch.tensor(2), T),
        ],
        "shape": [
            Bad("[]", [], V),
            Bad("[0,N]", lambda s: [0, *s[1:]] if s else [0], V),
            Bad("negatives", lambda s: [-d for d in s] if s else [-1], V),
            Bad("floats", lambda s: [d + 0.5 for d in s] if s else [2.5], T),
            Bad("'ab'", "ab", T),
            Bad("int", 7, T),
            Bad("wrong product", lambda s: [*s[:-1], s[-1] + 1] if s else [5, 5], V),
            Bad("nested", lambda s: [[d] for d in s] if s else [[2]], T),
            Bad("bools", lambda s: [True] * len(s) if s else [True], T),
        ],
        "device": [
            Bad("'cpux'", "cpux", V, same="torch raises RuntimeError for unknown devices"),
            Bad("3.5", 3.5, T, same="torch raises for a non-device"),
        ],
        "dtype": [
            Bad("int64", torch.int64, T, same="nn.Linear(dtype=torch.int64) raises RuntimeError"),
            Bad("'float32'", "float32", T),
        ],
        "float_pos": [  # a finite real >= 0 (tolerances, damping)
            Bad("-1.0", -1.0, V),
            Bad("nan", NAN, V),
            Bad("inf", INF, V),
            Bad("'x'", "x", T),
            Bad("[]", [], T),
            Bad("True", True, T),
            Bad("tensor(0.1)", torch.tensor(0.1), T),
        ],
        "module_linear": [
            Bad("None", None, T),
            Bad("'linear'", "linear", T),
            Bad("nn.Conv2d", nn.Conv2d(3, 4, 3), T),
            Bad("nn.ReLU", nn.ReLU(), T),
            Bad("tensor", torch.randn(4, 4), T),
        ],
        "module_conv": [
            Bad("None", None, T),
            Bad("nn.Linear", nn.Linear(3, 4), T),
            Bad("grouped conv", nn.Conv2d(4, 4, 3, groups=2), V),
            Bad("Conv1d", nn.Conv1d(3, 4, 3), T),
            Bad("tensor", torch.randn(4, 3, 3, 3), T),
        ],
        "choice": [Bad("'bogus'", "bogus", V), Bad("3", 3, T), Bad("None", None, T)],
        "gram": [
            Bad("list", lambda g: [[1.0]], T),
            Bad("1-D", lambda g: torch.ones(3), V),
            Bad("wrong size", lambda g: torch.eye(2), V),
            Bad("int, wrong size", lambda g: torch.eye(3).long(), V),
        ],
        "init": [Bad("'x'", "x", V), Bad("[None]", [None], V), Bad("tensor", torch.ones(2), T)],
    }
    # Where a sequence of ints is a valid rank (Tucker's (R_in, R_out), compress), an empty
    # one has the right type and a wrong length, like check_pair's (3,) or check_shape's [].
    c["rank_tuple"] = [Bad("[]", [], V) if b.what == "[]" else b for b in c["rank"]]
    return c.get(kind, [])


def _tensor_catalogue(kind: str) -> list[Bad]:
    """Bad tensors; the callables take the baseline tensor."""
    common = [
        Bad("list", lambda t: t.tolist(), T),
        Bad("None", None, T),
        Bad("int64", lambda t: t.long(), T),
        Bad("bool", lambda t: t > 0, T),
        Bad("complex", lambda t: t.to(torch.complex64), T),
        Bad("float64 (mismatch)", lambda t: t.double(), T),
        Bad("meta (mismatch)", lambda t: t.to("meta"), V),
        Bad("numpy", lambda t: t.numpy(), T),
        Bad(
            "NaN values",
            lambda t: torch.full_like(t, NAN),
            V,
            same="NaN propagates to the output, as in nn.Linear / nn.Conv2d",
        ),
        Bad(
            "inf values",
            lambda t: torch.full_like(t, INF),
            V,
            same="inf/NaN propagate to the output, as in nn.Linear / nn.Conv2d",
        ),
        Bad("0-d", lambda t: torch.tensor(1.0), V),
    ]
    if kind == "input_linear":
        return [*common,
                Bad("wrong H_in", lambda t: torch.randn(*t.shape[:-1], t.shape[-1] + 1), V),
                Bad("H_in - 1", lambda t: torch.randn(*t.shape[:-1], t.shape[-1] - 1), V),
                Bad("transposed", lambda t: t.t() if t.dim() == 2 and t.shape[0] != t.shape[1]
                    else t[..., :1], V),
                Bad("empty last dim", lambda t: torch.randn(*t.shape[:-1], 0), V)]  # fmt: skip
    if kind == "input_conv":
        return [*common,
                Bad("2-D", lambda t: t[0, 0], V), Bad("5-D", lambda t: t[None], V),
                Bad("wrong C_in", lambda t: torch.cat([t, t[:, :1]], 1), V),
                Bad("0 x 0 pixels", lambda t: t[..., :0, :0], V),
                Bad("NHWC as NCHW", lambda t: t.permute(0, 2, 3, 1).contiguous(), V)]  # fmt: skip
    if kind == "bias":
        return [
            *[b for b in common if b.what not in ("None", "0-d")],
            Bad("wrong length", lambda t: torch.randn(t.shape[0] + 1), V),
            Bad("2-D", lambda t: t[None], V),
            Bad("0-d", lambda t: t[0], V),
            Bad("empty", lambda t: t[:0], V),
        ]
    if kind == "weight":  # nearest_kronecker
        return [
            *[b for b in common if "mismatch" not in b.what and b.what != "complex"],
            Bad("1-D", lambda t: t.flatten(), V),
            Bad("3-D", lambda t: t[None], V),
            Bad("wrong rows", lambda t: torch.randn(t.shape[0] + 1, t.shape[1]), V),
            Bad("wrong cols", lambda t: torch.randn(t.shape[0], t.shape[1] - 1), V),
            Bad("transposed", lambda t: t.t().contiguous(), V),
        ]
    if kind == "kron_operand":
        return [
            Bad("list", lambda t: t.tolist(), T), Bad("None", None, T),
            Bad("1-D", lambda t: t.flatten(), V), Bad("0-d", lambda t: torch.tensor(2.0), V),
            Bad("numpy", lambda t: t.numpy(), T), Bad("float", 2.0, T),
            Bad("batch mismatch", lambda t: torch.cat([t, t])[:5], V),
            Bad("batch added", lambda t: torch.stack([t[0]] * 2), V),
        ]  # fmt: skip
    if kind == "core":  # Tucker core (R_out, R_in, kh, kw): kh, kw are free (kernel size)
        return [
            *common,
            Bad("extra dim", lambda t: t[None], V),
            Bad("missing dim", lambda t: t[0], V),
            Bad("zero size", lambda t: t[:0], V),
            Bad("R_out + 1", lambda t: torch.cat([t, t[:1]]), V),
            Bad("R_in + 1", lambda t: torch.cat([t, t[:, :1]], 1), V),
            Bad("kernel > padded input", lambda t: torch.randn(*t.shape[:2], 9, 9), V),
        ]
    if kind == "tensor":  # a single factor-like tensor (Tucker factors)
        return [
            *common,
            Bad("extra dim", lambda t: t[None], V),
            Bad("missing dim", lambda t: t[0], V),
            Bad("zero size", lambda t: t[:0], V),
            Bad("wider", lambda t: torch.cat([t, t], -1), V),
            Bad("taller", lambda t: torch.cat([t, t], 0), V),
        ]
    return []


def _factor_list_catalogue() -> list[Bad]:
    return [
        Bad("a tensor", lambda fs: fs[0], T), Bad("None", None, T), Bad("[]", [], V),
        Bad("[None]", lambda fs: [None, *fs[1:]], T),
        Bad("[list]", lambda fs: [fs[0].tolist(), *fs[1:]], T),
        Bad("[int]", lambda fs: [fs[0].long(), *fs[1:]], T),
        Bad("[float64]", lambda fs: [fs[0].double(), *fs[1:]], T),
        Bad("[meta]", lambda fs: [fs[0].to("meta"), *fs[1:]], V),
        Bad("[extra dim]", lambda fs: [fs[0][None], *fs[1:]], V),
        Bad("[missing dim]", lambda fs: [fs[0][0], *fs[1:]], V),
        Bad("[zero rows]", lambda fs: [fs[0][:0], *fs[1:]], V),
        Bad("[rank mismatch]", lambda fs: [torch.cat([fs[0], fs[0]], -1), *fs[1:]], V),
        Bad("[one more row]", lambda fs: [torch.cat([fs[0], fs[0][:1]], 0), *fs[1:]], V),
        Bad("dict", lambda fs: {i: f for i, f in enumerate(fs)}, T),
        Bad("string", "abc", T),
        Bad("[complex]", lambda fs: [fs[0].to(torch.complex64), *fs[1:]], T),
        Bad("generator", lambda fs: (f for f in fs), T, same=None),
    ]  # fmt: skip


# Seeded random invalid values, per kind, for the fill-up to --per-entry.
def _random_bad(kind: str, rng: random.Random, base: Any) -> Bad | None:
    k = rng.randrange(1000)
    if kind == "count":
        v = -rng.randrange(1, 10**6)
        return Bad(f"{v}", v, V)
    if kind in ("size", "groups"):
        choice = rng.choice(["neg", "float", "str"])
        if choice == "neg":
            v = -rng.randrange(1, 10**6) if kind == "size" else rng.randrange(2, 50)
            return Bad(f"{v}", v, V)
        if choice == "float":
            v = rng.uniform(-100, 100) + 0.25
            return Bad(f"{v:.3f}", v, T)
        return Bad(f"'{k}'", str(k), T)
    if kind in ("pair", "pair_size"):
        v = (rng.randrange(1, 5), -rng.randrange(1, 10**4))
        return Bad(f"{v}", v if rng.random() < 0.5 else v[::-1], V)
    if kind == "padding":
        v = -rng.randrange(1, 10**4)
        return Bad(f"{v}", v if rng.random() < 0.5 else (0, v), V)
    if kind in ("rank", "rank_tuple"):
        if rng.random() < 0.5:
            v = -rng.randrange(0, 10**6)
            return Bad(f"{v}", v, V)
        v = 1.0 + rng.uniform(1e-6, 100.0)
        return Bad(f"{v:.6f}", v, V)
    if kind == "input_size":
        choice = rng.choice(["neg", "float", "str", "nested"])
        n = rng.randrange(1, 9)
        if choice == "neg":
            v = (n, -rng.randrange(1, 10**4))
            return Bad(f"{v}", v if rng.random() < 0.5 else v[::-1], V)
        if choice == "float":
            v = (n, 24 + rng.uniform(0.1, 0.9))
            return Bad(f"({n}, {v[1]:.3f})", v, T)
        if choice == "str":
            return Bad(f"'s{k}'", f"s{k}", T)
        v = [(n, 24), (n, -rng.randrange(1, 100))]
        return Bad(f"{v}", v, V)
    if kind == "model":
        v = rng.choice([k, f"m{k}", float(k), (k,), None])
        return Bad(f"{v!r}", lambda _f, v=v: lambda: v, T)
    if kind == "choice":
        return Bad(f"'x{k}'", f"x{k}", V)
    if kind == "kron_operand" and isinstance(base, torch.Tensor):
        if rng.random() < 0.6:  # a batch that does not broadcast against the other's (3,)
            b = rng.choice([b for b in range(2, 40) if b != 3])
            lead = (rng.randrange(1, 4),) if rng.random() < 0.5 else ()
            shape = (*lead, b, rng.randrange(1, 5), rng.randrange(1, 5))
            return Bad(f"shape {shape}", lambda _t, s=shape: torch.randn(s), V)
        shape = (rng.randrange(1, 1000),) if rng.random() < 0.9 else ()
        return Bad(f"shape {shape}", lambda _t, s=shape: torch.randn(s), V)
    if kind == "shape" and base:
        v = [d * rng.randrange(2, 9) for d in base]  # product too large
        return Bad(f"{v}", v, V)
    if kind == "float_pos":
        v = -rng.uniform(1e-9, 1e6)
        return Bad(f"{v:.3g}", v, V)
    if kind == "input_linear" and isinstance(base, torch.Tensor):
        h = base.shape[-1]
        w = rng.choice([w for w in range(1, 4 * h + 8) if w != h])
        lead = tuple(rng.randrange(0, 4) for _ in range(rng.randrange(0, 3)))
        return Bad(f"shape {(*lead, w)}", lambda _t, s=(*lead, w): torch.randn(s), V)
    if kind == "input_conv" and isinstance(base, torch.Tensor):
        c = base.shape[-3]
        w = rng.choice([w for w in range(1, 4 * c + 8) if w != c])
        shape = (rng.randrange(1, 3), w, rng.randrange(5, 9), rng.randrange(5, 9))
        return Bad(f"shape {shape}", lambda _t, s=shape: torch.randn(s), V)
    if kind == "bias" and isinstance(base, torch.Tensor):
        n = base.shape[0]
        w = rng.choice([w for w in range(0, 4 * n + 8) if w != n])
        return Bad(f"length {w}", lambda _t, w=w: torch.randn(w), V)
    if kind == "factor_list" and base:
        if rng.random() < 0.5:  # one dim of the first factor changed: inconsistent sizes
            shape = list(base[0].shape)
            i = rng.randrange(len(shape))
            shape[i] += rng.randrange(1, 7)
        else:  # a wrong number of dims
            nd = rng.choice([n for n in (1, 2, 3, 4) if n != base[0].dim()])
            shape = [rng.randrange(1, 5) for _ in range(nd)]
        return Bad(
            f"[0] shape {tuple(shape)}", lambda fs, s=tuple(shape): [torch.randn(s), *fs[1:]], V
        )
    if kind == "kernel_factor_list" and base:
        r = base[0].shape[1]
        r2 = rng.choice([x for x in range(1, 4 * r + 5) if x != r])
        j = rng.randrange(2)

        def other_rank(fs, r2=r2, j=j):
            return [torch.randn(f.shape[0], r2) if i == j else f for i, f in enumerate(fs)]

        return Bad(f"[{j}] rank {r2}", other_rank, V)
    if kind in ("tensor", "core") and isinstance(base, torch.Tensor):
        shape = list(base.shape)
        i = rng.randrange(len(shape) if kind == "tensor" else 2)
        shape[i] += rng.randrange(1, 6)
        return Bad(f"shape {tuple(shape)}", lambda _t, s=tuple(shape): torch.randn(s), V)
    if kind == "weight" and isinstance(base, torch.Tensor):
        shape = (base.shape[0] + rng.randrange(1, 9), base.shape[1] + rng.randrange(0, 9))
        return Bad(f"shape {shape}", lambda _t, s=shape: torch.randn(s), V)
    return None


def catalogue(kind: str) -> list[Bad]:
    if kind == "factor_list":
        return _factor_list_catalogue()
    if kind == "kernel_factor_list":  # more rows = a larger kernel, which is valid
        skip = ("[one more row]", "[zero rows]")
        return [b for b in _factor_list_catalogue() if b.what not in skip] + [
            Bad("three factors", lambda fs: [*fs, fs[0]], V),
            Bad("one factor", lambda fs: fs[:1], V),
            Bad("[0] > padded input", lambda fs: [torch.randn(9, fs[0].shape[1]), fs[1]], V),
        ]
    return _catalogue(kind) + _tensor_catalogue(kind)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

KIND_BY_NAME = {
    "in_features": "size", "out_features": "size", "in_channels": "size",
    "out_channels": "size", "kernel_size": "pair_size", "stride": "pair", "padding": "padding",
    "dilation": "pair", "groups": "groups", "bias": "bool", "padding_mode": "padding_mode",
    "rank": "rank", "in_shape": "shape", "out_shape": "shape", "order": "size",
    "shared_factors": "strict_bool", "device": "device", "dtype": "dtype", "n_iter_max": "count",
    "damping": "float_pos", "tol": "float_pos", "input_gram": "gram", "init": "init",
    "refine_iter": "count",
}  # fmt: skip


def _kinds(params) -> dict[str, str]:
    """Argument -> kind for the parameters of a signature that the catalogue knows."""
    kinds = {}
    for n, p in params.items():
        if n not in KIND_BY_NAME:
            continue
        kinds[n] = KIND_BY_NAME[n]
        if n == "rank" and "tuple" in str(p.annotation):  # annotations are strings here
            kinds[n] = "rank_tuple"
    return kinds


def layer_entries() -> list[Entry]:
    from layer_specs import SPECS

    entries = []
    for cls in registered_layers():
        spec = next(s for s in SPECS if s.cls is cls)
        layer = spec.make()
        params = inspect.signature(cls.__init__).parameters
        ctor_args = dict(spec.kwargs)
        kinds = _kinds(params)
        for n in kinds:  # fill defaults so that every argument can be replaced
            if n not in ctor_args and params[n].default is not inspect.Parameter.empty:
                ctor_args[n] = params[n].default
        # The sizes cross-check each other: a wrong in_features is named by in_shape too.
        cross = {
            "in_features": ("in_shape",), "out_features": ("out_shape",),
            "in_channels": ("in_shape",), "out_channels": ("out_shape",),
            "in_shape": ("in_features", "in_channels"),
            "out_shape": ("out_features", "out_channels"),
            "kernel_size": ("padding",), "stride": ("padding",), "dilation": ("padding",),
        }  # fmt: skip
        entries.append(Entry(f"{cls.__name__}()", cls, ctor_args, kinds, cross))

        def forward(input, layer=layer):
            return layer(input)

        kind = "input_linear" if cls.dense_type is nn.Linear else "input_conv"
        x = torch.randn(spec.input_shape)
        entries.append(Entry(f"{cls.__name__}.forward", forward, {"input": x}, {"input": kind},
                             {"input": ("input", "factors", "core", "weight")}))  # fmt: skip

        dense = layer.to_dense()
        options = spec.convert(layer)
        arg = "linear" if cls.dense_type is nn.Linear else "conv"

        def from_dense(cls=cls, arg=arg, **kw):
            module = kw.pop(arg)
            return cls.from_dense(module, **kw)

        fd_params = inspect.signature(
            cls.from_linear if cls.dense_type is nn.Linear else cls.from_conv
        ).parameters
        fd_kinds = _kinds(fd_params)
        fd_kinds[arg] = "module_linear" if arg == "linear" else "module_conv"
        fd_args = {arg: dense, **options}
        if "n_iter_max" in fd_params:  # keep the ALS fits short (the baseline stays valid)
            fd_args["n_iter_max"] = 5
        entries.append(Entry(f"{cls.__name__}.from_dense", from_dense, fd_args, fd_kinds,
                             {arg: ("module", "linear", "conv", "in_shape", "out_shape"),
                              "rank": ("in_shape", "out_shape")}))  # fmt: skip
    return entries


def functional_entries() -> list[Entry]:
    r = 2
    x_lin, x_conv = torch.randn(5, 24), torch.randn(2, 3, 6, 6)
    tensors = ("input", "factors", "in_factors", "out_factors", "kernel_factors", "bias",
               "core", "in_factor", "out_factor")  # fmt: skip
    cross = {t: tensors for t in tensors}
    return [
        Entry(
            "kronecker_linear",
            KF.kronecker_linear,
            {"input": x_lin, "factors": [torch.randn(2, 3, 4), torch.randn(2, 5, 6)],
             "bias": torch.randn(15)},
            {"input": "input_linear", "factors": "factor_list", "bias": "bias"},
            cross,
        ),
        Entry(
            "cp_linear",
            KF.cp_linear,
            {"input": x_lin, "in_factors": [torch.randn(4, r), torch.randn(6, r)],
             "out_factors": [torch.randn(3, r), torch.randn(5, r)], "bias": torch.randn(15),
             "strategy": "auto"},
            {"input": "input_linear", "in_factors": "factor_list",
             "out_factors": "factor_list", "bias": "bias", "strategy": "choice"},
            cross,
        ),
        Entry(
            "cp_conv2d",
            KF.cp_conv2d,
            {"input": x_conv, "in_factors": [torch.randn(3, r)], "out_factors": [torch.randn(4, r)],
             "kernel_factors": [torch.randn(3, r), torch.randn(3, r)], "bias": torch.randn(4),
             "stride": 1, "padding": 1, "dilation": 1},
            {"input": "input_conv", "in_factors": "factor_list", "out_factors": "factor_list",
             "kernel_factors": "kernel_factor_list", "bias": "bias", "stride": "pair",
             "padding": "padding", "dilation": "pair"},
            {**cross, "stride": ("padding",), "dilation": ("input",)},
        ),
        Entry(
            "tucker_conv2d",
            KF.tucker_conv2d,
            {"input": x_conv, "core": torch.randn(3, 2, 3, 3), "in_factor": torch.randn(3, 2),
             "out_factor": torch.randn(4, 3), "bias": torch.randn(4), "stride": 1,
             "padding": 1, "dilation": 1},
            {"input": "input_conv", "core": "core", "in_factor": "tensor",
             "out_factor": "tensor", "bias": "bias", "stride": "pair", "padding": "padding",
             "dilation": "pair"},
            {**cross, "stride": ("padding",), "dilation": ("input",)},
        ),
    ]  # fmt: skip


def api_entries() -> list[Entry]:
    def model():
        return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))

    def compress(**kw):
        return kronlayers.compress(kw.pop("model")(), **kw)

    def summary(**kw):
        return kronlayers.summary(kw.pop("model")(), **kw)

    compress_kinds = {"model": "model", "method": "choice", "rank": "rank_tuple", "ratio": "ratio",
                      "filter_fn": "callable", "budget": "budget"}  # fmt: skip
    return [
        Entry(
            "compress",
            compress,
            {"model": model, "method": "kronecker", "rank": 1},
            compress_kinds,
            {"rank": ("ratio", "budget")},
        ),
        Entry(
            "summary",
            summary,
            {"model": model, "input_size": (2, 24)},
            {
                "model": "model",
                "input_size": "input_size",
                "dtype": "dtype_opt",
                "device": "device",
            },
        ),
        Entry(
            "nearest_kronecker",
            kronlayers.nearest_kronecker,
            {"weight": torch.randn(15, 24), "out_shape": (3, 5), "in_shape": (4, 6), "rank": 1},
            {"weight": "weight", "out_shape": "shape", "in_shape": "shape", "rank": "rank_int"},
            {
                "out_shape": ("in_shape", "weight"),
                "in_shape": ("out_shape", "weight"),
                "weight": ("out_shape", "in_shape"),
            },
        ),
        Entry(
            "kron",
            kronlayers.kron,
            {"a": torch.randn(3, 2, 3), "b": torch.randn(3, 4, 5)},
            {"a": "kron_operand", "b": "kron_operand"},
            {"a": ("b",), "b": ("a",)},
        ),
    ]


def _extra_catalogues() -> dict[str, list[Bad]]:
    def model_wrap(v):
        # The entry builds a fresh model per call from a factory: the bad "factory" gives v.
        return lambda _factory: lambda: v

    return {
        "model": [
            Bad("None", model_wrap(None), T),
            Bad("a tensor", model_wrap(torch.randn(3)), T),
            Bad("a list of modules", model_wrap([nn.Linear(2, 2)]), T),
            Bad("a string", model_wrap("model"), T),
            Bad("a class", model_wrap(nn.Linear), T),
        ],
        "ratio": [
            Bad("-0.5", -0.5, V),
            Bad("0", 0, V),
            Bad("nan", NAN, V),
            Bad("'x'", "x", T),
            Bad("inf", INF, V),
        ],
        "callable": [Bad("'x'", "x", T), Bad("3", 3, T)],
        "budget": [Bad("-1", -1, V), Bad("'x'", "x", T), Bad("nan", NAN, V), Bad("[]", [], T)],
        "input_size": [
            Bad("[]", [], V),
            Bad("(-1, 24)", (-1, 24), V),
            Bad("'abc'", "abc", T),
            Bad("((2, 24), 'x')", ((2, 24), "x"), T),
            Bad("(2.5, 24)", (2.5, 24), T),
            Bad("(2, 23)", (2, 23), V, same="the model's own error, as when calling it on that"),
            # None (the default) means "not given": a missing argument, TypeError as in Python.
            Bad("None", None, T),
            Bad("{}", {}, T),
            Bad("(0.5,)", (0.5,), T),
            Bad("(2, True)", (2, True), T),
        ],
        "dtype_opt": [
            Bad("'float32'", "float32", T),
            Bad("int64", torch.int64, T, same="the model's own error on an int64 input"),
            Bad("3", 3, T),
        ],
        "rank_int": [
            Bad("0", 0, V),
            Bad("-1", -1, V),
            Bad("1.5", 1.5, T),
            Bad("'1'", "1", T),
            Bad("None", None, T),
            Bad("True", True, T),
            Bad("100 (too large)", 100, V),
        ],
    }


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def cases_for(entry: Entry, per_entry: int, rng: random.Random) -> list[tuple[str, Bad]]:
    extra = _extra_catalogues()
    cases: list[tuple[str, Bad]] = []
    seen: set[tuple[str, str]] = set()
    for arg, kind in entry.kinds.items():
        for bad in extra.get(kind, []) + catalogue(kind):
            if (arg, bad.what) not in seen:
                seen.add((arg, bad.what))
                cases.append((arg, bad))
    args = list(entry.kinds)
    tries = 0
    while len(cases) < per_entry and tries < 50 * per_entry:
        tries += 1
        arg = rng.choice(args)
        kind = entry.kinds[arg]
        bad = _random_bad(kind, rng, entry.args.get(arg))
        if bad is None:
            continue
        if (arg, bad.what) not in seen:
            seen.add((arg, bad.what))
            cases.append((arg, bad))
    return cases


def run(
    per_entry: int, seed: int, args_verbose: bool = False
) -> tuple[list[Result], dict[str, str]]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    results: list[Result] = []
    baselines: dict[str, str] = {}
    for entry in [*layer_entries(), *functional_entries(), *api_entries()]:
        try:
            entry.call(**entry.args)
            baselines[entry.name] = "ok"
        except Exception as e:  # a broken baseline makes the entry's results meaningless
            baselines[entry.name] = f"BASELINE FAILS: {type(e).__name__}: {e}"
            continue
        t0 = time.time()
        for arg, bad in cases_for(entry, per_entry, rng):
            results.append(classify(entry, arg, bad))
        if args_verbose:
            print(f"{entry.name}: {time.time() - t0:.1f} s", flush=True)
    return results, baselines


def _cell(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


# The fix each remaining failure needs, by (entry point suffix, argument): empty while every
# input is GOOD; an analysed failure gets its entry here (the fuzzer only reports).
FIXES: list[tuple[str, str, str]] = []


def _fix_for(r: Result) -> str | None:
    for suffix, arg, fix in FIXES:
        if suffix in r.entry and r.arg == arg:
            return fix
    return None


def report(results: list[Result], baselines: dict[str, str], seconds: float, args) -> str:
    by_entry: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        by_entry[r.entry][r.verdict] += 1
    scored = [r for r in results if r.verdict in ("GOOD", "BAD", "WORST")]
    good = sum(r.verdict == "GOOD" for r in scored)
    lines = [
        "# Fuzzing the public entry points",
        "",
        f"Generated by `python scripts/fuzz_inputs.py --per-entry {args.per_entry} --seed "
        f"{args.seed}` in {seconds:.0f} s (torch {torch.__version__}).",
        "",
        "GOOD: `ValueError`/`TypeError` naming the argument. BAD: another exception or a message "
        "not naming it. WORST: returned silently. SAME: handled as PyTorch handles it for the "
        "dense module (listed below, not counted). SKIP: the catalogue could not build that "
        "value for this baseline.",
        "",
        f"**{len(results)} bad inputs; GOOD {good} / {len(scored)} scored "
        f"({100 * good / max(len(scored), 1):.1f}%), BAD "
        f"{sum(r.verdict == 'BAD' for r in scored)}, WORST "
        f"{sum(r.verdict == 'WORST' for r in scored)}, SAME "
        f"{sum(r.verdict == 'SAME' for r in results)}.**",
        "",
        "| entry point | inputs | GOOD | BAD | WORST | SAME | SKIP | wrong class* | baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, base in baselines.items():
        c = by_entry.get(name, Counter())
        wrong = sum(
            1 for r in results if r.entry == name and r.verdict == "GOOD" and not r.discipline_ok
        )
        lines.append(
            f"| `{name}` | {sum(c.values())} | {c['GOOD']} | {c['BAD']} | {c['WORST']} | "
            f"{c['SAME']} | {c['SKIP']} | {wrong} | {_cell(base, 80)} |"
        )
    lines += [
        "",
        "\\* GOOD reactions whose class differs from the discipline of `kronlayers/_validation.py`"
        " (wrong type -> `TypeError`, wrong value -> `ValueError`); listed at the end.",
    ]
    for verdict, title in (("WORST", "WORST: returned silently"), ("BAD", "BAD reactions")):
        rows = [r for r in results if r.verdict == verdict]
        lines += ["", f"## {title} ({len(rows)})", ""]
        if rows:
            lines += ["| entry point | argument | bad value | reaction |", "|---|---|---|---|"]
            lines += [
                f"| `{r.entry}` | `{r.arg}` | {_cell(r.what, 40)} | {_cell(r.detail)} |"
                for r in rows
            ]
        else:
            lines.append("None.")
    failing = [r for r in results if r.verdict in ("BAD", "WORST")]
    groups: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in failing:
        groups[(r.entry, r.arg)].append(r)
    lines += ["", "## Fixes needed", ""]
    if groups:
        lines += ["| entry point | argument | failures | fix |", "|---|---|---|---|"]
        for (entry, arg), rs in groups.items():
            fix = _fix_for(rs[0]) or "(not analysed yet)"
            lines.append(f"| `{entry}` | `{arg}` | {len(rs)} | {fix} |")
    else:
        lines.append("None.")
    same = [r for r in results if r.verdict == "SAME"]
    lines += ["", f"## SAME as PyTorch ({len(same)})", ""]
    if same:
        lines += ["| entry point | argument | bad value | reaction |", "|---|---|---|---|"]
        lines += [
            f"| `{r.entry}` | `{r.arg}` | {_cell(r.what, 40)} | {_cell(r.detail)} |" for r in same
        ]
    wrong = [r for r in results if r.verdict == "GOOD" and not r.discipline_ok]
    lines += ["", f"## GOOD, but the class differs from the discipline ({len(wrong)})", ""]
    if wrong:
        lines += [
            "| entry point | argument | bad value | expected | got |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{r.entry}` | `{r.arg}` | {_cell(r.what, 40)} | {r.expect} | {_cell(r.detail)} |"
            for r in wrong
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-entry", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="time per entry point")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "fuzz.md")
    args = parser.parse_args()
    start = time.time()
    results, baselines = run(args.per_entry, args.seed, args.verbose)
    text = report(results, baselines, time.time() - start, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    scored = [r for r in results if r.verdict in ("GOOD", "BAD", "WORST")]
    good = sum(r.verdict == "GOOD" for r in scored)
    print(f"{len(results)} inputs, GOOD {good}/{len(scored)}; wrote {args.out}")
    print(text.split("## WORST")[0])
    return 0 if good == len(scored) else 1


if __name__ == "__main__":
    raise SystemExit(main())
