"""Reads a PostgreSQL source for ``optsync reconcile``: capture's catalog look-ups, publication
columns and ``COPY`` text conversion (``TableReader``), so a row reads as capture reads it.

A keyed table is read in key order, one autocommit chunk at a time; a table without a key by
ranges of heap pages inside one REPEATABLE READ transaction (an update moves a row to another
page, so separate reads could miss it or read it twice). No slot, no lock beyond the plain
reads' ACCESS SHARE.

The log's position is ``pg_current_wal_insert_lsn()`` as a load position: a transaction that
commits after it was read has a commit LSN at or after it, and its events (ordinals from 1)
sort after the repair (ordinal 0 plus ``REPAIR_SUFFIX``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from optsync.capture.postgres.connection import check_url, connect, quote_ident, translated
from optsync.capture.postgres.position import load_position, parse_lsn
from optsync.capture.postgres.preflight import (
    TableInfo,
    describe_tables,
    parse_table,
    publication_columns,
)
from optsync.capture.postgres.snapshot import TableReader
from optsync.capture.postgres.values import TypeCatalog, TypeInfo
from optsync.events import ChangeEvent, Op, Row
from optsync.reconcile.base import SourceReader, TableRef

__all__ = ("PostgresReader",)


class PostgresReader(SourceReader):
    """Rows of the captured tables of a PostgreSQL source."""

    def __init__(self, url: str, table_names: Sequence[str], name: str, publication: str) -> None:
        check_url(url)
        self.name = name
        self.publication = publication
        refs = [parse_table(t) for t in table_names]
        with translated(name, "connect"):
            self._conn = connect(url, f"optsync-reconcile-{name}"[:63])
        self._catalog = TypeCatalog(self._fetch_types)
        with translated(name, "inspect tables"):
            cur = self._conn.cursor()
            self._tables = {(i.ref.schema, i.ref.name): i for i in describe_tables(cur, refs)}

    def tables(self) -> Sequence[TableRef]:
        return [TableRef(i.ref.schema, i.ref.name, bool(i.key)) for i in self._tables.values()]

    def _reader(self, table: TableRef, cur: Any) -> TableReader:
        info = self._tables[table.schema, table.name]
        columns, row_filter = publication_columns(cur, self.publication, info)
        types = dict(zip(info.columns, info.column_types, strict=True))
        converters = self._catalog.converters(types[c] for c in columns)
        return TableReader(cur, info, columns, converters, row_filter)

    def count(self, table: TableRef) -> int | None:
        return self._tables[table.schema, table.name].estimated_rows

    def chunks(self, table: TableRef, size: int) -> Iterator[list[ChangeEvent]]:
        info = self._tables[table.schema, table.name]
        with translated(self.name, "read rows"):
            cur = self._conn.cursor()
            if not info.key:
                cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            reader = self._reader(table, cur)
        try:
            after: tuple[str | None, ...] | None = None
            page = 0
            while True:
                with translated(self.name, "read rows"):
                    chunk = reader.read(after, page, size)
                if chunk.rows:
                    after = chunk.key(len(chunk.rows) - 1)
                    yield [_event(info, row) for row in chunk.rows]
                page = chunk.next_page
                if chunk.done:
                    return
        finally:
            if not info.key:
                with translated(self.name, "read rows"):
                    cur.execute("COMMIT")

    def row(self, table: TableRef, key: Row) -> ChangeEvent | None:
        info = self._tables[table.schema, table.name]
        keys = ", ".join(quote_ident(k) for k in info.key)
        casts = ", ".join(f"CAST(%s AS {t})" for t in info.key_types)
        with translated(self.name, "read a row"):
            reader = self._reader(table, self._conn.cursor())
            found = reader.matching(f"({keys}) = ({casts})", [_param(key.get(k)) for k in info.key])
        return _event(info, found[0]) if found else None

    def position(self, lineage: int | None) -> str:
        with translated(self.name, "read the WAL position"):
            cur = self._conn.cursor()
            cur.execute("SELECT pg_current_wal_insert_lsn()::text")
            return load_position(parse_lsn(str(cur.fetchone()[0])))

    def close(self) -> None:
        self._conn.close()

    def _fetch_types(self, oids: Iterable[int]) -> list[TypeInfo]:
        cur = self._conn.cursor()
        cur.execute(
            "SELECT oid, typname, typtype, typcategory, typelem, typdelim, typbasetype "
            "FROM pg_type WHERE oid = ANY(%s)",
            (list(oids),),
        )
        return [
            TypeInfo(int(o), n, k, c, int(e), d, int(b)) for o, n, k, c, e, d, b in cur.fetchall()
        ]


def _param(value: Any) -> Any:
    """A key value as an event holds it, bound as text PostgreSQL casts to the column's type."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _event(info: TableInfo, row: dict[str, Any]) -> ChangeEvent:
    return ChangeEvent(
        op=Op.LOAD,
        table=info.ref.name,
        key={k: row[k] for k in info.key},
        position="",
        after=row,
        schema=info.ref.schema,
    )
