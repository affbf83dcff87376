"""The ``ChangeStream`` interface.

Records are stored in the AWS DMS -> Kinesis JSON format (``optsync.formats.dms``), so a
record written by a real DMS task is as welcome as one written by optsync's capture.

Partitions: a stream has ``partitions`` partitions (the embedded one defaults to 1). A record
goes to ``partition_of(partition_key, partitions)``, so every change of one row lands in one
partition, in the order it was appended. Offsets are unique across the whole stream and grow
within each partition; a consumer keeps one acknowledged offset per partition.

Leases: several apply workers share one consumer by taking partitions with ``claim``. Each
partition is leased to one live worker at a time and the partitions are spread over the live
workers; a worker that stops renewing loses its leases after ``ttl`` seconds. Exclusivity is a
matter of efficiency, not of correctness: a worker that lost its lease without knowing it
applies records a second time, which the engine's position guard makes harmless.
"""

from __future__ import annotations

import itertools
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from optsync.events import ChangeEvent

__all__ = ("ChangeStream", "Checkpoint", "StreamRecord", "StreamStats", "partition_of")


READ_ANY_SLICE = 0.01
"""Seconds ``ChangeStream.read_any`` waits on one partition before it looks at the next."""


def partition_of(partition_key: str, partitions: int) -> int:
    """The partition of a record: CRC-32 of its key, modulo the partition count (stable across
    processes and versions, unlike ``hash``)."""
    if partitions == 1:
        return 0
    return zlib.crc32(partition_key.encode()) % partitions


class StreamRecord(msgspec.Struct, frozen=True):
    """One stored record: its offset in the stream, partition key and raw bytes.

    A ``msgspec.Struct``: apply builds one per record, and a Struct is built ~5x faster than a
    frozen dataclass.
    """

    offset: int
    partition_key: str
    data: bytes
    appended_at: float
    """Unix time the stream took the record."""
    partition: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """A source's saved state (e.g. its last captured position), stored with the events."""

    source: str
    state: str


@dataclass(frozen=True)
class StreamStats:
    head: int
    """Offset of the newest record (0 when empty)."""
    oldest: int
    """Offset of the oldest retained record (head + 1 when empty)."""
    consumers: dict[str, int]
    """Consumer name -> acknowledged offset: the lowest over the partitions that hold records it
    has not acknowledged, or the highest when there is none (so it equals ``head`` once the
    consumer has acknowledged everything, whatever the partitions)."""
    pending: dict[str, int]
    """Consumer name -> records after its acknowledged offsets, over every partition (exact;
    NATS JetStream counts each message after the first one as one, see ``stream.nats``)."""


class ChangeStream(ABC):
    """A durable log with named consumers.

    Offsets are positive, unique and grow within a partition; they need not be dense (the
    embedded stream numbers records 1, 2, 3..., NATS JetStream ``sequence * 1024 + index``), so
    callers compare offsets, never count with them.
    """

    @property
    def partitions(self) -> int:
        """How many partitions records are spread over (fixed when the stream is created)."""
        return 1

    @abstractmethod
    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """Store events durably, and then the source checkpoint: it never gets ahead of them.

        The embedded stream stores both atomically; NATS JetStream stores the checkpoint once
        every event is acknowledged by the server (at least once, see ``stream.nats``).

        Idempotent: an event repeated within a batch is stored once, and a batch appended again
        is not stored again. The embedded and memory streams skip any event whose id is stored
        already, in any batch; NATS JetStream deduplicates whole messages within its duplicate
        window, so an event re-sent in a batch cut differently may be stored twice (the engine's
        position guard makes that harmless). Returns the stream's head offset.
        """

    @abstractmethod
    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> int:
        """Store foreign records (partition key, DMS JSON bytes) as they are."""

    @abstractmethod
    def checkpoint(self, source: str) -> Checkpoint | None:
        """The last checkpoint stored for ``source``."""

    @abstractmethod
    def checkpoints(self) -> list[Checkpoint]:
        """The last checkpoint of every source the stream holds one for, by source name (a
        reader that does not know the source's name, e.g. ``optsync status --data-dir``)."""

    @abstractmethod
    def read(
        self,
        consumer: str,
        limit: int,
        wait: float = 0.0,
        *,
        partition: int = 0,
        after: int | None = None,
    ) -> list[StreamRecord]:
        """Records of ``partition`` after the consumer's acknowledged offset, oldest first.

        ``after``: read after this offset instead (a consumer that acknowledges less often than
        it reads passes the last offset it handled; it must not be below the acknowledged one).
        Waits up to ``wait`` seconds for a record when there is none yet.
        """

    @abstractmethod
    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        """The consumer has durably handled every record of ``partition`` up to ``offset``.

        A lower offset than the one stored is ignored. The acknowledgement may become durable
        after this returns: losing it only delivers the records again.
        """

    @abstractmethod
    def seek(self, consumer: str, offset: int) -> None:
        """Move the consumer's acknowledged offset in every partition (0 replays everything)."""

    def read_any(
        self,
        consumer: str,
        limit: int,
        wait: float,
        after: Mapping[int, int | None],
    ) -> dict[int, list[StreamRecord]]:
        """Records of several partitions at once: up to ``limit`` of each partition in
        ``after`` (partition -> the offset to read after, None: the acknowledged one), waiting
        up to ``wait`` seconds until any of them has one. Partitions with nothing are left out.

        This default reads each partition in turn and, when none has anything, waits on them
        in slices of ``READ_ANY_SLICE``; a backend that can wait on all of them at once (NATS)
        does better.
        """
        found = {p: self.read(consumer, limit, 0.0, partition=p, after=a) for p, a in after.items()}
        found = {p: records for p, records in found.items() if records}
        if found or wait <= 0 or not after:
            return found
        deadline = time.monotonic() + wait
        for partition in itertools.cycle(list(after)):
            remaining = deadline - time.monotonic()
            records = self.read(
                consumer,
                limit,
                max(0.0, min(READ_ANY_SLICE, remaining)),
                partition=partition,
                after=after[partition],
            )
            if records:
                return {partition: records}
            if remaining <= 0:
                return {}
        raise AssertionError("unreachable: cycle() never ends")

    @abstractmethod
    def claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        """The partitions ``worker`` may consume now; renews its leases for ``ttl`` seconds.

        Call it more often than ``ttl``. Partitions are spread evenly over the workers that
        claimed within ``ttl``: a worker takes a partition free of any live lease, and gives
        up (no longer returns) those that belong to another worker's share. A worker should
        acknowledge what it applied of a partition before it stops reading it.
        """

    @abstractmethod
    def release(self, consumer: str, worker: str) -> None:
        """Give up every lease of ``worker`` at once (a clean stop)."""

    @abstractmethod
    def trim(self, keep_after: int) -> int:
        """Drop records with offset <= ``keep_after`` that every consumer has acknowledged.

        Returns how many were dropped (NATS JetStream: how many messages).
        """

    @abstractmethod
    def stats(self) -> StreamStats: ...

    @abstractmethod
    def close(self) -> None: ...
