"""Which exported items are cold, and whether they may be served: data the query side reads (no torch).

``item_embeddings.parquet`` of a run has, beside ``item_id`` and ``embedding``:

- column ``n_train_interactions`` (Int64): the interaction rows of the item in the rows the
  exported model trained on (the whole log after a refit); 0 for an item of the item table that
  nobody interacted with, placed by its features alone (:mod:`recsys_metric.model.catalog`);
- schema metadata ``cold_items``: ``eligible`` or ``excluded`` (``data.cold_items``).

Cold items are in the file and in the Annoy index either way; ``excluded`` asks every query
(recommend, similar items, batch tables) to leave them out of its answers:
:func:`excluded_item_nums` gives the item numbers to add to each query's exclusions. Files
written before this column existed read as "every item warm, eligible".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recsys_metric.errors import DataError

N_TRAIN_COLUMN = "n_train_interactions"
"""Column of ``item_embeddings.parquet``: training interaction rows per item."""
COLD_ITEMS_KEY = "cold_items"
"""Schema metadata key of ``item_embeddings.parquet``: ``eligible`` or ``excluded``."""
POLICIES = ("eligible", "excluded")


@dataclass(frozen=True)
class ItemEligibility:
    """Attributes:
    n_train_interactions: int64 ``[n_items]`` in file order (= item numbers), or None for a file
        written without the column.
    policy: ``eligible`` or ``excluded``.
    """

    n_train_interactions: np.ndarray | None
    policy: str

    @property
    def cold(self) -> np.ndarray:
        """int64 item numbers of the items without training interactions (sorted)."""
        if self.n_train_interactions is None:
            return np.empty(0, dtype=np.int64)
        return np.flatnonzero(self.n_train_interactions == 0).astype(np.int64)

    @property
    def excluded(self) -> np.ndarray:
        """int64 item numbers no query may return: the cold ones under ``excluded``, else none."""
        return self.cold if self.policy == "excluded" else np.empty(0, dtype=np.int64)


def read_item_eligibility(path: str | Path) -> ItemEligibility:
    """Read the column and the policy of an ``item_embeddings.parquet`` (only those, not the vectors).

    Raises:
        DataError: the file is unreadable, the column is not integer or has nulls, or the policy is
            not one of ``eligible``/``excluded``.
    """
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as err:
        raise DataError(f"embeddings file {path} is not a readable Parquet file: {err}") from None
    meta = schema.metadata or {}
    policy = meta.get(COLD_ITEMS_KEY.encode(), b"eligible").decode()
    if policy not in POLICIES:
        raise DataError(
            f"embeddings file {path}: metadata {COLD_ITEMS_KEY} {policy!r} is not one of {POLICIES}"
        )
    if N_TRAIN_COLUMN not in schema.names:
        return ItemEligibility(None, policy)
    # ParquetFile, not read_table (which imports pyarrow.dataset and pandas: half a second of
    # every query process's start).
    with pq.ParquetFile(path) as parquet:
        column = parquet.read(columns=[N_TRAIN_COLUMN]).column(0)
    if column.null_count or not str(column.type).startswith(("int", "uint")):
        raise DataError(
            f"embeddings file {path}: column {N_TRAIN_COLUMN} is {column.type} with {column.null_count} "
            "nulls; expected non-null integers (re-export the run)"
        )
    return ItemEligibility(_integers(column), policy)


def _integers(column) -> np.ndarray:
    """int64 copy of a null-free integer Arrow column, from its buffers (``to_numpy`` imports pandas)."""
    chunks = [column] if not hasattr(column, "chunks") else column.chunks
    parts = [
        np.frombuffer(
            chunk.buffers()[1],
            dtype=np.dtype(str(chunk.type)),
            count=len(chunk),
            offset=chunk.offset * np.dtype(str(chunk.type)).itemsize,
        )
        for chunk in chunks
        if len(chunk)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def excluded_item_nums(run_dir: str | Path) -> np.ndarray:
    """int64 item numbers a query of the run in ``run_dir`` must never return (``cold_items: excluded``)."""
    return read_item_eligibility(Path(run_dir) / "item_embeddings.parquet").excluded
