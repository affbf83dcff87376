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
    "ENDPOINT_REQUEST_FIELDS",
    "app_to_wire",
    "channel_to_wire",
    "consent_to_wire",
    "endpoint_patch_from_wire",
    "endpoint_to_wire",
    "segment_to_wire",
)

ENDPOINT_REQUEST_FIELDS = frozenset(
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
_BATCH_ITEM_FIELDS = ENDPOINT_REQUEST_FIELDS | {"Id"}
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
_LOCATION = _LOCATION_TEXT | _LOCATION_NUMBERS

_E = TypeVar("_E", ChannelType, OptOut, EndpointStatus)

# Value -> member, as ``cls(value)`` looks it up; a dict lookup skips EnumType.__call__.
_CHANNEL_TYPES = {m.value: m for m in ChannelType}
_OPT_OUTS = {m.value: m for m in OptOut}
_ENDPOINT_STATUSES = {m.value: m for m in EndpointStatus}

# Parsers run per batch item, so they take the value already looked up and build the
# ``where`` prefix of a message only when there is an error to report.


def _not_text(value: Any, where: str, key: str) -> InvalidRequest:
    return InvalidRequest(f"{where}{key} must be a string, not {type(value).__name__}")


def _text(value: Any, where: str, key: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _not_text(value, where, key)


def _enum(cls: type[_E], members: dict[str, _E], value: Any, where: str, key: str) -> _E | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _not_text(value, where, key)
    member = members.get(value.upper())
    if member is None:
        allowed = " | ".join(m.value for m in cls)
        raise InvalidRequest(f"{where}{key} must be one of {allowed}, not {value!r}")
    return member


def _object(value: Any, where: str, key: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidRequest(f"{where}{key} must be a JSON object")


def _list_map(value: Any, where: str, key: str) -> dict[str, tuple[str, ...]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}{key} must be a JSON object")
    out: dict[str, tuple[str, ...]] = {}
    for name, items in value.items():
        if isinstance(items, list):
            for item in items:
                if not isinstance(item, str):
                    break
            else:
                out[name] = tuple(items)
                continue
        raise InvalidRequest(f"{where}{key}.{name} must be a list of strings")
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _demographic(raw: dict[str, Any], where: str) -> Demographic:
    get = raw.get
    fields = {
        attr: _text(get(key), f"{where}Demographic.", key) for key, attr in _DEMOGRAPHIC.items()
    }
    return Demographic(**fields)


def _location(raw: dict[str, Any], where: str) -> Location:
    get = raw.get
    fields: dict[str, Any] = {
        attr: _text(get(key), f"{where}Location.", key) for key, attr in _LOCATION_TEXT.items()
    }
    for key, attr in _LOCATION_NUMBERS.items():
        value = get(key)
        if value is not None and not _number(value):
            raise InvalidRequest(f"{where}Location.{key} must be a number")
        fields[attr] = None if value is None else float(value)
    return Location(**fields)


def _metrics(raw: dict[str, Any], where: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name, value in raw.items():
        if not _number(value):
            raise InvalidRequest(f"{where}Metrics.{name} must be a number")
        metrics[name] = float(value)
    return metrics


OPT_IN_REASON_ATTRIBUTE = "OptsyncOptInReason"
"""An ``Attributes`` key read as the reason of an explicit opt-in and never stored: an OptOut
NONE that gives it lifts an end user's own opt-out (a STOP reply); without it, such an endpoint
stays opted out."""


def endpoint_patch_from_wire(body: Any, endpoint_id: str, where: str = "") -> EndpointPatch:
    """Read an EndpointRequest (or an EndpointBatchItem without its Id)."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"{where or 'EndpointRequest '}must be a JSON object")
    if not _BATCH_ITEM_FIELDS.issuperset(body):
        unknown = set(body) - _BATCH_ITEM_FIELDS
        raise InvalidRequest(
            f"{where}{sorted(unknown)[0]} is not a field of EndpointRequest; "
            f"known fields: {', '.join(sorted(ENDPOINT_REQUEST_FIELDS))}"
        )
    get = body.get
    # Fields are read in a fixed order, so a body with several errors always reports the same.
    raw_demo = _object(get("Demographic"), where, "Demographic")
    demographic = None if raw_demo is None else _demographic(raw_demo, where)
    raw_loc = _object(get("Location"), where, "Location")
    location = None if raw_loc is None else _location(raw_loc, where)
    raw_metrics = _object(get("Metrics"), where, "Metrics")
    metrics = None if raw_metrics is None else _metrics(raw_metrics, where)
    user = _object(get("User"), where, "User")
    channel_type = _enum(ChannelType, _CHANNEL_TYPES, get("ChannelType"), where, "ChannelType")
    address = _text(get("Address"), where, "Address")
    opt_out = _enum(OptOut, _OPT_OUTS, get("OptOut"), where, "OptOut")
    endpoint_status = _enum(
        EndpointStatus, _ENDPOINT_STATUSES, get("EndpointStatus"), where, "EndpointStatus"
    )
    effective_date = _text(get("EffectiveDate"), where, "EffectiveDate")
    request_id = _text(get("RequestId"), where, "RequestId")
    user_id = user_attributes = None
    if user is not None:
        user_id = _text(user.get("UserId"), f"{where}User.", "UserId")
        user_attributes = _list_map(user.get("UserAttributes"), f"{where}User.", "UserAttributes")
    attributes = _list_map(get("Attributes"), where, "Attributes")
    reason = None
    if attributes is not None and OPT_IN_REASON_ATTRIBUTE in attributes:
        attributes = dict(attributes)
        reason = " ".join(attributes.pop(OPT_IN_REASON_ATTRIBUTE)).strip()
        if not reason:
            raise InvalidRequest(
                f"{where}Attributes.{OPT_IN_REASON_ATTRIBUTE} is empty: say why the person opts "
                'in again, e.g. ["texted START"]'
            )
        attributes = attributes or None
    return EndpointPatch(
        id=endpoint_id,
        opt_in_reason=reason,
        channel_type=channel_type,
        address=address,
        opt_out=opt_out,
        endpoint_status=endpoint_status,
        effective_date=effective_date,
        request_id=request_id,
        user_id=user_id,
        user_attributes=user_attributes,
        attributes=attributes,
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
            "Location": _compact({k: getattr(e.location, a) for k, a in _LOCATION.items()}),
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
    """A SegmentResponse: Dimensions or SegmentGroups, or for an IMPORT segment its
    ImportDefinition."""
    d = segment.definition
    out = _compact(
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
    )
    source = segment.import_definition
    if source is None:
        return out | definition_to_wire(d)
    # SegmentImportResource: every member the model requires, RoleArn empty (no role is
    # assumed to read a local file); ChannelCounts are the members that exist now.
    out["ImportDefinition"] = {
        "ChannelCounts": dict(source.channel_counts),
        "ExternalId": source.external_id,
        "Format": source.format,
        "RoleArn": "",
        "S3Url": source.s3_url,
        "Size": source.size,
    }
    return out


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
        "CauseDetail": change.cause.detail or None,
        "Seq": change.seq,
        "ChannelType": change.channel_type.value if change.channel_type else None,
        "UserId": change.user_id,
        "SourceCommitTime": change.source_time,
        "AddressBefore": change.address_before,
    }
