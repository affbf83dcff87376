"""Segments: Create/Get/Update/DeleteSegment, GetSegments, GetSegmentVersion(s), and the
segment-estimate extension route."""

from __future__ import annotations

from typing import Any

from optsync.api.errors import ApiError
from optsync.api.routing import Call, Reply, Route
from optsync.api.wire import segment_to_wire
from optsync.engine.segments import definition_from_wire
from optsync.engine.store import Segment

__all__ = ("ROUTES",)


def _page(items: tuple[Segment, ...], token: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"Item": [segment_to_wire(s) for s in items]}
    if token:
        out["NextToken"] = token
    return out


def _version(call: Call, name: str) -> int | None:
    raw = call.params.get(name) or call.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ApiError.bad_request(f"{name} must be a positive whole number, not {raw!r}")
    return int(raw)


def create_segment(call: Call) -> Reply:
    definition = definition_from_wire(call.json(), require_name=True)
    return Reply(201, segment_to_wire(call.store.create_segment(call.params["app"], definition)))


def update_segment(call: Call) -> Reply:
    definition = definition_from_wire(call.json(), require_name=False)
    segment = call.store.update_segment(call.params["app"], call.params["segment"], definition)
    return Reply(200, segment_to_wire(segment))


def get_segment(call: Call) -> Reply:
    segment = call.store.get_segment(call.params["app"], call.params["segment"])
    return Reply(200, segment_to_wire(segment))


def get_segments(call: Call) -> Reply:
    size, token = call.page()
    page = call.store.list_segments(call.params["app"], size, token)
    return Reply(200, _page(page.items, page.next_token))


def get_segment_version(call: Call) -> Reply:
    segment = call.store.get_segment(
        call.params["app"], call.params["segment"], _version(call, "version")
    )
    return Reply(200, segment_to_wire(segment))


def get_segment_versions(call: Call) -> Reply:
    size, token = call.page()
    page = call.store.list_segment_versions(call.params["app"], call.params["segment"], size, token)
    return Reply(200, _page(page.items, page.next_token))


def delete_segment(call: Call) -> Reply:
    segment = call.store.delete_segment(call.params["app"], call.params["segment"])
    return Reply(200, segment_to_wire(segment))


def estimate(call: Call) -> Reply:
    """Extension: total and eligible (ACTIVE, OptOut NONE) endpoints of a segment."""
    version = _version(call, "version")
    result = call.store.estimate(call.params["app"], call.params["segment"], version)
    return Reply(200, {"TotalEndpoints": result.total, "EligibleEndpoints": result.eligible})


ROUTES = [
    Route("POST", "/v1/apps/{app}/segments", create_segment),
    Route("GET", "/v1/apps/{app}/segments", get_segments),
    Route("GET", "/v1/apps/{app}/segments/{segment}", get_segment),
    Route("PUT", "/v1/apps/{app}/segments/{segment}", update_segment),
    Route("DELETE", "/v1/apps/{app}/segments/{segment}", delete_segment),
    Route("GET", "/v1/apps/{app}/segments/{segment}/versions", get_segment_versions),
    Route("GET", "/v1/apps/{app}/segments/{segment}/versions/{version}", get_segment_version),
    Route("GET", "/v1/apps/{app}/segments/{segment}/estimate", estimate),
]
