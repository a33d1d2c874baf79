"""The light query path: importing and loading a run needs neither polars, pandas, pydantic nor
``pyarrow.dataset``/``pyarrow.compute``, and the lookups that skip polars answer exactly as the
:class:`Vocabulary` does (same numbers, same errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from recsys_metric import Recommender
from recsys_metric.data.vocab import UnknownIdError, Vocabulary
from recsys_metric.errors import DataError
from recsys_metric.export import write_embeddings
from recsys_metric.serving.run import _equal_ids
from tests.serving_runs import ITEM_IDS, USER_IDS, publish_hand_run

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("polars", "pandas", "pydantic", "torch", "prefect", "pyarrow.dataset", "pyarrow.compute")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    publish_hand_run(root, "run-a")
    return root


def _int_run(root: Path, user_ids: list[int], item_ids: list[int], *, vocab_items: list[int] | None = None):
    """A run directory (outside a store: loaded unverified) with integer ids and no Annoy index."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    Vocabulary(user_ids, name="user").save(root / "users.parquet")
    Vocabulary(vocab_items or item_ids, name="item").save(root / "items.parquet")
    users = rng.normal(size=(len(user_ids), 3)).astype(np.float32)
    items = rng.normal(size=(len(item_ids), 3)).astype(np.float32)
    write_embeddings(
        root / "user_embeddings.parquet", user_ids, users, kind="user", distance="dot", run_id="r"
    )
    write_embeddings(
        root / "item_embeddings.parquet", item_ids, items, kind="item", distance="dot", run_id="r"
    )
    pl.DataFrame(
        {
            "user_num": pl.Series([0, 1], dtype=pl.Int32),
            "item_num": pl.Series([0, 2], dtype=pl.Int32),
            "label": pl.Series([1, 1], dtype=pl.Int8),
        }
    ).write_parquet(root / "interactions.parquet")
    return root


def test_import_and_load_need_no_polars_pandas_pydantic_or_pyarrow_dataset(store):
    code = (
        "import sys, json\n"
        "import recsys_metric\n"
        "from recsys_metric import Recommender\n"
        "rec = Recommender.load(sys.argv[1])\n"
        "n = (rec.n_users, rec.n_items, rec.verified)\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'n': n}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(store)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": [], "n": [40, 120, True]}


def test_string_id_lookups_match_the_vocabulary(store):
    rec = Recommender.load(store, output="polars")
    vocab = Vocabulary(ITEM_IDS, name="item")
    asked = [ITEM_IDS[5], ITEM_IDS[0], ITEM_IDS[5], ITEM_IDS[119]]
    expected = vocab.numbers(asked)
    for given in (asked, tuple(asked), np.array(asked, dtype=object), pl.Series(asked)):
        got = rec._numbers("item", given)
        assert got.dtype == np.int32 and got.tolist() == expected.tolist() == [5, 0, 5, 119]
    assert rec._numbers("user", [USER_IDS[3]]).tolist() == [3]
    assert rec._numbers("item", []).tolist() == []
    assert rec.user_id_type is str and rec.item_id_type is str
    assert rec.item_ids.to_list() == ITEM_IDS and rec.user_ids.dtype == pl.String


def test_unknown_and_mistyped_ids_raise_the_vocabularys_errors(store):
    rec = Recommender.load(store, output="polars")
    vocab = Vocabulary(ITEM_IDS, name="item")
    with pytest.raises(UnknownIdError) as ours:
        rec._numbers("item", [ITEM_IDS[1], "nope", "nada"])
    with pytest.raises(UnknownIdError) as theirs:
        vocab.numbers([ITEM_IDS[1], "nope", "nada"])
    assert str(ours.value) == str(theirs.value)
    assert ours.value.unknown == ["nope", "nada"] and ours.value.n_unknown == 2
    with pytest.raises(UnknownIdError, match="cannot be in the run's vocabulary"):
        rec._numbers("item", [ITEM_IDS[1], 7])  # an int in a string vocabulary
    with pytest.raises(
        KeyError, match=r"item_id 'nope' is not in the run's item vocabulary \(120 ids of type String\)"
    ):
        rec.similar_items("nope")
    # Exclusions go through the same lookup.
    with pytest.raises(UnknownIdError, match="'nope'"):
        rec.similar_items(ITEM_IDS[0], exclude=["nope"])


def test_integer_ids_bools_and_floats_are_not_ids(tmp_path):
    run = _int_run(tmp_path / "run", [10, 20, 30], [7, 3, 9, 1])
    rec = Recommender.load(run, verify=False, output="polars")
    assert rec.user_id_type is int and rec.item_id_type is int
    assert rec._numbers("item", [9, 7, 1]).tolist() == [2, 0, 3]
    assert rec._numbers("item", np.array([9, 7], dtype=np.int32)).tolist() == [2, 0]
    # True == 1 and 3.0 == 3 as dict keys; neither is an id.
    for bad in ([True], [3.0]):
        with pytest.raises(UnknownIdError):
            rec._numbers("item", bad)
    with pytest.raises(
        KeyError, match=r"item_id True is not in the run's item vocabulary \(4 ids of type Int64\)"
    ):
        rec.similar_items(True)
    frame = rec.similar_items(7, k=3, exclude=[1])
    assert frame["item_id"].dtype == pl.Int64 and set(frame["item_id"].to_list()) == {3, 9}
    table = rec.recommend_batch([30, 10], k=2, exclude_seen=False)
    assert table["user_id"].to_list() == [30, 30, 10, 10]


def test_a_vocabulary_out_of_order_is_still_refused(tmp_path):
    run = _int_run(tmp_path / "run", [10, 20, 30], [7, 3, 9, 1], vocab_items=[3, 7, 9, 1])
    with pytest.raises(DataError, match="are not those of items.parquet in number order"):
        Recommender.load(run, verify=False)


def test_repeated_ids_in_the_embeddings_are_refused(tmp_path):
    run = _int_run(tmp_path / "run", [10, 20, 30], [7, 3, 9, 1])
    # Rewrite the user embeddings with a repeated id (write_embeddings refuses repeats).
    import pyarrow.parquet as pq

    table = pq.read_table(run / "user_embeddings.parquet")
    ids = pa.chunked_array([pa.array([10, 20, 10], pa.int64())])
    pq.write_table(table.set_column(0, "user_id", ids), run / "user_embeddings.parquet")
    (run / "users.parquet").unlink()
    with pytest.raises(DataError, match="1 duplicate id"):
        Recommender.load(run, verify=False)


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (
            pa.chunked_array([pa.array([1, 2, 3], pa.int32())]),
            pa.chunked_array([pa.array([1, 2, 3], pa.int64())]),
            True,
        ),
        (
            pa.chunked_array([pa.array([1, 2], pa.int64()), pa.array([3])]),
            pa.chunked_array([pa.array([1, 2, 3])]),
            True,
        ),
        (pa.chunked_array([pa.array([1, 2, 4])]), pa.chunked_array([pa.array([1, 2, 3])]), False),
        (
            pa.chunked_array([pa.array(["a", "bc", "é"])]),
            pa.chunked_array([pa.array(["a", "bc", "é"], pa.large_string())]),
            True,
        ),
        (
            pa.chunked_array([pa.array(["x", "a", "bc"]).slice(1)]),
            pa.chunked_array([pa.array(["a", "bc"])]),
            True,
        ),
        (pa.chunked_array([pa.array(["a", "b", "c"])]), pa.chunked_array([pa.array(["a", "bc", ""])]), False),
        (pa.chunked_array([pa.array(["1", "2"])]), pa.chunked_array([pa.array([1, 2])]), False),
        (pa.chunked_array([pa.array([1, 2])]), pa.chunked_array([pa.array([1, 2, 3])]), False),
    ],
)
def test_equal_ids_compares_values_across_widths_and_chunks(a, b, same):
    assert _equal_ids(a, b) is same
    assert _equal_ids(b, a) is same
