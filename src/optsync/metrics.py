"""Prometheus metrics of one process, served at ``/metrics`` (``prometheus_client``).

What is measured where it happens:

- ``optsync_api_requests_total{route, status}`` and ``optsync_api_request_seconds{route}``: every
  API request, by route template (``GET /v1/apps/{application-id}/segments``), never by path, so
  ids and addresses do not become labels.
- ``optsync_commit_to_applied_seconds``: for each batch apply commits, the time from the source
  commit of its oldest change to the engine commit (so the histogram is the batches' worst case).

What is read when Prometheus scrapes, by ``_StatusCollector``:

- apply's counters (``optsync_apply_records_total{outcome}``), read from the live workers'
  ``ApplyStats``: no cost on the apply path;
- the status gauges (stream head and lag, DLQ size, endpoints, segment estimates, sinks,
  overdue opt-outs, capture waiting), from ``status.read_status``, which opens the stream's
  statistics and estimates every segment: it runs at most once per ``STATUS_MAX_AGE`` seconds,
  whatever the scrape rate, and the scrapes in between get the last reading.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from optsync.apply.worker import ApplyStats
from optsync.events import ChangeEvent
from optsync.status import Status

__all__ = ("CONTENT_TYPE", "STATUS_MAX_AGE", "Metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUS_MAX_AGE = 5.0
"""Seconds a status reading serves scrapes before the next one is taken."""
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metrics of this process: the API's from the start; the pipeline's once ``watch``
    is given it (``optsync serve`` has none, so it exports the API's only)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.api_requests = Counter(
            "optsync_api_requests",
            "Pinpoint API requests answered, by route and HTTP status.",
            ("route", "status"),
            registry=self.registry,
        )
        self.api_seconds = Histogram(
            "optsync_api_request_seconds",
            "Time to answer a Pinpoint API request, by route.",
            ("route",),
            buckets=API_BUCKETS,
            registry=self.registry,
        )
        self.applied_seconds = Histogram(
            "optsync_commit_to_applied_seconds",
            "Source commit of a batch's oldest change to the engine commit of the batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(
        self,
        status: Callable[[], Status],
        apply_stats: Callable[[], Sequence[ApplyStats]],
        *,
        max_age: float = STATUS_MAX_AGE,
    ) -> None:
        """Export the pipeline's status (read at most every ``max_age`` seconds) and the
        counters of the apply workers running here."""
        self.registry.register(_StatusCollector(status, apply_stats, max_age))

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.api_requests.labels(route, str(status)).inc()
        self.api_seconds.labels(route).observe(seconds)

    def observe_applied(self, events: Sequence[ChangeEvent]) -> None:
        """A batch reached the engine: its oldest change's commit time -> now."""
        oldest = next((e.commit_time for e in events if e.commit_time), None)
        if oldest is None:
            return
        try:
            committed = datetime.fromisoformat(oldest).timestamp()
        except ValueError:
            return
        self.applied_seconds.observe(max(0.0, time.time() - committed))

    def render(self) -> bytes:
        """The exposition text for a scrape."""
        return generate_latest(self.registry)


class _StatusCollector(Collector):
    """Gauges from the (cached) status and counters from the apply workers, at scrape time."""

    def __init__(
        self,
        status: Callable[[], Status],
        apply_stats: Callable[[], Sequence[ApplyStats]],
        max_age: float,
    ) -> None:
        self._status = status
        self._apply_stats = apply_stats
        self._max_age = max_age
        self._lock = threading.Lock()
        self._reading: tuple[float, Status] | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # collected only when scraped: registering must not read the status

    def collect(self) -> Iterable[Metric]:
        yield from _apply_counters(self._apply_stats())
        yield from _status_gauges(self._current())

    def _current(self) -> Status:
        with self._lock:
            now = time.monotonic()
            if self._reading is None or now - self._reading[0] >= self._max_age:
                self._reading = (now, self._status())
            return self._reading[1]


def _apply_counters(workers: Sequence[ApplyStats]) -> Iterable[Metric]:
    records = CounterMetricFamily(
        "optsync_apply_records",
        "Stream records apply handled since start, by outcome.",
        labels=("outcome",),
    )
    for outcome, field in (
        ("applied", "applied"),
        ("stale", "stale"),
        ("missing", "missing"),
        ("dead_letter", "dead"),
        ("control", "control"),
    ):
        records.add_metric((outcome,), sum(getattr(w, field) for w in workers))
    yield records


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=value)


def _status_gauges(status: Status) -> Iterable[Metric]:
    yield _gauge(
        "optsync_stream_head", "Offset of the newest record in the stream.", status.stream_head
    )
    yield _gauge("optsync_apply_offset", "Offset apply has acknowledged.", status.apply_offset)
    yield _gauge(
        "optsync_apply_lag_events",
        "Records in the stream apply has not acknowledged.",
        status.lag_events,
    )
    yield _gauge(
        "optsync_apply_lag_seconds",
        "Age of the oldest record apply has not acknowledged.",
        status.lag_seconds,
    )
    yield _gauge(
        "optsync_capture_waiting",
        "1 while capture cannot reach its source (retrying).",
        int(status.capture_waiting is not None),
    )
    yield _gauge("optsync_dlq_entries", "Dead letters not replayed yet.", status.dlq_size)
    yield _gauge(
        "optsync_endpoints", "Endpoints in the app the pipeline writes into.", status.endpoints
    )
    segments = GaugeMetricFamily(
        "optsync_segment_endpoints",
        "Endpoints matching a segment (total or eligible).",
        labels=("segment", "kind"),
    )
    for s in status.segments:
        segments.add_metric((s.name, "total"), s.total)
        segments.add_metric((s.name, "eligible"), s.eligible)
    yield segments
    yield _gauge(
        "optsync_optouts_overdue",
        "Opt-outs older than [audit] deadline that a sink has not delivered.",
        status.optouts_overdue,
    )
    for metric, help_text, field in (
        ("sink_lag_changes", "Consent changes not handed to the sink yet.", "behind"),
        ("sink_lag_seconds", "Age of the oldest change not handed to the sink.", "lag_seconds"),
        ("sink_dead_letters", "Changes the sink refused for good.", "dead_letters"),
        ("sink_waiting", "Changes waiting to be tried again (EUM's 30-day rule).", "waiting"),
    ):
        family = GaugeMetricFamily(f"optsync_{metric}", help_text, labels=("sink",))
        for sink in status.sinks:
            family.add_metric((sink.name,), float(getattr(sink, field)))
        yield family
