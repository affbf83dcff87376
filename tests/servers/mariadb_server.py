"""A private MariaDB server for tests and benchmarks: free port, temporary data folder.

``MariaDBServer`` runs Debian's ``/usr/sbin/mariadbd`` with the settings optsync's MySQL
capture needs (row binlog with full images and column metadata, GTID strict mode), on
127.0.0.1 and a free port, with its data folder, socket and logs in a temporary folder that
``stop`` deletes. It never reads the machine's option files (``--no-defaults``), so the
machine's own MariaDB (port 3306, its my.cnf) is left alone.

The ``mariadb`` fixture (session-scoped; import ``mariadb_fixture`` into a test module to
register it) starts one per test session. When the binaries are missing the tests are skipped,
except under ``CI=true``, where they fail: a CI run that silently skipped the MariaDB suite
would prove nothing. The server gets SIGTERM if the process that started it dies, so a killed
test run leaves no server behind (its temporary folder stays).

Use as a plain module too (``bench/mysql.py``)::

    with MariaDBServer.started(durable=True) as server:
        conn = server.connect()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pymysql
import pytest
from ports import free_port

__all__ = ("INSTALL_DB", "MARIADBD", "MariaDBServer", "mariadb_fixture", "require_binaries")

MARIADBD = Path(os.environ.get("OPTSYNC_TEST_MARIADBD", "/usr/sbin/mariadbd"))
INSTALL_DB = Path(os.environ.get("OPTSYNC_TEST_MARIADB_INSTALL_DB", "/usr/bin/mariadb-install-db"))
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1

CAPTURE_SETTINGS: tuple[str, ...] = (
    "--log-bin",
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
    "--server-id=1",
    "--gtid-strict-mode=ON",
)
"""The my.cnf lines docs/mysql.md asks for, as command-line options."""


def require_binaries() -> None:
    """Skip (fail under ``CI=true``) when the MariaDB server binaries are not installed."""
    missing = [str(p) for p in (MARIADBD, INSTALL_DB) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = (
        f"MariaDB server binaries missing ({', '.join(missing)}): "
        "install Debian's mariadb-server package (make test does)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when its parent dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class MariaDBServer:
    """One private ``mariadbd``; ``root`` connects through the socket without a password."""

    def __init__(self, folder: Path, port: int, extra: Sequence[str] = ()) -> None:
        self.folder = folder
        self.datadir = folder / "data"
        self.socket = folder / "mariadb.sock"
        self.log = folder / "error.log"
        self.port = port
        self.host = "127.0.0.1"
        self.extra = tuple(extra)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    @contextlib.contextmanager
    def started(
        cls, *, durable: bool = False, extra: Sequence[str] = ()
    ) -> Iterator[MariaDBServer]:
        """A started server, stopped and deleted on exit.

        ``durable``: ``sync_binlog=1`` and ``innodb_flush_log_at_trx_commit=1`` (benchmarks);
        tests run with both relaxed, since they kill optsync, never the server.
        """
        folder = Path(tempfile.mkdtemp(prefix="optsync-mariadb-"))
        flush = ("--sync-binlog=1", "--innodb-flush-log-at-trx-commit=1")
        if not durable:
            flush = ("--sync-binlog=0", "--innodb-flush-log-at-trx-commit=2")
        server = cls(folder, free_port(), (*flush, *extra))
        try:
            server.start()
            yield server
        finally:
            server.stop()
            shutil.rmtree(folder, ignore_errors=True)

    def start(self) -> None:
        self.datadir.mkdir(parents=True)
        install = subprocess.run(
            [
                str(INSTALL_DB),
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            capture_output=True,
            check=False,
            timeout=START_TIMEOUT,
        )
        if install.returncode != 0:
            raise RuntimeError(
                f"mariadb-install-db failed ({install.returncode}): "
                f"{install.stderr.decode(errors='replace')[-2000:]}"
            )
        self._launch()

    def restart(self) -> None:
        """Stop the server (SIGTERM, a clean shutdown) and start it again on the same port and
        data folder, as after a crash or a maintenance restart (tests/chaos)."""
        self.stop()
        self._launch()

    def _launch(self) -> None:
        command = [
            str(MARIADBD),
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--log-basename=optsync",  # first: it renames every log, --log-bin's files too
            f"--socket={self.socket}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            f"--pid-file={self.folder / 'mariadb.pid'}",
            f"--log-error={self.log}",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=512M",
            "--innodb-log-file-size=256M",
            "--max-connections=200",
            "--user=root",
            *CAPTURE_SETTINGS,
            *self.extra,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - a signal setting, no locks taken
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited ({self.process.returncode}): {self._tail()}")
            try:
                self.connect().close()
                return
            except pymysql.err.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mariadbd did not start in time: {self._tail()}") from None
                time.sleep(0.1)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no error log)"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def connect(self, database: str | None = None, **options: Any) -> pymysql.Connection[Any]:
        """A root connection through the socket (autocommit).

        The socket is probed first: when its connect fails (no socket file yet, or a server
        starting, stopped or restarting), pymysql leaves its own socket unclosed (a
        ResourceWarning that fails whichever test the garbage collector runs in).
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError as exc:
                raise pymysql.err.OperationalError(
                    2002, f"Can't connect to MariaDB through socket {self.socket} ({exc})"
                ) from None
        return pymysql.connect(
            unix_socket=str(self.socket),
            user="root",
            database=database,
            autocommit=True,
            charset="utf8mb4",
            **options,
        )

    def url(self, user: str, password: str, database: str, scheme: str = "mariadb") -> str:
        return f"{scheme}://{user}:{password}@{self.host}:{self.port}/{database}"

    def execute(self, *statements: str, database: str | None = None) -> None:
        """Run statements as root, each committing on its own."""
        with contextlib.closing(self.connect(database)) as conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)


@pytest.fixture(scope="session", name="mariadb")
def mariadb_fixture() -> Iterator[MariaDBServer]:
    """One private MariaDB for the test session."""
    require_binaries()
    with MariaDBServer.started() as server:
        yield server
