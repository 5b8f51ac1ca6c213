"""``nn.Module`` layers; each wraps a functional kernel from :mod:`kronlayers.functional`."""

from .cp_conv2d import CPConv2d
from .cp_linear import CPLinear
from .kronecker_linear import KroneckerLinear

__all__: list[str] = [
    "CPConv2d",
    "CPLinear",
    "KroneckerLinear",
]
