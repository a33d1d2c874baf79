"""``train.negatives: auto`` under a time budget: as many negatives per liked pair as leave the
budget room for a fit of :data:`MIN_EPOCHS` epochs.

The negatives set the cost of an epoch: each is one triplet. ``auto`` takes ``n_items // 500``
clipped to [10, 30] (:meth:`~recsys_metric.config.TrainConfig.negatives_for`), which suits a
log whose epochs take seconds. On a large log under a short budget it leaves room for one or two
epochs: on the generated 20M log (17.8M liked pairs, 100k items) an epoch at 30 negatives and
128 dimensions took 150-200 s on 2 cores, so a 15-minute run trained one epoch per learning rate
and scored .072 where the same log reached .094 after 4 + 4 epochs at 10 negatives
(``bench/configs/nightly_20m.toml``). Early stopping and the learning-rate race need epochs to
compare: a curve that has not turned says nothing about where it will peak.

So before the first epoch, when a budget is set, the cost of an epoch is measured on the log
itself (:func:`probe_epoch_cost`: a few chunks of real steps on the model, whose weights are
restored afterwards) and the number of negatives is lowered, never below
:data:`MIN_NEGATIVES`, until the budget left (less the reserve for the stages after training)
pays for :data:`MIN_EPOCHS` epochs plus the race's extra ones, each with its share of the refit
and of validation, at :data:`~recsys_metric.training.budget.SAFETY`. A second probe at the
lowered count corrects for the part of a pair's cost that does not scale with the negatives.
Logs whose epoch is not much longer than the probe are not probed: their epochs are cheap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recsys_metric.config import TrainConfig
from recsys_metric.device import resolve_device
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.budget import SAFETY, HoldoutPlanner
from recsys_metric.training.checkpoints import cpu_state
from recsys_metric.training.data import TrainData
from recsys_metric.training.loop import VALIDATION_SHARE, FitRun
from recsys_metric.training.rate_race import MIN_RUNG

logger = logging.getLogger(__name__)

MIN_EPOCHS = 10
"""Epochs of one fit the budget must leave room for before ``auto`` keeps its negatives: enough
for a validation curve to rise and turn (citeulike-a peaks after 40-100 epochs, ml-latest-small
after 20-70; the 20M log was still rising at epoch 5)."""

MIN_NEGATIVES = 5
"""Fewest negatives a budget lowers ``auto`` to: the hardest of k uniform draws lies in about the
top ``n_items / k`` of the catalogue, and fewer draws rarely find a violator to learn from."""

PROBE_PAIRS = 1 << 16
"""Liked pairs a probe trains (after one chunk that compiles and allocates, not timed): about
2M triplets at 30 negatives, under a second of the kernel on 2 cores."""


@dataclass(frozen=True)
class EpochCost:
    """A probe's measurement at ``negatives`` per pair: ``fixed_s`` per epoch (order, projection)
    and ``pair_s`` per liked pair (negatives and steps)."""

    negatives: int
    fixed_s: float
    pair_s: float

    def epoch_seconds(self, n_pairs: int) -> float:
        return self.fixed_s + n_pairs * self.pair_s


def probe_epoch_cost(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    negatives: int,
    explicit_share: float,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> EpochCost:
    """Seconds of an epoch at ``negatives`` per pair, measured by training the first
    :data:`PROBE_PAIRS` pairs of one (after an untimed first chunk) at the first candidate rate;
    the model's weights are restored afterwards (the probe's optimiser state is dropped with it).
    ``config`` is resolved for the split (:meth:`~recsys_metric.config.TrainConfig.for_split`)."""
    state = cpu_state(model)
    try:
        run = FitRun(
            model,
            data,
            config.model_copy(
                update={"negatives": negatives, "lr": config.first_lr() if config.lr == "auto" else config.lr}
            ),
            resolve_device(config.device),
            1,
            f"recall@{config.early_stopping_k}",
            explicit_share,
            None,
            None,
            False,
            False,
            clock=clock,
        )
        run.probe(run.chunk_pairs)  # compiles the kernel, warms the allocator
        record = run.probe(PROBE_PAIRS)
    finally:
        model.load_state_dict(state)
    pairs = max(int(record["pairs"]), 1)
    pair_s = float(record["pairs_seconds"]) / pairs
    return EpochCost(negatives, max(0.0, float(record["seconds"]) - float(record["pairs_seconds"])), pair_s)


def budget_negatives(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    planner: HoldoutPlanner,
    explicit_share: float,
    *,
    candidates: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """``config`` with ``negatives`` fixed to what the budget affords (module docstring), and
    what was decided (``None`` when ``auto`` keeps its own count or nothing was probed).

    Args:
        model, data, config, explicit_share: as for the fit that follows.
        planner: the holdout fit's planner (its budget, reserve and refit scale).
        candidates: learning rates the fit races (each costs :data:`MIN_RUNG` more epochs).
        clock: times the probes.
    """
    if config.negatives != "auto" or config.loss == "softmax" or data.n_pairs <= 4 * PROBE_PAIRS:
        return config, None
    k_auto = config.negatives_for(data.n_items)
    needed = MIN_EPOCHS + MIN_RUNG * max(0, candidates - 1)
    # Seconds of one planned epoch per second measured: safety, the refit's share, validation's.
    scale = SAFETY * (1.0 + planner.refit_scale) * (1.0 + VALIDATION_SHARE)
    started = clock()
    at_auto = probe_epoch_cost(model, data, config, k_auto, explicit_share, clock=clock)
    available = planner.budget.remaining() - planner.reserve()
    planned_auto = scale * at_auto.epoch_seconds(data.n_pairs)
    affordable_auto = available / planned_auto if planned_auto > 0 else math.inf
    if affordable_auto >= needed or k_auto <= MIN_NEGATIVES:
        return config, None
    # The pair cost each epoch may have, the per-epoch work taken out.
    target_pair_s = (available / (needed * scale) - at_auto.fixed_s) / data.n_pairs
    probes = [at_auto]
    k = max(MIN_NEGATIVES, _negatives_for(target_pair_s, probes))
    if k < k_auto:
        probes.append(probe_epoch_cost(model, data, config, k, explicit_share, clock=clock))
        k = max(MIN_NEGATIVES, min(_negatives_for(target_pair_s, probes), k_auto))
    if k >= k_auto:
        return config, None
    planned_k = scale * (at_auto.fixed_s + data.n_pairs * _pair_seconds(k, probes))
    decision = {
        "negatives_auto": k_auto,
        "negatives": k,
        "epoch_seconds_at_auto": round(at_auto.epoch_seconds(data.n_pairs), 3),
        "affordable_epochs_at_auto": round(affordable_auto, 2),
        "affordable_epochs": round(available / planned_k, 2) if planned_k > 0 else None,
        "epochs_wanted": needed,
        "probe_seconds": round(clock() - started, 3),
        "reason": (
            f"train.negatives auto: {k} instead of {k_auto}: an epoch at {k_auto} measured "
            f"{at_auto.epoch_seconds(data.n_pairs):.0f} s, so the budget left ({available:.0f} s after the "
            f"reserve) paid for {affordable_auto:.1f} epochs with their refit and validation, fewer than "
            f"the {needed} a fit needs"
        ),
    }
    logger.info("%s", decision["reason"])
    return config.model_copy(update={"negatives": k}), decision


def _pair_seconds(k: int, probes: list[EpochCost]) -> float:
    """Seconds per pair at ``k`` negatives: proportional to ``k`` from one probe, the line
    through two (a pair's cost has a part that does not scale with its negatives)."""
    if len(probes) == 1 or probes[0].negatives == probes[1].negatives:
        p = probes[0]
        return p.pair_s * k / p.negatives
    a, b = sorted(probes, key=lambda p: p.negatives)
    slope = (b.pair_s - a.pair_s) / (b.negatives - a.negatives)
    if slope <= 0:  # noise between the probes: fall back to proportional from the larger one
        return b.pair_s * k / b.negatives
    return a.pair_s + slope * (k - a.negatives)


def _negatives_for(target_pair_s: float, probes: list[EpochCost]) -> int:
    """The most negatives whose pair cost stays within ``target_pair_s`` (at least 1)."""
    k = max(p.negatives for p in probes)
    while k > 1 and _pair_seconds(k, probes) > target_pair_s:
        k -= 1
    return k
