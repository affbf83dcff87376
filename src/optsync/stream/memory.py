"""``MemoryStream``: the in-memory ``ChangeStream`` for unit tests (nothing survives a restart)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats

__all__ = ("MemoryStream",)

logger = logging.getLogger(__name__)


class MemoryStream(ChangeStream):
    """The embedded stream's semantics in a list: same offsets, idempotency, waits and trims."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._records: list[StreamRecord] = []
        self._event_ids: dict[str, int] = {}
        """``ChangeEvent.event_id`` -> offset, for the retained records."""
        self._record_ids: dict[int, str] = {}
        self._head = 0
        self._consumers: dict[str, int] = {}
        self._checkpoints: dict[str, Checkpoint] = {}
        self._closed = False

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

    def read(
        self, consumer: str, limit: int, wait: float = 0.0, *, after: int | None = None
    ) -> list[StreamRecord]:
        """Records after the consumer's acknowledged offset (or ``after``); waits up to ``wait``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        deadline = time.monotonic() + wait
        with self._changed:
            self._check_open()
            self._consumers.setdefault(consumer, 0)
            while True:
                start = self._consumers[consumer] if after is None else after
                found = self._after(start, limit)
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._changed.wait(remaining)
                self._check_open()

    def ack(self, consumer: str, offset: int) -> None:
        """Move the consumer forward to ``offset``; a lower offset than stored is ignored."""
        with self._changed:
            self._check_open()
            self._check_offset(offset)
            self._consumers[consumer] = max(self._consumers.get(consumer, 0), offset)

    def seek(self, consumer: str, offset: int) -> None:
        """Set the consumer's offset, backwards too (0 replays everything retained)."""
        with self._changed:
            self._check_open()
            self._check_offset(offset)
            self._consumers[consumer] = offset
            self._changed.notify_all()

    def trim(self, keep_after: int) -> int:
        """Drop records up to ``keep_after`` that every registered consumer has acknowledged."""
        with self._changed:
            self._check_open()
            bound = min([keep_after, *self._consumers.values()])
            kept = [r for r in self._records if r.offset > bound]
            dropped = self._records[: len(self._records) - len(kept)]
            for record in dropped:
                event_id = self._record_ids.pop(record.offset, None)
                if event_id is not None:
                    del self._event_ids[event_id]
            self._records = kept
            if dropped:
                logger.debug("stream trimmed records=%d up_to=%d", len(dropped), bound)
            return len(dropped)

    def stats(self) -> StreamStats:
        """Head offset, oldest retained offset and every consumer's acknowledged offset."""
        with self._changed:
            self._check_open()
            oldest = self._records[0].offset if self._records else self._head + 1
            return StreamStats(head=self._head, oldest=oldest, consumers=dict(self._consumers))

    def close(self) -> None:
        """Refuse further calls and wake waiting readers (which then raise)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _add(self, partition_key: str, data: bytes, now: float) -> StreamRecord:
        self._head += 1
        record = StreamRecord(self._head, partition_key, data, now)
        self._records.append(record)
        return record

    def _after(self, offset: int, limit: int) -> list[StreamRecord]:
        # Offsets are sorted and dense from the oldest retained one: index arithmetic finds it.
        if not self._records:
            return []
        start = max(0, offset + 1 - self._records[0].offset)
        return self._records[start : start + limit]

    def _check_offset(self, offset: int) -> None:
        if not 0 <= offset <= self._head:
            raise ValueError(f"offset {offset} is outside the stream (0..{self._head})")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the stream is closed")
