"""Rendering console pages: the values every template gets, error pages, the sign-in guard."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from optsync.console.context import ConsoleContext
from optsync.engine.models import App
from optsync.errors import NotFound
from optsync.redaction import mask_address, mask_text
from optsync.web.csrf import csrf_token
from optsync.web.paths import base_path, current_target, redirect
from optsync.web.templates import make_templates

__all__ = ("ConsoleError", "Pages", "View")

TEMPLATES = Path(__file__).parent / "templates"

View = Callable[[Request], Awaitable[Response]]

_OPERATOR = "operator"
_REVEAL = "reveal"
_APP = "app"
_FLASH = "flash"


class ConsoleError(Exception):
    """Answer with the error page: ``status``, a short title and what to do next."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(f"{status} {title}: {message}")
        self.status = status
        self.title = title
        self.message = message


class Pages:
    """Templates plus the per-request values they need (operator, CSRF token, masking)."""

    def __init__(self, context: ConsoleContext) -> None:
        self.context = context
        self.templates = make_templates(TEMPLATES)

    # sessions ---------------------------------------------------------------------------------
    def operator(self, request: Request) -> str | None:
        """The signed-in key id, if its pair is still configured."""
        key_id = request.session.get(_OPERATOR)
        if isinstance(key_id, str) and key_id in self.context.credentials:
            return key_id
        return None

    def reveals(self, request: Request) -> bool:
        """Whether the operator asked to see addresses unmasked."""
        return request.session.get(_REVEAL) is True

    def set_reveal(self, request: Request, on: bool) -> None:
        request.session[_REVEAL] = on

    def flash(self, request: Request, message: str) -> None:
        """A one-time message for the next page (after a redirect)."""
        request.session[_FLASH] = message

    def remember_app(self, request: Request, app_id: str) -> None:
        if request.session.get(_APP) != app_id:
            request.session[_APP] = app_id

    async def current_app(self, request: Request) -> App | None:
        """The app the operator last looked at, else the default one, else the first."""
        store = self.context.store
        remembered = request.session.get(_APP)

        def find() -> App | None:
            if isinstance(remembered, str):
                try:
                    return store.get_app(remembered)
                except NotFound:
                    pass
            if self.context.default_app:
                app = store.find_app(self.context.default_app)
                if app is not None:
                    return app
            first = store.list_apps(1, None).items
            return first[0] if first else None

        return await run_in_threadpool(find)

    async def app_or_404(self, request: Request) -> App:
        """The app named by the ``app_id`` path parameter; remembered as the current app."""
        app_id = request.path_params["app_id"]
        try:
            app = await run_in_threadpool(self.context.store.get_app, app_id)
        except NotFound:
            raise ConsoleError(
                404, "No such app", "The app may have been deleted; pick one on the Apps page."
            ) from None
        self.remember_app(request, app.id)
        return app

    # rendering --------------------------------------------------------------------------------
    def render(
        self, request: Request, name: str, http_status: int = 200, **values: Any
    ) -> Response:
        reveal = self.reveals(request)
        base = base_path(request)
        values.setdefault("app", None)
        values.setdefault("nav", "")
        values.update(
            base=base,
            operator=self.operator(request),
            csrf_token=csrf_token(request.session),
            reveal=reveal,
            here=current_target(request),
            show=(lambda a: a or "") if reveal else mask_address,
            show_id=(lambda t: t) if reveal else mask_text,
            has_pipeline=self.context.has_pipeline,
            flash=request.session.pop(_FLASH, None),
        )
        return self.templates.TemplateResponse(request, name, values, status_code=http_status)

    def error(self, request: Request, exc: ConsoleError) -> Response:
        return self.render(request, "error.html", exc.status, title=exc.title, message=exc.message)

    # guards -----------------------------------------------------------------------------------
    def signed_in(self, view: View) -> View:
        """Only for a signed-in operator; others get the sign-in page (and come back after)."""

        @functools.wraps(view)
        async def guarded(request: Request) -> Response:
            if self.operator(request) is None:
                target = quote(current_target(request), safe="/")
                return redirect(request, f"/login?next={target}")
            try:
                return await view(request)
            except ConsoleError as exc:
                return self.error(request, exc)

        return guarded

    def signed_in_json(self, view: View) -> View:
        """Only for a signed-in operator; others get 401 with a JSON body (for page scripts)."""

        @functools.wraps(view)
        async def guarded(request: Request) -> Response:
            if self.operator(request) is None:
                return JSONResponse({"error": "signed out"}, status_code=401)
            try:
                return await view(request)
            except ConsoleError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)

        return guarded
