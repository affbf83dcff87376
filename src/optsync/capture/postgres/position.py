"""Log sequence numbers (LSNs) and the order-preserving positions built from them.

A PostgreSQL LSN is a 64-bit byte offset into the WAL, shown by the server as ``16/B374D848``
(two hex halves without padding). Positions pad both halves to 8 upper-case hex digits, so
text order is LSN order, and append a per-transaction ordinal:

- a log event: ``<commit LSN>.<ordinal>``, ordinals from 1 in transaction order, e.g.
  ``00000016/B374D848.0000000003``;
- a ``load`` event: ``<consistent point>.0000000000``, which sorts before every change that
  committed at or after the snapshot's consistent point and after every change before it. A
  load of a table without a key appends ``.<row number>`` to keep one event id per row (the
  stream stores one event per partition key and position).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal

from optsync.capture.base import CaptureView
from optsync.errors import Fatal

__all__ = (
    "CaptureState",
    "describe",
    "format_lsn",
    "load_position",
    "log_position",
    "parse_lsn",
)

Phase = Literal["snapshot", "log"]
_STATE_VERSION: Final = 1

_LSN: Final = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_ORDINAL_DIGITS: Final = 10
_ROW_DIGITS: Final = 12


def parse_lsn(text: str) -> int:
    """``16/B374D848`` -> its 64-bit number; ``ValueError`` for anything else."""
    match = _LSN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an LSN (like 16/B374D848)")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """The server's own spelling of an LSN (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _padded(lsn: int) -> str:
    return f"{lsn >> 32:08X}/{lsn & 0xFFFFFFFF:08X}"


def log_position(commit_lsn: int, ordinal: int) -> str:
    """The position of the ``ordinal``-th change (from 1) of the transaction committed there."""
    return f"{_padded(commit_lsn)}.{ordinal:0{_ORDINAL_DIGITS}d}"


def load_position(consistent_point: int, row: int | None = None) -> str:
    """The position of a snapshot row; ``row`` numbers the rows of a table without a key."""
    base = f"{_padded(consistent_point)}.{0:0{_ORDINAL_DIGITS}d}"
    return base if row is None else f"{base}.{row:0{_ROW_DIGITS}d}"


@dataclass(frozen=True)
class CaptureState:
    """Where capture is; its JSON text is the ``CaptureBatch.state`` handed back to ``open``."""

    phase: Phase = "snapshot"
    log_after: int | None = None
    """LSN the log reads from: every transaction that committed before it is captured."""
    snapshot_at: int | None = None
    """Consistent point of the running snapshot (the position of its loads)."""
    table: str | None = None
    """``schema.table`` the snapshot is in."""
    after_key: tuple[str | None, ...] | None = None
    """Keyed table: text of the last key loaded."""
    page: int = 0
    """Keyless table: the next heap page to read."""
    relfilenode: int | None = None
    rows: int = 0
    """Rows of ``table`` loaded so far."""
    tables_done: tuple[str, ...] = ()
    resnapshot: bool = False

    def dump(self, slot: str) -> str:
        return json.dumps(
            {
                "v": _STATE_VERSION,
                "source": "postgres",
                "phase": self.phase,
                "slot": slot,
                "log_after": None if self.log_after is None else format_lsn(self.log_after),
                "snapshot_at": None if self.snapshot_at is None else format_lsn(self.snapshot_at),
                "table": self.table,
                "after_key": None if self.after_key is None else list(self.after_key),
                "page": self.page,
                "relfilenode": self.relfilenode,
                "rows": self.rows,
                "tables_done": list(self.tables_done),
                "resnapshot": self.resnapshot,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str, source: str) -> CaptureState:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("v") != _STATE_VERSION:
                raise ValueError("not a PostgreSQL capture state")
            phase = data["phase"]
            if phase not in ("snapshot", "log"):
                raise ValueError(f"phase {phase!r}")
            log_after = data.get("log_after")
            snapshot_at = data.get("snapshot_at")
            after_key = data.get("after_key")
            state = cls(
                phase=phase,
                log_after=None if log_after is None else parse_lsn(log_after),
                snapshot_at=None if snapshot_at is None else parse_lsn(snapshot_at),
                table=data.get("table"),
                after_key=None if after_key is None else tuple(after_key),
                page=int(data.get("page", 0)),
                relfilenode=data.get("relfilenode"),
                rows=int(data.get("rows", 0)),
                tables_done=tuple(str(t) for t in data.get("tables_done", [])),
                resnapshot=bool(data.get("resnapshot", False)),
            )
            if phase == "log" and state.log_after is None:
                raise ValueError("a log state without log_after")
        except (ValueError, TypeError, KeyError) as exc:
            raise Fatal(
                f"the saved capture state of source {source!r} is not a PostgreSQL capture state "
                f"({exc}): {text[:200]!r}; discard it (optsync capture --resnapshot) to start "
                "over with a new snapshot"
            ) from exc
        return state


def describe(text: str) -> CaptureView:
    """A saved PostgreSQL capture state as people read it (``optsync status``, the console)."""
    state = CaptureState.parse(text, "postgres")
    log = "" if state.log_after is None else f"LSN {format_lsn(state.log_after)}"
    return CaptureView(
        source="postgres",
        phase=state.phase,
        position=log,
        table=state.table if state.phase == "snapshot" else None,
        rows=state.rows if state.phase == "snapshot" and state.table else None,
        tables_done=len(state.tables_done),
    )
