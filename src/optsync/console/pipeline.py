"""Pipeline status: each stage's position, lag and throughput, and the dead-letter queue.

Throughput is measured here, from successive status readings (the page asks every two seconds):
the stream head's growth is what capture delivers, the apply offset's growth what apply
consumes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from optsync.console.pages import ConsoleError, Pages
from optsync.console.sinks import OverdueCount
from optsync.status import Status
from optsync.web.forms import checked_form
from optsync.web.paths import redirect

__all__ = ("PipelineViews", "Rates", "StageRow", "ThroughputMeter", "stage_rows")

logger = logging.getLogger(__name__)

DLQ_SHOWN = 100


@dataclass(frozen=True)
class Rates:
    """Events per second over the meter's window (None until two readings exist)."""

    captured: float | None
    applied: float | None


class ThroughputMeter:
    """Rates from readings of the stream head and the apply offset over the last ``window`` s."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._readings: deque[tuple[float, int, int]] = deque()
        self._lock = threading.Lock()

    def add(self, stream_head: int, apply_offset: int) -> Rates:
        now = self.clock()
        with self._lock:
            self._readings.append((now, stream_head, apply_offset))
            while len(self._readings) > 2 and now - self._readings[1][0] >= self.window:
                self._readings.popleft()
            first, last = self._readings[0], self._readings[-1]
        elapsed = last[0] - first[0]
        if elapsed < 0.5:
            return Rates(None, None)
        return Rates(
            max(0.0, (last[1] - first[1]) / elapsed), max(0.0, (last[2] - first[2]) / elapsed)
        )


@dataclass(frozen=True)
class StageRow:
    name: str
    position: str
    lag: str
    throughput: str


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} events/s"


def stage_rows(status: Status, rates: Rates) -> list[StageRow]:
    """The status table: one row per stage, as display text."""
    return [
        StageRow(
            "capture",
            f"waiting for source: {status.capture_waiting}"
            if status.capture_waiting is not None
            else status.capture.line(),
            "-",
            _rate(rates.captured),
        ),
        StageRow("stream", f"head offset {status.stream_head:,}", "-", "-"),
        StageRow(
            "apply",
            f"offset {status.apply_offset:,}",
            f"{status.lag_events:,} events, {status.lag_seconds:.2f} s",
            _rate(rates.applied),
        ),
    ]


def _live_values(status: Status, rates: Rates) -> dict[str, str]:
    values: dict[str, str] = {}
    for row in stage_rows(status, rates):
        values[f"{row.name}.position"] = row.position
        values[f"{row.name}.lag"] = row.lag
        values[f"{row.name}.throughput"] = row.throughput
    values["dlq"] = f"{status.dlq_size:,}"
    values["endpoints"] = f"{status.endpoints:,}"
    for segment in status.segments:
        values[f"segment.{segment.name}"] = f"{segment.eligible:,} / {segment.total:,}"
    return values


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class PipelineViews:
    def __init__(self, pages: Pages, overdue: OverdueCount | None = None) -> None:
        self.pages = pages
        self.meter = ThroughputMeter()
        self.overdue = overdue

    def routes(self) -> list[BaseRoute]:
        page, json_ = self.pages.signed_in, self.pages.signed_in_json
        return [
            Route("/pipeline", page(self.show), methods=["GET"]),
            Route("/pipeline/status", json_(self.status), methods=["GET"]),
            Route("/pipeline/replay", page(self.replay), methods=["POST"]),
        ]

    async def _read(self) -> tuple[Status, Rates]:
        provider = self.pages.context.status
        if provider is None:
            raise ConsoleError(404, "No pipeline in this process", "")
        status = await run_in_threadpool(provider)
        return status, self.meter.add(status.stream_head, status.apply_offset)

    async def show(self, request: Request) -> Response:
        context = self.pages.context
        app = await self.pages.current_app(request)
        overdue = await self.overdue() if self.overdue is not None else None
        if context.status is None:
            return self.pages.render(
                request, "pipeline.html", app=app, nav="pipeline", status=None, overdue=overdue
            )
        status, rates = await self._read()
        letters = (
            await run_in_threadpool(context.dead_letters, DLQ_SHOWN) if context.dead_letters else []
        )
        return self.pages.render(
            request,
            "pipeline.html",
            app=app,
            nav="pipeline",
            status=status,
            stages=stage_rows(status, rates),
            letters=letters,
            when=_when,
            can_replay=context.replay is not None,
            overdue=overdue,
        )

    async def status(self, request: Request) -> Response:
        status, rates = await self._read()
        return JSONResponse(_live_values(status, rates))

    async def replay(self, request: Request) -> Response:
        form = checked_form(request)
        replay = self.pages.context.replay
        if replay is None:
            raise ConsoleError(
                404, "No pipeline in this process", "Replay dead letters where apply runs."
            )
        chosen = form.get("id")
        ids: Sequence[int] | None = None
        if chosen:
            if not chosen.isdigit():
                raise ConsoleError(400, "Bad dead-letter id", f"{chosen!r} is not a number.")
            ids = [int(chosen)]
        replayed, failed = await run_in_threadpool(replay, ids)
        logger.info(
            "console dlq replay ids=%s replayed=%d failed=%d key_id=%s",
            "all" if ids is None else ids[0],
            replayed,
            failed,
            self.pages.operator(request),
        )
        message = f"Replayed {replayed} dead letter{'s' if replayed != 1 else ''}"
        if failed:
            message += f"; {failed} still failing (their reasons are updated below)"
        self.pages.flash(request, message + ".")
        return redirect(request, "/pipeline")
