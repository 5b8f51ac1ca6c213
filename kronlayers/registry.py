"""The registry of factorized layers: the one list to extend when adding a layer.

Every layer implements the contract of :class:`kronlayers.modules.FactorizedLayer` and is
listed once in :data:`LAYERS`. Everything generic iterates this registry and never names a
layer class: the package exports (``kronlayers.<Name>``, ``kronlayers.functional.<fn>``),
:func:`kronlayers.compress` (``method=`` looks up :attr:`FactorizedLayer.method` and the
dense type it replaces), :func:`kronlayers.summary`, the benchmark suite and the generic tests
(in the spirit of TensorLy-Torch's factorization registry and torchao's config handlers).

Example::

    >>> from kronlayers.registry import layer_for, registered_layers
    >>> [cls.__name__ for cls in registered_layers()]  # doctest: +NORMALIZE_WHITESPACE
    ['KroneckerLinear', 'CPLinear', 'CPConv2d', 'TuckerConv2d', 'LowRankLinear']
    >>> layer_for("cp", torch.nn.Conv2d(3, 4, 3)).__name__
    'CPConv2d'
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .modules._base import FactorizedLayer

__all__ = ["LAYERS", "LayerEntry", "layer_for", "methods", "registered_layers"]


@dataclass(frozen=True)
class LayerEntry:
    """Where a registered layer lives.

    Attributes:
        name: the class name, exported as ``kronlayers.<name>`` and
            ``kronlayers.modules.<name>``.
        module: the module that defines the class.
        functional: the module of its functional kernel; the names in its ``__all__`` are
            exported by :mod:`kronlayers.functional`.
    """

    name: str
    module: str
    functional: str


LAYERS: tuple[LayerEntry, ...] = (
    LayerEntry(
        "KroneckerLinear",
        "kronlayers.modules.kronecker_linear",
        "kronlayers.functional.kronecker_linear",
    ),
    LayerEntry("CPLinear", "kronlayers.modules.cp_linear", "kronlayers.functional.cp_linear"),
    LayerEntry("CPConv2d", "kronlayers.modules.cp_conv2d", "kronlayers.functional.cp_conv2d"),
    LayerEntry(
        "TuckerConv2d", "kronlayers.modules.tucker_conv2d", "kronlayers.functional.tucker_conv2d"
    ),
    LayerEntry(
        "LowRankLinear", "kronlayers.modules.lowrank_linear", "kronlayers.functional.cp_linear"
    ),
)


@cache
def registered_layers() -> tuple[type[FactorizedLayer], ...]:
    """Every registered layer class, in :data:`LAYERS` order."""
    from .modules._base import FactorizedLayer

    classes = []
    for entry in LAYERS:
        cls = getattr(importlib.import_module(entry.module), entry.name)
        if not (isinstance(cls, type) and issubclass(cls, FactorizedLayer)):
            raise TypeError(f"registered layer {entry.name} must subclass FactorizedLayer")
        classes.append(cls)
    return tuple(classes)


def methods() -> tuple[str, ...]:
    """The ``compress`` method names of the registered layers, in registry order, unique."""
    return tuple(dict.fromkeys(cls.method for cls in registered_layers()))


def layer_for(method: str, module: nn.Module) -> type[FactorizedLayer] | None:
    """The registered layer of ``method`` that replaces ``module``'s type, or ``None``."""
    for cls in registered_layers():
        if cls.method == method and isinstance(module, cls.dense_type):
            return cls
    return None
