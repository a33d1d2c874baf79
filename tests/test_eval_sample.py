"""The sampled holdout evaluation end to end: a run records its seeded user sample in metrics.json,
and the quality gate, rebuilding the holdout, scores exactly those users (or refuses)."""

import json

import numpy as np
import pytest

from recsys_metric.config import config_from_dict
from recsys_metric.data.synthetic import generate_log
from recsys_metric.evaluate import UserSample, sample_users
from recsys_metric.pipeline import train_run
from recsys_metric.registry import RegistryError, score_current_on_holdout


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sampled")
    log = tmp / "log.parquet"
    generate_log(200, 100, 4000, seed=1).interactions.write_parquet(log)
    config = config_from_dict({"train": {"epochs": 2}, "eval": {"max_users": 60, "seed": 5}})
    run_dir = tmp / "run"
    result = train_run(log, run_dir, config, run_id="sampled", progress=False)
    return run_dir, config, result


def test_run_records_a_seeded_sample_with_standard_errors(sampled_run):
    run_dir, config, result = sampled_run
    holdout = json.loads((run_dir / "metrics.json").read_text())["holdout"]
    sample = holdout["sample"]
    assert holdout["n_users"] == sample["users"] == 60
    assert sample["sampled"] is True and sample["seed"] == 5 and sample["population"] > 60
    assert result.evaluation.sample == UserSample(60, sample["population"], 5, sample["fingerprint"])
    # Standard errors for every per-user metric of both scorers, none for coverage.
    for name in ("model", "popularity"):
        errors = holdout["standard_errors"][name]
        assert set(errors) == {
            f"{m}@{k}" for m in ("recall", "ndcg", "map", "hitrate") for k in config.eval.ks
        }
        assert all(0 < se < 0.5 for se in errors.values() if se)
    table = result.evaluation.to_table().splitlines()
    assert table[0].startswith(f"60 of {sample['population']} users (seeded sample, seed 5), full ranking")


def test_gate_scores_the_same_sample(sampled_run):
    run_dir, config, _ = sampled_run
    holdout = json.loads((run_dir / "metrics.json").read_text())["holdout"]
    # The run scored against its own holdout: the gate rebuilds the holdout, draws the sample again
    # and must land on the very same users (same fingerprint) and so the same figures.
    scored = score_current_on_holdout(run_dir, run_dir, config)
    assert scored["sample"] == holdout["sample"]
    assert scored["n_users"] == 60
    for key in ("recall@20", "ndcg@20"):
        assert scored["metrics"][key] == pytest.approx(holdout["models"]["model"][key], abs=1e-6)
        assert scored["standard_errors"][key] == pytest.approx(
            holdout["standard_errors"]["model"][key], abs=1e-6
        )
    # Another seed draws other users: the gate refuses rather than compare different samples.
    other = config.model_copy(update={"eval": config.eval.model_copy(update={"seed": 6})})
    with pytest.raises(RegistryError, match=r"rebuilt holdout differs .*user sample [0-9a-f]{16} vs "):
        score_current_on_holdout(run_dir, run_dir, other)


def test_sample_draw_depends_only_on_the_eligible_users_bound_and_seed():
    eligible = np.arange(0, 3000, 3, dtype=np.int64)
    a = sample_users(eligible, 100, 11)
    assert a.tolist() == sample_users(eligible.copy(), 100, 11).tolist()
    assert np.all(np.diff(a) > 0) and np.isin(a, eligible).all() and a.size == 100
    assert a.tolist() != sample_users(eligible, 100, 12).tolist()
