"""Conversion of dense weights: nearest Kronecker products and CP decompositions."""

from .cp import cp_decompose, cp_rank_from_fraction, cp_to_tensor
from .nearest_kronecker import kron_rearrange, nearest_kronecker

__all__ = [
    "cp_decompose",
    "cp_rank_from_fraction",
    "cp_to_tensor",
    "kron_rearrange",
    "nearest_kronecker",
]
