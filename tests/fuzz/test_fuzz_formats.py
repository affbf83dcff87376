"""The stream decoders on any input: a ``ChangeEvent`` of the right shape, or ``FormatError``.

Anything else (a ``RecursionError``, a ``ValueError``, a ``UnicodeEncodeError`` later in the
engine) would stop the apply worker on one record and leave every opt-out behind it waiting.
"""

from __future__ import annotations

import json
from typing import Any

from fuzz_strategies import JSON, ROWS, debezium_records, dms_records, dumps
from hypothesis import example, given
from hypothesis import strategies as st

from optsync.events import ChangeEvent, Op
from optsync.formats.debezium import decode_debezium
from optsync.formats.dms import FormatError, decode, encode

DEEP = b"[" * 100_000
WIDE_NUMBER = b'{"data": {"a": ' + b"9" * 5_000 + b"}}"
SURROGATE = (
    b'{"data": {"userid": "u\\ud800", "optin": 1}, "metadata": {"record-type": "data", '
    b'"operation": "insert", "table-name": "optin_status", "stream-position": "1"}}'
)


def check_event(event: ChangeEvent) -> None:
    """What every consumer of a decoded event relies on."""
    assert isinstance(event, ChangeEvent)
    assert isinstance(event.op, Op)
    assert isinstance(event.table, str) and event.table
    assert isinstance(event.schema, str)
    assert isinstance(event.position, str)
    assert isinstance(event.row, dict)
    for image in (event.before, event.after):
        assert image is None or isinstance(image, dict)
    assert isinstance(event.extra, dict)
    assert event.commit_time is None or isinstance(event.commit_time, str)
    assert event.transaction_id is None or isinstance(event.transaction_id, str)
    # The text reaches the engine's database: it must be encodable.
    json.dumps([event.table, event.schema, event.position], ensure_ascii=False).encode()
    json.dumps(event.row, ensure_ascii=False).encode()


def decode_dms(data: bytes) -> ChangeEvent | None:
    try:
        event = decode(data, fallback_position="00000000000000000007")
    except FormatError as exc:
        assert exc.reason  # the DLQ keeps it: it must say something
        return None
    check_event(event)
    return event


def decode_dbz(data: bytes | dict[str, Any], key: bytes | None = None) -> ChangeEvent | None:
    try:
        event = decode_debezium(data, key=key)
    except FormatError as exc:
        assert exc.reason
        return None
    check_event(event)
    return event


@given(st.binary(max_size=300))
@example(DEEP)
@example(WIDE_NUMBER)
@example(SURROGATE)
@example(b"\xef\xbb\xbf{}")
@example(b'{"a": NaN}')
@example(b'{"a": 1e999}')
def test_dms_decode_of_any_bytes(data: bytes) -> None:
    decode_dms(data)


@given(JSON)
def test_dms_decode_of_any_json(value: Any) -> None:
    decode_dms(dumps(value))
    decode_dms(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@given(dms_records())
def test_dms_decode_of_near_valid_records(record: dict[str, Any]) -> None:
    event = decode_dms(dumps(record))
    if event is not None:
        assert event.op.value == record["metadata"]["operation"]  # decoded: it is there


@given(
    op=st.sampled_from(list(Op)),
    row=ROWS,
    before=st.one_of(st.none(), ROWS),
    key_columns=st.lists(st.sampled_from(["userid", "phone"]), max_size=2, unique=True),
)
def test_dms_encode_then_decode_gives_the_event_back(
    op: Op, row: dict[str, Any], before: dict[str, Any] | None, key_columns: list[str]
) -> None:
    """What optsync writes it reads back unchanged, or refuses to write at all."""
    event = ChangeEvent(
        op=op,
        table="optin_status",
        key={c: row.get(c) for c in key_columns},
        position="00000000000000000042",
        before=row if op is Op.DELETE else (before if op is Op.UPDATE else None),
        after=None if op is Op.DELETE else row,
        schema="main",
    )
    try:
        data = encode(event)
    except FormatError:
        return
    assert decode_dms(data) == event


@given(st.binary(max_size=300), st.one_of(st.none(), st.binary(max_size=40)))
@example(DEEP, None)
@example(WIDE_NUMBER, None)
@example(b'{"op": "c", "source": {"connector": "mysql", "table": "\\udfff"}}', None)
def test_debezium_decode_of_any_bytes(data: bytes, key: bytes | None) -> None:
    decode_dbz(data, key)


@given(JSON, st.one_of(st.none(), JSON))
def test_debezium_decode_of_any_json(value: Any, key: Any) -> None:
    decode_dbz(dumps(value), None if key is None else dumps(key))
    if isinstance(value, dict):
        decode_dbz(value)


@given(debezium_records())
def test_debezium_decode_of_near_valid_records(record: dict[str, Any]) -> None:
    event = decode_dbz(dumps(record))
    payload = record.get("payload", record)
    if event is not None:
        assert {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.LOAD}[
            payload["op"]
        ] is event.op
