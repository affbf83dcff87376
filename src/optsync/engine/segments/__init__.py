"""Segments: dimensional filters, their Pinpoint JSON form, and their translation to SQL.

A segment is evaluated by the database, never by loading endpoints into Python: ``compile_filter``
turns a definition into one SQL boolean expression over the ``endpoints`` table (alias ``e``),
with bound parameters only. Semantics:

- all dimensions inside one ``SegmentDimensions`` must match (AND);
- ``SetDimension`` INCLUSIVE: the value is one of ``Values``; EXCLUSIVE: it is not (an endpoint
  without the field matches EXCLUSIVE);
- ``Location.Country`` accepts alpha-2 and alpha-3 codes alike ("US" and "USA");
- ``Attributes``/``UserAttributes``: INCLUSIVE (any stored value equals any given value),
  EXCLUSIVE (none does), CONTAINS (case-sensitive substring), BEFORE/AFTER/ON/BETWEEN (the
  stored value read as an ISO-8601 instant; ON compares the UTC date, BETWEEN is inclusive);
- ``Demographic.DeviceType`` has no endpoint field in Pinpoint's model: it matches the custom
  endpoint attribute ``DeviceType``;
- ``SegmentGroups``: each group is its source segments (ANY: union, ALL: intersection; none:
  every endpoint of the app) AND its dimensions combined by ``Type`` (ALL/ANY/NONE); the groups
  are combined by ``Include`` (ALL/ANY/NONE);
- an IMPORT segment (``SegmentDefinition.members``), alone or as a source segment, matches the
  endpoints whose id is in its member list (``segment_members``), compared case-insensitively.

Not supported, refused with a 400 naming the field: ``Location.GPSPoint`` and ``Behavior``
(optsync keeps no session data to evaluate recency).

The package: ``model`` (the definitions and their limits), ``wire`` (Pinpoint's JSON in and
out), ``stored`` (the engine's own form of a definition in its tables, versioned) and ``sql``
(the compiler); everything public is re-exported here.
"""

from optsync.engine.segments.model import (
    DEMOGRAPHIC_COLUMNS,
    MAX_DIMENSIONS,
    MAX_SOURCE_DEPTH,
    AttributeDimension,
    AttributeType,
    Combine,
    DimensionType,
    MetricDimension,
    MetricOperator,
    SegmentDefinition,
    SegmentDimensions,
    SegmentGroup,
    SegmentGroupList,
    SetDimension,
    SourceSegment,
    iso_instant_ms,
)
from optsync.engine.segments.sql import (
    CompiledFilter,
    Dialect,
    DrivenFilter,
    SourceResolver,
    combine,
    compile_driven,
    compile_filter,
    compile_segment,
)
from optsync.engine.segments.stored import (
    FORMAT_VERSION,
    decode_definition,
    encode_definition,
    upgrade_definition,
)
from optsync.engine.segments.wire import definition_from_wire, definition_to_wire

__all__ = (
    "DEMOGRAPHIC_COLUMNS",
    "FORMAT_VERSION",
    "MAX_DIMENSIONS",
    "MAX_SOURCE_DEPTH",
    "AttributeDimension",
    "AttributeType",
    "Combine",
    "CompiledFilter",
    "Dialect",
    "DimensionType",
    "DrivenFilter",
    "MetricDimension",
    "MetricOperator",
    "SegmentDefinition",
    "SegmentDimensions",
    "SegmentGroup",
    "SegmentGroupList",
    "SetDimension",
    "SourceResolver",
    "SourceSegment",
    "combine",
    "compile_driven",
    "compile_filter",
    "compile_segment",
    "decode_definition",
    "definition_from_wire",
    "definition_to_wire",
    "encode_definition",
    "iso_instant_ms",
    "upgrade_definition",
)
