"""The mapping stage (``apply.stage``): records mapped in a child process, one batch ahead of
the engine, with the same outcome as mapping in the apply thread, and nothing lost when the
child dies."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper, MappingRule
from optsync.apply.partitioned import PartitionedApply
from optsync.apply.stage import MIN_STAGE_BATCH, MappingStage
from optsync.engine.models import OptOut
from optsync.engine.phone import PhonePolicy
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import Retryable
from optsync.events import ChangeEvent, Op, position_of
from optsync.formats import dms
from optsync.stream.memory import MemoryStream

RULE = MappingRule("optin_status", address="phone", opt_in="optin", user_id="userid")
USERS = 150
CONTROL = (
    b'{"data": {}, "metadata": {"record-type": "control", "operation": "create-table", '
    b'"table-name": "optin_status", "schema-name": "main"}}'
)


def change(n: int, optin: int, position: int, phone: str | None = None) -> ChangeEvent:
    row = {
        "userid": f"user{n}",
        "phone": phone or f"+1206555{n:04d}",
        "optin": optin,
        "lastupdate": None,
    }
    return ChangeEvent(
        op=Op.INSERT,
        table="optin_status",
        key={"userid": f"user{n}"},
        position=position_of(position),
        after=row,
        schema="main",
    )


def fill(stream: MemoryStream) -> None:
    """Three changes per user (opted in, out, in again; the last one out for odd users), a
    poison record (a number no country has) and a control record."""
    position = 0
    events: list[ChangeEvent] = []
    for optin in (1, 0, 1):
        for n in range(USERS):
            position += 1
            events.append(change(n, optin if n % 2 == 0 or optin == 1 else 0, position))
    for n in range(1, USERS, 2):
        position += 1
        events.append(change(n, 0, position))
    position += 1
    events.append(change(9999, 1, position, phone="12"))
    stream.append(events)
    stream.append_raw([("control", CONTROL)])


@pytest.fixture
def parts() -> Iterator[tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str]]:
    stream = MemoryStream(partitions=3)
    store = SQLiteStore(":memory:")
    dlq = SQLiteDeadLetterQueue(":memory:")
    app = store.create_app("a")
    yield stream, store, dlq, app.id
    stream.close()
    store.close()
    dlq.close()


def run(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
    stage: MappingStage | None,
) -> PartitionedApply:
    stream, store, dlq, app_id = parts
    worker = PartitionedApply(
        stream, Mapper([RULE]), store, app_id, dlq, name="w", sync_interval=0.05, stage=stage
    )
    for _ in range(100):
        if worker.step(limit=200, wait=0.0) == 0:
            break
    worker.stop()
    return worker


def final_state(store: SQLiteStore, app_id: str) -> dict[str, OptOut]:
    return {
        f"user{n}": store.get_endpoint(app_id, f"user{n}_+1206555{n:04d}").opt_out
        for n in range(USERS)
    }


def test_the_stage_applies_what_the_thread_would(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, store, dlq, app_id = parts
    fill(stream)
    stage = MappingStage([RULE], PhonePolicy.POSSIBLE)
    try:
        worker = run(parts, stage)
    finally:
        stage.close()
    assert stage.starts == 1
    expected = {f"user{n}": OptOut.NONE if n % 2 == 0 else OptOut.ALL for n in range(USERS)}
    assert final_state(store, app_id) == expected
    assert worker.stats.records == USERS * 3 + USERS // 2 + 2
    assert worker.stats.control == 1
    [dead] = dlq.list(limit=10)
    assert "phone" in dead.reason and dms.decode(dead.data).key == {"userid": "user9999"}
    assert stream.stats().pending.get("apply", 0) == 0


def test_a_dead_mapping_process_loses_nothing(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, store, dlq, app_id = parts
    fill(stream)
    stage = MappingStage([RULE], PhonePolicy.POSSIBLE)
    worker = PartitionedApply(
        stream, Mapper([RULE]), store, app_id, dlq, name="w", sync_interval=0.05, stage=stage
    )
    try:
        assert worker.step(limit=MIN_STAGE_BATCH * 2, wait=0.0) >= MIN_STAGE_BATCH
        assert store.count_endpoints(app_id) == 0  # mapped, not written yet
        assert stage.pid is not None
        os.kill(stage.pid, signal.SIGKILL)
        failures = 0
        for _ in range(200):  # as the apply loop does: a Retryable error, then on
            try:
                if worker.step(limit=200, wait=0.0) == 0:
                    break
            except Retryable:
                failures += 1
        assert failures <= 1
        worker.stop()
    finally:
        stage.close()
    assert stage.starts == 2
    expected = {f"user{n}": OptOut.NONE if n % 2 == 0 else OptOut.ALL for n in range(USERS)}
    assert final_state(store, app_id) == expected
    assert len(dlq.list(limit=10)) == 1
