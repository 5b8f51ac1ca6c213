"""The calling convention every kronlayers ``torch.autograd.Function`` follows.

``Function.apply(input, bias, config, *factors)``:

- ``input``: the layer input (``(N, *, H_in)`` for linear layers, ``(N, C_in, H, W)`` for
  convolutions), already validated by the functional wrapper;
- ``bias``: a tensor or ``None``;
- ``config``: a frozen, hashable dataclass with everything static about the call (shapes,
  ranks, stride, padding, ...) and no tensors, so ``torch.compile`` guards on it by value;
- ``*factors``: the factor tensors, in the order the layer documents.

``backward`` returns gradients in the same order, ``None`` for ``config``.
"""

from __future__ import annotations

__all__ = ["split_needs"]


def split_needs(ctx) -> tuple[bool, bool, tuple[bool, ...]]:
    """``ctx.needs_input_grad`` as ``(input, bias, factors)`` under the common convention."""
    needs = ctx.needs_input_grad
    return needs[0], needs[1], tuple(needs[3:])
