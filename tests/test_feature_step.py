"""The hand-written triplet step of models with item features (recsys_metric.model.feature_step)."""

import copy

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError
from recsys_metric.model.feature_step import FeatureTripletStep, feature_step_supported
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.train import TrainData, fit, triplet_objective

N_USERS, N_ITEMS = 30, 40


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


def _model(distance: str = "dot", **model) -> TwoTowerModel:
    # The feature step trains the joint tower (model.feature_training: joint; id_dropout needs it).
    config = ModelConfig(
        dim=8, distance=distance, item_features=("category", "price", "tags"), feature_training="joint", **model
    )
    features = ItemFeatureTensors.from_frame(_items(), np.arange(N_ITEMS), config.item_features)
    m = TwoTowerModel(N_USERS, N_ITEMS, config, item_features=features, seed=1)
    with torch.no_grad():  # non-zero id rows, so that every part of the tower matters
        m.item_embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    return m


@pytest.mark.parametrize("weighting", ["hardest", "mean"])
def test_one_sgd_step_follows_the_autograd_gradient(weighting):
    config = TrainConfig(optimizer="sgd", negative_weighting=weighting, item_centric_weight=0.5, margin=0.5)
    model = _model()
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    users = torch.randint(0, N_USERS, (16,), generator=gen)
    pos = torch.randint(0, N_ITEMS, (16,), generator=gen)
    negs = torch.randint(0, N_ITEMS, (16, 5), generator=gen)
    assert feature_step_supported(model, config)
    loss = FeatureTripletStep(model, config, N_ITEMS)(users, pos, negs, None, 1.0)

    params = dict(reference.named_parameters())
    with torch.enable_grad():
        u = reference.user_embeddings(users)
        items = reference.item_embeddings(torch.cat([pos, negs.reshape(-1)]))
        expected = triplet_objective(
            u, items[:16], items[16:].view(16, 5, -1), None, reference.distance, config, N_ITEMS
        )
        expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    after = dict(model.named_parameters())
    for name, param in params.items():
        grad = param.grad.to_dense() if param.grad.is_sparse else param.grad
        if name == "item_encoder.numeric_linear.weight":
            grad = grad / 16  # dense sgd gradient per example, as the autograd step
        torch.testing.assert_close(after[name].detach(), param.detach() - grad, msg=name)


def test_id_dropout_places_items_by_features_and_leaves_dropped_id_rows_alone():
    config = TrainConfig(optimizer="sgd", item_centric_weight=0.0)
    model = _model(id_dropout=0.9999)
    before = model.item_embedding.weight.detach().clone()
    users = torch.arange(8)
    FeatureTripletStep(model, config, N_ITEMS)(
        users, torch.arange(8), torch.arange(8, 24).view(8, 2), None, 0.5
    )
    torch.testing.assert_close(model.item_embedding.weight.detach(), before)
    assert not torch.equal(
        model.item_encoder.tag_embeddings[0].weight[1:], _model().item_encoder.tag_embeddings[0].weight[1:]
    )


def test_fit_uses_the_feature_step_and_learns():
    rng = np.random.default_rng(0)
    # Users like the items of one category: the features carry the signal.
    items = _items()
    cats = items["category"].to_list()
    pairs = [
        (u, i)
        for u in range(N_USERS)
        for i in range(N_ITEMS)
        if cats[i] == f"c{u % 4}" and rng.random() < 0.7
    ]
    users, its = map(np.array, zip(*pairs, strict=True))
    liked = InteractionMatrix.from_pairs(users, its, N_USERS, N_ITEMS)
    model = _model("euclidean")
    result = fit(
        model,
        TrainData.from_matrices(liked, seen=liked),
        TrainConfig(epochs=5, lr=0.05, kernel="torch"),
        progress=False,
        epochs=5,
    )
    assert result.kernel == "features"
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert torch.all(torch.linalg.vector_norm(model.item_embedding.weight, dim=1) <= 1 + 1e-5)


def test_id_dropout_needs_the_feature_step():
    model = _model(id_dropout=0.5)
    with pytest.raises(ConfigError, match="model.id_dropout 0.5 is implemented by the feature step only"):
        feature_step_supported(model, TrainConfig(loss="bpr"))
    assert not feature_step_supported(_model(), TrainConfig(loss="bpr"))
