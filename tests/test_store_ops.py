"""The store's operational guarantees, in process and fast: the one-writer lock, the fault hook,
the free-space check, read-only before the finalize rename, the publish history with its
retention grace period, rollback, debris cleanup, and the gate re-checked at publish.

The subprocess fault-injection suite (kill -9 at every stage boundary) is tests/test_faults.py.
"""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys_metric import nightly, registry
from recsys_metric.config import Config, PublishConfig, config_from_dict
from recsys_metric.errors import DataError
from recsys_metric.registry import ArtifactStore, GateDecision, RegistryError
from recsys_metric.store import faults
from recsys_metric.store.lock import StoreLockedError, held_by_this_process, read_holder, store_lock
from recsys_metric.store.space import DiskSpaceError, check_free_space, is_disk_full

REPO = Path(__file__).resolve().parent.parent
HOLDER = (
    "import sys, time\n"
    "from recsys_metric.store.lock import store_lock\n"
    "with store_lock(sys.argv[1], purpose='test holder'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def hold_lock(root) -> subprocess.Popen:
    """Another process holding the store's writer lock (kill it to release)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def fake_run(store: ArtifactStore, run_id: str, seed: int = 0) -> Path:
    pending = store.new_run(run_id)
    (pending / "metrics.json").write_text(json.dumps({"run_id": run_id, "holdout": {}}))
    (pending / "model.json").write_text(json.dumps({"run_id": run_id}))
    (pending / "item_embeddings.parquet").write_bytes(bytes([seed]) * 100)
    (pending / "sub").mkdir()
    (pending / "sub" / "f.bin").write_bytes(b"x" * 10)
    return pending


def finalized(store: ArtifactStore, run_id: str) -> str:
    store.finalize(fake_run(store, run_id), config={}, input_path=None)
    return run_id


# --- the lock -------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid_and_start_time(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        note = read_holder(tmp_path)
        assert note["pid"] == holder.pid and note["purpose"] == "test holder"
        with pytest.raises(StoreLockedError) as err:
            with store_lock(tmp_path, wait=0):
                pass
        message = str(err.value)
        assert f"is being written by pid {holder.pid} on " in message
        assert f"since {note['started']}" in message and "--wait" in message
        assert "\n" not in message and err.value.holder["pid"] == holder.pid

        started = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"still being written by pid \d+ .* after waiting 0.5 s"):
            with ArtifactStore(tmp_path).writer(wait=0.5):
                pass
        assert time.monotonic() - started >= 0.5
    finally:
        # kill -9: the kernel releases the flock with the process, nothing stale is left behind.
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with store_lock(tmp_path, wait=0, purpose="after the crash"):
        assert read_holder(tmp_path)["purpose"] == "after the crash"
        assert held_by_this_process(tmp_path)
    assert not held_by_this_process(tmp_path)
    assert read_holder(tmp_path) == {}, "the note is cleared on release"


def test_a_waiting_writer_runs_when_the_holder_exits(tmp_path):
    holder = hold_lock(tmp_path)
    killer = subprocess.Popen(["sh", "-c", f"sleep 0.7; kill {holder.pid}"])
    started = time.monotonic()
    try:
        with store_lock(tmp_path, wait=None):
            waited = time.monotonic() - started
    finally:
        killer.wait()
        holder.wait()
    assert waited >= 0.5


def test_the_lock_is_reentrant_in_one_process_and_store_methods_nest_in_writer(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.writer() as cleaned:
        assert cleaned == []
        with store_lock(tmp_path, wait=0):
            assert held_by_this_process(tmp_path)
        finalized(store, "a")  # new_run + finalize take the lock again inside
        store.publish("a")
        assert store.prune() == []
        assert held_by_this_process(tmp_path)
    assert not held_by_this_process(tmp_path)


def test_store_writes_wait_for_another_process_and_writer_refuses(tmp_path):
    store = ArtifactStore(tmp_path)
    finalized(store, "a")
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(StoreLockedError):
            with store.writer(wait=0):
                pass
    finally:
        holder.kill()
        holder.wait()


# --- the fault hook and the space check -----------------------------------------------------


def test_fault_point_actions(monkeypatch):
    faults.fault_point("prepare:after")  # unset: nothing
    monkeypatch.setenv(faults.ENV_VAR, "train:after@enospc")
    faults.fault_point("prepare:after")  # another point: nothing
    with pytest.raises(OSError) as err:
        faults.fault_point("train:after")
    assert err.value.errno == errno.ENOSPC and is_disk_full(err.value)
    monkeypatch.setenv(faults.ENV_VAR, "train:after@sleep=0.01")
    faults.fault_point("train:after")
    monkeypatch.setenv(faults.ENV_VAR, "train:after@explode")
    with pytest.raises(ValueError, match="unknown action 'explode'"):
        faults.fault_point("train:after")
    with pytest.raises(ValueError, match="unknown fault point 'nope'"):
        faults.fault_point("nope")


def test_fault_point_kill_is_a_real_sigkill():
    code = "from recsys_metric.store.faults import fault_point; fault_point('index:after'); print('survived')"
    env = {**os.environ, faults.ENV_VAR: "index:after", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL and "survived" not in proc.stdout


def test_free_space_check_and_disk_full_detection(tmp_path):
    check_free_space(tmp_path, 1, "a test")
    with pytest.raises(DiskSpaceError) as err:
        check_free_space(tmp_path / "not" / "yet", 1 << 62, "a new run")
    message = str(err.value)
    assert message.startswith(f"not enough free space in {tmp_path / 'not' / 'yet'}: a new run needs about ")
    assert f"{1 << 62:,} bytes" in message and "\n" not in message
    assert err.value.needed == 1 << 62 and err.value.free < err.value.needed

    wrapped = RuntimeError("parquet write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped)
    assert is_disk_full(RuntimeError("IO error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_estimate_uses_the_newest_run_or_the_input(tmp_path):
    store = ArtifactStore(tmp_path / "a")
    log = tmp_path / "log.bin"
    log.write_bytes(b"x" * (3 << 20))
    assert store.estimate_run_bytes(log) == registry.FIRST_RUN_INPUT_FACTOR * (3 << 20)
    assert store.estimate_run_bytes(None) == registry.MIN_RUN_BYTES
    finalized(store, "r")
    assert store.estimate_run_bytes(log) == registry.MIN_RUN_BYTES  # a 1 KB run
    size = store.run_bytes("r")
    assert size == sum(p.stat().st_size for p in (store.runs_dir / "r").rglob("*") if p.is_file())


# --- finalize, history, retention, rollback, debris -----------------------------------------


def test_a_run_is_read_only_before_the_finalize_rename(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    pending = fake_run(store, "r")

    def crash(src, dst):
        raise OSError("killed just before the rename")

    monkeypatch.setattr(registry.os, "rename", crash)
    with pytest.raises(OSError, match="killed just before"):
        store.finalize(pending, config={}, input_path=None)
    monkeypatch.undo()
    for path in [pending, *pending.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o555 if path.is_dir() else 0o444), path
    # Its finalize failed: debris, which the next writer removes, read-only as it is.
    with store.writer() as cleaned:
        assert cleaned == [".tmp-r"]
    assert not pending.exists()


def test_clean_debris_removes_dead_writers_leftovers_only(tmp_path):
    store = ArtifactStore(tmp_path)
    finalized(store, "a")
    store.publish("a")
    dead = fake_run(store, "dead")
    child = subprocess.Popen(["true"])
    child.wait()
    note = json.loads((dead / registry.STARTED_FILE).read_text())
    (dead / registry.STARTED_FILE).write_text(json.dumps({**note, "pid": child.pid}))
    os.chmod(dead / "sub", 0o555)
    live = fake_run(store, "live")
    (store.runs_dir / ".deleting-old-1234" / "x").mkdir(parents=True)
    os.symlink("runs/a", tmp_path / ".current.tmp-1-ab")
    with store.writer() as cleaned:
        assert sorted(cleaned) == [".current.tmp-1-ab", ".deleting-old-1234", ".tmp-dead"]
    assert not dead.exists() and live.is_dir() and store.current() == "a"


def test_history_rollback_and_the_retention_grace_period(tmp_path):
    store = ArtifactStore(tmp_path, PublishConfig(keep_runs=1, replaced_grace_s=3600))
    for name in ("a", "b", "c"):
        finalized(store, name)
        store.publish(name)
    assert [(e["run_id"], e["previous"], e["action"]) for e in store.history()] == [
        ("a", None, "publish"),
        ("b", "a", "publish"),
        ("c", "b", "publish"),
    ]
    # keep_runs 1, but a and b were switched away from less than an hour ago: a reader may hold them.
    assert store.prune() == []
    assert store.previous_published() == "b"

    result = nightly.rollback_run(tmp_path)
    assert (result.run_id, result.previous_run_id, store.current()) == ("b", "c", "b")
    # Twice goes two back, not back and forth.
    assert nightly.rollback_run(tmp_path).run_id == "a" and store.current() == "a"
    assert nightly.rollback_run(tmp_path, "c").published and store.current() == "c"
    finalized(store, "never")
    with pytest.raises(RegistryError, match="run never was never published"):
        nightly.rollback_run(tmp_path, "never")

    # Past the grace period only keep_runs counts (the current run always stays).
    expired = ArtifactStore(tmp_path, PublishConfig(keep_runs=1, replaced_grace_s=0))
    assert expired.prune() == ["a", "b", "never"]
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        nightly.rollback_run(tmp_path)

    # A line cut by a crash is skipped, not fatal.
    with open(tmp_path / registry.HISTORY_FILE, "a") as f:
        f.write('{"time": "2026-')
    assert store.history()[-1]["run_id"] == "c"


# --- the nightly run: nothing written for a missing input, the gate re-checked at publish ----


def test_a_missing_input_writes_nothing(tmp_path):
    with pytest.raises(
        DataError, match=r"interaction log .*nope.parquet does not exist .*nothing was written"
    ):
        nightly.run_nightly(tmp_path / "nope.parquet", tmp_path / "artifacts")
    assert not (tmp_path / "artifacts").exists()


def test_the_gate_is_checked_again_when_current_moved_during_the_run(tmp_path, monkeypatch):
    """A writer that bypassed the lock published a better run G while this run trained: the
    decision made against the weak run W is not used; the gate runs again against G."""
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id\n1,2\n")
    store = ArtifactStore(tmp_path / "a")
    for name in ("W", "G"):
        finalized(store, name)
    store.publish("W")

    def fake_train_run(interactions, run_dir, config, *, run_id, **kwargs):
        run_dir = Path(run_dir)
        (run_dir / "metrics.json").write_text(json.dumps({"run_id": run_id, "holdout": {}}))
        store.publish("G")  # the rogue writer
        return nightly.RunResult(
            run_id=run_id,
            run_dir=run_dir,
            metrics={"holdout": {}},
            evaluation=None,
            prepared=None,
            model=None,
            holdout_training=None,
            refit_training=None,
            seconds={},
        )

    gated = []

    def fake_gate(store_, current_id, candidate_dir, metrics, config, *, force):
        gated.append(current_id)
        ok = current_id == "W"
        decision = GateDecision(
            ok, f"{'publish' if ok else 'refuse'} against {current_id}", 20, 0.3, 0.3, 0.1, 0.3
        )
        return {"run_id": current_id}, decision

    monkeypatch.setattr(nightly, "train_run", fake_train_run)
    monkeypatch.setattr(nightly, "gate_against_current", fake_gate)
    result = nightly.run_nightly(log, store.root, Config())
    assert gated == ["W", "G"]
    assert not result.published and result.decision.reason == "refuse against G"
    assert store.current() == "G" and result.previous_run_id == "G"
    assert store.run_dir(result.run_id).is_dir(), "the refused run is kept, complete"


def test_publish_run_refuses_without_force_and_records_forced(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path)
    for name in ("cur", "cand"):
        finalized(store, name)
    store.publish("cur")
    cfg = config_from_dict({})
    monkeypatch.setattr(nightly, "_run_config", lambda s, r: cfg)

    def fake_gate(store_, current_id, candidate_dir, metrics, config, *, force):
        return None, GateDecision(
            force, "forced" if force else "refuse: worse", 20, 0.2, 0.3, 0.1, 0.29, force
        )

    monkeypatch.setattr(nightly, "gate_against_current", fake_gate)
    refused = nightly.publish_run(tmp_path, "cand")
    assert not refused.published and store.current() == "cur"
    forced = nightly.publish_run(tmp_path, "cand", force=True)
    assert forced.published and store.current() == "cand" and forced.previous_run_id == "cur"
    assert store.history()[-1] | {"time": None, "pid": None} == {
        "time": None,
        "pid": None,
        "run_id": "cand",
        "previous": "cur",
        "action": "publish",
        "forced": True,
    }
    assert nightly.publish_run(tmp_path, "cand").decision is None  # already current


# --- the commands: train (finalized, unpublished), publish, rollback, runs -------------------


def test_train_publish_rollback_and_runs_commands(tmp_path, monkeypatch, capsys):
    from recsys_metric.cli import EXIT_GATE_REFUSED, main
    from recsys_metric.data.synthetic import generate_log

    log = tmp_path / "log.parquet"
    generate_log(150, 80, 3000, n_clusters=4, seed=3).interactions.write_parquet(log)
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("train: {epochs: 2, patience: 1, batch_size: 512, refit: false}\neval: {ks: [10, 20]}\n")
    root = tmp_path / "artifacts"
    args = ["--interactions", str(log), "--config", str(cfg), "--artifacts", str(root), "--no-progress"]

    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    store = ArtifactStore(root)
    (first,) = [r.run_id for r in store.list_runs()]
    assert store.current() is None and store.run_dir(first).is_dir(), "complete, not published"
    assert f"recsys-metric publish {first} --artifacts {root}" in out
    assert store.manifest(first).extra == {"written_by": "recsys-metric train"}

    assert main(["publish", first, "--artifacts", str(root)]) == 0
    assert "quality gate: publish: no current model" in capsys.readouterr().out
    assert store.current() == first

    assert main(["train", *args]) == 0
    second = store.list_runs()[-1].run_id
    real_gate = nightly.gate_against_current

    def refusing(*a, force, **kw):
        current_on_holdout, decision = real_gate(*a, force=force, **kw)
        return current_on_holdout, GateDecision(
            **{**decision.to_dict(), "publish": force, "reason": "refuse: test"}
        )

    monkeypatch.setattr(nightly, "gate_against_current", refusing)
    capsys.readouterr()
    assert main(["publish", second, "--artifacts", str(root)]) == EXIT_GATE_REFUSED
    assert f"NOT published: current stays on {first} (--force overrides)" in capsys.readouterr().out
    assert main(["publish", second, "--artifacts", str(root), "--force"]) == 0
    assert store.current() == second and store.history()[-1]["forced"] is True

    assert main(["rollback", "--artifacts", str(root)]) == 0
    assert f"rolled back: {root / 'current'} -> runs/{first} (was {second})" in capsys.readouterr().out

    fake_run(store, "being-written")  # pending, its writer (this process) alive
    assert main(["runs", "--artifacts", str(root)]) == 0
    out = capsys.readouterr().out
    assert first in out and second in out and "being-written" not in out
    assert "(1 unfinished run directory(ies) not listed" in out

    assert main(["publish", "nosuch", "--artifacts", str(root)]) == 2
    assert capsys.readouterr().err.strip() == f"recsys-metric publish: error: no run nosuch in {root}"


def test_a_damaged_current_model_makes_warm_start_fall_back_with_a_warning(tmp_path, caplog):
    from recsys_metric.data.synthetic import generate_log

    log = tmp_path / "log.parquet"
    generate_log(150, 80, 3000, n_clusters=4, seed=3).interactions.write_parquet(log)
    fast = {
        "train": {"epochs": 2, "patience": 1, "batch_size": 512, "refit": False},
        "eval": {"ks": [10, 20]},
    }
    first = nightly.run_nightly(log, tmp_path / "a", config_from_dict(fast), progress=False)
    model = first.run_dir / "model.pt"
    model.chmod(0o644)
    model.write_bytes(os.urandom(model.stat().st_size))
    warm = config_from_dict({**fast, "train": {**fast["train"], "warm_start": True}})
    with caplog.at_level("WARNING", logger="recsys_metric"):
        second = nightly.run_nightly(log, tmp_path / "a", warm, progress=False)
    reason = second.run.metrics["warm_start"]["reason"]
    assert reason.startswith(f"cold start: cannot load run {first.run_id}'s model or vocabularies")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"train.warm_start is on, but this run trains from scratch: {reason}" in warnings
