"""One spec list for the generic layer tests (in the spirit of PyTorch's ``ModuleInfo``).

Every registered layer (:mod:`kronlayers.registry`) must appear here at least once; the
tests in ``test_layer_contract.py`` run on every entry. A spec builds a small layer and says
which input shape to feed it and how to rebuild it from its dense form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from kronlayers.modules import FactorizedLayer
from kronlayers.registry import registered_layers

_BY_NAME = {cls.__name__: cls for cls in registered_layers()}


@dataclass(frozen=True)
class LayerSpec:
    """``make(**factory)`` builds the layer; ``input_shape`` is what it is fed;
    ``convert(layer)`` gives the ``from_dense`` keyword arguments that recover it exactly."""

    id: str
    cls_name: str
    kwargs: dict[str, Any]
    input_shape: tuple[int, ...]
    convert: Callable[[FactorizedLayer], dict[str, Any]]

    @property
    def cls(self) -> type[FactorizedLayer]:
        return _BY_NAME[self.cls_name]

    def make(self, **factory: Any) -> FactorizedLayer:
        return self.cls(**self.kwargs, **factory)


def _shapes_and_rank(layer: Any) -> dict[str, Any]:
    return {"in_shape": layer.in_shape, "out_shape": layer.out_shape, "rank": layer.rank}


def _rank(layer: Any) -> dict[str, Any]:
    return {"rank": layer.rank}


def _cp_conv(layer: Any) -> dict[str, Any]:
    return {"rank": layer.rank, "in_shape": layer.in_shape, "out_shape": layer.out_shape}


SPECS: list[LayerSpec] = [
    LayerSpec(
        "kron-2f-r1",
        "KroneckerLinear",
        {"in_features": 24, "out_features": 15, "in_shape": (4, 6), "out_shape": (3, 5)},
        (5, 24),
        _shapes_and_rank,
    ),
    LayerSpec(
        "kron-3f-r2-nobias",
        "KroneckerLinear",
        {
            "in_features": 24,
            "out_features": 12,
            "bias": False,
            "in_shape": (2, 3, 4),
            "out_shape": (3, 2, 2),
            "rank": 2,
        },
        (2, 3, 24),
        _shapes_and_rank,
    ),
    LayerSpec(
        "cplinear-2x3modes",
        "CPLinear",
        {
            "in_features": 24,
            "out_features": 30,
            "in_shape": (4, 6),
            "out_shape": (2, 3, 5),
            "rank": 3,
        },
        (4, 24),
        _shapes_and_rank,
    ),
    LayerSpec(
        "cplinear-3x2modes-nobias",
        "CPLinear",
        {
            "in_features": 24,
            "out_features": 15,
            "bias": False,
            "rank": 4,
            "in_shape": (2, 3, 4),
            "out_shape": (3, 5),
        },
        (3, 24),
        _shapes_and_rank,
    ),
    LayerSpec(
        "cpconv-stride-pad",
        "CPConv2d",
        {
            "in_channels": 3,
            "out_channels": 4,
            "kernel_size": 3,
            "stride": 2,
            "padding": 1,
            "rank": 3,
        },
        (2, 3, 7, 6),
        _cp_conv,
    ),
    LayerSpec(
        "cpconv-tensorized-reflect",
        "CPConv2d",
        {
            "in_channels": 6,
            "out_channels": 4,
            "kernel_size": (3, 2),
            "padding": "same",
            "padding_mode": "reflect",
            "rank": 2,
            "in_shape": (2, 3),
            "out_shape": (2, 2),
        },
        (2, 6, 5, 5),
        _cp_conv,
    ),
    LayerSpec(
        "tucker-same",
        "TuckerConv2d",
        {
            "in_channels": 4,
            "out_channels": 6,
            "kernel_size": 3,
            "padding": "same",
            "rank": (2, 3),
        },
        (2, 4, 6, 5),
        _rank,
    ),
    LayerSpec(
        "tucker-dilated-circular-nobias",
        "TuckerConv2d",
        {
            "in_channels": 5,
            "out_channels": 3,
            "kernel_size": (2, 3),
            "stride": (2, 1),
            "padding": 2,
            "dilation": 2,
            "bias": False,
            "padding_mode": "circular",
            "rank": 2,
        },
        (2, 5, 7, 8),
        _rank,
    ),
    LayerSpec(
        "lowrank-r3",
        "LowRankLinear",
        {"in_features": 24, "out_features": 15, "rank": 3},
        (5, 24),
        _rank,
    ),
    LayerSpec(
        "lowrank-r2-nobias",
        "LowRankLinear",
        {"in_features": 12, "out_features": 20, "bias": False, "rank": 2},
        (2, 3, 12),
        _rank,
    ),
]


def dense_reference(layer: FactorizedLayer, x, weight=None, bias=None):
    """The dense module's output with ``weight`` (default: ``layer.weight``), differentiable."""
    import torch

    dense = layer.to_dense()
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    params = {"weight": weight}
    if layer.bias is not None:
        params["bias"] = bias
    return torch.func.functional_call(dense, params, (x,))


def dense_types() -> set[type[nn.Module]]:
    return {cls.dense_type for cls in registered_layers()}
