"""The consent ledger: what the engine keeps so that every consent change reaches every sink,
end users' own opt-outs are honoured, and each change's journey can be shown afterwards.

The ledger is the consent history (``ConsentChange`` rows, numbered by ``seq`` in commit order
per app) read as an outbox: each sink keeps a cursor per app, and records in the same
transaction how far it delivered and when (``sink_deliveries``), what it could not deliver
(dead letters, with the reason) and what waits for a time (a removal AWS allows only once every
30 days). End users' opt-outs (a STOP reply) are kept as reports, with the time they were
written back to the source. Nothing here is ever removed by an endpoint delete.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from optsync.engine.models import ChannelType, ConsentChange

__all__ = (
    "AuditRow",
    "ConsentLedger",
    "Delivered",
    "EndUserOptOut",
    "SinkDeadLetter",
    "SinkProgress",
    "SinkState",
    "SinkWaiting",
)


class Delivered(StrEnum):
    """What a sink did with a change it was given."""

    SENT = "sent"  # delivered: the sink acknowledged it
    SKIPPED = "skipped"  # nothing to send: the sink does not deal with this change


@dataclass(frozen=True)
class EndUserOptOut:
    """A person's own opt-out reported from outside the source (a STOP reply)."""

    seq: int
    app_id: str
    address: str
    at: str
    """When the person opted out (ISO-8601 UTC)."""
    via: str
    """Where the report came from: ``eum-sms:<list>``, ``api:<key id>`` ..."""
    keyword: str | None
    recorded_at: str
    endpoint_ids: tuple[str, ...]
    """The endpoints it opted out when it was recorded."""
    written_back_at: str | None = None
    writeback_error: str | None = None


@dataclass(frozen=True)
class SinkDeadLetter:
    sink: str
    app_id: str
    seq: int
    reason: str
    at: str
    change: ConsentChange | None = None


@dataclass(frozen=True)
class SinkWaiting:
    """A change a sink must not deliver before ``not_before`` (epoch seconds)."""

    sink: str
    app_id: str
    key: str
    seq: int
    not_before: float
    reason: str
    since: str


@dataclass
class SinkProgress:
    """What one delivery step did, written in one transaction with the sink's cursor.

    ``delivered``: runs of (first seq, last seq, outcome) of the app's changes in seq order;
    ``dead``: (seq, reason); ``waiting``: waits to keep (replacing any of the same key);
    ``done_waiting`` / ``done_dead``: waits and dead letters that are over (delivered or
    superseded by a newer change of the same key).
    """

    app_id: str
    cursor: int
    delivered: list[tuple[int, int, Delivered]] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    waiting: list[SinkWaiting] = field(default_factory=list)
    done_waiting: list[str] = field(default_factory=list)
    done_dead: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SinkState:
    """One sink's position in one app: for status, metrics and the console."""

    sink: str
    app_id: str
    cursor: int
    head: int
    """The app's newest change."""
    behind: int
    """Changes after the cursor."""
    oldest_behind: str | None
    """When the oldest change after the cursor happened (None: caught up)."""
    dead_letters: int
    waiting: int
    next_wait_end: float | None
    last_delivery: str | None
    holder: str | None


@dataclass(frozen=True)
class AuditRow:
    """One consent change with the time it reached each sink."""

    change: ConsentChange
    deliveries: dict[str, str | None]
    """Sink name -> when it was delivered (None: not yet); a sink that skipped it is absent."""
    outcomes: dict[str, str]
    """Sink name -> sent | skipped | dead letter | waiting | pending."""


class ConsentLedger(ABC):
    """Sinks' cursors, deliveries and dead letters; end users' opt-outs; the audit trail."""

    # end users' opt-outs ----------------------------------------------------------------------
    @abstractmethod
    def record_end_user_opt_out(
        self,
        app_id: str,
        address: str,
        at: str,
        via: str,
        keyword: str | None = None,
        channels: Sequence[ChannelType] = (ChannelType.SMS, ChannelType.VOICE),
    ) -> EndUserOptOut | None:
        """Opt out every endpoint at ``address`` on ``channels``, held until an explicit
        opt-in, and keep the report. None if this report (address, time, via) is known."""

    @abstractmethod
    def end_user_opt_outs(
        self, app_id: str, *, pending_writeback: bool = False, limit: int = 1000
    ) -> list[EndUserOptOut]:
        """Reports, oldest first; ``pending_writeback``: only those not written back yet."""

    @abstractmethod
    def known_end_user_opt_outs(self, app_id: str, via: str) -> set[tuple[str, str]]:
        """(address, at) of every report recorded from ``via``."""

    @abstractmethod
    def mark_written_back(self, seq: int, at: str | None, error: str | None = None) -> None: ...

    # the outbox -------------------------------------------------------------------------------
    @abstractmethod
    def consent_changes(
        self, app_id: str, after: int, limit: int, seqs: Sequence[int] | None = None
    ) -> list[ConsentChange]:
        """The app's changes after seq ``after`` in seq order (or exactly ``seqs``)."""

    @abstractmethod
    def claim_lease(self, name: str, holder: str, ttl: float) -> bool:
        """Hold ``name`` for ``ttl`` seconds (renewing our own hold); False if another has it."""

    @abstractmethod
    def release_lease(self, name: str, holder: str) -> None: ...

    @abstractmethod
    def sink_cursor(self, sink: str, app_id: str) -> int: ...

    @abstractmethod
    def save_sink_progress(self, sink: str, holder: str, progress: SinkProgress) -> bool:
        """Write a delivery step (see ``SinkProgress``); False, writing nothing, if ``holder``
        no longer holds the sink's lease."""

    @abstractmethod
    def sink_states(self, sink: str) -> list[SinkState]:
        """The sink's state in every app."""

    @abstractmethod
    def sink_dead_letters(self, sink: str, limit: int = 100) -> list[SinkDeadLetter]: ...

    @abstractmethod
    def sink_waiting(self, sink: str, limit: int = 100) -> list[SinkWaiting]: ...

    @abstractmethod
    def retry_sink_dead_letters(self, sink: str, seqs: Sequence[int] | None = None) -> int:
        """Have the sink's runner deliver these dead letters (all: None) again at its next
        step; each stays a dead letter until delivered. Returns how many."""

    # audit ------------------------------------------------------------------------------------
    @abstractmethod
    def overdue_opt_outs(
        self, sinks: Sequence[tuple[str, frozenset[ChannelType] | None]], before: str
    ) -> int:
        """Opt-outs made before ``before`` (ISO-8601 UTC) that some sink, among (name, channels
        it takes or None for all), has not delivered: after its cursor or a dead letter. An
        opt-out is made when its source committed it, or when the person sent their STOP
        (``source_time``), else when the engine recorded it."""

    @abstractmethod
    def audit(
        self, sinks: Sequence[str], since: str | None = None, app_id: str | None = None
    ) -> Iterator[AuditRow]:
        """Every consent change (of every app, or one) from ``since``, in seq order, with the
        time each sink delivered it."""
