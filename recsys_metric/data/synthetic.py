"""Synthetic interaction logs with a known latent structure.

The log is built so that a metric-learning recommender can learn it and a popularity ranking
cannot:

- ``C`` taste clusters with unit centres ``c_k`` in a ``D``-dim latent space; item ``i`` belongs
  to one cluster and has the unit vector ``v_i = normalize(c_k + noise)``; items have a Zipf-like
  popularity weight ``pi_i = rank_i ** -a`` independent of their cluster.
- A user mixes 1-3 clusters with weights ``w_u`` (how often each is visited) and has a personal
  taste direction ``p_u`` (which items inside a cluster they prefer). User activity is
  Pareto-distributed (power law) and each user is active over a span of the time window.
- Each event is drawn as: with ``popular_share`` an item from global popularity, with
  ``random_share`` a uniform item, else a cluster from the user's mixture (drifting slowly with
  time when ``drift > 0``), then ``N_CANDIDATES`` candidates from that cluster's distribution
  ``pi_i ** 0.75 * exp(c_k . v_i / 0.1)`` and one of them kept with probability
  ``softmax(p_u . v_i / T)`` (sampling-importance-resampling of the per-user softmax, never a
  softmax over all items).
- Ratings 1-5 round ``2.55 + b_u + b_i + 3 (a_ui - 0.5) + p_u . v_i + 0.6 eps``, where the
  affinity ``a_ui = (c_{k_i} . v_i) * max over the user's clusters k of (c_k . c_{k_i})`` is about
  0.85 on the user's own clusters and about 0 elsewhere: events off the user's clusters (mostly
  the popular and random ones) are the explicit dislikes.
- Item features: ``category`` (the cluster, replaced by a random one for ``category_noise`` of
  items), a log-normal ``price`` whose centre depends on the cluster, and 2-4 ``tags`` preferring
  the cluster's own tags: a cold item can be placed by its features.

Every random number is a pure function of ``(seed, stream, index)`` (counter-based Philox ranges,
SplitMix64 for scattered redraws): a user's events depend only on that user, so any chunking of
users gives the same rows, and :func:`write_log` (chunked Parquet parts) equals
:func:`generate_log` for the same arguments. Rows are ordered by user, then time. A repeated
``(user, item)`` pair is redrawn up to ``_DUPLICATE_ROUNDS`` times; the few left (under 1% of rows
on the bundled log) stay as re-ratings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys_metric.errors import ConfigError

IdType = Literal["int", "str"]

N_CANDIDATES = 4
"""Candidates drawn from the chosen cluster per event before the user's personal choice."""

DEFAULT_START = 1_704_067_200
"""2024-01-01T00:00:00Z in epoch seconds: the default start of the time window."""

BUNDLED_ARGS: dict[str, Any] = {
    "n_users": 2000,
    "n_items": 1000,
    "n_interactions": 60_000,
    "n_clusters": 10,
    "seed": 20240101,
    "id_type": "str",
}
"""Arguments of :func:`generate_log` that produce the bundled ``data/`` log."""

_CLUSTER_TEMPERATURE = 0.1
_WITHIN_CLUSTER_POPULARITY = 0.75
_DUPLICATE_ROUNDS = 16
_MAX_USER_SHARE = 0.1
_BLOCK_ROWS = 262_144
_SECONDS_PER_DAY = 86_400
_RATING_MEAN = 2.55
_RATING_NOISE = 0.6
_RATING_SLOPE = 3.0
_TAGS_PER_CLUSTER = 4
_HOME_TAG_SHARE = 0.8
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": True,
    "write_statistics": True,
    "row_group_size": 1 << 20,
}


def _width_for(columns: int) -> int:
    return -(-columns // 4) * 4


# Independent random streams; each is indexed by cluster, item, tag, user or row number.
_S_CLUSTER, _S_ITEM, _S_ITEM_VEC, _S_ITEM_TAGS, _S_TAG, _S_USER, _S_USER_VEC, _S_ROW = range(8)
_S_REDRAW = 16

# Column layout of the per-row uniforms (stream _S_ROW and the redraw streams).
_C_TIME, _C_SOURCE, _C_ITEM, _C_CLUSTER, _C_CHOICE, _C_NOISE = 0, 1, 2, 3, 4, 5
_C_CAND = 8
_ROW_WIDTH = _width_for(_C_CAND + N_CANDIDATES)


@dataclass(frozen=True)
class _Params:
    n_users: int
    n_items: int
    n_interactions: int
    n_clusters: int
    seed: int
    id_type: str
    latent_dim: int
    days: float
    start: int
    popularity_exponent: float
    popular_share: float
    random_share: float
    choice_temperature: float
    drift: float
    activity_exponent: float
    min_user_events: int
    category_noise: float

    def validate(self) -> None:
        problems = []
        for name in (
            "n_users",
            "n_items",
            "n_interactions",
            "n_clusters",
            "seed",
            "latent_dim",
            "start",
            "min_user_events",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ConfigError(f"invalid synthetic log arguments: {name}={value!r} must be an integer")
        for name in ("n_users", "n_items", "n_clusters", "latent_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_interactions < 0:
            problems.append(f"n_interactions={self.n_interactions} must not be negative")
        if self.n_items < self.n_clusters:
            problems.append(
                f"n_items={self.n_items} is below n_clusters={self.n_clusters}: every cluster needs an item; "
                "lower n_clusters or raise n_items"
            )
        if not 0 <= self.seed < 2**63:
            problems.append(f"seed={self.seed} must lie in [0, 2**63)")
        if self.id_type not in ("int", "str"):
            problems.append(f"id_type={self.id_type!r} must be 'int' or 'str'")
        if not self.days * _SECONDS_PER_DAY >= 1:
            problems.append(f"days={self.days} must cover at least one second")
        for name in ("popular_share", "random_share", "category_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.popular_share + self.random_share > 1.0:
            problems.append("popular_share + random_share must not exceed 1")
        if self.choice_temperature <= 0:
            problems.append(f"choice_temperature={self.choice_temperature} must be positive")
        if self.activity_exponent <= 0:
            problems.append(f"activity_exponent={self.activity_exponent} must be positive")
        if self.min_user_events < 0:
            problems.append(f"min_user_events={self.min_user_events} must not be negative")
        if problems:
            raise ConfigError("invalid synthetic log arguments: " + "; ".join(problems))


@dataclass(frozen=True)
class SyntheticLog:
    """An interaction log with its ground truth.

    Ground-truth arrays are indexed by generator number: user ``n`` is ``user_ids[n]``, item ``n``
    is ``item_ids[n]`` (with ``id_type="int"`` the id equals the number).

    Attributes:
        interactions: ``user_id`` (Int64 or String), ``item_id`` (Int64 or String), ``timestamp``
            (Int64, epoch seconds), ``rating`` (Float32, 1..5); ordered by user, then time.
        items: ``item_id``, ``category`` (String), ``price`` (Float64), ``tags`` (List(String)); one
            row per item in generator order, including items nobody interacted with.
        user_ids: ``[n_users]`` external user ids (polars Series).
        item_ids: ``[n_items]`` external item ids (polars Series).
        user_clusters: ``[n_users, 3]`` int32 clusters of each user, most visited first, -1 unused.
        user_weights: ``[n_users, 3]`` float32 visit weights of those clusters (rows sum to 1).
        user_vectors: ``[n_users, latent_dim]`` float32 unit personal taste directions.
        item_cluster: ``[n_items]`` int32 cluster of each item.
        item_vectors: ``[n_items, latent_dim]`` float32 unit item vectors.
        item_popularity: ``[n_items]`` float64 Zipf weight (not normalised).
        cluster_centres: ``[n_clusters, latent_dim]`` float32 unit centres.
        params: the generation arguments.
    """

    interactions: pl.DataFrame
    items: pl.DataFrame
    user_ids: pl.Series
    item_ids: pl.Series
    user_clusters: np.ndarray
    user_weights: np.ndarray
    user_vectors: np.ndarray
    item_cluster: np.ndarray
    item_vectors: np.ndarray
    item_popularity: np.ndarray
    cluster_centres: np.ndarray
    params: dict[str, Any]

    @property
    def user_primary_cluster(self) -> np.ndarray:
        """``[n_users]`` int32: each user's most visited cluster."""
        return self.user_clusters[:, 0]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``interactions.parquet`` and ``items.parquet`` into ``out_dir`` (created if needed).

        Fixed Parquet settings (zstd level 3, no timestamps in metadata): the same log gives
        byte-identical files with the same library versions. Returns both paths.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        interactions_path = out / "interactions.parquet"
        items_path = out / "items.parquet"
        _write_parquet(self.interactions, interactions_path)
        _write_parquet(self.items, items_path)
        return interactions_path, items_path


@dataclass(frozen=True)
class WrittenLog:
    """What :func:`write_log` wrote.

    Attributes:
        interactions_dir: directory of ``part-NNNNN.parquet`` files (rows ordered by user, time).
        items_path: the item feature table.
        n_rows: interaction rows written in all parts (equals ``n_interactions``).
        n_parts: number of part files.
        seconds: wall time of the whole write.
    """

    interactions_dir: Path
    items_path: Path
    n_rows: int
    n_parts: int
    seconds: float


def generate_log(
    n_users: int,
    n_items: int,
    n_interactions: int,
    *,
    n_clusters: int = 20,
    seed: int = 0,
    id_type: IdType = "int",
    latent_dim: int = 16,
    days: float = 180.0,
    start: int = DEFAULT_START,
    popularity_exponent: float = 0.9,
    popular_share: float = 0.08,
    random_share: float = 0.03,
    choice_temperature: float = 0.1,
    drift: float = 0.5,
    activity_exponent: float = 1.5,
    min_user_events: int = 5,
    category_noise: float = 0.1,
    workers: int | None = None,
) -> SyntheticLog:
    """Generate a synthetic explicit-feedback log in memory.

    Args:
        n_users: users in the population; a user gets at least ``min(min_user_events,
            n_interactions // n_users)`` events, so with fewer interactions than users some are absent.
        n_items: items in the catalogue (all of them are in ``items``).
        n_interactions: exact number of interaction rows.
        n_clusters: taste clusters C (at most ``n_items``).
        seed: any integer in ``[0, 2**63)``; same arguments and seed give identical frames.
        id_type: ``"int"`` (ids 0..n-1, Int64) or ``"str"`` (``u0000123``, ``i000045``).
        latent_dim: D, dimension of the latent space.
        days: length of the time window in days, starting at ``start`` (epoch seconds).
        popularity_exponent: a in the Zipf item popularity ``rank ** -a``.
        popular_share: share of events drawn from global popularity, whatever the user's taste.
        random_share: share of events on a uniformly random item.
        choice_temperature: temperature of the user's personal choice among cluster candidates.
        drift: amplitude of the slow periodic drift of each cluster's share over the window (0: none).
        activity_exponent: Pareto exponent of user activity (smaller: heavier tail).
        min_user_events: minimum events per user when ``n_interactions`` allows it.
        category_noise: share of items whose ``category`` is a random cluster instead of their own.
        workers: threads generating blocks of users at once (default: up to 4 CPUs); it changes
            speed only, never the output.

    Returns:
        The log, its item table and the ground truth (see :class:`SyntheticLog`).

    Raises:
        ConfigError: an argument is out of range (the message names every bad argument).
    """
    params = _Params(
        n_users=n_users,
        n_items=n_items,
        n_interactions=n_interactions,
        n_clusters=n_clusters,
        seed=seed,
        id_type=id_type,
        latent_dim=latent_dim,
        days=days,
        start=start,
        popularity_exponent=popularity_exponent,
        popular_share=popular_share,
        random_share=random_share,
        choice_temperature=choice_temperature,
        drift=drift,
        activity_exponent=activity_exponent,
        min_user_events=min_user_events,
        category_noise=category_noise,
    )
    params.validate()
    n_workers = _workers(workers)
    world = _World(params)
    frames = list(_block_frames(world, n_workers))
    interactions = pl.concat(frames) if frames else _interaction_frame(world, 0, 0)
    users = _Users(world, 0, n_users)
    return SyntheticLog(
        interactions=interactions,
        items=world.item_frame(),
        user_ids=_format_ids(np.arange(n_users), "user", params.id_type),
        item_ids=world.item_ids,
        user_clusters=users.clusters,
        user_weights=users.weights.astype(np.float32),
        user_vectors=users.vectors,
        item_cluster=world.item_cluster.astype(np.int32),
        item_vectors=world.item_vectors,
        item_popularity=world.item_popularity,
        cluster_centres=world.centres,
        params=asdict(params),
    )


def write_log(
    path: str | Path,
    n_users: int,
    n_items: int,
    n_interactions: int,
    *,
    n_clusters: int = 20,
    seed: int = 0,
    id_type: IdType = "int",
    latent_dim: int = 16,
    days: float = 180.0,
    start: int = DEFAULT_START,
    popularity_exponent: float = 0.9,
    popular_share: float = 0.08,
    random_share: float = 0.03,
    choice_temperature: float = 0.1,
    drift: float = 0.5,
    activity_exponent: float = 1.5,
    min_user_events: int = 5,
    category_noise: float = 0.1,
    rows_per_part: int = 2_000_000,
    overwrite: bool = False,
    workers: int | None = None,
) -> WrittenLog:
    """Generate a log straight to Parquet, a chunk of users at a time, with bounded memory.

    Writes ``path/interactions/part-00000.parquet ...`` (each part at least ``rows_per_part`` rows
    but the last, cut at block boundaries of about 262k rows), ``path/items.parquet`` and ``path/generator.json`` (the arguments).
    The concatenated parts equal ``generate_log(...).interactions`` for the same arguments,
    whatever ``rows_per_part``; files are byte-identical across runs with the same library versions.
    Memory is bounded by the part size and the catalogue, not by ``n_interactions``.

    Args:
        path: output directory (created if needed).
        rows_per_part: target rows per part file.
        overwrite: replace existing part files; without it a non-empty ``interactions`` directory
            is an error.
        Other arguments: as :func:`generate_log`.

    Raises:
        ConfigError: bad arguments, or existing output without ``overwrite``.
    """
    began = time.perf_counter()
    params = _Params(
        n_users=n_users,
        n_items=n_items,
        n_interactions=n_interactions,
        n_clusters=n_clusters,
        seed=seed,
        id_type=id_type,
        latent_dim=latent_dim,
        days=days,
        start=start,
        popularity_exponent=popularity_exponent,
        popular_share=popular_share,
        random_share=random_share,
        choice_temperature=choice_temperature,
        drift=drift,
        activity_exponent=activity_exponent,
        min_user_events=min_user_events,
        category_noise=category_noise,
    )
    params.validate()
    n_workers = _workers(workers)
    if rows_per_part < 1:
        raise ConfigError(
            f"invalid synthetic log arguments: rows_per_part={rows_per_part} must be at least 1"
        )
    out = Path(path)
    parts_dir = out / "interactions"
    existing = sorted(parts_dir.glob("*")) if parts_dir.is_dir() else []
    if existing and not overwrite:
        raise ConfigError(
            f"{parts_dir} already holds {len(existing)} files: choose an empty directory or pass overwrite=True"
        )
    for old in existing:
        if old.is_file() and old.name.startswith("part-") and old.suffix == ".parquet":
            old.unlink()
    parts_dir.mkdir(parents=True, exist_ok=True)

    world = _World(params)
    n_rows = 0
    n_parts = 0
    pending: list[pl.DataFrame] = []
    pending_rows = 0
    for frame in _block_frames(world, n_workers):
        pending.append(frame)
        pending_rows += frame.height
        if pending_rows >= rows_per_part:
            _write_parquet(pl.concat(pending), parts_dir / f"part-{n_parts:05d}.parquet")
            n_rows += pending_rows
            n_parts += 1
            pending, pending_rows = [], 0
    if pending or n_parts == 0:
        last = pl.concat(pending) if pending else _interaction_frame(world, 0, 0)
        _write_parquet(last, parts_dir / f"part-{n_parts:05d}.parquet")
        n_rows += pending_rows
        n_parts += 1
    items_path = out / "items.parquet"
    _write_parquet(world.item_frame(), items_path)
    (out / "generator.json").write_text(
        json.dumps(asdict(params), indent=2, sort_keys=True, default=_json_scalar) + "\n"
    )
    return WrittenLog(
        interactions_dir=parts_dir,
        items_path=items_path,
        n_rows=n_rows,
        n_parts=n_parts,
        seconds=time.perf_counter() - began,
    )


def bundled_log() -> SyntheticLog:
    """The log shipped in ``data/``: ``generate_log(**BUNDLED_ARGS)``."""
    return generate_log(**BUNDLED_ARGS)


def _uniform(seed: int, stream: int, start: int, n: int, width: int) -> np.ndarray:
    """Uniforms in ``[0, 1)`` for indices ``start..start+n-1`` of one stream: ``[n, width]`` float64.

    Counter-based: index ``j`` always gets the same row, however the range is cut. ``width`` is a
    multiple of 4 because one Philox counter step yields four 64-bit words.
    """
    if width % 4:
        raise ValueError(f"width {width} must be a multiple of 4")
    bit_gen = np.random.Philox(key=seed + (stream << 64), counter=start * (width // 4))
    return np.random.Generator(bit_gen).random(n * width).reshape(n, width)


def _scattered_uniform(seed: int, stream: int, index: np.ndarray, width: int) -> np.ndarray:
    """Uniforms in ``[0, 1)`` for arbitrary indices of one stream: ``[m, width]`` float64.

    SplitMix64 of the counter ``index * width + column`` offset by a key of ``(seed, stream)``: a
    pure function of its arguments, cheap for a few scattered rows where a Philox range would
    have to cover everything in between.
    """
    key = _splitmix64(np.array([seed], dtype=np.uint64) ^ _splitmix64(np.array([stream], dtype=np.uint64)))
    counter = np.asarray(index, dtype=np.uint64)[:, None] * np.uint64(width) + np.arange(
        width, dtype=np.uint64
    )
    return (_splitmix64(counter + key) >> np.uint64(11)) * (1.0 / (1 << 53))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _normals(u: np.ndarray, m: int) -> np.ndarray:
    """Box-Muller: ``[n, m]`` standard normals from the first ``2 m`` uniform columns of ``u``."""
    radius = np.sqrt(-2.0 * np.log1p(-u[:, :m]))
    return radius * np.cos(2.0 * np.pi * u[:, m : 2 * m])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _largest_remainder(total: int, weights: np.ndarray, minimum: np.ndarray | int = 0) -> np.ndarray:
    """Integers ``>= minimum`` summing to ``total``, proportional to ``weights`` above the minimum."""
    base = np.broadcast_to(np.asarray(minimum, dtype=np.int64), weights.shape).copy()
    extra = total - int(base.sum())
    if extra <= 0 or weights.size == 0:
        return base
    quota = extra * weights / weights.sum()
    floor = np.floor(quota).astype(np.int64)
    short = extra - int(floor.sum())
    if short > 0:
        # Ties broken by index (stable sort) so the result is deterministic.
        order = np.argsort(-(quota - floor), kind="stable")[:short]
        floor[order] += 1
    return base + floor


class _InverseCdf:
    """Inverse-CDF sampling through a guide table: ``searchsorted(cdf, x, side="right")`` in O(1).

    ``guide[j]`` is the first index whose cdf exceeds the start of grid cell ``j``; a key starts at
    the guide of the cell before its own (rounding of ``x * scale`` can misplace it by one cell)
    and steps forward past the few cdf points in between. The result equals ``np.searchsorted``;
    with 4 cells per point it is several times faster on large catalogues because each key
    touches a couple of cache lines instead of ``log2(n)``.
    """

    def __init__(self, cdf: np.ndarray, cells_per_point: int = 4):
        self.cdf = cdf
        self.n_cells = cells_per_point * cdf.shape[0]
        self.scale = self.n_cells / float(cdf[-1])
        self.guide = np.searchsorted(cdf, np.arange(self.n_cells) / self.scale, side="right").astype(np.int32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Indices int64 (same shape as ``x``) of the first cdf entry above each key; keys in ``[0, cdf[-1])``."""
        flat = x.ravel()
        cell = np.clip((flat * self.scale).astype(np.int64) - 1, 0, self.n_cells - 1)
        idx = self.guide[cell].astype(np.int64)
        last = self.cdf.shape[0] - 1
        active = np.flatnonzero(self.cdf[np.minimum(idx, last)] <= flat)
        while active.size:
            idx[active] += 1
            active = active[idx[active] < last]
            active = active[self.cdf[idx[active]] <= flat[active]]
        return np.minimum(idx, last).reshape(x.shape)


class _World:
    """Everything shared by all users: clusters, items and their features, user activity counts."""

    def __init__(self, p: _Params):
        self.p = p
        C, D, n_items = p.n_clusters, p.latent_dim, p.n_items

        cu = _uniform(p.seed, _S_CLUSTER, 0, C, _width_for(2 * D + 8))
        self.centres = _unit(_normals(cu, D)).astype(np.float32)
        prevalence = np.exp(0.5 * _normals(cu[:, 2 * D : 2 * D + 2], 1)[:, 0])
        self.prevalence = prevalence / prevalence.sum()
        self.phase = 2.0 * np.pi * cu[:, 2 * D + 2]
        self.log_price_mean = np.log(5.0) + cu[:, 2 * D + 3] * (np.log(300.0) - np.log(5.0))

        iu = _uniform(p.seed, _S_ITEM, 0, n_items, 12)
        sizes = _largest_remainder(n_items, self.prevalence, minimum=1)
        self.item_cluster = np.empty(n_items, dtype=np.int64)
        self.item_cluster[np.argsort(iu[:, 0], kind="stable")] = np.repeat(np.arange(C), sizes)
        rank = np.empty(n_items, dtype=np.int64)
        rank[np.argsort(iu[:, 1], kind="stable")] = np.arange(n_items)
        self.item_popularity = (rank + 1.0) ** -p.popularity_exponent
        self.item_bias = 0.25 * _normals(iu[:, 2:4], 1)[:, 0]
        self._item_u = iu

        noise = _normals(_uniform(p.seed, _S_ITEM_VEC, 0, n_items, _width_for(2 * D)), D)
        vectors = _unit(self.centres[self.item_cluster].astype(np.float64) + 0.6 * noise / np.sqrt(D))
        self.item_vectors = vectors.astype(np.float32)
        own_cos = np.einsum("id,id->i", vectors, self.centres[self.item_cluster].astype(np.float64))
        self.item_own_cos = own_cos
        similarity = self.centres.astype(np.float64) @ self.centres.T.astype(np.float64)
        np.fill_diagonal(similarity, 1.0)
        self.cluster_similarity = similarity

        order = np.argsort(self.item_cluster, kind="stable")
        self.sorted_items = order
        weights = self.item_popularity[order] ** _WITHIN_CLUSTER_POPULARITY * np.exp(
            (own_cos[order] - 1.0) / _CLUSTER_TEMPERATURE
        )
        csum = np.cumsum(weights)
        seg_end = np.cumsum(sizes) - 1
        seg_start = seg_end - sizes + 1
        before = np.where(seg_start > 0, csum[seg_start - 1], 0.0)
        cluster_sorted = self.item_cluster[order]
        within = (csum - before[cluster_sorted]) / (csum[seg_end] - before)[cluster_sorted]
        within[seg_end] = 1.0
        self.cluster_sampler = _InverseCdf(cluster_sorted + within)
        pop_cdf = np.cumsum(self.item_popularity)
        pop_cdf /= pop_cdf[-1]
        pop_cdf[-1] = 1.0
        self.popularity_sampler = _InverseCdf(pop_cdf)

        self.counts, self.offsets = self._activity()
        self.item_ids = _format_ids(np.arange(n_items), "item", p.id_type)

    def _activity(self) -> tuple[np.ndarray, np.ndarray]:
        """Exact events per user (power law, at least the minimum) and row offsets ``[n_users + 1]``."""
        p = self.p
        u = _uniform(p.seed, _S_USER, 0, p.n_users, 16)[:, 0]
        weight = (1.0 - u) ** (-1.0 / p.activity_exponent)
        minimum = min(p.min_user_events, p.n_interactions // p.n_users)
        extra = p.n_interactions - minimum * p.n_users
        # Cap a user's expected events at a tenth of the catalogue so that heavy users can still
        # find distinct items; the cap is re-applied as the scale moves.
        for _ in range(4):
            if extra <= 0:
                break
            cap = _MAX_USER_SHARE * p.n_items * weight.sum() / extra
            if weight.max() <= cap:
                break
            weight = np.minimum(weight, cap)
        counts = _largest_remainder(p.n_interactions, weight, minimum=minimum)
        offsets = np.zeros(p.n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return counts, offsets

    def item_frame(self) -> pl.DataFrame:
        """``item_id, category, price, tags`` for every item, in generator order."""
        p = self.p
        C, n_items = p.n_clusters, p.n_items
        iu = self._item_u
        category = np.where(
            iu[:, 4] < p.category_noise, np.minimum((iu[:, 5] * C).astype(np.int64), C - 1), self.item_cluster
        )
        width = len(str(C - 1))
        category_names = np.array([f"cat{k:0{width}d}" for k in range(C)])
        log_price = self.log_price_mean[self.item_cluster] + 0.35 * _normals(iu[:, 6:8], 1)[:, 0]
        price = np.round(np.exp(log_price), 2)

        n_tags = _TAGS_PER_CLUSTER * C
        tag_u = _uniform(p.seed, _S_TAG, 0, n_tags, 4)[:, 0]
        tag_home = np.empty(n_tags, dtype=np.int64)
        tag_home[np.argsort(tag_u, kind="stable")] = np.repeat(np.arange(C), _TAGS_PER_CLUSTER)
        tag_width = len(str(n_tags - 1))
        tag_names = np.array([f"tag{t:0{tag_width}d}" for t in range(n_tags)])
        k = 2 + np.minimum((iu[:, 8] * 3).astype(np.int64), 2)
        # Weight of a home tag against 1 for any other so that a single draw is a home tag with
        # probability _HOME_TAG_SHARE, whatever the number of clusters (0 when all tags are home).
        others = n_tags - _TAGS_PER_CLUSTER
        log_home_weight = np.log(
            max(_HOME_TAG_SHARE / (1 - _HOME_TAG_SHARE) * others / _TAGS_PER_CLUSTER, 1.0)
        )
        chosen = np.empty((n_items, 4), dtype=np.int64)
        step = max(1, _BLOCK_ROWS // n_tags)
        for i0 in range(0, n_items, step):
            i1 = min(n_items, i0 + step)
            # Gumbel-top-4 over log weights = sampling 4 tags without replacement by weight.
            g = _uniform(p.seed, _S_ITEM_TAGS, i0, i1 - i0, _width_for(n_tags))[:, :n_tags]
            logw = np.where(tag_home[None, :] == self.item_cluster[i0:i1, None], log_home_weight, 0.0)
            keys = logw - np.log(-np.log1p(-g))
            top = np.argpartition(-keys, 3, axis=1)[:, :4]
            rank = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
            chosen[i0:i1] = np.take_along_axis(top, rank, axis=1)
        chosen = np.sort(np.where(np.arange(4)[None, :] < k[:, None], chosen, n_tags), axis=1)
        flat = chosen.ravel()
        keep = flat < n_tags
        tags = (
            pl.Series("tags", tag_names[flat[keep]])
            .to_frame()
            .with_columns(pl.Series("row", np.repeat(np.arange(n_items), k)))
        )
        tag_lists = tags.group_by("row", maintain_order=True).agg(pl.col("tags"))["tags"]
        return pl.DataFrame(
            {
                "item_id": self.item_ids,
                "category": pl.Series(category_names[category], dtype=pl.String),
                "price": pl.Series(price, dtype=pl.Float64),
                "tags": tag_lists,
            }
        )


class _Users:
    """Per-user state for users ``u0..u1-1`` (cluster mixture, taste, bias, active span)."""

    def __init__(self, world: _World, u0: int, u1: int):
        p = world.p
        C, D = p.n_clusters, p.latent_dim
        n = u1 - u0
        # Columns: 0 activity (read by _World), 1 number of clusters, 2-4 clusters, 5-7 weights,
        # 8-9 active span, 10-11 bias.
        u = _uniform(p.seed, _S_USER, u0, n, 16)
        n_active = 1 + (u[:, 1] > 0.5).astype(np.int64) + (u[:, 1] > 0.85).astype(np.int64)
        prevalence_cdf = np.cumsum(world.prevalence)
        prevalence_cdf[-1] = 1.0
        clusters = np.minimum(np.searchsorted(prevalence_cdf, u[:, 2:5], side="right"), C - 1)
        weights = -np.log1p(-u[:, 5:8])
        weights[np.arange(3)[None, :] >= n_active[:, None]] = 0.0
        # A cluster drawn twice is one cluster with the summed weight.
        dup1 = clusters[:, 1] == clusters[:, 0]
        weights[dup1, 0] += weights[dup1, 1]
        weights[dup1, 1] = 0.0
        dup2 = (clusters[:, 2] == clusters[:, 0]) | (clusters[:, 2] == clusters[:, 1])
        to0 = dup2 & (clusters[:, 2] == clusters[:, 0])
        weights[to0, 0] += weights[to0, 2]
        to1 = dup2 & ~to0
        weights[to1, 1] += weights[to1, 2]
        weights[dup2, 2] = 0.0
        weights /= weights.sum(axis=1, keepdims=True)
        slot_order = np.argsort(-weights, axis=1, kind="stable")
        self.weights = np.take_along_axis(weights, slot_order, axis=1)
        clusters = np.take_along_axis(clusters, slot_order, axis=1)
        self.clusters = np.where(self.weights > 0, clusters, -1).astype(np.int32)
        self.bias = 0.3 * _normals(u[:, 10:12], 1)[:, 0]
        self.span_start = 0.75 * u[:, 8]
        self.span_length = (1.0 - self.span_start) * (0.3 + 0.7 * u[:, 9])
        taste = _normals(_uniform(p.seed, _S_USER_VEC, u0, n, _width_for(2 * D)), D)
        self.vectors = _unit(taste).astype(np.float32)


def _blocks(world: _World, u0: int, u1: int) -> Iterator[tuple[int, int]]:
    """User ranges inside ``[u0, u1)`` of about ``_BLOCK_ROWS`` rows (a heavy user may exceed it)."""
    offsets = world.offsets
    start = u0
    while start < u1:
        stop = int(np.searchsorted(offsets, offsets[start] + _BLOCK_ROWS, side="right")) - 1
        stop = min(max(stop, start + 1), u1)
        yield start, stop
        start = stop


def _block_frames(world: _World, n_workers: int) -> Iterator[pl.DataFrame]:
    """Frames of all user blocks in order, ``n_workers`` blocks generated at once in threads.

    Blocks are independent (numpy and polars release the GIL), so threads change speed only; at
    most ``2 * n_workers`` finished or running blocks are held, which bounds memory.
    """
    blocks = list(_blocks(world, 0, world.p.n_users))
    if n_workers == 1:
        for b0, b1 in blocks:
            yield _interaction_frame(world, b0, b1)
        return
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        running: deque[Future[pl.DataFrame]] = deque()
        for b0, b1 in blocks:
            running.append(pool.submit(_interaction_frame, world, b0, b1))
            if len(running) >= 2 * n_workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def _workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise ConfigError(f"invalid synthetic log arguments: workers={workers} must be at least 1")
    return workers


def _draw_items(
    world: _World, users: _Users, local: np.ndarray, tau: np.ndarray, u: np.ndarray
) -> np.ndarray:
    """Items for events of users ``local`` (index into ``users``) at times ``tau`` in [0, 1].

    Args:
        local: int64 ``[m]`` user index within the block.
        tau: float64 ``[m]`` event time as a fraction of the window.
        u: float64 ``[m, _ROW_WIDTH]`` the events' uniforms.

    Returns:
        int64 ``[m]`` item numbers.
    """
    p = world.p
    m = local.shape[0]
    item = np.empty(m, dtype=np.int64)
    source = u[:, _C_SOURCE]
    popular = source < p.popular_share
    random = (source >= p.popular_share) & (source < p.popular_share + p.random_share)
    from_cluster = ~(popular | random)
    item[popular] = world.popularity_sampler(u[popular, _C_ITEM])
    item[random] = (u[random, _C_ITEM] * p.n_items).astype(np.int64)
    np.minimum(item, p.n_items - 1, out=item)

    rows = np.flatnonzero(from_cluster)
    for r0 in range(0, rows.shape[0], _BLOCK_ROWS // N_CANDIDATES):
        r = rows[r0 : r0 + _BLOCK_ROWS // N_CANDIDATES]
        who = local[r]
        slots = np.take(users.clusters, who, axis=0).astype(np.int64)
        logits = np.log(np.maximum(np.take(users.weights, who, axis=0), 1e-300))
        if p.drift:
            logits += p.drift * np.sin(2.0 * np.pi * tau[r, None] + world.phase[np.maximum(slots, 0)])
        logits[slots < 0] = -np.inf
        prob = np.exp(logits - logits.max(axis=1, keepdims=True))
        cluster = np.take_along_axis(slots, _pick(prob, u[r, _C_CLUSTER])[:, None], axis=1)
        # Rounding can lift cluster + u to cluster + 1, the next cluster's range: keep it below.
        keys = np.minimum(cluster + u[r, _C_CAND : _C_CAND + N_CANDIDATES], np.nextafter(cluster + 1.0, 0.0))
        cand = world.sorted_items[world.cluster_sampler(keys)]
        taste = np.einsum(
            "mkd,md->mk", np.take(world.item_vectors, cand, axis=0), np.take(users.vectors, who, axis=0)
        )
        weight = np.exp((taste - taste.max(axis=1, keepdims=True)) / p.choice_temperature)
        item[r] = np.take_along_axis(cand, _pick(weight, u[r, _C_CHOICE])[:, None], axis=1)[:, 0]
    return item


def _pick(weight: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Column index ``[m]`` drawn from each row of ``weight [m, k]`` (unnormalised) with uniforms ``u``.

    Column by column over the few ``k`` columns: numpy reductions along a short axis are slow.
    """
    columns = np.ascontiguousarray(weight.T)
    partial = np.cumsum(columns, axis=0)
    threshold = u * partial[-1]
    pick = np.zeros(u.shape[0], dtype=np.int64)
    for j in range(columns.shape[0] - 1):
        pick += partial[j] < threshold
    return pick


def _first_seen(key: np.ndarray) -> np.ndarray:
    """Boolean ``[m]``: ``key[j]`` did not occur at any lower index (``key`` is in row order)."""
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    first = np.ones(key.shape[0], dtype=bool)
    first[order[1:]] = sorted_key[1:] != sorted_key[:-1]
    return first


def _dedupe(
    world: _World, users: _Users, local: np.ndarray, tau: np.ndarray, row: np.ndarray, item: np.ndarray
) -> None:
    """Redraw, in place, events that repeat an earlier event's ``(user, item)``.

    The earliest row keeps the item; later repeats are redrawn with scattered uniforms of their own
    row number and round, up to ``_DUPLICATE_ROUNDS`` times, and a redraw that hits an item the
    user already has is tried again. Depends on each user's own rows only.
    """
    p = world.p
    key = local * np.int64(p.n_items) + item
    first = _first_seen(key)
    redo = np.flatnonzero(~first)
    if redo.size == 0:
        return
    taken = np.sort(key[first])
    for round_ in range(_DUPLICATE_ROUNDS):
        u = _scattered_uniform(p.seed, _S_REDRAW + round_, row[redo], _ROW_WIDTH)
        item[redo] = _draw_items(world, users, local[redo], tau[redo], u)
        new_key = local[redo] * np.int64(p.n_items) + item[redo]
        pos = np.minimum(np.searchsorted(taken, new_key), taken.shape[0] - 1)
        ok = (taken[pos] != new_key) & _first_seen(new_key)
        if ok.any():
            added = np.sort(new_key[ok])
            taken = np.insert(taken, np.searchsorted(taken, added), added)
        redo = redo[~ok]
        if redo.size == 0:
            return


def _interaction_frame(world: _World, b0: int, b1: int) -> pl.DataFrame:
    """Events of users ``b0..b1-1``, ordered by user and time."""
    p = world.p
    users = _Users(world, b0, b1)
    r0, r1 = int(world.offsets[b0]), int(world.offsets[b1])
    n = r1 - r0
    local = np.repeat(np.arange(b1 - b0), world.counts[b0:b1])
    row = np.arange(r0, r1, dtype=np.int64)
    u = _uniform(p.seed, _S_ROW, r0, n, _ROW_WIDTH)
    tau = users.span_start[local] + users.span_length[local] * u[:, _C_TIME]
    item = _draw_items(world, users, local, tau, u)

    _dedupe(world, users, local, tau, row, item)

    rating = _ratings(world, users, local, item, u[:, _C_NOISE : _C_NOISE + 2])
    del u
    seconds = np.floor(tau * p.days * _SECONDS_PER_DAY).astype(np.int64)
    seconds = np.minimum(seconds, int(p.days * _SECONDS_PER_DAY) - 1)
    # Stable sort of (user, time) keeps row order among ties; rows are already grouped by user.
    order = np.argsort(local * np.int64(int(p.days * _SECONDS_PER_DAY)) + seconds, kind="stable")
    user_num = local[order] + b0
    return pl.DataFrame(
        {
            "user_id": _user_ids(user_num, p.id_type, b0, b1),
            "item_id": world.item_ids.gather(item[order])
            if p.id_type == "str"
            else _format_ids(item[order], "item", "int"),
            "timestamp": pl.Series(p.start + seconds[order], dtype=pl.Int64),
            "rating": pl.Series(rating[order], dtype=pl.Float32),
        }
    )


def _ratings(world: _World, users: _Users, local: np.ndarray, item: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Stars 1..5 ``[m]`` float32 from cluster affinity, personal taste, biases and noise.

    Affinity of user ``u`` to item ``i`` of cluster ``k_i`` is ``(c_{k_i} . v_i) * max over the
    user's clusters k of (c_k . c_{k_i})``: the item's closeness to its own centre times the
    closeness of that centre to the nearest of the user's centres (1 when it is one of them).
    """
    out = np.empty(local.shape[0], dtype=np.float32)
    noise = _normals(u, 1)[:, 0]
    for s in range(0, local.shape[0], _BLOCK_ROWS):
        who, it = local[s : s + _BLOCK_ROWS], item[s : s + _BLOCK_ROWS]
        slots = np.take(users.clusters, who, axis=0)
        closeness = world.cluster_similarity[np.maximum(slots, 0), world.item_cluster[it, None]]
        affinity = world.item_own_cos[it] * np.where(slots >= 0, closeness, -1.0).max(axis=1)
        taste = np.einsum(
            "md,md->m", np.take(users.vectors, who, axis=0), np.take(world.item_vectors, it, axis=0)
        )
        latent = (
            _RATING_MEAN
            + users.bias[who]
            + world.item_bias[it]
            + _RATING_SLOPE * (affinity - 0.5)
            + taste
            + _RATING_NOISE * noise[s : s + _BLOCK_ROWS]
        )
        out[s : s + _BLOCK_ROWS] = np.clip(np.rint(latent), 1.0, 5.0)
    return out


def _format_ids(nums: np.ndarray, kind: Literal["user", "item"], id_type: str) -> pl.Series:
    name = f"{kind}_id"
    series = pl.Series(name, np.asarray(nums, dtype=np.int64), dtype=pl.Int64)
    if id_type == "int":
        return series
    prefix, width = ("u", 7) if kind == "user" else ("i", 6)
    return (
        series.to_frame()
        .select((pl.lit(prefix) + pl.col(name).cast(pl.String).str.zfill(width)).alias(name))
        .to_series()
    )


def _user_ids(nums: np.ndarray, id_type: str, lo: int, hi: int) -> pl.Series:
    """External ids of user numbers ``nums`` (all in ``[lo, hi)``): strings are formatted once per
    user of the range and gathered, cheaper than formatting every row."""
    if id_type == "int":
        return _format_ids(nums, "user", id_type)
    return _format_ids(np.arange(lo, hi), "user", id_type).gather(nums - lo)


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write with fixed settings through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(frame.to_arrow(), tmp, **_PARQUET_OPTIONS)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m recsys_metric.data.synthetic --out data/``.

    Without sizes it writes the bundled log (:data:`BUNDLED_ARGS`) as ``interactions.parquet`` +
    ``items.parquet``. With ``--parts`` it streams a directory of parts through :func:`write_log`.
    """
    parser = argparse.ArgumentParser(
        prog="python -m recsys_metric.data.synthetic", description="Generate a synthetic interaction log."
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--users", type=int, default=BUNDLED_ARGS["n_users"])
    parser.add_argument("--items", type=int, default=BUNDLED_ARGS["n_items"])
    parser.add_argument("--interactions", type=int, default=BUNDLED_ARGS["n_interactions"])
    parser.add_argument("--clusters", type=int, default=BUNDLED_ARGS["n_clusters"])
    parser.add_argument("--seed", type=int, default=BUNDLED_ARGS["seed"])
    parser.add_argument("--id-type", choices=["int", "str"], default=BUNDLED_ARGS["id_type"])
    parser.add_argument(
        "--parts",
        action="store_true",
        help="stream to OUT/interactions/part-*.parquet with bounded memory (for tens of millions of rows)",
    )
    parser.add_argument("--rows-per-part", type=int, default=2_000_000)
    parser.add_argument("--overwrite", action="store_true", help="with --parts: replace existing parts")
    args = parser.parse_args(argv)
    sizes = {
        "n_users": args.users,
        "n_items": args.items,
        "n_interactions": args.interactions,
        "n_clusters": args.clusters,
        "seed": args.seed,
        "id_type": args.id_type,
    }
    try:
        if args.parts:
            written = write_log(args.out, **sizes, rows_per_part=args.rows_per_part, overwrite=args.overwrite)
            print(
                f"wrote {written.n_rows} interactions in {written.n_parts} parts to {written.interactions_dir} "
                f"and {written.items_path} in {written.seconds:.1f} s"
            )
        else:
            log = generate_log(**sizes)
            interactions_path, items_path = log.write(args.out)
            print(f"wrote {log.interactions.height} interactions to {interactions_path} and {items_path}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
