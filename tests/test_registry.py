"""Artifact store (manifest, verify, crash safety, atomic publish, prune), quality gate, and
scoring the current model on a candidate's holdout."""

import hashlib
import json
import os
import stat
import subprocess
import threading

import numpy as np
import polars as pl
import pytest

from recsys_metric import registry
from recsys_metric.config import PublishConfig, config_from_dict
from recsys_metric.data.prepare import SPLIT_ENUM
from recsys_metric.data.synthetic import generate_log
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.export import write_embeddings
from recsys_metric.pipeline import train_run
from recsys_metric.registry import (
    ArtifactStore,
    IntegrityError,
    RegistryError,
    gate,
    input_fingerprint,
    resolve_run_dir,
    score_current_on_holdout,
)

ANN_VALUES = np.arange(64, dtype=np.float32)


def _holdout(recall: float, popularity: float) -> dict:
    return {
        "ks": [10, 20],
        "n_users": 40,
        "models": {
            "model": {"recall@10": recall / 2, "recall@20": recall},
            "popularity": {"recall@10": popularity / 2, "recall@20": popularity},
        },
    }


def fake_run(store: ArtifactStore, run_id: str, *, recall: float = 0.3, seed: int = 0):
    """A pending run with the pipeline's kind of files (small, hand-made), not finalized."""
    pending = store.new_run(run_id)
    metrics = {
        "run_id": run_id,
        "holdout": _holdout(recall, 0.1),
        "data": {
            "validation": {"n_input_rows": 1000, "n_rejected": 7, "n_duplicates": 3, "n_valid": 990},
            "n_interactions": 990,
            "n_users": 50,
            "n_items": 20,
        },
    }
    (pending / "metrics.json").write_text(json.dumps(metrics))
    (pending / "model.json").write_text(json.dumps({"run_id": run_id, "hparams": {}}))
    (pending / "model.pt").write_bytes(np.random.default_rng(seed).bytes(1000))
    (ANN_VALUES + seed).tofile(pending / "items.ann")
    (pending / "parts").mkdir()
    (pending / "parts" / "part-0.parquet").write_bytes(b"PAR1" + bytes(range(40)))
    return pending


def finalized(store: ArtifactStore, run_id: str, *, recall: float = 0.3, seed: int = 0):
    pending = fake_run(store, run_id, recall=recall, seed=seed)
    return store.finalize(pending, config={"train": {"epochs": 2}}, input_path=None)


def _mark_writer_dead(pending):
    """Make a pending run look like the debris of a crashed process (its pid no longer exists)."""
    child = subprocess.Popen(["true"])
    child.wait()
    note = json.loads((pending / registry.STARTED_FILE).read_text())
    note["pid"] = child.pid
    (pending / registry.STARTED_FILE).write_text(json.dumps(note))


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "artifacts")


def test_manifest_lists_every_file_with_its_sha256(store, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,2\n")
    pending = fake_run(store, "r1")
    manifest = store.finalize(pending, config={"train": {"epochs": 2}}, input_path=log, extra={"note": "x"})

    run_dir = store.runs_dir / "r1"
    assert not pending.exists() and run_dir.is_dir()
    on_disk = sorted(
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    )
    assert on_disk == ["items.ann", "metrics.json", "model.json", "model.pt", "parts/part-0.parquet"]
    written = json.loads((run_dir / "manifest.json").read_text())
    assert sorted(written["files"]) == on_disk
    for rel in on_disk:
        data = (run_dir / rel).read_bytes()
        assert written["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert stat.S_IMODE((run_dir / rel).stat().st_mode) == 0o444
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o555
    assert written["run_id"] == "r1" and written["extra"] == {"note": "x"}
    assert written["config"] == {"train": {"epochs": 2}}
    assert written["counts"] == {
        "n_input_rows": 1000,
        "n_rejected": 7,
        "n_duplicates": 3,
        "n_valid": 990,
        "n_interactions": 990,
        "n_users": 50,
        "n_items": 20,
    }
    assert written["metrics"]["holdout"]["models"]["model"]["recall@20"] == 0.3
    assert set(written["versions"]) == {"recsys_metric", "python", *registry.VERSIONED_PACKAGES}
    assert written["versions"]["torch"] and written["versions"]["polars"]
    assert written["input"]["method"] == "content-sha256" and written["input"]["n_files"] == 1
    assert manifest.created <= manifest.finished
    assert registry.Manifest.load(run_dir / "manifest.json") == manifest
    assert store.manifest("r1").recall(20) == 0.3
    store.verify("r1")


def test_input_fingerprint_content_stat_directory_and_glob(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "day=1").mkdir(parents=True)
        (d / "day=1" / "part-0.parquet").write_bytes(b"one")
        (d / "part-1.parquet").write_bytes(b"two")
        (d / ".hidden").write_bytes(b"ignored")
    (b / "_SUCCESS").write_bytes(b"")
    fa, fb = input_fingerprint(a), input_fingerprint(b)
    assert fa["method"] == "content-sha256" and fa["n_files"] == 2 and fa["bytes"] == 6
    assert fa["sha256"] == fb["sha256"], "same files by relative name and content, wherever they lie"
    (b / "part-1.parquet").write_bytes(b"TWO")
    assert input_fingerprint(b)["sha256"] != fa["sha256"]

    big = input_fingerprint(a, content_limit=0)
    assert big["method"] == "stat-sha256" and big["sha256"] != fa["sha256"]
    os.utime(a / "part-1.parquet", ns=(1, 1))
    assert input_fingerprint(a, content_limit=0)["sha256"] != big["sha256"], "stat method sees the mtime"

    globbed = input_fingerprint(str(a / "**" / "*.parquet"))
    assert globbed["n_files"] == 2
    with pytest.raises(RegistryError, match=r"input .*nothing-\*\.csv matches no file"):
        input_fingerprint(str(tmp_path / "nothing-*.csv"))


def test_verify_detects_a_modified_missing_or_added_file(store):
    finalized(store, "r1")
    run_dir = store.runs_dir / "r1"
    model = run_dir / "model.pt"
    os.chmod(model, 0o644)
    data = bytearray(model.read_bytes())
    data[10] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=r"run r1 .* was modified after finalize: model\.pt has sha256"
    ) as err:
        store.verify("r1")
    assert err.value.files == ["model.pt"]

    os.chmod(run_dir, 0o755)
    os.chmod(run_dir / "parts", 0o755)
    (run_dir / "parts" / "part-0.parquet").unlink()
    (run_dir / "stray.txt").write_text("x")
    with pytest.raises(IntegrityError) as err:
        store.verify("r1")
    assert err.value.files == ["model.pt", "parts/part-0.parquet", "stray.txt"]
    assert "parts/part-0.parquet is missing" in str(err.value)
    assert "stray.txt is not in the manifest" in str(err.value)


def test_crashed_run_is_incomplete_unpublishable_and_current_unchanged(store, monkeypatch):
    finalized(store, "good")
    store.publish("good")

    fake_run(store, "crashed")
    infos = {r.run_id: r for r in store.list_runs()}
    assert infos["good"].complete and infos["good"].is_current
    assert (
        not infos["crashed"].complete and not infos["crashed"].is_current and infos["crashed"].recall is None
    )
    with pytest.raises(
        RegistryError, match=r"run crashed .* is not complete: .*\.tmp-crashed was never finalized"
    ):
        store.publish("crashed")
    assert store.current() == "good"

    pending = fake_run(store, "died-in-finalize")

    def power_cut(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(registry.os, "rename", power_cut)
    with pytest.raises(OSError, match="simulated crash"):
        store.finalize(pending, config={}, input_path=None)
    monkeypatch.undo()
    assert (pending / "manifest.json").is_file(), "the manifest was written, the rename never happened"
    infos = {r.run_id: r for r in store.list_runs()}
    assert not infos["died-in-finalize"].complete
    with pytest.raises(RegistryError, match="not complete"):
        store.publish("died-in-finalize")
    with pytest.raises(RegistryError, match="no run nosuch"):
        store.publish("nosuch")
    assert store.current() == "good"
    assert resolve_run_dir(store.root) == store.runs_dir / "good"


def test_publish_refuses_a_tampered_run_and_keeps_current(store):
    finalized(store, "a")
    store.publish("a")
    finalized(store, "b", seed=1)
    (store.runs_dir / "b" / "items.ann").chmod(0o644)
    (store.runs_dir / "b" / "items.ann").write_bytes(b"garbage")
    with pytest.raises(IntegrityError, match="items.ann has sha256"):
        store.publish("b")
    assert store.current() == "a"


def test_publish_switches_atomically_and_old_readers_keep_reading(store):
    finalized(store, "a", seed=0)
    assert store.publish("a") is None
    old_dir = store.current_dir()
    assert old_dir == store.runs_dir / "a"
    mapped = np.memmap(old_dir / "items.ann", dtype=np.float32, mode="r")
    handle = open(old_dir / "model.pt", "rb")
    head = handle.read(10)

    finalized(store, "b", seed=1)
    assert store.publish("b") == "a"
    assert store.current() == "b"
    assert os.readlink(store.root / "current") == "runs/b"
    assert resolve_run_dir(store.root) == (store.runs_dir / "b").resolve()
    assert not list(store.root.glob(".current.tmp-*"))
    np.testing.assert_array_equal(mapped, ANN_VALUES)
    assert head + handle.read() == (store.runs_dir / "a" / "model.pt").read_bytes()

    # Replaced less than publish.replaced_grace_s ago: a reader may still be opening its files.
    assert store.prune(keep=1) == []
    store = ArtifactStore(store.root, PublishConfig(replaced_grace_s=0))
    assert store.prune(keep=1) == ["a"]
    assert not (store.runs_dir / "a").exists()
    # The pruned run's files are unlinked, not overwritten: the mapping keeps its data.
    np.testing.assert_array_equal(mapped, ANN_VALUES)
    handle.seek(0)
    assert handle.read(10) == head
    handle.close()
    del mapped


def test_readers_never_see_current_missing_during_switches(store):
    for name in ("a", "b"):
        finalized(store, name)
    store.publish("a")
    link = store.root / "current"
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.add(os.readlink(link))
            except OSError as err:
                seen.add(f"error: {err}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(30):
            store.publish("b" if i % 2 == 0 else "a")
    finally:
        stop.set()
        thread.join()
    assert seen <= {"runs/a", "runs/b"}
    assert store.current() == "a"


def test_prune_keeps_n_newest_and_always_the_current_one(store):
    for i in range(5):
        finalized(store, f"r{i}", seed=i)
    store.publish("r0")
    assert store.prune(keep=3) == ["r1", "r2"]
    assert [r.run_id for r in store.list_runs()] == ["r0", "r3", "r4"]
    assert store.prune(keep=3) == []
    assert store.prune(keep=1) == ["r3", "r4"]
    assert [(r.run_id, r.is_current) for r in store.list_runs()] == [("r0", True)]
    store.verify("r0")
    with pytest.raises(ValueError, match="keep must be >= 1"):
        store.prune(keep=0)


def test_prune_removes_crash_debris_but_not_runs_in_progress(store):
    finalized(store, "r0")
    dead = fake_run(store, "dead")
    _mark_writer_dead(dead)
    live = fake_run(store, "live")
    finalized(store, "r1", seed=1)
    store.publish("r1")
    newer = fake_run(store, "newer")
    _mark_writer_dead(newer)
    leftover = store.runs_dir / ".deleting-old-0000"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "f").write_text("x")
    os.chmod(leftover / "sub", 0o555)
    os.symlink("runs/r0", store.root / ".current.tmp-1-dead")

    assert store.prune(keep=5) == [".tmp-dead"]
    assert not dead.exists() and live.is_dir() and newer.is_dir()
    assert not leftover.exists()
    assert not list(store.root.glob(".current.tmp-*"))
    assert [(r.run_id, r.complete) for r in store.list_runs()] == [
        ("r0", True),
        ("live", False),
        ("r1", True),
        ("newer", False),
    ]
    assert store.current() == "r1"


def test_new_run_and_finalize_refuse_misuse(store, tmp_path):
    store.new_run("x")
    with pytest.raises(RegistryError, match="run id x is already used"):
        store.new_run("x")
    with pytest.raises(RegistryError, match="invalid run id '../escape'"):
        store.new_run("../escape")
    generated = store.new_run()
    assert generated.name.startswith(".tmp-") and store.run_id_of(generated)[:8].isdigit()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(RegistryError, match="is not a pending run of"):
        store.finalize(elsewhere, config={}, input_path=None)
    with pytest.raises(RegistryError, match="has no metrics.json; write the run with train_run"):
        store.finalize(store.pending_dir("x"), config={}, input_path=None)
    pending = fake_run(store, "y")
    (pending / "model.json").write_text(json.dumps({"run_id": "other"}))
    with pytest.raises(RegistryError, match="records run id 'other' but the run is 'y'; pass run_id='y'"):
        store.finalize(pending, config={}, input_path=None)


def test_resolve_run_dir(store, tmp_path):
    with pytest.raises(RegistryError, match="is neither an artifacts directory"):
        resolve_run_dir(tmp_path)
    finalized(store, "a")
    with pytest.raises(RegistryError, match="has no published run"):
        resolve_run_dir(store.root)
    store.publish("a")
    run = (store.runs_dir / "a").resolve()
    assert resolve_run_dir(store.root) == run
    assert resolve_run_dir(store.root / "current") == run
    assert resolve_run_dir(store.runs_dir / "a") == run
    assert store.current_dir() == store.runs_dir / "a"


PUBLISH = PublishConfig(gate_k=20, gate_tolerance=0.02, require_beat_popularity=True)


@pytest.mark.parametrize(
    ("candidate", "popularity", "current", "config", "publish", "reason"),
    [
        (
            0.3,
            0.1,
            None,
            PUBLISH,
            True,
            "publish: no current model; candidate recall@20 0.3000, above the popularity baseline's 0.1000",
        ),
        (
            0.05,
            0.1,
            None,
            PUBLISH,
            False,
            "refuse: candidate recall@20 0.0500 is not above the popularity baseline's 0.1000",
        ),
        (
            0.1,
            0.1,
            None,
            PUBLISH,
            False,
            "refuse: candidate recall@20 0.1000 is not above the popularity baseline's 0.1000",
        ),
        (
            0.295,
            0.1,
            0.3,
            PUBLISH,
            True,
            "publish: candidate recall@20 0.2950 >= 0.2940 = (1 - 0.02) x the current model's 0.3000 on the "
            "same holdout, above the popularity baseline's 0.1000",
        ),
        (
            0.25,
            0.1,
            0.3,
            PUBLISH,
            False,
            "refuse: candidate recall@20 0.2500 is below 0.2940 = (1 - 0.02) x the current model's 0.3000 on "
            "the same holdout",
        ),
        (
            0.08,
            0.1,
            0.3,
            PUBLISH,
            False,
            "refuse: candidate recall@20 0.0800 is below 0.2940 = (1 - 0.02) x the current model's 0.3000 on "
            "the same holdout; candidate recall@20 0.0800 is not above the popularity baseline's 0.1000",
        ),
        (
            0.3,
            0.1,
            0.3,
            PublishConfig(gate_tolerance=0.0),
            True,
            "publish: candidate recall@20 0.3000 >= 0.3000 = (1 - 0) x the current model's 0.3000 on the same "
            "holdout, above the popularity baseline's 0.1000",
        ),
        (
            0.05,
            0.1,
            None,
            PublishConfig(require_beat_popularity=False),
            True,
            "publish: no current model; candidate recall@20 0.0500, popularity not required "
            "(publish.require_beat_popularity is off)",
        ),
    ],
)
def test_gate_decisions(candidate, popularity, current, config, publish, reason):
    metrics = {"run_id": "c", "holdout": _holdout(candidate, popularity)}
    current_metrics = None if current is None else {"metrics": {"recall@20": current}}
    decision = gate(metrics, current_metrics, config)
    assert decision.publish is publish
    assert decision.reason == reason
    assert decision.candidate_recall == candidate and decision.popularity_recall == popularity
    assert decision.current_recall == current
    assert decision.threshold == (
        None if current is None else pytest.approx((1 - config.gate_tolerance) * current)
    )
    assert not decision.forced
    assert json.loads(json.dumps(decision.to_dict()))["publish"] is publish


def test_gate_force_and_missing_k():
    metrics = {"holdout": _holdout(0.25, 0.1)}
    forced = gate(metrics, {"recall@20": 0.3}, PUBLISH, force=True)
    assert forced.publish and forced.forced
    assert forced.reason == (
        "forced publish (force=True); the gate would have refused: candidate recall@20 0.2500 is below "
        "0.2940 = (1 - 0.02) x the current model's 0.3000 on the same holdout"
    )
    assert gate(metrics, None, PUBLISH, force=True).reason.startswith(
        "forced publish (force=True); the gate would have passed anyway: no current model"
    )
    with pytest.raises(
        RegistryError, match=r"candidate metrics have no recall@50 \(they have \['recall@10', "
    ):
        gate(metrics, None, PublishConfig(gate_k=50))
    with pytest.raises(RegistryError, match="current model metrics have no recall@20"):
        gate(metrics, {"metrics": {"recall@10": 0.1}}, PUBLISH)


def _hand_made_runs(tmp_path, popularity_recall: float):
    """Candidate: users 10, 11, 12, items 100..103. Current: knows users 11, 10 and items 102, 101, 100
    (written in another order than the candidate's numbers), dot product.

    Train rows (10,100) (11,101) (12,102) (12,103); liked test rows (10,101) (11,103) (12,100).
    Current model top-1: user 10 -> 101 (hit); user 11 -> 102 (its relevant 103 is unknown to the
    current model: miss); user 12 is unknown to it: miss. Recall@1 = 1/3. Popularity (all counts 1,
    ties by item number) top-1: 10 -> 101 hit, 11 -> 100 miss, 12 -> 100 hit: 2/3.
    """
    cand, cur = tmp_path / "candidate", tmp_path / "current"
    cand.mkdir()
    cur.mkdir()
    Vocabulary([10, 11, 12], name="user").save(cand / "users.parquet")
    Vocabulary([100, 101, 102, 103], name="item").save(cand / "items.parquet")
    rows = [(0, 0, 1, "train"), (1, 1, 1, "train"), (2, 2, 1, "train"), (2, 3, -1, "train")]
    rows += [(0, 1, 1, "test"), (1, 3, 1, "test"), (2, 0, 1, "test"), (0, 2, -1, "test")]
    pl.DataFrame(
        {
            "user_num": pl.Series([r[0] for r in rows], dtype=pl.Int32),
            "item_num": pl.Series([r[1] for r in rows], dtype=pl.Int32),
            "label": pl.Series([r[2] for r in rows], dtype=pl.Int8),
            "split": pl.Series([r[3] for r in rows], dtype=SPLIT_ENUM),
        }
    ).write_parquet(cand / "interactions.parquet")
    holdout = {"ks": [1], "n_users": 3, "models": {"popularity": {"recall@1": popularity_recall}}}
    (cand / "metrics.json").write_text(json.dumps({"run_id": "cand", "holdout": holdout}))
    users = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    items = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    write_embeddings(
        cur / "user_embeddings.parquet", [11, 10], users, kind="user", distance="dot", run_id="cur"
    )
    write_embeddings(
        cur / "item_embeddings.parquet", [102, 101, 100], items, kind="item", distance="dot", run_id="cur"
    )
    return cur, cand


def test_score_current_on_holdout_known_answer(tmp_path):
    cur, cand = _hand_made_runs(tmp_path, popularity_recall=2 / 3)
    config = config_from_dict({"eval": {"ks": [1]}, "publish": {"gate_k": 1}})
    scored = score_current_on_holdout(cur, cand, config)
    assert scored["run_id"] == "cur" and scored["candidate_run_id"] == "cand"
    assert scored["n_users"] == 3
    assert scored["metrics"]["recall@1"] == pytest.approx(1 / 3)
    assert scored["popularity"]["recall@1"] == pytest.approx(2 / 3)
    assert scored["unknown"] == {
        "users": 1,
        "items": 1,
        "evaluated_users": 1,
        "relevant_pairs": 3,
        "relevant_pairs_unknown_item": 1,
    }
    decision = gate(
        {"holdout": {"models": {"model": {"recall@1": 0.5}, "popularity": scored["popularity"]}}},
        scored,
        PublishConfig(gate_k=1, require_beat_popularity=False),
    )
    assert decision.publish and decision.current_recall == pytest.approx(1 / 3)


def test_score_current_on_holdout_refuses_a_different_holdout(tmp_path):
    cur, cand = _hand_made_runs(tmp_path, popularity_recall=0.5)
    config = config_from_dict({"eval": {"ks": [1]}, "publish": {"gate_k": 1}})
    with pytest.raises(RegistryError, match=r"rebuilt holdout differs .*recall@1 0\.666667 vs 0\.500000"):
        score_current_on_holdout(cur, cand, config)


@pytest.fixture(scope="module")
def two_real_runs(tmp_path_factory):
    """Run A on the older 70% of a log, run B on all of it; both through the store, as the flow does."""
    tmp = tmp_path_factory.mktemp("real")
    log = generate_log(200, 100, 4000, seed=1).interactions.sort("timestamp")
    early = tmp / "early.parquet"
    full = tmp / "full.parquet"
    log.head(2800).write_parquet(early)
    log.write_parquet(full)
    config = config_from_dict({"train": {"epochs": 2}})
    store = ArtifactStore(tmp / "artifacts", PublishConfig(gate_tolerance=1.0, require_beat_popularity=False))

    steps = {}
    for run_id, path in (("run-a", early), ("run-b", full)):
        pending = store.new_run(run_id)
        result = train_run(path, pending, config, run_id=run_id, progress=False)
        current = store.current_dir()
        scored = score_current_on_holdout(current, pending, config) if current is not None else None
        decision = gate(result.metrics, scored, store.config)
        store.finalize(pending, config=config, input_path=path, extra={"gate": decision.to_dict()})
        if decision.publish:
            store.publish(run_id)
        steps[run_id] = (result.metrics, scored, decision)
    return store, config, steps


def test_two_runs_in_a_row_leave_two_run_dirs_and_current_on_the_second(two_real_runs):
    store, _, steps = two_real_runs
    infos = store.list_runs()
    assert [(r.run_id, r.complete, r.is_current) for r in infos] == [
        ("run-a", True, False),
        ("run-b", True, True),
    ]
    assert sorted(p.name for p in store.runs_dir.iterdir()) == ["run-a", "run-b"]
    assert store.current() == "run-b"
    for info in infos:
        store.verify(info.run_id)
        assert info.recall == steps[info.run_id][0]["holdout"]["models"]["model"]["recall@20"]
    manifest = store.manifest("run-b")
    expected = {
        "users.parquet",
        "items.parquet",
        "rejects.parquet",
        "interactions.parquet",
        "triplets.parquet",
        "model.pt",
        "model.json",
        "user_embeddings.parquet",
        "item_embeddings.parquet",
        "metrics.json",
    }
    assert expected <= set(manifest.files)
    assert manifest.counts["n_input_rows"] == 4000 and manifest.counts["n_rejected"] == 0
    assert store.manifest("run-a").counts["n_input_rows"] == 2800
    assert manifest.extra["gate"]["publish"] is True
    assert manifest.extra["gate"]["current_recall"] == steps["run-b"][1]["metrics"]["recall@20"]


def test_score_current_on_a_real_candidate_holdout(two_real_runs):
    store, config, steps = two_real_runs
    metrics_b, scored, _ = steps["run-b"]
    a_dir, b_dir = store.runs_dir / "run-a", store.runs_dir / "run-b"
    assert scored["run_id"] == "run-a" and scored["candidate_run_id"] == "run-b"
    assert scored["n_users"] == metrics_b["holdout"]["n_users"]
    assert scored["popularity"]["recall@20"] == pytest.approx(
        metrics_b["holdout"]["models"]["popularity"]["recall@20"]
    )

    a_users = set(pl.read_parquet(a_dir / "users.parquet")["user_id"].to_list())
    b_users = set(pl.read_parquet(b_dir / "users.parquet")["user_id"].to_list())
    a_items = set(pl.read_parquet(a_dir / "items.parquet")["item_id"].to_list())
    b_items = set(pl.read_parquet(b_dir / "items.parquet")["item_id"].to_list())
    assert scored["unknown"]["users"] == len(b_users - a_users)
    assert scored["unknown"]["items"] == len(b_items - a_items)
    assert 0 < scored["metrics"]["recall@20"] <= 1

    # Scoring B against its own holdout uses B's holdout model (holdout/ embeddings), so it must
    # reproduce exactly the holdout figures B recorded in metrics.json.
    self_scored = score_current_on_holdout(b_dir, b_dir, config)
    assert self_scored["unknown"]["users"] == self_scored["unknown"]["items"] == 0
    for key in ("recall@10", "recall@20", "ndcg@20"):
        assert self_scored["metrics"][key] == pytest.approx(
            metrics_b["holdout"]["models"]["model"][key], abs=1e-6
        )
