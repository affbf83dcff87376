"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that checks every request the
way a careful receiver would, and records what it accepted.

Each ``POST`` must carry ``Content-Type: application/json``, ``Optsync-Delivery`` (a UUID) and
``Optsync-Signature: t=<unix seconds>,v1=<hex>``; the signature is checked here with this
module's own code (the HMAC-SHA256 of ``"<t>.<raw body>"`` recomputed from the bytes received,
never optsync's ``verify``), so a test checks the sender independently. A request that fails a
check gets 401 and lands in ``refused``; its changes are not recorded. The body must be a JSON
array of objects.

A request that passes is recorded in ``requests``; unless the test told the receiver to answer
something else (``answer(status, times)``), its changes are recorded in ``received`` (in arrival
order, duplicates kept) *before* the answer is written, after ``delay`` seconds: like a receiver
that commits, then answers, so a sender killed meanwhile delivers them again. ``hold()`` keeps
accepted requests unanswered until ``release()``; ``in_flight`` lists those being handled.

Use the fixture ``webhook_receiver_fixture`` (import it into a test module to register it; it is
named ``webhook_receiver`` and gives each test a fresh receiver holding ``SECRET``), or
``WebhookReceiver`` as a context manager.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from ports import free_port

__all__ = (
    "SECRET",
    "Element",
    "Refusal",
    "Request",
    "WebhookReceiver",
    "webhook_receiver_fixture",
)

logger = logging.getLogger(__name__)

SECRET = "whsec-test-0123456789"
TOLERANCE = 300
"""Seconds a signature's timestamp may be away from the receiver's clock."""
HOLD_LIMIT = 120.0
"""Seconds a held request waits for ``release()`` at most."""
_SIGNATURE = re.compile(r"^t=(?P<t>[0-9]{1,15}),v1=(?P<v1>[0-9a-f]{64})$")

Element = dict[str, Any]
"""One change of a body, as JSON decoded it."""


@dataclass(frozen=True)
class Request:
    """A request whose signature held, and what it was answered."""

    delivery: str
    ids: tuple[str, ...]
    status: int
    headers: Mapping[str, str]
    client: str
    """The sender's address and port: one per connection."""
    at: float
    """``time.monotonic()`` when it arrived."""


@dataclass(frozen=True)
class Refusal:
    """A request refused with 401: why, and the headers it came with."""

    reason: str
    headers: Mapping[str, str]


@dataclass(frozen=True)
class _Scripted:
    status: int
    body: bytes
    retry_after: str | None


class WebhookReceiver:
    """The receiver; ``url`` is where to POST."""

    def __init__(
        self,
        secret: str = SECRET,
        *,
        path: str = "/optsync/hook",
        delay: float = 0.0,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.secret = secret
        self.path = path
        self.delay = delay
        """Seconds each accepted request takes before it is answered (a slow receiver)."""
        self.host = host
        self.port = port if port is not None else free_port()
        self._lock = threading.Lock()
        self._received: list[Element] = []
        self._requests: list[Request] = []
        self._refused: list[Refusal] = []
        self._scripted: deque[_Scripted] = deque()
        self._in_flight: dict[str, tuple[str, ...]] = {}
        self._answering = threading.Event()
        self._answering.set()
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    def start(self) -> None:
        """Listen on ``port`` and serve requests from a daemon thread."""
        if self._http is not None:
            raise RuntimeError("the receiver is running already")
        self._http = _HttpServer((self.host, self.port), _Handler, self)
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"webhook-receiver-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and drop every connection (an outage; a hold ends); what was received
        stays, and ``start()`` serves again."""
        http, self._http = self._http, None
        thread, self._thread = self._thread, None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        http.close_connections()
        self._answering.set()  # held requests end, on connections closed already
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> WebhookReceiver:
        if self._http is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # control

    def answer(
        self,
        status: int,
        times: int = 1,
        *,
        body: bytes = b"",
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``times`` well-signed requests with ``status`` (their changes are
        not recorded), with ``body`` and a ``Retry-After`` header when given."""
        with self._lock:
            self._scripted.extend(_Scripted(status, body, retry_after) for _ in range(times))

    def hold(self) -> None:
        """Accept (record) requests but answer none until ``release()``: a sender killed
        meanwhile has delivered changes it never heard about."""
        self._answering.clear()

    def release(self) -> None:
        self._answering.set()

    # what happened

    @property
    def received(self) -> list[Element]:
        """Every change accepted, in arrival order (duplicates kept)."""
        with self._lock:
            return list(self._received)

    def first_arrivals(self) -> list[Element]:
        """Every change accepted, deduplicated by ``id`` as a receiver does: the first copy."""
        seen: set[str] = set()
        firsts: list[Element] = []
        for element in self.received:
            if element["id"] not in seen:
                seen.add(element["id"])
                firsts.append(element)
        return firsts

    def received_ids(self) -> set[str]:
        with self._lock:
            return {str(e["id"]) for e in self._received}

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def refused(self) -> list[Refusal]:
        with self._lock:
            return list(self._refused)

    @property
    def in_flight(self) -> dict[str, tuple[str, ...]]:
        """Delivery id -> change ids of the requests accepted and not answered yet."""
        with self._lock:
            return dict(self._in_flight)

    # handling, from the server's threads

    def _check(self, headers: Mapping[str, str], body: bytes) -> str | None:
        """Why the request is refused, or None."""
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return f"Content-Type is {headers.get('content-type')!r}"
        try:
            uuid.UUID(headers.get("optsync-delivery", ""))
        except ValueError:
            return f"Optsync-Delivery is {headers.get('optsync-delivery')!r}, not a UUID"
        match = _SIGNATURE.match(headers.get("optsync-signature", ""))
        if match is None:
            return f"Optsync-Signature is {headers.get('optsync-signature')!r}"
        timestamp = int(match["t"])
        if abs(time.time() - timestamp) > TOLERANCE:
            return f"signature timestamp {timestamp} is more than {TOLERANCE} s away"
        expected = hmac.new(
            self.secret.encode(), match["t"].encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, match["v1"]):
            return "signature does not match the body"
        return None

    def handle(
        self, headers: Mapping[str, str], body: bytes, client: str
    ) -> tuple[int, bytes, str | None]:
        """(status, body, Retry-After) to answer a request from ``client``; sleeps ``delay``
        for an accepted request."""
        refusal = self._check(headers, body)
        elements: list[Element] = []
        if refusal is None:
            try:
                decoded = json.loads(body)
            except ValueError as exc:
                refusal = f"body is not JSON: {exc}"
            else:
                if not isinstance(decoded, list) or not all(isinstance(e, dict) for e in decoded):
                    refusal = "body is not a JSON array of objects"
                else:
                    elements = cast(list[Element], decoded)
        if refusal is not None:
            logger.debug("webhook receiver refused reason=%s", refusal)
            with self._lock:
                self._refused.append(Refusal(refusal, dict(headers)))
            return 401, json.dumps({"error": refusal}).encode(), None
        delivery = headers["optsync-delivery"]
        ids = tuple(str(e.get("id")) for e in elements)
        with self._lock:
            scripted = self._scripted.popleft() if self._scripted else None
            status = scripted.status if scripted is not None else 200
            self._requests.append(
                Request(delivery, ids, status, dict(headers), client, time.monotonic())
            )
            if scripted is None:
                self._received.extend(elements)
                self._in_flight[delivery] = ids
        if scripted is not None:
            return scripted.status, scripted.body, scripted.retry_after
        try:
            time.sleep(self.delay)
            self._answering.wait(HOLD_LIMIT)
        finally:
            with self._lock:
                self._in_flight.pop(delivery, None)
        return 200, b'{"ok":true}', None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        receiver: WebhookReceiver,
    ) -> None:
        self.receiver = receiver
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def close_connections(self) -> None:
        """Close kept-alive connections too: a stopped receiver answers nothing at all."""
        with self.connections_lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):  # closed already
                    conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sink holds one connection
    timeout = 30

    @property
    def _server(self) -> _HttpServer:
        return cast(_HttpServer, self.server)

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._server.connections_lock:
            self._server.connections.add(self.connection)

    def finish(self) -> None:
        with self._server.connections_lock:
            self._server.connections.discard(self.connection)
        with contextlib.suppress(OSError):  # the sender is gone
            super().finish()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.path != self._server.receiver.path:
            self._answer(404, b'{"error":"no such path"}', None)
            return
        status, data, retry_after = self._server.receiver.handle(
            headers, body, f"{self.client_address[0]}:{self.client_address[1]}"
        )
        self._answer(status, data, retry_after)

    def _answer(self, status: int, data: bytes, retry_after: str | None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True  # the sender went away (a killed optsync)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("webhook receiver http " + format, *args)


@pytest.fixture(name="webhook_receiver")
def webhook_receiver_fixture() -> Iterator[WebhookReceiver]:
    """A started receiver holding ``SECRET``, fresh for each test."""
    with WebhookReceiver() as receiver:
        yield receiver
