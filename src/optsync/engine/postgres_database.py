"""What every optsync table in PostgreSQL shares: connecting, versioned migrations, and the
translation of driver errors into optsync's (``Retryable`` or ``ConfigError``).

Used by ``PostgresStore`` (``engine/postgres.py``) and ``PostgresDeadLetterQueue``
(``apply/dlq/postgres.py``), which keep their tables in the same database.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psycopg
import psycopg_pool
from psycopg import conninfo
from psycopg.rows import TupleRow

from optsync.errors import ConfigError, Fatal, OptsyncError, Retryable
from optsync.redaction import redact_url

__all__ = (
    "Migration",
    "connect",
    "connection_url",
    "describe",
    "migrate",
    "translate_error",
)

log = logging.getLogger(__name__)

MIGRATION_LOCK = int.from_bytes(b"optsync", "big")
"""The advisory lock (one-key form) held while a process migrates the schema."""

CONNECT_TIMEOUT = 10
"""Seconds to wait for the server when connecting."""

# SQLSTATE classes and codes after which the same statement can succeed later: the connection
# broke (08), the transaction lost a race (40: serialization failure, deadlock), the server is
# short of something (53) or was shut down or failed over (57, 58), a standby that refuses
# writes (25006: a failover not finished yet), a lock wait timed out (55P03).
_RETRYABLE_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_RETRYABLE_STATES = frozenset({"25006", "55P03"})

_PRIVILEGES = (
    "grant it (the engine needs CREATE on its schema the first time, then SELECT, INSERT, "
    "UPDATE, DELETE on its tables and USAGE on its sequences), or start optsync once as the "
    "database owner"
)

# A connection refused by the server has no SQLSTATE in libpq; its message says why.
_CONNECT_FIXES = (
    ("password authentication failed", "wrong password: correct the password in the URL"),
    (
        "no password supplied",
        "the server wants a password: put it in the URL (user:PASSWORD@host) or in ~/.pgpass",
    ),
    ("database", "create the database (createdb NAME) or correct its name in the URL"),
    ("role", "create the role (createuser NAME) or correct the user name in the URL"),
    ("no pg_hba.conf entry", "allow this host and user in the server's pg_hba.conf"),
    ("permission denied", "GRANT CONNECT ON DATABASE to the user, or use another user"),
)


def describe(url: str) -> str:
    """The URL as it may appear in a message: no password."""
    return redact_url(url)


def _secrets(url: str) -> list[str]:
    """The password of ``url`` as written (URL or key=value form), even if the URL is malformed."""
    found = re.findall(r"^[a-z][a-z0-9+.-]*://[^:/@?#]*:([^@]*)@", url, flags=re.I)
    found += re.findall(r"(?i)password\s*=\s*'?([^'\s&]+)", url)
    return [s for s in found if s]


def _first_line(exc: BaseException, url: str) -> str:
    """The driver's message, one line, without the password even if the driver echoed it."""
    lines = str(exc).strip().splitlines()
    text = lines[0].removeprefix("connection failed: ") if lines else type(exc).__name__
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return redact_url(text)


def translate_error(exc: psycopg.Error, url: str, what: str) -> OptsyncError:
    """The optsync error for a driver error (its ``__cause__``), with the password masked.

    ``what`` names the thing in messages ("engine database", "dead-letter queue database").
    Retryable: a lost connection, a shutdown or failover, a serialization failure or deadlock,
    a pool with no free connection in time. ConfigError: a wrong password, a missing database
    or role, a missing privilege, an invalid connection setting. Fatal: anything else, which is
    a statement optsync got wrong.
    """
    error = _translate(exc, f"{what} {describe(url)}", _first_line(exc, url))
    error.__cause__ = exc
    return error


def _translate(exc: psycopg.Error, where: str, reason: str) -> OptsyncError:
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return Retryable(f"{where}: no connection free or possible in time ({reason}); "
                         "it will be retried")  # fmt: skip
    state = exc.sqlstate or ""
    if state == "28P01":
        return ConfigError(f"{where}: wrong password ({reason}): correct the password in the URL")
    if state == "28000":
        return ConfigError(f"{where}: {reason}: check the user in the URL and pg_hba.conf")
    if state == "3D000":
        return ConfigError(f"{where}: {reason}: create the database or correct its name")
    if state == "42501":
        return ConfigError(f"{where}: {reason}: {_PRIVILEGES}")
    if state[:2] in _RETRYABLE_CLASSES or state in _RETRYABLE_STATES:
        return Retryable(f"{where}: {reason} (SQLSTATE {state}); it will be retried")
    if state or isinstance(exc, psycopg.ProgrammingError):
        return Fatal(
            f"{where}: {reason}" + (f" (SQLSTATE {state})" if state else "")
            + ": a statement optsync got wrong, or a schema changed by hand; report it"
        )  # fmt: skip
    if isinstance(exc, psycopg.OperationalError):
        # 57P03 (starting up, shutting down, in recovery) has no SQLSTATE at connect.
        moving = "the database system is" in reason
        if "FATAL" in reason and not moving:
            for marker, fix in _CONNECT_FIXES:
                if marker in reason:
                    return ConfigError(f"{where}: {reason}: {fix}")
        elif reason.startswith(("invalid ", "missing ")):  # libpq refusing a setting
            return ConfigError(f"{where}: {reason}: correct it in the URL")
    # Refused, timed out, closed under us: the server is down or moving.
    return Retryable(f"{where}: {reason}; it will be retried")


def connection_url(url: str, application_name: str) -> str:
    """``url`` with an application name (shown in pg_stat_activity) and a connect timeout,
    unless it sets them; a malformed URL raises ``ConfigError``."""
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(
            f"{describe(url)} is not a valid PostgreSQL URL ({_first_line(exc, url)}): "
            "write postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    extra = {"application_name": application_name, "connect_timeout": str(CONNECT_TIMEOUT)}
    return conninfo.make_conninfo(url, **{k: v for k, v in extra.items() if k not in params})


def connect(url: str, what: str, application_name: str) -> psycopg.Connection[TupleRow]:
    """One autocommit connection; a refused one raises ``ConfigError`` or ``Retryable``."""
    target = connection_url(url, application_name)
    try:
        return psycopg.connect(target, autocommit=True)
    except psycopg.Error as exc:
        raise translate_error(exc, url, what) from exc


@dataclass(frozen=True)
class Migration:
    """One schema version: the statements that take the previous version to it.

    ``convert``, when set, runs after the statements in the same transaction, on the same
    connection: a data conversion SQL cannot express (rewriting rows with Python code). It
    must leave rows it already converted as they are.
    """

    version: int
    summary: str
    statements: Sequence[str]
    convert: Callable[[psycopg.Connection[TupleRow]], None] | None = None


_SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    component text COLLATE "C" NOT NULL,   -- 'engine', 'dlq'
    version integer NOT NULL,
    summary text COLLATE "C" NOT NULL,
    migrated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


def migrate(
    conn: psycopg.Connection[TupleRow],
    component: str,
    migrations: Sequence[Migration],
    url: str,
    what: str,
) -> int:
    """Bring ``component``'s tables to the last of ``migrations``; the version reached.

    One transaction under an advisory lock: processes starting together wait for the first
    one, then find nothing left to do; a migration that fails leaves no half-made schema
    (its ``convert`` step included).
    """
    latest = migrations[-1].version
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute(_SCHEMA_VERSION_TABLE)
            row = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version WHERE component = %s",
                (component,),
            ).fetchone()
            current = int(row[0]) if row else 0
            if current > latest:
                raise ConfigError(
                    f"{what} {describe(url)} has schema version {current} of {component!r}, "
                    f"newer than this optsync knows ({latest}): upgrade optsync"
                )
            for migration in migrations:
                if migration.version <= current:
                    continue
                log.info(
                    "schema migrate component=%s version=%d summary=%s",
                    component,
                    migration.version,
                    migration.summary,
                )
                for statement in migration.statements:
                    conn.execute(statement)
                if migration.convert is not None:
                    migration.convert(conn)
                conn.execute(
                    "INSERT INTO schema_version (component, version, summary) VALUES (%s, %s, %s)",
                    (component, migration.version, migration.summary),
                )
    except psycopg.Error as exc:
        raise translate_error(exc, url, what) from exc
    return latest
