"""Losses over per-example distances or similarities, written once for both.

The pair losses take what the trainer already computed (``pos``: ``[B]`` query-to-positive
values, ``neg``: ``[B, k]`` query-to-negative values) rather than embeddings, so the trainer is
free to compute them however it likes (rowwise, from a pairwise block, on a fast path). The flag
``is_inverted`` (from :class:`~recsys_metric.model.distances.Distance`) says whether the values are
distances (``False``: smaller = closer) or similarities (``True``: larger = closer), as in
pytorch-metric-learning; squared euclidean distances are distances like any other.

:func:`sampled_softmax_loss` is the exception: it needs the full in-batch ``[B, B]`` score
matrix, so it takes embeddings and a :class:`~recsys_metric.model.distances.Distance`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys_metric.model.distances import Distance

Weighting = Literal["hardest", "warp", "mean"]
Reduction = Literal["mean", "sum", "none"]

_WEIGHTINGS = ("hardest", "warp", "mean")
_REDUCTIONS = ("mean", "sum", "none")


def _check_pos_neg(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0] or neg.shape[1] == 0:
        raise ValueError(
            f"expected pos [B] and neg [B, k] with k >= 1, got pos {list(pos.shape)} and neg {list(neg.shape)}"
        )


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    return per_example


def triplet_violations(pos: Tensor, neg: Tensor, *, margin: float, is_inverted: bool) -> Tensor:
    """``[B] x [B, k] -> [B, k]`` margin violations before the hinge (positive = violating).

    Distances: ``margin + pos[b] - neg[b, j]``; similarities: ``margin - pos[b] + neg[b, j]``.
    """
    _check_pos_neg(pos, neg)
    pos_col = pos.unsqueeze(1)
    if is_inverted:
        return (neg - pos_col) + margin
    return (pos_col - neg) + margin


def warp_weight(n_violating: Tensor, k: int, n_items: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """CML's WARP rank weight ``log(1 + floor(n_items * n_violating / k))``, with no gradient.

    ``floor(n_items * M / k)`` estimates the rank of the positive item among all ``n_items`` items
    from the ``M`` of ``k`` sampled negatives that violate the margin (Hsieh et al. 2017, after
    Weston et al.'s WARP). The product is taken in int64, so the floor is exact.

    Args:
        n_violating: ``[B]`` integer count of violating negatives per example, in ``[0, k]``.
        k: negatives per example.
        n_items: catalog size.
        dtype: floating dtype of the result.

    Returns:
        ``[B]`` weights; 0 where nothing violates.
    """
    rank = torch.div(n_violating.to(torch.int64) * n_items, k, rounding_mode="floor")
    return torch.log1p(rank.to(dtype))


def triplet_margin_loss(
    pos: Tensor,
    neg: Tensor,
    *,
    margin: float,
    weighting: Weighting,
    is_inverted: bool,
    n_items: int | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Triplet hinge loss of (query, positive, k negatives), for distances or similarities.

    With ``v[b, j]`` the violation (:func:`triplet_violations`: ``margin + pos - neg`` for
    distances, ``margin - pos + neg`` for similarities) and ``h = max(v, 0)``, the per-example
    loss ``l[b]`` is:

    - ``hardest``: ``max_j h[b, j]``, the hinge of the hardest negative (smallest distance or
      largest similarity); only that negative gets a gradient.
    - ``warp``: ``max_j h[b, j] * log(1 + floor(n_items * M[b] / k))`` with
      ``M[b] = #{j : v[b, j] > 0}``, as CML (Hsieh et al. 2017); the weight is a constant
      (:func:`warp_weight`). CML's reference code omits the floor; the paper has it.
    - ``mean``: ``mean_j h[b, j]``, over all k negatives (non-violators count as 0).

    Args:
        pos: ``[B]`` query-to-positive distance or similarity.
        neg: ``[B, k]`` query-to-negative distances or similarities.
        margin: hinge margin, in the units of ``pos``/``neg`` (squared units for squared distances).
        weighting: ``hardest``, ``warp`` or ``mean``.
        is_inverted: True when ``pos``/``neg`` are similarities.
        n_items: catalog size; required for ``warp``.
        reduction: ``mean`` or ``sum`` over B, or ``none`` for the ``[B]`` losses.

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``; dtype of ``pos``/``neg``.

    Raises:
        ValueError: for wrong shapes, an unknown weighting or reduction, or ``warp`` without a
            positive ``n_items``.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(_WEIGHTINGS)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: use one of {', '.join(_REDUCTIONS)}")
    if weighting == "warp" and (n_items is None or n_items < 1):
        raise ValueError(f"weighting 'warp' needs n_items, the catalog size (>= 1), got {n_items!r}")
    violation = triplet_violations(pos, neg, margin=margin, is_inverted=is_inverted)
    if weighting == "mean":
        per_example = violation.clamp_min(0.0).mean(1)
    else:
        per_example = violation.amax(1).clamp_min(0.0)
        if weighting == "warp":
            with torch.no_grad():
                weight = warp_weight((violation > 0).sum(1), neg.shape[1], n_items, per_example.dtype)
            per_example = per_example * weight
    return _reduce(per_example, reduction)


def item_centric_loss(
    pos: Tensor,
    item_neg: Tensor,
    neg: Tensor,
    *,
    margin: float,
    weighting: Weighting,
    is_inverted: bool,
    reduction: Reduction = "mean",
) -> Tensor:
    """Item-centric triplet hinge (Symmetric Metric Learning, Li et al. 2020) on the negatives
    that :func:`triplet_margin_loss` uses.

    With ``w[b, j]`` the item-centric violation ``margin + pos[b] - item_neg[b, j]`` (distances;
    ``margin - pos[b] + item_neg[b, j]`` for similarities) and ``h = max(w, 0)``:

    - ``hardest`` and ``warp``: ``h[b, j*]``, ``j*`` the user term's hardest negative (the
      largest :func:`triplet_violations` of ``pos`` and ``neg``), without the WARP weight;
    - ``mean``: ``mean_j h[b, j]`` over all k negatives.

    Args:
        pos: ``[B]`` query-to-positive distance or similarity.
        item_neg: ``[B, k]`` positive-to-negative distances or similarities (invalid slots: +inf
            distance or -inf similarity, so that they never violate).
        neg: ``[B, k]`` query-to-negative values, which choose the hardest negative.
        margin, is_inverted, reduction: as :func:`triplet_margin_loss`.
        weighting: ``hardest``, ``warp`` or ``mean``.

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``.

    Raises:
        ValueError: for wrong shapes (``item_neg`` must match ``neg``), an unknown weighting or
            reduction.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}: use one of {', '.join(_WEIGHTINGS)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: use one of {', '.join(_REDUCTIONS)}")
    if item_neg.shape != neg.shape:
        raise ValueError(f"item_neg {list(item_neg.shape)} must have the shape of neg {list(neg.shape)}")
    item_violation = triplet_violations(pos, item_neg, margin=margin, is_inverted=is_inverted)
    if weighting == "mean":
        per_example = item_violation.clamp_min(0.0).mean(1)
    else:
        with torch.no_grad():
            hardest = triplet_violations(pos, neg, margin=margin, is_inverted=is_inverted).argmax(1)
        per_example = item_violation.gather(1, hardest.unsqueeze(1)).squeeze(1).clamp_min(0.0)
    return _reduce(per_example, reduction)


def contrastive_loss(pos: Tensor, neg: Tensor, *, margin: float, is_inverted: bool) -> Tensor:
    """Contrastive pair loss: pull positive pairs together, push negative pairs past the margin.

    Every ``(query, positive)`` and every ``(query, negative)`` is a pair. Per pair:

    - distances (``is_inverted=False``): positive ``pos``, negative ``max(margin - neg, 0)``
      (positives pulled to distance 0, negatives pushed out to ``margin``).
    - similarities (``is_inverted=True``): positive ``max(1 - pos, 0)``, negative
      ``max(neg - margin, 0)`` (positives pulled up to similarity 1, which for cosine is
      ``1 - cos``; negatives pushed down to ``margin``).

    Loss = mean of the B positive terms + mean of the B*k negative terms, i.e.
    ``mean_b (p[b] + mean_j n[b, j])``.

    Args:
        pos: ``[B]`` query-to-positive distance or similarity.
        neg: ``[B, k]`` query-to-negative distances or similarities.
        margin: distance negatives must exceed, or similarity they must fall below.
        is_inverted: True when ``pos``/``neg`` are similarities.

    Returns:
        A scalar.
    """
    _check_pos_neg(pos, neg)
    if is_inverted:
        pos_term = (1.0 - pos).clamp_min(0.0)
        neg_term = (neg - margin).clamp_min(0.0)
    else:
        pos_term = pos
        neg_term = (margin - neg).clamp_min(0.0)
    return pos_term.mean() + neg_term.mean()


def bpr_loss(pos_score: Tensor, neg_score: Tensor) -> Tensor:
    """Bayesian personalised ranking: ``mean_{b,j} -log sigmoid(pos_score[b] - neg_score[b, j])``.

    Args:
        pos_score: ``[B]`` query-to-positive scores (higher is better: ``Distance.score`` sense,
            e.g. negated distances).
        neg_score: ``[B, k]`` query-to-negative scores.

    Returns:
        A scalar (``logsigmoid`` keeps it finite for large margins).
    """
    _check_pos_neg(pos_score, neg_score)
    return -F.logsigmoid(pos_score.unsqueeze(1) - neg_score).mean()


def sampled_softmax_loss(
    query: Tensor,
    pos_items: Tensor,
    distance: Distance,
    *,
    temperature: float = 0.1,
    log_q: Tensor | None = None,
    pos_item_nums: Tensor | None = None,
) -> Tensor:
    """In-batch sampled softmax: row b's positive is the target, every other row's positive a negative.

    ``logits[b, j] = distance.score(query, pos_items)[b, j] / temperature - log_q[j]``; with
    ``pos_item_nums``, entries with ``j != b`` and ``pos_item_nums[j] == pos_item_nums[b]``
    (accidental hits: the row's own positive sampled again as a negative) are removed (set to
    ``-inf``). Loss = ``mean_b cross_entropy(logits[b], target=b)``.

    Args:
        query: ``[B, D]`` query (user) embeddings.
        pos_items: ``[B, D]`` embeddings of each row's positive item.
        distance: the metric; its ``score`` gives the logits (euclidean: ``-distance``).
        temperature: divides the scores (> 0); smaller is sharper.
        log_q: ``[B]`` log sampling probability of each row's positive item as an in-batch
            negative (logQ correction, Yi et al. 2019: popular items appear more often as
            negatives and would be over-penalised).
        pos_item_nums: ``[B]`` dense item numbers of the positives, to mask accidental hits.

    Returns:
        A scalar.

    Raises:
        ValueError: for mismatched shapes or a temperature <= 0.
    """
    if query.dim() != 2 or pos_items.shape != query.shape:
        raise ValueError(
            f"expected query and pos_items [B, D], got {list(query.shape)} and {list(pos_items.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = query.shape[0]
    for label, t in (("log_q", log_q), ("pos_item_nums", pos_item_nums)):
        if t is not None and t.shape != (n,):
            raise ValueError(f"expected {label} [{n}], got {list(t.shape)}")
    logits = distance.score(query, pos_items) / temperature
    if log_q is not None:
        logits = logits - log_q.to(logits.dtype).unsqueeze(0)
    if pos_item_nums is not None:
        hits = pos_item_nums.unsqueeze(0) == pos_item_nums.unsqueeze(1)
        hits.fill_diagonal_(False)
        logits = logits.masked_fill(hits, float("-inf"))
    target = torch.arange(n, device=query.device)
    return F.cross_entropy(logits, target)
