"""EmbeddedStream: durable append throughput and append -> read latency.

Baseline, measured in the same run: raw ``sqlite3`` inserting the same encoded bytes into a bare
table (WAL, ``synchronous=FULL``, one transaction per batch), so the ratio is the stream's own
cost (encoding, event-id index, idempotency check, checkpoint) over SQLite's durable commit.

    .venv/bin/python bench/stream.py            # 20,000 events per batch size (3 runs), 2,000
    .venv/bin/python bench/stream.py --quick    # a tenth of that, 1 run
    .venv/bin/python bench/stream.py --dir /mnt/disk   # the files go where the disk is measured
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sqlite3
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import cast

from optsync.events import ChangeEvent, Op, position_of
from optsync.formats.dms import encode
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

BATCH_SIZES = (1, 100, 1000)


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
        f"files in {folder} ({filesystem})"
    )


def events(count: int) -> list[ChangeEvent]:
    """Opt-in/opt-out updates shaped like the sample's users table."""
    return [
        ChangeEvent(
            op=Op.UPDATE,
            table="users",
            schema="app",
            key={"id": n % 5000},
            position=position_of(n),
            after={
                "id": n % 5000,
                "first_name": "Ana",
                "last_name": "Example",
                "phone": f"+1206555{n % 10000:04d}",
                "email": f"user{n}@example.com",
                "sms_opt_in": n % 3 != 0,
                "email_opt_in": n % 2 == 0,
                "updated_at": "2026-11-27T10:00:00.000Z",
            },
            commit_time="2026-11-27T10:00:00.000Z",
            transaction_id=str(n),
        )
        for n in range(1, count + 1)
    ]


def chunks(items: Sequence[ChangeEvent], size: int) -> list[Sequence[ChangeEvent]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stream_append(folder: Path, batches: list[Sequence[ChangeEvent]]) -> float:
    """Seconds to append every batch durably, each with its checkpoint (as capture does)."""
    stream = EmbeddedStream(folder / "stream.db")
    try:
        started = time.perf_counter()
        for batch in batches:
            stream.append(batch, Checkpoint("bench", batch[-1].position))
        return time.perf_counter() - started
    finally:
        stream.close()


def sqlite_insert(folder: Path, batches: list[list[tuple[str, bytes]]]) -> float:
    """Seconds for raw sqlite3 to insert the same bytes, one durable transaction per batch."""
    conn = sqlite3.connect(folder / "baseline.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, key TEXT, data BLOB)")
        started = time.perf_counter()
        for batch in batches:
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO records (key, data) VALUES (?, ?)", batch)
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


@dataclass(frozen=True)
class Latency:
    append: list[float]
    """Seconds each durable ``append`` call took."""
    end_to_end: list[float]
    """Seconds from the ``append`` call to the reader's ``read`` returning the record."""
    wake_up: list[float]
    """Seconds from ``append`` returning to the reader's ``read`` returning the record."""
    rate: float
    """Events the writer managed per second."""


Paced = tuple[dict[int, float], dict[int, float], float]
"""When each append was called and returned (by offset), and the writer's events/s."""


def write_paced(writer: EmbeddedStream, count: int) -> Paced:
    """Appends one event per ms; returns when each append was called and returned, and the rate.

    Times are ``time.perf_counter()``: CLOCK_MONOTONIC on Linux, comparable across processes.
    """
    called: dict[int, float] = {}
    returned: dict[int, float] = {}
    started = time.perf_counter()
    for n, event in enumerate(events(count), start=1):
        delay = started + n * 0.001 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        called[n] = time.perf_counter()
        offset = writer.append([event])
        returned[offset] = time.perf_counter()
    return called, returned, count / (time.perf_counter() - started)


def write_paced_child(path: Path, count: int, results: multiprocessing.Queue[object]) -> None:
    """``write_paced`` in a process of its own, on a stream object of its own."""
    writer = EmbeddedStream(path)
    try:
        results.put(write_paced(writer, count))
    finally:
        writer.close()


def latency(folder: Path, count: int, *, writer_process: bool) -> Latency:
    """The reader loops on ``read(wait=1)`` + ``ack`` while a writer appends one event per ms.

    The writer is another thread of this process (on the same stream object, so ``append`` wakes
    the reader through the condition) or another process (the reader polls ``data_version``).
    """
    path = folder / "stream.db"
    reader = EmbeddedStream(path)
    received: dict[int, float] = {}
    reader.read("bench", 1)  # register the consumer and open the reader's connection first

    def read_all() -> None:
        while len(received) < count:
            records = reader.read("bench", 1000, wait=1)
            now = time.perf_counter()
            for record in records:
                received[record.offset] = now
            if records:
                reader.ack("bench", records[-1].offset)

    try:
        if writer_process:
            context = multiprocessing.get_context("spawn")
            results: multiprocessing.Queue[object] = context.Queue()
            child = context.Process(target=write_paced_child, args=(path, count, results))
            child.start()
            read_all()
            called, returned, rate = cast(Paced, results.get(timeout=60))
            child.join(60)
        else:
            thread = threading.Thread(target=read_all)
            thread.start()
            # Same object: the writer thread shares the reader's stream, as ``optsync up`` does.
            called, returned, rate = write_paced(reader, count)
            thread.join(60)
    finally:
        reader.close()
    return Latency(
        append=[returned[n] - called[n] for n in called],
        end_to_end=[received[n] - called[n] for n in called],
        wake_up=[received[n] - returned[n] for n in called],
        rate=rate,
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:6.2f} ms  p99 {percentile(values, 99) * 1e3:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the events")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    root: Path = args.dir
    appended = 2_000 if args.quick else 20_000
    paced = 200 if args.quick else 2_000
    repeats = 1 if args.quick else 3

    print(machine(root))
    sample = events(appended)
    encoded = [(e.partition_key, encode(e)) for e in sample]
    started = time.perf_counter()
    for event in sample:
        encode(event)
    encode_rate = appended / (time.perf_counter() - started)
    print(f"record size {sum(len(d) for _, d in encoded) / appended:.0f} B (DMS JSON)")
    print(f"encode alone (optsync.formats.dms): {encode_rate:,.0f} events/s\n")

    print(
        f"append throughput, {appended:,} events, durable (synchronous=FULL, WAL),"
        f" median of {repeats} runs"
    )
    print(f"{'batch':>6}  {'EmbeddedStream':>16}  {'raw sqlite3':>16}  {'ratio':>6}")
    for size in BATCH_SIZES:
        batches = chunks(sample, size)
        raw = [encoded[i : i + size] for i in range(0, appended, size)]
        ours: list[float] = []
        base: list[float] = []
        for _ in range(repeats):  # interleaved, so a noisy neighbour hurts both alike
            with tempfile.TemporaryDirectory(dir=root) as folder:
                ours.append(appended / stream_append(Path(folder), batches))
            with tempfile.TemporaryDirectory(dir=root) as folder:
                base.append(appended / sqlite_insert(Path(folder), raw))
        ratio = median(ours) / median(base)
        print(f"{size:>6}  {median(ours):>11,.0f} ev/s  {median(base):>11,.0f} ev/s  {ratio:>6.2f}")

    print(f"\nappend -> read latency, {paced:,} events, one per ms; reader: read(wait=1), ack")
    for writer_process, label in (
        (False, "writer thread, same object (wake-up by Condition)"),
        (True, "writer process (wake-up by data_version polling)"),
    ):
        with tempfile.TemporaryDirectory(dir=root) as folder:
            result = latency(Path(folder), paced, writer_process=writer_process)
        print(f"  {label}: writer reached {result.rate:,.0f} events/s")
        print(f"    append call (durable commit)   {ms(result.append)}")
        print(f"    append call -> read returns    {ms(result.end_to_end)}")
        print(f"    append return -> read returns  {ms(result.wake_up)}")


if __name__ == "__main__":
    main()
