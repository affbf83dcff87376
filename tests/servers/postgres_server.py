"""A private PostgreSQL cluster for tests and benchmarks: ``initdb`` + ``pg_ctl`` on a free port.

The cluster lives in a temporary folder with ``wal_level=logical`` and room for replication slots;
it is stopped and deleted afterwards. The machine's own PostgreSQL (and its settings) is never
touched. PostgreSQL refuses to run as root, so under root the server binaries run as the
``postgres`` system user (``runuser``), which is given the temporary folder.

Use the session fixture ``postgres_fixture`` (import it into a test module to register it; it
is named ``postgres``), or ``running_server()`` as a context manager outside pytest.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from ports import free_port

__all__ = (
    "PostgresServer",
    "find_binaries",
    "postgres_fixture",
    "require_binaries",
    "running_server",
)

SERVER_USER = "postgres"
SETTINGS = (
    "wal_level=logical",
    "max_replication_slots=10",
    "max_wal_senders=10",
    "fsync=on",
)


def find_binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl, if any."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


@dataclass
class PostgresServer:
    """A running private cluster; ``url()`` gives a ``postgresql://`` URL for a role."""

    port: int
    folder: Path
    bin_dir: Path

    host: str = "127.0.0.1"
    options: str = ""
    """The server's command-line options (port, socket folder, settings), for ``start``."""

    def url(self, user: str = "postgres", password: str | None = None, db: str = "postgres") -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    def connect(self, user: str = "postgres", db: str = "postgres") -> Any:
        """An autocommit psycopg2 connection."""
        conn = psycopg2.connect(self.url(user, db=db))
        conn.autocommit = True
        return conn

    def sql(self, statement: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; its rows (empty when it returns none)."""
        with closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall()) if cur.description is not None else []

    def set_config(self, name: str, value: str | None) -> None:
        """``ALTER SYSTEM SET`` (or ``RESET`` for None) and reload the configuration."""
        if value is None:
            self.sql(f"ALTER SYSTEM RESET {name}")
        else:
            self.sql(f"ALTER SYSTEM SET {name} = '{value}'")
        self.sql("SELECT pg_reload_conf()")
        time.sleep(0.2)  # the postmaster signals the backends; give them a moment

    def create_database(self, name: str, template: str | None = None, options: str = "") -> str:
        """``CREATE DATABASE name`` (copied from ``template``, with extra ``options``); its URL."""
        copy = f" TEMPLATE {template}" if template else ""
        self.sql(f"CREATE DATABASE {name}{copy} {options}")
        return self.url(db=name)

    def drop_database(self, name: str) -> None:
        """Drop the database, ending any session still connected to it."""
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def require_password(self, user: str) -> None:
        """Make ``user`` log in with a password over TCP (every other user stays trusted)."""
        hba = self.folder / "data" / "pg_hba.conf"
        rule = f"host all {user} 127.0.0.1/32 scram-sha-256\n"
        if rule not in hba.read_text():
            hba.write_text(rule + hba.read_text())  # the first matching line wins
        self.sql("SELECT pg_reload_conf()")
        time.sleep(0.2)  # the postmaster rereads pg_hba.conf on the signal

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def restart(self) -> None:
        """Stop the server (fast: every connection is cut) and start it again, same port and
        data, as after a crash or a failover."""
        self._pg_ctl("restart")

    def stop(self) -> None:
        """Stop the server (fast: every connection is cut); ``start`` brings it back."""
        self._pg_ctl("stop")

    def start(self) -> None:
        """Start the stopped server again, same port and data; returns once it answers."""
        self._pg_ctl("start")

    def _pg_ctl(self, action: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data")]
        command += ["-o", self.options] if action == "start" else ["-m", "fast"]
        # -l again: without it the new postmaster writes to our pipe and run() never returns.
        command += ["-l", str(self.log_path), "-w", "-t", "60", action]
        subprocess.run(_as_server_user(command), check=True, capture_output=True)


def _as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


def _give_to_server_user(folder: Path) -> None:
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(SERVER_USER)
    for root, dirs, files in os.walk(folder):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


@contextmanager
def running_server(extra_settings: Sequence[str] = ()) -> Iterator[PostgresServer]:
    """Start a private cluster; stop it and delete its folder on exit."""
    bin_dir = find_binaries()
    if bin_dir is None:
        raise FileNotFoundError(
            "PostgreSQL server binaries are missing (/usr/lib/postgresql/*/bin/initdb): "
            "apt-get install postgresql, or run scripts/ensure-test-tools.sh"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise FileNotFoundError(
                f"running as root but there is no {SERVER_USER!r} system user to run the server"
            ) from exc
    folder = Path(tempfile.mkdtemp(prefix="optsync-pg-"))
    data, sockets = folder / "data", folder / "sock"
    sockets.mkdir()
    _give_to_server_user(folder)
    port = free_port()
    server = PostgresServer(port=port, folder=folder, bin_dir=bin_dir)
    started = False
    try:
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        options = " ".join(
            [f"-p {port}", f"-k {sockets}", "-c listen_addresses=127.0.0.1"]
            + [f"-c {s}" for s in (*SETTINGS, *extra_settings)]
        )
        server.options = options
        subprocess.run(
            _as_server_user(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(server.log_path),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )
        started = True
        yield server
    except subprocess.CalledProcessError as exc:
        log = server.log_path.read_text() if server.log_path.exists() else ""
        raise RuntimeError(
            f"the private PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{log}"
        ) from exc
    finally:
        if started:
            subprocess.run(
                _as_server_user(
                    [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
                ),
                check=False,
                capture_output=True,
            )
        shutil.rmtree(folder, ignore_errors=True)


def require_binaries() -> None:
    """Skip the calling test without server binaries; fail it instead under CI=true."""
    if find_binaries() is None:
        message = (
            "PostgreSQL server binaries are missing (/usr/lib/postgresql/*/bin/initdb); "
            "`make test` installs them (scripts/ensure-test-tools.sh)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[PostgresServer]:
    """A private cluster for the whole test session (skipped without binaries, failed in CI)."""
    require_binaries()
    with running_server() as server:
        yield server
