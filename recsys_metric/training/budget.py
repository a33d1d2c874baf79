"""Time budget planning: a run, prepare to publish, finishes within ``train.time_budget``.

Nothing is fitted to one log: every decision comes from seconds measured in this run. After each
epoch the holdout fit asks :class:`HoldoutPlanner` whether one more epoch still fits, counting
what must follow it: that epoch's evaluation, the refit on the full log (as many epochs as the
holdout's best, each costing the measured holdout epoch scaled by the pair counts) and the stages
after training (holdout evaluation, export, index, quality gate: :func:`after_training_seconds`).
The refit asks :class:`RefitPlanner` the same without the holdout's terms. Epoch costs are the
largest of the last three (the first epoch left out once later ones exist), times
:data:`SAFETY`, so that a load spike on a shared machine does not overrun the budget; planning is redone after every epoch, so a machine that speeds up or
slows down mid-run is followed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from recsys_metric.durations import parse_duration

if TYPE_CHECKING:
    from recsys_metric.config import TrainConfig
    from recsys_metric.model.towers import TwoTowerModel
    from recsys_metric.training.data import TrainData, TrainResult
    from recsys_metric.training.loop import FitRun

__all__ = [
    "EpochPlanner",
    "HoldoutPlanner",
    "RefitPlanner",
    "TimeBudget",
    "after_training_seconds",
    "parse_duration",
]

SAFETY = 1.25
"""Planned costs are the measured ones times this (timings move with the load on a shared machine)."""

INDEX_SECONDS_PER_ITEM = 2e-4
"""Reserve for the Annoy build and its recall check, per item: 50 angular trees over 100k x 64
took 4.8 s here (``docs/PLATFORM_NOTES``), the recall check as much again; doubled for safety."""

FIXED_AFTER_SECONDS = 5.0
"""Reserve for export, metrics and publication besides what scales with the data."""


@dataclass
class TimeBudget:
    """A wall-clock allowance for a whole run, from when it was created.

    Attributes:
        seconds: the allowance.
        clock: seconds now (monotonic); tests inject a fake one.
        started: ``clock()`` at creation.
    """

    seconds: float
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=math.nan)

    def __post_init__(self) -> None:
        if math.isnan(self.started):
            self.started = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


class EpochPlanner(Protocol):
    """Consulted by :func:`~recsys_metric.training.rate_search.fit` once before the first epoch
    and by :class:`~recsys_metric.training.loop.FitRun` after every epoch."""

    def before_fit(
        self,
        model: TwoTowerModel,
        data: TrainData,
        config: TrainConfig,
        explicit_share: float,
        *,
        candidates: int,
        clock: Callable[[], float],
    ) -> TrainConfig:
        """The config the fit trains with (a planner may size settings to the budget); called
        once, before any epoch, by a fit that is neither resumed nor distributed.

        Args:
            model, data, config, explicit_share: as the fit received them (``config`` resolved for
                the split); the model's weights must be left as they were.
            candidates: learning rates the fit races (1 when it trains one rate).
            clock: the fit's clock.
        """
        ...

    def after_epoch(self, run: FitRun) -> str | None:
        """None to go on, or why the run must stop (the epoch just trained is then evaluated)."""
        ...


def planning_seconds(seconds: list[float]) -> list[float]:
    """The epoch timings a plan reads: the last three, the first epoch left out once later ones
    exist (it carries one-off costs: the kernel's compilation, first allocations; on the generated
    1M log it took 49 s where the next took 5 s, and a 2-minute budget stopped after 2 epochs)."""
    return (seconds[1:] if len(seconds) > 1 else seconds)[-3:]


def epoch_cost(run: FitRun) -> float:
    """Planned seconds of the run's next epoch: the largest of the recent ones
    (:func:`planning_seconds`), times :data:`SAFETY`."""
    seconds = planning_seconds(run.epoch_seconds())
    return SAFETY * max(seconds) if seconds else 0.0


def eval_cost(run: FitRun) -> float:
    """Planned seconds of the run's next evaluation (0 without validation or none measured yet)."""
    if run.validate is None or not run.eval_seconds:
        return 0.0
    return SAFETY * max(run.eval_seconds[-3:])


def after_training_seconds(
    *, eval_users: int, eval_seconds_per_user: float, n_items: int, gate_evaluations: int = 0
) -> float:
    """Reserve for the stages after training: the holdout evaluation (the model and the
    popularity baseline), the quality gate's (``gate_evaluations`` scorers on the same sample: 2
    when a published run is scored, its model and the popularity check), the Annoy index and its
    recall check, export. The gate's evaluations used to be reserved on every run; a first run
    has none, and on the generated 20M log that reserve (231 s) was three times what the
    holdout evaluation took (72 s).

    Args:
        eval_users: users the holdout evaluation scores.
        eval_seconds_per_user: measured validation seconds per user (scoring and ranking).
        n_items: catalogue size.
        gate_evaluations: evaluations the quality gate makes after the run.
    """
    evaluations = 2 + gate_evaluations
    return SAFETY * (
        evaluations * eval_users * eval_seconds_per_user
        + n_items * INDEX_SECONDS_PER_ITEM
        + FIXED_AFTER_SECONDS
    )


@dataclass
class HoldoutPlanner:
    """Stops the holdout fit when one more epoch would leave too little for what follows.

    One more epoch ``e + 1`` fits when ``remaining`` covers: epoch ``e``'s evaluation, the next
    epoch and its evaluation; the
    refit of up to ``e + 1`` epochs at ``refit_scale`` times the holdout epoch's cost (0 without a
    refit), less the epochs a refit training beside the holdout fit has done already
    (:attr:`refit_done`); :attr:`reserve` seconds for the stages after training. The learning-rate race asks
    :meth:`fits` whether a round of every live candidate still fits before it starts one, and ends
    the race with the leader when it does not.

    Attributes:
        budget: the run's budget.
        refit_scale: refit epoch seconds per holdout epoch second (full-log pairs / fit pairs), 0
            without a refit.
        reserve: callable giving the seconds to keep for the stages after training (recomputed
            after each epoch from measured costs).
        negatives: what :func:`~recsys_metric.training.negatives_budget.budget_negatives`
            decided for ``train.negatives: auto`` (None: nothing changed).
        refit_done: epochs the refit has trained so far
            (:class:`~recsys_metric.training.concurrent_refit.ConcurrentRefit`; 0 for a refit that
            follows the holdout fit).
        refit_before: refit epochs that come before the current fit's (a second phase's: the
            first phase's best epoch; :mod:`~recsys_metric.training.second_phase` sets it).
    """

    budget: TimeBudget
    refit_scale: float
    reserve: Callable[[], float]
    last_plan: dict[str, float] = field(default_factory=dict)
    negatives: dict[str, Any] | None = None
    refit_done: Callable[[], int] = lambda: 0
    refit_before: int = 0

    def _plan(self, run: FitRun, scale: int) -> tuple[float, float, float, float, float]:
        """``(remaining, evaluation, next, refit, reserve)`` seconds for ``scale`` more epochs
        like ``run``'s next one (each with its evaluation) after ``run``'s own evaluation."""
        epoch_s = epoch_cost(run)
        evaluation = eval_cost(run)  # this epoch's own evaluation, which comes first
        nxt = scale * (epoch_s + evaluation)
        refit = self.refit_owed(run.epoch + 1) * epoch_s * self.refit_scale
        return self.budget.remaining(), evaluation, nxt, refit, self.reserve()

    def refit_owed(self, epochs: int) -> int:
        """Refit epochs still to train when this fit's kept weights end up after its ``epochs``-th
        epoch: :attr:`refit_before` (a second phase's: the first phase's best epoch) plus
        ``epochs``, less what a concurrent refit has trained of them."""
        return max(0, self.refit_before + epochs - self.refit_done())

    def second_phase_epochs(self, first: TrainResult) -> int:
        """Epochs a second phase after ``first`` (a finished fit) could train, each with its
        evaluation and its refit epoch, once the refit owes ``first``'s best epochs: planned at
        ``first``'s recent epoch and mean evaluation costs (:data:`SAFETY`-scaled), leaving the
        reserve."""
        seconds = planning_seconds([float(r["seconds"]) for r in first.history])
        epoch_s = SAFETY * max(seconds) if seconds else 0.0
        evaluations = sum(1 for r in first.history if r.get("metrics"))
        eval_s = SAFETY * first.validation_seconds / evaluations if evaluations else 0.0
        owed = max(0, (first.best_epoch or 0) - self.refit_done()) * epoch_s * self.refit_scale
        per_epoch = epoch_s + eval_s + epoch_s * self.refit_scale
        room = self.budget.remaining() - self.reserve() - owed
        if per_epoch <= 0:
            return 1 << 30
        return int(max(0.0, room) // per_epoch)

    def before_fit(
        self,
        model: TwoTowerModel,
        data: TrainData,
        config: TrainConfig,
        explicit_share: float,
        *,
        candidates: int,
        clock: Callable[[], float],
    ) -> TrainConfig:
        """``negatives: auto`` sized to the budget
        (:func:`~recsys_metric.training.negatives_budget.budget_negatives`); the decision is kept
        in :attr:`negatives`."""
        # Imported here: negatives_budget builds on this module (its probe reads SAFETY and this
        # planner's budget), so a module-level import would be circular.
        from recsys_metric.training.negatives_budget import budget_negatives

        config, self.negatives = budget_negatives(
            model, data, config, self, explicit_share, candidates=candidates, clock=clock
        )
        return config

    def fits(self, run: FitRun, scale: int = 1) -> bool:
        """Whether ``scale`` more epochs like ``run``'s next one (a round of ``scale`` race
        candidates) fit with their evaluations, the refit and the reserve."""
        remaining, evaluation, nxt, refit, reserve = self._plan(run, scale)
        return remaining >= evaluation + nxt + refit + reserve

    def after_epoch(self, run: FitRun) -> str | None:
        remaining, evaluation, nxt, refit, reserve = self._plan(run, 1)
        self.last_plan = {
            "remaining_s": round(remaining, 3),
            "evaluation_s": round(evaluation, 3),
            "next_epoch_s": round(nxt, 3),
            "refit_s": round(refit, 3),
            "reserve_s": round(reserve, 3),
        }
        if remaining >= evaluation + nxt + refit + reserve:
            return None
        return (
            f"time budget: {remaining:.0f} s left after epoch {run.epoch}, one more with its "
            f"evaluation would need {evaluation + nxt:.0f} s, then the refit {refit:.0f} s and the "
            f"stages after training {reserve:.0f} s"
        )

    def affordable_epochs(self, run: FitRun) -> int:
        """Epochs one fit like ``run`` could still train alone, each with its evaluation and its
        share of the refit, leaving the reserve: ``(remaining - reserve) / (epoch + evaluation +
        refit_scale * epoch)`` at the planned (measured, :data:`SAFETY`-scaled) costs."""
        epoch_s = epoch_cost(run)
        per_epoch = epoch_s + eval_cost(run) + epoch_s * self.refit_scale
        if per_epoch <= 0:
            return 1 << 30
        return int(max(0.0, self.budget.remaining() - self.reserve()) // per_epoch)


@dataclass
class RefitPlanner:
    """Stops the refit when one more epoch would leave less than :attr:`reserve` seconds."""

    budget: TimeBudget
    reserve: Callable[[], float]

    def before_fit(
        self,
        model: TwoTowerModel,
        data: TrainData,
        config: TrainConfig,
        explicit_share: float,
        *,
        candidates: int,
        clock: Callable[[], float],
    ) -> TrainConfig:
        """The config unchanged: the refit trains at the holdout fit's settings."""
        return config

    def after_epoch(self, run: FitRun) -> str | None:
        nxt = epoch_cost(run)
        reserve = self.reserve()
        remaining = self.budget.remaining()
        if remaining >= nxt + reserve:
            return None
        return (
            f"time budget: {remaining:.0f} s left after refit epoch {run.epoch}, one more would need "
            f"{nxt:.0f} s and the stages after training {reserve:.0f} s"
        )

    def affordable_epochs(self, epoch_seconds: float) -> int:
        """How many refit epochs of ``epoch_seconds`` (planned, safety included) fit now."""
        if epoch_seconds <= 0:
            return 1 << 30
        return int(max(0.0, self.budget.remaining() - self.reserve()) // epoch_seconds)
