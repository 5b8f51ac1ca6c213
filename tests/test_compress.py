"""kronlayers.compress: model surgery from dense layers to compressed ones."""

import math

import pytest
import torch
from torch import nn

from kronlayers import CPConv2d, CPLinear, KroneckerLinear, compress
from kronlayers.compress import CompressionReport, LayerRecord
from kronlayers.decomposition import cp_rank_from_fraction, cp_to_tensor

F64 = torch.float64


def kron_linear(in_shape, out_shape, rank=1, bias=True):
    """An nn.Linear whose weight is exactly a rank-``rank`` Kronecker sum."""
    lin = nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=bias, dtype=F64)
    a = torch.randn(rank, out_shape[0], in_shape[0], dtype=F64)
    b = torch.randn(rank, out_shape[1], in_shape[1], dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(sum(torch.kron(a[r], b[r]) for r in range(rank)))
    return lin


def test_exact_kronecker_weights_give_the_same_model():
    model = nn.Sequential(
        kron_linear((4, 6), (3, 5), rank=2), nn.ReLU(), kron_linear((3, 5), (2, 4), rank=2)
    )
    x = torch.randn(7, 24, dtype=F64)
    expected = model(x)
    out, report = compress(model, rank=2)
    assert out is model
    assert all(isinstance(model[i], KroneckerLinear) for i in (0, 2))
    assert model[0].in_shape == (4, 6) and model[0].out_shape == (3, 5)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    assert isinstance(report, CompressionReport) and len(report) == 2
    first = report[0]
    assert isinstance(first, LayerRecord)
    assert (first.name, first.kind, first.new_kind, first.skipped) == (
        "0",
        "Linear",
        "KroneckerLinear",
        False,
    )
    assert first.old_params == 24 * 15 + 15
    assert first.new_params == 2 * (3 * 4 + 5 * 6) + 15
    assert first.error < 1e-12
    assert first.config == "in_shape=(4, 6), out_shape=(3, 5), rank=2"
    assert first.config == model[0].rank_label()


def test_report_error_matches_from_linear_and_table():
    lin = nn.Linear(16, 12)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), lin)
    reference = KroneckerLinear.from_linear(lin, rank=1)
    _, report = compress(model)
    assert report[1].name == "2"
    assert report[1].error == pytest.approx(reference.reconstruction_error, rel=1e-6)
    text = str(report)
    lines = text.splitlines()
    assert lines[0].split() == [
        "layer",
        "kind",
        "new",
        "kind",
        "params",
        "new",
        "params",
        "ratio",
        "error",
        "config",
    ]
    assert "KroneckerLinear" in text and "2 converted, 0 skipped" in text
    assert f"{report.old_params:,} -> {report.new_params:,} params" in text


def brute_force_best(n_in, n_out, ratio):
    budget = math.floor(ratio * n_in * n_out)
    best = 0
    for i1 in range(1, n_in + 1):
        for o1 in range(1, n_out + 1):
            if n_in % i1 or n_out % o1:
                continue
            s = (o1 * i1, (n_out // o1) * (n_in // i1))
            if min(s) == 1:
                continue
            for r in range(1, min(s) + 1):
                w = r * sum(s)
                if w <= budget and w < n_in * n_out:
                    best = max(best, w)
    return best


@pytest.mark.parametrize(("n_in", "n_out", "ratio"), [(48, 20, 0.2), (36, 36, 0.07), (30, 8, 0.5)])
def test_ratio_picks_largest_factorization_within_budget(n_in, n_out, ratio):
    model = nn.Sequential(nn.Linear(n_in, n_out))
    _, report = compress(model, ratio=ratio)
    layer = model[0]
    assert isinstance(layer, KroneckerLinear)
    assert (layer.in_features, layer.out_features) == (n_in, n_out)
    weights = layer.num_factor_parameters()
    assert weights <= ratio * n_in * n_out
    assert weights == brute_force_best(n_in, n_out, ratio)
    assert report[0].new_params == weights + n_out
    assert report[0].config.endswith(f"rank={layer.rank}")
    assert report[0].config == layer.rank_label()


def test_ratio_tie_prefers_balanced_split():
    # 16 x 16 at ratio 0.25 (64 weights): (4,4)x(4,4) rank 2 uses exactly 64, as do less
    # balanced splits such as in (2, 8) out (8, 2) rank 2; the balanced one wins.
    model = nn.Sequential(nn.Linear(16, 16))
    compress(model, ratio=0.25)
    assert model[0].in_shape == (4, 4) and model[0].out_shape == (4, 4)
    assert model[0].rank == 2


@pytest.mark.parametrize("method", ["kronecker", "cp"])
def test_float_rank_is_the_same_as_ratio(method):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 12))

    by_ratio, report_ratio = compress(model(), method, ratio=0.25)
    by_rank, report_rank = compress(model(), method, rank=0.25)
    assert [r.config for r in report_rank] == [r.config for r in report_ratio]
    assert [r.new_params for r in report_rank] == [r.new_params for r in report_ratio]
    assert not any(r.skipped for r in report_rank)
    for a, b in zip(by_rank.state_dict().values(), by_ratio.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ratio_too_small_is_skipped_with_reason():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    _, report = compress(model, ratio=0.01)
    assert all(type(m) is nn.Linear for m in model)
    assert all(r.skipped and "fits rank=0.01" in r.reason for r in report)
    assert all(r.error is None and r.new_params == r.old_params for r in report)
    assert "0 converted, 2 skipped" in str(report)


def test_prime_and_too_large_layers_are_skipped():
    prime = nn.Linear(7, 11)
    small = nn.Linear(4, 4)  # (2,2)x(2,2): rank 3 needs 24 weights > 16
    model = nn.Sequential(prime, nn.ReLU(), small)
    _, report = compress(model, rank=3)
    assert model[0] is prime and model[2] is small
    assert report[0].skipped and "prime" in report[0].reason
    assert report[1].skipped and "not fewer than the dense 16" in report[1].reason
    _, report = compress(model, rank=5)
    assert "exceeds the maximum 4" in report[1].reason
    assert "prime" in str(report)


def test_shared_module_converted_once_and_stays_shared():
    shared = nn.Linear(12, 12)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    model.extra = nn.ModuleDict({"again": shared})
    _, report = compress(model)
    assert len(report) == 1
    assert report[0].name == "0" and report[0].aliases == ("2", "extra.again")
    assert isinstance(model[0], KroneckerLinear)
    assert model[0] is model[2] is model.extra["again"]
    assert "0 (= 2, extra.again)" in str(report)
    unique = {id(p) for p in model.parameters()}
    assert len(unique) == len(list(model[0].parameters()))


def test_tied_weights_are_skipped():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.relu(self.body(self.embed(ids))))

    model = TiedLM()
    _, report = compress(model)
    names = {r.name: r for r in report}
    assert names["head"].skipped and "tied" in names["head"].reason
    assert not names["body"].skipped
    assert model.head.weight is model.embed.weight
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 20)


def test_filter_fn_gets_name_then_module():
    model = nn.Sequential()
    model.encoder = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    model.head = nn.Linear(16, 4)
    seen = []

    def keep_encoder(name, module):
        seen.append((type(module).__name__, name))
        return name.startswith("encoder.")

    _, report = compress(model, filter_fn=keep_encoder)
    assert seen == [("Linear", "encoder.0"), ("Linear", "encoder.2"), ("Linear", "head")]
    assert [r.name for r in report] == ["encoder.0", "encoder.2"]
    assert isinstance(model.encoder[0], KroneckerLinear)
    assert type(model.head) is nn.Linear


def test_not_inplace_leaves_the_original_alone():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new, report = compress(model, inplace=False)
    assert new is not model
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    assert all(isinstance(new[i], KroneckerLinear) for i in (0, 2))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert len(report.converted) == 2


def test_root_linear_is_replaced():
    lin = nn.Linear(12, 20)
    new, report = compress(lin)
    assert isinstance(new, KroneckerLinear) and report[0].name == ""
    assert "(root)" in str(report)


def test_subclasses_are_skipped_and_attention_still_runs():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    model.ff = nn.Linear(16, 16)
    _, report = compress(model)
    records = {r.name: r for r in report}
    assert records["attn.out_proj"].skipped
    assert "subclass of nn.Linear" in records["attn.out_proj"].reason
    assert isinstance(model.ff, KroneckerLinear)
    x = torch.randn(2, 5, 16)
    assert model.attn(x, x, x)[0].shape == (2, 5, 16)


def test_kronecker_ignores_conv_and_keeps_flags():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 16))
    model[2].weight.requires_grad_(False)
    model.eval()
    _, report = compress(model)
    assert [r.name for r in report] == ["2"]
    assert type(model[0]) is nn.Conv2d
    new = model[2]
    assert not new.training
    assert all(not f.requires_grad for f in new.factors) and new.bias.requires_grad


def test_meta_and_lazy_layers_are_skipped():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 16))
    _, report = compress(model)
    assert report[0].skipped and "meta" in report[0].reason
    model = nn.Sequential(nn.LazyLinear(16))
    _, report = compress(model)
    assert report[0].skipped and "lazy" in report[0].reason
    model(torch.randn(2, 8))  # materialised: now a plain nn.Linear
    _, report = compress(model)
    assert isinstance(model[0], KroneckerLinear)


def test_compressed_model_trains():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    compress(model, rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 16), torch.randn(64, 4)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"method": "svd"}, ValueError, "method must be one of"),
        ({"rank": 0}, ValueError, "rank must be >= 1"),
        ({"rank": 1.5}, ValueError, r"rank as a float .* in \(0, 1\], got 1.5"),
        ({"rank": 0.0}, ValueError, r"rank as a float .* in \(0, 1\], got 0.0"),
        ({"rank": "2"}, TypeError, "rank must be an int"),
        ({"ratio": 0.0}, ValueError, "ratio must be in"),
        ({"ratio": 1.0}, ValueError, "ratio must be in"),
        ({"ratio": "0.5"}, TypeError, "ratio must be a float"),
        ({"filter_fn": "encoder"}, TypeError, "filter_fn must be callable"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        compress(nn.Linear(4, 4), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        compress(torch.randn(3))


# --- method="cp" -----------------------------------------------------------------------------


def cp_exact_linear(in_shape, out_shape, rank):
    """An nn.Linear whose weight, tensorized (out..., in...), is exactly CP rank ``rank``."""
    lin = nn.Linear(math.prod(in_shape), math.prod(out_shape), dtype=F64)
    factors = [torch.randn(d, rank, dtype=F64) for d in (*out_shape, *in_shape)]
    with torch.no_grad():
        lin.weight.copy_(cp_to_tensor(factors).reshape(lin.weight.shape))
    return lin


def cp_exact_conv(c_in, c_out, k, rank, **kwargs):
    conv = nn.Conv2d(c_in, c_out, k, dtype=F64, **kwargs)
    factors = [torch.randn(d, rank, dtype=F64) for d in conv.weight.shape]
    with torch.no_grad():
        conv.weight.copy_(cp_to_tensor(factors))
    return conv


def test_cp_converts_linear_and_conv_exactly():
    model = nn.Sequential(
        cp_exact_conv(3, 4, 3, rank=2, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Flatten(),
        cp_exact_linear((8, 8), (3, 4), rank=2),
    )
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    expected = model(x)
    _, report = compress(model, "cp", rank=2)
    assert isinstance(model[0], CPConv2d) and isinstance(model[3], CPLinear)
    assert model[0].padding_mode == "reflect"
    assert model[3].in_shape == (8, 8) and model[3].out_shape == (3, 4)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    conv_rec, lin_rec = report
    assert (conv_rec.kind, conv_rec.new_kind) == ("Conv2d", "CPConv2d")
    assert conv_rec.new_params == 2 * (4 + 3 + 3 + 3) + 4
    assert conv_rec.config == "rank=2" == model[0].rank_label()
    assert lin_rec.new_params == 2 * (8 + 8 + 3 + 4) + 12
    assert lin_rec.config == "in_shape=(8, 8), out_shape=(3, 4), rank=2"
    assert lin_rec.config == model[3].rank_label()
    assert conv_rec.error < 1e-5 and lin_rec.error < 1e-5


def test_cp_ratio_uses_the_float_rank_rule():
    model = nn.Sequential(cp_exact_linear((6, 8), (4, 4), rank=3))
    _, report = compress(model, "cp", ratio=0.1)
    expected = cp_rank_from_fraction(0.1, (4, 4, 6, 8))
    assert model[0].rank == expected == round(0.1 * 768 / 22)
    assert report[0].config.endswith(f"rank={expected}")


def test_tucker_converts_only_conv2d():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 10))
    x = torch.randn(2, 8, 4, 4)
    _, report = compress(model, "tucker", rank=4)
    assert [r.name for r in report] == ["0"]
    assert type(model[0]).__name__ == "TuckerConv2d" and type(model[2]) is nn.Linear
    assert (report[0].kind, report[0].new_kind) == ("Conv2d", "TuckerConv2d")
    assert report[0].config == model[0].rank_label()
    assert report[0].new_params == 8 * 4 + 4 * 4 * 9 + 8 * 4 + 8
    assert model(x).shape == (2, 10)


def test_cp_skips_grouped_and_too_large_layers():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 4))
    _, report = compress(model, "cp", rank=3)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear
    assert "grouped convolution (groups=2)" in report[0].reason
    assert "not fewer than the dense 16" in report[1].reason
