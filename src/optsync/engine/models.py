"""Values the engine stores and returns: apps, channels, endpoints, segments, estimates, history.

Field names follow Pinpoint's shapes (snake_case here, PascalCase on the wire). Dates are
ISO-8601 UTC strings with milliseconds, as Pinpoint sends them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Generic, TypeVar

import msgspec

__all__ = (
    "PUSH_TOKEN_CHANNELS",
    "App",
    "Cause",
    "CauseKind",
    "Channel",
    "ChannelType",
    "ConsentChange",
    "Demographic",
    "Endpoint",
    "EndpointDelete",
    "EndpointPatch",
    "EndpointStatus",
    "Estimate",
    "Location",
    "OptOut",
    "Page",
    "WriteResult",
    "iso_now",
)


class ChannelType(StrEnum):
    PUSH = "PUSH"
    GCM = "GCM"
    APNS = "APNS"
    APNS_SANDBOX = "APNS_SANDBOX"
    APNS_VOIP = "APNS_VOIP"
    APNS_VOIP_SANDBOX = "APNS_VOIP_SANDBOX"
    ADM = "ADM"
    SMS = "SMS"
    VOICE = "VOICE"
    EMAIL = "EMAIL"
    BAIDU = "BAIDU"
    CUSTOM = "CUSTOM"
    IN_APP = "IN_APP"


# Channels whose endpoints roll over (oldest goes INACTIVE) instead of failing at the user cap.
PUSH_TOKEN_CHANNELS = frozenset(
    {
        ChannelType.ADM,
        ChannelType.GCM,
        ChannelType.APNS,
        ChannelType.APNS_SANDBOX,
        ChannelType.APNS_VOIP,
        ChannelType.APNS_VOIP_SANDBOX,
        ChannelType.BAIDU,
    }
)


class OptOut(StrEnum):
    ALL = "ALL"
    NONE = "NONE"


class EndpointStatus(StrEnum):
    ACTIVE = "ACTIVE"
    INACTIVE = "INACTIVE"


class CauseKind(StrEnum):
    API = "api"  # an HTTP request; ref is its request id, detail names the key
    SOURCE = "source"  # a captured change; ref is its source position
    CONSOLE = "console"  # the web console; ref is the operator
    END_USER = "end user"  # the person opted out themselves (a STOP reply); ref: how it came
    IMPORT = "import"  # an import file; ref names the file


_T = TypeVar("_T")


def iso_now() -> str:
    """Now as Pinpoint writes dates: ISO-8601 UTC with milliseconds and ``Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Cause:
    """Why a write happened: which request or which source position."""

    kind: CauseKind
    ref: str
    detail: str = ""
    """Evidence in words: the API key id, the opt-in reason given, the STOP keyword and list."""


@dataclass(frozen=True)
class App:
    id: str
    name: str
    arn: str
    creation_date: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Channel:
    """A channel's settings in one app (SMS, EMAIL, VOICE, ...)."""

    app_id: str
    channel_type: ChannelType
    enabled: bool
    creation_date: str
    last_modified_date: str
    version: int
    settings: Mapping[str, str | int | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Demographic:
    app_version: str | None = None
    locale: str | None = None
    make: str | None = None
    model: str | None = None
    model_version: str | None = None
    platform: str | None = None
    platform_version: str | None = None
    timezone: str | None = None

    def merged(self, patch: Demographic | None) -> Demographic:
        """Fields given in ``patch`` replace ours; the rest stay."""
        return _merge_fields(self, patch)


@dataclass(frozen=True)
class Location:
    city: str | None = None
    country: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    postal_code: str | None = None
    region: str | None = None

    def merged(self, patch: Location | None) -> Location:
        """Fields given in ``patch`` replace ours; the rest stay."""
        return _merge_fields(self, patch)


_D = TypeVar("_D", Demographic, Location)


def _merge_fields(base: _D, patch: _D | None) -> _D:
    if patch is None:
        return base
    given = {k: v for k, v in patch.__dict__.items() if v is not None}
    if not given:
        return base
    return dataclasses.replace(base, **given)


@dataclass(frozen=True)
class Endpoint:
    """An endpoint as stored: one address on one channel, with its opt-out state."""

    app_id: str
    id: str
    channel_type: ChannelType
    address: str | None
    opt_out: OptOut
    endpoint_status: EndpointStatus
    creation_date: str
    effective_date: str
    cohort_id: str
    request_id: str
    user_id: str | None = None
    user_attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    attributes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    demographic: Demographic = field(default_factory=Demographic)
    location: Location = field(default_factory=Location)
    source_position: str | None = None
    """Position of the captured change that last wrote this endpoint (None: only API writes)."""

    @property
    def eligible(self) -> bool:
        """A message may be sent: ACTIVE and not opted out."""
        return self.endpoint_status is EndpointStatus.ACTIVE and self.opt_out is OptOut.NONE


class EndpointPatch(msgspec.Struct, frozen=True, tag="patch"):
    """An UpdateEndpoint request: what is given replaces, what is ``None`` stays.

    ``attributes``, ``user_attributes`` and ``metrics`` merge by key; each given key replaces
    its whole list. ``position`` (order-preserving text) makes the write conditional: it is
    applied only if newer than the position the endpoint was last written at.

    A msgspec Struct, tagged: apply's mapping stage sends writes between processes as
    msgpack, and a Struct is built several times faster than a frozen dataclass.
    """

    id: str
    channel_type: ChannelType | None = None
    address: str | None = None
    opt_out: OptOut | None = None
    endpoint_status: EndpointStatus | None = None
    effective_date: str | None = None
    request_id: str | None = None
    user_id: str | None = None
    user_attributes: Mapping[str, tuple[str, ...]] | None = None
    attributes: Mapping[str, tuple[str, ...]] | None = None
    metrics: Mapping[str, float] | None = None
    demographic: Demographic | None = None
    location: Location | None = None
    position: str | None = None
    source_time: str | None = None
    """When the source committed the change (ISO-8601 UTC), for the consent history."""
    opt_in_reason: str | None = None
    """Why an OptOut NONE is given: an explicit opt-in, which lifts an end user's own opt-out
    (without it, an endpoint the person opted out by STOP stays opted out)."""


class EndpointDelete(msgspec.Struct, frozen=True, tag="delete"):
    """Delete one endpoint; with a ``position``, only if no newer write has reached it."""

    id: str
    position: str | None = None
    source_time: str | None = None


@dataclass(frozen=True)
class WriteResult:
    """What a batch of writes did."""

    applied: int = 0
    stale: int = 0
    """Positioned writes skipped because the endpoint already holds a newer or equal position."""
    missing: int = 0
    """Deletes of endpoints that did not exist (success: the end state is the same)."""


@dataclass(frozen=True)
class Estimate:
    total: int
    eligible: int


@dataclass(frozen=True)
class ConsentChange:
    """One consent change of an endpoint: its OptOut changed (``None`` before: created; after:
    deleted), or its address did (the same OptOut now holds for another address).

    ``seq`` orders the changes of one app as the engine committed them: the consent ledger's
    id, which sinks use as their cursor and idempotency id.
    """

    endpoint_id: str
    at: str
    opt_out_before: OptOut | None
    opt_out_after: OptOut | None
    address: str | None
    cause: Cause
    seq: int = 0
    app_id: str = ""
    channel_type: ChannelType | None = None
    user_id: str | None = None
    source_time: str | None = None
    """When the source committed the change (SOURCE causes whose record carried it)."""
    address_before: str | None = None
    """The address before an address change (None otherwise)."""

    @property
    def change_id(self) -> str:
        """The idempotency id every sink is given: the same each time this change is sent."""
        return f"{self.app_id}-{self.seq}"


@dataclass(frozen=True)
class Page(Generic[_T]):
    items: tuple[_T, ...]
    next_token: str | None = None
