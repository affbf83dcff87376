"""Pinpoint's error contract as boto3 sees it, and authentication of every request."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from pinpoint_e2e import KEY_ID, ClientFactory, Server, Signed, sms

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

MISSING = "0123456789abcdef0123456789abcdef"

NotFoundCall = Callable[["PinpointClient", str], Any]
NOT_FOUND_CALLS: dict[str, NotFoundCall] = {
    "app": lambda c, _app: c.get_app(ApplicationId=MISSING),
    "endpoint": lambda c, app: c.get_endpoint(ApplicationId=app, EndpointId="nobody"),
    "segment": lambda c, app: c.get_segment(ApplicationId=app, SegmentId=MISSING),
    "segment-version": lambda c, app: c.get_segment_version(
        ApplicationId=app, SegmentId=MISSING, Version="1"
    ),
    "endpoint-in-missing-app": lambda c, _app: c.update_endpoint(
        ApplicationId=MISSING, EndpointId="e", EndpointRequest=sms("+12065550100")
    ),
}


@pytest.mark.parametrize("call", list(NOT_FOUND_CALLS.values()), ids=list(NOT_FOUND_CALLS))
def test_not_found_has_pinpoints_error_shape(
    pinpoint: PinpointClient, app_id: str, call: NotFoundCall
) -> None:
    with pytest.raises(pinpoint.exceptions.NotFoundException) as excinfo:
        call(pinpoint, app_id)
    response = excinfo.value.response
    assert response["Error"]["Code"] == "NotFoundException"
    assert response["Error"]["Message"]
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 404
    request_id = response["ResponseMetadata"]["RequestId"]
    assert request_id
    # boto puts the modelled body members (Message, RequestID) at the top level.
    assert response.get("RequestID") == request_id
    assert response.get("Message") == response["Error"]["Message"]


def test_wrong_secret_is_forbidden_and_writes_nothing(
    pinpoint: PinpointClient, make_client: ClientFactory, app_id: str
) -> None:
    intruder = make_client(KEY_ID, "not-the-secret")
    with pytest.raises(intruder.exceptions.ForbiddenException) as excinfo:
        intruder.update_endpoint(
            ApplicationId=app_id, EndpointId="forged", EndpointRequest=sms("+12065550131")
        )
    response = excinfo.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert response["Error"]["Message"]
    assert "not-the-secret" not in response["Error"]["Message"]
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="forged")


def test_unknown_access_key_is_forbidden(make_client: ClientFactory, app_id: str) -> None:
    stranger = make_client("NOSUCHKEY", "whatever")
    with pytest.raises(stranger.exceptions.ForbiddenException) as excinfo:
        stranger.get_app(ApplicationId=app_id)
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert excinfo.value.response["Error"]["Message"]


def _assert_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-amzn-ErrorType"] == code
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = json.loads(response.content)
    assert set(body) == {"Message", "RequestID"}
    assert body["Message"]
    assert body["RequestID"] == response.headers["x-amzn-RequestId"]
    return body


def test_unsigned_request_is_forbidden(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/apps", timeout=10.0)
    _assert_error_shape(response, 403, "ForbiddenException")


def test_unsigned_write_is_forbidden_and_writes_nothing(
    server: Server, pinpoint: PinpointClient, app_id: str
) -> None:
    response = httpx.put(
        f"{server.url}/v1/apps/{app_id}/endpoints/unsigned",
        json=sms("+12065550132"),
        timeout=10.0,
    )
    _assert_error_shape(response, 403, "ForbiddenException")
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="unsigned")


def test_body_changed_after_signing_is_forbidden(
    signed: Signed, pinpoint: PinpointClient, app_id: str
) -> None:
    path = f"/v1/apps/{app_id}/endpoints/tampered"
    good = signed.request("PUT", path, json.dumps(sms("+12065550133")).encode())
    assert good.status_code == 202, good.text
    # A captured request replayed with another body of the same length.
    original = json.dumps({"OptOut": "NONE"}).encode()
    swapped = json.dumps({"OptOut": "ALL"}).encode() + b" "
    assert len(original) == len(swapped)
    response = signed.request("PUT", path, original, sent_body=swapped)
    _assert_error_shape(response, 403, "ForbiddenException")
    assert (
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="tampered")["EndpointResponse"][
            "OptOut"
        ]
        == "NONE"
    )


def test_post_on_an_endpoint_is_method_not_allowed(signed: Signed, app_id: str) -> None:
    response = signed.request("POST", f"/v1/apps/{app_id}/endpoints/x", b"{}")
    body = _assert_error_shape(response, 405, "MethodNotAllowedException")
    assert "POST" in body["Message"]


def test_extension_routes_need_a_signature(server: Server, signed: Signed, app_id: str) -> None:
    for path in (
        f"/v1/apps/{app_id}/segments/{MISSING}/estimate",
        f"/v1/apps/{app_id}/endpoints/x/consent-history",
    ):
        response = httpx.get(server.url + path, timeout=10.0)
        _assert_error_shape(response, 403, "ForbiddenException")
        _assert_error_shape(signed.request("GET", path), 404, "NotFoundException")


def test_request_over_7_mb_is_payload_too_large(pinpoint: PinpointClient, app_id: str) -> None:
    huge = sms("+12065550134", Attributes={"Blob": ["x" * 100] * 50})
    items: Any = [{"Id": f"big-{i}", **huge} for i in range(100)]
    items[0]["Address"] = "+1" + "2" * (7 * 1024 * 1024)
    with pytest.raises(pinpoint.exceptions.PayloadTooLargeException) as excinfo:
        pinpoint.update_endpoints_batch(ApplicationId=app_id, EndpointBatchRequest={"Item": items})
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert excinfo.value.response["Error"]["Message"]
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="big-1")
