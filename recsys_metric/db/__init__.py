"""Databases at both ends of the pipeline: interaction logs read from PostgreSQL or DuckDB, and
recommendation tables written into PostgreSQL.

- :mod:`recsys_metric.db.uri`: URI parsing, password redaction, credentials from the environment
  or a Prefect Secret block (a password is never accepted inside a URI).
- :mod:`recsys_metric.db.source`: :func:`read_database` (bounded Arrow batches into the usual
  validation and quarantine) and :func:`database_fingerprint` (what ``manifest.json`` records).
- :mod:`recsys_metric.db.sink`: :func:`write_postgres_table`, a bulk load (binary COPY through
  ADBC) into a staging table, the ``(user_id, rank)`` index, and a rename swap in one transaction
  that keeps the previous table as ``<table>_previous`` (a logged table, or ``unlogged=True``).

Nothing here imports torch: the serving side calls the sink. See docs/databases.md.
"""

from recsys_metric.db.connection import DatabaseError, DatabaseUnreachable
from recsys_metric.db.source import database_fingerprint, read_database
from recsys_metric.db.uri import DatabaseURI, is_database_uri, redact

__all__ = [
    "DatabaseError",
    "DatabaseURI",
    "DatabaseUnreachable",
    "database_fingerprint",
    "is_database_uri",
    "read_database",
    "redact",
]
