"""Scheduled deployments of both flows: nightly retraining at 02:00 UTC, batch tables at 04:00 UTC.

Schedules fire only against a real Prefect API server; the temporary one a flow starts when no
server is configured never runs them. To serve::

    prefect server start                                   # in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    recsys-metric serve --artifacts artifacts              # or: python -m flows.deployments

The serving process runs each scheduled flow itself (``prefect.serve``) until interrupted; relative
paths in the parameters are made absolute here, so they do not depend on where a run starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from flows.batch_recommendations import batch_recommendations
from flows.nightly_retrain import nightly_retrain

NIGHTLY_NAME = "nightly-retrain"
BATCH_NAME = "batch-recommendations"
NIGHTLY_CRON = "0 2 * * *"
BATCH_CRON = "0 4 * * *"
TIMEZONE = "UTC"


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def deployments(
    interactions: str = "data/interactions.parquet",
    artifacts: str = "artifacts",
    config_path: str | None = None,
    items: str | None = None,
    out: str | None = None,
    k: int = 100,
) -> list[RunnerDeployment]:
    """The two scheduled deployments (no server is contacted).

    Args:
        interactions: the log the nightly run reads.
        artifacts: the artifact store both flows use.
        config_path: pipeline config of the nightly run (defaults when None).
        items: item feature table of the nightly run.
        out: parent of the recommendation tables; ``<artifacts>/recommendations`` when None.
        k: items per user in the batch table.
    """
    artifacts_abs = _absolute(artifacts)
    return [
        nightly_retrain.to_deployment(
            name=NIGHTLY_NAME,
            schedules=[Cron(NIGHTLY_CRON, timezone=TIMEZONE)],
            parameters={
                "interactions": _absolute(interactions),
                "artifacts": artifacts_abs,
                "config_path": _absolute(config_path),
                "items": _absolute(items),
                "force": False,
            },
            description="Train, gate and publish a new run every night at 02:00 UTC.",
            tags=["recsys-metric"],
        ),
        batch_recommendations.to_deployment(
            name=BATCH_NAME,
            schedules=[Cron(BATCH_CRON, timezone=TIMEZONE)],
            parameters={
                "artifacts": artifacts_abs,
                "out": _absolute(out) if out is not None else str(Path(artifacts_abs) / "recommendations"),
                "k": k,
                "index": "exact",
            },
            description="Write the published run's top-K table every day at 04:00 UTC.",
            tags=["recsys-metric"],
        ),
    ]


def serve_all(**kwargs: object) -> None:
    """Serve both deployments in this process until interrupted (needs a real API server)."""
    serve(*deployments(**kwargs))  # type: ignore[arg-type]


if __name__ == "__main__":
    serve_all()
    sys.exit(0)
