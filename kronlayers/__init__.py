"""kronlayers: compressed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

Kronecker-product, CP- and Tucker-factorized layers with hand-written forward and backward
kernels, conversion of trained dense layers, and Kronecker(-sum) utilities.

``import kronlayers`` loads torch and kronlayers only: TensorLy-Torch (and TensorLy) are
imported when a ``to_tltorch`` / ``from_tltorch`` interop function runs (decompositions are
plain torch), and the MNIST reader (the only user of NumPy) is the submodule
:mod:`kronlayers.datasets`, imported on first use.
"""

from importlib import import_module as _import_module

from . import budget, calibration, decomposition, functional, modules, registry
from .compress import compress
from .decomposition.nearest_kronecker import nearest_kronecker
from .distill import distill
from .modules import FactorizedConv2d, FactorizedLayer, FactorizedLinear
from .ops.khatri_rao import khatri_rao
from .ops.kron import kron, kron_dense, kron_matmul
from .ops.kron_sum import (
    kron_sum,
    kron_sum_diag,
    kron_sum_matmul,
    kron_sum_solve,
    ks_project,
    ks_project_diag,
)
from .plan import Plan
from .summary import summary

__version__ = "0.1.0"

# The layer classes, by name, from the registry (kronlayers.KroneckerLinear, ...).
for _entry in registry.LAYERS:
    globals()[_entry.name] = getattr(modules, _entry.name)

__all__ = [
    *(_entry.name for _entry in registry.LAYERS),
    "FactorizedConv2d",
    "FactorizedLayer",
    "FactorizedLinear",
    "Plan",
    "budget",
    "calibration",
    "compress",
    "datasets",
    "decomposition",
    "distill",
    "functional",
    "khatri_rao",
    "kron",
    "kron_dense",
    "kron_matmul",
    "kron_sum",
    "kron_sum_diag",
    "kron_sum_matmul",
    "kron_sum_solve",
    "ks_project",
    "ks_project_diag",
    "modules",
    "nearest_kronecker",
    "registry",
    "summary",
]
del _entry


def __getattr__(name: str):
    # The MNIST reader pulls in NumPy and is only for examples and tests: load it on demand.
    if name == "datasets":
        return _import_module(".datasets", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
