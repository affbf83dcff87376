"""Where each stage is and how far behind: read from the data folder, so any process can ask."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from optsync.apply.dlq import DeadLetterQueue
from optsync.config import Settings
from optsync.engine.store import EndpointStore
from optsync.stream.embedded import EmbeddedStream

__all__ = ("SegmentCount", "Status", "read_status")

APPLY_CONSUMER = "apply"


@dataclass(frozen=True)
class SegmentCount:
    name: str
    total: int
    eligible: int


@dataclass(frozen=True)
class Status:
    capture_state: dict[str, object] | None
    """The source checkpoint saved with the stream (phase, positions)."""
    stream_head: int
    apply_offset: int
    lag_events: int
    lag_seconds: float
    """Age of the oldest record apply has not acknowledged (0 when caught up)."""
    dlq_size: int
    endpoints: int
    segments: tuple[SegmentCount, ...]


def read_status(settings: Settings, store: EndpointStore) -> Status:
    stream = EmbeddedStream(settings.stream_path)
    dlq = DeadLetterQueue(settings.dlq_path)
    try:
        stats = stream.stats()
        offset = stats.consumers.get(APPLY_CONSUMER, 0)
        lag_seconds = 0.0
        if stats.head > offset:
            pending = stream.read(APPLY_CONSUMER, 1, 0.0)
            if pending:
                lag_seconds = max(0.0, time.time() - pending[0].appended_at)
        checkpoint = None
        if settings.source is not None:
            saved = stream.checkpoint("sqlite")
            checkpoint = json.loads(saved.state) if saved else None
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
        return Status(
            capture_state=checkpoint,
            stream_head=stats.head,
            apply_offset=offset,
            lag_events=stats.head - offset,
            lag_seconds=lag_seconds,
            dlq_size=dlq.count(),
            endpoints=endpoints,
            segments=tuple(segments),
        )
    finally:
        stream.close()
        dlq.close()
