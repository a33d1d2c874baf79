"""The compiled step of models with item features (kernel_step.NumbaFeatureStep) against the
tensor feature step (model.feature_step.FeatureTripletStep, itself exact against autograd)."""

import copy
import math

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric import triplet_kernel
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.model.feature_step import FeatureTripletStep
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.kernel_step import FEATURE_WINDOW_FACTOR, NumbaFeatureStep

pytestmark = pytest.mark.skipif(not triplet_kernel.available(), reason="numba is not installed")

N_USERS, N_ITEMS = 12, 40


def _items() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    return pl.DataFrame(
        {
            "item_id": np.arange(N_ITEMS),
            "category": [f"c{v}" if v < 4 else None for v in rng.integers(0, 5, N_ITEMS)],
            "price": rng.normal(10, 3, N_ITEMS),
            "tags": [
                [f"t{t}" for t in rng.choice(12, rng.integers(0, 4), replace=False)] for _ in range(N_ITEMS)
            ],
        }
    )


def _model(distance: str, columns=("category", "price", "tags")) -> TwoTowerModel:
    config = ModelConfig(dim=8, distance=distance, item_features=columns, init_scale=0.6)
    features = ItemFeatureTensors.from_frame(_items(), np.arange(N_ITEMS), config.item_features)
    m = TwoTowerModel(N_USERS, N_ITEMS, config, item_features=features, seed=1)
    with torch.no_grad():  # non-zero id rows, so that every part of the tower matters
        m.item_embedding.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    return m


def _triplets(rng, k: int, masked: bool):
    users = torch.tensor([int(rng.integers(N_USERS))])
    pos = torch.tensor([int(rng.integers(10))])
    negs = torch.from_numpy(rng.permutation(np.arange(10, N_ITEMS))[:k][None, :].copy())
    valid = torch.from_numpy(rng.random((1, k)) > 0.3) if masked else None
    if valid is not None:
        valid[0, 0] = True
    return users, pos, negs, valid


@pytest.mark.parametrize("window_pairs", [0, 1])
@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
@pytest.mark.parametrize("optimizer, k, weight_decay, masked, item_weight",
                         [("adagrad", 4, 0.0, False, 0.0), ("sgd", 1, 0.0, False, 0.5),
                          ("adagrad", 5, 0.05, True, 0.5)])  # fmt: skip
def test_one_triplet_at_a_time_equals_the_tensor_feature_step(window_pairs, metric, weighting, optimizer, k,
                                                              weight_decay, masked, item_weight):  # fmt: skip
    # One triplet per window: "id rows after every triplet, feature rows once per window" and "all
    # rows once per batch" are the same thing, so the two steps must walk the same path (windows
    # over the batch's items, 0, and over the whole catalog, 1).
    config = TrainConfig(negative_weighting=weighting, optimizer=optimizer, negatives=k, weight_decay=weight_decay,
                         margin=1.0 if metric == "euclidean" else 0.5, item_centric_weight=item_weight)  # fmt: skip
    tensor_model = _model(metric)
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FeatureTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaFeatureStep(kernel_model, config, N_ITEMS, window_pairs=window_pairs)
    rng = np.random.default_rng(0)
    violated = 0
    for _ in range(25):
        users, pos, negs, valid = _triplets(rng, k, masked)
        expected = float(tensor_step(users, pos, negs, valid, 0.1))
        got = float(kernel_step(users, pos, negs, valid, 0.1))
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
        violated += expected > 0
    assert violated >= 5, "the comparison must exercise updates"
    tensor_step.end_epoch(tensor_model)
    kernel_step.end_epoch(kernel_model)
    expected_params = dict(tensor_model.named_parameters())
    for name, param in kernel_model.named_parameters():
        torch.testing.assert_close(param, expected_params[name], atol=2e-5, rtol=1e-4, msg=name)
    if optimizer == "adagrad":
        for table in kernel_step.tables:
            torch.testing.assert_close(kernel_step.rows.accumulator(table), tensor_step.rows.accumulator(table),
                                       atol=1e-6, rtol=1e-4, msg=table)  # fmt: skip


def test_a_window_defers_the_feature_updates_and_closes_at_the_end_of_the_epoch():
    config = TrainConfig(optimizer="adagrad", negatives=3, item_centric_weight=0.0)
    model = _model("euclidean")
    tags = model.item_encoder.tag_embeddings[0].weight
    before = tags.detach().clone()
    step = NumbaFeatureStep(model, config, N_ITEMS, window_pairs=8)
    rng = np.random.default_rng(1)
    ids_before = model.item_embedding.weight.detach().clone()
    for _ in range(3):  # 6 pairs: the window stays open
        users, pos, negs, _valid = _triplets(rng, 3, False)
        step(torch.cat([users, users]), torch.cat([pos, pos]), torch.cat([negs, negs]), None, 0.1)
    torch.testing.assert_close(tags, before, atol=0, rtol=0)
    assert not torch.equal(model.item_embedding.weight, ids_before), "id rows move at every triplet"
    step.end_epoch(model)
    assert not torch.equal(tags, before), "closing the window applies the feature updates"
    assert torch.all(torch.linalg.vector_norm(model.item_embedding.weight, dim=1) <= 1 + 1e-5)


def test_auto_windows_read_the_feature_rows_a_fraction_of_the_triplets_rows():
    model = _model("euclidean")
    features = model.item_encoder.catalog()
    # Entries: the known category codes, one numeric row per item, the tags.
    nnz = int((features.categorical > 0).sum()) + N_ITEMS + int(features.tag_indices[0].shape[0])
    step = NumbaFeatureStep(model, TrainConfig(batch_size=4, negatives=3), N_ITEMS)
    # Whole batches whose (k + 1) rows per pair are at least FEATURE_WINDOW_FACTOR x nnz.
    assert step.window_pairs == 4 * math.ceil(FEATURE_WINDOW_FACTOR * nnz / (4 * 4))
    assert step.window_pairs * 4 >= FEATURE_WINDOW_FACTOR * nnz > (step.window_pairs - 4) * 4


def test_id_dropout_of_every_item_trains_the_features_alone_as_the_tensor_step():
    config = TrainConfig(optimizer="adagrad", negatives=4, item_centric_weight=0.5)
    tensor_model = _model("dot")
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FeatureTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaFeatureStep(kernel_model, config, N_ITEMS, window_pairs=0)
    tensor_step.id_dropout = kernel_step.id_dropout = 1.0  # every id part dropped: deterministic
    ids_before = kernel_model.item_embedding.weight.detach().clone()
    rng = np.random.default_rng(2)
    for _ in range(10):
        users, pos, negs, _valid = _triplets(rng, 4, False)
        expected = float(tensor_step(users, pos, negs, None, 0.1))
        assert float(kernel_step(users, pos, negs, None, 0.1)) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(kernel_model.item_embedding.weight, ids_before, atol=0, rtol=0)
    expected_params = dict(tensor_model.named_parameters())
    for name, param in kernel_model.named_parameters():
        torch.testing.assert_close(param, expected_params[name], atol=2e-5, rtol=1e-4, msg=name)


def test_fit_takes_the_kernel_and_learns_from_the_features():
    from recsys_metric.data.matrix import InteractionMatrix
    from recsys_metric.train import TrainData, fit

    rng = np.random.default_rng(0)
    cats = _items()["category"].to_list()
    pairs = [
        (u, i)
        for u in range(N_USERS)
        for i in range(N_ITEMS)
        if cats[i] == f"c{u % 4}" and rng.random() < 0.7
    ]
    users, its = map(np.array, zip(*pairs, strict=True))
    liked = InteractionMatrix.from_pairs(users, its, N_USERS, N_ITEMS)
    model = _model("euclidean", columns=("category",))
    with torch.no_grad():
        model.item_embedding.weight.zero_()
    result = fit(
        model,
        TrainData.from_matrices(liked, seen=liked),
        TrainConfig(epochs=8, lr=0.05, kernel="numba"),
        progress=False,
    )
    assert result.kernel == "features-numba", "train.kernel: numba takes the feature kernel"
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    # Users of category c_j rank the c_j items they never liked above the other categories' items
    # (the features carry the signal).
    scores = model.score(torch.arange(N_USERS)).detach()
    own = np.array([[cats[i] == f"c{u % 4}" for i in range(N_ITEMS)] for u in range(N_USERS)])
    assert float(scores[torch.from_numpy(own)].mean()) > float(scores[torch.from_numpy(~own)].mean())


def test_auto_takes_the_compiled_feature_step_on_cpu_and_torch_keeps_the_tensor_step():
    from recsys_metric.errors import ConfigError
    from recsys_metric.training.kernel_step import use_feature_kernel

    cpu = torch.device("cpu")
    assert use_feature_kernel(TrainConfig(kernel="auto"), cpu), "auto on CPU: the compiled step"
    assert not use_feature_kernel(TrainConfig(kernel="auto"), torch.device("cuda")), "auto on CUDA: tensor"
    assert not use_feature_kernel(TrainConfig(kernel="torch"), cpu)
    assert use_feature_kernel(TrainConfig(kernel="numba"), cpu)
    with pytest.raises(ConfigError, match="train.kernel numba: it runs on CPU only, not cuda"):
        use_feature_kernel(TrainConfig(kernel="numba"), torch.device("cuda"))
