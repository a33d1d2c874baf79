"""Batch recommendation throughput against the machine's own matrix-product rate.

:func:`recsys_metric.recommend.write_recommendations` writes top-100 for every user over 100k
items at D = 64 (synthetic normal vectors, ``dot`` distance, 20 seen items per user masked),
end to end: reading the run, building the seen-item matrix, scoring, selecting, canonical
re-scoring and writing zstd Parquet. Beside it, in the same process, a plain ``torch.mm`` of the
same shapes (``[block, 64] x [64, n_items]`` into a reused output, for every block of users)
gives the GFLOP/s this machine reaches on that product right now. The two are measured in
alternation, round after round, because the machine is shared: the ratio of each round compares
figures taken under the same load, and the load average is recorded before every measurement.

    ratio = pipeline users/s x (2 D n_items FLOP per user) / matmul FLOP/s

and, less sensitive to the neighbours' load, the same ratio of process CPU seconds.

The goal is a ratio of at least 0.5: selection, masking, re-scoring and Parquet together cost no
more than the product itself.

Memory: a second, isolated process opens a run of 1M users x 100k items (20M seen pairs) and
writes the table for a sample of its users. Every part of a full run's working set is there (all
user vectors, the whole seen-item matrix, one block's scores, the writer's queue); only the
number of blocks differs, and blocks reuse one buffer. Its peak RSS stands for the full table's.

    python -m bench.batch_throughput                      # 20k users, 4 rounds, memory check
    python -m bench.batch_throughput --users 4000 --rounds 2 --memory-users 0   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from bench.common import OUT, peak_rss_gib, run_isolated, save_result
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.export import read_embeddings, write_embeddings
from recsys_metric.recommend import _block_users, write_recommendations

RUN_ID = "bench-batch"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_run(root: Path, n_users: int, n_items: int, dim: int, seen: int, distance: str, seed: int) -> Path:
    """A run directory of random vectors (written once, reused while its parameters match)."""
    marker = root / "_params.json"
    params = {
        "users": n_users,
        "items": n_items,
        "dim": dim,
        "seen": seen,
        "distance": distance,
        "seed": seed,
    }
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    user_ids = np.arange(n_users, dtype=np.int64)
    item_ids = np.arange(n_items, dtype=np.int64)
    Vocabulary(user_ids, name="user").save(root / "users.parquet")
    Vocabulary(item_ids, name="item").save(root / "items.parquet")
    for kind, ids, n in (("user", user_ids, n_users), ("item", item_ids, n_items)):
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        write_embeddings(
            root / f"{kind}_embeddings.parquet", ids, vectors, kind=kind, distance=distance, run_id=RUN_ID
        )
    user_nums = np.repeat(np.arange(n_users, dtype=np.int32), seen)
    pl.DataFrame(
        {
            "user_num": user_nums,
            "item_num": rng.integers(0, n_items, user_nums.size, dtype=np.int32),
            "label": np.ones(user_nums.size, dtype=np.int8),
        }
    ).write_parquet(root / "interactions.parquet")
    marker.write_text(json.dumps(params))
    return root


def matmul_seconds(users: torch.Tensor, items_t: torch.Tensor, block: int) -> tuple[float, float]:
    """Wall and process CPU seconds of ``[block, D] x [D, n_items]`` products over all users, output
    buffer reused."""
    out = torch.empty((block, items_t.shape[1]), dtype=torch.float32)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for first in range(0, users.shape[0], block):
            q = users[first : first + block]
            torch.mm(q, items_t, out=out[: q.shape[0]])
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    run = make_run(
        OUT / f"batch_run_{args.users}_{args.items}_{args.dim}_{args.distance}",
        args.users,
        args.items,
        args.dim,
        args.seen,
        args.distance,
        args.seed,
    )
    users = torch.from_numpy(read_embeddings(run / "user_embeddings.parquet").vectors.copy())
    items_t = torch.from_numpy(read_embeddings(run / "item_embeddings.parquet").vectors.copy()).T
    block = _block_users(args.items)
    flop_per_user = 2.0 * args.dim * args.items
    out_dir = OUT / "batch_table"
    matmul_seconds(users[: min(block, args.users)], items_t, block)
    rounds = []
    for r in range(args.rounds):
        load_mm = load_average()
        mm, mm_cpu = matmul_seconds(users, items_t, block)
        load_pipe = load_average()
        cpu = time.process_time()
        summary = write_recommendations(run, out_dir, k=args.k, overwrite=True, progress=False)
        pipeline_cpu = time.process_time() - cpu
        pipeline_users_s = args.users / summary["seconds"]
        matmul_gflops = flop_per_user * args.users / mm / 1e9
        rounds.append(
            {
                "round": r + 1,
                "load_before_matmul": load_mm,
                "load_before_pipeline": load_pipe,
                "matmul_seconds": round(mm, 3),
                "matmul_gflops": round(matmul_gflops, 2),
                "matmul_users_per_s": round(args.users / mm, 1),
                "pipeline_seconds": summary["seconds"],
                "pipeline_users_per_s": round(pipeline_users_s, 1),
                "pipeline_gflops_equivalent": round(pipeline_users_s * flop_per_user / 1e9, 2),
                "ratio": round(mm / summary["seconds"], 3),
                "matmul_cpu_seconds": round(mm_cpu, 3),
                "pipeline_cpu_seconds": round(pipeline_cpu, 3),
                "cpu_ratio": round(mm_cpu / pipeline_cpu, 3),
                "rows": summary["n_rows"],
            }
        )
        print(json.dumps(rounds[-1]), file=sys.stderr)
    files = sorted(out_dir.glob("part-*.parquet"))
    return {
        "block_users": block,
        "rounds": rounds,
        "median_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rounds), 3),
        "median_matmul_gflops": round(statistics.median(r["matmul_gflops"] for r in rounds), 2),
        "median_pipeline_users_per_s": round(statistics.median(r["pipeline_users_per_s"] for r in rounds), 1),
        "table_bytes": sum(f.stat().st_size for f in files),
        "table_files": len(files),
    }


def memory_child(run: str, sample: int, k: int) -> None:
    """Child process: write the table for the first ``sample`` users of ``run``; print one JSON line."""
    n_users = pl.scan_parquet(Path(run) / "users.parquet").select(pl.len()).collect().item()
    out = OUT / "batch_table_memory"
    summary = write_recommendations(
        run, out, k=k, user_ids=list(range(min(sample, n_users))), overwrite=True, progress=False
    )
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"peak_rss_gib": round(peak_rss_gib(), 3), "summary": summary}))


def memory_check(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    run = make_run(
        OUT / f"batch_run_{args.memory_users}_{args.items}_{args.dim}_{args.distance}",
        args.memory_users,
        args.items,
        args.dim,
        args.seen,
        args.distance,
        args.seed,
    )
    generate_seconds = time.perf_counter() - started
    child = run_isolated(
        "bench.batch_throughput", "--child-memory", str(run), "--memory-sample", str(args.memory_sample)
    )
    return {
        "users": args.memory_users,
        "items": args.items,
        "seen_pairs": args.memory_users * args.seen,
        "sample_users": args.memory_sample,
        "peak_rss_gib": child["peak_rss_gib"],
        "sample_seconds": child["summary"]["seconds"],
        "generate_seconds": round(generate_seconds, 1),
    }


def to_markdown(result: dict[str, Any]) -> str:
    p = result["params"]
    lines = [
        f"Top-{p['k']} for {p['users']:,} users over {p['items']:,} items, D = {p['dim']}, {p['distance']} "
        f"distance, {p['seen']} seen items per user; blocks of {result['block_users']} users. "
        "Pipeline = `write_recommendations` end to end (read, mask, select, re-score, zstd Parquet); "
        "matmul = plain `torch.mm` of the same shapes in the same process, measured alternately.",
        "",
        "| round | load (1/5/15 min) | matmul GFLOP/s | matmul users/s | pipeline users/s | ratio | CPU-time ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rounds"]:
        lines.append(
            f"| {r['round']} | {r['load_before_pipeline']} | {r['matmul_gflops']:.1f} | "
            f"{r['matmul_users_per_s']:,.0f} | {r['pipeline_users_per_s']:,.0f} | {r['ratio']:.2f} | "
            f"{r['cpu_ratio']:.2f} |"
        )
    lines += [
        "",
        f"Median ratio **{result['median_ratio']:.2f}** (goal >= 0.50): the pipeline runs at "
        f"{result['median_pipeline_users_per_s']:,.0f} users/s against a matmul-only rate of "
        f"{result['median_matmul_gflops']:.1f} GFLOP/s. Table: {result['table_files']} files, "
        f"{result['table_bytes'] / 2**20:.1f} MiB. The machine ({result['cores']} cores) was shared with "
        "other work (load averages before each pipeline run in the table), so wall-clock rates move "
        "with the neighbours from one minute to the next; the CPU-time ratio (process CPU seconds of "
        f"the matmul over those of the pipeline, median **{result['median_cpu_ratio']:.2f}**) compares "
        "the work done and moves much less.",
    ]
    memory = result.get("memory")
    if memory:
        lines += [
            "",
            f"Memory: a run of {memory['users']:,} users x {memory['items']:,} items "
            f"({memory['seen_pairs']:,} seen pairs) writing {memory['sample_users']:,} users' tables peaked "
            f"at **{memory['peak_rss_gib']:.2f} GiB** RSS (isolated process; all user vectors, the whole "
            "seen-item matrix and one block's scores resident, as in a full run).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seen", type=int, default=20, help="seen items per user (masked)")
    parser.add_argument("--distance", default="dot", choices=["dot", "cosine", "euclidean"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-users", type=int, default=1_000_000, help="0 skips the memory check")
    parser.add_argument("--memory-sample", type=int, default=20_000)
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.child_memory:
        memory_child(args.child_memory, args.memory_sample, args.k)
        return
    result: dict[str, Any] = {
        "params": {
            k: getattr(args, k) for k in ("users", "items", "dim", "k", "seen", "distance", "rounds", "seed")
        },
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_at_start": load_average(),
    }
    result.update(throughput(args))
    if args.memory_users:
        result["memory"] = memory_check(args)
    result["load_at_end"] = load_average()
    result["markdown"] = to_markdown(result)
    print(result["markdown"])
    if not args.no_save:
        command = "python -m bench.batch_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"saved {save_result('batch', result, command.strip())}")


if __name__ == "__main__":
    main()
