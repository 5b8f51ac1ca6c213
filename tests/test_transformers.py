"""kronlayers on Hugging Face transformers models built from small configs (random weights).

compress with every registered method (GPT-2's ``Conv1D`` and BERT's ``nn.Linear``), forward,
backward, state_dict round trip, ``torch.compile``; the report's coverage and tied weights;
``summary`` with real inputs (torchinfo conventions) against ``FlopCounterMode``.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import kronlayers
from kronlayers import compress, summary
from kronlayers.modules import FactorizedLayer
from kronlayers.plan import conv1d_as_linear, is_conv1d
from kronlayers.registry import methods, registered_layers

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

RANKS = {"kronecker": 2, "cp": 2, "lowrank": 4, "tucker": 1}
LINEAR_METHODS = [
    m
    for m in methods()
    if any(c.method == m and c.dense_type is nn.Linear for c in registered_layers())
]
CONV_ONLY_METHODS = [m for m in methods() if m not in LINEAR_METHODS]


def gpt2(**kwargs):
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32, **kwargs
    )
    return transformers.GPT2LMHeadModel(config).eval()


def bert(**kwargs):
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        **kwargs,
    )
    return transformers.BertModel(config).eval()


def t5(**kwargs):
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, **kwargs
    )
    return transformers.T5Model(config).eval()


def vit(**kwargs):
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        **kwargs,
    )
    return transformers.ViTModel(config).eval()


BUILDERS = {"gpt2": gpt2, "bert": bert, "t5": t5, "vit": vit}


def text_inputs(batch=2, length=8, vocab=64):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(name):
    if name == "vit":
        return {
            "pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        }
    data = text_inputs()
    if name == "t5":
        data["decoder_input_ids"] = data["input_ids"][:, :5]
    return data


def dense_layers(model):
    """Names of the nn.Linear / Conv1D layers of a dense model."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear or is_conv1d(m)]


@pytest.fixture(scope="module")
def compressed():
    """``(model, report)`` per (model name, linear method), compressed once for the module."""
    cache = {}

    def get(name, method):
        if (name, method) not in cache:
            torch.manual_seed(0)
            cache[name, method] = compress(BUILDERS[name](), method, rank=RANKS[method])
        return cache[name, method]

    return get


# -- compress -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_compress_converts_every_projection(compressed, name, method):
    reference = BUILDERS[name]()
    model, report = compressed(name, method)
    expected = [n for n in dense_layers(reference) if n != "lm_head"]
    assert [r.name for r in report.converted] == expected
    kinds = {r.kind for r in report.converted}
    assert kinds == ({"Conv1D"} if name == "gpt2" else {"Linear"})
    for n in expected:
        layer = model.get_submodule(n)
        assert isinstance(layer, FactorizedLayer) and layer.method == method
    assert 0.5 < report.coverage < 1.0
    text = str(report)
    assert "coverage:" in text and "Embedding" in text
    assert len(report.plan) == len(expected)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_forward_backward_and_state_dict(compressed, name, method):
    model, report = compressed(name, method)
    model = copy.deepcopy(model).train()
    data = inputs_for(name)
    outputs = [t for t in model(**data).to_tuple() if isinstance(t, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in outputs)
    sum(t.float().pow(2).mean() for t in outputs).backward()
    factors = [
        p for m in model.modules() if isinstance(m, FactorizedLayer) for p in m.factor_parameters()
    ]
    assert factors and all(p.grad is not None and torch.isfinite(p.grad).all() for p in factors)

    # state_dict round trip: through torch.save / weights_only load into a replayed model.
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = compress(BUILDERS[name](), plan=report.plan)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**data)[0], model(**data)[0])


# Compiling costs seconds per model: every method once, the models in turn.
COMPILE_CASES = [(["gpt2", "bert"][i % 2], m) for i, m in enumerate(LINEAR_METHODS)]


@pytest.mark.parametrize(("name", "method"), COMPILE_CASES)
def test_torch_compile_matches_eager(compressed, name, method):
    model, _ = compressed(name, method)
    data = inputs_for(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(**data)[0]
        got = compiled(**data)[0]
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("method", CONV_ONLY_METHODS)
def test_conv_only_methods_find_nothing_and_say_so(name, method):
    model = BUILDERS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, report = compress(model, method, rank=RANKS.get(method, 1))
    assert len(report) == 0 and report.coverage == 0.0 and len(report.plan) == 0
    text = str(report)
    assert f"no layer of the model has a {method!r} replacement" in text
    reasons = {d.name: d.reason for d in report.left_dense}
    for n in dense_layers(model):
        assert f"no {method!r} layer for" in reasons[n]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_lm_head_stays_tied_and_is_reported(compressed):
    model, report = compressed("gpt2", "kronecker")
    assert model.lm_head.weight is model.transformer.wte.weight
    (head,) = [r for r in report if r.name == "lm_head"]
    assert head.skipped and "tied to transformer.wte" in head.reason
    left = {d.name: d for d in report.left_dense}
    assert "lm_head.weight" in left["transformer.wte"].reason
    assert left["lm_head"].skipped
    assert "transformer.wpe" in left
    # Converted + left dense + small vectors = the whole model, each parameter once.
    converted = sum(r.old_params for r in report.converted)
    listed = sum(d.params for d in report.left_dense)
    assert converted + listed <= report.model_params
    assert report.model_params == sum(p.numel() for p in gpt2().parameters())
    assert report.coverage == pytest.approx(converted / report.model_params)


def test_conv1d_is_recognised_without_importing_transformers():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    nn.init.normal_(conv.weight)
    assert is_conv1d(conv) and not is_conv1d(nn.Linear(8, 12))
    linear = conv1d_as_linear(conv)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(linear(x), conv(x))
    assert linear.weight.data_ptr() == conv.weight.data_ptr()  # a view, no copy

    model, report = compress(nn.Sequential(conv), "kronecker", rank=2)
    assert report[0].kind == "Conv1D" and isinstance(model[0], FactorizedLayer)
    options = kronlayers.KroneckerLinear.compress_config(linear, 2)
    reference = kronlayers.KroneckerLinear.from_dense(linear, **options)
    torch.testing.assert_close(model[0].weight, reference.weight)


def test_mha_in_proj_is_reported_as_left_dense():
    model = nn.Sequential()
    model.attn = nn.MultiheadAttention(16, 2, batch_first=True)
    model.ff = nn.Linear(16, 16)
    _, report = compress(model)
    left = {d.name: d for d in report.left_dense}
    assert "in_proj_weight" in left["attn"].reason
    assert left["attn"].params == 3 * 16 * 16 + 3 * 16
    assert left["attn.out_proj"].skipped
    assert "attn" in str(report).split("coverage:")[1]


def test_filtered_layers_are_reported():
    model = bert()
    _, report = compress(model, "kronecker", filter_fn=lambda n, m: "attention" in n)
    left = {d.name: d.reason for d in report.left_dense}
    assert left["encoder.layer.0.intermediate.dense"] == "not selected by filter_fn"


# -- summary ----------------------------------------------------------------------------------


def flop_counter_total(model, data):
    """FlopCounterMode's total, with the CPU scaled-dot-product attention kernel it does not
    know counted as its other SDPA kernels (so both count the same operations)."""

    def sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(**data)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "vit"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_summary_matches_flop_counter(name, attn):
    model = BUILDERS[name](attn_implementation=attn)
    data = inputs_for(name)
    s = summary(model, input_data=data)
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert not s.uncounted
    assert s.total_flops == pytest.approx(flop_counter_total(model, data), rel=0.01)
    assert s.total_flops == s.total_dense_flops
    text = str(s)
    assert "input_ids [2, 8] int64" in text or "pixel_values [2, 3, 16, 16]" in text


def test_summary_counts_gpt2_conv1d_and_attention_rows():
    model = gpt2()
    s = summary(model, input_data=text_inputs())
    rows = {r.name: r for r in s.rows}
    c_attn = rows["transformer.h.0.attn.c_attn"]
    assert c_attn.kind == "Conv1D" and c_attn.flops == 2 * 16 * 32 * 96
    attention = rows["transformer.h.0.attn"]
    assert attention.ops and attention.params == 0
    assert attention.flops == 2 * 2 * 2 * 8 * 8 * 32  # Q Kᵀ and P V, batch 2, length 8


def test_summary_of_compressed_gpt2_keeps_dense_totals(compressed):
    model, _ = compressed("gpt2", "kronecker")
    data = text_inputs()
    dense = summary(gpt2(), input_data=data)
    after = summary(model, input_data=data)
    assert after.total_dense_params == dense.total_params
    assert after.total_dense_flops == dense.total_flops
    assert after.total_params < dense.total_params and after.total_flops < dense.total_flops


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
def test_summary_counts_multihead_attention(batch_first, kdim):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    n, tgt, src = 3, 7, 5
    q = torch.randn(n, tgt, 32) if batch_first else torch.randn(tgt, n, 32)
    k = torch.randn(n, src, kdim or 32) if batch_first else torch.randn(src, n, kdim or 32)
    s = summary(mha, input_data=(q, k, k))
    (row,) = s.rows
    e, kd = 32, kdim or 32
    expected = (
        2 * n * (tgt * e * e + 2 * src * kd * e) + 4 * n * tgt * src * e + 2 * n * tgt * e * e
    )
    assert row.flops == expected
    assert row.params == sum(p.numel() for p in mha.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mha(q, k, k)
    assert row.flops == counter.get_total_flops()


def test_summary_counts_transformer_encoder_and_restores_fast_path():
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 9, 32)
    fast = torch.backends.mha.get_fastpath_enabled()
    s = summary(model, input_data=x)
    assert torch.backends.mha.get_fastpath_enabled() == fast
    assert not s.uncounted
    # Per layer: q, k, v, out projections, the two attention matmuls, the feed-forward.
    per_layer = 2 * 18 * (4 * 32 * 32 + 2 * 32 * 64) + 4 * 2 * 9 * 9 * 32
    assert s.total_flops == 2 * per_layer


def test_summary_marks_operations_it_cannot_count():
    class Distances(nn.Module):
        def forward(self, x):
            return torch.cdist(x, x)

    s = summary(nn.Sequential(nn.Linear(4, 4), Distances()), (3, 5, 4))
    assert [r.name for r in s.uncounted] == ["1"]
    assert s.rows[1].uncounted and s.rows[1].flops is None
    text = str(s)
    assert "+?" in text and "lower bounds" in text and "cdist" in text


# -- summary inputs (torchinfo conventions) -----------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 12)
        self.proj = nn.Linear(12, 6)

    def forward(self, ids, extra=None):
        out = self.proj(self.embed(ids))
        return out if extra is None else out + extra


def test_summary_input_forms_agree():
    model = TwoInputs()
    ids, extra = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, 6)
    by_size = summary(model, [(2, 3), (2, 3, 6)], dtypes=[torch.long, torch.float32])
    positional = summary(model, input_data=[ids, extra])
    keywords = summary(model, input_data={"ids": ids, "extra": extra})
    single = summary(model, input_data=ids)
    legacy = summary(model, [(2, 3), (2, 3, 6)], dtype=torch.long)
    for s in (by_size, positional, keywords, single, legacy):
        assert s.total_flops == 2 * 6 * 12 * 6
        assert [r.kind for r in s.rows] == ["Embedding", "Linear"]
    assert "ids [2, 3] int64, extra [2, 3, 6] float32" in str(keywords)
    assert summary(model, (np.int64(2), np.int64(3)), dtypes=[torch.long]).total_flops == 864


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({}, TypeError, "needs input_size or input_data"),
        ({"input_size": (2, 3), "input_data": torch.zeros(2, 3)}, ValueError, "not both"),
        ({"input_data": torch.zeros(2, 3), "dtypes": [torch.long]}, ValueError, "input_size"),
        ({"input_data": 3}, TypeError, "input_data must be a tensor"),
        ({"input_data": {1: torch.zeros(2)}}, TypeError, "str keys"),
        ({"input_size": (2, 3), "dtypes": [torch.long] * 2}, ValueError, "one dtype per input"),
        ({"input_size": (2, 3), "dtypes": torch.long}, TypeError, "list of torch.dtype"),
        ({"input_size": (2, 3), "dtypes": ["long"]}, TypeError, r"dtypes\[0\] must be"),
        (
            {"input_size": (2, 3), "dtype": torch.long, "dtypes": [torch.long]},
            ValueError,
            "not both",
        ),
    ],
)
def test_summary_input_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        summary(TwoInputs(), **kwargs)
