"""Exceptions that reach users. Each message says what is wrong, where, and what to do.

The CLI prints ``RecsysMetricError`` messages as one line and exits non-zero; anything else is
a bug and keeps its traceback.

Every error also says whether trying again may succeed (:func:`is_transient`): a log caught
while it is being copied, a network filesystem that hiccups or a database that drops the
connection fail once and read fine a few seconds later; a missing column or a bad config value
fails the same way on every try. The Prefect flows retry only transient errors.
"""

from __future__ import annotations

import errno
from typing import Any


class RecsysMetricError(Exception):
    """Base class for errors caused by inputs or configuration, not by bugs.

    Args:
        *args: the message (what is wrong, where, and what to do), as for ``Exception``.
        transient: the same call may succeed when tried again a little later (a file still being
            written, an I/O or connection error); False for anything in the data or the config.
    """

    transient: bool = False

    def __init__(self, *args: object, transient: bool = False):
        super().__init__(*args)
        self.transient = transient


class ConfigError(RecsysMetricError, ValueError):
    """A config file or value is invalid (unknown key, wrong type, contradictory values)."""


class DataError(RecsysMetricError, ValueError):
    """The interaction log cannot be used as it is (missing column, too many bad rows, empty...)."""


class UnknownIdError(DataError, KeyError):
    """Ids that are not in a vocabulary were looked up with ``missing="error"``.

    A :class:`KeyError` (a lookup failed) and a :class:`DataError` (the CLI reports it as a user
    error). ``unknown`` holds the first few unknown ids, ``n_unknown`` how many distinct ids were
    unknown.
    """

    def __init__(self, message: str, *, unknown: list[Any], n_unknown: int):
        super().__init__(message)
        self.unknown = unknown
        self.n_unknown = n_unknown

    def __str__(self) -> str:
        # KeyError.__str__ would print the repr of the message, quotes and escapes included.
        return str(self.args[0])


class ServingError(RecsysMetricError):
    """A serving process cannot do what was asked of it (e.g. its added-items journal cannot be
    written); what it serves is unchanged."""


class RejectLimitExceeded(DataError):
    """More rows were quarantined than ``data.max_reject_fraction`` allows."""

    def __init__(self, message: str, *, n_rejected: int, n_total: int, rejects_path: str | None):
        super().__init__(message)
        self.n_rejected = n_rejected
        self.n_total = n_total
        self.rejects_path = rejects_path


# OSErrors that a retry a few seconds later cannot fix: the path, the permissions or the space
# are wrong until someone acts.
_PERMANENT_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.ENAMETOOLONG,
        errno.EEXIST,
        errno.ENOTEMPTY,
    }
)
# Database drivers' connection-level errors, by (module prefix, class name): checked by name so
# that no driver has to be installed or imported to classify an error.
_DB_TRANSIENT = (
    ("psycopg", "OperationalError"),
    ("psycopg2", "OperationalError"),
    ("psycopg", "InterfaceError"),
    ("sqlalchemy", "OperationalError"),
    ("sqlalchemy", "DisconnectionError"),
    ("asyncpg", "ConnectionDoesNotExistError"),
    ("asyncpg", "CannotConnectNowError"),
    ("asyncpg", "TooManyConnectionsError"),
    ("pg8000", "InterfaceError"),
)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the failed call a few seconds later may succeed.

    True for a :class:`RecsysMetricError` raised with ``transient=True`` (a file that changed
    while it was read, a truncated Parquet file that starts like one, an I/O error under a
    reader), for ``ConnectionError``/``TimeoutError``, for database drivers' connection errors
    (psycopg, SQLAlchemy, asyncpg, pg8000), and for other ``OSError``\\ s (EIO, ESTALE, an NFS
    hiccup) except those a retry cannot fix (no such file, permission denied, read-only or full
    filesystem). False for everything else: bad data, bad config, bugs.
    """
    if isinstance(exc, RecsysMetricError):
        return bool(exc.transient)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    module = type(exc).__module__ or ""
    name = type(exc).__name__
    if any(module.split(".")[0] == prefix and name == cls for prefix, cls in _DB_TRANSIENT):
        return True
    # A library's own error raised from a dropped connection (``raise ... from err``).
    return isinstance(exc.__cause__, (ConnectionError, TimeoutError))
