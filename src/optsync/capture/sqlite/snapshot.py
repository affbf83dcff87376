"""The snapshot: every row of the captured tables as ``load`` events, in one read transaction.

The snapshot reads every table in one read transaction (a consistent WAL snapshot; the
application keeps writing meanwhile). Its first read is S, the largest seq the change table has
ever issued; every ``load`` gets ``position_of(S)`` (``position_of(S) + ".1"`` in a restarted
snapshot), and the log starts after the original S. Tables are read in rowid order,
``chunk_size`` rows per batch; each batch's state holds the table and the last rowid loaded, so
an interrupted snapshot continues after it (see ``source`` for why nothing is lost).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Generator, Mapping, Sequence

from msgspec.structs import replace

from optsync.capture.base import Progress
from optsync.capture.sqlite.connection import translated
from optsync.capture.sqlite.log import issued
from optsync.capture.sqlite.position import CaptureState
from optsync.capture.sqlite.preflight import SCHEMA, Table
from optsync.capture.sqlite.values import decode_image, quote
from optsync.events import ChangeEvent, Op, position_of

__all__ = ("load_event", "read")

logger = logging.getLogger(__name__)


def read(
    conn: sqlite3.Connection,
    tables: Mapping[str, Table],
    table_names: Sequence[str],
    state: CaptureState,
    *,
    name: str,
    limit: int,
    progress: Progress | None,
    reading: Callable[[], bool],
) -> Generator[tuple[Sequence[ChangeEvent], CaptureState]]:
    """Load events of the tables not done yet, each list with the state after it.

    The last item has no events and the state that switches to the log. ``reading()`` false
    means the source closed ``conn``: the read transaction is then not rolled back.
    """
    pending = [t for t in table_names if t not in state.tables_done]
    if state.table in pending:
        pending.remove(state.table)
        pending.insert(0, state.table)
    try:
        with translated(name, "snapshot"):
            conn.execute("BEGIN")
            s = issued(conn)  # the first read: fixes the snapshot and its position
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
            name,
            s,
            state.log_after,
            ",".join(pending),
        )
        for table_name in pending:
            table = tables[table_name]
            after = state.after_rowid if state.table == table_name else 0
            if after and not table.stable_rowid:
                # VACUUM may have renumbered the rows since the cursor was saved, moving
                # unread rows below it: load the table again from its start (rows loaded
                # twice are harmless, the second load is at S' >= S).
                logger.info(
                    "snapshot of table=%s starts over: its rowids are not an INTEGER "
                    "PRIMARY KEY, which VACUUM may renumber",
                    table_name,
                )
                after = 0
            state = replace(state, table=table_name, after_rowid=after)
            with translated(name, "snapshot"):
                expected, done = conn.execute(
                    f"SELECT count(*), count(*) FILTER (WHERE {table.rowid} <= ?) "
                    f"FROM {quote(table_name)}",
                    (after,),
                ).fetchone()
            if progress is not None:
                progress(table_name, done, expected)
            select = (
                f"SELECT {table.rowid}, {table.image('')} FROM {quote(table_name)} "
                f"WHERE {table.rowid} > ? ORDER BY {table.rowid} LIMIT ?"
            )
            while True:
                with translated(name, "snapshot"):
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
                        tables_done=(*state.tables_done, table_name),
                    )
                if not rows:
                    break
                events = [load_event(table, rid, image, position) for rid, image in rows]
                if progress is not None:
                    progress(table_name, done, expected)
                yield events, state
                if finished:
                    break
        with translated(name, "snapshot"):
            conn.execute("COMMIT")
    finally:
        if reading() and conn.in_transaction:
            conn.execute("ROLLBACK")
    state = replace(state, phase="log", snapshot_s=s, table=None, after_rowid=0)
    logger.info("snapshot done source=%s s=%d log_after=%d", name, s, state.log_after)
    yield (), state


def load_event(table: Table, rid: int, image: str, position: str) -> ChangeEvent:
    """The ``load`` event of one snapshot row."""
    row = decode_image(image)
    return ChangeEvent(
        op=Op.LOAD,
        table=table.name,
        key=table.key(rid, row),
        position=position,
        after=row,
        schema=SCHEMA,
    )
