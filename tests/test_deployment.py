"""Deployment of every registered layer (``layer_specs.SPECS``) with a dynamic batch size:
``torch.export`` (with a ``torch.export.save`` / ``load`` round trip) and ONNX (the
``dynamo=True`` exporter, run in onnxruntime), each run at two batch sizes other than the
one traced and compared with eager PyTorch. Each layer alone, and all of them in one
``nn.Sequential``, once as is and once folded into dense modules by ``layer.to_dense()``.

Strict on purpose: a layer that cannot be exported fails here (it is not skipped).
"""

from __future__ import annotations

import math

import pytest
import torch
from layer_specs import SPECS
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind

from kronlayers.modules import FactorizedLayer

# torch.export's own pytree code trips this deprecation warning inside torch (2.13).
pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning")

# Two batch sizes, both different from every traced one (the specs trace at 2 to 5, the
# model at TRACE_BATCH): 1 is single-sample inference, a size the tracer specialises on if
# it ever sees it, so it checks the batch really stayed symbolic.
BATCHES = (1, 7)
TRACE_BATCH = 3
# float32 throughout. The exported program runs the same aten kernels as eager; onnxruntime
# reorders a few sums (and MatMul + Add fusions), and a dense layer sums its products in
# another order than the factorized one: a few ulps of float32 either way.
SAME_KERNELS = {"rtol": 1e-6, "atol": 1e-6}
REORDERED = {"rtol": 1e-5, "atol": 2e-6}

IDS = [spec.id for spec in SPECS]


def every_layer_model() -> nn.Sequential:
    """Every spec's layer in one ``nn.Sequential``, float32; input ``(N, 8)``, output
    ``(N, 3)``. A dense ``Linear`` + ``Unflatten`` adapts each layer's input shape, and the
    output is flattened, so a newly registered layer joins the chain through its spec."""
    blocks: list[nn.Module] = []
    width = 8
    for spec in SPECS:
        layer = spec.make()
        inner = spec.input_shape[1:]
        with torch.no_grad():
            out_numel = layer(torch.zeros(1, *inner)).numel()
        blocks += [nn.Linear(width, math.prod(inner)), nn.Unflatten(1, inner), layer]
        blocks += [nn.Flatten(), nn.Tanh()]
        width = out_numel
    blocks.append(nn.Linear(width, 3))
    return nn.Sequential(*blocks).eval()


def batch_dynamic() -> tuple[dict[int, Dim]]:
    return ({0: Dim("batch", min=1, max=1024)},)


def inputs(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    return torch.randn(batch, *shape[1:])


def assert_dynamic_batch(ep: torch.export.ExportedProgram) -> None:
    """The exported program's input batch dimension is a symbol, not a number."""
    spec = next(s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
    batch = node.meta["val"].shape[0]
    assert isinstance(batch, torch.SymInt), f"batch dimension was specialised to {batch}"


def check_export_roundtrip(module, shape, reference, tmp_path, tol) -> None:
    """``torch.export`` with a dynamic batch, ``save`` / ``load``, then both programs at
    every size of ``BATCHES`` against ``reference(x)``."""
    ep = torch.export.export(module, (inputs(shape, shape[0]),), dynamic_shapes=batch_dynamic())
    assert_dynamic_batch(ep)
    path = tmp_path / "program.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert_dynamic_batch(loaded)
    programs = {"exported": ep.module(), "loaded": loaded.module()}
    for batch in BATCHES:
        x = inputs(shape, batch)
        expected = reference(x)
        for name, program in programs.items():
            torch.testing.assert_close(
                program(x), expected, **tol, msg=lambda m, n=name: f"{n}: {m}"
            )


def onnx_session(module, shape, tmp_path):
    """The ONNX (``dynamo=True``) export of ``module`` with a dynamic batch, as an
    onnxruntime session. Skips (only the ONNX tests) without the test extra's packages."""
    onnx = pytest.importorskip("onnx", reason="needs the test extra (onnx)")
    pytest.importorskip("onnxscript", reason="needs the test extra (onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="needs the test extra (onnxruntime)")
    program = torch.onnx.export(
        module,
        (inputs(shape, shape[0]),),
        dynamo=True,
        dynamic_shapes=batch_dynamic(),
        verbose=False,
    )
    path = tmp_path / "model.onnx"
    program.save(str(path))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), batch_dim
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(module, shape, reference, tmp_path, tol) -> None:
    session = onnx_session(module, shape, tmp_path)
    (name,) = [i.name for i in session.get_inputs()]
    for batch in BATCHES:
        x = inputs(shape, batch)
        (y,) = session.run(None, {name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), reference(x), **tol)


def eager(module):
    def run(x):
        with torch.no_grad():
            return module(x)

    return run


# --- every layer, one at a time ---------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_torch_export_save_load(spec, tmp_path):
    layer = spec.make().eval()
    check_export_roundtrip(layer, spec.input_shape, eager(layer), tmp_path, SAME_KERNELS)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_onnx_runtime(spec, tmp_path):
    layer = spec.make().eval()
    check_onnx(layer, spec.input_shape, eager(layer), tmp_path, REORDERED)


# --- every layer in one model -----------------------------------------------------------------


FORMS = ["factorized", "to_dense"]


def every_layer_models(form: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(the model to export, the factorized model whose eager output it must match). For
    ``"to_dense"`` every factorized layer is folded back into its dense module."""
    model = every_layer_model()
    if form == "factorized":
        return model, model
    folded = []
    for module in model:
        if isinstance(module, FactorizedLayer):
            dense = module.to_dense().eval()
            assert type(dense) is module.dense_type
            module = dense
        folded.append(module)
    return nn.Sequential(*folded).eval(), model


@pytest.mark.parametrize("form", FORMS)
def test_every_layer_model_torch_export_save_load(form, tmp_path):
    """The model with every layer, and the same model with each layer folded back into its
    dense module by ``to_dense()``, against the factorized model in eager mode."""
    exported, model = every_layer_models(form)
    tol = SAME_KERNELS if form == "factorized" else REORDERED
    check_export_roundtrip(exported, (TRACE_BATCH, 8), eager(model), tmp_path, tol)


@pytest.mark.parametrize("form", FORMS)
def test_every_layer_model_onnx_runtime(form, tmp_path):
    exported, model = every_layer_models(form)
    check_onnx(exported, (TRACE_BATCH, 8), eager(model), tmp_path, REORDERED)
