"""PostgreSQL capture: pgoutput read rate, capture -> applied rate, snapshot rate, latency.

Runs a private PostgreSQL (``tests/servers/postgres_server.py``: ``initdb`` + ``pg_ctl``,
``wal_level=logical``, ``fsync=on``, ``synchronous_commit=on``) and the real pipeline pieces
``PostgresSource`` -> ``EmbeddedStream`` (WAL, ``synchronous=FULL``) -> ``ApplyWorker`` ->
``SQLiteStore``: for figures 2 and 3 as capture and apply threads of this process; for the
latency (4) as ``optsync run`` runs them (``optsync.pipeline.Pipeline``: capture in a child
process, apply in a thread of this one).

Figures, each with its baseline measured in the same run:

1. raw pgoutput read (the ceiling): psycopg2 ``read_message`` plus optsync's pgoutput decoder,
   no events, no pipeline; baseline: ``read_message`` alone (receive only).
2. capture -> applied: 200,000 row changes in 1,000-row transactions, already in the WAL when
   capture starts (catch-up), until the engine has applied the last one; baseline: figure 1.
   Then the ``optsync run`` layout (``Pipeline``: capture process, mapping process, apply
   thread) with another 200,000 changes committed while it runs.
3. snapshot: 1,000,000 rows read by ``PostgresSource`` (events built, no stream), and loaded
   through the pipeline into the engine; baseline: ``COPY table TO STDOUT`` of the same rows.
4. commit -> applied latency at 1,000 changes/s (single-row transactions from a separate
   process); baseline: commit -> pgoutput message received by a bare psycopg2 reader.

    .venv/bin/python bench/postgres.py            # full sizes
    .venv/bin/python bench/postgres.py --quick    # a tenth of the rows, 3 s of latency probe
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import os
import platform
import select
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import msgspec
import psycopg2
import psycopg2.extras

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "servers"))

from postgres_server import PostgresServer, running_server

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules, store_settings
from optsync.capture.postgres import pgoutput as pgoutput
from optsync.capture.postgres.source import PostgresSource
from optsync.config import MappingSettings, SourceSettings, load_settings
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent
from optsync.formats import dms
from optsync.pipeline import SYNC_SECONDS, Pipeline
from optsync.runtime import tune_gc
from optsync.stream.base import Checkpoint, StreamRecord
from optsync.stream.embedded import EmbeddedStream

RULE_SETTINGS = MappingSettings(
    table="optin_status", address="phone", user_id="userid", opt_in="optin"
)
RULE = mapping_rules((RULE_SETTINGS,))[0]
TABLE_DDL = (
    "CREATE TABLE optin_status (id bigint PRIMARY KEY, userid text NOT NULL, phone text NOT NULL, "
    "optin int NOT NULL, seq bigint, lastupdate timestamptz DEFAULT now())"
)
ROWS_SQL = (
    "INSERT INTO optin_status (id, userid, phone, optin) SELECT n, 'user' || n, "
    "'+1234' || lpad(n::text, 7, '0'), n % 2 FROM generate_series({first}, {last}) n"
)


def say(text: str = "") -> None:
    print(text, flush=True)


def machine(folder: Path, server: PostgresServer) -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    version = server.sql("SHOW server_version")[0][0]
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"CPU: {model}, {os.cpu_count()} cores{memory} | {platform.system()} {platform.release()}\n"
        f"Python {platform.python_version()}, psycopg2 {psycopg2.__version__.split()[0]}, "
        f"PostgreSQL {version} (private cluster, fsync=on, synchronous_commit=on)\n"
        f"files in {folder}; source, pipeline and engine share the machine"
    )


def connect(server: PostgresServer, db: str) -> Any:
    conn = psycopg2.connect(server.url(db=db))
    conn.autocommit = True
    return conn


def fresh_database(server: PostgresServer, name: str) -> str:
    server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    server.sql(f"CREATE DATABASE {name}")
    with closing(connect(server, name)) as conn, conn.cursor() as cur:
        cur.execute(TABLE_DDL)
    return name


def fill(server: PostgresServer, db: str, rows: int, per_transaction: int = 100_000) -> None:
    with closing(connect(server, db)) as conn, conn.cursor() as cur:
        for first in range(1, rows + 1, per_transaction):
            last = min(first + per_transaction - 1, rows)
            cur.execute(ROWS_SQL.format(first=first, last=last))
        cur.execute("ANALYZE optin_status")


def update_transactions(server: PostgresServer, db: str, changes: int, rows: int) -> None:
    """``changes`` single-column updates, 1,000 rows per transaction, over ``rows`` rows."""
    with closing(connect(server, db)) as conn, conn.cursor() as cur:
        done = 0
        while done < changes:
            first = done % rows + 1
            cur.execute(
                "UPDATE optin_status SET optin = 1 - optin WHERE id BETWEEN %s AND %s",
                (first, first + 999),
            )
            done += cur.rowcount


class Pipe:
    """Capture and apply threads over the real pieces (``optsync.pipeline.Pipeline``'s loop)."""

    def __init__(self, folder: Path, source: PostgresSource, *, apply: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.source = source
        self.stream = EmbeddedStream(folder / "stream.db")
        self.store = SQLiteStore(folder / "engine.db")
        self.dlq = SQLiteDeadLetterQueue(folder / "dlq.db")
        self.app = self.store.find_app("bench") or self.store.create_app("bench")
        self.applied = 0
        self.on_event: Callable[[Sequence[ChangeEvent]], None] | None = None
        self.on_stored: Callable[[Sequence[ChangeEvent]], None] | None = None
        self.worker = ApplyWorker(
            self.stream,
            Mapper([RULE]),
            self.store,
            self.app.id,
            self.dlq,
            on_applied=self._seen,
            sync_interval=SYNC_SECONDS,
        )
        self.stop = threading.Event()
        self.snapshot_done = threading.Event()
        self.failure: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.apply = apply

    def _seen(self, events: Sequence[ChangeEvent]) -> None:
        self.applied += len(events)
        if self.on_event is not None:
            self.on_event(events)

    def start(self) -> None:
        for target in (self._capture, self._apply) if self.apply else (self._capture,):
            thread = threading.Thread(target=self._guard, args=(target,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            self.failure.append(exc)
            self.stop.set()

    def _capture(self) -> None:
        saved = self.stream.checkpoint(self.source.name)
        last = saved.state if saved else None
        self.source.open(last)
        for batch in self.source.batches(1000):
            if self.stop.is_set():
                return
            if batch.events or batch.state != last:
                self.stream.append(batch.events, Checkpoint(self.source.name, batch.state))
                if self.on_stored is not None:
                    self.on_stored(batch.events)
                self.source.acknowledge(batch.state)
                last = batch.state
            if json.loads(batch.state)["phase"] == "log":
                self.snapshot_done.set()

    def _apply(self) -> None:
        while not self.stop.is_set():
            self.worker.step(1000, wait=0.05)

    def wait_applied(self, count: int, timeout: float = 600) -> float:
        started = time.perf_counter()
        while self.applied < count:
            if self.failure:
                raise self.failure[0]
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"only {self.applied} of {count} applied")
            time.sleep(0.001)
        return time.perf_counter()

    def wait_stored(self, count: int, timeout: float = 600) -> float:
        """Until the stream holds ``count`` records (durably, checkpoint acknowledged)."""
        started = time.perf_counter()
        while self.stream.stats().head < count:
            if self.failure:
                raise self.failure[0]
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"only {self.stream.stats().head} of {count} stored")
            time.sleep(0.005)
        return time.perf_counter()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        self.source.close()
        self.stream.close()
        self.dlq.close()
        self.store.close()


# -- 1. raw pgoutput read ---------------------------------------------------------------------


def raw_read(server: PostgresServer, db: str, slot: str, changes: int, decode: bool) -> float:
    """Seconds to receive (and decode) ``changes`` row messages from a fresh slot's backlog."""
    repl = psycopg2.connect(
        server.url(db=db), connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    try:
        cur = repl.cursor()
        cur.start_replication(
            slot_name=slot,
            decode=False,
            options={"proto_version": "1", "publication_names": "bench"},
        )
        rows = 0
        started = time.perf_counter()
        while rows < changes:
            message = cur.read_message()
            if message is None:
                select.select([repl], [], [], 0.1)
                continue
            payload = message.payload
            if decode:
                decoded = pgoutput.decode(payload)
                if isinstance(decoded, pgoutput.Insert | pgoutput.Update | pgoutput.Delete):
                    rows += 1
            elif payload[:1] in (b"I", b"U", b"D"):
                rows += 1
        return time.perf_counter() - started
    finally:
        repl.close()


def bench_raw_and_applied(
    server: PostgresServer, work: Path, changes: int, rows: int
) -> dict[str, float]:
    db = fresh_database(server, "bench_log")
    fill(server, db, rows)
    with closing(connect(server, db)) as conn, conn.cursor() as cur:
        cur.execute("CREATE PUBLICATION bench FOR TABLE optin_status")
        for slot in ("raw_receive", "raw_decode"):
            cur.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    # The pipeline's source: snapshot of the rows first (not timed), then the backlog.
    url = server.url(db=db)
    source = PostgresSource(url, ["optin_status"], name="bench", publication="bench")
    pipe = Pipe(work / "applied", source)
    pipe.start()
    while not pipe.snapshot_done.wait(0.1):
        if pipe.failure:
            raise pipe.failure[0]
    pipe.wait_applied(rows)
    pipe.close()
    update_transactions(server, db, changes, rows)

    receive = raw_read(server, db, "raw_receive", changes, decode=False)
    decode = raw_read(server, db, "raw_decode", changes, decode=True)

    # Capture alone into a fresh stream: the part of the pipeline this source owns.
    stored = Pipe(
        work / "stored",
        PostgresSource(url, ["optin_status"], name="stored", publication="bench"),
        apply=False,
    )
    stored.start()
    while not stored.snapshot_done.wait(0.1):
        if stored.failure:
            raise stored.failure[0]
    head = stored.stream.stats().head
    update_transactions(server, db, changes, rows)
    started = time.perf_counter()
    finished = stored.wait_stored(head + changes)
    stored_rate = changes / (finished - started)
    records = stored.stream.read("baseline", changes + head)[head:]
    stored.close()
    stream_rate, apply_rate = hop_baselines(work / "hops", records)

    # A new pipeline on the same files resumes from its checkpoint into the backlog.
    pipe = Pipe(
        work / "applied", PostgresSource(url, ["optin_status"], name="bench", publication="bench")
    )
    started = time.perf_counter()
    pipe.start()
    finished = pipe.wait_applied(changes)
    pipe.close()
    run_rate = run_layout(server, db, work / "run", changes, rows)
    return {
        "run_rate": run_rate,
        "receive_rate": changes / receive,
        "decode_rate": changes / decode,
        "applied_rate": changes / (finished - started),
        "applied_seconds": finished - started,
        "stored_rate": stored_rate,
        "stream_rate": stream_rate,
        "apply_rate": apply_rate,
    }


def run_layout(server: PostgresServer, db: str, folder: Path, changes: int, rows: int) -> float:
    """Changes/s through ``optsync.pipeline.Pipeline`` as ``optsync run`` starts it (capture in a
    child process, the mapping process, apply in a thread of this one): the table's rows are
    snapshotted and applied first (not timed), then ``changes`` updates are committed in
    1,000-row transactions while it runs; timed from the first commit to the last change
    applied."""
    settings = msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=folder,
        source=SourceSettings(
            url=server.url(db=db), tables=("optin_status",), name="run", publication="bench"
        ),
        mappings=(RULE_SETTINGS,),
        serve_api=False,
    )
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    seen = [0]

    def count(events: Sequence[ChangeEvent]) -> None:
        seen[0] += len(events)

    pipeline = Pipeline(settings, store, on_applied=count)
    pipeline.start()
    try:
        deadline = time.monotonic() + 600
        while seen[0] < rows:
            pipeline.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the snapshot applied {seen[0]:,} of {rows:,} rows")
            time.sleep(0.05)
        seen[0] = 0  # the snapshot is applied; nothing else is in flight
        started = time.perf_counter()
        update_transactions(server, db, changes, rows)
        while seen[0] < changes:
            pipeline.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"applied {seen[0]:,} of {changes:,} changes")
            time.sleep(0.01)
        return changes / (time.perf_counter() - started)
    finally:
        pipeline.stop()
        store.close()


def hop_baselines(folder: Path, records: Sequence[StreamRecord]) -> tuple[float, float]:
    """Events/s of the two hops after capture alone: stream append, then apply into the engine."""
    events = [dms.decode(r.data) for r in records]
    folder.mkdir(parents=True, exist_ok=True)
    stream = EmbeddedStream(folder / "stream.db")
    store = SQLiteStore(folder / "engine.db")
    dlq = SQLiteDeadLetterQueue(folder / "dlq.db")
    try:
        started = time.perf_counter()
        for i in range(0, len(events), 1000):
            stream.append(events[i : i + 1000], Checkpoint("baseline", str(i)))
        stream_rate = len(events) / (time.perf_counter() - started)
        app = store.create_app("baseline")
        worker = ApplyWorker(stream, Mapper([RULE]), store, app.id, dlq)
        started = time.perf_counter()
        while worker.step(1000, wait=0.0):
            pass
        apply_rate = len(events) / (time.perf_counter() - started)
    finally:
        stream.close()
        dlq.close()
        store.close()
    return stream_rate, apply_rate


# -- 3. snapshot ------------------------------------------------------------------------------


def bench_snapshot(server: PostgresServer, work: Path, rows: int) -> dict[str, float]:
    db = fresh_database(server, "bench_snapshot")
    fill(server, db, rows)
    url = server.url(db=db)
    with closing(connect(server, db)) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        buffer = io.StringIO()
        cur.copy_expert("COPY optin_status TO STDOUT", buffer)
        copy_seconds = time.perf_counter() - started

    source = PostgresSource(url, ["optin_status"], name="read", chunk_size=10_000)
    source.open(None)
    started = time.perf_counter()
    loaded = 0
    for batch in source.batches(10_000):
        loaded += len(batch.events)
        if json.loads(batch.state)["phase"] == "log":
            break
    read_seconds = time.perf_counter() - started
    source.close()
    assert loaded == rows, loaded

    stored = Pipe(
        work / "snapshot-stored", PostgresSource(url, ["optin_status"], name="s"), apply=False
    )
    started = time.perf_counter()
    stored.start()
    finished = stored.wait_stored(rows, timeout=1800)
    stored.close()
    stored_rate = rows / (finished - started)

    # Through apply into the engine: a tenth of the rows at most (apply is the slow hop).
    applied_rows = min(rows, 100_000)
    db = fresh_database(server, "bench_snapshot_applied")
    fill(server, db, applied_rows)
    pipe = Pipe(
        work / "snapshot-applied", PostgresSource(server.url(db=db), ["optin_status"], name="a")
    )
    started = time.perf_counter()
    pipe.start()
    finished = pipe.wait_applied(applied_rows, timeout=1800)
    pipe.close()
    return {
        "copy_rate": rows / copy_seconds,
        "read_rate": rows / read_seconds,
        "stored_rate": stored_rate,
        "applied_rows": applied_rows,
        "applied_rate": applied_rows / (finished - started),
    }


# -- 4. latency -------------------------------------------------------------------------------


def writer(url: str, rate: int, seconds: float, rows: int, out: str) -> None:
    """Single-row transactions at ``rate``/s; writes ``seq commit_time`` lines to ``out``."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    cur = conn.cursor()
    times: list[tuple[int, float]] = []
    started = time.perf_counter()
    total = int(rate * seconds)
    for seq in range(1, total + 1):
        due = started + seq / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        cur.execute(
            "UPDATE optin_status SET optin = 1 - optin, seq = %s WHERE id = %s",
            (seq, seq % rows + 1),
        )
        times.append((seq, time.time()))
    conn.close()
    Path(out).write_text("\n".join(f"{s} {t}" for s, t in times))


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return at(0.5), at(0.99), ordered[-1]


def bench_latency(
    server: PostgresServer, work: Path, rate: int, seconds: float
) -> dict[str, tuple[float, float, float]]:
    rows = 10_000
    db = fresh_database(server, "bench_latency")
    fill(server, db, rows)
    url = server.url(db=db)
    with closing(connect(server, db)) as conn, conn.cursor() as cur:
        cur.execute("CREATE PUBLICATION bench FOR TABLE optin_status")
        cur.execute("SELECT pg_create_logical_replication_slot('raw_latency', 'pgoutput')")
    context = multiprocessing.get_context("spawn")

    # Baseline: a bare psycopg2 reader, decoding only the seq column of each update.
    repl = psycopg2.connect(url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    cur = repl.cursor()
    cur.start_replication(
        slot_name="raw_latency",
        decode=False,
        options={"proto_version": "1", "publication_names": "bench"},
    )
    received: dict[int, float] = {}
    out = work / "commits-raw.txt"
    process = context.Process(target=writer, args=(url, rate, seconds, rows, str(out)))
    process.start()
    deadline = time.monotonic() + seconds + 30
    while (
        process.is_alive() or len(received) < int(rate * seconds)
    ) and time.monotonic() < deadline:
        message = cur.read_message()
        if message is None:
            select.select([repl], [], [], 0.05)
            continue
        decoded = pgoutput.decode(message.payload)
        if isinstance(decoded, pgoutput.Update):
            seq = decoded.new[4]
            if isinstance(seq, str):
                received[int(seq)] = time.time()
        cur.send_feedback(flush_lsn=message.data_start)
    process.join()
    repl.close()
    raw = latencies(out, received)

    # optsync: source -> stream -> apply -> engine, as ``optsync run`` runs it (capture in a
    # child process, apply in a thread of this one).
    settings = msgspec.structs.replace(
        load_settings(None, env={}),
        data_dir=work / "latency",
        source=SourceSettings(
            url=url, tables=("optin_status",), name="latency", publication="bench"
        ),
        mappings=(RULE_SETTINGS,),
        serve_api=False,
    )
    store = SQLiteStore(settings.engine_path, store_settings(settings))
    applied: dict[int, float] = {}

    def note(events: Sequence[ChangeEvent]) -> None:
        now = time.time()
        for event in events:
            seq = (event.after or {}).get("seq")
            if seq is not None:
                applied[int(seq)] = now

    pipeline = Pipeline(settings, store, on_applied=note)
    pipeline.start()
    try:
        while not pipeline.snapshot_done.wait(0.1):
            pipeline.check()
        deadline = time.monotonic() + 120
        while store.count_endpoints(pipeline.app.id) < rows and time.monotonic() < deadline:
            pipeline.check()
            time.sleep(0.05)
        time.sleep(0.5)
        applied.clear()  # the snapshot's loads carry seq too: only the paced updates count
        out = work / "commits-optsync.txt"
        process = context.Process(target=writer, args=(url, rate, seconds, rows, str(out)))
        process.start()
        process.join()
        deadline = time.monotonic() + 30
        while len(applied) < int(rate * seconds) and time.monotonic() < deadline:
            pipeline.check()
            time.sleep(0.01)
    finally:
        pipeline.stop()
        store.close()
    # When each record reached the stream: its appended_at, read from the stream file.
    stored: dict[int, float] = {}
    with closing(sqlite3.connect(settings.stream_path)) as conn:
        for data, appended_at in conn.execute("SELECT data, appended_at FROM records"):
            seq = dms.decode(bytes(data)).row.get("seq")
            if seq is not None:
                stored[int(seq)] = appended_at  # the last record per seq: the paced update
    return {
        "raw": raw,
        "stored": latencies(out, stored),
        "optsync": latencies(out, applied),
    }


def latencies(commits: Path, seen: dict[int, float]) -> tuple[float, float, float]:
    values = []
    for line in commits.read_text().splitlines():
        seq, at = line.split()
        if int(seq) in seen:
            values.append((seen[int(seq)] - float(at)) * 1000)
    missing = len(commits.read_text().splitlines()) - len(values)
    if missing:
        say(f"  warning: {missing} commits were not seen")
    # Skip the first second: connection warm-up is not the steady state.
    return percentiles(values[len(values) // 10 :] or values)


def main() -> None:
    logging.getLogger("optsync").setLevel(logging.ERROR)  # the preflight's identity warning
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--only", choices=("log", "snapshot", "latency"), help="run one of the figures"
    )
    args = parser.parse_args()
    tune_gc()  # what optsync run and optsync apply do in their processes
    changes = 20_000 if args.quick else 200_000
    log_rows = 10_000 if args.quick else 50_000
    snapshot_rows = 100_000 if args.quick else 1_000_000
    seconds = 3.0 if args.quick else 10.0
    with (
        tempfile.TemporaryDirectory(dir=args.dir, prefix="optsync-bench-") as tmp,
        running_server() as server,
    ):
        work = Path(tmp)
        say(machine(work, server))
        say()
        if args.only in (None, "log"):
            report_log(bench_raw_and_applied(server, work, changes, log_rows), changes)
        if args.only in (None, "snapshot"):
            report_snapshot(bench_snapshot(server, work, snapshot_rows), snapshot_rows)
        if args.only in (None, "latency"):
            report_latency(bench_latency(server, work, 1000, seconds), seconds)


def report_log(log: dict[str, float], changes: int) -> None:
    say(f"1. pgoutput read, {changes:,} changes in 1,000-row transactions (catch-up)")
    say(f"   receive only (baseline)          {log['receive_rate']:>10,.0f} changes/s")
    say(f"   receive + decode (the ceiling)   {log['decode_rate']:>10,.0f} changes/s")
    say("2. the same backlog through optsync")
    say(f"   capture -> stream (durable)      {log['stored_rate']:>10,.0f} changes/s")
    say(f"   baseline: stream append alone    {log['stream_rate']:>10,.0f} changes/s")
    say(f"   baseline: apply alone            {log['apply_rate']:>10,.0f} changes/s")
    say(
        f"   capture -> stream -> applied     {log['applied_rate']:>10,.0f} changes/s "
        f"({log['applied_seconds']:.1f} s; {log['applied_rate'] / log['decode_rate']:.0%} "
        "of the ceiling; target >= 50,000)"
    )
    say(
        f"   the optsync run layout (capture process, mapping process, apply thread), the writer "
        f"committing meanwhile: {log['run_rate']:,.0f} changes/s (target >= 25,000)"
    )


def report_snapshot(snap: dict[str, float], snapshot_rows: int) -> None:
    say(f"3. snapshot of {snapshot_rows:,} rows")
    say(f"   COPY TO STDOUT (baseline)        {snap['copy_rate']:>10,.0f} rows/s")
    say(
        f"   PostgresSource read (events)     {snap['read_rate']:>10,.0f} rows/s (target >= 50,000)"
    )
    say(f"   snapshot -> stream (durable)     {snap['stored_rate']:>10,.0f} rows/s")
    say(
        f"   snapshot -> applied in engine    {snap['applied_rate']:>10,.0f} rows/s "
        f"({snap['applied_rows']:,} rows)"
    )


def report_latency(lat: dict[str, tuple[float, float, float]], seconds: float) -> None:
    say(f"4. commit -> applied at 1,000 changes/s for {seconds:.0f} s (p50 / p99 / max, ms)")
    for label, key in (
        ("bare pgoutput reader (baseline)", "raw"),
        ("optsync: in the stream (durable)", "stored"),
        ("optsync: applied in the engine", "optsync"),
    ):
        p50, p99, worst = lat[key]
        say(f"   {label:<32} {p50:7.2f} / {p99:7.2f} / {worst:7.2f}")
    say("   target: p99 <= 25 ms")


if __name__ == "__main__":
    main()
