"""Scale-out: MariaDB -> ``optsync capture`` -> NATS JetStream -> N x ``optsync apply`` ->
PostgreSQL, every figure beside the embedded pipeline (``optsync run``) measured in the same run.

Private servers on free ports (``tests/servers``; never the machine's own on 3306/5432/4222):
MariaDB with ``sync_binlog=1`` and ``innodb_flush_log_at_trx_commit=1``, PostgreSQL with
``fsync=on``, nats-server with JetStream (file storage, its default ``sync_interval``). Three
layouts, each role started the way the CLI starts it, in a process of its own:

(a) ``optsync run``: one ``Pipeline`` with both stages (capture in a child process, apply in a
    thread of the main one), embedded stream, SQLite engine (bench/mysql.py's ``RunPipeline``).
    The baseline.
(b) ``optsync capture`` (``Pipeline(stages=("capture",))``) in one process, one ``optsync apply``
    (``Pipeline(stages=("apply",))``, i.e. ``PartitionedApply``) in another; NATS stream of 8
    partitions; PostgreSQL engine and dead-letter queue.
(c) the same with two apply processes sharing the partitions through leases (the run starts
    once each holds its 4).

0. Hops alone, the ceilings a missed target is blamed on. bench/mysql.py's writer commits the
   changes (transactions of 1,000 rows: 500 inserts, an UPDATE of 400, a DELETE of 100);
   ``MySQLSource`` alone reads them back from the binlog (bench/mysql.py ``capture_alone``); the
   captured changes are then written straight into each engine store, mapped batch by batch
   (not timed) and written with ``write_endpoints(durable=False)`` plus a ``sync`` every 50 ms
   of writing (timed), as apply does: SQLite in one process, PostgreSQL in one process and in
   two at once (each the changes of half the partitions; the figure is the sum of both rates).
1. Sustained changes/s for (a), (b), (c): the same writer against the running layout, from the
   first commit until every change was applied *and acknowledged*: the apply processes'
   ``on_applied`` callbacks (over a queue) count every change, then the capture checkpoint in
   the stream has passed the writer's last GTID and ``stats().pending["apply"]`` is 0. Then the
   engine must hold the expected endpoints with no dead letter. The CPU each role used (with its
   children) is shown. Target: (c) >= 0.8 x (a).
2. Commit -> applied latency at 1,000 changes/s (bench/mysql.py's paced writers: single-row
   commits from four processes, change n due at n ms, a unique ``lastupdate`` marker each) for
   (a) and (c); applied = the ``on_applied`` time in the process that applied the change.
   Split at the stream: commit -> in the stream (the record's ``appended_at``). Target p99 <=
   50 ms.
3. The stream alone: ``append`` of the captured changes in batches of 1,000, then consume (read
   + ack, every partition in turn), ``NatsStream`` (8 partitions) beside ``EmbeddedStream`` (the
   embedded layout's one partition). Target >= 50,000 events/s each way.

Targets are reported, never asserted: the script exits 0 either way. A missed target names the
hop that limits it and that hop's ceiling measured above.

    .venv/bin/python bench/cluster.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from importlib.metadata import version
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "servers"))

from mariadb_server import MariaDBServer
from nats_server import NatsServer
from nats_server import running_server as nats_server
from postgres_server import PostgresServer
from postgres_server import running_server as postgres_server

import mysql as mysql_bench
from optsync.apply.mapping import Mapper
from optsync.backends import mapping_rules, open_dlq, open_store, open_stream
from optsync.capture.mysql.position import GtidPosition
from optsync.config import Settings, SourceSettings, StreamSettings, load_settings
from optsync.engine.models import Cause, CauseKind, ChannelType
from optsync.engine.store import EndpointStore
from optsync.events import ChangeEvent
from optsync.formats import dms
from optsync.pipeline import SYNC_SECONDS, Pipeline, ensure_app
from optsync.runtime import tune_gc
from optsync.stream.base import ChangeStream, Checkpoint, partition_of
from optsync.stream.embedded import EmbeddedStream

PARTITIONS = 8
BATCH = mysql_bench.BATCH
SEED = 1_000  # users in the table before a latency run (bench/mysql.py's figure)
SOURCE = "mysql"  # the checkpoint name of a mariadb:// source (SourceSettings.source_name)
RATIO_TARGET = 0.8
P99_TARGET_MS = 50.0
STREAM_TARGET = 50_000.0
READY_SECONDS = 120.0
CLOCK = os.sysconf("SC_CLK_TCK")


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------------------------
# settings and CPU


def role_settings(
    folder: Path,
    source_url: str,
    *,
    engine_url: str | None = None,
    nats_url: str | None = None,
    name: str = "optsync",
) -> Settings:
    """What ``optsync capture`` / ``optsync apply`` read from their config file: the source,
    a NATS stream ``name`` of 8 partitions (or the embedded one), the engine (or SQLite in
    ``folder``), the sample's mapping rule."""
    folder.mkdir(parents=True, exist_ok=True)
    stream = (
        StreamSettings(url=nats_url, name=name, partitions=PARTITIONS)
        if nats_url
        else StreamSettings()
    )
    return msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=folder,
        source=SourceSettings(url=source_url, tables=("optin_status",)),
        stream=stream,
        engine_url=engine_url,
        mappings=(mysql_bench.RULE_SETTINGS,),
        serve_api=False,
    )


def cpu_seconds(pids: Sequence[int], *, tree: bool = True) -> float:
    """CPU seconds (user + system) used so far by ``pids`` (and, with ``tree``, every live
    descendant: PostgreSQL backends, the binlog reader process of a capture)."""
    children: dict[int, list[int]] = {}
    used: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        used[pid] = (int(fields[11]) + int(fields[12])) / CLOCK
    total, todo, done = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in done:
            continue
        done.add(pid)
        total += used.get(pid, 0.0)
        if tree:
            todo.extend(children.get(pid, ()))
    return total


@dataclasses.dataclass
class Servers:
    mariadb: MariaDBServer
    postgres: PostgresServer
    nats: NatsServer

    def pids(self) -> dict[str, list[int]]:
        postmaster = (self.postgres.folder / "data" / "postmaster.pid").read_text().split()[0]
        assert self.mariadb.process is not None and self.nats.process is not None
        return {
            "mariadbd": [self.mariadb.process.pid],
            "postgres": [int(postmaster)],
            "nats-server": [self.nats.process.pid],
        }


class Usage:
    """CPU cores each role used between ``__init__`` and ``stop``."""

    def __init__(self, roles: dict[str, list[int]]) -> None:
        self.roles = roles
        self.wall = time.monotonic()
        self.start = {name: self._cpu(pids) for name, pids in roles.items()}
        self.cores: dict[str, float] = {}

    @staticmethod
    def _cpu(pids: list[int]) -> float:
        # This process is counted alone: its children are the other roles.
        own = [p for p in pids if p == os.getpid()]
        return cpu_seconds(own, tree=False) + cpu_seconds([p for p in pids if p != os.getpid()])

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.wall
        self.cores = {
            name: (self._cpu(pids) - self.start[name]) / wall for name, pids in self.roles.items()
        }
        return self.cores

    def text(self) -> str:
        total = sum(self.cores.values())
        parts = ", ".join(f"{name} {cores:.2f}" for name, cores in self.cores.items())
        return f"CPU cores: {parts} (sum {total:.2f} of {os.cpu_count()})"


# --------------------------------------------------------------------------------------------
# the roles of (b) and (c), each in a process of its own


def capture_role(settings: Settings, stop: Any, results: Any) -> None:
    """``optsync capture``: the capture stage alone, source -> NATS."""
    pipeline = Pipeline(settings, None, stages=("capture",))
    pipeline.start()
    try:
        while not pipeline.snapshot_done.wait(0.1):
            pipeline.check()
        results.put(("ready", "capture", os.getpid()))
        while not stop.wait(0.1):
            pipeline.check()
    except BaseException as exc:
        results.put(("failed", "capture", f"{type(exc).__name__}: {exc}"))
    finally:
        pipeline.stop()
        results.put(("stopped", "capture"))


def apply_role(settings: Settings, index: int, track: bool, stop: Any, results: Any) -> None:
    """``optsync apply``: the apply stage alone, NATS -> PostgreSQL, reporting ``on_applied``."""
    store = open_store(settings)
    seen = mysql_bench.Seen(track=track)
    pipeline = Pipeline(settings, store, stages=("apply",), on_applied=seen.on_applied)
    pipeline.start()
    assert pipeline.worker is not None
    held: list[int] = []
    try:
        results.put(("ready", "apply", os.getpid(), index))
        while not stop.wait(0.05):
            pipeline.check()
            with contextlib.suppress(RuntimeError):  # the apply thread changed them meanwhile
                held = sorted(pipeline.worker.partitions)
            results.put(("progress", index, seen.applied, seen.last_applied, held))
    except BaseException as exc:
        results.put(("failed", f"apply {index}", f"{type(exc).__name__}: {exc}"))
    finally:
        pipeline.stop()
        stats = pipeline.worker.stats
        results.put(
            ("done", index, seen.applied, seen.last_applied, seen.applied_at,
             {"records": stats.records, "applied": stats.applied, "stale": stats.stale,
              "dead": stats.dead})
        )  # fmt: skip
        store.close()


class Cluster(mysql_bench.Applying):
    """(b)/(c): ``optsync capture`` and ``workers`` x ``optsync apply``, each a process.

    ``stream`` is this process's own ``NatsStream`` on the same stream (stats, checkpoint).
    """

    def __init__(
        self, settings: Settings, workers: int, *, track: bool = False, capture: bool = True
    ) -> None:
        self.settings = settings
        self.workers = workers
        self.with_capture = capture
        self.seen = mysql_bench.Seen()
        self.applied_at: dict[str, float] = {}
        self.worker_stats: list[dict[str, int]] = []
        self.held: list[list[int]] = [[] for _ in range(workers)]
        self.failure: str | None = None
        self.stream = open_stream(settings)  # creates the stream and its bucket once
        self.store: EndpointStore = open_store(settings)
        app = ensure_app(self.store, settings.app)
        self.store.put_channel(app.id, ChannelType.SMS, True, {})
        self.app_id = app.id
        context = multiprocessing.get_context("spawn")
        self._results: Any = context.Queue()
        self._stop = context.Event()
        self._counts = [0] * workers
        self._lasts = [0.0] * workers
        self._ready: set[str] = set()
        self._done = 0
        self._stopping = False
        # Not daemonic: the capture starts a binlog reader process of its own.
        self.capture = context.Process(
            target=capture_role, args=(settings, self._stop, self._results), daemon=False
        )
        self.appliers: list[BaseProcess] = [
            context.Process(
                target=apply_role, args=(settings, i, track, self._stop, self._results), daemon=True
            )
            for i in range(workers)
        ]
        self._follower = threading.Thread(target=self._follow, daemon=True)

    def start(self) -> None:
        self._follower.start()
        for process in self.appliers:
            process.start()
        share = PARTITIONS // self.workers
        self._wait(
            lambda: all(len(held) == share for held in self.held),
            f"the apply processes to hold {share} partitions each",
        )
        if self.with_capture:
            self.capture.start()
            self._wait(lambda: "capture" in self._ready, "the capture to finish its snapshot")

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while not condition():
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {READY_SECONDS:.0f} s")
            time.sleep(0.05)

    def _follow(self) -> None:
        while self._done < self.workers:
            message = self._results.get()
            kind = message[0]
            if kind == "progress":
                _, index, applied, last, held = message
                self._counts[index], self._lasts[index], self.held[index] = applied, last, held
                self.seen.applied = sum(self._counts)
                self.seen.last_applied = max(self._lasts)
            elif kind == "ready":
                self._ready.add(message[1] if message[1] == "capture" else f"apply {message[3]}")
            elif kind == "failed":
                self.failure = f"{message[1]} failed: {message[2]}"
            elif kind == "done":
                _, index, applied, last, applied_at, stats = message
                self._counts[index], self._lasts[index] = applied, last
                self.seen.applied = sum(self._counts)
                self.seen.last_applied = max(self._lasts)
                for marker, at in applied_at.items():
                    self.applied_at[marker] = min(at, self.applied_at.get(marker, at))
                self.worker_stats.append(stats)
                self._done += 1

    def check(self) -> None:
        if self.failure is not None:
            raise RuntimeError(self.failure)
        if self._stopping:
            return
        for process in (self.capture, *self.appliers):
            if process.pid is not None and process.exitcode is not None:
                raise RuntimeError(f"{process.name} exited with code {process.exitcode}")

    def pids(self) -> dict[str, list[int]]:
        roles = {"capture": [self.capture.pid or 0]} if self.with_capture else {}
        for i, process in enumerate(self.appliers):
            roles[f"apply {i + 1}"] = [process.pid or 0]
        return roles

    def endpoints(self) -> int:
        return self.store.count_endpoints(self.app_id)

    def dead(self) -> int:
        dlq = open_dlq(self.settings)
        try:
            return dlq.count()
        finally:
            dlq.close()

    def stop(self) -> None:
        self._stopping = True
        self._stop.set()
        for process in self.appliers:
            process.join(60)
        self._follower.join(10)
        if self.with_capture:
            self.capture.join(60)
        for process in (self.capture, *self.appliers):
            if process.pid is not None and process.is_alive():
                process.terminate()
                process.join(10)
        self.stream.close()
        self.store.close()


class Embedded(mysql_bench.RunPipeline):
    """(a): bench/mysql.py's ``RunPipeline`` (``optsync run``), with what the run loop reads."""

    @property
    def stream(self) -> ChangeStream:
        return self.pipeline.stream

    def pids(self) -> dict[str, list[int]]:
        return {"run (apply)": [os.getpid()], "capture": [self.pipeline.capture_pid or 0]}

    def endpoints(self) -> int:
        return self.store.count_endpoints(self.app_id)

    def dead(self) -> int:
        assert self.dlq is not None
        return self.dlq.count()


Layout = Cluster | Embedded


# --------------------------------------------------------------------------------------------
# 0. hops alone


def engine_role(settings: Settings, payload: list[bytes], go: Any, results: Any) -> None:
    """One engine writer alone: ``payload`` (DMS records) mapped batch by batch (not timed),
    written with ``write_endpoints(durable=False)`` and synced every ``SYNC_SECONDS`` of writing
    (timed), as the apply worker does."""
    tune_gc()
    events = [dms.decode(data) for data in payload]
    store = open_store(settings)
    app = ensure_app(store, settings.app)
    mapper = Mapper(mapping_rules(settings.mappings))
    cause = Cause(CauseKind.SOURCE, "")
    results.put(("ready",))
    go.wait()
    spent = synced = 0.0
    for i in range(0, len(events), BATCH):
        writes = [w for e in events[i : i + BATCH] for w in mapper.map(e).writes]
        began = time.perf_counter()
        store.write_endpoints(app.id, writes, cause, durable=False)
        if spent - synced >= SYNC_SECONDS or i + BATCH >= len(events):
            store.sync()
            synced = spent
        spent += time.perf_counter() - began
    results.put(("done", len(events), spent))
    store.close()


def engine_alone(settings: Settings, parts: list[list[ChangeEvent]]) -> float:
    """Changes/s of ``len(parts)`` engine writer processes at once (the sum of their rates)."""
    if settings.engine_scheme == "postgresql":  # one app for every writer, made beforehand
        store = open_store(settings)
        ensure_app(store, settings.app)
        store.close()
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    writers = []
    for part in parts:
        results = context.Queue()
        process = context.Process(
            target=engine_role, args=(settings, dms.encode_many(part), go, results), daemon=True
        )
        process.start()
        writers.append((process, results))
    for _, results in writers:
        if results.get(timeout=300) != ("ready",):
            raise RuntimeError("an engine writer did not start")
    go.set()
    rate = 0.0
    for process, results in writers:
        _, count, spent = mysql_bench.collect(process, results, timeout=1800)
        rate += count / spent
    return rate


def by_worker(events: list[ChangeEvent], workers: int) -> list[list[ChangeEvent]]:
    """The changes each of ``workers`` apply processes would get: their share of partitions."""
    parts: list[list[ChangeEvent]] = [[] for _ in range(workers)]
    for event in events:
        parts[partition_of(event.partition_key, PARTITIONS) % workers].append(event)
    return parts


# --------------------------------------------------------------------------------------------
# 1. sustained throughput


def captured_through(stream: ChangeStream, target: GtidPosition) -> bool:
    """Whether the capture checkpoint stored in ``stream`` has passed ``target``."""
    saved = stream.checkpoint(SOURCE)
    if saved is None:
        return False
    gtid = (json.loads(saved.state).get("log") or {}).get("gtid")
    return isinstance(gtid, str) and bool(gtid) and not GtidPosition.parse(gtid).behind(target)


def sustained(
    layout: Layout,
    servers: Servers,
    total: int,
    label: str,
    timeout: float,
    chunks: list[list[ChangeEvent]] | None = None,
) -> dict[str, Any]:
    """Changes/s from the first commit until every change was applied and acknowledged.

    The changes come from bench/mysql.py's writer (through capture), or with ``chunks`` from
    this process appending them to the layout's stream (apply alone; timed from the first
    append).
    """
    port = servers.mariadb.port
    usage = Usage({**layout.pids(), **servers.pids()})
    began = time.monotonic()
    if chunks is None:
        process, results = mysql_bench.spawn(mysql_bench.write_transactions, port, total)
    else:
        first = time.time()
        feeder = threading.Thread(target=append_all, args=(layout.stream, chunks), daemon=True)
        feeder.start()
    step, shown = max(1, total // 5), 0
    while layout.seen.applied < total:
        layout.check()
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"{label}: {layout.seen.applied:,} of {total:,} applied")
        if layout.seen.applied >= shown + step:
            shown = layout.seen.applied // step * step
            say(f"    {label}: {layout.seen.applied:>9,} applied after "
                f"{time.monotonic() - began:5.1f} s")  # fmt: skip
        time.sleep(0.01)
    if chunks is None:
        started, commits = mysql_bench.collect(process, results)
        first, writer = commits[0], total / (commits[-1] - started)
        target = GtidPosition.parse(mysql_bench.gtid(port))
    else:
        feeder.join()
        writer = 0.0
    while not (
        (chunks is not None or captured_through(layout.stream, target))
        and layout.stream.stats().pending.get("apply") == 0
    ):
        layout.check()
        if time.monotonic() - began > timeout:
            raise RuntimeError(f"{label}: applied, but not acknowledged in {timeout:.0f} s")
        time.sleep(0.02)
    acknowledged = time.time()
    cores = usage.stop()
    seconds = acknowledged - first
    run = {
        "changes_s": total / seconds,
        "seconds": seconds,
        "applied_changes_s": total / (layout.seen.last_applied - first),
        "writer_rows_s": writer,
        "endpoints": layout.endpoints(),
        "endpoints_expected": (total // mysql_bench.TXN_ROWS) * 400,
        "dead": layout.dead(),
        "cpu_cores": cores,
    }
    fed = f"writer {writer:,.0f} rows/s" if chunks is None else "appended by this process"
    say(f"    {label}: {run['changes_s']:,.0f} changes/s acknowledged over {seconds:.1f} s "
        f"({run['applied_changes_s']:,.0f}/s to the last on_applied); {fed}; "
        f"{run['endpoints']:,} endpoints (expected {run['endpoints_expected']:,}), "
        f"{run['dead']} dead")  # fmt: skip
    say(f"    {label}: {usage.text()}")
    if run["endpoints"] != run["endpoints_expected"] or run["dead"]:
        raise RuntimeError(f"{label}: the engine does not hold what the source holds")
    return run


def append_all(stream: ChangeStream, chunks: list[list[ChangeEvent]]) -> None:
    for i, events in enumerate(chunks):
        stream.append(events, Checkpoint("bench", json.dumps({"batch": i})))


def run_layout(
    layout: Layout,
    servers: Servers,
    total: int,
    label: str,
    timeout: float,
    chunks: list[list[ChangeEvent]] | None = None,
) -> dict[str, Any]:
    """Start ``layout``, run ``sustained`` on it, stop it whatever happens."""
    try:
        layout.start()
        if isinstance(layout, Embedded) and not layout.snapshot_done.wait(READY_SECONDS):
            layout.check()
            raise RuntimeError(f"{label}: the (empty) snapshot did not finish")
        say(f"  {label}: running")
        return sustained(layout, servers, total, label, timeout, chunks)
    finally:
        layout.stop()


# --------------------------------------------------------------------------------------------
# 2. latency


def seed_table(port: int, seed: int) -> None:
    mysql_bench.reset_table(port, mysql_bench.SAMPLE_DDL)
    with closing(mysql_bench.connect(port)) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO optin_status (userid, phone, optin) VALUES (%s, %s, 1)",
            [(f"seed{n}", mysql_bench.phone(2_000_000 + n)) for n in range(seed)],
        )


def since_commit(commits: list[float], seen: dict[str, float]) -> dict[str, float]:
    latencies = [
        (seen[mysql_bench.marker_value(n)] - commit) * 1000
        for n, commit in enumerate(commits)
        if mysql_bench.marker_value(n) in seen
    ]
    if len(latencies) < len(commits):
        raise RuntimeError(f"only {len(latencies)} of {len(commits)} paced changes arrived")
    return mysql_bench.percentiles(latencies)


def in_stream(stream: ChangeStream) -> dict[str, float]:
    """When each marker's record was appended: every partition read by a consumer of its own."""
    seen: dict[str, float] = {}
    for partition in range(stream.partitions):
        after = 0
        while records := stream.read("bench-scan", 10_000, partition=partition, after=after):
            for record in records:
                event = dms.decode(record.data)
                seen.setdefault(str(event.row.get("lastupdate")), record.appended_at)
            after = records[-1].offset
    return seen


def latency(layout: Layout, port: int, count: int) -> dict[str, Any]:
    """Paced commits against ``layout`` (started on a table of ``SEED`` users): percentiles of
    commit -> in stream, commit -> applied, and per change in stream -> applied (the apply hop).
    """
    try:
        layout.start()
        if isinstance(layout, Embedded) and not layout.snapshot_done.wait(READY_SECONDS):
            layout.check()
            raise RuntimeError("the snapshot of the seed users did not finish")
        layout.wait_applied(SEED, READY_SECONDS)
        layout.seen.track = True  # (a)'s apply thread; (c)'s processes track from the start
        time.sleep(0.5)
        commits, rate = mysql_bench.paced(port, count, SEED)
        layout.wait_applied(SEED + count, 60)
        time.sleep(0.2)  # the apply processes' last progress report
        appended = in_stream(layout.stream) if isinstance(layout, Cluster) else {}
    finally:
        layout.stop()
    if isinstance(layout, Embedded):
        appended, applied = layout.in_stream(), layout.seen.applied_at
    else:
        applied = layout.applied_at
    markers = [mysql_bench.marker_value(n) for n in range(count)]
    return {
        "in_stream": since_commit(commits, appended),
        "applied": since_commit(commits, applied),
        "apply_hop": mysql_bench.percentiles([(applied[m] - appended[m]) * 1000 for m in markers]),
        "writers_s": rate,
    }


# --------------------------------------------------------------------------------------------
# 3. the stream alone


def stream_alone(stream: ChangeStream, batches: list[list[ChangeEvent]]) -> tuple[float, float]:
    """Events/s of ``append`` (one call per batch, with a checkpoint), then of read + ack over
    every partition in turn."""
    total = sum(map(len, batches))
    began = time.perf_counter()
    for i, events in enumerate(batches):
        stream.append(events, Checkpoint("bench", json.dumps({"batch": i})))
    appended = total / (time.perf_counter() - began)
    read = 0
    began = time.perf_counter()
    for partition in range(stream.partitions):
        after = 0
        while records := stream.read("bench", BATCH, partition=partition, after=after):
            after = records[-1].offset
            stream.ack("bench", after, partition=partition)
            read += len(records)
    consumed = read / (time.perf_counter() - began)
    if read != total:
        raise RuntimeError(f"read {read:,} records of the {total:,} appended")
    return appended, consumed


# --------------------------------------------------------------------------------------------
# the run


def versions(servers: Servers) -> str:
    with closing(servers.mariadb.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        mariadb = cur.fetchone()[0]
    postgres = servers.postgres.sql("SHOW server_version")[0][0]
    nats = subprocess.run(
        [str(servers.nats.binary), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return (
        f"servers: MariaDB {mariadb} (sync_binlog=1, innodb_flush_log_at_trx_commit=1) on port "
        f"{servers.mariadb.port}, PostgreSQL {postgres} (fsync=on) on port "
        f"{servers.postgres.port}, {nats} (JetStream, file storage) on port {servers.nats.port}\n"
        f"nats-py {version('nats-py')}, psycopg {version('psycopg')}, "
        f"msgspec {version('msgspec')}"
    )


def verdict(ok: bool) -> str:
    return "pass" if ok else "MISS"


def main() -> None:
    import pipeline as pipeline_bench  # only here: spawned children need none of it

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 2 minutes")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--changes", type=int, help="changes per throughput run")
    parser.add_argument("--paced", type=int, help="paced commits per latency run (one per ms)")
    args = parser.parse_args()
    tune_gc()  # what optsync run does in its process (the apply thread of layout (a) runs here)
    changes = args.changes or (20_000 if args.quick else 200_000)
    paced = args.paced or (3_000 if args.quick else 10_000)
    timeout = 900.0
    root = Path(tempfile.mkdtemp(prefix="optsync-bench-cluster-"))
    figures: dict[str, Any] = {"quick": args.quick, "changes": changes, "paced": paced}
    began = time.time()
    say(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(began)))
    say(mysql_bench.machine(root))
    say(f"optsync source {pipeline_bench.source_fingerprint()}")
    with (
        MariaDBServer.started(durable=True) as mariadb,
        postgres_server() as postgres,
        nats_server() as nats,
    ):
        servers = Servers(mariadb, postgres, nats)
        mariadb.execute(
            "CREATE DATABASE bench",
            f"CREATE USER '{mysql_bench.USER}'@'%' IDENTIFIED BY '{mysql_bench.PASSWORD}'",
            "GRANT SELECT, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO "
            f"'{mysql_bench.USER}'@'%'",
        )
        port = mariadb.port
        url = mariadb.url(mysql_bench.USER, mysql_bench.PASSWORD, "bench")
        say(versions(servers) + "\n")

        def settings(name: str) -> Settings:
            """(b)/(c)'s settings on a fresh PostgreSQL database and NATS stream ``name``."""
            engine = postgres.create_database(name.replace("-", "_"))
            return role_settings(root / name, url, engine_url=engine, nats_url=nats.url, name=name)

        # 0. hops alone ------------------------------------------------------------------------
        say(f"0. hops alone: {changes:,} changes in transactions of {mysql_bench.TXN_ROWS:,} "
            "(500 inserts, an UPDATE of 400 rows, a DELETE of 100)")  # fmt: skip
        mysql_bench.reset_table(port, mysql_bench.SAMPLE_DDL)
        start = mysql_bench.gtid(port)
        process, results = mysql_bench.spawn(mysql_bench.write_transactions, port, changes)
        started, commits = mysql_bench.collect(process, results)
        writer = changes / (commits[-1] - started)
        say(f"  MariaDB writer alone                       {writer:>9,.0f} rows/s")
        captured, _, batches = mysql_bench.capture_alone(url, start, changes)
        events = [event for batch in batches for event in batch]
        del batches
        say(f"  MySQLSource alone (change events)          {captured:>9,.0f} events/s")
        sqlite = engine_alone(role_settings(root / "alone-sqlite", url), [events])
        say(f"  SQLite store write alone, 1 process        {sqlite:>9,.0f} changes/s")
        pg1 = engine_alone(settings("alone-pg1"), [events])
        say(f"  PostgreSQL store write alone, 1 process    {pg1:>9,.0f} changes/s")
        pg2 = engine_alone(settings("alone-pg2"), by_worker(events, 2))
        say(f"  PostgreSQL store write alone, 2 processes  {pg2:>9,.0f} changes/s (sum)\n")
        figures["alone"] = {
            "writer_rows_s": writer,
            "capture_events_s": captured,
            "sqlite_store_changes_s": sqlite,
            "postgres_store_changes_s": pg1,
            "postgres_store_2_processes_changes_s": pg2,
        }

        # 3. (measured now, on the same captured changes) the stream alone -------------------
        chunks = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
        say(f"3. the stream alone: {len(events):,} captured changes in batches of {BATCH:,}")
        embedded = EmbeddedStream(root / "alone-stream.db")
        try:
            embedded_append, embedded_read = stream_alone(embedded, chunks)
        finally:
            embedded.close()
        say(f"  EmbeddedStream (1 partition)   append {embedded_append:>9,.0f} events/s, "
            f"read + ack {embedded_read:>9,.0f} events/s")  # fmt: skip
        jetstream = open_stream(settings("alone-stream"))
        try:
            nats_append, nats_read = stream_alone(jetstream, chunks)
        finally:
            jetstream.close()
        say(f"  NatsStream ({PARTITIONS} partitions)      append {nats_append:>9,.0f} events/s, "
            f"read + ack {nats_read:>9,.0f} events/s")  # fmt: skip
        began_encode = time.perf_counter()
        dms.encode_many(events)
        encode = len(events) / (time.perf_counter() - began_encode)
        say(f"  DMS encode alone (the CPU part of append)     {encode:>9,.0f} events/s\n")
        figures["stream"] = {
            "events": len(events),
            "embedded_append_events_s": embedded_append,
            "embedded_consume_events_s": embedded_read,
            "nats_append_events_s": nats_append,
            "nats_consume_events_s": nats_read,
            "dms_encode_events_s": encode,
        }

        # the apply role(s) alone: the captured changes appended by this process ------------
        say(f"apply alone: the same {len(events):,} changes appended to NATS by this process, "
            "applied into PostgreSQL by `optsync apply` processes")  # fmt: skip
        for workers in (1, 2):
            label = f"apply alone, {workers} process{'es' if workers > 1 else ''}"
            cluster = Cluster(settings(f"apply-alone-{workers}"), workers, capture=False)
            run = run_layout(cluster, servers, len(events), label, timeout, chunks)
            figures["alone"][f"apply_{workers}_changes_s"] = run["changes_s"]
        say()
        del events, chunks

        # 1. sustained throughput ------------------------------------------------------------
        say(f"1. sustained: the same writer ({changes:,} changes) against each layout")
        runs: dict[str, dict[str, Any]] = {}
        for key, label, workers in (
            ("a", "(a) optsync run, embedded + SQLite", 0),
            ("b", "(b) NATS + PostgreSQL, 1 apply", 1),
            ("c", "(c) NATS + PostgreSQL, 2 apply", 2),
        ):
            mysql_bench.reset_table(port, mysql_bench.SAMPLE_DDL)
            layout: Layout = (
                Cluster(settings(f"tput-{key}"), workers)
                if workers
                else Embedded(root / "tput-a", url, ["optin_status"])
            )
            runs[key] = run_layout(layout, servers, changes, label, timeout)
        figures["sustained"] = runs
        say()

        # 2. latency ---------------------------------------------------------------------------
        say(f"2. commit -> applied latency: {paced:,} single-row commits, one per ms, from "
            f"{mysql_bench.WRITERS} writer processes")  # fmt: skip
        figures["latency"] = {}
        for key, label in (("a", "(a) optsync run"), ("c", "(c) 2 apply")):
            seed_table(port, SEED)
            layout = (
                Cluster(settings("lat-c"), 2, track=True)
                if key == "c"
                else Embedded(root / "latency-a", url, ["optin_status"])
            )
            run = figures["latency"][key] = latency(layout, port, paced)
            say(f"  {label}, commit -> in stream:    {mysql_bench.fmt(run['in_stream'])}")
            say(f"  {label}, commit -> applied:      {mysql_bench.fmt(run['applied'])}  "
                f"(writers {run['writers_s']:,.0f}/s)")  # fmt: skip
            say(f"  {label}, in stream -> applied:   {mysql_bench.fmt(run['apply_hop'])}")
        say()

    shutil.rmtree(root, ignore_errors=True)
    figures["seconds"] = time.time() - began
    rows = summary(figures)
    one, five, fifteen = os.getloadavg()
    say(f"summary ({figures['seconds']:.0f} s; load average {one:.2f} {five:.2f} {fifteen:.2f} "
        "at the end)")  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        say("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + ("  " + row[4] if row[4] else ""))  # fmt: skip
    figures["summary"] = [dict(zip(("figure", "value", "target", "verdict", "note"), row,
                                   strict=True)) for row in rows[1:]]  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def summary(figures: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Rows of figure, value, target, verdict, and the baseline or the limiting hop."""
    alone, stream, runs, latency = (
        figures["alone"], figures["stream"], figures["sustained"], figures["latency"]
    )  # fmt: skip
    a, b, c = (runs[k]["changes_s"] for k in "abc")
    store = (
        f"PostgreSQL store write alone: {alone['postgres_store_2_processes_changes_s']:,.0f}/s "
        f"with 2 processes, {alone['postgres_store_changes_s']:,.0f}/s with 1"
    )
    ceilings = {
        "MariaDB writer alone": alone["writer_rows_s"],
        "capture (MySQLSource) alone": alone["capture_events_s"],
        "NatsStream.append alone": stream["nats_append_events_s"],
        "NatsStream read + ack alone": stream["nats_consume_events_s"],
        "apply (NATS -> PostgreSQL) alone, 2 processes": alone["apply_2_changes_s"],
    }
    hop, ceiling = min(ceilings.items(), key=lambda item: item[1])
    limit = f"limit: {hop}: {ceiling:,.0f}/s" + (f" ({store})" if hop.startswith("apply") else "")
    cores = sum(runs["c"]["cpu_cores"].values())
    rows = [("figure", "value", "target", "verdict", "baseline (same run) / limiting hop")]
    rows.append(("sustained (a) optsync run", f"{a:,.0f} changes/s", "baseline", "-",
                 f"SQLite store write alone {alone['sqlite_store_changes_s']:,.0f}/s"))  # fmt: skip
    rows.append(("sustained (b) NATS+PG, 1 apply", f"{b:,.0f} changes/s", "-", "-",
                 f"x{b / a:.2f} of (a); apply alone, 1 process "
                 f"{alone['apply_1_changes_s']:,.0f}/s"))  # fmt: skip
    ok = c >= RATIO_TARGET * a
    rows.append(("sustained (c) NATS+PG, 2 apply", f"{c:,.0f} changes/s",
                 f">= {RATIO_TARGET} x (a)", verdict(ok),
                 f"x{c / a:.2f} of (a)" + ("" if ok else f"; {limit}; the run used "
                                            f"{cores:.2f} of {os.cpu_count()} cores")))  # fmt: skip
    for key, name in (("a", "(a) optsync run"), ("c", "(c) 2 apply")):
        applied, durable, hop = (latency[key][k] for k in ("applied", "in_stream", "apply_hop"))
        ok = applied["p99"] <= P99_TARGET_MS
        note = (
            f"p50 {applied['p50']:.1f} ms; hops' p99: commit -> in stream {durable['p99']:.1f} "
            f"ms, in stream -> applied {hop['p99']:.1f} ms"
        )
        if not ok:
            slower = "apply (in stream -> applied)" if hop["p99"] >= durable["p99"] else (
                "capture + append (commit -> in stream)"
            )  # fmt: skip
            note += f"; limit: {slower}"
        rows.append((f"p99 commit -> applied {name}", f"{applied['p99']:.1f} ms",
                     f"<= {P99_TARGET_MS:.0f} ms", verdict(ok), note))  # fmt: skip
    for what, key in (("append", "append"), ("read + ack", "consume")):
        value = stream[f"nats_{key}_events_s"]
        ok = value >= STREAM_TARGET
        note = f"EmbeddedStream {stream[f'embedded_{key}_events_s']:,.0f}/s"
        if not ok and key == "append":
            note += f"; DMS encode alone {stream['dms_encode_events_s']:,.0f}/s"
        rows.append((f"NatsStream {what}", f"{value:,.0f} events/s",
                     f">= {STREAM_TARGET:,.0f}/s", verdict(ok), note))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
