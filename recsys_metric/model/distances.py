"""Distances and similarities of the shared user/item space, behind one small interface.

A :class:`Distance` turns query embeddings ``[B, D]`` (users) and reference embeddings
``[N, D]`` (items) into a ``[B, N]`` matrix. ``is_inverted`` says which way is closer, as in
pytorch-metric-learning: ``False`` for distances (smaller = closer), ``True`` for similarities
(larger = closer). Loss code reads ``is_inverted`` once and is written for both; everything
outside the loss uses :meth:`Distance.score`, where higher is better for every metric.

The metric decides two more things the model needs: :meth:`Distance.normalize` (applied to
embeddings before scoring and export) and :meth:`Distance.project` (the constraint applied to
embedding tables after each optimiser step; CML keeps euclidean embeddings in the unit ball).

:func:`score_numpy` is the numpy twin of :meth:`Distance.score` for consumers that only hold
the exported Parquet embeddings: same formula, same ranking.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys_metric.scoring import DISTANCE_NAMES, NORM_EPS, SQRT_EPS, score_numpy
from recsys_metric.scoring import check_distance_name as _check_name

__all__ = [
    "DISTANCE_NAMES",
    "NORM_EPS",
    "SQRT_EPS",
    "CosineSimilarity",
    "Distance",
    "DotProduct",
    "EuclideanDistance",
    "get_distance",
    "score_numpy",
]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Distance(ABC):
    """A metric of the embedding space.

    Subclasses set ``name`` and ``is_inverted`` and implement :meth:`pairwise` and
    :meth:`rowwise`; :meth:`score`, :meth:`normalize` and :meth:`project` have defaults that
    subclasses override where the metric needs it.
    """

    name: ClassVar[str]
    """``euclidean``, ``cosine`` or ``dot``: the value stored in the embedding files' metadata."""
    is_inverted: ClassVar[bool]
    """True for similarities (larger = closer), False for distances (smaller = closer)."""

    @abstractmethod
    def pairwise(self, q: Tensor, r: Tensor) -> Tensor:
        """Raw distance or similarity of every query to every reference.

        Args:
            q: ``[B, D]`` query embeddings.
            r: ``[N, D]`` reference embeddings, same dtype and device.

        Returns:
            ``[B, N]``: entry ``[b, n]`` compares ``q[b]`` with ``r[n]``.
        """

    @abstractmethod
    def rowwise(self, a: Tensor, b: Tensor) -> Tensor:
        """Raw distance or similarity of matching rows, broadcasting over leading dims.

        Args:
            a: ``[..., D]``, e.g. ``[B, D]`` users or ``[B, 1, D]``.
            b: ``[..., D]`` broadcastable with ``a``, e.g. ``[B, D]`` or ``[B, k, D]`` items.

        Returns:
            The broadcast leading shape, e.g. ``[B]`` or ``[B, k]``.
        """

    def score(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` ranking score: higher is better for every metric.

        Distances are negated (euclidean: ``-distance``); similarities are returned as they are.
        """
        out = self.pairwise(q, r)
        return out if self.is_inverted else -out

    def score_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """:meth:`score` written into ``out`` (``[B, N]``, contiguous; no gradients): the same
        floats, without allocating the ``[B, N]`` result. Returns ``out``."""
        return out.copy_(self.score(q, r))

    def rank_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """Scores in the order of :meth:`score_into`, written into ``out``, for an evaluation that
        reads only ranks (early stopping's validation): :meth:`score_into` by default; cheaper
        where a monotone transform can be left out (euclidean). Items whose scores tie in one may
        be strictly ordered in the other. Returns ``out``."""
        return self.score_into(q, r, out)

    def normalize(self, emb: Tensor) -> Tensor:
        """What the model applies to ``[..., D]`` embeddings before scoring; identity by default."""
        return emb

    def project(self, weight: Tensor, rows: Tensor | None = None) -> None:
        """In-place constraint on an ``[n, D]`` embedding table after an optimiser step.

        No-op by default. ``rows`` (``[m]`` int64, duplicates allowed) restricts the work to the
        rows a step touched; ``None`` projects the whole table.
        """
        return None


@dataclass(frozen=True)
class EuclideanDistance(Distance):
    """L2 distance ``||q - r||``, or its square with ``squared=True`` (CML's loss uses the square).

    :meth:`score` is always ``-||q - r||`` (not squared), so rankings and exported scores do not
    depend on ``squared``; the two are monotone in each other. Embeddings are kept in the unit ball
    by :meth:`project` (CML: ``||x|| <= 1``).
    """

    squared: bool = False
    """Return squared distances from :meth:`pairwise` and :meth:`rowwise`."""

    name: ClassVar[str] = "euclidean"
    is_inverted: ClassVar[bool] = False

    def squared_pairwise(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` squared distances ``||q||^2 + ||r||^2 - 2 q.r``, clamped at 0.

        The expansion is one matrix product (fast on large blocks); cancellation can make it
        slightly negative for near-identical rows, hence the clamp. Its gradient at ``q == r`` is
        exactly ``2(q - r) = 0``.
        """
        qq = q.square().sum(-1, keepdim=True)
        rr = r.square().sum(-1)
        d2 = torch.addmm(rr, q, r.mT, alpha=-2.0)
        if _needs_grad(q, r):
            return (d2 + qq).clamp_min(0.0)
        return d2.add_(qq).clamp_min_(0.0)

    def pairwise(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` distances (squared when ``squared``), never negative or NaN."""
        d2 = self.squared_pairwise(q, r)
        if self.squared:
            return d2
        if _needs_grad(q, r):
            return (d2 + SQRT_EPS).sqrt()
        return d2.add_(SQRT_EPS).sqrt_()

    def rowwise(self, a: Tensor, b: Tensor) -> Tensor:
        """``[..., D] x [..., D] -> [...]`` distances (squared when ``squared``) from the difference.

        Computed as ``sum((a - b)^2)``, not the expansion: exact for near-identical rows.
        """
        d2 = (a - b).square().sum(-1)
        return d2 if self.squared else (d2 + SQRT_EPS).sqrt()

    def score(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` ``-||q - r||`` (never the squared distance)."""
        d2 = self.squared_pairwise(q, r)
        if _needs_grad(q, r):
            return -(d2 + SQRT_EPS).sqrt()
        return d2.add_(SQRT_EPS).sqrt_().neg_()

    def score_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """:meth:`score` into ``out``: the same operations in the same order, so the same floats."""
        qq = q.square().sum(-1, keepdim=True)
        rr = r.square().sum(-1)
        torch.addmm(rr, q, r.mT, alpha=-2.0, out=out)
        return out.add_(qq).clamp_min_(0.0).add_(SQRT_EPS).sqrt_().neg_()

    def rank_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """``2 q.r - ||r||^2`` into ``out``: ``||q||^2 - ||q - r||^2``, so the order of
        :meth:`score_into` within each row, from one product. The row's ``||q||^2``, the clamp
        and the square root are monotone in each row and left out: five element-wise passes over
        ``[B, N]`` that cost an ml-latest-small validation about a third of its time while
        another fit trains beside it."""
        return torch.addmm(r.square().sum(-1), q, r.mT, beta=-1.0, alpha=2.0, out=out)

    def project(self, weight: Tensor, rows: Tensor | None = None) -> None:
        """Rescale rows of ``[n, D]`` ``weight`` with norm above 1 onto the unit sphere, in place.

        Rows with norm <= 1 are left bit-for-bit unchanged; the others keep their direction and
        end with norm 1 up to float rounding (``torch.renorm`` divides by ``norm + 1e-7``).
        """
        with torch.no_grad():
            if rows is None:
                weight.renorm_(2, 0, 1.0)
            else:
                weight[rows] = weight[rows].renorm(2, 0, 1.0)


@dataclass(frozen=True)
class CosineSimilarity(Distance):
    """Cosine of the angle between ``q`` and ``r``, in ``[-1, 1]``; zero vectors score 0.

    The model unit-normalises embeddings (:meth:`normalize`), so on model output this equals the
    dot product; :meth:`pairwise` normalises again so it is a true cosine on any input.
    """

    name: ClassVar[str] = "cosine"
    is_inverted: ClassVar[bool] = True

    def pairwise(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` cosine similarities."""
        return self.normalize(q) @ self.normalize(r).mT

    def score_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """:meth:`score` into ``out`` (the same product)."""
        return torch.mm(self.normalize(q), self.normalize(r).mT, out=out)

    def rowwise(self, a: Tensor, b: Tensor) -> Tensor:
        """``[..., D] x [..., D] -> [...]`` cosine similarities."""
        return (self.normalize(a) * self.normalize(b)).sum(-1)

    def normalize(self, emb: Tensor) -> Tensor:
        """``[..., D]`` rows scaled to unit L2 norm (zero rows stay zero)."""
        return F.normalize(emb, p=2.0, dim=-1, eps=NORM_EPS)


@dataclass(frozen=True)
class DotProduct(Distance):
    """Inner product ``q . r`` (a similarity; unbounded, embeddings are not constrained)."""

    name: ClassVar[str] = "dot"
    is_inverted: ClassVar[bool] = True

    def pairwise(self, q: Tensor, r: Tensor) -> Tensor:
        """``[B, D] x [N, D] -> [B, N]`` inner products."""
        return q @ r.mT

    def score_into(self, q: Tensor, r: Tensor, out: Tensor) -> Tensor:
        """:meth:`score` into ``out`` (the same product)."""
        return torch.mm(q, r.mT, out=out)

    def rowwise(self, a: Tensor, b: Tensor) -> Tensor:
        """``[..., D] x [..., D] -> [...]`` inner products."""
        return (a * b).sum(-1)


def get_distance(name: str) -> Distance:
    """The :class:`Distance` for ``euclidean`` (not squared), ``cosine`` or ``dot``.

    Raises:
        ConfigError: for any other name.
    """
    _check_name(name)
    if name == "euclidean":
        return EuclideanDistance()
    if name == "cosine":
        return CosineSimilarity()
    return DotProduct()
