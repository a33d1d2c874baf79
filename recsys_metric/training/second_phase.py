"""The second phase of a fit (``train.lr_drop``): after early stopping, a lower rate from the best
weights.

Early stopping ends a fit when validation has stopped rising at its rate. That plateau is often
the rate's, not the model's: from the best weights, a smaller rate with the optimiser's
statistics started afresh (Adagrad's accumulated squares would otherwise keep the steps tiny)
climbs again for a while (the "reduce on plateau" of Keras and PyTorch's schedulers, applied
once). :func:`second_phase` trains it with the same early stopping, starting from the first
phase's best validation Recall@K as its epoch 0, so that its epochs are kept only if one beats
the first phase on the same validation sample; otherwise the model keeps the first phase's
weights and the phase cost its epochs. It runs only after a stop by early stopping: a fit that
reached the epoch cap or the time budget has no plateau to leave.

The refit on the whole log replays the phases the holdout kept: the first phase's best epoch at
its rate, then the second phase's best epoch at the lower rate from those weights, its
optimiser fresh too (:func:`refit_epochs_by_phase`). A refit training beside the holdout fit
(:class:`~recsys_metric.training.concurrent_refit.ConcurrentRefit`) goes on to its second phase
when the holdout's starts and follows it; one trained after the holdout fit replays it
(:func:`replay_second_phase`).

Measured with a ``/tmp`` script (the default model, every validation user, no time budget), the
second phase after ``lr`` 0.05's early stop on ml-latest-small seed 2 (best epoch 15): validation
Recall@20 .3054 -> .3122 (best 16 epochs into the phase, 26 trained, 1.4 s), test Recall@20 /
NDCG@20 after the replayed refit .3512 / .3177 -> .3564 / .3273; on the bundled log at 0.01 (to
0.002) it beat the first phase on one seed of four (test .4496 -> .4537) and stopped after 5-9
epochs (0.2-0.3 s) on the others; on the generated 1M log it did not beat it (5 epochs, 21 s of a
78 s fit). After the epoch cap (citeulike-a, best epoch 87 of 100) it was not worth its time:
validation .2653 -> .2667, test .3316 either way, 12 s on 30 s; hence early stops only.
BENCHMARKS.md has the default run's figures.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_metric.config import TrainConfig
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.loop import fit_at_rate

if TYPE_CHECKING:
    from recsys_metric.training.budget import EpochPlanner
    from recsys_metric.training.concurrent_refit import ConcurrentRefit

logger = logging.getLogger(__name__)

SEED_OFFSET = 1
"""The second phase draws its epoch orders and negatives from ``train.seed`` plus this: the first
phase's streams again would repeat its first epochs' draws."""

CHECKPOINT_SUBDIR = "second-phase"
"""Where, under the fit's checkpoint directory, the second phase checkpoints."""


def phase_config(config: TrainConfig, lr: float) -> TrainConfig:
    """The second phase's training config: ``config`` at rate ``lr`` and the phase's seed."""
    return config.model_copy(update={"lr": float(lr), "seed": config.seed + SEED_OFFSET})


def second_phase(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    first: TrainResult,
    *,
    explicit_share: float,
    validate: Callable[[TwoTowerModel], dict[str, float]],
    n_epochs: int,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool | None,
    planner: EpochPlanner | None,
    clock: Callable[[], float] = time.perf_counter,
    refit: ConcurrentRefit | None = None,
) -> TrainResult:
    """After ``first`` (a finished fit of ``model``, which holds its best weights) ended by early
    stopping, train on at ``config.lr_drop`` times its rate (see the module's docstring).

    Args:
        model: the model, holding ``first``'s best weights; ends with the better of those and the
            second phase's best.
        data, explicit_share, validate, progress, clock: as the first phase's.
        config: the fit's config (resolved for the split; ``lr_drop`` set).
        first: the first phase's result.
        n_epochs: the fit's epoch cap: both phases together train at most this many epochs.
        checkpoint_dir: the fit's checkpoint directory (the phase uses :data:`CHECKPOINT_SUBDIR`).
        resume: continue the phase from its checkpoint when there is one.
        planner: the holdout planner; the phase runs only when it affords ``patience`` epochs.
        refit: the refit training beside the holdout fit, when it started: it goes on to its own
            second phase beside this one (:meth:`ConcurrentRefit.start_second_phase`).

    Returns:
        ``first`` merged with the phase (:attr:`TrainResult.second_phase` says what it did), or
        ``first`` with ``second_phase`` saying why it did not run.
    """
    assert config.lr_drop is not None and first.best_metric is not None
    lr = float(first.lr) * float(config.lr_drop)
    cap = n_epochs - first.epochs_run
    affordable = None
    second_phase_epochs = getattr(planner, "second_phase_epochs", None)
    if second_phase_epochs is not None:
        affordable = int(second_phase_epochs(first))
    reason = None
    if cap < config.patience:
        reason = f"not run: {cap} epochs left under the cap of {n_epochs}, fewer than the patience ({config.patience})"
    elif affordable is not None and affordable < config.patience:
        reason = (
            f"not run: the time budget affords {affordable} more epochs, fewer than the patience "
            f"({config.patience})"
        )
    if reason is not None:
        logger.info("train.lr_drop: second phase at lr %g %s", lr, reason)
        first.second_phase = {"lr": lr, "outcome": reason}
        return first
    logger.info(
        "train.lr_drop: early stopping ended lr %g at epoch %d (best %d, %.4f); a second phase at lr %g "
        "from the best weights",
        first.lr,
        first.epochs_run,
        first.best_epoch or 0,
        first.best_metric,
        lr,
    )
    beside = refit is not None and refit.started
    before = getattr(planner, "refit_before", None)
    if before is not None:
        # The refit trains the first phase's best epochs before this one's.
        planner.refit_before = first.best_epoch or 0  # type: ignore[union-attr]
    try:
        second = fit_at_rate(
            model,
            data,
            phase_config(config, lr),
            explicit_share,
            validate,
            cap,
            None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_SUBDIR,
            resume,
            progress,
            None,
            planner=planner,
            clock=clock,
            start_metric=first.best_metric,
            on_start=refit.start_second_phase if beside else None,  # type: ignore[union-attr]
        )
    finally:
        if before is not None:
            planner.refit_before = before  # type: ignore[union-attr]
    kept = second.best_epoch or 0
    if kept:
        outcome = (
            f"kept: best {second.best_metric:.4f} after {kept} of its epochs against "
            f"{first.best_metric:.4f} before it"
        )
    else:
        outcome = f"not kept: no epoch beat the first phase's {first.best_metric:.4f}"
    if second.stopped_by:
        outcome += f" ({second.stopped_by})"
    logger.info("train.lr_drop: second phase at lr %g %s", lr, outcome)
    info = {
        "lr": lr,
        "from_epoch": first.best_epoch or 0,
        "epochs_run": second.epochs_run,
        "best_epoch": kept,
        "best_metric": second.best_metric if kept else first.best_metric,
        "seconds": round(sum(float(r["seconds"]) for r in second.history) + second.validation_seconds, 3),
        "outcome": outcome,
    }
    return merge_phases(first, second, info, validated=True)


def merge_phases(
    first: TrainResult | None, second: TrainResult, info: dict[str, Any], *, validated: bool
) -> TrainResult:
    """One result for both phases: ``second``'s epochs appended to ``first``'s history (numbered
    on from its last, marked ``phase: 2``), ``best_epoch`` the first's best plus the second's
    (``validated``: kept only when the second's beat the first's; a refit's replay always
    counts), the second's stop reason and validation seconds added. ``first`` None: the first
    phase trained no epoch (a warm start whose starting point stayed best)."""
    base = first if first is not None else dataclasses.replace(second, history=[], best_epoch=0, lr_search=[])
    offset = base.epochs_run
    history = list(base.history) + [
        {**record, "epoch": offset + int(record["epoch"]), "phase": 2} for record in second.history
    ]
    first_best = base.best_epoch if base.best_epoch is not None else base.epochs_run
    kept = (second.best_epoch or 0) if validated else second.epochs_run
    merged = dataclasses.replace(
        base,
        history=history,
        best_epoch=first_best + kept if kept else base.best_epoch,
        best_metric=second.best_metric if validated and kept else base.best_metric,
        stopped_by=second.stopped_by or base.stopped_by,
        validation_seconds=round(base.validation_seconds + second.validation_seconds, 3),
        second_phase=info,
    )
    return merged


def refit_epochs_by_phase(holdout: TrainResult, epochs: int) -> tuple[int, int]:
    """How the refit's ``epochs`` (the holdout's best epoch, or fewer under the budget) split
    between the phases: ``(first, second)``; the budget cuts the second phase first."""
    kept = int((holdout.second_phase or {}).get("best_epoch") or 0)
    if not kept:
        return epochs, 0
    first = int(holdout.second_phase["from_epoch"])  # type: ignore[index]
    return min(epochs, first), max(0, epochs - first)


def replay_second_phase(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    holdout: TrainResult,
    first: TrainResult | None,
    epochs: int,
    *,
    explicit_share: float,
    split_method: str,
    progress: bool | None,
    planner: EpochPlanner | None,
) -> TrainResult:
    """The refit's second phase: ``epochs`` epochs at the holdout's second-phase rate from the
    model's weights (the refit's first phase, or its starting point when ``first`` is None), its
    optimiser fresh, as the holdout trained it. ``config``: the refit's config (the holdout's
    negatives); ``explicit_share``, ``split_method``, ``progress``, ``planner`` as for
    :func:`~recsys_metric.training.rate_search.fit`. Returns ``first`` merged with it."""
    # Imported here: rate_search runs the holdout's second phase from this module.
    from recsys_metric.training.rate_search import fit

    assert holdout.second_phase is not None and epochs > 0
    lr = float(holdout.second_phase["lr"])
    second = fit(
        model,
        data,
        phase_config(config, lr),
        explicit_share=explicit_share,
        epochs=epochs,
        progress=progress,
        split_method=split_method,
        planner=planner,
    )
    info = {"lr": lr, "from_epoch": 0 if first is None else first.epochs_run, "epochs_run": second.epochs_run}
    return merge_phases(first, second, info, validated=False)
