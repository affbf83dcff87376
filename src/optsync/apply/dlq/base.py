"""The ``DeadLetterQueue`` interface: records apply could not use, with the reason, never dropped.

One entry per record: the same record (consumer, stream offset and bytes) redelivered after a
crash does not appear twice, and comes back into the queue if it had been replayed and fails
again. A *different* record at an offset already used is a new entry. Every implementation
passes ``tests/contract/test_dlq_contract.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ("DeadLetter", "DeadLetterQueue")


@dataclass(frozen=True)
class DeadLetter:
    id: int
    at: float
    consumer: str
    stream_offset: int
    partition_key: str
    reason: str
    data: bytes
    replayed_at: float | None = None


class DeadLetterQueue(ABC):
    """Dead letters of every apply worker, kept until replayed."""

    @abstractmethod
    def add(self, consumer: str, entries: Sequence[tuple[int, str, bytes, str]]) -> None:
        """Store (stream offset, partition key, data, reason) entries durably."""

    @abstractmethod
    def list(self, *, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
        """Entries oldest first (not replayed ones only, unless ``include_replayed``)."""

    @abstractmethod
    def count(self) -> int:
        """Entries not replayed yet."""

    @abstractmethod
    def mark_replayed(self, ids: Sequence[int]) -> None: ...

    @abstractmethod
    def update_reason(self, entry_id: int, reason: str) -> None:
        """A replay failed again: keep the entry with the new reason."""

    @abstractmethod
    def close(self) -> None: ...
