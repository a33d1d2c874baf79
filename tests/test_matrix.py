import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_metric.data import matrix as matrix_module
from recsys_metric.data.matrix import InteractionMatrix, sorted_distinct


def test_from_pairs_sorts_and_deduplicates():
    m = InteractionMatrix.from_pairs(
        np.array([1, 0, 0, 1, 0]), np.array([2, 3, 1, 2, 3]), n_users=3, n_items=4
    )
    assert m.indptr.tolist() == [0, 2, 3, 3]
    assert m.row(0).tolist() == [1, 3]
    assert m.row(1).tolist() == [2]
    assert m.row(2).tolist() == []
    assert m.row_lengths().tolist() == [2, 1, 0]
    assert m.nnz == 3


def test_out_of_range_numbers_are_rejected():
    with pytest.raises(ValueError, match=r"item numbers must lie in \[0, 2\)"):
        InteractionMatrix.from_pairs(np.array([0]), np.array([2]), 1, 2)
    with pytest.raises(ValueError, match=r"user numbers must lie in \[0, 1\)"):
        InteractionMatrix.from_pairs(np.array([1]), np.array([0]), 1, 2)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), max_size=40), st.integers(0, 2**31))
def test_contains_matches_a_python_set(pairs, seed):
    users = np.array([p[0] for p in pairs], dtype=np.int64)
    items = np.array([p[1] for p in pairs], dtype=np.int64)
    m = InteractionMatrix.from_pairs(users, items, n_users=7, n_items=10)
    rng = np.random.default_rng(seed)
    qu, qi = rng.integers(0, 7, 60), rng.integers(0, 10, 60)
    expected = np.array([(u, i) in set(pairs) for u, i in zip(qu.tolist(), qi.tolist(), strict=True)])
    assert (m.contains(qu, qi) == expected).all()
    two_d = m.contains(qu[:20], np.stack([qi[:20], qi[20:40]], axis=1))
    assert two_d.shape == (20, 2)
    assert (two_d[:, 1] == m.contains(qu[:20], qi[20:40])).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), max_size=60))
def test_sorted_distinct_matches_sorted_set(values):
    out = sorted_distinct(np.array(values, dtype=np.int64))
    assert out.dtype == np.int64
    assert out.tolist() == sorted(set(values))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 9)), max_size=40), st.integers(0, 2**31))
def test_from_sorted_keys_equals_from_pairs_and_blocks_do_not_matter(pairs, seed):
    users = np.array([p[0] for p in pairs], dtype=np.int64)
    items = np.array([p[1] for p in pairs], dtype=np.int64)
    reference = InteractionMatrix.from_pairs(users, items, n_users=7, n_items=10)
    keys = np.array(sorted({u * 10 + i for u, i in pairs}), dtype=np.int64)
    rng = np.random.default_rng(seed)
    qu, qi = rng.integers(0, 7, 30), rng.integers(0, 10, 30)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matrix_module, "_BLOCK", 4)
        m = InteractionMatrix.from_sorted_keys(keys, n_users=7, n_items=10)
        hits = m.contains(qu, qi)
    assert m.indptr.tolist() == reference.indptr.tolist()
    assert m.indices.tolist() == reference.indices.tolist()
    assert m.indptr.dtype == np.int64 and m.indices.dtype == np.int32
    assert m.keys().tolist() == keys.tolist()
    assert (hits == reference.contains(qu, qi)).all()


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.uint64])
def test_from_pairs_accepts_any_integer_dtype_block_by_block(dtype):
    users = np.array([1, 0, 0, 1, 0, 2, 2], dtype=dtype)
    items = np.array([2, 3, 1, 2, 3, 0, 3], dtype=dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matrix_module, "_BLOCK", 2)
        m = InteractionMatrix.from_pairs(users, items, n_users=3, n_items=4)
    assert m.indptr.tolist() == [0, 2, 3, 5]
    assert m.indices.tolist() == [1, 3, 2, 0, 3]
    assert m.keys().tolist() == [1, 3, 6, 8, 11]
