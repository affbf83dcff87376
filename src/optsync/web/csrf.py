"""CSRF protection: every form carries the session's token in a hidden field (``CSRF_FIELD``);
every POST is checked against it (and against the ``Origin`` header when the browser sends one)
before anything else happens, by ``CsrfProtection``. A failed check answers 403."""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from optsync.web.forms import FormError, read_form

__all__ = (
    "CSRF_FIELD",
    "CSRF_SESSION_KEY",
    "CsrfProtection",
    "Refusal",
    "csrf_failure",
    "csrf_token",
    "same_origin",
)

logger = logging.getLogger(__name__)

CSRF_FIELD = "csrf_token"
CSRF_SESSION_KEY = "csrf"
"""Where the session keeps its token."""


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, created on first use."""
    token = session.get(CSRF_SESSION_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[CSRF_SESSION_KEY] = token
    return token


def same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


def csrf_failure(request: Request, submitted: str) -> str | None:
    """Why the POST must be refused, or None if its CSRF token is the session's."""
    if not same_origin(request):
        return "the form was sent from another site"
    expected = request.session.get(CSRF_SESSION_KEY)
    if not isinstance(expected, str) or not expected:
        return "the session has no form token (it expired or cookies are off)"
    if not submitted:
        return "the form has no token"
    if not hmac.compare_digest(submitted.encode(), expected.encode()):
        return "the form's token is not this session's"
    return None


Refusal = Callable[[Request, int, str], Response]
"""Renders the page for a refused POST: (request, status, reason)."""


class CsrfProtection:
    """ASGI middleware: every POST must carry the session's CSRF token, or it is refused.

    Sits inside the session middleware. It reads the (urlencoded) form itself, so no view can
    forget the check, and hands the parsed form on to the view (``pages.checked_form``).
    """

    def __init__(self, app: ASGIApp, refuse: Refusal) -> None:
        self.app = app
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            form = await read_form(request)
        except FormError as exc:
            await self.refuse(request, exc.status, exc.message)(scope, receive, send)
            return
        reason = csrf_failure(request, form.get(CSRF_FIELD))
        if reason is not None:
            logger.warning("form refused path_prefix=%s reason=%s", scope.get("root_path"), reason)
            await self.refuse(request, 403, reason)(scope, receive, send)
            return
        scope.setdefault("state", {})["form"] = form
        await self.app(scope, receive, send)
