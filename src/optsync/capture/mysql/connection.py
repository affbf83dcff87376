"""Connections to a MySQL/MariaDB source: the URL, PyMySQL settings, errors translated.

``mysql://user:password@host:port/database`` and ``mariadb://...`` (the same; the server's
``VERSION()`` says which it is). User and password may be percent-encoded; the port defaults to
3306; the database is where unqualified table names live. The password never appears in an
error or a log line (``SourceURL.redacted``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import pymysql
import pymysql.converters
import pymysql.cursors

from optsync.errors import ConfigError, Fatal, Retryable

__all__ = (
    "ERROR_GTID_NOT_FOUND",
    "PositionLost",
    "PreflightFailed",
    "SourceURL",
    "connect",
    "translated",
)

logger = logging.getLogger(__name__)

SCHEMES: Final = ("mysql", "mariadb")
DEFAULT_PORT: Final = 3306
CONNECT_TIMEOUT: Final = 10

ERROR_GTID_NOT_FOUND: Final = 1236
"""ER_MASTER_FATAL_ERROR_READING_BINLOG: the requested binlog position or GTID is gone."""
_CONNECTION_ERRORS: Final = frozenset({1040, 1053, 2003, 2006, 2013, 2055, 1927})
"""Too many connections, shutdown in progress, can't connect, gone away, lost, killed."""
_TRANSIENT_ERRORS: Final = frozenset({1205, 1213, 1317})
"""Lock wait timeout, deadlock, query interrupted."""
_PRIVILEGE_ERRORS: Final = frozenset({1044, 1142, 1143, 1227, 1370})
_MISSING_ERRORS: Final = frozenset({1049, 1146})
"""Unknown database, table does not exist."""

RAW_CONVERSIONS: Final[dict[Any, Any]] = {
    k: v for k, v in pymysql.converters.conversions.items() if not isinstance(k, int)
}
"""Encoders only: result values stay the server's text (bytes for binary columns)."""


class PositionLost(Fatal):
    """The binlog no longer holds the changes after the saved position (purged, reset)."""


class PreflightFailed(ConfigError):
    """The server or the capture user is not set up for capture; the message names the fix."""


@dataclass(frozen=True)
class SourceURL:
    """A parsed ``mysql://`` / ``mariadb://`` URL."""

    scheme: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str | None

    @classmethod
    def parse(cls, url: str, source: str) -> SourceURL:
        where = f"source {source!r}: "
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise ConfigError(
                f"{where}url must start with mysql:// or mariadb://, not {scheme or url[:20]!r}"
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"{where}the url takes no ?options or #fragment: write "
                f"{scheme}://user:password@host:port/database"
            )
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigError(f"{where}the url's port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ConfigError(f"{where}the url names no host: {scheme}://user:password@HOST/db")
        if not parts.username:
            raise ConfigError(f"{where}the url names no user: {scheme}://USER:password@host/db")
        database = unquote(parts.path.lstrip("/")) or None
        if database is not None and "/" in database:
            raise ConfigError(f"{where}the url's path must be one database name")
        return cls(
            scheme=scheme,
            host=parts.hostname,
            port=port,
            user=unquote(parts.username),
            password=unquote(parts.password or ""),
            database=database,
        )

    @property
    def redacted(self) -> str:
        """The URL without its password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{self.user}@{host}:{self.port}/{self.database or ''}"

    def settings(self, **extra: Any) -> dict[str, Any]:
        """PyMySQL connection keyword arguments."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "charset": "utf8mb4",
            "connect_timeout": CONNECT_TIMEOUT,
            "autocommit": True,
            **extra,
        }

    def binlog_settings(self, read_timeout: float) -> dict[str, Any]:
        """Settings for ``BinLogStreamReader`` (it adds its own charset)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": read_timeout,
        }


def connect(url: SourceURL, source: str, *, raw: bool = False) -> pymysql.Connection[Any]:
    """A connection; ``raw``: results as the server's text (for snapshots)."""
    options: dict[str, Any] = {"conv": RAW_CONVERSIONS} if raw else {}
    with translated(source, f"connect to {url.redacted}", url):
        return pymysql.connect(**url.settings(**options))


@contextmanager
def translated(source: str, action: str, url: SourceURL | None = None) -> Iterator[None]:
    """PyMySQL errors as optsync's: Retryable when waiting can help, else Fatal with the fix."""
    try:
        yield
    except pymysql.err.MySQLError as exc:
        raise error_for(exc, source, action, url) from exc


def error_for(
    exc: BaseException, source: str, action: str, url: SourceURL | None = None
) -> Exception:
    """The optsync error for a PyMySQL (or socket) error."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    where = f"source {source!r}: {action}"
    if isinstance(exc, pymysql.err.InterfaceError | OSError) or code in _CONNECTION_ERRORS:
        return Retryable(f"{where}: the server is unreachable or went away ({code}: {text})")
    if code in _TRANSIENT_ERRORS:
        return Retryable(f"{where}: {text}; capture retries")
    if code == 1045:
        user = f" {url.user!r}" if url else ""
        return ConfigError(
            f"{where}: access denied for user{user} ({text}); check the user and password in "
            "[source] url"
        )
    if code in _PRIVILEGE_ERRORS:
        user = url.user if url else "optsync"
        return PreflightFailed(
            f"{where}: the capture user lacks a privilege ({text}); run "
            f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{user}'@'%'"
        )
    if code in _MISSING_ERRORS:
        return ConfigError(f"{where}: {text}; check the database and [source] tables")
    if code == ERROR_GTID_NOT_FOUND:
        return PositionLost(f"{where}: the server cannot send the binlog from there ({text})")
    return Fatal(f"{where} failed ({code}: {text})")


def query(conn: pymysql.Connection[Any], sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    """All rows of a small query."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


def variables(conn: pymysql.Connection[Any], pattern: str) -> dict[str, str]:
    """``SHOW GLOBAL VARIABLES LIKE pattern`` as a lower-case name -> value mapping."""
    return {
        str(k).lower(): str(v) for k, v in query(conn, "SHOW GLOBAL VARIABLES LIKE %s", (pattern,))
    }
