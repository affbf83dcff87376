"""The real pipeline pieces around a ``MySQLSource``, in-process or as a process to SIGKILL.

``Pieces`` opens what ``optsync run`` uses, in one folder: ``EmbeddedStream(stream.db)``,
``SQLiteStore(engine.db)`` with the sample's app (SMS on, a Country=US segment),
``DeadLetterQueue(dlq.db)`` and an ``ApplyWorker`` with the AWS sample's mapping rule.
``capture_step`` does what the pipeline's capture thread does with one batch: append it with
its checkpoint, then acknowledge the source.

As a script it runs capture and apply in two threads until it is killed (or gets SIGTERM),
printing ``snapshot <rows>`` and ``log <events>`` lines as it goes::

    python tests/integration/mysql_driver.py URL FOLDER TABLE [TABLE...] [--chunk-size N]
        [--batch-delay SECONDS]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from optsync.apply.dlq import DeadLetterQueue
from optsync.apply.mapping import Mapper, MappingRule
from optsync.apply.worker import ApplyWorker
from optsync.capture.base import CaptureBatch, ChangeSource
from optsync.capture.mysql import MySQLSource
from optsync.engine.models import ChannelType
from optsync.engine.segments import definition_from_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

RULE = MappingRule(table="optin_status", address="phone", user_id="userid", opt_in="optin")
APP = "optin-demo"
SEGMENT = "US-Segment"


class Pieces:
    """Stream, engine (app + segment), DLQ and apply worker in ``folder``."""

    def __init__(self, folder: Path, rules: tuple[MappingRule, ...] = (RULE,)) -> None:
        self.folder = folder
        self.stream = EmbeddedStream(folder / "stream.db")
        self.store = SQLiteStore(folder / "engine.db")
        self.dlq = DeadLetterQueue(folder / "dlq.db")
        app = self.store.find_app(APP) or self.store.create_app(APP)
        self.app_id = app.id
        self.store.put_channel(app.id, ChannelType.SMS, True, {})
        segments = self.store.list_segments(app.id, 100, None).items
        found = [s for s in segments if s.definition.name == SEGMENT]
        if found:
            self.segment_id = found[0].id
        else:
            definition = definition_from_wire(
                {
                    "Name": SEGMENT,
                    "Dimensions": {
                        "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
                    },
                },
                require_name=True,
            )
            self.segment_id = self.store.create_segment(app.id, definition).id
        self.worker = ApplyWorker(self.stream, Mapper(rules), self.store, app.id, self.dlq)

    def checkpoint(self, source: ChangeSource) -> str | None:
        saved = self.stream.checkpoint(source.name)
        return None if saved is None else saved.state

    def capture_step(self, source: ChangeSource, batch: CaptureBatch, last: str | None) -> str:
        """Append the batch and its checkpoint durably, then acknowledge (the pipeline's order)."""
        if batch.events or batch.state != last:
            self.stream.append(batch.events, Checkpoint(source.name, batch.state))
            source.acknowledge(batch.state)
        return batch.state

    def apply_all(self) -> int:
        """Apply every record in the stream; how many."""
        total = 0
        while True:
            done = self.worker.step(1000, wait=0.0)
            if done == 0:
                return total
            total += done

    def estimate(self) -> tuple[int, int]:
        estimate = self.store.estimate(self.app_id, self.segment_id)
        return estimate.total, estimate.eligible

    def close(self) -> None:
        self.stream.close()
        self.dlq.close()
        self.store.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("folder", type=Path)
    parser.add_argument("tables", nargs="+")
    parser.add_argument("--name", default="mysql")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--batch-delay", type=float, default=0.0)
    args = parser.parse_args()
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    pieces = Pieces(args.folder)
    source = MySQLSource(
        args.url, args.tables, name=args.name, chunk_size=args.chunk_size, idle_wait=0.05
    )
    last = pieces.checkpoint(source)
    source.open(last)
    failure: list[BaseException] = []

    def apply() -> None:
        try:
            while not stop.is_set():
                pieces.worker.step(1000, wait=0.05)
        except BaseException as exc:
            failure.append(exc)
            stop.set()

    applier = threading.Thread(target=apply, daemon=True)
    applier.start()
    loaded = logged = 0
    try:
        for batch in source.batches(1000):
            if failure:
                raise failure[0]
            if stop.is_set():
                break
            last = pieces.capture_step(source, batch, last)
            phase = json.loads(batch.state)["phase"]
            if phase == "snapshot" and batch.events:
                loaded += len(batch.events)
                print(f"snapshot {loaded}", flush=True)
                if args.batch_delay:
                    time.sleep(args.batch_delay)
            elif batch.events:
                logged += len(batch.events)
                print(f"log {logged}", flush=True)
    finally:
        stop.set()
        applier.join(10)
        source.close()
        pieces.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
