"""kronlayers: compressed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

Kronecker-product and CP-factorized layers with hand-written forward and backward kernels,
conversion of trained dense layers, and Kronecker(-sum) utilities.
"""

from . import decomposition, functional
from .decomposition.nearest_kronecker import nearest_kronecker
from .modules.kronecker_linear import KroneckerLinear
from .ops.kron import kron, kron_dense, kron_matmul

__version__ = "0.1.0"

__all__ = [
    "KroneckerLinear",
    "decomposition",
    "functional",
    "kron",
    "kron_dense",
    "kron_matmul",
    "nearest_kronecker",
]
