"""What serving items added after the run costs: ``Recommender.add_items`` and queries beside it.

A synthetic run (``--items`` clustered item vectors, ``--dim``, euclidean, an Annoy index built at
``--n-trees``; users near random items) with a hand-made ``item_tower.npz`` (one categorical
feature ``cluster`` whose vector is the cluster centre), so new items can be embedded from a
feature. Measured in one process, one BLAS thread, CPU seconds (``time.process_time``):

- ``add_items``: one call adding ``--batch`` new items, for a run already holding 0 and then
  ``--added - --batch`` added items (the call rebuilds the id tables: ``O(catalogue)``; the item
  tower is loaded before, by one ``embed_items``);
- queries: ``similar_items`` (k = 10, Annoy) and ``recommend`` (k = 10, Annoy) CPU time per query,
  p50 over ``--queries`` queries, with 0, ``--batch`` and ``--added`` items added, side by side
  on the same loaded Recommender (each added item is then ranked exactly beside the index).

    python -m bench.added_items                       # 100k x 64, 1,000 and 10,000 added
    python -m bench.added_items --items 20000 --queries 100   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bench.common import OUT, save_result
from recsys_metric.config import IndexConfig
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.export import write_embeddings
from recsys_metric.index import build_index
from recsys_metric.item_embedder import ITEM_TOWER_FILE, ITEM_TOWER_FORMAT


def write_run(root: Path, n_items: int, n_users: int, dim: int, clusters: int, n_trees: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 0.3
    labels = rng.integers(0, clusters, n_items)
    items = centres[labels] + 0.05 * rng.standard_normal((n_items, dim)).astype(np.float32)
    users = items[rng.integers(0, n_items, n_users)] + 0.05 * rng.standard_normal((n_users, dim)).astype(
        np.float32
    )
    item_ids = [f"i{n:07d}" for n in range(n_items)]
    user_ids = [f"u{n:07d}" for n in range(n_users)]
    root.mkdir(parents=True)
    Vocabulary(user_ids, name="user").save(root / "users.parquet")
    Vocabulary(item_ids, name="item").save(root / "items.parquet")
    write_embeddings(
        root / "user_embeddings.parquet", user_ids, users, kind="user", distance="euclidean", run_id="b"
    )
    write_embeddings(
        root / "item_embeddings.parquet", item_ids, items, kind="item", distance="euclidean", run_id="b"
    )
    seen = rng.integers(0, n_items, (n_users, 20))
    pl.DataFrame(
        {
            "user_num": pl.Series(np.repeat(np.arange(n_users), 20), dtype=pl.Int32),
            "item_num": pl.Series(seen.reshape(-1), dtype=pl.Int32),
            "label": pl.Series(np.ones(seen.size), dtype=pl.Int8),
        }
    ).write_parquet(root / "interactions.parquet")
    hparams = {"model": {"mode": "two_tower", "user_tower": "embedding", "distance": "euclidean", "dim": dim}}
    (root / "model.json").write_text(json.dumps({"run_id": "b", "hparams": hparams}))
    cat = np.zeros((clusters + 1, dim), dtype=np.float32)
    cat[1:] = centres
    meta = {
        "format": ITEM_TOWER_FORMAT,
        "distance": "euclidean",
        "features": [
            {"name": "cluster", "kind": "categorical", "vocabulary": [f"c{j}" for j in range(clusters)]}
        ],
    }
    np.savez(
        root / ITEM_TOWER_FILE,
        id=items - cat[1:][labels],
        cat_0=cat,
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    build_index(
        root, IndexConfig(n_trees=n_trees, recall_queries=200, on_low_recall="warn", tune_search_k=False)
    )


def new_items(start: int, n: int, clusters: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [f"new{j:07d}" for j in range(start, start + n)],
            "cluster": [f"c{j % clusters}" for j in range(start, start + n)],
        }
    )


def cpu_p50(fn: Any, args: list[Any]) -> float:
    times = []
    for a in args:
        t = time.process_time()
        fn(a)
        times.append(time.process_time() - t)
    return float(np.median(times) * 1e3)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--n-trees", type=int, default=20)
    p.add_argument("--batch", type=int, default=1_000)
    p.add_argument("--added", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=300)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from recsys_metric.serving import Recommender

    root = OUT / "added_items"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    write_run(root / "run", args.items, args.users, args.dim, args.clusters, args.n_trees)
    setup_s = time.perf_counter() - started
    rng = np.random.default_rng(1)
    item_q = [f"i{n:07d}" for n in rng.integers(0, args.items, args.queries)]
    user_q = [f"u{n:07d}" for n in rng.integers(0, args.users, args.queries)]
    result: dict[str, Any] = {"args": vars(args), "setup_s": round(setup_s, 1), "load": os.getloadavg()}
    with threadpool_limits(1):
        rec = Recommender.load(root / "run", output="polars")
        rec.embed_items(new_items(0, 1, args.clusters))  # the item tower loads once, on first use
        rows = []
        total = 0
        for target in (0, args.batch, args.added):
            if target > total:
                # Grow to target - batch in one call, then time one call of `batch`.
                if target - args.batch > total:
                    rec.add_items(new_items(total, target - args.batch - total, args.clusters))
                    total = target - args.batch
                t = time.process_time()
                rec.add_items(new_items(total, args.batch, args.clusters))
                add_ms = (time.process_time() - t) * 1e3
                total = target
            else:
                add_ms = None
            assert rec.n_added == total
            rows.append(
                {
                    "added": total,
                    "add_call_cpu_ms": None if add_ms is None else round(add_ms, 1),
                    "similar_p50_cpu_ms": round(cpu_p50(lambda i: rec.similar_items(i, k=10), item_q), 3),
                    "recommend_p50_cpu_ms": round(cpu_p50(lambda u: rec.recommend(u, k=10), user_q), 3),
                }
            )
            print(rows[-1], flush=True)
    result["rows"] = rows
    result["load_after"] = os.getloadavg()
    save_result("added_items", result, "python -m bench.added_items " + " ".join(sys.argv[1:]))
    shutil.rmtree(root, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
