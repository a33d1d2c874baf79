"""bench.cold_start's protocol pieces: the cold split, the metrics, the tag kNN baseline."""

import numpy as np
import polars as pl

from bench.cold_start import ColdData, cold_split, rank_metrics, tag_knn
from recsys_metric.data.matrix import InteractionMatrix


def _data() -> ColdData:
    rng = np.random.default_rng(0)
    users = rng.integers(0, 20, 400)
    items = rng.integers(0, 50, 400)
    tokens = [[f"t{i % 5}"] for i in range(50)]
    table = pl.DataFrame({"item_id": np.arange(50), "tags": tokens})
    return ColdData("toy", 20, 50, users, items, users, items, table, ("tags",), tokens)


def test_cold_split_holds_out_a_fifth_of_the_items_entirely():
    data = _data()
    split = cold_split(data, seed=0)
    assert split.cold.size == round(0.2 * np.unique(data.items).size)
    assert np.intersect1d(split.cold, split.warm).size == 0
    assert split.train_liked.n_items == split.warm.size and split.test.n_items == split.cold.size
    is_cold = np.isin(data.items, split.cold)
    pairs = {(u, i) for u, i in zip(data.users[is_cold], data.items[is_cold], strict=True)}
    assert split.test.nnz == len(pairs)
    assert split.train_liked.nnz == len(
        {(u, i) for u, i in zip(data.users[~is_cold], data.items[~is_cold], strict=True)}
    )
    np.testing.assert_array_equal(cold_split(data, seed=0).cold, split.cold)
    assert not np.array_equal(cold_split(data, seed=1).cold, split.cold)


def test_rank_metrics_known_answer():
    # User 0 likes cold items 0 and 3 of 30; scores put item 3 first and item 0 at rank 25 (out of the top 20).
    test = InteractionMatrix.from_pairs(np.array([0, 0]), np.array([0, 3]), 1, 30)
    scores = np.linspace(1.0, 0.0, 30, dtype=np.float32)[None, :].copy()
    scores[0, [3, 0]] = scores[0, [0, 24]]
    scores[0, 24] = 1.0 - 24 / 29
    order = np.argsort(-scores[0])
    assert order[0] == 3 and list(order).index(0) >= 20
    m = rank_metrics(scores, test, np.array([0]))
    assert m["recall@20"] == 0.5
    np.testing.assert_allclose(m["ndcg@20"], 1.0 / (1.0 + 1.0 / np.log2(3)))


def test_tag_knn_ranks_items_sharing_the_users_tags_first():
    data = _data()
    split = cold_split(data, seed=0)
    users = np.flatnonzero(split.test.row_lengths() > 0)
    scores = tag_knn(data, split, users)
    for row, user in enumerate(users):
        liked_tags = {data.tokens[split.warm[i]][0] for i in split.train_liked.row(user)}
        best = split.cold[np.argmax(scores[row])]
        if liked_tags:
            assert data.tokens[best][0] in liked_tags
