"""Signing in to the console: an operator signs in with one of the API's key pairs (access key id
and secret), compared in constant time; the session remembers only the key id, and a session
whose key id is no longer configured is signed out. Sessions and CSRF protection are
``optsync.web.session`` and ``optsync.web.csrf``, shared with the preference center.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.web.forms import checked_form
from optsync.web.paths import base_path, redirect, safe_next
from optsync.web.session import rotate_session

if TYPE_CHECKING:
    from optsync.console.pages import Pages

__all__ = ("FAILED_SIGN_IN_DELAY", "SignIn", "key_pair_matches")

logger = logging.getLogger(__name__)

FAILED_SIGN_IN_DELAY = 0.3
"""Seconds a failed sign-in waits before answering (slows down guessing)."""


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


async def slow_down() -> None:
    """Wait a little after a failed sign-in."""
    await asyncio.sleep(FAILED_SIGN_IN_DELAY)


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
