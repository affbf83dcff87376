"""``optsync reconcile`` over every source kind: drift made behind the pipeline's back is found
and ``--repair`` removes it through the position guard.

Each test runs the real pipeline pieces (the configured source, the embedded stream, apply into
the configured engine) until caught up, then makes drift two ways: endpoints changed through the
engine's API path (an opt-out, an address taken and given back, leaving the first holder
INACTIVE), and source rows changed while capture was stopped, with the log they went to dropped
(SQLite: the change rows; MariaDB: the binlog purged; PostgreSQL: the slot dropped) and the
capture checkpoint removed. ``optsync reconcile`` (the CLI, in a subprocess) must report the
drift and exit 1, ``--repair`` must write it, a second run must find none, and the engine must
equal the source. Finally capture starts again and a change made after a repair must win over
it (its log position is greater than the repair's).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from mariadb_server import MariaDBServer
from mariadb_server import mariadb_fixture as _mariadb_fixture  # noqa: F401 (the fixture)
from postgres_server import PostgresServer
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, open_dlq, open_source, open_store, open_stream
from optsync.config import Settings, load_settings
from optsync.engine.models import (
    Cause,
    CauseKind,
    EndpointPatch,
    EndpointStatus,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore
from optsync.engine.store import EndpointStore
from optsync.pipeline import SYNC_SECONDS, ensure_app
from optsync.stream.base import Checkpoint

pytestmark = pytest.mark.integration

USER, PASSWORD = "optsync", "secret"
USERS = [(f"user{n}", f"+1234111111{n}") for n in range(1, 10)]
"""The AWS sample's nine users, all opted in."""
API = Cause(CauseKind.API, "test-request", "an API client, behind the pipeline's back")


@dataclass
class Source:
    """One source database as the application sees it."""

    kind: str
    url: str
    execute: Callable[[str, tuple[Any, ...]], None]
    drop_log: Callable[[], None]
    rows: Callable[[], list[tuple[str, str, int]]]
    """(userid, phone, optin) of every row."""


# -- sources ---------------------------------------------------------------------------------


def _sqlite_source(folder: Path) -> Source:
    path = folder / "app.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE optin_status (userid TEXT, phone TEXT, optin INTEGER, lastupdate TEXT)"
        )

    def execute(sql: str, params: tuple[Any, ...]) -> None:
        with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
            conn.execute(sql, params)

    def drop_log() -> None:
        execute("DELETE FROM _optsync_changes", ())

    def rows() -> list[tuple[str, str, int]]:
        with closing(sqlite3.connect(path)) as conn:
            return list(conn.execute("SELECT userid, phone, optin FROM optin_status"))

    return Source("sqlite", f"sqlite:///{path}", execute, drop_log, rows)


def _mariadb_source(server: MariaDBServer, db: str, *, keyed: bool) -> Source:
    server.execute(
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{USER}'@'%'",
        f"DROP DATABASE IF EXISTS {db}",
        f"CREATE DATABASE {db}",
    )
    key = "id INT AUTO_INCREMENT PRIMARY KEY, " if keyed else ""  # keyless: the AWS sample's
    server.execute(
        f"CREATE TABLE optin_status ({key}userid VARCHAR(64), phone VARCHAR(32), optin TINYINT(1))",
        database=db,
    )

    def execute(sql: str, params: tuple[Any, ...]) -> None:
        with closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)

    def drop_log() -> None:
        # A new binlog file, and every older one purged: the changes above are gone from it.
        with closing(server.connect()) as conn, conn.cursor() as cur:
            cur.execute("FLUSH BINARY LOGS")
            cur.execute("SHOW BINARY LOGS")
            last = cur.fetchall()[-1][0]
            cur.execute(f"PURGE BINARY LOGS TO '{last}'")

    def rows() -> list[tuple[str, str, int]]:
        with closing(server.connect(db)) as conn, conn.cursor() as cur:
            cur.execute("SELECT userid, phone, optin FROM optin_status")
            return [(u, p, int(o)) for u, p, o in cur.fetchall()]

    return Source("mariadb", server.url(USER, PASSWORD, db), execute, drop_log, rows)


def _postgres_source(server: PostgresServer, db: str) -> Source:
    server.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    server.sql(f"CREATE DATABASE {db}")
    url = server.url(db=db)

    def execute(sql: str, params: tuple[Any, ...]) -> None:
        with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            conn.commit()

    execute(
        "CREATE TABLE optin_status (userid text, phone text, optin int, "
        "lastupdate timestamptz DEFAULT now())",
        (),
    )
    execute("ALTER TABLE optin_status REPLICA IDENTITY FULL", ())  # no key: read whole again

    def drop_log() -> None:
        server.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s",
            (db,),
        )

    def rows() -> list[tuple[str, str, int]]:
        with closing(psycopg2.connect(url)) as conn, conn.cursor() as cur:
            cur.execute("SELECT userid, phone, optin FROM optin_status")
            return list(cur.fetchall())

    return Source("postgres", url, execute, drop_log, rows)


# -- the pipeline ----------------------------------------------------------------------------


def write_config(folder: Path, source: Source, engine_url: str | None) -> Path:
    engine = f'url = "{engine_url}"\n' if engine_url else ""
    path = folder / "optsync.toml"
    path.write_text(
        f'data_dir = "{folder / "data"}"\n\n'
        f'[source]\nurl = "{source.url}"\ntables = ["optin_status"]\n'
        f'name = "rc_{source.kind}"\n\n'
        f'[engine]\napp = "optin-demo"\n{engine}\n'
        '[[mapping]]\ntable = "optin_status"\naddress = "phone"\nuser_id = "userid"\n'
        'opt_in = "optin"\n'
    )
    return path


def catch_up(settings: Settings) -> None:
    """Capture until the log is idle, then apply every record: the engine has the source."""
    source, stream = open_source(settings), open_stream(settings)
    saved = stream.checkpoint(source.name)
    last = saved.state if saved else None
    try:
        source.open(last)
        idle = 0
        deadline = time.monotonic() + 60
        batches = source.batches(1000)
        for batch in batches:
            assert time.monotonic() < deadline, "capture did not catch up"
            if batch.events or batch.state != last:
                stream.append(batch.events, Checkpoint(source.name, batch.state))
                source.acknowledge(batch.state)
                last = batch.state
            in_log = '"phase":"log"' in batch.state
            idle = idle + 1 if in_log and not batch.events else 0
            if idle >= 3:
                break
        batches.close()  # ends the log reader's connection before the source closes
    finally:
        source.close()
    store, dlq = open_store(settings), open_dlq(settings)
    try:
        app = ensure_app(store, settings.app)
        worker = ApplyWorker(
            stream,
            Mapper(mapping_rules(settings.mappings)),
            store,
            app.id,
            dlq,
            sync_interval=SYNC_SECONDS,
        )
        while worker.step(1000, wait=0.0):
            pass
    finally:
        dlq.close()
        store.close()
        stream.close()


def forget_checkpoint(settings: Settings) -> None:
    """What an operator does when the log is gone: capture starts over with a new snapshot."""
    with closing(sqlite3.connect(settings.stream_path)) as conn:
        conn.execute("DELETE FROM checkpoints")
        conn.commit()


def reconcile(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "optsync", "reconcile", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def engine_rows(store: EndpointStore, app_id: str) -> set[tuple[str, str | None, OptOut, bool]]:
    return {
        (e.id, e.address, e.opt_out, e.endpoint_status is EndpointStatus.ACTIVE)
        for e in store.iter_endpoints(app_id)
    }


def source_truth(source: Source) -> set[tuple[str, str | None, OptOut, bool]]:
    return {(f"{u}_{p}", p, OptOut.NONE if o else OptOut.ALL, True) for u, p, o in source.rows()}


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "mariadb", "mariadb-keyless", "postgres", "postgres-engine"])
def setup(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Source, Path, Settings]]:
    kind = request.param
    db = "rc_" + re.sub(r"[^a-z0-9]+", "_", kind)
    engine_url = None
    cleanup: list[Callable[[], None]] = []
    if kind == "sqlite":
        source = _sqlite_source(tmp_path)
    elif kind.startswith("mariadb"):
        server: MariaDBServer = request.getfixturevalue("mariadb")
        source = _mariadb_source(server, db, keyed=kind == "mariadb")
        cleanup.append(lambda: server.execute(f"DROP DATABASE IF EXISTS {db}"))
    else:
        pg: PostgresServer = request.getfixturevalue("postgres")
        source = _postgres_source(pg, db)
        if kind == "postgres-engine":
            pg.sql(f"DROP DATABASE IF EXISTS {db}_engine WITH (FORCE)")
            pg.sql(f"CREATE DATABASE {db}_engine")
            engine_url = pg.url(db=f"{db}_engine")
            cleanup.append(lambda: pg.sql(f"DROP DATABASE IF EXISTS {db}_engine WITH (FORCE)"))

        def drop() -> None:
            pg.sql(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE database = %s AND NOT active",
                (db,),
            )
            pg.sql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

        cleanup.append(drop)
    config = write_config(tmp_path, source, engine_url)
    settings = load_settings(config, env={})
    yield source, config, settings
    for step in cleanup:
        step()


# -- the test --------------------------------------------------------------------------------


def test_reconcile_finds_and_repairs_drift(setup: tuple[Source, Path, Settings]) -> None:
    source, config, settings = setup
    for user, phone in USERS:
        source.execute(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (?, ?, 1)", (user, phone)
        )
    catch_up(settings)

    clean = reconcile(config)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "9 source rows, 9 engine endpoints: 0 drifting" in clean.stdout

    # Behind the pipeline's back, through the engine's API path (writes without a position):
    store = open_store(settings)
    app_id = ensure_app(store, settings.app).id
    store.write_endpoints(app_id, [EndpointPatch("user1_+12341111111", opt_out=OptOut.ALL)], API)
    # user2 made INACTIVE (as a store written before the fallback rule may hold it).
    user2 = EndpointPatch("user2_+12341111112", endpoint_status=EndpointStatus.INACTIVE)
    store.write_endpoints(app_id, [user2], API)
    assert store.get_endpoint(app_id, user2.id).endpoint_status is EndpointStatus.INACTIVE
    store.close()

    # ...and in the source while capture was stopped, with the log those changes went to gone.
    source.execute("UPDATE optin_status SET optin = 0 WHERE userid = ?", ("user3",))
    source.execute("UPDATE optin_status SET phone = ? WHERE userid = ?", ("+12349999994", "user4"))
    source.execute("DELETE FROM optin_status WHERE userid = ?", ("user5",))
    source.execute(
        "INSERT INTO optin_status (userid, phone, optin) VALUES (?, ?, 1)",
        ("user10", "+12341111120"),
    )
    source.drop_log()
    forget_checkpoint(settings)

    found = reconcile(config, "--verbose")
    assert found.returncode == 1, found.stdout + found.stderr
    out = found.stdout
    assert "drifting (extra 2, inactive 1, missing 2, opt_out 2)" in out, out
    for kind, user in [
        ("opt_out", "user1"),
        ("inactive", "user2"),
        ("opt_out", "user3"),
        ("missing", "user4"),
        ("extra", "user4"),
        ("extra", "user5"),
        ("missing", "user10"),
    ]:
        assert re.search(rf"^\s+{kind}\s+endpoint {user}_", out, re.M), (kind, user, out)
    assert "+1234111111" not in out and "+12349999994" not in out, "addresses must be masked"
    assert "intruder" not in out  # created through the API without a position: not the source's

    repaired = reconcile(config, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired: 7 writes applied, 0 skipped by the position guard" in repaired.stdout

    again = reconcile(config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "9 source rows, 9 engine endpoints: 0 drifting" in again.stdout

    store = open_store(settings)
    try:
        assert engine_rows(store, app_id) == source_truth(source)
        history = store.consent_history(app_id, "user3_+12341111113")
        assert history[-1].cause.kind is CauseKind.SOURCE
        assert history[-1].cause.ref.endswith("~reconcile")  # the repair's position
    finally:
        store.close()

    # Capture starts over (its log was gone); a change after a repair wins over the repair.
    catch_up(settings)
    store = open_store(settings)
    store.write_endpoints(app_id, [EndpointPatch("user6_+12341111116", opt_out=OptOut.ALL)], API)
    store.close()
    assert reconcile(config, "--repair").returncode == 0
    source.execute("UPDATE optin_status SET optin = 0 WHERE userid = ?", ("user6",))
    catch_up(settings)
    store = open_store(settings)
    try:
        user6 = store.get_endpoint(app_id, "user6_+12341111116")
        assert user6.opt_out is OptOut.ALL, "the log's later change must win over the repair"
        assert engine_rows(store, app_id) == source_truth(source)
    finally:
        store.close()
    final = reconcile(config)
    assert final.returncode == 0, final.stdout + final.stderr


def test_bad_usage_is_exit_2_with_one_line(tmp_path: Path) -> None:
    source = _sqlite_source(tmp_path)
    config = write_config(tmp_path, source, None)
    SQLiteStore(tmp_path / "data" / "engine.db").close()  # an engine without the app
    missing_app = reconcile(config)
    assert missing_app.returncode == 2, missing_app.stderr
    assert missing_app.stderr.strip().splitlines()[-1].startswith("Error: [engine] app ")
    text = config.read_text()
    config.write_text(text[: text.index("[[mapping]]")])
    no_rules = reconcile(config)
    assert no_rules.returncode == 2, no_rules.stderr
    assert "no [[mapping]] rule" in no_rules.stderr
    assert len(no_rules.stderr.strip().splitlines()) == 1
