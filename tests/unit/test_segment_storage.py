"""The stored form of segment definitions (``segments/stored.py``): every kind of dimension reads
back equal, older rows in Pinpoint's JSON are converted, a newer format is refused."""

from __future__ import annotations

import json

import pytest

from optsync.engine.segments import (
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
    definition_to_wire,
)
from optsync.engine.segments.stored import (
    FORMAT_VERSION,
    decode_definition,
    encode_definition,
    upgrade_definition,
)
from optsync.errors import ConfigError, Fatal

_ATTRIBUTE_VALUES = {
    AttributeType.BEFORE: ("2026-01-01",),
    AttributeType.AFTER: ("2026-01-01T10:00:00Z",),
    AttributeType.ON: ("2026-03-01",),
    AttributeType.BETWEEN: ("2026-01-01", "2026-02-01"),
}
EVERY_ATTRIBUTE = {
    f"a_{kind.value.lower()}": AttributeDimension(_ATTRIBUTE_VALUES.get(kind, ("x", "y")), kind)
    for kind in AttributeType
}


DIMENSIONS = SegmentDimensions(
    attributes=EVERY_ATTRIBUTE,
    user_attributes={"plan": AttributeDimension(("gold",), AttributeType.EXCLUSIVE)},
    metrics={
        "score": MetricDimension(MetricOperator.GREATER_THAN_OR_EQUAL, 2.5),
        "visits": MetricDimension(MetricOperator.EQUAL, 3.0),
    },
    demographic={
        "Platform": SetDimension(("ios",), DimensionType.EXCLUSIVE),
        "Channel": SetDimension(("SMS", "EMAIL")),
    },
    country=SetDimension(("US", "FRA")),
)

DEFINITIONS = {
    "dimensions": SegmentDefinition(name="all kinds", dimensions=DIMENSIONS, tags={"k": "v"}),
    "groups": SegmentDefinition(
        name="grouped",
        groups=SegmentGroupList(
            groups=(
                SegmentGroup(
                    dimensions=(DIMENSIONS, SegmentDimensions(country=SetDimension(("DE",)))),
                    source_segments=(SourceSegment("s1"), SourceSegment("s2", version=3)),
                    source_type=Combine.ALL,
                    type=Combine.NONE,
                ),
                SegmentGroup(),
            ),
            include=Combine.ANY,
        ),
    ),
    "import": SegmentDefinition(name="file", members="seg-1"),
    "empty": SegmentDefinition(),
}


@pytest.mark.parametrize("kind", list(DEFINITIONS))
def test_every_definition_reads_back_equal(kind: str) -> None:
    definition = DEFINITIONS[kind]
    text = encode_definition(definition)
    assert json.loads(text)["v"] == FORMAT_VERSION
    again = decode_definition(text)
    assert again == definition
    assert encode_definition(again) == text


def test_the_stored_form_is_the_models_not_pinpoints() -> None:
    stored = json.loads(encode_definition(DEFINITIONS["dimensions"]))["definition"]
    assert stored["dimensions"]["country"] == {
        "values": ["US", "FRA"],
        "dimension_type": "INCLUSIVE",
    }
    assert stored["dimensions"]["metrics"]["score"] == {
        "operator": "GREATER_THAN_OR_EQUAL",
        "value": 2.5,
    }
    assert "Dimensions" not in stored


def test_reading_runs_no_api_validation() -> None:
    """Past the API's 100-dimension limit, or with no name: the row still reads."""
    many = SegmentDimensions(
        attributes={f"a{i}": AttributeDimension((str(i),)) for i in range(150)}
    )
    definition = SegmentDefinition(dimensions=many)
    assert decode_definition(encode_definition(definition)) == definition


def test_a_newer_format_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"format version 2.*upgrade optsync"):
        decode_definition('{"v": 2, "definition": {"anything": []}}')


def test_a_row_that_is_not_the_stored_form_is_fatal() -> None:
    with pytest.raises(Fatal, match="not optsync's stored form"):
        decode_definition('{"Dimensions": {}}')
    with pytest.raises(Fatal, match="does not read"):
        decode_definition('{"v": 1, "definition": {"dimensions": {"country": 3}}}')


@pytest.mark.parametrize("kind", list(DEFINITIONS))
def test_a_schema_4_row_is_converted(kind: str) -> None:
    definition = DEFINITIONS[kind]
    old = json.dumps(definition_to_wire(definition))
    text = upgrade_definition(
        old, name=definition.name, tags=definition.tags, members=definition.members
    )
    assert decode_definition(text) == definition
    # Converting again changes nothing.
    assert upgrade_definition(text, name="other", tags={}, members=None) == text


def test_converting_a_newer_row_is_refused() -> None:
    with pytest.raises(ConfigError, match="upgrade optsync"):
        upgrade_definition('{"v": 9}', name=None, tags={}, members=None)
