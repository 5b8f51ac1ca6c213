"""The factorized-or-dense dispatch of the convolution kernels (CP and Tucker).

Every path computes the same function and gradients (float64 against ``F.conv2d`` with the
formed kernel), whichever the cost model picks, and the choice itself follows the cost:
low ranks run factorized, ranks high enough that the chain of small convolutions costs more
than one dense convolution run dense.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kronlayers import CPConv2d, TuckerConv2d
from kronlayers.functional import (
    cp_conv2d,
    cp_conv2d_kernel,
    cp_conv2d_plan,
    tucker_conv2d,
    tucker_conv2d_kernel,
    tucker_conv2d_plan,
)
from kronlayers.functional._dispatch import force_kernel, force_path

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

# (C_in, C_out, kernel, stride, padding, dilation, (N, H, W), channels_last)
CASES = [
    (3, 4, (3, 3), 1, 1, 1, (2, 6, 5), False),
    (4, 6, (2, 2), 1, "same", 1, (1, 5, 6), False),  # asymmetric padding
    (5, 3, (3, 1), (2, 1), (1, 0), (1, 2), (2, 7, 6), True),
    (4, 4, (1, 1), 1, 0, 1, (0, 3, 3), False),  # empty batch
    (2, 5, (3, 3), 1, "valid", 1, (None, 5, 5), False),  # unbatched
]


def _cp(c_in, c_out, kernel, rank):
    def f(*shape):
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    return [f(c_in, rank)], [f(c_out, rank)], (f(kernel[0], rank), f(kernel[1], rank))


def _tucker(c_in, c_out, kernel, ranks):
    r_in, r_out = ranks
    core = torch.randn(r_out, r_in, *kernel, dtype=F64, requires_grad=True)
    return (
        core,
        torch.randn(c_in, r_in, dtype=F64, requires_grad=True),
        torch.randn(c_out, r_out, dtype=F64, requires_grad=True),
    )


def _input(c_in, nhw, channels_last):
    n, h, w = nhw
    x = torch.randn(c_in, h, w, dtype=F64) if n is None else torch.randn(n, c_in, h, w, dtype=F64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", [None, "function", "dense"])
@pytest.mark.parametrize("layer", ["cp", "tucker"])
def test_every_path_matches_the_dense_convolution(case, kernel, layer):
    c_in, c_out, k, stride, padding, dilation, nhw, channels_last = case
    x = _input(c_in, nhw, channels_last)
    bias = torch.randn(c_out, dtype=F64, requires_grad=True)
    if layer == "cp":
        ins, outs, ks = _cp(c_in, c_out, k, 3)
        params = [x, bias, *ins, *outs, *ks]
        weight = cp_conv2d_kernel(ins, outs, ks)

        def run():
            return cp_conv2d(x, ins, outs, ks, bias, stride, padding, dilation)
    else:
        core, fin, fout = _tucker(c_in, c_out, k, (2, 3))
        params = [x, bias, core, fin, fout]
        weight = tucker_conv2d_kernel(core, fin, fout)

        def run():
            return tucker_conv2d(x, core, fin, fout, bias, stride, padding, dilation)

    ref = F.conv2d(x, weight, bias, stride, padding, dilation)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, params, g)
    with force_kernel(kernel):
        y = run()
        grads = torch.autograd.grad(y, params, g)
    torch.testing.assert_close(y, ref, **TOL)
    if channels_last and nhw[0]:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for got, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, r, **TOL)


def test_cost_model_switches_to_dense_at_high_rank():
    shape = (32, 64, 32, 32)
    low = cp_conv2d_plan(64, 64, 3, 32, shape, padding=1, input_grad=True)
    high = cp_conv2d_plan(64, 64, 3, 1024, shape, padding=1, input_grad=True)
    assert low["path"] == "factorized" and high["path"] == "dense"
    assert low["seconds"]["factorized"] < low["seconds"]["dense"]
    assert high["seconds"]["dense"] < high["seconds"]["factorized"]
    low = tucker_conv2d_plan((8, 8, 3, 3), 64, 64, shape, padding=1, input_grad=True)
    high = tucker_conv2d_plan((128, 128, 3, 3), 64, 64, shape, padding=1, input_grad=True)
    assert low["path"] == "factorized" and high["path"] == "dense"
    # Forcing: the argument, then force_kernel, then force_path.
    with force_path("dense"):
        assert cp_conv2d_plan(64, 64, 3, 32, shape, padding=1)["path"] == "dense"
        with force_kernel("function"):
            assert cp_conv2d_plan(64, 64, 3, 32, shape, padding=1)["path"] == "factorized"
            plan = tucker_conv2d_plan((8, 8, 3, 3), 64, 64, shape, padding=1, path="dense")
            assert plan["path"] == "dense"
    with pytest.raises(ValueError, match="path must be one of"):
        cp_conv2d_plan(4, 4, 3, 2, (1, 4, 5, 5), path="sparse")
    with pytest.raises(TypeError, match="path must be a str"):
        tucker_conv2d(torch.randn(1, 2, 3, 3), *_tucker(2, 2, (1, 1), (1, 1))[:3], path=1)


@pytest.mark.parametrize("cls", [CPConv2d, TuckerConv2d])
def test_modules_report_and_take_the_dispatched_path(cls):
    # A layer at full rank (more than the dense kernel holds) runs dense; the module says so.
    rank = 512 if cls is CPConv2d else (32, 32)
    layer = cls(32, 32, 3, padding=1, rank=rank, dtype=F64)
    x = torch.randn(8, 32, 16, 16, dtype=F64, requires_grad=True)
    assert layer.dispatch_path(tuple(x.shape)) == "dense"
    y = layer(x)
    assert "Convolution" in type(y.grad_fn).__name__
    ref = F.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(y, ref, **TOL)
    small = cls(32, 32, 3, padding=1, rank=4 if cls is CPConv2d else (4, 4), dtype=F64)
    assert small.dispatch_path(tuple(x.shape)) == "factorized"
    assert "Function" in type(small(x).grad_fn).__name__
