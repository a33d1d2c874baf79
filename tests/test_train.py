"""Training loop: known answers on a checkerboard, fused gradients against autograd, exact resume."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric import triplet_kernel
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.device import resolve_device
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.model.distances import EuclideanDistance, get_distance
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.train import (
    CHECKPOINT_NAME,
    FusedTripletStep,
    SparseRowOptimizer,
    TrainData,
    _AutogradStep,
    _NegativeSource,
    fit,
    triplet_objective,
    use_compile,
)

N_USERS, N_ITEMS, HALF = 40, 20, 10
# A fixed rate: with ``lr: auto`` every fit with validation would train once per candidate. No
# second phase after an early stop (tests/test_second_phase.py has its own).
FAST = {"epochs": 15, "batch_size": 64, "negatives": 3, "device": "cpu", "compile": "off", "lr": 0.05,
        "lr_drop": None}  # fmt: skip
DIM = 4


def _checkerboard(held_out: int = 0) -> tuple[InteractionMatrix, InteractionMatrix]:
    """Even users like 7 of items 0-9, odd users 7 of items 10-19; ``held_out`` of them kept aside."""
    rng = np.random.default_rng(0)
    train_u, train_i, test_u, test_i = [], [], [], []
    for user in range(N_USERS):
        liked = rng.choice(HALF, 7, replace=False) + (user % 2) * HALF
        train_u += [user] * (7 - held_out)
        train_i += list(liked[held_out:])
        test_u += [user] * held_out
        test_i += list(liked[:held_out])
    train = InteractionMatrix.from_pairs(np.array(train_u), np.array(train_i), N_USERS, N_ITEMS)
    test = InteractionMatrix.from_pairs(
        np.array(test_u, dtype=np.int64), np.array(test_i, dtype=np.int64), N_USERS, N_ITEMS
    )
    return train, test


def _own_half_share(scores: torch.Tensor, train: InteractionMatrix, k: int) -> float:
    """Share of each user's top-k unseen items that lie in the user's half."""
    scores = scores.clone()
    for user in range(N_USERS):
        scores[user, train.row(user)] = float("-inf")
    top = scores.topk(k, dim=1).indices
    own = (top // HALF) == (torch.arange(N_USERS) % 2).unsqueeze(1)
    return float(own.float().mean())


@pytest.mark.parametrize("distance", ["euclidean", "dot", "cosine"])
def test_fused_training_learns_the_checkerboard(distance):
    train, _ = _checkerboard()
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM, distance=distance), seed=0)
    result = fit(model, TrainData.from_matrices(train), TrainConfig(**FAST), progress=False)
    assert result.fused and not result.compiled and result.device == "cpu"
    assert len(result.history) == 15 and result.history[-1]["loss"] < result.history[0]["loss"]
    with torch.no_grad():
        scores = model.score(np.arange(N_USERS))
    # The 3 unseen items of the user's half were sampled as negatives too; top-1 is the known answer.
    # Cosine (margin 0.5 of at most 2) misplaces one user in 40 on some seeds of this tiny board.
    assert _own_half_share(scores, train, 1) >= (0.95 if distance == "cosine" else 1.0)
    assert _own_half_share(scores, train, 3) >= 0.8
    if distance == "euclidean":
        with torch.no_grad():
            norms = torch.cat([model.user_embeddings(), model.item_embeddings()]).norm(dim=1)
        assert float(norms.max()) <= 1.0


POOLED = ModelConfig(dim=DIM, user_tower="pooled")
HYBRID = ModelConfig(dim=DIM, user_tower="hybrid", feature_map="linear", distance="cosine")


@pytest.mark.parametrize(
    "config, loss",
    [(POOLED, "triplet"), (POOLED, "bpr"), (HYBRID, "contrastive"), (HYBRID, "softmax")],
)
def test_autograd_training_learns_the_checkerboard(config, loss):
    train, _ = _checkerboard()
    model = TwoTowerModel(N_USERS, N_ITEMS, config, user_history=train, seed=0)
    overrides = {**FAST, "loss": loss, "optimizer": "adam", "lr": 0.02, "epochs": 30}
    result = fit(model, TrainData.from_matrices(train), TrainConfig(**overrides), progress=False)
    assert not result.fused
    with torch.no_grad():
        assert _own_half_share(model.score(np.arange(N_USERS)), train, 1) >= 0.9


def _autograd_row_grads(
    model, metric, weighting, users, pos, negs, valid, weight_decay, item_rows, item_weight=0.0
):
    users_w = model.user_embedding.weight.detach().clone()
    items_w = model.item_embedding.weight.detach().clone()
    if metric == "euclidean":
        users_w.renorm_(2, 0, 1.0)
        items_w.renorm_(2, 0, 1.0)
    users_w.requires_grad_()
    items_w.requires_grad_()
    u, p, n = users_w[users], items_w[pos], items_w[negs]
    dist = EuclideanDistance(squared=True) if metric == "euclidean" else get_distance(metric)
    objective = TrainConfig(margin=0.5, negative_weighting=weighting, item_centric_weight=item_weight)
    loss = triplet_objective(u, p, n, valid, dist, objective, N_ITEMS)
    loss.backward()
    grad_users, grad_items = users_w.grad, items_w.grad
    if weight_decay:
        # The penalty wd/2 |w|^2 counts once per occurrence of a row that gets a gradient.
        grad_users = grad_users + weight_decay * torch.zeros_like(users_w).index_add_(
            0, users, users_w.detach()[users]
        )
        # Invalid slots hold placeholder items: they get no gradient, hence no penalty.
        occurs = torch.ones(item_rows.shape[0], 1)
        if weighting == "mean" and valid is not None:
            occurs[users.shape[0] :, 0] = valid.reshape(-1).float()
        grad_items = grad_items + weight_decay * torch.zeros_like(items_w).index_add_(
            0, item_rows, items_w.detach()[item_rows] * occurs
        )
    return loss.detach(), grad_users, grad_items


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
@pytest.mark.parametrize("k, weight_decay, item_weight", [(1, 0.0, 0.0), (4, 0.0, 0.0), (4, 0.1, 0.0), (1, 0.0, 0.5),
                                                           (4, 0.1, 0.7)])  # fmt: skip
def test_fused_gradients_equal_autograd(metric, weighting, k, weight_decay, item_weight):
    # init_scale 2 puts most rows outside the unit ball, so the projection is exercised too.
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=6, distance=metric, init_scale=2.0), seed=1)
    config = TrainConfig(negatives=k, negative_weighting=weighting, margin=0.5, weight_decay=weight_decay,
                         item_centric_weight=item_weight)  # fmt: skip
    g = torch.Generator().manual_seed(2)
    batch = 50
    users = torch.randint(0, N_USERS, (batch,), generator=g)
    pos = torch.randint(0, N_ITEMS, (batch,), generator=g)
    negs = torch.randint(0, N_ITEMS, (batch, k), generator=g)
    valid = torch.rand(batch, k, generator=g) > 0.25 if k > 1 else None
    with torch.no_grad():
        fused = FusedTripletStep(model, config, N_ITEMS).gradients(users, pos, negs, valid)
    loss, grad_users, grad_items = _autograd_row_grads(
        model, metric, weighting, users, pos, negs, valid, weight_decay, fused.item_rows, item_weight
    )
    dense_users = torch.zeros(N_USERS, 6).index_add_(0, fused.user_rows, fused.user_grads)
    dense_items = torch.zeros(N_ITEMS, 6).index_add_(0, fused.item_rows, fused.item_grads)
    torch.testing.assert_close(dense_users, grad_users, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense_items, grad_items, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused.loss, loss, atol=1e-5, rtol=1e-6)
    if metric == "euclidean":
        assert fused.user_values is not None and float(fused.user_values.norm(dim=1).max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["hardest", "mean"])
def test_autograd_step_computes_the_fused_objective_with_the_item_term(metric, weighting):
    # Free embeddings: the autograd path (any tower) and the fused step must optimise one objective.
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=6, distance=metric, init_scale=0.8), seed=3)
    config = TrainConfig(negatives=4, negative_weighting=weighting, margin=0.5, item_centric_weight=0.7)
    g = torch.Generator().manual_seed(5)
    users = torch.randint(0, N_USERS, (40,), generator=g)
    pos = torch.randint(0, N_ITEMS, (40,), generator=g)
    negs = torch.randint(0, N_ITEMS, (40, 4), generator=g)
    valid = torch.rand(40, 4, generator=g) > 0.25
    valid[:, 0] = True
    data = TrainData.from_matrices(_checkerboard()[0])
    with torch.no_grad():
        if metric == "euclidean":
            model.project_embeddings()
        fused = FusedTripletStep(model, config, N_ITEMS).gradients(users, pos, negs, valid).loss
        autograd = _AutogradStep(model, config, data, torch.device("cpu"))._loss(users, pos, negs, valid)
        plain = _AutogradStep(model, config.model_copy(update={"item_centric_weight": 0.0}), data,
                              torch.device("cpu"))._loss(users, pos, negs, valid)  # fmt: skip
    torch.testing.assert_close(autograd, fused, atol=1e-4, rtol=1e-5)
    assert float(autograd) > float(plain) > 0.0, "the item term adds to the loss"


def test_lazy_projection_is_projected_sgd():
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=6, init_scale=2.0), seed=4)
    config = TrainConfig(
        negatives=2, optimizer="sgd", negative_weighting="mean", margin=0.5, item_centric_weight=0.5
    )
    users = torch.tensor([0, 0, 3, 5])
    pos = torch.tensor([1, 2, 1, 7])
    negs = torch.tensor([[3, 4], [1, 9], [2, 2], [8, 3]])
    before_u = model.user_embedding.weight.detach().clone()
    before_i = model.item_embedding.weight.detach().clone()
    _, grad_users, grad_items = _autograd_row_grads(
        model, "euclidean", "mean", users, pos, negs, None, 0.0, None, config.item_centric_weight
    )
    step = FusedTripletStep(model, config, N_ITEMS)
    with torch.no_grad():
        step(users, pos, negs, None, 0.1)
    for before, grad, after, read in (
        (before_u, grad_users, model.user_embedding.weight.detach(), users),
        (before_i, grad_items, model.item_embedding.weight.detach(), torch.cat([pos, negs.reshape(-1)])),
    ):
        # Effective rows (projected) follow projected SGD; rows never read are left as they were.
        expected = (before.renorm(2, 0, 1.0) - 0.1 * grad).renorm(2, 0, 1.0)
        torch.testing.assert_close(after.renorm(2, 0, 1.0), expected, atol=1e-6, rtol=0)
        unread = torch.ones(before.shape[0], dtype=torch.bool).index_fill_(0, read, False)
        assert unread.any() and torch.equal(after[unread], before[unread])


def test_rowwise_adagrad_counts_every_occurrence():
    weight = torch.zeros(3, 2)
    opt = SparseRowOptimizer({"t": weight}, "adagrad")
    grads = torch.tensor([[1.0, 1.0], [3.0, -1.0], [2.0, 0.0]])
    opt.step("t", torch.tensor([0, 0, 2]), grads.clone(), 0.5)
    acc = opt.accumulator("t")
    torch.testing.assert_close(acc, torch.tensor([1.0 + 5.0, 0.0, 2.0]))
    torch.testing.assert_close(weight[0], -0.5 * torch.tensor([4.0, 0.0]) / (6.0**0.5 + 1e-10))
    torch.testing.assert_close(weight[2], -0.5 * torch.tensor([2.0, 0.0]) / (2.0**0.5 + 1e-10))
    assert torch.equal(weight[1], torch.zeros(2))


class _Crash(RuntimeError):
    pass


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    config = TrainConfig(**{**FAST, "epochs": 4, "lr_schedule": "cosine"})

    def validate_increasing(model):
        validate_increasing.calls += 1
        return {"recall@20": float(validate_increasing.calls)}

    validate_increasing.calls = 0
    straight = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    expected = fit(
        straight, data, config, validate=validate_increasing, checkpoint_dir=tmp_path / "a", progress=False
    )

    def crash_in_epoch_3(model):
        crash_in_epoch_3.calls += 1
        if crash_in_epoch_3.calls == 3:
            raise _Crash
        return {"recall@20": float(crash_in_epoch_3.calls)}

    crash_in_epoch_3.calls = 0
    first = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    with pytest.raises(_Crash):
        fit(first, data, config, validate=crash_in_epoch_3, checkpoint_dir=tmp_path / "b", progress=False)
    saved = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=True)
    assert saved["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [CHECKPOINT_NAME]

    validate_increasing.calls = 2
    fresh = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=123)
    resumed = fit(
        fresh,
        data,
        config,
        validate=validate_increasing,
        checkpoint_dir=tmp_path / "b",
        resume=True,
        progress=False,
    )
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in expected.history]
    assert resumed.best_epoch == expected.best_epoch == 4
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


def test_resume_without_checkpoint_starts_fresh_and_same_seed_is_deterministic(tmp_path):
    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    config = TrainConfig(**{**FAST, "epochs": 3})
    a = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    b = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    fit(a, data, config, checkpoint_dir=tmp_path, resume=True, progress=False)
    shutil.rmtree(tmp_path)
    fit(b, data, config, progress=True)
    assert torch.equal(a.user_embedding.weight, b.user_embedding.weight)
    assert torch.equal(a.item_embedding.weight, b.item_embedding.weight)


def test_early_stopping_keeps_the_best_epoch():
    train, _ = _checkerboard()
    snapshots = []

    def validate(model):
        snapshots.append(model.item_embedding.weight.detach().clone())
        return {"recall@20": [0.5, 0.7, 0.4, 0.3, 0.2, 0.1, 0.9][len(snapshots) - 1]}

    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    config = TrainConfig(**{**FAST, "epochs": 7, "patience": 3})
    result = fit(model, TrainData.from_matrices(train), config, validate=validate, progress=False)
    assert result.stopped_early and result.best_epoch == 2 and result.best_metric == 0.7
    assert len(result.history) == 5 and result.history[1]["metrics"] == {"recall@20": 0.7}
    assert torch.equal(model.item_embedding.weight, snapshots[1])
    with pytest.raises(ConfigError, match="early stopping needs 'recall@20'"):
        fit(
            model, TrainData.from_matrices(train), config, validate=lambda m: {"ndcg@20": 0.1}, progress=False
        )


def test_the_wait_grows_with_the_epoch_of_the_best_evaluation():
    # Climbs for 8 evaluations, lower for 3 (the moving mean falls too), better at the 12th: a
    # fixed patience of 3 stops after the 11th; with patience_growth 0.5 the wait after the 8th is
    # ceil(0.5 * 8) = 4 evaluations.
    curve = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.5, 0.5, 0.5, 0.85, 0.8, 0.8]
    train, _ = _checkerboard()

    def run(growth: float):
        calls = []

        def validate(model):
            calls.append(None)
            return {"recall@20": curve[len(calls) - 1]}

        model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
        config = TrainConfig(**{**FAST, "epochs": len(curve), "patience": 3, "patience_growth": growth})
        return fit(model, TrainData.from_matrices(train), config, validate=validate, progress=False)

    fixed = run(0.0)
    assert fixed.stopped_early and fixed.best_epoch == 8 and len(fixed.history) == 11
    grown = run(0.5)
    assert not grown.stopped_early and grown.best_epoch == 12 and grown.best_metric == 0.85
    assert len(grown.history) == len(curve)


def test_patience_after_is_the_larger_of_patience_and_the_grown_wait():
    config = TrainConfig(patience=5)
    assert [config.patience_after(n) for n in (1, 10, 11, 45)] == [5, 5, 6, 23]
    assert TrainConfig(patience=5, patience_growth=0.0).patience_after(45) == 5
    assert TrainConfig(patience=2, patience_growth=1.0).patience_after(7) == 7
    assert TrainConfig(patience=1, patience_growth=1.1).patience_after(50) == 55


def test_fold_in_of_a_known_history_ranks_held_out_items_high():
    train, test = _checkerboard(held_out=2)
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    fit(model, TrainData.from_matrices(train), TrainConfig(**FAST), progress=False)
    in_top, ranks = [], []
    with torch.no_grad():
        items = model.item_embeddings()
        for user in range(N_USERS):
            vector = model.fold_in(train.row(user))
            scores = model.distance.score(vector.unsqueeze(0), items)[0]
            scores[train.row(user)] = float("-inf")
            order = scores.argsort(descending=True).tolist()
            held = test.row(user).tolist()
            # 5 unseen items of the user's half (2 held out), 10 of the other half: top-5 is the half.
            in_top.append(set(held) <= set(order[:5]))
            ranks += [order.index(i) for i in held]
    # The user's own half is ranks 0-4 of the 15 unseen items. A bound on the single worst of the
    # 80 held-out ranks is a bet on the random stream (seeds 0-5 gave worst ranks 4-8), so the
    # share in the half carries the check; the worst only has to stay out of the bottom third.
    assert np.mean(np.array(ranks) < 5) >= 0.95
    assert max(ranks) < 10
    assert np.mean(in_top) >= 0.8


def test_feature_tower_places_a_cold_item_among_its_category():
    train, _ = _checkerboard()
    items = pl.DataFrame(
        {
            "item_id": np.arange(N_ITEMS),
            "side": ["left"] * HALF + ["right"] * HALF,
            "tags": [["a"]] * HALF + [["b"]] * HALF,
        }
    )
    features = ItemFeatureTensors.from_frame(items, np.arange(N_ITEMS), ["side", "tags"])
    config = ModelConfig(dim=8, item_features=("side", "tags"))
    model = TwoTowerModel(N_USERS, N_ITEMS, config, item_features=features, seed=0)
    fit(
        model,
        TrainData.from_matrices(train),
        TrainConfig(**{**FAST, "optimizer": "adam", "lr": 0.02}),
        progress=False,
    )
    cold = pl.DataFrame({"item_id": [100, 101], "side": ["left", "right"], "tags": [["a"], ["b"]]})
    with torch.no_grad():
        vectors = model.item_embeddings_from_features(
            ItemFeatureTensors.from_frame(cold, [100, 101], (), state=model.feature_state())
        )
        catalog = model.item_embeddings()
        nearest = model.distance.score(vectors, catalog).topk(5, dim=1).indices
        assert (nearest[0] < HALF).all() and (nearest[1] >= HALF).all()
        # Users of each half rank the cold item of their half above the other one.
        prefers = model.distance.score(model.user_embeddings(), vectors)
        side = torch.arange(N_USERS) % 2
        assert bool((prefers.argmax(1) == side).all())


def test_explicit_dislikes_take_their_share_of_the_slots():
    train, _ = _checkerboard()
    dislikes = InteractionMatrix.from_pairs(np.array([0, 0, 2]), np.array([11, 12, 13]), N_USERS, N_ITEMS)
    seen = InteractionMatrix.from_pairs(
        np.concatenate([np.repeat(np.arange(N_USERS), train.row_lengths()), [0, 0, 2]]),
        np.concatenate([train.indices, [11, 12, 13]]),
        N_USERS,
        N_ITEMS,
    )
    data = TrainData.from_matrices(train, seen=seen, dislikes=dislikes)
    source = _NegativeSource(data, 4, 1.0, torch.device("cpu"), True)
    chunk = source.chunk(np.arange(data.n_pairs), np.random.default_rng(0))
    users, negs = chunk.users.numpy(), chunk.negs.numpy()
    assert set(negs[users == 0].ravel()) <= {11, 12} and set(negs[users == 2].ravel()) == {13}
    others = negs[(users != 0) & (users != 2)]
    assert not seen.contains(np.repeat(users[(users != 0) & (users != 2)], 4), others.ravel()).any()
    half = _NegativeSource(data, 4, 0.5, torch.device("cpu"), True).chunk(
        np.arange(data.n_pairs), np.random.default_rng(0)
    )
    explicit = np.isin(half.negs.numpy()[half.users.numpy() == 0], [11, 12])
    assert explicit[:, :2].all() and not explicit[:, 2:].any()


@pytest.mark.skipif(not triplet_kernel.available(), reason="numba is not installed")
def test_the_compiled_sampler_draws_unseen_items_and_drops_users_who_saw_everything():
    users = np.array([0] * N_ITEMS + [1, 1, 2, 2])
    items = np.array(list(range(N_ITEMS)) + [0, 1, 2, 3])
    liked = InteractionMatrix.from_pairs(users, items, 3, N_ITEMS)
    data = TrainData.from_matrices(liked)
    source = _NegativeSource(data, 5, 0.0, torch.device("cpu"), True)
    from recsys_metric.training.kernel_step import kernel_csr

    source.compiled_sampler = kernel_csr(data.seen)
    chunk = source.chunk(np.arange(data.n_pairs), np.random.default_rng(0))
    assert chunk.n_pairs == 4 and chunk.valid is None, "user 0 saw every item: its pairs are dropped"
    chunk_users, negs = chunk.users.numpy(), chunk.negs.numpy()
    assert not data.seen.contains(np.repeat(chunk_users, 5), negs.ravel()).any()
    again = source.chunk(np.arange(data.n_pairs), np.random.default_rng(0))
    assert torch.equal(again.negs, chunk.negs), "the chunk's generator state fixes its draws"


def test_pairs_of_a_user_who_saw_every_item_are_dropped():
    users = np.array([0] * N_ITEMS + [1, 1, 2, 2])
    items = np.array(list(range(N_ITEMS)) + [0, 1, 2, 3])
    liked = InteractionMatrix.from_pairs(users, items, 3, N_ITEMS)
    model = TwoTowerModel(3, N_ITEMS, ModelConfig(dim=4), seed=0)
    result = fit(
        model,
        TrainData.from_matrices(liked),
        # user_balance 0: every pair once per epoch, so the 4 pairs of users 1 and 2 are the count.
        TrainConfig(**{**FAST, "epochs": 2, "negatives": 1, "user_balance": 0.0}),
        progress=False,
    )
    assert result.history[0]["triplets"] == 4


def _skewed_likes() -> InteractionMatrix:
    """User 0 likes 15 of the 20 items, users 1-39 three each."""
    rng = np.random.default_rng(5)
    users = [0] * 15
    items = list(rng.choice(N_ITEMS, 15, replace=False))
    for user in range(1, N_USERS):
        users += [user] * 3
        items += list(rng.choice(N_ITEMS, 3, replace=False))
    return InteractionMatrix.from_pairs(np.array(users), np.array(items), N_USERS, N_ITEMS)


def _fit_tables(config: TrainConfig, **kwargs) -> tuple[torch.Tensor, tuple[float, float]]:
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    result = fit(model, TrainData.from_matrices(_skewed_likes()), config, progress=False, **kwargs)
    return model.user_embeddings().detach().clone(), (result.user_balance, result.item_centric_weight)


def test_auto_settings_train_as_the_holdout_evaluates():
    auto = TrainConfig(**{**FAST, "epochs": 2})
    assert auto.user_balance == auto.item_centric_weight == "auto"
    per_user, applied = _fit_tables(auto, split_method="user_holdout")
    assert applied == (0.5, 0.5)
    explicit, _ = _fit_tables(
        TrainConfig(**{**FAST, "epochs": 2, "user_balance": 0.5, "item_centric_weight": 0.5})
    )
    assert torch.equal(per_user, explicit), (
        "auto under user_holdout is user_balance 0.5, item_centric_weight 0.5"
    )
    temporal, applied = _fit_tables(auto)  # split_method defaults to temporal
    assert applied == (0.0, 0.0)
    plain, _ = _fit_tables(
        TrainConfig(**{**FAST, "epochs": 2, "user_balance": 0.0, "item_centric_weight": 0.0})
    )
    assert torch.equal(temporal, plain), "auto under a temporal split is 0 for both"
    assert not torch.equal(per_user, temporal)
    with pytest.raises(ConfigError, match="split_method must be 'temporal' or 'user_holdout', got 'random'"):
        _fit_tables(auto, split_method="random")


def _scripted_validation(scores: list[float]):
    """A ``validate`` that returns ``scores`` in turn (one per evaluated epoch) and counts calls."""

    def validate(model):
        validate.calls += 1
        return {"recall@20": scores[validate.calls - 1]}

    validate.calls = 0
    return validate


def _fit_at(lr, validate=None, lr_search="full", **kwargs) -> tuple[TwoTowerModel, object]:
    # ``full``: the candidates train one after another, so a scripted validation's calls follow
    # them in order (the race interleaves them; its own tests below).
    config = TrainConfig(**{**FAST, "epochs": 3, "patience": 5, "lr": lr, "lr_search": lr_search})
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    data = TrainData.from_matrices(_checkerboard()[0])
    return model, fit(model, data, config, validate=validate, progress=False, **kwargs)


def _same_weights(a: TwoTowerModel, b: TwoTowerModel) -> bool:
    return all(torch.equal(t, b.state_dict()[name]) for name, t in a.state_dict().items())


def test_auto_lr_keeps_the_candidate_with_the_best_validation():
    # Candidate 0.05 is evaluated on calls 1-3, 0.01 on calls 4-6; the second's epoch 2 is best.
    validate = _scripted_validation([0.2, 0.3, 0.25, 0.1, 0.4, 0.35])
    chosen, result = _fit_at("auto", validate)
    assert validate.calls == 6
    assert result.lr == 0.01 and result.best_epoch == 2 and result.best_metric == 0.4
    assert [(t["lr"], t["best_epoch"], t["best_metric"], t["epochs_run"]) for t in result.lr_search] == [
        (0.05, 2, 0.3, 3),
        (0.01, 2, 0.4, 3),
    ]
    assert len(result.history) == 3, "the history is the chosen candidate's"
    # The chosen candidate started from the same weights and seed as a fit at its rate alone.
    alone, _ = _fit_at(0.01, _scripted_validation([0.1, 0.4, 0.35]))
    assert _same_weights(chosen, alone)
    other, _ = _fit_at(0.05, _scripted_validation([0.2, 0.3, 0.25]))
    assert not _same_weights(chosen, other)


def test_auto_lr_ties_go_to_the_first_candidate_and_without_validation_it_trains_at_the_first():
    tied, result = _fit_at("auto", _scripted_validation([0.5] * 6))
    assert result.lr == 0.05 and [t["best_metric"] for t in result.lr_search] == [0.5, 0.5]
    first, _ = _fit_at(0.05, _scripted_validation([0.5] * 3))
    assert _same_weights(tied, first)
    unvalidated, result = _fit_at("auto")
    assert result.lr == 0.05 and result.lr_search == []
    plain, _ = _fit_at(0.05)
    assert _same_weights(unvalidated, plain)


def test_auto_lr_checkpoints_each_candidate_and_resume_skips_finished_ones(tmp_path):
    scores = [0.2, 0.3, 0.25, 0.1, 0.4, 0.35]
    straight, expected = _fit_at("auto", _scripted_validation(scores), checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr-0.01", "lr-0.05"]
    assert all((tmp_path / d / CHECKPOINT_NAME).exists() for d in ("lr-0.01", "lr-0.05"))
    validate = _scripted_validation(scores)
    resumed, result = _fit_at("auto", validate, checkpoint_dir=tmp_path, resume=True)
    assert validate.calls == 0, "both candidates had finished: nothing trains again"
    assert result.lr == expected.lr == 0.01 and result.lr_search[1]["best_metric"] == 0.4
    assert _same_weights(resumed, straight)


def test_bad_inputs_are_rejected_with_clear_messages():
    train, _ = _checkerboard()
    with pytest.raises(DataError, match="no liked"):
        TrainData(
            user_num=np.array([], dtype=np.int32),
            item_num=np.array([], dtype=np.int32),
            seen=train,
            n_users=N_USERS,
            n_items=N_ITEMS,
        )
    with pytest.raises(DataError, match=r"must lie in \[0, 40\) x \[0, 20\)"):
        TrainData(
            user_num=np.array([0, 40]),
            item_num=np.array([1, 1]),
            seen=train,
            n_users=N_USERS,
            n_items=N_ITEMS,
        )
    model = TwoTowerModel(N_USERS + 1, N_ITEMS, ModelConfig(dim=4))
    with pytest.raises(DataError, match="built for 41 x 20"):
        fit(model, TrainData.from_matrices(train), TrainConfig(**FAST))


def test_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="is not a device"):
        resolve_device("gpu please")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="asks for CUDA"):
            resolve_device("cuda:0")


def test_compile_is_chosen_for_long_cpu_runs_only():
    cpu = torch.device("cpu")
    config = TrainConfig()
    assert not use_compile(config, True, cpu, 1_000_000)
    assert not use_compile(TrainConfig(compile="on"), False, cpu, 10**9)
    assert not use_compile(TrainConfig(compile="on", optimizer="adam"), True, cpu, 10**9)
    assert use_compile(TrainConfig(compile="on"), True, cpu, 10)
    assert not use_compile(TrainConfig(compile="off"), True, cpu, 10**9)
    assert not use_compile(config, True, torch.device("cuda"), 10**9)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_step_matches_the_eager_step():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for torch.compile")
    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    config = TrainConfig(**{**FAST, "epochs": 3, "batch_size": 50, "kernel": "torch"})
    eager = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    compiled = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    fit(eager, data, config.model_copy(update={"kernel": "torch"}), progress=False)
    result = fit(compiled, data, config.model_copy(update={"compile": "on"}), progress=False)
    assert result.compiled
    torch.testing.assert_close(compiled.item_embedding.weight, eager.item_embedding.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled.user_embedding.weight, eager.user_embedding.weight, atol=1e-5, rtol=0)


def test_a_failing_compile_falls_back_to_the_eager_step(monkeypatch, caplog):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    config = TrainConfig(**{**FAST, "epochs": 2, "kernel": "torch"})
    fallback = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    eager = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    result = fit(fallback, data, config.model_copy(update={"compile": "on"}), progress=False)
    fit(eager, data, config, progress=False)
    assert not result.compiled and "continuing without it" in caplog.text
    assert torch.equal(fallback.item_embedding.weight, eager.item_embedding.weight)


def _chunk_tensors(chunk) -> list:
    return [chunk.users, chunk.items, chunk.negs, chunk.valid, chunk.hist, chunk.seed, chunk.n_pairs]


@pytest.mark.parametrize("compiled_sampler", [False, True])
def test_chunks_drawn_ahead_across_epochs_are_the_chunks_drawn_epoch_by_epoch(compiled_sampler):
    """ChunkFeed draws the next epoch's order and first chunk while the last chunk trains: the same
    draws from the same generator in the same sequence, so the same chunks; discard() puts the
    generator back as if nothing had been drawn ahead."""
    from recsys_metric.epoch_order import EpochOrder
    from recsys_metric.training.kernel_step import kernel_csr
    from recsys_metric.training.sources import ChunkFeed, epoch_chunks

    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    source = _NegativeSource(data, 3, 0.0, torch.device("cpu"), True)
    if compiled_sampler and triplet_kernel.numba is not None:
        source.compiled_sampler = kernel_csr(data.seen)
    order_of = EpochOrder(data.user_num, 0.5)
    chunk_pairs = 64  # several chunks an epoch (280 pairs)
    plain, ahead = np.random.default_rng(7), np.random.default_rng(7)
    feed = ChunkFeed(source, order_of, ahead, chunk_pairs)
    for _epoch in range(3):
        order = order_of(plain)
        expected = [_chunk_tensors(c) for c in epoch_chunks(source, order, plain, chunk_pairs)]
        got_order, chunks = feed.epoch(ahead=True)
        got = [_chunk_tensors(c) for c in chunks]
        assert np.array_equal(got_order, order)
        assert len(got) == len(expected) == 5
        for g, e in zip(got, expected, strict=True):
            for a, b in zip(g, e, strict=True):
                assert (a is None and b is None) or (
                    torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                )
        # The next epoch's start is drawn already; a checkpoint records the state before it.
        assert feed.rng_state() == plain.bit_generator.state
        assert ahead.bit_generator.state != plain.bit_generator.state
    feed.close()
    assert ahead.bit_generator.state == plain.bit_generator.state


def test_validation_uses_the_callers_threads_and_training_keeps_its_own():
    """train.threads (1) holds for the steps; the evaluation's product and selection run on the
    threads the caller had set, and the caller gets its setting back."""
    train, _ = _checkerboard()
    data = TrainData.from_matrices(train)
    seen_threads: list[int] = []

    def validate(model):
        seen_threads.append(torch.get_num_threads())
        return {"recall@20": 0.5}

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
        fit(
            model, data, TrainConfig(**{**FAST, "epochs": 2, "threads": 1}), validate=validate, progress=False
        )
        assert seen_threads == [2, 2]
        assert torch.get_num_threads() == 2
        # The learning-rate race too.
        seen_threads.clear()
        model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
        config = TrainConfig(
            **{**FAST, "epochs": 2, "threads": 1, "lr": "auto", "lr_candidates": [0.05, 0.01]}
        )
        fit(model, data, config, validate=validate, progress=False)
        assert seen_threads and set(seen_threads) == {2}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_plateau_still_creeping_up_is_not_stopped_by_one_lucky_evaluation():
    """A lucky .60 at epoch 3, then a noisy plateau whose moving mean of 3 keeps rising: the wait
    runs from the mean's last new high (epoch 8), so the run reaches .62 at epoch 10. Without the
    mean, patience 3 after epoch 3 would have stopped it at epoch 6."""
    from recsys_metric.training.early_stopping import trend_epoch

    curve = [0.40, 0.50, 0.60, 0.52, 0.55, 0.56, 0.57, 0.59, 0.55, 0.62, 0.50, 0.50, 0.50, 0.50, 0.50]
    train, _ = _checkerboard()
    calls: list[None] = []

    def validate(model):
        calls.append(None)
        return {"recall@20": curve[len(calls) - 1]}

    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    config = TrainConfig(**{**FAST, "epochs": len(curve), "patience": 3, "patience_growth": 0.0})
    result = fit(model, TrainData.from_matrices(train), config, validate=validate, progress=False)
    assert result.best_epoch == 10 and result.best_metric == 0.62
    assert result.stopped_early and result.epochs_run == 13
    history = [{"epoch": e + 1, "metrics": {"recall@20": v}} for e, v in enumerate(curve[:9])]
    # Means of 3 from the 3rd evaluation: .50 .54 .557 .543 .56 .573 .573 .57: last new high at 8.
    assert trend_epoch(history, "recall@20") == 8
    assert trend_epoch(history[:3], "recall@20") == 0, "the first mean has nothing to rise above"


def test_cpu_state_overwrites_an_earlier_copy_in_place_and_copies_afresh_otherwise():
    from recsys_metric.training.checkpoints import cpu_state

    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    first = cpu_state(model)
    tensors = {name: t for name, t in first.items()}
    with torch.no_grad():
        model.user_embedding.weight.add_(1.0)
    again = cpu_state(model, into=first)
    assert again is first and all(again[name] is tensors[name] for name in tensors), "no second copy"
    assert all(torch.equal(t, model.state_dict()[name]) for name, t in again.items())
    with torch.no_grad():
        model.user_embedding.weight.add_(1.0)
    assert not torch.equal(again["user_embedding.weight"], model.user_embedding.weight), "a copy, not a view"
    other = TwoTowerModel(N_USERS + 1, N_ITEMS, ModelConfig(dim=DIM), seed=0)
    fresh = cpu_state(other, into=first)
    assert fresh is not first and fresh["user_embedding.weight"].shape[0] == N_USERS + 1
