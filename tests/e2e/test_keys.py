"""Scoped API keys as a user runs them: ``optsync keys create|list|revoke`` against the engine of
a running ``optsync serve``, and boto3 signing with the keys it printed.

On SQLite, one server with a full-access key from the environment; on PostgreSQL, two servers
sharing one engine, to show that a revoke through the CLI is refused by both at once.
"""

from __future__ import annotations

import json
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import pytest
from botocore.exceptions import ClientError
from pinpoint_e2e import REGION, Server, Signed, clean_env, optsync_command, sms, unique
from ports import free_port
from postgres_server import PostgresServer
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

ADMIN_ID, ADMIN_SECRET = "ADMINKEY", "admin-secret"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*optsync_command(), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def client(server: Server, key_id: str, secret: str) -> PinpointClient:
    return boto3.client(
        "pinpoint",
        endpoint_url=server.url,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def start_serve(folder: Path, *where: str) -> Server:
    """``optsync serve`` with a full-access key from the environment; ``where`` names the
    engine (``--data-dir D`` or ``--config F``)."""
    port = free_port()
    log = folder / f"serve-{port}.log"
    command = [*optsync_command(), "serve", "--host", "127.0.0.1", "--port", str(port), *where]
    env = clean_env(
        OPTSYNC_API_CREDENTIALS=f"{ADMIN_ID}:{ADMIN_SECRET}",
        OPTSYNC_DATA_DIR=str(folder / f"data-{port}"),
    )
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        server.wait_healthy()
    except BaseException:
        server.stop()
        raise
    return server


def create_key(*args: str) -> dict[str, str]:
    """``optsync keys create ... --json``: the printed ``{"key_id", "secret"}``."""
    done = run_cli("keys", "create", *args, "--json")
    assert done.returncode == 0, done.stderr
    created: dict[str, str] = json.loads(done.stdout)
    assert set(created) == {"key_id", "secret"}, created
    return created


def error_of(excinfo: pytest.ExceptionInfo[ClientError]) -> tuple[int, str, str]:
    response: Any = excinfo.value.response
    return (
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Code"],
        response["Error"]["Message"],
    )


@dataclass
class Engine:
    server: Server
    data_dir: Path
    admin: PinpointClient
    app_a: str
    app_b: str
    name_a: str


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    folder = tmp_path_factory.mktemp("optsync-keys")
    data_dir = folder / "data"
    server = start_serve(folder, "--data-dir", str(data_dir))
    try:
        admin = client(server, ADMIN_ID, ADMIN_SECRET)
        name_a, name_b = unique("keys-a"), unique("keys-b")
        app_a = admin.create_app(CreateApplicationRequest={"Name": name_a})
        app_b = admin.create_app(CreateApplicationRequest={"Name": name_b})
        yield Engine(
            server,
            data_dir,
            admin,
            app_a["ApplicationResponse"]["Id"],
            app_b["ApplicationResponse"]["Id"],
            name_a,
        )
    finally:
        server.stop()


def test_a_scoped_key_reaches_its_app_and_no_other(engine: Engine) -> None:
    key = create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a)
    scoped = client(engine.server, key["key_id"], key["secret"])

    scoped.update_endpoint(
        ApplicationId=engine.app_a, EndpointId="e1", EndpointRequest=sms("+12065550100")
    )
    got = scoped.get_endpoint(ApplicationId=engine.app_a, EndpointId="e1")
    assert got["EndpointResponse"]["Address"] == "+12065550100"

    other_calls = [
        lambda: scoped.get_app(ApplicationId=engine.app_b),
        lambda: scoped.get_segments(ApplicationId=engine.app_b),
        lambda: scoped.update_endpoint(
            ApplicationId=engine.app_b, EndpointId="e1", EndpointRequest=sms("+12065550101")
        ),
        lambda: scoped.delete_app(ApplicationId=engine.app_b),
    ]
    for call in other_calls:
        with pytest.raises(ClientError) as excinfo:
            call()
        status, code, message = error_of(excinfo)
        assert (status, code) == (403, "AccessDeniedException")
        assert f"scoped to app {engine.app_a}" in message
    # Nothing reached app B: the admin still finds it whole and without the endpoint.
    assert engine.admin.get_app(ApplicationId=engine.app_b)["ApplicationResponse"]["Id"]
    with pytest.raises(ClientError) as missing:
        engine.admin.get_endpoint(ApplicationId=engine.app_b, EndpointId="e1")
    assert error_of(missing)[0] == 404

    with pytest.raises(ClientError) as creating:
        scoped.create_app(CreateApplicationRequest={"Name": unique("not-allowed")})
    assert error_of(creating)[:2] == (403, "AccessDeniedException")
    assert "full-access key" in error_of(creating)[2]


def test_a_scoped_key_cannot_reach_another_apps_segment_through_its_own(engine: Engine) -> None:
    """SourceSegments name a segment by id only: one of another app is not found, so its
    members cannot be counted through a segment of the key's own app."""
    theirs = engine.admin.create_segment(
        ApplicationId=engine.app_b, WriteSegmentRequest={"Name": "theirs"}
    )["SegmentResponse"]["Id"]
    key = create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a)
    scoped = client(engine.server, key["key_id"], key["secret"])
    request: Any = {
        "Name": "borrowed",
        "SegmentGroups": {
            "Groups": [{"SourceSegments": [{"Id": theirs}], "Type": "ALL"}],
            "Include": "ALL",
        },
    }
    with pytest.raises(ClientError) as excinfo:
        scoped.create_segment(ApplicationId=engine.app_a, WriteSegmentRequest=request)
    status, _, message = error_of(excinfo)
    assert status in (400, 404) and theirs in message, message


def test_get_apps_lists_only_the_keys_apps(engine: Engine) -> None:
    key = create_key(
        "--data-dir", str(engine.data_dir), "--app", engine.app_a, "--app", engine.name_a
    )
    listed = client(engine.server, key["key_id"], key["secret"]).get_apps()
    ids = [a["Id"] for a in listed["ApplicationsResponse"]["Item"]]
    assert ids == [engine.app_a]  # one app, named twice (by id and by name)
    everything = engine.admin.get_apps(PageSize="1000")["ApplicationsResponse"]["Item"]
    assert {engine.app_a, engine.app_b} <= {a["Id"] for a in everything}


def test_a_read_only_key_reads_but_cannot_write(engine: Engine) -> None:
    engine.admin.update_endpoint(
        ApplicationId=engine.app_a, EndpointId="ro", EndpointRequest=sms("+12065550102")
    )
    key = create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a, "--read-only")
    reader = client(engine.server, key["key_id"], key["secret"])
    assert reader.get_endpoint(ApplicationId=engine.app_a, EndpointId="ro")["EndpointResponse"]
    reader.phone_number_validate(NumberValidateRequest={"PhoneNumber": "+12065550102"})

    writes = [
        lambda: reader.update_endpoint(
            ApplicationId=engine.app_a, EndpointId="ro", EndpointRequest={"OptOut": "ALL"}
        ),
        lambda: reader.delete_endpoint(ApplicationId=engine.app_a, EndpointId="ro"),
        lambda: reader.create_segment(
            ApplicationId=engine.app_a, WriteSegmentRequest={"Name": "nope"}
        ),
    ]
    for write in writes:
        with pytest.raises(ClientError) as excinfo:
            write()
        status, code, message = error_of(excinfo)
        assert (status, code) == (403, "AccessDeniedException")
        assert "read-only" in message
    still = engine.admin.get_endpoint(ApplicationId=engine.app_a, EndpointId="ro")
    assert still["EndpointResponse"]["OptOut"] == "NONE"


def test_a_revoked_key_is_refused_on_the_next_request(engine: Engine) -> None:
    key = create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a)
    scoped = client(engine.server, key["key_id"], key["secret"])
    assert scoped.get_app(ApplicationId=engine.app_a)

    done = run_cli("keys", "revoke", "--data-dir", str(engine.data_dir), key["key_id"])
    assert done.returncode == 0, done.stderr
    assert f"revoked {key['key_id']}" in done.stdout

    with pytest.raises(ClientError) as excinfo:
        scoped.get_app(ApplicationId=engine.app_a)
    status, code, message = error_of(excinfo)
    assert (status, code) == (403, "ForbiddenException")
    assert "revoked" in message


def test_keys_list_shows_keys_without_their_secrets(engine: Engine) -> None:
    key = create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a, "--read-only")
    done = run_cli("keys", "list", "--data-dir", str(engine.data_dir), "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    mine = [r for r in rows if r["key_id"] == key["key_id"]]
    assert mine == [
        {
            "key_id": key["key_id"],
            "app_ids": [engine.app_a],
            "read_only": True,
            "created_at": mine[0]["created_at"],
            "revoked_at": None,
        }
    ]
    table = run_cli("keys", "list", "--data-dir", str(engine.data_dir))
    assert table.returncode == 0, table.stderr
    assert key["key_id"] in table.stdout
    assert key["secret"] not in done.stdout + table.stdout


def test_the_engine_file_is_readable_by_its_owner_only(engine: Engine) -> None:
    create_key("--data-dir", str(engine.data_dir), "--app", engine.name_a)
    mode = stat.S_IMODE((engine.data_dir / "engine.db").stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_text_output_names_the_key_pair_as_boto3_does(engine: Engine) -> None:
    done = run_cli("keys", "create", "--data-dir", str(engine.data_dir), "--app", engine.name_a)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "aws_access_key_id",
        "aws_secret_access_key",
    ]
    assert f"read-write, scoped to {engine.name_a} ({engine.app_a})" in done.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("keys", "create", "--app", "no-such-app"), "--app 'no-such-app'"),
        (("keys", "revoke", "OPTSYNCKNOSUCHKEY000"), "KEY_ID: there is no API key"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    engine: Engine, args: tuple[str, ...], expected: str
) -> None:
    done = run_cli(*args, "--data-dir", str(engine.data_dir))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0]


def test_an_unknown_key_is_refused_and_full_access_keys_still_work(engine: Engine) -> None:
    stranger = Signed(engine.server.url, "OPTSYNCKNOTAKEY00000", "whatever")
    refused = stranger.request("GET", f"/v1/apps/{engine.app_a}")
    assert refused.status_code == 403
    assert refused.headers["x-amzn-ErrorType"] == "ForbiddenException"
    assert "optsync keys create" in refused.json()["Message"]
    assert engine.admin.get_app(ApplicationId=engine.app_b)["ApplicationResponse"]


@pytest.mark.integration
def test_a_revoke_is_seen_at_once_by_every_server_of_a_postgresql_engine(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    database = f"keys_{tmp_path.name.lower().replace('-', '_')}"[:60]
    url = postgres.create_database(database)
    config = tmp_path / "serve.toml"
    config.write_text(f'[engine]\nurl = "{url}"\napp = "keys"\n')
    first = start_serve(tmp_path, "--config", str(config))
    try:
        second = start_serve(tmp_path, "--config", str(config))
        try:
            app = client(first, ADMIN_ID, ADMIN_SECRET).create_app(
                CreateApplicationRequest={"Name": "keys"}
            )["ApplicationResponse"]["Id"]
            key = create_key("--config", str(config), "--app", "keys")
            clients = [client(s, key["key_id"], key["secret"]) for s in (first, second)]
            for scoped in clients:
                assert scoped.get_app(ApplicationId=app)["ApplicationResponse"]["Id"] == app

            done = run_cli("keys", "revoke", "--config", str(config), key["key_id"])
            assert done.returncode == 0, done.stderr
            for scoped in clients:  # no wait: each server reads the key on every request
                with pytest.raises(ClientError) as excinfo:
                    scoped.get_app(ApplicationId=app)
                assert error_of(excinfo)[:2] == (403, "ForbiddenException")
                assert "revoked" in error_of(excinfo)[2]
        finally:
            second.stop()
    finally:
        first.stop()
        postgres.drop_database(database)
