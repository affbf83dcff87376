"""Embedded pipeline: SQLite source -> capture -> embedded stream -> apply -> SQLite engine.

The application writing the source is another process; the pipeline (``optsync.pipeline.Pipeline``,
as ``optsync run`` starts it: capture in a child process, apply in a thread of this one, over
``DATA_DIR/stream.db``) runs in this one; every stream append is durable before the source is
acknowledged, and apply makes the engine durable before it acknowledges the stream (every 50 ms,
``ApplyWorker.sync_interval``). Every figure is printed beside a baseline measured in the same
run:

1. Sustained throughput. A writer process commits N row changes (200,000; --quick 20,000) to the
   AWS sample's ``optin_status`` (plus an index on userid) in transactions of 1,000 rows: 50%
   inserts of new users, 40% updates flipping ``optin``, 10% deletes. The figure is changes/s
   from the first commit until the apply worker's ``on_applied`` saw the last change. Ceilings,
   each alone with the same rows: (a) the writer on a table without capture triggers,
   (b) ``SQLiteStore.write_endpoints`` with the mapped writes, 1,000 events per transaction
   (each batch mapped just before, untimed; commits and syncs as ``ApplyWorker`` makes them),
   (c) ``EmbeddedStream.append`` of the captured events, 1,000 per append; the ratio is against
   the slowest of the three. Shown too, without a ratio: the writer with the capture triggers,
   capture alone reading the backlog, and ``ApplyWorker`` alone draining the stream.
2. Commit -> applied latency at 1,000 changes/s: single-row transactions (inserts and updates,
   alternating) one per ms for 10 s (--quick 3 s). Every change writes a unique ``lastupdate``;
   the writer records ``time.time()`` right after each commit, ``on_applied`` when the event was
   applied. Baseline: the same writer on a database without triggers, and another connection
   busy-polling ``PRAGMA data_version`` (the floor of cross-connection detection in SQLite).

Targets (G1 >= 25,000 changes/s; G2 p50 <= 5 ms, p99 <= 25 ms) are reported, never asserted:
the script exits 0 either way.

    .venv/bin/python bench/pipeline.py [--quick] [--json out.json] [--dir /mnt/disk] [--budget 300]
    .venv/bin/python bench/pipeline.py --profile [--quick]   # cProfile of the pipeline threads
    .venv/bin/python bench/pipeline.py --capture-thread ...  # capture in a thread, not a process
    .venv/bin/python bench/pipeline.py --stages [--quick]    # CPU us per change of each hop

``--stages`` times each non-engine step alone on the same workload, in CPU time of the thread
doing it (median of 3 where the step can be repeated): capture reading the backlog (with its
acknowledgements), DMS encode, stream append (encode included), stream read + ack, DMS decode,
mapping (phone-number cache cold, then warm) and ``ApplyWorker`` with an engine that does
nothing (read, decode, mapping, DLQ, ack, stats).

``Pipeline`` runs capture in a child process; ``--capture-thread`` runs it in a thread of this
process instead (the layout before), to compare the two. CPU figures count the capture process
too: "cores" is (this process + capture process CPU seconds) / wall seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import hashlib
import io
import json
import multiprocessing
import os
import platform
import pstats
import queue
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec

import optsync
from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.partitioned import PartitionedApply
from optsync.apply.stage import MappingStage
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, store_settings
from optsync.capture.sqlite.source import CHANGE_TABLE, SQLiteSource
from optsync.cli import SAMPLE_RULE
from optsync.config import Settings, SourceSettings, load_settings
from optsync.engine import phone as phone_numbers
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    WriteResult,
)
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent
from optsync.formats import dms
from optsync.pipeline import BATCH_SIZE, SYNC_SECONDS, Pipeline, ensure_app
from optsync.runtime import tune_gc
from optsync.sample import SAMPLE_DDL, SAMPLE_TABLE
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

TXN_ROWS = 1_000
THROUGHPUT_TARGET = 25_000.0  # changes/s, G1 (batched source writes, embedded stream)
P50_TARGET_MS = 5.0  # G2 at 1k changes/s
P99_TARGET_MS = 25.0
ENGINE_TARGET = 40_000.0  # pipeline-shaped writes/s, the engine alone (issue 17)
CORES_TARGET = 1.5  # cores the pipeline uses at full throughput (issue 17)
LATENCY_SEED_USERS = 1_000
STALL_SECONDS = 60.0
AREA_CODES = ("206", "212", "312", "415", "503", "617", "702", "808")
LATENCY_EPOCH = datetime(2030, 1, 1, tzinfo=UTC)

USERID_INDEX = "CREATE INDEX optin_status_userid ON optin_status (userid)"
INSERT = "INSERT INTO optin_status (userid, phone, optin) VALUES (?, ?, ?)"
UPDATE = (
    "UPDATE optin_status SET optin = 1 - optin, "
    "lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE userid = ?"
)
DELETE = "DELETE FROM optin_status WHERE userid = ?"
PACED_INSERT = "INSERT INTO optin_status (userid, phone, optin, lastupdate) VALUES (?, ?, 1, ?)"
PACED_UPDATE = "UPDATE optin_status SET optin = 1 - optin, lastupdate = ? WHERE userid = ?"

Txn = tuple[list[tuple[str, str, int]], list[tuple[str]], list[tuple[str]]]
"""One source transaction: insert rows, userids to update, userids to delete."""


# --------------------------------------------------------------------------------------------
# the machine and the source


def machine(folder: Path) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    filesystem = "?"
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
        resolved = str(folder.resolve())
        best = max(
            (m for m in mounts if resolved.startswith(m[1].rstrip("/") + "/") or resolved == m[1]),
            key=lambda m: len(m[1]),
        )
        filesystem = f"{best[2]} on {best[0]}"
    except (OSError, ValueError):
        pass
    return (
        f"CPU: {model}, {os.cpu_count()} cores | {platform.system()} {platform.release()}\n"
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}\n"
        f"files in {folder} ({filesystem})\n"
        f"optsync source {source_fingerprint()}\n"
        f"{load()} (other processes on these cores skew every figure)"
    )


def source_fingerprint() -> str:
    """A digest of the optsync modules this run imported, and when they last changed."""
    package = Path(optsync.__file__).parent
    files = sorted(package.rglob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    newest = max(path.stat().st_mtime for path in files)
    changed = datetime.fromtimestamp(newest, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"sha256 {digest.hexdigest()[:12]} (newest file {changed})"


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def phone(n: int) -> str:
    """A distinct NANP number per n: +1 AAA EEE LLLL, possible for libphonenumber."""
    area = AREA_CODES[n % len(AREA_CODES)]
    rest = n // len(AREA_CODES)
    return f"+1{area}{200 + rest // 10_000:03d}{rest % 10_000:04d}"


def marker(n: int) -> str:
    """The unique ``lastupdate`` of the n-th paced change (an ISO-8601 instant)."""
    moment = LATENCY_EPOCH + timedelta(milliseconds=n)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def connect_source(path: str | Path) -> sqlite3.Connection:
    """The application's own connection: autocommit, WAL, durable commits."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def create_source(path: Path, seed_users: int = 0, *, lastupdate_index: bool = False) -> None:
    """``optin_status`` (the sample's DDL) with an index on userid, and ``seed_users`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = connect_source(path)
    try:
        conn.execute(SAMPLE_DDL)
        conn.execute(USERID_INDEX)
        if lastupdate_index:
            conn.execute("CREATE INDEX optin_status_lastupdate ON optin_status (lastupdate)")
        with conn:
            conn.execute("BEGIN")
            conn.executemany(INSERT, [(f"seed{n}", phone(n), 1) for n in range(seed_users)])
    finally:
        conn.close()


def workload(total: int, seed: int = 7) -> list[Txn]:
    """``total`` changes in transactions of 1,000: 50% inserts, 40% updates, 10% deletes."""
    rng = random.Random(seed)
    n_insert, n_delete = TXN_ROWS // 2, TXN_ROWS // 10
    n_update = TXN_ROWS - n_insert - n_delete
    live: list[str] = []
    user = 0
    txns: list[Txn] = []
    for _ in range(total // TXN_ROWS):
        inserts = [(f"u{n}", phone(n), 1) for n in range(user, user + n_insert)]
        user += n_insert
        live.extend(row[0] for row in inserts)
        updates = [(live[i],) for i in rng.sample(range(len(live)), n_update)]
        deletes: list[tuple[str]] = []
        for i in sorted(rng.sample(range(len(live)), n_delete), reverse=True):
            deletes.append((live[i],))
            live[i] = live[-1]
            live.pop()
        txns.append((inserts, updates, deletes))
    return txns


def live_users(total: int) -> int:
    """Rows left in the source after ``workload(total)``: endpoints the engine should hold."""
    return (total // TXN_ROWS) * (TXN_ROWS // 2 - TXN_ROWS // 10)


# --------------------------------------------------------------------------------------------
# writer processes (spawned: they share nothing with the pipeline but the database file)


def write_transactions(path: str, total: int, results: multiprocessing.Queue[object]) -> None:
    """Commit ``workload(total)``; report when it started and when each transaction committed."""
    txns = workload(total)
    conn = connect_source(path)
    commits: list[float] = []
    started = time.time()
    for inserts, updates, deletes in txns:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, inserts)
        conn.executemany(UPDATE, updates)
        conn.executemany(DELETE, deletes)
        conn.execute("COMMIT")
        commits.append(time.time())
    conn.close()
    results.put((started, commits))


def write_paced(path: str, count: int, results: multiprocessing.Queue[object]) -> None:
    """One single-row transaction per ms; reports ``time.time()`` after each commit and the rate.

    Even changes insert user ``lat{n}``, odd ones flip the opt-in of a random existing user;
    every change sets ``lastupdate = marker(n)``.
    """
    conn = connect_source(path)
    rng = random.Random(11)
    users = [f"seed{n}" for n in range(LATENCY_SEED_USERS)]
    commits = [0.0] * count
    started = time.perf_counter()
    for n in range(count):
        delay = started + n * 0.001 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if n % 2 == 0:
            conn.execute(PACED_INSERT, (f"lat{n}", phone(1_000_000 + n), marker(n)))
            users.append(f"lat{n}")
        else:
            conn.execute(PACED_UPDATE, (marker(n), rng.choice(users)))
        commits[n] = time.time()
    rate = count / (time.perf_counter() - started)
    conn.close()
    results.put((commits, rate))


def spawn(
    target: Callable[..., None], *args: object
) -> tuple[BaseProcess, multiprocessing.Queue[object]]:
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue[object] = context.Queue()
    process = context.Process(target=target, args=(*args, results), daemon=True)
    process.start()
    return process, results


def collect(process: BaseProcess, results: multiprocessing.Queue[object], timeout: float) -> Any:
    """The child's result; raises if it died without one or ran past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = results.get(timeout=0.5)
        except queue.Empty:
            if not process.is_alive() and results.empty():
                raise RuntimeError(f"writer process exited with {process.exitcode}") from None
            if time.monotonic() > deadline:
                process.terminate()
                raise RuntimeError(f"writer process gave no result in {timeout:.0f} s") from None
            continue
        process.join(10)
        return value


# --------------------------------------------------------------------------------------------
# the pipeline and its engine


def pipeline_settings(data_dir: Path) -> Settings:
    """The demo's settings (sample mapping rule, country derivation) on ``data_dir``."""
    base = load_settings(None, env={})
    return msgspec.structs.replace(
        base,
        data_dir=data_dir,
        source=SourceSettings(url=f"sqlite:///{data_dir / 'app.db'}", tables=(SAMPLE_TABLE,)),
        mappings=(SAMPLE_RULE,),
        serve_api=False,
    )


def open_engine(settings: Settings) -> tuple[SQLiteStore, str]:
    """The engine with the sample's app and SMS channel, as ``optsync up`` prepares it."""
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    app = ensure_app(store, settings.app)
    store.put_channel(app.id, ChannelType.SMS, True, {})
    return store, app.id


class ProfiledPipeline(Pipeline):
    """A ``Pipeline`` whose capture and apply threads each run under their own cProfile.

    Capture runs in a thread here (not in its own process, as ``Pipeline`` runs it), so that
    one profiler can see it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, capture_process=False, **kwargs)
        self.profiles: dict[str, cProfile.Profile] = {}

    def _capture(self) -> None:
        self._profiled("capture", super()._capture)

    def _apply(self) -> None:
        self._profiled("apply", super()._apply)

    def _profiled(self, name: str, target: Callable[[], None]) -> None:
        profile = self.profiles[name] = cProfile.Profile()
        profile.enable()
        try:
            target()
        finally:
            profile.disable()


@dataclass
class Applied:
    """What ``on_applied`` saw (written by the apply thread only)."""

    count: int = 0
    last: float = 0.0
    by_marker: dict[int, float] = field(default_factory=dict)
    markers: dict[str, int] = field(default_factory=dict)

    def __call__(self, events: Sequence[ChangeEvent]) -> None:
        now = time.time()
        self.count += len(events)
        self.last = now
        if self.markers:
            for event in events:
                n = self.markers.get(str(event.row.get("lastupdate")))
                if n is not None and n not in self.by_marker:
                    self.by_marker[n] = now


@dataclass
class ThroughputRun:
    rate: float
    """Changes/s from the first commit to the last change applied."""
    applied: int
    total: int
    seconds: float
    writer_rate: float
    """Rows/s the writer committed while the pipeline ran."""
    applied_when_writer_done: int
    cpu_cores: float
    """CPU seconds (capture + apply + this script's polling) per wall second."""
    capture_cores: float
    """The capture process's share of ``cpu_cores`` (0 when capture runs in a thread)."""
    mapping_cores: float
    """The mapping process's share of ``cpu_cores`` (0 without one)."""
    endpoints: int
    endpoints_expected: int
    dead: int
    stale: int
    profiles: dict[str, str] = field(default_factory=dict)


def backlogs(pipeline: Pipeline, source: sqlite3.Connection, consumer: str) -> tuple[int, int]:
    """(change rows not captured yet, stream records not applied yet)."""
    low, high = source.execute(f"SELECT min(seq), max(seq) FROM {CHANGE_TABLE}").fetchone()
    stats = pipeline.stream.stats()
    captured = 0 if low is None else high - low + 1
    return captured, stats.head - stats.consumers.get(consumer, 0)


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far; 0 if it is not running."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pipeline_throughput(
    root: Path, total: int, budget: float, *, profile: bool, capture_process: bool = True
) -> ThroughputRun:
    """The writer against the running pipeline; stops early after ``budget`` seconds."""
    settings = pipeline_settings(root / "pipeline")
    assert settings.source is not None
    source_path = settings.source.sqlite_path
    create_source(source_path)
    store, app_id = open_engine(settings)
    applied = Applied()
    if profile:
        pipeline: Pipeline = ProfiledPipeline(settings, store, on_applied=applied)
    else:
        pipeline = Pipeline(settings, store, on_applied=applied, capture_process=capture_process)
    monitor = sqlite3.connect(source_path, isolation_level=None)
    samples: list[tuple[float, int]] = []
    try:
        pipeline.start()
        if not pipeline.snapshot_done.wait(30):
            pipeline.check()
            raise RuntimeError("the pipeline did not finish its (empty) snapshot in 30 s")
        mapping_pid = pipeline.stage.pid if pipeline.stage is not None else None
        child_started = process_cpu(pipeline.capture_pid)
        mapping_started = process_cpu(mapping_pid)
        cpu_started, wall_started = time.process_time(), time.time()
        process, results = spawn(write_transactions, str(source_path), total)
        step, progress_at, last_count, last_time = total // 10, total // 10, 0, wall_started
        while applied.count < total:
            pipeline.check()
            time.sleep(0.05)
            now, count = time.time(), applied.count
            samples.append((now, count))
            if now - wall_started > budget:
                print(f"  out of budget: {count:,} of {total:,} applied in {budget:.0f} s")
                break
            if count > last_count:
                last_count, last_time = count, now
            elif now - last_time > STALL_SECONDS:
                print(f"  stalled: nothing applied for {STALL_SECONDS:.0f} s; giving up")
                break
            if count >= progress_at:
                pending = backlogs(pipeline, monitor, pipeline.worker.consumer)
                print(
                    f"  {100 * count // total:3d}%  {count:>9,} applied  "
                    f"{now - wall_started:6.1f} s  backlog: {pending[0]:>7,} change rows "
                    f"not captured, {pending[1]:>7,} stream records not applied",
                    flush=True,
                )
                progress_at = (count // step + 1) * step
        cpu, wall = time.process_time() - cpu_started, time.time() - wall_started
        child_cpu = process_cpu(pipeline.capture_pid) - child_started
        mapping_cpu = process_cpu(mapping_pid) - mapping_started
        started, commits = collect(process, results, 120)
        seconds = applied.last - commits[0]
        done = commits[-1]
        when_done = max((c for t, c in samples if t <= done), default=0)
        stats = pipeline.worker.stats
        pipeline.stop(timeout=120)  # a cut-short run may be inside a long engine transaction
        profiles = {}
        if isinstance(pipeline, ProfiledPipeline):
            profiles = {name: top_functions(p) for name, p in pipeline.profiles.items()}
        return ThroughputRun(
            rate=applied.count / seconds,
            applied=applied.count,
            total=total,
            seconds=seconds,
            writer_rate=total / (commits[-1] - started),
            applied_when_writer_done=when_done,
            cpu_cores=(cpu + child_cpu + mapping_cpu) / wall,
            capture_cores=child_cpu / wall,
            mapping_cores=mapping_cpu / wall,
            endpoints=store.count_endpoints(app_id),
            endpoints_expected=live_users(total),
            dead=stats.dead,
            stale=stats.stale,
            profiles=profiles,
        )
    finally:
        pipeline.stop(timeout=120)
        monitor.close()
        store.close()


def top_functions(profile: cProfile.Profile, limit: int = 25) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# throughput ceilings, each hop alone


@dataclass
class Ceilings:
    writer: float
    """(a) rows/s the writer commits on a table without capture triggers."""
    writer_captured: float
    """Rows/s with the capture triggers installed (every row also writes a change row)."""
    capture: float
    """Events/s ``SQLiteSource`` reads (and acknowledges) from a backlog."""
    stream: float
    """(c) events/s ``EmbeddedStream.append`` stores, 1,000 per append with a checkpoint."""
    engine: float
    """(b) events/s ``SQLiteStore.write_endpoints`` applies, 1,000 events per transaction."""
    apply: float
    """Records/s ``ApplyWorker`` drains from the stream (decode, map, write, ack)."""
    engine_done: int
    """Events the engine ceiling got through within the budget."""
    apply_done: int
    engine_batch: float = 0.0
    """(b) with every write through ``WriteBatch`` (``SqlStore.plain_writes = False``): the
    engine before captured changes were written as rows."""
    apply_staged: float = 0.0
    """Records/s ``PartitionedApply`` drains with the mapping process (``apply.stage``), as the
    pipeline runs it."""
    mapping: float = 0.0
    """Records/s the mapping process alone turns into writes (decode, map, msgpack both ways)."""


def writer_alone(folder: Path, total: int) -> float:
    path = folder / "plain.db"
    create_source(path)
    process, results = spawn(write_transactions, str(path), total)
    started, commits = collect(process, results, 300)
    return float(total / (commits[-1] - started))


def writer_and_capture(folder: Path, total: int) -> tuple[float, float, list[ChangeEvent]]:
    """The writer with the triggers installed, then capture reading the whole backlog."""
    path = folder / "captured.db"
    create_source(path)
    source = SQLiteSource(path, (SAMPLE_TABLE,))
    source.open(None)
    batches = source.batches(BATCH_SIZE)
    try:
        for batch in batches:  # the (empty) snapshot, up to the switch to the log
            if json.loads(batch.state).get("phase") == "log":
                break
        process, results = spawn(write_transactions, str(path), total)
        started, commits = collect(process, results, 300)
        writer = total / (commits[-1] - started)
        events: list[ChangeEvent] = []
        began = time.perf_counter()
        for batch in batches:
            events.extend(batch.events)
            source.acknowledge(batch.state)
            if len(events) >= total or not batch.events:
                break
        capture = len(events) / (time.perf_counter() - began)
    finally:
        source.close()
    if len(events) != total:
        raise RuntimeError(f"capture read {len(events)} events, the writer made {total}")
    return writer, capture, events


def stream_alone(path: Path, events: list[ChangeEvent]) -> float:
    stream = EmbeddedStream(path)
    try:
        began = time.perf_counter()
        for i in range(0, len(events), BATCH_SIZE):
            batch = events[i : i + BATCH_SIZE]
            state = f'{{"phase":"log","log_after":{int(batch[-1].position)}}}'
            stream.append(batch, Checkpoint("sqlite", state))
        return len(events) / (time.perf_counter() - began)
    finally:
        stream.close()


def engine_alone(
    folder: Path, events: list[ChangeEvent], budget: float, *, plain: bool = True
) -> tuple[float, int]:
    """The mapped writes through ``write_endpoints``, as the apply worker sends them; (rate, done).

    Each batch is mapped just before its write (not timed), so the phone-number cache that the
    mapper fills for the engine holds what it holds in the pipeline; commits skip the fsync and
    the -wal file is synced every ``SYNC_SECONDS`` of writing (timed), as ``ApplyWorker`` does;
    the garbage collector is tuned as ``Pipeline.start`` tunes it.
    """
    settings = pipeline_settings(folder / ("engine" if plain else "engine-batch"))
    store, app_id = open_engine(settings)
    store.plain_writes = plain
    mapper = Mapper(mapping_rules(settings.mappings))
    tune_gc()
    try:
        spent, done, synced = 0.0, 0, 0.0
        for i in range(0, len(events), BATCH_SIZE):
            writes = [w for e in events[i : i + BATCH_SIZE] for w in mapper.map(e).writes]
            began = time.perf_counter()
            store.write_endpoints(app_id, writes, Cause(CauseKind.SOURCE, ""), durable=False)
            if spent - synced >= SYNC_SECONDS or i + BATCH_SIZE >= len(events):
                store.sync()
                synced = spent
            spent += time.perf_counter() - began
            done = min(done + BATCH_SIZE, len(events))
            if spent > budget:
                break
        return done / spent, done
    finally:
        store.close()
        gc.unfreeze()


def apply_alone(folder: Path, stream_path: Path, total: int, budget: float) -> tuple[float, int]:
    settings = pipeline_settings(folder / "apply")
    store, app_id = open_engine(settings)
    stream = EmbeddedStream(stream_path)
    dlq = SQLiteDeadLetterQueue(settings.dlq_path)
    worker = ApplyWorker(
        stream,
        Mapper(mapping_rules(settings.mappings)),
        store,
        app_id,
        dlq,
        sync_interval=SYNC_SECONDS,
    )
    try:
        began = time.perf_counter()
        while worker.stats.records < total and time.perf_counter() - began < budget:
            if not worker.step(BATCH_SIZE, wait=1.0):
                raise RuntimeError(f"apply drained {worker.stats.records} of {total} records")
        worker.flush()
        return worker.stats.records / (time.perf_counter() - began), worker.stats.records
    finally:
        stream.close()
        dlq.close()
        store.close()


def staged_apply_alone(
    folder: Path, stream_path: Path, total: int, budget: float
) -> tuple[float, float]:
    """``PartitionedApply`` with the mapping process draining the stream (records/s), and the
    mapping process alone turning the same records into writes (records/s)."""
    settings = pipeline_settings(folder / "staged")
    store, app_id = open_engine(settings)
    stream = EmbeddedStream(stream_path)
    dlq = SQLiteDeadLetterQueue(settings.dlq_path)
    rules = mapping_rules(settings.mappings)
    stage = MappingStage(rules, store.settings.country.policy)
    worker = PartitionedApply(
        stream, Mapper(rules), store, app_id, dlq, consumer="staged", name="bench",
        sync_interval=SYNC_SECONDS, stage=stage,
    )  # fmt: skip
    try:
        stage.submit([])  # the child has started and imported what it needs
        stage.result()
        tune_gc()
        began = time.perf_counter()
        while worker.stats.records < total and time.perf_counter() - began < budget:
            worker.step(BATCH_SIZE, wait=1.0)
        worker.stop()
        staged = worker.stats.records / (time.perf_counter() - began)
        records = stream.read("mapping-alone", total, 0.0)
        began = time.perf_counter()
        for i in range(0, len(records), BATCH_SIZE):
            stage.submit(records[i : i + BATCH_SIZE])
            stage.result()
        mapping = len(records) / (time.perf_counter() - began)
        return staged, mapping
    finally:
        stage.close()
        stream.close()
        dlq.close()
        store.close()
        gc.unfreeze()


def partial(done: int, total: int) -> str:
    return "" if done >= total else f"  (partial: {done:,} of {total:,} within the budget)"


def ceilings(root: Path, total: int, budget: float) -> Ceilings:
    folder = root / "ceilings"
    folder.mkdir()
    writer = writer_alone(folder, total)
    print(f"  (a) writer alone, no triggers           {writer:>10,.0f} rows/s")
    writer_captured, capture, events = writer_and_capture(folder, total)
    print(f"      writer with capture triggers        {writer_captured:>10,.0f} rows/s")
    print(f"      capture alone, reading the backlog  {capture:>10,.0f} events/s")
    stream = stream_alone(folder / "stream.db", events)
    print(f"  (c) EmbeddedStream.append alone         {stream:>10,.0f} events/s")
    engine, engine_done = engine_alone(folder, events, budget)
    print(
        f"  (b) SQLiteStore.write_endpoints alone   {engine:>10,.0f} events/s"
        f"{partial(engine_done, total)}",
        flush=True,
    )
    engine_batch, batch_done = engine_alone(folder, events, budget, plain=False)
    print(
        f"      the same through WriteBatch only    {engine_batch:>10,.0f} events/s"
        f"{partial(batch_done, total)}",
        flush=True,
    )
    apply, apply_done = apply_alone(folder, folder / "stream.db", total, budget)
    print(
        f"      ApplyWorker alone, draining stream  {apply:>10,.0f} records/s"
        f"{partial(apply_done, total)}",
        flush=True,
    )
    staged, mapping = staged_apply_alone(folder, folder / "stream.db", total, budget)
    print(f"      apply + mapping process, draining   {staged:>10,.0f} records/s")
    print(f"      mapping process alone               {mapping:>10,.0f} records/s", flush=True)
    return Ceilings(
        writer, writer_captured, capture, stream, engine, apply, engine_done, apply_done,
        engine_batch, staged, mapping,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# CPU per change of each hop (--stages)


class NoEngine:
    """A store whose ``write_endpoints`` does nothing: ``ApplyWorker`` without the engine."""

    def write_endpoints(
        self, app_id: str, writes: Sequence[Any], cause: Cause, *, durable: bool = True
    ) -> WriteResult:
        return WriteResult(applied=len(writes))

    def sync(self) -> None:
        pass


def stage_costs(root: Path, total: int) -> dict[str, float]:
    """CPU microseconds per change of each non-engine step (see the module docstring)."""
    folder = root / "stages"
    folder.mkdir()
    path = folder / "captured.db"
    create_source(path)
    source = SQLiteSource(path, (SAMPLE_TABLE,))
    source.open(None)
    batches = source.batches(BATCH_SIZE)
    for batch in batches:
        if json.loads(batch.state).get("phase") == "log":
            break
    process, results = spawn(write_transactions, str(path), total)
    collect(process, results, 300)
    events: list[ChangeEvent] = []
    began = time.thread_time()
    for batch in batches:
        events.extend(batch.events)
        source.acknowledge(batch.state)
        if len(events) >= total or not batch.events:
            break
    costs = {"capture: read change rows, build events, ack": time.thread_time() - began}
    source.close()
    runs: dict[str, list[float]] = {}

    def timed(name: str, step: Callable[[], object]) -> object:
        began = time.thread_time()
        result = step()
        runs.setdefault(name, []).append(time.thread_time() - began)
        return result

    rule_mapper = Mapper(mapping_rules((SAMPLE_RULE,)))
    for n in range(3):
        data: Any = timed("dms.encode", lambda: [dms.encode(e) for e in events])
        decoded: Any = timed("dms.decode", lambda d=data: [dms.decode(x) for x in d])
        if n == 0:
            phone_numbers.normalize.cache_clear()
            timed("mapping, phone cache cold", lambda d=decoded: [rule_mapper.map(e) for e in d])
        timed("mapping, phone cache warm", lambda d=decoded: [rule_mapper.map(e) for e in d])
        stream = EmbeddedStream(folder / f"stream{n}.db")

        def append(stream: EmbeddedStream = stream) -> None:
            for i in range(0, len(events), BATCH_SIZE):
                stream.append(events[i : i + BATCH_SIZE], Checkpoint("sqlite", f"{i}"))

        def read(stream: EmbeddedStream = stream) -> None:
            done = 0
            while done < len(events):
                records = stream.read("bench", BATCH_SIZE)
                stream.ack("bench", records[-1].offset)
                done += len(records)

        timed("stream append (encode included)", append)
        timed("stream read + ack", read)
        dlq = SQLiteDeadLetterQueue(folder / f"dlq{n}.db")
        store: Any = NoEngine()
        worker = ApplyWorker(stream, Mapper(mapping_rules((SAMPLE_RULE,))), store, "bench", dlq)

        def drain(worker: ApplyWorker = worker) -> None:
            while worker.stats.records < len(events):
                worker.step(BATCH_SIZE, wait=0)

        timed("ApplyWorker without engine (read..ack)", drain)
        stream.close()
        dlq.close()
    costs.update({name: statistics.median(values) for name, values in runs.items()})
    return {name: seconds / len(events) * 1e6 for name, seconds in costs.items()}


# --------------------------------------------------------------------------------------------
# latency


@dataclass
class LatencyRun:
    latencies_ms: list[float]
    missing: int
    writer_rate: float
    cpu_cores: float = 0.0


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def latency_floor(root: Path, count: int) -> LatencyRun:
    """The paced writer on a plain database; this process busy-polls ``data_version``."""
    path = root / "floor" / "app.db"
    create_source(path, LATENCY_SEED_USERS, lastupdate_index=True)
    markers = {marker(n): n for n in range(count)}
    seen: dict[int, float] = {}
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (version,) = conn.execute("PRAGMA data_version").fetchone()
        last = marker(-1)
        process, results = spawn(write_paced, str(path), count)
        deadline = time.monotonic() + count / 1000 + 30
        while len(seen) < count and time.monotonic() < deadline:
            (current,) = conn.execute("PRAGMA data_version").fetchone()
            if current == version:
                if not process.is_alive() and not results.empty():
                    break
                continue
            version = current
            rows = conn.execute(
                "SELECT lastupdate FROM optin_status WHERE lastupdate > ?", (last,)
            ).fetchall()
            now = time.time()
            for (value,) in rows:
                n = markers.get(value)
                if n is not None and n not in seen:
                    seen[n] = now
                last = max(last, value)
        commits, rate = collect(process, results, 60)
    finally:
        conn.close()
    latencies = [(seen[n] - commits[n]) * 1e3 for n in range(count) if n in seen]
    return LatencyRun(latencies, count - len(latencies), rate)


def pipeline_latency(root: Path, count: int, *, capture_process: bool = True) -> LatencyRun:
    settings = pipeline_settings(root / "latency")
    assert settings.source is not None
    source_path = settings.source.sqlite_path
    create_source(source_path, LATENCY_SEED_USERS)
    store, _ = open_engine(settings)
    applied = Applied(markers={marker(n): n for n in range(count)})
    pipeline = Pipeline(settings, store, on_applied=applied, capture_process=capture_process)
    try:
        pipeline.start()
        deadline = time.monotonic() + 30
        while applied.count < LATENCY_SEED_USERS and time.monotonic() < deadline:
            pipeline.check()
            time.sleep(0.01)  # the snapshot of the seed users, applied before the clock starts
        child_started = process_cpu(pipeline.capture_pid)
        cpu_started, wall_started = time.process_time(), time.monotonic()
        process, results = spawn(write_paced, str(source_path), count)
        commits, rate = collect(process, results, count / 1000 + 60)
        deadline = time.monotonic() + 10
        while len(applied.by_marker) < count and time.monotonic() < deadline:
            pipeline.check()
            time.sleep(0.01)
        cpu = time.process_time() - cpu_started + process_cpu(pipeline.capture_pid) - child_started
        cores = cpu / (time.monotonic() - wall_started)
    finally:
        pipeline.stop()
        store.close()
    seen = applied.by_marker
    latencies = [(seen[n] - commits[n]) * 1e3 for n in range(count) if n in seen]
    return LatencyRun(latencies, count - len(latencies), rate, cores)


def describe(run: LatencyRun) -> str:
    values = run.latencies_ms
    parts = [f"{p} {percentile(values, q):6.2f}" for p, q in (("p50", 50), ("p95", 95))]
    parts += [f"p99 {percentile(values, 99):6.2f}", f"p99.9 {percentile(values, 99.9):6.2f}"]
    parts.append(f"max {max(values, default=float('nan')):6.2f} ms")
    missing = f", {run.missing} not seen" if run.missing else ""
    return "  ".join(parts) + f"  (writer {run.writer_rate:,.0f}/s{missing})"


# --------------------------------------------------------------------------------------------
# report


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    target: str
    verdict: str
    baseline: str
    ratio: str


def summary(
    throughput: ThroughputRun, limits: Ceilings, latency: LatencyRun, floor: LatencyRun
) -> list[Row]:
    named = {
        "(a) writer": limits.writer,
        "(b) engine": limits.engine,
        "(c) stream": limits.stream,
    }
    slowest = min(named, key=lambda k: named[k])
    complete = throughput.applied >= throughput.total
    rows = [
        Row(
            "sustained throughput",
            f"{throughput.rate:,.0f} changes/s" + ("" if complete else " (partial)"),
            f">= {THROUGHPUT_TARGET:,.0f}/s",
            "pass" if throughput.rate >= THROUGHPUT_TARGET else "MISS",
            f"{slowest} {named[slowest]:,.0f}/s (slowest ceiling)",
            f"{throughput.rate / named[slowest]:.2f}",
        )
    ]
    rows.append(
        Row(
            "engine alone (b)",
            f"{limits.engine:,.0f} writes/s",
            f">= {ENGINE_TARGET:,.0f}/s",
            "pass" if limits.engine >= ENGINE_TARGET else "MISS",
            f"WriteBatch only {limits.engine_batch:,.0f}/s",
            f"{limits.engine / limits.engine_batch:.2f}" if limits.engine_batch else "-",
        )
    )
    rows.append(
        Row(
            "pipeline cores",
            f"{throughput.cpu_cores:.2f}",
            f">= {CORES_TARGET:.1f}",
            "pass" if throughput.cpu_cores >= CORES_TARGET else "MISS",
            "-",
            "-",
        )
    )
    for label, p, target in (
        ("p50", 50.0, P50_TARGET_MS),
        ("p95", 95.0, None),
        ("p99", 99.0, P99_TARGET_MS),
        ("max", 100.0, None),
    ):
        ours, base = percentile(latency.latencies_ms, p), percentile(floor.latencies_ms, p)
        verdict = "-" if target is None else ("pass" if ours <= target else "MISS")
        rows.append(
            Row(
                f"commit -> applied {label} @1k/s",
                f"{ours:.2f} ms",
                "-" if target is None else f"<= {target:.0f} ms",
                verdict,
                f"data_version poll {base:.2f} ms",
                f"{ours / base:.1f}x" if base > 0 else "-",
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    header = Row("figure", "value", "target", "result", "baseline (same run)", "ratio")
    table = [header, *rows]
    widths = [max(len(getattr(r, f.name)) for r in table) for f in dataclasses.fields(Row)]
    for i, row in enumerate(table):
        cells = [getattr(row, f.name) for f in dataclasses.fields(Row)]
        print("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 changes; 3 s of latency")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument(
        "--profile", action="store_true", help="only the throughput run, under cProfile"
    )
    parser.add_argument(
        "--stages", action="store_true", help="only the CPU cost per change of each hop"
    )
    parser.add_argument(
        "--capture-thread",
        action="store_true",
        help="run capture in a thread of the pipeline process (the layout before), not a process",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds each engine-bound run may take before it is cut short [default: 300]",
    )
    args = parser.parse_args()
    total = 20_000 if args.quick else 200_000
    paced = 3_000 if args.quick else 10_000
    root = Path(tempfile.mkdtemp(prefix="optsync-bench-pipeline-", dir=args.dir))
    try:
        print(machine(root))
        if args.stages:
            print(f"\nCPU per change of each hop, {total:,} changes (median of 3, capture once)")
            for name, micros in stage_costs(root, total).items():
                print(f"  {name:45s} {micros:7.2f} us/change")
            return
        if args.profile:
            print(f"\nthroughput under cProfile, {total:,} changes (rates are not representative)")
            run = pipeline_throughput(root, total, args.budget, profile=True)  # capture thread
            print(f"  {run.rate:,.0f} changes/s under the profiler")
            for name, text in run.profiles.items():
                print(f"\n--- {name} thread ---\n{text}")
            return
        print(
            f"\n1. sustained throughput, {total:,} changes in transactions of {TXN_ROWS:,} "
            "(50% insert, 40% update, 10% delete)\n ceilings, each hop alone:"
        )
        limits = ceilings(root, total, args.budget)
        layout = (
            "capture and apply threads in this process"
            if args.capture_thread
            else "apply thread in this process, capture in a child process"
        )
        print(f" the pipeline ({layout}, writer in another process):")
        throughput = pipeline_throughput(
            root, total, args.budget, profile=False, capture_process=not args.capture_thread
        )
        complete = throughput.applied >= total
        check = (
            f"{throughput.endpoints:,} endpoints (expected {throughput.endpoints_expected:,})"
            if complete
            else f"{throughput.endpoints:,} endpoints (run cut short: no expected count)"
        )
        print(
            f"  {throughput.rate:,.0f} changes/s over {throughput.seconds:.1f} s, first commit "
            f"-> last change applied{partial(throughput.applied, total)}\n"
            f"  writer meanwhile: {throughput.writer_rate:,.0f} rows/s; applied when it "
            f"finished: {throughput.applied_when_writer_done:,} "
            f"({100 * throughput.applied_when_writer_done / total:.0f}%)\n"
            f"  pipeline CPU: {throughput.cpu_cores:.2f} cores (capture process "
            f"{throughput.capture_cores:.2f}, mapping process {throughput.mapping_cores:.2f})\n"
            f"  check: {check}, {throughput.dead} dead letters, {throughput.stale} stale writes",
            flush=True,
        )
        print(f"\n2. commit -> applied latency, {paced:,} single-row commits, one per ms")
        floor = latency_floor(root, paced)
        print(f"  raw SQLite, data_version busy-poll:  {describe(floor)}", flush=True)
        latency = pipeline_latency(root, paced, capture_process=not args.capture_thread)
        print(f"  pipeline, commit -> on_applied:     {describe(latency)}")
        print(f"  pipeline CPU at 1k changes/s: {latency.cpu_cores:.2f} cores (both processes)")

        rows = summary(throughput, limits, latency, floor)
        print(f"\nsummary ({load()} at the end)")
        print_table(rows)
        misses = [r.figure for r in rows if r.verdict == "MISS"]
        if throughput.dead or (complete and throughput.endpoints != throughput.endpoints_expected):
            misses.append("correctness check (endpoint count / dead letters)")
        if not complete:
            misses.append(f"the throughput run was cut short after {args.budget:.0f} s")
        print(f"\nmissed: {', '.join(misses)}" if misses else "\nevery target met")
        if args.json:
            report = {
                "machine": machine(root),
                "changes": total,
                "paced_changes": paced,
                "ceilings": dataclasses.asdict(limits),
                "throughput": dataclasses.asdict(throughput),
                "latency_ms": {
                    "p50": percentile(latency.latencies_ms, 50),
                    "p95": percentile(latency.latencies_ms, 95),
                    "p99": percentile(latency.latencies_ms, 99),
                    "p99.9": percentile(latency.latencies_ms, 99.9),
                    "max": max(latency.latencies_ms, default=None),
                    "missing": latency.missing,
                    "cpu_cores": latency.cpu_cores,
                },
                "floor_ms": {
                    "p50": percentile(floor.latencies_ms, 50),
                    "p99": percentile(floor.latencies_ms, 99),
                    "max": max(floor.latencies_ms, default=None),
                },
                "summary": [dataclasses.asdict(r) for r in rows],
                "misses": misses,
            }
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            print(f"figures written to {args.json}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
