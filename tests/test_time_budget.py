"""The time budget, the learning-rate race, cheap early stopping and a warm start's epoch 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from recsys_metric.config import ModelConfig, TrainConfig, config_from_dict
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.synthetic import generate_log
from recsys_metric.durations import parse_duration
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.pipeline import train_run
from recsys_metric.run_summary import time_budget_lines
from recsys_metric.training import TrainData, fit
from recsys_metric.training import loop as loop_module
from recsys_metric.training.budget import HoldoutPlanner, RefitPlanner, TimeBudget
from recsys_metric.training.loop import EVAL_LOOKS, auto_eval_interval
from recsys_metric.training.rate_race import first_rung
from recsys_metric.training.validation import SampledValidation

N_USERS, N_ITEMS = 40, 20
# No second phase after an early stop (train.lr_drop; tests/test_second_phase.py).
FAST = {"epochs": 40, "batch_size": 64, "negatives": 3, "device": "cpu", "compile": "off", "lr": 0.05,
        "lr_drop": None}  # fmt: skip


def _data() -> TrainData:
    """Even users like 7 of items 0-9, odd users 7 of items 10-19."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(N_USERS):
        users += [user] * 7
        items += list(rng.choice(10, 7, replace=False) + (user % 2) * 10)
    return TrainData.from_matrices(
        InteractionMatrix.from_pairs(np.array(users), np.array(items), N_USERS, N_ITEMS)
    )


def _model() -> TwoTowerModel:
    return TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=4), seed=0)


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def slow_epochs(monkeypatch):
    """Every epoch takes 10 s of the fake clock (an artificially slow step)."""
    clock = FakeClock()
    real = loop_module.run_epoch

    def slow_run_epoch(*args, **kwargs):
        start = clock.now
        record = real(*args, **kwargs)
        clock.now = start + 10.0
        record["seconds"] = 10.0
        return record

    monkeypatch.setattr(loop_module, "run_epoch", slow_run_epoch)
    return clock


def _rising_validation(clock: FakeClock, seconds: float = 2.0):
    """A validate that takes ``seconds`` and scores every call higher than the last (no early stop)."""

    def validate(model):
        validate.calls += 1
        clock.now += seconds
        return {"recall@20": 0.01 * validate.calls}

    validate.calls = 0
    return validate


# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15m", 900.0), ("90s", 90.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("2hr", 7200.0), (600, 600.0)],
)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["none", "None", "off", None])
def test_none_means_no_budget(text):
    assert parse_duration(text) is None
    assert TrainConfig(time_budget=text).time_budget_seconds() is None


def test_bad_durations_say_what_to_write():
    with pytest.raises(
        ValueError, match=r"time budget '15 minutes': use a duration such as 15m, 90s, 1h30m, or none"
    ):
        parse_duration("15 minutes")
    with pytest.raises(ValueError, match="give every number a unit"):
        parse_duration("1h30")
    with pytest.raises(ValueError, match="must be a positive duration"):
        parse_duration("0s")
    with pytest.raises(ConfigError, match="time_budget"):
        config_from_dict({"train": {"time_budget": "soon"}})
    assert TrainConfig().time_budget_seconds() == 1800.0, "the default budget is 30 minutes"


# -- the planner -----------------------------------------------------------------------------------


def test_budget_is_honoured_with_a_slow_step(slow_epochs):
    """10 s epochs, 2 s evaluations, planned at 1.25x: after epoch e (before its evaluation) the
    clock reads 12e - 2 s; the evaluation and one more epoch with its own are planned at
    2.5 + 12.5 + 2.5 = 17.5 s, so a 100 s budget stops after epoch 8 (6 s left), 96 s in."""
    clock = slow_epochs
    budget = TimeBudget(100.0, clock=clock)
    planner = HoldoutPlanner(budget, refit_scale=0.0, reserve=lambda: 0.0)
    validate = _rising_validation(clock)
    model = _model()
    result = fit(
        model, _data(), TrainConfig(**FAST), validate=validate, progress=False, planner=planner, clock=clock
    )
    assert result.epochs_run == 8
    assert result.stopped_by.startswith("time budget: 6 s left after epoch 8")
    assert budget.elapsed() == pytest.approx(96.0) and budget.elapsed() <= budget.seconds
    assert result.best_epoch == 8 and validate.calls == 8
    assert not result.stopped_early


def test_budget_leaves_room_for_the_refit_and_what_follows(slow_epochs):
    """With a refit of as many epochs at the same cost: after epoch e one more needs
    17.5 + 12.5 (e + 1) s; 102 - 12e covers it up to e = 2, so the fit stops after epoch 3 (66 s
    left, 64 after its evaluation), and the refit's 3 epochs (37.5 s planned) fit in them."""
    clock = slow_epochs
    budget = TimeBudget(100.0, clock=clock)
    planner = HoldoutPlanner(budget, refit_scale=1.0, reserve=lambda: 0.0)
    result = fit(
        _model(), _data(), TrainConfig(**FAST), validate=_rising_validation(clock), progress=False,
        planner=planner, clock=clock,
    )  # fmt: skip
    assert result.epochs_run == 3
    assert planner.last_plan == {
        "remaining_s": 66.0,
        "evaluation_s": 2.5,
        "next_epoch_s": 15.0,
        "refit_s": 50.0,
        "reserve_s": 0.0,
    }
    refit_planner = RefitPlanner(budget, reserve=lambda: 10.0)
    assert refit_planner.affordable_epochs(12.5) == 4  # (64 - 10) // 12.5
    refit = fit(
        _model(), _data(), TrainConfig(**FAST), epochs=3, progress=False, planner=refit_planner, clock=clock
    )
    assert refit.epochs_run == 3 and refit.stopped_by is None
    assert budget.remaining() == pytest.approx(34.0)


def test_a_refit_beside_the_holdout_fit_is_planned_for_the_epochs_it_has_not_trained(slow_epochs):
    """As above, with a refit that trains beside the holdout fit and is one epoch behind it when
    the planner asks (refit_done): the refit term is 2 epochs (25 s), so one more epoch needs 42.5
    s; 102 - 12e covers it up to e = 4, and the fit stops after epoch 5 instead of 3."""
    clock = slow_epochs
    planner = HoldoutPlanner(TimeBudget(100.0, clock=clock), refit_scale=1.0, reserve=lambda: 0.0)
    validate = _rising_validation(clock)
    planner.refit_done = lambda: validate.calls  # evaluations so far: the epochs before this one
    result = fit(
        _model(),
        _data(),
        TrainConfig(**FAST),
        validate=validate,
        progress=False,
        planner=planner,
        clock=clock,
    )
    assert result.epochs_run == 5
    assert planner.last_plan["refit_s"] == 25.0 and planner.last_plan["remaining_s"] == 42.0


def test_refit_stops_at_the_budget(slow_epochs):
    clock = slow_epochs
    budget = TimeBudget(40.0, clock=clock)
    refit = fit(
        _model(), _data(), TrainConfig(**FAST), epochs=30, progress=False,
        planner=RefitPlanner(budget, reserve=lambda: 5.0), clock=clock,
    )  # fmt: skip
    # After epoch 2: 20 s left >= 12.5 + 5; after epoch 3: 10 s left < 17.5.
    assert refit.epochs_run == 3 and refit.stopped_by.startswith("time budget")
    assert budget.elapsed() <= budget.seconds


def test_auto_eval_interval_keeps_validation_near_a_fifth_of_training():
    assert auto_eval_interval([0.01, 0.01], [0.015]) == 1, "under 0.02 s an evaluation is always cheap enough"
    # ml-latest-small: 40 ms epochs, 25 ms evaluations (every epoch under the old 0.25 s floor,
    # validation then cost half as much as training).
    assert auto_eval_interval([0.04, 0.04], [0.025]) == 4  # ceil(0.025 / 0.008)
    assert auto_eval_interval([10.0, 10.0], [0.5]) == 1, "under a fifth of an epoch"
    assert auto_eval_interval([10.0, 10.0], [2.0]) == 1, "2 s is a fifth of a 10 s epoch"
    assert auto_eval_interval([10.0, 10.0, 10.0], [9.0]) == 5  # ceil(9 / 2)
    assert auto_eval_interval([10.0], [30.0, 9.0, 12.0]) == 5, "the least recent evaluation counts"
    assert auto_eval_interval([], []) == 1
    assert auto_eval_interval([10.0, 10.0, 10.0], [9.0], max_interval=2) == 2, "capped"
    assert auto_eval_interval([10.0, 10.0, 10.0], [9.0], max_interval=0) == 1
    # An evaluation of at most 2M user-item pairs runs every epoch whatever it measured: a loaded
    # machine must not change a small run's cadence (the bundled log scores 898 x 1,000).
    assert auto_eval_interval([0.01, 0.01], [0.04], eval_scores=898 * 1000) == 1
    assert auto_eval_interval([0.01, 0.01], [0.04], eval_scores=2_000_001) == 20  # ceil(0.04 / 0.002)


def test_eval_every_auto_spaces_out_costly_evaluations(slow_epochs):
    """10 s epochs, 6 s evaluations: every ceil(6 / 2) = 3 epochs (and after the last); a wait of
    max(1, ceil(10 * 1)) = 10 epochs after the first epoch allows 10 // EVAL_LOOKS = 5."""
    clock = slow_epochs
    config = {**FAST, "epochs": 10, "eval_every": "auto", "patience": 1, "patience_growth": 10.0}
    result = fit(
        _model(), _data(), TrainConfig(**config),
        validate=_rising_validation(clock, seconds=6.0), progress=False, clock=clock,
    )  # fmt: skip
    evaluated = [r["epoch"] for r in result.history if r["metrics"]]
    assert evaluated == [1, 4, 7, 10]
    assert result.validation_seconds == pytest.approx(24.0)


def test_eval_every_auto_evaluates_a_small_validation_every_epoch_however_slow(slow_epochs):
    """The costs of the test above, but a validation that says it scores 40 users x 20 items (a
    :class:`SampledValidation` does): under EVAL_FLOOR_SCORES, so every epoch is evaluated; the
    measured seconds (a loaded machine's) do not change a small run's cadence."""
    clock = slow_epochs
    config = {**FAST, "epochs": 10, "eval_every": "auto", "patience": 1, "patience_growth": 10.0}
    validate = _rising_validation(clock, seconds=6.0)
    validate.n_users = N_USERS
    result = fit(_model(), _data(), TrainConfig(**config), validate=validate, progress=False, clock=clock)
    assert [r["epoch"] for r in result.history if r["metrics"]] == list(range(1, 11))


def test_eval_every_auto_still_looks_twice_before_giving_up(slow_epochs):
    """The same costs with a patience of 5 and patience_growth 1: after the best epoch n the wait
    is max(5, n) epochs, so the interval is capped at max(5, n) // EVAL_LOOKS (2): every 2 epochs
    until the best is at epoch 6, then 3 (the share's own interval); the last epoch is always
    evaluated. With the cap at the wait over the patience (5 looks) it was every epoch to 10."""
    assert EVAL_LOOKS == 2
    clock = slow_epochs
    config = {**FAST, "epochs": 12, "eval_every": "auto", "patience": 5, "patience_growth": 1.0}
    result = fit(
        _model(), _data(), TrainConfig(**config),
        validate=_rising_validation(clock, seconds=6.0), progress=False, clock=clock,
    )  # fmt: skip
    assert [r["epoch"] for r in result.history if r["metrics"]] == [1, 3, 5, 7, 10, 12]


def test_eval_every_auto_counts_the_patience_in_epochs(slow_epochs):
    """A curve that peaks at its third evaluation with patience 1 and growth 2: evaluated at
    epochs 1, 2 (the cap is max(1, 2 n) // 2 = n after the best epoch n) and 4, the peak. The run
    then waits max(1, 8) = 8 epochs, evaluating every 3 (the share's interval, under the cap of
    4): it stops at epoch 13, the first evaluation 8 or more epochs on, after three evaluations
    without improvement, not after ``patience`` (one) of them."""
    clock = slow_epochs
    calls = []

    def peaked(model):
        clock.now += 6.0
        calls.append(1)
        return {"recall@20": [0.1, 0.2, 0.3, 0.1, 0.1, 0.1, 0.1][min(len(calls), 7) - 1]}

    config = {**FAST, "epochs": 30, "eval_every": "auto", "patience": 1, "patience_growth": 2.0}
    result = fit(_model(), _data(), TrainConfig(**config), validate=peaked, progress=False, clock=clock)
    evaluated = [r["epoch"] for r in result.history if r["metrics"]]
    assert evaluated == [1, 2, 4, 7, 10, 13]
    assert result.best_epoch == 4 and result.stopped_early
    assert evaluated[-2] - result.best_epoch < 8, "it stopped at the first evaluation past the wait"


# -- the race --------------------------------------------------------------------------------------


def _by_model_validation(curves: list[list[float]]):
    """Scores each candidate's model from its own curve (models told apart by first appearance)."""
    seen: dict[int, int] = {}
    calls: dict[int, int] = {}

    def validate(model):
        i = seen.setdefault(id(model), len(seen))
        calls[i] = calls.get(i, 0) + 1
        curve = curves[i]
        return {"recall@20": curve[min(calls[i], len(curve)) - 1]}

    validate.calls = calls
    return validate


def _race(curves, **overrides):
    config = TrainConfig(**{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "patience": 2, **overrides})
    model = _model()
    validate = _by_model_validation(curves)
    return model, fit(model, _data(), config, validate=validate, progress=False), validate


def _plain(lr: float, curve: list[float], epochs: int) -> TwoTowerModel:
    model = _model()
    config = TrainConfig(**{**FAST, "lr": lr, "patience": 2, "epochs": epochs})
    fit(model, _data(), config, validate=_by_model_validation([curve]), progress=False)
    return model


def _same_weights(a: TwoTowerModel, b: TwoTowerModel) -> bool:
    return all(torch.equal(t, b.state_dict()[name]) for name, t in a.state_dict().items())


def test_race_drops_the_worse_candidate_after_patience_evaluations():
    rising = [0.1 * i for i in range(1, 7)]
    lower = [0.05 * i for i in range(1, 41)]
    model, result, validate = _race([rising, lower], epochs=6)
    assert result.lr == 0.05 and result.best_metric == pytest.approx(0.6) and result.best_epoch == 6
    first, second = result.lr_search
    assert first["outcome"] == "chosen, epoch cap" and first["epochs_run"] == 6
    assert second["outcome"] == "dropped at rung 1 (after 2 epochs, epoch 2)"
    assert second["epochs_run"] == 2 and validate.calls == {0: 6, 1: 2}
    assert _same_weights(model, _plain(0.05, rising, 6)), "the winner trains as it would alone"


@pytest.mark.parametrize(
    ("budget_s", "rung"),
    [(200.0, 2), (1e6, 5)],
    ids=["tight budget: the first rung comes early", "ample budget: after patience epochs"],
)
def test_race_sizes_its_first_rung_from_the_budget(slow_epochs, budget_s, rung):
    """10 s epochs, a patience of 5. With 200 s, after each candidate's first epoch 180 s are left:
    14 epochs of 12.5 s (planned), a quarter of them over 2 candidates is 1, raised to MIN_RUNG 2.
    With an ample budget the rung stays at the patience."""
    clock = slow_epochs
    budget = TimeBudget(budget_s, clock=clock)
    planner = HoldoutPlanner(budget, refit_scale=0.0, reserve=lambda: 0.0)
    config = TrainConfig(**{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "patience": 5, "epochs": 8})
    rising = [0.1 * i for i in range(1, 41)]
    lower = [0.05 * i for i in range(1, 41)]
    result = fit(
        _model(), _data(), config, validate=_by_model_validation([rising, lower]), progress=False,
        planner=planner, clock=clock,
    )  # fmt: skip
    brought = "; the time budget brought the first rung forward from 5" if rung < 5 else ""
    assert result.lr_search[1]["outcome"] == f"dropped at rung 1 (after {rung} epochs, epoch {rung}{brought})"
    if brought:  # what the run traded, and what tells bench.time_to_quality the budget shaped the run
        assert "time budget" in result.lr_search[1]["outcome"]
    assert first_rung(5, 14, 2) == 2 and first_rung(5, 100, 2) == 5 and first_rung(5, 30, 2) == 3
    assert first_rung(1, 0, 2) == 1, "never past the patience"
    assert first_rung(5, None, 2) == 5 and first_rung(5, 0, 1) == 5


def test_race_ends_with_the_leader_when_a_round_no_longer_fits(slow_epochs):
    """10 s epochs (evaluations take no time), a 40 s budget. After each candidate's first epoch
    (20 s in) another round of both needs 2 x 12.5 = 25 s planned, 20 s are left: the race ends,
    the leader (the second rate) trains one more epoch alone (it used to stop both candidates)."""
    clock = slow_epochs
    budget = TimeBudget(40.0, clock=clock)
    planner = HoldoutPlanner(budget, refit_scale=0.0, reserve=lambda: 0.0)
    config = TrainConfig(**{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "patience": 5, "epochs": 8})
    lower = [0.05 * i for i in range(1, 41)]
    higher = [0.1 * i for i in range(1, 41)]
    validate = _by_model_validation([lower, higher])
    result = fit(
        _model(), _data(), config, validate=validate, progress=False, planner=planner, clock=clock
    )  # fmt: skip
    first, second = result.lr_search
    assert first["outcome"] == "dropped at epoch 1: the time budget pays for one candidate, not 2"
    assert first["epochs_run"] == 1
    assert result.lr == 0.01 and result.epochs_run == 2 and result.best_epoch == 2
    assert second["outcome"].startswith("chosen, time budget: 10 s left after epoch 2")
    assert validate.calls == {0: 1, 1: 2}
    assert budget.elapsed() == pytest.approx(30.0) and budget.elapsed() <= budget.seconds


def test_the_race_evaluates_its_candidates_before_it_ends(slow_epochs):
    """With evaluations every 3 epochs, none is due after the first: the race scores both
    candidates at the epoch where the budget ends it, so the leader is chosen on one epoch (left
    unscored, the first rate would have won the tie)."""
    clock = slow_epochs
    budget = TimeBudget(40.0, clock=clock)
    planner = HoldoutPlanner(budget, refit_scale=0.0, reserve=lambda: 0.0)
    config = TrainConfig(
        **{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "patience": 5, "epochs": 8, "eval_every": 3}
    )
    validate = _by_model_validation([[0.1, 0.2], [0.5, 0.9]])
    result = fit(
        _model(), _data(), config, validate=validate, progress=False, planner=planner, clock=clock
    )  # fmt: skip
    assert result.lr == 0.01 and result.best_metric == pytest.approx(0.9) and result.best_epoch == 2
    assert result.lr_search[0]["outcome"].startswith("dropped at epoch 1")
    assert validate.calls == {0: 1, 1: 2}


def test_epoch_cost_leaves_out_the_first_epoch_once_later_ones_exist():
    from recsys_metric.training.budget import planning_seconds

    assert planning_seconds([49.0]) == [49.0], "alone, the first epoch is all there is"
    assert planning_seconds([49.0, 5.0]) == [5.0]
    assert planning_seconds([49.0, 5.0, 6.0, 5.5, 7.0]) == [6.0, 5.5, 7.0]


def test_the_reserve_counts_the_gate_only_when_a_run_is_served():
    from recsys_metric.training.budget import after_training_seconds

    first = after_training_seconds(eval_users=50_000, eval_seconds_per_user=1e-3, n_items=0)
    served = after_training_seconds(
        eval_users=50_000, eval_seconds_per_user=1e-3, n_items=0, gate_evaluations=2
    )
    # 1.25 x (2 evaluations x 50 s + 5 s) against 1.25 x (4 x 50 s + 5 s).
    assert first == pytest.approx(131.25) and served == pytest.approx(256.25)


# -- the negatives a budget affords -----------------------------------------------------------------


@pytest.fixture
def priced_probe(monkeypatch):
    """Probes (run_epoch with max_pairs) cost 0.5 s per epoch plus (2 + k) ms per pair; the fake
    clock does not move, so the budget left is exactly the budget."""
    from recsys_metric.training import negatives_budget

    monkeypatch.setattr(negatives_budget, "PROBE_PAIRS", 16)
    calls: list[tuple[int, int]] = []

    def priced_run_epoch(model, step, source, config, rng, epoch, n_epochs, chunk_pairs, order, k, *a, **kw):
        pairs = min(kw["max_pairs"], order.m)
        calls.append((k, pairs))
        pairs_s = pairs * (2 + k) * 1e-3
        return {"seconds": pairs_s + 0.5, "pairs_seconds": pairs_s, "pairs": pairs}

    monkeypatch.setattr(loop_module, "run_epoch", priced_run_epoch)
    return calls


def _auto_negatives(budget_s: float, **overrides):
    from recsys_metric.training.negatives_budget import budget_negatives

    clock = FakeClock()
    planner = HoldoutPlanner(TimeBudget(budget_s, clock=clock), refit_scale=1.0, reserve=lambda: 0.0)
    config = TrainConfig(**{**FAST, "negatives": "auto", **overrides}).for_split("temporal")
    return budget_negatives(_model(), _data(), config, planner, 0.0, clock=clock)


def test_a_tight_budget_lowers_auto_negatives_to_what_pays_for_min_epochs(priced_probe):
    """280 pairs, 20 items: auto is 10 negatives, an epoch 0.5 + 280 x 12 ms = 3.86 s, planned at
    1.25 (safety) x 2 (the refit) x 1.2 (validation) = 11.6 s: a 90 s budget pays for 7.8 of the
    10 epochs a fit needs. Each epoch may cost 3 s: 2.5 s of pairs, 8.9 ms a pair. Proportional to
    the negatives (one probe) that is 7; the second probe, at 7, shows 2 ms of each pair do not
    scale with them, so 6."""
    config, decision = _auto_negatives(90.0)
    assert config.negatives == 6
    assert decision["negatives_auto"] == 10 and decision["epochs_wanted"] == 10
    assert decision["affordable_epochs_at_auto"] == pytest.approx(90 / 11.58, abs=0.01)
    assert decision["reason"].startswith("train.negatives auto: 6 instead of 10: an epoch at 10 measured 4 s")
    assert [k for k, _ in priced_probe] == [10, 10, 7, 7], "a warm-up and a timed probe at each count"


def test_an_ample_budget_or_fixed_negatives_change_nothing(priced_probe):
    config, decision = _auto_negatives(1e5)
    assert config.negatives == "auto" and decision is None
    assert [k for k, _ in priced_probe] == [10, 10], "probed once at auto, kept"
    priced_probe.clear()
    config, decision = _auto_negatives(10.0, negatives=8)
    assert config.negatives == 8 and decision is None and not priced_probe, "fixed: not even probed"
    config, decision = _auto_negatives(1.0)
    assert config.negatives == 5, "never below MIN_NEGATIVES"


def test_the_probe_restores_the_model_and_the_fit_trains_at_the_lowered_count(monkeypatch):
    from recsys_metric.training import negatives_budget

    monkeypatch.setattr(negatives_budget, "PROBE_PAIRS", 16)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(**FAST).for_split("temporal")
    cost = negatives_budget.probe_epoch_cost(model, _data(), config, 10, 0.0)
    assert cost.negatives == 10 and cost.pair_s > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "weights restored"
    # A budget far too small for 10 epochs: the holdout fit trains at MIN_NEGATIVES, and says so.
    planner = HoldoutPlanner(TimeBudget(1e-6), refit_scale=0.0, reserve=lambda: 0.0)  # the real clock
    config = TrainConfig(**{**FAST, "negatives": "auto", "epochs": 2})
    result = fit(
        model, _data(), config, validate=_rising_validation(FakeClock()), progress=False, planner=planner
    )
    assert result.negatives == 5 and planner.negatives["negatives"] == 5


class _ConfigPlanner:
    """A planner that changes the fit's config before the first epoch and never stops it."""

    def __init__(self, **update):
        self.update, self.calls = update, []

    def before_fit(self, model, data, config, explicit_share, *, candidates, clock):
        self.calls.append((config.negatives, candidates))
        return config.model_copy(update=self.update)

    def after_epoch(self, run):
        return None


def test_fit_trains_with_the_config_the_planner_returns_before_the_first_epoch():
    planner = _ConfigPlanner(negatives=2)
    config = TrainConfig(**{**FAST, "negatives": 4, "epochs": 2, "lr": "auto", "lr_candidates": (0.05, 0.01)})
    result = fit(
        _model(), _data(), config, validate=_rising_validation(FakeClock()), progress=False, planner=planner
    )
    assert planner.calls == [(4, 2)], "asked once, told how many rates race"
    assert result.negatives == 2
    # The refit's planner keeps the holdout fit's settings.
    refit_config = TrainConfig(**{**FAST, "negatives": 3})
    assert (
        RefitPlanner(TimeBudget(1e5), reserve=lambda: 0.0).before_fit(
            _model(), _data(), refit_config, 0.0, candidates=1, clock=FakeClock()
        )
        is refit_config
    )


def test_race_keeps_the_later_candidate_when_it_leads():
    higher = [0.1 * i for i in range(1, 41)]
    model, result, validate = _race([[0.05, 0.1, 0.1, 0.1, 0.1], higher], epochs=4)
    assert result.lr == 0.01 and result.best_epoch == 4
    assert result.lr_search[0]["outcome"].startswith("dropped at rung 1")
    assert _same_weights(model, _plain(0.01, higher, 4)), "the winner's weights end in the model"


def test_race_keeps_a_trailing_rate_that_gains_on_a_levelling_leader(caplog):
    """The fast rate leads early and levels off; the slow one trails at every rung until epoch 4
    but rises more after each rung's midpoint, so it is kept, overtakes, and wins."""
    fast = [0.5, 0.6, 0.62, 0.62, 0.62, 0.62, 0.62, 0.62]
    slow = [0.2, 0.35, 0.5, 0.6, 0.7, 0.75, 0.78, 0.8]
    caplog.set_level("INFO", logger="recsys_metric.training.rate_race")
    model, result, validate = _race([fast, slow], epochs=8)
    assert result.lr == 0.01 and result.best_metric == pytest.approx(0.8)
    first, second = result.lr_search
    assert not first["outcome"].startswith("dropped at rung"), first["outcome"]
    assert second["outcome"].startswith("chosen")
    assert "is behind at rung 1 but gaining on the leader" in caplog.text
    assert _same_weights(model, _plain(0.01, slow, 8)), "the winner trains as it would alone"


def test_race_halves_three_candidates_rung_by_rung():
    """Rung 1 after 2 evaluations keeps ceil(3 / 2) = 2, rung 2 after 4 keeps 1."""
    high = [0.1 * i for i in range(1, 7)]
    mid = [0.09 * i for i in range(1, 7)]
    low = [0.01 * i for i in range(1, 7)]
    _, result, validate = _race([high, mid, low], epochs=6, lr_candidates=(0.05, 0.02, 0.01))
    outcomes = [t["outcome"] for t in result.lr_search]
    assert outcomes == [
        "chosen, epoch cap",
        "dropped at rung 2 (after 4 epochs, epoch 4)",
        "dropped at rung 1 (after 2 epochs, epoch 2)",
    ]
    assert validate.calls == {0: 6, 1: 4, 2: 2}


def test_race_frees_each_candidate_when_it_stops(monkeypatch):
    """A stopped candidate gives back its best weights' copy, optimiser, epoch order and (but the
    first, whose model is the caller's) its model when it stops, not when the race ends; the
    winner, released when it finishes, keeps its model."""
    released = []
    release = loop_module.FitRun.release

    def spy(run, **kwargs):
        result = release(run, **kwargs)
        released.append((run, run.config.lr, sum(run.validate.calls.values())))
        return result

    monkeypatch.setattr(loop_module.FitRun, "release", spy)
    high = [0.1 * i for i in range(1, 7)]
    mid = [0.09 * i for i in range(1, 7)]
    low = [0.01 * i for i in range(1, 7)]
    model, result, _ = _race([high, mid, low], epochs=6, lr_candidates=(0.05, 0.02, 0.01))
    # Evaluations made by then: 2 + 2 + 2 at rung 1, 4 + 4 + 2 at rung 2, 6 + 4 + 2 at the end.
    assert [(lr, calls) for _, lr, calls in released] == [(0.01, 6), (0.02, 10), (0.05, 12)]
    for run, lr, _ in released:
        assert run.best_state is None and run.step is None and run.epoch_order is None
        assert run.close() is run.released, "closing a released run again changes nothing"
        assert (run.model is None) == (lr != 0.05)
    assert result.lr == 0.05 and _same_weights(model, _plain(0.05, high, 6))


def test_race_candidates_that_finish_before_a_rung_are_compared_on_their_best():
    _, result, _ = _race([[0.3], [0.4]], epochs=1)
    assert result.lr == 0.01
    assert [t["outcome"] for t in result.lr_search] == ["epoch cap", "chosen, epoch cap"]


def test_race_resumes_from_its_checkpoints(tmp_path):
    rising = [0.1 * i for i in range(1, 7)]
    lower = [0.05 * i for i in range(1, 41)]
    straight, expected, _ = _race([rising, lower], epochs=6, checkpoint_every=1)
    config = TrainConfig(**{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "patience": 2, "epochs": 6})
    first = _model()
    fit(
        first,
        _data(),
        config,
        validate=_by_model_validation([rising, lower]),
        progress=False,
        checkpoint_dir=tmp_path,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr-0.01", "lr-0.05"]
    resumed = _model()
    validate = _by_model_validation([rising, lower])
    result = fit(
        resumed, _data(), config, validate=validate, progress=False, checkpoint_dir=tmp_path, resume=True
    )
    assert validate.calls == {}, "both candidates resume where they ended: nothing is trained again"
    assert _same_weights(resumed, straight)
    assert [(t["lr"], t["outcome"], t["epochs_run"]) for t in result.lr_search] == [
        (t["lr"], t["outcome"], t["epochs_run"]) for t in expected.lr_search
    ]


def test_full_search_is_still_available():
    """``lr_search: full`` trains the candidates one after the other, each to its end."""
    scores = iter([0.1, 0.2, 0.3, 0.4])
    config = TrainConfig(
        **{**FAST, "lr": "auto", "lr_candidates": (0.05, 0.01), "epochs": 2, "lr_search": "full"}
    )
    result = fit(_model(), _data(), config, validate=lambda m: {"recall@20": next(scores)}, progress=False)
    assert result.lr == 0.01 and result.best_metric == 0.4
    assert [(t["lr"], t["epochs_run"]) for t in result.lr_search] == [(0.05, 2), (0.01, 2)]


# -- a warm start's epoch 0 --------------------------------------------------------------------------


def test_epoch_zero_is_kept_when_no_epoch_beats_it():
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    curve = [0.5, 0.3, 0.35, 0.4, 0.3, 0.3, 0.3]
    result = fit(
        model, _data(), TrainConfig(**{**FAST, "patience": 3}),
        validate=_by_model_validation([curve]), progress=False, evaluate_start=True,
    )  # fmt: skip
    assert result.best_epoch == 0 and result.best_metric == 0.5
    assert result.start_metrics == {"recall@20": 0.5}
    assert result.stopped_early and result.epochs_run == 3
    assert all(torch.equal(t, start[k]) for k, t in model.state_dict().items()), "the starting weights"


def test_epoch_zero_is_replaced_by_a_better_epoch():
    result = fit(
        _model(), _data(), TrainConfig(**{**FAST, "epochs": 3}),
        validate=_by_model_validation([[0.2, 0.3, 0.25, 0.1]]), progress=False, evaluate_start=True,
    )  # fmt: skip
    assert result.best_epoch == 1 and result.start_metrics == {"recall@20": 0.2}


# -- the sampled validation ------------------------------------------------------------------------


def test_sampled_validation_is_seeded_and_shrinks_to_what_it_affords():
    clock = FakeClock()
    users = np.arange(20_000)
    scored: list[np.ndarray] = []

    def evaluate(model, group):
        scored.append(np.asarray(group))
        clock.now += 1e-3 * len(group)  # 1 ms per user
        return float(np.mean(group % 2))  # odd users hit, even ones miss

    def make(seed):
        return SampledValidation(
            evaluate, users, metric_key="recall@20", seed=seed, max_users=12_000, clock=clock
        )

    a, b, c = make(7), make(7), make(8)
    assert [g.tolist() for g in a.groups] == [g.tolist() for g in b.groups], "same seed, same sample"
    assert a.groups[0].tolist() != c.groups[0].tolist()
    assert a.n_users == 12_000 and len(a.groups) == 20 and a.group_size == 600
    # Epoch 0 (no epoch measured yet): every group, on its own.
    start = a(None)
    assert len(scored) == 20 and a.seconds_per_user is None
    # After a 40 s epoch: 12 s for 12k users is 1 ms each; a fifth of 40 s pays for 8,000.
    a.before_evaluation([40.0])
    after = a(None)
    assert a.n_users == 8_400 and a.resampled  # ceil(8000 / 600) groups of 600
    assert a.seconds_per_user == pytest.approx(1e-3)
    sample = np.concatenate(a.groups[: a.active])
    assert np.array_equal(scored[-1], sample), "re-scored on the smaller sample"
    assert after["recall@20"] == pytest.approx(np.mean(sample % 2))
    assert after["validation_users"] == 8_400
    rescored = a.rescore(0)
    assert rescored["recall@20"] == pytest.approx(np.mean(sample % 2)), "epoch 0 on the same sample"
    assert start["recall@20"] == pytest.approx(np.mean(np.concatenate(a.groups) % 2))
    se = after["recall@20_se"]
    expected = np.std([np.mean(g % 2) for g in a.groups[:14]], ddof=1) / math.sqrt(14)
    assert se == pytest.approx(expected)
    # Later evaluations: one call on the same users.
    n_calls = len(scored)
    a(None)
    assert len(scored) == n_calls + 1 and np.array_equal(scored[-1], sample)


def test_sampled_validation_never_shrinks_below_min_users():
    clock = FakeClock()

    def evaluate(model, group):
        clock.now += 0.01 * len(group)
        return 0.5

    v = SampledValidation(
        evaluate, np.arange(3000), metric_key="recall@20", seed=1, min_users=1000, clock=clock
    )
    v.before_evaluation([1.0])
    v(None)
    assert v.n_users == 1000 and v.report()["eligible_users"] == 3000


# -- the pipeline ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("log")
    generate_log(300, 150, 9000, n_clusters=6, seed=3, id_type="str").interactions.write_parquet(
        d / "interactions.parquet"
    )
    return d / "interactions.parquet"


def test_a_run_past_its_budget_still_evaluates_exports_and_indexes(log_path, tmp_path):
    """A budget smaller than the reserve for what follows training: one epoch, no refit, and the
    holdout model is evaluated, exported and indexed; metrics.json says what was traded."""
    config = config_from_dict(
        {"train": {"epochs": 6, "batch_size": 512, "time_budget": "1s"}, "eval": {"ks": [10, 20]}}
    )
    result = train_run(log_path, tmp_path / "run", config, progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    budget = metrics["time_budget"]
    assert budget["seconds"] == 1.0
    assert budget["holdout"]["epochs_run"] == 1 and budget["holdout"]["stopped_by"].startswith("time budget")
    assert budget["refit"] == {
        "epochs_wanted": 1,
        "epochs_planned": 0,
        "epochs_run": 0,
        "stopped_by": None,
        "beside_holdout": False,
    }
    assert metrics["published_model"] == "holdout_model"
    assert any(line.startswith("holdout fit: time budget") for line in budget["traded"])
    assert any(line.startswith("the refit trains 0 of the 1 epochs") for line in budget["traded"])
    assert metrics["index"] is not None and (tmp_path / "run" / "items.ann").exists()
    assert result.evaluation.n_users > 0
    assert budget["validation"]["users"] == budget["validation"]["eligible_users"] > 0
    lines = time_budget_lines(metrics)
    assert lines[-1].startswith("time budget 1 s: training ended after")


def test_no_budget_trains_as_before(log_path, tmp_path):
    config = config_from_dict(
        {
            "train": {"epochs": 3, "batch_size": 512, "time_budget": "none", "lr": 0.05},
            "eval": {"ks": [10, 20]},
        }
    )
    train_run(log_path, tmp_path / "run", config, progress=False, build_ann=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["time_budget"]["seconds"] is None
    assert metrics["time_budget"]["refit"]["epochs_run"] == metrics["early_stopping"]["best_epoch"]
    assert metrics["time_budget"]["traded"] == []


@pytest.mark.slow
def test_a_warm_run_that_cannot_improve_publishes_its_starting_point(tmp_path):
    """Issue 19 defect 13: a warm start on an unchanged log must not end below its source. With a
    rate too small to move anything no epoch beats epoch 0, so the source's model is published."""
    from recsys_metric.export import read_embeddings
    from recsys_metric.nightly import run_nightly

    log = tmp_path / "log.parquet"
    generate_log(300, 150, 9000, n_clusters=6, seed=3, id_type="str").interactions.write_parquet(log)
    config = config_from_dict(
        {"train": {"epochs": 3, "patience": 2, "batch_size": 512}, "index": {"on_low_recall": "warn"}}
    )
    first = run_nightly(log, tmp_path / "artifacts", config, progress=False)
    warm_config = config.model_copy(
        update={"train": config.train.model_copy(update={"warm_start": True, "warm_start_lr_scale": 1e-9})}
    )
    second = run_nightly(log, tmp_path / "artifacts", warm_config, progress=False)
    # Unforced: the same model scored on the same holdout passes the gate, which says nothing changed.
    assert second.published and "nothing changed" in second.decision.reason
    metrics = second.run.metrics
    es = metrics["early_stopping"]
    assert metrics["warm_start"]["enabled"] and metrics["warm_start"]["kept_starting_point"]
    assert es["best_epoch"] == 0 and es["best_validation"] == es["start_metrics"]["recall@20"]
    assert metrics["published_model"] == "warm_start_source"
    assert metrics["time_budget"]["refit"]["epochs_run"] == 0
    before = read_embeddings(first.run_dir / "item_embeddings.parquet")
    after = read_embeddings(second.run_dir / "item_embeddings.parquet")
    assert np.array_equal(np.asarray(before.vectors), np.asarray(after.vectors)), (
        "the source's items, unchanged"
    )


def test_cli_refuses_a_bad_budget_with_exit_2(capsys):
    from recsys_metric.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--time-budget", "15minutes"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "recsys-metric run: error: argument --time-budget: time budget '15minutes': "
        "use a duration such as 15m, 90s, 1h30m, or none"
    )
