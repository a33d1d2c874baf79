"""Full-ranking evaluation against the machine's own score-matmul rate.

:func:`recsys_metric.evaluate.evaluate_scores` ranks every evaluated user against the whole
catalog: score, mask the user's training items and the items outside the candidate mask, select
the top K with the deterministic tie rule, then count Recall/NDCG/MAP/HitRate/coverage. Beside
it, in the same process and in alternation, a plain ``torch.mm`` of the same shapes
(``[batch, D] x [D, n_items]`` into a reused output, for every batch of users) gives what the
product alone costs right now. The evaluation's score function is that same product (a new
tensor per batch, as ``pipeline.model_score_fn`` returns), so the difference is the evaluator.

    ratio = matmul seconds / evaluation seconds   (1.0: evaluation costs nothing beyond the product)

and, less sensitive to the neighbours' load on a shared machine, the same ratio of process CPU
seconds. Issue 16 measured 0.22 (24 s against 5 s for 20,000 users x 41k items) and asks for
at least 0.5, the rate the batch tables reach.

Data: random normal vectors (D = 64, dot distance), ``--seen`` training items and ``--relevant``
test items per user drawn uniformly, 2% of the items outside the candidate mask; K = 10, 20, 50.

    python -m bench.eval_speed                               # 20k users x 41k items, 3 rounds
    python -m bench.eval_speed --users 4000 --rounds 1 --no-save   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.common import save_result
from recsys_metric.data.matrix import InteractionMatrix
from recsys_metric.evaluate import ScoresInto, evaluate_scores


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def matmul_seconds(users: torch.Tensor, items_t: torch.Tensor, batch: int) -> tuple[float, float]:
    """Wall and process CPU seconds of ``[batch, D] x [D, n_items]`` over all users, output reused."""
    out = torch.empty((batch, items_t.shape[1]), dtype=users.dtype)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for first in range(0, users.shape[0], batch):
            q = users[first : first + batch]
            torch.mm(q, items_t, out=out[: q.shape[0]])
    return time.perf_counter() - wall, time.process_time() - cpu


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    n_users, n_items = args.users, args.items
    seen_users = np.repeat(np.arange(n_users), args.seen)
    test_users = np.repeat(np.arange(n_users), args.relevant)
    mask = rng.random(n_items) >= 0.02
    return {
        "users": torch.from_numpy(rng.standard_normal((n_users, args.dim), dtype=np.float32)),
        "items": torch.from_numpy(rng.standard_normal((n_items, args.dim), dtype=np.float32)),
        "train": InteractionMatrix.from_pairs(
            seen_users, rng.integers(0, n_items, seen_users.size), n_users, n_items
        ),
        "test": InteractionMatrix.from_pairs(
            test_users, rng.integers(0, n_items, test_users.size), n_users, n_items
        ),
        "mask": mask,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = make_data(args)
    users, items = data["users"], data["items"]
    items_t = items.T

    def score(nums: np.ndarray) -> torch.Tensor:
        return users[torch.from_numpy(nums)] @ items_t

    def score_into(nums: np.ndarray, out: torch.Tensor) -> None:
        torch.mm(users[torch.from_numpy(nums)], items_t, out=out)

    scorers = {"new": score, "into": ScoresInto(score_into, items.shape[0])}

    def evaluate(kind: str) -> dict[str, float]:
        return evaluate_scores(
            scorers[kind],
            data["train"],
            data["test"],
            ks=(10, 20, 50),
            candidate_mask=data["mask"],
            batch_size=args.batch,
        )

    matmul_seconds(users[: args.batch], items_t, args.batch)
    rounds = []
    for r in range(args.rounds):
        load_mm = load_average()
        mm, mm_cpu = matmul_seconds(users, items_t, args.batch)
        row: dict[str, Any] = {
            "round": r + 1,
            "load_before_matmul": load_mm,
            "matmul_seconds": round(mm, 3),
            "matmul_cpu_seconds": round(mm_cpu, 3),
        }
        results = []
        for kind in args.scorers:
            row[f"load_before_{kind}"] = load_average()
            wall, cpu = time.perf_counter(), time.process_time()
            results.append(evaluate(kind))
            ev, ev_cpu = time.perf_counter() - wall, time.process_time() - cpu
            row[f"{kind}_seconds"] = round(ev, 3)
            row[f"{kind}_ratio"] = round(mm / ev, 3)
            row[f"{kind}_cpu_seconds"] = round(ev_cpu, 3)
            row[f"{kind}_cpu_ratio"] = round(mm_cpu / ev_cpu, 3)
        # Both scorers give the same floats (one BLAS product), so every metric must agree exactly.
        if any(other != results[0] for other in results[1:]):
            raise AssertionError(f"the scorers' metrics differ: {results}")
        row["users_evaluated"] = results[0]["n_users"]
        rounds.append(row)
        print(row, file=sys.stderr)
    summary: dict[str, Any] = {"rounds": rounds}
    for kind in args.scorers:
        for key in ("ratio", "cpu_ratio", "seconds"):
            summary[f"median_{kind}_{key}"] = round(statistics.median(x[f"{kind}_{key}"] for x in rounds), 3)
    return summary


SCORER_NAMES = {
    "new": "plain score function (a new tensor per batch)",
    "into": "`ScoresInto` (writes into the evaluator's buffer; what `pipeline.model_score_fn` returns)",
}


def to_markdown(r: dict[str, Any]) -> str:
    p = r["params"]
    kinds = p["scorers"]
    lines = [
        f"`evaluate_scores` on {p['users']:,} users x {p['items']:,} items, D = {p['dim']}, dot scores, "
        f"{p['seen']} training items and {p['relevant']} test items per user, 2% of the items outside the "
        f"candidate mask, K = 10/20/50, batches of {p['batch']} users, torch threads: {r['torch_threads']}. "
        "Matmul = plain `torch.mm` of the same shapes into a reused output, measured alternately with "
        "the evaluations in the same process. Evaluated two ways, the same metrics to the last digit: "
        + "; ".join(f"**{k}** = {SCORER_NAMES[k]}" for k in kinds)
        + ".",
        "",
        "| round | load (1/5/15 min) | matmul s | "
        + " | ".join(f"{k} s | {k} ratio | {k} CPU ratio" for k in kinds)
        + " |",
        "|---|---|---:|" + "---:|---:|---:|" * len(kinds),
    ]
    for x in r["rounds"]:
        cells = " | ".join(
            f"{x[f'{k}_seconds']:.2f} | {x[f'{k}_ratio']:.2f} | {x[f'{k}_cpu_ratio']:.2f}" for k in kinds
        )
        lines.append(f"| {x['round']} | {x['load_before_matmul']} | {x['matmul_seconds']:.2f} | {cells} |")
    lines += [
        "",
        "Median ratio (matmul seconds / evaluation seconds): "
        + ", ".join(
            f"{k} **{r[f'median_{k}_ratio']:.2f}** (CPU time **{r[f'median_{k}_cpu_ratio']:.2f}**)"
            for k in kinds
        )
        + ". Goal >= 0.50; issue 16 measured 0.22 before this change. The wall-clock ratio moves with the "
        "neighbours' load on this shared machine; the CPU-time ratio compares the work done.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=41_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seen", type=int, default=28, help="training items per user (masked)")
    parser.add_argument("--relevant", type=int, default=5, help="test items per user")
    parser.add_argument("--batch", type=int, default=1024, help="users per batch (evaluate_scores' default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scorers", nargs="+", default=["new", "into"], choices=sorted(SCORER_NAMES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "params": {
            k: getattr(args, k)
            for k in ("users", "items", "dim", "seen", "relevant", "batch", "rounds", "scorers")
        },
        "torch_threads": torch.get_num_threads(),
        "load_at_start": load_average(),
    }
    result.update(run(args))
    result["load_at_end"] = load_average()
    result["markdown"] = to_markdown(result)
    print(result["markdown"])
    if not args.no_save:
        command = "python -m bench.eval_speed " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"saved {save_result('eval_speed', result, command.strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
