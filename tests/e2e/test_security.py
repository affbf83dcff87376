"""The API's security as an attacker meets it, against a real ``optsync serve``.

SigV4: unsigned, wrongly signed, expired or early (clock skew over 5 minutes), replayed with
another body, another query or another Host, and signed for another service: all 403, and
nothing written. SQL and path tricks in endpoint ids, attribute names and segment filters are
stored and matched as data. Bodies over Pinpoint's 7 MB are answered 413 before the server has
read them whole. (The console, preference center and log checks are in test_security_web.py.)
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import botocore.auth
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from pinpoint_e2e import KEY_ID, REGION, SECRET, Server, Signed, sms

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

MAX_PAYLOAD = 7 * 1024 * 1024


def signed_headers(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    secret: str = SECRET,
    service: str = "mobiletargeting",
) -> dict[str, str]:
    """The headers botocore's signer adds for this request."""
    request = AWSRequest(method=method, url=url, data=body)
    if body:
        request.headers["Content-Type"] = "application/json"
    SigV4Auth(Credentials(KEY_ID, secret), service, REGION).add_auth(request)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}


def refused(response: httpx.Response, *fragments: str) -> str:
    """Assert a 403 in Pinpoint's error shape whose message holds each fragment."""
    assert response.status_code == 403, response.text
    assert response.headers["x-amzn-ErrorType"] == "ForbiddenException"
    message: str = response.json()["Message"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def endpoint_exists(pinpoint: PinpointClient, app_id: str, endpoint_id: str) -> bool:
    try:
        pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
    except pinpoint.exceptions.NotFoundException:
        return False
    return True


# SigV4 --------------------------------------------------------------------------------------


def test_unsigned_requests_are_refused(server: Server, app_id: str) -> None:
    body = json.dumps(sms("+12065550140")).encode()
    url = f"{server.url}/v1/apps/{app_id}/endpoints/unsigned"
    refused(httpx.put(url, content=body, timeout=10), "MissingAuthenticationToken")
    refused(httpx.get(f"{server.url}/v1/apps", timeout=10), "Authorization")


def test_a_wrong_secret_is_refused_and_writes_nothing(
    server: Server, pinpoint: PinpointClient, app_id: str
) -> None:
    url = f"{server.url}/v1/apps/{app_id}/endpoints/forged"
    body = json.dumps(sms("+12065550141")).encode()
    headers = signed_headers("PUT", url, body, secret="not-the-secret")
    message = refused(httpx.put(url, content=body, headers=headers, timeout=10), "mismatch")
    assert "not-the-secret" not in message
    assert not endpoint_exists(pinpoint, app_id, "forged")


@pytest.mark.parametrize(
    ("shift", "problem"),
    [
        (-timedelta(minutes=6), "Signature expired"),
        (timedelta(minutes=6), "Signature not yet current"),
    ],
)
def test_a_signature_over_5_minutes_off_is_refused(
    server: Server,
    pinpoint: PinpointClient,
    app_id: str,
    monkeypatch: pytest.MonkeyPatch,
    shift: timedelta,
    problem: str,
) -> None:
    url = f"{server.url}/v1/apps/{app_id}/endpoints/late"
    body = json.dumps(sms("+12065550142")).encode()
    # The client's clock (botocore's), not the server's: the server keeps the real time.
    with monkeypatch.context() as patched:
        patched.setattr(botocore.auth, "get_current_datetime", lambda: datetime.now(UTC) + shift)
        headers = signed_headers("PUT", url, body)
    refused(httpx.put(url, content=body, headers=headers, timeout=10), problem, "5 minutes")
    assert not endpoint_exists(pinpoint, app_id, "late")


def test_a_signature_4_minutes_old_is_still_accepted(
    server: Server, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{server.url}/v1/apps/{app_id}"
    then = datetime.now(UTC) - timedelta(minutes=4)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: then)
    response = httpx.get(url, headers=signed_headers("GET", url), timeout=10)
    assert response.status_code == 200, response.text


def test_a_captured_request_replayed_with_another_body_is_refused(
    server: Server, pinpoint: PinpointClient, app_id: str
) -> None:
    url = f"{server.url}/v1/apps/{app_id}/endpoints/victim"
    first = json.dumps(sms("+12065550143")).encode()
    headers = signed_headers("PUT", url, first)
    assert httpx.put(url, content=first, headers=headers, timeout=10).status_code == 202
    # The same headers (signature, date, X-Amz-Content-SHA256) with an opt-in slipped in.
    forged = json.dumps({"OptOut": "ALL", "Address": "+12065550199"}).encode()
    refused(httpx.put(url, content=forged, headers=headers, timeout=10))
    got = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="victim")["EndpointResponse"]
    assert (got["Address"], got["OptOut"]) == ("+12065550143", "NONE")


def test_a_captured_request_replayed_with_another_query_or_host_is_refused(
    server: Server, app_id: str
) -> None:
    url = f"{server.url}/v1/apps/{app_id}/segments"
    headers = signed_headers("GET", url)
    assert httpx.get(url, headers=headers, timeout=10).status_code == 200
    refused(httpx.get(url + "?page-size=1", headers=headers, timeout=10), "mismatch")
    port = urlsplit(server.url).port
    moved = {**headers, "Host": f"localhost:{port}"}
    refused(httpx.get(url, headers=moved, timeout=10), "mismatch")


@pytest.mark.parametrize("service", ["pinpoint", "s3", "sms-voice"])
def test_a_signature_for_another_service_is_refused(
    server: Server, app_id: str, service: str
) -> None:
    url = f"{server.url}/v1/apps/{app_id}"
    headers = signed_headers("GET", url, service=service)
    refused(httpx.get(url, headers=headers, timeout=10), f"service '{service}'", "mobiletargeting")


def test_an_unsigned_payload_header_is_refused(server: Server, app_id: str) -> None:
    url = f"{server.url}/v1/apps/{app_id}/endpoints/unsigned-payload"
    request = AWSRequest(method="PUT", url=url, data=b"{}")
    request.headers["X-Amz-Content-SHA256"] = "UNSIGNED-PAYLOAD"
    SigV4Auth(Credentials(KEY_ID, SECRET), "mobiletargeting", REGION).add_auth(request)
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
    body = json.dumps(sms("+12065550144")).encode()
    refused(httpx.put(url, content=body, headers=headers, timeout=10), "not signed")


# SQL and path tricks are data ---------------------------------------------------------------

TRICKY_IDS = [
    "x' OR '1'='1",
    "1; DROP TABLE endpoints; --",
    '"); DELETE FROM apps; --',
    "../../../etc/passwd",
    "..",
    ".",
    "a/b/../c",
    "%2e%2e",
    "50%_off",
    "null\\u0000byte",
]


def encoded(endpoint_id: str) -> str:
    """The id as one path segment: ``/`` and ``.`` percent-encoded too (clients would remove a
    ``..`` segment before sending it)."""
    return quote(endpoint_id, safe="").replace(".", "%2E")


def test_endpoint_ids_with_sql_or_path_tricks_are_stored_as_given(
    signed: Signed, pinpoint: PinpointClient, app_id: str
) -> None:
    for n, endpoint_id in enumerate(TRICKY_IDS):
        path = f"/v1/apps/{app_id}/endpoints/{encoded(endpoint_id)}"
        body = json.dumps(sms(f"+1206555{n:04d}")).encode()
        response = signed.request("PUT", path, body)
        assert response.status_code == 202, (endpoint_id, response.text)
    for n, endpoint_id in enumerate(TRICKY_IDS):
        got = signed.get_json(f"/v1/apps/{app_id}/endpoints/{encoded(endpoint_id)}")
        assert (got["Id"], got["Address"]) == (endpoint_id, f"+1206555{n:04d}")
    # No statement ran: every endpoint is there once, and the app (and others) still exist.
    segment = pinpoint.create_segment(
        ApplicationId=app_id, WriteSegmentRequest={"Name": "everyone"}
    )["SegmentResponse"]["Id"]
    assert signed.estimate(app_id, segment) == (len(TRICKY_IDS), len(TRICKY_IDS))
    assert pinpoint.get_apps()["ApplicationsResponse"]["Item"]


def test_a_path_trick_reaches_no_other_route(signed: Signed, app_id: str) -> None:
    body = json.dumps(sms("+12065550145")).encode()
    assert signed.request("PUT", f"/v1/apps/{app_id}/endpoints/plain", body).status_code == 202
    for path in (
        f"/v1/apps/{app_id}/endpoints/..%2F..%2F{app_id}",
        f"/v1/apps/{app_id}/endpoints/plain%2F..%2F..%2Fsegments",
        f"/v1/apps/{app_id}/endpoints/plain%00",
    ):
        response = signed.request("GET", path)
        assert response.status_code == 404, (path, response.text)
        assert response.headers["x-amzn-ErrorType"] == "NotFoundException"


def send_raw(server: Server, path: str) -> tuple[int, dict[str, Any]]:
    """GET ``path`` signed by botocore, sent as given (httpx would remove dot segments first)."""
    headers = signed_headers("GET", f"{server.url}{path}")
    conn = http.client.HTTPConnection(urlsplit(server.url).netloc, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_dot_segments_the_signature_does_not_cover_are_refused(
    server: Server, pinpoint: PinpointClient, app_id: str
) -> None:
    """botocore signs a path with ``.``, ``..`` and ``//`` removed, while the router reads the
    path as sent: GetEndpoint of id ``consent-history``, signed, must not be served as the
    consent history of endpoint ``.``."""
    pinpoint.update_endpoint(
        ApplicationId=app_id, EndpointId="consent-history", EndpointRequest=sms("+12065550148")
    )
    status, body = send_raw(server, f"/v1/apps/{app_id}/endpoints/./consent-history")
    assert status == 403, body
    assert "'.' or '..' segments" in body["Message"]
    other = pinpoint.create_app(CreateApplicationRequest={"Name": "dots"})["ApplicationResponse"]
    try:
        for path in (
            f"/v1/apps/{other['Id']}/../{app_id}/segments",
            f"/v1/apps/{app_id}/endpoints/x/../consent-history",
            f"/v1//apps/{app_id}/segments",
        ):
            status, body = send_raw(server, path)
            assert status in (403, 404), (path, body)  # no route, or refused: never served
    finally:
        pinpoint.delete_app(ApplicationId=other["Id"])


def test_attribute_names_and_segment_filters_holding_sql_are_matched_as_data(
    signed: Signed, pinpoint: PinpointClient, app_id: str
) -> None:
    name = "n') OR 1=1; DROP TABLE endpoints; --"
    value = "v' OR 'a'='a"
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="holder",
        EndpointRequest=sms("+12065550146", Attributes={name: [value]}),
    )
    pinpoint.update_endpoint(
        ApplicationId=app_id,
        EndpointId="bystander",
        EndpointRequest=sms("+12065550147", Attributes={"plain": ["v"]}),
    )
    got = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId="holder")["EndpointResponse"]
    assert got["Attributes"] == {name: [value]}

    def estimate(attribute: str, values: list[str]) -> tuple[int, int]:
        request: Any = {
            "Name": "tricky",
            "Dimensions": {
                "Attributes": {attribute: {"AttributeType": "INCLUSIVE", "Values": values}}
            },
        }
        segment = pinpoint.create_segment(ApplicationId=app_id, WriteSegmentRequest=request)
        return signed.estimate(app_id, segment["SegmentResponse"]["Id"])

    assert estimate(name, [value]) == (1, 1)
    assert estimate("plain", ["' OR '1'='1"]) == (0, 0)
    assert estimate("plain' OR '1'='1", ["v"]) == (0, 0)
    assert estimate("plain", ["v%"]) == (0, 0)  # a LIKE wildcard is a character here
    assert estimate("plain", ["v"]) == (1, 1)


# Payload limits -----------------------------------------------------------------------------


def _status_line(sock: socket.socket) -> str:
    sock.settimeout(10)
    received = b""
    while b"\r\n" not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0].decode("latin-1")


def test_a_declared_body_over_7_mb_is_refused_before_it_is_sent(
    server: Server, app_id: str
) -> None:
    """Content-Length says 8 MB; only the headers go out, and 413 comes back at once."""
    address = urlsplit(server.url)
    assert address.hostname and address.port
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            f"PUT /v1/apps/{app_id}/endpoints HTTP/1.1\r\nHost: {address.netloc}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {8 * 1024 * 1024}\r\n\r\n"
            "{".encode()
        )
        started = time.monotonic()
        line = _status_line(sock)
    assert line.startswith("HTTP/1.1 413"), line
    assert time.monotonic() - started < 5


def test_a_chunked_body_over_7_mb_is_cut_off_while_it_streams(server: Server, app_id: str) -> None:
    """No Content-Length: the server counts the chunks and answers 413 past 7 MB, while the
    client still holds most of a 64 MB body. The client never blocks on a send, so it sees the
    answer as soon as it comes."""
    address = urlsplit(server.url)
    assert address.hostname and address.port
    piece = b"x" * (256 * 1024)
    body = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * 256  # 64 MB in chunks
    sent = 0
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(
            f"PUT /v1/apps/{app_id}/endpoints HTTP/1.1\r\nHost: {address.netloc}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.setblocking(False)
        view = memoryview(body)
        deadline = time.monotonic() + 60
        while sent < len(body) and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                try:
                    sent += sock.send(view[sent : sent + 65536])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
        sock.setblocking(True)
        line = _status_line(sock)
    assert line.startswith("HTTP/1.1 413"), line
    assert MAX_PAYLOAD < sent < len(body) // 2, sent
