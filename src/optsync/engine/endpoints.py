"""Pure endpoint rules: Pinpoint's limits and its field-level merge of UpdateEndpoint.

No I/O here; the stores call these inside their write transaction.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optsync.engine.models import (
    ChannelType,
    Endpoint,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.phone import PhonePolicy, country_for_address
from optsync.errors import InvalidRequest, LimitExceeded

__all__ = (
    "FORBIDDEN_ID_CHARS",
    "MAX_ATTRIBUTE_NAME",
    "MAX_ATTRIBUTE_NAMES_PER_APP",
    "MAX_ATTRIBUTE_VALUE",
    "MAX_BATCH_ITEMS",
    "MAX_ENDPOINTS_PER_USER",
    "MAX_ENDPOINT_BYTES",
    "MAX_VALUES_PER_ATTRIBUTE",
    "CountryDerivation",
    "endpoint_key",
    "merge",
    "validate_batch",
    "validate_patch",
)

MAX_BATCH_ITEMS = 100
MAX_ENDPOINTS_PER_USER = 15
MAX_ATTRIBUTE_NAME = 50
MAX_ATTRIBUTE_VALUE = 100
MAX_VALUES_PER_ATTRIBUTE = 50
MAX_ATTRIBUTE_NAMES_PER_APP = 250
MAX_ENDPOINT_BYTES = 15 * 1024
FORBIDDEN_ID_CHARS = frozenset("${}")
"""Characters Pinpoint refuses in endpoint ids."""


@dataclass(frozen=True)
class CountryDerivation:
    """Fill ``Location.Country`` of SMS/VOICE endpoints from their number when it is missing."""

    enabled: bool = True
    policy: PhonePolicy = PhonePolicy.POSSIBLE


def endpoint_key(endpoint_id: str) -> str:
    """Endpoint ids are compared case-insensitively; this is the form they are compared in."""
    return endpoint_id.casefold()


def _check_map(values: Mapping[str, tuple[str, ...]] | None, field: str, where: str) -> None:
    for name, items in (values or {}).items():
        if not name:
            raise InvalidRequest(f"{where}{field}: attribute names must not be empty")
        if len(name) > MAX_ATTRIBUTE_NAME:
            raise LimitExceeded(
                f"{where}{field}.{name[:20]}…: attribute name is {len(name)} characters; "
                f"the limit is {MAX_ATTRIBUTE_NAME}"
            )
        if len(items) > MAX_VALUES_PER_ATTRIBUTE:
            raise LimitExceeded(
                f"{where}{field}.{name} has {len(items)} values; the limit is "
                f"{MAX_VALUES_PER_ATTRIBUTE} values per attribute"
            )
        for value in items:
            if len(value) > MAX_ATTRIBUTE_VALUE:
                raise LimitExceeded(
                    f"{where}{field}.{name}: a value is {len(value)} characters; the limit is "
                    f"{MAX_ATTRIBUTE_VALUE}"
                )


def has_nul(*texts: str | None) -> bool:
    """Whether any of ``texts`` holds a NUL character (PostgreSQL text cannot store one)."""
    return any(t is not None and "\x00" in t for t in texts)


def check_nul(patch: EndpointPatch, where: str = "") -> None:
    """Raise ``InvalidRequest`` naming the field if the patch holds a NUL character."""
    texts = (patch.id, patch.address, patch.user_id, patch.effective_date, patch.request_id)
    if not (has_nul(*texts) or patch.attributes or patch.user_attributes or patch.metrics):
        return  # the usual captured change: five membership tests
    named = {
        "Id": patch.id,
        "Address": patch.address,
        "User.UserId": patch.user_id,
        "EffectiveDate": patch.effective_date,
        "RequestId": patch.request_id,
    }
    for field, text in named.items():
        if has_nul(text):
            raise InvalidRequest(f"{where}{field} must not contain a NUL character (\\u0000)")
    for field, values in (
        ("Attributes", patch.attributes),
        ("User.UserAttributes", patch.user_attributes),
    ):
        for name, items in (values or {}).items():
            if has_nul(name, *items):
                raise InvalidRequest(
                    f"{where}{field}: names and values must not contain a NUL character (\\u0000)"
                )
    if any(has_nul(n) for n in patch.metrics or {}):
        raise InvalidRequest(f"{where}Metrics: names must not contain a NUL character (\\u0000)")


def validate_patch(patch: EndpointPatch, where: str = "") -> None:
    """Raise ``InvalidRequest`` naming the field if the patch breaks one of Pinpoint's limits.

    NUL characters are refused everywhere: PostgreSQL cannot store them, and a write it kept
    refusing as a retryable error would block its stream partition for good.
    """
    check_nul(patch, where)
    if not patch.id.strip():
        raise InvalidRequest(f"{where}Id must not be empty")
    bad = FORBIDDEN_ID_CHARS.intersection(patch.id)
    if bad:
        raise InvalidRequest(
            f"{where}Id must not contain {', '.join(sorted(bad))} (Pinpoint forbids $, {{ and }})"
        )
    _check_map(patch.attributes, "Attributes", where)
    _check_map(patch.user_attributes, "User.UserAttributes", where)
    for name in patch.metrics or {}:
        if not name or len(name) > MAX_ATTRIBUTE_NAME:
            raise LimitExceeded(
                f"{where}Metrics: metric names must be 1 to {MAX_ATTRIBUTE_NAME} characters"
            )


def validate_batch(patches: Sequence[EndpointPatch]) -> None:
    """Check the batch size and every item; errors name the item's index."""
    if len(patches) > MAX_BATCH_ITEMS:
        raise LimitExceeded(
            f"Item has {len(patches)} endpoints; UpdateEndpointsBatch takes at most "
            f"{MAX_BATCH_ITEMS} per request: split the batch"
        )
    if not patches:
        raise InvalidRequest("Item must hold at least one endpoint")
    for i, patch in enumerate(patches):
        validate_patch(patch, where=f"Item[{i}].")


def _merge_lists(
    old: Mapping[str, tuple[str, ...]], new: Mapping[str, tuple[str, ...]] | None
) -> Mapping[str, tuple[str, ...]]:
    if not new:
        return old  # endpoints are immutable: sharing the mapping is safe
    merged = dict(old)
    merged.update(new)
    return merged


def merge(
    existing: Endpoint | None,
    patch: EndpointPatch,
    *,
    app_id: str,
    now: str,
    request_id: str,
    country: CountryDerivation,
) -> Endpoint:
    """The endpoint after ``patch``: given fields replace, maps merge by key.

    Every write makes the endpoint ACTIVE unless the patch says otherwise, as Pinpoint does.
    """
    if existing is None:
        if patch.channel_type is None:
            raise InvalidRequest(
                "Missing ChannelType: a new endpoint needs ChannelType (e.g. SMS or EMAIL)"
            )
        existing = Endpoint(
            app_id=app_id,
            id=patch.id,
            channel_type=patch.channel_type,
            address=None,
            opt_out=OptOut.NONE,
            endpoint_status=EndpointStatus.ACTIVE,
            creation_date=now,
            effective_date=now,
            cohort_id=str(secrets.randbelow(100)),
            request_id=request_id,
        )
    metrics: Mapping[str, float] = existing.metrics
    if patch.metrics:
        metrics = {**existing.metrics, **patch.metrics}
    channel = patch.channel_type or existing.channel_type
    address = patch.address if patch.address is not None else existing.address
    location = existing.location.merged(patch.location)
    if (
        country.enabled
        and location.country is None
        and address
        and channel in (ChannelType.SMS, ChannelType.VOICE)
    ):
        derived = country_for_address(address, country.policy)
        if derived is not None:
            location = Location(**{**location.__dict__, "country": derived})
    merged = Endpoint(
        app_id=app_id,
        id=existing.id,
        channel_type=channel,
        address=address,
        opt_out=patch.opt_out or existing.opt_out,
        endpoint_status=patch.endpoint_status or EndpointStatus.ACTIVE,
        creation_date=existing.creation_date,
        effective_date=patch.effective_date or now,
        cohort_id=existing.cohort_id,
        request_id=patch.request_id or request_id,
        user_id=patch.user_id if patch.user_id is not None else existing.user_id,
        user_attributes=_merge_lists(existing.user_attributes, patch.user_attributes),
        attributes=_merge_lists(existing.attributes, patch.attributes),
        metrics=metrics,
        demographic=existing.demographic.merged(patch.demographic),
        location=location,
        source_position=patch.position or existing.source_position,
    )
    size = _rough_size(merged)
    if size > MAX_ENDPOINT_BYTES // 2:  # exact only when it could matter
        size = len(json.dumps(_sized(merged)).encode())
    if size > MAX_ENDPOINT_BYTES:
        raise LimitExceeded(
            f"Endpoint {patch.id!r} would be {size} bytes; the limit is {MAX_ENDPOINT_BYTES} "
            "bytes per endpoint: drop attributes or shorten values"
        )
    return merged


def _rough_size(endpoint: Endpoint) -> int:
    """An over-estimate of the endpoint's JSON size from its string lengths (UTF-8 <= 4x)."""
    total = len(endpoint.address or "")
    if not (endpoint.attributes or endpoint.user_attributes or endpoint.metrics):
        return 4 * total + 1024
    for values in (endpoint.attributes, endpoint.user_attributes):
        total += sum(len(k) + 6 + sum(len(v) + 3 for v in items) for k, items in values.items())
    total += sum(len(k) + 30 for k in endpoint.metrics)
    return 4 * total + 1024


def _sized(endpoint: Endpoint) -> dict[str, object]:
    return {
        "a": endpoint.attributes,
        "u": endpoint.user_attributes,
        "m": endpoint.metrics,
        "d": endpoint.demographic.__dict__,
        "l": endpoint.location.__dict__,
        "addr": endpoint.address,
    }
