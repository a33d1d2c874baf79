"""The compiled per-triplet step (numba): the tensor step's update triplet by triplet, its own
negative draws, Hogwild threads, and when ``fit`` takes it."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from recsys_metric import triplet_kernel
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.train import FusedTripletStep, NumbaTripletStep, TrainData, fit, use_numba

pytestmark = pytest.mark.skipif(not triplet_kernel.available(), reason="numba is not installed")

N_USERS, N_ITEMS = 6, 30


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
@pytest.mark.parametrize("optimizer, k, weight_decay, masked, item_weight",
                         [("adagrad", 4, 0.0, False, 0.0), ("sgd", 1, 0.0, False, 0.0), ("adagrad", 5, 0.05, True, 0.0),
                          ("sgd", 1, 0.0, False, 0.5), ("adagrad", 5, 0.05, True, 0.5)])  # fmt: skip
def test_one_triplet_at_a_time_equals_the_tensor_step(metric, weighting, optimizer, k, weight_decay, masked,
                                                      item_weight):  # fmt: skip
    # With one triplet per batch, "update after every triplet" and "update once per batch" are the
    # same thing, so the two implementations must walk the same path.
    config = TrainConfig(negative_weighting=weighting, optimizer=optimizer, negatives=k, weight_decay=weight_decay,
                         margin=1.0 if metric == "euclidean" else 0.5, item_centric_weight=item_weight)  # fmt: skip
    tensor_model = TwoTowerModel(
        N_USERS, N_ITEMS, ModelConfig(dim=8, distance=metric, init_scale=0.6), seed=1
    )
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FusedTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaTripletStep(kernel_model, config, N_ITEMS)
    rng = np.random.default_rng(0)
    violated = 0
    for _ in range(25):
        users = torch.tensor([int(rng.integers(N_USERS))])
        pos = torch.tensor([int(rng.integers(10))])
        negs = torch.from_numpy(rng.permutation(np.arange(10, N_ITEMS))[:k][None, :].copy())
        valid = torch.from_numpy(rng.random((1, k)) > 0.3) if masked else None
        if valid is not None:
            valid[0, 0] = True
        expected = float(tensor_step(users, pos, negs, valid, 0.1))
        got = float(kernel_step(users, pos, negs, valid, 0.1))
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
        violated += expected > 0
    assert violated >= 5, "the comparison must exercise updates"
    tensor_step.end_epoch(tensor_model)
    kernel_step.end_epoch(kernel_model)
    for name in ("user_embedding", "item_embedding"):
        torch.testing.assert_close(getattr(kernel_model, name).weight, getattr(tensor_model, name).weight,
                                   atol=2e-6, rtol=0)  # fmt: skip
    if optimizer == "adagrad":
        torch.testing.assert_close(kernel_step.rows.accumulator("item"), tensor_step.rows.accumulator("item"),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_negatives_outside_the_ball_are_projected_as_the_tensor_step_projects_them():
    # The euclidean kernel reads a negative's row once for its norm and its distance: a row
    # outside the unit ball is rescaled in place and the violation is the rescaled row's, as the
    # tensor step's projection on read gives.
    config = TrainConfig(negatives=4, item_centric_weight=0.5)
    tensor_model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=8, init_scale=0.6), seed=3)
    with torch.no_grad():
        tensor_model.item_embedding.weight[10:20] *= 6.0  # norms of about 3.6
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FusedTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaTripletStep(kernel_model, config, N_ITEMS)
    negs = torch.tensor([[10, 11, 25, 12]])
    outside = kernel_model.item_embedding.weight.detach()[[10, 11, 12]].norm(dim=1)
    assert bool((outside > 2.0).all())
    expected = float(tensor_step(torch.tensor([0]), torch.tensor([1]), negs, None, 0.05))
    got = float(kernel_step(torch.tensor([0]), torch.tensor([1]), negs, None, 0.05))
    assert got == pytest.approx(expected, rel=1e-5)
    weights = kernel_model.item_embedding.weight.detach()
    assert float(weights[[10, 11, 12]].norm(dim=1).max()) <= 1.0 + 1e-5, "the negatives read were projected"
    assert float(weights[13:20].norm(dim=1).min()) > 2.0, "rows nobody read keep their norm"
    # The tensor step projects what it reads without writing back the rows it does not update;
    # the kernel keeps them projected. Projected, the tensor step's table is the kernel's.
    tensor_model.distance.project(tensor_model.item_embedding.weight, torch.tensor([1, 10, 11, 12, 25]))
    torch.testing.assert_close(weights, tensor_model.item_embedding.weight.detach(), atol=2e-6, rtol=0)


def test_numba_thread_count_is_set_once_per_python_thread(monkeypatch):
    # numba.set_num_threads takes process-wide locks on every call: a thread that already set the
    # count does not set it again, and a new Python thread sets its own.
    import threading

    import numba

    calls = []
    real = numba.set_num_threads

    def counting(n):
        calls.append(n)
        real(n)

    monkeypatch.setattr(numba, "set_num_threads", counting)
    seen = _seen_matrix()

    def draw_three_times():
        for seed in range(3):
            triplet_kernel.draw_negatives(
                np.array([0, 1] * 4), seen.indptr, seen.indices, N_ITEMS, 2, seed, threads=2
            )

    for _ in range(2):
        worker = threading.Thread(target=draw_three_times)
        worker.start()
        worker.join()
    assert calls == [2, 2], "once in each of the two threads"


def test_item_item_mode_updates_the_one_table_with_its_accumulator():
    config = TrainConfig(negatives=3)
    model_config = ModelConfig(dim=8, mode="item_item", init_scale=0.6)
    tensor_model = TwoTowerModel(N_USERS, N_ITEMS, model_config, seed=2)
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FusedTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaTripletStep(kernel_model, config, N_ITEMS)
    rng = np.random.default_rng(1)
    for _ in range(20):
        anchor, pos = (int(x) for x in rng.choice(10, 2, replace=False))
        negs = torch.from_numpy(rng.permutation(np.arange(10, N_ITEMS))[:3][None, :].copy())
        tensor_step(torch.tensor([anchor]), torch.tensor([pos]), negs, None, 0.1)
        kernel_step(torch.tensor([anchor]), torch.tensor([pos]), negs, None, 0.1)
    torch.testing.assert_close(kernel_model.item_embedding.weight, tensor_model.item_embedding.weight,
                               atol=2e-6, rtol=0)  # fmt: skip
    assert float(kernel_step.rows.accumulator("item").sum()) > 0


def _seen_matrix() -> InteractionMatrix:
    """User 0 saw items 0-9, user 1 all but items 3 and 17, user 2 every item."""
    users = [0] * 10 + [1] * (N_ITEMS - 2) + [2] * N_ITEMS
    items = list(range(10)) + [i for i in range(N_ITEMS) if i not in (3, 17)] + list(range(N_ITEMS))
    return InteractionMatrix.from_pairs(np.array(users), np.array(items), 3, N_ITEMS)


def _draws(user: int, n: int, seed: int, k: int = 1) -> np.ndarray:
    """How often each item is drawn as a negative for ``n`` triplets of ``user``."""
    seen = _seen_matrix()
    negs, valid = triplet_kernel.draw_negatives(np.full(n, user), seen.indptr, seen.indices, N_ITEMS, k, seed)
    assert valid.all()
    return np.bincount(negs.ravel(), minlength=N_ITEMS)


def test_in_kernel_draws_are_uniform_over_the_unseen_items():
    counts = _draws(0, 20_000, seed=7)
    assert counts[:10].sum() == 0, "never an item the user saw"
    assert counts.sum() == 20_000
    # 20 unseen items, 1000 expected draws each: 5 standard deviations is about +-150.
    assert np.all(np.abs(counts[10:] - 1000) < 160), counts[10:]


def test_in_kernel_draws_for_a_user_who_saw_almost_everything_are_exact():
    # 28 of 30 items seen: rejection fails often, the exact fallback draws one of the two left.
    counts = _draws(1, 4000, seed=3, k=2)
    assert set(np.flatnonzero(counts)) == {3, 17}
    assert abs(counts[3] - counts[17]) < 400


@pytest.mark.parametrize("metric, weighting", [("euclidean", "warp"), ("cosine", "mean")])
def test_the_kernel_trains_on_the_negatives_it_draws(metric, weighting):
    # Drawing inside the kernel and handing it the same draws give the same tables, bit for bit.
    seen = _seen_matrix()
    rng = np.random.default_rng(4)
    users = rng.integers(0, 2, 300)
    pos = np.where(users == 0, rng.integers(0, 10, 300), 3)
    init = np.random.default_rng(5).standard_normal((3 + N_ITEMS, 4)).astype(np.float32) * 0.5
    options = dict(
        metric=metric, margin=0.5, weighting=weighting, n_items=N_ITEMS, weight_decay=0.01, project=True
    )
    tables = []
    for given in (False, True):
        u, i = init[:3].copy(), init[3:].copy()
        ua, ia = np.zeros(3, np.float32), np.zeros(N_ITEMS, np.float32)
        if given:
            negs, valid = triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, N_ITEMS, 3, 99)
            triplet_kernel.triplet_step(u, i, ua, ia, users, pos, negs, valid, 0.1, **options)
        else:
            sample = (users, seen.indptr.astype(np.int64), seen.indices, 3, 99)
            triplet_kernel.triplet_step(u, i, ua, ia, users, pos, None, None, 0.1, sample=sample, **options)
        tables.append((u, i))
    assert np.array_equal(tables[0][0], tables[1][0]) and np.array_equal(tables[0][1], tables[1][1])
    assert not np.array_equal(tables[0][1], init[3:]), "the step must have moved the items"


def test_a_user_who_saw_every_item_is_skipped():
    # Skipped whole: not even weight decay touches the rows (the tensor path drops such pairs).
    seen = _seen_matrix()
    user_table = np.ones((3, 2), dtype=np.float32)
    item_table = np.full((N_ITEMS, 2), 0.5, dtype=np.float32)
    loss = triplet_kernel.triplet_step(
        user_table, item_table, None, None,
        np.array([2, 2]), np.array([0, 1]), None, None, 0.1,
        metric="dot", margin=1.0, weighting="hardest", n_items=N_ITEMS, weight_decay=0.5, project=False,
        sample=(np.array([2, 2]), seen.indptr.astype(np.int64), seen.indices, 3, 0),
    )  # fmt: skip
    assert loss == 0.0
    assert (user_table == 1.0).all() and (item_table == 0.5).all()


def test_threaded_draws_split_the_rows_and_thread_zero_keeps_the_one_thread_stream():
    seen = _seen_matrix()
    users = np.zeros(1000, dtype=np.int64)
    one, ok1 = triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, N_ITEMS, 2, 5, threads=1)
    two, ok2 = triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, N_ITEMS, 2, 5, threads=2)
    assert ok1.all() and ok2.all()
    assert (two >= 10).all(), "never an item user 0 saw"
    if triplet_kernel.numba.config.NUMBA_NUM_THREADS >= 2:
        assert np.array_equal(one[:500], two[:500]), "thread 0 draws rows 0-499 from the stream itself"
        assert not np.array_equal(one[500:], two[500:]), "thread 1 has a stream of its own"


def test_the_same_seed_draws_the_same_negatives_and_another_seed_others():
    seen = _seen_matrix()
    users = np.zeros(200, dtype=np.int64)
    a, b, c = (triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, N_ITEMS, 2, seed)[0]
               for seed in (11, 11, 12))  # fmt: skip
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _random_seen(n_users: int = 300, n_items: int = 5000, seed: int = 0) -> InteractionMatrix:
    """Users with 0 to 2,000 seen items each (row lengths spread over the filter sizes)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1 / 60, n_users) - 1, 2000)
    lengths[:3] = (0, 1, 2000)
    users = np.repeat(np.arange(n_users), lengths)
    items = np.concatenate([rng.choice(n_items, n, replace=False) for n in lengths])
    return InteractionMatrix.from_pairs(users, items, n_users, n_items)


def test_the_seen_filter_holds_every_seen_item_and_few_unseen_ones():
    seen = _random_seen()
    filt = triplet_kernel.seen_filter(seen.indptr, seen.indices)
    bits = (filt.offsets[1:] - filt.offsets[:-1]) * 64
    lengths = seen.row_lengths()
    assert (bits >= np.maximum(64, triplet_kernel.FILTER_BITS_PER_ITEM * lengths)).all()
    assert (bits < 2 * np.maximum(64, triplet_kernel.FILTER_BITS_PER_ITEM * lengths)).all(), (
        "next power of two"
    )

    def passes(user: int, items: np.ndarray) -> np.ndarray:
        h = (items.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(filt.shifts[user])
        words = filt.words[filt.offsets[user] + (h >> np.uint64(6)).astype(np.int64)]
        return ((words >> (h & np.uint64(63))) & np.uint64(1)).astype(bool)

    false_positives = checked = 0
    for user in range(seen.n_users):
        row = seen.indices[seen.indptr[user] : seen.indptr[user + 1]]
        assert passes(user, row).all(), f"user {user}: a seen item must always pass the filter"
        unseen = np.setdiff1d(np.arange(seen.n_items), row)
        false_positives += int(passes(user, unseen).sum())
        checked += unseen.size
    # One hash, at least 16 bits per seen item: at most 1 - e^(-1/16) = 6% pass.
    assert false_positives / checked < 0.065, false_positives / checked


@pytest.mark.parametrize("threads", [1, 2])
def test_draws_with_the_seen_filter_are_the_draws_without_it(threads):
    seen = _random_seen(seed=1)
    users = np.random.default_rng(2).integers(0, seen.n_users, 4000)
    filt = triplet_kernel.seen_filter(seen.indptr, seen.indices)
    plain = triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, seen.n_items, 8, 13, threads)
    fast = triplet_kernel.draw_negatives(users, seen.indptr, seen.indices, seen.n_items, 8, 13, threads, filt)
    assert np.array_equal(plain[0], fast[0]) and np.array_equal(plain[1], fast[1])
    assert not seen.contains(np.repeat(users, 8), fast[0].ravel()).any()


def _clusters() -> tuple[InteractionMatrix, InteractionMatrix]:
    """Users 0-99 like items 0-49, users 100-199 items 50-99 (40 each); 5 held out per user."""
    rng = np.random.default_rng(0)
    users, items, test_users, test_items = [], [], [], []
    for user in range(200):
        liked = rng.choice(50, 40, replace=False) + (user // 100) * 50
        users += [user] * 35
        items += list(liked[5:])
        test_users += [user] * 5
        test_items += list(liked[:5])
    train = InteractionMatrix.from_pairs(np.array(users), np.array(items), 200, 100)
    test = InteractionMatrix.from_pairs(np.array(test_users), np.array(test_items), 200, 100)
    return train, test


def _own_cluster_share(model: TwoTowerModel, train: InteractionMatrix) -> float:
    with torch.no_grad():
        scores = model.score(np.arange(200)).clone()
    for user in range(200):
        scores[user, train.row(user)] = float("-inf")
    top = scores.topk(5, dim=1).indices
    return float(((top // 50) == (torch.arange(200) // 100).unsqueeze(1)).float().mean())


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_with_the_kernel_learns_the_clusters(threads):
    train, _ = _clusters()
    model = TwoTowerModel(200, 100, ModelConfig(dim=8), seed=0)
    config = TrainConfig(epochs=8, negatives=5, device="cpu", threads=threads, kernel="numba")
    result = fit(model, TrainData.from_matrices(train), config, progress=False)
    assert result.kernel == "numba" and result.fused and not result.compiled
    assert _own_cluster_share(model, train) >= 0.95
    # Embeddings stay inside the unit ball (euclidean).
    assert float(model.item_embedding.weight.detach().norm(dim=1).max()) <= 1.0 + 1e-5


def test_one_thread_is_deterministic_and_matches_a_batch_size_change_only_in_lr_granularity():
    train, _ = _clusters()
    data = TrainData.from_matrices(train)
    config = TrainConfig(epochs=3, negatives=3, device="cpu", kernel="numba")
    a = TwoTowerModel(200, 100, ModelConfig(dim=8), seed=0)
    b = TwoTowerModel(200, 100, ModelConfig(dim=8), seed=0)
    fit(a, data, config, progress=False)
    # With a constant learning rate the kernel runs whole chunks per call: the batch size changes
    # nothing, bit for bit.
    fit(b, data, config.model_copy(update={"batch_size": 7}), progress=False)
    assert torch.equal(a.item_embedding.weight, b.item_embedding.weight)
    assert torch.equal(a.user_embedding.weight, b.user_embedding.weight)


def test_auto_takes_the_kernel_on_cpu_and_the_tensor_step_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_numba(TrainConfig(), True, cpu, distributed=False)
    assert not use_numba(TrainConfig(kernel="torch"), True, cpu, distributed=False)
    assert not use_numba(TrainConfig(), True, cuda, distributed=False)
    assert not use_numba(TrainConfig(), True, cpu, distributed=True)
    assert not use_numba(TrainConfig(optimizer="adam"), True, cpu, distributed=False)
    assert not use_numba(TrainConfig(), False, cpu, distributed=False)
    with pytest.raises(
        ConfigError, match="train.kernel numba: train.optimizer adam has no per-triplet update"
    ):
        use_numba(TrainConfig(kernel="numba", optimizer="adam"), True, cpu, distributed=False)
    with pytest.raises(ConfigError, match="runs on CPU only, not cuda"):
        use_numba(TrainConfig(kernel="numba"), True, cuda, distributed=False)


def test_the_kernel_step_reports_what_ran():
    train, _ = _clusters()
    model = TwoTowerModel(200, 100, ModelConfig(dim=8), seed=0)
    result = fit(model, TrainData.from_matrices(train), TrainConfig(epochs=1, device="cpu"), progress=False)
    assert result.kernel == "numba" and result.to_dict()["kernel"] == "numba"
    assert result.negatives == 10, "negatives: auto on a 100-item catalogue (the floor)"
    torch_result = fit(
        TwoTowerModel(200, 100, ModelConfig(dim=8), seed=0),
        TrainData.from_matrices(train),
        TrainConfig(epochs=1, device="cpu", kernel="torch"),
        progress=False,
    )
    assert torch_result.kernel == "torch"
    assert isinstance(NumbaTripletStep(model, TrainConfig(), 100), FusedTripletStep)
