"""Benchmark kron_sum_diag and ks_project_diag against the seed-style baselines.

Run:  python benchmarks/bench_kron_sum.py [--device cuda] [--quick] [--out PATH]

Baselines measured in the same run:
  * numpy repeat/tile: the seed's recursive two-factor kron_sum_diag (np.repeat + np.tile);
    for the projection, the seed's numpy as_strided ``(left, right, d_k)`` view + mean.
  * torch stride-trick: zeros output, one ``as_strided`` ``(left, right, d_k)`` broadcast view
    per factor, ``add_`` the factor; projection as a mean over such a view per factor.
  * fill: ``torch.empty(n).fill_(1)`` (one write pass, with allocation) and ``buf.fill_(1)``
    into a preallocated buffer; for projections ``x.sum()`` (one read pass).

Effective bandwidth: bytes written (kron_sum_diag) or read (ks_project_diag) per second.
Targets: kron_sum_diag within 2x of the fill, and both kernels >= 2x faster than the torch
stride-trick baseline.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys

import numpy as np
import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kronlayers.ops.kron_sum import kron_sum_diag, ks_project_diag

# ------------------------------------------------------------------------------ baselines


def np_kron_sum_diag_repeat_tile(*vecs):
    # The seed's algorithm (recursive, two factors at a time, repeat/tile copies).
    if len(vecs) == 1:
        return vecs[0]
    a, b = vecs[0], vecs[1]
    ab = np.repeat(a, b.shape[0]) + np.tile(b, a.shape[0])
    return np_kron_sum_diag_repeat_tile(ab, *vecs[2:])


def _lr(dims, k):
    return math.prod(dims[:k]), math.prod(dims[k + 1 :])


def torch_kron_sum_diag_strided(*vecs, out=None):
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
    K = len(dims)
    res = []
    for k, d in enumerate(dims):
        left, right = _lr(dims, k)
        a = vec.as_strided((left, right, d), (d * right, 1, right)).mean((0, 1))
        res.append(a - (K - 1) / K * a.sum() / d)
    return res


def np_ks_project_diag_strided(vec, dims):
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


def time_variants(variants, min_run_time, rounds, spread):
    # The machine is shared: time every variant once per round, interleaved, and keep the
    # best median per variant (others' load only ever adds time); the ratio of the worst to
    # the best round's median is kept as a noise indicator.
    per = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            timer = Timer("fn()", globals={"fn": fn})
            per[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    spread.update({name: max(v) / min(v) for name, v in per.items()})
    return {name: min(v) for name, v in per.items()}


def bench_kron_sum_diag(dims, dtype, device, mrt, rounds, rows):
    n = math.prod(dims)
    gen = torch.Generator().manual_seed(0)
    vecs = [torch.randn(d, generator=gen, dtype=dtype).to(device) for d in dims]
    buf = torch.empty(n, dtype=dtype, device=device)
    nbytes = n * buf.element_size()
    # correctness of everything timed, once
    ref = torch_kron_sum_diag_strided(*vecs)
    torch.testing.assert_close(kron_sum_diag(*vecs), ref)
    variants = {
        "fill: torch.empty(n).fill_(1)": lambda: torch.empty(n, dtype=dtype, device=device).fill_(
            1
        ),
        "kron_sum_diag": lambda: kron_sum_diag(*vecs),
        "torch stride-trick (zeros + as_strided add_)": lambda: torch_kron_sum_diag_strided(*vecs),
        "fill into preallocated: buf.fill_(1)": lambda: buf.fill_(1),
        "kron_sum_diag(out=buf)": lambda: kron_sum_diag(*vecs, out=buf),
        "torch stride-trick into buf (zero_ + add_)": lambda: torch_kron_sum_diag_strided(
            *vecs, out=buf
        ),
    }
    if device == "cpu":
        nv = [v.numpy() for v in vecs]
        np.testing.assert_allclose(np_kron_sum_diag_repeat_tile(*nv), ref.numpy(), rtol=1e-5)
        variants["numpy repeat/tile (seed, recursive)"] = lambda: np_kron_sum_diag_repeat_tile(*nv)
    spread = {}
    t = time_variants(variants, mrt, rounds, spread)
    for name, s in t.items():
        prealloc = "buf" in name
        fill = t[
            "fill into preallocated: buf.fill_(1)" if prealloc else "fill: torch.empty(n).fill_(1)"
        ]
        ours = t["kron_sum_diag(out=buf)" if prealloc else "kron_sum_diag"]
        rows.append(
            dict(
                op="kron_sum_diag",
                dims=dims,
                dtype=str(dtype).replace("torch.", ""),
                variant=name,
                ms=s * 1e3,
                gbs=nbytes / s / 1e9,
                vs_fill=s / fill,
                ours_speedup=s / ours,
                spread=spread[name],
            )
        )
    return t


def bench_ks_project_diag(dims, dtype, device, mrt, rounds, rows):
    n = math.prod(dims)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=gen, dtype=dtype).to(device)
    nbytes = n * x.element_size()
    for a, b in zip(ks_project_diag(x, dims), torch_ks_project_diag_strided(x, dims), strict=True):
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    variants = {
        "read ref: x.sum()": lambda: x.sum(),
        "ks_project_diag": lambda: ks_project_diag(x, dims),
        "torch stride-trick (as_strided mean)": lambda: torch_ks_project_diag_strided(x, dims),
    }
    if device == "cpu":
        xn = x.numpy()
        variants["numpy as_strided mean (seed)"] = lambda: np_ks_project_diag_strided(xn, dims)
    spread = {}
    t = time_variants(variants, mrt, rounds, spread)
    for name, s in t.items():
        rows.append(
            dict(
                op="ks_project_diag",
                dims=dims,
                dtype=str(dtype).replace("torch.", ""),
                variant=name,
                ms=s * 1e3,
                gbs=nbytes / s / 1e9,
                vs_fill=s / t["read ref: x.sum()"],
                ours_speedup=s / t["ks_project_diag"],
                spread=spread[name],
            )
        )
    return t


# ------------------------------------------------------------------------------ main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per timing")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case")
    p.add_argument("--out", default=None, help="Markdown output path")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--ops", default="both", choices=["kron_sum_diag", "ks_project_diag", "both"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but CUDA is not available")
    dtypes = (
        [torch.float64, torch.float32] if args.dtype == "both" else [getattr(torch, args.dtype)]
    )
    if args.quick:
        sum_cases, proj_cases, mrt = [(10, 20, 30), (200, 300)], [(10, 20, 30), (200, 300)], 0.05
    else:
        sum_cases = [(100, 100, 100), (4000, 4000)]
        proj_cases = [(50, 100, 150), (4000, 4000)]
        mrt = 0.3
    mrt = args.min_run_time or mrt
    rounds = args.rounds or (1 if args.quick else 3)
    out_path = args.out or (
        None
        if args.quick
        else os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", f"kron_sum_{args.device}.md"
        )
    )

    rows, checks = [], []
    for dtype in dtypes:
        for dims in sum_cases if args.ops != "ks_project_diag" else []:
            t = bench_kron_sum_diag(dims, dtype, args.device, mrt, rounds, rows)
            ratio_fill = t["kron_sum_diag"] / t["fill: torch.empty(n).fill_(1)"]
            ratio_fill_pre = t["kron_sum_diag(out=buf)"] / t["fill into preallocated: buf.fill_(1)"]
            sp = t["torch stride-trick (zeros + as_strided add_)"] / t["kron_sum_diag"]
            sp_pre = t["torch stride-trick into buf (zero_ + add_)"] / t["kron_sum_diag(out=buf)"]
            tag = f"kron_sum_diag {dims} {str(dtype)[6:]}"
            checks.append((f"{tag}: time / fill <= 2 (allocating)", ratio_fill, ratio_fill <= 2))
            checks.append(
                (f"{tag}: time / fill <= 2 (preallocated)", ratio_fill_pre, ratio_fill_pre <= 2)
            )
            checks.append((f"{tag}: stride-trick / ours >= 2 (allocating)", sp, sp >= 2))
            checks.append((f"{tag}: stride-trick / ours >= 2 (preallocated)", sp_pre, sp_pre >= 2))
        for dims in proj_cases if args.ops != "kron_sum_diag" else []:
            t = bench_ks_project_diag(dims, dtype, args.device, mrt, rounds, rows)
            sp = t["torch stride-trick (as_strided mean)"] / t["ks_project_diag"]
            tag = f"ks_project_diag {dims} {str(dtype)[6:]}"
            checks.append((f"{tag}: stride-trick / ours >= 2", sp, sp >= 2))

    header = [
        f"# kron_sum benchmark ({args.device})",
        "",
        f"- command: `python {' '.join(['benchmarks/bench_kron_sum.py', *sys.argv[1:]])}`",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}",
        f"- torch threads: {torch.get_num_threads()} (machine: {os.cpu_count()} logical CPUs, "
        f"{platform.processor() or platform.machine()})",
        f"- timer: torch.utils.benchmark.Timer.blocked_autorange(min_run_time={mrt}); every",
        f"  variant timed once per round, {rounds} interleaved rounds, best round's median kept;",
        "  `noise` = worst / best round median (shared machine: other processes add time).",
    ]
    if args.device == "cuda":
        header.append(f"- GPU: {torch.cuda.get_device_name()}")
    header += [
        "- GB/s: bytes written (kron_sum_diag) or read (ks_project_diag) / median time.",
        "- `vs ref`: time / reference (fill for kron_sum_diag, the matching allocating or",
        "  preallocated one; `x.sum()` read pass for ks_project_diag).",
        "- `ours faster by`: this row's time / kron_sum_diag's (same allocation mode) or",
        "  ks_project_diag's time.",
        "",
        "| op | dims | dtype | variant | median ms | GB/s | vs ref | ours faster by | noise |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    lines = [
        f"| {r['op']} | {'x'.join(map(str, r['dims']))} | {r['dtype']} | {r['variant']} | "
        f"{r['ms']:.3f} | {r['gbs']:.2f} | {r['vs_fill']:.2f} | {r['ours_speedup']:.2f}x | "
        f"{r['spread']:.2f} |"
        for r in rows
    ]
    check_lines = ["", "## Targets", "", "| check | value | met |", "|---|---:|---|"] + [
        f"| {name} | {val:.2f} | {'yes' if ok else 'NO'} |" for name, val, ok in checks
    ]
    text = "\n".join(header + lines + check_lines) + "\n"
    print(text)
    if out_path:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            f.write(text)
        print(f"written to {out_path}")


if __name__ == "__main__":
    main()
