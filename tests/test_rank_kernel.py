"""The compiled masked top-k (recsys_metric.rank_kernel) against a brute-force ranking, and the
evaluator's two selection paths against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_metric import evaluate as evaluate_module
from recsys_metric import rank_kernel
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.evaluate import evaluate_scores

pytestmark = pytest.mark.skipif(not rank_kernel.available(), reason="numba is not installed")


def _brute(scores, k, excluded, seen):
    """Best first, equal scores by lower item; masked, NaN and -inf entries never returned."""
    n_rows, n_items = scores.shape
    items = np.full((n_rows, k), -1, dtype=np.int64)
    values = np.full((n_rows, k), -np.inf, dtype=scores.dtype)
    for r in range(n_rows):
        ok = ~np.isnan(scores[r]) & (scores[r] > -np.inf)
        if excluded is not None:
            ok &= ~excluded
        if seen is not None:
            indptr, indices, users = seen
            ok[indices[indptr[users[r]] : indptr[users[r] + 1]]] = False
        cands = np.flatnonzero(ok)
        order = np.lexsort((cands, -scores[r, cands]))[:k]
        items[r, : order.size] = cands[order]
        values[r, : order.size] = scores[r, cands[order]]
    return items, values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_top_k_matches_a_brute_force_ranking_with_ties_masks_nan_and_short_rows(dtype):
    rng = np.random.default_rng(3)
    for trial in range(300):
        n_rows, n_items, k = int(rng.integers(1, 9)), int(rng.integers(1, 150)), int(rng.integers(1, 80))
        # Few distinct values: ties everywhere, across the k-th place too.
        scores = rng.integers(-3, 4, (n_rows, n_items)).astype(dtype)
        scores[rng.random(scores.shape) < 0.05] = np.nan
        scores[rng.random(scores.shape) < 0.05] = -np.inf
        scores[rng.random(scores.shape) < 0.01] = np.inf
        excluded = rng.random(n_items) < 0.2 if trial % 2 else None
        lists = [
            np.sort(rng.choice(n_items, int(rng.integers(0, n_items + 1)), replace=False)) for _ in range(6)
        ]
        indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
        indices = np.concatenate(lists).astype(np.int32)
        seen = (indptr, indices, rng.integers(0, 6, n_rows).astype(np.int64)) if trial % 3 else None
        items, values, n_nan = rank_kernel.masked_top_k(
            scores, k, excluded=excluded, seen=seen, threads=int(rng.integers(1, 4))
        )
        expected_items, expected_values = _brute(scores, k, excluded, seen)
        np.testing.assert_array_equal(items, expected_items, err_msg=f"trial {trial}")
        np.testing.assert_array_equal(values, expected_values, err_msg=f"trial {trial}")
        assert values.dtype == dtype
        assert n_nan == int(np.isnan(scores).sum()), "NaN counted wherever it is, masked entries too"


def test_masked_top_k_refuses_what_it_cannot_read():
    scores = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32/float64"):
        rank_kernel.masked_top_k(scores.T.copy().T, 2)
    with pytest.raises(ValueError, match="C-contiguous float32/float64"):
        rank_kernel.masked_top_k(scores.astype(np.int32), 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        rank_kernel.masked_top_k(scores, 0)
    with pytest.raises(ValueError, match=r"excluded must be bool \[5\]"):
        rank_kernel.masked_top_k(scores, 2, excluded=np.zeros(4, dtype=bool))


def _random_evaluation(seed: int):
    rng = np.random.default_rng(seed)
    n_users, n_items = 300, 700
    train_users = rng.integers(0, n_users, 4000)
    test_users = rng.integers(0, n_users, 900)
    train = InteractionMatrix.from_pairs(train_users, rng.integers(0, n_items, 4000), n_users, n_items)
    test = InteractionMatrix.from_pairs(test_users, rng.integers(0, n_items, 900), n_users, n_items)
    # Rounded scores tie often; 5% of the items are outside the candidates.
    table = torch.from_numpy(np.round(rng.standard_normal((n_users, n_items)), 1).astype(np.float32))
    return train, test, table, rng.random(n_items) >= 0.05


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_the_evaluator_gives_the_same_metrics_through_the_kernel_and_the_tensor_path(
    monkeypatch, exclude_seen
):
    train, test, table, mask = _random_evaluation(5)

    def score_fn(users: np.ndarray) -> torch.Tensor:
        return table[torch.from_numpy(users)]

    args = dict(ks=(5, 20, 50), candidate_mask=mask, exclude_seen=exclude_seen, batch_size=64)
    with_kernel = evaluate_scores(score_fn, train, test, **args)
    monkeypatch.setattr(evaluate_module.rank_kernel, "available", lambda: False)
    with_tensors = evaluate_scores(score_fn, train, test, **args)
    assert with_kernel == with_tensors
    assert with_kernel["coverage@50"] > 0 and with_kernel["recall@20"] > 0


@pytest.mark.parametrize("kernel", [True, False])
def test_nan_in_a_masked_entry_is_found_by_either_path(monkeypatch, kernel):
    train, test, table, mask = _random_evaluation(6)
    user = int(np.flatnonzero(test.row_lengths() > 0)[0])
    seen_item = int(train.row(user)[0]) if train.row_lengths()[user] else 0
    table[user, seen_item] = float("nan")  # a seen item: masked for this user
    table[user, int(np.flatnonzero(~mask)[0])] = float("nan")  # outside the candidates
    if not kernel:
        monkeypatch.setattr(evaluate_module.rank_kernel, "available", lambda: False)
    with pytest.raises(ValueError, match="score_fn returned 2 NaN scores"):
        evaluate_scores(
            lambda users: table[torch.from_numpy(users)], train, test, candidate_mask=mask, batch_size=512
        )
