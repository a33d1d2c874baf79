"""Database I/O benchmark: the interaction log read from PostgreSQL against Parquet, and the
recommendation table written into PostgreSQL against Parquet.

Goals (issue 20): reading from PostgreSQL at least 1M rows/s end to end into validation
(``read_interactions``: ADBC binary COPY -> Arrow batches -> fingerprint -> validation and
quarantine); writing at least 500k rows/s (``write_postgres_table``: binary COPY into a staging
table, the ``(user_id, rank)`` index, ANALYZE and the rename swap, all in one transaction), as a
logged table (the default) and as an UNLOGGED one (``--unlogged``: no WAL, not crash-safe).

Setup (not timed): the generated log (``recsys_metric.data.synthetic``, as ``bench.ingest``) is
written into ``bench/out/`` once; a PostgreSQL 16 server (pgserver, default settings) starts in a
temporary directory and the log is bulk-loaded into it. Each measurement runs in a fresh process
so that its peak RSS is its own; the server's own memory is not counted in anyone's RSS.

    python -m bench.db_io                                  # 20M-row log, 1M users x top-100 table
    python -m bench.db_io --rows 2000000 --table-users 100000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import peak_rss_gib, run_isolated, save_result
from bench.ingest import ensure_log

READ_GOAL = 1_000_000
WRITE_GOAL = 500_000
BATCH_USERS = 10_000


def _cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load_log(uri: str, log_dir: Path) -> float:
    """Bulk-load the log's Parquet parts into table ``interactions`` (setup); returns seconds."""
    import adbc_driver_postgresql.dbapi as pgdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(log_dir.glob("*.parquet"))
    schema = pq.read_schema(files[0]).remove_metadata()

    def batches():
        for f in files:
            for b in pq.ParquetFile(f).iter_batches(batch_size=1 << 20):
                yield b.cast(schema) if b.schema != schema else b

    t = time.perf_counter()
    with pgdb.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS interactions")
        cur.adbc_ingest("interactions", pa.RecordBatchReader.from_batches(schema, batches()), mode="create")
        conn.commit()
    with pgdb.connect(uri, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "VACUUM ANALYZE interactions"
        )  # hint bits set once, as on a table that has been read before
    return time.perf_counter() - t


def child_read(source: str, work: str) -> None:
    from recsys_metric.config import DataConfig
    from recsys_metric.data.validate import read_interactions

    config = DataConfig(table="interactions") if "://" in source else DataConfig()
    if "://" in source:
        import adbc_driver_postgresql.dbapi  # noqa: F401 - imported before the clock starts, as Parquet's reader is
    cpu0, t = _cpu(), time.perf_counter()
    frame, report = read_interactions(source, config, rejects_path=Path(work) / "rejects.parquet")
    seconds = time.perf_counter() - t
    extra: dict = {}
    if "://" in source:
        from recsys_metric.db.source import database_fingerprint

        # the fetch alone (ADBC COPY -> Arrow batches -> fingerprint); the rest is validation
        extra["fetch_seconds"] = database_fingerprint(source)["read_seconds"]
    print(
        json.dumps(
            {
                "rows": report.n_input_rows,
                "valid": frame.height,
                "seconds": round(seconds, 2),
                "rows_per_second": round(report.n_input_rows / seconds),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "cpu_seconds": round(_cpu() - cpu0, 2),
                **extra,
            }
        )
    )


def _table_batches(n_users: int, k: int):
    """The table as 1M-row batches (BATCH_USERS users x k): user_id int64, rank int32, item_id int64,
    score float32, run_id string; built from one template batch so that generating costs nothing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(BATCH_USERS, dtype=np.int64), k)
    template = {
        "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), BATCH_USERS)),
        "item_id": pa.array(rng.integers(0, 100_000, size=users.size, dtype=np.int64)),
        "score": pa.array(-np.sort(rng.random((BATCH_USERS, k), dtype=np.float32), axis=1).ravel()),
        "run_id": pa.array(["20261204T120000Z-bench"] * users.size, pa.string()),
    }
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("rank", pa.int32()),
            ("item_id", pa.int64()),
            ("score", pa.float32()),
            ("run_id", pa.string()),
        ]
    )
    base = pa.array(users)

    def gen():
        for start in range(0, n_users, BATCH_USERS):
            n = min(BATCH_USERS, n_users - start) * k
            cols = [pc.add(base, start).slice(0, n)] + [
                template[c].slice(0, n) for c in ("rank", "item_id", "score", "run_id")
            ]
            yield pa.RecordBatch.from_arrays(cols, schema=schema)

    return schema, gen()


def child_write(target: str, n_users: int, k: int, mode: str) -> None:
    import adbc_driver_postgresql.dbapi  # noqa: F401 - imported before the clock starts
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_metric.db.sink import write_postgres_table

    schema, batches = _table_batches(n_users, k)
    cpu0, t = _cpu(), time.perf_counter()
    extra: dict = {}
    if target.startswith("postgresql://"):
        unlogged = mode == "unlogged"
        name = "recommendations_unlogged" if unlogged else "recommendations"
        out = write_postgres_table(target, name, batches, schema, comment={"bench": True}, unlogged=unlogged)
        rows = out["n_rows"]
        extra = {
            "load_seconds": round(out["load_seconds"], 2),
            "load_rows_per_second": round(rows / out["load_seconds"]),
        }
    else:
        # As write_recommendations writes it: one file per block of users, zstd (pyarrow's default is snappy).
        os.makedirs(target, exist_ok=True)
        rows = 0
        for i, batch in enumerate(batches):
            pq.write_table(
                pa.Table.from_batches([batch]), Path(target) / f"part-{i:05d}.parquet", compression="zstd"
            )
            rows += batch.num_rows
    seconds = time.perf_counter() - t
    print(
        json.dumps(
            {
                "rows": rows,
                "seconds": round(seconds, 2),
                "rows_per_second": round(rows / seconds),
                "peak_rss_gib": round(peak_rss_gib(), 2),
                "cpu_seconds": round(_cpu() - cpu0, 2),
                **extra,
            }
        )
    )


def _pg_sizes(uri: str) -> dict:
    import adbc_driver_postgresql.dbapi as pgdb

    with pgdb.connect(uri, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pg_total_relation_size('interactions'), pg_total_relation_size('recommendations'), "
            "current_setting('shared_buffers'), current_setting('wal_level'), version(), "
            "current_setting('max_wal_size')"
        )
        log_bytes, table_bytes, shared_buffers, wal_level, version, max_wal = cur.fetchall()[0]
    return {
        "pg_log_gib": round(log_bytes / 2**30, 2),
        "pg_table_gib": round(table_bytes / 2**30, 2),
        "shared_buffers": shared_buffers,
        "wal_level": wal_level,
        "max_wal_size": max_wal,
        "version": version.split(" on ")[0],
    }


def _server_cpu(postmaster_pid: int) -> float:
    """CPU seconds used by the server so far: live postgres processes plus the exited backends
    the postmaster has reaped (its children's times)."""
    import psutil

    post = psutil.Process(postmaster_pid)
    total = sum(post.cpu_times()[:4])  # user, system, children_user, children_system
    for proc in post.children():
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _measured(postmaster_pid: int, *args: str) -> dict:
    """One child run, with the server's CPU seconds during it."""
    before = _server_cpu(postmaster_pid)
    result = run_isolated("bench.db_io", *args)
    result["server_cpu_seconds"] = round(_server_cpu(postmaster_pid) - before, 2)
    return result


def _cpu_cell(m: dict) -> str:
    cpu = m["cpu_seconds"] + m["server_cpu_seconds"]
    rate = m["rows"] / cpu if cpu > 0 else float("nan")
    return f"{m['cpu_seconds']:.1f} + {m['server_cpu_seconds']:.1f} | {rate / 1e6:.2f} M"


def to_markdown(r: dict) -> str:
    def goal(v: float, g: float) -> str:
        return f"{'met' if v >= g else 'NOT met'}: goal {g / 1e6:g} M"

    rd, wr = r["read"], r["write"]
    lines = [
        f"Log: {r['rows']:,} interactions ({r['users']:,} users x {r['items']:,} items, generated, seed 0). "
        "Read = `read_interactions` end to end into validation and quarantine (PostgreSQL: ADBC binary COPY in "
        "16 MiB Arrow batches + content fingerprint; Parquet: the lazy scan), each in a fresh process.",
        "",
        "| read the log | rows | wall | rows/s | peak RSS | CPU s: reader + server | rows per CPU s |",
        "|---|---|---|---|---|---|---|",
        f"| PostgreSQL (`postgresql://.../postgres`, table interactions; fetch alone "
        f"{rd['postgres']['fetch_seconds']:.1f} s) | {rd['postgres']['rows']:,} | "
        f"{rd['postgres']['seconds']:.1f} s | {rd['postgres']['rows_per_second'] / 1e6:.2f} M "
        f"({goal(rd['postgres']['rows_per_second'], READ_GOAL)}) | {rd['postgres']['peak_rss_gib']:.2f} GiB | {_cpu_cell(rd['postgres'])} |",
        f"| Parquet (`bench/out/.../interactions/`) | {rd['parquet']['rows']:,} | {rd['parquet']['seconds']:.1f} s | "
        f"{rd['parquet']['rows_per_second'] / 1e6:.2f} M | {rd['parquet']['peak_rss_gib']:.2f} GiB | {_cpu_cell(rd['parquet'])} |",
        "",
        f"Table: {r['table_users']:,} users x top-{r['k']} = {wr['postgres']['rows']:,} rows "
        "(user_id bigint, rank integer, item_id bigint, score real, run_id text), streamed in 1M-row Arrow batches.",
        "",
        "| write the table | wall | rows/s | of which bulk load (COPY) | peak RSS | CPU s: writer + server | rows per CPU s |",
        "|---|---|---|---|---|---|---|",
        f"| PostgreSQL: staging COPY + (user_id, rank) index + ANALYZE + swap, one transaction | "
        f"{wr['postgres']['seconds']:.1f} s | {wr['postgres']['rows_per_second'] / 1e3:,.0f} k "
        f"({goal(wr['postgres']['rows_per_second'], WRITE_GOAL)}) | {wr['postgres']['load_seconds']:.1f} s "
        f"({wr['postgres']['load_rows_per_second'] / 1e3:,.0f} k rows/s) | {wr['postgres']['peak_rss_gib']:.2f} GiB | {_cpu_cell(wr['postgres'])} |",
        f"| PostgreSQL, `--unlogged` (no WAL; emptied by a crash, not on replicas) | "
        f"{wr['unlogged']['seconds']:.1f} s | {wr['unlogged']['rows_per_second'] / 1e3:,.0f} k "
        f"({goal(wr['unlogged']['rows_per_second'], WRITE_GOAL)}) | {wr['unlogged']['load_seconds']:.1f} s "
        f"({wr['unlogged']['load_rows_per_second'] / 1e3:,.0f} k rows/s) | {wr['unlogged']['peak_rss_gib']:.2f} GiB | {_cpu_cell(wr['unlogged'])} |",
        f"| Parquet: one zstd file per 10,000 users | {wr['parquet']['seconds']:.1f} s | "
        f"{wr['parquet']['rows_per_second'] / 1e3:,.0f} k | - | {wr['parquet']['peak_rss_gib']:.2f} GiB | {_cpu_cell(wr['parquet'])} |",
        "",
        f"Server: {r['pg']['version']} from pgserver on the same machine, default settings (shared_buffers "
        f"{r['pg']['shared_buffers']}, wal_level {r['pg']['wal_level']}, max_wal_size {r['pg']['max_wal_size']}), Unix socket; log table "
        f"{r['pg']['pg_log_gib']} GiB, recommendation table with index {r['pg']['pg_table_gib']} GiB. Setup, not "
        f"timed: loading the log into PostgreSQL took {r['setup_load_seconds']:.0f} s. Load average before the "
        f"run: {r['load_before']}, after: {r['load_after']} (shared 2-core machine).",
        "",
        _bound_note(rd["postgres"], wr["postgres"], wr["unlogged"]),
    ]
    return "\n".join(lines)


def _bound_note(read: dict, write: dict, unlogged: dict) -> str:
    """What the CPU seconds say when the wall clock is dominated by other processes' load: client
    and server run in parallel, so with a core each the busier one bounds the rate. An estimate,
    labelled as such; the measured rates are the table's."""

    def bound(m: dict) -> float:
        return m["rows"] / max(m["cpu_seconds"], m["server_cpu_seconds"])

    return (
        "CPU against wall (on 2 shared cores the difference is mostly waiting for a core): the PostgreSQL read used "
        f"{read['cpu_seconds'] + read['server_cpu_seconds']:.0f} CPU s in {read['seconds']:.0f} s of wall time, the "
        f"write {write['cpu_seconds'] + write['server_cpu_seconds']:.0f} CPU s in {write['seconds']:.0f} s (the "
        "write also waits for the disk: table, index and WAL). Estimate, not measured: with a free core each for "
        "client and server, the busier of the two bounds the rate at "
        f"{bound(read) / 1e6:.1f} M rows/s for the read and {bound(write) / 1e3:,.0f} k rows/s for the write "
        f"({bound(unlogged) / 1e3:,.0f} k unlogged) "
        "(CPU-bound; the disk may bound the write lower)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--table-users", type=int, default=1_000_000)
    ap.add_argument("-k", type=int, default=100)
    ap.add_argument("--child-read", nargs=2, metavar=("SOURCE", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--child-write", nargs=4, metavar=("TARGET", "USERS", "K", "MODE"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.child_read:
        child_read(*args.child_read)
        return 0
    if args.child_write:
        target, users, k, mode = args.child_write
        child_write(target, int(users), int(k), mode)
        return 0

    import pgserver

    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    log = ensure_log(args.rows, args.users, args.items, 0)
    work = Path(tempfile.mkdtemp(prefix="recsys-dbio-"))
    pg_dir = Path(
        tempfile.mkdtemp(prefix="recsys-pg-")
    )  # outside 0700 dirs: pgserver runs postgres unprivileged as root
    server = pgserver.get_server(pg_dir, cleanup_mode="stop")
    try:
        uri = server.get_uri()
        setup = _load_log(uri, log / "interactions")
        pid = server.get_pid()
        read = {
            "postgres": _measured(pid, "--child-read", uri, str(work)),
            "parquet": _measured(pid, "--child-read", str(log / "interactions"), str(work)),
        }
        write = {
            "postgres": _measured(pid, "--child-write", uri, str(args.table_users), str(args.k), "logged"),
            "unlogged": _measured(pid, "--child-write", uri, str(args.table_users), str(args.k), "unlogged"),
            "parquet": _measured(
                pid, "--child-write", str(work / "table"), str(args.table_users), str(args.k), "parquet"
            ),
        }
        pg = _pg_sizes(uri)
    finally:
        server.cleanup()
        shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "rows": args.rows,
        "users": args.users,
        "items": args.items,
        "table_users": args.table_users,
        "k": args.k,
        "setup_load_seconds": round(setup, 1),
        "read": read,
        "write": write,
        "pg": pg,
        "load_before": load_before,
        "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    result["markdown"] = to_markdown(result)
    default = args.rows == 20_000_000 and args.table_users == 1_000_000 and args.k == 100
    cmd = "python -m bench.db_io" + (
        "" if default else f" --rows {args.rows} --table-users {args.table_users} -k {args.k}"
    )
    path = save_result("db_io", result, cmd)
    print(result["markdown"])
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
