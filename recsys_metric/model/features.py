"""Item side features as tensors aligned to ``item_num``, with the vocabularies that made them.

An item table (one row per item, ``item_id`` plus feature columns) becomes three kinds of input
for the item tower's feature encoder, decided per column from its polars dtype:

- ``categorical``: String, Categorical, Enum, Boolean or integer columns. One code per item:
  ``0`` for a missing or unknown value, ``1..V`` for the sorted vocabulary of values seen.
- ``numeric``: float columns, standardised with the mean and standard deviation of the catalog
  they were built on; missing or NaN values become ``0`` (the mean).
- ``tags``: list columns (``list[str]`` or ``list[int]``), e.g. genres. A CSR layout per column:
  the codes of item ``n`` are ``indices[indptr[n]:indptr[n + 1]]`` (codes ``1..V``; missing and
  unknown tags are dropped, so an item may have none).

:meth:`ItemFeatureTensors.state` is the JSON-able description (kinds, vocabularies, statistics);
with it, :meth:`ItemFeatureTensors.from_frame` encodes new items exactly as the training catalog was
encoded (cold items), and :meth:`ItemFeatureTensors.from_tensors` rebuilds the tensors from a
model's state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recsys_metric.errors import DataError

FeatureKind = Literal["categorical", "numeric", "tags"]

STATE_VERSION = 1
"""Version of the dict written by :meth:`ItemFeatureTensors.state`."""


@dataclass(frozen=True)
class FeatureSpec:
    """How one item column is encoded.

    Attributes:
        name: column name in the item table.
        kind: ``categorical``, ``numeric`` or ``tags``.
        vocabulary: categorical and tags: the distinct values as strings, sorted; value
            ``vocabulary[v]`` has code ``v + 1`` (code 0 is missing/unknown). Empty for numeric.
        mean: numeric: the value that maps to 0.
        std: numeric: the unit of the standardised value (1.0 when the column is constant).
    """

    name: str
    kind: FeatureKind
    vocabulary: tuple[str, ...] = ()
    mean: float = 0.0
    std: float = 1.0

    @property
    def cardinality(self) -> int:
        """Number of codes including the missing/unknown code 0 (categorical and tags)."""
        return len(self.vocabulary) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "vocabulary": list(self.vocabulary),
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        return cls(
            name=str(data["name"]),
            kind=data["kind"],
            vocabulary=tuple(str(v) for v in data.get("vocabulary", ())),
            mean=float(data.get("mean", 0.0)),
            std=float(data.get("std", 1.0)),
        )


def _kind_of(dtype: pl.DataType) -> FeatureKind | None:
    if dtype.is_float():
        return "numeric"
    if dtype.is_integer() or dtype in (pl.String, pl.Boolean) or isinstance(dtype, pl.Categorical | pl.Enum):
        return "categorical"
    if isinstance(dtype, pl.List):
        inner = dtype.inner
        if inner is not None and (
            inner.is_integer() or inner == pl.String or isinstance(inner, pl.Categorical)
        ):
            return "tags"
    return None


def _codes(values: pl.Series, vocabulary: Sequence[str]) -> np.ndarray:
    """int64 codes of string-cast ``values``: ``1 + position`` in ``vocabulary``, 0 when absent or null."""
    return (
        values.cast(pl.String)
        .replace_strict(
            list(vocabulary), list(range(1, len(vocabulary) + 1)), default=0, return_dtype=pl.Int64
        )
        .fill_null(0)
        .to_numpy()
    )


def _vocabulary(values: pl.Series) -> tuple[str, ...]:
    return tuple(values.cast(pl.String).drop_nulls().unique().sort().to_list())


@dataclass(frozen=True)
class ItemFeatureTensors:
    """Encoded item features for ``n_items`` items, row ``n`` = item number ``n``.

    Attributes:
        specs: one per feature column, in the order of the ``columns`` argument.
        categorical: int64 ``[n_items, n_categorical]`` codes, column ``j`` = the ``j``-th
            categorical spec.
        numeric: float32 ``[n_items, n_numeric]`` standardised values.
        tag_indptr: per tags spec, int64 ``[n_items + 1]``.
        tag_indices: per tags spec, int64 ``[nnz]`` codes in ``1..V``.
    """

    specs: tuple[FeatureSpec, ...]
    categorical: Tensor
    numeric: Tensor
    tag_indptr: tuple[Tensor, ...]
    tag_indices: tuple[Tensor, ...]

    @property
    def n_items(self) -> int:
        return int(self.categorical.shape[0])

    def specs_of(self, kind: FeatureKind) -> tuple[FeatureSpec, ...]:
        """The specs of one kind, in column order (the order of the matching tensor columns)."""
        return tuple(s for s in self.specs if s.kind == kind)

    @classmethod
    def from_frame(
        cls,
        items: pl.DataFrame,
        item_ids_in_num_order: Any,
        columns: Sequence[str],
        *,
        state: dict[str, Any] | None = None,
    ) -> ItemFeatureTensors:
        """Encode ``columns`` of an item table for the items listed in ``item_ids_in_num_order``.

        Args:
            items: one row per item: ``item_id`` and the feature columns. Items of
                ``item_ids_in_num_order`` missing from the table get missing values (code 0, mean).
            item_ids_in_num_order: external ids (polars Series, numpy array or list); position
                ``n`` is item number ``n``, e.g. ``Vocabulary.ids()``.
            columns: feature columns to encode; ignored when ``state`` is given.
            state: :meth:`state` of the tensors built on the training catalog: reuse its kinds,
                vocabularies and statistics (cold items); values it never saw get code 0.

        Raises:
            DataError: a column is missing or has an unsupported dtype, ``item_id`` is missing or
                repeated, or a column's dtype contradicts ``state``.
        """
        if "item_id" not in items.columns:
            raise DataError(
                f"item table ({items.height} rows) has no item_id column (columns: {items.columns}); "
                "rename the id column to item_id"
            )
        specs_in = None
        if state is not None:
            specs_in = [FeatureSpec.from_dict(d) for d in state["features"]]
            columns = [s.name for s in specs_in]
        missing = [c for c in columns if c not in items.columns]
        if missing:
            raise DataError(
                f"item table ({items.height} rows) lacks feature column(s) {missing} "
                f"(columns: {items.columns}); fix model.item_features or the item table"
            )
        n_dup = items.height - items["item_id"].n_unique()
        if n_dup:
            raise DataError(
                f"item table ({items.height} rows) repeats {n_dup} item_id value(s); keep one row per item"
            )
        ids = (
            item_ids_in_num_order
            if isinstance(item_ids_in_num_order, pl.Series)
            else pl.Series(np.asarray(item_ids_in_num_order))
        )
        table = items.select("item_id", *columns)
        if table["item_id"].dtype != ids.dtype:
            try:
                table = table.with_columns(pl.col("item_id").cast(ids.dtype))
            except pl.exceptions.InvalidOperationError:
                raise DataError(
                    f"item table item_id has dtype {items['item_id'].dtype} but the item vocabulary holds "
                    f"{ids.dtype}; use the same id type in both"
                ) from None
        aligned = pl.DataFrame({"item_id": ids}).join(table, on="item_id", how="left", maintain_order="left")
        n = ids.len()

        specs: list[FeatureSpec] = []
        cat_cols: list[np.ndarray] = []
        num_cols: list[np.ndarray] = []
        indptrs: list[Tensor] = []
        indices: list[Tensor] = []
        for j, name in enumerate(columns):
            col = aligned[name]
            kind = _kind_of(col.dtype)
            if kind is None:
                raise DataError(
                    f"item table column {name!r} has dtype {col.dtype}: use a string/integer column "
                    "(categorical), a float column (numeric) or a list of strings/integers (tags)"
                )
            prior = specs_in[j] if specs_in is not None else None
            if prior is not None and prior.kind != kind:
                raise DataError(
                    f"item table column {name!r} has dtype {col.dtype} ({kind}) but the model was "
                    f"trained with it as {prior.kind}; convert the column back"
                )
            if kind == "categorical":
                vocab = prior.vocabulary if prior is not None else _vocabulary(col)
                specs.append(FeatureSpec(name, kind, vocabulary=vocab))
                cat_cols.append(_codes(col, vocab))
            elif kind == "numeric":
                values = col.cast(pl.Float64).fill_nan(None)
                if prior is not None:
                    mean, std = prior.mean, prior.std
                else:
                    mean = float(values.mean()) if values.null_count() < n else 0.0
                    std_v = values.std(ddof=0) if values.null_count() < n else None
                    std = float(std_v) if std_v is not None and std_v > 0 else 1.0
                specs.append(FeatureSpec(name, kind, mean=mean, std=std))
                num_cols.append(((values - mean) / std).fill_null(0.0).to_numpy().astype(np.float32))
            else:
                lists = col.list.drop_nulls().fill_null([])
                flat = lists.explode().drop_nulls()
                vocab = prior.vocabulary if prior is not None else _vocabulary(flat)
                specs.append(FeatureSpec(name, kind, vocabulary=vocab))
                frame = pl.DataFrame({"row": np.arange(n, dtype=np.int64), "tag": lists}).explode("tag")
                frame = frame.drop_nulls("tag")
                codes = _codes(frame["tag"], vocab)
                known = codes > 0
                rows = frame["row"].to_numpy()[known]
                indptr = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
                indptrs.append(torch.from_numpy(indptr))
                indices.append(torch.from_numpy(np.ascontiguousarray(codes[known])))
        categorical = (
            torch.from_numpy(np.stack(cat_cols, axis=1))
            if cat_cols
            else torch.zeros((n, 0), dtype=torch.int64)
        )
        numeric = (
            torch.from_numpy(np.stack(num_cols, axis=1))
            if num_cols
            else torch.zeros((n, 0), dtype=torch.float32)
        )
        return cls(tuple(specs), categorical, numeric, tuple(indptrs), tuple(indices))

    def state(self) -> dict[str, Any]:
        """JSON-able description (kinds, vocabularies, statistics), without the per-item tensors."""
        return {"version": STATE_VERSION, "features": [s.to_dict() for s in self.specs]}

    def tensors(self) -> dict[str, Tensor]:
        """The per-item tensors by name (what a model stores as buffers)."""
        out = {"categorical": self.categorical, "numeric": self.numeric}
        for j, (indptr, idx) in enumerate(zip(self.tag_indptr, self.tag_indices, strict=True)):
            out[f"tag_indptr_{j}"] = indptr
            out[f"tag_indices_{j}"] = idx
        return out

    @classmethod
    def from_tensors(cls, state: dict[str, Any], tensors: dict[str, Tensor]) -> ItemFeatureTensors:
        """Inverse of :meth:`state` + :meth:`tensors`."""
        specs = tuple(FeatureSpec.from_dict(d) for d in state["features"])
        n_tags = sum(1 for s in specs if s.kind == "tags")
        return cls(
            specs=specs,
            categorical=tensors["categorical"],
            numeric=tensors["numeric"],
            tag_indptr=tuple(tensors[f"tag_indptr_{j}"] for j in range(n_tags)),
            tag_indices=tuple(tensors[f"tag_indices_{j}"] for j in range(n_tags)),
        )

    def to(self, device: torch.device | str) -> ItemFeatureTensors:
        """A copy with every tensor on ``device``."""
        return ItemFeatureTensors(
            self.specs,
            self.categorical.to(device),
            self.numeric.to(device),
            tuple(t.to(device) for t in self.tag_indptr),
            tuple(t.to(device) for t in self.tag_indices),
        )


def csr_rows(indptr: Tensor, indices: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gather CSR rows: the concatenated entries of ``rows``, each entry's position in ``rows``, and
    where each row starts.

    Vectorised (no Python loop): entry ``t`` of the output belongs to ``rows[segment[t]]``; the
    layout is the ``(input, offsets)`` pair that ``F.embedding_bag`` takes.

    Args:
        indptr: int64 ``[n + 1]``.
        indices: ``[nnz]``.
        rows: int64 ``[B]`` row numbers (repeats allowed).

    Returns:
        ``(values [T], segment [T], offsets [B])`` with ``T`` the summed row lengths; ``segment``
        int64 in ``[0, B)``; ``offsets[b]`` is where row ``b``'s entries start in ``values``.
    """
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    segment = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    positions = torch.arange(segment.shape[0], device=rows.device) - first[segment] + starts[segment]
    return indices[positions], segment, first
