"""Conversion of dense weights: nearest Kronecker products, CP and Tucker decompositions, and
their calibrated (output-error, whitened) counterparts."""

from .cp import cp_als, cp_decompose, cp_max_rank, cp_rank_from_fraction, cp_to_tensor
from .nearest_kronecker import kron_rearrange, nearest_kronecker
from .tucker import tucker2_decompose
from .whitening import (
    output_error,
    whitened_cp,
    whitened_low_rank,
    whitened_nearest_kronecker,
    whitened_svd,
    whitened_tucker2,
)

__all__ = [
    "cp_als",
    "cp_decompose",
    "cp_max_rank",
    "cp_rank_from_fraction",
    "cp_to_tensor",
    "kron_rearrange",
    "nearest_kronecker",
    "output_error",
    "tucker2_decompose",
    "whitened_cp",
    "whitened_low_rank",
    "whitened_nearest_kronecker",
    "whitened_svd",
    "whitened_tucker2",
]
