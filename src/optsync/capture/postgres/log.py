"""The log: the replication connection's read loop, transaction assembly and LSN feedback.

``LogReading`` is the log half of ``PostgresSource`` (which inherits it): ``_log`` starts
streaming the slot from the state's ``log_after`` (``START_REPLICATION ... LOGICAL``, pgoutput
protocol version 1, the source's publication), decodes each message (``pgoutput``), assembles
the row changes of each transaction into change events at (commit LSN, ordinal) positions, and
yields them in batches whose state names the last transaction boundary handed over. The
acknowledged LSN is confirmed to the slot from the loop (``_send_feedback``). A broken stream is
reconnected from the last state (``_recover``); a slot that is gone or invalidated raises
``SlotLost``.

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
"""

from __future__ import annotations

import contextlib
import logging
import select
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg2
from msgspec.structs import replace

from optsync.capture.base import CaptureBatch
from optsync.capture.postgres import pgoutput
from optsync.capture.postgres.connection import connect, quote_ident, translated
from optsync.capture.postgres.position import CaptureState, format_lsn, log_position
from optsync.capture.postgres.preflight import TableInfo, slot_info
from optsync.capture.postgres.values import Converter, TypeCatalog, converts
from optsync.errors import Fatal, Retryable
from optsync.events import ChangeEvent, Op

__all__ = ("RECONNECT_FOR", "STATUS_INTERVAL", "UNCHANGED_TOAST", "LogReading", "SlotLost")

logger = logging.getLogger(__name__)

UNCHANGED_TOAST: Final = "unchanged_toast"
"""``ChangeEvent.extra`` key: columns left out of ``after`` because their value did not change."""
RECONNECT_FOR: Final = 30.0
STATUS_INTERVAL: Final = 1.0
"""Seconds between standby status updates psycopg2 sends by itself."""
_FEEDBACK_EVERY: Final = 0.05
"""Seconds between forced status updates after ``acknowledge`` (the rest ride the interval)."""
_IDLE_CONFIRM_EVERY: Final = 1.0
"""Seconds between checkpoints that only move the log past WAL without captured changes."""
_PARTIAL_WAIT: Final = 0.002
"""Seconds to wait for the rest of a transaction before yielding what arrived."""
_ORDINAL_DIGITS: Final = 10
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


class LogReading:
    """The log half of ``PostgresSource``: reading the slot, and confirming LSNs to it.

    The attributes below are set by ``PostgresSource.__init__`` and ``open``.
    """

    name: str
    url: str
    slot: str
    publication: str
    idle_wait: float
    _application: str
    _state: CaptureState
    _conn: Any
    _repl: Any
    _cur: Any
    """The replication cursor of ``_repl``."""
    _info: dict[str, TableInfo]
    _catalog: TypeCatalog
    _relations: dict[int, _LogTable | None]
    _acked: int
    """The largest LSN ``acknowledge`` was given (the stream holds everything before it)."""
    _confirmed: int
    """The largest LSN sent to the server as flushed."""
    _last_forced: float

    # -- reading ----------------------------------------------------------------------------

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

    # -- the slot ----------------------------------------------------------------------------

    def _check_not_lost(self, slot: dict[str, Any], expected: int | None) -> None:
        reason = slot.get("invalidation_reason")
        if slot.get("wal_status") == "lost" or reason or slot.get("conflicting"):
            why = f"was invalidated ({reason or 'wal_status = lost'})"
            if not reason:
                why += ": it fell more than max_slot_wal_keep_size behind"
            raise self._slot_lost(why, expected)

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
