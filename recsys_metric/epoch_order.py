"""Which liked pairs one training epoch visits, and in which order.

An epoch over the liked pairs weighs each user by how many items they liked: a user with 500
liked items gets 500 steps for every one of a user with a single liked item. Ranking metrics are
means over users, each user counting once, so that weighting spends most of the updates where
the metric looks least. ``user_balance`` (beta) moves the weights towards the users: an epoch
still draws ``m`` pairs (the number of liked pairs), but user ``u`` with ``n_u`` liked pairs gets
a share of them proportional to ``n_u ** (1 - beta)``, each one a uniform draw among the user's
pairs. ``beta = 0`` is the plain permutation (every pair exactly once), ``beta = 1`` gives every
user the same number of steps.
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    """The pair indices of each epoch, for pairs whose users are ``user_num``.

    Args:
        user_num: int ``[m]``, the user of each liked pair (the pairs need not be sorted).
        user_balance: beta in ``[0, 1]``; see the module docstring.

    Calling the object with a generator returns int64 ``[m]``: indices into the pairs, shuffled.
    With ``user_balance > 0`` a user's number of draws is the floor or the ceiling of its expected
    share (systematic sampling over the users in a fresh random order), so no user is left out by
    chance in an epoch and the epoch has exactly ``m`` pairs.
    """

    def __init__(self, user_num: np.ndarray, user_balance: float):
        if not 0.0 <= user_balance <= 1.0:
            raise ValueError(f"user_balance must lie in [0, 1], got {user_balance}")
        self.m = int(user_num.shape[0])
        self.user_balance = float(user_balance)
        if self.user_balance == 0.0 or self.m == 0:
            return
        counts = np.bincount(user_num)
        users = np.flatnonzero(counts)
        self._by_user = np.argsort(user_num, kind="stable")
        self._n = counts[users].astype(np.int64)
        self._start = np.concatenate([[0], np.cumsum(self._n)[:-1]]).astype(np.int64)
        self._n_float = self._n.astype(np.float64)
        self._last = self._n - 1
        share = self._n_float ** (1.0 - self.user_balance)
        self._expected = share * (self.m / share.sum())

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        if self.user_balance == 0.0 or self.m == 0:
            return rng.permutation(self.m)
        n_users = self._n.shape[0]
        shuffled = rng.permutation(n_users)
        cum = np.cumsum(self._expected[shuffled])
        cum[-1] = self.m  # exact total despite rounding
        marks = np.floor(cum + rng.random()).astype(np.int64)
        draws = np.empty(n_users, dtype=np.int64)
        draws[shuffled] = np.diff(marks, prepend=0)
        # In place and in int32 where it fits: at 10M pairs each pass over ``m`` costs ~0.1 s.
        index_type = np.int32 if n_users < 2**31 else np.int64
        rows = np.repeat(np.arange(n_users, dtype=index_type), draws)
        position = rng.random(rows.shape[0])
        position *= self._n_float[rows]
        offsets = position.astype(np.int64)
        del position
        np.minimum(offsets, self._last[rows], out=offsets)
        offsets += self._start[rows]
        order = self._by_user[offsets]
        rng.shuffle(order)
        return order
