"""EpochOrder: which pairs an epoch visits, and how often each user gets a step."""

from __future__ import annotations

import numpy as np
import pytest

from recsys_metric.epoch_order import EpochOrder


def _skewed_users(seed: int = 0) -> np.ndarray:
    """Pairs of 200 users with 1 to 300 liked pairs each, shuffled (not grouped by user)."""
    rng = np.random.default_rng(seed)
    counts = np.concatenate([[1, 2, 300], rng.integers(1, 60, size=197)])
    users = np.repeat(np.arange(200), counts)
    return users[rng.permutation(users.shape[0])]


def test_balance_zero_is_a_permutation_of_all_pairs():
    users = _skewed_users()
    order = EpochOrder(users, 0.0)(np.random.default_rng(1))
    assert np.array_equal(np.sort(order), np.arange(users.shape[0]))
    assert np.array_equal(order, np.random.default_rng(1).permutation(users.shape[0]))


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_each_user_gets_the_floor_or_ceiling_of_its_share(beta):
    users = _skewed_users()
    m = users.shape[0]
    counts = np.bincount(users)
    share = counts ** (1.0 - beta)
    expected = share * m / share.sum()
    epoch_order = EpochOrder(users, beta)
    rng = np.random.default_rng(3)
    for _ in range(5):
        order = epoch_order(rng)
        assert order.shape == (m,) and order.dtype == np.int64
        assert order.min() >= 0 and order.max() < m
        steps = np.bincount(users[order], minlength=counts.shape[0])
        assert np.all(steps >= np.floor(expected - 1e-9))
        assert np.all(steps <= np.ceil(expected + 1e-9))
    if beta == 1.0:
        # Every user the same number of steps, give or take one, whatever its history length.
        assert steps.max() - steps.min() <= 1


def test_a_heavy_user_loses_steps_to_the_light_ones():
    users = _skewed_users()
    plain = np.bincount(users[EpochOrder(users, 0.0)(np.random.default_rng(0))])
    balanced = np.bincount(users[EpochOrder(users, 0.5)(np.random.default_rng(0))])
    assert plain[2] == 300 and balanced[2] < 300 / 2  # sqrt weighting: about 300 ** 0.5 / mean
    assert balanced[0] >= plain[0] and balanced[1] >= plain[1]


def test_draws_within_a_user_are_uniform_and_orders_reproducible():
    users = _skewed_users()
    epoch_order = EpochOrder(users, 0.5)
    heavy = np.flatnonzero(users == 2)
    rng = np.random.default_rng(7)
    hits = np.zeros(users.shape[0], dtype=np.int64)
    epochs = 400
    for _ in range(epochs):
        hits += np.bincount(epoch_order(rng), minlength=users.shape[0])
    per_pair = hits[heavy]
    mean = per_pair.mean()
    # Binomial-ish counts around the mean: 5 standard deviations of a Poisson count.
    assert np.all(np.abs(per_pair - mean) < 5 * np.sqrt(mean))
    a = EpochOrder(users, 0.5)(np.random.default_rng(11))
    b = EpochOrder(users, 0.5)(np.random.default_rng(11))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, EpochOrder(users, 0.5)(np.random.default_rng(12)))


def test_it_refuses_a_balance_outside_zero_one():
    with pytest.raises(ValueError, match=r"user_balance must lie in \[0, 1\], got 1.5"):
        EpochOrder(np.zeros(3, dtype=np.int64), 1.5)
