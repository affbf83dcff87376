"""The AWS blog's walkthrough on a scale-out deployment, all on this machine.

    .venv/bin/python examples/cluster/run.py        (or: make cluster)

Starts a private nats-server (JetStream), a private PostgreSQL (the engine and its DLQ) and a
private MariaDB (the source: the AWS sample's ``optin_status`` table with nine users), then one
``optsync capture``, two ``optsync apply`` and two ``optsync serve``, each from its own config in
this folder (the URLs of the private servers go in through ``OPTSYNC_*_URL``). It runs the blog's
statements, SIGKILLs one apply worker and one API server half-way, and prints the US segment's
estimate from both API servers after each step: 9 → 5 → 4. Everything it started is stopped on
exit, Ctrl-C included; ``--keep`` leaves the logs folder and prints it.

The private servers come from ``tests/servers`` (the same launchers the tests use: free ports,
temporary folders, the machine's own servers untouched). Exit code 0 only if both API servers
show 9 → 5 → 4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "servers"))

import botocore.session  # noqa: E402
from botocore.auth import SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402
from mariadb_server import MariaDBServer, require_binaries  # noqa: E402
from nats_server import NatsServer  # noqa: E402
from nats_server import running_server as running_nats  # noqa: E402
from ports import free_port  # noqa: E402
from postgres_server import running_server  # noqa: E402

KEY_ID, SECRET = "CLUSTERKEY", "cluster-example-secret"
CONSOLE_SECRET = "cluster-example-console-secret-0123456789"
APP = "optin-demo"
SEGMENT = "US-Segment"
TIMEOUT = 60.0
USERS = [(f"user{n}", f"+1234111111{n}", 1) for n in range(1, 10)]


def say(text: str) -> None:
    print(text, flush=True)


class Process:
    """One optsync command, its output in a log file; SIGKILL or stop it."""

    def __init__(self, label: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.label = label
        self.args = args
        self.env = env
        self.log = logs / f"{label}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        optsync = Path(sys.executable).with_name("optsync")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(optsync), *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches run.py only; it stops each in turn
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.label} exited ({self.process.returncode}):\n{tail}")


class Api:
    """A signed client of one ``optsync serve``: boto3's model through botocore, and the
    estimate extension route."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.pinpoint: Any = botocore.session.get_session().create_client(
            "pinpoint",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def estimate(self, app_id: str, segment_id: str) -> tuple[int, int]:
        url = f"{self.url}/v1/apps/{app_id}/segments/{segment_id}/estimate"
        request = AWSRequest(method="GET", url=url)
        SigV4Auth(Credentials(KEY_ID, SECRET), "mobiletargeting", "us-east-1").add_auth(request)
        signed = urllib.request.Request(url, headers=dict(request.headers))
        with urllib.request.urlopen(signed, timeout=5) as reply:
            body = json.loads(reply.read())
        return int(body["TotalEndpoints"]), int(body["EligibleEndpoints"])


def wait_until(what: str, check: Callable[[], bool], watch: list[Process]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        for process in watch:
            process.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextlib.contextmanager
def servers() -> Iterator[tuple[MariaDBServer, Any, NatsServer]]:
    require_binaries()
    with (
        MariaDBServer.started() as mariadb,
        running_server() as postgres,
        running_nats() as nats,
    ):
        yield mariadb, postgres, nats


def prepare_source(mariadb: MariaDBServer) -> None:
    """The AWS sample's database, table and users, and the capture user with its grants."""
    mariadb.execute(
        "CREATE DATABASE blog_db",
        "CREATE TABLE blog_db.optin_status (userid VARCHAR(64), phone VARCHAR(32), "
        "optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
        "CREATE USER 'optsync'@'%' IDENTIFIED BY 'secret'",
        "GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'optsync'@'%'",
        "INSERT INTO blog_db.optin_status (userid, phone, optin) VALUES "
        + ", ".join(f"('{u}', '{p}', {o})" for u, p, o in USERS),
    )


def prepare_engine(postgres: Any) -> None:
    postgres.sql("CREATE ROLE optsync LOGIN PASSWORD 'secret'")
    postgres.sql("CREATE DATABASE optsync OWNER optsync")


def run(logs: Path) -> bool:
    with servers() as (mariadb, postgres, nats):
        prepare_source(mariadb)
        prepare_engine(postgres)
        say(
            f"servers: MariaDB :{mariadb.port} (source), PostgreSQL :{postgres.port} (engine), "
            f"nats-server :{nats.port} (stream)"
        )
        # Each role is given only the URLs it uses.
        source = {"OPTSYNC_SOURCE_URL": mariadb.url("optsync", "secret", "blog_db")}
        stream = {"OPTSYNC_STREAM_URL": nats.url}
        engine = {"OPTSYNC_ENGINE_URL": postgres.url("optsync", "secret", "optsync")}
        api = {
            "OPTSYNC_API_CREDENTIALS": f"{KEY_ID}:{SECRET}",
            "OPTSYNC_CONSOLE_SECRET": CONSOLE_SECRET,
        }
        ports = [free_port(), free_port()]

        def role(label: str, args: list[str], urls: dict[str, str]) -> Process:
            env = {**os.environ, **urls, "OPTSYNC_DATA_DIR": str(logs / label)}
            return Process(label, args, env, logs)

        processes = {
            "capture": role(
                "capture", ["capture", "--config", str(HERE / "capture.toml")], source | stream
            ),
            **{
                f"apply-{n}": role(
                    f"apply-{n}", ["apply", "--config", str(HERE / "apply.toml")], stream | engine
                )
                for n in (1, 2)
            },
            **{
                f"serve-{n}": role(
                    f"serve-{n}",
                    ["serve", "--config", str(HERE / "serve.toml"), "--port", str(port)],
                    engine | api,
                )
                for n, port in zip((1, 2), ports, strict=True)
            },
        }
        try:
            return walkthrough(mariadb, processes, [Api(p) for p in ports])
        finally:
            for process in processes.values():
                process.stop()


def walkthrough(mariadb: MariaDBServer, processes: dict[str, Process], apis: list[Api]) -> bool:
    for label in ("apply-1", "apply-2", "capture", "serve-1", "serve-2"):
        processes[label].start()
    say("started: capture, apply-1, apply-2, serve-1, serve-2")
    alive = list(processes.values())
    wait_until("both API servers", lambda: all(api.up() for api in apis), alive)
    first = apis[0].pinpoint
    wait_until(
        f"the app {APP!r} (made by the apply workers)",
        lambda: any(a["Name"] == APP for a in first.get_apps()["ApplicationsResponse"]["Item"]),
        alive,
    )
    app_id = next(
        a["Id"] for a in first.get_apps()["ApplicationsResponse"]["Item"] if a["Name"] == APP
    )
    first.update_sms_channel(ApplicationId=app_id, SMSChannelRequest={"Enabled": True})
    segment_id = first.create_segment(
        ApplicationId=app_id,
        WriteSegmentRequest={
            "Name": SEGMENT,
            "Dimensions": {
                "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
            },
        },
    )["SegmentResponse"]["Id"]
    seen: dict[int, list[int]] = {0: [], 1: []}

    def step(label: str, eligible: int, readers: list[int]) -> None:
        for n in readers:
            wait_until(
                f"{eligible} eligible on serve-{n + 1}",
                lambda n=n: apis[n].estimate(app_id, segment_id) == (9, eligible),  # type: ignore[misc]
                [p for p in alive if p.process is not None and p.process.poll() is None],
            )
            total, shown = apis[n].estimate(app_id, segment_id)
            seen[n].append(shown)
            say(f"  {label:<44} serve-{n + 1}: {total} total, {shown} eligible")

    step("nine users captured (snapshot)", 9, [0, 1])
    mariadb.execute(
        "UPDATE blog_db.optin_status SET optin = 0 "
        "WHERE userid IN ('user1', 'user2', 'user3', 'user4')"
    )
    step("user1-user4 opt out", 5, [0, 1])
    processes["apply-2"].kill()
    processes["serve-2"].kill()
    alive = [p for p in alive if p.label not in ("apply-2", "serve-2")]
    say("  SIGKILL apply-2 and serve-2")
    mariadb.execute("UPDATE blog_db.optin_status SET optin = 0 WHERE userid = 'user5'")
    step("user5 opts out (apply-1 alone)", 4, [0])
    processes["serve-2"].start()
    alive.append(processes["serve-2"])
    wait_until("serve-2 again", apis[1].up, alive)
    step("user5 opts out, serve-2 restarted", 4, [1])
    for n in (0, 1):
        say(f"serve-{n + 1}: " + " → ".join(str(e) for e in seen[n]))
    return all(seen[n] == [9, 5, 4] for n in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="optsync-cluster-"))
    ok = False
    try:
        ok = run(logs)
    except KeyboardInterrupt:
        say("interrupted: everything started was stopped")
    finally:
        if args.keep or not ok:
            say(f"logs: {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    say("cluster walkthrough " + ("PASSED: 9 → 5 → 4 on both API servers" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
