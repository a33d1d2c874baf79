"""Items added after the run: Recommender.embed_items / add_items, queries over them, the HTTP route,
the carry-over across a followed run's swap (issue 18, item 3).

The runs are hand-made (tests/serving_runs.py: items on a circle, users near one item each) with a
hand-made ``item_tower.npz``: one categorical feature ``place`` whose value ``pNNN`` puts an item
exactly on the point of the run's item NNN, so every right answer is known. No torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from recsys_metric.errors import DataError
from recsys_metric.item_embedder import ITEM_TOWER_FILE, ITEM_TOWER_FORMAT
from recsys_metric.registry import ArtifactStore
from recsys_metric.serving import Recommender
from recsys_metric.serving.api import create_app
from tests.serving_runs import DIM, ITEM_IDS, N_ITEMS, USER_IDS, item_vectors, write_hand_run

ROOT = Path(__file__).resolve().parents[1]
PLACES = [f"p{n:03d}" for n in range(N_ITEMS)]


def write_tower(run_dir: Path, *, shift: float = 0.0, distance: str = "euclidean") -> None:
    """``item_tower.npz`` for a hand run: id rows = the run's item vectors, ``place`` = the points."""
    vectors = item_vectors(shift)
    place = np.zeros((N_ITEMS + 1, DIM), dtype=np.float32)
    place[1:] = vectors
    meta = {
        "format": ITEM_TOWER_FORMAT,
        "distance": distance,
        "features": [
            {"name": "place", "kind": "categorical", "vocabulary": PLACES},
            {"name": "tags", "kind": "tags", "vocabulary": ["red", "blue"]},
        ],
    }
    np.savez(
        run_dir / ITEM_TOWER_FILE,
        id=vectors,
        cat_0=place,
        tag_0=np.zeros((3, DIM), dtype=np.float32),
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )


def publish(artifacts: Path, run_id: str, *, shift: float = 0.0, tower: bool = True) -> Path:
    store = ArtifactStore(artifacts)
    pending = store.new_run(run_id)
    write_hand_run(pending, run_id, shift=shift)
    if tower:
        write_tower(pending, shift=shift)
    store.finalize(pending, config={}, input_path=None)
    store.publish(run_id)
    return store.run_dir(run_id)


@pytest.fixture
def run_dir(tmp_path):
    root = write_hand_run(tmp_path / "run", "run-a")
    write_tower(root)
    return root


def new_items(**places: int) -> pl.DataFrame:
    """Items ``name -> n``: placed on item n's point (tags: an unknown one, ignored)."""
    return pl.DataFrame(
        {
            "item_id": list(places),
            "place": [PLACES[n] for n in places.values()],
            "tags": ["green|red"] * len(places),
        }
    )


# --------------------------------------------------------------------------- embed_items


def test_embed_items_of_known_items_gives_their_exported_vectors_and_changes_nothing(run_dir):
    rec = Recommender.load(run_dir, output="polars")
    known = pl.DataFrame({"item_id": ITEM_IDS[:5], "place": [None] * 5, "tags": [None] * 5})
    np.testing.assert_array_equal(rec.embed_items(known), item_vectors(0.0)[:5])
    vectors = rec.embed_items(new_items(fresh=17).to_pandas())  # pandas works too
    assert vectors.dtype == np.float32 and vectors.shape == (1, DIM)
    np.testing.assert_array_equal(vectors[0], item_vectors(0.0)[17])
    assert rec.n_added == 0 and rec.n_items == N_ITEMS
    with pytest.raises(KeyError, match="'fresh' is not in the run's item vocabulary"):
        rec.similar_items("fresh")


def test_embed_items_from_a_file(run_dir, tmp_path):
    path = tmp_path / "new.csv"
    new_items(a=3, b=40).write_csv(path)
    rec = Recommender.load(run_dir)
    np.testing.assert_array_equal(rec.embed_items(path), item_vectors(0.0)[[3, 40]])


def test_a_run_without_item_features_says_what_to_do(tmp_path):
    rec = Recommender.load(write_hand_run(tmp_path / "plain", "run-p"))
    with pytest.raises(DataError, match="only a run trained with model.item_features can embed new items"):
        rec.embed_items(new_items(x=1))
    with pytest.raises(DataError, match="retrain with item features"):
        rec.add_items(new_items(x=1))


def test_bad_item_frames_are_clear_errors(run_dir):
    rec = Recommender.load(run_dir)
    with pytest.raises(DataError, match=r"2 item_id\(s\) appear more than once \(first: \['a', 'b'\]\)"):
        rec.add_items(pl.concat([new_items(a=1, b=2), new_items(a=1, b=2)]))
    with pytest.raises(DataError, match=r"lacks the feature column\(s\) \['tags'\]"):
        rec.add_items(new_items(a=1).drop("tags"))
    with pytest.raises(
        DataError, match=r"1 of 2 new item\(s\) have no feature value the model knows .*'bare'"
    ):
        rec.add_items(
            pl.DataFrame({"item_id": ["ok", "bare"], "place": ["p001", "p999"], "tags": [None, "x"]})
        )
    with pytest.raises(DataError, match="item_id has dtype Int64 but the run's item ids are String"):
        rec.add_items(pl.DataFrame({"item_id": [5], "place": ["p001"], "tags": [None]}))
    assert rec.n_added == 0, "a failed call adds nothing"


# --------------------------------------------------------------------------- add_items and queries


@pytest.mark.parametrize("index", ["annoy", "exact"])
def test_added_items_are_queried_and_returned_where_expected(run_dir, index):
    rec = Recommender.load(run_dir, output="polars", index=index)
    result = rec.add_items(new_items(**{"new/17": 17, "new/15": 15}))
    assert result.added == ["new/17", "new/15"] and result.skipped == [] and result.replaced == []
    assert rec.n_added == 2 and rec.n_items == N_ITEMS + 2
    assert rec.added_item_ids.to_list() == ["new/17", "new/15"]

    # The new item sits on item 17's point: item 17's nearest, and its own nearest is item 17.
    near_17 = rec.similar_items(ITEM_IDS[17], k=3)
    assert near_17["item_id"].to_list() == ["new/17", ITEM_IDS[16], ITEM_IDS[18]]
    assert near_17["score"][0] == pytest.approx(0.0, abs=1e-3)
    by_new = rec.similar_items("new/17", k=3)
    assert by_new["item_id"].to_list() == [ITEM_IDS[17], ITEM_IDS[16], ITEM_IDS[18]]
    # new/15 ties with item 15 (the same point): the run's item first (lower number), then it.
    around = rec.similar_items(ITEM_IDS[14], k=3, exclude=[ITEM_IDS[13]])["item_id"].to_list()
    assert around[0] == ITEM_IDS[15] and around[1] == "new/15"
    # The score of an added item is the one it would have in the run's table.
    exact_pair = rec.similar_items(ITEM_IDS[16], k=N_ITEMS + 1, exact=True)
    row = exact_pair.filter(pl.col("item_id") == "new/17")
    same = exact_pair.filter(pl.col("item_id") == ITEM_IDS[17])
    assert row["score"][0] == same["score"][0]

    # User 5 sits at 0.9 x item 15's point and has seen items 15 and 16: the item placed on 15 wins.
    user = USER_IDS[5]
    top = rec.recommend(user, k=2)
    assert top["item_id"].to_list() == ["new/15", ITEM_IDS[14]]
    assert rec.recommend(user, k=1, exclude=["new/15"])["item_id"].to_list() == [ITEM_IDS[14]]
    assert rec.recommend(user, k=1, exclude_seen=False)["item_id"].to_list() == [ITEM_IDS[15]]
    assert rec.recommend(user, k=1, candidates=["new/17", ITEM_IDS[60]])["item_id"].to_list() == ["new/17"]
    batch = rec.recommend_batch([user, USER_IDS[0]], k=1)
    assert batch["item_id"].to_list() == ["new/15", ITEM_IDS[119]]
    history = rec.recommend_for_history(["new/15"], k=2)
    assert history["item_id"].to_list() == [ITEM_IDS[15], ITEM_IDS[14]]
    with pytest.raises(KeyError, match="nope"):
        rec.similar_items(ITEM_IDS[0], exclude=["new/17", "nope"])
    with pytest.raises(KeyError, match="nope"):
        rec.similar_items("nope")
    every = rec.recommend(user, k=N_ITEMS + 10)
    assert len(every) == N_ITEMS + 2 - 2, "every item but the two seen, the added ones included"


def test_pandas_results_and_explain_name_added_items(run_dir):
    rec = Recommender.load(run_dir)  # pandas frames
    rec.add_items(new_items(**{"new/17": 17}))
    assert rec.similar_items(ITEM_IDS[17], k=1)["item_id"].tolist() == ["new/17"]
    # User 5 liked items 15 and 16: 16 is nearer to the new item on 17's point.
    assert rec.explain(USER_IDS[5], "new/17", k=2)["liked_item_id"].tolist() == [ITEM_IDS[16], ITEM_IDS[15]]


def test_known_ids_are_skipped_and_added_ids_replaced(run_dir):
    rec = Recommender.load(run_dir, output="polars")
    rec.add_items(new_items(x=10))
    result = rec.add_items(
        pl.DataFrame({"item_id": [ITEM_IDS[3], "x", "y"], "place": ["p050"] * 3, "tags": [None] * 3})
    )
    assert result.to_dict() == {"added": ["y"], "replaced": ["x"], "skipped": [ITEM_IDS[3]]}
    assert rec.n_added == 2
    assert rec.similar_items("x", k=2)["item_id"].to_list() == [ITEM_IDS[50], "y"], "x moved to item 50"
    assert rec.similar_items(ITEM_IDS[3], k=1)["item_id"].to_list() == [ITEM_IDS[2]], "item 3 kept its vector"


def test_excluded_cold_items_policy_keeps_added_items_out_of_answers(run_dir):
    import pyarrow.parquet as pq

    path = run_dir / "item_embeddings.parquet"
    table = pq.read_table(path)
    meta = {**(table.schema.metadata or {}), b"cold_items": b"excluded"}
    pq.write_table(table.replace_schema_metadata(meta), path)
    rec = Recommender.load(run_dir, output="polars")
    rec.add_items(new_items(n=17))
    assert "n" not in rec.similar_items(ITEM_IDS[17], k=N_ITEMS)["item_id"].to_list()
    assert "n" not in rec.recommend(USER_IDS[5], k=N_ITEMS)["item_id"].to_list()
    assert rec.similar_items("n", k=1)["item_id"].to_list() == [ITEM_IDS[17]], "it can still be queried"


def test_queries_racing_an_add_see_the_run_before_or_after(run_dir):
    rec = Recommender.load(run_dir, output="polars")
    errors: list[BaseException] = []
    stop = threading.Event()

    def query() -> None:
        while not stop.is_set():
            try:
                top = rec.similar_items(ITEM_IDS[17], k=2)["item_id"].to_list()
                assert top[0] in (ITEM_IDS[16], ITEM_IDS[18]) or top[0].startswith("n")
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for t in threads:
        t.start()
    for j in range(30):
        rec.add_items(new_items(**{f"n{j}": 17}))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    assert rec.n_added == 30


# --------------------------------------------------------------------------- follow and HTTP


def test_added_items_are_embedded_again_by_the_next_run(tmp_path):
    publish(tmp_path, "run-a")
    rec = Recommender.load(tmp_path, follow=True, interval=0, output="polars")
    rec.add_items(new_items(**{"new/17": 17}))
    publish(tmp_path, "run-b", shift=0.3)
    assert rec.refresh()
    assert rec.run_id == "run-b" and rec.status()["n_added_items"] == 1
    snap = rec.snapshot()
    # Re-embedded with run-b's tower: on run-b's item 17, not where run-a put it.
    vec = snap._item_vectors[N_ITEMS : N_ITEMS + 1]
    np.testing.assert_array_equal(vec[0], item_vectors(0.3)[17])
    assert rec.similar_items(ITEM_IDS[17], k=1)["item_id"].to_list() == ["new/17"]

    # A next run trained without item features cannot place them: dropped, with a warning.
    publish(tmp_path, "run-c", tower=False)
    assert rec.refresh()
    assert rec.status()["n_added_items"] == 0 and rec.run_id == "run-c"
    rec.close()


def test_a_new_run_that_knows_an_added_id_serves_its_own_vector(tmp_path, run_dir):
    from recsys_metric.serving.added_items import carry_added_items

    old = Recommender.load(run_dir, output="polars")
    old.add_items(pl.DataFrame({"item_id": ["z", ITEM_IDS[0]], "place": ["p017", None], "tags": [None] * 2}))
    other = write_hand_run(tmp_path / "other", "run-o", shift=0.3)
    write_tower(other, shift=0.3)
    new = Recommender.load(other, output="polars")
    # Pretend run-o learned "z": an id the new run knows is not added again.
    old._added = old._added.__class__(
        old._added.ids, old._added.vectors, old._added.rows.with_columns(item_id=pl.lit(ITEM_IDS[5])), N_ITEMS
    )
    assert carry_added_items(old, new) is None and new.n_added == 0


def test_http_post_items_then_query_the_new_id(tmp_path):
    publish(tmp_path, "run-a")
    with TestClient(create_app(tmp_path, interval=0)) as client:
        body = {
            "items": [
                {"item_id": "new/17", "place": "p017", "tags": ["red"]},
                {"item_id": ITEM_IDS[2], "place": "p003", "tags": "red|blue"},
            ]
        }
        answer = client.post("/items", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "run_id": "run-a",
            "added": ["new/17"],
            "replaced": [],
            "skipped": [ITEM_IDS[2]],
            "n_added_items": 1,
        }
        similar = client.get("/similar/new%2F17", params={"k": 2}).json()
        assert [r["item_id"] for r in similar["items"]] == [ITEM_IDS[17], ITEM_IDS[16]]
        assert (
            client.get(f"/similar/{ITEM_IDS[17].replace('/', '%2F')}", params={"k": 1}).json()["items"][0][
                "item_id"
            ]
            == "new/17"
        )
        health = client.get("/health").json()
        assert health["n_added_items"] == 1 and health["n_items"] == N_ITEMS + 1
        bad = client.post("/items", json={"items": [{"item_id": "b", "place": "nowhere", "tags": []}]})
        assert bad.status_code == 422 and "no feature value the model knows" in bad.json()["detail"]
        no_id = client.post("/items", json={"items": [{"place": "p001"}]})
        assert no_id.status_code == 422 and "has no item_id" in no_id.json()["detail"]


def test_adding_and_querying_new_items_never_imports_torch(run_dir):
    code = (
        "import sys, json\n"
        "import polars as pl\n"
        "from recsys_metric import Recommender\n"
        "rec = Recommender.load(sys.argv[1], output='polars')\n"
        "rec.add_items(pl.DataFrame({'item_id': ['n'], 'place': ['p017'], 'tags': [None]}))\n"
        "rec.similar_items('n', k=3); rec.recommend(rec.user_ids[0], k=3)\n"
        "rec.recommend_for_history(['n'], k=3)\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect')]\n"
        "print(json.dumps({'heavy': heavy, 'added': rec.n_added}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"heavy": [], "added": 1}


# --------------------------------------------------------------------------- the merge, exactly


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot"])
def test_the_segmented_engine_ranks_as_one_table_holding_every_item(distance):
    """Run items + added items ranked apart and merged = the same items in one table, bit for bit."""
    from recsys_metric.serving.added_items import _SegmentedEngine
    from recsys_metric.serving.ranking import _Engine, _Exclusions

    rng = np.random.default_rng(7)
    base = rng.standard_normal((500, 8)).astype(np.float32)
    added = rng.standard_normal((37, 8)).astype(np.float32)
    added[5] = base[10]  # an exact tie across the segments: the run's item first
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    queries[0] = base[10]
    whole = _Engine(np.concatenate([base, added]), distance)
    segmented = _SegmentedEngine(_Engine(base, distance), _Engine(added, distance), serve_added=True)
    excluded = [np.array([3, 505, 530]), np.array([], dtype=np.int64)] + [np.arange(0, 537, 7)] * 4
    for k in (1, 10, 60, 537):
        exclusions = _Exclusions.of_rows(excluded)
        expected = whole.rank(queries, k, exclusions, None)
        got = segmented.rank(queries, k, exclusions, None)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    candidates = np.array([[510, 2, 10, 505, -1, 536]] * 6)
    expected = whole.finish(queries, candidates, 4, _Exclusions.of_rows(excluded))
    got = segmented.finish(queries, candidates, 4, _Exclusions.of_rows(excluded))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
