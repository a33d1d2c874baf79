import hashlib
import json
import logging
import re
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recsys_metric.index as index_module
from recsys_metric.config import IndexConfig
from recsys_metric.errors import DataError
from recsys_metric.export import write_embeddings
from recsys_metric.index import (
    AnnoyIndex,
    ExactIndex,
    IndexMismatchError,
    IndexRecallError,
    ItemIndex,
    build_index,
    embeddings_sha256,
    file_sha256,
    recall_at_k,
)
from recsys_metric.model.distances import get_distance, score_numpy

DISTANCES = ("euclidean", "cosine", "dot")
EXACT_CONFIG = IndexConfig(n_trees=8, search_k=100_000)
"""Annoy settings that inspect every node of a tiny index, so that its answers are exact."""


def reference(queries, vectors, distance, k, exclude=None):
    """Brute force: score_numpy, mask, order by (score desc, item asc), pad with -1 / -inf."""
    scores = score_numpy(np.asarray(queries, np.float32), np.asarray(vectors, np.float32), distance)
    if exclude is not None:
        for b, items in enumerate(exclude):
            scores[b, np.asarray(items, dtype=np.int64)] = -np.inf
    n = scores.shape[1]
    order = np.lexsort((np.broadcast_to(np.arange(n), scores.shape), -scores), axis=1)[:, :k]
    top_s = np.take_along_axis(scores, order, axis=1)
    top_i = np.where(top_s == -np.inf, -1, order)
    pad = k - top_i.shape[1]
    top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_i.astype(np.int64), top_s.astype(np.float32)


def clustered(n, dim, seed=0, clusters=8):
    """Gaussian clusters inside the unit ball (the model keeps euclidean embeddings there)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim))
    x = centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1).max()).astype(np.float32)


@pytest.fixture(params=["exact", "annoy"])
def make_index(request, tmp_path):
    counter = iter(range(1000))

    def make(vectors, distance, config=EXACT_CONFIG):
        if request.param == "exact":
            return ExactIndex(vectors, distance, device="cpu", block_size=64)
        return AnnoyIndex.build(vectors, distance, config, path=tmp_path / f"idx{next(counter)}")

    make.kind = request.param
    return make


def line(n, dim=3):
    """Items ``i`` at ``(i, 0, 0)``: integer coordinates, so every score is exact in float32."""
    v = np.zeros((n, dim), dtype=np.float32)
    v[:, 0] = np.arange(n)
    return v


def test_euclidean_line_neighbours_in_distance_order(make_index):
    index = make_index(line(30), "euclidean")
    items, scores = index.search(np.array([[10.0, 0, 0], [0.0, 0, 0]], np.float32), 7)
    assert items.dtype == np.int64 and scores.dtype == np.float32 and items.shape == (2, 7)
    assert items[0].tolist() == [10, 9, 11, 8, 12, 7, 13]
    assert items[1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(scores[0], [0.0, -1, -1, -2, -2, -3, -3], atol=1e-6)


def test_cosine_fan_neighbours_ignore_length(make_index):
    angles = np.deg2rad(np.arange(18) * 10.0)
    radius = 1.0 + np.arange(18) % 3
    v = np.stack([np.cos(angles) * radius, np.sin(angles) * radius, np.zeros(18)], axis=1)
    index = make_index(v.astype(np.float32), "cosine")
    items, scores = index.search(np.array([[5.0, 0, 0]], np.float32), 6)
    assert items[0].tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(scores[0], np.cos(angles[:6]), atol=1e-6)


def test_dot_prefers_long_vectors(make_index):
    index = make_index(line(30) - 15, "dot")
    items, scores = index.search(np.array([[1.0, 0, 0], [-1.0, 0, 0]], np.float32), 4)
    assert items.tolist() == [[29, 28, 27, 26], [0, 1, 2, 3]]
    assert scores.tolist() == [[14, 13, 12, 11], [15, 14, 13, 12]]


@pytest.mark.parametrize("distance", ["euclidean", "dot"])
def test_ties_go_to_the_lower_item_number(make_index, distance):
    grid = np.array([(x, y, 1) for x in range(6) for y in range(6)], dtype=np.float32)
    index = make_index(grid, distance)
    query = np.array([[2.0, 2.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    items, scores = index.search(query, 9)
    ref_items, ref_scores = reference(query, grid, distance, 9)
    assert items.tolist() == ref_items.tolist()
    assert scores.tolist() == ref_scores.tolist()
    if distance == "dot":
        assert items[1].tolist() == [30, 31, 32, 33, 34, 35, 24, 25, 26]


@pytest.mark.parametrize("distance", DISTANCES)
def test_results_and_scores_match_score_numpy(make_index, distance):
    vectors = clustered(300, 8, seed=1)
    queries = clustered(12, 8, seed=2)
    items, scores = make_index(vectors, distance).search(queries, 10)
    ref_items, ref_scores = reference(queries, vectors, distance, 10)
    assert items.tolist() == ref_items.tolist()
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    torch_scores = get_distance(distance).score(torch.from_numpy(queries), torch.from_numpy(vectors)).numpy()
    np.testing.assert_allclose(scores, np.take_along_axis(torch_scores, items, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance", DISTANCES)
def test_exclusions_never_shorten_results(make_index, distance):
    vectors = clustered(200, 6, seed=3)
    queries = clustered(5, 6, seed=4)
    top, _ = reference(queries, vectors, distance, 15)
    index = make_index(vectors, distance)
    items, scores = index.search(queries, 10, exclude=[row[:5] for row in top])
    assert (items >= 0).all() and np.isfinite(scores).all()
    assert items.tolist() == top[:, 5:15].tolist()


def test_exclusions_with_duplicates_and_empty_rows(make_index):
    index = make_index(line(20), "euclidean")
    query = np.zeros((2, 3), np.float32)
    items, _ = index.search(query, 3, exclude=[np.array([0, 0, 1, 1]), np.array([], dtype=np.int64)])
    assert items.tolist() == [[2, 3, 4], [0, 1, 2]]


def test_padding_when_too_few_eligible_items(make_index):
    index = make_index(line(4), "euclidean")
    query = np.zeros((2, 3), np.float32)
    items, scores = index.search(query, 6, exclude=[np.array([1]), np.array([0, 1, 2, 3])])
    assert items.tolist() == [[0, 2, 3, -1, -1, -1], [-1] * 6]
    np.testing.assert_allclose(scores[0, :3], [0.0, -2.0, -3.0], atol=1e-5)
    assert np.isneginf(scores[0, 3:]).all() and np.isneginf(scores[1]).all()


def test_search_items_excludes_the_item_itself(make_index):
    vectors = line(25)
    vectors[7] = vectors[3]
    index = make_index(vectors, "euclidean")
    items, _ = index.search_items(np.array([3, 10]), 4)
    assert items.tolist() == [[7, 2, 4, 1], [9, 11, 8, 12]]
    items, _ = index.search_items(np.array([10]), 2, exclude=[np.array([9])])
    assert items.tolist() == [[11, 8]]


def test_batch_equals_single_queries(make_index):
    vectors = clustered(150, 5, seed=5)
    queries = clustered(6, 5, seed=6)
    exclude = [np.arange(b, b * 3) for b in range(6)]
    index = make_index(vectors, "cosine")
    batch = index.search(queries, 8, exclude=exclude)
    for b in range(6):
        single = index.search(queries[b : b + 1], 8, exclude=exclude[b : b + 1])
        assert single[0].tolist() == batch[0][b : b + 1].tolist()
        assert single[1].tolist() == batch[1][b : b + 1].tolist()


def test_many_threads_give_the_same_answers(make_index):
    vectors = clustered(400, 8, seed=7)
    index = make_index(vectors, "euclidean", IndexConfig(n_trees=5))
    queries = clustered(64, 8, seed=8)
    exclude = [np.arange(b % 7) for b in range(64)]
    expected = [index.search(queries[b : b + 1], 10, exclude=exclude[b : b + 1]) for b in range(64)]
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(t):
        try:
            for _ in range(3):
                for b in range(t, 64, 8):
                    results[b] = index.search(queries[b : b + 1], 10, exclude=exclude[b : b + 1])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for b in range(64):
        assert results[b][0].tolist() == expected[b][0].tolist()
        assert results[b][1].tolist() == expected[b][1].tolist()


def test_input_errors(make_index):
    index = make_index(line(10), "euclidean")
    assert isinstance(index, ItemIndex) and index.is_exact == (make_index.kind == "exact")
    assert (index.distance, index.dim, index.n_items) == ("euclidean", 3, 10)
    with pytest.raises(ValueError, match=re.escape("queries must be a real [B, 3] array, got float32 (4,)")):
        index.search(np.zeros(4, np.float32), 2)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        index.search(np.zeros((1, 3), np.float32), 0)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        index.search(np.zeros((2, 3), np.float32), 2, exclude=[np.array([1])])
    with pytest.raises(ValueError, match=re.escape("exclude holds 1 item numbers outside [0, 10), e.g. 10")):
        index.search(np.zeros((1, 3), np.float32), 2, exclude=[np.array([3, 10])])
    with pytest.raises(ValueError, match="queries hold 1 NaN or infinite values"):
        index.search(np.array([[0.0, np.nan, 0.0]]), 2)
    with pytest.raises(ValueError, match=re.escape("item_nums hold 1 values outside [0, 10), e.g. -1")):
        index.search_items(np.array([-1]), 2)
    empty_items, empty_scores = index.search(np.zeros((0, 3), np.float32), 4)
    assert empty_items.shape == (0, 4) and empty_scores.shape == (0, 4)


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 40),
    k=st.integers(1, 12),
    block_size=st.integers(1, 50),
    distance=st.sampled_from(["euclidean", "dot"]),
)
def test_exact_blocks_and_ties_match_brute_force(data, n, k, block_size, distance):
    # Small integer vectors: many exact ties, which must be broken by item number across blocks.
    vectors = np.array(
        data.draw(st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=n, max_size=n)),
        dtype=np.float32,
    )
    queries = np.array(
        data.draw(st.lists(st.lists(st.integers(-2, 2), min_size=3, max_size=3), min_size=1, max_size=4)),
        dtype=np.float32,
    )
    exclude = [
        np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=n)), dtype=np.int64) for _ in queries
    ]
    items, scores = ExactIndex(vectors, distance, device="cpu", block_size=block_size).search(
        queries, k, exclude=exclude
    )
    ref_items, ref_scores = reference(queries, vectors, distance, k, exclude)
    assert items.tolist() == ref_items.tolist()
    assert scores.tolist() == ref_scores.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_on_cuda_matches_cpu():
    vectors = clustered(5000, 16, seed=9)
    queries = clustered(50, 16, seed=10)
    cpu = ExactIndex(vectors, "euclidean", device="cpu").search(queries, 10)
    gpu = ExactIndex(vectors, "euclidean", device="cuda").search(queries, 10)
    assert gpu[0].tolist() == cpu[0].tolist()
    np.testing.assert_allclose(gpu[1], cpu[1], rtol=1e-5, atol=1e-5)


def test_annoy_refetches_until_k_results(tmp_path):
    vectors = clustered(500, 8, seed=11)
    AnnoyIndex.build(vectors, "euclidean", IndexConfig(n_trees=2), path=tmp_path)
    index = AnnoyIndex.load(tmp_path, vectors=vectors, search_k=1)
    queries = clustered(20, 8, seed=12)
    exact, _ = ExactIndex(vectors, "euclidean").search(queries, 50)
    exclude = [row[:40] for row in exact]
    for ex in (None, exclude):
        items, scores = index.search(queries, 30, exclude=ex)
        assert (items >= 0).all() and np.isfinite(scores).all()
        assert all(len(set(row)) == 30 for row in items.tolist())
        if ex is not None:
            assert not any(set(row) & set(e.tolist()) for row, e in zip(items.tolist(), ex, strict=True))
        np.testing.assert_allclose(
            scores, np.take_along_axis(score_numpy(queries, vectors, "euclidean"), items, 1), atol=1e-5
        )
        assert (np.diff(scores, axis=1) <= 0).all()


def test_annoy_and_exact_agree_on_shared_items(tmp_path):
    vectors = clustered(2000, 16, seed=13)
    queries = clustered(40, 16, seed=14)
    annoy_index = AnnoyIndex.build(vectors, "cosine", IndexConfig(n_trees=4), path=tmp_path)
    a_items, a_scores = annoy_index.search(queries, 10)
    e_items, e_scores = ExactIndex(vectors, "cosine").search(queries, 10)
    shared = 0
    for b in range(40):
        exact_score = dict(zip(e_items[b].tolist(), e_scores[b].tolist(), strict=True))
        for item, score in zip(a_items[b].tolist(), a_scores[b].tolist(), strict=True):
            if item in exact_score:
                shared += 1
                assert score == exact_score[item]
    assert shared > 100


def test_annoy_build_is_reproducible_and_writes_the_sidecar(tmp_path):
    vectors = clustered(600, 8, seed=15)
    config = IndexConfig(n_trees=6, seed=7, search_k=500)
    AnnoyIndex.build(vectors, "dot", config, path=tmp_path / "a")
    AnnoyIndex.build(vectors, "dot", config, path=tmp_path / "b")
    AnnoyIndex.build(vectors, "dot", config.model_copy(update={"on_disk_build": True}), path=tmp_path / "c")
    AnnoyIndex.build(vectors, "dot", config.model_copy(update={"seed": 8}), path=tmp_path / "d")
    digest = file_sha256(tmp_path / "a" / "items.ann")
    assert digest == file_sha256(tmp_path / "b" / "items.ann") == file_sha256(tmp_path / "c" / "items.ann")
    assert digest != file_sha256(tmp_path / "d" / "items.ann")
    meta = json.loads((tmp_path / "a" / "index.json").read_text())
    assert meta == {
        "dim": 8,
        "metric": "dot",
        "distance": "dot",
        "n_trees": 6,
        "search_k": 500,
        "seed": 7,
        "n_items": 600,
        "embeddings_sha256": embeddings_sha256(vectors),
        "annoy_version": "1.17.3",
        "recall_at_10": None,
    }
    assert (
        sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["index.json"] * 4 + ["items.ann"] * 4
    )


def test_rebuilding_under_a_loaded_index_keeps_it_working(tmp_path):
    vectors = clustered(300, 8, seed=16)
    old = AnnoyIndex.build(vectors, "euclidean", IndexConfig(n_trees=3), path=tmp_path)
    before = old.search(vectors[:5], 5)
    AnnoyIndex.build(vectors, "euclidean", IndexConfig(n_trees=9, seed=1), path=tmp_path)
    after = old.search(vectors[:5], 5)
    assert before[0].tolist() == after[0].tolist()
    assert AnnoyIndex.load(tmp_path, vectors=vectors).n_trees == 9


def test_hashes():
    vectors = np.arange(6, dtype=np.float64).reshape(2, 3)
    expected = hashlib.sha256(np.arange(6, dtype=np.float32).tobytes()).hexdigest()
    assert embeddings_sha256(vectors) == expected
    assert embeddings_sha256(np.asfortranarray(vectors.astype(np.float32))) == expected


def test_file_sha256(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path, chunk_bytes=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def mismatch_message(path, field, found, expected):
    return re.escape(
        f"index {path / 'index.json'}: {field} is {found!r} in the index but {expected!r} is expected; "
        "rebuild the index (recsys_metric.index.build_index) from the current item_embeddings.parquet"
    )


def test_load_refuses_an_index_of_other_embeddings(tmp_path):
    vectors = clustered(100, 6, seed=17)
    AnnoyIndex.build(vectors, "cosine", IndexConfig(n_trees=2), path=tmp_path)
    sha = embeddings_sha256(vectors)
    cases = [
        (dict(vectors=clustered(100, 5, seed=17)), "dim", 6, 5),
        (dict(vectors=vectors, distance="euclidean"), "metric", "angular", "euclidean"),
        (dict(vectors=vectors[:99]), "n_items", 100, 99),
        (dict(vectors=vectors * 2), "embeddings_sha256", sha, embeddings_sha256(vectors * 2)),
        (dict(vectors=vectors, expected_sha256="ab" * 32), "embeddings_sha256", sha, "ab" * 32),
    ]
    for kwargs, field, found, expected in cases:
        with pytest.raises(
            IndexMismatchError, match=mismatch_message(tmp_path, field, found, expected)
        ) as err:
            AnnoyIndex.load(tmp_path, **kwargs)
        assert isinstance(err.value, DataError)
        assert (err.value.field, err.value.found, err.value.expected) == (field, found, expected)
    meta = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**meta, "metric": "euclidean"}))
    with pytest.raises(
        IndexMismatchError, match=mismatch_message(tmp_path, "metric", "euclidean", "angular")
    ):
        AnnoyIndex.load(tmp_path, vectors=vectors)
    (tmp_path / "index.json").write_text(json.dumps({**meta, "n_items": 99}))
    with pytest.raises(
        IndexMismatchError, match=r"items.ann: n_items is 100 in the index but 99 is expected"
    ):
        AnnoyIndex.load(tmp_path, vectors=vectors[:99], expected_sha256=sha)
    (tmp_path / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "seed"}))
    with pytest.raises(DataError, match=r"index.json lacks \['seed'\]; rebuild the index$"):
        AnnoyIndex.load(tmp_path, vectors=vectors)
    (tmp_path / "index.json").unlink()
    with pytest.raises(DataError, match="index.json does not exist"):
        AnnoyIndex.load(tmp_path, vectors=vectors)


def write_run(run_dir, vectors, distance="euclidean"):
    write_embeddings(
        run_dir / "item_embeddings.parquet",
        np.arange(len(vectors)) * 10,
        vectors,
        kind="item",
        distance=distance,
        run_id="r1",
    )


def test_build_index_measures_and_records(tmp_path):
    vectors = clustered(1500, 8, seed=18)
    write_run(tmp_path, vectors)
    config = IndexConfig(n_trees=10, recall_queries=200)
    result = build_index(tmp_path, config)
    assert set(result) == {
        "recall_at_10",
        "n_trees",
        "search_k",
        "search_k_configured",
        "search_k_tuning",
        "latency_limit_ms",
        "serve",
        "build_seconds",
        "size_bytes",
        "p50_ms",
        "p99_ms",
    }
    assert result["recall_at_10"] >= 0.9 and (result["n_trees"], result["search_k"]) == (10, 2000)
    # The configured search_k met the floor: one measurement, no tuning, Annoy serves.
    assert [t["search_k"] for t in result["search_k_tuning"]] == [2000] and result["serve"] == "annoy"
    assert result["size_bytes"] == (tmp_path / "items.ann").stat().st_size
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["build_seconds"] > 0
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["embeddings_sha256"] == embeddings_sha256(vectors) and meta["n_items"] == 1500
    assert {key: meta[key] for key in result} == result
    index = AnnoyIndex.load(tmp_path, vectors=vectors)
    assert index.search_items(np.array([0]), 3)[0].shape == (1, 3)


def test_build_index_recall_floor(tmp_path, caplog):
    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    write_run(tmp_path, vectors)
    config = IndexConfig(
        n_trees=1,
        search_k=10,
        recall_queries=100,
        recall_floor=0.99,
        tune_search_k=False,
        latency_budget_ms=1e-6,
    )
    with pytest.raises(IndexRecallError) as err:
        build_index(tmp_path, config)
    recall = json.loads((tmp_path / "index.json").read_text())["recall_at_10"]
    assert recall < 0.99 and err.value.recall == pytest.approx(recall, abs=1e-4)
    assert str(err.value) == (
        f"Annoy index in {tmp_path}: recall@10 against exact search is {err.value.recall:.4f} on 100 sampled "
        "items at search_k 10, below index.recall_floor 0.99; raise index.n_trees (now 1), index.search_k "
        "(now 10) or index.latency_budget_ms (now 1e-06), or set index.on_low_recall: warn"
    )
    with caplog.at_level(logging.WARNING, logger="recsys_metric.index"):
        result = build_index(tmp_path, config.model_copy(update={"on_low_recall": "warn"}))
    assert result["recall_at_10"] < 0.99
    assert "below index.recall_floor 0.99; raise index.n_trees (now 1)" in caplog.text


def test_recall_at_k_ignores_padding():
    exact = np.array([[1, 2, -1], [-1, -1, -1], [4, 5, 6]])
    approx = np.array([[2, 9, 8], [0, 1, 2], [6, 4, 7]])
    assert recall_at_k(approx, exact) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_build_index_tunes_search_k_up_to_the_floor(tmp_path):
    # Gaussian vectors in 32 dims are hard for one tree: search_k 10 misses, more nodes find them.
    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    write_run(tmp_path, vectors)
    config = IndexConfig(n_trees=1, search_k=10, recall_queries=100, recall_floor=0.99, latency_budget_ms=1e4)
    result = build_index(tmp_path, config)
    steps = [t["search_k"] for t in result["search_k_tuning"]]
    assert steps[0] == 10 and steps == sorted(steps) and len(steps) > 1
    assert all(b == min(2 * a, 2000) for a, b in zip(steps, steps[1:], strict=False))
    assert result["search_k_tuning"][0]["recall_at_10"] < 0.99 <= result["recall_at_10"]
    assert (result["search_k"], result["search_k_configured"], result["serve"]) == (steps[-1], 10, "annoy")
    # The index answers with the tuned search_k from now on.
    assert AnnoyIndex.load(tmp_path, vectors=vectors).search_k == steps[-1]
    assert json.loads((tmp_path / "index.json").read_text())["search_k"] == steps[-1]


def test_build_index_falls_back_to_exact_when_annoy_misses_within_the_budget(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(19)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    write_run(tmp_path, vectors)
    # Every Annoy query is over a 1 ns budget, so tuning stops at once; exact search "answers in" 0.5 ns.
    monkeypatch.setattr(
        index_module, "_exact_latency", lambda *a: {"exact_p50_ms": 0.0000005, "exact_p99_ms": 0.0000009}
    )
    config = IndexConfig(
        n_trees=1, search_k=10, recall_queries=100, recall_floor=0.99, latency_budget_ms=1e-6
    )
    with caplog.at_level(logging.WARNING, logger="recsys_metric.index"):
        result = build_index(tmp_path, config)
    assert result["serve"] == "exact" and result["recall_at_10"] < 0.99 and result["search_k"] == 10
    assert result["exact_p50_ms"] == 0.0000005
    assert "so this run answers queries exactly (index.json serve: exact)" in caplog.text
    assert json.loads((tmp_path / "index.json").read_text())["serve"] == "exact"


def test_search_k_tuning_may_spend_up_to_exact_searchs_latency(tmp_path, monkeypatch):
    """Annoy over the 5 ms budget but faster than exact search (9.6 ms) goes on tuning: recall
    0.87 at 4.4 ms, 0.93 at 8.8 ms (the 20M log's 128-dimension embeddings, simplified)."""
    write_run(tmp_path, np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32))
    curve = {2000: (0.5, 0.5e-3), 4000: (0.7, 1.1e-3), 8000: (0.8, 2.2e-3), 16000: (0.85, 3.3e-3),
             32000: (0.873, 5.4e-3), 64000: (0.93, 8.8e-3), 128000: (0.99, 17e-3)}  # fmt: skip
    monkeypatch.setattr(
        index_module,
        "_measure",
        lambda index, sample, exact: (curve[index.search_k][0], np.full(10, curve[index.search_k][1])),
    )
    exact_calls = []

    def exact_latency(*args):
        exact_calls.append(1)
        return {"exact_p50_ms": 9.6, "exact_p99_ms": 12.0}

    monkeypatch.setattr(index_module, "_exact_latency", exact_latency)
    result = build_index(tmp_path, IndexConfig(n_trees=1000, search_k=2000, latency_budget_ms=5.0))
    assert (result["search_k"], result["recall_at_10"], result["serve"]) == (64000, 0.93, "annoy")
    assert result["latency_limit_ms"] == 9.6 and result["exact_p50_ms"] == 9.6 and len(exact_calls) == 1
    assert [t["search_k"] for t in result["search_k_tuning"]] == [2000, 4000, 8000, 16000, 32000, 64000]
    # Exact search no slower than the budget: the limit stays and the exact fallback serves.
    monkeypatch.setattr(index_module, "_exact_latency", lambda *a: {"exact_p50_ms": 3.0, "exact_p99_ms": 4.0})
    result = build_index(tmp_path, IndexConfig(n_trees=1000, search_k=2000, latency_budget_ms=5.0))
    assert (result["search_k"], result["serve"], result["latency_limit_ms"]) == (16000, "exact", 5.0)
