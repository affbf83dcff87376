"""``optsync run --config examples/<source>.toml`` as a user runs it, for the capture tests.

The example file is copied with its source URL, data folder and API port pointed at the test's
private server and folders; the CLI runs as a child process (capture in its own process, apply
and the API in the main one) and the test reads the sample users' endpoints through boto3.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import boto3
import botocore.config
import pytest
from ports import free_port

EXAMPLES = Path(__file__).parents[2] / "examples"
KEY_ID, SECRET = "RUNKEY", "runsecret"
TIMEOUT = 30.0


class ExampleRun:
    """``optsync run`` on a copy of ``examples/<name>`` with ``source_url`` put in its place."""

    def __init__(self, name: str, example_url: str, source_url: str, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        text = (EXAMPLES / name).read_text()
        replacements: Mapping[str, str] = {
            example_url: source_url,
            'data_dir = "optsync-data"': f'data_dir = "{folder / "data"}"',
            'listen = "127.0.0.1:8080"': f'listen = "127.0.0.1:{self.port}"',
        }
        for old, new in replacements.items():
            assert old in text, f"examples/{name} no longer holds {old!r}"
            text = text.replace(old, new)
        self.config = folder / name
        self.config.write_text(text)
        self.log_path = folder / "run.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ExampleRun:
        script = Path(sys.executable).with_name("optsync")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(script), "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OPTSYNC_API_CREDENTIALS": f"{KEY_ID}:{SECRET}"},
            )
        self.client = boto3.client(
            "pinpoint",
            endpoint_url=f"http://127.0.0.1:{self.port}",
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def eligible(self) -> int | None:
        """Endpoints of user1-user9 with OptOut NONE, through the API (None: not all there)."""
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"optsync run exited {self.process.returncode}: {self.output()}")
        try:
            apps = self.client.get_apps()["ApplicationsResponse"].get("Item", [])
            (app_id,) = [a["Id"] for a in apps if a["Name"] == "optin-demo"]
            opted = []
            for n in range(1, 10):
                endpoint_id = f"user{n}_+1234111111{n}"
                response = self.client.get_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
                opted.append(response["EndpointResponse"]["OptOut"])
        except Exception:  # not serving yet, or not applied yet: ask again
            return None
        return opted.count("NONE")

    def wait_for_eligible(self, count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while (seen := self.eligible()) != count:
            assert time.monotonic() < deadline, f"eligible {seen}, expected {count}"
            time.sleep(0.1)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.client.close()
        process = self.process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if kind is not None:
            return
        output = self.output()
        # uvicorn shuts down, then re-raises the signal: ending by SIGTERM is the normal end.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "Traceback" not in output, output
        assert "capture process exited" not in output, output
        assert "+12341111111" not in output  # no phone numbers in the logs
