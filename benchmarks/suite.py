"""The benchmark suite: every layer against dense layers and its peers, one command.

    python -m benchmarks [--device cuda] [--quick] [--no-memory] [--no-plots]

For each configuration the layers below are timed in the same process with their calls
interleaved round by round (``benchmarks._harness``), forward (under ``no_grad``) and
forward+backward, and compared with the dense layer and the peer a user would pick instead:

- ``nn.Linear`` / ``nn.Conv2d``: the dense layers;
- every layer of :mod:`kronlayers.registry` that replaces them, built with ``Layer.like`` at
  its ``typical_rank`` (or the swept rank) and the configuration ``compress_config`` picks;
- peers holding the same factors: TensorLy-Torch's ``FactorizedLinear`` / ``FactorizedConv``
  (``implementation='factorized'``) for every layer with a ``to_tltorch``, and FastKron
  (``pyfastkron``, optional, install with ``--no-deps``) for the ``kronecker`` method.

A new registered layer gets its rows (and its TensorLy-Torch peer) without editing this file.

FLOPs are analytic forward FLOPs (2 per multiply-add) of each kernel; "% peak" divides the
achieved forward GFLOP/s by the machine's dense-matmul GFLOP/s measured in the same run.
Peak memory of forward+backward: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the
growth of the max resident set size of a fresh subprocess running one forward+backward.

Writes ``benchmarks/results/<device>.md`` and ``.json`` and PNG plots beside them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import (
    RESULTS,
    dense_matmul_gflops,
    environment,
    interleaved_medians,
    markdown_table,
    peak_cuda_memory,
)
from kronlayers.modules import NotCompressible
from kronlayers.registry import registered_layers

try:  # optional peer
    from pyfastkron import fastkrontorch as _fastkron
except ImportError:  # pragma: no cover - depends on the environment
    _fastkron = None


# ----------------------------------------------------------------------------- layers


class _FastKronLinear(nn.Module):
    """FastKron's X @ (G_1 ⊗ G_2) with the factors of a rank-1 Kronecker layer (G_k = F_k^T)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fs = nn.ParameterList(
            [nn.Parameter(f[0].detach().T.contiguous()) for f in layer.factors]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # FastKron accepts exact torch.Tensor only, not Parameter subclasses: pass views.
        return _fastkron.gemkm(x, [p.view_as(p) for p in self.fs])


def tltorch_usable() -> bool:
    """Whether TensorLy-Torch's factorized layers can be timed safely here.

    Its factorized CP forward is one ``torch.einsum`` over all factors; without
    ``opt_einsum`` torch contracts it left to right through an intermediate of
    ``N * in * R * out`` entries (tens of GB for a 1024 x 1024 layer: the process gets
    killed). ``benchmarks/bench_cp_linear.py`` measures that case with a size guard; the
    suite leaves tltorch out instead.
    """
    return torch.backends.opt_einsum.is_available() and torch.backends.opt_einsum.enabled


def _rank_text(rank: object) -> str:
    return str(rank).replace(" ", "")


def factorized_layers(
    dense: nn.Module, batch_flops: tuple[int, ...], rank: object | None, device: str
) -> dict[str, tuple]:
    """name -> (module, weights, forward FLOPs) for ``dense`` and every registered layer that
    replaces it (at its ``typical_rank``, or ``rank``), plus the peers; ``batch_flops`` is the
    input shape the FLOPs are counted for. Layers for which no configuration at that rank is
    smaller than ``dense`` are left out."""
    torch.manual_seed(0)
    layers = {
        f"nn.{type(dense).__name__}": (
            dense,
            dense.weight.numel(),
            _dense_flops(dense, batch_flops),
        )
    }
    for cls in registered_layers():
        if not isinstance(dense, cls.dense_type):
            continue
        r = cls.typical_rank(dense) if rank is None else rank
        try:
            options = cls.compress_config(dense, r)
        except NotCompressible:
            continue
        layer = cls.like(dense, device=device, **options)
        name = f"{cls.__name__} r={_rank_text(layer.rank)}"
        flops = layer.flops(batch_flops)
        layers[name] = (layer, layer.num_weights(), flops)
        if hasattr(layer, "to_tltorch") and tltorch_usable():
            try:
                peer = layer.to_tltorch().to(device)
            except ValueError:  # a configuration TensorLy-Torch cannot express
                peer = None
            if peer is not None:
                peer_name = f"tltorch {cls.method} r={_rank_text(layer.rank)}"
                layers[peer_name] = (peer, layer.num_weights(), flops)
        if cls.method == "kronecker" and _fastkron is not None and layer.rank == 1:
            layers["FastKron"] = (_FastKronLinear(layer), layer.num_weights(), flops)
    return layers


def _dense_flops(dense: nn.Module, shape: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense(torch.zeros(shape, device=dense.weight.device))
    return counter.get_total_flops()


def linear_layers(n: int, batch: int, rank: object | None, device: str) -> dict[str, tuple]:
    """name -> (module, params, forward FLOPs) for an n x n linear layer at ``batch`` rows."""
    torch.manual_seed(0)
    dense = nn.Linear(n, n, bias=False, device=device)
    return factorized_layers(dense, (batch, n), rank, device)


def conv_layers(c: int, k: int, hw: int, batch: int, rank: object | None, device: str) -> dict:
    """name -> (module, params, forward FLOPs) for a c -> c k x k 'same' convolution."""
    torch.manual_seed(0)
    dense = nn.Conv2d(c, c, k, padding=k // 2, bias=False, device=device)
    return factorized_layers(dense, (batch, c, hw, hw), rank, device)


# ----------------------------------------------------------------------------- timing


def time_layers(
    layers: dict[str, tuple], x: torch.Tensor, device: str, rounds: int, min_run: float
) -> dict[str, dict[str, float]]:
    xg = x.clone().requires_grad_()
    fwd: dict[str, Callable] = {}
    fwdbwd: dict[str, Callable] = {}
    for name, (module, _, _) in layers.items():

        def f(m=module):
            with torch.no_grad():
                return m(x)

        def fb(m=module):
            m(xg).sum().backward()

        fwd[name], fwdbwd[name] = f, fb
    t_f = interleaved_medians(fwd, device=device, rounds=rounds, min_run_time=min_run)
    t_fb = interleaved_medians(fwdbwd, device=device, rounds=rounds, min_run_time=min_run)
    out = {name: {"fwd": t_f[name], "fwdbwd": t_fb[name]} for name in layers}
    if device.startswith("cuda"):
        for name in layers:
            out[name]["peak_bytes"] = peak_cuda_memory(fwdbwd[name])
    return out


def rows_for(
    group: str,
    config: str,
    layers: dict[str, tuple],
    times: dict[str, dict[str, float]],
    peak: float,
    extra: dict | None = None,
) -> list[dict]:
    dense_name = next(iter(layers))
    rows = []
    for name, (_, params, flops) in layers.items():
        t = times[name]
        peer = _peer_of(name, layers)
        row = {
            "group": group,
            "config": config,
            "layer": name,
            "params": params,
            "GFLOP fwd": flops / 1e9,
            "fwd ms": t["fwd"] * 1e3,
            "fwd+bwd ms": t["fwdbwd"] * 1e3,
            "fwd/dense": t["fwd"] / times[dense_name]["fwd"],
            "fwd+bwd/dense": t["fwdbwd"] / times[dense_name]["fwdbwd"],
            "fwd+bwd/peer": (t["fwdbwd"] / times[peer]["fwdbwd"]) if peer else "",
            "GFLOP/s": flops / t["fwd"] / 1e9,
            "flop ratio": flops / layers[dense_name][2],
            "% peak": 100 * flops / t["fwd"] / 1e9 / peak,
            **(extra or {}),
        }
        if "peak_bytes" in t:
            row["peak MiB"] = t["peak_bytes"] / 2**20
        rows.append(row)
    return rows


def _peer_of(name: str, layers: dict) -> str | None:
    """The peer row of a kronlayers row: FastKron for a rank-1 Kronecker layer, else the
    TensorLy-Torch layer built from it (the row added right after it)."""
    names = list(layers)
    if name.startswith(("nn.", "tltorch", "FastKron")):
        return None
    if "FastKron" in layers and layers[name][0].__class__.method == "kronecker":
        return "FastKron"
    nxt = names.index(name) + 1
    return names[nxt] if nxt < len(names) and names[nxt].startswith("tltorch") else None


# ----------------------------------------------------------------------------- targets


def _pick(layers: dict, prefix: str) -> str | None:
    return next((n for n in layers if n.startswith(prefix)), None)


def target_rows(device: str, quick: bool, rounds: int, min_run: float, peak: float) -> list:
    """Rows of the configurations the performance targets name, measured in this run."""
    torch.manual_seed(0)
    rows: list[dict] = []
    n_big = 1024 if quick else 4096
    specs = [
        ("tiny", linear_layers(256, 1, None, device), (1, 256)),
        ("kron-big", linear_layers(n_big, 256, 1, device), (256, n_big)),
        ("cp-1024-r64", linear_layers(1024, 256, 64, device), (256, 1024)),
    ]
    c, hw, b = (16, 16, 4) if quick else (64, 32, 32)
    specs.append(("conv-r32", conv_layers(c, 3, hw, b, max(4, c // 2), device), (b, c, hw, hw)))
    # High ranks, as compress(rank=0.5) picks them (half the dense weights): the cases in
    # which the factorized kernels cost more than the dense layer and the dispatcher must
    # fall back to it.
    torch.manual_seed(0)
    wide = nn.Linear(384, 1536, bias=False, device=device)
    rows_hr = 64 if quick else 256
    specs.append(
        ("high-rank", factorized_layers(wide, (rows_hr, 384), 0.5, device), (rows_hr, 384))
    )
    specs.append(("high-rank", conv_layers(c, 3, hw, b, 0.5, device), (b, c, hw, hw)))
    for tag, layers, shape in specs:
        x = torch.randn(shape, device=device)
        times = time_layers(layers, x, device, rounds, min_run)
        cfg = "x".join(map(str, shape))
        rows += rows_for("targets", f"{tag} {cfg}", layers, times, peak, {"tag": tag})
    return rows


def target_table(target: list[dict], grid: list[dict]) -> list[dict]:
    """Each target, the measured figure, met or not (ratios from the same run)."""
    out: list[dict] = []

    def add(name: str, figure: float | None, goal: float, note: str = "") -> None:
        met = "n/a" if figure is None else ("yes" if figure <= goal else "no")
        fig = "not measured" if figure is None else f"{figure:.3g}"
        out.append({"target": name, "figure": fig, "goal": f"<= {goal:g}", "met": met, "": note})

    def rows_of(tag: str) -> list[dict]:
        return [r for r in target if r.get("tag") == tag]

    for r in rows_of("tiny"):
        if r["layer"].startswith(("nn.", "tltorch", "FastKron")):
            continue
        add(f"{r['layer']} 256x256 batch 1, fwd / nn.Linear", r["fwd/dense"], 2.0)
        add(f"{r['layer']} 256x256 batch 1, fwd+bwd / nn.Linear", r["fwd+bwd/dense"], 2.0)
    kron = next((r for r in rows_of("kron-big") if r["layer"].startswith("Kronecker")), None)
    if kron is not None:
        add(f"{kron['config']} {kron['layer']} fwd / dense", kron["fwd/dense"], 0.04)
        fk = next((r for r in rows_of("kron-big") if r["layer"] == "FastKron"), None)
        figure = kron["fwd+bwd ms"] / fk["fwd+bwd ms"] if fk else None
        add(
            f"{kron['config']} {kron['layer']} fwd+bwd / FastKron",
            figure,
            1.0,
            "" if fk else "pyfastkron not installed",
        )
    for tag, prefix, peer, goal in (
        ("cp-1024-r64", "CPLinear", "tltorch cp", 0.5),
        ("conv-r32", "CPConv2d", "tltorch cp", 0.33),
        ("conv-r32", "TuckerConv2d", "tltorch tucker", 1.0),
    ):
        sel = rows_of(tag)
        ours = next((r for r in sel if r["layer"].startswith(prefix)), None)
        theirs = next((r for r in sel if r["layer"].startswith(peer)), None)
        if ours is None:
            continue
        figure = ours["fwd+bwd ms"] / theirs["fwd+bwd ms"] if theirs else None
        add(f"{ours['config']} {ours['layer']} fwd+bwd / {peer}", figure, goal)
    for r in rows_of("high-rank"):
        if not r["layer"].startswith(("nn.", "tltorch", "FastKron")):
            add(f"{r['config']} {r['layer']} (rank=0.5) fwd+bwd / dense", r["fwd+bwd/dense"], 1.5)
    ours = [r for r in grid + target if not r["layer"].startswith(("nn.", "tltorch", "FastKron"))]
    cheap = [r for r in ours if r.get("flop ratio", 1.0) <= 0.25]
    for key in ("fwd/dense", "fwd+bwd/dense"):
        if cheap:
            worst = max(cheap, key=lambda r: r[key])
            add(
                f"worst {key} where FLOPs <= 1/4 dense",
                worst[key],
                1.0,
                f"{worst['config']} {worst['layer']}",
            )
        if ours:
            worst = max(ours, key=lambda r: r[key])
            add(f"worst {key} anywhere", worst[key], 1.5, f"{worst['config']} {worst['layer']}")
    out.append(
        {
            "target": "ks_project_diag / kron_sum_diag",
            "figure": "see kron_sum_cpu.md",
            "goal": "<= 0.5x stride trick; <= 1.2x fill",
            "met": "see there",
            "": "python -m benchmarks.bench_kron_sum",
        }
    )
    return out


# ----------------------------------------------------------------------------- memory (CPU)


def _memory_child(spec: dict) -> None:
    """Run in a fresh interpreter: build one layer, report max-RSS growth of a fwd+bwd."""
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "linear":
        layers = linear_layers(spec["n"], spec["batch"], spec["rank"], "cpu")
        x = torch.randn(spec["batch"], spec["n"])
    else:
        layers = conv_layers(spec["c"], spec["k"], spec["hw"], spec["batch"], spec["rank"], "cpu")
        x = torch.randn(spec["batch"], spec["c"], spec["hw"], spec["hw"])
    # The other layers are freed before the peak is reset below, so they do not count.
    module = layers.pop(spec["layer"])[0]
    del layers
    x.requires_grad_()
    # A first pass allocates the libraries' lazy workspaces; measure the second, with the
    # gradients freed again so that they are allocated inside the measured pass.
    module(x).sum().backward()
    module.zero_grad(set_to_none=True)
    x.grad = None
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so the
    # peak measured next is that of the forward+backward alone, not of imports and set-up.
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kib("VmRSS")
        module(x).sum().backward()
        after = _proc_status_kib("VmHWM")
    except OSError:  # no procfs: the never-reset high-water mark, which set-up may hide
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        module(x).sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kib": after - before}))


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def cpu_peak_memory(spec: dict) -> float:
    """MiB of resident-set growth of one forward+backward, in a fresh subprocess."""
    spec = {**spec, "threads": torch.get_num_threads()}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--memory-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["kib"] / 1024


# ----------------------------------------------------------------------------- plots


def plot(rows: list[dict], device: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    lin = [r for r in rows if r["group"] == "linear" and r.get("batch") == max_batch(rows)]
    if lin:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key in zip(axes, ["fwd ms", "fwd+bwd ms"], strict=True):
            for layer in _series(lin):
                pts = [(r["n"], r[key]) for r in lin if _family(r["layer"]) == layer]
                ax.plot(*zip(*pts, strict=True), marker="o", label=layer)
            ax.set(xscale="log", yscale="log", xlabel="features (in = out)", ylabel=key)
            ax.set_title(f"linear, batch {max_batch(rows)}: {key.split()[0]}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{device}_linear_time.png"))
    ranks = [r for r in rows if r["group"].startswith("rank")]
    if ranks:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, group in zip(axes, ["rank-linear", "rank-conv"], strict=True):
            sel = [r for r in ranks if r["group"] == group]
            for layer in _series(sel):
                pts = [(r["rank"], r["fwd+bwd ms"]) for r in sel if _family(r["layer"]) == layer]
                ax.plot(*zip(*pts, strict=True), marker="o", label=layer)
            cfg = sel[0]["config"] if sel else ""
            ax.set(xscale="log", yscale="log", xlabel="rank", ylabel="fwd+bwd ms")
            ax.set_title(f"{group}: {cfg}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{device}_rank_time.png"))
    mem = [r for r in rows if r.get("peak MiB") not in (None, "")]
    if mem:
        fig, ax = plt.subplots(figsize=(11, 4))
        labels = [f"{r['config']}\n{r['layer']}" for r in mem]
        ax.bar(range(len(mem)), [r["peak MiB"] for r in mem])
        ax.set_xticks(range(len(mem)), labels, rotation=90, fontsize=6)
        ax.set(ylabel="peak MiB of fwd+bwd", yscale="log")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{device}_memory.png"))
    return paths


def max_batch(rows: list[dict]) -> int:
    return max((r.get("batch", 0) for r in rows if r["group"] == "linear"), default=0)


def _family(layer: str) -> str:
    return layer.split(" r=")[0]


def _series(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(_family(r["layer"]) for r in rows))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def run(
    device: str,
    quick: bool,
    memory: bool,
    plots: bool,
    out_dir: Path = RESULTS,
    command: str | None = None,
) -> Path:
    rounds, min_run = (2, 0.01) if quick else (3, 0.05)
    if device.startswith("cuda"):
        min_run /= 2  # GPU calls are short; 25 ms of repeats per sample is plenty
    peak = dense_matmul_gflops(device, n=512 if quick else 2048)
    lin_sizes = [256, 1024] if quick else [256, 1024, 4096, 8192]
    batches = [32] if quick else [1, 32, 256]
    conv_cfgs = (
        [(16, 3, 16)]
        if quick
        else [(c, k, hw) for c in (16, 64, 256) for k in (3, 5) for hw in (32, 64)]
    )
    conv_batch = 2 if quick else 8
    rows: list[dict] = []
    targets: list[dict] = []
    interrupted = False
    try:
        targets = target_rows(device, quick, rounds, min_run, peak)
        print("target configurations done", flush=True)
        for n in lin_sizes:
            for b in batches:
                layers = linear_layers(n, b, None, device)
                x = torch.randn(b, n, device=device)
                times = time_layers(layers, x, device, rounds, min_run)
                rows += rows_for(
                    "linear", f"{n}x{n} b{b}", layers, times, peak, {"n": n, "batch": b}
                )
                print(f"linear {n} batch {b} done", flush=True)

        for c, k, hw in conv_cfgs:
            layers = conv_layers(c, k, hw, conv_batch, None, device)
            x = torch.randn(conv_batch, c, hw, hw, device=device)
            times = time_layers(layers, x, device, rounds, min_run)
            cfg = f"{c}ch {k}x{k} {hw}x{hw} b{conv_batch}"
            rows += rows_for("conv", cfg, layers, times, peak, {"c": c, "k": k, "hw": hw})
            print(f"conv {cfg} done", flush=True)

        lin_ranks = [8, 32] if quick else [8, 32, 128, 512]
        n_r, b_r = (256, 32) if quick else (1024, 256)
        for r in lin_ranks:
            layers = linear_layers(n_r, b_r, r, device)
            times = time_layers(
                layers, torch.randn(b_r, n_r, device=device), device, rounds, min_run
            )
            rows += rows_for("rank-linear", f"{n_r}x{n_r} b{b_r}", layers, times, peak, {"rank": r})
        c_r, hw_r = (16, 16) if quick else (64, 32)
        conv_ranks = [4, 8] if quick else [8, 32, 128]
        for r in conv_ranks:
            layers = conv_layers(c_r, 3, hw_r, conv_batch, r, device)
            x = torch.randn(conv_batch, c_r, hw_r, hw_r, device=device)
            times = time_layers(layers, x, device, rounds, min_run)
            cfg = f"{c_r}ch 3x3 {hw_r}x{hw_r} b{conv_batch}"
            rows += rows_for("rank-conv", cfg, layers, times, peak, {"rank": r})
        print("rank sweeps done", flush=True)
    except KeyboardInterrupt:
        # Ctrl-C or `timeout -s INT`: keep and report what was measured so far.
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    if memory and not interrupted and not device.startswith("cuda"):
        mem_lin = [(1024, 32)] if quick else [(1024, 256), (4096, 256)]
        for r in rows:
            spec = None
            if r["group"] == "linear" and (r["n"], r["batch"]) in mem_lin:
                spec = {"kind": "linear", "n": r["n"], "batch": r["batch"]}
                spec["rank"] = None
            elif r["group"] == "conv" and r["hw"] == 32 and r["k"] == 3 and r["c"] <= 64:
                spec = {"kind": "conv", "c": r["c"], "k": 3, "hw": 32, "batch": conv_batch}
                spec["rank"] = None
            if spec is not None and r["layer"] != "FastKron":
                r["peak MiB"] = cpu_peak_memory({**spec, "layer": r["layer"]})
        print("memory done", flush=True)

    env = environment(device)
    env["dense mm GFLOP/s (ceiling)"] = round(peak, 1)
    env["FastKron"] = "installed" if _fastkron is not None else "not installed"
    env["TensorLy-Torch rows"] = (
        "yes (opt_einsum available)" if tltorch_usable() else "no: opt_einsum is not installed"
    )
    env["mode"] = ("quick" if quick else "full") + (
        " (interrupted, partial)" if interrupted else ""
    )
    cols = [
        "config",
        "layer",
        "params",
        "GFLOP fwd",
        "fwd ms",
        "fwd+bwd ms",
        "fwd/dense",
        "fwd+bwd/dense",
        "fwd+bwd/peer",
        "GFLOP/s",
        "% peak",
        "peak MiB",
    ]
    tag = "cuda" if device.startswith("cuda") else "cpu"
    name = f"{tag}_quick" if quick else tag
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    titles = {
        "linear": "Linear layers (each layer at its typical_rank)",
        "conv": "Conv layers, 'same' padding (each layer at its typical_rank)",
        "rank-linear": "Linear layers vs rank (every registered layer; skipped where not smaller)",
        "rank-conv": "Conv layers vs rank (every registered layer; skipped where not smaller)",
    }
    table = target_table(targets, rows)
    sections.append(
        "## Targets (performance issue), measured in this run\n\n"
        + markdown_table(table, ["target", "figure", "goal", "met", ""])
    )
    if targets:
        sections.append("## Target configurations\n\n" + markdown_table(targets, cols))
    for group, title in titles.items():
        sel = [r for r in rows if r["group"] == group]
        if sel:
            sections.append(f"## {title}\n\n" + markdown_table(sel, cols))
    figs = plot(rows, name, out_dir) if plots else []
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    cmd = (
        " ".join(["python -m benchmarks", *sys.argv[1:]])
        if sys.argv[1:]
        else ("python -m benchmarks" + (f" --device {device}" if device != "cpu" else ""))
    )
    cmd += " --quick" if quick else ""
    body = (
        f"# kronlayers benchmark suite ({tag})\n\nCommand: `{cmd}`\n\n{header}\n\n"
        "Times are medians of interleaved rounds; ratios < 1 mean faster than the reference "
        "(dense layer, or the peer: FastKron for KroneckerLinear, TensorLy-Torch otherwise). "
        "`peak MiB` is the growth of peak memory during one forward+backward.\n\n"
        + "\n\n".join(sections)
        + "\n\n"
        + "\n".join(f"![{p.stem}]({p.name})" for p in figs)
        + "\n"
    )
    md = out_dir / f"{name}.md"
    md.write_text(body)
    (out_dir / f"{name}.json").write_text(
        json.dumps({"env": env, "targets": table, "rows": targets + rows}, indent=1, default=str)
    )
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--quick", action="store_true", help="a few small rows (under a minute)")
    p.add_argument("--no-memory", action="store_true", help="skip CPU peak-memory subprocesses")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="default: benchmarks/results")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(json.loads(args.memory_child))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available")
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python -m benchmarks", *given])
    md = run(args.device, args.quick, not args.no_memory, not args.no_plots, args.out_dir, command)
    print(md.read_text())
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
