"""The ``ChangeSource`` interface, shared by every database's capture."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from optsync.events import ChangeEvent

__all__ = ("CaptureBatch", "ChangeSource", "Progress")

Progress = Callable[[str, int, int | None], None]
"""Called during a snapshot with (table, rows done, rows expected or None)."""


@dataclass(frozen=True)
class CaptureBatch:
    """Events read from the source, and the source state to save once they are durable."""

    events: Sequence[ChangeEvent]
    state: str
    """Opaque resume state (JSON text); handed back to ``open`` after a restart."""


class ChangeSource(ABC):
    """Reads one source database: snapshot first, then its log, from a saved state."""

    name: str
    """Stable name of this source; the stream keeps its checkpoint under it."""

    @abstractmethod
    def open(self, state: str | None) -> None:
        """Check the source (preflight) and prepare to resume from ``state`` (None: start)."""

    @abstractmethod
    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches (if the snapshot is not finished), then log batches.

        Blocks briefly when nothing is new and yields an empty batch, so callers can stop.
        """

    @abstractmethod
    def acknowledge(self, state: str) -> None:
        """Events up to ``state`` are durable downstream; the source may release them."""

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        """(schema, table) as events name them -> column names, as ``open`` found them.

        Empty when not known (before ``open``, or a source that cannot say): callers then check
        nothing.
        """
        return {}

    @abstractmethod
    def close(self) -> None: ...
