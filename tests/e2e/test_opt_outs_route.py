"""End users' opt-outs reported over the signed API, and the explicit opt-in that lifts them,
against a served ``optsync serve`` with boto3 and SigV4-signed raw requests."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import httpx
import pytest
from pinpoint_e2e import KEY_ID, Signed, sms

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

NUMBER = "+12065550142"


def report(signed: Signed, app_id: str, **body: object) -> httpx.Response:
    return signed.request("POST", f"/v1/apps/{app_id}/opt-outs", json.dumps(body).encode())


def opt_out(pinpoint: PinpointClient, app_id: str, endpoint_id: str) -> str:
    response = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
    return str(response["EndpointResponse"]["OptOut"])


def test_a_reported_stop_holds_until_an_opt_in_that_gives_its_reason(
    pinpoint: PinpointClient, signed: Signed, app_id: str
) -> None:
    for endpoint_id, channel in (("sms-1", "SMS"), ("voice-1", "VOICE")):
        pinpoint.update_endpoint(
            ApplicationId=app_id,
            EndpointId=endpoint_id,
            EndpointRequest={"Address": NUMBER, "ChannelType": channel, "OptOut": "NONE"},
        )
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="other", EndpointRequest=sms("+12065550143")
    )

    response = report(signed, app_id, Address="+1 (206) 555-0142", Keyword="STOP")
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["Recorded"] is True
    assert sorted(body["EndpointIds"]) == ["sms-1", "voice-1"]
    assert opt_out(pinpoint, app_id, "sms-1") == "ALL"
    assert opt_out(pinpoint, app_id, "voice-1") == "ALL"
    assert opt_out(pinpoint, app_id, "other") == "NONE"
    history = signed.consent_history(app_id, "sms-1")["Item"]
    assert history[-1]["Cause"] == "end user"
    assert history[-1]["CauseRef"] == f"api:{KEY_ID}"
    assert "STOP" in history[-1]["CauseDetail"]
    # Sent again (a webhook retried): recorded once.
    again = report(
        signed,
        app_id,
        Address=NUMBER,
        Keyword="STOP",
        OptedOutAt=history[-1]["Timestamp"].replace("Z", "+00:00"),
    )
    assert again.status_code == 202

    # A Pinpoint client that sets OptOut NONE without a reason does not re-subscribe them.
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="sms-1", EndpointRequest={"OptOut": "NONE"}
    )
    assert opt_out(pinpoint, app_id, "sms-1") == "ALL"
    # With the reason (a reserved attribute, not stored) it does, and the history says why.
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="sms-1",
        EndpointRequest={
            "OptOut": "NONE",
            "Attributes": {"OptsyncOptInReason": ["texted START on 2026-12-03"]},
        },
    )
    endpoint = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="sms-1")["EndpointResponse"]
    assert endpoint["OptOut"] == "NONE"
    assert "OptsyncOptInReason" not in endpoint.get("Attributes", {})
    last = signed.consent_history(app_id, "sms-1")["Item"][-1]
    assert "texted START" in last["CauseDetail"]
    assert f"key {KEY_ID}" in last["CauseDetail"]
    assert opt_out(pinpoint, app_id, "voice-1") == "ALL"  # its own hold stays


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({}, "Address"),
        ({"Address": "not a number"}, "Address"),
        ({"Address": NUMBER, "OptedOutAt": "yesterday"}, "OptedOutAt"),
        ({"Address": NUMBER, "OptedOutAt": "2026-12-03T10:00:00"}, "OptedOutAt"),
        ({"Address": NUMBER, "Phone": NUMBER}, "Phone"),
        ({"Address": NUMBER, "Source": "has spaces"}, "Source"),
    ],
)
def test_a_bad_report_is_a_400_naming_the_field(
    signed: Signed, app_id: str, body: dict[str, object], names: str
) -> None:
    response = report(signed, app_id, **body)
    assert response.status_code == 400, response.text
    assert names in response.json()["Message"]


def test_an_unsigned_report_is_refused(signed: Signed, app_id: str) -> None:
    response = httpx.post(
        f"{signed.base_url}/v1/apps/{app_id}/opt-outs",
        content=json.dumps({"Address": NUMBER}).encode(),
        timeout=10,
    )
    assert response.status_code == 403


def test_a_report_for_an_unknown_app_is_a_404(signed: Signed) -> None:
    response = report(signed, "0" * 32, Address=NUMBER)
    assert response.status_code == 404
