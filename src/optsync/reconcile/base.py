"""What ``optsync reconcile`` needs from a source: its rows in key order, one row again, and
where its log is now.

A ``SourceReader`` reads the captured tables the way capture's snapshot does (the same
connection code and value conversion, so a row reads exactly as capture would read it), but
with plain reads only: no locking read, no replication slot, no trigger, no saved state.

Repair position
---------------
A repair is written through the position guard like any captured change, at a position built
from where the source's log is *now*: ``position()`` read *before* the rows are read again,
plus ``REPAIR_SUFFIX``. So:

- it is newer than every change the re-read rows reflect (those are at or before the log's
  current position, and the suffix sorts after the position itself and after a restarted
  snapshot's ``.1`` loads), so the guard lets it through;
- it is older than every change committed after it was read (their positions are greater
  within the prefix), so a later real change of the row, read from the log, still wins.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from optsync.events import ChangeEvent, Row

__all__ = ("REPAIR_SUFFIX", "SourceReader", "TableRef")

REPAIR_SUFFIX: Final = "~reconcile"
"""Appended to a log position: ``~`` sorts after every character positions use (digits,
upper-case hex, ``:``, ``.``, ``/``), so ``P + REPAIR_SUFFIX`` > ``P`` and > ``P.1``, and
< any position that is greater than ``P`` within its own length."""


@dataclass(frozen=True)
class TableRef:
    """A captured table as events name it."""

    schema: str
    name: str
    keyed: bool
    """The table has a key a row can be read again by (else: every column is its key)."""


class SourceReader(ABC):
    """Reads the captured tables of one source for reconciliation."""

    name: str

    @abstractmethod
    def tables(self) -> Sequence[TableRef]:
        """The captured tables (checked to exist and be readable)."""

    @abstractmethod
    def count(self, table: TableRef) -> int | None:
        """About how many rows ``table`` holds (for the progress bar); None if unknown."""

    @abstractmethod
    def chunks(self, table: TableRef, size: int) -> Iterator[list[ChangeEvent]]:
        """Every row of ``table`` as a ``load`` event, in key order, ``size`` rows per chunk,
        each chunk a plain read of its own (a keyless table: one read for the whole table)."""

    @abstractmethod
    def row(self, table: TableRef, key: Row) -> ChangeEvent | None:
        """The row with ``key`` as it is now (None: gone); only for keyed tables."""

    @abstractmethod
    def position(self, lineage: int | None) -> str:
        """Where the source's log is now, as position text (without ``REPAIR_SUFFIX``).

        ``lineage``: MySQL/MariaDB only, the lineage of the positions the engine holds
        (``optsync.capture.mysql.position``); other sources ignore it.
        """

    @abstractmethod
    def close(self) -> None: ...
