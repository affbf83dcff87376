"""Helpers for driving the pipeline commands (``up``, ``run``, ``status``, ``dlq``) as processes.

The source is the AWS sample's ``optin_status`` table in ``FOLDER/app.db``; the engine, stream
and DLQ are read straight from their files in the data folder, so a test can check the end
state whatever happened to the process that wrote them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command

from optsync.capture.sqlite.source import CHANGE_TABLE
from optsync.sample import SAMPLE_TABLE, create_sample_database
from optsync.stream.embedded import EmbeddedStream

APP_NAME = "optin-demo"
EndpointRow = tuple[str, str, str]
"""(endpoint id, Address, OptOut)."""

MAPPING = f"""
[[mapping]]
table = "{SAMPLE_TABLE}"
channel = "SMS"
address = "phone"
user_id = "userid"
opt_in = "optin"
effective_date = "lastupdate"
"""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_sqlite3_binary() -> str:
    """The ``sqlite3`` command line shell: fails in CI when it is missing, skips elsewhere."""
    found = shutil.which("sqlite3")
    if found is None:
        message = "the sqlite3 command line shell is not installed (apt-get install sqlite3)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextmanager
def app_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of the application: autocommit, so every statement is its own transaction."""
    with closing(sqlite3.connect(path, isolation_level=None, timeout=10)) as conn:
        yield conn


@dataclass(frozen=True)
class Layout:
    """A test's files: ``folder/app.db`` (source), ``folder/data`` and ``folder/optsync.toml``."""

    folder: Path

    @property
    def source(self) -> Path:
        return self.folder / "app.db"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def config(self) -> Path:
        return self.folder / "optsync.toml"

    def write_config(self, mapping: str = MAPPING, *, api_port: int | None = None) -> Path:
        """A config like examples/sqlite.toml with absolute paths ([api] only with a port)."""
        api = f'\n[api]\nlisten = "127.0.0.1:{api_port}"\n' if api_port else ""
        self.config.write_text(
            f"data_dir = {json.dumps(str(self.data))}\n\n"
            "[source]\n"
            f"url = {json.dumps(f'sqlite:///{self.source}')}\n"
            f'tables = ["{SAMPLE_TABLE}"]\n\n'
            '[stream]\nurl = "embedded"\n\n'
            f'[engine]\nstore = "sqlite"\napp = "{APP_NAME}"\n'
            f"{api}{mapping}"
        )
        return self.config

    def create_source(self, extra_rows: Sequence[tuple[str, str, int]] = ()) -> None:
        """The sample's nine users plus ``extra_rows`` (userid, phone, optin)."""
        assert create_sample_database(self.source) is True
        with app_db(self.source) as app:
            app.execute("BEGIN")
            app.executemany(
                f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES (?, ?, ?)", extra_rows
            )
            app.execute("COMMIT")

    def source_rows(self) -> set[EndpointRow]:
        """The endpoints the engine must hold for the source table."""
        with app_db(self.source) as conn:
            rows = conn.execute(f"SELECT userid, phone, optin FROM {SAMPLE_TABLE}").fetchall()
        return {
            (f"{userid}_{phone}", phone, "ALL" if optin == 0 else "NONE")
            for userid, phone, optin in rows
        }

    def engine_rows(self) -> set[EndpointRow]:
        """Every endpoint of the app, read from ``data/engine.db``."""
        with closing(sqlite3.connect(self.data / "engine.db")) as conn:
            rows = conn.execute(
                "SELECT e.id, e.address, e.opt_out FROM endpoints e JOIN apps a "
                "ON a.id = e.app_id WHERE a.name = ?",
                (APP_NAME,),
            ).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    def dead_letters(self) -> list[tuple[int, str]]:
        """(id, reason) of the DLQ entries not replayed, or [] before the DLQ exists."""
        path = self.data / "dlq.db"
        if not path.exists():
            return []
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'dead_letters'"
            ).fetchone()
            if exists is None:
                return []
            rows = conn.execute(
                "SELECT id, reason FROM dead_letters WHERE replayed_at IS NULL ORDER BY id"
            ).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    def change_table(self) -> tuple[int, int]:
        """(largest seq issued, rows still in the change table) of the source."""
        with app_db(self.source) as conn:
            if conn.execute(
                f"SELECT 1 FROM sqlite_master WHERE name = '{CHANGE_TABLE}'"
            ).fetchone():
                issued = conn.execute(
                    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = ?), 0)",
                    (CHANGE_TABLE,),
                ).fetchone()[0]
                left = conn.execute(f"SELECT count(*) FROM {CHANGE_TABLE}").fetchone()[0]
                return int(issued), int(left)
        return 0, 0

    def stream_offsets(self) -> tuple[int, int]:
        """(head, apply's acknowledged offset) of the stream, (0, 0) before it exists."""
        path = self.data / "stream.db"
        if not path.exists():
            return 0, 0
        with closing(sqlite3.connect(path, timeout=10)) as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'consumers'").fetchone():
                return 0, 0
            head = conn.execute(
                "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'records'), 0)"
            ).fetchone()[0]
            acked = conn.execute(
                "SELECT coalesce((SELECT \"offset\" FROM consumers WHERE name = 'apply'), 0)"
            ).fetchone()[0]
        return int(head), int(acked)

    def drained(self) -> bool:
        """Capture has read and released every change; apply has acknowledged the head."""
        if not (self.data / "stream.db").exists():
            return False
        issued, left = self.change_table()
        stream = EmbeddedStream(self.data / "stream.db")
        try:
            saved = stream.checkpoint("sqlite")
            stats = stream.stats()
        finally:
            stream.close()
        if saved is None:
            return False
        state = json.loads(saved.state)
        return (
            state.get("phase") == "log"
            and (state.get("log_after") or 0) >= issued
            and left == 0
            and stats.consumers.get("apply", 0) == stats.head
        )


@dataclass
class Optsync:
    """One ``optsync`` process, its stdout and stderr in ``log``."""

    args: Sequence[str]
    log: Path
    cwd: Path
    env: dict[str, str] = field(default_factory=clean_env)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Optsync:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                [*optsync_command(), *self.args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(
                f"optsync {' '.join(self.args)} exited with code {self.process.returncode}:\n"
                f"{self.output()[-4000:]}"
            )

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.process is not None
        with suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Ctrl-C (SIGINT), then SIGKILL if it does not end within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    process: Optsync | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took. Fails on timeout."""
    started = time.monotonic()
    while not condition():
        if process is not None:
            process.check_alive()
        if time.monotonic() - started > timeout:
            tail = f"\noptsync output:\n{process.output()[-4000:]}" if process else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(interval)
    return time.monotonic() - started


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``optsync ARGS`` to completion, output captured (wide, so tables do not wrap)."""
    return subprocess.run(
        [*optsync_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(COLUMNS="400"),
        cwd=cwd,
        check=False,
    )
