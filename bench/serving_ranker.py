"""The exact ranker in numpy (queries, no torch) against the torch one, on batch-table blocks.

Top-100 for ``--users`` random users over 100,000 random items, D = 64, 20 seen items per user
masked, in blocks of the batch writer's size; both rankers through the same engine (candidates,
masking, canonical scores), alternately, two rounds, for ``dot`` and ``euclidean``. Reported:
process CPU seconds and wall seconds per round (the machine is shared: CPU time compares the
work, wall time moves with the neighbours), the load average, and whether both return the same
items (they must).

    python -m bench.serving_ranker --users 4026
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from recsys_metric.serving.ranking import _block_users, _Engine, _Exclusions
from recsys_metric.serving.torch_ranking import TorchRanker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4026)
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dim, k = 64, 100
    items = rng.standard_normal((args.items, dim), dtype=np.float32)
    users = rng.standard_normal((args.users, dim), dtype=np.float32)
    seen = np.sort(rng.integers(0, args.items, (args.users, 20)), axis=1)
    block = _block_users(args.items)
    for distance in ("dot", "euclidean"):
        engines = {"numpy": _Engine(items, distance, "cpu"), "torch": _Engine(items, distance, "cpu")}
        engines["torch"].ranker = TorchRanker(items, distance, torch.device("cpu"))
        answers: dict[str, np.ndarray] = {}
        for rnd in range(2):
            for name, engine in engines.items():
                buffer = engine.ranker.buffer(block)
                load = os.getloadavg()[0]
                cpu0, wall0 = time.process_time(), time.perf_counter()
                found = []
                for start in range(0, args.users, block):
                    exclusions = _Exclusions.of_rows([np.unique(r) for r in seen[start : start + block]])
                    found.append(engine.rank(users[start : start + block], k, exclusions, None, buffer)[0])
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
                answers[name] = np.concatenate(found)
                print(
                    f"{distance} round {rnd} {name}: CPU {cpu:.2f} s, wall {wall:.2f} s, load {load:.2f}",
                    flush=True,
                )
        print(f"{distance}: same items from both: {np.array_equal(answers['numpy'], answers['torch'])}")


if __name__ == "__main__":
    main()
