"""The dead-letter queue keeps one entry per record, never drops a different one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from optsync.apply.dlq import DeadLetterQueue


def test_a_redelivered_record_is_kept_once(tmp_path: Path) -> None:
    dlq = DeadLetterQueue(tmp_path / "dlq.db")
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])  # the same record after a crash
    assert [(e.stream_offset, e.data) for e in dlq.list()] == [(5, b"record-a")]
    dlq.close()


def test_a_different_record_at_a_reused_offset_is_a_new_entry(tmp_path: Path) -> None:
    """A stream file replaced by an empty one starts its offsets again; found in review: the
    second record at offset 5 was acknowledged, never applied and not kept here."""
    dlq = DeadLetterQueue(tmp_path / "dlq.db")
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply", [(5, "k", b"record-b", "bad opt-in value")])
    assert [e.data for e in dlq.list()] == [b"record-a", b"record-b"]
    dlq.close()


def test_a_replayed_record_that_fails_again_comes_back(tmp_path: Path) -> None:
    dlq = DeadLetterQueue(tmp_path / "dlq.db")
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    (entry,) = dlq.list()
    dlq.mark_replayed([entry.id])
    assert dlq.count() == 0
    dlq.add("apply", [(5, "k", b"record-a", "still a bad phone")])
    (again,) = dlq.list()
    assert (again.id, again.reason, again.replayed_at) == (entry.id, "still a bad phone", None)
    dlq.close()


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

    dlq = DeadLetterQueue(path)
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
        reopened = DeadLetterQueue(path)  # a version 2 file is only read: no wait for the lock
        assert reopened.count() == 2
        reopened.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
