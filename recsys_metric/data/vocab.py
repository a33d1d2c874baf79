"""Vocabularies: external user/item ids <-> dense numbers ``0..n-1``.

External ids (``user_id``, ``item_id``: Int64 or String) stay in user-facing tables; dense numbers
(``user_num``, ``item_num``: int32) index embedding tables and CSR matrices. A
:class:`Vocabulary` is the only place that maps one to the other (the idea follows LensKit's
``Vocabulary``).

Numbers are positions in the vocabulary. :meth:`Vocabulary.from_ids` sorts the unique ids, so a
fresh vocabulary is in id order; :meth:`Vocabulary.extend` appends unseen ids after the existing
ones so that every old number keeps its meaning (warm start), after which num order is no longer
id order. Nothing here assumes the ids are sorted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

# UnknownIdError lives in recsys_metric.errors (serving raises it without importing polars);
# re-exported here, where it always was.
from recsys_metric.errors import DataError
from recsys_metric.errors import UnknownIdError as UnknownIdError

VocabName = Literal["user", "item"]
_NAMES: tuple[str, ...] = ("user", "item")
_MAX_SIZE = int(np.iinfo(np.int32).max)
_N_SHOWN = 5
_SKIP_ENCODE = "missing='null' or 'drop'"
# Integer ids whose range spans at most this many values per id (or fewer than _DENSE_MIN_SPAN values)
# are mapped with a direct table indexed by the id: a bitmap for from_ids, an int32 array for lookups.
# A join or a hash unique on 20M ids took 0.3-1.3 s here, the table 0.05 s.
_DENSE_SPAN_PER_ID = 8
_DENSE_MIN_SPAN = 1 << 16


def _strictly_increasing(s: pl.Series) -> bool:
    """Whether an integer Series without nulls is strictly increasing (so its values are distinct)."""
    if not s.dtype.is_integer() or s.len() < 2:
        return False
    values = s.to_numpy()
    return bool(np.all(values[1:] > values[:-1]))


def _chunk_arrays(s: pl.Series) -> list[np.ndarray]:
    """The chunks of a Series without nulls as numpy arrays, each a view where polars allows one.

    A Series read from many row groups has one chunk per group, and ``Series.to_numpy()`` then
    copies the whole column into fresh memory (160 MB for 20M Int64 ids), which costs more here
    than the work done on it.
    """
    return [chunk.to_numpy() for chunk in s.get_chunks()]


def _dense_unique(s: pl.Series) -> pl.Series | None:
    """Sorted distinct values of Int64 ``s`` (no nulls) by a bitmap over their range, or None when the
    range is too wide for one (see ``_DENSE_SPAN_PER_ID``)."""
    if s.dtype != pl.Int64 or s.len() == 0:
        return None
    low, high = int(s.min()), int(s.max())  # type: ignore[arg-type]
    span = high - low + 1
    if span > max(_DENSE_SPAN_PER_ID * s.len(), _DENSE_MIN_SPAN):
        return None
    present = np.zeros(span, dtype=bool)
    for values in _chunk_arrays(s):
        present[values - low if low else values] = True
    distinct = np.flatnonzero(present)
    if low:
        distinct += low
    return pl.Series(s.name, distinct, dtype=pl.Int64)


def _normalise_ids(values: Any, *, column: str) -> pl.Series:
    """Coerce ids to a polars Series of Int64 or String named ``column``.

    Integer types of any width become Int64, Categorical/Enum become String; anything else
    (floats, booleans, dates) is rejected because it would not round-trip as an id.
    """
    if isinstance(values, pl.Series):
        s = values
    elif isinstance(values, np.ndarray):
        s = pl.Series(values=values)
    elif isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(
            f"{column}: expected a sequence of ids (Series, array or list), got {type(values).__name__}"
        )
    else:
        s = pl.Series(values=list(values))
    s = s.rename(column)
    dtype = s.dtype
    if dtype == pl.Null:
        return s.cast(pl.Int64)
    if dtype.is_integer():
        if dtype == pl.UInt64 and s.len() and s.max() > np.iinfo(np.int64).max:
            raise DataError(
                f"{column}: ids above {np.iinfo(np.int64).max} do not fit Int64; read them as strings"
            )
        return s.cast(pl.Int64)
    if dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum):
        return s.cast(pl.String)
    raise TypeError(f"{column}: ids must be integers or strings, got dtype {dtype}")


def _describe_unknown(unknown: pl.Series, *, column: str, what: str, skip: str) -> UnknownIdError:
    n_unknown = unknown.len()
    shown = unknown.head(_N_SHOWN).to_list()
    more = f" and {n_unknown - len(shown)} more" if n_unknown > len(shown) else ""
    return UnknownIdError(
        f"{n_unknown} distinct {column} value(s) {what} are not in the {column.removesuffix('_id')} "
        f"vocabulary: {', '.join(repr(x) for x in shown)}{more}; pass {skip} to skip them, or extend "
        f"the vocabulary",
        unknown=shown,
        n_unknown=n_unknown,
    )


class Vocabulary:
    """Bijection between external ids and dense numbers ``0..n-1`` (int32).

    Args:
        ids: the ids in number order (``ids[k]`` has number ``k``): a polars Series, numpy array
            or list of int or str, unique, no nulls. Integer ids are stored as Int64, string ids
            as String.
        name: ``"user"`` or ``"item"``; frames use the columns ``{name}_id`` and ``{name}_num``.

    Raises:
        DataError: duplicate or null ids, or more than 2**31 - 1 of them.
        TypeError: ids that are neither integers nor strings.
    """

    __slots__ = ("_ids", "_name", "_frame", "_sorted_cache", "_table")

    def __init__(self, ids: Any, *, name: VocabName):
        if name not in _NAMES:
            raise ValueError(f"vocabulary name must be one of {_NAMES}, got {name!r}")
        self._name: str = name
        s = _normalise_ids(ids, column=self.id_column)
        if s.null_count():
            raise DataError(
                f"{self.id_column}: {s.null_count()} null id(s) among {s.len()}; ids must not be null"
            )
        if s.len() > _MAX_SIZE:
            raise DataError(f"{self.id_column}: {s.len()} ids exceed the int32 number range")
        n_unique = s.len() if _strictly_increasing(s) else s.n_unique()
        if n_unique != s.len():
            dup = s.filter(s.is_duplicated()).unique(maintain_order=True).head(_N_SHOWN).to_list()
            raise DataError(
                f"{self.id_column}: {s.len() - n_unique} duplicate id(s) (e.g. {dup}); "
                f"use Vocabulary.from_ids to build from values with repeats"
            )
        self._ids: pl.Series = s
        self._frame: pl.DataFrame | None = None
        self._sorted_cache: np.ndarray | None = None
        self._table: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_ids(cls, values: Any, *, name: VocabName) -> Vocabulary:
        """Vocabulary of the unique values, sorted: the smallest id gets number 0.

        Args:
            values: ids with repeats (polars Series, numpy array or list; int or str).
        """
        s = _normalise_ids(values, column=f"{name}_id")
        if s.null_count():
            raise DataError(
                f"{name}_id: {s.null_count()} null id(s) among {s.len()}; drop or fix those rows first"
            )
        dense = _dense_unique(s)
        if dense is not None:
            return cls(dense, name=name)
        return cls(s.unique().sort(), name=name)

    @property
    def name(self) -> str:
        """``"user"`` or ``"item"``."""
        return self._name

    @property
    def id_column(self) -> str:
        """``{name}_id``."""
        return f"{self._name}_id"

    @property
    def num_column(self) -> str:
        """``{name}_num``."""
        return f"{self._name}_num"

    @property
    def id_dtype(self) -> pl.DataType:
        """``pl.Int64`` or ``pl.String``."""
        return self._ids.dtype

    def __len__(self) -> int:
        return self._ids.len()

    def __repr__(self) -> str:
        return f"Vocabulary(name={self._name!r}, n={len(self)}, id_dtype={self.id_dtype})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return self._name == other._name and self._ids.equals(other._ids, check_names=True, check_dtypes=True)

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, id_: object) -> bool:
        if self.id_dtype == pl.String:
            if not isinstance(id_, str):
                return False
        elif isinstance(id_, bool) or not isinstance(id_, (int, np.integer)):
            return False
        elif not np.iinfo(np.int64).min <= int(id_) <= np.iinfo(np.int64).max:
            return False
        sorted_ids = self._sorted_ids()
        pos = int(np.searchsorted(sorted_ids, id_))
        return pos < len(sorted_ids) and sorted_ids[pos] == id_

    def _sorted_ids(self) -> np.ndarray:
        """The ids in ascending order as numpy (object array for strings), cached for scalar lookups."""
        if self._sorted_cache is None:
            ids = self._ids if self._ids.is_sorted() else self._ids.sort()
            self._sorted_cache = ids.to_numpy()
        return self._sorted_cache

    def to_frame(self) -> pl.DataFrame:
        """``{name}_id`` (Int64|String), ``{name}_num`` (Int32) for every id, in number order."""
        if self._frame is None:
            self._frame = pl.DataFrame(
                [self._ids, pl.Series(self.num_column, np.arange(len(self), dtype=np.int32))]
            )
        return self._frame

    def ids(self, nums: Any = None) -> pl.Series:
        """External ids named ``{name}_id``: all of them in number order, or those of ``nums``.

        Args:
            nums: int array-like ``[n]`` of numbers in ``[0, len(self))``.

        Raises:
            IndexError: a number outside ``[0, len(self))``.
        """
        if nums is None:
            return self._ids.clone()
        idx = np.asarray(nums)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"{self.num_column}: numbers must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        bad = (idx < 0) | (idx >= len(self))
        if bad.any():
            raise IndexError(
                f"{self.num_column}: {int(bad.sum())} number(s) outside [0, {len(self)}), "
                f"e.g. {idx[bad][:_N_SHOWN].tolist()}"
            )
        return self._ids.gather(idx)

    def numbers(self, ids: Any, missing: Literal["error", "negative"] = "error") -> np.ndarray:
        """Dense numbers of ``ids``: int32 ``[n]``, in the order given.

        Args:
            ids: polars Series, numpy array or list of ids of this vocabulary's kind (int or str).
            missing: ``"error"`` raises :class:`UnknownIdError` (a KeyError) naming the first
                few unknown ids and how many there are; ``"negative"`` gives -1 for them.
        """
        if missing not in ("error", "negative"):
            raise ValueError(f"missing must be 'error' or 'negative', got {missing!r}")
        query = _normalise_ids(ids, column=self.id_column)
        if len(self) == 0:
            # An empty vocabulary has no id kind to check against: every id is simply unknown.
            looked_up = pl.DataFrame(
                [query, pl.Series(self.num_column, [None] * query.len(), dtype=pl.Int32)]
            )
        else:
            query = self._coerce_query(query)
            direct = self._lookup(query)
            if direct is not None:
                looked_up = pl.DataFrame([query, direct])
            else:
                looked_up = pl.DataFrame(query).join(
                    self.to_frame(), on=self.id_column, how="left", maintain_order="left"
                )
        nums = looked_up.get_column(self.num_column)
        if nums.null_count():
            if missing == "error":
                unknown = looked_up.filter(pl.col(self.num_column).is_null()).get_column(self.id_column)
                unknown = unknown.unique(maintain_order=True)
                raise _describe_unknown(
                    unknown, column=self.id_column, what="looked up", skip="missing='negative'"
                )
            nums = nums.fill_null(-1)
        return nums.to_numpy().astype(np.int32, copy=False)

    def _lookup(self, keys: pl.Series) -> pl.Series | None:
        """Int32 ``{name}_num`` of Int64 ``keys`` (null where unknown) by a direct table, or None.

        None when the ids are strings, ``keys`` has nulls, or the vocabulary's ids are too sparse for
        a table (see ``_DENSE_SPAN_PER_ID``); the caller then joins.
        """
        if keys.dtype != pl.Int64 or self.id_dtype != pl.Int64 or keys.null_count() or len(self) == 0:
            return None
        table = self._dense_table()
        if table is None:
            return None
        low, nums_at = table
        high = low + nums_at.size - 1
        nums = np.empty(keys.len(), dtype=np.int32)
        start = 0
        for k in _chunk_arrays(keys):
            out_k = nums[start : start + k.size]
            start += k.size
            if k.size and low <= int(k.min()) and int(k.max()) <= high:
                np.take(nums_at, k - low if low else k, out=out_k, mode="clip")
            else:
                out_k.fill(-1)
                inside = (k >= low) & (k <= high)
                out_k[inside] = nums_at[k[inside] - low]
        out = pl.Series(self.num_column, nums)
        if nums.size and int(nums.min()) < 0:
            out = out.to_frame().select(pl.when(out >= 0).then(out).alias(self.num_column)).to_series()
        return out

    def _dense_table(self) -> tuple[int, np.ndarray] | None:
        """``(low, nums_at)``: ``nums_at[id - low]`` is the number of ``id`` or -1; None for sparse ids."""
        if self._table is None:
            low, high = int(self._ids.min()), int(self._ids.max())  # type: ignore[arg-type]
            span = high - low + 1
            if span > max(_DENSE_SPAN_PER_ID * len(self), _DENSE_MIN_SPAN):
                self._table = (0, np.empty(0, dtype=np.int32))
            else:
                nums_at = np.full(span, -1, dtype=np.int32)
                ids = self._ids.to_numpy()
                nums_at[ids - low if low else ids] = np.arange(len(self), dtype=np.int32)
                self._table = (low, nums_at)
        return self._table if self._table[1].size else None

    def _coerce_query(self, query: pl.Series) -> pl.Series:
        if query.dtype == self.id_dtype:
            return query
        if query.len() == 0:
            return query.cast(self.id_dtype)
        raise TypeError(
            f"{self.id_column}: looked up {query.dtype} ids in a vocabulary of {self.id_dtype} ids; "
            f"convert them first (ids are compared exactly, '1' is not 1)"
        )

    def encode(
        self,
        frame: pl.DataFrame | pl.LazyFrame,
        *,
        missing: Literal["error", "null", "drop"] = "error",
    ) -> pl.DataFrame | pl.LazyFrame:
        """Add ``{name}_num`` (Int32) to a frame with a ``{name}_id`` column, by a hash join.

        Row order is kept; an existing ``{name}_num`` column is replaced. A LazyFrame gives a
        LazyFrame; with ``missing="error"`` its unknown ids are checked at once, which reads the
        ``{name}_id`` column of the input one time.

        Args:
            frame: any frame with ``{name}_id`` of this vocabulary's kind (any integer width is
                accepted for integer ids).
            missing: ``"error"``: :class:`UnknownIdError` naming the first few unknown ids and
                how many; ``"null"``: a null number; ``"drop"``: remove those rows.
        """
        if missing not in ("error", "null", "drop"):
            raise ValueError(f"missing must be 'error', 'null' or 'drop', got {missing!r}")
        schema = frame.collect_schema()
        key = self.id_column
        if key not in schema:
            raise DataError(
                f"cannot encode {self._name}s: the frame has no {key} column (columns: {schema.names()})"
            )
        dtype = schema[key]
        if self.id_dtype == pl.Int64 and dtype.is_integer():
            cast = dtype != pl.Int64
        elif self.id_dtype == pl.String and dtype in (pl.String, pl.Categorical):
            cast = dtype != pl.String
        elif dtype == pl.Null:
            cast = True
        else:
            raise DataError(
                f"cannot encode {self._name}s: {key} is {dtype}, the vocabulary holds {self.id_dtype} ids"
            )
        if self.num_column in schema:
            frame = frame.drop(self.num_column)
        if isinstance(frame, pl.DataFrame):
            # Joining the key column alone and attaching the numbers is about twice as fast as a
            # (lazy) join that gathers every payload column.
            keys = frame.get_column(key).cast(self.id_dtype)
            nums = self._lookup(keys)
            if nums is None:
                nums = (
                    pl.DataFrame(keys)
                    .join(self.to_frame(), on=key, how="left", maintain_order="left")
                    .get_column(self.num_column)
                )
            out = frame.with_columns(nums)
            if nums.null_count():
                if missing == "error":
                    unknown = keys.filter(nums.is_null()).unique(maintain_order=True)
                    raise _describe_unknown(unknown, column=key, what="in the frame", skip=_SKIP_ENCODE)
                if missing == "drop":
                    out = out.filter(pl.col(self.num_column).is_not_null())
            return out
        right = self.to_frame().lazy()
        how: Literal["inner", "left"] = "inner" if missing == "drop" else "left"
        if cast:
            # Join on a cast copy of the key so that the caller's column keeps its dtype.
            tmp = "__vocab_key"
            joined = (
                frame.with_columns(pl.col(key).cast(self.id_dtype).alias(tmp))
                .join(right.rename({key: tmp}), on=tmp, how=how, maintain_order="left")
                .drop(tmp)
            )
        else:
            joined = frame.join(right, on=key, how=how, maintain_order="left")
        if missing == "error":
            unknown = (
                frame.select(pl.col(key).cast(self.id_dtype))
                .unique(maintain_order=True)
                .join(right, on=key, how="anti", maintain_order="left")
                .collect()
                .get_column(key)
            )
            if unknown.len():
                raise _describe_unknown(unknown, column=key, what="in the frame", skip=_SKIP_ENCODE)
        return joined

    def extend(self, new_ids: Any) -> Vocabulary:
        """A new vocabulary: every existing id keeps its number, unseen ids follow in sorted order.

        Args:
            new_ids: ids with repeats, possibly overlapping the existing ones (same kind).
        """
        new = _normalise_ids(new_ids, column=self.id_column)
        if new.null_count():
            raise DataError(
                f"{self.id_column}: {new.null_count()} null id(s) among {new.len()}; ids must not be null"
            )
        if len(self) == 0:
            # An empty vocabulary has no id kind of its own yet: the new ids decide it.
            return Vocabulary.from_ids(new, name=self._name)  # type: ignore[arg-type]
        new = self._coerce_query(new)
        unseen = (
            pl.DataFrame(new.unique())
            .join(self.to_frame(), on=self.id_column, how="anti")
            .get_column(self.id_column)
            .sort()
        )
        if unseen.len() == 0:
            return self
        return Vocabulary(pl.concat([self._ids, unseen]), name=self._name)  # type: ignore[arg-type]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``{name}_id``, ``{name}_num`` (in number order) to a Parquet file, atomically.

        The file is written beside ``path`` and renamed over it, so a reader never sees half a file.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            self.to_frame().write_parquet(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Vocabulary:
        """Read a file written by :meth:`save`; the name comes from the column names.

        Raises:
            DataError: the file lacks a ``user_id``/``user_num`` or ``item_id``/``item_num`` pair,
                or its numbers are not exactly ``0..n-1``, or its ids repeat.
        """
        path = Path(path)
        if not path.exists():
            raise DataError(f"vocabulary file {path} does not exist")
        frame = pl.read_parquet(path)
        names = [n for n in _NAMES if f"{n}_id" in frame.columns and f"{n}_num" in frame.columns]
        if len(names) != 1:
            raise DataError(
                f"vocabulary file {path}: expected exactly one of the column pairs user_id/user_num or "
                f"item_id/item_num, found columns {frame.columns}"
            )
        name = names[0]
        nums = frame.get_column(f"{name}_num")
        n = frame.height
        if nums.null_count() or not nums.dtype.is_integer():
            raise DataError(
                f"vocabulary file {path}: {name}_num must be a non-null integer column, got {nums.dtype}"
            )
        if n and not (nums.sort() == pl.int_range(n, eager=True).cast(nums.dtype)).all():
            raise DataError(f"vocabulary file {path}: {name}_num is not exactly 0..{n - 1} ({n} rows)")
        if not nums.is_sorted():
            frame = frame.sort(f"{name}_num")
        try:
            return cls(frame.get_column(f"{name}_id"), name=name)  # type: ignore[arg-type]
        except (DataError, TypeError) as err:
            raise DataError(f"vocabulary file {path}: {err}") from None
