"""Masked top-k of score rows on CPU in one compiled pass (numba): the evaluator's selection.

For each row of a ``[B, N]`` score matrix, :func:`masked_top_k` returns the ``k`` best items that
are neither excluded for every row (outside the candidate mask) nor among that row's user's seen
items, best first, equal scores ordered by item number (lowest first, the rule of
:func:`recsys_metric.evaluate.top_k`), and counts the NaN scores of the row, masked entries
included.

Why a kernel: the tensor path masks the matrix (a fill of the excluded columns, a scatter of the
seen items), then selects through chunk maxima, a gather and two ``topk`` calls: five passes over
or across ``[B, N]`` scores that each cost about as much as the score product itself
(BENCHMARKS.md "Full-ranking evaluation against the matmul rate"). Here each row is read once:
a min-heap holds the row's best ``k`` so far and its worst score is the threshold; an item whose
score is not above it is dropped after one comparison, and only the few that pass are checked
against the masks (the excluded columns, then the row's sorted seen items through a pointer
that only moves forward). Items are read in increasing number, so an item scoring exactly the
threshold loses the tie and is dropped too. A NaN fails every comparison and is counted on that
same path. Rows are split between threads (numba releases the GIL); each row's answer does
not depend on the split.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - exercised where numba is absent
    njit = None

__all__ = ["available", "masked_top_k"]

_BLOCK = 32
"""Scores read per block: the block's maximum against the threshold decides whether any of them
is looked at one by one."""


def available() -> bool:
    """True when numba imports, i.e. :func:`masked_top_k` can run."""
    return njit is not None


if njit is not None:

    @njit(cache=True, nogil=True, error_model="numpy")
    def _worse(v_a, i_a, v_b, i_b):  # type: ignore[no-untyped-def]
        # (v_a, i_a) ranks after (v_b, i_b): a lower score, or the same score and a higher item.
        return v_a < v_b or (v_a == v_b and i_a > i_b)

    @njit(cache=True, nogil=True, error_model="numpy")
    def _sift_down(heap_v, heap_i, size, pos):  # type: ignore[no-untyped-def]
        # Min-heap on "worse": the root is the worst item kept.
        while True:
            child = 2 * pos + 1
            if child >= size:
                return
            if child + 1 < size and _worse(
                heap_v[child + 1], heap_i[child + 1], heap_v[child], heap_i[child]
            ):
                child += 1
            if not _worse(heap_v[child], heap_i[child], heap_v[pos], heap_i[pos]):
                return
            heap_v[pos], heap_v[child] = heap_v[child], heap_v[pos]
            heap_i[pos], heap_i[child] = heap_i[child], heap_i[pos]
            pos = child

    @njit(cache=True, nogil=True, error_model="numpy")
    def _sift_blocks(order, maxima, size, pos):  # type: ignore[no-untyped-def]
        # Max-heap of block numbers on their maxima: the root is the block with the largest.
        while True:
            child = 2 * pos + 1
            if child >= size:
                return
            if child + 1 < size and maxima[order[child + 1]] > maxima[order[child]]:
                child += 1
            if maxima[order[child]] <= maxima[order[pos]]:
                return
            order[pos], order[child] = order[child], order[pos]
            pos = child

    @njit(cache=True, nogil=True, error_model="numpy")
    def _select_rows(  # type: ignore[no-untyped-def]
        scores,
        neg_inf,
        lo,
        hi,
        k,
        excluded,
        has_excluded,
        indptr,
        indices,
        users,
        has_seen,
        out_items,
        out_values,
        nans,
    ):
        # ``neg_inf`` has the scores' type: a float64 -inf would convert every float32 score it meets.
        n_items = scores.shape[1]
        n_blocks = (n_items + _BLOCK - 1) // _BLOCK
        n_full = n_items // _BLOCK
        heap_v = np.empty(k, dtype=scores.dtype)
        heap_i = np.empty(k, dtype=np.int64)
        maxima = np.empty(n_blocks, dtype=scores.dtype)
        order = np.empty(n_blocks, dtype=np.int64)
        for r in range(lo, hi):
            row = scores[r]
            # Pass 1: every block's largest score (NaN ignored) and the row's NaN count. Integer
            # counting and a select keep this loop in vector code (a float sum would not be:
            # without reassociation its additions form one chain).
            flag = neg_inf  # becomes NaN when a score is
            for b in range(n_full):
                block_max = neg_inf
                first = b * _BLOCK
                for t in range(_BLOCK):  # a constant trip count: unrolled vector code
                    v = row[first + t]
                    block_max = v if v > block_max else block_max
                    flag = v if v != v else flag
                maxima[b] = block_max
            if n_full < n_blocks:
                block_max = neg_inf
                for j in range(n_full * _BLOCK, n_items):
                    v = row[j]
                    block_max = v if v > block_max else block_max
                    flag = v if v != v else flag
                maxima[n_full] = block_max
            n_nan = 0
            if flag != flag:
                for j in range(n_items):
                    n_nan += row[j] != row[j]
            nans[r] = n_nan
            n_order = 0
            for b in range(n_blocks):
                if maxima[b] > -np.inf:
                    order[n_order] = b
                    n_order += 1
            for pos in range(n_order // 2 - 1, -1, -1):
                _sift_blocks(order, maxima, n_order, pos)
            seen_lo = 0
            seen_hi = 0
            if has_seen:
                seen_lo = indptr[users[r]]
                seen_hi = indptr[users[r] + 1]
            # Pass 2: blocks in decreasing order of their maximum, until the next block's maximum
            # is below the k-th best kept (no score of it or of any later block can enter).
            size = 0
            threshold = -np.inf
            threshold_item = -1  # while fewer than k are kept, only scores above -inf enter
            while n_order > 0:
                b = order[0]
                if maxima[b] < threshold:
                    break
                n_order -= 1
                order[0] = order[n_order]
                _sift_blocks(order, maxima, n_order, 0)
                for j in range(b * _BLOCK, min((b + 1) * _BLOCK, n_items)):
                    v = row[j]
                    # NaN fails both comparisons; a tie enters only with a lower item number.
                    if not (v > threshold or (v == threshold and j < threshold_item)):
                        continue
                    if has_excluded and excluded[j]:
                        continue
                    if has_seen and seen_hi > seen_lo:
                        at = seen_lo + np.searchsorted(indices[seen_lo:seen_hi], j)
                        if at < seen_hi and indices[at] == j:
                            continue
                    if size < k:
                        # Sift up: the new item climbs while it is worse than its parent.
                        pos = size
                        heap_v[pos] = v
                        heap_i[pos] = j
                        size += 1
                        while pos > 0:
                            parent = (pos - 1) // 2
                            if not _worse(heap_v[pos], heap_i[pos], heap_v[parent], heap_i[parent]):
                                break
                            heap_v[pos], heap_v[parent] = heap_v[parent], heap_v[pos]
                            heap_i[pos], heap_i[parent] = heap_i[parent], heap_i[pos]
                            pos = parent
                    else:
                        heap_v[0] = v
                        heap_i[0] = j
                        _sift_down(heap_v, heap_i, size, 0)
                    if size == k:
                        threshold = heap_v[0]
                        threshold_item = heap_i[0]
            # Pop the worst into the last free slot: the row ends best first.
            for slot in range(k - 1, size - 1, -1):
                out_items[r, slot] = -1
                out_values[r, slot] = -np.inf
            while size > 0:
                size -= 1
                out_items[r, size] = heap_i[0]
                out_values[r, size] = heap_v[0]
                heap_v[0] = heap_v[size]
                heap_i[0] = heap_i[size]
                _sift_down(heap_v, heap_i, size, 0)


def masked_top_k(
    scores: np.ndarray,
    k: int,
    *,
    excluded: np.ndarray | None = None,
    seen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top ``k`` eligible items of every row (module docstring).

    Args:
        scores: float32 or float64 ``[B, N]``, C-contiguous; never written.
        k: items per row, ``>= 1``.
        excluded: bool ``[N]``, True for items no row may return; None: none.
        seen: ``(indptr, indices, users)``: a CSR matrix (int64 ``indptr``, item numbers sorted
            within each row) and the int64 ``[B]`` matrix row of each score row; the row's
            entries are excluded from it. None: nothing per row.
        threads: threads the rows are split between.

    Returns:
        ``(items, values, n_nan)``: int64 ``[B, k]`` item numbers and their scores, best first,
        ``-1`` / ``-inf`` padding where a row has fewer than ``k`` eligible items with a score
        above ``-inf``; the number of NaN scores in ``scores`` (masked entries included).

    Raises:
        RuntimeError: numba is not installed (:func:`available`).
        ValueError: shapes or dtypes that do not fit.
    """
    if njit is None:
        raise RuntimeError("numba is not installed: use the tensor path (recsys_metric.evaluate.top_k)")
    if scores.ndim != 2 or scores.dtype not in (np.float32, np.float64) or not scores.flags.c_contiguous:
        raise ValueError(
            f"scores must be a C-contiguous float32/float64 [B, N] array, got {scores.dtype} {scores.shape}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_rows, n_items = scores.shape
    has_excluded = excluded is not None
    if excluded is None:
        excluded = np.zeros(1, dtype=np.bool_)
    elif excluded.dtype != np.bool_ or excluded.shape != (n_items,):
        raise ValueError(f"excluded must be bool [{n_items}], got {excluded.dtype} {excluded.shape}")
    has_seen = seen is not None
    if seen is None:
        indptr, indices, users = np.zeros(2, np.int64), np.zeros(1, np.int32), np.zeros(n_rows, np.int64)
    else:
        indptr, indices, users = seen
        if users.shape != (n_rows,):
            raise ValueError(f"seen users must be [{n_rows}], got {users.shape}")
    items = np.empty((n_rows, k), dtype=np.int64)
    values = np.empty((n_rows, k), dtype=scores.dtype)
    nans = np.zeros(n_rows, dtype=np.int64)
    args = (k, excluded, has_excluded, indptr, indices, users, has_seen, items, values, nans)
    n_threads = max(1, min(int(threads), n_rows))
    neg_inf = scores.dtype.type(-np.inf)
    if n_threads == 1:
        _select_rows(scores, neg_inf, 0, n_rows, *args)
    else:
        bounds = np.linspace(0, n_rows, n_threads + 1).astype(np.int64)
        pool = _pool(n_threads)
        done = [
            pool.submit(_select_rows, scores, neg_inf, int(bounds[t]), int(bounds[t + 1]), *args)
            for t in range(n_threads)
        ]
        for future in done:
            future.result()
    return items, values, int(nans.sum())


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# A forked child inherits the pools but not their threads: it starts its own.
os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(n_threads: int) -> ThreadPoolExecutor:
    """A thread pool kept for the process: the evaluator calls this once per tile of rows, and
    starting threads each time would cost more than a tile's selection."""
    with _POOLS_LOCK:
        pool = _POOLS.get(n_threads)
        if pool is None:
            pool = _POOLS[n_threads] = ThreadPoolExecutor(n_threads, thread_name_prefix="rank-kernel")
        return pool
