"""Chunked reads of one table inside the snapshot transaction, as ``COPY ... TO STDOUT`` text.

A table with a key (primary key, or the replica identity index) is read in key order, ``limit``
rows after the last key read (keyset pagination on the key's index); the cursor is the last
key's text, cast back to the key types. A table without a key (REPLICA IDENTITY FULL) is read
by ranges of heap pages (``ctid`` between ``(first,0)`` and ``(last,0)``, a TID range scan),
sized from the rows per page seen so far; the cursor is the next page. Pages added after the
snapshot began hold only rows the snapshot cannot see, so the relation's size in pages at the
start of the table bounds the scan.

COPY text is the same output-function text pgoutput sends, so one converter per type serves
both (``postgres_values``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from optsync.capture.postgres.connection import quote_ident
from optsync.capture.postgres.position import load_position
from optsync.capture.postgres.preflight import TableInfo
from optsync.capture.postgres.values import Converter, converts, parse_copy_line
from optsync.events import ChangeEvent, Op

__all__ = ("Chunk", "TableReader", "load_events")

_DEFAULT_ROWS_PER_PAGE: Final = 60


@dataclass(frozen=True)
class Chunk:
    rows: list[dict[str, Any]]
    fields: list[list[str | None]]
    """Each row's field texts, to save the key cursor after any row."""
    key_index: tuple[int, ...]
    next_page: int
    """Keyless tables: the first page not read yet."""
    done: bool

    def key(self, row: int) -> tuple[str | None, ...] | None:
        """The key text of row number ``row`` (None for a table without a key)."""
        if not self.key_index:
            return None
        fields = self.fields[row]
        return tuple(fields[i] for i in self.key_index)


class TableReader:
    """Reads ``table`` chunk by chunk with the snapshot connection's cursor."""

    def __init__(
        self,
        cur: Any,
        table: TableInfo,
        columns: Sequence[str],
        converters: Sequence[Converter],
        row_filter: str | None,
    ) -> None:
        self.cur = cur
        self.table = table
        self.columns = tuple(columns)
        self.converters = tuple(converters)
        self.row_filter = row_filter
        self.key_index = tuple(self.columns.index(k) for k in table.key)
        self._converted = tuple(
            (i, name, convert)
            for i, (name, convert) in enumerate(zip(self.columns, self.converters, strict=True))
            if converts(convert)
        )
        self._select = (
            f"SELECT {', '.join(quote_ident(c) for c in self.columns)} FROM {table.ref.sql}"
        )
        self._rows_per_page = (
            max(1.0, table.estimated_rows / table.estimated_pages)
            if table.estimated_rows and table.estimated_pages
            else float(_DEFAULT_ROWS_PER_PAGE)
        )
        self.pages = 0
        if not table.key:
            cur.execute(
                "SELECT pg_relation_size(%s) / current_setting('block_size')::bigint",
                (table.oid,),
            )
            self.pages = int(cur.fetchone()[0])

    def count(self) -> int:
        """The rows the snapshot holds (an exact count: a full scan)."""
        where = f" WHERE {self.row_filter}" if self.row_filter else ""
        self.cur.execute(f"SELECT count(*) FROM {self.table.ref.sql}{where}")
        return int(self.cur.fetchone()[0])

    def read(self, after: Sequence[str | None] | None, page: int, limit: int) -> Chunk:
        """The next chunk: rows after the key ``after`` (keyed) or from ``page`` (keyless)."""
        if self.table.key:
            return self._keyed(after, limit)
        return self._pages(page, limit)

    def _keyed(self, after: Sequence[str | None] | None, limit: int) -> Chunk:
        keys = ", ".join(quote_ident(k) for k in self.table.key)
        where: list[str] = []
        params: list[Any] = []
        if after is not None:
            casts = ", ".join(f"CAST(%s AS {t})" for t in self.table.key_types)
            where.append(f"({keys}) > ({casts})")
            params.extend(after)
        if self.row_filter:
            where.append(f"({_escaped(self.row_filter)})")
        sql = _escaped(self._select)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {keys} LIMIT {int(limit)}"
        raw = self._copy(sql, params)
        rows = [self._row(fields) for fields in raw]
        return Chunk(rows, raw, self.key_index, 0, len(raw) < limit)

    def _pages(self, page: int, limit: int) -> Chunk:
        rows: list[dict[str, Any]] = []
        while page < self.pages and not rows:
            count = max(1, int(limit / self._rows_per_page))
            last = min(page + count, self.pages)
            where = f"ctid >= '({page},0)'::tid AND ctid < '({last},0)'::tid"
            if self.row_filter:
                where += f" AND ({_escaped(self.row_filter)})"
            raw = self._copy(f"{_escaped(self._select)} WHERE {where}", [])
            rows = [self._row(fields) for fields in raw]
            if raw:  # learn the table's density, so the next range holds about ``limit`` rows
                self._rows_per_page = max(1.0, len(raw) / (last - page))
            page = last
        return Chunk(rows, [], (), page, page >= self.pages)

    def matching(self, condition: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """The rows matching an SQL ``condition`` with ``%s`` placeholders (reconcile reads one
        row again by its key this way, converted as the snapshot converts it)."""
        raw = self._copy(f"{_escaped(self._select)} WHERE {condition}", params)
        return [self._row(fields) for fields in raw]

    def _copy(self, sql: str, params: Sequence[Any]) -> list[list[str | None]]:
        query = self.cur.mogrify(sql, params).decode() if params else sql.replace("%%", "%")
        buffer = io.StringIO()
        self.cur.copy_expert(f"COPY ({query}) TO STDOUT", buffer)
        text = buffer.getvalue()
        if not text:
            return []
        return [
            line.split("\t") if "\\" not in line else parse_copy_line(line)  # type: ignore[misc]
            for line in text[:-1].split("\n")
        ]

    def _row(self, fields: Sequence[str | None]) -> dict[str, Any]:
        if len(fields) != len(self.columns):
            raise ValueError(f"COPY gave {len(fields)} fields for {len(self.columns)} columns")
        row: dict[str, Any] = dict(zip(self.columns, fields, strict=True))
        for i, name, convert in self._converted:
            value = fields[i]
            if value is not None:
                row[name] = convert(value)
        return row


def load_events(
    info: TableInfo, rows: list[dict[str, Any]], at: int, first: int
) -> list[ChangeEvent]:
    """Load events of ``rows``, the ``first``-th row of the table onwards."""
    key, table, schema = info.key, info.ref.name, info.ref.schema
    if key:
        position = load_position(at)
        return [
            ChangeEvent(
                op=Op.LOAD,
                table=table,
                key={k: row[k] for k in key},
                position=position,
                after=row,
                schema=schema,
            )
            for row in rows
        ]
    return [
        ChangeEvent(
            op=Op.LOAD,
            table=table,
            key={},
            position=load_position(at, first + i),
            after=row,
            schema=schema,
        )
        for i, row in enumerate(rows)
    ]


def _escaped(sql: str) -> str:
    """SQL text with its ``%`` doubled, for ``mogrify``."""
    return sql.replace("%", "%%")
