"""The SigV4 verifier on any request: the signer's key id, or ``SignatureError`` (a 403).

Requests are signed by botocore, then one part is changed (or the parts are made up whole): the
verifier must never raise anything else, must accept what botocore signed unchanged, and must
refuse a changed method, path, query or body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import example, given
from hypothesis import strategies as st

from optsync.api.sigv4 import SignatureError, SignatureVerifier

KEY_ID = "AKIDFUZZ"
SECRET = "fuzz-secret/K7MDENG+bPxRfiCY"
VERIFIER = SignatureVerifier({KEY_ID: SECRET, "OTHER": "other"})
HOST = "127.0.0.1:8080"

Request = dict[str, Any]

LATIN1 = st.text(st.characters(max_codepoint=255), max_size=40)
"""What an ASGI server can hand over: header and target bytes decoded as latin-1."""
SEGMENTS = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4)
QUERIES = st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3)
BODIES = st.binary(max_size=200)


def sign(method: str, segments: list[str], query: list[tuple[str, str]], body: bytes) -> Request:
    """The request botocore signs, as the server receives it."""
    path = "/v1/" + "/".join(quote(s, safe="") for s in segments)
    encoded = urlencode(query, quote_via=quote)
    request = AWSRequest(
        method=method,
        url=f"http://{HOST}{path}" + (f"?{encoded}" if encoded else ""),
        data=body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(KEY_ID, SECRET), "mobiletargeting", "eu-west-1").add_auth(request)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    headers = [("host", parts.netloc)]
    for name, value in prepared.headers.items():
        headers.append(
            (name.lower(), value.decode("latin-1") if isinstance(value, bytes) else value)
        )
    headers.append(("content-length", str(len(body))))
    return {
        "method": method,
        "host": parts.netloc,
        "raw_path": parts.path,
        "raw_query": parts.query,
        "headers": headers,
        "body": body,
    }


def verify(request: Request) -> str | None:
    """The key id, or None when the verifier refused with its own error."""
    try:
        return VERIFIER.verify(**request)
    except SignatureError as exc:
        assert exc.code.endswith("Exception") and exc.message
        return None


REQUESTS = st.builds(
    sign, st.sampled_from(["GET", "PUT", "POST", "DELETE"]), SEGMENTS, QUERIES, BODIES
)


@given(REQUESTS)
def test_what_botocore_signs_verifies(request: Request) -> None:
    assert verify(request) == KEY_ID


@st.composite
def changed(draw: st.DrawFn) -> tuple[Request, Request, str]:
    """A signed request, a copy with one part changed, and which part."""
    signed = draw(REQUESTS)
    request = dict(signed)
    headers = list(request["headers"])
    part = draw(
        st.sampled_from(["method", "path", "query", "body", "header", "drop", "authorization"])
    )
    if part == "method":
        request["method"] = draw(st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH"]))
    elif part == "path":
        request["raw_path"] = draw(st.one_of(LATIN1, st.just(request["raw_path"] + "x")))
    elif part == "query":
        request["raw_query"] = draw(LATIN1)
    elif part == "body":
        request["body"] = draw(BODIES)
    elif part == "header":
        name = draw(st.one_of(st.sampled_from([n for n, _ in headers]), LATIN1))
        headers.append((name, draw(LATIN1)))
    elif part == "drop" and headers:
        headers.pop(draw(st.integers(0, len(headers) - 1)))
    elif part == "authorization":
        (index,) = [i for i, (n, _) in enumerate(headers) if n == "authorization"]
        value = headers[index][1]
        cut = draw(st.integers(0, len(value)))
        headers[index] = ("authorization", value[:cut] + draw(LATIN1) + value[cut + 1 :])
    request["headers"] = headers
    return signed, request, part


@given(changed())
def test_a_changed_request_is_refused_with_a_signature_error(
    case: tuple[Request, Request, str],
) -> None:
    signed, request, part = case
    key_id = verify(request)
    assert key_id in (KEY_ID, None)
    field = {"path": "raw_path", "query": "raw_query"}.get(part, part)
    if field in ("method", "raw_path", "raw_query", "body") and request[field] != signed[field]:
        assert key_id is None, f"a changed {part} verified: {request[field]!r}"


HEADERS = st.lists(
    st.tuples(
        st.one_of(
            st.sampled_from(["authorization", "x-amz-date", "host", "x-amz-content-sha256"]),
            LATIN1,
        ),
        st.one_of(
            LATIN1,
            st.builds(
                lambda date, rest: f"AWS4-HMAC-SHA256 Credential={KEY_ID}/{date}/{rest}",
                st.sampled_from([datetime.now(UTC).strftime("%Y%m%d"), "20260101", "99999999"]),
                LATIN1,
            ),
            st.sampled_from([datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"), "20261399T256161Z"]),
        ),
    ),
    max_size=6,
)


@given(
    method=st.one_of(st.sampled_from(["GET", "PUT"]), LATIN1),
    host=LATIN1,
    raw_path=LATIN1,
    raw_query=LATIN1,
    headers=HEADERS,
    body=BODIES,
)
@example(
    method="GET",
    host=HOST,
    raw_path="/v1/apps",
    raw_query="",
    headers=[
        ("authorization", f"AWS4-HMAC-SHA256 Credential={KEY_ID}/20260101/r/mobiletargeting/"),
        ("x-amz-date", "20260101T000000Z"),
    ],
    body=b"",
)
def test_any_request_is_verified_or_refused_with_a_signature_error(
    method: str,
    host: str,
    raw_path: str,
    raw_query: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    request = {
        "method": method,
        "host": host,
        "raw_path": raw_path,
        "raw_query": raw_query,
        "headers": headers,
        "body": body,
    }
    assert verify(request) is None  # nothing made up by chance carries a valid signature
