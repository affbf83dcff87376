"""The binlog reader: a process that turns ``mysql-replication`` events into change events.

``LogReader`` runs ``BinLogStreamReader`` (blocking, with server heartbeats) in a child process
of its own and receives, in binlog order, lists of:

- ``list[ChangeEvent]`` for each rows event of a captured table;
- ``Commit`` after each transaction (any table's: an idle captured table's position still
  moves): the resume point after it, and its commit time;
- ``Heartbeat`` when the server has sent everything (it sends one after ``HEARTBEAT``
  seconds without events): the capture has read the source up to now;
- ``Note``: a log line of the child, logged again here;
- ``Failure`` once, if reading stopped for any reason other than ``stop``.

Why a process: decoding rows is pure Python. In a thread, the pipeline's apply thread holds the
GIL for long stretches, and the reader, which gives the GIL up at every socket read, waits up
to a switch interval (5 ms) to get it back, several times per event; at 1,000 commits/s it fell
hundreds of milliseconds behind. In its own process it decodes on the other core. The child
sends one message per transaction (or per ``FLUSH_EVENTS`` events of a large one), dies with
its parent (``PR_SET_PDEATHSIG`` on Linux, and a parent check at every heartbeat) and is
stopped with SIGTERM.

The library's own reconnect (it re-requests the binlog from the *first* start position after a
lost connection, re-reading everything) is disabled: a lost connection ends the child with a
``Failure(Retryable)``, and the source starts a new reader from its last commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pymysql
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import (
    GtidEvent,
    HeartbeatLogEvent,
    MariadbGtidEvent,
    QueryEvent,
    RotateEvent,
    XAPrepareEvent,
    XidEvent,
)
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from optsync.capture.mysql.connection import SourceURL, error_for
from optsync.capture.mysql.position import GtidPosition, LogPosition, file_index, row_position
from optsync.capture.mysql.preflight import TableInfo
from optsync.capture.mysql.values import RowDecoder, binlog_decoder
from optsync.errors import Fatal, Retryable
from optsync.events import ChangeEvent, Op

__all__ = ("HEARTBEAT", "Commit", "Failure", "Heartbeat", "Item", "LogReader", "Note", "iso_time")

logger = logging.getLogger(__name__)

HEARTBEAT: Final = 1.0
"""Seconds of binlog silence after which the server sends a heartbeat."""
READ_TIMEOUT: Final = 30.0
"""Seconds without any packet (heartbeats included) before the connection counts as lost."""
QUEUE_MESSAGES: Final = 8
"""Messages the reader may run ahead by: enough to keep the pipe busy, and a bound on memory
(64 messages of 1,000 events held about 100 MB in a 1,000,000-row transaction)."""
FLUSH_EVENTS: Final = 1_000
"""A transaction's events are sent in messages of about this many."""
STOP_TIMEOUT: Final = 5.0
_PR_SET_PDEATHSIG: Final = 1
_MARIADB_STANDALONE: Final = 0x01
"""MariaDB GTID event flag FL_STANDALONE: a transaction of one statement (DDL), no COMMIT."""
_DDL: Final = re.compile(r"^\s*(ALTER|CREATE|DROP|RENAME|TRUNCATE)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Commit:
    """A transaction ended; the log may resume right after it."""

    log: LogPosition
    time: float
    """Its commit time (binlog event time, whole seconds)."""


@dataclass(frozen=True)
class Heartbeat:
    """The server had nothing more to send at ``time``."""

    time: float


@dataclass(frozen=True)
class Note:
    """A log line of the reader process."""

    level: int
    message: str


@dataclass(frozen=True)
class Failure:
    error: Exception


Item = list[ChangeEvent] | Commit | Heartbeat | Note | Failure


def iso_time(epoch: float) -> str:
    """``epoch`` as ISO-8601 UTC with milliseconds (the commit-time format)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class ReaderConfig:
    """What the reader process needs (pickled into it)."""

    source: str
    url: SourceURL
    server_id: int
    mariadb: bool
    row_metadata: bool
    start: LogPosition
    lineage: int
    tables: Mapping[str, TableInfo]


class LogReader:
    """The parent's handle of one binlog reader process, reading from ``start``."""

    def __init__(
        self,
        *,
        source: str,
        url: SourceURL,
        server_id: int,
        mariadb: bool,
        row_metadata: bool,
        start: LogPosition,
        lineage: int,
        tables: Mapping[str, TableInfo],
    ) -> None:
        config = ReaderConfig(source, url, server_id, mariadb, row_metadata, start, lineage, tables)
        context = multiprocessing.get_context("spawn")
        self.source = source
        self._messages: Any = context.Queue(QUEUE_MESSAGES)
        self._process = context.Process(
            target=read_binlog,
            args=(config, self._messages),
            name=f"optsync-binlog-{source}",
            daemon=True,
        )

    def start(self) -> None:
        self._process.start()

    def get(self, timeout: float) -> list[Item] | None:
        """The next message (None when none came within ``timeout`` seconds)."""
        try:
            return list(self._messages.get(timeout=timeout))
        except queue.Empty:
            if not self._process.is_alive() and self._messages.empty():
                code = self._process.exitcode
                raise Retryable(
                    f"source {self.source!r}: the binlog reader process exited ({code})"
                ) from None
            return None

    def get_nowait(self) -> list[Item] | None:
        try:
            return list(self._messages.get_nowait())
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and drop what it had not delivered."""
        process = self._process
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)
        elif process.pid is not None:
            process.join(STOP_TIMEOUT)
        self._messages.cancel_join_thread()
        self._messages.close()
        if process.exitcode is not None:
            process.close()


def read_binlog(config: ReaderConfig, messages: Any) -> None:
    """The reader process: read until stopped or failed (``Failure`` then)."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    _Reader(config, messages, parent).run()


class _RefusedReconnect(logging.Filter):
    """Drops the library's "Re-request the connection" warning: the reader refuses that
    reconnect (it would re-read from the first start position) and reports the loss itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Re-request the connection" not in record.getMessage()


logging.getLogger("pymysqlreplication").addFilter(_RefusedReconnect())


class _Orphaned(Exception):
    """The parent process is gone."""


class _Lost(Exception):
    """Raised into the library when it tries to reconnect on its own."""


class _Reader:
    """Reads the binlog from ``config.start`` (a transaction boundary) into ``messages``."""

    def __init__(self, config: ReaderConfig, messages: Any, parent: int) -> None:
        self.source = config.source
        self.url = config.url
        self.server_id = config.server_id
        self.mariadb = config.mariadb
        self.row_metadata = config.row_metadata
        self.start_at = config.start
        self.lineage = config.lineage
        self.tables = {(t.schema, t.name): t for t in config.tables.values()}
        self.messages = messages
        self.parent = parent
        self._opened = {"stream": False, "control": False}
        self._connections: list[pymysql.Connection[Any]] = []
        self._decoders: dict[int, tuple[Any, RowDecoder]] = {}
        self._stream: BinLogStreamReader | None = None
        self._pending: list[Item] = []
        self._pending_events = 0
        # Where the reader is.
        self._file = config.start.file
        self._file_number = file_index(config.start.file) if config.start.file else 0
        self._gtids = GtidPosition.parse(config.start.gtid or "")
        self._gtid: str | None = None
        self._commit_time: str | None = None
        self._explicit = False
        self._standalone = False

    # -- messages ---------------------------------------------------------------------------

    def _emit(self, item: Item, *, flush: bool = False) -> None:
        self._pending.append(item)
        if isinstance(item, list):
            self._pending_events += len(item)
        if flush or self._pending_events >= FLUSH_EVENTS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        message, self._pending, self._pending_events = self._pending, [], 0
        while True:
            try:
                self.messages.put(message, timeout=1.0)
                return
            except queue.Full:
                self._check_parent()

    def _check_parent(self) -> None:
        if os.getppid() != self.parent:
            raise _Orphaned

    def _note(self, level: int, message: str) -> None:
        self._emit(Note(level, message))

    def _connect(self, **settings: Any) -> pymysql.Connection[Any]:
        """The library's connection factory: one stream and one control connection, no more."""
        if "db" in settings:  # PyMySQL's deprecated spelling, used by the library
            settings["database"] = settings.pop("db")
        role = "control" if settings.get("database") == "information_schema" else "stream"
        if self._opened[role]:
            raise _Lost(f"the binlog {role} connection was lost")
        self._opened[role] = True
        conn = pymysql.connect(**settings)
        self._connections.append(conn)
        return conn

    # -- the process ------------------------------------------------------------------------

    def run(self) -> None:
        stream: BinLogStreamReader | None = None
        failure: Exception | None = None
        try:
            stream = self._stream = self._open_stream()
            for event in stream:
                self._handle(event)
        except _Orphaned:
            self.messages.cancel_join_thread()  # nobody reads: do not wait to deliver
            return
        except _Lost as exc:
            failure = Retryable(f"source {self.source!r}: read binlog: {exc}")
        except pymysql.err.MySQLError as exc:
            failure = error_for(exc, self.source, "read binlog", self.url)
        except Exception as exc:  # handed to the capture
            failure = _unexpected(self.source, exc)
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):  # the connection may be broken
                    stream.close()
            for conn in self._connections:
                with contextlib.suppress(Exception):
                    conn.close()
        if failure is not None:
            with contextlib.suppress(_Orphaned):
                self._emit(Failure(failure), flush=True)
        with contextlib.suppress(_Orphaned):
            self._flush()
        self.messages.close()
        self.messages.join_thread()

    def _open_stream(self) -> BinLogStreamReader:
        position: dict[str, Any]
        if self.mariadb:
            # The library ignores log_file/log_pos with is_mariadb (its issue #618): resume by
            # GTID. An empty GTID position means "no transaction yet": from the first binlog.
            position = {"is_mariadb": True, "auto_position": self.start_at.gtid or None}
        else:
            position = {"log_file": self.start_at.file, "log_pos": self.start_at.pos}
        schemas = sorted({schema for schema, _ in self.tables})
        names = sorted({name for _, name in self.tables})
        self._note(logging.INFO, f"binlog reader started source={self.source} "
                   f"from={self.start_at.describe()} pid={os.getpid()}")  # fmt: skip
        return BinLogStreamReader(
            connection_settings=self.url.binlog_settings(READ_TIMEOUT),
            server_id=self.server_id,
            blocking=True,
            resume_stream=True,
            only_events=[
                RotateEvent,
                MariadbGtidEvent,
                GtidEvent,
                QueryEvent,
                XidEvent,
                XAPrepareEvent,
                WriteRowsEvent,
                UpdateRowsEvent,
                DeleteRowsEvent,
                HeartbeatLogEvent,
            ],
            only_schemas=schemas,
            only_tables=names,
            slave_heartbeat=HEARTBEAT,
            report_slave=f"optsync-{self.source}",
            pymysql_wrapper=self._connect,
            enable_logging=False,
            use_column_name_cache=not self.row_metadata,
            # Parse a table's map event once per table id, not once per transaction (it was
            # most of the reader's CPU). Safe: a server gives a table a new id whenever its
            # definition changes (ALTER TABLE makes a new table share; the id counter only
            # grows), and ids restart only with the server, which starts a new binlog file:
            # the cache is emptied at every rotation (``_handle``).
            freeze_schema=True,
            **position,
        )

    def _handle(self, event: Any) -> None:
        if isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
            table = self.tables.get((event.schema, event.table))
            if table is not None:
                events = self._rows(event, table)
                if events:
                    self._emit(events)
        elif isinstance(event, XidEvent):
            self._commit(event.packet.log_pos, event.timestamp)
        elif isinstance(event, MariadbGtidEvent):
            self._begin(event.gtid, event.timestamp, bool(event.flags & _MARIADB_STANDALONE))
        elif isinstance(event, GtidEvent):
            self._begin(event.gtid, event.timestamp, standalone=False)
        elif isinstance(event, QueryEvent):
            self._query(event)
        elif isinstance(event, RotateEvent):
            self._file = str(event.next_binlog)
            self._file_number = file_index(self._file)
            # The library empties its table map only at a rotation with a timestamp; after a
            # crash the new file's rotation has none, and table ids may mean other tables.
            if self._stream is not None:
                self._stream.table_map.clear()
        elif isinstance(event, HeartbeatLogEvent):
            self._check_parent()
            self._emit(Heartbeat(time.time()), flush=True)
        elif isinstance(event, XAPrepareEvent):
            raise Fatal(
                f"source {self.source!r}: the binlog holds an XA PREPARE at {self._file}:"
                f"{event.packet.log_pos}; XA transactions are not supported by the capture"
            )

    def _begin(self, gtid: str, timestamp: int, standalone: bool) -> None:
        self._gtid = gtid
        self._commit_time = iso_time(timestamp)
        # A MariaDB GTID event stands for BEGIN unless the transaction is one statement (DDL);
        # MySQL writes BEGIN as a query event after its GTID event.
        self._explicit = self.mariadb and not standalone
        self._standalone = standalone

    def _query(self, event: QueryEvent) -> None:
        text = event.query.strip()
        upper = text[:16].upper()
        if upper.startswith(("BEGIN", "XA START")):
            self._explicit = True
            if self._gtid is None:  # MySQL without GTIDs: BEGIN starts the transaction
                self._commit_time = iso_time(event.timestamp)
            return
        if upper.startswith(("COMMIT", "XA COMMIT")):
            self._commit(event.packet.log_pos, event.timestamp)
            return
        if _DDL.match(text):
            touched = [t.qualified for (_, n), t in self.tables.items() if n in text]
            if touched:
                self._note(
                    logging.INFO,
                    f"schema change source={self.source} tables={','.join(touched)} "
                    f"at={self._file}:{event.packet.log_pos} (rows keep the columns their "
                    "table map names)",
                )
        if self._standalone or not self._explicit:
            self._commit(event.packet.log_pos, event.timestamp)  # DDL: its own transaction

    def _commit(self, end: int, timestamp: int) -> None:
        if self.mariadb and self._gtid is not None:
            self._gtids = self._gtids.advanced(self._gtid)
        gtid = str(self._gtids) if self.mariadb else None
        self._emit(Commit(LogPosition(self._file, int(end), gtid), float(timestamp)), flush=True)
        self._gtid = None
        self._explicit = False
        self._standalone = False

    # -- rows -------------------------------------------------------------------------------

    def _decoder(self, event: Any) -> RowDecoder:
        columns = event.columns
        cached = self._decoders.get(event.table_id)
        if cached is not None and cached[0] is columns:
            return cached[1]
        decoder = binlog_decoder(columns)
        self._decoders[event.table_id] = (columns, decoder)
        return decoder

    def _key_columns(self, event: Any, table: TableInfo, row: Mapping[str, Any]) -> tuple[str, ...]:
        primary = event.primary_key
        if primary:
            return (primary,) if isinstance(primary, str) else tuple(primary)
        if table.key and all(k in row for k in table.key):
            return table.key
        return ()

    def _rows(self, event: Any, table: TableInfo) -> list[ChangeEvent]:
        decode = self._decoder(event)
        packet = event.packet
        start = int(packet.log_pos) - int(packet.event_size)
        lineage, number = self.lineage, self._file_number
        name, schema, at, txn = table.name, table.schema, self._commit_time, self._gtid

        def make(
            op: Op,
            key: Mapping[str, Any],
            ordinal: int,
            before: Mapping[str, Any] | None = None,
            after: Mapping[str, Any] | None = None,
        ) -> ChangeEvent:
            return ChangeEvent(
                op=op,
                table=name,
                key=key,
                position=row_position(lineage, number, start, ordinal),
                before=before,
                after=after,
                schema=schema,
                commit_time=at,
                transaction_id=txn,
            )

        events: list[ChangeEvent] = []
        if isinstance(event, UpdateRowsEvent):
            for i, row in enumerate(event.rows):
                before = decode(row["before_values"], row["before_none_sources"])
                after = decode(row["after_values"], row["after_none_sources"])
                keys = self._key_columns(event, table, after)
                new_key = {k: after[k] for k in keys} if keys else after
                old_key = {k: before[k] for k in keys} if keys else before
                if keys and new_key != old_key:
                    # The key changed: a delete and an insert, so each key's events stay in
                    # its own partition, in order.
                    events.append(make(Op.DELETE, old_key, 2 * i, before=before))
                    events.append(make(Op.INSERT, new_key, 2 * i + 1, after=after))
                else:
                    events.append(make(Op.UPDATE, new_key, 2 * i, before=before, after=after))
            return events
        insert = isinstance(event, WriteRowsEvent)
        for i, row in enumerate(event.rows):
            values = decode(row["values"], row["none_sources"])
            keys = self._key_columns(event, table, values)
            key = {k: values[k] for k in keys} if keys else values
            if insert:
                events.append(make(Op.INSERT, key, 2 * i, after=values))
            else:
                events.append(make(Op.DELETE, key, 2 * i, before=values))
        return events


def _unexpected(source: str, exc: Exception) -> Exception:
    if isinstance(exc, Fatal | Retryable):
        return exc
    if isinstance(exc, OSError):
        return Retryable(f"source {source!r}: read binlog: connection error ({exc})")
    return Fatal(
        f"source {source!r}: read binlog failed ({type(exc).__name__}: {exc}); the capture "
        "stopped before the event it could not read"
    )
