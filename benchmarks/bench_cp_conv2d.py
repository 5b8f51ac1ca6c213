"""Benchmark CPConv2d against TensorLy-Torch's CP FactorizedConv and a dense nn.Conv2d.

Layer: 64 -> 64 channels, 3x3 kernel, padding 1, on a (32, 64, 32, 32) batch (float32), at
several CP ranks. For each rank:

* ``kronlayers``: :class:`kronlayers.CPConv2d` (hand-written forward and backward);
* ``tltorch-factorized``: ``tltorch.FactorizedConv(..., factorization='cp',
  implementation='factorized')``, the constructor's default: a 1x1 conv, two 1-D depthwise
  convs and a 1x1 conv, differentiated by autograd;
* ``tltorch-reconstructed``: the same layer with ``implementation='reconstructed'``, the
  default of ``FactorizedConv.from_conv``: it rebuilds the dense kernel every call and runs a
  dense convolution;
* ``dense``: ``nn.Conv2d(64, 64, 3, padding=1)`` (rank-independent, measured once).

The TensorLy-Torch layers are made by :meth:`CPConv2d.to_tltorch`, so all three compute the
same function with the same weights (checked before timing).

Timings are ``torch.utils.benchmark.Timer`` medians: ``fwd`` is inference (``no_grad``);
``fwd+bwd`` is a training step of a layer inside a network: forward with the input requiring
grad, then ``torch.autograd.grad`` w.r.t. the input and every parameter. Peak memory is that of
one forward+backward, measured in a fresh subprocess per case: on CPU the peak resident set
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, ``ru_maxrss`` where that is
not allowed) minus the resident set before the step, with glibc's mmap threshold pinned so that
freed tensors really leave the resident set; on CUDA ``torch.cuda.max_memory_allocated`` minus
the allocated memory before the step. Input, output gradient and parameters exist before the
step and are not counted.

On a CPU, much of a step's time can be page faults: glibc returns freed blocks of a few MB to
the kernel and every new activation is then faulted in again (the time shows up as system
time). That cost depends on the heap's history, so it makes timings jumpy, and it grows with
the number of temporaries a method allocates (oneDNN's NCHW depthwise path, for one, allocates
reorder buffers). Running with ``MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296`` keeps freed memory in the heap (what jemalloc or tcmalloc,
usual for CPU training, do anyway) and measures the kernels themselves; the allocator settings
are recorded in the output. ``--timer cpu`` (one thread) measures process CPU time instead of
wall-clock time, for machines shared with other jobs.

Usage::

    python benchmarks/bench_cp_conv2d.py                  # CPU, writes results/cp_conv2d_cpu.md
    python benchmarks/bench_cp_conv2d.py --quick          # fewer ranks, shorter runs
    python benchmarks/bench_cp_conv2d.py --device cuda    # writes results/cp_conv2d_cuda.md
    python benchmarks/bench_cp_conv2d.py --stages         # also time the kernel alternatives
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kronlayers import CPConv2d  # noqa: E402
from kronlayers.functional import cp_conv2d_flops  # noqa: E402

N, C, H, W, K = 32, 64, 32, 32, 3
METHODS = ("kronlayers", "tltorch-factorized", "tltorch-reconstructed")


def build(method: str, rank: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    if method == "dense":
        return nn.Conv2d(C, C, K, padding=1, device=device)
    ours = CPConv2d(C, C, K, padding=1, rank=rank, device=device)
    if method == "kronlayers":
        return ours
    return ours.to_tltorch(implementation=method.split("-")[1])


def inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    g = torch.randn(N, C, H, W, device=device)
    return x, g


def step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    y = layer(x)
    torch.autograd.grad(y, [x, *layer.parameters()], g)


def flops(method: str, rank: int) -> float:
    """Forward FLOPs (2 per multiply-add)."""
    dense = 2 * N * H * W * C * C * K * K
    if method == "dense":
        return dense
    if method == "kronlayers":
        return cp_conv2d_flops(C, C, K, rank, (H, W), batch=N, padding=1)
    if method == "tltorch-factorized":  # 1x1, kh x 1 and 1 x kw depthwise, 1x1
        return 2 * N * H * W * rank * (C + 2 * K + C)
    return dense + 2 * C * C * K * K * rank  # reconstructed: kernel rebuild + dense conv


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# "cpu": process CPU time instead of wall-clock time. On a machine shared with other jobs the
# wall clock mostly measures how long the process waited for a core; with one thread the CPU
# time is the work done. (With several threads it sums them, so it is only offered for one.)
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}
TIMER = "wall"
TIMER_DOC = {"wall": "wall clock", "cpu": "process CPU time"}


def time_ms(fn, device: str, threads: int, min_run_time: float) -> float:
    fn()
    sync(device)
    timer = Timer(
        "fn(); sync(device)",
        globals={"fn": fn, "sync": sync, "device": device},
        num_threads=threads,
        timer=TIMERS[TIMER],
    )
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


# ----------------------------------------------------------------------------------------------
# Peak memory (one case per fresh process)
# ----------------------------------------------------------------------------------------------


def _status_kb(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1))


def measure_memory(method: str, rank: int, device: str) -> dict:
    layer = build(method, rank, device)
    x, g = inputs(device)
    step(layer, x, g)  # warm-up: one-time library allocations are not the layer's
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(layer, x, g)
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "how": "cuda"}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base_kb = _status_kb("VmRSS")
        step(layer, x, g)
        return {"peak_mb": (_status_kb("VmHWM") - base_kb) / 1024, "how": "VmHWM"}
    except OSError:
        base_kb = _status_kb("VmRSS")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step(layer, x, g)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss" if after > before else "ru_maxrss (lower bound)"
        return {"peak_mb": (after - base_kb) / 1024, "how": how}


def memory_in_subprocess(method: str, rank: int, device: str, threads: int) -> dict:
    env = dict(os.environ)
    # A fixed mmap threshold: large blocks are mmapped and unmapped on free, so the resident
    # set follows the live tensors (glibc's adaptive threshold would keep freed blocks).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--_memory", method, str(rank), "--device", device]
    cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Kernel alternatives (--stages): why the depthwise stage is fused and channels-last
# ----------------------------------------------------------------------------------------------


def _stage_fns(x: torch.Tensor, r: int) -> list:
    device = x.device
    u = torch.randn(N, r, H, W, device=device)
    u_cl = u.contiguous(memory_format=torch.channels_last)
    kh = torch.randn(r, 1, K, 1, device=device)
    kw = torch.randn(r, 1, 1, K, device=device)
    k2 = kh * kw  # (r, 1, K, K): the fused rank-one kernels
    a = torch.randn(C, r, device=device)
    x3 = x.reshape(N, C, H * W)

    def sep(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, None, 1, (1, 0), 1, r), kw, None, 1, (0, 1), 1, r)

    return [
        lambda: sep(u),
        lambda: sep(u_cl),
        lambda: F.conv2d(u, k2, None, 1, 1, 1, r),
        lambda: F.conv2d(u_cl, k2, None, 1, 1, 1, r),
        lambda: torch.ops.aten.convolution_backward(
            u_cl, u_cl, k2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], r, [True, False, False]
        ),
        lambda: F.conv2d(u_cl, k2.flip(2, 3), None, 1, 1, 1, r),
        lambda: torch.bmm(a.t().expand(N, r, C), x3),
        lambda: torch.bmm(x3.transpose(1, 2), a.expand(N, C, r)),
    ]


def stages(ranks: list[int], device: str, threads: int, min_run_time: float) -> list[str]:
    lines = [
        "| rank | depthwise: kh x 1 then 1 x kw, NCHW | same, NHWC | fused kh x kw, NCHW "
        "| fused, NHWC | input grad of fused NHWC: convolution_backward | same: flipped-kernel "
        "conv | in-GEMM to NCHW | in-GEMM to NHWC |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    x = torch.randn(N, C, H, W, device=device)
    for r in ranks:
        fns = _stage_fns(x, r)
        times = [time_ms(f, device, threads, min_run_time) for f in fns]
        lines.append(f"| {r} | " + " | ".join(f"{t:.2f} ms" for t in times) + " |")
    return lines


# ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ranks 8 and 32, short runs")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--stages", action="store_true", help="also time kernel alternatives")
    parser.add_argument(
        "--timer",
        choices=sorted(TIMERS),
        default="wall",
        help="wall-clock (default) or process CPU time (one thread only; for shared machines)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write")
    parser.add_argument("--append", action="store_true", help="append to --output instead")
    parser.add_argument("--_memory", nargs=2, metavar=("METHOD", "RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._memory:
        method, rank = args._memory
        print(json.dumps(measure_memory(method, int(rank), args.device)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.timer == "cpu" and (args.device != "cpu" or args.threads != 1):
        raise SystemExit("--timer cpu needs --device cpu --threads 1")
    global TIMER
    TIMER = args.timer
    load_before = os.getloadavg()[0]

    ranks = args.ranks or ([8, 32] if args.quick else [8, 32, 64, 128])
    min_run_time = 0.3 if args.quick else 1.0
    args.rounds = args.rounds or (1 if args.quick else 3)
    device, threads = args.device, args.threads
    x, g = inputs(device)

    cases: dict[tuple[str, int], nn.Module] = {("dense", 0): build("dense", 0, device)}
    for rank in ranks:
        layers = {m: build(m, rank, device) for m in METHODS}
        with torch.no_grad():  # the three compute the same function
            ref = layers["kronlayers"](x)
            for m in METHODS[1:]:
                # cuDNN convolutions use TF32 by default on CUDA: ~1e-3 relative error.
                tol = 1e-4 if device == "cpu" else 1e-2
                torch.testing.assert_close(layers[m](x), ref, rtol=tol, atol=tol)
        cases.update({(m, rank): layer for m, layer in layers.items()})

    # Every case is timed once per round and the rounds' median is reported: on a shared
    # machine, load changes between cases would otherwise bias the ratios.
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {key: [] for key in cases}
    for i in range(args.rounds):
        for (method, rank), layer in cases.items():
            with torch.no_grad():
                fwd = time_ms(lambda layer=layer: layer(x), device, threads, min_run_time)
            fb = time_ms(lambda layer=layer: step(layer, x, g), device, threads, min_run_time)
            samples[(method, rank)].append((fwd, fb))
            print(
                f"round {i + 1}: {method:>22} rank {rank:>4}: fwd {fwd:8.2f} ms  "
                f"fwd+bwd {fb:8.2f} ms",
                flush=True,
            )
    results: dict[tuple[str, int], dict] = {}
    for (method, rank), layer in cases.items():
        mem = None if args.no_memory else memory_in_subprocess(method, rank, device, threads)
        results[(method, rank)] = dict(
            fwd=statistics.median(s[0] for s in samples[(method, rank)]),
            fb=statistics.median(s[1] for s in samples[(method, rank)]),
            mem=mem,
            params=sum(p.numel() for p in layer.parameters()),
        )

    d = results[("dense", 0)]

    def mem_str(r: dict) -> str:
        return "-" if r["mem"] is None else f"{r['mem']['peak_mb']:.0f} MB"

    def ratio(ref: dict, r: dict) -> str:
        return f"{ref['fwd'] / r['fwd']:.2f}x / {ref['fb'] / r['fb']:.2f}x"

    header = (
        "| rank | method | params | fwd GFLOP | fwd | fwd+bwd | peak mem fwd+bwd "
        "| speed-up vs dense (fwd / fwd+bwd) | vs tltorch-factorized | vs tltorch-reconstructed |"
    )
    rows = [header, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows.append(
        f"| - | dense nn.Conv2d | {d['params']:,} | {flops('dense', 0) / 1e9:.2f} "
        f"| {d['fwd']:.2f} ms | {d['fb']:.2f} ms | {mem_str(d)} | 1.00x / 1.00x | | |"
    )
    for rank in ranks:
        tf = results[("tltorch-factorized", rank)]
        tr = results[("tltorch-reconstructed", rank)]
        for m in METHODS:
            r = results[(m, rank)]
            rows.append(
                f"| {rank} | {m} | {r['params']:,} | {flops(m, rank) / 1e9:.2f} "
                f"| {r['fwd']:.2f} ms | {r['fb']:.2f} ms | {mem_str(r)} "
                f"| {ratio(d, r)} | {ratio(tf, r)} | {ratio(tr, r)} |"
            )
    stage_lines = stages(ranks, device, threads, min_run_time) if args.stages else []

    cmd = "python benchmarks/bench_cp_conv2d.py " + " ".join(sys.argv[1:])
    mem_how = sorted({r["mem"]["how"] for r in results.values() if r["mem"]})
    meta = [
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.date.today().isoformat()}",
        f"- torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
        + f", threads {threads}, {platform.processor() or platform.machine()}",
        f"- input ({N}, {C}, {H}, {W}) float32; layer {C} -> {C}, {K}x{K}, padding 1",
        f"- times: torch.utils.benchmark.Timer medians ({TIMER_DOC[args.timer]}), median of "
        f"{args.rounds} interleaved round(s); fwd = inference (no_grad); "
        "fwd+bwd = forward + grads w.r.t. input and all parameters",
        f"- peak memory: one fwd+bwd in a fresh process ({', '.join(mem_how) or 'not measured'})",
        "- allocator environment: "
        + (
            ", ".join(
                f"`{k}={v}`" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")
            )
            or "glibc defaults"
        ),
        f"- machine load average (1 min) before / after: {load_before:.1f} / "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs",
    ]
    text = "\n".join(["# CPConv2d benchmark", "", *meta, "", *rows])
    if stage_lines:
        text += (
            "\n\n## Kernel alternatives (rank-R stage of the same layer, forward unless stated)\n\n"
            + "\n".join(stage_lines)
        )
    print()
    print(text)
    output = args.output or ROOT / "benchmarks" / "results" / f"cp_conv2d_{device}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.append and output.exists():
        text = output.read_text() + "\n" + text.replace("# CPConv2d benchmark", "## Run", 1)
    output.write_text(text + "\n")
    print(f"\nwritten to {output}")


if __name__ == "__main__":
    main()
