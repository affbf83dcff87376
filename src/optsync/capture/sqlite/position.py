"""Where SQLite capture is: the saved state (``CaptureState``) and how people read it.

Positions are the change table's sequence numbers (``optsync.events.position_of``); the state says
which snapshot is running (``snapshot_s``, the change number its read transaction saw), how far
its current table is loaded (``after_rowid``) and from which change the log reads on.

The state is msgspec JSON tagged ``"source": "sqlite"``; a state saved before the tag existed
has the same keys without it and loads unchanged.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from optsync.capture.base import CaptureView
from optsync.errors import Fatal

__all__ = ("CaptureState", "describe")

Phase = Literal["snapshot", "log"]


class CaptureState(msgspec.Struct, frozen=True, tag_field="source", tag="sqlite"):
    """Where capture is; its JSON text is the ``CaptureBatch.state`` handed back to ``open``."""

    phase: Phase = "snapshot"
    snapshot_s: int | None = None
    """S of the running snapshot's read transaction (the position of its loads)."""
    table: str | None = None
    """The table the snapshot is in, loaded up to ``after_rowid``."""
    after_rowid: int = 0
    tables_done: tuple[str, ...] = ()
    log_after: int | None = None
    """The log's position: the change rows up to this seq are read (or in the snapshot)."""

    def dump(self) -> str:
        return _ENCODER.encode(self).decode()

    @classmethod
    def parse(cls, text: str, source: str) -> CaptureState:
        """The state ``dump`` wrote (or an older release wrote); ``Fatal`` if it is not one."""
        try:
            state = _DECODER.decode(text)
            if state.phase == "log" and state.log_after is None:
                raise msgspec.ValidationError("a log phase without log_after")
        except msgspec.ValidationError as exc:
            raise Fatal(
                f"the saved capture state of source {source!r} is not a SQLite capture state "
                f"({exc}): {text[:200]!r}; discard it to start capture over with a new snapshot"
            ) from exc
        except msgspec.DecodeError as exc:
            raise Fatal(
                f"the saved capture state of source {source!r} is not readable ({exc}); "
                "discard it to start capture over with a new snapshot"
            ) from exc
        return state


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(CaptureState)


def describe(text: str) -> CaptureView:
    """A saved SQLite capture state as people read it (``optsync status``, the console)."""
    state = CaptureState.parse(text, "sqlite")
    snapshot = state.phase == "snapshot"
    return CaptureView(
        source="sqlite",
        phase=state.phase,
        position="" if state.log_after is None else f"change {state.log_after}",
        table=state.table if snapshot else None,
        cursor=f"rowid {state.after_rowid}" if snapshot and state.table else "",
        tables_done=len(state.tables_done),
    )
