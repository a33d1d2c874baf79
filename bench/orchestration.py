"""Orchestration overhead: the Prefect flow ``nightly_retrain`` against plain ``run_nightly``.

Both run the same library calls on the bundled log (``data/interactions.parquet`` with
``data/items.parquet``, default config) into one artifact store, alternating, so each run after the
first is gated against a published run. The temporary Prefect API server is started before timing
(a no-op flow) and its start is reported apart; the flow figure is what a nightly run pays on top
of the work when the API is up (default Prefect settings, heartbeat included).

    python -m bench.orchestration              # 3 runs of each
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT, save_result

DATA = Path("data") / "interactions.parquet"
ITEMS = Path("data") / "items.parquet"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orchestration")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    # Prefect reads these at import: a throwaway home, no telemetry, room for a slow start.
    home = tempfile.mkdtemp(prefix="prefect-home-")
    os.environ.update(
        {
            "PREFECT_HOME": home,
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        }
    )
    from prefect import flow

    from flows.nightly_retrain import nightly_retrain
    from recsys_metric.nightly import run_nightly

    @flow
    def warm_up() -> None:
        return None

    t = time.perf_counter()
    warm_up()
    server_start = time.perf_counter() - t

    artifacts = OUT / "orchestration-artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)
    plain: list[float] = []
    prefect: list[float] = []
    try:
        for _ in range(args.repeats):
            t = time.perf_counter()
            run_nightly(DATA, artifacts, items=ITEMS, progress=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            nightly_retrain(interactions=str(DATA), artifacts=str(artifacts), items=str(ITEMS))
            prefect.append(time.perf_counter() - t)
    finally:
        for dirpath, _, _ in os.walk(artifacts):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(artifacts, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)

    plain_s, flow_s = statistics.median(plain), statistics.median(prefect)
    overhead = flow_s - plain_s
    markdown = "\n".join(
        [
            "| path | median s (runs) |",
            "|---|---|",
            f"| `run_nightly` (plain Python, `recsys-metric run`) | {plain_s:.2f} ({', '.join(f'{x:.2f}' for x in plain)}) |",
            f"| `nightly_retrain` flow (10 tasks) | {flow_s:.2f} ({', '.join(f'{x:.2f}' for x in prefect)}) |",
            f"| orchestration overhead | {overhead:+.2f} ({overhead / plain_s:+.0%}) |",
            f"| temporary API server start (once per process, not included) | {server_start:.1f} |",
        ]
    )
    print(markdown)
    save_result(
        "orchestration",
        {
            "data": str(DATA),
            "repeats": args.repeats,
            "plain_seconds": plain,
            "flow_seconds": prefect,
            "plain_median_s": round(plain_s, 3),
            "flow_median_s": round(flow_s, 3),
            "overhead_s": round(overhead, 3),
            "server_start_s": round(server_start, 2),
            "markdown": markdown,
        },
        "python -m bench.orchestration " + " ".join(argv if argv is not None else sys.argv[1:]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
