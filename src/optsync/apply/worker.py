"""The apply worker: stream records -> mapping -> engine writes, then acknowledge.

Order of effects for one batch: engine writes (one transaction), dead letters (durable), then the
stream acknowledgement. A crash anywhere before the acknowledgement redelivers the batch, and the
engine's position guard makes the second application a no-op (exactly-once effect); the DLQ keeps
one entry per record. A batch the engine refuses (a limit, a bad value) is retried record by
record, so one poison record goes to the DLQ while its neighbours apply; the deletes and opt-outs
of a refused record are still applied, alone (``_opt_out_alone``).

``sync_interval > 0`` (what ``optsync up`` and ``run`` use) takes the disk wait off each batch:
the engine commits without an fsync (visible at once, safe against a crash of the process), the
worker reads on from its own position, and every ``sync_interval`` seconds, or as soon as the
stream has nothing new, it makes the engine durable (``EndpointStore.sync``) and only then
acknowledges everything applied so far. A power cut can undo at most the engine writes since the
last sync; the stream still holds their records unacknowledged and delivers them again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from optsync.apply.dlq import DeadLetterQueue
from optsync.apply.mapping import Mapper, MappingError
from optsync.engine.models import (
    Cause,
    CauseKind,
    EndpointDelete,
    EndpointPatch,
    OptOut,
    WriteResult,
)
from optsync.engine.phone import PhonePolicy, remember_countries
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest
from optsync.events import ChangeEvent, position_of
from optsync.formats import dms
from optsync.stream.base import ChangeStream, StreamRecord

__all__ = ("ApplyStats", "ApplyWorker", "Prepared", "PreparedBatch", "prepare")

logger = logging.getLogger(__name__)

Write = EndpointPatch | EndpointDelete


@dataclass
class ApplyStats:
    """Counters since the worker started (read by status and metrics)."""

    records: int = 0
    applied: int = 0
    stale: int = 0
    missing: int = 0
    """Deletes of endpoints that did not exist (success: the end state is the same)."""
    dead: int = 0
    control: int = 0
    last_position: str | None = None
    last_commit_time: str | None = None
    last_applied_at: float | None = None
    started_at: float = field(default_factory=time.time)


class Prepared(msgspec.Struct, array_like=True):
    """One mapped record: its index in the batch read, its change event and writes.

    ``reason``: set when only part of the record applies (a safe delete) and the rest goes to
    the DLQ with it.
    """

    index: int
    event: ChangeEvent
    writes: list[Write]
    reason: str | None = None


class PreparedBatch(msgspec.Struct, array_like=True):
    """What mapping made of a batch of records (``prepare``): the engine's part is left."""

    items: list[Prepared]
    dead: list[tuple[int, str]]
    """(index of the record, reason) for records that go to the DLQ whole."""
    control: int = 0
    """Control records skipped."""
    countries: list[tuple[str, str | None]] = msgspec.field(default_factory=list)
    """(E.164 number, its country under ``policy``) for the SMS and VOICE addresses of the
    writes, when mapping ran in another process: the engine then looks them up instead of
    parsing the numbers again (``phone.remember_countries``)."""
    policy: str = "possible"


def prepare(mapper: Mapper, records: Sequence[StreamRecord]) -> PreparedBatch:
    """Decode and map ``records`` (no I/O): the part of applying that needs no engine, done in
    the apply thread or in the mapping stage's process (``apply.stage``)."""
    items: list[Prepared] = []
    dead: list[tuple[int, str]] = []
    control = 0
    for index, record in enumerate(records):
        outcome = _map(mapper, record)
        if outcome is None:
            control += 1
        elif isinstance(outcome, str):
            dead.append((index, outcome))
        else:
            event, writes, reason = outcome
            items.append(Prepared(index, event, list(writes), reason))
    return PreparedBatch(items, dead, control)


def _map(
    mapper: Mapper, record: StreamRecord
) -> tuple[ChangeEvent, Sequence[Write], str | None] | str | None:
    """The record's event and writes (and why part of it is dead), a dead-letter reason, or
    None for a control record."""
    try:
        # A real DMS task's record may lack stream-position: the stream offset orders it.
        event = dms.decode(record.data, fallback_position=position_of(record.offset))
    except dms.ControlRecord:
        return None
    except dms.FormatError as exc:
        return f"malformed record: {exc}"
    try:
        mapped = mapper.map(event)
    except MappingError as exc:
        return exc.reason
    except Exception as exc:  # a value no rule foresaw: keep the record, apply the rest
        logger.debug("mapping raised offset=%d", record.offset, exc_info=True)
        return (
            f"mapping failed unexpectedly ({type(exc).__name__}); the record is kept "
            "here: report it as a defect, then replay it once fixed"
        )
    if mapped.failed:
        if not mapped.writes:
            return mapped.failed
        # The safe part (removing an old endpoint) applies; the rest waits in the DLQ.
        return event, mapped.writes, mapped.failed
    return event, mapped.writes, None


@dataclass
class _Item:
    record: StreamRecord
    event: ChangeEvent
    writes: Sequence[Write]


@dataclass
class _Partial(_Item):
    """A record whose safe part applies while the rest goes to the DLQ with ``reason``."""

    reason: str = ""


class ApplyWorker:
    """Consumes one partition of a stream consumer's records into one engine app.

    ``stats``: counters to add to (several workers of one process share one ``ApplyStats``).
    """

    def __init__(
        self,
        stream: ChangeStream,
        mapper: Mapper,
        store: EndpointStore,
        app_id: str,
        dlq: DeadLetterQueue,
        consumer: str = "apply",
        on_applied: Callable[[Sequence[ChangeEvent]], None] | None = None,
        sync_interval: float = 0.0,
        *,
        partition: int = 0,
        stats: ApplyStats | None = None,
    ) -> None:
        if sync_interval < 0:
            raise ValueError("sync_interval must not be negative")
        self.stream = stream
        self.mapper = mapper
        self.store = store
        self.app_id = app_id
        self.dlq = dlq
        self.consumer = consumer
        self.on_applied = on_applied
        self.sync_interval = sync_interval
        self.partition = partition
        self.stats = ApplyStats() if stats is None else stats
        self._handled: int | None = None
        """The last offset applied; None: read on from the acknowledged one."""
        self._unacked: int | None = None
        """The last offset applied but not yet made durable and acknowledged."""
        self._synced_at = time.monotonic()

    def step(self, limit: int = 1000, wait: float = 0.2) -> int:
        """Handle up to ``limit`` records; returns how many (0 when the wait ran out)."""
        records = self.stream.read(
            self.consumer, limit, wait, partition=self.partition, after=self._handled
        )
        if not records:
            self.flush()  # nothing new: make what was applied durable and acknowledge it
            return 0
        self.apply(records)
        if self.sync_interval > 0:
            self._handled = self._unacked = records[-1].offset
        else:
            self.stream.ack(self.consumer, records[-1].offset, partition=self.partition)
        if self._unacked is not None and time.monotonic() - self._synced_at >= self.sync_interval:
            self.flush()
        return len(records)

    def apply(self, records: Sequence[StreamRecord]) -> None:
        """Map ``records``, write them to the engine in one transaction and dead-letter the
        ones that fail; acknowledges nothing (the caller does, after ``EndpointStore.sync``
        when ``sync_interval > 0``). The records may come from several partitions."""
        self.commit(records, prepare(self.mapper, records))

    def commit(self, records: Sequence[StreamRecord], prepared: PreparedBatch) -> None:
        """The engine's part of ``apply``: ``prepared`` is what mapping made of ``records``."""
        if prepared.countries:
            remember_countries(prepared.countries, PhonePolicy(prepared.policy))
        items: list[_Item] = [
            _Partial(records[p.index], p.event, p.writes, p.reason)
            if p.reason is not None
            else _Item(records[p.index], p.event, p.writes)
            for p in prepared.items
        ]
        dead: list[tuple[int, str, bytes, str]] = [
            (records[i].offset, records[i].partition_key, records[i].data, reason)
            for i, reason in prepared.dead
        ]
        dead += self._write(items)
        self.dlq.add(self.consumer, dead)
        self.stats.records += len(records)
        self.stats.control += prepared.control
        self.stats.dead += len(dead)
        if dead:
            logger.warning(
                "dead letters consumer=%s count=%d first_reason=%s",
                self.consumer,
                len(dead),
                dead[0][3],
            )
        if items:
            self.stats.last_position = items[-1].event.position
            self.stats.last_commit_time = items[-1].event.commit_time
            self.stats.last_applied_at = time.time()
            if self.on_applied is not None:
                self.on_applied([i.event for i in items])

    def flush(self) -> None:
        """Make the engine writes durable, then acknowledge every record applied so far."""
        if self._unacked is None:
            return
        self.store.sync()
        self.stream.ack(self.consumer, self._unacked, partition=self.partition)
        self._unacked = None
        self._synced_at = time.monotonic()

    def _map(self, record: StreamRecord) -> _Item | str | None:
        """The record's writes, a dead-letter reason, or None for a control record."""
        outcome = _map(self.mapper, record)
        if outcome is None:
            self.stats.control += 1
            return None
        if isinstance(outcome, str):
            return outcome
        event, writes, reason = outcome
        if reason is not None:
            return _Partial(record, event, writes, reason)
        return _Item(record, event, writes)

    def _write(self, items: list[_Item]) -> list[tuple[int, str, bytes, str]]:
        dead = [
            (i.record.offset, i.record.partition_key, i.record.data, i.reason)
            for i in items
            if isinstance(i, _Partial)
        ]
        writes = [w for i in items for w in i.writes]
        if not writes:
            return dead
        cause = Cause(CauseKind.SOURCE, "")
        durable = self.sync_interval <= 0
        try:
            result = self.store.write_endpoints(self.app_id, writes, cause, durable=durable)
            self._count(result)
            return dead
        except InvalidRequest:
            pass  # find the record(s) the engine refuses; apply the others
        for item in items:
            try:
                result = self.store.write_endpoints(
                    self.app_id, item.writes, cause, durable=durable
                )
            except InvalidRequest as exc:
                reason = str(exc)
                if self._opt_out_alone(item, cause, durable=durable):
                    reason += (
                        "; its OptOut ALL holds, applied alone (the change's other fields were "
                        "not, and a replay cannot add them, its position being taken: the row's "
                        "next change does)"
                    )
                if not isinstance(item, _Partial):  # a partial one is in ``dead`` already
                    dead.append(
                        (item.record.offset, item.record.partition_key, item.record.data, reason)
                    )
                continue
            self._count(result)
        return dead

    def _opt_out_alone(self, item: _Item, cause: Cause, *, durable: bool) -> bool:
        """Apply the safe part of a record the engine refused: its deletes, then its opt-outs.

        An opt-out must not wait for someone to fix, say, an attribute value that is too long,
        and neither may the removal of the endpoint an address change leaves behind. Each write
        keeps the record's position, so none can undo a newer change; each opt-out is written
        alone, and one for an endpoint that does not exist creates nothing (the patch has no
        channel) and does not stop the others. True if an opt-out holds at the record's
        position or a newer one (applied now, or by an earlier attempt).
        """
        deletes = [w for w in item.writes if isinstance(w, EndpointDelete)]
        opt_outs = [
            EndpointPatch(id=w.id, opt_out=OptOut.ALL, position=w.position)
            for w in item.writes
            if isinstance(w, EndpointPatch) and w.opt_out is OptOut.ALL
        ]
        if not opt_outs:
            return False
        if deletes:
            self._write_alone(deletes, cause, durable=durable)
        held = False
        for patch in opt_outs:
            result = self._write_alone([patch], cause, durable=durable)
            held = held or (result is not None and result.applied + result.stale > 0)
        return held

    def _write_alone(
        self, writes: Sequence[Write], cause: Cause, *, durable: bool
    ) -> WriteResult | None:
        """``writes`` in a transaction of their own; None if the engine refuses them."""
        try:
            result = self.store.write_endpoints(self.app_id, writes, cause, durable=durable)
        except InvalidRequest:
            return None
        self._count(result)
        return result

    def _count(self, result: WriteResult) -> None:
        self.stats.applied += result.applied
        self.stats.stale += result.stale
        self.stats.missing += result.missing

    def replay_dead_letters(self, ids: Sequence[int] | None = None) -> tuple[int, int]:
        """Run dead letters through mapping and engine again; returns (replayed, failed)."""
        entries = [e for e in self.dlq.list(limit=1_000_000) if ids is None or e.id in ids]
        replayed: list[int] = []
        failed = 0
        for entry in entries:
            record = StreamRecord(entry.stream_offset, entry.partition_key, entry.data, entry.at)
            outcome = self._map(record)
            if isinstance(outcome, str):
                self.dlq.update_reason(entry.id, outcome)
                failed += 1
                continue
            if outcome is not None:
                still_dead = self._write([outcome])
                if still_dead:
                    self.dlq.update_reason(entry.id, still_dead[0][3])
                    failed += 1
                    continue
            replayed.append(entry.id)
        self.dlq.mark_replayed(replayed)
        return len(replayed), failed
