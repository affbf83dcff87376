"""SQLite's dead-letter file: upgrades of files written by earlier versions.

The queue's behaviour on every backend is in ``tests/contract/test_dlq_contract.py``.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from optsync.apply.dlq import SQLiteDeadLetterQueue


def test_a_version_1_file_is_rebuilt_and_keeps_its_entries(tmp_path: Path) -> None:
    path = tmp_path / "dlq.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, consumer TEXT NOT NULL,
            stream_offset INTEGER NOT NULL, partition_key TEXT NOT NULL, reason TEXT NOT NULL,
            data BLOB NOT NULL, replayed_at REAL, UNIQUE (consumer, stream_offset)
        );
        INSERT INTO dead_letters (at, consumer, stream_offset, partition_key, reason, data)
        VALUES (1.0, 'apply', 5, 'k', 'bad phone', X'61'), (1.0, 'apply', 6, 'k', 'gone', X'62');
        DELETE FROM dead_letters WHERE id = 2;
        """
    )
    old.close()

    dlq = SQLiteDeadLetterQueue(path)
    dlq.add("apply", [(5, "k", b"record-b", "bad opt-in value")])
    entries = dlq.list()
    assert [(e.id, e.data, e.reason) for e in entries] == [
        (1, b"a", "bad phone"),
        (3, b"record-b", "bad opt-in value"),  # id 2 was handed out once: never again
    ]
    dlq.close()
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the apply worker in the middle of an add
    try:
        reopened = SQLiteDeadLetterQueue(
            path
        )  # a version 2 file is only read: no wait for the lock
        assert reopened.count() == 2
        reopened.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
