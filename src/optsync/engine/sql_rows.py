"""Endpoint rows for ``SqlStore``: the ``endpoints`` column list and INSERT statements, and the
conversions between an ``Endpoint`` and its row and attribute rows.

Also the small helpers the ``sql*.py`` modules share: ``_dumps`` (the JSON of text columns),
``_chunks`` (IN lists of at most 500 values), ``_insert_statement`` (an INSERT of given columns)
and ``_offset`` (a NextToken as a row offset).
Pure functions: nothing here touches a database.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optsync.engine.countries import to_alpha2
from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import (
    ChannelType,
    Demographic,
    Endpoint,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.segments import iso_instant_ms
from optsync.engine.writes import bucket
from optsync.errors import InvalidRequest

__all__ = ()  # the names below are private to the engine's sql*.py modules


_ENDPOINT_COLUMNS = (
    "app_id, id, id_key, channel_type, address, opt_out, status, creation_date, effective_date, "
    "cohort_id, request_id, user_id, country, country_code, city, region, postal_code, latitude, "
    "longitude, app_version, locale, make, model, model_version, platform, platform_version, "
    "timezone, attributes, user_attributes, metrics, source_position"
)


_COLUMN_NAMES = tuple(c.strip() for c in _ENDPOINT_COLUMNS.split(","))
_ENDPOINT_INSERT_COLUMNS = ("pk", *_COLUMN_NAMES)
_ATTRIBUTE_COLUMNS = (
    "endpoint_pk", "app_id", "kind", "name", "value", "value_ts",
    "country_code", "channel_type", "status", "opt_out",
)  # fmt: skip
_HISTORY_COLUMNS = (
    "app_id", "endpoint_key", "endpoint_id", "at", "opt_out_before", "opt_out_after",
    "address", "cause_kind", "cause_ref", "channel_type", "user_id", "source_time",
    "cause_detail", "address_before",
)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _insert_statement(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns) VALUES (?, ...)``."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"


_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _dump_lists(values: Mapping[str, Sequence[str]]) -> str:
    return _dumps({k: list(v) for k, v in values.items()}) if values else "{}"


def _lists(text: str | None) -> dict[str, tuple[str, ...]]:
    if not text or text == "{}":
        return {}
    return {k: tuple(v) for k, v in json.loads(text).items()}


# Enum members by value: a dict lookup instead of EnumType.__call__ for every row read.
_CHANNELS = {c.value: c for c in ChannelType}
_OPT_OUTS = {o.value: o for o in OptOut}
_STATUSES = {s.value: s for s in EndpointStatus}
_EMPTY_LOCATION = Location()
_EMPTY_DEMOGRAPHIC = Demographic()


def _row_to_endpoint(row: Sequence[Any]) -> Endpoint:
    app_id, eid, _key, channel, address, opt_out, status, created, effective, cohort, req = row[:11]
    location = (
        _EMPTY_LOCATION
        if row[12] is None and all(v is None for v in row[14:19])
        else Location(
            country=row[12],
            city=row[14],
            region=row[15],
            postal_code=row[16],
            latitude=row[17],
            longitude=row[18],
        )
    )
    demographic = (
        _EMPTY_DEMOGRAPHIC
        if all(v is None for v in row[19:27])
        else Demographic(
            app_version=row[19],
            locale=row[20],
            make=row[21],
            model=row[22],
            model_version=row[23],
            platform=row[24],
            platform_version=row[25],
            timezone=row[26],
        )
    )
    metrics = row[29]
    return Endpoint(
        app_id=app_id,
        id=eid,
        channel_type=_CHANNELS[channel],
        address=address,
        opt_out=_OPT_OUTS[opt_out],
        endpoint_status=_STATUSES[status],
        creation_date=created,
        effective_date=effective,
        cohort_id=cohort,
        request_id=req,
        user_id=row[11],
        location=location,
        demographic=demographic,
        attributes=_lists(row[27]),
        user_attributes=_lists(row[28]),
        metrics={}
        if not metrics or metrics == "{}"
        else {k: float(v) for k, v in json.loads(metrics).items()},
        source_position=row[30],
    )


def _dump_metrics(values: Mapping[str, float]) -> str:
    return _dumps(dict(values)) if values else "{}"


def _endpoint_values(
    e: Endpoint,
    dump_lists: Callable[[Mapping[str, Sequence[str]]], str] = _dump_lists,
    dump_metrics: Callable[[Mapping[str, float]], str] = _dump_metrics,
) -> tuple[Any, ...]:
    """The ``endpoints`` row of ``e`` (without its pk); the dumpers write the map columns' JSON
    (the bulk import passes memoising ones)."""
    loc, demo = e.location, e.demographic
    return (
        e.app_id,
        e.id,
        endpoint_key(e.id),
        # StrEnum members bind as their text; no ``.value`` lookup on this hot path.
        e.channel_type,
        e.address,
        e.opt_out,
        e.endpoint_status,
        e.creation_date,
        e.effective_date,
        e.cohort_id,
        e.request_id,
        e.user_id,
        loc.country,
        to_alpha2(loc.country) if loc.country else None,
        loc.city,
        loc.region,
        loc.postal_code,
        loc.latitude,
        loc.longitude,
        demo.app_version,
        demo.locale,
        demo.make,
        demo.model,
        demo.model_version,
        demo.platform,
        demo.platform_version,
        demo.timezone,
        dump_lists(e.attributes),
        dump_lists(e.user_attributes),
        dump_metrics(e.metrics),
        e.source_position,
    )


_CHUNK = 500


def _side_of(e: Endpoint) -> tuple[object, ...]:
    """What an endpoint's attribute and metric rows hold; they are rewritten when it changes."""
    return (e.attributes, e.user_attributes, e.metrics, bucket(e))


def _attribute_rows(pk: int, e: Endpoint) -> list[tuple[Any, ...]]:
    """One row per attribute value, each with the endpoint's rollup columns copied in.

    The copies let an attribute segment be counted from the attribute index alone.
    """
    country, channel, status, opt_out = bucket(e)
    return [
        (pk, e.app_id, kind, name, value, iso_instant_ms(value), country, channel, status, opt_out)
        for kind, values in (("A", e.attributes), ("U", e.user_attributes))
        for name, items in values.items()
        for value in dict.fromkeys(items)
    ]


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


def _offset(token: str | None) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidRequest(f"token {token!r} is not a NextToken this server returned")
    return int(token)
