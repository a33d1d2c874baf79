"""Serving: known answers on hand-made vectors, brute-force agreement, round trips on a trained run."""

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_metric.config import IndexConfig, ModelConfig, config_from_dict
from recsys_metric.data.synthetic import generate_log
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import DataError
from recsys_metric.export import write_embeddings
from recsys_metric.index import ExactIndex, build_index
from recsys_metric.model.distances import score_numpy
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.pipeline import load_model, train_run
from recsys_metric.recommend import (
    Recommender,
    _ExactRanker,
    _Exclusions,
    _select_top,
    resolve_run_dir,
    write_recommendations,
)
from recsys_metric.registry import RegistryError
from recsys_metric.serving import batch, ranking

INF = float("inf")


def write_run(root, user_ids, item_ids, user_vecs, item_vecs, rows, *, distance="euclidean", run_id="hand-1"):
    """A run directory from hand-made parts; ``rows`` are ``(user_num, item_num, label)``."""
    root.mkdir(parents=True, exist_ok=True)
    Vocabulary(user_ids, name="user").save(root / "users.parquet")
    Vocabulary(item_ids, name="item").save(root / "items.parquet")
    write_embeddings(
        root / "user_embeddings.parquet", user_ids, user_vecs, kind="user", distance=distance, run_id=run_id
    )
    write_embeddings(
        root / "item_embeddings.parquet", item_ids, item_vecs, kind="item", distance=distance, run_id=run_id
    )
    users, items, labels = (np.asarray(c) for c in zip(*rows, strict=True)) if rows else ([], [], [])
    pl.DataFrame(
        {
            "user_num": pl.Series(users, dtype=pl.Int32),
            "item_num": pl.Series(items, dtype=pl.Int32),
            "label": pl.Series(labels, dtype=pl.Int8),
            "split": pl.Series(["train"] * len(users), dtype=pl.String),
        }
    ).write_parquet(root / "interactions.parquet")
    model = TwoTowerModel(
        len(user_ids), len(item_ids), ModelConfig(dim=user_vecs.shape[1], distance=distance), seed=0
    )
    with torch.no_grad():
        model.user_embedding.weight.copy_(torch.from_numpy(user_vecs))
        model.item_embedding.weight.copy_(torch.from_numpy(item_vecs))
    torch.save(model.state_dict(), root / "model.pt")
    (root / "model.json").write_text(json.dumps({"run_id": run_id, "hparams": model.hparams()}))
    return root


# Items i0..i7 on a line at x = 0.125 n (exact in float32, so distances are exact and ties are real).
ITEMS = [f"i{n}" for n in range(8)]
USERS = [100, 200, 300]


@pytest.fixture(scope="module")
def line_run(tmp_path_factory):
    items = np.zeros((8, 2), dtype=np.float32)
    items[:, 0] = 0.125 * np.arange(8)
    users = np.array([[0.0, 0.0], [0.875, 0.0], [0.4375, 0.0]], dtype=np.float32)
    rows = [(0, 0, 1), (0, 1, -1), (1, 7, 1), (1, 4, 1), (1, 2, 0)]
    root = write_run(tmp_path_factory.mktemp("line") / "run", USERS, ITEMS, users, items, rows)
    build_index(root, IndexConfig(n_trees=4, recall_floor=0.0, recall_queries=8))
    return root


@pytest.fixture(scope="module", params=["exact", "annoy"])
def line(line_run, request):
    return Recommender.load(line_run, index=request.param)


def ids(frame, column="item_id"):
    return list(frame[column])


def test_load_picks_the_index(line_run):
    assert not Recommender.load(line_run).is_exact and not Recommender.load(line_run).index.is_exact
    assert Recommender.load(line_run, index="exact").is_exact
    rec = Recommender.load(line_run, index="exact")
    assert (rec.run_id, rec.distance, rec.dim, rec.n_users, rec.n_items) == ("hand-1", "euclidean", 2, 3, 8)
    assert rec.user_ids.to_list() == USERS and rec.item_ids.to_list() == ITEMS


def test_recommend_known_answers(line):
    top = line.recommend(100, k=3)
    assert ids(top) == ["i2", "i3", "i4"]
    np.testing.assert_allclose(top["score"], [-0.25, -0.375, -0.5], rtol=1e-6)
    assert list(top["rank"]) == [1, 2, 3]
    assert ids(line.recommend(100, k=3, exclude_seen=False)) == ["i0", "i1", "i2"]
    assert ids(line.recommend(100, k=3, exclude=["i2", "i4"])) == ["i3", "i5", "i6"]


def test_ties_go_to_the_lower_item_number(line):
    top = line.recommend(300, k=2)
    assert ids(top) == ["i3", "i4"] and top["score"][0] == top["score"][1]
    assert ids(line.similar_items("i3", k=2)) == ["i2", "i4"]
    assert ids(line.similar_items("i3", k=2, exclude=["i2"])) == ["i4", "i1"]


def test_never_shorter_than_the_eligible_items(line):
    assert ids(line.recommend(100, k=6)) == ["i2", "i3", "i4", "i5", "i6", "i7"]
    assert ids(line.recommend(100, k=50)) == ["i2", "i3", "i4", "i5", "i6", "i7"]
    assert ids(line.recommend(200, k=10)) == ["i6", "i5", "i3", "i1", "i0"]
    assert ids(line.similar_items("i0", k=100, exact=True)) == ITEMS[1:]
    assert line.recommend(100, k=8, exclude=ITEMS).empty


def test_candidates_are_scored_exactly_and_filtered(line):
    top = line.recommend(100, k=5, candidates=["i7", "i5", "i0", "i5"])
    assert ids(top) == ["i5", "i7"]
    np.testing.assert_allclose(top["score"], [-0.625, -0.875], rtol=1e-6)
    assert ids(line.recommend(100, k=5, candidates=["i7", "i5", "i0"], exclude_seen=False)) == [
        "i0",
        "i5",
        "i7",
    ]


def test_history_fold_in_is_the_centroid(line):
    # The centroid of i6 and i7 is x = 0.8125.
    top = line.recommend_for_history(["i6", "i7"], k=2)
    assert ids(top) == ["i5", "i4"]
    np.testing.assert_allclose(top["score"], [-0.1875, -0.3125], rtol=1e-6)
    assert ids(line.recommend_for_history(["i6", "i7"], k=2, exclude_seen=False)) == ["i6", "i7"]


def test_explain_cites_liked_items_nearest_first(line):
    why = line.explain(200, "i6")
    assert list(why.columns) == ["liked_item_id", "score", "rank"]
    assert ids(why, "liked_item_id") == ["i7", "i4"]  # i2 is only neutral (label 0)
    np.testing.assert_allclose(why["score"], [-0.125, -0.25], rtol=1e-6)
    assert ids(line.explain(200, "i7"), "liked_item_id") == ["i4"]
    assert line.explain(300, "i0").empty


def test_recommend_batch_frame(line):
    batch = line.recommend_batch([300, 100], k=2)
    assert list(batch.columns) == ["user_id", "item_id", "score", "rank"]
    assert list(batch["user_id"]) == [300, 300, 100, 100]
    assert ids(batch) == ["i3", "i4", "i2", "i3"]
    assert list(batch["rank"]) == [1, 2, 1, 2]
    assert line.recommend_batch([], k=3).empty


def test_unknown_ids_raise_key_error_naming_them(line):
    with pytest.raises(KeyError, match="user_id 999 is not in"):
        line.recommend(999)
    with pytest.raises(KeyError, match="'100'"):
        line.recommend("100")
    with pytest.raises(KeyError, match="True"):
        line.recommend(True)
    with pytest.raises(KeyError, match="item_id 'zz'"):
        line.similar_items("zz")
    with pytest.raises(KeyError, match="'nope'"):
        line.recommend(100, exclude=["i1", "nope"])
    with pytest.raises(KeyError, match="'gone'"):
        line.recommend(100, candidates=["gone"])
    with pytest.raises(KeyError, match="555"):
        line.recommend_batch([100, 555])
    with pytest.raises(KeyError, match="'x9'"):
        line.recommend_for_history(["i1", "x9"])
    with pytest.raises(KeyError, match="'i9'"):
        line.explain(100, "i9")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        line.recommend(100, k=0)


def test_polars_output_has_the_same_content(line_run):
    pd_rec = Recommender.load(line_run, index="exact")
    pl_rec = Recommender.load(line_run, index="exact", output="polars")
    calls = [
        ("recommend", (100,), {"k": 3}),
        ("similar_items", ("i3",), {"k": 4}),
        ("recommend_batch", ([100, 200],), {"k": 2}),
        ("recommend_for_history", (["i1"],), {"k": 2}),
        ("explain", (200, "i6"), {}),
    ]
    for name, args, kwargs in calls:
        a = getattr(pd_rec, name)(*args, **kwargs)
        b = getattr(pl_rec, name)(*args, **kwargs)
        assert isinstance(a, pd.DataFrame) and isinstance(b, pl.DataFrame), name
        assert b.schema["score"] == pl.Float32 and b.schema["rank"] == pl.Int32
        pd.testing.assert_frame_equal(a, b.to_pandas(), check_dtype=False)
    with pytest.raises(ValueError, match="output"):
        Recommender.load(line_run, output="arrow")


def test_resolve_run_dir_follows_current(line_run, tmp_path):
    root = tmp_path / "artifacts"
    (root / "runs").mkdir(parents=True)
    os.symlink(line_run, root / "runs" / "r1")
    real = line_run.resolve()
    assert resolve_run_dir(line_run) == real
    os.symlink("runs/r1", root / "current")
    assert resolve_run_dir(root) == real
    assert Recommender.load(root).run_id == "hand-1"
    assert resolve_run_dir(root / "current") == real
    with pytest.raises(RegistryError):
        resolve_run_dir(tmp_path / "nowhere")


def test_load_checks_the_run(tmp_path):
    vecs = np.eye(3, dtype=np.float32)
    root = write_run(tmp_path / "bad", [1, 2, 3], ["a", "b", "c"], vecs, vecs, [(0, 0, 1)])
    write_embeddings(
        root / "item_embeddings.parquet", ["a", "b", "c"], vecs, kind="item", distance="dot", run_id="hand-1"
    )
    with pytest.raises(DataError, match="same export"):
        Recommender.load(root)
    write_embeddings(
        root / "item_embeddings.parquet",
        ["c", "b", "a"],
        vecs,
        kind="item",
        distance="euclidean",
        run_id="hand-1",
    )
    with pytest.raises(DataError, match="not those of items.parquet"):
        Recommender.load(root)
    write_embeddings(
        root / "item_embeddings.parquet",
        ["a", "b", "c"],
        vecs,
        kind="item",
        distance="euclidean",
        run_id="hand-1",
    )
    (root / "interactions.parquet").unlink()
    with pytest.raises(DataError, match="interactions.parquet does not exist"):
        Recommender.load(root)


class HalfIndex:
    """A careless index (duck-typed ItemIndex): ignores exclusions, returns half of what was asked."""

    is_exact = False

    def __init__(self, inner):
        self.inner = inner
        self.distance, self.dim, self.n_items, self.vectors = (
            inner.distance,
            inner.dim,
            inner.n_items,
            inner.vectors,
        )

    def search(self, queries, k, *, exclude=None):
        items, scores = self.inner.search(queries, k)
        items[:, (k + 1) // 2 :] = -1
        scores[:, (k + 1) // 2 :] = -INF
        return items, scores


@pytest.fixture(scope="module", params=["euclidean", "cosine", "dot"])
def random_run(tmp_path_factory, request):
    """2,055 random items (groups of 32 plus a tail), users with 0 to all-but-3 seen items."""
    rng = np.random.default_rng(7)
    n_users, n_items, dim = 24, 2055, 8
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    rows = []
    for u, n_seen in enumerate([n_items - 3, n_items - 20, 0, *rng.integers(0, n_items, n_users - 3)]):
        rows += [(u, i, 1) for i in rng.choice(n_items, size=n_seen, replace=False)]
    root = tmp_path_factory.mktemp(f"random-{request.param}") / "run"
    write_run(
        root,
        list(range(1000, 1000 + n_users)),
        list(range(n_items)),
        users,
        items,
        rows,
        distance=request.param,
        run_id="rnd",
    )
    return root, users, items, request.param


def brute_force(user_vec, items, distance, seen, k):
    scores = score_numpy(user_vec[None], items, distance)[0]
    scores[list(seen)] = -INF
    order = np.lexsort((np.arange(items.shape[0]), -scores))[:k]
    order = order[np.isfinite(scores[order])]
    return order, scores[order]


def seen_of(root):
    frame = pl.read_parquet(root / "interactions.parquet")
    return {u: set(g["item_num"].to_list()) for (u,), g in frame.group_by(["user_num"])}


def test_exact_paths_agree_with_brute_force(random_run, tmp_path):
    root, users, items, distance = random_run
    seen = seen_of(root)
    rec = Recommender.load(root, index="exact", output="polars")
    careless = Recommender.load(root, index="exact", output="polars")
    careless.index = HalfIndex(ExactIndex(items, distance, device="cpu"))
    summary = write_recommendations(root, tmp_path / "table", k=5, progress=False)
    table = pl.read_parquet(tmp_path / "table" / "*.parquet")
    assert summary["n_rows"] == table.height and summary["users_short"] == 1
    for u in range(users.shape[0]):
        want_items, want_scores = brute_force(users[u], items, distance, seen.get(u, set()), 5)
        assert len(want_items) == min(5, items.shape[0] - len(seen.get(u, set())))
        for got in (rec.recommend(1000 + u, k=5), careless.recommend(1000 + u, k=5)):
            assert got["item_id"].to_list() == want_items.tolist()
            np.testing.assert_allclose(got["score"].to_numpy(), want_scores, rtol=1e-5, atol=1e-6)
        rows = table.filter(pl.col("user_id") == 1000 + u)
        mine = rec.recommend(1000 + u, k=5)
        assert rows["item_id"].to_list() == mine["item_id"].to_list()
        assert rows["rank"].to_list() == mine["rank"].to_list()
        assert rows["score"].to_numpy().tobytes() == mine["score"].to_numpy().tobytes()


def test_annoy_answers_are_complete_for_heavy_users(random_run):
    root, users, items, distance = random_run
    seen = seen_of(root)
    build_index(root, IndexConfig(n_trees=2, search_k=5, recall_floor=0.0, recall_queries=10))
    rec = Recommender.load(root, index="annoy", output="polars")
    assert not rec.is_exact
    for u, k in ((0, 3), (0, 10), (1, 20), (1, 25), (3, 50)):
        n_eligible = items.shape[0] - len(seen.get(u, set()))
        got = rec.recommend(1000 + u, k=k)
        assert got.height == min(k, n_eligible)
        assert not set(got["item_id"].to_list()) & seen.get(u, set())
    want_items, _ = brute_force(users[1], items, distance, seen[1], 20)
    assert rec.recommend(1001, k=20)["item_id"].to_list() == want_items.tolist()


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 40),
    st.sampled_from([0, 0, 5]),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_select_top_keeps_the_top_values(b, n_groups, extra, m, seed, few_values):
    n = 32 * n_groups + extra
    m = min(m, n)
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 5, (b, n)) if few_values else rng.standard_normal((b, n))
    scores = np.asarray(values, dtype=np.float32)
    scores[rng.random((b, n)) < 0.3] = -INF
    columns = _select_top(scores, m)
    assert columns.shape[0] == b and columns.shape[1] >= m
    dense = scores
    for row, cols in zip(dense, columns, strict=True):
        got = cols[cols >= 0]
        assert len(set(got.tolist())) == got.size and np.isfinite(row[got]).all()
        want = np.sort(row[np.isfinite(row)])[::-1][:m]
        np.testing.assert_array_equal(np.sort(row[got])[::-1][: want.size], want)


def test_select_top_groups_rows_and_falls_back_on_sparse_ones(monkeypatch):
    calls = []
    real = ranking._topk_columns
    monkeypatch.setattr(ranking, "_topk_columns", lambda s, m: calls.append(s.shape[0]) or real(s, m))
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((4, 32 * 50)).astype(np.float32)
    # Row 3 has finite values in 5 groups only (column c is in group c mod 50): fewer than m
    # groups reach a threshold.
    scores[3, np.arange(32 * 50) % 50 >= 5] = -INF
    columns = _select_top(scores, 10)
    assert calls == [1]
    assert columns.shape[1] < 2 * 10  # candidates are the top 10 plus a few, not whole groups
    assert sorted(columns[3][columns[3] >= 0]) == sorted(np.argsort(-scores[3])[:10])


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_exact_ranker_pads_to_whole_groups(distance):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((32 * 60 + 9, 4)).astype(np.float32)
    queries = rng.standard_normal((5, 4)).astype(np.float32)
    # The best item of query 0 is the last one, in the padded group.
    items[-1] = queries[0] * (1.0 if distance == "euclidean" else 3.0)
    ranker = _ExactRanker(items, distance)
    assert ranker.width == 32 * 61
    exclusions = _Exclusions.of_rows(
        [
            np.array([5, 7]),
            np.array([], dtype=np.int64),
            np.arange(items.shape[0] - 2),
            np.array([0]),
            np.array([1]),
        ]
    )
    found = ranker.top(queries, 12, exclusions)
    assert items.shape[0] - 1 in found[0]
    for row in range(5):
        scores = score_numpy(queries[row : row + 1], items, distance)[0]
        scores[exclusions.per_row()[row]] = -INF
        want = np.argsort(-scores, kind="stable")[:12]
        want = want[np.isfinite(scores[want])]
        got = found[row][found[row] >= 0]
        assert set(want) <= set(got) and np.isfinite(scores[got]).all()
        assert got.size == want.size or want.size == 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real small run; 12 epochs (early stopping ends it sooner) so that fold-in has learnt something."""
    base = tmp_path_factory.mktemp("trained")
    log = generate_log(200, 100, 4000, seed=1)
    log.interactions.write_parquet(base / "log.parquet")
    result = train_run(
        base / "log.parquet", base / "run", config_from_dict({"train": {"epochs": 12}}), progress=False
    )
    build_index(result.run_dir, IndexConfig(n_trees=10, recall_floor=0.0, recall_queries=20))
    return result.run_dir


def test_scores_are_the_models(trained):
    rec = Recommender.load(trained, index="exact")
    model = load_model(trained)
    users = rec.user_ids.to_list()[:40]
    batch = rec.recommend_batch(users, k=15, exclude_seen=False)
    user_nums = Vocabulary(rec.user_ids, name="user").numbers(batch["user_id"].to_numpy())
    item_nums = Vocabulary(rec.item_ids, name="item").numbers(batch["item_id"].to_numpy())
    with torch.no_grad():
        model_scores = model.score(user_nums, item_nums).numpy()[np.arange(len(batch)), np.arange(len(batch))]
    np.testing.assert_allclose(batch["score"], model_scores, rtol=1e-5, atol=1e-6)
    users_e = rec._user_vectors[user_nums]
    items_e = rec._item_vectors[item_nums]
    exported = np.array(
        [score_numpy(u[None], i[None], rec.distance)[0, 0] for u, i in zip(users_e, items_e, strict=True)]
    )
    np.testing.assert_allclose(batch["score"], exported, rtol=1e-5, atol=1e-6)
    full = score_numpy(rec._user_vectors[user_nums[:1]], rec._item_vectors, rec.distance)[0]
    assert batch["item_id"].iloc[0] == rec.item_ids[int(np.argmax(full))]


def test_batch_table_equals_per_user_recommend(trained, tmp_path):
    for index in ("exact", "annoy"):
        rec = Recommender.load(trained, index=index, output="polars")
        out = tmp_path / index
        summary = write_recommendations(trained, out, k=10, index=index, batch_users=37, progress=False)
        table = pl.read_parquet(out / "*.parquet")
        assert table.columns == ["user_id", "rank", "item_id", "score", "run_id"]
        assert summary["n_files"] == len(list(out.glob("part-*.parquet"))) == -(-rec.n_users // 37)
        assert summary["n_users"] == rec.n_users and summary["n_rows"] == table.height == 10 * rec.n_users
        assert (table["run_id"] == rec.run_id).all()
        per_user = pl.concat(
            [
                rec.recommend(u, k=10).select(pl.lit(u).alias("user_id"), "rank", "item_id", "score")
                for u in rec.user_ids
            ]
        )
        assert table.drop("run_id").equals(per_user.select(table.drop("run_id").columns))
        assert table.drop("run_id").equals(
            rec.recommend_batch(rec.user_ids, k=10).select(table.drop("run_id").columns)
        )


def test_seen_items_never_come_back(trained):
    rec = Recommender.load(trained, output="polars")
    batch = rec.recommend_batch(rec.user_ids, k=20)
    interactions = pl.read_parquet(trained / "interactions.parquet")
    users = pl.read_parquet(trained / "users.parquet")
    items = pl.read_parquet(trained / "items.parquet")
    seen = interactions.join(users, on="user_num").join(items, on="item_num").select("user_id", "item_id")
    assert batch.join(seen, on=["user_id", "item_id"], how="inner").height == 0
    assert batch.group_by("user_id").len()["len"].min() == 20


@pytest.mark.parametrize("index", ["exact", "annoy"])
def test_heavy_users_get_every_eligible_item(trained, index):
    rec = Recommender.load(trained, index=index, output="polars")
    counts = (
        pl.read_parquet(trained / "interactions.parquet")
        .group_by("user_num")
        .agg(pl.col("item_num").n_unique())
    )
    heavy = counts.sort("item_num", descending=True).head(5)
    for user_num, n_seen in heavy.iter_rows():
        user = rec.user_ids[user_num]
        eligible = rec.n_items - n_seen
        assert n_seen >= 15
        for k in (eligible - 1, eligible, eligible + 5):
            assert rec.recommend(user, k=k).height == min(k, eligible)
        top = rec.recommend(user, k=10, exclude=rec.item_ids.to_list()[:30])
        assert top.height == 10 and not set(top["item_id"]) & set(rec.item_ids.to_list()[:30])


def test_threads_agree_with_one_thread(trained):
    rec = Recommender.load(trained, index="annoy", output="polars")
    users = rec.user_ids.to_list()
    items = rec.item_ids.to_list()

    def work(j):
        return (
            rec.recommend(users[j], k=10),
            rec.similar_items(items[j % len(items)], k=5),
            rec.recommend_for_history(items[j % 50 : j % 50 + 3], k=5),
            rec.recommend(users[j], k=5, exact=True),
        )

    one = [work(j) for j in range(len(users))]
    seen_threads = set()

    def tracked(j):
        seen_threads.add(threading.get_ident())
        return work(j)

    with ThreadPoolExecutor(max_workers=8) as pool:
        many = list(pool.map(tracked, range(len(users))))
    assert len(seen_threads) > 1
    for a, b in zip(one, many, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.equals(y)


def test_history_fold_in_ranks_held_out_items_high(trained):
    rec = Recommender.load(trained, index="exact", output="polars")
    liked = pl.read_parquet(trained / "interactions.parquet").filter(pl.col("label") == 1)
    percentiles = []
    for (_,), rows in liked.group_by(["user_num"]):
        history = rows.filter(pl.col("split") == "train")["item_num"].to_numpy()
        held_out = np.setdiff1d(rows.filter(pl.col("split") == "test")["item_num"].to_numpy(), history)
        if history.size == 0 or held_out.size == 0:
            continue
        ranking = rec.recommend_for_history(rec.item_ids.gather(history), k=rec.n_items)
        position = dict(zip(ranking["item_id"].to_list(), ranking["rank"].to_list(), strict=True))
        percentiles += [position[i] / ranking.height for i in rec.item_ids.gather(held_out).to_list()]
    assert len(percentiles) > 50
    # A random ranking puts a held-out item at the 50th percentile on average.
    assert np.median(percentiles) < 0.2


def test_explain_on_a_trained_run(trained):
    rec = Recommender.load(trained, output="polars")
    interactions = pl.read_parquet(trained / "interactions.parquet")
    for user_num in range(0, 200, 40):
        user = rec.user_ids[user_num]
        liked = set(
            rec.item_ids.gather(
                interactions.filter((pl.col("user_num") == user_num) & (pl.col("label") == 1))["item_num"]
            )
        )
        target = rec.recommend(user, k=1)["item_id"][0]
        why = rec.explain(user, target, k=5)
        assert why.height == min(5, len(liked)) and set(why["liked_item_id"]) <= liked
        assert why["score"].is_sorted(descending=True)
        nums = Vocabulary(rec.item_ids, name="item").numbers(why["liked_item_id"])
        target_num = rec.item_ids.to_list().index(target)
        want = score_numpy(rec._item_vectors[[target_num]], rec._item_vectors[nums], rec.distance)[0]
        np.testing.assert_allclose(why["score"], want, rtol=1e-5, atol=1e-6)


def test_write_recommendations_is_atomic(trained, tmp_path, monkeypatch):
    out = tmp_path / "table"
    first = write_recommendations(trained, out, k=3, user_ids=[5, 1], progress=False)
    table = pl.read_parquet(out / "*.parquet")
    assert table["user_id"].to_list() == [5] * 3 + [1] * 3
    assert json.loads((out / "_manifest.json").read_text())["n_rows"] == first["n_rows"] == 6
    assert pq.read_schema(out / "part-00000.parquet").metadata[b"run_id"] == first["run_id"].encode()
    with pytest.raises(DataError, match="already exists"):
        write_recommendations(trained, out, k=3, progress=False)

    def broken(table, path):
        raise OSError("disk full")

    monkeypatch.setattr(batch, "_write_part", broken)
    with pytest.raises(OSError, match="disk full"):
        write_recommendations(trained, out, k=3, overwrite=True, progress=False)
    assert pl.read_parquet(out / "*.parquet").equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]
    monkeypatch.undo()
    second = write_recommendations(trained, out, k=4, overwrite=True, exclude_seen=False, progress=False)
    assert second["n_rows"] == 4 * 200 and pl.read_parquet(out / "*.parquet").height == 800
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]
    with pytest.raises(KeyError, match="12345"):
        write_recommendations(trained, tmp_path / "t2", user_ids=[1, 12345], progress=False)
    with pytest.raises(KeyError, match="'nobody'"):
        write_recommendations(trained, tmp_path / "t2", user_ids=["nobody"], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]


def test_exact_index_reference_agrees(trained):
    rec = Recommender.load(trained, index="exact")
    reference = ExactIndex(rec._item_vectors, rec.distance, device="cpu")
    user = rec.user_ids[3]
    nums, scores = reference.search(rec._user_vectors[3:4], 10)
    mine = rec.recommend(user, k=10, exclude_seen=False)
    assert list(mine["item_id"]) == rec.item_ids.gather(nums[0]).to_list()
    np.testing.assert_allclose(mine["score"], scores[0], rtol=1e-5, atol=1e-6)


def test_a_run_marked_serve_exact_answers_exactly_by_default(tmp_path, monkeypatch):
    import recsys_metric.index as index_module

    items = np.zeros((8, 2), dtype=np.float32)
    items[:, 0] = 0.125 * np.arange(8)
    users = np.array([[0.0, 0.0], [0.875, 0.0], [0.4375, 0.0]], dtype=np.float32)
    root = write_run(tmp_path / "run", USERS, ITEMS, users, items, [(0, 0, 1), (1, 7, 1)])
    # Annoy "misses" the floor and exact search "fits" the budget: the build marks the run exact.
    monkeypatch.setattr(
        index_module, "_measure", lambda index, sample, exact: (0.5, np.full(sample.size, 1.0))
    )
    monkeypatch.setattr(index_module, "_exact_latency", lambda *a: {"exact_p50_ms": 0.0, "exact_p99_ms": 0.0})
    build_index(root, IndexConfig(n_trees=1, recall_queries=8))
    assert json.loads((root / "index.json").read_text())["serve"] == "exact"
    rec = Recommender.load(root)
    assert rec.is_exact and rec.index is None
    assert ids(rec.similar_items("i3", k=2)) in (["i2", "i4"], ["i4", "i2"])
    assert not Recommender.load(root, index="annoy").is_exact  # the Annoy file stays usable on request
