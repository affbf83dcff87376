"""``PostgresSource``: change capture from PostgreSQL by logical replication (pgoutput).

The log is the WAL, decoded on the server by the ``pgoutput`` plugin through a replication slot
(``optsync_<name>``) and read over the replication protocol (protocol version 1, text tuples),
decoded in ``postgres_pgoutput``. The snapshot reads the tables in an exported snapshot that
is exactly consistent with where the slot starts. Module layout, as for every source:
``postgres_connection`` (connections, errors), ``postgres_preflight`` (settings, privileges,
publication), ``postgres_snapshot`` (chunked reads), ``postgres_pgoutput`` (the protocol),
``postgres_values`` (types), ``postgres_position`` (LSNs and positions).

Why it cannot lose a change
---------------------------
- **The slot keeps every change until capture confirms it.** The server retains the WAL from
  the slot's ``restart_lsn`` and streams, from the slot's confirmed flush LSN, every transaction
  that touched a published table, in commit order. The confirmed flush LSN moves only in
  ``acknowledge(state)``, i.e. after the stream holds the events up to it durably; it is the
  end LSN of the last transaction wholly in the stream. A transaction split over several
  batches is re-sent from its start after a restart (the stream drops the duplicates by event
  id). psycopg2 also forwards the flush position to a keepalive's ``wal_end`` on its own, but
  only when every data message it received has been confirmed, so it never releases a change
  the stream does not hold: that is what keeps an idle slot from pinning WAL.
- **Positions are commit order.** A log event's position is its transaction's commit LSN and
  its ordinal in the transaction (``postgres_position``); commit LSNs of streamed transactions
  strictly increase.
- **The snapshot and the log meet without a gap.** ``CREATE_REPLICATION_SLOT ... LOGICAL
  pgoutput EXPORT_SNAPSHOT`` returns the slot's consistent point L and a snapshot that sees
  exactly the transactions that committed before L; the slot streams exactly those that commit
  at or after L. The snapshot reads every table in a ``REPEATABLE READ`` transaction that
  imports it (``SET TRANSACTION SNAPSHOT``). Loads carry position (L, 0); every streamed change
  has (commit LSN >= L, ordinal >= 1), so the engine's position guard keeps the log's version
  whatever order the two arrive in. The publication exists before the slot, so the slot
  decodes every change after L.
- **Restart in the middle of a snapshot.** The exported snapshot dies with its session. Each
  snapshot batch's state records the table and the last key read (or, for a table without a
  key, the next heap page, with the table's ``relfilenode``), and the log's start L (the slot is
  not confirmed past L until the snapshot ends). After a restart, a *temporary* slot exports a
  new snapshot at L' >= L; the snapshot continues after the cursor with loads at (L', 0), and
  the log still starts at L. A change in [L, L') to a row before the cursor comes from the log
  (the row was loaded at L); the same change to a row after the cursor is older than that
  row's load at L', which already shows it. Rows of a keyless table that move pages between
  the two snapshots were changed after L, so the log carries them whole (REPLICA IDENTITY FULL
  fills unchanged TOAST values from the old row); a rewritten table (new ``relfilenode``:
  VACUUM FULL, CLUSTER) is read again from its first page.
- **A table added to the configuration later** is added to the publication, then snapshotted
  from a temporary slot's snapshot while the log waits at its position.
- **Loud where silence would lose data.** A slot that was invalidated (``wal_status = lost``,
  ``max_slot_wal_keep_size``), dropped, or is missing while the saved state expects it raises
  ``SlotLost`` naming the ways out, at ``open`` and when the stream breaks. A slot whose
  confirmed position is ahead of the saved state is reported (a warning: capture cannot tell an
  idle keepalive confirmation at the moment of a crash from someone else advancing the slot).

Operations
----------
- ``open`` checks the server (``postgres_preflight``): PostgreSQL 14+, ``wal_level =
  logical``, the REPLICATION attribute, a free WAL sender and replication slot, each table's
  existence, SELECT privilege and replica identity (a key or FULL; a warning for partial
  before images), then creates or completes the publication (``optsync_<name>``, or the one
  configured) and, on the first start, the slot. Nothing is dropped except by ``drop_slot``.
- Replica identity: with DEFAULT (the primary key) an UPDATE that keeps the key carries no
  before image and a DELETE only the key columns, so an address change can delete the old
  endpoint only when the endpoint id's columns are in the key (then the update changes the
  key and carries the old key). With FULL every before image is whole.
- An UPDATE that changes the key is written as a delete of the old key and an insert of the new
  one (as Debezium does), so each key's events stay in one partition, in order. A table
  without a key has an empty key: its changes share one partition, in commit order.
- Unchanged TOAST values (large values an UPDATE did not touch, not sent under DEFAULT
  identity) are left out of ``after`` and named in ``extra["unchanged_toast"]``; apply keeps the
  stored value. A NULL is never written in their place.
- ``ALTER TABLE ... ADD/DROP COLUMN`` mid-stream needs nothing: pgoutput sends the new relation
  description before the next change, and events carry the columns the change was made with.
- TRUNCATE of a captured table is logged as a warning and not captured: no row events exist
  for it, and its endpoints stay until the rows' owners are deleted or re-snapshotted.
- The snapshot's ``REPEATABLE READ`` transaction holds an ACCESS SHARE lock on each table it
  has read until it ends: an ``ALTER TABLE`` on such a table waits for the snapshot.
- Connections use ``SESSION_OPTIONS`` (UTC, ISO dates, hex bytea, no statement timeouts) and
  the application name ``optsync-<name>``. A broken stream is reconnected for up to
  ``RECONNECT_FOR`` seconds (``Retryable`` after that); a slot in use by another process is
  waited for up to ``SLOT_BUSY_WAIT`` seconds (a killed capture's session ends by itself).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import select
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg2
import psycopg2.extensions

from optsync.capture.base import CaptureBatch, ChangeSource, Progress
from optsync.capture.postgres import pgoutput
from optsync.capture.postgres.connection import (
    check_url,
    connect,
    masked,
    quote_ident,
    translated,
)
from optsync.capture.postgres.position import (
    CaptureState,
    format_lsn,
    load_position,
    log_position,
    parse_lsn,
)
from optsync.capture.postgres.preflight import (
    ServerFacts,
    TableInfo,
    check_free_slots,
    check_server,
    describe_tables,
    ensure_publication,
    parse_table,
    publication_columns,
    slot_info,
)
from optsync.capture.postgres.snapshot import TableReader
from optsync.capture.postgres.values import Converter, TypeCatalog, TypeInfo, converts
from optsync.errors import ConfigError, Fatal, Retryable
from optsync.events import ChangeEvent, Op

__all__ = ("UNCHANGED_TOAST", "PostgresSource", "SlotLost")

logger = logging.getLogger(__name__)

UNCHANGED_TOAST: Final = "unchanged_toast"
"""``ChangeEvent.extra`` key: columns left out of ``after`` because their value did not change."""
RECONNECT_FOR: Final = 30.0
SLOT_BUSY_WAIT: Final = 15.0
STATUS_INTERVAL: Final = 1.0
"""Seconds between standby status updates psycopg2 sends by itself."""
_FEEDBACK_EVERY: Final = 0.05
"""Seconds between forced status updates after ``acknowledge`` (the rest ride the interval)."""
_IDLE_CONFIRM_EVERY: Final = 1.0
"""Seconds between checkpoints that only move the log past WAL without captured changes."""
_PARTIAL_WAIT: Final = 0.002
"""Seconds to wait for the rest of a transaction before yielding what arrived."""
_ORDINAL_DIGITS: Final = 10
_SLOT_NAME: Final = re.compile(r"^[a-z0-9_]{1,63}$")
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)


class SlotLost(Fatal):
    """The replication slot is gone or invalidated: the changes it held cannot be read."""


@dataclass(frozen=True)
class _LogTable:
    """A captured relation as the log describes it (pgoutput's Relation message)."""

    schema: str
    name: str
    columns: tuple[str, ...]
    converters: tuple[Converter, ...]
    key: tuple[str, ...]
    key_index: tuple[int, ...]
    full: bool
    """REPLICA IDENTITY FULL: old tuples are whole rows."""
    converted: tuple[tuple[int, str, Converter], ...]
    """(index, column, converter) of the columns whose text is converted."""


@dataclass
class _Transaction:
    commit_lsn: int
    commit_time: str
    xid: str
    ordinal: int = 0
    prefix: str = ""
    """``log_position(commit_lsn, 0)`` without its ordinal digits."""

    def __post_init__(self) -> None:
        self.prefix = log_position(self.commit_lsn, 0)[:-_ORDINAL_DIGITS]

    def next_position(self) -> str:
        self.ordinal += 1
        return f"{self.prefix}{self.ordinal:0{_ORDINAL_DIGITS}d}"


class PostgresSource(ChangeSource):
    """Snapshot + pgoutput log of a PostgreSQL database (see the module notes).

    ``tables`` are ``table`` (schema public) or ``schema.table``. ``chunk_size`` rows are read
    per snapshot query (yielded in batches of at most ``max_events``); ``idle_wait`` is how long
    the log waits for a change before it yields an empty batch.
    """

    def __init__(
        self,
        url: str,
        tables: Sequence[str],
        *,
        name: str = "postgres",
        slot: str | None = None,
        publication: str | None = None,
        chunk_size: int = 10_000,
        idle_wait: float = 0.2,
    ) -> None:
        if isinstance(tables, str):
            raise TypeError("tables must be a sequence of table names, not one string")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if idle_wait < 0:
            raise ValueError("idle_wait must not be negative")
        check_url(url)
        refs = [parse_table(t) for t in tables]
        if not refs:
            raise ConfigError("[source] tables is empty: list the tables to capture")
        self.name = name
        self.url = url
        self.tables = tuple(dict.fromkeys(r.qualified for r in refs))
        self._refs = {r.qualified: r for r in refs}
        self.slot = slot if slot is not None else f"optsync_{name}"
        if not _SLOT_NAME.match(self.slot):
            raise ConfigError(
                f"replication slot name {self.slot!r} is not allowed: use lower-case letters, "
                "digits and underscores, at most 63 (set the source name or slot)"
            )
        self._own_publication_name = publication is None
        self.publication = publication if publication is not None else self.slot
        self.chunk_size = chunk_size
        self.idle_wait = idle_wait
        self._application = f"optsync-{name}"[:63]
        self._state = CaptureState()
        self._conn: Any = None
        self._snap: Any = None
        self._repl: Any = None
        self._cur: Any = None
        """The replication cursor of ``_repl``."""
        self._facts: ServerFacts | None = None
        self._info: dict[str, TableInfo] = {}
        self._catalog = TypeCatalog(self._fetch_types)
        self._relations: dict[int, _LogTable | None] = {}
        self._acked = 0
        self._confirmed = 0
        self._last_forced = 0.0

    # -- open -------------------------------------------------------------------------------

    def open(self, state: str | None) -> None:
        """Preflight, publication and slot; prepare to resume from ``state`` (None: start)."""
        if self._conn is not None:
            raise RuntimeError(f"source {self.name!r} is already open")
        saved = CaptureState.parse(state, self.name) if state is not None else CaptureState()
        with self._translated("connect"):
            self._conn = connect(self.url, self._application)
        try:
            self._open(saved)
        except BaseException:
            self.close()
            raise

    def _open(self, saved: CaptureState) -> None:
        with self._translated("preflight"):
            cur = self._conn.cursor()
            facts = self._facts = check_server(cur)
            infos = describe_tables(cur, [self._refs[t] for t in self.tables])
            self._info = {i.ref.qualified: i for i in infos}
            slot = self._existing_slot(cur, facts, saved.log_after)
        state = self._plan(saved, slot)
        needs_snapshot = state.phase == "snapshot"
        with self._translated("preflight"):
            check_free_slots(facts, 1 if (slot is None or needs_snapshot) else 0, cur)
            # The publication must exist before the slot: the slot decodes changes against it.
            ensure_publication(cur, self.publication, infos, facts.user)
        if needs_snapshot:
            state = self._begin_snapshot(state, create_slot=slot is None)
        self._state = state
        self._acked = self._confirmed = state.log_after or 0
        logger.info(
            "capture opened source=%s url=%s slot=%s publication=%s phase=%s log_after=%s",
            self.name,
            masked(self.url),
            self.slot,
            self.publication,
            state.phase,
            format_lsn(state.log_after) if state.log_after is not None else "-",
        )

    def _existing_slot(
        self, cur: Any, facts: ServerFacts, expected: int | None
    ) -> dict[str, Any] | None:
        """The slot's row if it exists, after checking it is ours, usable and free."""
        deadline = time.monotonic() + SLOT_BUSY_WAIT
        while True:
            slot = slot_info(cur, self.slot)
            if slot is None:
                return None
            if slot.get("plugin") != "pgoutput" or slot.get("database") != facts.database:
                raise ConfigError(
                    f"replication slot {self.slot!r} exists but is not a pgoutput slot of database "
                    f"{facts.database!r} (plugin {slot.get('plugin')!r}, database "
                    f"{slot.get('database')!r}): give this source another name or slot"
                )
            self._check_not_lost(slot, expected)
            pid = slot.get("active_pid")
            if not slot.get("active") or pid is None:
                return slot
            if time.monotonic() > deadline:
                raise Retryable(
                    f"source {self.name!r}: replication slot {self.slot!r} is in use by server "
                    f"process {pid}: another capture with this name is running; stop it first"
                )
            time.sleep(0.1)

    def _check_not_lost(self, slot: dict[str, Any], expected: int | None) -> None:
        reason = slot.get("invalidation_reason")
        if slot.get("wal_status") == "lost" or reason or slot.get("conflicting"):
            why = f"was invalidated ({reason or 'wal_status = lost'})"
            if not reason:
                why += ": it fell more than max_slot_wal_keep_size behind"
            raise self._slot_lost(why, expected)

    def _plan(self, saved: CaptureState, slot: dict[str, Any] | None) -> CaptureState:
        """The state to start from: what to snapshot and where the log starts."""
        confirmed = slot.get("confirmed_flush_lsn") if slot else None
        flushed = parse_lsn(confirmed) if confirmed else None
        if saved.log_after is None:
            # Nothing captured yet (or --resnapshot): every table, and the log from the slot.
            if slot is not None:
                logger.info(
                    "snapshot of every table source=%s slot=%s exists log_after=%s",
                    self.name,
                    self.slot,
                    confirmed,
                )
            return CaptureState(phase="snapshot", log_after=flushed)
        if slot is None:
            raise self._slot_lost("does not exist", saved.log_after)
        if flushed is not None and flushed > saved.log_after:
            logger.warning(
                "slot ahead of checkpoint source=%s slot=%s confirmed=%s saved=%s bytes=%d: "
                "either capture confirmed WAL without captured changes just before it stopped "
                "(harmless), or another client advanced or re-created the slot and the changes "
                "in between are lost to optsync; if in doubt, re-snapshot "
                "(optsync capture --resnapshot)",
                self.name,
                self.slot,
                confirmed,
                format_lsn(saved.log_after),
                flushed - saved.log_after,
            )
        done = tuple(t for t in saved.tables_done if t in self._info)
        if saved.phase == "log":
            missing = [t for t in self.tables if t not in done]
            if not missing:
                return replace(saved, tables_done=done)
            logger.info(
                "snapshot of added tables source=%s tables=%s", self.name, ",".join(missing)
            )
            return replace(saved, phase="snapshot", tables_done=done, table=None, rows=0)
        table = saved.table if saved.table in self._info else None
        return replace(saved, tables_done=done, table=table, rows=saved.rows if table else 0)

    def _begin_snapshot(self, state: CaptureState, *, create_slot: bool) -> CaptureState:
        """Export a snapshot (from the new slot, or a temporary one) and import it."""
        name = self.slot if create_slot else f"{self.slot[:48]}_snap_{secrets.token_hex(4)}"
        temporary = "" if create_slot else " TEMPORARY"
        with self._translated("snapshot start"):
            repl = connect(self.url, self._application, replication=True)
            try:
                cur = repl.cursor()
                cur.execute(
                    f"CREATE_REPLICATION_SLOT {name}{temporary} LOGICAL pgoutput EXPORT_SNAPSHOT"
                )
                _, consistent_point, snapshot, _ = cur.fetchone()
                snap = connect(self.url, self._application)
                snap.autocommit = False
                snap.set_session(
                    isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                    readonly=True,
                )
                snap.cursor().execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            finally:
                repl.close()  # the snapshot now lives in our transaction; a temporary slot goes
        self._snap = snap
        point = parse_lsn(consistent_point)
        if create_slot:
            logger.info(
                "replication slot created source=%s slot=%s consistent_point=%s",
                self.name,
                self.slot,
                consistent_point,
            )
        log_after = state.log_after if state.log_after is not None else point
        return replace(state, phase="snapshot", log_after=log_after, snapshot_at=point)

    # -- batches ----------------------------------------------------------------------------

    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches, a batch that switches the state to the log, then log batches."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        if self._conn is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        if self._state.phase == "snapshot":
            yield from self._snapshot(max_events, progress)
        yield from self._log(max_events)

    def _snapshot(self, max_events: int, progress: Progress | None) -> Iterator[CaptureBatch]:
        state = self._state
        assert state.snapshot_at is not None and state.log_after is not None
        at = state.snapshot_at
        pending = [t for t in self.tables if t not in state.tables_done]
        if state.table in pending:
            pending.remove(state.table)
            pending.insert(0, state.table)
        limit = min(self.chunk_size, max_events)
        logger.info(
            "snapshot started source=%s at=%s log_after=%s tables=%s",
            self.name,
            format_lsn(state.snapshot_at),
            format_lsn(state.log_after),
            ",".join(pending),
        )
        for name in pending:
            info = self._info[name]
            if state.table == name and state.relfilenode not in (None, info.relfilenode):
                logger.info("snapshot restarts rewritten table source=%s table=%s", self.name, name)
                state = replace(state, after_key=None, page=0, rows=0)
            if state.table != name:
                state = replace(state, table=name, after_key=None, page=0, rows=0)
            state = replace(state, relfilenode=info.relfilenode)
            with self._translated("snapshot"):
                cur = self._snap.cursor()
                columns, row_filter = publication_columns(cur, self.publication, info)
                types = dict(zip(info.columns, info.column_types, strict=True))
                converters = self._catalog.converters(types[c] for c in columns)
                reader = TableReader(cur, info, columns, converters, row_filter)
                expected = info.estimated_rows
                if expected is None and progress is not None:
                    expected = reader.count()  # never analyzed: usually small, count it
            if progress is not None:
                progress(name, state.rows, expected)
            finished = False
            while not finished:
                with self._translated("snapshot"):
                    chunk = reader.read(state.after_key, state.page, self.chunk_size)
                finished = chunk.done
                rows = chunk.rows
                for start in range(0, len(rows), limit):
                    part = rows[start : start + limit]
                    last = start + len(part) == len(rows)
                    events = self._loads(info, part, at, state.rows)
                    state = replace(
                        state,
                        rows=state.rows + len(part),
                        after_key=chunk.key(start + len(part) - 1),
                        page=chunk.next_page if last else state.page,
                    )
                    if last and finished:
                        state = replace(
                            state,
                            table=None,
                            after_key=None,
                            page=0,
                            relfilenode=None,
                            tables_done=(*state.tables_done, name),
                        )
                    self._state = state
                    if progress is not None:
                        progress(name, state.rows, expected)
                    yield CaptureBatch(events, state.dump(self.slot))
                if not rows and finished:
                    state = replace(
                        state,
                        table=None,
                        after_key=None,
                        page=0,
                        relfilenode=None,
                        tables_done=(*state.tables_done, name),
                    )
                elif not rows:
                    state = replace(state, page=chunk.next_page)
            if progress is not None:
                progress(name, state.rows, state.rows)
        with self._translated("snapshot end"):
            self._snap.commit()
            self._snap.close()
        self._snap = None
        state = replace(state, phase="log", table=None, rows=0, resnapshot=False)
        self._state = state
        logger.info(
            "snapshot done source=%s at=%s log_after=%s",
            self.name,
            format_lsn(state.snapshot_at or 0),
            format_lsn(state.log_after or 0),
        )
        yield CaptureBatch((), state.dump(self.slot))

    @staticmethod
    def _loads(
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

    def _log(self, max_events: int) -> Iterator[CaptureBatch]:
        self._start_streaming(self._state.log_after or 0)
        repl, cur = self._repl, self._cur
        pending: list[ChangeEvent] = []
        transaction: _Transaction | None = None
        deadline = time.monotonic() + self.idle_wait
        last_idle_confirm = time.monotonic()
        # The state of the last batch handed over. A commit read since then moved
        # ``self._state`` past events that are still only in ``pending``.
        handed = self._state
        committed = 0  # how many events at the head of ``pending`` belong to commits read
        while self._repl is repl and repl is not None:
            try:
                self._send_feedback()
                message = cur.read_message()
            except psycopg2.Error as exc:
                # Everything not handed over is read again, from the last boundary handed over
                # (whole transactions: the slot sends a commit again from its start).
                pending, transaction, committed = [], None, 0
                self._state = handed
                self._recover(exc)
                repl, cur = self._repl, self._cur
                continue
            if message is None:
                now = time.monotonic()
                # Mid-transaction the rest is usually on its way: batch it together.
                if pending and transaction is not None and self._wait_readable(repl, _PARTIAL_WAIT):
                    continue
                if pending:
                    handed = self._state
                    yield self._batch(pending)
                    pending, committed = [], 0
                    deadline = time.monotonic() + self.idle_wait
                    continue
                wal_end = cur.wal_end
                log_after = self._state.log_after or 0
                if (
                    transaction is None
                    and wal_end > log_after
                    and now - last_idle_confirm >= _IDLE_CONFIRM_EVERY
                ):
                    # Nothing captured up to the server's wal_end: move the checkpoint there,
                    # so acknowledge() confirms it and the slot releases the WAL.
                    self._state = handed = replace(self._state, log_after=wal_end)
                    last_idle_confirm = now
                    deadline = now + self.idle_wait
                    yield CaptureBatch((), self._state.dump(self.slot))
                    continue
                if now >= deadline:
                    deadline = now + self.idle_wait
                    handed = self._state
                    yield CaptureBatch((), self._state.dump(self.slot))
                    continue
                self._wait_readable(repl, min(deadline - now, STATUS_INTERVAL))
                continue
            in_transaction = transaction is not None
            transaction = self._handle(message.payload, transaction, pending)
            if in_transaction and transaction is None:  # a commit
                committed = len(pending)
            if len(pending) >= max_events:
                # The slice's state may name the last commit read only if every event of it is
                # in the slice; otherwise it keeps the boundary handed over before.
                if committed <= max_events:
                    handed = self._state
                yield CaptureBatch(pending[:max_events], handed.dump(self.slot))
                pending = pending[max_events:]
                committed = max(0, committed - max_events)
                deadline = time.monotonic() + self.idle_wait

    def _batch(self, events: list[ChangeEvent]) -> CaptureBatch:
        return CaptureBatch(events, self._state.dump(self.slot))

    @staticmethod
    def _wait_readable(repl: Any, timeout: float) -> bool:
        if timeout <= 0:
            return False
        readable, _, _ = select.select([repl], [], [], timeout)
        return bool(readable)

    def _handle(
        self, payload: bytes, transaction: _Transaction | None, out: list[ChangeEvent]
    ) -> _Transaction | None:
        try:
            message = pgoutput.decode(payload)
        except pgoutput.ProtocolError as exc:
            raise Fatal(f"source {self.name!r}: unreadable pgoutput message: {exc}") from exc
        if isinstance(message, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
            if transaction is None:
                raise Fatal(f"source {self.name!r}: a row change arrived outside a transaction")
            table = self._relations.get(message.relation)
            if table is None:
                return transaction  # a table capture does not read (a publication of all tables)
            if isinstance(message, pgoutput.Update):
                self._update(out, transaction, table, message)
            elif isinstance(message, pgoutput.Insert):
                after, unchanged = _row(table, message.new)
                self._emit(out, transaction, table, Op.INSERT, None, after, unchanged)
            else:
                before = _old_row(table, message.old, message.old_kind)
                self._emit(out, transaction, table, Op.DELETE, before, None, [])
            return transaction
        if isinstance(message, pgoutput.Begin):
            return _Transaction(
                message.final_lsn, _commit_time(message.commit_time), str(message.xid)
            )
        if isinstance(message, pgoutput.Commit):
            self._state = replace(self._state, log_after=message.end_lsn)
            return None
        if isinstance(message, pgoutput.Relation):
            self._relations[message.oid] = self._log_table(message)
        elif isinstance(message, pgoutput.Truncate):
            for oid in message.relations:
                truncated = self._relations.get(oid)
                if truncated is not None:
                    logger.warning(
                        "truncate not captured source=%s table=%s.%s: its endpoints stay; "
                        "delete them or re-snapshot into a fresh app",
                        self.name,
                        truncated.schema,
                        truncated.name,
                    )
        return transaction

    def _update(
        self,
        out: list[ChangeEvent],
        transaction: _Transaction,
        table: _LogTable,
        message: pgoutput.Update,
    ) -> None:
        after, unchanged = _row(table, message.new)
        before = None
        if message.old is not None and message.old_kind is not None:
            before = _old_row(table, message.old, message.old_kind)
            if unchanged and message.old_kind == "O":
                # REPLICA IDENTITY FULL sends the whole old row: unchanged means that value.
                for column in unchanged:
                    if column in before:
                        after[column] = before[column]
                unchanged = [c for c in unchanged if c not in after]
        if table.key and before is not None:
            old_key = [before.get(k) for k in table.key]
            new_key = [after.get(k, before.get(k)) for k in table.key]
            if old_key != new_key:
                self._emit(out, transaction, table, Op.DELETE, before, None, [])
                self._emit(out, transaction, table, Op.INSERT, None, after, unchanged)
                return
        self._emit(out, transaction, table, Op.UPDATE, before, after, unchanged)

    @staticmethod
    def _emit(
        out: list[ChangeEvent],
        transaction: _Transaction,
        table: _LogTable,
        op: Op,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        unchanged: list[str],
    ) -> None:
        row = before if op is Op.DELETE else after
        assert row is not None
        out.append(
            ChangeEvent(
                op=op,
                table=table.name,
                key={k: row.get(k) for k in table.key},
                position=transaction.next_position(),
                before=before,
                after=after,
                schema=table.schema,
                commit_time=transaction.commit_time,
                transaction_id=transaction.xid,
                extra={UNCHANGED_TOAST: unchanged} if unchanged else {},
            )
        )

    def _log_table(self, relation: pgoutput.Relation) -> _LogTable | None:
        qualified = f"{relation.schema}.{relation.name}"
        info = self._info.get(qualified)
        if info is None:
            return None
        columns = tuple(c.name for c in relation.columns)
        with self._translated("type look-up"):
            converters = tuple(self._catalog.converters(c.type_oid for c in relation.columns))
        if relation.identity in ("d", "i"):
            key = tuple(c.name for c in relation.columns if c.key)  # exactly the identity key
        else:
            key = tuple(k for k in info.key if k in columns)
        logger.debug("relation source=%s table=%s columns=%d", self.name, qualified, len(columns))
        return _LogTable(
            schema=relation.schema,
            name=relation.name,
            columns=columns,
            converters=converters,
            key=key,
            key_index=tuple(columns.index(k) for k in key),
            full=relation.identity == "f",
            converted=tuple(
                (i, name, convert)
                for i, (name, convert) in enumerate(zip(columns, converters, strict=True))
                if converts(convert)
            ),
        )

    # -- the replication connection ---------------------------------------------------------

    def _start_streaming(self, start: int) -> None:
        with self._translated("log start"):
            repl = connect(self.url, self._application, replication=True)
        try:
            cur = repl.cursor()
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                start_lsn=start,
                options={
                    "proto_version": "1",
                    "publication_names": quote_ident(self.publication),
                },
                status_interval=STATUS_INTERVAL,
            )
        except psycopg2.Error as exc:
            repl.close()
            self._raise_for_slot(exc, "log start")
            raise AssertionError("unreachable") from exc
        self._repl, self._cur = repl, cur
        self._relations.clear()  # pgoutput sends every relation again on a new stream
        self._confirmed = max(self._confirmed, start)
        logger.info(
            "log started source=%s slot=%s from=%s", self.name, self.slot, format_lsn(start)
        )

    def _raise_for_slot(self, exc: psycopg2.Error, action: str) -> None:
        """Raise ``SlotLost`` if the slot is gone or invalidated, else the translated error."""
        expected = self._state.log_after
        try:
            with self._translated("slot check"):
                cur = self._conn.cursor()
                slot = slot_info(cur, self.slot)
        except Retryable:
            slot = {}  # the server itself is unreachable: the original error says so
        if slot is None:
            raise self._slot_lost("was dropped", expected) from exc
        if slot:
            self._check_not_lost(slot, expected)
        with self._translated(action):
            raise exc

    def _recover(self, exc: psycopg2.Error) -> None:
        """Reconnect a broken stream from the last state, or raise why it cannot be."""
        logger.warning("log stream broken source=%s reason=%s", self.name, str(exc).strip())
        self._close_stream()
        deadline = time.monotonic() + RECONNECT_FOR
        pause = 0.1
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    with self._translated("reconnect"):
                        self._conn = connect(self.url, self._application)
                self._start_streaming(self._state.log_after or 0)
                return
            except Retryable:
                if time.monotonic() > deadline:
                    raise
                try:
                    if self._conn is not None:
                        self._conn.close()
                finally:
                    self._conn = None
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _send_feedback(self) -> None:
        """Confirm the acknowledged LSN to the slot (forced at most every ``_FEEDBACK_EVERY``)."""
        acked = self._acked
        if acked <= self._confirmed or self._repl is None:
            return
        now = time.monotonic()
        force = now - self._last_forced >= _FEEDBACK_EVERY
        self._cur.send_feedback(write_lsn=acked, flush_lsn=acked, force=force)
        if force:
            self._last_forced = now
        self._confirmed = acked

    def _close_stream(self) -> None:
        repl, self._repl, self._cur = self._repl, None, None
        if repl is not None:
            with contextlib.suppress(psycopg2.Error):
                repl.close()

    # -- acknowledge, close, slot management ------------------------------------------------

    def acknowledge(self, state: str) -> None:
        """The stream holds everything up to ``state``: let the slot release the WAL before it.

        Only records the position (safe from any thread); the log loop confirms it to the
        server at its next turn, and ``close`` confirms what is left.
        """
        acked = CaptureState.parse(state, self.name)
        if acked.phase == "log" and acked.log_after is not None:
            self._acked = max(self._acked, acked.log_after)

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        return {(i.ref.schema, i.ref.name): i.columns for i in self._info.values()}

    def close(self) -> None:
        """Confirm what was acknowledged, then close every connection (the slot stays)."""
        if self._repl is not None and self._acked > self._confirmed:
            with contextlib.suppress(psycopg2.Error):
                self._cur.send_feedback(write_lsn=self._acked, flush_lsn=self._acked, force=True)
        self._close_stream()
        for attribute in ("_snap", "_conn"):
            conn = getattr(self, attribute)
            setattr(self, attribute, None)
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()

    def resnapshot_state(self) -> str:
        """A state that makes ``open`` snapshot every table again and read the log from the
        slot's confirmed position (the slot is created if missing)."""
        return CaptureState(phase="snapshot", resnapshot=True).dump(self.slot)

    def drop_slot(self) -> None:
        """Drop the replication slot, and the publication when capture owns it under its
        default name. The saved state can no longer be resumed afterwards."""
        with self._translated("drop slot"):
            conn = connect(self.url, self._application)
        try:
            with self._translated("drop slot"):
                cur = conn.cursor()
                deadline = time.monotonic() + SLOT_BUSY_WAIT
                while True:
                    slot = slot_info(cur, self.slot)
                    if slot is None or not slot.get("active"):
                        break
                    if time.monotonic() > deadline:
                        raise Retryable(
                            f"source {self.name!r}: replication slot {self.slot!r} is in use by "
                            f"server process {slot.get('active_pid')}: stop that capture first"
                        )
                    time.sleep(0.1)
                if slot is not None:
                    cur.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                    logger.info("replication slot dropped source=%s slot=%s", self.name, self.slot)
                if self._own_publication_name:
                    cur.execute(
                        "SELECT 1 FROM pg_publication WHERE pubname = %s AND pubowner = "
                        "(SELECT oid FROM pg_roles WHERE rolname = current_user)",
                        (self.publication,),
                    )
                    if cur.fetchone() is not None:
                        cur.execute(f"DROP PUBLICATION {quote_ident(self.publication)}")
                        logger.info(
                            "publication dropped source=%s publication=%s",
                            self.name,
                            self.publication,
                        )
        finally:
            conn.close()

    # -- helpers ----------------------------------------------------------------------------

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

    def _slot_lost(self, why: str, expected: int | None) -> SlotLost:
        since = f"since {format_lsn(expected)} " if expected is not None else ""
        return SlotLost(
            f"source {self.name!r}: replication slot {self.slot!r} {why}; the changes {since}"
            "that it held are gone from the server, so capture cannot go on without losing "
            "them. Ways out: start over from a new snapshot with `optsync capture --drop-slot` "
            "then `optsync capture --resnapshot` (endpoints of rows deleted meanwhile stay: "
            "snapshot into a fresh app to be exact); to keep it from happening again, raise "
            "max_slot_wal_keep_size (or set it to -1) and keep capture running, watching "
            "pg_replication_slots.wal_status"
        )

    def _translated(self, action: str) -> Any:
        return translated(self.name, action)


def _row(table: _LogTable, values: Sequence[pgoutput.Value]) -> tuple[dict[str, Any], list[str]]:
    """A new tuple as a row, and the columns whose value was not sent (unchanged TOAST)."""
    if len(values) != len(table.columns):
        raise Fatal(
            f"a pgoutput tuple of {table.schema}.{table.name} has {len(values)} columns where its "
            f"relation has {len(table.columns)}"
        )
    row: dict[str, Any] = dict(zip(table.columns, values, strict=True))
    for i, name, convert in table.converted:
        value = values[i]
        if isinstance(value, str):
            row[name] = convert(value)
    unchanged: list[str] = []
    if pgoutput.UNCHANGED in values:
        unchanged = [
            n for n, v in zip(table.columns, values, strict=True) if v is pgoutput.UNCHANGED
        ]
        for name in unchanged:
            del row[name]
    return row, unchanged


def _old_row(table: _LogTable, values: Sequence[pgoutput.Value], kind: str) -> dict[str, Any]:
    """An old tuple: the whole row (``O``) or only the key columns (``K``)."""
    row, _ = _row(table, values)
    if kind == "K":
        return {k: row.get(k) for k in table.key if k in row}
    return row


def _commit_time(micros: int) -> str:
    moment = _PG_EPOCH + timedelta(microseconds=micros)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
