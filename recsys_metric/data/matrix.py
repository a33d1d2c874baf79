"""A user x item interaction set in CSR form over dense numbers.

Used wherever "which items did this user touch" must be answered for millions of rows at once:
negative sampling (never sample a positive), evaluation (exclude training items, find relevant
test items) and seen-item filtering at serving time. Pure numpy, no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class InteractionMatrix:
    """Binary user x item matrix in CSR form.

    Attributes:
        indptr: int64 ``[n_users + 1]``; row ``u`` is ``indices[indptr[u]:indptr[u+1]]``.
        indices: int32 ``[nnz]``; item numbers, sorted and unique within each row.
        n_users: number of rows (users), dense numbers ``0..n_users-1``.
        n_items: number of columns (items), dense numbers ``0..n_items-1``.
    """

    indptr: np.ndarray
    indices: np.ndarray
    n_users: int
    n_items: int

    @classmethod
    def from_pairs(
        cls, user_nums: np.ndarray, item_nums: np.ndarray, n_users: int, n_items: int
    ) -> InteractionMatrix:
        """Build from parallel arrays of dense numbers; duplicate pairs collapse to one entry.

        Args:
            user_nums: int ``[n]`` in ``[0, n_users)``.
            item_nums: int ``[n]`` in ``[0, n_items)``.
        """
        user_nums = np.asarray(user_nums, dtype=np.int64)
        item_nums = np.asarray(item_nums, dtype=np.int64)
        if user_nums.shape != item_nums.shape:
            raise ValueError(f"user_nums {user_nums.shape} and item_nums {item_nums.shape} differ in shape")
        if user_nums.size and (user_nums.min() < 0 or user_nums.max() >= n_users):
            raise ValueError(f"user numbers must lie in [0, {n_users})")
        if item_nums.size and (item_nums.min() < 0 or item_nums.max() >= n_items):
            raise ValueError(f"item numbers must lie in [0, {n_items})")
        keys = user_nums * np.int64(n_items)
        keys += item_nums
        keys = _sorted_unique(keys)
        indptr = np.searchsorted(keys, np.arange(n_users + 1, dtype=np.int64) * np.int64(n_items))
        indices = (keys % n_items).astype(np.int32)
        return cls(indptr=indptr, indices=indices, n_users=int(n_users), n_items=int(n_items))

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def row(self, user_num: int) -> np.ndarray:
        """Sorted item numbers of one user (a view, int32)."""
        return self.indices[self.indptr[user_num] : self.indptr[user_num + 1]]

    def row_lengths(self) -> np.ndarray:
        """int64 ``[n_users]``: items per user."""
        return np.diff(self.indptr)

    def keys(self) -> np.ndarray:
        """Sorted int64 ``user * n_items + item`` for every entry (the CSR order is already sorted)."""
        rows = np.repeat(np.arange(self.n_users, dtype=np.int64), self.row_lengths())
        return rows * np.int64(self.n_items) + self.indices

    def contains(self, user_nums: np.ndarray, item_nums: np.ndarray) -> np.ndarray:
        """Vectorised membership: bool array, True where ``(user, item)`` is an entry.

        Binary search inside each user's row segment: O(n log row_length), no Python loop.
        Broadcasts ``user_nums [n]`` against ``item_nums [n]`` or ``[n, k]``.
        """
        user_nums = np.asarray(user_nums, dtype=np.int64)
        item_nums = np.asarray(item_nums)
        if item_nums.ndim == 2:
            user_b = np.broadcast_to(user_nums[:, None], item_nums.shape).ravel()
            return self.contains(user_b, item_nums.ravel()).reshape(item_nums.shape)
        if self.nnz == 0:
            return np.zeros(item_nums.shape, dtype=bool)
        # Searching the global key array is one numpy call and as fast as per-row segments.
        keys = self._sorted_keys()
        q = user_nums * np.int64(self.n_items) + item_nums.astype(np.int64)
        pos = np.searchsorted(keys, q)
        pos = np.minimum(pos, keys.shape[0] - 1)
        return keys[pos] == q

    def _sorted_keys(self) -> np.ndarray:
        cached = self.__dict__.get("_keys_cache")
        if cached is None:
            cached = self.keys()
            object.__setattr__(self, "_keys_cache", cached)
        return cached


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int64 array.

    Not ``np.unique``: numpy 2.4's hash-based unique took 30 s for 20M keys here, polars'
    parallel unique + sort 0.8 s.
    """
    if keys.size < 2:
        return keys.copy()
    return pl.Series(keys).unique().sort().to_numpy()
