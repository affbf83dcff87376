"""Column values: PostgreSQL's text output -> JSON-compatible values, the same for snapshot and log.

Both the snapshot (``COPY ... TO STDOUT``) and pgoutput (protocol 1, text tuples) give each value
as the text of its type's output function, under the session settings capture connects with
(``SESSION_OPTIONS``: UTC, ISO dates, hex bytea, all float digits). One converter per column
type turns that text into the event value, so a row loaded by the snapshot and the same row
read from the log are equal value for value.

- ``numeric``: the exact decimal text (``"12.30"``, ``"NaN"``), never a float.
- ``timestamptz``: the UTC instant, ISO-8601 with ``Z`` (``2024-03-10T07:30:00.5Z``), as many
  fractional digits as the server keeps; ``timestamp``: as given, ISO-8601 without a zone.
  ``infinity`` and BC dates stay as the server writes them.
- ``json`` / ``jsonb``: the parsed JSON value. ``bool``: true/false. Integers: int.
- ``float4`` / ``float8``: float; ``NaN`` and infinities (which JSON cannot carry) as text.
- ``bytea``: upper-case hex text without ``\\x`` (as the SQLite capture writes BLOBs).
- Arrays (any dimension, any element type): lists of converted elements, NULL as None.
- Domains convert as their base type. Everything else (text, uuid, date, time, interval,
  enums, inet, money, ranges, composites ...): the text as the server writes it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = (
    "SESSION_OPTIONS",
    "Converter",
    "TypeCatalog",
    "TypeInfo",
    "converts",
    "parse_array",
    "parse_copy_line",
)

Converter = Callable[[str], Any]

SESSION_OPTIONS: Final = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "
    "-c bytea_output=hex -c statement_timeout=0 -c lock_timeout=0 "
    "-c idle_in_transaction_session_timeout=0"
)
"""Settings every capture connection runs with, so output texts have one known form."""

BOOL, BYTEA, INT8, INT2, INT4, OID, JSON = 16, 17, 20, 21, 23, 26, 114
FLOAT4, FLOAT8, TIMESTAMP, TIMESTAMPTZ, NUMERIC, JSONB = 700, 701, 1114, 1184, 1700, 3802

_ISO_DATETIME: Final = re.compile(r"^\d{4,}-\d\d-\d\d \d")
_COPY_ESCAPE: Final = re.compile(r"\\(.)")
_COPY_CHARS: Final = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class TypeInfo:
    """The ``pg_type`` facts a converter needs."""

    oid: int
    name: str
    kind: str
    """``typtype``: b base, d domain, e enum, c composite, r range, m multirange, p pseudo."""
    category: str
    """``typcategory``: A for arrays."""
    element: int
    """``typelem``: the element type of an array."""
    delimiter: str
    base: int
    """``typbasetype``: the type a domain is over."""


def _text(value: str) -> str:
    return value


def converts(converter: Converter) -> bool:
    """Whether ``converter`` changes the text (False: the value is the text itself)."""
    return converter is not _text


def _bool(value: str) -> bool:
    return value == "t"


def _float(value: str) -> float | str:
    number = float(value)
    return number if math.isfinite(number) else value


def _bytea(value: str) -> str:
    return value[2:].upper() if value.startswith("\\x") else value


def _timestamptz(value: str) -> str:
    if value[10:11] == " " and value[-3:] == "+00" and value[4:5] == "-":
        return value[:10] + "T" + value[11:-3] + "Z"  # the common case, without a regex
    if not _ISO_DATETIME.match(value) or value.endswith(" BC"):
        return value  # infinity, -infinity, BC
    text = value[:10] + "T" + value[11:]
    if text.endswith("+00"):
        return text[:-3] + "Z"
    if text.endswith("+00:00"):
        return text[:-6] + "Z"
    return text


def _timestamp(value: str) -> str:
    if value[10:11] == " " and value[4:5] == "-" and value[-1:].isdigit():
        return value[:10] + "T" + value[11:]
    if not _ISO_DATETIME.match(value) or value.endswith(" BC"):
        return value
    return value[:10] + "T" + value[11:]


_BUILTIN: Final[Mapping[int, Converter]] = {
    BOOL: _bool,
    BYTEA: _bytea,
    INT2: int,
    INT4: int,
    INT8: int,
    OID: int,
    JSON: json.loads,
    JSONB: json.loads,
    FLOAT4: _float,
    FLOAT8: _float,
    NUMERIC: _text,
    TIMESTAMP: _timestamp,
    TIMESTAMPTZ: _timestamptz,
}


def parse_array(text: str, convert: Converter, delimiter: str = ",") -> list[Any]:
    """PostgreSQL's array text (``{1,NULL,"a b"}``, nested, with bounds) -> nested lists."""
    if text.startswith("["):  # non-default bounds: [0:1]={...}
        text = text[text.index("=") + 1 :]
    if not text.startswith("{"):
        raise ValueError(f"not an array literal: {text[:40]!r}")
    end = len(text)

    def level(i: int) -> tuple[list[Any], int]:
        items: list[Any] = []
        i += 1  # past "{"
        if i < end and text[i] == "}":
            return items, i + 1
        while i < end:
            char = text[i]
            if char == "{":
                nested, i = level(i)
                items.append(nested)
            elif char == '"':
                j = i + 1
                parts: list[str] = []
                while text[j] != '"':
                    if text[j] == "\\":
                        j += 1
                    parts.append(text[j])
                    j += 1
                items.append(convert("".join(parts)))
                i = j + 1
            else:
                j = i
                while text[j] != delimiter and text[j] != "}":
                    j += 1
                token = text[i:j].strip()
                items.append(None if token.upper() == "NULL" else convert(token))
                i = j
            if text[i] == delimiter:
                i += 1
            elif text[i] == "}":
                return items, i + 1
            else:
                raise ValueError(f"unexpected {text[i]!r} in an array literal")
        raise ValueError("unterminated array literal")

    items, _ = level(0)
    return items


def _copy_unescape(field: str) -> str:
    return _COPY_ESCAPE.sub(lambda m: _COPY_CHARS.get(m[1], m[1]), field)


def parse_copy_line(line: str) -> list[str | None]:
    """One line of ``COPY ... TO STDOUT`` text format -> raw field texts (None for NULL)."""
    if "\\" not in line:
        return line.split("\t")  # type: ignore[return-value]  # no NULL, no escape
    fields: list[str | None] = []
    for field in line.split("\t"):
        if field == "\\N":
            fields.append(None)
        elif "\\" in field:
            fields.append(_copy_unescape(field))
        else:
            fields.append(field)
    return fields


class TypeCatalog:
    """Converters by type OID; unknown OIDs are looked up through ``fetch`` (``pg_type``)."""

    def __init__(self, fetch: Callable[[Iterable[int]], Iterable[TypeInfo]]) -> None:
        self._fetch = fetch
        self._types: dict[int, TypeInfo] = {}
        self._converters: dict[int, Converter] = dict(_BUILTIN)

    def converters(self, oids: Iterable[int]) -> list[Converter]:
        """One converter per OID, in order (looking up the OIDs not known yet in one go)."""
        wanted = list(oids)
        self._learn([oid for oid in wanted if oid not in self._converters])
        return [self._converter(oid) for oid in wanted]

    def _learn(self, oids: list[int]) -> None:
        while oids:
            found = {t.oid: t for t in self._fetch(oids)}
            self._types.update(found)
            # Elements of arrays and bases of domains are needed too.
            nested = {t.element for t in found.values() if t.category == "A" and t.element}
            nested |= {t.base for t in found.values() if t.kind == "d" and t.base}
            oids = [o for o in nested if o not in self._types and o not in _BUILTIN]

    def _converter(self, oid: int) -> Converter:
        known = self._converters.get(oid)
        if known is not None:
            return known
        info = self._types.get(oid)
        converter: Converter = _text
        if info is not None:
            if info.kind == "d" and info.base:
                converter = self._converter(info.base)
            elif info.category == "A" and info.element:
                element = self._converter(info.element)
                delimiter = info.delimiter or ","
                converter = _array_converter(element, delimiter)
        self._converters[oid] = converter
        return converter


def _array_converter(element: Converter, delimiter: str) -> Converter:
    def convert(value: str) -> list[Any]:
        return parse_array(value, element, delimiter)

    return convert
