"""Demo-grade sign-in by user id: the page trusts the id typed in, and says so.

A real application has its own sign-in; this one only makes the sample usable. The session is
a signed HttpOnly SameSite=Strict cookie holding the user id, and every form carries the
session's CSRF token (``web.csrf.CsrfProtection`` checks each POST).
"""

from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.prefcenter.pages import PrefsPages
from optsync.web.forms import checked_form
from optsync.web.paths import redirect
from optsync.web.session import rotate_session

__all__ = ("UserSignIn",)

logger = logging.getLogger(__name__)

MAX_USER_ID = 200


class UserSignIn:
    def __init__(self, pages: PrefsPages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/login", self.sign_in, methods=["POST"]),
            Route("/logout", self.sign_out, methods=["POST"]),
        ]

    async def sign_in(self, request: Request) -> Response:
        user_id = checked_form(request).get("user_id")
        known = bool(user_id) and len(user_id) <= MAX_USER_ID
        if known:
            known = await run_in_threadpool(self.pages.preferences.user_exists, user_id)
        if not known:
            return self.pages.render(
                request,
                "signin.html",
                401,
                error="There is no user with that id in the application database.",
                user_id=user_id[:MAX_USER_ID],
            )
        rotate_session(request.session, user=user_id)
        logger.info("preference center sign-in")
        return redirect(request, "/")

    async def sign_out(self, request: Request) -> Response:
        checked_form(request)
        request.session.clear()
        return redirect(request, "/")
