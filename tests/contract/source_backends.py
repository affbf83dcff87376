"""The ``source_db`` fixture: a fresh application database per backend that capture reads.

The ``ChangeSource`` contract suite (``test_source_contract.py``) writes each scenario once and
runs it on every entry of ``SOURCE_KINDS``: MariaDB (the session's private ``mariadb`` server),
PostgreSQL (the private server of ``postgres_databases``, which the store contract shares) and
SQLite (a file in the test's folder). A ``SourceDatabase`` plays the application: it creates the
tables in its own dialect (``Dialect``: the few statements that differ), runs the application's
statements (written with ``%s`` parameters; SQLite gets ``?``), opens the source on the database
(``source_driver.make_source``, as the SIGKILLed driver does) and says when capture has read
everything written so far (``mark`` then ``reached``).

The application's writes each commit on their own, as a real application's would; PostgreSQL's
session also notes the WAL insert position inside each transaction, which is below that
transaction's commit, so ``reached`` knows when the log has read past it.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from mariadb_server import MariaDBServer
from postgres_server import PostgresServer

# The pipeline pieces and the driver live with the integration tests, which use them too.
sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))

from pipeline_pieces import Pieces
from source_driver import KINDS, make_source

from optsync.capture.base import CaptureBatch, ChangeSource
from optsync.capture.mysql.position import GtidPosition
from optsync.capture.postgres.position import parse_lsn
from optsync.capture.sqlite.source import CHANGE_TABLE
from optsync.events import ChangeEvent
from optsync.sample import SAMPLE_DDL as SQLITE_SAMPLE_DDL

__all__ = (
    "SOURCE_KINDS",
    "Capture",
    "Dialect",
    "Pieces",
    "Session",
    "SourceDatabase",
    "source_db",
)

SOURCE_KINDS = KINDS
SYNC_TIMEOUT = 60.0
MYSQL_USER, MYSQL_PASSWORD = "optsync", "secret"


@dataclass(frozen=True)
class Dialect:
    """The statements that differ between the backends; everything else is shared SQL."""

    sample: tuple[str, ...]
    """``optin_status(userid, phone, optin, lastupdate)`` without a key, as in the AWS sample."""
    keyed: tuple[str, ...]
    """The same table with a generated ``id`` primary key in front."""
    types: tuple[str, ...]
    """``types(id, i, t, n, ts, tz, b, nul)``: bigint, text, decimal(12,2), a timestamp without
    and one with time zone, boolean (or what stands for it), and an int left NULL."""
    types_row: str
    """``INSERT INTO types VALUES ({id}, ...)`` with the same values in each dialect."""
    analyze: str
    """Refreshes the table statistics the snapshot's row estimate comes from."""


MYSQL = Dialect(
    sample=(
        "CREATE TABLE optin_status (userid VARCHAR(64), phone VARCHAR(32), optin TINYINT(1), "
        "lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
    ),
    keyed=(
        "CREATE TABLE optin_status (id INT AUTO_INCREMENT PRIMARY KEY, userid VARCHAR(64), "
        "phone VARCHAR(32), optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
    ),
    types=(
        "CREATE TABLE types (id INT PRIMARY KEY, i BIGINT, t TEXT, n DECIMAL(12,2), "
        "ts DATETIME, tz TIMESTAMP NULL, b TINYINT(1), nul INT) DEFAULT CHARSET = utf8mb4",
    ),
    types_row=(
        "INSERT INTO types VALUES ({id}, -9007199254740993, 'héllo ☃ \"q\"', 1234.50, "
        "'2024-01-02 03:04:05', '2024-03-31 01:30:00', 1, NULL)"  # sessions run at +00:00
    ),
    analyze="ANALYZE TABLE optin_status",
)
POSTGRES = Dialect(
    sample=(
        "CREATE TABLE optin_status (userid text, phone text, optin int, "
        "lastupdate timestamptz DEFAULT now())",
        # Whole before images: an address change or a delete names the old endpoint.
        "ALTER TABLE optin_status REPLICA IDENTITY FULL",
    ),
    keyed=(
        "CREATE TABLE optin_status (id serial PRIMARY KEY, userid text, phone text, optin int, "
        "lastupdate timestamptz DEFAULT now())",
        "ALTER TABLE optin_status REPLICA IDENTITY FULL",
    ),
    types=(
        "CREATE TABLE types (id int PRIMARY KEY, i bigint, t text, n numeric(12,2), "
        "ts timestamp, tz timestamptz, b boolean, nul int)",
        "ALTER TABLE types REPLICA IDENTITY FULL",
    ),
    types_row=(
        "INSERT INTO types VALUES ({id}, -9007199254740993, 'héllo ☃ \"q\"', 1234.50, "
        "'2024-01-02 03:04:05', '2024-03-31 01:30:00+00', true, NULL)"
    ),
    analyze="ANALYZE optin_status",
)
SQLITE = Dialect(
    sample=(SQLITE_SAMPLE_DDL,),
    keyed=(
        "CREATE TABLE optin_status (id INTEGER PRIMARY KEY, userid TEXT, phone TEXT, "
        "optin INTEGER, lastupdate TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
    ),
    types=(
        "CREATE TABLE types (id INTEGER PRIMARY KEY, i INTEGER, t TEXT, n DECIMAL(12,2), "
        "ts TIMESTAMP, tz TIMESTAMP, b BOOLEAN, nul INTEGER)",
    ),
    types_row=(
        "INSERT INTO types VALUES ({id}, -9007199254740993, 'héllo ☃ \"q\"', 1234.50, "
        "'2024-01-02 03:04:05', '2024-03-31T01:30:00Z', 1, NULL)"
    ),
    analyze="ANALYZE",
)


class Session(ABC):
    """A connection of the application: every ``execute`` commits on its own."""

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> None: ...

    @abstractmethod
    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``sql`` once per row, all in one transaction."""


class SourceDatabase(ABC):
    """One fresh database of a backend, the application's writes to it, and capture on it."""

    kind: str
    dialect: Dialect
    schema: str
    """The schema events name (the MySQL database, ``public``, ``main``)."""
    target: str
    """What the source is given: its URL, or the SQLite file."""

    def table(self, name: str) -> str:
        """The table as the snapshot's progress names it."""
        return f"{self.schema}.{name}"

    @abstractmethod
    def session(self) -> Any:
        """A context manager giving a ``Session``."""

    def run(self, *statements: str) -> None:
        """Each statement in its own transaction."""
        with self.session() as app:
            for statement in statements:
                app.execute(statement)

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """``sql`` once per row, in one transaction (a bulk load before capture starts)."""
        with self.session() as app:
            app.execute_many(sql, rows)

    @abstractmethod
    def rows(self, sql: str) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    def mark(self) -> Any:
        """Where the source's log ends now, for ``reached``."""

    @abstractmethod
    def reached(self, state: Mapping[str, Any], mark: Any) -> bool:
        """Whether a capture state in the log phase has read everything up to ``mark``."""

    def source(self, tables: Sequence[str] = ("optin_status",), **options: Any) -> ChangeSource:
        return make_source(self.kind, self.target, tables, **options)

    @abstractmethod
    def close(self) -> None:
        """Drop what the database left behind."""


# -- MariaDB ---------------------------------------------------------------------------------


class _MySQLSession(Session):
    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.cursor.execute(sql, tuple(params) or None)

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.cursor.execute("BEGIN")
        self.cursor.executemany(sql, rows)
        self.cursor.execute("COMMIT")


class MySQLDatabase(SourceDatabase):
    kind, dialect = "mysql", MYSQL

    def __init__(self, server: MariaDBServer, name: str) -> None:
        self.server = server
        self.schema = name
        server.execute(
            f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'%' IDENTIFIED BY '{MYSQL_PASSWORD}'",
            f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{MYSQL_USER}'@'%'",
            f"DROP DATABASE IF EXISTS {name}",
            f"CREATE DATABASE {name}",
        )
        self.target = server.url(MYSQL_USER, MYSQL_PASSWORD, name)

    @contextmanager
    def session(self) -> Iterator[_MySQLSession]:
        with closing(self.server.connect(self.schema)) as conn, conn.cursor() as cur:
            cur.execute("SET SESSION time_zone = '+00:00'")
            yield _MySQLSession(cur)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.session() as app:
            app.cursor.execute(sql)
            return list(app.cursor.fetchall())

    def mark(self) -> GtidPosition:
        with closing(self.server.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT @@gtid_binlog_pos")
            return GtidPosition.parse(str(cur.fetchone()[0]))

    def reached(self, state: Mapping[str, Any], mark: Any) -> bool:
        return bool(
            state.get("phase") == "log" and GtidPosition.parse(state["log"]["gtid"]) == mark
        )

    def close(self) -> None:
        self.server.execute(f"DROP DATABASE IF EXISTS {self.schema}")


# -- PostgreSQL ------------------------------------------------------------------------------


class _PostgresSession(Session):
    def __init__(self, conn: Any, database: PostgresDatabase) -> None:
        self.conn = conn
        self.database = database

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql, tuple(params) or None)
            cur.execute("SELECT pg_current_wal_insert_lsn()")  # below this commit
            self.database.wrote(parse_lsn(cur.fetchone()[0]))
        self.conn.commit()

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)
        self.execute("SELECT 1")


class PostgresDatabase(SourceDatabase):
    kind, dialect, schema = "postgres", POSTGRES, "public"

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.target = server.create_database(name)
        self._written = 0
        self._lock = threading.Lock()

    def wrote(self, lsn: int) -> None:
        with self._lock:
            self._written = max(self._written, lsn)

    @contextmanager
    def session(self) -> Iterator[_PostgresSession]:
        with closing(psycopg2.connect(self.target)) as conn:
            yield _PostgresSession(conn, self)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with closing(psycopg2.connect(self.target)) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def mark(self) -> int:
        with self._lock:
            return self._written

    def reached(self, state: Mapping[str, Any], mark: Any) -> bool:
        return bool(state.get("phase") == "log" and parse_lsn(state["log_after"]) >= mark)

    def close(self) -> None:
        """Wait for the slot to be let go, drop it, then the database."""
        server, name = self.server, self.name
        for _ in range(50):
            held = server.sql(
                "SELECT active FROM pg_replication_slots WHERE database = %s", (name,)
            )
            if not any(active for (active,) in held):
                break
            time.sleep(0.1)
        server.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s AND NOT active",
            (name,),
        )
        server.drop_database(name)


# -- SQLite ----------------------------------------------------------------------------------


class _SQLiteSession(Session):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.conn.execute(sql.replace("%s", "?"), tuple(params))

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn:  # one transaction
            self.conn.execute("BEGIN")
            self.conn.executemany(sql.replace("%s", "?"), rows)


class SQLiteDatabase(SourceDatabase):
    kind, dialect, schema = "sqlite", SQLITE, "main"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.target = str(path)

    def table(self, name: str) -> str:
        return name  # SQLite's progress names the table alone

    @contextmanager
    def session(self) -> Iterator[_SQLiteSession]:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        with closing(conn):
            yield _SQLiteSession(conn)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.session() as app:
            return list(app.conn.execute(sql).fetchall())

    def mark(self) -> int:
        """The last change number the triggers handed out (0 before capture installed them)."""
        with self.session() as app:
            if not app.conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
            ).fetchone():
                return 0
            row = app.conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = ?", (CHANGE_TABLE,)
            ).fetchone()
        return int(row[0]) if row else 0

    def reached(self, state: Mapping[str, Any], mark: Any) -> bool:
        return bool(state.get("phase") == "log" and int(state["log_after"]) >= mark)

    def close(self) -> None:
        """Nothing to drop: the file goes with the test's folder."""


_numbers = itertools.count()


@pytest.fixture(params=SOURCE_KINDS)
def source_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SourceDatabase]:
    """An empty database of the parametrized backend; dropped after the test."""
    kind = request.param
    name = f"src_{next(_numbers)}"
    database: SourceDatabase
    if kind == "mysql":
        database = MySQLDatabase(request.getfixturevalue("mariadb"), name)
    elif kind == "postgres":
        database = PostgresDatabase(request.getfixturevalue("postgres_databases").server, name)
    else:
        database = SQLiteDatabase(tmp_path / "app.db")
    try:
        yield database
    finally:
        database.close()


# -- capture, driven as the pipeline's capture thread drives it ------------------------------


class Capture:
    """A source driven batch by batch into the pipeline pieces, as ``optsync run`` does."""

    def __init__(self, db: SourceDatabase, pieces: Pieces, source: ChangeSource) -> None:
        self.db = db
        self.pieces = pieces
        self.source = source
        self.last = pieces.checkpoint(source)
        self.events: list[ChangeEvent] = []
        self.progress: list[tuple[str, int, int | None]] = []
        self._batches: Iterator[CaptureBatch] = iter(())

    def start(self, max_events: int = 1000) -> None:
        self.source.open(self.last)
        self._batches = self.source.batches(max_events, lambda *a: self.progress.append(a))

    def step(self) -> CaptureBatch:
        batch = next(self._batches)
        self.last = self.pieces.capture_step(self.source, batch, self.last)
        self.events.extend(batch.events)
        return batch

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.last)) if self.last else {}

    def sync(self, timeout: float = SYNC_TIMEOUT) -> list[ChangeEvent]:
        """Capture everything written so far, then apply it all; the events captured."""
        mark = self.db.mark()
        first = len(self.events)
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"capture did not reach {mark}: {self.state}"
            batch = self.step()
            if not batch.events and self.db.reached(self.state, mark):
                break
        self.pieces.apply_all()
        return self.events[first:]

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
        self.source.close()


@contextmanager
def capturing(
    db: SourceDatabase,
    pieces: Pieces,
    tables: Sequence[str] = ("optin_status",),
    *,
    max_events: int = 1000,
    **options: Any,
) -> Iterator[Capture]:
    """Capture of ``tables`` into ``pieces``, from their checkpoint; closed on exit."""
    capture = Capture(db, pieces, db.source(tables, **options))
    capture.start(max_events)
    try:
        yield capture
    finally:
        capture.close()
