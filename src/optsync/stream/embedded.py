"""``EmbeddedStream``: the default durable stream, one SQLite file (``DATA_DIR/stream.db``).

Every append is one transaction: the batch's records (an ``INSERT`` that skips an event id
already stored) and the source checkpoint commit together, and ``append`` returns only after
the commit reached the disk (WAL, ``synchronous=FULL``). So a source may be acknowledged as
soon as ``append`` returns, and a crash loses neither events nor a checkpoint ahead of them.

Writers of several processes (capture in one, apply's acknowledgements in another) take turns
through a ``flock`` on ``stream.db-lock`` around each write transaction: the kernel hands it to
the process waiting for it, where polling for SQLite's write lock loses to a writer that
commits back to back (at 1,000 single-row commits/s, capture appends every ~2 ms and an ack that
polls waited up to 50 ms).

Readers wait for records in two ways at once: a ``threading.Condition`` that ``append`` (of
this object) notifies, and ``PRAGMA data_version`` polled on the reader's connection, which
changes when any other connection (another object, another process) commits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import msgspec

from optsync.errors import Fatal, Retryable
from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.sqlite_sync import without_fsync
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats

__all__ = ("EmbeddedStream",)

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    "offset" INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused, even after trim
    partition_key TEXT NOT NULL,
    event_id TEXT UNIQUE,                        -- ChangeEvent.event_id; NULL for raw records
    data BLOB NOT NULL,
    appended_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    "offset" INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

# Not INSERT OR IGNORE / ON CONFLICT DO NOTHING: a skipped insert would still burn an
# AUTOINCREMENT number and leave a gap in the offsets. ``append`` asks which of a batch's event
# ids are stored already (one statement), then inserts the others: half the cost of an
# ``INSERT ... WHERE NOT EXISTS`` per row.
STORED_IDS = "SELECT event_id FROM records WHERE event_id IN (SELECT value FROM json_each(?))"
INSERT_EVENT = (
    "INSERT INTO records (partition_key, event_id, data, appended_at) VALUES (?, ?, ?, ?)"
)
INSERT_RAW = "INSERT INTO records (partition_key, data, appended_at) VALUES (?, ?, ?)"
SELECT_AFTER = """
SELECT "offset", partition_key, data, appended_at FROM records
WHERE "offset" > coalesce((SELECT "offset" FROM consumers WHERE name = ?), 0)
ORDER BY "offset" LIMIT ?
"""
SELECT_AFTER_OFFSET = """
SELECT "offset", partition_key, data, appended_at FROM records
WHERE "offset" > ? ORDER BY "offset" LIMIT ?
"""
HEAD = "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0)"

_JSON = msgspec.json.Encoder()

BUSY_TIMEOUT = 10.0
"""Seconds a write waits for another connection's write transaction before giving up."""

FAST_POLL = 0.001
"""Seconds between ``data_version`` checks during the first ``FAST_PERIOD`` of a wait."""
FAST_PERIOD = 0.05
SLOW_POLL = 0.005
"""Seconds between checks after that: an idle reader costs ~200 cheap pragmas a second."""


class EmbeddedStream(ChangeStream):
    """A ``ChangeStream`` in one SQLite file, shared safely by threads and processes.

    Writes (append, ack, seek, trim) go through one connection behind a lock, so this object's
    writers queue on the lock instead of SQLite's busy handler, which sleeps 1, 2, 5, 10... ms.
    Reads use one connection per thread: in WAL mode they never wait for a writer's fsync.
    Stop reading threads before ``close``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        """Protects ``_connections`` and ``_closed``."""
        self._closed = False
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._version = 0
        """Bumped (under ``_changed``) by every append or seek of this object."""
        self._registered: set[str] = set()
        # Held with flock during each write transaction: the writers of all processes queue.
        try:
            self._turns = os.open(f"{self.path}-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        except OSError as exc:
            raise Fatal(
                f"stream lock file {self.path}-lock cannot be opened ({exc}); check that the "
                "data folder exists and is writable"
            ) from exc
        try:
            with self._sqlite_errors("open"):
                self._writer = self._connect()
                self._writer.executescript(SCHEMA)
                # From now on _begin retries a busy write lock itself, at a finer grain.
                self._writer.execute("PRAGMA busy_timeout = 0")
        except BaseException:
            self.close()
            raise
        logger.debug("stream opened path=%s", self.path)

    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """Store the events not stored yet and the checkpoint in one durable transaction."""
        if not events and checkpoint is None:
            return self.stats().head  # nothing to store: no transaction, no fsync
        data = encode_many(events)  # first: it names a value the record format cannot carry
        keys = [e.partition_key for e in events]
        ids = [e.event_id for e in events]
        with self._sqlite_errors("append"), self._transaction() as conn:
            now = time.time()
            stored = _stored(conn, ids)
            rows = []
            for key, event_id, record in zip(keys, ids, data, strict=True):
                if event_id not in stored:
                    stored.add(event_id)  # an event twice in one batch: the first copy wins
                    rows.append((key, event_id, record, now))
            conn.executemany(INSERT_EVENT, rows)
            if checkpoint is not None:
                conn.execute(
                    "INSERT INTO checkpoints (source, state) VALUES (?, ?)"
                    " ON CONFLICT (source) DO UPDATE SET state = excluded.state",
                    (checkpoint.source, checkpoint.state),
                )
            head = _head(conn)
        self._notify()
        return head

    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> int:
        """Store foreign records as they are, durably, in one transaction."""
        with self._sqlite_errors("append"), self._transaction() as conn:
            now = time.time()
            conn.executemany(INSERT_RAW, [(key, bytes(data), now) for key, data in records])
            head = _head(conn)
        self._notify()
        return head

    def checkpoint(self, source: str) -> Checkpoint | None:
        """The last checkpoint stored for ``source``."""
        with self._sqlite_errors("checkpoint read"):
            row = (
                self._conn()
                .execute("SELECT state FROM checkpoints WHERE source = ?", (source,))
                .fetchone()
            )
        return None if row is None else Checkpoint(source, row[0])

    def read(
        self, consumer: str, limit: int, wait: float = 0.0, *, after: int | None = None
    ) -> list[StreamRecord]:
        """Records after the consumer's acknowledged offset (or ``after``); waits up to ``wait``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        started = time.monotonic()
        deadline = started + wait
        with self._sqlite_errors("read"):
            self._register(consumer)
            conn = self._conn()
            # Both marks are taken before the query, so an append racing it is never missed.
            with self._changed:
                seen = self._version
            data_version = _data_version(conn)
            found = _select(conn, consumer, limit, after)
            while not found:
                now = time.monotonic()
                if now >= deadline:
                    return []
                interval = FAST_POLL if now - started < FAST_PERIOD else SLOW_POLL
                with self._changed:
                    if self._version == seen:
                        self._changed.wait(min(interval, deadline - now))
                    woken = self._version != seen
                    seen = self._version
                self._check_open()
                current = _data_version(conn)
                if woken or current != data_version:
                    data_version = current
                    found = _select(conn, consumer, limit, after)
            return found

    def ack(self, consumer: str, offset: int) -> None:
        """Move the consumer forward to ``offset``; a lower offset than stored is ignored."""
        with self._sqlite_errors("ack"), self._transaction(durable=False) as conn:
            _check_offset(offset, _head(conn))
            conn.execute(
                'INSERT INTO consumers (name, "offset") VALUES (?, ?) ON CONFLICT (name)'
                ' DO UPDATE SET "offset" = max("offset", excluded."offset")',
                (consumer, offset),
            )
        self._registered.add(consumer)

    def seek(self, consumer: str, offset: int) -> None:
        """Set the consumer's offset, backwards too (0 replays everything retained)."""
        with self._sqlite_errors("seek"), self._transaction() as conn:
            _check_offset(offset, _head(conn))
            conn.execute(
                'INSERT INTO consumers (name, "offset") VALUES (?, ?) ON CONFLICT (name)'
                ' DO UPDATE SET "offset" = excluded."offset"',
                (consumer, offset),
            )
        self._registered.add(consumer)
        self._notify()

    def trim(self, keep_after: int) -> int:
        """Drop records up to ``keep_after`` that every registered consumer has acknowledged."""
        with self._sqlite_errors("trim"), self._transaction() as conn:
            (slowest,) = conn.execute('SELECT min("offset") FROM consumers').fetchone()
            bound = keep_after if slowest is None else min(keep_after, slowest)
            dropped = conn.execute('DELETE FROM records WHERE "offset" <= ?', (bound,)).rowcount
        if dropped:
            logger.debug("stream trimmed records=%d up_to=%d", dropped, bound)
        return dropped

    def stats(self) -> StreamStats:
        """Head offset, oldest retained offset and every consumer's acknowledged offset."""
        with self._sqlite_errors("stats"):
            conn = self._conn()
            conn.execute("BEGIN")  # one snapshot for the three queries
            try:
                head = _head(conn)
                (oldest,) = conn.execute('SELECT min("offset") FROM records').fetchone()
                consumers = dict(conn.execute('SELECT name, "offset" FROM consumers'))
            finally:
                conn.execute("COMMIT")
        return StreamStats(
            head=head, oldest=head + 1 if oldest is None else oldest, consumers=consumers
        )

    def close(self) -> None:
        """Close every thread's connection and wake waiting readers (which then raise)."""
        with self._write_lock, self._guard:  # the write lock: a running append finishes first
            if self._closed:
                return
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        os.close(self._turns)
        with self._changed:
            self._changed.notify_all()
        logger.debug("stream closed path=%s", self.path)

    def _connect(self) -> sqlite3.Connection:
        with self._guard:
            self._check_open()
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._connections.append(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's reading connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        else:
            self._check_open()
        return conn

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction on the writer connection, committed on exit.

        ``durable=False`` commits without waiting for the disk (WAL ``synchronous=NORMAL``):
        still atomic, but a power cut may undo it. Acknowledgements use it: losing one only
        redelivers records, which the engine's position guard makes harmless.
        """
        with self._write_lock:
            self._check_open()
            conn = self._writer
            with without_fsync(conn, skip=not durable):
                fcntl.flock(self._turns, fcntl.LOCK_EX)  # this process's turn among the writers
                try:
                    _begin(conn)
                    try:
                        yield conn
                        conn.execute("COMMIT")
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                finally:
                    fcntl.flock(self._turns, fcntl.LOCK_UN)

    @contextmanager
    def _sqlite_errors(self, action: str) -> Iterator[None]:
        """Turns SQLite's errors into optsync's, saying whether a retry can help."""
        try:
            yield
        except sqlite3.ProgrammingError:
            self._check_open()  # another thread closed the stream under this call
            raise
        except sqlite3.OperationalError as exc:
            raise Retryable(
                f"stream {action} failed on {self.path}: {exc}; check free disk space and"
                " that no other program holds a lock on the file, then retry"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise Fatal(
                f"stream file {self.path} is unusable: {exc}; restore it from a backup, or move"
                " it away to start an empty stream (capture then starts again from a snapshot)"
            ) from exc

    def _register(self, consumer: str) -> None:
        if consumer not in self._registered:
            with self._transaction() as conn:
                conn.execute(
                    'INSERT INTO consumers (name, "offset") VALUES (?, 0) ON CONFLICT DO NOTHING',
                    (consumer,),
                )
            self._registered.add(consumer)

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the stream {self.path} is closed")


def _begin(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, retried every 0.1-2 ms while another connection is writing.

    Only a writer that does not take turns on ``stream.db-lock`` can hold the lock here (this
    object's writers queue on ``_write_lock``, other ``EmbeddedStream`` objects on the flock).
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    pause = 0.0001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.002)


def _head(conn: sqlite3.Connection) -> int:
    (head,) = conn.execute(HEAD).fetchone()
    return int(head)


def _stored(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` the stream holds already."""
    if not ids:
        return set()
    return {row[0] for row in conn.execute(STORED_IDS, (_JSON.encode(ids).decode(),))}


def _data_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA data_version").fetchone()
    return int(version)


def _select(
    conn: sqlite3.Connection, consumer: str, limit: int, after: int | None
) -> list[StreamRecord]:
    rows = (
        conn.execute(SELECT_AFTER, (consumer, limit))
        if after is None
        else conn.execute(SELECT_AFTER_OFFSET, (after, limit))
    )
    return [
        StreamRecord(offset, key, bytes(data), appended_at)
        for offset, key, data, appended_at in rows
    ]


def _check_offset(offset: int, head: int) -> None:
    if not 0 <= offset <= head:
        raise ValueError(f"offset {offset} is outside the stream (0..{head})")
