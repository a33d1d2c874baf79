"""Liked / unliked labels, negative sampling, and ``(user, liked item, unliked item)`` triplets.

The stage between the split and the model:

- :func:`label_interactions` adds ``label`` (1 liked, 0 neutral, -1 explicitly unliked).
- :func:`sample_negatives` draws items a user never interacted with, vectorised; the trainer calls it
  every epoch, ``build_triplets`` once for ``triplets.parquet``.
- :func:`build_triplets` pairs every liked ``(user, item)`` with ``k`` unliked items, explicit dislikes
  first, and :func:`write_triplets` stores them with external ids.

Everything here works on dense numbers (``user_num``, ``item_num``); external ids appear only in the
file that :func:`write_triplets` writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys_metric.config import LabelConfig, TripletConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import DataError

Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)

LIKED: int = 1
NEUTRAL: int = 0
UNLIKED: int = -1

SOURCE_SAMPLED: int = 0
SOURCE_EXPLICIT: int = 1
NEGATIVE_SOURCE = pl.Enum(["sampled", "explicit"])
"""Dtype of ``negative_source`` in ``triplets.parquet``; the physical code equals ``TripletArrays.source``."""

# Cost of one redraw (membership test, 0.1-2 us here depending on locality) in units of one catalogue
# item in the exact per-user draw (~4 ns here).
_EXACT_TO_MEMBERSHIP_COST = 64.0

# Guide-table buckets per catalogue item for weighted draws: more buckets, fewer scan steps.
_GUIDE_BUCKETS_PER_ITEM = 4

# Order of the rows of one (user, item) pair when building triplets, indexed by the label's byte:
# liked (1) first, then disliked (-1 = 255), then anything else.
_LABEL_RANK = np.full(256, 2, dtype=np.uint8)
_LABEL_RANK[LIKED] = 0
_LABEL_RANK[UNLIKED & 0xFF] = 1
# Largest n_users * n_items whose keys leave two low bits for the label rank in an int64.
_MAX_PACKED_PAIR = 2**61
# Elements per block for element-wise work on big arrays. Every whole-array temporary is fresh memory,
# and first touching a page costs ~2 us here (a VM): 1 GB of temporaries is ~0.5 s of system time.
# Blocks of 2^20 keep temporaries at 8 MB, which the allocator reuses and the cache holds.
_BLOCK = 1 << 20


def label_interactions(frame: Frame, config: LabelConfig) -> Frame:
    """Add ``label`` (Int8): 1 liked, -1 explicitly unliked, 0 neutral.

    Per row, the first rule that applies:

    1. ``rating`` not null: ``rating >= like_threshold`` -> 1, ``rating <= dislike_threshold`` -> -1,
       strictly between -> 0 (both thresholds inclusive).
    2. ``event`` not null: in ``liked_events`` -> 1, in ``disliked_events`` -> -1, any other event -> 0.
       Matching ignores case on both sides.
    3. Neither signal on the row (no such columns, or both null): 1. An interaction without a rating or
       an event is implicit feedback, the same rule as a log that has neither column.

    Args:
        frame: canonical interactions (DataFrame or LazyFrame); ``rating`` numeric and ``event`` String
            when present. An existing ``label`` column is replaced.
        config: thresholds and event sets.

    Returns:
        The same kind of frame with ``label`` appended.

    Raises:
        DataError: ``rating`` is not numeric.
    """
    schema = frame.collect_schema()
    if (
        isinstance(frame, pl.DataFrame)
        and "event" not in schema
        and schema.get("rating") in (pl.Float32, pl.Float64)
    ):
        return frame.with_columns(_rating_labels(frame.get_column("rating"), config))
    liked = pl.lit(LIKED, dtype=pl.Int8)
    unliked = pl.lit(UNLIKED, dtype=pl.Int8)
    neutral = pl.lit(NEUTRAL, dtype=pl.Int8)
    label: pl.Expr = liked
    if "event" in schema:
        event = pl.col("event").cast(pl.String).str.to_lowercase()
        liked_events = sorted({e.lower() for e in config.liked_events})
        disliked_events = sorted({e.lower() for e in config.disliked_events})
        label = (
            pl.when(event.is_null())
            .then(label)
            .when(event.is_in(liked_events))
            .then(liked)
            .when(event.is_in(disliked_events))
            .then(unliked)
            .otherwise(neutral)
        )
    if "rating" in schema:
        if not schema["rating"].is_numeric():
            raise DataError(
                f"column rating has dtype {schema['rating']}, expected a number: "
                "cast it to Float32 (validation does) before labelling"
            )
        # NaN compares above every number in polars; a NaN rating carries no signal, like null.
        rating = pl.col("rating").cast(pl.Float64).fill_nan(None)
        label = (
            pl.when(rating.is_null())
            .then(label)
            .when(rating >= config.like_threshold)
            .then(liked)
            .when(rating <= config.dislike_threshold)
            .then(unliked)
            .otherwise(neutral)
        )
    return frame.with_columns(label.cast(pl.Int8).alias("label"))


def _rating_labels(rating: pl.Series, config: LabelConfig) -> pl.Series:
    """``label`` from a float ``rating`` column alone: the rating rule of :func:`label_interactions`.

    The same answer as the polars expression (which compares in float64 after turning NaN into
    null) from three numpy passes over the column, without a float64 copy: on 20M rows the
    expression allocated 700 MB of temporaries here. Comparing in the column's own precision is
    exact with the thresholds rounded outwards to it (see :func:`_float_bound`).
    """
    dtype = np.dtype(np.float32 if rating.dtype == pl.Float32 else np.float64)
    like = _float_bound(config.like_threshold, dtype, up=True)
    dislike = _float_bound(config.dislike_threshold, dtype, up=False)
    label = np.empty(rating.len(), dtype=np.int8)
    start = 0
    # Chunk by chunk: to_numpy() of a column read from many row groups copies all of it.
    for chunk in rating.get_chunks():
        x = chunk.to_numpy()
        liked = np.greater_equal(x, like)
        unliked = np.less_equal(x, dislike)
        if not like > dislike:
            # Overlapping thresholds: the like rule comes first.
            unliked &= ~liked
        out = label[start : start + x.size]
        start += x.size
        np.subtract(liked.view(np.int8), unliked.view(np.int8), out=out)
        # NaN (and null, which to_numpy gives as NaN) fails both comparisons: 0 + 1 = liked, as for a
        # row without a rating.
        out += np.isnan(x).view(np.int8)
    return pl.Series("label", label, dtype=pl.Int8)


def _float_bound(threshold: float, dtype: np.dtype, *, up: bool) -> np.floating:
    """The float of ``dtype`` nearest ``threshold`` on one side: the smallest value ``>= threshold``
    (``up``) or the largest ``<= threshold``.

    For ``x`` of ``dtype``, ``x >= bound_up`` exactly when ``float(x) >= threshold``, and
    ``x <= bound_down`` exactly when ``float(x) <= threshold``, so comparisons need no float64 copy.
    """
    kind = np.dtype(dtype).type
    with np.errstate(over="ignore"):
        bound = kind(threshold)
    if up and float(bound) < threshold:
        bound = np.nextafter(bound, kind(np.inf))
    elif not up and float(bound) > threshold:
        bound = np.nextafter(bound, kind(-np.inf))
    return bound


def popularity_probs(item_nums: np.ndarray, n_items: int, alpha: float) -> np.ndarray:
    """Popularity distribution for negative sampling: ``P(i)`` proportional to ``(count_i + 1) ** alpha``.

    The ``+ 1`` is a floor: an item nobody touched in training would otherwise get probability 0 and
    could never serve as a negative, so the model would never push it away from anyone. With it, such
    an item is drawn as often as an item seen once. ``alpha = 0`` is uniform, ``alpha = 1`` is
    proportional to (smoothed) counts; word2vec uses 0.75.

    Args:
        item_nums: int ``[n]`` item numbers in ``[0, n_items)``, one per interaction (repeats count).
        n_items: catalogue size.
        alpha: exponent, ``>= 0``.

    Returns:
        float64 ``[n_items]``, sums to 1.
    """
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    if not alpha >= 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    items = np.asarray(item_nums)
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item numbers must lie in [0, {n_items})")
    counts = np.bincount(items.astype(np.intp, copy=False), minlength=n_items).astype(np.float64)
    weights = (counts + 1.0) ** alpha
    return weights / weights.sum()


class _ItemSampler:
    """Draws item numbers uniformly or by fixed probabilities.

    Weighted draws invert the cumulative distribution with a guide table (Chen & Asau's indexed
    search): bucket ``b`` of ``G`` equal slices of ``[0, 1)`` stores the first item whose cumulative
    probability exceeds ``b / G``, so a draw starts there and scans forward a step or two. On this
    machine that is ~3x faster than ``np.searchsorted`` over the full cumulative sum for 12M draws.
    """

    def __init__(self, n_items: int, probs: np.ndarray | None):
        self.n_items = n_items
        self.probs: np.ndarray | None = None
        self._top_mass: np.ndarray | None = None
        if probs is None:
            return
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (n_items,):
            raise ValueError(f"item_probs has shape {p.shape}, expected ({n_items},)")
        if not np.all(np.isfinite(p)) or p.min() < 0.0:
            raise ValueError("item_probs must be finite and non-negative")
        total = p.sum()
        if not total > 0.0:
            raise ValueError("item_probs sums to 0: no item can be drawn")
        self.probs = p / total
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        self.cdf = cdf
        self.n_buckets = min(_GUIDE_BUCKETS_PER_ITEM * n_items, 2**31 - 1)
        edges = np.arange(self.n_buckets, dtype=np.float64) / self.n_buckets
        self.guide = np.searchsorted(cdf, edges, side="right").astype(np.int32)

    def top_mass(self) -> np.ndarray:
        """float64 ``[n_items + 1]``: entry ``L`` is the total probability of the ``L`` likeliest items
        (weighted samplers only)."""
        if self._top_mass is None:
            self._top_mass = np.r_[0.0, np.cumsum(np.sort(self.probs)[::-1])]
        return self._top_mass

    def draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        """int32 item numbers of the given shape."""
        if self.probs is None:
            return rng.integers(0, self.n_items, size=size, dtype=np.int32)
        x = rng.random(size)
        bucket = (x * self.n_buckets).astype(np.intp)
        np.minimum(bucket, self.n_buckets - 1, out=bucket)
        idx = self.guide[bucket]
        flat_idx = idx.reshape(-1)
        flat_x = x.reshape(-1)
        active = np.flatnonzero(self.cdf[flat_idx] <= flat_x)
        while active.size:
            flat_idx[active] += 1
            active = active[self.cdf[flat_idx[active]] <= flat_x[active]]
        return idx

    def draw_from(self, rng: np.random.Generator, candidates: np.ndarray, size: int) -> np.ndarray:
        """``size`` draws from ``candidates`` (int item numbers), renormalised; empty -> ``-1``s."""
        if self.probs is not None:
            candidates = candidates[self.probs[candidates] > 0.0]
        if candidates.size == 0:
            return np.full(size, -1, dtype=np.int32)
        if self.probs is None:
            return candidates[rng.integers(0, candidates.size, size=size)].astype(np.int32)
        cdf = np.cumsum(self.probs[candidates])
        pos = np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right")
        return candidates[np.minimum(pos, candidates.size - 1)].astype(np.int32)


def _sort_keys(keys: np.ndarray, key_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of int64 keys in ``[0, key_limit)``: ``(sorted keys, their rows)``, both int64 ``[n]``.

    The row number is packed into the low bits so that one single-threaded polars sort of int64
    (0.3-0.45 s for 16M keys here, random or presorted; numpy's sort 1.3 s, a stable argsort 2.7 s
    on random keys) gives both, ties in row order.
    """
    n = keys.size
    row_bits = max(int(n - 1).bit_length(), 1)
    if n and int(max(key_limit - 1, 1)).bit_length() + row_bits <= 63:
        packed = keys << row_bits
        packed |= np.arange(n, dtype=np.int64)
        packed = pl.Series(packed).sort(multithreaded=False).to_numpy()
        return packed >> row_bits, packed & np.int64((1 << row_bits) - 1)
    order = np.argsort(keys, kind="stable")
    return keys[order], order


def _user_order(users: np.ndarray, n_users: int) -> tuple[np.ndarray | None, np.ndarray]:
    """A permutation that sorts ``users`` stably (or None when already sorted) and the sorted int64 users.

    Membership tests binary-search a key array of ``nnz`` int64; in random user order every probe is a
    cache miss (~20 s for 12M queries against 20M keys here), in user order they hit the same few
    lines (~1 s). Sorting is cheaper than the misses it saves.
    """
    if users.size < 2 or bool(np.all(users[1:] >= users[:-1])):
        return None, users.astype(np.int64)
    sorted_users, order = _sort_keys(users.astype(np.int64), n_users)
    return order, sorted_users


def sample_negatives(
    user_nums: np.ndarray,
    seen: InteractionMatrix,
    k: int,
    rng: np.random.Generator,
    *,
    item_probs: np.ndarray | None = None,
    max_retries: int = 20,
) -> np.ndarray:
    """Draw ``k`` items per row that the row's user never interacted with.

    Draws are uniform over the catalogue (``item_probs`` None) or follow ``item_probs``, conditioned
    on not being in ``seen.row(user)``. Draws that hit a seen item are redrawn, vectorised, for up to
    ``max_retries`` rounds; the few left (users who touched most of the catalogue) are drawn exactly
    from the user's complement, one user at a time. The ``k`` draws of a row are independent, so they
    can repeat when the complement is small.

    Args:
        user_nums: int ``[n]`` user numbers in ``[0, seen.n_users)``, any order, repeats allowed.
        seen: every item each user interacted with in training, any label.
        k: draws per row, ``>= 0``.
        rng: the only source of randomness: the same generator state gives the same result.
        item_probs: float ``[seen.n_items]`` non-negative weights (normalised here), e.g. from
            :func:`popularity_probs`; items with weight 0 are never drawn.
        max_retries: vectorised redraw rounds before the exact per-user fallback, ``>= 0``.

    Returns:
        int32 ``[n, k]`` item numbers. ``-1`` where the user has no eligible item (saw the whole
        catalogue, or every unseen item has weight 0); callers drop those rows.
    """
    users = np.asarray(user_nums)
    if users.ndim != 1:
        raise ValueError(f"user_nums must be 1-D, got shape {users.shape}")
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise ValueError(f"user_nums must be integers, got {users.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if users.size and (users.min() < 0 or users.max() >= seen.n_users):
        raise ValueError(f"user numbers must lie in [0, {seen.n_users})")
    n = users.shape[0]
    sampler = _ItemSampler(seen.n_items, item_probs)
    if n == 0 or k == 0:
        return np.empty((n, k), dtype=np.int32)
    if seen.n_items == 0:
        return np.full((n, k), -1, dtype=np.int32)

    order, sorted_users = _user_order(users, seen.n_users)
    draws = sampler.draw(rng, (n, k))
    if k == 1:
        hit = seen.contains(sorted_users, draws.reshape(n)).reshape(n, 1)
    else:
        hit = seen.contains(sorted_users, draws)
    rows, cols = np.nonzero(hit)
    if rows.size:
        exact = _rejection_too_costly(sorted_users[rows], seen, sampler, max_retries)
        if exact.any():
            _draw_exact(draws, rows[exact], cols[exact], sorted_users, seen, sampler, rng)
            rows, cols = rows[~exact], cols[~exact]
    for _ in range(max_retries):
        if rows.size == 0:
            break
        redraw = sampler.draw(rng, rows.size)
        draws[rows, cols] = redraw
        still = seen.contains(sorted_users[rows], redraw)
        rows, cols = rows[still], cols[still]
    if rows.size:
        _draw_exact(draws, rows, cols, sorted_users, seen, sampler, rng)
    if order is None:
        return draws
    out = np.empty_like(draws)
    out[order] = draws
    return out


def _seen_mass(user_nums: np.ndarray, seen: InteractionMatrix, sampler: _ItemSampler) -> np.ndarray:
    """float64 ``[len(user_nums)]``: probability that one draw hits an item the user has seen."""
    lengths = seen.indptr[user_nums + 1] - seen.indptr[user_nums]
    if sampler.probs is None:
        return lengths / seen.n_items
    mass = np.zeros(lengths.size, dtype=np.float64)
    nonempty = lengths > 0
    if not nonempty.any():
        return mass
    # Concatenate the users' CSR segments: position j of segment s is indptr[u_s] + j.
    seg_starts = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_starts[1:])
    positions = np.arange(int(lengths.sum()), dtype=np.int64)
    positions += np.repeat(seen.indptr[user_nums] - seg_starts, lengths)
    mass[nonempty] = np.add.reduceat(sampler.probs[seen.indices[positions]], seg_starts[nonempty])
    return mass


def _rejection_too_costly(
    pending_users: np.ndarray, seen: InteractionMatrix, sampler: _ItemSampler, max_retries: int
) -> np.ndarray:
    """bool per pending slot: draw it exactly now instead of by rejection.

    A user whose seen items carry mass ``q`` of the sampling distribution needs ``1 / (1 - q)`` draws
    per slot by rejection, each costing a membership test, against one pass over the catalogue for
    the exact draw (``_EXACT_TO_MEMBERSHIP_COST``). Users for whom rejection would cost more, or would
    still have slots pending after ``max_retries`` rounds, go to the exact draw at once. This keeps a
    heavy user (a bot that touched 99% of the catalogue, with as many liked pairs) from dragging
    millions of slots through every round.
    """
    # pending_users is sorted (slots come row-major from sorted users), so users form runs.
    starts = np.flatnonzero(np.r_[True, pending_users[1:] != pending_users[:-1]])
    counts = np.diff(np.r_[starts, pending_users.size])
    users = pending_users[starts]
    # With c pending slots and seen mass q: rejection costs more when c / (1 - q) * COST >= n_items,
    # and leaves slots after max_retries rounds when c * q**max_retries >= 0.5. Both mean q >= threshold.
    threshold = 1.0 - counts * (_EXACT_TO_MEMBERSHIP_COST / seen.n_items)
    if max_retries > 0:
        threshold = np.minimum(threshold, (0.5 / counts) ** (1.0 / max_retries))
    else:
        threshold[:] = 0.0
    exact = np.zeros(users.size, dtype=bool)
    if sampler.probs is None:
        exact = _seen_mass(users, seen, sampler) >= threshold
    else:
        # The mass of a user's L seen items is at most that of the L most likely items: only users
        # whose bound reaches the threshold need their segments summed.
        lengths = seen.indptr[users + 1] - seen.indptr[users]
        candidates = np.flatnonzero(sampler.top_mass()[lengths] + 1e-9 >= threshold)
        if candidates.size:
            exact[candidates] = _seen_mass(users[candidates], seen, sampler) >= threshold[candidates]
    return np.repeat(exact, counts)


def _draw_exact(
    draws: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    sorted_users: np.ndarray,
    seen: InteractionMatrix,
    sampler: _ItemSampler,
    rng: np.random.Generator,
) -> None:
    """Fill ``draws[rows, cols]`` from each user's complement; ``rows`` index the sorted users."""
    pending_users = sorted_users[rows]
    # np.nonzero yields rows ascending and sorted_users is sorted, so each user's slots are contiguous.
    starts = np.flatnonzero(np.r_[True, pending_users[1:] != pending_users[:-1]])
    ends = np.r_[starts[1:], pending_users.size]
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        unseen = np.ones(seen.n_items, dtype=bool)
        unseen[seen.row(int(pending_users[start]))] = False
        draws[rows[start:end], cols[start:end]] = sampler.draw_from(rng, np.flatnonzero(unseen), end - start)


@dataclass(frozen=True)
class TripletArrays:
    """``(user, liked item, unliked item)`` triplets over dense numbers.

    Attributes:
        user_num: int32 ``[m]``.
        liked_num: int32 ``[m]`` item the user liked.
        unliked_num: int32 ``[m]`` item used as the negative.
        source: int8 ``[m]``: 1 explicit dislike of the user, 0 sampled from items the user never
            interacted with.
        n_dropped: triplets left out because the user had no eligible negative (``sample_negatives``
            returned -1: the user interacted with the whole catalogue).
    """

    user_num: np.ndarray
    liked_num: np.ndarray
    unliked_num: np.ndarray
    source: np.ndarray
    n_dropped: int = 0

    def __post_init__(self) -> None:
        m = self.user_num.shape
        for name in ("liked_num", "unliked_num", "source"):
            if getattr(self, name).shape != m:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, user_num has {m}")

    def __len__(self) -> int:
        return int(self.user_num.shape[0])


def _explicit_slots(share: float, k: int) -> tuple[int, float]:
    """``(floor(share*k), frac(share*k))``, with float noise such as ``0.1 * 10`` snapped to integers."""
    expected = share * k
    nearest = round(expected)
    if math.isclose(expected, nearest, rel_tol=0.0, abs_tol=1e-9):
        return int(nearest), 0.0
    base = math.floor(expected)
    return base, expected - base


def _pair_firsts(
    users: np.ndarray, items: np.ndarray, labels: np.ndarray, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``(user, item)`` pairs of the rows, how each is labelled, and the first liked rows.

    Rows of a pair are ordered liked first, then disliked, then the rest, and by row number within
    a label; one sort of ``(key, label rank, row)`` gives every pair's first row in that order.

    Returns:
        ``(keys, ranks, first_liked)``: int64 ``[n_pairs]`` sorted distinct ``user * n_items + item``;
        uint8 ``[n_pairs]`` label rank of the pair's first row (0: the pair is liked on some row, 1:
        disliked and never liked, 2: neither); bool ``[n]``, True at the first liked row of each pair.
    """
    n = users.size
    if labels.dtype == np.int8:
        ranks = _LABEL_RANK[labels.view(np.uint8)]
    else:
        ranks = np.where(labels == LIKED, 0, np.where(labels == UNLIKED, 1, 2)).astype(np.uint8)
    first_liked = np.zeros(n, dtype=bool)
    row_bits = max(int(n - 1).bit_length(), 1)
    if (
        n == 0
        or n_users * n_items > _MAX_PACKED_PAIR
        or (n_users * n_items * 4 - 1).bit_length() + row_bits > 63
    ):
        keys = users.astype(np.int64) * n_items + items
        order = np.lexsort((ranks, keys))
        sorted_keys = keys[order]
        new_pair = np.ones(n, dtype=bool)
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new_pair[1:])
        starts = order[np.flatnonzero(new_pair)]
        first_ranks = ranks[starts]
        first_liked[starts[first_ranks == 0]] = True
        return keys[starts], first_ranks, first_liked
    # Pack (key, rank, row) into one int64 so that one single-threaded polars sort orders the rows
    # (see _sort_keys). Block-wise arithmetic keeps the temporaries small (see _BLOCK).
    packed = np.empty(n, dtype=np.int64)
    for lo, hi in _blocks(n):
        block = packed[lo:hi]
        np.multiply(users[lo:hi], n_items, out=block, dtype=np.int64)
        block += items[lo:hi]
        block <<= 2
        block |= ranks[lo:hi]
        block <<= row_bits
        block |= np.arange(lo, hi, dtype=np.int64)
    del ranks
    unsorted, packed = packed, pl.Series(packed).sort(multithreaded=False).to_numpy()
    key_shift = row_bits + 2
    new_pair = np.empty(n, dtype=bool)
    new_pair[0] = True
    for lo, hi in _blocks(n - 1):
        np.greater_equal(
            packed[lo + 1 : hi + 1] ^ packed[lo:hi], 1 << key_shift, out=new_pair[lo + 1 : hi + 1]
        )
    n_pairs = int(np.count_nonzero(new_pair))
    # The unsorted keys are no longer needed and their pages are already mapped: reuse them.
    pair_keys = unsorted[:n_pairs]
    del unsorted
    first_ranks = np.empty(n_pairs, dtype=np.uint8)
    done = 0
    for lo, hi in _blocks(n):
        firsts = packed[lo:hi][new_pair[lo:hi]]
        block_ranks = first_ranks[done : done + firsts.size]
        np.right_shift(firsts, key_shift, out=pair_keys[done : done + firsts.size])
        block_ranks[:] = (firsts >> row_bits) & 3
        first_liked[firsts[block_ranks == 0] & ((1 << row_bits) - 1)] = True
        done += firsts.size
    return pair_keys, first_ranks, first_liked


def _take(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``table[indices]`` block by block: numpy copies int32 indices to int64 before a gather."""
    out = np.empty(indices.shape[0], dtype=table.dtype)
    for lo, hi in _blocks(indices.shape[0]):
        np.take(table, indices[lo:hi], out=out[lo:hi])
    return out


def _blocks(n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` bounds of consecutive blocks of ``_BLOCK`` elements covering ``range(n)``."""
    return [(lo, min(lo + _BLOCK, n)) for lo in range(0, n, _BLOCK)]


def build_triplets(train: pl.DataFrame, n_users: int, n_items: int, config: TripletConfig) -> TripletArrays:
    """Pair every liked ``(user, item)`` of ``train`` with ``k`` unliked items.

    ``k = config.negatives_per_positive``. For a user with explicit dislikes, the first
    ``floor(explicit_share * k)`` slots (plus one more with probability ``frac(explicit_share * k)``)
    take an item drawn uniformly from the user's disliked items; the remaining slots are sampled with
    :func:`sample_negatives` among items the user never interacted with in ``train`` (any label),
    uniformly or by :func:`popularity_probs` of the item counts over all ``train`` rows.

    A pair liked on several rows counts once (first row). A pair that is both liked and disliked in
    ``train`` (the user changed their mind) stays liked and is never used as a negative: a triplet
    ``(u, i, i)`` would teach nothing.

    Args:
        train: training interactions with ``user_num``, ``item_num`` (ints in ``[0, n_users)``,
            ``[0, n_items)``) and ``label`` (1, 0, -1); other columns are ignored.
        n_users: user vocabulary size.
        n_items: item vocabulary size.
        config: k, explicit share, sampling, seed.

    Returns:
        Triplets ordered by liked pair (first occurrence in ``train``) then slot, explicit slots first.
        The same ``config.seed`` and input give identical arrays. Rows whose sampled negative is -1 are
        dropped and counted in ``n_dropped``.

    Raises:
        DataError: a required column is missing or holds nulls.
    """
    missing = [c for c in ("user_num", "item_num", "label") if c not in train.columns]
    if missing:
        raise DataError(
            f"training interactions ({train.height} rows) lack column(s) {missing}: "
            "encode ids with the vocabularies and run label_interactions first"
        )
    with_nulls = [c for c in ("user_num", "item_num", "label") if train[c].null_count()]
    if with_nulls:
        raise DataError(
            f"training interactions ({train.height} rows) have nulls in {with_nulls}: "
            "drop or quarantine those rows before building triplets"
        )
    rng = np.random.default_rng(config.seed)
    k = config.negatives_per_positive
    users = train["user_num"].to_numpy().astype(np.int32, copy=False)
    items = train["item_num"].to_numpy().astype(np.int32, copy=False)
    labels = train["label"].to_numpy()
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"user numbers must lie in [0, {n_users})")
    if items.size and (items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"item numbers must lie in [0, {n_items})")

    # One sort serves every structure below: the seen matrix (distinct pairs), the first liked row of
    # each pair and the pairs disliked but never liked.
    pair_keys, first_rank, first_liked = _pair_firsts(users, items, labels, n_users, n_items)
    seen = InteractionMatrix.from_sorted_keys(pair_keys, n_users, n_items)
    dislikes = InteractionMatrix.from_sorted_keys(pair_keys[first_rank == 1], n_users, n_items)
    del pair_keys, first_rank

    liked_users = users[first_liked]
    liked_items = items[first_liked]
    del first_liked
    m = liked_users.shape[0]

    n_disliked = _take(dislikes.row_lengths().astype(np.int32), liked_users)
    base, frac = _explicit_slots(config.explicit_share, k)
    n_explicit = np.full(m, base, dtype=np.int32)
    if frac > 0.0:
        # Block-wise draws give the same stream as one rng.random(m) without an [m] float64 temporary.
        for lo, hi in _blocks(m):
            n_explicit[lo:hi] += rng.random(hi - lo) < frac
    n_explicit[n_disliked == 0] = 0
    explicit = np.arange(k, dtype=np.int32)[None, :] < n_explicit[:, None]
    del n_explicit

    negatives = np.empty((m, k), dtype=np.int32)
    explicit_slots = np.flatnonzero(explicit)
    explicit_rows = explicit_slots if k == 1 else explicit_slots // k
    del explicit_slots
    explicit_negatives = np.empty(explicit_rows.size, dtype=np.int32)
    for lo, hi in _blocks(explicit_rows.size):
        rows = explicit_rows[lo:hi]
        n_options = n_disliked[rows]
        offsets = (rng.random(hi - lo) * n_options).astype(np.int64)
        np.minimum(offsets, n_options - 1, out=offsets)
        offsets += dislikes.indptr[liked_users[rows]]
        explicit_negatives[lo:hi] = dislikes.indices[offsets]
    negatives[explicit] = explicit_negatives
    del explicit_rows, explicit_negatives, n_disliked

    sampled = ~explicit
    item_probs = (
        popularity_probs(items, n_items, config.popularity_alpha) if config.sampling == "popularity" else None
    )
    sampled_users = np.broadcast_to(liked_users[:, None], (m, k))[sampled]
    negatives[sampled] = sample_negatives(
        sampled_users, seen, 1, rng, item_probs=item_probs, max_retries=config.max_retries
    )[:, 0]

    unliked = negatives.reshape(-1)
    source = explicit.reshape(-1).view(np.int8)
    user_num = liked_users if k == 1 else np.repeat(liked_users, k)
    liked_num = liked_items if k == 1 else np.repeat(liked_items, k)
    keep = unliked >= 0
    n_dropped = int(keep.size - np.count_nonzero(keep))
    if n_dropped:
        user_num, liked_num, unliked, source = user_num[keep], liked_num[keep], unliked[keep], source[keep]
    return TripletArrays(
        user_num=user_num, liked_num=liked_num, unliked_num=unliked, source=source, n_dropped=n_dropped
    )


def _as_id_series(ids: Any, name: str, needed: int) -> pl.Series:
    series = ids if isinstance(ids, pl.Series) else pl.Series(np.asarray(ids))
    if series.len() < needed:
        raise ValueError(f"{name} has {series.len()} ids but the triplets use numbers up to {needed - 1}")
    return series


def write_triplets(triplets: TripletArrays, user_ids: Any, item_ids: Any, path: str | Path) -> Path:
    """Write ``triplets.parquet``: ``user_id, liked_item_id, unliked_item_id, negative_source``.

    ``negative_source`` is an Enum ``["sampled", "explicit"]`` (a dictionary-encoded string in
    Parquet: readers see the words, the file stores one small code per row). The file is written
    next to ``path`` and renamed over it, so a reader never sees half a file. The Parquet key-value
    metadata carries ``n_dropped``.

    Args:
        triplets: from :func:`build_triplets`.
        user_ids: array-like (``pl.Series`` or numpy) with the external user id at position
            ``user_num``, e.g. ``Vocabulary.ids()``.
        item_ids: the same for items.
        path: output file.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    n = len(triplets)
    max_user = int(triplets.user_num.max()) + 1 if n else 0
    max_item = int(max(triplets.liked_num.max(), triplets.unliked_num.max())) + 1 if n else 0
    users = _as_id_series(user_ids, "user_ids", max_user)
    items = _as_id_series(item_ids, "item_ids", max_item)
    frame = pl.DataFrame(
        [
            users.gather(triplets.user_num).alias("user_id"),
            items.gather(triplets.liked_num).alias("liked_item_id"),
            items.gather(triplets.unliked_num).alias("unliked_item_id"),
            pl.Series(NEGATIVE_SOURCE.categories, dtype=NEGATIVE_SOURCE)
            .gather(triplets.source)
            .alias("negative_source"),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # pyarrow with lz4, no statistics and a dictionary for negative_source only: 0.5 s of CPU for
        # 9M triplets here, against 0.7 s for polars' lz4 writer (which dictionary-encodes the item
        # ids by hashing them) and 1.2 s for its default zstd with statistics; the file is 25% larger.
        table = frame.to_arrow()
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), b"n_dropped": str(triplets.n_dropped).encode()}
        )
        pq.write_table(
            table, tmp, compression="lz4", use_dictionary=["negative_source"], write_statistics=False
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _count_distinct(values: np.ndarray) -> int:
    if values.size == 0:
        return 0
    # A sort beats np.unique (numpy 2.4's hash-based unique is ~15x slower here), and a single-threaded
    # polars sort beats np.sort (0.2 s vs 0.6 s for 9M int64).
    s = pl.Series(values).sort(multithreaded=False).to_numpy()
    changes = 0
    for lo, hi in _blocks(s.size - 1):
        changes += int(np.count_nonzero(s[lo + 1 : hi + 1] != s[lo:hi]))
    return changes + 1


def _count_present(nums: np.ndarray) -> int:
    """Distinct values among non-negative ints; a bitmap (bincount would copy them to int64 first)."""
    if nums.size == 0:
        return 0
    if int(nums.min()) < 0:
        return int(np.count_nonzero(np.bincount(nums)))  # raises bincount's error for negatives
    present = np.zeros(int(nums.max()) + 1, dtype=bool)
    for lo, hi in _blocks(nums.size):
        present[nums[lo:hi]] = True
    return int(np.count_nonzero(present))


def triplet_stats(triplets: TripletArrays) -> dict[str, int | float]:
    """Counts for reports and ``inspect-data``.

    Returns:
        ``n_triplets``, ``n_explicit``, ``n_sampled``, ``explicit_fraction``, ``n_users``,
        ``n_liked_pairs``, ``n_liked_items``, ``n_unliked_items``, ``negatives_per_pair`` (mean),
        ``n_dropped``.
    """
    n = len(triplets)
    n_explicit = int(np.count_nonzero(triplets.source == SOURCE_EXPLICIT))
    n_item_keys = int(max(triplets.liked_num.max(), triplets.unliked_num.max())) + 1 if n else 1
    pair_keys = triplets.user_num.astype(np.int64)
    pair_keys *= n_item_keys
    pair_keys += triplets.liked_num
    n_pairs = _count_distinct(pair_keys)
    return {
        "n_triplets": n,
        "n_explicit": n_explicit,
        "n_sampled": n - n_explicit,
        "explicit_fraction": n_explicit / n if n else 0.0,
        "n_users": _count_present(triplets.user_num),
        "n_liked_pairs": n_pairs,
        "n_liked_items": _count_present(triplets.liked_num),
        "n_unliked_items": _count_present(triplets.unliked_num),
        "negatives_per_pair": n / n_pairs if n_pairs else 0.0,
        "n_dropped": int(triplets.n_dropped),
    }
