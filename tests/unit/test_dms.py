from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest

from optsync.errors import Fatal
from optsync.events import ChangeEvent, Op
from optsync.formats.dms import (
    KEY_COLUMNS,
    ControlRecord,
    FormatError,
    MalformedRecord,
    decode,
    encode,
    encode_many,
    event_to_dms,
)

ROW = {"userid": "user1", "phone": "+12341111111", "optin": 1, "lastupdate": "2021-01-01T00:00:00Z"}
OLD = {**ROW, "phone": "+12342222222", "optin": 0}


def event(op: Op = Op.INSERT, **changes: Any) -> ChangeEvent:
    fields: dict[str, Any] = {
        "op": op,
        "table": "optin_status",
        "schema": "blog_db",
        "key": {"userid": "user1", "phone": "+12341111111"},
        "position": "mysql-bin.000003:00000000000000004242:000001",
        "after": ROW,
    }
    fields.update(changes)
    return ChangeEvent(**fields)


# encode / event_to_dms


def test_metadata_keys_are_spelled_as_dms_spells_them() -> None:
    record = event_to_dms(
        event(Op.UPDATE, before=OLD, transaction_id="894", commit_time="2021-01-01T00:00:01.000Z")
    )
    assert set(record) == {"data", "metadata", "before-image"}
    metadata = record["metadata"]
    assert list(metadata) == [
        "timestamp",
        "record-type",
        "operation",
        "partition-key-type",
        "partition-key-value",
        "schema-name",
        "table-name",
        "transaction-id",
        "commit-timestamp",
        "stream-position",
        KEY_COLUMNS,
    ]
    assert metadata["record-type"] == "data"
    assert metadata["operation"] == "update"
    assert metadata["partition-key-type"] == "primary-key"
    assert metadata["partition-key-value"] == "blog_db.optin_status.user1.+12341111111"
    assert metadata["schema-name"] == "blog_db"
    assert metadata["table-name"] == "optin_status"
    assert metadata["transaction-id"] == "894"
    assert metadata["commit-timestamp"] == "2021-01-01T00:00:01.000Z"
    assert metadata["stream-position"] == "mysql-bin.000003:00000000000000004242:000001"
    assert metadata[KEY_COLUMNS] == ["userid", "phone"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", metadata["timestamp"])
    assert record["data"] == ROW
    assert record["before-image"] == OLD


def test_optional_metadata_is_left_out_when_the_event_has_none() -> None:
    metadata = event_to_dms(event())["metadata"]
    for absent in ("transaction-id", "commit-timestamp", "prev-transaction-id", "optsync-extra"):
        assert absent not in metadata


def test_delete_carries_the_before_image_as_data_and_no_before_image_key() -> None:
    record = event_to_dms(event(Op.DELETE, before=OLD, after=None))
    assert record["data"] == OLD
    assert "before-image" not in record


def test_before_image_only_on_updates() -> None:
    assert "before-image" not in event_to_dms(event(Op.INSERT, before=OLD))
    assert "before-image" not in event_to_dms(event(Op.UPDATE))


def test_encode_is_compact_utf8_json() -> None:
    data = encode(event(after={**ROW, "name": "Zoë"}))
    assert b"\n" not in data
    assert b": " not in data
    assert b", " not in data
    assert "Zoë".encode() in data
    assert json.loads(data)["data"]["name"] == "Zoë"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object()])
def test_encode_refuses_values_json_cannot_carry(bad: object) -> None:
    with pytest.raises(MalformedRecord, match="optin_status"):
        encode(event(after={**ROW, "optin": bad}))


@pytest.mark.parametrize(
    "bad",
    [[1, float("nan")], {"nested": float("-inf")}, b"bytes", {1, 2}],
    ids=["nan-in-list", "inf-in-object", "bytes", "set"],
)
def test_encode_refuses_nested_and_non_json_values_as_json_does(bad: object) -> None:
    # msgspec would write NaN as null and bytes as base64: only the standard library decides.
    with pytest.raises(MalformedRecord, match="optin_status"):
        encode(event(after={**ROW, "optin": bad}))


@pytest.mark.parametrize(
    "value",
    ["Zoë ☎ \u2028", 2**70, -(2**63) - 1, 1e16, 0.1, -0.0, True, None, ["a", 1, [2.5]],
     {"a": {"b": None}}, (1, 2)],
    ids=["unicode", "big-int", "small-int", "1e16", "0.1", "minus-zero", "bool", "null", "list",
         "object", "tuple"],
)  # fmt: skip
def test_encode_reads_back_as_the_standard_library_writes_it(value: object) -> None:
    original = event(Op.UPDATE, before={**OLD, "extra": value}, after={**ROW, "extra": value})
    record = json.loads(encode(original))
    expected = json.loads(json.dumps(event_to_dms(original), ensure_ascii=False))
    record["metadata"].pop("timestamp")
    expected["metadata"].pop("timestamp")
    assert record == expected


def test_encode_many_stamps_one_batch_with_one_timestamp() -> None:
    records = [json.loads(data) for data in encode_many([event(), event(Op.DELETE, before=OLD)])]
    stamps = {r["metadata"]["timestamp"] for r in records}
    assert len(stamps) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamps.pop())


def test_a_lambda_written_for_dms_reads_our_record() -> None:
    # What the AWS sample Lambda does with a Kinesis record.
    kinesis_data = base64.b64encode(encode(event(after={**ROW, "optin": 0})))
    payload = json.loads(base64.b64decode(kinesis_data))
    assert payload["metadata"]["operation"] == "insert"
    assert payload["data"]["optin"] == 0
    assert payload["data"]["userid"] + "_" + payload["data"]["phone"] == "user1_+12341111111"


# round trips


@pytest.mark.parametrize(
    "original",
    [
        event(Op.LOAD),
        event(Op.INSERT, transaction_id="77", commit_time="2021-01-01T00:00:01.000Z"),
        event(Op.UPDATE, before=OLD),
        event(Op.UPDATE, before={}),
        event(Op.UPDATE),
        event(Op.DELETE, key={"userid": "user1", "phone": "+12342222222"}, before=OLD, after=None),
        event(schema="", key={}),
        event(extra={"gtid": "3e11fa47-71ca-11e1-9e33-c80aa9429562:23"}),
        event(after={**ROW, "note": None, "score": 1.5, "tags": ["a", "b"], "ok": True}),
    ],
    ids=["load", "insert", "update", "update-empty-before", "update-no-before", "delete",
         "no-schema-no-key", "extra", "value-types"],
)  # fmt: skip
def test_round_trip(original: ChangeEvent) -> None:
    assert decode(encode(original)) == original


def test_round_trip_rebuilds_the_key_from_the_row() -> None:
    original = event(Op.DELETE, key={"userid": "user1"}, before=OLD, after=None)
    decoded = decode(encode(original))
    assert decoded.key == {"userid": "user1"}
    assert decoded.partition_key == original.partition_key


def test_our_positions_are_kept_as_they_are() -> None:
    decoded = decode(encode(event(position="12:34")))
    assert decoded.position == "12:34"


# records of a real DMS task

PRETTY_INSERT = b"""{
\t"data":\t{
\t\t"userid":\t"user1",
\t\t"phone":\t"+12341111111",
\t\t"optin":\t0,
\t\t"lastupdate":\t"2021-01-01T00:00:00Z"
\t},
\t"metadata":\t{
\t\t"timestamp":\t"2021-01-01T00:00:00.123456Z",
\t\t"record-type":\t"data",
\t\t"operation":\t"insert",
\t\t"partition-key-type":\t"schema-table",
\t\t"schema-name":\t"blog_db",
\t\t"table-name":\t"optin_status",
\t\t"transaction-id":\t8589934593,
\t\t"transaction-record-id":\t1,
\t\t"prev-transaction-id":\t8589934592,
\t\t"prev-transaction-record-id":\t3,
\t\t"commit-timestamp":\t"2021-01-01T00:00:00.000000Z",
\t\t"stream-position":\t"mysql-bin-changelog.002171:36912271:0:36912333:9324410911751:mysql-bin-changelog.002171:36912209"
\t}
}
"""


def test_pretty_printed_record_of_a_real_task() -> None:
    decoded = decode(PRETTY_INSERT)
    assert decoded.op is Op.INSERT
    assert decoded.schema == "blog_db"
    assert decoded.table == "optin_status"
    assert decoded.after == {
        "userid": "user1",
        "phone": "+12341111111",
        "optin": 0,
        "lastupdate": "2021-01-01T00:00:00Z",
    }
    assert decoded.before is None
    assert decoded.key == {}  # DMS does not say which columns form the key
    assert decoded.transaction_id == "8589934593"
    assert decoded.commit_time == "2021-01-01T00:00:00.000000Z"
    assert decoded.position == (
        "mysql-bin-changelog.002171:00000000000036912271:00000000000000000000:"
        "00000000000036912333:00000009324410911751:mysql-bin-changelog.002171:"
        "00000000000036912209"
    )


def dms_record(operation: str = "update", **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "data": dict(ROW),
        "metadata": {
            "timestamp": "2021-01-01T00:00:00.123456Z",
            "record-type": "data",
            "operation": operation,
            "partition-key-type": "primary-key",
            "partition-key-value": "blog_db.optin_status.user1",
            "schema-name": "blog_db",
            "table-name": "optin_status",
            "stream-position": "mysql-bin-changelog.000001:999:0",
        },
    }
    record.update(extra)
    return record


def with_before_image(image: object) -> dict[str, Any]:
    record = dms_record()
    record["before-image"] = image
    return record


def raw(record: object) -> bytes:
    return json.dumps(record).encode()


def test_foreign_mysql_positions_sort_in_log_order() -> None:
    earlier = dms_record(operation="insert")
    later = dms_record()
    later["metadata"]["stream-position"] = "mysql-bin-changelog.000001:1000:0"
    a, b = decode(raw(earlier)).position, decode(raw(later)).position
    assert "999" > "1000"  # what text order alone would say
    assert a < b


def test_foreign_postgresql_positions_are_kept() -> None:
    record = dms_record()
    record["metadata"]["stream-position"] = "00000002/7C007178.3.00000002/7C007178"
    assert decode(raw(record)).position == "00000002/7C007178.3.00000002/7C007178"


def test_unknown_metadata_and_top_level_keys_are_tolerated() -> None:
    record = dms_record(operation="insert", control={})
    record["metadata"]["prev-transaction-id"] = 41
    record["metadata"]["something-new"] = {"x": 1}
    assert decode(raw(record)).after == ROW


def test_before_image_under_the_default_field_name() -> None:
    decoded = decode(raw(with_before_image(OLD)))
    assert decoded.before == OLD
    assert decoded.after == ROW


def test_before_image_under_a_custom_field_name() -> None:
    decoded = decode(raw(dms_record(BI={"userid": "user1", "phone": "+12342222222"})))
    assert decoded.before == {"userid": "user1", "phone": "+12342222222"}


def test_update_without_before_image() -> None:
    assert decode(raw(dms_record())).before is None


def test_delete_data_is_the_before_image() -> None:
    decoded = decode(raw(dms_record(operation="delete")))
    assert decoded.op is Op.DELETE
    assert decoded.before == ROW
    assert decoded.after is None
    assert decoded.row == ROW


def test_load_record() -> None:
    decoded = decode(raw(dms_record(operation="load")))
    assert decoded.op is Op.LOAD
    assert decoded.after == ROW


def test_omitted_null_columns_stay_omitted() -> None:
    record = dms_record(operation="insert", data={"userid": "user1", "optin": 1})
    assert decode(raw(record)).after == {"userid": "user1", "optin": 1}


def test_map_record_to_document_rows_are_unwrapped() -> None:
    record = dms_record(operation="insert", data={"_doc": ROW})
    assert decode(raw(record)).after == ROW


def test_missing_stream_position_is_malformed_without_a_fallback() -> None:
    record = dms_record()
    del record["metadata"]["stream-position"]
    with pytest.raises(MalformedRecord) as caught:
        decode(raw(record))
    assert caught.value.reason.startswith("metadata.stream-position is missing")
    assert "IncludeTransactionDetails" in caught.value.reason


def test_missing_stream_position_takes_the_fallback_position() -> None:
    record = dms_record()
    del record["metadata"]["stream-position"]
    assert decode(raw(record), fallback_position="00000000000000000017").position == (
        "00000000000000000017"
    )


def test_fallback_never_replaces_a_stream_position() -> None:
    decoded = decode(raw(dms_record()), fallback_position="zzz")
    assert decoded.position.startswith("mysql-bin-changelog.000001:")


def test_our_record_without_position_is_malformed_even_with_a_fallback() -> None:
    record = event_to_dms(event(position=""))
    with pytest.raises(MalformedRecord, match="stream-position is missing"):
        decode(raw(record), fallback_position="00000000000000000017")


# control records

APPLY_EXCEPTIONS = {
    "control": {
        "table-def": {
            "columns": {
                "TASK_NAME": {"type": "STRING", "length": 128, "nullable": False},
                "TABLE_OWNER": {"type": "STRING", "length": 128, "nullable": False},
                "TABLE_NAME": {"type": "STRING", "length": 128, "nullable": False},
                "ERROR_TIME": {"type": "DATETIME", "precision": 6, "nullable": False},
                "STATEMENT": {"type": "CLOB", "nullable": False},
                "ERROR": {"type": "CLOB", "nullable": False},
            },
            "primary-key": [],
        }
    },
    "metadata": {
        "timestamp": "2021-01-01T00:00:00.123456Z",
        "record-type": "control",
        "operation": "create-table",
        "partition-key-type": "task-id",
        "schema-name": "",
        "table-name": "awsdms_apply_exceptions",
    },
}


def test_control_record_of_a_real_task() -> None:
    with pytest.raises(ControlRecord) as caught:
        decode(json.dumps(APPLY_EXCEPTIONS, indent=4).encode())
    assert caught.value.operation == "create-table"
    assert caught.value.table == "awsdms_apply_exceptions"
    assert caught.value.schema == ""
    assert "awsdms_apply_exceptions" in caught.value.reason


def test_drop_table_control_record_is_not_a_delete() -> None:
    record = {
        "metadata": {
            "timestamp": "2021-01-01T00:00:00.123456Z",
            "record-type": "control",
            "operation": "drop-table",
            "partition-key-type": "task-id",
            "schema-name": "blog_db",
            "table-name": "optin_status",
        }
    }
    with pytest.raises(ControlRecord) as caught:
        decode(raw(record))
    assert (caught.value.operation, caught.value.schema) == ("drop-table", "blog_db")


def test_errors_are_fatal_format_errors() -> None:
    assert issubclass(ControlRecord, FormatError)
    assert issubclass(MalformedRecord, FormatError)
    assert issubclass(FormatError, Fatal)


# malformed input


def without_metadata(key: str) -> bytes:
    record = dms_record()
    del record["metadata"][key]
    return raw(record)


def with_metadata(key: str, value: object, *, ours: bool = False) -> bytes:
    record = dms_record()
    if ours:
        record["metadata"][KEY_COLUMNS] = ["userid"]
    record["metadata"][key] = value
    return raw(record)


def test_decode_agrees_with_the_standard_library_where_msgspec_refuses() -> None:
    # msgspec refuses numbers beyond a double; json reads them as infinity.
    record = dms_record()
    record["data"]["score"] = 1
    data = raw(record).replace(b'"score": 1', b'"score": 1e400')
    assert decode(data).row["score"] == json.loads(data)["data"]["score"] == float("inf")


def test_invalid_utf8_inside_a_string_is_malformed() -> None:
    data = raw(dms_record()).replace(b"user1", b"user\xff")
    with pytest.raises(MalformedRecord, match="not UTF-8"):
        decode(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"data": ', "not JSON"),
        (b"", "not JSON"),
        (b'["data"]', "record is an array"),
        (b'"text"', "record is a string"),
        (b'{"data": {"optin": NaN}, "metadata": {}}', "NaN"),
        (raw({"data": ROW}), "metadata is null or missing"),
        (raw({"data": ROW, "metadata": []}), "metadata is an array"),
        (without_metadata("record-type"), "metadata.record-type is missing"),
        (with_metadata("record-type", "heartbeat"), "metadata.record-type is 'heartbeat'"),
        (without_metadata("operation"), "metadata.operation is missing"),
        (with_metadata("operation", 3), "metadata.operation is a number"),
        (with_metadata("operation", "upsert"), "metadata.operation is 'upsert'"),
        (without_metadata("table-name"), "metadata.table-name is empty"),
        (with_metadata("stream-position", 42), "metadata.stream-position is a number"),
        (with_metadata(KEY_COLUMNS, "userid"), f"metadata.{KEY_COLUMNS} is not a list"),
        (with_metadata("optsync-extra", [], ours=True), "metadata.optsync-extra is an array"),
        (raw({k: v for k, v in dms_record().items() if k != "data"}), "data is missing"),
        (raw(dms_record(data=[1, 2])), "data is an array"),
        (raw(with_before_image("x")), "before-image is a string"),
    ],
)
def test_malformed_records_name_the_field(data: bytes, reason: str) -> None:
    with pytest.raises(MalformedRecord) as caught:
        decode(data)
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_malformed_reason_does_not_echo_row_values() -> None:
    record = dms_record(operation="erase")
    with pytest.raises(MalformedRecord) as caught:
        decode(raw(record))
    assert "+12341111111" not in caught.value.reason
