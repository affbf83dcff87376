"""The AWS DMS -> Kinesis JSON record: optsync's stream format, read and written.

A record is ``{"data": row, "metadata": {...}}`` plus, on updates with a before image,
``"before-image": row``. Metadata keys are spelled exactly as DMS spells them (``record-type``,
``partition-key-value``, ``stream-position``, ...), so a real DMS task can feed optsync and a
real Lambda can read optsync's stream.

Decisions:

- ``encode`` writes compact UTF-8 JSON (no NaN or Infinity), no base64: Kinesis and the Lambda
  event add base64 around the bytes, the stream stores the bytes themselves. ``data`` is the
  after image, or the before image for a delete. Two optsync-specific metadata keys make the
  round trip lossless: ``optsync-key-columns`` (the key column names; ``key`` is rebuilt from
  the row) and ``optsync-extra`` (``ChangeEvent.extra``, only when not empty). DMS consumers
  ignore unknown metadata keys, and ``decode`` ignores the ones it does not use.
- A record with ``optsync-key-columns`` was written by optsync: its ``stream-position`` is taken
  as it is. Any other record is *foreign* (a real DMS task): its key is ``{}`` (DMS does not say
  which columns form the key, and ``partition-key-value`` cannot be split reliably), and every
  ``:``-separated all-digit part of its ``stream-position`` is zero-padded to 20 digits, so
  that DMS's MySQL positions (``mysql-bin-changelog.002171:36912271:...``) compare as text in
  log order. PostgreSQL positions (fixed-width hex LSNs) are kept as they are.
- A foreign record without ``stream-position`` (DMS writes it only with
  ``IncludeTransactionDetails``) takes the caller's ``fallback_position``, which should be the
  record's own order-preserving offset in the stream carrying it: DMS puts each table's (or,
  with parallel apply, each key's) changes in one partition in source order. Without one it is
  ``MalformedRecord``. ``transaction-id`` is not used for order: PostgreSQL transaction ids
  follow transaction start, not commit, so they could put an older opt-in after a newer
  opt-out.
- ``record-type: control`` raises ``ControlRecord`` (the apply worker skips it; a control record
  must never fail a batch nor be read as a row change). Anything unreadable raises
  ``MalformedRecord`` whose reason names the field and what is wrong.
- Tolerated shapes of real DMS output: pretty-printed JSON (``MessageFormat: JSON``), omitted
  NULL columns, a before image under a custom ``BeforeImageSettings.FieldName`` (the one extra
  top-level object of an update record), and ``map-record-to-document``'s ``data._doc``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from optsync.errors import Fatal
from optsync.events import ChangeEvent, Op
from optsync.formats.json_text import (
    LONE_SURROGATE,
    TOO_DEEP,
    TOO_LONG_NUMBER,
    has_lone_surrogate,
)

__all__ = (
    "KEY_COLUMNS",
    "ControlRecord",
    "FormatError",
    "MalformedRecord",
    "decode",
    "encode",
    "encode_many",
    "event_to_dms",
)

KEY_COLUMNS = "optsync-key-columns"
"""Metadata key (optsync-specific) holding the event's key column names."""
EXTRA = "optsync-extra"
"""Metadata key (optsync-specific) holding ``ChangeEvent.extra`` when it is not empty."""
BEFORE_IMAGE = "before-image"

_ENVELOPE_KEYS = frozenset({"data", "control", "metadata"})
_DIGITS = re.compile(r"[0-9]+")
_OPS = {op.value: op for op in Op}

# msgspec reads and writes JSON ~5x faster than the standard library. It is only the fast path:
# a value it would write differently (NaN as null, a tuple, a datetime) or a document it refuses
# goes through ``json``, so results and errors are exactly the standard library's.
_FAST_ENCODER = msgspec.json.Encoder()
_FAST_DECODER = msgspec.json.Decoder()
_SCALARS = (str, int, bool, type(None))


class FormatError(Fatal):
    """A stream record that is not a row change; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ControlRecord(FormatError):
    """A control record (DMS ``create-table``, Debezium truncate or tombstone): no row change."""

    def __init__(self, operation: str, table: str, schema: str = "") -> None:
        name = f"{schema}.{table}" if schema else table
        where = f" for table {name!r}" if name else ""
        super().__init__(f"control record {operation!r}{where} carries no row change")
        self.operation = operation
        self.table = table
        self.schema = schema


class MalformedRecord(FormatError):
    """A record that cannot be read; ``reason`` names the field and what is wrong."""


def event_to_dms(event: ChangeEvent) -> dict[str, Any]:
    """The DMS JSON record of ``event`` as a dict (see ``encode``)."""
    record = _record(event, _timestamp())
    record["data"] = dict(record["data"])
    if BEFORE_IMAGE in record:
        record[BEFORE_IMAGE] = dict(record[BEFORE_IMAGE])
    return record


def _record(event: ChangeEvent, timestamp: str) -> dict[str, Any]:
    """``event_to_dms`` without copying the rows (for encoding right away)."""
    metadata: dict[str, Any] = {
        "timestamp": timestamp,
        "record-type": "data",
        "operation": event.op.value,
        "partition-key-type": "primary-key",
        "partition-key-value": event.partition_key,
        "schema-name": event.schema,
        "table-name": event.table,
    }
    if event.transaction_id is not None:
        metadata["transaction-id"] = event.transaction_id
    if event.commit_time is not None:
        metadata["commit-timestamp"] = event.commit_time
    metadata["stream-position"] = event.position
    metadata[KEY_COLUMNS] = list(event.key)
    if event.extra:
        metadata[EXTRA] = dict(event.extra)
    record: dict[str, Any] = {"data": event.row, "metadata": metadata}
    if event.op is Op.UPDATE and event.before is not None:
        record[BEFORE_IMAGE] = event.before
    return record


_second: tuple[int, str] = (0, "")
"""The last whole second ``_timestamp`` formatted, and its text up to the fraction."""


def _timestamp() -> str:
    """Now as DMS writes ``metadata.timestamp`` (microseconds, UTC); strftime once a second."""
    global _second  # noqa: PLW0603 - a cache; a race only formats one second twice
    now = time.time()
    second = int(now)
    cached, prefix = _second
    if cached != second:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second = (second, prefix)
    return f"{prefix}{int((now - second) * 1_000_000):06d}Z"


def encode(event: ChangeEvent) -> bytes:
    """``event`` as compact UTF-8 JSON; ``MalformedRecord`` if a value is not JSON."""
    return _encode(event, _timestamp())


def encode_many(events: Sequence[ChangeEvent]) -> list[bytes]:
    """``encode`` of each event, all with one ``metadata.timestamp`` (they are written at once)."""
    timestamp = _timestamp()
    return [_encode(event, timestamp) for event in events]


def _encode(event: ChangeEvent, timestamp: str) -> bytes:
    record = _record(event, timestamp)
    if _plain(record["data"]) and (event.before is None or _plain(event.before)):
        extra = record["metadata"].get(EXTRA)
        if extra is None or _plain(extra):
            try:
                return _FAST_ENCODER.encode(record)
            except (TypeError, ValueError, OverflowError):
                pass  # the standard library says what is wrong
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise MalformedRecord(
            f"event for table {event.table!r} holds a value JSON cannot carry ({exc}): "
            "convert it to str, int, float, bool or None where it is captured"
        ) from exc
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise MalformedRecord(
            f"event for table {event.table!r} holds a lone UTF-16 surrogate, which UTF-8 "
            "cannot carry: decode the source's text strictly where it is captured"
        ) from None


def _plain(row: Mapping[str, Any]) -> bool:
    """Whether msgspec writes ``row`` exactly as ``json.dumps`` would (and does not refuse it)."""
    if type(row) is not dict:
        return False
    for name, value in row.items():
        if type(name) is not str:
            return False
        if type(value) in _SCALARS:
            continue
        if type(value) is float:
            if not math.isfinite(value):
                return False
        elif type(value) is list:
            if not all(type(v) in _SCALARS or _plain_value(v) for v in value):
                return False
        elif not _plain_value(value):
            return False
    return True


def _plain_value(value: Any) -> bool:
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_plain_value(v) for v in value)
    if kind is dict:
        return _plain(value)
    return False


def decode(data: bytes, *, fallback_position: str | None = None) -> ChangeEvent:
    """Read one DMS JSON record (optsync's or a real DMS task's) into a ``ChangeEvent``.

    ``fallback_position`` is the position of a foreign record that has no ``stream-position``
    (see the module docstring). Raises ``ControlRecord`` or ``MalformedRecord``.
    """
    record = _parse(data)
    metadata = record.get("metadata")
    if not isinstance(metadata, dict):
        raise MalformedRecord(f"metadata is {_kind(metadata)}; a DMS record needs an object")
    record_type = _text(metadata, "record-type")
    operation = _text(metadata, "operation")
    table = _text(metadata, "table-name", required=False)
    schema = _text(metadata, "schema-name", required=False)
    if record_type == "control":
        raise ControlRecord(operation, table, schema)
    if record_type != "data":
        raise MalformedRecord(
            f"metadata.record-type is {record_type!r}; expected 'data' or 'control'"
        )
    op = _OPS.get(operation)
    if op is None:
        raise MalformedRecord(
            f"metadata.operation is {operation!r}; a data record has load, insert, update or delete"
        )
    if not table:
        raise MalformedRecord("metadata.table-name is empty; a data record names its table")
    row = _row(record)
    key_columns = metadata.get(KEY_COLUMNS)
    ours = key_columns is not None
    key: dict[str, Any] = {}
    if key_columns is not None:
        if not isinstance(key_columns, list) or not all(isinstance(c, str) for c in key_columns):
            raise MalformedRecord(f"metadata.{KEY_COLUMNS} is not a list of column names")
        key = {c: row.get(c) for c in key_columns}
    position = _position(metadata, ours, fallback_position)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = row
    if op is Op.DELETE:
        before, after = row, None
    elif op is Op.UPDATE:
        before = _before_image(record)
    extra = metadata.get(EXTRA) if ours else None
    if extra is not None and not isinstance(extra, dict):
        raise MalformedRecord(f"metadata.{EXTRA} is {_kind(extra)}; expected an object")
    transaction = metadata.get("transaction-id")
    commit_time = metadata.get("commit-timestamp")
    return ChangeEvent(
        op=op,
        table=table,
        key=key,
        position=position,
        before=before,
        after=after,
        schema=schema,
        commit_time=str(commit_time) if commit_time not in (None, "") else None,
        transaction_id=str(transaction) if transaction not in (None, "") else None,
        extra=extra or {},
    )


def _parse(data: bytes) -> dict[str, Any]:
    try:
        record = _FAST_DECODER.decode(data)
    except ValueError:  # msgspec.DecodeError, or UnicodeDecodeError inside a string
        record = _parse_strictly(data)  # the standard library's result, or its reason
    except RecursionError:
        raise MalformedRecord(f"record {TOO_DEEP}") from None
    if not isinstance(record, dict):
        raise MalformedRecord(f"record is {_kind(record)}; a DMS record is a JSON object")
    if has_lone_surrogate(record, data):
        raise MalformedRecord(f"record {LONE_SURROGATE}")
    return record


def _parse_strictly(data: bytes) -> Any:
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise MalformedRecord(
            f"record is not UTF-8 text (byte {exc.start}); DMS writes UTF-8 JSON"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise MalformedRecord(
            f"record is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise MalformedRecord(f"record {TOO_DEEP}") from None
    except ValueError:  # an integer past int's text limit (sys.get_int_max_str_digits)
        raise MalformedRecord(f"record {TOO_LONG_NUMBER}") from None


def _reject_constant(name: str) -> Any:
    raise MalformedRecord(f"record holds {name}, which is not JSON")


def _text(metadata: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = metadata.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        missing = "is missing" if value is None else f"is {_kind(value)}"
        raise MalformedRecord(f"metadata.{key} {missing}; expected a string")
    return value


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    if "data" not in record:
        raise MalformedRecord("data is missing; a DMS data record carries its row under data")
    row = record["data"]
    if not isinstance(row, dict):
        raise MalformedRecord(f"data is {_kind(row)}; expected an object of column values")
    document = row.get("_doc")
    if len(row) == 1 and isinstance(document, dict):
        return document  # map-record-to-document
    return row


def _before_image(record: Mapping[str, Any]) -> dict[str, Any] | None:
    if BEFORE_IMAGE in record:
        before = record[BEFORE_IMAGE]
        field = BEFORE_IMAGE
    else:
        # BeforeImageSettings.FieldName is free: the one other top-level object is the image.
        others = [k for k, v in record.items() if k not in _ENVELOPE_KEYS and isinstance(v, dict)]
        if len(others) != 1:
            return None
        field = others[0]
        before = record[field]
    if before is None:
        return None
    if not isinstance(before, dict):
        raise MalformedRecord(f"{field} is {_kind(before)}; a before image is an object")
    return before


def _position(metadata: Mapping[str, Any], ours: bool, fallback: str | None) -> str:
    position = metadata.get("stream-position")
    if position is None or position == "":
        if not ours and fallback:
            return fallback
        raise MalformedRecord(
            "metadata.stream-position is missing: without the source log position changes "
            "cannot be ordered; set IncludeTransactionDetails=true on the DMS Kinesis endpoint"
        )
    if not isinstance(position, str):
        raise MalformedRecord(f"metadata.stream-position is {_kind(position)}; expected a string")
    if ours:
        return position
    return ":".join(
        part.zfill(20) if _DIGITS.fullmatch(part) else part for part in position.split(":")
    )


def _kind(value: object) -> str:
    """A short description of a JSON value's type, never the value itself (it may be personal)."""
    if value is None:
        return "null or missing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
