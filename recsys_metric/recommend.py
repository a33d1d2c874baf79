"""Serving: queries over a published run (:class:`Recommender`) and batch recommendation tables
(:func:`write_recommendations`).

Both read one run directory, or an artifacts directory whose ``current`` names one
(:func:`resolve_run_dir`). External ids go in and come out; dense numbers stay inside.

Every result, whichever path found it, is made the same way, so that all paths agree:

1. Candidates. Exact queries take the ``k + max(8, k // 10)`` best items (never more than the
   catalogue) from a blocked ranker: one matrix product against every item, the excluded items
   masked, a grouped selection (:func:`_select_top`). Approximate queries ask the Annoy index
   (:class:`~recsys_metric.index.AnnoyIndex`) for as many, with the excluded items passed along.
2. Masking. Whatever the index returns that is padding, out of range or excluded is dropped:
   filtering never relies on the index alone.
3. Canonical scores. The candidates are scored again from the exported embeddings with the
   model's formula, pair by pair (:func:`recsys_metric.model.distances.score_numpy`: euclidean
   ``-||u - i||``, cosine, dot), ordered by that score (ties: lower item number first) and cut
   to ``k``. The reported score is that score, never an index's own; it equals
   ``score_numpy`` and the model's ``Distance.score`` for the same pair up to float32 rounding of
   the dot product (about 1e-7 relative). The margin absorbs rounding differences between the
   index's own scores and the canonical ones at the k-th place.
4. Completeness. A row with fewer than ``min(k, eligible items)`` results (an Annoy search that
   came back short, say) is recomputed by exact blocked scoring. A result is therefore never
   shorter than ``k`` while enough items remain after the exclusions.

Seen items are every item of the user in the run's ``interactions.parquet`` (any label, any
split); the liked items that :meth:`Recommender.explain` cites are the rows with ``label == 1``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.vocab import UnknownIdError, Vocabulary
from recsys_metric.device import resolve_device
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.export import EmbeddingTable, read_embeddings
from recsys_metric.index import SIDECAR_FILE, AnnoyIndex, ItemIndex
from recsys_metric.model.distances import NORM_EPS, SQRT_EPS
from recsys_metric.pipeline import MODEL_JSON, load_model
from recsys_metric.registry import resolve_run_dir

Output = Literal["pandas", "polars"]
"""Frame type of query results."""

USER_EMBEDDINGS = "user_embeddings.parquet"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
INTERACTIONS = "interactions.parquet"
ANNOY_FILE = "items.ann"
TABLE_MANIFEST = "_manifest.json"
"""Written last into a recommendation table directory (readers of ``*.parquet`` skip it)."""

_MARGIN = 8
_GROUP_BITS = 5
_GROUP = 1 << _GROUP_BITS
_BLOCK_BYTES = 256 << 20
_PAIR_BYTES = 32 << 20
_MAX_BLOCK_USERS = 8192
_WRITES_IN_FLIGHT = 2


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


@dataclass(frozen=True)
class _RunEmbeddings:
    """Both embedding tables of a run, checked against each other and the vocabularies."""

    run_dir: Path
    users: EmbeddingTable
    items: EmbeddingTable

    @property
    def run_id(self) -> str:
        return self.items.run_id

    @property
    def distance(self) -> str:
        return self.items.distance


def _read_run(run_dir: Path) -> _RunEmbeddings:
    users = read_embeddings(run_dir / USER_EMBEDDINGS)
    items = read_embeddings(run_dir / ITEM_EMBEDDINGS)
    if users.kind != "user" or items.kind != "item":
        raise DataError(
            f"run directory {run_dir}: {USER_EMBEDDINGS} holds {users.kind}_id and {ITEM_EMBEDDINGS} "
            f"holds {items.kind}_id; the files are swapped or mislabelled"
        )
    user_meta = (users.distance, users.dim, users.run_id)
    item_meta = (items.distance, items.dim, items.run_id)
    if user_meta != item_meta:
        raise DataError(
            f"run directory {run_dir}: {USER_EMBEDDINGS} (distance, dim, run_id) = {user_meta} but "
            f"{ITEM_EMBEDDINGS} has {item_meta}; both must come from the same export"
        )
    for table, name in ((users, "users.parquet"), (items, "items.parquet")):
        vocab_path = run_dir / name
        if vocab_path.is_file() and not Vocabulary.load(vocab_path).ids().equals(table.ids):
            raise DataError(
                f"run directory {run_dir}: the {table.kind} ids of {table.kind}_embeddings.parquet "
                f"({len(table)} rows) are not those of {name} in number order; re-export the run"
            )
    return _RunEmbeddings(run_dir=run_dir, users=users, items=items)


def _read_interactions(
    run_dir: Path, n_users: int, n_items: int, *, liked: bool
) -> tuple[InteractionMatrix, InteractionMatrix | None]:
    """Seen items (every row) and, with ``liked``, liked items (``label == 1``) as CSR matrices.

    Read with pyarrow, whose freed buffers go back to the OS on request (``release_unused``), and
    sorted in place: 20M pairs need about 0.4 GB at the peak, not the 1.2 GB that
    ``InteractionMatrix.from_pairs`` (int64 copies of both columns, a key cache) takes.
    """
    path = run_dir / INTERACTIONS
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: the run's interactions define the seen items to exclude; "
            "use a complete run directory (or exclude_seen=False for batch tables)"
        )
    columns = ["user_num", "item_num"] + (["label"] if liked else [])
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file with the columns {columns}: {err}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path} ({table.num_rows} rows) lacks the columns {missing}; re-export the run")
    users = table.column("user_num").to_numpy()
    items = table.column("item_num").to_numpy()
    keep = table.column("label").to_numpy() == 1 if liked else None
    del table
    for name, values, bound in (("user_num", users, n_users), ("item_num", items, n_items)):
        if values.size and (
            not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= bound
        ):
            raise DataError(
                f"{path}: column {name} ({values.size} rows, {values.dtype}) holds values outside "
                f"[0, {bound}); the interactions do not belong to this run's vocabularies"
            )
    seen = _csr(users, items, n_users, n_items)
    liked_matrix = _csr(users[keep], items[keep], n_users, n_items) if keep is not None else None
    del users, items, keep
    pa.default_memory_pool().release_unused()
    return seen, liked_matrix


def _csr(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> InteractionMatrix:
    """Binary CSR of (user, item) pairs (repeats collapse), from one int64 key array sorted in place."""
    keys = users.astype(np.int64)
    keys *= n_items
    keys += items
    keys.sort()
    if keys.size:
        distinct = np.empty(keys.size, dtype=bool)
        distinct[0] = True
        np.not_equal(keys[1:], keys[:-1], out=distinct[1:])
        keys = keys[distinct]
    indptr = np.searchsorted(keys, np.arange(n_users + 1, dtype=np.int64) * n_items)
    np.remainder(keys, n_items, out=keys)
    return InteractionMatrix(indptr=indptr, indices=keys.astype(np.int32), n_users=n_users, n_items=n_items)


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
    its order); for euclidean, ``q.v - |v|^2 / 2`` (one ``addmm``, no square root). The selection
    keeps the best ``m`` of every row; the canonical scores are computed afterwards for those only.

    The item table is padded with zero rows to ``width``, a multiple of 32, so that a row of scores
    splits into whole groups for :func:`_select_top`; padding columns are set to ``-inf``.
    """

    def __init__(self, item_vectors: np.ndarray, distance: str, device: torch.device):
        n_items, dim = item_vectors.shape
        self.device = device
        self.n_items = int(n_items)
        self.width = -(-self.n_items // _GROUP) * _GROUP
        vectors = torch.zeros((self.width, dim), dtype=torch.float32, device=device)
        vectors[:n_items] = torch.tensor(np.asarray(item_vectors, dtype=np.float32), device=device)
        if distance == "cosine":
            vectors = F.normalize(vectors, p=2.0, dim=1, eps=NORM_EPS)
        self.items_t = vectors.T
        self.bias = -0.5 * vectors.square().sum(1) if distance == "euclidean" else None

    def buffer(self, rows: int) -> torch.Tensor:
        """A float32 ``[rows, width]`` score buffer for :meth:`top`."""
        return torch.empty((rows, self.width), dtype=torch.float32, device=self.device)

    def top(
        self, queries: np.ndarray, m: int, exclusions: _Exclusions, out: torch.Tensor | None = None
    ) -> np.ndarray:
        """int64 ``[B, c]`` item numbers, ``c >= m``: per row, unordered, the ``m`` best eligible items
        and possibly a few more (see :func:`_select_top`); -1 pads rows with fewer.

        ``out``: a :meth:`buffer` with at least B rows, reused across blocks by a single caller (a
        fresh 256 MiB allocation per block would pay its page faults again).
        """
        # A numpy copy, not torch.tensor: torch spreads even a 170 kB copy over its thread pool.
        q = torch.from_numpy(np.array(queries, dtype=np.float32, order="C")).to(self.device)
        with torch.no_grad():
            target = out[: q.shape[0]] if out is not None else None
            if self.bias is None:
                scores = torch.mm(q, self.items_t, out=target)
            else:
                scores = torch.addmm(self.bias, q, self.items_t, out=target)
            if self.width > self.n_items:
                scores[:, self.n_items :] = float("-inf")
            if exclusions.cols.size:
                flat = torch.from_numpy(exclusions.rows * self.width + exclusions.cols).to(self.device)
                scores.view(-1).index_fill_(0, flat, float("-inf"))
            return _select_top(scores, m)


def _select_top(scores: torch.Tensor, m: int) -> np.ndarray:
    """Columns holding the ``m`` largest finite values of every row of a contiguous ``[B, W]`` tensor.

    Returns int64 ``[B, c]``, ``c >= m``, unordered; a row lists its ``m`` best columns and
    possibly a few more (the caller re-scores and cuts), then -1 padding; a row with fewer than
    ``m`` finite values lists those. ``-inf`` marks excluded columns and is never returned.

    ``torch.topk`` over 100k columns costs as much as the matrix product that made them. On the
    CPU, when ``W`` is a multiple of 32, rows are cut into groups of 32 columns and ``t``, the
    ``m``-th largest group maximum of the row, is found (``np.partition`` over ``W / 32`` maxima).
    The ``m`` groups reaching ``t`` hold at least ``m`` values ``>= t``, so the ``m``-th largest
    value is ``>= t`` and every value of the top ``m`` lies in a group whose maximum is ``>= t``:
    those groups (``m`` of them, more only on exact ties) are copied as whole 128-byte rows and
    their values ``>= t`` are the candidates, typically ``m`` plus a few. One ``amax`` pass and
    work on ``W / 32 + 32 m`` values per row replace the full ``topk``: measured here at about a
    third of its time. The few rows where this does not pay (fewer than ``m`` finite groups, or
    ties flooding the groups) take ``topk``.
    """
    b, w = scores.shape
    n_groups = w // _GROUP
    if scores.device.type != "cpu" or w % _GROUP or n_groups < 2 * m:
        return _topk_columns(scores, m)
    groups = scores.view(b * n_groups, _GROUP)
    maxima = groups.amax(1).view(b, n_groups).numpy()
    threshold = np.partition(maxima, n_groups - m, axis=1)[:, n_groups - m]
    hot = maxima >= threshold[:, None]
    per_row = hot.sum(1)
    fallback = np.flatnonzero(np.isneginf(threshold) | (per_row > 2 * m))
    hot[fallback] = False
    flat = np.flatnonzero(hot)
    group_rows = flat // n_groups
    # Small index arithmetic stays in numpy: torch spreads even a [671, 110] integer op over its
    # thread pool, and on a busy machine waking the pool cost milliseconds per op.
    values = groups.index_select(0, torch.from_numpy(flat)).numpy()
    lanes = np.flatnonzero(values >= threshold[group_rows][:, None])
    picked = lanes >> _GROUP_BITS
    rows = group_rows[picked]
    columns = ((flat[picked] - rows * n_groups) << _GROUP_BITS) | (lanes & (_GROUP - 1))
    counts = np.bincount(rows, minlength=b)
    out = np.full((b, max(m, int(counts.max(initial=0)))), -1, dtype=np.int64)
    out[rows, np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)] = columns
    if fallback.size:
        out[fallback, :m] = _topk_columns(scores[torch.from_numpy(fallback)], m)
    return out


def _topk_columns(scores: torch.Tensor, m: int) -> np.ndarray:
    """int64 ``[B, m]`` columns of the ``m`` largest values per row, -1 where the value is ``-inf``."""
    values, columns = torch.topk(scores, m, dim=1, sorted=False)
    return torch.where(torch.isneginf(values), -1, columns).cpu().numpy()


class _Engine:
    """Candidates -> masking -> canonical scores -> completeness (the module docstring's four steps)."""

    def __init__(self, item_vectors: np.ndarray, distance: str, device: torch.device):
        self.n_items = int(item_vectors.shape[0])
        self.pair = _PairScorer(item_vectors, distance)
        self.ranker = _ExactRanker(item_vectors, distance, device)

    def rank(
        self,
        queries: np.ndarray,
        k: int,
        exclusions: _Exclusions,
        index: ItemIndex | None,
        out: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query: int64 item numbers ``[B, k]`` (-1 padding) and float32 scores (-inf
        padding), best first. ``index=None`` scores exactly with the blocked ranker; ``out`` is its
        score buffer (see :meth:`_ExactRanker.top`)."""
        m = _fetch_size(k, self.n_items)
        if index is None:
            found = self.ranker.top(queries, m, exclusions, out)
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


def _annoy_serves(run_dir: Path) -> bool:
    """The run has an Annoy index that met its recall floor (or was built before that was recorded)."""
    if not (run_dir / ANNOY_FILE).is_file():
        return False
    sidecar = run_dir / SIDECAR_FILE
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return True  # AnnoyIndex.load reports a missing or broken sidecar with the file's name
    return meta.get("serve", "annoy") != "exact"


class Recommender:
    """Queries over one run: similar items, recommendations, fold-in for new users, explanations.

    Build with :meth:`load`. Every query method is safe to call from many threads at once: the
    vectors, vocabularies and seen-item matrices are read-only, queries allocate their own
    buffers, and the only state written after loading (the model for :meth:`recommend_for_history`,
    read on first use) is guarded by a lock.

    Results are frames with ``item_id``, ``score`` (float32, higher is better; euclidean scores
    are ``-distance``) and ``rank`` (int32, from 1), best first: pandas by default, polars when
    loaded with ``output="polars"``. Unknown ids raise :class:`KeyError`
    (:class:`~recsys_metric.data.vocab.UnknownIdError`) naming the id.

    Attributes:
        run_id: the run that exported the embeddings.
        run_dir: the resolved run directory.
        user_ids: polars Series ``user_id`` of every known user, in number order.
        item_ids: polars Series ``item_id`` of every item, in number order.
        distance: ``euclidean``, ``cosine`` or ``dot``.
        dim: embedding dimension D.
        index: the :class:`~recsys_metric.index.AnnoyIndex` answering queries, or None when every
            query is scored exactly. Exact queries use the blocked ranker of the batch tables
            (a matrix product against all items, masking, selection): one exact path for both, and
            at 100k items about 8 ms per query here against 24 ms through ``ExactIndex.search``,
            with the same answers (both end in the canonical scores).
        output: ``pandas`` or ``polars``.
    """

    def __init__(
        self,
        run: _RunEmbeddings,
        seen: InteractionMatrix,
        liked: InteractionMatrix,
        index: ItemIndex | None,
        *,
        device: torch.device,
        output: Output,
    ):
        if output not in ("pandas", "polars"):
            raise ValueError(f"output must be 'pandas' or 'polars', got {output!r}")
        self.run_id = run.run_id
        self.run_dir = run.run_dir
        self.distance = run.distance
        self.dim = run.items.dim
        self.user_ids = run.users.ids
        self.item_ids = run.items.ids
        self.index = index
        self.output: Output = output
        self._device = device
        self._users = Vocabulary(run.users.ids, name="user")
        self._items = Vocabulary(run.items.ids, name="item")
        self._user_vectors = run.users.vectors
        self._item_vectors = run.items.vectors
        self._user_num_of = dict(zip(self.user_ids.to_list(), range(len(self.user_ids)), strict=True))
        self._item_num_of = dict(zip(self.item_ids.to_list(), range(len(self.item_ids)), strict=True))
        self._user_id_values = _read_only(self.user_ids.to_numpy())
        self._item_id_values = _read_only(self.item_ids.to_numpy())
        self._seen = seen
        self._liked = liked
        self._engine = _Engine(self._item_vectors, self.distance, device)
        self._model_lock = threading.Lock()
        self._model: Any = None
        # Warm the lazily built lookup caches now, so that no query thread writes them.
        self._users.numbers(self.user_ids.head(1))
        self._items.numbers(self.item_ids.head(1))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        index: Literal["auto", "annoy", "exact"] = "auto",
        device: str = "cpu",
        search_k: int | None = None,
        output: Output = "pandas",
    ) -> Recommender:
        """Open a run (or the run an artifacts directory's ``current`` names, see :func:`resolve_run_dir`).

        Args:
            path: run directory or artifacts directory.
            index: ``auto`` (Annoy when the run has ``items.ann`` and its build did not mark the
                run to answer exactly, ``index.json`` ``serve: exact``; else exact scoring),
                ``annoy`` or ``exact``.
            device: where exact scoring and fold-in run (``cpu``, ``cuda``, ``auto``).
            search_k: Annoy's ``search_k`` (nodes inspected per query); None keeps the index default.
            output: ``pandas`` or ``polars`` frames from every query.

        Raises:
            DataError: a file of the run is missing or breaks its contract (the message names it).
            RegistryError: ``path`` names no run.
            ConfigError: ``index`` or ``device`` is not a valid choice.
        """
        if index not in ("auto", "annoy", "exact"):
            raise ConfigError(f"index must be 'auto', 'annoy' or 'exact', got {index!r}")
        run_dir = resolve_run_dir(path)
        torch_device = resolve_device(device)
        run = _read_run(run_dir)
        seen, liked = _read_interactions(run_dir, len(run.users), len(run.items), liked=True)
        assert liked is not None
        chosen: ItemIndex | None = None
        if index == "annoy" or (index == "auto" and _annoy_serves(run_dir)):
            chosen = AnnoyIndex.load(
                run_dir, vectors=run.items.vectors, search_k=search_k, distance=run.distance
            )
        return cls(run, seen, liked, chosen, device=torch_device, output=output)

    def __repr__(self) -> str:
        return (
            f"Recommender(run_id={self.run_id!r}, users={len(self.user_ids)}, items={len(self.item_ids)}, "
            f"distance={self.distance!r}, dim={self.dim}, exact={self.is_exact})"
        )

    @property
    def is_exact(self) -> bool:
        """True when queries are scored exactly by default (no Annoy index)."""
        return self.index is None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def similar_items(
        self, item_id: Any, k: int = 10, exclude: Sequence[Any] = (), exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """The ``k`` items nearest to ``item_id`` (itself excluded), scored item to item with the
        run's distance.

        Args:
            item_id: a known item id.
            k: number of items; fewer only when fewer items remain after the exclusions.
            exclude: item ids never to return.
            exact: score every item exactly instead of asking the index.
        """
        k = _check_k(k)
        item = self._item_num(item_id)
        excluded = np.union1d(self._item_nums(exclude), [item])
        queries = np.array(self._item_vectors[item : item + 1])
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def recommend(
        self,
        user_id: Any,
        k: int = 10,
        exclude_seen: bool = True,
        candidates: Sequence[Any] | None = None,
        exclude: Sequence[Any] = (),
        exact: bool = False,
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for a known user.

        Args:
            user_id: a known user id.
            k: number of items; fewer only when fewer eligible items exist.
            exclude_seen: leave out every item the user interacted with in the run.
            candidates: restrict the answer to these item ids (scored exactly).
            exclude: item ids never to return.
            exact: score every item exactly instead of asking the index.
        """
        k = _check_k(k)
        user = self._user_num(user_id)
        excluded = self._item_nums(exclude)
        if exclude_seen:
            excluded = np.union1d(excluded, self._seen.row(user))
        queries = np.array(self._user_vectors[user : user + 1])
        if candidates is not None:
            return self._rank_candidates(queries, k, self._item_nums(candidates), excluded)
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def recommend_batch(
        self, user_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for each of many known users, in one frame.

        Returns:
            ``user_id, item_id, score, rank``: users in the order given, each user's rows best first.
        """
        k = _check_k(k)
        users = _id_numbers(self._users, user_ids).astype(np.int64)
        block = _block_users(self.n_items)
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for start in range(0, users.size, block):
            chunk = users[start : start + block]
            exclusions = (
                _Exclusions.of_matrix(self._seen, chunk) if exclude_seen else _Exclusions.none(chunk.size)
            )
            nums, scores = self._engine.rank(
                self._user_vectors[chunk], k, exclusions, None if exact else self.index
            )
            parts.append((np.broadcast_to(chunk[:, None], nums.shape), nums, scores))
        if parts:
            owners, nums, scores = (np.concatenate(p) for p in zip(*parts, strict=True))
        else:
            owners = nums = np.empty((0, k), dtype=np.int64)
            scores = np.empty((0, k), dtype=np.float32)
        keep = nums >= 0
        owner_nums = owners[keep]
        return self._frame(
            {"user_id": (self.user_ids, self._user_id_values, owner_nums)}, nums, scores, "item_id"
        )

    def recommend_for_history(
        self, item_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> pd.DataFrame | pl.DataFrame:
        """Top ``k`` items for a user the model has not seen, from the items they liked.

        The user's vector is the model's fold-in (:meth:`TwoTowerModel.fold_in`: the tower on the
        history for pooled towers, the minimiser of the pull term otherwise), read from the run's
        ``model.pt`` on first use.

        Args:
            item_ids: the liked item ids (repeats count as often as they occur); at least one.
            exclude_seen: leave the history items out of the answer.
        """
        k = _check_k(k)
        history = self._item_nums(item_ids)
        if history.size == 0:
            raise ValueError("recommend_for_history needs at least one item id in the history")
        model = self._fold_in_model()
        with torch.no_grad():
            vector = model.fold_in(torch.as_tensor(history, device=model.device))
        queries = vector.detach().to("cpu", torch.float32).numpy().reshape(1, -1)
        excluded = np.unique(history) if exclude_seen else np.empty(0, dtype=np.int64)
        nums, scores = self._engine.rank(
            queries, k, _Exclusions.of_rows([excluded]), None if exact else self.index
        )
        return self._frame({}, nums, scores, "item_id")

    def explain(self, user_id: Any, item_id: Any, k: int = 5) -> pd.DataFrame | pl.DataFrame:
        """The user's liked items nearest to ``item_id``: why it was recommended.

        Returns:
            ``liked_item_id, score, rank``: at most ``k`` of the user's liked items (``label == 1``
            in the run's interactions, ``item_id`` itself left out), nearest first; ``score`` is
            the item-to-item score of the run's distance (higher is nearer). Empty when the user
            liked nothing else.
        """
        k = _check_k(k)
        user = self._user_num(user_id)
        item = self._item_num(item_id)
        liked = self._liked.row(user).astype(np.int64)
        liked = liked[liked != item]
        queries = np.array(self._item_vectors[item : item + 1])
        return self._rank_candidates(queries, k, liked, np.empty(0, dtype=np.int64), "liked_item_id")

    def _rank_candidates(
        self,
        queries: np.ndarray,
        k: int,
        candidates: np.ndarray,
        excluded: np.ndarray,
        column: str = "item_id",
    ) -> pd.DataFrame | pl.DataFrame:
        pool = np.setdiff1d(np.unique(candidates), excluded, assume_unique=True)
        nums, scores = self._engine.finish(queries, pool[None, :], k, None)
        return self._frame({}, nums, scores, column)

    def _frame(
        self,
        leading: dict[str, tuple[pl.Series, np.ndarray, np.ndarray]],
        nums: np.ndarray,
        scores: np.ndarray,
        column: str,
    ) -> pd.DataFrame | pl.DataFrame:
        """A result frame from ``[B, k]`` item numbers (-1 = no item) and scores; ``leading`` maps a
        column name to (ids Series, the same ids as numpy, numbers of the kept rows)."""
        keep = nums >= 0
        items = nums[keep]
        ranks = np.broadcast_to(np.arange(1, nums.shape[1] + 1, dtype=np.int32), nums.shape)[keep]
        values = scores[keep].astype(np.float32, copy=False)
        if self.output == "polars":
            data = [ids.gather(sel).rename(name) for name, (ids, _, sel) in leading.items()]
            data += [
                self.item_ids.gather(items).rename(column),
                pl.Series("score", values, dtype=pl.Float32),
                pl.Series("rank", ranks, dtype=pl.Int32),
            ]
            return pl.DataFrame(data)
        columns: dict[str, Any] = {name: id_values[sel] for name, (_, id_values, sel) in leading.items()}
        columns.update({column: self._item_id_values[items], "score": values, "rank": ranks})
        return pd.DataFrame(columns)

    def _user_num(self, user_id: Any) -> int:
        return self._lookup(self._user_num_of, user_id, self.user_ids, "user_id")

    def _item_num(self, item_id: Any) -> int:
        return self._lookup(self._item_num_of, item_id, self.item_ids, "item_id")

    @staticmethod
    def _lookup(table: dict[Any, int], id_: Any, ids: pl.Series, column: str) -> int:
        # bool is an int to Python (True == 1) but never an id.
        num = None if isinstance(id_, (bool, np.bool_)) else _dict_get(table, id_)
        if num is None:
            raise UnknownIdError(
                f"{column} {id_!r} is not in the run's {column.removesuffix('_id')} vocabulary "
                f"({len(ids)} ids of type {ids.dtype})",
                unknown=[id_],
                n_unknown=1,
            )
        return num

    def _item_nums(self, item_ids: Sequence[Any]) -> np.ndarray:
        """Sorted unique int64 item numbers of ``item_ids`` (KeyError naming unknown ids)."""
        if isinstance(item_ids, (str, bytes)) or np.isscalar(item_ids):
            raise TypeError(
                f"expected a sequence of item ids, got the single value {item_ids!r}; wrap it in a list"
            )
        if len(item_ids) == 0:
            return np.empty(0, dtype=np.int64)
        return np.unique(_id_numbers(self._items, item_ids)).astype(np.int64)

    def _fold_in_model(self) -> Any:
        model = self._model
        if model is None:
            with self._model_lock:
                if self._model is None:
                    self._model = _load_fold_in_model(self.run_dir, self.run_id, self.n_items, self._device)
                model = self._model
        return model


def _id_numbers(vocab: Vocabulary, ids: Any) -> np.ndarray:
    """int32 numbers of a sequence of ids; unknown or wrongly typed ids raise a KeyError naming them."""
    if isinstance(ids, (str, bytes)) or np.isscalar(ids):
        raise TypeError(f"expected a sequence of {vocab.id_column} values, got the single value {ids!r}")
    if len(ids) == 0:
        return np.empty(0, dtype=np.int32)
    try:
        return vocab.numbers(ids if isinstance(ids, (pl.Series, np.ndarray)) else list(ids))
    except TypeError as err:
        shown = list(ids[:5]) if isinstance(ids, (pl.Series, np.ndarray)) else list(ids)[:5]
        raise UnknownIdError(
            f"{vocab.id_column} values {shown} cannot be in the run's vocabulary: {err}",
            unknown=shown,
            n_unknown=len(shown),
        ) from None


def _dict_get(table: dict[Any, int], key: Any) -> int | None:
    try:
        return table.get(key)
    except TypeError:
        # An unhashable key (a list, say) is simply not an id.
        return None


def _load_fold_in_model(run_dir: Path, run_id: str, n_items: int, device: torch.device) -> Any:
    meta_path = run_dir / MODEL_JSON
    if not meta_path.is_file():
        raise DataError(f"{meta_path} does not exist: recommend_for_history needs the run's model")
    model_run = json.loads(meta_path.read_text()).get("run_id")
    if model_run != run_id:
        raise DataError(
            f"{meta_path} belongs to run {model_run!r} but the embeddings to run {run_id!r}; "
            "the run directory mixes two exports"
        )
    model = load_model(run_dir, device=str(device))
    if model.n_items != n_items:
        raise DataError(f"{meta_path}: the model has {model.n_items} items, the embeddings {n_items}")
    return model


def _block_users(n_items: int) -> int:
    """Users per block so that a block's ``[B, n_items]`` float32 scores take about 256 MiB."""
    return int(max(1, min(_MAX_BLOCK_USERS, _BLOCK_BYTES // (4 * max(1, n_items)))))


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _write_part(table: pa.Table, path: Path) -> None:
    with open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd", use_dictionary=["user_id", "run_id"])
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TablePartition:
    """Consecutive blocks of users of a recommendation table, written by one call of
    :func:`write_partition`.

    Attributes:
        number: position of the partition in its plan, from 0.
        first_file: number of its first file: block ``j`` of the partition is written as
            ``part-{first_file + j:05d}.parquet``.
        user_nums: int64 ``[U]`` dense user numbers of the partition, in table order.
    """

    number: int
    first_file: int
    user_nums: np.ndarray


@dataclass(frozen=True)
class TablePlan:
    """A recommendation table cut into partitions that separate tasks (threads, processes, Dask
    workers on other machines) write, then finished in one place.

    Made by :func:`plan_recommendations` (which creates the temporary table directory); each
    partition is written by :func:`write_partition`; :func:`finish_recommendations` writes the
    manifest and moves the table into place, or :func:`discard_recommendations` removes it.
    :func:`write_recommendations` is the same three steps with one partition, in one process.

    Files are numbered as in a single-process run whatever the number of partitions: users go
    in blocks of ``block_users`` in table order, block ``b`` to ``part-{b:05d}.parquet``, and a
    partition is a run of consecutive blocks. The table, its files and its manifest are therefore
    the same for any number of partitions (but for ``created`` and the timings).

    The plan is small and picklable: paths, settings and the user numbers (8 bytes per user).

    Attributes:
        run_dir: the resolved run directory every partition reads.
        run_id: the run's id (from its embeddings); a partition finding another refuses to write.
        out_dir: the table directory to create.
        tmp_dir: the temporary directory beside ``out_dir`` that partitions write into.
        k, index, exclude_seen, device, search_k, overwrite: as for :func:`write_recommendations`.
        block_users: users per file.
        started: ``time.time()`` when the plan was made (the manifest's ``seconds`` count from it).
        partitions: the partitions, numbered from 0.
    """

    run_dir: str
    run_id: str
    out_dir: str
    tmp_dir: str
    k: int
    index: Literal["exact", "annoy"]
    exclude_seen: bool
    device: str
    search_k: int | None
    overwrite: bool
    block_users: int
    started: float
    partitions: tuple[TablePartition, ...]

    @property
    def n_users(self) -> int:
        return sum(int(p.user_nums.size) for p in self.partitions)


def plan_recommendations(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int = 100,
    user_ids: Sequence[Any] | None = None,
    index: Literal["exact", "annoy"] = "exact",
    batch_users: int | None = None,
    exclude_seen: bool = True,
    device: str = "cpu",
    search_k: int | None = None,
    overwrite: bool = False,
    partitions: int = 1,
) -> TablePlan:
    """Check the arguments and the run, cut the users into ``partitions`` and create the temporary
    table directory beside ``out_dir``.

    Arguments as for :func:`write_recommendations`; ``partitions`` is the number of partitions
    wanted, at most one per block of users (fewer blocks give fewer partitions, at least one).
    Blocks are shared out as evenly as possible, consecutive blocks to the same partition.

    Raises:
        DataError, KeyError: as :func:`write_recommendations`, before anything is written.
        ValueError: ``partitions`` or ``batch_users`` is not a positive integer.
    """
    return _plan(
        path,
        out_dir,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        exclude_seen=exclude_seen,
        device=device,
        search_k=search_k,
        overwrite=overwrite,
        partitions=partitions,
    )[0]


def _plan(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int,
    user_ids: Sequence[Any] | None,
    index: Literal["exact", "annoy"],
    batch_users: int | None,
    exclude_seen: bool,
    device: str,
    search_k: int | None,
    overwrite: bool,
    partitions: int,
) -> tuple[TablePlan, _RunEmbeddings]:
    """:func:`plan_recommendations`, also returning the run it read (a single-process writer
    goes on with it instead of reading it again)."""
    started = time.time()
    k = _check_k(k)
    if index not in ("exact", "annoy"):
        raise ConfigError(f"index must be 'exact' or 'annoy', got {index!r}")
    for name, value in (("batch_users", batch_users), ("partitions", partitions)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise DataError(f"output directory {out_dir} already exists; pass overwrite=True to replace it")
    run_dir = resolve_run_dir(path)
    resolve_device(device)
    run = _read_run(run_dir)
    if user_ids is None:
        users = np.arange(len(run.users), dtype=np.int64)
    else:
        users = _id_numbers(Vocabulary(run.users.ids, name="user"), user_ids).astype(np.int64)
    block = int(batch_users) if batch_users is not None else _block_users(len(run.items))
    n_blocks = -(-int(users.size) // block)
    groups = np.array_split(np.arange(n_blocks), max(1, min(int(partitions), n_blocks)))
    parts = tuple(
        TablePartition(
            number=number,
            first_file=int(group[0]) if group.size else 0,
            user_nums=users[int(group[0]) * block : (int(group[-1]) + 1) * block]
            if group.size
            else users[:0],
        )
        for number, group in enumerate(groups)
    )
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    tmp_dir.mkdir(parents=True)
    plan = TablePlan(
        run_dir=str(run_dir),
        run_id=run.run_id,
        out_dir=str(out_dir),
        tmp_dir=str(tmp_dir),
        k=k,
        index=index,
        exclude_seen=exclude_seen,
        device=str(device),
        search_k=search_k,
        overwrite=overwrite,
        block_users=block,
        started=started,
        partitions=parts,
    )
    return plan, run


def write_partition(plan: TablePlan, number: int, *, progress: bool | None = False) -> dict[str, Any]:
    """Write partition ``number`` of ``plan`` into the plan's temporary directory.

    Reads the run itself (embeddings, seen items, the Annoy index when asked for), so that it can
    run in any process that sees ``plan.run_dir`` and ``plan.tmp_dir``. Writing the same partition
    twice (a retried task) writes the same files again.

    Returns:
        ``number``, ``files`` (names, in order), ``n_users``, ``n_rows``, ``users_short``: what
        :func:`finish_recommendations` takes.

    Raises:
        DataError: the temporary directory is not there (``out_dir`` is not on storage this
            process sees), or the run directory now holds another run.
    """
    if not 0 <= number < len(plan.partitions):
        raise ValueError(f"partition {number} is not in the plan (partitions 0..{len(plan.partitions) - 1})")
    tmp_dir = Path(plan.tmp_dir)
    if not tmp_dir.is_dir():
        raise DataError(
            f"the table's temporary directory {tmp_dir} does not exist on {socket.gethostname()}: every "
            "process writing partitions must see the output directory (a shared file system), and "
            "the plan must not have been finished or discarded already"
        )
    run = _read_run(Path(plan.run_dir))
    if run.run_id != plan.run_id:
        raise DataError(
            f"run directory {plan.run_dir} now holds run {run.run_id!r}, but the table was planned for "
            f"run {plan.run_id!r}; plan the table again"
        )
    return _write_partition(plan, plan.partitions[number], run, progress)


def _write_partition(
    plan: TablePlan, part: TablePartition, run: _RunEmbeddings, progress: bool | None
) -> dict[str, Any]:
    # Parquet decoding leaves freed buffers in Arrow's pool; hand them back before the next peak.
    pa.default_memory_pool().release_unused()
    run_dir = Path(plan.run_dir)
    tmp_dir = Path(plan.tmp_dir)
    k = plan.k
    n_users, n_items = len(run.users), len(run.items)
    seen = _read_interactions(run_dir, n_users, n_items, liked=False)[0] if plan.exclude_seen else None
    ann: ItemIndex | None = None
    if plan.index == "annoy":
        ann = AnnoyIndex.load(
            run_dir, vectors=run.items.vectors, search_k=plan.search_k, distance=run.distance
        )
    engine = _Engine(run.items.vectors, run.distance, resolve_device(plan.device))
    block = plan.block_users
    users = part.user_nums
    buffer = engine.ranker.buffer(min(block, max(1, int(users.size))))

    user_id_array = run.users.ids.to_arrow()
    item_id_array = run.items.ids.to_arrow()
    run_id_array = pa.array([run.run_id], type=pa.string())
    schema_meta = {b"run_id": run.run_id.encode(), b"k": str(k).encode(), b"distance": run.distance.encode()}

    n_rows = 0
    users_short = 0
    files: list[str] = []
    pending: deque[Future[None]] = deque()
    bar = None
    try:
        if _show_progress(progress):
            from tqdm.auto import tqdm

            bar = tqdm(total=int(users.size), unit="user", unit_scale=True, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recommendations-writer") as writer:
            for part_file, start in enumerate(range(0, users.size, block), start=part.first_file):
                chunk = users[start : start + block]
                exclusions = (
                    _Exclusions.of_matrix(seen, chunk) if seen is not None else _Exclusions.none(chunk.size)
                )
                nums, scores = engine.rank(run.users.vectors[chunk], k, exclusions, ann, buffer)
                keep = nums >= 0
                per_user = keep.sum(1)
                n_kept = int(per_user.sum())
                users_short += int((per_user < k).sum())
                n_rows += n_kept
                ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), nums.shape)[keep]
                table = pa.table(
                    {
                        "user_id": pc.take(user_id_array, pa.array(np.repeat(chunk, per_user))),
                        "rank": pa.array(ranks),
                        "item_id": pc.take(item_id_array, pa.array(nums[keep])),
                        "score": pa.array(scores[keep].astype(np.float32, copy=False)),
                        "run_id": pc.take(run_id_array, pa.array(np.zeros(n_kept, dtype=np.int32))),
                    }
                ).replace_schema_metadata(schema_meta)
                name = f"part-{part_file:05d}.parquet"
                files.append(name)
                if len(pending) >= _WRITES_IN_FLIGHT:
                    pending.popleft().result()
                pending.append(writer.submit(_write_part, table, tmp_dir / name))
                if bar is not None:
                    bar.update(int(chunk.size))
            while pending:
                pending.popleft().result()
    finally:
        if bar is not None:
            bar.close()
    return {
        "number": part.number,
        "files": files,
        "n_users": int(users.size),
        "n_rows": n_rows,
        "users_short": users_short,
    }


def finish_recommendations(plan: TablePlan, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Write the manifest of a planned table and rename the table into place.

    Args:
        plan: the plan every partition was written from.
        results: what :func:`write_partition` returned for every partition, in any order.

    Returns:
        The summary :func:`write_recommendations` returns; ``seconds`` counts from the planning.

    Raises:
        DataError: a partition is missing or was written twice, or a file it reported is not
            there; the temporary directory is removed and ``out_dir`` left as it was.
    """
    tmp_dir, out_dir = Path(plan.tmp_dir), Path(plan.out_dir)
    try:
        by_number = sorted(results, key=lambda r: r["number"])
        numbers = [r["number"] for r in by_number]
        if numbers != list(range(len(plan.partitions))):
            raise DataError(
                f"table {out_dir}: the plan has {len(plan.partitions)} partitions but results came for "
                f"partitions {numbers}; write every partition exactly once"
            )
        files = [name for r in by_number for name in r["files"]]
        missing = [name for name in files if not (tmp_dir / name).is_file()]
        if missing:
            raise DataError(
                f"table {out_dir}: {len(missing)} of {len(files)} partition files are not in {tmp_dir} "
                f"(first: {missing[0]}); every writer must see the same output directory"
            )
        n_users = sum(r["n_users"] for r in by_number)
        seconds = time.time() - plan.started
        summary: dict[str, Any] = {
            "run_id": plan.run_id,
            "run_dir": plan.run_dir,
            "out_dir": str(out_dir),
            "k": plan.k,
            "index": plan.index,
            "exclude_seen": plan.exclude_seen,
            "n_users": n_users,
            "n_rows": sum(r["n_rows"] for r in by_number),
            "n_files": len(files),
            "users_short": sum(r["users_short"] for r in by_number),
            "block_users": plan.block_users,
            "seconds": round(seconds, 3),
            "users_per_second": round(n_users / seconds, 1) if seconds > 0 else None,
        }
        manifest = {
            **summary,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "columns": ["user_id", "rank", "item_id", "score", "run_id"],
            "files": files,
        }
        (tmp_dir / TABLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_dir(tmp_dir)
        _move_into_place(tmp_dir, out_dir, plan.overwrite)
    except BaseException:
        discard_recommendations(plan)
        raise
    return summary


def discard_recommendations(plan: TablePlan) -> None:
    """Remove a planned table's temporary directory (a failed write); ``out_dir`` is untouched."""
    shutil.rmtree(plan.tmp_dir, ignore_errors=True)


def write_recommendations(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    k: int = 100,
    user_ids: Sequence[Any] | None = None,
    index: Literal["exact", "annoy"] = "exact",
    batch_users: int | None = None,
    exclude_seen: bool = True,
    progress: bool | None = None,
    device: str = "cpu",
    search_k: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Top ``k`` items for every user (or ``user_ids``) as a partitioned Parquet table.

    ``out_dir`` receives ``part-00000.parquet``, ``part-00001.parquet``, ... (one per block of
    users, rows ordered by user then rank) with the columns ``user_id, rank, item_id, score,
    run_id`` (rank int32 from 1, score float32 higher is better), and ``_manifest.json``
    (counts and settings). Everything is written into a temporary directory beside ``out_dir``
    and renamed into place at the end: a reader sees the whole table or none of it.

    Users are scored in blocks: one ``[block, n_items]`` matrix product, the block's seen items
    masked, the best ``k + margin`` items selected, then the canonical scores (the module
    docstring); each block is written by a background thread while the next is scored. A block
    holds about 256 MiB of scores whatever the catalogue size, so memory stays bounded by the
    user vectors, the seen-item matrix and two blocks: well under 2 GB for 1M users x 100k
    items at D=64.

    This is :func:`plan_recommendations`, :func:`write_partition` and
    :func:`finish_recommendations` with one partition in this process; several processes or
    machines can write the partitions of one plan instead, with the same result.

    Args:
        path: run directory or artifacts directory (:func:`resolve_run_dir`).
        out_dir: the table directory to create.
        k: items per user; fewer only for users with fewer eligible items.
        user_ids: restrict to these users (in this order); None: every user in number order.
        index: ``exact`` (blocked exact scoring) or ``annoy`` (the run's ``items.ann``, with
            exact scoring for any user whose Annoy answer came back short).
        batch_users: users per block; None sizes blocks by the number of items.
        exclude_seen: leave out every item the user interacted with in the run.
        progress: tqdm progress bar; None: only when stderr is a terminal.
        device: where blocks are scored (``cpu``, ``cuda``, ``auto``).
        search_k: Annoy ``search_k``; None keeps the index default.
        overwrite: replace an existing ``out_dir`` (the old table is removed after the new one
            is in place); otherwise an existing ``out_dir`` is an error.

    Returns:
        ``run_id``, ``out_dir``, ``k``, ``index``, ``n_users``, ``n_rows``, ``n_files``,
        ``users_short`` (users with fewer than ``k`` rows), ``block_users``, ``seconds``,
        ``users_per_second``.

    Raises:
        DataError: the run breaks its contract, or ``out_dir`` exists without ``overwrite``.
        KeyError: an unknown id in ``user_ids`` (named in the message).
    """
    plan, run = _plan(
        path,
        out_dir,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        exclude_seen=exclude_seen,
        device=device,
        search_k=search_k,
        overwrite=overwrite,
        partitions=1,
    )
    try:
        result = _write_partition(plan, plan.partitions[0], run, progress)
    except BaseException:
        discard_recommendations(plan)
        raise
    del run
    return finish_recommendations(plan, [result])


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp_dir`` to ``out_dir``; an existing ``out_dir`` (with ``overwrite``) is renamed
    aside first and removed after the new one is in place."""
    old = None
    if out_dir.exists():
        if not overwrite:
            raise DataError(
                f"output directory {out_dir} appeared while writing; pass overwrite=True to replace it"
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
