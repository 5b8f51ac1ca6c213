"""Mutation testing of the kernels and the conversion code (run before releases, not in CI).

A small self-written mutator: every target file (``kronlayers/functional/*.py`` and
``kronlayers/decomposition/*.py``) is parsed with :mod:`ast` and each mutation below is
applied, one at a time, to a snapshot copy of the package; the relevant fast tests run
against it with ``-x``. A mutant is *killed* when a test fails (or the package no longer
imports, or the run times out) and *survives* when every selected test passes. Operators:

* ``binop``: ``+ -``, ``* /``, ``//`` -> ``/``, ``@`` -> ``*``, ``**`` -> ``*`` swapped;
* ``drop``: ``a + b`` / ``a - b`` -> ``a`` and -> ``b`` (a dropped term);
* ``compare``: ``< <=``, ``> >=``, ``== !=``, ``is``/``is not``, ``in``/``not in`` swapped;
* ``boolop``: ``and`` <-> ``or``; ``not``: ``not x`` -> ``x``;
* ``const``: an integer ``n`` -> ``n + 1`` (and ``1`` -> ``0``): off-by-one in indices,
  sizes, dims, ``needs_input_grad[k]`` and ``needs[3:]``; ``True`` <-> ``False``;
* ``index``: ``a[i]`` -> ``a[i + 1]`` for a variable index;
* ``transpose``: ``x.t()``, ``x.T``, ``x.mT``, ``x.transpose(a, b)`` -> ``x`` (a dropped
  transpose); an einsum spec's last two output letters swapped (a transposed result);
* ``swap``: the two operands of ``mm``/``bmm``/``matmul``/``einsum``/``addmm``/``baddbmm``/
  ``conv2d`` swapped;
* ``augassign``: ``+=`` <-> ``-=``, ``*=`` -> ``/=``.

Not mutated: docstrings and other string constants (error messages), annotations,
``__all__``, lines marked ``# pragma: no mutate``.

The runner forks the mutants from a parent that has already imported torch, pytest and
hypothesis (each child imports the mutated package afresh from its own snapshot directory),
so a killed mutant costs about a second. Tests that fail on the unmutated code are reported
and deselected. Hypothesis runs derandomized, without its example database.

Usage (defaults: 2 workers, a seeded sample of 200 mutants, at most 20 minutes)::

    python scripts/mutation_test.py                      # sample, write scripts/results/mutation.md
    python scripts/mutation_test.py --all                # every mutant (hours)
    python scripts/mutation_test.py --list               # count the mutants per file
    python scripts/mutation_test.py --files functional/cp_linear.py --sample 0
    python scripts/mutation_test.py --explain scripts/results/mutation.md  # re-read EQUIVALENT

Survivors that are equivalent mutants are explained in :data:`EQUIVALENT` (keyed by the
mutant's stable id); the report lists each survivor with its explanation, or flags it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kronlayers"
TARGET_DIRS = ("functional", "decomposition")

# ----------------------------------------------------------------------------------------------
# Which tests run for which target (node ids are collected once; a filter keeps the ids that
# contain any of the words). Listed cheapest / most targeted first, as -x stops at the first
# failure.
# ----------------------------------------------------------------------------------------------

_CP_LIN = ("cp_linear", "CPLinear", "cplinear", "lowrank", "LowRank", "balance", "make_plan")
_CP_CONV = ("cp_conv2d", "CPConv2d", "cpconv", "balance")
_KRON = ("kron",)
_TUCKER = ("tucker", "Tucker")
_CONVERT = ("from_dense", "from_linear", "from_conv", "compress", "tltorch", "convert")
# The dispatcher's kernel tests (not its compile / export / cost-model ones, slow or covered by
# the _dispatch.py selection).
_KRON_DISPATCH = (
    "every_kernel", "every_subset", "double_backward", "create_graph", "switch_point", "choice",
    "symbolic", "force_path", "module_", "vmap", "jacobians", "hot_path", "kron_weight",
    "single_row", "cache_dense",
)  # fmt: skip

SELECTIONS: dict[str, list[tuple[str, tuple[str, ...] | None]]] = {
    "functional/cp_linear.py": [
        ("tests/test_kill_cp_dispatch.py", None),
        ("tests/test_cp_linear.py", None),
        ("tests/test_reliability.py", _CP_LIN),
        ("tests/test_layer_contract.py", ("cplinear", "lowrank")),
    ],
    "functional/cp_conv2d.py": [
        ("tests/test_kill_cp_dispatch.py", None),
        ("tests/test_conv_dispatch.py", None),
        ("tests/test_cp_conv2d.py", None),
        ("tests/test_reliability.py", _CP_CONV),
        ("tests/test_layer_contract.py", ("cpconv",)),
    ],
    "functional/kronecker_linear.py": [
        ("tests/test_kill_kron_engine.py", None),
        ("tests/test_kronecker_linear.py", None),
        ("tests/test_kron.py", None),
        ("tests/test_reliability.py", _KRON),
        ("tests/test_layer_contract.py", _KRON),
        ("tests/test_dispatch.py", _KRON_DISPATCH),
    ],
    "functional/_kron_engine.py": [
        ("tests/test_kill_kron_engine.py", None),
        ("tests/test_kronecker_linear.py", None),
        ("tests/test_kron.py", None),
        ("tests/test_reliability.py", _KRON),
        ("tests/test_layer_contract.py", _KRON),
        ("tests/test_dispatch.py", _KRON_DISPATCH),
    ],
    "functional/_dispatch.py": [
        ("tests/test_kill_dispatch.py", None),
        ("tests/test_kill_kron_engine.py", ("plan", "ops", "dispatch")),
        ("tests/test_dispatch.py", None),
        ("tests/test_reliability.py", _KRON),
        ("tests/test_kronecker_linear.py", None),
    ],
    "functional/tucker_conv2d.py": [
        ("tests/test_kill_tucker.py", None),
        ("tests/test_conv_dispatch.py", None),
        ("tests/test_tucker_conv2d.py", None),
        ("tests/test_reliability.py", _TUCKER),
        ("tests/test_layer_contract.py", _TUCKER),
    ],
    # the channel GEMMs and the factorized-or-dense choice shared by the convolutions
    "functional/_channels.py": [
        ("tests/test_kill_tucker.py", None),
        ("tests/test_tucker_conv2d.py", None),
        ("tests/test_cp_conv2d.py", None),
        ("tests/test_layer_contract.py", ("cpconv", "tucker", "Tucker")),
    ],
    "functional/_conv_dispatch.py": [
        ("tests/test_kill_tucker.py", None),
        ("tests/test_conv_dispatch.py", None),
        ("tests/test_tucker_conv2d.py", None),
        ("tests/test_cp_conv2d.py", None),
        ("tests/test_layer_contract.py", ("cpconv", "tucker", "Tucker")),
    ],
    # split_needs: which gradient each kernel computes (every subset of trainable tensors)
    "functional/_function.py": [
        ("tests/test_kill_kron_engine.py", ("declare", "subset", "frozen")),
        ("tests/test_kronecker_linear.py", None),
        ("tests/test_layer_contract.py", None),
    ],
    "*functional-shared*": [  # _amp.py, __init__.py
        ("tests/test_layer_contract.py", None),
        ("tests/test_reliability.py", ("half", "balance", "bit_identical", "autocast", "meta")),
        ("tests/test_ecosystem.py", ("autocast", "no_grad", "apply", "compile")),
    ],
    "decomposition/cp.py": [
        ("tests/test_kill_decomposition.py", None),
        ("tests/test_kill_whitening.py", None),
        ("tests/test_reliability.py", ("cp_decompose", "cp_rank", "solve_normal")),
        ("tests/test_cp_linear.py", _CONVERT),
        ("tests/test_cp_conv2d.py", _CONVERT),
        ("tests/test_layer_contract.py", ("cplinear", "cpconv")),
    ],
    "decomposition/nearest_kronecker.py": [
        ("tests/test_kill_decomposition.py", None),
        ("tests/test_kill_whitening.py", None),
        ("tests/test_nearest_kronecker.py", None),
        ("tests/test_reliability.py", ("nearest_kronecker",)),
        ("tests/test_kronecker_linear.py", _CONVERT),
        ("tests/test_layer_contract.py", _KRON),
    ],
    "decomposition/tucker.py": [
        ("tests/test_kill_decomposition.py", None),
        ("tests/test_kill_whitening.py", None),
        ("tests/test_reliability.py", ("tucker2",)),
        ("tests/test_tucker_conv2d.py", None),
        ("tests/test_layer_contract.py", _TUCKER),
    ],
    "*decomposition-shared*": [  # whitening.py, __init__.py
        ("tests/test_kill_whitening.py", None),
        ("tests/test_calibration.py", None),
        ("tests/test_layer_contract.py", _CONVERT),
    ],
}
# Slow and redundant for mutation runs: the generic fullgraph compilation tests (about 3 s
# each; the dynamic-shape compile tests stay) and the largest every-subset backward case
# (its smaller sibling stays).
EXCLUDE = (
    "test_compile_fullgraph",
    "every_subset_of_trainable_tensors[cpconv-tensorized-reflect]",
    "cuda",
)


def selection_for(rel: str) -> list[tuple[str, tuple[str, ...] | None]]:
    if rel in SELECTIONS:
        return SELECTIONS[rel]
    return SELECTIONS["*functional-shared*" if rel.startswith("functional/") else
                      "*decomposition-shared*"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Equivalent mutants: stable id -> the argument why no test can kill them.
# ----------------------------------------------------------------------------------------------

# Keys: the 8-hex id shown in the report (sha1 of the stable key) or the key itself.
EQUIVALENT: dict[str, str] = {
    "401e3730": "`size * rank // shape[j]` -> `/` in `_kr_adjoint`: `size` is a product that "
    "includes `shape[j]`, so the division is exact and `/` gives the same value (as a float; "
    "the cost model computes in floats).",
    "4f85fc68": "`n * h // shape[last]` -> `/` in `_output_side`: `h` is the product of the "
    "modes, `shape[last]` among them, so the division is exact: the same value as a float.",
    "3dedeaa5": "`zip(balanced, factors, strict=True)` -> `strict=False` in "
    "`balance_kron_factors`: `balance_cp_stages` returns one stage per stage given, so the "
    "lengths are equal by construction.",
    # functional/cp_linear.py
    "87dcf3f3": "`lru_cache(maxsize=256)` -> 257: only the plan cache's capacity changes; plans "
    "are pure functions of their arguments, so results are identical.",
    "941be11a": "`isinstance(n, int) and not is_compiling()` -> `or`: eager calls have an int `n` "
    "(True either way); under Dynamo `n` passes as an int too and Dynamo traces the function "
    "behind `lru_cache` directly (same plan, no hashing); under non-strict export `n` is a "
    "SymInt and `is_compiling()` is True (False either way).",
    # functional/cp_conv2d.py
    "2ac3de01": "inverts the check that skips the layout copy of `grad_y`: "
    "`contiguous(memory_format=...)` returns equal values whatever the input's strides, so "
    "only the speed changes.",
    "628952e0": "`not is_compiling()` -> `is_compiling()` in `make_plan`: eager calls then skip "
    "the plan cache (same plan, recomputed); compiled / exported calls are unchanged (see "
    "`941be11a`).",
    "0b02b6c7": "`statically_known_true(kr > mode)` -> `kr >= mode`: differs only when the "
    "symbolic range proves `kr >= mode` but neither `kr <= mode` nor `kr > mode`, i.e. the two "
    "routes tie at some batch size in the range; either route is then correct and guard-free.",
    "f7985653": "`set_materialize_grads(False)` -> True: the unused outputs' gradients arrive "
    "as zero tensors instead of None; the backward ignores them, so only memory traffic "
    "changes.",
    "110b5062": "`need_bias and ctx.has_bias` -> `or`: `needs_input_grad` is False for a `None` "
    "bias, so the change only computes a bias gradient that autograd discards (a bias that "
    "does not require grad).",
    "2cd76a81": "`input.numel() // prod(in_shape)` -> `/`: `n` only feeds the plan's cost "
    "model, and the float quotient is the same integer value (exact below 2**53), so every "
    "comparison and the plan are unchanged (only the plan cache is bypassed).",
    # functional/_amp.py
    "444101c5": "the check that caches `inspect.signature` on the forward is inverted: the "
    "signature is then recomputed by `Function.apply` on each call (the cache is only an "
    "optimisation).",
    "1a8ff8a4": "`|log scale| <= 80` -> `< 80`: differs only for a float32 log-scale of exactly "
    "80.0, where both choices are safe (exp(80) is finite in float32).",
    "6219470d": "`zip(..., strict=True)` -> `strict=False`: the zipped lists are built with "
    "equal lengths just above.",
    # functional/cp_conv2d.py
    "b1905b48": "the fallback `lambda t: False` for a torch without "
    "`torch._C._functorch.is_functorch_wrapped_tensor` -> `True`: the fallback is never "
    "used with the torch versions this package supports (the attribute exists since 2.0).",
    "2d1bbd8f": "the NHWC-GEMM threshold 16 -> 17 channels only picks which of two equal-valued "
    "GEMM layouts runs for 16 output channels (speed, not values; the fresh-output branch "
    "and its fallback share the constant).",
    "3b10310d": "`out += bias` -> `-=` in the non-fresh NHWC branch: unreachable with a bias "
    "(only the forward's output passes a bias, with `fresh=True`, which takes the branch "
    "above).",
    "86ce0c8e": "`set_materialize_grads(False)` -> True: `u`'s (unused, non-differentiable) "
    "gradient arrives as zeros instead of None; the backward ignores it.",
    "7199f3e4": "the `grad_y is None` early return (5 -> 6 Nones) is unreachable: `y` is the "
    "only differentiable output, so autograd never calls the backward without its gradient.",
    "4c14078c": "`zip(..., strict=True)` -> `strict=False`: dilation, kernel size and padding "
    "are pairs by construction.",
    "36f2fdb7": "`x.device.type == 'cpu' or channels_last(x)` -> `and`: on CPU the "
    "rank-channel intermediates then follow the input's layout instead of NHWC; the values "
    "are the same (the module docstring's layout choice is for speed).",
    "5b3ae072": "`x.device.type == 'cpu'` -> `!=`: as `36f2fdb7`, only the layout of the "
    "intermediates (and so the speed) changes.",
    # decomposition/cp.py
    "8312a0b7": "`max(1, prod(shape) // max(shape))` -> `max(0, ...)`: for positive sizes "
    "`prod(shape) >= max(shape)`, so the floor division is already >= 1.",
    "c4c359b2": "drops the ridge of the second Cholesky attempt: a singular Gram then falls "
    "through to the pseudo-inverse, which gives the same solution (to ~1e-12 relative) on the "
    "Gram's range, where the normal equations' right-hand side lies; only the cost differs.",
    "c8b4e92e": "the ridge `1e-12 tr(V) / R` -> `1e-12 tr(V) * R` (only used when Cholesky "
    "fails on a singular Gram): a relative perturbation of the Gram of at most 1e-12 R^2, "
    "below the ALS's own rounding and tolerance for any rank these layers use.",
    # decomposition/nearest_kronecker.py
    "b57149ec": "`svd(full_matrices=False)` -> True: the extra singular vectors are sliced away "
    "by `[:, :rank]` / `[:rank]` right after; only the cost changes.",
    "19fa6ed9": "shrinks the ridge to `tiny`: as for `c4c359b2`, a singular Gram then takes "
    "the pseudo-inverse fallback, with the same solution up to rounding.",
    "62097fa7": "the ridge `1e-12 tr(V) / R + tiny` -> `... - tiny` (only used when Cholesky "
    "fails): `tiny` (2e-308) is below the rounding of any non-zero ridge; for `V = 0` the ridge "
    "is then 0 and the pseudo-inverse gives 0, as Cholesky of `tiny I` does, since `m = 0` "
    "whenever `V = 0` (both are built from the same factor columns).",
    "a1e07eaf": "drops `tiny` from the ridge: see `62097fa7`.",
    "af735b63": "`r = v64.shape[0]` -> `shape[1]`: `V` is square `(R, R)`.",
    "07728ea8": "`pinv(v, hermitian=True)` -> False: the same pseudo-inverse of a symmetric "
    "matrix (by SVD instead of eigh), equal up to rounding.",
    "bd269d5f": "`if k < rank` -> `<=`: for `k == rank` the concatenated random part is empty, "
    "so both branches return the same leading vectors.",
    "fbd38ead": "`zip(..., strict=True)` -> False: the factor list and the stacked norms have "
    "the same length by construction.",
    "78d2e46b": "`zip(factors, previous, strict=True)` -> False: `previous` is a copy of "
    "`factors`.",
    "606454ef": "`zip(init, dims, strict=True)` -> False: the length was checked just above.",
    "dc073eea": "`cp_decompose`'s `check_int(rank, minimum=1)` -> 0: `cp_als` checks the rank "
    "again with `minimum=1` and raises the same error for 0.",
    "e94550dd": "FLOAT32_ABOVE 20,000,000 -> 20,000,001: moves the float32-GEMM switch by one "
    "multiply-add count, reachable only by a problem of exactly 2e7 numel * rank (both sides "
    "meet the documented accuracy; `test_float32_threshold` checks the rule itself, with the "
    "threshold patched).",
    # decomposition/nearest_kronecker.py
    "193bb10a": "`zip(out_shape, in_shape, strict=True)` -> False: equal lengths (checked by "
    "the caller, and by the reshape just above).",
    "7e795eaa": "`zip(out_shape, in_shape, strict=True)` -> False: the lengths were checked "
    "just above.",
    # decomposition/tucker.py
    "df159b0b": "the HOOI projection's spatial axes `hw` -> `wh` before `reshape(c_out, -1)`: "
    "permuting the columns of a matrix does not change its Gram `M M^T`, whose leading "
    "eigenvectors are the new factor.",
    "e9b9c192": "as `df159b0b`, for the input factor's projection.",
    "b63f6c8f": "`err - new_err < tol` -> `<=`: differs only when the gain equals `tol` "
    "exactly (with `tol=0`: no gain at all, a HOOI fixed point, where further sweeps return "
    "the same subspace).",
    # decomposition/whitening.py
    "cc7e85cf": "`thin_svd`'s `p >= q` -> `p > q`: a square matrix takes the other branch, the "
    "eigendecomposition of `m m^T` instead of `m^T m`; both are exact (same singular values, "
    "`U S Vh = m` up to rounding) and every caller uses `u`, `vh` only through products with "
    "`sqrt(s)` (zero for a zero singular value) or sign-invariant norms.",
    "3e3310a5": "`n_iter_max > 0` -> `>= 0`: `_kron_als` with `n_iter_max=0` runs no sweep and "
    "returns its input factors.",
    "93c68b01": "`obj <= 1e-14 base` -> `<`: equal only for a zero weight (`obj = base = 0`), "
    "where the next sweep stops anyway (`prev - obj = 0 < tol * 1e-300`) with the same zero "
    "factors.",
    "97ec907d": "`(h + h.T) / 2` -> `(h + h) / 2` in `_spd_solve`: `h` is built symmetric "
    "(from symmetric `C` and `G`), so this is `h` up to rounding.",
    "dc70c4c2": "`n = h.shape[0]` -> `shape[1]`: `h` is square.",
    "b5140055": "drops `tiny` from `_spd_solve`'s ridge: see `62097fa7` (`h = 0` only with "
    "`rhs = 0`).",
    "00482637": "shrinks `_spd_solve`'s ridge to `tiny`: the ridge is `1e-12` relative, below "
    "the tolerance of every use; a numerically singular `h` then takes the pseudo-inverse "
    "branch, which solves the same equations on `h`'s range (as `19fa6ed9`).",
    "0704a6c3": "`1e-12 * mean(diag h)` -> `1e-12 / mean(diag h)`: the ridge is still negligible "
    "against `h` for any scale these Grams have (it only regularises a singular `h`, see "
    "`00482637`).",
    "3eacebf6": "drops `_spd_solve`'s ridge: see `00482637`.",
    "cf8c7a77": "`pinv(h, hermitian=True)` -> False: as `07728ea8`.",
    "9812e243": "`numel * rank > 20_000_000` -> `>=` (float32 products for large layers): "
    "differs only at exactly 2e7, see `e94550dd`.",
    "91da891d": "`numel * rank` -> `numel / rank` in the float32 switch: only layers of more "
    "than 2e7 weights (x rank) are affected, then computed in float64 instead of float32 (the "
    "documented accuracy either way); no test can afford such a fit.",
    "3fea7863": "the float32 switch at 20,000,000 -> 20,000,001: see `e94550dd`.",
    "43e6ef1f": "`_refine_cp`'s float32 switch `>` -> `>=`: see `9812e243`.",
    "ea104c21": "`_refine_cp`'s float32 switch `*` -> `/`: see `91da891d`.",
    "b07e48d5": "`a_fs[0].shape[1]` -> `a_fs[1].shape[1]`: every factor has `R` columns.",
    "73077977": "`a_fs[0].shape[1]` (R) -> `shape[0]` (in_1) in the float32 switch: changes the "
    "switch point only for layers beyond 2e7 / max(R, in_1) weights, see `91da891d`.",
    "597a566c": "`_refine_cp`'s float32 switch at 20,000,001: see `e94550dd`.",
    "8a848b53": "`zip(factors[n_out:], chols, strict=True)` -> False: one Cholesky factor per "
    "input mode by construction.",
    "67199e39": "`if not obj < best` -> `<=`: differs only when a sweep's objective equals the "
    "best exactly, where accepting or undoing it leaves the same objective (and the "
    "1e-4-gain rule then stops the refinement either way).",
    "cd582026": "`int(info) != 0` -> `==` in the PCG preconditioner: a positive definite `m` "
    "is factorized again with a `1e-10` relative ridge (a preconditioner perturbed by 1e-10, "
    "same PCG iterates to rounding); a failed one is never reached (`m`, a Hadamard product "
    "of Grams with positive diagonals, is positive definite for the ranks used).",
    "d33cb29e": "`(m + m.T) / 2` -> `* 2`: scales the preconditioner by a constant; "
    "preconditioned CG is invariant to that (`z`, `rz` scale, `alpha` compensates).",
    "fe03358c": "`(m + m.T) / 2` -> `/ 3`: a constant scale of the preconditioner, see `d33cb29e`.",
    "53e03c40": "`m + m.T` -> `m`: `m` is symmetric up to rounding, so the preconditioner is "
    "scaled by 1/2, see `d33cb29e`.",
    "eac04cd8": "`m + m.T` -> `m.T`: as `53e03c40`.",
    "c911cebc": "`m + m.T` -> `m + m`: as `53e03c40`.",
    "9dca5d54": "`torch.eye(m.shape[0])` -> `shape[1]`: `m` is square (and the branch is only "
    "taken for a singular `m`, see `cd582026`).",
    "ec643464": "drops the ridge of the PCG preconditioner's fallback factorization, which only "
    "runs for a singular `m` (never for the ranks used, see `cd582026`).",
    "d16bdc03": "keeps only the ridge in the fallback factorization: unreachable, see `ec643464`.",
    "b8f007b0": "`if php <= 0` -> `< 0`: `p^T H p = 0` only for `p = 0`, i.e. `r = 0`, and "
    "then `rz = 0` has already ended the loop.",
    "e8e9aa36": "`svd(full_matrices=False)` -> True: only the first `r_out` columns of `U` are "
    "used.",
    # functional/_kron_engine.py
    "d96c1b24": "`_reduced_bmm`'s `a * k * b >= 32768` -> `>`: at exactly 32768 multiply-adds "
    "per matrix `addbmm` or `bmm(...).sum(0)` runs; both compute the same sum (up to the "
    "summation order), and the cost description uses its own copy of the rule.",
    "674d083f": "`zip(out_shape, in_shape, strict=True)` -> False in `kron_weight_ops`: the "
    "shapes come from the same factors.",
    "a34b6035": "`rest = h // big` -> `h / big`: `big` is one factor's `o_k * i_k`, which "
    "divides `h = prod(o_k * i_k)`, so the float has the same value in every `Gemm` size "
    "and cost.",
    # functional/kronecker_linear.py
    "4a698286": "`ctx.has_bias and need_bias` -> `or`: `needs_input_grad` is False for a `None` "
    "bias, so the change only computes a gradient for a frozen bias, which autograd discards "
    "(as `110b5062` in cp_linear).",
    "3e33c47d": "`not is_compiling()` -> `is_compiling()` in `plain_grad`: eager calls then "
    "skip the hook that makes an expanded output gradient (of `y.sum()`) contiguous; "
    "`kron2_backward` makes it contiguous itself (`g.contiguous()`), so the same GEMMs run "
    "on the same values (the hook is a documented speed fix: one copy instead of one per "
    "batched product); under compile the hook is not wanted either way.",
    "d78f3572": "`_NO_NEEDS`: `(False,) * (d + 2)` -> `(d + 3)`: the no-gradient flags get one "
    "more `False`; every reader unpacks `(input, bias, *factors)` and asks whether any flag "
    "is set (none is), so plans and kernels are unchanged.",
    "58a15fc7": "`len(plans) >= _MAX_PLANS` -> `>`: the per-module plan cache holds 257 "
    "entries instead of 256 before it is cleared; plans are pure functions of their key.",
    "7da57f38": "`entry[0] != plan_generation()` -> `==`: an entry of the current generation is "
    "re-planned (same plan), one of an older generation is kept; every plan computes the same "
    "function (a plan only picks among exact kernels), and an entry exists only for an input "
    "signature that was validated when it was made.",
    # functional/_dispatch.py
    "96990b7b": "`alloc_bytes_per_s <= 0` -> `<= 1`: a rate in bytes per second; (0, 1] B/s is "
    "no model of any device (the defaults are 0 and 4e9), and for every rate >= 1 B/s or "
    "equal to 0 both tests agree.",
    "e0d2eca5": "`tile >= 64` -> `>= 65` in the GEMM rate: the two branches agree at 64 "
    "(`sqrt(64) / 8 = 1`), the only tile size the change moves.",
    "3c960814": "`calibrate` times `mm(a, b)` -> `mm(b, a)`: two random `n x n` operands, the "
    "same GEMM cost; the product itself is discarded.",
    "c7cdf309": "`calibrate`'s node probe `leaf.mul(2)` -> `mul(3)`: the factor of the timed "
    "op does not change its cost (one built-in node over four entries either way).",
    "52ed23e7": "`_best_time(repeat=9)` -> 10: how often `calibrate` repeats a timing only "
    "changes the noise of the measured minimum (tests replace the timer, and pass `repeat` "
    "explicitly where they check it).",
    "8de24532": "`_best_time(number=5)` -> 6: as `52ed23e7`.",
}


def _explanation(m: Mutant) -> str | None:
    return EQUIVALENT.get(m.key) or EQUIVALENT.get(hashlib.sha1(m.key.encode()).hexdigest()[:8])


# ----------------------------------------------------------------------------------------------
# Mutant generation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutant:
    rel: str  # path under kronlayers/
    start: int  # byte offsets in the file
    end: int
    replacement: bytes
    op: str
    line: int
    qualname: str
    original: str  # the replaced source, for the report

    @property
    def description(self) -> str:
        return f"{self.original!s} -> {self.replacement.decode()!s}"

    @property
    def key(self) -> str:
        # Stable across unrelated edits: file, function, operator and the text change.
        return f"{self.rel}::{self.qualname}::{self.op}::{self.description}"


_BINOP_SWAP = {
    ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/",
    ast.MatMult: "*", ast.Pow: "*", ast.Mod: "//",
}  # fmt: skip
_BINOP_TOKEN = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//",
    ast.MatMult: "@", ast.Pow: "**", ast.Mod: "%",
}  # fmt: skip
_CMP_SWAP = {
    ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">"),
    ast.Eq: ("==", "!="), ast.NotEq: ("!=", "=="), ast.Is: ("is", "is not"),
    ast.IsNot: ("is not", "is"), ast.In: ("in", "not in"), ast.NotIn: ("not in", "in"),
}  # fmt: skip
_AUG_SWAP = {ast.Add: ("+=", "-="), ast.Sub: ("-=", "+="), ast.Mult: ("*=", "/=")}
_SWAP_CALLS = {  # function name -> the two positional arguments to swap
    "mm": (0, 1), "bmm": (0, 1), "matmul": (0, 1), "einsum": (1, 2), "addmm": (1, 2),
    "baddbmm": (1, 2), "conv2d": (0, 1),
}  # fmt: skip
_TRANSPOSE_METHODS = ("t", "transpose", "permute")
_TRANSPOSE_ATTRS = ("T", "mT")


class _Collector(ast.NodeVisitor):
    def __init__(self, rel: str, src: bytes):
        self.rel = rel
        self.src = src
        self.lines = src.split(b"\n")
        starts, pos = [], 0
        for line in self.lines:
            starts.append(pos)
            pos += len(line) + 1
        self.line_starts = starts
        self.stack: list[str] = []
        self.mutants: list[Mutant] = []
        self.skip_nodes: set[int] = set()

    # -- positions ----------------------------------------------------------------------

    def off(self, line: int, col: int) -> int:
        return self.line_starts[line - 1] + col

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.off(node.lineno, node.col_offset), self.off(
            node.end_lineno, node.end_col_offset
        )

    def text(self, node: ast.AST) -> bytes:
        a, b = self.span(node)
        return self.src[a:b]

    def add(self, node: ast.AST, start: int, end: int, repl: str | bytes, op: str) -> None:
        if b"pragma: no mutate" in self.lines[node.lineno - 1]:
            return
        repl_b = repl.encode() if isinstance(repl, str) else repl
        original = self.src[start:end]
        if original == repl_b:
            return
        self.mutants.append(
            Mutant(
                self.rel,
                start,
                end,
                repl_b,
                op,
                node.lineno,
                ".".join(self.stack) or "<module>",
                " ".join(original.decode(errors="replace").split()),
            )
        )

    def find_token(self, a: int, b: int, token: str) -> int | None:
        """Offset of ``token`` in ``src[a:b]`` outside brackets/comments, else None."""
        seg = self.src[a:b].decode(errors="replace")
        # Between two operands there are only spaces, parentheses, newlines and the token.
        m = re.search(r"(?<![=!<>*/@%+-])" + re.escape(token) + r"(?![=*/<>])", seg)
        if token in ("is", "in", "not in", "is not", "and", "or"):
            m = re.search(r"\b" + re.escape(token) + r"\b", seg)
        if m is None:
            return None
        return a + len(seg[: m.start()].encode())

    # -- traversal ----------------------------------------------------------------------

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._skip_doc(node)
        for a in (*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs):
            if a.annotation is not None:
                self._skip(a.annotation)
        if node.returns is not None:
            self._skip(node.returns)
        for d in node.decorator_list:
            self._skip(d)
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._skip_doc(node)
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_Module(self, node: ast.Module) -> None:
        self._skip_doc(node)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._skip(node.annotation)
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return
        self.generic_visit(node)

    def visit_Raise(self, node: ast.Raise) -> None:
        return  # the message of an error: strings and formatting only

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        return  # f-strings (messages, einsum specs built from letters): not mutated inside

    def generic_visit(self, node: ast.AST) -> None:
        if id(node) in self.skip_nodes:
            return
        super().generic_visit(node)

    def _skip(self, node: ast.AST) -> None:
        for n in ast.walk(node):
            self.skip_nodes.add(id(n))

    def _skip_doc(self, node) -> None:
        body = getattr(node, "body", [])
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            self._skip(body[0])

    # -- operators ----------------------------------------------------------------------

    def visit_BinOp(self, node: ast.BinOp) -> None:
        if id(node) in self.skip_nodes:
            return
        strings = any(
            isinstance(x, ast.JoinedStr)
            or (isinstance(x, ast.Constant) and isinstance(x.value, str))
            for x in (node.left, node.right)
        )
        if not strings and type(node.op) in _BINOP_SWAP:
            a = self.span(node.left)[1]
            b = self.span(node.right)[0]
            tok = _BINOP_TOKEN[type(node.op)]
            pos = self.find_token(a, b, tok)
            if pos is not None:
                self.add(node, pos, pos + len(tok), _BINOP_SWAP[type(node.op)], "binop")
            if isinstance(node.op, (ast.Add, ast.Sub)):
                s, e = self.span(node)
                self.add(node, s, e, b"(" + self.text(node.left) + b")", "drop")
                if isinstance(node.op, ast.Add):
                    self.add(node, s, e, b"(" + self.text(node.right) + b")", "drop")
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        if id(node) in self.skip_nodes:
            return
        prev = node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            tok, repl = _CMP_SWAP.get(type(op), (None, None))
            if tok is not None:
                a, b = self.span(prev)[1], self.span(right)[0]
                pos = self.find_token(a, b, tok)
                if pos is not None:
                    self.add(node, pos, pos + len(tok), repl, "compare")
            prev = right
        self.generic_visit(node)

    def visit_BoolOp(self, node: ast.BoolOp) -> None:
        if id(node) in self.skip_nodes:
            return
        tok, repl = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
        for left, right in zip(node.values, node.values[1:], strict=False):
            a, b = self.span(left)[1], self.span(right)[0]
            pos = self.find_token(a, b, tok)
            if pos is not None:
                self.add(node, pos, pos + len(tok), repl, "boolop")
        self.generic_visit(node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> None:
        if id(node) in self.skip_nodes:
            return
        if isinstance(node.op, ast.Not):
            s, e = self.span(node)
            self.add(node, s, e, b"(" + self.text(node.operand) + b")", "not")
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if id(node) in self.skip_nodes:
            return
        s, e = self.span(node)
        v = node.value
        if isinstance(v, bool):
            self.add(node, s, e, str(not v), "const")
        elif isinstance(v, int):
            self.add(node, s, e, str(v + 1), "const")
            if v == 1:
                self.add(node, s, e, "0", "const")
        elif isinstance(v, str) and "->" in v and re.fullmatch(r"[a-zA-Z,.>\- ]+", v):
            lhs, rhs = v.split("->")
            if len(rhs) >= 2:
                self.add(node, s, e, repr(f"{lhs}->{rhs[:-2]}{rhs[-1]}{rhs[-2]}"), "transpose")

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if id(node) in self.skip_nodes:
            return
        if isinstance(node.slice, ast.Name):
            s, e = self.span(node.slice)
            self.add(node, s, e, self.text(node.slice) + b" + 1", "index")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if id(node) in self.skip_nodes:
            return
        if node.attr in _TRANSPOSE_ATTRS and isinstance(node.ctx, ast.Load):
            s, e = self.span(node)
            self.add(node, s, e, self.text(node.value), "transpose")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if id(node) in self.skip_nodes:
            return
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")
        if isinstance(f, ast.Attribute) and name in _TRANSPOSE_METHODS:
            s, e = self.span(node)
            self.add(node, s, e, self.text(f.value), "transpose")
        if name in _SWAP_CALLS:
            i, j = _SWAP_CALLS[name]
            if len(node.args) > j and not any(isinstance(a, ast.Starred) for a in node.args):
                ai, aj = node.args[i], node.args[j]
                (si, ei), (sj, ej) = self.span(ai), self.span(aj)
                repl = self.src[si:ei]
                new = self.src[sj:ej] + self.src[ei:sj] + repl
                self.add(node, si, ej, new, "swap")
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        if id(node) in self.skip_nodes:
            return
        if type(node.op) in _AUG_SWAP:
            tok, repl = _AUG_SWAP[type(node.op)]
            a, b = self.span(node.target)[1], self.span(node.value)[0]
            pos = self.find_token(a, b, tok)
            if pos is not None:
                self.add(node, pos, pos + len(tok), repl, "augassign")
        self.generic_visit(node)


def mutants_of(root: Path, rel: str) -> list[Mutant]:
    src = (root / PACKAGE / rel).read_bytes()
    collector = _Collector(rel, src)
    collector.visit(ast.parse(src))
    out, seen = [], set()
    for m in collector.mutants:
        if m.key in seen:  # the same change twice in one function: keep one
            continue
        seen.add(m.key)
        new = src[: m.start] + m.replacement + src[m.end :]
        try:
            compile(new, rel, "exec")
        except SyntaxError:
            continue
        out.append(m)
    return out


def target_files(root: Path, only: list[str] | None) -> list[str]:
    rels = []
    for d in TARGET_DIRS:
        for p in sorted((root / PACKAGE / d).glob("*.py")):
            rel = f"{d}/{p.name}"
            if only is None or rel in only:
                rels.append(rel)
    return rels


# ----------------------------------------------------------------------------------------------
# Running (fork server)
# ----------------------------------------------------------------------------------------------


def _child_run(workdir: Path, args: list[str], log: Path) -> None:
    """In a forked child: run pytest on the snapshot in ``workdir``, exit with its status."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(workdir)
        sys.path[:] = [str(workdir), str(workdir / "tests")] + [
            p for p in sys.path if p and Path(p).resolve() != ROOT
        ]
        import hypothesis
        import pytest
        import torch

        torch.set_num_threads(1)
        hypothesis.settings.register_profile(
            "mutation", database=None, derandomize=True, print_blob=False
        )
        hypothesis.settings.load_profile("mutation")
        if not args:
            print("no tests selected")
            os._exit(4)
        code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", *args])
        sys.stdout.flush()
        os._exit(int(code))
    except BaseException:  # anything here must end the child
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        os._exit(3)


@dataclass
class Outcome:
    mutant: Mutant | None
    status: str  # killed / survived / timeout / error
    seconds: float
    detail: str = ""


def _failure_summary(log: Path) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    m = re.search(r"^(FAILED|ERROR) (\S+)", text, re.M)
    if m:
        return m.group(2)
    m = re.search(r"^E\s+(.+)$", text, re.M)
    return m.group(1)[:120] if m else text.strip().splitlines()[-1][:120] if text.strip() else ""


class Pool:
    """Up to ``workers`` forked children, each on its own snapshot of the repository."""

    def __init__(self, snapshots: list[Path], logdir: Path):
        self.free = list(snapshots)
        self.logdir = logdir
        self.running: dict[int, tuple] = {}

    def start(self, job_id: int, mutant: Mutant | None, args: list[str], timeout: float) -> None:
        workdir = self.free.pop()
        target = None
        if mutant is not None:
            target = workdir / PACKAGE / mutant.rel
            src = target.read_bytes()
            target.write_bytes(src[: mutant.start] + mutant.replacement + src[mutant.end :])
        log = self.logdir / f"{job_id}.log"
        pid = os.fork()
        if pid == 0:
            _child_run(workdir, args, log)
        orig = src if mutant is not None else None
        self.running[pid] = (job_id, mutant, workdir, target, orig, time.time(), timeout, log)

    def wait_one(self) -> tuple[int, Outcome]:
        while True:
            for pid, (job_id, _m, _w, _t, _o, t0, timeout, log) in list(self.running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0 and time.time() - t0 > timeout:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    return job_id, self._finish(pid, "timeout", "")
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    if code == 0:
                        verdict = "survived"
                    elif code in (1, 2, 3, 4):
                        # failed / interrupted (import error) / crashed / the selected test
                        # ids no longer collect (the mutant broke module-level code)
                        verdict = "killed"
                    else:
                        verdict = f"error (exit {code})"
                    return job_id, self._finish(pid, verdict, _failure_summary(log))
            time.sleep(0.05)

    def _finish(self, pid: int, verdict: str, detail: str) -> Outcome:
        _job, mutant, workdir, target, orig, t0, _timeout, _log = self.running.pop(pid)
        if target is not None:
            target.write_bytes(orig)
        self.free.append(workdir)
        return Outcome(mutant, verdict, time.time() - t0, detail)


def collect_ids(snapshot: Path, logdir: Path) -> dict[str, list[str]]:
    """Node ids of every test file used by a selection (collected in a forked child)."""
    files = sorted({f for sel in SELECTIONS.values() for f, _ in sel if (snapshot / f).exists()})
    out_file = logdir / "collected.txt"
    pid = os.fork()
    if pid == 0:
        _child_run(snapshot, ["--collect-only", *files], out_file)
    os.waitpid(pid, 0)
    ids: dict[str, list[str]] = defaultdict(list)
    for line in out_file.read_text().splitlines():
        if "::" in line and line.startswith("tests/"):
            ids[line.split("::")[0]].append(line.strip())
    return ids


def node_ids(rel: str, collected: dict[str, list[str]], deselect: set[str]) -> list[str]:
    chosen = []
    for file, words in selection_for(rel):
        for nid in collected.get(file, []):
            if any(x in nid for x in EXCLUDE) or nid in deselect:
                continue
            if words is None or any(w in nid for w in words):
                chosen.append(nid)
    return chosen


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def write_report(path: Path, outcomes: list[Outcome], info: dict) -> None:
    scored = [o for o in outcomes if o.status in ("killed", "survived", "timeout")]
    killed = sum(o.status in ("killed", "timeout") for o in scored)
    survivors = [o for o in scored if o.status == "survived"]
    equivalent = [o for o in survivors if _explanation(o.mutant)]
    score = 100.0 * killed / max(len(scored), 1)
    score_eq = 100.0 * killed / max(len(scored) - len(equivalent), 1)
    lines = [
        "# Mutation testing",
        "",
        f"Generated by `python scripts/mutation_test.py {info['argv']}` on "
        f"{time.strftime('%Y-%m-%d')} in {info['seconds'] / 60:.1f} min with {info['workers']} "
        f"workers (torch {info['torch']}).",
        "",
        f"Mutants generated: {info['total']} in {len(info['per_file'])} files; "
        + (
            f"**run: a seeded random sample of {len(outcomes)}** (seed {info['seed']}, "
            "stratified by file: every file gets its share, at least 3)."
            if info["sampled"]
            else f"run: all {len(outcomes)}."
        ),
        "",
        f"**Score: {killed} / {len(scored)} killed = {score:.1f}%**; counting the "
        f"{len(equivalent)} equivalent survivors out (they cannot be killed): "
        f"**{score_eq:.1f}%**.",
        "",
        "Tests run per target file (`-x`, fast selections; the generic fullgraph compile tests "
        "excluded, see `SELECTIONS` and `EXCLUDE` in the script):",
        "",
    ]
    for rel, n in info["selection_sizes"].items():
        lines.append(
            f"- `{rel}`: {n} tests, {info['baseline_seconds'].get(rel, 0):.0f} s unmutated"
        )
    if info["deselected"]:
        lines += ["", "Deselected because they fail on the unmutated code:", ""]
        lines += [f"- `{d}`" for d in sorted(info["deselected"])]
    lines += ["", "## Per file", "", "| file | mutants | run | killed | survived | score |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    by_file: dict[str, list[Outcome]] = defaultdict(list)
    for o in scored:
        by_file[o.mutant.rel].append(o)
    for rel, total in info["per_file"].items():
        os_ = by_file.get(rel, [])
        k = sum(o.status != "survived" for o in os_)
        pct = f"{100 * k / len(os_):.0f}%" if os_ else "-"
        lines.append(f"| `{rel}` | {total} | {len(os_)} | {k} | {len(os_) - k} | {pct} |")
    ops = Counter(o.mutant.op for o in scored)
    ops_k = Counter(o.mutant.op for o in scored if o.status != "survived")
    lines += ["", "## Per operator", "", "| operator | run | killed |", "|---|---|---|"]
    lines += [f"| {op} | {n} | {ops_k[op]} |" for op, n in sorted(ops.items())]
    lines += ["", f"## Survivors ({len(survivors)})", ""]
    if survivors:
        lines += ["| id | where | mutation | why it survives |", "|---|---|---|---|"]
        for o in survivors:
            m = o.mutant
            why = _explanation(m) or "**NOT EXPLAINED: needs a test or an argument**"
            h = hashlib.sha1(m.key.encode()).hexdigest()[:8]
            lines.append(
                f"| `{h}` | `{m.rel}:{m.line}` `{m.qualname}` | {m.op}: `{m.description}` | {why} |"
            )
    errors = [o for o in outcomes if o.status not in ("killed", "survived", "timeout")]
    if errors:
        lines += ["", f"## Runner errors ({len(errors)}, not scored)", ""]
        lines += [f"- `{o.mutant.key}`: {o.status} {o.detail}" for o in errors]
    lines += ["", "## All mutants run", "", "| status | where | mutation | first failing test |",
              "|---|---|---|---|"]  # fmt: skip
    for o in outcomes:
        m = o.mutant
        lines.append(
            f"| {o.status} | `{m.rel}:{m.line}` | {m.op}: `{m.description[:80]}` | "
            f"{o.detail[:100]} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).replace("\\|", "|") + "\n")


def refresh_explanations(path: Path) -> int:
    """Rewrite the "why it survives" column of a report's survivors from :data:`EQUIVALENT`
    (by id) and the score counting the equivalent survivors out; the outcomes are not
    rerun, so the report stays the record of the run it states."""
    lines = path.read_text().split("\n")
    row = re.compile(r"^\| `([0-9a-f]{8})` \| (.*) \| (.*) \| (.*) \|$")
    n_eq = 0
    for i, line in enumerate(lines):
        m = row.match(line)
        if m:
            why = EQUIVALENT.get(m.group(1)) or "**NOT EXPLAINED: needs a test or an argument**"
            n_eq += m.group(1) in EQUIVALENT
            lines[i] = f"| `{m.group(1)}` | {m.group(2)} | {m.group(3)} | {why} |"
    score = re.compile(r"^\*\*Score: (\d+) / (\d+) killed = ([0-9.]+)%\*\*; counting the .*$")
    for i, line in enumerate(lines):
        m = score.match(line)
        if m:
            killed, scored = int(m.group(1)), int(m.group(2))
            lines[i] = (
                f"**Score: {killed} / {scored} killed = {m.group(3)}%**; counting the {n_eq} "
                "equivalent survivors out (they cannot be killed): "
                f"**{100.0 * killed / max(scored - n_eq, 1):.1f}%**."
            )
            lines.insert(
                i + 1,
                f"\nSurvivors' explanations refreshed from `EQUIVALENT` on "
                f"{time.strftime('%Y-%m-%d %H:%M')} (`--explain`; outcomes not rerun).",
            )
            break
    path.write_text("\n".join(lines))
    print(f"{n_eq} equivalent survivors explained; wrote {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def _snapshot(dest: Path) -> None:
    dest.mkdir(parents=True)
    shutil.copytree(ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "setup.cfg", "pytest.ini", "conftest.py"):
        if (ROOT / f).exists():
            shutil.copy(ROOT / f, dest / f)


def sample_mutants(by_file: dict[str, list[Mutant]], n: int, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    total = sum(len(v) for v in by_file.values())
    chosen = []
    for ms in by_file.values():
        k = min(len(ms), max(3, round(n * len(ms) / total)))
        chosen += rng.sample(ms, k)
    rng.shuffle(chosen)
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", type=int, default=200, help="mutants to run (0 or --all: all)")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", nargs="*", help="targets, e.g. functional/cp_linear.py")
    ap.add_argument("--timeout-factor", type=float, default=3.0)
    ap.add_argument("--budget-min", type=float, default=20.0, help="stop starting mutants after")
    ap.add_argument("--list", action="store_true", help="only count the mutants")
    ap.add_argument("--show", help="print the mutants whose id contains this text")
    ap.add_argument("--only", nargs="*", help="run just these mutants (8-hex ids)")
    ap.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "mutation.md")
    ap.add_argument(
        "--explain",
        type=Path,
        help="only refresh the survivors' explanations (and the equivalent-excluded score) of "
        "an existing report from the current EQUIVALENT table; nothing is rerun",
    )
    args = ap.parse_args()
    if args.explain:
        return refresh_explanations(args.explain)

    rels = target_files(ROOT, args.files)
    by_file = {rel: mutants_of(ROOT, rel) for rel in rels}
    total = sum(len(v) for v in by_file.values())
    if args.list or args.show:
        for rel, ms in by_file.items():
            print(
                f"{len(ms):5d}  {rel}  "
                + " ".join(f"{k}={v}" for k, v in sorted(Counter(m.op for m in ms).items()))
            )
            for m in ms:
                h = hashlib.sha1(m.key.encode()).hexdigest()[:8]
                if args.show and (args.show in m.key or args.show == h):
                    print(f"   {h} {m.rel}:{m.line} {m.key}")
        print(f"{total} mutants")
        return 0

    if args.only:
        ids = set(args.only)
        by_file = {
            rel: [m for m in ms if hashlib.sha1(m.key.encode()).hexdigest()[:8] in ids]
            for rel, ms in by_file.items()
        }
        by_file = {rel: ms for rel, ms in by_file.items() if ms}
        args.all = True
    sampled = not args.all and 0 < args.sample < total
    mutants = sample_mutants(by_file, args.sample, args.seed) if sampled else [
        m for ms in by_file.values() for m in ms
    ]  # fmt: skip

    # Import the heavy dependencies once, before forking (not kronlayers: children import
    # their own mutated copy). No torch op runs here, so no thread pool exists at fork.
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import torch
    import torch._dynamo
    import torch.export
    import torch.utils.flop_counter

    for optional in ("tensorly", "tltorch", "numpy"):
        try:
            __import__(optional)
        except ImportError:
            pass

    tmp = Path(tempfile.mkdtemp(prefix="kronlayers-mutation-"))
    logdir = tmp / "logs"
    logdir.mkdir()
    snapshots = [tmp / f"w{k}" for k in range(args.workers)]
    for s in snapshots:
        _snapshot(s)
    start = time.time()
    print(f"{total} mutants, running {len(mutants)}; work dir {tmp}", flush=True)
    collected = collect_ids(snapshots[0], logdir)

    # Baseline per target: every selected test must pass on the unmutated code; the ones
    # that fail are reported and deselected.
    pool = Pool(snapshots, logdir)
    needed = sorted({m.rel for m in mutants})
    deselect: set[str] = set()
    baseline: dict[str, float] = {}
    for rel in needed:
        for _ in range(5):  # drop failing tests one by one (-x stops at the first)
            ids = node_ids(rel, collected, deselect)
            pool.start(-1, None, ids, timeout=1800)
            _, out = pool.wait_one()
            if out.status == "survived":
                baseline[rel] = out.seconds
                break
            if "::" in out.detail:
                deselect.add(out.detail)
                print(f"baseline {rel}: deselecting failing {out.detail}", flush=True)
            else:
                print(f"baseline {rel}: {out.status} {out.detail}", flush=True)
                break
        print(f"baseline {rel}: {len(node_ids(rel, collected, deselect))} tests, "
              f"{baseline.get(rel, float('nan')):.1f} s", flush=True)  # fmt: skip

    outcomes: list[Outcome] = []
    queue = [m for m in mutants if m.rel in baseline]
    pending = 0
    job = 0
    budget = args.budget_min * 60
    while queue or pending:
        while queue and pool.free and time.time() - start < budget:
            m = queue.pop(0)
            timeout = max(60.0, args.timeout_factor * baseline[m.rel])
            pool.start(job, m, node_ids(m.rel, collected, deselect), timeout)
            job += 1
            pending += 1
        if not pending:
            break
        _, out = pool.wait_one()
        pending -= 1
        outcomes.append(out)
        print(f"[{len(outcomes)}/{len(mutants)}] {out.status:9s} {out.seconds:5.1f}s "
              f"{out.mutant.rel}:{out.mutant.line} {out.mutant.op}: "
              f"{out.mutant.description[:70]}", flush=True)  # fmt: skip
        if time.time() - start >= budget and queue:
            print(f"budget of {args.budget_min} min reached: {len(queue)} mutants not run")
            queue.clear()

    info = {
        "argv": " ".join(sys.argv[1:]),
        "seconds": time.time() - start,
        "workers": args.workers,
        "torch": torch.__version__,
        "total": total,
        "per_file": {rel: len(ms) for rel, ms in by_file.items()},
        "sampled": sampled or len(outcomes) < len(mutants),
        "seed": args.seed,
        "selection_sizes": {rel: len(node_ids(rel, collected, deselect)) for rel in needed},
        "baseline_seconds": baseline,
        "deselected": deselect,
    }
    write_report(args.out, outcomes, info)
    shutil.rmtree(tmp, ignore_errors=True)
    scored = [o for o in outcomes if o.status in ("killed", "survived", "timeout")]
    killed = sum(o.status != "survived" for o in scored)
    print(f"score {killed}/{len(scored)} = {100 * killed / max(len(scored), 1):.1f}%; "
          f"wrote {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
