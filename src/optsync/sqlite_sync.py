"""Commits that skip the disk wait, on the SQLite files optsync writes (stream, engine, source).

All of them run in WAL mode with ``synchronous=FULL``: a commit returns once it reached the
disk. Where losing a commit to a power cut only means doing the work again (an acknowledgement,
a cleanup, an engine batch whose stream records are still unacknowledged), ``without_fsync``
lets the commits inside it skip the fsync: still atomic and visible at once, and safe against a
crash of the process, just not against a power cut.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ("without_fsync",)


@contextmanager
def without_fsync(conn: sqlite3.Connection | sqlite3.Cursor, skip: bool = True) -> Iterator[None]:
    """Commits on ``conn`` inside skip the fsync (``synchronous=NORMAL``); ``skip=False``: no
    change. ``synchronous`` is back at FULL on exit, for the next writer of the connection."""
    if not skip:
        yield
        return
    conn.execute("PRAGMA synchronous = NORMAL")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous = FULL")
