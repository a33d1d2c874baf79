"""Interaction logs read from PostgreSQL (ADBC, the binary COPY protocol) or DuckDB (its own scanner).

:func:`read_database` runs ``data.query`` (or ``SELECT * FROM data.table``) wrapped so that only
the mapped columns travel, receives the result as Arrow record batches of bounded size, computes
the content fingerprint batch by batch, and returns a polars frame with canonical column names:
the same frame a file reader gives, handed to the same validation and quarantine
(:func:`recsys_metric.data.validate.read_interactions` dispatches here for a database URI).

The fingerprint (:func:`database_fingerprint`, recorded into ``manifest.json`` as ``input``) is
``n_rows``, ``max_timestamp`` and a checksum that does not depend on row order (a database may
return rows in any order without ``ORDER BY``): the sum modulo 2^64 of polars' ``hash_rows`` of
every row read. ``hash_rows`` is stable within one polars version, which the fingerprint names.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from recsys_metric.config import DataConfig
from recsys_metric.db.connection import (
    DatabaseError,
    duckdb_connection,
    duckdb_error,
    postgres_connection,
    postgres_error,
)
from recsys_metric.db.uri import DatabaseURI, resolve_password
from recsys_metric.errors import DataError

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_SUBQUERY = "recsys_source"
_DEFAULT_BATCH_BYTES = 16 << 20
_DUCKDB_BATCH_ROWS = 1 << 20
_FINGERPRINTS: dict[str, dict[str, Any]] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def quote_identifier(name: str, what: str = "data.table") -> str:
    """``schema.table`` or ``table`` as double-quoted SQL identifiers (case kept as written).

    Raises:
        DataError: a part is not a plain identifier (letters, digits, ``_``, ``$``; not starting
            with a digit); use ``data.query`` for anything else.
    """
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise DataError(
            f"{what} = {name!r} is not a table name (table or schema.table, letters, digits and _); "
            "for anything else write the SELECT in data.query"
        )
    return ".".join(f'"{p}"' for p in parts)


def source_sql(config: DataConfig) -> str:
    """The SQL whose rows are the log: ``data.query`` (trailing ``;`` removed) or ``SELECT * FROM data.table``.

    Raises:
        DataError: neither ``data.query`` nor ``data.table`` is set.
    """
    if config.query:
        return config.query.strip().rstrip(";").strip()
    if config.table:
        return f"SELECT * FROM {quote_identifier(config.table)}"
    raise DataError(
        "a database source needs data.table (a table or view holding the log) or data.query (a SELECT); "
        "set one in the config file"
    )


def describe_source(uri: str, config: DataConfig) -> str:
    """How messages and reports name the source: the URI and the table or (shortened) query."""
    if config.query:
        query = " ".join(config.query.split())
        return f"{uri} [query: {query if len(query) <= 160 else query[:157] + '...'}]"
    return f"{uri} [table {config.table}]"


def _batch_summary(frame: pl.DataFrame, timestamp: str | None) -> tuple[int, Any]:
    """(sum mod 2^64 of the batch's row hashes, its maximum timestamp or None)."""
    if frame.height == 0:
        return 0, None
    # unsigned sums wrap modulo 2^64: what an order-independent checksum needs
    total = int(frame.hash_rows(seed=0).to_numpy().sum(dtype=np.uint64))
    return total, frame[timestamp].max() if timestamp is not None else None


@dataclass
class _Checksum:
    """Row count, maximum timestamp and order-independent row-hash sum, updated batch by batch.

    The hashing (about a sixth of the reader's CPU time) runs on one worker thread while the
    driver fetches the next batch (polars and the driver release the GIL): 11-15% less wall time
    for a 4M-row fetch loop, measured side by side (BENCHMARKS.md, databases). :meth:`finish`
    folds the results in; :meth:`close` always ends the worker.
    """

    timestamp: str | None
    n_rows: int = 0
    total: np.uint64 = np.uint64(0)
    max_timestamp: Any = None
    n_bytes: int = 0
    _pending: list[Future] = field(default_factory=list)
    _worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="recsys-checksum")
    )

    def update(self, frame: pl.DataFrame, n_bytes: int) -> None:
        self.n_rows += frame.height
        self.n_bytes += n_bytes
        self._pending.append(self._worker.submit(_batch_summary, frame, self.timestamp))

    def finish(self) -> None:
        """Fold every submitted batch in (re-raises an exception from the hashing)."""
        for future in self._pending:
            total, batch_max = future.result()
            self.total = np.uint64((int(self.total) + total) & 0xFFFFFFFFFFFFFFFF)
            if batch_max is not None and (self.max_timestamp is None or batch_max > self.max_timestamp):
                self.max_timestamp = batch_max
        self._pending.clear()

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


def _to_polars(batch: pa.RecordBatch) -> pl.DataFrame:
    """A record batch as polars; extension columns (PostgreSQL ``numeric`` arrives as an opaque
    string extension) become their storage type, which validation parses like text."""
    if any(isinstance(f.type, pa.ExtensionType) for f in batch.schema):
        columns = [c.storage if isinstance(c.type, pa.ExtensionType) else c for c in batch.columns]
        batch = pa.RecordBatch.from_arrays(columns, names=batch.schema.names)
    return pl.from_arrow(batch)  # type: ignore[return-value]


def _column_names(cursor: Any) -> list[str]:
    return [d[0] for d in cursor.description or ()]


def _select(uri: DatabaseURI, base: str, names: list[str], config: DataConfig, source: str) -> dict[str, str]:
    """Canonical -> source column for the columns the result has; DataError for a missing required one."""
    mapping = config.columns.model_dump()
    for canonical in ("user_id", "item_id"):
        if mapping[canonical] not in names:
            raise DatabaseError(
                f"{source}: required column {canonical} (source column {mapping[canonical]!r}) is missing; "
                f"columns the query returns: {names}; set data.columns.{canonical} or select the column in "
                "data.query"
            )
    return {c: s for c, s in mapping.items() if s in names}


def _selection_sql(base: str, selected: dict[str, str]) -> str:
    cols = ", ".join('"' + s.replace('"', '""') + '"' for s in selected.values())
    return f"SELECT {cols} FROM ({base}) AS {_SUBQUERY}"


def _read_postgres(
    uri: DatabaseURI, base: str, config: DataConfig, source: str, checksum_of: Any
) -> tuple[list[pl.DataFrame], dict[str, str], str]:
    from adbc_driver_manager import Error as AdbcError

    password = resolve_password(config.password_env, config.password_secret)
    with postgres_connection(uri, password, "connecting") as conn:
        cursor = conn.cursor()
        try:
            cursor.adbc_statement.set_options(
                **{"adbc.postgresql.batch_size_hint_bytes": str(config.batch_bytes)}
            )
        except (AdbcError, AttributeError):  # an older driver without the option keeps its default
            pass
        try:
            cursor.execute("SET TRANSACTION READ ONLY")  # a query that writes fails instead of writing
            cursor.execute(f"SELECT * FROM ({base}) AS {_SUBQUERY} LIMIT 0")
            names = _column_names(cursor)
            cursor.fetchall()
        except AdbcError as err:
            raise postgres_error(uri, err, "running the query", password) from None
        selected = _select(uri, base, names, config, source)
        sql = _selection_sql(base, selected)
        checksum = checksum_of(selected)
        frames: list[pl.DataFrame] = []
        try:
            cursor.execute(sql)
            reader = cursor.fetch_record_batch()
            for batch in reader:
                frame = _to_polars(batch)
                checksum.update(frame, batch.nbytes)
                frames.append(frame)
        except (AdbcError, pa.ArrowException) as err:  # errors while streaming arrive as ArrowInvalid
            raise postgres_error(uri, err, "reading the rows", password) from None
        finally:
            cursor.close()
            conn.rollback()
    return frames, selected, sql


def _read_duckdb(
    uri: DatabaseURI, base: str, config: DataConfig, source: str, checksum_of: Any
) -> tuple[list[pl.DataFrame], dict[str, str], str]:
    import duckdb

    with duckdb_connection(uri, "opening") as conn:
        try:
            names = _column_names(conn.execute(f"SELECT * FROM ({base}) AS {_SUBQUERY} LIMIT 0"))
        except duckdb.Error as err:
            raise duckdb_error(uri, err, "running the query") from None
        selected = _select(uri, base, names, config, source)
        sql = _selection_sql(base, selected)
        checksum = checksum_of(selected)
        frames: list[pl.DataFrame] = []
        try:
            relation = conn.sql(sql)
            # duckdb 2 renamed the relation's fetch_arrow_reader to to_arrow_reader
            batches = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
            reader = batches(_DUCKDB_BATCH_ROWS)
            for batch in reader:
                frame = _to_polars(batch)
                checksum.update(frame, batch.nbytes)
                frames.append(frame)
        except duckdb.Error as err:
            raise duckdb_error(uri, err, "reading the rows") from None
    return frames, selected, sql


def read_database(source: str, config: DataConfig) -> pl.DataFrame:
    """Read an interaction log from a database URI into canonical columns, in bounded batches.

    Args:
        source: ``postgresql://...`` or ``duckdb://...`` (see :mod:`recsys_metric.db.uri`).
        config: ``data.query`` or ``data.table`` picks the rows, ``data.columns`` maps the source
            column names, ``data.password_env`` / ``data.password_secret`` give the password,
            ``data.batch_bytes`` bounds each batch the PostgreSQL driver hands over.

    Returns:
        ``user_id``, ``item_id`` and whichever of ``timestamp``, ``rating``, ``event``, ``weight``
        the result has, with the database's types (bigint -> Int64, text -> String, timestamptz ->
        Datetime(us, UTC), numeric -> String), in the order the server sent the rows. The frame
        is made of the batches as received (several chunks, not copied into one). The
        fingerprint is recorded for :func:`database_fingerprint`.

    Raises:
        DatabaseUnreachable: no server at the URI, or no DuckDB file.
        DatabaseError: wrong credentials, unknown table, column or database, invalid SQL, a
            required column missing from the result. Every message names the URI (which never
            holds a password) and what to do.
        ConfigError: the URI carries a password, or the Secret block cannot be loaded.
    """
    uri = DatabaseURI.parse(source)
    base = source_sql(config)
    described = describe_source(uri.uri, config)
    holder: dict[str, _Checksum] = {}

    def checksum_of(selected: dict[str, str]) -> _Checksum:
        holder["c"] = _Checksum(selected.get("timestamp"))  # the frames still have the source names
        return holder["c"]

    started = time.perf_counter()
    reader = _read_postgres if uri.kind == "postgresql" else _read_duckdb
    try:
        frames, selected, sql = reader(uri, base, config, described, checksum_of)
        holder["c"].finish()
    finally:
        if "c" in holder:
            holder["c"].close()
    if frames:
        frame = pl.concat(frames, how="vertical", rechunk=False)
    else:
        frame = pl.DataFrame(schema=dict.fromkeys(selected.values(), pl.String))
    frame = frame.rename({s: c for c, s in selected.items()})
    checksum = holder["c"]
    _record(uri, sql, checksum, time.perf_counter() - started)
    return frame


def _record(uri: DatabaseURI, sql: str, checksum: _Checksum, seconds: float) -> None:
    max_ts = checksum.max_timestamp
    fields = {
        "path": uri.uri,
        "method": "database-rows",
        "kind": uri.kind,
        "query": sql,
        "n_rows": checksum.n_rows,
        "max_timestamp": None
        if max_ts is None
        else (max_ts.isoformat() if hasattr(max_ts, "isoformat") else max_ts),
        "checksum": f"{int(checksum.total):016x}",
        "checksum_method": f"sum mod 2^64 of polars {pl.__version__} hash_rows(seed=0) over the columns read",
    }
    fields["sha256"] = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    fields["bytes"] = checksum.n_bytes
    fields["read_seconds"] = round(seconds, 3)
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[uri.uri] = fields


def database_fingerprint(source: str) -> dict[str, Any]:
    """The fingerprint of this process's last read of ``source`` (:func:`read_database`).

    ``{"path", "method": "database-rows", "kind", "query", "n_rows", "max_timestamp", "checksum",
    "checksum_method", "sha256", "bytes", "read_seconds"}``; ``sha256`` covers every field before it,
    so two reads with equal ``sha256`` returned the same rows from the same query.

    Raises:
        DataError: ``source`` was not read by this process (the fingerprint describes the rows
            a run trained on, so it is taken while reading, never by querying again later).
    """
    uri = DatabaseURI.parse(source)
    with _FINGERPRINTS_LOCK:
        found = _FINGERPRINTS.get(uri.uri)
    if found is None:
        raise DataError(
            f"{uri}: this process has not read the database source, so it has no fingerprint of the rows a "
            "run used; read it with read_interactions (prepare_dataset, train_run) in the same process first"
        )
    return dict(found)
