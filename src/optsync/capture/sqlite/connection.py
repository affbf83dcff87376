"""Connections to a SQLite source: opening the file, WAL mode, the busy timeout, errors translated.

``open`` sets ``journal_mode=WAL`` on the source (it persists in the file). This is required:
in WAL mode readers and the single writer do not block each other, so the application keeps
writing while a snapshot holds its read transaction for minutes, and the log reader never makes
an application write wait. (A long snapshot keeps the WAL from being reset, so the -wal file
grows until the snapshot ends.)

The source opens two connections to the file, both in autocommit mode (``isolation_level=None``:
the capture issues ``BEGIN``/``COMMIT`` itself) and usable from any thread: the *writer*
installs the triggers and deletes acknowledged change rows, the *reader* reads the snapshot and
the log.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from optsync.errors import ConfigError, Fatal, Retryable

__all__ = ("BUSY_TIMEOUT", "connect", "translated", "use_wal")

BUSY_TIMEOUT: Final = 5.0


def connect(path: Path, name: str) -> sqlite3.Connection:
    """A read-write connection to the existing database ``path`` of source ``name``."""
    uri = path.resolve().as_uri() + "?mode=rw"
    try:
        return sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT,
        )
    except sqlite3.Error as exc:
        raise ConfigError(
            f"source {name!r}: cannot open the SQLite database {str(path)!r} "
            f"for reading and writing ({exc}); check the path and its permissions"
        ) from exc


def use_wal(conn: sqlite3.Connection, name: str, path: Path) -> None:
    """Switch the database to WAL mode, or raise ``ConfigError`` saying why it must be."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise ConfigError(
            f"source {name!r}: could not switch {str(path)!r} to WAL mode "
            f"(journal_mode is {mode}); WAL is required so the application and capture "
            "do not block each other; use a database file on a local disk"
        )


@contextmanager
def translated(name: str, action: str) -> Iterator[None]:
    """sqlite3 errors as optsync's: busy/locked can be retried, the rest needs a person."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise Retryable(
                f"source {name!r}: {action}: the database is busy ({exc}); capture retries"
            ) from exc
        raise Fatal(f"source {name!r}: {action} failed: {exc}") from exc
    except sqlite3.Error as exc:
        raise Fatal(f"source {name!r}: {action} failed: {exc}") from exc
