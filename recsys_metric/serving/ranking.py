"""Exact ranking in numpy: candidates, masking, canonical scores, completeness.

Every result, whichever path found it, is made the same way, so that all paths agree:

1. Candidates. Exact queries take the ``k + max(8, k // 10)`` best items (never more than the
   catalogue) from a blocked ranker: one matrix product against every item, the excluded items
   masked, a grouped selection (:func:`_select_top`). Approximate queries ask the Annoy index
   (:class:`~recsys_metric.index.AnnoyIndex`) for as many, with the excluded items passed along.
2. Masking. Whatever the index returns that is padding, out of range or excluded is dropped:
   filtering never relies on the index alone.
3. Canonical scores. The candidates are scored again from the exported embeddings with the
   model's formula, pair by pair (:func:`recsys_metric.scoring.score_numpy`: euclidean
   ``-||u - i||``, cosine, dot), ordered by that score (ties: lower item number first) and cut
   to ``k``. The reported score is that score, never an index's own; it equals
   ``score_numpy`` and the model's ``Distance.score`` for the same pair up to float32 rounding of
   the dot product (about 1e-7 relative). The margin absorbs rounding differences between the
   index's own scores and the canonical ones at the k-th place.
4. Completeness. A row with fewer than ``min(k, eligible items)`` results (an Annoy search that
   came back short, say) is recomputed by exact blocked scoring. A result is therefore never
   shorter than ``k`` while enough items remain after the exclusions.

Nothing here imports torch: queries and batch tables on the CPU run on numpy's BLAS. Scoring on a
CUDA device goes through :mod:`recsys_metric.serving.torch_ranking`, imported only then.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.index import ItemIndex
from recsys_metric.scoring import NORM_EPS, SQRT_EPS

_MARGIN = 8
_GROUP_BITS = 5
_GROUP = 1 << _GROUP_BITS
_BLOCK_BYTES = 256 << 20
_PAIR_BYTES = 32 << 20
_MAX_BLOCK_USERS = 8192


def _fetch_size(k: int, n_items: int) -> int:
    """Candidates asked from an index for a top-``k`` answer: ``k`` plus a margin, at most ``n_items``."""
    return min(n_items, k + max(_MARGIN, k // 10))


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _block_users(n_items: int) -> int:
    """Users per block so that a block's ``[B, n_items]`` float32 scores take about 256 MiB."""
    return int(max(1, min(_MAX_BLOCK_USERS, _BLOCK_BYTES // (4 * max(1, n_items)))))


@dataclass(frozen=True)
class _Exclusions:
    """Items excluded per query of a batch, as parallel flat arrays.

    Attributes:
        rows: int64 ``[E]`` position of the query in the batch, non-decreasing.
        cols: int64 ``[E]`` item numbers, unique within a row.
        n_rows: batch size B.
    """

    rows: np.ndarray
    cols: np.ndarray
    n_rows: int

    @classmethod
    def none(cls, n_rows: int) -> _Exclusions:
        empty = np.empty(0, dtype=np.int64)
        return cls(empty, empty, n_rows)

    @classmethod
    def of_rows(cls, per_row: Sequence[np.ndarray]) -> _Exclusions:
        """From one sorted unique int array per query."""
        sizes = np.fromiter((r.size for r in per_row), dtype=np.int64, count=len(per_row))
        rows = np.repeat(np.arange(len(per_row), dtype=np.int64), sizes)
        cols = np.concatenate(per_row).astype(np.int64) if sizes.sum() else np.empty(0, dtype=np.int64)
        return cls(rows, cols, len(per_row))

    @classmethod
    def of_matrix(cls, matrix: InteractionMatrix, user_nums: np.ndarray) -> _Exclusions:
        """The rows ``user_nums`` of a CSR matrix (vectorised, no loop over users)."""
        user_nums = np.asarray(user_nums, dtype=np.int64)
        starts = matrix.indptr[user_nums]
        lengths = matrix.indptr[user_nums + 1] - starts
        rows = np.repeat(np.arange(user_nums.size, dtype=np.int64), lengths)
        offsets = np.arange(rows.size, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        cols = matrix.indices[np.repeat(starts, lengths) + offsets].astype(np.int64)
        return cls(rows, cols, int(user_nums.size))

    def per_row(self) -> list[np.ndarray]:
        """One int64 array per query (what :meth:`ItemIndex.search` takes)."""
        bounds = np.searchsorted(self.rows, np.arange(1, self.n_rows, dtype=np.int64))
        return np.split(self.cols, bounds)

    def counts(self) -> np.ndarray:
        """int64 ``[B]``: excluded items per query."""
        return np.bincount(self.rows, minlength=self.n_rows)

    def contains(self, candidates: np.ndarray, n_items: int) -> np.ndarray:
        """bool ``[B, m]``: which candidate item numbers are excluded for their row."""
        if self.cols.size == 0:
            return np.zeros(candidates.shape, dtype=bool)
        keys = np.sort(self.rows * n_items + self.cols)
        query = np.arange(self.n_rows, dtype=np.int64)[:, None] * n_items + candidates
        pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
        return keys[pos] == query

    def with_items(self, items: np.ndarray) -> _Exclusions:
        """These exclusions plus ``items`` (int64 item numbers) for every query of the batch."""
        if items.size == 0:
            return self
        items = np.asarray(items, dtype=np.int64)
        width = int(max(items.max(), self.cols.max() if self.cols.size else 0)) + 1
        rows = np.concatenate([self.rows, np.repeat(np.arange(self.n_rows, dtype=np.int64), items.size)])
        cols = np.concatenate([self.cols, np.tile(items, self.n_rows)])
        keys = np.unique(rows * width + cols)  # sorted: rows non-decreasing, items unique per row
        return _Exclusions(keys // width, keys % width, self.n_rows)

    def subset(self, rows: np.ndarray) -> _Exclusions:
        """The exclusions of the queries ``rows`` (sorted positions), renumbered ``0..len(rows)-1``."""
        new_position = np.full(self.n_rows, -1, dtype=np.int64)
        new_position[rows] = np.arange(rows.size, dtype=np.int64)
        keep = new_position[self.rows] >= 0
        return _Exclusions(new_position[self.rows[keep]], self.cols[keep], int(rows.size))


class _PairScorer:
    """Canonical scores of (query, item) pairs: the model's formula, one pair at a time.

    Each pair's score depends only on the two vectors (a row-wise product summed over D in a
    fixed order), never on the batch it came in, so a per-user query and a batch table report
    bit-identical scores, equal to the scores AnnoyIndex gives the same pairs.
    """

    def __init__(self, item_vectors: np.ndarray, distance: str):
        self.distance = distance
        vectors = np.asarray(item_vectors, dtype=np.float32)
        if distance == "cosine":
            vectors = _unit_rows(vectors)
        self.items = _read_only(np.ascontiguousarray(vectors))
        self.item_sq = (
            _read_only(np.einsum("ij,ij->i", vectors, vectors)) if distance == "euclidean" else None
        )

    def __call__(self, queries: np.ndarray, item_nums: np.ndarray) -> np.ndarray:
        """float32 ``[B, m]`` scores of ``queries [B, D]`` against ``item_nums [B, m]`` (valid numbers)."""
        b, m = item_nums.shape
        rows = max(1, _PAIR_BYTES // max(1, 4 * m * self.items.shape[1]))
        if b <= rows:
            return self._score(queries, item_nums)
        out = np.empty((b, m), dtype=np.float32)
        for start in range(0, b, rows):
            out[start : start + rows] = self._score(
                queries[start : start + rows], item_nums[start : start + rows]
            )
        return out

    def _score(self, queries: np.ndarray, item_nums: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if self.distance == "cosine":
            q = _unit_rows(q)
        # One product per (query, item) pair, summed over D by einsum's inner loop: the same bits
        # for the same pair whatever the batch (and as AnnoyIndex's einsum re-scoring).
        out = np.einsum("bd,bmd->bm", q, np.take(self.items, item_nums, axis=0))
        if self.distance == "euclidean":
            assert self.item_sq is not None
            # The steps and order of score_numpy: -2 q.r + |q|^2 + |r|^2, clamp, + eps, sqrt, negate.
            out *= -2.0
            out += np.einsum("ij,ij->i", q, q)[:, None]
            out += np.take(self.item_sq, item_nums)
            np.maximum(out, 0.0, out=out)
            out += np.float32(SQRT_EPS)
            np.sqrt(out, out=out)
            np.negative(out, out=out)
        return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    # The expression of score_numpy, so that the normalised vectors are the same bits.
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(NORM_EPS))


class _ExactRanker:
    """Exact top-m item numbers for a block of queries: one matrix product, masking, selection.

    The block's ranking scores are a per-row monotone transform of the canonical scores: the dot
    product; for cosine, the dot product with unit item vectors (a query's own norm does not change
    its order); for euclidean, ``q.v - |v|^2 / 2``, folded into the product as one more dimension
    (the query gets a 1, the item ``-|v|^2 / 2``), so no pass over the scores adds it. The
    selection keeps the best ``m`` of every row; the canonical scores are computed afterwards for
    those only.

    The item table is padded with zero rows to ``width``, a multiple of 32, so that a row of scores
    splits into whole groups for :func:`_select_top`; padding columns are set to ``-inf``.
    """

    def __init__(self, item_vectors: np.ndarray, distance: str):
        n_items, dim = item_vectors.shape
        self.n_items = int(n_items)
        self.width = -(-self.n_items // _GROUP) * _GROUP
        vectors = np.asarray(item_vectors, dtype=np.float32)
        if distance == "cosine":
            vectors = _unit_rows(vectors)
        self.augmented = distance == "euclidean"
        table = np.zeros((self.width, dim + int(self.augmented)), dtype=np.float32)
        table[:n_items, :dim] = vectors
        if self.augmented:
            table[:n_items, dim] = -0.5 * np.einsum("ij,ij->i", vectors, vectors)
        self.items = _read_only(table)

    def buffer(self, rows: int) -> np.ndarray:
        """A float32 ``[rows, width]`` score buffer for :meth:`top`."""
        return np.empty((rows, self.width), dtype=np.float32)

    def top(
        self, queries: np.ndarray, m: int, exclusions: _Exclusions, out: np.ndarray | None = None
    ) -> np.ndarray:
        """int64 ``[B, c]`` item numbers, ``c >= m``: per row, unordered, the ``m`` best eligible items
        and possibly a few more (see :func:`_select_top`); -1 pads rows with fewer.

        ``out``: a :meth:`buffer` with at least B rows, reused across blocks by a single caller (a
        fresh 256 MiB allocation per block would pay its page faults again).
        """
        q = np.asarray(queries, dtype=np.float32)
        b = q.shape[0]
        if self.augmented:
            q = np.concatenate([q, np.ones((b, 1), dtype=np.float32)], axis=1)
        target = out[:b] if out is not None else self.buffer(b)
        scores = np.matmul(np.ascontiguousarray(q), self.items.T, out=target)
        if self.width > self.n_items:
            scores[:, self.n_items :] = -np.inf
        if exclusions.cols.size:
            scores.reshape(-1)[exclusions.rows * self.width + exclusions.cols] = -np.inf
        return _select_top(scores, m)


def _select_top(scores: np.ndarray, m: int) -> np.ndarray:
    """Columns holding the ``m`` largest finite values of every row of a C-contiguous ``[B, W]`` array.

    Returns int64 ``[B, c]``, ``c >= m``, unordered; a row lists its ``m`` best columns and
    possibly a few more (the caller re-scores and cuts), then -1 padding; a row with fewer than
    ``m`` finite values lists those. ``-inf`` marks excluded columns and is never returned.

    A full ``argpartition`` over 100k columns costs twice the matrix product that made them. When
    ``W`` is a multiple of 32, the columns of a row are dealt into ``G = W / 32`` groups of 32,
    column ``c`` to group ``c mod G`` (lane ``c // G``): viewed as ``[B, 32, G]``, the group maxima
    are one elementwise maximum over 32 contiguous rows of length ``G``, which numpy vectorises
    (the same maxima over 32 adjacent columns took six times longer). ``t``, the ``m``-th largest
    group maximum of the row, is found by ``np.partition`` over the ``G`` maxima. The ``m`` groups
    reaching ``t`` hold at least ``m`` values ``>= t``, so the ``m``-th largest value is ``>= t``
    and every value of the top ``m`` lies in a group whose maximum is ``>= t``: those groups
    (``m`` of them, more only on exact ties) are gathered and their values ``>= t`` are the
    candidates, typically ``m`` plus a few. The few rows where this does not pay (fewer than ``m``
    finite groups, or ties flooding the groups) take ``argpartition``.
    """
    b, w = scores.shape
    n_groups = w // _GROUP
    if w % _GROUP or n_groups < 2 * m:
        return _topk_columns(scores, m)
    lanes_view = scores.reshape(b, _GROUP, n_groups)
    maxima = lanes_view.max(axis=1)
    threshold = np.partition(maxima, n_groups - m, axis=1)[:, n_groups - m]
    hot = maxima >= threshold[:, None]
    per_row = hot.sum(1)
    fallback = np.flatnonzero(np.isneginf(threshold) | (per_row > 2 * m))
    hot[fallback] = False
    group_rows, groups = np.nonzero(hot)
    values = lanes_view[group_rows, :, groups]  # [H, 32]: the 32 lanes of every hot group
    picked, lanes = np.nonzero(values >= threshold[group_rows][:, None])
    rows = group_rows[picked]
    columns = lanes * n_groups + groups[picked]
    counts = np.bincount(rows, minlength=b)
    out = np.full((b, max(m, int(counts.max(initial=0)))), -1, dtype=np.int64)
    out[rows, np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)] = columns
    if fallback.size:
        out[fallback, :m] = _topk_columns(scores[fallback], m)
    return out


def _topk_columns(scores: np.ndarray, m: int) -> np.ndarray:
    """int64 ``[B, m]`` columns of the ``m`` largest values per row, -1 where the value is ``-inf``."""
    b, w = scores.shape
    if m >= w:
        columns = np.broadcast_to(np.arange(w, dtype=np.int64), (b, w)).copy()
    else:
        columns = np.argpartition(scores, w - m, axis=1)[:, w - m :].astype(np.int64)
    values = np.take_along_axis(scores, columns, axis=1)
    columns[np.isneginf(values)] = -1
    if columns.shape[1] < m:
        columns = np.pad(columns, ((0, 0), (0, m - columns.shape[1])), constant_values=-1)
    return columns


def make_ranker(item_vectors: np.ndarray, distance: str, device: str = "cpu", *, bulk: bool = False) -> Any:
    """The exact ranker for ``device``: numpy on the CPU (no torch import), torch elsewhere.

    ``device`` is a spec as :func:`recsys_metric.device.resolve_device` takes it; ``cpu`` never
    imports torch, any other spec does (``auto`` falls back to numpy when no GPU is usable).

    ``bulk``: the caller ranks large blocks of users (a batch table), where torch's CPU kernels
    used about 14% less CPU time than numpy's for ``dot`` (equal for euclidean; BENCHMARKS.md,
    "Serving"), so torch is used on the CPU too when it is installed. Queries never ask for it.

    Raises:
        ConfigError: the device spec is not valid on this machine.
    """
    if bulk and str(device).strip().lower() == "cpu" and importlib.util.find_spec("torch") is not None:
        import torch

        from recsys_metric.serving.torch_ranking import TorchRanker

        return TorchRanker(item_vectors, distance, torch.device("cpu"))
    if str(device).strip().lower() != "cpu":
        from recsys_metric.device import resolve_device

        resolved = resolve_device(device)
        if resolved.type != "cpu":
            from recsys_metric.serving.torch_ranking import TorchRanker

            return TorchRanker(item_vectors, distance, resolved)
    return _ExactRanker(item_vectors, distance)


class _Engine:
    """Candidates -> masking -> canonical scores -> completeness (the module docstring's four steps)."""

    def __init__(
        self,
        item_vectors: np.ndarray,
        distance: str,
        device: str = "cpu",
        *,
        bulk: bool = False,
        never: np.ndarray | None = None,
    ):
        self.n_items = int(item_vectors.shape[0])
        # Items no answer may hold (a run's cold items under ``cold_items: excluded``).
        self.never = np.empty(0, dtype=np.int64) if never is None else np.asarray(never, dtype=np.int64)
        self.pair = _PairScorer(item_vectors, distance)
        self.ranker = make_ranker(item_vectors, distance, device, bulk=bulk)

    def rank(
        self,
        queries: np.ndarray,
        k: int,
        exclusions: _Exclusions,
        index: ItemIndex | None,
        out: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query: int64 item numbers ``[B, k]`` (-1 padding) and float32 scores (-inf
        padding), best first. ``index=None`` scores exactly with the blocked ranker; ``out`` is its
        score buffer (see :meth:`_ExactRanker.top`)."""
        m = _fetch_size(k, self.n_items)
        exclusions = exclusions.with_items(self.never)
        if index is None:
            found = self.ranker.top(queries, m, exclusions, out)
        else:
            # A query whose request covers the whole catalogue (few items, or most excluded) is
            # scored exactly here: an index would fall back to its own exact search for it.
            whole = np.flatnonzero(m + exclusions.counts() >= self.n_items)
            if whole.size == exclusions.n_rows:
                found = self.ranker.top(queries, m, exclusions, out)
                index = None
            elif whole.size:
                found = self._mixed(queries, m, exclusions, index, whole, out)
            else:
                found, _ = index.search(queries, m, exclude=exclusions.per_row())
        # The ranker masks exclusions itself; an index's answer is checked again.
        checked = exclusions if index is not None else None
        nums, scores = self.finish(queries, np.asarray(found, dtype=np.int64), k, checked)
        eligible = self.n_items - exclusions.counts()
        short = np.flatnonzero((nums >= 0).sum(1) < np.minimum(k, eligible))
        if short.size:
            sub = exclusions.subset(short)
            again = self.ranker.top(queries[short], m, sub, out)
            nums[short], scores[short] = self.finish(queries[short], again, k, None)
        return nums, scores

    def _mixed(
        self,
        queries: np.ndarray,
        m: int,
        exclusions: _Exclusions,
        index: ItemIndex,
        whole: np.ndarray,
        out: Any,
    ) -> np.ndarray:
        """Candidates when some rows (``whole``) are ranked exactly and the others by ``index``."""
        rest = np.setdiff1d(np.arange(exclusions.n_rows), whole)
        exact = self.ranker.top(queries[whole], m, exclusions.subset(whole), out)
        approx, _ = index.search(queries[rest], m, exclude=exclusions.subset(rest).per_row())
        found = np.full((exclusions.n_rows, max(exact.shape[1], approx.shape[1])), -1, dtype=np.int64)
        found[whole, : exact.shape[1]] = exact
        found[rest, : approx.shape[1]] = approx
        return found

    def finish(
        self, queries: np.ndarray, candidates: np.ndarray, k: int, exclusions: _Exclusions | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mask (padding, out of range, ``exclusions`` when given), score canonically, order (score
        descending, item number ascending), cut to ``k``."""
        n = self.n_items
        b = candidates.shape[0]
        valid = (candidates >= 0) & (candidates < n)
        if exclusions is not None:
            valid &= ~exclusions.contains(np.where(valid, candidates, 0), n)
        safe = np.where(valid, candidates, 0)
        scores = self.pair(queries, safe) if candidates.shape[1] else np.empty((b, 0), dtype=np.float32)
        scores[~valid] = -np.inf
        tie_key = np.where(valid, candidates, n)
        order = np.lexsort((tie_key, -scores), axis=1)[:, :k]
        nums = np.take_along_axis(tie_key, order, axis=1)
        top = np.take_along_axis(scores, order, axis=1)
        nums[nums == n] = -1
        if nums.shape[1] < k:
            pad = k - nums.shape[1]
            nums = np.pad(nums, ((0, 0), (0, pad)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
        return nums, top
