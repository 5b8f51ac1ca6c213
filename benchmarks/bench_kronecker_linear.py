"""KroneckerLinear vs nn.Linear vs FastKron, forward and forward+backward.

    python -m benchmarks.bench_kronecker_linear [--device cuda] [--quick]

FastKron (``pyfastkron``, hand-tuned C++/CUDA Kronecker-matrix multiply with its own
backward) is optional: install it with ``pip install --no-deps pyfastkron`` so that it cannot
replace the installed torch build.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks._harness import (
    dense_matmul_gflops,
    environment,
    interleaved_medians,
    markdown_table,
    peak_cuda_memory,
    write_report,
)
from kronlayers import KroneckerLinear
from kronlayers.functional import kronecker_linear_flops

try:  # optional peer
    from pyfastkron import fastkrontorch as _fk
except ImportError:  # pragma: no cover - depends on the environment
    _fk = None


def _fastkron_forward(layer: KroneckerLinear):
    # gemkm computes X @ (G_1 ⊗ ... ⊗ G_d) with G_k (in_k, out_k): G_k = F_k^T.
    fs = [f[0].detach().T.contiguous().requires_grad_() for f in layer.factors]

    def fwd(x):
        return _fk.gemkm(x, fs)

    return fwd, fs


def run(device: str, quick: bool) -> str:
    sizes = [(1024, (32, 32))] if quick else [(1024, (32, 32)), (4096, (64, 64))]
    batch = 32 if quick else 256
    rounds = 2 if quick else 5
    min_run = 0.02 if quick else 0.1
    rows = []
    peak = dense_matmul_gflops(device, n=512 if quick else 2048)
    for n, shape in sizes:
        torch.manual_seed(0)
        dense = nn.Linear(n, n, bias=False, device=device)
        kron = KroneckerLinear(n, n, bias=False, in_shape=shape, out_shape=shape, device=device)
        x = torch.randn(batch, n, device=device)
        xg = x.clone().requires_grad_()
        cases = {
            "nn.Linear": dense,
            "KroneckerLinear": kron,
        }
        if _fk is not None:
            fk_fwd, _ = _fastkron_forward(kron)
            cases["FastKron"] = fk_fwd
        fwd = {}
        fwdbwd = {}
        for name, fn in cases.items():

            def f(fn=fn, x=x):
                with torch.no_grad():
                    return fn(x)

            def fb(fn=fn, xg=xg):
                fn(xg).sum().backward()

            fwd[name] = f
            fwdbwd[name] = fb
        t_fwd = interleaved_medians(fwd, device=device, rounds=rounds, min_run_time=min_run)
        t_fb = interleaved_medians(fwdbwd, device=device, rounds=rounds, min_run_time=min_run)
        params = {
            "nn.Linear": n * n,
            "KroneckerLinear": kron.num_factor_parameters(),
            "FastKron": kron.num_factor_parameters(),
        }
        flops = {
            "nn.Linear": 2 * batch * n * n,
            "KroneckerLinear": kronecker_linear_flops(shape, shape, 1, batch),
            "FastKron": kronecker_linear_flops(shape, shape, 1, batch),
        }
        for name in cases:
            row = {
                "size": f"{n}x{n}",
                "factors": " ⊗ ".join(f"{s}x{s}" for s in shape) if name != "nn.Linear" else "-",
                "batch": batch,
                "layer": name,
                "params": params[name],
                "fwd GFLOP": flops[name] / 1e9,
                "fwd ms": t_fwd[name] * 1e3,
                "fwd+bwd ms": t_fb[name] * 1e3,
                "fwd vs dense": t_fwd[name] / t_fwd["nn.Linear"],
                "fwd+bwd vs dense": t_fb[name] / t_fb["nn.Linear"],
                "fwd GFLOP/s": flops[name] / t_fwd[name] / 1e9,
                "% of mm peak": 100 * flops[name] / t_fwd[name] / 1e9 / peak,
            }
            if "FastKron" in cases:
                row["fwd+bwd vs FastKron"] = t_fb[name] / t_fb["FastKron"]
            if device.startswith("cuda"):
                row["peak MiB fwd+bwd"] = peak_cuda_memory(fwdbwd[name]) / 2**20
            rows.append(row)
        del dense, kron
    cols = [
        "size",
        "factors",
        "batch",
        "layer",
        "params",
        "fwd GFLOP",
        "fwd ms",
        "fwd+bwd ms",
        "fwd vs dense",
        "fwd+bwd vs dense",
        "fwd+bwd vs FastKron",
        "fwd GFLOP/s",
        "% of mm peak",
    ]
    if device.startswith("cuda"):
        cols.append("peak MiB fwd+bwd")
    env = environment(device)
    env["dense mm GFLOP/s (ceiling)"] = round(peak, 1)
    env["FastKron"] = "not installed"
    if _fk is not None:
        import pyfastkron

        env["FastKron"] = f"pyfastkron {pyfastkron.__version__}"
    table = markdown_table(rows, cols)
    body = (
        "Command: `python -m benchmarks.bench_kronecker_linear"
        + (f" --device {device}" if device != "cpu" else "")
        + (" --quick" if quick else "")
        + "`\n\nMedians of interleaved rounds (torch.utils.benchmark). Ratios below 1 mean "
        "faster than the reference. FLOP ratio Kronecker/dense at 4096 with 64x64 ⊗ 64x64: "
        f"1/{2 * 4096 * 4096 // kronecker_linear_flops((64, 64), (64, 64), 1, 1)}.\n\n" + table
    )
    name = f"kronecker_linear_{'cuda' if device.startswith('cuda') else 'cpu'}"
    if quick:
        name += "_quick"
    write_report(name, "KroneckerLinear vs nn.Linear vs FastKron", env, body, rows)
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = p.parse_args(argv)
    print(run(args.device, args.quick))


if __name__ == "__main__":
    main()
