"""Segments: list, create, edit and delete them, and watch a segment's estimate live.

The form offers the dimensions of Pinpoint's ``SegmentDimensions``: Location.Country, the
Demographic set dimensions (Channel, Platform, Make, Model, AppVersion, DeviceType),
Attributes and UserAttributes (every AttributeType) and Metrics. It is turned into a
``WriteSegmentRequest`` and read by the API's own ``definition_from_wire``, so the console
accepts and refuses exactly what the API does. Segments built from ``SegmentGroups`` are shown
but edited through the API.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from optsync.console.pages import ConsoleError, Pages
from optsync.engine.models import App, ChannelType, Estimate, iso_now
from optsync.engine.segments import (
    AttributeType,
    DimensionType,
    MetricOperator,
    SegmentDefinition,
    SegmentDimensions,
    SetDimension,
    definition_from_wire,
    definition_to_wire,
)
from optsync.engine.store import Segment
from optsync.errors import InvalidRequest, NotFound
from optsync.web.forms import Form, checked_form
from optsync.web.paths import redirect

__all__ = ("DEMOGRAPHIC_DIMENSIONS", "SegmentForm", "SegmentViews", "describe")

logger = logging.getLogger(__name__)

DEMOGRAPHIC_DIMENSIONS = ("Channel", "Platform", "Make", "Model", "AppVersion", "DeviceType")
ATTRIBUTE_SCOPES = {"Attributes": "On endpoint", "UserAttributes": "On user"}
MAX_ROWS = 50
# The channels people filter on most come first.
_COMMON = ("SMS", "EMAIL", "VOICE", "PUSH", "IN_APP", "CUSTOM")
CHANNEL_ORDER = [*_COMMON, *(c.value for c in ChannelType if c.value not in _COMMON)]
_OPERATOR_WORDS = {
    MetricOperator.GREATER_THAN: ">",
    MetricOperator.LESS_THAN: "<",
    MetricOperator.GREATER_THAN_OR_EQUAL: "≥",
    MetricOperator.LESS_THAN_OR_EQUAL: "≤",
    MetricOperator.EQUAL: "=",
}


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


@dataclass
class SetRow:
    """A set dimension as the form holds it: INCLUSIVE/EXCLUSIVE and comma-separated values."""

    type: str = DimensionType.INCLUSIVE.value
    values: str = ""

    @classmethod
    def of(cls, dimension: SetDimension | None) -> SetRow:
        if dimension is None:
            return cls()
        return cls(dimension.dimension_type.value, ", ".join(dimension.values))

    def to_wire(self) -> dict[str, Any]:
        return {"DimensionType": self.type, "Values": _split(self.values)}


@dataclass
class AttributeRow:
    scope: str = "Attributes"
    name: str = ""
    type: str = AttributeType.INCLUSIVE.value
    values: str = ""

    @property
    def blank(self) -> bool:
        return not self.name and not self.values


@dataclass
class MetricRow:
    name: str = ""
    operator: str = MetricOperator.GREATER_THAN.value
    value: str = ""

    @property
    def blank(self) -> bool:
        return not self.name and not self.value


@dataclass
class SegmentForm:
    """The segment form's fields; converts from a definition and to a WriteSegmentRequest."""

    name: str = ""
    country: SetRow = field(default_factory=SetRow)
    demographic: dict[str, SetRow] = field(
        default_factory=lambda: {k: SetRow() for k in DEMOGRAPHIC_DIMENSIONS}
    )
    attributes: list[AttributeRow] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)

    @classmethod
    def of(cls, definition: SegmentDefinition) -> SegmentForm:
        """The form for an existing dimensional segment."""
        dims = definition.dimensions or SegmentDimensions()
        attributes = [
            AttributeRow(scope, name, d.attribute_type.value, ", ".join(d.values))
            for scope, mapping in (
                ("Attributes", dims.attributes),
                ("UserAttributes", dims.user_attributes),
            )
            for name, d in mapping.items()
        ]
        return cls(
            name=definition.name or "",
            country=SetRow.of(dims.country),
            demographic={k: SetRow.of(dims.demographic.get(k)) for k in DEMOGRAPHIC_DIMENSIONS},
            attributes=attributes,
            metrics=[
                MetricRow(name, m.operator.value, f"{m.value:g}")
                for name, m in dims.metrics.items()
            ],
        )

    @classmethod
    def read(cls, form: Form) -> SegmentForm:
        """The fields of a submitted form (blank rows are kept, and dropped by ``to_wire``)."""
        demographic = {}
        for key in DEMOGRAPHIC_DIMENSIONS:
            values = ", ".join(form.getlist(f"demo-{key}-values"))
            demographic[key] = SetRow(form.get(f"demo-{key}-type", "INCLUSIVE"), values)
        attributes = [
            AttributeRow(
                form.get(f"attr-{i}-scope", "Attributes"),
                form.get(f"attr-{i}-name"),
                form.get(f"attr-{i}-type", "INCLUSIVE"),
                form.get(f"attr-{i}-values"),
            )
            for i in range(MAX_ROWS)
            if f"attr-{i}-name" in form
        ]
        metrics = [
            MetricRow(
                form.get(f"metric-{i}-name"),
                form.get(f"metric-{i}-operator", "GREATER_THAN"),
                form.get(f"metric-{i}-value"),
            )
            for i in range(MAX_ROWS)
            if f"metric-{i}-name" in form
        ]
        return cls(
            name=form.get("name"),
            country=SetRow(form.get("country-type", "INCLUSIVE"), form.get("country-values")),
            demographic=demographic,
            attributes=attributes,
            metrics=metrics,
        )

    def to_wire(self) -> dict[str, Any]:
        """The WriteSegmentRequest; raises ``InvalidRequest`` naming the row that is wrong."""
        dimensions: dict[str, Any] = {}
        if _split(self.country.values):
            row = SetRow(self.country.type, self.country.values.upper())
            dimensions["Location"] = {"Country": row.to_wire()}
        demographic = {k: r.to_wire() for k, r in self.demographic.items() if _split(r.values)}
        if demographic:
            dimensions["Demographic"] = demographic
        for n, attribute in enumerate(self.attributes, start=1):
            if attribute.blank:
                continue
            if not attribute.name:
                raise InvalidRequest(f"Attribute row {n}: give the attribute's name")
            if attribute.scope not in ATTRIBUTE_SCOPES:
                raise InvalidRequest(f"Attribute row {n}: choose endpoint or user attribute")
            scope = dimensions.setdefault(attribute.scope, {})
            if attribute.name in scope:
                raise InvalidRequest(
                    f"Attribute row {n}: {attribute.name!r} is already filtered on"
                )
            scope[attribute.name] = {
                "AttributeType": attribute.type,
                "Values": _split(attribute.values),
            }
        for n, metric in enumerate(self.metrics, start=1):
            if metric.blank:
                continue
            if not metric.name:
                raise InvalidRequest(f"Metric row {n}: give the metric's name")
            try:
                value = float(metric.value)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise InvalidRequest(f"Metric row {n}: {metric.value!r} is not a number")
            dimensions.setdefault("Metrics", {})[metric.name] = {
                "ComparisonOperator": metric.operator,
                "Value": value,
            }
        return {"Name": self.name, "Dimensions": dimensions}

    def definition(self) -> SegmentDefinition:
        """Read by the API's parser: the same rules and messages as CreateSegment."""
        return definition_from_wire(self.to_wire(), require_name=True)

    def with_blank_rows(self) -> SegmentForm:
        """The form to show: one empty attribute row and one empty metric row to fill in."""
        return SegmentForm(
            name=self.name,
            country=self.country,
            demographic=self.demographic,
            attributes=[*[r for r in self.attributes if not r.blank], AttributeRow()],
            metrics=[*[m for m in self.metrics if not m.blank], MetricRow()],
        )


def _set_words(label: str, d: SetDimension) -> str:
    verb = "is" if d.dimension_type is DimensionType.INCLUSIVE else "is not"
    if len(d.values) > 1:
        verb += " one of"
    return f"{label} {verb} {', '.join(d.values)}"


def _dimension_words(dims: SegmentDimensions) -> list[str]:
    lines = []
    if dims.country is not None:
        lines.append(_set_words("Country", dims.country))
    for key, d in dims.demographic.items():
        lines.append(_set_words(key, d))
    for label, mapping in (
        ("Attribute", dims.attributes),
        ("User attribute", dims.user_attributes),
    ):
        for name, a in mapping.items():
            kind = a.attribute_type.value.lower()
            lines.append(f"{label} {name} {kind} {', '.join(a.values)}")
    for name, m in dims.metrics.items():
        lines.append(f"Metric {name} {_OPERATOR_WORDS[m.operator]} {m.value:g}")
    return lines


def describe_import(segment: Segment) -> list[str]:
    """An IMPORT segment in words: where its members came from and how many exist now."""
    source = segment.import_definition
    assert source is not None
    counts = ", ".join(f"{c} {n:,}" for c, n in sorted(source.channel_counts.items()))
    return [
        f"Imported from {source.s3_url} ({source.format}, {source.size:,} endpoints listed)",
        f"Members that exist now, per channel: {counts or 'none'}",
        "A static list: opted-out or inactive members stay members but are not eligible",
    ]


def describe(definition: SegmentDefinition) -> list[str]:
    """The segment's filter in words, one condition a line (all must hold)."""
    if definition.groups is not None:
        groups = definition.groups
        lines = [f"Segment groups, {groups.include.value} of them must match:"]
        for n, group in enumerate(groups.groups, start=1):
            parts = [f"{len(group.source_segments)} source segment(s) ({group.source_type})"]
            for dims in group.dimensions:
                parts.extend(_dimension_words(dims))
            lines.append(f"Group {n} ({group.type.value}): " + "; ".join(parts))
        return lines
    lines = _dimension_words(definition.dimensions or SegmentDimensions())
    return lines or ["Every endpoint of the app"]


@dataclass(frozen=True)
class SegmentRow:
    segment: Segment
    estimate: Estimate


class SegmentViews:
    def __init__(self, pages: Pages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        page, json_ = self.pages.signed_in, self.pages.signed_in_json
        base = "/apps/{app_id}/segments"
        return [
            Route("/segments", page(self.current), methods=["GET"]),
            Route(base, page(self.index), methods=["GET"]),
            Route(base, page(self.create), methods=["POST"]),
            Route(base + "/new", page(self.new), methods=["GET"]),
            Route(base + "/{segment_id}", page(self.show), methods=["GET"]),
            Route(base + "/{segment_id}", page(self.update), methods=["POST"]),
            Route(base + "/{segment_id}/edit", page(self.edit), methods=["GET"]),
            Route(base + "/{segment_id}/delete", page(self.delete), methods=["POST"]),
            Route(base + "/{segment_id}/estimate", json_(self.estimate), methods=["GET"]),
        ]

    # helpers ----------------------------------------------------------------------------------
    async def _segment(self, app: App, request: Request) -> Segment:
        segment_id = request.path_params["segment_id"]
        try:
            return await run_in_threadpool(self.pages.context.store.get_segment, app.id, segment_id)
        except NotFound:
            raise ConsoleError(
                404, "No such segment", "It may have been deleted; see the app's segments."
            ) from None

    def _form_page(
        self,
        request: Request,
        app: App,
        form: SegmentForm,
        segment: Segment | None,
        error: str | None = None,
    ) -> Response:
        return self.pages.render(
            request,
            "segment_form.html",
            400 if error else 200,
            app=app,
            nav="segments",
            form=form.with_blank_rows(),
            segment=segment,
            error=error,
            channels=CHANNEL_ORDER,
            demographic_keys=DEMOGRAPHIC_DIMENSIONS,
            attribute_types=[t.value for t in AttributeType],
            attribute_scopes=ATTRIBUTE_SCOPES,
            metric_operators=[o.value for o in MetricOperator],
            blank_attribute=AttributeRow(),
            blank_metric=MetricRow(),
        )

    # views ------------------------------------------------------------------------------------
    async def current(self, request: Request) -> Response:
        app = await self.pages.current_app(request)
        if app is None:
            return redirect(request, "/")
        return redirect(request, f"/apps/{app.id}/segments")

    async def index(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        store = self.pages.context.store

        def load() -> list[SegmentRow]:
            segments = store.list_segments(app.id, 100, None).items
            return [SegmentRow(s, store.estimate(app.id, s.id)) for s in segments]

        rows = await run_in_threadpool(load)
        return self.pages.render(request, "segments.html", app=app, nav="segments", rows=rows)

    async def new(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        return self._form_page(request, app, SegmentForm(), None)

    async def create(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        form = SegmentForm.read(checked_form(request))
        try:
            definition = form.definition()
            segment = await run_in_threadpool(
                self.pages.context.store.create_segment, app.id, definition
            )
        except InvalidRequest as exc:
            return self._form_page(request, app, form, None, str(exc))
        logger.info(
            "console segment created app=%s segment=%s key_id=%s",
            app.id,
            segment.id,
            self.pages.operator(request),
        )
        return redirect(request, f"/apps/{app.id}/segments/{segment.id}")

    async def show(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        segment = await self._segment(app, request)
        estimate = await run_in_threadpool(self.pages.context.store.estimate, app.id, segment.id)
        wire = definition_to_wire(segment.definition)
        conditions = describe(segment.definition)
        source = segment.import_definition
        if source is not None:
            conditions = describe_import(segment)
            wire = {
                "SegmentType": segment.segment_type,
                "ImportDefinition": {
                    "ChannelCounts": dict(source.channel_counts),
                    "Format": source.format,
                    "S3Url": source.s3_url,
                    "Size": source.size,
                },
            }
        return self.pages.render(
            request,
            "segment.html",
            app=app,
            nav="segments",
            segment=segment,
            estimate=estimate,
            conditions=conditions,
            wire=json.dumps({"Name": segment.definition.name, **wire}, indent=2),
            poll_ms=int(self.pages.context.poll_seconds * 1000),
        )

    async def edit(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        segment = await self._segment(app, request)
        if segment.import_definition is not None:
            raise ConsoleError(
                409,
                "This segment is an imported list",
                "Its members come from the imported file and cannot be filtered here; rename "
                "it with an UpdateSegment request, or build a segment on it with SegmentGroups.",
            )
        if segment.definition.groups is not None:
            raise ConsoleError(
                409,
                "Edit this segment through the API",
                "It is built from SegmentGroups, which the console's form does not offer; "
                "send an UpdateSegment request instead.",
            )
        return self._form_page(request, app, SegmentForm.of(segment.definition), segment)

    async def update(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        segment = await self._segment(app, request)
        form = SegmentForm.read(checked_form(request))
        try:
            definition = form.definition()
            updated = await run_in_threadpool(
                self.pages.context.store.update_segment, app.id, segment.id, definition
            )
        except InvalidRequest as exc:
            return self._form_page(request, app, form, segment, str(exc))
        logger.info(
            "console segment updated app=%s segment=%s version=%d key_id=%s",
            app.id,
            segment.id,
            updated.version,
            self.pages.operator(request),
        )
        return redirect(request, f"/apps/{app.id}/segments/{segment.id}")

    async def delete(self, request: Request) -> Response:
        checked_form(request)
        app = await self.pages.app_or_404(request)
        segment = await self._segment(app, request)
        await run_in_threadpool(self.pages.context.store.delete_segment, app.id, segment.id)
        logger.info(
            "console segment deleted app=%s segment=%s key_id=%s",
            app.id,
            segment.id,
            self.pages.operator(request),
        )
        return redirect(request, f"/apps/{app.id}/segments")

    async def estimate(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        segment_id = request.path_params["segment_id"]
        try:
            estimate = await run_in_threadpool(
                self.pages.context.store.estimate, app.id, segment_id
            )
        except NotFound:
            return JSONResponse({"error": "no such segment"}, status_code=404)
        return JSONResponse(
            {"total": estimate.total, "eligible": estimate.eligible, "at": iso_now()}
        )
