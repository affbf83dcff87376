"""``PartitionedApply``: several apply workers share one consumer's partitions through leases."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.partitioned import PartitionedApply
from optsync.backends import mapping_rules
from optsync.cli import SAMPLE_RULE
from optsync.engine.models import OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent, Op, position_of
from optsync.pipeline import _run_worker_name
from optsync.stream.memory import MemoryStream

PARTITIONS = 4
TTL = 0.3


def change(n: int, optin: int, position: int) -> ChangeEvent:
    row = {"userid": f"user{n}", "phone": f"+1206555{n:04d}", "optin": optin, "lastupdate": None}
    return ChangeEvent(
        op=Op.UPDATE,
        table="optin_status",
        key={"userid": f"user{n}"},
        position=position_of(position),
        before=row,
        after=row,
        schema="main",
    )


@pytest.fixture
def parts() -> Iterator[tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str]]:
    stream = MemoryStream(partitions=PARTITIONS)
    store = SQLiteStore(":memory:")
    dlq = SQLiteDeadLetterQueue(":memory:")
    app = store.create_app("a")
    yield stream, store, dlq, app.id
    stream.close()
    store.close()
    dlq.close()


def worker(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
    name: str,
    sync_interval: float = 0.0,
) -> PartitionedApply:
    stream, store, dlq, app_id = parts
    return PartitionedApply(
        stream,
        Mapper(mapping_rules([SAMPLE_RULE])),
        store,
        app_id,
        dlq,
        name=name,
        lease_ttl=TTL,
        sync_interval=sync_interval,
    )


def opt_outs(store: SQLiteStore, app_id: str, users: int) -> dict[str, OptOut]:
    return {
        f"user{n}": store.get_endpoint(app_id, f"user{n}_+1206555{n:04d}").opt_out
        for n in range(1, users + 1)
    }


def drain(*workers: PartitionedApply) -> None:
    """Step every worker until none finds anything new (at most 1,000 rounds)."""
    for _ in range(1000):
        if sum(each.step(limit=7, wait=0.0) for each in workers) == 0:
            break
    for each in workers:
        each.flush()


def test_one_worker_takes_every_partition_and_keeps_each_keys_order(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, store, _, app_id = parts
    # Each user flips in, out, in, out: the last change (opted out for odd users) must win.
    position = 0
    for flip in range(4):
        events = []
        for n in range(1, 21):
            position += 1
            optin = (0 if n % 2 else 1) if flip == 3 else (flip + 1) % 2
            events.append(change(n, optin, position))
        stream.append(events)
    only = worker(parts, "w1")
    drain(only)
    assert only.partitions == frozenset(range(PARTITIONS))
    final = opt_outs(store, app_id, 20)
    assert all(final[f"user{n}"] is (OptOut.ALL if n % 2 else OptOut.NONE) for n in range(1, 21))
    assert stream.stats().pending["apply"] == 0
    assert only.stats.records == 80


def test_two_workers_split_the_partitions_and_apply_everything_once(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, store, _, app_id = parts
    first, second = worker(parts, "w1"), worker(parts, "w2")
    first.step(wait=0.0)
    second.step(wait=0.0)
    time.sleep(TTL / 5 + 0.01)  # the next claim of each sees the other alive
    first.step(wait=0.0)
    second.step(wait=0.0)
    time.sleep(TTL / 5 + 0.01)
    first.step(wait=0.0)
    assert first.partitions | second.partitions == frozenset(range(PARTITIONS))
    assert not first.partitions & second.partitions
    assert len(first.partitions) == len(second.partitions) == PARTITIONS // 2
    stream.append([change(n, 0, n) for n in range(1, 31)])
    drain(first, second)
    assert set(opt_outs(store, app_id, 30).values()) == {OptOut.ALL}
    assert first.stats.records + second.stats.records == 30
    assert first.stats.records > 0 and second.stats.records > 0


def test_a_worker_that_stops_renewing_loses_its_partitions_and_they_are_read_again(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, store, _, app_id = parts
    dead = worker(parts, "dead", sync_interval=3600.0)  # acknowledges only when idle
    dead.step(wait=0.0)
    assert dead.partitions == frozenset(range(PARTITIONS))
    stream.append([change(n, 0, n) for n in range(1, 11)])
    assert dead.step(limit=100, wait=0.0) == 10  # applied, not acknowledged: killed right here
    assert stream.stats().pending["apply"] == 10
    # "dead" stops here (no step, no release). Its leases run out after TTL.
    heir = worker(parts, "heir")
    heir.step(wait=0.0)
    assert heir.partitions == frozenset()  # the leases are still live
    time.sleep(TTL + 0.05)
    heir._next_claim = 0.0
    drain(heir)
    assert heir.partitions == frozenset(range(PARTITIONS))
    assert heir.stats.records == 10  # read again from the acknowledged offsets
    assert stream.stats().pending["apply"] == 0
    assert set(opt_outs(store, app_id, 10).values()) == {OptOut.ALL}
    assert heir.stats.stale == 10  # the position guard made the second application a no-op


def test_a_clean_stop_hands_the_partitions_over_at_once(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    stream, _, _, _ = parts
    first = worker(parts, "w1", sync_interval=3600.0)
    first.step(wait=0.0)
    stream.append([change(n, 0, n) for n in range(1, 6)])
    assert first.step(limit=100, wait=0.0) == 5
    assert stream.stats().pending["apply"] == 5
    first.stop()
    assert stream.stats().pending["apply"] == 0  # stop acknowledged what it applied
    second = worker(parts, "w2")
    second.step(wait=0.0)
    assert second.partitions == frozenset(range(PARTITIONS))


class CountingStore(SQLiteStore):
    """The real engine, counting write transactions."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.transactions = 0

    def write_endpoints(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.transactions += 1
        return super().write_endpoints(*args, **kwargs)  # type: ignore[arg-type]


def test_one_step_writes_every_partitions_records_in_one_transaction() -> None:
    """Found by bench/cluster.py: a transaction per partition per step made commit -> applied
    p99 334 ms on PostgreSQL at 1,000 changes/s with 8 partitions."""
    stream = MemoryStream(partitions=PARTITIONS)
    store = CountingStore()
    dlq = SQLiteDeadLetterQueue(":memory:")
    try:
        app = store.create_app("a")
        only = PartitionedApply(
            stream, Mapper(mapping_rules([SAMPLE_RULE])), store, app.id, dlq, name="w"
        )
        only.step(wait=0.0)  # claims every partition
        stream.append([change(n, 0, n) for n in range(1, 41)])
        assert (
            len(
                {r.partition for p in range(PARTITIONS) for r in stream.read("x", 100, partition=p)}
            )
            == PARTITIONS
        )
        before = store.transactions
        assert only.step(limit=1000, wait=0.0) == 40
        assert store.transactions - before == 1
        assert stream.stats().pending["apply"] == 0
    finally:
        stream.close()
        store.close()
        dlq.close()


def test_a_restarted_run_takes_its_partitions_back_at_once(
    parts: tuple[MemoryStream, SQLiteStore, SQLiteDeadLetterQueue, str],
) -> None:
    """`optsync run` names its worker the same at every start: after a SIGKILL (no release) the
    next start applies at once instead of waiting a lease ttl (found by the SIGKILL e2e test,
    whose final drain waited out the killed runs' leases)."""
    assert _run_worker_name() == _run_worker_name()
    stream, _, _, _ = parts
    crashed = worker(parts, _run_worker_name())
    crashed.step(wait=0.0)
    assert crashed.partitions == frozenset(range(PARTITIONS))
    restarted = worker(parts, _run_worker_name())
    restarted.step(wait=0.0)
    assert restarted.partitions == frozenset(range(PARTITIONS))
    other = worker(parts, "another-process")
    other.step(wait=0.0)
    assert other.partitions == frozenset()  # a different name still waits for the leases
    stream.append([change(1, 0, 1)])
    drain(restarted)
    assert stream.stats().pending["apply"] == 0
