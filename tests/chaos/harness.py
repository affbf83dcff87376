"""Chaos runs: random source changes while the roles are SIGKILLed and the servers restarted,
then a check that nothing was lost, nothing diverged and no consent history is out of order.

One run (``run_chaos``) starts its own private servers (the source database, nats-server and
the PostgreSQL engine; the launchers of ``tests/servers``), one ``optsync capture``, two
``optsync apply`` and one ``optsync serve`` as real processes, and three actors:

- the **load generator** (a thread) inserts rows, flips opt-ins, changes addresses and user ids
  and deletes rows, a few per source transaction; it reconnects after a source restart and
  counts only committed changes;
- the **controller** (the calling thread) SIGKILLs a random role at random moments and starts it
  again, and restarts the source database and nats-server a few times; a role that exits by
  itself is started again too (counted as ``crashes``);
- the **checker** runs after the load stops and the roles have caught up. It reads the source
  table and the engine itself (never through ``optsync reconcile``, so that it can judge it):

  - ``lost``: a source row with no endpoint, or an endpoint with no source row;
  - ``divergent``: an endpoint whose OptOut, Address or User.UserId differs from its row;
  - ``out_of_order``: an endpoint whose consent history (entries caused by the source, by
    ``seq``) holds a source position not greater than the one before it, or an OptOut NONE
    entry recorded after an OptOut ALL entry of a newer source position.

The mapping is the AWS sample's: endpoint id ``{userid}_{phone}``, OptOut ALL when optin = 0.
Positions are order-preserving text, so they are compared as strings.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVERS = Path(__file__).resolve().parents[1] / "servers"
if str(SERVERS) not in sys.path:
    sys.path.insert(0, str(SERVERS))

import psycopg2  # noqa: E402
import pymysql  # noqa: E402
from mariadb_server import MariaDBServer  # noqa: E402
from nats_server import NatsServer  # noqa: E402
from nats_server import running_server as running_nats  # noqa: E402
from ports import free_port  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402
from postgres_server import running_server as running_postgres  # noqa: E402

from optsync.engine.models import CauseKind, ConsentChange, EndpointStatus, OptOut  # noqa: E402
from optsync.engine.postgres import PostgresStore  # noqa: E402
from optsync.engine.store import EndpointStore  # noqa: E402
from optsync.errors import NotFound, Retryable  # noqa: E402
from optsync.redaction import mask  # noqa: E402

__all__ = (
    "ChaosPlan",
    "Figures",
    "check_history",
    "differences",
    "history_problem",
    "stranded",
    "run_chaos",
)

APP = "chaos"
KEY_ID, SECRET = "CHAOSKEY", "chaos-test-secret"
CONSOLE_SECRET = "chaos-test-console-secret-0123456789"
ROLES = ("capture", "apply-1", "apply-2", "serve-1")
AREAS = ("206", "425", "253", "360", "509", "971")

Row = tuple[str, str, int]
"""userid, phone, optin: one source row as the checker compares it."""


def phone(n: int) -> str:
    """A fresh, possible US number for counter ``n`` (never reused within a run)."""
    return f"+1{AREAS[n // 10000 % len(AREAS)]}555{n % 10000:04d}"


def endpoint_id(userid: str, number: str) -> str:
    return f"{userid}_{number}"


@dataclass(frozen=True)
class ChaosPlan:
    """What one run does: on which source, how many kills and server restarts, how fast."""

    source: str  # "mariadb" | "postgres"
    kills: int
    source_restarts: int = 1
    nats_restarts: int = 1
    rows: int = 150
    seed: int = 1
    kill_gap: tuple[float, float] = (0.3, 1.6)
    """Seconds between kills, drawn uniformly."""
    catch_up: float = 120.0
    """Seconds the roles get to catch up after the load stops."""


@dataclass
class Figures:
    """The outcome of one run (or the sum of several)."""

    kills: int = 0
    restarts: int = 0
    changes: int = 0
    lost: int = 0
    divergent: int = 0
    out_of_order: int = 0
    crashes: int = 0
    inactive: int = 0
    """Opted-in rows whose endpoint is INACTIVE with no ACTIVE endpoint at its address (not
    eligible: the same-address rule without its fallback; one of the zeros)."""
    reconcile_exit: int | None = None
    """``optsync reconcile``'s exit code at the end (0: it found no drift either)."""
    reconcile_said: str = ""
    endpoints: int = 0
    history_entries: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Nothing lost, divergent, out of order or left INACTIVE, and reconcile agrees."""
        zeros = (self.lost, self.divergent, self.out_of_order, self.inactive)
        return zeros == (0, 0, 0, 0) and self.reconcile_agrees

    @property
    def reconcile_agrees(self) -> bool:
        """``optsync reconcile`` found no drift either (or was not run)."""
        return self.reconcile_exit in (None, 0)

    def line(self) -> str:
        """The one line ``make chaos`` prints."""
        return (
            f"kills={self.kills} restarts={self.restarts} changes={self.changes} "
            f"lost={self.lost} divergent={self.divergent} out_of_order={self.out_of_order} "
            f"inactive={self.inactive}"
        )

    def detail(self) -> str:
        return (
            f"crashes={self.crashes} endpoints={self.endpoints} "
            f"history_entries={self.history_entries} reconcile_exit={self.reconcile_exit} "
            f"seconds={self.seconds:.0f}"
        )

    def add(self, other: Figures) -> None:
        """Add the counts of ``other`` (reconcile's verdict stays with each run's figures)."""
        for name in (
            "kills",
            "restarts",
            "changes",
            "lost",
            "divergent",
            "out_of_order",
            "crashes",
            "inactive",
            "endpoints",
            "history_entries",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.seconds += other.seconds
        self.problems += other.problems


# sources --------------------------------------------------------------------------------------
class Source(ABC):
    """The application database: the sample's ``optin_status`` table on a private server."""

    url: str

    @abstractmethod
    def connect(self) -> Any:
        """A DB-API connection (``%s`` parameters), not in autocommit."""

    @abstractmethod
    def restart(self) -> None: ...

    def rows(self) -> dict[str, Row]:
        """endpoint id -> row, as the source holds them now."""
        with contextlib.closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute("SELECT userid, phone, optin FROM optin_status")
            found = {endpoint_id(u, p): (str(u), str(p), int(o)) for u, p, o in cur.fetchall()}
            conn.rollback()
        return found


class MariaDBSource(Source):
    def __init__(self, server: MariaDBServer) -> None:
        self.server = server
        server.execute(
            "CREATE DATABASE app",
            "CREATE TABLE app.optin_status (userid VARCHAR(64), phone VARCHAR(32), "
            "optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
            "CREATE USER 'optsync'@'%' IDENTIFIED BY 'secret'",
            "GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'optsync'@'%'",
        )
        self.url = server.url("optsync", "secret", "app")

    def connect(self) -> Any:
        return pymysql.connect(
            host=self.server.host,
            port=self.server.port,
            user="optsync_writer",
            password="secret",
            database="app",
            autocommit=False,
            connect_timeout=5,
        )

    def grant_writer(self) -> None:
        self.server.execute(
            "CREATE USER 'optsync_writer'@'%' IDENTIFIED BY 'secret'",
            "GRANT ALL ON app.* TO 'optsync_writer'@'%'",
        )

    def restart(self) -> None:
        self.server.restart()


class PostgresSource(Source):
    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        server.sql("CREATE DATABASE app")
        with contextlib.closing(server.connect(db="app")) as conn, conn.cursor() as cur:
            cur.execute(
                "CREATE TABLE optin_status (userid VARCHAR(64), phone VARCHAR(32), "
                "optin SMALLINT, lastupdate TIMESTAMPTZ DEFAULT now())"
            )
            cur.execute("ALTER TABLE optin_status REPLICA IDENTITY FULL")
        self.url = server.url(db="app")

    def connect(self) -> Any:
        return psycopg2.connect(self.url, connect_timeout=5)

    def restart(self) -> None:
        self.server.restart()


# load generator --------------------------------------------------------------------------------
class LoadGenerator(threading.Thread):
    """Random inserts, opt-in flips, address changes, user-id changes and deletes, one to three
    per transaction, until stopped. Survives source restarts: after any error it reconnects
    and reloads its view of the table (a commit whose outcome is unknown is not counted)."""

    def __init__(self, source: Source, seed: int, rows: int) -> None:
        super().__init__(name="chaos-load", daemon=True)
        self.source = source
        self.rng = random.Random(seed)
        self.target_rows = rows
        self.users: dict[str, tuple[str, int]] = {}
        self.next_user = 0
        self.next_phone = 0
        self.changes = 0
        self.errors = 0
        self.ids: set[str] = set()
        """Every endpoint id the load may have made (for the history check)."""
        self.stopping = threading.Event()
        self.failure: BaseException | None = None

    def fresh_user(self) -> str:
        self.next_user += 1
        return f"u{self.next_user}"

    def fresh_phone(self) -> str:
        self.next_phone += 1
        return phone(self.next_phone)

    def seed_rows(self) -> None:
        """The rows the snapshot reads, in one transaction."""
        with contextlib.closing(self.source.connect()) as conn:
            cur = conn.cursor()
            for _ in range(self.target_rows):
                user, number, optin = self.fresh_user(), self.fresh_phone(), self.rng.randint(0, 1)
                cur.execute(
                    "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, %s)",
                    (user, number, optin),
                )
                self.users[user] = (number, optin)
                self.ids.add(endpoint_id(user, number))
            conn.commit()
        self.changes += self.target_rows

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)

    def run(self) -> None:
        conn: Any = None
        try:
            while not self.stopping.is_set():
                try:
                    if conn is None:
                        conn = self.source.connect()
                        self.reload(conn)
                    self.transaction(conn)
                except (pymysql.err.Error, psycopg2.Error, OSError):
                    self.errors += 1
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                    self.stopping.wait(0.2)
                    continue
                self.stopping.wait(self.rng.uniform(0.0, 0.02))
        except BaseException as exc:  # reported by the controller
            self.failure = exc
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def reload(self, conn: Any) -> None:
        cur = conn.cursor()
        cur.execute("SELECT userid, phone, optin FROM optin_status")
        self.users = {str(u): (str(p), int(o)) for u, p, o in cur.fetchall()}
        conn.rollback()

    def transaction(self, conn: Any) -> None:
        cur = conn.cursor()
        after = dict(self.users)
        count = 0
        for _ in range(self.rng.randint(1, 3)):
            count += self.operation(cur, after)
        conn.commit()
        self.users = after
        self.changes += count

    def operation(self, cur: Any, users: dict[str, tuple[str, int]]) -> int:
        """One random change to ``users`` (the view after this transaction); rows changed."""
        roll = self.rng.random()
        if not users or (roll < 0.2 and len(users) < self.target_rows * 1.3):
            user, number, optin = self.fresh_user(), self.fresh_phone(), self.rng.randint(0, 1)
            cur.execute(
                "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, %s)",
                (user, number, optin),
            )
            users[user] = (number, optin)
            self.ids.add(endpoint_id(user, number))
            return 1
        user = self.rng.choice(sorted(users))
        number, optin = users[user]
        if roll < 0.6:
            cur.execute("UPDATE optin_status SET optin = %s WHERE userid = %s", (1 - optin, user))
            users[user] = (number, 1 - optin)
        elif roll < 0.75:
            number = self.fresh_phone()
            cur.execute("UPDATE optin_status SET phone = %s WHERE userid = %s", (number, user))
            users[user] = (number, optin)
            self.ids.add(endpoint_id(user, number))
        elif roll < 0.85:
            renamed = self.fresh_user()
            cur.execute("UPDATE optin_status SET userid = %s WHERE userid = %s", (renamed, user))
            del users[user]
            users[renamed] = (number, optin)
            self.ids.add(endpoint_id(renamed, number))
        elif len(users) > self.target_rows * 0.7:
            cur.execute("DELETE FROM optin_status WHERE userid = %s", (user,))
            del users[user]
        else:
            return 0
        return int(cur.rowcount)


# roles -----------------------------------------------------------------------------------------
class Roles:
    """The optsync processes of the run, each started from its own config file."""

    def __init__(self, folder: Path, configs: dict[str, str]) -> None:
        self.folder = folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {label: free_port() for label in ROLES if label.startswith("serve")}
        self.crashes = 0
        for role, text in configs.items():
            (folder / f"{role}.toml").write_text(text)

    def start(self, label: str) -> None:
        role = label.split("-")[0]
        command = [str(Path(sys.executable).with_name("optsync")), role]
        command += ["--config", str(self.folder / f"{role}.toml")]
        if role == "serve":
            command += ["--port", str(self.ports[label])]
        env = {
            **os.environ,
            "OPTSYNC_DATA_DIR": str(self.folder / f"data-{label}"),
            "OPTSYNC_API_CREDENTIALS": f"{KEY_ID}:{SECRET}",
            "OPTSYNC_CONSOLE_SECRET": CONSOLE_SECRET,
        }
        with (self.folder / f"{label}.log").open("ab") as log:
            self.processes[label] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def kill(self, label: str) -> None:
        process = self.processes[label]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def revive(self) -> None:
        """Start again every role that exited by itself (a supervisor's job)."""
        for label, process in self.processes.items():
            if process.poll() is not None:
                self.crashes += 1
                self.start(label)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def reconcile(self) -> tuple[int, str]:
        """``optsync reconcile`` over the run's source and engine: exit code and last line."""
        command = [str(Path(sys.executable).with_name("optsync")), "reconcile"]
        command += ["--config", str(self.folder / "reconcile.toml")]
        env = {**os.environ, "OPTSYNC_DATA_DIR": str(self.folder / "data-reconcile")}
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=120, check=False
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("reconcile:")]
        lines = lines or (done.stdout + done.stderr).strip().splitlines()
        return done.returncode, lines[-1] if lines else ""

    def log_tails(self) -> str:
        return "\n".join(
            f"--- {label}\n{(self.folder / f'{label}.log').read_text(errors='replace')[-1500:]}"
            for label in self.processes
        )

    def serving(self, label: str) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports[label]}/healthz"
            with urllib.request.urlopen(url, timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


def configs(source_url: str, nats: NatsServer, engine_url: str, stream: str) -> dict[str, str]:
    """Each role's config, and reconcile's (the source, the engine and the mapping)."""
    stream_table = f'[stream]\nurl = "{nats.url}"\nname = "{stream}"\npartitions = 4\n'
    engine_table = f'[engine]\nurl = "{engine_url}"\napp = "{APP}"\n'
    source_table = f'[source]\nurl = "{source_url}"\ntables = ["optin_status"]\n'
    mapping = (
        '[[mapping]]\ntable = "optin_status"\naddress = "phone"\nuser_id = "userid"\n'
        'opt_in = "optin"\neffective_date = "lastupdate"\n'
    )
    return {
        "capture": source_table + stream_table,
        "apply": stream_table + engine_table + mapping,
        "serve": engine_table,
        "reconcile": source_table + engine_table + mapping,
    }


# checker ---------------------------------------------------------------------------------------
def history_problem(history: list[ConsentChange]) -> str | None:
    """Why this endpoint's consent history is out of source order, or None when it is not."""
    entries = sorted((c for c in history if c.cause.kind is CauseKind.SOURCE), key=lambda c: c.seq)
    newest_all: str | None = None
    previous: str | None = None
    for change in entries:
        position = change.cause.ref
        if change.opt_out_after is OptOut.NONE and newest_all is not None and newest_all > position:
            return f"OptOut NONE at {position} recorded after OptOut ALL at {newest_all}"
        if previous is not None and position <= previous:
            return f"position {position} recorded after {previous}"
        if change.opt_out_after is OptOut.ALL and (newest_all is None or position > newest_all):
            newest_all = position
        previous = position
    return None


def differences(source: dict[str, Row], store: EndpointStore) -> tuple[list[str], list[str]]:
    """(lost, divergent): one description per endpoint, addresses left out."""
    app = store.find_app(APP)
    engine = {} if app is None else {e.id: e for e in store.iter_endpoints(app.id)}
    lost = [f"{key}: no endpoint" for key in source if key not in engine]
    lost += [f"{key}: no source row" for key in engine if key not in source]
    divergent = []
    for key, (userid, number, optin) in source.items():
        endpoint = engine.get(key)
        if endpoint is None:
            continue
        wanted = OptOut.NONE if optin else OptOut.ALL
        if endpoint.opt_out is not wanted:
            divergent.append(f"{key}: OptOut {endpoint.opt_out} but optin={optin}")
        if endpoint.address != number:
            divergent.append(f"{key}: the address differs")
        if endpoint.user_id != userid:
            divergent.append(f"{key}: UserId {endpoint.user_id} but userid={userid}")
    return lost, divergent


def stranded(source: dict[str, Row], store: EndpointStore, ids: set[str]) -> list[str]:
    """Opted-in rows whose endpoint is INACTIVE while no endpoint holds its address ACTIVE,
    each with the source history of every endpoint the run made at that address (masked)."""
    app = store.find_app(APP)
    if app is None:
        return []
    found = []
    for key, (_, number, optin) in source.items():
        try:
            endpoint = store.get_endpoint(app.id, key)
        except NotFound:
            continue
        if not optin or endpoint.endpoint_status is not EndpointStatus.INACTIVE:
            continue
        holders = store.find_endpoints(app.id, number)
        if any(e.endpoint_status is EndpointStatus.ACTIVE for e in holders):
            continue
        story = []
        for other in sorted(i for i in ids if i.endswith(f"_{number}")):
            with contextlib.suppress(NotFound):
                steps = [
                    f"{c.cause.ref}:{c.opt_out_after}#{c.seq}"
                    for c in store.consent_history(app.id, other)
                    if c.cause.kind is CauseKind.SOURCE
                ]
                story.append(f"{mask(other)} [{' '.join(steps)}]")
        found.append(f"{mask(key)}: INACTIVE, address held by none; {'; '.join(story)}")
    return found


def check_history(store: EndpointStore, ids: set[str]) -> tuple[list[str], int]:
    """(out-of-order descriptions, history entries checked) over every id the run made."""
    app = store.find_app(APP)
    if app is None:
        return ([f"app {APP} missing"], 0)
    problems: list[str] = []
    entries = 0
    for key in sorted(ids):
        try:
            history = store.consent_history(app.id, key)
        except NotFound:
            continue
        entries += sum(1 for c in history if c.cause.kind is CauseKind.SOURCE)
        problem = history_problem(history)
        if problem is not None:
            problems.append(f"{key}: {problem}")
    return problems, entries


# the run ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def servers(kind: str) -> Iterator[tuple[Source, PostgresServer, NatsServer]]:
    """The source, the engine's PostgreSQL (the PostgreSQL source shares it) and nats-server."""
    with running_postgres() as postgres, running_nats() as nats:
        if kind == "postgres":
            yield PostgresSource(postgres), postgres, nats
            return
        with MariaDBServer.started() as mariadb:
            source = MariaDBSource(mariadb)
            source.grant_writer()
            yield source, postgres, nats


def wait_for(what: str, check: Callable[[], bool], timeout: float, roles: Roles) -> None:
    """Poll ``check`` (restarting roles that exit) until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (psycopg2.Error, pymysql.err.Error, OSError, Retryable):
            pass  # a server still coming back
        roles.revive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def run_chaos(plan: ChaosPlan, folder: Path, say: Callable[[str], None] = print) -> Figures:
    """One chaos run on ``plan.source``; the figures (``problems`` names each failure)."""
    started = time.monotonic()
    figures = Figures()
    rng = random.Random(plan.seed)
    with servers(plan.source) as (source, postgres, nats):
        postgres.sql("CREATE DATABASE engine")
        engine_url = postgres.url(db="engine")
        roles = Roles(folder, configs(source.url, nats, engine_url, f"chaos{plan.seed}"))
        load = LoadGenerator(source, plan.seed, plan.rows)
        load.seed_rows()
        try:
            for label in ROLES:
                roles.start(label)
            load.start()
            # Server restarts come at random kills, never before the first one.
            events = ["source"] * plan.source_restarts + ["nats"] * plan.nats_restarts
            schedule: dict[int, list[str]] = {}
            for event in events:
                at = rng.randrange(1, plan.kills) if plan.kills > 1 else 0
                schedule.setdefault(at, []).append(event)
            for n in range(plan.kills):
                time.sleep(rng.uniform(*plan.kill_gap))
                roles.revive()
                label = rng.choice(ROLES)
                roles.kill(label)
                figures.kills += 1
                roles.start(label)
                for event in schedule.get(n, []):
                    if event == "source":
                        source.restart()
                    else:
                        nats.restart(down_for=rng.uniform(0.2, 1.0))
                    figures.restarts += 1
                if load.failure is not None:
                    raise load.failure
                if (n + 1) % 10 == 0:
                    say(f"  {plan.source}: {n + 1} kills, {load.changes} changes")
            load.stop()
            figures.changes = load.changes
            truth = source.rows()
            store = PostgresStore(engine_url)
            try:

                def caught_up() -> bool:
                    lost, divergent = differences(truth, store)
                    return not lost and not divergent

                with contextlib.suppress(AssertionError):
                    wait_for("the engine to catch up", caught_up, plan.catch_up, roles)
                lost, divergent = differences(truth, store)
                out_of_order, entries = check_history(store, load.ids | set(truth))
                inactive = stranded(truth, store, load.ids)
            finally:
                store.close()
            figures.reconcile_exit, figures.reconcile_said = roles.reconcile()
            wait_for("serve-1 to answer", lambda: roles.serving("serve-1"), 60, roles)
            figures.lost, figures.divergent = len(lost), len(divergent)
            figures.out_of_order = len(out_of_order)
            figures.endpoints, figures.history_entries = len(truth), entries
            figures.inactive = len(inactive)
            figures.problems = [*lost, *divergent, *out_of_order][:20]
            figures.problems += inactive[:5]
            if not figures.reconcile_agrees:
                figures.problems.append(f"optsync reconcile: {figures.reconcile_said}")
            if not figures.clean:
                figures.problems.append(roles.log_tails())
        finally:
            if load.is_alive():
                load.stop()
            figures.crashes = roles.crashes
            roles.stop_all()
    figures.seconds = time.monotonic() - started
    return figures
