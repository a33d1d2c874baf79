"""The batch recommendations flow: the top-K table of the published run, one directory per run.

``current`` is resolved once, by the first task, to the run's own directory; the table is written
from that directory into ``out/<run_id>/`` (:func:`recsys_metric.recommend.write_recommendations`:
columns ``user_id, rank, item_id, score, run_id``, written beside and renamed into place). A
publish while the flow runs changes nothing it reads, and tables of different runs never share a
directory. Running the flow again for the same run replaces that run's table atomically.

Scale-out (``pip install 'recsys-metric[scale]'``): with ``workers > 1`` or ``dask_address`` the
users are cut into partitions (:func:`recsys_metric.recommend.plan_recommendations`) and a subflow
running on Prefect's Dask task runner (prefect-dask) writes one partition per task, on a
temporary ``LocalCluster`` of ``workers`` single-threaded processes or on the Dask cluster whose
scheduler is at ``dask_address``; this process then writes the manifest and moves the table into
place. The table is the same as a single-process run's, file for file. Workers need the package
installed, the run directory and the output directory on storage they all see, and (on other
machines) a real Prefect API server in ``PREFECT_API_URL``. See docs/scale-out-batch.md.

Run it once::

    python -m flows.batch_recommendations --artifacts artifacts --out artifacts/recommendations -k 100
    python -m flows.batch_recommendations --workers 2                       # LocalCluster
    python -m flows.batch_recommendations --dask-address tcp://10.0.0.5:8786  # a running cluster
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import flow, get_client, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.artifact_keys import artifact_key, current_deployment_name
from flows.run_states import failed_state
from recsys_metric import recommend
from recsys_metric.cli_errors import run_command
from recsys_metric.data.vocab import Vocabulary
from recsys_metric.db import sink
from recsys_metric.db.connection import DatabaseUnreachable
from recsys_metric.errors import ConfigError
from recsys_metric.registry import resolve_run_dir

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

SCHEDULER_TIMEOUT_S = 10.0
"""How long the flow waits for a Dask scheduler to answer and to have a worker."""
REPORT_KEY = "batch-recommendations-report"
"""Base of the table's report key; the key itself names the store (flows.artifact_keys)."""


def report_markdown(stats: dict[str, Any], finished: str) -> str:
    """Markdown report of one table: run, rows, users, files, K, where, how long, when."""
    rows = [
        ("run_id", stats["run_id"]),
        ("rows", f"{stats['n_rows']:,}"),
        ("users", f"{stats['n_users']:,}"),
        ("files", stats["n_files"]),
        ("k", stats["k"]),
        ("table", stats["out_dir"]),
        ("seconds", f"{stats['seconds']:.1f}"),
        ("finished (UTC)", finished),
    ]
    lines = [f"# Batch recommendations of run {stats['run_id']}", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def _report(artifacts: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Publish the table's report artifact (keyed by store and deployment) and return ``stats``."""
    from datetime import UTC, datetime

    finished = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    create_markdown_artifact(
        report_markdown(stats, finished),
        key=artifact_key(REPORT_KEY, artifacts, current_deployment_name()),
        description=f"batch recommendations of run {stats['run_id']}",
    )
    return stats


@task(cache_policy=NO_CACHE, persist_result=False)
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


def _retry_if_unreachable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a database load only when the server could not be reached (not for a bad table name or login)."""
    return isinstance(state.result(raise_on_failure=False), DatabaseUnreachable)


def _log_table(stats: dict[str, Any]) -> None:
    get_run_logger().info(
        "wrote top-%d for %d users (%d rows, %d files) to %s in %.1f s",
        stats["k"],
        stats["n_users"],
        stats["n_rows"],
        stats["n_files"],
        stats["out_dir"],
        stats["seconds"],
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def write_table(
    run_dir: str, out: str, k: int, users_path: str | None, index: str, batch_users: int | None = None
) -> dict[str, Any]:
    """Write the run's top-``k`` table into ``out/<run_id>/`` in this process; returns the writer's summary."""
    run_id = resolve_run_dir(run_dir).name
    user_ids = read_user_ids(users_path, run_dir) if users_path is not None else None
    stats = recommend.write_recommendations(
        run_dir,
        Path(out) / run_id,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        progress=False,
        overwrite=True,
    )
    _log_table(stats)
    return stats


@task(cache_policy=NO_CACHE, persist_result=False)
def scheduler_threads(address: str) -> int:
    """Worker threads of the Dask cluster at ``address`` (waits :data:`SCHEDULER_TIMEOUT_S` for
    the scheduler to answer and for at least one worker).

    Raises:
        ConnectionError: no scheduler answers at ``address``, or it has no worker.
    """
    import distributed

    try:
        client = distributed.Client(address, timeout=SCHEDULER_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ConnectionError(
            f"no Dask scheduler answered at {address} within {SCHEDULER_TIMEOUT_S:.0f} s ({err}); "
            "start one (`dask scheduler`, then `dask worker <address>` on each machine) or leave "
            "dask_address unset to run in this process"
        ) from None
    with client:
        try:
            client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT_S)
        except TimeoutError:
            raise ConnectionError(
                f"the Dask scheduler at {address} has no worker after {SCHEDULER_TIMEOUT_S:.0f} s; "
                f"start workers with `dask worker {address}`"
            ) from None
        threads = client.nthreads()
    get_run_logger().info(
        "Dask scheduler %s: %d workers, %d threads", address, len(threads), sum(threads.values())
    )
    return sum(threads.values())


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=_retry_if_unreachable)
def load_table(
    table_dir: str,
    to: str,
    table: str,
    password_env: str,
    password_secret: str | None,
    unlogged: bool = False,
) -> dict[str, Any]:
    """Bulk-load the written Parquet table into PostgreSQL and swap it in (:mod:`recsys_metric.db.sink`)."""
    loaded = sink.load_parquet_table(
        table_dir, to, table, password_env=password_env, password_secret=password_secret, unlogged=unlogged
    )
    get_run_logger().info(
        "loaded %d rows into %s at %s in %.1f s (previous table: %s)",
        loaded["n_rows"],
        loaded["table"],
        loaded["to"],
        loaded["seconds"],
        loaded["previous_table"],
    )
    return loaded


@task(cache_policy=NO_CACHE)
def plan_table(
    run_dir: str,
    out: str,
    k: int,
    users_path: str | None,
    index: str,
    batch_users: int | None,
    partitions: int,
) -> recommend.TablePlan:
    """Cut the users into partitions and create the table's temporary directory beside ``out/<run_id>/``."""
    run_id = resolve_run_dir(run_dir).name
    user_ids = read_user_ids(users_path, run_dir) if users_path is not None else None
    plan = recommend.plan_recommendations(
        run_dir,
        Path(out) / run_id,
        k=k,
        user_ids=user_ids,
        index=index,
        batch_users=batch_users,
        overwrite=True,
        partitions=partitions,
    )
    get_run_logger().info(
        "%d users in %d partitions of blocks of %d users",
        plan.n_users,
        len(plan.partitions),
        plan.block_users,
    )
    return plan


@task(cache_policy=NO_CACHE, persist_result=False)
def write_partition(plan: recommend.TablePlan, number: int) -> dict[str, Any]:
    """Write one partition of the table (in whichever process the task runner puts it)."""
    result = recommend.write_partition(plan, number)
    get_run_logger().info(
        "partition %d: %d users, files %s", number, result["n_users"], ", ".join(result["files"])
    )
    return result


@flow(name="batch-recommendations-partitions", validate_parameters=False, persist_result=False)
def write_partitions(plan: recommend.TablePlan) -> list[dict[str, Any]]:
    """Every partition of ``plan``, one task each, on this flow's task runner (set by the caller)."""
    futures = write_partition.map(unmapped(plan), range(len(plan.partitions)))
    return [future.result() for future in futures]


@task(cache_policy=NO_CACHE, persist_result=False)
def finish_table(plan: recommend.TablePlan, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the manifest and move the table into place; returns the writer's summary."""
    stats = recommend.finish_recommendations(plan, results)
    _log_table(stats)
    return stats


def dask_task_runner(workers: int, dask_address: str | None) -> DaskTaskRunner:
    """The Dask task runner: the cluster at ``dask_address``, or a temporary ``LocalCluster`` of
    ``workers`` processes with one thread each (torch, numpy and Arrow in each worker then use one
    core: the nanny sets ``OMP_NUM_THREADS=1``).

    Raises:
        ConfigError: prefect-dask is not installed.
    """
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(
            "workers > 1 and dask_address need prefect-dask: pip install 'recsys-metric[scale]'"
        ) from None
    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": ":0",
        },
    )


@contextlib.contextmanager
def _api_for_workers() -> Iterator[None]:
    """Hand the API this flow reports to over to the task runner's workers.

    Workers take the flow's settings, not its temporary API server: without ``PREFECT_API_URL``
    each worker process would start a server of its own (about 20 s each here) on the same
    database. The flow's server is named explicitly instead; it listens on 127.0.0.1, so workers
    on other machines need a real server (``prefect server start`` and ``PREFECT_API_URL``).
    """
    if PREFECT_API_URL.value():
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


@contextlib.contextmanager
def _local_cluster_environment() -> Iterator[None]:
    """Start the temporary LocalCluster's workers without Dask's ``MALLOC_TRIM_THRESHOLD_``, and
    leave this process's environment as it was.

    Nannies write ``distributed.nanny.pre-spawn-environ`` into the environment of the process that
    starts them (``OMP_NUM_THREADS=1``, ``MALLOC_TRIM_THRESHOLD_=65536``, ...) and leave it there:
    later subprocesses of this process would start single-threaded. The fixed trim threshold makes
    glibc return every large numpy temporary to the system; a partition of 100k users then took
    20% more CPU here (13.1 -> 15.9 CPU s). Memory per worker stays bounded by the table's blocks.
    """
    import dask

    keys = set(dask.config.get("distributed.nanny.pre-spawn-environ")) | {"PYTHONHASHSEED"}
    saved = {key: os.environ.get(key) for key in keys}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@flow(name="batch-recommendations", persist_result=False)
def batch_recommendations(
    artifacts: str = "artifacts",
    out: str = "artifacts/recommendations",
    k: int = 100,
    users_path: str | None = None,
    index: Literal["exact", "annoy"] = "exact",
    batch_users: int | None = None,
    workers: int = 1,
    dask_address: str | None = None,
    partitions: int | None = None,
    to: str | None = None,
    table: str = "recommendations",
    password_env: str = "PGPASSWORD",
    password_secret: str | None = None,
    unlogged: bool = False,
) -> dict[str, Any]:
    """Top-``k`` recommendations of the published run for every user (or those in ``users_path``).

    Args:
        artifacts: the artifact store root (its ``current`` run is used).
        out: parent directory of the tables; this run's goes to ``out/<run_id>/``.
        k: items per user.
        users_path: text file with one user id per line; None: every user of the run.
        index: ``exact`` (blocked exact scoring) or ``annoy`` (the run's Annoy index).
        batch_users: users per block (and per file); None sizes blocks by the number of items.
        workers: 1 writes the table in this process; more start a temporary Dask ``LocalCluster``
            of that many single-threaded worker processes.
        dask_address: a running Dask scheduler (``tcp://host:8786``) to write the partitions on
            instead; ``workers`` must then stay 1.
        partitions: user partitions (one task each) on Dask; None: one per worker thread. At most
            one per block of users.
        to: also load the table into this PostgreSQL database (``postgresql://user@host/db``, no
            password), swapped in atomically for ``table`` (docs/databases.md).
        table: the PostgreSQL table (``table`` or ``schema.table``); the one it replaces is kept
            as ``<table>_previous``.
        password_env: environment variable holding the database password.
        password_secret: Prefect Secret block holding the database password (wins over
            ``password_env``).
        unlogged: load an ``UNLOGGED`` table: faster (no WAL) but emptied by a server crash and
            not readable on replicas (docs/databases.md, "Logged (default) or unlogged").

    Returns:
        The writer's summary (``run_id``, ``out_dir``, ``n_users``, ``n_rows``, ``n_files``...),
        the same with or without Dask (but for the timings). The same figures and the time go
        to a markdown artifact ``batch-recommendations-report-<store>`` (its key names the store
        and, for a scheduled run, the deployment);
        with ``to``, also ``postgres``: the load's summary (``table``, ``previous_table``, ``n_rows``,
        ``seconds``...).

    Raises:
        ConfigError: ``workers``/``partitions`` are not positive, ``partitions`` without Dask,
            ``workers`` with ``dask_address``, or prefect-dask missing.
        ConnectionError: no Dask scheduler (or no worker) at ``dask_address``.

        The flow run ends ``Failed`` without writing the exception to Prefect's result storage
        (:func:`flows.run_states.failed_state`).
    """
    try:
        return _batch_recommendations(
            artifacts,
            out,
            k,
            users_path,
            index,
            batch_users,
            workers,
            dask_address,
            partitions,
            to,
            table,
            password_env,
            password_secret,
            unlogged=unlogged,
        )
    except Exception as exc:  # noqa: BLE001 - returned as the run's Failed state, raised to the caller
        return failed_state(exc)  # type: ignore[return-value]


def _batch_recommendations(
    artifacts: str,
    out: str,
    k: int,
    users_path: str | None,
    index: Literal["exact", "annoy"],
    batch_users: int | None,
    workers: int,
    dask_address: str | None,
    partitions: int | None,
    to: str | None,
    table: str,
    password_env: str,
    password_secret: str | None,
    unlogged: bool = False,
) -> dict[str, Any]:
    if workers < 1 or (partitions is not None and partitions < 1):
        raise ConfigError(f"workers and partitions must be positive, got {workers} and {partitions}")
    if dask_address is not None and workers != 1:
        raise ConfigError(
            f"workers={workers} sizes a local cluster; with dask_address={dask_address!r} the "
            "cluster's own workers are used: leave workers at 1"
        )
    if to is not None:  # a wrong URI, table name or login fails the flow before the scoring
        sink.check_postgres(to, table, password_env=password_env, password_secret=password_secret)
    if dask_address is None and workers == 1:
        if partitions is not None:
            raise ConfigError(f"partitions={partitions} needs Dask: set workers > 1 or dask_address")
        run_dir = resolve_current(artifacts)
        stats = write_table(run_dir, out, k, users_path, index, batch_users)
        return _report(artifacts, _to_postgres(stats, to, table, password_env, password_secret, unlogged))

    runner = dask_task_runner(workers, dask_address)
    threads = scheduler_threads(dask_address) if dask_address is not None else workers
    run_dir = resolve_current(artifacts)
    plan = plan_table(run_dir, out, k, users_path, index, batch_users, partitions or threads)
    try:
        with (
            _api_for_workers(),
            _local_cluster_environment() if dask_address is None else contextlib.nullcontext(),
        ):
            results = write_partitions.with_options(task_runner=runner)(plan)
    except BaseException:
        recommend.discard_recommendations(plan)
        raise
    stats = _to_postgres(finish_table(plan, results), to, table, password_env, password_secret, unlogged)
    return _report(artifacts, stats)


def _to_postgres(
    stats: dict[str, Any],
    to: str | None,
    table: str,
    password_env: str,
    password_secret: str | None,
    unlogged: bool = False,
) -> dict[str, Any]:
    if to is None:
        return stats
    loaded = load_table(stats["out_dir"], to, table, password_env, password_secret, unlogged)
    return {**stats, "postgres": loaded}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.batch_recommendations")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--out", default="artifacts/recommendations")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--users", dest="users_path")
    parser.add_argument("--index", choices=["exact", "annoy"], default="exact")
    parser.add_argument("--batch-users", type=int)
    parser.add_argument("--workers", type=int, default=1, help="Dask LocalCluster worker processes")
    parser.add_argument("--dask-address", help="a running Dask scheduler, e.g. tcp://host:8786")
    parser.add_argument("--partitions", type=int, help="user partitions on Dask (default: one per thread)")
    parser.add_argument(
        "--to", help="also load into PostgreSQL: postgresql://user@host:port/db (no password)"
    )
    parser.add_argument(
        "--table", default="recommendations", help="PostgreSQL table (default: recommendations)"
    )
    parser.add_argument("--password-env", default="PGPASSWORD", help="variable with the database password")
    parser.add_argument("--password-secret", help="Prefect Secret block with the database password")
    parser.add_argument(
        "--unlogged",
        action="store_true",
        help="load an UNLOGGED table: faster, emptied by a crash (see docs)",
    )
    args = parser.parse_args(argv)

    def run(_: argparse.Namespace) -> int:
        stats = batch_recommendations(**vars(args))
        print(f"wrote {stats['n_rows']:,} rows for run {stats['run_id']} to {stats['out_dir']}")
        if "postgres" in stats:
            print(f"loaded them into {stats['postgres']['table']} at {stats['postgres']['to']}")
        return 0

    # A missing store or a bad option is one line and exit 2, as with recsys-metric batch.
    return run_command(argparse.Namespace(func=run, prog=parser.prog, verbose=False))


if __name__ == "__main__":
    sys.exit(main())
