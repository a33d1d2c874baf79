"""Time to quality: holdout Recall@20 against wall-clock seconds, ours at time budgets beside the peers.

For every dataset, one split and one evaluator (those of :mod:`bench.quality`: a seeded random 20%
of each user's liked items held out, full ranking over the catalog, training items excluded,
``recsys_metric.evaluate.evaluate_scores``):

- **ours**: the default configuration run once per time budget (``--budgets``, default 1, 2, 5 and
  15 minutes) by :func:`ours_at_budget`, which sets ``train.time_budget`` through the config and
  trains through :func:`bench.quality._ours`, whose holdout fit and refit are planned by the
  pipeline's own :class:`~recsys_metric.training.run_budget.RunPlan` (the reserve for the stages
  after training kept). The point's x is the measured wall time of the whole fit (validation fit
  with early stopping and the refit); a budget whose run ended before the budget stopped anything
  is recorded as the same run as the smaller budget, not trained again; ``--default`` adds a run
  with no budget (``train.time_budget: none``).
- **pipeline**: on the generated logs, ``recsys-metric run`` itself (:data:`PIPELINE_RUNS`, no
  config file) in a fresh process: wall time and peak RSS of the whole run, prepare to publish.
- **peers**: implicit's ALS and BPR over a grid (:data:`GRIDS`; ``--quick``: :data:`QUICK_GRIDS`).
  Each grid point is one full fit on the training set; its x is that fit's seconds (evaluation
  excluded; a point with more iterations continues the same run, and its seconds are cumulative,
  which is what fitting it from scratch costs). The line is each peer's frontier: the best test
  Recall@20 any of its settings reached within that many seconds. That frontier picks settings
  on the test set itself, so it is an upper bound of what a tuned peer reaches: a bar in the
  peers' favour.

Datasets: ``ml-latest-small`` and ``citeulike-a`` (read from ``../shared/datasets``, skipped
when absent), ``gen-1m`` (a generated log of 1M interactions, 30,000 users x 40,000 items) and
``gen-20m`` (the generated 20M log of ``bench.nightly_scale``: 1M users x 100,000 items). The
generated logs are explicit ratings: liked = rating >= 4, as for MovieLens; they are written once
under ``bench/out/`` and reused.

    python -m bench.time_to_quality                                  # everything (hours, a quiet machine)
    python -m bench.time_to_quality --datasets ml-latest-small citeulike-a gen-1m --budgets 1m 2m 5m --quick

Results: ``bench/results/time_to_quality.json`` (every point) and ``time_to_quality.png`` (the
plot); ``python -m bench.report`` puts the table into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from bench.baselines import _grid_points, implicit_path
from bench.common import RESULTS, save_result
from bench.datasets import LOADERS, BenchDataset, DatasetUnavailable, _labels, random_split_dataset

logger = logging.getLogger("bench.time_to_quality")

KS = (20,)
DEFAULT_BUDGETS = ("1m", "2m", "5m", "15m")
GENERATED: dict[str, tuple[int, int, int]] = {
    "gen-1m": (1_000_000, 30_000, 40_000),
    "gen-20m": (20_000_000, 1_000_000, 100_000),
}
"""Generated dataset -> (interactions, users, items); seed 0."""
DATASETS = ("ml-latest-small", "citeulike-a", "gen-1m", "gen-20m")

GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "als": {
        "factors": (64, 128, 256),
        "regularization": (0.01, 0.1, 1.0),
        "alpha": (5.0, 10.0, 20.0, 40.0),
        "iterations": (5, 15, 30),
    },
    "bpr": {
        "factors": (64, 128),
        "learning_rate": (0.003, 0.01, 0.03),
        "regularization": (0.001, 0.01),
        "iterations": (50, 100, 300),
    },
}
"""The quality benchmark's grids (``bench.baselines``), with alpha 40 (the best ALS on the 20M log)
and shorter fits added: a time-to-quality curve needs its fast points too."""
QUICK_GRIDS: dict[str, dict[str, Sequence[Any]]] = {
    "als": {
        "factors": (64, 256),
        "regularization": (0.1,),
        "alpha": (5.0, 20.0, 40.0),
        "iterations": (5, 15),
    },
    "bpr": {
        "factors": (128,),
        "learning_rate": (0.01, 0.03),
        "regularization": (0.01,),
        "iterations": (50, 100),
    },
}
DATASET_GRIDS: dict[str, dict[str, dict[str, Sequence[Any]]]] = {
    "gen-1m": {
        "als": {
            "factors": (64, 128),
            "regularization": (0.1, 1.0),
            "alpha": (5.0, 20.0, 40.0),
            "iterations": (5, 15, 30),
        },
        "bpr": {
            "factors": (128,),
            "learning_rate": (0.01, 0.03),
            "regularization": (0.01,),
            "iterations": (50, 100, 300),
        },
    },
    "gen-20m": {
        "als": {
            "factors": (64,),
            "regularization": (0.1,),
            "alpha": (10.0, 40.0),
            "iterations": (5, 15),
        },
        "bpr": {
            "factors": (64,),
            "learning_rate": (0.03,),
            "regularization": (0.01,),
            "iterations": (25, 50),
        },
    },
}
"""Smaller grids where a full grid would take hours on 2 cores: on the 20M log one ALS fit of 15
iterations at 64 factors took 125 s on a quiet machine and 613 s at load 7 (alpha 10: test
Recall@20 .0949 on the 20,000 sampled users, 5 iterations .0947); the grid keeps the setting that was
best there (alpha 40, 64 factors; ``bench.nightly_scale``) and alpha 10, and one BPR setting. On the 1M log the
factors stop at 128 and the regularisation at 0.1 and 1 (0.01 was never best on the real
datasets' grids). Used unless ``--quick``."""
PIPELINE_RUNS: dict[str, list[list[str]]] = {
    "gen-1m": [[]],
    "gen-20m": [["--time-budget", "15m"]],
}
"""``recsys-metric run`` flags run once on the dataset's whole log (no config file), for issue 16's
goals: (b) the default run on the 1M log under 5 min, (a) ``--time-budget 15m`` on the 20M log
under 15 min and 8 GB. Their holdout is the pipeline's own split, so their Recall@20 is reported
beside, not in, the comparison (the ``ours`` rows are the comparison)."""
PEER_NAMES = {"als": "implicit ALS", "bpr": "implicit BPR"}

EVAL_USERS = 20_000
"""Test users every evaluation of a dataset scores at most (a seeded sample, the same for ours and
the peers): the 20M log has about a million test users, whose full ranking over 100,000 items
would cost more than the fits. The pipeline's holdout samples the same way (``eval.max_users``)."""


def parse_seconds(text: str) -> float:
    """``"90s"``, ``"5m"``, ``"1.5h"`` or a bare number of seconds -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f"budget {text!r}: expected a duration such as 90s, 5m or 1h") from None


def load_generated(name: str, seed: int = 0) -> BenchDataset:
    """A generated log (:data:`GENERATED`) under the random per-user split of the real datasets."""
    from bench.ingest import ensure_log

    rows, n_users, n_items = GENERATED[name]
    path = ensure_log(rows, n_users, n_items, 0)
    log = pl.read_parquet(path / "interactions" / "*.parquet", columns=["user_id", "item_id", "rating"])
    log = log.unique(["user_id", "item_id"], keep="last")
    user_ids = log["user_id"].unique().sort()
    item_ids = log["item_id"].unique().sort()
    users = np.searchsorted(user_ids.to_numpy(), log["user_id"].to_numpy())
    items = np.searchsorted(item_ids.to_numpy(), log["item_id"].to_numpy())
    label = log.select(_labels(pl.col("rating")))["label"].to_numpy()
    return random_split_dataset(name, user_ids.len(), item_ids.len(), users, items, label, None, seed=seed)


def load(name: str) -> BenchDataset:
    if name in GENERATED:
        return load_generated(name)
    return LOADERS[name]()


def eval_users(data: BenchDataset, limit: int = EVAL_USERS, seed: int = 0) -> np.ndarray | None:
    """The test users every evaluation of ``data`` scores: all (None) up to ``limit``, else a
    seeded sample of ``limit`` of them, sorted."""
    users = np.flatnonzero(data.test.row_lengths() > 0)
    if users.shape[0] <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(users, size=limit, replace=False))


def ours_at_budget(data: BenchDataset, budget: str | None, users: np.ndarray | None = None) -> dict[str, Any]:
    """Our default run with ``train.time_budget = budget`` (``None``: ``none``, no budget).

    The fit is :func:`bench.quality._ours`, which plans the holdout fit and the refit as the
    pipeline does (its reserve for the stages after training included). Returns the point:
    ``mode``, ``seconds`` (wall, whole fit), test ``recall@20`` / ``ndcg@20`` on ``users``
    (None: every test user), what the budget traded and whether it stopped anything.
    """
    from bench.quality import _ours
    from recsys_metric.config import config_from_dict

    raw = {"train": {"time_budget": budget or "none"}}
    mode = f"train.time_budget {budget}" if budget else "train.time_budget none"
    config = config_from_dict(raw, source="bench.time_to_quality")
    t = time.perf_counter()
    score_fn, info = _ours(data, config, eval_users=users)
    seconds = time.perf_counter() - t
    metrics = _test_metrics(score_fn, data, users)
    traded = info.get("time_budget", {}).get("traded", [])
    return {
        "budget": budget,
        "mode": mode,
        "seconds": round(seconds, 2),
        **metrics,
        "params": info["params"],
        "train_seconds": info["train_seconds"],
        "traded": traded,
        "budget_bound": any("time budget" in t for t in traded),
    }


def _test_metrics(
    score_fn: Callable[[np.ndarray], Any], data: BenchDataset, users: np.ndarray | None = None
) -> dict[str, float]:
    from recsys_metric.evaluate import evaluate_scores

    m = evaluate_scores(score_fn, data.train, data.test, ks=KS, users=users)
    return {"recall@20": round(m["recall@20"], 5), "ndcg@20": round(m["ndcg@20"], 5)}


def peer_points(
    kind: str, data: BenchDataset, grid: dict[str, Sequence[Any]], users: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """One point per grid setting: seconds of its fit on the training set, test metrics."""
    points = []
    for params in _grid_points(grid, "iterations"):
        path = implicit_path(kind, data.train_liked, params, grid["iterations"])
        fit_seconds = 0.0
        while True:
            t = time.perf_counter()
            try:
                n_iter, score_fn = next(path)
            except StopIteration:
                break
            fit_seconds += time.perf_counter() - t
            point = {"params": {**params, "iterations": n_iter}, "seconds": round(fit_seconds, 2)}
            point.update(_test_metrics(score_fn, data, users))
            logger.info("%s %s %s", data.name, kind, point)
            points.append(point)
    return points


def frontier(points: list[dict[str, Any]], key: str = "recall@20") -> list[dict[str, Any]]:
    """Points that no faster point beats: the best ``key`` reachable within each point's seconds."""
    best, out = float("-inf"), []
    for p in sorted(points, key=lambda p: (p["seconds"], -p[key])):
        if p[key] > best:
            best = p[key]
            out.append(p)
    return out


def run_dataset(
    data: BenchDataset,
    budgets: Sequence[str],
    grids: dict[str, Any],
    default: bool,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every point of one dataset; ``checkpoint(partial result)`` after each peer and each run of ours.

    Budgets are run from the smallest; once a run ends without its budget stopping anything (early
    stopping or the epoch cap ended both fits), every larger budget is that same run, recorded as
    such (``same_as``) instead of being trained again."""
    users = eval_users(data)
    out: dict[str, Any] = {
        "summary": {**data.summary(), "eval_users": None if users is None else int(users.shape[0])},
        "ours": [],
        "peers": {},
    }
    for kind, grid in grids.items():
        points = peer_points(kind, data, grid, users)
        out["peers"][kind] = {"points": points, "frontier": frontier(points)}
        if checkpoint:
            checkpoint(out)
    unbound: dict[str, Any] | None = None
    for budget in [*sorted(budgets, key=parse_seconds), *([None] if default else [])]:
        if unbound is not None:
            mode = f"train.time_budget {budget}" if budget else "train.time_budget none"
            point = {**unbound, "budget": budget, "mode": mode, "same_as": unbound["budget"]}
        else:
            point = ours_at_budget(data, budget, users)
            if budget is not None and not point["budget_bound"]:
                unbound = point
        logger.info("%s ours %s", data.name, point)
        out["ours"].append(point)
        if checkpoint:
            checkpoint(out)
    return out


def warm_up() -> float:
    """Compile the numba kernels (training and evaluation) before the first timed row; returns
    the seconds it took.

    The kernels compile once per installation and are cached on disk (``cache=True``): a user's
    very first run pays this, later runs do not. Without it the first budgeted row of the
    benchmark pays it inside its budget (in a fresh checkout ml-latest-small's 1-minute row
    trained half its epochs and raced the rates on a kernel still compiling).
    """
    from recsys_metric.config import Config
    from recsys_metric.data.matrix import InteractionMatrix
    from recsys_metric.evaluate import evaluate_scores
    from recsys_metric.model.towers import TwoTowerModel
    from recsys_metric.pipeline import model_score_fn
    from recsys_metric.train import TrainData, fit

    rng = np.random.default_rng(0)
    n_users, n_items = 200, 300
    users, items = rng.integers(0, n_users, 4000), rng.integers(0, n_items, 4000)
    liked = InteractionMatrix.from_pairs(users, items, n_users, n_items)
    config = Config().train.model_copy(update={"epochs": 1, "lr": 0.05, "time_budget": None})
    started = time.perf_counter()
    model = TwoTowerModel(n_users, n_items, Config().model, seed=0)
    fit(model, TrainData.from_matrices(liked), config, progress=False, split_method="user_holdout")
    evaluate_scores(model_score_fn(model, None), liked, liked, exclude_seen=False)
    return round(time.perf_counter() - started, 2)


def best_peer(res: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    best = None
    for kind, peer in res["peers"].items():
        for p in peer["points"]:
            if best is None or p["recall@20"] > best[1]["recall@20"]:
                best = (kind, p)
    return best


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def to_markdown(r: dict[str, Any]) -> str:
    lines = [
        "Holdout Recall@20 against the wall-clock seconds of one fit, every point a separate full fit, "
        "same split and evaluator as the quality benchmark. Peers: each grid setting is one point; "
        "the best is chosen on the test set (an upper bound for a tuned peer). Ours: the default "
        "config at each budget (`train.time_budget`; the fit planned as the pipeline plans it, the "
        "reserve for the stages after training kept). A budget whose run ended before the budget "
        'stopped anything is the same run as the smaller one ("same run as"). Evaluations score at '
        f"most {EVAL_USERS:,} seeded test users per dataset, the same for every row.",
        f"Grids: {'quick' if r['quick'] else 'full'} ({_grid_text(r['grids'])}). "
        f"Load average (1/5/15 min) at start {r['load_at_start']}, at end {r['load_at_end']}."
        + (
            f" The numba kernels were compiled (or loaded from their cache) before the first row, "
            f"in {r['warm_up_seconds']} s: a first run on a fresh installation pays that once."
            if r.get("warm_up_seconds") is not None
            else ""
        ),
        "",
        "![time to quality](bench/results/time_to_quality.png)",
    ]
    for name, res in r["datasets"].items():
        s = res["summary"]
        lines += [
            "",
            f"### {name}",
            "",
            (f"Measured {res['measured']} (kept with `--resume`). " if res.get("measured") else "")
            + f"{s['n_users']:,} users x {s['n_items']:,} items, {s['n_train']:,} training interactions, "
            f"{s['n_test']:,} test items for {s['n_test_users']:,} users"
            + (f" ({s['eval_users']:,} of them scored)." if s.get("eval_users") else ".")
            + (f" Load average (1/5/15 min): {res['load']}." if res.get("load") else "")
            + (
                f" Peer grids for this dataset: {_grid_text(res['grids'])}."
                if res.get("grids") and json.dumps(res["grids"]) != json.dumps(r["grids"])
                else ""
            ),
            "",
            "| run | setting | seconds | Recall@20 | NDCG@20 |",
            "|---|---|---:|---:|---:|",
        ]
        for p in res["ours"]:
            setting = p["mode"] + (f" (same run as {p['same_as']})" if p.get("same_as") else "")
            if p.get("budget_bound"):
                setting += ": " + "; ".join(t for t in p["traded"] if "time budget" in t)
            lines.append(
                f"| ours, {p['budget'] or 'no budget'} | {setting} | {p['seconds']:.0f} | "
                f"{p['recall@20']:.3f} | {p['ndcg@20']:.3f} |"
            )
        for kind, peer in res["peers"].items():
            for p in peer["frontier"]:
                lines.append(
                    f"| {PEER_NAMES[kind]} (frontier) | {_params(p['params'])} | {p['seconds']:.1f} | "
                    f"{p['recall@20']:.3f} | {p['ndcg@20']:.3f} |"
                )
        best = best_peer(res)
        for run in res.get("pipeline", []):
            lines += ["", _pipeline_line(run)]
        if best and res["ours"]:
            ours_best = max(res["ours"], key=lambda p: p["recall@20"])
            lines += [
                "",
                f"Best peer: {PEER_NAMES[best[0]]} {best[1]['recall@20']:.3f} in {best[1]['seconds']:.0f} s; "
                f"our best: {ours_best['recall@20']:.3f} in {ours_best['seconds']:.0f} s "
                f"({ours_best['recall@20'] / best[1]['recall@20']:.3f}x).",
            ]
    if not r.get("complete", True):
        lines += [
            "",
            "**Incomplete: the run was stopped part-way; the rows above are what it had measured.**",
        ]
    if r["skipped"]:
        lines += [
            "",
            "Not measured in this run: " + "; ".join(f"{k} ({v})" for k, v in r["skipped"].items()) + ".",
        ]
    return "\n".join(lines)


def _pipeline_line(run: dict[str, Any]) -> str:
    """One ``recsys-metric run`` of the dataset's log (goals (a) and (b) of issue 16)."""
    rec = run["recall_at_20"]
    return (
        f"`recsys-metric run {' '.join(run['flags'])}` (no config file) on the whole log: "
        f"**{run['wall_seconds'] / 60:.1f} min wall**, **peak RSS {run['peak_rss_gib']:.2f} GiB**, "
        f"holdout Recall@20 {rec.get('model', float('nan')):.4f} (popularity "
        f"{rec.get('popularity', float('nan')):.4f}) on the pipeline's own split "
        f"({run['n_eval_users']:,} users), epochs {run['epochs']['holdout']} + {run['epochs']['refit']} "
        f"(holdout + refit), stages {run['stage_seconds']}"
        + (f"; traded: {'; '.join(run['traded'])}" if run.get("traded") else "")
        + "."
    )


def _grid_text(grids: dict[str, Any]) -> str:
    return "; ".join(
        f"{PEER_NAMES[k]} " + " x ".join(f"{p} {list(v)}" for p, v in g.items()) for k, g in grids.items()
    )


def plot(r: dict[str, Any], path: Path) -> Path:
    """One panel per dataset: peers' points and frontiers, ours at each budget; log-scaled seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(r["datasets"])
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 4), squeeze=False)
    colors = {"als": "tab:blue", "bpr": "tab:orange"}
    for ax, name in zip(axes[0], names, strict=False):
        res = r["datasets"][name]
        for kind, peer in res["peers"].items():
            xs = [p["seconds"] for p in peer["points"]]
            ys = [p["recall@20"] for p in peer["points"]]
            ax.scatter(xs, ys, s=10, alpha=0.35, color=colors[kind])
            front = peer["frontier"]
            # Held level to the panel's slowest point: the best reached stays reachable.
            right = max(p["seconds"] for q in res["peers"].values() for p in q["points"]) if front else 0
            right = max([right, *(p["seconds"] for p in res["ours"])])
            ax.step(
                [p["seconds"] for p in front] + ([right] if front else []),
                [p["recall@20"] for p in front] + ([front[-1]["recall@20"]] if front else []),
                where="post",
                color=colors[kind],
                label=f"{PEER_NAMES[kind]} (best on test)",
            )
        ours = sorted((p for p in res["ours"] if not p.get("same_as")), key=lambda p: p["seconds"])
        if ours:
            ax.plot(
                [p["seconds"] for p in ours],
                [p["recall@20"] for p in ours],
                "o-",
                color="tab:green",
                label="ours, default at budgets",
            )
            for p in ours:
                ax.annotate(p["budget"] or "no budget", (p["seconds"], p["recall@20"]), fontsize=7)
        ax.set_xscale("log")
        # Minor-tick labels of a log axis overlap on short ranges: majors only.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("seconds of one fit (wall)")
        ax.set_ylabel("test Recall@20")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def resumable(path: Path, result: dict[str, Any], default: bool) -> dict[str, Any]:
    """Datasets of a saved result that hold every point this run would measure (same budgets,
    grids, peers and ``--default``); a run stopped part-way can go on with the rest."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("budgets") != result["budgets"] or saved.get("grids") != json.loads(
        json.dumps(result["grids"])
    ):
        return {}
    wanted = [*result["budgets"], *([None] if default else [])]
    return {
        name: res
        for name, res in saved.get("datasets", {}).items()
        if [p["budget"] for p in res.get("ours", [])] == wanted
        and set(res.get("peers", {})) == set(result["grids"])
    }


def pipeline_run(name: str, flags: list[str]) -> dict[str, Any]:
    """``recsys-metric run FLAGS`` on the generated log ``name`` in a fresh process, into a fresh
    store under ``bench/out/``: wall, peak RSS and the run's own figures
    (:func:`bench.nightly_scale.run_once`)."""
    import shutil
    import subprocess

    from bench.common import OUT
    from bench.ingest import ensure_log
    from bench.nightly_scale import run_once

    rows, n_users, n_items = GENERATED[name]
    log = ensure_log(rows, n_users, n_items, 0)
    artifacts = OUT / f"ttq_pipeline_{name}"
    if artifacts.exists():
        subprocess.run(["chmod", "-R", "u+w", str(artifacts)], check=False)  # runs are read-only
        shutil.rmtree(artifacts)
    run = run_once(log, artifacts, None, flags)
    run["flags"] = flags
    run.pop("log_tail", None)
    logger.info("%s pipeline %s: %s", name, flags, run)
    subprocess.run(["chmod", "-R", "u+w", str(artifacts)], check=False)
    shutil.rmtree(artifacts, ignore_errors=True)
    return run


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS), help="durations: 90s, 5m, 1h")
    parser.add_argument("--quick", action="store_true", help="small peer grids (QUICK_GRIDS)")
    parser.add_argument("--default", action="store_true", help="also run today's default with no budget")
    parser.add_argument("--peers", nargs="*", default=["als", "bpr"], choices=["als", "bpr"])
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the datasets of the saved result measured with the same budgets, grids and peers",
    )
    parser.add_argument(
        "--resume-from",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="with --resume: read these saved results instead of the default one (e.g. two "
        "invocations saved under --name, assembled into one table)",
    )
    parser.add_argument(
        "--name",
        default="time_to_quality",
        help="save as bench/results/NAME.json and NAME.png (default time_to_quality)",
    )
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--no-pipeline", action="store_true", help="skip the `recsys-metric run` rows (PIPELINE_RUNS)"
    )
    args = parser.parse_args(argv)
    for budget in args.budgets:
        parse_seconds(budget)
    args.budgets = sorted(args.budgets, key=parse_seconds)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    all_grids = QUICK_GRIDS if args.quick else GRIDS
    grids = {k: all_grids[k] for k in args.peers}
    result: dict[str, Any] = {
        "quick": args.quick,
        "budgets": args.budgets,
        "grids": grids,
        "load_at_start": load_average(),
        "datasets": {},
        "skipped": {name: "not requested (--datasets)" for name in DATASETS if name not in args.datasets},
    }
    command = "python -m bench.time_to_quality " + " ".join(argv if argv is not None else sys.argv[1:])

    def save(final: bool) -> None:
        # Saved after every step: a long run stopped part-way keeps what it measured, marked so.
        result["complete"] = final
        result["load_at_end"] = load_average()
        result["markdown"] = to_markdown(result)
        if not args.no_save:
            plot(result, RESULTS / f"{args.name}.png")
            save_result(args.name, result, command.strip())

    result["warm_up_seconds"] = warm_up()
    logger.info("numba kernels compiled or loaded from their cache in %.1f s", result["warm_up_seconds"])
    kept: dict[str, Any] = {}
    if args.resume:
        for path in args.resume_from or [RESULTS / "time_to_quality.json"]:
            for name, res in resumable(path, result, args.default).items():
                kept.setdefault(name, {"measured": json.loads(path.read_text()).get("date"), **res})
    for name in args.datasets:
        if name in kept:
            logger.info("%s: kept from the saved result (--resume)", name)
            result["datasets"][name] = kept[name]
            continue
        try:
            data = load(name)
        except DatasetUnavailable as err:
            result["skipped"][name] = str(err)
            continue
        t, load_before = time.perf_counter(), load_average()

        def checkpoint(partial: dict[str, Any], name: str = name) -> None:
            result["datasets"][name] = partial
            save(final=False)

        data_grids = grids if args.quick else {k: DATASET_GRIDS.get(name, grids)[k] for k in grids}
        result["datasets"][name] = res = run_dataset(data, args.budgets, data_grids, args.default, checkpoint)
        res["grids"] = data_grids
        del data
        if not args.no_pipeline and name in PIPELINE_RUNS:
            res["pipeline"] = []
            for flags in PIPELINE_RUNS[name]:
                res["pipeline"].append(pipeline_run(name, flags))
                checkpoint(res)
        res["wall_seconds"] = round(time.perf_counter() - t, 1)
        res["load"] = f"{load_before} at start, {load_average()} at end"
    save(final=True)
    print(result["markdown"])
    if not args.no_save:
        print(f"saved {RESULTS / (args.name + '.json')} and {RESULTS / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
