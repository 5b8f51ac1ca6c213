"""``CPLinear``: a drop-in ``nn.Linear`` whose tensorized weight is a CP tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._shapes import balanced_factorization, check_rank, check_shape, prod
from ..decomposition import cp_decompose, cp_rank_from_fraction, cp_to_tensor
from ..functional.cp_linear import MAX_MODES, cp_linear

if TYPE_CHECKING:
    import tltorch

__all__ = ["CPLinear"]


def _check_features(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _tensorized(name: str, shape, features: int, features_name: str, order: int) -> tuple:
    if shape is None:
        return balanced_factorization(features, order)
    shape = check_shape(name, shape, features, features_name)
    if len(shape) > MAX_MODES:
        raise ValueError(f"{name} may have at most {MAX_MODES} modes, got {len(shape)}")
    return shape


def _resolve_rank(rank: int | float, tensor_shape: Sequence[int]) -> int:
    if isinstance(rank, float):
        return cp_rank_from_fraction(rank, tensor_shape)
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int or a float in (0, 1], got {type(rank).__name__}")
    return check_rank(rank)


class CPLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` where ``W`` is a tensorized CP (CANDECOMP/PARAFAC) tensor.

    The ``(out_features, in_features)`` weight, viewed row-major as
    ``(out_1, ..., out_P, in_1, ..., in_Q)``, is

    .. math::
        W = \sum_{r=1}^{R} B_1[:, r] \circ \dots \circ B_P[:, r] \circ
            A_1[:, r] \circ \dots \circ A_Q[:, r],

    the same convention as TensorLy-Torch's ``FactorizedLinear(factorization='cp')`` (whose
    ``tensorized_shape`` is ``(out_shape, in_shape)``, out first, while its constructor takes
    the in shape first). The layer holds ``R * (sum in_q + sum out_p)`` weight parameters
    instead of ``in_features * out_features`` and never forms ``W`` in ``forward`` (see
    :func:`kronlayers.functional.cp_linear`).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer does not learn an additive bias. Default: ``True``.
        rank: the CP rank ``R``, an int ``>= 1``, or a float in ``(0, 1]``: the fraction of
            the dense weight's parameter count to keep,
            ``R = round(rank * in_features * out_features / (sum in_q + sum out_p))``.
        in_shape: tensorized input shape, ints with product ``in_features``. Default: the
            most balanced ``order``-way factorization of ``in_features``.
        out_shape: tensorized output shape, ints with product ``out_features``. Default: the
            most balanced ``order``-way factorization of ``out_features``. It may have a
            different number of modes than ``in_shape``.
        order: number of modes of the default shapes. Default: 2.

    Shape:
        - Input: :math:`(*, H_{in})` where :math:`*` means any number of dimensions
          including none and :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})` where all but the last dimension are the same shape
          as the input and :math:`H_{out} = \text{out\_features}`.

    Attributes:
        in_factors (nn.ParameterList): ``Q`` learnable factors ``A_q`` of shape
            ``(in_q, R)``.
        out_factors (nn.ParameterList): ``P`` learnable factors ``B_p`` of shape
            ``(out_p, R)``. All factors are initialised i.i.d. from
            :math:`\mathcal{U}(-\sqrt{3v}, \sqrt{3v})` with :math:`R\,v^{P+Q} =
            1 / (3\,\text{in\_features})`, so each entry of ``W`` has ``nn.Linear``'s
            default variance.
        bias: the learnable bias of shape ``(out_features)``, initialised as
            ``nn.Linear``'s from :math:`\mathcal{U}(-1/\sqrt{H_{in}}, 1/\sqrt{H_{in}})`.
        weight (Tensor): the dense ``(out_features, in_features)`` weight, rebuilt from the
            factors on each access (differentiable; for inspection and export).
        rank (int): the CP rank ``R``.
        in_shape, out_shape (tuple[int, ...]): the tensorized shapes.
        reconstruction_error (float | None): set by :meth:`from_linear` to the relative
            Frobenius error ``||W - W_cp|| / ||W||`` of the decomposition; ``None`` otherwise.

    Example::

        >>> m = CPLinear(1024, 512, rank=32)
        >>> m.in_shape, m.out_shape
        ((32, 32), (16, 32))
        >>> x = torch.randn(8, 1024)
        >>> m(x).shape
        torch.Size([8, 512])
        >>> torch.allclose(m(x), torch.nn.functional.linear(x, m.weight, m.bias), atol=1e-5)
        True
    """

    in_features: int
    out_features: int
    rank: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    reconstruction_error: float | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        order: int = 2,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = _check_features("in_features", in_features)
        self.out_features = _check_features("out_features", out_features)
        if not isinstance(order, int) or isinstance(order, bool) or not 1 <= order <= MAX_MODES:
            raise ValueError(f"order must be an int in [1, {MAX_MODES}], got {order!r}")
        self.in_shape = _tensorized("in_shape", in_shape, in_features, "in_features", order)
        self.out_shape = _tensorized("out_shape", out_shape, out_features, "out_features", order)
        self.rank = _resolve_rank(rank, (*self.out_shape, *self.in_shape))
        self.in_factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, self.rank, **factory)) for d in self.in_shape
        )
        self.out_factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, self.rank, **factory)) for d in self.out_shape
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reconstruction_error = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the factors (``nn.Linear``'s weight variance) and the bias."""
        n_factors = len(self.in_shape) + len(self.out_shape)
        # Var(W_ij) = R * v^(P+Q) for i.i.d. zero-mean factors of variance v; uniform
        # rather than normal factors keep the product's tails light.
        v = (1.0 / (3.0 * self.in_features * self.rank)) ** (1.0 / n_factors)
        bound = math.sqrt(3.0 * v)
        with torch.no_grad():
            for f in (*self.in_factors, *self.out_factors):
                f.uniform_(-bound, bound)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out_features, in_features)`` weight (differentiable, allocates it)."""
        w = cp_to_tensor([*self.out_factors, *self.in_factors])
        return w.reshape(self.out_features, self.in_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cp_linear(input, list(self.in_factors), list(self.out_factors), self.bias)

    @property
    def compression_ratio(self) -> float:
        """Dense weight parameters over CP weight parameters (biases excluded)."""
        return (self.in_features * self.out_features) / (
            self.rank * (sum(self.in_shape) + sum(self.out_shape))
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, rank={self.rank}, "
            f"compression={self.compression_ratio:.2f}x"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        order: int = 2,
    ) -> CPLinear:
        """A ``CPLinear`` approximating ``linear`` by a rank-``rank`` CP decomposition.

        The tensorized weight ``(*out_shape, *in_shape)`` is decomposed with
        :func:`kronlayers.decomposition.cp_decompose` (alternating least squares, float64,
        on the weight's device); the bias is copied. The relative reconstruction error
        ``||W - W_cp||_F / ||W||_F`` is stored in ``reconstruction_error`` of the result.
        The new layer has ``linear``'s device and dtype.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            order=order,
            device=w.device,
            dtype=w.dtype,
        )
        factors, error = cp_decompose(
            w.detach().reshape(*layer.out_shape, *layer.in_shape), layer.rank
        )
        n_out = len(layer.out_shape)
        with torch.no_grad():
            for p, f in zip(layer.out_factors, factors[:n_out], strict=True):
                p.copy_(f)
            for p, f in zip(layer.in_factors, factors[n_out:], strict=True):
                p.copy_(f)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.reconstruction_error = error
        return layer

    @classmethod
    def from_tltorch(cls, layer: tltorch.FactorizedLinear) -> CPLinear:
        """Convert a TensorLy-Torch ``FactorizedLinear(factorization='cp')``, same outputs.

        TensorLy-Torch stores ``W = sum_r w_r * (factor_0 ∘ ... ∘ factor_{P+Q-1})[..., r]``
        with the ``P`` output factors first. The weights vector ``w`` is absorbed into the
        factors: ``|w_r|^(1/(P+Q))`` into each (balanced scales), the sign into the first
        output factor. Batched layers (``n_layers > 1``) are rejected.
        """
        import tltorch
        from tltorch.factorized_tensors.tensorized_matrices import CPTensorized

        if not isinstance(layer, tltorch.FactorizedLinear):
            raise TypeError(f"layer must be a tltorch.FactorizedLinear, got {type(layer).__name__}")
        if layer.n_layers != 1:
            raise ValueError(
                f"layer parametrizes n_layers={layer.n_layers} linear layers with one tensor; "
                "only n_layers=1 can be converted (index a single layer first)"
            )
        cp = layer.weight
        if not isinstance(cp, CPTensorized):
            raise ValueError(f"layer must use factorization='cp', got a {type(cp).__name__} weight")
        out_shape = tuple(int(s) for s in cp.tensorized_shape[0])
        in_shape = tuple(int(s) for s in cp.tensorized_shape[1])
        factors = [f.detach() for f in cp.factors]
        weights = cp.weights.detach()
        ref = factors[0]
        new = cls(
            prod(in_shape),
            prod(out_shape),
            bias=layer.bias is not None,
            rank=int(weights.shape[0]),
            in_shape=in_shape,
            out_shape=out_shape,
            device=ref.device,
            dtype=ref.dtype,
        )
        scale = weights.abs() ** (1.0 / len(factors))
        factors = [f * scale for f in factors]
        factors[0] = factors[0] * torch.sign(weights)
        n_out = len(out_shape)
        with torch.no_grad():
            for p, f in zip(new.out_factors, factors[:n_out], strict=True):
                p.copy_(f)
            for p, f in zip(new.in_factors, factors[n_out:], strict=True):
                p.copy_(f)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def to_tltorch(self, implementation: str = "factorized") -> tltorch.FactorizedLinear:
        """The equivalent TensorLy-Torch ``FactorizedLinear(factorization='cp')``.

        Its CP weights are set to ones and its factors are copies of ``out_factors`` then
        ``in_factors``; ``implementation`` is passed through (``'factorized'`` or
        ``'reconstructed'``).
        """
        import tltorch

        ref = self.in_factors[0]
        out = tltorch.FactorizedLinear(
            self.in_shape,
            self.out_shape,
            bias=self.bias is not None,
            factorization="cp",
            rank=self.rank,
            implementation=implementation,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            out.weight.weights.fill_(1.0)
            for p, f in zip(out.weight.factors, [*self.out_factors, *self.in_factors], strict=True):
                p.copy_(f)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out
