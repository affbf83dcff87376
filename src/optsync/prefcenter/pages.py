"""Rendering the preference center's pages and knowing who is signed in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from optsync.prefcenter.source import PreferenceStore
from optsync.redaction import mask_address
from optsync.web.csrf import csrf_token
from optsync.web.paths import base_path
from optsync.web.templates import make_templates

__all__ = ("PrefsPages",)

TEMPLATES = Path(__file__).parent / "templates"

_USER = "user"
_FLASH = "flash"


class PrefsPages:
    def __init__(self, preferences: PreferenceStore) -> None:
        self.preferences = preferences
        self.templates = make_templates(TEMPLATES)
        self.templates.env.filters["masked"] = mask_address

    def user(self, request: Request) -> str | None:
        user = request.session.get(_USER)
        return user if isinstance(user, str) and user else None

    def flash(self, request: Request, message: str) -> None:
        request.session[_FLASH] = message

    def render(
        self, request: Request, name: str, http_status: int = 200, **values: Any
    ) -> Response:
        values.update(
            base=base_path(request),
            user=self.user(request),
            csrf_token=csrf_token(request.session),
            flash=request.session.pop(_FLASH, None),
        )
        return self.templates.TemplateResponse(request, name, values, status_code=http_status)

    def error(self, request: Request, status: int, message: str) -> Response:
        return self.render(request, "error.html", status, message=message)
