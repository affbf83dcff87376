"""The EUM SMS sink and inbound poller in a running pipeline, against the stand-in EUM server.

A real SQLite source (the AWS sample's ``optin_status``), the embedded stream and the SQLite
engine run in-process (``Pipeline``); the sink and the poller talk to ``eum_server`` through
boto3's real ``pinpoint-sms-voice-v2`` client over HTTP. The application is played by plain
``sqlite3`` connections.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from eum_server import EumServer, eum_server_fixture

from optsync.backends import store_settings
from optsync.config import MappingSettings, Settings, SourceSettings, load_settings
from optsync.engine.models import CauseKind, ChannelType, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.pipeline import Pipeline
from optsync.sample import SAMPLE_TABLE, create_sample_database
from optsync.sinks.eum import EumSmsSink
from optsync.sinks.settings import EumInboundSettings, EumSinkSettings

__all__ = ("eum_server_fixture",)  # registers the fixture ``eum_server``

pytestmark = pytest.mark.integration

RULE = MappingSettings(
    table=SAMPLE_TABLE,
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)
TIMEOUT = 30.0


def number(user: int) -> str:
    return f"+1234111111{user}"


def endpoint_id(user: int) -> str:
    return f"user{user}_{number(user)}"


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual credential chain, read from the environment as on a server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDOPTSYNCTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def settings_for(
    folder: Path,
    server: EumServer,
    *,
    mirror_opt_in: bool = False,
    inbound: bool = False,
    writeback: bool = False,
) -> Settings:
    sink = EumSinkSettings(
        name="eum",
        channels=frozenset({ChannelType.SMS, ChannelType.VOICE}),
        opt_out_list="Default",
        region="us-east-1",
        endpoint_url=server.url,
        mirror_opt_in=mirror_opt_in,
    )
    stop_reader = EumInboundSettings(
        name="stop",
        opt_out_list="Default",
        region="us-east-1",
        endpoint_url=server.url,
        interval=0.2,
        writeback=(
            "UPDATE optin_status SET optin = 0, lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', "
            "'now') WHERE phone = :address"
            if writeback
            else None
        ),
    )
    return msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=folder / "data",
        source=SourceSettings(url=f"sqlite:///{folder / 'app.db'}", tables=(SAMPLE_TABLE,)),
        mappings=(RULE,),
        serve_api=False,
        sinks=(sink,),
        inbound=(stop_reader,) if inbound else (),
    )


@contextmanager
def running(settings: Settings, deferred_retry: float = 0.3) -> Iterator[Pipeline]:
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    try:
        pipeline = Pipeline(settings, store)
        assert pipeline.consent is not None
        for runner in pipeline.consent.sinks:
            assert isinstance(runner.sink, EumSmsSink)
            runner.sink.deferred_retry = deferred_retry  # the 30-day rule's retry, shortened
        pipeline.start()
        try:
            yield pipeline
        finally:
            pipeline.stop()
        pipeline.check()
    finally:
        store.close()


def set_optin(folder: Path, user: int, optin: int) -> None:
    with closing(sqlite3.connect(folder / "app.db", isolation_level=None, timeout=10)) as conn:
        conn.execute(
            "UPDATE optin_status SET optin = ?, lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', "
            "'now') WHERE userid = ?",
            (optin, f"user{user}"),
        )


def touch(folder: Path, user: int) -> None:
    """The application rewrites the row without changing its opt-in (a stale 1 stays 1)."""
    with closing(sqlite3.connect(folder / "app.db", isolation_level=None, timeout=10)) as conn:
        conn.execute(
            "UPDATE optin_status SET lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') "
            "WHERE userid = ?",
            (f"user{user}",),
        )


def source_optin(folder: Path, user: int) -> int:
    with closing(sqlite3.connect(folder / "app.db")) as conn:
        row = conn.execute(
            "SELECT optin FROM optin_status WHERE userid = ?", (f"user{user}",)
        ).fetchone()
    return int(row[0])


def wait_for(pipeline: Pipeline, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        pipeline.check()
        assert time.monotonic() < deadline, f"timed out after {TIMEOUT:.0f} s waiting for {what}"
        time.sleep(0.02)


def opt_out_of(pipeline: Pipeline, user: int) -> OptOut | None:
    assert pipeline.store is not None
    try:
        return pipeline.store.get_endpoint(pipeline.app.id, endpoint_id(user)).opt_out
    except Exception:
        return None


def caught_up(pipeline: Pipeline) -> bool:
    """The sink has delivered every consent change the engine holds."""
    assert pipeline.store is not None
    states = pipeline.store.sink_states("eum")
    return all(s.behind == 0 for s in states)


@pytest.fixture(autouse=True)
def server_clock_now(eum_server: EumServer) -> None:
    """The stand-in's clock (which stands still) starts at the engine's time, as AWS's would."""
    eum_server.now = datetime.now(UTC)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    assert create_sample_database(tmp_path / "app.db") is True
    return tmp_path


def test_the_blog_walkthrough_leaves_exactly_the_five_opted_out_numbers_on_the_list(
    folder: Path, eum_server: EumServer
) -> None:
    with running(settings_for(folder, eum_server)) as pipeline:
        wait_for(pipeline, lambda: opt_out_of(pipeline, 9) is OptOut.NONE, "the snapshot")
        for user in (1, 2, 3, 4):
            set_optin(folder, user, 0)
        wait_for(pipeline, lambda: len(eum_server.numbers("Default")) == 4, "four numbers")
        set_optin(folder, 5, 0)
        wait_for(pipeline, lambda: len(eum_server.numbers("Default")) == 5, "five numbers")
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        listed = eum_server.numbers("Default")
        assert set(listed) == {number(u) for u in (1, 2, 3, 4, 5)}
        assert not any(entry.end_user_opted_out for entry in listed.values())
        # The nine opt-ins of the snapshot were skipped, never sent (mirror_opt_in is off).
        assert eum_server.calls_to("DeleteOptedOutNumber") == []
        assert pipeline.store is not None
        rows = list(pipeline.store.audit(["eum"], app_id=pipeline.app.id))
        outs = [r for r in rows if r.change.opt_out_after is OptOut.ALL]
        assert len(outs) == 5
        assert all(r.outcomes["eum"] == "sent" and r.deliveries["eum"] for r in outs)


def test_a_re_opt_in_within_30_days_waits_and_a_newer_opt_out_supersedes_it(
    folder: Path, eum_server: EumServer
) -> None:
    with running(settings_for(folder, eum_server, mirror_opt_in=True)) as pipeline:
        wait_for(pipeline, lambda: opt_out_of(pipeline, 1) is OptOut.NONE, "the snapshot")
        set_optin(folder, 1, 0)
        wait_for(pipeline, lambda: number(1) in eum_server.numbers("Default"), "the opt-out")
        set_optin(folder, 1, 1)  # first removal: allowed
        wait_for(pipeline, lambda: number(1) not in eum_server.numbers("Default"), "the removal")
        set_optin(folder, 1, 0)
        wait_for(pipeline, lambda: number(1) in eum_server.numbers("Default"), "listed again")
        set_optin(folder, 1, 1)  # second removal within 30 days: AWS refuses, the sink waits
        assert pipeline.store is not None
        store = pipeline.store
        wait_for(pipeline, lambda: bool(store.sink_waiting("eum")), "the wait")
        (waiting,) = store.sink_waiting("eum")
        assert waiting.key == number(1)
        assert "30 days" in waiting.reason
        (state,) = store.sink_states("eum")
        assert state.waiting == 1
        time.sleep(1.0)  # several retries, each refused while the clock stands still
        assert number(1) in eum_server.numbers("Default")
        assert store.sink_waiting("eum")
        # AWS's 30 days pass: the waiting removal goes through at its next try.
        eum_server.advance(days=31)
        wait_for(pipeline, lambda: number(1) not in eum_server.numbers("Default"), "removal")
        wait_for(pipeline, lambda: not store.sink_waiting("eum"), "the wait to end")

        # Once more within 30 days, then a newer opt-out: it supersedes the waiting removal.
        set_optin(folder, 1, 0)
        wait_for(pipeline, lambda: number(1) in eum_server.numbers("Default"), "listed again")
        set_optin(folder, 1, 1)
        wait_for(pipeline, lambda: bool(store.sink_waiting("eum")), "the wait")
        set_optin(folder, 1, 0)
        wait_for(pipeline, lambda: not store.sink_waiting("eum"), "the supersede")
        eum_server.advance(days=31)
        time.sleep(1.0)  # retries would have run by now
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        assert number(1) in eum_server.numbers("Default")
        assert opt_out_of(pipeline, 1) is OptOut.ALL


def test_a_stop_on_the_list_reaches_the_engine_and_is_written_back_to_the_source(
    folder: Path, eum_server: EumServer
) -> None:
    settings = settings_for(folder, eum_server, inbound=True, writeback=True)
    with running(settings) as pipeline:
        wait_for(pipeline, lambda: opt_out_of(pipeline, 6) is OptOut.NONE, "the snapshot")
        eum_server.inject_end_user_opt_out("Default", number(6), at=datetime.now(UTC))
        wait_for(pipeline, lambda: opt_out_of(pipeline, 6) is OptOut.ALL, "the STOP in the engine")
        assert pipeline.store is not None
        history = pipeline.store.consent_history(pipeline.app.id, endpoint_id(6))
        stop = next(c for c in history if c.cause.kind is CauseKind.END_USER)
        assert stop.cause.ref == "eum-sms:Default"
        wait_for(pipeline, lambda: source_optin(folder, 6) == 0, "the write-back")
        store = pipeline.store

        def reported() -> bool:
            # Marked in the engine just after the source's commit: poll for it.
            return all(r.written_back_at is not None for r in store.end_user_opt_outs(app_id))

        app_id = pipeline.app.id
        wait_for(pipeline, reported, "the write-back to be marked")
        (report,) = store.end_user_opt_outs(app_id)
        assert report.written_back_at is not None
        assert report.endpoint_ids == (endpoint_id(6),)
        # The written-back row comes back through capture harmlessly; the sink puts the number
        # (already listed by the person) and keeps EndUserOptedOut as AWS set it.
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        assert opt_out_of(pipeline, 6) is OptOut.ALL
        assert eum_server.numbers("Default")[number(6)].end_user_opted_out is True
        # Nobody else was touched.
        assert all(opt_out_of(pipeline, u) is OptOut.NONE for u in (1, 2, 3, 4, 5, 7, 8, 9))


def test_a_stale_opted_in_column_never_resubscribes_only_an_explicit_opt_in_does(
    folder: Path, eum_server: EumServer
) -> None:
    settings = settings_for(folder, eum_server, mirror_opt_in=True, inbound=True)
    with running(settings) as pipeline:
        wait_for(pipeline, lambda: opt_out_of(pipeline, 7) is OptOut.NONE, "the snapshot")
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        eum_server.inject_end_user_opt_out("Default", number(7), at=datetime.now(UTC))
        wait_for(pipeline, lambda: opt_out_of(pipeline, 7) is OptOut.ALL, "the STOP")
        # No write-back here: the source still says optin = 1, and the app rewrites the row.
        touch(folder, 7)
        touch(folder, 7)
        assert pipeline.store is not None
        store = pipeline.store
        wait_for(
            pipeline,
            lambda: (
                store.get_endpoint(pipeline.app.id, endpoint_id(7)).effective_date
                > store.consent_history(pipeline.app.id, endpoint_id(7))[-1].at
            ),
            "the rewrites to apply",
        )
        assert opt_out_of(pipeline, 7) is OptOut.ALL
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        assert eum_server.numbers("Default")[number(7)].end_user_opted_out is True
        assert eum_server.calls_to("DeleteOptedOutNumber") == []
        # The person opts in again in the application: the column itself turns 0 -> 1.
        set_optin(folder, 7, 0)
        set_optin(folder, 7, 1)
        wait_for(pipeline, lambda: opt_out_of(pipeline, 7) is OptOut.NONE, "the explicit opt-in")
        wait_for(
            pipeline, lambda: number(7) not in eum_server.numbers("Default"), "the number removed"
        )
        last = store.consent_history(pipeline.app.id, endpoint_id(7))[-1]
        assert "explicit opt-in" in last.cause.detail


def test_an_opt_in_committed_before_the_stop_keeps_the_number_listed(
    folder: Path, eum_server: EumServer
) -> None:
    """The list's own record of a person's STOP wins over an earlier opt-in the sink sees late."""
    settings = settings_for(folder, eum_server, mirror_opt_in=True)
    with running(settings) as pipeline:
        wait_for(pipeline, lambda: opt_out_of(pipeline, 8) is OptOut.NONE, "the snapshot")
        # The person's STOP, as the list records it, is later than the opt-in to come (no
        # inbound here: the engine does not know of it, only the list does).
        eum_server.inject_end_user_opt_out(
            "Default", number(8), at=datetime.now(UTC) + timedelta(days=1)
        )
        set_optin(folder, 8, 0)
        set_optin(folder, 8, 1)
        wait_for(pipeline, lambda: opt_out_of(pipeline, 8) is OptOut.NONE, "the opt-in")
        wait_for(pipeline, lambda: caught_up(pipeline), "the sink to catch up")
        assert number(8) in eum_server.numbers("Default")
        assert eum_server.calls_to("DeleteOptedOutNumber") == []
