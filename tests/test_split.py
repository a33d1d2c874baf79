import json
import logging
import re
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from recsys_metric.config import SplitConfig
from recsys_metric.data.split import (
    SPLIT_DROPPED,
    SPLIT_NAMES,
    SPLIT_TEST,
    SPLIT_TRAIN,
    split_codes,
    split_interactions,
    temporal_split,
    user_holdout_split,
)
from recsys_metric.errors import ConfigError, DataError

T0 = datetime(2024, 1, 1)


def make_frame(users, items, seconds=None, labels=None) -> pl.DataFrame:
    n = len(users)
    cols = {
        "row": np.arange(n, dtype=np.int64),
        "user_num": pl.Series(users, dtype=pl.Int32),
        "item_num": pl.Series(items, dtype=pl.Int32),
    }
    if seconds is not None:
        cols["timestamp"] = pl.Series(
            [None if s is None else T0 + timedelta(seconds=s) for s in seconds]
        ).cast(pl.Datetime("ms"))
    if labels is not None:
        cols["label"] = pl.Series(labels, dtype=pl.Int8)
    return pl.DataFrame(cols)


def dense_frame(n=1000, n_users=10, n_items=20, seed=0, distinct_times=True) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    seconds = rng.permutation(n) if distinct_times else rng.integers(0, n // 10, n)
    return make_frame(
        rng.integers(0, n_users, n),
        rng.integers(0, n_items, n),
        seconds.tolist(),
        rng.choice([-1, 0, 1], n).tolist(),
    )


def ts_max(df):
    return df["timestamp"].max()


def ts_min(df):
    return df["timestamp"].min()


def check_no_leak_no_loss(df, split):
    train, test, dropped = split.train, split.test, split.dropped
    assert set(test["user_num"].to_list()) <= set(train["user_num"].to_list())
    assert set(test["item_num"].to_list()) <= set(train["item_num"].to_list())
    rows = sorted(train["row"].to_list() + test["row"].to_list() + dropped["row"].to_list())
    assert rows == list(range(df.height))
    for part in (train, test):
        assert part.columns == df.columns
        assert part["row"].is_sorted()
    assert dropped.columns == [*df.columns, "drop_reason"]
    info = split.info
    assert info.n_train == train.height and info.n_test == test.height
    assert info.n_test_dropped_unseen_user + info.n_test_dropped_unseen_item == dropped.height
    assert info.n_train_users == train["user_num"].n_unique()
    assert info.n_test_users == test["user_num"].n_unique()
    json.dumps(info.to_dict())


def test_temporal_invariant_and_fraction():
    df = dense_frame()
    split = temporal_split(df, test_fraction=0.2)
    assert ts_max(split.train) <= ts_min(split.test)
    assert split.test.height + split.dropped.height == 200
    assert split.info.cutoff == ts_max(split.train)
    assert split.info.method == split.info.requested_method == "temporal"
    assert split.info.n_test_liked == int((split.test["label"] == 1).sum())
    check_no_leak_no_loss(df, split)


def test_temporal_ties_go_to_train():
    df = dense_frame(distinct_times=False)
    split = temporal_split(df, test_fraction=0.25)
    cutoff = split.info.cutoff
    assert ts_max(split.train) == cutoff < ts_min(split.test)
    assert (split.train["timestamp"] == cutoff).sum() == (df["timestamp"] == cutoff).sum()
    n_newer = int((df["timestamp"] > cutoff).sum())
    assert n_newer <= 250 < n_newer + (df["timestamp"] == cutoff).sum()
    check_no_leak_no_loss(df, split)


def test_explicit_cutoff_is_strict():
    df = make_frame([0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 1, 0], [0, 10, 20, 30, 40, 50])
    cutoff = T0 + timedelta(seconds=30)
    split = temporal_split(df, cutoff=cutoff)
    assert split.train["row"].to_list() == [0, 1, 2, 3]
    assert split.test["row"].to_list() == [4, 5]
    assert split.info.cutoff == cutoff
    aware = temporal_split(df, cutoff=datetime(2024, 1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))
    assert aware.test["row"].to_list() == [4, 5]
    via_config = split_interactions(df, SplitConfig(cutoff=cutoff, test_fraction=0.9))
    assert via_config.test["row"].to_list() == [4, 5]


def test_null_timestamps_stay_in_train():
    df = make_frame([0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 1, 0], [0, None, 20, 30, 40, None])
    split = temporal_split(df, test_fraction=0.25)
    assert split.test["row"].to_list() == [4]
    assert split.train["row"].to_list() == [0, 1, 2, 3, 5]


def test_leak_guard_counts_on_hand_made_example():
    df = make_frame(
        users=[0, 0, 1, 1, 0, 2, 2, 1, 0],
        items=[0, 1, 0, 1, 0, 0, 9, 5, 5],
        seconds=[1, 2, 3, 4, 5, 6, 7, 8, 9],
        labels=[1, 1, 1, 0, 1, 1, 1, 1, -1],
    )
    split = temporal_split(df, cutoff=T0 + timedelta(seconds=4))
    assert split.train["row"].to_list() == [0, 1, 2, 3]
    assert split.test["row"].to_list() == [4]
    assert split.dropped["row"].to_list() == [5, 6, 7, 8]
    assert split.dropped["drop_reason"].to_list() == [
        "unseen_user",
        "unseen_user",
        "unseen_item",
        "unseen_item",
    ]
    info = split.info
    assert (info.n_test_dropped_unseen_user, info.n_test_dropped_unseen_item) == (2, 2)
    assert (info.n_train, info.n_test, info.n_train_users, info.n_test_users, info.n_test_liked) == (
        4,
        1,
        2,
        1,
        1,
    )
    check_no_leak_no_loss(df, split)


def test_all_test_rows_leaking_is_an_error():
    df = make_frame([0, 0, 1], [0, 1, 2], [1, 2, 3])
    with pytest.raises(
        DataError, match=r"of 1 test rows, 1 belong to users and 0 to items with no training row"
    ):
        temporal_split(df, test_fraction=0.3)


def test_temporal_empty_sets_explain_why():
    equal = make_frame([0, 1, 0], [0, 1, 1], [5, 5, 5])
    with pytest.raises(DataError, match=r"all 3 timestamps are equal \(2024-01-01 00:00:05\)"):
        temporal_split(equal)
    df = make_frame([0, 1, 0], [0, 1, 1], [1, 2, 3])
    with pytest.raises(
        DataError,
        match=r"split.cutoff 2024-02-01 00:00:00 is at or after the newest event 2024-01-01 00:00:03",
    ):
        temporal_split(df, cutoff=datetime(2024, 2, 1))
    with pytest.raises(
        DataError,
        match=r"training set empty: split.cutoff 2023-01-01 00:00:00 is before the oldest event 2024-01-01 00:00:01",
    ):
        temporal_split(df, cutoff=datetime(2023, 1, 1))
    tied_top = make_frame([0, 1, 0, 1, 0], [0, 1, 1, 0, 2], [1, 9, 9, 9, 9])
    with pytest.raises(DataError, match=r"is the newest event 2024-01-01 00:00:09, shared by 4 of 5 rows"):
        temporal_split(tied_top, test_fraction=0.2)


@pytest.mark.parametrize("drop", [True, False])
def test_fallback_without_timestamps(drop, caplog):
    df = dense_frame(200)
    df = df.drop("timestamp") if drop else df.with_columns(timestamp=pl.lit(None, dtype=pl.Datetime("ms")))
    with caplog.at_level(logging.WARNING, logger="recsys_metric.data.split"):
        split = split_interactions(df, SplitConfig(method="temporal", cutoff=datetime(2024, 1, 1)))
    reason = "the frame has no timestamp column" if drop else "the timestamp column is null in all 200 rows"
    reason += "; split.cutoff 2024-01-01T00:00:00 is ignored"
    assert split.info.method == "user_holdout"
    assert split.info.requested_method == "temporal"
    assert split.info.fallback_reason == reason
    assert split.info.cutoff is None
    assert f"temporal split not possible ({reason}): falling back to user_holdout" in caplog.text
    reference = user_holdout_split(df)
    assert split.test.equals(reference.test)
    with pytest.raises(DataError, match="temporal split needs timestamps"):
        temporal_split(df)


def test_non_datetime_timestamp_is_an_error():
    df = make_frame([0, 1], [0, 1]).with_columns(timestamp=pl.Series([1, 2]))
    with pytest.raises(DataError, match="timestamp must be a Datetime column, got Int64"):
        split_interactions(df, SplitConfig())


def test_user_holdout_per_user_counts_and_minimum():
    # user 0: 10 rows -> 2 test; user 1: 5 rows -> 1; user 2: 4 rows (below 5) -> 0; user 3: 7 rows -> round(1.4)=1
    users = [0] * 10 + [1] * 5 + [2] * 4 + [3] * 7
    items = list(range(10)) + list(range(5)) + list(range(4)) + list(range(7))
    df = make_frame(users, items)
    split = user_holdout_split(df, test_fraction=0.2, min_user_interactions=5, seed=1)
    n_test = split.test.group_by("user_num").len()
    n_dropped = split.dropped.group_by("user_num").len()
    per_user = {u: 0 for u in range(4)}
    for frame in (n_test, n_dropped):
        for u, n in frame.iter_rows():
            per_user[u] += n
    assert per_user == {0: 2, 1: 1, 2: 0, 3: 1}
    assert split.train.filter(pl.col("user_num") == 2).height == 4
    assert split.info.cutoff is None and split.info.n_test_liked is None
    check_no_leak_no_loss(df, split)


def test_user_holdout_never_takes_all_rows():
    df = make_frame([0, 0, 1, 1], [0, 1, 0, 1])
    split = user_holdout_split(df, test_fraction=0.9, min_user_interactions=2)
    assert split.train.group_by("user_num").len().sort("user_num")["len"].to_list() == [1, 1]


def test_user_holdout_deterministic_and_seed_dependent():
    df = dense_frame(2000, n_users=50, n_items=300)
    a = user_holdout_split(df, seed=7)
    b = user_holdout_split(df, seed=7)
    c = user_holdout_split(df, seed=8)
    assert a.test.equals(b.test) and a.train.equals(b.train)
    assert not a.test["row"].equals(c.test["row"])
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=3)
    assert sorted(user_holdout_split(shuffled, seed=7).test["row"].to_list()) == a.test["row"].to_list()


def test_user_holdout_without_eligible_users():
    df = make_frame([0, 0, 1, 2], [0, 1, 0, 1])
    with pytest.raises(
        DataError, match=r"min_user_interactions=5 interactions \(the most active user has 2 of 4"
    ):
        user_holdout_split(df)


def test_input_errors():
    with pytest.raises(DataError, match="cannot split an empty interaction frame"):
        temporal_split(make_frame([], [], []))
    with pytest.raises(DataError, match="no item_num column"):
        user_holdout_split(make_frame([0], [0]).drop("item_num"))
    with pytest.raises(DataError, match="user_num has 1 null"):
        user_holdout_split(make_frame([0, None], [0, 1]))
    with pytest.raises(ConfigError, match="test_fraction must lie strictly between 0 and 1, got 1.0"):
        temporal_split(dense_frame(), test_fraction=1.0)
    with pytest.raises(TypeError, match="collect a LazyFrame first"):
        temporal_split(dense_frame().lazy())


def test_info_to_dict():
    info = temporal_split(dense_frame()).info
    d = info.to_dict()
    assert list(d) == [
        "method",
        "requested_method",
        "fallback_reason",
        "cutoff",
        "test_fraction",
        "n_train",
        "n_test",
        "n_test_dropped_unseen_user",
        "n_test_dropped_unseen_item",
        "n_train_users",
        "n_test_users",
        "n_test_liked",
    ]
    assert d["cutoff"] == info.cutoff.isoformat()


rows = st.lists(
    st.tuples(
        st.integers(0, 4),
        st.integers(0, 6),
        st.integers(-1, 15).map(lambda s: None if s < 0 else s),
        st.sampled_from([-1, 0, 1]),
    ),
    min_size=8,
    max_size=80,
)


@settings(max_examples=60, deadline=None)
@given(
    rows,
    st.sampled_from(["temporal", "user_holdout"]),
    st.booleans(),
    st.floats(0.05, 0.95),
    st.integers(2, 4),
    st.integers(0, 3),
)
def test_no_leak_no_loss_property(data, method, with_time, fraction, min_n, seed):
    users, items, seconds, labels = (list(x) for x in zip(*data, strict=True))
    df = make_frame(users, items, seconds if with_time else None, labels)
    config = SplitConfig(method=method, test_fraction=fraction, min_user_interactions=min_n, seed=seed)
    try:
        split = split_interactions(df, config)
    except DataError as err:
        assert "empty" in str(err)
        event("empty split")
        return
    event(f"{split.info.requested_method} -> {split.info.method}")
    check_no_leak_no_loss(df, split)
    assert split.train.height > 0 and split.test.height > 0
    if split.info.method == "temporal":
        assert ts_max(split.train.drop_nulls("timestamp")) <= ts_min(split.test)
        assert ts_min(split.test) > split.info.cutoff
        assert split.test["timestamp"].null_count() == 0
    assert split.info.n_test_liked == int((split.test["label"] == 1).sum())


@settings(max_examples=60, deadline=None)
@given(rows, st.sampled_from(["temporal", "user_holdout"]), st.booleans(), st.floats(0.05, 0.95))
def test_split_codes_agree_with_the_frames(data, method, with_time, fraction):
    users, items, seconds, labels = (list(x) for x in zip(*data, strict=True))
    df = make_frame(users, items, seconds if with_time else None, labels)
    config = SplitConfig(method=method, test_fraction=fraction, min_user_interactions=2)
    try:
        split = split_interactions(df, config)
    except DataError as err:
        with pytest.raises(DataError, match=re.escape(str(err))):
            split_codes(df, config)
        return
    codes, info = split_codes(df, config)
    assert codes.dtype == np.uint8 and codes.shape == (df.height,)
    assert info == split.info
    for code, frame in ((SPLIT_TRAIN, split.train), (SPLIT_TEST, split.test), (SPLIT_DROPPED, split.dropped)):
        assert np.flatnonzero(codes == code).tolist() == frame["row"].to_list()
    assert [SPLIT_NAMES[c] for c in (SPLIT_TRAIN, SPLIT_TEST, SPLIT_DROPPED)] == [
        "train",
        "test",
        "test_dropped",
    ]
