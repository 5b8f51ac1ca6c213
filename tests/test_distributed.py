"""DistributedDataParallel over the compressed layers: 2 CPU processes on gloo (loopback only)
train to the same parameters as one process on the same global batch."""

import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kronlayers import CPConv2d, CPLinear, KroneckerLinear

WORLD_SIZE = 2
STEPS = 4
LR = 0.1
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch was built without torch.distributed / gloo",
)


def make_model() -> nn.Module:
    """Every layer type, float64; input ``(N, 2, 4, 4)``, output ``(N, 3)``."""
    torch.manual_seed(0)
    return nn.Sequential(
        CPConv2d(2, 3, 3, padding=1, rank=2),
        nn.Flatten(),
        KroneckerLinear(48, 20, rank=2),
        nn.Tanh(),
        KroneckerLinear(20, 8, rank=1, in_shape=(2, 10), out_shape=(2, 4)),
        nn.Tanh(),
        CPLinear(8, 3, rank=2),
    ).double()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 4, 4, dtype=torch.float64, generator=g)
    y = torch.randn(16, 3, dtype=torch.float64, generator=g)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """``STEPS`` SGD steps on the mean squared error (a mean, so DDP's averaging is exact)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, init_method: str, out_path: str) -> None:
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
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = make_batch()
        half = x.shape[0] // WORLD_SIZE
        part = slice(rank * half, (rank + 1) * half)
        train(model, x[part], y[part])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    context = mp.spawn(_worker, args=(init_method, out_path), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    ddp_state = torch.load(out_path, weights_only=True)

    reference = make_model()
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    train(reference, *make_batch())
    assert ddp_state.keys() == reference.state_dict().keys()
    for name, value in reference.state_dict().items():
        assert not torch.equal(value, initial[name]), name  # training moved every parameter
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-12, atol=1e-14)
