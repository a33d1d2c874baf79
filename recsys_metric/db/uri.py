"""Database URIs: parsing, password redaction, credentials and driver errors turned into one line.

Two kinds are understood:

- ``postgresql://user@host:port/dbname`` (also ``postgres://``; any libpq URI, e.g. a Unix
  socket as ``postgresql://user@/dbname?host=/var/run/postgresql``);
- ``duckdb://PATH``: everything after ``duckdb://`` is the file path, so
  ``duckdb:///data/log.duckdb`` is the absolute path ``/data/log.duckdb`` and
  ``duckdb://data/log.duckdb`` a relative one.

A password never travels in a URI here: a URI that carries one is refused (it would end up in
shell history, process lists, Prefect parameters, logs and the manifest). The password comes from
an environment variable (``PGPASSWORD`` by default) or from a Prefect ``Secret`` block, and is
handed to libpq only inside the connection string built in memory by :func:`postgres_connect_uri`.
Every driver message that reaches a user goes through :func:`scrub` first.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from recsys_metric.errors import ConfigError

Kind = Literal["postgresql", "duckdb"]

_SCHEMES: dict[str, Kind] = {"postgresql": "postgresql", "postgres": "postgresql", "duckdb": "duckdb"}
# user:password@ in any URI-looking text: what redact() masks.
_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s]*):(?P<pw>[^/@\s]+)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<pw>[^&\s]+)", re.IGNORECASE)
DEFAULT_PASSWORD_ENV = "PGPASSWORD"
"""Environment variable read for the PostgreSQL password unless another is configured."""


def is_database_uri(source: object) -> bool:
    """True when ``source`` is a string naming a database this package reads (see module docstring)."""
    if not isinstance(source, str):
        return False
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    return scheme in _SCHEMES


def redact(text: str) -> str:
    """``text`` with every password inside a URI (``user:PASSWORD@`` or ``password=...``) replaced by ``***``."""
    text = _USERINFO_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", text)


def scrub(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """One line of ``text`` with URIs redacted and every non-empty secret in ``secrets`` masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***").replace(quote(secret, safe=""), "***")
    return " ".join(redact(text).split())


@dataclass(frozen=True)
class DatabaseURI:
    """A parsed database URI (never holding a password).

    Attributes:
        kind: ``postgresql`` or ``duckdb``.
        uri: the URI as given (safe to print: it has no password).
        path: the DuckDB file (``duckdb`` only).
    """

    kind: Kind
    uri: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> DatabaseURI:
        """Parse and check ``text``.

        Raises:
            ConfigError: not a ``postgresql://``/``duckdb://`` URI, a password inside it, or a
                DuckDB URI without a path.
        """
        if not is_database_uri(text):
            raise ConfigError(
                f"{redact(text)}: not a database URI; use postgresql://user@host:port/dbname or duckdb:///path/file.duckdb"
            )
        scheme, rest = text.split("://", 1)
        kind = _SCHEMES[scheme.lower()]
        if kind == "duckdb":
            if not rest:
                raise ConfigError(f"{text}: the DuckDB URI names no file; use duckdb:///path/to/file.duckdb")
            return cls(kind="duckdb", uri=text, path=os.path.expanduser(rest))
        parts = urlsplit(text)
        in_query = any(key.lower() == "password" and value for key, value in parse_qsl(parts.query))
        if parts.password or in_query:
            raise ConfigError(
                f"{redact(text)}: the URI carries a password; remove it and put the password in the "
                f"environment ({DEFAULT_PASSWORD_ENV}, or the variable named by data.password_env) or in a "
                "Prefect Secret block (data.password_secret), so that it never reaches logs or manifests"
            )
        return cls(kind="postgresql", uri=text)

    def __str__(self) -> str:
        return self.uri


def resolve_password(
    password_env: str = DEFAULT_PASSWORD_ENV, password_secret: str | None = None
) -> str | None:
    """The PostgreSQL password: the Prefect Secret block ``password_secret`` when named, else the
    environment variable ``password_env``; None when neither gives one (libpq then tries its own
    sources: ``~/.pgpass``, peer or trust authentication).

    Raises:
        ConfigError: the Secret block cannot be loaded (missing, no Prefect API).
    """
    if password_secret:
        try:
            from prefect.blocks.system import Secret  # a flow dependency: imported only when asked for
        except ImportError as err:  # pragma: no cover - Prefect is a core dependency today
            raise ConfigError(f"data.password_secret needs Prefect installed ({err})") from None
        try:
            value = Secret.load(password_secret).get()
        except Exception as err:  # noqa: BLE001 - Prefect raises ValueError, httpx or API errors here
            raise ConfigError(
                f"cannot load the Prefect Secret block {password_secret!r} (data.password_secret): "
                f"{scrub(str(err))}; create it with Secret(value=...).save({password_secret!r}) against the "
                "Prefect API this process uses"
            ) from None
        return str(value)
    value = os.environ.get(password_env)
    return value or None


def postgres_connect_uri(uri: DatabaseURI, password: str | None) -> str:
    """The libpq connection string for ``uri`` with ``password`` added as a query parameter.

    Only for handing to the driver: the result holds the password and must never be logged.
    """
    if password is None:
        return uri.uri
    parts = urlsplit(uri.uri)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("password", password)])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
