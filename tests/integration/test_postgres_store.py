"""``PostgresStore`` against a real server: migrations, collation, durability, errors, and the
races of several writers on one app (docs/engine.md, "PostgreSQL store: concurrent writers").

Each race runs several ``PostgresStore`` objects (each with its own connection pool, as separate
apply workers and API servers have) in threads that start together on a barrier, and then
checks the invariant in the tables.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from typing import Any

import psycopg
import pytest
from postgres_server import PostgresServer
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

from optsync.apply.dlq.postgres import PostgresDeadLetterQueue
from optsync.engine.endpoints import MAX_ENDPOINTS_PER_USER
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointDelete,
    EndpointPatch,
    OptOut,
)
from optsync.engine.postgres import MIGRATIONS, PostgresStore
from optsync.engine.postgres_database import migrate, translate_error
from optsync.engine.segments import definition_from_wire, definition_to_wire
from optsync.engine.segments.stored import FORMAT_VERSION
from optsync.engine.store import ImportDefinition
from optsync.errors import ConfigError, Fatal, LimitExceeded, NotFound, Retryable

pytestmark = pytest.mark.integration

API = Cause(CauseKind.API, "req")
WRITERS = 6
_names = itertools.count()


@pytest.fixture
def database(postgres: PostgresServer) -> Iterator[str]:
    """A new empty database with an en-US (ICU) default collation, as production servers have."""
    name = f"engine_{next(_names)}"
    icu = "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    url = postgres.create_database(name, options=icu)
    try:
        yield url
    finally:
        postgres.drop_database(name)


def side(url: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement on a connection of the test's own."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return list(cur.fetchall()) if cur.description is not None else []


def run_together(workers: Sequence[Callable[[], None]]) -> list[BaseException]:
    """Run the callables in threads released at once; the errors they raised."""
    start = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(work: Callable[[], None]) -> None:
        try:
            start.wait()
            work()
        except BaseException as exc:  # collected for the test to assert on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    return errors


@pytest.fixture
def stores(database: str) -> Iterator[list[PostgresStore]]:
    """``WRITERS`` stores on one database, as many processes would open."""
    opened = [PostgresStore(database, pool_size=2) for _ in range(WRITERS)]
    try:
        yield opened
    finally:
        for store in opened:
            store.close()


# schema ---------------------------------------------------------------------------------------


def test_stores_starting_together_migrate_once(database: str) -> None:
    opened: list[PostgresStore] = []
    lock = threading.Lock()

    def start() -> None:
        store = PostgresStore(database, pool_size=1)
        with lock:
            opened.append(store)

    errors = run_together([start] * 5)
    for store in opened:
        store.close()
    assert errors == []
    assert len(opened) == 5
    versions = side(database, "SELECT component, version FROM schema_version ORDER BY 1, 2")
    assert versions == [("engine", m.version) for m in MIGRATIONS]


def test_a_newer_schema_is_refused(database: str) -> None:
    PostgresStore(database).close()
    side(
        database,
        "INSERT INTO schema_version (component, version, summary) VALUES ('engine', 99, 'x')",
    )
    with pytest.raises(ConfigError, match=r"schema version 99.*upgrade optsync"):
        PostgresStore(database)


def test_engine_and_dlq_share_one_database(database: str) -> None:
    with closing(PostgresStore(database)) as store, closing(PostgresDeadLetterQueue(database)):
        store.create_app("a")
    versions = side(database, "SELECT component, version FROM schema_version ORDER BY 1, 2")
    assert versions == [("dlq", 1), *(("engine", m.version) for m in MIGRATIONS)]


def test_an_engine_of_version_1_gets_the_consent_ledger(database: str) -> None:
    """A database written before the ledger: its history keeps its rows and gains the columns."""
    with psycopg.connect(database, autocommit=True) as conn:
        migrate(conn, "engine", MIGRATIONS[:1], database, "engine database")
        conn.execute(
            "INSERT INTO apps (id, name, creation_date, tags, seq) VALUES "
            "('a1', 'old', '2026-01-01T00:00:00.000Z', '{}', nextval('apps_seq'))"
        )
        conn.execute(
            "INSERT INTO consent_history (app_id, endpoint_key, endpoint_id, at, opt_out_before, "
            "opt_out_after, address, cause_kind, cause_ref) VALUES ('a1', 'e1', 'e1', "
            "'2026-01-01T00:00:00.000Z', NULL, 'ALL', '+12065550100', 'api', 'r1')"
        )
    with closing(PostgresStore(database)) as store:
        (old,) = store.consent_changes("a1", 0, 10)
        assert (old.opt_out_after, old.cause.detail, old.channel_type) == (OptOut.ALL, "", None)
        assert store.claim_lease("sink:x", "me", 10)


def test_an_engine_of_version_2_keeps_its_segments_and_gains_import_segments(
    database: str,
) -> None:
    """A database migrated before IMPORT segments: its dimensional segment stays as it was."""
    with closing(PostgresStore(database)) as store:
        app = store.create_app("old")
        kept = store.create_segment(app.id, definition_from_wire({"Name": "us"}, require_name=True))
    with psycopg.connect(database, autocommit=True) as conn:
        # Back to version 2: as a release before IMPORT segments left it.
        conn.execute("DROP TABLE segment_members")
        for column in ("import_format", "import_url", "import_external_id", "import_size"):
            conn.execute(f"ALTER TABLE segments DROP COLUMN {column}")
        conn.execute("DELETE FROM schema_version WHERE component = 'engine' AND version >= 3")
    with closing(PostgresStore(database)) as store:
        again = store.get_segment(app.id, kept.id)
        assert (again.segment_type, again.import_definition) == ("DIMENSIONAL", None)
        store.write_endpoints(
            app.id,
            [EndpointPatch("e1", channel_type=ChannelType.SMS, address="+12065550100")],
            Cause(CauseKind.API, "r1"),
        )
        imported = store.create_import_segment(
            app.id, "file", ["E1", "missing"], ImportDefinition("CSV", "s3://b/k", size=2)
        )
        assert imported.segment_type == "IMPORT"
        assert store.estimate(app.id, imported.id).total == 1
    versions = side(database, "SELECT version FROM schema_version WHERE component = 'engine'")
    assert [v[0] for v in versions] == [m.version for m in MIGRATIONS]


def test_an_engine_of_version_3_gets_its_segment_definitions_in_the_stored_form(
    database: str,
) -> None:
    """Every version of every segment, as Pinpoint's JSON, converted by migration 4."""
    with closing(PostgresStore(database)) as store:
        app = store.create_app("old")
        store.write_endpoints(
            app.id,
            [
                EndpointPatch("e1", channel_type=ChannelType.SMS, address="+12065550100"),
                EndpointPatch("e2", channel_type=ChannelType.SMS, address="+33612345678"),
            ],
            Cause(CauseKind.API, "r1"),
        )
        imported = store.create_import_segment(
            app.id, "file", ["E1", "e2"], ImportDefinition("CSV", "s3://b/k", size=2)
        )
        us = {"Location": {"Country": {"Values": ["US"]}}}
        kept = store.create_segment(
            app.id, definition_from_wire({"Name": "us", "Dimensions": us}, require_name=True)
        )
        groups = {"Groups": [{"SourceSegments": [{"Id": imported.id}], "Type": "ALL"}]}
        store.update_segment(
            app.id, kept.id, definition_from_wire({"SegmentGroups": groups}, require_name=False)
        )
        segments = [
            store.get_segment(app.id, kept.id, 1),
            store.get_segment(app.id, kept.id, 2),
            store.get_segment(app.id, imported.id),
        ]
        estimates = [store.estimate(app.id, s.id, s.version) for s in segments]
    assert [e.total for e in estimates] == [1, 2, 2]
    with psycopg.connect(database, autocommit=True) as conn:
        # Back to version 3: the definition column as Pinpoint's JSON of the filter.
        for segment in segments:
            conn.execute(
                "UPDATE segments SET definition = %s WHERE id = %s AND version = %s",
                (json.dumps(definition_to_wire(segment.definition)), segment.id, segment.version),
            )
        conn.execute("DELETE FROM schema_version WHERE component = 'engine' AND version >= 4")
    with closing(PostgresStore(database)) as store:
        assert [store.get_segment(app.id, s.id, s.version) for s in segments] == segments
        assert [store.estimate(app.id, s.id, s.version) for s in segments] == estimates
    stored = side(database, "SELECT definition FROM segments")
    assert len(stored) == 3
    assert all(json.loads(text)["v"] == FORMAT_VERSION for (text,) in stored)
    versions = side(database, "SELECT version FROM schema_version WHERE component = 'engine'")
    assert [v[0] for v in versions] == [m.version for m in MIGRATIONS]


def test_a_segment_definition_of_a_newer_format_is_refused(database: str) -> None:
    with closing(PostgresStore(database)) as store:
        app = store.create_app("new")
        kept = store.create_segment(app.id, definition_from_wire({"Name": "x"}, require_name=True))
        side(database, "UPDATE segments SET definition = '{\"v\": 2}'")
        with pytest.raises(ConfigError, match=r"format version 2.*upgrade optsync"):
            store.get_segment(app.id, kept.id)


def test_every_text_column_compares_bytes(database: str) -> None:
    PostgresStore(database).close()
    (provider,) = side(
        database, "SELECT datlocprovider FROM pg_database WHERE datname = current_database()"
    )
    assert provider == ("i",), "the test database should collate like en-US by default"
    columns = side(
        database,
        "SELECT c.relname, a.attname, co.collname FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_collation co ON co.oid = a.attcollation "
        "WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped "
        "AND a.atttypid = 'text'::regtype",
    )
    positions = {(t, c) for t, c, _ in columns} & {
        ("endpoints", "source_position"),
        ("tombstones", "position"),
    }
    assert len(positions) == 2
    assert [(t, c, coll) for t, c, coll in columns if coll != "C"] == []
    # In this database a plain comparison orders by the locale; the columns' own by bytes.
    assert side(database, "SELECT 'p-B' < 'p-a', 'p-B' < 'p-a' COLLATE \"C\"") == [(False, True)]


# races of concurrent writers ------------------------------------------------------------------


def test_concurrent_writers_never_give_a_user_more_than_15_endpoints(
    stores: list[PostgresStore], database: str
) -> None:
    app = stores[0].create_app("cap").id
    users = [f"user{u}" for u in range(3)]
    per_writer = 5  # 6 writers x 5 = 30 attempts per user for 15 places
    refused: list[int] = []

    def writer(w: int) -> Callable[[], None]:
        def work() -> None:
            for user in users:
                for i in range(per_writer):
                    eid = f"{user}-w{w}-{i}"
                    patch = EndpointPatch(
                        id=eid,
                        channel_type=ChannelType.SMS,
                        address=f"+1206555{w}{i}{users.index(user)}00",
                        user_id=user,
                    )
                    try:
                        stores[w].write_endpoints(app, [patch], API)
                    except LimitExceeded:
                        refused.append(w)

        return work

    assert run_together([writer(w) for w in range(WRITERS)]) == []
    counts = side(
        database,
        "SELECT user_id, COUNT(*) FROM endpoints WHERE app_id = %s GROUP BY 1 ORDER BY 1",
        (app,),
    )
    assert counts == [(u, MAX_ENDPOINTS_PER_USER) for u in users]
    assert len(refused) == len(users) * (WRITERS * per_writer - MAX_ENDPOINTS_PER_USER)
    for user in users:
        assert len(stores[1].get_user_endpoints(app, user)) == MAX_ENDPOINTS_PER_USER


def test_concurrent_writers_leave_one_active_endpoint_per_address(
    stores: list[PostgresStore], database: str
) -> None:
    app = stores[0].create_app("address").id
    addresses = ["+12065550100", "+12065550101", "+12065550102"]

    def writer(w: int) -> Callable[[], None]:
        rng = random.Random(w)

        def work() -> None:
            for i in range(15):
                address = rng.choice(addresses)
                # New endpoints and moves of existing ones to another address.
                eid = f"w{w}-{i}" if i % 3 else f"w{w}-0"
                patch = EndpointPatch(id=eid, channel_type=ChannelType.SMS, address=address)
                stores[w].write_endpoints(app, [patch], API)

        return work

    assert run_together([writer(w) for w in range(WRITERS)]) == []
    active = side(
        database,
        "SELECT address, COUNT(*) FILTER (WHERE status = 'ACTIVE'), COUNT(*) FROM endpoints "
        "WHERE app_id = %s GROUP BY 1 ORDER BY 1",
        (app,),
    )
    assert [a for a, _, _ in active] == addresses
    assert [n for _, n, _ in active] == [1, 1, 1]
    assert sum(total for _, _, total in active) > len(addresses)  # there were peers to deactivate
    # The rollup agrees with the endpoints it counts.
    rollup = side(
        database,
        "SELECT status, SUM(n) FROM endpoint_counts WHERE app_id = %s GROUP BY 1 ORDER BY 1",
        (app,),
    )
    direct = side(
        database,
        "SELECT status, COUNT(*) FROM endpoints WHERE app_id = %s GROUP BY 1 ORDER BY 1",
        (app,),
    )
    assert rollup == direct


def test_concurrent_writers_keep_the_newest_position(
    stores: list[PostgresStore], database: str
) -> None:
    app = stores[0].create_app("positions").id
    endpoints = ["alice", "bob"]
    positions = [f"{n:06d}" for n in range(1, 121)]

    def op(eid: str, position: str) -> EndpointPatch | EndpointDelete:
        n = int(position)
        if n % 7 == 0:
            return EndpointDelete(eid, position)
        opt_out = OptOut.ALL if n % 2 else OptOut.NONE
        return EndpointPatch(
            id=eid,
            channel_type=ChannelType.SMS,
            address=f"+1206555{endpoints.index(eid)}100",
            opt_out=opt_out,
            position=position,
        )

    shuffled = positions[:]
    random.Random(7).shuffle(shuffled)
    shares = [shuffled[w::WRITERS] for w in range(WRITERS)]
    outcomes: list[tuple[int, int]] = []

    def writer(w: int) -> Callable[[], None]:
        def work() -> None:
            for position in shares[w]:
                for eid in endpoints:
                    result = stores[w].write_endpoints(
                        app, [op(eid, position)], Cause(CauseKind.SOURCE, position)
                    )
                    outcomes.append((result.applied + result.missing, result.stale))

        return work

    assert run_together([writer(w) for w in range(WRITERS)]) == []
    assert len(outcomes) == len(positions) * len(endpoints)
    assert sum(stale for _, stale in outcomes) > 0  # older positions did arrive late
    newest = positions[-1]  # 000120: an upsert (120 % 7 != 0), OptOut NONE (even)
    for eid in endpoints:
        endpoint = stores[0].get_endpoint(app, eid)
        assert (endpoint.source_position, endpoint.opt_out) == (newest, OptOut.NONE)
    # The same with a delete as the newest write: the endpoint stays deleted.
    last = "000126"  # 126 = 7 x 18
    run_together([lambda: stores[2].write_endpoints(app, [op("alice", last)], API)])
    late = stores[3].write_endpoints(app, [op("alice", "000125")], API)
    assert late.stale == 1
    with pytest.raises(NotFound):
        stores[4].get_endpoint(app, "alice")
    assert side(database, "SELECT position FROM tombstones WHERE app_id = %s", (app,)) == [(last,)]


def test_threads_sharing_stores_write_new_endpoints_with_distinct_keys(
    stores: list[PostgresStore], database: str
) -> None:
    """API server threads share a store (group commit, pooled connections) across apps."""
    apps = [stores[0].create_app(f"app{n}").id for n in range(3)]

    def writer(t: int) -> Callable[[], None]:
        store = stores[t % 3]  # two threads per store

        def work() -> None:
            for i in range(20):
                app = apps[(t + i) % len(apps)]
                batch = [
                    EndpointPatch(
                        id=f"t{t}-{i}-{k}",
                        channel_type=ChannelType.EMAIL,
                        address=f"t{t}-{i}-{k}@example.com",
                        attributes={"plan": ("gold",)},
                    )
                    for k in range(5)
                ]
                assert store.write_endpoints(app, batch, API).applied == 5
                assert store.get_endpoint(app, f"t{t}-{i}-0").address == f"t{t}-{i}-0@example.com"

        return work

    assert run_together([writer(t) for t in range(6)]) == []
    assert sum(stores[5].count_endpoints(a) for a in apps) == 6 * 20 * 5
    (keys,) = side(database, "SELECT COUNT(DISTINCT pk), COUNT(*), MAX(pk) FROM endpoints")
    assert keys[0] == keys[1] == 600
    assert keys[2] < 1 << 62  # no provisional key was written
    attribute_keys = side(
        database,
        "SELECT COUNT(*) FROM endpoint_attributes a LEFT JOIN endpoints e ON e.pk = a.endpoint_pk "
        "WHERE e.pk IS NULL OR e.app_id <> a.app_id",
    )
    assert attribute_keys == [(0,)]


# durability -----------------------------------------------------------------------------------


def test_non_durable_writes_are_visible_at_once_and_durable_after_sync(database: str) -> None:
    with closing(PostgresStore(database)) as writer, closing(PostgresStore(database)) as reader:
        app = writer.create_app("durability").id
        patch = EndpointPatch(id="e1", channel_type=ChannelType.SMS, address="+12065550100")
        writer.write_endpoints(app, [patch], API, durable=False)
        assert reader.get_endpoint(app, "e1").address == "+12065550100"
        (written,) = side(database, "SELECT pg_current_wal_insert_lsn()")
        writer.sync()
        (flushed,) = side(database, "SELECT pg_current_wal_flush_lsn() >= %s", written)
        assert flushed == (True,)
        marks = side(database, "SELECT holder, synced_at FROM engine_sync")
        assert len(marks) == 1
        writer.sync()  # nothing written since: no commit
        assert side(database, "SELECT holder, synced_at FROM engine_sync") == marks
        reader.sync()  # this one never wrote without durability
        assert len(side(database, "SELECT holder FROM engine_sync")) == 1
    assert side(database, "SELECT holder FROM engine_sync") == []


# errors ---------------------------------------------------------------------------------------


def test_wrong_password_is_a_config_error_without_the_password(
    postgres: PostgresServer, database: str
) -> None:
    postgres.sql("DO $$ BEGIN CREATE ROLE pw_user LOGIN PASSWORD 'right-pw'; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")  # fmt: skip
    postgres.require_password("pw_user")
    db = database.rsplit("/", 1)[1]
    url = postgres.url("pw_user", "s3cret-wrong", db=db)
    with pytest.raises(ConfigError) as caught:
        PostgresStore(url)
    message = str(caught.value)
    assert "s3cret-wrong" not in message
    assert "password" in message and "correct the password in the URL" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="correct the password") as dlq_error:
        PostgresDeadLetterQueue(url)
    assert "s3cret-wrong" not in str(dlq_error.value)


def test_missing_database_and_role_are_config_errors(postgres: PostgresServer) -> None:
    with pytest.raises(ConfigError, match="does not exist: create the database"):
        PostgresStore(postgres.url(db="no_such_db"))
    with pytest.raises(ConfigError, match="create the role"):
        PostgresStore(postgres.url(user="no_such_role"))


def test_missing_privilege_is_a_config_error_naming_the_grant(
    postgres: PostgresServer, database: str
) -> None:
    postgres.sql("DO $$ BEGIN CREATE ROLE weak_user LOGIN; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")  # fmt: skip
    db = database.rsplit("/", 1)[1]
    with pytest.raises(ConfigError, match=r"permission denied.*CREATE on its schema"):
        PostgresStore(postgres.url("weak_user", db=db))
    side(database, "GRANT CREATE ON SCHEMA public TO weak_user")
    PostgresStore(postgres.url("weak_user", db=db)).close()  # the fix named works


def test_no_server_is_retryable(postgres: PostgresServer) -> None:
    with pytest.raises(Retryable, match="will be retried"):
        PostgresStore(f"postgresql://postgres:pw@127.0.0.1:{postgres.port + 1}/x?connect_timeout=2")


def test_lost_connections_are_retryable_and_the_next_call_works(database: str) -> None:
    with closing(PostgresStore(database, pool_size=2)) as store:
        app = store.create_app("a").id
        patch = EndpointPatch(id="e1", channel_type=ChannelType.SMS, address="+12065550100")
        store.write_endpoints(app, [patch], API)
        # An administrator (or a failover) ends every session of the store.
        side(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'optsync-engine'",
        )
        with pytest.raises(Retryable, match="will be retried") as caught:
            store.write_endpoints(app, [patch], API)
        assert isinstance(caught.value.__cause__, psycopg.Error)
        for _ in range(3):  # the pool replaces the dead connections it still holds
            try:
                assert store.get_endpoint(app, "e1").address == "+12065550100"
                break
            except Retryable:
                continue
        else:
            pytest.fail("the store did not recover after its connections were ended")
        assert store.write_endpoints(app, [patch], API).applied == 1


def test_server_side_races_translate_to_retryable(database: str) -> None:
    """A deadlock, a write to a read-only (standby-like) session and a bad statement, as the
    server raises them."""
    side(database, "CREATE TABLE race (id int PRIMARY KEY, n int)")
    side(database, "INSERT INTO race VALUES (1, 0), (2, 0)")
    with psycopg.connect(database) as a, psycopg.connect(database) as b:
        a.execute("UPDATE race SET n = 1 WHERE id = 1")
        b.execute("UPDATE race SET n = 1 WHERE id = 2")
        errors: list[Exception] = []

        def cross(conn: psycopg.Connection[Any], row: int) -> None:
            try:
                conn.execute("UPDATE race SET n = 2 WHERE id = %s", (row,))
            except psycopg.Error as exc:
                errors.append(exc)

        thread = threading.Thread(target=cross, args=(a, 2))
        thread.start()
        cross(b, 1)
        thread.join(30)
    assert len(errors) == 1
    translated = translate_error(errors[0], database, "engine database")
    assert isinstance(translated, Retryable)
    assert "40P01" in str(translated) and "will be retried" in str(translated)
    with psycopg.connect(database) as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        with pytest.raises(psycopg.Error) as read_only:
            conn.execute("UPDATE race SET n = 3")
    assert isinstance(translate_error(read_only.value, database, "engine database"), Retryable)
    with psycopg.connect(database) as conn, pytest.raises(psycopg.Error) as bug:
        conn.execute("SELEC 1")  # a statement optsync got wrong: no retry will help
    fatal = translate_error(bug.value, database, "engine database")
    assert type(fatal) is Fatal and "42601" in str(fatal)
    assert fatal.__cause__ is bug.value
