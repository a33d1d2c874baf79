"""The refit trained beside the holdout fit (recsys_metric.training.concurrent_refit): the same
model as the refit trained after it, bit for bit, whatever the holdout's best epoch."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from recsys_metric import triplet_kernel
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training import TrainData, fit
from recsys_metric.training.concurrent_refit import ConcurrentRefit
from recsys_metric.training.run_budget import RunPlan

N_USERS, N_ITEMS, DIM = 60, 40, 8
KERNELS = ["torch"] + (["numba"] if triplet_kernel.available() else [])


def _log(n: int) -> InteractionMatrix:
    """Two communities (so that training moves the rows); the first ``n`` of 900 draws."""
    rng = np.random.default_rng(0)
    users = rng.integers(0, N_USERS, 900)
    items = (rng.integers(0, N_ITEMS // 2, 900) + (users % 2) * (N_ITEMS // 2)).astype(np.int64)
    return InteractionMatrix.from_pairs(users[:n], items[:n], N_USERS, N_ITEMS)


FIT = TrainData.from_matrices(_log(700))
"""The holdout fit's pairs; the refit's are all 900 (:data:`FULL`)."""
FULL = TrainData.from_matrices(_log(900))


def _config(kernel: str, **overrides) -> TrainConfig:
    base = dict(epochs=12, batch_size=64, negatives=3, device="cpu", compile="off", lr=0.05, patience=2, patience_growth=0,
                eval_every=1, kernel=kernel, lr_drop=None)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def _model() -> TwoTowerModel:
    return TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)


def _curve(values: list[float], pause: float = 0.0):
    """A validation returning ``values`` in turn (then their last), after ``pause`` seconds."""
    calls = iter(values)
    last = [values[-1]]

    def validate(_model):
        time.sleep(pause)
        last[0] = next(calls, last[0])
        return {"recall@20": last[0]}

    return validate


def _sequential_refit(config: TrainConfig, holdout, epochs: int) -> TwoTowerModel:
    model = _model()
    fit(model, FULL, RunPlan.refit_config(config, holdout), epochs=epochs, progress=False)
    return model


def _tables(model: TwoTowerModel) -> list[np.ndarray]:
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def _wait_for(refit: ConcurrentRefit, epochs: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while refit.epochs_done < epochs and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_refit_beside_a_fixed_rate_fit_is_the_refit_after_it(kernel):
    # The best epoch (3) is behind the last (5, patience 2): the refit ran on to 4 (each
    # evaluation pauses for it to catch up) and must publish its weights after epoch 3.
    # Once the holdout fit has stopped, the refit trains no further: not epoch 5.
    config = _config(kernel)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=_curve([0.1, 0.2, 0.3, 0.05, 0.04], pause=0.3),
                      progress=False, refit=beside)  # fmt: skip
        assert holdout.best_epoch == 3 and holdout.epochs_run == 5
        _wait_for(beside, holdout.epochs_run, timeout=1.0)
        trained = beside.epochs_done
        assert trained in (3, 4), "it follows the holdout fit until it stops (4 with time to), not to 5"
        result = beside.finish(holdout.best_epoch)
    assert result.concurrent_epochs == trained and result.epochs_run == 3
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    expected = _sequential_refit(config, holdout, 3)
    for got, want in zip(_tables(beside.model), _tables(expected), strict=True):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_refit_behind_the_holdout_fit_trains_on_alone_to_the_best_epoch(kernel):
    config = _config(kernel, epochs=6)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=_curve([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), progress=False,
                      refit=beside)  # fmt: skip
        assert holdout.best_epoch == 6
        result = beside.finish(6)
    assert result.epochs_run == 6 and result.concurrent_epochs == 6
    for got, want in zip(_tables(beside.model), _tables(_sequential_refit(config, holdout, 6)), strict=True):
        assert np.array_equal(got, want)


def test_the_refit_starts_when_the_race_is_down_to_one_rate_and_takes_the_winners():
    # Two rates, the first rung after 2 epochs: 0.01 (the second curve) trails and is dropped.
    config = _config("auto", lr="auto", lr_candidates=(0.05, 0.01), patience=2)
    curves = {0.05: [0.1, 0.3, 0.35, 0.4, 0.38, 0.37], 0.01: [0.05, 0.1]}
    calls = []

    def validate(model):
        # The race alternates the two candidates epoch by epoch until one is dropped.
        lr = 0.05 if len(calls) % 2 == 0 or len(calls) >= 4 else 0.01
        series = curves[lr]
        value = series[min(sum(1 for c in calls if c == lr), len(series) - 1)]
        calls.append(lr)
        return {"recall@20": value}

    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=validate, progress=False, refit=beside)
        assert holdout.lr == 0.05 and beside.started
        result = beside.finish(holdout.best_epoch)
    assert result.lr == 0.05 and result.epochs_run == holdout.best_epoch == 4
    for got, want in zip(_tables(beside.model), _tables(_sequential_refit(config, holdout, 4)), strict=True):
        assert np.array_equal(got, want)


def test_a_full_rate_search_never_starts_it_and_the_caller_refits_after():
    config = _config("auto", lr="auto", lr_candidates=(0.05, 0.01), lr_search="full", epochs=3)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        fit(_model(), FIT, config, validate=_curve([0.1, 0.2, 0.3]), progress=False, refit=beside)
        assert not beside.started
        assert beside.finish(3) is None


def test_a_failing_holdout_fit_stops_the_refit_thread():
    config = _config("auto")
    calls = []

    def validate(model):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("validation broke")
        return {"recall@20": 0.1 * len(calls)}

    with pytest.raises(RuntimeError, match="validation broke"):
        with ConcurrentRefit(_model(), FULL, config) as beside:
            fit(_model(), FIT, config, validate=validate, progress=False, refit=beside)
    assert beside.started and not beside._thread.is_alive()
    assert beside.epochs_done <= 3, "never ahead of the holdout fit"


def test_an_error_in_the_refit_reaches_the_caller(monkeypatch):
    from recsys_metric.training import loop

    real = loop.run_epoch

    def run_epoch(*args, **kwargs):
        if threading.current_thread().name == "recsys-metric-refit":
            raise OSError("no space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", run_epoch)
    config = _config("auto", epochs=3)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        holdout = fit(_model(), FIT, config, validate=_curve([0.1, 0.2, 0.3]), progress=False, refit=beside)
        assert holdout.epochs_run == 3, "the holdout fit is not disturbed"
        with pytest.raises(OSError, match="no space left"):
            beside.finish(3)


def test_a_refit_model_of_other_sizes_is_refused():
    with pytest.raises(DataError, match=r"61 users x 40 items"):
        ConcurrentRefit(
            TwoTowerModel(N_USERS + 1, N_ITEMS, ModelConfig(dim=DIM), seed=0), FULL, _config("auto")
        )


@pytest.mark.parametrize(
    "overrides, warm_start, supported",
    [
        ({}, False, True),
        ({"concurrent_refit": False}, False, False),
        ({"refit": False}, False, False),
        ({"lr_schedule": "cosine"}, False, False),
        ({}, True, False),
    ],
)
def test_where_the_refit_trains_beside(overrides, warm_start, supported, monkeypatch):
    from recsys_metric.training import concurrent_refit

    monkeypatch.setattr(concurrent_refit, "usable_cores", lambda: 2)
    assert ConcurrentRefit.supported(_config("auto", **overrides), warm_start=warm_start) is supported
    monkeypatch.setattr(concurrent_refit, "usable_cores", lambda: 1)
    assert not ConcurrentRefit.supported(_config("auto", **overrides)), "one core: nothing to gain"


def test_the_refit_keeps_the_holdout_fits_torch_random_stream():
    # FitRun seeds torch's global generator when it is built; start() builds the refit's run
    # between two holdout epochs, and the holdout fit's stream must go on as if it had not.
    torch.manual_seed(123)
    expected = torch.rand(3)
    config = _config("auto", epochs=2)
    holdout = FitRunStub(config)
    with ConcurrentRefit(_model(), FULL, config) as beside:
        torch.manual_seed(123)
        beside.start(holdout)
        assert torch.equal(torch.rand(3), expected)
        beside.finish(1)


class FitRunStub:
    """What :meth:`ConcurrentRefit.start` reads of the holdout fit."""

    def __init__(self, config: TrainConfig):
        self.config, self.k, self.n_epochs, self.metric_key, self.epoch = config, 3, 2, "recall@20", 1
        self.observer, self.done = None, False

        class Result:
            best_epoch = 1

        self.result = Result()
