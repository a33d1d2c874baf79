"""``recsys-metric api``: the HTTP service under uvicorn (arguments and start-up)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys_metric.errors import ConfigError

# How `recsys-metric api` hands its options to the app factory in each uvicorn worker. Defined here,
# not in serving.api, so that building the CLI's parser does not import FastAPI.
ENV_ARTIFACTS = "RECSYS_METRIC_ARTIFACTS"
ENV_INTERVAL = "RECSYS_METRIC_RELOAD_INTERVAL"
ENV_INDEX = "RECSYS_METRIC_INDEX"
ENV_VERIFY = "RECSYS_METRIC_VERIFY"
ENV_ADDED_ITEMS = "RECSYS_METRIC_ADDED_ITEMS"


def add_api_parser(sub: Any, func: Callable[[argparse.Namespace], int], *, default_artifacts: str) -> None:
    """Add the ``api`` subcommand to the CLI's subparsers."""
    p = sub.add_parser(
        "api",
        help="serve queries over HTTP (FastAPI + uvicorn), following each publish of ARTIFACTS/current",
        description="HTTP service over the published run: /similar, /recommend, /recommend/history, "
        "/explain, /health, /metrics, OpenAPI at /docs. It checks ARTIFACTS/current every --interval "
        "seconds and swaps to a newly published run once it has loaded and verified (docs/serving.md).",
    )
    p.add_argument(
        "--artifacts",
        default=default_artifacts,
        help="artifact store to follow, or a run directory to serve as is (default: artifacts)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each with its own copy of the run (default: 1)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=30.0,
        help="seconds between checks of ARTIFACTS/current for a new run (default: 30)",
    )
    p.add_argument(
        "--index", choices=["auto", "annoy", "exact"], default="auto", help="query index (default: auto)"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking each run's files against its manifest (faster loads, no damage check)",
    )
    p.add_argument(
        "--added-items",
        default=None,
        metavar="DIR",
        help="directory of the added-items journal: items posted to /items are written there and "
        "every worker serves them, also after a restart (default: ARTIFACTS/added_items when "
        "following an artifact store; 'none': each worker keeps the items posted to it)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    p.set_defaults(func=func)


def run_api(args: argparse.Namespace) -> int:
    """Start uvicorn; returns when it stops (SIGINT or SIGTERM)."""
    import uvicorn

    for name, value in (("--workers", args.workers), ("--port", args.port)):
        if value < (0 if name == "--port" else 1):
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if args.interval < 0:
        raise ConfigError(f"--interval must be >= 0 seconds, got {args.interval}")
    artifacts = Path(args.artifacts)
    if not artifacts.is_dir():
        raise ConfigError(
            f"--artifacts {artifacts} is not a directory; give an artifact store or a run directory"
        )
    # Workers are separate processes that build the app from the environment.
    os.environ[ENV_ARTIFACTS] = str(artifacts.resolve())
    os.environ[ENV_INTERVAL] = str(args.interval)
    os.environ[ENV_INDEX] = args.index
    os.environ[ENV_VERIFY] = "0" if args.no_verify else "1"
    os.environ[ENV_ADDED_ITEMS] = _added_items_dir(args.added_items, artifacts)
    uvicorn.run(
        "recsys_metric.serving.api:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        proxy_headers=True,
    )
    return 0


def _added_items_dir(option: str | None, artifacts: Path) -> str:
    """The journal directory for ``--added-items`` (empty: none). By default an artifact store's
    ``added_items/``; a run directory served as is has none (nothing follows it)."""
    from recsys_metric.registry import CURRENT_LINK
    from recsys_metric.serving.items_journal import DEFAULT_DIR

    if option is not None:
        return "" if option.lower() == "none" else str(Path(option).resolve())
    if not os.path.lexists(artifacts / CURRENT_LINK):
        return ""
    return str((artifacts / DEFAULT_DIR).resolve())
