"""The binlog reader: a thread that turns ``mysql-replication`` events into change events.

``LogReader`` runs ``BinLogStreamReader`` (blocking, with server heartbeats) in a daemon thread
and puts what it reads on a bounded queue, in binlog order:

- ``list[ChangeEvent]`` for each rows event of a captured table;
- ``Commit`` after each transaction (any table's: an idle captured table's position still
  moves): the resume point after it, and its commit time;
- ``Heartbeat`` when the server has sent everything (it sends one after ``HEARTBEAT``
  seconds without events): the capture has read the source up to now;
- ``Failure`` once, if reading stopped for any reason other than ``stop``.

The library's own reconnect (it re-requests the binlog from the *first* start position after a
lost connection, re-reading everything) is disabled: a lost connection ends the thread with a
``Failure(Retryable)``, and the source starts a new reader from its last commit.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import socket
import threading
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

from optsync.capture.mysql_connection import SourceURL, error_for
from optsync.capture.mysql_position import GtidPosition, LogPosition, file_index, row_position
from optsync.capture.mysql_preflight import TableInfo
from optsync.capture.mysql_values import RowDecoder, binlog_decoder
from optsync.errors import Fatal, Retryable
from optsync.events import ChangeEvent, Op

__all__ = ("HEARTBEAT", "Commit", "Failure", "Heartbeat", "LogReader", "iso_time")

logger = logging.getLogger(__name__)

HEARTBEAT: Final = 1.0
"""Seconds of binlog silence after which the server sends a heartbeat."""
READ_TIMEOUT: Final = 30.0
"""Seconds without any packet (heartbeats included) before the connection counts as lost."""
QUEUE_ITEMS: Final = 512
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
    """The server had nothing more to send at ``time`` (local clock)."""

    time: float


@dataclass(frozen=True)
class Failure:
    error: Exception


Item = list[ChangeEvent] | Commit | Heartbeat | Failure


def iso_time(epoch: float) -> str:
    """``epoch`` as ISO-8601 UTC with milliseconds (the commit-time format)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _RefusedReconnect(logging.Filter):
    """Drops the library's "Re-request the connection" warning: ``LogReader`` refuses that
    reconnect (it would re-read from the first start position) and reports the loss itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Re-request the connection" not in record.getMessage()


logging.getLogger("pymysqlreplication").addFilter(_RefusedReconnect())


class _Stopped(Exception):
    """Raised into the library when it tries to reconnect after ``stop``."""


class _Lost(Exception):
    """Raised into the library when it tries to reconnect on its own."""


class LogReader(threading.Thread):
    """Reads the binlog from ``start`` (a transaction boundary) into ``items``."""

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
        super().__init__(name=f"binlog-{source}", daemon=True)
        self.source = source
        self.url = url
        self.server_id = server_id
        self.mariadb = mariadb
        self.row_metadata = row_metadata
        self.start_at = start
        self.lineage = lineage
        self.tables = {(t.schema, t.name): t for t in tables.values()}
        self.items: queue.Queue[Item] = queue.Queue(QUEUE_ITEMS)
        self._stopping = threading.Event()
        self._connections: list[pymysql.Connection[Any]] = []
        self._opened = {"stream": False, "control": False}
        self._lock = threading.Lock()
        self._decoders: dict[int, tuple[Any, RowDecoder]] = {}
        # Where the reader is (only the thread touches these).
        self._file = start.file
        self._file_number = file_index(start.file) if start.file else 0
        self._gtids = GtidPosition.parse(start.gtid or "")
        self._gtid: str | None = None
        self._commit_time: str | None = None
        self._explicit = False
        self._standalone = False

    # -- control ---------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading: break the blocking read, wait for the thread, close connections."""
        self._stopping.set()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        self._close_connections()

    def _connect(self, **settings: Any) -> pymysql.Connection[Any]:
        """The library's connection factory: one stream and one control connection, no more."""
        if self._stopping.is_set():
            raise _Stopped
        if "db" in settings:  # PyMySQL's deprecated spelling, used by the library
            settings["database"] = settings.pop("db")
        role = "control" if settings.get("database") == "information_schema" else "stream"
        if self._opened[role]:
            raise _Lost(f"the binlog {role} connection was lost")
        self._opened[role] = True
        conn = pymysql.connect(**settings)
        with self._lock:
            self._connections.append(conn)
        if self._stopping.is_set():
            conn.close()
            raise _Stopped
        return conn

    def _close_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):  # closing a broken connection
                conn.close()

    def _put(self, item: Item) -> None:
        while not self._stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # -- the thread ------------------------------------------------------------------------

    def run(self) -> None:
        stream: BinLogStreamReader | None = None
        try:
            stream = self._open_stream()
            for event in stream:
                if self._stopping.is_set():
                    return
                self._handle(event)
        except _Stopped:
            return
        except _Lost as exc:
            self._put(Failure(Retryable(f"source {self.source!r}: read binlog: {exc}")))
        except pymysql.err.MySQLError as exc:
            if not self._stopping.is_set():
                self._put(Failure(error_for(exc, self.source, "read binlog", self.url)))
        except Exception as exc:  # handed to the capture thread
            if not self._stopping.is_set():
                self._put(Failure(_unexpected(self.source, exc)))
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):  # the connection may be broken
                    stream.close()
            self._close_connections()

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
        logger.info(
            "binlog reader starting source=%s from=%s", self.source, self.start_at.describe()
        )
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
            **position,
        )

    def _handle(self, event: Any) -> None:
        if isinstance(event, WriteRowsEvent | UpdateRowsEvent | DeleteRowsEvent):
            table = self.tables.get((event.schema, event.table))
            if table is not None:
                events = self._rows(event, table)
                if events:
                    self._put(events)
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
        elif isinstance(event, HeartbeatLogEvent):
            self._put(Heartbeat(time.time()))
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
            touched = [t.qualified for (s, n), t in self.tables.items() if n in text]
            if touched:
                logger.info(
                    "schema change source=%s tables=%s at=%s:%d (rows keep the columns their "
                    "table map names)",
                    self.source,
                    ",".join(touched),
                    self._file,
                    event.packet.log_pos,
                )
        if self._standalone or not self._explicit:
            self._commit(event.packet.log_pos, event.timestamp)  # DDL: its own transaction

    def _commit(self, end: int, timestamp: int) -> None:
        if self.mariadb and self._gtid is not None:
            self._gtids = self._gtids.advanced(self._gtid)
        gtid = str(self._gtids) if self.mariadb else None
        self._put(Commit(LogPosition(self._file, int(end), gtid), float(timestamp)))
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
