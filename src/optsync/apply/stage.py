"""The mapping stage: stream records decoded and mapped in a process of their own.

Apply's thread spent about 40 % of its time decoding DMS JSON and running the mapping rules
while the second core idled. With the stage, that work runs in a child process: the apply
thread reads a batch from the stream, hands its bytes to the stage, writes the batch before it
to the engine meanwhile, then takes the stage's answer (``PreparedBatch``: change events and
endpoint writes, msgpack, decoded straight into Structs). The stream still holds, and replays,
DMS JSON; only where the work runs changes. Per-key order is kept: the stage answers batches in
the order it was given them and keeps each batch's order.

The events come back without their before image (the apply side reads each event's row, its
position and commit time; the writes were made from the whole event already).

The child also looks up the country of every SMS and VOICE address it mapped
(``phone.country_for_address`` under the engine's policy) and sends it along, so the engine
never parses a number in the apply process.

The stage holds nothing durable: if the child dies, ``submit``/``result`` raise ``Retryable``
and the apply loop starts again from what it applied (``PartitionedApply`` re-reads the rest).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgspec

from optsync.apply.mapping import Mapper, MappingRule
from optsync.apply.worker import PreparedBatch, prepare
from optsync.engine.models import ChannelType, EndpointPatch
from optsync.engine.phone import PhonePolicy, country_for_address
from optsync.errors import Retryable
from optsync.stream.base import StreamRecord

__all__ = ("MIN_STAGE_BATCH", "MappingStage")

logger = logging.getLogger(__name__)

MIN_STAGE_BATCH = 64
"""Smaller batches are mapped in the apply thread: the trip to the child and back costs more
than mapping a few records, and at low rates it would only add latency."""

_PHONE_CHANNELS = frozenset({ChannelType.SMS, ChannelType.VOICE})
_Records = list[tuple[int, str, bytes]]
"""(offset, partition key, data) of each record sent to the child."""


class MappingStage:
    """A child process that maps batches of records; at most one batch in flight."""

    def __init__(self, rules: Sequence[MappingRule], country_policy: PhonePolicy) -> None:
        self._rules = tuple(rules)
        self._policy = str(country_policy)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(PreparedBatch).decode
        self.busy = False
        """A batch was submitted and its result not taken yet."""
        self.starts = 0
        """How many times a child was started (more than once: one died and was replaced)."""
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy SQLite connections
        self._conn, child = context.Pipe()
        self._process: BaseProcess = context.Process(
            target=_serve,
            args=(child, self._rules, self._policy),
            name="optsync-mapping",
            daemon=True,
        )
        self._process.start()
        child.close()
        self.starts += 1
        if self.starts > 1:
            logger.warning("mapping process restarted starts=%d", self.starts)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def submit(self, records: Sequence[StreamRecord]) -> None:
        """Start mapping ``records`` in the child."""
        assert not self.busy, "take the result of the batch in flight first"
        if not self._process.is_alive():
            self._conn.close()
            self._start()
        try:
            self._conn.send_bytes(
                self._encode([(r.offset, r.partition_key, r.data) for r in records])
            )
        except (OSError, ValueError) as exc:
            raise Retryable(f"the mapping process is gone ({exc}); apply starts again") from exc
        self.busy = True

    def result(self) -> PreparedBatch:
        """The mapped batch submitted last (waits for it)."""
        assert self.busy, "no batch in flight"
        self.busy = False
        try:
            return self._decode(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise Retryable(
                f"the mapping process exited (code {self._process.exitcode}); apply starts again"
            ) from exc

    def discard(self) -> None:
        """Drop the batch in flight, if any (after an error: it will be read again)."""
        if self.busy:
            with contextlib.suppress(Retryable):
                self.result()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send_bytes(b"")
        self._process.join(5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
        self._conn.close()


def _serve(conn: Connection, rules: tuple[MappingRule, ...], policy: str) -> None:
    """The child: map every batch it is sent until an empty message (or the parent is gone)."""
    from optsync.runtime import tune_gc  # noqa: PLC0415 (only in the child)

    tune_gc()
    mapper = Mapper(rules)
    country_policy = PhonePolicy(policy)
    decode = msgspec.msgpack.Decoder(_Records).decode
    encode = msgspec.msgpack.Encoder().encode
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:
            return
        records = [StreamRecord(offset, key, data, 0.0) for offset, key, data in decode(message)]
        batch = prepare(mapper, records)
        for item in batch.items:  # the apply side needs each event's row, not its before image
            if item.event.after is not None and item.event.before is not None:
                item.event = msgspec.structs.replace(item.event, before=None)
        numbers = {
            w.address
            for item in batch.items
            for w in item.writes
            if isinstance(w, EndpointPatch) and w.address and w.channel_type in _PHONE_CHANNELS
        }
        batch.countries = [(n, country_for_address(n, country_policy)) for n in numbers]
        batch.policy = str(country_policy)
        try:
            conn.send_bytes(encode(batch))
        except (OSError, ValueError):
            return
