"""The ``ChangeStream`` contract: every case runs against each backend in ``STREAM_BACKENDS``.

Offsets are compared only with offsets the stream handed out (``append`` returns the head, which
is the offset of the event when a batch holds one), never with counts: the embedded and memory
streams number records 1, 2, 3..., NATS JetStream ``sequence * 1024 + index``.

A few cases hold only for some backends: every event idempotent in any batch (memory, embedded;
NATS deduplicates whole messages), acknowledgements surviving a reopen (embedded, NATS), and the
embedded file's own cases (restart, migration, writers of several connections) after the shared
suite.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import pytest
from nats_server import NatsServer, nats_server_fixture, require_binary

from optsync.errors import ConfigError, OptsyncError
from optsync.events import ChangeEvent, Op, position_of
from optsync.formats import dms
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, partition_of
from optsync.stream.embedded import EmbeddedStream
from optsync.stream.memory import MemoryStream
from optsync.stream.nats import NatsStream

__all__ = ("nats_server_fixture",)  # registers the session fixture ``nats_server``


class Opener(Protocol):
    def __call__(self, partitions: int = 1) -> ChangeStream: ...


StreamBackend = Callable[[pytest.FixtureRequest, Path], Opener]
"""Returns an opener of stream objects on one storage (the test's folder, a fresh NATS stream);
every object it opens sees what the others stored, except in memory."""


def _nats(request: pytest.FixtureRequest, _folder: Path) -> Opener:
    require_binary()
    server: NatsServer = request.getfixturevalue("nats_server")
    name = f"t{uuid.uuid4().hex[:12]}"

    def open_(partitions: int = 1) -> ChangeStream:
        return NatsStream(server.url, name=name, partitions=partitions, timeout=5)

    return open_


STREAM_BACKENDS: dict[str, StreamBackend] = {
    "memory": lambda _request, _folder: lambda partitions=1: MemoryStream(partitions),
    "embedded": lambda _request, folder: (
        lambda partitions=1: EmbeddedStream(folder / "stream.db", partitions)
    ),
    "nats": _nats,
}
DURABLE = ("embedded", "nats")
"""Backends whose objects share what they stored (a reopened object sees it)."""
PER_EVENT_IDEMPOTENT = ("memory", "embedded")
"""Backends that skip an event already stored whatever batch it comes in."""

WAIT = 5.0
"""A reader's wait in the wake-up cases; they pass only if the reader returns in under half."""
TTL = 0.6
"""Seconds of a worker's liveness in the lease cases."""


def _opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    backend = STREAM_BACKENDS[request.param](request, tmp_path)
    opened: list[ChangeStream] = []

    def open_(partitions: int = 1) -> ChangeStream:
        opened.append(backend(partitions))
        return opened[-1]

    yield open_
    for each in opened:
        each.close()


@pytest.fixture(params=list(STREAM_BACKENDS))
def open_stream(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens streams of the parametrized backend on one storage; closes them after the test."""
    yield from _opener(request, tmp_path)


@pytest.fixture(params=DURABLE)
def open_durable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    yield from _opener(request, tmp_path)


@pytest.fixture(params=PER_EVENT_IDEMPOTENT)
def local_stream(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChangeStream]:
    opener = _opener(request, tmp_path)
    yield next(opener)()
    next(opener, None)


@pytest.fixture
def stream(open_stream: Opener) -> ChangeStream:
    """An empty one-partition stream of the parametrized backend, closed after the test."""
    return open_stream()


@pytest.fixture
def open_embedded(tmp_path: Path) -> Iterator[Callable[..., EmbeddedStream]]:
    """Opens ``EmbeddedStream`` objects on one file; closes every one after the test."""
    opened: list[EmbeddedStream] = []

    def open_(partitions: int | None = None) -> EmbeddedStream:
        opened.append(EmbeddedStream(tmp_path / "data" / "stream.db", partitions))
        return opened[-1]

    yield open_
    for each in opened:
        each.close()


def change(key: int, position: int, *, opt_out: bool = False, op: Op = Op.UPDATE) -> ChangeEvent:
    row = {"id": key, "phone": f"+1206555{key:04d}", "opt_out": opt_out}
    return ChangeEvent(
        op=op,
        table="users",
        schema="app",
        key={"id": key},
        position=position_of(position),
        before=row if op is Op.DELETE else None,
        after=None if op is Op.DELETE else row,
    )


def append_each(stream: ChangeStream, events: list[ChangeEvent]) -> list[int]:
    """Appends one event per batch; the offset of each (the head right after it)."""
    return [stream.append([event]) for event in events]


def payload(record: StreamRecord) -> dict[str, object]:
    """The DMS JSON document a record holds."""
    document = json.loads(record.data)
    assert isinstance(document, dict)
    return document


def offsets(records: list[StreamRecord]) -> list[int]:
    return [r.offset for r in records]


def read_in_thread(
    stream: ChangeStream, consumer: str, wait: float, partition: int = 0
) -> tuple[threading.Thread, list[tuple[list[StreamRecord], float]]]:
    """Starts a reader thread; the list gets (records, seconds the read took) when it returns."""
    result: list[tuple[list[StreamRecord], float]] = []

    def run() -> None:
        started = time.monotonic()
        records = stream.read(consumer, 10, wait=wait, partition=partition)
        result.append((records, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def keys_by_partition(partitions: int, count: int) -> dict[int, list[int]]:
    """Row ids 0..count-1 grouped by the partition their change goes to."""
    grouped: dict[int, list[int]] = {p: [] for p in range(partitions)}
    for key in range(count):
        grouped[partition_of(change(key, 1).partition_key, partitions)].append(key)
    return grouped


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- the shared suite ---------------------------------------------------------------------------


def test_empty_stream(stream: ChangeStream) -> None:
    stats = stream.stats()
    assert (stats.head, stats.oldest, stats.consumers, stats.pending) == (0, 1, {}, {})
    assert stream.read("apply", 10) == []
    assert stream.checkpoint("mysql") is None
    assert stream.partitions == 1


def test_append_then_read_in_order(stream: ChangeStream) -> None:
    events = [change(1, 10), change(2, 11), change(1, 12, opt_out=True), change(3, 13)]
    first = stream.append(events[:3])
    second = stream.append(events[3:])
    assert 0 < first < second

    records = stream.read("apply", 10)
    assert offsets(records) == sorted(set(offsets(records)))  # unique, growing
    assert (records[2].offset, records[3].offset) == (first, second)
    keys = [r.partition_key for r in records]
    assert keys == ["app.users.1", "app.users.2", "app.users.1", "app.users.3"]
    assert payload(records[2])["data"] == {"id": 1, "phone": "+12065550001", "opt_out": True}
    metadata = payload(records[0])["metadata"]
    assert isinstance(metadata, dict)
    assert (metadata["schema-name"], metadata["table-name"]) == ("app", "users")
    assert metadata["operation"] == "update"
    assert all(r.appended_at == pytest.approx(time.time(), abs=60) for r in records)
    assert all(r.partition == 0 for r in records)
    assert [dms.decode(r.data) for r in records] == events  # stored as DMS JSON, losslessly


def test_delete_record_holds_the_before_image(stream: ChangeStream) -> None:
    stream.append([change(7, 1, op=Op.DELETE)])
    (record,) = stream.read("apply", 10)
    assert payload(record)["data"] == {"id": 7, "phone": "+12065550007", "opt_out": False}


def test_a_batch_appended_again_is_stored_once(stream: ChangeStream) -> None:
    batch = [change(1, 10), change(2, 11)]
    head = stream.append(batch)
    assert stream.append(batch) == head  # a retried batch: nothing new
    later = stream.append([change(3, 10)])  # same position, another key
    assert later > head

    records = stream.read("apply", 10)
    assert [r.partition_key for r in records] == ["app.users.1", "app.users.2", "app.users.3"]
    assert records[-1].offset == later


def test_changes_whose_partition_keys_read_alike_are_all_stored(stream: ChangeStream) -> None:
    """A snapshot gives every row the same position, so the key alone tells its loads apart.

    Found in review: the id was ``partition_key@position``, and ``str`` of the key values made
    these pairs one id, so the second row of each pair was dropped as a duplicate.
    """
    keys: list[dict[str, object]] = [
        {"a": "x.y", "b": "z"},
        {"a": "x", "b": "y.z"},
        {"a": None, "b": "z"},
        {"a": "None", "b": "z"},
        {"a": 1, "b": "z"},
        {"a": "1", "b": "z"},
    ]
    loads = [
        ChangeEvent(op=Op.LOAD, table="t", schema="s", key=k, position="P", after=dict(k))
        for k in keys
    ]
    head = stream.append(loads)
    assert stream.append(loads) == head  # the same changes again: still stored once
    assert [payload(r)["data"] for r in stream.read("apply", 10)] == keys


def test_duplicates_within_one_batch_are_stored_once(stream: ChangeStream) -> None:
    stream.append([change(1, 10), change(1, 10, opt_out=True)])
    (record,) = stream.read("apply", 10)
    assert payload(record)["data"] == {"id": 1, "phone": "+12065550001", "opt_out": False}


def test_checkpoint_is_stored_with_the_events_and_the_latest_wins(stream: ChangeStream) -> None:
    stream.append([change(1, 10)], Checkpoint("mysql", '{"gtid": "a:1-10"}'))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-10"}')

    head = stream.append([change(1, 11)], Checkpoint("mysql", '{"gtid": "a:1-11"}'))
    assert stream.append([], Checkpoint("postgres", "0/16B3748")) == head
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-11"}')
    assert stream.checkpoint("postgres") == Checkpoint("postgres", "0/16B3748")
    assert stream.checkpoint("sqlite") is None
    assert stream.stats().head == head

    # A retried batch still moves its checkpoint, though its events are stored already.
    stream.append([change(1, 11)], Checkpoint("mysql", '{"gtid": "a:1-12"}'))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-12"}')
    assert stream.stats().head == head
    assert len(stream.read("apply", 10)) == 2


def test_checkpoints_lists_every_source_with_its_latest(stream: ChangeStream) -> None:
    """``optsync status --data-dir`` does not know the source's name: it lists them."""
    assert stream.checkpoints() == []
    stream.append([change(1, 10)], Checkpoint("mysql", '{"log": {"gtid": "0-1-5"}}'))
    stream.append([], Checkpoint("postgres", "0/16B3748"))
    stream.append([], Checkpoint("mysql", '{"log": {"gtid": "0-1-6"}}'))
    stream.append([], Checkpoint("shop.eu/1 ü", "3"))  # a name that is no plain subject token
    assert stream.checkpoints() == [
        Checkpoint("mysql", '{"log": {"gtid": "0-1-6"}}'),
        Checkpoint("postgres", "0/16B3748"),
        Checkpoint("shop.eu/1 ü", "3"),
    ]


def test_an_append_that_fails_stores_neither_events_nor_checkpoint(stream: ChangeStream) -> None:
    head = stream.append([change(1, 1)], Checkpoint("mysql", "pos-1"))
    bad = ChangeEvent(
        op=Op.INSERT, table="users", key={"id": 2}, position="2", after={"x": math.nan}
    )
    with pytest.raises(OptsyncError, match="JSON cannot carry"):
        stream.append([change(3, 3), bad], Checkpoint("mysql", "pos-3"))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", "pos-1")
    assert stream.stats().head == head
    assert offsets(stream.read("apply", 10)) == [head]


def test_a_checkpoint_is_never_readable_before_its_events(stream: ChangeStream) -> None:
    """A reader that sees checkpoint N finds every event up to N in the stream."""
    done = threading.Event()
    violations: list[str] = []

    def check() -> None:
        while not done.is_set():
            saved = stream.checkpoint("src")
            if saved is None:
                continue
            stored = {dms.decode(r.data).position for r in stream.read("check", 1000, after=0)}
            if position_of(int(saved.state)) not in stored:
                violations.append(saved.state)

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    for position in range(1, 31):
        stream.append([change(position % 3, position)], Checkpoint("src", str(position)))
    done.set()
    checker.join(30)
    assert violations == []
    assert stream.checkpoint("src") == Checkpoint("src", "30")


def test_read_limit(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(k, k) for k in range(1, 8)])
    assert offsets(stream.read("apply", 3)) == appended[:3]
    assert offsets(stream.read("apply", 3)) == appended[:3]  # nothing acknowledged yet
    stream.ack("apply", appended[2])
    assert offsets(stream.read("apply", 3)) == appended[3:6]
    stream.ack("apply", appended[5])
    assert offsets(stream.read("apply", 3)) == appended[6:]
    with pytest.raises(ValueError, match="limit"):
        stream.read("apply", 0)


def test_read_after_an_offset_ignores_the_acknowledged_one(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(k, k) for k in range(1, 8)])
    stream.ack("apply", appended[1])
    assert offsets(stream.read("apply", 3, after=appended[3])) == appended[4:7]
    assert stream.read("apply", 3, after=appended[6]) == []
    assert stream.stats().consumers == {"apply": appended[1]}  # reading moves nothing
    assert offsets(stream.read("apply", 2)) == appended[2:4]


def test_waiting_read_after_an_offset_returns_the_next_append(stream: ChangeStream) -> None:
    (first,) = append_each(stream, [change(1, 1)])
    started = time.monotonic()
    assert stream.read("apply", 10, wait=0.05, after=first) == []
    assert time.monotonic() - started >= 0.04
    (second,) = append_each(stream, [change(2, 2)])
    assert offsets(stream.read("apply", 10, wait=WAIT, after=first)) == [second]


def test_read_without_wait_returns_at_once(stream: ChangeStream) -> None:
    started = time.monotonic()
    assert stream.read("apply", 10, wait=0) == []
    (first,) = append_each(stream, [change(1, 1)])
    stream.ack("apply", first)
    assert stream.read("apply", 10) == []
    assert time.monotonic() - started < 1.0


def test_read_waits_for_nothing_longer_than_asked(stream: ChangeStream) -> None:
    started = time.monotonic()
    assert stream.read("apply", 10, wait=0.2) == []
    assert 0.19 <= time.monotonic() - started < 2.0


def test_waiting_read_returns_as_soon_as_another_thread_appends(stream: ChangeStream) -> None:
    stream.read("apply", 1)  # the reader thread then finds its connection and consumer ready
    thread, result = read_in_thread(stream, "apply", WAIT)
    time.sleep(0.1)
    (first,) = append_each(stream, [change(1, 1)])
    thread.join(WAIT + 1)

    ((records, took),) = result
    assert offsets(records) == [first]
    assert took < WAIT / 2


def test_ack_is_monotonic_and_seek_replays(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(k, k) for k in range(1, 6)])
    stream.ack("apply", appended[3])
    stream.ack("apply", appended[1])  # a late, lower ack is ignored
    assert stream.stats().consumers == {"apply": appended[3]}
    assert offsets(stream.read("apply", 10)) == appended[4:]

    stream.seek("apply", appended[0])
    assert stream.stats().consumers == {"apply": appended[0]}
    assert offsets(stream.read("apply", 10)) == appended[1:]

    stream.seek("apply", 0)
    assert offsets(stream.read("apply", 10)) == appended


def test_offsets_outside_the_stream_are_refused(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(1, 1), change(2, 2)])
    for bad in (-1, appended[-1] + 1):
        with pytest.raises(ValueError, match="outside the stream"):
            stream.ack("apply", bad)
        with pytest.raises(ValueError, match="outside the stream"):
            stream.seek("apply", bad)
    stream.seek("apply", appended[-1])  # the head itself: "start from now"
    assert stream.read("apply", 10) == []


def test_consumers_are_independent(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(k, k) for k in range(1, 4)])
    stream.ack("apply", appended[1])
    assert offsets(stream.read("apply", 10)) == appended[2:]
    assert offsets(stream.read("export", 10)) == appended
    stream.ack("export", appended[0])
    assert stream.stats().consumers == {"apply": appended[1], "export": appended[0]}


def test_pending_counts_what_each_consumer_has_not_acknowledged(stream: ChangeStream) -> None:
    appended = append_each(stream, [change(k, k) for k in range(1, 6)])
    stream.read("slow", 1)
    stream.ack("apply", appended[1])
    stats = stream.stats()
    assert stats.pending == {"slow": 5, "apply": 3}
    assert stats.consumers == {"slow": 0, "apply": appended[1]}

    stream.ack("apply", appended[-1])
    stats = stream.stats()
    assert stats.pending == {"slow": 5, "apply": 0}
    assert stats.consumers["apply"] == stats.head  # done: its offset is the head


def test_trim_never_drops_what_a_consumer_has_not_acknowledged(stream: ChangeStream) -> None:
    """One event per append: the NATS stream counts dropped messages, here one per record."""
    appended = append_each(stream, [change(k, k) for k in range(1, 11)])
    assert stream.trim(appended[2]) == 3  # no consumer yet
    assert stream.stats().oldest == appended[3]

    stream.read("slow", 1)  # registered by its first read, at 0: holds everything
    stream.ack("fast", appended[9])
    assert stream.trim(appended[7]) == 0
    stream.ack("slow", appended[4])
    assert stream.trim(appended[7]) == 2
    stats = stream.stats()
    assert (stats.head, stats.oldest) == (appended[9], appended[5])
    assert offsets(stream.read("slow", 10)) == appended[5:]
    stream.seek("slow", 0)
    assert offsets(stream.read("slow", 2)) == appended[5:7]  # replay starts at the oldest

    stream.ack("slow", appended[9])
    assert stream.trim(appended[9]) == 5
    stats = stream.stats()
    assert (stats.head, stats.oldest) == (appended[9], appended[9] + 1)
    assert stream.append([change(11, 11)]) > appended[9]  # offsets are never reused


def test_raw_records_come_back_byte_identical(stream: ChangeStream) -> None:
    foreign = [
        ("app.users.1", b'{\n  "data": {"id": 1},\n  "metadata": {"operation": "load"}\n}'),
        ("task-id", b'{"control": {}, "metadata": {"record-type": "control"}}'),
        ("app.users.2", b"\xff\x00 not even JSON"),
    ]
    first = stream.append_raw(foreign)
    assert stream.append_raw(foreign[:1]) > first  # raw records carry no event id to dedupe on
    records = stream.read("apply", 10)
    assert [(r.partition_key, r.data) for r in records] == [*foreign, foreign[0]]
    assert all(type(r.data) is bytes for r in records)


def test_empty_append_changes_nothing(stream: ChangeStream) -> None:
    head = stream.append([change(1, 1)])
    assert stream.append([]) == head
    assert stream.append_raw([]) == head
    assert stream.stats().head == head


def test_concurrent_appends_get_distinct_offsets(stream: ChangeStream) -> None:
    def append_many(key: int) -> None:
        for position in range(1, 26):
            stream.append([change(key, position)], Checkpoint(f"source{key}", str(position)))

    threads = [threading.Thread(target=append_many, args=(key,)) for key in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    records = stream.read("apply", 1000)
    assert len(records) == 100
    assert offsets(records) == sorted(set(offsets(records)))
    assert records[-1].offset == stream.stats().head
    for key in range(4):  # each writer's events in its own order
        mine = [dms.decode(r.data) for r in records if r.partition_key == f"app.users.{key}"]
        assert [e.position for e in mine] == [position_of(p) for p in range(1, 26)]
        assert stream.checkpoint(f"source{key}") == Checkpoint(f"source{key}", "25")


def test_close_wakes_a_waiting_reader(stream: ChangeStream) -> None:
    stream.read("apply", 1)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            stream.read("apply", 10, wait=WAIT)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    time.sleep(0.1)
    started = time.monotonic()
    stream.close()
    thread.join(WAIT + 1)
    assert time.monotonic() - started < WAIT / 2
    assert len(errors) == 1
    assert "closed" in str(errors[0])


def test_closed_stream_refuses_calls(stream: ChangeStream) -> None:
    stream.close()
    stream.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        stream.append([change(1, 1)])


# -- partitions ---------------------------------------------------------------------------------


def test_records_are_routed_by_key_and_keep_their_order_per_partition(
    open_stream: Opener,
) -> None:
    stream = open_stream(4)
    assert stream.partitions == 4
    events = [change(key, position) for position in range(1, 4) for key in range(12)]
    stream.append(events[:20])
    stream.append(events[20:])

    seen: list[ChangeEvent] = []
    for partition in range(4):
        records = stream.read("apply", 100, partition=partition)
        assert records, f"partition {partition} got no record"
        assert offsets(records) == sorted(set(offsets(records)))
        for record in records:
            assert record.partition == partition
            assert partition_of(record.partition_key, 4) == partition
        seen += [dms.decode(r.data) for r in records]
    assert sorted(seen, key=events.index) == events  # every event once
    for key in range(12):  # one row's changes in source order
        positions = [e.position for e in seen if e.key == {"id": key}]
        assert positions == [position_of(p) for p in range(1, 4)]
    with pytest.raises(ValueError, match="partition"):
        stream.read("apply", 10, partition=4)


def test_offsets_are_acknowledged_per_partition(open_stream: Opener) -> None:
    stream = open_stream(2)
    grouped = keys_by_partition(2, 8)
    p0 = append_each(stream, [change(k, 1) for k in grouped[0][:3]])
    p1 = append_each(stream, [change(k, 1) for k in grouped[1][:3]])

    stream.ack("apply", p0[2], partition=0)
    stream.ack("apply", p1[0], partition=1)
    assert stream.read("apply", 10, partition=0) == []
    assert offsets(stream.read("apply", 10, partition=1)) == p1[1:]
    stats = stream.stats()
    assert stats.pending == {"apply": 2}
    assert stats.consumers == {"apply": p1[0]}  # the lowest where records are left

    stream.ack("apply", p1[2], partition=1)
    stats = stream.stats()
    assert (stats.pending, stats.consumers) == ({"apply": 0}, {"apply": stats.head})

    stream.seek("apply", 0)  # every partition
    assert offsets(stream.read("apply", 10, partition=0)) == p0
    assert offsets(stream.read("apply", 10, partition=1)) == p1
    assert stream.stats().pending == {"apply": 6}


def test_waiting_read_of_a_partition_wakes_for_its_records(open_stream: Opener) -> None:
    stream = open_stream(2)
    grouped = keys_by_partition(2, 8)
    stream.read("apply", 1, partition=1)
    thread, result = read_in_thread(stream, "apply", WAIT, partition=1)
    time.sleep(0.1)
    stream.append([change(grouped[0][0], 1)])  # the other partition: the reader waits on
    time.sleep(0.2)
    assert result == []
    (offset,) = append_each(stream, [change(grouped[1][0], 1)])
    thread.join(WAIT + 1)
    ((records, took),) = result
    assert offsets(records) == [offset]
    assert took < WAIT / 2


def test_read_any_reads_several_partitions_and_wakes_for_any_of_them(
    open_stream: Opener,
) -> None:
    stream = open_stream(4)
    grouped = keys_by_partition(4, 16)
    p0 = append_each(stream, [change(k, 1) for k in grouped[0][:2]])
    p2 = append_each(stream, [change(k, 1) for k in grouped[2][:3]])
    found = stream.read_any("apply", 10, 0.0, {0: None, 1: None, 2: p2[0], 3: None})
    assert {p: offsets(r) for p, r in found.items()} == {0: p0, 2: p2[1:]}  # empty ones left out
    assert stream.read_any("apply", 10, 0.0, {1: None, 3: None}) == {}

    result: list[tuple[dict[int, list[StreamRecord]], float]] = []

    def wait_any() -> None:
        started = time.monotonic()
        got = stream.read_any("apply", 10, WAIT, {1: None, 3: None})
        result.append((got, time.monotonic() - started))

    thread = threading.Thread(target=wait_any)
    thread.start()
    time.sleep(0.2)
    assert result == []
    (offset,) = append_each(stream, [change(grouped[3][0], 1)])
    thread.join(WAIT + 1)
    ((got, took),) = result
    assert {p: offsets(r) for p, r in got.items()} == {3: [offset]}
    assert took < WAIT / 2


def test_trim_holds_each_partition_for_its_slowest_consumer(open_stream: Opener) -> None:
    stream = open_stream(2)
    grouped = keys_by_partition(2, 8)
    p0 = append_each(stream, [change(k, 1) for k in grouped[0][:2]])
    p1 = append_each(stream, [change(k, 1) for k in grouped[1][:2]])
    stream.ack("apply", p0[1], partition=0)  # partition 1 still unacknowledged
    head = stream.stats().head
    assert stream.trim(head) == 2
    assert stream.read("apply", 10, partition=0) == []
    assert offsets(stream.read("apply", 10, partition=1)) == p1


def test_the_head_stays_when_the_newest_record_is_trimmed(open_stream: Opener) -> None:
    stream = open_stream(2)
    grouped = keys_by_partition(2, 8)
    p0 = append_each(stream, [change(grouped[0][0], 1)])
    p1 = append_each(stream, [change(grouped[1][0], 1)])  # the newest record
    stream.ack("apply", p1[0], partition=1)
    assert stream.trim(p1[0]) == 1  # partition 0 is held by "apply"
    stats = stream.stats()
    assert (stats.head, stats.oldest, stats.pending) == (p1[0], p0[0], {"apply": 1})
    assert stream.append([change(grouped[1][1], 2)]) > p1[0]


# -- leases -------------------------------------------------------------------------------------


def test_two_workers_split_the_partitions_evenly(open_stream: Opener) -> None:
    stream = open_stream(4)
    first = stream.claim("apply", "w1", TTL * 10)
    assert first == frozenset(range(4))  # alone: everything
    assert stream.claim("apply", "w2", TTL * 10) == frozenset()  # nothing free yet
    first = stream.claim("apply", "w1", TTL * 10)  # w1 sees w2 and gives up its share
    second = stream.claim("apply", "w2", TTL * 10)
    assert (len(first), len(second)) == (2, 2)
    assert first.isdisjoint(second)


def test_a_worker_that_joins_gets_its_share_without_telling_the_others(
    open_stream: Opener,
) -> None:
    stream = open_stream(6)
    owned = {w: stream.claim("apply", w, TTL * 10) for w in ("w1", "w2")}
    for _ in range(2):
        owned = {w: stream.claim("apply", w, TTL * 10) for w in ("w1", "w2")}
    assert sorted(len(o) for o in owned.values()) == [3, 3]

    # w3 only claims; w1 and w2 go on claiming as they always do.
    for _ in range(3):
        owned = {w: stream.claim("apply", w, TTL * 10) for w in ("w3", "w1", "w2")}
    assert sorted(len(o) for o in owned.values()) == [2, 2, 2]
    assert set().union(*owned.values()) == set(range(6))


def test_a_worker_that_stops_claiming_loses_its_partitions_after_the_ttl(
    open_stream: Opener,
) -> None:
    stream = open_stream(4)
    stream.claim("apply", "w1", TTL)
    stream.claim("apply", "w2", TTL)
    stream.claim("apply", "w1", TTL)
    assert len(stream.claim("apply", "w2", TTL)) == 2
    assert len(stream.claim("apply", "w1", TTL)) == 2
    # w2 stops claiming (a SIGKILL looks the same from here).
    started = time.monotonic()
    assert wait_for(lambda: stream.claim("apply", "w1", TTL) == frozenset(range(4)), TTL * 10)
    assert time.monotonic() - started >= TTL * 0.5  # not before its liveness ran out


def test_release_hands_the_partitions_over_at_once(open_stream: Opener) -> None:
    stream = open_stream(4)
    stream.claim("apply", "w1", 30)
    stream.claim("apply", "w2", 30)
    stream.claim("apply", "w1", 30)
    assert len(stream.claim("apply", "w2", 30)) == 2
    stream.release("apply", "w2")
    assert stream.claim("apply", "w1", 30) == frozenset(range(4))
    assert stream.claim("export", "w2", 30) == frozenset(range(4))  # consumers are apart


def test_a_partition_taken_over_is_read_again_from_its_acknowledged_offset(
    open_durable: Opener,
) -> None:
    writer = open_durable(1)
    appended = append_each(writer, [change(k, 1) for k in range(5)])
    old_worker = open_durable(1)
    assert old_worker.claim("apply", "old", TTL) == frozenset({0})
    assert offsets(old_worker.read("apply", 3)) == appended[:3]
    old_worker.ack("apply", appended[1])
    old_worker.close()  # without release: as if it died

    new_worker = open_durable(1)
    assert wait_for(lambda: new_worker.claim("apply", "new", TTL) == frozenset({0}), TTL * 10)
    assert offsets(new_worker.read("apply", 10)) == appended[2:]  # its unacknowledged records


# -- durable backends ---------------------------------------------------------------------------


def test_acknowledgements_survive_a_reopen(open_durable: Opener) -> None:
    first = open_durable(2)
    grouped = keys_by_partition(2, 8)
    p0 = append_each(first, [change(k, 1) for k in grouped[0][:3]])
    p1 = append_each(first, [change(k, 1) for k in grouped[1][:3]])
    first.ack("apply", p0[1], partition=0)
    first.ack("apply", p1[0], partition=1)
    first.close()  # right after the acks: they must be stored by now

    second = open_durable(2)
    assert offsets(second.read("apply", 10, partition=0)) == p0[2:]
    assert offsets(second.read("apply", 10, partition=1)) == p1[1:]
    assert second.stats().pending == {"apply": 3}


# -- per-event idempotency: memory and embedded --------------------------------------------------


def test_an_event_already_stored_is_skipped_in_any_batch(local_stream: ChangeStream) -> None:
    assert local_stream.append([change(1, 10), change(2, 11)]) == 2
    assert local_stream.append([change(1, 10), change(1, 12)]) == 3  # one old, one new
    records = local_stream.read("apply", 10)
    assert [(r.offset, r.partition_key) for r in records] == [
        (1, "app.users.1"),
        (2, "app.users.2"),
        (3, "app.users.1"),
    ]


# -- the embedded stream only --------------------------------------------------------------------


def test_embedded_keeps_everything_across_a_restart(
    open_embedded: Callable[..., EmbeddedStream],
) -> None:
    first = open_embedded()
    first.append([change(k, k) for k in range(1, 6)], Checkpoint("mysql", "pos-5"))
    first.append_raw([("app.users.9", b"raw")])
    first.ack("apply", 3)
    first.seek("export", 1)
    first.trim(1)
    before = first.stats()
    records = first.read("audit", 10)
    first.close()

    second = open_embedded()
    assert second.stats() == replace(
        before,
        consumers={**before.consumers, "audit": 0},
        pending={**before.pending, "audit": 5},
    )
    assert second.read("audit", 10) == records
    assert [r.offset for r in second.read("apply", 10)] == [4, 5, 6]
    assert second.checkpoint("mysql") == Checkpoint("mysql", "pos-5")
    assert second.append([change(2, 2)]) == 6  # still idempotent after the restart

    for consumer in ("apply", "export", "audit"):
        second.ack(consumer, 6)
    assert second.trim(6) == 5
    second.close()

    third = open_embedded()
    assert third.append([change(2, 2)]) == 7  # trimmed away, so stored again; offset not reused
    assert (third.stats().head, third.stats().oldest) == (7, 7)


def test_embedded_stores_its_partition_count(open_embedded: Callable[..., EmbeddedStream]) -> None:
    first = open_embedded(4)
    first.append([change(k, 1) for k in range(8)])
    first.close()
    assert open_embedded().partitions == 4  # none asked: the stored count
    assert open_embedded(4).partitions == 4
    with pytest.raises(ConfigError, match="created with 4 partition"):
        open_embedded(2)


def test_embedded_migrates_a_file_written_before_partitions(tmp_path: Path) -> None:
    path = tmp_path / "stream.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE records ("offset" INTEGER PRIMARY KEY AUTOINCREMENT,
            partition_key TEXT NOT NULL, event_id TEXT UNIQUE, data BLOB NOT NULL,
            appended_at REAL NOT NULL);
        CREATE TABLE consumers (name TEXT PRIMARY KEY, "offset" INTEGER NOT NULL);
        CREATE TABLE checkpoints (source TEXT PRIMARY KEY, state TEXT NOT NULL);
        INSERT INTO consumers VALUES ('apply', 2), ('export', 0);
        INSERT INTO checkpoints VALUES ('mysql', 'pos-3');
        """
    )
    events = [change(k, k) for k in range(1, 4)]
    conn.executemany(
        "INSERT INTO records (partition_key, event_id, data, appended_at) VALUES (?, ?, ?, 0)",
        [(e.partition_key, e.event_id, dms.encode(e)) for e in events],
    )
    conn.commit()
    conn.close()

    with pytest.raises(ConfigError, match="one partition"):
        EmbeddedStream(path, partitions=8)
    stream = EmbeddedStream(path)
    try:
        assert stream.partitions == 1
        assert [r.offset for r in stream.read("apply", 10)] == [3]
        assert [dms.decode(r.data) for r in stream.read("export", 10)] == events
        assert stream.append(events) == 3  # the stored event ids still deduplicate
        assert stream.checkpoint("mysql") == Checkpoint("mysql", "pos-3")
        stream.ack("apply", 3)
        assert stream.stats().consumers == {"apply": 3, "export": 0}
        assert stream.claim("apply", "w1", 5) == frozenset({0})
    finally:
        stream.close()
    reopened = EmbeddedStream(path, partitions=1)
    assert reopened.stats().pending == {"apply": 0, "export": 3}
    reopened.close()


def test_embedded_leases_are_shared_by_every_object_on_the_file(
    open_embedded: Callable[..., EmbeddedStream],
) -> None:
    first, second = open_embedded(4), open_embedded()
    first.claim("apply", "w1", 30)
    second.claim("apply", "w2", 30)
    owned = first.claim("apply", "w1", 30)
    assert second.claim("apply", "w2", 30) == frozenset(range(4)) - owned
    assert len(owned) == 2


def test_embedded_reader_on_another_connection_wakes_up(
    open_embedded: Callable[..., EmbeddedStream],
) -> None:
    writer, reader = open_embedded(), open_embedded()
    reader.read("apply", 1)
    thread, result = read_in_thread(reader, "apply", WAIT)
    time.sleep(0.1)
    writer.append([change(1, 1)], Checkpoint("mysql", "pos-1"))
    thread.join(WAIT + 1)

    ((records, took),) = result
    assert [r.offset for r in records] == [1]
    assert took < WAIT / 2
    assert reader.checkpoint("mysql") == Checkpoint("mysql", "pos-1")


def test_embedded_writers_on_two_connections_take_turns(
    open_embedded: Callable[..., EmbeddedStream],
) -> None:
    first, second = open_embedded(), open_embedded()

    def append_many(stream: EmbeddedStream, key: int) -> None:
        for position in range(1, 51):
            stream.append([change(key, position)])
            stream.ack(f"consumer{key}", position)  # acks are writes too

    threads = [
        threading.Thread(target=append_many, args=(stream, key))
        for key, stream in enumerate((first, second))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stats = first.stats()
    assert stats.head == 100
    assert stats.consumers == {"consumer0": 50, "consumer1": 50}


def test_embedded_reader_ignores_commits_that_bring_no_record(
    open_embedded: Callable[..., EmbeddedStream],
) -> None:
    writer, reader = open_embedded(), open_embedded()
    writer.append([change(1, 1)])
    reader.ack("apply", 1)
    thread, result = read_in_thread(reader, "apply", 0.5)
    time.sleep(0.1)
    writer.ack("other", 1)  # changes data_version, but nothing for "apply"
    writer.append([change(1, 1)])  # a duplicate: nothing stored
    thread.join(WAIT)
    ((records, took),) = result
    assert records == []
    assert took >= 0.49
