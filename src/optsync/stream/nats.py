"""``NatsStream``: the stream on NATS JetStream, for ``optsync capture`` + N x ``optsync apply``.

Layout (everything is created idempotently; anything that exists with settings optsync cannot
use is a ``ConfigError``, never reused silently):

- JetStream stream ``<name>``, file storage, subjects ``<name>.p.<partition>``, limits retention
  with no limit and ``discard: new`` (a limit added later by hand refuses new records instead of
  dropping unacknowledged ones), ``allow_direct``, the partition count in its metadata
  (``optsync.partitions``), and ``republish`` of every stored message's headers to
  ``<name>.n.<partition>`` (the readers' wake-up call).
- Key-value bucket ``<name>-state`` (file storage, history 1): the source checkpoints
  (``s.<source>``), every consumer's acknowledged offset per partition (``c.<consumer>.o.<p>``),
  the partition leases (``c.<consumer>.l.<p>`` = worker) and worker heartbeats
  (``c.<consumer>.w.<worker>``).

Records and offsets. ``append`` groups the events of each partition, in source order, into
messages of at most 1,024 events (and under the server's ``max_payload``); one message is one
JetStream message on the partition's subject, so every change of one row lands in one subject in
source order. A message's payload is msgpack ``[1, appended_at, [[partition_key, dms_json], ...]]``;
a message in any other shape (a foreign publisher) is one raw record. Record ``i`` of the message
with stream sequence ``s`` has offset ``s * 1024 + i``: unique, growing within a partition, and
with gaps (offsets are not counts). Messages of one partition are published one after the other
(the next only after the previous one's PubAck, so a failed message is never overtaken by the
next one); partitions are published concurrently.

Reading is stateless on the server: a batched *direct get* (``next_by_subj`` = the partition's
subject, from the sequence of the offset to read after, up to 4 MB) answers each ``read``; records
fetched ahead wait in a buffer of this object per (consumer, partition). No JetStream
consumer exists, so nothing is to be created, recreated after a server restart, or cleaned up,
and ``after=``, ``seek`` and a takeover that reads again from an acknowledged offset in the middle
of a message are all the same operation. A waiting ``read`` sleeps until the stream's republish
of a stored message to ``<name>.n.<partition>`` arrives (so it wakes only once the record is
stored), and looks again every second anyway (a republish missed during a reconnect).

Acknowledged offsets are Kafka-style, in the key-value bucket: exact to the record (a partition
taken over in the middle of a message is read again from the acknowledged offset, in order),
written with compare-and-set so a late, lower ``ack`` never moves one back. Durable JetStream
consumers were the alternative (ack floor = offset, priority groups to pin a worker): but their
ack floor counts messages, not the records inside one, reading ahead with ``after`` and reading
again (``seek``) fight their redelivery state, and pinning needs a consumer per partition per
reader group, reconfigured as workers come and go.

Leases (``claim``/``release``) are entries of the same bucket, written only with compare-and-set
(``Nats-Expected-Last-Subject-Sequence``), so two workers never both win a partition. Liveness
is a heartbeat entry each worker rewrites on every ``claim``; it is live while the server's
timestamp of that write is younger than the ttl the worker gave, measured against the newest
timestamp in the bucket, so only the server's clock is used. A lease belongs to its holder while
the holder is live; the sharing rule is ``optsync.stream.leases.share``. A worker that joins
claims and takes what its share allows as the others give partitions up on their own next claim:
nobody is reconfigured or told. A worker that is SIGKILLed stops writing its heartbeat; one ttl
later the others count it dead, their shares grow and they take its partitions by
compare-and-set, reading from its last acknowledged offsets (its unacknowledged records are
delivered again): the takeover takes at most ttl + one claim interval (12 s with claims every
2 s and a ttl of 10 s: well under 30 s).

Durability, what is atomic and what is at least once:

- Each JetStream message (a group of events of one partition) is atomic: stored whole or not.
  A PubAck means the server has stored it (file storage; with ``replicas`` > 1 a quorum has it).
  JetStream writes its files without an fsync per message (``sync_interval``, 2 minutes by
  default): a process crash of nats-server loses nothing, a power cut of a one-replica server
  may; run 3 replicas, or ``jetstream { sync_interval: always }``, where that matters.
- ``append`` returns only after every message's PubAck, and only then writes the source
  checkpoint (and waits for its PubAck too). Events and checkpoint are therefore *not* atomic
  together, but ordered: a checkpoint is never ahead of its events. A crash between the two
  leaves events stored and the checkpoint behind, so capture sends them again from the older
  checkpoint: at least once.
- A re-sent batch is deduplicated: each message carries ``Nats-Msg-Id`` = a hash of its events'
  ids, the same for the same events in the same batch, and JetStream drops a message whose id it
  saw within ``duplicate_window`` (2 minutes by default). Beyond that window, or when capture
  cuts its batches differently after a restart, events are stored twice; the engine's position
  guard (an older or equal source position never overwrites a newer one) makes the second copy
  harmless. Idempotency is therefore by batch, not by single event as in the embedded stream.
- ``ack`` returns once the offset is stored (a PubAck of the bucket). Losing an acknowledgement
  only delivers records again; the position guard makes that harmless too.

So nothing is lost: the source moves only after ``append`` returned (events stored), apply
acknowledges only what it made durable in the engine, and every gap in between is closed by
sending or delivering again.

``stats().pending`` is exact for the first message after a consumer's offset in each partition
and counts every further message as one (not its events): zero exactly when the consumer is
done. ``trim`` purges, per partition, the messages every consumer has acknowledged completely,
and returns how many *messages* it dropped.

Requires nats-server 2.11 or newer (batched direct gets). nats-py is asyncio: this object runs a
private event loop in a daemon thread and every method submits to it and waits, with bounded
timeouts, so it is thread-safe and a lost server never hangs a caller: a lost connection, a
missing responder or a timeout is ``Retryable`` (nats-py reconnects in the background every
0.5 s), an unreachable server at open is ``Retryable`` naming the URL, refused credentials are a
``ConfigError``.
"""

from __future__ import annotations

import asyncio
import calendar
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from optsync.errors import ConfigError, Fatal, OptsyncError, Retryable
from optsync.events import ChangeEvent
from optsync.formats.dms import encode_many
from optsync.redaction import mask
from optsync.stream.base import ChangeStream, Checkpoint, StreamRecord, StreamStats, partition_of
from optsync.stream.leases import share

__all__ = ("NatsStream",)

logger = logging.getLogger(__name__)

T = TypeVar("T")

OFFSETS_PER_MESSAGE = 1024
"""Events per message at most; record ``i`` of message ``s`` has offset ``s * 1024 + i``."""
FORMAT = 1
"""First element of every message payload this module writes."""
READ_BYTES = 4 * 1024 * 1024
"""Bytes one direct get returns at most (at least one message)."""
READ_MESSAGES = 1024
"""Messages one direct get returns at most."""
POLL = 1.0
WATCH_GRACE = 0.5
"""Seconds a key-value watch waits for entries after nats-py's "no more" marker (``_watch``)."""
"""Seconds a waiting read sleeps at most between looks, should a wake-up call go missing."""
HEADER_ROOM = 1024
"""Bytes of ``max_payload`` kept for a message's headers."""
DEAD_WORKER_KEPT = 600.0
"""Seconds a dead worker's heartbeat stays in the bucket before a claim deletes it."""

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_ENVELOPE = msgspec.msgpack.Encoder()
_UNPACK = msgspec.msgpack.Decoder(tuple[int, float, list[tuple[str, bytes]]])

_STATUS = "Status"
_SEQUENCE = "Nats-Sequence"
_SUBJECT = "Nats-Subject"
_TIMESTAMP = "Nats-Time-Stamp"
_NUM_PENDING = "Nats-Num-Pending"
_MSG_ID = "Nats-Msg-Id"
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_KV_OPERATION = "KV-Operation"
_WRONG_LAST_SEQUENCE = (10071, 10164)
TOO_MANY_RESULTS = 413
"""Status of a direct get that matches more than 1,024 subjects."""
_STREAM_NAME_IN_USE = 10058


@dataclass(frozen=True)
class _Entry:
    """The latest message of one key of the bucket."""

    value: bytes | None
    """None: deleted or purged."""
    revision: int
    """Its stream sequence: the expected last sequence of a compare-and-set write."""
    time: float
    """Unix time the server stored it (the server's clock)."""


@dataclass
class _Reply:
    """Replies to one direct get, gathered by the inbox callback."""

    single: bool
    done: asyncio.Future[None]
    messages: list[Msg] = field(default_factory=list)


@dataclass
class _Buffer:
    """Records of one partition fetched but not yet read past: ``records`` plus every message
    from ``next_seq`` on hold every record with offset above ``low``."""

    low: int = 0
    next_seq: int = 1
    records: list[StreamRecord] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def reset(self, after: int) -> None:
        self.low = after
        self.next_seq = _first_seq(after)
        self.records = []

    def skip_through(self, after: int) -> None:
        self.low = max(self.low, after)
        drop = 0
        while drop < len(self.records) and self.records[drop].offset <= after:
            drop += 1
        if drop:
            del self.records[:drop]


@dataclass(frozen=True)
class _Message:
    """One message to publish: events (or raw records) of one partition."""

    partition: int
    payload: bytes
    count: int
    msg_id: str | None


class NatsStream(ChangeStream):
    """A ``ChangeStream`` on a JetStream stream and key-value bucket (see the module docstring).

    ``url``: ``nats://[user:password@]HOST:PORT``. ``name``: the stream's name, also the prefix
    of its subjects and of its bucket. ``partitions``: fixed when the stream is created; opening
    it with another count is a ``ConfigError``. ``timeout``: seconds each request to the server
    may take before the call is ``Retryable``.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "optsync",
        partitions: int = 8,
        replicas: int = 1,
        timeout: float = 5.0,
        duplicate_window: float = 120.0,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"stream name {name!r} is not a valid JetStream name: use letters, digits,"
                " '-' and '_'"
            )
        if partitions < 1:
            raise ConfigError(f"a stream needs at least 1 partition, got {partitions}")
        self.name = name
        self._url = url
        self._shown_url = mask(url)
        self._partitions = partitions
        self._replicas = replicas
        self._timeout = timeout
        self._duplicate_window = duplicate_window
        self._bucket = f"{name}-state"
        self._closed = False
        self._closing = threading.Lock()
        # Touched only on the loop's thread:
        self._nc = Client()
        self._js: JetStreamContext | None = None
        self._inbox = ""
        self._replies: dict[str, _Reply] = {}
        self._next_token = 0
        self._buffers: dict[tuple[str, int], _Buffer] = {}
        """(consumer, partition) -> records fetched ahead: readers of one partition at different
        places (apply, a status page) do not make each other fetch again."""
        self._arrived: list[asyncio.Event] = []
        self._listening = False
        self._registered: set[str] = set()
        self._acked: dict[str, _Entry] = {}
        """Bucket key -> the offset entry this object last wrote or read (for compare-and-set)."""
        self._known_head = 0
        self._max_payload = 1024 * 1024
        self._loop = _Loop(f"optsync-nats-{name}")
        try:
            self._run(self._open(), self._timeout * 4 + 1)
        except BaseException:
            self._closed = True
            with contextlib.suppress(Exception):
                self._loop.run(self._shutdown(), self._timeout + 1)
            self._loop.stop()
            raise
        logger.debug(
            "stream opened url=%s name=%s partitions=%d", self._shown_url, name, partitions
        )

    @property
    def partitions(self) -> int:
        """The partition count, stored in the stream's metadata."""
        return self._partitions

    # -- the interface --------------------------------------------------------------------------

    def append(self, events: Sequence[ChangeEvent], checkpoint: Checkpoint | None = None) -> int:
        """Publish the events (waiting for every PubAck), then store the checkpoint."""
        seen: set[str] = set()
        items: list[tuple[str, bytes, str | None]] = []
        for event, data in zip(events, encode_many(events), strict=True):
            if event.event_id not in seen:  # an event twice in one batch: the first copy wins
                seen.add(event.event_id)
                items.append((event.partition_key, data, event.event_id))
        messages = self._messages(items)
        return self._run(self._append(messages, checkpoint), self._budget(messages))

    def append_raw(self, records: Sequence[tuple[str, bytes]]) -> int:
        """Publish foreign records as they are (no message id: nothing to deduplicate on)."""
        messages = self._messages([(key, bytes(data), None) for key, data in records])
        return self._run(self._append(messages, None), self._budget(messages))

    def checkpoint(self, source: str) -> Checkpoint | None:
        """The last checkpoint stored for ``source``."""
        entry = self._run(self._get(f"s.{_token(source)}"), self._timeout + 1)
        if entry is None or entry.value is None:
            return None
        return Checkpoint(source, entry.value.decode())

    def checkpoints(self) -> list[Checkpoint]:
        """Every source's last checkpoint, by source name."""
        entries = self._run(self._scan("s.*"), self._timeout * 4 + 1)
        found = [
            Checkpoint(_untoken(key[2:]), entry.value.decode())
            for key, entry in entries.items()
            if entry.value is not None
        ]
        return sorted(found, key=lambda c: c.source)

    def read(
        self,
        consumer: str,
        limit: int,
        wait: float = 0.0,
        *,
        partition: int = 0,
        after: int | None = None,
    ) -> list[StreamRecord]:
        """Records of ``partition`` after the consumer's acknowledged offset (or ``after``);
        waits up to ``wait`` for one."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self._check_partition(partition)
        return self._run(
            self._read(consumer, limit, wait, partition, after), wait + self._timeout * 4 + 1
        )

    def read_any(
        self,
        consumer: str,
        limit: int,
        wait: float,
        after: Mapping[int, int | None],
    ) -> dict[int, list[StreamRecord]]:
        """Records of several partitions: one concurrent fetch of each, then a wait on all of
        their wake-up calls at once, refetching only the partitions that woke."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        for partition in after:
            self._check_partition(partition)
        return self._run(
            self._read_any(consumer, limit, wait, dict(after)), wait + self._timeout * 4 + 1
        )

    def ack(self, consumer: str, offset: int, *, partition: int = 0) -> None:
        """Store ``offset`` as the consumer's in ``partition`` unless a higher one is stored."""
        self._check_partition(partition)
        self._run(self._ack(consumer, offset, partition), self._timeout * 4 + 1)

    def seek(self, consumer: str, offset: int) -> None:
        """Set the consumer's offset in every partition, backwards too."""
        self._run(self._seek(consumer, offset), self._timeout * 3 + 1)

    def claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        """Write ``worker``'s heartbeat and settle its share of partitions by compare-and-set."""
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        return self._run(self._claim(consumer, worker, ttl), self._timeout * 4 + 1)

    def release(self, consumer: str, worker: str) -> None:
        """Delete ``worker``'s leases and heartbeat: the others take its partitions at once."""
        self._run(self._release(consumer, worker), self._timeout * 3 + 1)

    def trim(self, keep_after: int) -> int:
        """Purge the messages up to ``keep_after`` that every consumer has acknowledged
        completely; returns how many *messages* were dropped."""
        return self._run(self._trim(keep_after), self._timeout * (self._partitions + 3) + 1)

    def stats(self) -> StreamStats:
        """Head, oldest offset, each consumer's offset and backlog (see the module docstring
        for what ``pending`` counts)."""
        return self._run(self._stats(), self._timeout * 4 + 1)

    def close(self) -> None:
        """Wake waiting readers (which then raise), close the connection, stop the loop."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        try:
            self._loop.run(self._shutdown(), self._timeout + 2)
        except Exception:  # closing must not fail: the server may be gone
            logger.debug("stream close was not clean url=%s", self._shown_url, exc_info=True)
        self._loop.stop()
        logger.debug("stream closed url=%s name=%s", self._shown_url, self.name)

    # -- plumbing between the caller's thread and the loop --------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T], budget: float) -> T:
        if self._closed:
            coro.close()
            raise RuntimeError(f"the stream {self.name} on {self._shown_url} is closed")
        return self._loop.run(self._translated(coro), budget)

    async def _translated(self, coro: Awaitable[T]) -> T:
        """NATS errors as optsync's, saying whether a retry can help."""
        try:
            return await coro
        except (OptsyncError, ValueError, RuntimeError):
            raise
        except nats.js.errors.APIError as exc:
            if exc.code is not None and exc.code >= 500:
                raise Retryable(
                    f"NATS server {self._shown_url} could not serve the stream {self.name}"
                    f" ({exc.description}); retry"
                ) from exc
            raise Fatal(
                f"NATS server {self._shown_url} refused a request on the stream {self.name}:"
                f" {exc.description} (code {exc.code}, error {exc.err_code})"
            ) from exc
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            raise Retryable(
                f"NATS server {self._shown_url} did not answer ({type(exc).__name__}: {exc});"
                " it may be restarting, retry"
            ) from exc

    def _budget(self, messages: Sequence[_Message]) -> float:
        chains: dict[int, int] = {}
        for message in messages:
            chains[message.partition] = chains.get(message.partition, 0) + 1
        return self._timeout * (max(chains.values(), default=0) + 4) + 1

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._partitions:
            raise ValueError(
                f"partition {partition} is outside the stream (0..{self._partitions - 1})"
            )

    def _messages(self, items: Sequence[tuple[str, bytes, str | None]]) -> list[_Message]:
        """Group records by partition, in order, into messages of at most 1,024 records that
        fit the server's ``max_payload`` (done on the caller's thread: the loop stays free)."""
        limit = self._max_payload - HEADER_ROOM
        groups: dict[int, list[tuple[str, bytes, str | None]]] = {}
        for item in items:
            groups.setdefault(partition_of(item[0], self._partitions), []).append(item)
        now = time.time()
        messages: list[_Message] = []

        def flush(partition: int, chunk: list[tuple[str, bytes, str | None]]) -> None:
            ids = [i for _, _, i in chunk if i is not None]
            msg_id = (
                hashlib.blake2b("\n".join(ids).encode(), digest_size=16).hexdigest()
                if len(ids) == len(chunk)
                else None
            )
            payload = _ENVELOPE.encode((FORMAT, now, [(key, data) for key, data, _ in chunk]))
            messages.append(_Message(partition, payload, len(chunk), msg_id))

        for partition, group in groups.items():
            chunk: list[tuple[str, bytes, str | None]] = []
            size = 16
            for item in group:
                cost = len(item[0]) + len(item[1]) + 16
                if cost + 16 > limit:
                    raise Fatal(
                        f"a record of {len(item[1])} bytes does not fit in a message of NATS"
                        f" server {self._shown_url} (max_payload {self._max_payload}); raise"
                        " max_payload in the server's configuration"
                    )
                if chunk and (len(chunk) == OFFSETS_PER_MESSAGE or size + cost > limit):
                    flush(partition, chunk)
                    chunk, size = [], 16
                chunk.append(item)
                size += cost
            if chunk:
                flush(partition, chunk)
        return messages

    # -- on the loop ----------------------------------------------------------------------------

    async def _open(self) -> None:
        await self._connect()
        self._js = self._nc.jetstream(timeout=self._timeout)
        self._max_payload = self._nc.max_payload
        self._arrived = [asyncio.Event() for _ in range(self._partitions)]
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)
        try:
            await self._ensure_stream()
            await self._ensure_bucket()
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError) as exc:
            raise Retryable(
                f"JetStream does not answer on NATS server {self._shown_url}: start nats-server"
                " with JetStream enabled (-js), or wait until it has recovered its streams"
            ) from exc

    async def _connect(self) -> None:
        problems: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            problems.append(exc)
            # Refused connections repeat every 0.5 s while the server is down: not a warning.
            quiet = isinstance(exc, OSError | nats.errors.StaleConnectionError) or self._closed
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "nats error url=%s error=%s",
                self._shown_url,
                mask(str(exc)),
            )

        async def on_disconnect() -> None:
            if not self._closed:
                logger.warning("nats disconnected url=%s; reconnecting", self._shown_url)

        async def on_reconnect() -> None:
            logger.info("nats reconnected url=%s", self._shown_url)

        try:
            await self._nc.connect(
                self._url,
                name=f"optsync {self.name}",
                connect_timeout=max(1, round(self._timeout)),
                # The first connection fails fast (two attempts); see below for later ones.
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                ping_interval=5,
                max_outstanding_pings=3,
            )
        except Exception as exc:
            refused = [
                e
                for e in (exc, *problems)
                if isinstance(e, nats.errors.AuthorizationError)
                or "authorization" in str(e).lower()
            ]
            if refused:
                raise ConfigError(
                    f"NATS server {self._shown_url} refused the credentials"
                    f" ({mask(str(refused[0]))}):"
                    " check the user, password or token in [stream] url"
                ) from exc
            raise Retryable(
                f"NATS server {self._shown_url} is unreachable"
                f" ({type(exc).__name__}: {mask(str(exc))}):"
                " start it or correct [stream] url, then retry"
            ) from exc
        # Connected: from now on a lost connection is retried forever, every 0.5 s, in the
        # background (nats-py reads these options when the connection drops).
        self._nc.options["allow_reconnect"] = True
        self._nc.options["max_reconnect_attempts"] = -1
        self._nc.options["reconnect_time_wait"] = 0.5

    async def _ensure_stream(self) -> None:
        js = self._jetstream()
        wanted = api.StreamConfig(
            name=self.name,
            description="optsync change stream",
            subjects=[f"{self.name}.p.*"],
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.NEW,
            storage=api.StorageType.FILE,
            num_replicas=self._replicas,
            duplicate_window=self._duplicate_window,
            allow_direct=True,
            republish=api.RePublish(
                src=f"{self.name}.p.*", dest=f"{self.name}.n.{{{{wildcard(1)}}}}", headers_only=True
            ),
            metadata={"optsync.partitions": str(self._partitions), "optsync.format": str(FORMAT)},
        )
        try:
            info = await js.stream_info(self.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(wanted)
                logger.info(
                    "stream created name=%s partitions=%d url=%s",
                    self.name,
                    self._partitions,
                    self._shown_url,
                )
                return
            except nats.js.errors.APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                info = await js.stream_info(self.name)  # another process created it meanwhile
        problems = self._stream_problems(info.config)
        if problems:
            raise ConfigError(
                f"JetStream stream {self.name!r} on {self._shown_url} exists with settings"
                f" optsync cannot use: {'; '.join(problems)}. Use another [stream] name, or"
                f" delete the stream (nats stream rm {self.name}) so that optsync creates it"
                " (capture then starts again from a snapshot)"
            )

    def _stream_problems(self, config: api.StreamConfig) -> list[str]:
        problems = []
        metadata = config.metadata or {}
        stored = metadata.get("optsync.partitions")
        if stored is None:
            problems.append("it was not created by optsync (no optsync.partitions metadata)")
        elif stored != str(self._partitions):
            problems.append(
                f"it has {stored} partitions, not {self._partitions} (set [stream] partitions"
                f" = {stored})"
            )
        if metadata.get("optsync.format", str(FORMAT)) != str(FORMAT):
            problems.append(f"its record format is {metadata['optsync.format']}, not {FORMAT}")
        if list(config.subjects or []) != [f"{self.name}.p.*"]:
            problems.append(f"its subjects are {config.subjects}, not ['{self.name}.p.*']")
        if config.storage != api.StorageType.FILE:
            problems.append(f"its storage is {config.storage}, not file")
        if config.retention not in (None, api.RetentionPolicy.LIMITS):
            problems.append(f"its retention is {config.retention}, not limits")
        if not config.allow_direct:
            problems.append("direct gets are not allowed (allow_direct)")
        if config.sealed:
            problems.append("it is sealed")
        if (
            config.republish is None
            or config.republish.dest != f"{self.name}.n.{{{{wildcard(1)}}}}"
        ):
            problems.append("it does not republish to the wake-up subjects")
        return problems

    async def _ensure_bucket(self) -> None:
        js = self._jetstream()
        stream = f"KV_{self._bucket}"
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            try:
                await js.create_key_value(
                    api.KeyValueConfig(
                        bucket=self._bucket,
                        description="optsync checkpoints, offsets and leases",
                        history=1,
                        storage=api.StorageType.FILE,
                        replicas=self._replicas,
                        direct=True,
                    )
                )
                return
            except nats.js.errors.APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                info = await js.stream_info(stream)
        config = info.config
        if (
            config.storage != api.StorageType.FILE
            or not config.allow_direct
            or (config.max_msgs_per_subject or 0) < 1
        ):
            raise ConfigError(
                f"key-value bucket {self._bucket!r} on {self._shown_url} exists with settings"
                " optsync cannot use (it needs file storage and direct gets): delete it"
                f" (nats kv del {self._bucket}) so that optsync creates it (consumers then read"
                " from the start, capture starts again from a snapshot)"
            )

    async def _shutdown(self) -> None:
        for event in self._arrived:
            event.set()
        for reply in self._replies.values():
            if not reply.done.done():
                reply.done.set_exception(RuntimeError(f"the stream {self.name} is closed"))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._nc.close(), self._timeout)

    def _jetstream(self) -> JetStreamContext:
        if self._js is None:  # pragma: no cover - _open sets it before any call
            raise RuntimeError("the stream is not open")
        return self._js

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the stream {self.name} on {self._shown_url} is closed")

    # appending

    async def _append(self, messages: Sequence[_Message], checkpoint: Checkpoint | None) -> int:
        chains: dict[int, list[_Message]] = {}
        for message in messages:
            chains.setdefault(message.partition, []).append(message)
        results = await asyncio.gather(
            *(self._publish_chain(chain) for chain in chains.values()), return_exceptions=True
        )
        heads: list[int] = []
        duplicate = False
        for result in results:
            if isinstance(result, BaseException):
                raise result
            for acked_head, was_duplicate in result:
                heads.append(acked_head)
                duplicate = duplicate or was_duplicate
        if checkpoint is not None:  # only now: a checkpoint never runs ahead of its events
            await self._put(f"s.{_token(checkpoint.source)}", checkpoint.state.encode())
        head = max(heads) if heads and not duplicate else await self._head()
        self._known_head = max(self._known_head, head)
        return head

    async def _publish_chain(self, chain: Sequence[_Message]) -> list[tuple[int, bool]]:
        """The messages of one partition, each after the previous one's PubAck."""
        js = self._jetstream()
        heads = []
        for message in chain:
            headers = None if message.msg_id is None else {_MSG_ID: message.msg_id}
            ack = await js.publish(
                f"{self.name}.p.{message.partition}", message.payload, headers=headers
            )
            heads.append((ack.seq * OFFSETS_PER_MESSAGE + message.count - 1, bool(ack.duplicate)))
        return heads

    async def _head(self, info: api.StreamInfo | None = None) -> int:
        """The newest record's offset: the last offset of the stream's last message."""
        if info is None:
            info = await self._jetstream().stream_info(self.name)
        last_seq = info.state.last_seq
        if not last_seq:
            return 0
        last = await self._direct(self.name, {"seq": last_seq}, single=True)
        if last:
            return last_seq * OFFSETS_PER_MESSAGE + len(_records(last[0], 0, last_seq)) - 1
        # The newest message was purged: ``trim`` noted its last offset first. Purged by
        # someone else: count it as full (no offset of it can come back).
        noted = _offset(await self._get("head"))
        if noted // OFFSETS_PER_MESSAGE == last_seq:
            return noted
        return last_seq * OFFSETS_PER_MESSAGE + OFFSETS_PER_MESSAGE - 1

    async def _current_head(self, at_least: int) -> int:
        """A head known to be at least ``at_least`` if the stream has it (asks when unsure)."""
        if at_least > self._known_head:
            self._known_head = max(self._known_head, await self._head())
        return self._known_head

    # reading

    async def _read(
        self, consumer: str, limit: int, wait: float, partition: int, after: int | None
    ) -> list[StreamRecord]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        await self._register(consumer)
        if wait > 0:
            await self._listen()
        start = after
        if start is None:
            entry = await self._offset_entry(consumer, partition)
            start = _offset(entry)
        while True:
            arrived = self._arrived[partition]  # taken before the fetch: no wake-up is missed
            records = await self._fetch(consumer, partition, start, limit)
            if records:
                self._known_head = max(self._known_head, records[-1].offset)
                return records
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), min(remaining, POLL))
            self._check_open()

    async def _read_any(
        self, consumer: str, limit: int, wait: float, after: dict[int, int | None]
    ) -> dict[int, list[StreamRecord]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        await self._register(consumer)
        if wait > 0:
            await self._listen()
        starts: dict[int, int] = {}
        for partition, given in after.items():
            starts[partition] = (
                _offset(await self._offset_entry(consumer, partition)) if given is None else given
            )
        look = list(starts)
        while look:
            arrived = {p: self._arrived[p] for p in starts}  # taken before the fetches
            fetched = await asyncio.gather(
                *(self._fetch(consumer, p, starts[p], limit) for p in look)
            )
            found = {p: records for p, records in zip(look, fetched, strict=True) if records}
            if found:
                newest = max(records[-1].offset for records in found.values())
                self._known_head = max(self._known_head, newest)
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            waiters = [asyncio.ensure_future(event.wait()) for event in arrived.values()]
            try:
                await asyncio.wait(
                    waiters, timeout=min(remaining, POLL), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waiters:
                    waiter.cancel()
            self._check_open()
            # Only the partitions that woke; all of them after a POLL without a wake-up call.
            look = [p for p, event in arrived.items() if event.is_set()] or list(starts)
        return {}

    async def _fetch(
        self, consumer: str, partition: int, after: int, limit: int
    ) -> list[StreamRecord]:
        """Up to ``limit`` records of ``partition`` with offsets above ``after``."""
        buffer = self._buffers.setdefault((consumer, partition), _Buffer())
        async with buffer.lock:
            if after < buffer.low or _first_seq(after) > buffer.next_seq:
                buffer.reset(after)
            buffer.skip_through(after)
            more = True
            while more and len(buffer.records) < limit:
                request = {
                    "seq": buffer.next_seq,
                    "next_by_subj": f"{self.name}.p.{partition}",
                    "batch": min(READ_MESSAGES, limit - len(buffer.records) + 1),
                    "max_bytes": READ_BYTES,
                }
                found = await self._direct(self.name, request)
                for msg in found:
                    headers = msg.headers or {}
                    seq = int(headers.get(_SEQUENCE, buffer.next_seq))
                    buffer.records.extend(_records(msg, partition, seq))
                    buffer.next_seq = seq + 1
                # Messages left after the last one returned (the batch or 4 MB ran out first).
                more = bool(found) and int((found[-1].headers or {}).get(_NUM_PENDING, "0")) > 0
                buffer.skip_through(after)
            return buffer.records[:limit]

    async def _listen(self) -> None:
        """Subscribe to the wake-up calls (republished headers) once, on the first wait."""
        if self._listening:
            return
        await self._nc.subscribe(f"{self.name}.n.*", cb=self._on_arrival)
        self._listening = True  # nats-py subscribes again after a reconnect
        await self._nc.flush(max(1, round(self._timeout)))

    async def _on_arrival(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        if token.isdigit() and int(token) < self._partitions:
            self._wake(int(token))

    def _wake(self, partition: int) -> None:
        arrived, self._arrived[partition] = self._arrived[partition], asyncio.Event()
        arrived.set()

    async def _register(self, consumer: str) -> None:
        """A consumer's first read gives it offset 0 in every partition where it has none."""
        if consumer in self._registered:
            return
        await asyncio.gather(
            *(self._update(_offset_key(consumer, p), b"0", 0) for p in range(self._partitions))
        )
        self._registered.add(consumer)

    # acknowledging

    async def _offset_entry(self, consumer: str, partition: int) -> _Entry | None:
        key = _offset_key(consumer, partition)
        entry = await self._get(key)
        if entry is not None:
            self._acked[key] = entry
        return entry

    async def _ack(self, consumer: str, offset: int, partition: int) -> None:
        head = await self._current_head(offset)
        if not 0 <= offset <= head:
            raise ValueError(f"offset {offset} is outside the stream (0..{head})")
        key = _offset_key(consumer, partition)
        entry = self._acked.get(key)
        for _ in range(10):
            if entry is None:
                entry = await self._get(key)
            if offset <= _offset(entry):
                return  # a late, lower acknowledgement
            revision = await self._update(key, str(offset).encode(), _revision(entry))
            if revision is not None:
                self._acked[key] = _Entry(str(offset).encode(), revision, time.time())
                return
            entry = None  # another writer moved it: read it again
        raise Retryable(f"the offset of consumer {consumer!r} keeps changing under this ack")

    async def _seek(self, consumer: str, offset: int) -> None:
        head = await self._current_head(offset)
        if not 0 <= offset <= head:
            raise ValueError(f"offset {offset} is outside the stream (0..{head})")
        keys = [_offset_key(consumer, p) for p in range(self._partitions)]
        revisions = await asyncio.gather(*(self._put(key, str(offset).encode()) for key in keys))
        for key, revision in zip(keys, revisions, strict=True):
            self._acked[key] = _Entry(str(offset).encode(), revision, time.time())
        self._registered.add(consumer)
        for partition in range(self._partitions):
            self._wake(partition)

    # leases

    async def _claim(self, consumer: str, worker: str, ttl: float) -> frozenset[int]:
        prefix = f"c.{_token(consumer)}."
        await self._put(f"{prefix}w.{_token(worker)}", repr(ttl).encode())
        entries = await self._scan(f"{prefix}>")
        # The server's clock, not ours: our heartbeat, just written, is among the newest.
        now = max((entry.time for entry in entries.values()), default=time.time())
        live: set[str] = set()
        stale: list[tuple[str, int]] = []
        holders: dict[int, str] = {}
        revisions: dict[int, int] = {}
        for key, entry in entries.items():
            kind, _, name = key[len(prefix) :].partition(".")
            if kind == "w" and entry.value is not None:
                lives_until = entry.time + _seconds(entry.value)
                if lives_until > now:
                    live.add(_untoken(name))
                elif lives_until + DEAD_WORKER_KEPT < now:
                    stale.append((key, entry.revision))
            elif kind == "l" and name.isdigit():
                revisions[int(name)] = entry.revision
                if entry.value is not None:
                    holders[int(name)] = entry.value.decode()
        plan = share(worker, live, holders, self._partitions)
        lease = f"{prefix}l."
        await asyncio.gather(
            *(self._delete(f"{lease}{p}", revisions[p]) for p in plan.give_up),
            *(self._delete(key, revision) for key, revision in stale),
        )
        taken = await asyncio.gather(
            *(self._update(f"{lease}{p}", worker.encode(), revisions.get(p, 0)) for p in plan.take)
        )
        won = {p for p, revision in zip(plan.take, taken, strict=True) if revision is not None}
        return plan.keep | frozenset(won)

    async def _release(self, consumer: str, worker: str) -> None:
        prefix = f"c.{_token(consumer)}."
        entries = await self._scan(f"{prefix}l.*")
        mine = [
            (key, entry.revision)
            for key, entry in entries.items()
            if entry.value is not None and entry.value.decode() == worker
        ]
        await asyncio.gather(*(self._delete(key, revision) for key, revision in mine))
        await self._delete(f"{prefix}w.{_token(worker)}", None)

    # stats and trim

    async def _offsets(self) -> dict[str, list[int]]:
        """Consumer -> acknowledged offset per partition (0 where it has none)."""
        offsets: dict[str, list[int]] = {}
        for key, entry in (await self._scan("c.*.o.*")).items():
            _, consumer, _, partition = key.split(".")
            if entry.value is None or not partition.isdigit():
                continue
            each = offsets.setdefault(_untoken(consumer), [0] * self._partitions)
            if int(partition) < self._partitions:
                each[int(partition)] = _offset(entry)
        return offsets

    async def _stats(self) -> StreamStats:
        info = await self._jetstream().stream_info(self.name)
        head = await self._head(info)
        self._known_head = max(self._known_head, head)
        oldest = info.state.first_seq * OFFSETS_PER_MESSAGE if info.state.messages else head + 1
        offsets = await self._offsets()
        pairs = [(name, p, acked[p]) for name, acked in offsets.items() for p in range(len(acked))]
        behind = await asyncio.gather(*(self._behind(p, offset) for _, p, offset in pairs))
        counts: dict[str, list[tuple[int, int]]] = {}
        for (name, _, offset), count in zip(pairs, behind, strict=True):
            counts.setdefault(name, []).append((offset, count))
        return StreamStats(
            head=head,
            oldest=oldest,
            consumers={name: _acknowledged(each) for name, each in counts.items()},
            pending={name: sum(count for _, count in each) for name, each in counts.items()},
        )

    async def _behind(self, partition: int, after: int) -> int:
        """Records of the first message after ``after`` plus one per further message."""
        request = {
            "seq": _first_seq(after),
            "next_by_subj": f"{self.name}.p.{partition}",
            "batch": 1,
        }
        found = await self._direct(self.name, request)
        if not found:
            return 0
        msg = found[0]
        headers = msg.headers or {}
        records = _records(msg, partition, int(headers.get(_SEQUENCE, "0")))
        return sum(r.offset > after for r in records) + int(headers.get(_NUM_PENDING, "0"))

    async def _trim(self, keep_after: int) -> int:
        offsets = await self._offsets()
        await self._put("head", str(await self._head()).encode())  # the newest may go: note it
        dropped = 0
        for partition in range(self._partitions):
            bound = min([keep_after, *(acked[partition] for acked in offsets.values())])
            below = _first_seq(bound)  # every message before it ends at or below the bound
            request = {"seq": below, "next_by_subj": f"{self.name}.p.{partition}", "batch": 1}
            found = await self._direct(self.name, request)
            if found and found[0].headers:
                seq = int(found[0].headers[_SEQUENCE])
                records = _records(found[0], partition, seq)
                if records and records[-1].offset <= bound:
                    below = seq + 1
            if below <= 1:
                continue
            reply = await self._nc.request(
                f"$JS.API.STREAM.PURGE.{self.name}",
                json.dumps({"filter": f"{self.name}.p.{partition}", "seq": below}).encode(),
                timeout=self._timeout,
            )
            answer = json.loads(reply.data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            dropped += int(answer.get("purged", 0))
        if dropped:
            logger.debug("stream trimmed messages=%d up_to=%d", dropped, keep_after)
        return dropped

    # the bucket

    async def _get(self, key: str) -> _Entry | None:
        found = await self._direct(
            f"KV_{self._bucket}", {"last_by_subj": f"$KV.{self._bucket}.{key}"}, single=True
        )
        return _entry(found[0]) if found else None

    async def _scan(self, pattern: str) -> dict[str, _Entry]:
        """The latest entry (deleted ones too) of every key matching ``pattern``."""
        prefix = f"$KV.{self._bucket}."
        request = {"multi_last": [f"{prefix}{pattern}"], "batch": 100_000}
        try:
            found = await self._direct(f"KV_{self._bucket}", request)
        except nats.js.errors.APIError as exc:
            if exc.code != TOO_MANY_RESULTS:
                raise
            return await self._watch(pattern)
        return {msg.headers[_SUBJECT][len(prefix) :]: _entry(msg) for msg in found if msg.headers}

    async def _watch(self, pattern: str) -> dict[str, _Entry]:
        """``_scan`` for more than 1,024 keys (a direct get answers with at most that many)."""
        bucket = await self._jetstream().key_value(self._bucket)
        watcher = await bucket.watch(pattern)
        entries: dict[str, _Entry] = {}
        # nats-py's "no more" marker (None) can come before the entries: it compares the
        # consumer's pending count with what its callback has seen, and under load the entries
        # are delivered but not yet handed over. So the marker only ends the watch if nothing
        # follows it within WATCH_GRACE; otherwise the entry with no more pending (delta 0) does.
        marker = False
        try:
            while True:
                try:
                    # nats-py leaves KeyWatcher untyped.
                    update = await watcher.updates(WATCH_GRACE if marker else self._timeout)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    if marker:
                        break
                    raise
                if update is None:
                    marker = True
                    continue
                entries[update.key] = _Entry(
                    value=None if update.operation in ("DEL", "PURGE") else update.value,
                    revision=update.revision or 0,
                    time=_created(update.created),
                )
                if not update.delta:
                    break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return entries

    async def _put(self, key: str, value: bytes) -> int:
        ack = await self._jetstream().publish(f"$KV.{self._bucket}.{key}", value)
        return int(ack.seq)

    async def _update(self, key: str, value: bytes, last: int) -> int | None:
        """Compare-and-set: the new revision, or None when ``last`` is no longer the latest."""
        try:
            ack = await self._jetstream().publish(
                f"$KV.{self._bucket}.{key}", value, headers={_EXPECTED_LAST: str(last)}
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    async def _delete(self, key: str, last: int | None) -> None:
        headers = {_KV_OPERATION: "DEL"}
        if last is not None:
            headers[_EXPECTED_LAST] = str(last)
        try:
            await self._jetstream().publish(f"$KV.{self._bucket}.{key}", b"", headers=headers)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in _WRONG_LAST_SEQUENCE:
                raise

    # direct gets

    async def _direct(
        self, stream: str, request: dict[str, Any], *, single: bool = False
    ) -> list[Msg]:
        """The messages a direct get answers with (none when nothing matches)."""
        self._check_open()
        self._next_token += 1
        token = str(self._next_token)
        reply = _Reply(single=single, done=asyncio.get_running_loop().create_future())
        self._replies[token] = reply
        try:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{stream}",
                json.dumps(request).encode(),
                reply=f"{self._inbox}.{token}",
            )
            await asyncio.wait_for(reply.done, self._timeout)
        finally:
            del self._replies[token]
        return reply.messages

    async def _on_reply(self, msg: Msg) -> None:
        reply = self._replies.get(msg.subject.rsplit(".", 1)[-1])
        if reply is None or reply.done.done():
            return  # a late answer to a request that gave up
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            reply.messages.append(msg)
            if reply.single:
                reply.done.set_result(None)
        elif status in ("204", "404"):  # end of batch, or nothing matches
            reply.done.set_result(None)
        elif status == "408":  # the server gave up on the request: try again
            reply.done.set_exception(nats.errors.TimeoutError())
        else:
            description = msg.headers.get("Description", "") if msg.headers else ""
            reply.done.set_exception(
                nats.js.errors.APIError(code=int(status), description=description)
            )


class _Loop:
    """A private asyncio event loop in a daemon thread; ``run`` submits and waits, bounded."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], budget: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(budget)
        except concurrent.futures.TimeoutError:
            if future.done():
                raise  # the coroutine's own TimeoutError
            future.cancel()
            raise Retryable(
                f"a NATS stream call took more than {budget:.0f} s; the server may be"
                " restarting, retry"
            ) from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return

        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def _first_seq(after: int) -> int:
    """The sequence of the first message that may hold a record with offset above ``after``."""
    return max(1, (after + 1) // OFFSETS_PER_MESSAGE)


def _records(msg: Msg, partition: int, seq: int | None = None) -> list[StreamRecord]:
    """The records of one stored message (one raw record if it is not in optsync's shape)."""
    if seq is None:
        seq = int(msg.headers[_SEQUENCE]) if msg.headers and _SEQUENCE in msg.headers else 0
    base = seq * OFFSETS_PER_MESSAGE
    data = msg.data
    try:
        version, appended_at, pairs = _UNPACK.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        stamp = msg.headers.get(_TIMESTAMP) if msg.headers else None
        appended_at = _unix(stamp) if stamp else time.time()
        return [StreamRecord(base, "", bytes(data), appended_at, partition)]
    if version != FORMAT:
        raise Fatal(
            f"message {seq} of the stream was written in record format {version}, which this"
            " optsync does not read: upgrade optsync"
        )
    return [
        StreamRecord(base + i, key, record, appended_at, partition)
        for i, (key, record) in enumerate(pairs)
    ]


def _acknowledged(offsets: Iterable[tuple[int, int]]) -> int:
    """A consumer's offset from (offset, records behind) per partition: the lowest among the
    partitions it has not finished, or the highest when it has finished them all."""
    each = list(offsets)
    behind = [offset for offset, count in each if count]
    return min(behind) if behind else max((offset for offset, _ in each), default=0)


def _entry(msg: Msg) -> _Entry:
    headers = msg.headers or {}
    operation = headers.get(_KV_OPERATION)
    stamp = headers.get(_TIMESTAMP)
    return _Entry(
        value=None if operation in ("DEL", "PURGE") else bytes(msg.data),
        revision=int(headers.get(_SEQUENCE, "0")),
        time=_unix(stamp) if stamp else time.time(),
    )


def _offset(entry: _Entry | None) -> int:
    if entry is None or not entry.value:
        return 0
    return int(entry.value)


def _revision(entry: _Entry | None) -> int:
    return 0 if entry is None else entry.revision


def _seconds(value: bytes) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def _offset_key(consumer: str, partition: int) -> str:
    return f"c.{_token(consumer)}.o.{partition}"


def _token(text: str) -> str:
    """``text`` as one subject token: letters, digits, '-' and '_' as they are, any other
    character as ``=XX`` per UTF-8 byte (so ``.``, ``*`` and ``>`` never reach a subject)."""
    if _PLAIN_TOKEN.fullmatch(text):
        return text
    if not text:
        return "="
    return "".join(
        ch if _PLAIN_TOKEN.fullmatch(ch) else "".join(f"={b:02X}" for b in ch.encode())
        for ch in text
    )


def _untoken(encoded: str) -> str:
    if encoded == "=":
        return ""
    if "=" not in encoded:
        return encoded
    return re.sub(
        r"(?:=[0-9A-F]{2})+",
        lambda m: bytes.fromhex(m.group(0).replace("=", "")).decode(errors="replace"),
        encoded,
    )


def _created(created: object) -> float:
    """A watched entry's timestamp (a ``datetime`` in nats-py) as Unix time."""
    if isinstance(created, datetime.datetime):
        return created.timestamp()
    return time.time()


def _unix(stamp: str) -> float:
    """RFC 3339 with nanoseconds (``2026-12-03T08:03:17.191222195Z``) as Unix time."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)
