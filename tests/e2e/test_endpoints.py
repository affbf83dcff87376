"""Endpoints through boto3: upsert and merge, batches, ids, users, limits and validation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from pinpoint_e2e import ISO_MILLIS_Z, sms

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e


def get_endpoint(pinpoint: PinpointClient, app_id: str, endpoint_id: str) -> dict[str, Any]:
    response = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    return dict(response["EndpointResponse"])


def test_update_endpoint_is_accepted_with_202(pinpoint: PinpointClient, app_id: str) -> None:
    response = pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="ep-1", EndpointRequest=sms("+12065550101")
    )
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert response["MessageBody"]["RequestID"] == response["ResponseMetadata"]["RequestId"]
    assert response["MessageBody"]["Message"]
    endpoint = get_endpoint(pinpoint, app_id, "ep-1")
    assert endpoint["RequestId"] == response["ResponseMetadata"]["RequestId"]


def test_update_endpoint_merges_field_by_field(pinpoint: PinpointClient, app_id: str) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="merge-me",
        EndpointRequest=sms(
            "+12341111111",
            OptOut="NONE",
            Attributes={"Source": ["web"], "Interests": ["news"]},
            Demographic={"Platform": "ios", "Timezone": "America/New_York"},
            Location={"City": "Springfield"},
            Metrics={"Visits": 3.0},
            User={"UserId": "user-merge", "UserAttributes": {"Tier": ["gold"]}},
        ),
    )
    first = get_endpoint(pinpoint, app_id, "merge-me")
    second_call = pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="merge-me",
        EndpointRequest={
            "OptOut": "ALL",
            "Attributes": {"Interests": ["sports", "music"]},
            "Metrics": {"Purchases": 1.0},
            "Demographic": {"Locale": "en_US"},
        },
    )
    merged = get_endpoint(pinpoint, app_id, "merge-me")

    assert merged["Id"] == "merge-me"
    assert merged["ApplicationId"] == app_id
    assert merged["ChannelType"] == "SMS"
    assert merged["Address"] == "+12341111111"
    assert merged["OptOut"] == "ALL"
    assert merged["EndpointStatus"] == "ACTIVE"
    assert merged["Attributes"] == {"Source": ["web"], "Interests": ["sports", "music"]}
    assert merged["Metrics"] == {"Visits": 3.0, "Purchases": 1.0}
    assert merged["Demographic"] == {
        "Platform": "ios",
        "Timezone": "America/New_York",
        "Locale": "en_US",
    }
    assert merged["Location"] == {"City": "Springfield", "Country": "US"}
    assert merged["User"] == {"UserId": "user-merge", "UserAttributes": {"Tier": ["gold"]}}
    assert merged["RequestId"] == second_call["ResponseMetadata"]["RequestId"]

    assert ISO_MILLIS_Z.fullmatch(merged["CreationDate"]), merged["CreationDate"]
    assert merged["CreationDate"] == first["CreationDate"]
    assert ISO_MILLIS_Z.fullmatch(merged["EffectiveDate"]), merged["EffectiveDate"]
    assert merged["EffectiveDate"] >= first["EffectiveDate"]
    assert merged["CohortId"] == first["CohortId"]
    assert merged["CohortId"] in {str(n) for n in range(100)}


def test_country_is_derived_from_the_number_of_an_sms_endpoint(
    pinpoint: PinpointClient, app_id: str
) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="derived", EndpointRequest=sms("+12341111111")
    )
    assert get_endpoint(pinpoint, app_id, "derived")["Location"]["Country"] == "US"


def test_batch_of_100_is_accepted(pinpoint: PinpointClient, app_id: str) -> None:
    items: list[Any] = [
        {"Id": f"batch-{i}", **sms(f"+1206555{i:04d}", OptOut="ALL" if i % 2 else "NONE")}
        for i in range(100)
    ]
    response = pinpoint.update_endpoints_batch(
        ApplicationId=app_id, EndpointBatchRequest={"Item": items}
    )
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert response["MessageBody"]["RequestID"] == response["ResponseMetadata"]["RequestId"]
    first, last = (
        get_endpoint(pinpoint, app_id, "batch-0"),
        get_endpoint(pinpoint, app_id, "batch-99"),
    )
    assert (first["Address"], first["OptOut"]) == ("+12065550000", "NONE")
    assert (last["Address"], last["OptOut"]) == ("+12065550099", "ALL")


def test_batch_of_101_is_refused_whole(pinpoint: PinpointClient, app_id: str) -> None:
    items: list[Any] = [{"Id": f"over-{i}", **sms(f"+1206555{i:04d}")} for i in range(101)]
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoints_batch(ApplicationId=app_id, EndpointBatchRequest={"Item": items})
    assert "100" in excinfo.value.response["Error"]["Message"]
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="over-0")


@pytest.mark.parametrize(
    "odd_id",
    ["ep 1/x+y", "a/b/c", "100%", "what?#frag", "semi;colon&amp=1", "café-☕", "~tilde.dot_"],
)
def test_endpoint_id_with_reserved_characters_round_trips(
    pinpoint: PinpointClient, app_id: str, odd_id: str
) -> None:
    """botocore percent-encodes ``/`` in path labels: only raw-path routing keeps the id whole."""
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId=odd_id,
        EndpointRequest=sms("+12065550102", User={"UserId": "odd"}),
    )
    assert get_endpoint(pinpoint, app_id, odd_id)["Id"] == odd_id
    users = pinpoint.get_user_endpoints(ApplicationId=app_id, UserId="odd")
    assert [e["Id"] for e in users["EndpointsResponse"]["Item"]] == [odd_id]
    deleted = pinpoint.delete_endpoint(ApplicationId=app_id, EndpointId=odd_id)
    assert deleted["EndpointResponse"]["Id"] == odd_id
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=odd_id)


def test_prefix_of_a_slashed_id_is_another_endpoint(pinpoint: PinpointClient, app_id: str) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="ep 1/x", EndpointRequest=sms("+12065550102")
    )
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="ep 1")


@pytest.mark.parametrize("bad_id", ["cost$", "{id}", "brace}"])
def test_endpoint_id_with_dollar_or_braces_is_refused(
    pinpoint: PinpointClient, app_id: str, bad_id: str
) -> None:
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoint(
            ApplicationId=app_id, EndpointId=bad_id, EndpointRequest=sms("+12065550102")
        )
    assert "Id" in excinfo.value.response["Error"]["Message"]


def test_endpoint_ids_are_case_insensitive(pinpoint: PinpointClient, app_id: str) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="MixedCase-EP", EndpointRequest=sms("+12065550103")
    )
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="MIXEDCASE-ep",
        EndpointRequest={"OptOut": "ALL", "User": {"UserId": "case-user"}},
    )
    found = get_endpoint(pinpoint, app_id, "mixedcase-ep")
    assert found["Id"] == "MixedCase-EP"
    assert found["OptOut"] == "ALL"
    assert found["Address"] == "+12065550103"
    users = pinpoint.get_user_endpoints(ApplicationId=app_id, UserId="case-user")
    assert [e["Id"] for e in users["EndpointsResponse"]["Item"]] == ["MixedCase-EP"]


def test_delete_endpoint_returns_the_deleted_endpoint(
    pinpoint: PinpointClient, app_id: str
) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="gone",
        EndpointRequest=sms("+12065550104", Attributes={"Source": ["shop"]}),
    )
    response = pinpoint.delete_endpoint(ApplicationId=app_id, EndpointId="gone")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 202
    deleted = response["EndpointResponse"]
    assert deleted["Id"] == "gone"
    assert deleted["Address"] == "+12065550104"
    assert deleted["Attributes"] == {"Source": ["shop"]}
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="gone")
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.delete_endpoint(ApplicationId=app_id, EndpointId="gone")


def test_user_endpoints_get_and_delete(pinpoint: PinpointClient, app_id: str) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="user-ep-0",
        EndpointRequest=sms("+12065550105", User={"UserId": "user-42"}),
    )
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="user-ep-1",
        EndpointRequest={
            "Address": "someone@example.com",
            "ChannelType": "EMAIL",
            "User": {"UserId": "user-42"},
        },
    )
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="stranger",
        EndpointRequest=sms("+12065550106", User={"UserId": "user-43"}),
    )
    got = pinpoint.get_user_endpoints(ApplicationId=app_id, UserId="user-42")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
    items = got["EndpointsResponse"]["Item"]
    assert sorted(e["Id"] for e in items) == ["user-ep-0", "user-ep-1"]
    assert {e["ChannelType"] for e in items} == {"SMS", "EMAIL"}
    assert all(e["User"]["UserId"] == "user-42" for e in items)

    deleted = pinpoint.delete_user_endpoints(ApplicationId=app_id, UserId="user-42")
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert sorted(e["Id"] for e in deleted["EndpointsResponse"]["Item"]) == [
        "user-ep-0",
        "user-ep-1",
    ]
    for endpoint_id in ("user-ep-0", "user-ep-1"):
        with pytest.raises(pinpoint.exceptions.NotFoundException):
            pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
    assert get_endpoint(pinpoint, app_id, "stranger")["User"]["UserId"] == "user-43"


def test_sixteenth_endpoint_of_a_user_is_refused(pinpoint: PinpointClient, app_id: str) -> None:
    items: list[Any] = [
        {"Id": f"cap-{i}", **sms(f"+1206555{i:04d}", User={"UserId": "busy-user"})}
        for i in range(15)
    ]
    pinpoint.update_endpoints_batch(ApplicationId=app_id, EndpointBatchRequest={"Item": items})
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId="cap-15",
            EndpointRequest=sms("+12065550115", User={"UserId": "busy-user"}),
        )
    assert (
        "Exceeded maximum endpoint per user count: 15"
        in (excinfo.value.response["Error"]["Message"])
    )
    users = pinpoint.get_user_endpoints(ApplicationId=app_id, UserId="busy-user")
    assert len(users["EndpointsResponse"]["Item"]) == 15
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="cap-15")


def test_unknown_opt_out_value_is_refused(pinpoint: PinpointClient, app_id: str) -> None:
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId="maybe",
            EndpointRequest=sms("+12065550107", OptOut="MAYBE"),
        )
    message = excinfo.value.response["Error"]["Message"]
    assert "OptOut" in message
    assert "MAYBE" in message


def test_attribute_name_of_51_characters_is_refused(pinpoint: PinpointClient, app_id: str) -> None:
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId="long-name",
            EndpointRequest=sms("+12065550108", Attributes={"a" * 51: ["x"]}),
        )
    assert "50" in excinfo.value.response["Error"]["Message"]
    # 50 characters is still allowed.
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="long-name",
        EndpointRequest=sms("+12065550108", Attributes={"a" * 50: ["x"]}),
    )
    assert get_endpoint(pinpoint, app_id, "long-name")["Attributes"] == {"a" * 50: ["x"]}


def test_new_endpoint_without_channel_type_is_refused(
    pinpoint: PinpointClient, app_id: str
) -> None:
    with pytest.raises(pinpoint.exceptions.BadRequestException) as excinfo:
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId="no-channel",
            EndpointRequest={"Address": "+12065550109"},
        )
    assert "Missing ChannelType" in excinfo.value.response["Error"]["Message"]
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="no-channel")


def test_user_attributes_are_shared_by_every_endpoint_of_the_user(
    pinpoint: PinpointClient, app_id: str
) -> None:
    for n in range(2):
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId=f"shared-{n}",
            EndpointRequest=sms(f"+1206555014{n}", User={"UserId": "sharer"}),
        )
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="shared-0",
        EndpointRequest={"User": {"UserId": "sharer", "UserAttributes": {"Plan": ["pro"]}}},
    )
    other = get_endpoint(pinpoint, app_id, "shared-1")
    assert other["User"] == {"UserId": "sharer", "UserAttributes": {"Plan": ["pro"]}}


def test_reusing_an_address_makes_the_older_endpoint_inactive(
    pinpoint: PinpointClient, app_id: str
) -> None:
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="old-phone", EndpointRequest=sms("+12065550150")
    )
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="new-phone", EndpointRequest=sms("+12065550150")
    )
    assert get_endpoint(pinpoint, app_id, "old-phone")["EndpointStatus"] == "INACTIVE"
    assert get_endpoint(pinpoint, app_id, "new-phone")["EndpointStatus"] == "ACTIVE"
