"""Catalog items without interactions: appended to a trained model, placed by their features alone.

The item vocabulary of a run holds the items of its interaction log. An item table (``--items``)
usually lists more: new products, papers nobody saved yet. :func:`add_catalog_items` appends those
to the vocabulary (after every known item, sorted, so known item numbers do not move) and returns
a copy of the trained model over the longer vocabulary: every learned tensor carried over, the new
items' id rows zero, their feature codes encoded with the model's own vocabularies (a value the
model never saw maps to the missing code). A new item's vector is therefore the item tower on its
features alone, exactly what :func:`recsys_metric.item_embedder.ItemEmbedder.embed` gives for an
item that appears after the run.

The copy is made after training, so training, early stopping and the holdout figures are those of
the interaction log alone; the appended items never serve as sampled negatives.

An appended item without any known feature value (every categorical value null or unseen, every
numeric value null, no known tag) would land on the one point all such items share; it is left out
and counted (``skipped_no_features``), with its ids logged.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel

logger = logging.getLogger(__name__)

_ID_ROW_TABLES = ("item_embedding.weight",)


@dataclass(frozen=True)
class CatalogItems:
    """What :func:`add_catalog_items` did.

    Attributes:
        n_table: rows of the item table.
        n_added: items appended to the vocabulary (rows ``n_known .. n_known + n_added - 1``).
        n_known: items of the vocabulary before (the interaction log's).
        skipped_no_features: ids of the table's new items left out for having no known feature.
        reason: why nothing was added when ``n_added`` is 0 and the table had new items.
    """

    n_table: int
    n_added: int
    n_known: int
    skipped_no_features: list[Any] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "items_in_table": self.n_table,
            "items_known": self.n_known,
            "items_added": self.n_added,
            "skipped_no_features": len(self.skipped_no_features),
            "skipped_examples": [str(x) for x in self.skipped_no_features[:10]],
            "reason": self.reason,
        }


def featureless_mask(items: pl.DataFrame, ids: pl.Series, state: dict[str, Any]) -> np.ndarray:
    """bool ``[len(ids)]``: items with no known feature value under the model's feature ``state``.

    Known means: a categorical value in the vocabulary, a non-null non-NaN numeric value, or at
    least one tag in the vocabulary. An id absent from ``items`` has no feature at all.
    """
    features = ItemFeatureTensors.from_frame(items, ids, (), state=state)
    known = np.zeros(len(ids), dtype=bool)
    if features.categorical.shape[1]:
        known |= (features.categorical.numpy() > 0).any(axis=1)
    for indptr in features.tag_indptr:
        known |= np.diff(indptr.numpy()) > 0
    numeric = [s.name for s in features.specs if s.kind == "numeric"]
    if numeric:
        table = items.select("item_id", *numeric).with_columns(pl.col("item_id").cast(ids.dtype))
        aligned = pl.DataFrame({"item_id": ids}).join(table, on="item_id", how="left", maintain_order="left")
        for name in numeric:
            col = aligned[name].cast(pl.Float64).fill_nan(None)
            known |= col.is_not_null().to_numpy()
    return ~known


def extend_items(model: TwoTowerModel, features: ItemFeatureTensors) -> TwoTowerModel:
    """A copy of ``model`` over ``features.n_items >= model.n_items`` items (the first
    ``model.n_items`` rows are the model's items): learned tensors copied, new id rows zero.

    Raises:
        ValueError: ``features`` has fewer rows than the model, or the model has no feature tower.
    """
    if model.item_encoder is None:
        raise ValueError("only a model with item features can place items without interactions")
    n_new = features.n_items - model.n_items
    if n_new < 0:
        raise ValueError(f"features cover {features.n_items} items, fewer than the model's {model.n_items}")
    model = model.to("cpu")
    history = None
    if model.pool is not None:
        history = InteractionMatrix(
            indptr=model.history_indptr.numpy(),
            indices=model.history_indices.numpy().astype(np.int32),
            n_users=model.n_users,
            n_items=features.n_items,
        )
    out = TwoTowerModel(
        model.n_users, features.n_items, model.config, item_features=features, user_history=history, seed=0
    )
    state = model.state_dict()
    fresh = out.state_dict()
    with torch.no_grad():
        for name, tensor in fresh.items():
            if name.startswith("item_encoder.") and name[len("item_encoder.") :] in features.tensors():
                continue  # the new catalog's feature codes (buffers)
            source = state[name]
            if name in _ID_ROW_TABLES:
                tensor.zero_()
                tensor[: model.n_items].copy_(source)
            else:
                tensor.copy_(source)
    out.load_state_dict(fresh)
    return out.eval()


def add_catalog_items(
    model: TwoTowerModel, items: Vocabulary, table: pl.DataFrame | None
) -> tuple[TwoTowerModel, Vocabulary, CatalogItems]:
    """Append the item table's items that ``items`` lacks to the vocabulary and the model.

    Args:
        model: a trained model over ``items``.
        items: the run's item vocabulary (rows of ``model``).
        table: the item table (``item_id`` and feature columns), or None.

    Returns:
        ``(model, items, info)``: the extended copies, or the inputs unchanged when there is
        nothing to add (no table, no new id, or a model without item features: ``info.reason``).
    """
    n_known = len(items)
    if table is None:
        return model, items, CatalogItems(0, 0, n_known)
    ids = table["item_id"].drop_nulls()
    if ids.dtype != items.id_dtype:
        ids = ids.cast(items.id_dtype, strict=False).drop_nulls()
    new = pl.DataFrame({"item_id": ids.unique()}).filter(~pl.col("item_id").is_in(items.ids().implode()))
    new_ids = new["item_id"].sort()
    if new_ids.len() == 0:
        return model, items, CatalogItems(table.height, 0, n_known)
    state = model.feature_state()
    if state is None:
        reason = (
            f"{new_ids.len()} item(s) of the item table have no interactions and the model has no item "
            "features (model.item_features) to place them: they are not exported"
        )
        logger.warning("%s", reason)
        return model, items, CatalogItems(table.height, 0, n_known, reason=reason)
    bare = featureless_mask(table, new_ids, state)
    skipped = new_ids.filter(pl.Series(bare)).to_list()
    if skipped:
        logger.warning(
            "%d item(s) of the item table have neither interactions nor any known feature value and are "
            "left out (first: %s); give them at least one feature value the model knows",
            len(skipped),
            skipped[:5],
        )
    kept = new_ids.filter(pl.Series(~bare))
    if kept.len() == 0:
        return model, items, CatalogItems(table.height, 0, n_known, skipped_no_features=skipped)
    extended = items.extend(kept)
    features = ItemFeatureTensors.from_frame(table, extended.ids(), (), state=state)
    return (
        extend_items(model, features),
        extended,
        CatalogItems(table.height, kept.len(), n_known, skipped_no_features=skipped),
    )


def save_item_tower(model: TwoTowerModel, run_dir: str | Path) -> Path | None:
    """Write ``item_tower.npz`` (:mod:`recsys_metric.item_embedder`) for a model with item features.

    Returns:
        The path written, or None for a model without item features (nothing to write).
    """
    from recsys_metric.item_embedder import ITEM_TOWER_FILE, ITEM_TOWER_FORMAT

    encoder = model.item_encoder
    if encoder is None:
        return None
    weights: dict[str, np.ndarray] = {"id": model.item_embedding.weight.detach().cpu().numpy()}
    for j, emb in enumerate(encoder.cat_embeddings):
        weights[f"cat_{j}"] = emb.weight.detach().cpu().numpy()
    for j, emb in enumerate(encoder.tag_embeddings):
        weights[f"tag_{j}"] = emb.weight.detach().cpu().numpy()
    if encoder.numeric_linear is not None:
        weights["numeric"] = encoder.numeric_linear.weight.detach().cpu().numpy()
    if bool(encoder.offset.any()):
        weights["offset"] = encoder.offset.detach().cpu().numpy()
    if model.feature_map is not None:
        weights["feature_map"] = model.feature_map.weight.detach().cpu().numpy()
    meta = {
        "format": ITEM_TOWER_FORMAT,
        "distance": model.config.distance,
        "features": encoder.state()["features"],
    }
    weights["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = Path(run_dir) / ITEM_TOWER_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **weights)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
