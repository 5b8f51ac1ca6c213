"""The Tucker-2 convolution (kronlayers.functional.tucker_conv2d) and the helpers it shares
with the CP convolution (``_channels``, ``_conv_dispatch``): values and gradients of every
path and layout against ``F.conv2d`` with the dense kernel in float64, gradients that reach
the intermediates ``u`` / ``v``, the FLOPs the cost descriptions declare against
FlopCounterMode, and the path choice."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from kronlayers._shapes import conv2d_padding
from kronlayers.functional import _channels, _conv_dispatch
from kronlayers.functional import _dispatch as dispatch
from kronlayers.functional._dispatch import Gemm, force_path
from kronlayers.functional.tucker_conv2d import (
    TuckerConv2dConfig,
    TuckerConv2dFunction,
    _path_ops,
    tucker_conv2d,
    tucker_conv2d_flops,
    tucker_conv2d_kernel,
    tucker_conv2d_plan,
)

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _gemm_flops(ops) -> int:
    return sum(2 * o.m * o.n * o.k * o.batch for o in ops if isinstance(o, Gemm))


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tensors(c_in, c_out, r_in, r_out, k, needs=(True, True, True)):
    kh, kw = k
    core = torch.randn(r_out, r_in, kh, kw, dtype=F64, requires_grad=needs[1])
    fi = torch.randn(c_in, r_in, dtype=F64, requires_grad=needs[1])
    fo = torch.randn(c_out, r_out, dtype=F64, requires_grad=needs[1])
    bias = torch.randn(c_out, dtype=F64, requires_grad=needs[2])
    return core, fi, fo, bias


def _reference(x, core, fi, fo, bias, stride, padding, dilation):
    w = torch.einsum("ob,bahw,ia->oihw", fo, core, fi)
    pads = conv2d_padding(padding, core.shape[2:], stride, dilation)
    top, bottom, left, right = pads
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, bias, stride, 0, dilation)


# (C_in, C_out, R_in, R_out, kernel): few and many (>= 16) channels on each side
SIZES = [(6, 10, 3, 4, (3, 2)), (5, 18, 17, 16, (2, 2))]
GEOMETRY = [((1, 1), 1, (1, 1)), ((2, 1), 0, (1, 2)), ((1, 1), "same", (1, 1)), ((1, 2), 2, 1)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sizes", SIZES)
def test_every_path_matches_the_dense_convolution(sizes, channels_last):
    c_in, c_out, r_in, r_out, k = sizes
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k)
    x = torch.randn(2, c_in, 7, 8, dtype=F64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    for (stride, padding, dilation), b in itertools.product(GEOMETRY, (None, bias)):
        ref = _reference(x, core, fi, fo, b, stride, padding, dilation)
        leaves = [t for t in (x, core, fi, fo, b) if t is not None]
        g = torch.randn_like(ref)
        want = torch.autograd.grad(ref, leaves, g)
        for path in ("factorized", "dense"):
            y = tucker_conv2d(x, core, fi, fo, b, stride, padding, dilation, path=path)
            torch.testing.assert_close(y, ref, **TOL)
            if path == "factorized":
                assert y.is_contiguous(
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format
                )
            got = torch.autograd.grad(y, leaves, g)
            for p, q in zip(got, want, strict=True):
                torch.testing.assert_close(p, q, **TOL)


def test_gradient_subsets_and_the_expanded_gradient_of_a_sum():
    c_in, c_out, r_in, r_out, k = SIZES[0]
    for needs in itertools.product([False, True], repeat=3):
        core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k, needs)
        x = torch.randn(2, c_in, 6, 5, dtype=F64, requires_grad=needs[0])
        leaves = [t for t in (x, core, fi, fo, bias) if t.requires_grad]
        if not leaves:
            continue
        for cl in (False, True):
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            y = tucker_conv2d(xx, core, fi, fo, bias, 1, "same", path="factorized")
            ref = _reference(xx, core, fi, fo, bias, (1, 1), "same", (1, 1))
            for p, q in zip(
                torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(ref.sum(), leaves),
                strict=True,
            ):  # fmt: skip
                torch.testing.assert_close(p, q, **TOL)


def test_gradients_reaching_the_intermediates():
    # y, u, v are all differentiable outputs; a gradient on u or v flows back too
    c_in, c_out, r_in, r_out, k = SIZES[0]
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k)
    x = torch.randn(2, c_in, 6, 5, dtype=F64, requires_grad=True)
    stride, dilation = (1, 1), (1, 1)
    pads = conv2d_padding("same", k, stride, dilation)
    config = TuckerConv2dConfig(stride=stride, padding=pads, dilation=dilation)
    y, u, v = TuckerConv2dFunction.apply(x, bias, config, core, fi, fo)
    # u carries only the asymmetric excess of the padding; the core convolution the rest
    assert any(config.excess_padding) and any(config.conv_padding)
    u_ref = F.pad(torch.einsum("nihw,ia->nahw", x, fi), config.excess_padding)
    v_ref = F.conv2d(u_ref, core, None, stride, config.conv_padding, dilation)
    y_ref = torch.einsum("nbhw,ob->nohw", v_ref, fo) + bias[:, None, None]
    for a, b in ((y, y_ref), (u, u_ref), (v, v_ref)):
        torch.testing.assert_close(a, b, **TOL)
    leaves = (x, bias, core, fi, fo)
    for ws in [(1, 1, 1), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1)]:
        gs = [w * torch.randn_like(t) for w, t in zip(ws, (y, u, v), strict=True)]

        def loss(outs, gs=gs):
            return sum((o * g).sum() for o, g in zip(outs, gs, strict=True))

        got = torch.autograd.grad(loss((y, u, v)), leaves, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(
            loss((y_ref, u_ref, v_ref)), leaves, retain_graph=True, allow_unused=True
        )
        for p, q in zip(got, want, strict=True):
            if q is None:
                assert p is None or torch.all(p == 0)
            else:
                torch.testing.assert_close(p, q, **TOL)


def test_double_backward_matches_dense():
    c_in, c_out, r_in, r_out, k = SIZES[0]
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k)
    x = torch.randn(2, c_in, 6, 5, dtype=F64, requires_grad=True)
    leaves = (x, core, fi, fo)
    for geometry in GEOMETRY:
        outs = []
        for path in ("factorized", None):
            if path is None:
                y = _reference(x, core, fi, fo, bias, *geometry)
            else:
                y = tucker_conv2d(x, core, fi, fo, bias, *geometry, path=path)
            grads = torch.autograd.grad((y**2).sum(), leaves, create_graph=True)
            penalty = sum((g**2).sum() for g in grads)
            outs.append(torch.autograd.grad(penalty, leaves))
        for p, q in zip(*outs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9)


def test_unbatched_and_empty_inputs():
    c_in, c_out, r_in, r_out, k = SIZES[0]
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k, (False, False, False))
    x = torch.randn(c_in, 6, 5, dtype=F64)
    for path in ("factorized", "dense", None):
        y = tucker_conv2d(x, core, fi, fo, bias, padding=1, path=path)
        ref = _reference(x[None], core, fi, fo, bias, (1, 1), 1, (1, 1))[0]
        torch.testing.assert_close(y, ref, **TOL)
        empty = tucker_conv2d(x[None][:0], core, fi, fo, bias, padding=1, path=path)
        assert empty.shape == (0, c_out, *ref.shape[1:])


def test_kernel_is_the_mode_products():
    core, fi, fo, _ = _tensors(3, 4, 2, 5, (2, 3))
    w = tucker_conv2d_kernel(core, fi, fo)
    want = torch.einsum("bahw,ob,ia->oihw", core, fo, fi)
    torch.testing.assert_close(w, want)


# --------------------------------------------------------------------------- FLOPs and plans


@pytest.mark.parametrize("geometry", GEOMETRY)
def test_declared_forward_flops(geometry):
    stride, padding, dilation = geometry
    n, (c_in, c_out, r_in, r_out, k) = 2, SIZES[0]
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k, (False, False, False))
    x = torch.randn(n, c_in, 7, 8, dtype=F64)
    pads = conv2d_padding(padding, k, (stride,) * 2 if isinstance(stride, int) else stride,
                          (dilation,) * 2 if isinstance(dilation, int) else dilation)  # fmt: skip
    s2 = stride if isinstance(stride, tuple) else (stride, stride)
    d2 = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    config = TuckerConv2dConfig(stride=s2, padding=pads, dilation=d2)
    needs = (False, False, False)
    fact, dense = _path_ops(n, c_in, c_out, core.shape, (7, 8), config, needs)
    with torch.no_grad():
        got_f = _counted(lambda: tucker_conv2d(x, core, fi, fo, bias, stride, padding, dilation,
                                               path="factorized"))  # fmt: skip
        got_d = _counted(lambda: tucker_conv2d(x, core, fi, fo, bias, stride, padding, dilation,
                                               path="dense"))  # fmt: skip
    flops = tucker_conv2d_flops(c_in, c_out, k, (r_in, r_out), (7, 8), n, stride, padding, dilation)
    assert got_f == _gemm_flops(fact) == flops
    assert got_d == _gemm_flops(dense)


def test_declared_backward_flops_at_equal_resolution():
    # 'same' padding, stride 1: every stage runs at the input resolution
    n, (c_in, c_out, r_in, r_out, k) = 2, SIZES[0]
    config = TuckerConv2dConfig((1, 1), conv2d_padding("same", k, (1, 1), (1, 1)), (1, 1))
    for needs in itertools.product([False, True], repeat=3):
        core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k, needs)
        x = torch.randn(n, c_in, 7, 8, dtype=F64, requires_grad=needs[0])

        def run(x=x, core=core, fi=fi, fo=fo, bias=bias):
            y = tucker_conv2d(x, core, fi, fo, bias, padding="same", path="factorized")
            if y.requires_grad:
                y.backward(torch.ones_like(y))

        fact, _ = _path_ops(n, c_in, c_out, core.shape, (7, 8), config, needs)
        assert _counted(run) == _gemm_flops(fact), needs


def test_plan_defaults_and_choice():
    dflt = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (32, 8, 10, 10), padding=1)
    expl = tucker_conv2d_plan(
        (4, 3, 3, 3), 8, 16, (32, 8, 10, 10), 1, 1, 1, dtype=torch.float32, device_type="cpu",
        input_grad=False, factor_grad=True, bias=True, path=None,
    )  # fmt: skip
    assert dflt == expl and dflt["path"] == "factorized"
    assert set(dflt["seconds"]) == {"factorized", "dense"}
    # full ranks on a big batch: forming the kernel and one convolution is cheaper
    full = tucker_conv2d_plan((64, 64, 3, 3), 64, 64, (64, 64, 16, 16), padding=1)
    assert full["path"] == "dense"
    assert full["seconds"]["dense"] < 0.9 * full["seconds"]["factorized"]
    unb = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (8, 10, 10), padding=1)
    one = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (1, 8, 10, 10), padding=1)
    assert unb == one
    assert tucker_conv2d_plan((64, 64, 3, 3), 64, 64, (64, 64, 16, 16), path="factorized")[
        "path"
    ] == "factorized"  # fmt: skip
    # the gradient flags count
    a = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (32, 8, 10, 10), input_grad=True)
    b = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (32, 8, 10, 10), factor_grad=False)
    c = tucker_conv2d_plan((4, 3, 3, 3), 8, 16, (32, 8, 10, 10), bias=False)
    for key in ("factorized", "dense"):
        assert a["seconds"][key] > dflt["seconds"][key] * 0 + c["seconds"][key]
        assert b["seconds"][key] < c["seconds"][key]


# --------------------------------------------------------------------------- shared helpers


def _layouts(t):
    return [t, t.contiguous(memory_format=torch.channels_last)]


@pytest.mark.parametrize("o", [4, 16])
def test_contract_channels_in_every_layout(o):
    t = torch.randn(2, 5, 3, 4, dtype=F64)
    m = torch.randn(o, 5, dtype=F64)
    bias = torch.randn(o, dtype=F64)
    for tt, channels_last, b, fresh in itertools.product(
        _layouts(t), (False, True), (None, bias), (False, True)
    ):
        want = torch.einsum("oc,nchw->nohw", m, t)
        if b is not None:
            want = want + b[:, None, None]
        out = _channels.contract_channels(tt, m, channels_last, b, fresh=fresh)
        torch.testing.assert_close(out, want, **TOL)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
        if fresh:
            out.relu_()  # not a view of a tensor made inside: in-place use is allowed


def test_channel_grad_in_every_layout():
    for i, j in ((3, 5), (5, 3), (4, 4)):
        a = torch.randn(2, i, 3, 4, dtype=F64)
        b = torch.randn(2, j, 3, 4, dtype=F64)
        want = torch.einsum("nihw,njhw->ij", a, b)
        for aa, bb in itertools.product(_layouts(a), _layouts(b)):
            torch.testing.assert_close(_channels.channel_grad(aa, bb), want, **TOL)
    empty = _channels.channel_grad(torch.zeros(0, 3, 2, 2), torch.zeros(0, 4, 2, 2))
    assert empty.shape == (3, 4) and torch.all(empty == 0)


def test_layout_predicates():
    t = torch.randn(2, 3, 4, 5)
    cl = t.contiguous(memory_format=torch.channels_last)
    assert not _channels.is_channels_last(t) and _channels.is_channels_last(cl)
    one = torch.randn(2, 1, 4, 5)  # contiguous in both senses: NCHW
    assert not _channels.is_channels_last(one.contiguous(memory_format=torch.channels_last))
    assert _channels.rank_channels_last(t)  # CPU: NHWC intermediates
    assert not _channels.layout_unknown(t)
    assert _channels.NHWC_GEMM_MIN_CHANNELS == 16


def test_conv_dispatch_helpers():
    assert _conv_dispatch.conv_batch(5) == 5
    assert _conv_dispatch.conv_batch(0) == 0
    assert _conv_dispatch.conv_batch(None) == dispatch.SYMBOLIC_ROWS
    cheap, dear = [Gemm(8, 8, 8)], [Gemm(512, 512, 512)]
    assert _conv_dispatch.choose_conv_path(dear, cheap, 4, "cpu", None) == "dense"
    assert _conv_dispatch.choose_conv_path(cheap, dear, 4, "cpu", None) == "factorized"
    # the dense path must be clearly cheaper: a tie stays factorized
    assert _conv_dispatch.choose_conv_path(cheap, cheap, 4, "cpu", None) == "factorized"
    t = dispatch.cost_model("cpu").time(cheap)
    margin = _conv_dispatch.DENSE_MARGIN
    assert margin == 0.9
    assert _conv_dispatch.choose_conv_path(dear, cheap, 4, "cpu", "factorized") == "factorized"
    assert _conv_dispatch.choose_conv_path(cheap, dear, 4, "cpu", "dense") == "dense"
    with force_path("dense"):
        assert _conv_dispatch.choose_conv_path(cheap, dear, 4, "cpu", None) == "dense"
        assert _conv_dispatch.choose_conv_path(cheap, dear, 4, "cpu", "factorized") == "factorized"
        if hasattr(dispatch, "force_kernel"):
            for kernel, path in (("function", "factorized"), ("ops", "factorized"),
                                 ("dense", "dense")):  # fmt: skip
                with dispatch.force_kernel(kernel):
                    assert _conv_dispatch.choose_conv_path(cheap, dear, 4, "cpu", None) == path
    assert t > 0
    # asymmetric padding: applied with F.pad
    x = torch.randn(1, 2, 5, 6, dtype=F64)
    w = torch.randn(3, 2, 2, 2, dtype=F64)
    for pads in ((0, 1, 0, 1), (1, 1, 2, 2), (1, 0, 2, 1), (1, 1, 0, 1), (0, 1, 2, 2)):
        top, bottom, left, right = pads
        want = F.conv2d(F.pad(x, (left, right, top, bottom)), w)
        got = _conv_dispatch.dense_conv(x, w, None, (1, 1), pads, (1, 1))
        torch.testing.assert_close(got, want, **TOL)


def test_input_gradient_alone_in_every_geometry():
    # frozen factors: the core stage's input gradient is a transposed convolution whose
    # output padding restores what the stride dropped
    c_in, c_out, r_in, r_out, k = SIZES[0]
    core, fi, fo, bias = _tensors(c_in, c_out, r_in, r_out, k, (False, False, False))
    for size, (stride, padding, dilation) in itertools.product(((7, 8), (8, 9)), GEOMETRY):
        x = torch.randn(2, c_in, *size, dtype=F64, requires_grad=True)
        y = tucker_conv2d(x, core, fi, fo, bias, stride, padding, dilation, path="factorized")
        ref = _reference(x, core, fi, fo, bias, stride, padding, dilation)
        g = torch.randn_like(ref)
        (got,) = torch.autograd.grad(y, x, g)
        (want,) = torch.autograd.grad(ref, x, g)
        torch.testing.assert_close(got, want, **TOL)


def test_flops_defaults():
    assert tucker_conv2d_flops(8, 16, 3, (4, 6), (10, 10)) == tucker_conv2d_flops(
        8, 16, 3, (4, 6), (10, 10), 1, 1, 0, 1
    )
    assert tucker_conv2d_flops(8, 16, 3, 4, (10, 10)) == tucker_conv2d_flops(
        8, 16, 3, (4, 4), (10, 10)
    )


def test_config_defaults():
    config = TuckerConv2dConfig()
    assert config == TuckerConv2dConfig(stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1))
    assert config.conv_padding == (0, 0) and config.excess_padding == (0, 0, 0, 0)
    asym = TuckerConv2dConfig(padding=(1, 2, 0, 1))
    assert asym.conv_padding == (1, 0) and asym.excess_padding == (0, 1, 0, 1)
