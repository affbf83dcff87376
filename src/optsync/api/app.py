"""The ASGI application: authentication, routing, Pinpoint wire format, access log.

Every ``/v1`` request must carry a valid SigV4 signature (service ``mobiletargeting``) unless the
server was started with ``--insecure-no-auth``; a scoped key (``optsync keys``, read from the
engine on each request) reaches only its apps (``api.access``). ``/healthz`` and ``/metrics``
(Prometheus text, ``optsync.metrics``: counts and timings only) need no signature. Responses
are Pinpoint's bare payloads with the modelled status code and an ``x-amzn-RequestId`` header;
errors use Pinpoint's error shapes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from optsync.api import apps, endpoints, opt_outs, phone, segments
from optsync.api.access import FULL_ACCESS, Access, authorize
from optsync.api.errors import ApiError, error_reply, from_engine_error
from optsync.api.routing import Call, Handler, Reply, Route, Router, parse_query
from optsync.api.sigv4 import SignatureError, SignatureErrorCode, SignatureVerifier
from optsync.engine.api_keys import ApiKey
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest, NotFound, Retryable
from optsync.metrics import CONTENT_TYPE, Metrics

__all__ = ("MAX_PAYLOAD_BYTES", "PinpointApi")

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 7 * 1024 * 1024
ROUTER = Router(
    [*apps.ROUTES, *endpoints.ROUTES, *opt_outs.ROUTES, *segments.ROUTES, *phone.ROUTES]
)

# One encoder for every response: json.dumps builds a new one per call for non-default options.
_JSON = json.JSONEncoder(separators=(",", ":"))
_JSON_TYPE = (b"content-type", b"application/json")
_TEXT_TYPE = (b"content-type", b"text/plain; charset=utf-8")
_METRICS_TYPE = (b"content-type", CONTENT_TYPE.encode())

# Handlers call the (blocking) store in these threads. Handed over with run_in_executor: anyio's
# run_in_threadpool costs about 0.1 ms more CPU per request. 40 is anyio's default limit.
_THREADS = ThreadPoolExecutor(max_workers=40, thread_name_prefix="optsync-api")
_T = TypeVar("_T")
RawHeaders = list[tuple[bytes, bytes]]


class PinpointApi:
    """ASGI app serving the Pinpoint REST dialect over an ``EndpointStore``.

    ``verifier=None`` turns authentication off (only for loopback development servers).
    ``mounts`` maps a path prefix (``/console``, ``/prefs``) to an ASGI app that gets every
    request under it, with the prefix added to ``root_path``; other paths are the API's.
    """

    def __init__(
        self,
        store: EndpointStore,
        verifier: SignatureVerifier | None,
        metrics: Metrics | None = None,
        mounts: Mapping[str, ASGIApp] | None = None,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.metrics = metrics
        self.mounts = {prefix.rstrip("/"): app for prefix, app in (mounts or {}).items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        for prefix, app in self.mounts.items():
            if path == prefix or path.startswith(prefix + "/"):
                root_path = scope.get("root_path", "") + prefix
                await app({**scope, "root_path": root_path}, receive, send)
                return
        status, headers, body = await self.handle(scope, receive)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def handle(self, scope: Scope, receive: Receive) -> tuple[int, RawHeaders, bytes]:
        """Answer one API request: status, raw headers and body."""
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path = scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        raw_path = raw_path or scope["path"]
        template = "-"
        try:
            if raw_path == "/healthz":
                return _plain(200, b"ok\n", _TEXT_TYPE)
            if raw_path == "/metrics" and self.metrics is not None:
                return _plain(200, await _in_thread(self.metrics.render), _METRICS_TYPE)
            route, params = ROUTER.match(method, raw_path)
            template = route.template
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            body = await _read_body(receive, headers)
            raw_query = scope.get("query_string", b"").decode("latin-1")
            call = Call(
                store=self.store,
                method=method,
                params=params,
                query=parse_query(raw_query) if raw_query else {},
                body=body,
                request_id=request_id,
            )
            # In a worker thread with the handler: a scoped key is read from the engine.
            reply = await _in_thread(
                functools.partial(
                    self._authorized_dispatch, route, raw_path, raw_query, headers, call
                )
            )
            response = _json_reply(reply.status, reply.payload, request_id)
        except ApiError as exc:
            response = error_reply(exc, request_id)
        except Retryable as exc:  # the engine's database is down or failing over: retry
            logger.warning(
                "request failed request_id=%s route=%s retryable=%s", request_id, template, exc
            )
            response = error_reply(ApiError.unavailable(request_id), request_id)
        except Exception:
            logger.exception("request failed request_id=%s route=%s", request_id, template)
            response = error_reply(ApiError.internal(request_id), request_id)
        seconds = time.perf_counter() - started
        logger.info(
            "request method=%s route=%s status=%d ms=%.1f request_id=%s",
            method,
            template,
            response[0],
            seconds * 1000,
            request_id,
        )
        if self.metrics is not None:
            self.metrics.observe_request(f"{method} {template}", response[0], seconds)
        return response

    def _authorized_dispatch(
        self,
        route: Route,
        raw_path: str,
        raw_query: str,
        headers: list[tuple[str, str]],
        call: Call,
    ) -> Reply:
        access = self._authenticate(call.method, raw_path, raw_query, headers, call.body)
        authorize(access, call.method, route.template, dict(call.params))
        if access.key_id is not None:
            call.context = {"key_id": access.key_id, "access": access}
        return _dispatch(route.handler, call)

    def _authenticate(
        self,
        method: str,
        raw_path: str,
        raw_query: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> Access:
        """Who signed the request and what they may do (full access: the API runs without keys
        or the key is one of the verifier's own)."""
        if self.verifier is None:
            return FULL_ACCESS
        scoped: list[ApiKey] = []

        def stored_secret(key_id: str) -> str | None:
            key = self.store.get_api_key(key_id)
            if key is None:
                return None
            if not key.active:
                raise SignatureError(
                    SignatureErrorCode.UNRECOGNIZED_CLIENT,
                    f"The access key id {key_id} was revoked at {key.revoked_at}: sign with "
                    "another key",
                )
            scoped.append(key)
            return key.secret

        try:
            key_id = self.verifier.verify(
                method=method,
                host=_header(headers, "host") or "",
                raw_path=raw_path,
                raw_query=raw_query,
                headers=headers,
                body=body,
                lookup=stored_secret,
            )
        except SignatureError as exc:
            raise ApiError.forbidden(f"{exc.code}: {exc.message}") from None
        return Access.of(scoped[0]) if scoped else Access(key_id)


async def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a worker thread with this task's context, as ``asyncio.to_thread`` does."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_THREADS, context.run, fn)


def _dispatch(handler: Handler, call: Call) -> Reply:
    """Run a handler; engine errors become Pinpoint errors."""
    try:
        return handler(call)
    except (InvalidRequest, NotFound) as exc:
        raise from_engine_error(exc) from None


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of a header; ``name`` is lower-case, as ASGI servers send names."""
    for key, value in headers:
        if key == name:
            return value
    return None


async def _read_body(receive: Receive, headers: list[tuple[str, str]]) -> bytes:
    length = _header(headers, "content-length")
    if length is not None and length.isdigit() and int(length) > MAX_PAYLOAD_BYTES:
        raise ApiError.payload_too_large(
            f"The request body is {length} bytes; the limit is {MAX_PAYLOAD_BYTES} (7 MB)"
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_PAYLOAD_BYTES:
                raise ApiError.payload_too_large(
                    f"The request body is over {MAX_PAYLOAD_BYTES} bytes (7 MB); send less per call"
                )
            if not message.get("more_body", False):
                if not chunks:
                    return chunk
                chunks.append(chunk)
                return b"".join(chunks)
            chunks.append(chunk)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect


def _plain(
    status: int, body: bytes, content_type: tuple[bytes, bytes]
) -> tuple[int, RawHeaders, bytes]:
    return status, [(b"content-length", str(len(body)).encode()), content_type], body


def _json_reply(status: int, payload: Any, request_id: str) -> tuple[int, RawHeaders, bytes]:
    body = _JSON.encode(payload).encode()
    headers = [
        (b"x-amzn-requestid", request_id.encode()),
        (b"content-length", str(len(body)).encode()),
        _JSON_TYPE,
    ]
    return status, headers, body


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
