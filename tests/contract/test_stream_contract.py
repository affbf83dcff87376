"""The ``ChangeStream`` contract: every case runs against each backend in ``STREAM_BACKENDS``.

A new backend (NATS JetStream) is one more factory in ``STREAM_BACKENDS``. Cases that only make
sense for one backend (the embedded file surviving a restart) follow the shared suite.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from optsync.events import ChangeEvent, Op, position_of
from optsync.formats import dms
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord
from optsync.stream.embedded import EmbeddedStream
from optsync.stream.memory import MemoryStream

StreamBackend = Callable[[Path], ChangeStream]
"""Opens an empty stream; the folder is the test's own, for backends that keep files."""

STREAM_BACKENDS: dict[str, StreamBackend] = {
    "memory": lambda _folder: MemoryStream(),
    "embedded": lambda folder: EmbeddedStream(folder / "stream.db"),
}

WAIT = 5.0
"""A reader's wait in the wake-up cases; they pass only if the reader returns in under half."""


@pytest.fixture(params=list(STREAM_BACKENDS))
def stream(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChangeStream]:
    """An empty stream of the parametrized backend, closed after the test."""
    opened = STREAM_BACKENDS[request.param](tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def open_embedded(tmp_path: Path) -> Iterator[Callable[[], EmbeddedStream]]:
    """Opens ``EmbeddedStream`` objects on one file; closes every one after the test."""
    opened: list[EmbeddedStream] = []

    def open_() -> EmbeddedStream:
        opened.append(EmbeddedStream(tmp_path / "data" / "stream.db"))
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


def payload(record: StreamRecord) -> dict[str, object]:
    """The DMS JSON document a record holds."""
    document = json.loads(record.data)
    assert isinstance(document, dict)
    return document


def read_in_thread(
    stream: ChangeStream, consumer: str, wait: float
) -> tuple[threading.Thread, list[tuple[list[StreamRecord], float]]]:
    """Starts a reader thread; the list gets (records, seconds the read took) when it returns."""
    result: list[tuple[list[StreamRecord], float]] = []

    def run() -> None:
        started = time.monotonic()
        records = stream.read(consumer, 10, wait=wait)
        result.append((records, time.monotonic() - started))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# -- the shared suite ---------------------------------------------------------------------------


def test_empty_stream(stream: ChangeStream) -> None:
    stats = stream.stats()
    assert (stats.head, stats.oldest, stats.consumers) == (0, 1, {})
    assert stream.read("apply", 10) == []
    assert stream.checkpoint("mysql") is None


def test_append_then_read_in_order(stream: ChangeStream) -> None:
    events = [change(1, 10), change(2, 11), change(1, 12, opt_out=True), change(3, 13)]
    assert stream.append(events[:3]) == 3
    assert stream.append(events[3:]) == 4

    records = stream.read("apply", 10)
    assert [r.offset for r in records] == [1, 2, 3, 4]
    keys = [r.partition_key for r in records]
    assert keys == ["app.users.1", "app.users.2", "app.users.1", "app.users.3"]
    assert payload(records[2])["data"] == {"id": 1, "phone": "+12065550001", "opt_out": True}
    metadata = payload(records[0])["metadata"]
    assert isinstance(metadata, dict)
    assert (metadata["schema-name"], metadata["table-name"]) == ("app", "users")
    assert metadata["operation"] == "update"
    assert all(r.appended_at == pytest.approx(time.time(), abs=60) for r in records)
    assert [dms.decode(r.data) for r in records] == events  # stored as DMS JSON, losslessly


def test_delete_record_holds_the_before_image(stream: ChangeStream) -> None:
    stream.append([change(7, 1, op=Op.DELETE)])
    (record,) = stream.read("apply", 10)
    assert payload(record)["data"] == {"id": 7, "phone": "+12065550007", "opt_out": False}


def test_append_is_idempotent_by_key_and_position(stream: ChangeStream) -> None:
    batch = [change(1, 10), change(2, 11)]
    assert stream.append(batch) == 2
    assert stream.append(batch) == 2  # a retried batch: nothing new
    assert stream.append([change(1, 10), change(1, 12)]) == 3  # one old, one new position
    assert stream.append([change(3, 10)]) == 4  # same position, another key

    records = stream.read("apply", 10)
    assert [(r.offset, r.partition_key) for r in records] == [
        (1, "app.users.1"),
        (2, "app.users.2"),
        (3, "app.users.1"),
        (4, "app.users.3"),
    ]


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
    assert stream.append(loads) == 6
    assert stream.append(loads) == 6  # the same changes again: still stored once
    assert [payload(r)["data"] for r in stream.read("apply", 10)] == keys


def test_duplicates_within_one_batch_are_stored_once(stream: ChangeStream) -> None:
    assert stream.append([change(1, 10), change(1, 10, opt_out=True)]) == 1
    (record,) = stream.read("apply", 10)
    assert payload(record)["data"] == {"id": 1, "phone": "+12065550001", "opt_out": False}


def test_checkpoint_is_stored_with_the_events_and_the_latest_wins(stream: ChangeStream) -> None:
    stream.append([change(1, 10)], Checkpoint("mysql", '{"gtid": "a:1-10"}'))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-10"}')

    stream.append([change(1, 11)], Checkpoint("mysql", '{"gtid": "a:1-11"}'))
    stream.append([], Checkpoint("postgres", "0/16B3748"))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-11"}')
    assert stream.checkpoint("postgres") == Checkpoint("postgres", "0/16B3748")
    assert stream.checkpoint("sqlite") is None
    assert stream.stats().head == 2

    # A retried batch still moves its checkpoint, though its events are stored already.
    stream.append([change(1, 11)], Checkpoint("mysql", '{"gtid": "a:1-12"}'))
    assert stream.checkpoint("mysql") == Checkpoint("mysql", '{"gtid": "a:1-12"}')
    assert stream.stats().head == 2


def test_read_limit(stream: ChangeStream) -> None:
    stream.append([change(k, k) for k in range(1, 8)])
    assert [r.offset for r in stream.read("apply", 3)] == [1, 2, 3]
    assert [r.offset for r in stream.read("apply", 3)] == [1, 2, 3]  # nothing acknowledged yet
    stream.ack("apply", 3)
    assert [r.offset for r in stream.read("apply", 3)] == [4, 5, 6]
    stream.ack("apply", 6)
    assert [r.offset for r in stream.read("apply", 3)] == [7]
    with pytest.raises(ValueError, match="limit"):
        stream.read("apply", 0)


def test_read_after_an_offset_ignores_the_acknowledged_one(stream: ChangeStream) -> None:
    stream.append([change(k, k) for k in range(1, 8)])
    stream.ack("apply", 2)
    assert [r.offset for r in stream.read("apply", 3, after=4)] == [5, 6, 7]
    assert stream.read("apply", 3, after=7) == []
    assert stream.stats().consumers == {"apply": 2}  # reading moves nothing
    assert [r.offset for r in stream.read("apply", 2)] == [3, 4]


def test_waiting_read_after_an_offset_returns_the_next_append(stream: ChangeStream) -> None:
    stream.append([change(1, 1)])
    started = time.monotonic()
    assert stream.read("apply", 10, wait=0.05, after=1) == []
    assert time.monotonic() - started >= 0.04
    stream.append([change(2, 2)])
    assert [r.offset for r in stream.read("apply", 10, wait=WAIT, after=1)] == [2]


def test_read_without_wait_returns_at_once(stream: ChangeStream) -> None:
    started = time.monotonic()
    assert stream.read("apply", 10, wait=0) == []
    stream.append([change(1, 1)])
    stream.ack("apply", 1)
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
    stream.append([change(1, 1)])
    thread.join(WAIT + 1)

    ((records, took),) = result
    assert [r.offset for r in records] == [1]
    assert took < WAIT / 2


def test_ack_is_monotonic_and_seek_replays(stream: ChangeStream) -> None:
    stream.append([change(k, k) for k in range(1, 6)])
    stream.ack("apply", 4)
    stream.ack("apply", 2)  # a late, lower ack is ignored
    assert stream.stats().consumers == {"apply": 4}
    assert [r.offset for r in stream.read("apply", 10)] == [5]

    stream.seek("apply", 1)
    assert stream.stats().consumers == {"apply": 1}
    assert [r.offset for r in stream.read("apply", 10)] == [2, 3, 4, 5]

    stream.seek("apply", 0)
    assert [r.offset for r in stream.read("apply", 10)] == [1, 2, 3, 4, 5]


def test_offsets_outside_the_stream_are_refused(stream: ChangeStream) -> None:
    stream.append([change(1, 1), change(2, 2)])
    for bad in (-1, 3):
        with pytest.raises(ValueError, match="outside the stream"):
            stream.ack("apply", bad)
        with pytest.raises(ValueError, match="outside the stream"):
            stream.seek("apply", bad)
    stream.seek("apply", 2)  # the head itself: "start from now"
    assert stream.read("apply", 10) == []


def test_consumers_are_independent(stream: ChangeStream) -> None:
    stream.append([change(k, k) for k in range(1, 4)])
    stream.ack("apply", 2)
    assert [r.offset for r in stream.read("apply", 10)] == [3]
    assert [r.offset for r in stream.read("export", 10)] == [1, 2, 3]
    stream.ack("export", 1)
    assert stream.stats().consumers == {"apply": 2, "export": 1}


def test_trim_never_drops_what_a_consumer_has_not_acknowledged(stream: ChangeStream) -> None:
    stream.append([change(k, k) for k in range(1, 11)])
    assert stream.trim(3) == 3  # no consumer yet
    assert stream.stats().oldest == 4

    stream.read("slow", 1)  # registered by its first read, at 0: holds everything
    stream.ack("fast", 10)
    assert stream.trim(8) == 0
    stream.ack("slow", 5)
    assert stream.trim(8) == 2
    stats = stream.stats()
    assert (stats.head, stats.oldest) == (10, 6)
    assert [r.offset for r in stream.read("slow", 10)] == [6, 7, 8, 9, 10]
    stream.seek("slow", 0)
    assert [r.offset for r in stream.read("slow", 2)] == [6, 7]  # replay starts at the oldest

    stream.ack("slow", 10)
    assert stream.trim(10) == 5
    stats = stream.stats()
    assert (stats.head, stats.oldest) == (10, 11)
    assert stream.append([change(11, 11)]) == 11  # offsets are never reused


def test_raw_records_come_back_byte_identical(stream: ChangeStream) -> None:
    foreign = [
        ("app.users.1", b'{\n  "data": {"id": 1},\n  "metadata": {"operation": "load"}\n}'),
        ("task-id", b'{"control": {}, "metadata": {"record-type": "control"}}'),
        ("app.users.2", b"\xff\x00 not even JSON"),
    ]
    assert stream.append_raw(foreign) == 3
    assert stream.append_raw(foreign[:1]) == 4  # raw records carry no event id to dedupe on
    records = stream.read("apply", 10)
    assert [(r.partition_key, r.data) for r in records] == [*foreign, foreign[0]]
    assert all(type(r.data) is bytes for r in records)


def test_empty_append_changes_nothing(stream: ChangeStream) -> None:
    stream.append([change(1, 1)])
    assert stream.append([]) == 1
    assert stream.append_raw([]) == 1
    assert stream.stats().head == 1


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
    assert [r.offset for r in records] == list(range(1, 101))
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


# -- the embedded stream only --------------------------------------------------------------------


def test_embedded_keeps_everything_across_a_restart(
    open_embedded: Callable[[], EmbeddedStream],
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
    assert second.stats() == replace(before, consumers={**before.consumers, "audit": 0})
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


def test_embedded_reader_on_another_connection_wakes_up(
    open_embedded: Callable[[], EmbeddedStream],
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
    open_embedded: Callable[[], EmbeddedStream],
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
    open_embedded: Callable[[], EmbeddedStream],
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
