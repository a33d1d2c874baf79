"""The entry point :func:`fit`, and the learning-rate search of ``train.lr: auto``: the race
(:mod:`~recsys_metric.training.rate_race`, default) or one full fit per candidate rate
(``train.lr_search: full``, and under torchrun); the best validation Recall@K wins.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.checkpoints import cpu_state
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.loop import fit_at_rate
from recsys_metric.training.rate_race import race
from recsys_metric.training.second_phase import second_phase
from recsys_metric.training.sources import co_liked_data

if TYPE_CHECKING:
    from recsys_metric.distributed import DistributedTraining
    from recsys_metric.training.budget import EpochPlanner
    from recsys_metric.training.concurrent_refit import ConcurrentRefit

logger = logging.getLogger(__name__)


def fit(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    *,
    explicit_share: float = 0.0,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None = None,
    epochs: int | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool | None = None,
    distributed: DistributedTraining | None = None,
    split_method: str = "temporal",
    evaluate_start: bool = False,
    planner: EpochPlanner | None = None,
    clock: Callable[[], float] = time.perf_counter,
    refit: ConcurrentRefit | None = None,
) -> TrainResult:
    """Train ``model`` in place on the liked pairs of ``data``.

    In item-item mode (``model.item_item``) the pairs become ``(item, co-liked item)`` pairs
    (:class:`CoLikedSource`; pairs of users with a single liked item are dropped) and ``validate``
    scores items for users however it likes (e.g. from the fold-in of their liked items).

    Args:
        model: the model; moved to the configured device.
        data: liked pairs, seen matrix, optional dislikes and sampling weights.
        config: loss, negatives, optimiser, schedule, early stopping, device, seed.
        explicit_share: expected share of each pair's ``k`` negative slots taken from the user's
            explicit dislikes when the user has any (``floor(share * k)`` slots, one more with
            probability ``frac(share * k)``), e.g. ``TripletConfig.explicit_share``.
        validate: called with the model after an epoch (every ``config.eval_every`` epochs and
            after the last); must return ``recall@{config.early_stopping_k}``. The model keeps the
            weights of the best evaluated epoch; ``config.patience_after(n)`` evaluations without
            improvement stop the run, ``n`` being the best evaluation's number.
        epochs: number of epochs (default ``config.epochs``), e.g. the best epoch for a refit.
        checkpoint_dir: where ``checkpoint.pt`` is written every ``config.checkpoint_every`` epochs.
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one.
        progress: show a progress bar; None shows one when stderr is a terminal.
        distributed: train as one rank of a ``torch.distributed`` group
            (:class:`recsys_metric.distributed.DistributedTraining`): every rank calls ``fit`` with
            the same data and config, trains on its share of the pairs and applies the whole
            group's gradients; rank 0 validates. None: this process alone.
        split_method: how the holdout the model will be judged on is cut, ``temporal`` or
            ``user_holdout`` (:class:`~recsys_metric.config.SplitConfig`); it resolves
            ``auto`` of ``config.user_balance`` and ``config.item_centric_weight``
            (:meth:`~recsys_metric.config.TrainConfig.for_split`).
        evaluate_start: with ``validate``, evaluate the model as it is before the first epoch
            (epoch 0); it stays the best unless an epoch beats it, so a warm start never returns a
            model worse on validation than the one it started from.
        planner: asked after every epoch whether another still fits
            (:class:`~recsys_metric.training.budget.HoldoutPlanner` for ``train.time_budget``).
            Its ``before_fit`` may change the config before the first epoch: a holdout planner
            sizes ``negatives: auto`` to the budget
            (:func:`~recsys_metric.training.negatives_budget.budget_negatives`; its decision is
            kept in ``planner.negatives``).
        clock: times epochs and evaluations (the planner's budget reads its own clock; tests
            inject the same fake one into both).
        refit: the refit on the whole log, to train beside this fit
            (:class:`~recsys_metric.training.concurrent_refit.ConcurrentRefit`): started once the
            rate is known (at once for a fixed rate, when the race is down to one candidate; never
            for ``lr_search: full``), then finished by the caller.

    ``config.lr: auto`` with ``validate``: every rate of ``config.lr_candidates`` trains from the
    model's weights at the call and with the same seed (with ``checkpoint_dir``, each in its own
    subdirectory ``lr-<rate>``, so that ``resume`` continues each); ``lr_search: race`` (default,
    not under torchrun) stops the worse half at each rung (:mod:`~recsys_metric.training.rate_race`),
    ``full`` trains each to its own early stop. The model keeps the best epoch of the candidate
    with the highest validation Recall@K. Without ``validate`` ``auto`` trains at the first
    candidate.

    Returns:
        Per-epoch history, best epoch and metric, whether it stopped early, the device, the rate
        (and the candidates tried).

    Raises:
        ConfigError: the device is unusable, ``validate`` lacks the metric, or the checkpoint
            does not fit the model.
        DataError: the pairs do not fit the model's vocabulary sizes, or (item-item mode) no user
            liked two distinct items.
    """
    if (data.n_users, data.n_items) != (model.n_users, model.n_items):
        raise DataError(
            f"training data has {data.n_users} users x {data.n_items} items but the model was built for "
            f"{model.n_users} x {model.n_items}"
        )
    if not 0.0 <= explicit_share <= 1.0:
        raise ConfigError(f"explicit_share must lie in [0, 1], got {explicit_share}")
    try:
        # Resolved here, before a distributed group receives the config, so every rank agrees.
        config = config.for_split(split_method)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if model.item_item:
        data = co_liked_data(data)
    search = config.lr == "auto" and (
        validate is not None if distributed is None else distributed.rank0_validates(validate is not None)
    )
    if planner is not None and distributed is None and not resume:
        # E.g. ``negatives: auto`` under a budget: as many as leave room for enough epochs.
        config = planner.before_fit(
            model,
            data,
            config,
            explicit_share,
            candidates=len(config.lr_candidates) if search and config.lr_search == "race" else 1,
            clock=clock,
        )
    if not search and config.lr == "auto":
        config = config.model_copy(update={"lr": config.first_lr()})
    args = (model, data, config, explicit_share, validate, epochs, checkpoint_dir, resume, progress)
    timing: dict[str, Any] = {"evaluate_start": evaluate_start, "planner": planner, "clock": clock}
    if not search:
        result = fit_at_rate(*args, distributed, refit=refit, **timing)
    elif config.lr_search == "race" and distributed is None and len(config.lr_candidates) > 1:
        assert validate is not None
        result = race(*args, refit=refit, **timing)
        logger.info("train.lr auto: chose %g (validation %s)", result.lr, lr_search_summary(result.lr_search))
    else:
        result = _full_search(*args, distributed, **timing)
    if second_phase_applies(config, result, validate, distributed):
        assert validate is not None
        result = second_phase(
            model,
            data,
            config,
            result,
            explicit_share=explicit_share,
            validate=validate,
            n_epochs=config.epochs if epochs is None else int(epochs),
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            planner=planner,
            clock=clock,
            refit=refit,
        )
    return result


def second_phase_applies(
    config: TrainConfig,
    result: TrainResult,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None,
    distributed: DistributedTraining | None,
) -> bool:
    """Whether ``train.lr_drop`` trains a second phase after ``result``: it ended by early
    stopping (not the cap, not a planner), with validation, a constant schedule, not under
    torchrun (:mod:`~recsys_metric.training.second_phase`)."""
    return (
        config.lr_drop is not None
        and validate is not None
        and distributed is None
        and config.lr_schedule == "constant"
        and result.stopped_early
        and result.stopped_by is None
        and result.best_metric is not None
    )


def _full_search(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    explicit_share: float,
    validate: Callable[[TwoTowerModel], dict[str, float]] | None,
    epochs: int | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool | None,
    distributed: DistributedTraining | None,
    *,
    evaluate_start: bool,
    planner: EpochPlanner | None,
    clock: Callable[[], float],
) -> TrainResult:
    """``lr_search: full`` (and under torchrun): every candidate to its own early stop, one after
    another; the model keeps the best one's best weights."""
    last = len(config.lr_candidates) - 1
    initial = cpu_state(model) if last > 0 else None
    # The winner's weights: None while they are the ones in the model (the last candidate's).
    best: tuple[float, TrainResult, dict[str, Tensor] | None] | None = None
    trials: list[dict[str, Any]] = []
    for i, lr in enumerate(config.lr_candidates):
        if initial is not None and i > 0:
            model.load_state_dict(initial)
        logger.info("train.lr auto: trying %g (candidates %s)", lr, list(config.lr_candidates))
        result = fit_at_rate(
            model,
            data,
            config.model_copy(update={"lr": float(lr)}),
            explicit_share,
            validate,
            epochs,
            None if checkpoint_dir is None else Path(checkpoint_dir) / f"lr-{lr:g}",
            resume,
            progress,
            distributed,
            evaluate_start=evaluate_start,
            planner=planner,
            clock=clock,
        )
        trials.append(
            {
                "lr": float(lr),
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "epochs_run": result.epochs_run,
                "seconds": round(sum(float(r["seconds"]) for r in result.history), 3),
            }
        )
        score = -math.inf if result.best_metric is None else result.best_metric
        if best is None or score > best[0]:
            best = (score, result, None if i == last else cpu_state(model))
    assert best is not None  # lr_candidates has at least one rate
    _, result, state = best
    if state is not None:
        model.load_state_dict(state)
    result.lr_search = trials
    logger.info("train.lr auto: chose %g (validation %s)", result.lr, lr_search_summary(trials))
    return result


def lr_search_summary(trials: list[dict[str, Any]]) -> str:
    """``0.05: 0.4536, 0.01: 0.4728``: each candidate rate of :attr:`TrainResult.lr_search` with
    its best validation Recall@K."""
    return ", ".join(f"{t['lr']:g}: {t['best_metric']:.4f}" for t in trials if t["best_metric"] is not None)
