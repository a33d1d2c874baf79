"""The serving package: torch-free import and load, verification against the manifest, following
``current`` (reload, refusal, thread safety during a swap)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from recsys_metric import Recommender
from recsys_metric.registry import IntegrityError
from recsys_metric.scoring import score_numpy
from recsys_metric.serving import FollowingRecommender
from recsys_metric.serving.ranking import _ExactRanker, _Exclusions
from tests.serving_runs import ITEM_IDS, USER_IDS, damage, point_current_at, publish_hand_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    publish_hand_run(tmp_path, "run-a")
    return tmp_path


def _python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_import_and_load_do_not_import_torch_prefect_or_the_trainer(store):
    code = (
        "import sys, json\n"
        "import recsys_metric\n"
        "from recsys_metric import Recommender\n"
        "rec = Recommender.load(sys.argv[1])\n"
        "rec.similar_items(rec.item_ids[0], k=3); rec.recommend(rec.user_ids[0], k=3)\n"
        "rec.recommend_for_history(rec.item_ids[:2].to_list(), k=3); rec.explain(rec.user_ids[0], rec.item_ids[0])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect') or m in\n"
        "         ('recsys_metric.train', 'recsys_metric.pipeline', 'recsys_metric.model.towers')]\n"
        "print(json.dumps({'heavy': heavy, 'verified': rec.verified}))\n"
    )
    done = _python(code, str(store))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": [], "verified": True}


def test_the_cli_query_path_imports_neither_fastapi_nor_torch(store):
    # `recsys-metric similar` builds the whole parser (the `api` subcommand's too) before it runs.
    code = (
        "import sys, json\n"
        "from recsys_metric import cli\n"
        "code = cli.main(['similar', '--artifacts', sys.argv[1], '-k', '2', sys.argv[2]])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect', 'fastapi', 'uvicorn')]\n"
        "print(json.dumps({'code': code, 'heavy': heavy}))\n"
    )
    from recsys_metric import Recommender as Rec

    item = str(Rec.load(store).item_ids[0])
    done = _python(code, str(store), item)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"code": 0, "heavy": []}


def test_the_compatibility_path_and_the_top_level_export_are_the_same_class():
    from recsys_metric.recommend import Recommender as Old
    from recsys_metric.serving import Recommender as New

    assert Old is New is Recommender


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_numpy_ranker_agrees_with_brute_force(distance):
    rng = np.random.default_rng(7)
    items = rng.standard_normal((32 * 70 + 5, 6)).astype(np.float32)
    queries = rng.standard_normal((9, 6)).astype(np.float32)
    excluded = [np.sort(rng.choice(items.shape[0], 30, replace=False)) for _ in range(9)]
    found = _ExactRanker(items, distance).top(queries, 15, _Exclusions.of_rows(excluded))
    for row in range(9):
        scores = score_numpy(queries[row : row + 1], items, distance)[0]
        scores[excluded[row]] = -np.inf
        want = set(np.argsort(-scores, kind="stable")[:15])
        got = found[row][found[row] >= 0]
        assert want <= set(got) and not set(got) & set(excluded[row])


def test_load_verifies_each_file_it_reads_against_the_manifest(store):
    run_dir = store / "runs" / "run-a"
    damage(run_dir / "items.ann", "middle")
    with pytest.raises(IntegrityError, match=r"items\.ann has sha256") as err:
        Recommender.load(store)
    assert err.value.files == ["items.ann"]
    # Exact scoring does not read the Annoy file, so it need not verify it.
    assert Recommender.load(store, index="exact").verified


def test_a_size_mismatch_is_reported_without_hashing(store):
    damage(store / "runs" / "run-a" / "user_embeddings.parquet", "truncate")
    with pytest.raises(
        IntegrityError, match=r"user_embeddings\.parquet has \d+ bytes but the manifest records"
    ):
        Recommender.load(store)


def test_verify_false_skips_and_says_so(store, caplog):
    damage(store / "runs" / "run-a" / "metrics.json", "zero")  # not read by serving: loads either way
    with caplog.at_level(logging.WARNING, logger="recsys_metric.serving.verify"):
        rec = Recommender.load(store, verify=False)
    assert not rec.verified
    assert "without verification (verify=False)" in caplog.text


def test_a_store_run_without_manifest_is_refused_but_a_plain_run_directory_loads(store, tmp_path_factory):
    run_dir = store / "runs" / "run-a"
    damage(run_dir / "manifest.json", "delete")
    with pytest.raises(IntegrityError, match="has no manifest.json"):
        Recommender.load(store)
    from tests.serving_runs import write_hand_run

    plain = write_hand_run(tmp_path_factory.mktemp("plain") / "out", "plain", annoy=False)
    rec = Recommender.load(plain)
    assert not rec.verified and rec.run_id == "plain"


def test_fold_in_of_free_embeddings_is_the_mean_of_the_item_vectors(store):
    rec = Recommender.load(store, index="exact", output="polars")
    history = [ITEM_IDS[10], ITEM_IDS[10], ITEM_IDS[40]]
    got = rec.recommend_for_history(history, k=5, exclude_seen=False)
    vectors = rec._item_vectors
    mean = vectors[[10, 10, 40]].mean(0, keepdims=True)
    scores = score_numpy(mean, vectors, "euclidean")[0]
    assert got["item_id"].to_list() == [ITEM_IDS[j] for j in np.argsort(-scores, kind="stable")[:5]]


def test_following_swaps_to_a_new_publish_and_refuses_a_damaged_one(store, caplog):
    with FollowingRecommender(store, interval=0, output="polars") as rec:
        assert rec.run_id == "run-a" and not rec.refresh()
        before = rec.recommend(USER_IDS[3], k=5)
        publish_hand_run(store, "run-b", shift=0.5)
        assert rec.refresh() and rec.run_id == "run-b" and rec.reloads == 1
        after = rec.recommend(USER_IDS[3], k=5)
        assert not before.equals(after)
        assert after.equals(
            Recommender.load(store / "runs" / "run-b", output="polars").recommend(USER_IDS[3], k=5)
        )

        publish_hand_run(store, "run-c", shift=1.0)
        damage(store / "runs" / "run-c" / "item_embeddings.parquet", "middle")
        with caplog.at_level(logging.WARNING, logger="recsys_metric.serving.follow"):
            assert not rec.refresh()
        assert rec.run_id == "run-b" and rec.recommend(USER_IDS[3], k=5).equals(after)
        assert len(rec.refusals) == 1 and "item_embeddings.parquet" in rec.refusals[0].reason
        assert "refused run" in caplog.text and "item_embeddings.parquet" in caplog.text
        assert not rec.refresh()  # a refused run is not tried again
        status = rec.status()
        assert (status["run_id"], status["reloads"], status["refused"]) == ("run-b", 1, 1)

        point_current_at(store, "run-a")  # a rollback is a publish like any other
        assert rec.refresh() and rec.recommend(USER_IDS[3], k=5).equals(before)


def test_the_watcher_thread_follows_within_the_interval(store):
    with Recommender.load(store, follow=True, interval=0.05) as rec:
        assert isinstance(rec, FollowingRecommender)
        publish_hand_run(store, "run-b", shift=0.5)
        deadline = time.monotonic() + 30
        while rec.run_id != "run-b" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert rec.run_id == "run-b"


def test_at_most_two_runs_are_resident(store):
    with FollowingRecommender(store, interval=0) as rec:
        held = rec.snapshot()  # a query in flight on run-a
        publish_hand_run(store, "run-b", shift=0.5)
        assert rec.refresh()
        publish_hand_run(store, "run-c", shift=1.0)
        assert not rec.refresh() and rec.run_id == "run-b"  # run-a is still held: wait
        del held
        assert rec.refresh() and rec.run_id == "run-c"


def test_queries_during_swaps_see_one_run_each_never_a_mix(store):
    shifts = {"run-a": 0.0, "run-b": 0.5, "run-c": 1.0, "run-d": 1.5}
    for run_id, shift in list(shifts.items())[1:]:
        publish_hand_run(store, run_id, shift=shift, publish=False)
    users = USER_IDS[:8]
    expected = {
        run_id: Recommender.load(store / "runs" / run_id, output="polars").recommend_batch(users, k=7)
        for run_id in shifts
    }
    assert len({frame.hash_rows().sum() for frame in expected.values()}) == len(shifts)
    failures: list[str] = []
    seen_runs: set[str] = set()
    stop = threading.Event()
    with FollowingRecommender(store, interval=0, output="polars") as rec:

        def query() -> None:
            while not stop.is_set():
                try:
                    got = rec.recommend_batch(users, k=7)
                except Exception as err:  # noqa: BLE001 - any failure fails the test
                    failures.append(repr(err))
                    return
                match = [run_id for run_id, frame in expected.items() if frame.equals(got)]
                if len(match) != 1:
                    failures.append("a result that is no run's answer")
                    return
                seen_runs.add(match[0])

        threads = [threading.Thread(target=query) for _ in range(4)]
        for t in threads:
            t.start()
        for run_id in list(shifts)[1:]:
            point_current_at(store, run_id)
            deadline = time.monotonic() + 30
            while not rec.refresh() and rec.run_id != run_id and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert seen_runs == set(shifts)
