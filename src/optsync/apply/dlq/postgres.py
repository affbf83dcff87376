"""``PostgresDeadLetterQueue``: the dead-letter queue as a table in the engine's PostgreSQL.

Several apply workers add to it at once. One entry per record is kept by a unique key on
(consumer, stream offset, SHA-256 of the bytes) and one ``INSERT ... ON CONFLICT`` per entry,
so two workers handed the same record (a redelivery) cannot both insert it, and a replayed
entry that fails again returns to the queue in the same statement. Its schema is versioned in
``schema_version`` (component ``dlq``), migrated on start like the engine's.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psycopg
import psycopg_pool
from psycopg.rows import TupleRow

from optsync.apply.dlq.base import DeadLetter, DeadLetterQueue
from optsync.engine.postgres_database import (
    Migration,
    connect,
    connection_url,
    migrate,
    translate_error,
)

__all__ = ("MIGRATIONS", "PostgresDeadLetterQueue")

WHAT = "dead-letter queue database"
APPLICATION_NAME = "optsync-dlq"

MIGRATIONS = (
    Migration(
        1,
        "dead_letters",
        (
            """CREATE TABLE dead_letters (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at double precision NOT NULL,          -- epoch seconds
                consumer text COLLATE "C" NOT NULL,
                stream_offset bigint NOT NULL,
                partition_key text COLLATE "C" NOT NULL,
                reason text COLLATE "C" NOT NULL,
                data bytea NOT NULL,
                data_sha256 bytea NOT NULL,
                replayed_at double precision,
                UNIQUE (consumer, stream_offset, data_sha256)
            )""",
            "CREATE INDEX dead_letters_waiting ON dead_letters (id) WHERE replayed_at IS NULL",
        ),
    ),
)
"""The DLQ's schema versions, oldest first."""

_COLUMNS = "id, at, consumer, stream_offset, partition_key, reason, data, replayed_at"


class PostgresDeadLetterQueue(DeadLetterQueue):
    """Dead letters in the ``dead_letters`` table of a PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        with connect(url, WHAT, APPLICATION_NAME) as conn:
            migrate(conn, "dlq", MIGRATIONS, url, WHAT)
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]] = (
            psycopg_pool.ConnectionPool(
                connection_url(url, APPLICATION_NAME),
                min_size=1,
                max_size=2,
                kwargs={"autocommit": True},
                name="optsync-dlq",
                open=False,
            )
        )
        try:
            self._pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            self._pool.close()
            raise translate_error(exc, url, WHAT) from exc

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[TupleRow]]:
        """A pooled connection; driver errors leave as ``Retryable`` or ``ConfigError``."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise translate_error(exc, self.url, WHAT) from exc

    def add(self, consumer: str, entries: Sequence[tuple[int, str, bytes, str]]) -> None:
        """Store (stream offset, partition key, data, reason) entries durably."""
        if not entries:
            return
        now = time.time()
        with self._connection() as conn, conn.transaction():
            conn.cursor().executemany(
                "INSERT INTO dead_letters (at, consumer, stream_offset, partition_key, reason, "
                "data, data_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (consumer, stream_offset, data_sha256) DO UPDATE "
                "SET replayed_at = NULL, reason = excluded.reason, at = excluded.at "
                # Held and waiting: kept as it is. Replayed once, dead again: back in the queue.
                "WHERE dead_letters.replayed_at IS NOT NULL",
                [
                    (now, consumer, offset, key, reason, data, hashlib.sha256(data).digest())
                    for offset, key, data, reason in entries
                ],
            )

    def list(self, *, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
        where = "" if include_replayed else "WHERE replayed_at IS NULL"
        with self._connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters {where} ORDER BY id LIMIT %s", (limit,)
            ).fetchall()
        return [DeadLetter(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), r[7]) for r in rows]

    def count(self) -> int:
        """Entries not replayed yet."""
        with self._connection() as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE replayed_at IS NULL"
            ).fetchone()
        return int(row[0]) if row else 0

    def mark_replayed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        with self._connection() as conn:
            conn.execute(
                "UPDATE dead_letters SET replayed_at = %s WHERE id = ANY(%s)",
                (time.time(), list(ids)),
            )

    def update_reason(self, entry_id: int, reason: str) -> None:
        """A replay failed again: keep the entry with the new reason."""
        with self._connection() as conn:
            conn.execute(
                "UPDATE dead_letters SET reason = %s, at = %s WHERE id = %s",
                (reason, time.time(), entry_id),
            )

    def close(self) -> None:
        self._pool.close()
