"""capture -> stream -> apply, together (``optsync up`` / ``run``) or one stage per process
(``optsync capture``, ``optsync apply``).

Each stage opens only what it needs, through ``optsync.backends``: capture a source and the
stream, apply the stream, the engine store and the DLQ. Capture appends each batch to the
stream with the source checkpoint, and only then acknowledges the source; apply writes the
engine, then the DLQ, then acknowledges the stream. A failure a retry may fix (``Retryable``: a
server down, a lock) is retried with backoff, logged once per outage; one that retrying cannot
fix stops the pipeline and is re-raised by ``check``.

When one ``Pipeline`` runs both stages, capture runs in a child process (``spawn``) and apply
in a thread of this one, so the two do not take turns on one GIL: apply (decode, mapping, the
engine's SQL) is the slower stage, and capture's CPU would otherwise be taken from it
(bench/pipeline.py: about +25% changes/s on 2 cores). The child shares nothing with this process
but the files and a pipe: it sends its log records, snapshot progress, the switch to the log
and its failure; it stops when told to, or when the pipe closes because this process died.
It is not a daemonic process (a MySQL capture starts its own binlog reader process, which a
daemonic one may not): ``stop`` ends it, and so does an exit hook if this interpreter exits
without calling ``stop``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import signal
import socket
import sqlite3
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from optsync.apply.columns import check_columns
from optsync.apply.dlq import DeadLetterQueue
from optsync.apply.mapping import Mapper, MappingRule
from optsync.apply.partitioned import PartitionedApply
from optsync.apply.stage import MappingStage
from optsync.backends import mapping_rules, open_dlq, open_source, open_stream, store_settings
from optsync.capture.base import ChangeSource, Progress
from optsync.config import Settings
from optsync.engine.models import App
from optsync.engine.store import EndpointStore
from optsync.errors import ConfigError, Fatal, Retryable
from optsync.events import ChangeEvent
from optsync.retry import Backoff
from optsync.runtime import IdleCollector, tune_gc
from optsync.sinks.service import ConsentService
from optsync.stream.base import ChangeStream, Checkpoint

__all__ = ("Pipeline", "ensure_app")

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
SYNC_SECONDS = 0.05
"""How often apply makes the engine durable and acknowledges the stream (``ApplyWorker``)."""
CHILD_STOP_SECONDS = 10.0
"""How long a capture process may take to stop (finish its batch) before it is terminated."""


def ensure_app(store: EndpointStore, name: str) -> App:
    """The engine app the mapping writes into, created if missing.

    Several processes may start at once on one store (apply workers, API servers): each that
    finds no app creates one, then all of them use the oldest app of that name, and a process
    whose own app lost that race deletes it (still empty), so they never write into two apps.
    """
    found = store.find_app(name)
    if found is not None:
        return found
    created = store.create_app(name)
    oldest = store.find_app(name) or created
    if oldest.id != created.id:
        store.delete_app(created.id)
    return oldest


def _run_worker_name() -> str:
    """The apply worker's name in ``optsync run``/``up``: the same at every start on this host,
    so a run restarted after a crash takes its partitions back at once instead of waiting for
    the crashed run's leases to run out (``optsync apply`` processes get unique names)."""
    return f"{socket.gethostname()}-run"


class Pipeline:
    """The capture and apply stages, or one of them, over the configured stream.

    ``store``: the engine (needed by apply only). ``capture_process``: run capture in a child
    process (default: when both stages run here); False keeps it in a thread of this process.
    ``mapping_process``: decode and map records in a child process while the apply thread
    writes the engine (``apply.stage``; default: ``[apply] mapping_process``, else when this
    machine has two cores or more).
    """

    def __init__(
        self,
        settings: Settings,
        store: EndpointStore | None,
        *,
        progress: Progress | None = None,
        on_applied: Callable[[Sequence[ChangeEvent]], None] | None = None,
        stages: Sequence[str] = ("capture", "apply"),
        capture_process: bool | None = None,
        mapping_process: bool | None = None,
    ) -> None:
        self.stages = tuple(stages)
        if "apply" in self.stages:
            if not settings.mappings:
                raise ConfigError("no [[mapping]] rule: say how rows become endpoints")
            if store is None:
                raise ValueError("the apply stage needs an engine store")
        if "capture" in self.stages and settings.source is None:
            raise ConfigError("[source] url is missing: say which database to capture")
        self.settings = settings
        self.source_name = settings.source.source_name if settings.source else None
        """The name capture keeps its checkpoint under (None: no source configured)."""
        self.store = store
        self.progress = progress
        self.capture_process = (
            {"capture", "apply"} <= set(self.stages) if capture_process is None else capture_process
        )
        self.stream: ChangeStream = open_stream(settings)
        self.source: ChangeSource | None = None
        self.dlq: DeadLetterQueue | None = None
        self.worker: PartitionedApply | None = None
        self.stage: MappingStage | None = None
        """The mapping process (``mapping_process``)."""
        self.consent: ConsentService | None = None
        """Sinks, inbound and write-back (with the apply stage, when any is configured)."""
        try:
            if "capture" in self.stages and not self.capture_process:
                self.source = open_source(settings)
            if "apply" in self.stages:
                assert store is not None
                self.dlq = open_dlq(settings)
                self.app: App = ensure_app(store, settings.app)
                rules = mapping_rules(settings.mappings)
                if mapping_process is None:
                    mapping_process = settings.apply.mapping_process
                if mapping_process is None:
                    mapping_process = (os.cpu_count() or 1) >= 2
                if mapping_process:
                    policy = store_settings(settings).country.policy
                    self.stage = MappingStage(rules, policy)
                self.worker = PartitionedApply(
                    self.stream,
                    Mapper(rules),
                    store,
                    self.app.id,
                    self.dlq,
                    name=_run_worker_name() if "capture" in self.stages else None,
                    on_applied=on_applied,
                    sync_interval=SYNC_SECONDS,
                    stage=self.stage,
                )
                # run/up: the stable name, so a restart after a crash takes the sinks' leases
                # back at once instead of waiting for them to run out.
                consent = ConsentService(
                    settings,
                    store,
                    self.app.id,
                    holder=_run_worker_name() if "capture" in self.stages else None,
                )
                self.consent = None if consent.empty else consent
        except BaseException:
            self._close()
            raise
        self.failure: BaseException | None = None
        self.snapshot_done = threading.Event()
        self.capture_waiting: str | None = None
        """Why capture cannot read the source right now (it retries with backoff); None when
        it reads."""
        self.capture_pid: int | None = None
        """The capture process's id while it runs (None: capture runs in a thread, or not)."""
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the stages; also tunes this process's garbage collector (``optsync.runtime``)."""
        tune_gc()
        capture = self._capture_child if self.capture_process else self._capture
        targets = {"capture": capture, "apply": self._apply}
        if "capture" not in self.stages:
            self.snapshot_done.set()  # another process captures
        for name, target in ((n, targets[n]) for n in self.stages):
            thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.consent is not None:
            self.consent.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self.consent is not None:
            self.consent.stop(timeout)
        for thread in self._threads:
            thread.join(
                max(timeout, CHILD_STOP_SECONDS + 1) if thread.name == "capture" else timeout
            )
        self._close()

    def _close(self) -> None:
        if self.stage is not None:
            self.stage.close()
        if self.source is not None:
            self.source.close()
        self.stream.close()
        if self.dlq is not None:
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
        except ConfigError as exc:  # names the setting and the fix: no traceback needed
            # Not logged as an error: ``check`` re-raises it and the CLI prints it, once.
            logger.debug(
                "pipeline stopped thread=%s reason=%s", threading.current_thread().name, exc
            )
            self.failure = exc
            self._stop.set()
        except BaseException as exc:
            logger.exception("pipeline stopped thread=%s", threading.current_thread().name)
            self.failure = exc
            self._stop.set()

    def _capture(self) -> None:
        assert self.source is not None
        capture(
            self.source,
            self.stream,
            self._stop,
            self.snapshot_done.set,
            self.progress,
            mapping_rules(self.settings.mappings),
            self._note_waiting,
        )

    def _note_waiting(self, reason: str | None) -> None:
        self.capture_waiting = reason

    def _capture_child(self) -> None:
        """Capture in a child process; relays its logs, progress, snapshot switch and failure."""
        context = multiprocessing.get_context("spawn")  # fork would copy SQLite connections
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_capture_main,
            args=(self.settings, theirs, logging.getLogger().getEffectiveLevel()),
            kwargs={"progress": self.progress is not None},
            name="optsync-capture",
            # Not daemonic: a daemonic process may not start processes, and a MySQL capture
            # reads the binlog in a process of its own. So the stop at interpreter exit is ours.
            daemon=False,
        )
        process.start()
        theirs.close()
        self.capture_pid = process.pid
        stop_at_exit = functools.partial(_stop_child, ours, process)
        atexit.register(stop_at_exit)  # runs before multiprocessing's, which would join it
        try:
            self._relay(ours, process)
        finally:
            self.capture_pid = None
            atexit.unregister(stop_at_exit)
            _stop_child(ours, process)

    def _relay(self, conn: Connection, process: BaseProcess) -> None:
        while not self._stop.is_set():
            if not conn.poll(0.1):
                continue
            try:
                kind, *payload = conn.recv()
            except (EOFError, OSError):
                process.join(1.0)
                if self._stop.is_set():
                    return
                raise Fatal(
                    f"the capture process exited (code {process.exitcode}) without saying why; "
                    "its log lines above may tell; start optsync again to resume from the "
                    "saved checkpoint"
                ) from None
            if kind == "log":
                record: logging.LogRecord = payload[0]
                logging.getLogger(record.name).handle(record)
            elif kind == "progress" and self.progress is not None:
                self.progress(*payload)
            elif kind == "log-phase":
                self.snapshot_done.set()
            elif kind == "waiting":
                self.capture_waiting = payload[0]
            elif kind == "failed":
                raise payload[0]

    def _apply(self) -> None:
        worker = self.worker
        assert worker is not None
        collector = IdleCollector()
        backoff = Backoff("apply")
        while not self._stop.is_set():
            try:
                handled = worker.step(BATCH_SIZE, wait=0.1)
            except (Retryable, sqlite3.OperationalError) as exc:  # down, locked or busy
                self._stop.wait(backoff.failed(exc))
                continue
            backoff.succeeded()
            if handled == 0:
                collector.idle()
        try:
            worker.stop()
        except (Retryable, sqlite3.OperationalError) as exc:  # redelivered at the next start
            logger.warning("apply final acknowledgement failed reason=%s", exc)


def capture(
    source: ChangeSource,
    stream: ChangeStream,
    stop: threading.Event,
    on_log_phase: Callable[[], None],
    progress: Progress | None = None,
    rules: Sequence[MappingRule] = (),
    on_waiting: Callable[[str | None], None] | None = None,
) -> None:
    """Capture ``source`` into ``stream`` until ``stop``; restarts from the checkpoint on retry.

    ``on_log_phase`` is called when the snapshot is done (at every batch from then on).
    ``rules``: the mapping, when this process knows it: a rule naming a column its table lacks
    stops capture before it reads anything (``check_columns``). ``on_waiting``: called with the
    reason when the source cannot be reached (capture retries with backoff), and with None once
    it reads again.
    """
    backoff = Backoff("capture")
    while not stop.is_set():
        try:
            _capture_from_checkpoint(
                source, stream, stop, on_log_phase, progress, backoff, rules, on_waiting
            )
        except Retryable as exc:  # down, busy or locked: start again from the saved checkpoint
            source.close()
            if on_waiting is not None:
                on_waiting(str(exc))
            stop.wait(backoff.failed(exc))
            continue
        if not stop.is_set():  # a source reads until it is closed: never end quietly
            raise Fatal(
                f"capture of source {source.name!r} stopped reading without being asked to; "
                "its saved checkpoint is intact: start optsync again to resume from it"
            )
        return


def _capture_from_checkpoint(
    source: ChangeSource,
    stream: ChangeStream,
    stop: threading.Event,
    on_log_phase: Callable[[], None],
    progress: Progress | None,
    backoff: Backoff,
    rules: Sequence[MappingRule],
    on_waiting: Callable[[str | None], None] | None,
) -> None:
    saved = stream.checkpoint(source.name)
    last = saved.state if saved else None
    source.open(last)
    if on_waiting is not None and backoff.failures:
        on_waiting(None)  # the source answers again
    check_columns(rules, source.table_columns())
    in_log = False
    for batch in source.batches(BATCH_SIZE, progress):
        if stop.is_set():
            return
        if batch.events or batch.state != last:
            stream.append(batch.events, Checkpoint(source.name, batch.state))
            source.acknowledge(batch.state)
            last = batch.state
            backoff.succeeded()
        if not in_log and json.loads(batch.state).get("phase") == "log":
            in_log = True
            on_log_phase()


# -- the capture process ----------------------------------------------------------------------


class _Sender:
    """Sends messages to the parent from any thread of the child; silent once it is gone."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, *message: object) -> None:
        # OSError: the parent died or closed the pipe; the watcher stops this process.
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)

    def put_nowait(self, record: logging.LogRecord) -> None:
        """``QueueHandler``'s queue: log records go to the parent's handlers."""
        self.send("log", record)


def _capture_main(settings: Settings, conn: Connection, level: int, *, progress: bool) -> None:
    """The capture process: ``capture`` until the parent says stop or goes away."""
    # Ctrl-C, and SIGTERM sent to the whole group (systemd, docker, timeout), reach the parent
    # too, which stops us over the pipe; a parent that dies closes the pipe, which stops us too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_gc()
    sender = _Sender(conn)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(sender)]  # type: ignore[arg-type]
    root.setLevel(level)
    stop = threading.Event()
    threading.Thread(target=_watch_parent, args=(conn, stop), name="watch", daemon=True).start()
    source = open_source(settings)
    stream = open_stream(settings)
    report: Progress | None = None
    if progress:

        def report(table: str, done: int, expected: int | None) -> None:
            sender.send("progress", table, done, expected)

    try:
        capture(
            source,
            stream,
            stop,
            lambda: sender.send("log-phase"),
            report,
            mapping_rules(settings.mappings),
            lambda reason: sender.send("waiting", reason),
        )
    except ConfigError as exc:  # the parent logs it once, in one line
        sender.send("failed", _picklable(exc))
    except BaseException as exc:
        logger.exception("capture process stopped")
        sender.send("failed", _picklable(exc))
    finally:
        source.close()
        stream.close()
        conn.close()


def _watch_parent(conn: Connection, stop: threading.Event) -> None:
    """Set ``stop`` when the parent says so or dies (the pipe closes); exit if stuck after it."""
    try:
        while conn.recv() != ("stop",):
            pass
    except (EOFError, OSError):
        logger.info("capture process stopping reason=parent-gone")
    stop.set()
    threading.Event().wait(CHILD_STOP_SECONDS)
    os._exit(1)  # still here: a source call that does not return; the checkpoint is safe


def _stop_child(conn: Connection, process: BaseProcess) -> None:
    with contextlib.suppress(OSError, ValueError):  # it may be gone already
        conn.send(("stop",))
    while process.is_alive() and conn.poll(0.05):  # keep its last log lines
        try:
            kind, *payload = conn.recv()
        except (EOFError, OSError):
            break
        if kind == "log":
            record: logging.LogRecord = payload[0]
            logging.getLogger(record.name).handle(record)
    process.join(CHILD_STOP_SECONDS)
    if process.is_alive():
        logger.warning("capture process did not stop in time; terminating it")
        process.terminate()
        process.join(5)
    conn.close()


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a ``Fatal`` with its text."""
    with contextlib.suppress(Exception):  # any pickling problem: fall back to the text
        copy = pickle.loads(pickle.dumps(exc))  # noqa: S301 - our own object, just pickled
        if isinstance(copy, BaseException):
            return copy
    return Fatal(f"{type(exc).__name__}: {exc}")
