"""``TuckerConv2d``: a drop-in ``nn.Conv2d`` whose kernel is a Tucker-2 tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_rank, check_tensor
from ..decomposition.tucker import tucker2_decompose
from ..decomposition.whitening import DEFAULT_DAMPING, _check_damping, whitened_tucker2
from ..functional.tucker_conv2d import (
    tucker_conv2d,
    tucker_conv2d_flops,
    tucker_conv2d_kernel,
    tucker_conv2d_plan,
)
from ._base import FactorizedConv2d, NotCompressible

__all__ = ["TuckerConv2d"]


def _tucker_weights(c_in: int, c_out: int, k: int, r_in: int, r_out: int) -> int:
    return c_in * r_in + r_out * r_in * k + c_out * r_out


def _ranks_from_fraction(fraction: float, c_in: int, c_out: int, k: int) -> tuple[int, int]:
    # Keep R_in / C_in = R_out / C_out = a and solve the weight count for a:
    # a (C_in^2 + C_out^2) + a^2 C_in C_out k = fraction * C_out C_in k.
    p, q = c_in * c_out * k, c_in * c_in + c_out * c_out
    a = (-q + math.sqrt(q * q + 4 * p * fraction * p)) / (2 * p)
    return (min(c_in, max(1, round(a * c_in))), min(c_out, max(1, round(a * c_out))))


def resolve_tucker_ranks(
    rank: object, in_channels: int, out_channels: int, kernel_size: tuple[int, int]
) -> tuple[int, int]:
    """``(R_in, R_out)`` for a ``rank`` argument of :class:`TuckerConv2d`.

    An int ``r`` gives ``(min(r, C_in), min(r, C_out))``; a pair is taken as ``(R_in, R_out)``
    and must not exceed the channel counts; a float in ``(0, 1]`` keeps about that fraction of
    the dense weights with ``R_in / C_in = R_out / C_out``.
    """
    rank = check_rank(rank, parts=2)
    k = kernel_size[0] * kernel_size[1]
    if isinstance(rank, float):
        return _ranks_from_fraction(rank, in_channels, out_channels, k)
    if isinstance(rank, int):
        return (min(rank, in_channels), min(rank, out_channels))
    r_in, r_out = rank
    if r_in > in_channels or r_out > out_channels:
        raise ValueError(
            f"rank (R_in, R_out) must be at most (in_channels, out_channels) = "
            f"{(in_channels, out_channels)}, got {(r_in, r_out)}"
        )
    return (r_in, r_out)


class TuckerConv2d(FactorizedConv2d):
    r"""2-D convolution whose ``(C_out, C_in, kh, kw)`` kernel is a Tucker-2 tensor.

    .. math::
        W[o, i, h, w] = \sum_{b, a} U_{out}[o, b]\, G[b, a, h, w]\, U_{in}[i, a]

    Applied without forming ``W`` unless the dispatcher finds the dense convolution faster
    (high ranks; see :meth:`dispatch_plan`) (Kim et al. 2016; TensorLy-Torch's Tucker
    ``FactorizedConv``): a 1x1 convolution ``C_in -> R_in``, the dense ``kh x kw`` core
    convolution ``R_in -> R_out`` with the layer's stride, padding and dilation, and a 1x1
    convolution ``R_out -> C_out`` plus the bias, with hand-written forward and backward
    kernels (:func:`kronlayers.functional.tucker_conv2d`). It stores
    ``C_in R_in + R_out R_in kh kw + C_out R_out`` weights instead of ``C_out C_in kh kw``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode:
            as in :class:`torch.nn.Conv2d` (``padding`` an int, a pair, ``'valid'`` or
            ``'same'``; every ``padding_mode``).
        groups: must be 1.
        rank: an int ``r`` (``R_in = min(r, C_in)``, ``R_out = min(r, C_out)``), a pair
            ``(R_in, R_out)``, or a float in ``(0, 1]``: the fraction of the dense kernel's
            weights to keep, with ``R_in / C_in = R_out / C_out``.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          sizes as in :class:`torch.nn.Conv2d`; the output keeps the input's memory format.

    Attributes:
        core (Parameter): ``(R_out, R_in, kh, kw)``.
        in_factor (Parameter): ``(C_in, R_in)``.
        out_factor (Parameter): ``(C_out, R_out)``.
        bias (Parameter or None): ``(C_out,)``.
        rank (tuple[int, int]): ``(R_in, R_out)``.
        weight (Tensor): the dense kernel, formed on access (differentiable).

    Initialisation: all three factors i.i.d. normal with the variance that gives the dense
    kernel ``nn.Conv2d``'s, ``1 / (3 fan_in)``; the bias as ``nn.Conv2d``'s.

    Example::

        >>> conv = TuckerConv2d(64, 128, 3, padding=1, rank=(16, 32))
        >>> conv(torch.randn(8, 64, 32, 32)).shape
        torch.Size([8, 128, 32, 32])
        >>> approx = TuckerConv2d.from_conv(nn.Conv2d(64, 128, 3), rank=0.25)
    """

    method: ClassVar[str] = "tucker"

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
        rank: int | float | tuple[int, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
            padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        self.rank = resolve_tucker_ranks(
            rank, self.in_channels, self.out_channels, self.kernel_size
        )
        r_in, r_out = self.rank
        factory = {"device": device, "dtype": dtype}
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size, **factory))
        self.in_factor = nn.Parameter(torch.empty(self.in_channels, r_in, **factory))
        self.out_factor = nn.Parameter(torch.empty(self.out_channels, r_out, **factory))
        self.output_error: float | None = None
        self.reset_parameters()

    def factor_parameters(self) -> list[nn.Parameter]:
        return [self.core, self.in_factor, self.out_factor]

    def reset_parameters(self) -> None:
        """Re-draw the factors (``nn.Conv2d``'s kernel variance) and the bias."""
        # Var(W) = R_in R_out v^3 for i.i.d. zero-mean factors of variance v.
        r_in, r_out = self.rank
        std = (1.0 / (3.0 * self.fan_in * r_in * r_out)) ** (1.0 / 6.0)
        with torch.no_grad():
            for f in self.factor_parameters():
                f.normal_(0.0, std)
        self._reset_bias()

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(C_out, C_in, kh, kw)`` kernel (differentiable)."""
        return tucker_conv2d_kernel(self.core, self.in_factor, self.out_factor)

    def _conv_forward(self, input: torch.Tensor, padding: object) -> torch.Tensor:
        return tucker_conv2d(
            input, self.core, self.in_factor, self.out_factor, self.bias,
            self.stride, padding, self.dilation,
        )  # fmt: skip

    def flops(self, input_shape: Sequence[int]) -> int:
        batch, (h, w), padding = self._kernel_call_geometry(input_shape)
        return tucker_conv2d_flops(
            self.in_channels, self.out_channels, self.kernel_size, self.rank, (h, w), batch,
            self.stride, padding, self.dilation,
        )  # fmt: skip

    def dispatch_plan(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> dict[str, Any]:
        """:func:`kronlayers.functional.tucker_conv2d_plan` for this layer: the path and the
        estimated seconds of each for an input of ``input_shape``."""
        batch, (h, w), padding = self._kernel_call_geometry(input_shape)
        return tucker_conv2d_plan(
            tuple(self.core.shape), self.in_channels, self.out_channels,
            (batch, self.in_channels, h, w), self.stride, padding, self.dilation,
            dtype=self.core.dtype, device_type=self.core.device.type,
            input_grad=self._grad_needed(requires_grad),
            factor_grad=self._grad_needed(requires_grad), bias=self.bias is not None,
        )  # fmt: skip

    def rank_label(self) -> str:
        return f"rank={self.rank}"

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        rank: int | float | tuple[int, int],
        n_iter_max: int = 20,
        input_gram: torch.Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
    ) -> TuckerConv2d:
        """A ``TuckerConv2d`` approximating a trained ``nn.Conv2d`` (Tucker-2 of its kernel).

        Data-free (``input_gram=None``): the kernel is decomposed by
        :func:`kronlayers.decomposition.tucker2_decompose` (truncated HOSVD of the channel
        unfoldings, refined by at most ``n_iter_max`` HOOI sweeps; orthonormal channel
        factors, the core absorbs the scale), minimising ``||W - W_tucker||_F``.

        Calibrated (``input_gram=G``, the ``(C_in kh kw)``-square Gram of the unfolded input
        patches, e.g. from :func:`kronlayers.calibration.collect_statistics`): minimises the
        error of the outputs on that data, ``tr((W - Ŵ) G (W - Ŵ)ᵀ)``: HOOI of the kernel
        whitened by the channel and spatial Grams, then the output factor and core solved
        exactly on the full ``G`` (:func:`kronlayers.decomposition.whitening.whitened_tucker2`).

        Geometry, bias, device and dtype are copied. ``reconstruction_error`` holds
        ``||W - W_tucker||_F / ||W||_F``; when calibrated, ``output_error`` the relative
        output error on the calibration data.
        """
        cls._check_dense(conv)
        # Checked up front: without input_gram it would be accepted and ignored.
        _check_damping(damping)
        layer = cls.like(conv, rank=rank)
        if input_gram is not None:
            check_tensor("input_gram", input_gram)
            core, u_in, u_out, out_err = whitened_tucker2(
                conv.weight,
                input_gram.to(conv.weight.device),
                layer.rank,
                damping=damping,
                n_iter_max=n_iter_max,
            )
        else:
            core, u_in, u_out, _ = tucker2_decompose(conv.weight, layer.rank, n_iter_max=n_iter_max)
            out_err = None
        with torch.no_grad():
            layer.core.copy_(core)
            layer.in_factor.copy_(u_in)
            layer.out_factor.copy_(u_out)
        layer._copy_bias_from(conv)
        layer._record_error(conv.weight)
        layer.output_error = out_err
        return layer

    @classmethod
    def compress_config(cls, module: nn.Conv2d, rank: int | float | tuple) -> dict[str, Any]:
        """``from_conv`` arguments for :func:`kronlayers.compress`, or
        :class:`NotCompressible` when the ranks need at least the dense weight count."""
        if module.groups != 1:
            raise NotCompressible(
                f"grouped convolution (groups={module.groups}) is not Tucker-factorized"
            )
        c_out, c_in = module.out_channels, module.in_channels
        ranks = resolve_tucker_ranks(rank, c_in, c_out, module.kernel_size)
        k = module.kernel_size[0] * module.kernel_size[1]
        weights, dense = _tucker_weights(c_in, c_out, k, *ranks), c_out * c_in * k
        if weights >= dense:
            raise NotCompressible(
                f"Tucker ranks {ranks} of kernel {(c_out, c_in, *module.kernel_size)} need "
                f"{weights:,} weights, not fewer than the dense {dense:,}"
            )
        return {"rank": ranks}

    @classmethod
    def from_tltorch(cls, layer: nn.Module) -> TuckerConv2d:
        """An equivalent ``TuckerConv2d`` from a ``tltorch.FactorizedConv`` with a Tucker kernel.

        Supported: one 2-D convolution (``order=2``, ``n_layers=1``) with a
        ``tltorch.TuckerTensor`` weight; its spatial factors are folded into the core.
        """
        import tltorch

        if not isinstance(layer, tltorch.FactorizedConv):
            raise TypeError(f"layer must be a tltorch.FactorizedConv, got {type(layer).__name__}")
        if not isinstance(layer.weight, tltorch.TuckerTensor):
            raise ValueError(
                f"layer must have a Tucker weight (factorization='tucker'), got "
                f"{type(layer.weight).__name__}"
            )
        if layer.order != 2 or layer.n_layers != 1:
            raise ValueError(
                "layer must be one 2-D convolution (order=2, n_layers=1), got "
                f"order={layer.order}, n_layers={layer.n_layers}"
            )
        core = layer.weight.core.detach()
        u_out, u_in, u_kh, u_kw = (f.detach() for f in layer.weight.factors)
        core = torch.einsum("bapq,hp,wq->bahw", core, u_kh, u_kw)
        new = cls(
            layer.in_channels,
            layer.out_channels,
            tuple(int(k) for k in layer.kernel_size),
            stride=tuple(int(s) for s in layer.stride.tolist()),
            padding=tuple(int(p) for p in layer.padding.tolist()),
            dilation=tuple(int(d) for d in layer.dilation.tolist()),
            bias=layer.bias is not None,
            rank=(int(core.shape[1]), int(core.shape[0])),
            device=core.device,
            dtype=core.dtype,
        )
        with torch.no_grad():
            new.core.copy_(core)
            new.in_factor.copy_(u_in)
            new.out_factor.copy_(u_out)
        new._copy_bias_from(layer)
        return new

    def to_tltorch(self, implementation: str = "factorized") -> nn.Module:
        """An equivalent ``tltorch.FactorizedConv(..., factorization='tucker')``.

        Its Tucker rank is ``(R_out, R_in, kh, kw)`` with identity spatial factors. Needs
        ``padding_mode='zeros'`` and symmetric padding (TensorLy-Torch has neither padding
        modes nor asymmetric padding): ``ValueError`` otherwise.
        """
        import tltorch

        if self.padding_mode != "zeros":
            raise ValueError(
                "to_tltorch needs padding_mode='zeros': tltorch.FactorizedConv has no padding "
                f"modes (got {self.padding_mode!r})"
            )
        top, bottom, left, right = self.resolved_padding
        if top != bottom or left != right:
            raise ValueError(
                f"to_tltorch needs symmetric padding; padding={self.padding!r} pads "
                f"(top, bottom, left, right)={(top, bottom, left, right)}"
            )
        r_in, r_out = self.rank
        kh, kw = self.kernel_size
        out = tltorch.FactorizedConv(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            order=2,
            stride=self.stride,
            padding=(top, left),
            dilation=self.dilation,
            bias=self.bias is not None,
            factorization="tucker",
            rank=(r_out, r_in, kh, kw),
            implementation=implementation,
            **self._factory(),
        )
        with torch.no_grad():
            out.weight.core.copy_(self.core)
            u_out, u_in, u_kh, u_kw = out.weight.factors
            u_out.copy_(self.out_factor)
            u_in.copy_(self.in_factor)
            u_kh.copy_(torch.eye(kh))
            u_kw.copy_(torch.eye(kw))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out
