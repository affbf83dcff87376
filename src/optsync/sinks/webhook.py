"""``WebhookSink``: POSTs each batch of consent changes to a URL as one signed JSON array.

The body is a JSON array of ``WebhookChange`` objects, in seq order. Every request carries
``Optsync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (``sign``;
a receiver written in Python can call ``verify``) and ``Optsync-Delivery``, a new UUID for each
request (a batch sent again gets a new one: receivers dedupe on each change's ``id``).

What the receiver's answer means:

- 2xx: every change of the batch is delivered (``Sent``).
- 408, 429, 5xx, a timeout, a connection error: ``SinkUnavailable``; the runner sends the same
  batch again after its backoff, or after ``Retry-After`` when the receiver gave one.
- 401, 403, 404 and any 3xx (redirects are not followed) say the secret or the URL is wrong: a
  fault of the configuration, not of the changes, so the batch waits too (as the EUM sink does
  for refused credentials) and nothing is dead-lettered while someone fixes it.
- Any other 4xx: the receiver refuses this content for good; each change becomes a dead letter
  (``Rejected``) whose reason names the status and the start of the answer's body.

The HTTP client is urllib3 (installed with botocore): one persistent connection per sink, no
retries of its own (the runner owns retries), certificates checked for ``https://``. A
``user:password@`` in the URL is sent as HTTP Basic authentication and never shown in ``target``.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from enum import StrEnum
from http import HTTPStatus
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError

from optsync import __version__
from optsync.engine.models import CauseKind, ChannelType, ConsentChange, OptOut
from optsync.sinks.base import Outcome, Rejected, Sent, Sink, SinkUnavailable
from optsync.sinks.settings import WebhookSinkSettings

__all__ = (
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "WebhookCause",
    "WebhookChange",
    "WebhookEvent",
    "WebhookSink",
    "sign",
    "verify",
)

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "Optsync-Signature"
DELIVERY_HEADER = "Optsync-Delivery"
MAX_RETRY_AFTER = 3600.0
"""Seconds of ``Retry-After`` honoured at most, so that a wrong header cannot stall a sink."""
REASON_CHARS = 200
"""Characters of the receiver's answer kept in a dead letter's or an error's reason."""
_WAIT_STATUSES = frozenset({401, 403, 404, 408, 429})
_TIMESTAMP = re.compile(r"[0-9]{1,15}")


class WebhookEvent(StrEnum):
    """What happened to the endpoint, in one word."""

    CREATED = "created"
    OPT_OUT = "opt-out"
    OPT_IN = "opt-in"
    ADDRESS_CHANGED = "address-changed"
    DELETED = "deleted"


class WebhookCause(msgspec.Struct, frozen=True):
    """Why the engine made the change: ``kind`` (source, api, console, end user, import),
    ``ref`` (the source position, the request id, ...) and ``detail`` (evidence in words)."""

    kind: CauseKind
    ref: str
    detail: str


class WebhookChange(msgspec.Struct, frozen=True):
    """One element of a webhook body: a consent change as receivers see it.

    ``id`` is the idempotency id (the same each time this change is sent). ``opt_out`` is the
    OptOut after the change (null: the endpoint was deleted), ``opt_out_before`` the one before
    (null: created). ``address_before`` is set only when the address changed. Times are
    ISO-8601 UTC with milliseconds.
    """

    id: str
    seq: int
    app: str
    endpoint_id: str
    channel: ChannelType | None
    address: str | None
    address_before: str | None
    user_id: str | None
    opt_out: OptOut | None
    opt_out_before: OptOut | None
    event: WebhookEvent
    cause: WebhookCause
    source_position: str | None
    """The source log position of a captured change (``cause.ref`` when kind is source)."""
    source_commit_time: str | None
    """When the source committed it (captured changes whose record carried the time)."""
    engine_time: str
    """When the engine committed it."""

    @classmethod
    def of(cls, change: ConsentChange) -> WebhookChange:
        cause = change.cause
        return cls(
            id=change.change_id,
            seq=change.seq,
            app=change.app_id,
            endpoint_id=change.endpoint_id,
            channel=change.channel_type,
            address=change.address,
            address_before=change.address_before,
            user_id=change.user_id,
            opt_out=change.opt_out_after,
            opt_out_before=change.opt_out_before,
            event=_event(change),
            cause=WebhookCause(cause.kind, cause.ref, cause.detail),
            source_position=cause.ref if cause.kind is CauseKind.SOURCE and cause.ref else None,
            source_commit_time=change.source_time,
            engine_time=change.at,
        )


def _event(change: ConsentChange) -> WebhookEvent:
    if change.opt_out_before is None:
        return WebhookEvent.CREATED
    if change.opt_out_after is None:
        return WebhookEvent.DELETED
    if change.opt_out_after is not change.opt_out_before:
        # An opt-out flip that also moved the address is named by the flip (address_before says
        # the rest): the consent is what a receiver must not miss.
        return WebhookEvent.OPT_OUT if change.opt_out_after is OptOut.ALL else WebhookEvent.OPT_IN
    return WebhookEvent.ADDRESS_CHANGED


def _digest(secret: str, body: bytes, timestamp: int) -> str:
    signed = str(timestamp).encode("ascii") + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Optsync-Signature`` header value for ``body`` sent at ``timestamp`` (unix seconds):
    ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with the secret>``."""
    return f"t={timestamp},v1={_digest(secret, body, timestamp)}"


def verify(
    secret: str, body: bytes, header: str, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` (an ``Optsync-Signature`` value) signs the raw ``body`` with ``secret``
    at a time within ``tolerance`` seconds of ``now`` (default: the clock). Compared in constant
    time; a malformed header is False. Several ``v1=`` values (a secret being rotated) pass if
    one matches."""
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in header.split(","):
        key, found, value = part.strip().partition("=")
        if not found:
            return False
        if key == "t":
            if timestamp is not None or not _TIMESTAMP.fullmatch(value):
                return False
            timestamp = int(value)
        elif key == "v1":
            signatures.append(value.encode("utf-8", "replace"))
    if timestamp is None or not signatures:
        return False
    moment = time.time() if now is None else now
    if abs(moment - timestamp) > tolerance:
        return False
    expected = _digest(secret, body, timestamp).encode("ascii")
    matched = False
    for signature in signatures:  # every one compared: the time taken tells nothing
        matched = hmac.compare_digest(expected, signature) or matched
    return matched


def _target(url: str) -> str:
    """The URL as status pages show it: no user, password, query or fragment."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` (seconds or an HTTP date) as seconds from now, capped."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            return None
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _excerpt(data: bytes) -> str:
    return " ".join(data.decode("utf-8", "replace").split())[:REASON_CHARS]


def _hint(status: int) -> str:
    """What to check when an answer says the configuration is wrong."""
    if status in (401, 403):
        return " (check that secret is the one the receiver expects)"
    if status == 404:
        return " (check url)"
    if 300 <= status < 400:
        return " (redirects are not followed: set url to the final address)"
    return ""


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


class WebhookSink(Sink):
    """POSTs consent changes as signed JSON; see the module docstring."""

    kind = "webhook"

    def __init__(self, settings: WebhookSinkSettings) -> None:
        self.name = settings.name
        self.channels = settings.channels
        self.settings = settings
        self.target = _target(settings.url)
        parts = urlsplit(settings.url)
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers: dict[str, str] = {
            "Content-Type": "application/json",
            "User-Agent": f"optsync/{__version__}",
        }
        if parts.username is not None:
            self._headers |= urllib3.util.make_headers(
                basic_auth=f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            )
        self._pool: urllib3.HTTPConnectionPool | None = None

    @property
    def pool(self) -> urllib3.HTTPConnectionPool:
        """One kept-alive connection to the receiver, opened at the first request."""
        if self._pool is None:
            timeout = self.settings.timeout
            self._pool = urllib3.connection_from_url(
                self.settings.url,
                maxsize=1,
                timeout=urllib3.Timeout(connect=timeout, read=timeout),
                retries=False,
            )
        return self._pool

    def deliver(self, changes: Sequence[ConsentChange]) -> Sequence[Outcome]:
        if not changes:
            return []
        body = msgspec.json.encode([WebhookChange.of(change) for change in changes])
        status, excerpt, retry_after = self._post(body, len(changes))
        if 200 <= status < 300:
            return [Sent() for _ in changes]
        answered = f"webhook {self.target} answered {_status_text(status)}"
        if status in _WAIT_STATUSES or status < 400 or status >= 500:
            detail = f": {excerpt}" if excerpt else ""
            raise SinkUnavailable(f"{answered}{_hint(status)}{detail}", retry_after)
        reason = f"the receiver answered {_status_text(status)}: {excerpt or '(empty body)'}"
        return [Rejected(reason) for _ in changes]

    def _post(self, body: bytes, count: int) -> tuple[int, str, float | None]:
        """Send one request; (status, start of the answer's body, Retry-After seconds)."""
        delivery = str(uuid.uuid4())
        headers: Mapping[str, str] = self._headers | {
            SIGNATURE_HEADER: sign(self.settings.secret, body, int(time.time())),
            DELIVERY_HEADER: delivery,
        }
        started = time.monotonic()
        try:
            response = self.pool.urlopen(
                "POST",
                self._path,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                preload_content=False,
            )
            try:
                status = response.status
                data = b"" if 200 <= status < 300 else response.read(4 * REASON_CHARS)
                retry_after = _retry_after(response.headers.get("Retry-After"))
            finally:
                response.drain_conn()  # the rest of the body, so the connection is kept
                response.release_conn()
        except NewConnectionError as exc:
            raise SinkUnavailable(f"webhook {self.target} unreachable: {exc}") from exc
        except ConnectTimeoutError as exc:
            raise SinkUnavailable(
                f"webhook {self.target}: no connection within {self.settings.timeout:g} s"
            ) from exc
        except ReadTimeoutError as exc:
            raise SinkUnavailable(
                f"webhook {self.target}: no answer within {self.settings.timeout:g} s"
            ) from exc
        except (HTTPError, OSError) as exc:
            raise SinkUnavailable(f"webhook {self.target}: {type(exc).__name__}: {exc}") from exc
        logger.debug(
            "webhook answered sink=%s delivery=%s changes=%d status=%d ms=%.1f",
            self.name,
            delivery,
            count,
            status,
            (time.monotonic() - started) * 1000,
        )
        return status, _excerpt(data), retry_after

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
