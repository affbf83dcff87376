"""The console as an ASGI application, mounted by ``PinpointApi`` at ``/console``.

Middleware, outermost first: the signed session cookie, security headers, the CSRF check on
every POST. Pages need a signed-in operator (see ``auth``); static files are served from the
package, no build step and nothing from another site.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from optsync.console.apps import AppViews
from optsync.console.auth import SignIn
from optsync.console.context import ConsoleContext
from optsync.console.endpoints import EndpointViews
from optsync.console.pages import ConsoleError, Pages
from optsync.console.pipeline import PipelineViews
from optsync.console.segments import SegmentViews
from optsync.console.sinks import SinkViews
from optsync.sinks.settings import AuditSettings, SinkSettings
from optsync.web.csrf import CsrfProtection
from optsync.web.headers import SecurityHeaders
from optsync.web.session import SESSION_SECONDS, derive_key

__all__ = ("COOKIE", "create_console")

STATIC = Path(__file__).parent / "static"
COOKIE = "optsync_console"

_REFUSED_TITLES = {403: "Form refused", 413: "Form too large", 415: "Form not understood"}


def create_console(
    context: ConsoleContext,
    *,
    mount_path: str = "/console",
    sinks: Sequence[SinkSettings] = (),
    audit: AuditSettings | None = None,
) -> ASGIApp:
    """The console over ``context``; ``mount_path`` scopes its session cookie. ``sinks`` and
    ``audit``: the config's ``[[sink]]`` and ``[audit]``, for the Sinks pages."""
    pages = Pages(context)
    sink_views = SinkViews(pages, sinks, audit or AuditSettings())

    def refuse(request: Request, status: int, reason: str) -> Response:
        message = f"The console did not accept this form: {reason}."
        if status == 403:
            message += " Go back, reload the page and send the form again."
        title = _REFUSED_TITLES.get(status, "Form refused")
        return pages.error(request, ConsoleError(status, title, message))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        title = "Not found" if status == 404 else "Not allowed"
        message = "There is no such page in the console." if status == 404 else str(exc)
        return pages.error(request, ConsoleError(status, title, message))

    routes = [
        *SignIn(pages).routes(),
        *AppViews(pages).routes(),
        *EndpointViews(pages, journeys=sink_views.journeys).routes(),
        *SegmentViews(pages).routes(),
        *PipelineViews(pages, overdue=sink_views.overdue).routes(),
        *sink_views.routes(),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=derive_key(context.secret, "console"),
                session_cookie=COOKIE,
                max_age=SESSION_SECONDS,
                path=mount_path,
                same_site="strict",
                https_only=context.secure_cookies,
            ),
            Middleware(SecurityHeaders),
            Middleware(CsrfProtection, refuse=refuse),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
