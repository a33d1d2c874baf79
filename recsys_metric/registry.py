"""Artifact store: run directories, manifests, atomic publish, retention, and the quality gate.

Layout under an artifacts root::

    root/
      runs/
        .tmp-<run_id>/         a run being written (or crash debris): never complete, never published
        <run_id>/              a finalized run: manifest.json + the pipeline's files, read-only
        .deleting-<run_id>-*/  a run being pruned (renamed first, so it leaves the listing at once)
      current -> runs/<run_id>    relative symlink: the published run
      .lock                    the one-writer lock (recsys_metric.store.lock): held by a whole run
      .history.jsonl           every switch of current (retention grace period, rollback)

Lifecycle and why a crashed run can never pass for a complete one:

1. :meth:`ArtifactStore.new_run` creates ``runs/.tmp-<run_id>/`` (with a small ``.started``
   note holding the start time). The pipeline and the index builder write every file there.
2. :meth:`ArtifactStore.finalize` hashes every file, writes ``manifest.json`` (fsynced) inside
   the temporary directory, and only then ``os.rename``\\s it to ``runs/<run_id>/``, which is
   atomic. A run is complete exactly when its directory has its final name and a manifest; a
   crash at any earlier moment leaves a ``.tmp-`` directory, which nothing lists as complete,
   nothing publishes, and the next writer removes (:meth:`ArtifactStore.clean_debris`). The
   files are made read-only (``0o444``, directories ``0o555``) before the rename, so a complete
   run is never writable: it is immutable, and :meth:`ArtifactStore.verify` re-hashes it
   against the manifest.
3. :meth:`ArtifactStore.publish` verifies the run, makes a symlink ``current -> runs/<run_id>``
   under a temporary name and ``os.replace``\\s it over ``current`` (atomic on POSIX).
4. Readers resolve ``current`` once (:func:`resolve_run_dir`) and open files by the run
   directory's own path, so a switch never changes what an already-running reader sees. Files of
   a run are never written again; pruning unlinks them (after a rename of the directory), which
   leaves open handles and memory maps valid (POSIX keeps an unlinked file's data while it is
   open). Copying over a loaded file would kill the reader with SIGBUS (PLATFORM_NOTES.md); the
   store never does that.

Everything a run needs must be written before ``finalize`` (the Annoy index included).
:func:`resolve_run_dir` here is the canonical one; other modules should import it.
"""

from __future__ import annotations

import datetime as dt
import errno
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys_metric import __version__
from recsys_metric.errors import RecsysMetricError
from recsys_metric.store.faults import fault_point
from recsys_metric.store.lock import StoreLockedError as StoreLockedError  # re-exported
from recsys_metric.store.lock import store_lock
from recsys_metric.store.space import DiskSpaceError as DiskSpaceError  # re-exported
from recsys_metric.store.space import check_free_space

if TYPE_CHECKING:
    # Imported where used, like polars, the vocabulary and the database modules: serving resolves
    # runs and reads manifests through this module, and each costs a query process a fifth of a
    # second that it never needs.
    from recsys_metric.config import Config, PublishConfig

MANIFEST_FILE = "manifest.json"
"""Name of the manifest inside a run directory."""
RUNS_DIR = "runs"
CURRENT_LINK = "current"
PENDING_PREFIX = ".tmp-"
"""Prefix of a run directory that has not been finalized."""
DELETING_PREFIX = ".deleting-"
STARTED_FILE = ".started"
"""JSON note written by ``new_run`` into the temporary directory (start time); removed by ``finalize``."""
LOCK_FILE = ".lock"
HISTORY_FILE = ".history.jsonl"
"""One JSON line per switch of ``current`` (written just before the switch): time, run_id,
previous, action, forced. Retention and ``rollback`` read it."""
RUN_SIZE_MARGIN = 1.25
"""A new run is expected to need this many times the size of the newest complete run."""
FIRST_RUN_INPUT_FACTOR = 3
"""Without a complete run to measure, a run is expected to need this many times its input's size."""
MIN_RUN_BYTES = 4 * 1024 * 1024
MANIFEST_FORMAT = 1
CONTENT_HASH_LIMIT = 64 * 1024 * 1024
"""Inputs up to this many bytes in total are fingerprinted by content, larger ones by name, size
and modification time (hashing a 20M-row log on every nightly run would cost seconds to minutes)."""
VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "numpy", "polars", "pyarrow", "annoy", "prefect")
"""Distributions whose versions a manifest records (besides recsys_metric and Python)."""

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAGIC = re.compile(r"[*?\[]")


class RegistryError(RecsysMetricError):
    """The artifact store cannot do what was asked (unknown or incomplete run, bad layout...)."""


class IntegrityError(RegistryError):
    """A finalized run's files do not match its manifest.

    ``files`` lists the relative paths that differ, are missing, or were added.
    """

    def __init__(self, message: str, *, run_id: str, files: list[str]):
        super().__init__(message)
        self.run_id = run_id
        self.files = files


def new_run_id(now: dt.datetime | None = None) -> str:
    """Sortable, unique run id: UTC time plus a random suffix, e.g. ``20261123T101500Z-3f9a``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(2)}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise RegistryError(
            f"invalid run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return run_id


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON durably: temporary file, fsync, rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(payload, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _run_files(run_dir: Path, skip: tuple[str, ...] = (MANIFEST_FILE,)) -> list[str]:
    """Relative POSIX paths of every regular file under ``run_dir`` except ``skip``, sorted.

    Raises:
        RegistryError: a symlink or a special file (it could point outside the immutable run).
    """
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        base = Path(dirpath)
        for name in dirnames + filenames:
            path = base / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise RegistryError(
                    f"run directory {run_dir} holds {path.relative_to(run_dir)}, which is a symlink or a "
                    "special file; a run may only contain regular files and directories"
                )
            if stat.S_ISREG(mode):
                rel = path.relative_to(run_dir).as_posix()
                if rel not in skip:
                    out.append(rel)
    return sorted(out)


def _set_read_only(run_dir: Path) -> None:
    for dirpath, _, filenames in os.walk(run_dir):
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o444)
        os.chmod(dirpath, 0o555)


def _remove_tree(path: Path) -> None:
    """Delete a directory tree, restoring write permission on read-only directories first.

    Files are unlinked, never truncated: a process that has one open or memory-mapped keeps
    reading its data.
    """
    for dirpath, _, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path)


def _input_files(path_or_glob: str | os.PathLike[str]) -> tuple[Path, list[Path]]:
    """``(base, files)``: the input's files, sorted, and the directory their names are relative to."""
    text = os.fspath(path_or_glob)
    path = Path(text)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            # The hidden and '_'-prefixed files a Parquet dataset reader skips (pyarrow's ignore_prefixes).
            dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
            files.extend(Path(dirpath) / n for n in filenames if not n.startswith((".", "_")))
        return path, sorted(files)
    if _MAGIC.search(text):
        parts = path.parts
        first_magic = next(i for i, part in enumerate(parts) if _MAGIC.search(part))
        base = Path(*parts[:first_magic]) if first_magic else Path(".")
        files = sorted(p for p in map(Path, glob.glob(text, recursive=True)) if p.is_file())
        return base, files
    return path, []


def input_fingerprint(
    path: str | os.PathLike[str], *, content_limit: int = CONTENT_HASH_LIMIT
) -> dict[str, Any]:
    """Fingerprint of an interaction log (a file, a directory of Parquet partitions, or a glob).

    Method ``content-sha256`` (total size <= ``content_limit`` bytes): sha256 over, per file in
    name order, ``name\\tsize\\n`` followed by the file's bytes. Method ``stat-sha256`` (larger
    inputs): sha256 over ``name\\tsize\\tmtime_ns\\n`` per file; it changes whenever a file is
    rewritten, even with the same bytes, and misses an in-place edit that keeps size and mtime.
    Names are relative to the input directory (or to the file's directory, or to the glob's
    literal prefix), so moving the whole input does not change the fingerprint. A database URI
    gets the fingerprint taken while its rows were read (:func:`recsys_metric.db.database_fingerprint`).

    Returns:
        ``{"path", "method", "sha256", "n_files", "bytes"}``.

    Raises:
        RegistryError: the path matches no file.
    """
    from recsys_metric.db.source import database_fingerprint
    from recsys_metric.db.uri import is_database_uri

    if is_database_uri(path):
        return database_fingerprint(path)  # taken while the rows were read (recsys_metric/db/source.py)
    base, files = _input_files(path)
    if not files:
        raise RegistryError(f"input {os.fspath(path)} matches no file; cannot fingerprint it")
    stats = [f.stat() for f in files]
    total = sum(s.st_size for s in stats)
    names = [f.relative_to(base).as_posix() for f in files]
    digest = hashlib.sha256()
    method = "content-sha256" if total <= content_limit else "stat-sha256"
    for name, f, s in zip(names, files, stats, strict=True):
        if method == "content-sha256":
            digest.update(f"{name}\t{s.st_size}\n".encode())
            with open(f, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        else:
            digest.update(f"{name}\t{s.st_size}\t{s.st_mtime_ns}\n".encode())
    return {
        "path": os.fspath(path),
        "method": method,
        "sha256": digest.hexdigest(),
        "n_files": len(files),
        "bytes": total,
    }


def library_versions() -> dict[str, str | None]:
    """Versions of recsys_metric, Python and :data:`VERSIONED_PACKAGES` (None when not installed)."""
    out: dict[str, str | None] = {"recsys_metric": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclass(frozen=True)
class FileEntry:
    """One file of a run: hex sha256 of its bytes and its size in bytes."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` records about a finalized run.

    Attributes:
        run_id: the run's id (its directory name).
        created: when ``new_run`` made the directory (UTC).
        finished: when ``finalize`` ran (UTC).
        input: :func:`input_fingerprint` of the interaction log, or None when none was given.
        counts: row and reject counts from ``metrics.json["data"]`` (``n_input_rows``,
            ``n_rejected``, ``n_duplicates``, ``n_valid``, ``n_interactions``, ``n_users``,
            ``n_items``, ``labels``, ``split``...), or None when metrics.json has no ``data``.
        config: the pipeline config (``Config.to_dict()``).
        metrics: summary of ``metrics.json``: ``holdout`` (model and baselines per K) and, where
            present, ``early_stopping``, ``published_model``, ``index``.
        versions: :func:`library_versions` at finalize time.
        files: relative POSIX path -> :class:`FileEntry` for every file but the manifest.
        extra: whatever the caller passed (gate decision, flow run id...).
        format: manifest format version.
    """

    run_id: str
    created: dt.datetime
    finished: dt.datetime
    input: dict[str, Any] | None
    counts: dict[str, Any] | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str | None]
    files: dict[str, FileEntry]
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = MANIFEST_FORMAT

    def recall(self, k: int) -> float | None:
        """The model's holdout Recall@k from the metrics summary, or None when not recorded."""
        value = self.metrics.get("holdout", {}).get("models", {}).get("model", {}).get(f"recall@{k}")
        return float(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times as ISO-8601 strings)."""
        out = asdict(self)
        out["created"] = self.created.isoformat()
        out["finished"] = self.finished.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            run_id=data["run_id"],
            created=dt.datetime.fromisoformat(data["created"]),
            finished=dt.datetime.fromisoformat(data["finished"]),
            input=data.get("input"),
            counts=data.get("counts"),
            config=data.get("config", {}),
            metrics=data.get("metrics", {}),
            versions=data.get("versions", {}),
            files={name: FileEntry(**entry) for name, entry in data["files"].items()},
            extra=data.get("extra", {}),
            format=int(data.get("format", MANIFEST_FORMAT)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a ``manifest.json``.

        Raises:
            RegistryError: missing, unreadable, or without the required keys.
        """
        path = Path(path)
        data = _read_json(path)
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise RegistryError(f"manifest {path} is malformed: {type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class RunInfo:
    """One entry of :meth:`ArtifactStore.list_runs`.

    Attributes:
        run_id: the run id.
        path: the run directory (``runs/<id>`` or ``runs/.tmp-<id>``).
        complete: finalized (final name and a manifest).
        created: start time (UTC): from the manifest, else the ``.started`` note, else the
            directory's modification time.
        finished: finalize time; None for an incomplete run.
        recall: holdout Recall@k of the model from the manifest; None when incomplete or unrecorded.
        k: the K of ``recall`` (``PublishConfig.gate_k``).
        is_current: ``current`` points to this run.
    """

    run_id: str
    path: Path
    complete: bool
    created: dt.datetime
    finished: dt.datetime | None
    recall: float | None
    k: int
    is_current: bool


_COUNT_KEYS = (
    "n_input_rows",
    "n_rejected",
    "n_duplicates",
    "n_valid",
    "rejected_by_reason",
    "reject_fraction",
)


def _counts(data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not data:
        return None
    validation = data.get("validation", {})
    out: dict[str, Any] = {key: validation[key] for key in _COUNT_KEYS if key in validation}
    for key in ("n_interactions", "n_users", "n_items", "labels", "split"):
        if key in data:
            out[key] = data[key]
    return out


def _metrics_summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: metrics[key]
        for key in ("holdout", "early_stopping", "published_model", "index")
        if key in metrics
    }


class ArtifactStore:
    """Run directories under ``root/runs`` and the published ``root/current`` (layout in the module doc).

    Args:
        root: the artifacts directory (created on the first ``new_run``).
        config: registry settings: ``keep_runs`` for :meth:`prune`, ``gate_k`` for the recall
            shown by :meth:`list_runs`.
    """

    def __init__(self, root: str | os.PathLike[str], config: PublishConfig | None = None):
        self.root = Path(root).absolute()
        if config is None:
            from recsys_metric.config import PublishConfig

            config = PublishConfig()
        self.config = config

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    @property
    def runs_dir(self) -> Path:
        """``root/runs``."""
        return self.root / RUNS_DIR

    def pending_dir(self, run_id: str) -> Path:
        """``runs/.tmp-<run_id>``: where a run is written before ``finalize``."""
        return self.runs_dir / f"{PENDING_PREFIX}{_check_run_id(run_id)}"

    def run_dir(self, run_id: str) -> Path:
        """``runs/<run_id>`` of a complete run.

        Raises:
            RegistryError: the run is unknown, still pending (never finalized), or has no manifest.
        """
        final = self.runs_dir / _check_run_id(run_id)
        if final.is_dir() and (final / MANIFEST_FILE).is_file():
            return final
        if self.pending_dir(run_id).is_dir():
            raise RegistryError(
                f"run {run_id} in {self.root} is not complete: {self.pending_dir(run_id)} was never "
                "finalized (the run crashed or is still being written)"
            )
        if final.is_dir():
            raise RegistryError(
                f"run {run_id} in {self.root} is not complete: {final} has no {MANIFEST_FILE}"
            )
        raise RegistryError(f"no run {run_id} in {self.root}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The writer lock for one short critical section (a no-op inside :meth:`writer`).

        Waits for another process's writer: a library call made while a run holds the store
        queues behind it, as the lock's contract asks.
        """
        with store_lock(self.root, wait=None, purpose="store operation"):
            yield

    @contextmanager
    def writer(self, *, wait: float | None = 0.0, purpose: str = "write") -> Iterator[list[str]]:
        """Hold the store's one-writer lock (``root/.lock``) for a whole run or command.

        On entry, the debris of dead writers is removed (:meth:`clean_debris`): nobody else can
        be writing, so a ``.tmp-`` directory whose process is gone will never be finished. The
        store's own methods called inside take the lock again without waiting.

        Args:
            wait: 0 (default) raises at once when another process writes; seconds to wait at
                most; None waits until it finishes.
            purpose: a word for the holder note another writer is shown.

        Yields:
            The names :meth:`clean_debris` removed.

        Raises:
            StoreLockedError: another process holds the lock (message: its pid, host, start
                time and command).
        """
        with store_lock(self.root, wait=wait, purpose=purpose):
            cleaned = self.clean_debris()
            fault_point("lock:acquired")
            yield cleaned

    def clean_debris(self) -> list[str]:
        """Remove what dead writers left: ``.tmp-`` runs whose process is gone, ``.deleting-``
        leftovers of an interrupted prune, stray temporary ``current`` links.

        A ``.tmp-`` run whose writer still runs on this host is kept (a library user may write a
        run without holding :meth:`writer`). Takes the writer lock (waiting for it).

        Returns:
            Names of the removed entries under ``runs/`` and the root.
        """
        removed: list[str] = []
        with self._locked():
            if self.runs_dir.is_dir():
                for path in sorted(self.runs_dir.iterdir()):
                    if not path.is_dir() or path.is_symlink():
                        continue
                    if path.name.startswith(DELETING_PREFIX) or (
                        path.name.startswith(PENDING_PREFIX) and not self._writer_alive(path)
                    ):
                        _remove_tree(path)
                        removed.append(path.name)
            for link in self.root.glob(f".{CURRENT_LINK}.tmp-*"):
                link.unlink(missing_ok=True)
                removed.append(link.name)
        return removed

    def history(self) -> list[dict[str, Any]]:
        """Switches of ``current``, oldest first (``HISTORY_FILE``; unreadable lines skipped).

        Each entry: ``time`` (ISO UTC), ``run_id``, ``previous``, ``action`` (publish or
        rollback), ``forced``. An entry is written just before its switch, so the newest one may
        name a switch a crash prevented: compare with :meth:`current`.
        """
        try:
            lines = (self.root / HISTORY_FILE).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if isinstance(entry, dict) and "run_id" in entry and "time" in entry:
                out.append(entry)
        return out

    def _append_history(self, entry: Mapping[str, Any]) -> None:
        with open(self.root / HISTORY_FILE, "a") as f:
            f.write(json.dumps(dict(entry), default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def previous_published(self) -> str | None:
        """The run that was current before the current one (what ``rollback`` returns to), when it
        is still a complete run; None otherwise."""
        current = self.current()
        history = self.history()
        # The publish that made it current, not a rollback to it: rolling back twice goes two
        # runs back instead of toggling between two.
        publishes = [e for e in history if e.get("action") != "rollback"]
        for entry in [*reversed(publishes), *reversed(history)]:
            if entry.get("run_id") == current and entry.get("previous"):
                previous = str(entry["previous"])
                try:
                    self.run_dir(previous)
                except RegistryError:
                    return None
                return previous
        return None

    def run_bytes(self, run_id: str) -> int:
        """Total size in bytes of a complete run's files (from its manifest)."""
        return (
            sum(entry.size for entry in self.manifest(run_id).files.values())
            + (self.run_dir(run_id) / MANIFEST_FILE).stat().st_size
        )

    def estimate_run_bytes(self, input_path: str | os.PathLike[str] | None = None) -> int:
        """Bytes a new run is expected to write: ``RUN_SIZE_MARGIN`` x the newest complete run's
        size, else ``FIRST_RUN_INPUT_FACTOR`` x the input's size; at least ``MIN_RUN_BYTES``."""
        complete = [r for r in self.list_runs() if r.complete]
        if complete:
            estimate = RUN_SIZE_MARGIN * self.run_bytes(complete[-1].run_id)
        elif input_path is not None and "://" not in os.fspath(input_path):
            _, files = _input_files(input_path)
            estimate = FIRST_RUN_INPUT_FACTOR * sum(f.stat().st_size for f in files)
        else:
            estimate = 0
        return max(int(estimate), MIN_RUN_BYTES)

    def check_space(self, input_path: str | os.PathLike[str] | None = None) -> int:
        """Raise :class:`DiskSpaceError` unless a new run fits (:meth:`estimate_run_bytes`).

        Returns:
            The estimate, in bytes.
        """
        needed = self.estimate_run_bytes(input_path)
        check_free_space(self.runs_dir if self.runs_dir.exists() else self.root, needed, "a new run")
        return needed

    def new_run(self, run_id: str | None = None) -> Path:
        """Create the temporary directory of a new run and return it.

        Write every file of the run into the returned directory (e.g.
        ``train_run(log, store.new_run(rid), config, run_id=rid)``), then call :meth:`finalize`.
        The run id is the directory name after the ``.tmp-`` prefix (:meth:`run_id_of`).

        Raises:
            RegistryError: the id is invalid or already used by a complete or pending run.
        """
        run_id = _check_run_id(run_id or new_run_id())
        with self._locked():
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            pending = self.pending_dir(run_id)
            if (self.runs_dir / run_id).exists() or pending.exists():
                raise RegistryError(f"run id {run_id} is already used in {self.runs_dir}; choose another")
            pending.mkdir()
            _write_json(
                pending / STARTED_FILE,
                {
                    "run_id": run_id,
                    "created": _now().isoformat(),
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                },
            )
        return pending

    def run_id_of(self, run_dir: str | os.PathLike[str]) -> str:
        """Run id of a pending (``.tmp-<id>``) or complete (``<id>``) directory of this store."""
        name = Path(run_dir).name
        return name.removeprefix(PENDING_PREFIX)

    def finalize(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: Mapping[str, Any] | Config,
        input_path: str | os.PathLike[str] | None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write ``manifest.json`` into a pending run and make the run complete (atomic rename).

        Every file is hashed (and fsynced) first, the manifest is written and fsynced, the files
        and directories are made read-only, and only then ``runs/.tmp-<id>`` is renamed to
        ``runs/<id>`` (under the writer lock).

        Args:
            run_dir: a directory returned by :meth:`new_run`.
            config: the pipeline config (a ``Config`` or its ``to_dict()``).
            input_path: the interaction log the run read (fingerprinted, see
                :func:`input_fingerprint`); None records no fingerprint.
            extra: JSON-serialisable additions (gate decision, flow run id...).

        Returns:
            The manifest written.

        Raises:
            RegistryError: ``run_dir`` is not a pending run of this store, ``metrics.json`` is
                missing, or ``metrics.json``/``model.json`` name another run id (pass
                ``run_id=`` to ``train_run``).
        """
        from recsys_metric.config import Config

        pending = Path(run_dir).absolute()
        run_id = self.run_id_of(pending)
        if (
            pending.parent.resolve() != self.runs_dir.resolve()
            or not pending.name.startswith(PENDING_PREFIX)
            or not pending.is_dir()
        ):
            raise RegistryError(
                f"{pending} is not a pending run of {self.root}: finalize a directory returned by new_run "
                f"({self.runs_dir}/{PENDING_PREFIX}<run_id>)"
            )
        final = self.runs_dir / run_id
        if final.exists():
            raise RegistryError(f"run {run_id} already exists in {self.runs_dir}; it is immutable")
        if not (pending / "metrics.json").is_file():
            raise RegistryError(
                f"run directory {pending} has no metrics.json; write the run with train_run before finalize"
            )
        metrics = _read_json(pending / "metrics.json")
        for name, recorded in (
            ("metrics.json", metrics.get("run_id")),
            ("model.json", self._model_run_id(pending)),
        ):
            if recorded is not None and recorded != run_id:
                raise RegistryError(
                    f"{pending / name} records run id {recorded!r} but the run is {run_id!r}; pass "
                    f"run_id={run_id!r} to train_run so that the exported files carry it"
                )
        fingerprint = input_fingerprint(input_path) if input_path is not None else None
        created = self._start_time(pending)
        files: dict[str, FileEntry] = {}
        for rel in _run_files(pending, skip=(MANIFEST_FILE, STARTED_FILE)):
            with open(pending / rel, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                os.fsync(f.fileno())
                files[rel] = FileEntry(sha256=digest, size=os.fstat(f.fileno()).st_size)
        manifest = Manifest(
            run_id=run_id,
            created=created,
            finished=_now(),
            input=fingerprint,
            counts=_counts(metrics.get("data")),
            config=config.to_dict() if isinstance(config, Config) else dict(config),
            metrics=_metrics_summary(metrics),
            versions=library_versions(),
            files=files,
            extra=dict(extra or {}),
        )
        _write_json(pending / MANIFEST_FILE, manifest.to_dict())
        with self._locked():
            if final.exists():
                raise RegistryError(f"run {run_id} already exists in {self.runs_dir}; it is immutable")
            # Under the lock: without its .started note the directory looks like a dead run's
            # debris to clean_debris, which takes the same lock.
            (pending / STARTED_FILE).unlink(missing_ok=True)
            # Read-only BEFORE the rename: a crash right after it must not leave a complete run
            # writable (a rename within runs/ needs no write permission on the directory itself).
            _set_read_only(pending)
            _fsync_dir(pending)
            fault_point("finalize:before-rename")
            os.rename(pending, final)
            _fsync_dir(self.runs_dir)
            fault_point("finalize:after-rename")
        return manifest

    @staticmethod
    def _model_run_id(run_dir: Path) -> str | None:
        path = run_dir / "model.json"
        return _read_json(path).get("run_id") if path.is_file() else None

    def manifest(self, run_id: str) -> Manifest:
        """The manifest of a complete run (see :meth:`run_dir` for errors)."""
        return Manifest.load(self.run_dir(run_id) / MANIFEST_FILE)

    def verify(self, run_id: str) -> None:
        """Re-hash every file of a complete run against its manifest.

        Raises:
            IntegrityError: a file differs (sha256 or size), is missing, or is not in the
                manifest; the message names each such file.
            RegistryError: the run is unknown or incomplete.
        """
        run_dir = self.run_dir(run_id)
        manifest = Manifest.load(run_dir / MANIFEST_FILE)
        if manifest.run_id != run_id:
            raise IntegrityError(
                f"run {run_id}: {MANIFEST_FILE} belongs to run {manifest.run_id!r}",
                run_id=run_id,
                files=[MANIFEST_FILE],
            )
        problems: list[tuple[str, str]] = []
        on_disk = set(_run_files(run_dir))
        for rel, entry in manifest.files.items():
            if rel not in on_disk:
                problems.append((rel, "is missing"))
                continue
            size = (run_dir / rel).stat().st_size
            digest = file_sha256(run_dir / rel)
            if digest != entry.sha256 or size != entry.size:
                problems.append(
                    (
                        rel,
                        f"has sha256 {digest[:12]}... ({size} bytes) but the manifest records "
                        f"{entry.sha256[:12]}... ({entry.size} bytes)",
                    )
                )
        problems.extend((rel, "is not in the manifest") for rel in sorted(on_disk - set(manifest.files)))
        if problems:
            detail = "; ".join(f"{rel} {what}" for rel, what in problems)
            raise IntegrityError(
                f"run {run_id} in {self.root} was modified after finalize: {detail}. Do not publish it; "
                "re-run the pipeline",
                run_id=run_id,
                files=[rel for rel, _ in problems],
            )

    def current(self) -> str | None:
        """Id of the published run, or None when nothing is published.

        Raises:
            RegistryError: ``root/current`` exists but is not a symlink into ``runs/``.
        """
        link = self.root / CURRENT_LINK
        try:
            target = Path(os.readlink(link))
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise RegistryError(
                    f"{link} is not a symlink; the store only publishes through one"
                ) from None
            raise
        if target.parent.name != RUNS_DIR:
            raise RegistryError(f"{link} points to {target}, not to a run under {RUNS_DIR}/")
        return target.name

    def current_dir(self) -> Path | None:
        """The published run's directory (``root/runs/<id>``, not the link), or None.

        Open files under the returned path: it keeps naming the same run after a later publish.

        Raises:
            RegistryError: ``current`` points to a run directory that does not exist.
        """
        run_id = self.current()
        if run_id is None:
            return None
        path = self.runs_dir / run_id
        if not path.is_dir():
            raise RegistryError(
                f"{self.root / CURRENT_LINK} points to run {run_id}, whose directory {path} is gone"
            )
        return path

    def list_runs(self) -> list[RunInfo]:
        """Every run directory, complete or not, oldest first (by start time, then id).

        Directories being pruned (``.deleting-``) are not listed.
        """
        if not self.runs_dir.is_dir():
            return []
        try:
            current = self.current()
        except RegistryError:
            current = None
        k = self.config.gate_k
        out: list[RunInfo] = []
        for path in self.runs_dir.iterdir():
            if not path.is_dir() or path.is_symlink() or path.name.startswith(DELETING_PREFIX):
                continue
            pending = path.name.startswith(PENDING_PREFIX)
            run_id = self.run_id_of(path)
            manifest = None
            if not pending and (path / MANIFEST_FILE).is_file():
                try:
                    manifest = Manifest.load(path / MANIFEST_FILE)
                except RegistryError:
                    manifest = None
            if manifest is not None and manifest.run_id == run_id:
                out.append(
                    RunInfo(
                        run_id=run_id,
                        path=path,
                        complete=True,
                        created=manifest.created,
                        finished=manifest.finished,
                        recall=manifest.recall(k),
                        k=k,
                        is_current=run_id == current,
                    )
                )
            else:
                out.append(
                    RunInfo(
                        run_id=run_id,
                        path=path,
                        complete=False,
                        created=self._start_time(path),
                        finished=None,
                        recall=None,
                        k=k,
                        is_current=not pending and run_id == current,
                    )
                )
        return sorted(out, key=lambda r: (r.created, r.run_id))

    @staticmethod
    def _started_note(path: Path) -> dict[str, Any]:
        try:
            note = json.loads((path / STARTED_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    @classmethod
    def _start_time(cls, path: Path) -> dt.datetime:
        try:
            created = _parse_time(cls._started_note(path).get("created"))
        except (TypeError, ValueError):
            created = None
        return created or dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)

    @classmethod
    def _writer_alive(cls, path: Path) -> bool:
        """Whether the process that started a pending run still runs on this host (pid reuse errs
        on the side of keeping the directory)."""
        note = cls._started_note(path)
        pid = note.get("pid")
        if note.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def publish(self, run_id: str, *, action: str = "publish", forced: bool = False) -> str | None:
        """Verify a complete run and switch ``current`` to it atomically.

        The new link is created as ``root/.current.tmp-*`` and ``os.replace``\\d over ``current``:
        a reader resolving ``current`` sees the old run or the new one, never neither. Publishing
        an older complete run is a rollback.

        Each switch is recorded in ``HISTORY_FILE`` just before it happens (for retention's grace
        period and :meth:`previous_published`).

        Args:
            run_id: the complete run to publish.
            action: recorded in the history (``publish`` or ``rollback``).
            forced: recorded in the history (the quality gate was overridden).

        Returns:
            The previously published run id, or None.

        Raises:
            RegistryError: the run is unknown or incomplete (``current`` is left unchanged), or
                ``current`` is a real directory.
            IntegrityError: the run's files do not match its manifest (``current`` unchanged).
        """
        with self._locked():
            self.run_dir(run_id)
            self.verify(run_id)
            previous = self.current()
            tmp_link = self.root / f".{CURRENT_LINK}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            os.symlink(f"{RUNS_DIR}/{run_id}", tmp_link)
            self._append_history(
                {
                    "time": _now().isoformat(),
                    "run_id": run_id,
                    "previous": previous,
                    "action": action,
                    "forced": forced,
                    "pid": os.getpid(),
                }
            )
            try:
                fault_point("publish:before-swap")
                os.replace(tmp_link, self.root / CURRENT_LINK)
                fault_point("publish:after-swap")
            except OSError as err:
                raise RegistryError(
                    f"cannot switch {self.root / CURRENT_LINK} to run {run_id}: {err}; it must be a symlink "
                    "(move a real directory of that name away)"
                ) from None
            finally:
                tmp_link.unlink(missing_ok=True)
            _fsync_dir(self.root)
        return previous

    def _recently_switched(self, grace_s: float) -> set[str]:
        """Runs named (as new or previous) by a switch of ``current`` less than ``grace_s`` ago."""
        if grace_s <= 0:
            return set()
        horizon = _now() - dt.timedelta(seconds=grace_s)
        out: set[str] = set()
        for entry in self.history():
            try:
                when = dt.datetime.fromisoformat(entry["time"])
            except (TypeError, ValueError):
                continue
            if when >= horizon:
                out.update(str(r) for r in (entry.get("run_id"), entry.get("previous")) if r)
        return out

    def prune(self, keep: int | None = None) -> list[str]:
        """Delete old complete runs and crash debris; never the published run.

        Keeps the ``keep`` newest complete runs (by start time), the published one counting as one
        of them however old it is, and besides them every run that was switched to or away from
        less than ``config.replaced_grace_s`` seconds ago (see ``HISTORY_FILE``). Deletes incomplete directories (pending or without a manifest)
        that started before the newest complete run, unless the process that started them still
        runs on this host (a newer one, or a live one, may still be being written), leftovers of an interrupted prune, and stray temporary ``current`` links. A run is renamed
        to ``.deleting-*`` before its files are unlinked, so it leaves the listing atomically;
        readers that already opened its files keep reading them.

        Args:
            keep: complete runs to keep, >= 1; ``config.keep_runs`` when None.

        Returns:
            Names of the deleted run directories (``<id>`` or ``.tmp-<id>``), oldest first.
        """
        keep = self.config.keep_runs if keep is None else keep
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        deleted: list[str] = []
        with self._locked():
            runs = self.list_runs()
            current = self.current()
            complete = sorted(
                (r for r in runs if r.complete), key=lambda r: (r.created, r.run_id), reverse=True
            )
            kept = {current} if any(r.run_id == current for r in complete) else set()
            for run in complete:
                if len(kept) >= keep:
                    break
                kept.add(run.run_id)
            # A run replaced less than replaced_grace_s ago stays, whatever keep says: a reader
            # that resolved current just before the switch may still be opening its files.
            kept |= self._recently_switched(self.config.replaced_grace_s)
            newest = complete[0].created if complete else None
            doomed = [
                r
                for r in runs
                if not r.is_current
                and (
                    (r.complete and r.run_id not in kept)
                    or (
                        not r.complete
                        and newest is not None
                        and r.created < newest
                        and not self._writer_alive(r.path)
                    )
                )
            ]
            for run in doomed:
                trash = self.runs_dir / f"{DELETING_PREFIX}{run.path.name}-{secrets.token_hex(4)}"
                os.rename(run.path, trash)
                deleted.append(run.path.name)
            if self.runs_dir.is_dir():
                _fsync_dir(self.runs_dir)
                for path in self.runs_dir.iterdir():
                    if path.name.startswith(DELETING_PREFIX) and path.is_dir() and not path.is_symlink():
                        _remove_tree(path)
            for link in self.root.glob(f".{CURRENT_LINK}.tmp-*"):
                link.unlink(missing_ok=True)
        return deleted


HOLDOUT_DIR = "holdout"
"""Subdirectory of a run with the holdout model's embeddings (see :func:`score_current_on_holdout`)."""


def resolve_run_dir(path: str | os.PathLike[str]) -> Path:
    """The run directory meant by ``path``: an artifacts root (its ``current``), the ``current``
    link itself, or a run directory.

    The canonical resolver: readers call it once and open files under the returned path, which is
    the run's real directory (symlinks resolved), so a later publish does not change what they read.
    A run directory is one with a ``manifest.json``, or an unregistered ``train_run`` output (with
    ``item_embeddings.parquet``).

    Raises:
        RegistryError: nothing is published under an artifacts root, ``current`` is dangling, or
            ``path`` is neither an artifacts root nor a run directory.
    """
    path = Path(path)
    link = path / CURRENT_LINK
    if link.is_symlink() or link.exists():
        target = Path(os.path.realpath(link))
        if not target.is_dir():
            raise RegistryError(f"{link} points to {target}, which does not exist")
        return target
    if path.is_dir() and ((path / MANIFEST_FILE).is_file() or (path / "item_embeddings.parquet").is_file()):
        return Path(os.path.realpath(path))
    if (path / RUNS_DIR).is_dir():
        raise RegistryError(
            f"artifacts directory {path} has no published run (no {CURRENT_LINK!r}); publish one"
        )
    raise RegistryError(
        f"{path} is neither an artifacts directory (with {CURRENT_LINK!r}) nor a run directory (with "
        f"{MANIFEST_FILE} or item_embeddings.parquet)"
    )


@dataclass(frozen=True)
class GateDecision:
    """Outcome of :func:`gate`.

    Attributes:
        publish: whether the candidate may replace ``current``.
        reason: one sentence with the numbers behind the decision.
        k: the K of the compared Recall@K.
        candidate_recall: candidate's holdout Recall@K.
        current_recall: the current model's Recall@K on the candidate's holdout; None without one.
        popularity_recall: popularity baseline's Recall@K on the same holdout; None when not given.
        threshold: ``(1 - tolerance) x current_recall``, the bar the candidate had to reach; None
            without a current model.
        forced: the decision was overridden with ``force=True``.
    """

    publish: bool
    reason: str
    k: int
    candidate_recall: float
    current_recall: float | None
    popularity_recall: float | None
    threshold: float | None
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for the manifest's ``extra`` or a flow artifact)."""
        return asdict(self)


def _models_table(metrics: Mapping[str, Any]) -> Mapping[str, Any]:
    holdout = metrics.get("holdout", metrics)
    models = holdout.get("models") if isinstance(holdout, Mapping) else None
    if not isinstance(models, Mapping):
        raise RegistryError(
            "candidate metrics have no holdout.models section: pass the run's metrics.json as loaded "
            f"(top-level keys: {sorted(metrics)})"
        )
    return models


def _recall_of(table: Mapping[str, Any], k: int, what: str) -> float:
    key = f"recall@{k}"
    if key not in table:
        have = sorted(name for name in table if str(name).startswith("recall@"))
        raise RegistryError(
            f"{what} metrics have no {key} (they have {have}); set publish.gate_k to one of eval.ks"
        )
    value = float(table[key])
    if not math.isfinite(value):
        raise RegistryError(f"{what} {key} is {value}; cannot gate on it")
    return value


def gate(
    candidate_metrics: Mapping[str, Any],
    current_metrics_on_same_holdout: Mapping[str, Any] | None,
    config: PublishConfig,
    *,
    force: bool = False,
) -> GateDecision:
    """Decide whether a candidate run may replace the current one, from holdout Recall@K.

    Rules (K = ``config.gate_k``): with a current model, the candidate's Recall@K must be at least
    ``(1 - gate_tolerance) x`` the current model's Recall@K on the candidate's holdout; with
    ``require_beat_popularity``, it must also be strictly above the popularity baseline's on that
    holdout. Without a current model only the popularity rule applies. ``force`` publishes
    whatever the rules say, and the reason says what they would have decided.

    Args:
        candidate_metrics: the candidate's ``metrics.json`` (``holdout.models.model`` and
            ``holdout.models.popularity``), or an ``EvaluationResult.to_dict()``.
        current_metrics_on_same_holdout: :func:`score_current_on_holdout`'s result (its
            ``metrics``), a flat ``{"recall@K": ...}`` dict, or None when nothing is published.
        config: the gate settings.
        force: override the decision.

    Raises:
        RegistryError: a needed Recall@K is absent (``gate_k`` not among the evaluated K).
    """
    k = config.gate_k
    tol = config.gate_tolerance
    models = _models_table(candidate_metrics)
    if "model" not in models:
        raise RegistryError(f"candidate metrics have no 'model' entry (models: {sorted(models)})")
    candidate = _recall_of(models["model"], k, "candidate")
    popularity = None
    if "popularity" in models:
        popularity = _recall_of(models["popularity"], k, "popularity")
    elif config.require_beat_popularity:
        raise RegistryError(
            "candidate metrics have no 'popularity' entry, but publish.require_beat_popularity is on"
        )
    current = threshold = None
    if current_metrics_on_same_holdout is not None:
        table = current_metrics_on_same_holdout.get("metrics", current_metrics_on_same_holdout)
        current = _recall_of(table, k, "current model")
        threshold = (1.0 - tol) * current

    failures: list[str] = []
    passes: list[str] = []
    if threshold is not None and current is not None:
        bar = f"{threshold:.4f} = (1 - {tol:g}) x the current model's {current:.4f} on the same holdout"
        if candidate >= threshold:
            passes.append(f"candidate recall@{k} {candidate:.4f} >= {bar}")
        else:
            failures.append(f"candidate recall@{k} {candidate:.4f} is below {bar}")
    else:
        passes.append(f"no current model; candidate recall@{k} {candidate:.4f}")
    if config.require_beat_popularity and popularity is not None:
        if candidate > popularity:
            passes.append(f"above the popularity baseline's {popularity:.4f}")
        else:
            failures.append(
                f"candidate recall@{k} {candidate:.4f} is not above the popularity baseline's {popularity:.4f}"
            )
    else:
        passes.append("popularity not required (publish.require_beat_popularity is off)")

    ok = not failures
    if force:
        verdict = (
            "the gate would have passed anyway: " + ", ".join(passes)
            if ok
            else "the gate would have refused: " + "; ".join(failures)
        )
        reason = f"forced publish (force=True); {verdict}"
    elif ok:
        reason = "publish: " + ", ".join(passes)
    else:
        reason = "refuse: " + "; ".join(failures)
    return GateDecision(
        publish=ok or force,
        reason=reason,
        k=k,
        candidate_recall=candidate,
        current_recall=current,
        popularity_recall=popularity,
        threshold=threshold,
        forced=force,
    )


def score_current_on_holdout(
    current_run_dir: str | os.PathLike[str],
    candidate_run_dir: str | os.PathLike[str],
    config: Config,
    *,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """Evaluate the CURRENT published model on the CANDIDATE run's holdout, for :func:`gate`.

    The holdout is rebuilt exactly as ``train_run`` built the candidate's: from the candidate's
    ``interactions.parquet``, training rows (``split == "train"``) are the seen items (excluded
    from rankings with ``eval.exclude_seen``) and define the candidate items (items with a training
    row); liked test rows (``split == "test"``, ``label == 1``) are relevant; users are sampled by
    ``config.eval``. The popularity baseline is scored on the same users, and when the candidate's
    ``metrics.json`` is present its popularity figures and user count must match, which proves the
    holdout is the same (a different ``config`` raises).

    The current model scores with its exported embeddings (the Parquet files and their
    ``distance``, as any consumer would). Candidate ids are mapped to the current run's
    vocabularies (the embedding files' id order, which is ``users.parquet``/``items.parquet`` order)
    with ``Vocabulary.numbers(..., missing="negative")``:

    - an item the current model does not know has no embedding, so the current model can never
      rank it: it scores ``-inf``, and a relevant test item among them is a miss for the current
      model;
    - a user the current model does not know has no embedding: the current model recommends
      nothing to them and all their relevant items are misses.

    Both are counted in ``unknown``. They lower the current model's score (the candidate did
    learn those users and items), which is a real advantage of the candidate, not an artefact.

    Which model of the current run is scored, so that nothing leaks: its *holdout* model
    (``holdout/user_embeddings.parquet`` and ``holdout/item_embeddings.parquet``), the one that
    trained only on interactions older than the current run's cutoff. The published (refit) model
    trained on the whole of its log, which for an unchanged or grown log contains the candidate's
    holdout rows: scoring it here would compare the candidate with a model that has seen the
    answers (measured: 0.86 against the candidate's 0.38 Recall@20 on an unchanged log). For an
    append-only log the current cutoff is not newer than the candidate's, so its holdout model never
    saw a candidate test row; it did see fewer recent interactions than the candidate's holdout
    model, a small bias in the candidate's favour that the gate's tolerance absorbs. A run written
    without ``holdout/`` (``train.refit: false``: its published model is its holdout model) is
    scored with its top-level embeddings.

    Args:
        current_run_dir: the published run (a run directory or an artifacts root).
        candidate_run_dir: the candidate run directory (pending or complete).
        config: the candidate run's pipeline config (``eval`` and ``publish.gate_k`` are used).
        batch_size: users scored at once.

    Returns:
        ``{"run_id", "candidate_run_id", "k", "n_users", "metrics": {metric@K: float} of the
        current model, "popularity": {metric@K: float}, "unknown": {"users", "items",
        "evaluated_users", "relevant_pairs", "relevant_pairs_unknown_item"}}``: ``users``/``items``
        are candidate vocabulary entries unknown to the current model; ``evaluated_users`` are
        evaluated users among them; ``relevant_pairs`` is the number of reachable relevant
        (user, item) pairs of the evaluated users and ``relevant_pairs_unknown_item`` those whose
        item the current model does not know.

    Raises:
        RegistryError: the two runs' embeddings use different distances or id types, or the
            rebuilt holdout does not match the candidate's ``metrics.json``.
        DataError: missing or malformed files (named in the message).
    """
    # Imported here: they pull in torch, and the store itself (listing, publishing) should not.
    import polars as pl

    from recsys_metric.data.matrix import InteractionMatrix
    from recsys_metric.data.vocab import Vocabulary
    from recsys_metric.evaluate import evaluate_with_baselines, training_items_mask
    from recsys_metric.export import read_embeddings
    from recsys_metric.model.distances import score_numpy

    current = resolve_run_dir(current_run_dir)
    candidate = Path(candidate_run_dir)
    cand_users = Vocabulary.load(candidate / "users.parquet")
    cand_items = Vocabulary.load(candidate / "items.parquet")
    n_users, n_items = len(cand_users), len(cand_items)
    frame = pl.read_parquet(
        candidate / "interactions.parquet", columns=["user_num", "item_num", "label", "split"]
    )
    train = frame.filter(pl.col("split") == "train")
    test_liked = frame.filter((pl.col("split") == "test") & (pl.col("label") == 1))
    train_seen = InteractionMatrix.from_pairs(
        train["user_num"].to_numpy(), train["item_num"].to_numpy(), n_users, n_items
    )
    relevant = InteractionMatrix.from_pairs(
        test_liked["user_num"].to_numpy(), test_liked["item_num"].to_numpy(), n_users, n_items
    )
    candidates = training_items_mask(train_seen)

    source = (
        current / HOLDOUT_DIR if (current / HOLDOUT_DIR / "item_embeddings.parquet").is_file() else current
    )
    user_table = read_embeddings(source / "user_embeddings.parquet")
    item_table = read_embeddings(source / "item_embeddings.parquet")
    if user_table.distance != item_table.distance:
        raise RegistryError(
            f"run {current}: user embeddings use {user_table.distance} but item embeddings {item_table.distance}"
        )
    try:
        user_map = Vocabulary(user_table.ids, name="user").numbers(cand_users.ids(), missing="negative")
        item_map = Vocabulary(item_table.ids, name="item").numbers(cand_items.ids(), missing="negative")
    except TypeError as err:
        raise RegistryError(
            f"cannot compare run {current} with candidate {candidate}: their id types differ ({err})"
        ) from None
    known_item = item_map >= 0
    item_vectors = item_table.vectors[np.maximum(item_map, 0)]
    distance = item_table.distance
    scored_users: list[np.ndarray] = []

    def score(users: np.ndarray) -> np.ndarray:
        scored_users.append(users)
        rows = user_map[users]
        known = rows >= 0
        out = np.full((users.shape[0], n_items), -np.inf, dtype=np.float32)
        if known.any():
            block = score_numpy(user_table.vectors[rows[known]], item_vectors, distance).astype(
                np.float32, copy=False
            )
            block[:, ~known_item] = -np.inf
            out[known] = block
        return out

    ks = tuple(sorted(set(config.eval.ks) | {config.publish.gate_k}))
    result = evaluate_with_baselines(
        score,
        train_seen,
        relevant,
        config.eval.model_copy(update={"ks": ks}),
        candidate_mask=candidates,
        batch_size=batch_size,
    )
    evaluated = np.unique(np.concatenate(scored_users)) if scored_users else np.empty(0, dtype=np.int64)

    keys = relevant.keys()
    pair_users = keys // n_items
    pair_items = keys - pair_users * n_items
    reachable = candidates[pair_items]
    if config.eval.exclude_seen:
        reachable &= ~train_seen.contains(pair_users, pair_items)
    in_eval = np.isin(pair_users, evaluated) & reachable

    cand_metrics_path = candidate / "metrics.json"
    cand_metrics = _read_json(cand_metrics_path) if cand_metrics_path.is_file() else {}
    _check_same_holdout(
        cand_metrics, result.models["popularity"], result.n_users, cand_metrics_path, result.sample
    )
    return {
        "run_id": user_table.run_id,
        "candidate_run_id": cand_metrics.get("run_id", candidate.name.removeprefix(PENDING_PREFIX)),
        "k": config.publish.gate_k,
        "n_users": result.n_users,
        "metrics": result.models["model"],
        "popularity": result.models["popularity"],
        "standard_errors": result.standard_errors.get("model", {}),
        "sample": result.sample.to_dict() if result.sample is not None else None,
        "unknown": {
            "users": int((user_map < 0).sum()),
            "items": int((~known_item).sum()),
            "evaluated_users": int((user_map[evaluated] < 0).sum()),
            "relevant_pairs": int(in_eval.sum()),
            "relevant_pairs_unknown_item": int((in_eval & ~known_item[pair_items]).sum()),
        },
    }


def _check_same_holdout(
    cand_metrics: Mapping[str, Any],
    popularity: Mapping[str, float],
    n_users: int,
    path: Path,
    sample: Any = None,
) -> None:
    """Raise unless the rebuilt holdout reproduces the candidate's recorded popularity figures
    and, where recorded, its user sample (``evaluate.UserSample`` fingerprint)."""
    holdout = cand_metrics.get("holdout")
    if not isinstance(holdout, Mapping):
        return
    recorded = holdout.get("models", {}).get("popularity", {})
    mismatches = [
        f"{key} {popularity[key]:.6f} vs {value:.6f}"
        for key, value in recorded.items()
        if key in popularity and not math.isclose(popularity[key], float(value), rel_tol=1e-9, abs_tol=1e-12)
    ]
    if "n_users" in holdout and int(holdout["n_users"]) != n_users:
        mismatches.insert(0, f"n_users {n_users} vs {holdout['n_users']}")
    recorded_sample = holdout.get("sample")
    if sample is not None and isinstance(recorded_sample, Mapping):
        if recorded_sample.get("fingerprint") != sample.fingerprint:
            mismatches.insert(0, f"user sample {sample.fingerprint} vs {recorded_sample.get('fingerprint')}")
    if mismatches:
        raise RegistryError(
            f"the rebuilt holdout differs from the one recorded in {path} (rebuilt vs recorded: "
            f"{', '.join(mismatches[:4])}); pass the candidate run's own config"
        )
