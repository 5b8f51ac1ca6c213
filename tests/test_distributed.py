"""Data-parallel training over every registered layer (``layer_specs.SPECS``): 2 CPU processes
on gloo (loopback only) train to the same parameters as one process on the same global batch,
with DistributedDataParallel and with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Both run in one pair of spawned workers (spawning and importing torch is most of the cost),
which save their final parameters for the tests below to compare.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from layer_specs import SPECS
from torch import nn

from kronlayers.modules import FactorizedLayer

WORLD_SIZE = 2
GLOBAL_BATCH = 16
STEPS = 4
LR = 0.1
TIMEOUT_S = 120
F64 = torch.float64
MODES = ("ddp", "fsdp2")

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch was built without torch.distributed / gloo",
)


def make_model() -> nn.Sequential:
    """Every spec's layer in one ``nn.Sequential``, float64; input ``(N, 8)``, output ``(N, 3)``.
    A dense ``Linear`` + ``Unflatten`` adapts each layer's input shape and the output is
    flattened, so a newly registered layer joins the chain through its spec."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    width = 8
    for spec in SPECS:
        layer = spec.make(dtype=F64)
        inner = spec.input_shape[1:]
        with torch.no_grad():
            out_numel = layer(torch.zeros(1, *inner, dtype=F64)).numel()
        blocks += [nn.Linear(width, math.prod(inner), dtype=F64), nn.Unflatten(1, inner), layer]
        blocks += [nn.Flatten(), nn.Tanh()]
        width = out_numel
    blocks.append(nn.Linear(width, 3, dtype=F64))
    return nn.Sequential(*blocks)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 8, dtype=F64, generator=g)
    y = torch.randn(GLOBAL_BATCH, 3, dtype=F64, generator=g)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``STEPS`` SGD steps on the mean squared error (a mean, so the data-parallel gradient
    average over equal shards is the full batch's gradient)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _local_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_batch()
    part = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    return x[part], y[part]


def _train_ddp(rank: int) -> dict[str, torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(make_model())
    train(model, *_local_batch(rank))
    return model.module.state_dict()


def _train_fsdp2(rank: int) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    model = make_model()
    for module in model:
        if isinstance(module, FactorizedLayer):
            fully_shard(module, mesh=mesh)  # one parameter group per factorized layer
    fully_shard(model, mesh=mesh)  # the dense adapters
    assert all(isinstance(p, DTensor) for p in model.parameters())
    train(model, *_local_batch(rank))
    # full_tensor() is a collective: every rank gathers, rank 0 saves.
    return {name: value.full_tensor() for name, value in model.state_dict().items()}


_TRAINERS = {"ddp": _train_ddp, "fsdp2": _train_fsdp2}


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    try:
        for mode in MODES:
            # An error in one mode is recorded for its test and the other mode still runs.
            # Both ranks run the same code on the same shapes, so they fail alike and no
            # rank is left waiting in a collective.
            try:
                state = _TRAINERS[mode](rank)
            except Exception:
                Path(out_dir, f"{mode}.rank{rank}.error").write_text(traceback.format_exc())
                continue
            if rank == 0:
                torch.save(state, Path(out_dir, f"{mode}.pt"))
        # Every rank reaches this point before any rank tears gloo down: a rank that closes
        # its connections while its peer still uses them makes the peer's gloo abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir: Path) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.spawn(_worker, args=(init_method, str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Run the workers once; the directory holds ``<mode>.pt`` or ``<mode>.rank*.error``."""
    for attempt in (1, 2):
        out_dir = tmp_path_factory.mktemp(f"distributed{attempt}")
        try:
            _spawn(out_dir)
            return out_dir
        except mp.ProcessExitedException as e:
            # gloo occasionally aborts a worker (SIGABRT from a C++ exception on its socket
            # threads, e.g. "Connection reset by peer") on a heavily loaded machine. That is
            # the transport, not the layers: retry once. A Python error in a worker raises
            # ProcessRaisedException instead and is never retried; another abort fails.
            if attempt == 2 or e.signal_name != signal.Signals.SIGABRT.name:
                raise
            print(f"retrying the distributed workers after: {e}", file=sys.stderr)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The single-process run on the global batch: (initial, final) parameters."""
    model = make_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, *make_batch())
    return initial, model.state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_matches_single_process(mode, trained, reference):
    errors = sorted(trained.glob(f"{mode}.rank*.error"))
    if errors:
        pytest.fail(f"{mode} training failed:\n" + "\n".join(p.read_text() for p in errors))
    state = torch.load(trained / f"{mode}.pt", weights_only=True)
    initial, final = reference
    assert state.keys() == final.keys()
    for name, value in final.items():
        assert not torch.equal(value, initial[name]), name  # training moved every parameter
        torch.testing.assert_close(state[name], value, rtol=1e-12, atol=1e-14, msg=name)


def test_model_has_every_registered_layer():
    from kronlayers.registry import registered_layers

    present = {type(m) for m in make_model().modules()}
    assert set(registered_layers()) <= present
