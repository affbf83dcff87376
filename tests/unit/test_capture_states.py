"""Saved capture states: every shape an earlier release wrote still loads, and today's round-trip.

A deployment that upgrades resumes from its checkpoint, so the texts below are what earlier
releases wrote, byte for byte (SQLite and PostgreSQL states before they named their source, and
those of the release that added the ``source`` tag with hand-written JSON).
"""

from __future__ import annotations

import pytest

from optsync.capture.mysql.position import CaptureState as MySQLState
from optsync.capture.mysql.position import LogPosition
from optsync.capture.postgres.position import CaptureState as PostgresState
from optsync.capture.postgres.position import parse_lsn
from optsync.capture.sqlite.position import CaptureState as SQLiteState
from optsync.capture.states import describe_state
from optsync.errors import Fatal

SQLITE_UNTAGGED = (
    '{"phase":"snapshot","snapshot_s":12,"table":"optin_status","after_rowid":40,'
    '"tables_done":["prefs"],"log_after":12}',
    SQLiteState("snapshot", 12, "optin_status", 40, ("prefs",), 12),
)
SQLITE_TAGGED = (
    '{"source":"sqlite","phase":"log","snapshot_s":12,"table":null,"after_rowid":0,'
    '"tables_done":["optin_status","prefs"],"log_after":57}',
    SQLiteState("log", 12, None, 0, ("optin_status", "prefs"), 57),
)
POSTGRES_UNTAGGED = (
    '{"v":1,"phase":"snapshot","slot":"optsync_postgres","log_after":"0/16B3748",'
    '"snapshot_at":"0/16B3748","table":"public.optin_status","after_key":["42",null],"page":0,'
    '"relfilenode":16384,"rows":250,"tables_done":["public.prefs"],"resnapshot":false}',
    PostgresState(
        phase="snapshot",
        log_after=parse_lsn("0/16B3748"),
        snapshot_at=parse_lsn("0/16B3748"),
        table="public.optin_status",
        after_key=("42", None),
        relfilenode=16384,
        rows=250,
        tables_done=("public.prefs",),
    ),
)
POSTGRES_TAGGED = (
    '{"v":1,"source":"postgres","phase":"log","slot":"optsync_postgres","log_after":"16/B374D848",'
    '"snapshot_at":null,"table":null,"after_key":null,"page":0,"relfilenode":null,"rows":0,'
    '"tables_done":["public.optin_status"],"resnapshot":false}',
    PostgresState(
        phase="log", log_after=parse_lsn("16/B374D848"), tables_done=("public.optin_status",)
    ),
)
POSTGRES_RESNAPSHOT = (
    '{"v":1,"source":"postgres","phase":"snapshot","slot":"optsync_postgres","log_after":null,'
    '"snapshot_at":null,"table":null,"after_key":null,"page":0,"relfilenode":null,"rows":0,'
    '"tables_done":[],"resnapshot":true}',
    PostgresState(resnapshot=True),
)
MYSQL_SNAPSHOT = (
    '{"v":1,"source":"mysql","phase":"snapshot","lineage":1764000000,"server_id":1,'
    '"log":{"file":"mariadb-bin.000002","pos":4,"gtid":"0-1-57"},"tables_done":["blog_db.prefs"],'
    '"table":"blog_db.optin_status","key":["id"],"cursor":[1200],"loaded":1200,'
    '"source_time":"2026-11-27T10:00:00Z"}',
    MySQLState(
        phase="snapshot",
        lineage=1764000000,
        server_id=1,
        log=LogPosition("mariadb-bin.000002", 4, "0-1-57"),
        tables_done=("blog_db.prefs",),
        table="blog_db.optin_status",
        key=("id",),
        cursor=(1200,),
        loaded=1200,
        source_time="2026-11-27T10:00:00Z",
    ),
)
MYSQL_LOG = (
    '{"v":1,"source":"mysql","phase":"log","lineage":1764000000,"server_id":1,'
    '"log":{"file":"mysql-bin.000003","pos":1234,"gtid":null},"tables_done":[],"table":null,'
    '"key":[],"cursor":null,"loaded":0,"source_time":null}',
    MySQLState(
        phase="log", lineage=1764000000, server_id=1, log=LogPosition("mysql-bin.000003", 1234)
    ),
)
MYSQL_RESNAPSHOT = (
    '{"v":1,"source":"mysql","phase":"snapshot","lineage":null,"server_id":null,"log":null,'
    '"tables_done":[],"table":null,"key":[],"cursor":null,"loaded":0,"source_time":null,'
    '"resnapshot":true}',
    MySQLState(resnapshot=True),
)
MYSQL_START_AT = (
    '{"v":1,"source":"mysql","phase":"log","lineage":null,"server_id":null,'
    '"log":{"file":"","pos":0,"gtid":"0-1-57"},"tables_done":["optin_status"],"table":null,'
    '"key":[],"cursor":null,"loaded":0,"source_time":null,"start_at":"0-1-57"}',
    MySQLState(
        phase="log",
        log=LogPosition("", 0, "0-1-57"),
        tables_done=("optin_status",),
        start_at="0-1-57",
    ),
)

State = SQLiteState | PostgresState | MySQLState


def _parse(kind: type[State], text: str) -> State:
    return kind.parse(text, "src")


def _dump(state: State) -> str:
    return state.dump("optsync_postgres") if isinstance(state, PostgresState) else state.dump()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        SQLITE_UNTAGGED,
        SQLITE_TAGGED,
        POSTGRES_UNTAGGED,
        POSTGRES_TAGGED,
        POSTGRES_RESNAPSHOT,
        MYSQL_SNAPSHOT,
        MYSQL_LOG,
        MYSQL_RESNAPSHOT,
        MYSQL_START_AT,
    ],
)
def test_states_of_earlier_releases_load_and_round_trip(text: str, expected: State) -> None:
    state = _parse(type(expected), text)
    assert state == expected
    again = _dump(state)
    assert _parse(type(expected), again) == expected
    assert describe_state(again) == describe_state(text)
    assert describe_state(text).phase == expected.phase  # read by its shape or its tag


@pytest.mark.parametrize(
    ("state", "text"),
    [
        (
            SQLITE_TAGGED[1],
            '{"source":"sqlite","phase":"log","snapshot_s":12,"table":null,"after_rowid":0,'
            '"tables_done":["optin_status","prefs"],"log_after":57}',
        ),
        (
            POSTGRES_TAGGED[1],
            '{"v":1,"source":"postgres","phase":"log","log_after":"16/B374D848",'
            '"snapshot_at":null,"table":null,"after_key":null,"page":0,"relfilenode":null,'
            '"rows":0,"tables_done":["public.optin_status"],"resnapshot":false,'
            '"slot":"optsync_postgres"}',
        ),
        (
            MYSQL_RESNAPSHOT[1],
            '{"v":1,"source":"mysql","phase":"snapshot","lineage":null,"server_id":null,'
            '"log":null,"tables_done":[],"table":null,"key":[],"cursor":null,"loaded":0,'
            '"source_time":null,"resnapshot":true,"start_at":null}',
        ),
    ],
)
def test_the_saved_form_is_tagged_with_its_source(state: State, text: str) -> None:
    assert _dump(state) == text


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        (SQLiteState, POSTGRES_TAGGED[0]),  # another source's tag
        (SQLiteState, '{"phase":"log","log_after":null}'),
        (SQLiteState, '{"phase":"log","log_after":true}'),
        (PostgresState, SQLITE_TAGGED[0]),
        (PostgresState, '{"v":1,"phase":"log","log_after":17}'),  # not an LSN
        (PostgresState, '{"v":2,"phase":"log","log_after":"0/1"}'),  # a newer format
        (MySQLState, POSTGRES_TAGGED[0]),
        (MySQLState, MYSQL_LOG[0].replace('"pos":1234', '"pos":"1234"')),
        (MySQLState, MYSQL_LOG[0].replace("mysql-bin.000003", "mysql-bin")),
        (MySQLState, MYSQL_SNAPSHOT[0].replace("0-1-57", "57")),
    ],
)
def test_a_state_that_is_not_its_sources_is_fatal(kind: type[State], text: str) -> None:
    with pytest.raises(Fatal, match="capture state"):
        _parse(kind, text)


def test_a_position_keeps_its_text_through_a_round_trip() -> None:
    """The engine's guard compares positions as text: a state must hand back the same LSN and
    binlog coordinates it was given."""
    lsn = parse_lsn("16/B374D848")
    pg = PostgresState.parse(PostgresState(phase="log", log_after=lsn).dump("s"), "src")
    assert pg.log_after == lsn
    log = LogPosition("mariadb-bin.000042", 2**40, "0-1-57,1-7-3")
    mysql = MySQLState.parse(MySQLState(phase="log", log=log).dump(), "src")
    assert mysql.log == log
