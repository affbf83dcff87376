"""MySQL/MariaDB capture: decode ceiling, capture -> applied throughput, snapshot, latency.

A private MariaDB (``tests/servers/mariadb_server.py``: free port, temporary data folder,
``sync_binlog=1``, ``innodb_flush_log_at_trx_commit=1``) is the source; the pipeline is what
``optsync run`` runs: ``optsync.pipeline.Pipeline`` with a ``mariadb://`` source (capture in a
child process, which reads the binlog in a process of its own and appends each batch with its
checkpoint to the embedded stream before acknowledging; apply in a thread of this process,
writing the SQLite engine). Writers are other processes. Every figure is printed beside a
baseline measured in the same run:

1. Decode. A writer commits N changes (200,000; --quick 20,000) to the AWS sample's
   ``optin_status`` (plus an index on userid) in transactions of 1,000 rows (500 inserts, one
   UPDATE of 400 rows, one DELETE of 100). Baseline: ``mysql-replication`` alone reading those
   rows events (``.rows`` of each), the ceiling. Then ``MySQLSource`` alone reading the same
   binlog into change events, and the share of the ceiling it keeps: after a warm-up read,
   three (raw, capture) pairs back to back (one with --quick); the share is the median of the
   pairs' ratios.
2. Capture -> applied. The same writer against the running pipeline; changes/s from the first
   commit until the apply worker's ``on_applied`` saw the last change; twice: the ``optsync
   run`` layout, and apply in a process of its own beside a capture thread (``optsync
   capture`` + ``optsync apply`` on the same stream file). Section 1 shows each hop alone:
   ``EmbeddedStream.append`` of the captured batches, and ``ApplyWorker`` draining that stream
   into a fresh engine, so the slowest hop is visible.
3. Snapshot of M rows (1,000,000; --quick 100,000), a table with a primary key. Baseline: a
   plain ``SELECT`` of the table streamed through PyMySQL. Then ``MySQLSource``'s snapshot
   alone (load events), snapshot -> stream, and the whole pipeline to applied (apply in its
   own process); the keyless sample table's single sorted pass is shown too.
4. Commit -> applied latency at 1,000 changes/s: single-row transactions (inserts and updates,
   alternating), change n due at n ms, for 10 s (--quick 3 s), from four writer processes
   (one durable commit takes about a millisecond here, so one connection cannot keep the
   pace); each writes a unique ``lastupdate``, the writers record ``time.time()`` after each
   commit. Baseline: a bare blocking ``BinLogStreamReader`` seeing the same kind of commits
   (source -> reader, the floor). The pipeline's figure is split: commit -> yielded by the
   source (only where capture runs in this process), commit -> durable in the stream (for
   ``optsync run``: the record's ``appended_at``, read from the stream file afterwards),
   commit -> applied; for the ``optsync run`` layout, then with apply in a process of its own.

Targets (>= 25,000 changes/s applied or >= 60% of the raw decode rate; snapshot >= 30,000
rows/s; p99 <= 25 ms) are reported, never asserted: the script exits 0 either way.

    .venv/bin/python bench/mysql.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec
import pymysql
import pymysql.cursors
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "servers"))
from mariadb_server import MariaDBServer

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, store_settings
from optsync.capture.mysql.source import MySQLSource
from optsync.config import MappingSettings, SourceSettings, load_settings
from optsync.engine.models import ChannelType
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent
from optsync.formats import dms
from optsync.pipeline import SYNC_SECONDS, ensure_app
from optsync.pipeline import Pipeline as OptsyncPipeline
from optsync.runtime import tune_gc
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

USER, PASSWORD = "optsync", "secret"
TXN_ROWS = 1_000
WRITERS = 4  # paced writers: one durable single-row commit takes about a millisecond here
BATCH = 1_000  # the pipeline's batch size (optsync.pipeline.BATCH_SIZE)
RULE_SETTINGS = MappingSettings(
    table="optin_status", address="phone", user_id="userid", opt_in="optin"
)
RULE = mapping_rules((RULE_SETTINGS,))[0]
THROUGHPUT_TARGET = 25_000.0
DECODE_SHARE_TARGET = 0.60
SNAPSHOT_TARGET = 30_000.0
MASS_TARGET_S = 60.0
"""A 1,000,000-row UPDATE applied completely within this many seconds of its commit."""
RSS_TARGET_MIB = 300.0
P99_TARGET_MS = 25.0
LATENCY_EPOCH = datetime(2030, 1, 1, tzinfo=UTC)
AREA_CODES = ("206", "212", "312", "415", "503", "617", "702", "808")
SAMPLE_DDL = (
    "CREATE TABLE optin_status (userid VARCHAR(64), phone VARCHAR(32), optin TINYINT(1), "
    "lastupdate TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), INDEX (userid))"
)
KEYED_DDL = (
    "CREATE TABLE optin_status (id INT AUTO_INCREMENT PRIMARY KEY, userid VARCHAR(64), "
    "phone VARCHAR(32), optin TINYINT(1), lastupdate TIMESTAMP(3) NOT NULL "
    "DEFAULT CURRENT_TIMESTAMP(3))"
)


# --------------------------------------------------------------------------------------------
# the machine, the server, the workloads


def machine(folder: Path) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    one, five, fifteen = os.getloadavg()
    return (
        f"CPU: {model}, {os.cpu_count()} cores | {platform.system()} {platform.release()}\n"
        f"Python {platform.python_version()}, PyMySQL {_version('PyMySQL')}, "
        f"mysql-replication {_version('mysql-replication')}\n"
        f"files in {folder}\n"
        f"load average {one:.2f} {five:.2f} {fifteen:.2f} (other processes skew every figure)"
    )


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def phone(n: int) -> str:
    """A distinct NANP number per n: +1 AAA EEE LLLL, possible for libphonenumber."""
    area = AREA_CODES[n % len(AREA_CODES)]
    rest = n // len(AREA_CODES)
    return f"+1{area}{200 + rest // 10_000:03d}{rest % 10_000:04d}"


def marker(n: int) -> str:
    """The unique ``lastupdate`` of the n-th paced change, as the server takes it."""
    moment = LATENCY_EPOCH + timedelta(milliseconds=n)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def marker_value(n: int) -> str:
    """``marker(n)`` as capture reports a TIMESTAMP(3) (UTC, ``...Z``)."""
    return marker(n).replace(" ", "T") + "Z"


def connect(port: int, database: str = "bench") -> pymysql.Connection[Any]:
    return pymysql.connect(
        host="127.0.0.1", port=port, user="root", database=database, autocommit=True
    )


def gtid(port: int) -> str:
    with closing(connect(port)) as conn, conn.cursor() as cur:
        cur.execute("SELECT @@gtid_binlog_pos")
        return str(cur.fetchone()[0])


def reset_table(port: int, ddl: str) -> None:
    with closing(connect(port)) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS optin_status")
        cur.execute(ddl)


def write_transactions(port: int, total: int, results: Any) -> None:
    """Commit ``total`` changes in transactions of 1,000; report start and commit times."""
    rng = random.Random(7)
    live: list[str] = []
    user = 0
    commits: list[float] = []
    conn = connect(port)
    cur = conn.cursor()
    started = time.time()
    for _ in range(total // TXN_ROWS):
        inserts = [(f"u{n}", phone(n), 1) for n in range(user, user + 500)]
        user += 500
        live.extend(row[0] for row in inserts)
        updates = rng.sample(live, 400)
        deletes = set(rng.sample(live, 100))
        live = [u for u in live if u not in deletes]
        cur.execute("BEGIN")
        cur.executemany(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, %s)", inserts
        )
        cur.execute(
            "UPDATE optin_status SET optin = 1 - optin WHERE userid IN ("
            + ",".join(["%s"] * len(updates))
            + ")",
            updates,
        )
        cur.execute(
            "DELETE FROM optin_status WHERE userid IN (" + ",".join(["%s"] * len(deletes)) + ")",
            sorted(deletes),
        )
        cur.execute("COMMIT")
        commits.append(time.time())
    conn.close()
    results.put((started, commits))


def write_paced(port: int, count: int, seed_users: int, part: int, results: Any) -> None:
    """Changes ``part``, ``part + WRITERS``, ... of ``count``, change n at ``n`` ms.

    Even changes insert user ``lat{n}``, odd ones flip the opt-in of a random user; each sets
    ``lastupdate = marker(n)``. Reports ``{n: time.time() after its commit}``.
    """
    rng = random.Random(11 + part)
    users = [f"seed{n}" for n in range(part, seed_users, WRITERS)]
    commits: dict[int, float] = {}
    conn = connect(port)
    cur = conn.cursor()
    started = time.perf_counter()
    for n in range(part, count, WRITERS):
        delay = started + n * 0.001 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if n % 2 == 0:
            cur.execute(
                "INSERT INTO optin_status (userid, phone, optin, lastupdate) "
                "VALUES (%s, %s, 1, %s)",
                (f"lat{n}", phone(1_000_000 + n), marker(n)),
            )
            users.append(f"lat{n}")
        else:
            cur.execute(
                "UPDATE optin_status SET optin = 1 - optin, lastupdate = %s WHERE userid = %s",
                (marker(n), rng.choice(users)),
            )
        commits[n] = time.time()
    conn.close()
    results.put((commits, time.perf_counter() - started))


def paced(port: int, count: int, seed_users: int) -> tuple[list[float], float]:
    """``count`` paced changes from ``WRITERS`` processes: commit times by n, and the rate."""
    writers = [spawn(write_paced, port, count, seed_users, part) for part in range(WRITERS)]
    commits: dict[int, float] = {}
    longest = 0.0
    for process, results in writers:
        part, seconds = collect(process, results)
        commits.update(part)
        longest = max(longest, seconds)
    return [commits[n] for n in range(count)], count / longest


def spawn(target: Callable[..., None], *args: object) -> tuple[BaseProcess, Any]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results), daemon=True)
    process.start()
    return process, results


def collect(process: BaseProcess, results: Any, timeout: float = 600) -> Any:
    value = results.get(timeout=timeout)
    process.join(10)
    return value


# --------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class Seen:
    """Per-marker times and counts, filled by the pipeline threads."""

    applied: int = 0
    last_applied: float = 0.0
    captured: dict[str, float] = field(default_factory=dict)
    durable: dict[str, float] = field(default_factory=dict)
    applied_at: dict[str, float] = field(default_factory=dict)
    track: bool = False

    def on_captured(self, events: Sequence[ChangeEvent]) -> None:
        self._mark(self.captured, events)

    def on_durable(self, events: Sequence[ChangeEvent]) -> None:
        self._mark(self.durable, events)

    def _mark(self, seen: dict[str, float], events: Sequence[ChangeEvent]) -> None:
        if self.track:
            now = time.time()
            for event in events:
                seen.setdefault(str(event.row.get("lastupdate")), now)

    def on_applied(self, events: Sequence[ChangeEvent]) -> None:
        now = time.time()
        self.applied += len(events)
        self.last_applied = now
        if self.track:
            for event in events:
                self.applied_at.setdefault(str(event.row.get("lastupdate")), now)


def apply_process(folder: str, stop: Any, results: Any) -> None:
    """``optsync apply`` alone: an ``ApplyWorker`` on the stream and engine in ``folder``."""
    tune_gc()
    stream = EmbeddedStream(Path(folder) / "stream.db")
    store = SQLiteStore(Path(folder) / "engine.db")
    dlq = SQLiteDeadLetterQueue(Path(folder) / "dlq.db")
    app = store.find_app("optin-demo")
    assert app is not None
    seen = Seen(track=True)
    worker = ApplyWorker(
        stream,
        Mapper([RULE]),
        store,
        app.id,
        dlq,
        on_applied=seen.on_applied,
        sync_interval=SYNC_SECONDS,
    )
    reported = 0.0
    while not stop.is_set():
        worker.step(BATCH, wait=0.05)
        if time.monotonic() - reported > 0.05:
            results.put(("progress", seen.applied, seen.last_applied))
            reported = time.monotonic()
    results.put(("done", seen.applied, seen.last_applied, seen.applied_at))
    for closable in (stream, dlq, store):
        closable.close()


class Applying:
    """A pipeline under test: ``seen`` counts what apply applied, ``check`` raises its failure."""

    seen: Seen

    def check(self) -> None:
        raise NotImplementedError

    def wait_applied(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.seen.applied < count:
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {self.seen.applied:,} of {count:,} applied in {timeout} s"
                )
            time.sleep(0.01)


class Pipeline(Applying):
    """The pipeline's pieces with ``MySQLSource``, capture as a thread of this process.

    ``split``: apply runs in a process of its own (``optsync capture`` + ``optsync apply``)
    instead of a thread beside capture (the layout before ``optsync run`` had a capture
    process; ``RunPipeline`` is that one).
    """

    def __init__(
        self, folder: Path, url: str, tables: Sequence[str], *, split: bool = False, **options: Any
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.split = split
        self.stream = EmbeddedStream(folder / "stream.db")
        self.store = SQLiteStore(folder / "engine.db")
        self.dlq = SQLiteDeadLetterQueue(folder / "dlq.db")
        app = self.store.find_app("optin-demo") or self.store.create_app("optin-demo")
        self.store.put_channel(app.id, ChannelType.SMS, True, {})
        self.app_id = app.id
        self.seen = Seen()
        self.worker = ApplyWorker(
            self.stream,
            Mapper([RULE]),
            self.store,
            app.id,
            self.dlq,
            on_applied=self.seen.on_applied,
            sync_interval=SYNC_SECONDS,
        )
        self.source = MySQLSource(url, tables, **options)
        self.snapshot_done = threading.Event()
        self.stop_event = threading.Event()
        self.failure: BaseException | None = None
        self.threads = [
            threading.Thread(target=self._guard, args=(self._capture,), daemon=True),
            threading.Thread(
                target=self._guard, args=(self._follow if split else self._apply,), daemon=True
            ),
        ]
        context = multiprocessing.get_context("spawn")
        self._stop_child = context.Event()
        self._child_results: Any = context.Queue()
        self._child: BaseProcess | None = None
        if split:
            self._child = context.Process(
                target=apply_process,
                args=(str(folder), self._stop_child, self._child_results),
                daemon=True,
            )

    def start(self) -> None:
        if self._child is not None:
            self._child.start()
        for thread in self.threads:
            thread.start()

    def _follow(self) -> None:
        """The apply process's progress reports, into ``seen``."""
        while True:
            message = self._child_results.get()
            self.seen.applied, self.seen.last_applied = message[1], message[2]
            if message[0] == "done":
                self.seen.applied_at.update(message[3])
                return

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            self.failure = exc
            self.stop_event.set()

    def _capture(self) -> None:
        saved = self.stream.checkpoint(self.source.name)
        last = saved.state if saved else None
        self.source.open(last)
        for batch in self.source.batches(BATCH):
            if self.stop_event.is_set():
                return
            self.seen.on_captured(batch.events)
            if batch.events or batch.state != last:
                self.stream.append(batch.events, Checkpoint(self.source.name, batch.state))
                self.source.acknowledge(batch.state)
                last = batch.state
                self.seen.on_durable(batch.events)
            if not self.snapshot_done.is_set() and json.loads(batch.state)["phase"] == "log":
                self.snapshot_done.set()

    def _apply(self) -> None:
        while not self.stop_event.is_set():
            self.worker.step(BATCH, wait=0.1)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        self.stop_event.set()
        self._stop_child.set()
        if self._child is not None:
            self._child.join(60)
        for thread in self.threads:
            thread.join(60)
        self.source.close()
        self.stream.close()
        self.dlq.close()
        self.store.close()


class RunPipeline(Applying):
    """``optsync.pipeline.Pipeline`` as ``optsync run`` starts it: capture in a child process
    (which starts the binlog reader process), apply in a thread of this one.

    The capture process is out of reach of ``Seen``: the time a change reached the stream is
    read afterwards from the stream file (``in_stream``).
    """

    def __init__(self, folder: Path, url: str, tables: Sequence[str]) -> None:
        settings = msgspec.structs.replace(
            load_settings(None, env={}),
            data_dir=folder,
            source=SourceSettings(url=url, tables=tuple(tables)),
            mappings=(RULE_SETTINGS,),
            serve_api=False,
        )
        self.store = SQLiteStore(settings.engine_path, store_settings(settings))
        app = ensure_app(self.store, settings.app)
        self.store.put_channel(app.id, ChannelType.SMS, True, {})
        self.app_id = app.id
        self.seen = Seen()
        self.pipeline = OptsyncPipeline(settings, self.store, on_applied=self.seen.on_applied)
        self.dlq = self.pipeline.dlq
        self.snapshot_done = self.pipeline.snapshot_done
        self.stream_path = settings.stream_path

    def start(self) -> None:
        self.pipeline.start()

    def check(self) -> None:
        self.pipeline.check()

    def stop(self) -> None:
        self.pipeline.stop()
        self.store.close()

    def in_stream(self) -> dict[str, float]:
        """When each marker's record was appended (after ``stop``)."""
        seen: dict[str, float] = {}
        with closing(sqlite3.connect(self.stream_path)) as conn:
            for data, appended_at in conn.execute("SELECT data, appended_at FROM records"):
                event = dms.decode(bytes(data))
                seen.setdefault(str(event.row.get("lastupdate")), appended_at)
        return seen


# --------------------------------------------------------------------------------------------
# 1. decode


def raw_decode(port: int, start: str, rows: int) -> float:
    """Rows/s ``mysql-replication`` alone decodes (blocking reader; stops after ``rows``)."""
    stream = BinLogStreamReader(
        connection_settings={"host": "127.0.0.1", "port": port, "user": USER, "password": PASSWORD},
        server_id=4242,
        blocking=True,
        is_mariadb=True,
        auto_position=start,
        only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent],
        only_schemas=["bench"],
        only_tables=["optin_status"],
        enable_logging=False,
    )
    seen = 0
    began = time.perf_counter()
    try:
        for event in stream:
            seen += len(event.rows)
            if seen >= rows:
                break
    finally:
        stream.close()
    return seen / (time.perf_counter() - began)


def capture_alone(url: str, start: str, count: int) -> tuple[float, float, list[list[ChangeEvent]]]:
    """Events/s ``MySQLSource`` reads from ``start`` (no stream), counted after its first
    batch; seconds from ``open`` to that batch (the reader process starting); the batches."""
    source = MySQLSource(url, ["optin_status"], name="bench-capture", idle_wait=1.0)
    opened = time.perf_counter()
    source.open(source.state_at(start))
    batches: list[list[ChangeEvent]] = []
    total = 0
    began = 0.0
    try:
        for batch in source.batches(BATCH):
            if not batch.events:
                continue
            if not batches:
                began = time.perf_counter()
            batches.append(list(batch.events))
            total += len(batch.events)
            if total >= count:
                break
    finally:
        source.close()
    rate = (total - len(batches[0])) / (time.perf_counter() - began)
    return rate, began - opened, batches


def stream_alone(folder: Path, batches: list[list[ChangeEvent]]) -> float:
    stream = EmbeddedStream(folder / "stream-alone.db")
    total = sum(map(len, batches))
    began = time.perf_counter()
    for i, events in enumerate(batches):
        stream.append(events, Checkpoint("bench", f'{{"n":{i}}}'))
    rate = total / (time.perf_counter() - began)
    stream.close()
    return rate


def apply_alone(folder: Path) -> float:
    """Records/s ``ApplyWorker`` drains from ``stream-alone.db`` into a fresh engine."""
    stream = EmbeddedStream(folder / "stream-alone.db")
    store = SQLiteStore(folder / "engine-alone.db")
    dlq = SQLiteDeadLetterQueue(folder / "dlq-alone.db")
    app = store.create_app("alone")
    worker = ApplyWorker(stream, Mapper([RULE]), store, app.id, dlq)
    total = 0
    began = time.perf_counter()
    while (done := worker.step(BATCH, wait=0.0)) > 0:
        total += done
    rate = total / (time.perf_counter() - began)
    for closable in (stream, dlq, store):
        closable.close()
    return rate


# --------------------------------------------------------------------------------------------
# 2. capture -> applied


def throughput(folder: Path, url: str, port: int, changes: int, *, split: bool) -> dict[str, Any]:
    reset_table(port, SAMPLE_DDL)
    pipeline: Pipeline | RunPipeline = (
        Pipeline(folder, url, ["optin_status"], split=True, idle_wait=0.2)
        if split
        else RunPipeline(folder, url, ["optin_status"])
    )
    pipeline.start()
    try:
        if not pipeline.snapshot_done.wait(60):
            pipeline.check()
            raise RuntimeError("the (empty) snapshot did not finish")
        cpu0, wall0 = time.process_time(), time.time()
        process, results = spawn(write_transactions, port, changes)
        pipeline.wait_applied(changes, 1800)
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
        started, commits = collect(process, results)
        seconds = pipeline.seen.last_applied - commits[0]
        endpoints = pipeline.store.count_endpoints(pipeline.app_id)
        dead = pipeline.dlq.count()
    finally:
        pipeline.stop()
    return {
        "applied_changes_s": changes / seconds,
        "seconds": seconds,
        "writer_rows_s": changes / (commits[-1] - started),
        "cpu_cores": cpu / wall,
        "endpoints": endpoints,
        "endpoints_expected": (changes // TXN_ROWS) * 400,
        "dead": dead,
    }


# --------------------------------------------------------------------------------------------
# 3. snapshot


def fill(port: int, rows: int, ddl: str) -> None:
    """``rows`` opted-in users, written with INSERT ... SELECT from MariaDB's sequence engine."""
    reset_table(port, ddl)
    with closing(connect(port)) as conn, conn.cursor() as cur:
        step = 100_000
        for low in range(0, rows, step):
            high = min(rows, low + step) - 1
            cur.execute(
                "INSERT INTO optin_status (userid, phone, optin) SELECT CONCAT('s', seq), "
                "CONCAT('+1206', LPAD(200 + seq DIV 10000, 3, '0'), LPAD(seq MOD 10000, 4, '0')), "
                f"1 FROM seq_{low}_to_{high}"
            )


def raw_select(port: int) -> float:
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user=USER, password=PASSWORD, database="bench",
        cursorclass=pymysql.cursors.SSCursor,
    )  # fmt: skip
    rows = 0
    began = time.perf_counter()
    with closing(conn), conn.cursor() as cur:
        cur.execute("SELECT * FROM optin_status")
        while chunk := cur.fetchmany(BATCH):
            rows += len(chunk)
    return rows / (time.perf_counter() - began)


def snapshot_alone(url: str, rows: int, folder: Path | None) -> float:
    """Rows/s of ``MySQLSource``'s snapshot alone (and appended to a stream, with ``folder``)."""
    source = MySQLSource(url, ["optin_status"], name="bench-snapshot", idle_wait=1.0)
    stream = EmbeddedStream(folder / "snapshot.db") if folder else None
    source.open(None)
    seen = 0
    began = time.perf_counter()
    try:
        for batch in source.batches(BATCH):
            if stream is not None:
                stream.append(batch.events, Checkpoint("bench", batch.state))
            seen += len(batch.events)
            if json.loads(batch.state)["phase"] == "log":
                break
    finally:
        source.close()
        if stream is not None:
            stream.close()
    if seen != rows:
        raise RuntimeError(f"snapshot read {seen:,} rows of {rows:,}")
    return seen / (time.perf_counter() - began)


# --------------------------------------------------------------------------------------------
# 3b. a mass opt-out: one UPDATE of every row, in one transaction


def _rss_kib(pid: int) -> int:
    """Resident memory of one process (``VmRSS``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _family(pid: int) -> list[int]:
    """``pid`` and every process below it (the capture, binlog-reader and mapping children)."""
    found = [pid]
    for each in found:
        for task in Path(f"/proc/{each}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                found.extend(int(child) for child in task.read_text().split())
    return found


class RssPeak:
    """Samples the summed RSS of this process and its children every 0.2 s, in a thread."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self.peak_parts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            parts = {}
            for pid in _family(os.getpid()):
                with contextlib.suppress(OSError):
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    if name.startswith("python"):  # not the MariaDB server this script started
                        parts[f"{name}:{pid}"] = _rss_kib(pid)
            total = sum(parts.values())
            if total > self.peak_kib:
                self.peak_kib, self.peak_parts = total, parts

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mass_opt_out(folder: Path, url: str, port: int, rows: int) -> dict[str, Any]:
    """``rows`` users snapshotted and applied by the ``optsync run`` layout, then one UPDATE
    opting every one of them out, in one transaction: seconds from its commit until the last
    change is applied, and the peak RSS of the pipeline's processes (this one included)."""
    fill(port, rows, KEYED_DDL)
    before_kib = _rss_kib(os.getpid())  # what this script held before the pipeline started
    run = RunPipeline(folder, url, ["optin_status"])
    began = time.time()
    run.start()
    try:
        run.wait_applied(rows, 3600)
        snapshot_s = run.seen.last_applied - began
        with RssPeak() as rss:
            with closing(connect(port)) as conn, conn.cursor() as cur:
                cur.execute("UPDATE optin_status SET optin = 0")
                conn.commit()
                committed = time.time()
            deadline = time.monotonic() + 3600
            shown = time.monotonic()
            while run.seen.applied < 2 * rows:
                run.check()
                if time.monotonic() - shown >= 5:
                    shown = time.monotonic()
                    done = run.seen.applied - rows
                    print(f"    {time.time() - committed:5.1f} s after the commit: "
                          f"{done:,} of {rows:,} applied", flush=True)  # fmt: skip
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {run.seen.applied - rows:,} of {rows:,} applied")
                time.sleep(0.05)
            applied_s = run.seen.last_applied - committed
        with run.store._read() as cur:  # a bench reads the rollup directly
            counts = dict(
                cur.execute(
                    "SELECT opt_out, SUM(n) FROM endpoint_counts WHERE app_id = ? GROUP BY 1",
                    (run.app_id,),
                ).fetchall()
            )
    finally:
        run.stop()
    with closing(sqlite3.connect(run.stream_path)) as conn:
        (in_stream,) = conn.execute("SELECT max(appended_at) FROM records").fetchone()
    if counts.get("ALL") != rows or counts.get("NONE", 0) != 0:
        raise RuntimeError(f"after the mass opt-out the engine holds {counts}")
    return {
        "rows": rows,
        "snapshot_applied_rows_s": rows / snapshot_s,
        "commit_to_all_applied_s": applied_s,
        "commit_to_all_in_stream_s": in_stream - committed,
        "applied_changes_s": rows / applied_s,
        "peak_rss_mib": rss.peak_kib / 1024,
        "bench_rss_before_mib": before_kib / 1024,
        "peak_rss_parts_mib": {k: v / 1024 for k, v in rss.peak_parts.items()},
    }


# --------------------------------------------------------------------------------------------
# 4. latency


def percentiles(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50": statistics.median(ordered),
        "p95": at(0.95),
        "p99": at(0.99),
        "p99.9": at(0.999),
        "max": ordered[-1],
    }


def raw_latency(port: int, count: int, seed: int) -> tuple[dict[str, float], float]:
    """Commit -> a bare blocking ``BinLogStreamReader`` (connected and warm first)."""
    arrivals: dict[str, float] = {}
    done = threading.Event()
    connections: list[pymysql.Connection[Any]] = []

    def factory(**settings: Any) -> pymysql.Connection[Any]:
        if done.is_set():
            raise EOFError("stopped")  # no reconnect after the run
        settings["database"] = settings.pop("db", None)
        conn = pymysql.connect(**settings)
        connections.append(conn)
        return conn

    stream = BinLogStreamReader(
        connection_settings={"host": "127.0.0.1", "port": port, "user": USER, "password": PASSWORD},
        server_id=4343,
        blocking=True,
        is_mariadb=True,
        auto_position=gtid(port),
        only_events=[WriteRowsEvent, UpdateRowsEvent],
        only_schemas=["bench"],
        only_tables=["optin_status"],
        enable_logging=False,
        pymysql_wrapper=factory,
    )

    def read() -> None:
        try:
            for event in stream:
                now = time.time()
                for row in event.rows:
                    values = row.get("after_values") or row.get("values") or {}
                    moment = values.get("lastupdate")
                    if moment is not None:
                        arrivals.setdefault(moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3], now)
        except (EOFError, pymysql.err.MySQLError, OSError):
            return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)  # connected and idle before the first commit
    commits, rate = paced(port, count, seed)
    time.sleep(0.5)
    done.set()
    for conn in connections:  # unblock the reader; closing under its read would deadlock
        conn._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    reader.join(10)
    for conn in connections:
        with contextlib.suppress(Exception):
            conn.close()
    latencies = [
        (arrivals[marker(n)] - commits[n]) * 1000 for n in range(count) if marker(n) in arrivals
    ]
    if len(latencies) < count * 0.99:
        raise RuntimeError(f"the raw reader saw {len(latencies)} of {count} commits")
    return percentiles(latencies), rate


def pipeline_latency(
    folder: Path, url: str, port: int, count: int, seed: int, *, split: bool
) -> tuple[dict[str, float] | None, dict[str, float], dict[str, float], float]:
    reset_table(port, SAMPLE_DDL)
    with closing(connect(port)) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, 1)",
            [(f"seed{n}", phone(2_000_000 + n)) for n in range(seed)],
        )
    pipeline: Pipeline | RunPipeline = (
        Pipeline(folder, url, ["optin_status"], split=True, idle_wait=0.2)
        if split
        else RunPipeline(folder, url, ["optin_status"])
    )
    pipeline.start()
    try:
        if not pipeline.snapshot_done.wait(120):
            pipeline.check()
            raise RuntimeError("no snapshot in 120 s")
        pipeline.wait_applied(seed, 120)
        pipeline.seen.track = True
        time.sleep(0.5)
        commits, rate = paced(port, count, seed)
        pipeline.wait_applied(seed + count, 60)
        time.sleep(0.2)  # the apply process's last progress report
    finally:
        pipeline.stop()

    def since_commit(seen: dict[str, float]) -> dict[str, float]:
        latencies = [
            (seen[marker_value(n)] - commits[n]) * 1000
            for n in range(count)
            if marker_value(n) in seen
        ]
        if len(latencies) < count:
            raise RuntimeError(f"only {len(latencies)} of {count} paced changes arrived")
        return percentiles(latencies)

    seen = pipeline.seen
    if isinstance(pipeline, RunPipeline):  # capture runs in its own process: no "captured"
        return None, since_commit(pipeline.in_stream()), since_commit(seen.applied_at), rate
    return (
        since_commit(seen.captured),
        since_commit(seen.durable),
        since_commit(seen.applied_at),
        rate,
    )


# --------------------------------------------------------------------------------------------
# the run


def fmt(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:7.2f}" for k, v in stats.items()) + " ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the work")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    tune_gc()  # what optsync run and optsync apply do in their processes
    changes = 20_000 if args.quick else 200_000
    snapshot_rows = 100_000 if args.quick else 1_000_000
    paced = 3_000 if args.quick else 10_000
    root = Path(tempfile.mkdtemp(prefix="optsync-bench-mysql-"))
    figures: dict[str, Any] = {"quick": args.quick}
    print(machine(root))
    with MariaDBServer.started(durable=True) as server:
        server.execute(
            "CREATE DATABASE bench",
            f"CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'",
            f"GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO '{USER}'@'%'",
        )
        port = server.port
        url = server.url(USER, PASSWORD, "bench")
        with closing(server.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            version = cur.fetchone()[0]
        print(
            f"source: MariaDB {version}, sync_binlog=1, innodb_flush_log_at_trx_commit=1, "
            "binlog_format=ROW, binlog_row_image=FULL, binlog_row_metadata=FULL\n"
        )

        # 1. decode ---------------------------------------------------------------------------
        print(f"1. decode: {changes:,} changes in transactions of {TXN_ROWS:,} "
              "(500 inserts, an UPDATE of 400 rows, a DELETE of 100)")  # fmt: skip
        reset_table(port, SAMPLE_DDL)
        start = gtid(port)
        process, results = spawn(write_transactions, port, changes)
        started, commits = collect(process, results)
        writer = changes / (commits[-1] - started)
        # A warm-up read, then pairs (raw, capture) back to back: both figures swing with the
        # machine's load and warm up over the first runs, so the share is the median of the
        # pairs' ratios, not a ratio of two bests.
        raw_decode(port, start, changes)
        raws: list[float] = []
        runs: list[tuple[float, float, list[list[ChangeEvent]]]] = []
        for _ in range(1 if args.quick else 3):
            raws.append(raw_decode(port, start, changes))
            runs.append(capture_alone(url, start, changes))
        shares = [run[0] / r for r, run in zip(raws, runs, strict=True)]
        share_of_raw = statistics.median(shares)
        raw = max(raws)
        captured, startup, batches = max(runs, key=lambda run: run[0])
        del runs
        print(f"  writer                                   {writer:>9,.0f} rows/s")
        print(f"  mysql-replication alone (the ceiling)    {raw:>9,.0f} rows/s "
              f"(runs: {', '.join(f'{r:,.0f}' for r in raws)})")  # fmt: skip
        print(f"  MySQLSource alone (change events)        {captured:>9,.0f} events/s "
              f"(pairs: {', '.join(f'{x:.0%}' for x in shares)} of the ceiling; first batch "
              f"after {startup:.2f} s)")  # fmt: skip
        appended = stream_alone(root, batches)
        applied_alone = apply_alone(root)
        print(f"  EmbeddedStream.append of those batches   {appended:>9,.0f} events/s")
        print(f"  ApplyWorker draining them (engine)       {applied_alone:>9,.0f} records/s\n")
        figures["decode"] = {
            "writer_rows_s": writer,
            "raw_rows_s": raw,
            "raw_runs": raws,
            "capture_events_s": captured,
            "capture_startup_s": startup,
            "capture_share": share_of_raw,
            "capture_shares": shares,
            "stream_append_events_s": appended,
            "apply_records_s": applied_alone,
        }
        del batches

        # 2. capture -> applied ---------------------------------------------------------------
        print(f"2. capture -> applied: the same {changes:,} changes against the running pipeline")
        for split in (False, True):
            run = throughput(root / f"throughput-{split}", url, port, changes, split=split)
            where = "apply in its own process" if split else "optsync run layout"
            print(f"  {where + ':':<26} {run['applied_changes_s']:>7,.0f} changes/s over "
                  f"{run['seconds']:.1f} s, first commit -> last change applied")  # fmt: skip
            print(f"  {'':<26} writer meanwhile {run['writer_rows_s']:,.0f} rows/s; pipeline "
                  f"process CPU {run['cpu_cores']:.2f} cores; {run['endpoints']:,} endpoints "
                  f"(expected {run['endpoints_expected']:,}), {run['dead']} dead")  # fmt: skip
            figures["throughput-split" if split else "throughput"] = run
        print()
        best_rate = max(figures["throughput"]["applied_changes_s"],
                        figures["throughput-split"]["applied_changes_s"])  # fmt: skip

        # 3. snapshot -------------------------------------------------------------------------
        print(f"3. snapshot of {snapshot_rows:,} rows (primary key; keyless shown too)")
        fill(port, snapshot_rows, KEYED_DDL)
        select = raw_select(port)
        alone = snapshot_alone(url, snapshot_rows, None)
        streamed = snapshot_alone(url, snapshot_rows, root / "snap")
        pipeline = Pipeline(root / "snapshot", url, ["optin_status"], split=True, idle_wait=0.2)
        began = time.time()
        pipeline.start()
        try:
            pipeline.wait_applied(snapshot_rows, 3600)
            snapshot_applied = snapshot_rows / (pipeline.seen.last_applied - began)
        finally:
            pipeline.stop()
        fill(port, snapshot_rows, SAMPLE_DDL)
        keyless = snapshot_alone(url, snapshot_rows, None)
        print(f"  SELECT * through PyMySQL (the ceiling)   {select:>9,.0f} rows/s")
        print(f"  MySQLSource snapshot alone               {alone:>9,.0f} rows/s "
              f"({alone / select:.0%} of the ceiling)")  # fmt: skip
        print(f"  snapshot -> EmbeddedStream               {streamed:>9,.0f} rows/s")
        print(f"  snapshot -> applied (apply process)      {snapshot_applied:>9,.0f} rows/s")
        print(f"  keyless table, snapshot alone            {keyless:>9,.0f} rows/s\n")
        figures["snapshot"] = {
            "rows": snapshot_rows,
            "select_rows_s": select,
            "capture_rows_s": alone,
            "to_stream_rows_s": streamed,
            "applied_rows_s": snapshot_applied,
            "keyless_capture_rows_s": keyless,
        }

        # 3b. mass opt-out -----------------------------------------------------------------
        print(f"3b. mass opt-out: {snapshot_rows:,} rows snapshotted by the optsync run layout, "
              "then one UPDATE of all of them in one transaction")  # fmt: skip
        mass = mass_opt_out(root / "mass", url, port, snapshot_rows)
        print(
            "  snapshot -> applied (optsync run)        "
            f" {mass['snapshot_applied_rows_s']:>9,.0f} rows/s"
        )
        print(
            "  UPDATE commit -> last change applied     "
            f" {mass['commit_to_all_applied_s']:>9.1f} s "
            f"({mass['applied_changes_s']:,.0f} changes/s; all in the stream after "
            f"{mass['commit_to_all_in_stream_s']:.1f} s)"
        )
        print(
            f"  peak RSS, the pipeline's processes        {mass['peak_rss_mib']:>9,.0f} MiB "
            f"({', '.join(f'{k} {v:,.0f}' for k, v in mass['peak_rss_parts_mib'].items())}; "
            f"this script's own process held {mass['bench_rss_before_mib']:,.0f} MiB before "
            "the pipeline started)\n"
        )
        figures["mass_opt_out"] = mass

        # 4. latency --------------------------------------------------------------------------
        seed = 1_000
        print(f"4. commit -> applied latency, {paced:,} single-row commits, one per ms")
        reset_table(port, SAMPLE_DDL)
        with closing(connect(port)) as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, 1)",
                [(f"seed{n}", phone(2_000_000 + n)) for n in range(seed)],
            )
        raw_stats, raw_rate = raw_latency(port, paced, seed)
        print(f"  raw reader, commit -> event:     {fmt(raw_stats)}  (writers {raw_rate:,.0f}/s)")
        for split in (False, True):
            caught, durable, applied, rate = pipeline_latency(
                root / f"latency-{split}", url, port, paced, seed, split=split
            )
            where = "apply process" if split else "optsync run"
            if caught is not None:
                print(f"  {where}, commit -> captured:  {fmt(caught)}")
            print(f"  {where}, commit -> in stream: {fmt(durable)}")
            print(f"  {where}, commit -> applied:   {fmt(applied)}  (writers {rate:,.0f}/s)")
            figures["latency-split" if split else "latency"] = {
                "raw": raw_stats,
                "captured": caught,
                "durable": durable,
                "applied": applied,
            }
        print()
        best = min((figures[k] for k in ("latency", "latency-split")),
                   key=lambda f: f["applied"]["p99"])  # fmt: skip
        durable, applied = best["durable"], best["applied"]
        caught = figures["latency-split"]["captured"]  # only there: capture runs in this process

    shutil.rmtree(root, ignore_errors=True)
    share = best_rate / raw
    rows = [
        ("capture -> applied", f"{best_rate:,.0f} changes/s",
         f">= {THROUGHPUT_TARGET:,.0f}/s or >= {DECODE_SHARE_TARGET:.0%} of raw",
         best_rate >= THROUGHPUT_TARGET or share >= DECODE_SHARE_TARGET,
         f"raw decode {raw:,.0f}/s ({share:.0%})"),
        ("capture alone", f"{captured:,.0f} events/s", f">= {DECODE_SHARE_TARGET:.0%} of raw",
         share_of_raw >= DECODE_SHARE_TARGET,
         f"raw decode {raw:,.0f}/s (median pair {share_of_raw:.0%})"),
        ("snapshot (capture)", f"{alone:,.0f} rows/s", f">= {SNAPSHOT_TARGET:,.0f}/s",
         alone >= SNAPSHOT_TARGET, f"SELECT {select:,.0f}/s"),
        ("snapshot -> applied", f"{snapshot_applied:,.0f} rows/s", f">= {SNAPSHOT_TARGET:,.0f}/s",
         snapshot_applied >= SNAPSHOT_TARGET, f"SELECT {select:,.0f}/s"),
        ("snapshot -> applied (run)", f"{mass['snapshot_applied_rows_s']:,.0f} rows/s",
         f">= {SNAPSHOT_TARGET:,.0f}/s", mass["snapshot_applied_rows_s"] >= SNAPSHOT_TARGET,
         f"SELECT {select:,.0f}/s"),
        (f"mass opt-out, {mass['rows']:,}", f"{mass['commit_to_all_applied_s']:.1f} s",
         f"<= {MASS_TARGET_S:.0f} s", mass["commit_to_all_applied_s"] <= MASS_TARGET_S,
         f"{mass['applied_changes_s']:,.0f} changes/s"),
        ("peak RSS, mass opt-out", f"{mass['peak_rss_mib']:,.0f} MiB",
         f"<= {RSS_TARGET_MIB:.0f} MiB", mass["peak_rss_mib"] <= RSS_TARGET_MIB, "-"),
        ("p99 commit -> applied", f"{applied['p99']:.2f} ms", f"<= {P99_TARGET_MS:.0f} ms",
         applied["p99"] <= P99_TARGET_MS, f"raw reader p99 {raw_stats['p99']:.2f} ms"),
        ("p99 commit -> in stream", f"{durable['p99']:.2f} ms", f"<= {P99_TARGET_MS:.0f} ms",
         durable["p99"] <= P99_TARGET_MS, f"raw reader p99 {raw_stats['p99']:.2f} ms"),
        ("p99 commit -> captured*", f"{caught['p99']:.2f} ms", f"<= {P99_TARGET_MS:.0f} ms",
         caught["p99"] <= P99_TARGET_MS, f"raw reader p99 {raw_stats['p99']:.2f} ms"),
    ]  # fmt: skip
    one, five, fifteen = os.getloadavg()
    print(f"summary (load average {one:.2f} {five:.2f} {fifteen:.2f} at the end)")
    print(f"  {'figure':<24} {'value':<20} {'target':<34} {'result':<6} baseline (same run)")
    for name, value, target, ok, baseline in rows:
        print(f"  {name:<24} {value:<20} {target:<34} {'ok' if ok else 'MISS':<6} {baseline}")
    print("  (p99 rows: the layout with the lower p99 applied; * the apply-process layout's)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
