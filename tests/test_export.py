import re

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_metric.errors import DataError
from recsys_metric.export import read_embeddings, score_embeddings, write_embeddings
from recsys_metric.model.distances import get_distance


def vectors(n, dim, seed=0):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize(
    ("ids", "kind", "dtype"),
    [
        (pl.Series([10, 3, 2**40, -7], dtype=pl.Int64), "item", pl.Int64),
        (np.array([5, 6, 7, 8], dtype=np.int32), "user", pl.Int64),
        (pl.Series(["b", "a", "ü-名", ""]), "item", pl.String),
        (["u1", "u2", "u3", "u4"], "user", pl.String),
    ],
)
def test_round_trip_exact(tmp_path, ids, kind, dtype):
    vecs = vectors(4, 7)
    vecs[0, 0] = -0.0
    vecs[1, 1] = np.finfo(np.float32).tiny / 2
    path = write_embeddings(
        tmp_path / "emb.parquet", ids, vecs, kind=kind, distance="cosine", run_id="run-42"
    )
    table = read_embeddings(path)
    assert table.vectors.dtype == np.float32 and table.vectors.shape == (4, 7)
    assert table.vectors.tobytes() == vecs.tobytes()
    assert table.ids.name == f"{kind}_id" and table.ids.dtype == dtype
    assert table.ids.to_list() == list(np.asarray(ids).tolist())
    assert (table.kind, table.distance, table.dim, table.run_id, len(table)) == (
        kind,
        "cosine",
        7,
        "run-42",
        4,
    )
    assert not list(tmp_path.glob(".*"))


def test_written_schema_is_the_contract(tmp_path):
    path = write_embeddings(
        tmp_path / "items.parquet", [1, 2, 3], vectors(3, 5), kind="item", distance="euclidean", run_id="r1"
    )
    schema = pq.read_schema(path)
    assert schema.names == ["item_id", "embedding"]
    assert schema.field("item_id").type == pa.int64()
    embedding = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(embedding)
    assert embedding.list_size == 5 and embedding.value_type == pa.float32()
    assert schema.metadata == {b"distance": b"euclidean", b"dim": b"5", b"run_id": b"r1"}


def test_readable_by_other_tools(tmp_path):
    path = write_embeddings(
        tmp_path / "users.parquet", ["a", "b", "c"], vectors(3, 4), kind="user", distance="dot", run_id="r"
    )
    frame = pd.read_parquet(path)
    assert len(frame) == 3 and len(frame["embedding"].iloc[0]) == 4
    assert list(frame["user_id"]) == ["a", "b", "c"]
    polars_frame = pl.read_parquet(path)
    assert polars_frame.schema["embedding"] == pl.Array(pl.Float32, 4)
    assert polars_frame["embedding"].to_numpy().shape == (3, 4)
    arrow = pq.read_table(path)
    assert arrow.num_rows == 3 and arrow.schema.field("embedding").type.list_size == 4
    assert duckdb.sql(f"select count(*), max(len(embedding)) from '{path}'").fetchall() == [(3, 4)]
    first = duckdb.sql(f"select embedding from '{path}' where user_id = 'b'").fetchall()[0][0]
    assert np.array(first, dtype=np.float32).tobytes() == vectors(3, 4)[1].tobytes()


def test_overwrite_is_atomic_replace(tmp_path):
    path = tmp_path / "sub" / "items.parquet"
    write_embeddings(path, [1, 2], vectors(2, 3), kind="item", distance="dot", run_id="old")
    write_embeddings(path, [1, 2, 3], vectors(3, 3, seed=1), kind="item", distance="dot", run_id="new")
    table = read_embeddings(path)
    assert table.run_id == "new" and len(table) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["items.parquet"]


def test_missing_metadata_is_a_data_error(tmp_path):
    path = tmp_path / "plain.parquet"
    pl.DataFrame({"item_id": [1, 2], "embedding": vectors(2, 3)}).write_parquet(path)
    with pytest.raises(
        DataError,
        match=rf"embeddings file {re.escape(str(path))} \(2 rows\) lacks schema metadata \['distance', ",
    ):
        read_embeddings(path)


def test_wrong_column_type_is_a_data_error(tmp_path):
    path = tmp_path / "pandas.parquet"
    frame = pd.DataFrame({"item_id": [1, 2], "embedding": list(vectors(2, 3))})
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(
        {b"distance": b"dot", b"dim": b"3", b"run_id": b"r"}
    )
    pq.write_table(table, path)
    with pytest.raises(
        DataError,
        match=rf"embeddings file {re.escape(str(path))} \(2 rows\): column embedding is list<\w+: float>;",
    ):
        read_embeddings(path)


def test_other_read_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_embeddings(tmp_path / "nope.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet")
    with pytest.raises(
        DataError, match=f"embeddings file {re.escape(str(garbage))} is not a readable Parquet file"
    ):
        read_embeddings(garbage)
    path = write_embeddings(
        tmp_path / "e.parquet", [1], vectors(1, 2), kind="item", distance="dot", run_id="r"
    )
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"dim": b"3"}), path)
    with pytest.raises(DataError, match=r"expected fixed_size_list<float32>\[3\] \(metadata dim 3\)"):
        read_embeddings(path)


def test_write_rejects_bad_input(tmp_path):
    path = tmp_path / "e.parquet"
    with pytest.raises(ValueError, match="float32"):
        write_embeddings(
            path, [1, 2], vectors(2, 3).astype(np.float64), kind="item", distance="dot", run_id="r"
        )
    with pytest.raises(ValueError, match="3 ids for 2 vectors"):
        write_embeddings(path, [1, 2, 3], vectors(2, 3), kind="item", distance="dot", run_id="r")
    with pytest.raises(ValueError, match="1 of 3 are repeats"):
        write_embeddings(path, [1, 2, 1], vectors(3, 3), kind="item", distance="dot", run_id="r")
    with pytest.raises(ValueError, match="distance must be one of"):
        write_embeddings(path, [1, 2], vectors(2, 3), kind="item", distance="manhattan", run_id="r")
    bad = vectors(2, 3)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        write_embeddings(path, [1, 2], bad, kind="item", distance="dot", run_id="r")
    assert not path.exists()


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_score_embeddings_rankings_match_brute_force(tmp_path, distance):
    users = write_embeddings(
        tmp_path / "u.parquet", [1, 2, 3, 4, 5], vectors(5, 6, 1), kind="user", distance=distance, run_id="r"
    )
    items = write_embeddings(
        tmp_path / "i.parquet",
        list("abcdefghijklmnopqrst"),
        vectors(20, 6, 2),
        kind="item",
        distance=distance,
        run_id="r",
    )
    u, v = read_embeddings(users), read_embeddings(items)
    scores = score_embeddings(u.vectors, v.vectors, u.distance)
    assert scores.shape == (5, 20)
    model_scores = get_distance(distance).score(
        torch.from_numpy(u.vectors.copy()), torch.from_numpy(v.vectors.copy())
    )
    assert (
        np.argsort(-scores, axis=1, kind="stable") == np.argsort(-model_scores.numpy(), axis=1, kind="stable")
    ).all()
    for row in range(5):
        brute = []
        for col in range(20):
            a, b = u.vectors[row].astype(np.float64), v.vectors[col].astype(np.float64)
            if distance == "euclidean":
                brute.append(-np.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True))))
            elif distance == "cosine":
                brute.append(
                    sum(x * y for x, y in zip(a, b, strict=True)) / (np.linalg.norm(a) * np.linalg.norm(b))
                )
            else:
                brute.append(sum(x * y for x, y in zip(a, b, strict=True)))
        assert (
            np.argsort(-scores[row], kind="stable").tolist()
            == np.argsort(-np.array(brute), kind="stable").tolist()
        )
        np.testing.assert_allclose(scores[row], brute, rtol=1e-5, atol=1e-5)


def test_reads_files_with_several_row_groups(tmp_path):
    vecs = vectors(7, 3)
    path = write_embeddings(
        tmp_path / "e.parquet", list(range(7)), vecs, kind="item", distance="dot", run_id="r"
    )
    pq.write_table(pq.read_table(path), path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 4
    table = read_embeddings(path)
    assert table.vectors.tobytes() == vecs.tobytes() and table.ids.to_list() == list(range(7))
