"""Helpers of the end-to-end suite: the server process, signed raw HTTP, small builders.

Kept out of ``conftest.py`` so that test modules can import them by name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

REGION = "us-east-1"
KEY_ID, SECRET = "TESTKEY", "testsecret"
OTHER_KEY_ID, OTHER_SECRET = "OTHERKEY", "other-secret"
STARTUP_TIMEOUT = 20.0

ClientFactory = Callable[..., "PinpointClient"]
"""Builds a boto3 ``pinpoint`` client: ``(key_id, secret, **Config options)``."""

ISO_MILLIS_Z = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
HEX_ID = re.compile(r"[0-9a-f]{32}")


def optsync_command() -> list[str]:
    """The installed ``optsync`` console script.

    ``python -m optsync.cli`` would import the module and exit without serving: ``cli.py`` has no
    ``if __name__ == "__main__"`` guard.
    """
    script = shutil.which("optsync", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.fail(f"the optsync console script is not installed next to {sys.executable}")
    return [script]


def clean_env(**extra: str) -> dict[str, str]:
    """The current environment without any ``OPTSYNC_*`` setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSYNC_")}
    return env | extra


@dataclass(frozen=True)
class Server:
    """A running ``optsync serve``; ``log`` holds its stdout and stderr."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self) -> None:
        """Return once GET /healthz answers 200; fail with the server's output otherwise."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"optsync serve exited with code {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(
            f"optsync serve did not answer /healthz within {STARTUP_TIMEOUT:.0f} s:\n"
            f"{self.output()}"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Signed:
    """Raw HTTP to the server, SigV4-signed the way boto3 signs (for the extension routes)."""

    base_url: str
    key_id: str = KEY_ID
    secret: str = SECRET

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        params: Mapping[str, str] | None = None,
        sent_body: bytes | None = None,
    ) -> httpx.Response:
        """Sign ``body`` and send it, or send ``sent_body`` with the signature of ``body``."""
        url = httpx.URL(self.base_url + path, params=dict(params or {}))
        aws = AWSRequest(method=method, url=str(url), data=body)
        if body:
            aws.headers["Content-Type"] = "application/json"
        SigV4Auth(Credentials(self.key_id, self.secret), "mobiletargeting", REGION).add_auth(aws)
        headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in aws.headers.items()}
        content = body if sent_body is None else sent_body
        return httpx.request(method, url, content=content, headers=headers, timeout=10.0)

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """GET ``path`` and return its JSON body, failing with the body unless it is a 200."""
        response = self.request("GET", path, params=params)
        assert response.status_code == 200, response.text
        assert response.headers.get("x-amzn-RequestId"), response.headers
        body: dict[str, Any] = response.json()
        return body

    def estimate(self, app_id: str, segment_id: str, version: int | None = None) -> tuple[int, int]:
        """(TotalEndpoints, EligibleEndpoints) of a segment, from the extension route."""
        params = {"version": str(version)} if version is not None else None
        body = self.get_json(f"/v1/apps/{app_id}/segments/{segment_id}/estimate", params)
        assert set(body) == {"TotalEndpoints", "EligibleEndpoints"}, body
        return body["TotalEndpoints"], body["EligibleEndpoints"]

    def consent_history(self, app_id: str, endpoint_id: str) -> dict[str, Any]:
        return self.get_json(f"/v1/apps/{app_id}/endpoints/{endpoint_id}/consent-history")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def sms(address: str, **fields: Any) -> Any:
    """An EndpointRequest for an SMS endpoint (``Any``: the stubs' TypedDict wants literals)."""
    return {"Address": address, "ChannelType": "SMS", **fields}
