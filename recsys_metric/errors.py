"""Exceptions that reach users. Each message says what is wrong, where, and what to do.

The CLI prints ``RecsysMetricError`` messages as one line and exits non-zero; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class RecsysMetricError(Exception):
    """Base class for errors caused by inputs or configuration, not by bugs."""


class ConfigError(RecsysMetricError, ValueError):
    """A config file or value is invalid (unknown key, wrong type, contradictory values)."""


class DataError(RecsysMetricError, ValueError):
    """The interaction log cannot be used as it is (missing column, too many bad rows, empty...)."""


class RejectLimitExceeded(DataError):
    """More rows were quarantined than ``data.max_reject_fraction`` allows."""

    def __init__(self, message: str, *, n_rejected: int, n_total: int, rejects_path: str | None):
        super().__init__(message)
        self.n_rejected = n_rejected
        self.n_total = n_total
        self.rejects_path = rejects_path
