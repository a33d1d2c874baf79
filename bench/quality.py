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
    python -m bench.quality --ours-only --datasets citeulike-a --set train.epochs=100 --set model.dim=128
                                                              # ours alone, config overrides, validation
                                                              # figures only (add --test for the refit and
                                                              # test figures); writes quality_ours.json

Real datasets are read from ``../shared/datasets``; a dataset whose files are absent is skipped
and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

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

if TYPE_CHECKING:
    from recsys_metric.config import Config

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


def _ours(
    data: BenchDataset,
    config: Config | None = None,
    *,
    refit: bool = True,
    features: Any = None,
    eval_users: np.ndarray | None = None,
) -> tuple[ScoreFn | None, dict[str, Any]]:
    """Train the project's two-tower model with ``config`` (default: the default config), as the
    pipeline's run trains it.

    Early stopping runs on a validation split of the training data (the peers' split), never on the
    test set, through the pipeline's seeded sampled validation
    (:class:`~recsys_metric.training.validation.SampledValidation`, ``eval.validation_max_users``).
    As for the peers, the setting chosen there (the best epoch) is then refitted on the whole
    training set when ``train.refit`` is on (the default) and ``refit`` is True. The run's time
    plan is the pipeline's (:class:`~recsys_metric.training.run_budget.RunPlan`): under
    ``train.time_budget`` (the default config has one) both fits stop where the pipeline's would,
    keeping the same reserve for the stages after training, with the clock started when this
    function is called. The trainer's input is built as the pipeline builds it: pairs from the
    liked training items, every training interaction seen, ``triplets.sampling: popularity``
    weights from the training interactions, ``train.user_balance: auto`` resolved for the test
    split's method (``data.split_method``), as the pipeline resolves it for the split it applies.

    Args:
        eval_users: the test users the caller will score (sizes the reserve for the holdout
            evaluation; None: every user with test items).

    Returns:
        ``(score_fn, info)``; ``score_fn`` is None when ``refit`` is False (only the validation
        figures are wanted). ``info`` holds the chosen epoch, the validation Recall@20 of every
        evaluated epoch, the seconds of each fit and ``time_budget`` (the run plan's report:
        what each fit ran, why it stopped, what was traded).

    Raises:
        SkipBaseline: the trainer modules are not importable.
    """
    try:
        from recsys_metric.config import Config
        from recsys_metric.model.towers import TwoTowerModel
        from recsys_metric.pipeline import model_score_fn
        from recsys_metric.train import TrainData, fit
        from recsys_metric.training.budget import TimeBudget
        from recsys_metric.training.concurrent_refit import ConcurrentRefit
        from recsys_metric.training.run_budget import RunPlan
        from recsys_metric.training.second_phase import refit_epochs_by_phase, replay_second_phase
        from recsys_metric.triplets import popularity_probs
    except ImportError as err:
        raise SkipBaseline(f"recsys-metric trainer not available ({err})") from None

    config = config or Config()
    model_config, train_config = config.model, config.train
    # model.feature_training: fitted (the default): the model trains on ids, the feature tower is
    # fitted to the trained model at the end, as the pipeline does.
    fitted_features = features if features is not None and model_config.feature_training == "fitted" else None
    if fitted_features is not None:
        features, model_config = None, model_config.trained()
    budget_s = train_config.time_budget_seconds()
    budget = TimeBudget(float(budget_s)) if budget_s is not None else None

    def train_data(part: BenchDataset) -> TrainData:
        item_probs = None
        if config.triplets.sampling == "popularity":
            item_probs = popularity_probs(part.train.indices, part.n_items, config.triplets.popularity_alpha)
        return TrainData.from_matrices(
            part.train_liked, seen=part.train, dislikes=part.train_disliked, item_probs=item_probs
        )

    val = data.validation_split()

    def new_model(part: BenchDataset) -> TwoTowerModel:
        # As the pipeline builds it: a pooled user tower reads the users' liked training items.
        pooled = model_config.user_tower in ("pooled", "hybrid")
        return TwoTowerModel(
            data.n_users,
            data.n_items,
            model_config,
            item_features=features,  # ItemFeatureTensors for model.item_features (bench.cold_start)
            user_history=part.train_liked if pooled else None,
            seed=train_config.seed,
        )

    def scores(model: TwoTowerModel, part: BenchDataset, *, ranking: bool = False) -> ScoreFn:
        # An item-item model (model.mode: item_item) scores a user from their liked items.
        return model_score_fn(model, part.train_liked if model.item_item else None, ranking=ranking)

    key = f"recall@{train_config.early_stopping_k}"

    def validate_users(model: TwoTowerModel, users: np.ndarray) -> float:
        # As the pipeline's early stopping: ranks only (model_score_fn's ranking).
        ks = (train_config.early_stopping_k,)
        return evaluate_scores(scores(model, val, ranking=True), val.train, val.test, ks=ks, users=users)[key]

    fit_data = train_data(val)
    n_test_users = int((data.test.row_lengths() > 0).sum()) if eval_users is None else len(eval_users)
    plan = RunPlan.for_fit(
        budget,
        validate_users,
        np.flatnonzero(val.test.row_lengths() > 0),
        config,
        test_users=n_test_users,
        n_items=data.n_items,
        refit_scale=data.train_liked.nnz / max(fit_data.n_pairs, 1) if train_config.refit and refit else 0.0,
    )
    validate = plan.validation

    t = time.perf_counter()
    model = new_model(val)
    # As the pipeline: the refit trains beside the holdout fit where it can (ConcurrentRefit).
    beside = None
    if refit and ConcurrentRefit.supported(train_config):
        beside = ConcurrentRefit(
            new_model(data),
            train_data(data),
            train_config,
            explicit_share=train_config.explicit_share,
            split_method=data.split_method,
        )
        plan.follow_refit(beside)
    with beside or contextlib.nullcontext():
        result = fit(
            model,
            fit_data,
            train_config,
            explicit_share=train_config.explicit_share,
            validate=validate,
            progress=False,
            split_method=data.split_method,
            planner=plan.holdout_planner,
            refit=beside,
        )
        info: dict[str, Any] = {
            "params": (
                f"defaults (user_balance {result.user_balance:g}, item_centric_weight "
                f"{result.item_centric_weight:g} for a {data.split_method} split; lr {result.lr:g}"
                f"{_lr_choice(result.lr_search)}; {result.negatives} negatives); "
                f"best epoch {result.best_epoch} of {result.epochs_run} on validation"
                + (f"; second phase: {result.second_phase['outcome']}" if result.second_phase else "")
            ),
            "validation": {key: round(float(result.best_metric or 0.0), 5)},
            "validation_history": [
                round(record["metrics"][key], 5) for record in result.history if key in record["metrics"]
            ],
            "device": result.device,
            "train_seconds": {"validation_fit": round(time.perf_counter() - t, 2)},
        }
        if not refit:
            info["time_budget"] = plan.report(result, None, 0)
            return None, info
        done = beside.epochs_done if beside is not None else 0
        epochs = plan.refit_epochs(result, done) if train_config.refit else 0
        refitted = None
        if epochs:
            t = time.perf_counter()
            first_epochs, second_epochs = refit_epochs_by_phase(result, epochs)
            if beside is not None and beside.started:
                # In the holdout's second phase (train.lr_drop) the refit beside it follows it there.
                phase_epochs = second_epochs if beside.in_second_phase else first_epochs
                refitted = beside.finish(phase_epochs, plan.refit_planner)
                model = beside.model
                where = f"beside the holdout fit, {refitted.concurrent_epochs} trained"
                if second_epochs:
                    where += f", then {second_epochs} at lr {result.second_phase['lr']:g}"
            else:
                model, refit_data = new_model(data), train_data(data)
                refitted = fit(
                    model,
                    refit_data,
                    plan.refit_config(train_config, result),
                    explicit_share=train_config.explicit_share,
                    epochs=first_epochs,
                    progress=False,
                    split_method=data.split_method,
                    planner=plan.refit_planner,
                )
                where = "after the holdout fit"
                if second_epochs:
                    # As the pipeline: the refit replays the holdout's second phase (train.lr_drop).
                    refitted = replay_second_phase(
                        model,
                        refit_data,
                        plan.refit_config(train_config, result),
                        result,
                        refitted,
                        second_epochs,
                        explicit_share=train_config.explicit_share,
                        split_method=data.split_method,
                        progress=False,
                        planner=plan.refit_planner,
                    )
                    where += f", then {second_epochs} at lr {result.second_phase['lr']:g}"
            info["params"] += f", refitted on all training data ({refitted.epochs_run} epochs, {where})"
            info["train_seconds"]["refit"] = round(time.perf_counter() - t, 2)
    info["time_budget"] = plan.report(result, refitted, epochs)
    if fitted_features is not None:
        from recsys_metric.model.feature_fit import fit_item_features

        trained_on = data if refitted is not None else val
        t = time.perf_counter()
        info["item_features_fit"] = fit_item_features(
            model,
            fitted_features,
            trained_on.train_liked,
            item_features=tuple(config.model.item_features),
            seed=train_config.seed,
        )
        info["train_seconds"]["fit_features"] = round(time.perf_counter() - t, 2)
    return scores(model, data), info


def _lr_choice(trials: list[dict[str, Any]]) -> str:
    """`` chosen on validation (0.05: 0.4536, 0.01: 0.4728)`` for ``train.lr: auto``."""
    from recsys_metric.train import lr_search_summary

    return f" chosen on validation ({lr_search_summary(trials)})" if trials else ""


def parse_overrides(pairs: list[str]) -> Config:
    """``["train.epochs=100", "model.dim=128"]`` -> the default :class:`Config` with those keys set.

    Values are read as JSON where they parse (numbers, booleans, lists), else as strings, and
    validated by the config model.

    Raises:
        ValueError: a pair is not ``section.key=value``.
        recsys_metric.errors.ConfigError: an unknown key or a bad value.
    """
    from recsys_metric.config import config_from_dict

    raw: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ValueError(f"override {pair!r}: expected section.key=value, e.g. train.epochs=100")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, source="--set")


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
            assert score_fn is not None
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


def ours_only(
    names: list[str], config: Config, overrides: list[str], *, test: bool, argv: list[str] | None
) -> dict[str, Any]:
    """Exploration runs: the recsys-metric row alone with ``config``, on the datasets ``names``.

    Figures go to ``bench/results/quality_ours.json`` (never ``quality.json``, whose rows must all
    come from one run). Without ``test`` only the validation figures are computed, so that settings
    are chosen without looking at the test set.
    """
    results: dict[str, Any] = {}
    for name in names:
        try:
            data = LOADERS[name]()
        except DatasetUnavailable as err:
            print(f"SKIP {name}: {err}", file=sys.stderr, flush=True)
            continue
        t = time.perf_counter()
        score_fn, info = _ours(data, config, refit=test)
        if score_fn is not None:
            info["test"] = {k: round(v, 5) for k, v in _metrics(score_fn, data).items()}
        info["wall_seconds"] = round(time.perf_counter() - t, 1)
        results[name] = info
        line = (
            f"{name} [{' '.join(overrides) or 'defaults'}]: {info['params']}; validation {info['validation']}"
        )
        if "test" in info:
            line += f"; test recall@20 {info['test']['recall@20']:.4f} ndcg@20 {info['test']['ndcg@20']:.4f}"
        print(f"{line}; {info['wall_seconds']:.0f} s", flush=True)
    command = "python -m bench.quality" + f" {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()
    payload = {"overrides": overrides, "config": config.to_dict(), "datasets": results}
    path = save_result("quality_ours", payload, command)
    print(f"wrote {path}", file=sys.stderr)
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets",
        default=",".join(LOADERS),
        help=f"comma-separated subset of {', '.join(LOADERS)} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="one setting per peer instead of the grids")
    parser.add_argument("--no-ours", action="store_true", help="peers only (skip the recsys-metric row)")
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="only the recsys-metric model, validation figures only; writes quality_ours.json",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="with --ours-only: config override, e.g. train.epochs=100 (repeatable)",
    )
    parser.add_argument(
        "--test",
        action="store_true",
        help="with --ours-only: also refit on all training data and report the test figures",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOADERS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(LOADERS)}")
    if (args.overrides or args.test) and not args.ours_only:
        parser.error("--set and --test apply to --ours-only runs (the full benchmark uses the defaults)")
    if args.ours_only and (args.quick or args.no_ours):
        parser.error("--ours-only does not combine with --quick or --no-ours")
    if args.ours_only:
        try:
            config = parse_overrides(args.overrides)
        except ValueError as err:  # ConfigError is a ValueError too
            parser.error(str(err))
        return ours_only(names, config, args.overrides, test=args.test, argv=argv)

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
