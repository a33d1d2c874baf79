"""Prefect flows: nightly retrain end to end, crash safety, gate refusal, batch tables, deployments."""

import polars as pl
import pytest
from prefect.artifacts import Artifact
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_HOME,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness

import flows.nightly_retrain as nightly_module
from flows.batch_recommendations import batch_recommendations
from flows.deployments import deployments
from flows.nightly_retrain import METRICS_KEY, REPORT_KEY, nightly_retrain
from recsys_metric import cli, pipeline
from recsys_metric.data import prepare as data_prepare
from recsys_metric.data.synthetic import generate_log
from recsys_metric.errors import DataError
from recsys_metric.recommend import Recommender
from recsys_metric.registry import ArtifactStore

pytestmark = pytest.mark.prefect

GOOD = "train: {epochs: 6, patience: 2, batch_size: 512}\n"
WORSE = "train: {epochs: 1, patience: 2, batch_size: 512, lr: 0.001}\n"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("prefect-home")
    for name, value in {
        "PREFECT_HOME": str(home),
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    }.items():
        mp.setenv(name, value)
    try:
        # A fresh PREFECT_HOME: nothing persisted by an earlier session can be served from cache.
        with temporary_settings(updates={PREFECT_HOME: home, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            with prefect_test_harness(server_startup_timeout=90):
                yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow-data")
    generate_log(300, 150, 9000, n_clusters=6, seed=3).interactions.write_parquet(d / "interactions.parquet")
    (d / "good.yaml").write_text(GOOD)
    (d / "worse.yaml").write_text(WORSE)
    return d


def _retrain(data, artifacts, config="good.yaml", **kw):
    return nightly_retrain(
        interactions=str(data / "interactions.parquet"),
        artifacts=str(artifacts),
        config_path=str(data / config),
        **kw,
    )


def test_flow_publishes_and_a_second_run_moves_current(prefect_api, data, tmp_path):
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

    markdown = Artifact.get(REPORT_KEY)
    assert second["run_id"] in markdown.data and second["reason"] in markdown.data
    assert first["run_id"] in markdown.data, "the published run's figures stand beside the candidate's"
    assert Artifact.get(METRICS_KEY).type == "table"


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
    assert any(p.name.startswith(".tmp-") for p in store.runs_dir.iterdir()), "the crashed run stays pending"
    assert Recommender.load(tmp_path).recommend(user, k=5).equals(before)

    monkeypatch.undo()
    again = _retrain(data, tmp_path)
    assert again["published"] and store.current() == again["run_id"]
    assert [r.run_id for r in store.list_runs() if r.complete] == [first["run_id"], again["run_id"]]
    assert Recommender.load(tmp_path).run_id == again["run_id"]


def test_publish_retries_a_transient_io_error(prefect_api, data, tmp_path, monkeypatch):
    real_publish = ArtifactStore.publish
    calls = []

    def flaky(self, run_id):
        calls.append(run_id)
        if len(calls) == 1:
            raise OSError("NFS hiccup")
        return real_publish(self, run_id)

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
    assert batch.parameters["out"] == str(tmp_path / "artifacts" / "recommendations")
    assert batch.parameters["k"] == 50 and batch.parameters["index"] == "exact"
    assert nightly.entrypoint.endswith("nightly_retrain.py:nightly_retrain")
    assert batch.entrypoint.endswith("batch_recommendations.py:batch_recommendations")


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
