"""Connections to the source PostgreSQL, and its errors as optsync's.

Two kinds of connection, both from the ``postgresql://`` URL with ``SESSION_OPTIONS``:
a normal one (preflight, catalog look-ups, the snapshot) and a logical replication one
(``replication=database``: slot creation and the pgoutput stream). psycopg2 is used, not
psycopg 3, because its ``LogicalReplicationConnection`` is a maintained replication API
(``start_replication``, ``read_message``, ``send_feedback``, keepalive handling in C), while
psycopg 3 has none: only hand-written ``pgconn.get_copy_data`` / ``put_copy_data`` framing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from optsync.capture.postgres.values import SESSION_OPTIONS
from optsync.errors import ConfigError, Fatal, Retryable

__all__ = ("check_url", "connect", "masked", "quote_ident", "translated")

SCHEMES: Final = ("postgresql", "postgres")
_CONFIG_HINTS: Final = (
    ("password authentication failed", "check the user and password in [source] url"),
    ("no pg_hba.conf entry", "allow the connection in pg_hba.conf (see docs/postgres.md)"),
    ("does not exist", "check the user and database names in [source] url"),
    ("permission denied", "grant the privilege named above (see docs/postgres.md)"),
    ("must be superuser or replication role", "ALTER ROLE <user> REPLICATION"),
    ("must have replication", "ALTER ROLE <user> REPLICATION"),
)
_RETRYABLE_CLASSES: Final = ("08", "53", "57", "40")
"""Connection exception, insufficient resources, operator intervention, rollback."""


def check_url(url: str) -> None:
    """``ConfigError`` unless ``url`` is a ``postgresql://`` URL."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            f"[source] url {masked(url)!r} is not a postgresql:// URL "
            "(postgresql://user:password@host:5432/database)"
        )


def masked(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def quote_ident(name: str) -> str:
    """An SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def connect(url: str, application: str, *, replication: bool = False) -> Any:
    """A connection with capture's session settings (autocommit for normal connections)."""
    options: dict[str, Any] = {
        "options": SESSION_OPTIONS,
        "application_name": application,
        "client_encoding": "UTF8",
    }
    if replication:
        options["connection_factory"] = psycopg2.extras.LogicalReplicationConnection
    conn = psycopg2.connect(url, **options)
    if not replication:
        conn.autocommit = True
    return conn


def _hint(text: str) -> str | None:
    lowered = text.lower()
    for needle, hint in _CONFIG_HINTS:
        if needle in lowered:
            return hint
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else repr(exc)
    # Never echo a password: libpq may quote a whole connection string ("invalid dsn").
    line = re.sub(r"(?i)password=\S+", "password=***", line)
    return re.sub(r"(?i)([a-z][a-z0-9+.-]*://[^:\s/@]*):[^@\s]*@", r"\1:***@", line)


@contextmanager
def translated(source: str, action: str) -> Iterator[None]:
    """psycopg2 errors as optsync's: whether a retry can help, and what to do."""
    try:
        yield
    except psycopg2.Error as exc:
        code = exc.pgcode or ""
        message = _first_line(exc)
        where = f"source {source!r}: {action}"
        if isinstance(exc, psycopg2.ProgrammingError) and "invalid dsn" in str(exc).lower():
            raise ConfigError(
                f"{where}: [source] url is not a valid PostgreSQL URL: check the host and port, "
                "and percent-encode special characters in the user name and password"
            ) from None
        if code == "42501":
            raise ConfigError(
                f"{where}: {message}; grant the missing privilege (see docs/postgres.md)"
            ) from exc
        if not code and isinstance(exc, psycopg2.OperationalError):
            hint = _hint(str(exc))  # connection refused at log-in: a setting, not a hiccup
            if hint is not None:
                raise ConfigError(f"{where}: {message}; {hint}") from exc
            raise Retryable(f"{where}: {message}; capture retries") from exc
        if code.startswith(_RETRYABLE_CLASSES):
            raise Retryable(f"{where}: {message}; capture retries") from exc
        raise Fatal(f"{where} failed: {message}") from exc
