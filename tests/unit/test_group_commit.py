"""Concurrent write_endpoints calls share one transaction; a failing request fails alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import InvalidRequest


def test_queued_requests_commit_together_and_fail_alone(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "engine.db")
    app = store.create_app("a").id
    groups: list[int] = []
    run_group = store._run_group

    def recording(jobs: list) -> None:  # type: ignore[type-arg]
        groups.append(len(jobs))
        run_group(jobs)

    store._run_group = recording  # type: ignore[method-assign]
    outcomes: dict[str, object] = {}

    def write(eid: str) -> None:
        patch = EndpointPatch(id=eid, channel_type=ChannelType.EMAIL, address=f"{eid}@x.org")
        try:
            outcomes[eid] = store.write_endpoints(app, [patch], Cause(CauseKind.API, eid))
        except InvalidRequest as exc:
            outcomes[eid] = exc

    with store._lock:  # the first writer leads and waits for the database; the rest queue
        threads = [threading.Thread(target=write, args=("first",))]
        threads[0].start()
        while not store._leading:
            time.sleep(0.001)
        for eid in ("b", "bad$id", "d"):
            threads.append(threading.Thread(target=write, args=(eid,)))
            threads[-1].start()
        deadline = time.monotonic() + 5
        while len(store._queue) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert len(store._queue) == 3
    for thread in threads:
        thread.join(5)
    assert groups == [1, 3]
    assert isinstance(outcomes["bad$id"], InvalidRequest)
    for eid in ("first", "b", "d"):
        assert getattr(outcomes[eid], "applied", None) == 1
        assert store.get_endpoint(app, eid).address == f"{eid}@x.org"
    with pytest.raises(Exception, match="no endpoint"):
        store.get_endpoint(app, "bad$id")
    # The rollup saw exactly the three endpoints that were written.
    assert store.count_endpoints(app) == 3
    row = store._conn.execute(
        "SELECT SUM(n) FROM endpoint_counts WHERE app_id = ?", (app,)
    ).fetchone()
    assert row[0] == 3
