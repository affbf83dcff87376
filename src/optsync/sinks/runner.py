"""``SinkRunner``: delivers the consent ledger to one sink, from its cursor, at least once.

One thread per sink, so a slow or broken sink holds back no other. Each step, for every app:

1. changes whose wait is over (a removal AWS refused within 30 days, a dead letter sent back
   for another try) are delivered again, unless a newer change of the same key was delivered
   meanwhile (then they are superseded: delivering them would undo the newer one);
2. the next batch after the cursor is delivered, in seq order; a change the sink does not take
   is recorded as skipped, a refused one becomes a dead letter, a deferred one waits;
3. the cursor, the delivered runs with their time, the dead letters and the waits are written in
   one engine transaction, and only if this process still holds the sink's lease.

``SinkUnavailable`` (or any error of the sink's client) retries the same batch with backoff and
jitter (``optsync.retry.Backoff``); nothing moves meanwhile, so per-key order holds. The lease
(``sink:<name>`` in the engine database, renewed every step) keeps one deliverer per sink when
several processes run the same config (``optsync apply`` workers); another takes over within
``LEASE_TTL`` after one dies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from optsync.engine.ledger import Delivered, SinkProgress, SinkWaiting
from optsync.engine.models import ConsentChange, iso_now
from optsync.engine.store import EndpointStore
from optsync.errors import Retryable
from optsync.retry import Backoff
from optsync.sinks.base import Deferred, Outcome, Rejected, Sent, Sink, SinkUnavailable, Skipped

__all__ = ("LEASE_TTL", "SinkRunner", "SinkStats")

logger = logging.getLogger(__name__)

LEASE_TTL = 15.0
"""Seconds a sink's lease lasts without renewal: how soon another process takes over."""
POLL_SECONDS = 0.25
"""How often an idle runner looks for new changes."""
PAGE = 1000
"""Apps read per page when listing them."""


@dataclass
class SinkStats:
    """Counters of this process's runner (the engine holds the state every process sees)."""

    sent: int = 0
    skipped: int = 0
    dead: int = 0
    deferred: int = 0
    superseded: int = 0
    failures: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    holding: bool = False
    seconds: list[float] = field(default_factory=list)
    """Durations of recent delivery calls (the last 1,000)."""


class SinkRunner:
    """Delivers consent changes to ``sink``; ``start`` runs it in a thread until ``stop``."""

    def __init__(
        self,
        store: EndpointStore,
        sink: Sink,
        holder: str,
        *,
        poll: float = POLL_SECONDS,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self.store = store
        self.sink = sink
        self.holder = holder
        self.poll = poll
        self.lease_ttl = lease_ttl
        self.stats = SinkStats()
        self._lease = f"sink:{sink.name}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # running ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"sink-{self.sink.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.store.release_lease(self._lease, self.holder)
        except Exception as exc:  # the engine is down: the lease runs out by itself
            logger.debug("sink lease not released sink=%s reason=%s", self.sink.name, exc)
        self.sink.close()

    def _run(self) -> None:
        backoff = Backoff(f"sink {self.sink.name}")
        while not self._stop.is_set():
            try:
                moved = self.step()
            except SinkUnavailable as exc:
                self._failed(str(exc))
                wait = backoff.failed(exc)
                self._stop.wait(max(wait, exc.retry_after or 0.0))
                continue
            except Retryable as exc:  # the engine: down or busy
                self._failed(f"engine: {exc}")
                self._stop.wait(backoff.failed(exc))
                continue
            except Exception as exc:  # the sink's client raised something unforeseen: retry
                logger.debug("sink step failed sink=%s", self.sink.name, exc_info=True)
                self._failed(f"{type(exc).__name__}: {exc}")
                self._stop.wait(backoff.failed(exc))
                continue
            backoff.succeeded()
            if not moved:
                self._stop.wait(self.poll)

    def _failed(self, reason: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = reason
        self.stats.last_error_at = time.time()

    # one step ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """Deliver what is due in every app; True if anything moved."""
        if not self.store.claim_lease(self._lease, self.holder, self.lease_ttl):
            self.stats.holding = False
            return False
        self.stats.holding = True
        moved = False
        token: str | None = None
        while True:
            page = self.store.list_apps(PAGE, token)
            for app in page.items:
                moved = self._step_app(app.id) or moved
            token = page.next_token
            if token is None:
                return moved

    def _step_app(self, app_id: str) -> bool:
        waiting = [w for w in self.store.sink_waiting(self.sink.name, 10_000) if w.app_id == app_id]
        moved = self._redeliver(app_id, waiting)
        cursor = self.store.sink_cursor(self.sink.name, app_id)
        changes = self.store.consent_changes(app_id, cursor, self.sink.batch_size)
        if not changes:
            return moved
        progress = SinkProgress(app_id=app_id, cursor=changes[-1].seq)
        taken = [c for c in changes if self.sink.takes(c)]
        outcomes = dict(zip((c.seq for c in taken), self._deliver(taken), strict=True))
        waiting_keys = {w.key: w for w in waiting}
        for change in changes:
            outcome = outcomes.get(change.seq, Skipped())
            self._note(progress, change, outcome)
            if change.seq in outcomes:
                key = self.sink.wait_key(change)
                older = waiting_keys.get(key)
                if older is not None and older.seq < change.seq and not _defers(outcome):
                    progress.done_waiting.append(key)  # superseded by this newer change
                    self.stats.superseded += 1
        self._save(progress)
        return True

    def _redeliver(self, app_id: str, waiting: Sequence[SinkWaiting]) -> bool:
        """Deliver the app's waiting changes whose time has come."""
        now = time.time()
        due = [w for w in waiting if w.not_before <= now]
        if not due:
            return False
        cursor = self.store.sink_cursor(self.sink.name, app_id)
        progress = SinkProgress(app_id=app_id, cursor=cursor)
        changes = {
            c.seq: c
            for c in self.store.consent_changes(app_id, 0, 0, seqs=sorted(w.seq for w in due))
        }
        fresh: list[tuple[SinkWaiting, ConsentChange]] = []
        for wait in due:
            change = changes.get(wait.seq)
            if change is None or self._superseded(change, cursor):
                progress.done_waiting.append(wait.key)
                self.stats.superseded += 1
            else:
                fresh.append((wait, change))
        outcomes = self._deliver([c for _, c in fresh])
        for (wait, change), outcome in zip(fresh, outcomes, strict=True):
            if isinstance(outcome, Deferred):
                progress.waiting.append(
                    SinkWaiting(
                        self.sink.name, app_id, wait.key, change.seq, outcome.until,
                        outcome.reason, wait.since,
                    )
                )  # fmt: skip
                self.stats.deferred += 1
                continue
            progress.done_waiting.append(wait.key)
            self._note(progress, change, outcome, waited=True)
        self._save(progress)
        return True

    def _superseded(self, change: ConsentChange, cursor: int) -> bool:
        """A newer change of the same key has been handed to the sink since."""
        key = self.sink.wait_key(change)
        for other in self.store.consent_history(change.app_id, change.endpoint_id):
            if change.seq < other.seq <= cursor and self.sink.wait_key(other) == key:
                return True
        return False

    def _deliver(self, changes: Sequence[ConsentChange]) -> Sequence[Outcome]:
        if not changes:
            return []
        started = time.monotonic()
        outcomes = self.sink.deliver(changes)
        took = time.monotonic() - started
        self.stats.seconds = [*self.stats.seconds[-999:], took]
        if len(outcomes) != len(changes):
            raise RuntimeError(
                f"sink {self.sink.name!r} answered {len(outcomes)} outcomes for "
                f"{len(changes)} changes"
            )
        return outcomes

    def _note(
        self,
        progress: SinkProgress,
        change: ConsentChange,
        outcome: Outcome,
        *,
        waited: bool = False,
    ) -> None:
        if isinstance(outcome, Sent | Skipped):
            kind = Delivered.SENT if isinstance(outcome, Sent) else Delivered.SKIPPED
            runs = progress.delivered
            if not waited and runs and runs[-1][2] is kind:
                runs[-1] = (runs[-1][0], change.seq, kind)
            else:
                runs.append((change.seq, change.seq, kind))
            if waited:
                progress.done_dead.append(change.seq)
            if isinstance(outcome, Sent):
                self.stats.sent += 1
            else:
                self.stats.skipped += 1
        elif isinstance(outcome, Rejected):
            progress.dead.append((change.seq, outcome.reason))
            self.stats.dead += 1
            logger.warning(
                "sink dead letter sink=%s app=%s seq=%d reason=%s",
                self.sink.name,
                change.app_id,
                change.seq,
                outcome.reason,
            )
        else:
            progress.waiting.append(
                SinkWaiting(
                    self.sink.name,
                    change.app_id,
                    self.sink.wait_key(change),
                    change.seq,
                    outcome.until,
                    outcome.reason,
                    iso_now(),
                )
            )
            self.stats.deferred += 1

    def _save(self, progress: SinkProgress) -> None:
        if not self.store.save_sink_progress(self.sink.name, self.holder, progress):
            # Another process took the sink over (this one stalled past the lease): what was
            # just delivered is delivered again by it, at least once as promised.
            self.stats.holding = False
            logger.info("sink lease lost sink=%s", self.sink.name)

    def retry_dead_letters(self, seqs: Sequence[int] | None = None) -> int:
        """Put dead letters back to be delivered at the next step (``optsync sinks replay``)."""
        return self.store.retry_sink_dead_letters(self.sink.name, seqs)


def _defers(outcome: Outcome) -> bool:
    return isinstance(outcome, Deferred)
