"""Read item tables (the ``--items`` file): one row per item, ``item_id`` plus side-feature columns.

What :func:`read_item_table` accepts, decided from each file's name and header:

- Parquet (``*.parquet``): read as is. Tag columns may be ``list[str]``/``list[int]`` columns or
  delimited strings (``"Action|Comedy"``) named in ``tag_columns``.
- MovieLens ``movies.csv`` (header ``movieId,title,genres``): ``item_id`` (Int64), ``title`` and
  ``genres`` as a list of strings split on ``|``; ``(no genres listed)`` becomes an empty list.
- MovieLens ``tags.csv`` (header ``userId,movieId,tag[,timestamp]``): one row per (user, movie, tag)
  aggregated into ``item_id`` and ``tags``, the movie's distinct tags, stripped and lower-cased
  (users type ``Dark comedy`` and ``dark comedy`` for the same thing), sorted.
- Any other CSV (``*.csv``, ``*.tsv``): read with a header; ``item_id`` must be a column.

Several files (e.g. ``[movies.csv, tags.csv]``) are joined on ``item_id`` (outer join: an item in
only one file gets nulls, i.e. missing values, for the other's columns).

Feature values the model never saw map to the missing code when encoded
(:class:`recsys_metric.model.features.ItemFeatureTensors`); this module only reads and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recsys_metric.errors import DataError

MOVIELENS_NO_GENRES = "(no genres listed)"
"""What ``movies.csv`` writes for a movie without genres (read as an empty genre list)."""

_MOVIES_HEADER = ("movieId", "title", "genres")
_TAGS_HEADER = ("userId", "movieId", "tag")


def _header(path: Path, separator: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        line = f.readline().rstrip("\r\n")
    return [c.strip().strip('"') for c in line.split(separator)]


def split_tags(frame: pl.DataFrame, column: str, separator: str) -> pl.DataFrame:
    """``column`` as a ``list[str]`` column: a delimited string split on ``separator``, each tag
    stripped, empty tags dropped; a list column is left as it is; null stays null (missing).

    Raises:
        DataError: the column is missing or neither a string nor a list column.
    """
    if column not in frame.columns:
        raise DataError(
            f"item table ({frame.height} rows) has no tag column {column!r} (columns: {frame.columns}); "
            "fix data.item_tag_columns"
        )
    dtype = frame.schema[column]
    if isinstance(dtype, pl.List):
        return frame
    if dtype != pl.String and not isinstance(dtype, pl.Categorical):
        raise DataError(
            f"item table column {column!r} ({frame.height} rows) is {dtype}; a tag column must hold "
            f"delimited strings (e.g. 'Action{separator}Comedy') or lists of strings"
        )
    if not separator:
        raise DataError("data.item_tag_separator must not be empty")
    tags = (
        pl.col(column)
        .cast(pl.String)
        .str.split(separator)
        .list.eval(pl.element().str.strip_chars().filter(pl.element().str.len_chars() > 0))
    )
    return frame.with_columns(tags.alias(column))


def read_movielens_movies(path: str | Path) -> pl.DataFrame:
    """MovieLens ``movies.csv``: ``item_id`` Int64, ``title`` String, ``genres`` list[str]."""
    path = Path(path)
    frame = pl.read_csv(path, schema_overrides={"movieId": pl.Int64, "title": pl.String, "genres": pl.String})
    frame = frame.rename({"movieId": "item_id"}).with_columns(
        pl.when(pl.col("genres") == MOVIELENS_NO_GENRES)
        .then(pl.lit(""))
        .otherwise(pl.col("genres"))
        .alias("genres")
    )
    return split_tags(frame, "genres", "|")


def read_movielens_tags(path: str | Path) -> pl.DataFrame:
    """MovieLens ``tags.csv`` aggregated per movie: ``item_id`` Int64, ``tags`` list[str] (distinct,
    stripped, lower-cased, sorted), one row per movie with at least one tag."""
    path = Path(path)
    frame = pl.read_csv(path, schema_overrides={"userId": pl.String, "movieId": pl.Int64, "tag": pl.String})
    return (
        frame.select(pl.col("movieId").alias("item_id"), pl.col("tag").str.strip_chars().str.to_lowercase())
        .drop_nulls()
        .filter(pl.col("tag").str.len_chars() > 0)
        .group_by("item_id")
        .agg(pl.col("tag").unique().sort().alias("tags"))
        .sort("item_id")
    )


def _read_one(path: Path, tag_columns: Sequence[str], separator: str) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"item table {path} does not exist; pass --items a Parquet or CSV file with item_id")
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        try:
            frame = pl.read_parquet(path)
        except (pl.exceptions.ComputeError, OSError) as err:
            raise DataError(f"item table {path} is not a readable Parquet file: {err}") from None
    elif suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        header = _header(path, sep)
        if tuple(header[:3]) == _MOVIES_HEADER:
            frame = read_movielens_movies(path)
        elif tuple(header[:3]) == _TAGS_HEADER:
            frame = read_movielens_tags(path)
        else:
            frame = pl.read_csv(path, separator=sep, infer_schema_length=10_000)
    else:
        raise DataError(
            f"item table {path}: unknown file type {suffix!r}; use .parquet, .csv or .tsv "
            "(MovieLens movies.csv and tags.csv are recognised by their header)"
        )
    if "item_id" not in frame.columns:
        raise DataError(
            f"item table {path} ({frame.height} rows) has no item_id column (columns: {frame.columns}); "
            "rename the id column to item_id"
        )
    for column in tag_columns:
        if column in frame.columns:
            try:
                frame = split_tags(frame, column, separator)
            except DataError as err:
                raise DataError(f"{path}: {err}") from None
    return frame


def read_item_table(
    paths: str | Path | Sequence[str | Path],
    *,
    tag_columns: Sequence[str] = (),
    separator: str = "|",
) -> pl.DataFrame:
    """Read one or more item files into one table with one row per ``item_id`` (see the module docstring).

    Args:
        paths: a file, or several joined on ``item_id``.
        tag_columns: string columns holding delimited tags, split into ``list[str]``.
        separator: the tag delimiter of ``tag_columns`` (MovieLens genres always use ``|``).

    Raises:
        DataError: a file is missing or unreadable, lacks ``item_id``, repeats an ``item_id``, two
            files share a feature column, or a tag column named in ``tag_columns`` is in no file.
    """
    items = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not items:
        raise DataError("read_item_table needs at least one item file")
    table: pl.DataFrame | None = None
    for path in items:
        frame = _read_one(path, tag_columns, separator)
        n_dup = frame.height - frame["item_id"].n_unique()
        if n_dup:
            raise DataError(
                f"item table {path} ({frame.height} rows) repeats {n_dup} item_id value(s); keep one row per item"
            )
        if table is None:
            table = frame
            continue
        shared = [c for c in frame.columns if c != "item_id" and c in table.columns]
        if shared:
            raise DataError(f"item files share the column(s) {shared} ({path}); rename them in one file")
        if frame["item_id"].dtype != table["item_id"].dtype:
            try:
                frame = frame.with_columns(pl.col("item_id").cast(table["item_id"].dtype))
            except pl.exceptions.InvalidOperationError:
                raise DataError(
                    f"item table {path}: item_id is {frame['item_id'].dtype}, the first file's is "
                    f"{table['item_id'].dtype}; use the same id type in every file"
                ) from None
        table = table.join(frame, on="item_id", how="full", coalesce=True, maintain_order="left_right")
    assert table is not None
    absent = [c for c in tag_columns if c not in table.columns]
    if absent:
        raise DataError(
            f"data.item_tag_columns names {absent}, which no item file has (columns: {table.columns})"
        )
    return table
