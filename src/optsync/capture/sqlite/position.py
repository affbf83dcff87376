"""Where SQLite capture is: the saved state (``CaptureState``) and how people read it.

Positions are the change table's sequence numbers (``optsync.events.position_of``); the state says
which snapshot is running (``snapshot_s``, the change number its read transaction saw), how far
its current table is loaded (``after_rowid``) and from which change the log reads on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from optsync.capture.base import CaptureView
from optsync.errors import Fatal

__all__ = ("CaptureState", "describe")

Phase = Literal["snapshot", "log"]


@dataclass(frozen=True)
class CaptureState:
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
        return json.dumps(
            {
                "source": "sqlite",
                "phase": self.phase,
                "snapshot_s": self.snapshot_s,
                "table": self.table,
                "after_rowid": self.after_rowid,
                "tables_done": list(self.tables_done),
                "log_after": self.log_after,
            },
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str, source: str) -> CaptureState:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            phase = data["phase"]
            snapshot_s = data.get("snapshot_s")
            table = data.get("table")
            after_rowid = data.get("after_rowid", 0)
            tables_done = data.get("tables_done", [])
            log_after = data.get("log_after")
            valid = (
                phase in ("snapshot", "log")
                and (snapshot_s is None or isinstance(snapshot_s, int))
                and (table is None or isinstance(table, str))
                and isinstance(after_rowid, int)
                and isinstance(tables_done, list)
                and all(isinstance(name, str) for name in tables_done)
                and (log_after is None or isinstance(log_after, int))
                and (phase == "snapshot" or log_after is not None)
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise Fatal(
                f"the saved capture state of source {source!r} is not readable ({exc}); "
                "discard it to start capture over with a new snapshot"
            ) from exc
        if not valid:
            raise Fatal(
                f"the saved capture state of source {source!r} is not a SQLite capture state: "
                f"{text[:200]!r}; discard it to start capture over with a new snapshot"
            )
        return cls(phase, snapshot_s, table, after_rowid, tuple(tables_done), log_after)


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
