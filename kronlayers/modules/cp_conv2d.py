"""``CPConv2d``: a drop-in ``nn.Conv2d`` whose kernel is a CP (CANDECOMP/PARAFAC) tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._shapes import prod
from .._validation import check_rank, check_shape
from ..decomposition.cp import cp_max_rank, cp_rank_from_fraction
from ..decomposition.whitening import DEFAULT_DAMPING, check_cp_fit_options, fit_cp
from ..functional.cp_conv2d import cp_conv2d, cp_conv2d_flops, cp_conv2d_kernel, cp_conv2d_plan
from ._base import FactorizedConv2d, NotCompressible

__all__ = ["CPConv2d"]


def _resolve_rank(rank: object, tensor_shape: Sequence[int]) -> int:
    rank = check_rank(rank)
    if isinstance(rank, float):
        return cp_rank_from_fraction(rank, tensor_shape)
    return rank


def _resolve_shape(name: str, shape: Sequence[int] | None, total: int, total_name: str) -> tuple:
    if shape is None:
        return (total,)
    return check_shape(name, shape, total, total_name)


class CPConv2d(FactorizedConv2d):
    r"""2-D convolution whose ``(C_out, C_in, kh, kw)`` kernel is a rank-``R`` CP tensor.

    .. math::
        W = \sum_{r=1}^{R} \text{out}[:, r] \circ \text{in}[:, r] \circ \text{kh}[:, r]
            \circ \text{kw}[:, r]

    With ``in_shape=(i_1, ..., i_D)`` / ``out_shape=(o_1, ..., o_E)`` the channels are
    tensorized: the CP tensor is ``(o_1..o_E, i_1..i_D, kh, kw)`` (one factor per mode) reshaped
    row-major to ``(C_out, C_in, kh, kw)``, so ``in`` above is the Khatri-Rao product of the
    input-channel factors. ``forward`` runs :func:`kronlayers.functional.cp_conv2d` (channel
    GEMM to ``R``, a rank-one depthwise ``kh x kw`` convolution, channel GEMM to ``C_out``;
    hand-written backward), or forms the kernel and runs one ``F.conv2d`` where the
    dispatcher finds that faster (high ranks, tiny inputs; see :meth:`dispatch_plan`).

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
            (differentiable, for inspection or export).
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

    method: ClassVar[str] = "cp"
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
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        factory = {"device": device, "dtype": dtype}
        in_channels, out_channels = self.in_channels, self.out_channels
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
        self.output_error: float | None = None
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

    def factor_parameters(self) -> list[nn.Parameter]:
        return self.factors

    def reset_parameters(self) -> None:
        """Initialise so that the dense kernel's variance is ``nn.Conv2d``'s, ``1 / (3 fan_in)``.

        ``nn.Conv2d`` draws ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_`` with
        ``a=sqrt(5)``), variance ``1 / (3 fan_in)`` with ``fan_in = C_in * kh * kw``. A CP entry
        is a sum of ``R`` products of ``K`` independent zero-mean factor entries (``K`` = number
        of factors), so its variance is ``R * s^(2K)`` for factor std ``s``; each factor is
        drawn ``N(0, s^2)`` with ``s = (1 / (3 fan_in R))^(1 / (2K))``. The bias follows
        ``nn.Conv2d``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
        """
        n_factors = len(self.tensor_shape)
        std = (1.0 / (3.0 * self.fan_in * self.rank)) ** (1.0 / (2 * n_factors))
        with torch.no_grad():
            for f in self.factors:
                f.normal_(0.0, std)
        self._reset_bias()

    def _conv_forward(self, input: torch.Tensor, padding: object) -> torch.Tensor:
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

    def flops(self, input_shape: Sequence[int]) -> int:
        batch, (h, w), padding = self._kernel_call_geometry(input_shape)
        return cp_conv2d_flops(
            self.in_channels, self.out_channels, self.kernel_size, self.rank, (h, w), batch,
            self.stride, padding, self.dilation,
        )  # fmt: skip

    def dispatch_plan(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> dict[str, Any]:
        """:func:`kronlayers.functional.cp_conv2d_plan` for this layer: the path and the
        estimated seconds of each for an input of ``input_shape``."""
        batch, (h, w), padding = self._kernel_call_geometry(input_shape)
        p = self.kh_factor
        return cp_conv2d_plan(
            self.in_channels, self.out_channels, self.kernel_size, self.rank,
            (batch, self.in_channels, h, w), self.stride, padding, self.dilation,
            dtype=p.dtype, device_type=p.device.type,
            input_grad=self._grad_needed(requires_grad),
            factor_grad=self._grad_needed(requires_grad), bias=self.bias is not None,
        )  # fmt: skip

    def rank_label(self) -> str:
        s = f"rank={self.rank}"
        if len(self.in_shape) > 1 or len(self.out_shape) > 1:
            s += f", in_shape={self.in_shape}, out_shape={self.out_shape}"
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
        input_gram: torch.Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
        n_iter_max: int = 100,
        tol: float = 1e-5,
        init: Sequence[torch.Tensor] | None = None,
        refine_iter: int = 10,
    ) -> CPConv2d:
        """A ``CPConv2d`` approximating a trained ``nn.Conv2d`` by CP decomposition of its kernel.

        Data-free (``input_gram=None``): the kernel, reshaped to ``(*out_shape, *in_shape, kh,
        kw)``, is decomposed by :func:`kronlayers.decomposition.cp_decompose` (CP-ALS in
        torch, HOSVD init or the warm start ``init``, at most ``n_iter_max`` sweeps, relative
        tolerance ``tol``, on the kernel's device), minimising ``||W - W_cp||_F``.

        Calibrated (``input_gram=G``, the ``(C_in kh kw)``-square Gram of the layer's unfolded
        input patches in ``F.unfold`` order, e.g. from
        :func:`kronlayers.calibration.collect_statistics`): the factors minimise the error of
        the outputs on that data, ``tr((W - Ŵ) G (W - Ŵ)ᵀ)`` with ``W`` the
        ``(C_out, C_in kh kw)`` kernel matrix (from the data-free decomposition, at most
        ``refine_iter`` sweeps on the full ``G``, each lowering the objective:
        :func:`kronlayers.decomposition.whitening.whitened_cp`).

        Bias, stride, padding, dilation and padding_mode are copied, and the new layer has the
        conv's device and dtype. ``reconstruction_error`` holds ``||W - W_cp||_F / ||W||_F``
        (check it: a low rank on a trained kernel can be a poor approximation) and, when
        calibrated, ``output_error`` the relative output error on the calibration data.
        """
        cls._check_dense(conv)
        damping, n_iter_max, tol, refine_iter = check_cp_fit_options(
            damping, n_iter_max, tol, refine_iter
        )
        weight = conv.weight
        layer = cls.like(conv, rank=rank, in_shape=in_shape, out_shape=out_shape)
        factors, out_err = fit_cp(
            weight, layer.out_shape, (*layer.in_shape, *layer.kernel_size), layer.rank,
            input_gram=input_gram, damping=damping, n_iter_max=n_iter_max, tol=tol,
            refine_iter=refine_iter, init=init,
        )  # fmt: skip
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=True):
                p.copy_(f)
        layer._copy_bias_from(conv)
        layer._record_error(weight)
        layer.output_error = out_err
        return layer

    @classmethod
    def compress_config(cls, module: nn.Conv2d, rank: int | float | tuple) -> dict[str, Any]:
        """``from_conv`` arguments for :func:`kronlayers.compress`: ``rank`` (an int, or a
        float fraction by TensorLy's rule) over the untensorized ``(C_out, C_in, kh, kw)``
        kernel, or :class:`NotCompressible` when that needs at least the dense weight count."""
        if module.groups != 1:
            raise NotCompressible(
                f"grouped convolution (groups={module.groups}) is not CP-factorized"
            )
        tensor_shape = (module.out_channels, module.in_channels, *module.kernel_size)
        r = _resolve_rank(rank, tensor_shape)
        # No tensor of this shape has a rank above cp_max_rank: a float rank is capped there.
        cap = cp_max_rank(tensor_shape)
        if isinstance(rank, float):
            r = min(r, cap)
        elif r > cap:
            raise NotCompressible(
                f"CP rank {r} exceeds {cap}, the largest rank of a {tensor_shape} kernel"
            )
        weights, dense = r * sum(tensor_shape), prod(tensor_shape)
        if weights >= dense:
            raise NotCompressible(
                f"CP rank {r} of kernel {tensor_shape} needs {weights:,} weights, not fewer "
                f"than the dense {dense:,}"
            )
        return {"rank": r}

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
