"""Reliability: higher-order derivatives, torch.func, meta tensors, half precision, dynamic
shapes (``torch.export`` / ``torch.compile(dynamic=True)``), FLOP accounting and error paths.

Generic tests run over every registered layer (``layer_specs.SPECS``); the CP kernels
(``cp_linear``, ``cp_conv2d``) get exact checks of their own.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_specs import SPECS, dense_reference
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.flop_counter import FlopCounterMode

import kronlayers
from kronlayers.functional import (
    CPConv2dFunction,
    CPLinearFunction,
    cp_conv2d,
    cp_conv2d_flops,
    cp_linear,
    cp_linear_flops,
    kronecker_linear,
    tucker_conv2d,
)
from kronlayers.functional._amp import balance_cp_stages
from kronlayers.functional._dispatch import force_kernel
from kronlayers.functional.cp_conv2d import CPConv2dConfig, cp_conv2d_kernel
from kronlayers.functional.cp_linear import _khatri_rao_cost, _modewise_in, _modewise_out, make_plan
from kronlayers.registry import registered_layers

F64 = torch.float64
ids = [s.id for s in SPECS]
CP_LAYERS = ("CPLinear", "CPConv2d", "LowRankLinear")


@pytest.fixture(params=SPECS, ids=ids)
def spec(request):
    return request.param


def _factors(shape, rank, dtype=F64, scale=1.0):
    return [(torch.randn(d, rank, dtype=dtype) * scale).requires_grad_(True) for d in shape]


def test_specs_cover_the_registry():
    assert {s.cls for s in SPECS} == set(registered_layers())


# --- double backward ---------------------------------------------------------------------

LINEAR_CASES = [
    ((3, 4), (2, 3), 2, "khatri_rao"),
    ((3, 4), (2, 3), 2, "modewise"),
    ((2, 3, 2), (2, 1, 3), 2, "modewise"),  # two saved partial contractions
    ((2, 3, 2), (2, 1, 3), 2, "khatri_rao"),
    ((5,), (4,), 3, "auto"),
]


@pytest.mark.parametrize(("in_shape", "out_shape", "rank", "strategy"), LINEAR_CASES)
def test_cp_linear_gradgradcheck(in_shape, out_shape, rank, strategy):
    a, b = _factors(in_shape, rank), _factors(out_shape, rank)
    x = torch.randn(3, math.prod(in_shape), dtype=F64, requires_grad=True)
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    n_in = len(in_shape)

    def fn(x, bias, *fs):
        return cp_linear(x, list(fs[:n_in]), list(fs[n_in:]), bias, strategy=strategy)

    assert gradcheck(fn, (x, bias, *a, *b))
    assert gradgradcheck(fn, (x, bias, *a, *b))


@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])
@pytest.mark.parametrize("trainable", ["x", "a0", "a1", "b1", "x+b0"])
def test_cp_linear_gradgradcheck_subsets(strategy, trainable):
    # Each subset switches different parts of the backward off (needs_input_grad).
    a, b = _factors((2, 3, 2), 2), _factors((2, 3), 2)
    x = torch.randn(2, 12, dtype=F64)
    named = {"x": x, "a0": a[0], "a1": a[1], "b0": b[0], "b1": b[1]}
    for t in (x, *a, *b):
        t.requires_grad_(False)
    chosen = [named[k] for k in trainable.split("+")]

    def fn(*ts):
        sub = dict(zip(trainable.split("+"), ts, strict=True))
        get = lambda k: sub.get(k, named[k])  # noqa: E731
        return cp_linear(get("x"), [get("a0"), get("a1"), a[2]], [get("b0"), get("b1")],
                         strategy=strategy)  # fmt: skip

    inputs = tuple(t.detach().requires_grad_(True) for t in chosen)
    assert gradgradcheck(fn, inputs)


CONV_CASES = [
    dict(stride=1, padding=1),
    dict(stride=2, padding=1),
    dict(stride=(2, 1), padding="valid", dilation=2),
    dict(padding="same", kernel=(2, 3)),  # asymmetric padding of u
]


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
def test_cp_conv2d_gradgradcheck(case):
    case = dict(case)
    kh, kw = case.pop("kernel", (3, 3))
    rank = 2
    ins, outs = _factors((2, 2), rank), _factors((3,), rank)
    ks = _factors((kh, kw), rank)
    bias = torch.randn(3, dtype=F64, requires_grad=True)
    x = torch.randn(2, 4, 5, 5, dtype=F64, requires_grad=True)

    def fn(x, bias, i0, i1, o, fh, fw):
        return cp_conv2d(x, [i0, i1], [o], (fh, fw), bias, **case)

    args = (x, bias, *ins, *outs, *ks)
    # Fast mode: random projections of the Jacobians (any mismatch is caught with
    # probability 1), ~10x cheaper than the full ones for convolutions.
    assert gradcheck(fn, args, fast_mode=True)
    assert gradgradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("trainable", [(0,), (2,), (4,), (5,), (0, 3), (0, 4)])
@pytest.mark.parametrize("stride", [1, 2])
def test_cp_conv2d_gradgradcheck_subsets(trainable, stride):
    # x, in_factors[0], kh, kw alone; x with out_factors[0] or kh (input factors frozen: the
    # backward must still differentiate u with respect to x).
    ins, outs, ks = _factors((3,), 2), _factors((2,), 2), _factors((3, 2), 2)
    x = torch.randn(1, 3, 5, 5, dtype=F64)
    tensors = [x, None, ins[0], outs[0], ks[0], ks[1]]

    def fn(*ts):
        args = [a.detach() if a is not None else None for a in tensors]
        for k, t in zip(trainable, ts, strict=True):
            args[k] = t
        x_, _, i, o, fh, fw = args
        return cp_conv2d(x_, [i], [o], (fh, fw), stride=stride, padding=1)

    inputs = tuple(tensors[k].detach().requires_grad_(True) for k in trainable)
    assert gradgradcheck(fn, inputs, fast_mode=True)


def test_gradient_penalty_matches_dense(spec):
    """``||dL/dx||^2`` (a gradient penalty): second-order gradients for every parameter, equal
    to those through the dense weight; never a silent ``None``."""
    layer = spec.make(dtype=F64)
    params = dict(layer.named_parameters())
    x = torch.randn(spec.input_shape, dtype=F64, requires_grad=True)

    def penalty_grads(forward):
        (gx,) = torch.autograd.grad(forward(x).tanh().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [x, *params.values()], allow_unused=True)

    got = penalty_grads(layer)
    ref = penalty_grads(lambda t: dense_reference(layer, t))
    for name, g, r in zip(["input", *params], got, ref, strict=True):
        if name == "bias":  # the penalty does not depend on the bias through a linear map...
            if r is None:
                continue
        assert g is not None, f"{spec.id}: no second-order gradient for {name}"
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10, msg=f"{spec.id}: {name}")


def test_gradient_penalty_on_parameters_fills_grad(spec):
    # The case of the issue: .grad of the factors must not stay None after the penalty.
    layer = spec.make(dtype=F64)
    x = torch.randn(spec.input_shape, dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    for name, p in layer.named_parameters():
        if name != "bias":
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# --- torch.func --------------------------------------------------------------------------


def test_vmap_and_jacrev(spec):
    layer = spec.make(dtype=F64)
    x = torch.randn(spec.input_shape, dtype=F64)
    xs = torch.stack([x, 2 * x, -x])
    cp = spec.cls_name in CP_LAYERS
    try:
        out = torch.func.vmap(layer)(xs)
        jac = torch.func.jacrev(layer)(x)
    except RuntimeError as e:  # raises clearly (PyTorch names vmap), never silently wrong
        assert not cp, f"{spec.id}: {e}"
        assert "vmap" in str(e)
        return
    torch.testing.assert_close(out, torch.stack([layer(t) for t in xs]), rtol=1e-10, atol=1e-12)
    ref = torch.func.jacrev(lambda t: dense_reference(layer, t))(x)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "kernel"),
    [
        ("CPLinear", "function"),
        ("CPLinear", "ops"),
        ("CPLinear", "dense"),
        ("CPConv2d", "function"),
        ("CPConv2d", "dense"),
        ("TuckerConv2d", "function"),
        ("TuckerConv2d", "dense"),
    ],
)
def test_per_sample_grads_and_hessian_via_jacrev(name, kernel):
    spec = next(s for s in SPECS if s.cls_name == name)
    layer = spec.make(dtype=F64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    xs = torch.randn(spec.input_shape, dtype=F64)

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x.unsqueeze(0),)).pow(2).sum()

    with force_kernel(kernel):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
        for i in range(xs.shape[0]):
            ref = torch.func.grad(loss)(params, xs[i])
            for k in params:
                torch.testing.assert_close(per_sample[k][i], ref[k], rtol=1e-10, atol=1e-12)
        # Reverse-over-reverse: a Hessian through the differentiable backward.
        x0 = xs[:1] if name == "CPLinear" else xs[:1, :, :4, :4]
        hess = torch.func.jacrev(torch.func.jacrev(lambda t: layer(t).tanh().sum()))(x0)
        ref = torch.func.jacrev(
            torch.func.jacrev(lambda t: dense_reference(layer, t).tanh().sum())
        )(x0)
        torch.testing.assert_close(hess, ref, rtol=1e-9, atol=1e-11)
        if kernel in ("ops", "dense"):
            # Plain ops: forward-mode AD works too.
            jac = torch.func.jacfwd(layer)(x0)
            torch.testing.assert_close(
                jac, torch.func.jacrev(lambda t: dense_reference(layer, t))(x0)
            )
        else:
            with pytest.raises(RuntimeError, match="jvp"):
                torch.func.jacfwd(layer)(x0)


# --- meta device -------------------------------------------------------------------------


@pytest.mark.parametrize("grad", ["grad", "no_grad", "frozen"])
def test_meta_shape_inference(spec, grad):
    expected = dense_reference(spec.make(), torch.randn(spec.input_shape)).shape
    layer = spec.make(device="meta")
    x = torch.empty(spec.input_shape, device="meta")
    if grad == "frozen":
        layer.requires_grad_(False)
    with torch.set_grad_enabled(grad != "no_grad"):
        y = layer(x)
    assert y.is_meta and y.shape == expected


def test_meta_shape_inference_under_autocast(spec):
    expected = dense_reference(spec.make(), torch.randn(spec.input_shape)).shape
    layer = spec.make(device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.empty(spec.input_shape, device="meta"))
    assert y.is_meta and y.shape == expected


@pytest.mark.parametrize("where", ["params", "input"])
def test_meta_mixed_with_cpu_raises(spec, where):
    layer = spec.make(device="meta" if where == "params" else "cpu")
    x = torch.ones(spec.input_shape, device="cpu" if where == "params" else "meta")
    for ctx in (torch.enable_grad(), torch.no_grad()):
        with ctx, pytest.raises(ValueError, match="must be on the input's device"):
            layer(x)


def _param_arg_name(param_name: str) -> str:
    # "in_factors.0" -> "in_factors[0]"; functional arguments are named like the parameters.
    base, _, k = param_name.partition(".")
    return f"{base}[{k}]" if k else base


_PARAMS = [(s, name) for s in SPECS for name, _ in s.make(device="meta").named_parameters()]


@pytest.mark.parametrize(("spec", "name"), _PARAMS, ids=[f"{s.id}-{n}" for s, n in _PARAMS])
def test_meta_mixed_names_the_argument(spec, name):
    layer = spec.make()
    params = {n: (p.to("meta") if n == name else p) for n, p in layer.named_parameters()}
    x = torch.randn(spec.input_shape)
    with pytest.raises(ValueError, match="must be on the input's device") as info:
        torch.func.functional_call(layer, params, (x,))
    arg = _param_arg_name(name)
    # CPConv2d passes kh_factor / kw_factor as kernel_factors[0] / [1].
    aliases = {"kh_factor": "kernel_factors[0]", "kw_factor": "kernel_factors[1]"}
    assert aliases.get(arg, arg) in str(info.value)


def _functional_calls():
    """Each functional form with valid CPU arguments, as (name, fn, {arg name: tensor})."""
    r = 2
    kron = [torch.randn(2, 3, 4), torch.randn(2, 5, 6)]
    ins, outs = [torch.randn(4, r), torch.randn(6, r)], [torch.randn(3, r), torch.randn(5, r)]
    conv_in, conv_out = [torch.randn(3, r)], [torch.randn(4, r)]
    ks = [torch.randn(3, r), torch.randn(3, r)]
    core, t_in, t_out = torch.randn(3, 2, 3, 3), torch.randn(3, 2), torch.randn(4, 3)
    x_lin, x_conv = torch.randn(5, 24), torch.randn(2, 3, 6, 6)
    return [
        (
            "kronecker_linear",
            lambda a: kronecker_linear(a["input"], [a["factors[0]"], a["factors[1]"]], a["bias"]),
            {"input": x_lin, "factors[0]": kron[0], "factors[1]": kron[1],
             "bias": torch.randn(15)},
        ),
        (
            "cp_linear",
            lambda a: cp_linear(a["input"], [a["in_factors[0]"], a["in_factors[1]"]],
                                [a["out_factors[0]"], a["out_factors[1]"]], a["bias"]),
            {"input": x_lin, "in_factors[0]": ins[0], "in_factors[1]": ins[1],
             "out_factors[0]": outs[0], "out_factors[1]": outs[1], "bias": torch.randn(15)},
        ),
        (
            "cp_conv2d",
            lambda a: cp_conv2d(a["input"], [a["in_factors[0]"]], [a["out_factors[0]"]],
                                (a["kernel_factors[0]"], a["kernel_factors[1]"]), a["bias"],
                                padding=1),
            {"input": x_conv, "in_factors[0]": conv_in[0], "out_factors[0]": conv_out[0],
             "kernel_factors[0]": ks[0], "kernel_factors[1]": ks[1], "bias": torch.randn(4)},
        ),
        (
            "tucker_conv2d",
            lambda a: tucker_conv2d(a["input"], a["core"], a["in_factor"], a["out_factor"],
                                    a["bias"], padding=1),
            {"input": x_conv, "core": core, "in_factor": t_in, "out_factor": t_out,
             "bias": torch.randn(4)},
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _functional_calls(), ids=lambda c: c[0])
def test_functional_forms_meta(case):
    _, fn, args = case
    expected = fn(args).shape
    meta = {k: v.to("meta") for k, v in args.items()}
    y = fn(meta)
    assert y.is_meta and y.shape == expected
    for name in args:
        if name == "input":
            continue
        pattern = re.escape(name) + " must be on the input"
        with pytest.raises(ValueError, match=pattern):
            fn(dict(args, **{name: args[name].to("meta")}))
        with pytest.raises(ValueError, match=pattern):
            fn(dict(meta, **{name: args[name]}))


# --- half precision ----------------------------------------------------------------------


def _unbalanced_linear(dtype):
    rank = 3
    a = [torch.randn(4, rank) * 5e2, torch.randn(5, rank) * 5e2]  # K_in columns ~1e6
    b = [torch.randn(2, rank) * 1e-3, torch.randn(3, rank) * 1e-3]
    x = torch.randn(8, 20)
    w = torch.einsum("pr,qr,ir,jr->pqij", *b, *a).reshape(6, 20)
    return x, a, b, w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cp_linear_half_precision_balances_factors(dtype):
    x, a, b, w = _unbalanced_linear(dtype)
    ref = x.double() @ w.double().t()
    xh, ah, bh = x.to(dtype), [f.to(dtype) for f in a], [f.to(dtype) for f in b]
    dense = F.linear(xh, w.to(dtype))
    assert dense.isfinite().all()
    if dtype == torch.float16:  # the issue: the unbalanced kernel overflows the core
        plan = make_plan((4, 5), (2, 3), 3, 8, "auto")
        raw = CPLinearFunction.apply(xh, None, plan, *ah, *bh)[0]
        assert not raw.isfinite().all()
    for strategy in ("khatri_rao", "modewise"):
        y = cp_linear(xh, ah, bh, strategy=strategy)
        assert y.dtype == dtype and y.isfinite().all()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        dense_err = ((dense.double() - ref).norm() / ref.norm()).item()
        assert err < 10 * dense_err + 1e-3

    # Gradients flow to the original (unbalanced) factors: finite and equal, to half
    # precision, to the float64 ones (a mean: these true gradients fit in float16).
    def grads(dt):
        ts = [t.detach().to(dt).requires_grad_(True) for t in (xh, *ah, *bh)]
        cp_linear(ts[0], ts[1:3], ts[3:]).to(F64 if dt == F64 else torch.float32).pow(
            2
        ).mean().backward()
        return [t.grad for t in ts]

    for g, g64 in zip(grads(dtype), grads(F64), strict=True):
        assert g.dtype == dtype and g.isfinite().all()
        tol = 0.01 if dtype == torch.float16 else 0.05
        assert ((g.double() - g64).norm() / g64.norm()).item() < tol


def test_cp_linear_autocast_fp16_balances():
    x, a, b, _ = _unbalanced_linear(torch.float16)
    with torch.autocast("cpu", dtype=torch.float16):
        y = cp_linear(x, a, b)
    assert y.dtype == torch.float16 and y.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cp_full_precision_is_bit_identical(dtype):
    x, a, b, _ = _unbalanced_linear(dtype)
    x, a, b = x.to(dtype), [f.to(dtype) for f in a], [f.to(dtype) for f in b]
    for strategy in ("khatri_rao", "modewise"):
        plan = make_plan((4, 5), (2, 3), 3, 8, strategy)
        ref = CPLinearFunction.apply(x, None, plan, *a, *b)[0]
        assert torch.equal(cp_linear(x, a, b, strategy=strategy), ref)
    ins, outs, ks = (
        [torch.randn(4, 2, dtype=dtype) * 1e3],
        [torch.randn(3, 2, dtype=dtype)],
        [torch.randn(3, 2, dtype=dtype) * 1e-3, torch.randn(3, 2, dtype=dtype)],
    )
    xc = torch.randn(2, 4, 5, 5, dtype=dtype)
    config = CPConv2dConfig((1, 1), (1, 1, 1, 1), (1, 1), 1)
    ref = CPConv2dFunction.apply(xc, None, config, *ins, *outs, *ks)[0]
    assert torch.equal(cp_conv2d(xc, ins, outs, ks, padding=1, path="factorized"), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cp_conv2d_half_precision_balances_factors(dtype):
    rank = 3
    ins = [torch.randn(8, rank) * 1e4]  # u ~ 1e5: beyond float16
    ks = (torch.randn(3, rank) * 1e2, torch.randn(3, rank) * 1e-2)
    outs = [torch.randn(6, rank) * 1e-4]
    x = torch.randn(2, 8, 6, 6)
    w = cp_conv2d_kernel(ins, outs, ks)
    ref = F.conv2d(x.double(), w.double(), padding=1)
    h = lambda fs: [f.to(dtype) for f in fs]  # noqa: E731
    dense = F.conv2d(x.to(dtype), w.to(dtype), padding=1)
    assert dense.isfinite().all()
    if dtype == torch.float16:
        config = CPConv2dConfig((1, 1), (1, 1, 1, 1), (1, 1), 1)
        raw = CPConv2dFunction.apply(x.to(dtype), None, config, *h(ins), *h(outs), *h(ks))[0]
        assert not raw.isfinite().all()
    y = cp_conv2d(x.to(dtype), h(ins), h(outs), h(ks), padding=1)
    assert y.dtype == dtype and y.isfinite().all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    dense_err = ((dense.double() - ref).norm() / ref.norm()).item()
    assert err < 10 * dense_err + 1e-3

    def grads(dt):
        fs = [f.detach().to(dt).requires_grad_(True) for f in h([*ins, *outs, *ks])]
        y = cp_conv2d(x.to(dtype).to(dt), fs[:1], fs[1:2], fs[2:], padding=1)
        y.to(F64 if dt == F64 else torch.float32).pow(2).mean().backward()
        return [f.grad for f in fs]

    for g, g64 in zip(grads(dtype), grads(F64), strict=True):
        if g64.abs().max() > 3e4:  # the true gradient itself does not fit in float16
            continue
        assert g.isfinite().all()
        assert ((g.double() - g64).norm() / g64.norm()).item() < 0.05


def test_balance_cp_stages():
    a = [torch.randn(4, 3) * 1e3, torch.randn(5, 3)]
    b = [torch.randn(6, 3) * 1e-3]
    a[0][:, 2] = 0  # a zero term is left alone
    (ba, bb) = balance_cp_stages([a, b], torch.float16)
    # Same weight, per rank term.
    w = torch.einsum("pr,ir,jr->pij", *b, *a)
    wb = torch.einsum("pr,ir,jr->pij", *bb, *ba)
    torch.testing.assert_close(wb, w, rtol=1e-5, atol=1e-6)
    # Column norms: each stage carries sqrt(P_r); within a stage, equal shares.
    p = a[0].norm(dim=0) * a[1].norm(dim=0) * b[0].norm(dim=0)
    for r in range(2):
        for f in ba:
            torch.testing.assert_close(f[:, r].norm(), p[r] ** 0.25, rtol=1e-4, atol=0)
        torch.testing.assert_close(bb[0][:, r].norm(), p[r] ** 0.5, rtol=1e-4, atol=0)
    assert torch.equal(ba[1][:, 2], a[1][:, 2]) and torch.equal(bb[0][:, 2], b[0][:, 2])
    # Full precision: the very same tensor objects.
    same = balance_cp_stages([a, b], torch.float32)
    assert same[0][0] is a[0] and same[1][0] is b[0]
    # Scales beyond float32's exp range leave the term alone (no inf / nan).
    huge = [[torch.full((2, 1), 1e-30)], [torch.full((2, 1), 1e30)], [torch.ones(2, 1)]]
    out = balance_cp_stages(huge, torch.bfloat16)
    assert all(t.isfinite().all() for stage in out for t in stage)


# --- dynamic shapes ----------------------------------------------------------------------


def _other_batch(shape, n):
    return (n, *shape[1:])


def test_export_with_dynamic_batch(spec):
    layer = spec.make()
    x = torch.randn(spec.input_shape)
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    module = program.module()
    for n in (3, 11):
        xn = torch.randn(_other_batch(spec.input_shape, n))
        torch.testing.assert_close(module(xn), layer(xn), rtol=1e-5, atol=1e-5)


def test_compile_dynamic_has_one_graph(spec):
    import torch._dynamo

    layer = spec.make()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    # Batch sizes on both sides of the eager cost model's switch points. Convolutions stay
    # at or below 15: PyTorch's own convolution specializes the batch there (nn.Conv2d
    # compiled with dynamic=True recompiles at 16 as well).
    conv = len(spec.input_shape) == 4
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in (2, 9, 15) if conv else (2, 9, 40, 300):
            x = torch.randn(_other_batch(spec.input_shape, n), requires_grad=True)
            y = compiled(x)
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
            (gx,) = torch.autograd.grad(y.sum(), x)
            (ref,) = torch.autograd.grad(layer(x).sum(), x)
            torch.testing.assert_close(gx, ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_make_plan_keeps_the_cost_model_for_concrete_batches():
    # Small batch: mode-wise; large batch: Khatri-Rao (the cost model, as before).
    small = make_plan((64, 64), (64, 64), 256, 1)
    large = make_plan((64, 64), (64, 64), 256, 4096)
    assert not small.in_khatri_rao and not small.out_khatri_rao
    assert large.in_khatri_rao and large.out_khatri_rao
    with pytest.raises(TypeError, match="strategy"):
        make_plan((2,), (2,), 1, 1, strategy=3)
    with pytest.raises(ValueError, match="strategy"):
        make_plan((2,), (2,), 1, 1, strategy="fast")


# --- FLOP accounting ---------------------------------------------------------------------


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"], out


@pytest.mark.parametrize("strategy", ["khatri_rao", "modewise"])
@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank", "n"),
    [((4, 6), (2, 3, 5), 3, 7), ((2, 3, 4), (3, 5), 4, 2), ((8,), (6,), 2, 5)],
)
def test_cp_linear_flops_counted(in_shape, out_shape, rank, n, strategy):
    """FlopCounterMode counts GEMMs only: forward exactly ``2 N R (H_in + H_out)``; what
    :func:`cp_linear_flops` adds on top is exactly twice the elementwise work (building the
    Khatri-Rao products, or the Hadamard steps of the mode-wise route). The backward's GEMMs
    are exactly twice the forward's (its factor gradients' contractions are elementwise)."""
    a, b = _factors(in_shape, rank, torch.float32), _factors(out_shape, rank, torch.float32)
    h_in, h_out = math.prod(in_shape), math.prod(out_shape)
    x = torch.randn(n, h_in, requires_grad=True)
    bias = torch.randn(h_out, requires_grad=True)
    fwd, _, y = _count(lambda: cp_linear(x, a, b, bias, strategy=strategy))
    gemm = 2 * n * rank * (h_in + h_out)
    assert fwd == gemm
    if strategy == "khatri_rao":
        elementwise = _khatri_rao_cost(in_shape, rank) + _khatri_rao_cost(out_shape, rank)
    else:
        elementwise = (_modewise_in(in_shape, n, rank)[1] - n * h_in * rank) + (
            _modewise_out(out_shape, n, rank)[1] - n * h_out * rank
        )
    assert cp_linear_flops(in_shape, out_shape, rank, n, strategy) == gemm + 2 * elementwise
    bwd, _, _ = _count(lambda: y.backward(torch.randn_like(y)))
    assert bwd == 2 * fwd


@pytest.mark.parametrize(
    "case",
    [dict(stride=1, padding=1), dict(stride=2, padding=1), dict(padding="same"),
     dict(stride=(1, 2), dilation=2)],
    ids=str,
)  # fmt: skip
def test_cp_conv2d_flops_counted(case):
    """Forward: FlopCounterMode's count equals :func:`cp_conv2d_flops` exactly (two channel
    GEMMs and the depthwise convolution; the kernel's outer product is elementwise).

    Backward, by op: GEMMs exactly twice the forward's plus parameter-sized einsums (factor
    gradients through the Khatri-Rao products and the outer product); convolutions: the
    recomputed depthwise output (one forward depthwise), the input gradient (one depthwise
    pass at the input resolution) and the depthwise weight gradient, which FlopCounterMode
    counts ``R`` times too high (its ``convolution_backward`` formula ignores ``groups``)."""
    rank, (kh, kw), (c_in, c_out) = 3, (3, 2), (6, 4)
    ins, outs = _factors((2, 3), rank, torch.float32), _factors((4,), rank, torch.float32)
    ks = _factors((kh, kw), rank, torch.float32)
    n, h, w = 2, 8, 7
    x = torch.randn(n, c_in, h, w, requires_grad=True)
    fwd, fwd_ops, y = _count(lambda: cp_conv2d(x, ins, outs, ks, **case, path="factorized"))
    assert fwd == cp_conv2d_flops(c_in, c_out, (kh, kw), rank, (h, w), n, **case)
    _, ops, _ = _count(lambda: y.backward(torch.randn_like(y)))
    ops = {str(k).split(".")[-1]: v for k, v in ops.items()}
    fwd_ops = {str(k).split(".")[-1]: v for k, v in fwd_ops.items()}
    depthwise = fwd_ops["convolution"]  # 2 N R H_out W_out kh kw
    gemm_fwd = fwd_ops["bmm"]
    param_sized = 4 * rank * (kh * kw + c_in * 2 + c_out * 1)
    assert 2 * gemm_fwd <= ops["bmm"] <= 2 * gemm_fwd + param_sized
    # Input gradient of the depthwise convolution: one pass at u's resolution (H x W here,
    # plus the asymmetric padding of 'same').
    pad_h = pad_w = 0
    if case.get("padding") == "same":
        pad_h, pad_w = (kh - 1) % 2, (kw - 1) % 2
    input_pass = 2 * n * rank * (h + pad_h) * (w + pad_w) * kh * kw
    conv_backward = ops.get("convolution_backward", 0)
    convs = ops.get("convolution", 0)
    weight_grad_counted = rank * depthwise  # FlopCounterMode ignores groups here
    if case.get("stride", 1) == 1:  # input gradient as a flipped forward convolution
        assert convs == depthwise + input_pass
        assert conv_backward == weight_grad_counted
    else:  # convolution_backward computes both
        assert convs == depthwise
        assert conv_backward == weight_grad_counted + depthwise
    # In true FLOPs (the weight gradient is one depthwise pass, not R): <= ~2x forward.
    true_bwd = ops["bmm"] + convs + conv_backward - weight_grad_counted + depthwise
    assert true_bwd <= 2 * fwd + depthwise + input_pass + param_sized


# --- error paths (property tests) --------------------------------------------------------


def _wider(t):
    # One more column in the last dim: another feature count, rank or bias length.
    return torch.cat([t, t[..., :1]], -1)


# (kind, corruption, exception type); the message must name the corrupted argument.
_BAD_TENSOR_VALUES = [
    ("list", lambda t: t.tolist(), TypeError),
    ("none", lambda t: None, TypeError),
    ("int-dtype", lambda t: t.to(torch.int64), TypeError),
    ("double", lambda t: t.double(), TypeError),
    ("meta", lambda t: t.to("meta"), ValueError),
    ("extra-dim", lambda t: t.unsqueeze(0), ValueError),
    ("wider", _wider, ValueError),
]


def _expect(exc, name, fn, args):
    with pytest.raises(exc) as info:
        fn(args)
    assert name in str(info.value), (name, str(info.value))


def _linear_call(args):
    return cp_linear(
        args["input"],
        [args["in_factors[0]"], args["in_factors[1]"]],
        [args["out_factors[0]"]],
        args["bias"],
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
    rank=st.integers(1, 3),
    n=st.integers(0, 3),
    arg=st.sampled_from(["input", "in_factors[0]", "in_factors[1]", "out_factors[0]", "bias"]),
    bad=st.sampled_from(_BAD_TENSOR_VALUES),
)
def test_cp_linear_bad_tensor_arguments_name_the_argument(d, rank, n, arg, bad):
    args = {
        "input": torch.randn(n, d[0] * d[1]),
        "in_factors[0]": torch.randn(d[0], rank),
        "in_factors[1]": torch.randn(d[1], rank),
        "out_factors[0]": torch.randn(d[2], rank),
        "bias": torch.randn(d[2]),
    }
    kind, corrupt, exc = bad
    args[arg] = corrupt(args[arg])
    name = arg
    if arg == "bias" and kind == "none":
        assert _linear_call(args).shape == (n, d[2])  # bias=None is valid
        return
    if arg == "input" and kind == "extra-dim":
        assert _linear_call(args).shape == (1, n, d[2])  # (*, H_in): valid
        return
    if arg == "input" and kind in ("double", "meta"):
        name = "in_factors[0]"  # the factors now disagree with the input
    if arg == "out_factors[0]" and kind == "wider":
        name = "out_factors"  # "in_factors and out_factors must share the rank"
    _expect(exc, name, _linear_call, args)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arg=st.sampled_from(
        ["input", "in_factors[0]", "out_factors[0]", "kernel_factors[0]", "kernel_factors[1]",
         "bias"]
    ),
    bad=st.sampled_from(_BAD_TENSOR_VALUES),
    stride=st.integers(1, 2),
)  # fmt: skip
def test_cp_conv2d_bad_tensor_arguments_name_the_argument(arg, bad, stride):
    r = 2
    args = {
        "input": torch.randn(2, 3, 5, 5),
        "in_factors[0]": torch.randn(3, r),
        "out_factors[0]": torch.randn(4, r),
        "kernel_factors[0]": torch.randn(3, r),
        "kernel_factors[1]": torch.randn(2, r),
        "bias": torch.randn(4),
    }
    kind, corrupt, exc = bad
    if arg == "bias" and kind == "none":
        return
    name = arg
    if arg == "input" and kind in ("double", "meta"):
        name = "in_factors[0]"  # the factors now disagree with the input
    if kind == "wider" and arg in ("out_factors[0]", "kernel_factors[0]", "kernel_factors[1]"):
        name = "rank"  # "all factors must share the rank (dim 1): ... out_factors[0] has 3"
    if arg == "input" and kind == "wider":
        corrupt = lambda t: torch.cat([t, t[:, :1]], 1)  # noqa: E731 - one more channel
    args[arg] = corrupt(args[arg])

    def call(a):
        return cp_conv2d(
            a["input"], [a["in_factors[0]"]], [a["out_factors[0]"]],
            (a["kernel_factors[0]"], a["kernel_factors[1]"]), a["bias"], stride=stride,
        )  # fmt: skip

    _expect(exc, name, call, args)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["stride", "dilation", "padding"]),
    value=st.one_of(
        st.integers(-3, 0),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.lists(st.integers(-1, 3), min_size=0, max_size=3),
        st.none(),
    ),
)
def test_cp_conv2d_bad_geometry_names_the_argument(name, value):
    r = 2
    kwargs = {"stride": 1, "dilation": 1, "padding": 1, name: value}
    call = lambda: cp_conv2d(  # noqa: E731
        torch.randn(1, 3, 6, 6), [torch.randn(3, r)], [torch.randn(4, r)],
        (torch.randn(3, r), torch.randn(3, r)), **kwargs,
    )  # fmt: skip
    try:
        call()
    except (TypeError, ValueError) as e:
        assert name in str(e), str(e)
        return
    # Valid after all: a padding of 0, a 2-list of valid ints, 'same' / 'valid'.
    ok_pair = isinstance(value, list) and len(value) == 2
    assert (name == "padding" and (value == 0 or value in ("same", "valid"))) or ok_pair


@settings(max_examples=30, deadline=None)
@given(value=st.one_of(st.integers(), st.none(), st.text(max_size=8), st.floats()))
def test_cp_linear_bad_strategy(value):
    if value in ("auto", "khatri_rao", "modewise"):
        return
    exc = ValueError if isinstance(value, str) else TypeError
    with pytest.raises(exc, match="strategy"):
        cp_linear(torch.randn(2, 4), [torch.randn(4, 1)], [torch.randn(3, 1)], strategy=value)


def test_every_layer_exported_from_the_package():
    for cls in registered_layers():
        assert getattr(kronlayers, cls.__name__) is cls


# --- tests that kill mutants (scripts/mutation_test.py) ---------------------------------


def test_cp_linear_mode_count_and_empty_factor_limits():
    from kronlayers._shapes import MAX_MODES

    ones = [torch.ones(1, 2) for _ in range(MAX_MODES)]
    x = torch.randn(3, 1)
    y = cp_linear(x, ones, [torch.ones(2, 2)])  # exactly MAX_MODES modes: W = [[2], [2]]
    torch.testing.assert_close(y, 2 * x.expand(3, 2))
    with pytest.raises(ValueError, match=r"in_factors may hold at most"):
        cp_linear(torch.randn(3, 1), [*ones, torch.ones(1, 2)], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match=r"in_factors\[0\] must have shape \(d_k, R\)"):
        cp_linear(torch.randn(2, 0), [torch.randn(0, 2)], [torch.randn(3, 2)])
    with pytest.raises(ValueError, match=r"out_factors\[1\] must have shape \(d_k, R\)"):
        cp_linear(torch.randn(2, 3), [torch.randn(3, 2)], [torch.randn(3, 2), torch.randn(0, 2)])


def _side_costs_by_hand(in_shape, out_shape, rank, n):
    """Multiply-adds per side: ``{"in": (modewise, khatri_rao), "out": (...)}``."""
    # Input, mode-wise: the largest mode first; each step costs N R (what is left).
    left, mode_in = math.prod(in_shape), 0
    for d in sorted(in_shape, reverse=True):
        mode_in += n * rank * left
        left //= d
    # Output, mode-wise: the smallest modes first, N R (what exists) each, then the GEMM.
    size, mode_out = 1, n * rank * math.prod(out_shape)
    for d in sorted(out_shape)[:-1]:
        size *= d
        mode_out += n * rank * size

    def build(shape):  # Khatri-Rao: (d1 d2, R), then (d1 d2 d3, R), ...
        return sum(math.prod(shape[: j + 1]) * rank for j in range(1, len(shape)))

    kr_in = build(in_shape) + n * rank * math.prod(in_shape)
    kr_out = build(out_shape) + n * rank * math.prod(out_shape)
    return {"in": (mode_in, kr_in), "out": (mode_out, kr_out)}


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank", "n"),
    [((4, 6), (2, 3, 5), 3, 7), ((2, 3, 4), (3, 5), 4, 2), ((8,), (6,), 2, 5),
     ((3, 3), (2, 2), 1, 1), ((16, 16), (16, 16), 4, 1), ((16, 16), (16, 16), 4, 64)],
)  # fmt: skip
def test_cp_linear_flops_formulas_by_hand(in_shape, out_shape, rank, n):
    c = _side_costs_by_hand(in_shape, out_shape, rank, n)
    assert cp_linear_flops(in_shape, out_shape, rank, n, "modewise") == 2 * (
        c["in"][0] + c["out"][0]
    )
    assert cp_linear_flops(in_shape, out_shape, rank, n, "khatri_rao") == 2 * (
        c["in"][1] + c["out"][1]
    )
    # "auto": the routes the cost model picks (by time, not FLOPs), counted as such.
    plan = make_plan(in_shape, out_shape, rank, n)
    chosen = c["in"][int(plan.in_khatri_rao)] + c["out"][int(plan.out_khatri_rao)]
    assert cp_linear_flops(in_shape, out_shape, rank, n) == 2 * chosen


@pytest.mark.parametrize("c_out", [4, 16, 20])  # below, at and above the NHWC GEMM threshold
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [1, 3])  # rank 1: the R-channel tensors are NCHW and NHWC
def test_cp_conv2d_channels_last_output_can_be_modified_in_place(c_out, bias, rank):
    ins, outs = _factors((5,), rank), _factors((c_out,), rank)
    ks = _factors((3, 3), rank)
    b = torch.randn(c_out, dtype=F64, requires_grad=True) if bias else None
    x = torch.randn(2, 5, 6, 6, dtype=F64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    y = cp_conv2d(x, ins, outs, ks, b, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, cp_conv2d_kernel(ins, outs, ks), b, padding=1)
    y.relu_()
    torch.testing.assert_close(y, ref.relu(), rtol=1e-10, atol=1e-10)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gr,) = torch.autograd.grad(ref.relu().sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-10, atol=1e-10)


def _paths():
    try:
        from kronlayers.functional._dispatch import PATHS, force_path
    except ImportError:  # no dispatch layer: one automatic path
        import contextlib

        return [("auto", contextlib.nullcontext)]
    return [(p, lambda p=p: force_path(p)) for p in PATHS]


_KRON_CASES = [
    dict(in_features=24, out_features=15, in_shape=(4, 6), out_shape=(3, 5), rank=1),
    dict(in_features=24, out_features=15, in_shape=(4, 6), out_shape=(3, 5), rank=3),
    dict(in_features=24, out_features=12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), rank=2),
    dict(in_features=24, out_features=12, in_shape=(2, 3, 4), out_shape=(3, 2, 2), rank=1),
    dict(in_features=12, out_features=20, in_shape=(3, 4), out_shape=(5, 4), rank=2),
]


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", _KRON_CASES, ids=lambda c: f"{c['in_shape']}-r{c['rank']}")
@pytest.mark.parametrize("lead", [(5,), (2, 3), ()], ids=str)
def test_kronecker_every_path_matches_dense(path, bias, case, lead):
    """Forward, every gradient and a gradient penalty vs the dense weight, on every dispatch
    path (``force_path``), with and without bias, 2 and 3 factors, ranks 1 and more."""
    layer = kronlayers.KroneckerLinear(**case, bias=bias, dtype=F64)
    x = torch.randn(*lead, case["in_features"], dtype=F64, requires_grad=True)
    params = list(layer.parameters())
    g = None
    with path[1]():
        y = layer(x)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params], g)
        (gx,) = torch.autograd.grad(layer(x).tanh().sum(), x, create_graph=True)
        pen = torch.autograd.grad(gx.pow(2).sum(), [x, *params], allow_unused=True)
    ref_y = dense_reference(layer, x)
    torch.testing.assert_close(y, ref_y, rtol=1e-10, atol=1e-10)
    ref = torch.autograd.grad(ref_y, [x, *params], g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    (rx,) = torch.autograd.grad(dense_reference(layer, x).tanh().sum(), x, create_graph=True)
    ref_pen = torch.autograd.grad(rx.pow(2).sum(), [x, *params], allow_unused=True)
    for a, b in zip(pen, ref_pen, strict=True):
        if b is None:
            continue
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p[0])
def test_every_layer_every_path_subsets_of_gradients(spec, path):
    # One trainable tensor at a time: the kernels skip the others' work (needs_input_grad).
    layer = spec.make(dtype=F64)
    names = ["input", *(n for n, _ in layer.named_parameters())]
    x0 = torch.randn(spec.input_shape, dtype=F64)
    params = dict(layer.named_parameters())
    for only in names:
        x = x0.clone().requires_grad_(only == "input")
        for n, p in params.items():
            p.requires_grad_(n == only)
        with path[1]():
            y = layer(x)
            (got,) = torch.autograd.grad(y.pow(2).sum(), x if only == "input" else params[only])
        for p in params.values():
            p.requires_grad_(True)
        xr = x0.clone().requires_grad_(True)
        ref_y = dense_reference(layer, xr)
        target = xr if only == "input" else params[only]
        (ref,) = torch.autograd.grad(ref_y.pow(2).sum(), target)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=f"{spec.id}: {only}")


# --- conversion code ---------------------------------------------------------------------


def test_cp_rank_from_fraction_values_and_errors():
    from kronlayers.decomposition.cp import cp_max_rank, cp_rank_from_fraction

    assert cp_rank_from_fraction(0.5, (8, 8, 3, 3)) == 13  # round(0.5 * 576 / 22)
    assert cp_rank_from_fraction(1.0, (8, 8, 3, 3)) == 26
    assert cp_rank_from_fraction(1e-6, (4, 6)) == 1  # at least 1
    for bad in (True, 1, "0.5", None):
        with pytest.raises(TypeError, match="fraction"):
            cp_rank_from_fraction(bad, (4, 6))
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            cp_rank_from_fraction(bad, (4, 6))
    assert cp_max_rank((3, 4)) == 3
    assert cp_max_rank((2, 3, 4)) == 6
    assert cp_max_rank((1, 1)) == 1
    assert cp_max_rank((5,)) == 1


def _low_rank_tensor(shape, rank, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(d, rank, generator=g, dtype=dtype) for d in shape]
    from kronlayers.decomposition import cp_to_tensor

    return cp_to_tensor(fs), fs


def test_cp_decompose_exact_recovery_float64_matrices_and_warm_starts():
    from kronlayers.decomposition import cp_decompose, cp_to_tensor

    t, _ = _low_rank_tensor((5, 6, 4), 2)
    factors, err = cp_decompose(t, 2)
    assert err < 1e-10  # float64 all the way (float32 would stop near 1e-7)
    assert all(f.dtype == F64 for f in factors)
    torch.testing.assert_close(cp_to_tensor(factors), t, rtol=1e-8, atol=1e-8)
    m, _ = _low_rank_tensor((6, 7), 3)  # a matrix (2 modes) is a valid CP input
    _, err = cp_decompose(m, 3)
    assert err < 1e-10
    # Warm start from rank-1 factors (R' < R): padded to rank 2, then converges.
    warm, _ = cp_decompose(t, 1)
    factors, err = cp_decompose(t, 2, init=warm)
    assert err < 1e-8
    # Warm start at full rank, no iteration: the initial factors (balanced) come back.
    exact_init = [f.clone() for f in factors]
    again, err0 = cp_decompose(t, 2, init=exact_init, n_iter_max=0)
    assert err0 < 1e-8
    torch.testing.assert_close(cp_to_tensor(again), cp_to_tensor(exact_init))
    with pytest.raises(TypeError, match="init"):
        cp_decompose(t, 2, init=torch.ones(5, 2))
    with pytest.raises(ValueError, match="init must hold 3 factors"):
        cp_decompose(t, 2, init=factors[:2])
    with pytest.raises(ValueError, match=r"init\[1\] must have shape \(6, R'\)"):
        cp_decompose(t, 2, init=[factors[0], factors[1].t(), factors[2]])
    with pytest.raises(ValueError, match=r"R' <= 1"):
        cp_decompose(t, 1, init=factors)
    with pytest.raises(ValueError, match="init must be 'svd', 'random'"):
        cp_decompose(t, 2, init="best")
    with pytest.raises(ValueError, match="at least 2 dims"):
        cp_decompose(torch.randn(5, dtype=F64), 1)
    with pytest.raises(TypeError, match="rank"):
        cp_decompose(t, 1.0)
    with pytest.raises(ValueError, match="rank"):
        cp_decompose(t, 0)
    with pytest.raises(TypeError, match="tol"):
        cp_decompose(t, 1, tol="small")
    with pytest.raises(ValueError, match="n_iter_max"):
        cp_decompose(t, 1, n_iter_max=-1)
    # "random" initialisation reaches the exact answer too.
    _, err = cp_decompose(t, 2, init="random", n_iter_max=500, tol=0.0)
    assert err < 1e-6


def test_cp_decompose_float32_keeps_dtype_and_converges():
    from kronlayers.decomposition import cp_decompose

    t, _ = _low_rank_tensor((7, 6, 5), 2, dtype=torch.float32)
    factors, err = cp_decompose(t, 2)
    assert all(f.dtype == torch.float32 for f in factors)
    # Small problems run the ALS in float64 even for float32 input: the error is then only
    # the rounding of the returned factors (~2e-8 here; a float32 ALS stops near 2e-7).
    assert err < 1e-7


def test_solve_normal_handles_singular_grams():
    from kronlayers.decomposition.cp import solve_normal

    g = torch.Generator().manual_seed(0)
    b = torch.randn(4, 2, generator=g, dtype=F64)
    v = b @ b.T  # (4, 4) PSD of rank 2: Cholesky fails
    m = torch.randn(3, 4, generator=g, dtype=F64) @ v  # in the row space of v
    x = solve_normal(m, v)
    torch.testing.assert_close(x @ v, m, rtol=1e-6, atol=1e-8)
    spd = v + torch.eye(4, dtype=F64)
    torch.testing.assert_close(solve_normal(m, spd), m @ torch.linalg.inv(spd))
    assert solve_normal(m.float(), spd.float()).dtype == torch.float32


def test_tucker2_decompose_full_rank_and_errors():
    from kronlayers.decomposition import tucker2_decompose

    w = torch.randn(4, 3, 3, 3, dtype=F64)
    core, u_in, u_out, err = tucker2_decompose(w, (3, 4))  # full ranks: exact
    assert err < 1e-6  # (computed as sqrt(|W|^2 - |core|^2): cancellation)
    torch.testing.assert_close(torch.einsum("bahw,ia,ob->oihw", core, u_in, u_out), w)
    core, u_in, u_out, err = tucker2_decompose(w, (2, 2), n_iter_max=0)  # HOSVD only
    assert 0 < err < 1 and core.shape == (2, 2, 3, 3)
    _, _, _, err_hooi = tucker2_decompose(w, (2, 2), n_iter_max=20)
    assert err_hooi <= err + 1e-12
    assert tucker2_decompose(torch.zeros(4, 3, 3, 3), (1, 1))[3] == 0.0
    for ranks, name in (((0, 2), r"ranks\[0\]"), ((2, 0), r"ranks\[1\]"), ((4, 2), "at most")):
        with pytest.raises(ValueError, match=name):
            tucker2_decompose(w, ranks)
    with pytest.raises(ValueError, match="kernel must have shape"):
        tucker2_decompose(w[0], (1, 1))
    with pytest.raises(TypeError, match="kernel"):
        tucker2_decompose(w.long(), (1, 1))


def test_nearest_kronecker_exact_rank_and_errors():
    w = kronlayers.kron(torch.randn(3, 4, dtype=F64), torch.randn(5, 6, dtype=F64))
    w = w + kronlayers.kron(torch.randn(3, 4, dtype=F64), torch.randn(5, 6, dtype=F64))
    a, b = kronlayers.nearest_kronecker(w, (3, 5), (4, 6), rank=2)
    assert a.shape == (2, 3, 4) and b.shape == (2, 5, 6)
    torch.testing.assert_close(kronlayers.kron(a, b).sum(0), w, rtol=1e-10, atol=1e-10)
    (single,) = kronlayers.nearest_kronecker(w, (15,), (24,), rank=3)  # d = 1: split evenly
    torch.testing.assert_close(single.sum(0), w)
    torch.testing.assert_close(single[0], single[1])


def test_cp_conv2d_output_keeps_the_input_memory_format():
    ins, outs, ks = _factors((4,), 3), _factors((5,), 3), _factors((3, 3), 3)
    x = torch.randn(2, 4, 6, 6, dtype=F64)
    ref = F.conv2d(x, cp_conv2d_kernel(ins, outs, ks), padding=1)
    y = cp_conv2d(x, ins, outs, ks, padding=1)
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref)
    y = cp_conv2d(x.contiguous(memory_format=torch.channels_last), ins, outs, ks, padding=1)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    torch.testing.assert_close(y, ref)
    # Neither format (a transposed view): treated as NCHW, like F.conv2d's contiguous output.
    xt = torch.randn(2, 4, 6, 6, dtype=F64).transpose(2, 3)
    y = cp_conv2d(xt, ins, outs, ks, padding=1)
    assert y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(xt, cp_conv2d_kernel(ins, outs, ks), padding=1))


def test_cp_linear_plan_and_cp_conv2d_config_are_hashable_and_frozen():
    import dataclasses

    plan = make_plan((2, 3), (4,), 2, 5)
    config = CPConv2dConfig((1, 1), (0, 0, 0, 0), (1, 1), 1)
    for c in (plan, config):
        assert hash(c) == hash(dataclasses.replace(c))
        with pytest.raises(dataclasses.FrozenInstanceError):
            c.rank = 3  # type: ignore[misc]


def test_apply_autocast_runs_the_function_with_autocast_off():
    from kronlayers.functional._amp import apply_autocast

    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(x, w):
            seen.append((torch.is_autocast_enabled("cpu"), x.dtype, w.dtype))
            return x * w

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g, g

    x, w = torch.randn(3), torch.randn(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = apply_autocast(Probe, x, w)
        apply_autocast(Probe, x, w.detach())  # the no-grad path too
    assert seen == [(False, torch.bfloat16, torch.bfloat16)] * 2
    assert y.dtype == torch.bfloat16


def test_cp_linear_and_cp_conv2d_mixed_low_precision_dtypes_are_type_errors():
    # Not only float64: any dtype other than the input's (outside autocast).
    a, b = [torch.randn(3, 2), torch.randn(4, 2)], [torch.randn(5, 2)]
    with pytest.raises(TypeError, match=r"in_factors\[0\] must have the input's dtype"):
        cp_linear(torch.randn(2, 12), [a[0].half(), a[1]], b)
    with pytest.raises(TypeError, match=r"bias must have the input's dtype"):
        cp_linear(torch.randn(2, 12), a, b, torch.randn(5).bfloat16())
    ks = [torch.randn(3, 2), torch.randn(3, 2)]
    with pytest.raises(TypeError, match=r"kernel_factors\[1\] must have the input's dtype"):
        cp_conv2d(torch.randn(1, 3, 5, 5), [a[0]], [b[0]], [ks[0], ks[1].half()])


@pytest.mark.parametrize("bad", [None, "ab", 3, {0: 1, 1: 2}], ids=repr)
def test_cp_conv2d_kernel_factors_must_be_a_pair_of_tensors(bad):
    with pytest.raises(TypeError, match="kernel_factors"):
        cp_conv2d(torch.randn(1, 3, 5, 5), [torch.randn(3, 2)], [torch.randn(4, 2)], bad)


@pytest.mark.parametrize("min_batch", [2, 64])
def test_cp_linear_export_dynamic_batch_takes_the_khatri_rao_route(min_batch):
    # The documented plan for a symbolic batch: Khatri-Rao on both sides (two GEMMs, no
    # mode-wise Hadamard steps), whether or not the batch range decides the cost comparison.
    layer = kronlayers.CPLinear(24, 30, in_shape=(4, 6), out_shape=(2, 3, 5), rank=3)
    x = torch.randn(max(min_batch, 4), 24)
    batch = torch.export.Dim("batch", min=min_batch, max=4096)
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    gemms = [t for t in targets if t.startswith(("aten.mm", "aten.addmm", "aten.matmul"))]
    assert len(gemms) == 2, targets
    assert not any("bmm" in t or "einsum" in t for t in targets), targets


@pytest.mark.parametrize("c_out", [3, 16])
def test_cp_conv2d_double_backward_channels_last(c_out):
    # Channels-last input: the backward's channel GEMMs take their NHWC branches, which must
    # be differentiable too (no out= writes when the backward is differentiated).
    ins, outs, ks = _factors((3,), 2), _factors((c_out,), 2), _factors((3, 3), 2)
    x = torch.randn(1, 3, 4, 4, dtype=F64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def fn(x, i, o, kh):
        return cp_conv2d(x, [i], [o], (kh, ks[1]), padding=1)

    assert gradgradcheck(fn, (x, ins[0], outs[0], ks[0]), fast_mode=True)
