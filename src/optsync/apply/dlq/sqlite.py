"""``SQLiteDeadLetterQueue``: the dead-letter queue in ``DATA_DIR/dlq.db``.

An entry keeps the raw stream record, so ``optsync dlq replay`` can run it through the
(possibly corrected) mapping again. A different record at an offset already used (a stream file
replaced by an empty one starts its offsets again) is a new entry. Schema version 1 refused
that second record silently (``UNIQUE (consumer, stream_offset)`` with ``INSERT OR IGNORE``); a
version 1 file is rebuilt without the constraint when opened.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from optsync.apply.dlq.base import DeadLetter, DeadLetterQueue

__all__ = ("SQLiteDeadLetterQueue",)

_SCHEMA_VERSION = 2
_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    consumer TEXT NOT NULL,
    stream_offset INTEGER NOT NULL,
    partition_key TEXT NOT NULL,
    reason TEXT NOT NULL,
    data BLOB NOT NULL,
    replayed_at REAL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS dead_letters_offset ON dead_letters (consumer, stream_offset)"
_COLUMNS = "id, at, consumer, stream_offset, partition_key, reason, data, replayed_at"


class SQLiteDeadLetterQueue(DeadLetterQueue):
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
        self._migrate()

    def _migrate(self) -> None:
        """Create the table, or rebuild a version 1 table without its UNIQUE constraint.

        A file at the current version is only read: status readers open it often.
        """
        conn = self._conn
        if conn.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # again, under the lock
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'"
            ).fetchone()
            if exists and version < _SCHEMA_VERSION:
                (last_id,) = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'dead_letters'"
                ).fetchone() or (None,)
                conn.execute(_TABLE.format(name="dead_letters_v2"))
                conn.execute(
                    f"INSERT INTO dead_letters_v2 ({_COLUMNS}) SELECT {_COLUMNS} FROM dead_letters"
                )
                conn.execute("DROP TABLE dead_letters")
                conn.execute("ALTER TABLE dead_letters_v2 RENAME TO dead_letters")
                if last_id is not None:  # ids of deleted entries are never handed out again
                    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'dead_letters'")
                    conn.execute(
                        "INSERT INTO sqlite_sequence (name, seq) VALUES ('dead_letters', ?)",
                        (last_id,),
                    )
            conn.execute(_TABLE.format(name="dead_letters"))
            conn.execute(_INDEX)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def add(self, consumer: str, entries: Sequence[tuple[int, str, bytes, str]]) -> None:
        """Store (stream offset, partition key, data, reason) entries durably."""
        if not entries:
            return
        now = time.time()
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                for offset, key, data, reason in entries:
                    held = conn.execute(
                        "SELECT id, replayed_at FROM dead_letters WHERE consumer = ? AND "
                        "stream_offset = ? AND data = ? ORDER BY id DESC LIMIT 1",
                        (consumer, offset, data),
                    ).fetchone()
                    if held is None:
                        conn.execute(
                            "INSERT INTO dead_letters (at, consumer, stream_offset, "
                            "partition_key, reason, data) VALUES (?, ?, ?, ?, ?, ?)",
                            (now, consumer, offset, key, reason, data),
                        )
                    elif held[1] is not None:  # replayed once, dead again: back in the queue
                        conn.execute(
                            "UPDATE dead_letters SET replayed_at = NULL, reason = ?, at = ? "
                            "WHERE id = ?",
                            (reason, now, held[0]),
                        )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def list(self, *, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE replayed_at IS NULL"
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT ?",
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
