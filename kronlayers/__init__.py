"""kronlayers: compressed drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

Kronecker-product and CP-factorized layers with hand-written forward and backward kernels,
conversion of trained dense layers, and Kronecker(-sum) utilities.
"""

from . import datasets, decomposition, functional
from .compress import compress
from .decomposition.nearest_kronecker import nearest_kronecker
from .modules.cp_conv2d import CPConv2d
from .modules.cp_linear import CPLinear
from .modules.kronecker_linear import KroneckerLinear
from .ops.kron import kron, kron_dense, kron_matmul
from .ops.kron_sum import (
    kron_sum,
    kron_sum_diag,
    kron_sum_matmul,
    kron_sum_solve,
    ks_project,
    ks_project_diag,
)
from .summary import summary

__version__ = "0.1.0"

__all__ = [
    "CPConv2d",
    "CPLinear",
    "KroneckerLinear",
    "compress",
    "datasets",
    "decomposition",
    "functional",
    "kron",
    "kron_dense",
    "kron_matmul",
    "kron_sum",
    "kron_sum_diag",
    "kron_sum_matmul",
    "kron_sum_solve",
    "ks_project",
    "ks_project_diag",
    "nearest_kronecker",
    "summary",
]
