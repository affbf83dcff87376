"""Preflight of a PostgreSQL source: every setting and privilege capture needs, with the fix.

``check_server`` and ``describe_tables`` raise ``ConfigError`` naming what to change (the
``postgresql.conf`` line, the ``ALTER ROLE``, the ``GRANT``, the ``ALTER TABLE``) and log a
warning where capture works but with less than it could (partial before images).
``ensure_publication`` creates or completes the publication; ``slot_info`` reads a slot.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from optsync.capture.postgres.connection import quote_ident
from optsync.errors import ConfigError

__all__ = (
    "MIN_SERVER_VERSION",
    "ServerFacts",
    "TableInfo",
    "TableRef",
    "check_free_slots",
    "check_server",
    "describe_tables",
    "ensure_publication",
    "parse_table",
    "publication_columns",
    "slot_info",
)

logger = logging.getLogger(__name__)

MIN_SERVER_VERSION: Final = 140000
"""PostgreSQL 14: TID range scans (keyless snapshots) and ``wal_status`` of slots."""
PUBLISH: Final = "insert, update, delete, truncate"


@dataclass(frozen=True)
class TableRef:
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


def parse_table(text: str) -> TableRef:
    """``table`` (schema public) or ``schema.table``."""
    parts = text.split(".")
    if len(parts) == 1 and parts[0]:
        return TableRef("public", parts[0])
    if len(parts) == 2 and all(parts):
        return TableRef(parts[0], parts[1])
    raise ConfigError(f"[source] tables: {text!r} is not 'table' or 'schema.table'")


@dataclass(frozen=True)
class ServerFacts:
    version: int
    wal_level: str
    max_slots: int
    max_senders: int
    user: str
    database: str
    replication: bool
    """The user has the REPLICATION attribute (or is a superuser)."""
    slots_used: int
    senders_used: int


@dataclass(frozen=True)
class TableInfo:
    """A captured table as the catalog describes it now."""

    ref: TableRef
    oid: int
    identity: str
    """``relreplident``: d default, f full, i index, n nothing."""
    relfilenode: int
    estimated_rows: int | None
    estimated_pages: int
    columns: tuple[str, ...]
    column_types: tuple[int, ...]
    """Type OID of each column."""
    key: tuple[str, ...]
    """Primary key (or replica identity index) columns; empty: the table has no key."""
    key_types: tuple[str, ...]
    """``format_type`` of each key column, to cast a saved snapshot cursor back."""


def _one(cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
    cur.execute(sql, params)
    return cur.fetchone()


def check_server(cur: Any) -> ServerFacts:
    """Server version, ``wal_level`` and the replication privilege; ``ConfigError`` with the fix."""
    row = _one(
        cur,
        "SELECT current_setting('server_version_num')::int, current_setting('wal_level'), "
        "current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int, "
        "current_user, current_database(), "
        "(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user), "
        "(SELECT count(*) FROM pg_replication_slots), "
        "(SELECT count(*) FROM pg_stat_replication)",
    )
    facts = ServerFacts(
        version=int(row[0]),
        wal_level=str(row[1]),
        max_slots=int(row[2]),
        max_senders=int(row[3]),
        user=str(row[4]),
        database=str(row[5]),
        replication=bool(row[6]),
        slots_used=int(row[7]),
        senders_used=int(row[8]),
    )
    if facts.version < MIN_SERVER_VERSION:
        raise ConfigError(
            f"PostgreSQL {facts.version // 10000} is too old for capture: upgrade to "
            "PostgreSQL 14 or newer"
        )
    if facts.wal_level != "logical":
        raise ConfigError(
            f"wal_level is {facts.wal_level!r}; logical replication needs "
            "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical), "
            "then a restart of PostgreSQL"
        )
    if not facts.replication:
        raise ConfigError(
            f"role {facts.user!r} may not read the WAL: ALTER ROLE {quote_ident(facts.user)} "
            "REPLICATION (as a superuser)"
        )
    if facts.senders_used >= facts.max_senders:
        raise ConfigError(
            f"all max_wal_senders = {facts.max_senders} WAL senders are in use: raise "
            "max_wal_senders in postgresql.conf and restart PostgreSQL, or stop an unused "
            "replication client"
        )
    return facts


def check_free_slots(facts: ServerFacts, needed: int, cur: Any) -> None:
    """``ConfigError`` unless ``needed`` more replication slots can be created."""
    if needed <= 0 or facts.slots_used + needed <= facts.max_slots:
        return
    cur.execute("SELECT slot_name, active FROM pg_replication_slots ORDER BY slot_name")
    names = ", ".join(f"{name}{'' if active else ' (inactive)'}" for name, active in cur)
    raise ConfigError(
        f"max_replication_slots = {facts.max_slots} is reached ({facts.slots_used} slots: "
        f"{names}) and capture needs {needed} more: drop an unused slot "
        "(SELECT pg_drop_replication_slot('name')) or raise max_replication_slots in "
        "postgresql.conf and restart PostgreSQL"
    )


def describe_tables(cur: Any, refs: Sequence[TableRef]) -> list[TableInfo]:
    """Each table's catalog facts; ``ConfigError`` for a missing table, privilege or identity."""
    tables = [_describe(cur, ref) for ref in refs]
    for table in tables:
        name = table.ref.qualified
        if table.identity == "f":
            continue
        if not table.key:
            raise ConfigError(
                f"table {name} has no primary key and REPLICA IDENTITY "
                f"{'NOTHING' if table.identity == 'n' else 'DEFAULT'}: once it is published, "
                "PostgreSQL refuses its UPDATEs and DELETEs. Run ALTER TABLE "
                f"{table.ref.sql} REPLICA IDENTITY FULL (or add a primary key)"
            )
        logger.warning(
            "partial before images table=%s replica_identity=%s key=%s: updates and deletes "
            "carry only the key columns as their before image, and an update that leaves the "
            "key alone carries none; an update that changes an address or user id kept outside "
            "the key cannot name the old endpoint, which then stays (opted in if it was). "
            "Fix: ALTER TABLE %s REPLICA IDENTITY FULL",
            name,
            "index" if table.identity == "i" else "default",
            ",".join(table.key),
            table.ref.sql,
        )
    return tables


def _describe(cur: Any, ref: TableRef) -> TableInfo:
    row = _one(
        cur,
        "SELECT c.oid, c.relkind, c.relreplident, c.relfilenode, c.reltuples, c.relpages, "
        "has_table_privilege(c.oid, 'SELECT') "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (ref.schema, ref.name),
    )
    if row is None:
        raise ConfigError(
            f"table {ref.qualified} does not exist (or the capture role cannot see its schema: "
            f"GRANT USAGE ON SCHEMA {quote_ident(ref.schema)} TO <user>)"
        )
    oid, kind, identity, relfilenode, reltuples, relpages, can_select = row
    if kind != "r":
        raise ConfigError(
            f"{ref.qualified} is not an ordinary table (relkind {kind!r}): capture its "
            "partitions or the tables behind the view"
        )
    if not can_select:
        raise ConfigError(
            f"the capture role may not read {ref.qualified}: GRANT SELECT ON {ref.sql} TO <user>"
        )
    cur.execute(
        "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
        "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        (oid,),
    )
    attributes = cur.fetchall()
    columns = tuple(r[0] for r in attributes)
    column_types = tuple(int(r[1]) for r in attributes)
    cur.execute(
        "SELECT i.indisprimary, array_agg(a.attname ORDER BY k.ord), "
        "array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) "
        "FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = %s AND (i.indisprimary OR i.indisreplident) "
        "GROUP BY i.indexrelid, i.indisprimary",
        (oid,),
    )
    keys = {bool(primary): (tuple(names), tuple(types)) for primary, names, types in cur}
    # REPLICA IDENTITY USING INDEX: that index is what the log sends; otherwise the primary key.
    chosen = keys.get(False) if identity == "i" else keys.get(True)
    key, key_types = chosen or ((), ())
    return TableInfo(
        ref=ref,
        oid=oid,
        identity=identity,
        relfilenode=relfilenode,
        estimated_rows=int(reltuples) if reltuples >= 0 else None,
        estimated_pages=int(relpages),
        columns=columns,
        column_types=column_types,
        key=key,
        key_types=key_types,
    )


def ensure_publication(cur: Any, name: str, tables: Sequence[TableInfo], user: str) -> None:
    """Create the publication, or add the missing tables to it; ``ConfigError`` when not allowed.

    Tables that left the configuration are removed from a publication capture owns.
    """
    wanted = {t.ref.qualified: t.ref for t in tables}
    listing = ", ".join(t.ref.sql for t in tables)
    row = _one(
        cur,
        "SELECT p.pubowner = (SELECT oid FROM pg_roles WHERE rolname = current_user), "
        "p.puballtables, p.pubinsert, p.pubupdate, p.pubdelete FROM pg_publication p "
        "WHERE p.pubname = %s",
        (name,),
    )
    if row is None:
        try:
            cur.execute(
                f"CREATE PUBLICATION {quote_ident(name)} FOR TABLE {listing} "
                f"WITH (publish = '{PUBLISH}')"
            )
        except Exception as exc:
            if getattr(exc, "pgcode", None) != "42501":
                raise
            raise ConfigError(
                f"role {user!r} may not create publication {name!r} ({_first(exc)}): ask the "
                f"tables' owner to run CREATE PUBLICATION {quote_ident(name)} FOR TABLE "
                f"{listing}; capture then uses it as it is"
            ) from exc
        logger.info("publication created publication=%s tables=%s", name, ",".join(wanted))
        return
    owned, all_tables, pub_insert, pub_update, pub_delete = row
    if not (pub_insert and pub_update and pub_delete):
        raise ConfigError(
            f"publication {name!r} does not publish every insert, update and delete: "
            f"ALTER PUBLICATION {quote_ident(name)} SET (publish = '{PUBLISH}')"
        )
    if all_tables:
        return
    cur.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
    )
    present = {f"{schema}.{table}" for schema, table in cur.fetchall()}
    missing = [ref for qualified, ref in wanted.items() if qualified not in present]
    extra = sorted(present - set(wanted))
    if missing:
        statement = (
            f"ALTER PUBLICATION {quote_ident(name)} ADD TABLE {', '.join(r.sql for r in missing)}"
        )
        if not owned:
            raise ConfigError(
                f"publication {name!r} lacks {', '.join(r.qualified for r in missing)} and role "
                f"{user!r} does not own it: ask its owner to run {statement}"
            )
        cur.execute(statement)
        logger.info(
            "publication tables added publication=%s tables=%s",
            name,
            ",".join(r.qualified for r in missing),
        )
    if extra and owned:
        refs = [parse_table(q) for q in extra]
        cur.execute(
            f"ALTER PUBLICATION {quote_ident(name)} DROP TABLE {', '.join(r.sql for r in refs)}"
        )
        logger.info("publication tables removed publication=%s tables=%s", name, ",".join(extra))


def publication_columns(
    cur: Any, publication: str, table: TableInfo
) -> tuple[tuple[str, ...], str | None]:
    """The columns the publication sends for ``table`` (PG 15 column lists) and its row filter."""
    if _one(cur, "SELECT current_setting('server_version_num')::int")[0] < 150000:
        return table.columns, None
    row = _one(
        cur,
        "SELECT attnames, rowfilter FROM pg_publication_tables "
        "WHERE pubname = %s AND schemaname = %s AND tablename = %s",
        (publication, table.ref.schema, table.ref.name),
    )
    if row is None or row[0] is None:
        return table.columns, None
    names = set(row[0])
    return tuple(c for c in table.columns if c in names), row[1]


def slot_info(cur: Any, slot: str) -> dict[str, Any] | None:
    """The slot's row of ``pg_replication_slots`` (every column this server has), or None."""
    row = _one(cur, "SELECT to_jsonb(s) FROM pg_replication_slots s WHERE slot_name = %s", (slot,))
    return None if row is None else dict(row[0])


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
