"""Nearest items in the embedding space: one :class:`ItemIndex` protocol, an exact and an Annoy index.

As TFRS's ``TopK`` layer with ``BruteForce`` and ``ScaNN`` behind it, both indexes answer the same
call the same way:

- :meth:`ItemIndex.search` takes query vectors ``[B, D]`` and returns, per query, the ``k`` best
  item numbers (row numbers of ``item_embeddings.parquet``, int64 ``[B, k]``) and their scores
  (float32 ``[B, k]``), best first. Scores are the model's own
  (:func:`recsys_metric.model.distances.score_numpy`): higher is better; euclidean ``-distance``,
  cosine similarity, dot product. Equal scores are ordered by lower item number.
- ``exclude[b]`` lists item numbers that must not be returned for query ``b`` (items the user has
  seen, the query item itself). Exclusion never shortens a result: an index fetches more
  candidates, masks, and cuts to ``k``, so a row holds ``k`` items whenever ``k`` eligible items
  exist. When fewer exist, the row is padded with item ``-1`` and score ``-inf``.
- :meth:`ItemIndex.search_items` gives the neighbours of indexed items, never the item itself.

:class:`ExactIndex` is a blocked matrix product with a top-k in torch (CPU or CUDA); it is the
reference the tests and the build-time recall measurement compare against. :class:`AnnoyIndex`
asks Annoy for candidates. Both take the scores they return from one pair-by-pair computation
(:class:`_Scorer`), so a score does not depend on the index, the device or the batch: wherever the
two indexes return the same item they return the same score, bit for bit, and the same order.

On disk (a run directory) the Annoy index is ``items.ann`` and the sidecar ``index.json`` with what
Annoy does not store: dimension, metric, item count, the sha256 of the embeddings it was built
from. :meth:`AnnoyIndex.load` checks all of them and refuses a stale index
(:class:`IndexMismatchError`) rather than answering with the wrong items.

Both indexes are safe to query from many threads at once: Annoy queries release the GIL and only
read the memory-mapped file, torch products allocate their own outputs, and no call writes shared
state.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import annoy
import numpy as np

from recsys_metric.errors import DataError
from recsys_metric.scoring import DISTANCE_NAMES, NORM_EPS, SQRT_EPS

if TYPE_CHECKING:
    import torch

    # Annotations only: the config (pydantic) costs a fifth of a second that queries never need.
    from recsys_metric.config import IndexConfig

logger = logging.getLogger(__name__)

ANNOY_METRICS: dict[str, str] = {"euclidean": "euclidean", "cosine": "angular", "dot": "dot"}
"""Annoy metric per distance. ``dot`` is Annoy's own ``dot`` metric, which reduces maximum inner
product search to an angular search with one extra coordinate (Bachrach et al., 2014). Measured
against doing that reduction here (an extra coordinate ``sqrt(max_norm^2 - ||x||^2)`` and Annoy
``angular``) on 50k x 64 clustered vectors of varying norm: recall@10 0.662 / 0.673 with 10 trees and
0.959 / 0.960 with 50 trees, the same; the reduction on ``euclidean`` was worse (0.53 / 0.86).
Annoy's metric keeps the file free of a transform that every reader would have to repeat."""

ANN_FILE = "items.ann"
"""Annoy file name in a run directory."""
SIDECAR_FILE = "index.json"
"""Sidecar file name in a run directory."""

RECALL_K = 10
"""K of the recall measured at build time."""

_SIDECAR_KEYS = (
    "dim",
    "metric",
    "distance",
    "n_trees",
    "search_k",
    "seed",
    "n_items",
    "embeddings_sha256",
    "annoy_version",
    "recall_at_10",
)
_QUERY_CHUNK = 1024
_RESCORE_MARGIN = 16
_NO_KEYS = np.empty(0, dtype=np.int64)
_RESCORE_CHUNK = 1 << 16


class IndexMismatchError(DataError):
    """An index on disk does not belong to the embeddings it is loaded with; rebuild it.

    Attributes:
        field: the sidecar field that differs (``dim``, ``metric``, ``n_items``,
            ``embeddings_sha256``).
        found: the index's value.
        expected: the value the embeddings (or the caller) require.
    """

    def __init__(self, path: str | Path, field: str, found: Any, expected: Any):
        super().__init__(
            f"index {path}: {field} is {found!r} in the index but {expected!r} is expected; rebuild the "
            "index (recsys_metric.index.build_index) from the current item_embeddings.parquet"
        )
        self.field = field
        self.found = found
        self.expected = expected


class IndexRecallError(DataError):
    """The Annoy index's recall@10 against exact search is below ``index.recall_floor``."""

    def __init__(self, message: str, *, recall: float, floor: float):
        super().__init__(message)
        self.recall = recall
        self.floor = floor


def embeddings_sha256(vectors: np.ndarray) -> str:
    """Hex sha256 of the float32 bytes of ``vectors`` in C order (shape is not hashed; dim is checked apart)."""
    data = np.ascontiguousarray(vectors, dtype=np.float32)
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _check_distance(distance: str) -> str:
    if distance not in DISTANCE_NAMES:
        raise ValueError(f"distance must be one of {DISTANCE_NAMES}, got {distance!r}")
    return distance


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2 or arr.shape[1] < 1 or arr.dtype.kind not in "fiu":
        raise ValueError(
            f"item vectors must be a real [n_items, D] array with D >= 1, got {arr.dtype} {arr.shape}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"item vectors hold {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    arr = np.asarray(queries)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.dtype.kind not in "fiu":
        raise ValueError(
            f"queries must be a real [B, {dim}] array, got {arr.dtype} {arr.shape}"
            + ("; one query is queries[None, :]" if arr.ndim == 1 else "")
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"queries hold {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _exclusion_keys(
    exclude: Sequence[np.ndarray] | None, n_queries: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys ``query * n_items + item`` of the excluded pairs, and the count per query."""
    counts = np.zeros(n_queries, dtype=np.int64)
    if exclude is None:
        return np.empty(0, dtype=np.int64), counts
    if len(exclude) != n_queries:
        raise ValueError(
            f"exclude has {len(exclude)} entries for {n_queries} queries; pass one array per query"
        )
    parts = [np.asarray(e).reshape(-1) for e in exclude]
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=n_queries)
    if not lengths.sum():
        return np.empty(0, dtype=np.int64), counts
    items = np.concatenate(parts)
    if items.dtype.kind not in "iu":
        raise ValueError(f"exclude must hold integer item numbers, got {items.dtype}")
    items = items.astype(np.int64, copy=False)
    bad = (items < 0) | (items >= n_items)
    if bad.any():
        raise ValueError(
            f"exclude holds {int(bad.sum())} item numbers outside [0, {n_items}), e.g. {int(items[bad][0])}"
        )
    rows = np.repeat(np.arange(n_queries, dtype=np.int64), lengths)
    keys = np.unique(rows * n_items + items)
    counts += np.bincount(keys // n_items, minlength=n_queries)
    return keys, counts


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(NORM_EPS))


class _Scorer:
    """Exact scores of ``(query, item)`` pairs, computed pair by pair.

    Both indexes take their returned scores from here, so a score does not depend on the batch a
    query came in, on the device, or on the index: the formula of
    :func:`~recsys_metric.model.distances.score_numpy` (euclidean through ``||q||^2 + ||r||^2 -
    2 q.r``, cosine on unit rows, dot), in float32, one row-wise product per pair. It equals
    ``score_numpy`` up to the rounding of a different summation order (about 1e-7 relative; for
    euclidean the expansion's own cancellation near distance 0 is larger, as in ``score_numpy``).
    """

    def __init__(self, vectors: np.ndarray, distance: str):
        self.distance = distance
        self.n_items = vectors.shape[0]
        self.items = _normalize_rows(vectors) if distance == "cosine" else vectors
        self.sq_norms = np.einsum("ij,ij->i", vectors, vectors) if distance == "euclidean" else None

    def queries(self, q: np.ndarray) -> np.ndarray:
        """``[B, D]`` queries as the products need them (cosine: unit rows)."""
        return _normalize_rows(q) if self.distance == "cosine" else q

    def rank(
        self,
        q: np.ndarray,
        chunk: np.ndarray,
        rows: np.ndarray,
        cands: np.ndarray,
        k: int,
        keys: np.ndarray,
        items: np.ndarray,
        scores: np.ndarray,
    ) -> np.ndarray:
        """Score candidate pairs, drop excluded ones, write each query's best ``k`` into ``items`` / ``scores``.

        Args:
            q: ``[B, D]`` prepared queries (:meth:`queries`).
            chunk: sorted query rows whose results are (re)written; every entry of ``rows`` is one.
            rows: ``[m]`` int64 query row of each pair.
            cands: ``[m]`` int64 candidate item of each pair (unique per row).
            k: results per query.
            keys: sorted excluded pairs ``row * n_items + item``.
            items: int64 ``[B, k]`` output, rows ``chunk`` overwritten (``-1`` padding).
            scores: float32 ``[B, k]`` output, rows ``chunk`` overwritten (``-inf`` padding).

        Returns:
            ``[len(chunk)]`` eligible candidates kept per row (at most ``k``).
        """
        items[chunk] = -1
        scores[chunk] = -np.inf
        if keys.size and cands.size:
            pair = rows * self.n_items + cands
            pos = np.minimum(np.searchsorted(keys, pair), keys.size - 1)
            keep = keys[pos] != pair
            rows, cands = rows[keep], cands[keep]
        if not cands.size:
            return np.zeros(chunk.size, dtype=np.int64)
        qv = q[rows]
        out = np.einsum("ij,ij->i", qv, self.items[cands])
        if self.distance == "euclidean":
            out *= -2.0
            out += np.einsum("ij,ij->i", qv, qv)
            out += self.sq_norms[cands]
            np.maximum(out, 0.0, out=out)
            out += np.float32(SQRT_EPS)
            np.sqrt(out, out=out)
            np.negative(out, out=out)
        order = np.lexsort((cands, -out, rows))
        rows, cands, out = rows[order], cands[order], out[order]
        rank = np.arange(rows.size) - np.searchsorted(rows, rows)
        top = rank < k
        items[rows[top], rank[top]] = cands[top]
        scores[rows[top], rank[top]] = out[top]
        return np.bincount(np.searchsorted(chunk, rows[top]), minlength=chunk.size)


class ItemIndex(ABC):
    """Top-k items for query vectors. See the module docstring for the contract.

    Attributes:
        distance: ``euclidean``, ``cosine`` or ``dot``.
        dim: D, the embedding dimension.
        n_items: catalog size; item numbers are ``0 .. n_items - 1``.
        is_exact: True when results are the exact top-k (:class:`ExactIndex`).
        vectors: float32 ``[n_items, D]`` item embeddings (read-only use).
    """

    distance: str
    dim: int
    n_items: int
    vectors: np.ndarray
    is_exact: ClassVar[bool]

    def search(
        self, queries: np.ndarray, k: int, *, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items for each query.

        Args:
            queries: ``[B, D]`` query vectors (float32; other real dtypes are converted), finite.
            k: results per query, ``>= 1``.
            exclude: ``None`` or ``B`` integer arrays; ``exclude[b]`` holds item numbers in
                ``[0, n_items)`` that query ``b`` must not return (duplicates allowed).

        Returns:
            ``(items, scores)``: int64 ``[B, k]`` item numbers and float32 ``[B, k]`` scores, best
            first, equal scores by lower item number. A query with fewer than ``k`` eligible items
            gets them all, then item ``-1`` with score ``-inf``.

        Raises:
            ValueError: wrong shape or non-finite queries, ``k < 1``, an ``exclude`` of the wrong
                length or with item numbers outside the catalog.
        """
        q = _check_queries(queries, self.dim)
        k = _check_k(k)
        keys, counts = _exclusion_keys(exclude, q.shape[0], self.n_items)
        return self._search(q, k, keys, counts)

    @abstractmethod
    def _search(
        self, q: np.ndarray, k: int, keys: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` on checked input: ``q`` float32 ``[B, D]``, ``keys`` sorted unique excluded
        pairs ``b * n_items + item``, ``counts`` ``[B]`` excluded items per query."""

    def search_items(
        self, item_nums: np.ndarray, k: int, *, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of indexed items: :meth:`search` with ``vectors[item_nums]``, excluding each item itself.

        Args:
            item_nums: ``[B]`` integer item numbers in ``[0, n_items)``.
            k: neighbours per item.
            exclude: as in :meth:`search`, in addition to the item itself.

        Returns:
            int64 ``[B, k]`` items and float32 ``[B, k]`` scores, as :meth:`search`.
        """
        nums = np.asarray(item_nums)
        if nums.ndim != 1 or nums.dtype.kind not in "iu":
            raise ValueError(f"item_nums must be a 1-D integer array, got {nums.dtype} {nums.shape}")
        nums = nums.astype(np.int64, copy=False)
        bad = (nums < 0) | (nums >= self.n_items)
        if bad.any():
            raise ValueError(
                f"item_nums hold {int(bad.sum())} values outside [0, {self.n_items}), e.g. {int(nums[bad][0])}"
            )
        k = _check_k(k)
        keys, _ = _exclusion_keys(exclude, nums.size, self.n_items)
        keys = np.union1d(keys, np.arange(nums.size, dtype=np.int64) * self.n_items + nums)
        counts = np.bincount(keys // max(self.n_items, 1), minlength=nums.size)
        return self._search(self.vectors[nums], k, keys, counts)


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``min(k, N)`` of ``[b, N]`` scores, choosing the lowest columns among ties at the cut.

    ``torch.topk`` picks arbitrary members of a tie at the k-th value; rows with such a tie are
    redone with a stable sort (rare on real embeddings, so the full sort is paid only there).
    """
    import torch

    kk = min(k, scores.shape[1])
    vals, idx = scores.topk(kk, dim=1, sorted=False)
    cut = vals.amin(dim=1)
    tied = ((scores >= cut[:, None]).sum(dim=1) > kk) & (cut > -torch.inf)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sorted_vals, sorted_idx = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        vals[rows] = sorted_vals[:, :kk]
        idx[rows] = sorted_idx[:, :kk]
    return vals, idx


def _merge_topk(
    best_s: torch.Tensor, best_i: torch.Tensor, s: torch.Tensor, i: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` best of a running result (ordered, lower item numbers) and a later block's top-k.

    Block candidates are put in item order first, so that the stable sort by score leaves every tie
    in item order.
    """
    import torch

    i, perm = i.sort(dim=1)
    s = s.gather(1, perm)
    all_s = torch.cat([best_s, s], dim=1)
    all_i = torch.cat([best_i, i], dim=1)
    order = torch.sort(all_s, dim=1, descending=True, stable=True).indices[:, :k]
    return all_s.gather(1, order), all_i.gather(1, order)


class ExactIndex(ItemIndex):
    """Exact top-k by blocked matrix products in torch; the reference for :class:`AnnoyIndex`.

    A block of queries is multiplied with a block of items, reduced to the block's best
    ``k + 16`` and merged into the running result, so working memory is about
    ``3 * 4 * block_size`` bytes whatever the catalog and batch sizes (4M entries: ~50 MB). The
    ranking key in torch is the score up to a per-query constant (euclidean: ``2 q.r - ||r||^2``,
    no square root); the ``k + 16`` survivors are then scored pair by pair (:class:`_Scorer`) and
    ordered by that score and item number. The 16 extra absorb rounding differences between the
    two computations, which only ever reorder near-equal scores.

    Args:
        vectors: ``[n_items, D]`` item embeddings (float32; other real dtypes are converted), finite.
        distance: ``euclidean``, ``cosine`` or ``dot``.
        device: where the products run (:func:`recsys_metric.device.resolve_device`: ``auto`` picks
            CUDA when present).
        block_size: most query x item products held at once; queries go up to 1,024 at a time and
            items ``block_size // queries`` at a time.
    """

    is_exact: ClassVar[bool] = True

    def __init__(
        self,
        vectors: np.ndarray,
        distance: str,
        *,
        device: str | torch.device = "auto",
        block_size: int = 1 << 22,
    ):
        # torch only here: AnnoyIndex and everything serving loads stay importable without it.
        import torch

        from recsys_metric.device import resolve_device

        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.distance = _check_distance(distance)
        self.vectors = _check_vectors(vectors)
        self.n_items, self.dim = self.vectors.shape
        self.device = resolve_device(device)
        self.block_size = int(block_size)
        self._scorer = _Scorer(self.vectors, distance)
        with warnings.catch_warnings():
            # Arrays read from Parquet are read-only; the tensors are never written, so share them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            # Stored [D, n_items]: a product with a contiguous transpose is a plain GEMM, where the
            # transposed view of [n_items, D] rows took a slow path on CPU (one query against 100k
            # x 128: 2.8 ms against 10.3 ms; batches of 1,024 queries the same either way).
            self._items_t = torch.from_numpy(self._scorer.items).to(self.device).T.contiguous()
            self._neg_sq_norms = (
                None
                if self._scorer.sq_norms is None
                else torch.from_numpy(-self._scorer.sq_norms).to(self.device)
            )

    def _keys(self, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """``[b, end - start]`` ranking keys: the score plus a per-query constant, monotone in it."""
        import torch

        if self._neg_sq_norms is None:
            return q @ self._items_t[:, start:end]
        return torch.addmm(self._neg_sq_norms[start:end], q, self._items_t[:, start:end], alpha=2.0)

    def _search(
        self, q: np.ndarray, k: int, keys: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n_queries, n = q.shape[0], self.n_items
        items = np.full((n_queries, k), -1, dtype=np.int64)
        scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        if n_queries == 0 or n == 0:
            return items, scores
        q = self._scorer.queries(q)
        kk = min(n, k + _RESCORE_MARGIN)
        q_chunk = min(n_queries, _QUERY_CHUNK)
        item_block = max(1, min(n, self.block_size // q_chunk))
        with torch.inference_mode():
            for qs in range(0, n_queries, q_chunk):
                qe = min(n_queries, qs + q_chunk)
                qt = torch.from_numpy(q[qs:qe]).to(self.device)
                lo, hi = np.searchsorted(keys, [qs * n, qe * n])
                ex_rows = torch.from_numpy(keys[lo:hi] // n - qs).to(self.device)
                ex_items = torch.from_numpy(keys[lo:hi] % n).to(self.device)
                best_s = torch.full((qe - qs, kk), -torch.inf, device=self.device)
                best_i = torch.full((qe - qs, kk), -1, dtype=torch.int64, device=self.device)
                for start in range(0, n, item_block):
                    end = min(n, start + item_block)
                    block = self._keys(qt, start, end)
                    if ex_rows.numel():
                        hit = (ex_items >= start) & (ex_items < end)
                        block[ex_rows[hit], ex_items[hit] - start] = -torch.inf
                    vals, idx = _block_topk(block, kk)
                    best_s, best_i = _merge_topk(best_s, best_i, vals, idx + start, kk)
                best_i[best_s == -torch.inf] = -1
                found = best_i.cpu().numpy()
                r, c = np.nonzero(found >= 0)
                self._scorer.rank(q, np.arange(qs, qe), r + qs, found[r, c], k, _NO_KEYS, items, scores)
        return items, scores


class AnnoyIndex(ItemIndex):
    """Approximate top-k: Annoy proposes candidates, the stored vectors score them exactly.

    Build with :meth:`build`, open with :meth:`load`; the constructor wraps an Annoy object that is
    already loaded.

    A query for ``k`` results excluding ``e`` items asks Annoy for ``n = k + e`` candidates (all
    distinct), re-scores them, masks the excluded ones and keeps the best ``k``. Annoy inspects
    ``search_k * n / 10`` tree nodes for it: ``search_k`` is the effort for 10 candidates (the
    setting the build-time recall@10 measures) and the effort grows with the candidates fetched,
    so larger ``k`` and filtered queries keep their recall; ``search_k = -1`` is Annoy's default
    ``n_trees * n``. When masking leaves a query short (Annoy found fewer than ``n``), it asks for
    twice as many, and once that would be the whole catalog it is answered exactly.
    """

    is_exact: ClassVar[bool] = False

    def __init__(
        self,
        index: annoy.AnnoyIndex,
        vectors: np.ndarray,
        distance: str,
        *,
        n_trees: int,
        search_k: int = -1,
        metadata: dict[str, Any] | None = None,
    ):
        self.distance = _check_distance(distance)
        self.vectors = _check_vectors(vectors)
        self.n_items, self.dim = self.vectors.shape
        self.n_trees = int(n_trees)
        self.search_k = int(search_k)
        self.metadata = dict(metadata or {})
        self._annoy = index
        self._scorer = _Scorer(self.vectors, distance)
        self._exact: ExactIndex | None = None
        self._exact_lock = threading.Lock()

    @classmethod
    def build(
        cls, vectors: np.ndarray, distance: str, config: IndexConfig, *, path: str | Path
    ) -> AnnoyIndex:
        """Build ``items.ann`` and ``index.json`` in the directory ``path`` and load them.

        Annoy id ``i`` is row ``i`` of ``vectors``. The build is seeded (``config.seed``) and single
        threaded, so the same vectors and config give a byte-identical file. Both files are written
        under temporary names and renamed into place: a process that has the old ``items.ann``
        memory-mapped keeps reading the old inode (copying over it would kill that process with
        SIGBUS). ``recall_at_10`` in the sidecar stays ``null`` until :func:`build_index` measures it.

        Args:
            vectors: ``[n_items, D]`` item embeddings (float32), n_items >= 1.
            distance: ``euclidean``, ``cosine`` or ``dot``; the Annoy metric follows
                (:data:`ANNOY_METRICS`).
            config: ``n_trees``, ``search_k``, ``seed``, ``on_disk_build``.
            path: directory (created if needed), e.g. the run directory.
        """
        distance = _check_distance(distance)
        vectors = _check_vectors(vectors)
        n_items, dim = vectors.shape
        if n_items == 0:
            raise ValueError("cannot build an Annoy index over 0 items")
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        metric = ANNOY_METRICS[distance]
        tmp = directory / f".{ANN_FILE}.{os.getpid()}.{threading.get_ident()}.tmp"
        index = annoy.AnnoyIndex(dim, metric)
        index.set_seed(config.seed)
        try:
            if config.on_disk_build and not index.on_disk_build(str(tmp)):
                raise OSError(f"annoy could not open {tmp} for on_disk_build")
            for i in range(n_items):
                index.add_item(i, vectors[i])
            index.build(config.n_trees, n_jobs=1)
            # An on-disk build is already in the file; save() to another path would write nothing.
            if not config.on_disk_build and not index.save(str(tmp)):
                raise OSError(f"annoy could not save {tmp}")
            index.unload()
            os.replace(tmp, directory / ANN_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        sha = embeddings_sha256(vectors)
        _write_json(
            directory / SIDECAR_FILE,
            {
                "dim": dim,
                "metric": metric,
                "distance": distance,
                "n_trees": config.n_trees,
                "search_k": config.search_k,
                "seed": config.seed,
                "n_items": n_items,
                "embeddings_sha256": sha,
                "annoy_version": importlib.metadata.version("annoy"),
                "recall_at_10": None,
            },
        )
        return cls.load(directory, vectors=vectors, expected_sha256=sha)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        vectors: np.ndarray,
        expected_sha256: str | None = None,
        search_k: int | None = None,
        distance: str | None = None,
    ) -> AnnoyIndex:
        """Memory-map ``path/items.ann`` after checking ``path/index.json`` against the embeddings.

        Args:
            path: the directory holding ``items.ann`` and ``index.json``.
            vectors: ``[n_items, D]`` float32 item embeddings the index must have been built from
                (``read_embeddings(...).vectors``); kept for exact re-scoring.
            expected_sha256: the embeddings' sha256 when the caller already knows it (e.g. from the
                run manifest); ``None`` hashes ``vectors`` (about 1 s per GB).
            search_k: overrides the sidecar's ``search_k``.
            distance: the distance the caller expects (the embeddings file's metadata); ``None``
                takes the sidecar's. A different distance means a different Annoy metric.

        Raises:
            IndexMismatchError: ``dim``, ``metric``, ``n_items`` (sidecar or Annoy file) or
                ``embeddings_sha256`` differ; the message names the field, the index's value and
                the expected one.
            DataError: a file is missing or unreadable.
        """
        directory = Path(path)
        sidecar = directory / SIDECAR_FILE
        ann = directory / ANN_FILE
        for file in (sidecar, ann):
            if not file.is_file():
                raise DataError(
                    f"index file {file} does not exist; build the index (recsys_metric.index.build_index)"
                )
        try:
            meta = json.loads(sidecar.read_text())
        except ValueError as err:
            raise DataError(f"index sidecar {sidecar} is not valid JSON ({err}); rebuild the index") from None
        missing = sorted(set(_SIDECAR_KEYS) - set(meta)) if isinstance(meta, dict) else list(_SIDECAR_KEYS)
        if missing or meta["distance"] not in DISTANCE_NAMES:
            problem = f"lacks {missing}" if missing else f"has distance {meta['distance']!r}"
            raise DataError(f"index sidecar {sidecar} {problem}; rebuild the index")
        side_distance = meta["distance"]
        vectors = _check_vectors(vectors)
        expected = {
            "dim": vectors.shape[1],
            "metric": ANNOY_METRICS[_check_distance(distance or side_distance)],
            "n_items": vectors.shape[0],
        }
        for field, value in expected.items():
            if meta[field] != value:
                raise IndexMismatchError(sidecar, field, meta[field], value)
        wanted_sha = expected_sha256 if expected_sha256 is not None else embeddings_sha256(vectors)
        if meta["embeddings_sha256"] != wanted_sha:
            raise IndexMismatchError(sidecar, "embeddings_sha256", meta["embeddings_sha256"], wanted_sha)
        index = annoy.AnnoyIndex(meta["dim"], meta["metric"])
        try:
            index.load(str(ann))
        except OSError as err:
            raise DataError(f"index file {ann} cannot be loaded ({err}); rebuild the index") from None
        if index.get_n_items() != meta["n_items"]:
            raise IndexMismatchError(ann, "n_items", index.get_n_items(), meta["n_items"])
        return cls(
            index,
            vectors,
            side_distance,
            n_trees=meta["n_trees"],
            search_k=meta["search_k"] if search_k is None else search_k,
            metadata=meta,
        )

    def _annoy_search_k(self, fetch: int) -> int:
        """Annoy ``search_k`` for a request of ``fetch`` candidates (see the class docstring)."""
        if self.search_k < 0:
            return -1
        return max(1, -(-self.search_k * fetch // RECALL_K))

    def _exact_index(self) -> ExactIndex:
        with self._exact_lock:
            if self._exact is None:
                self._exact = ExactIndex(self.vectors, self.distance, device="cpu")
            return self._exact

    def _search(
        self, q: np.ndarray, k: int, keys: np.ndarray, n_excluded: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n_queries, n = q.shape[0], self.n_items
        items = np.full((n_queries, k), -1, dtype=np.int64)
        scores = np.full((n_queries, k), -np.inf, dtype=np.float32)
        if n_queries == 0:
            return items, scores
        qp = self._scorer.queries(q)
        needed = np.minimum(k, n - n_excluded)
        fetch = np.minimum(k + n_excluded, n)
        todo = np.arange(n_queries)
        while todo.size:
            whole = fetch[todo] >= n
            if whole.any():
                rows = todo[whole]
                row_keys = keys[np.isin(keys // n, rows)]
                remap = np.searchsorted(rows, row_keys // n) * n + row_keys % n
                items[rows], scores[rows] = self._exact_index()._search(q[rows], k, remap, n_excluded[rows])
            todo = todo[~whole]
            if not todo.size:
                break
            found = self._annoy_round(q, qp, todo, fetch, k, keys, items, scores)
            todo = todo[found < needed[todo]]
            fetch[todo] = np.minimum(fetch[todo] * 2, n)
        return items, scores

    def _annoy_round(
        self,
        q: np.ndarray,
        qp: np.ndarray,
        rows: np.ndarray,
        fetch: np.ndarray,
        k: int,
        keys: np.ndarray,
        items: np.ndarray,
        scores: np.ndarray,
    ) -> np.ndarray:
        """Fetch ``fetch[r]`` candidates for each query ``r`` in ``rows`` (sorted), re-score, fill the results.

        ``q`` holds the raw queries (what Annoy is asked), ``qp`` the prepared ones (what is scored).

        Candidates are re-scored in chunks of about 65k pairs. Returns the number of eligible items
        found per entry of ``rows``.
        """
        found = np.zeros(rows.size, dtype=np.int64)
        cand_rows: list[np.ndarray] = []
        cand_items: list[list[int]] = []
        pending = 0
        first = 0
        for j, r in enumerate(rows):
            n_fetch = int(fetch[r])
            got = self._annoy.get_nns_by_vector(q[r], n_fetch, self._annoy_search_k(n_fetch))
            cand_items.append(got)
            cand_rows.append(np.full(len(got), r, dtype=np.int64))
            pending += len(got)
            if pending >= _RESCORE_CHUNK or j == rows.size - 1:
                pair_rows = np.concatenate(cand_rows)
                pair_items = np.fromiter(
                    (c for got_r in cand_items for c in got_r), dtype=np.int64, count=pair_rows.size
                )
                found[first : j + 1] = self._scorer.rank(
                    qp, rows[first : j + 1], pair_rows, pair_items, k, keys, items, scores
                )
                cand_rows, cand_items, pending, first = [], [], 0, j + 1
        return found


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact items (``-1`` padding ignored) that ``approx`` also returned.

    Args:
        approx: int ``[B, k]`` item numbers from the index under test.
        exact: int ``[B, k]`` item numbers from :class:`ExactIndex`.

    Returns:
        Recall in ``[0, 1]``; 1.0 when no row has an exact item.
    """
    valid = exact >= 0
    hits = ((approx[:, :, None] == exact[:, None, :]) & valid[:, None, :]).any(axis=1) & valid
    per_row = valid.sum(axis=1)
    rows = per_row > 0
    if not rows.any():
        return 1.0
    return float((hits.sum(axis=1)[rows] / per_row[rows]).mean())


def build_index(run_dir: str | Path, config: IndexConfig) -> dict[str, Any]:
    """Build the Annoy index of a run and measure it against exact search.

    Reads ``run_dir/item_embeddings.parquet``, writes ``items.ann`` and ``index.json`` into
    ``run_dir``, then runs ``similar_items`` queries (:meth:`ItemIndex.search_items`, k = 10) for
    ``config.recall_queries`` items sampled with ``config.seed``: one at a time through the Annoy
    index (the latencies) and all at once through :class:`ExactIndex` (the reference).

    Returns:
        ``{"recall_at_10", "n_trees", "search_k", "build_seconds", "size_bytes", "p50_ms",
        "p99_ms"}``; also merged into ``index.json``.

    Raises:
        DataError: the embeddings file is missing, invalid or empty.
        IndexRecallError: recall@10 is below ``config.recall_floor`` and ``config.on_low_recall``
            is ``fail`` (with ``warn`` a warning is logged instead). The files stay in ``run_dir``.
    """
    from recsys_metric.export import read_embeddings

    run_dir = Path(run_dir)
    emb_path = run_dir / "item_embeddings.parquet"
    table = read_embeddings(emb_path)
    if len(table) == 0:
        raise DataError(f"embeddings file {emb_path} has 0 rows; there is nothing to index")
    started = time.perf_counter()
    index = AnnoyIndex.build(table.vectors, table.distance, config, path=run_dir)
    build_seconds = time.perf_counter() - started
    rng = np.random.default_rng(config.seed)
    sample = np.sort(rng.choice(len(table), size=min(config.recall_queries, len(table)), replace=False))
    exact, _ = ExactIndex(table.vectors, table.distance).search_items(sample, RECALL_K)

    # Tune search_k upwards only when the configured one misses the floor, and only while the
    # latency budget allows, or exact search's own latency when that is larger (an Annoy answer at
    # the floor that is faster than the exact one is still worth having); search_k = n_trees *
    # n_items already visits every leaf.
    exhaustive = config.n_trees * len(table)
    search_k = config.search_k
    limit_ms = config.latency_budget_ms
    exact_ms: dict[str, float] = {}
    tuning: list[dict[str, float]] = []
    chosen: tuple[int, float, np.ndarray] | None = None
    while True:
        index.search_k = search_k
        recall, latencies = _measure(index, sample, exact)
        p50_ms, p99_ms = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99))
        tuning.append(
            {
                "search_k": search_k,
                "recall_at_10": round(recall, 4),
                "p50_ms": round(p50_ms, 4),
                "p99_ms": round(p99_ms, 4),
            }
        )
        # The median, not p99: a tail measured on a busy machine would make the choice a coin toss.
        within = p50_ms <= limit_ms
        if not within and recall < config.recall_floor and config.tune_search_k and not exact_ms:
            exact_ms = _exact_latency(table.vectors, table.distance, sample[:200])
            limit_ms = max(limit_ms, exact_ms["exact_p50_ms"])
            within = p50_ms <= limit_ms
        if chosen is None or within:  # the configured search_k stands even over the budget
            chosen = (search_k, recall, latencies)
        if recall >= config.recall_floor or not within or not config.tune_search_k:
            break
        if not 0 <= search_k < exhaustive:
            break
        # x2: on 100k learned items x 64 the floor lay between 8000 (0.83) and 16000 (0.92, 1.2 ms)
        search_k = min(search_k * 2, exhaustive)
    search_k, recall, latencies = chosen
    index.search_k = search_k
    serve = "annoy"
    if recall < config.recall_floor:
        exact_ms = exact_ms or _exact_latency(table.vectors, table.distance, sample[:200])
        if exact_ms["exact_p50_ms"] <= config.latency_budget_ms:
            serve = "exact"
    result = {
        "recall_at_10": round(recall, 4),
        "n_trees": config.n_trees,
        "search_k": index.search_k,
        "search_k_configured": config.search_k,
        "search_k_tuning": tuning,
        "latency_limit_ms": round(limit_ms, 4),
        "serve": serve,
        "build_seconds": round(build_seconds, 3),
        "size_bytes": (run_dir / ANN_FILE).stat().st_size,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 4),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 4),
        **exact_ms,
    }
    sidecar = run_dir / SIDECAR_FILE
    _write_json(sidecar, {**json.loads(sidecar.read_text()), **result})
    logger.info(
        "Annoy index of %d items: recall@10 %.4f at search_k %d, p50 %.3f ms, p99 %.3f ms, build %.1f s, "
        "%d bytes",
        len(table),
        recall,
        index.search_k,
        result["p50_ms"],
        result["p99_ms"],
        build_seconds,
        result["size_bytes"],
    )
    if serve == "exact":
        logger.warning(
            "Annoy index in %s reaches recall@10 %.4f within the %.1f ms median latency budget, below "
            "index.recall_floor %s; exact search answers in %.2f ms (median), so this run answers queries "
            "exactly (index.json serve: exact). More index.n_trees or a larger index.latency_budget_ms may "
            "let Annoy serve.",
            run_dir,
            recall,
            config.latency_budget_ms,
            config.recall_floor,
            exact_ms["exact_p50_ms"],
        )
    elif recall < config.recall_floor:
        message = (
            f"Annoy index in {run_dir}: recall@10 against exact search is {recall:.4f} on {sample.size} "
            f"sampled items at search_k {index.search_k}, below index.recall_floor {config.recall_floor}; "
            f"raise index.n_trees (now {config.n_trees}), index.search_k (now {config.search_k}) or "
            f"index.latency_budget_ms (now {config.latency_budget_ms})"
        )
        if config.on_low_recall == "fail":
            raise IndexRecallError(
                message + ", or set index.on_low_recall: warn", recall=recall, floor=config.recall_floor
            )
        logger.warning(message)
    return result


def _measure(index: AnnoyIndex, sample: np.ndarray, exact: np.ndarray) -> tuple[float, np.ndarray]:
    """Recall@10 of one-at-a-time ``similar_items`` queries against ``exact``, and their latencies (s)."""
    approx = np.empty((sample.size, RECALL_K), dtype=np.int64)
    latencies = np.empty(sample.size)
    for j in range(sample.size):
        t0 = time.perf_counter()
        approx[j] = index.search_items(sample[j : j + 1], RECALL_K)[0][0]
        latencies[j] = time.perf_counter() - t0
    return recall_at_k(approx, exact), latencies


def _exact_latency(vectors: np.ndarray, distance: str, sample: np.ndarray) -> dict[str, float]:
    """p50/p99 (ms) of one-at-a-time exact ``similar_items`` queries over the whole catalog."""
    exact_index = ExactIndex(vectors, distance)
    latencies = np.empty(sample.size)
    for j in range(sample.size):
        t0 = time.perf_counter()
        exact_index.search_items(sample[j : j + 1], RECALL_K)
        latencies[j] = time.perf_counter() - t0
    return {
        "exact_p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 4),
        "exact_p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 4),
    }
