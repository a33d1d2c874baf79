"""The item feature tower fitted to a trained id model (model.feature_training: fitted; issue 18)."""

import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.config import config_from_dict
from recsys_metric.data.item_table import read_item_table
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.data.synthetic import generate_log
from recsys_metric.errors import ConfigError
from recsys_metric.export import read_embeddings
from recsys_metric.item_embedder import ItemEmbedder
from recsys_metric.model import feature_fit
from recsys_metric.model.feature_fit import design_matrix, fit_item_features, ridge
from recsys_metric.model.features import ItemFeatureTensors
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.pipeline import load_model, train_run
from recsys_metric.warm_start import _full_item_vectors, _model_shape, plan_warm_start

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "interactions.parquet"
BUNDLED_ITEMS = BUNDLED.with_name("items.parquet")


def _items(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    tags = [[f"t{t}" for t in rng.choice(30, size=rng.integers(0, 4), replace=False)] for _ in range(n)]
    return pl.DataFrame(
        {
            "item_id": np.arange(n),
            "category": rng.choice(["a", "b", "c", None], size=n).tolist(),
            "price": rng.normal(10, 3, size=n),
            "tags": tags,
        }
    )


def _model(n_users: int, n_items: int, features: ItemFeatureTensors | None, dim: int = 8) -> TwoTowerModel:
    config = config_from_dict(
        {"model": {"dim": dim, "item_features": [] if features is None else ["category", "price", "tags"]}}
    )
    return TwoTowerModel(n_users, n_items, config.model, item_features=features, seed=0)


def test_design_matrix_is_the_encoder():
    table = _items(60)
    features = ItemFeatureTensors.from_frame(table, table["item_id"], ("category", "price", "tags"))
    model = _model(5, 60, features)
    design = design_matrix(features)
    encoder = model.item_encoder
    blocks = {name: (start, width) for name, start, width in design.tables}
    x = torch.zeros(design.n_columns, 8)
    start, width = blocks["cat_0"]
    x[start : start + width] = encoder.cat_embeddings[0].weight.detach()
    start, width = blocks["tag_0"]
    x[start : start + width] = encoder.tag_embeddings[0].weight.detach()
    start, width = blocks["num"]
    x[start : start + width] = encoder.numeric_linear.weight.detach().T
    with torch.no_grad():
        expected = encoder(None)
    got = design.rows(np.arange(60)) @ x
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert any(len(t) == 0 for t in table["tags"].to_list()), "items without tags are covered"


def test_ridge_matches_the_closed_form():
    rng = np.random.default_rng(1)
    dense = (rng.random((40, 25)) < 0.2) * rng.random((40, 25))
    y = rng.normal(size=(40, 3))
    a = torch.from_numpy(dense.astype(np.float32)).to_sparse_csr()
    for lam in (0.01, 1.0):
        x, steps = ridge(a, torch.from_numpy(y.astype(np.float32)), lam, tol=1e-6)
        exact = np.linalg.solve(dense.T @ dense + lam * np.eye(25), dense.T @ y)
        np.testing.assert_allclose(x.numpy(), exact, rtol=1e-3, atol=1e-3)
        assert 0 < steps <= feature_fit.CG_MAX_ITER


def _fitted(seed: int = 0, noise: float = 0.0):
    """A model whose item vectors are a known linear function of the features plus ``noise``."""
    n_users, n_items = 300, 400
    table = _items(n_items, seed)
    features = ItemFeatureTensors.from_frame(table, table["item_id"], ("category", "price", "tags"))
    truth = _model(n_users, n_items, features)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        vectors = truth.item_encoder(None) * 5 + noise * torch.from_numpy(
            rng.normal(size=(n_items, 8)).astype(np.float32)
        )
    model = _model(n_users, n_items, None)
    with torch.no_grad():
        model.item_embedding.weight.copy_(vectors)
        # Users sit on items they like: each user likes 5 items, placed at their mean.
        liked = rng.integers(0, n_items - 20, size=(n_users, 5))
        model.user_embedding.weight.copy_(vectors[torch.from_numpy(liked)].mean(1))
    users = np.repeat(np.arange(n_users), 5)
    matrix = InteractionMatrix.from_pairs(users, liked.reshape(-1), n_users, n_items)
    counts = np.bincount(liked.reshape(-1), minlength=n_items)
    return model, features, matrix, counts, vectors


def test_fit_keeps_every_trained_vector_and_places_new_items_by_features():
    model, features, liked, counts, vectors = _fitted()
    assert (counts[-20:] == 0).all()
    report = fit_item_features(model, features, liked, item_features=("category", "price", "tags"), seed=0)
    assert model.feature_state() is not None and model.config.item_features == ("category", "price", "tags")
    with torch.no_grad():
        after = model.item_embeddings()
        unliked = torch.from_numpy(counts == 0)
        placed = model.item_embeddings_from_features(features)[unliked]
    # Every item keeps its trained vector, liked or not (a negative-only item stays where it was).
    torch.testing.assert_close(after, vectors, rtol=1e-5, atol=1e-5)
    # Noise-free linear truth: the items nobody liked (not fitted) land near their true vectors
    # when placed by their features alone, as a new item would be.
    error = (placed - vectors[unliked]).norm(dim=1).mean() / vectors[unliked].norm(dim=1).mean()
    assert error < 0.25
    assert report["targets"] == int((counts > 0).sum())
    grid = report["validation"]["recall@20"]
    assert grid[f"{report['lambda']:.4g}"] == max(grid.values())
    assert len(grid) < len(feature_fit.DECADES) + 2, "the search stops once past the best"
    # The model round-trips through its hparams and state (what model.pt / model.json hold).
    again = TwoTowerModel.from_hparams(json.loads(json.dumps(model.hparams())), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.item_embeddings(), after)


def test_fit_refuses_a_model_that_already_has_a_feature_tower():
    model, features, liked, counts, _ = _fitted()
    fit_item_features(model, features, liked, item_features=("category",), seed=0, lam=0.1)
    with pytest.raises(ConfigError, match="trained without item features"):
        fit_item_features(model, features, liked, item_features=("category",), seed=0)


def test_id_dropout_needs_joint_training():
    with pytest.raises(ConfigError, match=r"feature_training = 'joint'"):
        config_from_dict({"model": {"item_features": ["tags"], "id_dropout": 0.5}})
    config = config_from_dict(
        {"model": {"item_features": ["tags"], "id_dropout": 0.5, "feature_training": "joint"}}
    )
    assert config.model.id_dropout == 0.5


def test_warm_start_reads_a_fitted_model_as_whole_vectors():
    model, features, liked, counts, vectors = _fitted()
    fit_item_features(model, features, liked, item_features=("category", "price", "tags"), seed=0)
    hparams = json.loads(json.dumps(model.hparams()))
    state = _full_item_vectors(hparams, model.state_dict())
    assert not any(k.startswith("item_encoder.") for k in state)
    with torch.no_grad():
        torch.testing.assert_close(state["item_embedding.weight"], model._item_raw(None))
    ids_only = _model(300, 400, None)
    # A fitted run (trains on ids) may start from a run with other item features, or none.
    assert _model_shape(hparams) == _model_shape(ids_only.hparams())
    joint = dict(hparams, model=dict(hparams["model"], feature_training="joint"))
    assert _model_shape(joint) != _model_shape(ids_only.hparams())


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fitted")
    log = generate_log(300, 150, 9000, n_clusters=6, seed=3, id_type="str")
    cold_ids = sorted(log.items["item_id"].to_list())[-10:]
    log.interactions.filter(~pl.col("item_id").is_in(cold_ids)).write_parquet(d / "interactions.parquet")
    log.items.write_parquet(d / "items.parquet")
    config = config_from_dict(
        {
            "train": {"epochs": 4, "batch_size": 512, "lr": 0.05},
            "eval": {"ks": [10]},
            "publish": {"gate_k": 10},
            "model": {"item_features": ["category", "price", "tags"], "dim": 16, "cold_item_lift": 1.0},
        }
    )
    result = train_run(
        d / "interactions.parquet", d / "run", config, items=d / "items.parquet", progress=False
    )
    return result, d / "run", cold_ids


def test_a_fitted_run_trains_on_ids_and_records_the_fit(fitted_run):
    result, run_dir, cold_ids = fitted_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["holdout"]["kernel"] != "features-numba"
    fit = metrics["item_features_fit"]
    assert set(fit) == {"holdout", "published"}
    for part in fit.values():
        assert part["lambda"] > 0 and part["targets"] > 100 and part["seconds"] >= 0
    assert "fit_features" in metrics["seconds"]
    model = load_model(run_dir)
    assert model.config.feature_training == "fitted" and model.feature_state() is not None
    table = read_embeddings(run_dir / "item_embeddings.parquet")
    assert table.ids.to_list()[-10:] == cold_ids
    with torch.no_grad():
        feature_only = model.item_encoder(None)[-10:]
    np.testing.assert_allclose(table.vectors[-10:], feature_only.numpy(), rtol=1e-6, atol=1e-7)


def test_the_lift_sets_new_items_back_by_the_held_out_error(fitted_run, tmp_path):
    result, run_dir, cold_ids = fitted_run
    fit = json.loads((run_dir / "metrics.json").read_text())["item_features_fit"]["published"]
    model = load_model(run_dir)
    offset = model.item_encoder.offset
    # 28 held-out items would be too few to choose lambda on: the error is the fit's own.
    assert fit["held_out_error"] is None and fit["lift_error"] > 0
    assert fit["lift_norm"] == pytest.approx(math.sqrt(fit["lift_error"]), rel=1e-4)
    # The offset is the intercept (the fitted items' mean vector) plus the lift.
    assert fit["intercept_norm"] > 0 and float(offset.norm()) > 0
    # The numpy embedder (item_tower.npz) adds the same offset as the torch tower.
    items = read_item_table(run_dir.parent / "items.parquet")
    new = items.filter(pl.col("item_id").is_in(cold_ids)).with_columns(
        pl.format("new-{}", pl.col("item_id")).alias("item_id")
    )
    numpy_vectors = ItemEmbedder.load(run_dir).embed(new)
    features = ItemFeatureTensors.from_frame(new, new["item_id"], (), state=model.feature_state())
    with torch.no_grad():
        torch_vectors = model.item_embeddings_from_features(features).numpy()
    np.testing.assert_allclose(numpy_vectors, torch_vectors, rtol=1e-5, atol=1e-6)


def test_a_model_saved_before_the_offset_loads_with_a_zero_offset():
    model, features, liked, _, _ = _fitted()
    fit_item_features(model, features, liked, item_features=("category", "price", "tags"), seed=0, lam=0.1)
    with torch.no_grad():  # as a model of before the offset: no intercept
        model.item_encoder.offset.zero_()
    state = {k: v for k, v in model.state_dict().items() if k != "item_encoder.offset"}
    again = TwoTowerModel.from_hparams(json.loads(json.dumps(model.hparams())), state)
    assert torch.count_nonzero(again.item_encoder.offset) == 0
    with torch.no_grad():
        torch.testing.assert_close(again.item_embeddings(), model.item_embeddings())


@pytest.mark.slow
def test_a_fitted_run_warm_starts_from_the_previous_runs_whole_vectors(tmp_path):
    """The next night trains ids only, so it starts from the previous model's id + feature parts,
    not from its id rows alone (the residuals of the fit)."""
    log = pl.read_parquet(BUNDLED)
    cut = log["timestamp"].sort()[int(0.97 * log.height)]
    log.filter(pl.col("timestamp") <= cut).write_parquet(tmp_path / "yesterday.parquet")
    log.write_parquet(tmp_path / "today.parquet")
    config = config_from_dict(
        {
            "train": {"epochs": 4, "patience": 2, "lr": 0.05, "warm_start": True},
            "model": {"item_features": ["category", "price", "tags"]},
        }
    )
    train_run(tmp_path / "yesterday.parquet", tmp_path / "a", config, items=BUNDLED_ITEMS, progress=False)
    second = train_run(
        tmp_path / "today.parquet",
        tmp_path / "b",
        config,
        items=BUNDLED_ITEMS,
        progress=False,
        warm_start_from=tmp_path / "a",
    )
    warm = second.metrics["warm_start"]
    assert warm["enabled"], warm["reason"]
    assert warm["holdout"]["items_carried"] > 0
    assert second.metrics["item_features_fit"]["holdout"]["targets"] > 0
    # What the ids-only training model is given: the previous model's whole raw vectors.
    previous = load_model(tmp_path / "a")
    ids_only = TwoTowerModel(
        previous.n_users, previous.n_items, previous.config.model_copy(update={"item_features": ()}), seed=0
    )
    cutoff = datetime.fromisoformat(second.metrics["early_stopping"]["validation_cutoff"])
    plan, reason = plan_warm_start(
        tmp_path / "a", ids_only, split_method="temporal", validation_cutoff=cutoff
    )
    assert plan is not None, reason
    with torch.no_grad():
        whole = previous._item_raw(None)
    torch.testing.assert_close(plan.final_state["item_embedding.weight"], whole)
    assert not torch.allclose(previous.item_embedding.weight, whole), "the id rows alone are not the vectors"
    assert not any(k.startswith("item_encoder.") for k in plan.holdout_state)
