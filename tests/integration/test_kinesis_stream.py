"""The Kinesis input (``[stream] url = "kinesis://STREAM"``) against a local Kinesis server.

moto's server (fixture ``aws_server``) keeps shards, resharding and GetRecords as Kinesis does;
its sequence numbers restart at 0 in a child shard, which is why the stream makes its own
offsets. Records are put as a DMS task puts them: DMS JSON without ``stream-position``, with the
partition key ``schema.table.key``, straight through boto3.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aws_server import CREDENTIALS, REGION, AwsServer, aws_server_fixture
from postgres_server import PostgresServer, postgres_fixture

from optsync.apply.mapping import Mapper
from optsync.apply.partitioned import PartitionedApply
from optsync.backends import mapping_rules, open_dlq, open_store, open_stream
from optsync.config import Settings, load_settings
from optsync.engine.models import OptOut
from optsync.errors import ConfigError, Fatal, NotFound
from optsync.events import ChangeEvent, Op, position_of
from optsync.pipeline import ensure_app
from optsync.status import read_status
from optsync.stream.base import Checkpoint
from optsync.stream.kinesis import KinesisStream, _batches
from optsync.stream.kinesis_state import (
    KinesisState,
    PostgresKinesisState,
    ShardCheckpoint,
    SQLiteKinesisState,
)

__all__ = ("aws_server_fixture", "postgres_fixture")  # register ``aws_server``, ``postgres``

TTL = 0.5
"""Seconds of an apply worker's lease: a killed worker's lease runs out this fast."""


@pytest.fixture(autouse=True)
def _aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])


def _settings(tmp_path: Path, server: AwsServer, name: str) -> Settings:
    config = tmp_path / "optsync.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"

[stream]
url = "kinesis://{name}"
region = "{REGION}"
endpoint_url = "{server.endpoint_url}"

[[mapping]]
table = "optin_status"
channel = "SMS"
address = "phone"
user_id = "userid"
opt_in = "optin"
effective_date = "lastupdate"
"""
    )
    return load_settings(config, env={})


def _create(server: AwsServer, shards: int) -> str:
    name = f"dms-{uuid.uuid4().hex[:10]}"
    client = server.client("kinesis")
    client.create_stream(StreamName=name, ShardCount=shards)
    client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1})
    return name


def _dms(user: int, optin: int, op: str = "update") -> tuple[str, bytes]:
    """A record as a DMS task writes it: no stream-position, key schema.table.userid."""
    record = {
        "data": {
            "userid": f"user{user}",
            "phone": f"+1206555{user:04d}",
            "optin": optin,
            "lastupdate": "2026-01-01T00:00:00Z",
        },
        "metadata": {
            "timestamp": "2026-01-01T00:00:00.000000Z",
            "record-type": "data",
            "operation": op,
            "partition-key-type": "primary-key",
            "schema-name": "blog_db",
            "table-name": "optin_status",
        },
    }
    return f"blog_db.optin_status.user{user}", json.dumps(record).encode()


def _put(
    server: AwsServer, name: str, changes: list[tuple[int, int]], hash_key: str | None = None
) -> None:
    """(user, optin) changes, one PutRecord each, in order (a DMS task keeps per-key order).

    ``hash_key``: an ExplicitHashKey, to reach a shard made by a reshard (see ``_reshard``)."""
    client = server.client("kinesis")
    for user, optin in changes:
        key, data = _dms(user, optin)
        extra = {} if hash_key is None else {"ExplicitHashKey": hash_key}
        client.put_record(StreamName=name, PartitionKey=key, Data=data, **extra)


def _reshard(server: AwsServer, name: str) -> tuple[list[str], str]:
    """Split the first shard, then merge its upper child with the second shard.

    Returns the closed shards and a hash key that only the merged shard covers: moto 5.2.5
    keeps routing puts to a closed parent (it looks shards up in creation order, closed ones
    included), so records reach a child only through the one hash key that the parents' half-open
    ranges leave out and the merged range holds. Real Kinesis routes every put to open shards.
    """
    client = server.client("kinesis")
    first, second = client.list_shards(StreamName=name)["Shards"][:2]
    low = int(first["HashKeyRange"]["StartingHashKey"])
    high = int(first["HashKeyRange"]["EndingHashKey"])
    client.split_shard(
        StreamName=name, ShardToSplit=first["ShardId"], NewStartingHashKey=str((low + high) // 2)
    )
    children = [s for s in client.list_shards(StreamName=name)["Shards"] if "ParentShardId" in s]
    upper = max(children, key=lambda s: int(s["HashKeyRange"]["StartingHashKey"]))
    client.merge_shards(
        StreamName=name, ShardToMerge=upper["ShardId"], AdjacentShardToMerge=second["ShardId"]
    )
    closed = [first["ShardId"], upper["ShardId"], second["ShardId"]]
    merged = client.list_shards(StreamName=name)["Shards"][-1]
    assert merged.get("AdjacentParentShardId") == second["ShardId"]
    return closed, str(high)


class Applier:
    """One apply process: its own stream object, engine, DLQ and ``PartitionedApply``."""

    def __init__(self, settings: Settings, worker: str) -> None:
        self.stream = open_stream(settings)
        self.store = open_store(settings)
        self.dlq = open_dlq(settings)
        self.app_id = ensure_app(self.store, settings.app).id
        self.apply = PartitionedApply(
            self.stream,
            Mapper(mapping_rules(settings.mappings)),
            self.store,
            self.app_id,
            self.dlq,
            name=worker,
            lease_ttl=TTL,
        )

    def run(self, until: dict[int, int], seconds: float = 20.0) -> None:
        """Step until every user's opt-out is the one ``until`` says (user -> optin)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.apply.step(limit=4, wait=0.1)
            if self.opt_outs(until) == _expected(until):
                self.apply.flush()
                return
        raise AssertionError(f"apply did not catch up: {self.opt_outs(until)}")

    def opt_outs(self, users: dict[int, int]) -> dict[int, OptOut | None]:
        found: dict[int, OptOut | None] = {}
        for user in users:
            try:
                endpoint = self.store.get_endpoint(self.app_id, f"user{user}_+1206555{user:04d}")
            except NotFound:
                found[user] = None
            else:
                found[user] = endpoint.opt_out
        return found

    def kill(self) -> None:
        """Stop without acknowledging or releasing anything (as SIGKILL would)."""
        self.store.close()
        self.dlq.close()
        self.stream.close()

    def stop(self) -> None:
        self.apply.stop()
        self.kill()


def _expected(final: dict[int, int]) -> dict[int, OptOut | None]:
    return {user: OptOut.NONE if optin else OptOut.ALL for user, optin in final.items()}


def test_two_shards_reshard_and_restart_end_in_the_final_state(
    tmp_path: Path, aws_server: AwsServer
) -> None:
    name = _create(aws_server, shards=2)
    settings = _settings(tmp_path, aws_server, name)
    users = range(1, 9)
    final = dict.fromkeys(users, 1)
    _put(aws_server, name, [(user, 1) for user in users])

    first = Applier(settings, "first")
    first.run(final)
    # Changes that land in the parents before the reshard, then in the merged grandchild.
    _put(aws_server, name, [(user, 0) for user in users])
    closed, child_key = _reshard(aws_server, name)
    _put(aws_server, name, [(user, 1) for user in users], child_key)
    _put(aws_server, name, [(user, 0) for user in users if user % 2], child_key)  # opt-outs
    final = {user: 0 if user % 2 else 1 for user in users}
    # Applied part of it, acknowledged less, then killed: the rest waits in Kinesis and state.
    first.apply.step(limit=3, wait=0.0)
    first.kill()

    time.sleep(TTL)  # the killed worker's lease runs out
    second = Applier(settings, "second")
    try:
        second.run(final)
        assert second.opt_outs(final) == _expected(final)
        # Every closed shard was read to its end and acknowledged: finished in optsync's state.
        assert isinstance(second.stream, KinesisStream)
        saved = second.stream.state.shards(name, "apply")
        assert {shard for shard, c in saved.items() if c.finished} == set(closed)
        assert len(saved) == 4  # and the merged shard was read: it has a checkpoint
        assert second.stream.stats().pending == {"apply": 0}
    finally:
        second.stop()

    # A third process after a clean stop finds nothing to do and changes nothing.
    third = Applier(settings, "third")
    try:
        assert third.apply.step(limit=50, wait=0.3) == 0
        assert third.opt_outs(final) == _expected(final)
        status = read_status(settings, third.store)  # `optsync status`: its own stream object
        assert status.lag_events == 0
        assert status.stream_head == status.apply_offset > 0
    finally:
        third.stop()


def test_a_child_is_read_after_its_parents(tmp_path: Path, aws_server: AwsServer) -> None:
    """One record at a time: the merged shard's record comes after every record of its parents
    (a reader that took shards in turn without this rule would hand it out early).

    The parents' records are put after the merge: moto still routes them to the closed parents
    (see ``_reshard``) and, unlike the records it had when it merged, does not copy them into the
    merged shard, which then holds one record only."""
    name = _create(aws_server, shards=2)
    client = aws_server.client("kinesis")
    first, second = client.list_shards(StreamName=name)["Shards"]
    client.merge_shards(
        StreamName=name, ShardToMerge=first["ShardId"], AdjacentShardToMerge=second["ShardId"]
    )
    for n in range(12):
        client.put_record(StreamName=name, PartitionKey=f"k{n}", Data=f"parent {n}".encode())
    gap = first["HashKeyRange"]["EndingHashKey"]  # only the merged shard holds it (moto)
    client.put_record(StreamName=name, PartitionKey="k0", Data=b"child", ExplicitHashKey=gap)
    stream = open_stream(_settings(tmp_path, aws_server, name))
    try:
        seen: list[bytes] = []
        after = None
        while b"child" not in seen and len(seen) < 100:
            records = stream.read("apply", 1, wait=1.0, after=after)
            seen += [r.data for r in records]
            after = records[-1].offset if records else after
        assert b"child" in seen
        originals = {f"parent {n}".encode() for n in range(12)}
        assert originals <= set(seen[: seen.index(b"child")])
    finally:
        stream.close()


def test_offsets_keep_growing_across_a_reopen(tmp_path: Path, aws_server: AwsServer) -> None:
    name = _create(aws_server, shards=2)
    settings = _settings(tmp_path, aws_server, name)
    _put(aws_server, name, [(user, 1) for user in range(1, 5)])
    stream = open_stream(settings)
    first = stream.read("apply", 10, wait=2.0)
    assert len(first) == 4
    offsets = [r.offset for r in first]
    assert offsets == sorted(set(offsets))
    stream.ack("apply", offsets[1])
    # In this process a read from the acknowledged offset hands the rest out again, as it was.
    assert stream.read("apply", 10) == first[2:]
    assert stream.stats().pending == {"apply": 2}
    stream.close()

    stream = open_stream(settings)  # a restart: the records after the ack come again, higher
    try:
        again = stream.read("apply", 10, wait=2.0)
        assert {r.data for r in again} == {r.data for r in first[2:]}
        assert min(r.offset for r in again) > max(offsets)
        assert stream.stats().consumers == {"apply": offsets[1]}
        stream.seek("apply", 0)  # replay from TRIM_HORIZON, still with higher offsets
        replay = stream.read("apply", 10, wait=2.0)
        assert len(replay) == 4
        assert min(r.offset for r in replay) > max(r.offset for r in again)
        with pytest.raises(ConfigError, match="offset 0"):
            stream.seek("apply", 5)
    finally:
        stream.close()


def test_capture_writes_records_and_checkpoint(tmp_path: Path, aws_server: AwsServer) -> None:
    name = _create(aws_server, shards=1)
    settings = _settings(tmp_path, aws_server, name)
    events = [
        ChangeEvent(
            op=Op.UPDATE,
            table="optin_status",
            key={"userid": "user1"},
            position=position_of(n),
            after={"userid": "user1", "phone": "+12065550001", "optin": n % 2},
            schema="main",
        )
        for n in range(1, 4)
    ]
    stream = open_stream(settings)
    try:
        stream.append(events, Checkpoint("sqlite", '{"change_id": 3}'))
        assert stream.checkpoint("sqlite") == Checkpoint("sqlite", '{"change_id": 3}')
        records = stream.read("apply", 10, wait=2.0)
        assert [json.loads(r.data)["data"]["optin"] for r in records] == [1, 0, 1]
    finally:
        stream.close()


def test_a_missing_stream_is_fatal(tmp_path: Path, aws_server: AwsServer) -> None:
    with pytest.raises(Fatal, match=r"kinesis-gone.*not found"):
        open_stream(_settings(tmp_path, aws_server, "kinesis-gone"))


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ('url = "kinesis://s"\npartitions = 4', "partitions does not apply to a Kinesis"),
        ('url = "kinesis://s"\nreplicas = 3', "replicas does not apply to a Kinesis"),
        ('url = "kinesis://bad name"', "write kinesis://STREAM"),
        ('url = "kinesis://s"\nregion = "Virginia"', "write an AWS region"),
        ('url = "kinesis://s"\nendpoint_url = "localhost:4566"', r"write http\(s\)://"),
        ('url = "embedded"\nregion = "us-east-1"', "are for a Kinesis stream"),
        ('url = "kinesis://s"\nregion = 1', "region must be a str"),
    ],
)
def test_config_errors(tmp_path: Path, stream: str, message: str) -> None:
    config = tmp_path / "optsync.toml"
    config.write_text(f"[stream]\n{stream}\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


def test_environment_url_selects_kinesis(tmp_path: Path) -> None:
    config = tmp_path / "optsync.toml"
    config.write_text('[stream]\nregion = "eu-west-1"\n')
    stream = load_settings(config, env={"OPTSYNC_STREAM_URL": "kinesis://dms-out"}).stream
    assert (stream.scheme, stream.kinesis_name, stream.region) == (
        "kinesis",
        "dms-out",
        "eu-west-1",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KinesisState]:
    """The state store in each dialect (PostgreSQL: a fresh database of the session server)."""
    if request.param == "sqlite":
        store: KinesisState = SQLiteKinesisState(tmp_path / "kinesis.db")
        yield store
        store.close()
        return
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = f"kinesis_{uuid.uuid4().hex[:8]}"
    store = PostgresKinesisState(postgres.create_database(name))
    try:
        yield store
    finally:
        store.close()
        postgres.drop_database(name)


def test_state_store(state: KinesisState) -> None:
    first = state.reserve_offsets("s", 100)
    assert state.reserve_offsets("s", 100) == first + 100
    assert state.reserve_offsets("other", 100) == 100  # each stream has its own counter

    assert state.claim("s", "apply", "w1", now=1000.0, ttl=5)
    assert not state.claim("s", "apply", "w2", now=1004.0, ttl=5)  # w1's lease is live
    assert state.claim("s", "apply", "w1", now=1004.0, ttl=5)  # renewed to 1009
    assert not state.claim("s", "apply", "w2", now=1008.0, ttl=5)
    assert state.claim("s", "apply", "w2", now=1009.5, ttl=5)  # ran out: taken over
    state.release("s", "apply", "w1")  # not its lease any more: changes nothing
    assert not state.claim("s", "apply", "w1", now=1010.0, ttl=5)

    state.save_progress("s", "apply", {"a": ShardCheckpoint("7"), "b": ShardCheckpoint(None)}, 9)
    state.save_progress("s", "apply", {"a": ShardCheckpoint("8", finished=True)}, 4)
    assert state.shards("s", "apply") == {
        "a": ShardCheckpoint("8", finished=True),
        "b": ShardCheckpoint(None),
    }
    assert state.acked("s") == {"apply": 9}  # a lower acknowledgement is ignored
    state.forget("s", "apply")
    assert state.shards("s", "apply") == {}

    state.save_checkpoint("s", Checkpoint("mysql", "1"))
    state.save_checkpoint("s", Checkpoint("mysql", "2"))
    assert state.checkpoints("s") == [Checkpoint("mysql", "2")]
    assert state.checkpoints("other") == []


def test_put_batches_hold_one_record_per_key_and_at_most_500() -> None:
    records = [(f"k{n % 600}", b"x") for n in range(1200)] + [("k0", b"last")]
    batches = _batches(records)
    assert [r for batch in batches for r in batch] == records  # nothing reordered or lost
    assert all(len(batch) <= 500 for batch in batches)
    assert all(len({key for key, _ in batch}) == len(batch) for batch in batches)
    with pytest.raises(Fatal, match="1 MiB"):
        _batches([("k", b"x" * (1024 * 1024))])
