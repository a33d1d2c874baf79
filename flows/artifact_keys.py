"""Prefect artifact keys that say which artifact store (and deployment) a report belongs to.

A Prefect server keeps the latest artifact per key across everything that reports to it: with
one fixed key, the "latest nightly report" was whichever store or trial deployment ran last.
Keys here end with the store's directory name and a hash of its absolute path, and, for a run of
a deployment, start with the deployment's name::

    nightly-retrain-report-artifacts-3f2a9c1e                   (a run started by hand)
    nightly-retrain-test--nightly-retrain-report-artifacts-3f2a9c1e  (deployment nightly-retrain-test)

Prefect keys hold lowercase letters, digits and dashes only; other characters become dashes.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_NOT_KEY = re.compile(r"[^a-z0-9]+")
_NAME_CHARS = 40


def _slug(text: str) -> str:
    return _NOT_KEY.sub("-", text.lower()).strip("-")


def store_slug(artifacts: str | Path) -> str:
    """``<directory name>-<8 hex digits of sha256(absolute path)>``: readable and unique per store."""
    path = str(Path(artifacts).expanduser().absolute())
    name = _slug(Path(path).name)[:_NAME_CHARS].strip("-") or "store"
    return f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def current_deployment_name() -> str | None:
    """The name of the deployment this flow run belongs to; None for a run started by hand."""
    from prefect.runtime import deployment

    try:
        name = deployment.name
    except Exception:  # noqa: BLE001 - outside a flow run, or an API that cannot be asked
        return None
    return str(name) if name else None


def artifact_key(base: str, artifacts: str | Path, deployment: str | None = None) -> str:
    """The key of artifact ``base`` (``nightly-retrain-report``...) for store ``artifacts``, in
    ``deployment`` when given (``<deployment>--<base>-<store slug>``, else ``<base>-<store slug>``)."""
    key = f"{base}-{store_slug(artifacts)}"
    if deployment:
        key = f"{_slug(deployment)}--{key}"
    return key
