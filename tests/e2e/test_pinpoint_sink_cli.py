"""``optsync run`` with a ``[[sink]] type = "pinpoint-api"``: another ``optsync serve`` (the
session's ``server``) ends up holding the same endpoints as the engine, through the blog's
walkthrough: nine users in, user1-user4 opt out, then user5.

The source engine serves its own API ([api] in the config), so both sides are read the same
way: boto3's ``pinpoint`` client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import pytest
from pinpoint_e2e import KEY_ID, REGION, SECRET, Server, Signed, clean_env, unique
from pipeline_e2e import APP_NAME, MAPPING, Layout, Optsync, app_db, wait_for
from ports import free_port

from optsync.sample import SAMPLE_TABLE

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

LOCAL_KEY_ID, LOCAL_SECRET = "LOCALKEY", "local-secret"
TIMEOUT = 60.0
COMPARED = ("Address", "ChannelType", "OptOut", "EndpointStatus", "User", "Location")


def client_for(url: str, key_id: str, secret: str) -> PinpointClient:
    return boto3.client(
        "pinpoint",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def app_named(client: PinpointClient, name: str) -> str | None:
    apps = client.get_apps(PageSize="100")["ApplicationsResponse"].get("Item", [])
    found = [a["Id"] for a in apps if a["Name"] == name]
    return found[0] if found else None


def endpoints(client: PinpointClient, app_id: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """The endpoints of ``ids`` that exist, with the fields compared."""
    out: dict[str, dict[str, Any]] = {}
    for eid in sorted(ids):
        try:
            found = client.get_endpoint(ApplicationId=app_id, EndpointId=eid)["EndpointResponse"]
        except client.exceptions.NotFoundException:
            continue
        out[eid] = {k: found.get(k) for k in COMPARED}
    return out


@pytest.fixture
def mirror_app(server: Server) -> Iterator[str]:
    """The name of the app the sink makes on the other side; deleted afterwards."""
    name = unique("mirror")
    yield name
    client = client_for(server.url, KEY_ID, SECRET)
    app_id = app_named(client, name)
    if app_id is not None:
        client.delete_app(ApplicationId=app_id)


def test_run_keeps_another_pinpoint_api_holding_the_engines_endpoints(
    tmp_path: Path, server: Server, mirror_app: str
) -> None:
    layout = Layout(tmp_path)
    layout.create_source()
    sink = (
        '\n[[sink]]\nname = "mirror"\ntype = "pinpoint-api"\n'
        f"url = {json.dumps(server.url)}\napp = {json.dumps(mirror_app)}\n"
        f'access_key_id = "{KEY_ID}"\nsecret_access_key_env = "MIRROR_SECRET"\n'
    )
    port = free_port()
    layout.write_config(MAPPING + sink, api_port=port)
    run = Optsync(
        ["run", "--config", str(layout.config)],
        log=tmp_path / "run.log",
        cwd=tmp_path,
        env=clean_env(
            MIRROR_SECRET=SECRET, OPTSYNC_API_CREDENTIALS=f"{LOCAL_KEY_ID}:{LOCAL_SECRET}"
        ),
    ).start()
    local = client_for(f"http://127.0.0.1:{port}", LOCAL_KEY_ID, LOCAL_SECRET)
    remote = client_for(server.url, KEY_ID, SECRET)
    ids = {row[0] for row in layout.source_rows()}
    assert len(ids) == 9
    try:
        wait_for(lambda: app_named(remote, mirror_app) is not None, "the app there", TIMEOUT, run)
        local_app = app_named(local, APP_NAME)
        remote_app = app_named(remote, mirror_app)
        assert local_app is not None and remote_app is not None

        def mirrored(opted_out: set[int]) -> bool:
            """Source, engine and the other side agree, with these users opted out."""
            if layout.engine_rows() != layout.source_rows():
                return False
            mine = endpoints(local, local_app, ids)
            wanted = {f"user{n}" for n in opted_out}
            if {e for e, v in mine.items() if v["OptOut"] == "ALL"} != {
                e for e in ids if e.split("_")[0] in wanted
            }:
                return False
            return len(mine) == 9 and endpoints(remote, remote_app, ids) == mine

        wait_for(lambda: mirrored(set()), "nine users there", TIMEOUT, run)
        with app_db(layout.source) as app:
            app.execute(
                f"UPDATE {SAMPLE_TABLE} SET optin = 0 "
                "WHERE userid IN ('user1', 'user2', 'user3', 'user4')"
            )
        wait_for(lambda: mirrored({1, 2, 3, 4}), "user1-user4 opted out there", TIMEOUT, run)
        with app_db(layout.source) as app:
            app.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = 'user5'")
        took = wait_for(lambda: mirrored({1, 2, 3, 4, 5}), "user5 opted out there", TIMEOUT, run)
        print(f"user5's opt-out reached the other side within {took:.2f} s")

        segment = remote.create_segment(
            ApplicationId=remote_app,
            WriteSegmentRequest={
                "Name": "US-Segment",
                "Dimensions": {
                    "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
                },
            },
        )["SegmentResponse"]["Id"]
        assert Signed(server.url).estimate(remote_app, segment) == (9, 4)
        user5 = next(e for e in ids if e.startswith("user5_"))
        history = Signed(server.url).consent_history(remote_app, user5)["Item"]
        assert [(c["OptOutBefore"], c["OptOutAfter"]) for c in history] == [
            (None, "NONE"),
            ("NONE", "ALL"),
        ]
    finally:
        run.stop()
        local.close()
        remote.close()
    assert "Traceback" not in run.output(), run.output()[-4000:]
