"""``LowRankLinear``: a drop-in ``nn.Linear`` whose weight is a rank-``R`` product ``U Vᵀ``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .._validation import check_int, check_rank, check_shape, check_tensor
from ..decomposition.cp import cp_rank_from_fraction
from ..decomposition.whitening import DEFAULT_DAMPING, _check_damping, thin_svd, whitened_low_rank
from ._base import NotCompressible
from .cp_linear import CPLinear

__all__ = ["LowRankLinear", "max_useful_rank"]


def max_useful_rank(in_features: int, out_features: int) -> int:
    """The largest rank whose ``R (in + out)`` weights (and ``2 R (in + out)`` FLOPs per row)
    stay below the dense layer's, and at most ``min(in, out)``; 0 if there is none."""
    return min(
        in_features, out_features, (in_features * out_features - 1) // (in_features + out_features)
    )


class LowRankLinear(CPLinear):
    r"""Applies ``y = x W^T + b`` with a rank-``R`` weight ``W = U Vᵀ``.

    A :class:`~kronlayers.CPLinear` with one input and one output mode (``in_shape =
    (in_features,)``, ``out_shape = (out_features,)``): the weight is
    ``sum_r U[:, r] ∘ V[:, r]``, ``U`` ``(out_features, R)`` and ``V`` ``(in_features, R)``, and
    the forward is ``(x V) Uᵀ`` (the CP kernel :func:`kronlayers.functional.cp_linear`, two
    GEMMs, ``W`` never formed). It stores ``R (in + out)`` weights. A trained ``nn.Linear``
    converts exactly by a truncated SVD (:meth:`from_linear`, the optimal rank-``R`` weight in
    Frobenius norm) or, given the Gram matrix of its inputs, by the whitened SVD that
    minimises the error of its outputs on those inputs.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, the layer does not learn an additive bias. Default: ``True``.
        rank: the rank ``R``, an int ``>= 1``, or a float in ``(0, 1]``: the fraction of the
            dense weights to keep, ``R = round(rank * in * out / (in + out))``.
        in_shape, out_shape: accepted for compatibility with ``CPLinear`` converters; must be
            ``None`` or ``(in_features,)`` / ``(out_features,)``.

    Shape:
        - Input: :math:`(*, H_{in})`, :math:`H_{in} = \text{in\_features}`.
        - Output: :math:`(*, H_{out})`, :math:`H_{out} = \text{out\_features}`.

    Attributes:
        out_factor (Parameter): ``U``, ``(out_features, R)`` (``out_factors[0]``).
        in_factor (Parameter): ``V``, ``(in_features, R)`` (``in_factors[0]``). Both are
            drawn i.i.d. uniform so that ``W`` has ``nn.Linear``'s weight variance.
        bias: ``(out_features,)`` or ``None``, initialised as ``nn.Linear``'s.
        rank (int): ``R``.
        reconstruction_error (float | None): after :meth:`from_linear`,
            ``||W - U Vᵀ||_F / ||W||_F``.
        output_error (float | None): after a calibrated :meth:`from_linear`, the relative
            output error on the calibration data, ``sqrt(tr(E G Eᵀ) / tr(W G Wᵀ))``.

    Example::

        >>> m = LowRankLinear(1024, 512, rank=64)
        >>> m(torch.randn(8, 1024)).shape
        torch.Size([8, 512])
        >>> m.num_weights() == 64 * (1024 + 512)
        True
    """

    method: ClassVar[str] = "lowrank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int | float,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        in_features = check_int("in_features", in_features, minimum=1)
        out_features = check_int("out_features", out_features, minimum=1)
        for name, shape, n, total_name in (
            ("in_shape", in_shape, in_features, "in_features"),
            ("out_shape", out_shape, out_features, "out_features"),
        ):
            if shape is None:
                continue
            # The shape's form first (an int or a list of floats is a TypeError), then the
            # one value a single-mode layer allows.
            if check_shape(name, shape, n, total_name) != (n,):
                raise ValueError(f"{name} must be None or ({n},) for LowRankLinear, got {shape!r}")
        super().__init__(
            in_features,
            out_features,
            bias,
            rank=rank,
            in_shape=(in_features,),
            out_shape=(out_features,),
            order=1,
            device=device,
            dtype=dtype,
        )
        self.output_error: float | None = None

    @property
    def in_factor(self) -> nn.Parameter:
        """``V`` ``(in_features, R)``."""
        return self.in_factors[0]

    @property
    def out_factor(self) -> nn.Parameter:
        """``U`` ``(out_features, R)``."""
        return self.out_factors[0]

    def rank_label(self) -> str:
        return f"rank={self.rank}"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        rank: int | float,
        input_gram: torch.Tensor | None = None,
        damping: float = DEFAULT_DAMPING,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
    ) -> LowRankLinear:
        """The rank-``rank`` layer closest to ``linear``; the bias is copied.

        Data-free (``input_gram=None``): the truncated SVD ``W ≈ U_r S_r V_rᵀ`` in float64
        (from the eigendecomposition of the smaller Gram of ``W``,
        :func:`kronlayers.decomposition.whitening.thin_svd`), optimal in Frobenius norm
        (Eckart–Young), ``sqrt(S_r)`` given to each factor.

        Calibrated (``input_gram=G``, the ``(in, in)`` Gram / second-moment matrix of the
        layer's inputs, e.g. from :func:`kronlayers.calibration.collect_statistics`): the
        rank-``rank`` ``Ŵ`` minimising the error of the outputs on that data,
        ``tr((W - Ŵ) G (W - Ŵ)ᵀ) = ||X Wᵀ - X Ŵᵀ||²``, in closed form: ``G + λ mean(diag G) I
        = L Lᵀ`` (``damping=λ``), the SVD of ``W L`` truncated to ``rank`` and mapped back
        with ``L^{-1}`` (:func:`kronlayers.decomposition.whitening.whitened_low_rank`).

        Sets ``reconstruction_error`` (weights) and, when calibrated, ``output_error``.
        """
        cls._check_dense(linear)
        # Checked up front: without input_gram it would be accepted and ignored.
        _check_damping(damping)
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            rank=rank,
            in_shape=in_shape,
            out_shape=out_shape,
            device=w.device,
            dtype=w.dtype,
        )
        r = layer.rank
        if input_gram is not None:
            check_tensor("input_gram", input_gram)
            gram = input_gram.to(w.device)
            left, right, err = whitened_low_rank(w.detach(), gram, r, damping)
        else:
            u, s, vh = thin_svd(w.detach().to(torch.float64))
            k = min(r, s.shape[0])
            root = s[:k].sqrt()
            left, right = u[:, :k] * root, vh[:k].T * root
            err = None
        if left.shape[1] < r:  # rank above min(in, out): the extra terms are zero
            pad = r - left.shape[1]
            left = torch.cat([left, left.new_zeros(left.shape[0], pad)], dim=1)
            right = torch.cat([right, right.new_zeros(right.shape[0], pad)], dim=1)
        with torch.no_grad():
            layer.out_factors[0].copy_(left)
            layer.in_factors[0].copy_(right)
        layer._copy_bias_from(linear)
        layer._record_error(w)
        layer.output_error = err
        return layer

    @classmethod
    def compress_config(cls, module: nn.Linear, rank: int | float | tuple) -> dict[str, Any]:
        """``from_linear`` arguments for :func:`kronlayers.compress`: ``{"rank": R}``.

        An int ``rank`` is used as is; a float is the fraction of the dense weights,
        ``R = round(rank * in * out / (in + out))``, capped at the largest useful rank
        (:func:`max_useful_rank`). :class:`NotCompressible` when ``R (in + out)`` is not
        below ``in * out`` (then neither are the FLOPs) or ``R > min(in, out)``.
        """
        rank = check_rank(rank)
        n_in, n_out = module.in_features, module.out_features
        dense = n_in * n_out
        cap = max_useful_rank(n_in, n_out)
        if isinstance(rank, float):
            r = cp_rank_from_fraction(rank, (n_out, n_in))
            if cap >= 1:
                r = min(r, cap)
        else:
            r = rank
        weights = r * (n_in + n_out)
        if weights >= dense:
            raise NotCompressible(
                f"rank {r} of a {n_out}x{n_in} weight needs {weights:,} weights, not fewer "
                f"than the dense {dense:,}"
            )
        if r > min(n_in, n_out):
            raise NotCompressible(
                f"rank {r} exceeds min(in_features, out_features) = {min(n_in, n_out)}"
            )
        return {"rank": r}
