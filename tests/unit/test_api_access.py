"""Scoped keys in the API, in-process: which routes a scoped or read-only key may call, and that
the check runs before any handler (nothing is written when it refuses)."""

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

from optsync.api.access import FULL_ACCESS, Access, authorize
from optsync.api.app import ROUTER, PinpointApi
from optsync.api.errors import ApiError
from optsync.api.sigv4 import SignatureVerifier
from optsync.engine.api_keys import ApiKey
from optsync.engine.sqlite import SQLiteStore

BASE = "http://testserver"
FULL_ID, FULL_SECRET = "FULLKEY", "full-secret"


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    yield s
    s.close()


def call(
    store: SQLiteStore, key: ApiKey | None, method: str, path: str, body: Any = None
) -> httpx.Response:
    data = json.dumps(body).encode() if body is not None else b""
    request = AWSRequest(method=method, url=BASE + path, data=data)
    if data:
        request.headers["Content-Type"] = "application/json"
    key_id, secret = (key.key_id, key.secret) if key else (FULL_ID, FULL_SECRET)
    SigV4Auth(Credentials(key_id, secret), "mobiletargeting", "us-east-1").add_auth(request)
    headers = {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
    api = PinpointApi(store, SignatureVerifier({FULL_ID: FULL_SECRET}))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            return await client.request(method, path, content=data, headers=headers)

    return asyncio.run(go())


def denied(response: httpx.Response, fragment: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["x-amzn-ErrorType"] == "AccessDeniedException"
    assert fragment in response.json()["Message"]


def test_every_app_route_is_checked_against_the_keys_apps() -> None:
    scoped = Access("K", frozenset({"mine"}))
    for route in ROUTER.routes:
        params = {"app": "theirs", "endpoint": "e", "segment": "s", "version": "1", "user": "u"}
        if "{app}" in route.template:
            with pytest.raises(ApiError) as excinfo:
                authorize(scoped, route.method, route.template, params)
            assert excinfo.value.code == "AccessDeniedException"
            authorize(scoped, route.method, route.template, {**params, "app": "mine"})
        authorize(FULL_ACCESS, route.method, route.template, params)


def test_read_only_allows_reads_and_phone_validation_only() -> None:
    reader = Access("R", None, read_only=True)
    for route in ROUTER.routes:
        params = {"app": "a", "endpoint": "e", "segment": "s", "version": "1", "user": "u"}
        reads = route.method == "GET" or route.template == "/v1/phone/number/validate"
        if reads:
            authorize(reader, route.method, route.template, params)
        else:
            with pytest.raises(ApiError, match="read-only"):
                authorize(reader, route.method, route.template, params)


def test_a_scoped_key_writes_its_app_only(store: SQLiteStore) -> None:
    mine, theirs = store.create_app("mine").id, store.create_app("theirs").id
    key = store.create_api_key([mine], read_only=False)
    endpoint = {"Address": "+12065550100", "ChannelType": "SMS"}
    assert call(store, key, "PUT", f"/v1/apps/{mine}/endpoints/e1", endpoint).status_code == 202
    denied(call(store, key, "PUT", f"/v1/apps/{theirs}/endpoints/e1", endpoint), "scoped to")
    assert store.count_endpoints(theirs) == 0
    denied(call(store, key, "POST", "/v1/apps", {"Name": "new"}), "full-access key")
    listed = call(store, key, "GET", "/v1/apps").json()["Item"]
    assert [a["Id"] for a in listed] == [mine]
    everything = call(store, None, "GET", "/v1/apps").json()["Item"]
    assert {a["Id"] for a in everything} == {mine, theirs}


def test_get_apps_leaves_out_a_deleted_app_of_the_key(store: SQLiteStore) -> None:
    kept, gone = store.create_app("kept").id, store.create_app("gone").id
    key = store.create_api_key([gone, kept], read_only=True)
    store.delete_app(gone)
    assert [a["Id"] for a in call(store, key, "GET", "/v1/apps").json()["Item"]] == [kept]


def test_a_read_only_key_cannot_write(store: SQLiteStore) -> None:
    app = store.create_app("a").id
    key = store.create_api_key([app], read_only=True)
    endpoint = {"Address": "+12065550100", "ChannelType": "SMS"}
    denied(call(store, key, "PUT", f"/v1/apps/{app}/endpoints/e1", endpoint), "read-only")
    assert store.count_endpoints(app) == 0
    assert call(store, key, "GET", f"/v1/apps/{app}").status_code == 200


def test_a_revoked_key_is_refused_by_the_next_request(store: SQLiteStore) -> None:
    app = store.create_app("a").id
    key = store.create_api_key([app], read_only=False)
    assert call(store, key, "GET", f"/v1/apps/{app}").status_code == 200
    store.revoke_api_key(key.key_id)
    response = call(store, key, "GET", f"/v1/apps/{app}")
    assert response.status_code == 403
    assert response.headers["x-amzn-ErrorType"] == "ForbiddenException"
    assert "revoked" in response.json()["Message"]


def test_a_scoped_key_with_a_wrong_secret_is_refused(store: SQLiteStore) -> None:
    app = store.create_app("a").id
    key = store.create_api_key([app], read_only=False)
    forged = ApiKey(key.key_id, "not-the-secret", key.app_ids, False, key.created_at)
    response = call(store, forged, "GET", f"/v1/apps/{app}")
    assert response.status_code == 403
    assert "mismatch" in response.json()["Message"]
