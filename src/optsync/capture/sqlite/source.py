"""``SQLiteSource``: change capture from a SQLite application database (the demo source).

SQLite has no replication log that another process can read, so the log is a table the source
writes itself: ``open`` installs, on every captured table, ``AFTER INSERT / UPDATE / DELETE``
triggers (``_optsync_<table>_<op>``) that append the row's before and after images to
``_optsync_changes``. This is the shape of every CDC reader in optsync, with a change table in
the place of the binlog or the WAL stream.

Why it cannot lose a change
---------------------------
- **A change is in the change table iff its write committed.** The triggers run inside the
  application's own transaction: a rollback takes the change row with it, a commit publishes
  both at once.
- **seq order is commit order, without holes that fill later.** ``seq`` is an
  ``INTEGER PRIMARY KEY AUTOINCREMENT``. SQLite has one writer at a time, and a transaction takes
  the write lock before its first trigger runs, so every seq it gets is larger than every seq
  committed before it. A reader that has seen seq N therefore never meets a later commit with a
  seq <= N (unlike server databases, where concurrent transactions commit sequence values out of
  order). ``AUTOINCREMENT`` (not a bare rowid) keeps seq growing after ``acknowledge`` has
  emptied the table, so positions never go back.
- **The snapshot and the log meet without a gap.** The snapshot reads every table in one read
  transaction (a consistent WAL snapshot; the application keeps writing meanwhile). Its first read
  is S, the largest seq ever issued (``sqlite_sequence``); every ``load`` event gets
  ``position_of(S)``; the log then starts after S. A change committed before the read transaction
  began is in the snapshot and has seq <= S; one committed after it has seq > S, is read from the
  log, and its position is greater than the load's, so the engine's position guard keeps it
  whatever order the two arrive in. Nothing falls in between, because S and the rows come from
  the same transaction. The triggers exist before the snapshot starts (``open`` creates them), so
  every change after the snapshot is in the change table.
- **Restart in the middle of a snapshot.** Each snapshot batch's state records how far it got
  (table, last rowid, tables done) and where the log will start (``log_after``, the original S).
  After a restart the snapshot continues after that rowid in a *new* read transaction with a new S'
  (the rows it still loads get ``position_of(S') + ".1"``, after change S' itself, which the log
  reads again), while the log still starts after the original S. Only a table whose rowid is an
  ``INTEGER PRIMARY KEY`` continues after its saved rowid: ``VACUUM`` may renumber the rowids of any
  other table between the two runs and move rows it has not loaded below the cursor, so such a table
  is loaded again from its start. A change in (S, S'] to a row before the cursor is read from the
  log (it was loaded at S, and the log has everything after S); the same change to a row after the
  cursor is older than that row's load at S', so the guard discards it. Change rows are deleted only
  once the log has read them (``acknowledge`` does nothing until the log phase), so none of (S, S']
  is gone.
- **A table added to the configuration later** is snapshotted the same way while the log waits
  at its position: its triggers exist from ``open`` on, its loads get a fresh S >= every position
  read so far.
- **Loud where silence would lose data.** If the saved log position is beyond every seq the
  change table has issued (the file or the table was re-created), or the triggers of an already
  captured table are missing (someone dropped them, or dropped and re-created the table), changes
  are gone; ``open`` raises ``Fatal`` saying so and how to start over, instead of resuming.

Layout
------
``connection`` opens the file (WAL mode, the busy timeout) and translates errors; ``preflight``
checks the SQLite library and the captured tables; ``log`` installs the triggers, reads the
change table and deletes what was acknowledged; ``snapshot`` reads the tables; ``values`` makes
the row images; ``position`` is the saved state. This module ties them together.

Operations
----------
- The key of an event is the table's PRIMARY KEY columns, or, for a table without one (the AWS
  sample's ``optin_status``), the rowid under the name ``"rowid"``. ``VACUUM`` may renumber the
  rowids of a table without an ``INTEGER PRIMARY KEY``; the key is used only to partition the
  stream (endpoint ids come from the mapping), so a renumbering changes partitions, not results.
  An UPDATE that changes the key is written as a delete of the old key and an insert of the new
  one (as Debezium does), so each key's events stay in one partition, in order.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path

from optsync.capture.base import CaptureBatch, ChangeSource, Progress, check_arguments
from optsync.capture.sqlite import log, snapshot
from optsync.capture.sqlite.connection import connect, translated, use_wal
from optsync.capture.sqlite.log import ACK_INTERVAL, CHANGE_TABLE
from optsync.capture.sqlite.position import CaptureState
from optsync.capture.sqlite.preflight import (
    SCHEMA,
    Table,
    check_json_functions,
    check_names,
    inspect,
)
from optsync.errors import ConfigError, Fatal

__all__ = ("CHANGE_TABLE", "SQLiteSource")

logger = logging.getLogger(__name__)


class SQLiteSource(ChangeSource):
    """Snapshot + change-table log of a SQLite application database (see the module notes).

    ``chunk_size`` rows are read per snapshot batch (at most ``max_events``); ``idle_wait`` is
    how long the log waits for a commit before it yields an empty batch.
    """

    def __init__(
        self,
        path: str | Path,
        tables: Sequence[str],
        name: str = "sqlite",
        *,
        chunk_size: int = 5_000,
        idle_wait: float = 0.2,
        ack_interval: float = ACK_INTERVAL,
    ) -> None:
        check_arguments(tables, chunk_size, idle_wait)
        self.name = name
        self.path = Path(path)
        self.table_names = tuple(tables)
        self.chunk_size = chunk_size
        self.idle_wait = idle_wait
        self.ack_interval = ack_interval
        self._tables: dict[str, Table] = {}
        self._state = CaptureState()
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._ack_upto = 0
        self._cleaned_upto = 0
        self._cleaner: threading.Thread | None = None
        self._cleaner_stop = threading.Event()
        self._cleaner_failure: Fatal | None = None

    # -- open -------------------------------------------------------------------------------

    def open(self, state: str | None) -> None:
        """Preflight the source, install the triggers and prepare to resume from ``state``."""
        if self._writer is not None:
            raise RuntimeError(f"source {self.name!r} is already open")
        check_names(self.name, self.table_names)
        saved = CaptureState.parse(state, self.name) if state is not None else None
        if not self.path.is_file():
            raise ConfigError(
                f"source {self.name!r}: the SQLite database {str(self.path)!r} does not exist; "
                "check the source path (optsync up creates the demo database)"
            )
        writer = connect(self.path, self.name)
        try:
            with translated(self.name, "open"):
                check_json_functions(writer, self.name)
                use_wal(writer, self.name, self.path)
                tables = {t: inspect(writer, t, self.name, self.path) for t in self.table_names}
                resumed = log.install(writer, tables, saved, name=self.name, path=self.path)
            reader = connect(self.path, self.name)
        except BaseException:
            writer.close()
            raise
        self._writer, self._reader = writer, reader
        self._cleaner_failure = None
        self._tables = tables
        self._state = resumed
        logger.info(
            "capture opened source=%s tables=%s phase=%s log_after=%s",
            self.name,
            ",".join(self.table_names),
            resumed.phase,
            resumed.log_after,
        )

    # -- batches ----------------------------------------------------------------------------

    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches, a batch that switches the state to the log, then log batches."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        conn = self._open_reader()

        def reading() -> bool:
            return self._reader is conn

        if self._state.phase == "snapshot":
            loads = snapshot.read(
                conn,
                self._tables,
                self.table_names,
                self._state,
                name=self.name,
                limit=min(self.chunk_size, max_events),
                progress=progress,
                reading=reading,
            )
            with closing(loads):  # a batches() closed mid-snapshot ends the read transaction
                for events, state in loads:
                    self._state = state
                    yield CaptureBatch(events, state.dump())
        changes = log.read(
            conn,
            self._tables,
            self._state,
            name=self.name,
            max_events=max_events,
            idle_wait=self.idle_wait,
            reading=reading,
        )
        with closing(changes):
            for events, state in changes:
                self._state = state
                yield CaptureBatch(events, state.dump())

    def _open_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        return self._reader

    # -- acknowledge, close -----------------------------------------------------------------

    def acknowledge(self, state: str) -> None:
        """Forget the change rows the log has read up to ``state`` (nothing during a snapshot).

        Deleting later is always safe, because the checkpoint is already durable in the stream
        and the log reads only rows after it. So with ``ack_interval > 0`` a cleaner thread
        deletes them every ``ack_interval`` seconds, off the log's path (a cleanup that waits
        for the application's write lock never delays capture), in short transactions that give
        way to the application: if it holds the write lock, cleaning waits for the next round.
        ``ack_interval = 0`` deletes them here, before returning.
        """
        acked = CaptureState.parse(state, self.name)
        if acked.phase != "log" or acked.log_after is None:
            return
        if self._writer is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        if self._cleaner_failure is not None:
            raise self._cleaner_failure
        self._ack_upto = max(self._ack_upto, acked.log_after)
        if self.ack_interval <= 0:
            self._clean()
        elif self._cleaner is None:
            self._cleaner_stop.clear()
            self._cleaner = threading.Thread(
                target=self._clean_every_interval, name="sqlite-capture-cleaner", daemon=True
            )
            self._cleaner.start()

    def _clean_every_interval(self) -> None:
        while not self._cleaner_stop.wait(self.ack_interval):
            try:
                self._clean()
            except Fatal as exc:
                logger.error("change-table cleanup failed source=%s reason=%s", self.name, exc)
                self._cleaner_failure = exc  # raised by the next acknowledge
                return

    def _clean(self) -> None:
        """Delete the change rows up to ``_ack_upto``, or defer if the application is writing."""
        with self._write_lock:
            conn = self._writer
            upto = self._ack_upto
            if conn is None or upto <= self._cleaned_upto:
                return
            if log.delete_acknowledged(conn, upto, self.name):
                self._cleaned_upto = upto

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        return {(SCHEMA, t.name): t.columns for t in self._tables.values()}

    def close(self) -> None:
        cleaner, self._cleaner = self._cleaner, None
        if cleaner is not None:
            self._cleaner_stop.set()
            cleaner.join()
        with self._write_lock:
            reader, writer = self._reader, self._writer
            self._reader = self._writer = None
        for conn in (reader, writer):
            if conn is not None:
                conn.close()
