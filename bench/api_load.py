"""HTTP API under load, against the in-process Python call, and a hot swap under load.

For each catalog (the bundled run: 2,000 users x 1,000 items; a synthetic 1M-item x 64 run with
an Annoy index), ``recsys-metric api`` is started as a real uvicorn process and `locust
<https://locust.io>`_ (``FastHttpUser``, no wait time, run as a library in its own process) sends
``GET /similar/{item_id}`` and ``GET /recommend/{user_id}`` with random known ids at concurrency
1, 8 and 32. Reported per cell: requests/s, p50 and p99 latency (ms), failures, and the
server's CPU seconds over the measured window (read by the locust process when it resets its
stats after the warm-up and when it reads them), hence requests per server CPU second. Beside them,
measured in the same run: the in-process Python call (``similar_items`` / ``recommend`` in a loop,
one thread, ``output="records"`` as the API answers; also with polars frames, for reference) as
calls per second of one core's CPU time: the limit a worker can approach.

Then the hot swap: while locust holds concurrency 8 on ``/recommend``, two new runs are published
one after the other, then a third whose ``items.ann`` is damaged after publishing. Reported: failed
requests (must be 0), the time from each publish until ``/health`` shows the new run (must be
within the reload interval plus the load time), and that the damaged run was refused with the old
one still serving.

Also: the cost of ``import recsys_metric; Recommender.load(bundled)`` in a fresh process (wall and
CPU seconds, peak RSS, whether torch was imported).

    python -m bench.api_load                     # both catalogs, ~6 minutes
    python -m bench.api_load --quick             # bundled run only, short cells (a smoke run)

The machine is shared: the load average is recorded before every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.common import ROOT, save_result


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------------------------
# Runs


def bundled_store(work: Path) -> Path:
    """The bundled data (``data/``) through ``recsys-metric run`` (training, index, publish)."""
    artifacts = work / "bundled"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "recsys_metric.cli",
            "run",
            "--artifacts",
            str(artifacts),
        ],
        check=True,
        cwd=ROOT,
        env=env(),
        capture_output=True,
    )
    return artifacts


def synthetic_store(work: Path, n_items: int, n_users: int, dim: int, n_trees: int) -> Path:
    """A published run of clustered random vectors (no training): ``n_items`` x ``dim`` items."""
    import numpy as np
    import polars as pl

    from recsys_metric.config import IndexConfig
    from recsys_metric.data.vocab import Vocabulary
    from recsys_metric.export import write_embeddings
    from recsys_metric.index import AnnoyIndex
    from recsys_metric.registry import ArtifactStore

    artifacts = work / f"synthetic-{n_items}"
    store = ArtifactStore(artifacts)
    run_id = "synthetic-1"
    run = store.new_run(run_id)
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((max(1, n_items // 1000), dim)).astype(np.float32)
    items = centers[rng.integers(0, centers.shape[0], n_items)] + 0.3 * rng.standard_normal(
        (n_items, dim)
    ).astype(np.float32)
    users = centers[rng.integers(0, centers.shape[0], n_users)] + 0.3 * rng.standard_normal(
        (n_users, dim)
    ).astype(np.float32)
    item_ids = [f"i{n:07d}" for n in range(n_items)]
    user_ids = [f"u{n:06d}" for n in range(n_users)]
    Vocabulary(user_ids, name="user").save(run / "users.parquet")
    Vocabulary(item_ids, name="item").save(run / "items.parquet")
    write_embeddings(
        run / "user_embeddings.parquet", user_ids, users, kind="user", distance="euclidean", run_id=run_id
    )
    write_embeddings(
        run / "item_embeddings.parquet", item_ids, items, kind="item", distance="euclidean", run_id=run_id
    )
    seen = 20
    pl.DataFrame(
        {
            "user_num": pl.Series(np.repeat(np.arange(n_users), seen), dtype=pl.Int32),
            "item_num": pl.Series(rng.integers(0, n_items, n_users * seen), dtype=pl.Int32),
            "label": pl.Series(np.ones(n_users * seen), dtype=pl.Int8),
        }
    ).write_parquet(run / "interactions.parquet")
    hparams = {"model": {"mode": "two_tower", "user_tower": "embedding", "distance": "euclidean", "dim": dim}}
    (run / "model.json").write_text(json.dumps({"run_id": run_id, "hparams": hparams}))
    (run / "metrics.json").write_text(json.dumps({"run_id": run_id}))
    AnnoyIndex.build(items, "euclidean", IndexConfig(n_trees=n_trees, search_k=-1), path=run)
    store.finalize(run, config={}, input_path=None)
    store.publish(run_id)
    return artifacts


def republish(artifacts: Path, new_id: str, *, damaged: bool = False) -> float:
    """Publish a copy of the current run as ``new_id`` (its files' run ids rewritten); with
    ``damaged``, overwrite 4 KB in the middle of its ``items.ann`` after publishing.
    Returns the ``time.time()`` of the publish."""
    from recsys_metric.export import read_embeddings, write_embeddings
    from recsys_metric.registry import ArtifactStore

    store = ArtifactStore(artifacts)
    source = store.current_dir()
    assert source is not None
    run = store.new_run(new_id)
    for path in source.iterdir():
        if path.is_file() and path.name != "manifest.json":
            shutil.copyfile(path, run / path.name)
        elif path.is_dir():
            shutil.copytree(path, run / path.name)
    for name in ("metrics.json", "model.json"):
        if (run / name).is_file():
            data = json.loads((run / name).read_text())
            data["run_id"] = new_id
            (run / name).write_text(json.dumps(data))
    for kind in ("user", "item"):
        path = run / f"{kind}_embeddings.parquet"
        table = read_embeddings(path)
        write_embeddings(path, table.ids, table.vectors, kind=kind, distance=table.distance, run_id=new_id)
    store.finalize(run, config={}, input_path=None)
    store.publish(new_id)
    published = time.time()
    if damaged:
        ann = store.run_dir(new_id) / "items.ann"
        ann.chmod(0o644)
        with open(ann, "r+b") as f:
            f.seek(ann.stat().st_size // 2)
            f.write(os.urandom(4096))
    return published


# ---------------------------------------------------------------------------------------------
# Server, load generator, in-process rate


class Server:
    """``recsys-metric api`` in a subprocess on a free port."""

    def __init__(self, artifacts: Path, *, workers: int, interval: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "recsys_metric.cli",
                "api",
                "--artifacts",
                str(artifacts),
                "--port",
                str(self.port),
                "--workers",
                str(workers),
                "--interval",
                str(interval),
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            env=env(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        import httpx

        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start: {Path(self.log.name).read_text()[-3000:]}")
            time.sleep(0.5)

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) used so far by the server and its worker processes."""
        return server_cpu(self.proc.pid)

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        text = Path(self.log.name).read_text()
        os.unlink(self.log.name)
        return text


def locust(
    url: str,
    paths_file: Path,
    users: int,
    seconds: float,
    warmup: float = 2.0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run the locust worker process (``--locust``) and return its JSON stats; with
    ``server_pid``, they include the server's CPU seconds over the measured window."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.api_load",
            "--locust",
            url,
            "--paths",
            str(paths_file),
            "--users",
            str(users),
            "--seconds",
            str(seconds),
            "--warmup",
            str(warmup),
            *(["--server-pid", str(server_pid)] if server_pid else []),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=seconds + warmup + 300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"locust failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its children."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system
    except psutil.NoSuchProcess:
        pass
    return total


def locust_main(
    url: str, paths_file: Path, users: int, seconds: float, warmup: float, server_pid: int | None = None
) -> None:
    """The load generator: ``users`` locust users, no wait time, random paths from the file.

    With ``server_pid``, the server's CPU seconds are read when the stats are reset after the
    warm-up and when they are read, so they cover exactly the requests counted."""
    import random

    import gevent
    from locust import FastHttpUser, constant, task
    from locust.env import Environment

    paths = json.loads(paths_file.read_text())

    class Client(FastHttpUser):
        host = url
        wait_time = constant(0)

        @task
        def query(self) -> None:
            self.client.get(random.choice(paths), name="query")

    environment = Environment(user_classes=[Client])
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=max(users, 1))
    gevent.sleep(warmup)
    environment.stats.reset_all()
    server0 = server_cpu(server_pid) if server_pid else 0.0
    cpu0 = time.process_time()
    gevent.sleep(seconds)
    entry = environment.stats.get("query", "GET")
    server1 = server_cpu(server_pid) if server_pid else 0.0
    result = {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.num_requests / seconds, 1),
        "p50_ms": entry.get_response_time_percentile(0.5),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "locust_cpu_s": round(time.process_time() - cpu0, 2),
    }
    if server_pid:
        result["server_cpu_window_s"] = round(server1 - server0, 3)
    runner.quit()
    print(json.dumps(result))


def in_process(
    artifacts: Path, kind: str, ids: list[Any], seconds: float, output: str = "records"
) -> dict[str, Any]:
    """Calls per second of one thread's CPU time, and the wall-clock p50/p99 of one call.

    ``output="records"`` (the default) is the work the API does for a request (the same query,
    rows as dicts), so the ratio against it is what HTTP costs on top; ``polars`` adds building a
    frame, as a Python caller with frames pays."""
    import numpy as np

    from recsys_metric import Recommender

    rec = Recommender.load(artifacts, output=output)
    call = rec.similar_items if kind == "similar" else rec.recommend
    for id_ in ids[:20]:
        call(id_, k=10)
    latencies = []
    cpu0, end = time.thread_time(), time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        call(ids[n % len(ids)], k=10)
        latencies.append(time.perf_counter() - t0)
        n += 1
    cpu = time.thread_time() - cpu0
    return {
        "calls": n,
        "per_cpu_second": round(n / cpu, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
    }


def sample_paths(artifacts: Path, kind: str, n: int, work: Path) -> tuple[Path, list[Any]]:
    import numpy as np

    from recsys_metric.export import read_embeddings
    from recsys_metric.registry import resolve_run_dir

    run_dir = resolve_run_dir(artifacts)
    table = read_embeddings(
        run_dir / ("item_embeddings.parquet" if kind == "similar" else "user_embeddings.parquet")
    )
    rng = np.random.default_rng(1)
    ids = [table.ids[int(j)] for j in rng.integers(0, len(table.ids), n)]
    path = work / f"paths-{kind}.json"
    path.write_text(json.dumps([f"/{kind}/{quote(str(i), safe='')}?k=10" for i in ids]))
    return path, ids


def import_cost(artifacts: Path, *, verify: bool = True, repeats: int = 3) -> dict[str, Any]:
    code = (
        "import time, resource, sys, json\n"
        "t0 = time.perf_counter(); c0 = time.process_time()\n"
        "import recsys_metric\n"
        "from recsys_metric import Recommender\n"
        "rec = Recommender.load(sys.argv[1], verify=sys.argv[2] == '1')\n"
        "print(json.dumps({'wall_s': round(time.perf_counter() - t0, 3), 'cpu_s': round(time.process_time() - c0, 3),\n"
        "  'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),\n"
        "  'torch_imported': 'torch' in sys.modules, 'verified': rec.verified}))\n"
    )
    runs = []
    for _ in range(repeats):
        load = load_average()
        done = subprocess.run(
            [sys.executable, "-c", code, str(artifacts), "1" if verify else "0"],
            env=env(),
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append({**json.loads(done.stdout.splitlines()[-1]), "load": load})
    return {
        "runs": runs,
        "best_wall_s": min(r["wall_s"] for r in runs),
        "best_cpu_s": min(r["cpu_s"] for r in runs),
    }


def cli_similar_cost(artifacts: Path, item_id: str) -> dict[str, Any]:
    """Wall and CPU seconds (user + system of the child) of ``recsys-metric similar``, three times."""
    import resource

    runs = []
    for _ in range(3):
        load = load_average()
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "recsys_metric.cli",
                "similar",
                item_id,
                "-k",
                "5",
                "--artifacts",
                str(artifacts),
            ],
            env=env(),
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        runs.append({"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "load": load})
    return {
        "runs": runs,
        "best_wall_s": min(r["wall_s"] for r in runs),
        "best_cpu_s": min(r["cpu_s"] for r in runs),
    }


# ---------------------------------------------------------------------------------------------
# Measurements


def measure_catalog(
    name: str, artifacts: Path, work: Path, *, workers: int, concurrency: list[int], seconds: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"workers": workers, "cells": [], "in_process": {}}
    paths = {kind: sample_paths(artifacts, kind, 2000, work) for kind in ("similar", "recommend")}
    for kind, (_, ids) in paths.items():
        load = load_average()
        out["in_process"][kind] = {**in_process(artifacts, kind, ids, seconds), "load": load}
        out["in_process"][f"{kind}_polars"] = {
            **in_process(artifacts, kind, ids, seconds / 2, output="polars"),
            "load": load_average(),
        }
        print(f"[{name}] in-process {kind}: {out['in_process'][kind]}", flush=True)
    server = Server(artifacts, workers=workers, interval=30)
    try:
        for kind, (paths_file, _) in paths.items():
            for users in concurrency:
                load = load_average()
                cpu0 = server.cpu_seconds()
                stats = locust(server.url, paths_file, users, seconds, server_pid=server.proc.pid)
                # Over the measured window only (read by the locust process when it resets and
                # reads its stats): the same requests as counted. It does not depend on how much
                # CPU the neighbours leave us. The whole cell, warm-up included, beside it.
                cell_cpu = server.cpu_seconds() - cpu0
                server_cpu = stats.pop("server_cpu_window_s", cell_cpu)
                cell = {"route": f"/{kind}", "concurrency": users, **stats, "load": load}
                cell["server_cpu_s"] = round(server_cpu, 2)
                cell["server_cpu_cell_s"] = round(cell_cpu, 2)
                limit = out["in_process"][kind]["per_cpu_second"]
                cell["per_worker_vs_in_process"] = round(stats["rps"] / workers / limit, 3)
                if server_cpu > 0:
                    per_cpu = stats["requests"] / server_cpu
                    cell["requests_per_server_cpu_s"] = round(per_cpu, 1)
                    cell["per_cpu_vs_in_process"] = round(per_cpu / limit, 3)
                out["cells"].append(cell)
                print(f"[{name}] {cell}", flush=True)
    finally:
        server.stop()
    return out


def hot_swap(artifacts: Path, work: Path, *, interval: float, seconds: float) -> dict[str, Any]:
    paths_file, _ = sample_paths(artifacts, "recommend", 2000, work)
    server = Server(artifacts, workers=1, interval=interval)
    first = server.health()["run_id"]
    events: list[dict[str, Any]] = []
    import threading

    result: dict[str, Any] = {}

    def load_run() -> None:
        result.update(locust(server.url, paths_file, 8, seconds, warmup=1.0))

    thread = threading.Thread(target=load_run)
    thread.start()
    try:
        time.sleep(3)
        for n, damaged in ((1, False), (2, False), (3, True)):
            new_id = f"swap-{n}-{int(time.time())}"
            serving_before = server.health()["run_id"]
            published = republish(artifacts, new_id, damaged=damaged)
            deadline = published + interval + 120
            seen_at = None
            refused = False
            while time.time() < deadline:
                health = server.health()
                if health["run_id"] == new_id:
                    seen_at = time.time()
                    break
                last = health.get("last_refusal") or {}
                if damaged and new_id in str(last.get("run_dir", "")):
                    refused = True
                    break
                time.sleep(0.05)
            events.append(
                {
                    "run_id": new_id,
                    "damaged": damaged,
                    "switched_after_s": None if seen_at is None else round(seen_at - published, 2),
                    "refused": refused,
                    "serving_after": server.health()["run_id"],
                    "serving_before": serving_before,
                }
            )
            print(f"[hot swap] {events[-1]}", flush=True)
            time.sleep(2)
    finally:
        thread.join()
        log = server.stop()
        # Leave the store serving a good run (the damaged one is current now), for a rerun.
        from recsys_metric.registry import ArtifactStore

        good = [e["run_id"] for e in events if not e["damaged"]]
        if good:
            ArtifactStore(artifacts).publish(good[-1])
    return {
        "first_run": first,
        "interval_s": interval,
        "load": result,
        "events": events,
        "refusal_logged": "refused run" in log,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bundled run only, 4 s cells")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (default: 8)")
    parser.add_argument("--workers", type=int, default=1, help="API worker processes (default: 1)")
    parser.add_argument("--items", type=int, default=1_000_000, help="items of the synthetic catalog")
    parser.add_argument("--trees", type=int, default=10, help="Annoy trees of the synthetic catalog")
    parser.add_argument("--keep", help="keep the runs in this directory (reused when present)")
    parser.add_argument("--locust", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.locust:
        locust_main(args.locust, Path(args.paths), args.users, args.seconds, args.warmup, args.server_pid)
        return 0

    seconds = 4.0 if args.quick else args.seconds
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="api-load-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"seconds_per_cell": seconds}
    try:
        bundled = work / "bundled" if (work / "bundled" / "current").exists() else bundled_store(work)
        result["import_and_load_bundled"] = import_cost(bundled)
        print(f"import + load: {result['import_and_load_bundled']}", flush=True)
        from recsys_metric import Recommender

        item = Recommender.load(bundled).item_ids[0]
        result["cli_similar_bundled"] = cli_similar_cost(bundled, str(item))
        print(f"cli similar: {result['cli_similar_bundled']}", flush=True)
        result["bundled"] = measure_catalog(
            "bundled", bundled, work, workers=args.workers, concurrency=[1, 8, 32], seconds=seconds
        )
        result["hot_swap"] = hot_swap(bundled, work, interval=1.0, seconds=25 if not args.quick else 15)
        if not args.quick:
            big_dir = work / f"synthetic-{args.items}"
            t0 = time.perf_counter()
            big = (
                big_dir
                if (big_dir / "current").exists()
                else synthetic_store(work, args.items, 20_000, 64, args.trees)
            )
            result["big_catalog"] = {
                "items": args.items,
                "dim": 64,
                "trees": args.trees,
                "build_s": round(time.perf_counter() - t0, 1),
            }
            result["big_catalog"]["import_and_load"] = import_cost(big, repeats=2)
            result["big_catalog"]["import_and_load_unverified"] = import_cost(big, verify=False, repeats=2)
            result["big_catalog"]["run_bytes"] = sum(p.stat().st_size for p in (big / "current").iterdir())
            print(f"1M import + load: {result['big_catalog']['import_and_load']}", flush=True)
            result["big_catalog"].update(
                measure_catalog(
                    "1M", big, work, workers=args.workers, concurrency=[1, 8, 32], seconds=seconds
                )
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    # The command as given (flags such as --seconds change what the figures mean).
    command = " ".join(["python -m bench.api_load", *(argv if argv is not None else sys.argv[1:])])
    path = save_result("api_load" + ("_quick" if args.quick else ""), result, command)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
