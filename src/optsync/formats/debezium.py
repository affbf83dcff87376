"""The Debezium change-event envelope (MySQL, MariaDB and PostgreSQL connectors), read only.

Accepted: the value of a Debezium record, with or without the JSON converter's
``{"schema": ..., "payload": ...}`` wrapper, as bytes or as an already parsed object. The
record's key (optional) gives ``ChangeEvent.key``; without it the key is ``{}``.

Decisions:

- ``op``: ``c`` insert, ``u`` update, ``d`` delete, ``r`` load (snapshot). Truncate (``t``),
  logical-decoding messages (``m``), tombstones (null value), heartbeats, transaction
  boundaries and schema-change events raise ``ControlRecord``: none of them is a row change,
  and a truncate is never read as "delete every endpoint".
- Position, MySQL and MariaDB: ``{file}:{pos:020d}:{row:06d}`` from the binlog coordinates;
  binlog file names are zero-padded, so the text sorts in log order. ``row`` tells apart the
  rows of one binlog event. Snapshot records (``r``) carry the snapshot's binlog coordinates
  without the row part, so any log event at or after that point sorts after them (a prefix
  sorts first). ``gtid`` is not the position, because GTID text does not sort (``uuid:100`` <
  ``uuid:23``, and two server uuids do not compare); it is kept in ``extra["gtid"]``.
- Position, PostgreSQL: ``position_of(source.lsn)``. Writes to one row are ordered by row
  locks, so their LSNs follow commit order.
- Commit time: ``source.ts_ms`` as ISO-8601 UTC with milliseconds. Table: ``source.table``;
  schema: ``source.db`` (MySQL, MariaDB) or ``source.schema`` (PostgreSQL). Transaction id:
  ``transaction.id``, else PostgreSQL's ``source.txId``, else the MySQL GTID.
- Errors reuse ``optsync.formats.dms``'s ``ControlRecord`` and ``MalformedRecord``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from optsync.events import ChangeEvent, Op, position_of
from optsync.formats.dms import ControlRecord, MalformedRecord
from optsync.formats.json_text import (
    LONE_SURROGATE,
    TOO_DEEP,
    TOO_LONG_NUMBER,
    has_lone_surrogate,
)

__all__ = ("decode_debezium",)

_OPS = {"c": Op.INSERT, "u": Op.UPDATE, "d": Op.DELETE, "r": Op.LOAD}
_CONTROL_OPS = {"t": "truncate", "m": "message"}
_TIMESTAMP_KEYS = frozenset({"ts_ms", "ts_us", "ts_ns"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def decode_debezium(
    data: bytes | Mapping[str, Any], *, key: bytes | Mapping[str, Any] | None = None
) -> ChangeEvent:
    """Read one Debezium record value (and optionally its key) into a ``ChangeEvent``.

    Raises ``ControlRecord`` for records that carry no row change, ``MalformedRecord`` for
    records that cannot be read.
    """
    payload = _payload(data, "value")
    if payload is None:
        raise ControlRecord("tombstone", "")
    op_code = payload.get("op")
    if op_code is None:
        raise ControlRecord(_control_kind(payload), *_names(payload.get("source")))
    if not isinstance(op_code, str):
        raise MalformedRecord("op is not a string; expected c, u, d, r, t or m")
    source = payload.get("source")
    if not isinstance(source, dict):
        raise MalformedRecord("source is missing; a Debezium change event names its source")
    table, schema = _names(source)
    if op_code in _CONTROL_OPS:
        raise ControlRecord(_CONTROL_OPS[op_code], table, schema)
    op = _OPS.get(op_code)
    if op is None:
        raise MalformedRecord(f"op is {op_code!r}; expected c, u, d, r, t or m")
    if not table:
        raise MalformedRecord("source.table is missing; a change event names its table")
    before = _image(payload, "before")
    after = _image(payload, "after")
    if op is Op.DELETE and before is None:
        raise MalformedRecord("before is null on a delete (op 'd'); it must hold the old row")
    if op is not Op.DELETE and after is None:
        raise MalformedRecord(f"after is null on op {op_code!r}; it must hold the new row")
    gtid = source.get("gtid")
    return ChangeEvent(
        op=op,
        table=table,
        key=_key(key),
        position=_position(source, op),
        before=before,
        after=after,
        schema=schema,
        commit_time=_commit_time(source),
        transaction_id=_transaction_id(payload, source),
        extra={"gtid": gtid} if isinstance(gtid, str) and gtid else {},
    )


def _payload(data: bytes | Mapping[str, Any], what: str) -> dict[str, Any] | None:
    if isinstance(data, bytes | bytearray):
        if not data.strip():
            return None  # a Kafka record with a null value
        try:
            parsed: Any = json.loads(bytes(data).decode())
        except UnicodeDecodeError as exc:
            raise MalformedRecord(f"{what} is not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise MalformedRecord(
                f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        except RecursionError:
            raise MalformedRecord(f"{what} {TOO_DEEP}") from None
        except ValueError:  # an integer past int's text limit (sys.get_int_max_str_digits)
            raise MalformedRecord(f"{what} {TOO_LONG_NUMBER}") from None
        if has_lone_surrogate(parsed, bytes(data)):
            raise MalformedRecord(f"{what} {LONE_SURROGATE}")
    else:
        parsed = data
    if parsed is None:
        return None
    if not isinstance(parsed, Mapping):
        raise MalformedRecord(f"{what} is not a JSON object")
    if "payload" in parsed and "op" not in parsed:
        # The JSON converter with schemas enabled: {"schema": ..., "payload": ...}.
        parsed = parsed["payload"]
        if parsed is None:
            return None
        if not isinstance(parsed, Mapping):
            raise MalformedRecord(f"{what}.payload is not a JSON object")
    return dict(parsed)


def _control_kind(payload: Mapping[str, Any]) -> str:
    if "ddl" in payload or "tableChanges" in payload:
        return "schema-change"
    if "status" in payload and "id" in payload:
        return "transaction"
    if payload and set(payload) <= _TIMESTAMP_KEYS:
        return "heartbeat"
    raise MalformedRecord("op is missing; a Debezium change event has op c, u, d, r, t or m")


def _names(source: object) -> tuple[str, str]:
    """(table, schema) of a source block; empty strings when unknown."""
    if not isinstance(source, Mapping):
        return "", ""
    table = source.get("table")
    postgres = source.get("connector") == "postgresql" or "lsn" in source
    schema = source.get("schema") if postgres else source.get("db")
    return (
        table if isinstance(table, str) else "",
        schema if isinstance(schema, str) else "",
    )


def _image(payload: Mapping[str, Any], field: str) -> dict[str, Any] | None:
    image = payload.get(field)
    if image is None:
        return None
    if not isinstance(image, dict):
        raise MalformedRecord(f"{field} is not an object; expected the row's column values")
    return image


def _key(key: bytes | Mapping[str, Any] | None) -> dict[str, Any]:
    if key is None:
        return {}
    return _payload(key, "key") or {}


def _position(source: Mapping[str, Any], op: Op) -> str:
    connector = source.get("connector")
    if connector == "postgresql" or "lsn" in source:
        return position_of(_count(source, "lsn"))
    if connector in ("mysql", "mariadb") or "file" in source:
        file = source.get("file")
        if not isinstance(file, str) or not file:
            raise MalformedRecord("source.file is missing; MySQL events carry their binlog file")
        base = f"{file}:{_count(source, 'pos'):020d}"
        if op is Op.LOAD:
            return base
        row = _count(source, "row") if source.get("row") is not None else 0
        return f"{base}:{row:06d}"
    raise MalformedRecord(
        f"source.connector is {connector!r}: this version reads events of Debezium's mysql, "
        "mariadb and postgresql connectors"
    )


def _count(source: Mapping[str, Any], field: str) -> int:
    value = source.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedRecord(f"source.{field} is missing or not a whole number >= 0")
    return value


def _commit_time(source: Mapping[str, Any]) -> str | None:
    ts_ms = source.get("ts_ms")
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int) or ts_ms <= 0:
        return None
    moment = _EPOCH + timedelta(milliseconds=ts_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _transaction_id(payload: Mapping[str, Any], source: Mapping[str, Any]) -> str | None:
    transaction = payload.get("transaction")
    if isinstance(transaction, Mapping) and transaction.get("id") not in (None, ""):
        return str(transaction["id"])
    for field in ("txId", "gtid"):
        value = source.get(field)
        if value not in (None, ""):
            return str(value)
    return None
