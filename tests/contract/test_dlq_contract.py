"""The ``DeadLetterQueue`` contract: every backend keeps one entry per record, never drops one.

Backends: SQLite (a file) and PostgreSQL (a database of the session's server, see conftest).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest

from optsync.apply.dlq import DeadLetterQueue, SQLiteDeadLetterQueue
from optsync.apply.dlq.postgres import PostgresDeadLetterQueue

Opener = Callable[[], DeadLetterQueue]
"""Opens (again) the queue of the test: every call reaches the same stored entries."""

DlqBackend = Callable[[pytest.FixtureRequest, Path], AbstractContextManager[Opener]]


@contextmanager
def _sqlite(_request: pytest.FixtureRequest, folder: Path) -> Iterator[Opener]:
    yield lambda: SQLiteDeadLetterQueue(folder / "dlq.db")


@contextmanager
def _postgres(request: pytest.FixtureRequest, _folder: Path) -> Iterator[Opener]:
    # conftest.PostgresDatabases: a database of the session's server, dropped on exit.
    with request.getfixturevalue("postgres_databases").database() as url:
        yield lambda: PostgresDeadLetterQueue(url)


DLQ_BACKENDS: dict[str, DlqBackend] = {"sqlite": _sqlite, "postgres": _postgres}


@pytest.fixture(params=list(DLQ_BACKENDS))
def open_dlq(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the test's queue of the parametrized backend; closes every one opened after."""
    with ExitStack() as stack:
        opener = stack.enter_context(DLQ_BACKENDS[request.param](request, tmp_path))

        def open_one() -> DeadLetterQueue:
            dlq = opener()
            stack.callback(dlq.close)
            return dlq

        yield open_one


@pytest.fixture
def dlq(open_dlq: Opener) -> DeadLetterQueue:
    return open_dlq()


def test_an_empty_queue(dlq: DeadLetterQueue) -> None:
    assert dlq.count() == 0
    assert dlq.list() == []
    dlq.add("apply", [])
    assert dlq.count() == 0


def test_entries_keep_what_was_added_oldest_first(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k1", b"record-a", "bad phone"), (6, "k2", b"\x00\xffb", "no rule")])
    dlq.add("other", [(1, "k3", b"record-c", "unknown table")])
    entries = dlq.list()
    assert [
        (e.consumer, e.stream_offset, e.partition_key, e.data, e.reason, e.replayed_at)
        for e in entries
    ] == [
        ("apply", 5, "k1", b"record-a", "bad phone", None),
        ("apply", 6, "k2", b"\x00\xffb", "no rule", None),
        ("other", 1, "k3", b"record-c", "unknown table", None),
    ]
    assert entries[0].id < entries[1].id < entries[2].id
    assert all(e.at > 0 for e in entries)
    assert dlq.count() == 3
    assert [e.stream_offset for e in dlq.list(limit=2)] == [5, 6]


def test_a_redelivered_record_is_kept_once(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])  # the same record after a crash
    assert [(e.stream_offset, e.data) for e in dlq.list()] == [(5, b"record-a")]


def test_the_same_offset_of_another_consumer_is_another_entry(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply-2", [(5, "k", b"record-a", "bad phone")])
    assert sorted(e.consumer for e in dlq.list()) == ["apply", "apply-2"]


def test_a_different_record_at_a_reused_offset_is_a_new_entry(dlq: DeadLetterQueue) -> None:
    """A stream file replaced by an empty one starts its offsets again; found in review: the
    second record at offset 5 was acknowledged, never applied and not kept here."""
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply", [(5, "k", b"record-b", "bad opt-in value")])
    assert [e.data for e in dlq.list()] == [b"record-a", b"record-b"]


def test_replayed_entries_leave_the_queue_but_stay_listed(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(n, "k", f"r{n}".encode(), "bad") for n in range(4)])
    first, second, *rest = dlq.list()
    dlq.mark_replayed([first.id, second.id])
    assert dlq.count() == 2
    assert [e.id for e in dlq.list()] == [e.id for e in rest]
    everything = dlq.list(include_replayed=True)
    assert [e.id for e in everything] == [first.id, second.id, *(e.id for e in rest)]
    assert everything[0].replayed_at is not None and everything[2].replayed_at is None


def test_a_replayed_record_that_fails_again_comes_back(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    (entry,) = dlq.list()
    dlq.mark_replayed([entry.id])
    assert dlq.count() == 0
    dlq.add("apply", [(5, "k", b"record-a", "still a bad phone")])
    (again,) = dlq.list()
    assert (again.id, again.reason, again.replayed_at) == (entry.id, "still a bad phone", None)


def test_a_waiting_record_added_again_keeps_its_reason(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    dlq.add("apply", [(5, "k", b"record-a", "another reason")])
    assert [e.reason for e in dlq.list()] == ["bad phone"]


def test_update_reason_keeps_the_entry_waiting(dlq: DeadLetterQueue) -> None:
    dlq.add("apply", [(5, "k", b"record-a", "bad phone")])
    (entry,) = dlq.list()
    dlq.update_reason(entry.id, "still bad after the mapping fix")
    (updated,) = dlq.list()
    assert (updated.id, updated.reason, updated.replayed_at) == (
        entry.id,
        "still bad after the mapping fix",
        None,
    )
    assert updated.at >= entry.at


def test_entries_survive_a_reopen(open_dlq: Opener) -> None:
    first = open_dlq()
    first.add("apply", [(5, "k", b"record-a", "bad phone")])
    first.close()
    reopened = open_dlq()
    assert [(e.stream_offset, e.data, e.reason) for e in reopened.list()] == [
        (5, b"record-a", "bad phone")
    ]
    reopened.add("apply", [(5, "k", b"record-a", "bad phone")])
    assert reopened.count() == 1


def test_two_workers_adding_the_same_records_at_once_keep_one_of_each(open_dlq: Opener) -> None:
    """Two apply workers handed the same records (a redelivery) write them concurrently."""
    queues = [open_dlq(), open_dlq()]
    records = [(n, "k", f"record-{n}".encode(), "bad") for n in range(40)]
    start = threading.Barrier(len(queues))
    errors: list[BaseException] = []

    def add_all(queue: DeadLetterQueue) -> None:
        try:
            start.wait()
            for record in records:
                queue.add("apply", [record])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add_all, args=(q,)) for q in queues]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert sorted(e.stream_offset for e in queues[0].list(limit=1000)) == list(range(40))
