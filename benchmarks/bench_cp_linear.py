"""CPLinear vs TensorLy-Torch's CP FactorizedLinear vs nn.Linear: time, FLOPs, peak memory.

    python -m benchmarks.bench_cp_linear [--quick] [--device cuda] [--threads N]

Every rank compares, in one run, on the same weights (the TensorLy-Torch layer is
``CPLinear.to_tltorch()``, checked to give the same outputs):

- ``CPLinear``: :func:`kronlayers.functional.cp_linear`, hand-written forward and backward.
- ``tltorch (opt_einsum)``: ``FactorizedLinear(..., factorization='cp',
  implementation='factorized')``. Its forward is one ``tl.einsum`` (= ``torch.einsum`` on
  TensorLy's PyTorch backend) over the input, the CP weights vector and every factor,
  e.g. ``'bcd,a,ea,fa,ca,da->bef'``; torch asks opt_einsum for a contraction path on every
  call and autograd differentiates the resulting pairwise contractions.
- ``tltorch (no opt_einsum)``: the same layer with ``torch.backends.opt_einsum.enabled =
  False``, so torch contracts the operands left to right. With the input first and the
  output factors before the input factors, the second to fourth steps are outer products
  and the intermediate reaches ``N * H_in * R * H_out`` entries (16 GiB in float32 for the
  1024 x 1024 layer at batch 256 and rank 16). Rows whose estimated footprint exceeds the
  memory budget are skipped with the estimate printed; a smaller layer shows the measured
  cost.
- ``nn.Linear``: the dense layer.

Times are medians of ``torch.utils.benchmark.Timer.blocked_autorange``, cases interleaved
round by round (``benchmarks._harness.interleaved_medians``). "fwd" runs under
``torch.no_grad()``; "fwd+bwd" is ``torch.autograd.grad`` of the output (with a fixed
random cotangent) w.r.t. the input and every parameter. Peak memory is the high-water mark
of one fwd+bwd above what was live before it: on CPU the resident set of a child process
(``MALLOC_MMAP_THRESHOLD_`` pinned so freed tensors go back to the OS, the high-water mark
reset through ``/proc/self/clear_refs`` before each case; the kernel's RSS counters make this
good to a fraction of a MiB, so memory ratios are only reported above 1 MiB), on CUDA
``torch.cuda.max_memory_allocated``. FLOPs count 2 per multiply-add of the forward:
``cp_linear_flops`` for CPLinear (GEMMs plus the elementwise Khatri-Rao / Hadamard steps),
opt_einsum's own count for its path, and the left-to-right pairwise cost without it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from benchmarks._harness import RESULTS, environment, interleaved_medians, markdown_table
from kronlayers import CPLinear
from kronlayers.functional import cp_linear_flops

IMPLS = ("CPLinear", "tltorch (opt_einsum)", "tltorch (no opt_einsum)", "nn.Linear", "GEMM floor")
# "GEMM floor" is not a layer: it times only the GEMMs every Khatri-Rao-path CP layer needs
# (2 forward, 4 backward, the same FLOPs as opt_einsum's path), the floor for CPLinear and
# tltorch alike.
MiB = 2**20


def _tltorch_operands(in_shape, out_shape, rank, batch):
    """Labels and sizes of tltorch's CP einsum, in its operand order (see ``tensor_dot_cp``)."""
    sizes = {"n": batch, "r": rank}
    ins = [f"i{k}" for k in range(len(in_shape))]
    outs = [f"o{k}" for k in range(len(out_shape))]
    sizes.update(zip(ins, in_shape, strict=True))
    sizes.update(zip(outs, out_shape, strict=True))
    operands = [["n", *ins], ["r"]] + [[o, "r"] for o in outs] + [[i, "r"] for i in ins]
    return operands, ["n", *outs], sizes


def left_to_right_cost(operands, output, sizes) -> tuple[int, int]:
    """(FLOPs, entries of all intermediates) of torch.einsum's left-to-right contraction."""
    result = list(operands[0])
    flops = 0
    total = 0
    for j, op in enumerate(operands[1:], start=1):
        later = set(output).union(*[set(o) for o in operands[j + 1 :]])
        union = list(dict.fromkeys(result + list(op)))
        flops += 2 * math.prod(sizes[d] for d in union)
        result = [d for d in union if d in later]
        total += math.prod(sizes[d] for d in result)
    return flops, total


def _opt_einsum_flops(in_shape, out_shape, rank, batch) -> int | None:
    try:
        import opt_einsum
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    operands, output, sizes = _tltorch_operands(in_shape, out_shape, rank, batch)
    letters = {d: chr(ord("a") + k) for k, d in enumerate(sizes)}
    eq = ",".join("".join(letters[d] for d in op) for op in operands)
    eq += "->" + "".join(letters[d] for d in output)
    shapes = [tuple(sizes[d] for d in op) for op in operands]
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="auto")
    return int(info.opt_cost)


def build(impl: str, cfg: dict, device: str):
    """``(forward, forward_backward, n_params)`` closures for one implementation."""
    torch.manual_seed(0)
    n_in, n_out = math.prod(cfg["in_shape"]), math.prod(cfg["out_shape"])
    cp = CPLinear(
        n_in,
        n_out,
        rank=cfg["rank"],
        in_shape=cfg["in_shape"],
        out_shape=cfg["out_shape"],
        device=device,
    )
    x = torch.randn(cfg["batch"], n_in, device=device)
    xg = x.clone().requires_grad_()
    g = torch.randn(cfg["batch"], n_out, device=device)
    if impl == "GEMM floor":
        with torch.no_grad():
            k_in = torch.randn(n_in, cfg["rank"], device=device)
            k_out = torch.randn(n_out, cfg["rank"], device=device)

        def floor_fwd():
            return (x @ k_in) @ k_out.t()

        def floor_fwd_bwd():
            c = x @ k_in
            y = c @ k_out.t()
            dc = g @ k_out
            return y, c.t() @ g, dc, dc.t() @ x, dc @ k_in.t()

        return floor_fwd, floor_fwd_bwd, None
    if impl == "CPLinear":
        layer = cp
    elif impl == "nn.Linear":
        layer = nn.Linear(n_in, n_out, device=device)
    else:
        layer = cp.to_tltorch(implementation="factorized")
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = impl != "tltorch (no opt_einsum)"

    def call(inp):
        prev = torch.backends.opt_einsum.enabled
        torch.backends.opt_einsum.enabled = opt
        try:
            return layer(inp)
        finally:
            torch.backends.opt_einsum.enabled = prev

    def fwd():
        with torch.no_grad():
            return call(x)

    def fwd_bwd():
        return torch.autograd.grad(call(xg), [xg, *params], g)

    if impl.startswith("tltorch") and opt:
        with torch.no_grad():
            err = (layer(x) - cp(x)).abs().max().item()
        scale = cp(x).abs().max().item()
        if err > 1e-4 * max(scale, 1.0):
            raise RuntimeError(f"tltorch and CPLinear disagree: max abs diff {err}")
    return fwd, fwd_bwd, sum(p.numel() for p in params)


def estimated_bytes(impl: str, cfg: dict) -> int:
    """Rough fwd+bwd footprint, used only to skip runs that would exhaust memory."""
    b, r = cfg["batch"], cfg["rank"]
    n_in, n_out = math.prod(cfg["in_shape"]), math.prod(cfg["out_shape"])
    if impl == "GEMM floor":
        return 0
    if impl == "tltorch (no opt_einsum)":
        ops, out, sizes = _tltorch_operands(cfg["in_shape"], cfg["out_shape"], r, b)
        # Autograd keeps every intermediate, and its backward builds gradients as large.
        return 4 * 3 * left_to_right_cost(ops, out, sizes)[1]
    return 4 * 4 * (b * (n_in + n_out) + r * (n_in + n_out + b) + n_in * n_out)


def fwd_flops(impl: str, cfg: dict) -> int | None:
    b, r, ins, outs = cfg["batch"], cfg["rank"], cfg["in_shape"], cfg["out_shape"]
    if impl == "CPLinear":
        return cp_linear_flops(ins, outs, r, b)
    if impl == "GEMM floor":
        return 2 * b * r * (math.prod(ins) + math.prod(outs))
    if impl == "nn.Linear":
        return 2 * b * math.prod(ins) * math.prod(outs)
    if impl == "tltorch (opt_einsum)":
        return _opt_einsum_flops(ins, outs, r, b)
    return left_to_right_cost(*_tltorch_operands(ins, outs, r, b))[0]


def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_child(jobs: list[dict], device: str) -> list[int | None]:
    """Peak bytes of one fwd+bwd per job (run inside the child process)."""
    out = []
    for job in jobs:
        _, fwd_bwd, _ = build(job["impl"], job["cfg"], device)
        if device.startswith("cuda"):
            fwd_bwd()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd()
            torch.cuda.synchronize()
            out.append(torch.cuda.max_memory_allocated() - base)
            continue
        if len(jobs) > 1 or _reset_hwm():
            fwd_bwd()  # warm-up: lazy initialisation is not part of the layer's footprint
            if not _reset_hwm():
                out.append(None)
                continue
            base = _rss_bytes("VmRSS")
            fwd_bwd()
            peak = _rss_bytes("VmHWM")
            out.append(None if base is None or peak is None else max(0, peak - base))
        else:  # no resettable high-water mark: first call, whole-process maximum
            base = _rss_bytes("VmRSS") or 0
            fwd_bwd()
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            out.append(max(0, peak - base))
    return out


def measure_memory(jobs: list[dict], device: str, threads: int) -> list[int | None]:
    if device.startswith("cuda"):
        return memory_child(jobs, device)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.bench_cp_linear", "--device", device]
    cmd += ["--threads", str(threads), "--memory-child"]
    if _reset_hwm():
        batches = [jobs]
    else:
        batches = [[j] for j in jobs]  # one process per case, ru_maxrss deltas
    out: list[int | None] = []
    for batch in batches:
        res = subprocess.run(
            cmd, input=json.dumps(batch), capture_output=True, text=True, env=env, cwd=root
        )
        if res.returncode != 0:
            raise RuntimeError(f"memory child failed:\n{res.stderr[-3000:]}")
        out.extend(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def time_config(cfg_base: dict, ranks, device, rounds, min_run, budget) -> list[dict]:
    """Rows with times for every rank and implementation (memory is filled in later)."""
    rows: list[dict] = []
    n_in, n_out = math.prod(cfg_base["in_shape"]), math.prod(cfg_base["out_shape"])
    for rank in ranks:
        cfg = dict(cfg_base, rank=rank)
        fwd, fb, params, skipped = {}, {}, {}, {}
        for impl in IMPLS:
            need = estimated_bytes(impl, cfg)
            if need > budget:
                skipped[impl] = (
                    f"skipped: est. {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB"
                )
                continue
            fwd[impl], fb[impl], params[impl] = build(impl, cfg, device)
        t_fwd = interleaved_medians(fwd, device=device, rounds=rounds, min_run_time=min_run)
        t_fb = interleaved_medians(fb, device=device, rounds=rounds, min_run_time=min_run)
        del fwd, fb
        for impl in IMPLS:
            flops = fwd_flops(impl, cfg)
            row = {
                "layer": f"{n_in}x{n_out} {cfg['in_shape']}->{cfg['out_shape']}",
                "rank": rank,
                "impl": impl,
                "fwd GFLOP": flops / 1e9 if flops else "",
                "dense/impl FLOPs": fwd_flops("nn.Linear", cfg) / flops if flops else "",
                "_cfg": cfg,
            }
            if impl in skipped:
                row["fwd ms"] = skipped[impl]
            else:
                row.update(
                    {
                        "params": params[impl] if params[impl] is not None else "",
                        "fwd ms": t_fwd[impl] * 1e3,
                        "fwd+bwd ms": t_fb[impl] * 1e3,
                        "_fwd": t_fwd[impl],
                        "_fb": t_fb[impl],
                    }
                )
            rows.append(row)
    return rows


def add_memory_and_ratios(rows: list[dict], device: str, threads: int) -> None:
    timed = [r for r in rows if "_fb" in r and r["impl"] != "GEMM floor"]
    mems = measure_memory([{"impl": r["impl"], "cfg": r["_cfg"]} for r in timed], device, threads)
    for r, m in zip(timed, mems, strict=True):
        r["_mem"] = m
        r["peak MiB"] = m / MiB if m is not None else "n/a"
    for r in rows:
        r.setdefault("_mem", None)
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["layer"], r["rank"]), {})[r["impl"]] = r
    for by in groups.values():
        for r in by.values():
            if "_fb" not in r:
                continue
            for ref, tag in (("nn.Linear", "dense"), ("tltorch (opt_einsum)", "tltorch")):
                if "_fb" in by.get(ref, {}):
                    r[f"fwd speedup vs {tag}"] = by[ref]["_fwd"] / r["_fwd"]
                    r[f"fwd+bwd speedup vs {tag}"] = by[ref]["_fb"] / r["_fb"]
            r["_floor_fb"] = by.get("GEMM floor", {}).get("_fb")
            r["_tl_fb"] = by.get("tltorch (opt_einsum)", {}).get("_fb")
            r["_dense_fb"] = by.get("nn.Linear", {}).get("_fb")
            ref_mem = by.get("tltorch (opt_einsum)", {}).get("_mem")
            # Resident-set counters are only good to a fraction of a MiB on CPU.
            if ref_mem and r["_mem"] is not None and (ref_mem >= MiB or device != "cpu"):
                r["mem vs tltorch"] = r["_mem"] / ref_mem


def check_targets(rows: list[dict]) -> list[str]:
    """Targets, evaluated on the measured rows."""
    lines = []
    for r in rows:
        if r["impl"] != "CPLinear" or "_fb" not in r:
            continue
        tag = f"{r['layer']} rank {r['rank']}"
        s = r.get("fwd+bwd speedup vs tltorch")
        if s is not None:
            ok = "met" if s >= 2 else "MISSED"
            line = f"- {tag}: fwd+bwd {s:.2f}x faster than tltorch (opt_einsum), target 2x: {ok}"
            floor, tl = r.get("_floor_fb"), r.get("_tl_fb")
            if floor and tl:
                line += (
                    f" (the GEMMs alone take {floor * 1e3:.2f} ms: CPLinear is "
                    f"{r['_fb'] / floor:.2f}x that floor, tltorch {tl / floor:.2f}x, so 2x "
                    f"{'is' if tl / floor >= 2 else 'is not'} reachable without fewer FLOPs)"
                )
            lines.append(line)
        m = r.get("mem vs tltorch")
        if m is not None:
            ok = "met" if m <= 1.0 else "MISSED"
            lines.append(f"- {tag}: peak memory {m:.2f}x tltorch's, target <= 1x: {ok}")
        if r["dense/impl FLOPs"] and r["dense/impl FLOPs"] >= 4:
            f, fb = r["fwd speedup vs dense"], r["fwd+bwd speedup vs dense"]
            ok = "met" if f > 1 and fb > 1 else "MISSED"
            lines.append(
                f"- {tag}: {r['dense/impl FLOPs']:.1f}x fewer FLOPs than dense, speedup fwd "
                f"{f:.2f}x, fwd+bwd {fb:.2f}x, target > 1x: {ok} (fwd+bwd: nn.Linear "
                f"{r['_dense_fb'] * 1e3:.3f} ms, CPLinear {r['_fb'] * 1e3:.3f} ms)"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a few-second run")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--ranks", type=int, nargs="*", default=None)
    ap.add_argument(
        "--mem-budget-gib", type=float, default=2.0, help="skip runs estimated above this"
    )
    ap.add_argument("--no-write", action="store_true", help="print only (implied by --quick)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(sys.stdin.read()), args.device)))
        return

    ranks = args.ranks or ([16] if args.quick else [16, 64, 256])
    rounds, min_run = (1, 0.05) if args.quick else (9, 0.05)
    budget = int(args.mem_budget_gib * 2**30)
    try:  # never plan for more than a quarter of what is free right now
        if args.device.startswith("cuda"):
            avail = torch.cuda.mem_get_info()[0]
        else:
            with open("/proc/meminfo") as fh:
                avail = next(
                    int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("MemAvailable")
                )
        budget = min(budget, avail // 4)
    except (OSError, StopIteration):
        pass
    main_cfg = dict(in_shape=(32, 32), out_shape=(32, 32), batch=256)
    small = dict(in_shape=(16, 16), out_shape=(16, 16), batch=16)
    small_ranks = [4] if args.quick else [4, 16]

    rows = time_config(main_cfg, ranks, args.device, rounds, min_run, budget)
    small_rows = time_config(small, small_ranks, args.device, rounds, min_run, budget)
    add_memory_and_ratios(rows + small_rows, args.device, args.threads)
    cols = [
        "layer",
        "rank",
        "impl",
        "params",
        "fwd GFLOP",
        "dense/impl FLOPs",
        "fwd ms",
        "fwd+bwd ms",
        "peak MiB",
        "fwd speedup vs dense",
        "fwd+bwd speedup vs dense",
        "fwd speedup vs tltorch",
        "fwd+bwd speedup vs tltorch",
        "mem vs tltorch",
    ]
    env = environment(args.device)
    env["command"] = "python -m benchmarks.bench_cp_linear " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    env["batch"] = f"{main_cfg['batch']} (main table), {small['batch']} (small layer)"
    env["dtype"] = "float32"
    env["timing"] = f"median of {rounds} interleaved rounds, blocked_autorange({min_run}s)"
    env["memory budget"] = f"{budget / 2**30:.1f} GiB"
    targets = check_targets(rows + small_rows)
    body = (
        "## 1024 x 1024, batch 256\n\n"
        + markdown_table(rows, cols)
        + f"\n\n## Small layer (tltorch without opt_einsum can run), batch {small['batch']}\n\n"
        + markdown_table(small_rows, cols)
        + "\n\n## Targets\n\n"
        + "\n".join(targets)
        + "\n"
    )
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# CPLinear vs TensorLy-Torch CP vs nn.Linear ({args.device})\n\n{header}\n\n{body}"
    print(text)
    if not (args.no_write or args.quick):
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"cp_linear_{args.device.split(':')[0]}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
