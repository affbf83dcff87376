"""One source row, several endpoints: an SMS and an EMAIL endpoint from a user row.

The pipeline runs in-process on a real SQLite source, the embedded stream and the SQLite engine;
the application is a plain ``sqlite3`` connection. Each rule of the table maps the row on its own
(own opt-in column, own endpoint id), so an opt-out on one channel never touches the other, a bad
e-mail address keeps the SMS write and sends the rest to the DLQ, and a delete removes both.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgspec
import pytest

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.backends import store_settings
from optsync.config import MappingSettings, Settings, SourceSettings, load_settings
from optsync.engine.models import ChannelType, OptOut
from optsync.engine.segments import definition_from_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.pipeline import Pipeline

pytestmark = pytest.mark.integration

SMS = MappingSettings(
    table="users", channel=ChannelType.SMS, address="phone", opt_in="sms_optin", user_id="userid"
)
EMAIL = MappingSettings(
    table="users",
    channel=ChannelType.EMAIL,
    address="email",
    opt_in="email_optin",
    user_id="userid",
)
TIMEOUT = 20.0

State = dict[str, tuple[str, str, str]]
"""Endpoint id -> (ChannelType, Address, OptOut)."""


@contextmanager
def pipeline(folder: Path) -> Iterator[Pipeline]:
    source = folder / "app.db"
    with closing(sqlite3.connect(source, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE users (userid TEXT PRIMARY KEY, phone TEXT, sms_optin INTEGER, "
            "email TEXT, email_optin INTEGER)"
        )
    settings: Settings = msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=folder / "data",
        source=SourceSettings(url=f"sqlite:///{source}", tables=("users",)),
        mappings=(SMS, EMAIL),
        serve_api=False,
    )
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    try:
        running = Pipeline(settings, store)
        running.start()
        try:
            yield running
        finally:
            running.stop()
        running.check()
    finally:
        store.close()


def execute(folder: Path, sql: str, *params: object) -> None:
    with closing(sqlite3.connect(folder / "app.db", isolation_level=None)) as conn:
        conn.execute(sql, params)


def state(running: Pipeline) -> State:
    with closing(sqlite3.connect(running.settings.engine_path)) as conn:
        rows = conn.execute(
            "SELECT id, channel_type, address, opt_out FROM endpoints WHERE app_id = ?",
            (running.app.id,),
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def wait_for(running: Pipeline, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        running.check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_one_row_makes_an_sms_and_an_email_endpoint_with_their_own_consent(
    tmp_path: Path,
) -> None:
    with pipeline(tmp_path) as running:
        execute(
            tmp_path,
            "INSERT INTO users VALUES ('u1', '+12065550101', 1, ' Ann@Example.COM ', 0)",
        )
        want: State = {
            "u1_+12065550101": ("SMS", "+12065550101", OptOut.NONE.value),
            "u1_ Ann@Example.COM ": ("EMAIL", "ann@example.com", OptOut.ALL.value),
        }
        # The default id template is the sample's {userid}_{address} over raw column values.
        wait_for(running, lambda: state(running) == want, "both endpoints")

        # An opt-out on SMS leaves the e-mail consent alone, and the other way round.
        execute(tmp_path, "UPDATE users SET sms_optin = 0, email_optin = 1 WHERE userid = 'u1'")
        want = {
            "u1_+12065550101": ("SMS", "+12065550101", OptOut.ALL.value),
            "u1_ Ann@Example.COM ": ("EMAIL", "ann@example.com", OptOut.NONE.value),
        }
        wait_for(running, lambda: state(running) == want, "the channel-wise opt-out")

        # A segment on the channel dimension counts each channel's endpoints.
        store, app_id = running.store, running.app.id
        email_segment = store.create_segment(
            app_id,
            definition_from_wire(
                {
                    "Name": "email",
                    "Dimensions": {"Demographic": {"Channel": {"Values": ["EMAIL"]}}},
                },
                require_name=True,
            ),
        )
        estimate = store.estimate(app_id, email_segment.id)
        assert (estimate.total, estimate.eligible) == (1, 1)

        # The row goes away: both endpoints go with it.
        execute(tmp_path, "DELETE FROM users WHERE userid = 'u1'")
        wait_for(running, lambda: state(running) == {}, "both deletes")


def test_a_bad_email_keeps_the_sms_write_and_sends_the_row_to_the_dlq(tmp_path: Path) -> None:
    with pipeline(tmp_path) as running:
        execute(tmp_path, "INSERT INTO users VALUES ('u2', '+12065550102', 0, 'ann@localhost', 1)")
        want = {"u2_+12065550102": ("SMS", "+12065550102", OptOut.ALL.value)}
        wait_for(running, lambda: state(running) == want, "the SMS endpoint")
        dlq = SQLiteDeadLetterQueue(running.settings.dlq_path)
        try:
            wait_for(running, lambda: dlq.count() == 1, "the dead letter")
            (letter,) = dlq.list(limit=10)
        finally:
            dlq.close()
        assert "column 'email' does not hold an e-mail address" in letter.reason
        assert "the domain has no dot" in letter.reason
        assert "ann@localhost" not in letter.reason
