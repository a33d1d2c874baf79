"""Embeddings to and from Parquet: the file contract other systems read.

One file per tower, ``item_embeddings.parquet`` and ``user_embeddings.parquet``:

- ``{kind}_id``: the external id, Int64 or String (``kind`` is ``user`` or ``item``);
- ``embedding``: ``fixed_size_list<float32>[dim]``, one row per id;
- schema metadata (UTF-8 bytes): ``distance`` (``euclidean`` | ``cosine`` | ``dot``), ``dim``
  (decimal), ``run_id``.

A run's ``item_embeddings.parquet`` also has the column ``n_train_interactions`` (Int64) and the
metadata key ``cold_items`` (``eligible`` | ``excluded``): which items were placed by their features
alone and whether queries may return them (:mod:`recsys_metric.cold_items`, docs/cold-start.md).
Readers ignore columns they do not know.

A consumer with the two files scores ``user x item`` with :func:`score_embeddings` (higher is
better; euclidean scores are ``-distance``) and gets the model's rankings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_metric.errors import DataError
from recsys_metric.scoring import DISTANCE_NAMES, score_numpy

if TYPE_CHECKING:
    # polars is imported where a Series is made: a query process (serving) reads the ids as Arrow
    # and need not pay the fifth of a second polars costs to import.
    import polars as pl

DISTANCES: tuple[str, ...] = DISTANCE_NAMES
"""Values allowed in the ``distance`` metadata."""

KINDS: tuple[str, ...] = ("user", "item")
"""Values of ``kind``; the id column is ``f"{kind}_id"``."""

_META_KEYS: tuple[bytes, ...] = (b"distance", b"dim", b"run_id")


@dataclass(frozen=True)
class EmbeddingTable:
    """The content of one embeddings file.

    Attributes:
        id_array: external ids in file order as read (Arrow ``int64`` or ``string``/``large_string``).
        ids: the same as a polars Series (Int64 or String) named ``{kind}_id``, made on first use.
        vectors: float32 ``[n, dim]``; row ``i`` belongs to ``ids[i]``. Read-only when it shares
            memory with the Arrow buffers (``.copy()`` before writing into it).
        distance: ``euclidean``, ``cosine`` or ``dot``.
        dim: embedding dimension D.
        run_id: the run that wrote the file.
        kind: ``user`` or ``item``.
    """

    id_array: pa.ChunkedArray
    vectors: np.ndarray
    distance: str
    dim: int
    run_id: str
    kind: str

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @cached_property
    def ids(self) -> pl.Series:
        import polars as pl

        return pl.Series(f"{self.kind}_id", self.id_array)


def _ids_array(ids: pl.Series | pa.Array | np.ndarray | list, n: int) -> pa.Array:
    import polars as pl
    import pyarrow.compute as pc

    if isinstance(ids, pl.Series):
        arr = ids.to_arrow()
    elif isinstance(ids, pa.ChunkedArray):
        arr = ids.combine_chunks()
    elif isinstance(ids, pa.Array):
        arr = ids
    else:
        arr = pa.array(np.asarray(ids) if isinstance(ids, np.ndarray) else list(ids))
    if len(arr) != n:
        raise ValueError(f"{len(arr)} ids for {n} vectors; pass one id per row")
    if arr.null_count:
        raise ValueError(f"{arr.null_count} of {n} ids are null; every row needs an id")
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.int64())
    elif (
        pa.types.is_string(arr.type)
        or pa.types.is_large_string(arr.type)
        or pa.types.is_string_view(arr.type)
    ):
        arr = arr.cast(pa.string())
    else:
        raise ValueError(f"ids must be integers or strings, got Arrow type {arr.type}")
    n_unique = pc.count_distinct(arr).as_py()
    if n_unique != n:
        raise ValueError(f"ids must be unique: {n - n_unique} of {n} are repeats")
    return arr


def write_embeddings(
    path: str | Path,
    ids: pl.Series | pa.Array | np.ndarray | list,
    vectors: np.ndarray,
    *,
    kind: Literal["user", "item"],
    distance: str,
    run_id: str,
    columns: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write one embeddings file atomically (temporary file in the same directory, then rename).

    Args:
        path: destination ``.parquet`` file; parent directories are created.
        ids: ``[n]`` unique external ids, integers (stored Int64) or strings (stored String).
        vectors: float32 ``[n, D]``, finite.
        kind: ``user`` or ``item``: the id column becomes ``user_id`` or ``item_id``.
        distance: ``euclidean``, ``cosine`` or ``dot``.
        run_id: recorded in the metadata.
        columns: extra ``[n]`` columns after ``embedding`` (e.g. ``n_train_interactions``).
        metadata: extra schema metadata keys (e.g. ``cold_items``).

    Returns:
        ``path`` as a :class:`Path`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if not run_id:
        raise ValueError("run_id must be a non-empty string")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.dtype != np.float32 or vectors.shape[1] < 1:
        raise ValueError(f"vectors must be float32 [n, D] with D >= 1, got {vectors.dtype} {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError(f"vectors hold {int((~np.isfinite(vectors)).sum())} NaN or infinite values")
    n, dim = vectors.shape
    id_array = _ids_array(ids, n)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(vectors).ravel()), dim)
    extra = {name: pa.array(np.asarray(values)) for name, values in (columns or {}).items()}
    if any(len(values) != n for values in extra.values()):
        raise ValueError(f"extra columns must have {n} rows, got {[len(v) for v in extra.values()]}")
    table = pa.table({f"{kind}_id": id_array, "embedding": embedding, **extra}).replace_schema_metadata(
        {
            b"distance": distance.encode(),
            b"dim": str(dim).encode(),
            b"run_id": str(run_id).encode(),
            **{k.encode(): str(v).encode() for k, v in (metadata or {}).items()},
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_embeddings(path: str | Path) -> EmbeddingTable:
    """Read a file written by :func:`write_embeddings`, checking the contract.

    Raises:
        DataError: the file is missing or not Parquet, the metadata keys are missing or invalid,
            or the columns do not have the contract's names and types. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file {path} does not exist")
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset, and with it pandas
        # (a third of a second), for a single file it reads the same way.
        with pq.ParquetFile(path) as parquet:
            table = parquet.read()
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"embeddings file {path} is not a readable Parquet file: {err}") from None
    meta = table.schema.metadata or {}
    missing = [key.decode() for key in _META_KEYS if key not in meta]
    if missing:
        raise DataError(
            f"embeddings file {path} ({table.num_rows} rows) lacks schema metadata {missing}; "
            "write it with recsys_metric.export.write_embeddings"
        )
    distance = meta[b"distance"].decode()
    if distance not in DISTANCES:
        raise DataError(f"embeddings file {path}: metadata distance {distance!r} is not one of {DISTANCES}")
    try:
        dim = int(meta[b"dim"].decode())
    except ValueError:
        raise DataError(f"embeddings file {path}: metadata dim {meta[b'dim']!r} is not an integer") from None
    id_columns = [name for name in table.column_names if name in ("user_id", "item_id")]
    if len(id_columns) != 1 or "embedding" not in table.column_names:
        raise DataError(
            f"embeddings file {path} has columns {table.column_names}; expected one of user_id/item_id "
            "and embedding"
        )
    id_name = id_columns[0]
    id_type = table.schema.field(id_name).type
    if not (id_type == pa.int64() or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise DataError(f"embeddings file {path}: column {id_name} is {id_type}; expected int64 or string")
    emb_type = table.schema.field("embedding").type
    if not (
        pa.types.is_fixed_size_list(emb_type)
        and emb_type.list_size == dim
        and emb_type.value_type == pa.float32()
    ):
        raise DataError(
            f"embeddings file {path} ({table.num_rows} rows): column embedding is {emb_type}; expected "
            f"fixed_size_list<float32>[{dim}] (metadata dim {dim})"
        )
    column = table.column("embedding")
    if column.null_count:
        raise DataError(
            f"embeddings file {path}: {column.null_count} of {table.num_rows} embeddings are null"
        )
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if len(chunk):
        # The child array sliced to this chunk's rows (no nulls above): ``flatten`` would do the same
        # but imports pyarrow.compute, a tenth of a second of every query process's start.
        values = chunk.values.slice(chunk.offset * dim, len(chunk) * dim)
        if values.null_count:
            raise DataError(f"embeddings file {path}: {values.null_count} embedding values are null")
        # The values buffer as is (zero copy); Array.to_numpy would import pandas (a third of a
        # second for every query process).
        vectors = np.frombuffer(
            values.buffers()[1], dtype=np.float32, count=len(values), offset=values.offset * 4
        ).reshape(-1, dim)
    else:
        vectors = np.empty((0, dim), dtype=np.float32)
    return EmbeddingTable(
        id_array=table.column(id_name),
        vectors=vectors,
        distance=distance,
        dim=dim,
        run_id=meta[b"run_id"].decode(),
        kind=id_name.removesuffix("_id"),
    )


def score_embeddings(user_vectors: np.ndarray, item_vectors: np.ndarray, distance: str) -> np.ndarray:
    """Scores a consumer computes from the two files: higher is better.

    The model's own formula (:func:`recsys_metric.model.distances.score_numpy`, the numpy twin of
    ``Distance.score``), so rankings match the model's: euclidean ``-||u - i||``, cosine
    similarity (a zero vector scores 0), dot product.

    Args:
        user_vectors: float ``[B, D]``.
        item_vectors: float ``[N, D]``.
        distance: ``euclidean``, ``cosine`` or ``dot`` (the files' ``distance`` metadata).

    Returns:
        ``[B, N]``, float32 for float32 input.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    u = np.asarray(user_vectors)
    v = np.asarray(item_vectors)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"user_vectors {u.shape} and item_vectors {v.shape} must be [B, D] and [N, D]")
    return score_numpy(u, v, distance)
