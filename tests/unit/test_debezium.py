from __future__ import annotations

import json
from typing import Any

import pytest

from optsync.events import Op, position_of
from optsync.formats.debezium import decode_debezium
from optsync.formats.dms import ControlRecord, MalformedRecord

ROW = {"id": 7, "userid": "user1", "phone": "+12341111111", "optin": 1}
OLD = {**ROW, "optin": 0}


def mysql_source(**changes: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "version": "2.7.0.Final",
        "connector": "mysql",
        "name": "app",
        "ts_ms": 1609459200123,
        "snapshot": "false",
        "db": "blog_db",
        "sequence": None,
        "table": "optin_status",
        "server_id": 223344,
        "gtid": None,
        "file": "mysql-bin.000003",
        "pos": 4242,
        "row": 0,
        "thread": 7,
        "query": None,
    }
    source.update(changes)
    return source


def pg_source(**changes: Any) -> dict[str, Any]:
    source: dict[str, Any] = {
        "version": "2.7.0.Final",
        "connector": "postgresql",
        "name": "app",
        "ts_ms": 1609459200123,
        "snapshot": "false",
        "db": "app",
        "sequence": '["24023128","24023128"]',
        "schema": "public",
        "table": "optin_status",
        "txId": 555,
        "lsn": 24023128,
        "xmin": None,
    }
    source.update(changes)
    return source


def envelope(
    op: str, source: dict[str, Any], before: Any = None, after: Any = None
) -> dict[str, Any]:
    return {"before": before, "after": after, "source": source, "op": op, "ts_ms": 1609459201000}


def wrapped(payload: object) -> bytes:
    return json.dumps(
        {"schema": {"type": "struct", "optional": False}, "payload": payload}
    ).encode()


# MySQL


def test_mysql_insert_with_the_schema_wrapper() -> None:
    decoded = decode_debezium(wrapped(envelope("c", mysql_source(), after=ROW)))
    assert decoded.op is Op.INSERT
    assert decoded.table == "optin_status"
    assert decoded.schema == "blog_db"
    assert decoded.after == ROW
    assert decoded.before is None
    assert decoded.position == "mysql-bin.000003:00000000000000004242:000000"
    assert decoded.commit_time == "2021-01-01T00:00:00.123Z"
    assert decoded.key == {}
    assert decoded.extra == {}


def test_mysql_update_without_the_wrapper_as_a_dict() -> None:
    decoded = decode_debezium(envelope("u", mysql_source(row=2), before=OLD, after=ROW))
    assert decoded.op is Op.UPDATE
    assert (decoded.before, decoded.after) == (OLD, ROW)
    assert decoded.position.endswith(":000002")


def test_mysql_delete() -> None:
    decoded = decode_debezium(json.dumps(envelope("d", mysql_source(), before=OLD)).encode())
    assert decoded.op is Op.DELETE
    assert decoded.row == OLD
    assert decoded.after is None


def test_snapshot_read_is_a_load_ordered_before_log_events_at_its_position() -> None:
    load = decode_debezium(envelope("r", mysql_source(snapshot="true"), after=ROW))
    log = decode_debezium(envelope("u", mysql_source(), before=OLD, after=ROW))
    earlier = decode_debezium(envelope("u", mysql_source(pos=4241, row=9), before=OLD, after=ROW))
    assert load.op is Op.LOAD
    assert load.position == "mysql-bin.000003:00000000000000004242"
    assert earlier.position < load.position < log.position


def test_mysql_positions_sort_in_binlog_order() -> None:
    coordinates = [
        ("mysql-bin.000003", 999, 0),
        ("mysql-bin.000003", 1000, 0),
        ("mysql-bin.000003", 1000, 1),
        ("mysql-bin.000003", 1000, 10),
        ("mysql-bin.000004", 4, 0),
    ]
    positions = [
        decode_debezium(envelope("c", mysql_source(file=f, pos=p, row=r), after=ROW)).position
        for f, p, r in coordinates
    ]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)


def test_gtid_is_kept_but_not_the_position() -> None:
    gtid = "3e11fa47-71ca-11e1-9e33-c80aa9429562:23"
    decoded = decode_debezium(envelope("c", mysql_source(gtid=gtid), after=ROW))
    assert decoded.extra == {"gtid": gtid}
    assert decoded.transaction_id == gtid
    assert decoded.position.startswith("mysql-bin.000003:")


def test_transaction_block_gives_the_transaction_id() -> None:
    payload = envelope("c", mysql_source(), after=ROW)
    payload["transaction"] = {"id": "file=mysql-bin.000003,pos=4000", "total_order": 1}
    assert decode_debezium(payload).transaction_id == "file=mysql-bin.000003,pos=4000"


def test_mariadb_connector() -> None:
    decoded = decode_debezium(envelope("c", mysql_source(connector="mariadb"), after=ROW))
    assert decoded.schema == "blog_db"
    assert decoded.position == "mysql-bin.000003:00000000000000004242:000000"


# PostgreSQL


def test_postgresql_update() -> None:
    decoded = decode_debezium(envelope("u", pg_source(), before={"id": 7}, after=ROW))
    assert decoded.op is Op.UPDATE
    assert decoded.schema == "public"
    assert decoded.table == "optin_status"
    assert decoded.position == position_of(24023128)
    assert decoded.transaction_id == "555"
    assert decoded.before == {"id": 7}


def test_postgresql_update_without_before() -> None:
    decoded = decode_debezium(envelope("u", pg_source(), after=ROW))
    assert decoded.before is None


def test_postgresql_positions_sort_by_lsn() -> None:
    low = decode_debezium(envelope("c", pg_source(lsn=999), after=ROW)).position
    high = decode_debezium(envelope("c", pg_source(lsn=1000), after=ROW)).position
    assert low < high


def test_record_key_gives_the_event_key() -> None:
    key = json.dumps({"schema": {"type": "struct"}, "payload": {"id": 7}}).encode()
    decoded = decode_debezium(wrapped(envelope("c", pg_source(), after=ROW)), key=key)
    assert decoded.key == {"id": 7}
    assert decoded.partition_key == "public.optin_status.7"
    assert decode_debezium(envelope("c", pg_source(), after=ROW), key={"id": 8}).key == {"id": 8}


# control records


@pytest.mark.parametrize("value", [b"", b"null", b"  ", wrapped(None)])
def test_tombstones_are_control_records(value: bytes) -> None:
    with pytest.raises(ControlRecord) as caught:
        decode_debezium(value)
    assert caught.value.operation == "tombstone"


def test_truncate_is_a_control_record_not_a_delete() -> None:
    with pytest.raises(ControlRecord) as caught:
        decode_debezium({"source": mysql_source(), "op": "t", "ts_ms": 1609459201000})
    assert caught.value.operation == "truncate"
    assert (caught.value.schema, caught.value.table) == ("blog_db", "optin_status")


def test_logical_decoding_message_is_a_control_record() -> None:
    payload = {"source": pg_source(table=""), "op": "m", "message": {"prefix": "x"}}
    with pytest.raises(ControlRecord) as caught:
        decode_debezium(payload)
    assert caught.value.operation == "message"


@pytest.mark.parametrize(
    ("payload", "operation"),
    [
        ({"ts_ms": 1609459201000}, "heartbeat"),
        ({"status": "BEGIN", "id": "571", "ts_ms": 1, "event_count": None}, "transaction"),
        (
            {"source": mysql_source(), "databaseName": "blog_db", "ddl": "CREATE TABLE t (a INT)",
             "tableChanges": []},
            "schema-change",
        ),
    ],
)  # fmt: skip
def test_other_debezium_records_are_control_records(
    payload: dict[str, Any], operation: str
) -> None:
    with pytest.raises(ControlRecord) as caught:
        decode_debezium(payload)
    assert caught.value.operation == operation


# malformed input


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff", "value is not UTF-8"),
        (b"{", "value is not JSON"),
        (b"[1]", "value is not a JSON object"),
        (json.dumps({"schema": {}, "payload": 3}).encode(), "value.payload is not a JSON object"),
        ({"before": None, "after": ROW}, "op is missing"),
        ({"op": 1, "after": ROW, "source": mysql_source()}, "op is not a string"),
        ({"op": "x", "after": ROW, "source": mysql_source()}, "op is 'x'"),
        ({"op": "c", "after": ROW}, "source is missing"),
        (envelope("c", mysql_source(table=None), after=ROW), "source.table is missing"),
        (envelope("d", mysql_source()), "before is null on a delete"),
        (envelope("c", mysql_source()), "after is null on op 'c'"),
        (envelope("c", mysql_source(), after=[1]), "after is not an object"),
        (envelope("c", mysql_source(file=None), after=ROW), "source.file is missing"),
        (envelope("c", mysql_source(pos="12"), after=ROW), "source.pos is missing or not"),
        (envelope("c", pg_source(lsn=None), after=ROW), "source.lsn is missing or not"),
        (
            envelope("c", {"connector": "oracle", "table": "T", "scn": "1"}, after=ROW),
            "source.connector is 'oracle'",
        ),
    ],
)
def test_malformed_records_name_the_field(value: Any, reason: str) -> None:
    with pytest.raises(MalformedRecord) as caught:
        decode_debezium(value)
    assert reason in caught.value.reason
    assert "+12341111111" not in caught.value.reason
