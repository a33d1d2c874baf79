"""Early stopping's validation on a bounded, seeded sample of users, sized from its measured cost.

:class:`SampledValidation` is a ``validate`` callable for :func:`~recsys_metric.training.fit`.
Its users are a seeded permutation of the validation users (at most ``max_users``), cut into
at most :data:`MAX_GROUPS` groups of at least :data:`GROUP_USERS`. The first evaluation scores
each group on its own (the spread between the groups gives the standard error); the first one
made after an epoch also measures the seconds per user, and from then on only as many leading
groups are scored, in one call, as keep an evaluation under ``share`` of the measured epoch
(never fewer than ``min_users``; the loop's ``eval_every: auto`` then spaces evaluations out if
even those cost too much). Every later evaluation scores the same users, so epochs are compared
on one sample; an evaluation made before the sample shrank (a warm start's epoch 0) is re-scored
on it (:meth:`rescore`). ``<metric>_se`` is the standard error of the sample's mean: the
standard deviation of the first evaluation's group means over the square root of the number of
groups scored (the per-user spread changes little between epochs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

GROUP_USERS = 250
"""Users per group at least: the unit by which the sample shrinks and over which the standard
error is taken."""

MAX_GROUPS = 20
"""Groups at most (each is one evaluator call in the first evaluation, about 0.1 s of fixed cost
on the bundled log)."""

MIN_USERS = 5000
"""The sample never shrinks below this many users (standard error of Recall@20 about 0.005 at a
per-user standard deviation of 0.35; between epochs the same users are compared, which is finer)."""


class SampledValidation:
    """Recall@K of a model on a seeded sample of validation users, the sample sized from cost.

    Args:
        evaluate: ``evaluate(model, users)`` -> Recall@K (mean over ``users``, int ``[n]``
            user numbers that have validation items).
        users: int ``[N]`` the eligible validation users.
        metric_key: the name early stopping reads, e.g. ``recall@20``.
        seed: seeds the permutation (the same seed gives the same sample).
        max_users: score at most this many users (None: all ``N``).
        min_users: never shrink below this many.
        share: an evaluation should cost at most this share of a training epoch.
        clock: seconds now (tests inject one).
    """

    def __init__(
        self,
        evaluate: Callable[[Any, np.ndarray], float],
        users: np.ndarray,
        *,
        metric_key: str,
        seed: int,
        max_users: int | None = None,
        min_users: int = MIN_USERS,
        share: float = 0.2,
        clock: Callable[[], float] = time.perf_counter,
    ):
        users = np.asarray(users, dtype=np.int64)
        order = np.random.default_rng(seed).permutation(users)
        if max_users is not None:
            order = order[:max_users]
        self.evaluate = evaluate
        self.metric_key = metric_key
        self.eligible = int(users.shape[0])
        self.group_size = max(GROUP_USERS, math.ceil(order.shape[0] / MAX_GROUPS))
        self.groups = [order[i : i + self.group_size] for i in range(0, order.shape[0], self.group_size)]
        self.active = len(self.groups)
        self.min_users = min_users
        self.share = share
        self.clock = clock
        self.epoch_seconds: list[float] = []
        """Set by the training loop before each evaluation (``before_evaluation``)."""
        self.first: list[float] | None = None
        """The first evaluation's Recall@K of each group."""
        self.seconds_per_user: float | None = None
        """Measured scoring seconds per user: the first evaluation after an epoch, then the least
        of every evaluation since."""
        self.calibrated = False
        self.resampled = False
        """True right after the sample shrank; the loop re-scores earlier calls and clears it."""

    @property
    def n_users(self) -> int:
        """Users each evaluation scores now."""
        return int(sum(g.shape[0] for g in self.groups[: self.active]))

    def before_evaluation(self, epoch_seconds: list[float]) -> None:
        self.epoch_seconds = list(epoch_seconds)

    def standard_error(self) -> float:
        """Standard error of the current sample's mean (NaN with a single group)."""
        if self.first is None or self.active < 2:
            return math.nan
        return float(np.std(self.first[: self.active], ddof=1) / math.sqrt(self.active))

    def _summary(self, mean: float) -> dict[str, float]:
        return {
            self.metric_key: mean,
            f"{self.metric_key}_se": self.standard_error(),
            "validation_users": float(self.n_users),
        }

    def _prefix_mean(self, values: list[float]) -> float:
        sizes = np.array([g.shape[0] for g in self.groups[: self.active]], dtype=np.float64)
        return float((np.asarray(values[: self.active]) * sizes).sum() / sizes.sum())

    def __call__(self, model: Any) -> dict[str, float]:
        t = self.clock()
        grouped = self.first is None
        if grouped:
            self.first = [float(self.evaluate(model, group)) for group in self.groups[: self.active]]
            mean = self._prefix_mean(self.first)
        else:
            mean = float(self.evaluate(model, np.concatenate(self.groups[: self.active])))
        seconds = self.clock() - t
        if self.calibrated and self.seconds_per_user is not None:
            # The least per-user cost seen so far: the first evaluation carries one-off costs (a
            # GPU's warm-up, allocations) and load on a shared machine only ever adds to a timing;
            # the run's time plan reads this (training/run_budget.py).
            self.seconds_per_user = min(self.seconds_per_user, seconds / max(self.n_users, 1))
        if not self.calibrated and self.epoch_seconds:
            self._calibrate(seconds / max(self.n_users, 1))
            if self.resampled:
                # This evaluation scored the larger sample: its value on the smaller one.
                if grouped:
                    mean = self._prefix_mean(self.first)
                else:
                    mean = float(self.evaluate(model, np.concatenate(self.groups[: self.active])))
        return self._summary(mean)

    def _calibrate(self, per_user: float) -> None:
        """Shrink the sample to what an evaluation at ``share`` of the median epoch affords.

        ``per_user`` comes from the evaluation just made; when it was the grouped first one it
        includes each group's fixed cost, so the estimate errs on the small side."""
        self.calibrated = True
        self.seconds_per_user = per_user
        epoch_s = float(np.median(self.epoch_seconds[-3:]))
        affordable = self.share * epoch_s / per_user if per_user > 0 else math.inf
        users = max(float(self.min_users), affordable)
        if users >= self.n_users:
            return
        self.active = max(1, math.ceil(users / self.group_size))
        self.resampled = True

    def rescore(self, call: int) -> dict[str, float]:
        """The metrics of the first evaluation (``call`` 0) on the current sample.

        Raises:
            ValueError: another call (only the first one's groups are kept).
        """
        if call != 0 or self.first is None:
            raise ValueError(f"only the first evaluation can be re-scored, not call {call}")
        return self._summary(self._prefix_mean(self.first))

    def report(self) -> dict[str, Any]:
        """What ``metrics.json`` records: users scored of those eligible, seconds per user."""
        return {
            "users": self.n_users,
            "eligible_users": self.eligible,
            "seconds_per_user": None if self.seconds_per_user is None else round(self.seconds_per_user, 8),
            "min_users": self.min_users,
        }
