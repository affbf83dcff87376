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

Partitions: the count is stored in the file when it is created (``settings`` table) and never
changes; a record's partition is a column, offsets stay one ``AUTOINCREMENT`` sequence over all
partitions, and a consumer has one acknowledged offset per partition (``consumers`` rows).
A file of one partition has no index on the partition: reads, appends and trims stay on the
rowid, as before partitions existed. Leases and worker liveness are two more tables of the file
(``leases``, ``workers``), written in the claiming worker's transaction, so any process that
opens the file shares them; liveness is wall-clock time (``expires``), which every process of
one machine agrees on. A file written before partitions existed (no ``partition`` column, one
offset per consumer) is migrated in place when opened: every record and offset lands in
partition 0 of a one-partition stream.
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

from optsync.errors import ConfigError, Fatal, Retryable
from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.sqlite_sync import without_fsync
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats, partition_of
from optsync.stream.leases import share

__all__ = ("EmbeddedStream",)

logger = logging.getLogger(__name__)

SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS records (
        "offset" INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: never reused, even after trim
        partition_key TEXT NOT NULL,
        event_id TEXT UNIQUE,                        -- ChangeEvent.event_id; NULL for raw records
        data BLOB NOT NULL,
        appended_at REAL NOT NULL,
        "partition" INTEGER NOT NULL DEFAULT 0       -- last: where ALTER TABLE puts it too
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS consumers (
        name TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        PRIMARY KEY (name, "partition")
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS checkpoints (
        source TEXT PRIMARY KEY,
        state TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS settings (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS leases (
        consumer TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        worker TEXT NOT NULL,
        PRIMARY KEY (consumer, "partition")
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS workers (
        consumer TEXT NOT NULL,
        worker TEXT NOT NULL,
        expires REAL NOT NULL,                       -- Unix time its liveness ends
        PRIMARY KEY (consumer, worker)
    )
    """,
)
PARTITION_INDEX = (
    'CREATE INDEX IF NOT EXISTS records_by_partition ON records ("partition", "offset")'
)

# Not INSERT OR IGNORE / ON CONFLICT DO NOTHING: a skipped insert would still burn an
# AUTOINCREMENT number and leave a gap in the offsets. ``append`` asks which of a batch's event
# ids are stored already (one statement), then inserts the others: half the cost of an
# ``INSERT ... WHERE NOT EXISTS`` per row.
STORED_IDS = "SELECT event_id FROM records WHERE event_id IN (SELECT value FROM json_each(?))"
INSERT_EVENT = (
    'INSERT INTO records (partition_key, event_id, data, appended_at, "partition")'
    " VALUES (?, ?, ?, ?, ?)"
)
INSERT_RAW = (
    'INSERT INTO records (partition_key, data, appended_at, "partition") VALUES (?, ?, ?, ?)'
)
# With one partition there is no partition index: the "offset" range on the rowid serves both.
SELECT_AFTER = """
SELECT "offset", partition_key, data, appended_at FROM records
WHERE "partition" = ?1 AND "offset" > coalesce(
    (SELECT "offset" FROM consumers WHERE name = ?2 AND "partition" = ?1), 0)
ORDER BY "offset" LIMIT ?3
"""
SELECT_AFTER_OFFSET = """
SELECT "offset", partition_key, data, appended_at FROM records
WHERE "partition" = ?1 AND "offset" > ?2 ORDER BY "offset" LIMIT ?3
"""
REGISTER = (
    'INSERT INTO consumers (name, "partition", "offset") VALUES (?, ?, 0) ON CONFLICT DO NOTHING'
)
ACK = (
    'INSERT INTO consumers (name, "partition", "offset") VALUES (?, ?, ?)'
    ' ON CONFLICT (name, "partition") DO UPDATE SET "offset" = max("offset", excluded."offset")'
)
SEEK = (
    'INSERT INTO consumers (name, "partition", "offset") VALUES (?, ?, ?)'
    ' ON CONFLICT (name, "partition") DO UPDATE SET "offset" = excluded."offset"'
)
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

    Writes (append, ack, seek, trim, claim) go through one connection behind a lock, so this
    object's writers queue on the lock instead of SQLite's busy handler, which sleeps 1, 2, 5,
    10... ms. Reads use one connection per thread: in WAL mode they never wait for a writer's
    fsync. Stop reading threads before ``close``.

    ``partitions``: the partition count of a new file (1 when None). An existing file keeps the
    count it was created with: None opens it as it is, another number is a ``ConfigError``.
    """

    def __init__(self, path: str | Path, partitions: int | None = None) -> None:
        if partitions is not None and partitions < 1:
            raise ConfigError(f"a stream needs at least 1 partition, got {partitions}")
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
        self._partitions = 1
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
                # From now on _begin retries a busy write lock itself, at a finer grain.
                self._writer.execute("PRAGMA busy_timeout = 0")
                with self._transaction(durable=False) as conn:
                    self._partitions = _prepare(conn, partitions, self.path)
        except BaseException:
            self.close()
            raise
        logger.debug("stream opened path=%s partitions=%d", self.path, self._partitions)

    @property
    def partitions(self) -> int:
        """The partition count stored in the file."""
        return self._partitions

    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """Store the events not stored yet and the checkpoint in one durable transaction."""
        if not events and checkpoint is None:
            return self.stats().head  # nothing to store: no transaction, no fsync
        data = encode_many(events)  # first: it names a value the record format cannot carry
        keys = [e.partition_key for e in events]
        ids = [e.event_id for e in events]
        partitions = self._partitions
        with self._sqlite_errors("append"), self._transaction() as conn:
            now = time.time()
            stored = _stored(conn, ids)
            rows = []
            for key, event_id, record in zip(keys, ids, data, strict=True):
                if event_id not in stored:
                    stored.add(event_id)  # an event twice in one batch: the first copy wins
                    rows.append((key, event_id, record, now, partition_of(key, partitions)))
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
        partitions = self._partitions
        with self._sqlite_errors("append"), self._transaction() as conn:
            now = time.time()
            conn.executemany(
                INSERT_RAW,
                [(key, bytes(data), now, partition_of(key, partitions)) for key, data in records],
            )
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

    def checkpoints(self) -> list[Checkpoint]:
        """Every source's last checkpoint, by source name."""
        with self._sqlite_errors("checkpoint read"):
            rows = (
                self._conn()
                .execute("SELECT source, state FROM checkpoints ORDER BY source")
                .fetchall()
            )
        return [Checkpoint(source, state) for source, state in rows]

    def read(
        self,
        consumer: str,
        limit: int,
        wait: float = 0.0,
        *,
        partition: int = 0,
        after: int | None = None,
    ) -> list[StreamRecord]:
        """Records of ``partition`` after the consumer's acknowledged offset (or ``after``);
        waits up to ``wait``."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._check_partition(partition)
        started = time.monotonic()
        deadline = started + wait
        with self._sqlite_errors("read"):
            self._register(consumer)
            conn = self._conn()
            # Both marks are taken before the query, so an append racing it is never missed.
            with self._changed:
                seen = self._version
            data_version = _data_version(conn)
            found = _select(conn, consumer, partition, limit, after)
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
                    found = _select(conn, consumer, partition, limit, after)
            return found

    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        """Move the consumer forward to ``offset`` in ``partition``; a lower offset than stored
        is ignored."""
        self._check_partition(partition)
        with self._sqlite_errors("ack"), self._transaction(durable=False) as conn:
            _check_offset(offset, _head(conn))
            if consumer not in self._registered:
                _register_in(conn, consumer, self._partitions)
            conn.execute(ACK, (consumer, partition, offset))
        self._registered.add(consumer)

    def seek(self, consumer: str, offset: int) -> None:
        """Set the consumer's offset in every partition, backwards too (0 replays everything
        retained)."""
        with self._sqlite_errors("seek"), self._transaction() as conn:
            _check_offset(offset, _head(conn))
            conn.executemany(SEEK, [(consumer, p, offset) for p in range(self._partitions)])
        self._registered.add(consumer)
        self._notify()

    def claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        """Renew ``worker``'s liveness for ``ttl`` seconds and settle its share of partitions."""
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        # Not durable: after a power cut every worker claims again within its ttl anyway.
        with self._sqlite_errors("claim"), self._transaction(durable=False) as conn:
            now = time.time()
            conn.execute(
                "INSERT INTO workers (consumer, worker, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (consumer, worker) DO UPDATE SET expires = excluded.expires",
                (consumer, worker, now + ttl),
            )
            conn.execute("DELETE FROM workers WHERE consumer = ? AND expires <= ?", (consumer, now))
            live = [
                w
                for (w,) in conn.execute(
                    "SELECT worker FROM workers WHERE consumer = ?", (consumer,)
                )
            ]
            holders = dict(
                conn.execute(
                    'SELECT "partition", worker FROM leases WHERE consumer = ?', (consumer,)
                )
            )
            plan = share(worker, live, holders, self._partitions)
            conn.executemany(
                'DELETE FROM leases WHERE consumer = ? AND "partition" = ?',
                [(consumer, p) for p in plan.give_up],
            )
            conn.executemany(
                'INSERT INTO leases (consumer, "partition", worker) VALUES (?, ?, ?)'
                ' ON CONFLICT (consumer, "partition") DO UPDATE SET worker = excluded.worker',
                [(consumer, p, worker) for p in plan.take],
            )
        return plan.owned

    def release(self, consumer: str, worker: str) -> None:
        """Free every lease of ``worker`` and forget its liveness."""
        with self._sqlite_errors("release"), self._transaction(durable=False) as conn:
            conn.execute("DELETE FROM leases WHERE consumer = ? AND worker = ?", (consumer, worker))
            conn.execute(
                "DELETE FROM workers WHERE consumer = ? AND worker = ?", (consumer, worker)
            )

    def trim(self, keep_after: int) -> int:
        """Drop records up to ``keep_after`` that every registered consumer has acknowledged
        (per partition: a consumer behind in one partition holds only that partition)."""
        dropped = 0
        with self._sqlite_errors("trim"), self._transaction() as conn:
            for partition in range(self._partitions):
                (slowest,) = conn.execute(
                    'SELECT min("offset") FROM consumers WHERE "partition" = ?', (partition,)
                ).fetchone()
                bound = keep_after if slowest is None else min(keep_after, slowest)
                dropped += conn.execute(
                    'DELETE FROM records WHERE "partition" = ? AND "offset" <= ?',
                    (partition, bound),
                ).rowcount
        if dropped:
            logger.debug("stream trimmed records=%d up_to=%d", dropped, keep_after)
        return dropped

    def stats(self) -> StreamStats:
        """Head, oldest retained offset, and per consumer its acknowledged offset and the
        records it has not acknowledged (exact)."""
        with self._sqlite_errors("stats"):
            conn = self._conn()
            conn.execute("BEGIN")  # one snapshot for every query
            try:
                head = _head(conn)
                (oldest,) = conn.execute('SELECT min("offset") FROM records').fetchone()
                offsets: dict[str, list[tuple[int, int]]] = {}
                for name, partition, offset in conn.execute(
                    'SELECT name, "partition", "offset" FROM consumers'
                ):
                    (behind,) = conn.execute(
                        'SELECT count(*) FROM records WHERE "partition" = ? AND "offset" > ?',
                        (partition, offset),
                    ).fetchone()
                    offsets.setdefault(name, []).append((offset, behind))
            finally:
                conn.execute("COMMIT")
        return StreamStats(
            head=head,
            oldest=head + 1 if oldest is None else oldest,
            consumers={name: _acknowledged(each) for name, each in offsets.items()},
            pending={name: sum(behind for _, behind in each) for name, each in offsets.items()},
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
                _register_in(conn, consumer, self._partitions)
            self._registered.add(consumer)

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._partitions:
            raise ValueError(
                f"partition {partition} is outside the stream (0..{self._partitions - 1})"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the stream {self.path} is closed")


def _prepare(conn: sqlite3.Connection, requested: int | None, path: Path) -> int:
    """Create or migrate the schema (inside the opening transaction); the partition count."""
    if _columns(conn, "records") and "partition" not in _columns(conn, "records"):
        conn.execute('ALTER TABLE records ADD COLUMN "partition" INTEGER NOT NULL DEFAULT 0')
    if _columns(conn, "consumers") and "partition" not in _columns(conn, "consumers"):
        # One offset per consumer before partitions existed: it becomes partition 0's.
        conn.execute("ALTER TABLE consumers RENAME TO consumers_before_partitions")
        conn.execute(SCHEMA[1])
        conn.execute(
            'INSERT INTO consumers (name, "partition", "offset")'
            ' SELECT name, 0, "offset" FROM consumers_before_partitions'
        )
        conn.execute("DROP TABLE consumers_before_partitions")
        logger.info("stream file migrated to partitions path=%s", path)
    for statement in SCHEMA:
        conn.execute(statement)
    row = conn.execute("SELECT value FROM settings WHERE name = 'partitions'").fetchone()
    if row is None:
        # A new file takes the count asked for; a file written before partitions has one.
        count = (requested or 1) if _head(conn) == 0 else 1
        if requested is not None and requested != count:
            raise ConfigError(
                f"stream file {path} holds records of one partition (written before partitions"
                f" existed), not {requested}: leave [stream] partitions unset, or move the file"
                " away to start an empty stream (capture then starts again from a snapshot)"
            )
        conn.execute("INSERT INTO settings (name, value) VALUES ('partitions', ?)", (str(count),))
    else:
        count = int(row[0])
        if requested is not None and requested != count:
            raise ConfigError(
                f"stream file {path} was created with {count} partition(s), not {requested}:"
                f" set [stream] partitions = {count} (or leave it unset), or move the file away"
                " to start an empty stream (capture then starts again from a snapshot)"
            )
    if count > 1:
        conn.execute(PARTITION_INDEX)
    return count


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _register_in(conn: sqlite3.Connection, consumer: str, partitions: int) -> None:
    """The consumer gets offset 0 in every partition where it has none: it holds them all."""
    conn.executemany(REGISTER, [(consumer, p) for p in range(partitions)])


def _acknowledged(offsets: list[tuple[int, int]]) -> int:
    """A consumer's acknowledged offset from its (offset, records behind) per partition.

    The lowest offset among the partitions that hold records it has not acknowledged, or the
    highest when it has acknowledged everything: so it equals the head once the consumer is done.
    """
    behind = [offset for offset, count in offsets if count]
    return min(behind) if behind else max(offset for offset, _ in offsets)


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
    conn: sqlite3.Connection, consumer: str, partition: int, limit: int, after: int | None
) -> list[StreamRecord]:
    rows = (
        conn.execute(SELECT_AFTER, (partition, consumer, limit))
        if after is None
        else conn.execute(SELECT_AFTER_OFFSET, (partition, after, limit))
    )
    return [
        StreamRecord(offset, key, bytes(data), appended_at, partition)
        for offset, key, data, appended_at in rows
    ]


def _check_offset(offset: int, head: int) -> None:
    if not 0 <= offset <= head:
        raise ValueError(f"offset {offset} is outside the stream (0..{head})")
