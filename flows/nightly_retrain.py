"""The nightly retraining flow: :func:`recsys_metric.nightly.run_nightly` as five or six tasks.

Tasks call the library and hand each other paths (the run directory) and small dicts of figures,
never frames or models; every task uses ``NO_CACHE`` (a nightly run must never be served from an
earlier run's cache, and the default policy would hash every argument on every call) and
``persist_result=False`` (nothing is written to Prefect's result storage)::

    (flow body, holding the store's writer lock ARTIFACTS/.lock until the end: remove dead
     runs' debris, free-space check, new run directory runs/.tmp-<id>, read which run is published)
    prepare (reads the log; retried on transient errors: a log still being written, I/O)
      -> train (train with early stopping, evaluate on the holdout, refit, export, Annoy index)
      -> gate (the published run's holdout model on this run's holdout, the quality gate, both
         artifacts) -> finalize -> publish (retried on transient errors; only when the gate passes) -> prune

A task boundary is kept where it buys something: a retry that re-runs only I/O (``prepare``,
``publish``), a stage whose failure must leave ``current`` alone (everything before ``publish``),
or a stage worth its own state and duration in the UI. Each task costs about 15 ms in the flow
and 40 ms of the API server's CPU (bench/orchestration.py), so stages that only compute a little
more (index after training, gate decision after scoring, the report) share a task.

``publish`` is the only task that moves ``current``, and it runs after everything else that can
fail: a failure in any earlier task leaves ``current`` where it was and removes the half-written
``runs/.tmp-<id>`` (a killed flow leaves it to the next writer, which removes it when it takes
the lock). A re-run starts a fresh run directory. Another writer on the store (a ``recsys-metric
run``, another deployment) makes the flow fail at once, naming it, or wait (``lock_wait_s``).

Each run leaves two Prefect artifacts: a markdown report (``nightly-retrain-report-<store>``) and
a table (``nightly-retrain-metrics-<store>``) with this run's holdout metrics beside the published
run's (scored on the same holdout) and popularity's, and the gate's reason. The keys name the
artifact store and, for a scheduled run, the deployment (:func:`report_keys`), so that two
stores or a trial deployment on one server never overwrite each other's latest report.

Nothing is written to Prefect's result storage: the tasks and the flow have
``persist_result=False``, so a failed run does not pickle its exception there either (the
exception and its traceback are in the flow run's state message and logs).

Run it once, with a temporary local Prefect API (10-20 s to start) or the server named by
``PREFECT_API_URL`` (:func:`run_once`: without the flow-run heartbeat)::

    python -m flows.nightly_retrain --interactions data/interactions.parquet --artifacts artifacts

``recsys-metric run`` does the same work without Prefect; ``recsys-metric serve`` schedules this
flow (``flows.deployments``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    Settings,
    get_current_settings,
    temporary_settings,
)

from flows.artifact_keys import artifact_key, current_deployment_name
from flows.run_states import failed_state
from recsys_metric import nightly, pipeline, registry
from recsys_metric.cli_errors import run_command
from recsys_metric.config import Config, load_config
from recsys_metric.data import prepare as data_prepare
from recsys_metric.errors import is_transient
from recsys_metric.registry import ArtifactStore

REPORT_KEY = "nightly-retrain-report"
"""Base of the markdown report's key; the key itself names the store (:func:`report_keys`)."""
METRICS_KEY = "nightly-retrain-metrics"
"""Base of the metrics table's key."""
IO_RETRIES = 2
IO_RETRY_DELAYS = [2, 5]


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only (:func:`recsys_metric.errors.is_transient`: a log still being
    written, an I/O or connection error); bad data or a bad config fails the same way on every try."""
    return is_transient(state.result(raise_on_failure=False))


def report_keys(artifacts: str, deployment: str | None = None) -> tuple[str, str]:
    """(report key, metrics key) of the store ``artifacts`` in ``deployment`` (see flows.artifact_keys)."""
    return artifact_key(REPORT_KEY, artifacts, deployment), artifact_key(METRICS_KEY, artifacts, deployment)


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=_retry_transient,
)
def prepare(interactions: str, run_dir: str, config: Config) -> float:
    """Read, validate, encode, label, split the log into ``run_dir``; returns the wall seconds."""
    started = time.perf_counter()
    prepared = data_prepare.prepare_dataset(interactions, run_dir, config)
    seconds = time.perf_counter() - started
    v = prepared.validation
    get_run_logger().info(
        "prepared %d interactions (%d users, %d items, %d rejected) in %.1f s",
        prepared.interactions.height,
        len(prepared.users),
        len(prepared.items),
        v.n_rejected,
        seconds,
    )
    return seconds


@task(cache_policy=NO_CACHE, persist_result=False)
def train(
    run_dir: str,
    config: Config,
    items: str | None,
    run_id: str,
    prepare_seconds: float,
    warm_start_from: str | None,
) -> dict[str, Any]:
    """Train, evaluate on the holdout, refit, export and index the prepared run directory.

    ``warm_start_from`` is the published run's directory (None when nothing is published); it is
    used only when ``train.warm_start`` is on.

    Returns:
        ``holdout`` (the holdout metrics of ``metrics.json``) and ``index`` (the Annoy index's
        recall@10 against exact search and query latencies).
    """
    result = pipeline.train_and_evaluate(
        run_dir,
        config,
        items=items,
        run_id=run_id,
        progress=False,
        prepare_seconds=prepare_seconds,
        warm_start_from=warm_start_from,
    )
    es = result.metrics["early_stopping"]
    logger = get_run_logger()
    logger.info(
        "trained: best epoch %s of %s by validation %s\n%s",
        es["best_epoch"],
        es["epochs_run"],
        es["metric"],
        result.evaluation.to_table(),
    )
    index = pipeline.index_run(run_dir, config)["index"]
    logger.info(
        "Annoy index: recall@10 %.3f against exact search, p50 %.2f ms",
        index["recall_at_10"],
        index["p50_ms"],
    )
    return {"holdout": result.metrics["holdout"], "index": index}


@task(cache_policy=NO_CACHE, persist_result=False)
def gate(
    current_dir: str | None,
    run_dir: str,
    run_id: str,
    holdout: Mapping[str, Any],
    config: Config,
    force: bool,
    keys: tuple[str, str] = (REPORT_KEY, METRICS_KEY),
) -> dict[str, Any]:
    """Score the published run on this run's holdout, apply the quality gate, publish the artifacts.

    The published run's (``current_dir``) holdout model is scored on this run's holdout
    (:func:`recsys_metric.registry.score_current_on_holdout`; skipped when ``current_dir`` is
    None), :func:`recsys_metric.registry.gate` decides, and the run's markdown report and metrics
    table go to the Prefect API under ``keys`` (report, metrics: :func:`report_keys`).

    Returns:
        ``decision`` (the gate's decision as a dict), ``current_on_holdout`` (the published run's
        scoring, or None) and ``metrics`` (the rows of the report table).
    """
    logger = get_run_logger()
    current_on_holdout = None
    if current_dir is None:
        logger.info("no published run: the gate compares with popularity only")
    else:
        current_on_holdout = registry.score_current_on_holdout(current_dir, run_dir, config)
        logger.info(
            "current run %s on this holdout: recall@%d %.4f",
            current_on_holdout["run_id"],
            current_on_holdout["k"],
            current_on_holdout["metrics"][f"recall@{current_on_holdout['k']}"],
        )
    decision = registry.gate(
        {"holdout": holdout},
        None if current_on_holdout is None else current_on_holdout["metrics"],
        config.publish,
        force=force,
    ).to_dict()
    if nightly.kept_warm_start_point(json.loads((Path(run_dir) / "metrics.json").read_text())):
        decision["reason"] += nightly.NOTHING_CHANGED
    logger.info("quality gate: %s", decision["reason"])
    rows = metrics_rows(run_id, holdout, current_on_holdout)
    report_key, metrics_key = keys
    create_table_artifact(rows, key=metrics_key, description=f"holdout metrics of run {run_id}")
    create_markdown_artifact(
        report_markdown(run_id, rows, decision), key=report_key, description=f"nightly retrain {run_id}"
    )
    return {"decision": decision, "current_on_holdout": current_on_holdout, "metrics": rows}


def metrics_rows(
    run_id: str, holdout: Mapping[str, Any], current_on_holdout: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per model on this run's holdout: this run, the published run (when any), popularity.

    Each row has ``model``, ``run_id`` and every ``metric@K`` of this run's evaluation (rounded to
    4 decimals; None where the published run's scoring did not compute it).
    """
    models = holdout["models"]
    keys = list(models["model"])
    rows = [{"model": "candidate", "run_id": run_id, **{k: models["model"][k] for k in keys}}]
    if current_on_holdout is not None:
        current = current_on_holdout["metrics"]
        rows.append(
            {"model": "current", "run_id": current_on_holdout["run_id"], **{k: current.get(k) for k in keys}}
        )
    if "popularity" in models:
        rows.append({"model": "popularity", "run_id": None, **{k: models["popularity"].get(k) for k in keys}})
    for row in rows:
        for k in keys:
            if row[k] is not None:
                row[k] = round(float(row[k]), 4)
    return rows


def report_markdown(run_id: str, rows: Sequence[Mapping[str, Any]], decision: Mapping[str, Any]) -> str:
    """Markdown report of one run: the metrics table and the gate's decision and reason."""
    columns = list(rows[0])
    lines = [
        f"# Nightly retrain {run_id}",
        "",
        f"**Gate:** {'publish' if decision['publish'] else 'refuse'} (recall@{decision['k']})",
        "",
        decision["reason"],
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join("" if row[c] is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


@task(cache_policy=NO_CACHE, persist_result=False)
def finalize(artifacts: str, run_dir: str, config: Config, interactions: str, extra: dict[str, Any]) -> str:
    """Write the manifest and rename the run to ``runs/<run_id>`` (complete, read-only)."""
    store = ArtifactStore(artifacts, config.publish)
    manifest = store.finalize(run_dir, config=config, input_path=interactions, extra=extra)
    final = store.run_dir(manifest.run_id)
    get_run_logger().info("finalized %s (%d files)", final, len(manifest.files))
    return str(final)


@task(
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=_retry_transient,
)
def publish(artifacts: str, run_id: str, config: Config, force: bool = False) -> str | None:
    """Switch ``current`` to the run atomically; returns the previously published run id."""
    previous = ArtifactStore(artifacts, config.publish).publish(run_id, forced=force)
    get_run_logger().info("published %s (was %s)", run_id, previous)
    return previous


@task(cache_policy=NO_CACHE, persist_result=False)
def prune(artifacts: str, config: Config) -> list[str]:
    """Delete old runs and crash debris (never the published run); returns the deleted names."""
    deleted = ArtifactStore(artifacts, config.publish).prune()
    if deleted:
        get_run_logger().info("pruned %s", ", ".join(deleted))
    return deleted


@flow(name="nightly-retrain", persist_result=False)
def nightly_retrain(
    interactions: str | None = None,
    artifacts: str = "artifacts",
    config_path: str | None = None,
    force: bool = False,
    items: str | None = None,
    warm_start: bool | None = None,
    lock_wait_s: float | None = 0.0,
) -> dict[str, Any]:
    """Train a new run, gate it against the published one, and publish it only when it passes.

    The flow holds the store's one-writer lock (``ARTIFACTS/.lock``) from start to end, like
    ``recsys-metric run``: another writer (a run, a train, a publish, another deployment) makes
    it fail with the holder named, or wait with ``lock_wait_s``. Prefect's concurrency limits
    may add to this, never replace it.

    Args:
        interactions: the interaction log (file, Parquet directory or glob, or a database URI:
            ``postgresql://user@host/db``, ``duckdb:///path``; docs/databases.md); None: the
            config's ``data.source``, else ``data/interactions.parquet``.
        artifacts: the artifact store root (``runs/`` and ``current``).
        config_path: YAML or TOML config; defaults when None.
        force: publish even when the gate refuses (the reason records the override).
        items: item feature table, when ``model.item_features`` is set.
        warm_start: start training from the published run's models (``train.warm_start``);
            None keeps the config's setting.
        lock_wait_s: when another process writes to the store: 0 fails at once, a number of
            seconds waits that long at most, None waits until it finishes.

    Returns:
        ``run_id``, ``run_dir``, ``published``, ``reason`` (the gate's), ``decision`` (all its
        figures), ``previous_run_id`` (published before this run), ``current_run_id`` (published
        after it), ``metrics`` (rows of the report table), ``index`` and ``pruned``.

    Raises:
        What the failed step raised; the flow run ends ``Failed`` without writing the exception
        to Prefect's result storage (:func:`flows.run_states.failed_state`).
    """
    try:
        return _nightly_retrain(interactions, artifacts, config_path, force, items, warm_start, lock_wait_s)
    except Exception as exc:  # noqa: BLE001 - returned as the run's Failed state, raised to the caller
        return failed_state(exc)  # type: ignore[return-value]


def _nightly_retrain(
    interactions: str,
    artifacts: str,
    config_path: str | None,
    force: bool,
    items: str | None,
    warm_start: bool | None,
    lock_wait_s: float | None,
) -> dict[str, Any]:
    config = load_config(config_path)
    interactions = interactions or config.data.source or "data/interactions.parquet"
    if warm_start is not None:
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"warm_start": warm_start})}
        )
    nightly.check_input_exists(interactions)
    store = ArtifactStore(artifacts, config.publish)
    with store.writer(wait=lock_wait_s, purpose="nightly-retrain flow") as cleaned:
        logger = get_run_logger()
        if cleaned:
            logger.warning("removed the debris of dead runs: %s", ", ".join(cleaned))
        needed = store.check_space(interactions)
        # A mkdir: not worth a task of its own (a failure here fails the flow before any work).
        pending = str(store.new_run())
        run_id = store.run_id_of(pending)
        # Read once, as run_nightly does: the run it warm-starts from is the one it is gated against.
        current = store.current()
        current_dir = None if current is None else str(store.run_dir(current))
        logger.info("new run directory %s (published run: %s)", pending, current)
        try:
            prepare_seconds = prepare(interactions, pending, config)
            trained = train(pending, config, items, run_id, prepare_seconds, current_dir)
            keys = report_keys(artifacts, current_deployment_name())
            gated = gate(current_dir, pending, run_id, trained["holdout"], config, force, keys)
            decision, current_on_holdout = gated["decision"], gated["current_on_holdout"]
            run_dir = finalize(
                artifacts,
                pending,
                config,
                interactions,
                {"gate": decision, "current_on_holdout": current_on_holdout},
            )
        except BaseException as err:
            # This run's own temporary directory goes (a crash leaves it to the next writer).
            full = nightly._failed(store, Path(pending), err, run_id, needed)
            if full is not None:
                raise full from err
            raise
        previous = current_on_holdout["run_id"] if current_on_holdout is not None else None
        if decision["publish"] and store.current() != current:
            # Cannot happen while every writer takes the lock; one that bypassed it is caught here.
            logger.warning(
                "current moved from %s to %s during this run; gating again", current, store.current()
            )
            metrics = json.loads(Path(run_dir, "metrics.json").read_text())
            _, redo = nightly.gate_against_current(
                store, store.current(), Path(run_dir), metrics, config, force=force
            )
            decision, previous = redo.to_dict(), store.current()
            logger.info("quality gate (again): %s", decision["reason"])
        if decision["publish"]:
            previous = publish(artifacts, run_id, config, force)
        pruned = prune(artifacts, config)
    return {
        "run_id": run_id,
        "run_dir": run_dir,
        "published": bool(decision["publish"]),
        "reason": decision["reason"],
        "decision": decision,
        "previous_run_id": previous,
        "current_run_id": store.current(),
        "metrics": gated["metrics"],
        "index": trained["index"],
        "pruned": pruned,
    }


def one_off_settings(settings: Settings) -> dict[Any, Any]:
    """Setting updates for a run started by hand: no flow-run heartbeat, unless one is configured.

    Prefect's heartbeat (a thread that emits an event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
    s, default 180) feeds a server's zombie-run automations; when the flow ends it waits for the
    thread's 1 s sleep steps: 0.5 s on average, up to 1 s per run. A run started by hand has
    someone watching it. A value the user set (environment or profile) is kept.
    """
    if "heartbeat_frequency" in settings.flows.model_fields_set:
        return {}
    return {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}


def run_once(**params: Any) -> dict[str, Any]:
    """Run :func:`nightly_retrain` once in this process with :func:`one_off_settings`.

    The settings apply to this call only (``temporary_settings``): nothing of the user's Prefect
    configuration changes. Scheduled runs (``recsys-metric serve``) run in Prefect's runner and
    keep its heartbeat.

    Args:
        params: the parameters of :func:`nightly_retrain`.

    Returns:
        The flow's result.
    """
    with temporary_settings(updates=one_off_settings(get_current_settings())):
        return nightly_retrain(**params)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.nightly_retrain", description=nightly_retrain.__doc__
    )
    parser.add_argument(
        "--interactions",
        help="log path or database URI (default: data.source, else data/interactions.parquet)",
    )
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--config", dest="config_path")
    parser.add_argument("--items")
    parser.add_argument("--force", action="store_true")
    parser.add_argument(
        "--warm-start", action="store_true", default=None, help="start from the published run's models"
    )
    args = parser.parse_args(argv)

    def run(_: argparse.Namespace) -> int:
        load_config(args.config_path)  # a bad config fails here, before a Prefect API is started
        result = run_once(**vars(args))
        print(f"run {result['run_id']}: {'published' if result['published'] else 'NOT published'}")
        print(f"quality gate: {result['reason']}")
        return 0

    # A bad config or log is one line and exit 2, as with recsys-metric run.
    return run_command(argparse.Namespace(func=run, prog=parser.prog, verbose=False))


if __name__ == "__main__":
    sys.exit(main())
