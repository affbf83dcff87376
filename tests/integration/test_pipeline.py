"""``Pipeline`` in-process: a real SQLite source, the embedded stream, the SQLite engine.

The application is played by plain ``sqlite3`` connections of the test's own; every statement
commits on its own unless a test opens a transaction. Nothing is mocked: each test waits for
the pipeline to drain (capture has read the whole change table, apply has acknowledged the
stream's head) and then reads the engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import msgspec
import pytest

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import OPT_IN_TRUE, Mapper, MappingError
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, store_settings
from optsync.capture.sqlite.source import CHANGE_TABLE
from optsync.config import MappingSettings, Settings, SourceSettings, load_settings
from optsync.engine.models import CauseKind, ChannelType, Endpoint, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import Fatal, NotFound
from optsync.formats import dms
from optsync.pipeline import Pipeline
from optsync.sample import SAMPLE_TABLE, create_sample_database
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

pytestmark = pytest.mark.integration

RULE = MappingSettings(
    table=SAMPLE_TABLE,
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)
"""The rule ``optsync up`` uses: endpoint id ``{userid}_{phone}``."""

DRAIN_TIMEOUT = 20.0

EndpointRow = tuple[str, str, str]
"""(endpoint id, Address, OptOut)."""


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def app_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of the application: autocommit, so every statement is its own transaction."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
        yield conn


def make_settings(folder: Path, *rules: MappingSettings) -> Settings:
    """Settings like ``optsync up``'s, in ``folder`` (source ``folder/app.db``), without API."""
    return msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=folder / "data",
        source=SourceSettings(url=f"sqlite:///{folder / 'app.db'}", tables=(SAMPLE_TABLE,)),
        mappings=rules or (RULE,),
        serve_api=False,
    )


@contextmanager
def running(
    settings: Settings, *, before_start: Callable[[Pipeline], None] | None = None
) -> Iterator[Pipeline]:
    """A started pipeline over a fresh engine store; stopped and closed afterwards."""
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    try:
        pipeline = Pipeline(settings, store)
        try:
            if before_start is not None:
                before_start(pipeline)
            pipeline.start()
            yield pipeline
        finally:
            pipeline.stop()
        pipeline.check()
    finally:
        store.close()


def wait_until(
    pipeline: Pipeline, condition: Callable[[], bool], what: str, timeout: float = DRAIN_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        pipeline.check()
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.005)


def issued(source_path: Path) -> int:
    """The largest seq the source's change table has issued."""
    with app_db(source_path) as conn:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'"
        ).fetchone():
            return 0  # capture has not created its change table yet
        row = conn.execute(
            "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0)",
            (CHANGE_TABLE,),
        ).fetchone()
    return int(row[0])


def is_drained(pipeline: Pipeline, source_path: Path) -> bool:
    """Capture has read every committed change and apply has acknowledged every record."""
    last = issued(source_path)
    saved = pipeline.stream.checkpoint(pipeline.source_name or "")
    if saved is None:
        return False
    state = json.loads(saved.state)
    if state.get("phase") != "log" or (state.get("log_after") or 0) < last:
        return False
    stats = pipeline.stream.stats()  # read after the checkpoint: it covers what it names
    return stats.consumers.get(pipeline.worker.consumer, 0) == stats.head


def drain(pipeline: Pipeline, source_path: Path) -> None:
    wait_until(pipeline, lambda: is_drained(pipeline, source_path), "the pipeline to drain")


def engine_rows(pipeline: Pipeline) -> set[EndpointRow]:
    """Every endpoint of the app as (id, Address, OptOut), read from the engine's file."""
    app_id = pipeline.app.id
    with closing(sqlite3.connect(pipeline.settings.engine_path)) as conn:
        rows = conn.execute(
            "SELECT id, address, opt_out FROM endpoints WHERE app_id = ?", (app_id,)
        ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def source_rows(source_path: Path) -> set[EndpointRow]:
    """What the engine must hold for the source table: one endpoint per row."""
    with app_db(source_path) as conn:
        rows = conn.execute(f"SELECT userid, phone, optin FROM {SAMPLE_TABLE}").fetchall()
    return {
        (f"{userid}_{phone}", phone, OptOut.ALL.value if optin == 0 else OptOut.NONE.value)
        for userid, phone, optin in rows
    }


def all_endpoints(pipeline: Pipeline) -> dict[str, Endpoint]:
    """Every endpoint, read through the store's API (per user), by id."""
    store, app_id = pipeline.store, pipeline.app.id
    with closing(sqlite3.connect(pipeline.settings.engine_path)) as conn:
        users = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT user_id FROM endpoints WHERE app_id = ? AND user_id IS NOT NULL",
                (app_id,),
            )
        ]
        bare = conn.execute(
            "SELECT count(*) FROM endpoints WHERE app_id = ? AND user_id IS NULL", (app_id,)
        ).fetchone()[0]
    assert bare == 0, "every endpoint of the mapping has a user id"
    return {e.id: e for user in users for e in store.get_user_endpoints(app_id, user)}


def history_rows(pipeline: Pipeline) -> int:
    """Rows of the engine's consent history."""
    with closing(sqlite3.connect(pipeline.settings.engine_path)) as conn:
        return int(conn.execute("SELECT count(*) FROM consent_history").fetchone()[0])


def phone(n: int) -> str:
    """A distinct possible US number (+1 234 5xx xxxx) for each ``n`` < 1,000,000."""
    return f"+12345{n:06d}"


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    """The sample source (nine users, all opted in) in ``tmp_path/app.db``."""
    path = tmp_path / "app.db"
    assert create_sample_database(path) is True
    return path


# -- 1. address change -----------------------------------------------------------------------


def test_address_change_deletes_the_old_endpoint(tmp_path: Path, sample: Path) -> None:
    settings = make_settings(tmp_path)
    with running(settings) as pipeline:
        store, app_id = pipeline.store, pipeline.app.id
        drain(pipeline, sample)
        old = store.get_endpoint(app_id, "user1_+12341111111")
        assert old.address == "+12341111111"
        assert old.opt_out is OptOut.NONE

        with app_db(sample) as app:
            app.execute(f"UPDATE {SAMPLE_TABLE} SET phone = '+12349999999' WHERE userid = 'user1'")
        drain(pipeline, sample)

        with pytest.raises(NotFound):
            store.get_endpoint(app_id, "user1_+12341111111")
        new = store.get_endpoint(app_id, "user1_+12349999999")
        assert new.address == "+12349999999"
        assert new.opt_out is OptOut.NONE
        assert new.user_id == "user1"
        assert new.source_position is not None
        assert new.source_position > (old.source_position or "")
        assert [e.id for e in store.get_user_endpoints(app_id, "user1")] == [new.id]
        assert store.count_endpoints(app_id) == 9

        history = store.consent_history(app_id, "user1_+12341111111")
        deleted = history[-1]
        assert deleted.opt_out_before is OptOut.NONE
        assert deleted.opt_out_after is None, history
        assert deleted.address == "+12341111111"
        assert deleted.cause.kind is CauseKind.SOURCE
        assert deleted.cause.ref == new.source_position  # the update that moved the number
        created = store.consent_history(app_id, "user1_+12349999999")
        assert [(c.opt_out_before, c.opt_out_after) for c in created] == [(None, OptOut.NONE)]
        assert created[0].cause.kind is CauseKind.SOURCE
        assert pipeline.dlq.count() == 0


# -- 2. a delete of an endpoint that never existed ------------------------------------------


def test_delete_of_a_row_without_endpoint_counts_as_missing(tmp_path: Path, sample: Path) -> None:
    settings = make_settings(tmp_path)
    with running(settings) as pipeline:
        store, app_id, stats = pipeline.store, pipeline.app.id, pipeline.worker.stats
        drain(pipeline, sample)
        applied, stale, dead = stats.applied, stats.stale, stats.dead
        missing = getattr(stats, "missing", 0)

        with app_db(sample) as app:
            # optin = 7 is neither opt-in nor opt-out: the insert goes to the DLQ, no endpoint
            app.execute(
                f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) "
                "VALUES ('ghost', '+12345550100', 7)"
            )
            app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = 'ghost'")
            app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = 'user2'")
        drain(pipeline, sample)

        assert pipeline.running
        assert store.get_endpoint(app_id, "user2_+12341111112").opt_out is OptOut.ALL
        with pytest.raises(NotFound):
            store.get_endpoint(app_id, "ghost_+12345550100")
        letters = pipeline.dlq.list()
        assert len(letters) == 1, [e.reason for e in letters]  # the insert, not the delete
        assert "'optin'" in letters[0].reason
        assert json.loads(letters[0].data)["metadata"]["operation"] == "insert"
        assert stats.dead - dead == 1
        assert stats.applied - applied == 1  # user2's opt-out only
        assert stats.stale - stale == 0
        counted = getattr(stats, "missing", None)
        assert counted is not None, (
            "ApplyStats has no 'missing' counter: ApplyWorker._write drops WriteResult.missing"
        )
        assert counted - missing == 1


# -- 3. poison records ----------------------------------------------------------------------


def test_poison_row_goes_to_the_dlq_and_replays_after_a_mapping_fix(
    tmp_path: Path, sample: Path
) -> None:
    settings = make_settings(tmp_path)
    with running(settings) as pipeline:
        store, app_id = pipeline.store, pipeline.app.id
        drain(pipeline, sample)
        with app_db(sample) as app:
            app.execute("BEGIN")
            app.executemany(
                f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES (?, ?, ?)",
                [
                    ("good1", "+12345550101", 1),
                    ("poison", "+12345550102", 7),
                    ("good2", "+12345550103", 0),
                ],
            )
            app.execute("COMMIT")
        drain(pipeline, sample)

        assert store.get_endpoint(app_id, "good1_+12345550101").opt_out is OptOut.NONE
        assert store.get_endpoint(app_id, "good2_+12345550103").opt_out is OptOut.ALL
        with pytest.raises(NotFound):
            store.get_endpoint(app_id, "poison_+12345550102")
        (letter,) = pipeline.dlq.list()
        assert "column 'optin'" in letter.reason
        assert "7" in letter.reason
        assert "+12345550102" not in letter.reason  # no personal data in reasons
        assert letter.consumer == "apply"

        # A foreign record that is not JSON: DLQ, and the pipeline goes on.
        pipeline.stream.append_raw([("junk", b"{not json")])
        with app_db(sample) as app:
            app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = 'good1'")
        drain(pipeline, sample)
        assert pipeline.running
        assert store.get_endpoint(app_id, "good1_+12345550101").opt_out is OptOut.ALL
        letters = pipeline.dlq.list()
        assert len(letters) == 2
        malformed = letters[1]
        assert malformed.partition_key == "junk"
        assert malformed.reason.startswith("malformed record: "), malformed.reason
        assert malformed.data == b"{not json"

    fixed = dataclasses.replace(mapping_rules((RULE,))[0], opt_in_true=OPT_IN_TRUE | {"7"})
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    stream = EmbeddedStream(settings.stream_path)
    dlq = SQLiteDeadLetterQueue(settings.dlq_path)
    try:
        found = store.find_app(settings.app)
        assert found is not None
        app_id = found.id
        unchanged = ApplyWorker(stream, Mapper(mapping_rules((RULE,))), store, app_id, dlq)
        assert unchanged.replay_dead_letters([letter.id]) == (0, 1)
        assert store.count_endpoints(app_id) == 11

        worker = ApplyWorker(stream, Mapper((fixed,)), store, app_id, dlq)
        assert worker.replay_dead_letters([letter.id]) == (1, 0)
        endpoint = store.get_endpoint(app_id, "poison_+12345550102")
        assert endpoint.opt_out is OptOut.NONE
        assert endpoint.address == "+12345550102"
        assert [e.id for e in dlq.list()] == [malformed.id]
        replayed = {e.id: e for e in dlq.list(include_replayed=True)}
        assert replayed[letter.id].replayed_at is not None
        assert replayed[malformed.id].replayed_at is None

        assert worker.replay_dead_letters() == (0, 1)  # the malformed record stays
        (still,) = dlq.list()
        assert still.reason.startswith("malformed record: ")
    finally:
        dlq.close()
        stream.close()
        store.close()


# -- 4. replay of the whole stream ----------------------------------------------------------


def workload(path: Path) -> None:
    """Inserts, opt-in flips, address changes, deletes, and a few multi-row transactions."""
    with app_db(path) as app:
        insert = f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES (?, ?, ?)"
        for n in range(20):
            app.execute(insert, (f"w{n}", phone(n), n % 2))
        for n in range(0, 20, 3):
            app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 1 - optin WHERE userid = ?", (f"w{n}",))
        for n in range(1, 20, 4):
            app.execute(
                f"UPDATE {SAMPLE_TABLE} SET phone = ? WHERE userid = ?", (phone(100 + n), f"w{n}")
            )
        app.execute(f"UPDATE {SAMPLE_TABLE} SET phone = ? WHERE userid = 'w1'", (phone(1),))
        for n in (2, 7, 11):
            app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = ?", (f"w{n}",))
        app.execute(insert, ("w7", phone(7), 0))  # the same endpoint id as the deleted row
        app.execute("BEGIN")
        app.execute(insert, ("brief", phone(500), 1))
        app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = 'brief'")
        app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = 'brief'")
        app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid IN ('user3', 'user4')")
        app.execute("COMMIT")
        app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = 'user9'")


def test_replaying_the_whole_stream_changes_nothing(tmp_path: Path, sample: Path) -> None:
    settings = make_settings(tmp_path)
    with running(settings) as pipeline:
        drain(pipeline, sample)
        workload(sample)
        drain(pipeline, sample)
        before = all_endpoints(pipeline)
        history = history_rows(pipeline)
        assert engine_rows(pipeline) == source_rows(sample)
        assert pipeline.dlq.count() == 0
        head = pipeline.stream.stats().head

    # The writes a full replay will make, counted with the same mapping.
    mapper = Mapper(mapping_rules(settings.mappings))
    stream = EmbeddedStream(settings.stream_path)
    try:
        records = stream.read("test-replay-count", head + 1)
    finally:
        stream.close()
    assert len(records) == head
    writes = 0
    for record in records:
        with suppress(MappingError):
            writes += len(mapper.map(dms.decode(record.data)).writes)
    assert writes > head  # address changes write twice

    with running(settings, before_start=lambda p: p.stream.seek("apply", 0)) as pipeline:
        stats = pipeline.worker.stats
        wait_until(pipeline, lambda: stats.records >= head, "the replay of every record")
        drain(pipeline, sample)
        assert stats.records == head
        assert stats.applied == 0
        assert stats.stale == writes
        assert stats.dead == 0
        after = all_endpoints(pipeline)
        assert sorted(after) == sorted(before)
        for endpoint_id, endpoint in before.items():
            assert after[endpoint_id] == endpoint
        assert history_rows(pipeline) == history
        assert pipeline.dlq.count() == 0


# -- 5. snapshot while the application writes ----------------------------------------------


@pytest.mark.parametrize(
    "journal",
    [
        "wal",
        # As ``optsync up`` creates the sample: capture itself switches the file to WAL while
        # the application writes.
        "delete",
    ],
)
def test_snapshot_and_log_with_concurrent_writes_converge(
    tmp_path: Path, sample: Path, journal: str
) -> None:
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    insert = f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES (?, ?, ?)"
    with app_db(sample) as app:
        assert app.execute(f"PRAGMA journal_mode = {journal}").fetchone()[0] == journal
        app.execute("BEGIN")
        app.executemany(insert, [(f"s{n}", phone(n), rng.randint(0, 1)) for n in range(2000)])
        app.execute("COMMIT")
    users = {f"s{n}": phone(n) for n in range(2000)}
    started, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    counts = {"insert": 0, "flip": 0, "address": 0, "delete": 0}

    def write() -> None:
        next_number = 10_000
        try:
            with app_db(sample) as app:
                for i in range(1000):
                    if stop.is_set():
                        return
                    if i == 100:
                        started.set()
                    op = rng.choices(list(counts), weights=(25, 40, 15, 20))[0]
                    if op == "insert" or not users:
                        userid = f"n{next_number}"
                        users[userid] = phone(next_number)
                        app.execute(insert, (userid, users[userid], rng.randint(0, 1)))
                        op = "insert"
                    else:
                        userid = rng.choice(list(users))
                        if op == "flip":
                            app.execute(
                                f"UPDATE {SAMPLE_TABLE} SET optin = 1 - optin WHERE userid = ?",
                                (userid,),
                            )
                        elif op == "address":
                            users[userid] = phone(next_number)
                            app.execute(
                                f"UPDATE {SAMPLE_TABLE} SET phone = ? WHERE userid = ?",
                                (users[userid], userid),
                            )
                        else:
                            del users[userid]
                            app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = ?", (userid,))
                    next_number += 1
                    counts[op] += 1
                    if i % 50 == 0:
                        time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)
        finally:
            started.set()

    writer = threading.Thread(target=write, name="app-writer")
    settings = make_settings(tmp_path)
    writer.start()
    try:
        assert started.wait(10)
        with running(settings) as pipeline:
            deadline = time.monotonic() + 60
            while writer.is_alive():
                pipeline.check()
                assert time.monotonic() < deadline, "the writer did not finish"
                writer.join(0.05)
            assert not errors, errors
            drain(pipeline, sample)
            expected = source_rows(sample)
            actual = engine_rows(pipeline)
            print(f"ops={counts} endpoints={len(actual)}")
            assert len(expected) == 9 + 2000 + counts["insert"] - counts["delete"]
            assert actual - expected == set(), "stale or extra endpoints"
            assert expected - actual == set(), "lost endpoints"
            assert pipeline.dlq.count() == 0
    finally:
        stop.set()
        writer.join(60)


# -- 6. capture in its own process ----------------------------------------------------------


def test_capture_runs_in_a_child_process_whose_logs_and_failure_reach_this_one(
    tmp_path: Path, sample: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    assert settings.source is not None
    stream = EmbeddedStream(settings.stream_path)
    try:
        stream.append([], Checkpoint(settings.source.source_name, "not a capture state"))
    finally:
        stream.close()
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    pipeline = Pipeline(settings, store)
    try:
        assert pipeline.capture_process
        pids = set()
        with caplog.at_level(logging.INFO):
            pipeline.start()
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while pipeline.failure is None:
                pids.add(pipeline.capture_pid)
                assert time.monotonic() < deadline, "the capture process did not fail"
                time.sleep(0.01)
        assert pids - {None, os.getpid()}, "capture did not run in a process of its own"
        with pytest.raises(Fatal, match=r"saved capture state .* is not readable"):
            pipeline.check()
        child = [r for r in caplog.records if r.getMessage().startswith("capture process stopped")]
        assert child, "the capture process's log records were not relayed"
    finally:
        pipeline.stop()
        store.close()


KILLED_PIPELINE = """
import sys, time
import msgspec
from pathlib import Path
from optsync.sample import SAMPLE_TABLE
from optsync.cli import SAMPLE_RULE
from optsync.backends import store_settings
from optsync.config import SourceSettings, load_settings
from optsync.engine.sqlite import SQLiteStore
from optsync.pipeline import Pipeline

folder = Path(sys.argv[1])
settings = msgspec.structs.replace(
    load_settings(None, env={}),
    data_dir=folder / "data",
    source=SourceSettings(url=f"sqlite:///{folder / 'app.db'}", tables=(SAMPLE_TABLE,)),
    mappings=(SAMPLE_RULE,),
    serve_api=False,
)
pipeline = Pipeline(settings, SQLiteStore(settings.engine_path, store_settings(settings)))
pipeline.start()
assert pipeline.snapshot_done.wait(30)
print(pipeline.capture_pid, flush=True)
time.sleep(60)
"""


def test_a_killed_pipeline_process_leaves_no_capture_process_behind(
    tmp_path: Path, sample: Path
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_PIPELINE, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        child = int(process.stdout.readline())
        assert child != process.pid
        os.kill(child, 0)  # it runs
        process.kill()  # SIGKILL: no clean-up, the pipe to the capture process just closes
        process.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and _state(child) != "Z":
            assert time.monotonic() < deadline, "the capture process outlived its parent by 10 s"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _state(pid: int) -> str:
    """The process state letter (Z: exited, not reaped yet); "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.parametrize("configured", [None, False, True])
def test_the_mapping_process_follows_apply_mapping_process(
    tmp_path: Path, sample: Path, configured: bool | None
) -> None:
    """``[apply] mapping_process``: off, on, or (unset) on when the machine has two cores."""
    settings = make_settings(tmp_path)
    settings = msgspec.structs.replace(
        settings, apply=msgspec.structs.replace(settings.apply, mapping_process=configured)
    )
    expected = (os.cpu_count() or 1) >= 2 if configured is None else configured
    with running(settings) as pipeline:
        assert (pipeline.stage is not None) == expected
        drain(pipeline, sample)
        assert len(engine_rows(pipeline)) == 9  # the sample's users, either way
        if pipeline.stage is not None:
            assert pipeline.stage.alive
