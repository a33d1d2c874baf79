"""Ingest benchmark: read + validate + vocabularies + split + triplets on a generated log.

Goal (issue 2): >= 2 million log rows per second end to end, peak RSS under 6 GB, on the
2-core machine. The log is generated once into ``bench/out/`` (not committed) and the pipeline
runs in a fresh process so that its peak RSS is its own.

    python -m bench.ingest                      # 20M rows, ~1M users x 100k items
    python -m bench.ingest --rows 2000000       # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.common import OUT, peak_rss_gib, run_isolated, save_result


def ensure_log(rows: int, users: int, items: int, seed: int) -> Path:
    from recsys_metric.data.synthetic import write_log

    path = OUT / f"log_{rows}_{users}_{items}_{seed}"
    if not (path / "_SUCCESS").exists():
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        write_log(path, n_users=users, n_items=items, n_interactions=rows, seed=seed, overwrite=True)
        (path / "_SUCCESS").write_text(f"{time.perf_counter() - t:.1f}\n")
    return path


def child(log: str, work: str) -> None:
    from recsys_metric.data.prepare import prepare_dataset

    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    prepared = prepare_dataset(log, work)
    total = time.perf_counter() - t
    report = prepared.report()
    rows = report["validation"]["n_input_rows"]
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": round(total, 2),
                "rows_per_second": round(rows / total),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "stage_seconds": report["seconds"],
                "n_users": report["n_users"],
                "n_items": report["n_items"],
                "n_triplets": report.get("triplets", {}).get("n_triplets"),
                "n_train": report["split"]["n_train"],
                "n_test": report["split"]["n_test"],
            }
        )
    )


def to_markdown(r: dict) -> str:
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items())
    ok_speed = "met" if r["rows_per_second"] >= 2_000_000 else "NOT met"
    ok_mem = "met" if r["peak_rss_gib"] < 6 else "NOT met"
    return "\n".join(
        [
            "| rows | users | items | triplets | wall | rows/s | peak RSS |",
            "|---|---|---|---|---|---|---|",
            f"| {r['rows']:,} | {r['n_users']:,} | {r['n_items']:,} | {r['n_triplets']:,} | {r['seconds']:.1f} s "
            f"| {r['rows_per_second'] / 1e6:.2f} M ({ok_speed}: goal 2 M) | {r['peak_rss_gib']:.2f} GiB ({ok_mem}: goal 6 GB) |",
            "",
            f"Stages: {stages}. Writes and deduplication run in background threads and overlap the "
            "stages after them, so the stage times add up to more than the wall time. "
            f"Log generation (not timed above): {r.get('generate_seconds', '?')} s.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("LOG", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    log = ensure_log(args.rows, args.users, args.items, args.seed)
    result = run_isolated("bench.ingest", "--child", str(log / "interactions"), str(OUT / "ingest_work"))
    result["generate_seconds"] = (log / "_SUCCESS").read_text().strip()
    result["markdown"] = to_markdown(result)
    cmd = "python -m bench.ingest" + ("" if args.rows == 20_000_000 else f" --rows {args.rows}")
    path = save_result("ingest", result, cmd)
    print(result["markdown"])
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
