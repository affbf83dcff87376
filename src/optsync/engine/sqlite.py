"""``SQLiteStore``: the embedded engine storage (one file in the data folder, WAL mode)."""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from optsync.engine.sql import Cursor, SqlStore, StoreSettings
from optsync.engine.sql_keys import keys_schema
from optsync.engine.sql_ledger import LEDGER_HISTORY_COLUMNS, ledger_schema
from optsync.engine.sql_segments import DEFINITION_ROWS, DEFINITION_UPDATE, upgraded_definitions
from optsync.sqlite_sync import without_fsync

__all__ = ("SQLiteStore",)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5
"""1: first release; 2: endpoint_attributes clustered, with the rollup columns copied in;
3: the consent ledger (history columns for sinks and audit, end-user opt-outs, sink state);
4: IMPORT segments (``segment_members``, the import definition columns of ``segments``);
5: ``segments.definition`` in optsync's stored form (``segments/stored.py``) instead of
Pinpoint's JSON: every version of every segment converted once, in one transaction, on open.
(``api_keys``, the scoped API keys, is created by ``IF NOT EXISTS`` in any version.)"""

SEGMENT_IMPORT_COLUMNS = (
    "import_format TEXT",
    "import_url TEXT",
    "import_external_id TEXT",
    "import_size INTEGER",
)
"""Columns of ``segments`` set on IMPORT segments only (added to older files by ALTER)."""

CHECKPOINT_BYTES = 8 * 1024 * 1024
"""The checkpointer thread copies the WAL into the database once the -wal file is this big."""
CHECKPOINT_POLL = 0.05
"""Seconds between the checkpointer's looks at the -wal file."""
WRITER_CHECKPOINT_PAGES = 10_000
"""Past this many WAL pages (40 MiB) the writing connection checkpoints by itself: the bound
when the checkpointer falls behind."""
WAL_SIZE_LIMIT = 64 * 1024 * 1024
"""``journal_size_limit``: a -wal file that grew past this is cut back when it starts over."""
READERS = 4
"""Connections of a file engine that serve reads, so a read never waits for a write
transaction (WAL: readers see the last commit); more concurrent reads wait for one."""
READER_CACHE_KIB = 16 * 1024
"""Page cache of each reader (the writer has 64 MiB); the OS page cache is shared."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    tags TEXT NOT NULL,
    seq INTEGER NOT NULL            -- creation order (dates have only millisecond precision)
);
CREATE TABLE IF NOT EXISTS channels (
    app_id TEXT NOT NULL,
    channel_type TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    creation_date TEXT NOT NULL,
    last_modified_date TEXT NOT NULL,
    version INTEGER NOT NULL,
    settings TEXT NOT NULL,
    PRIMARY KEY (app_id, channel_type)
);
CREATE TABLE IF NOT EXISTS endpoints (
    pk INTEGER PRIMARY KEY,
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    id_key TEXT NOT NULL,
    channel_type TEXT NOT NULL,
    address TEXT,
    opt_out TEXT NOT NULL,
    status TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    effective_date TEXT NOT NULL,
    cohort_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    user_id TEXT,
    country TEXT,
    country_code TEXT,
    city TEXT,
    region TEXT,
    postal_code TEXT,
    latitude REAL,
    longitude REAL,
    app_version TEXT,
    locale TEXT,
    make TEXT,
    model TEXT,
    model_version TEXT,
    platform TEXT,
    platform_version TEXT,
    timezone TEXT,
    attributes TEXT NOT NULL,
    user_attributes TEXT NOT NULL,
    metrics TEXT NOT NULL,
    source_position TEXT,
    UNIQUE (app_id, id_key)
);
-- Country narrows filters the rollup cannot answer (Country with a demographic or metric).
-- Status and opt-out stay out of it, and channel has no index: the rollup counts those, and an
-- opt-out flip then moves no index entry.
DROP INDEX IF EXISTS endpoints_country;
DROP INDEX IF EXISTS endpoints_channel;
CREATE INDEX IF NOT EXISTS endpoints_by_country ON endpoints (app_id, country_code);
CREATE INDEX IF NOT EXISTS endpoints_user ON endpoints (app_id, user_id);
-- Same-address deactivation on every write: four equality terms, so the planner picks it even
-- before ANALYZE has statistics.
CREATE INDEX IF NOT EXISTS endpoints_by_address
    ON endpoints (app_id, address, channel_type, status);
DROP INDEX IF EXISTS endpoints_address;
-- Rollup of endpoints per (country, channel, status, opt-out), kept in step by every write:
-- segments on Country and channel are counted from a few rows instead of a million.
CREATE TABLE IF NOT EXISTS endpoint_counts (
    app_id TEXT NOT NULL,
    country_code TEXT NOT NULL,     -- '' when the endpoint has no country
    channel_type TEXT NOT NULL,
    status TEXT NOT NULL,
    opt_out TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (app_id, country_code, channel_type, status, opt_out)
);
-- One row per attribute value, clustered by what segments filter on. Each row carries a copy
-- of its endpoint's rollup columns, so a segment driven by an attribute is counted (total and
-- eligible) from this table alone, without a lookup into endpoints per match.
CREATE TABLE IF NOT EXISTS endpoint_attributes (
    app_id TEXT NOT NULL,
    kind TEXT NOT NULL,          -- A: Attributes, U: User.UserAttributes
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    endpoint_pk INTEGER NOT NULL,
    value_ts INTEGER,            -- the value as epoch ms when it reads as an ISO-8601 date
    country_code TEXT NOT NULL,  -- '' when the endpoint has no country
    channel_type TEXT NOT NULL,
    status TEXT NOT NULL,
    opt_out TEXT NOT NULL,
    PRIMARY KEY (app_id, kind, name, value, endpoint_pk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS endpoint_attributes_ts
    ON endpoint_attributes (app_id, kind, name, value_ts)
    WHERE value_ts IS NOT NULL;
CREATE INDEX IF NOT EXISTS endpoint_attributes_endpoint ON endpoint_attributes (endpoint_pk);
CREATE TABLE IF NOT EXISTS endpoint_metrics (
    endpoint_pk INTEGER NOT NULL,
    app_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS endpoint_metrics_value
    ON endpoint_metrics (app_id, name, value, endpoint_pk);
CREATE INDEX IF NOT EXISTS endpoint_metrics_endpoint ON endpoint_metrics (endpoint_pk);
CREATE TABLE IF NOT EXISTS attribute_names (
    app_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (app_id, kind, name)
);
CREATE TABLE IF NOT EXISTS tombstones (
    app_id TEXT NOT NULL,
    id_key TEXT NOT NULL,
    position TEXT NOT NULL,
    PRIMARY KEY (app_id, id_key)
);
CREATE TABLE IF NOT EXISTS consent_history (
    seq INTEGER PRIMARY KEY,
    app_id TEXT NOT NULL,
    endpoint_key TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    at TEXT NOT NULL,
    opt_out_before TEXT,
    opt_out_after TEXT,
    address TEXT,
    cause_kind TEXT NOT NULL,
    cause_ref TEXT NOT NULL,
    channel_type TEXT,
    user_id TEXT,
    source_time TEXT,
    cause_detail TEXT NOT NULL DEFAULT '',
    address_before TEXT
);
CREATE INDEX IF NOT EXISTS consent_history_endpoint
    ON consent_history (app_id, endpoint_key, seq);
CREATE INDEX IF NOT EXISTS consent_history_app ON consent_history (app_id, seq);
{LEDGER}
CREATE TABLE IF NOT EXISTS segments (
    app_id TEXT NOT NULL,
    id TEXT NOT NULL,
    version INTEGER NOT NULL,
    segment_type TEXT NOT NULL,
    creation_date TEXT NOT NULL,
    last_modified_date TEXT NOT NULL,
    definition TEXT NOT NULL,
    name TEXT,
    tags TEXT NOT NULL,
    import_format TEXT,
    import_url TEXT,
    import_external_id TEXT,
    import_size INTEGER,
    PRIMARY KEY (app_id, id, version)
);
-- Members of IMPORT segments by endpoint key, in key order: the estimate walks one segment's
-- rows and joins each to endpoints through its UNIQUE (app_id, id_key).
CREATE TABLE IF NOT EXISTS segment_members (
    app_id TEXT NOT NULL,
    segment_id TEXT NOT NULL,
    id_key TEXT NOT NULL,
    PRIMARY KEY (app_id, segment_id, id_key)
) WITHOUT ROWID;
"""


class SQLiteStore(SqlStore):
    """Engine storage in one SQLite file (``":memory:"`` for tests).

    One connection writes, for every thread, behind a lock: SQLite has a single writer anyway.
    Reads of a file engine go through a small pool of their own connections (``READERS``), so
    an API read does not queue behind the apply stage's write transactions; in WAL mode each
    read sees the last committed state. A thread that holds the writer's lock reads on the
    writer's connection (as before the pool: a read never nests inside a write). An
    in-memory engine (``":memory:"``, tests) has the one connection for everything.
    """

    def __init__(
        self,
        path: str | Path,
        settings: StoreSettings | None = None,
        *,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
    ) -> None:
        super().__init__(settings)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._holding = threading.local()
        """``depth``: how many times this thread holds ``_lock``."""
        self._readers: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue()
        self._reader_count = 0
        self._readers_lock = threading.Lock()
        """Guards ``_reader_count`` (never the writer's lock: a read must not wait for it)."""
        self._closed = False
        self._unsynced = False
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA busy_timeout = 10000")
        # 64 MiB of page cache (the default is 2 MiB): index pages of a million endpoints stay
        # in memory instead of being read back from the OS on every batch.
        self._conn.execute("PRAGMA cache_size = -65536")
        rebuild = self._migrate()
        self._conn.executescript(
            SCHEMA.replace("{LEDGER}", ledger_schema("TEXT", "INTEGER PRIMARY KEY"))
            + keys_schema("TEXT")
        )
        self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._fill_rollup()
        if rebuild:
            with self._write() as cur:
                self._rebuild_attribute_rows(cur)
        # Cheap statistics so the planner drives attribute filters from the attribute index.
        self._conn.execute("PRAGMA analysis_limit = 1000")
        self._conn.execute("PRAGMA optimize = 0x10002")
        self._optimized_at = 0
        self._checkpointer: _Checkpointer | None = None
        if self.path != ":memory:":
            self._conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}")
            self._conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self._checkpointer = _Checkpointer(self.path, checkpoint_bytes)

    def _migrate(self) -> bool:
        """Bring an engine file written by an earlier version up to ``SCHEMA_VERSION``.

        True when ``endpoint_attributes`` was dropped and must be refilled once the schema exists.
        """
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'endpoint_attributes'"
        ).fetchone()
        history = {r[1] for r in self._conn.execute("PRAGMA table_info(consent_history)")}
        if history and "cause_detail" not in history:
            log.info("engine schema: adding the consent ledger's history columns (version 3)")
            for column in LEDGER_HISTORY_COLUMNS:
                added = column.format(text="TEXT")
                self._conn.execute(f"ALTER TABLE consent_history ADD COLUMN {added}")
        segments = {r[1] for r in self._conn.execute("PRAGMA table_info(segments)")}
        if segments and "import_format" not in segments:
            log.info("engine schema: adding IMPORT segments (version 4)")
            for column in SEGMENT_IMPORT_COLUMNS:
                self._conn.execute(f"ALTER TABLE segments ADD COLUMN {column}")
        if segments and version < 5:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                changed = upgraded_definitions(self._conn.execute(DEFINITION_ROWS).fetchall())
                log.info("engine schema: segment definitions to the stored form (version 5)")
                # Rows already converted are skipped: a run cut short is simply run again.
                self._conn.executemany(DEFINITION_UPDATE, changed)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        if exists and version < 2:
            # Version 1 kept attribute rows without the rollup columns: rebuild them.
            log.info("engine schema: rebuilding endpoint_attributes for version 2")
            self._conn.execute("DROP TABLE endpoint_attributes")
            return True
        return False

    def _fill_rollup(self) -> None:
        """Count endpoints into an empty rollup (an engine file from before it existed)."""
        with self._write() as cur:
            empty = cur.execute("SELECT 1 FROM endpoint_counts LIMIT 1").fetchone() is None
            if empty:
                cur.execute(
                    "INSERT INTO endpoint_counts (app_id, country_code, channel_type, status, "
                    "opt_out, n) SELECT app_id, COALESCE(country_code, ''), channel_type, status, "
                    "opt_out, COUNT(*) FROM endpoints GROUP BY 1, 2, 3, 4, 5"
                )

    @contextmanager
    def _import_session(self) -> Iterator[None]:
        # One import is one transaction that dirties far more pages than the usual 64 MiB cache
        # holds; spilled pages are read back from the -wal file. 256 MiB while it runs: the
        # write pass of 1,000,000 endpoints 16 % faster for about 230 MB more resident memory.
        with self._locked():
            self._conn.execute("PRAGMA cache_size = -262144")
            try:
                yield
            finally:
                self._conn.execute("PRAGMA cache_size = -65536")  # as __init__ sets it

    def _protect_keys(self) -> None:
        # The file now holds API secrets: readable by this user only (-wal and -shm too, which
        # SQLite creates with the database file's mode anyway).
        if self.path == ":memory:":
            return
        for path in (self.path, self.path + "-wal", self.path + "-shm"):
            try:
                os.chmod(path, 0o600)
            except FileNotFoundError:
                continue

    def _after_writes(self) -> None:
        # Refresh statistics after every 50,000 written endpoints (about 10 ms each time).
        if self._written - self._optimized_at >= 50_000:
            self._optimized_at = self._written
            with self._locked():
                self._conn.execute("PRAGMA optimize")

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[Cursor]:
        with self._locked():
            cur = self._conn.cursor()
            if not durable:
                self._unsynced = True  # for ``sync``, whether this commit happens or not
            with without_fsync(cur, skip=not durable):
                cur.execute("BEGIN IMMEDIATE")
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")

    def sync(self) -> None:
        """fsync the -wal file if a commit since the last ``sync`` skipped it.

        Every commit is appended to the -wal file; an fsync of that file, from any descriptor,
        makes all of them durable. Pages that a checkpoint already copied into the database
        file are durable too: in WAL mode SQLite syncs the -wal file before a checkpoint and
        the database file after it, whatever ``synchronous`` says (NORMAL or FULL).
        """
        with self._locked():
            if not self._unsynced or self.path == ":memory:":
                self._unsynced = False
                return
            self._unsynced = False  # a commit during the fsync sets it again
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # no -wal file: the last connection checkpointed everything and removed it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writer's lock, noting that this thread holds it (``_read``)."""
        with self._lock:
            self._holding.depth = getattr(self._holding, "depth", 0) + 1
            try:
                yield
            finally:
                self._holding.depth -= 1

    @contextmanager
    def _read(self) -> Iterator[Cursor]:
        held: int = getattr(self._holding, "depth", 0)
        if self.path == ":memory:" or held:
            with self._locked():
                cur = self._conn.cursor()
                cur.execute("BEGIN")
                try:
                    yield cur
                finally:
                    cur.execute("COMMIT")
            return
        conn = self._reader()
        try:
            cur = conn.cursor()
            cur.execute("BEGIN")
            try:
                yield cur
            finally:
                cur.execute("COMMIT")
        finally:
            if self._closed:
                conn.close()
            else:
                self._readers.put(conn)

    def _reader(self) -> sqlite3.Connection:
        """An idle reader connection, a new one while there are fewer than ``READERS``, or
        the next one given back."""
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            pass
        with self._readers_lock:
            opened = self._reader_count < READERS
            self._reader_count += opened
        if not opened:
            return self._readers.get()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        conn.execute("PRAGMA query_only = 1")
        return conn

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        with self._lock:
            self._closed = True
            self._conn.close()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break


class _Checkpointer:
    """Copies the WAL into the database file from a thread of its own.

    SQLite's own checkpoint runs inside the COMMIT that crosses ``wal_autocheckpoint``, on the
    writer's thread: with about 8 KB of WAL per endpoint change (random index pages), that was
    about 40 % of the engine's time for 1,000-change batches (bench: 5,931 changes/s with it,
    10,172 without any checkpoint). Here a PASSIVE checkpoint, which never waits for readers or
    the writer, runs on its own connection whenever the -wal file passes ``checkpoint_bytes``;
    SQLite releases the GIL meanwhile, so it uses the other core while the writer goes on. The
    writer still checkpoints by itself past ``WRITER_CHECKPOINT_PAGES``, should this thread fall
    behind, and the -wal file starts over (cut back to ``WAL_SIZE_LIMIT``) after a checkpoint
    that copied everything.
    """

    def __init__(self, path: str, checkpoint_bytes: int) -> None:
        self.path = path
        self.wal = path + "-wal"
        self.checkpoint_bytes = checkpoint_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            while not self._stop.wait(CHECKPOINT_POLL):
                try:
                    if os.path.getsize(self.wal) < self.checkpoint_bytes:
                        continue
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except FileNotFoundError:
                    continue  # no -wal file: nothing to copy
                except sqlite3.Error as exc:  # busy with another checkpoint, or the disk
                    log.debug("engine checkpoint skipped path=%s reason=%s", self.path, exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
