"""Embed items from their features with numpy alone: new items after the run, no retraining, no torch.

A model with item features writes ``item_tower.npz`` into the run directory
(:func:`recsys_metric.model.catalog.save_item_tower`): the item tower's weights as plain arrays and
its feature vocabularies as JSON. The item tower is a sum of lookups, so numpy reproduces it exactly:

    raw(item) = id_row(item) + sum_categorical E_c[code] + W_numeric @ standardised
                + sum_tags mean(E_t[tag codes]) + offset
    vector    = normalise(feature_map @ raw)

with ``id_row`` zero for an item the run does not know (it is placed by its features alone), codes
``0`` (the zero row) for a missing or unseen value, ``feature_map`` the identity unless
``model.feature_map: linear``, and ``normalise`` unit length for cosine, the identity otherwise.
:meth:`ItemEmbedder.embed` of an item the run knows, with the features it was trained with, returns
its exported vector (up to float32 rounding).

The query side (``Recommender.embed_items``) calls :meth:`ItemEmbedder.load` once and
:meth:`ItemEmbedder.embed` per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import DataError

ITEM_TOWER_FILE = "item_tower.npz"
"""Item tower weights of a run with item features, beside ``model.pt``."""
ITEM_TOWER_FORMAT = "recsys_metric.item_tower/1"
_NORM_EPS = 1e-12  # as recsys_metric.model.distances.NORM_EPS (that module imports torch)


def _kind_of(dtype: pl.DataType) -> str | None:
    """As :func:`recsys_metric.model.features._kind_of` (kept torch-free here)."""
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


def _codes(values: pl.Series, vocabulary: list[str]) -> np.ndarray:
    """int64 codes: ``1 + position`` in ``vocabulary``, 0 for a null or unseen value."""
    return (
        values.cast(pl.String)
        .replace_strict(vocabulary, list(range(1, len(vocabulary) + 1)), default=0, return_dtype=pl.Int64)
        .fill_null(0)
        .to_numpy()
    )


@dataclass(frozen=True)
class ItemEmbedder:
    """The item tower of one run as numpy arrays (see the module docstring).

    Attributes:
        specs: the feature specs (``name``, ``kind``, ``vocabulary``, ``mean``, ``std``) in column order.
        weights: ``cat_j`` / ``tag_j`` ``[V + 1, D]`` (row 0 zero), ``numeric`` ``[D, n_numeric]``,
            ``id`` ``[n_items, D]``, optionally ``feature_map`` ``[D, D]`` and ``offset`` ``[D]``
            (added to every feature part: the fitted tower's intercept plus ``model.cold_item_lift``).
        distance: ``euclidean``, ``cosine`` or ``dot``.
        items: the run's item vocabulary (rows of ``weights["id"]``).
    """

    specs: tuple[dict[str, Any], ...]
    weights: dict[str, np.ndarray]
    distance: str
    items: Vocabulary

    @property
    def dim(self) -> int:
        return int(self.weights["id"].shape[1])

    @classmethod
    def load(cls, run_dir: str | Path) -> ItemEmbedder:
        """Read ``item_tower.npz`` and ``items.parquet`` of a run directory.

        Raises:
            DataError: the run has no ``item_tower.npz`` (trained without ``model.item_features``,
                or before this file existed), or it does not match ``items.parquet``.
        """
        run_dir = Path(run_dir)
        path = run_dir / ITEM_TOWER_FILE
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: only a run trained with model.item_features can embed new items "
                "from their features; retrain with item features (docs/cold-start.md)"
            )
        with np.load(path, allow_pickle=False) as npz:
            weights = {k: np.asarray(npz[k]) for k in npz.files}
        meta = json.loads(bytes(weights.pop("meta")).decode())
        if meta.get("format") != ITEM_TOWER_FORMAT:
            raise DataError(
                f"{path}: format {meta.get('format')!r} is not {ITEM_TOWER_FORMAT!r}; re-export the run"
            )
        items = Vocabulary.load(run_dir / "items.parquet")
        if len(items) != weights["id"].shape[0]:
            raise DataError(
                f"{path} holds {weights['id'].shape[0]} item rows but {run_dir / 'items.parquet'} lists "
                f"{len(items)} items; the files come from different exports"
            )
        return cls(tuple(meta["features"]), weights, meta["distance"], items)

    def encode(self, frame: pl.DataFrame, *, separator: str = "|") -> dict[str, Any]:
        """The model's codes for the rows of ``frame`` (``item_id`` + every feature column).

        A tags column may be a list column or a delimited string (split on ``separator``).

        Returns:
            ``{"categorical": int64 [M, n_cat], "numeric": float32 [M, n_num], "tags": [(indptr
            int64 [M + 1], codes int64 [nnz]), ...]}``, row ``m`` = row ``m`` of ``frame``.

        Raises:
            DataError: a feature column is missing or has a dtype of another kind than in training.
        """
        missing = [s["name"] for s in self.specs if s["name"] not in frame.columns]
        if missing:
            raise DataError(
                f"item frame ({frame.height} rows) lacks the feature column(s) {missing} the model was "
                f"trained with (columns: {frame.columns}); add them (null = missing value)"
            )
        n = frame.height
        cat, num, tags = [], [], []
        for spec in self.specs:
            name, kind = spec["name"], spec["kind"]
            col = frame[name]
            if kind == "tags" and (col.dtype == pl.String or isinstance(col.dtype, pl.Categorical)):
                col = col.cast(pl.String).str.split(separator).list.eval(pl.element().str.strip_chars())
            found = _kind_of(col.dtype)
            if col.dtype == pl.Null:
                found = kind
            if found != kind:
                raise DataError(
                    f"item frame column {name!r} has dtype {col.dtype} ({found}) but the model was trained "
                    f"with it as {kind}; convert the column"
                )
            vocab = list(spec.get("vocabulary", ()))
            if kind == "categorical":
                cat.append(_codes(col, vocab))
            elif kind == "numeric":
                values = col.cast(pl.Float64).fill_nan(None)
                num.append(
                    ((values - spec["mean"]) / spec["std"]).fill_null(0.0).to_numpy().astype(np.float32)
                )
            else:
                lists = col.cast(pl.List(pl.String)).list.drop_nulls().fill_null([])
                flat = pl.DataFrame({"row": np.arange(n, dtype=np.int64), "tag": lists}).explode("tag")
                flat = flat.drop_nulls("tag")
                codes = _codes(flat["tag"], vocab)
                known = codes > 0
                indptr = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(np.bincount(flat["row"].to_numpy()[known], minlength=n), out=indptr[1:])
                tags.append((indptr, codes[known]))
        return {
            "categorical": np.stack(cat, axis=1) if cat else np.zeros((n, 0), dtype=np.int64),
            "numeric": np.stack(num, axis=1) if num else np.zeros((n, 0), dtype=np.float32),
            "tags": tags,
        }

    def feature_vectors(self, codes: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(raw [M, D] float32, known [M] bool)``: the feature part of the tower, and whether a row
        has at least one known feature value (a known code or tag, or a non-missing numeric)."""
        n = codes["categorical"].shape[0]
        out = np.zeros((n, self.dim), dtype=np.float32)
        known = np.zeros(n, dtype=bool)
        for j in range(codes["categorical"].shape[1]):
            c = codes["categorical"][:, j]
            out += self.weights[f"cat_{j}"][c]
            known |= c > 0
        if codes["numeric"].shape[1]:
            out += codes["numeric"] @ self.weights["numeric"].T
        for j, (indptr, tag_codes) in enumerate(codes["tags"]):
            lengths = np.diff(indptr)
            if tag_codes.size:
                rows = np.repeat(np.arange(n), lengths)
                sums = np.zeros((n, self.dim), dtype=np.float64)
                np.add.at(sums, rows, self.weights[f"tag_{j}"][tag_codes])
                out += (sums / np.maximum(lengths, 1)[:, None]).astype(np.float32)
            known |= lengths > 0
        if "offset" in self.weights:  # the fitted tower's intercept and lift (model.feature_fit)
            out += self.weights["offset"]
        return out, known

    def finish(self, raw: np.ndarray) -> np.ndarray:
        """Feature map (if any), then the distance's normalisation: the final ``[M, D]`` vectors."""
        if "feature_map" in self.weights:
            raw = raw @ self.weights["feature_map"].T
        if self.distance == "cosine":
            raw = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), np.float32(_NORM_EPS))
        return np.ascontiguousarray(raw, dtype=np.float32)

    def embed(self, frame: pl.DataFrame, *, separator: str = "|") -> np.ndarray:
        """Final float32 ``[M, D]`` vectors of the items of ``frame``, row ``m`` = row ``m``.

        An id the run knows keeps its learned id part (so its features as trained give back its
        exported vector); an id it does not know is placed by its features alone.

        Raises:
            DataError: ``frame`` lacks ``item_id`` or a feature column, or a new item has no known
                feature value (it would land on the point every such item shares); the message
                counts them and names the first.
        """
        if "item_id" not in frame.columns:
            raise DataError(
                f"item frame ({frame.height} rows) has no item_id column (columns: {frame.columns})"
            )
        raw, known = self.feature_vectors(self.encode(frame, separator=separator))
        nums = self.items.numbers(frame["item_id"], missing="negative")
        old = nums >= 0
        _check_placeable(frame, ~known & ~old)
        raw[old] += self.weights["id"][nums[old]]
        return self.finish(raw)

    def embed_new(self, frame: pl.DataFrame, *, separator: str = "|") -> np.ndarray:
        """As :meth:`embed` for items the caller knows the run does not have: placed by their
        features alone, without looking the ids up (a lookup in the run's vocabulary costs
        ``O(catalogue)``, about 0.25 s for a million string ids).

        Raises:
            DataError: as :meth:`embed`.
        """
        raw, known = self.feature_vectors(self.encode(frame, separator=separator))
        _check_placeable(frame, ~known)
        return self.finish(raw)


def _check_placeable(frame: pl.DataFrame, bare: np.ndarray) -> None:
    """DataError when a row of ``frame`` marked ``bare`` (a new item without any known feature
    value) would land on the point every such item shares."""
    if bare.any():
        first = frame["item_id"].filter(pl.Series(bare)).head(5).to_list()
        raise DataError(
            f"{int(bare.sum())} of {frame.height} new item(s) have no feature value the model knows "
            f"(every value missing or unseen in training; first: {first}): a new item is placed by its "
            "features alone, so give each at least one known value, or leave it out"
        )
