"""cp_conv2d (functional, hand-written backward) and the CPConv2d module."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronlayers import CPConv2d
from kronlayers.decomposition import cp_to_tensor
from kronlayers.functional import CPConv2dFunction, cp_conv2d, cp_conv2d_flops
from kronlayers.functional._dispatch import force_kernel
from kronlayers.functional.cp_conv2d import cp_conv2d_kernel

pytestmark = [
    # Raised by the dense F.conv2d reference, not by the layer.
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    # TensorLy's SVD initialisation when the rank exceeds a mode's size (from_conv tests).
    pytest.mark.filterwarnings("ignore:Trying to compute SVD:UserWarning"),
]

F64 = torch.float64


@pytest.fixture(autouse=True)
def _hand_written_kernel():
    # These tests are about the hand-written CPConv2dFunction (its saved tensors, layouts and
    # gradients): the dispatcher would send small problems to the dense path instead
    # (tests/test_conv_dispatch.py covers that path and the choice).
    with force_kernel("function"):
        yield


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _no_tf32():
    # On Ampere+ GPUs cuDNN convolutions default to TF32, which would make the dense float32
    # reference (not the layer) the inaccurate side of every comparison.
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_factors(in_shape, out_shape, kernel_size, rank, dtype=F64, device="cpu"):
    def p(n):
        return torch.randn(n, rank, dtype=dtype, device=device, requires_grad=True)

    ins = [p(i) for i in in_shape]
    outs = [p(o) for o in out_shape]
    ks = (p(kernel_size[0]), p(kernel_size[1]))
    return ins, outs, ks


def dense_reference(x, ins, outs, ks, bias, stride, padding, dilation):
    """F.conv2d through the dense kernel, differentiated by autograd."""
    return F.conv2d(x, cp_conv2d_kernel(ins, outs, ks), bias, stride, padding, dilation)


def assert_matches_dense(x, ins, outs, ks, bias, stride, padding, dilation, tol):
    params = [t for t in (x, *ins, *outs, *ks, bias) if t is not None and t.requires_grad]
    y = cp_conv2d(x, ins, outs, ks, bias, stride, padding, dilation)
    y_ref = dense_reference(x, ins, outs, ks, bias, stride, padding, dilation)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **tol)
    return y


# A representative (not cartesian) grid: every kernel shape, stride, dilation, padding form,
# rank regime (1, small -> NCHW intermediates, >= 16 -> channels-last intermediates on CPU),
# channel order 1 and 2, batch 1, H != W, bias on/off, channels-last input.
# (in_shape, out_shape, kernel, rank, stride, padding, dilation, N, H, W, bias, channels_last)
GRID = [
    ((4,), (6,), (1, 1), 1, 1, 0, 1, 2, 5, 7, True, False),
    ((4,), (6,), (3, 3), 3, 1, 1, 1, 2, 6, 5, True, False),
    ((2, 3), (3, 2), (3, 3), 4, 2, (1, 0), 1, 1, 7, 6, False, False),
    ((5,), (2, 2), (5, 5), 2, 1, "same", 1, 2, 6, 7, True, False),
    ((3,), (4,), (3, 1), 3, (2, 1), "valid", (1, 2), 2, 7, 5, True, False),
    ((2, 2), (5,), (2, 4), 5, 1, "same", 2, 1, 8, 6, True, False),
    ((2, 2), (5,), (2, 4), 3, 1, "same", (2, 1), 2, 7, 9, False, True),
    ((6,), (3,), (3, 3), 17, 1, 1, 2, 2, 7, 6, True, False),
    ((2, 3), (2, 3), (3, 3), 16, (1, 2), (2, 1), 1, 1, 5, 8, True, True),
    ((3,), (4,), (1, 1), 2, 2, 0, 1, 3, 5, 4, False, True),
    ((4,), (1,), (2, 2), 1, 2, 1, 1, 2, 6, 6, True, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", GRID)
def test_functional_matches_dense(device, dtype, case):
    in_shape, out_shape, k, rank, stride, padding, dilation, n, h, w, use_bias, cl = case
    ins, outs, ks = make_factors(in_shape, out_shape, k, rank, dtype, device)
    c_in, c_out = math.prod(in_shape), math.prod(out_shape)
    x = torch.randn(n, c_in, h, w, dtype=dtype, device=device)
    if cl:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    bias = torch.randn(c_out, dtype=dtype, device=device, requires_grad=True) if use_bias else None
    y = assert_matches_dense(x, ins, outs, ks, bias, stride, padding, dilation, TOL[dtype])
    if cl and c_out > 1:
        assert y.is_contiguous(memory_format=CL)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize(
    "case",
    [
        # in_shape, out_shape, kernel, rank, stride, padding, dilation, channels_last
        ((3,), (2,), (3, 3), 2, 1, 1, 1, False),
        ((2, 2), (3,), (2, 3), 3, (2, 1), (1, 0), (1, 2), False),  # W extent 5
        ((3,), (2, 2), (2, 2), 2, 1, "same", 1, True),
        ((2,), (3,), (3, 1), 17, 1, "same", 2, False),
    ],
)
def test_gradcheck(case):
    in_shape, out_shape, k, rank, stride, padding, dilation, cl = case
    ins, outs, ks = make_factors(in_shape, out_shape, k, rank)
    x = torch.randn(2, math.prod(in_shape), 4, 5, dtype=F64)
    if cl:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    bias = torch.randn(math.prod(out_shape), dtype=F64, requires_grad=True)
    n_in = len(ins)

    def fn(x, bias, kh, kw, *factors):
        return cp_conv2d(
            x, factors[:n_in], factors[n_in:], (kh, kw), bias, stride, padding, dilation
        )

    inputs = (x, bias, *ks, *ins, *outs)
    # fast_mode checks random projections of the Jacobian: same bugs caught, a fraction of
    # the forward calls.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_needs_input_grad_is_respected():
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 2)
    x = torch.randn(2, 3, 5, 5, dtype=F64, requires_grad=True)
    for t in (*ins, *outs, *ks):
        t.requires_grad_(False)
    y = cp_conv2d(x, ins, outs, ks, padding=1)
    assert isinstance(y.grad_fn, CPConv2dFunction._backward_cls)
    # A frozen layer saves neither the input nor its rank-R projection.
    saved_x, saved_u = y.grad_fn.saved_tensors[:2]
    assert saved_x is None and saved_u is None
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (gx_ref,) = torch.autograd.grad(dense_reference(x, ins, outs, ks, None, 1, 1, 1).sum(), [x])
    torch.testing.assert_close(gx, gx_ref)

    # Only the kernel factors train: the input is not saved (not needed), u is.
    ks[0].requires_grad_(True)
    x2 = x.detach()
    y = cp_conv2d(x2, ins, outs, ks, padding=1)
    saved_x, saved_u = y.grad_fn.saved_tensors[:2]
    assert saved_x is None and saved_u is not None
    y.sum().backward()
    kh_ref = ks[0].detach().clone().requires_grad_(True)
    dense_reference(x2, ins, outs, (kh_ref, ks[1]), None, 1, 1, 1).sum().backward()
    torch.testing.assert_close(ks[0].grad, kh_ref.grad)
    assert all(t.grad is None for t in (*ins, *outs, ks[1]))


@pytest.mark.parametrize("which", ["in", "out", "bias", "x"])
def test_single_gradient(which):
    ins, outs, ks = make_factors((2, 2), (3,), (2, 3), 3)
    x = torch.randn(2, 4, 6, 5, dtype=F64)
    bias = torch.randn(3, dtype=F64)
    for t in (*ins, *outs, *ks):
        t.requires_grad_(False)
    target = {"in": ins[1], "out": outs[0], "bias": bias, "x": x}[which]
    target.requires_grad_(True)
    (g,) = torch.autograd.grad(
        cp_conv2d(x, ins, outs, ks, bias, 2, "valid").square().sum(), [target]
    )
    ref = dense_reference(x, ins, outs, ks, bias, 2, 0, 1).square().sum()
    (g_ref,) = torch.autograd.grad(ref, [target])
    torch.testing.assert_close(g, g_ref)


def test_unbatched_input():
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 2)
    x = torch.randn(3, 6, 5, dtype=F64, requires_grad=True)
    y = cp_conv2d(x, ins, outs, ks, padding=1)
    assert y.shape == (4, 6, 5)
    torch.testing.assert_close(y, dense_reference(x, ins, outs, ks, None, 1, 1, 1))
    layer = CPConv2d(3, 4, 3, padding="same", padding_mode="circular", rank=2, dtype=F64)
    ref = nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular", dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        ref.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), ref(x))


def test_strided_grad_output():
    # `y.sum()` back-propagates an expanded (stride-0) gradient.
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 17)
    x = torch.randn(2, 3, 6, 5, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(cp_conv2d(x, ins, outs, ks, padding=1).sum(), [ins[0]])
    (g_ref,) = torch.autograd.grad(dense_reference(x, ins, outs, ks, None, 1, 1, 1).sum(), [ins[0]])
    torch.testing.assert_close(g, g_ref)


def test_double_backward_matches_the_dense_reference():
    # The backward is made of differentiable ops: a gradient penalty reaches the factors.
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 2)
    x = torch.randn(1, 3, 5, 5, dtype=F64, requires_grad=True)
    params = [*ins, *outs, *ks]
    (g,) = torch.autograd.grad(cp_conv2d(x, ins, outs, ks).pow(2).sum(), [x], create_graph=True)
    got = torch.autograd.grad(g.pow(2).sum(), params)
    w = cp_conv2d_kernel(ins, outs, ks)
    (g_ref,) = torch.autograd.grad(F.conv2d(x, w).pow(2).sum(), [x], create_graph=True)
    ref = torch.autograd.grad(g_ref.pow(2).sum(), params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_autocast_cpu_bfloat16():
    layer = CPConv2d(8, 8, 3, padding=1, rank=4)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert layer.kh_factor.grad.dtype == torch.float32


def test_flops_formula():
    n, c_in, c_out, r, h, w = 2, 8, 16, 5, 9, 7
    flops = cp_conv2d_flops(c_in, c_out, 3, r, (h, w), batch=n, stride=2, padding=1)
    h_out, w_out = 5, 4
    assert flops == 2 * n * r * (c_in * h * w + 9 * h_out * w_out + c_out * h_out * w_out)
    assert cp_conv2d_flops(4, 4, (2, 4), 3, (6, 6), padding="same") == 2 * 3 * 36 * (4 + 8 + 4)


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


def dense_copy(layer: CPConv2d) -> nn.Conv2d:
    ref = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
        dtype=layer.kh_factor.dtype,
        device=layer.kh_factor.device,
    )
    with torch.no_grad():
        ref.weight.copy_(layer.weight)
        if layer.bias is not None:
            ref.bias.copy_(layer.bias)
    return ref


MODULE_CASES = [
    # (kwargs for CPConv2d(in, out, kernel, ...), padding_mode)
    dict(kernel_size=3, padding=1, padding_mode="zeros"),
    dict(kernel_size=(2, 4), padding="same", padding_mode="zeros", dilation=(1, 2)),
    dict(kernel_size=3, padding=(2, 1), padding_mode="reflect", stride=2),
    dict(kernel_size=(2, 4), padding="same", padding_mode="replicate"),
    dict(kernel_size=(3, 1), padding=(1, 0), padding_mode="circular", dilation=2),
    dict(kernel_size=5, padding="valid", padding_mode="reflect", bias=False),
    dict(kernel_size=(2, 2), padding="same", padding_mode="circular", rank=20),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", MODULE_CASES)
def test_module_matches_conv2d(device, kwargs):
    kwargs = dict(kwargs)
    rank = kwargs.pop("rank", 3)
    layer = CPConv2d(6, 4, rank=rank, in_shape=(2, 3), device=device, dtype=F64, **kwargs)
    ref = dense_copy(layer)
    x = torch.randn(2, 6, 9, 8, dtype=F64, device=device, requires_grad=True)
    y, y_ref = layer(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad(y, params, g)
    # Reference gradients: autograd through the dense kernel built from the same factors.
    y_w = F.conv2d(
        F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        if layer.padding_mode != "zeros"
        else x,
        layer.weight,
        layer.bias,
        layer.stride,
        0 if layer.padding_mode != "zeros" else layer.padding,
        layer.dilation,
    )
    torch.testing.assert_close(y_w, y_ref)
    grads_ref = torch.autograd.grad(y_w, params, g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_module_float32_and_weight_shape():
    layer = CPConv2d(8, 12, (3, 2), padding=1, rank=6, out_shape=(3, 4))
    assert layer.weight.shape == (12, 8, 3, 2)
    assert layer.weight.requires_grad
    x = torch.randn(3, 8, 10, 7)
    torch.testing.assert_close(layer(x), dense_copy(layer)(x), **TOL[torch.float32])


def test_module_attributes_and_repr():
    layer = CPConv2d(12, 8, 3, stride=2, padding=1, rank=0.5, in_shape=(3, 4))
    assert [tuple(f.shape) for f in layer.in_factors] == [(3, layer.rank), (4, layer.rank)]
    assert [tuple(f.shape) for f in layer.out_factors] == [(8, layer.rank)]
    assert layer.kernel_factors == (layer.kh_factor, layer.kw_factor)
    shape = (8, 3, 4, 3, 3)
    assert layer.rank == round(0.5 * math.prod(shape) / sum(shape))
    n_params = sum(p.numel() for p in layer.parameters()) - 8  # minus the bias
    assert n_params == layer.rank * sum(shape)
    assert layer.compression_ratio == pytest.approx(math.prod(shape) / n_params)
    text = repr(layer)
    for part in ("12, 8", "kernel_size=(3, 3)", "stride=(2, 2)", "padding=(1, 1)"):
        assert part in text
    assert f"rank={layer.rank}" in text and "in_shape=(3, 4)" in text and "compression=" in text
    assert layer.extra_repr() == (
        "12, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), "
        f"{layer.rank_label()}, compression={layer.compression_ratio:.1f}x"
    )
    assert layer.reconstruction_error is None


@pytest.mark.parametrize(
    "in_shape, out_shape, rel",
    [(None, None, 0.1), ((4, 8), (8, 4), 0.3)],  # 4 and 6 factors: more factors, heavier tails
)
def test_init_variance_matches_conv2d(in_shape, out_shape, rel):
    target = 1.0 / (3 * 32 * 9)  # nn.Conv2d: 1 / (3 fan_in), fan_in = 32 * 3 * 3
    second_moments = []
    for seed in range(40):
        torch.manual_seed(seed)
        layer = CPConv2d(32, 32, 3, rank=64, in_shape=in_shape, out_shape=out_shape)
        # The kernel's entries have mean zero, so E[W^2] is their variance.
        second_moments.append(layer.weight.detach().pow(2).mean().item())
        assert layer.bias.abs().max() <= 1 / math.sqrt(32 * 9)
    # One draw's estimate is skewed (entries share factors and are products of normals);
    # the mean over 40 draws stays within ~5% (4 factors) / ~15% (6 factors) of the target.
    assert sum(second_moments) / len(second_moments) == pytest.approx(target, rel=rel)
    conv = nn.Conv2d(32, 32, 3)
    assert conv.weight.var().item() == pytest.approx(target, rel=0.1)


def test_state_dict_round_trip():
    a = CPConv2d(6, 4, 3, padding=1, rank=5, in_shape=(2, 3), out_shape=(2, 2))
    b = CPConv2d(6, 4, 3, padding=1, rank=5, in_shape=(2, 3), out_shape=(2, 2))
    keys = set(a.state_dict())
    assert keys == {
        "in_factors.0",
        "in_factors.1",
        "out_factors.0",
        "out_factors.1",
        "kh_factor",
        "kw_factor",
        "bias",
    }
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_module_device_and_dtype(device):
    layer = CPConv2d(4, 6, 3, padding=1, rank=3, device=device, dtype=F64)
    assert all(p.device.type == device and p.dtype == F64 for p in layer.parameters())
    y = layer(torch.randn(2, 4, 5, 5, dtype=F64, device=device))
    assert y.device.type == device and y.dtype == F64
    layer.float()
    assert layer(torch.randn(1, 4, 5, 5, device=device)).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------


def test_from_conv_recovers_exact_cp_kernel():
    torch.manual_seed(1)
    fs = [torch.randn(d, 3, dtype=F64) for d in (5, 2, 2, 3, 3)]  # (out, in_1, in_2, kh, kw)
    conv = nn.Conv2d(4, 5, 3, stride=2, padding=(1, 2), dilation=(1, 2), dtype=F64)
    conv.padding_mode = "reflect"
    with torch.no_grad():
        conv.weight.copy_(cp_to_tensor(fs).reshape(5, 4, 3, 3))
    layer = CPConv2d.from_conv(conv, rank=3, in_shape=(2, 2))
    assert layer.reconstruction_error < 1e-6
    assert layer.stride == (2, 2) and layer.padding == (1, 2) and layer.dilation == (1, 2)
    assert layer.padding_mode == "reflect" and layer.in_shape == (2, 2)
    assert layer.kh_factor.dtype == F64
    torch.testing.assert_close(layer.bias, conv.bias)
    x = torch.randn(2, 4, 8, 9, dtype=F64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-6, atol=1e-6)


def test_from_conv_lossy_and_string_padding():
    conv = nn.Conv2d(8, 6, (2, 4), padding="same", bias=False)
    layer = CPConv2d.from_conv(conv, rank=0.2)
    assert layer.padding == "same" and layer.bias is None
    assert 0 < layer.reconstruction_error < 1
    expected = torch.linalg.norm(conv.weight - layer.weight) / torch.linalg.norm(conv.weight)
    assert layer.reconstruction_error == pytest.approx(expected.item(), rel=1e-4)
    x = torch.randn(1, 8, 7, 6)
    assert layer(x).shape == conv(x).shape


def test_from_conv_errors():
    with pytest.raises(ValueError, match="groups"):
        CPConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), rank=2)
    with pytest.raises(TypeError, match="conv"):
        CPConv2d.from_conv(nn.Linear(4, 4), rank=2)


@pytest.mark.parametrize("implementation", ["factorized", "reconstructed", "mobilenet"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1), bias=False),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=(1, 3), padding="valid", stride=2),
    ],
)
def test_tltorch_round_trip(implementation, kwargs):
    layer = CPConv2d(5, 6, rank=4, dtype=F64, **kwargs)
    x = torch.randn(2, 5, 9, 8, dtype=F64)
    tl_layer = layer.to_tltorch(implementation)
    assert tl_layer.implementation == implementation
    torch.testing.assert_close(tl_layer(x), layer(x))
    back = CPConv2d.from_tltorch(tl_layer)
    torch.testing.assert_close(back(x), layer(x))
    torch.testing.assert_close(back.weight, layer.weight)


def test_from_tltorch_absorbs_cp_weights():
    import tltorch

    tl_layer = tltorch.FactorizedConv(
        4, 6, (3, 2), order=2, stride=(1, 2), padding=(1, 0), bias=True, factorization="cp", rank=3
    ).double()
    with torch.no_grad():
        tl_layer.weight.normal_(0, 1)
        tl_layer.weight.weights.copy_(torch.tensor([2.0, -0.5, 3.0]))
        tl_layer.bias.normal_()
    layer = CPConv2d.from_tltorch(tl_layer)
    assert layer.stride == (1, 2) and layer.padding == (1, 0) and layer.rank == 3
    x = torch.randn(2, 4, 7, 8, dtype=F64)
    torch.testing.assert_close(layer(x), tl_layer(x))
    torch.testing.assert_close(layer.weight, tl_layer.weight.to_tensor())


def test_tltorch_errors():
    import tltorch

    with pytest.raises(ValueError, match="tensorized"):
        CPConv2d(4, 4, 3, rank=2, in_shape=(2, 2)).to_tltorch()
    with pytest.raises(ValueError, match="padding_mode"):
        CPConv2d(4, 4, 3, padding=1, padding_mode="reflect", rank=2).to_tltorch()
    with pytest.raises(ValueError, match="symmetric"):
        CPConv2d(4, 4, 2, padding="same", rank=2).to_tltorch()
    with pytest.raises(ValueError, match="implementation"):
        CPConv2d(4, 4, 3, rank=2).to_tltorch("fast")
    tucker = tltorch.FactorizedConv(4, 4, 3, order=2, factorization="tucker", rank=0.5)
    with pytest.raises(ValueError, match="CP weight"):
        CPConv2d.from_tltorch(tucker)
    conv1d = tltorch.FactorizedConv(4, 4, 3, order=1, factorization="cp", rank=2)
    with pytest.raises(ValueError, match="order=2"):
        CPConv2d.from_tltorch(conv1d)
    with pytest.raises(TypeError, match="FactorizedConv"):
        CPConv2d.from_tltorch(nn.Conv2d(4, 4, 3))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=-2), ValueError, "rank"),
        (dict(rank=1.5), ValueError, "rank"),
        (dict(rank=0.0), ValueError, "rank"),
        (dict(rank="4"), TypeError, "rank"),
        (dict(rank=2, in_shape=(2, 3)), ValueError, "in_shape"),
        (dict(rank=2, out_shape=(3, 3)), ValueError, "out_shape"),
        (dict(rank=2, in_shape=4), TypeError, "in_shape"),
        (dict(rank=2, in_shape=()), ValueError, "in_shape"),
        (dict(rank=2, out_shape=(2, 0, 3)), ValueError, "out_shape"),
        (dict(rank=2, kernel_size=0), ValueError, "kernel_size"),
        (dict(rank=2, kernel_size=(3, 3, 3)), ValueError, "kernel_size"),
        (dict(rank=2, kernel_size=2.5), TypeError, "kernel_size"),
        (dict(rank=2, stride=0), ValueError, "stride"),
        (dict(rank=2, stride=(1,)), ValueError, "stride"),
        (dict(rank=2, stride=(1, 1.0)), TypeError, "stride"),
        (dict(rank=2, padding=-1), ValueError, "padding"),
        (dict(rank=2, padding=(1, 2, 3)), ValueError, "padding"),
        (dict(rank=2, padding="full"), ValueError, "padding"),
        (dict(rank=2, padding="same", stride=2), ValueError, "padding='same'"),
        (dict(rank=2, dilation=0), ValueError, "dilation"),
        (dict(rank=2, dilation=(True, 1)), TypeError, "dilation"),
        (dict(rank=2, groups=2), ValueError, "groups"),
        (dict(rank=2, padding_mode="mirror"), ValueError, "padding_mode"),
        (dict(rank=2, in_channels=0), ValueError, "in_channels"),
        # Wrong Python types are TypeErrors that name the argument.
        (dict(rank=2, stride="a"), TypeError, "stride must be an int or a pair of ints"),
        (dict(rank=2, stride=1.5), TypeError, "stride must be an int or a pair of ints"),
        (dict(rank=2, padding=1.5), TypeError, "padding must be an int or a pair of ints"),
        (dict(rank=2, in_channels=4.0), TypeError, "in_channels must be an int, got float"),
        (dict(rank=2, groups=1.0), TypeError, "groups must be an int, got float"),
    ],
)
def test_module_errors(kwargs, exc, match):
    args = dict(in_channels=4, out_channels=6, kernel_size=3)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        CPConv2d(**args)


def test_functional_errors():
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 2)
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    with pytest.raises(ValueError, match="input must have shape"):
        cp_conv2d(torch.randn(2, 5, 6, 6, dtype=F64), ins, outs, ks)
    with pytest.raises(ValueError, match="input must have shape"):
        cp_conv2d(torch.randn(3, 6, dtype=F64), ins, outs, ks)
    with pytest.raises(ValueError, match="share the rank"):
        cp_conv2d(x, ins, [torch.randn(4, 3, dtype=F64)], ks)
    with pytest.raises(ValueError, match="kernel_factors"):
        cp_conv2d(x, ins, outs, ks[:1])
    with pytest.raises(ValueError, match=r"in_factors\[0\]"):
        cp_conv2d(x, [torch.randn(3, 2, 1, dtype=F64)], outs, ks)
    with pytest.raises(ValueError, match="bias"):
        cp_conv2d(x, ins, outs, ks, bias=torch.randn(5, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        cp_conv2d(x.float(), ins, outs, ks)
    with pytest.raises(ValueError, match="stride"):
        cp_conv2d(x, ins, outs, ks, stride=-1)
    with pytest.raises(ValueError, match="padding='same'"):
        cp_conv2d(x, ins, outs, ks, stride=2, padding="same")
    with pytest.raises(ValueError, match="dilation"):
        cp_conv2d(x, ins, outs, ks, dilation=(1, 2, 3))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        cp_conv2d(x, ins, outs, ks, dilation=3)
    with pytest.raises(TypeError, match="in_factors"):
        cp_conv2d(x, ins[0], outs, ks)
    with pytest.raises(ValueError, match="at least one"):
        cp_conv2d(x, [], outs, ks)
    with pytest.raises(TypeError, match="input"):
        cp_conv2d(x.numpy(), ins, outs, ks)
    layer = CPConv2d(4, 4, 3, rank=2)
    with pytest.raises(ValueError, match="input must have shape"):
        layer(torch.randn(1, 3, 6, 6))


def test_functional_dtype_device_and_type_errors_name_the_argument():
    ins, outs, ks = make_factors((3,), (4,), (3, 3), 2, dtype=torch.float32)
    x = torch.randn(2, 3, 6, 6)
    f64 = "must have the input's dtype torch.float32, got torch.float64"
    with pytest.raises(TypeError, match=r"in_factors\[0\] " + f64):
        cp_conv2d(x, [ins[0].double()], outs, ks)
    with pytest.raises(TypeError, match=r"out_factors\[0\] " + f64):
        cp_conv2d(x, ins, [outs[0].double()], ks)
    with pytest.raises(TypeError, match=r"kernel_factors\[0\] " + f64):
        cp_conv2d(x, ins, outs, (ks[0].double(), ks[1]))
    with pytest.raises(TypeError, match="bias " + f64):
        cp_conv2d(x, ins, outs, ks, torch.randn(4, dtype=F64))
    meta = "must be on the input's device cpu, got meta"
    with pytest.raises(ValueError, match=r"kernel_factors\[1\] " + meta):
        cp_conv2d(x, ins, outs, (ks[0], torch.empty(3, 2, device="meta")))
    with pytest.raises(ValueError, match="bias " + meta):
        cp_conv2d(x, ins, outs, ks, torch.empty(4, device="meta"))
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints, got 'a'"):
        cp_conv2d(x, ins, outs, ks, stride="a")
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints, got 1.5"):
        cp_conv2d(x, ins, outs, ks, stride=1.5)
    with pytest.raises(TypeError, match="padding must be an int or a pair of ints"):
        cp_conv2d(x, ins, outs, ks, padding=1.5)
    with pytest.raises(TypeError, match="kernel_factors must be a pair"):
        cp_conv2d(x, ins, outs, ks[0])
    with pytest.raises(ValueError, match="kernel_factors must be a pair"):
        cp_conv2d(x, ins, outs, (*ks, ks[0]))


def test_numpy_ints_are_accepted():
    layer = CPConv2d(
        np.int64(4),
        np.int64(6),
        np.int64(3),
        stride=np.int64(2),
        padding=(np.int64(1), 1),
        rank=np.int64(2),
        in_shape=(np.int64(2), 2),
        dtype=F64,
    )
    assert (layer.in_channels, layer.out_channels, layer.rank) == (4, 6, 2)
    assert layer.kernel_size == (3, 3) and layer.stride == (2, 2) and layer.padding == (1, 1)
    assert layer.in_shape == (2, 2)
    ints = (layer.in_channels, layer.out_channels, layer.rank, *layer.kernel_size, *layer.stride)
    assert all(type(v) is int for v in (*ints, *layer.padding, *layer.in_shape))
    x = torch.randn(2, 4, 7, 7, dtype=F64)
    torch.testing.assert_close(layer(x), dense_copy(layer)(x))
    ins, outs, ks = make_factors((4,), (6,), (3, 3), 2)
    y = cp_conv2d(x, ins, outs, ks, None, np.int64(2), np.int64(1), (np.int64(1), 1))
    torch.testing.assert_close(y, dense_reference(x, ins, outs, ks, None, 2, 1, 1))


# ----------------------------------------------------------------------------------------------
# Random configurations
# ----------------------------------------------------------------------------------------------


@st.composite
def conv_configs(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    form = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if form == "same":
        sh = sw = 1
        padding = "same"
    elif form == "valid":
        padding = "valid"
    elif form == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    h = draw(st.integers(dh * (kh - 1) + 1, dh * (kh - 1) + 5))
    w = draw(st.integers(dw * (kw - 1) + 1, dw * (kw - 1) + 5))
    in_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    out_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    rank = draw(st.sampled_from([1, 2, 3, 16]))
    return dict(
        kernel=(kh, kw),
        stride=(sh, sw),
        dilation=(dh, dw),
        padding=padding,
        hw=(h, w),
        in_shape=in_shape,
        out_shape=out_shape,
        rank=rank,
        n=draw(st.integers(1, 2)),
        bias=draw(st.booleans()),
        channels_last=draw(st.booleans()),
    )


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs())
def test_random_configurations(cfg):
    ins, outs, ks = make_factors(cfg["in_shape"], cfg["out_shape"], cfg["kernel"], cfg["rank"])
    c_in, c_out = math.prod(cfg["in_shape"]), math.prod(cfg["out_shape"])
    x = torch.randn(cfg["n"], c_in, *cfg["hw"], dtype=F64)
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    bias = torch.randn(c_out, dtype=F64, requires_grad=True) if cfg["bias"] else None
    assert_matches_dense(
        x, ins, outs, ks, bias, cfg["stride"], cfg["padding"], cfg["dilation"], TOL[F64]
    )
