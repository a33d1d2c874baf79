import math

import numpy as np
import pytest
import torch

from recsys_metric.errors import ConfigError
from recsys_metric.model.distances import (
    CosineSimilarity,
    Distance,
    DotProduct,
    EuclideanDistance,
    get_distance,
    score_numpy,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NAMES = ["euclidean", "cosine", "dot"]


def _rand(*shape, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def _explicit(name, x, y, squared=False):
    """One pair by the textbook formula, in Python floats."""
    x, y = x.tolist(), y.tolist()
    dot = sum(a * b for a, b in zip(x, y, strict=True))
    if name == "dot":
        return dot
    if name == "cosine":
        return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))
    d2 = sum((a - b) ** 2 for a, b in zip(x, y, strict=True))
    return d2 if squared else math.sqrt(d2)


CASES = [
    (EuclideanDistance(), "euclidean", False),
    (EuclideanDistance(squared=True), "euclidean", True),
    (CosineSimilarity(), "cosine", False),
    (DotProduct(), "dot", False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dist", "name", "squared"), CASES)
def test_pairwise_and_rowwise_match_explicit_formula(dist, name, squared, device):
    q, r = _rand(3, 5, seed=1, device=device), _rand(4, 5, seed=2, device=device)
    out = dist.pairwise(q, r)
    assert out.shape == (3, 4)
    expected = torch.tensor(
        [[_explicit(name, q[b], r[n], squared) for n in range(4)] for b in range(3)], dtype=torch.float64
    )
    torch.testing.assert_close(out.cpu(), expected, atol=1e-9, rtol=1e-9)

    a, b = q, _rand(3, 5, seed=3, device=device)
    row = dist.rowwise(a, b)
    assert row.shape == (3,)
    torch.testing.assert_close(
        row.cpu(), torch.tensor([_explicit(name, a[i], b[i], squared) for i in range(3)], dtype=torch.float64)
    )

    nb = _rand(3, 4, 5, seed=4, device=device)
    broadcast = dist.rowwise(a.unsqueeze(1), nb)
    assert broadcast.shape == (3, 4)
    expected_b = torch.tensor(
        [[_explicit(name, a[i], nb[i, j], squared) for j in range(4)] for i in range(3)], dtype=torch.float64
    )
    torch.testing.assert_close(broadcast.cpu(), expected_b)


@pytest.mark.parametrize(("dist", "name", "squared"), CASES)
def test_float32_pairwise_agrees_with_rowwise(dist, name, squared):
    q, r = _rand(6, 16, seed=5, dtype=torch.float32), _rand(9, 16, seed=6, dtype=torch.float32)
    full = dist.pairwise(q, r)
    assert full.dtype == torch.float32
    rows = dist.rowwise(q.unsqueeze(1), r.unsqueeze(0))
    torch.testing.assert_close(full, rows, atol=1e-5, rtol=1e-5)


def test_flags_and_names():
    assert [d.is_inverted for d in (EuclideanDistance(), CosineSimilarity(), DotProduct())] == [
        False,
        True,
        True,
    ]
    for name in NAMES:
        dist = get_distance(name)
        assert isinstance(dist, Distance)
        assert dist.name == name
    assert get_distance("euclidean") == EuclideanDistance(squared=False)
    with pytest.raises(ConfigError, match="unknown distance 'l1': use one of euclidean, cosine, dot"):
        get_distance("l1")
    with pytest.raises(ConfigError, match="unknown distance 'manhattan'"):
        score_numpy(np.zeros((1, 2)), np.zeros((1, 2)), "manhattan")


@pytest.mark.parametrize("squared", [False, True])
def test_euclidean_score_is_minus_distance_whatever_squared(squared):
    q, r = _rand(4, 8, seed=7), _rand(10, 8, seed=8)
    score = EuclideanDistance(squared=squared).score(q, r)
    torch.testing.assert_close(score, -torch.cdist(q, r), atol=1e-9, rtol=1e-9)


def test_similarity_scores_are_the_similarity():
    q, r = _rand(4, 8, seed=9), _rand(10, 8, seed=10)
    torch.testing.assert_close(DotProduct().score(q, r), q @ r.T)
    cos = torch.nn.functional.cosine_similarity(q.unsqueeze(1), r.unsqueeze(0), dim=-1)
    torch.testing.assert_close(CosineSimilarity().score(q, r), cos)


@pytest.mark.parametrize(("dist", "name", "squared"), CASES)
def test_closest_is_highest_score(dist, name, squared):
    q, r = _rand(5, 6, seed=11), _rand(30, 6, seed=12)
    raw = dist.pairwise(q, r)
    by_closeness = torch.argsort(raw, dim=1, descending=dist.is_inverted)
    by_score = torch.argsort(dist.score(q, r), dim=1, descending=True)
    assert torch.equal(by_closeness, by_score)

    # Known winner: item 0 is the query itself (euclidean: distance 0; cosine: angle 0),
    # item 1 the query scaled by 3 (dot: largest inner product, cosine ties item 0).
    items = torch.cat([q[:1], 3 * q[:1], r], dim=0)
    best = dist.score(q[:1], items).argmax(dim=1).item()
    assert best == (1 if name == "dot" else 0)


def test_euclidean_is_safe_at_zero_distance_and_under_cancellation():
    x = _rand(4, 8, seed=13, dtype=torch.float32) * 100.0
    d = EuclideanDistance().pairwise(x, x)
    assert torch.isfinite(d).all() and (d >= 0).all()
    assert torch.all(torch.diagonal(d) < 0.1)
    d2 = EuclideanDistance(squared=True).pairwise(x, x + 1e-4)
    assert (d2 >= 0).all()
    assert EuclideanDistance().rowwise(x, x).max().item() == pytest.approx(1e-6)


@pytest.mark.parametrize("squared", [False, True])
def test_no_nan_gradient_at_zero_distance(squared):
    dist = EuclideanDistance(squared=squared)
    q = _rand(3, 4, seed=14, dtype=torch.float32).requires_grad_()
    r = q.detach().clone().requires_grad_()
    loss = dist.pairwise(q, r).sum() + dist.rowwise(q, r).sum() + dist.score(q, r).sum()
    loss.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(r.grad).all()

    zero = torch.zeros(2, 4, requires_grad=True)
    CosineSimilarity().pairwise(zero, zero).sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_pairwise_gradient_matches_autograd_of_cdist():
    q = _rand(3, 5, seed=15).requires_grad_()
    r = _rand(4, 5, seed=16).requires_grad_()
    w = _rand(3, 4, seed=17)
    (EuclideanDistance().pairwise(q, r) * w).sum().backward()
    gq, gr = q.grad.clone(), r.grad.clone()
    q.grad = r.grad = None
    (torch.cdist(q, r) * w).sum().backward()
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gr, r.grad)


def test_normalize():
    x = _rand(5, 7, seed=18) * 3.0
    x[2] = 0.0
    unit = CosineSimilarity().normalize(x)
    torch.testing.assert_close(unit.norm(dim=1), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert EuclideanDistance().normalize(x) is x
    assert DotProduct().normalize(x) is x


@pytest.mark.parametrize("device", DEVICES)
def test_euclidean_project_puts_rows_in_unit_ball(device):
    w = torch.nn.Parameter(_rand(50, 8, seed=19, dtype=torch.float32, device=device) * 0.5)
    before = w.detach().clone()
    norms = before.norm(dim=1)
    inside, outside = norms <= 1.0, norms > 1.0
    assert inside.any() and outside.any()

    EuclideanDistance().project(w)

    after = w.detach()
    assert torch.all(after.norm(dim=1) <= 1.0 + 1e-6)
    assert torch.equal(after[inside], before[inside])
    torch.testing.assert_close(after[outside].norm(dim=1), torch.ones(int(outside.sum()), device=device))
    direction = torch.nn.functional.cosine_similarity(after[outside], before[outside], dim=1)
    torch.testing.assert_close(direction, torch.ones_like(direction))


def test_euclidean_project_only_touched_rows():
    w = torch.full((6, 3), 2.0)
    rows = torch.tensor([4, 1, 4])
    EuclideanDistance().project(w, rows=rows)
    norms = w.norm(dim=1)
    assert torch.all(norms[[1, 4]] <= 1.0 + 1e-6)
    assert torch.equal(w[[0, 2, 3, 5]], torch.full((4, 3), 2.0))


@pytest.mark.parametrize("dist", [CosineSimilarity(), DotProduct()])
def test_similarity_project_is_noop(dist):
    w = _rand(5, 4, seed=20) * 10
    before = w.clone()
    dist.project(w)
    assert torch.equal(w, before)


@pytest.mark.parametrize("name", NAMES)
def test_score_numpy_matches_torch_values_and_ranking(name):
    rng = np.random.default_rng(21)
    q = rng.normal(size=(20, 32)).astype(np.float32) / np.float32(np.sqrt(32))
    r = rng.normal(size=(300, 32)).astype(np.float32) / np.float32(np.sqrt(32))
    out = score_numpy(q, r, name)
    assert out.dtype == np.float32 and out.shape == (20, 300)
    ref = get_distance(name).score(torch.from_numpy(q), torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(
        np.argsort(-out, axis=1, kind="stable"), np.argsort(-ref, axis=1, kind="stable")
    )
    assert score_numpy(q.astype(np.float64), r.astype(np.float64), name).dtype == np.float64


def test_score_numpy_edge_rows():
    x = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    assert np.all(np.isfinite(score_numpy(x, x, "cosine")))
    np.testing.assert_allclose(score_numpy(x, x, "cosine"), [[0.0, 0.0], [0.0, 1.0]], atol=1e-7)
    np.testing.assert_allclose(score_numpy(x, x, "euclidean"), [[-1e-6, -5.0], [-5.0, -1e-6]], atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dist", "name", "squared"), CASES)
def test_score_into_gives_the_same_floats_as_score(dist, name, squared, device):
    # Evaluation ranks score_into's output; any difference in the last bit could reorder ties.
    q = _rand(37, 16, seed=5, dtype=torch.float32, device=device)
    r = _rand(301, 16, seed=6, dtype=torch.float32, device=device)
    out = torch.full((40, 301), float("nan"), device=device)
    with torch.no_grad():
        got = dist.score_into(q, r, out[:37])
        assert torch.equal(got, dist.score(q, r))
    assert got.data_ptr() == out.data_ptr() and torch.isnan(out[37:]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dist", "name", "squared"), CASES)
def test_rank_into_orders_each_row_as_score_into(dist, name, squared, device):
    # Early stopping ranks rank_into's output: each row in rank_into's order must be in
    # score_into's order too. Only score_into's ties may fall either way: its square root
    # collapses distances a float apart, which one product keeps apart.
    q = _rand(37, 16, seed=7, dtype=torch.float32, device=device) * 0.3
    r = _rand(301, 16, seed=8, dtype=torch.float32, device=device) * 0.3
    out = torch.full((40, 301), float("nan"), device=device)
    with torch.no_grad():
        exact = dist.score_into(q, r, torch.empty(37, 301, device=device))
        got = dist.rank_into(q, r, out[:37])
    assert got.data_ptr() == out.data_ptr() and torch.isnan(out[37:]).all()
    order = torch.argsort(got, dim=1, descending=True, stable=True)
    along = exact.gather(1, order)
    assert bool((along[:, 1:] <= along[:, :-1]).all()), "a strict order of score_into reversed"
    if name == "euclidean":
        # ||q||^2 - ||q - r||^2: one product, no square root.
        expected = (
            q.square().sum(-1, keepdim=True) - (q[:, None, :] - r[None, :, :]).square().sum(-1)
        ).double()
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    else:
        assert torch.equal(got, exact), "the similarities rank by their own scores"
