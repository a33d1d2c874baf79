"""The batch recommendations flow in one process against the same flow on a two-worker Dask LocalCluster.

A run of synthetic vectors (default 200k users x 20k items, D = 64, ``dot`` distance, 20 seen items
per user masked; :func:`bench.batch_throughput.make_run`) is written as a top-100 table by
``flows.batch_recommendations`` three ways, alternating round after round because the machine is
shared (load averages recorded before each run):

- ``library``: :func:`recsys_metric.recommend.write_recommendations` alone, no Prefect;
- ``flow, 1 process``: the flow with ``workers=1`` (one task, torch on every core of the process);
- ``flow, Dask``: the flow with ``workers=2`` (a temporary LocalCluster of 2 single-threaded worker
  processes, one partition each), cluster start and teardown included;
- ``flow, running Dask``: the flow with ``dask_address`` of a LocalCluster of the same shape that
  the benchmark started (and warmed with a 10-user table) before the rounds: what each run costs
  when the workers outlive it, as with a cluster that is kept running.

Each row gives the flow's wall time, the table's own seconds (manifest: planning to move into
place), and the CPU seconds spent: this process plus the Dask workers (collected when they exit,
or read from the running workers' process counters).
The CPU time over the wall time of the single-process run says how much of the two cores it
already uses, which bounds what a second process can add. The tables are checked equal.

    python -m bench.batch_dask                        # 200k users x 20k items, 3 rounds
    python -m bench.batch_dask --users 20000 --rounds 1 --no-save   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import OUT, save_result, throwaway_prefect_home


def _cpu_seconds(extra_pids: Sequence[int] = ()) -> tuple[float, float]:
    """(this process, its waited-for children plus the live processes ``extra_pids``) user + system
    CPU seconds."""
    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    live = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in extra_pids)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime + live


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _measure(label: str, call: Any, worker_pids: Sequence[int] = ()) -> dict[str, Any]:
    load = _load()
    cpu0 = _cpu_seconds(worker_pids)
    t = time.perf_counter()
    stats = call()
    wall = time.perf_counter() - t
    cpu1 = _cpu_seconds(worker_pids)
    row = {
        "path": label,
        "load_before": load,
        "wall_s": round(wall, 2),
        "table_s": stats["seconds"],
        "cpu_self_s": round(cpu1[0] - cpu0[0], 2),
        "cpu_workers_s": round(cpu1[1] - cpu0[1], 2),
        "users_per_s": round(stats["n_users"] / wall, 1),
        "n_rows": stats["n_rows"],
        "n_files": stats["n_files"],
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _same_tables(a: Path, b: Path) -> bool:
    import polars as pl

    names = sorted(p.name for p in a.glob("part-*.parquet"))
    if names != sorted(p.name for p in b.glob("part-*.parquet")):
        return False
    return all(pl.read_parquet(a / n).equals(pl.read_parquet(b / n)) for n in names)


def _why(result: dict[str, Any]) -> str:
    """The explanation under the table, from its own figures."""
    rows = result["rows"]

    def median(path: str, key: str) -> float:
        return statistics.median(key_value(r, key) for r in rows if r["path"] == path)

    def key_value(r: dict[str, Any], key: str) -> float:
        cpu = r["cpu_self_s"] + r["cpu_workers_s"]
        return {"cpu": cpu, "ratio": cpu / r["wall_s"]}[key]

    ratios = [key_value(r, "ratio") for r in rows]
    loads = [float(r["load_before"].split()[0]) for r in rows]
    return (
        f"Why: CPU / wall stayed between {min(ratios):.2f} and {max(ratios):.2f} on every path, with the "
        f"1-minute load average at {min(loads):.1f}-{max(loads):.1f} on {result['cores']} cores (other work "
        "shared the machine): the processes got about one core between them, however many there were, "
        "and the wall time followed the CPU work. Partitioning adds work rather than removing it: "
        f"{median('flow, running Dask', 'cpu'):.1f} CPU s on a running cluster against "
        f"{median('flow, 1 process', 'cpu'):.1f} in one process (each worker reads the run and builds the "
        "whole seen-item matrix, and runs Prefect's task engine), and "
        f"{median('flow, Dask', 'cpu'):.1f} with a temporary cluster (scheduler, nannies, and worker "
        "processes that import torch, polars and Prefect before their first task). In one process torch "
        "already runs the matrix product on both threads; what two workers add is a second core for the "
        "single-threaded rest (selection, canonical re-scoring, Arrow and Parquet), and only when that "
        "core is free. Dask pays where there are idle cores or machines beyond what one process uses, "
        "with a cluster kept running."
    )


def to_markdown(result: dict[str, Any]) -> str:
    p = result["params"]
    med = result["medians"]
    lines = [
        f"Top-{p['k']} table for {p['users']:,} users over {p['items']:,} items, D = {p['dim']}, "
        f"{p['distance']} distance, {p['seen']} seen items per user (blocks of {result['block_users']:,} "
        f"users, {result['n_files']} files), written by `flows.batch_recommendations`; {result['cores']} "
        f"cores, torch {result['torch_threads']} threads in the flow process. Dask: a temporary "
        f"LocalCluster of {p['workers']} worker processes x 1 thread, one partition each, started by the "
        "flow (start and teardown included) or kept running by the benchmark (`dask_address`). "
        "CPU = this process + the Dask workers' processes.",
        "",
        "| round | path | load (1/5/15 min) | wall s | table s | users/s | CPU s | CPU / wall |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        cpu = r["cpu_self_s"] + r["cpu_workers_s"]
        lines.append(
            f"| {r['round']} | {r['path']} | {r['load_before']} | {r['wall_s']:.1f} | {r['table_s']:.1f} | "
            f"{r['users_per_s']:,.0f} | {cpu:.1f} | {cpu / r['wall_s']:.2f} |"
        )
    single = med["flow, 1 process"]
    lines += [
        "",
        "Median wall time: "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in med.items())
        + f". Flow on Dask against the flow in one process: **{single / med['flow, Dask']:.2f}x** with a "
        f"temporary cluster, **{single / med['flow, running Dask']:.2f}x** on a running one. Tables "
        f"identical on every path: {result['tables_identical']}.",
        "",
        _why(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_dask", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seen", type=int, default=20)
    parser.add_argument("--distance", default="dot", choices=["dot", "cosine", "euclidean"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    # Before Prefect is imported: it reads its settings then.
    home = throwaway_prefect_home()
    import torch
    from prefect import flow

    from bench.batch_throughput import make_run
    from flows.batch_recommendations import batch_recommendations
    from recsys_metric.recommend import _block_users, write_recommendations

    run = make_run(
        OUT / f"batch_run_{args.users}_{args.items}_{args.dim}_{args.distance}",
        args.users,
        args.items,
        args.dim,
        args.seen,
        args.distance,
        args.seed,
    )
    out = OUT / "batch_dask"
    shutil.rmtree(out, ignore_errors=True)

    stack = contextlib.ExitStack()

    @flow
    def warm_up() -> None:
        return None

    t = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t

    import distributed

    from flows.batch_recommendations import _local_cluster_environment

    stack.enter_context(_local_cluster_environment())
    cluster = stack.enter_context(
        distributed.LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    )
    client = stack.enter_context(distributed.Client(cluster, set_as_default=False))
    worker_pids = list(client.run(os.getpid).values())
    warm_users = out / "warm_users.txt"
    warm_users.parent.mkdir(parents=True, exist_ok=True)
    warm_users.write_text("".join(f"{n}\n" for n in range(10)))
    batch_recommendations(
        artifacts=str(run),
        out=str(out / "warm"),
        k=args.k,
        users_path=str(warm_users),
        dask_address=cluster.scheduler_address,
    )

    paths = {
        "library": lambda: write_recommendations(
            run, out / "library", k=args.k, overwrite=True, progress=False
        ),
        "flow, 1 process": lambda: batch_recommendations(
            artifacts=str(run), out=str(out / "single"), k=args.k
        ),
        "flow, Dask": lambda: batch_recommendations(
            artifacts=str(run), out=str(out / "dask"), k=args.k, workers=args.workers
        ),
        "flow, running Dask": lambda: batch_recommendations(
            artifacts=str(run), out=str(out / "running"), k=args.k, dask_address=cluster.scheduler_address
        ),
    }
    rows: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            # Rotate the order so that no path always runs first (or right after the heaviest).
            names = list(paths)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                pids = worker_pids if name == "flow, running Dask" else ()
                rows.append({"round": r + 1, **_measure(name, paths[name], pids)})
        identical = all(
            _same_tables(out / "library", out / sub / run.name) for sub in ("single", "dask", "running")
        )
        first = rows[0]
    finally:
        stack.close()
        shutil.rmtree(home, ignore_errors=True)
    result: dict[str, Any] = {
        "params": {
            k: getattr(args, k)
            for k in ("users", "items", "dim", "k", "seen", "distance", "workers", "rounds", "seed")
        },
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "block_users": _block_users(args.items),
        "n_files": first["n_files"],
        "server_start_s": round(server_start, 2),
        "rows": rows,
        "medians": {
            name: statistics.median(r["wall_s"] for r in rows if r["path"] == name) for name in paths
        },
        "tables_identical": identical,
    }
    result["markdown"] = to_markdown(result)
    print(result["markdown"])
    if not args.no_save:
        command = "python -m bench.batch_dask " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"saved {save_result('batch_dask', result, command.strip())}")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
