"""Benchmark kron_sum_diag and ks_project_diag against the seed's stride trick and a memory fill.

Run from the repository root:  python -m benchmarks.bench_kron_sum [--quick] [--threads N]

Targets (the median over interleaved rounds of the per-round time ratio, one run):
  * ks_project_diag: time <= 0.5 x the seed's stride trick (a mean over one ``as_strided``
    ``(left, right, d_k)`` view per factor, ported to torch: same library, same threads).
  * kron_sum_diag: time <= 1.2 x a fill of a buffer of the output's size, both allocating
    (``torch.empty(n).fill_(1)`` vs ``kron_sum_diag(*vecs)``) and preallocated
    (``buf.fill_(1)`` vs ``kron_sum_diag(*vecs, out=buf)``).

Sizes are the seed's: kron_sum_diag at (100, 100, 100) and (1000, 100, 100), two of its
timings (the third, (10000, 10000), 800 MB in float64, is left out), and (4000, 4000), the
input it builds for its projection timing; ks_project_diag at the seed's (50, 100, 150) and
(4000, 4000), plus (2000, 2000), the size the issue quotes. Also timed: the seed's own numpy
code (repeat/tile for the sum, numpy ``as_strided`` means for the projection) and, for the
projection, one read pass (``torch.mv(x, ones)``, BLAS), the floor of any implementation.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys

import numpy as np
import torch
from torch.utils import benchmark as tbench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kronlayers.ops.kron_sum import kron_sum_diag, ks_project_diag

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ------------------------------------------------------------------------------ baselines


def np_kron_sum_diag_repeat_tile(*vecs):
    # The seed's first algorithm (recursive, two factors at a time, repeat/tile copies).
    if len(vecs) == 1:
        return vecs[0]
    a, b = vecs[0], vecs[1]
    ab = np.repeat(a, b.shape[0]) + np.tile(b, a.shape[0])
    return np_kron_sum_diag_repeat_tile(ab, *vecs[2:])


def _lr(dims, k):
    return math.prod(dims[:k]), math.prod(dims[k + 1 :])


def torch_kron_sum_diag_strided(*vecs, out=None):
    # The seed's kron_sum_diag_fast in torch: zeros, then one add_ per factor through a
    # (left, right, d_k) as_strided view of the output.
    dims = [v.shape[0] for v in vecs]
    n = math.prod(dims)
    if out is None:
        out = torch.zeros(n, dtype=vecs[0].dtype, device=vecs[0].device)
    else:
        out.zero_()
    for k, v in enumerate(vecs):
        left, right = _lr(dims, k)
        d = dims[k]
        out.as_strided((left, right, d), (d * right, 1, right)).add_(v)
    return out


def torch_ks_project_diag_strided(vec, dims):
    # The seed's kronecker_factor_diag for every k in torch: the mean over a (left, right,
    # d_k) as_strided view, minus (K-1)/K of the factor's mean.
    K = len(dims)
    res = []
    for k, d in enumerate(dims):
        left, right = _lr(dims, k)
        a = vec.as_strided((left, right, d), (d * right, 1, right)).mean((0, 1))
        res.append(a - (K - 1) / K * a.sum() / d)
    return res


def np_ks_project_diag_strided(vec, dims):
    # The seed's numpy code, as written there.
    K = len(dims)
    res = []
    s = vec.strides[0]
    for k, d in enumerate(dims):
        left, right = _lr(dims, k)
        a = np.lib.stride_tricks.as_strided(
            vec, shape=(left, right, d), strides=(s * d * right, s, s * right)
        ).mean(axis=(0, 1))
        res.append(a - (K - 1) / K * a.sum() / d)
    return res


# ------------------------------------------------------------------------------ timing


def interleaved(cases, rounds, min_run_time):
    """Per-round medians (seconds per call) of each case, the cases interleaved.

    As ``benchmarks._harness.interleaved_medians`` (two warm-up calls per case, then every
    case timed once per round, round after round), but keeping every round: ratios are
    taken within a round, where a slow phase of the shared machine hits both cases alike.
    And at ``torch.get_num_threads()`` threads: ``Timer`` defaults to one.
    """
    for fn in cases.values():
        fn()
        fn()
    samples = {name: [] for name in cases}
    threads = torch.get_num_threads()
    for _ in range(rounds):
        for name, fn in cases.items():
            # Timer runs stmt with num_threads torch threads, 1 unless told otherwise
            timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return samples


def median(v):
    return statistics.median(v)


def ratio(samples, a, b):
    """Median over rounds of a's time / b's time in the same round."""
    return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True))


def noise(v):
    return max(v) / min(v)


FILL, OURS, STRIDE = "fill: torch.empty(n).fill_(1)", "kron_sum_diag", "stride trick (torch)"
BFILL, BOURS = "fill preallocated: buf.fill_(1)", "kron_sum_diag(out=buf)"
BSTRIDE, NPSEED = "stride trick into buf (zero_ + add_)", "seed numpy (repeat/tile)"
P_READ, P_OURS, P_STRIDE = "one read: torch.mv(x, ones)", "ks_project_diag", "stride trick (torch)"
P_NP = "seed numpy (as_strided mean)"


def bench_kron_sum_diag(dims, dtype, mrt, rounds, rows):
    n = math.prod(dims)
    gen = torch.Generator().manual_seed(0)
    vecs = [torch.randn(d, generator=gen, dtype=dtype) for d in dims]
    buf = torch.empty(n, dtype=dtype)
    ref = torch_kron_sum_diag_strided(*[v.double() for v in vecs]).to(dtype)
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 and len(dims) == 2 else {}
    torch.testing.assert_close(kron_sum_diag(*vecs), ref, **tol)
    torch.testing.assert_close(kron_sum_diag(*vecs, out=buf), ref, **tol)
    nv = [v.numpy() for v in vecs]
    np.testing.assert_allclose(np_kron_sum_diag_repeat_tile(*nv), ref.numpy(), rtol=1e-5, atol=1e-6)
    cases = {
        FILL: lambda: torch.empty(n, dtype=dtype).fill_(1),
        OURS: lambda: kron_sum_diag(*vecs),
        STRIDE: lambda: torch_kron_sum_diag_strided(*vecs),
        BFILL: lambda: buf.fill_(1),
        BOURS: lambda: kron_sum_diag(*vecs, out=buf),
        BSTRIDE: lambda: torch_kron_sum_diag_strided(*vecs, out=buf),
        NPSEED: lambda: np_kron_sum_diag_repeat_tile(*nv),
    }
    t = interleaved(cases, rounds, mrt)
    for name, v in t.items():
        pre = name in (BFILL, BOURS, BSTRIDE)
        rows.append(
            dict(
                op="kron_sum_diag",
                dims=dims,
                dtype=str(dtype)[6:],
                variant=name,
                ms=median(v) * 1e3,
                gbs=n * buf.element_size() / median(v) / 1e9,
                vs_ref=ratio(t, name, BFILL if pre else FILL),
                vs_ours=ratio(t, name, BOURS if pre else OURS),
                noise=noise(v),
            )
        )
    return t


def bench_ks_project_diag(dims, dtype, mrt, rounds, rows):
    n = math.prod(dims)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=gen, dtype=dtype)
    ref = torch_ks_project_diag_strided(x.double(), dims)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(ks_project_diag(x, dims), ref, strict=True):
        torch.testing.assert_close(a.double(), b, **tol)
    xn = x.numpy()
    for a, b in zip(np_ks_project_diag_strided(xn, dims), ref, strict=True):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-5)
    rows_view, ones = x.view(dims[0], -1), torch.ones(n // dims[0], dtype=dtype)
    cases = {
        P_READ: lambda: torch.mv(rows_view, ones),
        P_OURS: lambda: ks_project_diag(x, dims),
        P_STRIDE: lambda: torch_ks_project_diag_strided(x, dims),
        P_NP: lambda: np_ks_project_diag_strided(xn, dims),
    }
    t = interleaved(cases, rounds, mrt)
    for name, v in t.items():
        rows.append(
            dict(
                op="ks_project_diag",
                dims=dims,
                dtype=str(dtype)[6:],
                variant=name,
                ms=median(v) * 1e3,
                gbs=n * x.element_size() / median(v) / 1e9,
                vs_ref=ratio(t, name, P_READ),
                vs_ours=ratio(t, name, P_OURS),
                noise=noise(v),
            )
        )
    return t


# ------------------------------------------------------------------------------ main


def _dims(d):
    return "x".join(map(str, d))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds, no report")
    p.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    p.add_argument("--out", default=None, help="Markdown output path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--ops", default="both", choices=["kron_sum_diag", "ks_project_diag", "both"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = (
        [torch.float64, torch.float32] if args.dtype == "both" else [getattr(torch, args.dtype)]
    )
    if args.quick:
        sum_cases, proj_cases, mrt = [(10, 20, 30), (200, 300)], [(10, 20, 30), (200, 300)], 0.02
    else:
        sum_cases = [(100, 100, 100), (1000, 100, 100), (4000, 4000)]
        proj_cases = [(50, 100, 150), (2000, 2000), (4000, 4000)]
        mrt = 0.2
    mrt = args.min_run_time or mrt
    rounds = args.rounds or (1 if args.quick else 7)
    out_path = args.out or (None if args.quick else os.path.join(RESULTS, "kron_sum_cpu.md"))

    load_before = os.getloadavg()
    started = datetime.datetime.now()
    rows, checks = [], []
    for dtype in dtypes:
        dt = str(dtype)[6:]
        for dims in sum_cases if args.ops != "ks_project_diag" else []:
            t = bench_kron_sum_diag(dims, dtype, mrt, rounds, rows)
            r, r_pre = ratio(t, OURS, FILL), ratio(t, BOURS, BFILL)
            checks.append((f"kron_sum_diag {_dims(dims)} {dt}", "time / fill, allocating", r, 1.2))
            checks.append((f"kron_sum_diag {_dims(dims)} {dt}", "time / fill, out=", r_pre, 1.2))
        for dims in proj_cases if args.ops != "kron_sum_diag" else []:
            t = bench_ks_project_diag(dims, dtype, mrt, rounds, rows)
            r = ratio(t, P_OURS, P_STRIDE)
            checks.append((f"ks_project_diag {_dims(dims)} {dt}", "time / stride trick", r, 0.5))
    load_after = os.getloadavg()

    cmd = " ".join(["python -m benchmarks.bench_kron_sum", *sys.argv[1:]])
    lines = [
        "# kron_sum benchmark (cpu)",
        "",
        "## Targets",
        "",
        "Each figure: the median over the interleaved rounds of one run of the per-round",
        "ratio (the tables below); met when <= the bound.",
        "",
        "| op and size | figure | measured | bound | met |",
        "|---|---|---:|---:|---|",
        *(
            f"| {what} | {fig} | {v:.2f} | {bound} | {'yes' if v <= bound else 'NO'} |"
            for what, fig, v, bound in checks
        ),
        "",
        "## Setup",
        "",
        f"- command: `{cmd}`",
        f"- started {started.isoformat(timespec='seconds')}, "
        f"took {(datetime.datetime.now() - started).total_seconds():.0f} s",
        f"- torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}",
        f"- torch threads: {torch.get_num_threads()}; machine: {os.cpu_count()} logical CPUs "
        f"({_cpu_model()})",
        f"- load average (1, 5, 15 min) before: {_load(load_before)}, after: {_load(load_after)}",
        f"- timer: torch.utils.benchmark.Timer.blocked_autorange(min_run_time={mrt}); every",
        f"  variant timed once per round, {rounds} interleaved rounds; `median ms`: median",
        "  of the round medians; ratios: median of the per-round ratios; `noise`: worst /",
        "  best round median.",
        "- GB/s: bytes written (kron_sum_diag) or read (ks_project_diag) / median time.",
        "- `vs ref`: time / the fill of the same allocation mode (kron_sum_diag) or / one read",
        "  pass (ks_project_diag); `vs ours`: time / kron_sum_diag's of the same mode, or /",
        "  ks_project_diag's.",
        "",
        "## All timings",
        "",
        "| op | dims | dtype | variant | median ms | GB/s | vs ref | vs ours | noise |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
        *(
            f"| {r['op']} | {_dims(r['dims'])} | {r['dtype']} | {r['variant']} | "
            f"{r['ms']:.3f} | {r['gbs']:.2f} | {r['vs_ref']:.2f} | {r['vs_ours']:.2f} | "
            f"{r['noise']:.2f} |"
            for r in rows
        ),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            f.write(text)
        print(f"written to {out_path}")


def _load(avg):
    return ", ".join(f"{a:.1f}" for a in avg)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
