"""Fault injection on the artifact store, with real ``recsys-metric`` processes.

- ``kill -9`` of a real ``recsys-metric run`` at every stage boundary (the test hook
  ``RECSYS_METRIC_FAULT``, recsys_metric/store/faults.py, makes each kill land exactly there):
  ``current`` still loads and answers, it is the old run or a complete new one, and the next run
  removes the debris;
- two writers on one store: the second is refused with exit 2 naming the holder, or waits and
  is then gated against what the first published (the gate is never bypassed);
- a full filesystem (a 16 MiB tmpfs when this process may mount one, else a simulated ENOSPC):
  exit 2 with one line, no debris, and the next run recovers;
- readers looping on ``Recommender.load`` + a query while runs are published and pruned with
  ``keep_runs: 1``: zero failures over 1,000 iterations.

About 1-2 minutes on two cores: most of it is starting Python + torch in each subprocess.
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recsys_metric.config import config_from_dict
from recsys_metric.data.synthetic import generate_log
from recsys_metric.export import read_embeddings, write_embeddings
from recsys_metric.nightly import run_nightly
from recsys_metric.recommend import Recommender
from recsys_metric.registry import PENDING_PREFIX, ArtifactStore
from recsys_metric.store.faults import ENV_VAR, POINTS
from recsys_metric.store.lock import read_holder

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
FAST = {"train": {"epochs": 2, "patience": 1, "batch_size": 512, "refit": False}, "eval": {"ks": [10, 20]}}
PRE_RENAME = ("prepare:after", "train:after", "export:after", "index:after", "finalize:before-rename")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fault-data")
    generate_log(150, 80, 3000, n_clusters=4, seed=3).interactions.write_parquet(d / "log.parquet")
    (d / "fast.yaml").write_text(json.dumps(FAST))
    (d / "one-epoch.yaml").write_text(json.dumps({"train": {"epochs": 1, "batch_size": 1024}}))
    return d


def cli(data, root, *args, fault=None, **popen):
    """``recsys-metric run`` (or another command given in ``args``) in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    if fault:
        env[ENV_VAR] = fault
    argv = list(args) or ["run", "--force"]
    if argv[0] in ("run", "train") and "--interactions" not in argv:
        argv += ["--interactions", str(data / "log.parquet"), "--config", str(data / "fast.yaml")]
    command = [sys.executable, "-m", "recsys_metric.cli", *argv, "--artifacts", str(root)]
    if popen:
        return subprocess.Popen(command, env=env, cwd=REPO, text=True, **popen)
    return subprocess.run(command, env=env, cwd=REPO, text=True, capture_output=True, timeout=300)


def serves(root) -> str:
    """Load ``current`` and answer a query; returns the run id. Verifies the run's hashes."""
    rec = Recommender.load(root)
    assert len(rec.recommend(rec.user_ids[0], k=5)) == 5
    ArtifactStore(root).verify(rec.run_id)
    return rec.run_id


def debris(root: Path) -> list[str]:
    runs = [p.name for p in (root / "runs").iterdir() if p.name.startswith((PENDING_PREFIX, ".deleting-"))]
    return sorted(runs + [p.name for p in root.glob(".current.tmp-*")])


def test_kill_9_at_every_stage_boundary(data, tmp_path):
    root = tmp_path / "artifacts"
    config = config_from_dict(FAST)
    first = run_nightly(data / "log.parquet", root, config, progress=False)
    store = ArtifactStore(root, config.publish)
    current = first.run_id
    left_behind: list[str] = []
    for point in POINTS[1:]:
        complete_before = {r.run_id for r in store.list_runs() if r.complete}
        proc = cli(data, root, fault=point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        for name in left_behind:
            assert not (root / "runs" / name).exists() and not (root / name).exists(), (
                f"{name}, left by the kill before {point}, survived the next run"
            )
        new = {r.run_id for r in store.list_runs() if r.complete} - complete_before
        if point == "publish:after-swap":
            assert store.current() in new, "killed after the swap: current is the complete new run"
        else:
            assert store.current() == current, point
        current = store.current()
        assert serves(root) == current, point
        left_behind = debris(root)
        if point in PRE_RENAME:
            assert not new and len(left_behind) == 1 and left_behind[0].startswith(PENDING_PREFIX), point
        else:
            (run_id,) = new
            run_dir = root / "runs" / run_id
            assert stat.S_IMODE(run_dir.stat().st_mode) == 0o555, f"{point}: a complete run is read-only"
            assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in run_dir.rglob("*") if p.is_file())
            store.verify(run_id)
            expected = [".current.tmp-"] if point == "publish:before-swap" else []
            assert [name[: len(".current.tmp-")] for name in left_behind] == expected, (point, left_behind)
        if point == "finalize:before-rename":
            (pending,) = (root / "runs").glob(f"{PENDING_PREFIX}*")
            assert stat.S_IMODE(pending.stat().st_mode) == 0o555, "read-only before the rename"

    proc = cli(data, root, "run")
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert debris(root) == []
    serves(root)
    listing = cli(data, root, "runs")
    assert listing.returncode == 0 and PENDING_PREFIX not in listing.stdout


def test_two_writers_one_refused_one_waits_and_is_gated_against_the_first(data, tmp_path):
    root = tmp_path / "artifacts"
    release = tmp_path / "release"
    first = cli(
        data, root, fault=f"lock:acquired@pause={release}", stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while read_holder(root).get("pid") != first.pid:
            assert time.monotonic() < deadline and first.poll() is None, (
                "the first writer never took the lock"
            )
            time.sleep(0.1)
        started = read_holder(root)["started"]

        refused = cli(data, root, "run")
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("recsys-metric run: error: artifact store ")
        assert f"is being written by pid {first.pid} on " in line and f"since {started}" in line
        assert not list((root / "runs").glob(f"{PENDING_PREFIX}*")) if (root / "runs").exists() else True

        waiting = cli(data, root, "run", "--wait", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = ""
        while "waiting until it finishes" not in seen:
            line = waiting.stderr.readline()
            assert line, f"the waiting writer ended: {seen}"
            seen += line
        assert f"pid {first.pid}" in seen
    finally:
        release.touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode in (0, 3), err[-3000:]

    store = ArtifactStore(root)
    entries = store.history()
    first_run = entries[0]["run_id"]
    runs = [r for r in store.list_runs() if r.complete]
    assert [r.run_id for r in runs][0] == first_run and len(runs) == 2
    second = store.manifest(runs[1].run_id)
    # The second writer started while the first held the store, and was gated against the
    # run the first one published: nothing slipped between a gate and its publish.
    assert second.extra["current_on_holdout"]["run_id"] == first_run
    assert second.created > store.manifest(first_run).finished
    assert ("published" in out) == (waiting.returncode == 0)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return proc.returncode == 0


def test_a_full_disk_fails_cleanly_in_one_line_and_the_next_run_recovers(data, tmp_path):
    fs = tmp_path / "fs"
    mounted = _mount_tmpfs(fs, "16m")
    try:
        root = fs / "artifacts"
        first = run_nightly(data / "log.parquet", root, config_from_dict(FAST), progress=False)
        if mounted:
            # Leave less free space than a run needs: refused before anything heavy is written.
            free = shutil.disk_usage(fs).free
            (fs / "ballast").write_bytes(b"\0" * (free - 2 * 2**20))
            proc = cli(data, root)
            assert proc.returncode == 2, proc.stderr[-3000:]
            (line,) = proc.stderr.strip().splitlines()
            assert f"not enough free space in {root / 'runs'}: a new run needs about " in line
            assert "bytes" in line and "are free" in line
            assert debris(root) == [] and serves(root) == first.run_id
            (fs / "ballast").unlink()
            # A real ENOSPC during the run: a first run of the bundled log (about 10 MB) on an
            # 8 MiB filesystem passes the first-run estimate, then torch.save hits the full disk
            # (its error does not say ENOSPC: the run reports a full disk from the free space).
            small = tmp_path / "small"
            assert _mount_tmpfs(small, "8m")
            try:
                proc = cli(
                    data,
                    small / "artifacts",
                    "run",
                    "--interactions",
                    str(REPO / "data" / "interactions.parquet"),
                    "--config",
                    str(data / "one-epoch.yaml"),
                )
                assert proc.returncode == 2, proc.stderr[-3000:]
                (line,) = proc.stderr.strip().splitlines()
                assert f"disk full in {small / 'artifacts' / 'runs'} while writing run " in line
                assert "its temporary directory was removed. The run needs more than " in line
                assert list((small / "artifacts" / "runs").iterdir()) == []
            finally:
                subprocess.run(["umount", str(small)], check=False)
        # The disk fills while the run writes (simulated at the export boundary).
        proc = cli(data, root, fault="export:after@enospc")
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = proc.stderr.strip().splitlines()
        assert f"disk full in {root / 'runs'} while writing run " in line
        assert "its temporary directory was removed" in line
        assert debris(root) == [] and serves(root) == first.run_id
        # Space is back: the next run works.
        proc = cli(data, root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert serves(root) != first.run_id and debris(root) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(fs)], check=False)


def _clone(store: ArtifactStore, source: str, run_id: str) -> str:
    """A new complete run with ``source``'s files and its own run id (no training: fast)."""
    src = store.run_dir(source)
    pending = store.new_run(run_id)
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if path.is_dir():
            (pending / rel).mkdir(exist_ok=True)
        elif path.name == "manifest.json":
            continue
        elif path.suffix == ".json" and "run_id" in (doc := json.loads(path.read_text())):
            (pending / rel).write_text(json.dumps({**doc, "run_id": run_id}))
        elif path.name.endswith("_embeddings.parquet"):
            table = read_embeddings(path)
            write_embeddings(
                pending / rel,
                table.ids,
                table.vectors,
                kind=table.kind,
                distance=table.distance,
                run_id=run_id,
            )
        else:
            shutil.copyfile(path, pending / rel)
    store.finalize(pending, config=store.manifest(source).config, input_path=None)
    return run_id


def test_readers_never_fail_while_runs_are_published_and_pruned_with_keep_runs_1(data, tmp_path):
    root = tmp_path / "artifacts"
    config = config_from_dict({**FAST, "publish": {"keep_runs": 1, "replaced_grace_s": 1.0}})
    run_nightly(data / "log.parquet", root, config, progress=False)
    store = ArtifactStore(root, config.publish)
    iterations, failures, pruned, published = 1000, [], [], [0]
    done = threading.Event()
    counter = iter(range(iterations))
    lock = threading.Lock()

    def reader():
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            try:
                rec = Recommender.load(root)
                frame = rec.recommend(rec.user_ids[0], k=5)
                assert len(frame) == 5
            except Exception as err:  # noqa: BLE001 - every failure is what this test counts
                failures.append(repr(err))

    def writer():
        i = 0
        while not done.is_set():
            i += 1
            run_id = _clone(store, store.current(), f"clone-{i:04d}")
            store.publish(run_id)
            pruned.extend(store.prune())
            published[0] += 1
            time.sleep(0.05)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    w = threading.Thread(target=writer)
    w.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join()
    done.set()
    w.join()
    assert failures == [], failures[:5]
    # The test exercised what it claims: many switches, and runs really deleted under the readers.
    assert published[0] >= 10 and len(pruned) >= 5, (published, pruned)
    assert len([r for r in store.list_runs() if r.complete]) <= 1 + published[0]
