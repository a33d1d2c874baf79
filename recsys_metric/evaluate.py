"""Full-ranking offline evaluation: Recall, NDCG, MAP, HitRate and catalog coverage at K.

Every evaluated user is ranked against the whole candidate catalog; no sampled negatives
(sampled metrics can reorder models, Krichene & Rendle 2020). The model's numbers are always
reported beside a popularity baseline computed on the same users in the same call.

Conventions, fixed here once:

- Reachable relevant items. A user's relevant items are the test items that the ranking can
  contain: inside ``candidate_mask`` and, with ``exclude_seen``, not among the user's training
  items. Items outside that set could never be hit by any scorer; they are dropped from the
  relevant set (and users left with none are not evaluated) so that a perfect scorer gets 1.0.
- Recall@K = hits in the top K / min(|relevant|, K) (the LensKit convention: a user with more
  relevant items than K can still reach 1.0).
- NDCG@K: binary gains, discount 1 / log2(rank + 1) for ranks starting at 1, ideal DCG over
  min(|relevant|, K) hits at the top.
- MAP@K: sum over hit ranks r <= K of precision@r, divided by min(|relevant|, K).
- HitRate@K: share of users with at least one hit in the top K.
- Coverage@K: distinct items appearing in any evaluated user's top K, over the number of
  candidate items. Items with a score of -inf (excluded) never count.
- Ties: items with equal scores are ordered by item number, lowest first, on every device and
  for every batch size, so results are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recsys_metric import rank_kernel
from recsys_metric.config import EvalConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError

ScoreFn = Callable[[np.ndarray], torch.Tensor | np.ndarray]
"""Given int64 user numbers ``[B]``, returns scores ``[B, n_items]`` (higher is better)."""

METRICS: tuple[str, ...] = ("recall", "ndcg", "map", "hitrate", "coverage")
"""Metric names in report order; result keys are ``f"{metric}@{k}"``."""


def interaction_matrices(
    train: pl.DataFrame, test: pl.DataFrame, n_users: int, n_items: int
) -> tuple[InteractionMatrix, InteractionMatrix]:
    """Build the matrices evaluation needs from encoded split frames.

    Args:
        train: frame with ``user_num``, ``item_num`` (dense numbers); every row counts as seen,
            whatever its label.
        test: frame with ``user_num``, ``item_num`` and optionally ``label``; rows with
            ``label == 1`` are relevant (every row when there is no ``label`` column).
        n_users, n_items: sizes of the vocabularies the numbers index.

    Returns:
        ``(train_seen, test_relevant)``, both ``[n_users, n_items]``.
    """
    for name, frame in (("train", train), ("test", test)):
        for col in ("user_num", "item_num"):
            if col not in frame.columns:
                raise DataError(
                    f"{name} frame ({frame.height} rows) has no column {col!r} (columns: {frame.columns}); "
                    "encode ids with the vocabularies before evaluating"
                )
    train_seen = _frame_matrix(train, "train", n_users, n_items)
    if "label" in test.columns:
        test = test.filter(pl.col("label") == 1)
    test_relevant = _frame_matrix(test, "test", n_users, n_items)
    return train_seen, test_relevant


def _frame_matrix(frame: pl.DataFrame, name: str, n_users: int, n_items: int) -> InteractionMatrix:
    users = frame["user_num"].to_numpy()
    items = frame["item_num"].to_numpy()
    try:
        return InteractionMatrix.from_pairs(users, items, n_users, n_items)
    except ValueError as err:
        raise DataError(
            f"{name} frame ({frame.height} rows): {err}; were the numbers made with other vocabularies?"
        ) from None


def training_items_mask(train_seen: InteractionMatrix) -> np.ndarray:
    """bool ``[n_items]``: items with at least one training interaction (a usual ``candidate_mask``)."""
    mask = np.zeros(train_seen.n_items, dtype=bool)
    mask[train_seen.indices] = True
    return mask


class ItemScores:
    """A scorer that gives every user the same item scores (popularity and other global rankings).

    Calling it is a :data:`ScoreFn` (``[B]`` users -> ``[B, n_items]``, an expanded view, no copy).
    Evaluation recognises it and ranks the catalog once instead of once per user: each user's top
    K are the first items of one global order that are neither excluded for the user nor outside
    the candidates, which costs ``B x (K + seen)`` per batch instead of ``B x n_items``.

    Args:
        scores: float ``[n_items]``, higher is better, no NaN.
    """

    def __init__(self, scores: torch.Tensor | np.ndarray):
        scores = torch.as_tensor(scores)
        if scores.ndim != 1:
            raise ValueError(f"item scores must be 1-D [n_items], got shape {tuple(scores.shape)}")
        if not scores.is_floating_point():
            scores = scores.to(torch.float32)
        n_nan = int(torch.isnan(scores).sum())
        if n_nan:
            raise ValueError(f"item scores hold {n_nan} NaN values of {scores.shape[0]}")
        self.scores = scores

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        return self.scores.unsqueeze(0).expand(len(users), -1)


def popularity_score_fn(train_seen: InteractionMatrix) -> ItemScores:
    """Popularity baseline: every user gets the same scores, the item's number of training users.

    ``train_seen`` is binary, so the count is distinct users per item. Equal counts fall back to
    the evaluation tie rule (lower item number first).
    """
    counts = np.bincount(train_seen.indices, minlength=train_seen.n_items).astype(np.float32)
    return ItemScores(torch.from_numpy(counts))


class ScoresInto:
    """A scorer that writes each batch's scores into a tensor it is given.

    Evaluation reuses one ``[batch, n_items]`` buffer for every batch and masks it in place;
    a plain :data:`ScoreFn` returns a new tensor per batch, whose first touch of fresh memory can
    cost as much as the score product itself, and must be copied before masking unless it is
    known to be the caller's no longer. Called with users alone, it is a plain :data:`ScoreFn`
    (it allocates the output).

    Args:
        into: ``into(users int64 [B], out [B, n_items])`` writes the scores (higher is better) into
            ``out`` and returns nothing; it must write every entry.
        n_items: catalog size.
        dtype, device: of the scores ``into`` writes.
    """

    def __init__(
        self,
        into: Callable[[np.ndarray, torch.Tensor], None],
        n_items: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.into = into
        self.n_items = int(n_items)
        self.dtype = dtype
        self.device = torch.device(device)

    def __call__(self, users: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(users), self.n_items), dtype=self.dtype, device=self.device)
        self.into(users, out)
        return out


@dataclass(frozen=True)
class _Prepared:
    """Relevant sets reduced to what a ranking can reach, and the users who have any."""

    train_seen: InteractionMatrix
    relevant: InteractionMatrix
    users: np.ndarray
    candidate_mask: np.ndarray | None
    exclude_seen: bool

    @property
    def cut_items(self) -> np.ndarray | None:
        """int64 item numbers outside the candidate mask (``None`` when there are none)."""
        if self.candidate_mask is None or self.candidate_mask.all():
            return None
        return np.flatnonzero(~self.candidate_mask)


def _prepare(
    train_seen: InteractionMatrix,
    test_relevant: InteractionMatrix,
    exclude_seen: bool,
    candidate_mask: np.ndarray | None,
    users: np.ndarray | None,
) -> _Prepared:
    if (train_seen.n_users, train_seen.n_items) != (test_relevant.n_users, test_relevant.n_items):
        raise ValueError(
            f"train_seen is {train_seen.n_users} x {train_seen.n_items} but test_relevant is "
            f"{test_relevant.n_users} x {test_relevant.n_items}; build both with the same vocabularies"
        )
    n_items = test_relevant.n_items
    keys = test_relevant.keys()
    test_users = keys // n_items
    test_items = keys - test_users * n_items
    keep = np.ones(keys.shape[0], dtype=bool)
    if candidate_mask is not None:
        candidate_mask = np.asarray(candidate_mask)
        if candidate_mask.dtype != np.bool_ or candidate_mask.shape != (n_items,):
            raise ValueError(
                f"candidate_mask must be bool [{n_items}], got {candidate_mask.dtype} {candidate_mask.shape}"
            )
        keep &= candidate_mask[test_items]
    if exclude_seen:
        keep &= ~train_seen.contains(test_users, test_items)
    relevant = InteractionMatrix.from_pairs(
        test_users[keep], test_items[keep], test_relevant.n_users, n_items
    )
    eligible = np.flatnonzero(relevant.row_lengths() > 0)
    if users is not None:
        users = np.unique(np.asarray(users, dtype=np.int64))
        if users.size and (users[0] < 0 or users[-1] >= test_relevant.n_users):
            raise ValueError(f"users must be user numbers in [0, {test_relevant.n_users})")
        eligible = np.intersect1d(eligible, users)
    return _Prepared(train_seen, relevant, eligible.astype(np.int64), candidate_mask, exclude_seen)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(sorted(set(int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    return ks


def _segments(matrix: InteractionMatrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entries of the given rows as ``(position of the user in users, item number)`` arrays."""
    starts = matrix.indptr[users]
    lengths = matrix.indptr[users + 1] - starts
    rows = np.repeat(np.arange(users.shape[0], dtype=np.int64), lengths)
    offsets = np.arange(rows.shape[0], dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, matrix.indices[np.repeat(starts, lengths) + offsets].astype(np.int64)


class _NaNScores(ValueError):
    """Raised by :func:`top_k` on NaN scores (callers count them for their own message)."""


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` items per row with deterministic ties (equal scores: lower item number first).

    ``torch.topk`` may pick any of several items that tie at the k-th value. One ``topk`` of
    ``k + 1`` settles every row whose k-th and (k+1)-th values differ: its k items are then the
    only possible choice, and only their order needs the tie rule. The few rows with a tie across
    that boundary go through :func:`_top_k_ties`. On wide rows the ``k + 1`` come from
    :func:`_top_k_candidates` (the same values, about a fifth of the cost of a full ``topk``).

    Args:
        scores: float ``[B, N]``, no NaN; ``k <= N``.

    Returns:
        ``(items, values)``: int64 ``[B, k]`` item numbers and their scores, best first.

    Raises:
        ValueError: ``scores`` hold NaN (``torch.topk`` ranks NaN first, so the selected values
            show any; no separate pass over ``[B, N]``).
    """
    n_items = scores.shape[1]
    if k >= n_items:
        if bool(torch.isnan(scores).any()):
            raise _NaNScores("scores hold NaN")
        return _top_k_ties(scores, k)
    chunk = _chunk_size(n_items, k + 1)
    if chunk > 1:
        values, items = _top_k_candidates(scores, k + 1, chunk)
    else:
        values, items = torch.topk(scores, k + 1, dim=1, sorted=True)
    if bool(torch.isnan(values[:, 0]).any()):
        raise _NaNScores("scores hold NaN")
    tied = values[:, k - 1] == values[:, k]
    items, values = _order_ties(items[:, :k], values[:, :k])
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        items[rows], values[rows] = _top_k_ties(scores[rows], k)
    return items, values


def _chunk_size(n_items: int, k: int) -> int:
    """Columns per chunk for :func:`_top_k_candidates`; 1 where a plain ``topk`` is as cheap.

    At least 8 chunks per wanted item keep the second ``topk`` (over ``k * chunk`` gathered scores)
    small against the row; at most 64 columns a chunk keep the chunk maxima a cheap pass.
    """
    chunk = 64
    while chunk > 4 and n_items < 8 * k * chunk:
        chunk //= 2
    return chunk if n_items >= 8 * k * chunk else 1


def _top_k_candidates(scores: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values of each row and items holding them, from the ``k`` best chunks.

    Rows are cut into chunks of ``chunk`` columns; only the ``k`` chunks with the largest maxima
    are searched. That loses nothing: the k-th largest value of a row is at least the k-th
    largest chunk maximum ``M``, every value above ``M`` lies in a chosen chunk, and the chosen
    chunks hold at least ``k`` values ``>= M``; so the ``k`` values returned equal the row's top
    ``k`` values. Items are the row's own wherever a value is strictly above the k-th (where it
    ties, :func:`top_k` redoes the row with the tie rule).

    Args:
        scores: float ``[B, N]``, no NaN, ``N >= k * chunk``.

    Returns:
        ``(values, items)``: ``[B, k]`` best first, and their int64 item numbers.
    """
    n_rows, n_items = scores.shape
    n_full = n_items // chunk
    # A view, no copy: rows keep their stride, chunks are contiguous runs of columns.
    chunks = scores[:, : n_full * chunk].unflatten(1, (n_full, chunk))
    maxima = chunks.amax(dim=2)
    tail = n_items - n_full * chunk
    if tail:
        maxima = torch.cat([maxima, scores[:, n_full * chunk :].amax(dim=1, keepdim=True)], dim=1)
    best = torch.topk(maxima, k, dim=1, sorted=False).indices
    # Whole runs of columns copy faster than single gathered columns. The short last chunk (number
    # n_full) is read as the window of ``chunk`` columns ending at the last item, its first
    # columns (the previous chunk's) at -inf: each item appears at most once among the candidates.
    starts = torch.where(best < n_full, best * chunk, n_items - chunk)
    rows = torch.arange(n_rows, device=scores.device).unsqueeze(1)
    candidates = scores.unfold(1, chunk, 1)[rows, starts]
    if tail:
        overlap = torch.arange(chunk, device=scores.device) < chunk - tail
        candidates.masked_fill_((best == n_full).unsqueeze(2) & overlap, float("-inf"))
    candidates = candidates.flatten(1)
    values, picked = torch.topk(candidates, k, dim=1, sorted=True)
    columns = starts.gather(1, picked // chunk) + picked % chunk
    return values, columns


def _order_ties(items: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order ``[B, k]`` chosen items best first, equal values by item number (lowest first)."""
    items, by_item = torch.sort(items, dim=1)
    values = values.gather(1, by_item)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return items.gather(1, order), values.gather(1, order)


def _top_k_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k` for rows with ties at the k-th value: everything strictly above that value,
    then the lowest-numbered items equal to it (several passes over ``[B, N]``)."""
    n_rows = scores.shape[0]
    threshold = torch.topk(scores, k, dim=1, sorted=True).values[:, -1:]
    above = scores > threshold
    ties = scores == threshold
    need = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    take = above | (ties & (torch.cumsum(ties, dim=1, dtype=torch.int32) <= need))
    items = take.nonzero()[:, 1].view(n_rows, k)
    return _order_ties(items, scores.gather(1, items))


_NEG_INF = torch.tensor(float("-inf"))
"""Added to masked scores (a 0-d tensor, expanded to the masked entries without a copy)."""


class _Workspace:
    """One ``[batch, n_items]`` score buffer reused by every batch of an evaluation.

    Masking needs a copy of scores the caller still holds; a fresh ``[B, N]`` tensor per batch
    spends as long on first touching its pages as on the copy itself (about as long as the
    score matmul, 1024 x 41k float32 here), a reused one does not.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def get(self, n_rows: int, n_items: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``[n_rows, n_items]`` tensor (contents undefined), the same memory each call."""
        buf = self.buffer
        if (
            buf is None
            or buf.shape[0] < n_rows
            or buf.shape[1] != n_items
            or buf.dtype != dtype
            or buf.device != device
        ):
            buf = self.buffer = torch.empty((n_rows, n_items), dtype=dtype, device=device)
        return buf[:n_rows]


def _model_top_k(
    score_fn: ScoreFn,
    prep: _Prepared,
    users: np.ndarray,
    k: int,
    device: torch.device | None,
    workspace: _Workspace,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score a batch of users, mask what they may not be shown, and take the top ``k``.

    On CPU the compiled selection (:mod:`recsys_metric.rank_kernel`) applies the masks while it
    selects; elsewhere (CUDA, half precision, no numba) the scores are masked, then :func:`top_k`
    selects. Both give the same items in the same order."""
    n_items = prep.relevant.n_items
    if isinstance(score_fn, ScoresInto):
        # Scores written straight into the workspace: no [B, N] allocation, masked in place.
        target = workspace.get(users.shape[0], n_items, score_fn.dtype, score_fn.device)
        with torch.no_grad():
            score_fn.into(users, target)
        scores, owned = target, True
    else:
        with torch.no_grad():
            raw = score_fn(users)
        # The caller's scores (possibly a cached table, an expanded view or a numpy array) stay
        # intact: masks are written into the workspace copy unless the tensor was made here.
        scores = torch.from_numpy(np.asarray(raw)) if isinstance(raw, np.ndarray) else raw.detach()
        owned = False
    if device is not None:
        moved = scores.to(device)
        owned = owned or moved is not scores
        scores = moved
    if not scores.is_floating_point():
        scores, owned = scores.to(torch.float32), True
    if scores.shape != (users.shape[0], n_items):
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)}, expected [{users.shape[0]}, {n_items}]"
        )
    dev = scores.device
    if _kernel_fits(dev, scores.dtype, k, n_items):
        return _kernel_top_k(scores, prep, users, k)
    cut = torch.from_numpy(prep.cut_items).to(dev) if prep.cut_items is not None else None
    seen = None
    if prep.exclude_seen:
        rows, cols = _segments(prep.train_seen, users)
        if prep.candidate_mask is not None:
            # A seen item outside the candidates is masked (and NaN-checked) with its column.
            keep = prep.candidate_mask[cols]
            rows, cols = rows[keep], cols[keep]
        seen = (torch.from_numpy(rows).to(dev), torch.from_numpy(cols).to(dev))
    if not owned and (cut is not None or seen is not None):
        target = workspace.get(scores.shape[0], n_items, scores.dtype, dev)
        target.copy_(scores)
        scores = target
    # NaN anywhere is an error, masked entries included. Masking *adds* -inf: a finite score
    # becomes -inf, a NaN stays NaN, and top_k raises on any NaN left in the matrix (it ranks NaN
    # first). Checking the masked entries before overwriting them took a gather of its own, as
    # long as the fill (a sixth of the evaluator's work beyond the product, issue 16).
    if cut is not None:
        # Whole columns: far cheaper than a [B, N] boolean mask broadcast over the rows.
        scores.index_add_(1, cut, _NEG_INF.to(dev, scores.dtype).expand(scores.shape[0], cut.shape[0]))
    if seen is not None:
        scores.index_put_(seen, _NEG_INF.to(dev, scores.dtype), accumulate=True)
    try:
        return top_k(scores, k)
    except _NaNScores:
        # A masked +inf would read as NaN here (inf - inf): such a score is as broken as a NaN.
        n_nan = int(torch.isnan(scores).sum())
        raise ValueError(f"score_fn returned {n_nan} NaN scores for {users.shape[0]} users") from None


def _kernel_fits(device: torch.device, dtype: torch.dtype, k: int, n_items: int) -> bool:
    """Whether :func:`recsys_metric.rank_kernel.masked_top_k` selects these scores (CPU, float32
    or float64, numba installed); elsewhere (CUDA) the tensor path does."""
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.float64)
        and k < n_items
        and rank_kernel.available()
    )


def _kernel_top_k(
    scores: torch.Tensor, prep: _Prepared, users: np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_model_top_k` on CPU through :func:`recsys_metric.rank_kernel.masked_top_k`: the
    masks are applied while selecting, so the scores are never written (no copy, no fill), and
    the NaN count comes from the same pass."""
    excluded = ~prep.candidate_mask if prep.cut_items is not None else None
    seen = None
    if prep.exclude_seen:
        matrix = prep.train_seen
        seen = (
            matrix.indptr.astype(np.int64, copy=False),
            matrix.indices,
            users.astype(np.int64, copy=False),
        )
    items, values, n_nan = rank_kernel.masked_top_k(
        scores.detach().contiguous().numpy(), k, excluded=excluded, seen=seen, threads=torch.get_num_threads()
    )
    if n_nan:
        raise ValueError(f"score_fn returned {n_nan} NaN scores for {users.shape[0]} users")
    # Padding (-1) is never counted (its score is -inf), but item numbers must stay in range.
    np.maximum(items, 0, out=items)
    return torch.from_numpy(items), torch.from_numpy(values)


class _GlobalRanking:
    """Top k of an :class:`ItemScores` scorer for any users, from one sort of the catalog.

    A user's top k are the first items of the global order (score descending, equal scores by item
    number: the :func:`top_k` rule) that are not among their training items; so only the first
    ``k + (largest number of training items in the batch)`` items of that order need checking.
    Items outside the candidate mask score -inf, as in :func:`_model_top_k`.
    """

    def __init__(self, scorer: ItemScores, prep: _Prepared, device: torch.device | None):
        n_items = prep.relevant.n_items
        scores = scorer.scores
        if scores.shape != (n_items,):
            raise ValueError(f"item scores have shape {tuple(scores.shape)}, expected [{n_items}]")
        scores = scores.to(device) if device is not None else scores
        if prep.candidate_mask is not None:
            scores = scores.masked_fill(
                torch.from_numpy(~prep.candidate_mask).to(scores.device), float("-inf")
            )
        self.device = scores.device
        order = torch.sort(scores, descending=True, stable=True)
        self.items = order.indices.cpu().numpy()
        self.values = order.values
        self.prep = prep

    def __call__(self, users: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        prep = self.prep
        indptr = prep.train_seen.indptr
        # The batch's rows only: every user's row lengths would cost O(n_users) per batch.
        n_seen = indptr[users + 1] - indptr[users] if prep.exclude_seen else np.zeros(1, np.int64)
        m = min(self.items.shape[0], k + int(n_seen.max()))
        head = self.items[:m]
        position = np.broadcast_to(np.arange(m, dtype=np.int64), (users.shape[0], m))
        if prep.exclude_seen:
            seen = prep.train_seen.contains(users, np.broadcast_to(head, (users.shape[0], m)))
            # Seen items move behind every other one (keys stay distinct), so a row's first k
            # keys are its first k unseen items in global order, padded with seen ones.
            position = np.where(seen, position + m, position)
        chosen = np.sort(position, axis=1)[:, :k]
        padded = torch.from_numpy(chosen >= m).to(self.device)
        chosen %= m
        items = torch.from_numpy(head[chosen]).to(self.device)
        values = self.values[torch.from_numpy(chosen).to(self.device)].masked_fill(padded, float("-inf"))
        return items, values


EVAL_BATCH_BYTES = 256 << 20
"""``batch_size=None`` scores as many users at once as keep the ``[batch, n_items]`` buffers of a
batch (about 12 bytes a score) under this, between :data:`EVAL_BATCH_MIN` and
:data:`EVAL_BATCH_MAX` users: 1024 users of 100k items held 1.2 GB during every validation of
the 20M log's run, on top of the two fits' weights (its peak memory passed 8 GiB)."""
EVAL_BATCH_MIN, EVAL_BATCH_MAX = 64, 1024


def eval_batch_size(n_items: int) -> int:
    """Users scored at once by an evaluation of ``n_items`` items (:data:`EVAL_BATCH_BYTES`)."""
    return int(min(EVAL_BATCH_MAX, max(EVAL_BATCH_MIN, EVAL_BATCH_BYTES // (12 * max(n_items, 1)))))


def _evaluate_prepared(
    score_fn: ScoreFn, prep: _Prepared, ks: tuple[int, ...], batch_size: int | None, device: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """Metrics (as :func:`evaluate_scores` returns them) and the standard error of each per-user mean."""
    n_items = prep.relevant.n_items
    if batch_size is None:
        batch_size = eval_batch_size(n_items)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_users = int(prep.users.shape[0])
    if n_users == 0:
        raise DataError(
            "no user has a relevant test item that the ranking can reach (inside the candidate mask and "
            "not seen in training); check the split and the label of the test rows"
        )
    device = torch.device(device) if device is not None else None
    k_max = min(ks[-1], n_items)
    n_candidates = int(prep.candidate_mask.sum()) if prep.candidate_mask is not None else n_items
    global_ranking = _GlobalRanking(score_fn, prep, device) if isinstance(score_fn, ItemScores) else None
    sums = {f"{name}@{k}": 0.0 for name in METRICS[:-1] for k in ks}
    squares = dict.fromkeys(sums, 0.0)
    n_relevant = prep.relevant.row_lengths()
    workspace = _Workspace()
    best_rank: torch.Tensor | None = None
    for start in range(0, n_users, batch_size):
        users = prep.users[start : start + batch_size]
        if global_ranking is not None:
            items, values = global_ranking(users, k_max)
        else:
            items, values = _model_top_k(score_fn, prep, users, k_max, device, workspace)
        dev = items.device
        finite = torch.isfinite(values)
        hit_np = prep.relevant.contains(users, items.cpu().numpy())
        hits = torch.from_numpy(hit_np).to(dev, torch.float64) * finite
        n_rel = torch.from_numpy(n_relevant[users]).to(dev, torch.float64)
        _accumulate(sums, squares, hits, n_rel, ks)
        if best_rank is None:
            best_rank = torch.full((n_items,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
        ranks = torch.arange(k_max, device=dev).expand_as(items)
        best_rank = best_rank.to(dev).scatter_reduce(
            0, items[finite], ranks[finite], reduce="amin", include_self=True
        )
    result = {key: total / n_users for key, total in sums.items()}
    for k in ks:
        result[f"coverage@{k}"] = int((best_rank < k).sum()) / n_candidates if n_candidates else 0.0
    ordered = {f"{name}@{k}": float(result[f"{name}@{k}"]) for name in METRICS for k in ks}
    ordered["n_users"] = n_users
    errors = {key: _standard_error(sums[key], squares[key], n_users) for key in sums}
    return ordered, errors


def _standard_error(total: float, square_total: float, n: int) -> float:
    """Standard error of a mean from the sum and the sum of squares of ``n`` values (0 for n < 2)."""
    if n < 2:
        return 0.0
    mean = total / n
    variance = max(square_total - n * mean * mean, 0.0) / (n - 1)
    return math.sqrt(variance / n)


def _accumulate(
    sums: dict[str, float],
    squares: dict[str, float],
    hits: torch.Tensor,
    n_rel: torch.Tensor,
    ks: tuple[int, ...],
) -> None:
    """Add per-user metrics of one batch (and their squares, for standard errors).

    hits: float64 ``[B, k_max]`` 0/1, n_rel: ``[B]``."""
    k_max = hits.shape[1]
    ranks = torch.arange(1, k_max + 1, device=hits.device, dtype=torch.float64)
    discount = 1.0 / torch.log2(ranks + 1.0)
    ideal_prefix = torch.cat([discount.new_zeros(1), torch.cumsum(discount, 0)])
    hit_cum = torch.cumsum(hits, dim=1)
    precision_hits = hit_cum / ranks * hits
    dcg_cum = torch.cumsum(hits * discount, dim=1)
    ap_cum = torch.cumsum(precision_hits, dim=1)
    for k in ks:
        kk = min(k, k_max)
        denom = torch.clamp(n_rel, max=k)
        n_hits = hit_cum[:, kk - 1]
        ideal = ideal_prefix[torch.clamp(n_rel, max=kk).long()]
        per_user = {
            "recall": n_hits / denom,
            "ndcg": dcg_cum[:, kk - 1] / ideal,
            "map": ap_cum[:, kk - 1] / denom,
            "hitrate": (n_hits > 0).to(torch.float64),
        }
        for name, values in per_user.items():
            sums[f"{name}@{k}"] += float(values.sum())
            squares[f"{name}@{k}"] += float(values.square().sum())


def evaluate_scores(
    score_fn: ScoreFn,
    train_seen: InteractionMatrix,
    test_relevant: InteractionMatrix,
    *,
    ks: Iterable[int] = (10, 20, 50),
    exclude_seen: bool = True,
    candidate_mask: np.ndarray | None = None,
    users: np.ndarray | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of one scorer (conventions in the module docstring).

    Args:
        score_fn: user numbers int64 ``[B]`` -> scores ``[B, n_items]`` (torch on any device, or numpy).
        train_seen: ``[n_users, n_items]`` training interactions (any label).
        test_relevant: ``[n_users, n_items]`` relevant test interactions.
        ks: cut-offs K.
        exclude_seen: rank each user's training items at -inf (never recommended, never a hit).
        candidate_mask: bool ``[n_items]``; items where it is False are never recommended.
        users: evaluate only these user numbers (intersected with the users that have a
            reachable relevant item).
        batch_size: users scored at once; peak memory is about ``batch_size * n_items * 12`` bytes
            (float32 scores). None: as many as keep that under :data:`EVAL_BATCH_BYTES`, at most
            1024 (:func:`eval_batch_size`). The metrics do not depend on it.
        device: where the metric arithmetic runs; ``None`` keeps the device of the returned scores.

    Returns:
        ``{"recall@K", "ndcg@K", "map@K", "hitrate@K", "coverage@K"}`` for each K as floats, and
        ``"n_users"``, the number of users evaluated.

    Raises:
        DataError: no user has a reachable relevant item.
    """
    prep = _prepare(train_seen, test_relevant, exclude_seen, candidate_mask, users)
    return _evaluate_prepared(score_fn, prep, _check_ks(ks), batch_size, device)[0]


Z_95 = 1.959963984540054
"""Two-sided 95% normal quantile: a confidence interval is the mean +- ``Z_95`` standard errors."""


@dataclass(frozen=True)
class UserSample:
    """Which users an evaluation scored: all eligible users, or a seeded sample of them.

    Attributes:
        users: evaluated users.
        population: eligible users (a reachable relevant item) the sample was drawn from.
        seed: the sample's seed (``eval.seed``); ``None`` when every eligible user was evaluated.
        fingerprint: first 16 hex digits of the SHA-256 of the sorted int64 user numbers: two
            evaluations with the same fingerprint scored the same users.
    """

    users: int
    population: int
    seed: int | None
    fingerprint: str

    @classmethod
    def of(cls, users: np.ndarray, population: int, seed: int | None) -> UserSample:
        digest = hashlib.sha256(np.ascontiguousarray(users, dtype=np.int64).tobytes()).hexdigest()[:16]
        return cls(users=int(users.shape[0]), population=int(population), seed=seed, fingerprint=digest)

    @property
    def sampled(self) -> bool:
        return self.users < self.population

    def to_dict(self) -> dict[str, Any]:
        return {
            "users": self.users,
            "population": self.population,
            "sampled": self.sampled,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }


@dataclass
class EvaluationResult:
    """Metrics of several scorers on the same users.

    Attributes:
        models: scorer name (``"model"``, ``"popularity"``, ...) -> ``{"recall@10": ..., ...}``.
        ks: the cut-offs.
        n_users: users evaluated (the same for every scorer).
        standard_errors: scorer name -> ``{"recall@10": se, ...}``: the standard error of each
            per-user mean (recall, NDCG, MAP, hit rate; coverage is not a mean over users and has
            none), the sample standard deviation over the evaluated users divided by
            ``sqrt(n_users)``. A 95% confidence interval is the metric +- ``Z_95`` standard errors.
            No finite-population correction: the interval speaks for users like these, not only
            for the holdout's, and so stays conservative for a sample of the holdout.
        sample: which users were evaluated (``None`` in results saved before it was recorded).
    """

    models: dict[str, dict[str, float]]
    ks: tuple[int, ...]
    n_users: int
    standard_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    sample: UserSample | None = None

    def __post_init__(self) -> None:
        self.ks = tuple(self.ks)

    @property
    def columns(self) -> tuple[str, ...]:
        """``metric@K`` names in report order."""
        return tuple(f"{name}@{k}" for name in METRICS for k in self.ks)

    def confidence_interval(self, model: str, metric: str) -> tuple[float, float]:
        """95% confidence interval ``(low, high)`` of one scorer's ``metric@K`` (a per-user mean).

        Raises:
            KeyError: no standard error for that scorer and metric (coverage has none).
        """
        value, se = self.models[model][metric], self.standard_errors[model][metric]
        return value - Z_95 * se, value + Z_95 * se

    def to_table(self) -> str:
        """Fixed-width text table: one row per scorer, one column per metric@K; under each scorer
        with standard errors, a ``+-95%`` row holds the confidence half-widths (``Z_95`` SE)."""
        name_width = max([len("model"), len("  +-95%"), *(len(name) for name in self.models)])
        widths = [max(len(col), 6) for col in self.columns]
        sample = self.sample
        if sample is not None and sample.sampled:
            head = f"{self.n_users} of {sample.population} users (seeded sample, seed {sample.seed}), full ranking"
        else:
            head = f"{self.n_users} users, full ranking"
        if self.standard_errors:
            head += "; +-95%: confidence half-width over users (1.96 standard errors)"
        lines = [
            head,
            "  ".join(
                [
                    "model".ljust(name_width),
                    *(col.rjust(w) for col, w in zip(self.columns, widths, strict=True)),
                ]
            ),
        ]
        for name, metrics in self.models.items():
            cells = [f"{metrics[col]:.4f}".rjust(w) for col, w in zip(self.columns, widths, strict=True)]
            lines.append("  ".join([name.ljust(name_width), *cells]))
            errors = self.standard_errors.get(name)
            if errors:
                cells = [
                    (f"{Z_95 * errors[col]:.4f}" if col in errors else "").rjust(w)
                    for col, w in zip(self.columns, widths, strict=True)
                ]
                lines.append("  ".join(["  +-95%".ljust(name_width), *cells]))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"ks", "n_users", "models": {name: {metric@K: value}}, "standard_errors":
        {name: {metric@K: se}}, "sample": {"users", "population", "sampled", "seed", "fingerprint"}}``."""
        out: dict[str, Any] = {
            "ks": list(self.ks),
            "n_users": self.n_users,
            "models": {name: {col: float(m[col]) for col in self.columns} for name, m in self.models.items()},
        }
        if self.standard_errors:
            out["standard_errors"] = {
                name: {col: float(se[col]) for col in self.columns if col in se}
                for name, se in self.standard_errors.items()
            }
        if self.sample is not None:
            out["sample"] = self.sample.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`."""
        sample = data.get("sample")
        return cls(
            models=data["models"],
            ks=tuple(data["ks"]),
            n_users=int(data["n_users"]),
            standard_errors=data.get("standard_errors", {}),
            sample=(
                UserSample(
                    users=int(sample["users"]),
                    population=int(sample["population"]),
                    seed=sample["seed"],
                    fingerprint=sample["fingerprint"],
                )
                if sample
                else None
            ),
        )

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically: temporary file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
        return path


def sample_users(eligible: np.ndarray, max_users: int | None, seed: int) -> np.ndarray:
    """The users an evaluation scores: all of ``eligible`` when they are at most ``max_users``,
    else ``max_users`` of them drawn without replacement by ``numpy.random.default_rng(seed)``.

    The draw depends only on (the sorted eligible users, ``max_users``, ``seed``), so a run's
    evaluation and a later quality gate rebuilding the same holdout score the same users.

    Args:
        eligible: sorted unique int64 user numbers.

    Returns:
        Sorted int64 user numbers.
    """
    if max_users is None or eligible.shape[0] <= max_users:
        return eligible
    return np.sort(np.random.default_rng(seed).choice(eligible, size=max_users, replace=False))


def evaluate_with_baselines(
    score_fn: ScoreFn,
    train_seen: InteractionMatrix,
    test_relevant: InteractionMatrix,
    config: EvalConfig,
    *,
    candidate_mask: np.ndarray | None = None,
    extra: dict[str, ScoreFn] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> EvaluationResult:
    """Evaluate the model, the popularity baseline and any ``extra`` scorers on the same users.

    With more users that have a reachable relevant item than ``config.max_users``, that many are
    drawn (:func:`sample_users`, seeded by ``config.seed``); every scorer sees exactly those users.
    The result holds each metric's standard error over users and which users were scored
    (:class:`UserSample`; its fingerprint identifies the sample).
    """
    scorers: dict[str, ScoreFn] = {"model": score_fn, "popularity": popularity_score_fn(train_seen)}
    for name, fn in (extra or {}).items():
        if name in scorers:
            raise ValueError(f"extra scorer name {name!r} is reserved; choose another")
        scorers[name] = fn
    prep = _prepare(train_seen, test_relevant, config.exclude_seen, candidate_mask, None)
    population = int(prep.users.shape[0])
    users = sample_users(prep.users, config.max_users, config.seed)
    if users.shape[0] < population:
        prep = _Prepared(prep.train_seen, prep.relevant, users, prep.candidate_mask, prep.exclude_seen)
    sample = UserSample.of(users, population, config.seed if users.shape[0] < population else None)
    ks = _check_ks(config.ks)
    models: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for name, fn in scorers.items():
        models[name], errors[name] = _evaluate_prepared(fn, prep, ks, batch_size, device)
        models[name].pop("n_users")
    return EvaluationResult(
        models=models, ks=ks, n_users=int(prep.users.shape[0]), standard_errors=errors, sample=sample
    )
