"""``ConsentService``: everything that moves consent beyond the engine, in one process.

A ``SinkRunner`` per ``[[sink]]``, an ``InboundRunner`` per ``[[inbound]]`` and the
``WritebackRunner`` when ``writeback`` is set. ``optsync run``/``up`` and every ``optsync apply``
start one; the leases in the engine database keep one deliverer per sink, one poller per inbound
and one writer back at a time, whichever process holds them.
"""

from __future__ import annotations

import logging
import os
import socket

from optsync.backends import open_inbound, open_sinks, open_writeback
from optsync.config import Settings
from optsync.engine.store import EndpointStore
from optsync.inbound.runner import InboundRunner, WritebackRunner
from optsync.sinks.runner import SinkRunner

__all__ = ("ConsentService",)

logger = logging.getLogger(__name__)


class ConsentService:
    """The sinks, inbound pollers and write-back of one config; ``start`` / ``stop``."""

    def __init__(
        self, settings: Settings, store: EndpointStore, app_id: str, holder: str | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.app_id = app_id
        self.holder = holder or f"{socket.gethostname()}-{os.getpid()}"
        self.sinks = [SinkRunner(store, sink, self.holder) for sink in open_sinks(settings, store)]
        self.inbound = [
            InboundRunner(store, source, self._app, self.holder)
            for source in open_inbound(settings)
        ]
        writeback = open_writeback(settings)
        self.writeback = (
            WritebackRunner(store, writeback, self._app, self.holder) if writeback else None
        )

    def _app(self) -> str:
        return self.app_id

    @property
    def empty(self) -> bool:
        return not (self.sinks or self.inbound or self.writeback)

    def start(self) -> None:
        for runner in self.sinks:
            runner.start()
        for poller in self.inbound:
            poller.start()
        if self.writeback is not None:
            self.writeback.start()
        if not self.empty:
            logger.info(
                "consent delivery started sinks=%d inbound=%d writeback=%s",
                len(self.sinks),
                len(self.inbound),
                "on" if self.writeback else "off",
            )

    def stop(self, timeout: float = 10.0) -> None:
        for runner in self.sinks:
            runner.stop(timeout)
        for poller in self.inbound:
            poller.stop(timeout)
        if self.writeback is not None:
            self.writeback.stop(timeout)
