"""Functional forms of the layers: ``torch.autograd.Function`` s with hand-written kernels."""

from .cp_conv2d import CPConv2dFunction, cp_conv2d, cp_conv2d_flops
from .cp_linear import CPLinearFunction, cp_linear, cp_linear_flops
from .kronecker_linear import (
    KroneckerLinearFunction,
    kronecker_linear,
    kronecker_linear_flops,
)

__all__ = [
    "CPConv2dFunction",
    "CPLinearFunction",
    "KroneckerLinearFunction",
    "cp_conv2d",
    "cp_conv2d_flops",
    "cp_linear",
    "cp_linear_flops",
    "kronecker_linear",
    "kronecker_linear_flops",
]
