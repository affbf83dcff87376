"""Verify AWS Signature Version 4 on incoming Pinpoint API requests.

The canonical request and string to sign come from botocore's own ``SigV4Auth``, fed with the
request exactly as it arrived (raw percent-encoded path, raw query, the signed headers, the body
bytes), so the server computes what the client computed. The signing key (SigV4's HMAC chain over
date, region and service) is derived once per key and day and kept, as clients do.

A session token (``X-Amz-Security-Token``) is accepted without checking it against any STS: the
access key id and its secret alone authenticate the caller. A key id the verifier does not hold
is asked of ``lookup`` (the engine's scoped keys), once per request. The clock may differ from
the client's by 5 minutes, as AWS allows, so a captured request cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from urllib.parse import urlsplit

from botocore.auth import SIGNED_HEADERS_BLACKLIST, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import remove_dot_segments

from optsync.credentials import KEY_ID

__all__ = (
    "SignatureError",
    "SignatureErrorCode",
    "SignatureVerifier",
)

logger = logging.getLogger(__name__)

_ALGORITHM = "AWS4-HMAC-SHA256"
_TERMINATOR = "aws4_request"
_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_AUTHORIZATION_FORM = (
    f"'{_ALGORITHM} Credential=KEYID/YYYYMMDD/REGION/SERVICE/{_TERMINATOR}, "
    "SignedHeaders=host;x-amz-date, Signature=<64 hex digits>'"
)

_SCOPE_NAME = re.compile(r"[A-Za-z0-9\-]{1,63}")  # region and service, as botocore allows them
_DATE = re.compile(r"[0-9]{8}")
_TIMESTAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # an RFC 9110 token, lower-case
_UNSIGNABLE = frozenset(SIGNED_HEADERS_BLACKLIST)  # botocore's signer leaves these out


class SignatureErrorCode(StrEnum):
    """Pinpoint's error types for a request that fails authentication (all HTTP 403)."""

    # An error type name, not a password.
    MISSING_AUTHENTICATION_TOKEN = "MissingAuthenticationTokenException"  # noqa: S105
    UNRECOGNIZED_CLIENT = "UnrecognizedClientException"
    INVALID_SIGNATURE = "InvalidSignatureException"


class SignatureError(Exception):
    """A request failed SigV4 verification; the message says what is wrong and how to fix it."""

    def __init__(self, code: SignatureErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: str = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 ...`` header."""

    key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SignatureVerifier:
    """Check SigV4 signatures against a fixed set of access keys (and ``lookup``), for any
    region."""

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        service: str = "mobiletargeting",
        max_skew: timedelta = timedelta(minutes=5),
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """``clock`` must return a timezone-aware datetime."""
        if max_skew <= timedelta(0):
            raise ValueError(f"max_skew must be positive, got {max_skew}")
        self._keys = dict(keys)
        self._service = service
        self._max_skew = max_skew
        self._clock = clock

    def verify(
        self,
        *,
        method: str,
        host: str,
        raw_path: str,
        raw_query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        lookup: Callable[[str], str | None] | None = None,
    ) -> str:
        """Return the access key id that signed the request, or raise ``SignatureError``.

        ``raw_path`` and ``raw_query`` are the request target as received, still percent-encoded.
        ``lookup`` gives the secret of a key id this verifier does not hold (None: unknown); it
        may raise ``SignatureError`` itself (a revoked key).
        """
        try:
            key_id = self._verify(method, host, raw_path, raw_query, headers, body, lookup)
        except SignatureError as exc:
            logger.debug(
                "sigv4 rejected code=%s method=%s reason=%r", exc.code, method, exc.message
            )
            raise
        logger.debug("sigv4 verified access_key_id=%s method=%s", key_id, method)
        return key_id

    def _verify(
        self,
        method: str,
        host: str,
        raw_path: str,
        raw_query: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        lookup: Callable[[str], str | None] | None,
    ) -> str:
        fields: dict[str, list[str]] = {}
        for name, value in headers:
            fields.setdefault(name.lower(), []).append(value)

        authorization = _parse_authorization(fields.get("authorization", []))
        secret = self._keys.get(authorization.key_id)
        if secret is None and lookup is not None:
            secret = lookup(authorization.key_id)
        if secret is None:
            raise SignatureError(
                SignatureErrorCode.UNRECOGNIZED_CLIENT,
                f"Unknown access key id {authorization.key_id}: sign with a key configured on "
                "the server (OPTSYNC_API_CREDENTIALS) or one made by `optsync keys create`",
            )
        if authorization.service != self._service:
            raise _invalid(
                f"Credential is scoped to service '{authorization.service}' but this API is "
                f"'{self._service}': sign with service name '{self._service}' "
                "(boto3.client('pinpoint') does)"
            )

        x_amz_date = self._check_date(fields.get("x-amz-date", []), authorization.date)

        signed: dict[str, str] = {}
        for name in authorization.signed_headers:
            values = fields.get(name)
            if values is None:
                raise _invalid(
                    f"Signed header {name} is missing from the request; make sure no proxy "
                    "drops or renames it"
                )
            # SigV4 joins repeated headers with ',' after trimming each value.
            signed[name] = ",".join(value.strip() for value in values)
        _check_content_sha256(signed.get("x-amz-content-sha256"), body)

        # http:// on purpose: botocore then always hashes the body itself.
        url = f"http://{host}{raw_path}" + (f"?{raw_query}" if raw_query else "")
        _check_url_round_trip(url, host, raw_path, raw_query)

        unsignable = _UNSIGNABLE.intersection(authorization.signed_headers)
        if unsignable:
            raise _invalid(
                f"SignedHeaders lists {', '.join(sorted(unsignable))}, which botocore's signer "
                "never signs (hop-by-hop and tracing headers, user-agent); sign without them"
            )

        request = AWSRequest(method=method, url=url, headers=signed, data=body)
        request.context["timestamp"] = x_amz_date
        token_values = fields.get("x-amz-security-token")
        token = token_values[0] if token_values else None
        # The region is only an input to the signing key; any region the client chose is fine.
        auth = SigV4Auth(
            Credentials(authorization.key_id, secret, token), self._service, authorization.region
        )
        canonical_request = auth.canonical_request(request)
        string_to_sign = auth.string_to_sign(request, canonical_request)
        key = _signing_key(secret, authorization.date, authorization.region, self._service)
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, authorization.signature):
            logger.debug(
                "sigv4 mismatch access_key_id=%s canonical_request=%r",
                authorization.key_id,
                _redact_token(canonical_request),
            )
            raise _invalid(
                f"Signature mismatch for access key id {authorization.key_id}: the signature "
                "does not match the one computed from the method, raw path, query, signed "
                "headers and body; check the client's secret for this key and that no proxy "
                "rewrites the Host header, path, query or body"
            )
        return authorization.key_id

    def _check_date(self, values: list[str], scope_date: str) -> str:
        """Return X-Amz-Date after checking its form, its scope date and the clock skew."""
        if len(values) != 1:
            raise _invalid(
                "Missing X-Amz-Date header: SigV4 requests must carry exactly one X-Amz-Date "
                "(YYYYMMDDTHHMMSSZ, UTC)"
                if not values
                else "More than one X-Amz-Date header: send exactly one"
            )
        x_amz_date = values[0].strip()
        try:
            if not _TIMESTAMP.fullmatch(x_amz_date):
                raise ValueError(x_amz_date)
            # The form is checked above; datetime() refuses what is out of range, as strptime does.
            signed_at = datetime(
                int(x_amz_date[0:4]),
                int(x_amz_date[4:6]),
                int(x_amz_date[6:8]),
                int(x_amz_date[9:11]),
                int(x_amz_date[11:13]),
                int(x_amz_date[13:15]),
                tzinfo=UTC,
            )
        except ValueError:
            raise _invalid(
                "Malformed X-Amz-Date header: expected YYYYMMDDTHHMMSSZ in UTC, "
                "e.g. 20260101T000000Z"
            ) from None
        if x_amz_date[:8] != scope_date:
            raise _invalid(
                f"Credential date {scope_date} does not match X-Amz-Date {x_amz_date}: the "
                "credential scope must use the UTC date of X-Amz-Date; sign the request again"
            )
        now = self._clock().astimezone(UTC)
        drift = now - signed_at
        if abs(drift) > self._max_skew:
            problem = "Signature expired" if drift > timedelta(0) else "Signature not yet current"
            raise _invalid(
                f"{problem}: X-Amz-Date {x_amz_date} is more than {_describe(self._max_skew)} "
                f"from the server time {now.strftime(_TIMESTAMP_FORMAT)}; check the client's clock"
            )
        return x_amz_date


@lru_cache(maxsize=64)
def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """SigV4's signing key, as botocore's ``SigV4Auth.signature`` derives it."""
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, _TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _invalid(message: str) -> SignatureError:
    return SignatureError(SignatureErrorCode.INVALID_SIGNATURE, message)


def _parse_authorization(values: list[str]) -> _Authorization:
    """Split the Authorization header into its parts; never echo its raw value."""
    if not values:
        raise SignatureError(
            SignatureErrorCode.MISSING_AUTHENTICATION_TOKEN,
            "Missing Authorization header: sign requests with AWS Signature Version 4 for "
            "service 'mobiletargeting' (a boto3 'pinpoint' client with credentials does); "
            "query-string (presigned) authentication is not supported",
        )
    if len(values) > 1:
        raise _invalid("More than one Authorization header: send exactly one")
    header = values[0].strip()
    if not header.startswith(f"{_ALGORITHM} "):
        raise _invalid(
            f"Authorization header does not use {_ALGORITHM}: sign requests with AWS Signature "
            f"Version 4, expected {_AUTHORIZATION_FORM}"
        )
    parts: dict[str, str] = {}
    for item in header.removeprefix(_ALGORITHM).split(","):
        name, separator, value = item.strip().partition("=")
        if not separator or name not in ("Credential", "SignedHeaders", "Signature"):
            raise _invalid(f"Malformed Authorization header: expected {_AUTHORIZATION_FORM}")
        if name in parts:
            raise _invalid(f"Authorization header repeats {name}=; expected {_AUTHORIZATION_FORM}")
        parts[name] = value.strip()
    for name in ("Credential", "SignedHeaders", "Signature"):
        if name not in parts:
            raise _invalid(f"Authorization header lacks {name}=; expected {_AUTHORIZATION_FORM}")

    scope = parts["Credential"].split("/")
    if (
        len(scope) != 5
        or not KEY_ID.fullmatch(scope[0])
        or not _DATE.fullmatch(scope[1])
        or not _SCOPE_NAME.fullmatch(scope[2])
        or not _SCOPE_NAME.fullmatch(scope[3])
        or scope[4] != _TERMINATOR
    ):
        raise _invalid(
            "Malformed Credential in the Authorization header: expected "
            f"Credential=KEYID/YYYYMMDD/REGION/SERVICE/{_TERMINATOR}"
        )

    names = tuple(parts["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(name) for name in names):
        raise _invalid(
            "Malformed SignedHeaders in the Authorization header: expected lower-case header "
            "names separated by ';', e.g. SignedHeaders=host;x-amz-date"
        )
    if list(names) != sorted(set(names)):
        raise _invalid("SignedHeaders must be sorted and list each header once")
    if "host" not in names:
        raise _invalid(
            "SignedHeaders must include host: sign the Host header so the request cannot be "
            "replayed against another server"
        )
    if "authorization" in names:
        raise _invalid("SignedHeaders must not include authorization; sign without it")

    if not _SIGNATURE.fullmatch(parts["Signature"]):
        raise _invalid(
            "Malformed Signature in the Authorization header: expected 64 lower-case hex digits"
        )
    return _Authorization(
        key_id=scope[0],
        date=scope[1],
        region=scope[2],
        service=scope[3],
        signed_headers=names,
        signature=parts["Signature"],
    )


def _check_content_sha256(declared: str | None, body: bytes) -> None:
    """Refuse a signed X-Amz-Content-SHA256 that does not cover this body.

    botocore trusts that header instead of hashing the body, so without this check a captured
    request could be replayed with another body.
    """
    if declared is None or declared == hashlib.sha256(body).hexdigest():
        return
    if declared.startswith(("UNSIGNED-PAYLOAD", "STREAMING-")):
        raise _invalid(
            "X-Amz-Content-SHA256 says the body is not signed; this API needs a signed body: "
            "enable payload signing in the client"
        )
    raise _invalid(
        "X-Amz-Content-SHA256 does not match the SHA-256 of the body: the body was changed "
        "in transit or the client hashed other bytes"
    )


def _check_url_round_trip(url: str, host: str, raw_path: str, raw_query: str) -> None:
    """Refuse a request target that botocore would split differently from the server."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.netloc != host
        or parts.path != raw_path
        or parts.query != raw_query
        or parts.fragment
    ):
        raise _invalid(
            "The request target cannot be verified: the Host header, path or query contains "
            "characters ('#', '?', '/', spaces or control characters) that change how the URL "
            "splits; percent-encode them"
        )
    if remove_dot_segments(raw_path) != raw_path:
        # botocore signs the path with these removed, but the router sees them: the signature
        # would cover another path than the one served.
        raise _invalid(
            "The path holds '.' or '..' segments or an empty one ('//'), which the signature "
            "does not cover as sent; send the path without them (percent-encode a dot that "
            "belongs to an id: %2E)"
        )


def _redact_token(canonical_request: str) -> str:
    return "\n".join(
        "x-amz-security-token:<redacted>" if line.startswith("x-amz-security-token:") else line
        for line in canonical_request.split("\n")
    )


def _describe(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds % 60:
        return f"{seconds} seconds"
    minutes = seconds // 60
    return "1 minute" if minutes == 1 else f"{minutes} minutes"
