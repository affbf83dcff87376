"""The flow of AWS's blog "Updating opt-in status for Amazon Pinpoint channels", end to end."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from pinpoint_e2e import ISO_MILLIS_Z, Signed, sms

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

USERS = [f"user{n}" for n in range(1, 10)]


@pytest.fixture
def optin_demo(pinpoint: PinpointClient) -> Iterator[str]:
    created = pinpoint.create_app(CreateApplicationRequest={"Name": "optin-demo"})
    assert created["ResponseMetadata"]["HTTPStatusCode"] == 201
    app_id = created["ApplicationResponse"]["Id"]
    yield app_id
    pinpoint.delete_app(ApplicationId=app_id)


def set_opt_out(pinpoint: PinpointClient, app_id: str, user: str, opt_out: str) -> Any:
    return pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId=user, EndpointRequest={"OptOut": opt_out}
    )


def test_opt_outs_lower_the_eligible_count_and_are_recorded(
    pinpoint: PinpointClient, signed: Signed, optin_demo: str
) -> None:
    app_id = optin_demo
    sms_channel = pinpoint.update_sms_channel(
        ApplicationId=app_id, SMSChannelRequest={"Enabled": True}
    )["SMSChannelResponse"]
    assert sms_channel["Enabled"] is True

    for n, user in enumerate(USERS, start=1):
        response = pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId=user,
            EndpointRequest=sms(f"+1234111111{n}", OptOut="NONE", User={"UserId": user}),
        )
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 202
    # No Location was sent: the country comes from the numbers.
    assert pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="user9")["EndpointResponse"][
        "Location"
    ] == {"Country": "US"}

    segments = {
        code: pinpoint.create_segment(
            ApplicationId=app_id,
            WriteSegmentRequest={
                "Name": "US-Segment" if code == "US" else "USA-Segment",
                "Dimensions": {
                    "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": [code]}}
                },
            },
        )["SegmentResponse"]["Id"]
        for code in ("US", "USA")
    }

    def estimates() -> set[tuple[int, int]]:
        return {signed.estimate(app_id, segment_id) for segment_id in segments.values()}

    assert estimates() == {(9, 9)}

    opt_out_requests = {
        user: set_opt_out(pinpoint, app_id, user, "ALL")["ResponseMetadata"]["RequestId"]
        for user in USERS[:4]
    }
    assert estimates() == {(9, 5)}

    set_opt_out(pinpoint, app_id, "user5", "ALL")
    assert estimates() == {(9, 4)}

    history = signed.consent_history(app_id, "user1")
    assert history["ApplicationId"] == app_id
    assert history["EndpointId"] == "user1"
    changes = history["Item"]
    assert [(c["OptOutBefore"], c["OptOutAfter"]) for c in changes] == [
        (None, "NONE"),
        ("NONE", "ALL"),
    ]
    opted_out = changes[-1]
    assert opted_out["EndpointId"] == "user1"
    assert opted_out["Address"] == "+12341111111"
    assert opted_out["Cause"] == "api"
    assert opted_out["CauseRef"] == opt_out_requests["user1"]
    assert ISO_MILLIS_Z.fullmatch(opted_out["Timestamp"])
    assert opted_out["Timestamp"] >= changes[0]["Timestamp"]

    # Opting back in makes the endpoint eligible again.
    set_opt_out(pinpoint, app_id, "user1", "NONE")
    assert estimates() == {(9, 5)}
    assert [c["OptOutAfter"] for c in signed.consent_history(app_id, "USER1")["Item"]] == [
        "NONE",
        "ALL",
        "NONE",
    ]
