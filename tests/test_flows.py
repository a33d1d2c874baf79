"""Prefect flows: nightly retrain end to end, crash safety, gate refusal, batch tables, deployments."""

import json

import polars as pl
import pytest
from prefect.artifacts import Artifact
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_LOCAL_STORAGE_PATH,
    Settings,
    get_current_settings,
    temporary_settings,
)

import flows.deployments as deployments_module
import flows.nightly_retrain as nightly_module
from flows.artifact_keys import artifact_key, store_slug
from flows.batch_recommendations import REPORT_KEY as BATCH_REPORT_KEY
from flows.batch_recommendations import batch_recommendations
from flows.deployments import deployments
from flows.nightly_retrain import nightly_retrain, one_off_settings, report_keys, run_once
from recsys_metric import cli, pipeline
from recsys_metric.data import prepare as data_prepare
from recsys_metric.data.synthetic import generate_log
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.recommend import Recommender
from recsys_metric.registry import ArtifactStore

pytestmark = pytest.mark.prefect

GOOD = "train: {epochs: 6, patience: 2, batch_size: 512}\n"
WORSE = "train: {epochs: 1, patience: 2, batch_size: 512, lr: 0.001}\n"
WARM = "train: {epochs: 6, patience: 2, batch_size: 512, warm_start: true}\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow-data")
    generate_log(300, 150, 9000, n_clusters=6, seed=3).interactions.write_parquet(d / "interactions.parquet")
    (d / "good.yaml").write_text(GOOD)
    (d / "worse.yaml").write_text(WORSE)
    (d / "warm.yaml").write_text(WARM)
    return d


def _retrain(data, artifacts, config="good.yaml", **kw):
    return nightly_retrain(
        interactions=str(data / "interactions.parquet"),
        artifacts=str(artifacts),
        config_path=str(data / config),
        **kw,
    )


def _stored_results() -> set[str]:
    storage = PREFECT_LOCAL_STORAGE_PATH.value()
    return {str(p) for p in storage.rglob("*")} if storage.exists() else set()


def test_flow_publishes_and_a_second_run_moves_current(prefect_api, data, tmp_path):
    stored_before = _stored_results()
    first = _retrain(data, tmp_path)
    assert first["published"] and first["reason"].startswith("publish: no current model")
    assert first["current_run_id"] == first["run_id"] and first["previous_run_id"] is None
    assert Recommender.load(tmp_path).run_id == first["run_id"]
    assert [row["model"] for row in first["metrics"]] == ["candidate", "popularity"]
    assert first["index"]["recall_at_10"] > 0.5

    second = _retrain(data, tmp_path)
    assert second["published"], second["reason"]
    store = ArtifactStore(tmp_path)
    assert [r.run_id for r in store.list_runs()] == [first["run_id"], second["run_id"]]
    assert all(r.complete for r in store.list_runs())
    assert store.current() == second["run_id"] == second["current_run_id"]
    assert second["previous_run_id"] == first["run_id"]
    assert Recommender.load(tmp_path).run_id == second["run_id"]
    rows = {row["model"]: row for row in second["metrics"]}
    assert rows["current"]["run_id"] == first["run_id"]
    assert rows["candidate"]["recall@20"] == pytest.approx(second["decision"]["candidate_recall"], abs=1e-4)
    assert rows["current"]["recall@20"] == pytest.approx(second["decision"]["current_recall"], abs=1e-4)
    assert store.manifest(second["run_id"]).extra["gate"]["reason"] == second["reason"]

    report_key, metrics_key = report_keys(str(tmp_path))
    assert report_key == f"nightly-retrain-report-{store_slug(tmp_path)}"
    markdown = Artifact.get(report_key)
    assert second["run_id"] in markdown.data and second["reason"] in markdown.data
    assert first["run_id"] in markdown.data, "the published run's figures stand beside the candidate's"
    assert Artifact.get(metrics_key).type == "table"
    assert _stored_results() == stored_before, "no task result is persisted to Prefect's storage"


def test_the_flow_warm_starts_from_the_run_it_is_gated_against(prefect_api, data, tmp_path):
    first = _retrain(data, tmp_path, config="warm.yaml")
    second = _retrain(data, tmp_path, config="warm.yaml")
    # The flow parameter overrides the config both ways.
    third = _retrain(data, tmp_path, config="warm.yaml", warm_start=False)
    fourth = _retrain(data, tmp_path, config="good.yaml", warm_start=True)
    runs = (first, second, third, fourth)
    warm = [ArtifactStore(tmp_path).run_dir(r["run_id"]) / "metrics.json" for r in runs]
    first_warm, second_warm, third_warm, fourth_warm = (json.loads(p.read_text())["warm_start"] for p in warm)
    assert first_warm["reason"] == "cold start: there is no current run to start from"
    assert second_warm["enabled"] and second_warm["source_run_id"] == first["run_id"]
    assert {row["model"]: row["run_id"] for row in second["metrics"]}["current"] == first["run_id"]
    assert not third_warm["enabled"] and third_warm["reason"] == "cold start: train.warm_start is off"
    assert fourth_warm["enabled"] and fourth_warm["source_run_id"] == third["current_run_id"]


def test_a_crash_in_a_task_leaves_current_and_a_rerun_succeeds(prefect_api, data, tmp_path, monkeypatch):
    first = _retrain(data, tmp_path)
    rec = Recommender.load(tmp_path)
    user = rec.user_ids[0]
    before = rec.recommend(user, k=5)

    def disk_full(*args, **kwargs):
        raise OSError("disk full while writing the index")

    monkeypatch.setattr(pipeline, "build_index", disk_full)
    with pytest.raises(OSError, match="disk full"):
        _retrain(data, tmp_path)
    store = ArtifactStore(tmp_path)
    assert store.current() == first["run_id"]
    assert [r.run_id for r in store.list_runs() if r.complete] == [first["run_id"]]
    assert not any(p.name.startswith(".tmp-") for p in store.runs_dir.iterdir()), "a failed run cleans up"
    assert Recommender.load(tmp_path).recommend(user, k=5).equals(before)

    monkeypatch.undo()
    again = _retrain(data, tmp_path)
    assert again["published"] and store.current() == again["run_id"]
    assert [r.run_id for r in store.list_runs() if r.complete] == [first["run_id"], again["run_id"]]
    assert Recommender.load(tmp_path).run_id == again["run_id"]


def test_publish_retries_a_transient_io_error(prefect_api, data, tmp_path, monkeypatch):
    real_publish = ArtifactStore.publish
    calls = []

    def flaky(self, run_id, **kwargs):
        calls.append(run_id)
        if len(calls) == 1:
            raise OSError("NFS hiccup")
        return real_publish(self, run_id, **kwargs)

    monkeypatch.setattr(ArtifactStore, "publish", flaky)
    monkeypatch.setattr(nightly_module, "publish", nightly_module.publish.with_options(retry_delay_seconds=0))
    result = _retrain(data, tmp_path)
    assert len(calls) == 2 and result["published"]
    assert ArtifactStore(tmp_path).current() == result["run_id"]


def test_bad_data_is_not_retried(prefect_api, data, tmp_path, monkeypatch):
    calls = []

    def bad(*args, **kwargs):
        calls.append(1)
        raise DataError("interactions.parquet: column user_id has 9000 nulls")

    monkeypatch.setattr(data_prepare, "prepare_dataset", bad)
    with pytest.raises(DataError, match="9000 nulls"):
        _retrain(data, tmp_path)
    assert calls == [1]
    assert ArtifactStore(tmp_path).current() is None


def test_the_flow_respects_the_store_writer_lock(prefect_api, data, tmp_path):
    """Another process writes to the store: the flow fails at once naming it, writing nothing."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from recsys_metric.store.lock import StoreLockedError

    holder_code = (
        "import sys, time\nfrom recsys_metric.store.lock import store_lock\n"
        "with store_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"is being written by pid {holder.pid} on "):
            _retrain(data, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "runs").exists()


def test_gate_refusal_returns_the_reason_and_keeps_current(prefect_api, data, tmp_path):
    good = _retrain(data, tmp_path)
    refused = _retrain(data, tmp_path, config="worse.yaml")
    assert not refused["published"]
    assert refused["reason"].startswith("refuse: candidate recall@20")
    assert refused["reason"] == refused["decision"]["reason"]
    store = ArtifactStore(tmp_path)
    assert store.current() == good["run_id"] == refused["current_run_id"]
    assert store.run_dir(refused["run_id"]).is_dir(), "a refused run is kept, complete, for inspection"
    assert Recommender.load(tmp_path).run_id == good["run_id"]


def test_batch_flow_writes_the_current_runs_table_in_its_own_directory(prefect_api, data, tmp_path):
    artifacts, out = tmp_path / "artifacts", tmp_path / "recs"
    run_id = _retrain(data, artifacts)["run_id"]
    stats = batch_recommendations(artifacts=str(artifacts), out=str(out), k=5)
    assert stats["run_id"] == run_id and stats["out_dir"] == str(out / run_id)
    table = pl.read_parquet(out / run_id / "*.parquet")
    assert table.columns == ["user_id", "rank", "item_id", "score", "run_id"]
    assert table["run_id"].unique().to_list() == [run_id]
    assert table.height == 300 * 5 and table["user_id"].n_unique() == 300

    users = Recommender.load(artifacts).user_ids[:3].to_list()
    (tmp_path / "users.txt").write_text("".join(f"{u}\n" for u in users) + "\n")
    some = batch_recommendations(
        artifacts=str(artifacts), out=str(out), k=5, users_path=str(tmp_path / "users.txt")
    )
    assert some["n_rows"] == 15
    assert sorted(pl.read_parquet(out / run_id / "*.parquet")["user_id"].unique().to_list()) == sorted(users)
    assert [p.name for p in out.iterdir()] == [run_id], "a re-run replaces the same run's table"


def test_deployments_schedule_both_flows_without_a_server(tmp_path):
    nightly, batch = deployments(artifacts=str(tmp_path / "artifacts"), config_path="cfg.yaml", k=50)
    assert (nightly.name, batch.name) == ("nightly-retrain", "batch-recommendations")
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]
    assert [(s.schedule.cron, s.schedule.timezone) for s in batch.schedules] == [("0 4 * * *", "UTC")]
    assert nightly.parameters["artifacts"] == batch.parameters["artifacts"] == str(tmp_path / "artifacts")
    assert nightly.parameters["config_path"].endswith("/cfg.yaml") and nightly.parameters["force"] is False
    assert nightly.parameters["warm_start"] is None, "the config's train.warm_start decides"
    assert batch.parameters["out"] == str(tmp_path / "artifacts" / "recommendations")
    assert batch.parameters["k"] == 50 and batch.parameters["index"] == "exact"
    assert nightly.entrypoint.endswith("nightly_retrain.py:nightly_retrain")
    assert batch.entrypoint.endswith("batch_recommendations.py:batch_recommendations")


def test_cron_overrides_and_a_name_suffix_make_a_trial_deployment(tmp_path):
    nightly, batch = deployments(
        artifacts=str(tmp_path), retrain_cron="* * * * *", batch_cron="*/5 * * * *", name_suffix="test"
    )
    assert (nightly.name, batch.name) == ("nightly-retrain-test", "batch-recommendations-test")
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("* * * * *", "UTC")]
    assert [(s.schedule.cron, s.schedule.timezone) for s in batch.schedules] == [("*/5 * * * *", "UTC")]
    assert nightly.parameters["artifacts"] == str(tmp_path) and nightly.parameters["force"] is False
    assert batch.parameters["out"] == str(tmp_path / "recommendations") and batch.parameters["k"] == 100

    with pytest.raises(ConfigError, match=r"--retrain-cron '\* \* \*' is not a valid cron expression"):
        deployments(retrain_cron="* * *")
    with pytest.raises(ConfigError, match="--batch-cron '0 25 \\* \\* \\*' is not a valid cron"):
        deployments(batch_cron="0 25 * * *")
    with pytest.raises(ConfigError, match="--name-suffix 'my test' must start with a letter or digit"):
        deployments(name_suffix="my test")


def test_serve_passes_the_command_line_to_the_deployments(monkeypatch, tmp_path):
    served = []
    monkeypatch.setattr(cli, "prefect_api_problem", lambda: None)
    monkeypatch.setattr(deployments_module, "serve_all", lambda *deps: served.extend(deps))
    argv = ["serve", "--artifacts", str(tmp_path), "-k", "7", "--retrain-cron", "* * * * *"]
    assert cli.main([*argv, "--batch-cron", "30 * * * *", "--name-suffix", "trial-1"]) == 0
    nightly, batch = served
    assert (nightly.name, batch.name) == ("nightly-retrain-trial-1", "batch-recommendations-trial-1")
    assert (
        nightly.schedules[0].schedule.cron == "* * * * *" and batch.schedules[0].schedule.cron == "30 * * * *"
    )
    assert batch.parameters["k"] == 7 and batch.parameters["artifacts"] == str(tmp_path)
    assert nightly.parameters["warm_start"] is None

    served.clear()
    assert cli.main(["serve", "--warm-start"]) == 0
    assert served[0].parameters["warm_start"] is True

    served.clear()
    assert cli.main(["serve"]) == 0
    assert [d.schedules[0].schedule.cron for d in served] == ["0 2 * * *", "0 4 * * *"]
    assert [d.name for d in served] == ["nightly-retrain", "batch-recommendations"]


def test_serve_reports_a_bad_cron_before_looking_for_a_server(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli.main(["serve", "--retrain-cron", "every minute"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recsys-metric serve: error: --retrain-cron 'every minute' is not a valid cron")
    assert "PREFECT_API_URL" not in err


def test_a_run_started_by_hand_has_no_heartbeat_unless_one_is_configured(monkeypatch):
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    monkeypatch.delenv("PREFECT_RUNNER_HEARTBEAT_FREQUENCY", raising=False)
    assert one_off_settings(Settings()) == {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "60")
    assert one_off_settings(Settings()) == {}

    def fake_flow(**params):
        return {"heartbeat": get_current_settings().flows.heartbeat_frequency, **params}

    monkeypatch.setattr(nightly_module, "nightly_retrain", fake_flow)
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 90}):
        assert run_once(artifacts="a") == {"heartbeat": 90, "artifacts": "a"}, "a configured value stands"
    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    monkeypatch.setattr(nightly_module, "get_current_settings", Settings)  # nothing configured
    with temporary_settings(restore_defaults={PREFECT_FLOWS_HEARTBEAT_FREQUENCY}):
        assert run_once(artifacts="a") == {"heartbeat": None, "artifacts": "a"}
        assert get_current_settings().flows.heartbeat_frequency == 180, "only for the call"


def test_serve_without_a_reachable_api_says_what_to_run(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err
    assert "prefect server start" in err and "export PREFECT_API_URL=http://127.0.0.1:4200/api" in err

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert cli.main(["serve"]) == 2
    assert "http://127.0.0.1:9/api is not reachable" in capsys.readouterr().err


def test_a_running_api_passes_the_serve_check(prefect_api):
    assert cli.prefect_api_problem() is None


def test_artifact_keys_name_the_store_and_the_deployment(tmp_path):
    a, b = tmp_path / "store-a", tmp_path / "Store B"
    assert artifact_key("nightly-retrain-report", a) != artifact_key("nightly-retrain-report", b)
    assert artifact_key("nightly-retrain-report", b).startswith("nightly-retrain-report-store-b-")
    assert artifact_key("x", a) == artifact_key("x", str(a) + "/"), "one store, one key"
    in_trial = artifact_key("nightly-retrain-report", a, "nightly-retrain-test")
    assert in_trial == f"nightly-retrain-test--nightly-retrain-report-{store_slug(a)}"
    assert all(ch.islower() or ch.isdigit() or ch == "-" for ch in in_trial)


def test_two_stores_keep_their_own_latest_report(prefect_api, data, tmp_path):
    one = _retrain(data, tmp_path / "one")
    two = _retrain(data, tmp_path / "two")
    assert one["run_id"] in Artifact.get(report_keys(str(tmp_path / "one"))[0]).data
    assert two["run_id"] in Artifact.get(report_keys(str(tmp_path / "two"))[0]).data

    stats = batch_recommendations(artifacts=str(tmp_path / "one"), out=str(tmp_path / "recs"), k=3)
    report = Artifact.get(artifact_key(BATCH_REPORT_KEY, tmp_path / "one")).data
    assert f"# Batch recommendations of run {one['run_id']}" in report
    assert f"| rows | {stats['n_rows']:,} |" in report and f"| users | {stats['n_users']:,} |" in report
    assert "| finished (UTC) | 20" in report
    assert Artifact.get(artifact_key(BATCH_REPORT_KEY, tmp_path / "two")) is None


def test_a_transient_read_error_is_retried_and_a_failed_run_stores_nothing(
    prefect_api, data, tmp_path, monkeypatch
):
    real = data_prepare.prepare_dataset
    calls = []

    def caught_mid_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise DataError("interactions.parquet: not a readable Parquet file (truncated)", transient=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_prepare, "prepare_dataset", caught_mid_copy)
    monkeypatch.setattr(nightly_module, "prepare", nightly_module.prepare.with_options(retry_delay_seconds=0))
    result = _retrain(data, tmp_path / "a")
    assert len(calls) == 2 and result["published"]

    stored_before = _stored_results()

    def schema_error(*args, **kwargs):
        calls.append(1)
        raise DataError("interactions.parquet: required column user_id is missing")

    monkeypatch.setattr(data_prepare, "prepare_dataset", schema_error)
    calls.clear()
    with pytest.raises(DataError, match="required column"):
        _retrain(data, tmp_path / "b")
    assert calls == [1], "a schema error is never retried"
    assert _stored_results() == stored_before, "a failed run pickles nothing into Prefect's result storage"


def test_the_flow_module_reports_a_bad_config_in_one_line_before_starting_prefect(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("eval: {ks: [10]}\npublish: {gate_k: 20}\n")
    assert nightly_module.main(["--config", str(bad), "--artifacts", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"python -m flows.nightly_retrain: error: invalid config {bad}: publish.gate_k 20 is not one of "
        "eval.ks [10]: the gate compares the holdout Recall@gate_k, so add 20 to eval.ks or set "
        "publish.gate_k to one of them\n"
    )
