"""``optsync.metrics``: what /metrics exports, and how often it reads the status."""

from __future__ import annotations

from optsync.apply.worker import ApplyStats
from optsync.capture.states import NOT_STARTED
from optsync.events import ChangeEvent, Op
from optsync.metrics import Metrics
from optsync.status import SegmentCount, Status

STATUS = Status(
    capture=NOT_STARTED,
    stream_head=12,
    apply_offset=10,
    lag_events=2,
    lag_seconds=0.25,
    dlq_size=1,
    endpoints=9,
    segments=(SegmentCount('US "main"', 9, 4),),
)


def test_status_gauges_and_apply_counters() -> None:
    metrics = Metrics()
    stats = ApplyStats(records=7, applied=5, stale=1, dead=1)
    metrics.watch(lambda: STATUS, lambda: [stats])
    text = metrics.render().decode()
    assert "optsync_apply_lag_events 2.0\n" in text
    assert "optsync_apply_lag_seconds 0.25\n" in text
    assert "optsync_dlq_entries 1.0\n" in text
    assert 'optsync_segment_endpoints{kind="eligible",segment="US \\"main\\""} 4.0\n' in text
    assert 'optsync_apply_records_total{outcome="applied"} 5.0\n' in text
    assert 'optsync_apply_records_total{outcome="dead_letter"} 1.0\n' in text


def test_the_status_is_read_at_most_once_per_max_age() -> None:
    reads: list[int] = []

    def status() -> Status:
        reads.append(1)
        return STATUS

    metrics = Metrics()
    metrics.watch(status, list, max_age=3600)
    for _ in range(5):
        metrics.render()
    assert len(reads) == 1
    fresh = Metrics()
    fresh.watch(status, list, max_age=0)
    fresh.render()
    fresh.render()
    assert len(reads) == 3


def test_api_requests_and_commit_to_applied_latency() -> None:
    metrics = Metrics()
    metrics.observe_request("GET /v1/apps", 200, 0.003)
    metrics.observe_request("GET /v1/apps", 200, 0.002)
    event = ChangeEvent(
        op=Op.UPDATE,
        schema="",
        table="t",
        key={"id": 1},
        after={"id": 1},
        position="1",
        commit_time="2000-01-01T00:00:00.000Z",
    )
    metrics.observe_applied([event])
    text = metrics.render().decode()
    assert 'optsync_api_requests_total{route="GET /v1/apps",status="200"} 2.0\n' in text
    assert 'optsync_api_request_seconds_count{route="GET /v1/apps"} 2.0\n' in text
    assert 'optsync_commit_to_applied_seconds_bucket{le="+Inf"} 1.0\n' in text
    assert 'optsync_commit_to_applied_seconds_bucket{le="60.0"} 0.0\n' in text  # 26 years
