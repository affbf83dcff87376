"""Endpoint search and the endpoint page (attributes and consent history)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.console.pages import Pages
from optsync.console.search import DEFAULT_REGION, find_endpoints
from optsync.console.sinks import Journeys
from optsync.engine.models import ConsentChange, Endpoint
from optsync.errors import InvalidRequest, NotFound
from optsync.web.forms import checked_form
from optsync.web.paths import redirect, safe_next

__all__ = ("EndpointViews",)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fact:
    """One labelled value on the endpoint page; ``address`` values are masked until revealed."""

    label: str
    value: str
    address: bool = False


def _facts(endpoint: Endpoint) -> dict[str, list[Fact]]:
    """The endpoint's fields, grouped as the page shows them; empty fields left out."""
    loc, demo = endpoint.location, endpoint.demographic
    groups: dict[str, list[tuple[str, object]]] = {
        "Endpoint": [
            ("Channel", endpoint.channel_type.value),
            ("User id", endpoint.user_id),
            ("Effective date", endpoint.effective_date),
            ("Created", endpoint.creation_date),
            ("Source position", endpoint.source_position),
            ("Cohort id", endpoint.cohort_id),
        ],
        "Location": [
            ("Country", loc.country),
            ("Region", loc.region),
            ("City", loc.city),
            ("Postal code", loc.postal_code),
            ("Latitude", loc.latitude),
            ("Longitude", loc.longitude),
        ],
        "Demographic": [
            ("Platform", demo.platform),
            ("Platform version", demo.platform_version),
            ("Make", demo.make),
            ("Model", demo.model),
            ("App version", demo.app_version),
            ("Locale", demo.locale),
            ("Time zone", demo.timezone),
        ],
        "Attributes": [(k, ", ".join(v)) for k, v in sorted(endpoint.attributes.items())],
        "User attributes": [(k, ", ".join(v)) for k, v in sorted(endpoint.user_attributes.items())],
        "Metrics": [(k, f"{v:g}") for k, v in sorted(endpoint.metrics.items())],
    }
    out: dict[str, list[Fact]] = {}
    for group, pairs in groups.items():
        facts = [Fact(label, str(value)) for label, value in pairs if value not in (None, "")]
        if facts:
            out[group] = facts
    return out


class EndpointViews:
    def __init__(self, pages: Pages, journeys: Journeys | None = None) -> None:
        self.pages = pages
        self.journeys = journeys

    def routes(self) -> list[BaseRoute]:
        guard = self.pages.signed_in
        return [
            Route("/endpoints", guard(self.current), methods=["GET"]),
            Route("/apps/{app_id}/endpoints", guard(self.search), methods=["GET"]),
            Route("/apps/{app_id}/endpoints/{endpoint_id:path}", guard(self.show), methods=["GET"]),
            Route("/reveal", guard(self.reveal), methods=["POST"]),
        ]

    async def current(self, request: Request) -> Response:
        app = await self.pages.current_app(request)
        if app is None:
            return redirect(request, "/")
        query = f"?{request.url.query}" if request.url.query else ""
        return redirect(request, f"/apps/{app.id}/endpoints{query}")

    async def search(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        query = request.query_params.get("q", "").strip()
        results = (
            await run_in_threadpool(find_endpoints, self.pages.context.store, app.id, query)
            if query
            else []
        )
        return self.pages.render(
            request,
            "endpoints.html",
            app=app,
            nav="endpoints",
            query=query,
            results=results,
            region=DEFAULT_REGION,
        )

    async def show(self, request: Request) -> Response:
        app = await self.pages.app_or_404(request)
        endpoint_id = request.path_params["endpoint_id"]
        store = self.pages.context.store

        def load() -> tuple[Endpoint | None, list[ConsentChange]]:
            try:
                endpoint: Endpoint | None = store.get_endpoint(app.id, endpoint_id)
            except (NotFound, InvalidRequest):
                endpoint = None
            try:
                history = store.consent_history(app.id, endpoint_id)
            except (NotFound, InvalidRequest):
                history = []
            return endpoint, history

        endpoint, history = await run_in_threadpool(load)
        if endpoint is None and not history:
            return self.pages.render(
                request,
                "error.html",
                404,
                app=app,
                nav="endpoints",
                title="No such endpoint",
                message="This app has no endpoint with that id, and never had one.",
            )
        journeys = await self.journeys(app.id, history) if self.journeys is not None else {}
        return self.pages.render(
            request,
            "endpoint.html",
            app=app,
            nav="endpoints",
            endpoint_id=endpoint.id if endpoint else endpoint_id,
            endpoint=endpoint,
            facts=_facts(endpoint) if endpoint else {},
            history=list(reversed(history)),
            journeys=journeys,
        )

    async def reveal(self, request: Request) -> Response:
        form = checked_form(request)
        on = form.get("reveal") == "on"
        self.pages.set_reveal(request, on)
        logger.info(
            "console addresses %s key_id=%s",
            "shown" if on else "masked",
            self.pages.operator(request),
        )
        return redirect(request, safe_next(request, form.get("next")))
