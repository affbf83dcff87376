"""The dead-letter queue: records apply could not use, with the reason, never dropped.

Stored in ``DATA_DIR/dlq.db``. An entry keeps the raw stream record, so ``optsync dlq replay``
can run it through the (possibly corrected) mapping again. One entry per (consumer, stream
offset): a record redelivered after a crash does not appear twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ("DeadLetter", "DeadLetterQueue")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    consumer TEXT NOT NULL,
    stream_offset INTEGER NOT NULL,
    partition_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    data BLOB NOT NULL,
    replayed_at REAL,
    UNIQUE (consumer, stream_offset)
);
"""


@dataclass(frozen=True)
class DeadLetter:
    id: int
    at: float
    consumer: str
    stream_offset: int
    partition_key: str
    reason: str
    data: bytes
    replayed_at: float | None = None


class DeadLetterQueue:
    """Dead letters in one SQLite file (``":memory:"`` for tests)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA busy_timeout = 10000")
        self._conn.executescript(_SCHEMA)

    def add(self, consumer: str, entries: Sequence[tuple[int, str, bytes, str]]) -> None:
        """Store (stream offset, partition key, data, reason) entries durably."""
        if not entries:
            return
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR IGNORE INTO dead_letters (at, consumer, stream_offset, "
                    "partition_key, reason, data) VALUES (?, ?, ?, ?, ?, ?)",
                    [(now, consumer, off, key, reason, data) for off, key, data, reason in entries],
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def list(self, *, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE replayed_at IS NULL"
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, at, consumer, stream_offset, partition_key, reason, data, replayed_at "
                f"FROM dead_letters {where} ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [DeadLetter(*r) for r in rows]

    def count(self) -> int:
        """Entries not replayed yet."""
        with self._lock:
            row = self._conn.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NULL"
            ).fetchone()
        return int(row[0])

    def mark_replayed(self, ids: Sequence[int]) -> None:
        with self._lock:
            self._conn.executemany(
                "UPDATE dead_letters SET replayed_at = ? WHERE id = ?",
                [(time.time(), i) for i in ids],
            )

    def update_reason(self, entry_id: int, reason: str) -> None:
        """A replay failed again: keep the entry with the new reason."""
        with self._lock:
            self._conn.execute(
                "UPDATE dead_letters SET reason = ?, at = ? WHERE id = ?",
                (reason, time.time(), entry_id),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()
