import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_metric import triplets as triplets_module
from recsys_metric.config import LabelConfig, TripletConfig
from recsys_metric.data import matrix as matrix_module
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError
from recsys_metric.triplets import (
    TripletArrays,
    build_triplets,
    label_interactions,
    popularity_probs,
    sample_negatives,
    triplet_stats,
    write_triplets,
)


def matrix(rows: dict[int, list[int]], n_users: int, n_items: int) -> InteractionMatrix:
    users = [u for u, items in rows.items() for _ in items]
    items = [i for row in rows.values() for i in row]
    return InteractionMatrix.from_pairs(np.array(users, dtype=np.int64), np.array(items), n_users, n_items)


def train_frame(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"user_num": pl.Int32, "item_num": pl.Int32, "label": pl.Int8}, orient="row"
    )


# label_interactions


def test_label_by_rating_thresholds_are_inclusive():
    frame = pl.DataFrame({"user_id": [1] * 6, "rating": [5.0, 4.0, 3.9, 2.1, 2.0, 1.0]}).with_columns(
        pl.col("rating").cast(pl.Float32)
    )
    out = label_interactions(frame, LabelConfig())
    assert out["label"].dtype == pl.Int8
    assert out["label"].to_list() == [1, 1, 0, 0, -1, -1]


def test_label_by_rating_uses_configured_thresholds():
    frame = pl.DataFrame({"rating": [3.5, 3.0, 1.5, 1.6, 1.0]})
    out = label_interactions(frame, LabelConfig(like_threshold=3.5, dislike_threshold=1.5))
    assert out["label"].to_list() == [1, 0, -1, 0, -1]


def test_label_by_integer_rating():
    out = label_interactions(pl.DataFrame({"rating": [1, 3, 4]}), LabelConfig())
    assert out["label"].to_list() == [-1, 0, 1]


def test_label_by_event_ignores_case():
    frame = pl.DataFrame({"event": ["Purchase", "VIEW", "skip", "Thumbs_Down", "share", None]})
    out = label_interactions(frame, LabelConfig())
    assert out["label"].to_list() == [1, 1, -1, -1, 0, 1]


def test_label_event_sets_from_config_ignore_case():
    config = LabelConfig(liked_events=("Star",), disliked_events=("BAN",))
    out = label_interactions(pl.DataFrame({"event": ["star", "ban", "like"]}), config)
    assert out["label"].to_list() == [1, -1, 0]


def test_label_without_rating_or_event_likes_every_row():
    out = label_interactions(pl.DataFrame({"user_id": ["a", "b"], "item_id": [1, 2]}), LabelConfig())
    assert out["label"].to_list() == [1, 1]
    assert out["label"].dtype == pl.Int8


def test_label_rating_wins_then_event_then_liked():
    frame = pl.DataFrame(
        {
            "rating": [1.0, 5.0, None, None, None, float("nan")],
            "event": ["like", "dislike", "dislike", "view", None, "skip"],
        }
    )
    out = label_interactions(frame, LabelConfig())
    assert out["label"].to_list() == [-1, 1, -1, 1, 1, -1]


def test_label_keeps_lazy_frames_lazy():
    lazy = pl.LazyFrame({"rating": [4.5, 1.0], "label": [0, 0]})
    out = label_interactions(lazy, LabelConfig())
    assert isinstance(out, pl.LazyFrame)
    assert out.collect()["label"].to_list() == [1, -1]


def test_label_rejects_a_text_rating():
    with pytest.raises(DataError, match="column rating has dtype String, expected a number"):
        label_interactions(pl.DataFrame({"rating": ["5"]}), LabelConfig())


# popularity_probs


def test_popularity_probs_known_answer_with_floor():
    probs = popularity_probs(np.array([0, 0, 0, 1]), 3, alpha=1.0)
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, np.array([4, 2, 1]) / 7)
    np.testing.assert_allclose(
        popularity_probs(np.array([0, 0, 0, 1]), 3, alpha=0.5), np.sqrt([4, 2, 1]) / (3 + np.sqrt(2))
    )


def test_popularity_probs_alpha_zero_is_uniform():
    np.testing.assert_allclose(popularity_probs(np.array([2, 2, 2]), 4, alpha=0.0), np.full(4, 0.25))


def test_popularity_probs_rejects_out_of_range_items():
    with pytest.raises(ValueError, match=r"item numbers must lie in \[0, 3\)"):
        popularity_probs(np.array([3]), 3, alpha=1.0)


# sample_negatives


@st.composite
def sampling_cases(draw):
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 12))
    rows = {}
    for u in range(n_users):
        kind = draw(st.sampled_from(["random", "all_but_one", "all", "none"]))
        if kind == "random":
            rows[u] = draw(st.lists(st.integers(0, n_items - 1), max_size=n_items))
        elif kind == "all_but_one":
            missing = draw(st.integers(0, n_items - 1))
            rows[u] = [i for i in range(n_items) if i != missing]
        elif kind == "all":
            rows[u] = list(range(n_items))
        else:
            rows[u] = []
    users = draw(st.lists(st.integers(0, n_users - 1), min_size=0, max_size=30))
    k = draw(st.integers(1, 4))
    weighted = draw(st.booleans())
    retries = draw(st.sampled_from([0, 1, 20]))
    seed = draw(st.integers(0, 2**32 - 1))
    return matrix(rows, n_users, n_items), np.array(users, dtype=np.int32), k, weighted, retries, seed


@settings(max_examples=50, deadline=None)
@given(sampling_cases())
def test_sampled_negatives_are_never_seen_and_minus_one_only_when_nothing_is_left(case):
    seen, users, k, weighted, retries, seed = case
    probs = popularity_probs(seen.indices, seen.n_items, 0.75) if weighted else None
    out = sample_negatives(users, seen, k, np.random.default_rng(seed), item_probs=probs, max_retries=retries)
    assert out.dtype == np.int32
    assert out.shape == (users.size, k)
    for user, negatives in zip(users.tolist(), out, strict=True):
        complement = np.setdiff1d(np.arange(seen.n_items), seen.row(user))
        if complement.size == 0:
            assert (negatives == -1).all()
        else:
            assert np.isin(negatives, complement).all()
        if complement.size == 1:
            assert (negatives == complement[0]).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_redraw_rounds_on_a_sparse_catalogue_leave_no_seen_item(weighted):
    # 10% density on 5,000 items: collisions go through the vectorised redraw rounds, not the exact path.
    rng = np.random.default_rng(4)
    n_users, n_items = 200, 5_000
    users = np.repeat(np.arange(n_users), 500)
    seen = InteractionMatrix.from_pairs(users, rng.integers(0, n_items, users.size), n_users, n_items)
    probs = popularity_probs(seen.indices, n_items, 1.0) if weighted else None
    query = rng.integers(0, n_users, 20_000)
    for retries in (0, 1, 20):
        out = sample_negatives(
            query, seen, 2, np.random.default_rng(retries), item_probs=probs, max_retries=retries
        )
        assert not seen.contains(query, out).any()
        assert out.min() >= 0


def test_all_but_one_gives_that_item_and_all_gives_minus_one():
    seen = matrix({0: [0, 1, 2, 4], 1: [0, 1, 2, 3, 4], 2: [1]}, 3, 5)
    out = sample_negatives(np.array([1, 0, 2, 0]), seen, 3, np.random.default_rng(0))
    assert out[0].tolist() == [-1, -1, -1]
    assert out[1].tolist() == [3, 3, 3]
    assert out[3].tolist() == [3, 3, 3]
    assert np.isin(out[2], [0, 2, 3, 4]).all()


def test_rows_keep_their_user_when_users_come_unsorted():
    seen = matrix({0: list(range(0, 50)), 1: list(range(50, 100))}, 2, 100)
    users = np.array([1, 0, 1, 1, 0, 0, 1, 0] * 50)
    out = sample_negatives(users, seen, 2, np.random.default_rng(3))
    assert (out[users == 0] >= 50).all()
    assert (out[users == 1] < 50).all()


def test_uniform_sampler_marginal_is_uniform_over_unseen_items():
    seen = matrix({0: [0, 1]}, 1, 10)
    out = sample_negatives(np.zeros(40_000, dtype=np.int32), seen, 2, np.random.default_rng(7))
    counts = np.bincount(out.ravel(), minlength=10)
    assert counts[:2].tolist() == [0, 0]
    expected = out.size / 8
    chi2 = float(((counts[2:] - expected) ** 2 / expected).sum())
    # 7 degrees of freedom: P(chi2 > 30) is about 1e-4.
    assert chi2 < 30.0


def test_popularity_sampler_follows_count_ratio_to_the_alpha():
    n_items = 4
    history = np.repeat(np.arange(n_items), [99, 24, 0, 8])
    probs = popularity_probs(history, n_items, alpha=0.5)
    seen = matrix({0: [2], 1: []}, 2, n_items)
    out = sample_negatives(
        np.zeros(100_000, dtype=np.int32), seen, 1, np.random.default_rng(11), item_probs=probs
    )
    counts = np.bincount(out.ravel(), minlength=n_items)
    assert counts[2] == 0
    # (100 / 25) ** 0.5 = 2 and (25 / 9) ** 0.5 = 5 / 3.
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.05)
    assert counts[1] / counts[3] == pytest.approx(5 / 3, rel=0.05)


def test_zero_weight_items_are_never_drawn():
    seen = matrix({0: [1], 1: [0, 1]}, 2, 4)
    probs = np.array([0.5, 0.5, 0.0, 0.0])
    out = sample_negatives(np.array([0, 1, 0]), seen, 4, np.random.default_rng(0), item_probs=probs)
    assert out[[0, 2]].ravel().tolist() == [0] * 8
    assert out[1].tolist() == [-1] * 4


def test_one_seen_item_holding_most_of_the_mass_is_avoided():
    probs = np.r_[0.999, np.full(999, 0.001 / 999)]
    seen = matrix({0: [0], 1: [5]}, 2, 1_000)
    users = np.r_[np.zeros(3_000, dtype=np.int32), np.ones(3, dtype=np.int32)]
    for retries in (0, 3, 20):
        out = sample_negatives(
            users, seen, 1, np.random.default_rng(retries), item_probs=probs, max_retries=retries
        )
        assert (out[:3_000] > 0).all()
        assert (out[3_000:] != 5).all()


def test_heavy_user_is_drawn_from_the_complement():
    n_items = 2_000
    complement = np.array([5, 777, 1999])
    heavy = np.setdiff1d(np.arange(n_items), complement)
    seen = matrix({0: heavy.tolist(), 1: [3]}, 2, n_items)
    users = np.r_[np.zeros(5_000, dtype=np.int32), np.ones(10, dtype=np.int32)]
    for probs in (None, popularity_probs(heavy, n_items, 1.0)):
        out = sample_negatives(users, seen, 2, np.random.default_rng(1), item_probs=probs)
        assert np.isin(out[:5_000], complement).all()
        assert set(np.unique(out[:5_000]).tolist()) == set(complement.tolist())
        assert (out[5_000:] != 3).all()


def test_same_generator_state_gives_same_draws():
    seen = matrix({0: [0, 3], 1: [1], 2: []}, 3, 20)
    users = np.array([2, 0, 1, 0, 2])
    a = sample_negatives(users, seen, 3, np.random.default_rng(5))
    b = sample_negatives(users, seen, 3, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)


def test_sample_negatives_handles_empty_input_and_checks_arguments():
    seen = matrix({0: [0]}, 1, 3)
    assert sample_negatives(np.array([], dtype=np.int32), seen, 2, np.random.default_rng(0)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"user numbers must lie in \[0, 1\)"):
        sample_negatives(np.array([1]), seen, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"item_probs has shape \(2,\), expected \(3,\)"):
        sample_negatives(np.array([0]), seen, 1, np.random.default_rng(0), item_probs=np.ones(2))


# build_triplets


def simple_train() -> pl.DataFrame:
    # user 0: likes 0, 1; dislikes 2, 3; neutral 4. user 1: likes 5; no dislikes. user 2: dislikes only.
    return train_frame(
        [(0, 0, 1), (0, 2, -1), (0, 1, 1), (0, 3, -1), (0, 4, 0), (1, 5, 1), (2, 6, -1), (1, 0, 0)]
    )


def test_explicit_share_one_takes_every_negative_from_dislikes():
    config = TripletConfig(negatives_per_positive=3, explicit_share=1.0, seed=1)
    t = build_triplets(simple_train(), 3, 30, config)
    assert t.user_num.tolist() == [0] * 6 + [1] * 3
    assert t.liked_num.tolist() == [0, 0, 0, 1, 1, 1, 5, 5, 5]
    assert t.source.tolist() == [1] * 6 + [0] * 3
    assert np.isin(t.unliked_num[:6], [2, 3]).all()
    assert not np.isin(t.unliked_num[6:], [0, 5]).any()
    assert t.user_num.dtype == t.liked_num.dtype == t.unliked_num.dtype == np.int32
    assert t.source.dtype == np.int8
    assert len(t) == 9 and t.n_dropped == 0


def test_explicit_share_half_with_two_negatives_gives_exactly_one_explicit_per_pair():
    config = TripletConfig(negatives_per_positive=2, explicit_share=0.5, seed=3)
    t = build_triplets(simple_train(), 3, 30, config)
    assert t.source.tolist() == [1, 0, 1, 0, 0, 0]
    assert np.isin(t.unliked_num[[0, 2]], [2, 3]).all()
    assert not np.isin(t.unliked_num[[1, 3]], [0, 1, 2, 3, 4]).any()
    assert not np.isin(t.unliked_num[4:], [0, 5]).any()


def test_fractional_explicit_share_gives_the_expected_rate():
    rows = [(u, i, 1) for u in range(50) for i in range(20)] + [(u, 20 + u % 5, -1) for u in range(50)]
    config = TripletConfig(negatives_per_positive=2, explicit_share=0.25, seed=0)
    t = build_triplets(train_frame(rows), 50, 100, config)
    per_pair = t.source.reshape(-1, 2)
    assert (per_pair[:, 1] == 0).all()
    assert per_pair[:, 0].mean() == pytest.approx(0.5, abs=0.05)
    explicit = t.source == 1
    assert (t.unliked_num[explicit] == 20 + t.user_num[explicit] % 5).all()


def test_sampled_negatives_avoid_every_training_item_of_the_user():
    rng = np.random.default_rng(0)
    rows = [
        (int(u), int(i), int(lab))
        for u, i, lab in zip(
            rng.integers(0, 20, 600), rng.integers(0, 40, 600), rng.choice([1, 1, 0, -1], 600), strict=True
        )
    ]
    train = train_frame(rows)
    seen = InteractionMatrix.from_pairs(train["user_num"].to_numpy(), train["item_num"].to_numpy(), 20, 40)
    for sampling in ("uniform", "popularity"):
        config = TripletConfig(negatives_per_positive=3, explicit_share=0.0, sampling=sampling, seed=2)
        t = build_triplets(train, 20, 40, config)
        assert (t.source == 0).all()
        assert not seen.contains(t.user_num, t.unliked_num).any()


def test_duplicate_likes_count_once_and_a_liked_item_is_never_its_own_negative():
    train = train_frame([(0, 1, 1), (0, 2, 1), (0, 1, 1), (0, 2, -1), (0, 3, -1)])
    t = build_triplets(train, 1, 10, TripletConfig(negatives_per_positive=2, explicit_share=1.0))
    assert t.liked_num.tolist() == [1, 1, 2, 2]
    assert t.unliked_num.tolist() == [3, 3, 3, 3]


def test_users_who_saw_the_whole_catalogue_are_dropped_and_counted():
    train = train_frame([(0, 0, 1), (0, 1, 1), (0, 2, 0), (1, 0, 1)])
    t = build_triplets(train, 2, 3, TripletConfig(negatives_per_positive=2, explicit_share=0.0))
    assert t.user_num.tolist() == [1, 1]
    assert t.n_dropped == 4
    assert np.isin(t.unliked_num, [1, 2]).all()


def test_same_seed_same_triplets_other_seed_other_triplets():
    rows = [(u, (u * 7 + j) % 300, 1) for u in range(40) for j in range(10)]
    train = train_frame(rows)

    def run(seed: int) -> TripletArrays:
        return build_triplets(train, 40, 300, TripletConfig(negatives_per_positive=2, seed=seed))

    a, b, c = run(1), run(1), run(2)
    for name in ("user_num", "liked_num", "unliked_num", "source"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.liked_num, c.liked_num)
    assert (a.unliked_num != c.unliked_num).any()


def test_build_triplets_names_missing_columns():
    train = pl.DataFrame({"user_num": [0], "item_num": [0]})
    with pytest.raises(DataError, match=r"training interactions \(1 rows\) lack column\(s\) \['label'\]"):
        build_triplets(train, 1, 1, TripletConfig())


def test_build_triplets_names_columns_with_nulls():
    train = pl.DataFrame({"user_num": [0, None], "item_num": [0, 1], "label": [1, 1]})
    with pytest.raises(DataError, match=r"training interactions \(2 rows\) have nulls in \['user_num'\]"):
        build_triplets(train, 1, 2, TripletConfig())


def test_no_liked_pairs_gives_no_triplets():
    t = build_triplets(train_frame([(0, 0, -1), (0, 1, 0)]), 1, 5, TripletConfig())
    assert len(t) == 0 and t.n_dropped == 0


# write_triplets and triplet_stats


@pytest.mark.parametrize(
    ("user_ids", "item_ids"),
    [
        (pl.Series(["ann", "bob", "cy"]), pl.Series([100, 200, 300, 400])),
        (np.array([7, 8, 9]), np.array(["a", "b", "c", "d"], dtype=object)),
    ],
)
def test_write_triplets_round_trip(tmp_path, user_ids, item_ids):
    triplets = TripletArrays(
        user_num=np.array([2, 0, 0], dtype=np.int32),
        liked_num=np.array([3, 1, 1], dtype=np.int32),
        unliked_num=np.array([0, 2, 3], dtype=np.int32),
        source=np.array([1, 0, 1], dtype=np.int8),
        n_dropped=5,
    )
    path = write_triplets(triplets, user_ids, item_ids, tmp_path / "sub" / "triplets.parquet")
    assert path == tmp_path / "sub" / "triplets.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["triplets.parquet"]
    back = pl.read_parquet(path)
    users, items = list(user_ids), list(item_ids)
    assert back.columns == ["user_id", "liked_item_id", "unliked_item_id", "negative_source"]
    assert back["user_id"].to_list() == [users[2], users[0], users[0]]
    assert back["liked_item_id"].to_list() == [items[3], items[1], items[1]]
    assert back["unliked_item_id"].to_list() == [items[0], items[2], items[3]]
    assert back["negative_source"].dtype == pl.Enum(["sampled", "explicit"])
    assert back["negative_source"].to_list() == ["explicit", "sampled", "explicit"]
    assert pl.read_parquet_metadata(path)["n_dropped"] == "5"


def test_write_triplets_rejects_a_short_vocabulary(tmp_path):
    one = np.array([1], dtype=np.int32)
    triplets = TripletArrays(one, one, one, np.zeros(1, dtype=np.int8))
    with pytest.raises(ValueError, match="user_ids has 1 ids but the triplets use numbers up to 1"):
        write_triplets(triplets, ["u"], ["a", "b"], tmp_path / "t.parquet")


def test_triplet_stats_known_answer():
    triplets = TripletArrays(
        user_num=np.array([0, 0, 0, 0, 3, 3], dtype=np.int32),
        liked_num=np.array([1, 1, 2, 2, 1, 1], dtype=np.int32),
        unliked_num=np.array([5, 6, 5, 7, 8, 5], dtype=np.int32),
        source=np.array([1, 0, 1, 0, 0, 0], dtype=np.int8),
        n_dropped=2,
    )
    assert triplet_stats(triplets) == {
        "n_triplets": 6,
        "n_explicit": 2,
        "n_sampled": 4,
        "explicit_fraction": pytest.approx(1 / 3),
        "n_users": 2,
        "n_liked_pairs": 3,
        "n_liked_items": 2,
        "n_unliked_items": 4,
        "negatives_per_pair": 2.0,
        "n_dropped": 2,
    }


def test_triplet_arrays_check_lengths():
    with pytest.raises(ValueError, match=r"liked_num has shape \(1,\), user_num has \(2,\)"):
        TripletArrays(np.zeros(2), np.zeros(1), np.zeros(2), np.zeros(2))


# fast paths against the plain algorithms they replace


def reference_triplets(
    train: pl.DataFrame, n_users: int, n_items: int, config: TripletConfig
) -> TripletArrays:
    """build_triplets as first written: a matrix per structure and a hash dedupe of the liked rows."""
    rng = np.random.default_rng(config.seed)
    k = config.negatives_per_positive
    users = train["user_num"].to_numpy().astype(np.int32)
    items = train["item_num"].to_numpy().astype(np.int32)
    labels = train["label"].to_numpy()
    seen = InteractionMatrix.from_pairs(users, items, n_users, n_items)
    liked_rows = np.flatnonzero(labels == 1)
    liked_keys = users[liked_rows].astype(np.int64) * n_items + items[liked_rows]
    liked_rows = liked_rows[pl.Series(liked_keys).is_first_distinct().to_numpy()]
    liked_pairs = set(zip(users[liked_rows].tolist(), items[liked_rows].tolist(), strict=True))
    disliked = [
        (u, i)
        for u, i, lab in zip(users.tolist(), items.tolist(), labels.tolist(), strict=True)
        if lab == -1 and (u, i) not in liked_pairs
    ]
    dislikes = InteractionMatrix.from_pairs(
        np.array([u for u, _ in disliked], dtype=np.int64),
        np.array([i for _, i in disliked], dtype=np.int64),
        n_users,
        n_items,
    )
    liked_users, liked_items = users[liked_rows], items[liked_rows]
    m = liked_users.shape[0]
    n_disliked = dislikes.row_lengths()[liked_users]
    expected = config.explicit_share * k
    base = round(expected) if abs(expected - round(expected)) <= 1e-9 else int(np.floor(expected))
    frac = expected - base if abs(expected - round(expected)) > 1e-9 else 0.0
    n_explicit = np.full(m, base, dtype=np.int64)
    if frac > 0.0:
        n_explicit += rng.random(m) < frac
    n_explicit[n_disliked == 0] = 0
    explicit = np.arange(k)[None, :] < n_explicit[:, None]
    negatives = np.empty((m, k), dtype=np.int32)
    explicit_rows = np.nonzero(explicit)[0]
    offsets = (rng.random(explicit_rows.size) * n_disliked[explicit_rows]).astype(np.int64)
    np.minimum(offsets, n_disliked[explicit_rows] - 1, out=offsets)
    negatives[explicit] = dislikes.indices[dislikes.indptr[liked_users[explicit_rows]] + offsets]
    probs = (
        popularity_probs(items, n_items, config.popularity_alpha) if config.sampling == "popularity" else None
    )
    sampled_users = np.broadcast_to(liked_users[:, None], (m, k))[~explicit]
    negatives[~explicit] = sample_negatives(
        sampled_users, seen, 1, rng, item_probs=probs, max_retries=config.max_retries
    )[:, 0]
    unliked = negatives.reshape(-1)
    keep = unliked >= 0
    return TripletArrays(
        user_num=np.repeat(liked_users, k)[keep],
        liked_num=np.repeat(liked_items, k)[keep],
        unliked_num=unliked[keep],
        source=explicit.reshape(-1).astype(np.int8)[keep],
        n_dropped=int(keep.size - keep.sum()),
    )


@st.composite
def triplet_cases(draw):
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 9))
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(0, n_users - 1), st.integers(0, n_items - 1), st.sampled_from([1, 1, 0, -1])
            ),
            max_size=60,
        )
    )
    config = TripletConfig(
        negatives_per_positive=draw(st.integers(1, 3)),
        explicit_share=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0, 0.3])),
        sampling=draw(st.sampled_from(["uniform", "popularity"])),
        seed=draw(st.integers(0, 2**16)),
    )
    variant = draw(st.sampled_from(["packed", "tiny_blocks", "lexsort"]))
    return train_frame(rows), n_users, n_items, config, variant


@settings(max_examples=150, deadline=None)
@given(triplet_cases())
def test_build_triplets_equals_the_reference_algorithm(case):
    train, n_users, n_items, config, variant = case
    with pytest.MonkeyPatch.context() as patch:
        if variant == "tiny_blocks":
            patch.setattr(triplets_module, "_BLOCK", 3)
            patch.setattr(matrix_module, "_BLOCK", 3)
        elif variant == "lexsort":
            patch.setattr(triplets_module, "_MAX_PACKED_PAIR", 0)
        fast = build_triplets(train, n_users, n_items, config)
    slow = reference_triplets(train, n_users, n_items, config)
    for name in ("user_num", "liked_num", "unliked_num", "source"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
        assert getattr(fast, name).dtype == getattr(slow, name).dtype, name
    assert fast.n_dropped == slow.n_dropped


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=50), st.integers(1, 6))
def test_user_order_is_a_stable_sort(users, n_users):
    users = np.array(users, dtype=np.int32) % n_users
    order, sorted_users = triplets_module._user_order(users, n_users)
    expected = np.argsort(users, kind="stable")
    if order is None:
        assert (np.diff(users) >= 0).all()
        order = np.arange(users.size)
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(sorted_users, users[expected])
    assert sorted_users.dtype == np.int64


THRESHOLDS = [4.0, 3.7, 2.1, 2.0, 0.1, -0.0, 1e-45, 3.6999998, 1e39, -1e39, float("inf"), float("-inf")]
RATINGS = st.one_of(
    st.none(),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 3.7, 2.1, 3.7000003, 2.0999999]),
    st.floats(-10, 10),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(RATINGS, max_size=30),
    st.sampled_from(THRESHOLDS),
    st.sampled_from(THRESHOLDS),
    st.sampled_from([pl.Float32, pl.Float64]),
    st.booleans(),
)
def test_rating_labels_fast_path_equals_the_expression(ratings, like, dislike, dtype, chunked):
    rating = pl.Series("rating", ratings, dtype=pl.Float64).cast(dtype)
    if chunked and len(ratings) > 2:
        rating = pl.concat([rating[:2], rating[2:]], rechunk=False)
    frame = pl.DataFrame([rating])
    config = LabelConfig.model_construct(
        like_threshold=like, dislike_threshold=dislike, liked_events=(), disliked_events=()
    )
    fast = label_interactions(frame, config)["label"]
    expression = label_interactions(frame.lazy(), config).collect()["label"]
    assert fast.dtype == expression.dtype == pl.Int8
    assert fast.to_list() == expression.to_list()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6)), max_size=40))
def test_triplet_stats_counts_match_python_sets(rows):
    triplets = TripletArrays(
        user_num=np.array([r[0] for r in rows], dtype=np.int32),
        liked_num=np.array([r[1] for r in rows], dtype=np.int32),
        unliked_num=np.array([r[2] for r in rows], dtype=np.int32),
        source=np.zeros(len(rows), dtype=np.int8),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triplets_module, "_BLOCK", 3)
        stats = triplet_stats(triplets)
    assert stats["n_liked_pairs"] == len({(u, i) for u, i, _ in rows})
    assert stats["n_users"] == len({u for u, _, _ in rows})
    assert stats["n_liked_items"] == len({i for _, i, _ in rows})
    assert stats["n_unliked_items"] == len({j for _, _, j in rows})
