from optsync.capture.states import NOT_STARTED
from optsync.status import SegmentCount, Status, to_prometheus


def test_prometheus_text() -> None:
    status = Status(
        capture=NOT_STARTED,
        stream_head=12,
        apply_offset=10,
        lag_events=2,
        lag_seconds=0.25,
        dlq_size=1,
        endpoints=9,
        segments=(SegmentCount('US "main"', 9, 4),),
    )
    text = to_prometheus(status)
    assert "optsync_apply_lag_events 2\n" in text
    assert "optsync_apply_lag_seconds 0.250000\n" in text
    assert "optsync_dlq_entries 1\n" in text
    assert 'optsync_segment_endpoints{segment="US \\"main\\"",kind="eligible"} 4\n' in text
