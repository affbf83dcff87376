"""The API on any request: a modelled answer in Pinpoint's shape, never a 500.

Requests go through the whole ASGI app in-process (routing on the raw path, body reading,
SigV4, the JSON readers of ``api.wire``, the engine on SQLite), signed by botocore as a boto3
client signs them, so a refusal is the parser's and not the signature check's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from fuzz_strategies import JSON, TEXT
from hypothesis import example, given
from hypothesis import strategies as st

from optsync.api.app import ROUTER, PinpointApi
from optsync.api.sigv4 import SignatureVerifier
from optsync.api.wire import ENDPOINT_REQUEST_FIELDS
from optsync.engine.sqlite import SQLiteStore

KEY_ID, SECRET = "AKIDFUZZ", "fuzz-secret"
HOST = "testserver"
ANSWERS = {200, 201, 202, 400, 403, 404, 405, 409, 413, 429}
"""The statuses Pinpoint's model gives its operations (no 5xx: the engine is up)."""


class Api:
    """The app over one in-memory store with one app in it."""

    def __init__(self) -> None:
        self.store = SQLiteStore(":memory:")
        self.app_id = self.store.create_app("fuzz").id
        self.app = PinpointApi(self.store, SignatureVerifier({KEY_ID: SECRET}))

    def ask(
        self, method: str, path: str, body: bytes = b"", query: str = "", *, sign: bool = True
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through the ASGI app: status, headers, body."""
        headers: list[tuple[str, str]] = [("host", HOST), ("content-length", str(len(body)))]
        raw_path = path
        if sign:
            url = f"http://{HOST}{path}" + (f"?{query}" if query else "")
            request = AWSRequest(method=method, url=url, data=body)
            request.headers["Content-Type"] = "application/json"
            SigV4Auth(Credentials(KEY_ID, SECRET), "mobiletargeting", "us-east-1").add_auth(request)
            prepared = request.prepare()
            parts = urlsplit(prepared.url)
            raw_path, query = parts.path, parts.query
            for name, value in prepared.headers.items():
                text = value.decode("latin-1") if isinstance(value, bytes) else value
                headers.append((name.lower(), text))
        scope = {
            "type": "http",
            "method": method,
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("latin-1", "replace"),
            "query_string": query.encode("latin-1", "replace"),
            "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers],
            "root_path": "",
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        start, answer = sent
        names = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return start["status"], names, answer["body"]


@pytest.fixture(scope="module")
def api() -> Iterator[Api]:
    api = Api()
    yield api
    api.store.close()


def check(answer: tuple[int, dict[str, str], bytes]) -> Any:
    """A modelled status; an error in Pinpoint's shape. The decoded body."""
    status, headers, body = answer
    payload = json.loads(body)
    assert status in ANSWERS, f"{status}: {payload}"
    assert headers["x-amzn-requestid"]
    if status >= 400:
        assert headers["x-amzn-errortype"].endswith("Exception")
        assert set(payload) == {"Message", "RequestID"}
        assert payload["Message"]
    return payload


SEGMENT = st.one_of(
    TEXT.filter(bool),
    st.sampled_from(["%2F", "%", "%zz", "..", ".", "%00", "a%2Fb", "\u00e9", "~", "+"]),
)


@st.composite
def paths(draw: st.DrawFn, app_id: str) -> tuple[str, str]:
    """A method and a path built from a route, its fields filled with the app's id or any
    text (percent-encoded or raw), now and then with one more or one fewer segment."""
    route = draw(st.sampled_from(ROUTER.routes))
    parts = []
    for part in route.template.strip("/").split("/"):
        if part.startswith("{"):
            text = app_id if part == "{app}" and draw(st.booleans()) else draw(SEGMENT)
            parts.append(
                quote(text, safe="%", errors="surrogatepass")
                if draw(st.booleans())
                else quote(text, safe="", errors="surrogatepass")
            )
        else:
            parts.append(part)
    shape = draw(st.sampled_from(["as-is", "longer", "shorter", "slash"]))
    if shape == "longer":
        parts.append(draw(SEGMENT.map(lambda s: quote(s, safe="", errors="surrogatepass"))))
    elif shape == "shorter":
        parts.pop()
    path = "/" + "/".join(parts) + ("/" if shape == "slash" else "")
    method = draw(st.one_of(st.just(route.method), st.sampled_from(["GET", "PUT", "POST"])))
    return method, path


@given(st.data())
def test_any_path_and_method(api: Api, data: st.DataObject) -> None:
    method, path = data.draw(paths(api.app_id))
    check(api.ask(method, path))


ENDPOINT_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "Address": st.one_of(st.sampled_from(["+12065550100", "a@example.com"]), JSON),
    "ChannelType": st.one_of(st.sampled_from(["SMS", "EMAIL", "VOICE", "sms", "PUSH"]), JSON),
    "OptOut": st.one_of(st.sampled_from(["ALL", "NONE", "all"]), JSON),
    "EndpointStatus": st.one_of(st.sampled_from(["ACTIVE", "INACTIVE"]), JSON),
    "EffectiveDate": st.one_of(st.sampled_from(["2026-01-01T00:00:00Z"]), JSON),
    "Attributes": st.one_of(st.dictionaries(TEXT, st.lists(TEXT, max_size=3), max_size=3), JSON),
    "User": st.one_of(
        st.fixed_dictionaries(
            {}, optional={"UserId": st.one_of(TEXT, JSON), "UserAttributes": JSON}
        ),
        JSON,
    ),
    "Location": st.one_of(
        st.fixed_dictionaries(
            {},
            optional={
                "Country": st.one_of(TEXT, JSON),
                "Latitude": st.one_of(st.floats(allow_nan=False, allow_infinity=False), JSON),
            },
        ),
        JSON,
    ),
    "Demographic": st.one_of(st.fixed_dictionaries({}, optional={"Platform": TEXT}), JSON),
    "Metrics": st.one_of(st.dictionaries(TEXT, st.floats(allow_nan=False), max_size=2), JSON),
    "RequestId": JSON,
    "Unknown": JSON,
}
assert set(ENDPOINT_FIELD_VALUES) - {"Unknown"} <= ENDPOINT_REQUEST_FIELDS
ENDPOINT_REQUESTS = st.fixed_dictionaries({}, optional=ENDPOINT_FIELD_VALUES)


def body_bytes(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


@given(ENDPOINT_REQUESTS, TEXT.filter(bool))
@example({"Address": "+12065550100", "ChannelType": "SMS", "User": {"UserId": "\ud800"}}, "e")
@example({"Attributes": {"a": ["\x00"]}, "ChannelType": "SMS", "Address": "+12065550100"}, "e")
def test_update_endpoint_with_any_request(api: Api, request: dict[str, Any], name: str) -> None:
    path = f"/v1/apps/{api.app_id}/endpoints/{quote(name, safe='', errors='surrogatepass')}"
    check(api.ask("PUT", path, body_bytes(request)))


@given(
    st.one_of(
        st.fixed_dictionaries(
            {
                "Item": st.lists(
                    st.one_of(
                        ENDPOINT_REQUESTS.flatmap(
                            lambda r: st.fixed_dictionaries({"Id": st.one_of(TEXT, JSON)}).map(
                                lambda i: {**r, **i}
                            )
                        ),
                        JSON,
                    ),
                    max_size=4,
                )
            }
        ),
        JSON,
    )
)
def test_update_endpoints_batch_with_any_request(api: Api, body: Any) -> None:
    check(api.ask("PUT", f"/v1/apps/{api.app_id}/endpoints", body_bytes(body)))


WRITES = [
    ("POST", "/v1/apps"),
    ("PUT", "/v1/apps/{app}/channels/sms"),
    ("PUT", "/v1/apps/{app}/channels/email"),
    ("POST", "/v1/apps/{app}/segments"),
    ("POST", "/v1/apps/{app}/opt-outs"),
    ("POST", "/v1/phone/number/validate"),
]


@given(st.sampled_from(WRITES), JSON)
def test_other_writes_with_any_json(api: Api, route: tuple[str, str], body: Any) -> None:
    method, template = route
    check(api.ask(method, template.format(app=api.app_id), body_bytes(body)))


@given(st.sampled_from(WRITES), st.binary(max_size=100))
@example(("POST", "/v1/apps"), b"[" * 100_000)
@example(("POST", "/v1/apps"), b'{"Name": ' + b"9" * 5_000 + b"}")
@example(("POST", "/v1/apps"), b'{"Name": "\\udc00"}')
def test_writes_with_any_bytes(api: Api, route: tuple[str, str], body: bytes) -> None:
    method, template = route
    check(api.ask(method, template.format(app=api.app_id), body))


@given(
    st.sampled_from(["/v1/apps", "/v1/apps/{app}/segments"]),
    st.lists(st.tuples(st.sampled_from(["page-size", "token", "x"]), TEXT), max_size=3),
)
def test_list_queries(api: Api, template: str, query: list[tuple[str, str]]) -> None:
    encoded = "&".join(
        f"{quote(k, errors='surrogatepass')}={quote(v, safe='', errors='surrogatepass')}"
        for k, v in query
    )
    check(api.ask("GET", template.format(app=api.app_id), query=encoded))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 100_000, "too deeply"),
        (b'{"Name": "\\udc00"}', "lone UTF-16 surrogate"),
        (b'{"Name": ' + b"9" * 5_000 + b"}", "not valid JSON"),
    ],
)
def test_bodies_python_cannot_hold_are_400(api: Api, body: bytes, words: str) -> None:
    """Found by the fuzzer: the first two were 500s (RecursionError; UnicodeEncodeError in the
    engine's database)."""
    status, headers, answer = api.ask("POST", "/v1/apps", body)
    assert status == 400
    assert headers["x-amzn-errortype"] == "BadRequestException"
    assert words in json.loads(answer)["Message"]
