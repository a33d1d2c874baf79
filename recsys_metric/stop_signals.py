"""SIGINT handled as SIGTERM, for long-running commands (``recsys-metric serve``).

Prefect's runner stops gracefully on SIGTERM (it installs its own handler when it starts: cancel
the polling loops and in-flight runs, then return) but has no handler of its own for SIGINT: a
Ctrl-C reaches whatever ``asyncio`` and the runner's threads make of a ``KeyboardInterrupt``, and
a job a non-interactive shell script starts with ``&`` inherits SIGINT *ignored* (POSIX), so
``kill -INT`` does nothing at all. :func:`stop_on_sigint_like_sigterm` installs a SIGINT handler
explicitly (also over an inherited ``SIG_IGN``) that does whatever SIGTERM does at that moment.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class StopRequested(SystemExit):
    """SIGINT or SIGTERM arrived before a runner took SIGTERM over: stop (exit status 0)."""


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Until the runner installs its own handler: stop as a plain SIGTERM would, but through
    # SystemExit so that ``finally`` blocks run.
    raise StopRequested(0)


@contextlib.contextmanager
def stop_on_sigint_like_sigterm() -> Iterator[list[str]]:
    """Within the block, SIGINT calls the current SIGTERM handler (looked up when it arrives).

    Until something else (Prefect's runner) installs a SIGTERM handler, both raise
    :class:`StopRequested` (a ``SystemExit(0)``). Yields a list that receives the name of each signal handled here
    (``"SIGINT"``, and ``"SIGTERM"`` before the runner took SIGTERM over); the previous handlers
    are restored on exit. Outside the main
    thread, where handlers cannot be installed, nothing changes.
    """
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        received.append("SIGTERM")
        _exit_on_sigterm(signum, frame)

    def on_int(signum: int, frame: FrameType | None) -> None:
        received.append("SIGINT")
        handler = signal.getsignal(signal.SIGTERM)
        if handler is on_term or not callable(handler):
            _exit_on_sigterm(signum, frame)
        else:
            handler(signal.SIGTERM, frame)

    previous_int = signal.signal(signal.SIGINT, on_int)
    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)
