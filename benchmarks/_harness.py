"""Timing, memory and reporting helpers shared by the benchmark scripts.

Every comparison is measured in one process and one run, with the cases interleaved round
by round (so a slow phase of a noisy machine hits every case alike) and the median of the
per-round medians reported.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils import benchmark as tbench

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(
    cases: dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    rounds: int = 5,
    min_run_time: float = 0.1,
) -> dict[str, float]:
    """Median seconds per call of each case, cases interleaved over ``rounds`` rounds."""
    for fn in cases.values():  # warm-up: allocator, lazy init, autotuning
        fn()
        fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            # Timer runs at 1 thread unless told: time at the process' setting, which the
            # report prints (torch.set_num_threads / --threads).
            timer = tbench.Timer(
                stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
            )
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(v) for name, v in samples.items()}


def dense_matmul_gflops(device: str = "cpu", n: int = 2048, dtype=torch.float32) -> float:
    """The machine's dense-matmul ceiling: GFLOP/s (2 flops per multiply-add) of n x n @ n x n."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved_medians({"mm": lambda: torch.mm(a, b)}, device=device, rounds=3)["mm"]
    return 2 * n**3 / t / 1e9


def peak_cuda_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated on the current CUDA device while ``fn`` runs (above the baseline)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def environment(device: str) -> dict[str, object]:
    """What the numbers were measured on."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    return env


def markdown_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(name: str, title: str, env: dict, body: str, data: object) -> Path:
    """Write ``results/<name>.md`` and ``results/<name>.json``; return the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    md = RESULTS / f"{name}.md"
    md.write_text(f"# {title}\n\n{header}\n\n{body}\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"env": env, "data": data}, indent=2))
    return md
