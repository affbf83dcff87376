"""capture -> stream -> apply, running in threads of one process (``optsync up`` / ``run``).

Capture appends each batch to the stream together with the source checkpoint, and only then
acknowledges the source; apply writes the engine, then the DLQ, then acknowledges the stream.
A failure that retrying cannot fix stops the pipeline and is re-raised by ``check``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence

from optsync.apply.dlq import DeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.capture.base import ChangeSource, Progress
from optsync.capture.sqlite import SQLiteSource
from optsync.config import Settings
from optsync.engine.models import App
from optsync.engine.store import EndpointStore
from optsync.errors import ConfigError, Retryable
from optsync.events import ChangeEvent
from optsync.stream.base import ChangeStream, Checkpoint
from optsync.stream.embedded import EmbeddedStream

__all__ = ("Pipeline", "ensure_app", "open_source")

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
RETRY_SECONDS = 0.5


def open_source(settings: Settings) -> ChangeSource:
    """The capture for ``[source] url`` (a database driver is loaded only when configured)."""
    source = settings.source
    if source is None:
        raise ConfigError("[source] url is missing: say which database to capture")
    name = source.source_name
    if source.scheme == "sqlite":
        return SQLiteSource(source.sqlite_path, source.tables, name=name)
    if source.scheme in ("mysql", "mariadb"):
        from optsync.capture.mysql import MySQLSource  # noqa: PLC0415

        return MySQLSource(source.url, source.tables, name=name, server_id=source.server_id)
    from optsync.capture.postgres import PostgresSource  # noqa: PLC0415

    return PostgresSource(
        source.url, source.tables, name=name, slot=source.slot, publication=source.publication
    )


def ensure_app(store: EndpointStore, name: str) -> App:
    """The engine app the mapping writes into, created if missing."""
    return store.find_app(name) or store.create_app(name)


class Pipeline:
    """One capture thread and one apply thread over an embedded stream."""

    def __init__(
        self,
        settings: Settings,
        store: EndpointStore,
        *,
        progress: Progress | None = None,
        on_applied: Callable[[Sequence[ChangeEvent]], None] | None = None,
        stages: Sequence[str] = ("capture", "apply"),
    ) -> None:
        if "apply" in stages and not settings.mappings:
            raise ConfigError("no [[mapping]] rule: say how rows become endpoints")
        self.stages = tuple(stages)
        self.settings = settings
        self.store = store
        self.progress = progress
        self.app = ensure_app(store, settings.app)
        self.stream: ChangeStream = EmbeddedStream(settings.stream_path)
        self.dlq = DeadLetterQueue(settings.dlq_path)
        self.source = open_source(settings)
        self.worker = ApplyWorker(
            self.stream,
            Mapper(settings.mappings),
            store,
            self.app.id,
            self.dlq,
            on_applied=on_applied,
        )
        self.failure: BaseException | None = None
        self.snapshot_done = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        targets = {"capture": self._capture, "apply": self._apply}
        if "capture" not in self.stages:
            self.snapshot_done.set()  # another process captures
        for name, target in ((n, targets[n]) for n in self.stages):
            thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self.source.close()
        self.stream.close()
        self.dlq.close()

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def check(self) -> None:
        """Re-raise the failure that stopped a pipeline thread, if any."""
        if self.failure is not None:
            raise self.failure

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            logger.exception("pipeline stopped thread=%s", threading.current_thread().name)
            self.failure = exc
            self._stop.set()

    def _capture(self) -> None:
        while not self._stop.is_set():
            try:
                self._capture_from_checkpoint()
                return
            except Retryable as exc:  # busy or locked: start again from the saved checkpoint
                logger.warning("capture retry reason=%s", exc)
                self.source.close()
                self._stop.wait(RETRY_SECONDS)

    def _capture_from_checkpoint(self) -> None:
        saved = self.stream.checkpoint(self.source.name)
        last = saved.state if saved else None
        self.source.open(last)
        for batch in self.source.batches(BATCH_SIZE, self.progress):
            if self._stop.is_set():
                return
            if batch.events or batch.state != last:
                self.stream.append(batch.events, Checkpoint(self.source.name, batch.state))
                self.source.acknowledge(batch.state)
                last = batch.state
            if not self.snapshot_done.is_set() and json.loads(batch.state).get("phase") == "log":
                self.snapshot_done.set()

    def _apply(self) -> None:
        while not self._stop.is_set():
            try:
                self.worker.step(BATCH_SIZE, wait=0.1)
            except (Retryable, sqlite3.OperationalError) as exc:  # locked or busy: try again
                logger.warning("apply retry reason=%s", exc)
                self._stop.wait(RETRY_SECONDS)
