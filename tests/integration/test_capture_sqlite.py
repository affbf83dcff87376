"""``SQLiteSource`` against real SQLite files: snapshot, trigger log, resume, races.

The application is played by plain ``sqlite3`` connections of the test's own, each write its own
transaction, as a real application would commit them.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, cast

import pytest

from optsync.capture.base import CaptureBatch
from optsync.capture.sqlite.source import CHANGE_TABLE, SQLiteSource
from optsync.errors import ConfigError, Fatal
from optsync.events import ChangeEvent, Op
from optsync.sample import SAMPLE_ROWS, SAMPLE_TABLE, create_sample_database

pytestmark = pytest.mark.integration

Key = tuple[Any, ...]


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def app_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of the application: autocommit, so every statement is its own transaction."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
        yield conn


@contextmanager
def capture(
    path: Path,
    tables: Sequence[str],
    state: str | None = None,
    *,
    max_events: int = 1_000,
    **options: Any,
) -> Iterator[tuple[SQLiteSource, Iterator[CaptureBatch]]]:
    source = SQLiteSource(path, tables, **options)
    source.open(state)
    batches = cast(Generator[CaptureBatch, None, None], source.batches(max_events))
    try:
        yield source, batches
    finally:
        batches.close()
        source.close()


def phase(batch: CaptureBatch) -> str:
    return str(json.loads(batch.state)["phase"])


def read_snapshot(batches: Iterator[CaptureBatch]) -> tuple[list[ChangeEvent], str]:
    """Events up to and including the batch that switches the state to the log."""
    events: list[ChangeEvent] = []
    for batch in batches:
        events.extend(batch.events)
        if phase(batch) == "log":
            return events, batch.state
    raise AssertionError("batches ended during the snapshot")


def read_log(
    batches: Iterator[CaptureBatch], count: int, timeout: float = 5.0
) -> tuple[list[ChangeEvent], str]:
    """At least ``count`` log events (fails after ``timeout`` seconds)."""
    events: list[ChangeEvent] = []
    deadline = time.monotonic() + timeout
    state = ""
    while len(events) < count:
        assert time.monotonic() < deadline, f"only {len(events)} of {count} events arrived"
        batch = next(batches)
        events.extend(batch.events)
        state = batch.state
    return events, state


def read_until_idle(batches: Iterator[CaptureBatch]) -> tuple[list[ChangeEvent], str]:
    """Every event up to the first empty batch (nothing new for ``idle_wait``)."""
    events: list[ChangeEvent] = []
    for batch in batches:
        if not batch.events and phase(batch) == "log":
            return events, batch.state
        events.extend(batch.events)
    raise AssertionError("batches ended")


def replay(events: Sequence[ChangeEvent]) -> dict[Key, dict[str, Any]]:
    """Apply events as the engine does: a write wins only with a greater position per key.

    Deletes leave a tombstone position, so an older event cannot resurrect the row.
    """
    stored: dict[Key, tuple[str, dict[str, Any] | None]] = {}
    for event in events:
        key = tuple(event.key.values())
        if key in stored and event.position <= stored[key][0]:
            continue
        row = None if event.op is Op.DELETE else dict(event.after or {})
        stored[key] = (event.position, row)
    return {key: row for key, (_, row) in stored.items() if row is not None}


def table_content(path: Path, table: str, key: str = "rowid") -> dict[Key, dict[str, Any]]:
    with app_db(path) as conn:
        cursor = conn.execute(f"SELECT {key}, * FROM {table}")
        names = [column[0] for column in cursor.description[1:]]
        return {(row[0],): dict(zip(names, row[1:], strict=True)) for row in cursor}


def change_rows(path: Path) -> int:
    with app_db(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {CHANGE_TABLE}").fetchone()[0])


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "app.db"
    assert create_sample_database(path) is True
    return path


def numbers_table(path: Path, rows: int, *, primary_key: bool) -> None:
    key = "id INTEGER PRIMARY KEY, " if primary_key else ""
    with app_db(path) as conn:
        conn.execute(f"CREATE TABLE t ({key}name TEXT, v INTEGER)")
        conn.executemany(
            "INSERT INTO t (name, v) VALUES (?, ?)", [(f"row{n}", n) for n in range(1, rows + 1)]
        )


# -- the sample seed -------------------------------------------------------------------------


def test_sample_database_is_created_once(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    assert create_sample_database(path) is True
    assert create_sample_database(path) is False
    with app_db(path) as conn:
        rows = conn.execute("SELECT userid, phone, optin FROM optin_status ORDER BY rowid")
        assert [tuple(r) for r in rows] == list(SAMPLE_ROWS)
        assert SAMPLE_ROWS[0] == ("user1", "+12341111111", 1)
        assert SAMPLE_ROWS[-1] == ("user9", "+12341111119", 1)
        lastupdate = conn.execute("SELECT lastupdate FROM optin_status").fetchone()[0]
        assert lastupdate.endswith("Z")
        assert "T" in lastupdate


# -- snapshot, then the log ------------------------------------------------------------------


def test_snapshot_then_log_events(sample: Path) -> None:
    calls: list[tuple[str, int, int | None]] = []
    source = SQLiteSource(sample, [SAMPLE_TABLE], idle_wait=0.05)
    source.open(None)
    batches = cast(
        Generator[CaptureBatch, None, None],
        source.batches(100, lambda *args: calls.append(args)),
    )
    try:
        loads, state = read_snapshot(batches)
        assert [e.op for e in loads] == [Op.LOAD] * 9
        assert [e.after["userid"] for e in loads if e.after] == [f"user{n}" for n in range(1, 10)]
        assert {e.position for e in loads} == {loads[0].position}
        assert loads[0].key == {"rowid": 1}
        assert loads[0].schema == "main"
        assert calls[0] == (SAMPLE_TABLE, 0, 9)
        assert calls[-1] == (SAMPLE_TABLE, 9, 9)
        assert json.loads(state)["tables_done"] == [SAMPLE_TABLE]

        with app_db(sample) as app:
            app.execute("INSERT INTO optin_status (userid, phone, optin) VALUES ('u10', 'p', 1)")
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user3'")
            app.execute("DELETE FROM optin_status WHERE userid = 'user5'")
        events, state = read_log(batches, 3)
    finally:
        batches.close()
        source.close()

    insert, update, delete = events
    assert insert.op is Op.INSERT
    assert insert.key == {"rowid": 10}
    assert insert.before is None
    assert insert.after is not None
    assert insert.after["userid"] == "u10"
    assert insert.after["lastupdate"].endswith("Z")  # the column default is in the image

    assert update.op is Op.UPDATE
    assert update.key == {"rowid": 3}
    assert update.before is not None
    assert update.after is not None
    assert (update.before["optin"], update.after["optin"]) == (1, 0)
    assert update.before["phone"] == update.after["phone"] == "+12341111113"

    assert delete.op is Op.DELETE
    assert delete.key == {"rowid": 5}
    assert delete.after is None
    assert delete.before is not None
    assert delete.before["userid"] == "user5"

    positions = [e.position for e in events]
    assert positions == sorted(positions)
    assert len(set(positions)) == 3
    assert min(positions) > loads[0].position
    for event in events:
        assert event.schema == "main"
        assert event.table == SAMPLE_TABLE
        assert event.commit_time is not None
        assert time.strptime(event.commit_time, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert json.loads(state)["log_after"] == int(delete.position)


def test_rolled_back_write_is_not_captured(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        read_snapshot(batches)
        with app_db(sample) as app:
            app.execute("BEGIN")
            app.execute("UPDATE optin_status SET optin = 0")
            app.execute("ROLLBACK")
            app.execute("BEGIN")
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user2'")
            app.execute("COMMIT")
        events, _ = read_until_idle(batches)
    assert [(e.op, e.key["rowid"]) for e in events] == [(Op.UPDATE, 1), (Op.UPDATE, 2)]


def test_acknowledge_removes_read_change_rows(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05, ack_interval=0) as (source, batches):
        first = next(batches)
        with app_db(sample) as app:
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
        source.acknowledge(first.state)  # a snapshot state releases nothing
        assert change_rows(sample) == 1

        _, state = read_snapshot(batches)
        events, state = read_log(batches, 1)
        assert change_rows(sample) == 1
        with app_db(sample) as app:
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user2'")
        source.acknowledge(state)
        assert change_rows(sample) == 1  # the unread change stays
        more, later = read_log(batches, 1)
        source.acknowledge(later)
        assert change_rows(sample) == 0
    assert [e.key["rowid"] for e in events + more] == [1, 2]

    # seq keeps growing after the table was emptied: positions never go back.
    with app_db(sample) as app:
        app.execute("UPDATE optin_status SET optin = 1 WHERE userid = 'user3'")
    with capture(sample, [SAMPLE_TABLE], later, idle_wait=0.05) as (_, batches):
        after_ack, _ = read_log(batches, 1)
    assert after_ack[0].position > more[0].position


def test_cleanup_runs_off_the_log_path_and_gives_way_to_the_application(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05, ack_interval=0.02) as (source, batches):
        read_snapshot(batches)
        with app_db(sample) as app:
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
            _, state = read_log(batches, 1)
            app.execute("BEGIN IMMEDIATE")  # the application holds the write lock
            app.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user2'")
            source.acknowledge(state)  # returns at once: the cleaner thread deletes
            time.sleep(0.2)  # several cleanup rounds find the database busy and defer
            held = app.execute(f"SELECT rid FROM {CHANGE_TABLE} ORDER BY seq").fetchall()
            assert held == [(1,), (2,)]
            app.execute("COMMIT")
        deadline = time.monotonic() + 5
        while change_rows(sample) != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with app_db(sample) as app:  # the read row went, the unread one stays
            assert app.execute(f"SELECT rid FROM {CHANGE_TABLE}").fetchall() == [(2,)]
        more, _ = read_log(batches, 1)
    assert [e.key["rowid"] for e in more] == [2]


# -- resume ----------------------------------------------------------------------------------


def test_restart_in_the_middle_of_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    numbers_table(path, 100, primary_key=True)
    options: dict[str, Any] = {"chunk_size": 10, "idle_wait": 0.05}

    with capture(path, ["t"], **options) as (_, batches):
        first_run = [next(batches) for _ in range(3)]
        with app_db(path) as app:  # during the first run, after the snapshot began
            app.execute("UPDATE t SET v = -5 WHERE id = 5")  # already loaded
            app.execute("UPDATE t SET v = -80 WHERE id = 80")  # not loaded yet
    state = first_run[-1].state
    assert json.loads(state) | {"snapshot_s": 0} == {
        "source": "sqlite",
        "phase": "snapshot",
        "snapshot_s": 0,
        "table": "t",
        "after_rowid": 30,
        "tables_done": [],
        "log_after": 0,
    }

    with app_db(path) as app:  # between the runs
        app.execute("UPDATE t SET v = -3 WHERE id = 3")
        app.execute("UPDATE t SET v = -50 WHERE id = 50")
        app.execute("DELETE FROM t WHERE id IN (7, 90)")
        app.execute("INSERT INTO t (id, name, v) VALUES (101, 'row101', 101)")

    with capture(path, ["t"], state, **options) as (_, batches):
        loads, _ = read_snapshot(batches)
        with app_db(path) as app:  # after the restart
            app.execute("UPDATE t SET v = -60 WHERE id = 60")
        log, _ = read_until_idle(batches)

    first_loads = [e for batch in first_run for e in batch.events]
    loaded_first = [e.key["id"] for e in first_loads]
    loaded_second = [e.key["id"] for e in loads]
    assert loaded_first == list(range(1, 31))
    assert loaded_second == [n for n in range(31, 102) if n != 90]
    assert min(e.position for e in loads) > first_loads[0].position  # S' > S

    # The log starts after the original S: changes to rows before the cursor are in it.
    log_changes = {(e.op, e.key["id"]) for e in log}
    assert {(Op.UPDATE, 5), (Op.UPDATE, 3), (Op.DELETE, 7), (Op.UPDATE, 60)} <= log_changes

    replayed = replay(first_loads + loads + log)
    assert replayed == table_content(path, "t", key="id")
    assert replayed[(5,)]["v"] == -5
    assert replayed[(80,)]["v"] == -80
    assert (7,) not in replayed


@pytest.mark.parametrize("key", ["", "id INTEGER PRIMARY KEY DESC, "])
def test_restart_in_the_snapshot_after_vacuum_renumbered_the_rows(tmp_path: Path, key: str) -> None:
    """A table whose rowid is no INTEGER PRIMARY KEY starts its snapshot over after a restart:
    VACUUM between the runs renumbers its rows, and continuing after the saved rowid skipped
    rows (found in review: row31..row40 were never loaded). ``INTEGER PRIMARY KEY DESC`` is
    no rowid alias (SQLite keeps it in an index of its own)."""
    path = tmp_path / "app.db"
    with app_db(path) as conn:
        conn.execute(f"CREATE TABLE t ({key}name TEXT, v INTEGER)")
        conn.executemany(
            "INSERT INTO t (name, v) VALUES (?, ?)", [(f"row{n}", n) for n in range(1, 101)]
        )
    options: dict[str, Any] = {"chunk_size": 10, "idle_wait": 0.05}

    with capture(path, ["t"], **options) as (_, batches):
        first_run = [next(batches) for _ in range(3)]
    state = first_run[-1].state
    assert json.loads(state)["after_rowid"] == 30

    with app_db(path) as app:  # between the runs: rows deleted, the file vacuumed
        app.execute("DELETE FROM t WHERE v <= 10")
        app.execute("VACUUM")
        renumbered = app.execute("SELECT rowid FROM t WHERE v = 31").fetchone()[0]
    if not key:  # SQLite 3.40 renumbers this one; the DESC table keeps its rowids, may not
        assert renumbered == 21  # row31 now sits below the saved cursor

    with capture(path, ["t"], state, **options) as (_, batches):
        loads, _ = read_snapshot(batches)
    assert sorted(e.after["v"] for e in loads if e.after) == list(range(11, 101))


def test_snapshot_with_concurrent_writes(tmp_path: Path) -> None:
    """No gap and no lost update: replaying the events rebuilds the table exactly."""
    path = tmp_path / "app.db"
    numbers_table(path, 1_000, primary_key=False)
    writes = 2_000
    done = [0]
    errors: list[BaseException] = []

    def write() -> None:
        rng = random.Random(7)
        try:
            with app_db(path) as conn:
                top = 1_000
                for n in range(writes):
                    roll = rng.random()
                    rowid = rng.randint(1, top)
                    if roll < 0.45:
                        conn.execute("UPDATE t SET v = ? WHERE rowid = ?", (n, rowid))
                    elif roll < 0.70:
                        conn.execute("INSERT INTO t (name, v) VALUES (?, ?)", (f"new{n}", n))
                        top += 1
                    elif roll < 0.90:
                        conn.execute("DELETE FROM t WHERE rowid = ?", (rowid,))
                    else:  # a rolled back write must leave no trace
                        conn.execute("BEGIN")
                        conn.execute("UPDATE t SET v = -1 WHERE rowid = ?", (rowid,))
                        conn.execute("ROLLBACK")
                    done[0] += 1
        except BaseException as exc:
            errors.append(exc)

    events: list[ChangeEvent] = []
    with capture(path, ["t"], max_events=200, chunk_size=50, idle_wait=0.05) as (_, batches):
        writer = threading.Thread(target=write)
        writer.start()
        try:
            while done[0] < 50 and writer.is_alive():
                time.sleep(0.001)
            during = [done[0]]
            for batch in batches:
                events.extend(batch.events)
                if phase(batch) == "log":
                    break
                time.sleep(0.002)  # let the writer interleave with the snapshot
            during.append(done[0])
        finally:
            writer.join()
        tail, _ = read_until_idle(batches)
        events.extend(tail)

    assert not errors, errors
    assert during[1] > during[0], "the writer did not write during the snapshot"
    loads = [e for e in events if e.op is Op.LOAD]
    changes = [e for e in events if e.op is not Op.LOAD]
    assert len({e.key["rowid"] for e in loads}) == len(loads)
    assert changes
    assert all(c.position > loads[0].position for c in changes)
    assert [c.position for c in changes] == sorted(c.position for c in changes)
    assert replay(events) == table_content(path, "t")


# -- schema ----------------------------------------------------------------------------------


def test_added_column_is_captured_after_reopen(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        _, state = read_snapshot(batches)
        with app_db(sample) as app:
            app.execute("ALTER TABLE optin_status ADD COLUMN email TEXT")
            app.execute("UPDATE optin_status SET email = 'a@example.com' WHERE rowid = 1")
        before_restart, state = read_log(batches, 1)
    # The old trigger still writes the old columns, each under its own name.
    assert before_restart[0].after is not None
    assert "email" not in before_restart[0].after
    assert before_restart[0].after["userid"] == "user1"

    with capture(sample, [SAMPLE_TABLE], state, idle_wait=0.05) as (_, batches):
        with app_db(sample) as app:
            app.execute("UPDATE optin_status SET email = 'b@example.com' WHERE rowid = 2")
        events, _ = read_log(batches, 1)
    assert events[0].before is not None
    assert events[0].after is not None
    assert events[0].before["email"] is None
    assert events[0].after["email"] == "b@example.com"
    assert events[0].after["userid"] == "user2"


def test_table_without_primary_key_is_keyed_by_rowid(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        loads, _ = read_snapshot(batches)
        with app_db(sample) as app:
            app.execute("UPDATE optin_status SET phone = '+19999999999' WHERE rowid = 4")
            app.execute("UPDATE optin_status SET rowid = 40 WHERE rowid = 6")  # a key change
        events, _ = read_log(batches, 3)
    assert [e.key for e in loads] == [{"rowid": n} for n in range(1, 10)]
    assert loads[0].after is not None
    assert "rowid" not in loads[0].after
    update, delete, insert = events
    assert (update.op, update.key) == (Op.UPDATE, {"rowid": 4})
    assert update.before is not None
    assert update.before["phone"] == "+12341111114"
    # The key changed: the old key is deleted, the new one inserted.
    assert (delete.op, delete.key) == (Op.DELETE, {"rowid": 6})
    assert (insert.op, insert.key) == (Op.INSERT, {"rowid": 40})
    assert insert.after is not None
    assert insert.after["userid"] == "user6"


def test_composite_primary_key(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with app_db(path) as app:
        app.execute(
            "CREATE TABLE prefs (userid TEXT NOT NULL, channel TEXT NOT NULL, optin INTEGER, "
            "PRIMARY KEY (channel, userid))"
        )
        app.execute("INSERT INTO prefs VALUES ('u1', 'SMS', 1), ('u1', 'EMAIL', 0)")
    with capture(path, ["prefs"], idle_wait=0.05) as (_, batches):
        loads, _ = read_snapshot(batches)
        with app_db(path) as app:
            app.execute("UPDATE prefs SET optin = 0 WHERE userid = 'u1' AND channel = 'SMS'")
            app.execute("UPDATE prefs SET userid = 'u2' WHERE channel = 'EMAIL'")
        events, _ = read_log(batches, 3)
    assert [e.key for e in loads] == [
        {"channel": "SMS", "userid": "u1"},
        {"channel": "EMAIL", "userid": "u1"},
    ]
    assert list(loads[0].key) == ["channel", "userid"]  # primary key order, not column order
    assert [(e.op, dict(e.key)) for e in events] == [
        (Op.UPDATE, {"channel": "SMS", "userid": "u1"}),
        (Op.DELETE, {"channel": "EMAIL", "userid": "u1"}),
        (Op.INSERT, {"channel": "EMAIL", "userid": "u2"}),
    ]
    assert events[0].partition_key == "main.prefs.SMS.u1"


def test_blob_values_are_captured_as_hex(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with app_db(path) as app:
        app.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, body BLOB, size REAL)")
        app.execute("INSERT INTO files VALUES (1, x'00ff10', 2.5)")
    with capture(path, ["files"], idle_wait=0.05) as (_, batches):
        loads, _ = read_snapshot(batches)
        with app_db(path) as app:
            app.execute("INSERT INTO files VALUES (2, x'cafe', NULL)")  # must not fail the app
        events, _ = read_log(batches, 1)
    assert loads[0].after == {"id": 1, "body": "00FF10", "size": 2.5}
    assert events[0].after == {"id": 2, "body": "CAFE", "size": None}


def test_table_added_to_the_configuration_is_snapshotted(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        _, state = read_snapshot(batches)
    with app_db(sample) as app:
        app.execute("CREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT)")
        app.execute("INSERT INTO extra VALUES (1, 'one'), (2, 'two')")
        app.execute("UPDATE optin_status SET optin = 0 WHERE rowid = 1")  # while stopped
    with capture(sample, [SAMPLE_TABLE, "extra"], state, idle_wait=0.05) as (_, batches):
        loads, state = read_snapshot(batches)
        with app_db(sample) as app:
            app.execute("UPDATE extra SET note = 'uno' WHERE id = 1")
        events, _ = read_until_idle(batches)
    assert [(e.table, e.key) for e in loads] == [("extra", {"id": 1}), ("extra", {"id": 2})]
    assert json.loads(state)["tables_done"] == [SAMPLE_TABLE, "extra"]
    assert [(e.table, e.op) for e in events] == [(SAMPLE_TABLE, Op.UPDATE), ("extra", Op.UPDATE)]
    assert events[1].position > loads[0].position


def test_removed_table_loses_its_triggers(sample: Path) -> None:
    with app_db(sample) as app:
        app.execute("CREATE TABLE extra (id INTEGER PRIMARY KEY, note TEXT)")
    with capture(sample, [SAMPLE_TABLE, "extra"], idle_wait=0.05) as (_, batches):
        _, state = read_snapshot(batches)
    with capture(sample, [SAMPLE_TABLE], state, idle_wait=0.05) as (_, batches):
        with app_db(sample) as app:
            app.execute("INSERT INTO extra VALUES (1, 'one')")
            app.execute("UPDATE optin_status SET optin = 0 WHERE rowid = 1")
            triggers = app.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'extra'"
            ).fetchall()
        events, _ = read_until_idle(batches)
    assert triggers == []
    assert [e.table for e in events] == [SAMPLE_TABLE]


# -- preflight and loud failures -------------------------------------------------------------


def test_missing_table_is_a_config_error(sample: Path) -> None:
    source = SQLiteSource(sample, [SAMPLE_TABLE, "optin_history"])
    with pytest.raises(ConfigError, match="'optin_history' does not exist"):
        source.open(None)
    source.close()
    with app_db(sample) as app:  # nothing was installed
        installed = app.execute(
            "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' OR name = ?",
            (CHANGE_TABLE,),
        ).fetchone()[0]
    assert installed == 0


def test_missing_file_and_view_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SQLiteSource(tmp_path / "nope.db", ["t"]).open(None)
    assert not (tmp_path / "nope.db").exists()
    path = tmp_path / "app.db"
    with app_db(path) as app:
        app.execute("CREATE TABLE t (a)")
        app.execute("CREATE VIEW v AS SELECT a FROM t")
    with pytest.raises(ConfigError, match="'v' is a view"):
        SQLiteSource(path, ["v"]).open(None)


def test_wal_mode_is_set(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE]), app_db(sample) as app:
        assert app.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_position_lost_when_the_database_was_recreated(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    create_sample_database(path)
    with capture(path, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        read_snapshot(batches)
        with app_db(path) as app:
            app.execute("UPDATE optin_status SET optin = 0")
        _, state = read_log(batches, 9)
    for leftover in tmp_path.glob("app.db*"):
        leftover.unlink()
    create_sample_database(path)
    source = SQLiteSource(path, [SAMPLE_TABLE])
    with pytest.raises(Fatal, match="position lost"):
        source.open(state)
    source.close()


def test_position_lost_when_triggers_were_dropped(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.05) as (_, batches):
        _, state = read_snapshot(batches)
    with app_db(sample) as app:
        app.execute("DROP TRIGGER _optsync_optin_status_delete")
    source = SQLiteSource(sample, [SAMPLE_TABLE])
    with pytest.raises(Fatal, match=r"triggers of table 'optin_status' \(delete\) are gone"):
        source.open(state)
    source.close()


def test_unreadable_state_is_fatal(sample: Path) -> None:
    source = SQLiteSource(sample, [SAMPLE_TABLE])
    with pytest.raises(Fatal, match="not readable"):
        source.open("{not json")
    with pytest.raises(Fatal, match="not a SQLite capture state"):
        source.open('{"phase": "binlog"}')
    source.close()


# -- waiting for news ------------------------------------------------------------------------


def test_idle_batches_are_empty_and_come_after_idle_wait(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=0.1) as (_, batches):
        _, state = read_snapshot(batches)
        for _ in range(3):
            started = time.monotonic()
            batch = next(batches)
            elapsed = time.monotonic() - started
            assert batch.events == ()
            assert batch.state == state
            assert 0.09 <= elapsed < 0.5


def test_a_commit_wakes_the_reader_quickly(sample: Path) -> None:
    with capture(sample, [SAMPLE_TABLE], idle_wait=5.0) as (_, batches):
        read_snapshot(batches)
        for delay in (0.01, 0.2):  # while polling every 1 ms, and every 5 ms
            committed: list[float] = []

            def commit(wait: float = delay, out: list[float] = committed) -> None:
                time.sleep(wait)
                with app_db(sample) as app:
                    app.execute("UPDATE optin_status SET optin = 0 WHERE rowid = 1")
                    out.append(time.monotonic())

            writer = threading.Thread(target=commit)
            writer.start()
            try:
                batch = next(batches)
                woke = time.monotonic()
            finally:
                writer.join()
            assert len(batch.events) == 1
            assert woke - committed[0] < 0.05
