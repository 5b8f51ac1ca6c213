"""The contract every factorized layer implements, and the shared linear / conv set-up.

:class:`FactorizedLayer` is the contract (what :func:`kronlayers.compress`,
:func:`kronlayers.summary`, the benchmark suite and the generic tests rely on);
:class:`FactorizedLinear` and :class:`FactorizedConv2d` hold what every factorized
replacement of ``nn.Linear`` / ``nn.Conv2d`` shares, in the spirit of ``torch.nn``'s
``_ConvNd``: argument checks, the bias, padding modes, dense-equivalent counts, ``to_dense``
and a consistent ``extra_repr``. A layer subclasses one of them, declares ``method`` and
implements the abstract members below.

Units: parameter counts are numbers of scalars; FLOPs count 2 per multiply-add (the unit of
``torch.utils.flop_counter``), bias additions excluded, everywhere in the package.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._shapes import conv2d_output_size, conv2d_padding, prod
from .._validation import check_int, check_module, check_pair

__all__ = ["FactorizedConv2d", "FactorizedLayer", "FactorizedLinear", "NotCompressible"]


class NotCompressible(ValueError):
    """Raised by :meth:`FactorizedLayer.compress_config` when no configuration of the layer
    is smaller than the dense module; the message is the reason shown in the report."""


class FactorizedLayer(nn.Module):
    """Base class of every kronlayers layer: a factorized replacement of a dense module.

    Class attributes a layer declares:
        dense_type: the dense module it replaces (``nn.Linear`` or ``nn.Conv2d``).
        method: its name in :func:`kronlayers.compress` (``"kronecker"``, ``"cp"``, ...).

    Members a layer implements:
        weight: the dense weight, shaped like ``dense_type``'s (differentiable; allocates it).
        factor_parameters(): the learnable weights other than the bias.
        flops(input_shape): forward FLOPs for one input shape.
        rank_label(): a short description of the factorization for reports.
        from_dense(module, rank=..., ...): conversion of a trained dense module.
        compress_config(module, rank): the ``from_dense`` keyword arguments that
            :func:`kronlayers.compress` uses for ``rank`` (an int, a float fraction of the
            dense weights, or a tuple where the structure has several ranks), or
            :class:`NotCompressible`.

    Everything else (counts, compression ratio, ``to_dense``) is derived here.

    Attributes:
        reconstruction_error: for a layer built by ``from_dense``, the relative Frobenius
            error ``||W - W_new|| / ||W||`` of the fit; ``None`` otherwise.
    """

    dense_type: ClassVar[type[nn.Module]]
    method: ClassVar[str]
    reconstruction_error: float | None

    # -- to implement ----------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (differentiable, formed on access)."""
        raise NotImplementedError

    def factor_parameters(self) -> list[nn.Parameter]:
        """The learnable weights of the factorization (the bias excluded)."""
        raise NotImplementedError

    def flops(self, input_shape: Sequence[int]) -> int:
        """Forward FLOPs (2 per multiply-add, bias excluded) on an input of ``input_shape``."""
        raise NotImplementedError

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        """Forward FLOPs of the equivalent dense module on an input of ``input_shape``."""
        raise NotImplementedError

    def dispatch_path(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> str:
        """The kernel path ``forward`` takes on an input of ``input_shape``: ``"factorized"``
        (the layer's own kernels) or ``"dense"`` (form the weight, one dense op).

        ``requires_grad``: whether the call computes gradients (forward + backward is
        costed, the input's gradient included, as for a layer inside a network); default:
        grad mode is on and some parameter requires grad. The choice
        honours :func:`kronlayers.functional._dispatch.force_path` (and ``force_kernel``).
        See :meth:`dispatch_plan` for the cost estimates behind it."""
        return self.dispatch_plan(input_shape, requires_grad=requires_grad)["path"]

    def dispatch_plan(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> dict[str, Any]:
        """What ``forward`` does on an input of ``input_shape``: at least ``"path"``; layers
        with a cost-model dispatcher add the kernel and the estimated seconds of each.
        Layers without one always run factorized."""
        return {"path": "factorized"}

    def _grad_needed(self, requires_grad: bool | None) -> bool:
        """``requires_grad`` as given, else: grad mode is on and a parameter requires grad."""
        if requires_grad is not None:
            return bool(requires_grad)
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def rank_label(self) -> str:
        """A short description of the factorization, e.g.
        ``"in_shape=(28, 28), out_shape=(25, 25), rank=2"``; part of ``extra_repr``."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, **options: Any) -> FactorizedLayer:
        """Build the layer from a trained dense module (see the subclass' converter)."""
        raise NotImplementedError

    @classmethod
    def compress_config(cls, module: nn.Module, rank: int | float | tuple) -> dict[str, Any]:
        """Keyword arguments of :meth:`from_dense` for ``rank``; :class:`NotCompressible` if no
        configuration is smaller than ``module``."""
        raise NotImplementedError

    @classmethod
    def typical_rank(cls, module: nn.Module) -> int | float | tuple:
        """A rank typical for this layer replacing ``module`` (benchmarks, examples)."""
        raise NotImplementedError

    @classmethod
    def like(
        cls,
        module: nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> FactorizedLayer:
        """A freshly initialised layer with ``module``'s geometry and bias flag (no
        decomposition); ``options`` are the layer's own keywords (shapes, ``rank``, ...).
        Device and dtype default to ``module.weight``'s."""
        kwargs = cls._dense_kwargs(module)
        kwargs["device"] = kwargs["device"] if device is None else device
        kwargs["dtype"] = kwargs["dtype"] if dtype is None else dtype
        return cls(**kwargs, **options)

    @staticmethod
    def _dense_kwargs(module: nn.Module) -> dict[str, Any]:
        """The constructor arguments that copy ``module``'s geometry, bias flag, device and
        dtype."""
        raise NotImplementedError

    def _copy_bias_from(self, module: nn.Module) -> None:
        if module.bias is not None:
            with torch.no_grad():
                self.bias.copy_(module.bias)

    # -- derived ---------------------------------------------------------------------------

    def num_weights(self) -> int:
        """Number of weights of the factorization (bias excluded)."""
        return sum(p.numel() for p in self.factor_parameters())

    def dense_num_weights(self) -> int:
        """Number of weights of the equivalent dense module (bias excluded)."""
        raise NotImplementedError

    @property
    def compression_ratio(self) -> float:
        """Dense weights divided by factorized weights (biases excluded)."""
        return self.dense_num_weights() / self.num_weights()

    def to_dense(self) -> nn.Module:
        """The equivalent dense module (same outputs up to rounding), with copies of the
        weight and bias on this layer's device and dtype. Faster than the factorized layer
        when the factorization saves few FLOPs (see ``flops`` vs ``dense_flops``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self._dense_repr()}, {self.rank_label()}, compression={self._ratio_text()}"

    def _dense_repr(self) -> str:
        raise NotImplementedError

    def _ratio_text(self) -> str:
        n = self.num_weights()
        return f"{self.dense_num_weights() / n:.1f}x" if n else "inf"

    def _factory(self) -> dict[str, Any]:
        p = self.factor_parameters()[0]
        return {"device": p.device, "dtype": p.dtype}

    def _record_error(self, dense_weight: torch.Tensor) -> None:
        """Set ``reconstruction_error`` to ``||W - self.weight|| / ||W||`` (float64)."""
        with torch.no_grad():
            w = dense_weight.detach().double()
            err = (w - self.weight.detach().double()).norm()
            norm = w.norm()
            self.reconstruction_error = float(err / norm) if norm > 0 else float(err)


class FactorizedLinear(FactorizedLayer):
    """Shared set-up of the factorized ``nn.Linear`` replacements.

    Holds ``in_features``, ``out_features`` and the optional ``bias`` ``(out_features,)``
    (initialised as ``nn.Linear``'s), checks the sizes, and derives the dense counts:
    ``in_features * out_features`` weights and ``2 * N * in_features * out_features`` FLOPs
    for ``N`` input rows.

    Shape:
        - Input: :math:`(*, H_{in})`, :math:`H_{in} = \\text{in\\_features}`.
        - Output: :math:`(*, H_{out})`, :math:`H_{out} = \\text{out\\_features}`.
    """

    dense_type: ClassVar[type[nn.Module]] = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reconstruction_error = None

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def dense_num_weights(self) -> int:
        return self.in_features * self.out_features

    def _rows(self, input_shape: Sequence[int]) -> int:
        return prod(input_shape[:-1]) if len(input_shape) > 0 else 1

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        return 2 * self._rows(input_shape) * self.in_features * self.out_features

    def to_dense(self) -> nn.Linear:
        dense = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, **self._factory()
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _dense_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )

    @staticmethod
    def _dense_kwargs(module: nn.Module) -> dict[str, Any]:
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "device": module.weight.device,
            "dtype": module.weight.dtype,
        }

    @classmethod
    def typical_rank(cls, module: nn.Module) -> int | float | tuple:
        return max(1, min(module.in_features, module.out_features) // 16)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options: Any) -> FactorizedLinear:
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, **options: Any) -> FactorizedLinear:
        """Same as ``from_linear``."""
        return cls.from_linear(module, **options)

    @staticmethod
    def _check_dense(linear: object) -> nn.Linear:
        check_module("linear", linear, nn.Linear)
        if not linear.weight.is_floating_point():
            raise TypeError(f"linear.weight must be floating point, got {linear.weight.dtype}")
        return linear


_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class FactorizedConv2d(FactorizedLayer):
    r"""Shared set-up of the factorized ``nn.Conv2d`` replacements (``torch.nn``'s ``_ConvNd``).

    Takes and checks ``nn.Conv2d``'s arguments (``groups`` must be 1), keeps ``padding`` as
    given (an int pair, ``'same'`` or ``'valid'``) with its resolved ``(top, bottom, left,
    right)`` form, applies non-``'zeros'`` padding modes with ``F.pad`` before the kernel (as
    ``nn.Conv2d`` does), holds the optional bias (initialised as ``nn.Conv2d``'s) and derives
    the dense counts. Subclasses implement ``_conv_forward(input, padding)``, which receives
    ``self.padding`` or ``0`` when the input was already padded.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})` or :math:`(C_{in}, H_{in}, W_{in})`
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})` or :math:`(C_{out}, H_{out}, W_{out})`,
          :math:`H_{out} = \lfloor (H_{in} + p_{top} + p_{bottom} - d_0 (k_h - 1) - 1) / s_0
          \rfloor + 1`, likewise :math:`W_{out}`.
    """

    dense_type: ClassVar[type[nn.Module]] = nn.Conv2d

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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, minimum=1)
        self.out_channels = check_int("out_channels", out_channels, minimum=1)
        if check_int("groups", groups, minimum=1) != 1:
            raise ValueError(
                f"groups must be 1 for {type(self).__name__} (grouped convolutions are not "
                f"factorized here), got groups={groups!r}"
            )
        if not isinstance(padding_mode, str):
            raise TypeError(
                f"padding_mode must be a str, one of {_PADDING_MODES}, got "
                f"{type(padding_mode).__name__} {padding_mode!r}"
            )
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.stride = check_pair("stride", stride, 1)
        self.dilation = check_pair("dilation", dilation, 1)
        # Validates every padding form (and 'same' with a stride) once, up front.
        self.resolved_padding = conv2d_padding(
            padding, self.kernel_size, self.stride, self.dilation
        )
        self.padding: str | tuple[int, int] = (
            padding if isinstance(padding, str) else check_pair("padding", padding, 0)
        )
        top, bottom, left, right = self.resolved_padding
        # As in nn.Conv2d: the F.pad argument (last dim first) for non-'zeros' padding modes.
        self._reversed_padding_repeated_twice = [left, right, top, bottom]
        self.groups = 1
        self.padding_mode = padding_mode
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reconstruction_error = None

    def _conv_forward(self, input: torch.Tensor, padding: object) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        padding: object = self.padding
        if self.padding_mode != "zeros":
            # As nn.Conv2d: pad explicitly with the mode, then convolve without padding.
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return self._conv_forward(input, padding)

    @property
    def fan_in(self) -> int:
        """``C_in * kh * kw``, the fan-in of ``nn.Conv2d``'s initialisation."""
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _reset_bias(self) -> None:
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def output_size(self, input_size: Sequence[int]) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of spatial size ``(H_in, W_in)``."""
        return conv2d_output_size(
            (int(input_size[0]), int(input_size[1])),
            self.kernel_size,
            self.stride,
            self.resolved_padding,
            self.dilation,
        )

    def _batch_and_size(self, input_shape: Sequence[int]) -> tuple[int, tuple[int, int]]:
        batch = int(input_shape[0]) if len(input_shape) == 4 else 1
        return batch, (int(input_shape[-2]), int(input_shape[-1]))

    def _kernel_call_geometry(
        self, input_shape: Sequence[int]
    ) -> tuple[int, tuple[int, int], object]:
        """``(batch, (H, W), padding)`` as the functional kernel sees a call: with a
        non-``'zeros'`` padding mode the input is padded first and convolved unpadded."""
        batch, (h, w) = self._batch_and_size(input_shape)
        if self.padding_mode == "zeros":
            return batch, (h, w), self.padding
        top, bottom, left, right = self.resolved_padding
        return batch, (h + top + bottom, w + left + right), 0

    def dense_num_weights(self) -> int:
        return self.out_channels * self.fan_in

    def dense_flops(self, input_shape: Sequence[int]) -> int:
        batch, size = self._batch_and_size(input_shape)
        h_out, w_out = self.output_size(size)
        return 2 * batch * self.out_channels * self.fan_in * h_out * w_out

    def to_dense(self) -> nn.Conv2d:
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            **self._factory(),
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _dense_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s

    @classmethod
    def typical_rank(cls, module: nn.Module) -> int | float | tuple:
        return max(4, min(module.in_channels, module.out_channels) // 4)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **options: Any) -> FactorizedConv2d:
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, **options: Any) -> FactorizedConv2d:
        """Same as ``from_conv``."""
        return cls.from_conv(module, **options)

    @staticmethod
    def _check_dense(conv: object) -> nn.Conv2d:
        check_module("conv", conv, nn.Conv2d)
        if conv.groups != 1:
            raise ValueError(f"conv.groups must be 1 to factorize it, got {conv.groups}")
        if not conv.weight.is_floating_point():
            raise TypeError(f"conv.weight must be floating point, got {conv.weight.dtype}")
        return conv

    @staticmethod
    def _dense_kwargs(conv: nn.Module) -> dict[str, Any]:
        return {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": conv.kernel_size,
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
            "device": conv.weight.device,
            "dtype": conv.weight.dtype,
        }
