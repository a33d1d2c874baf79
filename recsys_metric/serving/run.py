"""One run directory as serving reads it: both embedding tables, the seen and liked items.

Every reader here takes a :class:`~recsys_metric.serving.verify.RunVerifier` and has it check
the files against the run's manifest before opening them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError
from recsys_metric.export import EmbeddingTable, read_embeddings
from recsys_metric.index import SIDECAR_FILE
from recsys_metric.serving.verify import RunVerifier

USER_EMBEDDINGS = "user_embeddings.parquet"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
INTERACTIONS = "interactions.parquet"
USER_VOCAB = "users.parquet"
ITEM_VOCAB = "items.parquet"
ANNOY_FILE = "items.ann"
MODEL_JSON = "model.json"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class _RunEmbeddings:
    """Both embedding tables of a run, checked against each other and the vocabularies."""

    run_dir: Path
    users: EmbeddingTable
    items: EmbeddingTable

    @property
    def run_id(self) -> str:
        return self.items.run_id

    @property
    def distance(self) -> str:
        return self.items.distance

    @cached_property
    def user_num_of(self) -> dict[Any, int]:
        """``{user_id: user_num}`` (Python ints or strs, as ``Series.to_list`` gives them)."""
        return _num_of(self.users.id_array)

    @cached_property
    def item_num_of(self) -> dict[Any, int]:
        """``{item_id: item_num}``."""
        return _num_of(self.items.id_array)


def _num_of(ids: pa.ChunkedArray) -> dict[Any, int]:
    return dict(zip(ids.to_pylist(), range(len(ids)), strict=True))


def _read_run(run_dir: Path, verifier: RunVerifier | None = None) -> _RunEmbeddings:
    """Both embedding tables (and the vocabularies they must match), verified first."""
    verifier = verifier if verifier is not None else RunVerifier(run_dir, verify=False)
    verifier.check([USER_EMBEDDINGS, ITEM_EMBEDDINGS, USER_VOCAB, ITEM_VOCAB])
    users = read_embeddings(run_dir / USER_EMBEDDINGS)
    items = read_embeddings(run_dir / ITEM_EMBEDDINGS)
    if users.kind != "user" or items.kind != "item":
        raise DataError(
            f"run directory {run_dir}: {USER_EMBEDDINGS} holds {users.kind}_id and {ITEM_EMBEDDINGS} "
            f"holds {items.kind}_id; the files are swapped or mislabelled"
        )
    user_meta = (users.distance, users.dim, users.run_id)
    item_meta = (items.distance, items.dim, items.run_id)
    if user_meta != item_meta:
        raise DataError(
            f"run directory {run_dir}: {USER_EMBEDDINGS} (distance, dim, run_id) = {user_meta} but "
            f"{ITEM_EMBEDDINGS} has {item_meta}; both must come from the same export"
        )
    run = _RunEmbeddings(run_dir=run_dir, users=users, items=items)
    for table, name, num_of in (
        (users, USER_VOCAB, lambda: run.user_num_of),
        (items, ITEM_VOCAB, lambda: run.item_num_of),
    ):
        vocab_path = run_dir / name
        if vocab_path.is_file() and not _same_ids(vocab_path, table, num_of):
            raise DataError(
                f"run directory {run_dir}: the {table.kind} ids of {table.kind}_embeddings.parquet "
                f"({len(table)} rows) are not those of {name} in number order; re-export the run"
            )
    return run


def _same_ids(vocab_path: Path, table: EmbeddingTable, num_of: Any) -> bool:
    """Whether the vocabulary file holds the table's ids, in number order (and is a valid vocabulary).

    The usual answer, yes, comes from pyarrow alone (a query process need not import polars, a
    fifth of a second); anything else (a mismatch, a malformed file) is decided by
    :meth:`Vocabulary.load`, so the errors are the vocabulary's own.
    """
    if _same_ids_fast(vocab_path, table, num_of):
        return True
    from recsys_metric.data.vocab import Vocabulary

    return Vocabulary.load(vocab_path).ids().equals(table.ids)


def _same_ids_fast(vocab_path: Path, table: EmbeddingTable, num_of: Any) -> bool:
    """True only when certain: ``{kind}_num`` is ``0..n-1`` in order, the ids equal the table's
    (Int64 or String, as :class:`Vocabulary` normalises them) and are distinct."""
    kind = table.kind
    try:
        with pq.ParquetFile(vocab_path) as parquet:
            names = parquet.schema_arrow.names
            pairs = [n for n in ("user", "item") if f"{n}_id" in names and f"{n}_num" in names]
            if pairs != [kind]:
                return False
            read = parquet.read(columns=[f"{kind}_id", f"{kind}_num"])
    except (pa.ArrowInvalid, OSError):
        return False
    ids, nums = read.column(0), read.column(1)
    if len(ids) != len(table) or ids.null_count or nums.null_count or not pa.types.is_integer(nums.type):
        return False
    if not np.array_equal(_to_numpy(read, f"{kind}_num", vocab_path), np.arange(len(nums))):
        return False
    if not _equal_ids(ids, table.id_array):
        return False
    return len(num_of()) == len(table)  # distinct ids (the dict serving needs anyway)


def _equal_ids(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Whether two null-free id columns hold the same values in the same order: integers of any
    width as numbers, ``string`` and ``large_string`` (polars writes the latter) as text.

    Compared on the Arrow buffers with numpy: ``cast`` would import ``pyarrow.compute`` (a tenth
    of a second of every query process's start).
    """
    if len(a) != len(b):
        return False
    if len(a) == 0:
        return True
    x, y = (c.combine_chunks() if c.num_chunks != 1 else c.chunk(0) for c in (a, b))
    if pa.types.is_integer(x.type) and pa.types.is_integer(y.type):
        return bool(np.array_equal(_int_values(x), _int_values(y)))
    text = (pa.types.is_string, pa.types.is_large_string)
    if not (any(t(x.type) for t in text) and any(t(y.type) for t in text)):
        return False
    (x_offsets, x_data), (y_offsets, y_data) = _text_buffers(x), _text_buffers(y)
    return bool(np.array_equal(x_offsets, y_offsets)) and x_data == y_data


def _int_values(array: pa.Array) -> np.ndarray:
    dtype = np.dtype(str(array.type))
    return np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )


def _text_buffers(array: pa.Array) -> tuple[np.ndarray, bytes]:
    """int64 offsets from 0 and the UTF-8 bytes of a null-free string or large_string array."""
    dtype = np.dtype(np.int64 if pa.types.is_large_string(array.type) else np.int32)
    offsets = np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array) + 1, offset=array.offset * dtype.itemsize
    ).astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    data = array.buffers()[2]
    return offsets - start, (data.to_pybytes()[start:end] if data is not None else b"")


def _read_interactions(
    run_dir: Path, n_users: int, n_items: int, *, liked: bool, verifier: RunVerifier | None = None
) -> tuple[InteractionMatrix, InteractionMatrix | None]:
    """Seen items (every row) and, with ``liked``, liked items (``label == 1``) as CSR matrices.

    Read with pyarrow, whose freed buffers go back to the OS on request (``release_unused``), and
    sorted in place: 20M pairs need about 0.4 GB at the peak, not the 1.2 GB that
    ``InteractionMatrix.from_pairs`` (int64 copies of both columns, a key cache) takes.
    """
    if verifier is not None:
        verifier.check([INTERACTIONS])
    path = run_dir / INTERACTIONS
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: the run's interactions define the seen items to exclude; "
            "use a complete run directory (or exclude_seen=False for batch tables)"
        )
    columns = ["user_num", "item_num"] + (["label"] if liked else [])
    try:
        # ParquetFile, not read_table, which imports pyarrow.dataset and pandas with it.
        with pq.ParquetFile(path) as parquet:
            names = parquet.schema_arrow.names
            missing = [c for c in columns if c not in names]
            if missing:
                raise DataError(
                    f"{path} ({parquet.metadata.num_rows} rows) lacks the columns {missing}; re-export the run"
                )
            table = parquet.read(columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file with the columns {columns}: {err}") from None
    users = _to_numpy(table, "user_num", path)
    items = _to_numpy(table, "item_num", path)
    keep = _to_numpy(table, "label", path) == 1 if liked else None
    del table
    for name, values, bound in (("user_num", users, n_users), ("item_num", items, n_items)):
        if values.size and (
            not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= bound
        ):
            raise DataError(
                f"{path}: column {name} ({values.size} rows, {values.dtype}) holds values outside "
                f"[0, {bound}); the interactions do not belong to this run's vocabularies"
            )
    seen = _csr(users, items, n_users, n_items)
    liked_matrix = _csr(users[keep], items[keep], n_users, n_items) if keep is not None else None
    del users, items, keep
    pa.default_memory_pool().release_unused()
    return seen, liked_matrix


def _to_numpy(table: pa.Table, name: str, path: Path) -> np.ndarray:
    """A column without nulls as numpy: integers straight from the Arrow buffer (pyarrow's own
    ``to_numpy`` imports pandas, a third of a second for every query process), others through it."""
    column = table.column(name)
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if array.null_count:
        raise DataError(
            f"{path}: column {name} has {array.null_count} nulls in {len(array)} rows; re-export the run"
        )
    if pa.types.is_integer(array.type):
        dtype = np.dtype(str(array.type))
        return np.frombuffer(
            array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
        )
    return array.to_numpy(zero_copy_only=False)


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> InteractionMatrix:
    """Binary CSR of (user, item) pairs (repeats collapse), from one int64 key array sorted in place."""
    keys = users.astype(np.int64)
    keys *= n_items
    keys += items
    keys.sort()
    if keys.size:
        distinct = np.empty(keys.size, dtype=bool)
        distinct[0] = True
        np.not_equal(keys[1:], keys[:-1], out=distinct[1:])
        keys = keys[distinct]
    indptr = np.searchsorted(keys, np.arange(n_users + 1, dtype=np.int64) * n_items)
    np.remainder(keys, n_items, out=keys)
    return InteractionMatrix(indptr=indptr, indices=keys.astype(np.int32), n_users=n_users, n_items=n_items)


def _annoy_serves(run_dir: Path) -> bool:
    """The run has an Annoy index that met its recall floor (or was built before that was recorded)."""
    if not (run_dir / ANNOY_FILE).is_file():
        return False
    sidecar = run_dir / SIDECAR_FILE
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return True  # AnnoyIndex.load reports a missing or broken sidecar with the file's name
    return meta.get("serve", "annoy") != "exact"
