"""The ``ChangeSource`` contract: every scenario runs on MariaDB, PostgreSQL and SQLite.

Each test plays the application on a fresh database of the backend (``source_backends``), drives
the real source into the real pipeline pieces (``EmbeddedStream`` -> ``ApplyWorker`` ->
``SQLiteStore`` and its DLQ, ``pipeline_pieces.Pieces``) and reads the outcome from the engine.
Restarts are real: ``source_driver.py`` runs capture and apply in a process that the test
SIGKILLs, on all three backends (SQLite too: its triggers keep writing while capture is down).

Where a source truly behaves differently the test says so with a per-backend expectation (the
constants below, each with its reason), never a skip. What only one source has (binlog purge,
GTIDs, replica identity, TOAST, slots, grants, triggers, WAL, VACUUM) stays in
``tests/integration/test_capture_<source>.py``.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
from mariadb_server import mariadb_fixture
from source_backends import (
    SYNC_TIMEOUT,
    Pieces,
    SourceDatabase,
    capturing,
    source_db,
)

from optsync.engine.models import OptOut
from optsync.errors import NotFound
from optsync.events import Op
from optsync.formats import dms

__all__ = ("mariadb_fixture", "source_db")  # registers the fixtures ``mariadb``, ``source_db``

pytestmark = pytest.mark.integration

DRIVER = Path(__file__).parents[1] / "integration" / "source_driver.py"
INSERT = "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, %s)"
EndpointRow = tuple[str, str, str]

SNAPSHOT_RESUMES_WITHOUT_A_KEY = {"mysql": True, "postgres": True, "sqlite": False}
"""After a restart in the middle of a snapshot, whether a table without a primary key is loaded
on from the saved cursor. SQLite starts such a table over: its rowids are no key, VACUUM may
renumber them between the runs (test_capture_sqlite covers that)."""

NEW_COLUMNS_BEFORE_REOPEN = {"mysql": True, "postgres": True, "sqlite": False}
"""Whether a column added mid-stream shows in the very next change. The binlog's table map and
pgoutput's relation message carry the new columns; SQLite's triggers copy the columns they were
made with, until ``open`` makes them again."""

TRANSACTION_ID = {"mysql": r"0-1-\d+", "postgres": r"\d+", "sqlite": None}
"""What an event's ``transaction_id`` looks like: a GTID, PostgreSQL's xid, or none (SQLite's
change table does not record which transaction wrote a change)."""

TYPES_EXPECTED: dict[str, dict[str, Any]] = {
    "mysql": {
        "i": -9007199254740993,
        "t": 'héllo ☃ "q"',
        "n": "1234.50",
        "ts": "2024-01-02T03:04:05",
        "tz": "2024-03-31T01:30:00Z",
        "b": 1,  # TINYINT(1)
        "nul": None,
    },
    "postgres": {
        "i": -9007199254740993,
        "t": 'héllo ☃ "q"',
        "n": "1234.50",
        "ts": "2024-01-02T03:04:05",
        "tz": "2024-03-31T01:30:00Z",
        "b": True,
        "nul": None,
    },
    "sqlite": {
        "i": -9007199254740993,
        "t": 'héllo ☃ "q"',
        "n": 1234.5,  # DECIMAL has NUMERIC affinity: SQLite stores 1234.50 as a REAL
        "ts": "2024-01-02 03:04:05",  # no date type: the text as the application wrote it
        "tz": "2024-03-31T01:30:00Z",
        "b": 1,  # BOOLEAN is an integer
        "nul": None,
    },
}
"""The same row as each source reads it, from its snapshot and from its log alike."""


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def pieces(tmp_path: Path) -> Iterator[Pieces]:
    made = Pieces(tmp_path / "data")
    yield made
    made.close()


@contextmanager
def closing_pieces(folder: Path) -> Iterator[Pieces]:
    pieces = Pieces(folder)
    try:
        yield pieces
    finally:
        pieces.close()


def phone(n: int) -> str:
    """A distinct possible US number for each ``n`` < 1,000,000."""
    return f"+12345{n:06d}"


def sample_users(db: SourceDatabase, count: int = 9) -> None:
    """The AWS sample's INSERTs: user1 +12341111111 ... user9 +12341111119, all opted in."""
    with db.session() as app:
        for n in range(1, count + 1):
            app.execute(INSERT, (f"user{n}", f"+1234111111{n}", 1))


def many_users(db: SourceDatabase, rows: int) -> None:
    db.run_many(INSERT, [(f"user{n}", phone(n), 1) for n in range(rows)])


def engine_rows(pieces: Pieces) -> set[EndpointRow]:
    """Every endpoint of the app as (id, Address, OptOut), read from the engine's file."""
    with closing(sqlite3.connect(pieces.store.path)) as conn:
        rows = conn.execute(
            "SELECT id, address, opt_out FROM endpoints WHERE app_id = ?", (pieces.app_id,)
        ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def source_rows(db: SourceDatabase) -> set[EndpointRow]:
    """What the engine must hold for the source table: one endpoint per row."""
    return {
        (f"{userid}_{phone}", phone, OptOut.ALL.value if int(optin) == 0 else OptOut.NONE.value)
        for userid, phone, optin in db.rows("SELECT userid, phone, optin FROM optin_status")
    }


def assert_converged(db: SourceDatabase, pieces: Pieces) -> None:
    expected, actual = source_rows(db), engine_rows(pieces)
    assert actual - expected == set(), f"stale or extra endpoints: {sorted(actual - expected)[:5]}"
    assert expected - actual == set(), f"lost endpoints: {sorted(expected - actual)[:5]}"
    assert pieces.dlq.count() == 0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = SYNC_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.05)


class Writer:
    """The application writing on its own: opt-outs and opt-ins, number changes, deletes and
    new users, one commit each, until ``stop``."""

    def __init__(self, db: SourceDatabase, rows: int, seed: int, pause: float = 0.001) -> None:
        self.db = db
        self.pause = pause
        self.rng = random.Random(seed)
        self.users = list(range(rows))
        self.next_user = rows
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        assert not self.errors, self.errors

    def _run(self) -> None:
        rng = self.rng
        try:
            with self.db.session() as app:
                while not self._stop.is_set():
                    pick, n = rng.random(), rng.choice(self.users)
                    if pick < 0.5:
                        app.execute(
                            "UPDATE optin_status SET optin = 1 - optin WHERE userid = %s",
                            (f"user{n}",),
                        )
                    elif pick < 0.65:
                        app.execute(
                            "UPDATE optin_status SET phone = %s WHERE userid = %s",
                            (phone(self.next_user), f"user{n}"),
                        )
                        self.next_user += 1
                    elif pick < 0.8:
                        app.execute("DELETE FROM optin_status WHERE userid = %s", (f"user{n}",))
                        self.users.remove(n)
                    else:
                        user = self.next_user
                        app.execute(INSERT, (f"user{user}", phone(user), rng.randint(0, 1)))
                        self.users.append(user)
                        self.next_user += 1
                    self.done += 1
                    time.sleep(self.pause)
        except BaseException as exc:
            self.errors.append(exc)


# -- (1) the AWS sample, end to end ----------------------------------------------------------


def test_aws_sample_statements_give_9_5_4_eligible(
    source_db: SourceDatabase, pieces: Pieces
) -> None:
    db = source_db
    db.run(*db.dialect.sample)
    with capturing(db, pieces) as capture:
        assert capture.sync() == []  # an empty table: a snapshot of nothing
        sample_users(db)  # the nine INSERTs
        inserts = capture.sync()
        assert [e.op for e in inserts] == [Op.INSERT] * 9
        assert pieces.estimate() == (9, 9)

        db.run(
            *(f"UPDATE optin_status SET optin = 0 WHERE userid = 'user{n}'" for n in (1, 2, 3, 4))
        )
        updates = capture.sync()
        assert pieces.estimate() == (9, 5)

        db.run("UPDATE optin_status SET optin = 0 WHERE userid = 'user5'")
        updates += capture.sync()
        assert pieces.estimate() == (9, 4)

    assert_converged(db, pieces)
    assert [e.op for e in updates] == [Op.UPDATE] * 5
    first = updates[0]
    # The key of a table without one: each source's own idea of the row's identity.
    assert (
        first.key
        == {
            "mysql": first.after,  # every column (the binlog has no other identity)
            "postgres": {},  # none: REPLICA IDENTITY FULL sends the whole old row as ``before``
            "sqlite": {"rowid": 1},  # the rowid the trigger recorded
        }[db.kind]
    )
    # GTID on MariaDB, the xid on PostgreSQL; SQLite's change table records no transaction.
    pattern = TRANSACTION_ID[db.kind]
    for event in inserts + updates:
        if pattern is None:
            assert event.transaction_id is None
        else:
            assert event.transaction_id is not None
            assert re.fullmatch(pattern, event.transaction_id)
    assert (first.schema, first.table) == (db.schema, "optin_status")
    assert first.before is not None and first.after is not None
    assert (first.before["optin"], first.after["optin"]) == (1, 0)
    assert first.before["phone"] == first.after["phone"] == "+12341111111"
    for event in inserts + updates:
        assert event.commit_time is not None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", event.commit_time)
    assert inserts[0].after is not None
    assert str(inserts[0].after["lastupdate"]).endswith("Z")  # the column default, an instant
    positions = [e.position for e in inserts + updates]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


# -- (2) snapshot of rows that existed before capture ----------------------------------------


def test_snapshot_of_rows_that_existed_before_capture(
    source_db: SourceDatabase, pieces: Pieces
) -> None:
    db = source_db
    db.run(*db.dialect.sample)
    sample_users(db)
    db.run(
        "UPDATE optin_status SET optin = 0 WHERE userid IN ('user1', 'user2')", db.dialect.analyze
    )
    with capturing(db, pieces, chunk_size=4) as capture:
        loads = capture.sync()
        assert [e.op for e in loads] == [Op.LOAD] * 9
        assert all(e.commit_time is None and e.before is None for e in loads)
        assert pieces.estimate() == (9, 7)
        table = db.table("optin_status")
        assert capture.progress[0] == (table, 0, 9)
        assert capture.progress[-1] == (table, 9, 9)
        assert len(capture.progress) >= 3  # one report per chunk of 4 at least

        db.run("UPDATE optin_status SET optin = 0 WHERE userid = 'user3'")
        (update,) = capture.sync()
        assert update.op is Op.UPDATE
        # Every change after the snapshot's read is newer than every load: the log's version wins.
        assert update.position > max(e.position for e in loads)
    assert pieces.estimate() == (9, 6)
    assert_converged(db, pieces)


# -- (3) snapshot with concurrent writes -----------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "primary-key"])
def test_snapshot_with_concurrent_writes_converges(
    source_db: SourceDatabase, pieces: Pieces, keyed: bool
) -> None:
    db, rows = source_db, 1000
    db.run(*(db.dialect.keyed if keyed else db.dialect.sample))
    many_users(db, rows)
    writer = Writer(db, rows, seed=rows)
    with capturing(db, pieces, chunk_size=100, max_events=100) as capture:
        writer.start()
        try:
            while capture.state.get("phase") != "log":
                capture.step()
                pieces.apply_all()
                time.sleep(0.002)  # let the writer in between chunks
        finally:
            writer.stop()
        capture.sync()
    assert writer.done > 20, "the writer should overlap the snapshot"
    assert_converged(db, pieces)


# -- (4) restarts: SIGKILL during the snapshot and while streaming ---------------------------


class Driver:
    """``source_driver.py`` as a process: capture + apply of ``optin_status`` into ``folder``."""

    def __init__(self, db: SourceDatabase, folder: Path, *options: str) -> None:
        self.db = db
        self.folder = folder
        path = os.pathsep.join(filter(None, [str(DRIVER.parent), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(DRIVER),
                db.kind,
                db.target,
                str(folder),
                "optin_status",
                *options,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.counts: dict[str, int] = {}
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(
            target=lambda: [self.lines.put(line) for line in stdout], daemon=True
        ).start()

    def wait_for(self, phase: str, count: int, timeout: float = SYNC_TIMEOUT) -> None:
        """Until the driver printed ``phase`` with at least ``count`` rows/events."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.failure()
            try:
                line = self.lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                assert time.monotonic() < deadline, f"driver printed no '{phase} >= {count}'"
                continue
            word, _, number = line.partition(" ")
            self.counts[word] = int(number)
            if word == phase and int(number) >= count:
                return

    def read_lines(self) -> None:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            word, _, number = line.partition(" ")
            self.counts[word] = int(number)

    def synced(self) -> bool:
        """Whether capture has read everything written so far and apply has applied it."""
        assert self.process.poll() is None, self.failure()
        mark = self.db.mark()
        with closing_pieces(self.folder) as pieces:
            saved = pieces.stream.checkpoint(self.db.kind)
            if saved is None or not self.db.reached(json_state(saved.state), mark):
                return False
            stats = pieces.stream.stats()
            return stats.consumers.get("apply", 0) == stats.head

    def failure(self) -> str:
        errors = self.process.stderr.read() if self.process.stderr else ""
        return f"driver exited {self.process.returncode}: {errors}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.close()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(20) == 0, self.failure()
        time.sleep(0.05)  # the reader thread takes the last lines
        self.read_lines()
        self.close()

    def close(self) -> None:
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def json_state(text: str) -> dict[str, Any]:
    return dict(json.loads(text))


def test_resume_after_sigkill_during_the_snapshot_and_while_streaming(
    source_db: SourceDatabase, tmp_path: Path
) -> None:
    """SIGKILL in the middle of the snapshot, then again while changes stream, the application
    writing all along: the engine ends up holding the table, nothing lost, nothing extra."""
    db, rows = source_db, 2000
    db.run(*db.dialect.sample)
    many_users(db, rows)
    folder = tmp_path / "data"
    options = ("--chunk-size", "200", "--batch-delay", "0.03")
    writer = Writer(db, rows, seed=rows, pause=0.004)
    driver = Driver(db, folder, *options)
    writer.start()
    try:
        driver.wait_for("snapshot", 800)
        driver.kill()  # mid-snapshot: 2,000 rows, 200 per batch, 30 ms apart
        driver = Driver(db, folder, *options)
        driver.wait_for("log", 100)
        resumed = driver.counts["snapshot"]  # rows the restarted driver loaded
        driver.kill()  # while changes stream
        driver = Driver(db, folder, *options)
        driver.wait_for("log", 50)
    finally:
        writer.stop()
    wait_until(driver.synced, "the restarted driver to catch up")
    driver.stop()
    if SNAPSHOT_RESUMES_WITHOUT_A_KEY[db.kind]:
        assert resumed <= rows - 500, f"{resumed} rows: the snapshot started over"
    else:
        assert resumed > rows - 500, f"{resumed} rows: the snapshot went on from its cursor"
    with closing_pieces(folder) as pieces:
        assert_converged(db, pieces)
    assert writer.done > 100


# -- (5) ALTER TABLE ADD COLUMN mid-stream ---------------------------------------------------


def test_alter_table_add_column_mid_stream_keeps_each_row_s_columns(
    source_db: SourceDatabase, pieces: Pieces
) -> None:
    db = source_db
    db.run(*db.dialect.sample)
    sample_users(db)
    with capturing(db, pieces) as capture:
        capture.sync()
        db.run(
            "UPDATE optin_status SET optin = 0 WHERE userid = 'user1'",
            "ALTER TABLE optin_status ADD COLUMN plan VARCHAR(10) DEFAULT 'gold'",
            "UPDATE optin_status SET optin = 0, plan = 'silver' WHERE userid = 'user2'",
        )
        before_alter, after_alter = capture.sync()
    with capturing(db, pieces) as capture:  # open again from the saved state
        assert capture.sync() == []
        with db.session() as app:
            app.execute(INSERT, ("new", phone(10), 1))
            app.execute("UPDATE optin_status SET optin = 0, plan = 'bronze' WHERE userid = 'user3'")
        insert, reopened = capture.sync()

    assert before_alter.after is not None and "plan" not in before_alter.after
    assert after_alter.after is not None and after_alter.after["userid"] == "user2"
    if NEW_COLUMNS_BEFORE_REOPEN[db.kind]:
        assert after_alter.after["plan"] == "silver"
        assert after_alter.before is not None and after_alter.before["plan"] == "gold"
    else:
        assert "plan" not in after_alter.after
        assert after_alter.after["optin"] == 0  # the columns it has are still right
    assert insert.after is not None and (insert.after["userid"], insert.after["plan"]) == (
        "new",
        "gold",
    )
    assert reopened.after is not None and reopened.after["plan"] == "bronze"
    assert reopened.before is not None and reopened.before["plan"] == "gold"
    assert pieces.estimate() == (10, 7)
    assert_converged(db, pieces)


# -- (6) address change and delete -----------------------------------------------------------


def test_address_change_moves_the_endpoint_and_delete_removes_it(
    source_db: SourceDatabase, pieces: Pieces
) -> None:
    db = source_db
    db.run(*db.dialect.sample)
    sample_users(db)
    with capturing(db, pieces) as capture:
        capture.sync()
        old = pieces.store.get_endpoint(pieces.app_id, "user1_+12341111111")
        db.run("UPDATE optin_status SET phone = '+12349999999' WHERE userid = 'user1'")
        (change,) = capture.sync()
        assert change.op is Op.UPDATE
        assert change.before is not None and change.before["phone"] == "+12341111111"
        with pytest.raises(NotFound):
            pieces.store.get_endpoint(pieces.app_id, "user1_+12341111111")
        new = pieces.store.get_endpoint(pieces.app_id, "user1_+12349999999")
        assert new.address == "+12349999999"
        assert new.opt_out is OptOut.NONE
        assert (new.source_position or "") > (old.source_position or "")

        db.run("DELETE FROM optin_status WHERE userid = 'user2'")
        (delete,) = capture.sync()
        assert delete.op is Op.DELETE
        assert delete.after is None
        assert delete.before is not None and delete.before["userid"] == "user2"
        with pytest.raises(NotFound):
            pieces.store.get_endpoint(pieces.app_id, "user2_+12341111112")
    assert pieces.estimate() == (8, 8)
    assert_converged(db, pieces)


# -- (7) the types all three share -----------------------------------------------------------


def test_shared_types_come_out_the_same_from_snapshot_and_log(
    source_db: SourceDatabase, pieces: Pieces
) -> None:
    db = source_db
    expected = TYPES_EXPECTED[db.kind]
    db.run(*db.dialect.types, db.dialect.types_row.format(id=1))
    with capturing(db, pieces, ["types"]) as capture:
        (load,) = capture.sync()
        db.run(
            db.dialect.types_row.format(id=2),
            "UPDATE types SET " + ", ".join(f"{c} = NULL" for c in expected) + " WHERE id = 2",
        )
        insert, nulls = capture.sync()
    assert (load.op, insert.op, nulls.op) == (Op.LOAD, Op.INSERT, Op.UPDATE)
    assert load.after == {"id": 1, **expected}
    assert insert.after == {"id": 2, **expected}  # the log agrees with the snapshot
    assert nulls.before == insert.after
    assert nulls.after == {"id": 2, **dict.fromkeys(expected)}
    for event in (load, insert, nulls):
        again = dms.decode(dms.encode(event))  # the stream's format carries every value
        assert (again.after, again.before, again.position) == (
            event.after,
            event.before,
            event.position,
        )
