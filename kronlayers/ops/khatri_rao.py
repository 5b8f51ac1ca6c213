"""The Khatri–Rao (column-wise Kronecker) product and its adjoint for factor gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["khatri_rao", "khatri_rao_grads"]


def khatri_rao(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Row-major Khatri–Rao product of factors ``(d_k, R)``: ``(prod d_k, R)``.

    Row ``(i_1, ..., i_D)`` (``i_1`` slowest) of the result is ``prod_k factors[k][i_k, :]``, so
    reshaping it to ``(d_1, ..., d_D, R)`` gives the CP tensor's mode-wise factors back.

    Shapes:
        - factors: ``D`` tensors ``(d_k, R)``
        - output: ``(d_1 * ... * d_D, R)``
    """
    # A broadcast multiply writes the result contiguous in the (d_1, ..., d_k, R) order a GEMM
    # needs; a two-operand einsum would batch over R and leave it permuted.
    out = factors[0]
    for f in factors[1:]:
        # (d, 1, R) * (e, R) broadcasts to (d, e, R); reshape is a view when the product
        # came out row-major (it need not for permuted factors).
        out = (out.unsqueeze(1) * f).reshape(-1, f.shape[1])
    return out


def khatri_rao_grads(
    grad: torch.Tensor, factors: Sequence[torch.Tensor], needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Gradients of ``<grad, khatri_rao(factors)>`` w.r.t. each factor whose ``needs`` is set.

    ``grad`` is ``(prod d_k, R)``, best contiguous (e.g. ``g.t() @ c`` rather than
    ``(c.t() @ g).t()``: the rank axis innermost lets every step below run vectorised over
    ``R``); the result for factor ``k`` is ``(d_k, R)``. The work is parameter-sized (no
    batch dimension): for each requested factor the other modes are contracted one at a
    time, largest first (each step shrinks the tensor the most), as a broadcast multiply and
    a sum (an einsum would batch over ``R`` and run ``R`` tiny products).
    """
    if len(factors) == 1:
        return [grad if needs[0] else None]
    sizes = [f.shape[0] for f in factors]
    g = grad.reshape(*sizes, grad.shape[1])
    out: list[torch.Tensor | None] = []
    for k, need in enumerate(needs):
        if not need:
            out.append(None)
            continue
        t, alive = g, list(range(len(factors)))
        for j in sorted((j for j in alive if j != k), key=lambda j: -sizes[j]):
            dim = alive.index(j)
            shape = [1] * t.dim()
            shape[dim], shape[-1] = sizes[j], factors[j].shape[1]
            t = (t * factors[j].view(shape)).sum(dim)
            alive.remove(j)
        out.append(t)
    return out
