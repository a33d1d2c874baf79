"""The ``recsys-metric`` command.

User mistakes (a missing file, a bad config key, bad data) are answered with one line on stderr
and exit code 2; an unexpected failure keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from recsys_metric import __version__
from recsys_metric.errors import ConfigError, RecsysMetricError, RejectLimitExceeded
from recsys_metric.run_summary import TIME_BUDGET_HELP, time_budget_arg, time_budget_lines, with_time_budget

if TYPE_CHECKING:
    from recsys_metric.config import Config
    from recsys_metric.distributed import DistributedTraining


def load_config(path):  # noqa: ANN001, ANN201 (recsys_metric.config.load_config, imported on use)
    # The config module (pydantic) costs a third of a second that `similar`/`recommend` never need.
    from recsys_metric.config import load_config as load

    return load(path)


DEFAULT_DATA = Path("data") / "interactions.parquet"
DEFAULT_ITEMS = Path("data") / "items.parquet"
DEFAULT_ARTIFACTS = Path("artifacts")
EXIT_USER_ERROR = 2
EXIT_GATE_REFUSED = 3
"""``run``/``publish``: the quality gate refused the run, ``current`` did not move (docs/operations.md)."""
INTERACTIONS_HELP = (
    f"interaction log: a path, or a database URI without password (postgresql://user@host:port/db, "
    f"duckdb:///path/file.duckdb; docs/databases.md) (default: data.source of --config, else {DEFAULT_DATA})"
)


def _fmt_int(n: int | float) -> str:
    return f"{int(n):,}"


def format_data_report(report: dict) -> str:
    """Human-readable summary of ``PreparedData.report()``."""
    v = report["validation"]
    s = report["split"]
    lab = report["labels"]
    n = max(report["n_interactions"], 1)
    lines = [
        f"source            {v['source']}",
        f"input rows        {_fmt_int(v['n_input_rows'])}",
        f"rejected          {_fmt_int(v['n_rejected'])}"
        + (f"  -> {v['rejects_path']}" if v.get("rejects_path") else ""),
    ]
    for reason, count in sorted(v.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"  {reason:<30} {_fmt_int(count)}")
    lines += [
        f"duplicates        {_fmt_int(v['n_duplicates'])} collapsed",
        f"interactions      {_fmt_int(report['n_interactions'])}",
        f"users             {_fmt_int(report['n_users'])}",
        f"items             {_fmt_int(report['n_items'])}",
        f"density           {report['n_interactions'] / (report['n_users'] * report['n_items']):.5f}",
        f"liked             {_fmt_int(lab['liked'])} ({lab['liked'] / n:.1%})",
        f"neutral           {_fmt_int(lab['neutral'])} ({lab['neutral'] / n:.1%})",
        f"unliked           {_fmt_int(lab['unliked'])} ({lab['unliked'] / n:.1%})",
        f"split             {s['method']}"
        + (
            f" (asked for {s['requested_method']}: {s['fallback_reason']})"
            if s.get("fallback_reason")
            else ""
        )
        + (f", cutoff {s['cutoff']}" if s.get("cutoff") else ""),
        f"  train rows      {_fmt_int(s['n_train'])} ({_fmt_int(s['n_train_users'])} users)",
        f"  test rows       {_fmt_int(s['n_test'])} ({_fmt_int(s['n_test_users'])} users)",
        f"  test dropped    {_fmt_int(s['n_test_dropped_unseen_user'])} unseen user, "
        f"{_fmt_int(s['n_test_dropped_unseen_item'])} unseen item",
    ]
    if "triplets" in report:
        t = report["triplets"]
        lines.append(
            f"triplets          {_fmt_int(t['n_triplets'])} "
            f"({_fmt_int(t.get('n_explicit', 0))} explicit dislikes, {_fmt_int(t.get('n_sampled', 0))} sampled)"
        )
    return "\n".join(lines)


_KEEP_REJECTS = "rerun with --out DIR to keep the rejected rows in DIR/rejects.parquet"


def _cmd_inspect_data(args: argparse.Namespace) -> int:
    from recsys_metric.data.prepare import prepare_dataset

    config = load_config(args.config)
    if args.out:
        prepared = prepare_dataset(args.path, args.out, config)
        report = prepared.report()
        report["validation"]["rejects_path"] = str(prepared.paths.rejects)
    else:
        with tempfile.TemporaryDirectory(prefix="recsys-metric-inspect-") as tmp:
            try:
                report = prepare_dataset(args.path, tmp, config).report()
            except RejectLimitExceeded as err:
                # The rejects file is in the temporary directory, gone once this returns.
                err.args = (str(err).replace(f"rejected rows are in {err.rejects_path}", _KEEP_REJECTS),)
                raise
            report["validation"]["rejects_path"] = None
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_data_report(report))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from recsys_metric.data.prepare import prepare_dataset

    prepared = prepare_dataset(args.interactions, args.out, load_config(args.config))
    print(format_data_report(prepared.report()))
    print(f"\nwrote {prepared.paths.out_dir}")
    return 0


def _cmd_generate_data(args: argparse.Namespace) -> int:
    from recsys_metric.data import synthetic

    # Defaults filled here, not in the parser: reading them imports the generator (and pandas),
    # which every other command, queries above all, would pay for at start.
    seed = synthetic_defaults()["seed"] if args.seed is None else args.seed
    id_type = args.id_type or synthetic_defaults()["id_type"]
    argv = ["--out", str(args.out), "--seed", str(seed), "--id-type", id_type]
    for flag, value in (
        ("--users", args.n_users),
        ("--items", args.n_items),
        ("--interactions", args.n_interactions),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.parts:
        argv += ["--parts", "--overwrite"]
    return synthetic.main(argv)


def synthetic_defaults() -> dict:
    from recsys_metric.data.synthetic import BUNDLED_ARGS

    return BUNDLED_ARGS


def _items_path(args: argparse.Namespace) -> Path | None:
    if args.items:
        return Path(args.items)
    # The bundled log comes with its item table; a user's own log has none unless given.
    if Path(args.interactions) == DEFAULT_DATA and DEFAULT_ITEMS.exists():
        return DEFAULT_ITEMS
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    config = with_time_budget(load_config(args.config), args.time_budget)
    if args.distributed:
        from recsys_metric.distributed import run_distributed

        return run_distributed(lambda group: _train(args, config, group), device=config.train.device)
    return _train(args, config, None)


def _train(args: argparse.Namespace, config: Config, distributed: DistributedTraining | None) -> int:
    from recsys_metric.pipeline import new_run_id, train_run

    if args.out:
        run_id = new_run_id()
        run_dir = Path(args.out)
        result = train_run(
            args.interactions,
            run_dir,
            config,
            items=_items_path(args),
            run_id=run_id,
            progress=args.progress,
            distributed=distributed,
        )
    else:
        # Into the store: a finalized, unpublished run (`recsys-metric publish RUN_ID` gates it).
        from recsys_metric.nightly import train_into_store

        result, run_dir = train_into_store(
            args.interactions,
            args.artifacts,
            config,
            items=_items_path(args),
            progress=args.progress,
            wait=_wait(args),
            distributed=distributed,
        )
    print(result.evaluation.to_table())
    es = result.metrics["early_stopping"]
    print(
        f"\nrun {result.run_id}: best epoch {es['best_epoch']} of {es['epochs_run']} by validation {es['metric']}; "
        f"exported the {result.metrics['published_model'].replace('_', ' ')} to {run_dir} "
        f"in {result.seconds['total']:.1f} s"
    )
    for line in time_budget_lines(result.metrics):
        print(line)
    if not args.out:
        print(
            f"not published; to gate and publish it: recsys-metric publish {result.run_id} "
            f"--artifacts {args.artifacts}"
        )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from recsys_metric.nightly import run_nightly

    config = with_time_budget(load_config(args.config), args.time_budget)
    if args.warm_start:
        config = config.model_copy(update={"train": config.train.model_copy(update={"warm_start": True})})
    result = run_nightly(
        args.interactions,
        args.artifacts,
        config,
        items=_items_path(args),
        force=args.force,
        progress=args.progress,
        wait=_wait(args),
    )
    print(result.run.evaluation.to_table())
    index = result.run.metrics.get("index") or {}
    if index:
        print(
            f"\nAnnoy index: recall@10 {index['recall_at_10']:.3f} against exact search, "
            f"p50 {index['p50_ms']:.2f} ms, p99 {index['p99_ms']:.2f} ms"
            + ("; below the floor, so queries are answered exactly" if index.get("serve") == "exact" else "")
        )
    warm = result.run.metrics.get("warm_start") or {}
    if warm.get("enabled"):
        print(
            f"{warm['reason']}; training took {result.run.metrics['seconds'].get('train_holdout', 0):.1f} s"
        )
    for line in time_budget_lines(result.run.metrics):
        print(line)
    print(f"\nrun {result.run_id} -> {result.run_dir}")
    print(f"quality gate: {result.decision.reason}")
    if result.published:
        print(f"published: {Path(args.artifacts) / 'current'} -> runs/{result.run_id}")
    else:
        kept = result.previous_run_id or "nothing"
        print(f"NOT published: current stays on {kept}")
        return EXIT_GATE_REFUSED
    return 0


def _wait(args: argparse.Namespace) -> float | None:
    """``--wait``: absent 0 (fail at once), bare None (until the writer finishes), N seconds."""
    return None if args.wait is not None and args.wait < 0 else (args.wait or 0.0)


def _add_wait_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        nargs="?",
        type=float,
        const=-1.0,
        default=0.0,
        metavar="SECONDS",
        help="when another process writes to the store, wait for it (at most SECONDS; bare: until it "
        "finishes) instead of exiting with code 2",
    )


def _cmd_publish(args: argparse.Namespace) -> int:
    from recsys_metric.nightly import publish_run

    result = publish_run(args.artifacts, args.run_id, force=args.force, wait=_wait(args))
    if result.decision is None:
        print(f"run {args.run_id} is already current in {args.artifacts}")
        return 0
    print(f"quality gate: {result.decision.reason}")
    if result.published:
        print(
            f"published: {Path(args.artifacts) / 'current'} -> runs/{args.run_id} (was {result.previous_run_id})"
        )
        return 0
    print(f"NOT published: current stays on {result.previous_run_id or 'nothing'} (--force overrides)")
    return EXIT_GATE_REFUSED


def _cmd_rollback(args: argparse.Namespace) -> int:
    from recsys_metric.nightly import rollback_run

    result = rollback_run(args.artifacts, args.run_id, wait=_wait(args))
    if not result.published:
        print(f"run {result.run_id} is already current in {args.artifacts}")
    else:
        print(
            f"rolled back: {Path(args.artifacts) / 'current'} -> runs/{result.run_id} (was {result.previous_run_id})"
        )
    return 0


SERVE_HELP = (
    "schedules need a running Prefect API server (the temporary one a flow starts never fires them):\n"
    "  1. in another terminal:  prefect server start\n"
    "  2. here:                 export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
    "  3. then again:           recsys-metric serve"
)


def prefect_api_problem(timeout: float = 3.0) -> str | None:
    """Why the configured Prefect API cannot serve schedules, or None when it answers its health check."""
    import urllib.error
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return "PREFECT_API_URL is not set"
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"PREFECT_API_URL={url} answered its health check with HTTP {response.status}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"PREFECT_API_URL={url} is not reachable ({getattr(err, 'reason', err)})"


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported only here: the other commands never load Prefect's flow machinery.
    from flows.deployments import deployments, serve_all

    check_k(args.k, "items per user")
    items = _items_path(args)
    # Built (and the crons checked) before the server is asked: a typo is reported either way.
    runner_deployments = deployments(
        interactions=args.interactions,
        artifacts=args.artifacts,
        config_path=args.config,
        items=str(items) if items is not None else None,
        out=args.out,
        k=args.k,
        retrain_cron=args.retrain_cron,
        batch_cron=args.batch_cron,
        name_suffix=args.name_suffix,
        warm_start=True if args.warm_start else None,
    )
    problem = prefect_api_problem()
    if problem is not None:
        print(f"recsys-metric serve: {problem}\n{SERVE_HELP}", file=sys.stderr)
        return EXIT_USER_ERROR
    from recsys_metric.stop_signals import StopRequested, stop_on_sigint_like_sigterm

    # SIGINT stops serving as SIGTERM does (Prefect's runner handles only SIGTERM, and a job a
    # script starts in the background inherits SIGINT ignored): docs/scheduling.md.
    with stop_on_sigint_like_sigterm() as received:
        try:
            serve_all(*runner_deployments)
        except SystemExit as stop:  # StopRequested, or Prefect's runner stopping before it started
            if not isinstance(stop, StopRequested) and stop.code not in (0, None):
                raise
    print(f"recsys-metric serve: stopped{f' on {received[-1]}' if received else ''}", file=sys.stderr)
    return 0


def _print_frame(frame) -> None:
    import polars as pl

    with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(pl.from_pandas(frame) if not isinstance(frame, pl.DataFrame) else frame)


def _load_recommender(args: argparse.Namespace):
    from recsys_metric.serving import Recommender

    return Recommender.load(
        args.artifacts, index="exact" if args.exact else "auto", output="polars", verify=not args.no_verify
    )


def check_k(k: int, what: str = "results") -> int:
    """``-k`` as given when it is a positive count; a ConfigError (one line, exit 2) otherwise."""
    if k < 1:
        raise ConfigError(f"-k must be a positive number of {what}, got {k}")
    return k


def _cmd_recommend(args: argparse.Namespace) -> int:
    check_k(args.k)
    rec = _load_recommender(args)
    user_id = _typed_id(args.user_id, rec.user_id_type)
    _print_frame(rec.recommend(user_id, k=args.k, exclude_seen=not args.include_seen))
    return 0


def _cmd_similar(args: argparse.Namespace) -> int:
    check_k(args.k)
    rec = _load_recommender(args)
    _print_frame(rec.similar_items(_typed_id(args.item_id, rec.item_id_type), k=args.k, exact=args.exact))
    return 0


def _typed_id(text: str, id_type: type) -> int | str:
    """Command-line ids are text; integer vocabularies (``Recommender.user_id_type``) need ints."""
    if id_type is int:
        try:
            return int(text)
        except ValueError:
            raise KeyError(text) from None
    return text


def _cmd_batch(args: argparse.Namespace) -> int:
    if args.to is not None:
        from recsys_metric.db.sink import check_postgres

        # Checked before the scoring, which can take minutes, rather than after it.
        check_postgres(args.to, args.table, password_env=args.password_env)
    elif args.out is None:
        raise ConfigError(
            "give --out DIR for a Parquet table, --to postgresql://... for a database table, or both"
        )
    with tempfile.TemporaryDirectory(prefix="recsys-batch-") as scratch:
        out = args.out or str(Path(scratch) / "table")
        code = _batch(args, out)
        if args.to is not None:
            from recsys_metric.db.sink import load_parquet_table

            loaded = load_parquet_table(
                out, args.to, args.table, password_env=args.password_env, unlogged=args.unlogged
            )
            kept = f"; the previous table is {loaded['previous_table']}" if loaded["previous_table"] else ""
            print(
                f"loaded {loaded['n_rows']:,} rows into {loaded['table']} at {loaded['to']} in {loaded['seconds']:.1f} s "
                f"({loaded['rows_per_second']:,.0f} rows/s){kept}"
            )
    return code


def _batch(args: argparse.Namespace, out: str) -> int:
    from recsys_metric.serving import write_recommendations

    check_k(args.k, "items per user")
    user_ids = None
    if args.users:
        user_ids = [line.strip() for line in Path(args.users).read_text().splitlines() if line.strip()]
    stats = write_recommendations(
        args.artifacts,
        out,
        k=args.k,
        user_ids=user_ids,
        index=args.index,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    print(
        f"wrote top-{args.k} for {stats['n_users']:,} users ({stats['n_rows']:,} rows, {stats['n_files']} files) "
        f"to {out} in {stats['seconds']:.1f} s ({stats['users_per_second']:,.0f} users/s)"
    )
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    from recsys_metric.serving.cli_api import run_api

    return run_api(args)


def _cmd_runs(args: argparse.Namespace) -> int:
    from recsys_metric.registry import ArtifactStore

    listed = ArtifactStore(args.artifacts).list_runs()
    # A .tmp- directory is a run being written or a dead run's debris: never a run to choose.
    runs = [r for r in listed if not r.path.name.startswith(".tmp-")]
    unfinished = len(listed) - len(runs)
    if not runs:
        print(f"no runs under {args.artifacts}")
        return 0
    print(f"{'':2}{'run_id':<24}{'complete':<10}{'created (UTC)':<21}recall@K")
    for r in runs:
        mark = "* " if r.is_current else "  "
        recall = "" if r.recall is None else f"{r.recall:.4f} (K={r.k})"
        created = r.created.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{mark}{r.run_id:<24}{'yes' if r.complete else 'no':<10}{created:<21}{recall}")
    print("\n* = current")
    if unfinished:
        print(
            f"({unfinished} unfinished run directory(ies) not listed: being written, or left by a dead run)"
        )
    return 0


def _add_pipeline_arguments(p: argparse.ArgumentParser, *, progress: bool) -> None:
    """The options every command that runs the pipeline shares (run, serve)."""
    p.add_argument("--interactions", help=INTERACTIONS_HELP)
    p.add_argument("--items", help="item feature table (default: data/items.parquet with the bundled log)")
    p.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS), help="artifact store (default: artifacts)")
    p.add_argument("--config", help="YAML or TOML config file")
    if progress:
        p.add_argument(
            "--progress",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="progress bars (default: when stderr is a terminal)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys-metric",
        description="Recommender embeddings by metric learning: logs -> triplets -> two-tower model -> "
        "Parquet embeddings -> Annoy index.",
    )
    parser.add_argument("--version", action="version", version=f"recsys-metric {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "inspect-data",
        help="summarise an interaction log: users, items, labels, rejects, split, triplets",
        description="Read, validate, split and sample triplets from a log, and print what came out of each stage.",
    )
    p.add_argument(
        "path",
        nargs="?",
        default=str(DEFAULT_DATA),
        help=f"log file, Parquet directory or glob (default: {DEFAULT_DATA})",
    )
    p.add_argument("--config", help="YAML or TOML config file")
    p.add_argument(
        "--out", help="keep the prepared files (rejects, vocabularies, triplets) in this directory"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_inspect_data)

    p = sub.add_parser(
        "prepare",
        help="write the prepared dataset (vocabularies, labelled split interactions, triplets, rejects)",
    )
    p.add_argument("--interactions", help=INTERACTIONS_HELP)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="YAML or TOML config file")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "train",
        help="prepare, train (early stopping), evaluate on the holdout, refit and export a run directory",
        description="Train the two-tower model on a log and write a run directory: vocabularies, model.pt, "
        "user/item embedding Parquet files, metrics.json (holdout metrics beside popularity).",
    )
    p.add_argument("--interactions", help=INTERACTIONS_HELP)
    p.add_argument(
        "--items",
        help="item feature table (Parquet with item_id; default: data/items.parquet with the bundled log)",
    )
    p.add_argument(
        "--artifacts",
        default=str(DEFAULT_ARTIFACTS),
        help="artifact store; the run is finalized into ARTIFACTS/runs/<run_id>, not published (`publish` "
        "gates it; default: artifacts)",
    )
    p.add_argument("--out", help="write the run directory here instead")
    p.add_argument("--config", help="YAML or TOML config file")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="train on every process of a torchrun group (gloo on CPU, nccl on CUDA); only rank 0 "
        "reads the log and writes the run: torchrun --nproc_per_node 2 -m recsys_metric.distributed",
    )
    _add_wait_argument(p)
    p.add_argument("--time-budget", type=time_budget_arg, help=TIME_BUDGET_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "run",
        help="the nightly pipeline once: train, evaluate, index, quality gate, publish to ARTIFACTS/current",
        description="Train a new run on the log, compare it with the published model on the same holdout, and "
        "switch ARTIFACTS/current to it only when it passes the quality gate (or with --force).",
    )
    _add_pipeline_arguments(p, progress=True)
    p.add_argument("--force", action="store_true", help="publish even if the quality gate refuses")
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="start training from the current run's models (train.warm_start; cold when it cannot serve)",
    )
    _add_wait_argument(p)
    p.add_argument("--time-budget", type=time_budget_arg, help=TIME_BUDGET_HELP)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "publish",
        help="gate a complete run (e.g. from `train`) against the current one and publish it",
        description="Score the current model on RUN_ID's holdout, apply the quality gate and switch "
        "ARTIFACTS/current to RUN_ID when it passes (exit 3 when it refuses; --force overrides).",
    )
    p.add_argument("run_id", help="a complete run of the store (see `recsys-metric runs`)")
    p.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS), help="artifact store (default: artifacts)")
    p.add_argument("--force", action="store_true", help="publish even if the quality gate refuses")
    _add_wait_argument(p)
    p.set_defaults(func=_cmd_publish)

    p = sub.add_parser(
        "rollback",
        help="publish again the run that was current before this one (or RUN_ID, published before)",
    )
    p.add_argument("run_id", nargs="?", help="a run published before (default: the previous current run)")
    p.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS), help="artifact store (default: artifacts)")
    _add_wait_argument(p)
    p.set_defaults(func=_cmd_rollback)

    for name, func, helptext in (
        ("recommend", _cmd_recommend, "top-K items for a user of the published run"),
        ("similar", _cmd_similar, "items nearest to an item in the published run's metric space"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("user_id" if name == "recommend" else "item_id", help="external id")
        p.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
        p.add_argument(
            "--artifacts",
            default=str(DEFAULT_ARTIFACTS),
            help="artifact store (its current run) or a run directory (default: artifacts)",
        )
        p.add_argument("--exact", action="store_true", help="exact search instead of the Annoy index")
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="skip checking the run's files against its manifest (docs/serving.md: what it costs)",
        )
        if name == "recommend":
            p.add_argument(
                "--include-seen", action="store_true", help="allow items the user already interacted with"
            )
        p.set_defaults(func=func)

    p = sub.add_parser(
        "batch", help="write the top-K recommendation table (partitioned Parquet) for all users"
    )
    p.add_argument("--out", help="output directory for part-*.parquet (needed unless --to is given)")
    p.add_argument(
        "--to",
        help="also load the table into PostgreSQL (postgresql://user@host:port/db, no password: PGPASSWORD or "
        "--password-env); swapped in atomically, the old one kept as TABLE_previous (docs/databases.md)",
    )
    p.add_argument(
        "--table", default="recommendations", help="table name with --to (default: recommendations)"
    )
    p.add_argument(
        "--password-env",
        default="PGPASSWORD",
        help="environment variable with the password (default: PGPASSWORD)",
    )
    p.add_argument(
        "--unlogged",
        action="store_true",
        help="with --to: load an UNLOGGED table, faster but emptied by a server crash and not on replicas "
        "(docs/databases.md)",
    )
    p.add_argument("-k", type=int, default=100, help="items per user (default: 100)")
    p.add_argument("--users", help="text file with one user id per line (default: every user)")
    p.add_argument("--index", choices=["exact", "annoy"], default="exact", help="scoring (default: exact)")
    p.add_argument(
        "--artifacts",
        default=str(DEFAULT_ARTIFACTS),
        help="artifact store (its current run) or a run directory (default: artifacts)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser(
        "serve",
        help="serve the scheduled Prefect deployments: nightly retrain 02:00 UTC, batch table 04:00 UTC "
        "(--retrain-cron/--batch-cron to change)",
        description="Register both flows' deployments with the Prefect server named by PREFECT_API_URL and run "
        "them on schedule in this process until interrupted. Needs `prefect server start` running.",
    )
    _add_pipeline_arguments(p, progress=False)
    p.add_argument("--out", help="parent of the batch tables (default: ARTIFACTS/recommendations)")
    p.add_argument("-k", type=int, default=100, help="items per user in the batch table (default: 100)")
    p.add_argument(
        "--retrain-cron",
        default="0 2 * * *",
        help="when the nightly retrain runs, cron in UTC (default: '0 2 * * *')",
    )
    p.add_argument(
        "--batch-cron",
        default="0 4 * * *",
        help="when the batch table is written, cron in UTC (default: '0 4 * * *')",
    )
    p.add_argument(
        "--name-suffix",
        help="append -SUFFIX to both deployment names, e.g. a trial with --retrain-cron '* * * * *' "
        "--name-suffix test next to the real deployments (docs/scheduling.md)",
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="the nightly retrain starts from the current run's models (train.warm_start)",
    )
    p.set_defaults(func=_cmd_serve)

    from recsys_metric.serving.cli_api import add_api_parser

    add_api_parser(sub, _cmd_api, default_artifacts=str(DEFAULT_ARTIFACTS))

    p = sub.add_parser("runs", help="list runs, their holdout recall, and which one is current")
    p.add_argument("--artifacts", default=str(DEFAULT_ARTIFACTS), help="artifact store (default: artifacts)")
    p.set_defaults(func=_cmd_runs)

    p = sub.add_parser(
        "generate-data",
        help="write a synthetic interaction log (the bundled default data, or a large one for benchmarks)",
    )
    p.add_argument("--out", default="data", help="output directory (default: data)")
    p.add_argument("--n-users", type=int, help="number of users (default: the bundled size)")
    p.add_argument("--n-items", type=int, help="number of items")
    p.add_argument("--n-interactions", type=int, help="number of interactions")
    p.add_argument(
        "--seed",
        type=int,
        help="random seed (default: the bundled data's)",
    )
    p.add_argument(
        "--id-type",
        choices=["int", "str"],
        help="external id type (default: the bundled data's)",
    )
    p.add_argument(
        "--parts",
        action="store_true",
        help="stream a large log to OUT/interactions/part-*.parquet with bounded memory",
    )
    p.set_defaults(func=_cmd_generate_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if getattr(args, "interactions", "") is None:
        try:
            args.interactions = load_config(getattr(args, "config", None)).data.source or str(DEFAULT_DATA)
        except RecsysMetricError as err:
            print(f"recsys-metric {args.command}: error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
    from recsys_metric.cli_errors import run_command

    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
