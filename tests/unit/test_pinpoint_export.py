"""Pinpoint's endpoint file formats: export lines and CSV import files, read and written back."""

from __future__ import annotations

import io

import pytest

from optsync.api.wire import endpoint_patch_from_wire
from optsync.errors import InvalidRequest
from optsync.formats.pinpoint_export import (
    EndpointLine,
    csv_lines,
    csv_rows,
    json_line,
    stable_endpoint_id,
)

REQUEST = {
    "ChannelType": "SMS",
    "Address": "+12065550142",
    "OptOut": "ALL",
    "EndpointStatus": "INACTIVE",
    "EffectiveDate": "2024-01-02T03:04:05.678Z",
    "RequestId": "r-1",
    "Location": {"Country": "US", "City": "Seattle, WA", "Latitude": 47.6, "Longitude": -122.3},
    "Demographic": {"Platform": "ios", "Timezone": "America/Los_Angeles"},
    "Attributes": {"interests": ["golf", "tennis, outdoor"], "single": ["x"]},
    "Metrics": {"score": 4.5, "visits": 3.0},
    "User": {"UserId": "u1", "UserAttributes": {"plan": ["gold", "trial"]}},
}


def _rows(text: str) -> list[tuple[int, EndpointLine | InvalidRequest]]:
    return list(csv_rows(io.StringIO(text)))


def test_an_export_line_keeps_the_request_fields_and_drops_the_rest() -> None:
    line = json_line(
        {
            **REQUEST,
            "Id": "ep-1",
            "ApplicationId": "app",
            "CohortId": "7",
            "CreationDate": "2020-01-01T00:00:00.000Z",
            "Metrics": {"score": "4.5", "visits": 3},
            "User": {"UserId": "u1", "UserAttributes": {"plan": ["gold", "trial"]}, "New": 1},
            "NotYetInvented": {"a": 1},
        }
    )
    assert line.endpoint_id == "ep-1"
    assert line.request == {**REQUEST, "Metrics": {"score": 4.5, "visits": 3}}
    patch = endpoint_patch_from_wire(line.request, line.endpoint_id)
    assert patch.metrics == {"score": 4.5, "visits": 3.0}


def test_a_metric_that_is_not_a_number_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequest, match=r"Metrics.score must be a number, not 'high'"):
        json_line({"Id": "x", "Metrics": {"score": "high"}})


def test_csv_written_reads_back_to_the_same_request() -> None:
    text = csv_lines([("ep-1", REQUEST), ("ep-2", {"ChannelType": "EMAIL", "Address": "a@b.c"})])
    header = text.splitlines()[0].split(",")
    assert header.count("Attributes.interests") == 2
    (n1, first), (n2, second) = _rows(text)
    assert (n1, n2) == (2, 3)
    assert first == EndpointLine("ep-1", REQUEST)
    assert second == EndpointLine("ep-2", {"ChannelType": "EMAIL", "Address": "a@b.c"})


def test_csv_repeated_headers_give_several_values_and_empty_cells_none() -> None:
    ((_, line),) = _rows(
        "Address,ChannelType,Attributes.a,Attributes.a,User.UserAttributes.b,Metrics.m\n"
        "+12065550142,SMS,1,,2,7\n"
    )
    assert line == EndpointLine(
        "",
        {
            "Address": "+12065550142",
            "ChannelType": "SMS",
            "Attributes": {"a": ["1"]},
            "User": {"UserAttributes": {"b": ["2"]}},
            "Metrics": {"m": 7.0},
        },
    )


def test_csv_refuses_an_unknown_or_repeated_plain_column() -> None:
    with pytest.raises(InvalidRequest, match="'Phone' is not one of Pinpoint's import columns"):
        _rows("Phone,ChannelType\n1,SMS\n")
    with pytest.raises(InvalidRequest, match="'Address' is repeated"):
        _rows("Address,Address\n1,2\n")


def test_a_bad_csv_row_is_reported_on_its_line() -> None:
    rows = _rows("Address,Location.Latitude\n+1206,north\n+1206,1\n")
    assert isinstance(rows[0][1], InvalidRequest)
    assert rows[0][0] == 2
    assert "Location.Latitude must be a number, not 'north'" in str(rows[0][1])
    assert rows[1][0] == 3


def test_stable_ids_depend_on_channel_and_address_only() -> None:
    a = stable_endpoint_id("SMS", "+12065550142")
    assert a == stable_endpoint_id("sms", "+12065550142")
    assert a != stable_endpoint_id("VOICE", "+12065550142")
    assert a.startswith("import-")
