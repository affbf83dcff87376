"""The preference center as an ASGI application, mounted by ``PinpointApi`` at ``/prefs``.

It is the AWS sample's "home-grown app": a user signs in by user id (demo-grade, and the page
says so), sees their addresses and turns messages on or off. Every choice is written to the
source database; optsync carries it to the engine like any other change. Sessions and CSRF
protection work as in the console (signed HttpOnly SameSite=Strict cookie, a token in every
form).
"""

from __future__ import annotations

from dataclasses import dataclass
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

from optsync.config import Settings
from optsync.prefcenter.auth import UserSignIn
from optsync.prefcenter.pages import PrefsPages
from optsync.prefcenter.preferences import PreferenceViews
from optsync.prefcenter.source import PreferenceStore, source_table
from optsync.web.csrf import CsrfProtection
from optsync.web.headers import SecurityHeaders
from optsync.web.session import SESSION_SECONDS, derive_key, load_or_create_secret

__all__ = ("COOKIE", "PrefsContext", "create_prefcenter", "prefs_context")

STATIC = Path(__file__).parent / "static"
COOKIE = "optsync_prefs"


@dataclass(frozen=True)
class PrefsContext:
    preferences: PreferenceStore
    secret: str
    """Signs the session cookies."""
    secure_cookies: bool = False


def prefs_context(settings: Settings) -> PrefsContext:
    """The preference center over the source of ``settings`` (``ConfigError`` if unusable)."""
    return PrefsContext(
        preferences=PreferenceStore(source_table(settings)),
        secret=load_or_create_secret(settings.data_dir),
    )


def create_prefcenter(context: PrefsContext, *, mount_path: str = "/prefs") -> ASGIApp:
    pages = PrefsPages(context.preferences)

    def refuse(request: Request, status: int, reason: str) -> Response:
        message = f"This form was not accepted: {reason}."
        if status == 403:
            message += " Go back, reload the page and try again."
        return pages.error(request, status, message)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return pages.error(request, status, "There is no such page here.")

    return Starlette(
        routes=[
            *UserSignIn(pages).routes(),
            *PreferenceViews(pages).routes(),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[
            Middleware(
                SessionMiddleware,
                secret_key=derive_key(context.secret, "prefs"),
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
