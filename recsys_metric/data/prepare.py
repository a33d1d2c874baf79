"""From a raw interaction log to the files training reads: the data half of the pipeline.

``prepare_dataset`` chains read + validate (quarantine) -> vocabularies -> encode -> label ->
split -> triplets and writes every result to ``out_dir``::

    out_dir/
      rejects.parquet        quarantined input rows with a ``reason``
      users.parquet          user vocabulary  (user_id, user_num)
      items.parquet          item vocabulary  (item_id, item_num)
      interactions.parquet   every valid row: user_num, item_num, label, split [, timestamp, rating, weight]
      triplets.parquet       user_id, liked_item_id, unliked_item_id, negative_source (from training rows only)
      data_report.json       counts of every stage (what ``inspect-data`` prints)

``split`` is ``"train"``, ``"test"`` or ``"test_dropped"`` (a test row whose user or item never
appears in training: kept for the record and for the full refit, never evaluated, never trained
on in the holdout model).

Speed is measured by ``python -m bench.ingest`` (20M rows). Integer ids are mapped through
direct tables, one sort of the training pairs serves every triplet structure, and exact duplicates
are found and the Parquet files written in background threads, overlapping the main thread's
vocabularies, labels and triplets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys_metric.config import Config
from recsys_metric.data.split import (
    SPLIT_DROPPED,
    SPLIT_NAMES,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SplitInfo,
    split_codes,
)
from recsys_metric.data.validate import ValidationReport, drop_rows, duplicate_rows, read_interactions
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.triplets import (
    TripletArrays,
    build_triplets,
    label_interactions,
    triplet_stats,
    write_triplets,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

SPLIT_ENUM = pl.Enum(list(SPLIT_NAMES))
# Rows per block for element-wise numpy work on whole columns (temporaries stay small and reused).
_BLOCK = 1 << 20
_KEEP_COLUMNS = ("user_num", "item_num", "label", "timestamp", "rating", "weight")


@dataclass(frozen=True)
class PreparedPaths:
    """Where ``prepare_dataset`` wrote each file."""

    out_dir: Path
    rejects: Path
    users: Path
    items: Path
    interactions: Path
    triplets: Path | None
    report: Path

    @classmethod
    def in_dir(cls, out_dir: Path, *, triplets: bool = True) -> PreparedPaths:
        return cls(
            out_dir=out_dir,
            rejects=out_dir / "rejects.parquet",
            users=out_dir / "users.parquet",
            items=out_dir / "items.parquet",
            interactions=out_dir / "interactions.parquet",
            triplets=out_dir / "triplets.parquet" if triplets else None,
            report=out_dir / "data_report.json",
        )


@dataclass
class PreparedData:
    """The prepared dataset, in memory and on disk.

    ``interactions`` holds every valid row (``user_num``, ``item_num`` Int32, ``label`` Int8,
    ``split`` Enum, and timestamp/rating/weight when the log has them).

    ``seconds`` holds wall seconds per stage. ``deduplicate``, ``write_interactions`` and
    ``write_triplets`` run in background threads and overlap the stages after them (so the stages
    add up to more than the total); ``wait_for_writes`` is what the main thread waited for them.
    """

    interactions: pl.DataFrame
    users: Vocabulary
    items: Vocabulary
    validation: ValidationReport
    split: SplitInfo
    triplets: TripletArrays | None
    paths: PreparedPaths
    seconds: dict[str, float] = field(default_factory=dict)
    _triplet_stats: tuple[TripletArrays, dict[str, Any]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def train(self) -> pl.DataFrame:
        return self.interactions.filter(pl.col("split") == "train")

    @property
    def test(self) -> pl.DataFrame:
        return self.interactions.filter(pl.col("split") == "test")

    def report(self) -> dict[str, Any]:
        """Counts of every stage, JSON-serialisable (written to ``data_report.json``)."""
        label_counts = _label_counts(self.interactions["label"])
        out: dict[str, Any] = {
            # Relative to the prepared directory: run directories are renamed when finalized.
            "validation": {**self.validation.to_dict(), "rejects_path": self.paths.rejects.name},
            "n_users": len(self.users),
            "n_items": len(self.items),
            "n_interactions": self.interactions.height,
            "labels": {
                "liked": label_counts.get(1, 0),
                "neutral": label_counts.get(0, 0),
                "unliked": label_counts.get(-1, 0),
            },
            "split": self.split.to_dict(),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }
        if self.triplets is not None:
            # Counting the distinct liked pairs sorts every triplet: once per PreparedData is enough.
            if self._triplet_stats is None or self._triplet_stats[0] is not self.triplets:
                self._triplet_stats = (self.triplets, triplet_stats(self.triplets))
            out["triplets"] = dict(self._triplet_stats[1])
        return out


def _label_counts(labels: pl.Series) -> dict[int, int]:
    """``{label: rows}`` for the labels present (nulls not counted)."""
    values = labels.drop_nulls()
    if values.dtype == pl.Int8 and values.len():
        # bincount over the 256 byte values instead of a hash group-by (20M rows: 0.03 s vs 0.2 s),
        # chunk by chunk because bincount first copies its input to int64.
        codes = values.to_numpy().view(np.uint8)
        counts = np.zeros(256, dtype=np.int64)
        for lo in range(0, codes.size, _BLOCK):
            counts += np.bincount(codes[lo : lo + _BLOCK], minlength=256)
        return {int(np.int8(np.uint8(b))): int(c) for b, c in enumerate(counts.tolist()) if c}
    table = values.value_counts()
    return {int(k): int(v) for k, v in zip(table[labels.name], table["count"], strict=True)}


def _write_interactions(frame: pl.DataFrame, path: Path) -> None:
    """Write ``interactions.parquet``: lz4 but for the timestamps, no statistics, ``split`` as a dictionary.

    pyarrow, because polars' writer can set neither per-column codecs nor dictionaries: it hashes
    ``item_num`` into a dictionary (0.45 s for 20M rows here) and lz4 saves little on millisecond
    timestamps (0.3 s for 22%). 0.9 s of CPU for 20M rows against 1.4 s, for a file 20% larger.
    """
    table = frame.to_arrow()
    codecs = {name: "none" if name == "timestamp" else "lz4" for name in table.column_names}
    pq.write_table(table, path, compression=codecs, use_dictionary=["split"], write_statistics=False)


def _timed(write: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Run ``write(*args, **kwargs)``; its duration in seconds."""
    return _timed_result(write, *args, **kwargs)[0]


def _timed_result(work: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """Run ``work(*args, **kwargs)``; its duration in seconds and its result."""
    t = time.perf_counter()
    result = work(*args, **kwargs)
    return time.perf_counter() - t, result


def split_column(n_rows: int, train_rows: np.ndarray, test_rows: np.ndarray) -> pl.Series:
    """``split`` Enum column for ``n_rows`` rows given the row positions kept in train and test.

    Rows in neither are ``test_dropped`` (test rows whose user or item is unseen in training).
    """
    codes = np.full(n_rows, SPLIT_DROPPED, dtype=np.uint8)
    codes[train_rows] = SPLIT_TRAIN
    codes[test_rows] = SPLIT_TEST
    return _split_series(codes)


def _split_series(codes: np.ndarray) -> pl.Series:
    """``split`` Enum column from :func:`~recsys_metric.data.split.split_codes` codes.

    A gather from the three categories: the codes are the Enum's physical values, and this is 3x
    cheaper than ``replace_strict`` (0.07 s vs 0.24 s for 20M rows here).
    """
    return pl.Series("split", SPLIT_ENUM.categories, dtype=SPLIT_ENUM).gather(codes)


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    config: Config | None = None,
    *,
    triplets: bool = True,
) -> PreparedData:
    """Read, validate, encode, label, split and sample triplets; write everything to ``out_dir``.

    Args:
        source: interaction log (file, directory of Parquet partitions, or glob).
        out_dir: directory for the prepared files (created).
        config: pipeline config (``data``, ``label``, ``split``, ``triplets`` sections are used).
        triplets: also build and write ``triplets.parquet``.

    Raises:
        DataError: unusable input (missing columns, too many rejects, empty, single user/item...).
    """
    return _prepare(source, out_dir, config or Config(), triplets)


def _prepare(source: str | Path, out_dir: str | Path, config: Config, triplets: bool) -> PreparedData:
    """:func:`prepare_dataset` with the config resolved."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = PreparedPaths.in_dir(out, triplets=triplets)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    # Exact duplicates are found here rather than in validation, in a background thread while the
    # vocabularies, numbers and labels are computed: none of those depend on them (a duplicate has
    # the ids and the label of the row it repeats), so the finished frame just drops the same rows.
    no_dedup = config.data.model_copy(update={"deduplicate": False})
    valid, validation = read_interactions(source, no_dedup, rejects_path=paths.rejects)
    seconds["read_validate"] = time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare-dedup") as background:
        duplicates = (
            background.submit(_timed_result, duplicate_rows, valid) if config.data.deduplicate else None
        )
        t = time.perf_counter()
        users = Vocabulary.from_ids(valid["user_id"], name="user")
        items = Vocabulary.from_ids(valid["item_id"], name="item")
        encoded = items.encode(users.encode(valid))
        del valid
        labelled = label_interactions(encoded, config.label)
        del encoded
        # Not ``select``: the new columns are one chunk each and the read ones one per row group, and
        # ``select`` would copy the read ones into one chunk (240 MB of fresh memory for 20M rows).
        full = pl.DataFrame([labelled.get_column(c) for c in _KEEP_COLUMNS if c in labelled.columns])
        del labelled
        users.save(paths.users)
        items.save(paths.items)
        seconds["vocab_encode_label"] = time.perf_counter() - t
        if duplicates is not None:
            seconds["deduplicate"], drop = duplicates.result()
            full = drop_rows(full, drop)
            validation = dataclasses.replace(
                validation, n_duplicates=drop.len(), n_valid=validation.n_valid - drop.len()
            )

    t = time.perf_counter()
    codes, split = split_codes(full, config.split)
    full = full.with_columns(_split_series(codes))
    seconds["split"] = time.perf_counter() - t

    # The Parquet writes run in background threads (pyarrow releases the GIL) while the main thread
    # builds the triplets and the report: on two cores that hides most of their 1-2 s.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare-write") as writers:
        interactions_written = writers.submit(_timed, _write_interactions, full, paths.interactions)
        arrays: TripletArrays | None = None
        triplets_written: Future[float] | None = None
        if triplets:
            t = time.perf_counter()
            train = full.select("user_num", "item_num", "label").filter(pl.Series(codes == SPLIT_TRAIN))
            del codes
            arrays = build_triplets(train, len(users), len(items), config.triplets)
            del train
            seconds["triplets"] = time.perf_counter() - t
            triplets_written = writers.submit(
                _timed, write_triplets, arrays, users.ids(), items.ids(), paths.triplets
            )
        prepared = PreparedData(
            interactions=full,
            users=users,
            items=items,
            validation=validation,
            split=split,
            triplets=arrays,
            paths=paths,
            seconds=seconds,
        )
        prepared.report()  # counts the triplets while the files are written; the counts are cached
        t = time.perf_counter()
        seconds["write_interactions"] = interactions_written.result()
        if triplets_written is not None:
            seconds["write_triplets"] = triplets_written.result()
        seconds["wait_for_writes"] = time.perf_counter() - t
    paths.report.write_text(json.dumps(prepared.report(), indent=2, default=str))
    logger.info(
        "prepared %d interactions (%d users, %d items, %d rejected) into %s",
        full.height,
        len(users),
        len(items),
        validation.n_rejected,
        out,
    )
    return prepared
