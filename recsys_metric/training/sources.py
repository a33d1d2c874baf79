"""Where an epoch's triplets come from: chunks of liked pairs with their negatives
(:class:`NegativeSource`; :class:`CoLikedSource` in item-item mode), prepared in a worker thread
(:func:`epoch_chunks`; :class:`ChunkFeed` keeps that thread across epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from recsys_metric import triplet_kernel
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError
from recsys_metric.training.data import TrainData
from recsys_metric.triplets import sample_negatives


@dataclass
class Chunk:
    users: Tensor
    items: Tensor
    negs: Tensor | None
    valid: Tensor | None
    n_pairs: int
    hist: Tensor | None = None
    """With deferred negatives: the users whose history the step's own draws avoid."""
    seed: int = 0
    """With deferred negatives: the chunk's random stream for the step's draws."""


class NegativeSource:
    """Draws the negatives of a chunk of pairs (sampled, explicit dislikes mixed in)."""

    def __init__(
        self, data: TrainData, k: int, explicit_share: float, device: torch.device, needs_negatives: bool
    ):
        self.data = data
        self.k = k
        self.device = device
        self.needs_negatives = needs_negatives
        base = math.floor(explicit_share * k)
        self.explicit_base = base
        self.explicit_frac = explicit_share * k - base
        self.use_explicit = explicit_share > 0 and data.dislikes is not None and data.dislikes.nnz > 0
        self.defer_negatives = False
        """The step draws the negatives (:attr:`NumbaTripletStep.draws_negatives`); chunks carry
        the users to draw for and a seed instead."""
        self.compiled_sampler: tuple[np.ndarray, np.ndarray, triplet_kernel.SeenFilter] | None = None
        """:func:`~recsys_metric.training.kernel_step.kernel_csr` of ``data.seen``: draw uniform negatives with
        :func:`triplet_kernel.draw_negatives` on one thread instead of :func:`sample_negatives`
        (the same distribution, 2x faster at 1M users, where the vectorised sampler's passes over
        the chunk miss the caches)."""
        if self.use_explicit:
            assert data.dislikes is not None
            self.dislike_lengths = data.dislikes.row_lengths()

    def pairs(self, order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users, queries, positives)`` of the pairs ``order``: the user whose history the
        negatives avoid, the query row of the step, the positive item. Here queries are the users."""
        users = self.data.user_num[order]
        return users, users, self.data.item_num[order]

    def chunk(self, order: np.ndarray, rng: np.random.Generator) -> Chunk:
        data = self.data
        users, queries, items = self.pairs(order, rng)
        negs_t = valid_t = None
        if self.needs_negatives and self.defer_negatives:
            return Chunk(
                users=torch.from_numpy(queries.astype(np.int64)),
                items=torch.from_numpy(items.astype(np.int64)),
                negs=None,
                valid=None,
                n_pairs=int(queries.shape[0]),
                hist=torch.from_numpy(users.astype(np.int64)),
                seed=int(rng.integers(0, 2**63)),
            )
        if self.needs_negatives:
            if self.compiled_sampler is not None:
                indptr, indices, seen = self.compiled_sampler
                negs, ok = triplet_kernel.draw_negatives(
                    users, indptr, indices, data.n_items, self.k, int(rng.integers(0, 2**63)), seen=seen
                )
            else:
                negs = sample_negatives(users, data.seen, self.k, rng, item_probs=data.item_probs)
                if self.use_explicit:
                    self._mix_explicit(users, negs, rng)
                ok = negs >= 0
            if not ok.all():
                keep = ok.any(1)
                queries, items, negs, ok = queries[keep], items[keep], negs[keep], ok[keep]
                if not ok.all():
                    valid_t = torch.from_numpy(ok).to(self.device)
                    negs = np.where(ok, negs, 0)
            negs_t = torch.from_numpy(negs.astype(np.int64)).to(self.device)
        return Chunk(
            users=torch.from_numpy(queries.astype(np.int64)).to(self.device),
            items=torch.from_numpy(items.astype(np.int64)).to(self.device),
            negs=negs_t,
            valid=valid_t,
            n_pairs=int(queries.shape[0]),
        )

    def _mix_explicit(self, users: np.ndarray, negs: np.ndarray, rng: np.random.Generator) -> None:
        """Overwrite the first slots of pairs whose user has dislikes with random dislikes."""
        dislikes = self.data.dislikes
        assert dislikes is not None
        n_disliked = self.dislike_lengths[users]
        n_explicit = np.full(users.shape[0], self.explicit_base, dtype=np.int64)
        if self.explicit_frac > 0:
            n_explicit += rng.random(users.shape[0]) < self.explicit_frac
        n_explicit[n_disliked == 0] = 0
        explicit = np.arange(self.k)[None, :] < n_explicit[:, None]
        rows = np.nonzero(explicit)[0]
        offsets = (rng.random(rows.size) * n_disliked[rows]).astype(np.int64)
        np.minimum(offsets, n_disliked[rows] - 1, out=offsets)
        negs[explicit] = dislikes.indices[dislikes.indptr[users[rows]] + offsets]


class CoLikedSource(NegativeSource):
    """Item-item mode: the pair ``(user, item)`` becomes ``(anchor item, co-liked item)``.

    The co-liked item is drawn uniformly among the user's other liked items, afresh in every
    chunk, vectorised through the liked CSR: an offset ``r`` uniform in ``[0, L - 1)`` of the
    user's ``L`` distinct liked items, and where ``r`` lands on the anchor, the segment's last item
    instead (each other item then has probability ``1 / (L - 1)``). Negatives are drawn for the
    user, as in two-tower mode. ``data`` must hold only users with at least two distinct liked
    items (:func:`co_liked_data`).
    """

    def __init__(
        self, data: TrainData, k: int, explicit_share: float, device: torch.device, needs_negatives: bool
    ):
        super().__init__(data, k, explicit_share, device, needs_negatives)
        self.liked = InteractionMatrix.from_pairs(data.user_num, data.item_num, data.n_users, data.n_items)

    def pairs(self, order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        users = self.data.user_num[order]
        anchors = self.data.item_num[order]
        indptr = self.liked.indptr
        start = indptr[users].astype(np.int64)
        length = indptr[users + 1].astype(np.int64) - start
        offset = (rng.random(users.shape[0]) * (length - 1)).astype(np.int64)
        np.minimum(offset, length - 2, out=offset)
        positives = self.liked.indices[start + offset]
        last = self.liked.indices[start + length - 1]
        positives = np.where(positives == anchors, last, positives)
        return users, anchors, positives


def co_liked_data(data: TrainData) -> TrainData:
    """``data`` restricted to the liked pairs of users with at least two distinct liked items: the
    pairs that have a co-liked item (item-item mode); the other pairs contribute nothing.

    Raises:
        DataError: no user liked two distinct items.
    """
    liked = InteractionMatrix.from_pairs(data.user_num, data.item_num, data.n_users, data.n_items)
    keep = liked.row_lengths()[data.user_num] >= 2
    if not keep.any():
        raise DataError(
            f"item-item training: none of the {data.n_pairs} liked pairs belongs to a user with two or "
            "more liked items, so there is no co-liked pair to learn from; use model.mode: two_tower, "
            "or a log where users like several items"
        )
    if keep.all():
        return data
    return replace(data, user_num=data.user_num[keep], item_num=data.item_num[keep])


def epoch_chunks(
    source: NegativeSource, order: np.ndarray, rng: np.random.Generator, chunk_pairs: int
) -> Iterator[Chunk]:
    """The chunks of one epoch of pairs ``order``, each prepared in a worker thread while the
    previous one trains (:class:`ChunkFeed` for a single epoch whose order is given).

    Chunks are drawn one after another from ``rng`` in one thread, so the draws do not depend on
    timing: the same generator state gives the same chunks.
    """
    feed = ChunkFeed(source, lambda _rng: order, rng, chunk_pairs)
    try:
        yield from feed.epoch(ahead=False)[1]
    finally:
        feed.close()


class ChunkFeed:
    """The chunks of epoch after epoch, drawn in one worker thread a chunk ahead of the step,
    across epoch boundaries: while the last chunk of an epoch trains, the worker draws the next
    epoch's order and its first chunk (:func:`epoch_chunks` starts each epoch with the step
    waiting for that first chunk: 10-15 ms an epoch on ml-latest-small, a fifth of its epoch).

    Every draw comes from ``rng`` in the same sequence as without the feed (the order, then the
    chunks, epoch after epoch, in one thread), so a fit is bit for bit the same. A draw made ahead
    for an epoch that is never trained is undone by :meth:`discard`, which puts ``rng`` back as it
    was; :meth:`rng_state` is the state a checkpoint records (before anything drawn ahead).

    Args:
        source: draws a chunk's negatives.
        epoch_order: draws an epoch's order of pairs from ``rng``.
        rng: the fit's generator (only the worker draws from it while the feed holds a draw).
        chunk_pairs: pairs per chunk.
    """

    def __init__(
        self,
        source: NegativeSource,
        epoch_order: Callable[[np.random.Generator], np.ndarray],
        rng: np.random.Generator,
        chunk_pairs: int,
    ):
        self.source, self.epoch_order, self.rng, self.chunk_pairs = source, epoch_order, rng, chunk_pairs
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: Future[tuple[dict, np.ndarray, Chunk]] | None = None

    def _pool_(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="negatives")
        return self._pool

    def _draw_start(self) -> tuple[dict, np.ndarray, Chunk]:
        state = self.rng.bit_generator.state
        order = self.epoch_order(self.rng)
        return state, order, self.source.chunk(order[: self.chunk_pairs], self.rng)

    def epoch(self, *, ahead: bool) -> tuple[np.ndarray, Iterator[Chunk]]:
        """The next epoch's order (int ``[m]``) and its chunks; with ``ahead`` the epoch after it
        is started once this one's last chunk is drawn."""
        pool = self._pool_()
        start = self._ahead if self._ahead is not None else pool.submit(self._draw_start)
        self._ahead = None
        _, order, _ = start.result()
        return order, self._chunks(start, order, ahead)

    def _chunks(self, start: Future, order: np.ndarray, ahead: bool) -> Iterator[Chunk]:
        pool = self._pool_()
        starts = list(range(0, order.shape[0], self.chunk_pairs))
        pending: Future = start
        for i in range(len(starts)):
            current = pending.result()
            nxt = i + 1
            if nxt < len(starts):
                pending = pool.submit(
                    self.source.chunk, order[starts[nxt] : starts[nxt] + self.chunk_pairs], self.rng
                )
            elif ahead:
                self._ahead = pool.submit(self._draw_start)
            yield current[2] if i == 0 else current

    def rng_state(self) -> dict:
        """``rng``'s state as it would be without anything drawn ahead."""
        if self._ahead is not None:
            return self._ahead.result()[0]
        return self.rng.bit_generator.state

    def discard(self) -> None:
        """Undo a draw made ahead (the epoch it was for will not be trained this way)."""
        if self._ahead is not None:
            state = self._ahead.result()[0]
            self._ahead = None
            self.rng.bit_generator.state = state

    def close(self) -> None:
        """Undo any draw made ahead and stop the worker thread."""
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
