"""Siamese item-item mode: co-liked pairs, the fused step on one aliased table, the run it publishes."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.config import ModelConfig, TrainConfig, config_from_dict
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.synthetic import generate_log
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.export import read_embeddings
from recsys_metric.model.distances import EuclideanDistance, get_distance
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.pipeline import load_model, model_score_fn, train_run
from recsys_metric.recommend import Recommender
from recsys_metric.train import (
    CoLikedSource,
    FusedTripletStep,
    TrainData,
    co_liked_data,
    fit,
    triplet_objective,
)

N_USERS, N_ITEMS = 300, 150
ITEM_ITEM = {"mode": "item_item"}


@pytest.fixture(scope="module")
def log():
    return generate_log(N_USERS, N_ITEMS, 9000, n_clusters=6, seed=3)


@pytest.fixture(scope="module")
def data(log) -> TrainData:
    """Liked = rating >= 4; with int ids the generator numbers are the dense numbers."""
    frame = log.interactions
    users, items = frame["user_id"].to_numpy(), frame["item_id"].to_numpy()
    liked = frame["rating"].to_numpy() >= 4
    seen = InteractionMatrix.from_pairs(users, items, N_USERS, N_ITEMS)
    return TrainData(
        user_num=users[liked], item_num=items[liked], seen=seen, n_users=N_USERS, n_items=N_ITEMS
    )


def _same_cluster_share(model: TwoTowerModel, item_cluster: np.ndarray, k: int = 5) -> float:
    with torch.no_grad():
        scores = model.score(np.arange(N_ITEMS))
    scores.fill_diagonal_(float("-inf"))
    top = scores.topk(k, dim=1).indices.numpy()
    return float((item_cluster[top] == item_cluster[:, None]).mean())


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_neighbours_of_trained_items_share_their_cluster(log, data, distance):
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=16, distance=distance, **ITEM_ITEM), seed=0)
    # Six clusters: a random neighbour shares the item's cluster about one time in six.
    assert _same_cluster_share(model, log.item_cluster) < 0.4
    config = TrainConfig(epochs=10, batch_size=256, negatives=5, device="cpu", compile="off")
    result = fit(model, data, config, progress=False)
    assert result.fused and model.user_embedding is None
    # The loss falls by 26-33% over these 10 epochs across seeds and samplers (hardest of 5
    # negatives stays hard); the neighbours' clusters (0.98-0.99 shared) are the real check.
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert _same_cluster_share(model, log.item_cluster) >= 0.8
    if distance == "euclidean":
        assert float(model.item_embeddings().detach().norm(dim=1).max()) <= 1.0 + 1e-6


def test_autograd_path_trains_item_item_too(log, data):
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=16, feature_map="linear", **ITEM_ITEM), seed=0)
    config = TrainConfig(epochs=8, batch_size=256, negatives=5, device="cpu", optimizer="adam", lr=0.02)
    result = fit(model, data, config, progress=False)
    assert not result.fused
    assert _same_cluster_share(model, log.item_cluster) >= 0.8


def test_co_liked_positives_are_other_liked_items_of_the_same_user():
    # User 0 likes 4 items, user 1 likes 2, user 2 one (dropped), user 3 none; one duplicate row.
    users = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    items = np.array([3, 5, 7, 9, 9, 2, 3, 4])
    liked = InteractionMatrix.from_pairs(users, items, 4, 10)
    data = co_liked_data(TrainData(user_num=users, item_num=items, seen=liked, n_users=4, n_items=10))
    assert data.user_num.tolist() == [0, 0, 0, 0, 0, 1, 1]
    source = CoLikedSource(data, 2, 0.0, torch.device("cpu"), True)
    rng = np.random.default_rng(0)
    order = np.tile(np.arange(data.n_pairs), 2000)
    pair_users, anchors, positives = source.pairs(order, rng)
    assert np.array_equal(anchors, data.item_num[order]) and np.array_equal(pair_users, data.user_num[order])
    assert not (positives == anchors).any()
    assert liked.contains(pair_users, positives).all()
    # Uniform over the other 3 liked items of user 0: each anchor's positives split about evenly.
    for anchor in (3, 5, 7, 9):
        got = np.bincount(positives[(pair_users == 0) & (anchors == anchor)], minlength=10)
        others = sorted({3, 5, 7, 9} - {anchor})
        share = got[others] / got.sum()
        assert got.sum() == got[others].sum() and np.all(np.abs(share - 1 / 3) < 0.05)
    assert set(positives[anchors == 2]) == {3}
    assert set(positives[(anchors == 3) & (pair_users == 1)]) == {2}
    chunk = source.chunk(np.arange(data.n_pairs), rng)
    negs = chunk.negs.numpy()
    assert np.array_equal(chunk.users.numpy(), data.item_num)
    assert not liked.contains(np.repeat(data.user_num, 2), negs.reshape(-1)).any()


def test_no_user_with_two_liked_items_is_a_data_error():
    users, items = np.array([0, 1, 1]), np.array([3, 4, 4])
    liked = InteractionMatrix.from_pairs(users, items, 2, 6)
    data = TrainData(user_num=users, item_num=items, seen=liked, n_users=2, n_items=6)
    model = TwoTowerModel(2, 6, ModelConfig(dim=4, **ITEM_ITEM), seed=0)
    with pytest.raises(
        DataError, match="none of the 3 liked pairs belongs to a user with two or more liked items"
    ):
        fit(model, data, TrainConfig(epochs=1, device="cpu"), progress=False)


def _aliased_autograd(model, metric, weighting, anchors, pos, negs, valid, weight_decay, rows, item_weight):
    """Loss and dense gradient of the one item table, anchors read from the same table; the
    item-centric term (``item_weight``) compares the positive with the same negatives."""
    table = model.item_embedding.weight.detach().clone()
    if metric == "euclidean":
        table.renorm_(2, 0, 1.0)
    table.requires_grad_()
    u, p, n = table[anchors], table[pos], table[negs]
    dist = EuclideanDistance(squared=True) if metric == "euclidean" else get_distance(metric)
    objective = TrainConfig(margin=0.5, negative_weighting=weighting, item_centric_weight=item_weight)
    loss = triplet_objective(u, p, n, valid, dist, objective, N_ITEMS)
    loss.backward()
    grad = table.grad
    if weight_decay:
        grad = grad + weight_decay * torch.zeros_like(table).index_add_(0, rows, table.detach()[rows])
    return loss.detach(), grad, table.detach()


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize(
    "weighting, k, weight_decay", [("hardest", 1, 0.0), ("warp", 4, 0.1), ("mean", 4, 0.0)]
)
def test_fused_gradients_on_the_aliased_table_equal_autograd(metric, weighting, k, weight_decay):
    # 30 items for 60 triplets: most rows occur as anchor and as positive or negative in the batch.
    model = TwoTowerModel(
        N_USERS, N_ITEMS, ModelConfig(dim=6, distance=metric, init_scale=2.0, **ITEM_ITEM), seed=1
    )
    config = TrainConfig(
        negatives=k,
        negative_weighting=weighting,
        margin=0.5,
        weight_decay=weight_decay,
        item_centric_weight=0.5,
    )
    g = torch.Generator().manual_seed(2)
    anchors = torch.randint(0, 30, (60,), generator=g)
    pos = torch.randint(0, 30, (60,), generator=g)
    negs = torch.randint(0, 30, (60, k), generator=g)
    valid = torch.rand(60, k, generator=g) > 0.25 if k > 1 else None
    step = FusedTripletStep(model, config, N_ITEMS)
    assert step.users is step.items and set(step.rows.tables) == {"item"}
    with torch.no_grad():
        fused = step.gradients(anchors, pos, negs, valid)
    rows, grads, values = fused.merged()
    assert set(anchors.tolist()) & set(fused.item_rows.tolist()), "the batch must alias rows"
    loss, grad, projected = _aliased_autograd(
        model, metric, weighting, anchors, pos, negs, valid, weight_decay, rows, config.item_centric_weight
    )
    dense = torch.zeros(N_ITEMS, 6).index_add_(0, rows, grads)
    torch.testing.assert_close(dense, grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.loss, loss, atol=1e-5, rtol=1e-6)
    if values is not None:
        # Every occurrence of a row carries the same projected value, bit for bit.
        one_per_row = torch.zeros(N_ITEMS, 6).index_copy_(0, rows, values)
        assert torch.equal(values, one_per_row[rows])
        torch.testing.assert_close(values, projected[rows], atol=1e-6, rtol=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fused_step_on_the_aliased_table_is_projected_sgd(optimizer):
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=6, init_scale=2.0, **ITEM_ITEM), seed=4)
    config = TrainConfig(
        negatives=2, optimizer=optimizer, negative_weighting="mean", margin=0.5, item_centric_weight=0.5
    )
    # Item 1 is an anchor, a positive and a negative; item 3 an anchor and a negative.
    anchors = torch.tensor([1, 3, 1, 5])
    pos = torch.tensor([2, 1, 7, 1])
    negs = torch.tensor([[3, 4], [1, 9], [3, 3], [8, 1]])
    before = model.item_embedding.weight.detach().clone()
    _, grad, projected = _aliased_autograd(
        model, "euclidean", "mean", anchors, pos, negs, None, 0.0, None, config.item_centric_weight
    )
    with torch.no_grad():
        FusedTripletStep(model, config, N_ITEMS)(anchors, pos, negs, None, 0.1)
    after = model.item_embedding.weight.detach()
    read = torch.cat([anchors, pos, negs.reshape(-1)]).unique()
    if optimizer == "sgd":
        expected = (projected - 0.1 * grad).renorm(2, 0, 1.0)
        torch.testing.assert_close(after.renorm(2, 0, 1.0), expected, atol=1e-6, rtol=0)
    else:
        # First Adam step: every touched row moves by lr * sign(g) from its projected value.
        expected = projected[read] - 0.1 * torch.sign(grad[read])
        torch.testing.assert_close(after[read], expected, atol=1e-5, rtol=0)
    unread = torch.ones(N_ITEMS, dtype=torch.bool).index_fill_(0, read, False)
    assert torch.equal(after[unread], before[unread])


def test_item_item_model_has_no_user_tower_and_folds_users_in():
    model = TwoTowerModel(5, 30, ModelConfig(dim=4, distance="cosine", **ITEM_ITEM), seed=0)
    with pytest.raises(ConfigError, match="has no user tower"):
        model.user_embeddings()
    history = InteractionMatrix.from_pairs(np.array([0, 0, 2, 2, 2]), np.array([1, 4, 0, 4, 9]), 5, 30)
    with torch.no_grad():
        folded = model.fold_in_rows(history)
        for user in (0, 2):
            torch.testing.assert_close(folded[user], model.fold_in(history.row(user)), atol=1e-6, rtol=0)
        assert torch.equal(folded[1], torch.zeros(4))
        expected = model.distance.score(model.item_embeddings([1, 4]), model.item_embeddings())
        torch.testing.assert_close(model.score([1, 4]), expected)
    with pytest.raises(ConfigError, match="scores users from their liked items"):
        model_score_fn(model)
    with pytest.raises(ConfigError, match="user_tower 'pooled' has no meaning in mode 'item_item'"):
        config_from_dict({"model": {"mode": "item_item", "user_tower": "pooled"}})


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_fold_in_scores_rank_as_the_mean_similarity_to_the_liked_items(distance):
    model = TwoTowerModel(3, 40, ModelConfig(dim=5, distance=distance, init_scale=0.8, **ITEM_ITEM), seed=2)
    history = InteractionMatrix.from_pairs(np.array([0, 0, 0, 1, 1]), np.array([2, 8, 31, 5, 6]), 3, 40)
    with torch.no_grad():
        items = model.item_embeddings()
        scores = model_score_fn(model, history)(np.array([0, 1]))
        for row, user in enumerate((0, 1)):
            liked = items[history.row(user)]
            if distance == "euclidean":
                mean_sim = -torch.cdist(items, liked).square().mean(1)
            else:
                mean_sim = (get_distance(distance).pairwise(items, liked)).mean(1)
            # Ordered by the mean similarity, the scores never increase (ties, e.g. the two liked
            # items of user 1 under cosine, may come in either order).
            ordered = scores[row][mean_sim.argsort(descending=True)]
            assert float(ordered.diff().max()) <= 1e-6
            assert float(mean_sim.max() - mean_sim.min()) > 0.1


@pytest.fixture(scope="module")
def item_item_run(log, tmp_path_factory):
    src = tmp_path_factory.mktemp("log")
    log.interactions.write_parquet(src / "interactions.parquet")
    config = config_from_dict(
        {
            "model": {"mode": "item_item", "dim": 16},
            "train": {"epochs": 8, "patience": 2, "batch_size": 256, "negatives": 5},
            "eval": {"ks": [10, 20]},
            "index": {"n_trees": 10, "recall_queries": 100, "on_low_recall": "warn"},
        }
    )
    return train_run(src / "interactions.parquet", tmp_path_factory.mktemp("run"), config, progress=False)


def test_item_item_run_is_evaluated_beside_popularity_and_exports_folded_users(log, item_item_run):
    run_dir = item_item_run.run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "item_item"
    models = metrics["holdout"]["models"]
    assert set(models) == {"model", "popularity"}
    assert models["model"]["recall@20"] > models["popularity"]["recall@20"]
    assert metrics["training"]["holdout"]["fused"]
    assert (run_dir / "holdout" / "user_embeddings.parquet").is_file()
    users = read_embeddings(run_dir / "user_embeddings.parquet")
    items = read_embeddings(run_dir / "item_embeddings.parquet")
    inter = pl.read_parquet(run_dir / "interactions.parquet").filter(pl.col("label") == 1)
    liked = InteractionMatrix.from_pairs(
        inter["user_num"].to_numpy(), inter["item_num"].to_numpy(), len(users), len(items)
    )
    # The published users are the centroids of their liked items' exported vectors (euclidean).
    for user in (0, 17, 123):
        np.testing.assert_allclose(users.vectors[user], items.vectors[liked.row(user)].mean(0), atol=1e-6)
    model = load_model(run_dir)
    assert model.item_item and model.user_embedding is None
    np.testing.assert_allclose(model.item_embeddings().detach().numpy(), items.vectors, atol=1e-7)


def test_recommender_loads_an_item_item_run(log, item_item_run):
    rec = Recommender.load(item_item_run.run_dir, output="polars")
    cluster = log.item_cluster
    same = []
    for item in range(0, N_ITEMS, 10):
        got = rec.similar_items(item, k=5)
        assert got.height == 5 and item not in got["item_id"].to_list()
        same.append(np.mean(cluster[got["item_id"].to_numpy()] == cluster[item]))
    assert np.mean(same) >= 0.8
    top = rec.recommend(7, k=10, exact=True)
    seen = log.interactions.filter(pl.col("user_id") == 7)["item_id"].to_list()
    assert top.height == 10 and not set(top["item_id"].to_list()) & set(seen)
    liked = log.interactions.filter((pl.col("user_id") == 7) & (pl.col("rating") >= 4))["item_id"].to_list()
    history = rec.recommend_for_history(liked, k=10, exclude_seen=False, exact=True)
    np.testing.assert_allclose(
        history["score"].to_numpy()[:3],
        rec.recommend(7, k=3, exclude_seen=False, exact=True)["score"].to_numpy(),
        atol=1e-5,
    )
