"""Routing on the raw (still percent-encoded) path, so ``%2F`` inside an endpoint id works.

Each path is split on ``/`` first and each segment decoded after; a ``{name}`` segment matches
any non-empty segment. A path that matches a route under another method answers 405.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from optsync.api.errors import ApiError
from optsync.engine.store import EndpointStore
from optsync.formats.json_text import LONE_SURROGATE, TOO_DEEP, has_lone_surrogate

__all__ = ("Call", "Reply", "Route", "Router")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class Reply:
    """A handler's answer: the modelled status and the bare payload."""

    status: int
    payload: Any


@dataclass
class Call:
    """One request as a handler sees it."""

    store: EndpointStore
    method: str
    params: Mapping[str, str]
    query: Mapping[str, str]
    body: bytes
    request_id: str
    context: Mapping[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON; an empty body reads as ``{}``."""
        if not self.body.strip():
            return {}
        try:
            value = json.loads(self.body)
        except RecursionError:
            raise ApiError.bad_request(f"The request body {TOO_DEEP}") from None
        except ValueError as exc:
            raise ApiError.bad_request(f"The request body is not valid JSON: {exc}") from None
        if has_lone_surrogate(value, self.body):
            raise ApiError.bad_request(f"The request body {LONE_SURROGATE}")
        return value

    def page(self) -> tuple[int, str | None]:
        """``page-size`` and ``token`` query parameters."""
        raw = self.query.get("page-size")
        size = DEFAULT_PAGE_SIZE
        if raw is not None:
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE_SIZE:
                raise ApiError.bad_request(
                    f"page-size must be a whole number from 1 to {MAX_PAGE_SIZE}, not {raw!r}"
                )
            size = int(raw)
        return size, self.query.get("token") or None


Handler = Callable[[Call], Reply]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    handler: Handler

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.template.strip("/").split("/"))


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        # Routes by segment count, in their given order, each with its literal segments and its
        # {name} segments by position: a path is only compared with routes of its own length.
        self._by_length: dict[int, list[_Pattern]] = {}
        for route in routes:
            parts = route.parts
            literals = tuple((i, p) for i, p in enumerate(parts) if not p.startswith("{"))
            names = tuple((i, p[1:-1]) for i, p in enumerate(parts) if p.startswith("{"))
            self._by_length.setdefault(len(parts), []).append((route, literals, names))

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
        stripped = raw_path.strip("/")
        segments = stripped.split("/") if stripped else []
        allowed: list[str] = []
        for route, literals, names in self._by_length.get(len(segments), ()):
            if not all(segments[i] == literal for i, literal in literals):
                continue
            if not all(segments[i] for i, _ in names):
                continue  # an empty {name} segment matches nothing
            if route.method == method:
                return route, {name: unquote(segments[i]) for i, name in names}
            allowed.append(route.method)
        if allowed:
            raise ApiError.method_not_allowed(
                f"{method} is not allowed on {raw_path}; use {' or '.join(sorted(set(allowed)))}"
            )
        raise ApiError.not_found(
            f"No operation at {method} {raw_path}: see the README for the supported Pinpoint "
            "operations"
        )


_Pattern = tuple[Route, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]


def parse_query(raw_query: str) -> dict[str, str]:
    return dict(parse_qsl(raw_query, keep_blank_values=True))
