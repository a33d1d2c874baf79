"""The compiled step of models with item features (kernel_step.NumbaFeatureStep) against the
tensor feature step (model.feature_step.FeatureTripletStep, itself exact against autograd)."""

import copy

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric import triplet_kernel
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.model.feature_step import FeatureTripletStep
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.training.kernel_step import NumbaFeatureStep

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


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
@pytest.mark.parametrize("weighting", ["hardest", "warp", "mean"])
@pytest.mark.parametrize("optimizer, k, weight_decay, masked, item_weight",
                         [("adagrad", 4, 0.0, False, 0.0), ("sgd", 1, 0.0, False, 0.5),
                          ("adagrad", 5, 0.05, True, 0.5)])  # fmt: skip
def test_one_triplet_at_a_time_equals_the_tensor_feature_step(metric, weighting, optimizer, k, weight_decay,
                                                              masked, item_weight):  # fmt: skip
    # One triplet per batch: "id rows after every triplet, feature rows once per batch" and "all
    # rows once per batch" are the same thing, so the two steps must walk the same path.
    config = TrainConfig(negative_weighting=weighting, optimizer=optimizer, negatives=k, weight_decay=weight_decay,
                         margin=1.0 if metric == "euclidean" else 0.5, item_centric_weight=item_weight)  # fmt: skip
    tensor_model = _model(metric)
    kernel_model = copy.deepcopy(tensor_model)
    tensor_step = FeatureTripletStep(tensor_model, config, N_ITEMS)
    kernel_step = NumbaFeatureStep(kernel_model, config, N_ITEMS)
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
