"""Tensor operations on Kronecker structure (no parameters, no modules)."""

from .kron import kron, kron_dense, kron_matmul

__all__ = ["kron", "kron_dense", "kron_matmul"]
