"""``KroneckerLinear``: a drop-in ``nn.Linear`` whose weight is a sum of Kronecker products."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._shapes import balanced_factorization, check_rank, check_shape
from ..decomposition.nearest_kronecker import nearest_kronecker
from ..functional.kronecker_linear import kronecker_linear
from ..ops.kron import kron_dense

__all__ = ["KroneckerLinear"]


class KroneckerLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with ``W = sum_{r=1}^{R} F_1[r] ⊗ F_2[r] ⊗ ... ⊗ F_d[r]``.

    A drop-in replacement for :class:`torch.nn.Linear` that stores ``R * sum_k out_k * in_k``
    weights instead of ``prod_k out_k * in_k`` and never forms ``W``: the input is viewed as
    a ``(*, in_1, ..., in_d)`` tensor and each axis is multiplied by its factor (the vec
    trick), with hand-written forward and backward kernels
    (:func:`kronlayers.functional.kronecker_linear`). For ``in = out = 4096`` with
    ``64x64 ⊗ 64x64`` factors that is 8,192 weights instead of 16.8 M, and 1/32 of the FLOPs.

    Args:
        in_features: size of each input sample, ``prod(in_shape)``.
        out_features: size of each output sample, ``prod(out_shape)``.
        bias: if ``False``, the layer does not learn an additive bias. Default: ``True``.
        in_shape: ``(in_1, ..., in_d)``; default: the most balanced two-factor split of
            ``in_features`` (e.g. 784 -> (28, 28)), or a ``d``-factor split if ``out_shape``
            is given with ``d`` entries.
        out_shape: ``(out_1, ..., out_d)``; default: the most balanced split of
            ``out_features`` into as many factors as ``in_shape`` has.
        rank: number ``R`` of Kronecker terms summed. Default: 1.
        shared_factors: if ``True``, one ``(R, out_1, in_1)`` parameter is used for every
            factor (``W = sum_r F[r] ⊗ ... ⊗ F[r]``); requires all ``(out_k, in_k)`` equal.

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` is any number of dimensions (including
          none) and :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` with :math:`H_{out} = \text{out\_features}`.

    Attributes:
        factors: :class:`~torch.nn.ParameterList` of the learnable factors, each
            ``(R, out_k, in_k)``; ``d`` entries, or one when ``shared_factors``.
        bias: the learnable bias ``(out_features,)``, or ``None``.
        weight: the dense ``(out_features, in_features)`` matrix, computed on access
            (differentiable; for inspection and export, it allocates the full matrix).

    Initialisation: factor entries are drawn i.i.d. from ``U(-b, b)`` with ``b`` chosen so
    that the entries of ``W`` have the variance of :class:`torch.nn.Linear`'s default weights,
    ``1 / (3 * in_features)``; the bias is drawn as in ``nn.Linear``.

    Example::

        >>> m = KroneckerLinear(4096, 4096)  # 64x64 ⊗ 64x64
        >>> x = torch.randn(32, 4096)
        >>> m(x).shape
        torch.Size([32, 4096])
        >>> sum(p.numel() for p in m.parameters())
        12288
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        rank: int = 1,
        shared_factors: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = check_rank(rank)
        if in_shape is None and out_shape is None:
            in_shape = balanced_factorization(in_features, 2)
            out_shape = balanced_factorization(out_features, 2)
        elif in_shape is None:
            out_shape = check_shape("out_shape", out_shape, out_features, "out_features")
            in_shape = balanced_factorization(in_features, len(out_shape))
        elif out_shape is None:
            in_shape = check_shape("in_shape", in_shape, in_features, "in_features")
            out_shape = balanced_factorization(out_features, len(in_shape))
        self.in_shape = check_shape("in_shape", in_shape, in_features, "in_features")
        self.out_shape = check_shape("out_shape", out_shape, out_features, "out_features")
        if len(self.in_shape) != len(self.out_shape):
            raise ValueError(
                f"in_shape {self.in_shape} and out_shape {self.out_shape} must have the same "
                "number of factors"
            )
        self.shared_factors = bool(shared_factors)
        pairs = list(zip(self.out_shape, self.in_shape, strict=True))
        if self.shared_factors and len(set(pairs)) != 1:
            raise ValueError(
                "shared_factors=True requires every factor to have the same (out_k, in_k), "
                f"got out_shape={self.out_shape}, in_shape={self.in_shape}"
            )
        unique = pairs[:1] if self.shared_factors else pairs
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(self.rank, o, i, **factory)) for o, i in unique]
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @property
    def num_factors(self) -> int:
        """The number ``d`` of Kronecker factors (the length of ``in_shape``)."""
        return len(self.in_shape)

    def factor_tensors(self) -> list[torch.Tensor]:
        """The ``d`` factors in Kronecker order (the shared one repeated when tied)."""
        if self.shared_factors:
            return [self.factors[0]] * self.num_factors
        return list(self.factors)

    def reset_parameters(self) -> None:
        """Re-draw the factors (dense-weight variance of ``nn.Linear``) and the bias."""
        d = self.num_factors
        # Var(W_ij) = R * prod_k Var(F_k) for independent zero-mean factors; nn.Linear's
        # default kaiming_uniform(a=sqrt(5)) gives Var(W_ij) = 1 / (3 * in_features).
        target = 1.0 / (3.0 * self.in_features)
        per_factor = (target / self.rank) ** (1.0 / d)
        bound = math.sqrt(3.0 * per_factor)
        with torch.no_grad():
            for f in self.factors:
                f.uniform_(-bound, bound)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out_features, in_features)`` weight (differentiable, allocates it)."""
        return kron_dense(self.factor_tensors())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if isinstance(input, torch.Tensor) and (
            input.dim() == 0 or input.shape[-1] != self.in_features
        ):
            raise ValueError(
                f"input must have shape (*, {self.in_features}), got {tuple(input.shape)}"
            )
        return kronecker_linear(input, self.factor_tensors(), self.bias)

    def num_factor_parameters(self) -> int:
        """Number of weights in the factors (bias excluded)."""
        return sum(p.numel() for p in self.factors)

    @property
    def compression_ratio(self) -> float:
        """Dense weight count divided by factor weight count (bias excluded)."""
        return self.in_features * self.out_features / self.num_factor_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, rank={self.rank}"
            + (", shared_factors=True" if self.shared_factors else "")
            + f", compression={self.compression_ratio:.1f}x"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        rank: int = 1,
    ) -> KroneckerLinear:
        """Build the nearest ``KroneckerLinear`` to a trained :class:`~torch.nn.Linear`.

        The factors are :func:`kronlayers.decomposition.nearest_kronecker` of
        ``linear.weight`` (optimal in Frobenius norm for two factors), the bias is copied.
        The relative error ``||W - W_kron||_F / ||W||_F`` is stored in
        ``reconstruction_error`` on the returned layer.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            in_shape=in_shape,
            out_shape=out_shape,
            rank=rank,
            device=w.device,
            dtype=w.dtype,
        )
        factors = nearest_kronecker(w, layer.out_shape, layer.in_shape, rank=rank)
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=True):
                p.copy_(f)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            dense = w.detach()
            norm = dense.norm()
            err = (dense - layer.weight).norm()
            layer.reconstruction_error = float(err / norm) if norm > 0 else float(err)
        return layer
