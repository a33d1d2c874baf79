"""Training speed with item features against the same run without them (issue 18's 2x goal).

Per dataset, in one process and interleaved (ids, features, ids, features, ...: the machine's load
hits both alike): the same data (every liked pair), the same config (default, ``train.lr`` fixed
so that both make one fit, no validation) and the same number of epochs, once with
``model.item_features`` (citeulike-a: ``tags`` from ``item-tag.dat``; ml-latest-small: ``genres``
and ``tags``) and once without. Reported per variant: epoch seconds (median of the epochs after the
first, which pays numba's compile or cache load), whole-fit wall and process CPU seconds, and the
features/ids ratios; the load average before and after.

``--tensor`` adds the tensor feature step (``train.kernel: torch``, the path before the kernel).

    python -m bench.feature_speed                           # both datasets, 5 epochs, 2 rounds
    python -m bench.feature_speed --datasets citeulike-a --epochs 3 --rounds 1 --tensor

Results: ``bench/results/feature_speed.json``. Datasets as ``bench.cold_start`` reads them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from bench.cold_start import DATASETS, LOADERS
from bench.common import save_result
from bench.datasets import DatasetUnavailable


def fit_once(data: Any, variant: str, epochs: int, lr: float) -> dict[str, Any]:
    from recsys_metric.config import config_from_dict
    from recsys_metric.data.matrix import InteractionMatrix
    from recsys_metric.model.features import ItemFeatureTensors
    from recsys_metric.model.towers import TwoTowerModel
    from recsys_metric.train import TrainData, fit

    liked = InteractionMatrix.from_pairs(data.users, data.items, data.n_users, data.n_items)
    seen = InteractionMatrix.from_pairs(data.seen_users, data.seen_items, data.n_users, data.n_items)
    columns = () if variant == "ids" else data.features
    kernel = "torch" if variant == "tensor" else "auto"
    config = config_from_dict(
        {"model": {"item_features": list(columns)}, "train": {"epochs": epochs, "lr": lr, "kernel": kernel}}
    )
    features = (
        ItemFeatureTensors.from_frame(data.items_table, np.arange(data.n_items), columns) if columns else None
    )
    model = TwoTowerModel(data.n_users, data.n_items, config.model, item_features=features, seed=0)
    cpu, wall = time.process_time(), time.perf_counter()
    result = fit(model, TrainData.from_matrices(liked, seen=seen), config.train, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    epoch_seconds = [float(h["seconds"]) for h in result.history]
    return {
        "kernel": result.kernel,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds],
        "epoch_median_after_first": round(statistics.median(epoch_seconds[1:] or epoch_seconds), 3),
        "fit_wall": round(wall, 2),
        "fit_cpu": round(cpu, 2),
        "last_loss": round(float(result.history[-1]["loss"]), 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each variant")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--tensor", action="store_true", help="also the tensor feature step (slow)")
    parser.add_argument("--out", default="feature_speed")
    args = parser.parse_args(argv)
    variants = ["ids", "features"] + (["tensor"] if args.tensor else [])
    results: dict[str, Any] = {"datasets": {}, "skipped": {}, "load_before": os.getloadavg()}
    for name in args.datasets:
        try:
            data = LOADERS[name]()
        except DatasetUnavailable as err:
            results["skipped"][name] = str(err)
            continue
        # A throwaway epoch of each variant first: numba compiles or loads its cache there.
        for variant in variants:
            fit_once(data, variant, 1, args.lr)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(args.rounds):
            for variant in variants:
                runs[variant].append(fit_once(data, variant, args.epochs, args.lr))
                print(name, variant, runs[variant][-1], os.getloadavg(), file=sys.stderr)

        def total(variant: str, key: str, runs: dict[str, list[dict[str, Any]]] = runs) -> float:
            return sum(r[key] for r in runs[variant])

        summary = {
            "runs": runs,
            "ratio_epoch": round(
                statistics.median(r["epoch_median_after_first"] for r in runs["features"])
                / statistics.median(r["epoch_median_after_first"] for r in runs["ids"]),
                2,
            ),
            "ratio_fit_wall": round(total("features", "fit_wall") / total("ids", "fit_wall"), 2),
            "ratio_fit_cpu": round(total("features", "fit_cpu") / total("ids", "fit_cpu"), 2),
        }
        results["datasets"][name] = summary
        print(name, {k: v for k, v in summary.items() if k != "runs"}, file=sys.stderr)
    results["load_after"] = os.getloadavg()
    command = "python -m bench.feature_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    save_result(args.out, results, command)
    print(json.dumps(results, default=str))
    return results


if __name__ == "__main__":
    main()
