"""Training throughput: our fused trainer against implicit's BPR on the same liked pairs.

Both train D = 64 factors (implicit: ``factors=63`` plus its item bias) with one negative per liked
pair. implicit's rate is ``nnz * iterations / fit seconds`` (its own sampling included); ours is
``pairs * negatives / epoch seconds`` from :func:`recsys_metric.train.fit` (negative sampling
included, validation excluded). Both sides evaluate Recall@20 on a random 20% per-user holdout
after every epoch/iteration block (not timed), which also gives the training time each needs to
reach BPR's best Recall@20.

Data: :func:`recsys_metric.data.synthetic.generate_log` in-process (taste clusters, Zipf
popularity); liked = rating >= 4.

    python -m bench.train_speed                          # 50k users x 20k items x 2M rows
    python -m bench.train_speed --rows 200000 --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.common import save_result
from bench.datasets import holdout_split
from recsys_metric.config import ModelConfig, TrainConfig
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.evaluate import evaluate_scores
from recsys_metric.model.towers import TwoTowerModel
from recsys_metric.train import TrainData, fit

logger = logging.getLogger(__name__)

DIM = 64


def make_data(rows: int, users: int, items: int, seed: int) -> tuple[InteractionMatrix, InteractionMatrix]:
    """Liked pairs of a generated log, cut into (train, test) by a random 20% per-user holdout."""
    from recsys_metric.data.synthetic import generate_log

    log = generate_log(users, items, rows, seed=seed, n_clusters=max(8, items // 500))
    frame = log.interactions
    liked = frame.filter(frame["rating"] >= 4.0)
    matrix = InteractionMatrix.from_pairs(
        liked["user_id"].to_numpy(), liked["item_id"].to_numpy(), users, items
    )
    return holdout_split(matrix, 0.2, 5, seed)


EVAL_USERS = 5000
"""Recall@20 is measured on a fixed random sample of this many test users (full ranking)."""


def eval_users(test: InteractionMatrix, seed: int) -> np.ndarray:
    users = np.flatnonzero(test.row_lengths() > 0)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=min(EVAL_USERS, users.size), replace=False))


def recall_at_20(score, train: InteractionMatrix, test: InteractionMatrix, users: np.ndarray) -> float:
    return evaluate_scores(score, train, test, ks=(20,), users=users)["recall@20"]


def run_bpr(
    train: InteractionMatrix, test: InteractionMatrix, iterations: list[int], threads: int, lr: float
):
    import scipy.sparse as sp
    from implicit.cpu.bpr import BayesianPersonalizedRanking
    from threadpoolctl import threadpool_limits

    x = sp.csr_matrix(
        (np.ones(train.nnz, dtype=np.float32), train.indices, train.indptr),
        shape=(train.n_users, train.n_items),
    )
    users = eval_users(test, 0)
    model = BayesianPersonalizedRanking(
        factors=DIM - 1,
        learning_rate=lr,
        regularization=0.01,
        iterations=1,
        random_state=0,
        num_threads=threads,
    )
    path, done, seconds = [], 0, 0.0
    for target in iterations:
        model.iterations = target - done
        with threadpool_limits(1, "blas"):
            t = time.perf_counter()
            model.fit(x, show_progress=False)
            seconds += time.perf_counter() - t
        done = target
        uf, itf = torch.from_numpy(model.user_factors), torch.from_numpy(model.item_factors)
        r = recall_at_20(lambda u, uf=uf, itf=itf: uf[torch.from_numpy(u)] @ itf.T, train, test, users)
        path.append({"iterations": done, "seconds": seconds, "recall@20": r})
        logger.info("BPR %d iterations: %.1f s, recall@20 %.4f", done, seconds, r)
    return {
        "samples_per_s": train.nnz * done / seconds,
        "seconds": seconds,
        "iterations": done,
        "path": path,
        "best_recall@20": max(p["recall@20"] for p in path),
    }


def run_ours(
    train: InteractionMatrix, test: InteractionMatrix, config: TrainConfig, model_config: ModelConfig
) -> dict[str, Any]:
    from recsys_metric import triplet_kernel

    data = TrainData.from_matrices(train)
    model = TwoTowerModel(train.n_users, train.n_items, model_config, seed=0)
    compile_seconds = None
    if config.kernel == "numba":
        # Compiled once per environment and cached on disk; reported apart, not in the epochs.
        compile_seconds = triplet_kernel.warm_up(model_config.distance, config.threads)
    users = eval_users(test, 0)

    def validate(m: TwoTowerModel) -> dict[str, float]:
        return {"recall@20": recall_at_20(lambda u: m.score(u), train, test, users)}

    result = fit(model, data, config, validate=validate, progress=False)
    path, seconds = [], 0.0
    for record in result.history:
        seconds += record["seconds"]
        path.append(
            {
                "epoch": record["epoch"],
                "seconds": seconds,
                "triplets_per_s": record["triplets_per_s"],
                "recall@20": record["metrics"].get("recall@20"),
            }
        )
    triplets = sum(r["triplets"] for r in result.history)
    later = result.history[1:] or result.history
    steady = sum(r["triplets"] for r in later) / sum(r["seconds"] for r in later)
    return {
        "compiled": result.compiled,
        "kernel": result.kernel,
        "kernel_warm_up_seconds": compile_seconds,
        "negatives": result.negatives,
        "triplets_per_s": triplets / seconds,
        "steady_triplets_per_s": steady,
        "first_epoch_seconds": result.history[0]["seconds"],
        "seconds": seconds,
        "epochs": len(result.history),
        "path": path,
        "best_recall@20": result.best_metric,
    }


VARIANTS: dict[str, dict[str, Any]] = {
    "numba": {"kernel": "numba", "threads": 1},
    "numba-2threads": {"kernel": "numba", "threads": 2},
    "torch": {"kernel": "torch", "compile": "off"},
    "torch-compiled": {"kernel": "torch", "compile": "on"},
    # Not a throughput row (its triplets are cheaper: one update per pair, k reads): the default
    # training config at D = 64, for the time it takes to reach BPR's best Recall@20.
    "numba-default-negatives": {"kernel": "numba", "threads": 1, "negatives": "auto"},
    # With the item-centric term (train.item_centric_weight 0.5, the default under a
    # user_holdout split; this benchmark trains as for a temporal one): what the term costs.
    "numba-item-term": {"kernel": "numba", "threads": 1, "item_centric_weight": 0.5},
}
"""Our trainers: ``TrainConfig`` overrides by name."""


def time_to_reach(path: list[dict[str, Any]], target: float) -> float | None:
    for point in path:
        if point["recall@20"] is not None and point["recall@20"] >= target:
            return point["seconds"]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000, help="interaction rows to generate")
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="our threads (train.threads) where the variant sets none"
    )
    parser.add_argument("--bpr-threads", type=int, default=2, help="implicit's threads")
    parser.add_argument("--epochs", type=int, default=15, help="our epochs")
    parser.add_argument("--bpr-iterations", type=str, default="10,20,40,70,100", help="BPR evaluation points")
    parser.add_argument("--bpr-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="our train.lr (fixed: train.lr auto would train once per candidate rate)",
    )
    parser.add_argument("--negatives", type=int, default=1, help="our negatives per pair (1 = like BPR)")
    parser.add_argument("--weighting", default=None, help="train.negative_weighting (default: the config's)")
    parser.add_argument("--distance", default="euclidean")
    parser.add_argument(
        "--variants",
        default="numba,numba-2threads,torch,numba-default-negatives,numba-item-term",
        help=f"our trainers to run, comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--quick", action="store_true", help="few epochs and iterations")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/train_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    t = time.perf_counter()
    train, test = make_data(args.rows, args.users, args.items, args.seed)
    logger.info("data: %d train / %d test liked pairs (%.1f s)", train.nnz, test.nnz, time.perf_counter() - t)
    iterations = [int(x) for x in args.bpr_iterations.split(",")]
    epochs = args.epochs
    if args.quick:
        iterations, epochs = iterations[:2], min(epochs, 3)

    overrides: dict[str, Any] = {
        "negatives": args.negatives,
        "epochs": epochs,
        "patience": epochs,
        "device": "cpu",
        "threads": args.threads,
    }
    for key, value in (
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("negative_weighting", args.weighting),
    ):
        if value:
            overrides[key] = value
    model_config = ModelConfig(dim=DIM, distance=args.distance)

    ours: dict[str, Any] = {}
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}: use {', '.join(VARIANTS)}")
        config = TrainConfig(**{**overrides, **VARIANTS[variant]})
        ours[variant] = run_ours(train, test, config, model_config)
        o = ours[variant]
        o["threads"] = config.threads
        logger.info(
            "ours (%s): %.2fM triplets/s over all epochs, %.2fM after the first; best recall@20 %.4f",
            variant,
            o["triplets_per_s"] / 1e6,
            o["steady_triplets_per_s"] / 1e6,
            o["best_recall@20"],
        )
    bpr = run_bpr(train, test, iterations, args.bpr_threads, args.bpr_lr)
    target = bpr["best_recall@20"]
    result: dict[str, Any] = {
        "data": {
            "rows": args.rows,
            "users": args.users,
            "items": args.items,
            "train_pairs": train.nnz,
            "test_pairs": test.nnz,
        },
        "threads": {"ours": args.threads, "bpr": args.bpr_threads},
        "train_config": TrainConfig(**overrides).model_dump(mode="json"),
        "model_config": model_config.model_dump(mode="json"),
        "bpr": bpr,
        "ours": ours,
        "bpr_best_recall@20": target,
    }
    print(
        f"implicit BPR ({args.bpr_threads} threads): {bpr['samples_per_s'] / 1e6:.2f}M samples/s, best recall@20 {target:.4f}"
    )
    for variant, o in ours.items():
        o["throughput_ratio"] = o["triplets_per_s"] / bpr["samples_per_s"]
        o["seconds_to_bpr_best"] = time_to_reach(o["path"], target)
        print(
            f"ours {variant} ({o['threads']} thread(s), compiled={o['compiled']}): "
            f"{o['triplets_per_s'] / 1e6:.2f}M triplets/s (ratio {o['throughput_ratio']:.2f}; "
            f"{o['steady_triplets_per_s'] / 1e6:.2f}M after epoch 1), best recall@20 {o['best_recall@20']:.4f}, "
            f"seconds to BPR's best: {o['seconds_to_bpr_best']} (BPR: {time_to_reach(bpr['path'], target)})"
        )
    result["markdown"] = to_markdown(result)
    if not args.no_save:
        path = save_result(
            "train_speed", result, "python -m bench.train_speed " + " ".join(argv or sys.argv[1:])
        )
        print(f"wrote {path}")
    return 0


def _secs(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f} s"


def to_markdown(r: dict) -> str:
    """The BENCHMARKS.md table of one run (also used to re-render a saved result)."""
    bpr, d = r["bpr"], r["data"]
    goal = 1.0
    lines = [
        f"{d['train_pairs']:,} liked pairs ({d['users']:,} users x {d['items']:,} items, synthetic), D = "
        f"{r['model_config']['dim']}, {r['train_config']['negatives']} negative(s); implicit BPR with "
        f"{r['threads']['bpr']} threads. Ours: `numba` is the compiled per-triplet loop "
        "(`train.kernel: numba`, the default on CPU; 1 thread: deterministic, and a second thread draws the "
        "negatives meanwhile), `numba-2threads` the same loop on 2 lock-free threads (Hogwild!), `torch` the "
        "batched tensor step (the CUDA path), all with the triplet hinge alone (the default under a "
        "temporal split); `numba-item-term` the 1-thread loop with the item-centric term "
        "(`train.item_centric_weight: 0.5`, the default under a user_holdout split); "
        "`numba-default-negatives` the default training config "
        "(`negatives: auto`, hardest of k) at D = 64, whose triplets are cheaper (k reads, one update per "
        "pair), so its rate is not a throughput figure: it is here for the time to reach BPR's best.",
        "",
        "| trainer | samples or triplets / s | ratio to BPR | best Recall@20 | seconds to BPR's best |",
        "|---|---:|---:|---:|---:|",
        f"| implicit BPR | {bpr['samples_per_s'] / 1e6:.2f} M | 1.00 | {bpr['best_recall@20']:.4f} | "
        f"{_secs(time_to_reach(bpr['path'], r['bpr_best_recall@20']))} |",
    ]
    for variant, o in r["ours"].items():
        ratio = o["triplets_per_s"] / bpr["samples_per_s"]
        k = o.get("negatives", r["train_config"]["negatives"])
        if k == 1:
            ratio_cell = f"{ratio:.2f} ({'met' if ratio >= goal else 'NOT met'}: goal {goal:.1f})"
        else:
            ratio_cell = f"({ratio:.2f}: {k} negatives, not comparable)"
        lines.append(
            f"| ours, {variant} ({k} negative{'s' if k != 1 else ''}) | {o['triplets_per_s'] / 1e6:.2f} M "
            f"({o['steady_triplets_per_s'] / 1e6:.2f} M after epoch 1) | {ratio_cell} | "
            f"{o['best_recall@20']:.4f} | {_secs(o.get('seconds_to_bpr_best'))} |"
        )
    warm = {v: o["kernel_warm_up_seconds"] for v, o in r["ours"].items() if o.get("kernel_warm_up_seconds")}
    if warm:
        lines += [
            "",
            "Before each numba row, not in its time: compiling the loops or loading them from numba's disk "
            "cache, " + ", ".join(f"{v} {s:.1f} s" for v, s in warm.items()) + " (a fresh environment "
            "compiles once, 15-30 s per metric on this machine).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
