"""``nn.Module`` layers; each wraps a functional kernel from :mod:`kronlayers.functional`.

The layer classes are those of :mod:`kronlayers.registry`, exported here by name; the
contract they implement is :class:`FactorizedLayer` (:mod:`kronlayers.modules._base`).
"""

from importlib import import_module

from ..registry import LAYERS
from ._base import FactorizedConv2d, FactorizedLayer, FactorizedLinear, NotCompressible

for _entry in LAYERS:
    globals()[_entry.name] = getattr(import_module(_entry.module), _entry.name)

__all__ = [  # the layer names come from the registry
    "FactorizedConv2d",
    "FactorizedLayer",
    "FactorizedLinear",
    "NotCompressible",
    *(_entry.name for _entry in LAYERS),
]
del _entry
