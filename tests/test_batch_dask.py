"""Batch tables written in partitions: by the library in any order, and by the Prefect flow on a
two-worker Dask LocalCluster; both equal the single-process table file for file."""

import json
import os
import time

import numpy as np
import polars as pl
import pytest

import flows.batch_recommendations as batch_module
from flows.batch_recommendations import batch_recommendations
from recsys_metric import recommend
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.errors import ConfigError, DataError
from recsys_metric.export import write_embeddings
from recsys_metric.registry import ArtifactStore

N_USERS, N_ITEMS, DIM, SEEN = 650, 300, 16, 12
BLOCK = 50  # 13 blocks: 3 partitions get 5, 4 and 4 of them
VOLATILE = {"created", "seconds", "users_per_second", "out_dir"}


def _published_run(root):
    """An artifact store whose ``current`` is a run of random vectors (euclidean), string user ids."""
    store = ArtifactStore(root)
    run_id = "run-dask-1"
    pending = store.new_run(run_id)
    rng = np.random.default_rng(7)
    user_ids = np.array([f"u{n:04d}" for n in range(N_USERS)])
    item_ids = np.arange(1000, 1000 + N_ITEMS, dtype=np.int64)
    Vocabulary(pl.Series(user_ids), name="user").save(pending / "users.parquet")
    Vocabulary(item_ids, name="item").save(pending / "items.parquet")
    for kind, ids, n in (("user", user_ids, N_USERS), ("item", item_ids, N_ITEMS)):
        vectors = rng.standard_normal((n, DIM), dtype=np.float32)
        write_embeddings(
            pending / f"{kind}_embeddings.parquet",
            ids,
            vectors,
            kind=kind,
            distance="euclidean",
            run_id=run_id,
        )
    users = np.repeat(np.arange(N_USERS, dtype=np.int32), SEEN)
    pl.DataFrame(
        {
            "user_num": users,
            "item_num": rng.integers(0, N_ITEMS, users.size, dtype=np.int32),
            "label": np.ones(users.size, dtype=np.int8),
        }
    ).write_parquet(pending / "interactions.parquet")
    (pending / "metrics.json").write_text(json.dumps({"run_id": run_id}))
    store.finalize(pending, config={}, input_path=None)
    store.publish(run_id)
    return run_id


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask-artifacts")
    _published_run(root)
    return root


@pytest.fixture(scope="module")
def reference(artifacts, tmp_path_factory):
    """The single-process table (library call, no Prefect) and its manifest."""
    out = tmp_path_factory.mktemp("reference") / "table"
    recommend.write_recommendations(artifacts, out, k=7, batch_users=BLOCK, progress=False)
    return out


def _files(table_dir):
    return sorted(p.name for p in table_dir.glob("part-*.parquet"))


def _manifest(table_dir):
    manifest = json.loads((table_dir / recommend.TABLE_MANIFEST).read_text())
    return {key: value for key, value in manifest.items() if key not in VOLATILE}


def assert_same_table(got, want):
    """Same files, same manifest (but for time and place), same rows in the same order."""
    assert _files(got) == _files(want)
    assert _manifest(got) == _manifest(want)
    for name in _files(want):
        left, right = pl.read_parquet(got / name), pl.read_parquet(want / name)
        assert left.columns == ["user_id", "rank", "item_id", "score", "run_id"]
        assert left.equals(right), name


def test_reference_table_is_what_the_partitions_must_match(reference):
    manifest = _manifest(reference)
    assert manifest["n_files"] == 13 and manifest["block_users"] == BLOCK
    assert manifest["n_users"] == N_USERS and manifest["n_rows"] == 7 * N_USERS
    table = pl.read_parquet(reference / "*.parquet")
    assert table["user_id"].unique(maintain_order=True).to_list() == [f"u{n:04d}" for n in range(N_USERS)]


def test_partitions_written_in_any_order_make_the_single_process_table(artifacts, reference, tmp_path):
    plan = recommend.plan_recommendations(artifacts, tmp_path / "table", k=7, batch_users=BLOCK, partitions=3)
    assert [p.first_file for p in plan.partitions] == [0, 5, 9]
    assert [p.user_nums.size for p in plan.partitions] == [250, 200, 200]
    assert plan.n_users == N_USERS
    results = [recommend.write_partition(plan, number) for number in (2, 0, 1)]
    assert [r["files"][0] for r in results] == [
        "part-00009.parquet",
        "part-00000.parquet",
        "part-00005.parquet",
    ]
    summary = recommend.finish_recommendations(plan, results)
    assert summary["n_files"] == 13 and summary["n_rows"] == 7 * N_USERS
    assert_same_table(tmp_path / "table", reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"], "the temporary directory is gone"


def test_more_partitions_than_blocks_gives_one_per_block(artifacts, tmp_path):
    plan = recommend.plan_recommendations(
        artifacts, tmp_path / "t", k=3, user_ids=["u0003", "u0001"], partitions=8
    )
    assert len(plan.partitions) == 1 and plan.partitions[0].user_nums.tolist() == [3, 1]
    recommend.discard_recommendations(plan)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="partitions must be a positive integer"):
        recommend.plan_recommendations(artifacts, tmp_path / "t", partitions=0)


def test_a_missing_partition_is_refused_and_nothing_is_published(artifacts, tmp_path):
    plan = recommend.plan_recommendations(artifacts, tmp_path / "table", k=3, batch_users=BLOCK, partitions=2)
    first = recommend.write_partition(plan, 0)
    with pytest.raises(DataError, match=r"2 partitions but results came for partitions \[0\]"):
        recommend.finish_recommendations(plan, [first])
    assert list(tmp_path.iterdir()) == [], "neither the table nor its temporary directory remains"
    with pytest.raises(DataError, match="does not exist on .*shared file system"):
        recommend.write_partition(plan, 1)


@pytest.mark.prefect
def test_flow_on_two_dask_workers_writes_the_single_process_table(
    prefect_api, artifacts, reference, tmp_path
):
    run_id = ArtifactStore(artifacts).current()
    single = batch_recommendations(
        artifacts=str(artifacts), out=str(tmp_path / "single"), k=7, batch_users=BLOCK
    )
    assert single["out_dir"] == str(tmp_path / "single" / run_id)
    assert_same_table(tmp_path / "single" / run_id, reference)

    environ = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    started = time.perf_counter()
    stats = batch_recommendations(
        artifacts=str(artifacts), out=str(tmp_path / "dask"), k=7, batch_users=BLOCK, workers=2, partitions=3
    )
    seconds = time.perf_counter() - started
    assert stats["out_dir"] == str(tmp_path / "dask" / run_id)
    assert {k: v for k, v in stats.items() if k not in VOLATILE} == {
        k: v for k, v in single.items() if k not in VOLATILE
    }
    assert_same_table(tmp_path / "dask" / run_id, reference)
    assert sorted(p.name for p in (tmp_path / "dask").iterdir()) == [run_id]
    assert {key: os.environ.get(key) for key in environ} == environ, (
        "Dask's nannies leave no variables behind"
    )
    print(f"Dask flow (LocalCluster of 2 processes, 3 partitions): {seconds:.1f} s")


@pytest.mark.prefect
def test_the_flow_names_an_unreachable_scheduler(prefect_api, artifacts, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_module, "SCHEDULER_TIMEOUT_S", 1.0)
    with pytest.raises(
        ConnectionError, match=r"no Dask scheduler answered at tcp://127\.0\.0\.1:9 within 1 s"
    ):
        batch_recommendations(
            artifacts=str(artifacts), out=str(tmp_path / "out"), dask_address="tcp://127.0.0.1:9"
        )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="leave workers at 1"):
        batch_recommendations(artifacts=str(artifacts), dask_address="tcp://127.0.0.1:9", workers=2)
    with pytest.raises(ConfigError, match="partitions=4 needs Dask"):
        batch_recommendations(artifacts=str(artifacts), partitions=4)
