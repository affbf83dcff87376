"""The snapshot: every row of the captured tables as ``load`` events, without a global lock.

The snapshot reads in *passes*. A pass is one ``START TRANSACTION WITH CONSISTENT SNAPSHOT``:
MariaDB (and Percona Server) report the binlog coordinates of exactly that read view in
``Binlog_snapshot_file`` / ``Binlog_snapshot_position``, so no lock is taken at all. On MySQL,
which has no such status, a pass takes ``FLUSH TABLES WITH READ LOCK`` only while it starts the
transaction and reads ``SHOW MASTER STATUS`` (milliseconds), then unlocks.

- A keyed table (see ``TableInfo``) is read in key order, one pass per ``chunk_size`` rows:
  ``WHERE key > cursor ORDER BY key LIMIT chunk_size``, an index range scan. A pass holds the
  table's metadata lock only while it reads its chunk, so an application's ``ALTER TABLE``
  waits for one chunk, not for the whole snapshot, and no read view stays open for long.
- A table without a key is read in one pass ordered by every column (strings compared as
  binary UTF-8 without padding, ``max_sort_length`` raised so long values order fully): the
  server sorts it once and streams it. Such a table's pass holds its metadata lock and read
  view for the whole table.
- Every pass gets fresh coordinates; its rows are ``load`` events at those coordinates. The
  log starts at the *first* pass's coordinates. A row changed after an earlier pass began but
  before its own pass was read is read from the log too, and the load (newer position) wins;
  a row changed after its own pass is a log event with a newer position than its load.
- Each batch's state holds the table and the key of its last row (the *cursor*), so a
  snapshot interrupted anywhere resumes with a new pass after the last row it yielded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import pymysql
import pymysql.cursors
from msgspec.structs import replace

from optsync.capture.base import Progress
from optsync.capture.mysql.connection import query
from optsync.capture.mysql.position import CaptureState, LogPosition, load_position
from optsync.capture.mysql.preflight import ServerInfo, TableInfo, quote
from optsync.capture.mysql.values import ColumnKind, cursor_param, snapshot_converter
from optsync.errors import Fatal
from optsync.events import ChangeEvent, Op

__all__ = ("Snapshot",)

logger = logging.getLogger(__name__)

_SESSION: Final = (
    "SET SESSION time_zone = '+00:00'",  # TIMESTAMP values as UTC
    "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET SESSION net_write_timeout = 3600",  # the pipeline works between fetches
    "SET SESSION max_sort_length = 8388608",  # order long values fully (keyless tables)
)
_TEXT_ORDER_KINDS: Final = frozenset({ColumnKind.TEXT, ColumnKind.SET, ColumnKind.JSON})

Batch = tuple[list[ChangeEvent], CaptureState]


class Snapshot:
    """Reads the tables the state has not finished, yielding (events, state) per batch."""

    def __init__(
        self,
        source: str,
        server: ServerInfo,
        tables: Mapping[str, TableInfo],
        chunk_size: int,
    ) -> None:
        self.source = source
        self.server = server
        self.tables = tables
        self.chunk_size = chunk_size
        self._bin = "utf8mb4_nopad_bin" if server.mariadb else "utf8mb4_0900_bin"

    def run(
        self,
        conn: pymysql.Connection[Any],
        state: CaptureState,
        max_events: int,
        progress: Progress | None,
    ) -> Iterator[Batch]:
        for statement in _SESSION:
            query(conn, statement)
        pending = [name for name in self.tables if name not in state.tables_done]
        if state.table in pending:
            pending.remove(state.table)
            pending.insert(0, state.table)
        batch = max(1, min(self.chunk_size, max_events))
        for name in pending:
            table = self.tables[name]
            resume = state.table == name and state.key == table.cursor_columns
            state = replace(
                state,
                table=name,
                key=table.cursor_columns,
                cursor=state.cursor if resume else None,
                loaded=state.loaded if resume else 0,
            )
            logger.info(
                "snapshot table source=%s table=%s key=%s resumed=%s",
                self.source,
                name,
                table.key_source,
                resume and state.cursor is not None,
            )
            expected: list[int] = []  # counted by the first pass, in its read view
            while True:
                limit = self.chunk_size if table.index_ordered else None
                read = 0
                passing = self._pass(conn, table, state, limit, batch, expected, progress)
                for events, after in passing:
                    state = after
                    read += len(events)
                    if progress is not None:
                        progress(name, state.loaded, expected[0])
                    yield events, state
                if limit is None or read < limit:
                    break
            if progress is not None:
                progress(name, state.loaded, max(state.loaded, *expected))
            state = replace(
                state,
                tables_done=(*state.tables_done, name),
                table=None,
                key=(),
                cursor=None,
                loaded=0,
            )
            yield [], state
        yield [], replace(state, phase="log")

    def _pass(
        self,
        conn: pymysql.Connection[Any],
        table: TableInfo,
        state: CaptureState,
        limit: int | None,
        batch: int,
        expected: list[int],
        progress: Progress | None,
    ) -> Iterator[tuple[list[ChangeEvent], CaptureState]]:
        """One consistent-snapshot transaction reading ``table`` after the state's cursor.

        Yields per batch of rows; a pass that reads no row yields one empty batch, so the
        state (a first pass sets the log start) is never lost. The first pass of a table
        counts its rows into ``expected`` (once: a count per chunk would scan it each time).
        """
        file, offset = self._begin(conn)
        cur: pymysql.cursors.SSCursor | None = None
        try:
            if state.log is None or state.lineage is None:
                state = self._first(conn, state, file, offset)
            assert state.lineage is not None
            position = load_position(state.lineage, file, offset)
            if not expected:
                expected.append(int(query(conn, f"SELECT COUNT(*) FROM {_name(table)}")[0][0]))
                if progress is not None:
                    progress(f"{table.qualified}", state.loaded, expected[0])
            sql, params = self._select(table, state.cursor, limit)
            convert = _row_converter(table)
            key = table.cursor_columns
            cur = conn.cursor(pymysql.cursors.SSCursor)
            cur.execute(sql, params)
            read = 0
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                events = []
                for raw in rows:
                    values = convert(raw)
                    events.append(
                        ChangeEvent(
                            op=Op.LOAD,
                            table=table.name,
                            key={k: values[k] for k in table.key} if table.key else values,
                            position=position,
                            after=values,
                            schema=table.schema,
                        )
                    )
                last = events[-1].after or {}
                state = replace(
                    state,
                    cursor=tuple(last[k] for k in key),
                    loaded=state.loaded + len(events),
                )
                read += len(events)
                yield events, state
            cur.close()
            cur = None
            query(conn, "COMMIT")
            if not read:
                yield [], state
        except GeneratorExit:
            # Stopped mid-pass: drop the connection rather than read the rest of the result.
            conn.close()
            raise
        finally:
            if cur is not None and conn.open:
                conn.close()  # an error mid-result: the connection is not reusable

    def _begin(self, conn: pymysql.Connection[Any]) -> tuple[str, int]:
        """Start a consistent-snapshot transaction; its binlog coordinates."""
        if self.server.lock_free_snapshot:
            query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            status = {
                str(k).lower(): v for k, v in query(conn, "SHOW STATUS LIKE 'binlog_snapshot_%'")
            }
            return str(status["binlog_snapshot_file"]), int(status["binlog_snapshot_position"])
        # MySQL: no snapshot coordinates; a global read lock held for milliseconds fixes them.
        query(conn, "FLUSH TABLES WITH READ LOCK")
        try:
            query(conn, "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            try:
                rows = query(conn, "SHOW BINARY LOG STATUS")
            except pymysql.err.ProgrammingError:
                rows = query(conn, "SHOW MASTER STATUS")
        finally:
            query(conn, "UNLOCK TABLES")
        if not rows:
            raise Fatal(f"source {self.source!r}: SHOW MASTER STATUS is empty: is log_bin on?")
        return str(rows[0][0]), int(rows[0][1])

    def _first(
        self, conn: pymysql.Connection[Any], state: CaptureState, file: str, offset: int
    ) -> CaptureState:
        """The first pass of a capture: the log starts here, a new lineage begins."""
        gtid = None
        if self.server.mariadb:
            gtid = str(query(conn, "SELECT BINLOG_GTID_POS(%s, %s)", (file, offset))[0][0] or "")
        (now,) = query(conn, "SELECT UNIX_TIMESTAMP()")[0]
        log = LogPosition(file, offset, gtid)
        logger.info(
            "snapshot coordinates source=%s file=%s pos=%d gtid=%s lineage=%s",
            self.source,
            file,
            offset,
            gtid,
            # as a time: a bare ten-digit number would be masked as a phone number
            datetime.fromtimestamp(int(now), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        return replace(state, lineage=int(now), server_id=self.server.server_id, log=log)

    def _select(
        self, table: TableInfo, cursor: Sequence[Any] | None, limit: int | None
    ) -> tuple[str, list[Any]]:
        columns = ", ".join(quote(c.name) for c in table.columns)
        key = [table.column(name) for name in table.cursor_columns]
        if table.index_ordered:
            exprs = [quote(c.name) for c in key]
        else:
            exprs = [self._order_expr(c.kind, c.enum, quote(c.name)) for c in key]
        where, params = "", []
        if cursor is not None:
            values = [cursor_param(c.kind, v) for c, v in zip(key, cursor, strict=True)]
            clauses = []
            for i, value in enumerate(values):
                parts = []
                for expr, earlier in zip(exprs[:i], values[:i], strict=True):
                    parts.append(f"{expr} <=> %s")
                    params.append(earlier)
                if value is None:
                    parts.append(f"{exprs[i]} IS NOT NULL")  # NULL sorts first
                else:
                    parts.append(f"{exprs[i]} > %s")
                    params.append(value)
                clauses.append("(" + " AND ".join(parts) + ")")
            where = " WHERE " + " OR ".join(clauses)
        sql = f"SELECT {columns} FROM {_name(table)}{where} ORDER BY {', '.join(exprs)}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql, params

    def _order_expr(self, kind: ColumnKind, enum: bool, column: str) -> str:
        """A column as a keyless table is ordered: a total order the WHERE clause agrees with."""
        if kind in _TEXT_ORDER_KINDS or enum:
            return f"CONVERT({column} USING utf8mb4) COLLATE {self._bin}"
        if kind is ColumnKind.BIT:
            return f"({column} + 0)"
        return column


def _name(table: TableInfo) -> str:
    return f"{quote(table.schema)}.{quote(table.name)}"


def _row_converter(table: TableInfo) -> Callable[[Sequence[Any]], dict[str, Any]]:
    names = [c.name for c in table.columns]
    fixes = [
        (i, c.name, fn)
        for i, c in enumerate(table.columns)
        if (fn := snapshot_converter(c.kind, c.fsp)) is not None
    ]

    def convert(raw: Sequence[Any]) -> dict[str, Any]:
        values = dict(zip(names, raw, strict=True))
        for i, name, fn in fixes:
            value = raw[i]
            if value is not None:
                values[name] = fn(value)
        return values

    return convert
