"""``nn.Module`` layers; each wraps a functional kernel from :mod:`kronlayers.functional`."""

from .kronecker_linear import KroneckerLinear

__all__: list[str] = [
    "KroneckerLinear",
]
