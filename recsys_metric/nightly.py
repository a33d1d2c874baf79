"""The nightly pipeline as plain Python: train a new run, gate it, publish it only when it is good.

One call does what the Prefect flow does, in the same order and with the same library calls::

    new run dir (runs/.tmp-<id>) -> train_run (prepare, train, evaluate, export, index)
      -> score the current model on this run's holdout -> quality gate
      -> finalize (manifest with sha256 of every file; rename to runs/<id>)
      -> publish (atomic switch of `current`) only when the gate says so -> prune old runs

A crash anywhere before ``publish`` leaves ``current`` untouched: the half-written run stays in a
``.tmp-`` directory that is never listed, published, or served, and is pruned later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys_metric.config import Config
from recsys_metric.pipeline import RunResult, train_run
from recsys_metric.registry import ArtifactStore, GateDecision, gate, score_current_on_holdout

logger = logging.getLogger(__name__)


@dataclass
class NightlyResult:
    """Outcome of :func:`run_nightly`."""

    run_id: str
    run_dir: Path
    decision: GateDecision
    published: bool
    previous_run_id: str | None
    current_on_holdout: dict[str, Any] | None
    run: RunResult
    pruned: list[str]


def run_nightly(
    interactions: str | Path,
    artifacts: str | Path,
    config: Config | None = None,
    *,
    items: str | Path | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> NightlyResult:
    """Train, evaluate, gate and (maybe) publish one run under ``artifacts``.

    Args:
        interactions: the interaction log.
        artifacts: the artifact store root (``runs/`` and ``current`` live there).
        config: pipeline config (defaults when None).
        items: item feature table, when ``model.item_features`` is set.
        force: publish even when the gate refuses (the reason records the override).
        progress: progress bars (None: when stderr is a terminal).

    Returns:
        The run id and directory, the gate decision and whether ``current`` moved.
    """
    config = config or Config()
    store = ArtifactStore(artifacts, config.publish)
    pending = store.new_run()
    run_id = store.run_id_of(pending)
    previous = store.current()
    run = train_run(
        interactions,
        pending,
        config,
        items=items,
        run_id=run_id,
        progress=progress,
        warm_start_from=store.run_dir(previous) if previous is not None else None,
    )

    current_on_holdout = None
    if previous is not None:
        current_on_holdout = score_current_on_holdout(store.run_dir(previous), pending, config)
    decision = gate(
        run.metrics,
        None if current_on_holdout is None else current_on_holdout["metrics"],
        config.publish,
        force=force,
    )
    logger.info("quality gate: %s", decision.reason)
    store.finalize(
        pending,
        config=config,
        input_path=interactions,
        extra={"gate": decision.to_dict(), "current_on_holdout": current_on_holdout},
    )
    if decision.publish:
        store.publish(run_id)
    pruned = store.prune()
    return NightlyResult(
        run_id=run_id,
        run_dir=store.run_dir(run_id),
        decision=decision,
        published=decision.publish,
        previous_run_id=previous,
        current_on_holdout=current_on_holdout,
        run=run,
        pruned=pruned,
    )
