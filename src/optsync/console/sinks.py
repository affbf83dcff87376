"""The Sinks section: each configured sink's progress in every app, its dead letters (sent again
on request) and its waiting changes, the opt-outs overdue; and, for the endpoint page, when each
of an endpoint's consent changes reached each sink.

Everything is read from the engine store: a sink's runner may live in another process (the one
holding the sink's lease). Targets are shown without secrets, addresses masked as elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from optsync.audit import format_duration
from optsync.console.pages import ConsoleError, Pages
from optsync.engine.ledger import (
    AuditRow,
    ConsentLedger,
    SinkDeadLetter,
    SinkState,
    SinkWaiting,
)
from optsync.engine.models import ConsentChange
from optsync.engine.store import EndpointStore
from optsync.sinks.settings import (
    AuditSettings,
    EumSinkSettings,
    PinpointApiSinkSettings,
    SinkSettings,
    WebhookSinkSettings,
)
from optsync.web.forms import checked_form
from optsync.web.paths import redirect

__all__ = (
    "AUDIT_GAP",
    "Journeys",
    "Overdue",
    "OverdueCount",
    "SinkRow",
    "SinkViews",
    "age_text",
    "endpoint_journeys",
    "iso_ms",
    "sink_target",
    "sink_type",
)

logger = logging.getLogger(__name__)

SHOWN = 100
"""Dead letters and waiting changes listed on a sink's page."""
AUDIT_GAP = 1000
"""Seqs between two of an endpoint's changes beyond which a new audit walk is cheaper."""

Journeys = Callable[[str, Sequence[ConsentChange]], Awaitable[Mapping[int, AuditRow]]]
"""(app id, an endpoint's changes) -> each change's audit row, by seq."""


@dataclass(frozen=True)
class Overdue:
    """Opt-outs older than the deadline that some sink has not delivered."""

    count: int
    deadline: str
    """The deadline as written in the config (``24h``)."""


OverdueCount = Callable[[], Awaitable[Overdue | None]]
"""The overdue opt-outs now (None: no sink configured)."""


@dataclass(frozen=True)
class SinkRow:
    """One configured sink with its state in every app."""

    name: str
    type: str
    target: str
    channels: str
    states: tuple[SinkState, ...]

    @property
    def holder(self) -> str | None:
        """The process delivering to it (None: nobody holds its lease)."""
        return next((s.holder for s in self.states if s.holder), None)

    @property
    def behind(self) -> int:
        return sum(s.behind for s in self.states)

    @property
    def dead_letters(self) -> int:
        return sum(s.dead_letters for s in self.states)

    @property
    def waiting(self) -> int:
        return sum(s.waiting for s in self.states)


# display text -----------------------------------------------------------------------------------
def sink_type(sink: SinkSettings) -> str:
    """The ``[[sink]] type`` the settings came from."""
    if isinstance(sink, EumSinkSettings):
        return "eum-sms"
    if isinstance(sink, WebhookSinkSettings):
        return "webhook"
    if isinstance(sink, PinpointApiSinkSettings):
        return "pinpoint-api"
    return "sink"


def _public_url(url: str) -> str:
    """``url`` without user info and query (where credentials and tokens go)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")


def sink_target(sink: SinkSettings) -> str:
    """Where the sink delivers, with no secret in it."""
    if isinstance(sink, EumSinkSettings):
        where = (
            f" at {_public_url(sink.endpoint_url)}"
            if sink.endpoint_url
            else (f" in {sink.region}" if sink.region else "")
        )
        return f"opt-out list {sink.opt_out_list}{where}"
    if isinstance(sink, WebhookSinkSettings):
        return _public_url(sink.url)
    if isinstance(sink, PinpointApiSinkSettings):
        return f"app {sink.app} at {_public_url(sink.url)} ({sink.region})"
    return ""


def iso_ms(epoch: float) -> str:
    """``epoch`` as the engine writes times: ISO-8601 UTC with milliseconds and ``Z``."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def age_text(iso: str, now: float) -> str:
    """How long ago ``iso`` (an engine time) was: ``45 s``, ``12 min``, ``3 h 5 min``."""
    try:
        seconds = int(max(0.0, now - datetime.fromisoformat(iso).timestamp()))
    except ValueError:
        return iso
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


# reading the store ------------------------------------------------------------------------------
def _runs(seqs: Sequence[int], gap: int) -> list[list[int]]:
    """Sorted ``seqs`` cut where two neighbours are more than ``gap`` apart."""
    runs: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if runs and seq - runs[-1][-1] <= gap:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return runs


def endpoint_journeys(
    ledger: ConsentLedger, sinks: Sequence[str], app_id: str, changes: Sequence[ConsentChange]
) -> dict[int, AuditRow]:
    """The audit row of each of ``changes`` (one endpoint's), by seq.

    ``audit`` walks all of the app's changes from a time, in seq order. One walk per run of
    the endpoint's changes (neighbours at most ``AUDIT_GAP`` seqs apart), from the run's
    earliest time and abandoned after its last seq, so an endpoint changed rarely in a busy app
    costs a few short walks, not one through everything in between.
    """
    at = {c.seq: c.at for c in changes}
    found: dict[int, AuditRow] = {}
    for run in _runs(list(at), AUDIT_GAP):
        wanted, last = set(run), run[-1]
        for row in ledger.audit(sinks, since=min(at[s] for s in run), app_id=app_id):
            seq = row.change.seq
            if seq in wanted:
                found[seq] = row
            if seq >= last:
                break  # the walk reads page by page: leaving it holds nothing open
    return found


def _app_names(store: EndpointStore) -> dict[str, str]:
    names: dict[str, str] = {}
    token: str | None = None
    while True:
        page = store.list_apps(1000, token)
        names.update((a.id, a.name) for a in page.items)
        token = page.next_token
        if token is None:
            return names


def _waiting_changes(
    ledger: ConsentLedger, waiting: Sequence[SinkWaiting]
) -> dict[tuple[str, int], ConsentChange]:
    """The change of each waiting entry, by (app id, seq): one read per app."""
    by_app: dict[str, list[int]] = {}
    for w in waiting:
        by_app.setdefault(w.app_id, []).append(w.seq)
    return {
        (app_id, c.seq): c
        for app_id, seqs in by_app.items()
        for c in ledger.consent_changes(app_id, 0, len(seqs), seqs=sorted(set(seqs)))
    }


# the pages --------------------------------------------------------------------------------------
class SinkViews:
    """``/sinks`` and ``/sinks/{name}``; also the overdue count and the endpoint page's
    journeys, for the pipeline and endpoint pages."""

    def __init__(
        self,
        pages: Pages,
        sinks: Sequence[SinkSettings],
        audit: AuditSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pages = pages
        self.sinks = {s.name: s for s in sinks}
        self.deadline = audit.deadline
        self.clock = clock

    def routes(self) -> list[BaseRoute]:
        guard = self.pages.signed_in
        return [
            Route("/sinks", guard(self.index), methods=["GET"]),
            Route("/sinks/{name}", guard(self.show), methods=["GET"]),
            Route("/sinks/{name}/retry", guard(self.retry), methods=["POST"]),
        ]

    @property
    def store(self) -> EndpointStore:
        return self.pages.context.store

    def _row(self, sink: SinkSettings) -> SinkRow:
        channels = "all" if sink.channels is None else ", ".join(sorted(sink.channels))
        return SinkRow(
            name=sink.name,
            type=sink_type(sink),
            target=sink_target(sink),
            channels=channels,
            states=tuple(self.store.sink_states(sink.name)),
        )

    def _sink_or_404(self, request: Request) -> SinkSettings:
        sink = self.sinks.get(request.path_params["name"])
        if sink is None:
            raise ConsoleError(
                404,
                "No such sink",
                "No [[sink]] of this configuration has that name; the Sinks page lists them.",
            )
        return sink

    async def overdue(self) -> Overdue | None:
        """Opt-outs made more than ``[audit] deadline`` ago that some sink has not delivered."""
        if not self.sinks:
            return None
        before = iso_ms(self.clock() - self.deadline)
        count = await run_in_threadpool(
            self.store.overdue_opt_outs,
            [(s.name, s.channels) for s in self.sinks.values()],
            before,
        )
        return Overdue(count, format_duration(self.deadline))

    async def journeys(
        self, app_id: str, changes: Sequence[ConsentChange]
    ) -> Mapping[int, AuditRow]:
        """When each of an endpoint's ``changes`` reached each sink (see ``endpoint_journeys``)."""
        if not self.sinks or not changes:
            return {}
        return await run_in_threadpool(
            endpoint_journeys, self.store, list(self.sinks), app_id, changes
        )

    async def index(self, request: Request) -> Response:
        app = await self.pages.current_app(request)

        def load() -> tuple[list[SinkRow], dict[str, str]]:
            return [self._row(s) for s in self.sinks.values()], _app_names(self.store)

        rows, app_names = await run_in_threadpool(load)
        now = self.clock()
        return self.pages.render(
            request,
            "sinks.html",
            app=app,
            nav="sinks",
            sinks=rows,
            app_names=app_names,
            overdue=await self.overdue(),
            now=now,
            iso=iso_ms,
            age=lambda iso: age_text(iso, now),
        )

    async def show(self, request: Request) -> Response:
        sink = self._sink_or_404(request)
        app = await self.pages.current_app(request)
        store = self.store

        def load() -> tuple[SinkRow, list[SinkDeadLetter], list[SinkWaiting], dict[str, str]]:
            letters = store.sink_dead_letters(sink.name, SHOWN)
            waiting = store.sink_waiting(sink.name, SHOWN)
            return self._row(sink), letters, waiting, _app_names(store)

        row, letters, waiting, app_names = await run_in_threadpool(load)
        waiting_changes = await run_in_threadpool(_waiting_changes, store, waiting)
        return self.pages.render(
            request,
            "sink.html",
            app=app,
            nav="sinks",
            sink=row,
            app_names=app_names,
            letters=letters,
            waiting=waiting,
            waiting_changes=waiting_changes,
            queued={(w.app_id, w.seq) for w in waiting},
            shown=SHOWN,
            now=self.clock(),
            iso=iso_ms,
        )

    async def retry(self, request: Request) -> Response:
        form = checked_form(request)
        sink = self._sink_or_404(request)
        chosen = form.get("seq")
        seqs: list[int] | None = None
        if chosen:
            if not chosen.isdigit():
                raise ConsoleError(400, "Bad change number", f"{chosen!r} is not a number.")
            seqs = [int(chosen)]
        count = await run_in_threadpool(self.store.retry_sink_dead_letters, sink.name, seqs)
        logger.info(
            "console sink dead letters sent again sink=%s seqs=%s count=%d key_id=%s",
            sink.name,
            "all" if seqs is None else seqs[0],
            count,
            self.pages.operator(request),
        )
        if count:
            many = count != 1
            self.pages.flash(
                request,
                f"Sent {count} dead letter{'s' if many else ''} again: the sink's runner delivers "
                f"{'them' if many else 'it'} at its next step; a dead letter stays listed until "
                "it is delivered.",
            )
        else:
            self.pages.flash(request, "No such dead letter: it may have been delivered meanwhile.")
        return redirect(request, f"/sinks/{sink.name}")
