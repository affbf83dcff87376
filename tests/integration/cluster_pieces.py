"""The scale-out roles as a user runs them: ``optsync capture``, ``apply`` and ``serve`` processes
on a private nats-server and PostgreSQL, each with a config that holds only its own sections.

The source is a SQLite application database with the AWS sample's ``optin_status`` table (the
capture reads it through its triggers and change table), so a test can write to it directly.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from nats_server import NatsServer
from ports import free_port
from postgres_server import PostgresServer

from optsync.engine.models import OptOut
from optsync.engine.postgres import PostgresStore
from optsync.errors import NotFound
from optsync.sample import SAMPLE_DDL

KEY_ID, SECRET = "CLUSTERKEY", "cluster-test-secret"
CONSOLE_SECRET = "cluster-test-console-secret-0123456789"
APP = "optin-demo"
TIMEOUT = 60.0


def phone(n: int) -> str:
    return f"+1206555{n:04d}"


def endpoint_id(n: int) -> str:
    return f"user{n}_{phone(n)}"


class Cluster:
    """Configs for each role, the source database, and the processes started from them."""

    def __init__(
        self, folder: Path, nats: NatsServer, postgres: PostgresServer, *, partitions: int = 4
    ) -> None:
        self.folder = folder
        self.nats = nats
        self.postgres = postgres
        self.database = f"cluster_{folder.name.lower().replace('-', '_')}"[:60]
        postgres.sql(f'CREATE DATABASE "{self.database}"')
        self.engine_url = postgres.url(db=self.database)
        self.stream_name = f"s{abs(hash(str(folder))) % 10**9}"
        self.app_db = folder / "app.db"
        with closing(sqlite3.connect(self.app_db, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(SAMPLE_DDL)
        stream = (
            f'[stream]\nurl = "{nats.url}"\nname = "{self.stream_name}"\n'
            f"partitions = {partitions}\n"
        )
        self.configs = {
            "capture": (
                f'[source]\nurl = "sqlite:///{self.app_db}"\ntables = ["optin_status"]\n{stream}'
            ),
            "apply": (
                f'{stream}[engine]\nurl = "{self.engine_url}"\napp = "{APP}"\n'
                '[[mapping]]\ntable = "optin_status"\naddress = "phone"\nuser_id = "userid"\n'
                'opt_in = "optin"\neffective_date = "lastupdate"\n'
            ),
            "serve": f'[engine]\nurl = "{self.engine_url}"\napp = "{APP}"\n',
        }
        for role, text in self.configs.items():
            (folder / f"{role}.toml").write_text(text)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    # roles ------------------------------------------------------------------------------------
    def start(self, label: str, *args: str) -> None:
        """Start ``optsync <role> --config <role>.toml`` as ``label`` (e.g. apply-2)."""
        role = label.split("-")[0]
        command = [str(Path(sys.executable).with_name("optsync")), role]
        command += ["--config", str(self.folder / f"{role}.toml"), *args]
        if role == "serve":
            self.ports.setdefault(label, free_port())
            command += ["--port", str(self.ports[label])]
        env = {
            **os.environ,
            "OPTSYNC_DATA_DIR": str(self.folder / f"data-{label}"),
            "OPTSYNC_API_CREDENTIALS": f"{KEY_ID}:{SECRET}",
            "OPTSYNC_CONSOLE_SECRET": CONSOLE_SECRET,
        }
        with (self.folder / f"{label}.log").open("ab") as log:
            self.processes[label] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def kill(self, label: str) -> None:
        process = self.processes.pop(label)
        process.send_signal(signal.SIGKILL)
        process.wait()

    def stop(self, label: str) -> int:
        process = self.processes.pop(label)
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{label} did not stop on SIGINT within 20 s") from None

    def stop_all(self) -> None:
        for label in list(self.processes):
            process = self.processes[label]
            if process.poll() is None:
                self.stop(label)
            else:
                self.processes.pop(label)

    def log(self, label: str) -> str:
        return (self.folder / f"{label}.log").read_text(errors="replace")

    def check_running(self) -> None:
        for label, process in self.processes.items():
            if process.poll() is not None:
                raise AssertionError(
                    f"{label} exited with {process.returncode}:\n{self.log(label)[-3000:]}"
                )

    # source -----------------------------------------------------------------------------------
    @contextmanager
    def source(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.app_db, isolation_level=None, timeout=30)) as conn:
            yield conn

    def source_state(self) -> dict[int, int]:
        """user number -> optin of the userN rows, as the application database holds them."""
        with self.source() as conn:
            rows = conn.execute(
                "SELECT userid, optin FROM optin_status WHERE userid GLOB 'user[0-9]*'"
            ).fetchall()
        return {int(userid.removeprefix("user")): int(optin) for userid, optin in rows}

    # engine -----------------------------------------------------------------------------------
    @contextmanager
    def engine(self) -> Iterator[PostgresStore]:
        store = PostgresStore(self.engine_url)
        try:
            yield store
        finally:
            store.close()

    def engine_state(self, store: PostgresStore, users: int) -> dict[int, int] | None:
        """user number -> optin (1 for OptOut NONE) for users 1..users; None if one is missing."""
        app = store.find_app(APP)
        if app is None:
            return None
        state: dict[int, int] = {}
        for n in range(1, users + 1):
            try:
                endpoint = store.get_endpoint(app.id, endpoint_id(n))
            except NotFound:
                return None
            state[n] = 1 if endpoint.opt_out is OptOut.NONE else 0
        return state

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> float:
        """Poll ``check`` until true; returns the seconds it took. Fails naming ``what``."""
        started = time.monotonic()
        while not check():
            self.check_running()
            if time.monotonic() - started > timeout:
                logs = "\n".join(
                    f"--- {label}\n{self.log(label)[-1500:]}" for label in self.processes
                )
                raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
            time.sleep(0.1)
        return time.monotonic() - started

    def wait_listening(self, label: str, timeout: float = TIMEOUT) -> float:
        """Wait until the serve role ``label`` accepts connections on its port."""

        def accepts() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.ports[label]), timeout=1).close()
            except OSError:
                return False
            return True

        return self.wait_for(f"{label} to listen", accepts, timeout)

    def wait_converged(self, users: int, timeout: float = TIMEOUT) -> float:
        """Wait until the engine holds every user with the source's opt-in."""
        with self.engine() as store:

            def same() -> bool:
                return self.engine_state(store, users) == self.source_state()

            return self.wait_for("the engine to equal the source", same, timeout)
