"""``SQLiteSource`` against real SQLite files: what only the trigger log has.

The scenarios every source shares (the AWS sample's 9 -> 5 -> 4, snapshots with and without
concurrent writes, SIGKILL during the snapshot and while streaming, ADD COLUMN mid-stream,
address change and delete, the shared types) run on SQLite too, in
``tests/contract/test_source_contract.py``. Here: the sample seed, rollbacks, acknowledgement and
the cleaner thread, the snapshot cursor and VACUUM, rowid and composite keys, BLOBs, triggers
added and removed, WAL mode, lost positions, and how quickly a commit is read.

The application is played by plain ``sqlite3`` connections of the test's own, each write its own
transaction, as a real application would commit them.
"""

from __future__ import annotations

import json
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


# -- the trigger log: rollbacks, acknowledgements, cleanup -----------------------------------


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
    """The saved cursor of an INTEGER PRIMARY KEY table, and which run reads which change (the
    contract suite SIGKILLs a capture of a table without one, which starts over)."""
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


def test_a_restarted_snapshot_and_the_change_it_holds_last_keep_distinct_positions(
    tmp_path: Path,
) -> None:
    """Found by the contract suite: the log of a restarted snapshot reads change S' again, and
    the reloads used to get the very same position, so the stream kept the load and dropped the
    change as its duplicate, with the before image that removes an old address."""
    path = tmp_path / "app.db"
    numbers_table(path, 100, primary_key=False)  # no key: the snapshot starts over
    options: dict[str, Any] = {"chunk_size": 10, "idle_wait": 0.05}
    with capture(path, ["t"], **options) as (_, batches):
        state = [next(batches) for _ in range(3)][-1].state
    with app_db(path) as app:  # the last change before the restart: its seq is S'
        app.execute("UPDATE t SET name = 'moved' WHERE rowid = 5")
    with capture(path, ["t"], state, **options) as (_, batches):
        loads, _ = read_snapshot(batches)
        with app_db(path) as app:
            app.execute("UPDATE t SET name = 'again' WHERE rowid = 5")
        log, _ = read_until_idle(batches)
    reload = next(e for e in loads if e.key == {"rowid": 5})
    update, later = log
    assert reload.after is not None and reload.after["name"] == "moved"
    assert update.before is not None and update.before["name"] == "row5"
    assert update.position < reload.position < later.position  # the reload holds the change
    assert update.event_id != reload.event_id


# -- schema ----------------------------------------------------------------------------------


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
            # Not before idle_wait; the upper bound only catches a hang (a busy machine is slow).
            assert 0.09 <= elapsed < 10


def test_a_commit_wakes_the_reader_quickly(sample: Path) -> None:
    """The commit, not the end of idle_wait, wakes the reader: it returns in well under half
    of idle_wait. How quickly is a figure for bench/pipeline.py (commit -> applied latency): a
    bound in milliseconds here failed on a busy 2-core machine."""
    with capture(sample, [SAMPLE_TABLE], idle_wait=20.0) as (_, batches):
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
            assert woke - committed[0] < 10.0
