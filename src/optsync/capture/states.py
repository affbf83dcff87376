"""Saved capture states as people read them, whichever source wrote them.

``optsync status``, the console and the CLI read checkpoints without opening the source (``status
--data-dir`` does not even know which database it is), so the reader is chosen by the state
itself: its ``source`` key (written by every source since this release), or, for a state saved
before it, its shape (MySQL's ``log`` object, PostgreSQL's ``slot``, SQLite's integer
``log_after``). Each source's ``position`` module parses its own state (a msgspec Struct tagged
with ``source``); none of them imports a database driver, so reading a MySQL state needs no MySQL
library.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from optsync.capture.base import CaptureView
from optsync.errors import Fatal

__all__ = ("NOT_STARTED", "describe_state")

NOT_STARTED = CaptureView(source="", phase="not started", position="")


def _reader(data: dict[str, object]) -> Callable[[str], CaptureView] | None:
    kind = data.get("source")
    if kind == "mysql" or (kind is None and isinstance(data.get("log"), dict)):
        from optsync.capture.mysql.position import describe  # noqa: PLC0415

        return describe
    if kind == "postgres" or (kind is None and "slot" in data):
        from optsync.capture.postgres.position import describe as pg_describe  # noqa: PLC0415

        return pg_describe
    if kind == "sqlite" or (
        kind is None and ("snapshot_s" in data or isinstance(data.get("log_after"), int))
    ):
        from optsync.capture.sqlite.position import describe as sqlite_describe  # noqa: PLC0415

        return sqlite_describe
    return None


def describe_state(text: str | None) -> CaptureView:
    """The view of a saved state (None or empty: not started). A state no source recognises,
    or one its source refuses, is shown as ``unknown`` with what can be said of it, never an
    error: a status page must not fail on one bad checkpoint."""
    if not text:
        return NOT_STARTED
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return CaptureView(source="", phase="unknown", position="(not JSON)")
    if not isinstance(data, dict):
        return CaptureView(source="", phase="unknown", position="(not a JSON object)")
    reader = _reader(data)
    if reader is None:
        return CaptureView(source="", phase=str(data.get("phase") or "unknown"), position="")
    try:
        return reader(text)
    except Fatal:
        return CaptureView(
            source=str(data.get("source") or ""), phase="unknown", position="(unreadable)"
        )
