"""Warm start: begin a run's training from the previous run's model instead of random vectors.

Rows are matched by external id. A user or item the previous run knew starts from its learned
vector; a new one keeps the fresh initialisation (new users and items are appended, in effect).
Parameters that are not per-row (the pooled tower's map, the feature map, item-feature
embeddings) are copied when the previous model had the same shape of them.

Two models train in a run, and each warm-starts from the matching model of the previous run, so
that nothing leaks into the figures the quality gate reads:

- the holdout model (early stopping, holdout metrics) starts from the previous run's holdout
  model (``holdout/model.pt``), which trained only on that run's fit rows: rows at or before its
  validation cut-off. With the temporal split and an append-only log, those rows are all fit rows
  of this run when the previous validation cut-off is at or before this run's one; that is
  checked, and anything else (a random holdout, a cut-off that moved back, another id type, another
  model shape) falls back to a cold start with the reason recorded;
- the refit model (published) starts from the previous published model (``model.pt``), which
  saw the whole previous log; this refit sees the whole log too.

The optimiser starts fresh; the saving comes from early stopping, which meets a model that is
already good and stops after a few epochs instead of climbing from random vectors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys_metric.data.vocab import Vocabulary
from recsys_metric.model.towers import TwoTowerModel

logger = logging.getLogger(__name__)

HOLDOUT_MODEL = "holdout/model.pt"
MODEL_FILE = "model.pt"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"

# Per-row tables: matched by id. Everything else is copied whole when its shape matches.
_USER_ROWS = ("user_embedding.weight",)
_ITEM_ROWS = ("item_embedding.weight",)


@dataclass(frozen=True)
class WarmStartPlan:
    """Where the two models of a run start from.

    Attributes:
        source_run_dir: the previous run directory (resolved, e.g. what ``current`` points to).
        source_run_id: its run id.
        holdout_state: state dict of its holdout model (``holdout/model.pt``).
        final_state: state dict of its published model (``model.pt``).
        users: its user vocabulary.
        items: its item vocabulary.
        same_features: its item-feature vocabularies equal this run's, so the feature
            embeddings mean the same values and may be copied.
        source_lr: the learning rate its holdout fit chose or was set to, before any warm-start
            scaling (``metrics.json``: ``warm_start.lr_base`` of a warm run, else
            ``early_stopping.lr``); None for runs that predate ``train.lr: auto``.
    """

    source_run_dir: Path
    source_run_id: str
    holdout_state: dict[str, torch.Tensor]
    final_state: dict[str, torch.Tensor]
    users: Vocabulary
    items: Vocabulary
    same_features: bool
    source_lr: float | None = None


def _model_shape(hparams: dict[str, Any]) -> dict[str, Any]:
    """What must agree between two models for one to start from the other (init_scale may differ)."""
    model = dict(hparams.get("model", {}))
    model.pop("init_scale", None)
    # Runs from before the setting existed read as its default.
    if model.setdefault("feature_training", "fitted") == "fitted":
        # A fitted feature tower does not shape the trained model (it trains on ids only): a run
        # may start from another whatever their item features.
        model.pop("item_features", None)
    return model


def _full_item_vectors(hparams: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a model with a feature tower as an ids-only model's: each item's id row
    becomes its whole raw vector (id part plus features), the feature tables are dropped. What a
    run under ``model.feature_training: fitted`` (it trains on ids only) starts from."""
    previous = TwoTowerModel.from_hparams(hparams, state)
    with torch.no_grad():
        vectors = previous._item_raw(None).detach().clone()
    out = {k: v for k, v in state.items() if not k.startswith("item_encoder.")}
    out["item_embedding.weight"] = vectors
    return out


def plan_warm_start(
    previous_run_dir: str | Path | None,
    model: TwoTowerModel,
    *,
    split_method: str,
    validation_cutoff: datetime | None,
) -> tuple[WarmStartPlan | None, str]:
    """Check that a run may warm-start from ``previous_run_dir`` and load what it needs.

    Args:
        previous_run_dir: the run to start from (None: there is none, e.g. the first run).
        model: a freshly built model of this run (its configuration is compared).
        split_method: this run's split method as applied (``SplitInfo.method``).
        validation_cutoff: this run's validation cut-off (fit rows are at or before it).

    Returns:
        ``(plan, reason)``: a plan and why it applies, or None and why this run starts cold.
    """
    if previous_run_dir is None:
        return None, "cold start: there is no current run to start from"
    src = Path(previous_run_dir).resolve()
    try:
        metrics = json.loads((src / METRICS_FILE).read_text())
        meta = json.loads((src / MODEL_JSON).read_text())
    except (OSError, ValueError) as exc:
        return None, f"cold start: cannot read {src.name}'s metrics.json/model.json ({exc})"
    run_id = str(meta.get("run_id", src.name))
    # Without a refit the published model is the holdout model and is stored once, as model.pt.
    holdout_path = src / (MODEL_FILE if metrics.get("published_model") == "holdout_model" else HOLDOUT_MODEL)
    if not holdout_path.is_file():
        return None, f"cold start: run {run_id} has no {HOLDOUT_MODEL} (it predates warm start)"
    if _model_shape(meta.get("hparams", {})) != _model_shape(model.hparams()):
        return None, f"cold start: run {run_id} has another model configuration (model section differs)"
    if split_method != "temporal":
        return None, (
            f"cold start: this run's split is {split_method!r}; warm start needs the temporal split, "
            "since a random holdout may hold rows the previous model trained on"
        )
    previous_cut = (metrics.get("early_stopping") or {}).get("validation_cutoff")
    if previous_cut is None or validation_cutoff is None:
        return None, f"cold start: run {run_id} or this run has no temporal validation cut-off"
    previous_cut_at = datetime.fromisoformat(previous_cut)
    if _naive(previous_cut_at) > _naive(validation_cutoff):
        return None, (
            f"cold start: run {run_id}'s validation cut-off {previous_cut} is after this run's "
            f"{validation_cutoff.isoformat()}: its model saw rows this run validates or tests on"
        )
    try:
        holdout_state = torch.load(holdout_path, weights_only=True, map_location="cpu")
        final_state = torch.load(src / MODEL_FILE, weights_only=True, map_location="cpu")
        if model.item_encoder is None and any(k.startswith("item_encoder.") for k in final_state):
            holdout_state = _full_item_vectors(meta["hparams"], holdout_state)
            final_state = _full_item_vectors(meta["hparams"], final_state)
        plan = WarmStartPlan(
            source_run_dir=src,
            source_run_id=run_id,
            holdout_state=holdout_state,
            final_state=final_state,
            users=Vocabulary.load(src / USERS_FILE),
            items=Vocabulary.load(src / ITEMS_FILE),
            same_features=meta["hparams"].get("item_features") == model.hparams().get("item_features"),
            source_lr=_base_lr(metrics),
        )
    except Exception as exc:  # a damaged previous run must not stop tonight's run
        return None, f"cold start: cannot load run {run_id}'s model or vocabularies ({exc})"
    return (
        plan,
        f"warm start from run {run_id} (validation cut-off {previous_cut} <= {validation_cutoff.isoformat()})",
    )


def _base_lr(metrics: dict[str, Any]) -> float | None:
    """The unscaled rate of a run: a warm run's ``warm_start.lr_base`` (so that the scaling does
    not compound night after night), else the rate its holdout fit trained at."""
    warm = metrics.get("warm_start") or {}
    lr = warm.get("lr_base") if warm.get("enabled") else (metrics.get("early_stopping") or {}).get("lr")
    return float(lr) if isinstance(lr, (int, float)) and lr > 0 else None


def _naive(moment: datetime) -> datetime:
    """Cut-offs compare in UTC; a naive one is taken as UTC already."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _row_map(previous: Vocabulary, current: Vocabulary) -> np.ndarray:
    """``[len(current)]`` int64: the previous number of each current id, -1 for a new id."""
    return np.asarray(previous.numbers(current.ids(), missing="negative"), dtype=np.int64)


def warm_start_model(
    model: TwoTowerModel,
    state: dict[str, torch.Tensor],
    previous_users: Vocabulary,
    previous_items: Vocabulary,
    users: Vocabulary,
    items: Vocabulary,
    *,
    same_features: bool = True,
) -> dict[str, int]:
    """Copy the previous model's learned values into ``model`` in place, matching rows by id.

    Args:
        model: a freshly initialised model over ``users`` x ``items``.
        state: the previous model's state dict (same model configuration).
        previous_users, previous_items: the previous run's vocabularies (rows of ``state``).
        users, items: this run's vocabularies (rows of ``model``).
        same_features: the item-feature vocabularies are the previous run's; when not, the
            feature embeddings keep their fresh initialisation (a value's row may have moved).

    Returns:
        Counts: ``users_carried``, ``users_new``, ``items_carried``, ``items_new``,
        ``tensors_copied`` (non-row parameters copied whole).
    """
    user_rows = _row_map(previous_users, users)
    item_rows = _row_map(previous_items, items)
    copied = 0
    with torch.no_grad():
        # Parameters only: buffers (liked-item history, per-item feature codes) describe this run's data.
        for name, param in model.named_parameters():
            target = param.data
            if name not in state:
                continue
            if name.startswith("item_encoder.") and not same_features:
                continue
            source = state[name].to(target.device, target.dtype)
            rows = user_rows if name in _USER_ROWS else item_rows if name in _ITEM_ROWS else None
            if rows is None:
                if source.shape == target.shape:
                    target.copy_(source)
                    copied += 1
                continue
            known = np.flatnonzero(rows >= 0)
            if known.size:
                index = torch.from_numpy(known).to(target.device)
                target.index_copy_(
                    0, index, source.index_select(0, torch.from_numpy(rows[known]).to(source.device))
                )
    return {
        "users_carried": int((user_rows >= 0).sum()),
        "users_new": int((user_rows < 0).sum()),
        "items_carried": int((item_rows >= 0).sum()),
        "items_new": int((item_rows < 0).sum()),
        "tensors_copied": copied,
    }
