"""The endpoint_counts rollup equals a GROUP BY over endpoints after every kind of write."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from pathlib import Path

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import InvalidRequest, NotFound

GROUPED = (
    "SELECT app_id, COALESCE(country_code, ''), channel_type, status, opt_out, COUNT(*) "
    "FROM endpoints GROUP BY 1, 2, 3, 4, 5"
)
ROLLUP = (
    "SELECT app_id, country_code, channel_type, status, opt_out, n FROM endpoint_counts "
    "WHERE n <> 0"
)


def test_rollup_matches_endpoints_after_random_workload(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = SQLiteStore(tmp_path / "engine.db")
    apps = [store.create_app("a").id, store.create_app("b").id]
    cause = Cause(CauseKind.API, "r")
    channels = [ChannelType.SMS, ChannelType.VOICE, ChannelType.EMAIL, ChannelType.GCM]
    for step in range(400):
        app = rng.choice(apps)
        writes: list[EndpointPatch | EndpointDelete] = []
        for _ in range(rng.randint(1, 8)):
            eid = f"ep{rng.randint(0, 60)}"
            if rng.random() < 0.2:
                writes.append(EndpointDelete(eid))
                continue
            channel = rng.choice(channels)
            address = (
                f"u{rng.randint(0, 9)}@example.com"
                if channel is ChannelType.EMAIL
                else rng.choice(["+12065550100", "+12065550101", "+447400123456", "+4930123456"])
            )
            writes.append(
                EndpointPatch(
                    id=eid,
                    channel_type=channel,
                    address=address,
                    opt_out=rng.choice([OptOut.ALL, OptOut.NONE, None]),
                    endpoint_status=rng.choice([EndpointStatus.INACTIVE, None, None]),
                    user_id=f"user{rng.randint(0, 3)}",
                    location=Location(country=rng.choice(["USA", "DE", None])),
                )
            )
        # A refused batch (e.g. the per-user cap) rolls back whole, rollup included.
        with contextlib.suppress(InvalidRequest):
            store.write_endpoints(app, writes, cause)
        if step == 200 and store_has_user(store, app, "user1"):
            store.delete_user_endpoints(app, "user1", cause)
    store.delete_app(apps[1])
    conn = sqlite3.connect(tmp_path / "engine.db")
    try:
        grouped = sorted(conn.execute(GROUPED).fetchall())
        rollup = sorted(conn.execute(ROLLUP).fetchall())
    finally:
        conn.close()
        store.close()
    assert grouped, "the workload wrote nothing"
    assert {row[0] for row in grouped} == {apps[0]}
    assert rollup == grouped


def store_has_user(store: SQLiteStore, app: str, user: str) -> bool:
    try:
        return bool(store.get_user_endpoints(app, user))
    except NotFound:
        return False
