"""The ``Sink`` interface: a downstream system that receives every consent change.

A sink is given the consent changes of one app in the engine's commit order (``seq``), a
batch at a time, and says what became of each (``Sent``, ``Skipped``, ``Deferred``,
``Rejected``), or raises ``SinkUnavailable`` when the whole batch should be tried again later
(a server down, a throttle, a timeout). ``optsync.sinks.runner`` does the rest: the cursor, the
retries with backoff, the dead letters, the waits, the lease that keeps one process per sink.

Delivery is at least once: a crash between a sink's call and the cursor's save sends the batch
again, with the same ``ConsentChange.change_id``, so a sink makes its writes idempotent (EUM's
PutOptedOutNumber is by nature; a webhook receiver dedupes on the id).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import ChannelType, ConsentChange

__all__ = (
    "Deferred",
    "Outcome",
    "Rejected",
    "Sent",
    "Sink",
    "SinkUnavailable",
    "Skipped",
)


@dataclass(frozen=True)
class Sent:
    """Delivered: the sink acknowledged it."""


@dataclass(frozen=True)
class Skipped:
    """Nothing to send for this change (say, an opt-in to a sink that only lists opt-outs)."""

    why: str = ""


@dataclass(frozen=True)
class Deferred:
    """Not allowed yet: try again at ``until`` (epoch seconds), unless a newer change of the
    same ``Sink.wait_key`` comes first and supersedes it."""

    until: float
    reason: str


@dataclass(frozen=True)
class Rejected:
    """The sink refuses this change for good: kept as the sink's dead letter with ``reason``."""

    reason: str


Outcome = Sent | Skipped | Deferred | Rejected


class SinkUnavailable(Exception):
    """The batch could not be delivered now; the runner retries it with backoff (or after
    ``retry_after`` seconds when the sink was told when)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Sink(ABC):
    """A downstream system that receives consent changes; see the module docstring."""

    name: str
    kind: str = "sink"
    """The configured ``type`` (``eum-sms``, ``webhook``, ``pinpoint-api``)."""
    channels: frozenset[ChannelType] | None = None
    """The channels whose changes it takes; None: every channel."""
    batch_size: int = 100
    target: str = ""
    """Where it delivers, for status and the console (no secret in it)."""

    def takes(self, change: ConsentChange) -> bool:
        """Whether the change is one this sink deals with at all (others are ``Skipped``)."""
        return self.channels is None or change.channel_type in self.channels

    def wait_key(self, change: ConsentChange) -> str:
        """Changes with one key are delivered in order: a newer one supersedes a waiting one."""
        return endpoint_key(change.endpoint_id)

    @abstractmethod
    def deliver(self, changes: Sequence[ConsentChange]) -> Sequence[Outcome]:
        """Deliver ``changes`` (in order); one outcome per change, in the same order."""

    def close(self) -> None:  # noqa: B027 - most sinks hold nothing to release
        """Release connections."""
