"""Apply over the partitions this process holds: one ``ApplyWorker`` per leased partition.

Several ``optsync apply`` processes share one stream consumer. Each holds leases on a share of
the partitions (``ChangeStream.claim``), renewed every ``lease_ttl / 5`` seconds; a process that
joins takes its share at its first claim, and the others give those partitions up at their next
one, without being told. A process that dies (SIGKILL, power cut) stops renewing: its leases
run out after ``lease_ttl`` seconds and the others take its partitions at their next claim, so
within ``lease_ttl * 1.2`` seconds (12 s by default). They read each from its acknowledged
offset: whatever the dead process applied but had not acknowledged is applied again, which the
engine's position guard makes a no-op.

Before each claim every partition's applied records are made durable and acknowledged
(``ApplyWorker.flush``), so a partition given up is handed over with nothing in flight.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence

from optsync.apply.dlq import DeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyStats, ApplyWorker
from optsync.engine.store import EndpointStore
from optsync.events import ChangeEvent
from optsync.stream.base import ChangeStream

__all__ = ("LEASE_TTL", "PartitionedApply", "worker_name")

logger = logging.getLogger(__name__)

LEASE_TTL = 10.0
"""Seconds a partition stays leased to a process that stopped renewing it."""
IDLE_SLICE = 0.01
"""With several partitions, how long one idle read waits before the next partition is tried."""


def worker_name() -> str:
    """A name for this process among the apply workers: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class PartitionedApply:
    """Applies the records of every partition this process holds a lease on."""

    def __init__(
        self,
        stream: ChangeStream,
        mapper: Mapper,
        store: EndpointStore,
        app_id: str,
        dlq: DeadLetterQueue,
        *,
        consumer: str = "apply",
        name: str | None = None,
        lease_ttl: float = LEASE_TTL,
        on_applied: Callable[[Sequence[ChangeEvent]], None] | None = None,
        sync_interval: float = 0.0,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        self.stream = stream
        self.mapper = mapper
        self.store = store
        self.app_id = app_id
        self.dlq = dlq
        self.consumer = consumer
        self.name = name or worker_name()
        self.lease_ttl = lease_ttl
        self.on_applied = on_applied
        self.sync_interval = sync_interval
        self.stats = ApplyStats()
        self._workers: dict[int, ApplyWorker] = {}
        self._next_claim = 0.0
        self._turn = itertools.count()

    @property
    def partitions(self) -> frozenset[int]:
        """The partitions this process applies now."""
        return frozenset(self._workers)

    def step(self, limit: int = 1000, wait: float = 0.2) -> int:
        """Handle up to ``limit`` records of each held partition; returns how many in all.

        Renews the leases when due. Waits up to about ``wait`` seconds when nothing is new.
        """
        if time.monotonic() >= self._next_claim:
            self._claim()
        workers = list(self._workers.values())
        if not workers:
            time.sleep(min(wait, self.lease_ttl / 5))  # every partition is someone else's
            return 0
        start = next(self._turn) % len(workers)
        workers = workers[start:] + workers[:start]  # no partition always goes first
        if len(workers) == 1:
            return workers[0].step(limit, wait)
        handled = sum(worker.step(limit, 0.0) for worker in workers)
        if handled == 0:
            deadline = time.monotonic() + wait
            for worker in itertools.cycle(workers):
                handled = worker.step(limit, IDLE_SLICE)
                if handled or time.monotonic() >= deadline:
                    break
        return handled

    def flush(self) -> None:
        """Make every applied record durable and acknowledge it, in every held partition."""
        for worker in self._workers.values():
            worker.flush()

    def stop(self) -> None:
        """Acknowledge what was applied, then give every lease up for the others to take."""
        try:
            self.flush()
        finally:
            self._workers.clear()
            self.stream.release(self.consumer, self.name)

    def replay_dead_letters(self, ids: Sequence[int] | None = None) -> tuple[int, int]:
        """Run dead letters through mapping and engine again (see ``ApplyWorker``)."""
        return self._worker(0).replay_dead_letters(ids)

    def _claim(self) -> None:
        self.flush()  # a partition given up below leaves with nothing unacknowledged
        held = self.stream.claim(self.consumer, self.name, self.lease_ttl)
        self._next_claim = time.monotonic() + self.lease_ttl / 5
        lost = set(self._workers) - held
        gained = held - set(self._workers)
        for partition in lost:
            del self._workers[partition]
        for partition in sorted(gained):
            self._workers[partition] = self._worker(partition)
        if lost or gained:
            logger.info(
                "apply partitions worker=%s held=%s gained=%s lost=%s",
                self.name,
                sorted(held),
                sorted(gained),
                sorted(lost),
            )

    def _worker(self, partition: int) -> ApplyWorker:
        return ApplyWorker(
            self.stream,
            self.mapper,
            self.store,
            self.app_id,
            self.dlq,
            self.consumer,
            on_applied=self.on_applied,
            sync_interval=self.sync_interval,
            partition=partition,
            stats=self.stats,
        )
