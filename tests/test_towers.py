"""Two-tower model and item features: shapes, known answers, persistence, fold-in, cold items."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.config import ModelConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.model.features import ItemFeatureTensors, csr_rows
from recsys_metric.model.towers import TwoTowerModel

N_USERS, N_ITEMS, DIM = 7, 6, 4


def _items_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ["c", "a", "b", "d", "e"],
            "genre": ["x", "y", "x", None, "z"],
            "year": [1990, 2000, 1990, 2010, 2000],
            "price": [1.0, 3.0, None, 5.0, float("nan")],
            "tags": [["t1", "t2"], [], None, ["t2", "t3", None], ["t1"]],
        }
    )


ITEM_IDS = pl.Series(["a", "b", "c", "d", "e", "f"])
COLUMNS = ("genre", "year", "price", "tags")


def _features() -> ItemFeatureTensors:
    return ItemFeatureTensors.from_frame(_items_frame(), ITEM_IDS, COLUMNS)


def _history() -> InteractionMatrix:
    users = np.array([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    items = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 5])
    return InteractionMatrix.from_pairs(users, items, N_USERS, N_ITEMS)


def test_feature_kinds_codes_and_alignment():
    f = _features()
    assert [(s.name, s.kind) for s in f.specs] == [
        ("genre", "categorical"),
        ("year", "categorical"),
        ("price", "numeric"),
        ("tags", "tags"),
    ]
    genre, year, _, tags = f.specs
    assert genre.vocabulary == ("x", "y", "z")
    assert year.vocabulary == ("1990", "2000", "2010")
    assert tags.vocabulary == ("t1", "t2", "t3")
    # Rows follow ITEM_IDS (a, b, c, d, e, f); "f" has no row in the table: all missing.
    assert f.categorical[:, 0].tolist() == [2, 1, 1, 0, 3, 0]
    assert f.categorical[:, 1].tolist() == [2, 1, 1, 3, 2, 0]
    mean, std = np.mean([1.0, 3.0, 5.0]), np.std([1.0, 3.0, 5.0])
    expected = [(3.0 - mean) / std, 0.0, (1.0 - mean) / std, (5.0 - mean) / std, 0.0, 0.0]
    np.testing.assert_allclose(f.numeric[:, 0].numpy(), expected, rtol=1e-6)
    values, segment, offsets = csr_rows(f.tag_indptr[0], f.tag_indices[0], torch.arange(6))
    per_item = [values[segment == i].tolist() for i in range(6)]
    assert per_item == [[], [], [1, 2], [2, 3], [1], []]
    assert offsets.tolist() == [0, 0, 0, 2, 4, 5]


def test_feature_state_encodes_new_items_with_the_same_vocabularies():
    f = _features()
    new = pl.DataFrame(
        {
            "item_id": ["n1", "n2"],
            "genre": ["y", "unseen"],
            "year": [2010, 1800],
            "price": [3.0, 1.0],
            "tags": [["t3", "zz"], []],
        }
    )
    g = ItemFeatureTensors.from_frame(new, ["n1", "n2"], (), state=f.state())
    assert g.specs == f.specs
    assert g.categorical.tolist() == [[2, 3], [0, 0]]
    assert g.tag_indptr[0].tolist() == [0, 1, 1] and g.tag_indices[0].tolist() == [3]
    rebuilt = ItemFeatureTensors.from_tensors(f.state(), f.tensors())
    assert rebuilt.specs == f.specs and torch.equal(rebuilt.numeric, f.numeric)


def test_feature_errors_name_the_problem():
    frame = _items_frame()
    with pytest.raises(DataError, match=r"lacks feature column\(s\) \['colour'\]"):
        ItemFeatureTensors.from_frame(frame, ITEM_IDS, ["colour"])
    with pytest.raises(DataError, match="repeats 1 item_id"):
        ItemFeatureTensors.from_frame(pl.concat([frame, frame.head(1)]), ITEM_IDS, ["genre"])
    with pytest.raises(DataError, match="column 'when' has dtype Date"):
        ItemFeatureTensors.from_frame(
            frame.with_columns(pl.lit(None, dtype=pl.Date).alias("when")), ITEM_IDS, ["when"]
        )
    with pytest.raises(DataError, match="trained with it as categorical"):
        ItemFeatureTensors.from_frame(
            frame.with_columns(pl.col("year").cast(pl.Float64)), ITEM_IDS, (), state=_features().state()
        )


def test_scores_are_the_distance_of_the_exported_vectors():
    for distance in ("euclidean", "cosine", "dot"):
        model = TwoTowerModel(
            N_USERS, N_ITEMS, ModelConfig(dim=DIM, distance=distance, init_scale=1.0), seed=3
        )
        users, items = model.user_embeddings(), model.item_embeddings()
        assert users.shape == (N_USERS, DIM) and items.shape == (N_ITEMS, DIM)
        with torch.no_grad():
            scores = model.score(np.arange(N_USERS))
        if distance == "euclidean":
            expected = -torch.cdist(users, items)
        elif distance == "cosine":
            expected = users @ items.T
            np.testing.assert_allclose(users.norm(dim=1).detach().numpy(), 1.0, rtol=1e-6)
        else:
            expected = users @ items.T
        torch.testing.assert_close(scores, expected.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score([2, 4], [1, 3]), scores[[2, 4]][:, [1, 3]])


def test_initial_rows_lie_well_inside_the_unit_ball():
    model = TwoTowerModel(500, 400, ModelConfig(dim=64), seed=0)
    with torch.no_grad():
        norms = model.item_embeddings().norm(dim=1)
    assert float(norms.max()) < 0.2 and abs(float(norms.mean()) - 0.1) < 0.01


def test_identity_mahalanobis_map_equals_the_plain_model():
    plain = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM, init_scale=1.0), seed=1)
    mapped = TwoTowerModel(
        N_USERS, N_ITEMS, ModelConfig(dim=DIM, init_scale=1.0, feature_map="linear"), seed=1
    )
    assert torch.equal(mapped.feature_map.weight, torch.eye(DIM))
    with torch.no_grad():
        assert torch.equal(plain.score(np.arange(N_USERS)), mapped.score(np.arange(N_USERS)))
        mapped.feature_map.weight.copy_(
            torch.tensor([[2.0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0.5]])
        )
        u, i = plain.user_embeddings(), plain.item_embeddings()
        diff = u[:, None, :] - i[None, :, :]
        mahalanobis = torch.einsum("uid,ed->uie", diff, mapped.feature_map.weight).norm(dim=2)
        torch.testing.assert_close(mapped.score(np.arange(N_USERS)), -mahalanobis, atol=1e-5, rtol=1e-5)


def test_fold_in_embedding_tower_is_the_pull_term_optimum():
    model = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM, init_scale=1.0), seed=2)
    items = model.item_embeddings([1, 3, 3])
    torch.testing.assert_close(model.fold_in([1, 3, 3]), items.mean(0))
    dot = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM, distance="dot", init_scale=1.0), seed=2)
    vector = dot.fold_in(np.array([0, 2]))
    mean = dot.item_embeddings([0, 2]).mean(0)
    torch.testing.assert_close(vector, mean / mean.norm())
    with pytest.raises(ValueError, match="at least one liked item"):
        model.fold_in([])
    with pytest.raises(ValueError, match=r"lie in \[0, 6\)"):
        model.fold_in([6])


def test_pooled_tower_folds_in_a_known_user_to_their_own_vector():
    history = _history()
    model = TwoTowerModel(
        N_USERS,
        N_ITEMS,
        ModelConfig(dim=DIM, user_tower="pooled", init_scale=1.0),
        user_history=history,
        seed=0,
    )
    with torch.no_grad():
        model.pool.weight.copy_(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(1)))
        users = model.user_embeddings()
        for u in range(N_USERS):
            torch.testing.assert_close(model.fold_in(history.row(u)), users[u])
    raw = model.item_embedding.weight[[3, 4, 5]].mean(0)
    torch.testing.assert_close(users[2], model.pool(raw), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="needs the users' liked items"):
        TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM, user_tower="hybrid"))


def test_feature_tower_cold_items_use_features_alone():
    f = _features()
    config = ModelConfig(dim=DIM, item_features=COLUMNS)
    model = TwoTowerModel(N_USERS, N_ITEMS, config, item_features=f, seed=0)
    assert torch.count_nonzero(model.item_embedding.weight) == 0
    with torch.no_grad():
        torch.testing.assert_close(model.item_embeddings_from_features(f), model.item_embeddings())
        new = pl.DataFrame(
            {"item_id": ["n"], "genre": ["x"], "year": [1990], "price": [1.0], "tags": [["t1", "t2"]]}
        )
        cold = model.item_embeddings_from_features(
            ItemFeatureTensors.from_frame(new, ["n"], (), state=model.feature_state())
        )
        # Item "c" (number 2) has exactly these features.
        torch.testing.assert_close(cold[0], model.item_embeddings([2])[0])
    with pytest.raises(ConfigError, match="needs the item feature tensors"):
        TwoTowerModel(N_USERS, N_ITEMS, config)
    plain = TwoTowerModel(N_USERS, N_ITEMS, ModelConfig(dim=DIM))
    with pytest.raises(ConfigError, match="no item feature tower"):
        plain.item_embeddings_from_features(f)


@pytest.mark.parametrize(
    "config, with_features, with_history",
    [
        (ModelConfig(dim=DIM), False, False),
        (
            ModelConfig(
                dim=DIM, distance="cosine", user_tower="hybrid", item_features=COLUMNS, feature_map="linear"
            ),
            True,
            True,
        ),
        (ModelConfig(dim=DIM, distance="dot", user_tower="pooled"), False, True),
    ],
)
def test_state_dict_round_trips_through_weights_only_load(tmp_path, config, with_features, with_history):
    model = TwoTowerModel(
        N_USERS,
        N_ITEMS,
        config,
        item_features=_features() if with_features else None,
        user_history=_history() if with_history else None,
        seed=5,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    hparams = model.hparams()
    assert hparams == json.loads(json.dumps(hparams))
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    rebuilt = TwoTowerModel.from_hparams(hparams, state)
    with torch.no_grad():
        assert torch.equal(rebuilt.score(np.arange(N_USERS)), model.score(np.arange(N_USERS)))
    with pytest.raises(ConfigError, match="format"):
        TwoTowerModel.from_hparams({**hparams, "format": "other"}, state)


def test_user_embeddings_in_chunks_equal_one_by_one():
    rng = np.random.default_rng(0)
    n_users = 20_000
    history = InteractionMatrix.from_pairs(
        rng.integers(0, n_users, 60_000), rng.integers(0, N_ITEMS, 60_000), n_users, N_ITEMS
    )
    model = TwoTowerModel(
        n_users, N_ITEMS, ModelConfig(dim=DIM, user_tower="pooled"), user_history=history, seed=0
    )
    with torch.no_grad():
        every = model.user_embeddings()
        some = model.user_embeddings(np.array([0, 8191, 8192, 19_999]))
    torch.testing.assert_close(every[[0, 8191, 8192, 19_999]], some)
    assert math.isfinite(float(every.sum()))
