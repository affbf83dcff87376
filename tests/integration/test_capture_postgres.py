"""``PostgresSource`` against a private PostgreSQL: what only logical decoding has.

The scenarios every source shares (the AWS sample's 9 -> 5 -> 4, snapshots with and without
concurrent writes, SIGKILL during the snapshot and while streaming, ADD COLUMN mid-stream,
address change and delete under REPLICA IDENTITY FULL, the shared types) run on PostgreSQL too,
in ``tests/contract/test_source_contract.py``. Here: the default replica identity, unchanged
TOAST values, PostgreSQL's own types, slots and publications, preflight, tables added later,
transactions split over batches, a lost connection, ``--resnapshot``, and ``optsync run`` with
the example config.

Every test drives the source into ``EmbeddedStream`` -> ``ApplyWorker`` -> ``SQLiteStore`` (and
its DLQ) in a folder of its own (``pipeline_pieces.Pieces``), and reads the outcome from the
engine. The application is played by autocommit psycopg2 connections. Each test uses its own
database, so slots, publications and tables never meet.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from example_run import ExampleRun
from pipeline_pieces import RULE, Pieces
from postgres_server import PostgresServer, running_server
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

from optsync.apply.mapping import MappingRule
from optsync.capture.base import CaptureBatch
from optsync.capture.postgres.position import parse_lsn
from optsync.capture.postgres.source import UNCHANGED_TOAST, PostgresSource, SlotLost
from optsync.engine.models import OptOut
from optsync.errors import ConfigError, NotFound
from optsync.events import ChangeEvent, Op
from optsync.sample import SAMPLE_ROWS
from optsync.stream.base import Checkpoint

pytestmark = pytest.mark.integration

SAMPLE_DDL = (
    "CREATE TABLE optin_status (userid text, phone text, optin int, "
    "lastupdate timestamptz DEFAULT now())"
)
EndpointRow = tuple[str, str, str]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def db(postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for the test; its slots are dropped and it is removed afterwards."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    postgres.sql(f"DROP DATABASE IF EXISTS {name}")
    postgres.sql(f"CREATE DATABASE {name}")
    yield postgres.url(db=name)
    for _ in range(50):
        busy = postgres.sql(
            "SELECT slot_name, active FROM pg_replication_slots WHERE database = %s", (name,)
        )
        if not any(active for _, active in busy):
            break
        time.sleep(0.1)
    postgres.sql(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE database = %s AND NOT active",
        (name,),
    )
    postgres.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def app(url: str) -> Any:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def run(url: str, *statements: str) -> int:
    """Run the statements in one transaction; an LSN below its commit (for ``drain``)."""
    with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
        cur.execute("SELECT pg_current_wal_insert_lsn()")
        lsn = parse_lsn(cur.fetchone()[0])
        conn.commit()
    return lsn


def sample_table(url: str) -> None:
    """The AWS sample's table and nine users, with whole before images."""
    run(
        url,
        SAMPLE_DDL,
        "ALTER TABLE optin_status REPLICA IDENTITY FULL",
        "INSERT INTO optin_status (userid, phone, optin) VALUES "
        + ", ".join(f"('{u}', '{p}', {o})" for u, p, o in SAMPLE_ROWS),
    )


class Capture:
    """A source driven batch by batch into the pieces, as the pipeline's capture thread does."""

    def __init__(self, pieces: Pieces, source: PostgresSource) -> None:
        self.pieces = pieces
        self.source = source
        self.events: list[ChangeEvent] = []
        self.last = pieces.checkpoint(source)
        source.open(self.last)
        self.batches = source.batches(1000, self._progress)
        self.progress: list[tuple[str, int, int | None]] = []

    def _progress(self, table: str, done: int, expected: int | None) -> None:
        self.progress.append((table, done, expected))

    def step(self) -> CaptureBatch:
        batch = next(self.batches)
        self.last = self.pieces.capture_step(self.source, batch, self.last)
        self.events.extend(batch.events)
        return batch

    @property
    def state(self) -> dict[str, Any]:
        return dict(json.loads(self.last or "{}"))

    def drain(self, until: int = 0, timeout: float = 60.0) -> None:
        """Capture until the log has read past LSN ``until`` and is idle, then apply all."""
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"capture did not catch up: {self.state}"
            batch = self.step()
            state = self.state
            if (
                not batch.events
                and state.get("phase") == "log"
                and parse_lsn(state["log_after"]) >= until
            ):
                break
        self.pieces.apply_all()

    def close(self) -> None:
        self.batches.close()  # type: ignore[attr-defined]
        self.source.close()


@contextmanager
def capturing(
    url: str,
    folder: Path,
    tables: list[str],
    rules: tuple[MappingRule, ...] = (RULE,),
    **options: Any,
) -> Iterator[Capture]:
    pieces = Pieces(folder, rules)
    try:
        options.setdefault("idle_wait", 0.05)
        capture = Capture(pieces, PostgresSource(url, tables, **options))
        try:
            yield capture
        finally:
            capture.close()
    finally:
        pieces.close()


def source_rows(url: str) -> set[EndpointRow]:
    with closing(app(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT userid, phone, optin FROM optin_status")
        return {
            (f"{u}_{p}", p, OptOut.ALL.value if o == 0 else OptOut.NONE.value)
            for u, p, o in cur.fetchall()
        }


def engine_rows(pieces: Pieces) -> set[EndpointRow]:
    conn = pieces.store._conn  # the engine's own file, read directly
    rows = conn.execute(
        "SELECT id, address, opt_out FROM endpoints WHERE app_id = ?", (pieces.app_id,)
    ).fetchall()
    return {(r[0], r[1], r[2]) for r in rows}


def assert_converged(url: str, pieces: Pieces) -> None:
    expected, actual = source_rows(url), engine_rows(pieces)
    assert actual - expected == set(), f"stale or extra endpoints: {sorted(actual - expected)[:5]}"
    assert expected - actual == set(), f"lost endpoints: {sorted(expected - actual)[:5]}"


def wal_lsn(url: str) -> int:
    with closing(app(url)) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()")
        return parse_lsn(cur.fetchone()[0])


# -- before images under the default replica identity ----------------------------------------


def test_address_change_under_default_identity(db: str, tmp_path: Path) -> None:
    """The documented behaviour: without FULL, the old endpoint is found only through the key."""
    run(
        db,
        "CREATE TABLE optin_status (id int PRIMARY KEY, userid text, phone text, optin int)",
        "CREATE TABLE optin_by_phone (userid text, phone text, optin int, "
        "PRIMARY KEY (userid, phone))",
        "INSERT INTO optin_status VALUES (1, 'user1', '+12341111111', 1)",
        "INSERT INTO optin_by_phone VALUES ('user2', '+12341111112', 1)",
    )
    rules = (
        RULE,
        MappingRule(table="optin_by_phone", address="phone", user_id="userid", opt_in="optin"),
    )
    with capturing(db, tmp_path, ["optin_status", "optin_by_phone"], rules) as capture:
        capture.drain()
        lsn = run(
            db,
            "UPDATE optin_status SET phone = '+12349999991' WHERE id = 1",
            "UPDATE optin_by_phone SET phone = '+12349999992' WHERE userid = 'user2'",
        )
        capture.drain(lsn)
        store, app_id = capture.pieces.store, capture.pieces.app_id
        # Key (id) unchanged: the update carries no before image; the old endpoint stays.
        update = next(e for e in capture.events if e.op is Op.UPDATE)
        assert update.table == "optin_status"
        assert update.before is None
        assert store.get_endpoint(app_id, "user1_+12341111111").opt_out is OptOut.NONE
        assert store.get_endpoint(app_id, "user1_+12349999991").opt_out is OptOut.NONE
        # Key (userid, phone) changed: a delete of the old key and an insert of the new one.
        moved = [e for e in capture.events if e.table == "optin_by_phone" and e.op is not Op.LOAD]
        assert [e.op for e in moved] == [Op.DELETE, Op.INSERT]
        assert moved[0].before == {"userid": "user2", "phone": "+12341111112"}
        assert moved[0].position < moved[1].position
        with pytest.raises(NotFound):
            store.get_endpoint(app_id, "user2_+12341111112")
        assert store.get_endpoint(app_id, "user2_+12349999992").opt_out is OptOut.NONE
        assert capture.pieces.dlq.count() == 0


def test_delete_under_default_identity_goes_to_the_dlq_with_the_fix(
    db: str, tmp_path: Path
) -> None:
    """The delete carries only the key, which cannot name the endpoint: it goes to the DLQ with
    the fix instead of being dropped (under FULL it removes the endpoint: contract suite)."""
    run(db, "CREATE TABLE optin_keyed (id int PRIMARY KEY, userid text, phone text, optin int)",
        "INSERT INTO optin_keyed VALUES (1, 'k1', '+12342222221', 1)")  # fmt: skip
    rule = MappingRule(table="optin_keyed", address="phone", user_id="userid", opt_in="optin")
    with capturing(db, tmp_path, ["optin_keyed"], (rule,)) as capture:
        capture.drain()
        lsn = run(db, "DELETE FROM optin_keyed WHERE id = 1")
        capture.drain(lsn)
        (delete,) = [e for e in capture.events if e.op is Op.DELETE]
        assert delete.before == {"id": 1}
        letters = capture.pieces.dlq.list()
        assert len(letters) == 1
        assert "REPLICA IDENTITY FULL" in letters[0].reason
        store, app_id = capture.pieces.store, capture.pieces.app_id
        assert store.get_endpoint(app_id, "k1_+12342222221").opt_out is OptOut.NONE


# -- TOAST, types ----------------------------------------------------------------------------


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
def test_unchanged_toast_is_a_marker_never_a_null(db: str, tmp_path: Path, identity: str) -> None:
    big = "".join(random.Random(1).choice("abcdefghij") for _ in range(20_000))
    run(
        db,
        "CREATE TABLE optin_status "
        "(id int PRIMARY KEY, userid text, phone text, optin int, notes text)",
        "ALTER TABLE optin_status ALTER COLUMN notes SET STORAGE EXTERNAL",
        f"ALTER TABLE optin_status REPLICA IDENTITY {identity}",
        f"INSERT INTO optin_status VALUES (1, 'user1', '+12341111111', 1, '{big}')",
    )
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        lsn = run(db, "UPDATE optin_status SET optin = 0 WHERE id = 1")
        capture.drain(lsn)
        update = capture.events[-1]
        assert update.op is Op.UPDATE
        assert update.after is not None
        if identity == "DEFAULT":
            assert "notes" not in update.after
            assert update.extra == {UNCHANGED_TOAST: ["notes"]}
        else:  # the whole old row came along: the value is filled in
            assert update.after["notes"] == big
            assert update.extra == {}
        endpoint = capture.pieces.store.get_endpoint(capture.pieces.app_id, "user1_+12341111111")
        assert endpoint.opt_out is OptOut.ALL


TYPES_DDL = """
CREATE TABLE typed (
    id int PRIMARY KEY, n numeric(30, 10), n2 numeric, tz timestamptz, ts timestamp, d date,
    j json, jb jsonb, ai int[], at text[], a2 int[], b bool, by bytea, f float8, r real,
    big bigint, u uuid, e text, nul text, dom positive_int
)
"""
TYPES_ROW = (
    "(1, 12345678901234567890.0123456789, 'NaN', '2024-03-10 02:30:00.5-05', "
    "'2024-03-10 02:30:00.25', '2024-02-29', '{\"a\": [1, 2.5, null]}', '{\"b\": {\"c\": true}}', "
    '\'{1,NULL,3}\', \'{"x y","q\\"uote",NULL,"c,d"}\', \'{{1,2},{3,4}}\', true, '
    "'\\x00ff10', 'Infinity', 1.5, 9007199254740993, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', "
    "E'tab\\there\\nline \\\\ back', NULL, 7)"
)
TYPES_EXPECTED = {
    "id": 1,
    "n": "12345678901234567890.0123456789",
    "n2": "NaN",
    "tz": "2024-03-10T07:30:00.5Z",
    "ts": "2024-03-10T02:30:00.25",
    "d": "2024-02-29",
    "j": {"a": [1, 2.5, None]},
    "jb": {"b": {"c": True}},
    "ai": [1, None, 3],
    "at": ["x y", 'q"uote', None, "c,d"],
    "a2": [[1, 2], [3, 4]],
    "b": True,
    "by": "00FF10",
    "f": "Infinity",
    "r": 1.5,
    "big": 9007199254740993,
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "e": "tab\there\nline \\ back",
    "nul": None,
    "dom": 7,
}


def test_postgres_types_round_trip_through_snapshot_and_log(db: str, tmp_path: Path) -> None:
    """PostgreSQL's own types: json, arrays, bytea, NaN and Infinity, uuid, a domain, a
    database time zone capture must ignore (the contract suite has the shared ones)."""
    database = db.rsplit("/", 1)[1]
    run(
        db,
        f"ALTER DATABASE {database} SET timezone = 'America/New_York'",  # capture must not care
        "CREATE DOMAIN positive_int AS int CHECK (VALUE > 0)",
        TYPES_DDL,
        f"INSERT INTO typed VALUES {TYPES_ROW}",
    )
    rule = MappingRule(table="nothing", address="a", opt_in="b")
    with capturing(db, tmp_path, ["typed"], (rule,)) as capture:
        capture.drain()
        lsn = run(db, f"INSERT INTO typed VALUES {TYPES_ROW.replace('(1,', '(2,', 1)}")
        lsn = run(db, "UPDATE typed SET nul = NULL, b = false WHERE id = 2")
        capture.drain(lsn)
        load, insert, update = capture.events
        assert load.op is Op.LOAD and insert.op is Op.INSERT and update.op is Op.UPDATE
        assert load.after == TYPES_EXPECTED
        assert insert.after == {**TYPES_EXPECTED, "id": 2}  # the log agrees with the snapshot
        assert update.after == {**TYPES_EXPECTED, "id": 2, "b": False}
        stored = capture.pieces.stream.read("check", 10)
        decoded = [json.loads(r.data) for r in stored]
        assert decoded[0]["data"] == TYPES_EXPECTED  # JSON-compatible, stored as is


# -- slots: reuse, loss, idle WAL --------------------------------------------------------------


def test_slot_and_publication_are_reused_and_dropped_only_on_request(
    db: str, tmp_path: Path
) -> None:
    sample_table(db)
    with capturing(db, tmp_path, ["optin_status"], name="app1") as capture:
        capture.drain()
        first = capture.source.slot
    assert first == "optsync_app1"
    slots = lambda: [r[0] for r in run_rows(db, "SELECT slot_name FROM pg_replication_slots")]  # noqa: E731
    assert slots() == ["optsync_app1"]
    lsn = run(db, "UPDATE optin_status SET optin = 0 WHERE userid = 'user1'")
    with capturing(db, tmp_path, ["optin_status"], name="app1") as capture:
        capture.drain(lsn)
        assert [e.op for e in capture.events] == [Op.UPDATE]  # no second snapshot
        assert capture.pieces.estimate() == (9, 8)
    assert slots() == ["optsync_app1"]
    source = PostgresSource(db, ["optin_status"], name="app1")
    source.drop_slot()
    assert slots() == []
    assert run_rows(db, "SELECT pubname FROM pg_publication") == []
    state = json.loads(source.resnapshot_state())
    assert state["phase"] == "snapshot" and state["log_after"] is None


def run_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with closing(app(url)) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


def test_slot_invalidated_gives_the_named_error(
    db: str, tmp_path: Path, postgres: PostgresServer
) -> None:
    sample_table(db)
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
    postgres.set_config("max_slot_wal_keep_size", "1MB")
    try:
        for _ in range(4):  # push the WAL several segments past the slot, then a checkpoint
            run(
                db,
                "INSERT INTO optin_status (userid, phone, optin) VALUES ('x', '+12340000000', 1)",
            )
            postgres.sql("SELECT pg_switch_wal()")
        postgres.sql("CHECKPOINT")
        status = run_rows(db, "SELECT wal_status FROM pg_replication_slots")
        assert status == [("lost",)]
        with pytest.raises(SlotLost) as caught, capturing(db, tmp_path, ["optin_status"]):
            pass
    finally:
        postgres.set_config("max_slot_wal_keep_size", None)
    message = str(caught.value)
    assert "optsync_postgres" in message
    assert "invalidated" in message
    assert "--drop-slot" in message and "--resnapshot" in message
    assert "max_slot_wal_keep_size" in message


def test_slot_dropped_behind_the_readers_back_gives_the_named_error(
    db: str, tmp_path: Path
) -> None:
    sample_table(db)
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        run(
            db,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE active_pid IS NOT NULL",
        )
        time.sleep(0.2)
        run(db, "SELECT pg_drop_replication_slot('optsync_postgres')")
        with pytest.raises(SlotLost, match="was dropped"):
            capture.drain(timeout=10)


def test_idle_captured_table_does_not_hold_wal_back(db: str, tmp_path: Path) -> None:
    sample_table(db)
    run(db, "CREATE TABLE busy (id serial PRIMARY KEY, payload text)")
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        lags: list[int] = []
        first_lsn = wal_lsn(db)
        started = time.monotonic()
        with closing(app(db)) as conn, conn.cursor() as cur:
            while time.monotonic() - started < 8:
                cur.execute(
                    "INSERT INTO busy (payload) "
                    "SELECT repeat('x', 1000) FROM generate_series(1, 200)"
                )
                # The capture loop runs as the pipeline would, between the application's commits.
                capture.step()
                cur.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                    "FROM pg_replication_slots WHERE slot_name = 'optsync_postgres'"
                )
                lags.append(int(cur.fetchone()[0]))
        written = wal_lsn(db) - first_lsn
        print(f"WAL written {written / 1e6:.0f} MB, slot behind at most {max(lags) / 1e6:.1f} MB")
        assert written > 16_000_000
        # Behind by a second or two of the neighbour's WAL, not by all of it.
        bound = min(0.4 * written, 64_000_000)
        assert max(lags[len(lags) // 2 :]) < bound, [round(lag / 1e6, 1) for lag in lags[-10:]]
        assert lags[-1] < bound
        assert [e for e in capture.events if e.op is not Op.LOAD] == []


# -- preflight -------------------------------------------------------------------------------


def test_preflight_names_the_fix(db: str, tmp_path: Path, postgres: PostgresServer) -> None:
    database = db.rsplit("/", 1)[1]
    run(
        db,
        "CREATE TABLE nokey (userid text, phone text, optin int)",
        "CREATE TABLE secret (id int PRIMARY KEY)",
        "DROP ROLE IF EXISTS plain",
        "CREATE ROLE plain LOGIN",
        "DROP ROLE IF EXISTS replicator",
        "CREATE ROLE replicator LOGIN REPLICATION",
        f"GRANT CREATE ON DATABASE {database} TO replicator",
    )
    plain = postgres.url("plain", db=database)
    replicator = postgres.url("replicator", db=database)

    def refused(url: str, tables: list[str]) -> str:
        source = PostgresSource(url, tables)
        with pytest.raises(ConfigError) as caught:
            source.open(None)
        return str(caught.value)

    assert "ALTER ROLE" in refused(plain, ["nokey"])
    assert "REPLICA IDENTITY FULL" in refused(db, ["nokey"])
    assert "does not exist" in refused(db, ["missing"])
    assert "GRANT SELECT" in refused(replicator, ["secret"])
    run(db, "GRANT SELECT ON secret TO replicator")
    message = refused(replicator, ["secret"])  # may read, may not publish a table it does not own
    assert "CREATE PUBLICATION" in message
    with pytest.raises(ConfigError, match="postgresql://"):
        PostgresSource("mysql://x/y", ["t"])
    run(db, "DROP OWNED BY replicator", "DROP ROLE replicator", "DROP ROLE plain")


def test_preflight_refuses_wal_level_replica(postgres: PostgresServer) -> None:
    """A second private cluster, started with wal_level=replica (``postgres`` checks binaries)."""
    with running_server(extra_settings=["wal_level=replica"]) as server:
        server.sql("CREATE TABLE t (id int PRIMARY KEY)")
        source = PostgresSource(server.url(), ["t"])
        with pytest.raises(ConfigError, match="wal_level = logical"):
            source.open(None)


def test_a_table_added_later_is_snapshotted_while_the_log_waits(db: str, tmp_path: Path) -> None:
    sample_table(db)
    run(db, "CREATE TABLE optin_more (id int PRIMARY KEY, userid text, phone text, optin int)",
        "INSERT INTO optin_more VALUES (1, 'm1', '+12343333331', 1)")  # fmt: skip
    more = MappingRule(table="optin_more", address="phone", user_id="userid", opt_in="optin")
    with capturing(db, tmp_path, ["optin_status"], (RULE, more)) as capture:
        capture.drain()
    lsn = run(
        db,
        "UPDATE optin_status SET optin = 0 WHERE userid = 'user1'",
        "INSERT INTO optin_more VALUES (2, 'm2', '+12343333332', 0)",
    )
    with capturing(db, tmp_path, ["optin_status", "optin_more"], (RULE, more)) as capture:
        assert capture.state["phase"] == "log"
        capture.drain(lsn)
        ops = [(e.table, e.op) for e in capture.events]
        assert ("optin_more", Op.LOAD) in ops
        assert ("optin_status", Op.UPDATE) in ops
        store, app_id = capture.pieces.store, capture.pieces.app_id
        assert store.get_endpoint(app_id, "m2_+12343333332").opt_out is OptOut.ALL
        assert store.get_endpoint(app_id, "user1_+12341111111").opt_out is OptOut.ALL
        assert capture.state["tables_done"] == ["public.optin_status", "public.optin_more"]


def test_a_transaction_split_over_batches_is_read_again_whole(db: str, tmp_path: Path) -> None:
    run(
        db,
        "CREATE TABLE optin_status (id int PRIMARY KEY, userid text, phone text, optin int)",
        "INSERT INTO optin_status SELECT n, 'u' || n, '+12345' || lpad(n::text, 6, '0'), 1 "
        "FROM generate_series(1, 2500) n",
    )
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        before = capture.state["log_after"]
        lsn = run(db, "UPDATE optin_status SET optin = 0")  # one transaction, 2,500 changes
        first = capture.step()
        while not first.events:
            first = capture.step()
        assert len(first.events) == 1000  # max_events: the transaction goes out in slices
        assert json.loads(first.state)["log_after"] == before  # not past an unfinished commit
        # Stop here, as a crash after the first slice would: the slot re-sends the whole commit.
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain(lsn)
        updates = [e for e in capture.events if e.op is Op.UPDATE]
        assert len(updates) == 2500
        records = capture.pieces.stream.read("count", 100_000)
        ids = [
            (r.partition_key, json.loads(r.data)["metadata"]["stream-position"]) for r in records
        ]
        assert len(ids) == len(set(ids)) == 2500 + 2500  # loads and updates, each stored once
        assert capture.pieces.estimate() == (2500, 0)


def test_connection_lost_after_a_commit_was_read_loses_nothing(db: str, tmp_path: Path) -> None:
    """The walsender dies after a commit was read but before its events were handed over.

    Reading a commit moves the source's boundary past it while its events still wait in the
    reader; the reconnect must start from the last boundary handed over, or the slot never
    sends that transaction again (found in review: the four opt-outs were lost).
    """
    sample_table(db)
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        source = capture.source
        handle = source._handle
        broken: list[int] = []

        def handle_then_break(payload: bytes, transaction: Any, out: list[ChangeEvent]) -> Any:
            result = handle(payload, transaction, out)
            if transaction is not None and result is None and not broken:
                # A commit was just read and nothing handed over yet: end the walsender now.
                broken.append(len(out))
                run(
                    db,
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = 'optsync_postgres' AND active_pid IS NOT NULL",
                )
                deadline = time.monotonic() + 10
                while run_rows(db, "SELECT active FROM pg_replication_slots") != [(False,)]:
                    assert time.monotonic() < deadline, "the walsender did not end"
                    time.sleep(0.05)
            return result

        source._handle = handle_then_break  # type: ignore[method-assign]
        lsn = run(
            db,
            "UPDATE optin_status SET optin = 0 "
            "WHERE userid IN ('user1', 'user2', 'user3', 'user4')",
        )
        capture.drain(lsn)
        assert broken == [4]  # the failure came with the four changes still in the reader
        assert capture.pieces.estimate() == (9, 5)
        assert_converged(db, capture.pieces)


def test_resnapshot_state_loads_every_row_again_and_keeps_the_slot(db: str, tmp_path: Path) -> None:
    sample_table(db)
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain()
        resnapshot = capture.source.resnapshot_state()
    pieces = Pieces(tmp_path)
    pieces.stream.append([], Checkpoint("postgres", resnapshot))  # what --resnapshot does
    pieces.close()
    lsn = run(db, "UPDATE optin_status SET optin = 0 WHERE userid = 'user3'")
    with capturing(db, tmp_path, ["optin_status"]) as capture:
        capture.drain(lsn)
        loads = [e for e in capture.events if e.op is Op.LOAD]
        assert len(loads) == 9
        assert capture.pieces.estimate() == (9, 8)
    slots = run_rows(db, "SELECT slot_name FROM pg_replication_slots")
    assert slots == [("optsync_postgres",)]


# -- optsync run --config examples/postgres.toml -----------------------------------------------


def test_optsync_run_with_the_postgres_example_config(db: str, tmp_path: Path) -> None:
    """The example file, run as users run it: capture in its own process, the API answering
    boto3; the table as the example's comment creates it (no key, REPLICA IDENTITY FULL)."""
    run(db, SAMPLE_DDL, "ALTER TABLE optin_status REPLICA IDENTITY FULL")
    example = "postgresql://optsync:secret@127.0.0.1:5432/app"
    with ExampleRun("postgres.toml", example, db, tmp_path) as optsync:
        run(
            db,
            "INSERT INTO optin_status (userid, phone, optin) VALUES "
            + ", ".join(f"('{u}', '{p}', {o})" for u, p, o in SAMPLE_ROWS),
        )
        optsync.wait_for_eligible(9)
        run(
            db,
            *[f"UPDATE optin_status SET optin = 0 WHERE userid = 'user{n}'" for n in (1, 2, 3, 4)],
        )
        optsync.wait_for_eligible(5)
        run(db, "UPDATE optin_status SET optin = 0 WHERE userid = 'user5'")
        optsync.wait_for_eligible(4)
