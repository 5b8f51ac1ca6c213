"""``CPLinear``: a drop-in ``nn.Linear`` whose tensorized weight is a CP tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._shapes import MAX_MODES, balanced_factorization, prod
from .._validation import check_int, check_rank, check_shape
from ..decomposition.cp import cp_max_rank, cp_rank_from_fraction
from ..decomposition.whitening import DEFAULT_DAMPING, check_cp_fit_options, fit_cp
from ..functional.cp_linear import (
    cp_linear,
    cp_linear_call,
    cp_linear_flops,
    cp_linear_plan,
    cp_linear_weight,
)
from ._base import FactorizedLinear, NotCompressible

if TYPE_CHECKING:
    import tltorch

__all__ = ["CPLinear"]


def _tensorized(name: str, shape, features: int, features_name: str, order: int) -> tuple:
    if shape is None:
        return balanced_factorization(features, order)
    shape = check_shape(name, shape, features, features_name)
    if len(shape) > MAX_MODES:
        raise ValueError(f"{name} may have at most {MAX_MODES} modes, got {len(shape)}")
    return shape


def _resolve_rank(rank: object, tensor_shape: Sequence[int]) -> int:
    rank = check_rank(rank)
    if isinstance(rank, float):
        return cp_rank_from_fraction(rank, tensor_shape)
    return rank


class CPLinear(FactorizedLinear):
    r"""Applies ``y = x W^T + b`` where ``W`` is a tensorized CP (CANDECOMP/PARAFAC) tensor.

    The ``(out_features, in_features)`` weight, viewed row-major as
    ``(out_1, ..., out_P, in_1, ..., in_Q)``, is

    .. math::
        W = \sum_{r=1}^{R} B_1[:, r] \circ \dots \circ B_P[:, r] \circ
            A_1[:, r] \circ \dots \circ A_Q[:, r],

    the same convention as TensorLy-Torch's ``FactorizedLinear(factorization='cp')`` (whose
    ``tensorized_shape`` is ``(out_shape, in_shape)``, out first, while its constructor takes
    the in shape first). The layer holds ``R * (sum in_q + sum out_p)`` weight parameters
    instead of ``in_features * out_features``; ``forward`` forms ``W`` only where the
    dispatcher finds that faster (ranks so high that the factorized kernels cost more than
    the dense layer; see :func:`kronlayers.functional.cp_linear` and :meth:`dispatch_plan`).

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
        output_error (float | None): set by a calibrated :meth:`from_linear` to the relative
            output error on the calibration data; ``None`` otherwise.

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

    method: ClassVar[str] = "cp"
    in_features: int
    out_features: int
    rank: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

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
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        in_features, out_features = self.in_features, self.out_features
        factory = {"device": device, "dtype": dtype}
        order = check_int("order", order, minimum=1)
        if order > MAX_MODES:
            raise ValueError(f"order must be <= {MAX_MODES}, got {order}")
        self.in_shape = _tensorized("in_shape", in_shape, in_features, "in_features", order)
        self.out_shape = _tensorized("out_shape", out_shape, out_features, "out_features", order)
        self.rank = _resolve_rank(rank, (*self.out_shape, *self.in_shape))
        self.in_factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, self.rank, **factory)) for d in self.in_shape
        )
        self.out_factors = nn.ParameterList(
            nn.Parameter(torch.empty(d, self.rank, **factory)) for d in self.out_shape
        )
        self.output_error: float | None = None
        self._hot_factors: tuple[torch.Tensor, ...] | None = None
        self._plans: dict = {}  # cp_linear_call's kernel choice per call signature
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
        self._reset_bias()

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out_features, in_features)`` weight (differentiable, allocates it)."""
        return cp_linear_weight(list(self.in_factors), list(self.out_factors))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Hot path (the layer's own dicts are read directly: nn.Module.__getattr__ and
        # ParameterList indexing cost more than a small layer's GEMMs). The factors are
        # validated when first seen (per call only their identity is compared); the input
        # once per call signature by cp_linear_call. Anything unusual (autocast, half
        # precision, torch.func, compilation) takes the full functional path.
        if torch.compiler.is_compiling():
            # Dynamo folds the checks into its guards; no per-call cost in the graph.
            return cp_linear(input, list(self.in_factors), list(self.out_factors), self.bias)
        modules = self._modules
        factors = (
            *modules["in_factors"]._parameters.values(),
            *modules["out_factors"]._parameters.values(),
        )
        bias = self._parameters["bias"]
        hot = self._hot_factors
        if (
            hot is None
            or len(hot) != len(factors)
            or any(p is not q for p, q in zip(factors, hot, strict=True))
        ):
            hot = self._revalidate(factors)
        if hot:
            y = cp_linear_call(input, bias, factors, self.in_shape, self.out_shape, self._plans)
            if y is not None:
                return y
        return cp_linear(input, list(self.in_factors), list(self.out_factors), bias)

    def _revalidate(self, factors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Remember ``factors`` for the hot path if they fit the layer and share one dtype
        and device (returned); ``()`` otherwise, so that every call takes the functional
        path, which raises the errors naming the argument."""
        self._plans = {}
        n_in = len(self.in_shape)
        shapes = tuple(tuple(f.shape) for f in factors)
        expected = tuple((d, self.rank) for d in (*self.in_shape, *self.out_shape))
        first = factors[0]
        if (
            len(factors) != n_in + len(self.out_shape)
            or shapes != expected
            or any(
                not isinstance(f, torch.Tensor)
                or f.dtype != first.dtype
                or f.device != first.device
                for f in factors
            )
        ):
            self._hot_factors = None
            return ()
        self._hot_factors = factors
        return factors

    def _apply(self, fn, recurse=True):
        # .to(), .double(), .cuda() ...: the cached plans and validation no longer hold.
        self._hot_factors = None
        self._plans = {}
        return super()._apply(fn, recurse)

    def factor_parameters(self) -> list[nn.Parameter]:
        return [*self.in_factors, *self.out_factors]

    def dispatch_plan(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> dict[str, Any]:
        """:func:`kronlayers.functional.cp_linear_plan` for this layer: the path, the kernel,
        the factorized route and the estimated seconds of each kernel for an input of
        ``input_shape`` (a symbolic batch size counts as
        :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` rows)."""
        requires_grad = self._grad_needed(requires_grad)
        p = self.in_factors[0]
        return cp_linear_plan(
            self.in_shape,
            self.out_shape,
            self.rank,
            input_shape,
            dtype=p.dtype,
            device_type=p.device.type,
            input_grad=requires_grad,
            factor_grad=requires_grad,
            bias=self.bias is not None,
        )

    def flops(self, input_shape: Sequence[int]) -> int:
        return cp_linear_flops(self.in_shape, self.out_shape, self.rank, self._rows(input_shape))

    def rank_label(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.rank}"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        order: int = 2,
        input_gram: torch.Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
        n_iter_max: int = 100,
        tol: float = 1e-5,
        init: Sequence[torch.Tensor] | None = None,
        refine_iter: int = 10,
    ) -> CPLinear:
        """A ``CPLinear`` approximating ``linear`` by a rank-``rank`` CP decomposition.

        Data-free (``input_gram=None``): the tensorized weight ``(*out_shape, *in_shape)`` is
        decomposed with :func:`kronlayers.decomposition.cp_decompose` (CP-ALS in torch, HOSVD
        initialisation or the warm start ``init`` — factors out modes first, possibly of a
        lower rank —, at most ``n_iter_max`` sweeps, stopping when the error improves by less
        than ``tol`` relative), minimising ``||W - W_cp||_F``.

        Calibrated (``input_gram=G``, the ``(in, in)`` Gram / second-moment matrix of the
        layer's inputs, e.g. from :func:`kronlayers.calibration.collect_statistics`): the
        factors minimise the error of the outputs on that data, ``tr((W - Ŵ) G (W - Ŵ)ᵀ) =
        ||X Wᵀ - X Ŵᵀ||²`` (``G`` damped by ``damping * mean(diag G)``): from the data-free
        decomposition, at most ``refine_iter`` sweeps on the full ``G`` (exact output-factor
        updates, preconditioned conjugate gradients for the input factors), each lowering the
        objective, so never worse than data-free on the calibration data
        (:func:`kronlayers.decomposition.whitening.whitened_cp`).

        The bias is copied. ``reconstruction_error`` holds ``||W - W_cp||_F / ||W||_F`` and,
        when calibrated, ``output_error`` the relative output error on the calibration data.
        The new layer has ``linear``'s device and dtype.
        """
        cls._check_dense(linear)
        damping, n_iter_max, tol, refine_iter = check_cp_fit_options(
            damping, n_iter_max, tol, refine_iter
        )
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
        factors, out_err = fit_cp(
            w, layer.out_shape, layer.in_shape, layer.rank, input_gram=input_gram,
            damping=damping, n_iter_max=n_iter_max, tol=tol, refine_iter=refine_iter, init=init,
        )  # fmt: skip
        n_out = len(layer.out_shape)
        with torch.no_grad():
            for p, f in zip(layer.out_factors, factors[:n_out], strict=True):
                p.copy_(f)
            for p, f in zip(layer.in_factors, factors[n_out:], strict=True):
                p.copy_(f)
        layer._copy_bias_from(linear)
        layer._record_error(w)
        layer.output_error = out_err
        return layer

    @classmethod
    def compress_config(cls, module: nn.Linear, rank: int | float | tuple) -> dict[str, Any]:
        """``from_linear`` arguments for :func:`kronlayers.compress`: the default (most
        balanced two-way) shapes and ``rank`` (an int, or a float fraction by TensorLy's rule),
        or :class:`NotCompressible` when that needs at least the dense weight count.

        A float rank is capped at :func:`kronlayers.decomposition.cp.cp_max_rank` (the
        product of all modes but the largest: the rank no tensor of that shape exceeds), and
        at ``H_in * H_out // (H_in + H_out)``, the rank from which the layer needs more FLOPs
        per row than the dense one (a CP term holds only ``sum(modes)`` weights but costs
        ``H_in + H_out`` multiply-adds per row: at ``rank=0.5`` a 384 x 1536 layer would get
        rank 2458 and run 8x the dense FLOPs, or form its weight at ``R / N`` times the dense
        cost); an int rank above the first cap is :class:`NotCompressible`."""
        in_shape = balanced_factorization(module.in_features, 2)
        out_shape = balanced_factorization(module.out_features, 2)
        tensor_shape = (*out_shape, *in_shape)
        r = _resolve_rank(rank, tensor_shape)
        cap = cp_max_rank(tensor_shape)
        if isinstance(rank, float):
            h_in, h_out = module.in_features, module.out_features
            r = max(1, min(r, cap, h_in * h_out // (h_in + h_out)))
        elif r > cap:
            raise NotCompressible(
                f"CP rank {r} exceeds {cap}, the largest rank of a {tensor_shape} tensor"
            )
        weights, dense = r * sum(tensor_shape), prod(tensor_shape)
        if weights >= dense:
            raise NotCompressible(
                f"CP rank {r} of in {in_shape} out {out_shape} needs {weights:,} weights, not "
                f"fewer than the dense {dense:,}"
            )
        return {"rank": r, "in_shape": in_shape, "out_shape": out_shape}

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
