"""The nightly pipeline as plain Python: train a new run, gate it, publish it only when it is good.

One call does what the Prefect flow does, in the same order and with the same library calls::

    take the store's writer lock (ARTIFACTS/.lock; remove dead runs' debris) -> free-space check
      -> new run dir (runs/.tmp-<id>) -> train_run (prepare, train, evaluate, export, index)
      -> score the current model on this run's holdout -> quality gate
      -> finalize (manifest with sha256 of every file; read-only; rename to runs/<id>)
      -> re-check the gate if `current` moved -> publish (atomic switch of `current`) only when
         the gate says so -> prune old runs -> release the lock

The lock is held from start to end, so no other writer (``run``, ``train``, ``publish``,
``rollback``, the flow) can publish between this run's gate and its publish. A failure before
``finalize`` removes this run's ``.tmp-`` directory; a crash (``kill -9``) leaves it, and the
next writer removes it when it takes the lock. ``current`` is untouched either way.

:func:`publish_run` and :func:`rollback_run` are ``recsys-metric publish`` and ``rollback``;
:func:`train_into_store` is ``recsys-metric train`` without ``--out`` (a finalized run, not
published).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from recsys_metric.config import Config, config_from_dict
from recsys_metric.errors import DataError
from recsys_metric.pipeline import RunResult, train_run
from recsys_metric.registry import (
    ArtifactStore,
    DiskSpaceError,
    GateDecision,
    RegistryError,
    _input_files,
    _read_json,
    _remove_tree,
    gate,
    score_current_on_holdout,
)
from recsys_metric.store.space import fmt_bytes, free_bytes, is_disk_full

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


@dataclass
class PublishResult:
    """Outcome of :func:`publish_run` / :func:`rollback_run`.

    Attributes:
        run_id: the run asked for.
        published: ``current`` now names it (False: the gate refused, or it already was current).
        previous_run_id: ``current`` before the call.
        decision: the gate's decision; None for a rollback or a run that already was current.
        current_on_holdout: the current model scored on the run's holdout (None without one).
    """

    run_id: str
    published: bool
    previous_run_id: str | None
    decision: GateDecision | None
    current_on_holdout: dict[str, Any] | None


def check_input_exists(path: str | os.PathLike[str], what: str = "interaction log") -> None:
    """Raise :class:`DataError` when a file input matches no file, before anything is written.

    URIs (``scheme://...``: databases) are left to their readers.
    """
    text = os.fspath(path)
    if "://" in text:
        return
    _, files = _input_files(text)
    if not files:
        raise DataError(f"{what} {text} does not exist (no file matches it); nothing was written")


def gate_against_current(
    store: ArtifactStore,
    current_id: str | None,
    candidate_dir: Path,
    candidate_metrics: dict[str, Any],
    config: Config,
    *,
    force: bool,
) -> tuple[dict[str, Any] | None, GateDecision]:
    """Score ``current_id``'s holdout model on the candidate's holdout and apply the quality gate.

    Returns:
        ``(current_on_holdout, decision)``; ``current_on_holdout`` is None without a current run.
    """
    current_on_holdout = None
    if current_id is not None:
        current_on_holdout = score_current_on_holdout(store.run_dir(current_id), candidate_dir, config)
    decision = gate(
        candidate_metrics,
        None if current_on_holdout is None else current_on_holdout["metrics"],
        config.publish,
        force=force,
    )
    if kept_warm_start_point(candidate_metrics):
        decision = replace(decision, reason=decision.reason + NOTHING_CHANGED)
    return current_on_holdout, decision


NOTHING_CHANGED = (
    "; nothing changed: no epoch of this warm run beat its starting point (the current run's model), "
    "so it carries that model on unchanged"
)
"""Appended to the gate's reason when :func:`kept_warm_start_point` holds."""


def kept_warm_start_point(metrics: dict[str, Any]) -> bool:
    """True when a warm run's best epoch was epoch 0, its starting point: the log brought nothing that
    training could use (e.g. an unchanged log), and the model it exports is the one it started from."""
    warm = metrics.get("warm_start") or {}
    best = (metrics.get("early_stopping") or {}).get("best_epoch")
    return bool(warm.get("enabled")) and best == 0


def _discard(store: ArtifactStore, pending: Path) -> None:
    """Remove a failed run's own temporary directory (best effort: the next writer retries)."""
    try:
        if pending.exists():
            _remove_tree(pending)
    except OSError as err:
        logger.warning("could not remove %s (%s); the next run removes it", pending, err)


NEARLY_FULL_BYTES = 1024 * 1024
"""A run that fails with less free space than this left is reported as a full disk: some writers
hide ENOSPC (torch.save raises ``RuntimeError: ... unexpected pos``)."""


def _failed(
    store: ArtifactStore, pending: Path, err: BaseException, run_id: str, needed: int
) -> DiskSpaceError | None:
    """Clean up after a run that failed before it was complete: remove its own ``.tmp-``
    directory; return the one-line error to raise instead when the disk was full."""
    full = isinstance(err, Exception) and (
        is_disk_full(err) or free_bytes(store.runs_dir) < NEARLY_FULL_BYTES  # measured before the cleanup
    )
    written = _tree_bytes(pending) if full else 0
    _discard(store, pending)
    return _disk_full(store, err, run_id, max(needed, written), written) if full else None


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _disk_full(
    store: ArtifactStore, err: BaseException, run_id: str, needed: int, written: int = 0
) -> DiskSpaceError:
    where = store.runs_dir
    free = free_bytes(where)
    cause = " ".join(f"{type(err).__name__}: {err}".split())[:300]  # one line, whatever the library said
    return DiskSpaceError(
        f"disk full in {where} while writing run {run_id} ({cause}); its temporary directory was "
        f"removed. The run needs more than {fmt_bytes(needed)} (it had written {fmt_bytes(written)}), "
        f"{fmt_bytes(free)} are free now: free some space (or lower publish.keep_runs) and run again",
        directory=where,
        needed=needed,
        free=free,
    )


@dataclass
class _PendingRun:
    """A run being written under the store's writer lock (:func:`_writing_run`)."""

    store: ArtifactStore
    path: Path  # runs/.tmp-<id> until finalize
    run_id: str
    current: str | None  # the published run when the lock was taken
    finalized: bool = False

    def finalize(self, **manifest: Any) -> Path:
        """:meth:`ArtifactStore.finalize` (manifest, read-only, rename); returns the final directory.
        From here on a failure no longer removes the run: it is complete."""
        self.store.finalize(self.path, **manifest)
        self.finalized = True
        return self.store.run_dir(self.run_id)


@contextlib.contextmanager
def _writing_run(
    store: ArtifactStore,
    interactions: str | Path,
    items: str | Path | None,
    *,
    wait: float | None,
    purpose: str,
) -> Iterator[_PendingRun]:
    """The prologue and failure path every writer of a new run shares.

    Checks that the inputs exist (before anything is written), takes the store's writer lock for
    the whole block (logging the debris of dead runs it removed), checks the free space and
    creates ``runs/.tmp-<id>``. A failure before :meth:`_PendingRun.finalize` removes that
    directory and is re-raised, as a one-line :class:`DiskSpaceError` when the disk was full; a
    failure after it leaves the complete run in place.
    """
    check_input_exists(interactions)
    if items is not None:
        check_input_exists(items, "item table")
    with store.writer(wait=wait, purpose=purpose) as cleaned:
        if cleaned:
            logger.warning("removed the debris of dead runs: %s", ", ".join(cleaned))
        needed = store.check_space(interactions)
        pending = store.new_run()
        run = _PendingRun(store, pending, store.run_id_of(pending), store.current())
        try:
            yield run
        except BaseException as err:
            if run.finalized:
                raise
            full = _failed(store, pending, err, run.run_id, needed)
            if full is not None:
                raise full from err
            raise


def run_nightly(
    interactions: str | Path,
    artifacts: str | Path,
    config: Config | None = None,
    *,
    items: str | Path | None = None,
    force: bool = False,
    progress: bool | None = None,
    wait: float | None = 0.0,
) -> NightlyResult:
    """Train, evaluate, gate and (maybe) publish one run under ``artifacts``, as its one writer.

    Args:
        interactions: the interaction log.
        artifacts: the artifact store root (``runs/`` and ``current`` live there).
        config: pipeline config (defaults when None).
        items: item feature table, when ``model.item_features`` is set.
        force: publish even when the gate refuses (the reason records the override).
        progress: progress bars (None: when stderr is a terminal).
        wait: when another process writes to the store: 0 raises at once, a number of seconds
            waits that long at most, None waits until it finishes.

    Returns:
        The run id and directory, the gate decision and whether ``current`` moved.

    Raises:
        StoreLockedError: another process writes to the store (after ``wait``).
        DiskSpaceError: not enough free space before the run, or the disk filled during it
            (the run's temporary directory is removed).
        DataError: the log does not exist (nothing is written), or cannot be used.
    """
    config = config or Config()
    store = ArtifactStore(artifacts, config.publish)
    with _writing_run(store, interactions, items, wait=wait, purpose="run") as pending:
        run_id, previous = pending.run_id, pending.current
        run = train_run(
            interactions,
            pending.path,
            config,
            items=items,
            run_id=run_id,
            progress=progress,
            warm_start_from=store.run_dir(previous) if previous is not None else None,
        )
        current_on_holdout, decision = gate_against_current(
            store, previous, pending.path, run.metrics, config, force=force
        )
        logger.info("quality gate: %s", decision.reason)
        final = pending.finalize(
            config=config,
            input_path=interactions,
            extra={"gate": decision.to_dict(), "current_on_holdout": current_on_holdout},
        )
        if decision.publish:
            # Under the lock: nothing that respects it can have moved current since the gate. A
            # writer that bypassed it (an older version, a hand-made link) is caught here.
            now_current = store.current()
            if now_current != previous:
                logger.warning(
                    "current moved from %s to %s during this run; gating again against %s",
                    previous,
                    now_current,
                    now_current,
                )
                current_on_holdout, decision = gate_against_current(
                    store, now_current, final, run.metrics, config, force=force
                )
                logger.info("quality gate (again): %s", decision.reason)
                previous = now_current
        try:
            if decision.publish:
                store.publish(run_id, forced=force)
            pruned = store.prune()
        except Exception as err:
            if not is_disk_full(err):
                raise
            raise DiskSpaceError(
                f"disk full in {store.root} while publishing run {run_id} (complete in {final}; "
                f"current is {store.current()}): {err}. Free some space, then `recsys-metric publish "
                f"{run_id}` or run again",
                directory=store.root,
                needed=0,
                free=free_bytes(store.root),
            ) from err
    return NightlyResult(
        run_id=run_id,
        run_dir=final,
        decision=decision,
        published=decision.publish,
        previous_run_id=previous,
        current_on_holdout=current_on_holdout,
        run=run,
        pruned=pruned,
    )


def train_into_store(
    interactions: str | Path,
    artifacts: str | Path,
    config: Config,
    *,
    items: str | Path | None = None,
    progress: bool | None = None,
    wait: float | None = 0.0,
    distributed: Any = None,
) -> tuple[RunResult, Path]:
    """``recsys-metric train``: write a finalized, UNPUBLISHED run into the store, as its one writer.

    The run is complete (manifest, read-only) and listed by ``runs``; ``publish RUN_ID`` gates
    and publishes it. It warm-starts from ``current`` when ``train.warm_start`` is on.

    Returns:
        The training result and the run's final directory.

    Raises:
        StoreLockedError, DiskSpaceError, DataError: as :func:`run_nightly`.
    """
    store = ArtifactStore(artifacts, config.publish)
    with _writing_run(store, interactions, items, wait=wait, purpose="train") as pending:
        current = pending.current
        result = train_run(
            interactions,
            pending.path,
            config,
            items=items,
            run_id=pending.run_id,
            progress=progress,
            warm_start_from=store.run_dir(current) if current is not None else None,
            distributed=distributed,
        )
        final = pending.finalize(
            config=config, input_path=interactions, extra={"written_by": "recsys-metric train"}
        )
    return result, final


def _run_config(store: ArtifactStore, run_id: str) -> Config:
    manifest = store.manifest(run_id)
    return config_from_dict(manifest.config, source=f"{store.run_dir(run_id)}/manifest.json")


def publish_run(
    artifacts: str | Path,
    run_id: str,
    *,
    force: bool = False,
    wait: float | None = 0.0,
    config: Config | None = None,
) -> PublishResult:
    """``recsys-metric publish RUN_ID``: gate a complete run against ``current`` and publish it.

    The gate is the nightly run's: the current run's holdout model scored on this run's holdout
    (rebuilt with the run's own recorded config), against the run's recorded holdout metrics.
    All of it happens under the writer lock, so ``current`` cannot move in between.

    Args:
        artifacts: the store.
        run_id: a complete run of the store.
        force: publish whatever the gate says (recorded in the history).
        wait: as :func:`run_nightly`.
        config: the gate settings (``publish`` section) and retention; the run's recorded
            config when None.

    Raises:
        RegistryError: unknown or incomplete run; IntegrityError: its files changed.
        StoreLockedError: another process writes to the store.
    """
    probe = ArtifactStore(artifacts)
    with probe.writer(wait=wait, purpose="publish"):
        run_dir = probe.run_dir(run_id)
        run_config = _run_config(probe, run_id)
        if config is not None:
            run_config = run_config.model_copy(update={"publish": config.publish})
        store = ArtifactStore(artifacts, run_config.publish)
        previous = store.current()
        if previous == run_id:
            return PublishResult(run_id, False, previous, None, None)
        store.verify(run_id)
        metrics = _read_json(run_dir / "metrics.json")
        current_on_holdout, decision = gate_against_current(
            store, previous, run_dir, metrics, run_config, force=force
        )
        logger.info("quality gate: %s", decision.reason)
        if decision.publish:
            store.publish(run_id, forced=force)
            store.prune()
    return PublishResult(run_id, decision.publish, previous, decision, current_on_holdout)


def rollback_run(
    artifacts: str | Path, run_id: str | None = None, *, wait: float | None = 0.0
) -> PublishResult:
    """``recsys-metric rollback [RUN_ID]``: publish again the run that was current before.

    Not gated: the run passed the gate (or was forced) when it was first published, and
    re-gating an older run against a newer model is biased against it (the newer holdout model
    may have trained on the older run's test rows). ``RUN_ID`` must have been published before.

    Raises:
        RegistryError: nothing to roll back to, or ``RUN_ID`` was never published or is gone.
    """
    store = ArtifactStore(artifacts)
    with store.writer(wait=wait, purpose="rollback"):
        current = store.current()
        if run_id is None:
            run_id = store.previous_published()
            if run_id is None:
                raise RegistryError(
                    f"nothing to roll back to in {store.root}: no earlier published run of {current} is "
                    "left (see `recsys-metric runs`; `recsys-metric publish RUN_ID --force` publishes any "
                    "complete run)"
                )
        else:
            published = {e.get("run_id") for e in store.history()}
            if run_id not in published:
                raise RegistryError(
                    f"run {run_id} was never published in {store.root}, so rollback cannot return to it; "
                    f"`recsys-metric publish {run_id}` gates it like a new run"
                )
        store.run_dir(run_id)
        if run_id == current:
            return PublishResult(run_id, False, current, None, None)
        previous = store.publish(run_id, action="rollback")
    return PublishResult(run_id, True, previous, None, None)
