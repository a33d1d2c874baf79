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
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_metric.config import Config
from recsys_metric.data.split import SplitInfo, split_interactions
from recsys_metric.data.validate import ValidationReport, read_interactions
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.triplets import (
    TripletArrays,
    build_triplets,
    label_interactions,
    triplet_stats,
    write_triplets,
)

logger = logging.getLogger(__name__)

SPLIT_ENUM = pl.Enum(["train", "test", "test_dropped"])
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
    """

    interactions: pl.DataFrame
    users: Vocabulary
    items: Vocabulary
    validation: ValidationReport
    split: SplitInfo
    triplets: TripletArrays | None
    paths: PreparedPaths
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def train(self) -> pl.DataFrame:
        return self.interactions.filter(pl.col("split") == "train")

    @property
    def test(self) -> pl.DataFrame:
        return self.interactions.filter(pl.col("split") == "test")

    def report(self) -> dict[str, Any]:
        """Counts of every stage, JSON-serialisable (written to ``data_report.json``)."""
        labels = self.interactions["label"].value_counts()
        label_counts = {int(k): int(v) for k, v in zip(labels["label"], labels["count"], strict=True)}
        out: dict[str, Any] = {
            "validation": self.validation.to_dict(),
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
            out["triplets"] = triplet_stats(self.triplets)
        return out


def split_column(n_rows: int, train_rows: np.ndarray, test_rows: np.ndarray) -> pl.Series:
    """``split`` Enum column for ``n_rows`` rows given the row positions kept in train and test.

    Rows in neither are ``test_dropped`` (test rows whose user or item is unseen in training).
    """
    codes = np.full(n_rows, 2, dtype=np.uint8)
    codes[train_rows] = 0
    codes[test_rows] = 1
    return pl.Series("split", codes).replace_strict(
        {0: "train", 1: "test", 2: "test_dropped"}, return_dtype=SPLIT_ENUM
    )


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
    config = config or Config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = PreparedPaths.in_dir(out, triplets=triplets)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    valid, validation = read_interactions(source, config.data, rejects_path=paths.rejects)
    seconds["read_validate"] = time.perf_counter() - t

    t = time.perf_counter()
    users = Vocabulary.from_ids(valid["user_id"], name="user")
    items = Vocabulary.from_ids(valid["item_id"], name="item")
    encoded = items.encode(users.encode(valid))
    labelled = label_interactions(encoded, config.label)
    keep = [c for c in _KEEP_COLUMNS if c in labelled.columns]
    full = labelled.select(keep).with_row_index("_row")
    users.save(paths.users)
    items.save(paths.items)
    seconds["vocab_encode_label"] = time.perf_counter() - t

    t = time.perf_counter()
    split = split_interactions(full, config.split)
    full = full.drop("_row").with_columns(
        split_column(full.height, split.train["_row"].to_numpy(), split.test["_row"].to_numpy())
    )
    seconds["split"] = time.perf_counter() - t

    t = time.perf_counter()
    full.write_parquet(paths.interactions, compression="lz4", statistics=False)
    seconds["write_interactions"] = time.perf_counter() - t

    arrays: TripletArrays | None = None
    if triplets:
        t = time.perf_counter()
        arrays = build_triplets(split.train, len(users), len(items), config.triplets)
        write_triplets(arrays, users.ids(), items.ids(), paths.triplets)
        seconds["triplets"] = time.perf_counter() - t

    prepared = PreparedData(
        interactions=full,
        users=users,
        items=items,
        validation=validation,
        split=split.info,
        triplets=arrays,
        paths=paths,
        seconds=seconds,
    )
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
