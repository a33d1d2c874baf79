"""The learning-rate race of ``train.lr: auto`` (``train.lr_search: race``): successive halving
over ``train.lr_candidates``.

Every candidate starts from the same weights with the same seed, each on its own copy of the
model, and they train side by side, one epoch at a time (the candidate with the fewest
evaluations goes next). At rung ``j`` (every live candidate has made ``patience * 2**j``
validation evaluations, or finished; under ``eval_every: auto``, whose cadence follows measured costs,
``patience * 2**j`` epochs, each candidate evaluated at that epoch) the live candidates are ranked by their best validation
Recall@K so far and the worse half stops; the survivors go on to the next rung, the last one to
its own early stop. A candidate that early-stops on its own before a rung simply finishes. The
model ends with the best evaluated weights of the candidate with the highest best validation
Recall@K (earlier candidates win ties), as in the full search, which trains every candidate to
its end: with two candidates the race costs the loser's first ``patience`` evaluations instead of
a whole fit.

Halving compares candidates at equal evaluation counts, which favours the rate that climbs
fastest early. The first rung is ``patience`` evaluations: as long as early stopping itself
waits before it gives up on a flat stretch. And a candidate in the worse half that is gaining on
the leader (its best rose more than the leader's since the rung's midpoint, :func:`_gains`) is
kept to the next rung instead of stopped.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recsys_metric.config import TrainConfig
from recsys_metric.device import resolve_device
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.loop import FitRun

if TYPE_CHECKING:
    from recsys_metric.training.budget import EpochPlanner
    from recsys_metric.training.concurrent_refit import ConcurrentRefit

logger = logging.getLogger(__name__)


def evaluations(run: FitRun) -> int:
    """Validation evaluations a run has made (epoch 0 not counted)."""
    return sum(1 for record in run.result.history if record.get("metrics"))


RACE_SHARE = 0.25
"""Under a time budget the losers of the race may cost at most about this share of the epochs the
budget affords: the first rung comes after ``RACE_SHARE * affordable / candidates`` epochs when
that is fewer than ``patience`` (:func:`first_rung`)."""

MIN_RUNG = 2
"""The first rung never comes before this many epochs: after one epoch the rate that moves most
in its first steps leads, and on the 20M log that was the rate that fell after (validation
Recall@20 at lr 0.05: .079, .065; at 0.01: .059, .090; ``bench/configs/nightly_20m.toml``)."""


def first_rung(patience: int, affordable: int | None, candidates: int) -> int:
    """Epochs (or evaluations) before the first halving: ``patience``, or under a budget that
    affords ``affordable`` epochs of one fit, ``RACE_SHARE * affordable / candidates`` when that is
    fewer, never fewer than :data:`MIN_RUNG` (nor more than ``patience``)."""
    if affordable is None or candidates < 2:
        return patience
    share = math.floor(RACE_SHARE * affordable / candidates)
    return max(min(MIN_RUNG, patience), min(patience, share))


def race_progress(run: FitRun) -> int:
    """How far a candidate is in the race's units: epochs under ``eval_every: auto`` (whose
    cadence follows measured costs, so evaluation counts would differ between candidates and
    machines; each candidate is evaluated at every rung's epoch), evaluations otherwise."""
    return run.epoch if run.config.eval_every == "auto" else evaluations(run)


def race(
    model: TwoTowerModel,
    data: TrainData,
    config: TrainConfig,
    explicit_share: float,
    validate: Callable[[TwoTowerModel], dict[str, float]],
    epochs: int | None,
    checkpoint_dir: Path | None,
    resume: bool,
    progress: bool | None,
    *,
    evaluate_start: bool = False,
    planner: EpochPlanner | None = None,
    clock: Callable[[], float] = time.perf_counter,
    refit: ConcurrentRefit | None = None,
) -> TrainResult:
    """Race the rates of ``config.lr_candidates`` (``config`` resolved for the split) by successive
    halving; the model ends with the winner's best weights.

    With ``checkpoint_dir`` each candidate checkpoints into ``lr-<rate>`` (as the full search), so
    ``resume`` continues each where it was. ``planner`` is asked after every epoch of every
    candidate; its ``fits(run, n)``, when it has one, is asked before every round of ``n`` live
    candidates (after the first), and when the round does not fit the race ends: every live
    candidate is evaluated at that epoch and the leader goes on alone. Its
    ``affordable_epochs(run)``, when it has one, sizes the first rung once every candidate has
    trained an epoch (:func:`first_rung`).

    Returns:
        The winner's :class:`TrainResult`, ``lr_search`` holding one dict per candidate: ``lr``,
        ``best_epoch``, ``best_metric``, ``epochs_run``, ``seconds`` (training) and ``outcome``
        (``chosen``, ``dropped at rung N (after E evaluations)``, ``early stop`` or the planner's
        reason).

    ``refit`` starts once one candidate is left, at its rate, and follows it.
    """
    device = resolve_device(config.device)
    n_epochs = config.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {n_epochs}")
    metric_key = f"recall@{config.early_stopping_k}"
    rates = [float(lr) for lr in config.lr_candidates]
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    runs: list[FitRun] = []
    outcome: dict[int, str] = {}
    try:
        initial = copy.deepcopy(model.state_dict())
        for i, lr in enumerate(rates):
            own = model if i == 0 else copy.deepcopy(model)
            if i > 0:
                own.load_state_dict(initial)
            runs.append(
                FitRun(
                    own,
                    data,
                    config.model_copy(update={"lr": lr}),
                    device,
                    n_epochs,
                    metric_key,
                    explicit_share,
                    validate,
                    None if checkpoint_dir is None else Path(checkpoint_dir) / f"lr-{lr:g}",
                    resume,
                    progress,
                    evaluate_start=evaluate_start,
                    planner=planner,
                    clock=clock,
                    validation_threads=threads_before,
                )
            )
        del initial
        logger.info(
            "train.lr auto: racing %s (successive halving from %d %s)",
            rates,
            config.patience,
            "epochs" if config.eval_every == "auto" else "evaluations",
        )
        live = [i for i, run in enumerate(runs) if not run.done]
        for i, run in enumerate(runs):
            if run.done:  # resumed from a checkpoint written after it had finished
                outcome[i] = _finished(run.result)
        rung, target = 0, config.patience
        sized = not hasattr(planner, "affordable_epochs")
        while live:
            if not sized and all(runs[i].epoch >= 1 for i in live):
                # Every candidate has trained an epoch: the budget's room is known, and with it how
                # early the first halving must come (first_rung).
                sized = True
                affordable = min(planner.affordable_epochs(runs[i]) for i in live)  # type: ignore[union-attr]
                target = first_rung(config.patience, affordable, len(live))
                if target < config.patience:
                    logger.info(
                        "train.lr auto: the budget affords about %d epochs of one fit; first rung after %d",
                        affordable,
                        target,
                    )
            behind = [i for i in live if race_progress(runs[i]) < target]
            if not behind:
                # A first rung the budget brought forward is said in the outcome (and so among
                # what the run traded): with more time the race might have chosen otherwise.
                early = rung == 0 and target < config.patience
                note = (
                    f"; the time budget brought the first rung forward from {config.patience}"
                    if early
                    else ""
                )
                stopped = live
                live = _halve(runs, live, rung, target, outcome, metric_key, note=note)
                _release_stopped(runs, [i for i in stopped if i not in live])
                rung, target = rung + 1, target * 2
                if refit is not None and len(live) == 1:
                    refit.start(runs[live[0]])
                continue
            if _round_unaffordable(planner, runs, live):
                # The budget cannot pay another epoch of every candidate, but may pay the leader's:
                # compare them all at this epoch and go on with the best alone.
                for j in live:
                    runs[j].evaluate_now()
                stopped = live
                live = _end_race(runs, live, outcome, metric_key)
                _release_stopped(runs, [i for i in stopped if i not in live])
                if refit is not None and len(live) == 1:
                    refit.start(runs[live[0]])
                continue
            i = min(behind, key=lambda j: (race_progress(runs[j]), runs[j].epoch, j))
            # Under eval_every: auto the rung is an epoch, at which every candidate is scored.
            at_rung = runs[i].config.eval_every == "auto" and runs[i].epoch + 1 == target
            runs[i].train_epoch(evaluate=at_rung)
            if runs[i].done:
                live.remove(i)
                outcome[i] = _finished(runs[i].result)
                runs[i].release()  # it may still win: its model (with its best weights) stays
    finally:
        results = [run.close() for run in runs]
        torch.set_num_threads(threads_before)

    scores = [-math.inf if r.best_metric is None else r.best_metric for r in results]
    winner = max(range(len(runs)), key=lambda i: (scores[i], -i))
    if winner != 0:
        # Never a stopped candidate (_release_stopped dropped their models): one that stopped
        # trailed a candidate whose best only rose since, or tied it later in the list.
        assert runs[winner].model is not None
        model.load_state_dict(runs[winner].model.state_dict())
    trials: list[dict[str, Any]] = []
    for i, (lr, result) in enumerate(zip(rates, results, strict=True)):
        trials.append(
            {
                "lr": lr,
                "best_epoch": result.best_epoch,
                "best_metric": result.best_metric,
                "epochs_run": result.epochs_run,
                "seconds": round(sum(float(r["seconds"]) for r in result.history), 3),
                "outcome": ("chosen, " if i == winner else "") + outcome.get(i, "not run"),
            }
        )
    chosen = results[winner]
    chosen.lr_search = trials
    return chosen


def _release_stopped(runs: list[FitRun], stopped: list[int]) -> None:
    """Free the memory of the candidates the race just stopped (:meth:`FitRun.release`), and the
    models of those but the first (whose model is the caller's): a stopped candidate cannot win."""
    for i in stopped:
        runs[i].release(keep_model=i == 0)


def _round_unaffordable(planner: EpochPlanner | None, runs: list[FitRun], live: list[int]) -> bool:
    """At the start of a round (every live candidate at the same epoch, at least one trained):
    whether the planner says a round of all of them no longer fits."""
    fits = getattr(planner, "fits", None)
    if fits is None or len(live) < 2:
        return False
    epochs = {runs[i].epoch for i in live}
    if len(epochs) != 1 or 0 in epochs:
        return False
    return not fits(runs[live[0]], len(live))


def _end_race(runs: list[FitRun], live: list[int], outcome: dict[int, str], metric_key: str) -> list[int]:
    """The leader alone (best validation so far, earlier candidates winning ties); the others
    stop with the budget as their reason."""
    leader = min(live, key=lambda i: (-(runs[i].result.best_metric or -math.inf), i))
    for i in live:
        if i == leader:
            continue
        run = runs[i]
        outcome[i] = f"dropped at epoch {run.epoch}: the time budget pays for one candidate, not {len(live)}"
        logger.info(
            "train.lr auto: the budget cannot pay another round of %d candidates; rate %g stops "
            "(best %s %.4f against %.4f)",
            len(live),
            run.config.lr,
            metric_key,
            run.result.best_metric or 0.0,
            runs[leader].result.best_metric or 0.0,
        )
    return [leader]


def _finished(result: TrainResult) -> str:
    """How a candidate that ran to its own end ended."""
    return result.stopped_by or ("early stop" if result.stopped_early else "epoch cap")


def _halve(
    runs: list[FitRun],
    live: list[int],
    rung: int,
    target: int,
    outcome: dict[int, str],
    metric_key: str,
    *,
    note: str = "",
) -> list[int]:
    """The live candidates that go on past rung ``rung``: the better half (rounded up) of the
    candidates that reached it (the live ones, and finished ones with ``target`` evaluations or
    more: one resumed from a checkpoint), by best validation metric so far, earlier candidates
    winning ties; the other live ones stop."""
    contenders = sorted(
        set(live) | {i for i, run in enumerate(runs) if run.done and race_progress(run) >= target}
    )
    if len(contenders) < 2:
        return live
    ranked = sorted(contenders, key=lambda i: (-(runs[i].result.best_metric or -math.inf), i))
    keep = set(ranked[: math.ceil(len(ranked) / 2)])
    since = target // 2
    for i in live:
        if i in keep:
            continue
        run = runs[i]
        gains = _gains(run, runs[ranked[0]], since)
        if gains is not None and gains[0] > gains[1]:
            keep.add(i)
            logger.info(
                "train.lr auto: rate %g is behind at rung %d but gaining on the leader (%s +%.4f against "
                "+%.4f since epoch %d): it goes on to the next rung",
                run.config.lr,
                rung + 1,
                metric_key,
                gains[0],
                gains[1],
                since,
            )
            continue
        unit = "epochs" if run.config.eval_every == "auto" else "evaluations"
        outcome[i] = f"dropped at rung {rung + 1} (after {target} {unit}, epoch {run.epoch}{note})"
        logger.info(
            "train.lr auto: rate %g stops at rung %d (best %s %.4f against %.4f)",
            run.config.lr,
            rung + 1,
            metric_key,
            run.result.best_metric or 0.0,
            runs[ranked[0]].result.best_metric or 0.0,
        )
    return [i for i in live if i in keep]


def _best_until(run: FitRun, epoch: int) -> float | None:
    """The run's best validation metric among its evaluations at epochs ``<= epoch``; None when it
    made none."""
    values = [
        float(r["metrics"][run.metric_key])
        for r in run.result.history
        if r.get("metrics") and run.metric_key in r["metrics"] and int(r["epoch"]) <= epoch
    ]
    return max(values) if values else None


def _gains(trailing: FitRun, leader: FitRun, since: int) -> tuple[float, float] | None:
    """How much each candidate's best validation rose after epoch ``since``: ``(trailing's,
    leader's)``, or None when either made no evaluation by then (nothing to compare: the
    trailing one is dropped, as plain halving does).

    Halving alone compares the candidates where they stand, which favours the rate that climbs
    fastest early; a slower rate that is still climbing after the faster one has levelled off
    often ends higher. On the generated 1M log, lr 0.01 trailed 0.05 at the first rung (validation
    .090 against .118 at epoch 5) and was dropped, yet trained alone it scored test Recall@20 .149
    against .142 for 0.05 (tuned ALS: .144). A trailing candidate whose best rose more than the
    leader's over the rung's second half is therefore kept to the next rung, where the same test
    is made again; one that gains less stops.
    """
    before_t, before_l = _best_until(trailing, since), _best_until(leader, since)
    now_t, now_l = trailing.result.best_metric, leader.result.best_metric
    if before_t is None or before_l is None or now_t is None or now_l is None:
        return None
    return now_t - before_t, now_l - before_l
