"""The real pipeline pieces around a ``PostgresSource``, in-process or as a process to SIGKILL.

``Pieces`` opens what ``optsync run`` uses, in one folder: ``EmbeddedStream(stream.db)``,
``SQLiteStore(engine.db)`` with the sample's app (SMS on, a Country=US segment),
``SQLiteDeadLetterQueue(dlq.db)`` and an ``ApplyWorker`` with the AWS sample's mapping rule.
``capture_step`` does what the pipeline's capture thread does with one batch: append it with
its checkpoint, then acknowledge the source.

As a script it runs capture and apply in two threads until it is killed, printing
``snapshot <rows>`` and ``log <events>`` lines as it goes::

    python tests/integration/postgres_driver.py URL FOLDER TABLE [TABLE...] [--chunk-size N]
        [--batch-delay SECONDS]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from pipeline_pieces import APP, RULE, SEGMENT, Pieces

from optsync.capture.postgres.source import PostgresSource

__all__ = ("APP", "RULE", "SEGMENT", "Pieces")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("folder", type=Path)
    parser.add_argument("tables", nargs="+")
    parser.add_argument("--name", default="postgres")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--batch-delay", type=float, default=0.0)
    args = parser.parse_args()
    pieces = Pieces(args.folder)
    source = PostgresSource(
        args.url, args.tables, name=args.name, chunk_size=args.chunk_size, idle_wait=0.05
    )
    last = pieces.checkpoint(source)
    source.open(last)
    failure: list[BaseException] = []

    def apply() -> None:
        try:
            while True:
                pieces.worker.step(1000, wait=0.05)
        except BaseException as exc:
            failure.append(exc)

    threading.Thread(target=apply, daemon=True).start()
    loaded = logged = 0
    for batch in source.batches(1000):
        if failure:
            raise failure[0]
        last = pieces.capture_step(source, batch, last)
        phase = json.loads(batch.state)["phase"]
        if phase == "snapshot":
            loaded += len(batch.events)
            print(f"snapshot {loaded}", flush=True)
            if args.batch_delay:
                time.sleep(args.batch_delay)
        else:
            logged += len(batch.events)
            print(f"log {logged}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
