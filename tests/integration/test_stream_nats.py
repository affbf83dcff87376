"""``NatsStream`` against real nats-server processes: what the contract suite cannot show.

nats-server restarted (and killed) in the middle of a stream, a server that is not there or
refuses the credentials, streams and buckets that exist with settings optsync cannot use, and an
apply worker SIGKILLed while it holds partitions.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import nats
import pytest
from nats.js import api
from nats_server import NatsServer, free_port, nats_server_fixture, require_binary, running_server

from optsync.errors import ConfigError, Retryable
from optsync.events import ChangeEvent, Op, position_of
from optsync.formats import dms
from optsync.stream.base import Checkpoint, StreamRecord
from optsync.stream.nats import NatsStream

__all__ = ("nats_server_fixture",)  # registers the session fixture ``nats_server``

pytestmark = pytest.mark.integration

T = TypeVar("T")


def change(key: int, position: int) -> ChangeEvent:
    return ChangeEvent(
        op=Op.UPDATE,
        table="users",
        schema="app",
        key={"id": key},
        position=position_of(position),
        after={"id": key, "phone": f"+1206555{key:04d}", "opt_out": position % 2 == 0},
    )


def unique_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def retried(call: Callable[[], T], timeout: float = 30.0) -> T:
    """``call`` again after each ``Retryable`` (as capture and apply do), up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except Retryable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_everything(stream: NatsStream, consumer: str) -> list[StreamRecord]:
    records: list[StreamRecord] = []
    for partition in range(stream.partitions):
        while batch := stream.read(
            consumer, 100, partition=partition, after=_last(records, partition)
        ):
            records += batch
    return records


def _last(records: list[StreamRecord], partition: int) -> int:
    mine = [r.offset for r in records if r.partition == partition]
    return mine[-1] if mine else 0


@pytest.fixture
def private_server() -> Iterator[NatsServer]:
    """A server of the test's own: restarting it must not disturb the others."""
    require_binary()
    with running_server() as server:
        yield server


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_append_and_read_across_a_server_restart_lose_nothing(
    private_server: NatsServer, kill: bool
) -> None:
    name = unique_name()
    stream = NatsStream(private_server.url, name=name, partitions=2, timeout=1)
    try:
        before = [change(k, 1) for k in range(20)]
        stream.append(before, Checkpoint("mysql", "pos-1"))
        first = stream.read("apply", 5, partition=0)
        stream.ack("apply", first[1].offset, partition=0)

        private_server.stop(kill=kill)
        started = time.monotonic()
        with pytest.raises(Retryable):
            stream.append([change(k, 2) for k in range(20)], Checkpoint("mysql", "pos-2"))
        with pytest.raises(Retryable):
            stream.read("apply", 10, partition=1)
        with pytest.raises(Retryable):
            stream.ack("apply", first[-1].offset, partition=0)
        assert time.monotonic() - started < 15  # bounded: no call hangs on a lost server
        private_server.start()

        # Capture retries the batch that failed (it may have reached the server meanwhile).
        during = [change(k, 2) for k in range(20)]
        retried(lambda: stream.append(during, Checkpoint("mysql", "pos-2")))
        after = [change(k, 3) for k in range(20)]
        retried(lambda: stream.append(after, Checkpoint("mysql", "pos-3")))

        assert retried(lambda: stream.checkpoint("mysql")) == Checkpoint("mysql", "pos-3")
        stored = [dms.decode(r.data) for r in retried(lambda: read_everything(stream, "audit"))]
        assert sorted(stored, key=lambda e: (e.key["id"], e.position)) == sorted(
            before + during + after, key=lambda e: (e.key["id"], e.position)
        )  # every event, once: the retried batch was deduplicated
        rest = retried(lambda: stream.read("apply", 100, partition=0))
        assert rest and rest[0].offset > first[1].offset  # the acknowledgement survived
        retried(lambda: stream.ack("apply", rest[-1].offset, partition=0))
        assert stream.read("apply", 100, partition=0) == []
    finally:
        stream.close()

    reopened = NatsStream(private_server.url, name=name, partitions=2, timeout=1)
    try:
        assert len(read_everything(reopened, "audit-2")) == 60
    finally:
        reopened.close()


def test_an_unreachable_server_is_retryable_and_named() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(Retryable, match=f"NATS server {url} is unreachable"):
        NatsStream(url, name=unique_name(), timeout=1)
    assert time.monotonic() - started < 5


def test_refused_credentials_are_a_config_error() -> None:
    require_binary()
    with running_server(("--user", "optsync", "--pass", "s3cret")) as server:
        wrong = server.url.replace("nats://", "nats://optsync:wrong@")
        with pytest.raises(ConfigError, match="refused the credentials") as refused:
            NatsStream(wrong, name=unique_name(), timeout=2)
        assert "wrong" not in str(refused.value)  # the password is masked
        right = server.url.replace("nats://", "nats://optsync:s3cret@")
        stream = NatsStream(right, name=unique_name(), timeout=2)
        try:
            assert stream.append([change(1, 1)]) > 0
        finally:
            stream.close()


def _create_stream(url: str, config: api.StreamConfig) -> None:
    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(config)
        finally:
            await nc.close()

    asyncio.run(create())


def _create_bucket(url: str, config: api.KeyValueConfig) -> None:
    async def create() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().create_key_value(config)
        finally:
            await nc.close()

    asyncio.run(create())


def test_a_stream_with_another_partition_count_is_refused(nats_server: NatsServer) -> None:
    name = unique_name()
    NatsStream(nats_server.url, name=name, partitions=2).close()
    with pytest.raises(ConfigError, match="has 2 partitions, not 4"):
        NatsStream(nats_server.url, name=name, partitions=4)
    again = NatsStream(nats_server.url, name=name, partitions=2)  # the same settings: reused
    again.close()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"subjects": ["elsewhere.>"]}, "its subjects"),
        ({"storage": api.StorageType.MEMORY}, "its storage is memory"),
        ({"retention": api.RetentionPolicy.WORK_QUEUE}, "its retention is workqueue"),
        ({"metadata": None}, "not created by optsync"),
    ],
    ids=["subjects", "memory", "work-queue", "foreign"],
)
def test_a_stream_with_settings_optsync_cannot_use_is_refused(
    nats_server: NatsServer, settings: dict[str, object], named: str
) -> None:
    name = unique_name()
    config = api.StreamConfig(
        name=name,
        subjects=[f"{name}.p.*"],
        storage=api.StorageType.FILE,
        allow_direct=True,
        republish=api.RePublish(
            src=f"{name}.p.*", dest=f"{name}.n.{{{{wildcard(1)}}}}", headers_only=True
        ),
        metadata={"optsync.partitions": "8", "optsync.format": "1"},
    )
    for field_name, value in settings.items():
        setattr(config, field_name, value)
    _create_stream(nats_server.url, config)
    with pytest.raises(ConfigError, match=named) as refused:
        NatsStream(nats_server.url, name=name, partitions=8)
    assert f"nats stream rm {name}" in str(refused.value)  # and says what to do


def test_a_bucket_with_settings_optsync_cannot_use_is_refused(nats_server: NatsServer) -> None:
    name = unique_name()
    _create_bucket(
        nats_server.url, api.KeyValueConfig(bucket=f"{name}-state", storage=api.StorageType.MEMORY)
    )
    with pytest.raises(ConfigError, match=f"bucket '{name}-state'"):
        NatsStream(nats_server.url, name=name)


VICTIM = """
import json, sys, time
from optsync.stream.nats import NatsStream

stream = NatsStream(sys.argv[1], name=sys.argv[2], partitions=4)
while True:
    owned = stream.claim("apply", "victim", float(sys.argv[3]))
    if len(owned) == 2:
        break
    time.sleep(0.1)
acked = {}
for partition in sorted(owned):
    records = stream.read("apply", 3, partition=partition)
    stream.ack("apply", records[0].offset, partition=partition)
    acked[partition] = [r.offset for r in records]
print(json.dumps(acked), flush=True)
while True:  # renews its leases until it is killed
    stream.claim("apply", "victim", float(sys.argv[3]))
    time.sleep(0.2)
"""


def test_a_killed_worker_loses_its_partitions_and_they_are_read_again(
    nats_server: NatsServer,
) -> None:
    ttl = 1.5
    name = unique_name()
    survivor = NatsStream(nats_server.url, name=name, partitions=4)
    try:
        survivor.append([change(k, 1) for k in range(40)])
        victim = subprocess.Popen(
            [sys.executable, "-c", VICTIM, nats_server.url, name, str(ttl)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert victim.stdout is not None
            os.set_blocking(victim.stdout.fileno(), False)
            line = ""
            deadline = time.monotonic() + 30
            while not line and time.monotonic() < deadline:
                survivor.claim("apply", "survivor", ttl)  # gives up half to the victim
                time.sleep(0.2)
                line = victim.stdout.readline()
            assert line, "the victim never got its share"
            read_by_victim = {int(p): offsets for p, offsets in json.loads(line).items()}
            assert len(survivor.claim("apply", "survivor", ttl)) == 2
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            if victim.stdout is not None:
                victim.stdout.close()
        killed = time.monotonic()

        while survivor.claim("apply", "survivor", ttl) != frozenset(range(4)):
            assert time.monotonic() - killed < 30, "the dead worker's partitions were not taken"
            time.sleep(0.2)
        assert time.monotonic() - killed < ttl + 3

        for partition, offsets in read_by_victim.items():
            again = survivor.read("apply", 3, partition=partition)
            # From its acknowledged offset: what it read but did not acknowledge comes again.
            assert [r.offset for r in again][:2] == offsets[1:]
    finally:
        survivor.close()


def test_stats_list_more_consumers_than_one_direct_get_answers(nats_server: NatsServer) -> None:
    """A direct get answers at most 1,024 keys; 130 consumers x 8 partitions are more."""
    stream = NatsStream(nats_server.url, name=unique_name(), partitions=8)
    try:
        head = stream.append([change(k, 1) for k in range(16)])
        for n in range(130):
            stream.read(f"consumer-{n}", 1)
        stream.seek("consumer-0", head)
        stats = stream.stats()
        assert len(stats.consumers) == 130
        assert stats.consumers["consumer-0"] == head
        assert stats.pending["consumer-0"] == 0
        assert stats.pending["consumer-1"] > 0
    finally:
        stream.close()
