"""The pinpoint-api sink against a second, real ``optsync serve`` process.

The local engine is a ``SQLiteStore`` written through ``write_endpoints``; a ``SinkRunner``
delivers its consent ledger with boto3's ``pinpoint`` client over HTTP, SigV4-signed, to the
other process, which the tests read back through the same API. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from ports import free_port

from optsync.api.wire import endpoint_to_wire
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    Demographic,
    EndpointDelete,
    EndpointPatch,
    Location,
    OptOut,
)
from optsync.engine.segments import definition_from_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import NotFound
from optsync.sinks.pinpoint import PinpointApiSink
from optsync.sinks.runner import SinkRunner
from optsync.sinks.settings import PinpointApiSinkSettings

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.integration

KEY_ID, SECRET = "MIRRORKEY", "mirror-test-secret"
REGION = "us-east-1"
SINK = "mirror"
REMOTE_APP = "mirror-app"
TIMEOUT = 60.0
COMPARED = (
    "Address",
    "ChannelType",
    "OptOut",
    "EndpointStatus",
    "EffectiveDate",
    "Attributes",
    "User",
    "Location",
    "Demographic",
    "Metrics",
)
US_SEGMENT: Any = {
    "Name": "US",
    "Dimensions": {"Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}},
}


# -- the other side --------------------------------------------------------------------------


class Remote:
    """``optsync serve`` on a fixed free port and data folder: stopped and started again at will."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        script = shutil.which("optsync", path=os.path.dirname(sys.executable))
        assert script is not None, f"no optsync console script next to {sys.executable}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSYNC_")}
        env["OPTSYNC_API_CREDENTIALS"] = f"{KEY_ID}:{SECRET}"
        command = [script, "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--data-dir", str(self.folder / "data")]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder
            )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"optsync serve exited:\n{self.log.read_text(errors='replace')}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        pytest.fail(f"optsync serve did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def client(self) -> PinpointClient:
        return boto3.session.Session().client(
            "pinpoint",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )

    def estimate(self, app_id: str, segment_id: str) -> tuple[int, int]:
        """(TotalEndpoints, EligibleEndpoints) from the estimate extension route, signed."""
        url = f"{self.url}/v1/apps/{app_id}/segments/{segment_id}/estimate"
        request = AWSRequest(method="GET", url=url)
        SigV4Auth(Credentials(KEY_ID, SECRET), "mobiletargeting", REGION).add_auth(request)
        response = httpx.get(url, headers=dict(request.headers.items()), timeout=10.0)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["TotalEndpoints"], body["EligibleEndpoints"]


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Remote]:
    server = Remote(tmp_path / "remote")
    server.folder.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "local" / "engine.db")
    try:
        yield store
    finally:
        store.close()


# -- the local engine ------------------------------------------------------------------------


def phone(n: int) -> str:
    return f"+1206555{n:04d}"


def endpoint_id(n: int) -> str:
    return f"user{n}_{phone(n)}"


def write(
    store: SQLiteStore, app_id: str, writes: Sequence[EndpointPatch | EndpointDelete]
) -> None:
    for start in range(0, len(writes), 50):
        store.write_endpoints(app_id, writes[start : start + 50], Cause(CauseKind.API, "seed"))


def created(n: int, **given: Any) -> EndpointPatch:
    """Endpoint ``n``: SMS, three endpoints per user, attributes, some opted out or located."""
    fields: dict[str, Any] = {
        "channel_type": ChannelType.SMS,
        "address": phone(n),
        "opt_out": OptOut.ALL if n % 7 == 0 else OptOut.NONE,
        "user_id": f"person{n // 3}",
        "user_attributes": {"tier": (f"t{n % 4}",)},
        "attributes": {"plan": ("gold" if n % 2 else "silver",), "n": (str(n),)},
    }
    if n % 10 == 3:
        fields["location"] = Location(country="CA", city="Toronto", latitude=43.65)
    if n % 4 == 0:
        fields["metrics"] = {"score": n / 2}
    if n % 6 == 0:
        fields["demographic"] = Demographic(platform="ios", locale="en_US")
    return EndpointPatch(id=endpoint_id(n), **(fields | given))


def populate(store: SQLiteStore, app_id: str, numbers: range) -> list[str]:
    """Create endpoints ``numbers``; their ids."""
    write(store, app_id, [created(n) for n in numbers])
    return [endpoint_id(n) for n in numbers]


def churn(store: SQLiteStore, app_id: str, numbers: range) -> list[str]:
    """Re-write endpoints ``numbers``: opted out and in again, moved to another number,
    deleted, deleted and created again, joined by a second endpoint at their number; the ids
    of the endpoints it created."""
    ids: list[str] = []
    rewrites: list[EndpointPatch | EndpointDelete] = []
    for round_ in range(3):  # opted out and in again, an attribute changed each time
        for n in numbers:
            if n % 5 == 0:
                opt_out = OptOut.NONE if round_ % 2 == 0 else OptOut.ALL
                attributes = {"round": (str(round_),)}
                rewrites.append(
                    EndpointPatch(endpoint_id(n), opt_out=opt_out, attributes=attributes)
                )
    for n in numbers:
        if n % 13 == 0:
            rewrites.append(EndpointPatch(endpoint_id(n), address=phone(5000 + n)))
        if n % 11 == 0:
            rewrites.append(EndpointDelete(endpoint_id(n)))
        elif n % 17 == 0:  # gone and back: its former attributes must not come back with it
            rewrites.append(EndpointDelete(endpoint_id(n)))
            rewrites.append(created(n, attributes={"plan": ("bronze",)}, opt_out=OptOut.ALL))
        if n % 29 == 1:  # another endpoint at the same number: the first one goes INACTIVE
            ids.append(f"second{n}")
            rewrites.append(
                EndpointPatch(f"second{n}", channel_type=ChannelType.SMS, address=phone(n))
            )
    write(store, app_id, rewrites)
    return ids


# -- delivery --------------------------------------------------------------------------------


def sink_for(local: SQLiteStore, url: str, secret: str = SECRET) -> PinpointApiSink:
    settings = PinpointApiSinkSettings(
        name=SINK,
        channels=None,
        url=url,
        app=REMOTE_APP,
        region=REGION,
        access_key_id=KEY_ID,
        secret_access_key=secret,
    )
    return PinpointApiSink(settings, local)


@contextlib.contextmanager
def running(local: SQLiteStore, sink: PinpointApiSink) -> Iterator[SinkRunner]:
    runner = SinkRunner(local, sink, holder="test", poll=0.05)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()


def caught_up(local: SQLiteStore, app_id: str) -> bool:
    return not local.consent_changes(app_id, local.sink_cursor(SINK, app_id), 1)


def wait_for(condition: Callable[[], bool], what: str, runner: SinkRunner) -> float:
    """Poll until ``condition`` holds; the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    deadline = started + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last sink error: {runner.stats.last_error}")
        time.sleep(0.02)
    return time.monotonic() - started


def assert_mirrored(
    local: SQLiteStore, app_id: str, client: PinpointClient, remote_app: str, ids: Sequence[str]
) -> int:
    """Every endpoint the same on both sides, deleted ones on neither; how many exist."""
    present = 0
    for eid in ids:
        try:
            mine = endpoint_to_wire(local.get_endpoint(app_id, eid))
        except NotFound:
            with pytest.raises(client.exceptions.NotFoundException):
                client.get_endpoint(ApplicationId=remote_app, EndpointId=eid)
            continue
        theirs = client.get_endpoint(ApplicationId=remote_app, EndpointId=eid)["EndpointResponse"]
        assert {k: theirs.get(k) for k in COMPARED} == {k: mine.get(k) for k in COMPARED}, eid
        present += 1
    return present


def segment_estimates(
    local: SQLiteStore, app_id: str, remote: Remote, client: PinpointClient, remote_app: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    mine = local.create_segment(app_id, definition_from_wire(US_SEGMENT, require_name=True))
    theirs = client.create_segment(ApplicationId=remote_app, WriteSegmentRequest=US_SEGMENT)
    estimate = local.estimate(app_id, mine.id)
    return (estimate.total, estimate.eligible), remote.estimate(
        remote_app, theirs["SegmentResponse"]["Id"]
    )


# -- tests -----------------------------------------------------------------------------------


def test_the_other_side_ends_up_with_the_same_endpoints(local: SQLiteStore, remote: Remote) -> None:
    app_id = local.create_app("local-app").id
    ids = populate(local, app_id, range(300))
    sink = sink_for(local, remote.url)
    with running(local, sink) as runner:
        created_in = wait_for(lambda: caught_up(local, app_id), "the new endpoints", runner)
        sent = runner.stats.sent
        ids += churn(local, app_id, range(300))
        churned_in = wait_for(lambda: caught_up(local, app_id), "the re-writes", runner)
        stats = runner.stats
    changes = len(local.consent_changes(app_id, 0, 100_000))
    print(
        f"pinpoint-api sink: 300 new endpoints in {created_in:.2f} s "
        f"({300 / created_in:.0f} endpoints/s); {changes - sent} more changes in "
        f"{churned_in:.2f} s; {len(stats.seconds)} deliveries"
    )
    assert stats.dead == 0 and stats.failures == 0, stats.last_error
    assert stats.sent == changes

    client = remote.client()
    remote_app = sink.app_id
    assert client.get_app(ApplicationId=remote_app)["ApplicationResponse"]["Name"] == REMOTE_APP
    present = assert_mirrored(local, app_id, client, remote_app, ids)
    assert 250 < present < len(ids)  # some were deleted
    mine, theirs = segment_estimates(local, app_id, remote, client, remote_app)
    assert theirs == mine
    assert 0 < mine[1] < mine[0] < present  # some opted out or INACTIVE; some in CA

    # The RequestId sent is the id of the endpoint's newest change.
    newest = local.consent_history(app_id, endpoint_id(5))[-1]
    got = client.get_endpoint(ApplicationId=remote_app, EndpointId=endpoint_id(5))
    assert got["EndpointResponse"]["RequestId"] == f"{app_id}-{newest.seq}"


def test_attribute_changes_travel_with_the_endpoints_next_consent_change(
    local: SQLiteStore, remote: Remote
) -> None:
    """The ledger holds consent changes (OptOut, address, deletion); a change of attributes
    alone makes none, so it reaches the other side with the endpoint's next consent change."""
    app_id = local.create_app("local-app").id
    ids = populate(local, app_id, range(20)) + churn(local, app_id, range(20))
    sink = sink_for(local, remote.url)
    client = remote.client()
    with running(local, sink) as runner:
        wait_for(lambda: caught_up(local, app_id), "the first delivery", runner)
        write(local, app_id, [EndpointPatch(endpoint_id(1), attributes={"plan": ("platinum",)})])
        assert caught_up(local, app_id)  # no consent change: nothing is due
        got = client.get_endpoint(ApplicationId=sink.app_id, EndpointId=endpoint_id(1))
        assert got["EndpointResponse"]["Attributes"]["plan"] == ["gold"]
        write(local, app_id, [EndpointPatch(endpoint_id(1), opt_out=OptOut.ALL)])
        wait_for(lambda: caught_up(local, app_id), "the opt-out's delivery", runner)
    assert_mirrored(local, app_id, client, sink.app_id, ids)


def test_a_refused_endpoint_is_a_dead_letter_and_a_wrong_secret_only_waits(
    local: SQLiteStore, remote: Remote
) -> None:
    """The other side already holds 15 endpoints of UserId "crowded" (Pinpoint's cap per user):
    the local endpoint of that user is refused there for good; a wrong secret is our fault,
    fixed by a person, so it is retried and nothing becomes a dead letter."""
    client = remote.client()
    remote_app = client.create_app(CreateApplicationRequest={"Name": REMOTE_APP})[
        "ApplicationResponse"
    ]["Id"]
    crowd: Any = [
        {"Id": f"crowd{i}", "ChannelType": "SMS", "Address": phone(9000 + i)} for i in range(15)
    ]
    for item in crowd:
        item["User"] = {"UserId": "crowded"}
    client.update_endpoints_batch(ApplicationId=remote_app, EndpointBatchRequest={"Item": crowd})

    app_id = local.create_app("local-app").id
    numbers = range(150)
    write(local, app_id, [created(n) for n in numbers])
    refused = endpoint_id(77)
    write(local, app_id, [EndpointPatch(refused, user_id="crowded", opt_out=OptOut.NONE)])
    changes = local.consent_changes(app_id, 0, 100_000)

    with running(local, sink_for(local, remote.url, secret="not-the-secret")) as runner:
        wait_for(lambda: runner.stats.failures >= 2, "the refused signature to be retried", runner)
    assert "403" in (runner.stats.last_error or ""), runner.stats.last_error
    assert local.sink_cursor(SINK, app_id) == 0
    assert local.sink_dead_letters(SINK) == []

    sink = sink_for(local, remote.url)
    with running(local, sink) as runner:
        wait_for(lambda: caught_up(local, app_id), "the sink to catch up", runner)
    assert sink.app_id == remote_app  # found by its name
    dead = local.sink_dead_letters(SINK)
    refused_seqs = {c.seq for c in changes if c.endpoint_id == refused}
    assert {d.seq for d in dead} == refused_seqs
    assert all("maximum endpoint per user" in d.reason for d in dead), dead
    assert runner.stats.sent == len(changes) - len(refused_seqs)
    with pytest.raises(client.exceptions.NotFoundException):
        client.get_endpoint(ApplicationId=remote_app, EndpointId=refused)
    others = [endpoint_id(n) for n in numbers if n != 77]
    assert assert_mirrored(local, app_id, client, remote_app, others) == len(others)


def test_the_other_side_down_and_back_loses_nothing(local: SQLiteStore, remote: Remote) -> None:
    app_id = local.create_app("local-app").id
    sink = sink_for(local, remote.url)
    with running(local, sink) as runner:
        ids = populate(local, app_id, range(150))
        wait_for(lambda: caught_up(local, app_id), "the first half", runner)
        remote.stop()
        ids += churn(local, app_id, range(150))
        ids += populate(local, app_id, range(150, 300))
        ids += churn(local, app_id, range(150, 300))
        failures = runner.stats.failures
        wait_for(lambda: runner.stats.failures >= failures + 2, "failed deliveries", runner)
        assert not caught_up(local, app_id)
        assert local.sink_dead_letters(SINK) == []
        remote.start()
        took = wait_for(lambda: caught_up(local, app_id), "the sink to catch up again", runner)
    print(f"pinpoint-api sink caught up {took:.2f} s after the other side came back")
    assert runner.stats.dead == 0
    client = remote.client()
    assert assert_mirrored(local, app_id, client, sink.app_id, ids) > 250
    mine, theirs = segment_estimates(local, app_id, remote, client, sink.app_id)
    assert theirs == mine
