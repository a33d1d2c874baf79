"""The added-items journal: items added to one serving process reach every process following the
same store, survive a restart and the next run's swap (issue 18 item 3, for `api --workers N`).

Runs are the hand-made ones of tests/test_embed_items.py (``place`` pNNN puts an item on run item
NNN's point), so each right answer is known. Processes are played by several FollowingRecommenders
over one store; one test uses real subprocesses writing the journal at once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient

from recsys_metric.errors import DataError, ServingError
from recsys_metric.serving import Recommender
from recsys_metric.serving.api import create_app
from recsys_metric.serving.cli_api import _added_items_dir
from recsys_metric.serving.items_journal import ItemsJournal
from tests.serving_runs import ITEM_IDS, N_ITEMS, item_vectors
from tests.test_embed_items import new_items, publish

ROOT = Path(__file__).resolve().parents[1]


def follower(artifacts: Path, journal: Path) -> Recommender:
    return Recommender.load(artifacts, follow=True, interval=0, output="polars", added_items_dir=journal)


def test_an_item_added_in_one_process_is_served_by_the_others_and_after_a_restart(tmp_path):
    publish(tmp_path, "run-a")
    journal = tmp_path / "added_items"
    one, two = follower(tmp_path, journal), follower(tmp_path, journal)
    result = one.add_items(new_items(**{"new/17": 17}))
    assert result.added == ["new/17"] and one.n_added == 1
    assert two.n_added == 0, "the other process sees it at its next check"
    assert not two.refresh()  # current has not moved; the journal is read all the same
    assert two.n_added == 1
    assert two.similar_items(ITEM_IDS[17], k=1)["item_id"].to_list() == ["new/17"]
    # Replaced in the second process: the first follows, both end in the same state.
    assert two.add_items(new_items(**{"new/17": 40})).replaced == ["new/17"]
    one.refresh()
    for rec in (one, two):
        assert rec.similar_items("new/17", k=1)["item_id"].to_list() == [ITEM_IDS[40]]
    # A restart (a new process) replays the journal: one add of the folded entries.
    three = follower(tmp_path, journal)
    assert three.n_added == 1
    np.testing.assert_array_equal(three.snapshot()._item_vectors[N_ITEMS], item_vectors(0.0)[40])
    assert ItemsJournal(journal).entries() == ["000000000001.parquet", "000000000002.parquet"]
    for rec in (one, two, three):
        rec.close()


def test_the_next_run_replays_the_journal_with_its_own_item_tower(tmp_path):
    publish(tmp_path, "run-a")
    journal = tmp_path / "added_items"
    rec = follower(tmp_path, journal)
    rec.add_items(new_items(**{"new/17": 17}))
    follower(tmp_path, journal).add_items(new_items(**{"new/5": 5}))  # another process, not yet seen
    publish(tmp_path, "run-b", shift=0.3)
    assert rec.refresh() and rec.run_id == "run-b"
    assert sorted(rec.snapshot().added_item_ids.to_list()) == ["new/17", "new/5"]
    vectors = rec.snapshot()._item_vectors
    row = N_ITEMS + rec.snapshot().added_item_ids.to_list().index("new/17")
    np.testing.assert_array_equal(vectors[row], item_vectors(0.3)[17])
    rec.close()


def test_a_bad_add_writes_nothing_and_a_journal_that_cannot_be_written_adds_nothing(tmp_path):
    publish(tmp_path, "run-a")
    journal = tmp_path / "added_items"
    rec = follower(tmp_path, journal)
    bad = pl.DataFrame({"item_id": ["b"], "place": ["nowhere"], "tags": [None]})
    with pytest.raises(DataError, match="no feature value the model knows"):
        rec.add_items(bad)
    assert ItemsJournal(journal).entries() == [] and rec.n_added == 0
    # A journal that cannot be written (here: its parent is a file; a full disk or a read-only
    # store fails the same way): nothing is added, and the error says what to do.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    stuck = follower(tmp_path, blocked / "added_items")
    with pytest.raises(ServingError, match="cannot write the added-items journal .*nothing was added"):
        stuck.add_items(new_items(**{"new/3": 3}))
    assert stuck.n_added == 0
    stuck.close()
    assert rec.n_added == 0 and ItemsJournal(journal).entries() == []
    rec.close()


def test_a_damaged_entry_is_skipped_with_a_warning(tmp_path, caplog):
    publish(tmp_path, "run-a")
    journal = tmp_path / "added_items"
    follower(tmp_path, journal).add_items(new_items(**{"new/1": 1}))
    follower(tmp_path, journal).add_items(new_items(**{"new/2": 2}))
    (journal / "000000000001.parquet").write_bytes(b"not parquet")
    rec = follower(tmp_path, journal)
    assert rec.snapshot().added_item_ids.to_list() == ["new/2"]
    assert "000000000001.parquet: cannot read this added-items journal entry" in caplog.text
    rec.close()


def test_processes_writing_at_once_number_entries_without_gaps_or_repeats(tmp_path):
    journal = tmp_path / "journal"
    code = (
        "import sys, polars as pl\n"
        "from recsys_metric.serving.items_journal import ItemsJournal\n"
        "j = ItemsJournal(sys.argv[1])\n"
        "for n in range(20):\n"
        "    j.append(pl.DataFrame({'item_id': [f'{sys.argv[2]}-{n}']}), separator=';')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(journal), f"w{w}"], cwd=ROOT) for w in range(3)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    store = ItemsJournal(journal)
    names = store.entries()
    assert names == [f"{n:012d}.parquet" for n in range(1, 61)]
    ids = [store.read(name)[0]["item_id"][0] for name in names]
    assert sorted(ids) == sorted(f"w{w}-{n}" for w in range(3) for n in range(20))
    for w in range(3):  # each writer's own entries keep their order
        mine = [int(i.split("-")[1]) for i in ids if i.startswith(f"w{w}-")]
        assert mine == sorted(mine)
    assert store.read(names[0])[1] == ";"
    assert not [p for p in journal.iterdir() if p.name.endswith(".tmp")]


def test_http_workers_share_posted_items_through_the_journal(tmp_path):
    publish(tmp_path, "run-a")
    journal = _added_items_dir(None, tmp_path)
    assert journal == str((tmp_path / "added_items").resolve())
    assert _added_items_dir("none", tmp_path) == ""
    with (
        TestClient(create_app(tmp_path, interval=0, added_items_dir=journal)) as first,
        TestClient(create_app(tmp_path, interval=0, added_items_dir=journal)) as second,
    ):
        posted = first.post(
            "/items", json={"items": [{"item_id": "new/17", "place": "p017", "tags": ["red"]}]}
        )
        assert posted.status_code == 200, posted.text
        second.app.state.recommender.refresh()  # the worker's next check of current
        similar = second.get("/similar/new%2F17", params={"k": 1}).json()
        assert [r["item_id"] for r in similar["items"]] == [ITEM_IDS[17]]
        health = second.get("/health").json()
        assert health["n_added_items"] == 1 and health["journal_entries"] == 1
        assert health["added_items_journal"] == journal


def test_a_run_directory_has_no_journal(tmp_path):
    run_dir = publish(tmp_path, "run-a")
    assert _added_items_dir(None, run_dir) == ""
    from recsys_metric.errors import ConfigError

    with pytest.raises(ConfigError, match="added_items_dir needs follow=True"):
        Recommender.load(run_dir, added_items_dir=tmp_path / "j")
