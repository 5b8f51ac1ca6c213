"""Compress a trained model: data-free vs calibrated vs calibrated + distilled.

**Default (the calibration study, ``--model mlp``)**: trains the dense MLP of
``mnist_kron_mlp.py`` (784-625-10, ``--epochs`` 3), then replaces fc1 at each weight budget
(``--budgets``, fractions of fc1's 490,000 weights; default 10%, 5%, 2%) with each method
(``--methods``: ``lowrank``, ``kronecker``, ``cp`` through :func:`kronlayers.compress` with
``rank=budget``, and ``auto``, :mod:`kronlayers.budget`'s per-layer choice with
``budget=budget``), three ways:

* **data-free**: fitted to the weights, ``||W - Ŵ||_F``;
* **calibrated**: fitted to fc1's outputs on ``--calibration-images`` (1,000) training
  images, ``||X Wᵀ - X Ŵᵀ||_F`` (:mod:`kronlayers.calibration`; the input statistics are
  collected once and reused);
* **calibrated + distilled**: the calibrated model fine-tuned for ``--distill-epochs`` (1)
  to match the dense model's outputs (:func:`kronlayers.distill.distill`, KL on the
  log-probabilities, AdamW lr ``--distill-lr``, batches of 64 training images, no labels).

One table (test accuracy, output error on the calibration data, conversion seconds) and a
plot of accuracy against fc1's weights go to ``compress_pretrained_mlp.{md,json,png}``.

**``--model stack``**: the conversion benchmark of a transformer-sized stack: 6 blocks of
a 384-wide encoder (q, k, v, o 384x384; fc1 384x1536; fc2 1536x384) and a 384x384 pooler, 37
Linear layers, 10.8 M weights, each ``W = U diag(s) Vᵀ`` with ``s_k ∝ k^-0.7`` (a trained
model's spectrum) and random orthonormal ``U``, ``V``; calibration on 50 sequences of 128
correlated random embeddings. Every method converts every Linear at 10% of the weights,
data-free and calibrated, and the wall time, weights and the cosine similarity of the
pooled outputs to the dense model's (on held-out inputs) go to
``compress_pretrained_stack.{md,json}``.

**Legacy rank sweep** (``--kron-ranks`` / ``--cp-ranks`` given, or ``--model cnn``): converts
the MLP's fc1 (or the CNN's layers) data-free at the given ranks and fine-tunes them with
labels for ``--finetune-epochs``, as before (``kron``: ``KroneckerLinear`` with 25x28
factors; ``cp``: ``CPLinear`` of the ``(25, 25, 28, 28)`` tensor; the CNN: Kronecker fc1,
CP conv1/conv2/fc1).

Example::

    python examples/compress_pretrained.py                 # the calibration study
    python examples/compress_pretrained.py --model stack   # the conversion benchmark
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
import torch
import torch.nn.functional as F
from torch import nn

import kronlayers
from kronlayers import CPConv2d, CPLinear, KroneckerLinear
from kronlayers.calibration import collect_statistics
from kronlayers.decomposition.whitening import output_error
from kronlayers.distill import distill

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


STUDY_METHODS = ("lowrank", "kronecker", "cp", "auto")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


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
        choices=("mlp", "cnn", "stack"),
        default="mlp",
        help="model to compress (default mlp, with --threads 1 unless given; cnn trains on "
        f"{mnist_cp_cnn.DEFAULT_LIMIT_TRAIN:,} images unless --limit-train; stack: the "
        "transformer-sized conversion benchmark)",
    )
    study = parser.add_argument_group("calibration study (mlp, no --kron-ranks/--cp-ranks)")
    study.add_argument(
        "--budgets",
        type=_fraction,
        nargs="+",
        default=[0.1, 0.05, 0.02],
        metavar="F",
        help="fractions of fc1's weights (default 0.1 0.05 0.02)",
    )
    study.add_argument(
        "--methods",
        nargs="+",
        choices=STUDY_METHODS,
        default=list(STUDY_METHODS),
        help="methods (default: all)",
    )
    study.add_argument(
        "--calibration-images",
        type=int,
        default=1000,
        help="training images whose fc1 inputs calibrate the fits (default 1000)",
    )
    study.add_argument(
        "--distill-epochs",
        type=float,
        default=1.0,
        help="epochs of distillation of every calibrated model (default 1; 0 to skip)",
    )
    study.add_argument(
        "--distill-lr", type=float, default=1e-3, help="AdamW lr of distillation (default 1e-3)"
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
    _common.add_common_args(parser, variants=None, epochs=3, limit_train=None)
    parser.set_defaults(limit_train=-1)  # sentinel: per-model default below
    args = _common.parse_args(parser, argv)
    if args.calibration_images < 1:
        parser.error(f"argument --calibration-images: must be >= 1, got {args.calibration_images}")
    if args.distill_epochs < 0:
        parser.error(f"argument --distill-epochs: must be >= 0, got {args.distill_epochs}")
    if args.model == "stack":
        if args.threads is None:
            args.threads = 1  # a shared CPU: one thread avoids OpenMP spin-wait contention
        with _common.torch_threads(args.threads):
            return run_stack(args, argv)
    legacy = args.model == "cnn" or args.kron_ranks is not None or args.cp_ranks is not None
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
        return _run(args, argv) if legacy else run_study(args, argv)


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


# ----------------------------------------------------------------------------- the study


@dataclass
class StudyRow:
    """One method at one budget: data-free, calibrated and calibrated + distilled.

    ``*_acc`` in [0, 1]; ``*_out_error``: relative error of fc1's outputs on the calibration
    images, ``||X Wᵀ - X Ŵᵀ|| / ||X Wᵀ||``; ``*_seconds``: wall time of the conversion
    (the calibration statistics, collected once, are excluded: ``stats_seconds`` in meta)."""

    budget: float
    method: str
    weights: int = 0
    config: str = ""
    note: str = ""
    free_acc: float = float("nan")
    free_loss: float = float("nan")
    free_out_error: float = float("nan")
    free_weights: int = 0
    free_config: str = ""
    free_seconds: float = float("nan")
    cal_acc: float = float("nan")
    cal_loss: float = float("nan")
    cal_out_error: float = float("nan")
    cal_seconds: float = float("nan")
    distill_acc: float = float("nan")
    distill_loss: float = float("nan")
    distill_seconds: float = float("nan")


def _fc1_only(name: str, module: nn.Module) -> bool:
    return name == "fc1"


def _convert_fc1(model: nn.Module, method: str, budget: float, stats) -> tuple[nn.Module, object]:
    if method == "auto":
        return kronlayers.compress(
            model, "auto", budget=budget, calibration=stats, filter_fn=_fc1_only, inplace=False
        )
    return kronlayers.compress(
        model, method, rank=budget, calibration=stats, filter_fn=_fc1_only, inplace=False
    )


def _fc1_weights(model: nn.Module) -> int:
    fc1 = model.fc1
    return fc1.weight.numel() if isinstance(fc1, nn.Linear) else fc1.num_weights()


def run_study(args: argparse.Namespace, argv: Sequence[str] | None) -> list[StudyRow]:
    """Train the MLP, then every method x budget data-free, calibrated, distilled."""
    started = time.perf_counter()
    data = _common.load_data(args)
    print(
        f"MNIST: {len(data.train_y):,} training / {len(data.test_y):,} test images; "
        f"{args.epochs} epoch(s) of training; calibration on {args.calibration_images:,} "
        f"training images; {args.distill_epochs:g} epoch(s) of distillation",
        flush=True,
    )
    trained, dense = _common.train_variant(
        "dense", "dense mlp", mnist_kron_mlp.dense_mlp, data, args
    )
    dense.eval()
    evaluate = lambda m: _common.evaluate(  # noqa: E731
        m, data.test_x, data.test_y, batch_size=args.test_batch_size
    )
    dense_loss, dense_acc = evaluate(dense)
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(data.train_y), generator=g)[: args.calibration_images]
    pick = pick.to(data.train_x.device)
    calib = [data.train_x[pick[i : i + 100]] for i in range(0, len(pick), 100)]
    t0 = time.perf_counter()
    stats = collect_statistics(dense, calib, modules={"fc1": dense.fc1})
    stats_seconds = time.perf_counter() - t0
    gram = stats["fc1"].second_moment
    w = dense.fc1.weight.detach()
    order = torch.randperm(len(data.train_y), generator=g).to(data.train_x.device)
    train_batches = [
        data.train_x[order[i : i + args.batch_size]] for i in range(0, len(order), args.batch_size)
    ]
    steps = max(1, round(args.distill_epochs * len(train_batches)))
    rows: list[StudyRow] = []
    for budget in args.budgets:
        for method in args.methods:
            row = StudyRow(budget, method)
            t0 = time.perf_counter()
            free, report = _convert_fc1(dense, method, budget, None)
            row.free_seconds = time.perf_counter() - t0
            if report[0].skipped:
                print(f"[{method} {budget:g}] skipped: {report[0].reason}", flush=True)
                continue
            row.free_loss, row.free_acc = evaluate(free)
            row.free_out_error = output_error(w, free.fc1.weight.detach(), gram)
            row.free_weights, row.free_config = _fc1_weights(free), report[0].config
            t0 = time.perf_counter()
            cal, report = _convert_fc1(dense, method, budget, stats)
            row.cal_seconds = time.perf_counter() - t0
            row.cal_loss, row.cal_acc = evaluate(cal)
            row.cal_out_error = float(report[0].output_error)
            row.weights, row.config = _fc1_weights(cal), report[0].config
            row.note = report[0].note
            print(
                f"[{method} {budget:g}] fc1 {row.weights:,} weights ({row.config}): data-free "
                f"acc {row.free_acc:.4f} (out err {row.free_out_error:.3f}, "
                f"{row.free_seconds:.1f} s), calibrated acc {row.cal_acc:.4f} (out err "
                f"{row.cal_out_error:.3f}, {row.cal_seconds:.1f} s)",
                flush=True,
            )
            if args.distill_epochs > 0:
                torch.manual_seed(args.seed)
                t0 = time.perf_counter()
                result = distill(
                    cal, dense, train_batches, steps=steps, lr=args.distill_lr, loss="kl",
                    progress=_common.progress_enabled(args),
                )  # fmt: skip
                row.distill_seconds = time.perf_counter() - t0
                row.distill_loss, row.distill_acc = evaluate(cal)
                print(
                    f"[{method} {budget:g}] + distillation ({result.steps} steps, KL "
                    f"{result.first_loss:.4f} -> {result.last_loss:.4f}): acc "
                    f"{row.distill_acc:.4f} ({row.distill_seconds:.1f} s)",
                    flush=True,
                )
            rows.append(row)

    meta = _common.run_metadata(args, started, "compress_pretrained.py", argv)
    meta.update(
        model="mlp",
        study="calibration",
        calibration_images=args.calibration_images,
        stats_seconds=round(stats_seconds, 2),
        distill_epochs=args.distill_epochs,
        distill_lr=args.distill_lr,
        distill_steps=steps if args.distill_epochs > 0 else 0,
        dense_acc=dense_acc,
        dense_loss=dense_loss,
        command="python examples/compress_pretrained.py " + " ".join(meta["argv"]),
    )
    table, checks = _study_table(rows, dense_acc, args)
    cap = (
        f"MLP 784-625-10 trained {args.epochs} epoch(s) (dense test accuracy {dense_acc:.4f}); "
        f"fc1 (490,000 weights) replaced, fc2 kept. Calibration: {args.calibration_images:,} "
        f"training images (statistics {stats_seconds:.2f} s, once). Distillation: "
        f"{args.distill_epochs:g} epoch ({meta['distill_steps']} steps of 64 images), KL to "
        f"the dense model's outputs, AdamW lr {args.distill_lr:g}. 'out err' is the relative "
        "error of fc1's outputs on the calibration images; times are conversion wall times "
        f"(distillation: its own column). Command: `{meta['command']}`. "
        + _common.caption(meta, len(data.train_y), len(data.test_y))
    )
    _common.print_table(table + "\n\n" + checks + "\n\n" + cap)
    stem = "compress_pretrained_mlp"
    out = _common.write_report(
        args.out_dir,
        stem,
        "Compressing a trained MLP: data-free vs calibrated vs calibrated + distilled",
        [table, checks, cap, _notes(rows)],
        {"meta": meta, "dense": {"acc": dense_acc, "loss": dense_loss, "weights": trained.weights},
         "results": [asdict(r) for r in rows]},
    )  # fmt: skip
    png = plot_study(f"{args.out_dir}/{stem}.png", rows, dense_acc, cap)
    print(f"wrote {out['md']}, {out['json']}" + (f", {png}" if png else ""), flush=True)
    return rows


def _study_table(rows: Sequence[StudyRow], dense_acc: float, args) -> tuple[str, str]:
    table_rows = [
        {
            "budget": f"{r.budget:.0%}",
            "method": r.method,
            "fc1 weights": r.weights,
            "config": r.config,
            "free acc": r.free_acc,
            "free out err": r.free_out_error,
            "free s": r.free_seconds,
            "cal acc": r.cal_acc,
            "cal out err": r.cal_out_error,
            "cal s": r.cal_seconds,
            "distilled acc": r.distill_acc,
            "distill s": r.distill_seconds,
        }
        for r in rows
    ]
    columns = [(k, k) for k in table_rows[0]] if table_rows else [("budget", "budget")]
    columns = [
        ("budget", "budget"),
        ("method", "method"),
        ("fc1 weights", "fc1 weights"),
        ("config", "config (calibrated)"),
        ("free acc", "acc data-free"),
        ("free out err", "out err data-free"),
        ("free s", "s data-free"),
        ("cal acc", "acc calibrated"),
        ("cal out err", "out err calibrated"),
        ("cal s", "s calibrated"),
        ("distilled acc", "acc + distill"),
        ("distill s", "s distill"),
    ]
    table = _common.markdown_table(table_rows, columns)
    lines = [f"Targets (dense {dense_acc:.4f}):"]
    by = {(r.budget, r.method): r for r in rows}
    for budget in args.budgets:
        here = [r for r in rows if r.budget == budget]
        if not here:
            continue
        best = max(here, key=lambda r: r.cal_acc)
        svd = by.get((budget, "lowrank"))
        line = (
            f"- {budget:.0%}: best calibrated {best.method} {best.cal_acc:.4f} "
            f"({(best.cal_acc - dense_acc) * 100:+.2f} points vs dense)"
        )
        if svd is not None:
            line += (
                f", {(best.cal_acc - svd.cal_acc) * 100:+.2f} points vs whitened SVD "
                f"({svd.cal_acc:.4f})"
            )
        distilled = [r for r in here if r.distill_acc == r.distill_acc]
        if distilled:
            top = max(distilled, key=lambda r: r.distill_acc)
            line += f"; best calibrated + distilled {top.method} {top.distill_acc:.4f}"
        lines.append(line)
    return table, "\n".join(lines)


def _notes(rows: Sequence[StudyRow]) -> str:
    notes = [f"- {r.budget:.0%}: {r.note}" for r in rows if r.method == "auto" and r.note]
    return ("`auto`'s choices (report notes):\n\n" + "\n".join(notes)) if notes else ""


def plot_study(path: str | Path, rows: Sequence[StudyRow], dense_acc: float, title: str):
    """Test accuracy against fc1's weights: data-free (open), calibrated (filled), calibrated
    + distilled (stars), one colour per method."""
    plt = _common.pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"lowrank": "tab:blue", "kronecker": "tab:orange", "cp": "tab:green",
              "auto": "tab:red"}  # fmt: skip
    for method in dict.fromkeys(r.method for r in rows):
        sub = sorted((r for r in rows if r.method == method), key=lambda r: r.weights)
        c = colors.get(method)
        ax.plot([r.free_weights for r in sub], [r.free_acc for r in sub], "o--", color=c,
                mfc="none", label=f"{method}: data-free")  # fmt: skip
        ax.plot([r.weights for r in sub], [r.cal_acc for r in sub], "o-", color=c,
                label=f"{method}: calibrated")  # fmt: skip
        if any(r.distill_acc == r.distill_acc for r in sub):
            ax.plot([r.weights for r in sub], [r.distill_acc for r in sub], "*:", color=c,
                    ms=10, label=f"{method}: calibrated + distilled")  # fmt: skip
    ax.axhline(dense_acc, color="black", ls="--", lw=1, label=f"dense ({dense_acc:.4f})")
    ax.set(xscale="log", xlabel="fc1 weights (of 490,000; log scale)", ylabel="test accuracy",
           title="MLP fc1 compressed: accuracy vs weights")  # fmt: skip
    lo = min(min(r.free_acc, r.cal_acc) for r in rows)
    ax.set_ylim(max(0.0, min(lo, 0.9) - 0.02), 1.0)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.text(0.01, 0.005, textwrap.fill(title, 190), fontsize=5)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the stack


def _decaying(out_f: int, in_f: int, g: torch.Generator, alpha: float = 0.7) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with ``s_k ∝ k^-alpha``, scaled to ``nn.Linear``'s weight norm."""
    k = min(out_f, in_f)
    u = torch.linalg.qr(torch.randn(out_f, k, generator=g))[0]
    v = torch.linalg.qr(torch.randn(in_f, k, generator=g))[0]
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -alpha
    w = (u * s) @ v.T
    return w * ((out_f / 3) ** 0.5 / w.norm())


class _Block(nn.Module):
    def __init__(self, d: int = 384, heads: int = 6, ff: int = 1536) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, t, d)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class TransformerStack(nn.Module):
    """6 encoder blocks (384 wide, 1536 feed-forward) and a pooler: 37 ``nn.Linear``."""

    def __init__(self, blocks: int = 6) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(_Block() for _ in range(blocks)))
        self.pooler = nn.Linear(384, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.pooler(self.blocks(x)[:, 0]))


def build_stack(seed: int = 0) -> TransformerStack:
    """The stack with trained-like weights (decaying spectra), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransformerStack()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(_decaying(*m.weight.shape, g))
    return model.eval()


def run_stack(args: argparse.Namespace, argv: Sequence[str] | None) -> list[dict]:
    """Convert every Linear of the stack with every method, data-free and calibrated."""
    started = time.perf_counter()
    model = build_stack(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    mix = torch.randn(384, 384, generator=g) * torch.logspace(0, -1.5, 384)
    calib = [torch.randn(10, 128, 384, generator=g) @ mix.T for _ in range(5)]
    held_out = torch.randn(16, 128, 384, generator=g) @ mix.T
    with torch.no_grad():
        ref = model(held_out)
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    print(f"stack: 37 Linear layers, {n_weights:,} weights; threads {torch.get_num_threads()}")
    rows = []
    for method in args.methods:
        for calibrated in (False, True):
            t0 = time.perf_counter()
            cal = calib if calibrated else None
            if method == "auto":
                new, report = kronlayers.compress(
                    model, "auto", budget=0.1, calibration=cal, inplace=False
                )
            else:
                new, report = kronlayers.compress(
                    model, method, rank=0.1, calibration=cal, inplace=False
                )
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                cos = float(F.cosine_similarity(new(held_out), ref).mean())
            weights = sum(
                m.num_weights() if hasattr(m, "num_weights") else m.weight.numel()
                for m in new.modules()
                if isinstance(m, nn.Linear) or hasattr(m, "num_weights")
            )
            row = {
                "method": method,
                "calibrated": calibrated,
                "seconds": round(seconds, 2),
                "converted": len(report.converted),
                "weights": weights,
                "weight fraction": weights / n_weights,
                "cosine": cos,
            }
            print(
                f"[{method} {'calibrated' if calibrated else 'data-free'}] {seconds:.1f} s, "
                f"{weights:,} weights ({weights / n_weights:.3f}), output cosine {cos:.3f}",
                flush=True,
            )
            rows.append(row)
    meta = _common.run_metadata(args, started, "compress_pretrained.py", argv)
    meta.update(
        model="stack",
        command="python examples/compress_pretrained.py " + " ".join(meta["argv"]),
        load_average=list(__import__("os").getloadavg()),
    )
    columns = [(k, k) for k in rows[0]] if rows else []
    table = _common.markdown_table(rows, columns)
    cap = (
        f"Every Linear of a 37-layer, 384-wide transformer-sized stack ({n_weights:,} weights, "
        "spectra s_k ∝ k^-0.7) converted at 10% of the weights (`rank=0.1`; `auto`: "
        "`budget=0.1`); calibration on 50 sequences x 128 tokens (included in the times); "
        "cosine: pooled outputs vs the dense model on 16 held-out sequences. "
        f"Command: `{meta['command']}`; {meta['torch_threads']} thread(s), CPU "
        f"{meta['device_name']}, load average at the end {meta['load_average'][0]:.1f} "
        f"(a shared machine); total wall time {meta['wall_seconds']} s."
    )
    _common.print_table(table + "\n\n" + cap)
    out = _common.write_report(
        args.out_dir,
        "compress_pretrained_stack",
        "Converting a transformer-sized stack: conversion time per method",
        [table, cap],
        {"meta": meta, "results": rows},
    )
    print(f"wrote {out['md']}, {out['json']}", flush=True)
    return rows


if __name__ == "__main__":
    main()
