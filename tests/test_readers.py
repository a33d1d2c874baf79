from pathlib import Path

import polars as pl
import pytest

from recsys_metric.config import ColumnMap, DataConfig
from recsys_metric.data.readers import detect_format, scan_interactions
from recsys_metric.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _log(**extra) -> pl.DataFrame:
    return pl.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 20, 30], **extra})


def test_parquet_file_canonical_columns_in_order_extra_dropped(tmp_path):
    path = tmp_path / "log.parquet"
    _log(junk=["a", "b", "c"], rating=[4.0, 5.0, 1.0], timestamp=[1, 2, 3]).write_parquet(path)
    df = scan_interactions(path).collect()
    assert df.columns == ["user_id", "item_id", "timestamp", "rating"]
    assert df.schema["user_id"] == pl.Int64
    assert df["item_id"].to_list() == [10, 20, 30]


def test_parquet_string_ids_stay_strings(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"user_id": ["u1", "u2"], "item_id": ["007", "8"]}).write_parquet(path)
    df = scan_interactions(path).collect()
    assert df.schema["user_id"] == pl.String
    assert df["item_id"].to_list() == ["007", "8"]


def test_partition_directory_with_hive_keys_skips_hidden_and_marker_files(tmp_path):
    root = tmp_path / "log"
    _log().write_parquet(_mk(root / "event=view" / "part-0.parquet"))
    pl.DataFrame({"user_id": [4], "item_id": [40]}).write_parquet(_mk(root / "event=buy" / "part-0.parquet"))
    _write(root / "_SUCCESS", "")
    _write(root / "event=view" / ".part-0.parquet.crc", "not parquet")
    assert detect_format(root) == "parquet"
    df = scan_interactions(root).collect()
    assert df.columns == ["user_id", "item_id", "event"]
    # files are read in sorted path order: event=buy before event=view
    assert df.rows() == [(4, 40, "buy"), (1, 10, "view"), (2, 20, "view"), (3, 30, "view")]


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_partitions_with_different_integer_widths_unify_to_int64(tmp_path):
    pl.DataFrame({"user_id": pl.Series([1], dtype=pl.Int32), "item_id": [1]}).write_parquet(
        tmp_path / "a.parquet"
    )
    pl.DataFrame({"user_id": [2], "item_id": pl.Series([2], dtype=pl.UInt16)}).write_parquet(
        tmp_path / "b.parquet"
    )
    df = scan_interactions(tmp_path).collect()
    assert df.schema == pl.Schema({"user_id": pl.Int64, "item_id": pl.Int64})
    assert df.rows() == [(1, 1), (2, 2)]


def test_glob_reads_matching_files_recursively(tmp_path):
    _log().write_parquet(_mk(tmp_path / "d1" / "a.parquet"))
    _log().write_parquet(_mk(tmp_path / "d2" / "deep" / "b.parquet"))
    _write(tmp_path / "d2" / "notes.csv", "user_id,item_id\n9,9\n")
    pattern = str(tmp_path / "**" / "*.parquet")
    assert detect_format(pattern) == "parquet"
    assert scan_interactions(pattern).collect().height == 6


def test_csv_with_custom_mapping_and_separator_reads_strings(tmp_path):
    path = _write(
        tmp_path / "events.csv",
        "uid;sku;when;stars;kind;note\n a ;b1;1700000000;4.5;view;x\nc;d2;bad;x;buy;y\n",
    )
    config = DataConfig(
        csv_separator=";",
        columns=ColumnMap(user_id="uid", item_id="sku", timestamp="when", rating="stars", event="kind"),
    )
    df = scan_interactions(path, config).collect()
    assert df.columns == ["user_id", "item_id", "timestamp", "rating", "event"]
    assert all(dtype == pl.String for dtype in df.dtypes)
    # raw values survive, unparsable ones included: validation decides about them
    assert df.row(1) == ("c", "d2", "bad", "x", "buy")
    assert df["user_id"][0] == " a "


def test_jsonl_keeps_types_and_mixed_ids_become_strings(tmp_path):
    ints = _write(
        tmp_path / "a.jsonl", '{"user_id": 1, "item_id": 5, "rating": 4}\n{"user_id": 2, "item_id": 6}\n'
    )
    df = scan_interactions(ints).collect()
    assert df.schema["user_id"] == pl.Int64
    assert df["rating"].to_list() == [4, None]
    mixed = _write(
        tmp_path / "b.ndjson", '{"user_id": 1, "item_id": "x"}\n{"user_id": "abc", "item_id": "y"}\n'
    )
    assert detect_format(mixed) == "jsonl"
    df = scan_interactions(mixed).collect()
    assert df.schema["user_id"] == pl.String
    assert df["user_id"].to_list() == ["1", "abc"]


def test_movielens_dat(tmp_path):
    path = _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\r\n3::1::2::9::9\n")
    assert detect_format(path) == "movielens-dat"
    df = scan_interactions(path, DataConfig(columns=ColumnMap(user_id="ignored"))).collect()
    assert df.columns == ["user_id", "item_id", "timestamp", "rating"]
    assert df.row(0) == ("1", "1193", "978300760", "5")
    # a line with surplus fields keeps them in the last field, so it cannot parse silently shifted
    assert df.row(2) == ("3", "1", "9::9", "2")


def test_movielens_udata(tmp_path):
    path = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert detect_format(path) == "movielens-udata"
    df = scan_interactions(path).collect()
    assert df.rows() == [("196", "242", "881250949", "3"), ("186", "302", "891717742", "3")]


def test_movielens_csv_detected_by_header(tmp_path):
    path = _write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,307,3.5,1256677221\n")
    assert detect_format(path) == "movielens-csv"
    assert scan_interactions(path).collect().row(0) == ("1", "307", "1256677221", "3.5")
    other = _write(tmp_path / "x" / "ratings.csv", "user_id,item_id\n1,2\n")
    assert detect_format(other) == "csv"


def test_detect_format_by_magic_and_unknown_names(tmp_path):
    blob = tmp_path / "export.bin"
    _log().write_parquet(blob)
    assert detect_format(blob) == "parquet"
    odd = _write(tmp_path / "log.txt", "user_id,item_id\n")
    with pytest.raises(DataError, match=r"log\.txt: cannot tell the input format.*data\.format"):
        detect_format(odd)
    assert scan_interactions(odd, DataConfig(format="csv")).collect().columns == ["user_id", "item_id"]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.parquet: path does not exist"):
        scan_interactions(tmp_path / "nope.parquet")


def test_directory_without_matching_files(tmp_path):
    _write(tmp_path / "readme.txt", "hi")
    _write(tmp_path / "_SUCCESS", "")
    with pytest.raises(DataError, match=r"directory holds no \*\.parquet or \*\.pq or \*\.parq files") as err:
        scan_interactions(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_glob_without_matches(tmp_path):
    with pytest.raises(DataError, match=r"the glob matches no files"):
        scan_interactions(str(tmp_path / "*.parquet"))


def test_truncated_parquet_is_named(tmp_path):
    good = tmp_path / "part-0.parquet"
    _log().write_parquet(good)
    bad = tmp_path / "part-1.parquet"
    bad.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(DataError) as err:
        scan_interactions(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{bad}: not a readable Parquet file")
    assert f"remove it from {tmp_path}" in message
    with pytest.raises(DataError, match=r"not a readable Parquet file.*re-export it$"):
        scan_interactions(bad)


def test_missing_required_column_names_file_column_and_columns_present(tmp_path):
    path = tmp_path / "log.parquet"
    pl.DataFrame({"uid": [1], "item_id": [2], "ts": [3]}).write_parquet(path)
    with pytest.raises(DataError) as err:
        scan_interactions(path)
    assert str(err.value) == (
        f"{path}: required column user_id (source column 'user_id') is missing; "
        "columns present: ['uid', 'item_id', 'ts']; set data.columns.user_id to the column that holds it"
    )
    config = DataConfig(columns=ColumnMap(user_id="uid", item_id="sku"))
    with pytest.raises(DataError, match=r"required column item_id \(source column 'sku'\)"):
        scan_interactions(path, config)


def test_missing_column_in_one_csv_of_a_glob_names_that_file(tmp_path):
    _write(tmp_path / "a.csv", "user_id,item_id\n1,2\n")
    bad = _write(tmp_path / "b.csv", "user,item_id\n1,2\n")
    with pytest.raises(
        DataError, match=rf"^{bad}: required column user_id .*columns present: \['user', 'item_id'\]"
    ):
        scan_interactions(str(tmp_path / "*.csv"))


def test_partitions_with_different_optional_columns(tmp_path):
    _log(rating=[1.0, 2.0, 3.0]).write_parquet(tmp_path / "a.parquet")
    _log().write_parquet(tmp_path / "b.parquet")
    with pytest.raises(
        DataError, match=r"b\.parquet: column 'rating' \(rating\) is missing but .*a\.parquet has it"
    ):
        scan_interactions(tmp_path)


def test_movielens_csv_forced_on_other_file(tmp_path):
    path = _write(tmp_path / "x.csv", "user_id,item_id\n1,2\n")
    with pytest.raises(
        DataError, match=r"source column 'userId'.*not look like a MovieLens movielens-csv file"
    ):
        scan_interactions(path, DataConfig(format="movielens-csv"))


def test_empty_csv_file(tmp_path):
    path = _write(tmp_path / "log.csv", "")
    with pytest.raises(DataError, match=r"log\.csv: file is empty"):
        scan_interactions(path)


@pytest.mark.parametrize(
    ("sep", "named"),
    [(";", "set data.csv_separator to ';'"), ("\t", "set data.csv_separator to '\\t'"), ("|", "to '|'")],
)
def test_a_header_in_another_separator_points_at_csv_separator(tmp_path, sep, named):
    path = _write(
        tmp_path / "log.csv", sep.join(["user_id", "item_id", "rating"]) + "\n1" + sep + "2" + sep + "4\n"
    )
    with pytest.raises(DataError) as err:
        scan_interactions(path)
    text = str(err.value)
    assert text.startswith(f"{path}: required column user_id") and named in text
    assert "data.columns" not in text, "the hint is the separator, not the column map"


def test_a_missing_column_in_a_comma_file_still_points_at_the_column_map(tmp_path):
    path = _write(tmp_path / "log.csv", "customer,item_id\n1,2\n")
    with pytest.raises(DataError, match="set data.columns.user_id to the column that holds it"):
        scan_interactions(path)


def test_a_broken_json_line_is_named_by_its_number(tmp_path):
    path = _write(
        tmp_path / "log.jsonl",
        '{"user_id": 1, "item_id": 2}\n\n{"user_id": 1, "item_id": 3}\n{"user_id": 2, "item_id": 3\n'
        '{"user_id": 2, "item_id": 4}\n',
    )
    with pytest.raises(DataError) as err:
        scan_interactions(path)
    assert str(err.value) == (
        f"{path}: line 4 is not valid JSON (Expecting ',' delimiter, column 28): fix or remove that line"
    )
    assert not err.value.transient


def test_a_json_array_line_is_not_an_object(tmp_path):
    path = _write(tmp_path / "log.jsonl", '{"user_id": 1, "item_id": 2}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"log.jsonl: line 2 is a JSON list, not an object"):
        scan_interactions(path)


def test_an_unterminated_last_json_line_is_transient(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"user_id": 1, "item_id": 2}\n{"user_id": 2, "ite')
    with pytest.raises(DataError) as err:
        scan_interactions(path)
    assert "line 2 is not valid JSON" in str(err.value) and "may still be being written" in str(err.value)
    assert err.value.transient


def test_a_truncated_parquet_file_is_transient_another_format_is_not(tmp_path):
    whole = tmp_path / "whole.parquet"
    _log().write_parquet(whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        scan_interactions(cut)
    assert str(err.value).startswith(f"{cut}: not a readable Parquet file") and err.value.transient
    csv = tmp_path / "csv.parquet"
    csv.write_text("user_id,item_id\n1,2\n")
    with pytest.raises(DataError) as err:
        scan_interactions(csv)
    assert not err.value.transient, "a file in another format stays wrong on every try"


def test_a_log_that_changes_while_it_is_read_is_transient(tmp_path, monkeypatch):
    from recsys_metric.data import validate

    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\n1,2\n")
    real = validate.validate_interactions

    def growing(*args, **kwargs):
        with open(path, "a") as fh:  # the exporter appends while we read: a half-written line
            fh.write("2,3\n3,4,1700")
        return real(*args, **kwargs)

    monkeypatch.setattr(validate, "validate_interactions", growing)
    with pytest.raises(DataError) as err:
        validate.read_interactions(path)
    assert err.value.transient and "the log changed while it was read" in str(err.value)
    monkeypatch.setattr(validate, "validate_interactions", real)
    with pytest.raises(DataError) as err:  # the same single-row log, unchanged: not transient
        validate.read_interactions(_write(tmp_path / "one.csv", "user_id,item_id\n1,2\n"))
    assert not err.value.transient
