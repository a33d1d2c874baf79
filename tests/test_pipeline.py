"""The model half of the pipeline: run directory contract, honest holdout, export round trip."""

import json

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric import pipeline
from recsys_metric.config import config_from_dict
from recsys_metric.data.synthetic import generate_log
from recsys_metric.export import read_embeddings, score_embeddings
from recsys_metric.pipeline import load_model, train_run
from recsys_metric.training.concurrent_refit import usable_cores

FAST = {"train": {"epochs": 6, "patience": 2, "batch_size": 512}, "eval": {"ks": [10, 20]}}


@pytest.fixture(scope="module")
def log_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("log")
    log = generate_log(300, 150, 9000, n_clusters=6, seed=3, id_type="str")
    log.interactions.write_parquet(d / "interactions.parquet")
    log.items.write_parquet(d / "items.parquet")
    return d


@pytest.fixture(scope="module")
def run(log_path, tmp_path_factory):
    # The data each fit trained on: the holdout fit's, then the refit's (trained beside the holdout
    # fit where the machine has two cores, else after it).
    calls = []
    real_fit = pipeline.fit

    def recording_fit(model, data, config, **kw):
        calls.append(data)
        return real_fit(model, data, config, **kw)

    class RecordingRefit(pipeline.ConcurrentRefit):
        def finish(self, epochs, planner=None):
            calls.append(self.data)
            return super().finish(epochs, planner)

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "fit", recording_fit)
    mp.setattr(pipeline, "ConcurrentRefit", RecordingRefit)
    try:
        result = train_run(
            log_path / "interactions.parquet",
            tmp_path_factory.mktemp("run"),
            config_from_dict(FAST),
            progress=False,
        )
    finally:
        mp.undo()
    return result, calls


def test_run_directory_has_the_contract_files(run):
    result, _ = run
    for name in (
        "users.parquet",
        "items.parquet",
        "rejects.parquet",
        "model.pt",
        "model.json",
        "user_embeddings.parquet",
        "item_embeddings.parquet",
        "metrics.json",
        "triplets.parquet",
    ):
        assert (result.run_dir / name).exists(), name
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["run_id"] == result.run_id
    assert set(metrics["holdout"]["models"]) == {"model", "popularity"}
    assert metrics["published_model"] == "refit_on_full_log"
    assert metrics["training"]["refit"]["history"], "refit history recorded"
    assert len(metrics["training"]["refit"]["history"]) == metrics["early_stopping"]["best_epoch"]
    # On two cores the refit trains beside the holdout fit (train.concurrent_refit), at least as far
    # as the holdout's best epoch, and publishes its weights after that epoch.
    beside = usable_cores() >= 2
    assert metrics["time_budget"]["refit"]["beside_holdout"] is beside
    concurrent = metrics["training"]["refit"]["concurrent_epochs"]
    assert (concurrent >= metrics["early_stopping"]["best_epoch"]) if beside else concurrent is None


def test_model_beats_popularity_on_learnable_data(run):
    result, _ = run
    models = result.evaluation.models
    assert models["model"]["recall@20"] > 1.5 * models["popularity"]["recall@20"]
    assert models["model"]["ndcg@20"] > 1.5 * models["popularity"]["ndcg@20"]


def test_holdout_model_never_trains_on_test_rows_and_refit_sees_everything(run):
    result, calls = run
    holdout_data, refit_data = calls
    inter = result.prepared.interactions
    n_items = len(result.prepared.items)
    keys = lambda u, i: set((np.asarray(u, dtype=np.int64) * n_items + np.asarray(i)).tolist())  # noqa: E731
    test = inter.filter(pl.col("split") != "train")
    test_keys = keys(test["user_num"].to_numpy(), test["item_num"].to_numpy())
    train_keys = keys(
        *[inter.filter(pl.col("split") == "train")[c].to_numpy() for c in ("user_num", "item_num")]
    )
    test_only = test_keys - train_keys
    assert test_only, "the fixture must have test-only pairs"
    assert not keys(holdout_data.user_num, holdout_data.item_num) & test_only
    assert not set((holdout_data.seen.keys()).tolist()) & test_only
    liked = inter.filter(pl.col("label") == 1)
    assert keys(refit_data.user_num, refit_data.item_num) == keys(
        liked["user_num"].to_numpy(), liked["item_num"].to_numpy()
    )


def test_exported_embeddings_reproduce_the_model_rankings(run):
    result, _ = run
    users = read_embeddings(result.run_dir / "user_embeddings.parquet")
    items = read_embeddings(result.run_dir / "item_embeddings.parquet")
    assert users.distance == items.distance == result.model.config.distance
    assert users.run_id == items.run_id == result.run_id
    assert users.ids.to_list() == result.prepared.users.ids().to_list()
    consumer = score_embeddings(users.vectors[:50], items.vectors, users.distance)
    with torch.no_grad():
        model_scores = result.model.score(np.arange(50)).cpu().numpy()
    np.testing.assert_allclose(consumer, model_scores, rtol=1e-5, atol=1e-6)
    assert (
        np.argsort(-consumer, axis=1, kind="stable")[:, :10]
        == np.argsort(-model_scores, axis=1, kind="stable")[:, :10]
    ).all()


def test_model_reloads_from_the_run_directory(run):
    result, _ = run
    state = torch.load(result.run_dir / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    loaded = load_model(result.run_dir)
    with torch.no_grad():
        assert torch.equal(loaded.score(np.arange(20)), result.model.to("cpu").score(np.arange(20)))


def test_auto_settings_follow_the_applied_split(run, log_path, tmp_path):
    result, _ = run
    for fit_result in result.metrics["training"].values():  # holdout and refit: temporal
        assert (fit_result["user_balance"], fit_result["item_centric_weight"]) == (0.0, 0.0)
    cfg = config_from_dict(
        {**FAST, "train": {**FAST["train"], "epochs": 2}, "split": {"method": "user_holdout"}}
    )
    per_user = train_run(log_path / "interactions.parquet", tmp_path, cfg, progress=False)
    for fit_result in per_user.metrics["training"].values():
        assert (fit_result["user_balance"], fit_result["item_centric_weight"]) == (0.5, 0.5)


def test_auto_lr_is_chosen_on_validation_and_the_refit_reuses_it(run):
    result, _ = run
    stopping = result.metrics["early_stopping"]
    search = stopping["lr_search"]
    assert [t["lr"] for t in search] == [0.05, 0.01]
    best = max(search, key=lambda t: t["best_metric"])
    assert stopping["lr"] == best["lr"] and stopping["best_validation"] == best["best_metric"]
    assert stopping["best_epoch"] == best["best_epoch"]
    training = result.metrics["training"]
    assert training["holdout"]["lr"] == training["refit"]["lr"] == stopping["lr"]
    assert training["refit"]["lr_search"] == [], "the refit trains at the chosen rate, no search"
    assert len(training["refit"]["history"]) == stopping["best_epoch"]


def test_without_refit_the_holdout_model_is_exported(log_path, tmp_path):
    cfg = config_from_dict({**FAST, "train": {**FAST["train"], "epochs": 2, "refit": False}})
    result = train_run(log_path / "interactions.parquet", tmp_path, cfg, progress=False)
    assert result.refit_training is None
    assert result.metrics["published_model"] == "holdout_model"
    items = read_embeddings(tmp_path / "item_embeddings.parquet")
    with torch.no_grad():
        np.testing.assert_array_equal(items.vectors, result.model.item_embeddings().cpu().numpy())


def test_item_features_need_an_item_table(log_path, tmp_path):
    from recsys_metric.errors import ConfigError

    cfg = config_from_dict({**FAST, "model": {"item_features": ["category", "tags"]}})
    with pytest.raises(ConfigError, match="needs an item table"):
        train_run(log_path / "interactions.parquet", tmp_path / "a", cfg, progress=False)
    result = train_run(
        log_path / "interactions.parquet",
        tmp_path / "b",
        cfg,
        items=log_path / "items.parquet",
        progress=False,
    )
    assert result.model.item_encoder is not None


@pytest.mark.skipif(usable_cores() < 2, reason="the refit trains beside the holdout fit on two cores or more")
def test_a_kept_second_phase_is_replayed_by_the_refit_beside_or_after_the_holdout_fit(log_path, tmp_path):
    # A rate too high for this log early-stops on a plateau that a tenth of it climbs off.
    train = {"epochs": 30, "batch_size": 512, "lr": 0.3, "lr_drop": 0.1, "patience": 2, "patience_growth": 0}
    published = {}
    for beside in (True, False):
        cfg = config_from_dict({**FAST, "train": {**train, "concurrent_refit": beside}})
        result = train_run(log_path / "interactions.parquet", tmp_path / str(beside), cfg, progress=False)
        phase = result.metrics["time_budget"]["second_phase"]
        assert phase["lr"] == pytest.approx(0.03) and phase["best_epoch"] > 0, phase
        stopping, refit = result.metrics["early_stopping"], result.metrics["training"]["refit"]
        assert stopping["best_epoch"] == phase["from_epoch"] + phase["best_epoch"]
        assert result.metrics["time_budget"]["refit"]["beside_holdout"] is beside
        assert len(refit["history"]) == stopping["best_epoch"]
        assert [r.get("phase") for r in refit["history"]].count(2) == phase["best_epoch"]
        assert refit["second_phase"]["lr"] == pytest.approx(0.03)
        published[beside] = read_embeddings(tmp_path / str(beside) / "item_embeddings.parquet").vectors
    np.testing.assert_array_equal(published[True], published[False])
