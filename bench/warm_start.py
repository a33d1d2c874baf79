"""Warm start: tonight's nightly run from yesterday's models against the same run from scratch.

A generated log (default 1M interactions, 50k users x 10k items) is cut into "yesterday" (all
but its newest 3% of events) and "today" (all of it). Yesterday's nightly run publishes cold; then
today's run goes twice from copies of that store: cold, and with ``train.warm_start``. Both are
gated against yesterday's model on today's holdout, so their Recall@20 compares directly.

    python -m bench.warm_start                       # 1M interactions
    python -m bench.warm_start --interactions 200000 # quicker
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import polars as pl

from bench.common import OUT, save_result


def _log(n_interactions: int, n_users: int, n_items: int) -> Path:
    from recsys_metric.data import synthetic

    out = OUT / f"warm_start_{n_interactions}"
    path = out / "interactions.parquet"
    if not path.exists():
        argv = ["--out", str(out), "--users", str(n_users), "--items", str(n_items)]
        synthetic.main([*argv, "--interactions", str(n_interactions), "--seed", "3"])
    return path


def main(argv: list[str] | None = None) -> int:
    from recsys_metric.config import config_from_dict
    from recsys_metric.nightly import run_nightly

    parser = argparse.ArgumentParser(prog="python -m bench.warm_start")
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--keep", type=float, default=0.97, help="share of events that make 'yesterday'")
    args = parser.parse_args(argv)

    source = _log(args.interactions, args.users, args.items)
    root = OUT / "warm_start_runs"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log = pl.read_parquet(source)
    cut = log["timestamp"].sort()[int(args.keep * log.height)]
    yesterday = log.filter(pl.col("timestamp") <= cut)
    yesterday.write_parquet(root / "yesterday.parquet")
    source_today = root / "today.parquet"
    log.write_parquet(source_today)
    cold = config_from_dict({})
    warm = config_from_dict({"train": {"warm_start": True}})

    first = run_nightly(root / "yesterday.parquet", root / "cold", cold, progress=False)
    shutil.copytree(root / "cold", root / "warm", symlinks=True)
    rows = {}
    for name, config in (("cold", cold), ("warm", warm)):
        t = time.perf_counter()
        result = run_nightly(source_today, root / name, config, progress=False)
        wall = time.perf_counter() - t
        m = result.run.metrics
        seconds = m["seconds"]
        rows[name] = {
            "wall_s": round(wall, 1),
            "train_s": round(seconds.get("train_holdout", 0) + seconds.get("train_refit", 0), 1),
            "epochs_holdout": m["early_stopping"]["epochs_run"],
            "best_epoch": m["early_stopping"]["best_epoch"],
            "refit_epochs": len(m["training"]["refit"]["history"]) if m["training"]["refit"] else None,
            "recall@20": round(m["holdout"]["models"]["model"]["recall@20"], 4),
            "ndcg@20": round(m["holdout"]["models"]["model"]["ndcg@20"], 4),
            "current_recall@20": round(result.current_on_holdout["metrics"]["recall@20"], 4),
            "published": result.published,
            "warm_start": m["warm_start"]["reason"],
            "lr": _rate(m),
        }
        print(name, rows[name], flush=True)
    c, w = rows["cold"], rows["warm"]
    n_users_new = log["user_id"].n_unique() - yesterday["user_id"].n_unique()
    md = [
        f"{log.height:,} interactions ({args.users:,} users x {args.items:,} items, synthetic); yesterday = "
        f"oldest {args.keep:.0%} of events ({yesterday.height:,}), published cold by run {first.run_id}; "
        f"today adds {log.height - yesterday.height:,} events and {n_users_new:,} new users. Default config.",
        "",
        "| today's run | learning rate | training s | wall s | holdout epochs (best) | refit epochs | Recall@20 | NDCG@20 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        md.append(
            f"| {name} | {r['lr']} | {r['train_s']} | {r['wall_s']} | {r['epochs_holdout']} ({r['best_epoch']}) | "
            f"{r['refit_epochs']} | {r['recall@20']} | {r['ndcg@20']} |"
        )
    md += [
        "",
        f"Warm start cut training time by {1 - w['train_s'] / c['train_s']:.0%} "
        f"({c['train_s']} s -> {w['train_s']} s) and the whole run by {1 - w['wall_s'] / c['wall_s']:.0%}; "
        f"Recall@20 {w['recall@20']} against {c['recall@20']} cold "
        f"(yesterday's model scores {c['current_recall@20']} on today's holdout).",
    ]
    save_result(
        "warm_start",
        {"rows": rows, "markdown": "\n".join(md)},
        "python -m bench.warm_start" + (" " + " ".join(argv) if argv else ""),
    )
    print("\n".join(md))
    return 0


def _rate(metrics: dict) -> str:
    """``0.01, chosen (0.05: 16 epochs, 0.01: 33)`` for a search, ``0.003 (0.01 x 0.3)`` for a warm
    run; the table's holdout epochs are the chosen rate's."""
    stopping, warm = metrics["early_stopping"], metrics["warm_start"]
    if stopping.get("lr_search"):
        tried = ", ".join(f"{t['lr']:g}: {t['epochs_run']} epochs" for t in stopping["lr_search"])
        return f"{stopping['lr']:g}, chosen ({tried})"
    if warm.get("enabled") and warm.get("lr_base"):
        return f"{stopping['lr']:g} ({warm['lr_base']:g} x {stopping['lr'] / warm['lr_base']:.1f})"
    return f"{stopping['lr']:g}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
