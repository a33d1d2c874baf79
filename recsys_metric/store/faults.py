"""Fault injection at the store's stage boundaries: a TEST HOOK, not a feature.

The fault-injection suite (``tests/test_faults.py``) kills a real ``recsys-metric run`` at an
exact moment by starting it with ``RECSYS_METRIC_FAULT=POINT[@ACTION]``; the library calls
:func:`fault_point` at each boundary and acts when the name matches. Unset (always, outside
tests), the check is one environment lookup.

Points, in the order a run passes them (see :data:`POINTS`)::

    lock:acquired            the writer lock is held and the dead runs' debris removed
    prepare:after            the log is validated, split and written into runs/.tmp-<id>
    train:after              the models are trained and evaluated, nothing exported yet
    export:after             embeddings, model and metrics.json are written
    index:after              the Annoy index is written
    finalize:before-rename   manifest written, files read-only, still runs/.tmp-<id>
    finalize:after-rename    runs/<id> is complete, not published
    publish:before-swap      the new ``current`` link exists under a temporary name
    publish:after-swap       ``current`` names the new run, the history is not yet written

Actions: ``kill`` (default: SIGKILL to this process, like ``kill -9`` or a power cut),
``enospc`` (raise ``OSError(ENOSPC)``, a full disk at that moment), ``sleep=SECONDS`` (hold
still, e.g. with the writer lock held), ``pause=PATH`` (hold still until the file ``PATH``
exists, at most 10 minutes: the concurrency tests release a writer exactly when they want).
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV_VAR = "RECSYS_METRIC_FAULT"
POINTS: tuple[str, ...] = (
    "lock:acquired",
    "prepare:after",
    "train:after",
    "export:after",
    "index:after",
    "finalize:before-rename",
    "finalize:after-rename",
    "publish:before-swap",
    "publish:after-swap",
)


def fault_point(name: str) -> None:
    """Act on ``$RECSYS_METRIC_FAULT`` when it names this point (see the module doc).

    Raises:
        ValueError: ``name`` is not one of :data:`POINTS` (a typo in the library), or the
            variable names an unknown action.
        OSError: ``ENOSPC``, with the ``enospc`` action.
    """
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    point, _, action = spec.partition("@")
    if point != name:
        return
    action = action or "kill"
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is asynchronous; never run past the point meanwhile
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR}={spec})")
    elif action.startswith("sleep="):
        time.sleep(float(action.removeprefix("sleep=")))
    elif action.startswith("pause="):
        release, deadline = action.removeprefix("pause="), time.monotonic() + 600
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(
            f"{ENV_VAR}={spec}: unknown action {action!r} (kill, enospc, sleep=SECONDS, pause=PATH)"
        )
