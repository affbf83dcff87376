"""The preferences page: the user's addresses, and a switch per address to turn messages on/off."""

from __future__ import annotations

import logging
import re

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.engine.models import ChannelType
from optsync.prefcenter.pages import PrefsPages
from optsync.redaction import mask_address
from optsync.web.forms import checked_form
from optsync.web.paths import redirect

__all__ = ("CHANNEL_WORDS", "PreferenceViews")

logger = logging.getLogger(__name__)

CHANNEL_WORDS = {
    ChannelType.SMS: "Text messages (SMS)",
    ChannelType.EMAIL: "E-mail",
    ChannelType.VOICE: "Voice calls",
}


_ROW = re.compile(r"[0-9]{1,18}")
"""A rowid as the form sends it (18 digits stay within SQLite's 64-bit integers)."""


class PreferenceViews:
    def __init__(self, pages: PrefsPages) -> None:
        self.pages = pages

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.show, methods=["GET"]),
            Route("/optin", self.change, methods=["POST"]),
        ]

    async def show(self, request: Request) -> Response:
        user = self.pages.user(request)
        if user is None:
            return self.pages.render(request, "signin.html", error=None, user_id="")
        store = self.pages.preferences
        preferences = await run_in_threadpool(store.preferences, user)
        emails = await run_in_threadpool(store.other_emails, user)
        return self.pages.render(
            request,
            "preferences.html",
            preferences=preferences,
            emails=emails,
            words=CHANNEL_WORDS,
        )

    async def change(self, request: Request) -> Response:
        form = checked_form(request)
        user = self.pages.user(request)
        if user is None:
            return redirect(request, "/")
        try:
            channel = ChannelType(form.get("channel"))
        except ValueError:
            return self.pages.error(request, 400, "That channel is not one this page offers.")
        opted_in = form.get("optin") == "1"
        row = form.get("row")
        address = None
        if _ROW.fullmatch(row):
            address = await run_in_threadpool(
                self.pages.preferences.set_opt_in, user, channel, int(row), opted_in
            )
        if address is None:
            return self.pages.error(request, 404, "That address is not one of yours.")
        logger.info(
            "preference changed channel=%s opted_in=%s", channel.value, "yes" if opted_in else "no"
        )
        what = CHANNEL_WORDS.get(channel, channel.value)
        self.pages.flash(
            request,
            f"Saved: {what} {'on' if opted_in else 'off'} for {mask_address(address)}. "
            "The change is in the application database; optsync carries it to the engine.",
        )
        return redirect(request, "/")
