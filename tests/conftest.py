"""Shared pytest configuration: every test starts from the same RNG state."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
)
DEVICES = ["cpu", CUDA]
