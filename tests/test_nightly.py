"""The nightly pipeline in plain Python: publish only complete, good runs."""

import pytest

from recsys_metric import pipeline
from recsys_metric.config import config_from_dict
from recsys_metric.data.synthetic import generate_log
from recsys_metric.nightly import run_nightly, train_into_store
from recsys_metric.recommend import Recommender
from recsys_metric.registry import ArtifactStore

GOOD = {"train": {"epochs": 8, "patience": 2, "batch_size": 512}, "eval": {"ks": [10, 20]}}


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    d = tmp_path_factory.mktemp("log")
    generate_log(300, 150, 9000, n_clusters=6, seed=3).interactions.write_parquet(d / "interactions.parquet")
    return d / "interactions.parquet"


def test_two_runs_leave_two_run_dirs_and_current_on_the_second(log, tmp_path):
    first = run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    second = run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    assert first.published and second.published, second.decision.reason
    store = ArtifactStore(tmp_path)
    assert [r.run_id for r in store.list_runs()] == [first.run_id, second.run_id]
    assert store.current() == second.run_id
    assert second.previous_run_id == first.run_id
    # The gate compared like with like: the current run's holdout model on the same holdout.
    current_recall = second.current_on_holdout["metrics"]["recall@20"]
    assert current_recall == pytest.approx(
        first.run.metrics["holdout"]["models"]["model"]["recall@20"], abs=0.02
    )
    assert Recommender.load(tmp_path).run_id == second.run_id


def test_a_crash_leaves_current_unchanged_and_a_rerun_succeeds(log, tmp_path, monkeypatch):
    first = run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    rec = Recommender.load(tmp_path)
    some_user = rec.user_ids[0]
    before = rec.recommend(some_user, k=5)

    def broken(*args, **kwargs):
        raise OSError("disk full while writing the index")

    monkeypatch.setattr(pipeline, "build_index", broken)
    with pytest.raises(OSError, match="disk full"):
        run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    store = ArtifactStore(tmp_path)
    assert store.current() == first.run_id
    assert [r.run_id for r in store.list_runs() if r.complete] == [first.run_id]
    assert not list(store.runs_dir.glob(".tmp-*")), "a failed run removes its own temporary directory"
    assert rec.recommend(some_user, k=5).equals(before)
    assert Recommender.load(tmp_path).recommend(some_user, k=5).equals(before)

    monkeypatch.undo()
    again = run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    assert again.published and store.current() == again.run_id


def test_train_into_store_removes_a_failed_run_and_a_failed_publish_keeps_the_complete_run(
    log, tmp_path, monkeypatch
):
    """Both writers share one prologue and failure path: before finalize a failure removes the
    run's temporary directory; after it the run is complete and stays."""

    def broken(*args, **kwargs):
        raise OSError("disk full while writing the index")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "build_index", broken)
        with pytest.raises(OSError, match="disk full while writing the index"):
            train_into_store(log, tmp_path, config_from_dict(GOOD), progress=False)
    store = ArtifactStore(tmp_path)
    assert store.list_runs() == [] and not list(store.runs_dir.glob(".tmp-*"))

    _, run_dir = train_into_store(log, tmp_path, config_from_dict(GOOD), progress=False)
    assert [r.run_id for r in store.list_runs() if r.complete] == [run_dir.name] and store.current() is None

    def refuse(self, run_id, **kwargs):
        raise RuntimeError(f"publish of {run_id} refused")

    monkeypatch.setattr(ArtifactStore, "publish", refuse)
    with pytest.raises(RuntimeError, match="publish of .* refused"):
        run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False, force=True)
    complete = [r.run_id for r in store.list_runs() if r.complete]
    assert len(complete) == 2 and complete[0] == run_dir.name and store.current() is None
    assert not list(store.runs_dir.glob(".tmp-*"))


def test_gate_refuses_a_worse_model_and_force_overrides(log, tmp_path):
    run_nightly(log, tmp_path, config_from_dict(GOOD), progress=False)
    current = ArtifactStore(tmp_path).current()
    worse = config_from_dict({**GOOD, "train": {**GOOD["train"], "epochs": 1, "lr": 0.001}})
    refused = run_nightly(log, tmp_path, worse, progress=False)
    assert not refused.published
    assert refused.decision.reason.startswith("refuse")
    assert ArtifactStore(tmp_path).current() == current
    assert refused.run_dir.exists(), "a refused run is kept for inspection"
    forced = run_nightly(log, tmp_path, worse, force=True, progress=False)
    assert forced.published and forced.decision.forced
    assert ArtifactStore(tmp_path).current() == forced.run_id
