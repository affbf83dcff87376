"""Sinks: how fast consent changes leave the engine, and how long an opt-out takes to arrive.

For each sink (the webhook, the EUM SMS opt-out list) a ``SinkRunner`` delivers N opt-outs
written to a SQLite engine, to a local receiver (``tests/servers/webhook_receiver.py``, which
checks every signature) or the stand-in EUM server (``tests/servers/eum_server.py``, driven by
boto3's real client). Baseline, in the same run: the same requests sent straight by a loop,
without the runner, the engine reads and the cursor's transaction: the ratio is what delivery
through the ledger costs. Then a steady 20 opt-outs/s for a few seconds: write -> delivered
latency (median, p99) as the audit reports it (engine time -> delivery time).

    .venv/bin/python bench/sinks.py            # 5,000 opt-outs per sink, 3 runs
    .venv/bin/python bench/sinks.py --quick    # 1,000, 1 run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "servers"))

import boto3
import urllib3
from eum_server import EumServer
from webhook_receiver import SECRET, WebhookReceiver

from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.sinks.base import Sink
from optsync.sinks.eum import EumSmsSink
from optsync.sinks.runner import SinkRunner
from optsync.sinks.settings import EumSinkSettings, WebhookSinkSettings
from optsync.sinks.webhook import WebhookSink, sign

SOURCE = Cause(CauseKind.SOURCE, "")


def number(i: int) -> str:
    return f"+1206{i:07d}"


def engine_with_opt_outs(folder: str, n: int) -> tuple[SQLiteStore, str]:
    store = SQLiteStore(os.path.join(folder, "engine.db"))
    app = store.create_app("bench").id
    for start in range(0, n, 1000):
        store.write_endpoints(
            app,
            [
                EndpointPatch(
                    id=f"u{i}",
                    channel_type=ChannelType.SMS,
                    address=number(i),
                    opt_out=OptOut.ALL,
                    position=f"{i:020d}",
                )
                for i in range(start, min(n, start + 1000))
            ],
            SOURCE,
        )
    return store, app


def drain(store: SQLiteStore, sink: Sink) -> float:
    """Seconds the runner takes to deliver everything after the cursor."""
    runner = SinkRunner(store, sink, "bench")
    started = time.perf_counter()
    while runner.step():
        if all(s.behind == 0 for s in store.sink_states(sink.name)):
            break
    return time.perf_counter() - started


def webhook_direct(url: str, n: int) -> float:
    """The baseline: the same 100-change signed POSTs, from a loop."""
    pool = urllib3.PoolManager()
    started = time.perf_counter()
    for start in range(0, n, 100):
        body = (
            "["
            + ",".join(
                f'{{"id":"x-{i}","address":"{number(i)}","opt_out":"ALL"}}'
                for i in range(start, min(n, start + 100))
            )
            + "]"
        ).encode()
        header = sign(SECRET, body, int(time.time()))
        reply = pool.request(
            "POST",
            url,
            body=body,
            headers={
                "Content-Type": "application/json",
                "Optsync-Signature": header,
                "Optsync-Delivery": str(uuid.uuid4()),
            },
        )
        assert reply.status == 200, reply.status
    return time.perf_counter() - started


def eum_direct(server: EumServer, n: int) -> float:
    client = boto3.client("pinpoint-sms-voice-v2", **server.client_kwargs())
    started = time.perf_counter()
    for i in range(n):
        client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=number(i))
    return time.perf_counter() - started


def latency(store: SQLiteStore, app: str, sink: Sink, rate: float, seconds: float) -> list[float]:
    """Write opt-outs at ``rate``/s while the runner delivers; engine -> delivered, in ms."""
    runner = SinkRunner(store, sink, "bench-latency", poll=0.01)
    runner.start()
    base = 10_000_000
    try:
        for k in range(int(rate * seconds)):
            i = base + k
            store.write_endpoints(
                app,
                [EndpointPatch(id=f"l{i}", channel_type=ChannelType.SMS, address=number(i),
                               opt_out=OptOut.ALL, position=f"{i:020d}")],
                SOURCE,
            )  # fmt: skip
            time.sleep(1 / rate)
        deadline = time.monotonic() + 30
        while any(s.behind for s in store.sink_states(sink.name)):
            assert time.monotonic() < deadline, "the sink did not catch up"
            time.sleep(0.05)
    finally:
        runner.stop()
    waits = []
    for row in store.audit([sink.name], app_id=app):
        sent = row.deliveries.get(sink.name)
        if row.change.endpoint_id.startswith("l") and sent:
            waits.append((_instant(sent) - _instant(row.change.at)) * 1000)
    return sorted(waits)


def _instant(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def measure(
    name: str,
    make_sink: Callable[[], Sink],
    direct: Callable[[int], float],
    n: int,
    runs: int,
) -> None:
    via, straight = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            store, _ = engine_with_opt_outs(folder, n)
            try:
                via.append(n / drain(store, make_sink()))
            finally:
                store.close()
        straight.append(n / direct(n))
    v, s = median(via), median(straight)
    print(f"{name:8} through the runner {v:9,.0f} opt-outs/s   direct loop {s:9,.0f}/s   "
          f"ratio {v / s:.2f}   (median of {runs})")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        store, app = engine_with_opt_outs(folder, 10)
        try:
            waits = latency(store, app, make_sink(), rate=20, seconds=3)
        finally:
            store.close()
    p99 = waits[min(len(waits) - 1, int(len(waits) * 0.99))]
    print(f"{name:8} write -> delivered at 20 opt-outs/s: median {median(waits):.1f} ms, "
          f"p99 {p99:.1f} ms ({len(waits)} opt-outs)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, runs = (1000, 1) if args.quick else (5000, 3)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIDBENCH")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    print(f"sinks: {n:,} opt-outs per run, {os.cpu_count()} CPUs")
    with WebhookReceiver() as receiver:
        settings = WebhookSinkSettings("hook", None, receiver.url, SECRET, 10.0)
        measure("webhook", lambda: WebhookSink(settings), lambda k: webhook_direct(receiver.url, k),
                n, runs)  # fmt: skip
    with EumServer() as server:
        eum = EumSmsSink(
            EumSinkSettings(
                "eum", frozenset({ChannelType.SMS}), "Default", "us-east-1", server.url, False
            )
        )
        measure("eum-sms", lambda: eum, lambda k: eum_direct(server, k), n, runs)


if __name__ == "__main__":
    main()
