"""The nightly retraining flow: :func:`recsys_metric.nightly.run_nightly`, one task per stage.

Tasks call the library and hand each other paths (the run directory), never frames or models,
so Prefect's default cache policy would have nothing large to hash; every task still uses
``NO_CACHE`` because a nightly run must never be served from an earlier run's cache::

    open_run -> prepare (reads the log; retried on OSError) -> train_and_evaluate -> build_index
      -> score_current (the published run's holdout model on this run's holdout) -> gate -> report
      -> finalize -> publish (retried on OSError; only when the gate passes) -> prune

``publish`` is the only task that moves ``current``, and it runs after everything else that can
fail: a crash in any earlier task leaves ``current`` where it was, and the half-written run stays
in ``runs/.tmp-<id>`` until a later ``prune`` removes it. A re-run starts a fresh run directory.

Each run leaves two Prefect artifacts: a markdown report (``nightly-retrain-report``) and a table
(``nightly-retrain-metrics``) with this run's holdout metrics beside the published run's (scored
on the same holdout) and popularity's, and the gate's reason.

Run it once, with a temporary local Prefect API (about 5-10 s to start) or the server named by
``PREFECT_API_URL``::

    python -m flows.nightly_retrain --interactions data/interactions.parquet --artifacts artifacts

``recsys-metric run`` does the same work without Prefect; ``recsys-metric serve`` schedules this
flow (``flows.deployments``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recsys_metric import pipeline, registry
from recsys_metric.config import Config, load_config
from recsys_metric.data import prepare as data_prepare
from recsys_metric.registry import ArtifactStore

REPORT_KEY = "nightly-retrain-report"
METRICS_KEY = "nightly-retrain-metrics"
IO_RETRIES = 2
IO_RETRY_DELAYS = [2, 5]


def _retry_on_os_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures only: bad data or a bad config fails the same way on every try."""
    return isinstance(state.result(raise_on_failure=False), OSError)


@task(cache_policy=NO_CACHE)
def open_run(artifacts: str, config: Config) -> str:
    """Create ``runs/.tmp-<run_id>`` in the store; returns its path."""
    pending = ArtifactStore(artifacts, config.publish).new_run()
    get_run_logger().info("new run directory %s", pending)
    return str(pending)


@task(
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=_retry_on_os_error,
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


@task(cache_policy=NO_CACHE)
def train_and_evaluate(
    run_dir: str, config: Config, items: str | None, run_id: str, prepare_seconds: float
) -> dict[str, Any]:
    """Train, evaluate on the holdout, refit and export from the prepared files; returns the holdout metrics."""
    result = pipeline.train_and_evaluate(
        run_dir, config, items=items, run_id=run_id, progress=False, prepare_seconds=prepare_seconds
    )
    es = result.metrics["early_stopping"]
    get_run_logger().info(
        "trained: best epoch %s of %s by validation %s\n%s",
        es["best_epoch"],
        es["epochs_run"],
        es["metric"],
        result.evaluation.to_table(),
    )
    return result.metrics["holdout"]


@task(cache_policy=NO_CACHE)
def build_index(run_dir: str, config: Config) -> dict[str, Any] | None:
    """Build the Annoy index into ``run_dir``; returns its recall and latency figures."""
    index = pipeline.index_run(run_dir, config)["index"]
    get_run_logger().info(
        "Annoy index: recall@10 %.3f against exact search, p50 %.2f ms",
        index["recall_at_10"],
        index["p50_ms"],
    )
    return index


@task(cache_policy=NO_CACHE)
def score_current(artifacts: str, run_dir: str, config: Config) -> dict[str, Any] | None:
    """The published run's holdout model on this run's holdout (None when nothing is published)."""
    store = ArtifactStore(artifacts, config.publish)
    current = store.current()
    if current is None:
        get_run_logger().info("no published run: the gate compares with popularity only")
        return None
    scored = registry.score_current_on_holdout(store.run_dir(current), run_dir, config)
    get_run_logger().info(
        "current run %s on this holdout: recall@%d %.4f",
        current,
        scored["k"],
        scored["metrics"][f"recall@{scored['k']}"],
    )
    return scored


@task(cache_policy=NO_CACHE)
def decide(
    holdout: Mapping[str, Any], current_on_holdout: Mapping[str, Any] | None, config: Config, force: bool
) -> dict[str, Any]:
    """The quality gate (:func:`recsys_metric.registry.gate`); returns the decision as a dict."""
    decision = registry.gate(
        {"holdout": holdout},
        None if current_on_holdout is None else current_on_holdout["metrics"],
        config.publish,
        force=force,
    )
    get_run_logger().info("quality gate: %s", decision.reason)
    return decision.to_dict()


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


@task(cache_policy=NO_CACHE)
def report(
    run_id: str,
    holdout: Mapping[str, Any],
    current_on_holdout: Mapping[str, Any] | None,
    decision: Mapping[str, Any],
) -> None:
    """Publish the run's markdown and table artifacts to the Prefect API."""
    rows = metrics_rows(run_id, holdout, current_on_holdout)
    create_table_artifact(rows, key=METRICS_KEY, description=f"holdout metrics of run {run_id}")
    create_markdown_artifact(
        report_markdown(run_id, rows, decision), key=REPORT_KEY, description=f"nightly retrain {run_id}"
    )


@task(cache_policy=NO_CACHE)
def finalize(artifacts: str, run_dir: str, config: Config, interactions: str, extra: dict[str, Any]) -> str:
    """Write the manifest and rename the run to ``runs/<run_id>`` (complete, read-only)."""
    store = ArtifactStore(artifacts, config.publish)
    manifest = store.finalize(run_dir, config=config, input_path=interactions, extra=extra)
    final = store.run_dir(manifest.run_id)
    get_run_logger().info("finalized %s (%d files)", final, len(manifest.files))
    return str(final)


@task(
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
    retry_condition_fn=_retry_on_os_error,
)
def publish(artifacts: str, run_id: str, config: Config) -> str | None:
    """Switch ``current`` to the run atomically; returns the previously published run id."""
    previous = ArtifactStore(artifacts, config.publish).publish(run_id)
    get_run_logger().info("published %s (was %s)", run_id, previous)
    return previous


@task(cache_policy=NO_CACHE)
def prune(artifacts: str, config: Config) -> list[str]:
    """Delete old runs and crash debris (never the published run); returns the deleted names."""
    deleted = ArtifactStore(artifacts, config.publish).prune()
    if deleted:
        get_run_logger().info("pruned %s", ", ".join(deleted))
    return deleted


@flow(name="nightly-retrain")
def nightly_retrain(
    interactions: str = "data/interactions.parquet",
    artifacts: str = "artifacts",
    config_path: str | None = None,
    force: bool = False,
    items: str | None = None,
) -> dict[str, Any]:
    """Train a new run, gate it against the published one, and publish it only when it passes.

    Args:
        interactions: the interaction log (file, Parquet directory or glob).
        artifacts: the artifact store root (``runs/`` and ``current``).
        config_path: YAML or TOML config; defaults when None.
        force: publish even when the gate refuses (the reason records the override).
        items: item feature table, when ``model.item_features`` is set.

    Returns:
        ``run_id``, ``run_dir``, ``published``, ``reason`` (the gate's), ``decision`` (all its
        figures), ``previous_run_id`` (published before this run), ``current_run_id`` (published
        after it), ``metrics`` (rows of the report table), ``index`` and ``pruned``.
    """
    config = load_config(config_path)
    pending = open_run(artifacts, config)
    run_id = ArtifactStore(artifacts).run_id_of(pending)
    prepare_seconds = prepare(interactions, pending, config)
    holdout = train_and_evaluate(pending, config, items, run_id, prepare_seconds)
    index = build_index(pending, config)
    current_on_holdout = score_current(artifacts, pending, config)
    decision = decide(holdout, current_on_holdout, config, force)
    report(run_id, holdout, current_on_holdout, decision)
    run_dir = finalize(
        artifacts,
        pending,
        config,
        interactions,
        {"gate": decision, "current_on_holdout": current_on_holdout},
    )
    previous = current_on_holdout["run_id"] if current_on_holdout is not None else None
    if decision["publish"]:
        previous = publish(artifacts, run_id, config)
    pruned = prune(artifacts, config)
    return {
        "run_id": run_id,
        "run_dir": run_dir,
        "published": bool(decision["publish"]),
        "reason": decision["reason"],
        "decision": decision,
        "previous_run_id": previous,
        "current_run_id": ArtifactStore(artifacts).current(),
        "metrics": metrics_rows(run_id, holdout, current_on_holdout),
        "index": index,
        "pruned": pruned,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.nightly_retrain", description=nightly_retrain.__doc__
    )
    parser.add_argument("--interactions", default="data/interactions.parquet")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--config", dest="config_path")
    parser.add_argument("--items")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    result = nightly_retrain(**vars(args))
    print(f"run {result['run_id']}: {'published' if result['published'] else 'NOT published'}")
    print(f"quality gate: {result['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
