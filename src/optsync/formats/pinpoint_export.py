"""Pinpoint's endpoint files: export lines (gzip NDJSON) and import files (CSV, JSON lines).

Every format is read into one shape, an EndpointRequest dict plus its ``Id`` (``EndpointLine``),
which ``optsync.api.wire.endpoint_patch_from_wire`` then checks exactly as UpdateEndpoint does, so
an import rejects what the API rejects, with the same message naming the field.

Decisions:
- An export line is an ``EndpointResponse``: ``ApplicationId``, ``CohortId``, ``CreationDate`` and
  any key Pinpoint may add later are dropped (unknown keys are tolerated, as its export files are
  not formally specified); ``Metrics`` values may be numbers or numeric strings.
- CSV headers are dotted paths (``Location.Country``, ``User.UserAttributes.plan``); a repeated
  header gives several values of one attribute; an empty cell means "not given". A header outside
  Pinpoint's list of import columns is an error naming it (it would otherwise be lost silently).
- A line without ``Id`` but with ``ChannelType`` and ``Address`` gets ``stable_endpoint_id``: the
  same channel and address always give the same id, so importing a file twice updates the
  endpoints of the first import instead of creating copies.

No I/O here: callers hand in decoded lines and rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optsync.api.wire import ENDPOINT_REQUEST_FIELDS
from optsync.errors import InvalidRequest

__all__ = (
    "CSV_COLUMNS",
    "EndpointLine",
    "csv_header",
    "csv_lines",
    "csv_rows",
    "json_line",
    "line_to_export",
    "stable_endpoint_id",
)

_TEXT_COLUMNS = ("Id", "ChannelType", "Address", "OptOut", "EndpointStatus", "EffectiveDate")
_TEXT_COLUMNS_TAIL = ("RequestId", "User.UserId")
_DEMOGRAPHIC = (
    "AppVersion",
    "Locale",
    "Make",
    "Model",
    "ModelVersion",
    "Platform",
    "PlatformVersion",
    "Timezone",
)
_LOCATION_TEXT = ("City", "Country", "PostalCode", "Region")
_LOCATION_NUMBERS = ("Latitude", "Longitude")
_MAPS = ("Attributes.", "User.UserAttributes.", "Metrics.")

CSV_COLUMNS = (
    *_TEXT_COLUMNS,
    *_TEXT_COLUMNS_TAIL,
    *(f"Demographic.{k}" for k in _DEMOGRAPHIC),
    *(f"Location.{k}" for k in (*_LOCATION_TEXT, *_LOCATION_NUMBERS)),
)
"""The fixed CSV columns; ``Attributes.*``, ``User.UserAttributes.*`` and ``Metrics.*`` come on
top, one per name (repeated for several values)."""


@dataclass(frozen=True)
class EndpointLine:
    """One endpoint read from a file: its Id (may be empty) and its EndpointRequest fields."""

    endpoint_id: str
    request: dict[str, Any]


def stable_endpoint_id(channel_type: str, address: str) -> str:
    """The id given to a new endpoint that a file names by channel and address only."""
    digest = hashlib.sha256(f"{channel_type.upper()}\n{address}".encode()).hexdigest()
    return f"import-{digest[:32]}"


def _metric(value: Any, name: str) -> Any:
    # Numeric strings are read as numbers; anything else is left for the API's own check.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise InvalidRequest(f"Metrics.{name} must be a number, not {value!r}") from None
    return value


def json_line(obj: Any) -> EndpointLine:
    """An export line (an EndpointResponse) or a JSON import line, as an ``EndpointLine``."""
    if not isinstance(obj, dict):
        raise InvalidRequest("the line must be a JSON object (one endpoint per line)")
    request = {k: obj[k] for k in ENDPOINT_REQUEST_FIELDS if k in obj and obj[k] is not None}
    metrics = request.get("Metrics")
    if isinstance(metrics, dict) and any(isinstance(v, str) for v in metrics.values()):
        request["Metrics"] = {k: _metric(v, k) for k, v in metrics.items()}
    user = request.get("User")
    if isinstance(user, dict) and not {"UserId", "UserAttributes"}.issuperset(user):
        request["User"] = {k: user[k] for k in ("UserId", "UserAttributes") if k in user}
    endpoint_id = obj.get("Id")
    if endpoint_id is not None and not isinstance(endpoint_id, str):
        raise InvalidRequest(f"Id must be a string, not {type(endpoint_id).__name__}")
    return EndpointLine(endpoint_id or "", request)


# CSV --------------------------------------------------------------------------------------------


def _column_kind(column: str) -> str:
    """What a header names: 'text', 'demographic', 'location', 'number', or a map prefix."""
    if column in _TEXT_COLUMNS or column in _TEXT_COLUMNS_TAIL:
        return "text"
    for prefix in _MAPS:
        if column.startswith(prefix) and len(column) > len(prefix):
            return prefix
    head, _, tail = column.partition(".")
    if head == "Demographic" and tail in _DEMOGRAPHIC:
        return "demographic"
    if head == "Location" and tail in _LOCATION_TEXT:
        return "location"
    if head == "Location" and tail in _LOCATION_NUMBERS:
        return "number"
    raise InvalidRequest(
        f"CSV column {column!r} is not one of Pinpoint's import columns: Id, ChannelType, "
        "Address, OptOut, EndpointStatus, EffectiveDate, RequestId, User.UserId, Demographic.*, "
        "Location.*, Attributes.*, User.UserAttributes.*, Metrics.*"
    )


def csv_header(header: Sequence[str]) -> list[tuple[str, str]]:
    """Check a CSV header; (column, kind) for each column, in order."""
    columns = [c.strip().lstrip("\ufeff") for c in header]
    if not any(columns):
        raise InvalidRequest("the CSV file has an empty header line")
    kinds = [(c, _column_kind(c)) for c in columns]
    repeated = {c for c, k in kinds if k == "text" or k in ("demographic", "location", "number")}
    seen: set[str] = set()
    for column, _kind in kinds:
        if column in repeated and column in seen:
            raise InvalidRequest(
                f"CSV column {column!r} is repeated; only Attributes.*, User.UserAttributes.* "
                "and Metrics.* columns may repeat"
            )
        seen.add(column)
    return kinds


def csv_row(columns: Sequence[tuple[str, str]], row: Sequence[str]) -> EndpointLine:
    """One CSV data row, read with the header ``csv_header`` returned."""
    if len(row) > len(columns):
        raise InvalidRequest(f"the row has {len(row)} cells; the header names {len(columns)}")
    request: dict[str, Any] = {}
    endpoint_id = ""
    for (column, kind), cell in zip(columns, row, strict=False):
        if cell == "":
            continue
        if kind == "text":
            if column == "Id":
                endpoint_id = cell
            elif column == "User.UserId":
                request.setdefault("User", {})["UserId"] = cell
            else:
                request[column] = cell
        elif kind == "demographic":
            request.setdefault("Demographic", {})[column.split(".", 1)[1]] = cell
        elif kind == "location":
            request.setdefault("Location", {})[column.split(".", 1)[1]] = cell
        elif kind == "number":
            try:
                value = float(cell)
            except ValueError:
                raise InvalidRequest(f"{column} must be a number, not {cell!r}") from None
            request.setdefault("Location", {})[column.split(".", 1)[1]] = value
        elif kind == "Metrics.":
            name = column[len(kind) :]
            request.setdefault("Metrics", {})[name] = _metric(cell, name)
        elif kind == "Attributes.":
            request.setdefault("Attributes", {}).setdefault(column[len(kind) :], []).append(cell)
        else:  # User.UserAttributes.
            user = request.setdefault("User", {})
            user.setdefault("UserAttributes", {}).setdefault(column[len(kind) :], []).append(cell)
    return EndpointLine(endpoint_id, request)


def csv_rows(text: Iterable[str]) -> Iterator[tuple[int, EndpointLine | InvalidRequest]]:
    """(line number, endpoint or the reason it is refused) for each data row of a CSV file.

    A bad header raises ``InvalidRequest``: no row of the file can be read without it.
    Blank rows are skipped.
    """
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        return
    columns = csv_header(header)
    for row in reader:
        if not row or all(c == "" for c in row):
            continue
        try:
            yield reader.line_num, csv_row(columns, row)
        except InvalidRequest as exc:
            yield reader.line_num, exc


def _flat(request: Mapping[str, Any], endpoint_id: str) -> list[tuple[str, str]]:
    """(column, cell) pairs of one endpoint; repeated columns for several values."""
    cells: list[tuple[str, str]] = [("Id", endpoint_id)] if endpoint_id else []
    for column in ("ChannelType", "Address", "OptOut", "EndpointStatus", "EffectiveDate"):
        if request.get(column) is not None:
            cells.append((column, str(request[column])))
    if request.get("RequestId") is not None:
        cells.append(("RequestId", str(request["RequestId"])))
    user = request.get("User") or {}
    if user.get("UserId") is not None:
        cells.append(("User.UserId", str(user["UserId"])))
    for group in ("Demographic", "Location"):
        for key, value in sorted((request.get(group) or {}).items()):
            if value is not None:
                cells.append((f"{group}.{key}", repr(value) if isinstance(value, float) else value))
    for prefix, values in (
        ("Attributes.", request.get("Attributes") or {}),
        ("User.UserAttributes.", user.get("UserAttributes") or {}),
    ):
        for name, items in sorted(values.items()):
            cells.extend((f"{prefix}{name}", item) for item in items)
    for name, number in sorted((request.get("Metrics") or {}).items()):
        cells.append((f"Metrics.{name}", repr(float(number))))
    return cells


def csv_lines(endpoints: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A CSV file of ``(Id, EndpointRequest)`` pairs that ``csv_rows`` reads back the same.

    The header is the union of every endpoint's columns, a repeated column as many times as the
    endpoint with most values needs.
    """
    flats = [_flat(request, endpoint_id) for endpoint_id, request in endpoints]
    widths: dict[str, int] = {}
    for cells in flats:
        counts: dict[str, int] = {}
        for column, _ in cells:
            counts[column] = counts.get(column, 0) + 1
        for column, n in counts.items():
            widths[column] = max(widths.get(column, 0), n)
    fixed = [c for c in CSV_COLUMNS if c in widths]
    rest = sorted(c for c in widths if c not in CSV_COLUMNS)
    header = [c for c in (*fixed, *rest) for _ in range(widths[c])]
    slots: dict[str, list[int]] = {}
    for i, column in enumerate(header):
        slots.setdefault(column, []).append(i)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for cells in flats:
        row = [""] * len(header)
        used: dict[str, int] = {}
        for column, value in cells:
            n = used.get(column, 0)
            row[slots[column][n]] = value
            used[column] = n + 1
        writer.writerow(row)
    return out.getvalue()


def line_to_export(response: Mapping[str, Any]) -> bytes:
    """One export line: the EndpointResponse as compact JSON and a newline."""
    return json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
