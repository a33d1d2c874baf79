"""bench.time_to_quality's own pieces on data made here: durations, the peers' frontier, the
budgets (a run the budget did not stop stands for the larger budgets), the test-user sample, the
table and the plot."""

from __future__ import annotations

import numpy as np
import pytest

from bench import time_to_quality as ttq
from bench.datasets import random_split_dataset


def test_parse_seconds():
    assert ttq.parse_seconds("90s") == 90 and ttq.parse_seconds("5m") == 300
    assert ttq.parse_seconds("1.5h") == 5400 and ttq.parse_seconds("42") == 42
    with pytest.raises(ValueError, match=r"budget 'soon': expected a duration such as 90s, 5m or 1h"):
        ttq.parse_seconds("soon")


def test_frontier_keeps_points_no_faster_point_beats():
    points = [
        {"seconds": 5.0, "recall@20": 0.30},
        {"seconds": 1.0, "recall@20": 0.20},
        {"seconds": 2.0, "recall@20": 0.18},  # slower and worse than the 1 s point
        {"seconds": 2.0, "recall@20": 0.25},
        {"seconds": 9.0, "recall@20": 0.29},  # slower than the 5 s point and worse
    ]
    assert [(p["seconds"], p["recall@20"]) for p in ttq.frontier(points)] == [
        (1.0, 0.20),
        (2.0, 0.25),
        (5.0, 0.30),
    ]


def _tiny():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 12)
    items = (users % 4) * 10 + rng.integers(0, 10, users.size)
    label = np.ones(users.size, dtype=np.int8)
    return random_split_dataset("tiny", 40, 40, users, items, label, None, explicit=False)


def test_one_dataset_end_to_end_through_the_budget(tmp_path):
    """A real (tiny) run at two budgets: the first ends by early stopping or its epoch cap, so the
    second is recorded as the same run; the table and the plot say so."""
    data = _tiny()
    grids = {"als": {"factors": (4,), "regularization": (0.1,), "alpha": (10.0,), "iterations": (1, 3)}}
    res = ttq.run_dataset(data, ["1m", "2m"], grids, default=False)
    first, second = res["ours"]
    assert first["mode"] == "train.time_budget 1m" and first["budget"] == "1m"
    assert not first["budget_bound"] and "same_as" not in first
    assert "best epoch" in first["params"] and 0 <= first["recall@20"] <= 1 and first["seconds"] > 0
    assert second["budget"] == "2m" and second["same_as"] == "1m"
    assert second["recall@20"] == first["recall@20"]
    points = res["peers"]["als"]["points"]
    assert [p["params"]["iterations"] for p in points] == [1, 3]
    # The second point continues the first run: its seconds are cumulative.
    assert points[1]["seconds"] >= points[0]["seconds"]
    result = {
        "quick": True,
        "budgets": ["1m", "2m"],
        "grids": grids,
        "load_at_start": "1.00 1.00 1.00",
        "load_at_end": "1.00 1.00 1.00",
        "datasets": {"tiny": res},
        "skipped": {"gen-20m": "not requested (--datasets)"},
    }
    text = ttq.to_markdown(result)
    assert "| ours, 1m | train.time_budget 1m |" in text
    assert "| ours, 2m | train.time_budget 2m (same run as 1m) |" in text
    assert "Not measured in this run: gen-20m (not requested (--datasets))." in text
    png = ttq.plot(result, tmp_path / "ttq.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_budget_that_stops_the_run_is_said_and_trained_again_at_the_next(monkeypatch):
    calls = []

    def fake_ours(data, config, eval_users=None):
        budget = config.train.time_budget
        calls.append(budget)
        traded = ["holdout fit: time budget: 3 s left after epoch 2"] if budget == "1m" else []
        return (lambda users: np.zeros((len(users), data.n_items), dtype=np.float32)), {
            "params": "p",
            "train_seconds": {},
            "time_budget": {"traded": traded},
        }

    import bench.quality

    monkeypatch.setattr(bench.quality, "_ours", fake_ours)
    res = ttq.run_dataset(_tiny(), ["5m", "1m", "2m"], {}, default=True)
    assert calls == ["1m", "2m"], "5m and no budget are the same run as 2m, which the budget did not stop"
    assert [p["budget"] for p in res["ours"]] == ["1m", "2m", "5m", None]
    assert res["ours"][0]["budget_bound"] and res["ours"][2]["same_as"] == "2m"
    assert res["ours"][3]["mode"] == "train.time_budget none" and res["ours"][3]["same_as"] == "2m"


def test_eval_users_is_a_seeded_sample_beyond_the_limit():
    data = _tiny()
    assert ttq.eval_users(data) is None, "40 users: all of them"
    sample = ttq.eval_users(data, limit=10)
    assert sample.shape == (10,) and np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, ttq.eval_users(data, limit=10)), "seeded"
    assert np.all(data.test.row_lengths()[sample] > 0)


def test_resume_keeps_only_datasets_measured_the_same_way(tmp_path):
    import json

    grids = {"als": {"factors": [4], "iterations": [1]}}
    done = {"ours": [{"budget": "1m"}, {"budget": "2m"}], "peers": {"als": {}}}
    half = {"ours": [{"budget": "1m"}], "peers": {"als": {}}}
    path = tmp_path / "ttq.json"
    path.write_text(json.dumps({"budgets": ["1m", "2m"], "grids": grids, "datasets": {"a": done, "b": half}}))
    now = {"budgets": ["1m", "2m"], "grids": grids}
    assert list(ttq.resumable(path, now, default=False)) == ["a"]
    assert ttq.resumable(path, now, default=True) == {}
    assert ttq.resumable(path, {"budgets": ["5m"], "grids": grids}, default=False) == {}
    assert ttq.resumable(tmp_path / "missing.json", now, default=False) == {}
