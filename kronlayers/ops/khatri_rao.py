"""The Khatri–Rao (column-wise Kronecker) product and its adjoint for factor gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._shapes import LETTERS

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
        out = (out.unsqueeze(1) * f.unsqueeze(0)).reshape(-1, f.shape[1])
    return out


def khatri_rao_grads(
    grad: torch.Tensor, factors: Sequence[torch.Tensor], needs: Sequence[bool]
) -> list[torch.Tensor | None]:
    """Gradients of ``<grad, khatri_rao(factors)>`` w.r.t. each factor whose ``needs`` is set.

    ``grad`` is ``(prod d_k, R)``; the result for factor ``k`` is ``(d_k, R)``. The work is
    parameter-sized (no batch dimension), one einsum per requested factor.
    """
    if len(factors) == 1:
        return [grad if needs[0] else None]
    letters = LETTERS[: len(factors)]
    g = grad.reshape(*(f.shape[0] for f in factors), grad.shape[1])
    out: list[torch.Tensor | None] = []
    for k, need in enumerate(needs):
        if not need:
            out.append(None)
            continue
        others = [j for j in range(len(factors)) if j != k]
        spec = f"{letters}z," + ",".join(f"{letters[j]}z" for j in others) + f"->{letters[k]}z"
        out.append(torch.einsum(spec, g, *(factors[j] for j in others)))
    return out
