"""Datasets of the quality benchmark, each cut into one train / test split by one protocol.

Real datasets are read from ``bench.common.SHARED_DATASETS`` and never copied into the repository;
a loader raises :class:`DatasetUnavailable` when its files are absent so that the benchmark can skip
the dataset and say why. The bundled synthetic log (``data/interactions.parquet``) comes with the
project.

Protocol of the random splits (the one behind the reference figures in the shared datasets
README): liked pairs only are held out; a user with at least ``min_liked`` (5) liked items has a
seeded random ``test_fraction`` (20%, rounded half up) of them held out; a user with fewer keeps
them all in training and is not evaluated. Every other interaction of the user (neutral,
disliked) stays in training, so it is excluded from the ranking like any seen item. Ranking is
over the whole catalog. The bundled log is split by time instead (the pipeline's default).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from bench.common import ROOT, SHARED_DATASETS
from recsys_metric.config import LabelConfig
from recsys_metric.data.matrix import InteractionMatrix

logger = logging.getLogger(__name__)

ML_LATEST_SMALL = SHARED_DATASETS / "ml-latest-small"
CITEULIKE_A = SHARED_DATASETS / "citeulike-a"
BUNDLED = ROOT / "data"
LIKE_THRESHOLD = 4.0
DISLIKE_THRESHOLD = 2.0


class DatasetUnavailable(FileNotFoundError):
    """The files of a benchmark dataset are not on this machine; the benchmark skips it."""


@dataclass(frozen=True)
class BenchDataset:
    """One dataset cut into train and test, all matrices ``[n_users, n_items]`` over dense numbers.

    Attributes:
        name: dataset name as shown in result tables.
        n_users, n_items: sizes of the user and item vocabularies (the full catalog is ranked).
        train: every training interaction whatever its label; excluded from each user's ranking.
        train_liked: liked training pairs, what the models are fitted on.
        train_disliked: explicitly disliked training pairs; ``None`` for implicit feedback.
        test: held-out liked pairs, the relevant items of the evaluation.
        item_features: one row per item with ``item_num`` (Int32), ``item_id`` and feature
            columns (``genres``: list[str], ``tags``: list[Int32], ...); ``None`` when there are none.
        split: how ``test`` was cut, in words (for the result tables).
        split_method: the same as ``SplitConfig.method``: ``user_holdout`` (a random share of
            each user's items) or ``temporal`` (the newest events); our model is trained for it
            (``train.user_balance: auto``).
    """

    name: str
    n_users: int
    n_items: int
    train: InteractionMatrix
    train_liked: InteractionMatrix
    train_disliked: InteractionMatrix | None
    test: InteractionMatrix
    item_features: pl.DataFrame | None = None
    split: str = ""
    split_method: str = "user_holdout"

    def summary(self) -> dict[str, int | str]:
        """Sizes for the result files."""
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train": self.train.nnz,
            "n_train_liked": self.train_liked.nnz,
            "n_train_disliked": self.train_disliked.nnz if self.train_disliked is not None else 0,
            "n_test": self.test.nnz,
            "n_test_users": int((self.test.row_lengths() > 0).sum()),
            "split": self.split,
        }

    def validation_split(self, test_fraction: float = 0.2, min_liked: int = 5, seed: int = 1) -> BenchDataset:
        """A split of the TRAINING data for model selection: the test set is never looked at.

        A random ``test_fraction`` of each user's liked training pairs becomes the validation
        "test"; they leave ``train`` and ``train_liked``, everything else stays.
        """
        inner_liked, val = holdout_split(self.train_liked, test_fraction, min_liked, seed)
        return replace(
            self,
            name=f"{self.name} (validation)",
            train=difference(self.train, val),
            train_liked=inner_liked,
            test=val,
            split=f"validation: random {test_fraction:.0%} of each user's liked training items, seed {seed}",
        )


def difference(a: InteractionMatrix, b: InteractionMatrix) -> InteractionMatrix:
    """Entries of ``a`` that are not in ``b`` (same shape)."""
    users = np.repeat(np.arange(a.n_users, dtype=np.int64), a.row_lengths())
    keep = ~b.contains(users, a.indices)
    return InteractionMatrix.from_pairs(users[keep], a.indices[keep], a.n_users, a.n_items)


def holdout_split(
    liked: InteractionMatrix, test_fraction: float, min_liked: int, seed: int
) -> tuple[InteractionMatrix, InteractionMatrix]:
    """Hold out a seeded random share of each user's entries.

    Users with at least ``min_liked`` entries lose ``round_half_up(test_fraction * n)`` of them
    (at least 1) to the test side; others keep all. Vectorised: one random key per entry, then the
    rank of the key inside its user's row decides.

    Returns:
        ``(train, test)``, disjoint, together equal to ``liked``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    lengths = liked.row_lengths()
    users = np.repeat(np.arange(liked.n_users, dtype=np.int64), lengths)
    keys = np.random.default_rng(seed).random(liked.nnz)
    order = np.lexsort((keys, users))
    rank = np.empty(liked.nnz, dtype=np.int64)
    rank[order] = np.arange(liked.nnz, dtype=np.int64) - np.repeat(liked.indptr[:-1], lengths)
    n_test = np.where(
        lengths >= min_liked, np.maximum(1, np.floor(lengths * test_fraction + 0.5).astype(np.int64)), 0
    )
    is_test = rank < n_test[users]
    items = liked.indices
    return (
        InteractionMatrix.from_pairs(users[~is_test], items[~is_test], liked.n_users, liked.n_items),
        InteractionMatrix.from_pairs(users[is_test], items[is_test], liked.n_users, liked.n_items),
    )


def random_split_dataset(
    name: str,
    n_users: int,
    n_items: int,
    users: np.ndarray,
    items: np.ndarray,
    label: np.ndarray,
    item_features: pl.DataFrame | None,
    *,
    test_fraction: float = 0.2,
    min_liked: int = 5,
    seed: int = 0,
    explicit: bool = True,
) -> BenchDataset:
    """Cut labelled pairs (label 1 liked, 0 neutral, -1 disliked) by the random per-user protocol."""
    everything = InteractionMatrix.from_pairs(users, items, n_users, n_items)
    liked = InteractionMatrix.from_pairs(users[label == 1], items[label == 1], n_users, n_items)
    train_liked, test = holdout_split(liked, test_fraction, min_liked, seed)
    disliked = (
        InteractionMatrix.from_pairs(users[label == -1], items[label == -1], n_users, n_items)
        if explicit
        else None
    )
    return BenchDataset(
        name=name,
        n_users=n_users,
        n_items=n_items,
        train=difference(everything, test),
        train_liked=train_liked,
        train_disliked=disliked,
        test=test,
        item_features=item_features,
        split=(
            f"random {test_fraction:.0%} of each user's liked items (users with >= {min_liked} liked), seed {seed}"
        ),
    )


def _require(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetUnavailable(f"missing {', '.join(missing)}")


def _read_movielens_ratings(path: Path) -> tuple[pl.DataFrame, str]:
    """``user_id``, ``item_id``, ``rating`` of ``ratings.csv`` and which reader produced them."""
    try:
        from recsys_metric.config import DataConfig
        from recsys_metric.data.validate import read_interactions
    except ImportError:
        frame = pl.read_csv(
            path, schema_overrides={"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float32}
        ).select(pl.col("userId").alias("user_id"), pl.col("movieId").alias("item_id"), "rating")
        return frame, "polars.read_csv (recsys_metric.data.validate not available)"
    frame, _report = read_interactions(
        path, DataConfig(format="movielens-csv", rating_scale=(0.5, 5.0)), rejects_path=None
    )
    return frame.select("user_id", "item_id", "rating"), "recsys_metric.data.validate.read_interactions"


def _labels(rating: pl.Expr) -> pl.Expr:
    return (
        pl.when(rating >= LIKE_THRESHOLD)
        .then(1)
        .when(rating <= DISLIKE_THRESHOLD)
        .then(-1)
        .otherwise(0)
        .cast(pl.Int8)
        .alias("label")
    )


def load_ml_latest_small(root: Path = ML_LATEST_SMALL, seed: int = 0) -> BenchDataset:
    """MovieLens ml-latest-small: liked = rating >= 4, disliked = rating <= 2, random 20% holdout.

    Items are the movies with at least one rating (9,724); features are the ``movies.csv`` genres
    (``(no genres listed)`` becomes an empty list).
    """
    ratings_path, movies_path = root / "ratings.csv", root / "movies.csv"
    _require(ratings_path)
    ratings, reader = _read_movielens_ratings(ratings_path)
    logger.info("ml-latest-small: read %d ratings with %s", ratings.height, reader)
    ratings = ratings.unique(["user_id", "item_id"], keep="last", maintain_order=True)
    user_ids = ratings["user_id"].unique().sort()
    item_ids = ratings["item_id"].unique().sort()
    users = np.searchsorted(user_ids.to_numpy(), ratings["user_id"].to_numpy())
    items = np.searchsorted(item_ids.to_numpy(), ratings["item_id"].to_numpy())
    label = ratings.select(_labels(pl.col("rating")))["label"].to_numpy()
    features = None
    if movies_path.exists():
        movies = pl.read_csv(movies_path, schema_overrides={"movieId": pl.Int64})
        features = (
            pl.DataFrame({"item_num": np.arange(item_ids.len(), dtype=np.int32), "item_id": item_ids})
            .join(movies.rename({"movieId": "item_id"}), on="item_id", how="left")
            .with_columns(
                pl.col("genres")
                .str.split("|")
                .list.filter(pl.element() != "(no genres listed)")
                .fill_null([])
            )
            .select("item_num", "item_id", "title", "genres")
        )
    return random_split_dataset(
        "ml-latest-small", user_ids.len(), item_ids.len(), users, items, label, features, seed=seed
    )


def read_dat_lists(path: Path, name: str) -> tuple[pl.DataFrame, int]:
    """Read a CiteULike ``.dat`` file: line n = ``count id id ...``.

    Returns:
        ``(pairs, n_lines)``: ``row`` (Int32, 0-based line number) and ``value`` (Int32), one row
        per listed id; and the number of lines (a line with count 0 has no pair).

    Raises:
        ValueError: a line's count differs from the number of ids on it.
    """
    lines = pl.read_csv(
        path,
        has_header=False,
        separator="\x1f",
        quote_char=None,
        new_columns=["line"],
        schema={"line": pl.String},
    )
    tokens = (
        lines.with_row_index("row")
        .with_columns(pl.col("line").str.strip_chars().str.split(" "))
        .with_columns(
            pl.col("line").list.first().cast(pl.Int64).alias("count"),
            pl.col("line").list.slice(1).alias("value"),
        )
    )
    bad = tokens.filter(pl.col("count") != pl.col("value").list.len())
    if bad.height:
        first = bad.row(0, named=True)
        raise ValueError(
            f"{path}: {bad.height} lines of {name} have a count that differs from the number of ids "
            f"(first: line {first['row'] + 1} says {first['count']}, lists {len(first['value'])})"
        )
    pairs = (
        tokens.select("row", "value")
        .explode("value")
        .drop_nulls("value")
        .select(pl.col("row").cast(pl.Int32), pl.col("value").cast(pl.Int32))
    )
    return pairs, lines.height


def load_citeulike_a(root: Path = CITEULIKE_A, seed: int = 0) -> BenchDataset:
    """CiteULike-a: every saved article is liked (implicit feedback), random 20% holdout.

    User n is line n of ``users.dat``; item ids are the 0-based article numbers, used as item
    numbers directly. Features: ``tags`` (list[Int32] tag ids) from ``item-tag.dat``.
    """
    users_path, tags_path = root / "users.dat", root / "item-tag.dat"
    _require(users_path)
    pairs, n_users = read_dat_lists(users_path, "users.dat")
    n_items = int(pairs["value"].max()) + 1 if pairs.height else 0
    features = None
    if tags_path.exists():
        item_tags, n_tag_lines = read_dat_lists(tags_path, "item-tag.dat")
        n_items = max(n_items, n_tag_lines)
        features = (
            pl.DataFrame({"item_num": np.arange(n_items, dtype=np.int32)})
            .join(
                item_tags.group_by("row").agg(pl.col("value").alias("tags")).rename({"row": "item_num"}),
                on="item_num",
                how="left",
            )
            .with_columns(pl.col("item_num").cast(pl.Int64).alias("item_id"), pl.col("tags").fill_null([]))
            .select("item_num", "item_id", "tags")
            .sort("item_num")
        )
    users = pairs["row"].to_numpy()
    items = pairs["value"].to_numpy()
    label = np.ones(users.shape[0], dtype=np.int8)
    return random_split_dataset(
        "citeulike-a", n_users, n_items, users, items, label, features, seed=seed, explicit=False
    )


def load_bundled(root: Path = BUNDLED, test_fraction: float = 0.2) -> BenchDataset:
    """The project's bundled synthetic log, split by time: the newest ``test_fraction`` of events is test.

    Test rows whose user or item never occurs in training are dropped. Liked = rating >= 4 (or a
    liked event); uses ``recsys_metric.data.prepare.prepare_dataset`` when it runs, else reads
    the Parquet file with polars and applies the same rules.
    """
    source = root / "interactions.parquet"
    _require(source)
    try:
        frame, how = _bundled_with_pipeline(source, test_fraction)
    except ImportError as err:
        logger.info("bundled: prepare_dataset unavailable (%s); reading %s with polars", err, source)
        frame, how = (
            _bundled_with_polars(source, test_fraction),
            "polars (recsys_metric.data.prepare not available)",
        )
    n_users = int(frame["user_num"].max()) + 1
    n_items = int(frame["item_num"].max()) + 1
    train = frame.filter(pl.col("split") == "train")
    test = frame.filter((pl.col("split") == "test") & (pl.col("label") == 1))

    def matrix(part: pl.DataFrame) -> InteractionMatrix:
        return InteractionMatrix.from_pairs(
            part["user_num"].to_numpy(), part["item_num"].to_numpy(), n_users, n_items
        )

    disliked = train.filter(pl.col("label") == -1)
    features = _bundled_features(root / "items.parquet", frame)
    return BenchDataset(
        name="bundled",
        n_users=n_users,
        n_items=n_items,
        train=matrix(train),
        train_liked=matrix(train.filter(pl.col("label") == 1)),
        train_disliked=matrix(disliked) if disliked.height else None,
        test=matrix(test),
        item_features=features,
        split=f"temporal: newest {test_fraction:.0%} of events, unseen users/items dropped ({how})",
        split_method="temporal",
    )


def _bundled_with_pipeline(source: Path, test_fraction: float) -> tuple[pl.DataFrame, str]:
    """``user_num, item_num, label, split, item_id`` frame from the project's own data pipeline."""
    from recsys_metric.config import Config, SplitConfig
    from recsys_metric.data.prepare import prepare_dataset

    config = Config(split=SplitConfig(method="temporal", test_fraction=test_fraction))
    with tempfile.TemporaryDirectory(prefix="bench_bundled_") as out:
        prepared = prepare_dataset(source, out, config, triplets=False)
        frame = prepared.interactions.select("user_num", "item_num", "label", pl.col("split").cast(pl.String))
        ids = prepared.items.to_frame()
    return frame.join(ids, on="item_num", how="left"), "recsys_metric.data.prepare.prepare_dataset"


def _bundled_with_polars(source: Path, test_fraction: float) -> pl.DataFrame:
    """Same rules as the pipeline's temporal split, with polars only."""
    log = pl.read_parquet(source)
    for col in ("user_id", "item_id", "timestamp"):
        if col not in log.columns:
            raise ValueError(f"{source}: no column {col!r} (columns: {log.columns}); cannot split by time")
    labels = LabelConfig()
    if "rating" in log.columns:
        label = _labels(pl.col("rating"))
    elif "event" in log.columns:
        label = (
            pl.when(pl.col("event").is_in(list(labels.liked_events)))
            .then(1)
            .when(pl.col("event").is_in(list(labels.disliked_events)))
            .then(-1)
            .otherwise(0)
            .cast(pl.Int8)
            .alias("label")
        )
    else:
        label = pl.lit(1, dtype=pl.Int8).alias("label")
    log = log.select("user_id", "item_id", "timestamp", label).sort("timestamp", maintain_order=True)
    n_train = log.height - int(round(log.height * test_fraction))
    train = log.head(n_train)
    user_ids = train["user_id"].unique().sort()
    item_ids = train["item_id"].unique().sort()
    users = pl.DataFrame({"user_id": user_ids, "user_num": np.arange(user_ids.len(), dtype=np.int32)})
    items = pl.DataFrame({"item_id": item_ids, "item_num": np.arange(item_ids.len(), dtype=np.int32)})
    split = pl.when(pl.int_range(pl.len()) < n_train).then(pl.lit("train")).otherwise(pl.lit("test"))
    return (
        log.with_columns(split.alias("split"))
        .join(users, on="user_id", how="inner")
        .join(items, on="item_id", how="inner")
        .select("user_num", "item_num", "label", "split", "item_id")
    )


def _bundled_features(path: Path, frame: pl.DataFrame) -> pl.DataFrame | None:
    if not path.exists():
        return None
    items = pl.read_parquet(path)
    if "item_id" not in items.columns:
        return None
    vocab = frame.select("item_num", "item_id").unique("item_num").sort("item_num")
    features = [c for c in items.columns if c not in ("item_id", "item_num")]
    return vocab.join(items.select("item_id", *features), on="item_id", how="left")


LOADERS = {
    "bundled": load_bundled,
    "ml-latest-small": load_ml_latest_small,
    "citeulike-a": load_citeulike_a,
}
"""Dataset name -> loader, in the order the benchmark runs them."""
