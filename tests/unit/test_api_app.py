"""The ASGI app in-process (httpx's ASGI transport): wire details that need no real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from optsync.api.app import MAX_PAYLOAD_BYTES, PinpointApi
from optsync.api.sigv4 import SignatureVerifier
from optsync.engine.sqlite import SQLiteStore
from optsync.metrics import Metrics

BASE = "http://testserver"


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    yield s
    s.close()


def call(app: PinpointApi, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def signed(method: str, path: str, body: bytes = b"", secret: str = "s3cret") -> dict[str, str]:
    request = AWSRequest(method=method, url=BASE + path, data=body)
    if body:
        request.headers["Content-Type"] = "application/json"
    SigV4Auth(Credentials("KEY1", secret), "mobiletargeting", "eu-west-1").add_auth(request)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}


def test_error_shape_and_request_id(store: SQLiteStore) -> None:
    response = call(PinpointApi(store, None), "GET", "/v1/apps/nope")
    assert response.status_code == 404
    assert response.headers["x-amzn-ErrorType"] == "NotFoundException"
    body = response.json()
    assert set(body) == {"Message", "RequestID"}
    assert body["RequestID"] == response.headers["x-amzn-RequestId"]
    assert "nope" in body["Message"]


def test_success_is_bare_payload_with_modelled_status(store: SQLiteStore) -> None:
    response = call(PinpointApi(store, None), "POST", "/v1/apps", json={"Name": "a"})
    assert response.status_code == 201
    assert response.json()["Name"] == "a"
    assert "ApplicationResponse" not in response.json()
    assert response.headers["x-amzn-RequestId"]


def test_invalid_json_is_400_naming_the_problem(store: SQLiteStore) -> None:
    response = call(PinpointApi(store, None), "POST", "/v1/apps", content=b"{not json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["Message"]


def test_payload_over_7mb_is_413(store: SQLiteStore) -> None:
    app = store.create_app("a")
    big = b'{"Item": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    response = call(PinpointApi(store, None), "PUT", f"/v1/apps/{app.id}/endpoints", content=big)
    assert response.status_code == 413
    assert response.headers["x-amzn-ErrorType"] == "PayloadTooLargeException"


def test_unknown_endpoint_field_is_named(store: SQLiteStore) -> None:
    app = store.create_app("a")
    response = call(
        PinpointApi(store, None),
        "PUT",
        f"/v1/apps/{app.id}/endpoints/e1",
        json={"ChannelType": "SMS", "OptOutt": "ALL"},
    )
    assert response.status_code == 400
    assert "OptOutt" in response.json()["Message"]


def test_signature_required_and_checked(store: SQLiteStore) -> None:
    app = PinpointApi(store, SignatureVerifier({"KEY1": "s3cret"}))
    unsigned = call(app, "GET", "/v1/apps")
    assert unsigned.status_code == 403
    assert unsigned.headers["x-amzn-ErrorType"] == "ForbiddenException"
    assert "MissingAuthenticationToken" in unsigned.json()["Message"]
    good = call(app, "GET", "/v1/apps", headers=signed("GET", "/v1/apps"))
    assert good.status_code == 200
    assert good.json() == {"Item": []}
    body = json.dumps({"Name": "signed"}).encode()
    created = call(app, "POST", "/v1/apps", content=body, headers=signed("POST", "/v1/apps", body))
    assert created.status_code == 201
    wrong = call(app, "GET", "/v1/apps", headers=signed("GET", "/v1/apps", secret="other"))
    assert wrong.status_code == 403
    assert "InvalidSignature" in wrong.json()["Message"]


def test_healthz_needs_no_signature(store: SQLiteStore) -> None:
    app = PinpointApi(store, SignatureVerifier({"KEY1": "s3cret"}))
    response = call(app, "GET", "/healthz")
    assert response.status_code == 200
    assert response.text == "ok\n"


def test_metrics_route_needs_no_signature_and_counts_requests(store: SQLiteStore) -> None:
    app = PinpointApi(store, SignatureVerifier({"KEY1": "s3cret"}), Metrics())
    assert call(app, "GET", "/v1/apps").status_code == 403  # unsigned
    response = call(app, "GET", "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'optsync_api_requests_total{route="GET /v1/apps",status="403"} 1.0' in response.text
    without = call(PinpointApi(store, None), "GET", "/metrics")
    assert without.status_code == 404
