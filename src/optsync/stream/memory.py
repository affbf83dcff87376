"""``MemoryStream``: the in-memory ``ChangeStream`` for unit tests (nothing survives a restart)."""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Sequence

from optsync.errors import ConfigError
from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats, partition_of
from optsync.stream.leases import share

__all__ = ("MemoryStream",)

logger = logging.getLogger(__name__)


class MemoryStream(ChangeStream):
    """The embedded stream's semantics in lists: same offsets, idempotency, waits, trims,
    partitions and leases (liveness on this process's monotonic clock)."""

    def __init__(self, partitions: int = 1) -> None:
        if partitions < 1:
            raise ConfigError(f"a stream needs at least 1 partition, got {partitions}")
        self._partitions = partitions
        self._changed = threading.Condition()
        self._records: list[list[StreamRecord]] = [[] for _ in range(partitions)]
        self._offsets: list[list[int]] = [[] for _ in range(partitions)]
        """Each partition's record offsets, for ``bisect``."""
        self._event_ids: dict[str, int] = {}
        """``ChangeEvent.event_id`` -> offset, for the retained records."""
        self._record_ids: dict[int, str] = {}
        self._head = 0
        self._consumers: dict[str, list[int]] = {}
        """Consumer -> acknowledged offset per partition."""
        self._checkpoints: dict[str, Checkpoint] = {}
        self._leases: dict[str, dict[int, str]] = {}
        """Consumer -> partition -> worker."""
        self._workers: dict[str, dict[str, float]] = {}
        """Consumer -> worker -> ``time.monotonic()`` its liveness ends."""
        self._closed = False

    @property
    def partitions(self) -> int:
        return self._partitions

    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """Store events not stored yet, and the checkpoint; wake waiting readers."""
        encoded = [
            (e.partition_key, e.event_id, data)
            for e, data in zip(events, encode_many(events), strict=True)
        ]
        with self._changed:
            self._check_open()
            now = time.time()
            # A batch may repeat an event too: the first copy wins, as with INSERT OR IGNORE.
            for partition_key, event_id, data in encoded:
                if event_id in self._event_ids:
                    continue
                record = self._add(partition_key, data, now)
                self._event_ids[event_id] = record.offset
                self._record_ids[record.offset] = event_id
            if checkpoint is not None:
                self._checkpoints[checkpoint.source] = checkpoint
            self._changed.notify_all()
            return self._head

    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> int:
        """Store foreign records as they are (no idempotency: they carry no event id)."""
        with self._changed:
            self._check_open()
            now = time.time()
            for partition_key, data in records:
                self._add(partition_key, bytes(data), now)
            self._changed.notify_all()
            return self._head

    def checkpoint(self, source: str) -> Checkpoint | None:
        """The last checkpoint stored for ``source``."""
        with self._changed:
            self._check_open()
            return self._checkpoints.get(source)

    def checkpoints(self) -> list[Checkpoint]:
        """Every source's last checkpoint, by source name."""
        with self._changed:
            self._check_open()
            return [self._checkpoints[s] for s in sorted(self._checkpoints)]

    def read(
        self,
        consumer: str,
        limit: int,
        wait: float = 0.0,
        *,
        partition: int = 0,
        after: int | None = None,
    ) -> list[StreamRecord]:
        """Records of ``partition`` after the consumer's acknowledged offset (or ``after``);
        waits up to ``wait``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._check_partition(partition)
        deadline = time.monotonic() + wait
        with self._changed:
            self._check_open()
            offsets = self._register(consumer)
            while True:
                start = offsets[partition] if after is None else after
                found = self._after(partition, start, limit)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._changed.wait(remaining)
                self._check_open()

    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        """Move the consumer forward to ``offset`` in ``partition``; a lower offset is ignored."""
        self._check_partition(partition)
        with self._changed:
            self._check_open()
            self._check_offset(offset)
            offsets = self._register(consumer)
            offsets[partition] = max(offsets[partition], offset)

    def seek(self, consumer: str, offset: int) -> None:
        """Set the consumer's offset in every partition, backwards too."""
        with self._changed:
            self._check_open()
            self._check_offset(offset)
            self._consumers[consumer] = [offset] * self._partitions
            self._changed.notify_all()

    def claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        """Renew ``worker``'s liveness for ``ttl`` seconds and settle its share of partitions."""
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        with self._changed:
            self._check_open()
            now = time.monotonic()
            workers = self._workers.setdefault(consumer, {})
            workers[worker] = now + ttl
            for name in [name for name, expires in workers.items() if expires <= now]:
                del workers[name]
            leases = self._leases.setdefault(consumer, {})
            plan = share(worker, workers, leases, self._partitions)
            for partition in plan.give_up:
                del leases[partition]
            for partition in plan.take:
                leases[partition] = worker
            return plan.owned

    def release(self, consumer: str, worker: str) -> None:
        """Free every lease of ``worker`` and forget its liveness."""
        with self._changed:
            self._check_open()
            leases = self._leases.get(consumer, {})
            for partition in [p for p, holder in leases.items() if holder == worker]:
                del leases[partition]
            self._workers.get(consumer, {}).pop(worker, None)

    def trim(self, keep_after: int) -> int:
        """Drop records up to ``keep_after`` that every registered consumer has acknowledged."""
        with self._changed:
            self._check_open()
            dropped = 0
            for partition in range(self._partitions):
                bound = min([keep_after, *(o[partition] for o in self._consumers.values())])
                cut = bisect.bisect_right(self._offsets[partition], bound)
                for record in self._records[partition][:cut]:
                    event_id = self._record_ids.pop(record.offset, None)
                    if event_id is not None:
                        del self._event_ids[event_id]
                del self._records[partition][:cut]
                del self._offsets[partition][:cut]
                dropped += cut
            if dropped:
                logger.debug("stream trimmed records=%d up_to=%d", dropped, keep_after)
            return dropped

    def stats(self) -> StreamStats:
        """Head, oldest retained offset, and each consumer's acknowledged offset and backlog."""
        with self._changed:
            self._check_open()
            firsts = [offsets[0] for offsets in self._offsets if offsets]
            consumers: dict[str, int] = {}
            pending: dict[str, int] = {}
            for name, acked in self._consumers.items():
                behind = [
                    len(offsets) - bisect.bisect_right(offsets, acked[p])
                    for p, offsets in enumerate(self._offsets)
                ]
                lagging = [acked[p] for p, count in enumerate(behind) if count]
                consumers[name] = min(lagging) if lagging else max(acked)
                pending[name] = sum(behind)
            return StreamStats(
                head=self._head,
                oldest=min(firsts) if firsts else self._head + 1,
                consumers=consumers,
                pending=pending,
            )

    def close(self) -> None:
        """Refuse further calls and wake waiting readers (which then raise)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _add(self, partition_key: str, data: bytes, now: float) -> StreamRecord:
        self._head += 1
        partition = partition_of(partition_key, self._partitions)
        record = StreamRecord(self._head, partition_key, data, now, partition)
        self._records[partition].append(record)
        self._offsets[partition].append(self._head)
        return record

    def _after(self, partition: int, offset: int, limit: int) -> list[StreamRecord]:
        start = bisect.bisect_right(self._offsets[partition], offset)
        return self._records[partition][start : start + limit]

    def _register(self, consumer: str) -> list[int]:
        return self._consumers.setdefault(consumer, [0] * self._partitions)

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._partitions:
            raise ValueError(
                f"partition {partition} is outside the stream (0..{self._partitions - 1})"
            )

    def _check_offset(self, offset: int) -> None:
        if not 0 <= offset <= self._head:
            raise ValueError(f"offset {offset} is outside the stream (0..{self._head})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream is closed")
