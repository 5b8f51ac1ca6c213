"""MNIST with the PyTorch-example CNN, its layers CP- or Kronecker-factorized.

The network of the PyTorch MNIST example: conv 1->32 3x3, ReLU, conv 32->64 3x3, ReLU,
max-pool 2, dropout 0.25, fc 9216->128, ReLU, dropout 0.5, fc 128->10, log-softmax.
Compressed variants replace the convolutions by :class:`kronlayers.CPConv2d` and the big
fc (1.18 M of its 1.2 M weights) by :class:`kronlayers.CPLinear` or
:class:`kronlayers.KroneckerLinear`:

    dense        the example's CNN                                         1,199,648
    kron-fc      dense convs, fc1 = A ⊗ B (A: 8x64 channels, B: 16x144 pixels)  22,816
    cp<R>        convs CP rank R (conv1: min(R, 9)), fc1 CP rank R
    cp<R>-kron   convs CP rank R, fc1 = A ⊗ B as in kron-fc

fc1 reads the pooled ``(64, 12, 12)`` feature map flattened, so its CP form uses the
tensorized input shape ``(64, 12, 12)`` (channels, rows, columns) and output ``(8, 16)``,
and its Kronecker form splits the input as ``64 x 144`` (channels x pixels). A 32x3x3
kernel (conv1, one input channel) has CP rank at most 9, so conv1's rank is capped there.

A CNN is slow on a CPU: by default this trains on a seeded random 5,000-image subset of
the training set (``--limit-train``; give 60000 for all of it) and tests on all 10,000
test images.

Example::

    python examples/mnist_cp_cnn.py --data-dir ../shared/data/mnist --epochs 2
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import _common
import torch
import torch.nn.functional as F
from torch import nn

from kronlayers import CPConv2d, CPLinear, KroneckerLinear

FC1_IN_SHAPE_CP = (64, 12, 12)
FC1_OUT_SHAPE_CP = (8, 16)
FC1_IN_SHAPE_KRON = (64, 144)
FC1_OUT_SHAPE_KRON = (8, 16)
CONV1_MAX_RANK = 9
DEFAULT_LIMIT_TRAIN = 5000


class Net(nn.Module):
    """The PyTorch MNIST example's CNN with pluggable ``conv1``, ``conv2``, ``fc1``, ``fc2``.

    Shape:
        - Input: ``(N, 1, 28, 28)``.
        - Output: ``(N, 10)`` log-probabilities.
    """

    def __init__(self, conv1: nn.Module, conv2: nn.Module, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # (N, 32, 26, 26)
        x = F.relu(self.conv2(x))  # (N, 64, 24, 24)
        x = F.max_pool2d(x, 2)  # (N, 64, 12, 12)
        x = self.dropout1(x).flatten(1)  # (N, 9216)
        x = self.dropout2(F.relu(self.fc1(x)))  # (N, 128)
        return F.log_softmax(self.fc2(x), dim=1)


def dense_convs() -> tuple[nn.Conv2d, nn.Conv2d]:
    """The example's two convolutions."""
    return nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)


def cp_convs(rank: int) -> tuple[nn.Module, nn.Module]:
    """Both convolutions as CP kernels of rank ``rank`` (conv1 capped at 9)."""
    return (
        CPConv2d(1, 32, 3, 1, rank=min(rank, CONV1_MAX_RANK)),
        CPConv2d(32, 64, 3, 1, rank=rank),
    )


def cp_fc1(rank: int) -> CPLinear:
    """fc1 9216 -> 128 as a CP tensor of shape ``(8, 16, 64, 12, 12)`` and rank ``rank``."""
    return CPLinear(9216, 128, rank=rank, in_shape=FC1_IN_SHAPE_CP, out_shape=FC1_OUT_SHAPE_CP)


def kron_fc1(rank: int = 1) -> KroneckerLinear:
    """fc1 9216 -> 128 as ``A ⊗ B``, ``A`` 8x64 (channels), ``B`` 16x144 (pixels)."""
    return KroneckerLinear(
        9216, 128, in_shape=FC1_IN_SHAPE_KRON, out_shape=FC1_OUT_SHAPE_KRON, rank=rank
    )


def dense_net() -> Net:
    """The dense CNN of the PyTorch MNIST example (1,199,648 weights)."""
    return Net(*dense_convs(), nn.Linear(9216, 128), nn.Linear(128, 10))


CP_RANKS = (4, 16, 64)

VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "dense": ("PyTorch-example CNN", dense_net),
    "kron-fc": (
        "dense convs, fc1 = A⊗B (8x64, 16x144)",
        lambda: Net(*dense_convs(), kron_fc1(), nn.Linear(128, 10)),
    ),
}
for _r in CP_RANKS:
    VARIANTS[f"cp{_r}"] = (
        f"convs CP rank {_r}, fc1 CP rank {_r}",
        lambda r=_r: Net(*cp_convs(r), cp_fc1(r), nn.Linear(128, 10)),
    )
    VARIANTS[f"cp{_r}-kron"] = (
        f"convs CP rank {_r}, fc1 = A⊗B",
        lambda r=_r: Net(*cp_convs(r), kron_fc1(), nn.Linear(128, 10)),
    )
DEFAULT_VARIANTS = ("dense", "kron-fc", "cp4", "cp16", "cp64", "cp16-kron")


def build_variant(name: str) -> Net:
    """The untrained model of variant ``name`` (see :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return VARIANTS[name][1]()


LAYERS = ("conv1", "conv2", "fc1", "fc2")


def main(argv: Sequence[str] | None = None) -> list[_common.VariantResult]:
    """Train the selected variants, print the table, write ``.md``, ``.json`` and ``.png``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        One result per variant, in the order run.
    """
    parser = _common.make_parser(__doc__)
    _common.add_common_args(
        parser,
        variants=list(VARIANTS),
        default_variants=DEFAULT_VARIANTS,
        epochs=2,
        limit_train=DEFAULT_LIMIT_TRAIN,
    )
    args = _common.parse_args(parser, argv, known_variants=list(VARIANTS))
    with _common.torch_threads(args.threads):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[_common.VariantResult]:
    return _common.run_variant_study(
        args,
        argv,
        VARIANTS,
        layers=LAYERS,
        script="mnist_cp_cnn.py",
        stem="mnist_cp_cnn",
        title="CP / Kronecker CNN on MNIST",
    )


if __name__ == "__main__":
    main()
