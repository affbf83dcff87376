"""SigV4 verification against requests signed by botocore and by the real boto3 client."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest
from botocore.credentials import Credentials

from optsync.api.sigv4 import (
    SignatureError,
    SignatureErrorCode,
    SignatureVerifier,
)
from optsync.credentials import parse_credentials
from optsync.errors import ConfigError

KEY_ID = "AKIDOPTSYNCTEST"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
OTHER_KEY_ID = "AKIDOTHER"
OTHER_SECRET = "other-secret"

Request = dict[str, Any]


def sign(
    method: str,
    path: str,
    *,
    query: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    key_id: str = KEY_ID,
    secret: str = SECRET,
    token: str | None = None,
    region: str = "us-east-1",
    service: str = "mobiletargeting",
) -> Request:
    """Sign like botocore does and return what the server would receive."""
    url = "http://127.0.0.1:8080" + path + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, headers=headers or {}, data=body)
    SigV4Auth(Credentials(key_id, secret, token), service, region).add_auth(request)
    return received(request.prepare())


def received(prepared: AWSPreparedRequest) -> Request:
    """The request as an ASGI server hands it over (raw target, Host and wire headers added)."""
    parts = urlsplit(prepared.url)
    raw_body = prepared.body or b""
    assert isinstance(raw_body, str | bytes), "these tests never send a streaming body"
    body = raw_body.encode() if isinstance(raw_body, str) else raw_body
    wire_headers = [
        ("host", parts.netloc),
        # botocore keeps some values as bytes; an ASGI server decodes them as latin-1.
        *(
            (n, v.decode("latin-1") if isinstance(v, bytes) else v)
            for n, v in prepared.headers.items()
        ),
        ("user-agent", "test-client/1.0"),
        ("content-length", str(len(body))),
        ("accept-encoding", "identity"),
    ]
    return {
        "method": prepared.method,
        "host": parts.netloc,
        "raw_path": parts.path,
        "raw_query": parts.query,
        "headers": wire_headers,
        "body": body,
    }


def replace_header(request: Request, name: str, value: str) -> Request:
    headers = [(n, v) for n, v in request["headers"] if n.lower() != name.lower()]
    return {**request, "headers": [*headers, (name, value)]}


def authorization(request: Request) -> str:
    return str(next(v for n, v in request["headers"] if n.lower() == "authorization"))


@pytest.fixture
def verifier() -> SignatureVerifier:
    return SignatureVerifier({KEY_ID: SECRET, OTHER_KEY_ID: OTHER_SECRET})


def rejected(verifier: SignatureVerifier, request: Request) -> SignatureError:
    with pytest.raises(SignatureError) as info:
        verifier.verify(**request)
    assert SECRET not in info.value.message
    assert SECRET not in str(info.value)
    return info.value


def test_get_with_query_string(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1/segments", query="page-size=5&token=abc")
    assert verifier.verify(**request) == KEY_ID


def test_changed_query_string_is_rejected(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1/segments", query="page-size=5&token=abc")
    error = rejected(verifier, {**request, "raw_query": "page-size=500&token=abc"})
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE


def test_put_with_json_body(verifier: SignatureVerifier) -> None:
    body = json.dumps({"ChannelType": "SMS", "Address": "+12341111111"}).encode()
    request = sign(
        "PUT",
        "/v1/apps/app1/endpoints/ep1",
        body=body,
        headers={"Content-Type": "application/json"},
    )
    assert "content-type" in authorization(request)
    assert verifier.verify(**request) == KEY_ID


def test_tampered_body_is_rejected(verifier: SignatureVerifier) -> None:
    body = json.dumps({"OptOut": "NONE"}).encode()
    request = sign("PUT", "/v1/apps/app1/endpoints/ep1", body=body)
    error = rejected(verifier, {**request, "body": json.dumps({"OptOut": "ALL"}).encode()})
    assert error.code == "InvalidSignatureException"
    assert "Signature mismatch" in error.message


def test_raw_percent_encoded_path(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1/endpoints/ep%201%2Fx")
    assert request["raw_path"] == "/v1/apps/app1/endpoints/ep%201%2Fx"
    assert verifier.verify(**request) == KEY_ID
    # The decoded path is a different request: the server must pass the raw one.
    error = rejected(verifier, {**request, "raw_path": "/v1/apps/app1/endpoints/ep 1/x"})
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE


def test_fragment_in_target_is_rejected(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    error = rejected(verifier, {**request, "raw_path": "/v1/apps/app1#/other"})
    assert "request target" in error.message


def test_wrong_secret_is_rejected(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1", secret="not-the-secret")
    error = rejected(verifier, request)
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE
    assert KEY_ID in error.message
    assert "secret" in error.message


def test_other_configured_key_is_returned(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1", key_id=OTHER_KEY_ID, secret=OTHER_SECRET)
    assert verifier.verify(**request) == OTHER_KEY_ID


def test_unknown_key_id_is_unrecognized(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1", key_id="AKIDUNKNOWN")
    error = rejected(verifier, request)
    assert error.code == SignatureErrorCode.UNRECOGNIZED_CLIENT
    assert "AKIDUNKNOWN" in error.message


def test_missing_authorization_header(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    headers = [(n, v) for n, v in request["headers"] if n.lower() != "authorization"]
    error = rejected(verifier, {**request, "headers": headers})
    assert error.code == SignatureErrorCode.MISSING_AUTHENTICATION_TOKEN
    assert "Authorization" in error.message


@pytest.mark.parametrize(
    ("shift", "problem"),
    [(timedelta(minutes=6), "Signature expired"), (-timedelta(minutes=6), "not yet current")],
)
def test_clock_skew_is_rejected(shift: timedelta, problem: str) -> None:
    request = sign("GET", "/v1/apps/app1")
    verifier = SignatureVerifier({KEY_ID: SECRET}, clock=lambda: datetime.now(UTC) + shift)
    error = rejected(verifier, request)
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE
    assert problem in error.message
    assert "more than 5 minutes" in error.message
    assert "check the client's clock" in error.message


def test_skew_within_limit_is_accepted() -> None:
    request = sign("GET", "/v1/apps/app1")
    clock: Callable[[], datetime] = lambda: datetime.now(UTC) + timedelta(minutes=4)  # noqa: E731
    assert SignatureVerifier({KEY_ID: SECRET}, clock=clock).verify(**request) == KEY_ID


@pytest.mark.parametrize("region", ["eu-west-1", "ap-southeast-2", "local"])
def test_any_region_is_accepted(verifier: SignatureVerifier, region: str) -> None:
    request = sign("GET", "/v1/apps/app1", region=region)
    assert f"/{region}/mobiletargeting/aws4_request" in authorization(request)
    assert verifier.verify(**request) == KEY_ID


def test_other_service_is_rejected(verifier: SignatureVerifier) -> None:
    error = rejected(verifier, sign("GET", "/v1/apps/app1", service="sms-voice"))
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE
    assert "mobiletargeting" in error.message


def test_session_token_is_accepted_and_signed(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1", token="session-token-1")
    assert "x-amz-security-token" in authorization(request)
    assert verifier.verify(**request) == KEY_ID
    tampered = replace_header(request, "X-Amz-Security-Token", "session-token-2")
    assert rejected(verifier, tampered).code == SignatureErrorCode.INVALID_SIGNATURE


def test_repeated_header_values_are_joined(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1", headers={"X-Optsync-Tag": "a,b"})
    headers = [(n, v) for n, v in request["headers"] if n != "X-Optsync-Tag"]
    split = {**request, "headers": [*headers, ("x-optsync-tag", "a"), ("x-optsync-tag", " b ")]}
    assert verifier.verify(**split) == KEY_ID


def test_unsigned_headers_may_change(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    assert verifier.verify(**replace_header(request, "user-agent", "proxy/2")) == KEY_ID


def test_scope_date_must_match_x_amz_date(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    header = authorization(request)
    date = header.split("Credential=")[1].split("/")[1]
    other = (datetime.strptime(date, "%Y%m%d").replace(tzinfo=UTC) - timedelta(days=1)).strftime(
        "%Y%m%d"
    )
    error = rejected(
        verifier, replace_header(request, "Authorization", header.replace(date, other))
    )
    assert "does not match X-Amz-Date" in error.message


def test_missing_x_amz_date(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    headers = [(n, v) for n, v in request["headers"] if n.lower() != "x-amz-date"]
    error = rejected(verifier, {**request, "headers": headers})
    assert "X-Amz-Date" in error.message


def test_host_must_be_signed(verifier: SignatureVerifier) -> None:
    request = sign("GET", "/v1/apps/app1")
    header = authorization(request).replace("SignedHeaders=host;", "SignedHeaders=")
    error = rejected(verifier, replace_header(request, "Authorization", header))
    assert "host" in error.message


def test_signed_header_missing_from_request(verifier: SignatureVerifier) -> None:
    request = sign("PUT", "/v1/apps/app1", body=b"{}", headers={"Content-Type": "x/y"})
    headers = [(n, v) for n, v in request["headers"] if n.lower() != "content-type"]
    error = rejected(verifier, {**request, "headers": headers})
    assert "content-type is missing" in error.message


@pytest.mark.parametrize(
    ("header", "part"),
    [
        ("Basic dXNlcjpwYXNz", "AWS4-HMAC-SHA256"),
        ("AWS4-HMAC-SHA256 Credential=AKID/2026/us-east-1/mobiletargeting", "Credential"),
        (
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/mobiletargeting/aws4_request, "
            "SignedHeaders=Host;X-Amz-Date, Signature=" + "0" * 64,
            "SignedHeaders",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/mobiletargeting/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=xyz",
            "Signature",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKID/20260101/us-east-1/mobiletargeting/aws4_request, "
            "Signature=" + "0" * 64,
            "SignedHeaders",
        ),
    ],
)
def test_malformed_authorization(verifier: SignatureVerifier, header: str, part: str) -> None:
    request = replace_header(sign("GET", "/v1/apps/app1"), "Authorization", header)
    error = rejected(verifier, request)
    assert error.code == SignatureErrorCode.INVALID_SIGNATURE
    assert part in error.message
    assert "dXNlcjpwYXNz" not in error.message


def test_signed_content_sha256_must_match_body(verifier: SignatureVerifier) -> None:
    body = b'{"OptOut": "NONE"}'
    digest = hashlib.sha256(body).hexdigest()
    request = sign("PUT", "/v1/apps/app1", body=body, headers={"X-Amz-Content-SHA256": digest})
    assert verifier.verify(**request) == KEY_ID
    error = rejected(verifier, {**request, "body": b'{"OptOut": "ALL"}'})
    assert "X-Amz-Content-SHA256" in error.message


def test_unsigned_payload_is_rejected(verifier: SignatureVerifier) -> None:
    request = sign(
        "PUT", "/v1/apps/app1", body=b"{}", headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}
    )
    assert "not signed" in rejected(verifier, request).message


def test_max_skew_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_skew"):
        SignatureVerifier({}, max_skew=timedelta(0))


# The real client ----------------------------------------------------------------------------


class _Captured(Exception):
    """Stops boto3 after it has signed the request."""


def capture(call: Callable[[Any], object]) -> Request:
    client = boto3.client(
        "pinpoint",
        endpoint_url="http://127.0.0.1:9",
        region_name="eu-west-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    captured: list[AWSPreparedRequest] = []

    def stop(request: AWSPreparedRequest, **kwargs: object) -> None:
        captured.append(request)
        raise _Captured

    client.meta.events.register("before-send.pinpoint.*", stop)
    with pytest.raises(_Captured):
        call(client)
    return received(captured[0])


def test_boto3_get_endpoint(verifier: SignatureVerifier) -> None:
    request = capture(
        lambda c: c.get_endpoint(ApplicationId="app1", EndpointId="user1_+12341111111")
    )
    assert request["raw_path"] == "/v1/apps/app1/endpoints/user1_%2B12341111111"
    assert "/eu-west-1/mobiletargeting/aws4_request" in authorization(request)
    assert verifier.verify(**request) == KEY_ID


def test_boto3_update_endpoint(verifier: SignatureVerifier) -> None:
    request = capture(
        lambda c: c.update_endpoint(
            ApplicationId="app1",
            EndpointId="user1_+12341111111",
            EndpointRequest={
                "ChannelType": "SMS",
                "Address": "+12341111111",
                "OptOut": "ALL",
                "User": {"UserId": "user1"},
            },
        )
    )
    assert json.loads(request["body"])["OptOut"] == "ALL"
    assert verifier.verify(**request) == KEY_ID
    tampered = request["body"].replace(b'"ALL"', b'"NONE"')
    assert rejected(verifier, {**request, "body": tampered}).code == "InvalidSignatureException"


# parse_credentials --------------------------------------------------------------------------


def test_parse_credentials_accepts_several_keys() -> None:
    text = f" {KEY_ID}:{SECRET} , {OTHER_KEY_ID}:sec:ret/+= "
    assert parse_credentials(text) == {KEY_ID: SECRET, OTHER_KEY_ID: "sec:ret/+="}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("topsecretvalue", "item 1 has no ':'"),
        ("AK1:topsecretvalue,", "item 2 is empty"),
        ("AK1:topsecretvalue,,AK2:topsecretvalue", "item 2 is empty"),
        ("AK1:", "item 1 has an empty secret"),
        ("AK1:top secretvalue", "item 1 has an empty secret or one containing spaces"),
        ("bad id!:topsecretvalue", "item 1 has an invalid key id"),
        ("AK1:topsecretvalue,AK1:topsecretvalue", "item 2 repeats the key id of item 1"),
    ],
)
def test_parse_credentials_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_credentials(text, source="api.credentials")
    message = str(info.value)
    assert message.startswith("api.credentials")
    assert problem in message
    assert "KEYID:SECRET" in message
    assert "topsecretvalue" not in message
    assert "\n" not in message
