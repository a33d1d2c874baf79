"""Scheduled deployments of both flows: nightly retraining at 02:00 UTC, batch tables at 04:00 UTC.

Schedules fire only against a real Prefect API server; the temporary one a flow starts when no
server is configured never runs them. To serve::

    prefect server start                                   # in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recsys-metric serve --artifacts artifacts              # or: python -m flows.deployments

The serving process runs each scheduled flow itself (``prefect.serve``) until interrupted; relative
paths in the parameters are made absolute here, so they do not depend on where a run starts.

Both crons can be overridden, and a name suffix keeps a trial deployment apart from the real
ones (docs/scheduling.md shows an every-minute run firing)::

    recsys-metric serve --retrain-cron "* * * * *" --batch-cron "* * * * *" --name-suffix test
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.batch_recommendations import batch_recommendations
from flows.nightly_retrain import nightly_retrain
from recsys_metric.errors import ConfigError

NIGHTLY_NAME = "nightly-retrain"
BATCH_NAME = "batch-recommendations"
NIGHTLY_CRON = "0 2 * * *"
BATCH_CRON = "0 4 * * *"
TIMEZONE = "UTC"


_SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def _cron(expression: str, option: str) -> Cron:
    try:
        return Cron(expression, timezone=TIMEZONE)
    except ValueError as err:
        raise ConfigError(
            f"{option} {expression!r} is not a valid cron expression: give five fields, "
            "minute hour day-of-month month day-of-week, in UTC (e.g. '0 2 * * *', or '* * * * *' "
            "for every minute)"
        ) from err


def deployment_name(base: str, name_suffix: str | None) -> str:
    """``base`` or ``base-<name_suffix>``; the suffix is letters, digits, ``-`` and ``_``."""
    if not name_suffix:
        return base
    if not _SUFFIX.fullmatch(name_suffix):
        raise ConfigError(
            f"--name-suffix {name_suffix!r} must start with a letter or digit and hold only letters, "
            "digits, '-' and '_' (e.g. 'test')"
        )
    return f"{base}-{name_suffix}"


def deployments(
    interactions: str = "data/interactions.parquet",
    artifacts: str = "artifacts",
    config_path: str | None = None,
    items: str | None = None,
    out: str | None = None,
    k: int = 100,
    retrain_cron: str = NIGHTLY_CRON,
    batch_cron: str = BATCH_CRON,
    name_suffix: str | None = None,
    warm_start: bool | None = None,
) -> list[RunnerDeployment]:
    """The two scheduled deployments (no server is contacted).

    Args:
        interactions: the log the nightly run reads.
        artifacts: the artifact store both flows use.
        config_path: pipeline config of the nightly run (defaults when None).
        items: item feature table of the nightly run.
        out: parent of the recommendation tables; ``<artifacts>/recommendations`` when None.
        k: items per user in the batch table.
        retrain_cron: when the nightly retrain runs (cron, UTC).
        batch_cron: when the batch table is written (cron, UTC).
        name_suffix: appended to both deployment names (``nightly-retrain-<suffix>``), so that a
            trial deployment does not replace the real one on the same server.
        warm_start: the nightly retrain starts from the published run's models; None keeps the
            config's ``train.warm_start``.

    Raises:
        ConfigError: a cron expression or the name suffix is invalid.
    """
    artifacts_abs = _absolute(artifacts)
    retrain_schedule = _cron(retrain_cron, "--retrain-cron")
    batch_schedule = _cron(batch_cron, "--batch-cron")
    if k < 1:
        raise ConfigError(f"k must be at least 1 (items per user in the batch table), got {k}")
    return [
        nightly_retrain.to_deployment(
            name=deployment_name(NIGHTLY_NAME, name_suffix),
            schedules=[retrain_schedule],
            parameters={
                "interactions": _absolute(interactions),
                "artifacts": artifacts_abs,
                "config_path": _absolute(config_path),
                "items": _absolute(items),
                "force": False,
                "warm_start": warm_start,
            },
            description=f"Train, gate and publish a new run (cron {retrain_cron!r}, UTC).",
            tags=["recsys-metric"],
        ),
        batch_recommendations.to_deployment(
            name=deployment_name(BATCH_NAME, name_suffix),
            schedules=[batch_schedule],
            parameters={
                "artifacts": artifacts_abs,
                "out": _absolute(out) if out is not None else str(Path(artifacts_abs) / "recommendations"),
                "k": k,
                "index": "exact",
            },
            description=f"Write the published run's top-K table (cron {batch_cron!r}, UTC).",
            tags=["recsys-metric"],
        ),
    ]


def serve_all(*runner_deployments: RunnerDeployment, **kwargs: object) -> None:
    """Serve deployments in this process until interrupted (needs a real API server).

    Serves ``runner_deployments`` when given, else ``deployments(**kwargs)``.
    """
    serve(*(runner_deployments or deployments(**kwargs)))  # type: ignore[arg-type]


if __name__ == "__main__":
    serve_all()
    sys.exit(0)
