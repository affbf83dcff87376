"""Pinpoint JSON <-> engine values. Third-party payloads become typed values here, at the edge.

Every parse error names the field (with its position in a batch) and what it must be.
"""

from __future__ import annotations

from typing import Any, TypeVar

from optsync.engine.models import (
    App,
    Channel,
    ChannelType,
    ConsentChange,
    Demographic,
    Endpoint,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.segments import definition_to_wire
from optsync.engine.store import Segment
from optsync.errors import InvalidRequest

__all__ = (
    "app_to_wire",
    "channel_to_wire",
    "consent_to_wire",
    "endpoint_patch_from_wire",
    "endpoint_to_wire",
    "segment_to_wire",
)

_ENDPOINT_FIELDS = frozenset(
    {
        "Address",
        "Attributes",
        "ChannelType",
        "Demographic",
        "EffectiveDate",
        "EndpointStatus",
        "Location",
        "Metrics",
        "OptOut",
        "RequestId",
        "User",
    }
)
_DEMOGRAPHIC = {
    "AppVersion": "app_version",
    "Locale": "locale",
    "Make": "make",
    "Model": "model",
    "ModelVersion": "model_version",
    "Platform": "platform",
    "PlatformVersion": "platform_version",
    "Timezone": "timezone",
}
_LOCATION_TEXT = {
    "City": "city",
    "Country": "country",
    "PostalCode": "postal_code",
    "Region": "region",
}
_LOCATION_NUMBERS = {"Latitude": "latitude", "Longitude": "longitude"}

_E = TypeVar("_E", ChannelType, OptOut, EndpointStatus)


def _text(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise InvalidRequest(f"{where}{key} must be a string, not {type(value).__name__}")


def _enum(cls: type[_E], obj: dict[str, Any], key: str, where: str) -> _E | None:
    value = _text(obj, key, where)
    if value is None:
        return None
    try:
        return cls(value.upper())
    except ValueError:
        allowed = " | ".join(m.value for m in cls)
        raise InvalidRequest(f"{where}{key} must be one of {allowed}, not {value!r}") from None


def _object(obj: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise InvalidRequest(f"{where}{key} must be a JSON object")


def _list_map(
    obj: dict[str, Any] | None, key: str, where: str
) -> dict[str, tuple[str, ...]] | None:
    if obj is None:
        return None
    value = _object(obj, key, where)
    if value is None:
        return None
    out: dict[str, tuple[str, ...]] = {}
    for name, items in value.items():
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise InvalidRequest(f"{where}{key}.{name} must be a list of strings")
        out[name] = tuple(items)
    return out


def endpoint_patch_from_wire(body: Any, endpoint_id: str, where: str = "") -> EndpointPatch:
    """Read an EndpointRequest (or an EndpointBatchItem without its Id)."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where or 'EndpointRequest '}must be a JSON object")
    unknown = set(body) - _ENDPOINT_FIELDS - {"Id"}
    if unknown:
        raise InvalidRequest(
            f"{where}{sorted(unknown)[0]} is not a field of EndpointRequest; "
            f"known fields: {', '.join(sorted(_ENDPOINT_FIELDS))}"
        )
    demographic: Demographic | None = None
    raw_demo = _object(body, "Demographic", where)
    if raw_demo is not None:
        demographic = Demographic(
            **{
                attr: _text(raw_demo, key, f"{where}Demographic.")
                for key, attr in _DEMOGRAPHIC.items()
            }
        )
    location: Location | None = None
    raw_loc = _object(body, "Location", where)
    if raw_loc is not None:
        fields: dict[str, Any] = {
            attr: _text(raw_loc, key, f"{where}Location.") for key, attr in _LOCATION_TEXT.items()
        }
        for key, attr in _LOCATION_NUMBERS.items():
            value = raw_loc.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise InvalidRequest(f"{where}Location.{key} must be a number")
            fields[attr] = None if value is None else float(value)
        location = Location(**fields)
    metrics: dict[str, float] | None = None
    raw_metrics = _object(body, "Metrics", where)
    if raw_metrics is not None:
        metrics = {}
        for name, value in raw_metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"{where}Metrics.{name} must be a number")
            metrics[name] = float(value)
    user = _object(body, "User", where)
    return EndpointPatch(
        id=endpoint_id,
        channel_type=_enum(ChannelType, body, "ChannelType", where),
        address=_text(body, "Address", where),
        opt_out=_enum(OptOut, body, "OptOut", where),
        endpoint_status=_enum(EndpointStatus, body, "EndpointStatus", where),
        effective_date=_text(body, "EffectiveDate", where),
        request_id=_text(body, "RequestId", where),
        user_id=_text(user, "UserId", f"{where}User.") if user is not None else None,
        user_attributes=_list_map(user, "UserAttributes", f"{where}User."),
        attributes=_list_map(body, "Attributes", where),
        metrics=metrics,
        demographic=demographic,
        location=location,
    )


def _compact(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def endpoint_to_wire(e: Endpoint) -> dict[str, Any]:
    """An EndpointResponse."""
    user = _compact(
        {
            "UserId": e.user_id,
            "UserAttributes": {k: list(v) for k, v in e.user_attributes.items()} or None,
        }
    )
    return _compact(
        {
            "Address": e.address,
            "ApplicationId": e.app_id,
            "Attributes": {k: list(v) for k, v in e.attributes.items()},
            "ChannelType": e.channel_type.value,
            "CohortId": e.cohort_id,
            "CreationDate": e.creation_date,
            "Demographic": _compact(
                {k: getattr(e.demographic, a) for k, a in _DEMOGRAPHIC.items()}
            ),
            "EffectiveDate": e.effective_date,
            "EndpointStatus": e.endpoint_status.value,
            "Id": e.id,
            "Location": _compact(
                {k: getattr(e.location, a) for k, a in (_LOCATION_TEXT | _LOCATION_NUMBERS).items()}
            ),
            "Metrics": dict(e.metrics),
            "OptOut": e.opt_out.value,
            "RequestId": e.request_id,
            "User": user or None,
        }
    )


def app_to_wire(app: App) -> dict[str, Any]:
    """An ApplicationResponse."""
    return {
        "Arn": app.arn,
        "Id": app.id,
        "Name": app.name,
        "tags": dict(app.tags),
        "CreationDate": app.creation_date,
    }


def channel_to_wire(channel: Channel, *, with_platform: bool = True) -> dict[str, Any]:
    """An SMS/Email/VoiceChannelResponse, or a ChannelResponse (``with_platform=False``)."""
    out: dict[str, Any] = {
        "ApplicationId": channel.app_id,
        "CreationDate": channel.creation_date,
        "Enabled": channel.enabled,
        "HasCredential": False,
        "Id": channel.channel_type.value.lower(),
        "IsArchived": False,
        "LastModifiedBy": "optsync",
        "LastModifiedDate": channel.last_modified_date,
        "Version": channel.version,
    }
    if not with_platform:
        return out
    out["Platform"] = channel.channel_type.value
    if channel.channel_type is ChannelType.SMS:
        out |= {"PromotionalMessagesPerSecond": 20, "TransactionalMessagesPerSecond": 20}
    if channel.channel_type is ChannelType.EMAIL:
        out["MessagesPerSecond"] = 1
    out |= dict(channel.settings)
    return out


def segment_to_wire(segment: Segment) -> dict[str, Any]:
    """A SegmentResponse."""
    d = segment.definition
    return _compact(
        {
            "ApplicationId": segment.app_id,
            "Arn": segment.arn,
            "CreationDate": segment.creation_date,
            "Id": segment.id,
            "LastModifiedDate": segment.last_modified_date,
            "Name": d.name,
            "SegmentType": segment.segment_type,
            "tags": dict(d.tags),
            "Version": segment.version,
        }
    ) | definition_to_wire(d)


def consent_to_wire(change: ConsentChange) -> dict[str, Any]:
    """One entry of the consent-history extension route."""
    return {
        "EndpointId": change.endpoint_id,
        "Timestamp": change.at,
        "OptOutBefore": change.opt_out_before.value if change.opt_out_before else None,
        "OptOutAfter": change.opt_out_after.value if change.opt_out_after else None,
        "Address": change.address,
        "Cause": change.cause.kind.value,
        "CauseRef": change.cause.ref,
    }
