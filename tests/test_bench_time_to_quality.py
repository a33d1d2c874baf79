"""bench.time_to_quality's own pieces on data made here: durations, the peers' frontier, the
epoch-cap fallback and its labels, the table and the plot."""

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


def test_one_dataset_end_to_end_with_the_fallback_labelled(monkeypatch, tmp_path):
    data = _tiny()
    monkeypatch.setattr(ttq, "has_time_budget", lambda: False)
    monkeypatch.setitem(ttq.FALLBACK_EPOCHS, "1m", 2)
    grids = {"als": {"factors": (4,), "regularization": (0.1,), "alpha": (10.0,), "iterations": (1, 3)}}
    res = ttq.run_dataset(data, ["1m"], grids, default=False)
    (ours,) = res["ours"]
    assert ours["mode"] == "FALLBACK epoch cap 2 (no train.time_budget yet)" and ours["budget"] == "1m"
    assert "best epoch" in ours["params"] and 0 <= ours["recall@20"] <= 1 and ours["seconds"] > 0
    points = res["peers"]["als"]["points"]
    assert [p["params"]["iterations"] for p in points] == [1, 3]
    # The second point continues the first run: its seconds are cumulative.
    assert points[1]["seconds"] >= points[0]["seconds"]
    result = {
        "time_budget_available": False,
        "quick": True,
        "grids": grids,
        "load_at_start": "1.00 1.00 1.00",
        "load_at_end": "1.00 1.00 1.00",
        "datasets": {"tiny": res},
        "skipped": {"gen-20m": "not requested (--datasets)"},
    }
    text = ttq.to_markdown(result)
    assert "this run predates `train.time_budget`" in text
    assert "| ours, 1m | FALLBACK epoch cap 2 (no train.time_budget yet) |" in text
    assert "Not measured in this run: gen-20m (not requested (--datasets))." in text
    png = ttq.plot(result, tmp_path / "ttq.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_goes_through_the_config_when_the_trainer_has_it(monkeypatch):
    seen = {}

    def fake_ours(data, config):
        seen["config"] = config
        return (lambda users: np.zeros((len(users), data.n_items), dtype=np.float32)), {
            "params": "p",
            "train_seconds": {},
        }

    import bench.quality

    monkeypatch.setattr(bench.quality, "_ours", fake_ours)
    monkeypatch.setattr(ttq, "has_time_budget", lambda: False)
    point = ttq.ours_at_budget(_tiny(), "2m")
    assert point["mode"] == f"FALLBACK epoch cap {ttq.FALLBACK_EPOCHS['2m']} (no train.time_budget yet)"
    assert seen["config"].train.epochs == ttq.FALLBACK_EPOCHS["2m"]
    assert ttq.ours_at_budget(_tiny(), None)["mode"] == "default, no budget"


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
