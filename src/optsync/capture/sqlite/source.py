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

Operations
----------
- ``open`` sets ``journal_mode=WAL`` on the source (it persists in the file). This is required:
  in WAL mode readers and the single writer do not block each other, so the application keeps
  writing while a snapshot holds its read transaction for minutes, and the log reader never makes
  an application write wait. (A long snapshot keeps the WAL from being reset, so the -wal file
  grows until the snapshot ends.)
- The triggers are dropped and re-created at every ``open``, in one write transaction (no
  application write can fall between the drop and the create), with the columns that
  ``PRAGMA table_info`` reports then. After ``ALTER TABLE ... ADD COLUMN``, restart capture: until
  then the triggers keep writing the old columns; nothing is mislabelled, because ``json_object``
  names every column. ``ALTER TABLE ... DROP COLUMN`` refuses a column a trigger names: drop the
  ``_optsync_<table>_*`` triggers, the column and restart capture from a new snapshot.
- Triggers of a table removed from the configuration are dropped at ``open``; its change rows
  that are still unread are skipped.
- The key of an event is the table's PRIMARY KEY columns, or, for a table without one (the AWS
  sample's ``optin_status``), the rowid under the name ``"rowid"``. ``VACUUM`` may renumber the
  rowids of a table without an ``INTEGER PRIMARY KEY``; the key is used only to partition the
  stream (endpoint ids come from the mapping), so a renumbering changes partitions, not results.
  An UPDATE that changes the key is written as a delete of the old key and an insert of the new
  one (as Debezium does), so each key's events stay in one partition, in order.
- Values are the JSON values ``json_object`` gives: integers, text, reals (with the 15
  significant digits SQLite renders; the snapshot reads rows through the same ``json_object`` so
  loads and log events agree). ``json_object`` refuses BLOBs, and a trigger that failed would
  fail the application's write, so a BLOB is captured as its upper-case hex text.
- ``at`` (the commit time of an event) is ``strftime('%Y-%m-%dT%H:%M:%fZ', 'now')`` when the
  statement ran, inside the committing transaction.
- The application's SQLite runs the triggers, so it needs the JSON functions (built in since
  SQLite 3.38) and at most 63 columns per captured table (``json_object`` takes 127 arguments
  in SQLite builds before 3.48).
- ``INSERT OR REPLACE`` deletes a conflicting row without firing DELETE triggers unless the
  application sets ``PRAGMA recursive_triggers = ON``; for a table keyed by rowid whose other
  UNIQUE constraint makes REPLACE remove a row, the removal is then not captured.
- One capture per source database: ``acknowledge`` deletes read change rows for everyone.
- The log waits for news by polling ``PRAGMA data_version`` (it changes whenever another
  connection commits): every millisecond for the first 50 ms, then every 5 ms, up to
  ``idle_wait`` seconds, then yields an empty batch so the caller can check for shutdown.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from optsync.capture.base import CaptureBatch, ChangeSource, Progress
from optsync.capture.sqlite.position import CaptureState
from optsync.errors import ConfigError, Fatal, Retryable
from optsync.events import ChangeEvent, Op, position_of
from optsync.sqlite_sync import without_fsync

__all__ = ("CHANGE_TABLE", "SQLiteSource")

logger = logging.getLogger(__name__)

CHANGE_TABLE: Final = "_optsync_changes"
_TRIGGER_PREFIX: Final = "_optsync_"
_TRIGGER_OPS: Final = ("insert", "update", "delete")
_ROWID_KEY: Final = "rowid"
_SCHEMA: Final = "main"
_MAX_COLUMNS: Final = 63
"""``json_object`` takes at most 127 arguments (SQLITE_MAX_FUNCTION_ARG before SQLite 3.48)."""
_NOW: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
_BUSY_TIMEOUT: Final = 5.0
_ACK_CHUNK: Final = 10_000
_ACK_INTERVAL: Final = 0.5  # seconds between change-table cleanups
_ACK_BUSY_MS: Final = 20  # a cleanup waits this long for the application, then defers
"""Change rows deleted per write transaction, so the application never waits long."""
_FAST_POLL: Final = 0.001
_FAST_POLL_FOR: Final = 0.05
_SLOW_POLL: Final = 0.005

_CHANGE_TABLE_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {CHANGE_TABLE} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    op TEXT NOT NULL,
    rid INTEGER,
    before TEXT,
    after TEXT,
    at TEXT NOT NULL
)
"""
_OPS: Final = {"INSERT": Op.INSERT, "UPDATE": Op.UPDATE, "DELETE": Op.DELETE}
_IMAGES: Final = msgspec.json.Decoder()

Phase = Literal["snapshot", "log"]


def _quote(name: str) -> str:
    """An SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """An SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _image(text: str) -> dict[str, Any]:
    """A row image ``json_object`` wrote, as a dict."""
    try:
        row: dict[str, Any] = _IMAGES.decode(text)
    except ValueError:  # msgspec refuses 9.0e+999, SQLite's text of an infinite REAL
        row = json.loads(text)
    return row


def _is_integer(declared: object) -> bool:
    return str(declared or "").strip().upper() == "INTEGER"


def _trigger_name(table: str, op: str) -> str:
    return f"{_TRIGGER_PREFIX}{table}_{op}"


@dataclass(frozen=True)
class _Table:
    """A captured table as ``open`` found it."""

    name: str
    """As configured; events carry this name."""
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    """PRIMARY KEY columns in key order; empty: the table is keyed by rowid."""
    rowid: str
    """A name of the rowid that no column shadows (rowid, oid or _rowid_)."""
    stable_rowid: bool = False
    """The rowid is an INTEGER PRIMARY KEY column: ``VACUUM`` leaves it alone."""

    def image(self, prefix: str) -> str:
        """``json_object`` of every column of the row ``prefix`` names (``NEW.``, ``OLD.``, "")."""
        parts = []
        for column in self.columns:
            ref = prefix + _quote(column)
            value = f"CASE typeof({ref}) WHEN 'blob' THEN hex({ref}) ELSE {ref} END"
            parts.append(f"{_literal(column)}, {value}")
        return f"json_object({', '.join(parts)})"

    def key_changed(self) -> str:
        """SQL that is true when an UPDATE changed the row's key."""
        # The rowid alias stays bare: a quoted name no column has may be read as a string.
        refs = [_quote(column) for column in self.key_columns] or [self.rowid]
        return " OR ".join(f"OLD.{ref} IS NOT NEW.{ref}" for ref in refs)

    def triggers(self) -> dict[str, str]:
        """Trigger name -> CREATE TRIGGER statement."""
        table = _quote(self.name)
        insert = (
            f"INSERT INTO {CHANGE_TABLE} (tbl, op, rid, before, after, at) SELECT "
            f"{_literal(self.name)}"
        )
        old, new = self.image("OLD."), self.image("NEW.")
        rowid = self.rowid
        changed = self.key_changed()
        bodies = {
            "insert": f"{insert}, 'INSERT', NEW.{rowid}, NULL, {new}, {_NOW};",
            "update": (
                f"{insert}, 'DELETE', OLD.{rowid}, {old}, NULL, {_NOW} WHERE {changed};\n"
                f"{insert}, 'INSERT', NEW.{rowid}, NULL, {new}, {_NOW} WHERE {changed};\n"
                f"{insert}, 'UPDATE', NEW.{rowid}, {old}, {new}, {_NOW} WHERE NOT ({changed});"
            ),
            "delete": f"{insert}, 'DELETE', OLD.{rowid}, {old}, NULL, {_NOW};",
        }
        return {
            _trigger_name(self.name, op): (
                f"CREATE TRIGGER {_quote(_trigger_name(self.name, op))} "
                f"AFTER {op.upper()} ON {table} BEGIN\n{body}\nEND"
            )
            for op, body in bodies.items()
        }

    def key(self, rid: int | None, row: dict[str, Any]) -> dict[str, Any]:
        if not self.key_columns:
            return {_ROWID_KEY: rid}
        return {column: row.get(column) for column in self.key_columns}


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
        ack_interval: float = _ACK_INTERVAL,
    ) -> None:
        if isinstance(tables, str):
            raise TypeError("tables must be a sequence of table names, not one string")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if idle_wait < 0:
            raise ValueError("idle_wait must not be negative")
        self.name = name
        self.path = Path(path)
        self.table_names = tuple(tables)
        self.chunk_size = chunk_size
        self.idle_wait = idle_wait
        self.ack_interval = ack_interval
        self._tables: dict[str, _Table] = {}
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
        self._check_names()
        saved = CaptureState.parse(state, self.name) if state is not None else None
        if not self.path.is_file():
            raise ConfigError(
                f"source {self.name!r}: the SQLite database {str(self.path)!r} does not exist; "
                "check the source path (optsync up creates the demo database)"
            )
        writer = self._connect()
        try:
            with self._translated("open"):
                self._preflight(writer)
                tables = {name: self._inspect(writer, name) for name in self.table_names}
                resumed = self._install(writer, tables, saved)
            reader = self._connect()
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

    def _check_names(self) -> None:
        if not self.table_names:
            raise ConfigError(f"source {self.name!r}: no tables to capture; list at least one")
        seen: set[str] = set()
        for table in self.table_names:
            folded = table.casefold()
            if folded in seen:
                raise ConfigError(f"source {self.name!r}: table {table!r} is listed twice")
            seen.add(folded)
            if folded.startswith((_TRIGGER_PREFIX, "sqlite_")):
                raise ConfigError(
                    f"source {self.name!r}: table {table!r} is internal to SQLite or optsync "
                    "and cannot be captured; remove it from the table list"
                )

    def _connect(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri() + "?mode=rw"
        try:
            return sqlite3.connect(
                uri,
                uri=True,
                isolation_level=None,
                check_same_thread=False,
                timeout=_BUSY_TIMEOUT,
            )
        except sqlite3.Error as exc:
            raise ConfigError(
                f"source {self.name!r}: cannot open the SQLite database {str(self.path)!r} "
                f"for reading and writing ({exc}); check the path and its permissions"
            ) from exc

    def _preflight(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("SELECT json_object('a', 1)").fetchone()
        except sqlite3.OperationalError as exc:
            raise ConfigError(
                f"source {self.name!r}: this SQLite ({sqlite3.sqlite_version}) has no JSON "
                "functions; use SQLite 3.38 or later (or a build with JSON1)"
            ) from exc
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise ConfigError(
                f"source {self.name!r}: could not switch {str(self.path)!r} to WAL mode "
                f"(journal_mode is {mode}); WAL is required so the application and capture "
                "do not block each other; use a database file on a local disk"
            )

    def _inspect(self, conn: sqlite3.Connection, table: str) -> _Table:
        row = conn.execute(
            "SELECT type, sql FROM sqlite_master WHERE name = ? COLLATE NOCASE "
            "AND type IN ('table', 'view')",
            (table,),
        ).fetchone()
        if row is None:
            raise ConfigError(
                f"source {self.name!r}: table {table!r} does not exist in {str(self.path)!r}; "
                "create it in the application database or remove it from the table list"
            )
        kind, sql = row
        if kind != "table" or str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL"):
            raise ConfigError(
                f"source {self.name!r}: {table!r} is a {'view' if kind == 'view' else 'virtual'}"
                " table, which cannot carry capture triggers; capture the table it reads from"
            )
        info = conn.execute(f"PRAGMA table_info({_quote(table)})").fetchall()
        columns = tuple(str(c[1]) for c in info)
        keys = tuple(str(c[1]) for c in sorted((c for c in info if c[5]), key=lambda c: c[5]))
        if len(columns) > _MAX_COLUMNS:
            raise ConfigError(
                f"source {self.name!r}: table {table!r} has {len(columns)} columns; the SQLite "
                f"capture handles at most {_MAX_COLUMNS} (json_object's argument limit); "
                "move the columns optsync does not need to another table"
            )
        folded = {c.casefold() for c in columns}
        rowid = next((a for a in ("rowid", "oid", "_rowid_") if a not in folded), None)
        if rowid is None:
            raise ConfigError(
                f"source {self.name!r}: table {table!r} has columns named rowid, oid and "
                "_rowid_, so its rowid cannot be read; rename one of them"
            )
        try:
            conn.execute(f"SELECT {rowid} FROM {_quote(table)} LIMIT 0").fetchall()
        except sqlite3.OperationalError as exc:
            raise ConfigError(
                f"source {self.name!r}: table {table!r} is a WITHOUT ROWID table; the SQLite "
                "capture reads tables in rowid order, so recreate it as a rowid table"
            ) from exc
        # A sole PRIMARY KEY column declared exactly INTEGER is the rowid, unless SQLite made it
        # an index of its own (INTEGER PRIMARY KEY DESC): then index_list shows a 'pk' index.
        integer_key = len(keys) == 1 and all(_is_integer(c[2]) for c in info if c[5])
        pk_index = any(
            row[3] == "pk" for row in conn.execute(f"PRAGMA index_list({_quote(table)})")
        )
        return _Table(table, columns, keys, rowid, stable_rowid=integer_key and not pk_index)

    def _install(
        self, conn: sqlite3.Connection, tables: dict[str, _Table], saved: CaptureState | None
    ) -> CaptureState:
        """Create the change table and triggers in one write transaction; the state to resume."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CHANGE_TABLE_DDL)
            existing = {
                str(name): str(table)
                for name, table in conn.execute(
                    "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' "
                    "AND substr(name, 1, ?) = ?",
                    (len(_TRIGGER_PREFIX), _TRIGGER_PREFIX),
                )
            }
            state = self._resume(conn, tables, saved, existing)
            configured = {name.casefold() for name in tables}
            for trigger, owner in existing.items():
                if owner.casefold() not in configured:
                    conn.execute(f"DROP TRIGGER IF EXISTS {_quote(trigger)}")
                    logger.info(
                        "capture trigger dropped source=%s table=%s reason=not-configured",
                        self.name,
                        owner,
                    )
            for info in tables.values():
                for trigger, create in info.triggers().items():
                    conn.execute(f"DROP TRIGGER IF EXISTS {_quote(trigger)}")
                    conn.execute(create)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return state

    def _resume(
        self,
        conn: sqlite3.Connection,
        tables: dict[str, _Table],
        saved: CaptureState | None,
        triggers: dict[str, str],
    ) -> CaptureState:
        if saved is None:
            return CaptureState()
        issued = self._issued(conn)
        if saved.log_after is not None and saved.log_after > issued:
            raise Fatal(
                f"source {self.name!r}: position lost: the saved state has read the change "
                f"table up to seq {saved.log_after}, but {str(self.path)!r} has issued only up "
                f"to {issued} (the database or {CHANGE_TABLE} was re-created); start over "
                "with a new data folder (or a new engine app): the new database's positions "
                "start again from 1 and an engine that holds the old ones would ignore them"
            )
        present = {name.casefold() for name in triggers}
        captured = [*saved.tables_done, *([saved.table] if saved.table else [])]
        for table in captured:
            if table not in tables:
                continue
            missing = [
                op for op in _TRIGGER_OPS if _trigger_name(table, op).casefold() not in present
            ]
            if missing:
                raise Fatal(
                    f"source {self.name!r}: position lost: the capture triggers of table "
                    f"{table!r} ({', '.join(missing)}) are gone, so its changes since they "
                    "were dropped were not recorded; discard the saved capture state to start "
                    "over with a new snapshot, and remove rows deleted meanwhile from the target"
                )
        done = tuple(t for t in saved.tables_done if t in tables)
        current = saved.table if saved.table in tables and saved.table not in done else None
        phase: Phase = "snapshot" if any(t not in done for t in tables) else "log"
        if saved.log_after is None:
            phase = "snapshot"  # a snapshot that had not finished its first batch
        return replace(
            saved,
            phase=phase,
            table=current,
            after_rowid=saved.after_rowid if current else 0,
            tables_done=done,
        )

    @staticmethod
    def _issued(conn: sqlite3.Connection) -> int:
        """The largest seq the change table has ever issued (0 if none)."""
        row = conn.execute(
            f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0), "
            f"coalesce((SELECT max(seq) FROM {CHANGE_TABLE}), 0))",
            (CHANGE_TABLE,),
        ).fetchone()
        return int(row[0])

    # -- batches ----------------------------------------------------------------------------

    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches, a batch that switches the state to the log, then log batches."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        conn = self._open_reader()
        if self._state.phase == "snapshot":
            yield from self._snapshot(conn, max_events, progress)
        yield from self._log(conn, max_events)

    def _open_reader(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        return self._reader

    def _snapshot(
        self, conn: sqlite3.Connection, max_events: int, progress: Progress | None
    ) -> Iterator[CaptureBatch]:
        state = self._state
        pending = [t for t in self.table_names if t not in state.tables_done]
        if state.table in pending:
            pending.remove(state.table)
            pending.insert(0, state.table)
        limit = min(self.chunk_size, max_events)
        try:
            with self._translated("snapshot"):
                conn.execute("BEGIN")
                s = self._issued(conn)  # the first read: fixes the snapshot and its position
            state = replace(
                state,
                snapshot_s=s,
                log_after=s if state.log_after is None else state.log_after,
            )
            position = position_of(s)
            if state.log_after is not None and s > state.log_after:
                # A restarted snapshot: the log, still after the original S, reads change S'
                # again, and this read holds it. Its loads sort just after that change (and
                # before S'+1): with the same position the stream would keep one of the two as a
                # duplicate, and losing the change loses its before image (an old address).
                position += ".1"
            logger.info(
                "snapshot started source=%s s=%d log_after=%d tables=%s",
                self.name,
                s,
                state.log_after,
                ",".join(pending),
            )
            for name in pending:
                table = self._tables[name]
                after = state.after_rowid if state.table == name else 0
                if after and not table.stable_rowid:
                    # VACUUM may have renumbered the rows since the cursor was saved, moving
                    # unread rows below it: load the table again from its start (rows loaded
                    # twice are harmless, the second load is at S' >= S).
                    logger.info(
                        "snapshot of table=%s starts over: its rowids are not an INTEGER "
                        "PRIMARY KEY, which VACUUM may renumber",
                        name,
                    )
                    after = 0
                state = replace(state, table=name, after_rowid=after)
                with self._translated("snapshot"):
                    expected, done = conn.execute(
                        f"SELECT count(*), count(*) FILTER (WHERE {table.rowid} <= ?) "
                        f"FROM {_quote(name)}",
                        (after,),
                    ).fetchone()
                if progress is not None:
                    progress(name, done, expected)
                select = (
                    f"SELECT {table.rowid}, {table.image('')} FROM {_quote(name)} "
                    f"WHERE {table.rowid} > ? ORDER BY {table.rowid} LIMIT ?"
                )
                while True:
                    with self._translated("snapshot"):
                        rows = conn.execute(select, (after, limit)).fetchall()
                    if rows:
                        after = rows[-1][0]
                        done += len(rows)
                        state = replace(state, after_rowid=after)
                    finished = len(rows) < limit
                    if finished:
                        state = replace(
                            state,
                            table=None,
                            after_rowid=0,
                            tables_done=(*state.tables_done, name),
                        )
                    if not rows:
                        break
                    events = [self._load(table, rid, image, position) for rid, image in rows]
                    if progress is not None:
                        progress(name, done, expected)
                    self._state = state
                    yield CaptureBatch(events, state.dump())
                    if finished:
                        break
            with self._translated("snapshot"):
                conn.execute("COMMIT")
        finally:
            if self._reader is conn and conn.in_transaction:
                conn.execute("ROLLBACK")
        state = replace(state, phase="log", snapshot_s=s, table=None, after_rowid=0)
        self._state = state
        logger.info("snapshot done source=%s s=%d log_after=%d", self.name, s, state.log_after)
        yield CaptureBatch((), state.dump())

    def _load(self, table: _Table, rid: int, image: str, position: str) -> ChangeEvent:
        row = _image(image)
        return ChangeEvent(
            op=Op.LOAD,
            table=table.name,
            key=table.key(rid, row),
            position=position,
            after=row,
            schema=_SCHEMA,
        )

    def _log(self, conn: sqlite3.Connection, max_events: int) -> Iterator[CaptureBatch]:
        select = (
            f"SELECT seq, tbl, op, rid, before, after, at FROM {CHANGE_TABLE} "
            "WHERE seq > ? ORDER BY seq LIMIT ?"
        )
        deadline = time.monotonic() + self.idle_wait
        while self._reader is conn:
            state = self._state
            with self._translated("log"):
                version = self._data_version(conn)
                rows = conn.execute(select, (state.log_after, max_events)).fetchall()
            if rows:
                events = [e for e in (self._change(*row) for row in rows) if e is not None]
                self._state = replace(state, log_after=rows[-1][0])
                yield CaptureBatch(events, self._state.dump())
                deadline = time.monotonic() + self.idle_wait
            elif not self._wait_for_commit(conn, version, deadline):
                yield CaptureBatch((), state.dump())
                deadline = time.monotonic() + self.idle_wait

    def _change(
        self,
        seq: int,
        tbl: str,
        op: str,
        rid: int | None,
        before: str | None,
        after: str | None,
        at: str,
    ) -> ChangeEvent | None:
        table = self._tables.get(tbl)
        if table is None:
            return None  # written before the table left the configuration
        kind = _OPS.get(op)
        if kind is None:
            raise Fatal(
                f"source {self.name!r}: change row {seq} of {CHANGE_TABLE} has op {op!r}; "
                "the change table was written by something other than optsync's triggers"
            )
        before_row = _image(before) if before is not None else None
        after_row = _image(after) if after is not None else None
        row = before_row if kind is Op.DELETE else after_row
        return ChangeEvent(
            op=kind,
            table=tbl,
            key=table.key(rid, row or {}),
            position=position_of(seq),
            before=before_row,
            after=after_row,
            schema=_SCHEMA,
            commit_time=at,
        )

    def _wait_for_commit(self, conn: sqlite3.Connection, version: int, deadline: float) -> bool:
        """Poll until another connection commits (True) or ``deadline`` passes (False)."""
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline or self._reader is not conn:
                return False
            pause = _FAST_POLL if now - started < _FAST_POLL_FOR else _SLOW_POLL
            time.sleep(min(pause, deadline - now))
            with self._translated("log"):
                if self._data_version(conn) != version:
                    return True

    @staticmethod
    def _data_version(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

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
            try:
                # A cleanup a power cut undoes is done again later: no need to wait for the disk.
                with without_fsync(conn):
                    conn.execute(f"PRAGMA busy_timeout = {_ACK_BUSY_MS}")
                    low = conn.execute(f"SELECT min(seq) FROM {CHANGE_TABLE}").fetchone()[0]
                    while low is not None and low <= upto:
                        high = min(low + _ACK_CHUNK - 1, upto)
                        conn.execute(f"DELETE FROM {CHANGE_TABLE} WHERE seq <= ?", (high,))
                        low = high + 1
                self._cleaned_upto = upto
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if "locked" not in text and "busy" not in text:
                    raise Fatal(f"source {self.name!r}: acknowledge failed: {exc}") from exc
                logger.debug("change-table cleanup deferred source=%s reason=%s", self.name, exc)

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        return {(_SCHEMA, t.name): t.columns for t in self._tables.values()}

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

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """sqlite3 errors as optsync's: busy/locked can be retried, the rest needs a person."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "locked" in text or "busy" in text:
                raise Retryable(
                    f"source {self.name!r}: {action}: the database is busy ({exc}); capture retries"
                ) from exc
            raise Fatal(f"source {self.name!r}: {action} failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise Fatal(f"source {self.name!r}: {action} failed: {exc}") from exc
