"""Scale-out as a user runs it: ``optsync capture``, several ``optsync apply`` and ``optsync
serve`` processes on a private nats-server (JetStream) and a private PostgreSQL.

Each role gets a config with only its own sections (capture: [source] + [stream]; apply:
[stream] + [engine] + [[mapping]]; serve: [engine]), so these tests also show that no role
needs what it does not use. The checks are end states against the source (every user's opt-in
in the engine equals the source's) and the consent history's order (each endpoint's changes in
source-position order), after kills and server restarts.
"""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.config
import httpx
import pytest
from cluster_pieces import APP, KEY_ID, SECRET, Cluster, endpoint_id, phone
from nats_server import NatsServer
from nats_server import nats_server_fixture as _nats_fixture  # noqa: F401 (the fixture)
from postgres_server import PostgresServer
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

from optsync.engine.models import CauseKind

pytestmark = pytest.mark.integration

USERS = 60


@pytest.fixture
def cluster(tmp_path: Path, nats_server: NatsServer, postgres: PostgresServer) -> Iterator[Cluster]:
    made = Cluster(tmp_path, nats_server, postgres)
    try:
        yield made
    finally:
        made.stop_all()


def seed(cluster: Cluster, users: int = USERS) -> None:
    with cluster.source() as conn:
        conn.executemany(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (?, ?, 1)",
            [(f"user{n}", phone(n)) for n in range(1, users + 1)],
        )


def flip_randomly(
    cluster: Cluster, changes: int, seed_value: int, per_commit: int = 5, pause: float = 0.0
) -> None:
    """``changes`` opt-in flips of random users, a few per source transaction."""
    rng = random.Random(seed_value)
    with cluster.source() as conn:
        for start in range(0, changes, per_commit):
            conn.execute("BEGIN IMMEDIATE")
            for _ in range(min(per_commit, changes - start)):
                n = rng.randint(1, USERS)
                conn.execute(
                    "UPDATE optin_status SET optin = 1 - optin WHERE userid = ?", (f"user{n}",)
                )
            conn.execute("COMMIT")
            if pause:
                time.sleep(pause)


def assert_history_in_source_order(cluster: Cluster, users: int = USERS) -> int:
    """Every endpoint's consent history from the source is in position order; returns the
    number of history entries checked."""
    checked = 0
    with cluster.engine() as store:
        app = store.find_app(APP)
        assert app is not None
        for n in range(1, users + 1):
            history = store.consent_history(app.id, endpoint_id(n))
            positions = [c.cause.ref for c in history if c.cause.kind is CauseKind.SOURCE]
            assert positions == sorted(positions), f"user{n}: history out of source order"
            assert len(set(positions)) == len(positions), f"user{n}: a change recorded twice"
            checked += len(positions)
    return checked


def held_partitions(log: str) -> list[str]:
    return [line for line in log.splitlines() if "apply partitions" in line]


def shares_settled(cluster: Cluster, *labels: str) -> bool:
    """Each worker's last partition line holds a share (the leases have spread out)."""
    for label in labels:
        lines = held_partitions(cluster.log(label))
        if not lines or "held=[]" in lines[-1] or "held=[0, 1, 2, 3]" in lines[-1]:
            return False
    return True


def start_two_workers(cluster: Cluster) -> None:
    """Capture and two apply workers, the snapshot applied and the partitions shared out."""
    seed(cluster)
    cluster.start("capture")
    cluster.start("apply-1")
    cluster.start("apply-2")
    cluster.wait_converged(USERS)
    # The second worker takes its share without the first being told (within a few claims).
    cluster.wait_for(
        "the two workers to share the partitions",
        lambda: shares_settled(cluster, "apply-1", "apply-2"),
        timeout=30,
    )


def test_two_apply_workers_keep_each_keys_order(cluster: Cluster) -> None:
    start_two_workers(cluster)
    writer = threading.Thread(target=flip_randomly, args=(cluster, 3000, 1, 5, 0.001))
    writer.start()
    writer.join(120)
    assert not writer.is_alive()
    cluster.wait_converged(USERS)
    assert assert_history_in_source_order(cluster) > 0
    assert shares_settled(cluster, "apply-1", "apply-2")  # both applied through the load


def test_a_sigkilled_apply_worker_loses_nothing(cluster: Cluster) -> None:
    start_two_workers(cluster)
    writer = threading.Thread(target=flip_randomly, args=(cluster, 6000, 2, 20, 0.01))
    writer.start()
    time.sleep(1.0)
    assert writer.is_alive()  # mid-stream: the workers are applying batches
    cluster.kill("apply-2")
    writer.join(120)
    assert not writer.is_alive()
    took = cluster.wait_converged(USERS, timeout=60)
    assert took < 45, f"the survivor took {took:.1f} s to take over and catch up"
    assert_history_in_source_order(cluster)
    gained = held_partitions(cluster.log("apply-1"))
    assert gained and "held=[0, 1, 2, 3]" in gained[-1], gained


def test_nats_server_restarted_mid_stream(cluster: Cluster, nats_server: NatsServer) -> None:
    seed(cluster)
    cluster.start("capture")
    cluster.start("apply-1")
    cluster.wait_converged(USERS)
    writer = threading.Thread(target=flip_randomly, args=(cluster, 3000, 3, 5, 0.002))
    writer.start()
    time.sleep(0.5)
    starts = nats_server.starts
    assert writer.is_alive()
    nats_server.restart(down_for=1.0)
    writer.join(120)
    assert not writer.is_alive()
    cluster.wait_converged(USERS, timeout=90)
    assert_history_in_source_order(cluster)
    assert nats_server.starts == starts + 1


def test_postgres_restarted_mid_stream(cluster: Cluster, postgres: PostgresServer) -> None:
    seed(cluster)
    cluster.start("capture")
    cluster.start("apply-1")
    cluster.wait_converged(USERS)
    writer = threading.Thread(target=flip_randomly, args=(cluster, 3000, 4, 5, 0.002))
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive()
    postgres.restart()
    writer.join(120)
    assert not writer.is_alive()
    cluster.wait_converged(USERS, timeout=90)
    assert_history_in_source_order(cluster)


def test_roles_started_while_their_servers_are_down_wait_for_them(
    cluster: Cluster, nats_server: NatsServer, postgres: PostgresServer
) -> None:
    """A supervisor may start every role before nats-server and PostgreSQL answer (a reboot):
    capture, apply and serve wait with backoff and a WARNING naming what they wait for, and
    work once the servers are up, instead of exiting with a traceback."""
    seed(cluster, users=9)
    nats_server.stop()
    postgres.stop()
    try:
        for label in ("capture", "apply-1", "serve-1"):
            cluster.start(label)
        waiting = {
            "capture": "NATS server",
            "apply-1": "NATS server",  # the engine is opened first: PostgreSQL, then NATS
            "serve-1": "engine",
        }

        def all_waiting() -> bool:
            logs = {label: cluster.log(label) for label in waiting}
            return all("retry attempt=1" in text for text in logs.values())

        cluster.wait_for("every role to report that it waits", all_waiting, timeout=30)
        assert "Traceback" not in "".join(cluster.log(label) for label in waiting)
        postgres.start()
        cluster.wait_for(
            "apply to wait for NATS", lambda: waiting["apply-1"] in cluster.log("apply-1")
        )
    finally:
        if nats_server.process is None:
            nats_server.start()
        with contextlib.suppress(subprocess.CalledProcessError):
            postgres.start()  # already running when the block above got that far
    cluster.wait_converged(9, timeout=90)
    client = boto3.client(
        "pinpoint",
        endpoint_url=f"http://127.0.0.1:{cluster.ports['serve-1']}",
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )

    def served() -> bool:
        with contextlib.suppress(Exception):  # not listening yet
            apps = client.get_apps()["ApplicationsResponse"]["Item"]
            return any(a["Name"] == APP for a in apps)
        return False

    cluster.wait_for("serve-1 to answer", served)
    for label in waiting:
        assert "recovered after attempts=" in cluster.log(label), cluster.log(label)[-2000:]


def test_two_api_servers_serve_the_same_endpoints(cluster: Cluster) -> None:
    seed(cluster, users=9)
    cluster.start("capture")
    cluster.start("apply-1")
    cluster.start("serve-1")
    cluster.start("serve-2")
    clients = []
    for label in ("serve-1", "serve-2"):
        clients.append(
            boto3.client(
                "pinpoint",
                endpoint_url=f"http://127.0.0.1:{cluster.ports[label]}",
                region_name="us-east-1",
                aws_access_key_id=KEY_ID,
                aws_secret_access_key=SECRET,
                config=botocore.config.Config(retries={"max_attempts": 1}),
            )
        )

    def app_id() -> str | None:
        try:
            apps = clients[0].get_apps()["ApplicationsResponse"]["Item"]
        except Exception:  # not listening yet
            return None
        return next((a["Id"] for a in apps if a["Name"] == APP), None)

    cluster.wait_listening("serve-1")
    cluster.wait_listening("serve-2")
    cluster.wait_for("the app through serve-1", lambda: app_id() is not None)
    app = app_id()
    assert app is not None
    first, second = clients

    def endpoint_on_second() -> bool:
        try:
            second.get_endpoint(ApplicationId=app, EndpointId=endpoint_id(9))
        except second.exceptions.NotFoundException:
            return False
        return True

    cluster.wait_for("user9 through serve-2", endpoint_on_second)
    first.update_endpoint(
        ApplicationId=app,
        EndpointId="api-made",
        EndpointRequest={"ChannelType": "SMS", "Address": "+12065550999", "OptOut": "ALL"},
    )
    made = second.get_endpoint(ApplicationId=app, EndpointId="api-made")["EndpointResponse"]
    assert made["OptOut"] == "ALL"
    second.delete_endpoint(ApplicationId=app, EndpointId="api-made")
    with pytest.raises(first.exceptions.NotFoundException):
        first.get_endpoint(ApplicationId=app, EndpointId="api-made")
    # A console session made on serve-1 works on serve-2: both sign with OPTSYNC_CONSOLE_SECRET.
    one = f"http://127.0.0.1:{cluster.ports['serve-1']}"
    two = f"http://127.0.0.1:{cluster.ports['serve-2']}"
    with httpx.Client(follow_redirects=False) as browser:
        form = browser.get(f"{one}/console/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None
        signed_in = browser.post(
            f"{one}/console/login",
            data={"key_id": KEY_ID, "secret": SECRET, "csrf_token": token[1], "next": "/console/"},
        )
        assert signed_in.status_code == 303, signed_in.text
        page = browser.get(f"{two}/console/apps/{app}/endpoints")
        assert page.status_code == 200, page.headers.get("location")
    with httpx.Client(follow_redirects=False) as stranger:
        assert stranger.get(f"{two}/console/apps/{app}/endpoints").status_code in (302, 303)
    # serve-2 SIGKILLed: serve-1 goes on serving the same data.
    cluster.kill("serve-2")
    with cluster.source() as conn:
        conn.execute("UPDATE optin_status SET optin = 0 WHERE userid = 'user9'")

    def opted_out_on_first() -> bool:
        reply = first.get_endpoint(ApplicationId=app, EndpointId=endpoint_id(9))
        return bool(reply["EndpointResponse"]["OptOut"] == "ALL")

    cluster.wait_for("user9's opt-out through serve-1", opted_out_on_first)


def test_dead_letters_of_every_worker_are_listed_from_any_machine(cluster: Cluster) -> None:
    """The DLQ lives in the engine's PostgreSQL: `optsync dlq list --config apply.toml` (and
    `status`) see a worker's dead letters from another process, with no data folder of theirs."""
    seed(cluster, users=3)
    with cluster.source() as conn:
        conn.execute(
            "INSERT INTO optin_status (userid, phone, optin) VALUES ('poison', 'not-a-number', 1)"
        )
    cluster.start("capture")
    cluster.start("apply-1")
    cluster.wait_converged(3)
    elsewhere = cluster.folder / "elsewhere"
    elsewhere.mkdir()
    config = str(cluster.folder / "apply.toml")

    def listed() -> str:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("optsync")), "dlq", "list", "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=elsewhere,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    cluster.wait_for("the poison row in the DLQ", lambda: "1 dead letters" in listed())
    assert "phone" in listed()
    status = subprocess.run(
        [str(Path(sys.executable).with_name("optsync")), "status", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=elsewhere,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert "1 entries" in status.stdout
    assert not any(elsewhere.iterdir())  # nothing was created where the commands ran
