"""The second phase after early stopping (train.lr_drop): kept only when it beats the first on
validation, never after the epoch cap, inside the time budget, replayed by the refit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys_metric.config import ModelConfig, TrainConfig, config_from_dict
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training import fit
from recsys_metric.training.budget import HoldoutPlanner, TimeBudget
from recsys_metric.training.concurrent_refit import ConcurrentRefit
from recsys_metric.training.run_budget import RunPlan
from recsys_metric.training.second_phase import (
    SEED_OFFSET,
    phase_config,
    refit_epochs_by_phase,
    replay_second_phase,
)
from tests.test_concurrent_refit import DIM, FIT, FULL, N_ITEMS, N_USERS

# FIT, FULL: the concurrent refit tests' log (two communities), the holdout fit's 700 pairs of 900.

# Stops after epoch 5 with its best at 2 (patience 3; the moving mean falls from epoch 3 on).
FIRST = [0.5, 0.7, 0.4, 0.3, 0.2]


def _config(**overrides) -> TrainConfig:
    base = dict(epochs=30, batch_size=64, negatives=3, device="cpu", compile="off", lr=0.05, patience=3,
                patience_growth=0, eval_every=1, kernel="torch", concurrent_refit=False)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _model() -> TwoTowerModel:
    return TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)


def _tables(model: TwoTowerModel) -> list[np.ndarray]:
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def _recording(values: list[float]):
    """A validation returning ``values`` in turn (then their last) and keeping a copy of the item
    table at each call (the weights of the epoch just trained)."""
    seen: list[torch.Tensor] = []

    def validate(model):
        seen.append(model.item_embedding.weight.detach().clone())
        return {"recall@20": values[min(len(seen), len(values)) - 1]}

    validate.seen = seen
    return validate


def test_a_second_phase_that_beats_the_first_is_kept_from_the_first_phases_best_weights():
    # Phase 2 starts at 0.7 (phase 1's best, not evaluated again), beats it at its epoch 2.
    validate = _recording(FIRST + [0.6, 0.75, 0.72, 0.71, 0.70, 0.69, 0.68, 0.67, 0.66])
    model = _model()
    result = fit(model, FIT, _config(), validate=validate, progress=False)
    phase = result.second_phase
    assert phase["lr"] == pytest.approx(0.01) and phase["from_epoch"] == 2
    assert phase["best_epoch"] == 2 and phase["best_metric"] == 0.75 and phase["outcome"].startswith("kept")
    assert result.best_epoch == 4 and result.best_metric == 0.75 and result.lr == 0.05
    second = result.history[5:]
    assert len(second) == phase["epochs_run"] >= 3
    assert [r["epoch"] for r in result.history] == list(range(1, 6 + len(second)))
    assert all(r.get("phase") == 2 for r in second) and "phase" not in result.history[0]
    assert validate.seen[5 + 1].equal(model.item_embedding.weight), "the second phase's epoch 2"

    # Its first epoch trained from the first phase's best weights (epoch 2), at 0.01, with a fresh
    # optimiser and the phase's seed: what a fit at 0.01 from those weights trains.
    alone = _model()
    first_alone = fit(alone, FIT, _config(lr_drop=None), validate=_recording(FIRST), progress=False)
    assert first_alone.best_epoch == 2 and first_alone.second_phase is None
    fit(alone, FIT, phase_config(_config(), 0.01), epochs=1, progress=False)
    assert validate.seen[5].equal(alone.item_embedding.weight)


def test_a_second_phase_that_does_not_beat_the_first_leaves_its_best_weights():
    validate = _recording(FIRST + [0.6, 0.65, 0.5, 0.4, 0.3])
    model = _model()
    result = fit(model, FIT, _config(), validate=validate, progress=False)
    assert result.second_phase["best_epoch"] == 0 and result.second_phase["outcome"].startswith("not kept")
    assert result.best_epoch == 2 and result.best_metric == 0.7
    assert result.epochs_run == 5 + result.second_phase["epochs_run"]
    assert validate.seen[1].equal(model.item_embedding.weight), "the first phase's epoch 2"
    assert refit_epochs_by_phase(result, 2) == (2, 0)


def test_no_second_phase_after_the_epoch_cap_when_turned_off_or_without_room_under_the_cap():
    rising = _recording([0.1 * i for i in range(1, 31)])
    result = fit(_model(), FIT, _config(epochs=6), validate=rising, progress=False)
    assert not result.stopped_early and result.second_phase is None and result.epochs_run == 6

    off = fit(_model(), FIT, _config(lr_drop="none"), validate=_recording(FIRST), progress=False)
    assert off.stopped_early and off.second_phase is None and off.epochs_run == 5

    # 7 epochs: after the first phase's 5, fewer than the patience (3) are left under the cap.
    capped = fit(_model(), FIT, _config(epochs=7), validate=_recording(FIRST + [0.9]), progress=False)
    assert capped.epochs_run == 5 and capped.best_epoch == 2
    assert capped.second_phase == {"lr": pytest.approx(0.01), "outcome": capped.second_phase["outcome"]}
    assert "2 epochs left under the cap of 7, fewer than the patience (3)" in capped.second_phase["outcome"]


def test_lr_drop_is_a_fraction_or_none():
    assert config_from_dict({"train": {"lr_drop": "none"}}).train.lr_drop is None
    assert TrainConfig().lr_drop == 0.2
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ConfigError, match="lr_drop"):
            config_from_dict({"train": {"lr_drop": bad}})


class _Room:
    """A planner with room for ``epochs`` more epochs of a second phase, and no other limit."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def before_fit(self, model, data, config, explicit_share, *, candidates, clock):
        return config

    def after_epoch(self, run):
        return None

    def second_phase_epochs(self, first):
        return self.epochs


def test_the_time_budget_must_afford_the_patience_for_a_second_phase():
    short = fit(
        _model(), FIT, _config(), validate=_recording(FIRST + [0.9]), progress=False, planner=_Room(2)
    )
    assert short.epochs_run == 5 and short.best_metric == 0.7
    assert short.second_phase["outcome"] == (
        "not run: the time budget affords 2 more epochs, fewer than the patience (3)"
    )
    roomy = fit(
        _model(), FIT, _config(), validate=_recording(FIRST + [0.9]), progress=False, planner=_Room(3)
    )
    assert roomy.second_phase["best_epoch"] == 1 and roomy.best_epoch == 3


def test_the_holdout_planner_plans_a_second_phase_with_the_refit_it_owes():
    clock = [0.0]
    budget = TimeBudget(100.0, clock=lambda: clock[0])
    planner = HoldoutPlanner(budget, refit_scale=2.0, reserve=lambda: 10.0, refit_done=lambda: 3)
    assert planner.refit_owed(5) == 2, "a first phase owes its epochs beyond the refit's 3"
    planner.refit_before = 4
    assert planner.refit_owed(2) == 4 + 2 - 3, "a second phase owes the first's best epochs, then its own"
    planner.refit_before = 0
    # First phase: epochs of 1 s (the first, 9 s, left out), 4 evaluations in 2 s; best epoch 5.
    from recsys_metric.training.data import TrainResult

    first = TrainResult(
        history=[{"seconds": s, "metrics": {"recall@20": 0.1}} for s in (9.0, 1.0, 1.0, 1.0)],
        best_epoch=5,
        validation_seconds=2.0,
    )
    # Room: 100 - 10 reserve - the first phase's 2 owed refit epochs (2 x 1.25 x 2) = 85 s; an
    # epoch with its evaluation and refit epoch: 1.25 + 1.25 * 0.5 + 1.25 * 2 = 4.375 s.
    assert planner.second_phase_epochs(first) == int(85 // 4.375)


def _by_hand(config: TrainConfig, first: int, second: int) -> TwoTowerModel:
    """The refit by hand: ``first`` epochs at 0.05, then ``second`` at 0.01 from those weights with
    a fresh optimiser and the phase's seed."""
    model = _model()
    fit(model, FULL, config, epochs=first, progress=False)
    if second:
        fit(model, FULL, config.model_copy(update={"lr": 0.01, "seed": config.seed + SEED_OFFSET}),
            epochs=second, progress=False)  # fmt: skip
    return model


def _same(a: TwoTowerModel, b: TwoTowerModel) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(_tables(a), _tables(b), strict=True))


KEPT = FIRST + [0.6, 0.75, 0.72, 0.71, 0.70, 0.69, 0.68, 0.67, 0.66]


def test_the_refit_beside_the_holdout_fit_follows_it_into_its_second_phase():
    config = _config(concurrent_refit=True)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=_recording(KEPT), progress=False, refit=beside)
        assert beside.started and beside.in_second_phase and holdout.best_epoch == 4
        assert beside.epochs_done >= 2, "the first phase's 2 kept epochs count"
        first_epochs, second_epochs = refit_epochs_by_phase(holdout, holdout.best_epoch)
        assert (first_epochs, second_epochs) == (2, 2)
        refit = beside.finish(second_epochs)
    assert refit.epochs_run == 4 and refit.second_phase["lr"] == pytest.approx(0.01)
    assert [r.get("phase") for r in refit.history] == [None, None, 2, 2]
    assert _same(beside.model, _by_hand(RunPlan.refit_config(config, holdout), 2, 2))

    # A second phase the holdout fit did not keep: the refit goes back to its first phase's weights.
    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=_recording(FIRST + [0.6, 0.65, 0.5, 0.4, 0.3]),
                      progress=False, refit=beside)  # fmt: skip
        assert beside.in_second_phase and holdout.best_epoch == 2
        assert refit_epochs_by_phase(holdout, holdout.best_epoch) == (2, 0)
        refit = beside.finish(0)
    assert refit.epochs_run == 2 and refit.second_phase is None
    assert _same(beside.model, _by_hand(RunPlan.refit_config(config, holdout), 2, 0))


def test_the_refit_after_the_holdout_fit_replays_its_second_phase():
    config = _config()
    holdout = fit(_model(), FIT, config, validate=_recording(KEPT), progress=False)
    refit_config = RunPlan.refit_config(config, holdout)
    model = _model()
    first = fit(model, FULL, refit_config, epochs=2, progress=False)
    refit = replay_second_phase(model, FULL, refit_config, holdout, first, 2, explicit_share=0.0,
                                split_method="temporal", progress=False, planner=None)  # fmt: skip
    assert refit.epochs_run == 4 and refit.best_epoch == 4
    assert [r["epoch"] for r in refit.history] == [1, 2, 3, 4]
    assert _same(model, _by_hand(refit_config, 2, 2))
    # A budget that cuts the refit cuts the second phase first.
    assert refit_epochs_by_phase(holdout, 3) == (2, 1)
    assert refit_epochs_by_phase(holdout, 1) == (1, 0)


def test_the_run_summary_says_what_the_second_phase_did():
    from recsys_metric.run_summary import time_budget_lines

    kept = {"lr": 0.01, "from_epoch": 15, "epochs_run": 20, "best_epoch": 12, "best_metric": 0.3108,
            "seconds": 1.4, "outcome": "kept: best 0.3108 after 12 of its epochs against 0.3054 before it"}  # fmt: skip
    assert time_budget_lines({"time_budget": {"second_phase": kept}}) == [
        "second phase at lr 0.01 from epoch 15, 20 epochs: kept: best 0.3108 after 12 of its epochs against "
        "0.3054 before it"
    ]
    skipped = {
        "lr": 0.002,
        "outcome": "not run: the time budget affords 3 more epochs, fewer than the patience (5)",
    }
    assert time_budget_lines({"time_budget": {"second_phase": skipped}}) == [
        "second phase at lr 0.002: not run: the time budget affords 3 more epochs, fewer than the patience (5)"
    ]
    assert time_budget_lines({"time_budget": {"second_phase": None}}) == []


class _Crash(RuntimeError):
    pass


def test_a_run_interrupted_in_its_second_phase_resumes_to_the_same_model(tmp_path):
    def scripted(offset: int, crash_at: int | None = None):
        calls = [offset]

        def validate(model):
            calls[0] += 1
            if calls[0] == crash_at:
                raise _Crash
            return {"recall@20": KEPT[min(calls[0], len(KEPT)) - 1]}

        return validate

    straight = _model()
    expected = fit(
        straight, FIT, _config(), validate=scripted(0), checkpoint_dir=tmp_path / "a", progress=False
    )
    assert expected.second_phase["best_epoch"] == 2
    interrupted = _model()
    with pytest.raises(_Crash):
        # The 8th evaluation is the second phase's third epoch.
        fit(interrupted, FIT, _config(), validate=scripted(0, crash_at=8), checkpoint_dir=tmp_path / "b",
            progress=False)  # fmt: skip
    assert (tmp_path / "b" / "second-phase").is_dir()
    resumed_model = _model()
    resumed = fit(resumed_model, FIT, _config(), validate=scripted(7), checkpoint_dir=tmp_path / "b", resume=True,
                  progress=False)  # fmt: skip
    assert resumed.best_epoch == expected.best_epoch == 4 and resumed.epochs_run == expected.epochs_run
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in expected.history]
    assert _same(resumed_model, straight)
