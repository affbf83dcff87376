"""Positions of MySQL/MariaDB change events, and the capture state saved with the stream.

Position text (the design; the module notes of ``optsync.capture.mysql.source`` say why)::

    load      LLLLLLLLLL:FFFFFFFFFF:OOOOOOOOOO
    log row   LLLLLLLLLL:FFFFFFFFFF:OOOOOOOOOO:RRRRRRRR

- ``L`` the *lineage*: the source server's ``UNIX_TIMESTAMP()`` when capture began reading this
  server's binlog from a snapshot (or from a given position, or after a switch to another
  server). Binlog coordinates are comparable only within one server's binlog history; a new
  lineage outranks every position of the older ones.
- ``F`` the binlog file's sequence number (``mariadb-bin.000042`` -> 42), ``O`` a byte offset in
  it. For a load, ``F:O`` is the snapshot's binlog coordinates (``Binlog_snapshot_file`` /
  ``Binlog_snapshot_position``): the end of the last transaction the snapshot sees. For a log
  row, ``F:O`` is where its rows event starts, and ``R`` is twice the row's index in the event
  (plus one for the insert half of an update that changed the key).
- Every field is zero-padded to a fixed width, so text order is (L, F, O, R) order. A load's
  text is a prefix of the positions of rows at its own coordinates, and a prefix sorts first.
  No rows event starts exactly at a snapshot's coordinates (the next transaction's GTID event
  does), so a load sorts after every change the snapshot saw and before every change it missed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec
from msgspec.structs import replace

from optsync.capture.base import CaptureView
from optsync.errors import Fatal

__all__ = (
    "CaptureState",
    "describe",
    "GtidPosition",
    "LogPosition",
    "file_index",
    "load_position",
    "row_position",
)

STATE_VERSION: Final = 1
_FILE_NUMBER = re.compile(r"\.([0-9]+)$")
_MARIADB_GTID = re.compile(r"^([0-9]+)-([0-9]+)-([0-9]+)$")

Phase = Literal["snapshot", "log"]


def file_index(name: str) -> int:
    """The sequence number of a binlog file name (``mysql-bin.000042`` -> 42)."""
    match = _FILE_NUMBER.search(name)
    if match is None:
        raise Fatal(f"binlog file name {name!r} does not end in .<number>; cannot order it")
    return int(match.group(1))


def load_position(lineage: int, file: str, offset: int) -> str:
    """The position of every row a snapshot read at binlog coordinates ``file:offset``."""
    return f"{lineage:010d}:{file_index(file):010d}:{offset:010d}"


def row_position(lineage: int, file_number: int, event_start: int, ordinal: int) -> str:
    """The position of a row of a binlog rows event (``ordinal``: see the module notes)."""
    return f"{lineage:010d}:{file_number:010d}:{event_start:010d}:{ordinal:08d}"


class GtidPosition:
    """A MariaDB GTID position: the last GTID of each replication domain (``0-1-42,1-7-3``)."""

    __slots__ = ("_domains",)

    def __init__(self, domains: Mapping[int, tuple[int, int]] | None = None) -> None:
        self._domains = dict(domains or {})
        """domain id -> (server id, sequence number)."""

    @classmethod
    def parse(cls, text: str) -> GtidPosition:
        domains: dict[int, tuple[int, int]] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _MARIADB_GTID.match(part)
            if match is None:
                raise ValueError(f"{part!r} is not a MariaDB GTID (domain-server-sequence)")
            domain, server, seq = (int(g) for g in match.groups())
            domains[domain] = (server, seq)
        return cls(domains)

    def advanced(self, gtid: str) -> GtidPosition:
        """This position after the transaction ``gtid`` (``domain-server-sequence``)."""
        match = _MARIADB_GTID.match(gtid)
        if match is None:
            raise ValueError(f"{gtid!r} is not a MariaDB GTID (domain-server-sequence)")
        domain, server, seq = (int(g) for g in match.groups())
        return GtidPosition({**self._domains, domain: (server, seq)})

    def behind(self, other: GtidPosition) -> dict[int, tuple[int, int]]:
        """Domains where this position is before ``other``: domain -> (our seq, their seq)."""
        gaps: dict[int, tuple[int, int]] = {}
        for domain, (_, theirs) in other._domains.items():
            ours = self._domains.get(domain, (0, 0))[1]
            if ours < theirs:
                gaps[domain] = (ours, theirs)
        return gaps

    def server_of(self, domain: int) -> int | None:
        entry = self._domains.get(domain)
        return entry[0] if entry else None

    def __str__(self) -> str:
        return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(self._domains.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GtidPosition) and self._domains == other._domains

    def __hash__(self) -> int:
        return hash(str(self))


class LogPosition(msgspec.Struct, frozen=True):
    """Where the log resumes: a transaction boundary, as binlog coordinates and GTID position."""

    file: str
    """The binlog file ("" when capture was told to start at a GTID position)."""
    pos: int
    gtid: str | None = None
    """MariaDB: the GTID position (resume token). MySQL: None (resume by file:pos)."""

    def describe(self) -> str:
        where = f"binlog {self.file} position {self.pos}" if self.file else ""
        if self.gtid is None:
            return where
        gtid = f"GTID position {self.gtid!r}" if self.gtid else "the first GTID"
        return f"{gtid} ({where})" if where else gtid


class CaptureState(msgspec.Struct, frozen=True, tag_field="source", tag="mysql"):
    """Where capture is; its JSON text is ``CaptureBatch.state``, handed back to ``open``.

    Saved as msgspec JSON tagged ``"source": "mysql"`` with the format version ``v``.
    """

    phase: Phase = "snapshot"
    lineage: int | None = None
    server_id: int | None = None
    """``@@server_id`` of the server whose binlog coordinates the positions use."""
    log: LogPosition | None = None
    """Where the log resumes; set by the first snapshot pass (its coordinates)."""
    tables_done: tuple[str, ...] = ()
    """``schema.table`` names whose snapshot is complete."""
    table: str | None = None
    """The table the snapshot is in."""
    key: tuple[str, ...] = ()
    """The columns ``cursor`` is over (the table's key, or every column)."""
    cursor: tuple[Any, ...] | None = None
    """Key values of the last row loaded from ``table`` (None: from the start)."""
    loaded: int = 0
    """Rows of ``table`` loaded so far (for progress)."""
    source_time: str | None = None
    """UTC time the capture has read the source up to (see "Lag" in the module notes)."""
    resnapshot: bool = False
    """Made by ``optsync capture --resnapshot``: the next ``open`` takes a new snapshot."""
    start_at: str | None = None
    """Made by ``optsync capture --start-position``: the position as the user gave it."""

    @property
    def requested(self) -> bool:
        """Whether the CLI made this state for ``open`` (``resnapshot`` or ``start_at``)."""
        return self.resnapshot or self.start_at is not None

    def dump(self) -> str:
        return _ENCODER.encode({"v": STATE_VERSION, **msgspec.to_builtins(self)}).decode()

    def with_log(self, log: LogPosition, source_time: str | None) -> CaptureState:
        return replace(self, log=log, source_time=source_time or self.source_time)

    @classmethod
    def parse(cls, text: str, source: str) -> CaptureState:
        """The state ``dump`` wrote (or an older release wrote); ``Fatal`` (naming the way
        out) if it is not one."""
        try:
            data = msgspec.json.decode(text)
            if not isinstance(data, dict) or data.get("v") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} MySQL capture state")
            state = msgspec.convert(data, cls)
            if state.phase == "log" and state.log is None:
                raise ValueError("a log phase without a log position")
            if state.log is not None:
                if state.log.gtid:
                    GtidPosition.parse(state.log.gtid)  # validates
                if state.log.file:
                    file_index(state.log.file)
        except (ValueError, msgspec.DecodeError, Fatal) as exc:
            raise Fatal(
                f"source {source!r}: the saved capture state is not a MySQL capture state "
                f"({exc}); start over with `optsync capture --resnapshot`"
            ) from exc
        return state


_ENCODER = msgspec.json.Encoder()


def describe(text: str) -> CaptureView:
    """A saved MySQL/MariaDB capture state as people read it (``optsync status``, the console):
    the GTID position when there is one, else the binlog file and position."""
    state = CaptureState.parse(text, "mysql")
    position = ""
    if state.log is not None:
        position = (
            f"GTID {state.log.gtid}"
            if state.log.gtid
            else f"binlog {state.log.file}:{state.log.pos}"
        )
    snapshot = state.phase == "snapshot"
    return CaptureView(
        source="mysql",
        phase=state.phase,
        position=position,
        table=state.table if snapshot else None,
        rows=state.loaded if snapshot and state.table else None,
        tables_done=len(state.tables_done),
    )
