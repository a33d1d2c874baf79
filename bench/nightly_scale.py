"""The nightly pipeline end to end on a generated 20M-interaction log (issue: scale).

Goal: under 15 minutes wall time and peak RSS under 8 GB on this 2-core, 24 GB machine, for the
whole nightly run: read + validate + split + triplets, training with early stopping, holdout
evaluation against popularity, refit, export, Annoy index, quality gate, publish. Two runs in a
row go into one artifact store, so the second is gated against the first on its holdout, as
every night in production.

The log (about 1M users x 100k items) is generated once into ``bench/out/`` and reused. Each
run goes through ``recsys-metric run`` in a fresh process, so its peak RSS is its own; the
per-stage seconds come from the run's ``metrics.json`` and the rest (gate scoring, finalize,
publish) is the wall time around them.

    python -m bench.nightly_scale                         # 20M rows, bench/configs/nightly_20m.toml
    python -m bench.nightly_scale --rows 2000000 --users 100000 --items 10000   # quicker
    python -m bench.nightly_scale --runs 1 --config my.toml
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import OUT, ROOT, save_result
from bench.ingest import ensure_log

CONFIG = ROOT / "bench" / "configs" / "nightly_20m.toml"
GOAL_MINUTES = 15.0
GOAL_RSS_GIB = 8.0


def _tree_rss_gib(pid: int) -> float:
    """Resident set size of ``pid`` and its descendants now, GiB (from /proc; 0 when gone)."""
    total_kib = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
                    break
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        stack.extend(int(c) for c in children)
    return total_kib / 2**20


def run_once(
    log: Path, artifacts: Path, config: Path | None, extra: list[str] | None = None
) -> dict[str, Any]:
    """One ``recsys-metric run`` in a child process; wall time, peak RSS, the run's metrics.

    ``config`` None runs with no config file (the defaults); ``extra`` are more ``run`` flags
    (e.g. ``["--time-budget", "15m"]``)."""
    cmd = [
        sys.executable,
        "-m",
        "recsys_metric.cli",
        "-v",
        "run",
        "--interactions",
        str(log / "interactions"),
        "--artifacts",
        str(artifacts),
        *(["--config", str(config)] if config is not None else []),
        "--no-progress",
        *(extra or []),
    ]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampled = [0.0]

    def sample() -> None:
        # ru_maxrss of the children is the exact peak of the largest one; sampling the process
        # tree also catches several processes at once (there are none here, but it is checked).
        while proc.poll() is None:
            sampled[0] = max(sampled[0], _tree_rss_gib(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - t
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"recsys-metric run failed ({proc.returncode}):\n{output[-5000:]}")
    # ru_maxrss of the children: the largest child so far (this run, or an earlier one).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    run_dirs = sorted(p for p in (artifacts / "runs").iterdir() if not p.name.startswith("."))
    summary = summarise(run_dirs[-1], artifacts)
    stages = summary["stage_seconds"]
    return {
        **summary,
        "wall_seconds": round(wall, 1),
        "peak_rss_gib": round(sampled[0], 2),
        "max_rss_so_far_gib": round(peak, 2),
        # Process start, imports, the gate's scoring of the published run, finalize, publish, prune.
        "other_seconds": round(wall - stages.get("total", 0.0) - stages.get("index", 0.0), 1),
        "log_tail": output.splitlines()[-12:],
    }


def summarise(run_dir: Path, artifacts: Path) -> dict[str, Any]:
    """The figures of one finished run directory (``metrics.json`` and ``manifest.json``)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    gate = json.loads((run_dir / "manifest.json").read_text())["extra"]["gate"]
    holdout = metrics["holdout"]
    refit = metrics["training"].get("refit") or {}
    index = metrics.get("index") or {}
    budget = metrics.get("time_budget") or {}
    return {
        "time_budget_s": budget.get("seconds"),
        "traded": budget.get("traded", []),
        "run_id": run_dir.name,
        "published": (artifacts / "current").resolve() == run_dir.resolve(),
        "stage_seconds": {name: round(value, 1) for name, value in metrics["seconds"].items()},
        "gate": gate["reason"],
        "recall_at_20": {name: round(values["recall@20"], 4) for name, values in holdout["models"].items()},
        "n_eval_users": holdout.get("n_users"),
        "early_stopping": metrics["early_stopping"],
        "epochs": {
            "holdout": metrics["early_stopping"]["epochs_run"],
            "refit": len(refit.get("history", [])),
        },
        "index": {key: index.get(key) for key in ("recall_at_10", "search_k", "serve", "p50_ms", "p99_ms")},
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| run | wall | peak RSS | prepare | train (holdout) | evaluate | refit | export | index "
        "| rest | epochs (holdout + refit) | Recall@20 model / popularity | Annoy recall@10 (search_k, p50) | published |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(result["runs"], 1):
        s = run["stage_seconds"]
        minutes = run["wall_seconds"] / 60
        rec = run["recall_at_20"]
        lines.append(
            f"| {i} | {minutes:.1f} min ({'met' if minutes < GOAL_MINUTES else 'NOT met'}) "
            f"| {run['peak_rss_gib']:.2f} GiB ({'met' if run['peak_rss_gib'] < GOAL_RSS_GIB else 'NOT met'}) "
            f"| {s.get('prepare', 0):.0f} s | {s.get('train_holdout', 0):.0f} s | {s.get('evaluate', 0):.0f} s "
            f"| {s.get('train_refit', 0):.0f} s | {s.get('export', 0):.0f} s | {s.get('index', 0):.0f} s "
            f"| {run['other_seconds']:.0f} s | {run['epochs']['holdout']} + {run['epochs']['refit']} "
            f"| {rec.get('model', float('nan')):.4f} / {rec.get('popularity', float('nan')):.4f} "
            f"| {run['index']['recall_at_10']:.3f} ({run['index']['search_k']}, {run['index']['p50_ms']:.1f} ms) "
            f"| {'yes' if run['published'] else 'no'} |"
        )
    log = result["log"]
    lines += [
        "",
        f"Log: {log['rows']:,} interactions, {log['users']:,} users x {log['items']:,} items, generated "
        f"by `recsys_metric.data.synthetic` (seed {log['seed']}; generation not timed). Config: "
        f"`{result['config']}`. Goals: under {GOAL_MINUTES:.0f} min wall, peak RSS under "
        f"{GOAL_RSS_GIB:.0f} GB. Each run is `recsys-metric run` in a fresh process; the second is gated "
        'against the first on its own holdout. "rest" is the wall time outside the pipeline\'s own '
        "stage timers: process start-up and imports, the published run's scoring on this holdout "
        "(run 2), the quality gate, finalize (sha256 of every file), publish and prune. Holdout metrics "
        "are full-ranking over the whole "
        f"catalog for {result['runs'][0]['n_eval_users']:,} sampled holdout users (`eval.max_users`).",
    ]
    return "\n".join(lines)


def _save(args: argparse.Namespace, runs: list[dict[str, Any]], argv: list[str] | None) -> tuple[Path, dict]:
    config = args.config.resolve()
    result = {
        "log": {"rows": args.rows, "users": args.users, "items": args.items, "seed": args.seed},
        "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
        "config_text": config.read_text(),
        "runs": runs,
    }
    result["markdown"] = to_markdown(result)
    command = "python -m bench.nightly_scale " + " ".join(argv if argv is not None else sys.argv[1:])
    return save_result("nightly_scale", result, command.strip()), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nightly_scale", description=__doc__)
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=2, help="consecutive nightly runs (default 2)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    args = parser.parse_args(argv)

    log = ensure_log(args.rows, args.users, args.items, args.seed)
    artifacts = OUT / f"nightly_{args.rows}"
    if artifacts.exists():
        # Runs are finalized read-only.
        subprocess.run(["chmod", "-R", "u+w", str(artifacts)], check=False)
        shutil.rmtree(artifacts)
    runs = []
    for i in range(args.runs):
        run = run_once(log, artifacts, args.config)
        print(
            f"run {i + 1}: {run['wall_seconds'] / 60:.1f} min, peak {run['peak_rss_gib']:.2f} GiB, "
            f"stages {run['stage_seconds']}, recall@20 {run['recall_at_20']}, published {run['published']}",
            flush=True,
        )
        runs.append(run)
        # Saved after every run, so a failure later keeps what was measured.
        _save(args, runs, argv)
    path, result = _save(args, runs, argv)
    print(result["markdown"])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
