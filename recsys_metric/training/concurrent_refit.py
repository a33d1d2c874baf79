"""The refit on the whole log, trained in a second thread beside the holdout fit.

A run trains twice: the holdout fit chooses the rate and the number of epochs on validation, then
the refit trains that many epochs at that rate on the whole log and is published. The refit needs
two facts from the holdout fit, the rate (known once the learning-rate race is down to one
candidate, after a few epochs) and the epoch count (known only at the end); in between it has
nothing to wait for. :class:`ConcurrentRefit` starts it as soon as the rate is known and lets it
follow the holdout fit epoch by epoch, never ahead of it: after refit epoch ``e`` the holdout fit
has already evaluated its epoch ``e``, so the refit knows whether ``e`` is the best epoch so far and
then keeps a copy of its weights. When the holdout fit ends with best epoch ``B``, the refit either
holds its weights after ``B`` epochs already or trains on alone to ``B``.

The published model is the sequential refit's, bit for bit: the same seed, data and rate, and the
epochs trained in the same order on their own random stream (tests/test_concurrent_refit.py).

Why it pays: the compiled step trains on one core (``train.threads: 1``, reproducible), its
sampler costs a fraction of that (:func:`~recsys_metric.triplet_kernel.seen_filter`), so on a
2-core machine a second fit runs on the idle core nearly for free; the refit was a third of the
default run's time on citeulike-a (see BENCHMARKS.md, "The refit beside the holdout fit").

Used where it can be the same model and gain: on CPU (:meth:`ConcurrentRefit.supported`), with at
least two cores, a constant learning-rate schedule (a decaying one depends on the epoch count,
unknown while the holdout trains), not under torchrun and not for a warm start. ``train.concurrent_refit:
false`` turns it off.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from torch import Tensor

from recsys_metric.config import TrainConfig
from recsys_metric.device import resolve_device
from recsys_metric.errors import DataError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.budget import EpochPlanner
from recsys_metric.training.checkpoints import cpu_state
from recsys_metric.training.data import TrainData, TrainResult
from recsys_metric.training.loop import FitRun
from recsys_metric.training.second_phase import merge_phases
from recsys_metric.training.sources import co_liked_data

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


class ConcurrentRefit:
    """The refit of ``model`` on ``data`` (the whole log), trained beside the holdout fit.

    Use as a context manager around the holdout fit: pass it to ``fit(refit=...)``, which calls
    :meth:`start` once the rate is chosen and :meth:`follow` after every holdout epoch; after
    the holdout fit call :meth:`finish` with the epochs the refit must train. Leaving the block
    without :meth:`finish` (an error in the holdout fit) stops the thread.

    Args:
        model: the refit's fresh model (built as the sequential refit builds it).
        data: the whole log's training data.
        config: the run's train config; the rate and negatives come from the holdout fit.
        explicit_share, split_method: as :func:`~recsys_metric.training.rate_search.fit`'s.
    """

    def __init__(
        self,
        model: TwoTowerModel,
        data: TrainData,
        config: TrainConfig,
        *,
        explicit_share: float = 0.0,
        split_method: str = "temporal",
    ):
        if (data.n_users, data.n_items) != (model.n_users, model.n_items):
            raise DataError(
                f"the refit's data has {data.n_users} users x {data.n_items} items but its model was built "
                f"for {model.n_users} users x {model.n_items} items"
            )
        if model.item_item:
            data = co_liked_data(data)
        self.model, self.data, self.explicit_share = model, data, explicit_share
        self.config = config.for_split(split_method)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._run: FitRun | None = None
        self._holdout_epoch = 0
        self._holdout_best: int | None = None
        self._holdout_done = False
        self._target: int | None = None
        self._cancelled = False
        self._error: BaseException | None = None
        self._kept: tuple[int, dict[str, Tensor]] | None = None
        self._planner: EpochPlanner | None = None
        self._first: TrainResult | None = None
        """The refit's first phase, once the holdout fit went on to a second
        (:meth:`start_second_phase`)."""
        self._phase_start: dict[str, Tensor] | None = None
        """The weights the second phase started from (the first phase's), to go back to when
        the holdout fit did not keep its second phase."""

    @staticmethod
    def supported(config: TrainConfig, *, warm_start: bool = False, distributed: bool = False) -> bool:
        """Whether a run with ``config`` refits concurrently (see the module's docstring)."""
        return (
            config.concurrent_refit
            and config.refit
            and not warm_start
            and not distributed
            and config.lr_schedule == "constant"
            and resolve_device(config.device).type == "cpu"
            and usable_cores() >= 2
        )

    def __enter__(self) -> ConcurrentRefit:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel()

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def epochs_done(self) -> int:
        """Epochs the refit has trained so far (in a second phase: the first phase's kept epochs
        and the second's)."""
        first = 0 if self._first is None else self._first.epochs_run
        return first + (0 if self._run is None else self._run.epoch)

    def start(self, holdout: FitRun) -> None:
        """Start the refit at the rate and negatives of ``holdout`` (the race's winner, or the
        only fit) and follow it from here on."""
        if self.started:
            return
        update = {"lr": float(holdout.config.lr), "negatives": holdout.k, "seed": holdout.config.seed}
        config = self.config.model_copy(update=update)
        # FitRun seeds torch's global generator: keep the holdout fit's stream as it was.
        torch_state = torch.get_rng_state()
        try:
            run = FitRun(
                self.model,
                self.data,
                config,
                resolve_device(config.device),
                holdout.n_epochs,
                holdout.metric_key,
                self.explicit_share,
                None,
                None,
                False,
                False,
            )
        finally:
            torch.set_rng_state(torch_state)
        run.log_prefix = "refit "
        self._run = run
        self.follow(holdout)
        holdout.observer = self.follow
        logger.info("refit on the whole log: training beside the holdout fit at lr %g", config.lr)
        self._thread = threading.Thread(target=self._train, name="recsys-metric-refit", daemon=True)
        self._thread.start()

    @property
    def in_second_phase(self) -> bool:
        """Whether it follows the holdout fit's second phase (:meth:`start_second_phase`)."""
        return self._first is not None

    def start_second_phase(self, holdout: FitRun) -> None:
        """The holdout fit goes on in a second phase (``holdout``: at a lower rate from its first
        phase's best weights, ``train.lr_drop``; :mod:`~recsys_metric.training.second_phase`).
        The refit ends its first phase at that best epoch (training on to it, or taking the
        weights it kept after it: it waits for that, at most the epoch it is behind), keeps a copy
        of those weights, and follows ``holdout`` from them at its rate and seed as it followed
        the first phase. :meth:`finish` then takes the second phase's epochs."""
        if not self.started or self._first is not None:
            return
        self._first = self.finish(self._holdout_best or 0)
        self._phase_start = cpu_state(self.model)
        with self._cond:
            self._thread, self._run, self._kept = None, None, None
            self._holdout_epoch, self._holdout_best, self._holdout_done = 0, None, False
            self._target, self._planner = None, None
        self.start(holdout)

    def follow(self, holdout: FitRun) -> None:
        """The holdout fit trained (and evaluated) up to ``holdout.epoch``."""
        with self._cond:
            self._holdout_epoch = holdout.epoch
            self._holdout_best = holdout.result.best_epoch
            self._holdout_done = holdout.done
            self._cond.notify_all()

    def finish(self, epochs: int, planner: EpochPlanner | None = None) -> TrainResult | None:
        """Train to ``epochs`` (the holdout's best epoch, or fewer under the time budget; 0: no
        refit) and return the refit's result, its model holding the weights after ``epochs``
        epochs. ``planner`` (the run's refit planner) is asked after each epoch still to train.
        None when the refit never started (the race ended with several candidates): the caller
        refits as before.

        When the budget cut ``epochs`` below epochs the refit already trained, the model keeps
        the nearest weights it has: those after the holdout's best epoch, or its latest.

        In a second phase (:attr:`in_second_phase`) ``epochs`` counts the second phase's epochs
        (:func:`~recsys_metric.training.second_phase.refit_epochs_by_phase`) and the result holds
        both phases; 0 (the holdout fit did not keep its second phase) goes back to the first
        phase's weights."""
        if not self.started:
            return None
        assert self._run is not None and self._thread is not None
        with self._cond:
            self._target = int(epochs)
            self._planner = planner
            self._cond.notify_all()
        self._thread.join()
        if self._error is not None:
            raise self._error
        run = self._run
        result = run.close()
        trained = run.epoch
        used = trained
        if trained > epochs and self._kept is not None:
            # It had run ahead of a target below the holdout's best (the budget cut the refit):
            # the weights after the holdout's best epoch are the nearest it kept.
            used = self._kept[0]
            self.model.load_state_dict(self._kept[1])
        if trained > used:
            logger.info(
                "refit: trained %d epochs beside the holdout fit, kept the weights after epoch %d",
                trained,
                used,
            )
        result.concurrent_epochs = trained
        result.history = result.history[:used]
        first, self._first = self._first, None
        if first is None:
            return result
        start, self._phase_start = self._phase_start, None
        if epochs == 0:
            assert start is not None
            self.model.load_state_dict(start)
            logger.info("refit: the holdout fit kept no epoch of its second phase; so does the refit")
            return first
        info = {"lr": float(run.config.lr), "from_epoch": first.epochs_run, "epochs_run": used}
        return merge_phases(first, result, info, validated=False)

    def cancel(self) -> None:
        """Stop the thread (the holdout fit failed, or :meth:`finish` was not reached)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        if self._run is not None and self._target is None:
            self._run.close()

    def _may_train(self, trained: int) -> bool:
        """Whether the refit, ``trained`` epochs in, may train the next while it follows: never
        ahead of the holdout fit, and once that has stopped only up to its best epoch (the target
        :meth:`finish` sets is never more). Until then it trains every epoch the holdout fit has:
        any could be the best. On the 20M log the refit trained 3 epochs past the stopped holdout
        fit's best through the holdout evaluation, which it slowed, and the wait for its last one."""
        if self._holdout_done:
            return (self._holdout_best or 0) > trained
        return self._holdout_epoch > trained

    def _train(self) -> None:
        run = self._run
        assert run is not None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._cancelled or self._target is not None
                                        or self._may_train(run.epoch))  # fmt: skip
                    if self._cancelled or run.done:
                        return
                    if self._target is not None:
                        if run.epoch >= self._target:
                            return
                        # From here on it is the sequential refit of ``target`` epochs.
                        run.n_epochs, run.planner = self._target, self._planner
                run.train_epoch()
                with self._cond:
                    if self._target is None and self._holdout_best == run.epoch:
                        # The holdout's best epoch so far: the weights to publish if it stays best.
                        into = self._kept[1] if self._kept is not None else None
                        self._kept = (run.epoch, cpu_state(self.model, into=into))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread by finish()
            self._error = err
