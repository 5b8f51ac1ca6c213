"""Generic tests every registered layer gets from one spec list (``layer_specs.SPECS``).

Forward and backward against the dense module with the layer's ``.weight`` (float64 tight,
float32), every subset of trainable tensors, gradcheck, state_dict and ``torch.save`` round
trips, init variance, repr, ``torch.compile(fullgraph=True)``, autocast, factory kwargs,
``deepcopy``, ``to_dense``, ``from_dense``, ``compress`` and ``summary``. Layer-specific
files keep only what is specific to one layer.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from layer_specs import SPECS, dense_reference
from torch import nn
from torch.autograd import gradcheck

import kronlayers
from kronlayers.registry import registered_layers

F64 = torch.float64
ids = [s.id for s in SPECS]


@pytest.fixture(params=SPECS, ids=ids)
def spec(request):
    return request.param


def test_every_registered_layer_has_a_spec():
    assert {s.cls for s in SPECS} == set(registered_layers())


def test_layers_declare_the_contract():
    for cls in registered_layers():
        assert cls.method in kronlayers.registry.methods()
        assert cls.dense_type in (nn.Linear, nn.Conv2d)
        assert getattr(kronlayers, cls.__name__) is cls
        assert cls.__doc__ and "Shape" in cls.__doc__


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)])
def test_forward_matches_dense(spec, dtype, tol):
    layer = spec.make(dtype=dtype)
    x = torch.randn(spec.input_shape, dtype=dtype)
    y = layer(x)
    ref = dense_reference(layer, x)
    assert y.shape == ref.shape and y.dtype == dtype
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)


def _trainable(layer: nn.Module) -> list[str]:
    return [name for name, _ in layer.named_parameters()]


def test_backward_every_subset_of_trainable_tensors(spec):
    layer = spec.make(dtype=F64)
    names = ["input", *_trainable(layer)]
    x0 = torch.randn(spec.input_shape, dtype=F64)
    params = dict(layer.named_parameters())
    # Reference: autograd through the dense weight, everything trainable (once: it does not
    # depend on which tensors the layer is asked for).
    xr = x0.clone().requires_grad_(True)
    ref_out = dense_reference(layer, xr)
    grad_out = torch.randn(ref_out.shape, dtype=F64)
    ref = torch.autograd.grad(ref_out, [xr, *params.values()], grad_out)
    ref = dict(zip(names, ref, strict=True))
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            x = x0.clone().requires_grad_("input" in subset)
            for name, p in params.items():
                p.requires_grad_(name in subset)
                p.grad = None
            layer(x).backward(grad_out)
            got = {n: (x.grad if n == "input" else params[n].grad) for n in names}
            for n in names:
                if n in subset:
                    assert got[n] is not None, f"{spec.id}: no gradient for {n} in {subset}"
                    torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-10)
                else:
                    assert got[n] is None, f"{spec.id}: unexpected gradient for {n}"


def test_gradcheck(spec):
    layer = spec.make(dtype=F64)
    x = torch.randn(spec.input_shape, dtype=F64, requires_grad=True)
    params = list(layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(_trainable(layer), ps, strict=True)), x)

    # fast_mode: random projections of the Jacobian; the exhaustive comparisons against the
    # dense reference are in the test above.
    assert gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_empty_batch(spec):
    layer = spec.make(dtype=F64)
    shape = (0, *spec.input_shape[1:])
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    y = layer(x)
    assert y.shape == dense_reference(layer, x).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert p.grad is not None and bool((p.grad == 0).all())


def test_state_dict_and_torch_save_round_trip(spec):
    layer = spec.make()
    fresh = spec.make()
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(spec.input_shape)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    loaded = spec.make()
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)


def test_init_variance_matches_the_dense_layer(spec):
    layer = spec.make(dtype=F64)
    dense = layer.to_dense()
    fan_in = dense.weight[0].numel()
    target = 1.0 / (3.0 * fan_in)  # nn.Linear / nn.Conv2d default weight variance
    torch.manual_seed(1)
    samples = []
    for _ in range(200):
        layer.reset_parameters()
        samples.append(layer.weight.detach().flatten())
    var = torch.cat(samples).var().item()
    assert 0.8 * target < var < 1.25 * target, (var, target)
    if layer.bias is not None:
        bound = 1.0 / fan_in**0.5
        assert layer.bias.abs().max() <= bound


def test_repr_is_consistent(spec):
    layer = spec.make()
    text = repr(layer)
    assert text.startswith(type(layer).__name__ + "(")
    assert layer.rank_label() in text
    assert f"compression={layer.compression_ratio:.1f}x" in text
    assert layer.compression_ratio == pytest.approx(layer.dense_num_weights() / layer.num_weights())


def test_counts(spec):
    layer = spec.make()
    dense = layer.to_dense()
    assert layer.dense_num_weights() == dense.weight.numel()
    assert layer.num_weights() == sum(p.numel() for p in layer.factor_parameters())
    bias = 0 if layer.bias is None else layer.bias.numel()
    assert layer.num_weights() + bias == sum(p.numel() for p in layer.parameters())
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(spec.input_shape)
    with FlopCounterMode(display=False) as counter:
        dense(x)
    assert layer.dense_flops(spec.input_shape) == counter.get_total_flops()
    assert 0 < layer.flops(spec.input_shape)


def test_compile_fullgraph(spec):
    layer = spec.make()
    x = torch.randn(spec.input_shape, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).sum().backward()
    for g, p in zip(grads, layer.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_autocast_bfloat16(spec):
    layer = spec.make()
    x = torch.randn(spec.input_shape)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.1, atol=0.1)
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


def test_factory_kwargs(spec):
    layer = spec.make(dtype=F64)
    assert all(p.dtype == F64 for p in layer.parameters())
    meta = spec.make(device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_deepcopy(spec):
    layer = spec.make()
    clone = copy.deepcopy(layer)
    x = torch.randn(spec.input_shape)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    for a, b in zip(clone.parameters(), layer.parameters(), strict=True):
        assert a.data_ptr() != b.data_ptr()


def test_to_dense_and_from_dense(spec):
    layer = spec.make(dtype=F64)
    dense = layer.to_dense()
    assert type(dense) is layer.dense_type
    x = torch.randn(spec.input_shape, dtype=F64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-10, atol=1e-10)
    back = type(layer).from_dense(dense, **spec.convert(layer))
    # Exact for Kronecker (SVD) and Tucker (HOSVD); CP's ALS converges to about 1e-5 here.
    assert back.reconstruction_error < 1e-4
    torch.testing.assert_close(back(x), layer(x), rtol=1e-3, atol=1e-4)


def test_compress_and_summary_find_the_layer(spec):
    layer = spec.make(dtype=F64)
    model = nn.Sequential(layer.to_dense())
    options = spec.convert(layer)
    rank = options["rank"]
    model, report = kronlayers.compress(model, method=type(layer).method, rank=rank)
    (record,) = report
    if record.skipped:  # only when the layer is not smaller than the dense one
        assert layer.num_weights() >= layer.dense_num_weights()
        return
    assert type(model[0]) is type(layer)
    info = kronlayers.summary(model, spec.input_shape, dtype=F64)
    (row,) = [r for r in info.rows if r.compressed]
    assert row.flops == model[0].flops(spec.input_shape)
    assert row.dense_flops == layer.dense_flops(spec.input_shape)


def test_output_can_be_modified_in_place(spec):
    # nn.ReLU(inplace=True) right after a layer: the output must not be a view of a tensor
    # made inside the autograd Function.
    layer = spec.make(dtype=F64)
    x = torch.randn(spec.input_shape, dtype=F64, requires_grad=True)
    y = layer(x)
    ref = dense_reference(layer, x).relu()
    y.relu_()
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    dense_reference(layer, xr).relu().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-10)
