"""MNIST with a LeNet-style CNN, its layers CP-, Tucker-, Kronecker- or low-rank-factorized.

The study trains every variant on all 60,000 training images with the same schedule (the
PyTorch MNIST example's: Adadelta lr 1.0, StepLR gamma 0.7 per epoch, batch 64, seed 1,
4 epochs) and tests on all 10,000 test images. The network is small enough for a CPU:

    conv1 1->16 5x5, max-pool 2, ReLU      (N, 16, 12, 12)        400 weights
    conv2 16->32 5x5, max-pool 2, ReLU     (N, 32, 4, 4)       12,800
    fc1 512->128, ReLU                                         65,536
    fc2 128->10, log-softmax                                    1,280   (80,016 in all)

It reaches 0.99 test accuracy in 2 epochs. Variants replace one layer or two:

    conv-cp<R>      conv2 as CPConv2d of rank R (58 R weights)
    conv-tucker<R>  conv2 as TuckerConv2d of ranks (R, R) (48 R + 25 R^2 weights)
    fc-kron<R>      fc1 as KroneckerLinear, sum of R products A (16 x 32, channels) ⊗
                    B (8 x 16, pixels): 640 R weights
    fc-cp<R>        fc1 as CPLinear of the (16, 8, 32, 4, 4) tensor (out 16 x 8; in channels,
                    rows, columns): 64 R weights
    fc-lowrank<R>   fc1 as LowRankLinear, U (128 x R) V (R x 512): 640 R weights
    cp<R>-kron<S>   both: conv2 CP rank R, fc1 Kronecker rank S (also tucker12-kron8,
                    not run by default)
    dense-<a>-<b>-<h>  the dense network with a, b channels and h hidden units, a dense
                    baseline at a compressed variant's budget

The budgets are matched: conv-cp20 (1,160) / conv-tucker6 (1,188) and conv-cp72 /
conv-tucker12 (4,176 each) for conv2; 1,280 and 5,120 weights for each fc1 method. conv1 stays
dense everywhere: 400 weights (0.5 % of the network) on one input channel leave nothing to
compress. ``--quick`` trains one epoch on 1,000 images (a test, seconds).

Runs on one thread by default (``--threads``): on a shared 2-core machine two OpenMP threads
competing with other processes were measured 6x slower per step than one.

Example::

    python examples/mnist_cp_cnn.py --out-dir examples/results
    python examples/mnist_cp_cnn.py --quick --variants dense fc-kron2

The PyTorch-example CNN (:class:`Net`, :func:`dense_net`, ``FC1_*`` shapes) is kept here for
``compress_pretrained.py --model cnn``; this study does not train it (about 6 minutes per
60,000-image epoch on this CPU, 20-40x the LeNet's).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import _common
import torch
import torch.nn.functional as F
from torch import nn

from kronlayers import CPConv2d, CPLinear, KroneckerLinear, LowRankLinear, TuckerConv2d

# ------------------------------------------------------------- the study's LeNet-style CNN

C1, C2, HIDDEN = 16, 32, 128
FEATURE_SHAPE = (C2, 4, 4)  # conv2's pooled output, fc1's input (512)
FC1_IN = C2 * 16
#: fc1's Kronecker factors: A maps the 32 channels to 16, B the 4x4 pixels to 8.
LENET_FC1_IN_SHAPE_KRON = (C2, 16)
LENET_FC1_OUT_SHAPE_KRON = (16, 8)
#: fc1's CP tensor: (out 16, 8; in channels 32, rows 4, columns 4).
LENET_FC1_IN_SHAPE_CP = FEATURE_SHAPE
LENET_FC1_OUT_SHAPE_CP = (16, 8)
EPOCHS = 4
QUICK = {"epochs": 1, "limit_train": 1000, "limit_test": 1000}


class LeNet(nn.Module):
    """conv1, pool, ReLU, conv2, pool, ReLU, fc1, ReLU, fc2, log-softmax (any layer types).

    Shape:
        - Input: ``(N, 1, 28, 28)``.
        - Output: ``(N, 10)`` log-probabilities.
    """

    def __init__(self, conv1: nn.Module, conv2: nn.Module, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.fc1 = fc1
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling before the ReLU is the same function (both monotone) and cheaper.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (N, 16, 12, 12)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (N, 32, 4, 4)
        x = F.relu(self.fc1(x.flatten(1)))  # (N, 128)
        return F.log_softmax(self.fc2(x), dim=1)


def lenet(
    c1: int = C1,
    c2: int = C2,
    hidden: int = HIDDEN,
    *,
    conv2: nn.Module | None = None,
    fc1: nn.Module | None = None,
) -> LeNet:
    """The study's network with ``c1``, ``c2`` channels and ``hidden`` units; ``conv2`` and
    ``fc1`` replace the dense layers when given."""
    return LeNet(
        nn.Conv2d(1, c1, 5),
        conv2 if conv2 is not None else nn.Conv2d(c1, c2, 5),
        fc1 if fc1 is not None else nn.Linear(c2 * 16, hidden),
        nn.Linear(hidden, 10),
    )


def conv2_cp(rank: int) -> CPConv2d:
    """conv2 16 -> 32, 5x5 as a CP kernel of rank ``rank`` (58 weights per rank)."""
    return CPConv2d(C1, C2, 5, rank=rank)


def conv2_tucker(rank: int) -> TuckerConv2d:
    """conv2 as a Tucker-2 kernel of ranks ``(rank, rank)``: ``48 r + 25 r^2`` weights."""
    return TuckerConv2d(C1, C2, 5, rank=rank)


def fc1_kron(rank: int) -> KroneckerLinear:
    """fc1 512 -> 128 as a sum of ``rank`` products ``A ⊗ B`` (640 weights per rank)."""
    return KroneckerLinear(
        FC1_IN,
        HIDDEN,
        rank=rank,
        in_shape=LENET_FC1_IN_SHAPE_KRON,
        out_shape=LENET_FC1_OUT_SHAPE_KRON,
    )


def fc1_cp(rank: int) -> CPLinear:
    """fc1 as a CP tensor of shape ``(16, 8, 32, 4, 4)`` (64 weights per rank)."""
    return CPLinear(
        FC1_IN, HIDDEN, rank=rank, in_shape=LENET_FC1_IN_SHAPE_CP, out_shape=LENET_FC1_OUT_SHAPE_CP
    )


def fc1_lowrank(rank: int) -> LowRankLinear:
    """fc1 as ``U V`` of rank ``rank`` (640 weights per rank)."""
    return LowRankLinear(FC1_IN, HIDDEN, rank=rank)


VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "dense": ("LeNet-style CNN 16-32-128", lenet),
}
for _r in (20, 72):
    VARIANTS[f"conv-cp{_r}"] = (f"conv2 CP rank {_r}", lambda r=_r: lenet(conv2=conv2_cp(r)))
for _r in (6, 12):
    VARIANTS[f"conv-tucker{_r}"] = (
        f"conv2 Tucker ranks ({_r}, {_r})",
        lambda r=_r: lenet(conv2=conv2_tucker(r)),
    )
for _r in (2, 8):  # 1,280 and 5,120 fc1 weights
    VARIANTS[f"fc-kron{_r}"] = (
        f"fc1 Kronecker rank {_r} (16x32 ⊗ 8x16)",
        lambda r=_r: lenet(fc1=fc1_kron(r)),
    )
    VARIANTS[f"fc-cp{10 * _r}"] = (
        f"fc1 CP rank {10 * _r} (16,8,32,4,4)",
        lambda r=10 * _r: lenet(fc1=fc1_cp(r)),
    )
    VARIANTS[f"fc-lowrank{_r}"] = (f"fc1 low rank {_r}", lambda r=_r: lenet(fc1=fc1_lowrank(r)))
VARIANTS["cp20-kron2"] = (
    "conv2 CP rank 20, fc1 Kronecker rank 2",
    lambda: lenet(conv2=conv2_cp(20), fc1=fc1_kron(2)),
)
VARIANTS["tucker12-kron8"] = (
    "conv2 Tucker (12, 12), fc1 Kronecker rank 8",
    lambda: lenet(conv2=conv2_tucker(12), fc1=fc1_kron(8)),
)
VARIANTS["dense-8-16-64"] = ("dense, 8-16-64 (fc-* budget)", lambda: lenet(8, 16, 64))
VARIANTS["dense-4-8-24"] = ("dense, 4-8-24 (cp20-kron2 budget)", lambda: lenet(4, 8, 24))

#: Run by default: every variant but ``tucker12-kron8`` (about 25 minutes on a shared CPU).
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if name != "tucker12-kron8")
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def build_variant(name: str) -> nn.Module:
    """The untrained model of variant ``name`` (see :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    return VARIANTS[name][1]()


# ------------------------------------------- the PyTorch-example CNN (compress_pretrained.py)

FC1_IN_SHAPE_CP = (64, 12, 12)
FC1_OUT_SHAPE_CP = (8, 16)
FC1_IN_SHAPE_KRON = (64, 144)
FC1_OUT_SHAPE_KRON = (8, 16)
CONV1_MAX_RANK = 9
#: compress_pretrained.py's default --limit-train for this CNN.
DEFAULT_LIMIT_TRAIN = 5000


class Net(nn.Module):
    """The PyTorch MNIST example's CNN (conv 1->32 3x3, conv 32->64 3x3, pool, fc 9216->128,
    fc 128->10, dropout 0.25 / 0.5), used by ``compress_pretrained.py --model cnn``.

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


def dense_net() -> Net:
    """The dense CNN of the PyTorch MNIST example (1,199,648 weights)."""
    return Net(
        nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1), nn.Linear(9216, 128), nn.Linear(128, 10)
    )


# --------------------------------------------------------------------------- the study


def command_line(argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, from the repository root."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "examples/mnist_cp_cnn.py", *args])


def _add_command(paths: dict[str, Path | None], command: str) -> None:
    """Put the command into the ``.md`` (after the caption) and the JSON's ``meta``."""
    md, js = paths.get("md"), paths.get("json")
    if md is not None:
        md.write_text(md.read_text(encoding="utf-8") + f"\nCommand: `{command}`\n", "utf-8")
    if js is not None:
        payload = json.loads(js.read_text(encoding="utf-8"))
        payload["meta"]["command"] = command
        js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> list[_common.VariantResult]:
    """Train the selected variants, print the table, write ``.md``, ``.json`` and ``.png``.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        One result per variant, in the order run.
    """
    parser = _common.make_parser(__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: defaults of 1 epoch, 1,000 training and 1,000 test images "
        "(explicit --epochs / --limit-* still win)",
    )
    _common.add_common_args(
        parser,
        variants=list(VARIANTS),
        default_variants=DEFAULT_VARIANTS,
        epochs=EPOCHS,
        threads=1,
    )
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**QUICK)
    args = _common.parse_args(parser, argv, known_variants=list(VARIANTS))
    with _common.torch_threads(args.threads):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[_common.VariantResult]:
    started = time.perf_counter()
    command = command_line(argv)
    data = _common.load_data(args)
    print(
        f"MNIST: {len(data.train_y):,} training / {len(data.test_y):,} test images; "
        f"device {args.device_obj}; {args.epochs} epoch(s); {torch.get_num_threads()} "
        f"thread(s); variants: {', '.join(args.variants)}",
        flush=True,
    )
    dense_weights = _common.count_weights(lenet())
    results: list[_common.VariantResult] = []

    def report(final: bool) -> tuple[str, dict]:
        text, paths = _common.report_variants(
            args,
            argv,
            started,
            data,
            results,
            script="mnist_cp_cnn.py",
            stem="mnist_cp_cnn",
            title="CP / Tucker / Kronecker / low-rank LeNet on MNIST",
            extra_columns=(
                *((f"{layer}_weights", layer) for layer in LAYERS),
                ("smaller", "x smaller"),
            ),
            final=final,
        )
        _add_command(paths, command)
        return text, paths

    for name in args.variants:
        description, build = VARIANTS[name]
        result, model = _common.train_variant(name, description, build, data, args)
        for layer in LAYERS:
            result.extra[f"{layer}_weights"] = _common.count_weights(getattr(model, layer))
        result.extra["smaller"] = f"{dense_weights / result.weights:.1f}"
        results.append(result)
        if len(results) < len(args.variants):
            report(final=False)

    text, paths = report(final=True)
    _common.print_table(text)
    print(f"Command: {command}")
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None), flush=True)
    return results


if __name__ == "__main__":
    main()
