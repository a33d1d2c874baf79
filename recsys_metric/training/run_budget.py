"""How a pipeline run spends ``train.time_budget``: the plan for the holdout fit and the refit,
and the record of what was traded (``metrics.json``'s ``time_budget``).

:class:`RunPlan` is built once per run by :func:`recsys_metric.pipeline.train_and_evaluate`; it
holds the budget (started when the run started, preparation included), the sampled validation
and the measured costs, and hands out the planners of :mod:`recsys_metric.training.budget`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys_metric.training.budget import (
    SAFETY,
    HoldoutPlanner,
    RefitPlanner,
    TimeBudget,
    after_training_seconds,
    planning_seconds,
)
from recsys_metric.training.data import TrainResult
from recsys_metric.training.validation import SampledValidation

if TYPE_CHECKING:
    from recsys_metric.config import Config, TrainConfig
    from recsys_metric.training.concurrent_refit import ConcurrentRefit

UNMEASURED_SECONDS_PER_USER_ITEM = 1e-8
"""Scoring seconds per user and catalogue item assumed for the reserve until validation has
measured it (the reserve adds :data:`~recsys_metric.training.budget.SAFETY` on top): 1.2-1.4x
what the evaluator took on 2 quiet CPU cores here (citeulike-a, 5,551 users x 16,980 items in
0.8 s: 8.5e-9; the generated 20M log's holdout, 2 x 50,000 users x 100k items in 45-72 s:
4.5e-9-7.2e-9). It sizes the negatives a budget affords
(:mod:`recsys_metric.training.negatives_budget`), which are chosen before validation has run:
2e-8, as before, reserved about three times what the 20M log's evaluations took. A flat 1 ms per user, before that, reserved 138 s for a
40k-item catalogue whose stages after training took about 20 s, and made a short budget drop a
candidate rate on budget grounds after its first epoch (measured on a GPU); once validation has
run, its measured cost replaces this guess."""


@dataclass
class RunPlan:
    """The time plan of one run.

    Attributes:
        budget: the run's budget, or None (``train.time_budget: none``).
        validation: early stopping's sampled validation (its measured cost sizes the reserve).
        eval_users: users the holdout evaluation after training scores.
        n_items: catalogue size (the index's cost).
        refit_scale: refit epoch seconds per holdout epoch second (full-log liked pairs over the
            fit's), 0 without a refit.
        gate_evaluations: evaluations the quality gate makes after the run: 2 (the published
            model and the popularity check of the rebuilt holdout) when a run is being served, 0
            for a first run or outside the nightly flow.
    """

    budget: TimeBudget | None
    validation: SampledValidation
    eval_users: int
    n_items: int
    refit_scale: float
    gate_evaluations: int = 0
    holdout_planner: HoldoutPlanner | None = field(init=False, default=None)
    refit_planner: RefitPlanner | None = field(init=False, default=None)
    refit_note: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.budget is not None:
            self.holdout_planner = HoldoutPlanner(self.budget, self.refit_scale, self.reserve)
            self.refit_planner = RefitPlanner(self.budget, self.reserve)

    @classmethod
    def for_fit(
        cls,
        budget: TimeBudget | None,
        validate_users: Callable[[Any, np.ndarray], float],
        validation_users: np.ndarray,
        config: Config,
        *,
        test_users: int,
        n_items: int,
        refit_scale: float,
        gate_evaluations: int = 0,
    ) -> RunPlan:
        """The plan of a holdout fit and its refit as the pipeline makes it: early stopping on a
        :class:`SampledValidation` of ``validation_users`` (int ``[N]``, seeded by
        ``config.eval.seed``, at most ``config.eval.validation_max_users``) scored by
        ``validate_users(model, users)``; the holdout evaluation after training scores
        ``test_users`` users, at most ``config.eval.max_users``."""
        key = f"recall@{config.train.early_stopping_k}"
        validation = SampledValidation(
            validate_users,
            validation_users,
            metric_key=key,
            seed=config.eval.seed,
            max_users=config.eval.validation_max_users,
        )
        return cls(
            budget,
            validation,
            eval_users=min(test_users, config.eval.max_users or test_users),
            n_items=n_items,
            refit_scale=refit_scale,
            gate_evaluations=gate_evaluations,
        )

    def follow_refit(self, refit: ConcurrentRefit) -> None:
        """The refit trains beside the holdout fit: the holdout planner plans only the refit
        epochs it has not trained yet."""
        if self.holdout_planner is not None:
            self.holdout_planner.refit_done = lambda: refit.epochs_done

    def reserve(self) -> float:
        """Seconds to keep for the stages after training (:func:`after_training_seconds`)."""
        per_user = self.validation.seconds_per_user or UNMEASURED_SECONDS_PER_USER_ITEM * self.n_items
        return after_training_seconds(
            eval_users=self.eval_users,
            eval_seconds_per_user=per_user,
            n_items=self.n_items,
            gate_evaluations=self.gate_evaluations,
        )

    @staticmethod
    def refit_config(config: TrainConfig, holdout: TrainResult) -> TrainConfig:
        """The refit's training config: ``config`` at the rate the holdout fit trained at
        (``train.lr: auto`` chose it on validation) and at its negatives (``auto`` may have been
        lowered to the budget)."""
        return config.model_copy(update={"lr": holdout.lr, "negatives": holdout.negatives})

    def refit_epochs(self, holdout: TrainResult, done: int = 0) -> int:
        """Epochs the refit trains: the holdout's best epoch, fewer when the budget cannot pay for
        them (each planned at the holdout's slowest recent epoch times ``refit_scale`` and
        :data:`~recsys_metric.training.budget.SAFETY`); 0 means no refit. ``done``: epochs a
        concurrent refit has trained already (only the rest are paid for)."""
        wanted = holdout.best_epoch if holdout.best_epoch is not None else holdout.epochs_run
        if self.refit_planner is None or wanted == 0 or done >= wanted:
            return wanted
        seconds = planning_seconds([float(r["seconds"]) for r in holdout.history])
        per_epoch = SAFETY * self.refit_scale * max(seconds) if seconds else 0.0
        affordable = done + self.refit_planner.affordable_epochs(per_epoch)
        if affordable < wanted:
            self.refit_note = (
                f"the refit trains {affordable} of the {wanted} epochs the holdout chose: "
                f"{self.budget.remaining():.0f} s were left, each refit epoch planned at {per_epoch:.1f} s"
                if self.budget is not None
                else None
            )
            return affordable
        return wanted

    def report(self, holdout: TrainResult, refit: TrainResult | None, refit_epochs: int) -> dict[str, Any]:
        """``metrics.json``'s ``time_budget``: the budget, what each fit ran and why it stopped,
        the validation sample and cadence, and ``traded``: one sentence per thing given up."""
        traded: list[str] = []
        train_s = sum(float(r["seconds"]) for r in holdout.history)
        validation = {
            **self.validation.report(),
            "seconds": holdout.validation_seconds,
            "share_of_training": round(holdout.validation_seconds / train_s, 3) if train_s > 0 else None,
            "evaluations": sum(1 for r in holdout.history if r.get("metrics")),
            "epochs": holdout.epochs_run,
        }
        if self.validation.n_users < self.validation.eligible:
            traded.append(
                f"validation scored {self.validation.n_users} of {self.validation.eligible} users "
                "(a seeded sample, sized so an evaluation costs about a fifth of an epoch)"
            )
        if validation["evaluations"] < holdout.epochs_run:
            traded.append(
                f"validation ran after {validation['evaluations']} of {holdout.epochs_run} epochs "
                "(train.eval_every: auto keeps it near a fifth of the training time)"
            )
        negatives = None if self.holdout_planner is None else self.holdout_planner.negatives
        if negatives is not None:
            traded.append(negatives["reason"])
        dropped = [t for t in holdout.lr_search if "dropped" in str(t.get("outcome", ""))]
        for trial in dropped:
            traded.append(f"learning rate {trial['lr']:g} {trial['outcome']}")
        if holdout.stopped_by:
            traded.append(f"holdout fit: {holdout.stopped_by}")
        if refit is not None and refit.stopped_by:
            traded.append(f"refit: {refit.stopped_by}")
        if self.refit_note:
            traded.append(self.refit_note)
        best = holdout.best_metric
        last = next((r for r in reversed(holdout.history) if r.get("metrics")), None)
        se = None if last is None else last["metrics"].get(f"{self.validation.metric_key}_se")
        return {
            "seconds": None if self.budget is None else self.budget.seconds,
            "elapsed_at_training_end": None if self.budget is None else round(self.budget.elapsed(), 3),
            "reserve_after_training_s": round(self.reserve(), 3),
            "holdout": {
                "epochs_run": holdout.epochs_run,
                "best_epoch": holdout.best_epoch,
                "stopped_by": holdout.stopped_by
                or ("early stopping" if holdout.stopped_early else "epoch cap (train.epochs)"),
                "last_plan": None if self.holdout_planner is None else self.holdout_planner.last_plan,
            },
            "refit": None
            if self.refit_scale == 0
            else {
                "epochs_wanted": holdout.best_epoch if holdout.best_epoch is not None else holdout.epochs_run,
                "epochs_planned": refit_epochs,
                "epochs_run": 0 if refit is None else refit.epochs_run,
                "stopped_by": None if refit is None else refit.stopped_by,
                "beside_holdout": refit is not None and refit.concurrent_epochs is not None,
            },
            "validation": {
                **validation,
                "best": best,
                "standard_error": None if se is None or math.isnan(se) else se,
            },
            "lr_candidates": holdout.lr_search,
            "second_phase": holdout.second_phase,
            "negatives": negatives,
            "traded": traded,
        }
