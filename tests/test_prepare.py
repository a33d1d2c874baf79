import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys_metric.config import Config, config_from_dict
from recsys_metric.data.prepare import SPLIT_ENUM, prepare_dataset, split_column
from recsys_metric.errors import DataError, RejectLimitExceeded
from recsys_metric.triplets import triplet_stats

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "interactions.parquet"


def _log(tmp_path: Path, n_users=30, n_items=20, n=600, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    df = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, n_users, n)],
            "item_id": rng.integers(100, 100 + n_items, n),
            "timestamp": np.sort(rng.integers(1_600_000_000, 1_610_000_000, n)),
            "rating": rng.integers(1, 6, n).astype(np.float32),
        }
    )
    path = tmp_path / "log.parquet"
    df.write_parquet(path)
    return path


def test_prepare_writes_every_file_and_counts_add_up(tmp_path):
    out = tmp_path / "prep"
    prepared = prepare_dataset(_log(tmp_path), out)
    for name in ("rejects", "users", "items", "interactions", "triplets", "data_report"):
        assert (out / f"{name}.{'json' if name == 'data_report' else 'parquet'}").exists(), name
    inter = pl.read_parquet(out / "interactions.parquet")
    report = json.loads((out / "data_report.json").read_text())
    assert inter.height == report["n_interactions"] == prepared.interactions.height
    counts = inter["split"].value_counts()
    by_split = dict(zip(counts["split"].cast(pl.String), counts["count"], strict=True))
    s = report["split"]
    assert by_split.get("train", 0) == s["n_train"]
    assert by_split.get("test", 0) == s["n_test"]
    assert (
        by_split.get("test_dropped", 0) == s["n_test_dropped_unseen_user"] + s["n_test_dropped_unseen_item"]
    )
    assert sum(report["labels"].values()) == inter.height


def test_prepare_never_trains_on_test_rows_and_triplets_come_from_train(tmp_path):
    out = tmp_path / "prep"
    prepared = prepare_dataset(_log(tmp_path), out)
    inter = prepared.interactions
    train = inter.filter(pl.col("split") == "train")
    test = inter.filter(pl.col("split") == "test")
    assert train["timestamp"].max() <= test["timestamp"].min()
    assert set(test["user_num"].to_list()) <= set(train["user_num"].to_list())
    assert set(test["item_num"].to_list()) <= set(train["item_num"].to_list())
    trip = pl.read_parquet(out / "triplets.parquet")
    users = pl.read_parquet(out / "users.parquet")
    items = pl.read_parquet(out / "items.parquet")
    liked_train = (
        train.filter(pl.col("label") == 1)
        .join(users, on="user_num")
        .join(items, on="item_num")
        .select("user_id", pl.col("item_id").alias("liked_item_id"))
        .unique()
    )
    pairs = trip.select("user_id", "liked_item_id").unique()
    assert pairs.join(liked_train, on=["user_id", "liked_item_id"], how="anti").height == 0
    seen = train.join(users, on="user_num").join(items, on="item_num").select("user_id", "item_id")
    sampled = trip.filter(pl.col("negative_source") == "sampled").select(
        "user_id", pl.col("unliked_item_id").alias("item_id")
    )
    assert sampled.join(seen, on=["user_id", "item_id"], how="semi").height == 0


def test_prepare_is_deterministic(tmp_path):
    log = _log(tmp_path)
    a = prepare_dataset(log, tmp_path / "a")
    b = prepare_dataset(log, tmp_path / "b")
    assert a.interactions.equals(b.interactions)
    assert pl.read_parquet(tmp_path / "a" / "triplets.parquet").equals(
        pl.read_parquet(tmp_path / "b" / "triplets.parquet")
    )


def test_prepare_quarantines_and_fails_above_the_limit(tmp_path):
    df = pl.read_parquet(_log(tmp_path)).with_columns(
        pl.when(pl.int_range(pl.len()) < 30).then(None).otherwise(pl.col("user_id")).alias("user_id")
    )
    bad = tmp_path / "bad.parquet"
    df.write_parquet(bad)
    with pytest.raises(RejectLimitExceeded, match="30") as err:
        prepare_dataset(bad, tmp_path / "p")
    assert pl.read_parquet(err.value.rejects_path).height == 30
    ok = prepare_dataset(bad, tmp_path / "p2", config_from_dict({"data": {"max_reject_fraction": 0.1}}))
    assert ok.validation.n_rejected == 30
    assert ok.interactions.height == df.height - 30
    rejects = pl.read_parquet(tmp_path / "p2" / "rejects.parquet")
    assert rejects.height == 30 and set(rejects["reason"].to_list()) == {"null or empty user_id"}


def test_prepare_single_user_is_a_clear_error(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("user_id,item_id,rating\nu1,a,5\nu1,b,4\n")
    with pytest.raises(DataError, match="at least 2"):
        prepare_dataset(path, tmp_path / "p")


def test_bundled_data_prepares_with_defaults(tmp_path):
    prepared = prepare_dataset(BUNDLED, tmp_path / "p", Config())
    r = prepared.report()
    assert r["validation"]["n_rejected"] == 0
    assert r["n_users"] == 2000 and r["n_items"] == 1000
    assert r["split"]["method"] == "temporal"
    assert r["triplets"]["n_explicit"] > 0 and r["triplets"]["n_sampled"] > 0


def test_split_column_known_answer():
    column = split_column(5, np.array([0, 3]), np.array([1]))
    assert column.dtype == SPLIT_ENUM
    assert column.to_list() == ["train", "test", "test_dropped", "train", "test_dropped"]


def test_prepare_report_and_files_agree_with_the_arrays(tmp_path):
    out = tmp_path / "prep"
    prepared = prepare_dataset(_log(tmp_path), out)
    report = json.loads((out / "data_report.json").read_text())
    assert report["triplets"] == prepared.report()["triplets"] == triplet_stats(prepared.triplets)
    assert set(report["seconds"]) >= {"read_validate", "vocab_encode_label", "split", "triplets"}
    assert {"write_interactions", "write_triplets"} <= set(report["seconds"])
    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter.equals(prepared.interactions)
    labels = prepared.interactions["label"]
    assert report["labels"] == {
        "liked": int((labels == 1).sum()),
        "neutral": int((labels == 0).sum()),
        "unliked": int((labels == -1).sum()),
    }
    triplets = pl.read_parquet(out / "triplets.parquet")
    assert triplets.height == len(prepared.triplets)
    assert triplets["user_id"].to_list() == prepared.users.ids(prepared.triplets.user_num).to_list()


def test_prepare_restores_numpy_huge_page_setting(tmp_path):
    switch = np._core.multiarray._set_madvise_hugepage
    before = switch(True)
    try:
        prepare_dataset(_log(tmp_path), tmp_path / "prep", triplets=False)
        assert switch(True) is True
        switch(False)
        prepare_dataset(_log(tmp_path), tmp_path / "prep2", triplets=False)
        assert switch(before) is False
    finally:
        switch(before)


def test_duplicates_are_dropped_as_if_the_log_had_none(tmp_path):
    clean = pl.read_parquet(_log(tmp_path))
    repeated = pl.concat([clean, clean[[5, 7, 7, 300]]]).sample(fraction=1.0, shuffle=True, seed=3)
    first_seen = repeated.filter(pl.struct(pl.all()).is_first_distinct())
    repeated.write_parquet(tmp_path / "dups.parquet")
    first_seen.write_parquet(tmp_path / "deduplicated.parquet")
    a = prepare_dataset(tmp_path / "dups.parquet", tmp_path / "a")
    b = prepare_dataset(tmp_path / "deduplicated.parquet", tmp_path / "b")
    assert a.validation.n_duplicates == repeated.height - first_seen.height == 4
    assert a.validation.n_valid == b.validation.n_valid == first_seen.height
    assert a.interactions.equals(b.interactions)
    assert a.split == b.split
    assert pl.read_parquet(tmp_path / "a" / "triplets.parquet").equals(
        pl.read_parquet(tmp_path / "b" / "triplets.parquet")
    )
    kept = prepare_dataset(
        tmp_path / "dups.parquet", tmp_path / "c", config_from_dict({"data": {"deduplicate": False}})
    )
    assert kept.validation.n_duplicates == 0 and kept.interactions.height == repeated.height
