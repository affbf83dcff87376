"""The ``ChangeSource`` interface, shared by every database's capture."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from optsync.errors import ConfigError
from optsync.events import ChangeEvent

__all__ = (
    "CaptureBatch",
    "CaptureView",
    "ChangeSource",
    "Progress",
    "Unsupported",
    "check_arguments",
)

Progress = Callable[[str, int, int | None], None]
"""Called during a snapshot with (table, rows done, rows expected or None)."""


class Unsupported(ConfigError):
    """An optional capability (``--resnapshot``, ``--start-position``, ``--drop-slot``) that this
    source does not have; the message names the option and the sources that have it."""


@dataclass(frozen=True)
class CaptureView:
    """A saved capture state as people read it: ``optsync status``, the console and the CLI
    show this, whatever the source (each source's ``position.describe`` makes it)."""

    source: str
    """``mysql``, ``postgres``, ``sqlite``, or ``""`` for a state no source recognises."""
    phase: str
    """``snapshot``, ``log``, or ``unknown``."""
    position: str
    """The log position in the source's own terms (``GTID 0-1-57``, ``binlog FILE:POS``,
    ``LSN 0/16B3748``, ``change 42``); empty before one is known."""
    table: str | None = None
    """Snapshot: the table being loaded."""
    rows: int | None = None
    """Snapshot: rows of ``table`` loaded so far."""
    tables_done: int = 0
    """Snapshot: tables whose load is complete."""
    cursor: str = ""
    """Snapshot: where the table's load is, when the source says it by key (``rowid 1200``)."""

    def line(self) -> str:
        """One line: ``log GTID 0-1-57``, ``snapshot blog_db.optin_status, 1,200 rows loaded``."""
        if self.phase != "snapshot":
            return f"{self.phase} {self.position}".strip()
        parts = ["snapshot"]
        if self.table:
            loaded = f", {self.rows:,} rows loaded" if self.rows else ""
            after = f", after {self.cursor}" if self.cursor else ""
            parts.append(f"{self.table}{loaded}{after}")
        if self.tables_done:
            parts.append(f"({self.tables_done} table{'s' if self.tables_done > 1 else ''} done)")
        if self.position:
            parts.append(f"then log from {self.position}")
        return " ".join(parts)


@dataclass(frozen=True)
class CaptureBatch:
    """Events read from the source, and the source state to save once they are durable."""

    events: Sequence[ChangeEvent]
    state: str
    """Resume state, handed back to ``open`` after a restart: the JSON of the source's own
    ``position.CaptureState`` (a msgspec Struct tagged ``source``), opaque to everyone else."""


def check_arguments(tables: Sequence[str], chunk_size: int, idle_wait: float) -> None:
    """The constructor arguments every source takes, checked alike (programming errors: a
    configuration is checked before it reaches a source)."""
    if isinstance(tables, str):
        raise TypeError("tables must be a sequence of table names, not one string")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    if idle_wait < 0:
        raise ValueError("idle_wait must not be negative")


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

    # optional capabilities: a source that has one overrides it ------------------------------
    def resnapshot_state(self) -> str:
        """A state whose next ``open`` takes a new snapshot (``optsync capture --resnapshot``)."""
        raise Unsupported(
            f"--resnapshot is not available for source {self.name!r} (MySQL/MariaDB and "
            "PostgreSQL have it)"
        )

    def state_at(self, position: str) -> str:
        """A state whose next ``open`` reads the log from ``position``, without a snapshot
        (``optsync capture --start-position``)."""
        raise Unsupported(
            f"--start-position is not available for source {self.name!r} (MySQL/MariaDB has it)"
        )

    def drop_slot(self) -> None:
        """Give back what the source holds on the server (``optsync capture --drop-slot``)."""
        raise Unsupported(f"--drop-slot applies to PostgreSQL sources only, not {self.name!r}")

    @abstractmethod
    def close(self) -> None: ...
