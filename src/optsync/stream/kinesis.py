"""``KinesisStream``: an Amazon Kinesis data stream as optsync's stream (``kinesis://NAME``).

The stream an AWS DMS task writes to can feed apply directly, in place of the Lambda of the
reference architecture; ``optsync capture`` can write to it too, as a DMS task would.

Decisions:

- **One partition.** ``partitions == 1``: one apply process at a time reads every shard. The
  lease on partition 0 is a row of the state store (``stream.kinesis_state``) with a wall-clock
  expiry, taken and renewed by ``claim``. Kinesis' own unit of order is the shard, and shards
  come and go with every reshard, so they are not exposed as partitions.
- **Shards merged, parents first.** A read takes records of every readable shard and hands them
  out in one sequence. A shard is readable once each of its parents (``ParentShardId``,
  ``AdjacentParentShardId``) was read to its end in this process (GetRecords returned no
  ``NextShardIterator``), is marked finished in the state, or is gone from ``ListShards``
  (expired). A key lives in one shard at a time and a child's records are handed out after
  every record of its parents, so the order of each key is kept across a reshard.
- **Synthetic offsets that grow across restarts.** Kinesis sequence numbers are ordered within a
  shard only (a child shard may start below its parent; moto even starts at 0), so offsets are
  made here: a counter in the state store, reserved ``OFFSET_BLOCK`` at a time (``UPDATE ...
  RETURNING``) before any offset of the block is handed out. A process that restarts, or that
  takes the lease over, reserves a new block above every earlier reservation, so its offsets are
  higher than any offset handed out before. This matters: apply gives a DMS record without
  ``stream-position`` the position ``position_of(offset)``, and the engine's position guard
  drops a write whose position is not newer, so a smaller offset after a restart would drop an
  opt-out. A worker that lost its lease without noticing could hand out smaller offsets than its
  successor; ``PartitionedApply`` renews (``claim``) before it reads once a renewal is due, so
  it notices before its next read.
- **Checkpoints in optsync's state.** ``ack(consumer, offset)``: every record handed out up to
  ``offset`` is done: each shard's checkpoint moves to its highest such sequence number, and a
  shard read to its end with nothing left unacknowledged is marked finished, in one state
  transaction. ``read(after=None)`` starts again from the stored checkpoints
  (``AFTER_SEQUENCE_NUMBER``; ``TRIM_HORIZON`` for a shard without one), handing out what was
  not acknowledged again under new, higher offsets. That is the first read of a consumer in
  this process, or the first after ``claim`` took the lease. Later reads continue in this
  process: ``after=N`` hands out again records above N not yet acknowledged, then new ones;
  ``after=None`` does the same from the acknowledged offset. Deviation from the lead's plan
  (where ``after=None`` always restarted from the state): ``optsync run``'s metrics read the
  live stream with ``after=None`` (``status.read_status``), which would otherwise throw away
  what apply has in flight at every scrape.
- ``seek(consumer, 0)`` forgets the consumer's checkpoints (replay from ``TRIM_HORIZON``); no
  other target exists. ``trim`` does nothing: Kinesis' retention period trims.
- **Writes** (``append``, ``append_raw``) use PutRecords in batches of at most 500 records and
  5 MiB holding at most one record per partition key; failed records are retried with backoff
  before the next batch is sent, so a key's records are accepted in order. ``append``'s
  checkpoint is stored in the state after every record was accepted.
- **Errors.** Throttling, ``ProvisionedThroughputExceeded``, ``LimitExceeded`` and connection
  errors are retried with ``Backoff`` (``MAX_ATTEMPTS`` tries, then ``Retryable`` for the
  caller's loop); an expired shard iterator is fetched again; a missing stream is ``Fatal``
  naming it; refused credentials or permissions are ``ConfigError`` naming the IAM action.
- **Stats** are what this process and the state know: ``head`` is the highest offset handed
  out here or acknowledged by any consumer, ``pending`` the records handed out here and not
  acknowledged. How many records wait in Kinesis unread is not known (Kinesis does not report
  it; CloudWatch's ``GetRecords.IteratorAgeMilliseconds`` does).

Not supported: KPL-aggregated records (DMS does not aggregate), enhanced fan-out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from optsync.errors import ConfigError, Fatal, Retryable
from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.retry import Backoff
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats
from optsync.stream.kinesis_state import KinesisState, ShardCheckpoint

__all__ = ("OFFSET_BLOCK", "KinesisStream")

logger = logging.getLogger(__name__)

OFFSET_BLOCK = 100_000
"""Offsets reserved from the state's counter at a time."""
POLL_SECONDS = 0.2
"""Seconds between GetRecords rounds while a read waits (Kinesis allows 5 calls/s per shard)."""
LIST_SECONDS = 10.0
"""Seconds between ListShards calls while no shard ends (a reshard is noticed within it)."""
IDLE_LIST_SECONDS = 1.0
"""Seconds between ListShards calls while reads find nothing (a closed shard is seen soon)."""
MAX_ATTEMPTS = 6
"""Tries of a throttled or unreachable call before ``Retryable`` is raised."""
PUT_RECORDS = 500
PUT_BYTES = 5 * 1024 * 1024
RECORD_BYTES = 1024 * 1024
EMPTY_PAGES = 5
"""GetRecords calls in a row on one shard while it returns nothing but is behind the tip."""

RETRY_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "InternalFailure",
        "ServiceUnavailable",
        "KMSThrottlingException",
    }
)
DENIED_CODES = frozenset({"AccessDeniedException", "UnrecognizedClientException"})


@dataclass
class _Shard:
    id: str
    parents: tuple[str, ...]
    seq: str | None
    """Sequence number of the last record handed out (or the checkpoint)."""
    ending: str | None = None
    """The closed shard's last sequence number (ListShards' EndingSequenceNumber)."""
    starting: str | None = None
    iterator: str | None = None
    ended: bool = False
    """Read to its end in this process (GetRecords returned no NextShardIterator)."""

    def empty_closed(self) -> bool:
        """A closed shard whose range holds no sequence number (moto: Ending <= Starting)."""
        return (
            self.ending is not None
            and self.starting is not None
            and int(self.ending) <= int(self.starting)
        )

    def at_end(self) -> bool:
        """Past the last record of a closed shard (a server that keeps returning iterators
        at the end of a closed shard, as moto does, still lets the children be read)."""
        return (
            self.ending is not None and self.seq is not None and int(self.seq) >= int(self.ending)
        )


@dataclass(frozen=True)
class _Handed:
    shard: str
    seq: str
    record: StreamRecord


@dataclass
class _Reader:
    """One consumer's reading in this process."""

    shards: dict[str, _Shard] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    handed: deque[_Handed] = field(default_factory=deque)
    """Records handed out and not acknowledged, in offset order."""
    last: int = 0
    """The last offset handed out."""
    listed_at: float = float("-inf")
    turn: int = 0
    """Which readable shard goes first in the next read (each goes first in turn)."""


class KinesisStream(ChangeStream):
    """A ``ChangeStream`` over the Kinesis data stream ``name``; state in ``state``."""

    def __init__(
        self,
        name: str,
        state: KinesisState,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.name = name
        self.state = state
        self._lock = threading.RLock()
        self._readers: dict[str, _Reader] = {}
        self._holders: dict[str, str] = {}
        """Consumer -> the worker of this process that holds its lease."""
        self._next = 1
        self._reserved = 0
        """Offsets ``_next`` .. ``_reserved`` are this process's to hand out."""
        self._head = 0
        try:
            self._client: Any = boto3.client(
                "kinesis",
                region_name=region,
                endpoint_url=endpoint_url,
                config=Config(
                    retries={"max_attempts": 2, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=20,
                ),
            )
            self._call("DescribeStreamSummary", StreamName=name)
        except NoRegionError:
            state.close()
            raise ConfigError(
                f"[stream] url = 'kinesis://{name}' needs a region: set [stream] region "
                "(or AWS_DEFAULT_REGION)"
            ) from None
        except BaseException:
            state.close()
            raise
        logger.debug("kinesis stream opened name=%s", name)

    # -- writing -------------------------------------------------------------------------

    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """PutRecords every event (DMS JSON), then store the checkpoint; returns ``head``."""
        data = encode_many(events)
        self._put([(e.partition_key, d) for e, d in zip(events, data, strict=True)])
        if checkpoint is not None:
            self.state.save_checkpoint(self.name, checkpoint)
        return self._head

    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> int:
        """PutRecords foreign records as they are; returns ``head``."""
        self._put([(key, bytes(data)) for key, data in records])
        return self._head

    def checkpoint(self, source: str) -> Checkpoint | None:
        return next((c for c in self.state.checkpoints(self.name) if c.source == source), None)

    def checkpoints(self) -> list[Checkpoint]:
        return self.state.checkpoints(self.name)

    def _put(self, records: list[tuple[str, bytes]]) -> None:
        for batch in _batches(records):
            backoff = Backoff(f"kinesis put stream={self.name}")
            waiting = batch
            while waiting:
                response = self._call(
                    "PutRecords",
                    StreamName=self.name,
                    Records=[{"PartitionKey": key, "Data": data} for key, data in waiting],
                )
                if not response.get("FailedRecordCount"):
                    break
                failed = [
                    item
                    for item, result in zip(waiting, response["Records"], strict=True)
                    if result.get("ErrorCode")
                ]
                codes = sorted({r["ErrorCode"] for r in response["Records"] if "ErrorCode" in r})
                if backoff.failures + 1 >= MAX_ATTEMPTS:
                    raise Retryable(
                        f"Kinesis stream {self.name!r} refused {len(failed)} records "
                        f"({', '.join(codes)}) {MAX_ATTEMPTS} times; they will be sent again"
                    )
                time.sleep(backoff.failed(Retryable(f"{len(failed)} records: {codes}")))
                waiting = failed
            backoff.succeeded()

    # -- reading -------------------------------------------------------------------------

    def read(
        self,
        consumer: str,
        limit: int,
        wait: float = 0.0,
        *,
        partition: int = 0,
        after: int | None = None,
    ) -> list[StreamRecord]:
        """Records of every readable shard (parents before children), oldest first per shard.

        The first read of a consumer in this process (and the first after ``claim`` took its
        lease, or after ``seek``) starts from the stored checkpoints; later ones continue
        here: ``after=None`` from the acknowledged offset (records handed out and not
        acknowledged come again, with their offsets), ``after=N`` after offset N.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        _check_partition(partition)
        deadline = time.monotonic() + wait
        with self._lock:
            reader = self._readers.get(consumer)
            if reader is None:
                reader = self._readers[consumer] = self._load(consumer)
            elif reader.handed:
                since = reader.handed[0].record.offset - 1 if after is None else after
                if since < reader.last:
                    return [h.record for h in reader.handed if h.record.offset > since][:limit]
        while True:
            with self._lock:
                found = self._fetch(consumer, reader, limit)
            remaining = deadline - time.monotonic()
            if found or remaining <= 0:
                return found
            time.sleep(min(POLL_SECONDS, remaining))

    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        """Move each shard's checkpoint to the last record handed out up to ``offset``; mark
        shards read to their end and fully acknowledged finished; one state transaction."""
        _check_partition(partition)
        with self._lock:
            reader = self._readers.get(consumer)
            progress: dict[str, ShardCheckpoint] = {}
            if reader is not None:
                while reader.handed and reader.handed[0].record.offset <= offset:
                    done = reader.handed.popleft()
                    progress[done.shard] = ShardCheckpoint(done.seq)
                open_ = {h.shard for h in reader.handed}
                for shard in reader.shards.values():
                    if shard.ended and shard.id not in open_ and shard.id not in reader.finished:
                        progress[shard.id] = ShardCheckpoint(shard.seq, finished=True)
            self.state.save_progress(self.name, consumer, progress, offset)
            if reader is not None:
                reader.finished.update(s for s, c in progress.items() if c.finished)

    def seek(self, consumer: str, offset: int) -> None:
        """``offset`` 0: forget the consumer's checkpoints, so it replays from TRIM_HORIZON."""
        if offset != 0:
            raise ConfigError(
                f"a Kinesis stream can only be replayed from its start (offset 0), not from "
                f"offset {offset}: its offsets are made by optsync as it reads"
            )
        with self._lock:
            self.state.forget(self.name, consumer)
            self._readers.pop(consumer, None)

    def claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        """Partition 0 while ``worker`` holds the consumer's lease (taken when free)."""
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        held = self.state.claim(self.name, consumer, worker, time.time(), ttl)
        with self._lock:
            if not held:
                self._holders.pop(consumer, None)
            elif self._holders.get(consumer) != worker:
                # Taken (again): another worker may have moved the checkpoints meanwhile.
                self._holders[consumer] = worker
                self._readers.pop(consumer, None)
        return frozenset({0}) if held else frozenset()

    def release(self, consumer: str, worker: str) -> None:
        self.state.release(self.name, consumer, worker)

    def trim(self, keep_after: int) -> int:
        """Nothing: Kinesis drops records after the stream's retention period."""
        return 0

    def stats(self) -> StreamStats:
        """What this process and the state know (records not yet read are not counted)."""
        with self._lock:
            consumers = self.state.acked(self.name)
            head = max([self._head, *consumers.values()])
            pending = {name: len(r.handed) for name, r in self._readers.items()}
            unacked = [r.handed[0].record.offset for r in self._readers.values() if r.handed]
        return StreamStats(
            head=head,
            oldest=min(unacked, default=head + 1),
            consumers=consumers,
            pending=pending,
        )

    def close(self) -> None:
        with self._lock:
            self._readers.clear()
            self.state.close()
            self._client.close()

    # -- inside a read -------------------------------------------------------------------

    def _load(self, consumer: str) -> _Reader:
        saved = self.state.shards(self.name, consumer)
        reader = _Reader(finished={s for s, c in saved.items() if c.finished})
        reader.shards = {
            shard: _Shard(shard, (), c.seq) for shard, c in saved.items() if not c.finished
        }
        self._list(reader, saved)
        return reader

    def _list(self, reader: _Reader, saved: dict[str, ShardCheckpoint] | None = None) -> None:
        """Learn the stream's shards (new children after a reshard) from ListShards."""
        listed: dict[str, tuple[tuple[str, ...], str | None, str | None]] = {}
        token: str | None = None
        while True:
            args: dict[str, Any] = {"NextToken": token} if token else {"StreamName": self.name}
            response = self._call("ListShards", **args)
            for shard in response.get("Shards", []):
                pair = (shard.get("ParentShardId"), shard.get("AdjacentParentShardId"))
                numbers = shard.get("SequenceNumberRange", {})
                listed[shard["ShardId"]] = (
                    tuple(str(p) for p in pair if p),
                    numbers.get("StartingSequenceNumber"),
                    numbers.get("EndingSequenceNumber"),
                )
            token = response.get("NextToken")
            if not token:
                break
        for shard_id, (parents, starting, ending) in listed.items():
            known = reader.shards.get(shard_id)
            if known is None and shard_id not in reader.finished:
                seq = saved[shard_id].seq if saved and shard_id in saved else None
                known = reader.shards[shard_id] = _Shard(shard_id, parents, seq)
            if known is not None:
                known.parents, known.starting, known.ending = parents, starting, ending
        for shard_id in list(reader.shards):
            if shard_id not in listed:  # expired past the retention period
                reader.finished.add(shard_id)
                del reader.shards[shard_id]
        reader.listed_at = time.monotonic()

    def _readable(self, reader: _Reader) -> list[_Shard]:
        def done(parent: str) -> bool:
            shard = reader.shards.get(parent)
            return parent in reader.finished or shard is None or shard.ended

        return [
            shard
            for _, shard in sorted(reader.shards.items())
            if not shard.ended and all(done(p) for p in shard.parents)
        ]

    def _fetch(self, consumer: str, reader: _Reader, limit: int) -> list[StreamRecord]:
        found: list[StreamRecord] = []
        for _ in range(3):  # a shard that ends may make its children readable: look again
            since = time.monotonic() - reader.listed_at
            if since >= LIST_SECONDS or (not found and since >= IDLE_LIST_SECONDS):
                self._list(reader)
            ended = False
            readable = self._readable(reader)
            if readable:  # no shard always first: a busy one must not starve the others
                start = reader.turn % len(readable)
                readable = readable[start:] + readable[:start]
                reader.turn += 1
            for shard in readable:
                if len(found) >= limit:
                    break
                found.extend(self._shard_records(reader, shard, limit - len(found)))
                if shard.ended:
                    ended = True
                    reader.listed_at = float("-inf")  # its children may be new: list again
                    if not any(h.shard == shard.id for h in reader.handed):
                        self.state.save_progress(
                            self.name, consumer, {shard.id: ShardCheckpoint(shard.seq, True)}, 0
                        )
                        reader.finished.add(shard.id)
            if not ended or len(found) >= limit:
                break
        return found

    def _shard_records(self, reader: _Reader, shard: _Shard, limit: int) -> list[StreamRecord]:
        response: dict[str, Any] = {}
        if shard.at_end():
            shard.ended = True
            return []
        for _ in range(EMPTY_PAGES):
            if shard.iterator is None:
                shard.iterator = self._iterator(shard)
            try:
                response = self._call(
                    "GetRecords", ShardIterator=shard.iterator, Limit=min(limit, 10_000)
                )
            except _ExpiredIterator:
                shard.iterator = None
                continue
            shard.iterator = response.get("NextShardIterator")
            if (
                response.get("Records")
                or not shard.iterator
                or not response.get("MillisBehindLatest")
            ):
                break
        out: list[StreamRecord] = []
        for item in response.get("Records", []):
            offset = self._offset()
            arrived = item.get("ApproximateArrivalTimestamp")
            record = StreamRecord(
                offset,
                item["PartitionKey"],
                bytes(item["Data"]),
                arrived.timestamp() if arrived is not None else time.time(),
            )
            shard.seq = item["SequenceNumber"]
            reader.handed.append(_Handed(shard.id, item["SequenceNumber"], record))
            reader.last = offset
            out.append(record)
        # Real Kinesis ends a closed shard with no NextShardIterator; a server that keeps
        # returning iterators (moto) ends where ListShards' EndingSequenceNumber says.
        empty = shard.seq is None and not out and shard.empty_closed()
        if shard.iterator is None or shard.at_end() or empty:
            shard.ended = True
        return out

    def _iterator(self, shard: _Shard) -> str:
        if shard.seq is None:
            args = {"ShardIteratorType": "TRIM_HORIZON"}
        else:
            args = {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": shard.seq,
            }
        response = self._call("GetShardIterator", StreamName=self.name, ShardId=shard.id, **args)
        return str(response["ShardIterator"])

    def _offset(self) -> int:
        """The next offset; reserves a new block in the state first when this one is used up."""
        if self._next > self._reserved:
            top = self.state.reserve_offsets(self.name, OFFSET_BLOCK)
            self._next, self._reserved = top - OFFSET_BLOCK + 1, top
        offset = self._next
        self._next += 1
        self._head = max(self._head, offset)
        return offset

    # -- calls -----------------------------------------------------------------------------

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One Kinesis call; throttling and connection errors retried with backoff."""
        method: Callable[..., dict[str, Any]] = getattr(self._client, _snake(operation))
        backoff = Backoff(f"kinesis {operation} stream={self.name}")
        while True:
            try:
                response = method(**kwargs)
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code == "ExpiredIteratorException":
                    raise _ExpiredIterator from exc
                if code == "ResourceNotFoundException":
                    raise Fatal(
                        f"Kinesis stream {self.name!r} was not found ({operation}): it was "
                        "deleted, or [stream] url, region or endpoint_url names another one"
                    ) from exc
                if code in DENIED_CODES:
                    raise ConfigError(
                        f"Kinesis refused kinesis:{operation} on stream {self.name!r} ({code}): "
                        "check the credentials and allow that action in their IAM policy"
                    ) from exc
                if code not in RETRY_CODES:
                    raise Fatal(
                        f"Kinesis {operation} on stream {self.name!r} failed: {code}"
                    ) from exc
                error: BaseException = exc
            except NoCredentialsError as exc:
                raise ConfigError(
                    "no AWS credentials for the Kinesis stream: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
                ) from exc
            except NoRegionError:
                raise
            except BotoCoreError as exc:
                error = exc
            else:
                backoff.succeeded()
                return response
            if backoff.failures + 1 >= MAX_ATTEMPTS:
                raise Retryable(
                    f"Kinesis {operation} on stream {self.name!r} failed {MAX_ATTEMPTS} times "
                    f"({type(error).__name__}); it will be retried"
                ) from error
            time.sleep(backoff.failed(error))


class _ExpiredIterator(Exception):
    """GetRecords was given an iterator older than five minutes: get a new one."""


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


def _check_partition(partition: int) -> None:
    if partition != 0:
        raise ValueError(f"a Kinesis stream has one partition (0), not {partition}")


def _batches(records: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    """PutRecords batches: <= 500 records, <= 5 MiB, one record per key (so a retried record
    is never overtaken by a later record of its key that was accepted in the same call)."""
    batches: list[list[tuple[str, bytes]]] = []
    batch: list[tuple[str, bytes]] = []
    keys: set[str] = set()
    size = 0
    for key, data in records:
        length = len(key.encode()) + len(data)
        if length > RECORD_BYTES:
            raise Fatal(
                f"a record of {length} bytes is over Kinesis' 1 MiB limit (partition key and "
                "data): it cannot be written to a Kinesis stream"
            )
        if key in keys or len(batch) >= PUT_RECORDS or size + length > PUT_BYTES:
            batches.append(batch)
            batch, keys, size = [], set(), 0
        batch.append((key, data))
        keys.add(key)
        size += length
    if batch:
        batches.append(batch)
    return batches
