"""Connections (ADBC for PostgreSQL, DuckDB's own client) and driver errors turned into one line.

Every failure a user can fix raises :class:`DatabaseError` (a :class:`DataError`, so the CLI
answers with one line and exit 2) whose message names the URI (never a password), what failed
and what to do; a server that cannot be reached raises :class:`DatabaseUnreachable`, which is also
a ``ConnectionError`` so that the nightly flow retries it like any other I/O failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from recsys_metric.db.uri import DatabaseURI, postgres_connect_uri, scrub
from recsys_metric.errors import DataError


class DatabaseError(DataError):
    """A database source or sink failed in a way the user can fix (credentials, query, table, column)."""


class DatabaseUnreachable(DatabaseError, ConnectionError):
    """No server answers at the URI (or the DuckDB file cannot be opened); worth retrying."""


_PG_SQLSTATE_HINTS: dict[str, tuple[str, str]] = {
    "42P01": ("a table or view in the query does not exist", "check data.table / data.query and the schema"),
    "3F000": ("the schema does not exist", "check the schema in data.table / data.query"),
    "42703": ("a column in the query does not exist", "check data.query and data.columns"),
    "42601": ("the query is not valid SQL", "fix data.query"),
    "42501": ("permission denied", "GRANT the user SELECT on the table (or CREATE on the schema for a sink)"),
    "28P01": (
        "wrong credentials",
        "check the password in PGPASSWORD (or data.password_env / data.password_secret)",
    ),
    "28000": ("the server refused the login", "check the user name and the server's pg_hba.conf"),
    "3D000": ("the database does not exist", "check the database name in the URI"),
}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def postgres_error(
    uri: DatabaseURI, err: BaseException, doing: str, password: str | None, outcome: str = ""
) -> DatabaseError:
    """The :class:`DatabaseError` for an ADBC/libpq error ``err`` raised while ``doing`` something;
    ``outcome`` (e.g. "the old table keeps serving") ends the message."""
    message = str(err)
    # A Python exception inside a batch stream arrives with its traceback: keep its own message only.
    detail = scrub(_first_line(err).split(" Detail: Python exception")[0], (password,))
    outcome = f"; {outcome}" if outcome else ""
    sqlstate = getattr(err, "sqlstate", None)
    lower = message.lower()
    if sqlstate in _PG_SQLSTATE_HINTS:
        what, hint = _PG_SQLSTATE_HINTS[sqlstate]
    elif "password authentication failed" in lower or "no password supplied" in lower:
        what, hint = _PG_SQLSTATE_HINTS["28P01"]
        if "no password supplied" in lower:
            what = "the server asks for a password and none was given"
    elif "failed to connect" in lower and ("database" in lower and "does not exist" in lower):
        what, hint = _PG_SQLSTATE_HINTS["3D000"]
    elif "failed to connect" in lower and "role" in lower and "does not exist" in lower:
        what, hint = "the user does not exist", "check the user name in the URI"
    elif "failed to connect" in lower or "could not connect" in lower or "connection refused" in lower:
        return DatabaseUnreachable(
            f"{uri}: cannot reach the PostgreSQL server ({detail}); check the host, port or socket directory "
            f"in the URI and that the server is running{outcome}"
        )
    else:
        return DatabaseError(f"{uri}: {doing} failed ({detail}); see the server log for more{outcome}")
    return DatabaseError(f"{uri}: {what} while {doing} ({detail}); {hint}{outcome}")


def duckdb_error(uri: DatabaseURI, err: BaseException, doing: str) -> DatabaseError:
    """The :class:`DatabaseError` for a DuckDB error ``err`` raised while ``doing`` something."""
    import duckdb

    detail = scrub(_first_line(err))
    if isinstance(err, duckdb.CatalogException):
        return DatabaseError(
            f"{uri}: a table or view in the query does not exist while {doing} ({detail}); check data.table / data.query"
        )
    if isinstance(err, duckdb.BinderException):
        return DatabaseError(
            f"{uri}: a column in the query does not exist while {doing} ({detail}); check data.query and data.columns"
        )
    if isinstance(err, duckdb.ParserException):
        return DatabaseError(f"{uri}: the query is not valid SQL ({detail}); fix data.query")
    if isinstance(err, duckdb.IOException):
        return DatabaseUnreachable(
            f"{uri}: cannot open the DuckDB file {uri.path} ({detail}); check the path, and that no other "
            "process holds it open for writing"
        )
    return DatabaseError(f"{uri}: {doing} failed ({detail}); check the query")


def _adbc_postgresql() -> Any:
    try:
        import adbc_driver_postgresql.dbapi as pgdb
    except ImportError:
        raise DataError(
            "reading or writing PostgreSQL needs the ADBC driver: pip install 'recsys-metric[db]'"
        ) from None
    return pgdb


@contextlib.contextmanager
def postgres_connection(uri: DatabaseURI, password: str | None, doing: str) -> Iterator[Any]:
    """An ADBC DB-API connection (autocommit off: one transaction until ``commit``), closed on exit.

    Raises:
        DatabaseUnreachable: no server at the URI.
        DatabaseError: wrong credentials, unknown database or user.
    """
    pgdb = _adbc_postgresql()
    from adbc_driver_manager import Error as AdbcError

    try:
        conn = pgdb.connect(postgres_connect_uri(uri, password))
    except AdbcError as err:
        raise postgres_error(uri, err, doing, password) from None
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def duckdb_connection(uri: DatabaseURI, doing: str) -> Iterator[Any]:
    """A read-only DuckDB connection to the URI's file, closed on exit.

    Raises:
        DatabaseUnreachable: the file does not exist or cannot be opened.
    """
    import duckdb

    assert uri.path is not None
    if not os.path.isfile(uri.path):
        raise DatabaseUnreachable(
            f"{uri}: the DuckDB file {uri.path} does not exist; check the path (duckdb:///absolute/path or "
            "duckdb://relative/path)"
        )
    try:
        conn = duckdb.connect(uri.path, read_only=True)
    except duckdb.Error as err:
        raise duckdb_error(uri, err, doing) from None
    try:
        yield conn
    finally:
        conn.close()
