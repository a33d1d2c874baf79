"""Synthetic log generator: exact sizes, determinism, chunk invariance, features, learnability."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recsys_metric.data.synthetic as synthetic
from recsys_metric.data.synthetic import (
    BUNDLED_ARGS,
    DEFAULT_START,
    _InverseCdf,
    bundled_log,
    generate_log,
    main,
    write_log,
)
from recsys_metric.errors import ConfigError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def bundled():
    return bundled_log()


def _small(**overrides):
    args = {"n_users": 300, "n_items": 200, "n_interactions": 6000, "n_clusters": 5, "seed": 7}
    args.update(overrides)
    return generate_log(**args)


def _dense(values: pl.Series) -> np.ndarray:
    return values.rank("dense").cast(pl.Int64).to_numpy() - 1


def _temporal_split(frame: pl.DataFrame, test_fraction: float = 0.2) -> tuple[pl.DataFrame, pl.DataFrame]:
    ordered = frame.with_row_index("row").sort(["timestamp", "row"])
    n_test = int(round(test_fraction * ordered.height))
    return ordered.head(ordered.height - n_test), ordered.tail(n_test)


def _recall_at_k(scores: np.ndarray, train: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Mean over users with a relevant item of |top-k ∩ relevant| / |relevant|; train items excluded."""
    scores = np.where(train, -np.inf, scores)
    users = np.flatnonzero(relevant.any(axis=1))
    top = np.argsort(-scores[users], axis=1, kind="stable")[:, :k]
    hits = np.take_along_axis(relevant[users], top, axis=1).sum(axis=1)
    return float((hits / relevant[users].sum(axis=1)).mean())


def test_bundled_files_are_the_generator_output(bundled):
    interactions = pl.read_parquet(DATA_DIR / "interactions.parquet")
    items = pl.read_parquet(DATA_DIR / "items.parquet")
    assert interactions.equals(bundled.interactions)
    assert items.equals(bundled.items)
    assert interactions.schema == pl.Schema(
        {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "rating": pl.Float32}
    )
    assert items.schema == pl.Schema(
        {"item_id": pl.String, "category": pl.String, "price": pl.Float64, "tags": pl.List(pl.String)}
    )
    assert interactions.height == BUNDLED_ARGS["n_interactions"]
    assert items.height == BUNDLED_ARGS["n_items"]
    size = (DATA_DIR / "interactions.parquet").stat().st_size + (DATA_DIR / "items.parquet").stat().st_size
    assert size < 2 * 1024 * 1024


def test_bundled_structure_beats_popularity_with_ease(bundled):
    frame = bundled.interactions
    users, items = _dense(frame["user_id"]), _dense(frame["item_id"])
    coded = frame.with_columns(pl.Series("u", users), pl.Series("i", items))
    train, test = _temporal_split(coded)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    x = np.zeros((n_users, n_items), dtype=np.float64)
    x[train["u"].to_numpy(), train["i"].to_numpy()] = 1.0
    seen = x > 0
    liked = test.filter(pl.col("rating") >= 4.0)
    relevant = np.zeros((n_users, n_items), dtype=bool)
    relevant[liked["u"].to_numpy(), liked["i"].to_numpy()] = True
    relevant &= ~seen
    relevant[~seen.any(axis=1)] = False

    popularity = np.broadcast_to(x.sum(axis=0), x.shape)
    gram = x.T @ x + 300.0 * np.eye(n_items)
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    ease = x @ b

    pop_recall = _recall_at_k(popularity, seen, relevant, 20)
    ease_recall = _recall_at_k(ease, seen, relevant, 20)
    assert pop_recall > 0.03
    assert ease_recall >= 2.0 * pop_recall, (ease_recall, pop_recall)


def test_temporal_split_keeps_most_test_users_seen(bundled):
    train, test = _temporal_split(bundled.interactions)
    test_users = test["user_id"].unique()
    seen = test_users.is_in(train["user_id"].unique().implode())
    assert seen.mean() >= 0.95


def test_rating_distribution_has_dislikes_on_off_taste_items(bundled):
    rating = bundled.interactions["rating"].to_numpy()
    assert set(np.unique(rating)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 0.10 <= (rating <= 2).mean() <= 0.20
    assert 0.50 <= (rating >= 4).mean() <= 0.60
    user_num = bundled.interactions["user_id"].str.slice(1).cast(pl.Int64).to_numpy()
    item_num = bundled.interactions["item_id"].str.slice(1).cast(pl.Int64).to_numpy()
    on_taste = (bundled.user_clusters[user_num] == bundled.item_cluster[item_num][:, None]).any(axis=1)
    assert rating[on_taste].mean() >= 3.5
    assert rating[~on_taste].mean() <= 2.5
    assert on_taste[rating >= 4].mean() >= 0.9


def test_few_exact_duplicates(bundled):
    pairs = bundled.interactions.select("user_id", "item_id")
    assert pairs.height - pairs.unique().height <= 0.01 * pairs.height


def test_same_seed_identical_and_different_seed_differs(tmp_path):
    a, b = _small(), _small()
    assert a.interactions.equals(b.interactions)
    assert a.items.equals(b.items)
    np.testing.assert_array_equal(a.item_vectors, b.item_vectors)
    c = _small(seed=8)
    assert not a.interactions.equals(c.interactions)
    assert not a.items.equals(c.items)

    first = a.write(tmp_path / "one")
    second = b.write(tmp_path / "two")
    for left, right in zip(first, second, strict=True):
        assert left.read_bytes() == right.read_bytes()


@settings(max_examples=30, deadline=None)
@given(
    n_users=st.integers(1, 40),
    n_items=st.integers(1, 60),
    n_interactions=st.integers(0, 400),
    n_clusters=st.integers(1, 6),
    seed=st.integers(0, 2**40),
    id_type=st.sampled_from(["int", "str"]),
)
def test_exact_row_count_and_invariants(n_users, n_items, n_interactions, n_clusters, seed, id_type):
    n_clusters = min(n_clusters, n_items)
    log = generate_log(n_users, n_items, n_interactions, n_clusters=n_clusters, seed=seed, id_type=id_type)
    frame = log.interactions
    assert frame.height == n_interactions
    assert frame.columns == ["user_id", "item_id", "timestamp", "rating"]
    assert frame["timestamp"].dtype == pl.Int64 and frame["rating"].dtype == pl.Float32
    assert frame["user_id"].is_in(log.user_ids.implode()).all()
    assert frame["item_id"].is_in(log.item_ids.implode()).all()
    if n_interactions:
        assert frame["timestamp"].min() >= DEFAULT_START
        assert frame["timestamp"].max() < DEFAULT_START + 180 * 86_400
        assert frame["rating"].is_between(1.0, 5.0).all()
    user_order = frame["user_id"].rank("dense") if id_type == "str" else frame["user_id"]
    ordered = frame.with_columns(user_order.alias("order")).sort(["order", "timestamp"], maintain_order=True)
    assert ordered.drop("order").equals(frame)
    assert log.items.height == n_items
    assert log.user_clusters.shape == (n_users, 3) and log.user_weights.shape == (n_users, 3)
    np.testing.assert_allclose(log.user_weights.sum(axis=1), 1.0, rtol=1e-6)
    assert (log.user_clusters[:, 0] >= 0).all()
    assert np.bincount(log.item_cluster, minlength=n_clusters).min() >= 1
    if n_interactions >= 5 * n_users:
        counts = frame.group_by("user_id").len()
        assert counts.height == n_users and counts["len"].min() >= 5


def test_string_and_int_ids():
    s = _small(id_type="str")
    assert s.interactions["user_id"].str.contains(r"^u\d{7}$").all()
    assert s.interactions["item_id"].str.contains(r"^i\d{6}$").all()
    assert s.items["item_id"].to_list()[:2] == ["i000000", "i000001"]
    n = _small(id_type="int")
    assert n.interactions["user_id"].dtype == pl.Int64 and n.interactions["item_id"].dtype == pl.Int64
    assert n.interactions.drop("user_id", "item_id").equals(s.interactions.drop("user_id", "item_id"))
    assert (s.interactions["user_id"].str.slice(1).cast(pl.Int64) == n.interactions["user_id"]).all()


def test_item_features_cover_every_item_and_place_cold_items(bundled):
    items = bundled.items
    assert items["item_id"].n_unique() == items.height == BUNDLED_ARGS["n_items"]
    assert bundled.interactions["item_id"].is_in(items["item_id"].implode()).all()
    n_tags = items["tags"].list.len()
    assert n_tags.is_between(2, 4).all() and (items["tags"].list.n_unique() == n_tags).all()
    assert items["price"].min() > 0

    cluster = bundled.item_cluster
    category = items["category"].str.slice(3).cast(pl.Int64).to_numpy()
    assert 0.85 <= (category == cluster).mean() < 1.0

    # A cold item is placed by its tags alone: learn tag -> cluster votes on half the items and
    # predict the other half's clusters.
    rng = np.random.default_rng(0)
    warm = rng.random(items.height) < 0.5
    exploded = items.with_columns(pl.Series("cluster", cluster), pl.Series("warm", warm)).explode("tags")
    votes = (
        exploded.filter(pl.col("warm"))
        .group_by("tags", "cluster")
        .len()
        .sort(["tags", "len", "cluster"], descending=[False, True, False])
        .group_by("tags", maintain_order=True)
        .first()
    )
    cold = exploded.filter(~pl.col("warm")).join(votes.select("tags", vote="cluster"), on="tags", how="left")
    predicted = (
        cold.group_by("item_id", "cluster")
        .agg(pl.col("vote").mode().min().alias("vote"))
        .select((pl.col("vote") == pl.col("cluster")).mean())
        .item()
    )
    assert predicted >= 0.8

    log_price = np.log(items["price"].to_numpy())
    means = np.array([log_price[cluster == k].mean() for k in range(BUNDLED_ARGS["n_clusters"])])
    within = np.mean([log_price[cluster == k].var() for k in range(BUNDLED_ARGS["n_clusters"])])
    assert means.var() > within


def test_write_log_parts_equal_generate_log(tmp_path, monkeypatch):
    args = {
        "n_users": 400,
        "n_items": 150,
        "n_interactions": 9000,
        "n_clusters": 4,
        "seed": 3,
        "id_type": "str",
    }
    expected = generate_log(**args)
    monkeypatch.setattr(synthetic, "_BLOCK_ROWS", 700)
    assert generate_log(**args, workers=1).interactions.equals(expected.interactions)

    written = write_log(tmp_path / "log", **args, rows_per_part=2000, workers=2)
    parts = sorted(written.interactions_dir.glob("part-*.parquet"))
    assert written.n_parts == len(parts) >= 4
    assert written.n_rows == args["n_interactions"]
    assert sum(pq_rows(p) for p in parts) == args["n_interactions"]
    assert pl.read_parquet(parts).equals(expected.interactions)
    assert pl.read_parquet(written.items_path).equals(expected.items)
    assert json.loads((tmp_path / "log" / "generator.json").read_text())["seed"] == 3

    again = write_log(tmp_path / "again", **args, rows_per_part=2000, workers=1)
    again_parts = sorted(again.interactions_dir.glob("part-*.parquet"))
    assert [p.read_bytes() for p in again_parts] == [p.read_bytes() for p in parts]


def pq_rows(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def test_write_log_refuses_existing_parts_unless_overwrite(tmp_path):
    args = {"n_users": 20, "n_items": 30, "n_interactions": 100, "n_clusters": 3}
    write_log(tmp_path, **args)
    with pytest.raises(ConfigError, match=r"interactions already holds 1 files: choose an empty directory"):
        write_log(tmp_path, **args)
    written = write_log(tmp_path, **args, seed=1, overwrite=True)
    assert written.n_rows == 100
    assert pl.read_parquet(written.interactions_dir).equals(generate_log(**args, seed=1).interactions)


def test_zero_interactions_write_one_empty_part(tmp_path):
    written = write_log(tmp_path, 5, 10, 0, n_clusters=2)
    assert written.n_rows == 0 and written.n_parts == 1
    frame = pl.read_parquet(written.interactions_dir)
    assert frame.height == 0 and frame.columns == ["user_id", "item_id", "timestamp", "rating"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_items": 3, "n_clusters": 5}, "n_items=3 is below n_clusters=5: every cluster needs an item"),
        ({"id_type": "uuid"}, "id_type='uuid' must be 'int' or 'str'"),
        ({"n_users": 10.5}, "n_users=10.5 must be an integer"),
        ({"popular_share": 0.7, "random_share": 0.5}, "popular_share + random_share must not exceed 1"),
        ({"workers": 0}, "workers=0 must be at least 1"),
    ],
)
def test_bad_arguments_name_the_argument(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(f"invalid synthetic log arguments: {message}")):
        _small(**overrides)


def test_inverse_cdf_matches_searchsorted():
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 3000):
        weight = rng.pareto(0.7, n) + 1e-12
        cdf = np.cumsum(weight)
        cdf /= cdf[-1]
        cdf[-1] = 1.0
        keys = np.concatenate([rng.random(20_000), [0.0, np.nextafter(1.0, 0.0)], cdf[:-1]])
        np.testing.assert_array_equal(_InverseCdf(cdf)(keys), np.searchsorted(cdf, keys, side="right"))


def test_main_writes_the_bundled_log_and_parts(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "bundle")]) == 0
    assert pl.read_parquet(tmp_path / "bundle" / "interactions.parquet").equals(
        pl.read_parquet(DATA_DIR / "interactions.parquet")
    )
    args = [
        "--out",
        str(tmp_path / "big"),
        "--users",
        "50",
        "--items",
        "40",
        "--interactions",
        "700",
        "--parts",
    ]
    assert main(args) == 0
    assert "wrote 700 interactions in 1 parts" in capsys.readouterr().out
    assert main(args) == 2
    assert "choose an empty directory or pass overwrite=True" in capsys.readouterr().err
