"""tucker_conv2d (functional, hand-written forward and backward) against the dense convolution."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from kronlayers.functional._dispatch import force_kernel
from kronlayers.functional.tucker_conv2d import (
    TuckerConv2dConfig,
    TuckerConv2dFunction,
    tucker_conv2d,
    tucker_conv2d_flops,
    tucker_conv2d_kernel,
)

pytestmark = [
    # Raised by the dense F.conv2d reference, not by the layer.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

F64 = torch.float64


@pytest.fixture(autouse=True)
def _hand_written_kernel():
    # These tests are about the hand-written TuckerConv2dFunction (its saved tensors, layouts and
    # gradients): the dispatcher would send small problems to the dense path instead
    # (tests/test_conv_dispatch.py covers that path and the choice).
    with force_kernel("function"):
        yield


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
CL = torch.channels_last
NAMES = ("input", "bias", "core", "in_factor", "out_factor")


def make(c_in, c_out, r_in, r_out, kernel, n=2, hw=(6, 5), bias=True, dtype=F64, cl=False):
    """``{name: tensor}`` for the five tensor arguments, none requiring grad yet."""
    shape = (c_in, *hw) if n is None else (n, c_in, *hw)
    x = torch.randn(shape, dtype=dtype)
    if cl:
        x = x.contiguous(memory_format=CL)
    return {
        "input": x,
        "bias": torch.randn(c_out, dtype=dtype) if bias else None,
        "core": torch.randn(r_out, r_in, *kernel, dtype=dtype),
        "in_factor": torch.randn(c_in, r_in, dtype=dtype),
        "out_factor": torch.randn(c_out, r_out, dtype=dtype),
    }


def layer(t, **conv):
    return tucker_conv2d(t["input"], t["core"], t["in_factor"], t["out_factor"], t["bias"], **conv)


def dense(t, **conv):
    """F.conv2d through the dense kernel, differentiated by autograd."""
    kernel = tucker_conv2d_kernel(t["core"], t["in_factor"], t["out_factor"])
    return F.conv2d(t["input"], kernel, t["bias"], **conv)


def trainable(t, names):
    for name in names:
        if t[name] is not None:
            t[name].requires_grad_(True)
    return [t[name] for name in names if t[name] is not None]


# A representative (not cartesian) grid: every kernel shape, stride, dilation and padding form,
# R_in != R_out, C_in != C_out, ranks >= 16 (the NCHW -> NHWC GEMM path on CPU), batch 1 and
# 3, H != W, bias on/off, channels-last input.
# (c_in, c_out, r_in, r_out, kernel, stride, padding, dilation, n, (H, W), bias, channels_last)
GRID = [
    (4, 6, 2, 3, (1, 1), 1, 0, 1, 3, (5, 7), True, False),
    (4, 6, 3, 2, (3, 3), 1, 1, 1, 1, (6, 5), True, False),
    (5, 3, 2, 4, (3, 3), 2, (1, 2), 1, 3, (7, 6), False, False),
    (3, 5, 4, 2, (5, 5), 1, "same", 1, 1, (6, 7), True, False),
    (3, 4, 3, 2, (3, 1), (2, 1), "valid", (1, 2), 3, (7, 5), True, False),
    (4, 5, 2, 3, (2, 4), 1, "same", 1, 1, (8, 6), True, False),  # asymmetric padding
    (4, 5, 2, 3, (2, 4), 1, "same", 2, 3, (8, 9), False, False),  # even kernel, dilated
    (3, 2, 2, 2, (2, 2), 2, 0, 2, 1, (9, 7), True, False),
    (6, 4, 3, 5, (3, 3), 1, 1, 2, 3, (6, 8), True, True),
    (4, 6, 2, 3, (2, 4), 1, "same", 1, 3, (5, 6), True, True),  # asymmetric, channels-last
    (5, 6, 3, 2, (3, 1), 2, (1, 2), (2, 1), 1, (7, 8), False, True),
    (4, 20, 18, 17, (3, 3), 1, 1, 1, 3, (5, 6), True, False),  # ranks >= 16
    (17, 18, 16, 20, (1, 3), (1, 2), "valid", 1, 1, (4, 7), True, True),
    (4, 18, 3, 2, (3, 3), 1, 0, 1, 2, (3, 3), True, True),  # 1x1 output, wide NHWC GEMM
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRID, ids=[f"grid{k}" for k in range(len(GRID))])
def test_matches_dense_conv(case, dtype):
    c_in, c_out, r_in, r_out, kernel, stride, padding, dilation, n, hw, bias, cl = case
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    t = make(c_in, c_out, r_in, r_out, kernel, n, hw, bias, dtype, cl)
    params = trainable(t, NAMES)
    y = layer(t, **conv)
    y_ref = dense(t, **conv)
    assert y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for p, a, b in zip(params, grads, grads_ref, strict=True):
        assert a.shape == p.shape
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_channels_last_in_channels_last_out():
    t = make(4, 6, 3, 2, (3, 3), n=2, hw=(5, 7), cl=True)
    trainable(t, NAMES)
    y = layer(t, padding=1)
    assert y.is_contiguous(memory_format=CL) and not y.is_contiguous()
    y.sum().backward()  # an expanded (stride-0) output gradient
    assert t["input"].grad.is_contiguous(memory_format=CL)
    t_nchw = make(4, 6, 3, 2, (3, 3), n=2, hw=(5, 7))
    assert layer(t_nchw, padding=1).is_contiguous()


def test_unbatched_input():
    t = make(3, 4, 2, 3, (3, 3), n=None, hw=(6, 5))
    params = trainable(t, NAMES)
    y = layer(t, stride=2, padding=1)
    assert y.shape == (4, 3, 3)
    y_ref = dense({**t, "input": t["input"].unsqueeze(0)}, stride=2, padding=1).squeeze(0)
    torch.testing.assert_close(y, y_ref, **TOL[F64])
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(y_ref, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, **TOL[F64])


def test_no_grad_path_matches():
    # apply_autocast calls forward directly when no gradient can be needed.
    t = make(3, 4, 2, 3, (2, 4), n=2, hw=(6, 7))
    with torch.no_grad():
        y = layer(t, padding="same")
    torch.testing.assert_close(y, dense(t, padding="same"), **TOL[F64])
    assert y.grad_fn is None


# Two configurations for the per-subset checks: asymmetric 'same' padding with bias, and a
# strided, dilated, channels-last one without bias.
SUBSET_CONFIGS = {
    "same-even": (dict(c_in=3, c_out=5, r_in=2, r_out=4, kernel=(2, 4), n=3, hw=(6, 5)),
                  dict(padding="same")),
    "strided-cl": (dict(c_in=5, c_out=3, r_in=4, r_out=2, kernel=(3, 3), n=3, hw=(8, 7),
                        bias=False, cl=True),
                   dict(stride=2, padding=(1, 2), dilation=(2, 1))),
}  # fmt: skip
SUBSETS = [s for k in range(1, 6) for s in itertools.combinations(NAMES, k)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("config", list(SUBSET_CONFIGS))
def test_backward_every_trainable_subset(config, subset, monkeypatch):
    """Right grads for the trainable tensors, None for the others, only the needed activations
    saved (input for in_factor, u for core, v for out_factor)."""
    sizes, conv = SUBSET_CONFIGS[config]
    t = make(**sizes)
    params = trainable(t, subset)

    returned = []
    backward = TuckerConv2dFunction.backward

    def spy(ctx, *grads):
        out = backward(ctx, *grads)
        returned.append(out)
        return out

    monkeypatch.setattr(TuckerConv2dFunction, "backward", staticmethod(spy))
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(t, **conv)

    y_ref = dense(t, **conv)
    torch.testing.assert_close(y, y_ref, **TOL[F64])
    if not params:  # only the absent bias was "trainable"
        assert y.grad_fn is None
        return
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL[F64])

    (out,) = returned
    assert out[2] is None  # config
    for name, grad in zip(NAMES, (out[0], *out[1:2], *out[3:]), strict=True):
        assert (grad is not None) == (name in subset and t[name] is not None), name

    x = t["input"]
    n, _, h_out, w_out = y.shape
    excess = _excess(conv, sizes)
    u_shape = (n, sizes["r_in"], x.shape[2] + excess[0], x.shape[3] + excess[1])
    v_shape = (n, sizes["r_out"], h_out, w_out)
    activations = {s for s in saved_shapes if len(s) == 4 and s[0] == n}
    expected = set()
    if "in_factor" in subset:
        expected.add(tuple(x.shape))
    if "core" in subset:
        expected.add(u_shape)
    if "out_factor" in subset:
        expected.add(v_shape)
    assert activations == expected


def _excess(conv, sizes):
    # The asymmetric padding applied explicitly to u: (rows, columns).
    if conv.get("padding") != "same":
        return (0, 0)
    return tuple((k - 1) % 2 for k in sizes["kernel"])


# Small shapes: gradgradcheck's cost grows with (input numel) x (output numel). The first case
# is checked in full, the others with fast_mode (random projections of the Jacobians); the
# first-order gradients are also compared with the dense reference above.
GRADCHECK_CASES = [
    (dict(c_in=2, c_out=2, r_in=2, r_out=3, kernel=(2, 2), n=1, hw=(2, 3)), dict(padding="same")),
    (dict(c_in=2, c_out=3, r_in=3, r_out=2, kernel=(3, 2), n=2, hw=(5, 4), cl=True),
     dict(stride=2, padding=(1, 0), dilation=(1, 2))),
    (dict(c_in=2, c_out=2, r_in=2, r_out=2, kernel=(3, 3), n=1, hw=(3, 4), bias=False),
     dict(padding=1)),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(GRADCHECK_CASES)))
def test_gradcheck_and_gradgradcheck(case):
    sizes, conv = GRADCHECK_CASES[case]
    t = make(**sizes)
    names = [name for name in NAMES if t[name] is not None]
    params = trainable(t, names)

    def f(*args):
        return layer({**t, **dict(zip(names, args, strict=True))}, **conv)

    assert torch.autograd.gradcheck(f, params, fast_mode=case > 0)
    assert torch.autograd.gradgradcheck(f, params, fast_mode=case > 0)


# Second order with only some tensors trainable: the backward then saves less, and a gradient
# reaching a saved intermediate (u for core, v for out_factor) must still flow back correctly.
@pytest.mark.parametrize(
    "subset",
    [
        ("input",),
        ("core",),
        ("in_factor",),
        ("out_factor",),
        ("input", "out_factor"),
        ("in_factor", "core"),
    ],
    ids="+".join,
)
def test_gradgradcheck_subsets(subset):
    sizes, conv = GRADCHECK_CASES[1]
    t = make(**sizes)
    params = trainable(t, subset)

    def f(*args):
        return layer({**t, **dict(zip(subset, args, strict=True))}, **conv)

    assert torch.autograd.gradgradcheck(f, params, fast_mode=True)


def test_function_intermediates_are_differentiable():
    # The Function's extra outputs u and v are real outputs: gradients through them are right.
    t = make(2, 3, 2, 2, (2, 3), n=2, hw=(4, 5))
    config = TuckerConv2dConfig(stride=(1, 1), padding=(0, 1, 1, 1), dilation=(1, 1))
    params = trainable(t, ("input", "bias", "core", "in_factor", "out_factor"))

    def f(x, bias, core, in_factor, out_factor):
        y, u, v = TuckerConv2dFunction.apply(x, bias, config, core, in_factor, out_factor)
        return y.sum() + (u**2).sum() + (v**3).sum()

    assert torch.autograd.gradcheck(f, params, fast_mode=True)


def test_empty_batch():
    t = make(3, 4, 2, 5, (3, 3), n=0, hw=(6, 5))
    params = trainable(t, NAMES)
    y = layer(t, padding=1, stride=2)
    y_ref = dense(t, padding=1, stride=2)
    assert y.shape == y_ref.shape == (0, 4, 3, 3)
    y.sum().backward()
    assert t["input"].grad.shape == (0, 3, 6, 5)
    for p in params[1:]:
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_kernel_is_the_tucker_tensor():
    core, in_factor, out_factor = torch.randn(3, 2, 2, 3), torch.randn(4, 2), torch.randn(5, 3)
    w = tucker_conv2d_kernel(core, in_factor, out_factor)
    assert w.shape == (5, 4, 2, 3)
    ref = torch.zeros(5, 4, 2, 3)
    for b in range(3):
        for a in range(2):
            ref += (
                out_factor[:, b, None, None, None] * core[b, a] * in_factor[None, :, a, None, None]
            )
    torch.testing.assert_close(w, ref)


def test_config_is_hashable_and_frozen():
    c = TuckerConv2dConfig(stride=(1, 2), padding=(0, 1, 1, 1), dilation=(1, 1))
    assert hash(c) == hash(TuckerConv2dConfig((1, 2), (0, 1, 1, 1), (1, 1)))
    assert c.conv_padding == (0, 1) and c.excess_padding == (0, 0, 0, 1)
    with pytest.raises(AttributeError):
        c.stride = (2, 2)


def test_autocast_bf16_cpu():
    t = make(4, 6, 3, 2, (3, 3), n=2, hw=(6, 5), dtype=torch.float32)
    params = trainable(t, NAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(t, padding="same")
    assert y.dtype == torch.bfloat16
    y_ref = dense(t, padding="same")
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.5)
    y.float().sum().backward()
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.float32


def test_flops():
    # 'same' 3x3 on 8x6: the output keeps the size.
    assert tucker_conv2d_flops(16, 32, 3, (4, 8), (8, 6), batch=2, padding="same") == 2 * 2 * (
        16 * 4 * 48 + 8 * 4 * 9 * 48 + 8 * 32 * 48
    )
    # Strided, unpadded 2x4 on 9x11: output 4x4.
    assert tucker_conv2d_flops(3, 5, (2, 4), (2, 3), (9, 11), stride=2) == 2 * (
        3 * 2 * 99 + 3 * 2 * 8 * 16 + 3 * 5 * 16
    )
    assert tucker_conv2d_flops(3, 5, 3, 2, (7, 7)) == tucker_conv2d_flops(3, 5, 3, (2, 2), (7, 7))
    with pytest.raises(ValueError, match="rank"):
        tucker_conv2d_flops(3, 5, 3, (2, 0), (7, 7))
    with pytest.raises(TypeError, match="in_channels"):
        tucker_conv2d_flops(3.0, 5, 3, (2, 2), (7, 7))


# (id, {argument: function of the valid tensors giving its bad value}, exception, match)
ERRORS = [
    ("input-not-tensor", dict(input=lambda t: t["input"].tolist()), TypeError, "input"),
    ("core-not-tensor", dict(core=lambda t: t["core"].numpy()), TypeError, "core"),
    ("in-not-tensor", dict(in_factor=lambda t: [t["in_factor"]]), TypeError, "in_factor"),
    ("out-not-tensor", dict(out_factor=lambda t: 1.0), TypeError, "out_factor"),
    ("bias-not-tensor", dict(bias=lambda t: [0.0] * 5), TypeError, "bias"),
    ("core-3d", dict(core=lambda t: t["core"][0]), ValueError, "core"),
    ("in-3d", dict(in_factor=lambda t: t["in_factor"][None]), ValueError, "in_factor"),
    ("in-rank", dict(in_factor=lambda t: torch.randn(3, 4, dtype=F64)), ValueError, "in_factor"),
    ("out-rank", dict(out_factor=lambda t: torch.randn(5, 2, dtype=F64)), ValueError,
     "out_factor"),
    ("wrong-c-in", dict(input=lambda t: torch.randn(2, 4, 6, 5, dtype=F64)), ValueError,
     r"input must have shape \(N, 3, H, W\).*in_factor"),
    ("input-5d", dict(input=lambda t: t["input"][None]), ValueError, "input"),
    ("input-int", dict(input=lambda t: t["input"].long()), TypeError, "input"),
    ("core-dtype", dict(core=lambda t: t["core"].float()), TypeError, "core"),
    ("in-dtype", dict(in_factor=lambda t: t["in_factor"].float()), TypeError, "in_factor"),
    ("out-dtype", dict(out_factor=lambda t: t["out_factor"].float()), TypeError, "out_factor"),
    ("bias-dtype", dict(bias=lambda t: t["bias"].float()), TypeError, "bias"),
    ("in-int", dict(in_factor=lambda t: t["in_factor"].long()), TypeError, "in_factor"),
    ("core-device", dict(core=lambda t: t["core"].to("meta")), ValueError, "core"),
    ("bias-shape", dict(bias=lambda t: torch.randn(4, dtype=F64)), ValueError, "bias"),
    ("stride-0", dict(stride=lambda t: 0), ValueError, "stride"),
    ("stride-float", dict(stride=lambda t: 1.5), TypeError, "stride"),
    ("stride-triple", dict(stride=lambda t: (1, 1, 1)), ValueError, "stride"),
    ("padding-negative", dict(padding=lambda t: -1), ValueError, "padding"),
    ("padding-string", dict(padding=lambda t: "full"), ValueError, "padding"),
    ("padding-float", dict(padding=lambda t: (1, 0.5)), TypeError, "padding"),
    ("dilation-0", dict(dilation=lambda t: (1, 0)), ValueError, "dilation"),
    ("same-strided", dict(padding=lambda t: "same", stride=lambda t: 2), ValueError, "same"),
    ("too-small", dict(input=lambda t: torch.randn(2, 3, 1, 5, dtype=F64)), ValueError,
     "smaller than the dilated kernel"),
    ("too-small-dilated", dict(dilation=lambda t: (1, 3)), ValueError,
     "smaller than the dilated kernel"),
]  # fmt: skip


@pytest.mark.parametrize("changes, exc, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(changes, exc, match):
    t = make(3, 5, 2, 4, (2, 3), n=2, hw=(6, 5))
    args = {**t, "stride": 1, "padding": 0, "dilation": 1}
    args.update({name: fn(t) for name, fn in changes.items()})
    with pytest.raises(exc, match=match):
        tucker_conv2d(**args)


def test_kernel_errors():
    with pytest.raises(ValueError, match="in_factor"):
        tucker_conv2d_kernel(torch.randn(3, 2, 1, 1), torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="out_factor"):
        tucker_conv2d_kernel(torch.randn(3, 2, 1, 1), torch.randn(4, 2), None)
