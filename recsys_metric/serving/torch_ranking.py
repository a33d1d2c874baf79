"""The exact ranker in torch, for scoring on a GPU (``device="cuda"``).

Imported only by :func:`recsys_metric.serving.ranking.make_ranker` when a non-CPU device is asked
for: serving on the CPU never imports torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recsys_metric.scoring import NORM_EPS
from recsys_metric.serving.ranking import _GROUP, _GROUP_BITS, _Exclusions


class TorchRanker:
    """Exact top-m item numbers for a block of queries: one matrix product, masking, selection.

    The block's ranking scores are a per-row monotone transform of the canonical scores: the dot
    product; for cosine, the dot product with unit item vectors (a query's own norm does not change
    its order); for euclidean, ``q.v - |v|^2 / 2`` (one ``addmm``, no square root). The selection
    keeps the best ``m`` of every row; the canonical scores are computed afterwards for those only.
    Same contract as the numpy :class:`~recsys_metric.serving.ranking._ExactRanker`, for GPUs.

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
