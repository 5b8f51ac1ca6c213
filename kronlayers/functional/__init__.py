"""Functional forms of the layers: ``torch.autograd.Function`` s with hand-written kernels."""

from .kronecker_linear import (
    KroneckerLinearFunction,
    kronecker_linear,
    kronecker_linear_flops,
)

__all__ = [
    "KroneckerLinearFunction",
    "kronecker_linear",
    "kronecker_linear_flops",
]
