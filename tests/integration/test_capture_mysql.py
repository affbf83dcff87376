"""``MySQLSource`` against a private MariaDB: what only the binlog reader has.

The scenarios every source shares (the AWS sample's 9 -> 5 -> 4, snapshots with and without
concurrent writes, SIGKILL during the snapshot and while streaming, ADD COLUMN mid-stream,
address change and delete, the shared types) run on MariaDB too, in
``tests/contract/test_source_contract.py``. Here: DDL read back from the binlog after capture was
down, key changes, MySQL's own types, a restart inside a transaction, binlog purge, grants and
server settings, heartbeats, and ``optsync run`` with the example config.

Every test drives the source into ``EmbeddedStream`` -> ``ApplyWorker`` -> ``SQLiteStore`` (and
its DLQ) in a folder of its own (``pipeline_pieces.Pieces``), and reads the outcome from the
engine. The application is played by autocommit PyMySQL connections (root, through the socket).
Each test uses a database of its own; they share the server's binlog, which every capture reads
from its own snapshot.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from example_run import ExampleRun
from mariadb_server import MariaDBServer
from mariadb_server import mariadb_fixture as _mariadb_fixture  # noqa: F401 (the fixture)
from pipeline_pieces import Pieces

from optsync.capture.base import CaptureBatch
from optsync.capture.mysql.position import GtidPosition
from optsync.capture.mysql.source import (
    MySQLSource,
    PositionLost,
    PreflightFailed,
    default_server_id,
)
from optsync.engine.models import OptOut
from optsync.errors import ConfigError, Retryable
from optsync.events import ChangeEvent, Op
from optsync.formats import dms
from optsync.pipeline import capture
from optsync.stream.embedded import EmbeddedStream

pytestmark = pytest.mark.integration

USER, PASSWORD = "optsync", "secret"
SAMPLE_DDL = (
    "CREATE TABLE optin_status (userid VARCHAR(64), phone VARCHAR(32), optin TINYINT(1), "
    "lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
)
KEYED_DDL = (
    "CREATE TABLE optin_status (id INT AUTO_INCREMENT PRIMARY KEY, userid VARCHAR(64), "
    "phone VARCHAR(32), optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
)
SYNC_TIMEOUT = 30.0
EndpointRow = tuple[str, str, str]


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(mariadb: MariaDBServer) -> MariaDBServer:
    """The session's MariaDB with the capture user of docs/mysql.md."""
    mariadb.execute(
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{USER}'@'%'",
    )
    return mariadb


@pytest.fixture
def db(server: MariaDBServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for the test, dropped afterwards."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    server.execute(f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}")
    yield name
    server.execute(f"DROP DATABASE IF EXISTS {name}")


@pytest.fixture
def pieces(tmp_path: Path) -> Iterator[Pieces]:
    made = Pieces(tmp_path / "data")
    yield made
    made.close()


def url(server: MariaDBServer, db: str, user: str = USER, password: str = PASSWORD) -> str:
    return server.url(user, password, db)


@contextmanager
def app_db(server: MariaDBServer, db: str, **session: str) -> Iterator[Any]:
    """A cursor of the application: autocommit, so every statement is its own transaction."""
    with closing(server.connect(db)) as conn, conn.cursor() as cur:
        for name, value in session.items():
            cur.execute(f"SET SESSION {name} = %s", (value,))
        yield cur


def sample_users(cur: Any, count: int = 9, start: int = 1) -> None:
    """The AWS sample's users: user1 +12341111111 ... user9 +12341111119, all opted in."""
    for n in range(start, start + count):
        cur.execute(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, 1)",
            (f"user{n}", f"+1234111111{n}" if n < 10 else phone(n)),
        )


def phone(n: int) -> str:
    """A distinct possible US number for each ``n`` < 1,000,000."""
    return f"+12345{n:06d}"


def binlog_gtid(server: MariaDBServer) -> GtidPosition:
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@gtid_binlog_pos")
        return GtidPosition.parse(str(cur.fetchone()[0]))


class Capture:
    """A ``MySQLSource`` driven like the pipeline's capture thread, one batch at a time."""

    def __init__(self, source: MySQLSource, pieces: Pieces, server: MariaDBServer) -> None:
        self.source = source
        self.pieces = pieces
        self.server = server
        self.last = pieces.checkpoint(source)
        self.events: list[ChangeEvent] = []
        self.progress: list[tuple[str, int, int | None]] = []
        self.batches: Iterator[CaptureBatch] = iter(())

    def start(self, max_events: int = 1000) -> None:
        self.source.open(self.last)
        self.batches = self.source.batches(max_events, lambda *a: self.progress.append(a))

    def step(self) -> CaptureBatch:
        batch = next(self.batches)
        self.last = self.pieces.capture_step(self.source, batch, self.last)
        self.events.extend(batch.events)
        return batch

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.last)) if self.last else {}

    def synced(self, target: GtidPosition) -> bool:
        state = self.state
        return state.get("phase") == "log" and GtidPosition.parse(state["log"]["gtid"]) == target

    def sync(self, timeout: float = SYNC_TIMEOUT) -> list[ChangeEvent]:
        """Capture up to the server's binlog end, apply everything; the events captured."""
        target = binlog_gtid(self.server)
        first = len(self.events)
        deadline = time.monotonic() + timeout
        while not self.synced(target):
            assert time.monotonic() < deadline, f"capture did not reach {target}: {self.state}"
            self.step()
        self.pieces.apply_all()
        return self.events[first:]

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        self.source.close()


@contextmanager
def capturing(
    server: MariaDBServer,
    db: str,
    pieces: Pieces,
    tables: Sequence[str] = ("optin_status",),
    *,
    max_events: int = 1000,
    **options: Any,
) -> Iterator[Capture]:
    source = MySQLSource(url(server, db), tables, idle_wait=0.05, **options)
    capture = Capture(source, pieces, server)
    capture.start(max_events)
    try:
        yield capture
    finally:
        capture.close()


def engine_rows(pieces: Pieces) -> set[EndpointRow]:
    """Every endpoint of the app as (id, Address, OptOut), read from the engine's file."""
    with closing(sqlite3.connect(pieces.store.path)) as conn:
        rows = conn.execute(
            "SELECT id, address, opt_out FROM endpoints WHERE app_id = ?", (pieces.app_id,)
        ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def source_rows(server: MariaDBServer, db: str) -> set[EndpointRow]:
    """What the engine must hold for the source table: one endpoint per row."""
    with app_db(server, db) as cur:
        cur.execute("SELECT userid, phone, optin FROM optin_status")
        rows = cur.fetchall()
    return {
        (f"{userid}_{phone}", phone, OptOut.ALL.value if int(optin) == 0 else OptOut.NONE.value)
        for userid, phone, optin in rows
    }


def wait_until(condition: Callable[[], bool], what: str, timeout: float = SYNC_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.02)


# -- retries, key changes, schema changes read back later ------------------------------------


def test_capture_retry_closes_and_opens_the_source_again(
    server: MariaDBServer, db: str, tmp_path: Path
) -> None:
    """After a retryable failure the pipeline's ``capture`` closes the source and opens it again
    from the stream's checkpoint. The MySQL source used to refuse the second ``open`` ("already
    open"), or, after a failed ``open``, end its batches at once and capture quietly stopped."""
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
        sample_users(cur)
    source = MySQLSource(url(server, db), ["optin_status"], idle_wait=0.05)
    stream = EmbeddedStream(tmp_path / "stream.db")
    append = stream.append
    injected: list[int] = []

    def append_failing_once(events: Sequence[ChangeEvent], checkpoint: Any = None) -> int:
        if not injected:  # the stream's file busy for a moment, as another process may make it
            injected.append(len(events))
            raise Retryable("stream busy (injected by the test)")
        return append(events, checkpoint)

    stream.append = append_failing_once  # type: ignore[method-assign]
    stop = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            capture(source, stream, stop, lambda: None)
        except BaseException as exc:
            failures.append(exc)

    def ops() -> list[str]:
        records = stream.read("test", 1000, after=0)
        return [dms.decode(r.data).op.value for r in records]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: ops().count("load") == 9 or bool(failures), "the snapshot after a retry")
        with app_db(server, db) as cur:
            cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
        wait_until(lambda: "update" in ops() or bool(failures), "the log after a retry")
        seen = ops()
    finally:
        stop.set()
        thread.join(30)
        stream.close()
    assert failures == []
    assert not thread.is_alive()
    assert injected and injected[0] > 0
    assert seen.count("load") == 9 and seen.count("update") == 1


def test_primary_key_change_is_a_delete_and_an_insert(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    with app_db(server, db) as cur:
        cur.execute(KEYED_DDL)
        sample_users(cur, 2)
    with capturing(server, db, pieces) as capture:
        loads = capture.sync()
        assert [e.key for e in loads] == [{"id": 1}, {"id": 2}]
        with app_db(server, db) as cur:
            cur.execute("UPDATE optin_status SET id = 10, optin = 0 WHERE id = 1")
        delete, insert = capture.sync()
    assert (delete.op, delete.key, insert.op, insert.key) == (
        Op.DELETE,
        {"id": 1},
        Op.INSERT,
        {"id": 10},
    )
    assert delete.position < insert.position
    assert delete.transaction_id == insert.transaction_id
    assert engine_rows(pieces) == source_rows(server, db)


def test_alters_read_back_from_the_binlog_keep_each_row_s_columns(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    """Rows written before each ALTER are read after all of them: none is mislabelled (the
    binlog keeps no history of a table's columns; ADD COLUMN while capture runs is in the
    contract suite)."""
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
        sample_users(cur)
    with capturing(server, db, pieces) as capture:
        capture.sync()
    with app_db(server, db) as cur:  # capture is stopped: all of this waits in the binlog
        cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
        cur.execute("ALTER TABLE optin_status ADD COLUMN plan VARCHAR(10) DEFAULT 'gold' FIRST")
        cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user2'")
        cur.execute("ALTER TABLE optin_status DROP COLUMN lastupdate")
        cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user3'")
        cur.execute("ALTER TABLE optin_status MODIFY COLUMN optin VARCHAR(3)")
        cur.execute("UPDATE optin_status SET optin = '0' WHERE userid = 'user4'")
        cur.execute("ALTER TABLE optin_status CHANGE COLUMN phone phone VARCHAR(40) AFTER plan")
        cur.execute(
            "INSERT INTO optin_status (plan, phone, userid, optin) VALUES ('x', %s, 'u10', '1')",
            (phone(10),),
        )
    with capturing(server, db, pieces) as capture:
        events = capture.sync()
    after = [e.after or {} for e in events]
    assert [list(row) for row in after] == [
        ["userid", "phone", "optin", "lastupdate"],
        ["plan", "userid", "phone", "optin", "lastupdate"],
        ["plan", "userid", "phone", "optin"],
        ["plan", "userid", "phone", "optin"],
        ["plan", "phone", "userid", "optin"],
    ]
    assert [(row["userid"], row["optin"]) for row in after] == [
        ("user1", 0),
        ("user2", 0),
        ("user3", 0),
        ("user4", "0"),
        ("u10", "1"),
    ]
    assert after[1]["plan"] == "gold"
    assert after[2]["phone"] == "+12341111113"
    assert after[4]["phone"] == phone(10)
    assert pieces.estimate() == (10, 6)
    assert engine_rows(pieces) == source_rows(server, db)


# -- types -----------------------------------------------------------------------------------

TYPES_DDL = """
CREATE TABLE types (
    id INT PRIMARY KEY, ti TINYINT(1), tu TINYINT UNSIGNED, si SMALLINT, bi BIGINT UNSIGNED,
    f FLOAT, d DOUBLE, dec1 DECIMAL(12,2), dec2 DECIMAL(65,30), dneg DECIMAL(10,4),
    ts TIMESTAMP(3) NULL, ts0 TIMESTAMP NULL, dt DATETIME(6), dt0 DATETIME, da DATE, da0 DATE,
    tm TIME(3), y YEAR, y0 YEAR, e ENUM('a','b','c'), st SET('x','y','z'), st0 SET('x','y'),
    j JSON, b VARBINARY(10), bn BINARY(4), bl BLOB, tx TEXT, lat VARCHAR(10) CHARACTER SET latin1,
    bt BIT(10), ch CHAR(5), nul INT
) DEFAULT CHARSET = utf8mb4
"""
TYPES_INSERT = """
INSERT INTO types VALUES (%s, 1, 255, -32768, 18446744073709551615, 1.1, 0.30000000000000004,
    1.50, 12345678901234567890123456789012345.123456789012345678901234567890, -0.0001,
    '2024-03-31 03:30:00.123', '0000-00-00 00:00:00', '2024-01-02 03:04:05.000006',
    '0000-00-00 00:00:00', '1999-12-31', '0000-00-00', '-838:59:59.500', 2024, 0, 'b', 'z,x', '',
    '{"b": 1, "a": [1.10, 2]}', 0x00FF, 0x41, 0x0102, 'héllo ☃', 'café', b'1010000001', 'ab', NULL)
"""
TYPES_EXPECTED: dict[str, Any] = {
    "ti": 1,
    "tu": 255,
    "si": -32768,
    "bi": 18446744073709551615,
    "f": 1.1,
    "d": 0.30000000000000004,
    "dec1": "1.50",
    "dec2": "12345678901234567890123456789012345.123456789012345678901234567890",
    "dneg": "-0.0001",
    "ts": "2024-03-31T01:30:00.123Z",  # written at +02:00
    "ts0": "0000-00-00T00:00:00",
    "dt": "2024-01-02T03:04:05.000006",
    "dt0": "0000-00-00T00:00:00",
    "da": "1999-12-31",
    "da0": "0000-00-00",
    "tm": "-838:59:59.500",
    "y": 2024,
    "y0": 0,
    "e": "b",
    "st": "x,z",
    "st0": "",
    "j": '{"b": 1, "a": [1.10, 2]}',
    "b": "00FF",
    "bn": "41000000",
    "bl": "0102",
    "tx": "héllo ☃",
    "lat": "café",
    "bt": 641,
    "ch": "ab",
    "nul": None,
}


def test_mysql_types_round_trip_the_same_from_snapshot_and_binlog(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    """MySQL's own types: zero dates, YEAR, ENUM, SET, BIT, unsigned, binary, charsets, and a
    TIMESTAMP written in two session time zones (the contract suite has the shared ones)."""
    session = {"time_zone": "+02:00", "sql_mode": ""}
    with app_db(server, db, **session) as cur:
        cur.execute(TYPES_DDL)
        cur.execute(TYPES_INSERT, (1,))
    with capturing(server, db, pieces, ["types"]) as capture:
        (load,) = capture.sync()
        with app_db(server, db, **session) as cur:
            cur.execute(TYPES_INSERT, (2,))
            cur.execute(
                "UPDATE types SET "
                + ", ".join(f"{c} = NULL" for c in TYPES_EXPECTED)
                + " WHERE id = 2"
            )
        with app_db(server, db, time_zone="-05:00") as cur:
            cur.execute("UPDATE types SET ts = '2024-10-26 19:30:00' WHERE id = 1")
        insert, nulls, west = capture.sync()
    assert load.after is not None and insert.after is not None
    assert {k: v for k, v in load.after.items() if k != "id"} == TYPES_EXPECTED
    assert {k: v for k, v in insert.after.items() if k != "id"} == TYPES_EXPECTED
    assert nulls.before == insert.after
    assert nulls.after == {"id": 2, **dict.fromkeys(TYPES_EXPECTED)}
    # TIMESTAMP is an instant: the writer's session time zone does not show.
    assert west.after is not None and west.after["ts"] == "2024-10-27T00:30:00.000Z"
    for event in (load, insert, nulls, west):
        for value in [*(event.after or {}).values(), *(event.before or {}).values()]:
            assert value is None or isinstance(value, str | int | float), value
        again = dms.decode(dms.encode(event))  # the stream's format carries every value
        assert (again.after, again.before, again.position) == (
            event.after,
            event.before,
            event.position,
        )


# -- a restart inside a transaction ----------------------------------------------------------


def test_resume_inside_a_transaction_reads_it_again_without_duplicates(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    with app_db(server, db) as cur:
        cur.execute(KEYED_DDL)
    with capturing(server, db, pieces, max_events=10) as capture:
        capture.sync()
        before = capture.state["log"]
        with app_db(server, db) as cur:
            cur.execute("BEGIN")
            sample_users(cur, 45)
            cur.execute("COMMIT")
        batch = capture.step()
        while not batch.events:
            batch = capture.step()
        assert 10 <= len(batch.events) < 45  # the batch ends inside the transaction
        assert capture.state["log"] == before  # ... so its state points before it
        head = pieces.stream.stats().head
    with capturing(server, db, pieces, max_events=1000) as capture:
        again = capture.sync()
    assert [e.position for e in again[: len(batch.events)]] == [e.position for e in batch.events]
    assert pieces.stream.stats().head == head + 45 - len(batch.events)  # stored once each
    assert pieces.estimate() == (45, 45)


# -- loud failures ---------------------------------------------------------------------------


def test_binlog_purged_past_the_checkpoint_is_a_named_error(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
        sample_users(cur)
    with capturing(server, db, pieces) as capture:
        capture.sync()
        saved = capture.state["log"]["gtid"]
    with app_db(server, db) as cur:  # capture is down; these changes are then purged
        cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
        cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user2'")
    purge_all_but_a_new_binlog(server)

    source = MySQLSource(url(server, db), ["optin_status"])
    with pytest.raises(PositionLost) as failure:
        source.open(pieces.checkpoint(source))
    message = str(failure.value)
    _, server_id, seq = (int(p) for p in saved.split("-"))
    assert f"0-{server_id}-{seq + 1} .. 0-{server_id}-{seq + 2}" in message  # the missing range
    assert "optsync capture --resnapshot" in message
    assert "optsync capture --start-position" in message
    assert saved in message
    source.close()

    # One way out: accept the gap and read on from the position the message names.
    start = message.rsplit("--start-position ", 1)[1].rstrip("`")
    source = MySQLSource(url(server, db), ["optin_status"], idle_wait=0.05)
    capture = Capture(source, pieces, server)
    capture.last = source.state_at(start)
    capture.start()
    try:
        assert capture.sync() == []  # the purged opt-outs are lost, as the error said
        with app_db(server, db) as cur:
            cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user3'")
        (update,) = capture.sync()
        assert update.after is not None and update.after["userid"] == "user3"
    finally:
        capture.close()
    assert pieces.estimate() == (9, 8)

    # The other: a re-snapshot reloads every row, with positions that win.
    source = MySQLSource(url(server, db), ["optin_status"], idle_wait=0.05)
    capture = Capture(source, pieces, server)
    capture.last = source.resnapshot_state()
    capture.start()
    try:
        loads = capture.sync()
    finally:
        capture.close()
    assert [e.op for e in loads] == [Op.LOAD] * 9
    assert pieces.estimate() == (9, 6)
    assert engine_rows(pieces) == source_rows(server, db)


def purge_all_but_a_new_binlog(server: MariaDBServer) -> None:
    """FLUSH BINARY LOGS, then PURGE BINARY LOGS TO the new file (retried: MariaDB keeps a file
    until InnoDB has made its transactions durable)."""
    with closing(server.connect()) as conn, conn.cursor() as cur:
        cur.execute("FLUSH BINARY LOGS")
        cur.execute("SHOW BINARY LOGS")
        newest = cur.fetchall()[-1][0]
        deadline = time.monotonic() + 20
        while True:
            cur.execute(f"PURGE BINARY LOGS TO '{newest}'")
            cur.execute("SHOW BINARY LOGS")
            if cur.fetchall()[0][0] == newest:
                return
            assert time.monotonic() < deadline, "the server kept its old binlog files"
            cur.execute("FLUSH ENGINE LOGS")
            time.sleep(0.2)


def test_missing_replication_grant_is_a_named_error(server: MariaDBServer, db: str) -> None:
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
    server.execute(
        "CREATE USER IF NOT EXISTS 'reader'@'%' IDENTIFIED BY 'pw'",
        "GRANT SELECT, REPLICATION CLIENT ON *.* TO 'reader'@'%'",
    )
    try:
        source = MySQLSource(url(server, db, "reader", "pw"), ["optin_status"])
        with pytest.raises(PreflightFailed) as failure:
            source.open(None)
        message = str(failure.value)
        assert "REPLICATION SLAVE" in message
        assert (
            "GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'reader'@'%'" in message
        )

        server.execute(
            "REVOKE SELECT ON *.* FROM 'reader'@'%'",
            "GRANT REPLICATION SLAVE ON *.* TO 'reader'@'%'",
        )
        with pytest.raises(PreflightFailed, match="SELECT"):
            MySQLSource(url(server, db, "reader", "pw"), ["optin_status"]).open(None)
    finally:
        server.execute("DROP USER IF EXISTS 'reader'@'%'")


def test_server_settings_are_checked_before_anything_is_read(
    server: MariaDBServer, db: str
) -> None:
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
    server.execute("SET GLOBAL binlog_row_image = 'MINIMAL'", "SET GLOBAL binlog_format = 'MIXED'")
    try:
        with pytest.raises(PreflightFailed) as failure:
            MySQLSource(url(server, db), ["optin_status"]).open(None)
    finally:
        server.execute("SET GLOBAL binlog_row_image = 'FULL'", "SET GLOBAL binlog_format = 'ROW'")
    message = str(failure.value)
    assert "binlog_format = ROW" in message
    assert "binlog_row_image = FULL" in message


def test_configuration_errors_name_the_fix(server: MariaDBServer, db: str) -> None:
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
        cur.execute("CREATE TABLE legacy (id INT PRIMARY KEY) ENGINE = MyISAM")
        cur.execute("CREATE VIEW opted_in AS SELECT * FROM optin_status WHERE optin = 1")
    with pytest.raises(ConfigError, match="does not exist"):
        MySQLSource(url(server, db), ["nope"]).open(None)
    with pytest.raises(ConfigError, match="ENGINE=InnoDB"):
        MySQLSource(url(server, db), ["legacy"]).open(None)
    with pytest.raises(ConfigError, match="view"):
        MySQLSource(url(server, db), ["opted_in"]).open(None)
    with pytest.raises(ConfigError, match="access denied"):
        MySQLSource(url(server, db, password="wrong"), ["optin_status"]).open(None)
    with pytest.raises(ConfigError, match="mysql:// or mariadb://"):
        MySQLSource("postgres://u@h/db", ["t"])
    with pytest.raises(ConfigError, match="names no database"):
        MySQLSource(f"mysql://u:p@127.0.0.1:{server.port}", ["optin_status"])
    assert MySQLSource(url(server, db), ["t"]).server_id == default_server_id("mysql")
    assert "secret" not in repr(MySQLSource(url(server, db), ["t"]).url)


# -- lag -------------------------------------------------------------------------------------


def test_heartbeats_keep_the_reported_lag_low_on_an_idle_table(
    server: MariaDBServer, db: str, pieces: Pieces
) -> None:
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
        sample_users(cur, 1)
        cur.execute("CREATE TABLE other (id INT PRIMARY KEY)")
    with capturing(server, db, pieces) as capture:
        capture.sync()
        with app_db(server, db) as cur:  # a busy neighbour moves the position, not the table
            cur.execute("INSERT INTO other VALUES (1)")
        assert capture.sync() == []
        # From here the server is idle: only a heartbeat can move source_time past this instant
        # (binlog times are whole seconds, so the last commit reads as at or before it). The
        # deadline is generous for a busy machine: this checks that heartbeats move it at all.
        idle_since = time.time()
        deadline = time.monotonic() + 30
        while True:
            capture.step()
            seen = iso_seconds(capture.state["source_time"])
            if seen > idle_since:
                break
            lag = time.time() - seen
            assert time.monotonic() < deadline, f"reported lag stuck at {lag:.1f} s"


def iso_seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# -- optsync run --config examples/mariadb.toml ------------------------------------------------


def test_optsync_run_with_the_mariadb_example_config(
    server: MariaDBServer, db: str, tmp_path: Path
) -> None:
    """The example file, run as users run it: capture in its own process (which starts the
    binlog reader process), the API answering boto3."""
    with app_db(server, db) as cur:
        cur.execute(SAMPLE_DDL)
    example = "mariadb://optsync:secret@127.0.0.1:3306/blog_db"
    with ExampleRun("mariadb.toml", example, url(server, db), tmp_path) as run:
        with app_db(server, db) as cur:
            sample_users(cur)
        run.wait_for_eligible(9)
        with app_db(server, db) as cur:
            for n in range(1, 5):
                cur.execute(f"UPDATE optin_status SET optin = 0 WHERE userid = 'user{n}'")
        run.wait_for_eligible(5)
        with app_db(server, db) as cur:
            cur.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user5'")
        run.wait_for_eligible(4)
    assert "secret@" not in run.output()  # the source password is redacted in the banner
