"""Orchestration overhead: the Prefect flow ``nightly_retrain`` against plain ``run_nightly``.

All paths run the same library calls on the bundled log (``data/interactions.parquet`` with
``data/items.parquet``, default config and seed) into one artifact store, in one process:

- ``plain``: :func:`recsys_metric.nightly.run_nightly` (what ``recsys-metric run`` does);
- ``flow``: :func:`flows.nightly_retrain.run_once` (what ``python -m flows.nightly_retrain`` does:
  the flow without the flow-run heartbeat, see its docstring);
- ``flow, Prefect defaults``: the flow called directly, heartbeat on (what a served run pays).

Fairness:

- The temporary Prefect API server is started first (a no-op flow) and its start is reported
  apart: it is paid once per process, not per run.
- One untimed round first warms every path and publishes a run, so every timed run does the same
  work, the published run's scoring on the new holdout included.
- The order of the paths rotates from round to round (a Latin square), and a pause (not timed)
  separates runs: the SQLite-backed server records a run's events in the background, and two runs
  back to back can collide on its database lock (Prefect's client then waits 2 s or more), which a
  nightly pipeline never meets.
- The medians are reported with every run's figure; CPU seconds count this process and the API
  server's process, so the server's share of the overhead shows even when the machine is busy.
- Every run's holdout recall@20 is recorded: the paths must agree (same data, config and seed).

    python -m bench.orchestration              # 5 rounds
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import OUT, save_result, throwaway_prefect_home

DATA = Path("data") / "interactions.parquet"
ITEMS = Path("data") / "items.parquet"
PATHS = ("plain", "flow", "flow, Prefect defaults")
LABELS = {
    "plain": "`run_nightly` (plain Python, `recsys-metric run`)",
    "flow": "`nightly_retrain` flow via `run_once` (6 tasks, no heartbeat)",
    "flow, Prefect defaults": "`nightly_retrain` flow, Prefect defaults (heartbeat on)",
}


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orchestration")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, each runs every path once")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs, not timed")
    args = parser.parse_args(argv)

    # Before Prefect is imported: it reads its settings then.
    home = throwaway_prefect_home()
    import psutil
    from prefect import flow

    from flows.nightly_retrain import nightly_retrain, run_once
    from recsys_metric.nightly import run_nightly

    @flow
    def warm_up() -> None:
        return None

    t = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t

    artifacts = OUT / "orchestration-artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)
    params = {"interactions": str(DATA), "artifacts": str(artifacts), "items": str(ITEMS)}

    def plain() -> float:
        result = run_nightly(DATA, artifacts, items=ITEMS, progress=False)
        return result.run.metrics["holdout"]["models"]["model"]["recall@20"]

    def flow_recall(result: dict) -> float:
        return next(row["recall@20"] for row in result["metrics"] if row["model"] == "candidate")

    runners: dict[str, Callable[[], float]] = {
        "plain": plain,
        "flow": lambda: flow_recall(run_once(**params)),
        "flow, Prefect defaults": lambda: flow_recall(nightly_retrain(**params)),
    }
    me = psutil.Process()

    def server_cpu() -> float:
        return sum(sum(c.cpu_times()[:2]) for c in me.children(recursive=True))

    wall: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu: dict[str, list[float]] = {p: [] for p in PATHS}
    recall: dict[str, list[float]] = {p: [] for p in PATHS}
    try:
        for p in PATHS:
            runners[p]()
            time.sleep(args.pause)
        for r in range(args.rounds):
            for p in PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]:
                s0, c0, t0 = server_cpu(), time.process_time(), time.perf_counter()
                recall[p].append(round(float(runners[p]()), 4))
                wall[p].append(time.perf_counter() - t0)
                # The server's work on a run's events goes on a little after the call returns.
                time.sleep(args.pause)
                cpu[p].append(time.process_time() - c0 + server_cpu() - s0)
    finally:
        for dirpath, _, _ in os.walk(artifacts):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(artifacts, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)

    med = {p: statistics.median(wall[p]) for p in PATHS}
    med_cpu = {p: statistics.median(cpu[p]) for p in PATHS}
    base, base_cpu = med["plain"], med_cpu["plain"]
    rows = [
        "| path | median wall s (runs) | wall overhead | median CPU s, process + API server (runs) | CPU overhead |",
        "|---|---|---|---|---|",
    ]
    for p in PATHS:
        over = "" if p == "plain" else f"{med[p] - base:+.2f} s ({(med[p] - base) / base:+.0%})"
        over_cpu = (
            ""
            if p == "plain"
            else f"{med_cpu[p] - base_cpu:+.2f} s ({(med_cpu[p] - base_cpu) / base_cpu:+.0%})"
        )
        rows.append(
            f"| {LABELS[p]} | {med[p]:.2f} ({_fmt(wall[p])}) | {over} "
            f"| {med_cpu[p]:.2f} ({_fmt(cpu[p])}) | {over_cpu} |"
        )
    same = len({x for p in PATHS for x in recall[p]}) == 1
    markdown = "\n".join(
        rows
        + [
            "",
            verdict(base, med["flow"], med["flow, Prefect defaults"]),
            "",
            f"Temporary API server start (once per process, not included above): {server_start:.1f} s. "
            f"{args.rounds} rounds after one untimed warm-up round, path order rotated, "
            f"{args.pause:g} s pause between runs. Holdout recall@20 of every run: "
            + (
                f"{recall['plain'][0]} (the same for all paths)"
                if same
                else "; ".join(f"{p} {recall[p]}" for p in PATHS) + " (NOT the same: the paths differ)"
            )
            + ".",
        ]
    )
    print(markdown)
    save_result(
        "orchestration",
        {
            "data": str(DATA),
            "rounds": args.rounds,
            "pause_s": args.pause,
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            "recall_at_20": recall,
            "plain_median_s": round(base, 3),
            "flow_median_s": round(med["flow"], 3),
            "flow_defaults_median_s": round(med["flow, Prefect defaults"], 3),
            "overhead_s": round(med["flow"] - base, 3),
            "overhead_fraction": round((med["flow"] - base) / base, 4),
            "server_start_s": round(server_start, 2),
            "markdown": markdown,
        },
        "python -m bench.orchestration " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0 if same else 1


def verdict(plain_s: float, flow_s: float, defaults_s: float) -> str:
    """The goal line: under 10% wall overhead, and the run length from which a fixed cost meets it."""
    over, over_defaults = flow_s - plain_s, defaults_s - plain_s
    met = "met" if over / plain_s < 0.10 else "NOT met"
    return (
        f"Goal: under 10% wall overhead: {met} on this {plain_s:.2f} s run ({over / plain_s:+.0%}). The "
        "overhead is a fixed cost per run, not a share of the work: the flow's requests to the "
        "SQLite-backed API server (about 20 ms each in a cProfile of one run, about ten of them: flow "
        "run, states, two artifacts) and the task engine. At "
        f"{over:+.2f} s it stays under 10% for runs from {over / 0.10:.0f} s up "
        f"({over_defaults / 0.10:.0f} s with Prefect's heartbeat, whose thread the flow waits for at exit); "
        "a nightly run on 20M interactions takes minutes (bench.nightly_scale)."
    )


if __name__ == "__main__":
    sys.exit(main())
