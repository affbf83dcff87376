"""The change table: the triggers that write it, and the reader and the cleaner of its rows.

``install`` creates ``_optsync_changes`` and, on every captured table, ``AFTER INSERT / UPDATE /
DELETE`` triggers (``_optsync_<table>_<op>``) that append the row's before and after images to
it; ``read`` turns its rows, in seq order, into change events; ``delete_acknowledged`` removes
rows the log has read and the stream holds.

- The triggers are dropped and re-created at every ``open``, in one write transaction (no
  application write can fall between the drop and the create), with the columns that
  ``PRAGMA table_info`` reports then. After ``ALTER TABLE ... ADD COLUMN``, restart capture: until
  then the triggers keep writing the old columns; nothing is mislabelled, because ``json_object``
  names every column. ``ALTER TABLE ... DROP COLUMN`` refuses a column a trigger names: drop the
  ``_optsync_<table>_*`` triggers, the column and restart capture from a new snapshot.
- Triggers of a table removed from the configuration are dropped at ``open``; its change rows
  that are still unread are skipped.
- ``at`` (the commit time of an event) is ``strftime('%Y-%m-%dT%H:%M:%fZ', 'now')`` when the
  statement ran, inside the committing transaction.
- ``INSERT OR REPLACE`` deletes a conflicting row without firing DELETE triggers unless the
  application sets ``PRAGMA recursive_triggers = ON``; for a table keyed by rowid whose other
  UNIQUE constraint makes REPLACE remove a row, the removal is then not captured.
- One capture per source database: ``acknowledge`` deletes read change rows for everyone.
- The log waits for news by polling ``PRAGMA data_version`` (it changes whenever another
  connection commits): every millisecond for the first 50 ms, then every 5 ms, up to
  ``idle_wait`` seconds, then yields an empty batch so the caller can check for shutdown.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Final

from msgspec.structs import replace

from optsync.capture.sqlite.connection import translated
from optsync.capture.sqlite.position import CaptureState, Phase
from optsync.capture.sqlite.preflight import SCHEMA, TRIGGER_PREFIX, Table
from optsync.capture.sqlite.values import decode_image, literal, quote
from optsync.errors import Fatal
from optsync.events import ChangeEvent, Op, position_of
from optsync.sqlite_sync import without_fsync

__all__ = (
    "ACK_INTERVAL",
    "CHANGE_TABLE",
    "change_event",
    "delete_acknowledged",
    "install",
    "issued",
    "read",
    "triggers",
)

logger = logging.getLogger(__name__)

CHANGE_TABLE: Final = "_optsync_changes"
_TRIGGER_OPS: Final = ("insert", "update", "delete")
_NOW: Final = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
ACK_INTERVAL: Final = 0.5  # seconds between change-table cleanups
_ACK_CHUNK: Final = 10_000
"""Change rows deleted per write transaction, so the application never waits long."""
_ACK_BUSY_MS: Final = 20  # a cleanup waits this long for the application, then defers
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


def _trigger_name(table: str, op: str) -> str:
    return f"{TRIGGER_PREFIX}{table}_{op}"


def _key_changed(table: Table) -> str:
    """SQL that is true when an UPDATE changed the row's key."""
    # The rowid alias stays bare: a quoted name no column has may be read as a string.
    refs = [quote(column) for column in table.key_columns] or [table.rowid]
    return " OR ".join(f"OLD.{ref} IS NOT NEW.{ref}" for ref in refs)


def triggers(table: Table) -> dict[str, str]:
    """Trigger name -> CREATE TRIGGER statement, for the captured table ``table``."""
    quoted = quote(table.name)
    insert = (
        f"INSERT INTO {CHANGE_TABLE} (tbl, op, rid, before, after, at) SELECT {literal(table.name)}"
    )
    old, new = table.image("OLD."), table.image("NEW.")
    rowid = table.rowid
    changed = _key_changed(table)
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
        _trigger_name(table.name, op): (
            f"CREATE TRIGGER {quote(_trigger_name(table.name, op))} "
            f"AFTER {op.upper()} ON {quoted} BEGIN\n{body}\nEND"
        )
        for op, body in bodies.items()
    }


# -- install ---------------------------------------------------------------------------------


def install(
    conn: sqlite3.Connection,
    tables: dict[str, Table],
    saved: CaptureState | None,
    *,
    name: str,
    path: Path,
) -> CaptureState:
    """Create the change table and triggers in one write transaction; the state to resume."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_CHANGE_TABLE_DDL)
        existing = {
            str(trigger): str(table)
            for trigger, table in conn.execute(
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger' "
                "AND substr(name, 1, ?) = ?",
                (len(TRIGGER_PREFIX), TRIGGER_PREFIX),
            )
        }
        state = _resume(conn, tables, saved, existing, name=name, path=path)
        configured = {table.casefold() for table in tables}
        for trigger, owner in existing.items():
            if owner.casefold() not in configured:
                conn.execute(f"DROP TRIGGER IF EXISTS {quote(trigger)}")
                logger.info(
                    "capture trigger dropped source=%s table=%s reason=not-configured",
                    name,
                    owner,
                )
        for info in tables.values():
            for trigger, create in triggers(info).items():
                conn.execute(f"DROP TRIGGER IF EXISTS {quote(trigger)}")
                conn.execute(create)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return state


def _resume(
    conn: sqlite3.Connection,
    tables: dict[str, Table],
    saved: CaptureState | None,
    triggers: dict[str, str],
    *,
    name: str,
    path: Path,
) -> CaptureState:
    if saved is None:
        return CaptureState()
    last = issued(conn)
    if saved.log_after is not None and saved.log_after > last:
        raise Fatal(
            f"source {name!r}: position lost: the saved state has read the change "
            f"table up to seq {saved.log_after}, but {str(path)!r} has issued only up "
            f"to {last} (the database or {CHANGE_TABLE} was re-created); start over "
            "with a new data folder (or a new engine app): the new database's positions "
            "start again from 1 and an engine that holds the old ones would ignore them"
        )
    present = {trigger.casefold() for trigger in triggers}
    captured = [*saved.tables_done, *([saved.table] if saved.table else [])]
    for table in captured:
        if table not in tables:
            continue
        missing = [op for op in _TRIGGER_OPS if _trigger_name(table, op).casefold() not in present]
        if missing:
            raise Fatal(
                f"source {name!r}: position lost: the capture triggers of table "
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


def issued(conn: sqlite3.Connection) -> int:
    """The largest seq the change table has ever issued (0 if none)."""
    row = conn.execute(
        f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0), "
        f"coalesce((SELECT max(seq) FROM {CHANGE_TABLE}), 0))",
        (CHANGE_TABLE,),
    ).fetchone()
    return int(row[0])


# -- read ------------------------------------------------------------------------------------


def read(
    conn: sqlite3.Connection,
    tables: Mapping[str, Table],
    state: CaptureState,
    *,
    name: str,
    max_events: int,
    idle_wait: float,
    reading: Callable[[], bool],
) -> Generator[tuple[Sequence[ChangeEvent], CaptureState]]:
    """Change events after ``state.log_after``, each list with the state after it.

    An empty list comes after ``idle_wait`` seconds without a commit; the reading ends once
    ``reading()`` is false (the source was closed).
    """
    select = (
        f"SELECT seq, tbl, op, rid, before, after, at FROM {CHANGE_TABLE} "
        "WHERE seq > ? ORDER BY seq LIMIT ?"
    )
    deadline = time.monotonic() + idle_wait
    while reading():
        with translated(name, "log"):
            version = _data_version(conn)
            rows = conn.execute(select, (state.log_after, max_events)).fetchall()
        if rows:
            events = [
                e for e in (change_event(tables, name, *row) for row in rows) if e is not None
            ]
            state = replace(state, log_after=rows[-1][0])
            yield events, state
            deadline = time.monotonic() + idle_wait
        elif not _wait_for_commit(conn, version, deadline, name=name, reading=reading):
            yield (), state
            deadline = time.monotonic() + idle_wait


def change_event(
    tables: Mapping[str, Table],
    name: str,
    seq: int,
    tbl: str,
    op: str,
    rid: int | None,
    before: str | None,
    after: str | None,
    at: str,
) -> ChangeEvent | None:
    """The event of one change row (None: its table is no longer captured)."""
    table = tables.get(tbl)
    if table is None:
        return None  # written before the table left the configuration
    kind = _OPS.get(op)
    if kind is None:
        raise Fatal(
            f"source {name!r}: change row {seq} of {CHANGE_TABLE} has op {op!r}; "
            "the change table was written by something other than optsync's triggers"
        )
    before_row = decode_image(before) if before is not None else None
    after_row = decode_image(after) if after is not None else None
    row = before_row if kind is Op.DELETE else after_row
    return ChangeEvent(
        op=kind,
        table=tbl,
        key=table.key(rid, row or {}),
        position=position_of(seq),
        before=before_row,
        after=after_row,
        schema=SCHEMA,
        commit_time=at,
    )


def _wait_for_commit(
    conn: sqlite3.Connection,
    version: int,
    deadline: float,
    *,
    name: str,
    reading: Callable[[], bool],
) -> bool:
    """Poll until another connection commits (True) or ``deadline`` passes (False)."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline or not reading():
            return False
        pause = _FAST_POLL if now - started < _FAST_POLL_FOR else _SLOW_POLL
        time.sleep(min(pause, deadline - now))
        with translated(name, "log"):
            if _data_version(conn) != version:
                return True


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


# -- cleanup ---------------------------------------------------------------------------------


def delete_acknowledged(conn: sqlite3.Connection, upto: int, name: str) -> bool:
    """Delete the change rows up to seq ``upto`` (True), or defer if the application is writing."""
    try:
        # A cleanup a power cut undoes is done again later: no need to wait for the disk.
        with without_fsync(conn):
            conn.execute(f"PRAGMA busy_timeout = {_ACK_BUSY_MS}")
            low = conn.execute(f"SELECT min(seq) FROM {CHANGE_TABLE}").fetchone()[0]
            while low is not None and low <= upto:
                high = min(low + _ACK_CHUNK - 1, upto)
                conn.execute(f"DELETE FROM {CHANGE_TABLE} WHERE seq <= ?", (high,))
                low = high + 1
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" not in text and "busy" not in text:
            raise Fatal(f"source {name!r}: acknowledge failed: {exc}") from exc
        logger.debug("change-table cleanup deferred source=%s reason=%s", name, exc)
        return False
    return True
