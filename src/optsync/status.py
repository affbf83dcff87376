"""Where each stage is and how far behind: read from the stream, DLQ and engine, so any process
can ask (``optsync status`` opens them through ``optsync.backends``; a running pipeline passes
its own)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

from optsync.apply.dlq import DeadLetterQueue
from optsync.backends import open_dlq, open_stream
from optsync.capture.base import CaptureView
from optsync.capture.states import NOT_STARTED, describe_state
from optsync.config import Settings
from optsync.engine.store import EndpointStore
from optsync.stream.base import ChangeStream

__all__ = (
    "SegmentCount",
    "SinkStatus",
    "Status",
    "read_status",
    "sink_statuses",
)

APPLY_CONSUMER = "apply"


@dataclass(frozen=True)
class SegmentCount:
    name: str
    total: int
    eligible: int


@dataclass(frozen=True)
class SinkStatus:
    """One ``[[sink]]``'s delivery, over every app (read from the engine: any process sees it)."""

    name: str
    kind: str
    behind: int
    """Consent changes not handed to the sink yet."""
    lag_seconds: float
    """Age of the oldest change not handed to it (0 when caught up)."""
    dead_letters: int
    waiting: int
    next_wait_end: float | None
    last_delivery: str | None
    holder: str | None
    """The process that delivers it now (None: nobody holds its lease)."""


@dataclass(frozen=True)
class Status:
    capture: CaptureView
    """The configured source's checkpoint saved with the stream, as people read it; without a
    configured one that the stream holds, the only checkpoint the stream holds, if just one
    (``NOT_STARTED`` when there is none)."""
    stream_head: int
    apply_offset: int
    """The lowest offset apply has acknowledged over the partitions."""
    lag_events: int
    """Records apply has not acknowledged, over every partition."""
    lag_seconds: float
    """Age of the oldest record apply has not acknowledged (0 when caught up)."""
    dlq_size: int
    endpoints: int
    segments: tuple[SegmentCount, ...]
    captures: tuple[tuple[str, CaptureView], ...] = ()
    """(source name, checkpoint) of every source the stream holds a checkpoint for."""
    capture_waiting: str | None = None
    """Why this process's capture cannot read its source now (it retries); None otherwise, and
    always None when read from another process."""
    sinks: tuple[SinkStatus, ...] = ()
    optouts_overdue: int = 0
    """Opt-outs older than ``[audit] deadline`` that some sink has not delivered."""
    audit_deadline: float = 0.0


_SINK_KINDS = {
    "EumSinkSettings": "eum-sms",
    "WebhookSinkSettings": "webhook",
    "PinpointApiSinkSettings": "pinpoint-api",
}


def _age(iso: str | None, now: float) -> float:
    if iso is None:
        return 0.0
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    return max(0.0, now - moment)


def sink_statuses(settings: Settings, store: EndpointStore) -> tuple[tuple[SinkStatus, ...], int]:
    """Every configured sink's status, and the number of overdue opt-outs."""
    now = time.time()
    sinks: list[SinkStatus] = []
    for sink in settings.sinks:
        states = store.sink_states(sink.name)
        waits = [s.next_wait_end for s in states if s.next_wait_end is not None]
        deliveries = [s.last_delivery for s in states if s.last_delivery]
        sinks.append(
            SinkStatus(
                name=sink.name,
                kind=_SINK_KINDS.get(type(sink).__name__, "sink"),
                behind=sum(s.behind for s in states),
                lag_seconds=max((_age(s.oldest_behind, now) for s in states), default=0.0),
                dead_letters=sum(s.dead_letters for s in states),
                waiting=sum(s.waiting for s in states),
                next_wait_end=min(waits) if waits else None,
                last_delivery=max(deliveries) if deliveries else None,
                holder=next((s.holder for s in states if s.holder), None),
            )
        )
    overdue = 0
    if settings.sinks:
        before = datetime.fromtimestamp(now - settings.audit.deadline, UTC)
        overdue = store.overdue_opt_outs(
            [(s.name, s.channels) for s in settings.sinks],
            before.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
    return tuple(sinks), overdue


def read_status(
    settings: Settings,
    store: EndpointStore,
    stream: ChangeStream | None = None,
    dlq: DeadLetterQueue | None = None,
) -> Status:
    """The status; opens (and closes) the stream and DLQ when not given."""
    own_stream = stream is None
    own_dlq = dlq is None
    stream = open_stream(settings) if stream is None else stream
    try:
        dlq = open_dlq(settings) if dlq is None else dlq
    except BaseException:
        if own_stream:
            stream.close()
        raise
    try:
        stats = stream.stats()
        offset = stats.consumers.get(APPLY_CONSUMER, 0)
        lag_events = stats.pending.get(APPLY_CONSUMER, max(0, stats.head - offset))
        lag_seconds = 0.0
        if lag_events:
            oldest = [
                records[0].appended_at
                for p in range(stream.partitions)
                if (records := stream.read(APPLY_CONSUMER, 1, 0.0, partition=p))
            ]
            if oldest:
                lag_seconds = max(0.0, time.time() - min(oldest))
        # Every checkpoint, not only the configured source's: `status --data-dir` does not know
        # which database the folder's pipeline captures.
        captures = tuple((c.source, describe_state(c.state)) for c in stream.checkpoints())
        wanted = settings.source.source_name if settings.source is not None else None
        checkpoint = next((view for name, view in captures if name == wanted), None)
        if checkpoint is None:
            checkpoint = captures[0][1] if len(captures) == 1 else NOT_STARTED
        app = store.find_app(settings.app)
        segments: list[SegmentCount] = []
        endpoints = 0
        if app is not None:
            endpoints = store.count_endpoints(app.id)
            page = store.list_segments(app.id, 1000, None)
            for segment in page.items:
                estimate = store.estimate(app.id, segment.id)
                name = segment.definition.name or segment.id
                segments.append(SegmentCount(name, estimate.total, estimate.eligible))
        sinks, overdue = sink_statuses(settings, store)
        return Status(
            sinks=sinks,
            optouts_overdue=overdue,
            audit_deadline=settings.audit.deadline,
            capture=checkpoint,
            stream_head=stats.head,
            apply_offset=offset,
            lag_events=lag_events,
            lag_seconds=lag_seconds,
            dlq_size=dlq.count(),
            endpoints=endpoints,
            segments=tuple(segments),
            captures=captures,
        )
    finally:
        if own_stream:
            stream.close()
        if own_dlq:
            dlq.close()
