"""A real transformer, compressed: time of the whole model against the dense one.

    python -m benchmarks.bench_model [--threads N] [--quick] [--no-write]

The model is Hugging Face ``transformers``' ``BertModel`` built from a small config (6
layers, hidden 384, intermediate 1536, 6 heads: the size at which the performance issue
measured a 51x slowdown after ``compress(method="kronecker", ratio=0.5)``), random
weights, a batch of 8 sequences of 128 tokens (1024 rows per linear layer). For each
``compress`` method and rank fraction the model is compressed (data-free, in place on a
copy) and timed, forward (inference, ``no_grad``) and forward+backward (the gradient of
the summed last hidden state w.r.t. every parameter), interleaved with the dense model in
the same run; the table gives the ratio to dense and which path each linear layer's
dispatcher takes (``summary``'s path column), so a slowdown can be traced to a layer.
Results: ``benchmarks/results/model_cpu.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter

import torch

from benchmarks._harness import RESULTS, environment, interleaved_medians, markdown_table
from kronlayers import compress
from kronlayers.modules import FactorizedLayer

CASES = [
    ("kronecker", 0.5),
    ("kronecker", 0.1),
    ("cp", 0.5),
    ("cp", 0.1),
    ("lowrank", 0.5),
    ("lowrank", 0.25),
]


def build_model(quick: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    layers = 2 if quick else 6
    config = BertConfig(
        vocab_size=1000,
        hidden_size=384,
        num_hidden_layers=layers,
        num_attention_heads=6,
        intermediate_size=1536,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return BertModel(config).eval()


def paths(model: torch.nn.Module, rows: int) -> str:
    """How many factorized layers run each dispatch path at ``rows`` rows, with gradients."""
    count: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, FactorizedLayer):
            shape = (rows, m.in_features) if hasattr(m, "in_features") else None
            if shape is not None:
                count[m.dispatch_path(shape, requires_grad=True)] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(count.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dense = build_model(args.quick)
    batch, seq = (2, 64) if args.quick else (8, 128)
    ids = torch.randint(0, 1000, (batch, seq))
    models = {"dense": dense}
    info = {"dense": ("", sum(p.numel() for p in dense.parameters()), "")}
    for method, ratio in CASES:
        m = copy.deepcopy(dense)
        _, report = compress(m, method=method, rank=ratio)
        name = f"{method} rank={ratio}"
        models[name] = m
        info[name] = (method, sum(p.numel() for p in m.parameters()), paths(m, batch * seq))
        del report

    def fwd(m):
        def f():
            with torch.no_grad():
                return m(ids).last_hidden_state

        return f

    def fwd_bwd(m):
        params = [p for p in m.parameters() if p.requires_grad]

        def f():
            out = m(ids).last_hidden_state.sum()
            return torch.autograd.grad(out, params, allow_unused=True)  # the pooler is unused

        return f

    min_run = 0.2 if args.quick else 1.0
    t_f = interleaved_medians({k: fwd(m) for k, m in models.items()}, rounds=args.rounds,
                              min_run_time=min_run)  # fmt: skip
    t_fb = interleaved_medians({k: fwd_bwd(m) for k, m in models.items()}, rounds=args.rounds,
                               min_run_time=min_run)  # fmt: skip
    rows = []
    for name in models:
        rows.append(
            {
                "model": name,
                "params": f"{info[name][1]:,}",
                "params / dense": f"{info[name][1] / info['dense'][1]:.2f}",
                "fwd ms": f"{t_f[name] * 1e3:.1f}",
                "fwd / dense": f"{t_f[name] / t_f['dense']:.2f}",
                "fwd+bwd ms": f"{t_fb[name] * 1e3:.1f}",
                "fwd+bwd / dense": f"{t_fb[name] / t_fb['dense']:.2f}",
                "factorized layers' paths (training)": info[name][2],
            }
        )
    env = environment("cpu")
    header = [
        "# A compressed transformer vs the dense one (cpu)",
        "",
        f"Command: `python -m benchmarks.bench_model{' --quick' if args.quick else ''}"
        f"{f' --threads {args.threads}' if args.threads else ''}`",
        "",
        *[f"- {k}: {v}" for k, v in env.items()],
        f"- model: transformers BertModel, {len(dense.encoder.layer)} layers, hidden 384, "
        f"intermediate 1536; input {batch} x {seq} tokens ({batch * seq} rows per linear layer)",
        f"- timing: medians of {args.rounds} interleaved rounds; fwd under no_grad, fwd+bwd = "
        "gradients of the summed output w.r.t. every parameter",
        "- compression: `compress(model, method=..., rank=...)`, data-free; the embeddings "
        "stay dense (params / dense counts them)",
        "",
    ]
    text = "\n".join(header) + "\n" + markdown_table(rows, list(rows[0])) + "\n"
    print(text)
    if not args.no_write and not args.quick:
        out = RESULTS / "model_cpu.md"
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
