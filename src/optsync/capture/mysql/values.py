"""Column values of MySQL/MariaDB rows as JSON values, the same from a snapshot and the binlog.

A snapshot reads rows as the server's text (PyMySQL without decoders); the binlog reader gets
Python values from ``mysql-replication``. Both go through this module so that a row has one
representation whichever way it arrived: a ``load`` and a later ``update`` of an unchanged
column carry equal values.

=================  ==========================================================================
MySQL type         JSON value
=================  ==========================================================================
integers, BOOL     number (``TINYINT(1)`` is a number 0/1: the binlog does not say "boolean")
YEAR               number (``0000`` is 0)
DECIMAL, NUMERIC   string with the column's scale, exact (``"1.50"``), never a float
FLOAT              number: the shortest decimal that is the same single-precision float
DOUBLE             number
BIT(n)             number (the bits as an unsigned integer)
CHAR, VARCHAR,     string
TEXT, ENUM
SET                string: the members in definition order, comma-separated (``""``: empty)
JSON               string: the document's text (MariaDB stores the text as written)
BINARY, VARBINARY, string: upper-case hex of the bytes (``BINARY(n)`` keeps its zero padding)
BLOB, GEOMETRY
DATE               ``"YYYY-MM-DD"``
DATETIME(p)        ``"YYYY-MM-DDTHH:MM:SS[.f]"`` as stored, no time zone, p fraction digits
TIMESTAMP(p)       ``"YYYY-MM-DDTHH:MM:SS[.f]Z"``: the instant in UTC (the session time zone
                   plays no part)
TIME(p)            ``"[-]HH:MM:SS[.f]"`` (hours may exceed 24)
zero dates         the zero text of the type without a zone: ``"0000-00-00"``,
                   ``"0000-00-00T00:00:00[.f]"``; dates with a zero or impossible part
                   (``2020-00-10``, ``ALLOW_INVALID_DATES``) become the zero date too, because
                   the binlog library cannot represent them
NULL               null
=================  ==========================================================================
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

__all__ = (
    "ColumnKind",
    "RowDecoder",
    "binlog_decoder",
    "cursor_param",
    "kind_of",
    "snapshot_converter",
    "snapshot_value",
)

Convert = Callable[[Any], Any]

ZERO_DATE: Final = "0000-00-00"
_EPOCH: Final = dt.datetime(1970, 1, 1)  # noqa: DTZ001 - the library's naive UTC values
_OUT_OF_RANGE_PREFIX: Final = "out of"
"""``mysql-replication`` marks an unreadable (zero) date with a none source "out of ... range"."""


class ColumnKind(StrEnum):
    INT = "int"
    YEAR = "year"
    DECIMAL = "decimal"
    FLOAT = "float"
    DOUBLE = "double"
    BIT = "bit"
    TEXT = "text"
    SET = "set"
    JSON = "json"
    BINARY = "binary"
    DATE = "date"
    DATETIME = "datetime"
    TIMESTAMP = "timestamp"
    TIME = "time"


_INT_TYPES: Final = frozenset({"tinyint", "smallint", "mediumint", "int", "integer", "bigint"})
_BINARY_TYPES: Final = frozenset(
    {"binary", "varbinary", "tinyblob", "blob", "mediumblob", "longblob", "geometry", "point",
     "linestring", "polygon", "multipoint", "multilinestring", "multipolygon",
     "geometrycollection"}
)  # fmt: skip


def kind_of(data_type: str, charset: str | None) -> ColumnKind:
    """The kind of a column from ``information_schema.COLUMNS`` (DATA_TYPE, CHARACTER_SET_NAME)."""
    name = data_type.lower()
    if name in _INT_TYPES:
        return ColumnKind.INT
    simple = {
        "year": ColumnKind.YEAR,
        "decimal": ColumnKind.DECIMAL,
        "numeric": ColumnKind.DECIMAL,
        "float": ColumnKind.FLOAT,
        "double": ColumnKind.DOUBLE,
        "real": ColumnKind.DOUBLE,
        "bit": ColumnKind.BIT,
        "set": ColumnKind.SET,
        "json": ColumnKind.JSON,
        "date": ColumnKind.DATE,
        "datetime": ColumnKind.DATETIME,
        "timestamp": ColumnKind.TIMESTAMP,
        "time": ColumnKind.TIME,
    }
    if name in simple:
        return simple[name]
    if name in _BINARY_TYPES or charset == "binary":
        return ColumnKind.BINARY
    return ColumnKind.TEXT


# -- shared formatting ---------------------------------------------------------------------------


def _hex(value: bytes) -> str:
    return value.hex().upper()


def _float32(value: float) -> float:
    """The shortest decimal that reads back as the same single-precision float."""
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        shorter = float(f"{value:.{digits}g}")
        if struct.pack("<f", shorter) == packed:
            return shorter
    return value


def _fraction(micro: int, fsp: int) -> str:
    return "." + f"{micro:06d}"[:fsp] if fsp > 0 else ""


def _zero_datetime(fsp: int) -> str:
    return f"{ZERO_DATE}T00:00:00" + ("." + "0" * fsp if fsp > 0 else "")


_TIMESPEC: Final = {0: "seconds", 3: "milliseconds", 6: "microseconds"}


def _datetime_text(value: dt.datetime, fsp: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` with ``fsp`` fraction digits (isoformat: C, zero-padded)."""
    spec = _TIMESPEC.get(fsp)
    if spec is not None:
        return value.isoformat(timespec=spec)
    return value.isoformat(timespec="microseconds")[: fsp - 6]


def _time_text(value: dt.timedelta, fsp: int) -> str:
    total = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if total < 0 else ""
    seconds, micro = divmod(abs(total), 1_000_000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{sign}{hours:02d}:{minutes:02d}:{secs:02d}{_fraction(micro, fsp)}"


def _valid_date(text: str) -> bool:
    day = text[8:10]
    if text[0] != "0" and text[5:7] != "00" and day != "00" and int(day) <= 28:
        return True  # the common case, without building a date
    try:
        dt.date(int(text[0:4]), int(text[5:7]), int(text[8:10]))
    except ValueError:
        return False
    return True


def _json_text(value: Any) -> str:
    """MySQL's binary JSON (decoded by the library) as MySQL prints it."""

    def plain(item: Any) -> Any:
        if isinstance(item, bytes):
            return item.decode("utf-8", "backslashreplace")
        if isinstance(item, dict):
            return {plain(k): plain(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [plain(v) for v in item]
        if isinstance(item, decimal.Decimal):
            return float(item)
        # Dates and times stored in JSON (JSON_OBJECT('at', NOW())): as MySQL prints them.
        # They used to raise TypeError here, which stopped capture at that event for good.
        if isinstance(item, dt.datetime):
            return item.strftime("%Y-%m-%d %H:%M:%S.%f")
        if isinstance(item, dt.date):
            return item.strftime("%Y-%m-%d")
        if isinstance(item, dt.time):
            return item.strftime("%H:%M:%S.%f")
        if isinstance(item, dt.timedelta):
            return _json_duration(item)
        return item

    return json.dumps(plain(value), ensure_ascii=False, separators=(", ", ": "), default=str)


def _json_duration(delta: dt.timedelta) -> str:
    """A TIME value inside JSON, as MySQL prints it (``-01:02:03.000000``)."""
    micros = abs(delta) // dt.timedelta(microseconds=1)
    seconds, fraction = divmod(micros, 1_000_000)
    sign = "-" if delta < dt.timedelta(0) else ""
    return f"{sign}{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}.{fraction:06d}"


# -- snapshot: the server's text ---------------------------------------------------------------


def snapshot_value(kind: ColumnKind, fsp: int, raw: str | bytes | None) -> Any:
    """A value read by a snapshot (server text, or bytes for binary columns) as a JSON value."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        if kind is ColumnKind.BIT:
            return int.from_bytes(raw, "big")
        return _hex(raw)
    if kind is ColumnKind.INT or kind is ColumnKind.YEAR:
        return int(raw)
    if kind is ColumnKind.FLOAT:
        return _float32(float(raw))
    if kind is ColumnKind.DOUBLE:
        return float(raw)
    if kind is ColumnKind.DATE:
        return raw if _valid_date(raw) else ZERO_DATE
    if kind is ColumnKind.DATETIME or kind is ColumnKind.TIMESTAMP:
        if not _valid_date(raw):
            return _zero_datetime(fsp)
        text = raw.replace(" ", "T", 1)
        return text + "Z" if kind is ColumnKind.TIMESTAMP else text
    return raw  # DECIMAL, TIME, TEXT, SET, JSON: the server's text is the value


def snapshot_converter(kind: ColumnKind, fsp: int) -> Convert | None:
    """``snapshot_value`` for one column, as a function of a non-NULL value (None: as it is)."""
    if kind in (ColumnKind.TEXT, ColumnKind.SET, ColumnKind.JSON, ColumnKind.DECIMAL,
                ColumnKind.TIME):  # fmt: skip
        return None  # the server's text is the value
    if kind is ColumnKind.INT or kind is ColumnKind.YEAR:
        return int
    if kind is ColumnKind.BINARY:
        return _hex
    if kind is ColumnKind.TIMESTAMP:
        zero = _zero_datetime(fsp)
        return lambda raw: raw.replace(" ", "T", 1) + "Z" if _valid_date(raw) else zero
    if kind is ColumnKind.DATETIME:
        zero = _zero_datetime(fsp)
        return lambda raw: raw.replace(" ", "T", 1) if _valid_date(raw) else zero
    return lambda raw: snapshot_value(kind, fsp, raw)


def cursor_param(kind: ColumnKind, stored: Any) -> Any:
    """A snapshot cursor value (as kept in the capture state) as a query parameter.

    Numbers are bound as numbers, DECIMAL as an exact ``Decimal`` and binary values as bytes, so
    the server compares them the way it orders the column (never as doubles or as text).
    """
    if stored is None:
        return None
    if kind is ColumnKind.DECIMAL:
        return decimal.Decimal(stored)
    if kind is ColumnKind.BINARY:
        return bytes.fromhex(stored)
    if kind is ColumnKind.BIT:
        return int(stored)
    if kind is ColumnKind.FLOAT:
        # The column holds a single-precision float: compare with exactly that value.
        return struct.unpack("<f", struct.pack("<f", float(stored)))[0]
    if kind in (ColumnKind.DATE, ColumnKind.DATETIME, ColumnKind.TIMESTAMP):
        return str(stored).replace("T", " ").removesuffix("Z")
    return stored


# -- binlog: mysql-replication's values -------------------------------------------------------

# mysql-replication's FIELD_TYPE numbers (pymysqlreplication.constants.FIELD_TYPE).
_FLOAT, _TIMESTAMP, _DATE, _DATETIME, _YEAR, _NEWDATE, _BIT = 4, 7, 10, 12, 13, 14, 16
_TIMESTAMP2, _DATETIME2, _TIME2, _TIME = 17, 18, 19, 11
_JSON, _NEWDECIMAL, _SET, _STRING = 245, 246, 248, 254
_STRING_TYPES: Final = frozenset(
    {15, 252, 253, 254, 255}
)  # VARCHAR, BLOB, VAR_STRING, STRING, GEOMETRY


@dataclass(frozen=True)
class _Fix:
    """How to turn one column's library value into its JSON value."""

    name: str
    convert: Convert
    zero: str | None = None
    """The value of a zero/unreadable date (the library gives None with an "out of" source)."""
    empty: str | None = None
    """The value of an empty SET (the library gives None with source "empty set")."""


class RowDecoder:
    """Converts the rows of one table-map layout; built once per layout, used for every row."""

    def __init__(self, fixes: Sequence[_Fix]) -> None:
        self._fixes = tuple(fixes)
        self._none_fixes = tuple(f for f in fixes if f.zero is not None or f.empty is not None)

    def __call__(self, values: dict[str, Any], none_sources: Mapping[str, str]) -> dict[str, Any]:
        """``values`` (changed in place) as JSON values."""
        for fix in self._fixes:
            value = values.get(fix.name)
            if value is not None:
                values[fix.name] = fix.convert(value)
        if none_sources:
            for fix in self._none_fixes:
                source = none_sources.get(fix.name)
                if source is None:
                    continue
                if fix.zero is not None and source.startswith(_OUT_OF_RANGE_PREFIX):
                    values[fix.name] = fix.zero
                elif fix.empty is not None and source == "empty set":
                    values[fix.name] = fix.empty
        return values


def _bytes_or_text(pad: int) -> Convert:
    def convert(value: Any) -> Any:
        if isinstance(value, bytes):
            return _hex(value.ljust(pad, b"\0") if pad else value)
        return value

    return convert


def _timestamp(fsp: int) -> Convert:
    def convert(value: dt.datetime) -> str:
        if value == _EPOCH:
            return _zero_datetime(fsp)  # TIMESTAMP's range starts at 1970-01-01 00:00:01
        return _datetime_text(value, fsp) + "Z"

    return convert


def _column_fix(column: Any) -> _Fix | None:
    """The conversion a library column needs, or None when its values are already JSON."""
    name = str(column.name)
    kind = column.type
    fsp = int(getattr(column, "fsp", 0) or 0)
    if kind == _FLOAT:
        return _Fix(name, _float32)
    if kind == _NEWDECIMAL:
        return _Fix(name, lambda v: format(v, "f"))
    if kind == _BIT:
        return _Fix(name, lambda v: int(v, 2))
    if kind == _YEAR:
        return _Fix(name, lambda v: 0 if v == 1900 else v)  # YEAR 0000 is stored as 0
    if kind in (_DATE, _NEWDATE):
        return _Fix(name, lambda v: v.isoformat(), zero=ZERO_DATE)
    if kind in (_DATETIME, _DATETIME2):
        return _Fix(name, lambda v: _datetime_text(v, fsp), zero=_zero_datetime(fsp))
    if kind in (_TIMESTAMP, _TIMESTAMP2):
        return _Fix(name, _timestamp(fsp))
    if kind in (_TIME, _TIME2):
        return _Fix(name, lambda v: _time_text(v, fsp))
    if kind == _SET:
        members = tuple(column.set_values or ())
        return _Fix(name, lambda v: ",".join(m for m in members if m in v), empty="")
    if kind == _JSON:
        return _Fix(name, lambda v: v if isinstance(v, str) else _json_text(v))
    if kind in _STRING_TYPES and getattr(column, "character_set_name", None) in (None, "binary"):
        # BINARY(n): the binlog drops the trailing zero bytes that the column stores.
        pad = int(getattr(column, "max_length", 0) or 0) if kind == _STRING else 0
        return _Fix(name, _bytes_or_text(pad))
    return None


def binlog_decoder(columns: Sequence[Any]) -> RowDecoder:
    """The decoder for rows of a table map with these (library) columns."""
    return RowDecoder([fix for fix in map(_column_fix, columns) if fix is not None])
