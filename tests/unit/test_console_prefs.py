"""The preference center in-process: demo sign-in, CSRF, and writes to the SOURCE table only."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_console import CSRF, Client

from optsync.api.app import PinpointApi
from optsync.apply.mapping import MappingRule
from optsync.capture.sample import create_sample_database
from optsync.cli import cli
from optsync.config import Settings, SourceSettings
from optsync.engine.models import ChannelType
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import ConfigError
from optsync.prefcenter import create_prefcenter, prefs_context
from optsync.prefcenter.source import PreferenceStore, source_table

RULE = MappingRule(
    table="optin_status",
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)


def settings_for(folder: Path, *rules: MappingRule) -> Settings:
    return Settings(
        data_dir=folder,
        source=SourceSettings(url=f"sqlite:///{folder / 'app.db'}", tables=("optin_status",)),
        mappings=rules or (RULE,),
    )


def rows(db: Path) -> dict[str, tuple[int, str]]:
    conn = sqlite3.connect(db)
    try:
        found = conn.execute("SELECT userid, optin, lastupdate FROM optin_status").fetchall()
    finally:
        conn.close()
    return {user: (optin, updated) for user, optin, updated in found}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    create_sample_database(tmp_path / "app.db")
    return tmp_path


@pytest.fixture
def client(folder: Path) -> Iterator[Client]:
    store = SQLiteStore(":memory:")
    prefs = create_prefcenter(prefs_context(settings_for(folder)))
    c = Client(PinpointApi(store, None, mounts={"/prefs": prefs}))
    yield c
    c.close()
    store.close()


def sign_in(client: Client, user_id: str) -> int:
    token = client.token("/prefs/")
    return client.post("/prefs/login", {"user_id": user_id, "csrf_token": token}).status_code


def test_the_sign_in_page_says_it_is_demo_grade(client: Client) -> None:
    page = client.get("/prefs/")
    assert page.status_code == 200
    assert "Demo sample app." in page.text
    assert "demo sign-in: no password" in page.text
    assert 'name="user_id"' in page.text


def test_a_user_sees_their_numbers_and_nobody_else_s(client: Client) -> None:
    assert sign_in(client, "user1") == 303
    page = client.get("/prefs/")
    assert "+12341111111" in page.text
    assert "+12341111112" not in page.text
    assert 'role="switch" aria-checked="true"' in page.text


def test_an_unknown_user_is_not_signed_in(client: Client) -> None:
    assert sign_in(client, "mallory") == 401
    assert 'name="user_id"' in client.get("/prefs/").text


def test_opting_out_writes_the_source_table(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user2")
    token = CSRF.search(client.get("/prefs/").text)
    assert token
    form = {"csrf_token": token.group(1), "channel": "SMS", "address": "+12341111112"}
    response = client.post("/prefs/optin", form | {"optin": "0"})
    assert response.status_code == 303
    after = rows(folder / "app.db")
    assert after["user2"][0] == 0
    assert after["user2"][1] > before["user2"][1]  # lastupdate moves: the mapping's EffectiveDate
    assert {u: r for u, r in after.items() if u != "user2"} == {
        u: r for u, r in before.items() if u != "user2"
    }
    page = client.get("/prefs/")
    assert 'aria-checked="false"' in page.text
    assert "Saved: Text messages (SMS) off for +1234•••••12." in page.text
    client.post("/prefs/optin", form | {"optin": "1"})
    assert rows(folder / "app.db")["user2"][0] == 1


def test_a_post_without_the_csrf_token_changes_nothing(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user3")
    form = {"channel": "SMS", "address": "+12341111113", "optin": "0"}
    response = client.post("/prefs/optin", form)
    assert response.status_code == 403
    assert "the form has no token" in response.text
    assert rows(folder / "app.db") == before


def test_sign_in_needs_the_csrf_token_too(client: Client) -> None:
    assert client.post("/prefs/login", {"user_id": "user1"}).status_code == 403


def test_a_user_cannot_change_someone_else_s_number(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user1")
    token = CSRF.search(client.get("/prefs/").text)
    assert token
    form = {"csrf_token": token.group(1), "channel": "SMS", "address": "+12341111114"}
    response = client.post("/prefs/optin", form | {"optin": "0"})
    assert response.status_code == 404
    assert rows(folder / "app.db") == before


def test_the_preference_cookie_is_its_own(client: Client) -> None:
    token = client.token("/prefs/")
    response = client.post("/prefs/login", {"user_id": "user1", "csrf_token": token})
    cookie = response.headers["set-cookie"].lower()
    assert cookie.startswith("optsync_prefs=")
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/prefs;" in cookie


def test_an_email_column_is_shown(folder: Path) -> None:
    conn = sqlite3.connect(folder / "app.db")
    with conn:
        conn.execute("ALTER TABLE optin_status ADD COLUMN email TEXT")
        conn.execute("UPDATE optin_status SET email = 'one@example.com' WHERE userid = 'user1'")
    conn.close()
    store = PreferenceStore(source_table(settings_for(folder)))
    assert store.other_emails("user1") == ["one@example.com"]
    email_rule = MappingRule(
        table="optin_status",
        channel=ChannelType.EMAIL,
        address="email",
        user_id="userid",
        opt_in="optin",
    )
    both = PreferenceStore(source_table(settings_for(folder, RULE, email_rule)))
    assert both.other_emails("user1") == []
    assert [p.channel for p in both.preferences("user1")] == [ChannelType.SMS, ChannelType.EMAIL]


def test_the_page_needs_a_sqlite_source_and_a_user_id_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SQLite source"):
        source_table(Settings(data_dir=tmp_path, mappings=(RULE,)))
    anonymous = MappingRule(table="optin_status", address="phone", opt_in="optin")
    with pytest.raises(ConfigError, match="user_id column"):
        source_table(settings_for(tmp_path, anonymous))


def test_run_serves_the_page_only_when_asked_and_with_an_api(tmp_path: Path) -> None:
    config = tmp_path / "optsync.toml"
    config.write_text(
        f'data_dir = "{tmp_path}"\n[source]\nurl = "sqlite:///{tmp_path / "app.db"}"\n'
        'tables = ["optin_status"]\n[[mapping]]\ntable = "optin_status"\naddress = "phone"\n'
        'user_id = "userid"\nopt_in = "optin"\n'
    )
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--prefs"])
    assert isinstance(result.exception, ConfigError)
    assert "--prefs needs an [api] table" in str(result.exception)
    assert "--prefs" in CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--no-prefs" in CliRunner().invoke(cli, ["up", "--help"]).output
