import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_metric.config import EvalConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError
from recsys_metric.evaluate import (
    EVAL_BATCH_BYTES,
    EvaluationResult,
    ItemScores,
    ScoresInto,
    UserSample,
    _chunk_size,
    _top_k_candidates,
    eval_batch_size,
    evaluate_scores,
    evaluate_with_baselines,
    interaction_matrices,
    popularity_score_fn,
    sample_users,
    top_k,
    training_items_mask,
)

# 3 users x 6 items. Training: u0 {0}, u1 {1, 2}, u2 {5}. Test: u0 {4, 5}, u1 {5}, u2 {2, 3, 4}.
# With training items at -inf the rankings are
#   u0: 3, 1, 5, 4, 2     top 3 = [3, 1, 5], hits [0, 0, 1]
#   u1: 3, 5, 4, 0        top 3 = [3, 5, 4], hits [0, 1, 0]
#   u2: 3, 0, 2, 1, 4     top 3 = [3, 0, 2], hits [1, 0, 1]   (items 1 and 4 tie at 0: 1 first)
TRAIN = InteractionMatrix.from_pairs([0, 1, 1, 2], [0, 1, 2, 5], 3, 6)
TEST = InteractionMatrix.from_pairs([0, 0, 1, 2, 2, 2], [4, 5, 5, 2, 3, 4], 3, 6)
SCORES = torch.tensor(
    [
        [9.0, 5.0, 1.0, 8.0, 2.0, 3.0],
        [1.0, 9.0, 9.0, 7.0, 5.0, 6.0],
        [4.0, 0.0, 3.0, 6.0, 0.0, 10.0],
    ]
)


def table_fn(scores):
    return lambda users: scores[torch.from_numpy(users)]


def test_hand_computed_metrics():
    got = evaluate_scores(table_fn(SCORES), TRAIN, TEST, ks=(1, 3))
    log2_3 = math.log2(3)
    # Recall@3 = hits / min(|rel|, 3): u0 1/2, u1 1/1, u2 2/3.
    assert got["recall@3"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert got["recall@1"] == pytest.approx((0 + 0 + 1) / 3)
    # NDCG@3: u0 hit at rank 3 -> (1/log2 4) / (1 + 1/log2 3); u1 hit at rank 2 -> (1/log2 3) / 1;
    # u2 hits at ranks 1 and 3 -> (1 + 1/log2 4) / (1 + 1/log2 3 + 1/log2 4).
    ndcg_u0 = (1 / math.log2(4)) / (1 + 1 / log2_3)
    ndcg_u1 = (1 / log2_3) / 1
    ndcg_u2 = (1 + 1 / math.log2(4)) / (1 + 1 / log2_3 + 1 / math.log2(4))
    assert got["ndcg@3"] == pytest.approx((ndcg_u0 + ndcg_u1 + ndcg_u2) / 3)
    assert got["ndcg@1"] == pytest.approx(1 / 3)
    # MAP@3: u0 (P@3 = 1/3) / 2; u1 (P@2 = 1/2) / 1; u2 (P@1 = 1 + P@3 = 2/3) / 3.
    assert got["map@3"] == pytest.approx((1 / 6 + 1 / 2 + 5 / 9) / 3)
    assert got["map@3"] == pytest.approx(11 / 27)
    assert got["map@1"] == pytest.approx(1 / 3)
    assert got["hitrate@1"] == pytest.approx(1 / 3)
    assert got["hitrate@3"] == 1.0
    # Top 1 is item 3 for everyone; the three top-3 lists together hold all six items.
    assert got["coverage@1"] == pytest.approx(1 / 6)
    assert got["coverage@3"] == 1.0
    assert got["n_users"] == 3
    assert list(got) == [
        f"{m}@{k}" for m in ("recall", "ndcg", "map", "hitrate", "coverage") for k in (1, 3)
    ] + ["n_users"]


def test_top_k_breaks_ties_by_item_number():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0], [float("-inf")] * 4 + [5.0, float("-inf")]])
    items, values = top_k(scores, 3)
    assert items.tolist() == [[1, 2, 3], [4, 0, 1]]
    assert values[0].tolist() == [2.0, 2.0, 2.0]
    assert values[1, 0] == 5.0 and torch.isinf(values[1, 1:]).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_rows=st.integers(1, 6),
    n_items=st.integers(1, 30),
    levels=st.integers(1, 4),
    k=st.integers(1, 30),
)
def test_top_k_matches_a_sort_by_score_then_item(seed, n_rows, n_items, levels, k):
    # Few score levels and some -inf: ties across the k-th place are the common case here.
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (n_rows, n_items)).astype(np.float32)
    scores[rng.random((n_rows, n_items)) < 0.2] = -np.inf
    k = min(k, n_items)
    items, values = top_k(torch.from_numpy(scores), k)
    for row in range(n_rows):
        expected = sorted(range(n_items), key=lambda i: (-scores[row, i], i))[:k]
        assert items[row].tolist() == expected
        assert values[row].tolist() == scores[row, expected].tolist()


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_users=st.integers(1, 12),
    n_items=st.integers(1, 15),
    levels=st.integers(1, 4),
    exclude_seen=st.booleans(),
    masked=st.booleans(),
    batch_size=st.integers(1, 8),
)
def test_item_scores_ranked_once_match_per_user_ranking(
    seed, n_users, n_items, levels, exclude_seen, masked, batch_size
):
    # ItemScores (popularity) takes the global-order path; the same scores as a plain table take
    # the per-user path. Every metric must agree, ties and candidate masks included.
    rng = np.random.default_rng(seed)
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 4 * n_users), rng.integers(0, n_items, 4 * n_users), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 2 * n_users), rng.integers(0, n_items, 2 * n_users), n_users, n_items
    )
    item_scores = torch.from_numpy(rng.integers(0, levels, n_items).astype(np.float32))
    mask = rng.random(n_items) < 0.8 if masked else None
    kwargs = dict(ks=(1, 3, 10), exclude_seen=exclude_seen, candidate_mask=mask, batch_size=batch_size)
    try:
        expected = evaluate_scores(lambda u: item_scores.expand(len(u), -1).clone(), train, test, **kwargs)
    except DataError:
        with pytest.raises(DataError):
            evaluate_scores(ItemScores(item_scores), train, test, **kwargs)
        return
    assert evaluate_scores(ItemScores(item_scores), train, test, **kwargs) == pytest.approx(
        expected, rel=1e-12
    )


def test_scores_of_the_caller_are_not_written():
    table = SCORES.clone()
    mask = np.array([True, True, True, True, True, False])
    # A view of the caller's table (the rows do not matter here, only that nothing writes into it).
    evaluate_scores(lambda u: table[: len(u)], TRAIN, TEST, ks=(2,))
    evaluate_scores(lambda u: table[: len(u)], TRAIN, TEST, ks=(2,), candidate_mask=mask)
    evaluate_scores(lambda u: table[: len(u)], TRAIN, TEST, ks=(2,), device="cpu")
    assert torch.equal(table, SCORES)
    with pytest.raises(ValueError, match="1 NaN values"):
        ItemScores(torch.tensor([1.0, float("nan")]))


def test_seen_items_never_count_as_hits_when_excluded():
    train = InteractionMatrix.from_pairs([0, 1], [0, 2], 2, 4)
    # u0's test items: 0 (also seen in training) and 1; u1's only test item 2 was seen in training.
    test = InteractionMatrix.from_pairs([0, 0, 1], [0, 1, 2], 2, 4)
    scores = torch.tensor([[9.0, 1.0, 8.0, 7.0], [1.0, 2.0, 9.0, 3.0]])
    excluded = evaluate_scores(table_fn(scores), train, test, ks=(1, 2))
    # u0's reachable relevant set is {1}; ranking 2, 3, 1: no hit in the top 2. u1 has none left.
    assert excluded["n_users"] == 1
    assert excluded["recall@2"] == 0.0 and excluded["hitrate@2"] == 0.0
    kept = evaluate_scores(table_fn(scores), train, test, ks=(1, 2), exclude_seen=False)
    # Without exclusion: u0 hits item 0 at rank 1 (|rel| = 2), u1 hits item 2 at rank 1.
    assert kept["n_users"] == 2
    assert kept["recall@1"] == 1.0 and kept["recall@2"] == pytest.approx((1 / 2 + 1) / 2)


def test_candidate_mask_respected():
    train = InteractionMatrix.from_pairs([0], [5], 2, 6)
    test = InteractionMatrix.from_pairs([0, 0, 1], [0, 4, 4], 2, 6)
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    mask = np.array([False, True, True, True, True, False])
    got = evaluate_scores(
        table_fn(scores), train, test, ks=(1, 2, 4), candidate_mask=mask, exclude_seen=False
    )
    # Items 0 and 5 are never ranked: top 4 = [1, 2, 3, 4] for both; item 0 leaves u0's relevant set.
    assert got["n_users"] == 2
    assert got["recall@2"] == 0.0
    assert got["recall@4"] == 1.0
    assert got["ndcg@4"] == pytest.approx(1 / math.log2(5))
    assert got["coverage@2"] == pytest.approx(2 / 4)
    assert got["coverage@4"] == 1.0
    assert training_items_mask(train).tolist() == [False] * 5 + [True]


def test_perfect_scorer_gives_one():
    rng = np.random.default_rng(0)
    n_users, n_items = 40, 30
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 200), rng.integers(0, n_items, 200), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 150), rng.integers(0, n_items, 150), n_users, n_items
    )
    relevance = torch.zeros(n_users, n_items)
    relevance[torch.from_numpy(test.keys() // n_items), torch.from_numpy(test.keys() % n_items)] = 1.0
    got = evaluate_scores(table_fn(relevance), train, test, ks=(1, 5, 40))
    for name in ("recall", "ndcg", "map", "hitrate"):
        for k in (1, 5, 40):
            assert got[f"{name}@{k}"] == pytest.approx(1.0), f"{name}@{k}"


def test_batch_size_does_not_change_results():
    rng = np.random.default_rng(1)
    n_users, n_items = 37, 25
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 150), rng.integers(0, n_items, 150), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 90), rng.integers(0, n_items, 90), n_users, n_items
    )
    # Few distinct values: many ties, which must resolve the same way in every batch layout.
    scores = torch.from_numpy(rng.integers(0, 4, (n_users, n_items)).astype(np.float32))
    results = [
        evaluate_scores(table_fn(scores), train, test, ks=(3, 10), batch_size=b)
        for b in (1, 4, 7, 1024, None)
    ]
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-12)


def test_numpy_scores_and_k_beyond_catalog():
    got = evaluate_scores(lambda u: SCORES.numpy()[u], TRAIN, TEST, ks=(3, 100))
    assert got["recall@3"] == pytest.approx(13 / 18)
    # K = 100 > 6 items: every reachable relevant item is in the list; recall divides by min(|rel|, K).
    assert got["recall@100"] == 1.0 and got["coverage@100"] == 1.0


def test_popularity_ranks_by_count():
    # Item counts in training: item 3 by 3 users, item 1 by 2, item 0 by 1; items 2, 4 never.
    train = InteractionMatrix.from_pairs([0, 1, 2, 1, 2, 3], [3, 3, 3, 1, 1, 0], 5, 5)
    scores = popularity_score_fn(train)(np.array([0, 4]))
    assert scores.tolist() == [[1.0, 2.0, 0.0, 3.0, 0.0]] * 2
    items, _ = top_k(scores.clone(), 5)
    assert items.tolist() == [[3, 1, 0, 2, 4]] * 2
    test = InteractionMatrix.from_pairs([4, 0], [3, 1], 5, 5)
    got = evaluate_scores(popularity_score_fn(train), train, test, ks=(1,))
    # u4 (no training) gets item 3 first: a hit. u0 has item 3 excluded, so item 1 comes first: a hit.
    assert got["recall@1"] == 1.0 and got["n_users"] == 2


def test_coverage_counts_distinct_items():
    train = InteractionMatrix.from_pairs([], [], 4, 6)
    test = InteractionMatrix.from_pairs([0, 1, 2, 3], [0, 0, 0, 0], 4, 6)
    same = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4, -1)
    assert evaluate_scores(lambda u: same[: len(u)], train, test, ks=(2,))["coverage@2"] == pytest.approx(
        2 / 6
    )
    shifted = torch.stack([torch.roll(same[0], int(u)) for u in range(4)])
    # Top 2 per user: {0,1}, {1,2}, {2,3}, {3,4} -> 5 distinct of 6.
    assert evaluate_scores(table_fn(shifted), train, test, ks=(2,))["coverage@2"] == pytest.approx(5 / 6)


def test_users_argument_and_errors():
    got = evaluate_scores(table_fn(SCORES), TRAIN, TEST, ks=(3,), users=np.array([1, 2]))
    assert got["n_users"] == 2 and got["recall@3"] == pytest.approx((1 + 2 / 3) / 2)
    with pytest.raises(DataError, match="no user has a relevant test item"):
        evaluate_scores(table_fn(SCORES), TRAIN, InteractionMatrix.from_pairs([], [], 3, 6))
    with pytest.raises(ValueError, match=r"score_fn returned shape \(3, 5\), expected \[3, 6\]"):
        evaluate_scores(lambda u: SCORES[:, :5], TRAIN, TEST)
    nan_scores = SCORES.clone()
    nan_scores[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN scores"):
        evaluate_scores(table_fn(nan_scores), TRAIN, TEST)


def reference_metrics(scores, train, test, ks, exclude_seen):
    """Per-user loop over explicit sorted lists: the conventions written out plainly."""
    sums = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "map", "hitrate") for k in ks}
    shown = {k: set() for k in ks}
    n = 0
    for u in range(train.n_users):
        seen = set(train.row(u).tolist()) if exclude_seen else set()
        rel = set(test.row(u).tolist()) - seen
        if not rel:
            continue
        n += 1
        ranking = sorted((i for i in range(train.n_items) if i not in seen), key=lambda i: (-scores[u, i], i))
        for k in ks:
            top = ranking[:k]
            shown[k].update(top)
            hits = [1 if i in rel else 0 for i in top]
            denom = min(len(rel), k)
            sums[f"recall@{k}"] += sum(hits) / denom
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            sums[f"ndcg@{k}"] += dcg / sum(1 / math.log2(r + 2) for r in range(denom))
            sums[f"map@{k}"] += sum(sum(hits[: r + 1]) / (r + 1) for r, h in enumerate(hits) if h) / denom
            sums[f"hitrate@{k}"] += float(any(hits))
    out = {key: value / n for key, value in sums.items()}
    out.update({f"coverage@{k}": len(shown[k]) / train.n_items for k in ks})
    out["n_users"] = n
    return out


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_users=st.integers(1, 12),
    n_items=st.integers(1, 15),
    levels=st.integers(1, 5),
    exclude_seen=st.booleans(),
    batch_size=st.integers(1, 8),
)
def test_matches_reference_loop(seed, n_users, n_items, levels, exclude_seen, batch_size):
    rng = np.random.default_rng(seed)
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 3 * n_users), rng.integers(0, n_items, 3 * n_users), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 2 * n_users), rng.integers(0, n_items, 2 * n_users), n_users, n_items
    )
    scores = rng.integers(0, levels, (n_users, n_items)).astype(np.float32)
    ks = (1, 3, 10)
    try:
        expected = reference_metrics(scores, train, test, ks, exclude_seen)
    except ZeroDivisionError:
        with pytest.raises(DataError):
            evaluate_scores(lambda u: scores[u], train, test, ks=ks, exclude_seen=exclude_seen)
        return
    got = evaluate_scores(
        lambda u: scores[u], train, test, ks=ks, exclude_seen=exclude_seen, batch_size=batch_size
    )
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_match_cpu():
    rng = np.random.default_rng(2)
    n_users, n_items = 300, 500
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 900), rng.integers(0, n_items, 900), n_users, n_items
    )
    scores = torch.from_numpy(rng.integers(0, 20, (n_users, n_items)).astype(np.float32))
    on_gpu = scores.cuda()
    cpu = evaluate_scores(table_fn(scores), train, test, batch_size=64)
    gpu = evaluate_scores(lambda u: on_gpu[torch.from_numpy(u).cuda()], train, test, batch_size=64)
    assert gpu == pytest.approx(cpu, rel=1e-12)
    moved = evaluate_scores(table_fn(scores), train, test, batch_size=64, device="cuda")
    assert moved == pytest.approx(cpu, rel=1e-12)


def test_evaluate_with_baselines(tmp_path):
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 20
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 400), rng.integers(0, n_items, 400), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 120), rng.integers(0, n_items, 120), n_users, n_items
    )
    scores = torch.from_numpy(rng.random((n_users, n_items)).astype(np.float32))
    config = EvalConfig(ks=(5, 2), max_users=25, seed=7)
    result = evaluate_with_baselines(
        table_fn(scores), train, test, config, extra={"reverse": table_fn(-scores)}
    )
    assert result.ks == (2, 5) and result.n_users == 25
    assert list(result.models) == ["model", "popularity", "reverse"]
    again = evaluate_with_baselines(table_fn(scores), train, test, config)
    assert again.models["model"] == result.models["model"]
    # The baseline in the result equals a direct evaluation of popularity on the same seeded users.
    sample = np.sort(
        np.random.default_rng(7).choice(np.flatnonzero(_reachable_counts(train, test) > 0), 25, replace=False)
    )
    direct = evaluate_scores(popularity_score_fn(train), train, test, ks=(2, 5), users=sample)
    assert result.models["popularity"] == pytest.approx({k: v for k, v in direct.items() if k != "n_users"})

    table = result.to_table().splitlines()
    assert table[0] == (
        "25 of 42 users (seeded sample, seed 7), full ranking; "
        "+-95%: confidence half-width over users (1.96 standard errors)"
    )
    assert table[1].split() == ["model"] + [
        f"{m}@{k}" for m in ("recall", "ndcg", "map", "hitrate", "coverage") for k in (2, 5)
    ]
    assert table[4].split()[0] == "popularity"
    assert table[2].split()[1] == f"{result.models['model']['recall@2']:.4f}"
    # Under each scorer its CI half-widths; coverage (not a mean over users) has none.
    half = table[3].split()
    assert half[0] == "+-95%" and len(half) == 1 + 8
    assert half[1] == f"{1.959963984540054 * result.standard_errors['model']['recall@2']:.4f}"
    assert len({len(line) for line in table[1:]}) == 1

    path = result.save_json(tmp_path / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["ks"] == [2, 5] and loaded["n_users"] == 25
    assert loaded["sample"] == {
        "users": 25,
        "population": 42,
        "sampled": True,
        "seed": 7,
        "fingerprint": result.sample.fingerprint,
    }
    assert set(loaded["standard_errors"]["model"]) == {
        f"{m}@{k}" for m in ("recall", "ndcg", "map", "hitrate") for k in (2, 5)
    }
    assert EvaluationResult.from_dict(loaded) == result
    with pytest.raises(ValueError, match="'popularity' is reserved"):
        evaluate_with_baselines(table_fn(scores), train, test, config, extra={"popularity": table_fn(scores)})


def _reachable_counts(train, test):
    keys = test.keys()
    users, items = keys // test.n_items, keys % test.n_items
    keep = ~train.contains(users, items)
    return np.bincount(users[keep], minlength=test.n_users)


def test_interaction_matrices_from_frames():
    train = pl.DataFrame(
        {"user_num": [0, 0, 1], "item_num": [1, 2, 0], "label": [1, -1, 0]},
        schema={"user_num": pl.Int32, "item_num": pl.Int32, "label": pl.Int8},
    )
    test = pl.DataFrame(
        {"user_num": [0, 1, 1], "item_num": [0, 2, 1], "label": [1, 1, -1]},
        schema={"user_num": pl.Int32, "item_num": pl.Int32, "label": pl.Int8},
    )
    seen, relevant = interaction_matrices(train, test, 2, 3)
    assert seen.keys().tolist() == [1, 2, 3]
    assert relevant.keys().tolist() == [0, 5]
    _, unlabelled = interaction_matrices(train, test.drop("label"), 2, 3)
    assert unlabelled.nnz == 3
    with pytest.raises(DataError, match=r"test frame \(3 rows\) has no column 'item_num'"):
        interaction_matrices(train, test.drop("item_num"), 2, 3)
    with pytest.raises(DataError, match=r"train frame \(3 rows\): item numbers must lie in \[0, 2\)"):
        interaction_matrices(train, test, 2, 2)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_rows=st.integers(1, 5),
    n_items=st.integers(40, 700),
    levels=st.sampled_from([2, 5, 1000]),
    k=st.integers(1, 12),
    chunk=st.integers(1, 9),
)
def test_chunked_candidates_hold_the_top_values(seed, n_rows, n_items, levels, k, chunk):
    # The k best chunks hold the row's k largest values (ties, -inf and a short last chunk included).
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (n_rows, n_items)).astype(np.float32)
    scores[rng.random((n_rows, n_items)) < 0.3] = -np.inf
    k = min(k, n_items // chunk)
    values, items = _top_k_candidates(torch.from_numpy(scores), k, chunk)
    expected = -np.sort(-scores, axis=1)[:, :k]
    assert values.numpy().tolist() == expected.tolist()
    finite = np.isfinite(values.numpy())
    # Every returned item holds its value, and no item comes back twice with a finite value.
    assert (np.take_along_axis(scores, items.numpy(), 1)[finite] == values.numpy()[finite]).all()
    for row in range(n_rows):
        picked = items[row].numpy()[finite[row]]
        assert len(set(picked.tolist())) == picked.size


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_rows=st.integers(1, 6),
    n_items=st.integers(300, 1500),
    levels=st.sampled_from([2, 4, 50, 10**6]),
    k=st.integers(1, 8),
)
def test_top_k_on_wide_rows_matches_a_sort(seed, n_rows, n_items, levels, k):
    # Wide enough that top_k takes the chunked path (see _chunk_size).
    assert _chunk_size(n_items, k + 1) > 1
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (n_rows, n_items)).astype(np.float32)
    scores[rng.random((n_rows, n_items)) < 0.5] = -np.inf
    items, values = top_k(torch.from_numpy(scores), k)
    for row in range(n_rows):
        expected = sorted(range(n_items), key=lambda i: (-scores[row, i], i))[:k]
        assert items[row].tolist() == expected
        assert values[row].tolist() == scores[row, expected].tolist()


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_wide_catalog_matches_reference_loop_and_scores_into(exclude_seen):
    # 2,000 items: the chunked top-k path, the column mask and the reused buffer all take part.
    rng = np.random.default_rng(5)
    n_users, n_items = 30, 2000
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 300), rng.integers(0, n_items, 300), n_users, n_items
    )
    # Few levels, so ties cross the K-th place in many rows.
    scores = rng.integers(0, 40, (n_users, n_items)).astype(np.float32)
    ks = (1, 5, 20)
    expected = reference_metrics(scores, train, test, ks, exclude_seen)
    table = torch.from_numpy(scores)

    def into(users, out):
        out.copy_(table[torch.from_numpy(users)])

    for batch_size in (7, 1024):
        plain = evaluate_scores(
            table_fn(table), train, test, ks=ks, exclude_seen=exclude_seen, batch_size=batch_size
        )
        written = evaluate_scores(
            ScoresInto(into, n_items), train, test, ks=ks, exclude_seen=exclude_seen, batch_size=batch_size
        )
        assert plain == pytest.approx(expected, rel=1e-9)
        assert written == plain
    assert torch.equal(table, torch.from_numpy(scores))
    assert torch.equal(ScoresInto(into, n_items)(np.array([3, 1])), table[[3, 1]])


def test_nan_scores_are_found_wherever_they_are():
    # Item 5 is outside the candidates, so u1 (test item 5 only) is not evaluated: users 0 and 2 are.
    # u0 saw item 0; u2 saw item 5 (seen and outside: counted once); items 3 and 1 are candidates.
    mask = np.array([True, True, True, True, True, False])
    for positions, n in (([(0, 0)], 1), ([(2, 5)], 1), ([(0, 3)], 1), ([(0, 0), (2, 5), (0, 3), (2, 1)], 4)):
        scores = SCORES.clone()
        for user, item in positions:
            scores[user, item] = float("nan")
        with pytest.raises(ValueError, match=f"score_fn returned {n} NaN scores for 2 users"):
            evaluate_scores(table_fn(scores), TRAIN, TEST, ks=(2,), candidate_mask=mask)
    wide = torch.zeros(2, 3000)
    wide[1, 2999] = float("nan")
    with pytest.raises(ValueError, match="scores hold NaN"):
        top_k(wide, 5)


def test_standard_errors_are_those_of_the_per_user_values():
    rng = np.random.default_rng(8)
    n_users, n_items = 50, 30
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 300), rng.integers(0, n_items, 300), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 200), rng.integers(0, n_items, 200), n_users, n_items
    )
    scores = torch.from_numpy(rng.random((n_users, n_items)).astype(np.float32))
    result = evaluate_with_baselines(table_fn(scores), train, test, EvalConfig(ks=(3, 10)))
    assert result.sample.sampled is False and result.sample.seed is None
    assert result.sample.population == result.n_users
    # Each user alone, then the textbook standard error of the mean (ddof = 1).
    users = np.flatnonzero(_reachable_counts(train, test) > 0)
    per_user = [evaluate_scores(table_fn(scores), train, test, ks=(3, 10), users=[u]) for u in users]
    for metric in ("recall@3", "ndcg@10", "map@10", "hitrate@3"):
        values = np.array([m[metric] for m in per_user])
        assert result.models["model"][metric] == pytest.approx(values.mean(), rel=1e-12)
        se = values.std(ddof=1) / math.sqrt(values.size)
        assert result.standard_errors["model"][metric] == pytest.approx(se, rel=1e-9)
        low, high = result.confidence_interval("model", metric)
        assert (low, high) == pytest.approx(
            (values.mean() - 1.959963984540054 * se, values.mean() + 1.959963984540054 * se)
        )
    assert "coverage@3" not in result.standard_errors["model"]
    assert EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_user_sample_is_seeded_and_recorded():
    rng = np.random.default_rng(9)
    n_users, n_items = 400, 25
    train = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 2000), rng.integers(0, n_items, 2000), n_users, n_items
    )
    test = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 800), rng.integers(0, n_items, 800), n_users, n_items
    )
    scores = torch.from_numpy(rng.random((n_users, n_items)).astype(np.float32))
    eligible = np.flatnonzero(_reachable_counts(train, test) > 0)
    scored: list[np.ndarray] = []

    def recording(users):
        scored.append(users.copy())
        return scores[torch.from_numpy(users)]

    first = evaluate_with_baselines(recording, train, test, EvalConfig(ks=(5,), max_users=100, seed=3))
    drawn = np.concatenate(scored)
    expected = np.sort(np.random.default_rng(3).choice(eligible, size=100, replace=False))
    assert drawn.tolist() == expected.tolist() == sample_users(eligible, 100, 3).tolist()
    assert first.sample == UserSample.of(expected, eligible.size, 3)
    again = evaluate_with_baselines(table_fn(scores), train, test, EvalConfig(ks=(5,), max_users=100, seed=3))
    other = evaluate_with_baselines(table_fn(scores), train, test, EvalConfig(ks=(5,), max_users=100, seed=4))
    assert again.sample == first.sample and again.models == first.models
    assert other.sample.fingerprint != first.sample.fingerprint and other.sample.users == 100
    # At or under the bound every eligible user is scored.
    assert sample_users(eligible, eligible.size, 3) is eligible
    assert sample_users(eligible, None, 3) is eligible


def test_the_default_batch_keeps_its_score_buffers_under_the_bound():
    """``batch_size=None``: 12 bytes a score, at most EVAL_BATCH_BYTES a batch, within [64, 1024]."""
    assert eval_batch_size(9_742) == 1024  # ml-latest-small: the cap
    assert eval_batch_size(100_000) == EVAL_BATCH_BYTES // (12 * 100_000) == 223
    assert 12 * 100_000 * eval_batch_size(100_000) <= EVAL_BATCH_BYTES
    assert eval_batch_size(10**8) == 64  # the floor, whatever the catalog
