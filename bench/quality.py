"""Quality benchmark: recsys-metric against popularity, implicit's BPR and ALS, and EASE.

For each dataset: one split (:mod:`bench.datasets`), one evaluator
(``recsys_metric.evaluate.evaluate_scores``: full ranking over the catalog, training items
excluded), one row per model. Peers are tuned on a validation split of the training data and
refitted on all of it (:mod:`bench.baselines`); the test set is only ever used for the final
figures. Training items of any label are excluded from the ranking (as in the pipeline); where
a dataset has non-liked training interactions (ml-latest-small, bundled) a second Recall / NDCG@20
excludes only the liked training items, the protocol behind the shared datasets README's
reference figures, so that the two can be compared. Results go to
``bench/results/quality.json`` (every metric at K = 10, 20, 50, the grids, wall times, and a
``markdown`` key with the tables).

    python -m bench.quality                                   # every dataset present, full grids
    python -m bench.quality --datasets ml-latest-small --quick  # one setting per peer, no tuning;
                                                              # writes quality_quick.json
    python -m bench.quality --no-ours                         # peers only

Real datasets are read from ``../shared/datasets``; a dataset whose files are absent is skipped
and the output says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.baselines import (
    ALS_GRID,
    BPR_GRID,
    EASE_GRID,
    QUICK_GRIDS,
    ROW_NAMES,
    SELECTION_METRIC,
    ScoreFn,
    SkipBaseline,
    popularity,
    tune,
)
from bench.common import save_result
from bench.datasets import LOADERS, BenchDataset, DatasetUnavailable
from recsys_metric.evaluate import evaluate_scores

logger = logging.getLogger("bench.quality")

KS = (10, 20, 50)
OURS = "recsys-metric (default config)"
PEERS = tuple(ROW_NAMES.values())
REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    "ml-latest-small": {
        "popularity": (0.171, 0.149),
        "implicit BPR (best)": (0.234, 0.195),
        "implicit ALS (best)": (0.274, 0.230),
        "EASE (best)": (0.309, 0.270),
    },
    "citeulike-a": {
        "popularity": (0.020, 0.014),
        "implicit BPR (best)": (0.188, 0.140),
        "implicit ALS (best)": (0.331, 0.258),
        "EASE (best)": (0.323, 0.254),
    },
}
"""Recall@20 / NDCG@20 from the shared datasets README (EASE there: lambda = 250)."""


def _ours(data: BenchDataset) -> tuple[ScoreFn, dict[str, Any]]:
    """Train the project's two-tower model with its default config.

    Early stopping runs on a validation split of the training data (the peers' split), never on the
    test set. As for the peers, the setting chosen there (the best epoch) is then refitted on the
    whole training set when ``TrainConfig.refit`` is on (the default).

    Raises:
        SkipBaseline: the trainer modules are not importable.
    """
    try:
        from recsys_metric.config import ModelConfig, TrainConfig
        from recsys_metric.model.towers import TwoTowerModel
        from recsys_metric.pipeline import model_score_fn
        from recsys_metric.train import TrainData, fit
    except ImportError as err:
        raise SkipBaseline(f"recsys-metric trainer not available ({err})") from None

    model_config, config = ModelConfig(), TrainConfig()
    explicit_share = TrainConfig().explicit_share

    def train_data(part: BenchDataset) -> TrainData:
        return TrainData.from_matrices(part.train_liked, seen=part.train, dislikes=part.train_disliked)

    val = data.validation_split()

    def validate(model: TwoTowerModel) -> dict[str, float]:
        return evaluate_scores(model_score_fn(model), val.train, val.test, ks=KS)

    model = TwoTowerModel(data.n_users, data.n_items, model_config, seed=config.seed)
    result = fit(
        model, train_data(val), config, explicit_share=explicit_share, validate=validate, progress=False
    )
    info: dict[str, Any] = {
        "params": f"defaults; best epoch {result.best_epoch} of {result.epochs_run} on validation",
        "validation": {"recall@20": round(float(result.best_metric or 0.0), 5)},
        "device": result.device,
    }
    if config.refit and result.best_epoch:
        model = TwoTowerModel(data.n_users, data.n_items, model_config, seed=config.seed)
        fit(
            model,
            train_data(data),
            config,
            explicit_share=explicit_share,
            epochs=result.best_epoch,
            progress=False,
        )
        info["params"] += ", refitted on all training data"
    return model_score_fn(model), info


def _metrics(score_fn: ScoreFn, data: BenchDataset) -> dict[str, float]:
    return evaluate_scores(score_fn, data.train, data.test, ks=KS)


def run_dataset(data: BenchDataset, *, quick: bool, ours: bool) -> dict[str, Any]:
    """Every row on one dataset: test metrics, chosen settings, grids and seconds."""
    t_start = time.perf_counter()
    grids = QUICK_GRIDS if quick else {"bpr": BPR_GRID, "als": ALS_GRID, "ease": EASE_GRID}
    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    fitted: dict[str, ScoreFn] = {}

    t = time.perf_counter()
    fitted["popularity"] = popularity(data.train_liked)
    rows["popularity"] = {
        "params": "liked-pair counts in training",
        "seconds": {"fit": round(time.perf_counter() - t, 2)},
    }

    for kind in ("bpr", "als", "ease"):
        try:
            tuned = tune(kind, data, grids[kind], ks=KS)
        except SkipBaseline as err:
            skipped[ROW_NAMES[kind]] = str(err)
            logger.info("%s: %s", data.name, err)
            continue
        fitted[tuned.name] = tuned.score_fn
        rows[tuned.name] = {
            "params": tuned.params,
            "validation": {
                k: round(v, 5) for k, v in tuned.validation.items() if k.startswith(("recall", "ndcg"))
            },
            "grid": tuned.grid,
            "seconds": tuned.seconds,
        }
        logger.info("%s: %s %s in %s s", data.name, tuned.name, tuned.params, tuned.seconds)

    if ours:
        t = time.perf_counter()
        try:
            score_fn, info = _ours(data)
        except SkipBaseline as err:
            skipped[OURS] = str(err)
            logger.info("%s: %s", data.name, err)
        else:
            fitted[OURS] = score_fn
            rows[OURS] = {**info, "seconds": {"fit": round(time.perf_counter() - t, 2)}}

    liked_only = data.train.nnz != data.train_liked.nnz
    for name, score_fn in fitted.items():
        rows[name]["test"] = {k: round(v, 5) for k, v in _metrics(score_fn, data).items()}
        if liked_only:
            # The protocol of the README reference figures (module docstring).
            res = evaluate_scores(score_fn, data.train_liked, data.test, ks=(20,))
            rows[name]["test_exclude_liked_only"] = {k: round(res[k], 5) for k in ("recall@20", "ndcg@20")}
    return {
        "summary": data.summary(),
        "rows": rows,
        "skipped": skipped,
        "ratio_ours_best_peer": _ratio(rows),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }


def _ratio(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    peers = [name for name in PEERS if name in rows]
    if OURS not in rows or not peers:
        return None
    out: dict[str, Any] = {}
    for metric in ("recall@20", "ndcg@20"):
        best = max(peers, key=lambda name: rows[name]["test"][metric])
        out[metric] = {
            "best_peer": best,
            "ratio": round(rows[OURS]["test"][metric] / rows[best]["test"][metric], 3),
        }
    return out


def _fmt_params(params: Any) -> str:
    if isinstance(params, dict):
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return str(params)


def to_markdown(results: dict[str, dict[str, Any]], skipped_datasets: dict[str, str], quick: bool) -> str:
    """The tables of BENCHMARKS.md: one per dataset, then the comparison with the reference figures."""
    if quick:
        header = "Quick run: one fixed setting per peer (bench.baselines.QUICK_GRIDS), no tuning."
    else:
        header = f"Full grids (bench.baselines), setting chosen by {SELECTION_METRIC} on a validation split of train."
    lines = [header]
    for name, res in results.items():
        s = res["summary"]
        lines += [
            "",
            f"### {name}",
            "",
            f"{s['n_users']:,} users x {s['n_items']:,} items; {s['n_train']:,} training interactions "
            f"({s['n_train_liked']:,} liked), {s['n_test']:,} test items for {s['n_test_users']:,} users; {s['split']}. "
            f"Wall time {res['wall_seconds']:.0f} s.",
            "",
            "| model | Recall@20 | NDCG@20 | Recall@10 | Recall@50 | setting | seconds (tune + fit) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row, r in res["rows"].items():
            m = r["test"]
            secs = r["seconds"]
            secs_txt = (
                f"{secs.get('tune', 0):.0f} + {secs['fit']:.0f}" if "tune" in secs else f"{secs['fit']:.1f}"
            )
            lines.append(
                f"| {row} | {m['recall@20']:.3f} | {m['ndcg@20']:.3f} | {m['recall@10']:.3f} | {m['recall@50']:.3f} "
                f"| {_fmt_params(r['params'])} | {secs_txt} |"
            )
        for what, why in res["skipped"].items():
            lines.append(f"| {what} | - | - | - | - | {why} | - |")
        if res["ratio_ours_best_peer"]:
            parts = [
                f"{metric}: {v['ratio']:.2f} x {v['best_peer']}"
                for metric, v in res["ratio_ours_best_peer"].items()
            ]
            lines += ["", "Ours / best peer: " + "; ".join(parts) + "."]
    ref_rows = []
    for name, res in results.items():
        for row, (rec, ndcg) in REFERENCE.get(name, {}).items():
            if row not in res["rows"]:
                continue
            m = res["rows"][row]["test"]
            alt = res["rows"][row].get("test_exclude_liked_only")
            alt_txt = f"{alt['recall@20']:.3f} / {alt['ndcg@20']:.3f}" if alt else "same"
            ref_rows.append(
                f"| {name} | {row} | {rec:.3f} / {ndcg:.3f} | {m['recall@20']:.3f} / {m['ndcg@20']:.3f} | {alt_txt} |"
            )
    if ref_rows:
        lines += [
            "",
            "### Against the reference figures of the shared datasets README (Recall@20 / NDCG@20)",
            "",
            "| dataset | model | reference | this run | this run, only liked training items excluded |",
            "|---|---|---|---|---|",
            *ref_rows,
        ]
    for name, why in skipped_datasets.items():
        lines += ["", f"{name}: skipped ({why})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets",
        default=",".join(LOADERS),
        help=f"comma-separated subset of {', '.join(LOADERS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="one setting per peer instead of the grids")
    parser.add_argument("--no-ours", action="store_true", help="peers only (skip the recsys-metric row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(LOADERS)}")

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        loader: Callable[[], BenchDataset] = LOADERS[name]
        try:
            data = loader()
        except DatasetUnavailable as err:
            skipped[name] = str(err)
            print(f"SKIP {name}: {err}", file=sys.stderr, flush=True)
            continue
        logger.info("%s: %s", name, data.summary())
        results[name] = run_dataset(data, quick=args.quick, ours=not args.no_ours)
        logger.info("%s done in %.0f s", name, results[name]["wall_seconds"])

    markdown = to_markdown(results, skipped, args.quick)
    print(markdown)
    command = "python -m bench.quality" + (
        f" {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    )
    payload = {
        "quick": args.quick,
        "ks": list(KS),
        "grids": QUICK_GRIDS if args.quick else {"bpr": BPR_GRID, "als": ALS_GRID, "ease": EASE_GRID},
        "datasets": results,
        "skipped_datasets": skipped,
        "markdown": markdown,
    }
    # Quick runs keep to their own file so that they never replace the full grid's figures.
    path = save_result("quality_quick" if args.quick else "quality", payload, command)
    print(f"wrote {path}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
