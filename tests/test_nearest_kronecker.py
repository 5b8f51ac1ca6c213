"""nearest_kronecker: exact on Kronecker sums, optimal (SVD tail) for two factors."""

import numpy as np
import pytest
import torch

from kronlayers import kron_dense, nearest_kronecker
from kronlayers.decomposition import kron_rearrange

F64 = torch.float64


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("shapes", [((3, 5), (4, 6)), ((5, 3), (6, 4)), ((1, 4), (3, 1))])
def test_exact_on_kronecker_sums_two_factors(rank, shapes):
    out_shape, in_shape = shapes
    rank = min(rank, min(o * i for o, i in zip(out_shape, in_shape, strict=True)))
    fs = [torch.randn(rank, o, i, dtype=F64) for o, i in zip(out_shape, in_shape, strict=True)]
    w = kron_dense(fs)
    got = nearest_kronecker(w, out_shape, in_shape, rank=rank)
    assert [tuple(g.shape) for g in got] == [
        (rank, o, i) for o, i in zip(out_shape, in_shape, strict=True)
    ]
    torch.testing.assert_close(kron_dense(got), w, rtol=1e-10, atol=1e-10)


def test_exact_on_kronecker_product_three_factors():
    fs = [torch.randn(1, o, i, dtype=F64) for o, i in [(2, 3), (4, 2), (3, 3)]]
    w = kron_dense(fs)
    got = nearest_kronecker(w, (2, 4, 3), (3, 2, 3))
    torch.testing.assert_close(kron_dense(got), w, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_optimal_error_equals_svd_tail(rank):
    w = torch.randn(12, 20, dtype=F64)
    out_shape, in_shape = (3, 4), (4, 5)
    got = nearest_kronecker(w, out_shape, in_shape, rank=rank)
    err2 = (w - kron_dense(got)).square().sum()
    s = torch.linalg.svdvals(kron_rearrange(w, out_shape, in_shape))
    torch.testing.assert_close(err2, s[rank:].square().sum(), rtol=1e-10, atol=1e-10)


def test_random_kronecker_products_are_not_better():
    # Optimality in a second form: no random rank-1 Kronecker product is closer.
    w = torch.randn(6, 6, dtype=F64)
    best = (w - kron_dense(nearest_kronecker(w, (2, 3), (2, 3)))).norm()
    for _ in range(50):
        fs = [torch.randn(1, 2, 2, dtype=F64), torch.randn(1, 3, 3, dtype=F64)]
        assert (w - kron_dense(fs)).norm() >= best


def test_float32_and_dtype_kept():
    w = torch.randn(12, 20)
    got = nearest_kronecker(w, (3, 4), (4, 5), rank=2)
    assert all(g.dtype == torch.float32 for g in got)
    ref = nearest_kronecker(w.double(), (3, 4), (4, 5), rank=2)
    torch.testing.assert_close(kron_dense(got).double(), kron_dense(ref), rtol=1e-4, atol=1e-5)


def test_single_factor():
    w = torch.randn(3, 4, dtype=F64)
    got = nearest_kronecker(w, (3,), (4,), rank=2)
    torch.testing.assert_close(kron_dense(got), w)


def test_errors():
    w = torch.randn(12, 20)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        nearest_kronecker(w[0], (3, 4), (4, 5))
    with pytest.raises(ValueError, match=r"out_shape=\(3, 5\) has product 15"):
        nearest_kronecker(w, (3, 5), (4, 5))
    with pytest.raises(ValueError, match="same length"):
        nearest_kronecker(w, (12,), (4, 5))
    with pytest.raises(ValueError, match=r"rank must be <= min\(out_1\*in_1, out_2\*in_2\) = 12"):
        nearest_kronecker(w, (3, 4), (4, 5), rank=13)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        nearest_kronecker(w, (3, 4), (4, 5), rank=0)
    # Wrong Python types are TypeErrors naming the argument; NumPy ints are ints.
    with pytest.raises(TypeError, match="rank must be an int, got float 1.5"):
        nearest_kronecker(w, (3, 4), (4, 5), rank=1.5)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor, got list"):
        nearest_kronecker(w.tolist(), (3, 4), (4, 5))
    with pytest.raises(TypeError, match=r"out_shape must contain ints, got \(3, 4.0\)"):
        nearest_kronecker(w, (3, 4.0), (4, 5))
    got = nearest_kronecker(w, (np.int64(3), 4), (4, 5), rank=np.int64(2))
    assert [tuple(g.shape) for g in got] == [(2, 3, 4), (2, 4, 5)]
