"""Jinja2 templates for the pages: autoescaping, strict undefined names, and the filters."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import jinja2
from starlette.templating import Jinja2Templates

__all__ = ("make_templates",)


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
