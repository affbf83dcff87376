"""``KinesisState``: what the Kinesis input keeps in optsync's own state, not in Kinesis.

Kinesis stores records, nothing else: no consumer offsets, no leases. The Kinesis input
(``stream.kinesis``) keeps them here, next to the engine, in four tables keyed by the Kinesis
stream's name (several streams may share one database):

- ``kinesis_shards``: per consumer and shard, the sequence number of the last acknowledged
  record (read on with ``AFTER_SEQUENCE_NUMBER``) and whether the shard is *finished* (closed by
  a reshard and acknowledged to its end, so its children may be read);
- ``kinesis_offsets``: the counter that synthetic offsets are reserved from, in blocks;
- ``kinesis_consumers``: per consumer, the highest acknowledged offset (for ``optsync status``);
- ``kinesis_leases``: which apply worker reads the stream, until when (wall-clock seconds);
- ``kinesis_checkpoints``: the source checkpoint of ``optsync capture`` writing to Kinesis.

Where: like the dead-letter queue (``backends.open_dlq``), in the engine's PostgreSQL database
when ``[engine] url`` is ``postgresql://`` (schema versioned as component ``kinesis``), else in
``DATA_DIR/kinesis.db`` (SQLite, WAL, ``synchronous=FULL``). The SQL is written once with
``%s`` placeholders and portable statements (``ON CONFLICT``, ``RETURNING``, ``CASE``); the
SQLite store turns the placeholders into ``?``. Every method is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optsync.errors import Fatal, Retryable
from optsync.stream.base import Checkpoint

if TYPE_CHECKING:
    from optsync.config import Settings

__all__ = (
    "KinesisState",
    "PostgresKinesisState",
    "ShardCheckpoint",
    "SQLiteKinesisState",
    "open_kinesis_state",
)

WHAT = "Kinesis input state database"
APPLICATION_NAME = "optsync-kinesis"
BUSY_TIMEOUT = 10.0

TABLES = (
    """CREATE TABLE IF NOT EXISTS kinesis_shards (
        stream text NOT NULL,
        consumer text NOT NULL,
        shard text NOT NULL,
        seq text,                        -- last acknowledged sequence number; NULL: none yet
        finished integer NOT NULL,       -- 1: closed and acknowledged to its end
        PRIMARY KEY (stream, consumer, shard)
    )""",
    """CREATE TABLE IF NOT EXISTS kinesis_offsets (
        stream text PRIMARY KEY,
        reserved bigint NOT NULL         -- every offset <= reserved was handed to some process
    )""",
    """CREATE TABLE IF NOT EXISTS kinesis_consumers (
        stream text NOT NULL,
        consumer text NOT NULL,
        acked bigint NOT NULL,
        PRIMARY KEY (stream, consumer)
    )""",
    """CREATE TABLE IF NOT EXISTS kinesis_leases (
        stream text NOT NULL,
        consumer text NOT NULL,
        worker text NOT NULL,
        expires double precision NOT NULL,   -- Unix time the lease ends unless renewed
        PRIMARY KEY (stream, consumer)
    )""",
    """CREATE TABLE IF NOT EXISTS kinesis_checkpoints (
        stream text NOT NULL,
        source text NOT NULL,
        state text NOT NULL,
        PRIMARY KEY (stream, source)
    )""",
)


@dataclass(frozen=True)
class ShardCheckpoint:
    """A consumer's saved place in one shard."""

    seq: str | None
    """Sequence number of the last acknowledged record (None: read from TRIM_HORIZON)."""
    finished: bool = False


class _Cursor:
    """The few calls the shared SQL needs, over a sqlite3 or psycopg connection."""

    def __init__(self, conn: Any, placeholder: str) -> None:
        self._conn = conn
        self._placeholder = placeholder

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        if self._placeholder != "%s":
            sql = sql.replace("%s", self._placeholder)
        return self._conn.execute(sql, tuple(params))


class KinesisState(ABC):
    """The Kinesis input's state; thread-safe (one connection behind a lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]: ...

    @abstractmethod
    def close(self) -> None: ...

    def reserve_offsets(self, stream: str, block: int) -> int:
        """Reserve the next ``block`` offsets; returns the highest one (the block ends there)."""
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO kinesis_offsets (stream, reserved) VALUES (%s, 0)"
                " ON CONFLICT (stream) DO NOTHING",
                (stream,),
            )
            row = cur.execute(
                "UPDATE kinesis_offsets SET reserved = reserved + %s WHERE stream = %s"
                " RETURNING reserved",
                (block, stream),
            ).fetchone()
        return int(row[0])

    def shards(self, stream: str, consumer: str) -> dict[str, ShardCheckpoint]:
        """The consumer's saved place in every shard it acknowledged records of."""
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT shard, seq, finished FROM kinesis_shards"
                " WHERE stream = %s AND consumer = %s",
                (stream, consumer),
            ).fetchall()
        return {shard: ShardCheckpoint(seq, bool(finished)) for shard, seq, finished in rows}

    def save_progress(
        self, stream: str, consumer: str, shards: Mapping[str, ShardCheckpoint], acked: int
    ) -> None:
        """Store shard checkpoints and the acknowledged offset together (one transaction)."""
        with self._transaction() as cur:
            for shard, checkpoint in shards.items():
                cur.execute(
                    "INSERT INTO kinesis_shards (stream, consumer, shard, seq, finished)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (stream, consumer, shard)"
                    " DO UPDATE SET seq = excluded.seq, finished = excluded.finished",
                    (stream, consumer, shard, checkpoint.seq, int(checkpoint.finished)),
                )
            cur.execute(
                "INSERT INTO kinesis_consumers (stream, consumer, acked) VALUES (%s, %s, %s)"
                " ON CONFLICT (stream, consumer) DO UPDATE SET acked = CASE"
                " WHEN kinesis_consumers.acked < excluded.acked THEN excluded.acked"
                " ELSE kinesis_consumers.acked END",
                (stream, consumer, acked),
            )

    def forget(self, stream: str, consumer: str) -> None:
        """Drop the consumer's shard checkpoints: it reads every shard from TRIM_HORIZON."""
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM kinesis_shards WHERE stream = %s AND consumer = %s",
                (stream, consumer),
            )

    def acked(self, stream: str) -> dict[str, int]:
        """Consumer -> its highest acknowledged offset."""
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT consumer, acked FROM kinesis_consumers WHERE stream = %s", (stream,)
            ).fetchall()
        return {consumer: int(acked) for consumer, acked in rows}

    def claim(self, stream: str, consumer: str, worker: str, now: float, ttl: float) -> bool:
        """Take or renew the consumer's lease for ``worker`` until ``now + ttl``; False when
        another worker holds a lease that has not run out."""
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO kinesis_leases (stream, consumer, worker, expires)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (stream, consumer) DO UPDATE"
                " SET worker = excluded.worker, expires = excluded.expires"
                " WHERE kinesis_leases.worker = excluded.worker OR kinesis_leases.expires <= %s",
                (stream, consumer, worker, now + ttl, now),
            )
            row = cur.execute(
                "SELECT worker FROM kinesis_leases WHERE stream = %s AND consumer = %s",
                (stream, consumer),
            ).fetchone()
        return row is not None and row[0] == worker

    def release(self, stream: str, consumer: str, worker: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                "DELETE FROM kinesis_leases WHERE stream = %s AND consumer = %s AND worker = %s",
                (stream, consumer, worker),
            )

    def save_checkpoint(self, stream: str, checkpoint: Checkpoint) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO kinesis_checkpoints (stream, source, state) VALUES (%s, %s, %s)"
                " ON CONFLICT (stream, source) DO UPDATE SET state = excluded.state",
                (stream, checkpoint.source, checkpoint.state),
            )

    def checkpoints(self, stream: str) -> list[Checkpoint]:
        with self._transaction() as cur:
            rows = cur.execute(
                "SELECT source, state FROM kinesis_checkpoints WHERE stream = %s ORDER BY source",
                (stream,),
            ).fetchall()
        return [Checkpoint(source, state) for source, state in rows]


class SQLiteKinesisState(KinesisState):
    """The state in one SQLite file (``DATA_DIR/kinesis.db``)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            for statement in TABLES:
                self._conn.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise Fatal(
                f"{WHAT} {self.path} cannot be opened ({exc}): check that the data folder "
                "exists and is writable"
            ) from exc

    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _Cursor(self._conn, "?")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise Retryable(f"{WHAT} {self.path}: {exc}; it will be retried") from exc
            except sqlite3.Error as exc:
                raise Fatal(f"{WHAT} {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresKinesisState(KinesisState):
    """The state as tables of the engine's PostgreSQL database."""

    def __init__(self, url: str) -> None:
        # psycopg is imported here: a SQLite deployment need not load it.
        from optsync.engine.postgres_database import (  # noqa: PLC0415
            Migration,
            connect,
            migrate,
        )

        super().__init__()
        self.url = url
        self._connect = connect
        self._conn = connect(url, WHAT, APPLICATION_NAME)
        try:
            migrate(self._conn, "kinesis", (Migration(1, "kinesis input", TABLES),), url, WHAT)
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _transaction(self) -> Iterator[_Cursor]:
        import psycopg  # noqa: PLC0415

        from optsync.engine.postgres_database import translate_error  # noqa: PLC0415

        with self._lock:
            if self._conn.broken or self._conn.closed:  # lost: the next call gets a new one
                self._conn = self._connect(self.url, WHAT, APPLICATION_NAME)
            try:
                with self._conn.transaction():
                    yield _Cursor(self._conn, "%s")
            except psycopg.Error as exc:
                raise translate_error(exc, self.url, WHAT) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def open_kinesis_state(settings: Settings) -> KinesisState:
    """The state store: in the engine's PostgreSQL database, else DATA_DIR/kinesis.db (the
    same choice as ``backends.open_dlq``)."""
    if settings.engine_scheme == "postgresql":
        assert settings.engine_url is not None
        return PostgresKinesisState(settings.engine_url)
    return SQLiteKinesisState(settings.data_dir / "kinesis.db")
