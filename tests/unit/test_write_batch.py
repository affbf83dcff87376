"""A batch of writes leaves the engine exactly as the same writes sent one at a time.

``WriteBatch`` works a transaction out in memory from the rows read up front; this pins that
it reads every row the rules can reach: same-address deactivation, the per-user cap with push
rollover, UserAttributes kept equal across a user, positions and tombstones, deletes and
re-creates within one batch. Side rows (attribute rows with their rollup copies, metrics) and
the rollup are checked against the endpoints they come from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore

ROLLUP = (
    "SELECT country_code, channel_type, status, opt_out, n FROM endpoint_counts "
    "WHERE app_id = ? AND n <> 0 ORDER BY 1, 2, 3, 4"
)
CHANNELS = [ChannelType.SMS, ChannelType.EMAIL, ChannelType.GCM, ChannelType.APNS]
ADDRESSES = {
    ChannelType.SMS: ["+12065550100", "+12065550101", "+447400123456"],
    ChannelType.EMAIL: ["a@example.com", "b@example.com"],
    ChannelType.GCM: ["tok1", "tok2", "tok3"],
    ChannelType.APNS: ["tok1", "tok4"],
}


def _user(rng: random.Random, eid: str, channel: ChannelType) -> str | None:
    """Push endpoints crowd into user0 (the rollover at 15 is exercised); the others spread
    over users of at most 7 ids each, so no write is refused for the cap."""
    if channel in (ChannelType.GCM, ChannelType.APNS):
        return rng.choice(["user0", "user0", None])
    return f"user{1 + int(eid[2:]) % 6}"


def _workload(seed: int, positioned: bool) -> list[list[EndpointPatch | EndpointDelete]]:
    rng = random.Random(seed)
    batches: list[list[EndpointPatch | EndpointDelete]] = []
    position = 0
    for _ in range(25):
        batch: list[EndpointPatch | EndpointDelete] = []
        for _ in range(rng.randint(1, 30)):
            eid = f"EP{rng.randint(0, 40)}" if rng.random() < 0.5 else f"ep{rng.randint(0, 40)}"
            position += rng.choice([1, 1, 1, -3]) if positioned else 0
            where = f"{position:08d}" if positioned and position > 0 else None
            if rng.random() < 0.15:
                batch.append(EndpointDelete(eid, position=where))
                continue
            channel = rng.choice(CHANNELS)
            batch.append(
                EndpointPatch(
                    id=eid,
                    channel_type=channel,
                    address=rng.choice([*ADDRESSES[channel], None]),
                    opt_out=rng.choice([OptOut.ALL, OptOut.NONE, None]),
                    endpoint_status=rng.choice([EndpointStatus.INACTIVE, None, None, None]),
                    user_id=_user(rng, eid, channel),
                    user_attributes=rng.choice(
                        [None, {"tier": (rng.choice(["x", "y"]),)}, {"n": ("1", "2", "1")}]
                    ),
                    attributes=rng.choice([None, {"plan": (rng.choice(["gold", "free"]),)}]),
                    metrics=rng.choice([None, {"score": float(rng.randint(0, 5))}]),
                    position=where,
                )
            )
        batches.append(batch)
    return batches


def _state(store: SQLiteStore, app_id: str) -> dict[str, Any]:
    conn = store._conn
    endpoints = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT id_key, channel_type, address, opt_out, status, user_id, country_code, "
            "attributes, user_attributes, metrics, source_position FROM endpoints "
            "WHERE app_id = ?",
            (app_id,),
        )
    }
    history = conn.execute(
        "SELECT endpoint_key, opt_out_before, opt_out_after, address, cause_kind, cause_ref "
        "FROM consent_history WHERE app_id = ? ORDER BY seq",
        (app_id,),
    ).fetchall()
    tombstones = conn.execute(
        "SELECT id_key, position FROM tombstones WHERE app_id = ? ORDER BY id_key", (app_id,)
    ).fetchall()
    rollup = conn.execute(ROLLUP, (app_id,)).fetchall()
    return {"endpoints": endpoints, "history": history, "tombs": tombstones, "rollup": rollup}


def _check_side_rows(store: SQLiteStore, app_id: str) -> None:
    conn = store._conn
    expected = set()
    metrics = set()
    rows = conn.execute(
        "SELECT pk, attributes, user_attributes, metrics, COALESCE(country_code, ''), "
        "channel_type, status, opt_out FROM endpoints WHERE app_id = ?",
        (app_id,),
    ).fetchall()
    for pk, attributes, user_attributes, metric_text, *rollup in rows:
        for kind, text in (("A", attributes), ("U", user_attributes)):
            for name, values in json.loads(text).items():
                expected |= {(pk, kind, name, v, *rollup) for v in values}
        metrics |= {(pk, n, v) for n, v in json.loads(metric_text).items()}
    found = conn.execute(
        "SELECT endpoint_pk, kind, name, value, country_code, channel_type, status, opt_out "
        "FROM endpoint_attributes WHERE app_id = ?",
        (app_id,),
    ).fetchall()
    assert sorted(found) == sorted(expected)
    found_metrics = conn.execute(
        "SELECT endpoint_pk, name, value FROM endpoint_metrics WHERE app_id = ?", (app_id,)
    ).fetchall()
    assert sorted(found_metrics) == sorted(metrics)
    grouped = conn.execute(
        "SELECT COALESCE(country_code, ''), channel_type, status, opt_out, COUNT(*) "
        "FROM endpoints WHERE app_id = ? GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        (app_id,),
    ).fetchall()
    rollup = conn.execute(ROLLUP, (app_id,)).fetchall()
    assert rollup == grouped


@pytest.mark.parametrize("positioned", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_batched_writes_equal_one_at_a_time(tmp_path: Path, seed: int, positioned: bool) -> None:
    batched = SQLiteStore(tmp_path / "batched.db")
    single = SQLiteStore(tmp_path / "single.db")
    app_b, app_s = batched.create_app("b").id, single.create_app("s").id
    kind = CauseKind.SOURCE if positioned else CauseKind.API
    cause = Cause(kind, "request")
    applied = 0
    for batch in _workload(seed, positioned):
        result = batched.write_endpoints(app_b, batch, cause)
        for write in batch:
            applied += single.write_endpoints(app_s, [write], cause).applied
        assert result.applied <= len(batch)
    assert applied > 0
    state_b, state_s = _state(batched, app_b), _state(single, app_s)
    assert state_b["endpoints"], "the workload left no endpoint: it tests nothing"
    assert state_b == state_s
    # Same-address deactivation (and the push rollover at the user cap) happened.
    assert any(v[3] == "INACTIVE" for v in state_b["endpoints"].values())
    _check_side_rows(batched, app_b)
    _check_side_rows(single, app_s)
