"""Apply without a disk wait per batch: the engine is synced before the stream is acknowledged."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from optsync.apply.dlq import DeadLetterQueue, SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules
from optsync.cli import SAMPLE_RULE
from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent, Op, position_of
from optsync.stream.memory import MemoryStream

FULL = 2


class RecordingStore(SQLiteStore):
    """The real SQLite engine, noting when it is synced."""

    def __init__(self, path: Path, calls: list[str]) -> None:
        super().__init__(path)
        self.calls = calls

    def sync(self) -> None:
        self.calls.append("sync")
        super().sync()


class RecordingStream(MemoryStream):
    """The in-memory stream, noting acknowledgements."""

    def __init__(self, calls: list[str]) -> None:
        super().__init__()
        self.calls = calls

    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        self.calls.append(f"ack {offset}")
        super().ack(consumer, offset, partition=partition)


def insert(n: int, optin: int = 1) -> ChangeEvent:
    row = {"userid": f"user{n}", "phone": f"+1206555{n:04d}", "optin": optin, "lastupdate": None}
    return ChangeEvent(
        op=Op.INSERT,
        table="optin_status",
        key={"rowid": n},
        position=position_of(n),
        after=row,
        schema="main",
    )


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def parts(
    tmp_path: Path, calls: list[str]
) -> Iterator[tuple[RecordingStream, RecordingStore, DeadLetterQueue]]:
    stream = RecordingStream(calls)
    store = RecordingStore(tmp_path / "engine.db", calls)
    dlq = SQLiteDeadLetterQueue(":memory:")
    yield stream, store, dlq
    stream.close()
    store.close()
    dlq.close()


def worker_for(
    parts: tuple[RecordingStream, RecordingStore, DeadLetterQueue], interval: float
) -> ApplyWorker:
    stream, store, dlq = parts
    app = store.find_app("a") or store.create_app("a")
    return ApplyWorker(
        stream, Mapper(mapping_rules([SAMPLE_RULE])), store, app.id, dlq, sync_interval=interval
    )


def endpoint_ids(store: SQLiteStore, app_id: str) -> Sequence[str]:
    rows = store._conn.execute("SELECT id FROM endpoints WHERE app_id = ?", (app_id,)).fetchall()
    return sorted(r[0] for r in rows)


def test_acknowledges_only_after_the_engine_is_synced(
    parts: tuple[RecordingStream, RecordingStore, DeadLetterQueue], calls: list[str]
) -> None:
    stream, store, _ = parts
    worker = worker_for(parts, interval=3600)
    stream.append([insert(n) for n in range(1, 4)])

    assert worker.step(limit=2, wait=0) == 2
    assert worker.step(limit=2, wait=0) == 1  # reads on after offset 2, though 0 is acknowledged
    assert calls == []
    assert stream.stats().consumers == {"apply": 0}
    assert len(endpoint_ids(store, worker.app_id)) == 3  # applied and visible before the sync

    assert worker.step(limit=2, wait=0) == 0  # nothing new: sync, then acknowledge all three
    assert calls == ["sync", "ack 3"]
    assert stream.stats().consumers == {"apply": 3}
    worker.flush()  # nothing pending: no second sync
    assert calls == ["sync", "ack 3"]


def test_a_busy_stream_is_acknowledged_every_interval(
    parts: tuple[RecordingStream, RecordingStore, DeadLetterQueue], calls: list[str]
) -> None:
    stream, _, _ = parts
    worker = worker_for(parts, interval=1e-9)  # every step is past the interval
    stream.append([insert(n) for n in range(1, 4)])
    assert worker.step(limit=2, wait=0) == 2
    assert calls == ["sync", "ack 2"]


def test_unacknowledged_records_are_applied_again_harmlessly(
    parts: tuple[RecordingStream, RecordingStore, DeadLetterQueue],
) -> None:
    stream, store, _ = parts
    worker = worker_for(parts, interval=3600)
    stream.append([insert(n) for n in range(1, 4)])
    assert worker.step(limit=10, wait=0) == 3
    before = endpoint_ids(store, worker.app_id)

    again = worker_for(parts, interval=3600)  # a restart: reads from the acknowledged offset 0
    assert again.step(limit=10, wait=0) == 3
    assert (again.stats.applied, again.stats.stale) == (0, 3)
    assert endpoint_ids(store, worker.app_id) == before


def test_a_non_durable_write_is_visible_and_leaves_the_connection_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteStore(tmp_path / "engine.db")
    app = store.create_app("a").id
    patch = EndpointPatch(id="e1", channel_type=ChannelType.SMS, address="+12065550100")
    store.write_endpoints(app, [patch], Cause(CauseKind.SOURCE, ""), durable=False)

    other = sqlite3.connect(tmp_path / "engine.db")
    assert other.execute("SELECT count(*) FROM endpoints").fetchone() == (1,)
    other.close()
    # The next writer (an API request) commits with the disk wait again.
    assert store._conn.execute("PRAGMA synchronous").fetchone() == (FULL,)

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.sync()
    assert synced == [str(tmp_path / "engine.db-wal")]
    store.sync()  # nothing committed since: no second fsync
    assert len(synced) == 1

    opted_out = EndpointPatch(id="e1", opt_out=OptOut.ALL)
    store.write_endpoints(app, [opted_out], Cause(CauseKind.API, ""))
    store.sync()  # a durable write leaves nothing to sync
    assert len(synced) == 1
    assert store.get_endpoint(app, "e1").opt_out is OptOut.ALL
    store.close()


def test_the_checkpointer_copies_the_wal_into_the_database_and_stops_with_the_store(
    tmp_path: Path,
) -> None:
    path = tmp_path / "engine.db"
    store = SQLiteStore(path, checkpoint_bytes=64 * 1024)
    app = store.create_app("a").id
    before = path.stat().st_size
    patches = [
        EndpointPatch(id=f"e{n}", channel_type=ChannelType.SMS, address=f"+1206555{n:04d}")
        for n in range(2_000)
    ]
    store.write_endpoints(app, patches, Cause(CauseKind.API, ""))
    # The writer checkpoints only past WRITER_CHECKPOINT_PAGES (40 MiB): pages reach the
    # database file because the checkpointer thread copied them.
    deadline = time.monotonic() + 10
    while path.stat().st_size == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_size > before
    checkpointer = store._checkpointer
    assert checkpointer is not None
    store.close()
    assert not checkpointer._thread.is_alive()
    reopened = SQLiteStore(path)
    assert reopened.count_endpoints(app) == 2_000
    reopened.close()


def test_an_in_memory_store_has_no_checkpointer() -> None:
    store = SQLiteStore(":memory:")
    assert store._checkpointer is None
    store.close()
