"""Train, evaluate and export one run: the model half of the nightly pipeline, without Prefect.

``train_run`` writes a complete run directory (the contract in ARCHITECTURE.md)::

    run_dir/
      rejects.parquet, users.parquet, items.parquet       from prepare_dataset
      interactions.parquet, triplets.parquet, data_report.json
      model.pt                  state_dict only: torch.load(path, weights_only=True)
      model.json                construction arguments (TwoTowerModel.hparams) + run id
      user_embeddings.parquet   user_id, embedding fixed_size_list<float32>[dim]; metadata distance/dim/run_id
      item_embeddings.parquet   item_id, embedding (same form)
      holdout/                  the holdout model's user/item embeddings (what a later run's
                                quality gate scores: it never trained on a holdout row)
      items.ann, index.json     Annoy index (id = row of item_embeddings.parquet) and its sidecar
      metrics.json              holdout metrics of the model and popularity per K, index recall@10
                                against exact search, training history

How the holdout is used, so that nothing leaks:

1. ``split`` (temporal by default) cuts the log into train and test.
2. The train rows are cut again (same method, ``split.validation_fraction``) into fit and
   validation rows; early stopping on validation Recall@K picks the number of epochs.
3. That model, which never saw a test row, is evaluated on test beside popularity (fitted on the
   same train rows): these are the figures in ``metrics.json`` and the ones a quality gate reads.
4. With ``train.refit`` (default) a fresh model trains on the whole log for the chosen number of
   epochs; that model is exported. It has no honest test score (it saw the test rows), so
   ``metrics.json`` records its training history only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_metric import __version__
from recsys_metric.config import Config, SplitConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.prepare import PreparedData, prepare_dataset
from recsys_metric.data.split import split_interactions
from recsys_metric.device import resolve_device
from recsys_metric.evaluate import (
    EvaluationResult,
    ScoreFn,
    evaluate_scores,
    evaluate_with_baselines,
    training_items_mask,
)
from recsys_metric.export import write_embeddings
from recsys_metric.index import build_index
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.registry import HOLDOUT_DIR, new_run_id
from recsys_metric.train import TrainData, TrainResult, fit
from recsys_metric.triplets import popularity_probs

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
MODEL_JSON = "model.json"
METRICS_FILE = "metrics.json"


def _matrix(frame: pl.DataFrame, n_users: int, n_items: int) -> InteractionMatrix:
    return InteractionMatrix.from_pairs(
        frame["user_num"].to_numpy(), frame["item_num"].to_numpy(), n_users, n_items
    )


def train_data(frame: pl.DataFrame, n_users: int, n_items: int, config: Config) -> TrainData:
    """The trainer's input from labelled, encoded interaction rows (any split)."""
    liked = frame.filter(pl.col("label") == 1)
    disliked = frame.filter(pl.col("label") == -1)
    item_probs = None
    if config.triplets.sampling == "popularity":
        item_probs = popularity_probs(frame["item_num"].to_numpy(), n_items, config.triplets.popularity_alpha)
    return TrainData(
        user_num=liked["user_num"].to_numpy(),
        item_num=liked["item_num"].to_numpy(),
        seen=_matrix(frame, n_users, n_items),
        n_users=n_users,
        n_items=n_items,
        dislikes=_matrix(disliked, n_users, n_items) if disliked.height else None,
        item_probs=item_probs,
    )


def model_score_fn(model: TwoTowerModel) -> ScoreFn:
    """``user_nums -> [B, n_items]`` scores of ``model`` (no gradients, on the model's device).

    Item vectors are computed once per call of this factory, not per batch.
    """
    with torch.no_grad():
        items = model.item_embeddings()

    def score(user_nums: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            users = model.user_embeddings(torch.as_tensor(np.asarray(user_nums), device=model.device))
            return model.distance.score(users, items)

    return score


def _sample_users(test: InteractionMatrix, max_users: int | None, seed: int) -> np.ndarray | None:
    users = np.flatnonzero(test.row_lengths() > 0)
    if max_users is None or users.size <= max_users:
        return None
    return np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))


def build_model(
    prepared: PreparedData,
    config: Config,
    history: InteractionMatrix | None,
    items_table: pl.DataFrame | None,
) -> TwoTowerModel:
    """A fresh model for the prepared vocabularies (features and history when the config needs them)."""
    features = None
    if config.model.item_features:
        if items_table is None:
            from recsys_metric.errors import ConfigError

            raise ConfigError(
                f"model.item_features {list(config.model.item_features)} needs an item table: pass items=PATH "
                "(a Parquet file with item_id and the feature columns)"
            )
        features = ItemFeatureTensors.from_frame(
            items_table, prepared.items.ids(), config.model.item_features
        )
    needs_history = config.model.user_tower in ("pooled", "hybrid")
    return TwoTowerModel(
        len(prepared.users),
        len(prepared.items),
        config.model,
        item_features=features,
        user_history=history if needs_history else None,
        seed=config.train.seed,
    )


@dataclass
class RunResult:
    """What :func:`train_run` produced."""

    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    evaluation: EvaluationResult
    prepared: PreparedData
    model: TwoTowerModel
    holdout_training: TrainResult
    refit_training: TrainResult | None
    seconds: dict[str, float] = field(default_factory=dict)


def _holdout_validation(
    train: pl.DataFrame, config: Config, n_users: int, n_items: int
) -> tuple[pl.DataFrame, InteractionMatrix, InteractionMatrix]:
    """Cut the training rows into fit rows and a validation set for early stopping."""
    val_split = split_interactions(
        train,
        SplitConfig(
            method=config.split.method,
            test_fraction=config.split.validation_fraction,
            min_user_interactions=config.split.min_user_interactions,
            seed=config.split.seed + 1,
        ),
    )
    fit_rows = val_split.train
    val_liked = val_split.test.filter(pl.col("label") == 1)
    return fit_rows, _matrix(fit_rows, n_users, n_items), _matrix(val_liked, n_users, n_items)


def train_run(
    interactions: str | Path,
    run_dir: str | Path,
    config: Config | None = None,
    *,
    items: str | Path | None = None,
    run_id: str | None = None,
    progress: bool | None = None,
    build_ann: bool = True,
) -> RunResult:
    """Prepare the data, train with early stopping, evaluate on the holdout, refit, export.

    Args:
        interactions: the interaction log (file, Parquet directory or glob).
        run_dir: directory to fill (created; files in it are overwritten).
        config: pipeline config; defaults everywhere when None.
        items: item table (Parquet with ``item_id`` and feature columns), needed when
            ``model.item_features`` names columns.
        run_id: id recorded in the exported files; a new one when None.
        progress: progress bars (None: when stderr is a terminal).
        build_ann: build the Annoy index (``items.ann`` + ``index.json``) and record its recall@10
            against exact search under ``metrics["index"]``.

    Returns:
        The run's metrics, evaluation, model (the exported one) and training histories.
    """
    config = config or Config()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = run_id or new_run_id()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    prepared = prepare_dataset(interactions, run_dir, config)
    seconds["prepare"] = time.perf_counter() - t0
    n_users, n_items = len(prepared.users), len(prepared.items)
    items_table = pl.read_parquet(items) if items is not None else None
    full = prepared.interactions
    train = full.filter(pl.col("split") == "train")
    test_liked = full.filter((pl.col("split") == "test") & (pl.col("label") == 1))
    train_seen = _matrix(train, n_users, n_items)
    test_relevant = _matrix(test_liked, n_users, n_items)
    candidates = training_items_mask(train_seen)

    t = time.perf_counter()
    fit_rows, fit_seen, val_relevant = _holdout_validation(train, config, n_users, n_items)
    fit_data = train_data(fit_rows, n_users, n_items, config)
    k_stop = config.train.early_stopping_k
    val_users = _sample_users(val_relevant, config.eval.validation_max_users, config.eval.seed)
    val_candidates = training_items_mask(fit_seen)

    def validate(m: TwoTowerModel) -> dict[str, float]:
        return evaluate_scores(
            model_score_fn(m),
            fit_seen,
            val_relevant,
            ks=(k_stop,),
            candidate_mask=val_candidates,
            users=val_users,
        )

    holdout_model = build_model(
        prepared, config, _matrix(fit_rows.filter(pl.col("label") == 1), n_users, n_items), items_table
    )
    holdout = fit(
        holdout_model,
        fit_data,
        config.train,
        explicit_share=config.train.explicit_share,
        validate=validate,
        progress=progress,
    )
    seconds["train_holdout"] = time.perf_counter() - t

    t = time.perf_counter()
    evaluation = evaluate_with_baselines(
        model_score_fn(holdout_model), train_seen, test_relevant, config.eval, candidate_mask=candidates
    )
    seconds["evaluate"] = time.perf_counter() - t
    logger.info("holdout evaluation:\n%s", evaluation.to_table())

    final_model, refit = holdout_model, None
    if config.train.refit:
        t = time.perf_counter()
        epochs = holdout.best_epoch or holdout.epochs_run
        final_model = build_model(
            prepared, config, _matrix(full.filter(pl.col("label") == 1), n_users, n_items), items_table
        )
        refit = fit(
            final_model,
            train_data(full, n_users, n_items, config),
            config.train,
            explicit_share=config.train.explicit_share,
            epochs=epochs,
            progress=progress,
        )
        seconds["train_refit"] = time.perf_counter() - t

    t = time.perf_counter()
    if refit is not None:
        # A later run's quality gate scores this model, never the refit one (see registry).
        (run_dir / HOLDOUT_DIR).mkdir(exist_ok=True)
        export_embeddings(holdout_model, prepared, run_dir / HOLDOUT_DIR, run_id)
    export_model(final_model, prepared, run_dir, run_id)
    seconds["export"] = time.perf_counter() - t

    index_metrics = None
    if build_ann:
        t = time.perf_counter()
        index_metrics = build_index(run_dir, config.index)
        seconds["index"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0

    metrics = {
        "run_id": run_id,
        "library_version": __version__,
        "holdout": evaluation.to_dict(),
        "early_stopping": {
            "metric": f"recall@{k_stop}",
            "best_epoch": holdout.best_epoch,
            "best_validation": holdout.best_metric,
            "epochs_run": holdout.epochs_run,
            "stopped_early": holdout.stopped_early,
        },
        "published_model": "refit_on_full_log" if refit is not None else "holdout_model",
        "training": {
            "holdout": holdout.to_dict(),
            "refit": refit.to_dict() if refit is not None else None,
        },
        "index": index_metrics,
        "data": prepared.report(),
        "device": holdout.device,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    _write_json(run_dir / METRICS_FILE, metrics)
    return RunResult(
        run_id=run_id,
        run_dir=run_dir,
        metrics=metrics,
        evaluation=evaluation,
        prepared=prepared,
        model=final_model,
        holdout_training=holdout,
        refit_training=refit,
        seconds=seconds,
    )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def export_embeddings(model: TwoTowerModel, prepared: PreparedData, out_dir: Path, run_id: str) -> None:
    """Write ``user_embeddings.parquet`` and ``item_embeddings.parquet`` of ``model`` into ``out_dir``."""
    model = model.to("cpu").eval()
    with torch.no_grad():
        users = model.user_embeddings().contiguous().numpy()
        items = model.item_embeddings().contiguous().numpy()
    distance = model.config.distance
    for kind, vocab, vectors in (("user", prepared.users, users), ("item", prepared.items, items)):
        write_embeddings(
            out_dir / f"{kind}_embeddings.parquet",
            vocab.ids(),
            vectors,
            kind=kind,
            distance=distance,
            run_id=run_id,
        )


def export_model(model: TwoTowerModel, prepared: PreparedData, run_dir: Path, run_id: str) -> None:
    """Write ``model.pt``, ``model.json`` and both embedding tables for ``model``."""
    export_embeddings(model, prepared, run_dir, run_id)
    model = model.to("cpu").eval()
    tmp = run_dir / (MODEL_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, run_dir / MODEL_FILE)
    _write_json(run_dir / MODEL_JSON, {"run_id": run_id, "hparams": model.hparams()})


def load_model(run_dir: str | Path, device: str = "cpu") -> TwoTowerModel:
    """Rebuild the exported model of a run directory (``model.pt`` + ``model.json``)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / MODEL_JSON).read_text())
    state = torch.load(run_dir / MODEL_FILE, weights_only=True, map_location="cpu")
    model = TwoTowerModel.from_hparams(meta["hparams"], state)
    return model.to(resolve_device(device)).eval()
