"""Reads a MySQL/MariaDB source for ``optsync reconcile``: capture's table inspection, key
order and snapshot value conversion, with plain consistent reads (no lock, not even MySQL's
``FLUSH TABLES WITH READ LOCK``).

A keyed table is read in key order, one autocommit ``SELECT ... LIMIT`` per chunk (each its own
consistent read); a table without a key in one consistent-snapshot transaction ordered by
every column, as the snapshot reads it (an update would move a row in that order).

Positions carry a *lineage* (``optsync.capture.mysql.position``): a repair must use the one of
the capture that feeds the engine, or a later log change of an older lineage would lose to it.
``position`` takes it from the caller, who reads it off the positions the engine holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pymysql
import pymysql.cursors

from optsync.capture.mysql.connection import SourceURL, connect, query, translated
from optsync.capture.mysql.position import load_position
from optsync.capture.mysql.preflight import ServerInfo, TableInfo, inspect_tables, quote
from optsync.capture.mysql.snapshot import Snapshot
from optsync.capture.mysql.values import cursor_param, snapshot_converter
from optsync.errors import Fatal
from optsync.events import ChangeEvent, Op, Row
from optsync.reconcile.base import SourceReader, TableRef

__all__ = ("MySQLReader",)

_SESSION = (
    "SET SESSION time_zone = '+00:00'",  # TIMESTAMP values as UTC, as the snapshot reads them
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET SESSION max_sort_length = 8388608",  # order long values fully (keyless tables)
)


class MySQLReader(SourceReader):
    """Rows of the captured tables of a MySQL/MariaDB source."""

    def __init__(self, url: str, table_names: Sequence[str], name: str) -> None:
        self.name = name
        self.url = SourceURL.parse(url, name)
        self._conn = connect(self.url, name, raw=True)
        with translated(name, "inspect tables", self.url):
            for statement in _SESSION:
                query(self._conn, statement)
            (version,) = query(self._conn, "SELECT VERSION()")[0]
            self._tables = inspect_tables(self._conn, self.url, name, table_names)
        mariadb = "mariadb" in str(version).lower()
        # Only the ordering SQL of the snapshot is used: no pass, no lock, no state.
        server = ServerInfo(str(version), mariadb, 0, lock_free_snapshot=True, row_metadata=True)
        self._snapshot = Snapshot(name, server, self._tables, chunk_size=1)

    def tables(self) -> Sequence[TableRef]:
        return [TableRef(t.schema, t.name, keyed=bool(t.key)) for t in self._tables.values()]

    def _info(self, table: TableRef) -> TableInfo:
        return self._tables[f"{table.schema}.{table.name}"]

    def count(self, table: TableRef) -> int | None:
        info = self._info(table)
        with translated(self.name, "count rows", self.url):
            rows = query(
                self._conn,
                "SELECT table_rows FROM information_schema.tables "
                "WHERE table_schema = %s AND table_name = %s",
                (info.schema, info.name),
            )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def chunks(self, table: TableRef, size: int) -> Iterator[list[ChangeEvent]]:
        info = self._info(table)
        convert = _converter(info)
        if not info.index_ordered:
            yield from self._one_pass(info, convert, size)
            return
        cursor: tuple[Any, ...] | None = None
        while True:
            sql, params = self._snapshot._select(info, cursor, size)
            with translated(self.name, "read rows", self.url):
                rows = query(self._conn, sql, params)
            if not rows:
                return
            events = [_event(info, convert(raw)) for raw in rows]
            last = events[-1].after or {}
            cursor = tuple(last[k] for k in info.cursor_columns)
            yield events
            if len(rows) < size:
                return

    def _one_pass(
        self, info: TableInfo, convert: Callable[[Sequence[Any]], dict[str, Any]], size: int
    ) -> Iterator[list[ChangeEvent]]:
        sql, params = self._snapshot._select(info, None, None)
        with translated(self.name, "read rows", self.url):
            query(self._conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            cur = self._conn.cursor(pymysql.cursors.SSCursor)
            try:
                cur.execute(sql, params)
                while rows := cur.fetchmany(size):
                    yield [_event(info, convert(raw)) for raw in rows]
            finally:
                cur.close()
                query(self._conn, "COMMIT")

    def row(self, table: TableRef, key: Row) -> ChangeEvent | None:
        info = self._info(table)
        where = " AND ".join(f"{quote(k)} <=> %s" for k in info.key)
        params = [cursor_param(info.column(k).kind, key.get(k)) for k in info.key]
        columns = ", ".join(quote(c.name) for c in info.columns)
        sql = f"SELECT {columns} FROM {quote(info.schema)}.{quote(info.name)} WHERE {where}"
        with translated(self.name, "read a row", self.url):
            rows = query(self._conn, sql, params)
        return _event(info, _converter(info)(rows[0])) if rows else None

    def position(self, lineage: int | None) -> str:
        with translated(self.name, "read the binlog position", self.url):
            try:
                rows = query(self._conn, "SHOW BINARY LOG STATUS")
            except pymysql.err.ProgrammingError:
                rows = query(self._conn, "SHOW MASTER STATUS")
        if not rows:
            raise Fatal(f"source {self.name!r}: SHOW MASTER STATUS is empty: is log_bin on?")
        return load_position(lineage or 0, str(rows[0][0]), int(rows[0][1]))

    def close(self) -> None:
        if self._conn.open:
            self._conn.close()


def _converter(info: TableInfo) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """Server text -> event values, exactly as the snapshot converts them."""
    names = [c.name for c in info.columns]
    fixes = [
        (i, c.name, fn)
        for i, c in enumerate(info.columns)
        if (fn := snapshot_converter(c.kind, c.fsp)) is not None
    ]

    def convert(raw: Sequence[Any]) -> dict[str, Any]:
        values = dict(zip(names, raw, strict=True))
        for i, name, fn in fixes:
            if raw[i] is not None:
                values[name] = fn(raw[i])
        return values

    return convert


def _event(info: TableInfo, values: dict[str, Any]) -> ChangeEvent:
    key = {k: values[k] for k in info.key} if info.key else values
    return ChangeEvent(
        op=Op.LOAD, table=info.name, key=key, position="", after=values, schema=info.schema
    )
