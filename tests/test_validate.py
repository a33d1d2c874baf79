import json
import math
from datetime import date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys_metric.config import DataConfig
from recsys_metric.data import validate as validate_module
from recsys_metric.data.validate import (
    _n_distinct,
    drop_rows,
    duplicate_rows,
    read_interactions,
    validate_interactions,
)
from recsys_metric.errors import DataError, RejectLimitExceeded

LENIENT = DataConfig(max_reject_fraction=1.0)
T0 = datetime(2023, 11, 14, 22, 13, 20)
EPOCH_S = 1_700_000_000


def _validate(columns: dict, config: DataConfig = LENIENT, rejects: Path | None = None):
    return validate_interactions(pl.LazyFrame(columns), config, source="mem", rejects_path=rejects)


def _with_bad_row(good: dict, bad: dict) -> dict:
    """Two good rows (2 users, 2 items) followed by one row with the given values."""
    out = {"user_id": [1, 2, bad.get("user_id", 3)], "item_id": [10, 20, bad.get("item_id", 30)]}
    for name, value in good.items():
        out[name] = [value, value, bad.get(name, value)]
    return out


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parquet_log_is_typed_and_reported(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": pl.Series([10, 20, 10], dtype=pl.Int32),
            "timestamp": [EPOCH_S, EPOCH_S + 1, EPOCH_S + 2],
            "rating": [4.0, 5.0, 1.0],
            "event": [" view", "buy ", "view"],
            "weight": pl.Series([1, None, 2], dtype=pl.Int16),
        }
    ).write_parquet(path)
    df, report = read_interactions(path, DataConfig(), tmp_path / "rejects.parquet")
    assert df.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "timestamp": pl.Datetime("ms"),
            "rating": pl.Float32,
            "event": pl.String,
            "weight": pl.Float32,
        }
    )
    assert df["timestamp"][0] == T0
    assert df["event"].to_list() == ["view", "buy", "view"]
    assert df["weight"].to_list() == [1.0, None, 2.0]
    assert report.to_dict() == {
        "source": str(path),
        "n_input_rows": 3,
        "n_rejected": 0,
        "rejected_by_reason": {},
        "n_duplicates": 0,
        "n_valid": 3,
        "rejects_path": str(tmp_path / "rejects.parquet"),
        "columns": ["user_id", "item_id", "timestamp", "rating", "event", "weight"],
        "has_timestamp": True,
        "has_rating": True,
        "has_event": True,
        "n_users": 3,
        "n_items": 2,
        "reject_fraction": 0.0,
    }
    json.dumps(report.to_dict())


@pytest.mark.parametrize(
    ("good", "bad", "reason"),
    [
        ({}, {"user_id": None}, "null or empty user_id"),
        ({}, {"item_id": None}, "null or empty item_id"),
        ({"timestamp": EPOCH_S}, {"timestamp": None}, "null timestamp"),
        ({"timestamp": "2023-11-14"}, {"timestamp": "soon"}, "unparsable timestamp"),
        # an epoch in ms read as seconds lands in the year 55,000
        ({"timestamp": EPOCH_S}, {"timestamp": EPOCH_S * 1000}, "timestamp outside 1900..2199"),
        # a number too large to convert still parsed: out of range, not unparsable (issue 19)
        ({"timestamp": EPOCH_S}, {"timestamp": 10**18}, "timestamp outside 1900..2199"),
        ({"timestamp": float(EPOCH_S)}, {"timestamp": 9.9e12}, "timestamp outside 1900..2199"),
        ({"timestamp": "1700000000"}, {"timestamp": "9900000000000"}, "timestamp outside 1900..2199"),
        ({"timestamp": "1700000000"}, {"timestamp": "-9.9e15"}, "timestamp outside 1900..2199"),
        ({"timestamp": "1700000000"}, {"timestamp": "inf"}, "unparsable timestamp"),
        ({"rating": 4.0}, {"rating": None}, "null rating"),
        ({"rating": "4"}, {"rating": "five"}, "unparsable rating"),
        ({"rating": 4.0}, {"rating": math.nan}, "unparsable rating"),
        ({"rating": 4.0}, {"rating": 0.5}, "rating outside [1.0, 5.0]"),
        ({"rating": 4}, {"rating": 6}, "rating outside [1.0, 5.0]"),
        ({"rating": 4.0, "event": "view"}, {"rating": None, "event": None}, "null rating and event"),
        ({"event": "view"}, {"event": "  "}, "null or empty event"),
        ({"weight": "1.5"}, {"weight": "heavy"}, "unparsable weight"),
        ({"weight": 1.0}, {"weight": math.inf}, "unparsable weight"),
        ({"weight": 1.0}, {"weight": 1e300}, "unparsable weight"),
    ],
)
def test_each_rule_rejects_with_its_reason(good, bad, reason):
    df, report = _validate(_with_bad_row(good, bad))
    assert report.rejected_by_reason == {reason: 1}
    assert (report.n_input_rows, report.n_rejected, report.n_valid) == (3, 1, 2)
    assert df["user_id"].to_list() == [1, 2]


@pytest.mark.parametrize(
    ("ids", "reason"),
    [
        (["x", "a", " "], "null or empty user_id"),
        (["x", "a", ""], "null or empty user_id"),
        ([0.0, 1.0, math.nan], "null or empty user_id"),
        ([0.0, 1.0, 2.5], "unparsable user_id"),
    ],
)
def test_bad_user_ids(ids, reason):
    _, report = _validate({"user_id": ids, "item_id": [1, 2, 3]})
    assert report.rejected_by_reason == {reason: 1}


def test_first_failing_check_wins():
    bad = {"user_id": None, "timestamp": "soon", "rating": 9.0}
    _, report = _validate(_with_bad_row({"timestamp": "2023-11-14", "rating": 4.0}, bad))
    assert report.rejected_by_reason == {"null or empty user_id": 1}


def test_boundaries_and_nulls_that_are_kept():
    df, report = _validate(
        {
            "user_id": [" u1 ", "u2", "u3"],
            "item_id": ["a", "b ", "a"],
            "rating": [1.0, 5.0, None],
            "event": ["view", None, " like "],
            "weight": [None, 1.0, 2.0],
        }
    )
    assert report.n_rejected == 0
    assert df["user_id"].to_list() == ["u1", "u2", "u3"]
    assert df["item_id"].to_list() == ["a", "b", "a"]
    assert df["rating"].to_list() == [1.0, 5.0, None]
    assert df["event"].to_list() == ["view", None, "like"]
    assert df["weight"].to_list() == [None, 1.0, 2.0]


def test_rating_scale_none_disables_the_range_check():
    _, report = _validate(_with_bad_row({"rating": 4.0}, {"rating": 40.0}), DataConfig(rating_scale=None))
    assert report.n_rejected == 0


@pytest.mark.parametrize(
    ("values", "unit"),
    [
        ([EPOCH_S, EPOCH_S], "s"),
        ([EPOCH_S * 1000, EPOCH_S * 1000], "ms"),
        ([EPOCH_S * 10**6, EPOCH_S * 10**6], "us"),
        ([EPOCH_S * 10**9, EPOCH_S * 10**9], "ns"),
        ([float(EPOCH_S), EPOCH_S + 0.0004], "s"),
        ([str(EPOCH_S), f" {EPOCH_S}.0 "], "s"),
        (["2023-11-14T22:13:20Z", "2023-11-14 22:13:20"], "s"),
        (["2023-11-14T23:13:20+01:00", "2023-11-14T22:13:20.000"], "s"),
        ([T0, T0], "s"),
    ],
)
def test_timestamp_parsing(values, unit):
    df, report = _validate(
        {"user_id": [1, 2], "item_id": [1, 2], "timestamp": values}, DataConfig(timestamp_unit=unit)
    )
    assert report.n_rejected == 0
    assert df.schema["timestamp"] == pl.Datetime("ms")
    assert df["timestamp"].to_list() == [T0, T0]


def test_timezone_aware_datetimes_become_naive_utc_and_dates_midnight():
    aware = pl.Series([T0, T0]).dt.replace_time_zone("UTC").dt.convert_time_zone("Europe/Berlin")
    df, _ = _validate({"user_id": [1, 2], "item_id": [1, 2], "timestamp": aware})
    assert df["timestamp"].to_list() == [T0, T0]
    df, _ = _validate({"user_id": [1, 2], "item_id": [1, 2], "timestamp": [date(2024, 1, 2)] * 2})
    assert df["timestamp"].to_list() == [datetime(2024, 1, 2)] * 2


def test_rejects_file_keeps_every_rejected_row_with_raw_values(tmp_path):
    path = _write(
        tmp_path / "log.csv",
        "user_id,item_id,timestamp,rating\n"
        "1,10,1700000000,4\n"
        " ,11,1700000000,4\n"
        "2,20,1700000000,4\n"
        "3,12,later,4\n"
        "4,13,1700000000, 9 \n"
        "5,14,1700000000,x\n",
    )
    rejects_path = tmp_path / "out" / "rejects.parquet"
    df, report = read_interactions(path, LENIENT, rejects_path)
    rejects = pl.read_parquet(rejects_path)
    assert rejects.height == report.n_rejected == 4
    assert rejects.schema == pl.Schema(
        {
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.String,
            "rating": pl.String,
            "reason": pl.String,
            "row_number": pl.Int64,
        }
    )
    assert rejects.rows() == [
        (" ", "11", "1700000000", "4", "null or empty user_id", 1),
        ("3", "12", "later", "4", "unparsable timestamp", 3),
        ("4", "13", "1700000000", " 9 ", "rating outside [1.0, 5.0]", 4),
        ("5", "14", "1700000000", "x", "unparsable rating", 5),
    ]
    assert report.rejected_by_reason == {
        "null or empty user_id": 1,
        "rating outside [1.0, 5.0]": 1,
        "unparsable rating": 1,
        "unparsable timestamp": 1,
    }
    assert df["user_id"].to_list() == [1, 2]


def test_rejects_from_typed_input_keep_original_values(tmp_path):
    rejects_path = tmp_path / "rejects.parquet"
    columns = _with_bad_row({"timestamp": EPOCH_S, "rating": 4.0}, {"timestamp": EPOCH_S * 1000})
    _validate(columns, rejects=rejects_path)
    assert pl.read_parquet(rejects_path).row(0) == (
        "3",
        "30",
        str(EPOCH_S * 1000),
        "4.0",
        "timestamp outside 1900..2199",
        2,
    )


def test_rejects_file_written_empty_with_schema(tmp_path):
    rejects_path = tmp_path / "rejects.parquet"
    _validate({"user_id": [1, 2], "item_id": [1, 2], "event": ["a", "b"]}, rejects=rejects_path)
    rejects = pl.read_parquet(rejects_path)
    assert rejects.height == 0
    assert rejects.columns == ["user_id", "item_id", "event", "reason", "row_number"]


def test_exact_duplicates_collapse_and_are_counted():
    columns = {
        "user_id": [1, 2, 1, 1, 2],
        "item_id": [5, 6, 5, 5, 6],
        "rating": [4.0, 3.0, 4.0, 5.0, 3.0],
    }
    df, report = _validate(columns)
    assert report.n_duplicates == 2
    assert report.n_valid == 3
    assert df.rows() == [(1, 5, 4.0), (2, 6, 3.0), (1, 5, 5.0)]
    df, report = _validate(columns, DataConfig(deduplicate=False))
    assert (report.n_duplicates, df.height) == (0, 5)


def test_duplicates_are_judged_after_parsing():
    df, report = _validate(
        {"user_id": ["a", " a", "b"], "item_id": ["x", "x ", "y"], "timestamp": ["1", "1.0", "2"]}
    )
    assert report.n_duplicates == 1
    assert df["user_id"].to_list() == ["a", "b"]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from([1.0, 2.0, None])),
        min_size=4,
        max_size=60,
    )
)
def test_deduplication_matches_a_plain_unique(rows):
    frame = pl.DataFrame(
        {"user_id": [0, 1], "item_id": [0, 1], "weight": [None, None]},
        schema_overrides={"weight": pl.Float64},
    ).vstack(
        pl.DataFrame(
            rows, schema={"user_id": pl.Int64, "item_id": pl.Int64, "weight": pl.Float64}, orient="row"
        )
    )
    df, report = _validate(frame.to_dict())
    expected = frame.unique(maintain_order=True).with_columns(pl.col("weight").cast(pl.Float32))
    assert df.equals(expected)
    assert report.n_duplicates == frame.height - expected.height


def test_reject_limit_error_names_counts_reasons_and_path(tmp_path):
    rejects_path = tmp_path / "rejects.parquet"
    columns = {
        "user_id": list(range(10)),
        "item_id": list(range(10)),
        "rating": ["4"] * 7 + ["x", "y", "0"],
    }
    with pytest.raises(RejectLimitExceeded) as err:
        _validate(columns, DataConfig(max_reject_fraction=0.1), rejects_path)
    message = str(err.value)
    assert message.startswith("mem: 3 of 10 rows rejected (30.00%), above data.max_reject_fraction = 10.00%")
    assert "top reasons: 'unparsable rating': 2, 'rating outside [1.0, 5.0]': 1" in message
    assert f"rejected rows are in {rejects_path}" in message
    assert message.endswith("or raise data.max_reject_fraction")
    assert "data.rating_scale" in message
    assert (err.value.n_rejected, err.value.n_total, err.value.rejects_path) == (3, 10, str(rejects_path))
    assert pl.read_parquet(rejects_path).height == 3


def test_reject_fraction_at_the_limit_passes():
    columns = {"user_id": list(range(10)), "item_id": list(range(10)), "rating": [4.0] * 9 + [0.0]}
    _, report = _validate(columns, DataConfig(max_reject_fraction=0.1))
    assert report.reject_fraction == pytest.approx(0.1)


def test_empty_log(tmp_path):
    path = _write(tmp_path / "log.csv", "user_id,item_id\n")
    with pytest.raises(DataError, match=r"log\.csv: the interaction log has no rows"):
        read_interactions(path)


def test_single_user_or_item_is_not_enough():
    with pytest.raises(
        DataError, match=r"1 distinct user\(s\) and 2 distinct item\(s\).*at least 2 users and 2 items"
    ):
        _validate({"user_id": [7, 7], "item_id": [1, 2]})
    with pytest.raises(DataError, match=r"2 distinct user\(s\) and 1 distinct item\(s\)"):
        _validate({"user_id": ["a", "b"], "item_id": ["i", "i"]})


def test_text_sources_get_int64_ids_only_for_canonical_integers(tmp_path):
    ints = _write(tmp_path / "a.csv", "user_id,item_id\n1,10\n-2, 20\n")
    df, _ = read_interactions(ints)
    assert df.schema["user_id"] == df.schema["item_id"] == pl.Int64
    assert df.rows() == [(1, 10), (-2, 20)]
    zeros = _write(tmp_path / "b.csv", "user_id,item_id\n1,007\n2,8\n")
    df, _ = read_interactions(zeros)
    assert df.schema["user_id"] == pl.Int64
    assert df["item_id"].to_list() == ["007", "8"]
    dat = _write(tmp_path / "ratings.dat", "1::10::5::978300760\n2::20::3::978300761\n")
    df, report = read_interactions(dat)
    assert df.schema["user_id"] == df.schema["item_id"] == pl.Int64
    assert df["rating"].to_list() == [5.0, 3.0]
    assert report.n_users == 2


def test_typed_string_ids_stay_strings(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["1", "2"], "item_id": ["10", "20"]}).write_parquet(path)
    df, _ = read_interactions(path)
    assert df.schema["user_id"] == pl.String


def test_negative_and_large_ids_count_distinct():
    _, report = _validate({"user_id": [-5, -5, 2**40], "item_id": [1, 2, 2]})
    assert (report.n_users, report.n_items) == (2, 2)


def test_unreadable_rows_fail_the_read_with_the_source(tmp_path):
    path = _write(tmp_path / "log.csv", "user_id,item_id\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"log\.csv: reading the interaction log failed .*quote fields"):
        read_interactions(path)


def test_unsupported_id_dtype():
    with pytest.raises(
        DataError, match=r"mem: column item_id has dtype Boolean; ids must be integers or strings"
    ):
        _validate({"user_id": [1, 2], "item_id": [True, False]})


def test_movielens_csv_defaults_to_half_star_scale_unless_set(tmp_path):
    from recsys_metric.config import DataConfig
    from recsys_metric.data.validate import read_interactions

    path = tmp_path / "ratings.csv"
    path.write_text(
        "userId,movieId,rating,timestamp\n1,10,0.5,964982703\n2,10,4.0,964981247\n1,11,5.0,964982224\n2,11,1.0,1\n"
    )
    df, report = read_interactions(path)
    assert report.n_rejected == 0 and df.height == 4
    with pytest.raises(Exception, match="rating outside"):
        read_interactions(path, DataConfig(rating_scale=(1.0, 5.0)))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-3, 40), min_size=1, max_size=10), min_size=1, max_size=4))
def test_distinct_ids_of_a_chunked_column(chunks):
    ids = pl.concat([pl.Series("user_id", c, dtype=pl.Int64) for c in chunks], rechunk=False)
    assert _n_distinct(ids) == len({x for c in chunks for x in c})


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 3), st.sampled_from([1.0, 2.0])),
        max_size=40,
    ),
    st.booleans(),
    st.sampled_from([2, 3, 1 << 20]),
)
def test_duplicate_rows_match_a_plain_first_distinct(rows, ordered, block):
    if ordered:
        rows = sorted(rows, key=lambda r: (r[0], r[2]))
    df = pl.DataFrame(
        {
            "user_id": pl.Series([r[0] for r in rows], dtype=pl.Int64),
            "item_id": pl.Series([r[1] for r in rows], dtype=pl.Int64),
            "timestamp": pl.Series([r[2] for r in rows], dtype=pl.Int64).cast(pl.Datetime("ms")),
            "rating": pl.Series([r[3] for r in rows], dtype=pl.Float32),
        }
    )
    expected = np.flatnonzero(~df.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(validate_module, "_BLOCK", block)
        patch.setattr(validate_module, "_MAX_TIED_SHARE", 1.0)
        found = duplicate_rows(df)
    assert found.to_list() == expected.tolist()
    assert drop_rows(df, found).equals(df.filter(pl.struct(pl.all()).is_first_distinct()))
