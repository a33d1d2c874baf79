"""The batch recommendations flow: the top-K table of the published run, one directory per run.

``current`` is resolved once, by the first task, to the run's own directory; the table is written
from that directory into ``out/<run_id>/`` (:func:`recsys_metric.recommend.write_recommendations`:
columns ``user_id, rank, item_id, score, run_id``, written beside and renamed into place). A
publish while the flow runs changes nothing it reads, and tables of different runs never share a
directory. Running the flow again for the same run replaces that run's table atomically.

Run it once::

    python -m flows.batch_recommendations --artifacts artifacts --out artifacts/recommendations -k 100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from recsys_metric import recommend
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.registry import resolve_run_dir


@task(cache_policy=NO_CACHE)
def resolve_current(artifacts: str) -> str:
    """The published run's directory (symlinks resolved: a later publish does not change it)."""
    run_dir = resolve_run_dir(artifacts)
    get_run_logger().info("current run: %s", run_dir)
    return str(run_dir)


def read_user_ids(users_path: str, run_dir: str) -> list[Any]:
    """User ids from a text file (one per line, blank lines skipped), typed like the run's vocabulary."""
    lines = [line.strip() for line in Path(users_path).read_text().splitlines() if line.strip()]
    if Vocabulary.load(Path(run_dir) / "users.parquet").ids().dtype.is_integer():
        return [int(line) for line in lines]
    return lines


@task(cache_policy=NO_CACHE)
def write_table(run_dir: str, out: str, k: int, users_path: str | None, index: str) -> dict[str, Any]:
    """Write the run's top-``k`` table into ``out/<run_id>/``; returns the writer's summary."""
    run_id = resolve_run_dir(run_dir).name
    user_ids = read_user_ids(users_path, run_dir) if users_path is not None else None
    stats = recommend.write_recommendations(
        run_dir,
        Path(out) / run_id,
        k=k,
        user_ids=user_ids,
        index=index,
        progress=False,
        overwrite=True,
    )
    get_run_logger().info(
        "wrote top-%d for %d users (%d rows, %d files) to %s in %.1f s",
        k,
        stats["n_users"],
        stats["n_rows"],
        stats["n_files"],
        stats["out_dir"],
        stats["seconds"],
    )
    return stats


@flow(name="batch-recommendations")
def batch_recommendations(
    artifacts: str = "artifacts",
    out: str = "artifacts/recommendations",
    k: int = 100,
    users_path: str | None = None,
    index: Literal["exact", "annoy"] = "exact",
) -> dict[str, Any]:
    """Top-``k`` recommendations of the published run for every user (or those in ``users_path``).

    Args:
        artifacts: the artifact store root (its ``current`` run is used).
        out: parent directory of the tables; this run's goes to ``out/<run_id>/``.
        k: items per user.
        users_path: text file with one user id per line; None: every user of the run.
        index: ``exact`` (blocked exact scoring) or ``annoy`` (the run's Annoy index).

    Returns:
        The writer's summary (``run_id``, ``out_dir``, ``n_users``, ``n_rows``, ``n_files``...).
    """
    run_dir = resolve_current(artifacts)
    return write_table(run_dir, out, k, users_path, index)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.batch_recommendations")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--out", default="artifacts/recommendations")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--users", dest="users_path")
    parser.add_argument("--index", choices=["exact", "annoy"], default="exact")
    args = parser.parse_args(argv)
    stats = batch_recommendations(**vars(args))
    print(f"wrote {stats['n_rows']:,} rows for run {stats['run_id']} to {stats['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
