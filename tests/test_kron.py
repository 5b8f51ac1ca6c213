"""kron, kron_dense, kron_matmul and the contraction-order choice."""

import itertools

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

from kronlayers import kron, kron_dense, kron_matmul
from kronlayers.functional._kron_engine import contraction_order, order_cost

F64 = torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sa,sb", [((3, 4), (5, 2)), ((1, 1), (2, 3)), ((4, 1), (1, 6))])
def test_kron_matches_torch_kron_2d(device, sa, sb):
    a = torch.randn(sa, dtype=F64, device=device)
    b = torch.randn(sb, dtype=F64, device=device)
    torch.testing.assert_close(kron(a, b), torch.kron(a, b), rtol=0, atol=0)


def test_kron_batched_broadcasts():
    a = torch.randn(5, 1, 3, 4, dtype=F64)
    b = torch.randn(2, 2, 3, dtype=F64)
    out = kron(a, b)
    assert out.shape == (5, 2, 6, 12)
    for i, j in itertools.product(range(5), range(2)):
        torch.testing.assert_close(out[i, j], torch.kron(a[i, 0], b[j]), rtol=0, atol=0)


def test_kron_errors():
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        kron([[1.0]], torch.ones(1, 1))
    with pytest.raises(ValueError, match="b must have at least 2 dims"):
        kron(torch.ones(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="do not broadcast"):
        kron(torch.ones(2, 1, 1), torch.ones(3, 1, 1))


def test_kron_dense_sums_rank_terms():
    fs = [torch.randn(3, o, i, dtype=F64) for o, i in [(2, 3), (4, 1), (1, 5)]]
    expected = sum(torch.kron(torch.kron(fs[0][r], fs[1][r]), fs[2][r]) for r in range(3))
    torch.testing.assert_close(kron_dense(fs), expected, rtol=1e-14, atol=1e-14)


# Non-square, unequal factors: any row-major/column-major mix-up permutes rows or columns
# of the result and fails these comparisons.
SHAPES = [
    [(3, 4), (5, 6)],
    [(5, 6), (3, 4)],
    [(2, 7), (6, 1), (1, 3)],
    [(4, 2), (3, 5), (2, 2), (1, 3)],
    [(6, 6)],
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPES)
def test_kron_matmul_matches_dense(device, shapes):
    fs = [torch.randn(s, dtype=F64, device=device) for s in shapes]
    dense = fs[0]
    for f in fs[1:]:
        dense = torch.kron(dense, f)
    x = torch.randn(2, 3, dense.shape[1], dtype=F64, device=device)
    torch.testing.assert_close(kron_matmul(fs, x), x @ dense.T, rtol=1e-12, atol=1e-12)
    # a single vector too
    torch.testing.assert_close(kron_matmul(fs, x[0, 0]), dense @ x[0, 0], rtol=1e-12, atol=1e-12)


def test_kron_matmul_catches_the_column_major_bug():
    # The published implicit transform vec(B X A^T) with row-major reshape is a permutation
    # of the right answer; make sure ours differs from it and equals the dense product.
    a, b = torch.randn(3, 2, dtype=F64), torch.randn(2, 2, dtype=F64)
    x = torch.randn(4, dtype=F64)
    wrong = (b @ x.reshape(2, 2) @ a.T).flatten()
    right = torch.kron(a, b) @ x
    assert not torch.allclose(wrong, right)
    torch.testing.assert_close(kron_matmul([a, b], x), right, rtol=1e-12, atol=1e-12)


def test_kron_matmul_gradients_match_autograd():
    fs = [torch.randn(s, dtype=F64, requires_grad=True) for s in [(3, 4), (2, 5)]]
    x = torch.randn(6, 20, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, a, b: kron_matmul([a, b], x), (x, *fs))


def test_kron_matmul_errors():
    with pytest.raises(TypeError, match="factors must be a list"):
        kron_matmul(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"factors\[1\] must be 2-D"):
        kron_matmul([torch.ones(2, 2), torch.ones(1, 2, 2)], torch.ones(4))
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 6\)"):
        kron_matmul([torch.ones(2, 2), torch.ones(3, 3)], torch.ones(5, 7))
    with pytest.raises(
        TypeError,
        match=r"factors\[0\] must have the input's dtype torch.float32, got torch.float64",
    ):
        kron_matmul([torch.ones(2, 2, dtype=F64), torch.ones(3, 3)], torch.ones(5, 6))
    with pytest.raises(
        ValueError, match=r"factors\[1\] must be on the input's device cpu, got meta"
    ):
        kron_matmul([torch.ones(2, 2), torch.ones(3, 3, device="meta")], torch.ones(5, 6))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=6))
def test_contraction_order_is_optimal(pairs):
    sizes_in = [i for i, _ in pairs]
    sizes_out = [o for _, o in pairs]
    chosen = order_cost(sizes_in, sizes_out, contraction_order(sizes_in, sizes_out))
    best = min(
        order_cost(sizes_in, sizes_out, p) for p in itertools.permutations(range(len(pairs)))
    )
    assert chosen == best


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=4),
    st.integers(1, 3),
)
def test_kron_matmul_random_shapes(pairs, batch):
    g = torch.Generator().manual_seed(len(pairs) * 31 + batch)
    fs = [torch.randn(o, i, dtype=F64, generator=g) for o, i in pairs]
    dense = fs[0]
    for f in fs[1:]:
        dense = torch.kron(dense, f)
    x = torch.randn(batch, dense.shape[1], dtype=F64, generator=g)
    torch.testing.assert_close(kron_matmul(fs, x), x @ dense.T, rtol=1e-12, atol=1e-12)
