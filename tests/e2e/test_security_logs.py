"""No personal data in the log of ``optsync run`` capturing a private MariaDB: phone numbers and
e-mail addresses go through the snapshot, the binlog, apply (valid and invalid ones, so the DLQ
too) and the API, and none of them appears in the captured output. The same check on ``optsync
up`` is in test_security_web.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mariadb_server import MariaDBServer
from mariadb_server import mariadb_fixture as _mariadb_fixture  # noqa: F401 (the fixture)
from pinpoint_e2e import KEY_ID, SECRET, Server, Signed, clean_env, optsync_command
from pipeline_e2e import wait_for
from ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

USER, PASSWORD = "optsync_logs", "logs-secret"
DATABASE = "security_logs"
APP = "logs-demo"
PHONES = {"user1": "+12065550111", "user2": "+12065550112", "user3": "+442079460113"}
EMAILS = {"user1": "ann.one@example.com", "user2": "bob.two@example.net"}
BAD_PHONE, BAD_EMAIL = "2065550199 ext 7", "not-an-address@"
E_MAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


@pytest.fixture
def source(mariadb: MariaDBServer) -> Iterator[MariaDBServer]:
    mariadb.execute(
        f"CREATE USER IF NOT EXISTS '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
        f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{USER}'@'%'",
        f"DROP DATABASE IF EXISTS {DATABASE}",
        f"CREATE DATABASE {DATABASE}",
    )
    mariadb.execute(
        "CREATE TABLE optin_status (userid VARCHAR(64) PRIMARY KEY, phone VARCHAR(32), "
        "optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
        "CREATE TABLE email_optin (userid VARCHAR(64) PRIMARY KEY, email VARCHAR(128), "
        "optin TINYINT(1), lastupdate TIMESTAMP DEFAULT CURRENT_TIMESTAMP)",
        *(
            f"INSERT INTO optin_status (userid, phone, optin) VALUES ('{u}', '{p}', 1)"
            for u, p in PHONES.items()
        ),
        *(
            f"INSERT INTO email_optin (userid, email, optin) VALUES ('{u}', '{e}', 1)"
            for u, e in EMAILS.items()
        ),
        database=DATABASE,
    )
    yield mariadb
    mariadb.execute(f"DROP DATABASE IF EXISTS {DATABASE}")


def config(folder: Path, server: MariaDBServer, port: int) -> Path:
    path = folder / "optsync.toml"
    path.write_text(
        f"data_dir = {json.dumps(str(folder / 'data'))}\n\n"
        "[source]\n"
        f'url = "{server.url(USER, PASSWORD, DATABASE)}"\n'
        'tables = ["optin_status", "email_optin"]\n\n'
        '[stream]\nurl = "embedded"\n\n'
        f'[engine]\nstore = "sqlite"\napp = "{APP}"\nchannels = ["SMS", "EMAIL"]\n\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\n\n'
        '[[mapping]]\ntable = "optin_status"\nchannel = "SMS"\naddress = "phone"\n'
        'user_id = "userid"\nopt_in = "optin"\neffective_date = "lastupdate"\n\n'
        '[[mapping]]\ntable = "email_optin"\nchannel = "EMAIL"\naddress = "email"\n'
        'user_id = "userid"\nopt_in = "optin"\neffective_date = "lastupdate"\n'
        'endpoint_id = "{userid}_email"\n'
    )
    return path


def test_no_phone_number_or_e_mail_in_the_log_of_a_mariadb_run(
    tmp_path: Path, source: MariaDBServer
) -> None:
    port = free_port()
    log = tmp_path / "run.log"
    command = [*optsync_command(), "run", "--config", str(config(tmp_path, source, port))]
    env = clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        server.wait_healthy()
        api = Signed(server.url)

        def app_id() -> str:
            apps = api.get_json("/v1/apps")["Item"]
            return next(a["Id"] for a in apps if a["Name"] == APP)

        def endpoint(endpoint_id: str) -> dict[str, str] | None:
            found = api.request("GET", f"/v1/apps/{app_id()}/endpoints/{endpoint_id}")
            return found.json() if found.status_code == 200 else None

        wait_for(lambda: endpoint("user2_email") is not None, "the snapshot", 60)
        # The binlog: an opt-out, a number change, a new user, and two addresses that are none.
        source.execute(
            "UPDATE optin_status SET optin = 0 WHERE userid = 'user1'",
            "UPDATE optin_status SET phone = '+12065550114' WHERE userid = 'user2'",
            "INSERT INTO optin_status (userid, phone, optin) VALUES ('user4', '+12065550115', 1)",
            f"INSERT INTO optin_status (userid, phone, optin) VALUES ('user5', '{BAD_PHONE}', 1)",
            f"INSERT INTO email_optin (userid, email, optin) VALUES ('user5', '{BAD_EMAIL}', 1)",
            "UPDATE email_optin SET optin = 0 WHERE userid = 'user1'",
            database=DATABASE,
        )
        wait_for(
            lambda: (
                (endpoint("user1_email") or {}).get("OptOut") == "ALL"
                and endpoint("user4_+12065550115") is not None
            ),
            "the binlog changes",
            60,
        )
        api.request("GET", f"/v1/apps/{app_id()}/endpoints/user9_+12065550119")  # a 404
    finally:
        server.stop()
    output = server.output()
    assert "snapshot done" in output and "request method=GET" in output, output[-3000:]
    personal = {
        *PHONES.values(),
        *(p.lstrip("+") for p in PHONES.values()),
        *EMAILS.values(),
        "+12065550114",
        "12065550114",
        "+12065550115",
        "12065550115",
        "12065550119",
        BAD_PHONE,
        "2065550199",
        BAD_EMAIL,
        PASSWORD,  # the source URL's password, masked as *** where the URL is shown
    }
    leaked = sorted(s for s in personal if s in output)
    assert leaked == [], "\n".join(
        line for line in output.splitlines() if any(s in line for s in leaked)
    )
    assert not E_MAIL.search(output), E_MAIL.search(output)
