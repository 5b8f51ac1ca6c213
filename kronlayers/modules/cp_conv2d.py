"""``CPConv2d``: a drop-in ``nn.Conv2d`` whose kernel is a CP (CANDECOMP/PARAFAC) tensor."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._shapes import check_rank, check_shape, prod
from ..decomposition import cp_decompose, cp_rank_from_fraction
from ..functional.cp_conv2d import conv2d_padding, cp_conv2d, cp_conv2d_kernel, pair_arg

__all__ = ["CPConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _resolve_rank(rank: object, tensor_shape: Sequence[int]) -> int:
    if isinstance(rank, float):
        return cp_rank_from_fraction(rank, tensor_shape)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(
            f"rank must be an int >= 1 or a float in (0, 1], got {type(rank).__name__} {rank!r}"
        )
    return check_rank(int(rank))


def _resolve_shape(name: str, shape: Sequence[int] | None, total: int, total_name: str) -> tuple:
    if shape is None:
        return (total,)
    if isinstance(shape, (int, str)) or not isinstance(shape, Sequence) or len(shape) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of ints or None, got {shape!r}")
    return check_shape(name, shape, total, total_name)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class CPConv2d(nn.Module):
    r"""2-D convolution whose ``(C_out, C_in, kh, kw)`` kernel is a rank-``R`` CP tensor.

    .. math::
        W = \sum_{r=1}^{R} \text{out}[:, r] \circ \text{in}[:, r] \circ \text{kh}[:, r]
            \circ \text{kw}[:, r]

    With ``in_shape=(i_1, ..., i_D)`` / ``out_shape=(o_1, ..., o_E)`` the channels are
    tensorized: the CP tensor is ``(o_1..o_E, i_1..i_D, kh, kw)`` (one factor per mode) reshaped
    row-major to ``(C_out, C_in, kh, kw)``, so ``in`` above is the Khatri-Rao product of the
    input-channel factors. The kernel is never formed in ``forward``: see
    :func:`kronlayers.functional.cp_conv2d` (channel GEMM to ``R``, a rank-one depthwise
    ``kh x kw`` convolution, channel GEMM to ``C_out``; hand-written backward).

    The math matches ``tltorch.FactorizedConv(..., factorization='cp')`` (whose CP weights
    vector is absorbed into the output-channel factor here); see :meth:`from_tltorch` and
    :meth:`to_tltorch`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode:
            as in :class:`torch.nn.Conv2d`: ``padding`` is an int, a pair, ``'valid'`` or
            ``'same'`` (stride 1 only), ``padding_mode`` is ``'zeros'``, ``'reflect'``,
            ``'replicate'`` or ``'circular'``.
        groups: must be 1 (grouped convolutions are not CP-factorized here).
        rank: the CP rank ``R``, an int ``>= 1``, or a float in ``(0, 1]``: the fraction of
            the dense kernel's parameter count to keep,
            ``R = round(fraction * prod(shape) / sum(shape))`` over the (tensorized) kernel shape
            (TensorLy's rule; :func:`kronlayers.decomposition.cp_rank_from_fraction`).
        in_shape, out_shape: tensorizations of ``in_channels`` / ``out_channels`` (products must
            match); ``None`` keeps one factor of size ``C``.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          where

          .. math::
              H_{out} = \left\lfloor\frac{H_{in} + 2 \times \text{padding}[0] - \text{dilation}[0]
                        \times (\text{kernel\_size}[0] - 1) - 1}{\text{stride}[0]} + 1\right\rfloor

          .. math::
              W_{out} = \left\lfloor\frac{W_{in} + 2 \times \text{padding}[1] - \text{dilation}[1]
                        \times (\text{kernel\_size}[1] - 1) - 1}{\text{stride}[1]} + 1\right\rfloor

          (``'same'``: ``H_out = H_in``, ``W_out = W_in``).

    Attributes:
        in_factors (ParameterList): ``D`` tensors ``(i_d, R)``, the input-channel factors.
        out_factors (ParameterList): ``E`` tensors ``(o_e, R)``, the output-channel factors.
        kh_factor (Parameter): ``(kh, R)``, the kernel-height factor.
        kw_factor (Parameter): ``(kw, R)``, the kernel-width factor. (Two named parameters
            rather than a list: the two spatial modes play different roles, and the names read
            better in a ``state_dict``; :attr:`kernel_factors` gives the pair.)
        bias (Parameter or None): ``(C_out,)``.
        rank (int): ``R``.
        weight (Tensor): the dense ``(C_out, C_in, kh, kw)`` kernel, formed on access
            (differentiable, for inspection or export; ``forward`` never forms it).
        reconstruction_error (float or None): for a layer made by :meth:`from_conv`,
            ``||W_conv - W_cp||_F / ||W_conv||_F`` of the decomposition; ``None`` otherwise. A plain
            attribute, not part of the ``state_dict``.

    Example::

        >>> conv = CPConv2d(64, 128, 3, padding=1, rank=32)
        >>> conv(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 128, 32, 32])
        >>> dense = nn.Conv2d(64, 128, 3, padding=1)
        >>> approx = CPConv2d.from_conv(dense, rank=0.25)  # keep ~25% of the parameters
        >>> approx.reconstruction_error  # doctest: +SKIP
        0.83
    """

    in_factors: nn.ParameterList
    out_factors: nn.ParameterList
    bias: torch.Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        in_channels = _positive_int("in_channels", in_channels)
        out_channels = _positive_int("out_channels", out_channels)
        if groups != 1:
            raise ValueError(
                f"groups must be 1 for CPConv2d (grouped convolutions are not CP-factorized), "
                f"got groups={groups!r}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.kernel_size = pair_arg("kernel_size", kernel_size, 1)
        self.stride = pair_arg("stride", stride, 1)
        self.dilation = pair_arg("dilation", dilation, 1)
        # Validates every padding form (and 'same' with a stride) once, up front.
        top, bottom, left, right = conv2d_padding(
            padding, self.kernel_size, self.stride, self.dilation
        )
        self.padding: str | tuple[int, int] = (
            padding if isinstance(padding, str) else pair_arg("padding", padding, 0)
        )
        # As in nn.Conv2d: the F.pad argument (last dim first) for non-'zeros' padding modes.
        self._reversed_padding_repeated_twice = [left, right, top, bottom]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = 1
        self.padding_mode = padding_mode
        self.in_shape = _resolve_shape("in_shape", in_shape, in_channels, "in_channels")
        self.out_shape = _resolve_shape("out_shape", out_shape, out_channels, "out_channels")
        self.rank = _resolve_rank(rank, self.tensor_shape)

        r = self.rank
        self.out_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(o, r, **factory)) for o in self.out_shape]
        )
        self.in_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(i, r, **factory)) for i in self.in_shape]
        )
        self.kh_factor = nn.Parameter(torch.empty(self.kernel_size[0], r, **factory))
        self.kw_factor = nn.Parameter(torch.empty(self.kernel_size[1], r, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reconstruction_error: float | None = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """Shape of the (tensorized) CP kernel: ``(*out_shape, *in_shape, kh, kw)``."""
        return (*self.out_shape, *self.in_shape, *self.kernel_size)

    @property
    def kernel_factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(kh_factor, kw_factor)``, as :func:`kronlayers.functional.cp_conv2d` takes them."""
        return (self.kh_factor, self.kw_factor)

    @property
    def factors(self) -> list[nn.Parameter]:
        """All CP factors in the kernel's mode order: ``out..., in..., kh, kw``."""
        return [*self.out_factors, *self.in_factors, self.kh_factor, self.kw_factor]

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(C_out, C_in, kh, kw)`` kernel (differentiable)."""
        return cp_conv2d_kernel(
            list(self.in_factors), list(self.out_factors), (self.kh_factor, self.kw_factor)
        )

    @property
    def compression_ratio(self) -> float:
        """Dense kernel parameters / CP factor parameters (bias excluded)."""
        return prod(self.tensor_shape) / (self.rank * sum(self.tensor_shape))

    def reset_parameters(self) -> None:
        """Initialise so that the dense kernel's variance is ``nn.Conv2d``'s, ``1 / (3 fan_in)``.

        ``nn.Conv2d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_`` with
        ``a=sqrt(5)``), variance ``1 / (3 fan_in)`` with ``fan_in = C_in * kh * kw``. A CP entry
        is a sum of ``R`` products of ``K`` independent zero-mean factor entries (``K`` = number
        of factors), so its variance is ``R * s^(2K)`` for factor std ``s``; each factor is
        drawn ``N(0, s^2)`` with ``s = (1 / (3 fan_in R))^(1 / (2K))``. The bias follows
        ``nn.Conv2d``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
        """
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        n_factors = len(self.tensor_shape)
        std = (1.0 / (3.0 * fan_in * self.rank)) ** (1.0 / (2 * n_factors))
        with torch.no_grad():
            for f in self.factors:
                f.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding: object = self.padding
        if self.padding_mode != "zeros":
            # As nn.Conv2d: pad explicitly with the mode, then convolve without padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return cp_conv2d(
            input,
            list(self.in_factors),
            list(self.out_factors),
            (self.kh_factor, self.kw_factor),
            self.bias,
            self.stride,
            padding,
            self.dilation,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += (
                f", padding={self.padding!r}"
                if isinstance(self.padding, str)
                else (f", padding={self.padding}")
            )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", rank={self.rank}"
        if len(self.in_shape) > 1 or len(self.out_shape) > 1:
            s += f", in_shape={self.in_shape}, out_shape={self.out_shape}"
        s += f", compression={self.compression_ratio:.1f}x"
        return s

    # ------------------------------------------------------------------------------------------
    # Conversions
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
    ) -> CPConv2d:
        """A ``CPConv2d`` approximating a trained ``nn.Conv2d`` by CP decomposition of its kernel.

        The kernel, reshaped to ``(*out_shape, *in_shape, kh, kw)``, is decomposed by
        :func:`kronlayers.decomposition.cp_decompose` (ALS, SVD init, float64, on the kernel's
        device); bias, stride, padding, dilation and padding_mode are copied, and the new layer
        has the conv's device and dtype. The relative error
        ``||W - W_cp||_F / ||W||_F`` is stored in ``reconstruction_error`` on the returned
        layer: check it; a low rank on a trained kernel can be a poor approximation.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1 to CP-decompose it, got {conv.groups}")
        weight = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            device=weight.device,
            dtype=weight.dtype,
        )
        factors, rel_error = cp_decompose(weight.detach().reshape(layer.tensor_shape), layer.rank)
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=True):
                p.copy_(f)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.reconstruction_error = rel_error
        return layer

    @classmethod
    def from_tltorch(cls, layer: nn.Module) -> CPConv2d:
        """An equivalent ``CPConv2d`` from a ``tltorch.FactorizedConv`` with a CP kernel.

        Supported: a single 2-D convolution (``order=2``, ``n_layers=1``) whose ``weight`` is a
        ``tltorch.CPTensor``, any ``implementation`` ('factorized', 'reconstructed',
        'mobilenet' compute the same function). TensorLy-Torch's CP weights vector is absorbed
        into the output-channel factor; stride, padding, dilation and bias are copied. The
        result has single-factor channels (``in_shape=(C_in,)``, ``out_shape=(C_out,)``).
        """
        import tltorch  # lazily: importing it sets TensorLy's global backend

        if not isinstance(layer, tltorch.FactorizedConv):
            raise TypeError(f"layer must be a tltorch.FactorizedConv, got {type(layer).__name__}")
        if not isinstance(layer.weight, tltorch.CPTensor):
            raise ValueError(
                f"layer must have a CP weight (factorization='cp'), got "
                f"{type(layer.weight).__name__}"
            )
        if layer.order != 2:
            raise ValueError(f"layer must be a 2-D convolution (order=2), got order={layer.order}")
        if layer.n_layers != 1:
            raise ValueError(
                f"layer must parametrize one convolution, got n_layers={layer.n_layers}"
            )
        weights, (out_f, in_f, kh_f, kw_f) = layer.weight.weights, list(layer.weight.factors)
        ref = out_f
        new = cls(
            layer.in_channels,
            layer.out_channels,
            tuple(int(k) for k in layer.kernel_size),
            stride=tuple(int(s) for s in layer.stride.tolist()),
            padding=tuple(int(p) for p in layer.padding.tolist()),
            dilation=tuple(int(d) for d in layer.dilation.tolist()),
            bias=layer.bias is not None,
            rank=int(layer.weight.rank),
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            new.out_factors[0].copy_(out_f * weights)
            new.in_factors[0].copy_(in_f)
            new.kh_factor.copy_(kh_f)
            new.kw_factor.copy_(kw_f)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def to_tltorch(self, implementation: str = "factorized") -> nn.Module:
        """An equivalent ``tltorch.FactorizedConv(..., factorization='cp')``.

        TensorLy-Torch's ``FactorizedConv`` has no tensorized channels, no padding modes and
        only symmetric integer padding, so this raises ``ValueError`` for ``in_shape`` /
        ``out_shape`` with more than one factor, ``padding_mode != 'zeros'`` and ``'same'``
        padding that is not symmetric (an even dilated kernel). ``'same'`` with an odd kernel
        and ``'valid'`` become integer padding. Its CP weights vector is set to ones.

        Args:
            implementation: TensorLy-Torch's forward: ``'factorized'`` (its default in the
                constructor), ``'reconstructed'`` (forms the dense kernel; its default in
                ``from_conv``) or ``'mobilenet'``.
        """
        import tltorch  # lazily: importing it sets TensorLy's global backend

        if len(self.in_shape) != 1 or len(self.out_shape) != 1:
            raise ValueError(
                "to_tltorch needs single-factor channels: tltorch.FactorizedConv has no "
                f"tensorized channels (in_shape={self.in_shape}, out_shape={self.out_shape})"
            )
        if self.padding_mode != "zeros":
            raise ValueError(
                "to_tltorch needs padding_mode='zeros': tltorch.FactorizedConv has no padding "
                f"modes (got {self.padding_mode!r})"
            )
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if top != bottom or left != right:
            raise ValueError(
                f"to_tltorch needs symmetric padding; padding={self.padding!r} with "
                f"kernel_size={self.kernel_size}, dilation={self.dilation} pads "
                f"(top, bottom, left, right)={(top, bottom, left, right)}"
            )
        if implementation not in ("factorized", "reconstructed", "mobilenet"):
            raise ValueError(
                "implementation must be 'factorized', 'reconstructed' or 'mobilenet', got "
                f"{implementation!r}"
            )
        ref = self.kh_factor
        out = tltorch.FactorizedConv(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            order=2,
            stride=self.stride,
            padding=(top, left),
            dilation=self.dilation,
            bias=self.bias is not None,
            factorization="cp",
            rank=self.rank,
            implementation=implementation,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            out.weight.weights.fill_(1.0)
            for dst, src in zip(out.weight.factors, self.factors, strict=True):
                dst.copy_(src)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out
