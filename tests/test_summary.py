"""kronlayers.summary: per-layer parameters and forward FLOPs (2 FLOPs per multiply-add)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kronlayers import CPConv2d, CPLinear, KroneckerLinear, compress, summary
from kronlayers.functional import cp_conv2d_flops, cp_linear_flops, kronecker_linear_flops
from kronlayers.summary import LayerSummary, ModelSummary


def test_dense_mlp_counts():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5, bias=False))
    s = summary(model, (4, 3, 20))
    assert isinstance(s, ModelSummary)
    assert [r.name for r in s.rows] == ["0", "1", "2"]
    lin0, relu, lin2 = s.rows
    assert isinstance(lin0, LayerSummary)
    assert lin0.input_shape == (4, 3, 20) and lin0.output_shape == (4, 3, 30)
    assert (lin0.params, lin0.flops) == (20 * 30 + 30, 2 * 12 * 20 * 30)
    assert (relu.params, relu.flops) == (0, None)
    assert (lin2.params, lin2.flops) == (30 * 5, 2 * 12 * 30 * 5)
    assert not any(r.compressed for r in s.rows)
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.total_flops == 2 * 12 * (20 * 30 + 30 * 5)
    assert (s.total_dense_params, s.total_dense_flops) == (s.total_params, s.total_flops)


def test_kronecker_layer_counts_and_dense_equivalent():
    layer = KroneckerLinear(784, 256, rank=3)
    s = summary(nn.Sequential(layer), (8, 784))
    (row,) = s.rows
    assert row.kind == "KroneckerLinear" and row.compressed
    assert row.params == 3 * (16 * 28 + 16 * 28) + 256
    assert row.flops == kronecker_linear_flops((28, 28), (16, 16), 3, 8)
    assert row.flops == layer.flops((8, 784))
    assert row.dense_params == 784 * 256 + 256
    assert row.dense_flops == 2 * 8 * 784 * 256 == layer.dense_flops((8, 784))
    assert s.total_dense_params == 784 * 256 + 256
    assert s.total_dense_flops == 2 * 8 * 784 * 256


def test_conv_flops():
    conv = nn.Conv2d(4, 6, (3, 5), stride=2, padding=1, groups=2)
    s = summary(nn.Sequential(conv, nn.Flatten()), (2, 4, 11, 13))
    row = s.rows[0]
    ho, wo = (11 + 2 - 3) // 2 + 1, (13 + 2 - 5) // 2 + 1
    assert row.output_shape == (2, 6, ho, wo)
    assert row.flops == 2 * (2 * 6 * ho * wo * (4 // 2) * 3 * 5)
    assert row.params == conv.weight.numel() + 6


def test_dense_flops_are_in_the_unit_of_torch_flop_counter():
    # 2 FLOPs per multiply-add, as torch.utils.flop_counter counts them (bias excluded).
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    s = summary(model, (2, 3, 16, 16))
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, 16, 16))
    assert s.total_flops == s.total_dense_flops == counter.get_total_flops()


def test_compressed_totals_match_the_dense_model():
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    before = summary(dense, (5, 64))
    compressed, _ = compress(dense, rank=2, inplace=False)
    after = summary(compressed, (5, 64))
    assert after.total_dense_params == before.total_params
    assert after.total_dense_flops == before.total_flops
    assert after.total_params < before.total_params
    assert after.total_flops < before.total_flops
    text = str(after)
    assert "KroneckerLinear" in text and "compression:" in text
    assert "2 per multiply-add" in text
    assert f"{after.total_params:,}" in text and f"{before.total_flops:,}" in text


def test_state_is_restored_and_running_stats_untouched():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    model[2].eval()
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    s = summary(model, (4, 8))
    assert model.training and model[1].training and not model[2].training
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])
    assert not model[0]._forward_hooks
    assert s.rows[1].kind == "BatchNorm1d" and s.rows[1].flops is None
    assert s.rows[1].params == 16


def test_shared_module_called_twice():
    shared = KroneckerLinear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    s = summary(model, (2, 16))
    kron_rows = [r for r in s.rows if r.compressed]
    assert len(kron_rows) == 2 and kron_rows[0].name == kron_rows[1].name == "0"
    assert s.total_params == sum(p.numel() for p in shared.parameters())
    assert s.total_dense_params == 16 * 16 + 16
    assert s.total_flops == 2 * kronecker_linear_flops((4, 4), (4, 4), 1, 2)


def test_several_inputs_and_integer_dtype():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 12)
            self.proj = nn.Linear(12, 6)

        def forward(self, ids, extra):
            return self.proj(self.embed(ids)) + extra

    s = summary(Model(), [(2, 3), (2, 3, 6)], dtype=torch.long)
    assert [r.kind for r in s.rows] == ["Embedding", "Linear"]
    assert s.rows[1].flops == 2 * 6 * 12 * 6
    assert repr(s).startswith("ModelSummary(rows=2")


@pytest.mark.parametrize(
    ("input_size", "exc", "match"),
    [
        (4, TypeError, "input_size must be a shape"),
        ((), ValueError, "input_size must be a shape"),
        ((2, "8"), TypeError, "input_size must be a shape"),
        ((2, -8), ValueError, "non-negative"),
    ],
)
def test_input_size_errors(input_size, exc, match):
    with pytest.raises(exc, match=match):
        summary(nn.Linear(8, 8), input_size)


def test_input_size_accepts_numpy_ints():
    s = summary(nn.Linear(8, 8), (np.int64(4), np.int64(8)))
    assert s.rows[0].input_shape == (4, 8)
    assert s.total_flops == 2 * 4 * 8 * 8


def test_other_argument_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        summary(lambda x: x, (1, 8))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        summary(nn.Linear(8, 8), (1, 8), dtype="float32")


def test_cp_linear_counts():
    layer = CPLinear(96, 40, rank=5)
    s = summary(layer, (3, 7, 96))
    (row,) = s.rows
    assert row.name == "" and row.compressed
    assert row.flops == cp_linear_flops((8, 12), (5, 8), 5, 21)
    assert row.params == 5 * (8 + 12 + 5 + 8) + 40
    assert (row.dense_params, row.dense_flops) == (96 * 40 + 40, 2 * 21 * 96 * 40)


@pytest.mark.parametrize(
    ("kwargs", "padded"),
    [
        ({"stride": 2, "padding": 1}, False),
        ({"padding": 1, "padding_mode": "reflect"}, True),
        ({"padding": "same", "dilation": 2, "bias": False}, False),
    ],
)
def test_cp_conv_counts(kwargs, padded):
    conv = CPConv2d(4, 6, 3, rank=3, **kwargs)
    s = summary(nn.Sequential(conv), (2, 4, 9, 8))
    (row,) = s.rows
    _, _, ho, wo = row.output_shape
    if padded:  # the module pads the input itself, then convolves without padding
        expected = cp_conv2d_flops(4, 6, 3, 3, (11, 10), 2, 1, 0)
    else:
        expected = cp_conv2d_flops(
            4,
            6,
            3,
            3,
            (9, 8),
            2,
            kwargs.get("stride", 1),
            kwargs["padding"],
            kwargs.get("dilation", 1),
        )
    assert row.flops == expected == conv.flops((2, 4, 9, 8))
    assert row.dense_flops == 2 * (2 * 6 * ho * wo * 4 * 9) == conv.dense_flops((2, 4, 9, 8))
    assert row.dense_params == 6 * 4 * 9 + (6 if kwargs.get("bias", True) else 0)
    assert row.params == 3 * (6 + 4 + 3 + 3) + (6 if kwargs.get("bias", True) else 0)


def test_cp_totals_match_the_dense_model():
    def model(cp):
        conv = CPConv2d(3, 8, 3, padding=1, rank=2) if cp else nn.Conv2d(3, 8, 3, padding=1)
        lin = CPLinear(8 * 16, 10, rank=2) if cp else nn.Linear(8 * 16, 10)
        return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin)

    dense, compressed = summary(model(False), (2, 3, 4, 4)), summary(model(True), (2, 3, 4, 4))
    assert compressed.total_dense_params == dense.total_params
    assert compressed.total_dense_flops == dense.total_flops
    assert compressed.total_params < dense.total_params
