"""MNIST with a 784-625-10 MLP whose weight matrices are Kronecker products or CP factorizations.

The study of the Kronecker-MLP blog post (shared/seeds/003): the input->hidden matrix
(625 x 784 = 490,000 weights) is replaced by ``A ⊗ B`` with ``A, B`` of 25x28 (1,400
weights), or by ``A ⊗ A`` (700); the hidden->output matrix (10 x 625) by ``C ⊗ D`` with
``C`` 5x25 and ``D`` 2x25 (175). A dense MLP with the same weight budget (a hidden layer of
2 or 10 units) is the fair baseline, and CP-factorized input->hidden layers of several
ranks are the other family of compressed layers.

Variants ("weights" = weight parameters, biases excluded):

    dense            784-625-10 dense                                        496,250
    kron             fc1 = A ⊗ B (25x28 each), fc2 dense                       7,650
    kron-shared      fc1 = A ⊗ A (one 25x28), fc2 dense                        6,950
    kron-out         fc1 = A ⊗ B, fc2 = C ⊗ D (5x25, 2x25)                     1,575
    kron-shared-out  fc1 = A ⊗ A, fc2 = C ⊗ D                                    875
    dense-h2         784-2-10 dense (the budget of kron-out)                   1,588
    dense-h10        784-10-10 dense (the budget of kron)                      7,940
    cp-r7            fc1 = CP rank 7 of the (25, 25, 28, 28) weight tensor      6,992
    cp-r13           fc1 = CP rank 13 (about kron's fc1 budget)                 7,628
    cp-r64           fc1 = CP rank 64                                          13,034

A rank-R CP fc1 holds R * (25 + 25 + 28 + 28) = 106 R weights.

Training follows the PyTorch MNIST example (Adadelta lr 1.0, StepLR gamma 0.7, batch 64).
The blog trained 35 epochs; the default here is 3, a few minutes on a laptop CPU.

Example::

    python examples/mnist_kron_mlp.py --data-dir ../shared/data/mnist --epochs 3
    python examples/mnist_kron_mlp.py --variants dense kron kron-out --epochs 10
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import _common
import torch
import torch.nn.functional as F
from torch import nn

from kronlayers import CPLinear, KroneckerLinear

IN_SHAPE = (28, 28)  # 784 = the image's rows x columns
HIDDEN_SHAPE = (25, 25)  # 625
OUT_SHAPE = (5, 2)  # 10
HIDDEN = 625
CP_RANKS = (7, 13, 64)


class MLP(nn.Module):
    """``784 -> hidden (ReLU) -> 10 (log-softmax)`` with any two linear-like layers.

    Shape:
        - Input: ``(N, 1, 28, 28)`` or ``(N, 784)``.
        - Output: ``(N, 10)`` log-probabilities.
    """

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def dense_mlp(hidden: int = HIDDEN) -> MLP:
    """The dense ``784-hidden-10`` MLP (``794 * hidden`` weights)."""
    return MLP(nn.Linear(784, hidden), nn.Linear(hidden, 10))


def kron_fc1(shared: bool = False) -> KroneckerLinear:
    """``A ⊗ B`` (or ``A ⊗ A``) with 25x28 factors: 784 -> 625."""
    return KroneckerLinear(
        784, HIDDEN, in_shape=IN_SHAPE, out_shape=HIDDEN_SHAPE, shared_factors=shared
    )


def kron_fc2() -> KroneckerLinear:
    """``C ⊗ D`` with a 5x25 and a 2x25 factor: 625 -> 10."""
    return KroneckerLinear(HIDDEN, 10, in_shape=HIDDEN_SHAPE, out_shape=OUT_SHAPE)


def cp_fc1(rank: int) -> nn.Module:
    """CP of rank ``rank`` of the 784 -> 625 weight seen as a (25, 25, 28, 28) tensor."""
    return CPLinear(784, HIDDEN, rank=rank, in_shape=IN_SHAPE, out_shape=HIDDEN_SHAPE)


def matched_hidden(weights: int) -> int:
    """Hidden width of the dense MLP whose ``794 * hidden`` weights are closest to ``weights``."""
    return max(1, round(weights / (784 + 10)))


# name -> (description, builder). The kron-out budget is 1,400 + 175 = 1,575 weights.
VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "dense": ("784-625-10 dense", dense_mlp),
    "kron": (
        "fc1 = A⊗B (25x28 each), fc2 dense",
        lambda: MLP(kron_fc1(), nn.Linear(HIDDEN, 10)),
    ),
    "kron-shared": (
        "fc1 = A⊗A (one 25x28), fc2 dense",
        lambda: MLP(kron_fc1(shared=True), nn.Linear(HIDDEN, 10)),
    ),
    "kron-out": ("fc1 = A⊗B, fc2 = C⊗D (5x25, 2x25)", lambda: MLP(kron_fc1(), kron_fc2())),
    "kron-shared-out": (
        "fc1 = A⊗A, fc2 = C⊗D",
        lambda: MLP(kron_fc1(shared=True), kron_fc2()),
    ),
    f"dense-h{matched_hidden(1575)}": (
        f"784-{matched_hidden(1575)}-10 dense (budget of kron-out)",
        lambda: dense_mlp(matched_hidden(1575)),
    ),
    f"dense-h{matched_hidden(7650)}": (
        f"784-{matched_hidden(7650)}-10 dense (budget of kron)",
        lambda: dense_mlp(matched_hidden(7650)),
    ),
}
for _rank in CP_RANKS:
    VARIANTS[f"cp-r{_rank}"] = (
        f"fc1 = CP rank {_rank} (25,25,28,28), fc2 dense",
        lambda r=_rank: MLP(cp_fc1(r), nn.Linear(HIDDEN, 10)),
    )


def build_variant(name: str) -> MLP:
    """The untrained model of variant ``name`` (see :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return VARIANTS[name][1]()


def main(argv: Sequence[str] | None = None) -> list[_common.VariantResult]:
    """Train the selected variants, print the table, write ``.md``, ``.json`` and ``.png``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        One result per variant, in the order run.
    """
    parser = _common.make_parser(__doc__)
    _common.add_common_args(parser, variants=list(VARIANTS), epochs=3, threads=1)
    args = _common.parse_args(parser, argv, known_variants=list(VARIANTS))
    with _common.torch_threads(args.threads):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[_common.VariantResult]:
    return _common.run_variant_study(
        args,
        argv,
        VARIANTS,
        layers=("fc1", "fc2"),
        script="mnist_kron_mlp.py",
        stem="mnist_kron_mlp",
        title="Kronecker / CP MLP on MNIST",
    )


if __name__ == "__main__":
    main()
