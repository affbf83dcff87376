"""A private AWS stand-in (moto in server mode) for Kinesis and S3 tests, on a free port.

``moto_server`` comes with the ``moto`` dev dependency and implements Kinesis (shards,
resharding, GetRecords) and S3 from botocore's own service models; the tests drive it with the
real boto3 client, never a mock in the same process. It keeps everything in memory, so
``reset()`` (moto's ``/moto-api/reset``) gives a test an empty account.

Use the session fixture ``aws_server_fixture`` (import it into a test module to register it; it
is named ``aws_server``), or ``running_server()`` as a context manager outside pytest.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ports import free_port

__all__ = ("AwsServer", "aws_server_fixture", "running_server")

READY_TIMEOUT = 30.0
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
"""moto accepts any key; these keep boto3 from looking for real ones."""


@dataclass
class AwsServer:
    """A running ``moto_server``; ``endpoint_url`` is where boto3 clients point."""

    port: int
    folder: Path
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "moto.log"

    def env(self) -> dict[str, str]:
        """Environment variables that point the AWS SDK (and optsync) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, service: str) -> Any:
        """A real boto3 client of ``service`` bound to this server."""
        import boto3

        return boto3.client(
            service, region_name=REGION, endpoint_url=self.endpoint_url, **CREDENTIALS
        )

    def start(self) -> None:
        binary = Path(sys.executable).parent / "moto_server"
        if not binary.is_file():
            raise RuntimeError(f"{binary} is missing: run `make test`, which installs moto")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(binary), "-H", self.host, "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

    def reset(self) -> None:
        """Forget every stream, shard, bucket and object."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self._log_tail()}")
            try:
                with urllib.request.urlopen(
                    f"{self.endpoint_url}/moto-api/data.json", timeout=2
                ) as response:
                    response.read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise RuntimeError(f"moto_server not ready after {READY_TIMEOUT} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextmanager
def running_server() -> Iterator[AwsServer]:
    folder = Path(tempfile.mkdtemp(prefix="optsync-moto-"))
    server = AwsServer(port=free_port(), folder=folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", name="aws_server")
def aws_server_fixture() -> Iterator[AwsServer]:
    with running_server() as server:
        yield server
