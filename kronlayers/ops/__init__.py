"""Tensor operations on Kronecker structure (no parameters, no modules)."""

from .kron import kron, kron_dense, kron_matmul
from .kron_sum import (
    kron_sum,
    kron_sum_diag,
    kron_sum_matmul,
    kron_sum_solve,
    ks_project,
    ks_project_diag,
)

__all__ = [
    "kron",
    "kron_dense",
    "kron_matmul",
    "kron_sum",
    "kron_sum_diag",
    "kron_sum_matmul",
    "kron_sum_solve",
    "ks_project",
    "ks_project_diag",
]
