"""Items added to a loaded run after training: embedded from their features, queryable at once.

A run's Annoy index is immutable, so items embedded after the run
(:meth:`~recsys_metric.serving.recommender.Recommender.add_items`, from their side features with
the run's ``item_tower.npz``, :class:`~recsys_metric.item_embedder.ItemEmbedder`) live in a
small segment beside it: :class:`AddedItems`. They get the item numbers after the run's own
(``n_base + j`` for the ``j``-th added id), and every query ranks both segments and merges them:

- the run's items go through the run's own engine (Annoy or exact, the four steps of
  :mod:`recsys_metric.serving.ranking`), unchanged;
- the added items are ranked exactly (one matrix product against the added vectors, masking,
  selection, then the canonical pair scores of :class:`~recsys_metric.serving.ranking._PairScorer`);
- the two top-``k`` lists are merged by canonical score (ties: lower item number first, so a run
  item before an added one), then cut to ``k``.

Scores are the same formula pair by pair in both segments (the run's distance), so an added item
ranks exactly where it would rank had it been in the run's table. Adding costs ``O(added)``:
the embedding of the new rows and the rebuild of the added segment (the run's tables are never
copied; lookups go through small overlays).

Under ``data.cold_items: excluded`` an added item (no training interactions, by definition) is
treated as the run's cold items are: it can be queried (``similar_items(new_id)``), but no answer
returns it.

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import DataError
from recsys_metric.item_embedder import ItemEmbedder
from recsys_metric.serving.ranking import _Engine, _Exclusions, _read_only

log = logging.getLogger(__name__)

ItemsInput = Any
"""What :func:`read_items_frame` takes: a polars or pandas frame, or a path (or several)."""


@dataclass(frozen=True)
class AddResult:
    """What :meth:`Recommender.add_items` did with each id it was given.

    Attributes:
        added: ids that were new and are now queryable, in the order given.
        replaced: ids added before and embedded again from the features given now.
        skipped: ids the run already knows (trained or exported from the item table): the
            run's own vector serves them, the features given are ignored.
    """

    added: list[Any] = field(default_factory=list)
    replaced: list[Any] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[Any]]:
        return {"added": self.added, "replaced": self.replaced, "skipped": self.skipped}


def read_items_frame(items: ItemsInput) -> pl.DataFrame:
    """``items`` as a polars frame with a non-null, duplicate-free ``item_id`` column.

    Args:
        items: a polars or pandas DataFrame, or a path (str or PathLike) or a list of paths read
            by :func:`recsys_metric.data.item_table.read_item_table` (Parquet, CSV/TSV, MovieLens
            ``movies.csv``/``tags.csv``; several files join on ``item_id``).

    Raises:
        DataError: no ``item_id`` column, null or duplicate ids (the message counts and names them).
        TypeError: ``items`` is none of the above.
    """
    if isinstance(items, pl.DataFrame):
        frame = items
    elif isinstance(items, (str, os.PathLike)) or (
        isinstance(items, Sequence) and items and all(isinstance(p, (str, os.PathLike)) for p in items)
    ):
        from recsys_metric.data.item_table import read_item_table

        frame = read_item_table(items if isinstance(items, (str, os.PathLike)) else [Path(p) for p in items])
    elif type(items).__module__.startswith("pandas"):
        frame = pl.from_pandas(items)
    else:
        raise TypeError(
            f"items must be a polars or pandas DataFrame or a path to an item file, got {type(items).__name__}"
        )
    if "item_id" not in frame.columns:
        raise DataError(f"item frame ({frame.height} rows) has no item_id column (columns: {frame.columns})")
    ids = frame["item_id"]
    if ids.null_count():
        raise DataError(
            f"item frame ({frame.height} rows): {ids.null_count()} row(s) have a null item_id; "
            "give every item an id"
        )
    duplicated = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
    if duplicated.len():
        raise DataError(
            f"item frame ({frame.height} rows): {duplicated.len()} item_id(s) appear more than once "
            f"(first: {duplicated.head(5).to_list()}); give one row per item"
        )
    return frame


def _tag_list(value: Any, separator: str) -> list[str] | None:
    """One JSON tags value as a list of strings: a list as is, a string split on ``separator``."""
    if value is None:
        return None
    if isinstance(value, str):
        return [t.strip() for t in value.split(separator)]
    if isinstance(value, list):
        return [str(t) for t in value if t is not None]
    raise TypeError(f"a tags value must be a list or a string, got {value!r}")


def items_frame(
    records: list[dict[str, Any]], run_ids: pl.Series, embedder: ItemEmbedder, *, separator: str = "|"
) -> pl.DataFrame:
    """A frame from JSON item records (the body of ``POST /items``).

    JSON has no dtypes, so each column takes the kind the run's item tower gives it: ``item_id``
    the run's id type (digits in a string for an integer vocabulary are parsed), a numeric feature
    float (an integer price is a number), a categorical one integers or strings as given, a tags
    feature a list or one string delimited by ``separator`` (row by row). Other columns are kept as inferred.

    Raises:
        DataError: an ``item_id`` is missing or cannot be an id of the run; a column mixes types.
    """
    integer_run = run_ids.dtype.is_integer()
    ids: list[Any] = []
    for n, record in enumerate(records):
        value = record.get("item_id")
        if value is None or isinstance(value, bool):
            raise DataError(f"item {n} of {len(records)} has no item_id (keys: {sorted(record)})")
        if integer_run and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise DataError(
                    f"item {n} of {len(records)}: item_id {value!r} is not an integer, as the run's ids are"
                ) from None
        elif not integer_run and not isinstance(value, str):
            value = str(value)
        ids.append(value)
    kinds = {spec["name"]: spec["kind"] for spec in embedder.specs}
    columns = sorted({key for record in records for key in record} - {"item_id"})
    data: dict[str, Any] = {"item_id": pl.Series("item_id", ids, dtype=run_ids.dtype)}
    for name in columns:
        values = [record.get(name) for record in records]
        try:
            if kinds.get(name) == "numeric":
                bad = [
                    v
                    for v in values
                    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))
                ]
                if bad:
                    raise DataError(
                        f"items: column {name!r} is a numeric feature of the run but holds {bad[:3]}; "
                        "give numbers or null"
                    )
                data[name] = pl.Series(
                    name, [None if v is None else float(v) for v in values], dtype=pl.Float64
                )
            elif kinds.get(name) == "tags":
                data[name] = pl.Series(
                    name, [_tag_list(v, separator) for v in values], dtype=pl.List(pl.String)
                )
            else:
                data[name] = pl.Series(name, values)
        except (TypeError, ValueError, pl.exceptions.PolarsError) as err:
            raise DataError(
                f"items: column {name!r} mixes value types ({type(err).__name__}: {err}); give one type per column"
            ) from None
    return pl.DataFrame(data)


def _ids_as(ids: pl.Series, like: pl.Series) -> pl.Series:
    """``ids`` in the dtype of the run's ids (Int64 or String), or a DataError saying why not."""
    if ids.dtype == like.dtype:
        return ids.rename("item_id")
    integer_run = like.dtype.is_integer()
    if integer_run and ids.dtype.is_integer():
        return ids.cast(like.dtype).rename("item_id")
    if not integer_run and (ids.dtype == pl.String or isinstance(ids.dtype, pl.Categorical | pl.Enum)):
        return ids.cast(pl.String).rename("item_id")
    raise DataError(
        f"item frame column item_id has dtype {ids.dtype} but the run's item ids are {like.dtype}; "
        f"convert the ids (first: {ids.head(3).to_list()})"
    )


def _split_tag_strings(frame: pl.DataFrame, embedder: ItemEmbedder, separator: str) -> pl.DataFrame:
    """Tag columns given as delimited strings, as lists: rows kept for a later run must not depend
    on the separator of the call that added them."""
    out = frame
    for spec in embedder.specs:
        name = spec["name"]
        if spec["kind"] == "tags" and name in out.columns:
            dtype = out[name].dtype
            if dtype == pl.String or isinstance(dtype, pl.Categorical):
                out = out.with_columns(
                    pl.col(name)
                    .cast(pl.String)
                    .str.split(separator)
                    .list.eval(pl.element().str.strip_chars())
                )
    return out


class _CombinedRows:
    """Read-only rows of a run's array followed by the added ones, without copying the run's:
    the item vectors ``[n, D]`` or the id values ``[n]``.

    Supports what the Recommender asks of them: ``rows[a:b]`` and ``rows[int array]`` (returning
    new arrays, or a view of the run's when every row is the run's).
    """

    def __init__(self, base: np.ndarray, added: np.ndarray):
        self.base = base
        self.added = added
        self.n_base = int(base.shape[0])
        self.shape = (self.n_base + int(added.shape[0]), *base.shape[1:])
        self.dtype = np.result_type(base.dtype, added.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1 and stop <= self.n_base:
                return self.base[start:stop]
            nums = np.arange(start, stop, step, dtype=np.int64)
        else:
            nums = np.asarray(key, dtype=np.int64)
        if nums.size and nums.max() < self.n_base:
            return self.base[nums]
        if nums.size and (nums.min() < 0 or nums.max() >= self.shape[0]):
            raise IndexError(f"item number out of range [0, {self.shape[0]})")
        out = np.empty((*nums.shape, *self.shape[1:]), dtype=self.dtype)
        in_base = nums < self.n_base
        out[in_base] = self.base[nums[in_base]]
        out[~in_base] = self.added[nums[~in_base] - self.n_base]
        return out


class _CombinedLookup:
    """``id -> item number`` over the run's dict and the added items' (what ``Recommender._lookup``
    reads with ``.get``, and ``Recommender._numbers`` with ``[]``), without copying the run's dict."""

    def __init__(self, base: dict[Any, int], added: dict[Any, int]):
        self.base = base
        self.added = added

    def get(self, key: Any, default: Any = None) -> Any:
        found = self.added.get(key)  # a TypeError for an unhashable key, as dict.get
        return found if found is not None else self.base.get(key, default)

    def __getitem__(self, key: Any) -> int:
        found = self.added.get(key)
        return found if found is not None else self.base[key]  # KeyError as a dict's

    def __len__(self) -> int:
        return len(self.base) + len(self.added)


class _CombinedVocabulary:
    """The run's :class:`Vocabulary` followed by the added ids (numbers ``n_base + j``), with the
    part of its interface the Recommender uses (``numbers``, ``id_column``), without rebuilding
    the run's."""

    def __init__(self, base: Vocabulary, added: Vocabulary):
        self.base = base
        self.added = added
        self.n_base = len(base)

    @property
    def id_column(self) -> str:
        return self.base.id_column

    def __len__(self) -> int:
        return self.n_base + len(self.added)

    def numbers(self, ids: Any, missing: str = "error") -> np.ndarray:
        """As :meth:`Vocabulary.numbers`; an unknown id raises the run vocabulary's own error."""
        nums = self.base.numbers(ids, missing="negative")
        lost = nums < 0
        if lost.any():
            more = self.added.numbers(ids, missing="negative")
            nums = np.where(lost & (more >= 0), more + self.n_base, nums).astype(np.int32)
            lost = nums < 0
            if lost.any() and missing == "error":
                query = ids if isinstance(ids, pl.Series) else pl.Series(values=list(ids))
                self.base.numbers(query.filter(pl.Series(lost)), missing="error")
        return nums


def _merge(
    a_nums: np.ndarray, a_scores: np.ndarray, b_nums: np.ndarray, b_scores: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of two ``[B, *]`` result lists (-1 / -inf padding): score descending, then item
    number ascending, as :meth:`_Engine.finish` orders."""
    nums = np.concatenate([a_nums, b_nums], axis=1)
    scores = np.concatenate([a_scores, b_scores], axis=1)
    big = np.iinfo(np.int64).max
    tie = np.where(nums >= 0, nums, big)
    order = np.lexsort((tie, -scores), axis=1)[:, :k]
    return np.take_along_axis(nums, order, axis=1), np.take_along_axis(scores, order, axis=1)


class _SegmentedEngine:
    """The run's engine plus an exact engine over the added items, with the interface the
    :class:`Recommender` uses (``rank``, ``finish``, ``n_items``); numbers ``>= n_base`` are added items.
    """

    def __init__(self, base: _Engine, added: _Engine, *, serve_added: bool):
        self.base = base
        self.added = added
        self.n_base = base.n_items
        self.n_items = base.n_items + added.n_items
        self.serve_added = serve_added

    def _split(self, exclusions: _Exclusions) -> tuple[_Exclusions, _Exclusions]:
        in_base = exclusions.cols < self.n_base
        n = exclusions.n_rows
        base = _Exclusions(exclusions.rows[in_base], exclusions.cols[in_base], n)
        added = _Exclusions(exclusions.rows[~in_base], exclusions.cols[~in_base] - self.n_base, n)
        return base, added

    def _offset(self, nums: np.ndarray) -> np.ndarray:
        return np.where(nums >= 0, nums + self.n_base, -1)

    def rank(
        self, queries: np.ndarray, k: int, exclusions: _Exclusions, index: Any, out: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`_Engine.rank`, over both segments."""
        base_ex, added_ex = self._split(exclusions)
        nums, scores = self.base.rank(queries, k, base_ex, index, out)
        if not self.serve_added:
            return nums, scores
        more, more_scores = self.added.rank(queries, k, added_ex, None)
        return _merge(nums, scores, self._offset(more), more_scores, k)

    def finish(
        self, queries: np.ndarray, candidates: np.ndarray, k: int, exclusions: _Exclusions | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`_Engine.finish` (explicit candidates), over both segments."""
        candidates = np.asarray(candidates, dtype=np.int64)
        base_c = np.where((candidates >= 0) & (candidates < self.n_base), candidates, -1)
        added_c = np.where(candidates >= self.n_base, candidates - self.n_base, -1)
        base_ex, added_ex = self._split(exclusions) if exclusions is not None else (None, None)
        nums, scores = self.base.finish(queries, base_c, k, base_ex)
        more, more_scores = self.added.finish(queries, added_c, k, added_ex)
        return _merge(nums, scores, self._offset(more), more_scores, k)


@dataclass(frozen=True)
class AddedItems:
    """The items added to one loaded run (immutable: each add builds a new one).

    Attributes:
        ids: the added ids in number order (item number ``n_base + j``), the run's id dtype.
        vectors: float32 ``[A, D]``, the run's space (cosine: unit rows).
        rows: the feature rows as given (tag strings split into lists), one per id, in number
            order: what a later run re-embeds them from (:func:`carry_over`).
        n_base: items of the run itself.
    """

    ids: pl.Series
    vectors: np.ndarray
    rows: pl.DataFrame
    n_base: int

    def __len__(self) -> int:
        return self.ids.len()


def extend(
    current: AddedItems | None,
    frame: pl.DataFrame,
    embedder: ItemEmbedder,
    base_ids: pl.Series,
    *,
    separator: str = "|",
    base_lookup: Any = None,
) -> tuple[AddedItems | None, AddResult]:
    """``current`` plus the items of ``frame`` (already checked by :func:`read_items_frame`).

    Ids the run knows are skipped; ids added before are embedded again (same number, new vector);
    the others are appended. Nothing changes when an error is raised.

    Args:
        base_lookup: the run's ``id -> number`` dict (``.get``), to tell known ids without a
            vocabulary lookup; None looks them up in ``embedder.items``.

    Raises:
        DataError: a feature column is missing or of another kind, an id has the wrong type, or an
            item to add has no feature value the run knows (as :meth:`ItemEmbedder.embed`).
    """
    ids = _ids_as(frame["item_id"], base_ids)
    frame = frame.with_columns(ids)
    if base_lookup is not None:  # the run's id -> number dict: O(added), not O(catalogue)
        known = np.fromiter(
            (base_lookup.get(i) is not None for i in ids.to_list()), dtype=bool, count=ids.len()
        )
    else:
        known = embedder.items.numbers(ids, missing="negative") >= 0
    skipped = ids.filter(pl.Series(known)).to_list()
    todo = frame.filter(pl.Series(~known))
    if todo.height == 0:
        return current, AddResult(skipped=skipped)
    vectors = embedder.embed_new(todo, separator=separator)
    rows = _split_tag_strings(todo, embedder, separator)
    old_ids = current.ids if current is not None else pl.Series("item_id", [], dtype=base_ids.dtype)
    position = dict(zip(old_ids.to_list(), range(old_ids.len()), strict=True))
    todo_ids = todo["item_id"].to_list()
    again = np.array([position.get(i, -1) for i in todo_ids], dtype=np.int64)
    fresh = again < 0
    if current is not None:
        table = np.array(current.vectors)
        table[again[~fresh]] = vectors[~fresh]
        table = np.concatenate([table, vectors[fresh]])
        kept = current.rows.filter(~pl.col("item_id").is_in(todo["item_id"].implode()))
        try:
            all_rows = pl.concat([kept, rows], how="diagonal_relaxed")
        except pl.exceptions.PolarsError as err:
            raise DataError(
                f"item frame ({frame.height} rows): its columns do not match those of the items added "
                f"before ({type(err).__name__}: {err}); give each column the type it had"
            ) from None
    else:
        table, all_rows = vectors, rows
    new_ids = pl.concat([old_ids, todo["item_id"].filter(pl.Series(fresh))])
    all_rows = pl.DataFrame({"item_id": new_ids}).join(
        all_rows, on="item_id", how="left", maintain_order="left"
    )
    result = AddResult(
        added=[i for i, f in zip(todo_ids, fresh, strict=True) if f],
        replaced=[i for i, f in zip(todo_ids, fresh, strict=True) if not f],
        skipped=skipped,
    )
    added = AddedItems(
        new_ids, _read_only(np.ascontiguousarray(table, dtype=np.float32)), all_rows, len(base_ids)
    )
    return added, result


def segment_state(
    base: dict[str, Any], added: AddedItems, distance: str, *, serve_added: bool
) -> dict[str, Any]:
    """What a Recommender swaps in to serve ``added`` beside the run, by attribute name: the id
    tables and vector rows of both (overlays: nothing of the run's is copied, so an add costs
    ``O(added)``, not ``O(catalogue)``) and the segmented engine.

    The run's own ids (``Recommender.item_ids``, a polars Series) and its item Vocabulary stay
    lazy (made on first use, never at load): only the added segment's are published
    (``_item_ids_added``, ``_item_vocab_added``), and the Recommender puts them after the run's
    when asked (``item_ids`` concatenates, ``_vocabulary("item")`` is a :class:`_CombinedVocabulary`).

    Args:
        base: the run's own tables as loaded (``_engine``, ``_item_vectors``, ``_item_id_values``,
            ``_item_num_of``).
    """
    n_base = len(base["_item_id_values"])
    added_vocab = Vocabulary(added.ids, name="item")
    added_vocab.numbers(added.ids.head(1))  # warm its lookup cache before any query thread reads it
    # As the run's id values (Recommender._id_values): int64, or an object array of str.
    if added.ids.dtype.is_integer():
        added_values = added.ids.cast(pl.Int64).to_numpy()
    else:
        added_values = np.empty(len(added), dtype=object)
        added_values[:] = added.ids.to_list()
    return {
        "_item_ids_added": added.ids,
        "_item_id_values": _CombinedRows(base["_item_id_values"], _read_only(added_values)),
        "_engine": _SegmentedEngine(
            base["_engine"], _Engine(added.vectors, distance), serve_added=serve_added
        ),
        "_item_vectors": _CombinedRows(base["_item_vectors"], added.vectors),
        "_item_vocab_added": added_vocab,
        "_item_num_of": _CombinedLookup(
            base["_item_num_of"],
            dict(zip(added.ids.to_list(), range(n_base, n_base + len(added)), strict=True)),
        ),
    }


PUBLISH_ORDER = (
    "_item_ids_added",
    "_item_id_values",
    "_engine",
    "_item_vectors",
    "_item_vocab_added",
    "_item_num_of",
)
"""The order a Recommender assigns :func:`segment_state`'s attributes in: the reverse of the order
a query reads them (id lookups, vocabulary, vectors, engine, then the ids of the result). A query
that saw a new item number anywhere therefore reads new tables from there on; the tables only
grow and an item keeps its number, so older tables it read before are a consistent subset."""


def carry_over(old: AddedItems | None, embedder_of: Any, base_ids: pl.Series) -> pl.DataFrame | None:
    """The rows of ``old`` a newly loaded run should add again: those whose ids the new run does
    not know (the new run's own vector wins) and that it can place (at least one feature value it
    knows); the others are logged and dropped.

    Args:
        old: the items added to the run serving until now.
        embedder_of: a callable returning the new run's :class:`ItemEmbedder` (may raise DataError).
        base_ids: the new run's item ids.

    Returns:
        The rows to add to the new run, or None when there are none.
    """
    if old is None or len(old) == 0:
        return None
    return placeable_rows(old.rows, embedder_of, base_ids, source="added to the previous run")


def placeable_rows(
    rows: pl.DataFrame, embedder_of: Any, base_ids: pl.Series, *, source: str
) -> pl.DataFrame | None:
    """The feature ``rows`` (tags as lists) a run should add: ids it does not know, with at least
    one feature value it knows; the others are logged (``source`` says where they came from) and
    dropped. None when none are left or the run cannot embed items at all (logged too)."""
    try:
        embedder: ItemEmbedder = embedder_of()
        rows = rows.with_columns(_ids_as(rows["item_id"], base_ids))
        unknown = embedder.items.numbers(rows["item_id"], missing="negative") < 0
        n_known = int((~unknown).sum())
        rows = rows.filter(pl.Series(unknown))
        _, has_feature = embedder.feature_vectors(embedder.encode(rows))
    except Exception as err:  # noqa: BLE001 - never keep a good run from being swapped in
        log.warning("dropped the %d item(s) %s: the run cannot embed them: %s", rows.height, source, err)
        return None
    if n_known:
        log.info("%d item(s) %s are in the run: its own vectors serve them", n_known, source)
    if not has_feature.all():
        dropped = rows["item_id"].filter(pl.Series(~has_feature))
        log.warning(
            "dropped %d item(s) %s: no feature value the run knows (first: %s)",
            dropped.len(),
            source,
            dropped.head(5).to_list(),
        )
        rows = rows.filter(pl.Series(has_feature))
    return rows if rows.height else None


def carry_added_items(old: Any, new: Any) -> AddResult | None:
    """Add the items added to the Recommender ``old`` to ``new`` (a run about to replace it),
    embedded with ``new``'s item tower (:func:`carry_over` says which). Never raises for the
    items: a run is not refused because it cannot place them (they are dropped, with a warning).
    """
    rows = carry_over(old._added, new._item_embedder, new._base[2])
    if rows is None:
        return None
    try:
        result = new.add_items(rows)
    except Exception as err:  # noqa: BLE001 - never keep a good run from being swapped in
        log.warning("dropped the %d item(s) added to the previous run: %s", rows.height, err)
        return None
    log.info(
        "run %s: %d item(s) added to run %s embedded again with the new item tower",
        new.run_id,
        len(result.added),
        old.run_id,
    )
    return result
