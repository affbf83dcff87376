"""Signing in to the console, sessions and CSRF protection.

- An operator signs in with one of the API's key pairs (access key id and secret), compared in
  constant time; the session remembers only the key id, and a session whose key id is no longer
  configured is signed out.
- Sessions live in a signed cookie (itsdangerous, through Starlette's ``SessionMiddleware``):
  HttpOnly, SameSite=Strict, scoped to the mount path, valid for ``SESSION_SECONDS``. The signing
  key comes from ``DATA_DIR/console-secret`` (created once, mode 600), so sessions survive a
  restart.
- Every form carries the session's CSRF token in a hidden field (``csrf_token``); every POST is
  checked against it (and against the ``Origin`` header when the browser sends one) before
  anything else happens. A failed check answers 403.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from optsync.console.web import (
    FormError,
    base_path,
    checked_form,
    read_form,
    redirect,
    safe_next,
)
from optsync.errors import ConfigError

if TYPE_CHECKING:
    from optsync.console.pages import Pages

__all__ = (
    "CSRF_FIELD",
    "SECRET_FILE",
    "SESSION_SECONDS",
    "CsrfProtection",
    "SignIn",
    "csrf_failure",
    "csrf_token",
    "derive_key",
    "key_pair_matches",
    "load_or_create_secret",
    "rotate_session",
    "same_origin",
)

logger = logging.getLogger(__name__)

SECRET_FILE = "console-secret"  # noqa: S105 - a file name, not a secret
SESSION_SECONDS = 8 * 60 * 60
CSRF_FIELD = "csrf_token"
_CSRF_KEY = "csrf"
MIN_SECRET_CHARS = 32
FAILED_SIGN_IN_DELAY = 0.3
"""Seconds a failed sign-in waits before answering (slows down guessing)."""


def load_or_create_secret(data_dir: Path) -> str:
    """The console's cookie-signing secret from ``DATA_DIR/console-secret``, created once."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        # An empty or short key would let anyone forge a session cookie.
        raise ConfigError(
            f"{path} holds no usable secret (under {MIN_SECRET_CHARS} characters): delete it "
            "and start again, and optsync writes a new one"
        )
    if path.stat().st_mode & 0o077:
        logger.warning("console secret is readable by other users path=%s fix='chmod 600'", path)
    return secret


def derive_key(secret: str, purpose: str) -> str:
    """A key for one purpose (``console``, ``prefs``), so one cookie cannot pass for another."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def key_pair_matches(credentials: Mapping[str, str], key_id: str, secret: str) -> bool:
    """True if (key_id, secret) is one of ``credentials``.

    Every configured pair is compared, each in constant time, so the answer takes as long for an
    unknown key id as for a wrong secret.
    """
    given = f"{key_id}\0{secret}".encode()
    found = False
    for known_id, known_secret in credentials.items():
        expected = f"{known_id}\0{known_secret}".encode()
        found |= hmac.compare_digest(given, expected)
    return found


def csrf_token(session: dict[str, Any]) -> str:
    """The session's CSRF token, created on first use."""
    token = session.get(_CSRF_KEY)
    if not isinstance(token, str) or not token:
        token = secrets.token_urlsafe(32)
        session[_CSRF_KEY] = token
    return token


def rotate_session(session: dict[str, Any], **values: Any) -> None:
    """Start a fresh session (new CSRF token) holding ``values``: done at every sign-in."""
    session.clear()
    session.update(values)
    session[_CSRF_KEY] = secrets.token_urlsafe(32)


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
    expected = request.session.get(_CSRF_KEY)
    if not isinstance(expected, str) or not expected:
        return "the session has no form token (it expired or cookies are off)"
    if not submitted:
        return "the form has no token"
    if not hmac.compare_digest(submitted.encode(), expected.encode()):
        return "the form's token is not this session's"
    return None


async def slow_down() -> None:
    """Wait a little after a failed sign-in."""
    await asyncio.sleep(FAILED_SIGN_IN_DELAY)


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


class SignIn:
    """``/login`` and ``/logout``: an operator signs in with one of the API's key pairs."""

    def __init__(self, pages: Pages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/login", self.form, methods=["GET"]),
            Route("/login", self.sign_in, methods=["POST"]),
            Route("/logout", self.sign_out, methods=["POST"]),
        ]

    async def form(self, request: Request) -> Response:
        target = safe_next(request, request.query_params.get("next"))
        if self.pages.operator(request) is not None:
            return redirect(request, target)
        return self.pages.render(
            request, "login.html", next=base_path(request) + target, error=None, key_id=""
        )

    async def sign_in(self, request: Request) -> Response:
        form = checked_form(request)
        key_id, secret = form.get("key_id"), form.get("secret")
        target = safe_next(request, form.get("next"))
        credentials = self.pages.context.credentials
        if key_id and secret and key_pair_matches(credentials, key_id, secret):
            rotate_session(request.session, operator=key_id)
            logger.info("console sign-in key_id=%s", key_id)
            return redirect(request, target)
        await slow_down()
        # A secret typed into the key id field must not reach the log.
        logger.warning(
            "console sign-in refused key_id=%s", key_id if key_id in credentials else "(unknown)"
        )
        return self.pages.render(
            request,
            "login.html",
            401,
            next=base_path(request) + target,
            error="That access key id and secret do not match a configured key pair.",
            key_id=key_id,
        )

    async def sign_out(self, request: Request) -> Response:
        checked_form(request)
        if (key_id := self.pages.operator(request)) is not None:
            logger.info("console sign-out key_id=%s", key_id)
        request.session.clear()
        return redirect(request, "/login")
