"""The one-writer lock of an artifact store: an exclusive ``flock`` on ``ARTIFACTS/.lock``.

Every command that writes to a store (``run``, ``train`` into a store, ``publish``, ``rollback``,
the nightly flow) holds it for its whole duration, so two writers never overlap: a second one
either fails at once with :class:`StoreLockedError` (naming the holder's pid, host, start time
and command) or queues behind the first (``wait``). The kernel releases a ``flock`` when the
last descriptor of its open file goes away, so a writer killed with ``kill -9``, the OOM killer
or a power cut never leaves a stale lock behind; the holder note inside the file is only
information, never trusted to decide anything.

The descriptor is opened with ``O_CLOEXEC``: a program this process ``exec``\\s does not inherit
the lock. A child that is ``fork``\\ed without ``exec`` (a multiprocessing worker) does share it
and keeps it held until it exits; the pipeline's own workers live no longer than the run.

The lock is re-entrant within one process (a count per store, shared by its threads): the
store's own short critical sections (``new_run``, ``finalize``, ``publish``, ``prune``) take it
again inside a run that already holds it. ``flock`` is advisory and local to one kernel: it
does not protect a store on NFS written from two hosts.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from recsys_metric.errors import RecsysMetricError

LOCK_FILE = ".lock"
"""The lock file's name inside an artifacts root."""
POLL_SECONDS = 0.2
"""How often a bounded wait tries the lock again."""

logger = logging.getLogger(__name__)

_guard = threading.Lock()
_held: dict[str, int] = {}
"""Real path of a locked store -> how many nested holds this process has on it."""


class StoreLockedError(RecsysMetricError):
    """Another process holds the store's writer lock (and this one did not wait, or waited in vain).

    Attributes:
        holder: the holder's note (``pid``, ``host``, ``started``, ``command``), empty when unreadable.
    """

    def __init__(self, message: str, *, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def held_by_this_process(root: str | os.PathLike[str]) -> bool:
    """Whether this process holds the writer lock of the store at ``root``."""
    with _guard:
        return _held.get(os.path.realpath(root), 0) > 0


def read_holder(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The note the current (or last) holder wrote into ``root/.lock``; ``{}`` when none or unreadable."""
    try:
        data = json.loads(Path(root, LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host, since 2026-12-04T14:00:00+00:00 (recsys-metric run ...)``, or a fallback."""
    if not holder.get("pid"):
        return "a process that left no note (an older version, or a store operation starting up)"
    text = f"pid {holder['pid']} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    return text


def _note(purpose: str) -> bytes:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
    return (
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "purpose": purpose,
                "command": command[:300],
            }
        )
        + "\n"
    ).encode()


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _acquire(fd: int, root: Path, wait: float | None) -> None:
    if _try(fd):
        return
    holder = read_holder(root)
    who = describe_holder(holder)
    if wait is not None and wait <= 0:
        raise StoreLockedError(
            f"artifact store {root} is being written by {who}; only one writer at a time: run again "
            "when it has finished, or queue behind it with --wait [SECONDS]",
            holder=holder,
        )
    logger.warning(
        "artifact store %s is being written by %s; waiting %s",
        root,
        who,
        "until it finishes" if wait is None else f"up to {wait:g} s",
    )
    if wait is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
        if _try(fd):
            return
    holder = read_holder(root)
    raise StoreLockedError(
        f"artifact store {root} is still being written by {describe_holder(holder)} after waiting "
        f"{wait:g} s; run again later or wait longer (--wait without a number waits until it finishes)",
        holder=holder,
    )


@contextmanager
def store_lock(
    root: str | os.PathLike[str], *, wait: float | None = 0.0, purpose: str = "write"
) -> Iterator[None]:
    """Hold the exclusive writer lock of the store at ``root`` (created when missing).

    Args:
        root: the artifacts root.
        wait: 0 fails at once when another process holds it; a number of seconds waits that
            long at most; None waits until the holder finishes.
        purpose: a word for the holder note (``run``, ``train``, ``publish``...).

    Raises:
        StoreLockedError: another process holds it (after ``wait``); the message names it.
    """
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(root)
    with _guard:
        if _held.get(key, 0) > 0:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _acquire(fd, root, wait)
        try:
            # Information for a writer that finds the store busy; best effort (a full disk must
            # not stop the run that would report it).
            os.ftruncate(fd, 0)
            os.pwrite(fd, _note(purpose), 0)
        except OSError:
            pass
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
    finally:
        os.close(fd)  # releases the flock
