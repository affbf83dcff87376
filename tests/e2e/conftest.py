"""A real ``optsync serve`` on a free port, and boto3/httpx clients that talk to it.

The server runs once per session with a temporary data folder and two key pairs; every test gets
an app of its own (deleted afterwards), so tests do not see each other's endpoints.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import pytest
from pinpoint_e2e import (
    KEY_ID,
    OTHER_KEY_ID,
    OTHER_SECRET,
    REGION,
    SECRET,
    ClientFactory,
    Server,
    Signed,
    clean_env,
    optsync_command,
)
from ports import free_port

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``optsync serve`` on 127.0.0.1 with a fresh data folder; terminated at the end."""
    folder = tmp_path_factory.mktemp("optsync-serve")
    port = free_port()
    log = folder / "server.log"
    command = [
        *optsync_command(),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(folder / "data"),
    ]
    env = clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET},{OTHER_KEY_ID}:{OTHER_SECRET}")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    running = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def make_client(server: Server) -> ClientFactory:
    """Builds a boto3 ``pinpoint`` client for the server; other keyword arguments go to Config."""

    def make(
        key_id: str = KEY_ID,
        secret: str = SECRET,
        *,
        region: str = REGION,
        session_token: str | None = None,
        **config: Any,
    ) -> PinpointClient:
        return boto3.client(
            "pinpoint",
            endpoint_url=server.url,
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=session_token,
            config=botocore.config.Config(retries={"max_attempts": 1}, **config),
        )

    return make


@pytest.fixture(scope="session")
def pinpoint(make_client: ClientFactory) -> PinpointClient:
    return make_client()


@pytest.fixture(scope="session")
def signed(server: Server) -> Signed:
    return Signed(server.url)


def delete_app_quietly(client: PinpointClient, app_id: str) -> None:
    with contextlib.suppress(client.exceptions.NotFoundException):  # the test deleted it
        client.delete_app(ApplicationId=app_id)


@pytest.fixture
def app_id(pinpoint: PinpointClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty app for one test; deleted afterwards."""
    name = f"e2e-{request.node.name}"[:64]
    created = pinpoint.create_app(CreateApplicationRequest={"Name": name})
    yield created["ApplicationResponse"]["Id"]
    delete_app_quietly(pinpoint, created["ApplicationResponse"]["Id"])
