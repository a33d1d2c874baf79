"""Damaged files never crash a querying process and never answer silently wrong (issue 19).

For every file of a real published run, and each way a file gets damaged (truncated, 4 KB of
random bytes in the middle, random bytes at the start, zeroed, deleted), a fresh process loads the
run and queries it. Each case runs in its own subprocess, so a crash (Annoy dies with SIGSEGV on
a damaged index it has not been kept from) fails the test instead of killing pytest.

Expected, with verification on (the default): either a clean error naming the damaged file
(``IntegrityError`` for a file the manifest records), or, for a file serving does not read
(``triplets.parquet``, ``metrics.json``...), exactly the answers of the undamaged run. With
``verify=False`` the process says first that it does not verify.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_runs import damage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DAMAGES = ["truncate", "middle", "start", "zero", "delete"]

QUERY = r"""
import json, sys
from recsys_metric import Recommender

verify = sys.argv[2] == "1"
try:
    rec = Recommender.load(sys.argv[1], verify=verify, output="polars")
    items, users = rec.item_ids.to_list(), rec.user_ids.to_list()
    out = {
        "similar": rec.similar_items(items[7], k=10).rows(),
        "recommend": rec.recommend(users[3], k=10).rows(),
        "exact": rec.recommend(users[5], k=10, exact=True).rows(),
        "history": rec.recommend_for_history(items[:3], k=10).rows(),
        "explain": rec.explain(users[3], items[7]).rows(),
    }
    print(json.dumps({"answers": out}))
except Exception as err:
    print(json.dumps({"error": type(err).__name__, "message": str(err)}))
"""


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A real run of the bundled data (2 epochs), published in a store."""
    root = tmp_path_factory.mktemp("damaged")
    config = root / "tiny.yaml"
    config.write_text("train:\n  epochs: 2\n")
    artifacts = root / "artifacts"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_metric.cli",
            "run",
            "--artifacts",
            str(artifacts),
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    run_dir = Path(os.path.realpath(artifacts / "current"))
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    reference = _query(artifacts, verify=True)
    assert "answers" in reference, reference
    return artifacts, run_dir.name, files, reference["answers"]


def _query(artifacts: Path, *, verify: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", QUERY, str(artifacts), "1" if verify else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if done.returncode != 0:
        # A negative code is a signal: the process died (SIGSEGV, SIGABRT, SIGBUS).
        return {"crash": done.returncode, "stderr": done.stderr[-2000:]}
    return {**json.loads(done.stdout.splitlines()[-1]), "stderr": done.stderr}


def _copy(artifacts: Path, dest: Path) -> Path:
    shutil.copytree(artifacts, dest, symlinks=True)
    return dest


@pytest.mark.parametrize("how", DAMAGES)
def test_every_file_damaged_is_refused_or_harmless(published, tmp_path, how):
    artifacts, run_id, files, reference = published
    assert len(files) >= 15  # every file of a real run, the holdout's included
    problems = []
    for n, name in enumerate(files):
        case = _copy(artifacts, tmp_path / f"case-{n}")
        damage(case / "runs" / run_id / name, how, seed=n)
        result = _query(case, verify=True)
        if "crash" in result:
            problems.append(f"{name} ({how}): the process died with code {result['crash']}")
        elif "error" in result:
            if name not in result["message"]:
                problems.append(
                    f"{name} ({how}): {result['error']} does not name the file: {result['message']}"
                )
            elif result["error"] != "IntegrityError":
                problems.append(
                    f"{name} ({how}): {result['error']}, not an IntegrityError: {result['message']}"
                )
        elif result["answers"] != reference:
            problems.append(f"{name} ({how}): answered, and not as the undamaged run does")
        shutil.rmtree(case, ignore_errors=True)
    assert problems == []


def test_a_garbage_manifest_is_refused(published, tmp_path):
    artifacts, run_id, _, _ = published
    case = _copy(artifacts, tmp_path / "case")
    manifest = case / "runs" / run_id / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text('{"run_id": "x", "files": 3}')
    result = _query(case, verify=True)
    assert result.get("error") == "IntegrityError" and "manifest.json cannot be read" in result["message"]


@pytest.mark.parametrize("name", ["items.ann", "user_embeddings.parquet"])
def test_without_verification_the_process_says_so(published, tmp_path, name):
    artifacts, run_id, _, _ = published
    case = _copy(artifacts, tmp_path / "case")
    damage(case / "runs" / run_id / name, "middle")
    result = _query(case, verify=False)
    # Whatever happens next (an error, wrong answers, even a crash inside Annoy), it was announced.
    assert "loaded without verification (verify=False)" in result["stderr"]
