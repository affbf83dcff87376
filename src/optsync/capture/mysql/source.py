"""``MySQLSource``: change capture from MySQL and MariaDB (DMS' role), snapshot then binlog.

``open`` runs the preflight (``mysql_preflight``: server settings, grants, tables); ``batches``
reads a snapshot of every captured table (``mysql_snapshot``), then the binlog from the
snapshot's coordinates (``mysql_log``, on ``mysql-replication``). The capture state saved with
the stream (``mysql_position.CaptureState``) says where to resume. This is the shape of
``SQLiteSource``, with the binlog in the place of the change table.

Positions
---------
A position must order every change of one source as text, loads included, and across
restarts. MariaDB GTIDs (``domain-server-sequence``) cannot do that: sequence numbers of two
domains are unrelated, and the binlog interleaves them. Binlog coordinates can: on one server,
``file:offset`` is the binlog's own order, whatever the domains. So a position is::

    LLLLLLLLLL:FFFFFFFFFF:OOOOOOOOOO[:RRRRRRRR]

``F:O`` the binlog file number and the offset where the row's rows event starts, ``R`` the row
in the event; a load has no ``R`` and its ``F:O`` is the snapshot's coordinates, so it sorts
after every change the snapshot saw and before every change it did not (``mysql_position``
proves it). ``L``, the lineage, is the source server's clock when capture started reading a
binlog history: after a re-snapshot, after starting at a given position, or when the source is
another server (``@@server_id`` changed: a failover on MariaDB, where the GTID still says where
to resume), the new lineage outranks everything written before, so the engine's position guard
keeps working when binlog coordinates start over (``RESET MASTER``, another server's files).
The GTID is not lost: it is each event's ``transaction_id`` and the resume token.

Resume and the checkpoint
-------------------------
Every batch's state holds the last *transaction boundary* the batch (or an earlier one) read to
the end: MariaDB's GTID position (one GTID per domain) plus its ``file:offset``. MariaDB
resumes by GTID only (``is_mariadb=True, auto_position=...``: the library ignores
``log_file``/``log_pos`` there, its issue #618); MySQL resumes by ``file:offset``. A batch may
end inside a large transaction; the state then still points before it, the transaction is read
again after a restart, and its events come again with the same positions: the stream stores an
event once per (partition key, position). ``acknowledge`` has nothing to release (the server's
binlog retention decides what stays), so the state is saved only with the stream, after the
events are durable.

Position lost
-------------
If the binlog no longer holds the transactions after the saved position (purged by
``binlog_expire_logs_seconds``/``PURGE BINARY LOGS``, or ``RESET MASTER``), ``open`` raises
``PositionLost`` before reading a single event: it compares the saved GTID position with the
GTID position at the start of the oldest binlog file (MariaDB; on MySQL the saved file with the
oldest one) and names the missing range. A server refusal (error 1236) while reading is the
same error. The two ways out are in the message: a re-snapshot (``resnapshot_state``, wired to
``optsync capture --resnapshot``), or a new start position (``state_at``) that accepts the gap.

Snapshot
--------
``mysql_snapshot``: consistent-snapshot passes, no global lock on MariaDB, chunked by key,
resumable after the last row of the last batch. How a row is keyed:

- the PRIMARY KEY; else the smallest UNIQUE index with only NOT NULL, whole columns (the one
  InnoDB clusters by);
- else (the AWS sample's ``optin_status``) *every column*: the key is the whole row. Two
  identical rows are then one key: their loads are stored once (same key, same position), and
  the mapping gives them one endpoint anyway. Updates of such a table stay updates (with
  before and after images), since every update changes "the key".

An UPDATE that changes a key column of a keyed table is written as a delete of the old key and
an insert of the new one, so each key's events stay in one partition, in order.

Schema changes
--------------
With ``binlog_row_metadata=FULL`` every table map event names its columns, and each row is
decoded with the columns of its own table map: rows written before an ``ALTER TABLE ... ADD/
DROP/MODIFY COLUMN`` keep their old columns, rows after it have the new ones, whenever they are
read. Nothing is cached across table maps. DDL on a captured table is logged at INFO.

Values
------
``mysql_values``: JSON values, the same from a snapshot and from the binlog (TIMESTAMP as UTC
instants ``...Z``, DATETIME as stored, DECIMAL as exact strings, zero dates as ``0000-00-00``).

Lag and heartbeats
------------------
The state's ``source_time`` is the UTC time the capture has read the source up to: the commit
time of the last transaction read (any table's, so a quiet captured table on a busy server
still moves), or, when the server has nothing more to send, the time of its heartbeat (the
binlog connection asks for one every ``HEARTBEAT`` second of silence). Capture lag is
``now - source_time``: it stays under about a second on an idle server, and grows only when
the capture really is behind. Binlog event times are whole seconds, so lag has a one-second
resolution; ``commit_time`` of events likewise.

MySQL 8
-------
The code paths for MySQL exist and are kept honest, but this machine has no MySQL server, so
they are untested here: no ``Binlog_snapshot_file``, so each snapshot pass takes ``FLUSH
TABLES WITH READ LOCK`` while it starts (milliseconds; needs RELOAD), one pass per table; the
log resumes by ``file:offset`` (GTIDs are carried as transaction ids when ``gtid_mode=ON``);
``binlog_row_metadata=FULL`` needs 8.0.14+; JSON arrives as binary JSON and is printed back as
MySQL prints it; ``SHOW BINARY LOG STATUS`` replaces ``SHOW MASTER STATUS`` on 8.4.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import pymysql
from msgspec.structs import replace

from optsync.capture.base import CaptureBatch, ChangeSource, Progress, check_arguments
from optsync.capture.mysql.connection import (
    PositionLost,
    PreflightFailed,
    SourceURL,
    connect,
    query,
    translated,
)
from optsync.capture.mysql.log import Commit, Failure, Heartbeat, Item, LogReader, Note, iso_time
from optsync.capture.mysql.position import CaptureState, GtidPosition, LogPosition, file_index
from optsync.capture.mysql.preflight import ServerInfo, TableInfo, inspect_tables, preflight
from optsync.capture.mysql.snapshot import Snapshot
from optsync.errors import ConfigError, Retryable
from optsync.events import ChangeEvent

__all__ = ("MySQLSource", "PositionLost", "PreflightFailed", "default_server_id")

logger = logging.getLogger(__name__)

SERVER_ID_BASE: Final = 0x4F000000
RETRY_FIRST: Final = 0.5
RETRY_MAX: Final = 10.0


def default_server_id(name: str) -> int:
    """The replica server id of a capture: stable per source name, in a range of its own."""
    return SERVER_ID_BASE + zlib.crc32(name.encode()) % 0x01000000


class MySQLSource(ChangeSource):
    """Snapshot + binlog of a MySQL or MariaDB source (see the module notes).

    ``url``: ``mysql://user:password@host:port/database`` or ``mariadb://...``. ``tables``:
    ``table`` (in the url's database) or ``database.table``. ``server_id``: the replica id the
    binlog connection uses (default: derived from ``name``; two captures of one server need
    different ones). ``chunk_size``: rows per snapshot pass and at most per batch.
    ``idle_wait``: seconds the log waits for news before yielding an empty batch.
    """

    def __init__(
        self,
        url: str,
        tables: Sequence[str],
        *,
        name: str = "mysql",
        server_id: int | None = None,
        chunk_size: int = 10_000,
        idle_wait: float = 0.2,
    ) -> None:
        check_arguments(tables, chunk_size, idle_wait)
        self.name = name
        self.url = SourceURL.parse(url, name)
        self.table_names = tuple(tables)
        if not self.table_names:
            raise ConfigError(f"source {name!r}: no tables to capture; list at least one")
        unqualified = [t for t in self.table_names if "." not in t]
        if unqualified and self.url.database is None:
            raise ConfigError(
                f"source {name!r}: table {unqualified[0]!r} names no database and the url has "
                "none; write it as database.table or add /database to the url"
            )
        self.server_id = default_server_id(name) if server_id is None else server_id
        if not 0 < self.server_id < 2**32:
            raise ConfigError(f"source {name!r}: server_id must be from 1 to 4294967295")
        self.chunk_size = chunk_size
        self.idle_wait = idle_wait
        self._server: ServerInfo | None = None
        self._tables: Mapping[str, TableInfo] = {}
        self._state = CaptureState()
        self._acknowledged: str | None = None
        self._snapshot_conn: pymysql.Connection[Any] | None = None
        self._reader: LogReader | None = None
        self._opened = False
        self._closed = False

    # -- states the CLI hands to open -------------------------------------------------------

    def resnapshot_state(self) -> str:
        """A state that makes the next ``open`` start a fresh snapshot and a new lineage."""
        return CaptureState(resnapshot=True).dump()

    def state_at(self, position: str) -> str:
        """A state that makes the next ``open`` read the log from ``position``, no snapshot.

        ``position``: a MariaDB GTID position (``0-1-57``, one GTID per domain, comma-separated)
        or MySQL binlog coordinates (``mysql-bin.000042:1234``). Rows changed before it are
        not captured again: use it to accept a gap, after ``PositionLost``.
        """
        text = position.strip()
        file, colon, pos = text.rpartition(":")
        if colon and pos.isdigit() and file:
            log = LogPosition(file, int(pos), None)
        else:
            try:
                GtidPosition.parse(text)
            except ValueError as exc:
                raise ConfigError(
                    f"source {self.name!r}: start position {position!r} is neither a MariaDB "
                    "GTID position (0-1-57) nor binlog coordinates (mysql-bin.000042:1234)"
                ) from exc
            log = LogPosition("", 0, text)
        return CaptureState(
            phase="log", log=log, tables_done=self.table_names, start_at=text
        ).dump()

    # -- open -------------------------------------------------------------------------------

    def open(self, state: str | None) -> None:
        """Preflight the server and tables; prepare to resume from ``state`` (None: start)."""
        if self._opened:
            raise RuntimeError(f"source {self.name!r} is already open")
        saved = CaptureState.parse(state, self.name) if state is not None else None
        conn = connect(self.url, self.name)
        try:
            server = preflight(conn, self.url, self.name, self.server_id)
            tables = inspect_tables(conn, self.url, self.name, self.table_names)
            with translated(self.name, "check the saved position", self.url):
                resumed = self._resume(conn, server, tables, saved)
        finally:
            conn.close()
        self._server, self._tables, self._state = server, tables, resumed
        self._opened, self._closed = True, False  # a source closed for a retry opens again
        logger.info(
            "capture opened source=%s server=%s tables=%s keys=%s phase=%s from=%s",
            self.name,
            server.version,
            ",".join(tables),
            ",".join(t.key_source for t in tables.values()),
            resumed.phase,
            resumed.log.describe() if resumed.log else "a new snapshot",
        )

    def _resume(
        self,
        conn: pymysql.Connection[Any],
        server: ServerInfo,
        tables: Mapping[str, TableInfo],
        saved: CaptureState | None,
    ) -> CaptureState:
        if saved is None or saved.log is None:
            if saved is not None and saved.requested:
                logger.info("capture re-snapshot requested source=%s", self.name)
            return CaptureState()
        if saved.requested:
            logger.info(
                "capture start position given source=%s at=%s", self.name, saved.log.describe()
            )
        qualified = {self._qualify(name) for name in saved.tables_done}
        done = tuple(q for q in tables if q in qualified)
        state = replace(saved, tables_done=done, resnapshot=False, start_at=None)
        if state.table is not None and state.table not in tables:
            state = replace(state, table=None, key=(), cursor=None, loaded=0)
        if state.lineage is None or state.server_id != server.server_id:
            state = self._new_lineage(conn, server, state)
        else:
            self._check_retention(conn, server, saved.log)
        if any(t not in done for t in tables):
            return replace(state, phase="snapshot")
        return replace(state, phase="log")

    def _qualify(self, name: str) -> str:
        return name if "." in name else f"{self.url.database}.{name}"

    def _new_lineage(
        self, conn: pymysql.Connection[Any], server: ServerInfo, state: CaptureState
    ) -> CaptureState:
        """Positions of another binlog history: a lineage that outranks the saved one."""
        assert state.log is not None
        if state.lineage is not None and not (server.mariadb and state.log.gtid is not None):
            raise PositionLost(
                f"source {self.name!r}: position lost: the state was saved reading the binlog "
                f"of server_id {state.server_id}, and this server is server_id "
                f"{server.server_id}; its binlog coordinates mean nothing here. Ways out: "
                "re-snapshot with `optsync capture --resnapshot`, or start at this server's "
                "coordinates with `optsync capture --start-position FILE:POS` (changes in "
                "between are not captured)"
            )
        if state.lineage is None:
            self._check_retention(conn, server, state.log)  # a position given by a person
        else:
            self._check_gtid_retention(conn, state.log)  # another server, same GTIDs
        (now,) = query(conn, "SELECT UNIX_TIMESTAMP()")[0]
        if state.lineage is not None:
            logger.warning(
                "capture source server changed source=%s server_id=%s->%d: resuming at %s "
                "with a new lineage",
                self.name,
                state.server_id,
                server.server_id,
                state.log.describe(),
            )
        return replace(state, lineage=int(now), server_id=server.server_id)

    def _check_retention(
        self, conn: pymysql.Connection[Any], server: ServerInfo, log: LogPosition
    ) -> None:
        """``PositionLost`` if the binlog no longer holds what follows ``log``."""
        if server.mariadb and log.gtid is not None:
            self._check_gtid_retention(conn, log)
            return
        files = [str(row[0]) for row in query(conn, "SHOW BINARY LOGS")]
        if not files or not log.file:
            return
        oldest, newest = files[0], files[-1]
        if file_index(log.file) < file_index(oldest):
            raise self._lost(
                log,
                f"binlog files from {log.file} up to the oldest remaining file {oldest} "
                "(exclusive) were purged",
                f"{oldest}:4",
            )
        if file_index(log.file) > file_index(newest):
            raise self._lost(
                log,
                f"the server's newest binlog file is {newest}: its binlog was reset "
                "(RESET MASTER) or this is another server",
                f"{oldest}:4",
            )

    def _check_gtid_retention(self, conn: pymysql.Connection[Any], log: LogPosition) -> None:
        saved = GtidPosition.parse(log.gtid or "")
        files = [str(row[0]) for row in query(conn, "SHOW BINARY LOGS")]
        if not files:
            return
        (current_text,) = query(conn, "SELECT @@gtid_binlog_pos")[0]
        current = GtidPosition.parse(str(current_text or ""))
        ahead = current.behind(saved)
        if ahead:
            missing = ", ".join(
                f"domain {d} has {theirs}, the server {ours}" for d, (ours, theirs) in ahead.items()
            )
            raise self._lost(
                log,
                f"the server's binlog ends before the saved position ({missing}): its binlog "
                "was reset (RESET MASTER) or this server never had those transactions",
                str(current),
            )
        (oldest_text,) = query(conn, "SELECT BINLOG_GTID_POS(%s, 4)", (files[0],))[0]
        oldest = GtidPosition.parse(str(oldest_text or ""))
        gaps = saved.behind(oldest)
        if gaps:
            ranges = ", ".join(
                f"{d}-{oldest.server_of(d)}-{ours + 1} .. {d}-{oldest.server_of(d)}-{theirs}"
                for d, (ours, theirs) in sorted(gaps.items())
            )
            raise self._lost(
                log,
                f"the oldest binlog file on the server, {files[0]}, begins after GTID position "
                f"{oldest}; the transactions {ranges} were purged before capture read them",
                str(oldest),
            )

    def _lost(self, log: LogPosition, what: str, start: str) -> PositionLost:
        return PositionLost(
            f"source {self.name!r}: position lost: capture stopped after {log.describe()}, "
            f"but {what}. Those changes cannot be read any more. Ways out: re-snapshot with "
            "`optsync capture --resnapshot` (reloads every row; endpoints of rows deleted "
            "meanwhile stay in the target until removed), or accept the gap and read the log "
            f"from a new position with `optsync capture --start-position {start}`"
        )

    # -- batches ----------------------------------------------------------------------------

    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches, a batch that switches the state to the log, then log batches.

        A lost connection is retried here (with backoff, yielding empty batches meanwhile);
        anything else stops the iteration with the error.
        """
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        if not self._opened:
            raise RuntimeError(f"source {self.name!r} is not open")
        delay = RETRY_FIRST
        while not self._closed:
            before = self._state
            try:
                if self._state.phase == "snapshot":
                    yield from self._snapshot(max_events, progress)
                yield from self._log(max_events)
                return
            except Retryable as exc:
                if self._closed:
                    return
                self._stop_reader()
                self._drop_snapshot_connection()
                if self._state != before:
                    delay = RETRY_FIRST  # it made progress since the last failure
                logger.warning("capture retry source=%s in=%.1fs reason=%s", self.name, delay, exc)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and not self._closed:
                    time.sleep(min(self.idle_wait, max(0.0, deadline - time.monotonic())) or 0.01)
                    yield CaptureBatch((), self._state.dump())
                delay = min(RETRY_MAX, delay * 2)

    def _snapshot(self, max_events: int, progress: Progress | None) -> Iterator[CaptureBatch]:
        assert self._server is not None
        snapshot = Snapshot(self.name, self._server, self._tables, self.chunk_size)
        with translated(self.name, "snapshot", self.url):
            if self._snapshot_conn is None or not self._snapshot_conn.open:
                self._snapshot_conn = connect(self.url, self.name, raw=True)
            for events, state in snapshot.run(
                self._snapshot_conn, self._state, max_events, progress
            ):
                if self._closed:
                    return
                self._state = state
                yield CaptureBatch(events, state.dump())
        self._drop_snapshot_connection()
        logger.info(
            "snapshot done source=%s tables=%d log_from=%s",
            self.name,
            len(self._tables),
            self._state.log.describe() if self._state.log else "-",
        )

    def _log(self, max_events: int) -> Iterator[CaptureBatch]:
        reader = self._start_reader()
        backlog: deque[Item] = deque()
        while not self._closed:
            if not backlog:
                message = reader.get(self.idle_wait)
                if message is None:
                    yield CaptureBatch((), self._state.dump())
                    continue
                backlog.extend(message)
            events: list[ChangeEvent] = []
            state = self._state
            while len(events) < max_events:
                if not backlog:
                    message = reader.get_nowait()
                    if message is None:
                        break
                    backlog.extend(message)
                item = backlog.popleft()
                if isinstance(item, list):
                    events.extend(item)
                elif isinstance(item, Commit):
                    state = state.with_log(item.log, iso_time(item.time))
                elif isinstance(item, Heartbeat):
                    state = replace(state, source_time=iso_time(item.time))
                elif isinstance(item, Note):
                    logger.log(item.level, "%s", item.message)
                else:
                    self._failed(item)
            self._state = state
            yield CaptureBatch(events, state.dump())

    def _failed(self, failure: Failure) -> None:
        """Raise a reader's failure; events of the batch being built are read again later."""
        error = failure.error
        if isinstance(error, PositionLost):
            log = self._state.log
            where = log.describe() if log else "the start"
            raise PositionLost(
                f"{error}; capture stopped after {where}. Ways out: re-snapshot with "
                "`optsync capture --resnapshot`, or accept the gap and read the log from a new "
                "position with `optsync capture --start-position POSITION`"
            ) from error
        raise error

    def _start_reader(self) -> LogReader:
        assert self._server is not None
        state = self._state
        assert state.log is not None and state.lineage is not None
        self._stop_reader()
        reader = LogReader(
            source=self.name,
            url=self.url,
            server_id=self.server_id,
            mariadb=self._server.mariadb,
            row_metadata=self._server.row_metadata,
            start=state.log,
            lineage=state.lineage,
            tables=self._tables,
        )
        self._reader = reader
        reader.start()
        return reader

    # -- acknowledge, close -----------------------------------------------------------------

    def acknowledge(self, state: str) -> None:
        """Events up to ``state`` are durable; nothing to release (the server keeps the binlog)."""
        self._acknowledged = state

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        return {(t.schema, t.name): tuple(c.name for c in t.columns) for t in self._tables.values()}

    def close(self) -> None:
        self._closed, self._opened = True, False
        self._stop_reader()
        self._drop_snapshot_connection()

    def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()

    def _drop_snapshot_connection(self) -> None:
        conn, self._snapshot_conn = self._snapshot_conn, None
        if conn is not None and conn.open:
            with contextlib.suppress(pymysql.err.MySQLError):
                conn.close()
