"""Compress a trained dense MNIST model without retraining, then fine-tune it for an epoch.

Trains the dense MLP of ``mnist_kron_mlp.py`` (784-625-10) or, with ``--model cnn``, the
PyTorch-example CNN of ``mnist_cp_cnn.py``; then, for each method and rank, converts the
trained layers in place of the dense ones:

* MLP, ``kron``: fc1 (625 x 784) -> ``KroneckerLinear.from_linear`` with 25x28 factors
  (the nearest sum of ``rank`` Kronecker products, 1,400 weights per rank);
* MLP, ``cp``: fc1 -> ``CPLinear.from_linear`` of the ``(25, 25, 28, 28)`` tensor
  (106 weights per rank);
* CNN, ``kron``: fc1 (128 x 9216) -> ``KroneckerLinear`` with ``(8, 16) x (64, 144)``
  factors (2,816 weights per rank), convolutions kept;
* CNN, ``cp``: conv1 and conv2 -> ``CPConv2d.from_conv`` (conv1's rank capped at 9), fc1 ->
  ``CPLinear.from_linear`` of the ``(8, 16, 64, 12, 12)`` tensor, all at ``rank``.

It reports the test accuracy and loss right after the conversion and after
``--finetune-epochs`` (default 1) of fine-tuning, the weight count, and the relative
reconstruction error ``||W - W_approx||_F / ||W||_F`` of every converted layer. The dense
model gets the same extra epochs, so the fine-tuned numbers compare like with like.
Fine-tuning uses a fresh Adadelta at the learning rate where the training schedule stopped
(``lr * gamma ** epochs``; ``--finetune-lr`` to override).

Example::

    python examples/compress_pretrained.py --data-dir ../shared/data/mnist --epochs 2
    python examples/compress_pretrained.py --model cnn --epochs 1 --cp-ranks 8 32
"""

from __future__ import annotations

import argparse
import copy
import textwrap
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _common
import mnist_cp_cnn
import mnist_kron_mlp
from torch import nn

from kronlayers import CPConv2d, CPLinear, KroneckerLinear

DEFAULTS = {
    # model: (kron ranks, cp ranks, default --limit-train)
    "mlp": ((1, 2, 4, 8), (7, 13, 64), None),
    "cnn": ((1, 4), (4, 16, 64), mnist_cp_cnn.DEFAULT_LIMIT_TRAIN),
}


@dataclass
class Compressed:
    """One converted model's measurements (``*_acc`` in [0, 1], ``errors`` per layer)."""

    method: str
    rank: int
    weights: int
    errors: dict[str, float] = field(default_factory=dict)
    convert_seconds: float = 0.0
    converted_acc: float = float("nan")
    converted_loss: float = float("nan")
    finetuned_acc: float = float("nan")
    finetuned_loss: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)


def convert(model: nn.Module, kind: str, method: str, rank: int) -> tuple[nn.Module, dict]:
    """A copy of the trained dense ``model`` with its layers converted (no retraining).

    Args:
        model: trained :class:`mnist_kron_mlp.MLP` (``kind="mlp"``) or
            :class:`mnist_cp_cnn.Net` (``kind="cnn"``) with dense layers.
        method: ``"kron"`` or ``"cp"`` (see the module docstring for which layers).
        rank: Kronecker or CP rank.

    Returns:
        ``(compressed model, {layer name: relative reconstruction error})``.
    """
    with warnings.catch_warnings():
        # TensorLy's SVD initialisation warns whenever the rank exceeds a mode's size (it
        # then fills the extra columns randomly): expected at the ranks compared here.
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        return _convert(model, kind, method, rank)


def _convert(model: nn.Module, kind: str, method: str, rank: int) -> tuple[nn.Module, dict]:
    new = copy.deepcopy(model)
    errors: dict[str, float] = {}
    if kind == "mlp":
        shapes = {"in_shape": mnist_kron_mlp.IN_SHAPE, "out_shape": mnist_kron_mlp.HIDDEN_SHAPE}
        if method == "kron":
            new.fc1 = KroneckerLinear.from_linear(model.fc1, rank=rank, **shapes)
        else:
            new.fc1 = CPLinear.from_linear(model.fc1, rank=rank, **shapes)
        errors["fc1"] = float(new.fc1.reconstruction_error)
    elif method == "kron":
        new.fc1 = KroneckerLinear.from_linear(
            model.fc1,
            rank=rank,
            in_shape=mnist_cp_cnn.FC1_IN_SHAPE_KRON,
            out_shape=mnist_cp_cnn.FC1_OUT_SHAPE_KRON,
        )
        errors["fc1"] = float(new.fc1.reconstruction_error)
    else:
        new.conv1 = CPConv2d.from_conv(model.conv1, rank=min(rank, mnist_cp_cnn.CONV1_MAX_RANK))
        new.conv2 = CPConv2d.from_conv(model.conv2, rank=rank)
        new.fc1 = CPLinear.from_linear(
            model.fc1,
            rank=rank,
            in_shape=mnist_cp_cnn.FC1_IN_SHAPE_CP,
            out_shape=mnist_cp_cnn.FC1_OUT_SHAPE_CP,
        )
        for name in ("conv1", "conv2", "fc1"):
            errors[name] = float(getattr(new, name).reconstruction_error)
    return new, errors


def _ranks(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {value}")
    return value


def plot_compression(
    path: str | Path, dense: Compressed, rows: Sequence[Compressed], title: str
) -> Path | None:
    """Accuracy (converted and fine-tuned) and reconstruction error against weight count."""
    plt = _common.pyplot()
    if plt is None:
        return None
    fig, (ax_acc, ax_err) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"kron": "tab:blue", "cp": "tab:orange"}
    for method in dict.fromkeys(r.method for r in rows):
        sub = sorted((r for r in rows if r.method == method), key=lambda r: r.weights)
        w = [r.weights for r in sub]
        c = colors.get(method, None)
        ax_acc.plot(
            w,
            [r.converted_acc for r in sub],
            "o--",
            color=c,
            mfc="none",
            label=f"{method}: converted",
        )
        ax_acc.plot(
            w, [r.finetuned_acc for r in sub], "o-", color=c, label=f"{method}: + fine-tuning"
        )
        for r in sub:
            ax_acc.annotate(
                f"r{r.rank}",
                (r.weights, r.finetuned_acc),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=7,
            )
        ax_err.plot(w, [max(r.errors.values()) for r in sub], "o-", color=c, label=method)
    ax_acc.axhline(
        dense.converted_acc,
        color="gray",
        ls="--",
        lw=1,
        label=f"dense ({dense.weights:,}), trained",
    )
    ax_acc.axhline(
        dense.finetuned_acc, color="black", ls=":", lw=1, label="dense + same fine-tuning"
    )
    ax_acc.set(
        xscale="log",
        xlabel="weights (biases excluded, log scale)",
        ylabel="test accuracy",
        title="accuracy after conversion",
    )
    ax_err.set(
        xscale="log",
        xlabel="weights (biases excluded, log scale)",
        ylabel="relative Frobenius error (max over converted layers)",
        title="reconstruction error",
    )
    for ax in (ax_acc, ax_err):
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> list[Compressed]:
    """Train, convert at every rank, fine-tune, report (stdout, ``.md``, ``.json``, ``.png``).

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The dense reference first, then one entry per method and rank.
    """
    parser = _common.make_parser(__doc__)
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="model to compress (default mlp, with --threads 1 unless given; cnn trains on "
        f"{mnist_cp_cnn.DEFAULT_LIMIT_TRAIN:,} images unless --limit-train)",
    )
    parser.add_argument(
        "--kron-ranks",
        type=_ranks,
        nargs="*",
        default=None,
        metavar="R",
        help="Kronecker ranks (default: mlp 1 2 4 8, cnn 1 4; none to skip)",
    )
    parser.add_argument(
        "--cp-ranks",
        type=_ranks,
        nargs="*",
        default=None,
        metavar="R",
        help="CP ranks (default: mlp 7 13 64, cnn 4 16 64; none to skip)",
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=1, help="epochs of fine-tuning (default 1)"
    )
    parser.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        help="Adadelta lr of fine-tuning (default: where the schedule left off, "
        "lr * gamma ** epochs; a fresh lr 1.0 undoes part of the converted model)",
    )
    _common.add_common_args(parser, variants=None, epochs=2, limit_train=None)
    parser.set_defaults(limit_train=-1)  # sentinel: per-model default below
    args = _common.parse_args(parser, argv)
    if args.finetune_epochs < 0:
        parser.error(f"argument --finetune-epochs: must be >= 0, got {args.finetune_epochs}")
    if args.finetune_lr is not None and not args.finetune_lr > 0:
        parser.error(f"argument --finetune-lr: must be positive, got {args.finetune_lr}")
    kron_ranks, cp_ranks, limit = DEFAULTS[args.model]
    if args.kron_ranks is None:
        args.kron_ranks = list(kron_ranks)
    if args.cp_ranks is None:
        args.cp_ranks = list(cp_ranks)
    if args.limit_train == -1:
        args.limit_train = limit
    if args.threads is None and args.model == "mlp":
        args.threads = 1  # batch-64 MLP steps: one thread is as fast and safe on a busy CPU
    with _common.torch_threads(args.threads):
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[Compressed]:
    started = time.perf_counter()
    data = _common.load_data(args)
    print(
        f"MNIST: {len(data.train_y):,} training / {len(data.test_y):,} test images; "
        f"device {args.device_obj}; model {args.model}: {args.epochs} epoch(s) of training, "
        f"{args.finetune_epochs} of fine-tuning",
        flush=True,
    )
    build = mnist_kron_mlp.dense_mlp if args.model == "mlp" else mnist_cp_cnn.dense_net
    trained, model = _common.train_variant("dense", f"dense {args.model}", build, data, args)
    ft_args = copy.copy(args)
    # Fine-tuning continues the training schedule unless told otherwise.
    ft_args.lr = (
        args.finetune_lr if args.finetune_lr is not None else args.lr * args.gamma**args.epochs
    )

    def finetune(name: str, m: nn.Module, row: Compressed) -> None:
        if args.finetune_epochs == 0:
            return
        res, _ = _common.train_variant(
            name, "", lambda: m, data, ft_args, epochs=args.finetune_epochs, model=m
        )
        row.finetuned_acc, row.finetuned_loss = res.test_acc, res.test_loss
        row.history = res.history

    dense = Compressed(
        "dense",
        0,
        trained.weights,
        converted_acc=trained.test_acc,
        converted_loss=trained.test_loss,
    )
    finetune("dense+ft", copy.deepcopy(model), dense)
    rows: list[Compressed] = []
    for method, ranks in (("kron", args.kron_ranks), ("cp", args.cp_ranks)):
        for rank in ranks:
            t0 = time.perf_counter()
            compressed, errors = convert(model, args.model, method, rank)
            seconds = time.perf_counter() - t0
            loss, acc = _common.evaluate(
                compressed, data.test_x, data.test_y, batch_size=args.test_batch_size
            )
            row = Compressed(
                method, rank, _common.count_weights(compressed), errors, seconds, acc, loss
            )
            err_text = ", ".join(f"{k} {v:.3f}" for k, v in errors.items())
            print(
                f"[{method} r{rank}] {row.weights:,} weights, error {err_text}: "
                f"converted test acc {acc:.4f} ({seconds:.1f} s to convert)",
                flush=True,
            )
            finetune(f"{method}-r{rank}+ft", compressed, row)
            rows.append(row)

    meta = _common.run_metadata(args, started, "compress_pretrained.py", argv)
    meta.update(model=args.model, finetune_epochs=args.finetune_epochs, finetune_lr=ft_args.lr)
    table_rows = [
        {
            "method": r.method,
            "rank": r.rank if r.method != "dense" else "-",
            "weights": r.weights,
            "errors": ", ".join(f"{k} {v:.3f}" for k, v in r.errors.items()) or "-",
            "converted_acc": r.converted_acc,
            "converted_loss": r.converted_loss,
            "finetuned_acc": r.finetuned_acc,
            "finetuned_loss": r.finetuned_loss,
        }
        for r in [dense, *rows]
    ]
    ft = f"+{args.finetune_epochs} ep"
    columns = (
        ("method", "method"),
        ("rank", "rank"),
        ("weights", "weights"),
        ("errors", "rel. error"),
        ("converted_acc", "acc converted"),
        ("converted_loss", "loss converted"),
        ("finetuned_acc", f"acc {ft}"),
        ("finetuned_loss", f"loss {ft}"),
    )
    table = _common.markdown_table(table_rows, columns)
    cap = (
        f"{args.model.upper()} trained densely, then converted (dense row: the trained model) "
        f"and fine-tuned {args.finetune_epochs} epoch(s) with Adadelta lr {ft_args.lr:.3g}. "
        + _common.caption(meta, len(data.train_y), len(data.test_y))
    )
    _common.print_table(table + "\n\n" + cap)
    stem = f"compress_pretrained_{args.model}"
    out = _common.write_report(
        args.out_dir,
        stem,
        f"Compressing a trained {args.model.upper()} without retraining",
        [table, cap],
        {"meta": meta, "dense": asdict(dense), "results": [asdict(r) for r in rows]},
    )
    png = plot_compression(
        f"{args.out_dir}/{stem}.png", dense, rows, f"Compressing a trained {args.model} — " + cap
    )
    print(f"wrote {out['md']}, {out['json']}" + (f", {png}" if png else ""), flush=True)
    return [dense, *rows]


if __name__ == "__main__":
    main()
