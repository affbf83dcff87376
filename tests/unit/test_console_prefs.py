"""The preference center in-process: demo sign-in, CSRF, and writes to the SOURCE table only."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_console import Client

from optsync.api.app import PinpointApi
from optsync.cli import cli
from optsync.config import MappingSettings, Settings, SourceSettings
from optsync.engine.models import ChannelType
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import ConfigError
from optsync.prefcenter import create_prefcenter, prefs_context
from optsync.prefcenter.source import PreferenceStore, source_table
from optsync.sample import create_sample_database

RULE = MappingSettings(
    table="optin_status",
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)


def settings_for(folder: Path, *rules: MappingSettings) -> Settings:
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


SWITCH_FORM = re.compile(r'<form method="post" action="/prefs/optin">(.*?)</form>', re.S)
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


def switch_forms(page: str) -> list[dict[str, str]]:
    """The fields of each on/off switch's form, as the browser would post them."""
    return [dict(HIDDEN.findall(form)) for form in SWITCH_FORM.findall(page)]


def test_the_sign_in_page_says_it_is_demo_grade(client: Client) -> None:
    page = client.get("/prefs/")
    assert page.status_code == 200
    assert "Demo sample app." in page.text
    assert "demo sign-in: no password" in page.text
    assert 'name="user_id"' in page.text


def test_a_user_sees_their_numbers_and_nobody_else_s(client: Client) -> None:
    assert sign_in(client, "user1") == 303
    page = client.get("/prefs/")
    assert '<span class="pref-address">+1234•••••11</span>' in page.text
    assert "+1234•••••12" not in page.text
    assert 'role="switch" aria-checked="true"' in page.text


def test_the_number_is_masked_everywhere_on_the_page(client: Client) -> None:
    """Issue 13: the message masked the number, the list, the switch and its form did not."""
    sign_in(client, "user2")
    (form,) = switch_forms(client.get("/prefs/").text)
    assert client.post("/prefs/optin", form).status_code == 303
    page = client.get("/prefs/").text
    assert "Saved: Text messages (SMS) off for +1234•••••12." in page
    assert '<span class="pref-address">+1234•••••12</span>' in page
    assert 'aria-label="Text messages (SMS) to +1234•••••12"' in page
    assert "1111112" not in page  # nor in a hidden field, an attribute or the page's markup


def test_e_mail_addresses_are_masked_too(folder: Path, client: Client) -> None:
    conn = sqlite3.connect(folder / "app.db")
    with conn:
        conn.execute("ALTER TABLE optin_status ADD COLUMN email TEXT")
        conn.execute("UPDATE optin_status SET email = 'one@example.com' WHERE userid = 'user1'")
    conn.close()
    sign_in(client, "user1")
    page = client.get("/prefs/").text
    assert "o•••@example.com" in page
    assert "one@example.com" not in page


def test_an_unknown_user_is_not_signed_in(client: Client) -> None:
    assert sign_in(client, "mallory") == 401
    assert 'name="user_id"' in client.get("/prefs/").text


def test_opting_out_writes_the_source_table(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user2")
    (form,) = switch_forms(client.get("/prefs/").text)
    assert form["optin"] == "0"  # the switch is on: its form turns it off
    response = client.post("/prefs/optin", form)
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
    (form,) = switch_forms(page.text)
    client.post("/prefs/optin", form)
    assert rows(folder / "app.db")["user2"][0] == 1


def test_a_post_without_the_csrf_token_changes_nothing(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user3")
    form = {"channel": "SMS", "row": "3", "optin": "0"}
    response = client.post("/prefs/optin", form)
    assert response.status_code == 403
    assert "the form has no token" in response.text
    assert rows(folder / "app.db") == before


def test_sign_in_needs_the_csrf_token_too(client: Client) -> None:
    assert client.post("/prefs/login", {"user_id": "user1"}).status_code == 403


def test_a_user_cannot_change_someone_else_s_number(client: Client, folder: Path) -> None:
    before = rows(folder / "app.db")
    sign_in(client, "user1")
    (form,) = switch_forms(client.get("/prefs/").text)
    conn = sqlite3.connect(folder / "app.db")
    (user4_row,) = conn.execute("SELECT rowid FROM optin_status WHERE userid = 'user4'").fetchone()
    conn.close()
    for row in (str(user4_row), "999", "x"):
        response = client.post("/prefs/optin", form | {"row": row})
        assert response.status_code == 404, row
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
    email_rule = MappingSettings(
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
    anonymous = MappingSettings(table="optin_status", address="phone", opt_in="optin")
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
