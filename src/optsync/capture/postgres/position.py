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

import re
from typing import Any, Final, Literal

import msgspec

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


class CaptureState(msgspec.Struct, frozen=True, tag_field="source", tag="postgres"):
    """Where capture is; its JSON text is the ``CaptureBatch.state`` handed back to ``open``.

    Saved as msgspec JSON tagged ``"source": "postgres"``, with the format version ``v``, the
    slot, and LSNs in the server's own spelling (``16/B374D848``); a state saved before the
    tag existed has the same keys without it and loads unchanged.
    """

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
        data: dict[str, Any] = {"v": _STATE_VERSION, **msgspec.to_builtins(self), "slot": slot}
        for name in _LSN_FIELDS:
            lsn = data[name]
            data[name] = None if lsn is None else format_lsn(lsn)
        return _ENCODER.encode(data).decode()

    @classmethod
    def parse(cls, text: str, source: str) -> CaptureState:
        """The state ``dump`` wrote (or an older release wrote); ``Fatal`` if it is not one."""
        try:
            data = msgspec.json.decode(text)
            if not isinstance(data, dict) or data.get("v") != _STATE_VERSION:
                raise ValueError("not a PostgreSQL capture state")
            for name in _LSN_FIELDS:
                lsn = data.get(name)
                if lsn is not None:
                    if not isinstance(lsn, str):
                        raise ValueError(f"{name} {lsn!r} is not an LSN")
                    data[name] = parse_lsn(lsn)
            state = msgspec.convert(data, cls)
            if state.phase == "log" and state.log_after is None:
                raise ValueError("a log state without log_after")
        except (ValueError, msgspec.DecodeError) as exc:
            raise Fatal(
                f"the saved capture state of source {source!r} is not a PostgreSQL capture state "
                f"({exc}): {text[:200]!r}; discard it (optsync capture --resnapshot) to start "
                "over with a new snapshot"
            ) from exc
        return state


_LSN_FIELDS: Final = ("log_after", "snapshot_at")
"""Fields held as numbers and saved as LSN text."""
_ENCODER = msgspec.json.Encoder()


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
