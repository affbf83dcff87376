"""Segments through boto3, and their counts through the signed estimate extension route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from pinpoint_e2e import HEX_ID, ISO_MILLIS_Z, Server, Signed

from optsync.engine.sqlite import SQLiteStore
from optsync.engine.store import ImportDefinition

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

US_ONLY: Any = {"Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}}

# Four endpoints to count. "alpha" and "gamma" are the sports fans, "beta" has opted out.
POPULATION: dict[str, dict[str, Any]] = {
    "alpha": {
        "ChannelType": "SMS",
        "Address": "+12065550121",
        "OptOut": "NONE",
        "Location": {"Country": "US"},
        "Attributes": {"Interest": ["sports", "music"], "SignedUp": ["2024-01-15T10:00:00Z"]},
        "Metrics": {"Purchases": 5.0},
        "Demographic": {"Platform": "ios"},
        "User": {"UserId": "u-alpha", "UserAttributes": {"Tier": ["gold"]}},
    },
    "beta": {
        "ChannelType": "SMS",
        "Address": "+12065550122",
        "OptOut": "ALL",
        "Location": {"Country": "US"},
        "Attributes": {"Interest": ["music"], "SignedUp": ["2025-06-01T08:30:00Z"]},
        "Metrics": {"Purchases": 1.0},
        "Demographic": {"Platform": "android"},
        "User": {"UserId": "u-beta", "UserAttributes": {"Tier": ["silver"]}},
    },
    "gamma": {
        "ChannelType": "EMAIL",
        "Address": "gamma@example.com",
        "OptOut": "NONE",
        "Location": {"Country": "CA"},
        "Attributes": {"Interest": ["sports"], "SignedUp": ["2023-03-03T00:00:00Z"]},
        "Metrics": {"Purchases": 10.0},
        "Demographic": {"Platform": "ios"},
        "User": {"UserId": "u-gamma", "UserAttributes": {"Tier": ["gold"]}},
    },
    "delta": {
        "ChannelType": "EMAIL",
        "Address": "delta@example.com",
        "OptOut": "NONE",
        "Location": {"Country": "GBR"},
        "Attributes": {"Interest": ["basketball"]},
        "Demographic": {"Platform": "android"},
    },
}


@pytest.fixture(scope="module")
def population(pinpoint: PinpointClient) -> Iterator[str]:
    """An app holding POPULATION; shared by the read-only counting tests of this module."""
    app = pinpoint.create_app(CreateApplicationRequest={"Name": "e2e-segment-population"})
    app_id = app["ApplicationResponse"]["Id"]
    items: list[Any] = [{"Id": name, **fields} for name, fields in POPULATION.items()]
    pinpoint.update_endpoints_batch(ApplicationId=app_id, EndpointBatchRequest={"Item": items})
    yield app_id
    pinpoint.delete_app(ApplicationId=app_id)


def create_segment(
    pinpoint: PinpointClient, app_id: str, name: str, **definition: Any
) -> dict[str, Any]:
    request: Any = {"Name": name, **definition}
    response = pinpoint.create_segment(ApplicationId=app_id, WriteSegmentRequest=request)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 201
    return dict(response["SegmentResponse"])


def test_create_and_get_segment(pinpoint: PinpointClient, app_id: str) -> None:
    created = create_segment(pinpoint, app_id, "US people", Dimensions=US_ONLY)
    assert HEX_ID.fullmatch(created["Id"])
    assert created["ApplicationId"] == app_id
    assert created["Arn"].endswith(f":apps/{app_id}/segments/{created['Id']}")
    assert created["Name"] == "US people"
    assert created["SegmentType"] == "DIMENSIONAL"
    assert created["Version"] == 1
    assert created["Dimensions"] == US_ONLY
    assert ISO_MILLIS_Z.fullmatch(created["CreationDate"])

    got = pinpoint.get_segment(ApplicationId=app_id, SegmentId=created["Id"])["SegmentResponse"]
    assert got == created


def test_get_segments_lists_latest_versions_in_pages(pinpoint: PinpointClient, app_id: str) -> None:
    ids = [create_segment(pinpoint, app_id, f"seg-{i}", Dimensions=US_ONLY)["Id"] for i in range(3)]
    pinpoint.update_segment(
        ApplicationId=app_id, SegmentId=ids[0], WriteSegmentRequest={"Name": "seg-0-renamed"}
    )
    first = pinpoint.get_segments(ApplicationId=app_id, PageSize="2")["SegmentsResponse"]
    assert len(first["Item"]) == 2
    assert first.get("NextToken")
    second = pinpoint.get_segments(ApplicationId=app_id, PageSize="2", Token=first["NextToken"])[
        "SegmentsResponse"
    ]
    assert "NextToken" not in second
    listed = [*first["Item"], *second["Item"]]
    assert [s["Id"] for s in listed] == ids
    assert [(s["Name"], s["Version"]) for s in listed] == [
        ("seg-0-renamed", 2),
        ("seg-1", 1),
        ("seg-2", 1),
    ]


def test_update_segment_adds_a_version_and_keeps_the_old_one(
    pinpoint: PinpointClient, signed: Signed, population: str
) -> None:
    created = create_segment(pinpoint, population, "versioned", Dimensions=US_ONLY)
    sports: Any = {"Attributes": {"Interest": {"AttributeType": "INCLUSIVE", "Values": ["sports"]}}}
    try:
        updated = pinpoint.update_segment(
            ApplicationId=population,
            SegmentId=created["Id"],
            WriteSegmentRequest={"Name": "versioned v2", "Dimensions": sports},
        )
        assert updated["ResponseMetadata"]["HTTPStatusCode"] == 200
        latest = updated["SegmentResponse"]
        assert latest["Version"] == 2
        assert latest["Id"] == created["Id"]
        assert latest["Name"] == "versioned v2"
        assert latest["Dimensions"] == sports
        assert latest["CreationDate"] == created["CreationDate"]

        got = pinpoint.get_segment(ApplicationId=population, SegmentId=created["Id"])
        assert got["SegmentResponse"]["Version"] == 2
        assert got["SegmentResponse"]["Dimensions"] == sports

        old = pinpoint.get_segment_version(
            ApplicationId=population, SegmentId=created["Id"], Version="1"
        )["SegmentResponse"]
        assert old["Version"] == 1
        assert old["Name"] == "versioned"
        assert old["Dimensions"] == US_ONLY

        versions = pinpoint.get_segment_versions(ApplicationId=population, SegmentId=created["Id"])[
            "SegmentsResponse"
        ]["Item"]
        assert [(v["Version"], v["Name"]) for v in versions] == [
            (1, "versioned"),
            (2, "versioned v2"),
        ]

        # The estimate follows the latest version unless asked for another one.
        assert signed.estimate(population, created["Id"]) == (2, 2)  # alpha, gamma
        assert signed.estimate(population, created["Id"], version=1) == (2, 1)  # alpha, beta
    finally:
        pinpoint.delete_segment(ApplicationId=population, SegmentId=created["Id"])


def test_delete_segment_returns_it_and_then_it_is_gone(
    pinpoint: PinpointClient, app_id: str
) -> None:
    created = create_segment(pinpoint, app_id, "short-lived", Dimensions=US_ONLY)
    deleted = pinpoint.delete_segment(ApplicationId=app_id, SegmentId=created["Id"])
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert deleted["SegmentResponse"]["Id"] == created["Id"]
    assert deleted["SegmentResponse"]["Name"] == "short-lived"
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_segment(ApplicationId=app_id, SegmentId=created["Id"])
    listed = pinpoint.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"]
    assert created["Id"] not in {s["Id"] for s in listed}


def test_dimensions_and_segment_groups_together_are_refused(
    pinpoint: PinpointClient, app_id: str
) -> None:
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.create_segment(
            ApplicationId=app_id,
            WriteSegmentRequest={
                "Name": "both",
                "Dimensions": US_ONLY,
                "SegmentGroups": {"Include": "ALL", "Groups": [{"Dimensions": [US_ONLY]}]},
            },
        )
    message = excinfo.value.response["Error"]["Message"]
    assert "Dimensions" in message
    assert "SegmentGroups" in message
    assert pinpoint.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"] == []


def _attribute(kind: str, *values: str) -> dict[str, Any]:
    return {"AttributeType": kind, "Values": list(values)}


def _set(kind: str, *values: str) -> dict[str, Any]:
    return {"DimensionType": kind, "Values": list(values)}


@pytest.mark.parametrize(
    ("dimensions", "total", "eligible"),
    [
        pytest.param({"Attributes": {"Interest": _attribute("INCLUSIVE", "sports")}}, 2, 2,
                     id="attribute-inclusive"),
        pytest.param({"Attributes": {"Interest": _attribute("EXCLUSIVE", "sports")}}, 2, 1,
                     id="attribute-exclusive"),
        pytest.param({"Attributes": {"Interest": _attribute("CONTAINS", "ball")}}, 1, 1,
                     id="attribute-contains"),
        pytest.param({"Attributes": {"Interest": _attribute("CONTAINS", "Ball")}}, 0, 0,
                     id="attribute-contains-is-case-sensitive"),
        pytest.param({"Attributes": {"SignedUp": _attribute("AFTER", "2024-06-01T00:00:00Z")}},
                     1, 0, id="attribute-after"),
        pytest.param({"Attributes": {"SignedUp": _attribute("BEFORE", "2024-06-01T00:00:00Z")}},
                     2, 2, id="attribute-before"),
        pytest.param({"Attributes": {"SignedUp": _attribute("ON", "2024-01-15T23:00:00Z")}},
                     1, 1, id="attribute-on"),
        pytest.param({"Attributes": {"SignedUp": _attribute(
            "BETWEEN", "2023-01-01T00:00:00Z", "2024-12-31T00:00:00Z")}}, 2, 2,
                     id="attribute-between"),
        pytest.param({"UserAttributes": {"Tier": _attribute("INCLUSIVE", "gold")}}, 2, 2,
                     id="user-attribute"),
        pytest.param({"UserAttributes": {"Tier": _attribute("EXCLUSIVE", "gold")}}, 2, 1,
                     id="user-attribute-exclusive"),
        pytest.param({"Metrics": {"Purchases": {"ComparisonOperator": "GREATER_THAN",
                                                "Value": 2}}}, 2, 2, id="metric-greater"),
        pytest.param({"Metrics": {"Purchases": {"ComparisonOperator": "LESS_THAN_OR_EQUAL",
                                                "Value": 1}}}, 1, 0, id="metric-at-most"),
        pytest.param({"Metrics": {"Purchases": {"ComparisonOperator": "EQUAL", "Value": 10}}},
                     1, 1, id="metric-equal"),
        pytest.param({"Demographic": {"Platform": _set("INCLUSIVE", "ios")}}, 2, 2,
                     id="demographic-platform"),
        pytest.param({"Demographic": {"Channel": _set("INCLUSIVE", "EMAIL")}}, 2, 2,
                     id="demographic-channel"),
        pytest.param({"Demographic": {"Channel": _set("EXCLUSIVE", "EMAIL")}}, 2, 1,
                     id="demographic-channel-exclusive"),
        pytest.param({"Location": {"Country": _set("INCLUSIVE", "US")}}, 2, 1, id="country-us"),
        pytest.param({"Location": {"Country": _set("INCLUSIVE", "USA")}}, 2, 1,
                     id="country-alpha3"),
        pytest.param({"Location": {"Country": _set("INCLUSIVE", "GB")}}, 1, 1,
                     id="country-stored-as-alpha3"),
        pytest.param({"Location": {"Country": _set("EXCLUSIVE", "US")}}, 2, 2,
                     id="country-exclusive"),
        pytest.param({"Location": {"Country": _set("INCLUSIVE", "US")},
                      "Attributes": {"Interest": _attribute("INCLUSIVE", "sports")}}, 1, 1,
                     id="dimensions-combine-with-and"),
    ],
)  # fmt: skip
def test_estimate_of_dimensions(
    pinpoint: PinpointClient,
    signed: Signed,
    population: str,
    dimensions: Any,
    total: int,
    eligible: int,
) -> None:
    segment = create_segment(pinpoint, population, "counted", Dimensions=dimensions)
    try:
        assert segment["Dimensions"] == dimensions
        assert signed.estimate(population, segment["Id"]) == (total, eligible)
    finally:
        pinpoint.delete_segment(ApplicationId=population, SegmentId=segment["Id"])


def test_segment_groups_with_source_segments(
    pinpoint: PinpointClient, signed: Signed, population: str
) -> None:
    us = create_segment(pinpoint, population, "base: US", Dimensions=US_ONLY)
    sports: Any = {"Attributes": {"Interest": _attribute("INCLUSIVE", "sports")}}
    canada: Any = {"Location": {"Country": _set("INCLUSIVE", "CA")}}
    groups: Any = {
        "Include": "ANY",
        "Groups": [
            {
                "SourceSegments": [{"Id": us["Id"], "Version": 1}],
                "SourceType": "ANY",
                "Dimensions": [sports],
                "Type": "ALL",
            },
            {"Dimensions": [canada], "Type": "ALL", "SourceType": "ANY"},
        ],
    }
    narrowed = create_segment(
        pinpoint,
        population,
        "US sports fans",
        SegmentGroups={
            "Include": "ALL",
            "Groups": [{"SourceSegments": [{"Id": us["Id"]}], "Dimensions": [sports]}],
        },
    )
    either = create_segment(pinpoint, population, "US sports fans or Canada", SegmentGroups=groups)
    try:
        got = pinpoint.get_segment(ApplicationId=population, SegmentId=either["Id"])
        echoed = got["SegmentResponse"]["SegmentGroups"]
        assert echoed["Include"] == "ANY"
        assert echoed["Groups"][0]["SourceSegments"] == [{"Id": us["Id"], "Version": 1}]
        assert echoed["Groups"][0]["Dimensions"] == [sports]
        assert echoed["Groups"][1]["Dimensions"] == [canada]

        assert signed.estimate(population, us["Id"]) == (2, 1)  # alpha, beta (opted out)
        assert signed.estimate(population, narrowed["Id"]) == (1, 1)  # alpha
        assert signed.estimate(population, either["Id"]) == (2, 2)  # alpha, gamma
    finally:
        for segment in (either, narrowed, us):
            pinpoint.delete_segment(ApplicationId=population, SegmentId=segment["Id"])


def test_source_segment_must_exist(pinpoint: PinpointClient, app_id: str) -> None:
    with pytest.raises(pinpoint.exceptions.ClientError) as excinfo:
        pinpoint.create_segment(
            ApplicationId=app_id,
            WriteSegmentRequest={
                "Name": "dangling",
                "SegmentGroups": {"Groups": [{"SourceSegments": [{"Id": "f" * 32}]}]},
            },
        )
    assert excinfo.value.response["Error"]["Code"] in {"BadRequestException", "NotFoundException"}
    assert pinpoint.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"] == []


def test_import_segment_reads_as_pinpoint_shows_it(
    pinpoint: PinpointClient, signed: Signed, server: Server, app_id: str
) -> None:
    # No route creates IMPORT segments (imports are the CLI's): the test writes it into the
    # server's own engine file, as ``optsync import-pinpoint`` does, and reads it over the API.
    items: list[Any] = [
        {"Id": "sms-1", "ChannelType": "SMS", "Address": "+12065550131"},
        {"Id": "sms-2", "ChannelType": "SMS", "Address": "+12065550132", "OptOut": "ALL"},
        {"Id": "mail-1", "ChannelType": "EMAIL", "Address": "mail-1@example.com"},
    ]
    pinpoint.update_endpoints_batch(ApplicationId=app_id, EndpointBatchRequest={"Item": items})
    store = SQLiteStore(server.log.parent / "data" / "engine.db")
    try:
        source = ImportDefinition("CSV", "s3://bucket/list.csv", size=4)
        members = ["SMS-1", "sms-2", "mail-1", "gone"]
        segment_id = store.create_import_segment(app_id, "imported", members, source).id
    finally:
        store.close()

    got = pinpoint.get_segment(ApplicationId=app_id, SegmentId=segment_id)["SegmentResponse"]
    assert got["SegmentType"] == "IMPORT"
    assert got["Name"] == "imported"
    assert "Dimensions" not in got and "SegmentGroups" not in got
    assert got["ImportDefinition"] == {
        "ChannelCounts": {"EMAIL": 1, "SMS": 2},
        "ExternalId": "",
        "Format": "CSV",
        "RoleArn": "",
        "S3Url": "s3://bucket/list.csv",
        "Size": 4,
    }
    listed = pinpoint.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"]
    assert [(s["Id"], s["SegmentType"]) for s in listed] == [(segment_id, "IMPORT")]
    assert signed.estimate(app_id, segment_id) == (3, 2)  # sms-2 opted out; "gone" missing

    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_segment(
            ApplicationId=app_id,
            SegmentId=segment_id,
            WriteSegmentRequest={"Dimensions": US_ONLY},
        )
    assert "Dimensions" in excinfo.value.response["Error"]["Message"]
    renamed = pinpoint.update_segment(
        ApplicationId=app_id, SegmentId=segment_id, WriteSegmentRequest={"Name": "renamed"}
    )["SegmentResponse"]
    assert (renamed["Version"], renamed["SegmentType"], renamed["Name"]) == (2, "IMPORT", "renamed")
    first = pinpoint.get_segment_version(ApplicationId=app_id, SegmentId=segment_id, Version="1")
    assert first["SegmentResponse"]["ImportDefinition"]["S3Url"] == "s3://bucket/list.csv"

    pinpoint.delete_endpoint(ApplicationId=app_id, EndpointId="mail-1")
    assert signed.estimate(app_id, segment_id) == (2, 1)
    again = pinpoint.get_segment(ApplicationId=app_id, SegmentId=segment_id)["SegmentResponse"]
    assert again["ImportDefinition"]["ChannelCounts"] == {"SMS": 2}
    deleted = pinpoint.delete_segment(ApplicationId=app_id, SegmentId=segment_id)
    assert deleted["SegmentResponse"]["SegmentType"] == "IMPORT"
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_segment(ApplicationId=app_id, SegmentId=segment_id)
