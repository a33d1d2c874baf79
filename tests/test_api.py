"""The HTTP API: status codes, JSON shapes, errors, URL-encoded ids (FastAPI's test client), the
reload through HTTP, and once a real uvicorn process started by ``recsys-metric api``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from recsys_metric import Recommender
from recsys_metric.serving.api import MAX_K, create_app
from tests.serving_runs import ITEM_IDS, USER_IDS, damage, publish_hand_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    publish_hand_run(tmp_path, "run-a")
    return tmp_path


@pytest.fixture
def client(store):
    with TestClient(create_app(store, interval=0)) as c:
        yield c


def enc(id_: str) -> str:
    return quote(id_, safe="")


def rows(frame) -> list[dict]:
    return frame.to_dicts()


def test_similar_and_recommend_equal_the_python_api(client, store):
    rec = Recommender.load(store, output="polars")
    item, user = ITEM_IDS[9], USER_IDS[3]  # "it?em #9 %é", "user/03": both need encoding
    got = client.get(f"/similar/{enc(item)}", params={"k": 4, "exclude": [ITEM_IDS[8]]})
    assert got.status_code == 200
    assert got.json() == {
        "run_id": "run-a",
        "item_id": item,
        "items": rows(rec.similar_items(item, k=4, exclude=[ITEM_IDS[8]])),
    }
    got = client.get(f"/recommend/{enc(user)}", params={"k": 3, "exclude_seen": "false"})
    assert got.status_code == 200
    assert got.json() == {
        "run_id": "run-a",
        "user_id": user,
        "items": rows(rec.recommend(user, k=3, exclude_seen=False)),
    }
    body = client.post("/recommend", json={"user_ids": [USER_IDS[0], USER_IDS[1]], "k": 2}).json()
    assert body == {"run_id": "run-a", "recommendations": rows(rec.recommend_batch(USER_IDS[:2], k=2))}
    body = client.post("/recommend/history", json={"item_ids": [ITEM_IDS[1], ITEM_IDS[2]], "k": 3}).json()
    assert body["items"] == rows(rec.recommend_for_history(ITEM_IDS[1:3], k=3))
    got = client.get(f"/explain/{enc(USER_IDS[3])}/{enc(ITEM_IDS[10])}", params={"k": 2})
    assert got.status_code == 200
    assert got.json() == {
        "run_id": "run-a",
        "user_id": USER_IDS[3],
        "item_id": ITEM_IDS[10],
        "liked": rows(rec.explain(USER_IDS[3], ITEM_IDS[10], k=2)),
    }
    assert [r["liked_item_id"] for r in got.json()["liked"]] == [ITEM_IDS[9]]  # item 10 itself left out


def test_unknown_ids_are_404_naming_the_id(client):
    got = client.get(f"/similar/{enc('no/such item')}")
    assert got.status_code == 404
    assert "item_id 'no/such item' is not in the run's item vocabulary" in got.json()["detail"]
    assert got.json()["unknown"] == ["no/such item"]
    assert client.get("/recommend/nobody").status_code == 404
    got = client.post("/recommend", json={"user_ids": [USER_IDS[0], "ghost"]})
    assert got.status_code == 404 and got.json()["unknown"] == ["ghost"]
    got = client.get(f"/explain/{enc(USER_IDS[0])}/ghost")
    assert got.status_code == 404 and "ghost" in got.json()["detail"]
    assert client.get("/similar/" + enc(ITEM_IDS[1]), params={"exclude": ["ghost"]}).status_code == 404


@pytest.mark.parametrize("k", ["0", "-1", "abc", str(MAX_K + 1), "2.5"])
def test_a_bad_k_is_422(client, k):
    got = client.get(f"/similar/{enc(ITEM_IDS[1])}", params={"k": k})
    assert got.status_code == 422 and got.json()["detail"][0]["loc"] == ["query", "k"]
    assert client.get(f"/recommend/{enc(USER_IDS[1])}", params={"k": k}).status_code == 422


def test_bad_bodies_are_422(client):
    assert client.post("/recommend", json={"user_ids": []}).status_code == 422
    assert client.post("/recommend", json={"user_ids": [USER_IDS[0]], "k": 0}).status_code == 422
    assert client.post("/recommend/history", json={"k": 3}).status_code == 422
    assert client.get(f"/explain/{enc(USER_IDS[0])}").status_code == 422


def test_health_metrics_and_openapi(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["run_id"] == "run-a" and health["following"]
    assert (health["n_users"], health["n_items"], health["reloads"], health["refused"]) == (40, 120, 0, 0)
    assert health["verified"] and health["loaded_at"]
    client.get(f"/similar/{enc(ITEM_IDS[1])}")
    client.get("/similar/ghost")
    text = client.get("/metrics").text
    assert 'recsys_requests_total{method="GET",route="/similar/{item_id}",status="200"} 1.0' in text
    assert 'recsys_requests_total{method="GET",route="/similar/{item_id}",status="404"} 1.0' in text
    assert 'recsys_request_duration_seconds_bucket{le="0.005",route="/similar/{item_id}"}' in text
    assert "recsys_reloads_total 0.0" in text and "recsys_refused_runs_total 0.0" in text
    assert 'recsys_serving_run{run_id="run-a"} 1.0' in text
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/similar/{item_id}",
        "/recommend/{user_id}",
        "/recommend",
        "/recommend/history",
        "/health",
    } <= set(paths)
    assert client.get("/docs").status_code == 200


def test_the_service_follows_current_and_refuses_a_damaged_run(store):
    app = create_app(store, interval=0)
    with TestClient(app) as client:
        before = client.get(f"/recommend/{enc(USER_IDS[3])}").json()
        publish_hand_run(store, "run-b", shift=0.5)
        follower = app.state.recommender
        assert follower.refresh()
        after = client.get(f"/recommend/{enc(USER_IDS[3])}").json()
        assert after["run_id"] == "run-b" and after["items"] != before["items"]
        publish_hand_run(store, "run-c", shift=1.0)
        damage(store / "runs" / "run-c" / "items.ann", "middle")
        assert not follower.refresh()
        assert client.get(f"/recommend/{enc(USER_IDS[3])}").json() == after
        health = client.get("/health").json()
        assert (health["run_id"], health["reloads"], health["refused"]) == ("run-b", 1, 1)
        assert "items.ann" in health["last_refusal"]["reason"]
        text = client.get("/metrics").text
        assert "recsys_reloads_total 1.0" in text and "recsys_refused_runs_total 1.0" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_uvicorn_process(store):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "recsys_metric.cli",
            "api",
            "--artifacts",
            str(store),
            "--port",
            str(port),
            "--interval",
            "0.2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.2)
        got = httpx.get(f"{base}/similar/{enc(ITEM_IDS[9])}", params={"k": 3})
        assert got.status_code == 200 and len(got.json()["items"]) == 3
        assert httpx.get(f"{base}/similar/ghost").status_code == 404
        assert httpx.get(f"{base}/similar/{enc(ITEM_IDS[9])}", params={"k": 0}).status_code == 422
        publish_hand_run(store, "run-b", shift=0.5)
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=5).json()["run_id"] != "run-b":
            assert time.monotonic() < deadline, "the service did not follow the publish"
            time.sleep(0.1)
        assert httpx.get(f"{base}/recommend/{enc(USER_IDS[1])}").json()["run_id"] == "run-b"
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=60)
    # uvicorn shuts down cleanly on SIGTERM, then re-raises it (so the exit code is -15).
    assert server.returncode in (0, -15) and "Application shutdown complete." in out, out[-3000:]
    assert "now serving run run-b (was run-a)" in out
