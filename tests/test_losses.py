import math

import pytest
import torch

from recsys_metric.model.distances import CosineSimilarity, DotProduct, EuclideanDistance
from recsys_metric.model.losses import (
    bpr_loss,
    contrastive_loss,
    item_centric_loss,
    sampled_softmax_loss,
    triplet_margin_loss,
    triplet_violations,
    warp_weight,
)

ATOL = 1e-6


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _pos_neg(is_inverted, b=7, k=5, seed=0):
    """Distances in [0, 2) or cosine-like similarities in (-1, 1), with violators and non-violators."""
    pos = torch.rand(b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    neg = torch.rand(b, k, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    if is_inverted:
        return 2 * pos - 1, 2 * neg - 1
    return 2 * pos, 2 * neg


def _loop_triplet(pos, neg, margin, weighting, is_inverted, n_items=None):
    """Per-example triplet losses from explicit (query, positive, negative_j) triplets."""
    out = []
    for b in range(pos.shape[0]):
        p = pos[b].item()
        hinges = []
        for j in range(neg.shape[1]):
            n = neg[b, j].item()
            v = margin - p + n if is_inverted else margin + p - n
            hinges.append(max(v, 0.0))
        if weighting == "mean":
            out.append(sum(hinges) / len(hinges))
            continue
        negs = neg[b].tolist()
        hardest = max(negs) if is_inverted else min(negs)
        loss = max(margin - p + hardest if is_inverted else margin + p - hardest, 0.0)
        if weighting == "warp":
            violators = sum(h > 0 for h in hinges)
            loss *= math.log(1 + math.floor(n_items * violators / len(hinges)))
        out.append(loss)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("is_inverted", [False, True])
@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
def test_triplet_matches_loop_over_triplets(weighting, is_inverted):
    pos, neg = _pos_neg(is_inverted)
    margin = 0.4
    expected = _loop_triplet(pos, neg, margin, weighting, is_inverted, n_items=37)
    assert expected.min() == 0 and expected.max() > 0
    kw = dict(margin=margin, weighting=weighting, is_inverted=is_inverted, n_items=37)
    per = triplet_margin_loss(pos, neg, reduction="none", **kw)
    torch.testing.assert_close(per, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(triplet_margin_loss(pos, neg, **kw), expected.mean(), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        triplet_margin_loss(pos, neg, reduction="sum", **kw), expected.sum(), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("is_inverted", [False, True])
def test_triplet_float32_on_embeddings(is_inverted):
    dist = CosineSimilarity() if is_inverted else EuclideanDistance(squared=True)
    u, p, n = _rand(6, 8, seed=1), _rand(6, 8, seed=2), _rand(6, 4, 8, seed=3)
    pos, neg = dist.rowwise(u, p), dist.rowwise(u.unsqueeze(1), n)
    expected = _loop_triplet(pos, neg, 0.5, "warp", is_inverted, n_items=100).mean()
    got = triplet_margin_loss(
        pos.float(), neg.float(), margin=0.5, weighting="warp", is_inverted=is_inverted, n_items=100
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)


def test_warp_weight_formula():
    counts = torch.tensor([0, 1, 2, 3])
    weights = warp_weight(counts, k=3, n_items=10, dtype=torch.float64)
    # floor(10 * c / 3) = 0, 3, 6, 10
    expected = torch.tensor([0.0, math.log(4), math.log(7), math.log(11)], dtype=torch.float64)
    torch.testing.assert_close(weights, expected)
    assert warp_weight(counts, k=3, n_items=10).dtype == torch.float32
    big = warp_weight(torch.tensor([1]), k=3, n_items=10**12, dtype=torch.float64)
    torch.testing.assert_close(big, torch.tensor([math.log1p(333333333333)], dtype=torch.float64))


@pytest.mark.parametrize("is_inverted", [False, True])
def test_warp_weight_counts_violators_and_is_constant(is_inverted):
    sign = -1.0 if is_inverted else 1.0
    # distances: pos 1.0, margin 0.5 -> negatives below 1.5 violate: 3 of 4 in row 0, 0 in row 1.
    pos = torch.tensor([1.0, 1.0], dtype=torch.float64) * sign
    neg = (
        torch.tensor([[1.2, 0.8, 1.4, 2.0], [1.6, 1.7, 3.0, 2.5]], dtype=torch.float64) * sign
    ).requires_grad_()
    loss = triplet_margin_loss(
        pos, neg, margin=0.5, weighting="warp", is_inverted=is_inverted, n_items=8, reduction="none"
    )
    w = math.log(1 + 6)
    torch.testing.assert_close(loss.detach(), torch.tensor([0.7 * w, 0.0], dtype=torch.float64))
    loss.sum().backward()
    # Gradient only through the hinge of the hardest negative, scaled by the constant weight.
    expected = torch.zeros_like(neg)
    expected[0, 1] = -w * sign
    torch.testing.assert_close(neg.grad, expected)


@pytest.mark.parametrize("is_inverted", [False, True])
def test_hardest_picks_the_hardest_negative(is_inverted):
    pos, neg = _pos_neg(is_inverted, b=6, k=5, seed=4)
    neg.requires_grad_()
    margin = 3.0  # every triplet violates, so every row has a gradient
    loss = triplet_margin_loss(pos, neg, margin=margin, weighting="hardest", is_inverted=is_inverted)
    loss.backward()
    hardest = neg.detach().argmax(1) if is_inverted else neg.detach().argmin(1)
    assert torch.equal(neg.grad.ne(0).nonzero()[:, 1], hardest)
    assert torch.equal(neg.grad.ne(0).sum(1), torch.ones(6, dtype=torch.long))
    picked = neg.detach().gather(1, hardest.unsqueeze(1)).squeeze(1)
    expected = (margin - pos + picked) if is_inverted else (margin + pos - picked)
    per = triplet_margin_loss(
        pos, neg.detach(), margin=margin, weighting="hardest", is_inverted=is_inverted, reduction="none"
    )
    torch.testing.assert_close(per, expected)


def test_triplet_violations_sign():
    pos = torch.tensor([1.0])
    neg = torch.tensor([[0.5, 2.0]])
    torch.testing.assert_close(
        triplet_violations(pos, neg, margin=0.1, is_inverted=False), torch.tensor([[0.6, -0.9]])
    )
    torch.testing.assert_close(
        triplet_violations(pos, neg, margin=0.1, is_inverted=True), torch.tensor([[-0.4, 1.1]])
    )


@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
def test_gradients_flow_without_nan_at_zero_distance(weighting):
    dist = EuclideanDistance()
    u = _rand(4, 6, seed=5, dtype=torch.float32).requires_grad_()
    items = u.detach().clone().requires_grad_()  # positive item == user: distance 0
    negs = _rand(4, 3, 6, seed=6, dtype=torch.float32).requires_grad_()
    pos = dist.rowwise(u, items)
    neg = dist.rowwise(u.unsqueeze(1), negs)
    loss = triplet_margin_loss(pos, neg, margin=10.0, weighting=weighting, is_inverted=False, n_items=50)
    loss.backward()
    for t in (u, items, negs):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert negs.grad.abs().sum() > 0


def test_triplet_errors():
    pos, neg = torch.zeros(3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="weighting 'warp' needs n_items, the catalog size"):
        triplet_margin_loss(pos, neg, margin=0.5, weighting="warp", is_inverted=False)
    with pytest.raises(ValueError, match="unknown weighting 'max'"):
        triplet_margin_loss(pos, neg, margin=0.5, weighting="max", is_inverted=False)
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        triplet_margin_loss(pos, neg, margin=0.5, weighting="mean", is_inverted=False, reduction="avg")
    with pytest.raises(
        ValueError, match=r"expected pos \[B\] and neg \[B, k\] with k >= 1, got pos \[3\] and neg \[2, 2\]"
    ):
        triplet_margin_loss(pos, torch.zeros(2, 2), margin=0.5, weighting="mean", is_inverted=False)
    with pytest.raises(ValueError, match="got pos"):
        bpr_loss(pos, torch.zeros(3))


def _loop_item_centric(pos, item_neg, neg, margin, weighting, is_inverted):
    """Per-example item-centric losses: the hardest user-term negative's hinge, or the mean."""
    out = []
    for b in range(pos.shape[0]):
        p = pos[b].item()
        sign = -1.0 if is_inverted else 1.0
        user_v = [margin + sign * (p - neg[b, j].item()) for j in range(neg.shape[1])]
        item_h = [max(0.0, margin + sign * (p - item_neg[b, j].item())) for j in range(neg.shape[1])]
        if weighting == "mean":
            out.append(sum(item_h) / len(item_h))
        else:
            out.append(item_h[max(range(len(user_v)), key=lambda j: user_v[j])])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
@pytest.mark.parametrize("is_inverted", [False, True])
def test_item_centric_matches_loop_over_triplets(weighting, is_inverted):
    pos, neg = _pos_neg(is_inverted, seed=3)
    _, item_neg = _pos_neg(is_inverted, seed=9)
    got = item_centric_loss(
        pos, item_neg, neg, margin=0.5, weighting=weighting, is_inverted=is_inverted, reduction="none"
    )
    expected = _loop_item_centric(pos, item_neg, neg, 0.5, weighting, is_inverted)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    slots = 0.5 + (item_neg - pos.unsqueeze(1) if is_inverted else pos.unsqueeze(1) - item_neg)
    assert (slots > 0).any() and (slots <= 0).any(), "the data must have violators and non-violators"
    total = item_centric_loss(pos, item_neg, neg, margin=0.5, weighting=weighting, is_inverted=is_inverted)
    torch.testing.assert_close(total, expected.mean(), atol=ATOL, rtol=0)


def test_item_centric_gradient_reaches_only_the_hardest_slot_and_masked_slots_never_violate():
    pos = torch.tensor([1.0, 1.0], dtype=torch.float64)
    neg = torch.tensor([[0.5, 3.0, 0.2], [2.0, 2.5, 3.0]], dtype=torch.float64)  # hardest: slots 2, 0
    item_neg = torch.tensor(
        [[0.1, 0.1, 0.3], [0.2, 0.1, float("inf")]], dtype=torch.float64, requires_grad=True
    )
    loss = item_centric_loss(
        pos, item_neg, neg, margin=1.0, weighting="hardest", is_inverted=False, reduction="sum"
    )
    loss.backward()
    assert float(loss.detach()) == pytest.approx((1.0 + 1.0 - 0.3) + (1.0 + 1.0 - 0.2))
    assert item_neg.grad.tolist() == [[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]
    mean = item_centric_loss(pos, item_neg.detach(), neg, margin=1.0, weighting="mean", is_inverted=False)
    # Row 2's masked slot (+inf distance) counts 0 in the mean over k = 3.
    assert float(mean) == pytest.approx(((1.9 + 1.9 + 1.7) / 3 + (1.8 + 1.9 + 0.0) / 3) / 2)
    with pytest.raises(ValueError, match=r"item_neg \[2, 2\] must have the shape of neg \[2, 3\]"):
        item_centric_loss(pos, item_neg[:, :2], neg, margin=1.0, weighting="mean", is_inverted=False)


@pytest.mark.parametrize("is_inverted", [False, True])
def test_contrastive_matches_loop_over_pairs(is_inverted):
    pos, neg = _pos_neg(is_inverted, seed=7)
    margin = 0.3 if is_inverted else 1.2
    pos_terms, neg_terms = [], []
    for b in range(pos.shape[0]):
        p = pos[b].item()
        pos_terms.append(max(1.0 - p, 0.0) if is_inverted else p)
        for j in range(neg.shape[1]):
            n = neg[b, j].item()
            neg_terms.append(max(n - margin, 0.0) if is_inverted else max(margin - n, 0.0))
    expected = sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(neg_terms)
    got = contrastive_loss(pos, neg, margin=margin, is_inverted=is_inverted)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, abs=ATOL)


def test_contrastive_similarity_positive_term_hinges_at_one():
    neg = torch.full((2, 1), -5.0)
    loss = contrastive_loss(torch.tensor([3.0, 0.25]), neg, margin=0.0, is_inverted=True)
    assert loss.item() == pytest.approx(0.375)


def test_bpr_matches_loop():
    pos, neg = _rand(5, seed=8) * 3, _rand(5, 4, seed=9) * 3
    terms = [
        -math.log(1.0 / (1.0 + math.exp(-(pos[b].item() - neg[b, j].item()))))
        for b in range(5)
        for j in range(4)
    ]
    assert bpr_loss(pos, neg).item() == pytest.approx(sum(terms) / len(terms), abs=ATOL)
    assert torch.isfinite(bpr_loss(torch.tensor([-200.0]), torch.tensor([[200.0]])))


def _loop_softmax(query, items, dist, temperature, log_q=None, nums=None):
    """Per-row cross-entropy over the row's candidates, accidental hits left out."""
    total = 0.0
    n = query.shape[0]
    for b in range(n):
        logits = []
        for j in range(n):
            if nums is not None and j != b and nums[j] == nums[b]:
                continue
            x, y = query[b].tolist(), items[j].tolist()
            dot = sum(u * v for u, v in zip(x, y, strict=True))
            if dist.name == "euclidean":
                s = -math.dist(x, y)
            elif dist.name == "cosine":
                s = dot / (math.hypot(*x) * math.hypot(*y))
            else:
                s = dot
            logit = s / temperature - (log_q[j].item() if log_q is not None else 0.0)
            logits.append((j, logit))
        top = max(v for _, v in logits)
        lse = top + math.log(sum(math.exp(v - top) for _, v in logits))
        total += lse - dict(logits)[b]
    return total / n


@pytest.mark.parametrize(
    "dist", [EuclideanDistance(), EuclideanDistance(squared=True), CosineSimilarity(), DotProduct()]
)
def test_sampled_softmax_matches_loop_with_hit_mask(dist):
    n = 6
    query, items = _rand(n, 4, seed=10), _rand(n, 4, seed=11)
    nums = torch.tensor([3, 7, 3, 1, 7, 3])
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.3, 0.05, 0.1, 0.3], dtype=torch.float64))
    plain = sampled_softmax_loss(query, items, dist, temperature=0.5)
    assert plain.item() == pytest.approx(_loop_softmax(query, items, dist, 0.5), abs=ATOL)
    masked = sampled_softmax_loss(query, items, dist, temperature=0.5, log_q=log_q, pos_item_nums=nums)
    assert masked.item() == pytest.approx(_loop_softmax(query, items, dist, 0.5, log_q, nums), abs=ATOL)
    only_mask = sampled_softmax_loss(query, items, dist, temperature=0.5, pos_item_nums=nums)
    assert only_mask.item() == pytest.approx(_loop_softmax(query, items, dist, 0.5, None, nums), abs=ATOL)
    assert only_mask.item() < plain.item()


def test_sampled_softmax_gradients_finite_with_hits_and_zero_distance():
    query = _rand(5, 4, seed=12, dtype=torch.float32).requires_grad_()
    items = query.detach().clone().requires_grad_()
    nums = torch.tensor([0, 0, 0, 1, 2])
    loss = sampled_softmax_loss(query, items, EuclideanDistance(), temperature=0.1, pos_item_nums=nums)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(query.grad).all() and torch.isfinite(items.grad).all()
    all_same = sampled_softmax_loss(
        query, items, DotProduct(), pos_item_nums=torch.zeros(5, dtype=torch.long)
    )
    assert all_same.item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_softmax_errors():
    q = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"expected query and pos_items \[B, D\], got \[3, 2\] and \[2, 2\]"):
        sampled_softmax_loss(q, torch.zeros(2, 2), DotProduct())
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        sampled_softmax_loss(q, q, DotProduct(), temperature=0)
    with pytest.raises(ValueError, match=r"expected log_q \[3\], got \[3, 1\]"):
        sampled_softmax_loss(q, q, DotProduct(), log_q=torch.zeros(3, 1))
