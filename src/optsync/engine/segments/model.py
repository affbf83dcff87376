"""Segments as optsync models them: dimensions, groups and definitions, with their limits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

__all__ = (
    "DEMOGRAPHIC_COLUMNS",
    "MAX_DIMENSIONS",
    "MAX_SOURCE_DEPTH",
    "AttributeDimension",
    "AttributeType",
    "Combine",
    "DimensionType",
    "MetricDimension",
    "MetricOperator",
    "SegmentDefinition",
    "SegmentDimensions",
    "SegmentGroup",
    "SegmentGroupList",
    "SetDimension",
    "SourceSegment",
    "iso_instant_ms",
)

MAX_DIMENSIONS = 100
MAX_SOURCE_DEPTH = 5


class DimensionType(StrEnum):
    INCLUSIVE = "INCLUSIVE"
    EXCLUSIVE = "EXCLUSIVE"


class AttributeType(StrEnum):
    INCLUSIVE = "INCLUSIVE"
    EXCLUSIVE = "EXCLUSIVE"
    CONTAINS = "CONTAINS"
    BEFORE = "BEFORE"
    AFTER = "AFTER"
    ON = "ON"
    BETWEEN = "BETWEEN"


class MetricOperator(StrEnum):
    GREATER_THAN = "GREATER_THAN"
    LESS_THAN = "LESS_THAN"
    GREATER_THAN_OR_EQUAL = "GREATER_THAN_OR_EQUAL"
    LESS_THAN_OR_EQUAL = "LESS_THAN_OR_EQUAL"
    EQUAL = "EQUAL"


class Combine(StrEnum):
    ALL = "ALL"
    ANY = "ANY"
    NONE = "NONE"


# Demographic dimension name -> endpoints column.
DEMOGRAPHIC_COLUMNS = {
    "AppVersion": "app_version",
    "Channel": "channel_type",
    "Make": "make",
    "Model": "model",
    "Platform": "platform",
}


@dataclass(frozen=True)
class SetDimension:
    values: tuple[str, ...]
    dimension_type: DimensionType = DimensionType.INCLUSIVE


@dataclass(frozen=True)
class AttributeDimension:
    values: tuple[str, ...]
    attribute_type: AttributeType = AttributeType.INCLUSIVE


@dataclass(frozen=True)
class MetricDimension:
    operator: MetricOperator
    value: float


@dataclass(frozen=True)
class SegmentDimensions:
    attributes: Mapping[str, AttributeDimension] = field(default_factory=dict)
    user_attributes: Mapping[str, AttributeDimension] = field(default_factory=dict)
    metrics: Mapping[str, MetricDimension] = field(default_factory=dict)
    demographic: Mapping[str, SetDimension] = field(default_factory=dict)
    country: SetDimension | None = None


@dataclass(frozen=True)
class SourceSegment:
    id: str
    version: int | None = None


@dataclass(frozen=True)
class SegmentGroup:
    dimensions: tuple[SegmentDimensions, ...] = ()
    source_segments: tuple[SourceSegment, ...] = ()
    source_type: Combine = Combine.ANY
    type: Combine = Combine.ALL


@dataclass(frozen=True)
class SegmentGroupList:
    groups: tuple[SegmentGroup, ...] = ()
    include: Combine = Combine.ALL


@dataclass(frozen=True)
class SegmentDefinition:
    """What a WriteSegmentRequest says: a name and either dimensions or groups."""

    name: str | None = None
    dimensions: SegmentDimensions | None = None
    groups: SegmentGroupList | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    members: str | None = None
    """Set by the store, never read from the wire: the id of the IMPORT segment whose member
    list this definition is (a static segment has no filter; it matches its members)."""


def iso_instant_ms(value: str) -> int | None:
    """Milliseconds since the epoch for an ISO-8601 date or instant (naive means UTC)."""
    text = value.strip()
    if len(text) < 10 or not text[:4].isdigit():
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)
