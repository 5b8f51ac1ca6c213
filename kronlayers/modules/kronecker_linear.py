"""``KroneckerLinear``: a drop-in ``nn.Linear`` whose weight is a sum of Kronecker products."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._shapes import MAX_MODES, balanced_factorization
from .._validation import check_rank, check_shape
from ..decomposition.nearest_kronecker import nearest_kronecker
from ..functional._amp import balance_kron_factors
from ..functional._dispatch import static_rows
from ..functional._kron_engine import kron_weight
from ..functional.kronecker_linear import (
    KroneckerLinearConfig,
    kronecker_linear,
    kronecker_linear_call,
    kronecker_linear_flops,
    kronecker_linear_plan,
)
from ..functional.kronecker_linear import _check_call as check_call
from ..functional.kronecker_linear import _inference_runner as inference_runner
from ..functional.kronecker_linear import _inference_state as inference_state
from ..functional.kronecker_linear import _plan_cached as plan_cached
from ._base import FactorizedLinear, NotCompressible

__all__ = ["KroneckerLinear"]


def _data_ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _same(a: tuple, b: tuple) -> bool:
    # Identity, element by element (== on tuples of tensors would compare values).
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x is not y:
            return False
    return True


def _kron_weights(in_shape: Sequence[int], out_shape: Sequence[int], rank: int) -> int:
    return rank * sum(o * i for o, i in zip(out_shape, in_shape, strict=True))


def _splits2(n: int) -> list[tuple[int, int]]:
    return [(a, n // a) for a in range(1, n + 1) if n % a == 0]


def _log_spread(shape: Sequence[int]) -> float:
    logs = [math.log(s) for s in shape]
    mean = sum(logs) / len(logs)
    return sum((v - mean) ** 2 for v in logs)


class KroneckerLinear(FactorizedLinear):
    r"""Applies ``y = x W^T + b`` with ``W = sum_{r=1}^{R} F_1[r] ⊗ F_2[r] ⊗ ... ⊗ F_d[r]``.

    A drop-in replacement for :class:`torch.nn.Linear` that stores ``R * sum_k out_k * in_k``
    weights instead of ``prod_k out_k * in_k``. Normally ``W`` is never formed: the input is
    viewed as a ``(*, in_1, ..., in_d)`` tensor and each axis is multiplied by its factor
    (the vec trick, all rank terms in one GEMM per step), with hand-written forward and
    backward kernels (:func:`kronlayers.functional.kronecker_linear`). For
    ``in = out = 4096`` with ``64x64 ⊗ 64x64`` factors that is 8,192 weights instead of
    16.8 M, and 1/32 of the FLOPs.

    Dispatch: when the rank is high (e.g. the ranks ``compress(rank=0.5)`` picks) the
    factorized contractions cost more than ``nn.Linear`` itself; a cost model then forms
    ``W`` from the factors and runs one GEMM instead (exact, differentiable), whichever is
    cheaper for the call's shape (:meth:`dispatch_path`, :meth:`dispatch_plan`;
    :func:`kronlayers.functional._dispatch.force_path` pins a path). Forming ``W`` costs
    about ``R * H_out * H_in`` multiply-adds per call, which a large batch amortises and a
    small one cannot: at high rank and small batch both paths are slower than
    ``nn.Linear`` (see ``benchmarks/results/kronecker_linear_cpu.md``).

    Per-call overhead: the factors are validated when first seen (and again after
    ``.to()`` or when a factor is replaced); a call is dispatched once per signature
    (input shape, dtype, device, which gradients) and then runs a cached plan.

    Args:
        in_features: size of each input sample, ``prod(in_shape)``.
        out_features: size of each output sample, ``prod(out_shape)``.
        bias: if ``False``, the layer does not learn an additive bias. Default: ``True``.
        in_shape: ``(in_1, ..., in_d)``; default: the most balanced two-factor split of
            ``in_features`` (e.g. 784 -> (28, 28)), or a ``d``-factor split if ``out_shape``
            is given with ``d`` entries.
        out_shape: ``(out_1, ..., out_d)``; default: the most balanced split of
            ``out_features`` into as many factors as ``in_shape`` has.
        rank: number ``R`` of Kronecker terms summed (an int ``>= 1``), or a float in
            ``(0, 1]``: the fraction of the dense weights to keep with these shapes,
            ``R = max(1, floor(rank * in * out / sum_k out_k * in_k))``. Default: 1.
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
        cache_dense_weight: ``False`` by default. When ``True``, calls without gradients
            (inference) that the dispatcher sends to the dense path reuse a dense weight
            formed once, until a factor changes (in place or replaced); the dispatcher
            then costs the dense path as one GEMM, so at high rank inference runs at
            ``nn.Linear``'s speed whatever the batch. The price is a dense
            ``(out_features, in_features)`` matrix kept in memory, hence opt-in. Setting it
            to ``False`` frees the matrix. A change is seen through the factors' storage and
            version counters, which an in-place write through ``.data`` (``p.data.mul_()``)
            does not bump: after such a write set the flag again (or call ``.to()``) to drop
            the kept weight.

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

    method: ClassVar[str] = "kronecker"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        rank: int | float = 1,
        shared_factors: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        in_features, out_features = self.in_features, self.out_features
        rank = check_rank(rank)
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
        if len(self.in_shape) > MAX_MODES:
            raise ValueError(f"in_shape may have at most {MAX_MODES} factors, got {in_shape}")
        if isinstance(rank, float):
            per_term = _kron_weights(self.in_shape, self.out_shape, 1)
            rank = max(1, math.floor(rank * in_features * out_features / per_term))
        self.rank = rank
        # Strict, unlike bias (which follows nn.Linear's truthiness): no PyTorch precedent,
        # and shared_factors="no" would silently tie every factor.
        if not isinstance(shared_factors, bool):
            raise TypeError(
                f"shared_factors must be a bool, got {type(shared_factors).__name__} "
                f"{shared_factors!r}"
            )
        self.shared_factors = shared_factors
        pairs = list(zip(self.out_shape, self.in_shape, strict=True))
        if self.shared_factors and len(set(pairs)) != 1:
            raise ValueError(
                "shared_factors=True requires every factor to have the same (out_k, in_k), "
                f"got out_shape={self.out_shape}, in_shape={self.in_shape}"
            )
        unique = pairs[:1] if self.shared_factors else pairs
        factory = {"device": device, "dtype": dtype}
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(self.rank, o, i, **factory)) for o, i in unique]
        )
        # Validated once here: the forward only compares each factor's shape with these.
        self._config = KroneckerLinearConfig(self.in_shape, self.out_shape, self.rank)
        self._factor_shapes = tuple((self.rank, o, i) for o, i in unique)
        self._hot = None  # see forward
        self._plans: dict = {}  # dispatch plans by call signature
        self._fast = None  # the last no-grad single-row call, see forward
        self._cache_dense = False
        self._weight_cache = None
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

    def factor_parameters(self) -> list[nn.Parameter]:
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
        self._reset_bias()

    @property
    def weight(self) -> torch.Tensor:
        """Dense ``(out_features, in_features)`` weight (differentiable, allocates it).

        In float16 / bfloat16 it is formed from balanced factors (the same weight, see
        :func:`kronlayers.functional._amp.balance_kron_factors`), so that the partial
        products of three or more factors do not overflow."""
        factors = self.factor_tensors()
        return kron_weight(balance_kron_factors(factors, factors[0].dtype))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Dynamo folds the checks into its guards; no per-call cost in the graph.
            return kronecker_linear(input, self.factor_tensors(), self.bias)
        # Hot paths (the layer's own dicts are read directly: nn.Module.__getattr__ costs
        # more than a small layer's GEMMs).
        params = tuple(self._modules["factors"]._parameters.values())
        bias = self._parameters["bias"]
        fast = self._fast
        if fast is not None and not torch.is_grad_enabled() and isinstance(input, torch.Tensor):
            # The last no-grad single-row call (the latency case) kept a runner holding
            # views of the factors; it still applies if the call looks the same and the
            # parameters are the same tensors on the same storage (in-place updates are
            # seen through the views; .to() clears it, see _apply).
            if (
                fast[0] == input.shape
                and input.dtype is fast[1]
                and input.device == fast[2]
                and _same(fast[3], (*params, bias))
                and fast[4] == (*[p.data_ptr() for p in params], _data_ptr(bias))
                and fast[5] == inference_state(fast[2].type)
            ):
                return fast[6](input)
        # The factors were validated when first seen (shapes, one dtype and device; .to()
        # and friends reset that, see _apply); per call only their identity is compared.
        # The input is validated once per call signature (shape, dtype, device,
        # gradients) by kronecker_linear_call, which caches a ready-made runner for it.
        # Autocast or anything unexpected takes the full functional path.
        hot = self._hot
        if hot is None or len(params) != len(hot[0]):
            hot = self._validate(params)
        else:
            for p, q in zip(params, hot[0], strict=True):
                if p is not q:
                    hot = self._validate(params)
                    break
        if hot is not None and isinstance(input, torch.Tensor):
            if self._cache_dense and not torch.is_grad_enabled():
                y = self._cached_dense_call(input, params, bias, hot)
                if y is not None:
                    return y
            y = kronecker_linear_call(input, bias, self._config, hot[3], None, self._plans)
            if not torch.is_grad_enabled():
                self._fast = inference_runner(self._config, input, bias, hot[3], params)
            return y
        return kronecker_linear(input, self.factor_tensors(), bias)

    @property
    def cache_dense_weight(self) -> bool:
        """Keep the dense weight between no-grad calls on the dense path (see the class
        docstring); setting it frees any kept weight."""
        return self._cache_dense

    @cache_dense_weight.setter
    def cache_dense_weight(self, value: bool) -> None:
        self._cache_dense = bool(value)
        self._weight_cache = None

    def _cached_dense_call(self, input, params, bias, hot):
        """The inference call with a cached dense weight, or ``None`` when the dispatcher
        prefers the factorized path (or autocast is on)."""
        device_type = hot[2].type
        state = inference_state(device_type)
        if state is None or input.dtype is not hot[1] or input.device != hot[2]:
            return None
        factors = hot[3]
        needs = (False,) * (2 + len(factors))
        rows = static_rows(input.shape) if input.dim() > 0 else 1
        chosen, _ = plan_cached(
            self._config, rows, input.dtype, device_type, needs, bias is not None, *state, True
        )
        if chosen != "dense":
            return None
        check_call(input, factors, bias, self._config)
        key = (*[(p.data_ptr(), p._version) for p in params], hot[1], hot[2])
        cache = self._weight_cache
        if cache is None or not _same(cache[1], params) or cache[0] != key:
            with torch.no_grad():
                # As kronecker_linear_call: balanced in half precision (no autocast here).
                w = kron_weight(balance_kron_factors(factors, input.dtype))
                cache = self._weight_cache = (key, params, w)
        return F.linear(input, cache[2], bias)

    def _validate(self, params: tuple[torch.Tensor, ...]):
        """Check the factors against the layer's shapes; cache ``(params, dtype, device,
        factors in Kronecker order)`` when they agree (else ``None``: the slow path)."""
        hot = None
        if len(params) == len(self._factor_shapes) and params:
            dtype, device = params[0].dtype, params[0].device
            if all(
                tuple(p.shape) == shape and p.dtype is dtype and p.device == device
                for p, shape in zip(params, self._factor_shapes, strict=True)
            ):
                factors = params * self.num_factors if self.shared_factors else params
                hot = (params, dtype, device, factors)
        self._hot = hot
        return hot

    def _apply(self, fn, recurse=True):
        # .to() / .double() / .cuda() change the factors' dtype or device in place.
        self._hot = None
        self._fast = None
        self._weight_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__()
        state["_hot"] = None
        state["_plans"] = {}
        state["_fast"] = None
        state["_weight_cache"] = None
        return state

    def dispatch_plan(
        self, input_shape: Sequence[int], *, requires_grad: bool | None = None
    ) -> dict[str, Any]:
        """:func:`kronlayers.functional.kronecker_linear_plan` for this layer: the path, the
        contraction order, whether a partial product is saved, and the estimated seconds
        of each path for an input of ``input_shape`` (a symbolic batch size counts as
        :data:`~kronlayers.functional._dispatch.SYMBOLIC_ROWS` rows)."""
        requires_grad = self._grad_needed(requires_grad)
        p = self.factors[0]
        return kronecker_linear_plan(
            self.in_shape,
            self.out_shape,
            self.rank,
            input_shape,
            dtype=p.dtype,
            device_type=p.device.type,
            factor_grad=bool(requires_grad),
            bias=self.bias is not None,
            weight_cached=self._cache_dense and not requires_grad,
        )

    def num_factor_parameters(self) -> int:
        """Number of weights in the factors (bias excluded); same as :meth:`num_weights`."""
        return self.num_weights()

    def flops(self, input_shape: Sequence[int]) -> int:
        return kronecker_linear_flops(
            self.in_shape, self.out_shape, self.rank, self._rows(input_shape)
        )

    def rank_label(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}, rank={self.rank}" + (
            ", shared_factors=True" if self.shared_factors else ""
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        rank: int | float = 1,
    ) -> KroneckerLinear:
        """Build the nearest ``KroneckerLinear`` to a trained :class:`~torch.nn.Linear`.

        The factors are :func:`kronlayers.decomposition.nearest_kronecker` of
        ``linear.weight`` (optimal in Frobenius norm for two factors), the bias is copied.
        The relative error ``||W - W_kron||_F / ||W||_F`` is stored in
        ``reconstruction_error`` on the returned layer.
        """
        cls._check_dense(linear)
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
        factors = nearest_kronecker(w, layer.out_shape, layer.in_shape, rank=layer.rank)
        with torch.no_grad():
            for p, f in zip(layer.factors, factors, strict=True):
                p.copy_(f)
        layer._copy_bias_from(linear)
        layer._record_error(w)
        return layer

    @classmethod
    def typical_rank(cls, module: nn.Module) -> int:
        """One Kronecker term: the layer's default."""
        return 1

    @classmethod
    def compress_config(cls, module: nn.Linear, rank: int | float | tuple) -> dict[str, Any]:
        """``from_linear`` arguments for :func:`kronlayers.compress`.

        An int ``rank``: that many terms on the default (most balanced two-factor) shapes. A
        float ``rank`` (fraction of the dense weights): every two-factor split
        ``in = i1*i2``, ``out = o1*o2`` (no 1x1 factor) and rank ``R <= min(o1*i1, o2*i2)``
        is searched for the largest weight count ``R * (o1*i1 + o2*i2)`` not above
        ``floor(rank * in * out)``; ties go to the most balanced split, then the smaller
        rank.
        """
        rank = check_rank(rank)
        n_in, n_out = module.in_features, module.out_features
        dense = n_in * n_out
        if isinstance(rank, int):
            in_shape = balanced_factorization(n_in, 2)
            out_shape = balanced_factorization(n_out, 2)
            pairs = list(zip(out_shape, in_shape, strict=True))
            if any(o * i == 1 for o, i in pairs):
                raise NotCompressible(
                    f"no useful Kronecker split of in_features={n_in}, out_features={n_out} "
                    f"(prime: only the trivial split in {in_shape} out {out_shape})"
                )
            max_rank = min(o * i for o, i in pairs)
            if rank > max_rank:
                raise NotCompressible(
                    f"rank {rank} exceeds the maximum {max_rank} for in {in_shape} out {out_shape}"
                )
            weights = _kron_weights(in_shape, out_shape, rank)
            if weights >= dense:
                raise NotCompressible(
                    f"rank {rank} with in {in_shape} out {out_shape} needs {weights:,} "
                    f"weights, not fewer than the dense {dense:,}"
                )
            return {"in_shape": in_shape, "out_shape": out_shape, "rank": rank}
        budget = math.floor(rank * dense)
        best_key, best = None, None
        for in_shape in _splits2(n_in):
            for out_shape in _splits2(n_out):
                sizes = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
                if min(sizes) == 1:  # a 1x1 (scalar) factor: no structure, never smaller
                    continue
                r = min(budget // sum(sizes), min(sizes))
                if r < 1:
                    continue
                weights = r * sum(sizes)
                if weights >= dense:
                    continue
                key = (-weights, _log_spread(in_shape) + _log_spread(out_shape), r, in_shape)
                if best_key is None or key < best_key:
                    best_key, best = key, (in_shape, out_shape, r)
        if best is None:
            raise NotCompressible(
                f"no Kronecker layer of in_features={n_in}, out_features={n_out} fits "
                f"rank={rank} ({budget:,} of {dense:,} weights)"
            )
        return {"in_shape": best[0], "out_shape": best[1], "rank": best[2]}
