import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys_metric.data import vocab as vocab_module
from recsys_metric.data.vocab import UnknownIdError, Vocabulary
from recsys_metric.errors import DataError

int_ids = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=40)
str_ids = st.lists(st.text(max_size=6), max_size=40)
any_ids = st.one_of(int_ids, str_ids)
SETTINGS = settings(max_examples=50, deadline=None)


def test_from_ids_is_unique_sorted_and_dense():
    v = Vocabulary.from_ids(np.array([30, 10, 20, 10, 30], dtype=np.int32), name="item")
    assert v.ids().to_list() == [10, 20, 30]
    assert v.ids().name == "item_id"
    assert v.id_dtype == pl.Int64
    assert len(v) == 3
    nums = v.numbers([20, 30, 10, 20])
    assert nums.dtype == np.int32
    assert nums.tolist() == [1, 2, 0, 1]


def test_from_ids_accepts_series_list_and_categorical():
    expected = ["a", "b", "c"]
    assert Vocabulary.from_ids(["c", "a", "b", "a"], name="user").ids().to_list() == expected
    assert (
        Vocabulary.from_ids(pl.Series(["c", "a", "b"], dtype=pl.Categorical), name="user").id_dtype
        == pl.String
    )
    assert Vocabulary.from_ids(np.array(["b", "c", "a"]), name="user").ids().to_list() == expected
    empty = Vocabulary.from_ids([], name="user")
    assert len(empty) == 0 and empty.id_dtype == pl.Int64
    assert empty.numbers(["a", "b"], missing="negative").tolist() == [-1, -1]
    assert empty.extend(["b", "a"]).ids().to_list() == ["a", "b"]


@SETTINGS
@given(any_ids)
def test_ids_numbers_round_trip(values):
    v = Vocabulary.from_ids(values, name="item")
    nums = v.numbers(values)
    assert nums.dtype == np.int32
    assert v.ids(nums).to_list() == values
    assert np.array_equal(v.numbers(v.ids()), np.arange(len(v), dtype=np.int32))
    assert v.ids().to_list() == sorted(set(values))
    assert all(x in v for x in values)


@SETTINGS
@given(any_ids, st.randoms(use_true_random=False))
def test_numbers_do_not_depend_on_input_order(values, rnd):
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert Vocabulary.from_ids(values, name="user") == Vocabulary.from_ids(shuffled, name="user")


@SETTINGS
@given(st.one_of(st.tuples(int_ids, int_ids), st.tuples(str_ids, str_ids)))
def test_extend_keeps_old_numbers_and_appends_sorted(pair):
    old_values, new_values = pair
    v = Vocabulary.from_ids(old_values, name="item")
    w = v.extend(new_values)
    assert w.ids().head(len(v)).to_list() == v.ids().to_list()
    assert np.array_equal(w.numbers(v.ids()), np.arange(len(v), dtype=np.int32))
    appended = w.ids().slice(len(v)).to_list()
    assert appended == sorted(set(new_values) - set(old_values))
    # After extend num order is not id order: lookups must still be right.
    assert np.array_equal(w.numbers(w.ids()), np.arange(len(w), dtype=np.int32))
    assert all(x in w for x in new_values)
    assert w.id_dtype == v.id_dtype or len(v) == 0


def test_extend_unsorted_lookup_example():
    v = Vocabulary.from_ids([10, 20, 30], name="user").extend([5, 25, 20])
    assert v.ids().to_list() == [10, 20, 30, 5, 25]
    assert v.numbers([5, 30, 25, 10]).tolist() == [3, 2, 4, 0]
    assert 5 in v and 25 in v and 7 not in v
    assert v.extend([10, 5]) is v


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.tuples(int_ids, int_ids), st.tuples(str_ids, str_ids)), st.sampled_from(["user", "item"]))
def test_save_load_round_trip(tmp_path, pair, name):
    v = Vocabulary.from_ids(pair[0], name=name).extend(pair[1])
    path = v.save(tmp_path / "vocab.parquet")
    loaded = Vocabulary.load(path)
    assert loaded == v
    assert loaded.name == name
    assert loaded.id_dtype == v.id_dtype
    assert pl.read_parquet(path).columns == [f"{name}_id", f"{name}_num"]
    assert pl.read_parquet(path).schema[f"{name}_num"] == pl.Int32


def test_save_load_keeps_dtype(tmp_path):
    for values, dtype in (([3, 1, 2], pl.Int64), (["x", "y"], pl.String)):
        v = Vocabulary.from_ids(values, name="user")
        assert Vocabulary.load(v.save(tmp_path / "u.parquet")).id_dtype == dtype
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_rejects_bad_files(tmp_path):
    bad_cols = tmp_path / "cols.parquet"
    pl.DataFrame({"id": [1], "num": [0]}).write_parquet(bad_cols)
    with pytest.raises(DataError, match="expected exactly one of the column pairs"):
        Vocabulary.load(bad_cols)
    gap = tmp_path / "gap.parquet"
    pl.DataFrame({"item_id": [1, 2], "item_num": pl.Series([0, 2], dtype=pl.Int32)}).write_parquet(gap)
    with pytest.raises(DataError, match=r"item_num is not exactly 0\.\.1 \(2 rows\)"):
        Vocabulary.load(gap)
    dup = tmp_path / "dup.parquet"
    pl.DataFrame({"item_id": [1, 1], "item_num": pl.Series([0, 1], dtype=pl.Int32)}).write_parquet(dup)
    with pytest.raises(DataError, match="duplicate"):
        Vocabulary.load(dup)
    with pytest.raises(DataError, match="does not exist"):
        Vocabulary.load(tmp_path / "missing.parquet")


def test_load_sorts_by_number(tmp_path):
    path = tmp_path / "v.parquet"
    pl.DataFrame(
        {"user_id": ["b", "a", "c"], "user_num": pl.Series([1, 2, 0], dtype=pl.Int32)}
    ).write_parquet(path)
    assert Vocabulary.load(path).ids().to_list() == ["c", "b", "a"]


def test_numbers_missing_error_names_first_ids_and_count():
    v = Vocabulary.from_ids(["a", "b"], name="item")
    with pytest.raises(KeyError) as info:
        v.numbers(["a", "x", "y", "x", "z", "p", "q", "r"])
    assert str(info.value) == (
        "6 distinct item_id value(s) looked up are not in the item vocabulary: 'x', 'y', 'z', 'p', 'q' "
        "and 1 more; pass missing='negative' to skip them, or extend the vocabulary"
    )
    assert isinstance(info.value, UnknownIdError) and isinstance(info.value, DataError)
    assert info.value.unknown == ["x", "y", "z", "p", "q"] and info.value.n_unknown == 6


def test_numbers_missing_negative():
    v = Vocabulary.from_ids([1, 2, 3], name="user")
    out = v.numbers(np.array([3, 9, 1]), missing="negative")
    assert out.tolist() == [2, -1, 0] and out.dtype == np.int32


def test_lookup_type_errors():
    v = Vocabulary.from_ids([1, 2, 3], name="user")
    with pytest.raises(TypeError, match="looked up String ids in a vocabulary of Int64 ids"):
        v.numbers(["1"])
    with pytest.raises(TypeError, match="expected a sequence of ids"):
        v.numbers(1)
    with pytest.raises(IndexError, match=r"1 number\(s\) outside \[0, 3\), e.g. \[3\]"):
        v.ids([0, 3])
    with pytest.raises(IndexError, match=r"outside \[0, 3\), e.g. \[-1\]"):
        v.ids(np.array([-1]))
    assert "1" not in v and True not in v and 1.0 not in v and 2**70 not in v
    assert v.ids(np.array([], dtype=np.int64)).to_list() == []


def test_constructor_errors():
    with pytest.raises(DataError, match=r"user_id: 1 duplicate id\(s\) \(e.g. \[2\]\)"):
        Vocabulary([1, 2, 2], name="user")
    with pytest.raises(DataError, match=r"1 null id\(s\) among 2"):
        Vocabulary.from_ids(["a", None], name="item")
    with pytest.raises(TypeError, match="ids must be integers or strings, got dtype Float64"):
        Vocabulary.from_ids([1.5, 2.0], name="item")
    with pytest.raises(ValueError, match="vocabulary name must be one of"):
        Vocabulary([1], name="tag")  # type: ignore[arg-type]
    v = Vocabulary(["z", "a"], name="item")
    assert v.numbers(["a", "z"]).tolist() == [1, 0]


def _frame():
    return pl.DataFrame(
        {
            "user_id": pl.Series([30, 10, 99, 20, 10], dtype=pl.Int32),
            "x": ["a", "b", "c", "d", "e"],
        }
    )


def test_encode_modes_keep_row_order():
    v = Vocabulary.from_ids([10, 20, 30], name="user")
    out = v.encode(_frame(), missing="null")
    assert out.columns == ["user_id", "x", "user_num"]
    assert out.schema["user_num"] == pl.Int32
    assert out.schema["user_id"] == pl.Int32
    assert out["user_num"].to_list() == [2, 0, None, 1, 0]
    dropped = v.encode(_frame(), missing="drop")
    assert dropped["x"].to_list() == ["a", "b", "d", "e"]
    assert dropped["user_num"].to_list() == [2, 0, 1, 0]
    with pytest.raises(
        UnknownIdError,
        match=r"1 distinct user_id value\(s\) in the frame are not in the user vocabulary: 99; pass missing='null' or 'drop'",
    ):
        v.encode(_frame())


def test_encode_lazy_and_replaces_existing_column():
    v = Vocabulary.from_ids([10, 20, 30, 99], name="user")
    lazy = _frame().with_columns(user_num=pl.lit(-5, dtype=pl.Int32)).lazy()
    out = v.encode(lazy)
    assert isinstance(out, pl.LazyFrame)
    assert out.collect()["user_num"].to_list() == [2, 0, 3, 1, 0]
    small = Vocabulary.from_ids([10], name="user")
    with pytest.raises(UnknownIdError, match=r"3 distinct user_id value\(s\) in the frame .*: 30, 99, 20;"):
        small.encode(lazy)
    assert small.encode(lazy, missing="drop").collect()["x"].to_list() == ["b", "e"]


def test_encode_string_ids_and_errors():
    v = Vocabulary.from_ids(["b", "a"], name="item")
    frame = pl.DataFrame({"item_id": ["a", "b", "a"]})
    assert v.encode(frame)["item_num"].to_list() == [0, 1, 0]
    with pytest.raises(
        DataError, match=r"cannot encode items: item_id is Int64, the vocabulary holds String ids"
    ):
        v.encode(pl.DataFrame({"item_id": [1]}))
    with pytest.raises(DataError, match="the frame has no item_id column"):
        v.encode(pl.DataFrame({"user_id": ["a"]}))
    with pytest.raises(ValueError, match="missing must be"):
        v.encode(frame, missing="negative")  # type: ignore[arg-type]


@pytest.mark.parametrize("missing", ["null", "drop"])
def test_encode_eager_and_lazy_agree(missing):
    v = Vocabulary.from_ids([10, 20], name="user")
    frame = _frame().with_columns(pl.Series("user_id", [30, None, 10, 20, 10], dtype=pl.Int32))
    eager = v.encode(frame, missing=missing)
    assert eager.equals(v.encode(frame.lazy(), missing=missing).collect())
    expected = [None, None, 0, 1, 0] if missing == "null" else [0, 1, 0]
    assert eager["user_num"].to_list() == expected
    with pytest.raises(UnknownIdError, match=r"2 distinct user_id value\(s\) in the frame .*: 30, None;"):
        v.encode(frame)


@SETTINGS
@given(
    st.lists(st.integers(-60, 60), min_size=1, max_size=30),
    st.lists(st.integers(-90, 90), max_size=30),
    st.sampled_from([0, 2**62 - 100, -(2**62)]),
    st.booleans(),
)
def test_lookup_table_and_join_agree(values, queries, offset, chunked):
    values = [v + offset for v in values]
    queries = [q + offset for q in queries]

    def series(name, xs):
        s = pl.Series(name, xs, dtype=pl.Int64)
        return pl.concat([s[:3], s[3:]], rechunk=False) if chunked and len(xs) > 3 else s

    results = []
    for enabled in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            # Integer ids always (or never) use the direct table instead of a join.
            patch.setattr(vocab_module, "_DENSE_SPAN_PER_ID", 2**40 if enabled else 0)
            patch.setattr(vocab_module, "_DENSE_MIN_SPAN", 0)
            v = Vocabulary.from_ids(series("user_id", values), name="user")
            frame = pl.DataFrame([series("user_id", queries), pl.Series("row", range(len(queries)))])
            try:
                v.encode(frame)
                error = None
            except UnknownIdError as err:
                error = str(err)
            results.append(
                (
                    v.ids().to_list(),
                    v.numbers(series("user_id", queries), missing="negative").tolist(),
                    v.encode(frame, missing="null").to_dicts(),
                    v.encode(frame, missing="drop").to_dicts(),
                    error,
                )
            )
    assert results[0] == results[1]
    ids, nums = results[0][0], results[0][1]
    assert ids == sorted(set(values))
    assert nums == [ids.index(q) if q in ids else -1 for q in queries]
