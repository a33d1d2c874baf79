"""Warm start: rows carried by id, new ones appended, and a cold start whenever it could leak."""

import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys_metric.config import ModelConfig, config_from_dict
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.export import read_embeddings
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.nightly import run_nightly
from recsys_metric.pipeline import load_model
from recsys_metric.warm_start import plan_warm_start, warm_start_model

BUNDLED = Path(__file__).resolve().parent.parent / "data" / "interactions.parquet"


def vocab(ids, name):
    return Vocabulary(pl.Series(ids), name=name)  # numbers in the given order


def test_rows_are_matched_by_id_and_new_ids_keep_their_initialisation():
    config = ModelConfig(dim=4, feature_map="linear")
    old = TwoTowerModel(3, 3, config, seed=1)
    with torch.no_grad():
        old.user_embedding.weight.copy_(torch.arange(12.0).reshape(3, 4))
        old.item_embedding.weight.copy_(-torch.arange(12.0).reshape(3, 4))
        old.feature_map.weight.mul_(2.0)
    new = TwoTowerModel(3, 4, config, seed=2)
    fresh_user, fresh_item = new.user_embedding.weight[2].clone(), new.item_embedding.weight[0].clone()
    counts = warm_start_model(
        new,
        old.state_dict(),
        vocab(["u1", "u2", "u3"], "user"),
        vocab(["a", "b", "c"], "item"),
        vocab(["u3", "u1", "u9"], "user"),  # u3 and u1 known (other numbers), u9 new
        vocab(["z", "c", "a", "b"], "item"),  # z new
    )
    assert counts == {
        "users_carried": 2,
        "users_new": 1,
        "items_carried": 3,
        "items_new": 1,
        "tensors_copied": 1,
    }
    users, items = new.user_embedding.weight, new.item_embedding.weight
    assert torch.equal(users[0], torch.arange(8.0, 12.0)) and torch.equal(users[1], torch.arange(0.0, 4.0))
    assert torch.equal(users[2], fresh_user)
    assert torch.equal(items[0], fresh_item)
    assert torch.equal(items[1], -torch.arange(8.0, 12.0)) and torch.equal(items[3], -torch.arange(4.0, 8.0))
    assert torch.equal(new.feature_map.weight, 2.0 * torch.eye(4))


@pytest.fixture(scope="module")
def two_days(tmp_path_factory):
    """The bundled log as of 'yesterday' (without its newest 3% of events) and 'today' (all of it)."""
    root = tmp_path_factory.mktemp("two_days")
    log = pl.read_parquet(BUNDLED)
    cut = log["timestamp"].sort()[int(0.97 * log.height)]
    log.filter(pl.col("timestamp") <= cut).write_parquet(root / "yesterday.parquet")
    new_user = log.head(3).with_columns(pl.lit("u_new_today").alias("user_id"))
    pl.concat([log, new_user]).write_parquet(root / "today.parquet")
    config = config_from_dict({"train": {"epochs": 4, "patience": 2}, "index": {"on_low_recall": "warn"}})
    first = run_nightly(root / "yesterday.parquet", root / "artifacts", config, progress=False)
    return root, first, config


@pytest.mark.slow
def test_a_warm_run_starts_from_the_current_runs_models(two_days):
    root, first, config = two_days
    assert (first.run_dir / "holdout" / "model.pt").is_file()
    assert first.run.metrics["warm_start"] == {
        "enabled": False,
        "reason": "cold start: train.warm_start is off",
        "source_run_id": None,
    }
    artifacts = root / "warm"
    shutil.copytree(root / "artifacts", artifacts, symlinks=True)
    warm_config = config.model_copy(update={"train": config.train.model_copy(update={"warm_start": True})})
    second = run_nightly(root / "today.parquet", artifacts, warm_config, progress=False)
    warm = second.run.metrics["warm_start"]
    assert warm["enabled"] and warm["source_run_id"] == first.run_id
    # train.lr auto: the warm run reuses the rate the source run chose, scaled, without a search.
    chosen = first.run.metrics["early_stopping"]["lr"]
    assert chosen in config.train.lr_candidates
    assert warm["lr_base"] == chosen
    assert warm["lr"] == pytest.approx(min(chosen, 0.015)), "warm_start_lr_scale auto caps the rate"
    assert second.run.metrics["early_stopping"]["lr"] == warm["lr"]
    assert second.run.metrics["early_stopping"]["lr_search"] == []
    assert warm["reason"].startswith(f"warm start from run {first.run_id} (validation cut-off ")
    n_old_users = len(load_model(first.run_dir).user_embedding.weight)
    for model in ("holdout", "refit"):
        assert warm[model]["users_new"] >= 1 and warm[model]["items_new"] == 0
        assert warm[model]["users_carried"] + warm[model]["users_new"] == len(second.run.prepared.users)
        assert warm[model]["users_carried"] <= n_old_users
    cut = datetime.fromisoformat(second.run.metrics["early_stopping"]["validation_cutoff"])
    assert cut >= datetime.fromisoformat(first.run.metrics["early_stopping"]["validation_cutoff"])
    assert json.loads((second.run_dir / "metrics.json").read_text())["warm_start"] == warm


@pytest.mark.slow
def test_cold_start_whenever_the_previous_model_could_leak_or_does_not_fit(two_days):
    root, first, config = two_days
    fresh = TwoTowerModel(10, 10, config.model, seed=0)
    later = datetime(2100, 1, 1)
    assert plan_warm_start(None, fresh, split_method="temporal", validation_cutoff=later) == (
        None,
        "cold start: there is no current run to start from",
    )
    plan, reason = plan_warm_start(first.run_dir, fresh, split_method="user_holdout", validation_cutoff=later)
    assert plan is None and "warm start needs the temporal split" in reason
    plan, reason = plan_warm_start(
        first.run_dir, fresh, split_method="temporal", validation_cutoff=datetime(2000, 1, 1)
    )
    assert plan is None and "its model saw rows this run validates or tests on" in reason
    other = TwoTowerModel(10, 10, config.model.model_copy(update={"dim": 8}), seed=0)
    plan, reason = plan_warm_start(first.run_dir, other, split_method="temporal", validation_cutoff=later)
    assert (
        plan is None
        and reason
        == f"cold start: run {first.run_id} has another model configuration (model section differs)"
    )
    plan, reason = plan_warm_start(first.run_dir, fresh, split_method="temporal", validation_cutoff=later)
    assert plan is not None and plan.source_run_id == first.run_id and plan.same_features
    assert set(plan.holdout_state) == set(plan.final_state)
    assert not torch.equal(
        plan.holdout_state["item_embedding.weight"], plan.final_state["item_embedding.weight"]
    )

    older = root / "older_run"
    shutil.copytree(first.run_dir, older)
    (older / "holdout" / "model.pt").unlink()
    plan, reason = plan_warm_start(older, fresh, split_method="temporal", validation_cutoff=later)
    assert plan is None and reason.endswith("has no holdout/model.pt (it predates warm start)")


@pytest.mark.slow
def test_the_source_rate_is_its_unscaled_choice(two_days, tmp_path):
    # A warm run reuses the source's rate; a warm source hands on its unscaled base rate, so the
    # scaling does not compound night after night; a run from before train.lr auto gives none.
    root, first, config = two_days
    fresh = TwoTowerModel(10, 10, config.model, seed=0)
    later = datetime(2100, 1, 1)

    def source_lr(edit) -> float | None:
        run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        shutil.copytree(first.run_dir, run)
        metrics = json.loads((run / "metrics.json").read_text())
        edit(metrics)
        (run / "metrics.json").write_text(json.dumps(metrics))
        plan, reason = plan_warm_start(run, fresh, split_method="temporal", validation_cutoff=later)
        assert plan is not None, reason
        return plan.source_lr

    chosen = first.run.metrics["early_stopping"]["lr"]
    assert source_lr(lambda m: None) == chosen
    assert source_lr(lambda m: m.update(warm_start={"enabled": True, "lr_base": 0.02, "lr": 0.006})) == 0.02
    assert source_lr(lambda m: m["early_stopping"].pop("lr")) is None


@pytest.mark.slow
def test_a_source_without_a_recorded_rate_makes_the_warm_run_search_capped_rates(two_days):
    root, first, config = two_days
    artifacts = root / "warm_from_older"
    shutil.copytree(root / "artifacts", artifacts, symlinks=True)
    source = (artifacts / "current").resolve()
    metrics = json.loads((source / "metrics.json").read_text())
    metrics["early_stopping"].pop("lr")  # as a run from before train.lr auto
    (source / "metrics.json").write_text(json.dumps(metrics))
    warm_config = config.model_copy(update={"train": config.train.model_copy(update={"warm_start": True})})
    second = run_nightly(root / "today.parquet", artifacts, warm_config, progress=False)
    warm = second.run.metrics["warm_start"]
    assert warm["enabled"] and "lr_base" not in warm
    assert warm["lr"] == [0.015, 0.01], "each candidate capped at 0.015"
    assert [t["lr"] for t in second.run.metrics["early_stopping"]["lr_search"]] == [0.015, 0.01]


def test_the_holdout_state_is_the_holdout_model(two_days):
    # holdout/model.pt rebuilds exactly the vectors exported beside it (what the gate scores).
    _, first, _ = two_days
    state = torch.load(first.run_dir / "holdout" / "model.pt", weights_only=True)
    meta = json.loads((first.run_dir / "model.json").read_text())
    with torch.no_grad():
        rebuilt = TwoTowerModel.from_hparams(meta["hparams"], state).item_embeddings().numpy()
    exported = read_embeddings(first.run_dir / "holdout" / "item_embeddings.parquet").vectors
    np.testing.assert_array_equal(rebuilt, exported)
