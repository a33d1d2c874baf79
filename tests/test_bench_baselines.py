"""The quality benchmark's own pieces: EASE against its closed form, the CiteULike loader and the
per-user holdout, on tiny data made here (the real datasets are never needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.baselines import SkipBaseline, ease, ease_weights, fit_implicit, implicit_path, popularity, tune
from bench.datasets import (
    BenchDataset,
    DatasetUnavailable,
    difference,
    holdout_split,
    load_citeulike_a,
    read_dat_lists,
)
from recsys_metric.data.matrix import InteractionMatrix

# 5 users x 5 items, item 4 liked by nobody.
TOY = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
    ],
    dtype=np.float64,
)


def _matrix(dense: np.ndarray) -> InteractionMatrix:
    users, items = np.nonzero(dense)
    return InteractionMatrix.from_pairs(users, items, *dense.shape)


def _ease_closed_form(x: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    b = np.eye(x.shape[1]) - p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def test_ease_weights_match_numpy_closed_form():
    active = TOY[:, :4]
    expected = _ease_closed_form(active, lam=2.0)
    got = ease_weights(_matrix(TOY), 2.0).numpy()
    assert got.shape == (4, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 0.0)


def test_ease_weights_float32_close_to_float64():
    w64 = ease_weights(_matrix(TOY), 0.5, torch.float64).numpy()
    w32 = ease_weights(_matrix(TOY), 0.5, torch.float32).numpy()
    assert w32.dtype == np.float32
    np.testing.assert_allclose(w32, w64, rtol=1e-4, atol=1e-5)


def test_ease_scores_are_x_times_b_and_unliked_item_is_minus_inf():
    b = _ease_closed_form(TOY[:, :4], lam=2.0)
    scores = ease(_matrix(TOY), lam=2.0)(np.array([2, 0]))
    assert scores.dtype == torch.float32 and scores.shape == (2, 5)
    np.testing.assert_allclose(scores[:, :4].numpy(), TOY[[2, 0], :4] @ b, rtol=1e-5, atol=1e-6)
    assert torch.isneginf(scores[:, 4]).all()


def test_ease_rejects_nonpositive_lambda():
    with pytest.raises(ValueError, match="lambda must be positive"):
        ease_weights(_matrix(TOY), 0.0)


def test_popularity_counts_liked_users():
    scores = popularity(_matrix(TOY))(np.array([0, 1, 2]))
    np.testing.assert_array_equal(scores.numpy(), np.tile(TOY.sum(0), (3, 1)))


def test_implicit_path_continues_training_to_the_same_factors_as_one_run():
    x = _matrix(np.kron(np.eye(3), np.ones((4, 5))))
    params = {"factors": 4, "regularization": 0.1, "alpha": 5.0}
    path = dict(implicit_path("als", x, params, [2, 5], seed=3))
    users = np.arange(12)
    one_run = fit_implicit("als", x, {**params, "iterations": 5}, seed=3)
    np.testing.assert_allclose(path[5](users).numpy(), one_run(users).numpy(), rtol=1e-3, atol=1e-4)
    assert not np.allclose(path[2](users).numpy(), path[5](users).numpy())


def _write_citeulike(root: Path, users: list[list[int]], tags: list[list[int]] | None) -> None:
    root.mkdir()
    # The real files end without a newline; so does this one.
    (root / "users.dat").write_text("\n".join(" ".join(map(str, [len(r), *r])) for r in users))
    if tags is not None:
        (root / "item-tag.dat").write_text("\n".join(" ".join(map(str, [len(r), *r])) for r in tags) + "\n")


def test_load_citeulike_a_on_a_tiny_folder(tmp_path):
    users = [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # 10 items: 2 held out
        [1, 3, 5, 7, 9],  # 5 items: 1 held out
        [2, 4, 6, 8],  # 4 items: below the minimum, all in training
        [0, 9, 11],
    ]
    tags = [[7, 3], [], [1]] + [[0]] * 10  # 13 lines: item 12 exists with no user
    root = tmp_path / "citeulike-a"
    _write_citeulike(root, users, tags)

    data = load_citeulike_a(root, seed=5)

    assert (data.name, data.n_users, data.n_items) == ("citeulike-a", 4, 13)
    assert data.train_disliked is None
    np.testing.assert_array_equal(data.test.row_lengths(), [2, 1, 0, 0])
    np.testing.assert_array_equal(data.train.row_lengths(), [8, 4, 4, 3])
    for u, items in enumerate(users):
        np.testing.assert_array_equal(np.union1d(data.train.row(u), data.test.row(u)), sorted(items))
        assert np.intersect1d(data.train.row(u), data.test.row(u)).size == 0
    np.testing.assert_array_equal(data.train_liked.indices, data.train.indices)
    features = data.item_features
    assert features is not None and features.height == 13
    assert features["tags"].to_list()[:3] == [[7, 3], [], [1]]
    assert features["item_num"].to_list() == list(range(13))

    again = load_citeulike_a(root, seed=5)
    np.testing.assert_array_equal(again.test.indices, data.test.indices)


def test_load_citeulike_a_missing_folder_is_unavailable(tmp_path):
    with pytest.raises(DatasetUnavailable, match="users.dat"):
        load_citeulike_a(tmp_path / "nowhere")


def test_read_dat_lists_rejects_a_wrong_count(tmp_path):
    path = tmp_path / "users.dat"
    path.write_text("2 4 5\n3 1 2\n")
    with pytest.raises(ValueError, match=r"users.dat: 1 lines of users.dat .* line 2 says 3, lists 2"):
        read_dat_lists(path, "users.dat")


def test_holdout_split_counts_round_half_up_and_partition():
    lengths = [5, 7, 8, 13, 4, 0]
    dense = np.zeros((len(lengths), 20))
    for u, n in enumerate(lengths):
        dense[u, :n] = 1
    liked = _matrix(dense)
    train, test = holdout_split(liked, 0.2, min_liked=5, seed=0)
    # 0.2 * [5, 7, 8, 13] = [1, 1.4, 1.6, 2.6] -> [1, 1, 2, 3]; fewer than 5 items -> none held out
    np.testing.assert_array_equal(test.row_lengths(), [1, 1, 2, 3, 0, 0])
    assert train.nnz + test.nnz == liked.nnz
    assert not train.contains(*np.divmod(test.keys(), 20)).any()


def _toy_dataset() -> BenchDataset:
    rng = np.random.default_rng(0)
    # Two blocks of users with disjoint tastes: every sensible model beats chance.
    dense = np.zeros((40, 30))
    dense[:20, :15] = rng.random((20, 15)) < 0.6
    dense[20:, 15:] = rng.random((20, 15)) < 0.6
    everything = _matrix(dense)
    train, test = holdout_split(everything, 0.2, 5, seed=0)
    return BenchDataset("toy", 40, 30, train, train, None, test)


def test_validation_split_never_touches_test():
    data = _toy_dataset()
    val = data.validation_split(seed=1)
    np.testing.assert_array_equal(val.test.keys(), np.intersect1d(val.test.keys(), data.train.keys()))
    assert np.intersect1d(val.test.keys(), data.test.keys()).size == 0
    np.testing.assert_array_equal(difference(data.train, val.test).keys(), val.train.keys())


def test_tune_ease_records_every_grid_point_and_refits():
    data = _toy_dataset()
    tuned = tune("ease", data, {"lam": (1.0, 10.0)})
    assert [p["lam"] for p in tuned.grid] == [1.0, 10.0]
    assert tuned.params["lam"] in (1.0, 10.0)
    assert tuned.validation["recall@20"] == max(p["recall@20"] for p in tuned.grid)
    assert tuned.score_fn(np.arange(3)).shape == (3, 30)


def test_tune_skips_ease_on_a_large_catalog():
    big = InteractionMatrix.from_pairs(np.array([0]), np.array([0]), 1, 30_000)
    data = BenchDataset("big", 1, 30_000, big, big, None, big)
    with pytest.raises(SkipBaseline, match="30000 items > 20000"):
        tune("ease", data, {"lam": (250.0,)})


def test_tune_with_one_setting_fits_directly_without_validation():
    data = _toy_dataset()
    tuned = tune(
        "bpr",
        data,
        {"factors": (4,), "learning_rate": (0.05,), "regularization": (0.01,), "iterations": (5,)},
    )
    assert tuned.params == {"factors": 4, "learning_rate": 0.05, "regularization": 0.01, "iterations": 5}
    assert tuned.grid == [] and tuned.validation == {}
    assert tuned.score_fn(np.arange(40)).shape == (40, 30)


def test_quality_bench_scores_an_item_item_model_from_the_users_liked_items():
    from bench.quality import _ours, parse_overrides

    rng = np.random.default_rng(0)
    dense = np.zeros((40, 30))
    dense[:20, :15] = rng.random((20, 15)) < 0.6
    dense[20:, 15:] = rng.random((20, 15)) < 0.6
    dense[21] = dense[20]  # two users with the same history: an item-item model cannot tell them apart
    test = np.zeros_like(dense)
    for user in range(40):
        block = range(15) if user < 20 else range(15, 30)
        test[user, next(j for j in block if not dense[user, j])] = 1
    train = _matrix(dense)
    data = BenchDataset("toy", 40, 30, train, train, None, _matrix(test))
    config = parse_overrides(["model.mode=item_item", "model.dim=8", "train.epochs=5", "train.lr=0.05"])
    score_fn, info = _ours(data, config, refit=True)
    scores = score_fn(np.arange(40)).cpu().numpy()
    np.testing.assert_array_equal(scores[20], scores[21])
    assert not np.array_equal(scores[22], scores[23])
    # Each block's users score their own block's items higher on average.
    assert scores[:20, :15].mean() > scores[:20, 15:].mean()
    assert scores[20:, 15:].mean() > scores[20:, :15].mean()
    assert "recall@20" in info["validation"]
