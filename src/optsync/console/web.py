"""Pieces both web pages share (console and preference center): templates, forms, headers.

Forms are read from ``application/x-www-form-urlencoded`` bodies with the standard library, so
no multipart parser is needed; a body over ``MAX_FORM_BYTES`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import parse_qs, quote

import jinja2
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = (
    "MAX_FORM_BYTES",
    "Form",
    "FormError",
    "SecurityHeaders",
    "base_path",
    "checked_form",
    "current_target",
    "make_templates",
    "read_form",
    "redirect",
    "safe_next",
)

MAX_FORM_BYTES = 64 * 1024

# Pages show personal data: no caching, no framing, scripts and styles from this server only.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


class FormError(Exception):
    """A form body that cannot be read; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Form:
    """The fields of one submitted form."""

    def __init__(self, fields: Mapping[str, Sequence[str]]) -> None:
        self._fields = {k: list(v) for k, v in fields.items()}

    def get(self, name: str, default: str = "") -> str:
        """The first value of ``name``, stripped of surrounding blanks."""
        values = self._fields.get(name)
        return values[0].strip() if values else default

    def getlist(self, name: str) -> list[str]:
        return [v.strip() for v in self._fields.get(name, [])]

    def __contains__(self, name: object) -> bool:
        return name in self._fields


async def read_form(request: Request) -> Form:
    """Parse an urlencoded body of at most ``MAX_FORM_BYTES``."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind not in ("application/x-www-form-urlencoded", ""):
        raise FormError(415, "Forms are sent as application/x-www-form-urlencoded")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise FormError(413, f"The form is over {MAX_FORM_BYTES // 1024} KB")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise FormError(400, "The form is not UTF-8") from None
    return Form(parse_qs(text, keep_blank_values=True, max_num_fields=1000))


def checked_form(request: Request) -> Form:
    """The form of a POST that passed the CSRF check (``auth.CsrfProtection`` put it there)."""
    form = request.scope.get("state", {}).get("form")
    if not isinstance(form, Form):
        raise RuntimeError("a POST reached a view without passing the CSRF middleware")
    return form


def base_path(request: Request) -> str:
    """Where this sub-application is mounted (``/console``, ``/prefs``), without a final ``/``."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def current_target(request: Request) -> str:
    """The request's path and query as sent (raw: ``%2F`` inside an endpoint id stays so)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else request.url.path
    query = request.scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


def redirect(request: Request, path: str) -> RedirectResponse:
    """303 See Other to ``path`` inside this sub-application."""
    return RedirectResponse(base_path(request) + path, status_code=303)


def safe_next(request: Request, target: str | None, default: str = "/") -> str:
    """``target`` when it is a path inside this sub-application, else ``default`` (no open
    redirects: ``//evil.example`` and absolute URLs are refused)."""
    base = base_path(request)
    if (
        target
        and target.startswith(base + "/")
        and not target.startswith("//")
        and "\\" not in target
        and not any(c in target for c in "\r\n")
    ):
        return target[len(base) :]
    return default


def _quote_segment(value: str) -> str:
    """Quote one path segment: endpoint ids may hold ``/``, ``+`` or ``%``."""
    return quote(value, safe="")


def _when(value: str | None) -> str:
    """An ISO-8601 UTC instant, easier to read: ``2026-05-01 12:00:00.123 UTC``."""
    if not value:
        return ""
    return value.replace("T", " ").removesuffix("Z") + (" UTC" if value.endswith("Z") else "")


def _position(value: str | None) -> str:
    """A zero-padded numeric position without its padding (other positions as they are)."""
    if not value:
        return ""
    return str(int(value)) if value.isdigit() else value


def make_templates(directory: Path) -> Jinja2Templates:
    """Jinja2 templates with autoescaping on and the filters the pages use."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["segment"] = _quote_segment
    env.filters["when"] = _when
    env.filters["position"] = _position
    return Jinja2Templates(env=env)


class SecurityHeaders:
    """Adds the headers in ``_HEADERS`` and ``Cache-Control: no-store`` to every page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_static = scope["path"][len(scope.get("root_path", "")) :].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in _HEADERS.items():
                    headers.setdefault(name, value)
                if not is_static:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)
