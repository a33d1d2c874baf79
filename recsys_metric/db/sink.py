"""Recommendation tables bulk-loaded into PostgreSQL and swapped in atomically.

:func:`write_postgres_table` does, in ONE transaction:

1. ``pg_advisory_xact_lock`` on the table name (two writers of one table take turns);
2. a bulk load of the Arrow batches into ``<table>_staging`` (ADBC ingest: PostgreSQL's binary
   ``COPY``, not row inserts), which the table's readers never see;
3. the ``(user_id, rank)`` index on it, and ``ANALYZE``;
4. ``DROP TABLE <table>_previous``; ``<table>`` renamed to ``<table>_previous`` (its index to
   ``<table>_previous_user_rank``); ``<table>_staging`` renamed to ``<table>`` (index
   ``<table>_user_rank``); a ``COMMENT`` with the run id and counts;
5. ``COMMIT``.

A reader's ``SELECT`` sees the whole old table or the whole new one: the renames take an ACCESS
EXCLUSIVE lock only at the end, a ``SELECT`` that arrives meanwhile waits for the commit (a few
milliseconds) and then reads the new table, and one already running finishes on the old table
before the renames proceed. Any failure before the commit (a broken batch, a full disk, a lost
connection) rolls everything back: the old table keeps serving, unchanged, and no staging table
is left behind. A reader holding a transaction open on the table delays the swap until it ends:
readers should run in autocommit mode or keep transactions short.

``unlogged=True`` creates the staging table ``UNLOGGED``: its rows skip PostgreSQL's write-ahead
log, which makes the load faster (1.1-1.6x measured, BENCHMARKS.md) and it stays unlogged after
the swap (``ALTER TABLE ... SET LOGGED`` would write the whole table to the WAL afterwards, slower
than a logged load). The swap stays atomic, but the table is not crash-safe: after a server
crash (not a clean shutdown) PostgreSQL empties every unlogged table, so the served table reads
as 0 rows until the next load; it is not copied to streaming replicas (a standby cannot read it)
nor kept by ``pg_basebackup``. Hence the default is a logged table; choose unlogged for a table
that the nightly run rewrites anyway and that is read on the primary only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_metric.db.connection import DatabaseError, postgres_connection, postgres_error
from recsys_metric.db.source import quote_identifier
from recsys_metric.db.uri import DEFAULT_PASSWORD_ENV, DatabaseURI, resolve_password

PREVIOUS_SUFFIX = "_previous"
STAGING_SUFFIX = "_staging"
INDEX_SUFFIX = "_user_rank"
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1: longer names are cut silently by the server
PARQUET_BATCH_ROWS = 1 << 20


def _names(table: str) -> tuple[str | None, str]:
    quote_identifier(table, "--table")
    schema, _, name = table.rpartition(".")
    longest = name + PREVIOUS_SUFFIX + INDEX_SUFFIX
    if len(longest) > _MAX_IDENTIFIER:
        raise DatabaseError(
            f"--table {table!r}: the name is too long; {longest!r} (its previous table's index) would pass "
            f"PostgreSQL's {_MAX_IDENTIFIER}-character limit: use at most "
            f"{_MAX_IDENTIFIER - len(PREVIOUS_SUFFIX + INDEX_SUFFIX)} characters"
        )
    return schema or None, name


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _plain_types(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Batches with view or large string types cast to ``string`` (what the driver's COPY writes as text)."""
    if not any(pa.types.is_string_view(f.type) or pa.types.is_large_string(f.type) for f in batch.schema):
        return batch
    columns = [
        c.cast(pa.string()) if pa.types.is_string_view(c.type) or pa.types.is_large_string(c.type) else c
        for c in batch.columns
    ]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema(
        [
            f.with_type(pa.string())
            if pa.types.is_string_view(f.type) or pa.types.is_large_string(f.type)
            else f
            for f in schema
        ]
    )


def check_postgres(
    to: str, table: str, *, password_env: str = DEFAULT_PASSWORD_ENV, password_secret: str | None = None
) -> None:
    """Fail early, before any scoring: ``to`` must be a PostgreSQL URI without password, ``table`` a
    valid name, and the server must accept the login (one ``SELECT 1``).

    Raises:
        DatabaseUnreachable, DatabaseError, ConfigError: as :func:`write_postgres_table` would.
    """
    from adbc_driver_manager import Error as AdbcError

    uri = DatabaseURI.parse(to)
    if uri.kind != "postgresql":
        raise DatabaseError(f"{uri}: recommendation tables are written to PostgreSQL only (postgresql://...)")
    schema_name, _ = _names(table)
    password = resolve_password(password_env, password_secret)
    with postgres_connection(uri, password, "connecting") as conn:
        cursor = conn.cursor()
        try:
            _check_schema(cursor, uri, schema_name)
        except AdbcError as err:
            raise postgres_error(uri, err, "checking the connection", password) from None
        finally:
            cursor.close()
            conn.rollback()


def write_postgres_table(
    to: str,
    table: str,
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    *,
    index_columns: tuple[str, ...] = ("user_id", "rank"),
    comment: dict[str, Any] | None = None,
    expected_rows: int | None = None,
    password_env: str = DEFAULT_PASSWORD_ENV,
    password_secret: str | None = None,
    maintenance_work_mem: str | None = "512MB",
    unlogged: bool = False,
) -> dict[str, Any]:
    """Bulk-load ``batches`` into a staging table and swap it in for ``table`` (module docstring).

    Args:
        to: ``postgresql://user@host:port/dbname`` (no password in it).
        table: ``table`` or ``schema.table`` (the schema must exist); at most 44 characters so
            that ``<table>_previous_user_rank`` fits PostgreSQL's identifier limit.
        batches: the rows, as Arrow record batches of ``schema``; consumed once, streamed to the
            server (memory stays at one batch).
        schema: their Arrow schema; column types follow it (int64 -> bigint, int32 -> integer,
            float32 -> real, string -> text).
        index_columns: the columns of the index built before the swap.
        comment: JSON-serialisable facts stored as the table's ``COMMENT`` (run id, k...).
        expected_rows: when given, a load that stored another number of rows is rolled back.
        password_env, password_secret: where the password comes from (:func:`resolve_password`).
        maintenance_work_mem: memory for this transaction's index build (``SET LOCAL``): with
            PostgreSQL's default 64MB, indexing 100M rows spills its sort to disk. None keeps
            the server's setting.
        unlogged: load into an ``UNLOGGED`` table, which stays unlogged after the swap: faster,
            but emptied by a server crash and invisible on replicas (module docstring).

    Returns:
        ``to``, ``table``, ``previous_table`` (None when there was no table before),
        ``n_rows``, ``unlogged``, ``seconds`` (the whole transaction), ``load_seconds`` (the
        COPY alone), ``rows_per_second`` (n_rows / seconds).

    Raises:
        DatabaseUnreachable: no server at ``to``.
        DatabaseError: wrong credentials, a missing schema, no permission, a bad table name, a
            failed load or a row count other than ``expected_rows``; the old table is unchanged.
    """
    from adbc_driver_manager import Error as AdbcError

    uri = DatabaseURI.parse(to)
    if uri.kind != "postgresql":
        raise DatabaseError(f"{uri}: recommendation tables are written to PostgreSQL only (postgresql://...)")
    schema_name, name = _names(table)
    n_rows, load_seconds, had_table = 0, 0.0, False
    prefix = f"{_q(schema_name)}." if schema_name else ""
    staging, previous = name + STAGING_SUFFIX, name + PREVIOUS_SUFFIX
    plain = _plain_schema(schema)
    password = resolve_password(password_env, password_secret)
    started = time.perf_counter()
    with postgres_connection(uri, password, "connecting") as conn:
        cursor = conn.cursor()
        doing = "taking the table's writer lock"
        try:
            cursor.execute(f"SELECT pg_advisory_xact_lock(hashtext({_literal('recsys_metric:' + table)}))")
            cursor.fetchall()
            _check_schema(cursor, uri, schema_name)
            if maintenance_work_mem is not None:
                cursor.execute(f"SET LOCAL maintenance_work_mem = {_literal(maintenance_work_mem)}")
            doing = f"dropping a leftover {staging}"
            cursor.execute(f"DROP TABLE IF EXISTS {prefix}{_q(staging)}")
            doing = f"bulk-loading {staging}"
            t = time.perf_counter()
            mode = "create"
            if unlogged:
                # The driver creates the table from the Arrow schema (its type mapping, no copy of
                # it here); made UNLOGGED while empty, which rewrites nothing.
                empty = pa.RecordBatchReader.from_batches(plain, iter(()))
                cursor.adbc_ingest(staging, empty, mode="create", db_schema_name=schema_name)
                cursor.execute(f"ALTER TABLE {prefix}{_q(staging)} SET UNLOGGED")
                mode = "append"
            reader = pa.RecordBatchReader.from_batches(plain, (_plain_types(b) for b in batches))
            n_rows = cursor.adbc_ingest(staging, reader, mode=mode, db_schema_name=schema_name)
            load_seconds = time.perf_counter() - t
            if expected_rows is not None and n_rows not in (-1, expected_rows):
                raise DatabaseError(
                    f"{uri}: loading {table} stored {n_rows} rows, expected {expected_rows}; rolled back, the "
                    "old table keeps serving"
                )
            doing = f"indexing {staging}"
            cols = ", ".join(_q(c) for c in index_columns)
            cursor.execute(f"CREATE INDEX {_q(staging + INDEX_SUFFIX)} ON {prefix}{_q(staging)} ({cols})")
            cursor.execute(f"ANALYZE {prefix}{_q(staging)}")
            doing = f"swapping {staging} in for {table}"
            cursor.execute(f"SELECT to_regclass({_literal(prefix + _q(name))}) IS NOT NULL")
            had_table = bool(cursor.fetchall()[0][0])
            cursor.execute(f"DROP TABLE IF EXISTS {prefix}{_q(previous)}")
            cursor.execute(f"ALTER TABLE IF EXISTS {prefix}{_q(name)} RENAME TO {_q(previous)}")
            cursor.execute(
                f"ALTER INDEX IF EXISTS {prefix}{_q(name + INDEX_SUFFIX)} RENAME TO {_q(previous + INDEX_SUFFIX)}"
            )
            cursor.execute(f"ALTER TABLE {prefix}{_q(staging)} RENAME TO {_q(name)}")
            cursor.execute(
                f"ALTER INDEX {prefix}{_q(staging + INDEX_SUFFIX)} RENAME TO {_q(name + INDEX_SUFFIX)}"
            )
            if comment is not None:
                text = json.dumps(comment, sort_keys=True, default=str)
                cursor.execute(f"COMMENT ON TABLE {prefix}{_q(name)} IS {_literal(text)}")
            doing = "committing the swap"
            conn.commit()
        except AdbcError as err:
            conn.rollback()
            raise postgres_error(uri, err, doing, password, "rolled back: nothing changed") from None
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()
    seconds = time.perf_counter() - started
    if n_rows == -1 and expected_rows is not None:
        n_rows = expected_rows
    return {
        "to": uri.uri,
        "table": table,
        "previous_table": f"{schema_name + '.' if schema_name else ''}{previous}" if had_table else None,
        "n_rows": n_rows,
        "unlogged": unlogged,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "rows_per_second": n_rows / seconds if seconds > 0 else float("inf"),
    }


def _check_schema(cursor: Any, uri: DatabaseURI, schema_name: str | None) -> None:
    """DatabaseError unless ``schema_name`` (None: the search path's first schema) exists."""
    if schema_name is None:
        cursor.execute("SELECT current_schema() IS NOT NULL")
    else:
        cursor.execute(f"SELECT to_regnamespace({_literal(_q(schema_name))}) IS NOT NULL")
    if not cursor.fetchall()[0][0]:
        where = f"the schema {schema_name}" if schema_name else "no schema on the search_path"
        raise DatabaseError(
            f"{uri}: {where} does not exist; create it (CREATE SCHEMA ...) or name another one in --table"
        )


def _literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings is on in every supported PostgreSQL)."""
    return "'" + text.replace("'", "''") + "'"


def _parquet_files(table_dir: Path) -> list[Path]:
    files = sorted(p for p in table_dir.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not files:
        raise DatabaseError(f"{table_dir}: no *.parquet files to load; write the table first")
    return files


def _parquet_batches(files: list[Path]) -> Iterator[pa.RecordBatch]:
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS)


def load_parquet_table(
    table_dir: str | Path,
    to: str,
    table: str,
    *,
    password_env: str = DEFAULT_PASSWORD_ENV,
    password_secret: str | None = None,
    unlogged: bool = False,
) -> dict[str, Any]:
    """Load a partitioned Parquet recommendation table (``part-*.parquet``, as
    :func:`recsys_metric.recommend.write_recommendations` writes it) into PostgreSQL with
    :func:`write_postgres_table`, streaming one row group batch at a time.

    The table's ``_manifest.json`` (run id, k, counts), when present, becomes the table comment;
    the row count in the Parquet footers must match what the server stored. ``unlogged``: as
    :func:`write_postgres_table`.

    Returns:
        :func:`write_postgres_table`'s summary.
    """
    table_dir = Path(table_dir)
    files = _parquet_files(table_dir)
    schema = pq.read_schema(files[0])
    expected = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    manifest_path = table_dir / "_manifest.json"
    comment: dict[str, Any] = {"n_rows": expected}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        comment |= {k: manifest[k] for k in ("run_id", "k", "n_users", "index") if k in manifest}
    schema = schema.remove_metadata()
    return write_postgres_table(
        to,
        table,
        _parquet_batches(files),
        schema,
        comment=comment,
        expected_rows=expected,
        password_env=password_env,
        password_secret=password_secret,
        unlogged=unlogged,
    )
