"""Paths inside a mounted sub-application (``/console``, ``/prefs``) and redirects within it."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse

__all__ = ("base_path", "current_target", "redirect", "safe_next")


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
