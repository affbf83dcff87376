"""Threads that bring end users' opt-outs in: one poller per ``[[inbound]]``, and the writer
that tells the source (``writeback``).

Each holds a lease in the engine database (``inbound:<name>``, ``writeback``), so that several
processes running one config poll and write back once. Recording is idempotent (a report is
known by address, time and origin), and so a poll that crashes halfway is simply done again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from optsync.engine.models import iso_now
from optsync.engine.store import EndpointStore
from optsync.errors import Retryable
from optsync.inbound.base import InboundSource
from optsync.inbound.writeback import Writeback, WritebackFailed
from optsync.retry import Backoff

__all__ = ("InboundRunner", "WritebackRunner")

logger = logging.getLogger(__name__)

LEASE_TTL = 30.0
WRITEBACK_POLL = 0.5


class _Loop:
    """A lease-holding loop: ``tick`` every ``interval`` seconds, retries with backoff."""

    def __init__(
        self, store: EndpointStore, lease: str, holder: str, interval: float, stage: str
    ) -> None:
        self.store = store
        self.lease = lease
        self.holder = holder
        self.interval = interval
        self.stage = stage
        self.last_error: str | None = None
        self.last_run: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.stage, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            self.store.release_lease(self.lease, self.holder)
        except Exception as exc:  # the engine is down: the lease runs out by itself
            logger.debug("lease not released lease=%s reason=%s", self.lease, exc)

    def _run(self) -> None:
        backoff = Backoff(self.stage)
        while not self._stop.is_set():
            try:
                if self.store.claim_lease(
                    self.lease, self.holder, max(LEASE_TTL, self.interval * 3)
                ):
                    self.tick()
                    self.last_run = iso_now()
                self.last_error = None
            except (Retryable, OSError, WritebackFailed) as exc:
                self.last_error = str(exc)
                self._stop.wait(backoff.failed(exc))
                continue
            except Exception as exc:  # a client error nobody foresaw: keep trying, loudly
                logger.debug("%s failed", self.stage, exc_info=True)
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._stop.wait(backoff.failed(exc))
                continue
            backoff.succeeded()
            self._stop.wait(self.interval)

    def tick(self) -> None:
        raise NotImplementedError


class InboundRunner(_Loop):
    """Polls one inbound source and records each new end-user opt-out in the engine."""

    def __init__(
        self, store: EndpointStore, source: InboundSource, app_id: Callable[[], str], holder: str
    ) -> None:
        super().__init__(
            store, f"inbound:{source.name}", holder, source.interval, f"inbound {source.name}"
        )
        self.source = source
        self.app_id = app_id
        self.recorded = 0

    def tick(self) -> None:
        app_id = self.app_id()
        known = self.store.known_end_user_opt_outs(app_id, self.source.via)
        for report in self.source.reports():
            if (report.address, report.at) in known:
                continue
            recorded = self.store.record_end_user_opt_out(
                app_id, report.address, report.at, self.source.via, report.keyword
            )
            if recorded is not None:
                self.recorded += 1
                logger.info(
                    "end-user opt-out recorded via=%s endpoints=%d",
                    self.source.via,
                    len(recorded.endpoint_ids),
                )

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self.source.close()


class WritebackRunner(_Loop):
    """Runs the ``writeback`` statement on the source for each end-user opt-out not yet told."""

    def __init__(
        self, store: EndpointStore, writeback: Writeback, app_id: Callable[[], str], holder: str
    ) -> None:
        super().__init__(store, "writeback", holder, WRITEBACK_POLL, "writeback")
        self.writeback = writeback
        self.app_id = app_id
        self.written = 0

    def tick(self) -> None:
        for report in self.store.end_user_opt_outs(self.app_id(), pending_writeback=True):
            rows = self.writeback.run(report.address)
            self.store.mark_written_back(report.seq, iso_now())
            self.written += 1
            logger.info("end-user opt-out written back to the source rows=%d", rows)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self.writeback.close()
