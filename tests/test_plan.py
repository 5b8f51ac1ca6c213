"""Compression plans: what compress decided, saved as JSON and replayed on a fresh dense model
without any decomposition, then the fine-tuned state_dict loaded bit for bit."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
import time

import pytest
import torch
from layer_specs import SPECS
from torch import nn

import kronlayers
from kronlayers import KroneckerLinear, compress
from kronlayers.modules import FactorizedLayer
from kronlayers.plan import PLAN_FORMAT, PLAN_VERSION, Plan, PlanEntry, constructor_kwargs
from kronlayers.registry import methods, registered_layers

RANKS = {"kronecker": 2, "cp": 2, "lowrank": 3, "tucker": 2}
LINEAR_METHODS = [
    m
    for m in methods()
    if any(c.method == m and c.dense_type is nn.Linear for c in registered_layers())
]

# Executed in this process (patch = monkeypatch.setattr) and in the fresh one (patch =
# setattr): every reference to a decomposition, every from_dense and SVD raise.
FORBID = """
import sys as _sys
import torch as _torch
import kronlayers.decomposition as _decomposition
from kronlayers.registry import registered_layers as _registered

def _forbidden(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} called while replaying a plan")
    return fail

patched = []
for _name in ("nearest_kronecker", "cp_decompose", "tucker2_decompose"):
    _fn = getattr(_decomposition, _name)
    for _mod in list(_sys.modules.values()):
        _where = getattr(_mod, "__name__", None) or ""
        if _where.startswith("kronlayers") and getattr(_mod, _name, None) is _fn:
            patch(_mod, _name, _forbidden(_name))
            patched.append(f"{_where}.{_name}")
for _cls in _registered():
    patch(_cls, "from_dense", _forbidden(f"{_cls.__name__}.from_dense"))
    patched.append(f"{_cls.__name__}.from_dense")
patch(_torch.linalg, "svd", _forbidden("torch.linalg.svd"))
"""


def forbid_decompositions(monkeypatch) -> list[str]:
    namespace = {"patch": monkeypatch.setattr}
    exec(FORBID, namespace)
    assert len(namespace["patched"]) >= 3 + len(registered_layers())
    return namespace["patched"]


def mixed_model():
    """Linear and Conv2d layers (every method finds something), odd padding included."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding="same", padding_mode="reflect", bias=False),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 24),
        nn.Tanh(),
        nn.Linear(24, 12),
    )


def fine_tune(model, inputs, steps=3):
    """A few SGD steps on the sum of squares of the outputs; returns the losses."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        tensors = [out] if isinstance(out, torch.Tensor) else out.to_tuple()
        loss = sum(t.float().pow(2).mean() for t in tensors if isinstance(t, torch.Tensor))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def save(tmp_path, report, model, tag="model"):
    plan_path, state_path = tmp_path / f"{tag}.plan.json", tmp_path / f"{tag}.pt"
    report.plan.save(plan_path)
    torch.save(model.state_dict(), state_path)
    return plan_path, state_path


# -- the plan object --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_constructor_kwargs_rebuild_every_registered_layer(spec):
    layer = spec.make()
    kwargs = constructor_kwargs(layer)
    assert "device" not in kwargs and "dtype" not in kwargs
    json.dumps(kwargs)  # plain values only
    rebuilt = spec.cls(**kwargs)
    assert (
        rebuilt.extra_repr().split(", compression")[0]
        == layer.extra_repr().split(", compression")[0]
    )
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in layer.state_dict().items()
    }


def test_plan_records_each_layer_and_round_trips_json(tmp_path):
    model, report = compress(mixed_model(), "cp", rank=2)
    plan = report.plan
    assert [e.name for e in plan] == ["0", "2", "4", "6"]
    conv, reflect, lin, _ = plan.layers
    assert (conv.dense_type, conv.layer, conv.method, conv.dtype) == (
        "Conv2d",
        "CPConv2d",
        "cp",
        "float32",
    )
    assert conv.dense_shape["kernel_size"] == (3, 3) and conv.dense_shape["bias"] is True
    assert reflect.kwargs["padding"] == "same" and reflect.kwargs["padding_mode"] == "reflect"
    assert reflect.kwargs["bias"] is False and reflect.kwargs["rank"] == 2
    assert lin.dense_shape == {"in_features": 216, "out_features": 24, "bias": True}
    assert lin.kwargs["in_shape"] == model[4].in_shape

    path = tmp_path / "plan.json"
    plan.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PLAN_FORMAT and data["version"] == PLAN_VERSION
    assert len(data["layers"]) == 4
    assert Plan.load(path) == plan
    assert Plan.from_dict(plan.to_dict()) == plan


def test_plan_from_model_matches_report_plan():
    model, report = compress(mixed_model(), "kronecker", rank=2)
    assert Plan.from_model(model) == report.plan


# -- replay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", methods())
def test_replay_restores_fine_tuned_weights_exactly(tmp_path, monkeypatch, method):
    x = torch.randn(3, 4, 6, 6)
    model, report = compress(mixed_model(), method, rank=RANKS.get(method, 2))
    assert report.converted
    fine_tune(model, x)
    expected = model(x)
    plan_path, state_path = save(tmp_path, report, model)

    forbid_decompositions(monkeypatch)
    torch.manual_seed(123)  # another dense initialisation: everything comes from the file
    fresh, replayed = compress(mixed_model(), plan=Plan.load(plan_path))
    fresh.load_state_dict(torch.load(state_path, weights_only=True))
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    assert [type(m) for m in fresh] == [type(m) for m in model]
    assert [r.new_kind for r in replayed] == [r.new_kind for r in report.converted]
    assert all(r.error is None and not r.skipped for r in replayed)
    assert replayed.plan == report.plan and replayed.method is None


def test_replay_report_and_apply():
    _, report = compress(mixed_model(), "kronecker", rank=2)
    model, replayed = report.plan.apply(mixed_model())
    assert isinstance(model[4], KroneckerLinear)
    assert [r.name for r in replayed] == ["4", "6"]
    assert replayed.coverage == pytest.approx(report.coverage)
    left = {d.name: d.reason for d in replayed.left_dense}
    assert left == {"0": "not in the plan", "2": "not in the plan"}
    assert "coverage:" in str(replayed)


def test_replay_on_float64_and_meta_models(tmp_path):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    model, report = compress(mixed_model().double(), "cp", rank=2)
    plan_path, state_path = save(tmp_path, report, model)
    plan = Plan.load(plan_path)
    assert plan.layers[0].dtype == "float64"

    fresh, _ = compress(mixed_model().double(), plan=plan)
    assert fresh[0].factors[0].dtype == torch.float64
    with torch.device("meta"):
        meta = mixed_model().double()
    meta, _ = compress(meta, plan=plan)  # nothing to decompose: a meta model replays too
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    for m in (fresh, meta):
        m.load_state_dict(torch.load(state_path, weights_only=True))
        assert torch.equal(m.eval()(x), model.eval()(x))


def test_replay_keeps_flags_sharing_and_the_root():
    shared = nn.Linear(16, 16)
    dense = nn.Sequential(shared, nn.ReLU(), shared)
    _, report = compress(dense, inplace=False)
    assert report.plan.layers[0].aliases == ("2",)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
    fresh.append(fresh[0])
    fresh[0].weight.requires_grad_(False)
    fresh.eval()
    fresh, _ = compress(fresh, plan=report.plan)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], KroneckerLinear)
    assert not fresh[0].training
    assert not any(p.requires_grad for p in fresh[0].factor_parameters())
    assert fresh[0].bias.requires_grad

    root, report = compress(nn.Linear(12, 20), "lowrank", rank=2)
    new, _ = compress(nn.Linear(12, 20), plan=report.plan)
    assert type(new) is type(root) and new.rank == root.rank


def test_replay_makes_gpt2_conv1d_layers(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(12, 8)
    nn.init.normal_(conv.weight)
    model, report = compress(nn.Sequential(conv), "kronecker", rank=2)
    assert report.plan.layers[0].dense_type == "Conv1D"
    assert report.plan.layers[0].dense_shape == {
        "in_features": 8,
        "out_features": 12,
        "bias": True,
    }
    plan_path, state_path = save(tmp_path, report, model)
    forbid_decompositions(monkeypatch)
    fresh, _ = compress(
        nn.Sequential(transformers.pytorch_utils.Conv1D(12, 8)), plan=Plan.load(plan_path)
    )
    fresh.load_state_dict(torch.load(state_path, weights_only=True))
    x = torch.randn(2, 8)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="the plan has a Conv1D, the model a Linear"):
        compress(nn.Sequential(nn.Linear(8, 12)), plan=report.plan)


def test_folding_back_with_to_dense():
    """The alternative to a plan: save a plain dense model (larger, no kronlayers needed)."""
    x = torch.randn(3, 4, 6, 6)
    model, report = compress(mixed_model(), "kronecker", rank=2)
    for record in report.converted:
        model.set_submodule(record.name, model.get_submodule(record.name).to_dense())
    dense = mixed_model()
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(dense(x), model(x))


# -- mismatches ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan():
    return compress(mixed_model(), "cp", rank=2)[1].plan


def other_model(change):
    model = mixed_model()
    change(model)
    return model


MISMATCHES = {
    "missing": (lambda m: m.__delitem__(6), r"at layer '6': no module of that name"),
    "type": (
        lambda m: m.__setitem__(4, nn.Conv2d(216, 24, 1)),
        r"at layer '4': the plan has a Linear, the model a Conv2d",
    ),
    "out_features": (
        lambda m: m.__setitem__(4, nn.Linear(216, 25)),
        r"at layer '4': out_features=25 in the model, 24 in the plan",
    ),
    "bias": (lambda m: m.__setitem__(4, nn.Linear(216, 24, bias=False)), r"'4': bias=False"),
    "padding": (
        lambda m: m.__setitem__(2, nn.Conv2d(8, 6, 3, padding=1)),
        r"at layer '2': padding=\(1, 1\) in the model, 'same' in the plan",
    ),
    # Two layers differ: the first one is named.
    "first": (
        lambda m: (m.__setitem__(2, nn.Conv2d(8, 6, 5)), m.__setitem__(6, nn.Linear(24, 9))),
        r"at layer '2': kernel_size=\(5, 5\)",
    ),
}


@pytest.mark.parametrize(("change", "match"), MISMATCHES.values(), ids=MISMATCHES.keys())
def test_mismatch_names_the_first_layer_and_leaves_the_model_alone(plan, change, match):
    model = other_model(change)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        compress(model, plan=plan)
    assert [type(m) for m in model.modules()] == before


def test_other_plan_errors(plan, tmp_path):
    compressed, _ = compress(mixed_model(), plan=plan)
    with pytest.raises(ValueError, match="at layer '0': it is already a CPConv2d"):
        compress(compressed, plan=plan)
    with pytest.raises(ValueError, match="ratio, filter_fn must be None"):
        compress(mixed_model(), plan=plan, ratio=0.5, filter_fn=lambda n, m: True)
    with pytest.raises(TypeError, match="plan must be a kronlayers.plan.Plan"):
        compress(mixed_model(), plan=plan.to_dict())
    shared = Plan([PlanEntry(**{**plan.layers[2].__dict__, "aliases": ("5",)})])
    with pytest.raises(ValueError, match="alias '5' is not the same module"):
        compress(mixed_model(), plan=shared)
    unknown = Plan([PlanEntry(**{**plan.layers[2].__dict__, "layer": "NoSuchLayer"})])
    with pytest.raises(ValueError, match="'NoSuchLayer' of the plan is not registered"):
        compress(mixed_model(), plan=unknown)
    bad = Plan([PlanEntry(**{**plan.layers[2].__dict__, "kwargs": {"in_features": 216}})])
    with pytest.raises(ValueError, match="plan layer '4': CPLinear.*fails"):
        compress(model := mixed_model(), plan=bad)
    assert type(model[4]) is nn.Linear
    with pytest.raises(ValueError, match="not a kronlayers plan"):
        Plan.from_dict({"layers": []})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        Plan.from_dict({"format": PLAN_FORMAT, "version": 99, "layers": []})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON plan"):
        Plan.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot record layer 'x': no attribute"):
        Plan(problems={"x": "no attribute"}).save(tmp_path / "never.json")


# -- transformers models, replayed in a fresh process -----------------------------------------

CHILD = """
import json, sys, time
import torch
import transformers
transformers.logging.set_verbosity_error()
import kronlayers
from kronlayers.plan import Plan
patch = setattr
{forbid}
torch.set_num_threads(1)
results = []
for case in json.load(open(sys.argv[1])):
    config = getattr(transformers, case["config_class"]).from_json_file(case["config"])
    model = getattr(transformers, case["model_class"])(config)
    start = time.perf_counter()
    model, report = kronlayers.compress(model, plan=Plan.load(case["plan"]))
    seconds = time.perf_counter() - start
    model.load_state_dict(torch.load(case["state"], weights_only=True))
    model.eval()
    with torch.no_grad():
        out = model(**torch.load(case["inputs"], weights_only=True))[0]
    expected = torch.load(case["expected"], weights_only=True)
    results.append({{"name": case["name"], "equal": bool(torch.equal(out, expected)),
                     "converted": len(report), "seconds": seconds, "patched": len(patched)}})
print(json.dumps(results))
"""


def small_transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return {
        "bert": transformers.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        ),
        "gpt2": transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16
        ),
    }, {"bert": "BertModel", "gpt2": "GPT2LMHeadModel"}


def test_transformers_replay_in_a_fresh_process_is_bit_identical(tmp_path):
    import transformers

    configs, classes = small_transformers()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    torch.save(inputs, tmp_path / "inputs.pt")
    cases = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as in the fresh process
    try:
        for name, config in configs.items():
            config.to_json_file(tmp_path / f"{name}.config.json")
            for method in LINEAR_METHODS:
                torch.manual_seed(0)
                model = getattr(transformers, classes[name])(config)
                model, report = compress(model, method, rank=RANKS[method])
                losses = fine_tune(model, inputs)
                assert losses[-1] != losses[0]
                tag = f"{name}-{method}"
                save(tmp_path, report, model, tag)
                with torch.no_grad():
                    torch.save(model(**inputs)[0], tmp_path / f"{tag}.expected.pt")
                cases.append(
                    {
                        "name": tag,
                        "config_class": type(config).__name__,
                        "model_class": classes[name],
                        "config": str(tmp_path / f"{name}.config.json"),
                        "plan": str(tmp_path / f"{tag}.plan.json"),
                        "state": str(tmp_path / f"{tag}.pt"),
                        "inputs": str(tmp_path / "inputs.pt"),
                        "expected": str(tmp_path / f"{tag}.expected.pt"),
                        "layers": len(report.plan),
                    }
                )
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(forbid=FORBID), str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in results] == [c["name"] for c in cases]
    for result, case in zip(results, cases, strict=True):
        assert result["equal"], result
        assert result["converted"] == case["layers"] > 0
        assert result["patched"] >= 3 + len(registered_layers())


def test_bert_base_replay_takes_well_under_a_second(tmp_path, monkeypatch, record_property):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig()  # 12 layers, 768 wide (BERT-base), random weights
    fresh = transformers.BertModel(config).eval()
    model = copy.deepcopy(fresh)  # faster than initialising BERT-base twice
    # The compressed model is built by hand (decomposing 73 BERT-base layers would take
    # minutes): every nn.Linear becomes a randomly initialised rank-2 KroneckerLinear.
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in linears:
        dense = model.get_submodule(name)
        model.set_submodule(name, KroneckerLinear(dense.in_features, dense.out_features, rank=2))
    plan = Plan.from_model(model)
    assert len(plan) == len(linears) == 73
    plan_path, state_path = tmp_path / "bert.plan.json", tmp_path / "bert.pt"
    plan.save(plan_path)
    torch.save(model.state_dict(), state_path)

    forbid_decompositions(monkeypatch)
    loaded = Plan.load(plan_path)
    start = time.perf_counter()
    fresh, report = compress(fresh, plan=loaded)
    seconds = time.perf_counter() - start
    record_property("bert_base_replay_seconds", seconds)
    print(f"BERT-base plan replay: {seconds * 1000:.0f} ms")
    assert seconds < 1.0
    assert len(report.converted) == 73

    fresh.load_state_dict(torch.load(state_path, weights_only=True))
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids)[0], model(input_ids=ids)[0])


def test_kronlayers_exports_compress_with_plan():
    assert "plan" in inspect.signature(kronlayers.compress).parameters
    assert isinstance(compress(nn.Linear(4, 6), "kronecker", rank=1)[1].plan, Plan)
    layer = compress(nn.Linear(16, 16))[0]
    assert isinstance(layer, FactorizedLayer)
