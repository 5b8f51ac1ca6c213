"""Shared pieces of the MNIST examples: arguments, data, training loop, evaluation, reports.

Each example script builds its models and calls :func:`train_variant` for each, then
:func:`report_variants` (table, JSON, plot); this module holds everything they have in
common so that the three scripts only describe their models.

Training follows the PyTorch MNIST example: Adadelta (lr 1.0), StepLR (gamma 0.7 each
epoch), batch 64, test batch 1000, NLL loss on log-softmax outputs. Data live as tensors on
the device and each epoch visits them in a seeded random permutation (no DataLoader), which
keeps the loop lean on a small CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import platform
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
try:  # `python examples/x.py` from a checkout: the package is beside this folder.
    import kronlayers
except ImportError:  # pragma: no cover - depends on how the package is installed
    sys.path.insert(0, str(REPO_ROOT))
    import kronlayers  # noqa: F401

from kronlayers.datasets import (  # noqa: E402
    IDXFormatError,
    MNISTNotFoundError,
    MNISTSource,
    load_mnist,
    locate_mnist,
    normalize_images,
)

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"

#: The real MNIST shipped with the repository (examples/data/README.md), found from this
#: file so that the scripts work from any working directory. Used when neither --data-dir
#: nor $KRONLAYERS_DATA is given; its uncompressed SHA-256 is checked once per run, which
#: costs about 0.3 s for the 55 MB (measured), so the full check is kept.
EMBEDDED_MNIST_DIR = Path(__file__).resolve().parent / "data" / "mnist"

__all__ = [
    "Data",
    "VariantResult",
    "add_common_args",
    "count_parameters",
    "count_weights",
    "evaluate",
    "load_data",
    "load_results",
    "locate_data",
    "make_optimizer",
    "make_parser",
    "markdown_table",
    "parse_args",
    "parse_variants",
    "plot_training",
    "print_table",
    "pyplot",
    "report_variants",
    "resolve_device",
    "torch_threads",
    "train_epoch",
    "train_variant",
    "write_report",
]


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    variants: Sequence[str] | None,
    default_variants: Sequence[str] | None = None,
    epochs: int = 3,
    limit_train: int | None = None,
    threads: int | None = None,
) -> None:
    """Add the flags every example shares.

    Args:
        parser: the script's parser.
        variants: the variant names the script knows (``None``: no ``--variants`` flag).
        default_variants: the variants run by default (default: all of ``variants``).
        epochs: default of ``--epochs``.
        limit_train: default of ``--limit-train`` (``None``: the full 60,000 images).
        threads: default of ``--threads`` (``None``: torch's choice).
    """
    g = parser.add_argument_group("common options")
    g.add_argument(
        "--data-dir",
        default=None,
        help="directory of the four MNIST IDX files (raw or .gz); default: $KRONLAYERS_DATA "
        "if set, else the copy in examples/data/mnist (SHA-256 checked), else "
        "~/.cache/kronlayers/mnist (downloaded there if missing)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        help="download missing MNIST files into --data-dir or $KRONLAYERS_DATA (MD5-checked)",
    )
    g.add_argument(
        "--epochs", type=_positive_int, default=epochs, help=f"epochs (default {epochs})"
    )
    if variants is not None:
        default = list(default_variants if default_variants is not None else variants)
        g.add_argument(
            "--variants",
            nargs="+",
            default=default,
            metavar="NAME",
            help="variants to run (space- or comma-separated), from: "
            + ", ".join(variants)
            + f" (default: {' '.join(default)})",
        )
    g.add_argument(
        "--device",
        default="auto",
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )
    g.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    g.add_argument(
        "--limit-train",
        type=_positive_int,
        default=limit_train,
        metavar="N",
        help="train on a seeded random subset of N training images (default: "
        + ("all 60,000" if limit_train is None else f"{limit_train}")
        + ")",
    )
    g.add_argument(
        "--limit-test",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate on the first N test images (default: all 10,000)",
    )
    g.add_argument("--batch-size", type=_positive_int, default=64, help="default 64")
    g.add_argument("--test-batch-size", type=_positive_int, default=1000, help="default 1000")
    g.add_argument("--lr", type=_positive_float, default=1.0, help="Adadelta lr (default 1.0)")
    g.add_argument(
        "--gamma", type=_positive_float, default=0.7, help="StepLR decay per epoch (default 0.7)"
    )
    g.add_argument(
        "--out-dir",
        default=str(DEFAULT_OUT_DIR),
        help="where the table (.md, .json) and plot (.png) go (default: examples/out)",
    )
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=threads,
        help="CPU threads for torch (default: "
        + ("torch's choice, the core count" if threads is None else str(threads))
        + "); batch-64 MLP steps gain little from more, and on a busy CPU extra threads can "
        "be many times slower (OpenMP oversubscription)",
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bars (off anyway if not a TTY)"
    )


def make_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the script's docstring and default-showing help."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_variants(
    parser: argparse.ArgumentParser, requested: Sequence[str], known: Sequence[str]
) -> list[str]:
    """Split comma-separated names, drop duplicates, and reject unknown ones via ``parser``."""
    names: list[str] = []
    for item in requested:
        for name in item.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(
            f"argument --variants: unknown variant(s) {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(known)}"
        )
    if not names:
        parser.error("argument --variants: no variant given")
    return names


def resolve_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``--device`` as a ``torch.device``; ``auto`` picks CUDA when available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"argument --device: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(
                f"argument --device: {name!r} but only {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        parser.error(f"argument --device: only cpu and cuda are supported, got {name!r}")
    return device


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    *,
    known_variants: Sequence[str] | None = None,
) -> argparse.Namespace:
    """Parse ``argv`` and check what argparse cannot: variants, device, data directory.

    Adds ``args.device_obj`` (a ``torch.device``); ``args.variants`` becomes a list of
    known names. Bad values end the program with exit status 2 and a message naming the flag.
    """
    args = parser.parse_args(argv)
    if known_variants is not None:
        args.variants = parse_variants(parser, args.variants, known_variants)
    args.device_obj = resolve_device(parser, args.device)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir() and not args.download:
            parser.error(
                f"argument --data-dir: {args.data_dir!r} is not a directory (put the four MNIST "
                "IDX files there, or add --download to fetch them)"
            )
    return args


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (unchanged if ``None``), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- data


@dataclass
class Data:
    """MNIST on the training device.

    Attributes:
        train_x: ``float32`` ``(N_train, 1, 28, 28)``, normalized.
        train_y: ``int64`` ``(N_train,)``.
        test_x: ``float32`` ``(N_test, 1, 28, 28)``, normalized.
        test_y: ``int64`` ``(N_test,)``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def locate_data(args: argparse.Namespace) -> MNISTSource:
    """Where MNIST is read from, printed as one line (``MNIST: embedded copy at ...``).

    The first that applies: ``--data-dir``; ``$KRONLAYERS_DATA``; the copy shipped in
    :data:`EMBEDDED_MNIST_DIR` (SHA-256 checked); the download cache
    ``~/.cache/kronlayers/mnist`` (downloaded there, MD5-checked, if missing). A missing or
    damaged data set ends the program with a message saying what to do.
    """
    # --download forces a download into --data-dir or $KRONLAYERS_DATA; without it, only
    # the cache directory is filled automatically (locate_mnist's download=None).
    try:
        source = locate_mnist(
            args.data_dir,
            bundled=EMBEDDED_MNIST_DIR,
            download=True if args.download else None,
            data_dir_label="--data-dir",
            bundled_label="embedded copy",
        )
    except (MNISTNotFoundError, IDXFormatError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"MNIST: {source.description}", flush=True)
    return source


def load_data(args: argparse.Namespace) -> Data:
    """Load, normalize and move MNIST to ``args.device_obj``, honouring the ``--limit-*``.

    The data come from :func:`locate_data` (which prints their source).
    ``--limit-train N`` takes a random subset drawn with ``--seed`` (so it is the same for
    every variant); ``--limit-test N`` the first ``N`` test images. A missing data set ends
    the program with a message saying where to put the files.
    """
    source = locate_data(args)
    try:
        train_images, train_labels = load_mnist("train", source.root, download=False)
        test_images, test_labels = load_mnist("test", source.root, download=False)
    except (MNISTNotFoundError, IDXFormatError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.limit_train is not None and args.limit_train < len(train_labels):
        g = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(train_labels), generator=g)[: args.limit_train]
        train_images, train_labels = train_images[keep], train_labels[keep]
    if args.limit_test is not None:
        test_images, test_labels = test_images[: args.limit_test], test_labels[: args.limit_test]
    dev = args.device_obj
    return Data(
        normalize_images(train_images).to(dev),
        train_labels.to(dev),
        normalize_images(test_images).to(dev),
        test_labels.to(dev),
    )


# --------------------------------------------------------------------------- training


def count_weights(model: nn.Module) -> int:
    """Number of weight parameters: every parameter except those named ``bias``."""
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] != "bias")


def count_parameters(model: nn.Module) -> int:
    """Number of all parameters, biases included."""
    return sum(p.numel() for p in model.parameters())


def _progress(iterable, *, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bars without it
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Bars only on an interactive terminal and without ``--no-progress``."""
    return not args.no_progress and sys.stderr.isatty()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    desc: str = "train",
    progress: bool = False,
) -> float:
    """One pass over ``(x, y)`` in the order of a permutation drawn from ``generator``.

    Args:
        model: maps ``x[idx]`` to log-probabilities ``(B, 10)``.
        optimizer: stepped once per batch.
        x: inputs ``(N, ...)``; y: labels ``(N,)``, on the model's device.
        batch_size: examples per step (the last batch may be smaller).
        generator: CPU generator for the permutation (seeded by the caller).

    Returns:
        The mean training NLL loss over the epoch.
    """
    model.train()
    n = y.shape[0]
    perm = torch.randperm(n, generator=generator).to(y.device)
    total = torch.zeros((), device=y.device)
    steps = range(0, n, batch_size)
    for start in _progress(steps, total=len(steps), desc=desc, enabled=progress):
        idx = perm[start : start + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += loss.detach() * idx.numel()
    return float(total) / n


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean NLL loss and accuracy of ``model`` on ``(x, y)`` (eval mode, no grad).

    Returns:
        ``(loss, accuracy)`` with accuracy in [0, 1].
    """
    model.eval()
    loss = torch.zeros((), device=y.device, dtype=torch.float64)
    correct = torch.zeros((), device=y.device, dtype=torch.int64)
    for start in range(0, y.shape[0], batch_size):
        out = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.nll_loss(out, target, reduction="sum").double()
        correct += (out.argmax(dim=1) == target).sum()
    n = y.shape[0]
    return float(loss) / n, int(correct) / n


@dataclass
class VariantResult:
    """What one trained variant reports.

    ``history`` has one dict per epoch: ``epoch``, ``train_loss``, ``test_loss``,
    ``test_acc``, ``seconds`` (training time of that epoch, evaluation excluded).
    """

    name: str
    description: str
    weights: int
    parameters: int
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    seconds_per_epoch: float = float("nan")
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)


def make_optimizer(
    model: nn.Module, args: argparse.Namespace
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adadelta(lr) and StepLR(step 1, gamma) as in the PyTorch MNIST example."""
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)


def train_variant(
    name: str,
    description: str,
    build: Callable[[], nn.Module],
    data: Data,
    args: argparse.Namespace,
    *,
    epochs: int | None = None,
    model: nn.Module | None = None,
) -> tuple[VariantResult, nn.Module]:
    """Seed, build (unless ``model`` is given), train for ``epochs`` and evaluate each epoch.

    The seed is reset before building, so each variant gets the same initialization and
    batch order whatever else runs before it.

    Returns:
        The result (final accuracy/loss, mean training seconds per epoch, history) and the
        trained model.
    """
    epochs = args.epochs if epochs is None else epochs
    torch.manual_seed(args.seed)
    if model is None:
        model = build()
    model = model.to(args.device_obj)
    result = VariantResult(name, description, count_weights(model), count_parameters(model))
    optimizer, scheduler = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(args.seed)
    progress = progress_enabled(args)
    for epoch in range(1, epochs + 1):
        _sync(args.device_obj)
        t0 = time.perf_counter()
        train_loss = train_epoch(
            model,
            optimizer,
            data.train_x,
            data.train_y,
            batch_size=args.batch_size,
            generator=generator,
            desc=f"{name} {epoch}/{epochs}",
            progress=progress,
        )
        _sync(args.device_obj)
        seconds = time.perf_counter() - t0
        scheduler.step()
        test_loss, test_acc = evaluate(
            model, data.test_x, data.test_y, batch_size=args.test_batch_size
        )
        result.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "seconds": seconds,
            }
        )
        print(
            f"[{name}] epoch {epoch}/{epochs}: train loss {train_loss:.4f}, "
            f"test loss {test_loss:.4f}, test acc {test_acc:.4f} ({seconds:.1f} s)",
            flush=True,
        )
    if result.history:
        result.test_acc = result.history[-1]["test_acc"]
        result.test_loss = result.history[-1]["test_loss"]
        result.seconds_per_epoch = sum(h["seconds"] for h in result.history) / epochs
    return result, model


# --------------------------------------------------------------------------- reports


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows``; ``columns`` are ``(key, header)`` pairs.

    Numbers are right-aligned, ints with thousands separators, floats with 4 decimals.
    """
    headers = [h for _, h in columns]
    cells = [[_fmt(row.get(k, "")) for k, _ in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(k), int | float) for row in rows) and bool(rows) for k, _ in columns
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2))
        for w, num in zip(widths, numeric, strict=True)
    )
    return "\n".join([line(headers), sep + "|", *(line(c) for c in cells)])


RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("name", "variant"),
    ("weights", "weights"),
    ("test_acc", "test accuracy"),
    ("test_loss", "test loss"),
    ("seconds_per_epoch", "s/epoch"),
    ("description", "description"),
)


def print_table(text: str) -> None:
    """Print a table with a blank line before it."""
    print("\n" + text, flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_metadata(
    args: argparse.Namespace, started: float, script: str, argv: Sequence[str] | None
) -> dict[str, object]:
    """The settings a result depends on (for the JSON file and the table's caption)."""
    return {
        "script": script,
        "argv": list(sys.argv[1:] if argv is None else argv),
        "epochs": args.epochs,
        "device": str(args.device_obj),
        "device_name": (
            torch.cuda.get_device_name(args.device_obj)
            if args.device_obj.type == "cuda"
            else _cpu_name()
        ),
        "torch_threads": torch.get_num_threads(),
        "seed": args.seed,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "batch_size": args.batch_size,
        "test_batch_size": args.test_batch_size,
        "lr": args.lr,
        "gamma": args.gamma,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def caption(meta: dict[str, object], n_train: int, n_test: int) -> str:
    """One line saying how a table was measured."""
    return (
        f"MNIST, {meta['epochs']} epoch(s) on {n_train:,} training images, tested on "
        f"{n_test:,}; device {meta['device']} ({meta['torch_threads']} threads), seed "
        f"{meta['seed']}, torch {meta['torch']}; total wall time {meta['wall_seconds']} s."
    )


def write_report(
    out_dir: str | Path,
    stem: str,
    title: str,
    tables: Sequence[str],
    payload: dict[str, object],
) -> dict[str, Path]:
    """Write ``<stem>.md`` (title and tables) and ``<stem>.json`` (``payload``) in ``out_dir``.

    Returns:
        ``{"md": path, "json": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    md.write_text(f"# {title}\n\n" + "\n\n".join(tables) + "\n", encoding="utf-8")
    js = out / f"{stem}.json"
    js.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")
    return {"md": md, "json": js}


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def result_rows(results: Sequence[VariantResult]) -> list[dict[str, object]]:
    """Results as dicts (the JSON form, history included)."""
    return [asdict(r) for r in results]


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend, or ``None`` (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plot written (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    return plt


def load_results(path: str | Path) -> tuple[dict[str, object], list[VariantResult]]:
    """Read a ``<stem>.json`` written by :func:`report_variants`: ``(meta, results)``."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    return payload["meta"], [VariantResult(**r) for r in payload["results"]]


def plot_training(path: str | Path, results: Sequence[VariantResult], title: str) -> Path | None:
    """Three panels: test accuracy per epoch, test loss per epoch, accuracy vs weights (log x).

    Accuracies use a logit y axis, which spreads 0.5, 0.9, 0.99 evenly so that a weak
    baseline and the 98 % models are both readable.

    Returns:
        The PNG's path, or ``None`` without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    cmap = plt.get_cmap("tab10" if len(results) <= 10 else "tab20")
    for i, r in enumerate(results):
        color = cmap(i % cmap.N)
        epochs = [h["epoch"] for h in r.history]
        label = f"{r.name} ({r.weights:,})"
        style = {"marker": "o", "ms": 3, "color": color, "label": label}
        axes[0].plot(epochs, [h["test_acc"] for h in r.history], **style)
        axes[1].plot(epochs, [h["test_loss"] for h in r.history], **style)
        axes[2].scatter([r.weights], [r.test_acc], color=color, s=40, zorder=3)
    # Labels alternate above/below in order of weight count, so that neighbours don't overlap.
    for k, r in enumerate(sorted(results, key=lambda r: (r.weights, r.test_acc))):
        axes[2].annotate(
            r.name,
            (r.weights, r.test_acc),
            textcoords="offset points",
            xytext=(5, 5 if k % 2 == 0 else -12),
            fontsize=8,
        )
    dense = next((r for r in results if r.name == "dense"), None)
    if dense is not None:
        axes[2].axhline(dense.test_acc, color="gray", ls="--", lw=1, label="dense accuracy")
        axes[2].legend(fontsize=8, loc="lower right")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    acc_ticks = [0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
    for ax in (axes[0], axes[2]):
        ax.set_yscale("logit", nonpositive="clip")
        ax.yaxis.set_major_locator(FixedLocator(acc_ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    axes[0].set(xlabel="epoch", ylabel="test accuracy (logit scale)", title="test accuracy")
    axes[1].set(xlabel="epoch", ylabel="test loss (NLL)", title="test loss")
    axes[1].set_yscale("log")
    axes[2].set(
        xlabel="weights (biases excluded, log scale)",
        ylabel="final test accuracy (logit scale)",
        title="accuracy vs weights",
    )
    axes[2].set_xscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(textwrap.fill(title, 160), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_variants(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    started: float,
    data: Data,
    results: Sequence[VariantResult],
    *,
    script: str,
    stem: str,
    title: str,
    extra_columns: Sequence[tuple[str, str]] = (),
    final: bool = True,
) -> tuple[str, dict[str, Path | None]]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` for the variants trained so far.

    Called after every variant (``final=False``: the caption says how many of the requested
    variants are done, so an interrupted run still leaves its numbers) and once at the end.

    Args:
        extra_columns: ``(key, header)`` of per-variant numbers in ``VariantResult.extra``
            shown after the weight count (e.g. per-layer weights).

    Returns:
        ``(table and caption as Markdown, {"md", "json", "png"} paths)``.
    """
    meta = run_metadata(args, started, script, argv)
    meta["variants_done"] = len(results)
    meta["variants_requested"] = list(args.variants)
    rows = [{**r.__dict__, **r.extra} for r in results]
    columns = (
        ("name", "variant"),
        ("weights", "weights"),
        *extra_columns,
        ("test_acc", "test accuracy"),
        ("test_loss", "test loss"),
        ("seconds_per_epoch", "s/epoch"),
        ("description", "description"),
    )
    table = markdown_table(rows, columns)
    cap = caption(meta, len(data.train_y), len(data.test_y))
    if not final:
        cap += f" PARTIAL: {len(results)} of {len(args.variants)} variants done."
    paths: dict[str, Path | None] = dict(
        write_report(
            args.out_dir,
            stem,
            title,
            [table, cap],
            {"meta": meta, "results": result_rows(results)},
        )
    )
    paths["png"] = plot_training(Path(args.out_dir) / f"{stem}.png", results, f"{title} — {cap}")
    return table + "\n\n" + cap, paths


def run_variant_study(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    variants: dict[str, tuple[str, Callable[[], nn.Module]]],
    *,
    layers: Sequence[str],
    script: str,
    stem: str,
    title: str,
) -> list[VariantResult]:
    """Train every requested variant in turn and write the reports after each one.

    Args:
        variants: name -> ``(description, build)``, ``build()`` returning a fresh model.
        layers: attribute names of the model's layers whose weight counts become extra
            columns ``<layer>_weights`` of the table.

    Returns:
        One result per variant, in the order run.
    """
    started = time.perf_counter()
    data = load_data(args)
    print(
        f"MNIST: {len(data.train_y):,} training / {len(data.test_y):,} test images; "
        f"device {args.device_obj}; {args.epochs} epoch(s); variants: {', '.join(args.variants)}",
        flush=True,
    )
    results: list[VariantResult] = []

    def report(final: bool) -> tuple[str, dict]:
        return report_variants(
            args,
            argv,
            started,
            data,
            results,
            script=script,
            stem=stem,
            title=title,
            extra_columns=tuple((f"{layer}_weights", layer) for layer in layers),
            final=final,
        )

    for name in args.variants:
        description, build = variants[name]
        result, model = train_variant(name, description, build, data, args)
        for layer in layers:
            result.extra[f"{layer}_weights"] = count_weights(getattr(model, layer))
        results.append(result)
        if len(results) < len(args.variants):
            report(final=False)

    text, paths = report(final=True)
    print_table(text)
    print("wrote " + ", ".join(str(p) for p in paths.values() if p is not None), flush=True)
    return results
