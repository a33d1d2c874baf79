"""A recommender that follows the artifact store's ``current``: each night's publish reaches it.

:class:`FollowingRecommender` serves one :class:`~recsys_metric.serving.recommender.Recommender`
at a time. A watcher thread looks at ``current`` every ``interval`` seconds (one ``readlink``
and a ``realpath``: microseconds). When it names another run, the new run is loaded and verified
completely in the watcher thread, while queries go on against the old one; then one attribute
assignment swaps it in. A query reads that attribute once and runs to the end on the run it got,
so a query in flight finishes on the old run, a query that starts after the swap sees the new run,
and no query ever mixes the two.

A new run that fails to load or verify (a damaged file, a broken contract) is refused: the reason
is logged as a warning and kept in :attr:`FollowingRecommender.refusals`, the old run keeps
serving, and the refused run is not tried again (finalized runs are immutable, so it would fail
the same way); the next publish is.

At most two runs are resident: the serving one and the one loading. Before loading a new run the
watcher waits until the run it retired last is no longer referenced by a query in flight (it
checks again at the next interval otherwise).
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_metric.errors import ConfigError, RecsysMetricError, ServingError
from recsys_metric.registry import CURRENT_LINK, resolve_run_dir
from recsys_metric.serving.recommender import Recommender

if TYPE_CHECKING:
    # added_items imports polars: read when items are added or carried over, never at load.
    from recsys_metric.serving.added_items import AddResult, ItemsInput
    from recsys_metric.serving.items_journal import ItemsJournal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A published run that was not swapped in.

    Attributes:
        run_dir: the refused run's directory.
        reason: the error, as logged (names the damaged file for an integrity error).
        at: when it was refused (UTC).
    """

    run_dir: str
    reason: str
    at: dt.datetime


class FollowingRecommender:
    """Queries over the run an artifacts directory's ``current`` names, following each publish.

    Made by ``Recommender.load(artifacts, follow=True, interval=...)`` or directly. The query
    methods are those of :class:`Recommender` with the same arguments and results; each runs
    entirely on the run serving when it started. For several calls that must see the same run,
    take :meth:`snapshot` once and query it.

    Args:
        artifacts: an artifacts directory (with ``current``).
        interval: seconds between checks of ``current`` by the watcher thread; ``0`` starts no
            thread (call :meth:`refresh` yourself).
        index, device, search_k, output, verify: as :meth:`Recommender.load`, for every run.

    Raises:
        ConfigError: ``artifacts`` has no ``current`` link, or ``interval`` is negative.
        IntegrityError, DataError, RegistryError: the run published now cannot be loaded (as
            :meth:`Recommender.load`); later runs are refused instead.
    """

    def __init__(
        self,
        artifacts: str | os.PathLike[str],
        *,
        interval: float = 30.0,
        index: str = "auto",
        device: str = "cpu",
        search_k: int | None = None,
        output: str = "pandas",
        verify: bool = True,
        added_items_dir: str | os.PathLike[str] | None = None,
    ):
        self.artifacts = Path(artifacts)
        link = self.artifacts / CURRENT_LINK
        if not (link.is_symlink() or link.exists()):
            raise ConfigError(
                f"follow=True needs an artifacts directory whose {CURRENT_LINK!r} names the published run; "
                f"{self.artifacts} has no {CURRENT_LINK!r} (load a run directory without follow)"
            )
        if not isinstance(interval, (int, float)) or interval < 0:
            raise ConfigError(f"interval must be a number of seconds >= 0, got {interval!r}")
        self.interval = float(interval)
        self._options: dict[str, Any] = {
            "index": index,
            "device": device,
            "search_k": search_k,
            "output": output,
            "verify": verify,
        }
        self._journal: ItemsJournal | None = None
        self._applied: list[str] = []
        """Journal entries applied to the run serving now, in order."""
        if added_items_dir is not None:
            from recsys_metric.serving.items_journal import ItemsJournal

            self._journal = ItemsJournal(added_items_dir)
        self._current: Recommender = self._load(resolve_run_dir(self.artifacts))
        if self._journal is not None:
            self._applied = self._replay(self._current)
        self.reloads = 0
        """Runs swapped in since the first."""
        self.refusals: list[Refusal] = []
        """Published runs that failed to load or verify, oldest first."""
        self.checked_at: dt.datetime | None = None
        """When ``current`` was last looked at."""
        self._refused: set[str] = set()
        self._retired: weakref.ref[Recommender] | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.interval > 0:
            self._thread = threading.Thread(target=self._watch, name="recsys-metric-follow", daemon=True)
            self._thread.start()

    def _load(self, run_dir: Path) -> Recommender:
        return Recommender.load(run_dir, **self._options)

    def __repr__(self) -> str:
        return (
            f"FollowingRecommender(artifacts={str(self.artifacts)!r}, run_id={self.run_id!r}, "
            f"interval={self.interval}, reloads={self.reloads}, refused={len(self.refusals)})"
        )

    def __enter__(self) -> FollowingRecommender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watcher thread (queries keep working on the run serving now)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def snapshot(self) -> Recommender:
        """The :class:`Recommender` serving now; it stays valid (and unchanged) after a swap."""
        return self._current

    @property
    def run_id(self) -> str:
        """The run serving now."""
        return self._current.run_id

    @property
    def run_dir(self) -> Path:
        return self._current.run_dir

    def refresh(self) -> bool:
        """Look at ``current`` now; load, verify and swap in the run it names if it is new.

        Returns:
            True when a new run was swapped in; False when ``current`` has not moved, the run was
            refused (now or before), or the previously retired run is still in use.
        """
        with self._refresh_lock:
            self.checked_at = dt.datetime.now(dt.UTC)
            try:
                run_dir = resolve_run_dir(self.artifacts)
            except RecsysMetricError as err:
                log.warning(
                    "cannot resolve %s/%s, keep serving run %s: %s",
                    self.artifacts,
                    CURRENT_LINK,
                    self.run_id,
                    err,
                )
                return False
            if run_dir == self._current.run_dir or str(run_dir) in self._refused:
                self._sync_journal()
                return False
            if self._retired is not None and self._retired() is not None:
                gc.collect()  # a reference cycle, not a query, may still hold it
                if self._retired() is not None:
                    log.info(
                        "run %s is still in use by queries; loading %s at the next check",
                        self._retired().run_id,
                        run_dir.name,
                    )  # type: ignore[union-attr]
                    return False
            started = time.perf_counter()
            try:
                new = self._load(run_dir)
            except Exception as err:  # noqa: BLE001 - any failure refuses the run, the old one serves
                reason = f"{type(err).__name__}: {err}"
                self._refused.add(str(run_dir))
                self.refusals.append(Refusal(str(run_dir), reason, dt.datetime.now(dt.UTC)))
                log.warning("refused run %s, keep serving run %s: %s", run_dir, self.run_id, reason)
                return False
            if self._journal is not None:
                # The journal holds every add (this process's and the others'): the new run gets
                # all of them, embedded with its own item tower.
                self._applied = self._replay(new)
            elif getattr(self._current, "_added", None) is not None:
                from recsys_metric.serving.added_items import carry_added_items

                carry_added_items(self._current, new)
            old = self._current
            self._current = new  # the swap: one reference assignment, atomic for every reader
            self._retired = weakref.ref(old)
            self.reloads += 1
            log.info(
                "now serving run %s (was %s), loaded and verified in %.2f s",
                new.run_id,
                old.run_id,
                time.perf_counter() - started,
            )
            del old
            return True

    def _replay(self, rec: Recommender) -> list[str]:
        from recsys_metric.serving.items_journal import replay

        assert self._journal is not None
        return replay(self._journal, rec)

    def _sync_journal(self) -> dict[str, AddResult | None]:
        """Apply the journal entries written since the last look (by any process) to the run
        serving now, in order; under the refresh lock. Entries only ever appear in number order
        (:mod:`~recsys_metric.serving.items_journal`), so every process applies the same sequence."""
        if self._journal is None:
            return {}
        from recsys_metric.serving.items_journal import apply_entries

        names = self._journal.entries()
        done = len(self._applied)
        if names[:done] != self._applied:
            # Entries vanished or were replaced by hand: start again from the journal as it is.
            log.warning(
                "the added-items journal %s changed under this process; replaying it", self._journal.directory
            )
            rec = self._load(self._current.run_dir)
            self._applied = self._replay(rec)
            self._current = rec
            return {}
        results = apply_entries(self._journal, self._current, names[done:])
        self._applied = names
        return results

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must survive anything and keep serving
                log.exception("checking %s for a new run failed; will check again", self.artifacts)

    def status(self) -> dict[str, Any]:
        """What is serving and what happened: ``run_id``, ``run_dir``, ``loaded_at`` (ISO UTC),
        ``verified``, ``n_users``, ``n_items``, ``reloads``, ``refused``, ``last_refusal``,
        ``checked_at``, ``interval``, ``added_items_journal`` (its directory, or None) and
        ``journal_entries`` (entries applied to the run serving)."""
        rec = self._current
        last = self.refusals[-1] if self.refusals else None
        return {
            "run_id": rec.run_id,
            "run_dir": str(rec.run_dir),
            "loaded_at": rec.loaded_at.isoformat(timespec="seconds"),
            "verified": rec.verified,
            "n_users": rec.n_users,
            "n_items": rec.n_items,
            "n_added_items": rec.n_added,
            "reloads": self.reloads,
            "refused": len(self.refusals),
            "last_refusal": None
            if last is None
            else {
                "run_dir": last.run_dir,
                "reason": last.reason,
                "at": last.at.isoformat(timespec="seconds"),
            },
            "checked_at": None if self.checked_at is None else self.checked_at.isoformat(timespec="seconds"),
            "interval": self.interval,
            "added_items_journal": None if self._journal is None else str(self._journal.directory),
            "journal_entries": len(self._applied),
        }

    @property
    def n_added(self) -> int:
        """Items added after the run serving now (:meth:`add_items`, carried over at each swap)."""
        return self._current.n_added

    def embed_items(self, items: ItemsInput, *, separator: str = "|") -> Any:
        """:meth:`Recommender.embed_items` with the run serving now."""
        return self._current.embed_items(items, separator=separator)

    def add_items(self, items: ItemsInput, *, separator: str = "|") -> AddResult:
        """:meth:`Recommender.add_items` on the run serving now; each run swapped in later embeds
        them again with its own item tower (an id the new run knows is served by the new run's
        vector; an item the new run cannot place is dropped, with a warning in the log)."""
        # Under the refresh lock: an add never falls between a new run's carry-over and its swap.
        with self._refresh_lock:
            if self._journal is None:
                return self._current.add_items(items, separator=separator)
            from recsys_metric.serving.added_items import read_items_frame

            frame = read_items_frame(items)
            # Checked first (DataError, nothing written), then journalled, then applied in the
            # journal's order together with whatever other processes wrote before it.
            self._current.check_items(frame, separator=separator)
            try:
                name = self._journal.append(frame, separator=separator)
            except OSError as err:
                raise ServingError(
                    f"cannot write the added-items journal {self._journal.directory} ({err}); nothing was "
                    "added. Free space or make the directory writable, or serve without a journal"
                ) from err
            result = self._sync_journal().get(name)
            if result is None:
                raise ServingError(
                    f"the items were journalled as {self._journal.directory / name} but run "
                    f"{self.run_id} could not add them (see the log)"
                )
            return result

    # Queries: each reads self._current once, so it runs on one run from start to end.

    def similar_items(
        self, item_id: Any, k: int = 10, exclude: Sequence[Any] = (), exact: bool = False
    ) -> Any:
        """:meth:`Recommender.similar_items` on the run serving now."""
        return self._current.similar_items(item_id, k=k, exclude=exclude, exact=exact)

    def recommend(
        self,
        user_id: Any,
        k: int = 10,
        exclude_seen: bool = True,
        candidates: Sequence[Any] | None = None,
        exclude: Sequence[Any] = (),
        exact: bool = False,
    ) -> Any:
        """:meth:`Recommender.recommend` on the run serving now."""
        return self._current.recommend(
            user_id, k=k, exclude_seen=exclude_seen, candidates=candidates, exclude=exclude, exact=exact
        )

    def recommend_batch(
        self, user_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> Any:
        """:meth:`Recommender.recommend_batch` on the run serving now."""
        return self._current.recommend_batch(user_ids, k=k, exclude_seen=exclude_seen, exact=exact)

    def recommend_for_history(
        self, item_ids: Sequence[Any], k: int = 10, exclude_seen: bool = True, exact: bool = False
    ) -> Any:
        """:meth:`Recommender.recommend_for_history` on the run serving now."""
        return self._current.recommend_for_history(item_ids, k=k, exclude_seen=exclude_seen, exact=exact)

    def explain(self, user_id: Any, item_id: Any, k: int = 5) -> Any:
        """:meth:`Recommender.explain` on the run serving now."""
        return self._current.explain(user_id, item_id, k=k)
