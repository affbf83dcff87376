"""``PostgresStore``: the engine's storage in PostgreSQL, shared by several apply workers and
API servers at once.

The SQL is ``SqlStore``'s; this module adds what several writers on one database need (see
docs/engine.md, "PostgreSQL store: concurrent writers"):

- every write transaction that touches an app takes ``pg_advisory_xact_lock`` on that app
  first, so the rules ``WriteBatch`` works out in memory (the 15-endpoint user cap, same-address
  deactivation, the position guard) see every committed write of the app and no concurrent one;
- primary keys of new endpoints come from the ``endpoints_pk_seq`` sequence, reserved once the
  batch knows how many it created;
- every text column is ``COLLATE "C"``: positions (and ids, and every ORDER BY) compare by
  bytes as in SQLite, whatever the database's default collation is;
- driver errors become ``Retryable`` (the connection, a failover, a lost race) or
  ``ConfigError`` (password, database, privilege), with the password never in the message.

The schema is versioned in ``schema_version`` (component ``engine``) and migrated on start
under an advisory lock (``postgres_database.migrate``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from optsync.engine.plain_writes import NewRow
from optsync.engine.postgres_database import (
    Migration,
    connect,
    connection_url,
    migrate,
    translate_error,
)
from optsync.engine.segments import Dialect
from optsync.engine.sql import Cursor, SqlStore, StoreSettings
from optsync.engine.sql_keys import keys_schema
from optsync.engine.sql_ledger import LEDGER_HISTORY_COLUMNS, ledger_schema
from optsync.engine.sql_segments import DEFINITION_ROWS, DEFINITION_UPDATE, upgraded_definitions
from optsync.engine.writes import Row

__all__ = ("MIGRATIONS", "PostgresStore")

log = logging.getLogger(__name__)

WHAT = "engine database"
APPLICATION_NAME = "optsync-engine"
POOL_TIMEOUT = 30.0
"""Seconds a request waits for a pooled connection before it fails (``Retryable``)."""

APP_LOCK_CLASS = int.from_bytes(b"opts", "big", signed=True)
"""First key of the two-key advisory locks on apps (the second is a hash of the app id)."""

ANALYZE_EVERY = 50_000
"""A store refreshes planner statistics after writing this many endpoints (sooner while the
tables are young: after 1,000, 2,000, 4,000 ... as they double)."""
ANALYZED_TABLES = "endpoints, endpoint_attributes, endpoint_metrics, tombstones"

COPY_ROWS = 20
"""Inserts of at least this many rows go by COPY: a few microseconds a row, where psycopg's
``executemany`` (pipelined INSERTs) spends some tens."""

NEW_PK_BASE = 1 << 62
"""Where a batch numbers its new endpoints until ``_number_new_rows`` gives them real keys:
above every key the sequence hands out, so they sort after the app's existing endpoints."""

_TEXT = 'text COLLATE "C"'
_DOUBLE = "double precision"
_DOUBLE_COLUMNS = frozenset({"latitude", "longitude"})
"""The ``endpoints`` columns that are not text (besides pk)."""
UNNEST_ROWS = 8
"""From this many rows, an UPDATE or an upsert joins arrays in one statement."""

_V1 = (
    "CREATE SEQUENCE apps_seq",
    """CREATE TABLE apps (
        id {text} PRIMARY KEY,
        name {text} NOT NULL,
        creation_date {text} NOT NULL,
        tags {text} NOT NULL,
        seq bigint NOT NULL UNIQUE      -- creation order (dates have millisecond precision)
    )""",
    "CREATE INDEX apps_by_name ON apps (name, seq)",
    """CREATE TABLE channels (
        app_id {text} NOT NULL,
        channel_type {text} NOT NULL,
        enabled integer NOT NULL,
        creation_date {text} NOT NULL,
        last_modified_date {text} NOT NULL,
        version integer NOT NULL,
        settings {text} NOT NULL,
        PRIMARY KEY (app_id, channel_type)
    )""",
    "CREATE SEQUENCE endpoints_pk_seq",
    # fillfactor 90: room on each page for an updated row (an opt-out flip changes no indexed
    # column), so PostgreSQL updates it in place (HOT) without new index entries.
    """CREATE TABLE endpoints (
        pk bigint PRIMARY KEY,
        app_id {text} NOT NULL,
        id {text} NOT NULL,
        id_key {text} NOT NULL,
        channel_type {text} NOT NULL,
        address {text},
        opt_out {text} NOT NULL,
        status {text} NOT NULL,
        creation_date {text} NOT NULL,
        effective_date {text} NOT NULL,
        cohort_id {text} NOT NULL,
        request_id {text} NOT NULL,
        user_id {text},
        country {text},
        country_code {text},
        city {text},
        region {text},
        postal_code {text},
        latitude double precision,
        longitude double precision,
        app_version {text},
        locale {text},
        make {text},
        model {text},
        model_version {text},
        platform {text},
        platform_version {text},
        timezone {text},
        attributes {text} NOT NULL,
        user_attributes {text} NOT NULL,
        metrics {text} NOT NULL,
        source_position {text},
        UNIQUE (app_id, id_key)
    ) WITH (fillfactor = 90)""",
    "CREATE INDEX endpoints_by_country ON endpoints (app_id, country_code)",
    "CREATE INDEX endpoints_user ON endpoints (app_id, user_id)",
    "CREATE INDEX endpoints_by_address ON endpoints (app_id, address, channel_type, status)",
    """CREATE TABLE endpoint_counts (
        app_id {text} NOT NULL,
        country_code {text} NOT NULL,   -- '' when the endpoint has no country
        channel_type {text} NOT NULL,
        status {text} NOT NULL,
        opt_out {text} NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (app_id, country_code, channel_type, status, opt_out)
    )""",
    # The primary key carries the rollup copies (INCLUDE): an attribute segment is counted by
    # an index-only scan of the matching entries, as SQLite's WITHOUT ROWID table is.
    """CREATE TABLE endpoint_attributes (
        app_id {text} NOT NULL,
        kind {text} NOT NULL,           -- A: Attributes, U: User.UserAttributes
        name {text} NOT NULL,
        value {text} NOT NULL,
        endpoint_pk bigint NOT NULL,
        value_ts bigint,                -- the value as epoch ms when it reads as an ISO-8601 date
        country_code {text} NOT NULL,
        channel_type {text} NOT NULL,
        status {text} NOT NULL,
        opt_out {text} NOT NULL,
        PRIMARY KEY (app_id, kind, name, value, endpoint_pk)
            INCLUDE (country_code, channel_type, status, opt_out)
    )""",
    """CREATE INDEX endpoint_attributes_ts ON endpoint_attributes (app_id, kind, name, value_ts)
        INCLUDE (endpoint_pk, country_code, channel_type, status, opt_out)
        WHERE value_ts IS NOT NULL""",
    "CREATE INDEX endpoint_attributes_endpoint ON endpoint_attributes (endpoint_pk)",
    """CREATE TABLE endpoint_metrics (
        endpoint_pk bigint NOT NULL,
        app_id {text} NOT NULL,
        name {text} NOT NULL,
        value double precision NOT NULL
    )""",
    "CREATE INDEX endpoint_metrics_value ON endpoint_metrics (app_id, name, value, endpoint_pk)",
    "CREATE INDEX endpoint_metrics_endpoint ON endpoint_metrics (endpoint_pk)",
    """CREATE TABLE attribute_names (
        app_id {text} NOT NULL,
        kind {text} NOT NULL,
        name {text} NOT NULL,
        PRIMARY KEY (app_id, kind, name)
    )""",
    """CREATE TABLE tombstones (
        app_id {text} NOT NULL,
        id_key {text} NOT NULL,
        position {text} NOT NULL,
        PRIMARY KEY (app_id, id_key)
    )""",
    """CREATE TABLE consent_history (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        app_id {text} NOT NULL,
        endpoint_key {text} NOT NULL,
        endpoint_id {text} NOT NULL,
        at {text} NOT NULL,
        opt_out_before {text},
        opt_out_after {text},
        address {text},
        cause_kind {text} NOT NULL,
        cause_ref {text} NOT NULL
    )""",
    "CREATE INDEX consent_history_endpoint ON consent_history (app_id, endpoint_key, seq)",
    """CREATE TABLE segments (
        app_id {text} NOT NULL,
        id {text} NOT NULL,
        version integer NOT NULL,
        segment_type {text} NOT NULL,
        creation_date {text} NOT NULL,
        last_modified_date {text} NOT NULL,
        definition {text} NOT NULL,
        name {text},
        tags {text} NOT NULL,
        PRIMARY KEY (app_id, id, version)
    )""",
    # One row per open store: ``sync`` rewrites its own, a durable commit that flushes the WAL.
    """CREATE TABLE engine_sync (
        holder {text} PRIMARY KEY,
        synced_at timestamptz NOT NULL
    )""",
)

_V2 = (
    *(
        f"ALTER TABLE consent_history ADD COLUMN {column.format(text=_TEXT)}"
        for column in LEDGER_HISTORY_COLUMNS
    ),
    "CREATE INDEX consent_history_app ON consent_history (app_id, seq)",
    *(
        statement.strip()
        for statement in ledger_schema(
            _TEXT, "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
        ).split(";")
        if statement.strip()
    ),
)

_V3 = (
    *(
        f"ALTER TABLE segments ADD COLUMN {column}"
        for column in (
            f"import_format {_TEXT}",
            f"import_url {_TEXT}",
            f"import_external_id {_TEXT}",
            "import_size bigint",
        )
    ),
    # Members of IMPORT segments by endpoint key, in key order: the estimate walks one
    # segment's entries and joins each to endpoints through its UNIQUE (app_id, id_key).
    f"""CREATE TABLE segment_members (
        app_id {_TEXT} NOT NULL,
        segment_id {_TEXT} NOT NULL,
        id_key {_TEXT} NOT NULL,
        PRIMARY KEY (app_id, segment_id, id_key)
    )""",
)


def _store_definitions(conn: psycopg.Connection[TupleRow]) -> None:
    """Migration 4: every version of every segment rewritten in the stored form.

    A Python step (``Migration.convert``), not a lazy conversion on read: the stored form is
    then the only one any reader meets, and ``wire.py`` is never asked to read a row again.
    """
    rows = conn.execute(DEFINITION_ROWS).fetchall()
    changed = upgraded_definitions(rows)
    with conn.cursor() as cur:
        cur.executemany(_pyformat(DEFINITION_UPDATE), changed)


MIGRATIONS = (
    Migration(
        1,
        "apps, channels, endpoints with side tables and rollup, tombstones, history, segments",
        tuple(statement.format(text=_TEXT) for statement in _V1),
    ),
    Migration(2, "the consent ledger: sinks, end users' opt-outs, audit", _V2),
    Migration(3, "IMPORT segments: segment_members and the import definition columns", _V3),
    Migration(
        4,
        "segment definitions in optsync's stored form instead of Pinpoint's JSON",
        (),
        convert=_store_definitions,
    ),
    # PUBLIC gets no privilege on a new table; the REVOKE says so for anyone reading it here.
    Migration(
        5,
        "scoped API keys (api_keys)",
        (keys_schema(_TEXT), "REVOKE ALL ON api_keys FROM PUBLIC"),
    ),
)
"""The engine's schema versions, oldest first; a new version is appended, never edited."""


@functools.lru_cache(maxsize=4096)
def _pyformat(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _app_lock_key(app_id: str) -> int:
    """The second key of the app's advisory lock: 32 bits of a hash, the same in every process."""
    digest = hashlib.blake2b(app_id.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresStore(SqlStore):
    """Engine storage in a PostgreSQL database that several processes write at once.

    ``url`` is a ``postgresql://`` URL; the schema is created or upgraded on start. Each
    transaction takes a connection of a pool of ``pool_size``; concurrent ``write_endpoints``
    calls of this process share one transaction (``SqlStore``'s group commit).
    """

    dialect = Dialect(contains="strpos({column}, ?) > 0", greatest="GREATEST")
    _APP_SEQ = "nextval('apps_seq')"

    def __init__(
        self, url: str, settings: StoreSettings | None = None, *, pool_size: int = 4
    ) -> None:
        super().__init__(settings)
        self.url = url
        self._holder = uuid.uuid4().hex
        self._unsynced = False
        self._synced = False  # this store has a row in engine_sync to remove on close
        self._sync_lock = threading.Lock()
        self._next_analyze = 1_000
        self._analyzer: threading.Thread | None = None
        with connect(url, WHAT, APPLICATION_NAME) as conn:
            migrate(conn, "engine", MIGRATIONS, url, WHAT)
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[TupleRow]] = (
            psycopg_pool.ConnectionPool(
                connection_url(url, APPLICATION_NAME),
                min_size=1,
                max_size=max(1, pool_size),
                kwargs={"autocommit": True},
                configure=_configure,
                timeout=POOL_TIMEOUT,
                name="optsync-engine",
                open=False,
            )
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg.Error as exc:
            self._pool.close()
            raise translate_error(exc, url, WHAT) from exc

    # hooks ------------------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return _pyformat(sql)

    def _chunks(self, values: Sequence[Any]) -> list[Sequence[Any]]:
        return [values] if values else []  # one array parameter holds them all

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        # One array parameter: one statement text whatever the number of values.
        return f"{column} = ANY(?)", [list(values)]

    def _insert(
        self, cur: Cursor, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        if len(rows) < COPY_ROWS:
            super()._insert(cur, table, columns, rows)
            return
        assert isinstance(cur, psycopg.Cursor)
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def _update_endpoints(
        self, cur: Cursor, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        # One statement joining arrays, one per column (executemany: a round of the pipeline
        # and a statement per row, 66 us a row measured against a few us here).
        if len(rows) < UNNEST_ROWS:
            super()._update_endpoints(cur, columns, rows)
            return
        types = [_DOUBLE if c in _DOUBLE_COLUMNS else "text" for c in columns]
        arrays = ", ".join(f"%s::{t}[]" for t in (*types, "bigint"))
        sets = ", ".join(f"{c} = v.{c}" for c in columns)
        cur.execute(
            f"UPDATE endpoints AS e SET {sets} FROM unnest({arrays}) "
            f"AS v({', '.join(columns)}, pk) WHERE e.pk = v.pk",
            [list(values) for values in zip(*rows, strict=True)],
        )

    def _upsert_tombstones(
        self, cur: Cursor, app_id: str, written: Sequence[tuple[str, str]]
    ) -> None:
        if len(written) < UNNEST_ROWS:
            super()._upsert_tombstones(cur, app_id, written)
            return
        keys, positions = zip(*written, strict=True)
        cur.execute(
            "INSERT INTO tombstones (app_id, id_key, position) SELECT %s, k, p "
            "FROM unnest(%s::text[], %s::text[]) AS t(k, p) ON CONFLICT (app_id, id_key) "
            "DO UPDATE SET position = GREATEST(tombstones.position, excluded.position)",
            (app_id, list(keys), list(positions)),
        )

    def _insert_members(
        self, cur: Cursor, app_id: str, segment_id: str, keys: Sequence[str]
    ) -> None:
        # One statement per batch with one array parameter (executemany: a round of the
        # pipeline per row); a key repeated within the batch or already there is skipped.
        cur.execute(
            "INSERT INTO segment_members (app_id, segment_id, id_key) SELECT %s, %s, k "
            "FROM unnest(%s::text[]) AS k ON CONFLICT DO NOTHING",
            (app_id, segment_id, list(keys)),
        )

    def _translate_error(self, exc: Exception) -> Exception:
        return translate_error(exc, self.url, WHAT) if isinstance(exc, psycopg.Error) else exc

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Cursor]:
        """A cursor on a pooled connection inside ``begin`` ... COMMIT; ROLLBACK on error."""
        try:
            conn = self._pool.getconn()
        except psycopg.Error as exc:
            raise translate_error(exc, self.url, WHAT) from exc
        try:
            with conn.cursor() as cur:
                cur.execute(begin)
                try:
                    yield cur
                except BaseException:
                    _rollback(conn)
                    raise
                cur.execute("COMMIT")
        except psycopg.Error as exc:
            _rollback(conn)
            if conn.broken or conn.closed:
                # The server went away: the other idle connections are likely dead as well.
                threading.Thread(target=self._check_pool, daemon=True).start()
            raise translate_error(exc, self.url, WHAT) from exc
        finally:
            self._pool.putconn(conn)

    def _check_pool(self) -> None:
        try:
            self._pool.check()
        except psycopg.Error as exc:  # the pool reconnects on its own; nothing to do here
            log.debug("engine pool check failed reason=%s", exc)

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[Cursor]:
        if durable:
            begin = "BEGIN"
        else:
            with self._sync_lock:
                self._unsynced = True  # for ``sync``, whether this commit happens or not
            # The commit returns before its WAL reaches the disk; ``sync`` flushes it.
            begin = "BEGIN; SET LOCAL synchronous_commit = off"
        with self._transaction(begin) as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        # One snapshot for the few statements of a read (the app, then its rows).
        with self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as cur:
            yield cur

    def _lock_apps(self, cur: Cursor, app_ids: Sequence[str]) -> None:
        """Wait for, then hold until COMMIT, an advisory lock per app.

        Taken before the transaction reads anything of the app, and in one global order (by
        key) so two transactions that lock several apps cannot deadlock.
        """
        for key in sorted({_app_lock_key(app_id) for app_id in app_ids}):
            cur.execute(
                "SELECT pg_advisory_xact_lock(%s::integer, %s::integer)", (APP_LOCK_CLASS, key)
            )

    def _next_pk(self, cur: Cursor) -> int:
        return NEW_PK_BASE

    def _number_new_rows(self, cur: Cursor, changed: Sequence[Row | NewRow]) -> None:
        """Swap the batch's provisional keys of new endpoints for keys from the sequence.

        Keys are handed out in increasing order and the app's writers run one after the other,
        so new endpoints still sort after the app's older ones, as ``WriteBatch`` assumed.
        """
        new = sorted((r for r in changed if r.stored is None), key=lambda r: r.pk)
        if not new:
            return
        cur.execute("SELECT nextval('endpoints_pk_seq') FROM generate_series(1, %s)", (len(new),))
        keys = sorted(int(row[0]) for row in cur.fetchall())
        for row, key in zip(new, keys, strict=True):
            row.pk = key

    def _after_writes(self) -> None:
        """Refresh planner statistics now and then, on a thread of its own.

        Autovacuum analyzes a table only after 10 % of it changed, and looks once a minute: a
        load into new tables runs meanwhile without statistics, and the planner, guessing, reads
        the same-address lookup as a scan of the app's whole address index (measured: 25 ms per
        500 addresses at 47,000 endpoints, growing with the table). ANALYZE samples at most
        30,000 rows, a fraction of a second even at millions of endpoints.
        """
        if self._written < self._next_analyze:
            return
        with self._sync_lock:
            if self._analyzer is not None and self._analyzer.is_alive():
                return
            self._next_analyze = self._written + min(max(self._written, 1_000), ANALYZE_EVERY)
            self._analyzer = threading.Thread(
                target=self._analyze, name="engine-analyze", daemon=True
            )
            self._analyzer.start()

    def _analyze(self) -> None:
        try:
            with self._pool.connection() as conn:
                conn.execute(f"ANALYZE {ANALYZED_TABLES}")
        except psycopg.Error as exc:  # statistics are a help, not a need: autovacuum remains
            log.info("engine analyze skipped reason=%s", _first_line(exc))

    # durability -------------------------------------------------------------------------------
    def sync(self) -> None:
        """Make every commit so far durable: one durable commit that writes.

        A commit with ``synchronous_commit = on`` flushes the WAL up to its own record, and so
        every record before it, including those of the ``durable=False`` commits that returned
        earlier (from any connection). A commit that wrote nothing would flush nothing, hence
        the write of this store's row in ``engine_sync``.
        """
        with self._sync_lock:
            if not self._unsynced:
                return
            self._unsynced = False
        try:
            with self._write() as cur:
                cur.execute(
                    "INSERT INTO engine_sync (holder, synced_at) VALUES (%s, now()) "
                    "ON CONFLICT (holder) DO UPDATE SET synced_at = excluded.synced_at",
                    (self._holder,),
                )
            self._synced = True
        except BaseException:
            with self._sync_lock:
                self._unsynced = True
            raise

    def close(self) -> None:
        if self._analyzer is not None:
            self._analyzer.join()
        if self._synced:
            try:
                with self._write() as cur:
                    cur.execute("DELETE FROM engine_sync WHERE holder = %s", (self._holder,))
            except Exception as exc:  # closed while the server is gone: the row stays, harmless
                log.debug("engine close could not remove its sync row reason=%s", exc)
        self._pool.close()


def _configure(conn: psycopg.Connection[TupleRow]) -> None:
    """Settings of every pooled connection.

    psycopg prepares a statement run five times, and PostgreSQL may then keep one generic plan
    for it, made when the tables were small (a load into an empty app): a sequential scan that
    stays while the table grows, each batch slower than the last (measured: 0.5 s for the
    first 5,000 endpoints, 10.7 s for the eighth 5,000). Custom plans are made with the
    parameters and the table's current size, at a fraction of a millisecond per statement.
    """
    conn.execute("SET plan_cache_mode = force_custom_plan")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _rollback(conn: psycopg.Connection[TupleRow]) -> None:
    """End a failed transaction, if the connection still can."""
    if conn.closed or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error as exc:  # the connection is gone: the pool discards it
        log.debug("engine rollback failed reason=%s", exc)
