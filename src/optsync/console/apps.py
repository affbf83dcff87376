"""The console's front page: every app with its channels, endpoint and segment counts."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.console.pages import Pages
from optsync.engine.models import App, Channel
from optsync.errors import InvalidRequest
from optsync.web.paths import redirect

__all__ = ("AppSummary", "AppViews")

PAGE_SIZE = 20


@dataclass(frozen=True)
class AppSummary:
    app: App
    channels: list[Channel]
    endpoints: int
    segments: int


class AppViews:
    def __init__(self, pages: Pages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        page = self.pages.signed_in
        return [
            Route("/", page(self.index), methods=["GET"]),
            Route("/apps/{app_id}", page(self.app), methods=["GET"]),
        ]

    async def index(self, request: Request) -> Response:
        store = self.pages.context.store
        token = request.query_params.get("token") or None

        def load() -> tuple[list[AppSummary], str | None]:
            page = store.list_apps(PAGE_SIZE, token)
            summaries = [
                AppSummary(
                    app=app,
                    channels=store.list_channels(app.id),
                    endpoints=store.count_endpoints(app.id),
                    segments=len(store.list_segments(app.id, 1000, None).items),
                )
                for app in page.items
            ]
            return summaries, page.next_token

        try:
            summaries, next_token = await run_in_threadpool(load)
        except InvalidRequest:
            return redirect(request, "/")
        current = await self.pages.current_app(request)
        return self.pages.render(
            request,
            "apps.html",
            app=current,
            nav="apps",
            summaries=summaries,
            next_token=next_token,
        )

    async def app(self, request: Request) -> Response:
        """Choosing an app makes it the current one; its segments are where work starts."""
        app = await self.pages.app_or_404(request)
        return redirect(request, f"/apps/{app.id}/segments")
