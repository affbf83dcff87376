"""The ASGI application: authentication, routing, Pinpoint wire format, access log.

Every ``/v1`` request must carry a valid SigV4 signature (service ``mobiletargeting``) unless the
server was started with ``--insecure-no-auth``. ``/healthz`` and ``/metrics`` (Prometheus text,
counts only) need no signature. Responses are Pinpoint's bare payloads with the
modelled status code and an ``x-amzn-RequestId`` header; errors use Pinpoint's error shapes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from optsync.api import apps, endpoints, phone, segments
from optsync.api.errors import ApiError, error_response, from_engine_error
from optsync.api.routing import Call, Router, parse_query
from optsync.api.sigv4 import SignatureError, SignatureVerifier
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest, NotFound

__all__ = ("MAX_PAYLOAD_BYTES", "PinpointApi")

logger = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 7 * 1024 * 1024
ROUTER = Router([*apps.ROUTES, *endpoints.ROUTES, *segments.ROUTES, *phone.ROUTES])


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
        metrics: Callable[[], str] | None = None,
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
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        raw_path = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        raw_path = raw_path or request.scope["path"]
        template = "-"
        try:
            if raw_path == "/healthz":
                return Response("ok\n", media_type="text/plain")
            if raw_path == "/metrics" and self.metrics is not None:
                text = await run_in_threadpool(self.metrics)
                return Response(text, media_type="text/plain; version=0.0.4")
            route, params = ROUTER.match(request.method, raw_path)
            template = route.template
            body = await _read_body(request)
            self._authenticate(request, raw_path, body)
            call = Call(
                store=self.store,
                method=request.method,
                params=params,
                query=parse_query(request.scope.get("query_string", b"").decode("latin-1")),
                body=body,
                request_id=request_id,
            )
            reply = await run_in_threadpool(_dispatch, route.handler, call)
            response = _json_response(reply.status, reply.payload, request_id)
        except ApiError as exc:
            response = error_response(exc, request_id)
        except Exception:
            logger.exception("request failed request_id=%s route=%s", request_id, template)
            response = error_response(ApiError.internal(request_id), request_id)
        logger.info(
            "request method=%s route=%s status=%d ms=%.1f request_id=%s",
            request.method,
            template,
            response.status_code,
            (time.perf_counter() - started) * 1000,
            request_id,
        )
        return response

    def _authenticate(self, request: Request, raw_path: str, body: bytes) -> None:
        if self.verifier is None:
            return
        try:
            self.verifier.verify(
                method=request.method,
                host=request.headers.get("host", ""),
                raw_path=raw_path,
                raw_query=request.scope.get("query_string", b"").decode("latin-1"),
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]
                ],
                body=body,
            )
        except SignatureError as exc:
            raise ApiError.forbidden(f"{exc.code}: {exc.message}") from None


def _dispatch(handler: Any, call: Call) -> Any:
    """Run a handler; engine errors become Pinpoint errors."""
    try:
        return handler(call)
    except (InvalidRequest, NotFound) as exc:
        raise from_engine_error(exc) from None


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_PAYLOAD_BYTES:
        raise ApiError.payload_too_large(
            f"The request body is {length} bytes; the limit is {MAX_PAYLOAD_BYTES} (7 MB)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_PAYLOAD_BYTES:
            raise ApiError.payload_too_large(
                f"The request body is over {MAX_PAYLOAD_BYTES} bytes (7 MB); send less per call"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _json_response(status: int, payload: Any, request_id: str) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")),
        status_code=status,
        media_type="application/json",
        headers={"x-amzn-RequestId": request_id},
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
