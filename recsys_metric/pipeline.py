"""Train, evaluate and export one run: the model half of the nightly pipeline, without Prefect.

``train_run`` writes a complete run directory (the contract in ARCHITECTURE.md) in three stages
that can also be called one by one on the same directory (the Prefect flow does):
``prepare_dataset`` (data files), :func:`train_and_evaluate` (model, embeddings, metrics.json) and
:func:`index_run` (Annoy index, recorded in metrics.json)::

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

Item-item mode (``model.mode: item_item``, the Siamese item tower): the model has no user tower.
A user is scored item-kNN style from the learned space: an item's score is its mean similarity to
the user's liked items of the rows the model may use (fit rows for early stopping, train rows for
the holdout figures, the whole log for the published model). With the similarity of the training
loss (squared euclidean distance negated, dot, cosine) that mean ranks items exactly as the
similarity to the fold-in of those items (:meth:`TwoTowerModel.fold_in_rows`: their centroid,
normalised for cosine and dot), so the user is scored through that one vector. Those vectors are what
``user_embeddings.parquet`` holds (a user without liked items gets the zero vector), so the run
directory keeps its contract: the Recommender, the batch tables and a later run's quality gate use
it unchanged, and ``score = distance(user, item)`` reproduces the evaluated rankings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from recsys_metric import __version__
from recsys_metric.cold_items import COLD_ITEMS_KEY, N_TRAIN_COLUMN
from recsys_metric.config import Config, SplitConfig
from recsys_metric.data.item_table import read_item_table
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.prepare import PreparedData, PreparedPaths, prepare_dataset
from recsys_metric.data.split import SplitInfo, split_interactions
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.device import resolve_device
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.evaluate import (
    EvaluationResult,
    ScoreFn,
    ScoresInto,
    evaluate_scores,
    evaluate_with_baselines,
    training_items_mask,
)
from recsys_metric.export import write_embeddings
from recsys_metric.index import build_index
from recsys_metric.model.catalog import add_catalog_items, save_item_tower
from recsys_metric.model.feature_fit import fit_item_features
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.registry import HOLDOUT_DIR, new_run_id
from recsys_metric.store.faults import fault_point
from recsys_metric.training import TrainData, TrainResult, fit
from recsys_metric.training.budget import TimeBudget
from recsys_metric.training.concurrent_refit import ConcurrentRefit
from recsys_metric.training.run_budget import RunPlan
from recsys_metric.training.second_phase import refit_epochs_by_phase, replay_second_phase
from recsys_metric.triplets import popularity_probs
from recsys_metric.warm_start import plan_warm_start, warm_start_model

if TYPE_CHECKING:
    from recsys_metric.distributed import DistributedTraining

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


def model_score_fn(
    model: TwoTowerModel, liked: InteractionMatrix | None = None, *, ranking: bool = False
) -> ScoreFn:
    """``user_nums -> [B, n_items]`` scores of ``model`` (no gradients, on the model's device).

    Item vectors are computed once per call of this factory, not per batch.

    Args:
        model: the model.
        liked: item-item mode only (required there): the liked items ``[n_users, n_items]`` a user
            is scored from; the user's vector is their fold-in (see the module docstring).
        ranking: scores only in the model's order (:meth:`Distance.rank_into`: euclidean
            ``2 u.i - ||i||^2``, one product), for early stopping's validation, which reads ranks
            only; the holdout evaluation and the gate score what is exported (False).

    Raises:
        ConfigError: an item-item model without ``liked``.
    """
    if model.item_item and liked is None:
        raise ConfigError("an item-item model scores users from their liked items: pass liked=")
    with torch.no_grad():
        items = model.item_embeddings()
        folded = model.fold_in_rows(liked) if model.item_item and liked is not None else None

    into = model.distance.rank_into if ranking else model.distance.score_into

    def score(user_nums: np.ndarray, out: torch.Tensor) -> None:
        with torch.no_grad():
            nums = torch.as_tensor(np.asarray(user_nums), device=model.device)
            users = folded[nums.long()] if folded is not None else model.user_embeddings(nums)
            into(users, items, out)

    # Written into the evaluator's reused buffer: no [B, n_items] allocation per batch.
    return ScoresInto(score, items.shape[0], dtype=items.dtype, device=items.device)


def _sample_users(test: InteractionMatrix, max_users: int | None, seed: int) -> np.ndarray | None:
    users = np.flatnonzero(test.row_lengths() > 0)
    if max_users is None or users.size <= max_users:
        return None
    return np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))


def build_model(
    prepared: PreparedData | RunData,
    config: Config,
    history: InteractionMatrix | None,
    items_table: pl.DataFrame | None,
) -> TwoTowerModel:
    """A fresh model to train for the prepared vocabularies (features and history when the config
    needs them). Under ``model.feature_training: fitted`` it is an ids-only model: the feature
    tower is fitted after training (:func:`fit_features`)."""
    _require_item_table(config, items_table)
    model_config = config.model.trained()
    features = item_feature_tensors(prepared, config, items_table) if model_config.item_features else None
    needs_history = config.model.user_tower in ("pooled", "hybrid")
    return TwoTowerModel(
        len(prepared.users),
        len(prepared.items),
        model_config,
        item_features=features,
        user_history=history if needs_history else None,
        seed=config.train.seed,
    )


def item_feature_tensors(
    prepared: PreparedData | RunData, config: Config, items_table: pl.DataFrame | None
) -> ItemFeatureTensors | None:
    """The vocabulary's items encoded by ``model.item_features`` (None without features).

    Raises:
        ConfigError: features are configured and there is no item table.
    """
    if not config.model.item_features:
        return None
    _require_item_table(config, items_table)
    assert items_table is not None
    return ItemFeatureTensors.from_frame(items_table, prepared.items.ids(), config.model.item_features)


def _require_item_table(config: Config, items_table: pl.DataFrame | None) -> None:
    if config.model.item_features and items_table is None:
        raise ConfigError(
            f"model.item_features {list(config.model.item_features)} needs an item table: pass items=PATH "
            "(a Parquet file with item_id and the feature columns)"
        )


def fit_features(
    model: TwoTowerModel, features: ItemFeatureTensors | None, config: Config, liked: InteractionMatrix
) -> dict[str, Any] | None:
    """Fit the feature tower of a model trained under ``model.feature_training: fitted``, in place
    (:func:`recsys_metric.model.feature_fit.fit_item_features`); None when there is none to fit
    (``features`` None: the run trains without item features or trains them jointly)."""
    if features is None or model.item_encoder is not None:
        return None
    report = fit_item_features(
        model,
        features,
        liked,
        item_features=tuple(config.model.item_features),
        seed=config.train.seed,
        lift=config.model.cold_item_lift,
    )
    logger.info(
        "item features fitted to the trained vectors: lambda %.4g, %d items, %.1f s",
        report["lambda"],
        report["targets"],
        report["seconds"],
    )
    return report


@dataclass
class RunData:
    """What the training stage reads from a prepared run directory.

    Attributes:
        interactions: every valid row (``user_num``, ``item_num`` Int32, ``label`` Int8,
            ``split``, and timestamp/rating/weight when the log has them).
        users: user vocabulary (external id <-> ``user_num``).
        items: item vocabulary (external id <-> ``item_num``).
        report: the data report (``PreparedData.report()``, ``data_report.json``).
    """

    interactions: pl.DataFrame
    users: Vocabulary
    items: Vocabulary
    report: dict[str, Any]

    @classmethod
    def of(cls, prepared: PreparedData) -> RunData:
        """The in-memory result of ``prepare_dataset`` (no file is read)."""
        return cls(prepared.interactions, prepared.users, prepared.items, prepared.report())

    @classmethod
    def load(cls, run_dir: str | Path) -> RunData:
        """Read what ``prepare_dataset`` wrote into ``run_dir``.

        Raises:
            DataError: a prepared file is missing (``prepare_dataset`` did not run into ``run_dir``).
        """
        paths = PreparedPaths.in_dir(Path(run_dir))
        missing = [
            p.name for p in (paths.interactions, paths.users, paths.items, paths.report) if not p.is_file()
        ]
        if missing:
            raise DataError(
                f"run directory {run_dir} lacks {', '.join(missing)}: run prepare_dataset(log, run_dir, config) "
                "into it before training"
            )
        return cls(
            interactions=pl.read_parquet(paths.interactions),
            users=Vocabulary.load(paths.users),
            items=Vocabulary.load(paths.items),
            report=json.loads(paths.report.read_text()),
        )


@dataclass
class RunResult:
    """What :func:`train_run` (or :func:`train_and_evaluate`) produced."""

    run_id: str
    run_dir: Path
    metrics: dict[str, Any]
    evaluation: EvaluationResult
    prepared: PreparedData | RunData
    model: TwoTowerModel
    holdout_training: TrainResult
    refit_training: TrainResult | None
    seconds: dict[str, float] = field(default_factory=dict)


def _holdout_validation(
    train: pl.DataFrame, config: Config, n_users: int, n_items: int
) -> tuple[pl.DataFrame, InteractionMatrix, InteractionMatrix, SplitInfo]:
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
    return fit_rows, _matrix(fit_rows, n_users, n_items), _matrix(val_liked, n_users, n_items), val_split.info


def train_run(
    interactions: str | Path,
    run_dir: str | Path,
    config: Config | None = None,
    *,
    items: str | Path | None = None,
    run_id: str | None = None,
    progress: bool | None = None,
    build_ann: bool = True,
    warm_start_from: str | Path | None = None,
    distributed: DistributedTraining | None = None,
) -> RunResult:
    """Prepare the data, train with early stopping, evaluate on the holdout, refit, export, index.

    The three stages are public so that an orchestrator can run them one by one on the same
    directory: ``prepare_dataset(interactions, run_dir, config)``, :func:`train_and_evaluate`,
    :func:`index_run`. This function is exactly that sequence (the in-memory prepared data is
    handed to the training stage instead of being read back).

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
        warm_start_from: the run to warm-start from when ``train.warm_start`` is on.
        distributed: train every model on all ranks of this group (see
            :func:`train_and_evaluate`).

    Returns:
        The run's metrics, evaluation, model (the exported one) and training histories.
    """
    config = config or Config()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    budget_s = config.train.time_budget_seconds()
    budget = TimeBudget(budget_s) if budget_s is not None else None
    prepared = prepare_dataset(interactions, run_dir, config)
    fault_point("prepare:after")
    result = train_and_evaluate(
        run_dir,
        config,
        items=items,
        run_id=run_id,
        progress=progress,
        prepared=prepared,
        prepare_seconds=time.perf_counter() - t0,
        warm_start_from=warm_start_from,
        distributed=distributed,
        budget=budget,
    )
    if build_ann:
        result.metrics = index_run(run_dir, config)
        result.seconds = dict(result.metrics["seconds"])
        fault_point("index:after")
    return result


def train_and_evaluate(
    run_dir: str | Path,
    config: Config | None = None,
    *,
    items: str | Path | None = None,
    run_id: str | None = None,
    progress: bool | None = None,
    prepared: PreparedData | RunData | None = None,
    prepare_seconds: float | None = None,
    warm_start_from: str | Path | None = None,
    distributed: DistributedTraining | None = None,
    budget: TimeBudget | None = None,
) -> RunResult:
    """Train with early stopping, evaluate on the holdout, refit and export, in a prepared run directory.

    Writes ``model.pt``, ``model.json``, both embedding tables (and ``holdout/`` with refit) and
    ``metrics.json`` with ``"index": None`` (:func:`index_run` fills it in).

    Args:
        run_dir: a directory ``prepare_dataset`` wrote into.
        config: the config ``prepare_dataset`` ran with; defaults when None.
        items: item table, needed when ``model.item_features`` names columns.
        run_id: id recorded in the exported files; a new one when None.
        progress: progress bars (None: when stderr is a terminal).
        prepared: the prepared data already in memory; None reads it from ``run_dir``
            (:meth:`RunData.load`).
        prepare_seconds: wall seconds the preparation took, recorded as ``seconds["prepare"]``.
        warm_start_from: the run to warm-start from when ``train.warm_start`` is on (e.g. the
            current run); ``metrics["warm_start"]`` records whether it was used and why.
        distributed: rank 0 of a ``torch.distributed`` group, leading
            (:meth:`recsys_metric.distributed.DistributedTraining.leading`): both fits run on every
            rank; everything else (evaluation, files) stays in this process.
        budget: the run's time budget, started when the run started; None starts
            ``config.train.time_budget`` here, counting ``prepare_seconds`` as spent
            (``docs/time-budget.md``).

    Returns:
        The run's metrics, evaluation, model (the exported one) and training histories.
    """
    config = config or Config()
    run_dir = Path(run_dir)
    run_id = run_id or new_run_id()
    if prepared is None:
        data = RunData.load(run_dir)
    elif isinstance(prepared, PreparedData):
        data = RunData.of(prepared)
    else:
        data = prepared
    if budget is None and config.train.time_budget_seconds() is not None:
        budget = TimeBudget(float(config.train.time_budget_seconds()))
        budget.started -= prepare_seconds or 0.0
    seconds: dict[str, float] = {}
    if prepare_seconds is not None:
        seconds["prepare"] = prepare_seconds
    n_users, n_items = len(data.users), len(data.items)
    items_table = (
        read_item_table(
            items, tag_columns=config.data.item_tag_columns, separator=config.data.item_tag_separator
        )
        if items is not None
        else None
    )
    full = data.interactions
    train = full.filter(pl.col("split") == "train")
    train_seen = _matrix(train, n_users, n_items)
    train_liked = _matrix(train.filter(pl.col("label") == 1), n_users, n_items)
    test_relevant = _matrix(
        full.filter((pl.col("split") == "test") & (pl.col("label") == 1)), n_users, n_items
    )
    candidates = training_items_mask(train_seen)

    t = time.perf_counter()
    fit_rows, fit_seen, val_relevant, val_info = _holdout_validation(train, config, n_users, n_items)
    fit_data = train_data(fit_rows, n_users, n_items, config)
    fit_liked = _matrix(fit_rows.filter(pl.col("label") == 1), n_users, n_items)
    fit_counts = item_counts(fit_rows, n_items)
    # The training rows' frames are not needed past their matrices: on the 20M log they held
    # 0.6 GiB through both fits (only the whole log, ``full``, is read again).
    del train, fit_rows
    k_stop = config.train.early_stopping_k
    val_candidates = training_items_mask(fit_seen)

    def validate_users(m: TwoTowerModel, users: np.ndarray) -> float:
        return evaluate_scores(
            model_score_fn(m, fit_liked, ranking=True),
            fit_seen,
            val_relevant,
            ks=(k_stop,),
            candidate_mask=val_candidates,
            users=users,
        )[f"recall@{k_stop}"]

    # Early stopping scores a seeded sample of validation users, shrunk to what its measured cost
    # affords (recsys_metric.training.validation); the run's time plan reads its cost too.
    run_plan = RunPlan.for_fit(
        budget,
        validate_users,
        np.flatnonzero(val_relevant.row_lengths() > 0),
        config,
        test_users=int((test_relevant.row_lengths() > 0).sum()),
        n_items=n_items,
        refit_scale=full.filter(pl.col("label") == 1).height / max(fit_data.n_pairs, 1)
        if config.train.refit
        else 0.0,
        # The nightly flow passes the served run here; its quality gate then scores that run's
        # model and the popularity check on the same holdout sample.
        gate_evaluations=2 if warm_start_from is not None else 0,
    )
    validate = run_plan.validation

    holdout_model = build_model(data, config, fit_liked, items_table)
    plan, warm_reason = None, "cold start: train.warm_start is off"
    if config.train.warm_start:
        plan, warm_reason = plan_warm_start(
            warm_start_from, holdout_model, split_method=val_info.method, validation_cutoff=val_info.cutoff
        )
    if config.train.warm_start and plan is None and warm_start_from is not None:
        # Asked for and not done (e.g. a damaged current model): say so where operators look.
        logger.warning("train.warm_start is on, but this run trains from scratch: %s", warm_reason)
    else:
        logger.info("%s", warm_reason)
    warm = {"enabled": plan is not None, "reason": warm_reason, "source_run_id": None}
    if plan is not None:
        warm["source_run_id"] = plan.source_run_id
        warm["holdout"] = warm_start_model(
            holdout_model,
            plan.holdout_state,
            plan.users,
            plan.items,
            data.users,
            data.items,
            same_features=plan.same_features,
        )
    train_config = config.train
    if plan is not None:
        # A warm run continues the source's model, so under ``lr: auto`` it reuses the source's
        # rate instead of searching again (the search would cost more than the warm start saves).
        if train_config.lr == "auto" and plan.source_lr is None:
            rates = dict.fromkeys(train_config.warm_start_lr(lr) for lr in train_config.lr_candidates)
            train_config = train_config.model_copy(update={"lr_candidates": tuple(rates)})
            warm["lr"] = list(train_config.lr_candidates)
        else:
            base = plan.source_lr if train_config.lr == "auto" else train_config.lr
            train_config = train_config.model_copy(update={"lr": train_config.warm_start_lr(base)})
            warm["lr_base"] = base
            warm["lr"] = train_config.lr
    # The refit trains beside the holdout fit where it can (recsys_metric.training.concurrent_refit):
    # from the moment the rate is chosen, through the holdout evaluation, to the chosen epoch.
    full_liked = _matrix(full.filter(pl.col("label") == 1), n_users, n_items) if config.train.refit else None
    beside = None
    if ConcurrentRefit.supported(
        train_config, warm_start=plan is not None, distributed=distributed is not None
    ):
        beside = ConcurrentRefit(
            build_model(data, config, full_liked, items_table),
            train_data(full, n_users, n_items, config),
            train_config,
            explicit_share=config.train.explicit_share,
            split_method=val_info.method,
        )
        run_plan.follow_refit(beside)
    with beside or contextlib.nullcontext():
        holdout = fit(
            holdout_model,
            fit_data,
            train_config,
            explicit_share=config.train.explicit_share,
            validate=validate,
            progress=progress,
            distributed=distributed,
            split_method=val_info.method,
            # A warm start scores its starting point as epoch 0 and keeps it unless an epoch beats it.
            evaluate_start=plan is not None,
            planner=run_plan.holdout_planner,
            refit=beside,
        )
        seconds["train_holdout"] = time.perf_counter() - t

        # model.feature_training: fitted: the feature tower learns now, from the trained vectors,
        # before the evaluation, so that it scores the model exported.
        t = time.perf_counter()
        # Encoded once for both models; None unless the features are fitted.
        fitted = config.model.feature_training == "fitted"
        fitted_features = item_feature_tensors(data, config, items_table) if fitted else None
        features_fit = {"holdout": fit_features(holdout_model, fitted_features, config, fit_liked)}
        seconds["fit_features"] = time.perf_counter() - t

        t = time.perf_counter()
        evaluation = evaluate_with_baselines(
            model_score_fn(holdout_model, train_liked),
            train_seen,
            test_relevant,
            config.eval,
            candidate_mask=candidates,
        )
        seconds["evaluate"] = time.perf_counter() - t
        logger.info("holdout evaluation:\n%s", evaluation.to_table())

        final_model, refit, final_liked = holdout_model, None, train_liked
        started = beside is not None and beside.started
        epochs = (
            run_plan.refit_epochs(holdout, beside.epochs_done if started else 0) if config.train.refit else 0
        )

        def fresh_refit_model() -> TwoTowerModel:
            # The refit's model when it trains after the holdout fit: built on the whole log's
            # liked items, from the warm start's published state when there is one.
            model = build_model(data, config, final_liked, items_table)
            if plan is not None:
                warm["refit"] = warm_start_model(
                    model,
                    plan.final_state,
                    plan.users,
                    plan.items,
                    data.users,
                    data.items,
                    same_features=plan.same_features,
                )
            return model

        if epochs == 0 and config.train.refit and plan is not None and holdout.best_epoch == 0:
            # The warm start's starting point beat every epoch: publish the source's model as it was.
            t = time.perf_counter()
            final_liked = full_liked
            final_model = fresh_refit_model()
            warm["kept_starting_point"] = True
            seconds["train_refit"] = time.perf_counter() - t
        elif epochs > 0 and started:
            assert beside is not None
            t = time.perf_counter()
            final_liked = full_liked
            # In the holdout's second phase (train.lr_drop) the refit beside it follows it there.
            first_epochs, second_epochs = refit_epochs_by_phase(holdout, epochs)
            phase_epochs = second_epochs if beside.in_second_phase else first_epochs
            refit = beside.finish(phase_epochs, run_plan.refit_planner)
            final_model = beside.model
            # Only the wait after the holdout evaluation: the rest ran beside the holdout fit.
            seconds["train_refit"] = time.perf_counter() - t
        elif epochs > 0:
            t = time.perf_counter()
            final_liked = full_liked
            final_model = fresh_refit_model()
            refit_data = train_data(full, n_users, n_items, config)
            first_epochs, second_epochs = refit_epochs_by_phase(holdout, epochs)
            refit = None
            if first_epochs:
                refit = fit(
                    final_model,
                    refit_data,
                    run_plan.refit_config(train_config, holdout),
                    explicit_share=config.train.explicit_share,
                    epochs=first_epochs,
                    progress=progress,
                    distributed=distributed,
                    split_method=val_info.method,
                    planner=run_plan.refit_planner,
                )
            if second_epochs:
                # Never under torchrun: the holdout fit trains no second phase there.
                refit = replay_second_phase(
                    final_model,
                    refit_data,
                    run_plan.refit_config(train_config, holdout),
                    holdout,
                    refit,
                    second_epochs,
                    explicit_share=config.train.explicit_share,
                    split_method=val_info.method,
                    progress=progress,
                    planner=run_plan.refit_planner,
                )
            del refit_data
            seconds["train_refit"] = time.perf_counter() - t

    time_budget = run_plan.report(holdout, refit, epochs)
    fault_point("train:after")
    t = time.perf_counter()
    refitted = final_model is not holdout_model
    if refitted:
        features_fit["published"] = fit_features(final_model, fitted_features, config, final_liked)
    seconds["fit_features"] += time.perf_counter() - t
    t = time.perf_counter()
    # The item table's items without interactions join both models after training (docs/cold-start.md).
    final_model, export_items, catalog = add_catalog_items(final_model, data.items, items_table)
    cold = {"items": export_items, "cold_items": config.data.cold_items}
    if catalog.n_added:
        export_items.save(run_dir / "items.parquet")
        if refitted:
            holdout_model = add_catalog_items(holdout_model, data.items, items_table)[0]
    if refitted:
        # A later run's quality gate scores this model, never the refit one (see registry).
        (run_dir / HOLDOUT_DIR).mkdir(exist_ok=True)
        export_embeddings(
            holdout_model,
            data,
            run_dir / HOLDOUT_DIR,
            run_id,
            liked=train_liked,
            item_counts=_grown(fit_counts, len(export_items)),
            **cold,
        )
        # What a later run's holdout model warm-starts from (recsys_metric.warm_start).
        _save_state(holdout_model, run_dir / HOLDOUT_DIR / MODEL_FILE)
    export_model(
        final_model,
        data,
        run_dir,
        run_id,
        liked=final_liked,
        item_counts=item_counts(full, len(export_items))
        if refitted
        else _grown(fit_counts, len(export_items)),
        **cold,
    )
    seconds["export"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())

    metrics = {
        "run_id": run_id,
        "library_version": __version__,
        "mode": config.model.mode,
        "holdout": evaluation.to_dict(),
        "early_stopping": {
            "metric": f"recall@{k_stop}",
            "best_epoch": holdout.best_epoch,
            "best_validation": holdout.best_metric,
            "epochs_run": holdout.epochs_run,
            "stopped_early": holdout.stopped_early,
            "lr": holdout.lr,
            "lr_search": holdout.lr_search,
            "start_metrics": holdout.start_metrics,
            "validation_se": time_budget["validation"]["standard_error"],
            "validation_users": time_budget["validation"]["users"],
            "validation_cutoff": val_info.cutoff.isoformat() if val_info.cutoff is not None else None,
        },
        "warm_start": warm,
        "published_model": "refit_on_full_log"
        if refit is not None
        else "warm_start_source"
        if final_model is not holdout_model
        else "holdout_model",
        "time_budget": time_budget,
        "training": {
            "holdout": holdout.to_dict(),
            "refit": refit.to_dict() if refit is not None else None,
        },
        "index": None,
        "catalog": catalog.to_dict(),
        "item_features_fit": features_fit if features_fit["holdout"] is not None else None,
        "data": data.report,
        "device": holdout.device,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    _write_json(run_dir / METRICS_FILE, metrics)
    fault_point("export:after")
    return RunResult(
        run_id=run_id,
        run_dir=run_dir,
        metrics=metrics,
        evaluation=evaluation,
        prepared=prepared if prepared is not None else data,
        model=final_model,
        holdout_training=holdout,
        refit_training=refit,
        seconds=seconds,
    )


def index_run(run_dir: str | Path, config: Config | None = None) -> dict[str, Any]:
    """Build the Annoy index of a trained run directory and record it in its ``metrics.json``.

    Calls :func:`recsys_metric.index.build_index` (``items.ann`` + ``index.json``, recall@10
    against exact search), then rewrites ``metrics.json`` with ``"index"`` set and
    ``seconds["index"]`` added to ``seconds["total"]``.

    Returns:
        The updated metrics.

    Raises:
        DataError: ``metrics.json`` is missing (run :func:`train_and_evaluate` first).
    """
    config = config or Config()
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist: run train_and_evaluate on {run_dir} before index_run")
    metrics = json.loads(path.read_text())
    t = time.perf_counter()
    metrics["index"] = build_index(run_dir, config.index)
    elapsed = time.perf_counter() - t
    seconds = metrics.setdefault("seconds", {})
    seconds["index"] = round(elapsed, 3)
    seconds["total"] = round(seconds.get("total", 0.0) + elapsed, 3)
    _write_json(path, metrics)
    return metrics


def item_counts(rows: pl.DataFrame, n_items: int) -> np.ndarray:
    """int64 ``[n_items]``: interaction rows per ``item_num`` in ``rows`` (0 for appended catalog items)."""
    return np.bincount(rows["item_num"].to_numpy(), minlength=n_items).astype(np.int64)


def _grown(counts: np.ndarray, n_items: int) -> np.ndarray:
    """``counts`` (:func:`item_counts`) with zeros for the catalog items appended after training."""
    return np.pad(counts, (0, n_items - counts.shape[0]))


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def export_embeddings(
    model: TwoTowerModel,
    prepared: PreparedData | RunData,
    out_dir: Path,
    run_id: str,
    *,
    liked: InteractionMatrix | None = None,
    items: Vocabulary | None = None,
    item_counts: np.ndarray | None = None,
    cold_items: str = "eligible",
) -> None:
    """Write ``user_embeddings.parquet`` and ``item_embeddings.parquet`` of ``model`` into ``out_dir``.

    In item-item mode the user vectors are the fold-in of ``liked`` (required there; see the module
    docstring). ``items``: the model's item vocabulary when it is longer than ``prepared.items``
    (catalog items appended, :func:`~recsys_metric.model.catalog.add_catalog_items`);
    ``item_counts``: int64 ``[n_items]`` training interactions per item, written as the column
    ``n_train_interactions`` beside the policy ``cold_items`` (:mod:`recsys_metric.cold_items`).
    """
    if model.item_item and liked is None:
        raise ConfigError(
            "an item-item model exports its users as the fold-in of their liked items: pass liked="
        )
    model = model.to("cpu").eval()
    with torch.no_grad():
        if liked is not None and model.item_item:
            users = model.fold_in_rows(liked).contiguous().numpy()
        else:
            users = model.user_embeddings().contiguous().numpy()
        item_vectors = model.item_embeddings().contiguous().numpy()
    items_vocab = items
    distance = model.config.distance
    item_vocab = items_vocab if items_vocab is not None else prepared.items
    for kind, vocab, vectors in (("user", prepared.users, users), ("item", item_vocab, item_vectors)):
        extra = {}
        if kind == "item" and item_counts is not None:
            extra = {"columns": {N_TRAIN_COLUMN: item_counts}, "metadata": {COLD_ITEMS_KEY: cold_items}}
        write_embeddings(
            out_dir / f"{kind}_embeddings.parquet",
            vocab.ids(),
            vectors,
            kind=kind,
            distance=distance,
            run_id=run_id,
            **extra,
        )


def export_model(
    model: TwoTowerModel,
    prepared: PreparedData | RunData,
    run_dir: Path,
    run_id: str,
    *,
    liked: InteractionMatrix | None = None,
    **items: Any,
) -> None:
    """Write ``model.pt``, ``model.json`` and both embedding tables for ``model`` (``liked`` and the
    catalog arguments ``items``, ``item_counts``, ``cold_items``: see :func:`export_embeddings`)."""
    export_embeddings(model, prepared, run_dir, run_id, liked=liked, **items)
    model = model.to("cpu").eval()
    _save_state(model, run_dir / MODEL_FILE)
    _write_json(run_dir / MODEL_JSON, {"run_id": run_id, "hparams": model.hparams()})
    save_item_tower(model, run_dir)  # embed new items without torch (recsys_metric.item_embedder)


def _save_state(model: TwoTowerModel, path: Path) -> None:
    """``model``'s state dict to ``path`` (written aside, then renamed), loadable with weights_only=True."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.to("cpu").state_dict(), tmp)
    os.replace(tmp, path)


def load_model(run_dir: str | Path, device: str = "cpu") -> TwoTowerModel:
    """Rebuild the exported model of a run directory (``model.pt`` + ``model.json``)."""
    run_dir = Path(run_dir)
    meta = json.loads((run_dir / MODEL_JSON).read_text())
    state = torch.load(run_dir / MODEL_FILE, weights_only=True, map_location="cpu")
    model = TwoTowerModel.from_hparams(meta["hparams"], state)
    return model.to(resolve_device(device)).eval()
