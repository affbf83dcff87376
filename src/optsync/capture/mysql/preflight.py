"""Checks before capture reads anything, and what capture knows about the server and tables.

Each failed check raises ``PreflightFailed`` (a ``ConfigError``) whose message names the fix:
the my.cnf line to add, or the GRANT statement to run. The checks:

- ``log_bin`` is ON, ``binlog_format=ROW``, ``binlog_row_image=FULL``, and
  ``binlog_row_metadata=FULL`` where the server has the variable (MariaDB 10.5+, MySQL 8.0.14+;
  it puts column names into the binlog, so rows written before an ``ALTER TABLE`` are read
  with the columns they had).
- The capture user has REPLICATION SLAVE (reading the binlog), REPLICATION CLIENT (MariaDB
  calls it BINLOG MONITOR: ``SHOW BINARY LOGS``, snapshot coordinates) and SELECT on every
  captured table; on MySQL without ``Binlog_snapshot_file`` also RELOAD (the snapshot takes
  ``FLUSH TABLES WITH READ LOCK`` for a moment).
- The capture's ``server_id`` differs from the source's own ``@@server_id``.
- Every captured table exists, is a base table and is InnoDB (a consistent snapshot needs
  MVCC); its key is found (see ``TableInfo``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import pymysql

from optsync.capture.mysql.connection import (
    PreflightFailed,
    SourceURL,
    query,
    translated,
    variables,
)
from optsync.capture.mysql.values import ColumnKind, kind_of
from optsync.errors import ConfigError

__all__ = ("ColumnInfo", "ServerInfo", "TableInfo", "inspect_tables", "preflight")

logger = logging.getLogger(__name__)

_TRANSACTIONAL: Final = frozenset({"innodb", "rocksdb", "tokudb"})
_NO_ORDER_KINDS: Final = frozenset({ColumnKind.SET, ColumnKind.JSON, ColumnKind.BIT})


@dataclass(frozen=True)
class ServerInfo:
    version: str
    mariadb: bool
    server_id: int
    lock_free_snapshot: bool
    """The server reports ``Binlog_snapshot_file`` (MariaDB, Percona): no lock needed."""
    row_metadata: bool
    """``binlog_row_metadata=FULL``: column names travel in the binlog."""


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    kind: ColumnKind
    fsp: int
    """Fraction digits of DATETIME/TIMESTAMP/TIME columns."""
    enum: bool
    nullable: bool


@dataclass(frozen=True)
class TableInfo:
    """A captured table as ``open`` found it.

    ``key`` is how rows are identified: the PRIMARY KEY; else the smallest UNIQUE index whose
    columns are all NOT NULL and not prefixes (InnoDB clusters by that one too); else empty,
    and the row is keyed by *every* column (the AWS sample's ``optin_status`` has no key).
    """

    schema: str
    name: str
    columns: tuple[ColumnInfo, ...]
    key: tuple[str, ...]
    key_source: str
    """``primary``, ``unique <index>`` or ``all columns``."""

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def cursor_columns(self) -> tuple[str, ...]:
        """The columns a snapshot orders by and resumes from."""
        return self.key or tuple(c.name for c in self.columns)

    @property
    def index_ordered(self) -> bool:
        """Chunks can be read in key order by index seeks (keyed, and plain comparable types)."""
        by_name = {c.name: c for c in self.columns}
        return bool(self.key) and all(
            by_name[k].kind not in _NO_ORDER_KINDS and not by_name[k].enum for k in self.key
        )

    def column(self, name: str) -> ColumnInfo:
        return next(c for c in self.columns if c.name == name)


def preflight(
    conn: pymysql.Connection[Any], url: SourceURL, source: str, capture_server_id: int
) -> ServerInfo:
    """Check the server's settings and the user's privileges; what the server is."""
    with translated(source, "preflight", url):
        version, server_id = query(conn, "SELECT VERSION(), @@server_id")[0]
        settings = variables(conn, "log_bin")
        settings.update(variables(conn, "binlog_format"))
        settings.update(variables(conn, "binlog_row_image"))
        settings.update(variables(conn, "binlog_row_metadata"))
        snapshot_status = query(conn, "SHOW STATUS LIKE 'binlog_snapshot_file'")
        privileges = _privileges(conn)
    mariadb = "mariadb" in str(version).lower()
    fixes: list[str] = []
    if settings.get("log_bin", "OFF").upper() not in ("ON", "1"):
        fixes.append("log_bin is OFF: add `log_bin = mysql-bin` under [mysqld]")
    if settings.get("binlog_format", "").upper() != "ROW":
        fixes.append(f"binlog_format is {settings.get('binlog_format')}: add `binlog_format = ROW`")
    if settings.get("binlog_row_image", "").upper() != "FULL":
        fixes.append(
            f"binlog_row_image is {settings.get('binlog_row_image')}: add "
            "`binlog_row_image = FULL` (deletes and updates need every column's old value)"
        )
    metadata = settings.get("binlog_row_metadata")
    if metadata is not None and metadata.upper() != "FULL":
        fixes.append(
            f"binlog_row_metadata is {metadata}: add `binlog_row_metadata = FULL` (column "
            "names in the binlog, so an ALTER TABLE cannot mislabel columns)"
        )
    if fixes:
        raise PreflightFailed(
            f"source {source!r}: the server is not set up for change capture; in my.cnf, "
            + "; ".join(fixes)
            + "; then restart it (docs/mysql.md lists the lines)"
        )
    if metadata is None:
        logger.warning(
            "binlog_row_metadata missing source=%s version=%s: column names are read from "
            "information_schema; rows written before an ALTER TABLE may be mislabelled",
            source,
            version,
        )
    lock_free = bool(snapshot_status)
    needed = ["REPLICATION SLAVE", "BINLOG MONITOR" if mariadb else "REPLICATION CLIENT"]
    if not lock_free:
        needed.append("RELOAD")
    missing = [p for p in needed if not _has(privileges, p)]
    if missing:
        grant = "SELECT, REPLICATION SLAVE, REPLICATION CLIENT" + (
            ", RELOAD" if not lock_free else ""
        )
        raise PreflightFailed(
            f"source {source!r}: the capture user {url.user!r} lacks {', '.join(missing)} "
            f"(needed to read the binlog); run: GRANT {grant} ON *.* TO '{url.user}'@'%'; "
            "(use the user's host instead of '%' if it is not '%')"
        )
    if int(server_id) == capture_server_id:
        raise PreflightFailed(
            f"source {source!r}: the capture's server_id {capture_server_id} is the source "
            "server's own @@server_id; give the capture another one (server_id in [source])"
        )
    return ServerInfo(
        version=str(version),
        mariadb=mariadb,
        server_id=int(server_id),
        lock_free_snapshot=lock_free,
        row_metadata=metadata is not None,
    )


def _privileges(conn: pymysql.Connection[Any]) -> set[str]:
    """Global privileges of the current user, and of its active role."""
    # A user with SELECT on mysql.* sees every user's rows here: keep the current user's.
    user, _, host = str(query(conn, "SELECT CURRENT_USER()")[0][0]).rpartition("@")
    found = {
        str(row[0]).upper()
        for row in query(
            conn,
            "SELECT PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = %s",
            (f"'{user}'@'{host}'",),
        )
    }
    try:
        role = query(conn, "SELECT CURRENT_ROLE()")[0][0]
    except pymysql.err.MySQLError:
        role = None  # MySQL spells it differently; roles are then read from SHOW GRANTS only
    lines = [str(r[0]) for r in query(conn, "SHOW GRANTS")]
    if role and role != "NONE":
        with contextlib.suppress(pymysql.err.MySQLError):
            lines += [str(r[0]) for r in query(conn, "SHOW GRANTS FOR CURRENT_ROLE()")]
    for line in lines:
        head, _, rest = line.partition(" ON ")
        if not head.upper().startswith("GRANT ") or not rest.startswith("*.*"):
            continue
        for privilege in head[6:].split(","):
            found.add(privilege.strip().upper())
    return found


def _has(privileges: set[str], privilege: str) -> bool:
    aliases = {"BINLOG MONITOR": {"BINLOG MONITOR", "REPLICATION CLIENT"}}
    return "ALL PRIVILEGES" in privileges or bool(aliases.get(privilege, {privilege}) & privileges)


def inspect_tables(
    conn: pymysql.Connection[Any],
    url: SourceURL,
    source: str,
    names: Sequence[str],
) -> Mapping[str, TableInfo]:
    """Resolve ``table`` / ``db.table`` names; check each is a readable InnoDB base table."""
    tables: dict[str, TableInfo] = {}
    with translated(source, "inspect tables", url):
        for name in names:
            info = _inspect(conn, url, source, name)
            if info.qualified in tables:
                raise ConfigError(f"source {source!r}: table {info.qualified!r} is listed twice")
            tables[info.qualified] = info
    return tables


def _split(url: SourceURL, source: str, name: str) -> tuple[str, str]:
    schema, dot, table = name.rpartition(".")
    if not dot:
        if url.database is None:
            raise ConfigError(
                f"source {source!r}: table {name!r} names no database and the url has none; "
                "write it as database.table or add /database to the url"
            )
        schema = url.database
    if not schema or not table:
        raise ConfigError(f"source {source!r}: {name!r} is not a table or database.table name")
    return schema, table


def _inspect(conn: pymysql.Connection[Any], url: SourceURL, source: str, name: str) -> TableInfo:
    schema, table = _split(url, source, name)
    # A privilege error here names the missing SELECT (translated by the caller).
    try:
        query(conn, f"SELECT 1 FROM {quote(schema)}.{quote(table)} LIMIT 0")
    except pymysql.err.ProgrammingError as exc:
        if exc.args and exc.args[0] in (1049, 1146):  # unknown database, no such table
            raise ConfigError(
                f"source {source!r}: table {schema}.{table} does not exist; create it, or "
                "fix the name in [source] tables (database.table, or table in the url's "
                "database)"
            ) from exc
        raise
    rows = query(
        conn,
        "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE, ENGINE FROM information_schema.TABLES "
        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s",
        (schema, table),
    )
    if not rows:
        raise ConfigError(f"source {source!r}: table {schema}.{table} does not exist")
    schema, table, kind, engine = (str(v) if v is not None else "" for v in rows[0])
    if kind != "BASE TABLE":
        raise ConfigError(
            f"source {source!r}: {schema}.{table} is a {kind.lower()}, which has no binlog "
            "rows of its own; capture the tables it reads from"
        )
    if engine.lower() not in _TRANSACTIONAL:
        raise ConfigError(
            f"source {source!r}: {schema}.{table} uses the {engine} engine, which cannot take "
            f"a consistent snapshot; run ALTER TABLE {quote(schema)}.{quote(table)} "
            "ENGINE=InnoDB (or stop capturing it)"
        )
    columns = tuple(
        ColumnInfo(
            name=str(column),
            kind=kind_of(str(data_type), charset),
            fsp=int(precision or 0),
            enum=str(data_type).lower() == "enum",
            nullable=str(nullable) == "YES",
        )
        for column, data_type, charset, precision, nullable in query(
            conn,
            "SELECT COLUMN_NAME, DATA_TYPE, CHARACTER_SET_NAME, DATETIME_PRECISION, IS_NULLABLE "
            "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s "
            "ORDER BY ORDINAL_POSITION",
            (schema, table),
        )
    )
    key, key_source = _key(conn, schema, table, columns)
    return TableInfo(schema, table, columns, key, key_source)


def _key(
    conn: pymysql.Connection[Any], schema: str, table: str, columns: Sequence[ColumnInfo]
) -> tuple[tuple[str, ...], str]:
    indexes: dict[str, list[tuple[int, str, Any]]] = {}
    for index, seq, column, sub_part in query(
        conn,
        "SELECT INDEX_NAME, SEQ_IN_INDEX, COLUMN_NAME, SUB_PART FROM information_schema.STATISTICS "
        "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = %s AND NON_UNIQUE = 0",
        (schema, table),
    ):
        indexes.setdefault(str(index), []).append((int(seq), str(column), sub_part))
    nullable = {c.name for c in columns if c.nullable}
    if "PRIMARY" in indexes:
        return tuple(c for _, c, _ in sorted(indexes["PRIMARY"])), "primary"
    candidates = [
        (len(parts), index, tuple(c for _, c, _ in sorted(parts)))
        for index, parts in indexes.items()
        if all(sub is None and c not in nullable for _, c, sub in parts)
    ]
    if candidates:
        _, index, key = min(candidates)
        return key, f"unique {index}"
    return (), "all columns"


def quote(name: str) -> str:
    """An SQL identifier."""
    return "`" + name.replace("`", "``") + "`"
