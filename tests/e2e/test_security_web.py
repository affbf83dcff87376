"""The console and preference center of a real ``optsync up`` as an attacker meets them (CSRF,
session fixation, open redirects), and the personal data in its log: after a run that moves
phone numbers and e-mail addresses through capture, apply, the API, the console and the
preference center, none of them appears in the captured output (the log at INFO and above,
and the banner).
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from pinpoint_e2e import KEY_ID, SECRET, Server, Signed, clean_env, optsync_command
from pipeline_e2e import wait_for
from ports import free_port

from optsync.sample import SAMPLE_TABLE

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.e2e

CONSOLE_COOKIE, PREFS_COOKIE = "optsync_console", "optsync_prefs"
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
EVIL = "https://evil.example/steal"


@dataclass
class Up:
    server: Server
    data_dir: Path

    @property
    def app_db(self) -> Path:
        return self.data_dir / "app.db"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=10, follow_redirects=False)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    folder = tmp_path_factory.mktemp("optsync-up-security")
    port = free_port()
    log = folder / "up.log"
    data_dir = folder / "data"
    command = [*optsync_command(), "up", "--data-dir", str(data_dir), "--port", str(port)]
    env = clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        server.wait_healthy()
        yield Up(server, data_dir)
    finally:
        server.stop()


def token_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, page.text[:2000]
    return found.group(1)


def console_login_page(client: httpx.Client, next_: str | None = None) -> str:
    page = client.get("/console/login", params={"next": next_} if next_ else None)
    assert page.status_code == 200, page.text
    return token_of(page)


def sign_in(client: httpx.Client, token: str, next_: str = "/console/") -> httpx.Response:
    return client.post(
        "/console/login",
        data={"key_id": KEY_ID, "secret": SECRET, "csrf_token": token, "next": next_},
    )


def signed_in(client: httpx.Client) -> bool:
    response = client.get("/console/")
    return response.status_code == 200 and "/console/login" not in response.headers.get(
        "location", ""
    )


# CSRF ---------------------------------------------------------------------------------------


def test_console_posts_without_the_sessions_token_are_refused(up: Up) -> None:
    with up.client() as client:
        console_login_page(client)
        no_token = client.post("/console/login", data={"key_id": KEY_ID, "secret": SECRET})
        assert no_token.status_code == 403
        with up.client() as other:
            foreign = console_login_page(other)  # another browser's session and token
        assert sign_in(client, foreign).status_code == 403
        token = console_login_page(client)
        cross_site = client.post(
            "/console/login",
            data={"key_id": KEY_ID, "secret": SECRET, "csrf_token": token, "next": "/console/"},
            headers={"Origin": "https://evil.example"},
        )
        assert cross_site.status_code == 403
        assert not signed_in(client)

        assert sign_in(client, token).status_code == 303
        assert signed_in(client)
        # Signed in: a forged sign-out (no token) is refused and the session stays.
        assert client.post("/console/logout").status_code == 403
        assert signed_in(client)


def test_preference_center_posts_without_the_token_are_refused(up: Up) -> None:
    with closing(sqlite3.connect(up.app_db)) as conn:
        before = conn.execute(f"SELECT optin FROM {SAMPLE_TABLE} WHERE userid = 'user2'").fetchone()
    with up.client() as client:
        token = token_of(client.get("/prefs/"))
        assert client.post("/prefs/login", data={"user_id": "user2"}).status_code == 403
        signed = client.post("/prefs/login", data={"user_id": "user2", "csrf_token": token})
        assert signed.status_code == 303, signed.text
        page = client.get("/prefs/")
        assert page.status_code == 200 and "user2" in page.text
        forged = client.post("/prefs/optin", data={"channel": "SMS", "optin": "0", "row": "1"})
        assert forged.status_code == 403
        cross_site = client.post(
            "/prefs/optin",
            data={"channel": "SMS", "optin": "0", "row": "1", "csrf_token": token_of(page)},
            headers={"Origin": "https://evil.example"},
        )
        assert cross_site.status_code == 403
    with closing(sqlite3.connect(up.app_db)) as conn:
        after = conn.execute(f"SELECT optin FROM {SAMPLE_TABLE} WHERE userid = 'user2'").fetchone()
    assert after == before


# session fixation ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["console", "prefs"])
def test_signing_in_starts_a_new_session(up: Up, where: str) -> None:
    """A session cookie planted before sign-in is not the one that is signed in, and its form
    token is void afterwards."""
    cookie = CONSOLE_COOKIE if where == "console" else PREFS_COOKIE
    with up.client() as client:
        if where == "console":
            token = console_login_page(client)
            response = sign_in(client, token)
        else:
            token = token_of(client.get("/prefs/"))
            response = client.post("/prefs/login", data={"user_id": "user3", "csrf_token": token})
        planted = response.request.headers["cookie"]
        assert response.status_code == 303, response.text
        assert cookie in response.cookies, response.headers
        assert f"{cookie}={response.cookies[cookie]}" not in planted
        # The planted cookie alone is still signed out.
        with up.client() as attacker:
            attacker.headers["cookie"] = planted
            page = attacker.get(f"/{where}/")
            if where == "console":
                assert page.status_code == 303
                assert "/console/login" in page.headers["location"]
            else:
                assert "user3" not in page.text
        # The token of the planted session no longer passes.
        target = "/console/logout" if where == "console" else "/prefs/logout"
        assert client.post(target, data={"csrf_token": token}).status_code == 403


# open redirects -----------------------------------------------------------------------------

OFF_SITE = [
    EVIL,
    "//evil.example/x",
    "/\\evil.example",
    "/console/\r\nLocation: https://evil.example",
    "javascript:alert(1)",
    "/prefs/",  # another sub-application is off-limits too
]


@pytest.mark.parametrize("target", OFF_SITE)
def test_sign_in_never_redirects_off_the_console(up: Up, target: str) -> None:
    with up.client() as client:
        page = client.get("/console/login", params={"next": target})
        assert 'name="next" value="/console/"' in page.text
        response = sign_in(client, token_of(page), next_=target)
        assert response.status_code == 303
        assert response.headers["location"] == "/console/"


def test_sign_in_follows_a_next_inside_the_console(up: Up) -> None:
    with up.client() as client:
        response = sign_in(client, console_login_page(client), next_="/console/pipeline")
        assert response.status_code == 303
        assert response.headers["location"] == "/console/pipeline"


def test_reveal_redirects_only_inside_the_console(up: Up) -> None:
    with up.client() as client:
        assert sign_in(client, console_login_page(client)).status_code == 303
        token = token_of(client.get("/console/pipeline"))
        for target in (EVIL, "//evil.example"):
            response = client.post(
                "/console/reveal", data={"csrf_token": token, "next": target, "on": "0"}
            )
            assert response.status_code == 303
            assert response.headers["location"].startswith("/console/")
            assert "evil" not in response.headers["location"]


# personal data in the log -------------------------------------------------------------------


def personal_strings(up: Up, extra: list[str]) -> set[str]:
    """Every phone number (with and without its +) and e-mail address the run handled."""
    with closing(sqlite3.connect(up.app_db)) as conn:
        phones = [r[0] for r in conn.execute(f"SELECT phone FROM {SAMPLE_TABLE}")]
    found = set(extra)
    for value in [*phones, *extra]:
        found.add(value)
        if value.startswith("+"):
            found.add(value[1:])
    return {v for v in found if v}


def test_no_phone_number_or_e_mail_in_the_log_of_optsync_up(up: Up) -> None:
    api = Signed(up.server.url)
    apps = api.get_json("/v1/apps")["Item"]
    app_id = next(a["Id"] for a in apps if a["Name"] == "optin-demo")
    email, phone, bad = "jane.doe@example.org", "+12065550177", "+1999555017"

    def put(endpoint: str, body: dict[str, Any]) -> int:
        return api.request(
            "PUT",
            f"/v1/apps/{app_id}/endpoints/{endpoint}",
            httpx.Request("PUT", "/", json=body).content,
        ).status_code

    assert put(f"mail_{email}", {"Address": email, "ChannelType": "EMAIL"}) == 202
    assert put(f"sms_{phone}", {"Address": phone, "ChannelType": "SMS", "OptOut": "ALL"}) == 202
    assert put("bad", {"Address": bad, "ChannelType": "SMS"}) in (202, 400)
    opt_out = api.request(
        "POST",
        f"/v1/apps/{app_id}/opt-outs",
        httpx.Request("POST", "/", json={"Address": phone, "Keyword": "STOP"}).content,
    )
    assert opt_out.status_code in (200, 201, 202), opt_out.text
    api.request(
        "POST",
        "/v1/phone/number/validate",
        httpx.Request("POST", "/", json={"PhoneNumber": phone}).content,
    )
    api.request("GET", f"/v1/apps/{app_id}/endpoints/sms_{phone}")
    api.request("GET", f"/v1/apps/{app_id}/endpoints/no_such_{email}")  # a 404 naming it

    # The source: an opt-out, a new user with a number, one with a number that is no number.
    with closing(sqlite3.connect(up.app_db, isolation_level=None, timeout=10)) as conn:
        conn.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = 'user1'")
        conn.execute(
            f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES "
            "('user90', '+12065550190', 1), ('user91', 'call 2065550191 please', 1)"
        )
    with up.client() as client:
        assert sign_in(client, console_login_page(client)).status_code == 303
        client.get(f"/console/apps/{app_id}/endpoints", params={"q": phone})
        client.get(f"/console/apps/{app_id}/endpoints", params={"q": email})
    with up.client() as client:  # a sign-in with personal data typed in: refused and logged
        token = console_login_page(client)
        refused = client.post(
            "/console/login",
            data={"key_id": phone, "secret": email, "csrf_token": token, "next": "/console/"},
        )
        assert refused.status_code == 401

    def applied() -> bool:
        found = api.request("GET", f"/v1/apps/{app_id}/endpoints/user90_+12065550190")
        return found.status_code == 200

    wait_for(applied, "the new source row to reach the engine", timeout=30)
    up.server.process.poll()
    output = up.server.output()
    assert "request method=PUT" in output  # the log was captured
    check: Callable[[str], bool] = output.__contains__
    leaked = sorted(
        s
        for s in personal_strings(up, [email, phone, bad, "+12065550190", "2065550191"])
        if check(s)
    )
    assert leaked == [], "\n".join(
        line for line in output.splitlines() if any(s in line for s in leaked)
    )
    assert not re.search(r"[\w.+-]+@[\w-]+\.[\w.]+", output), "an e-mail address in the log"
