"""Run every benchmark, then regenerate BENCHMARKS.md (``make bench``).

Benchmarks that need data from ``../shared/datasets`` skip those datasets and say so. Pass
``--only name,name`` to run a subset (the others keep their last saved figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

BENCHMARKS = [
    "ingest",
    "train_speed",
    "distributed",
    "quality",
    "index_latency",
    "batch_throughput",
    "batch_dask",
    "warm_start",
    "orchestration",
    "nightly_scale",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    failed = []
    for name in names:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"SKIP {name}: no module bench.{name}")
            continue
        print(f"== bench.{name}", flush=True)
        t = time.perf_counter()
        # A process per benchmark: its peak RSS is its own, and settings read at import (Prefect's)
        # come from its own environment, not from a benchmark that ran before it.
        rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], check=False).returncode
        print(f"== bench.{name} finished in {time.perf_counter() - t:.0f} s (exit {rc})", flush=True)
        if rc:
            failed.append(name)
    from bench import report

    report.main()
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
