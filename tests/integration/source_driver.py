"""The real pipeline pieces around any ``ChangeSource``, as a process the tests SIGKILL.

One driver for every source (it replaced ``mysql_driver.py`` and ``postgres_driver.py``, which
differed only in the class they opened). It runs capture and apply in two threads into
``pipeline_pieces.Pieces`` in FOLDER until it is killed, or until SIGTERM (then it exits 0),
printing ``snapshot <rows>`` and ``log <events>`` lines as it goes::

    python tests/integration/source_driver.py KIND TARGET FOLDER TABLE [TABLE...]
        [--chunk-size N] [--batch-delay SECONDS]

KIND is ``mysql``, ``postgres`` or ``sqlite``; TARGET is the source's URL, or for ``sqlite`` the
database file. ``make_source`` is also how the contract suite opens its sources in-process.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pipeline_pieces import Pieces

from optsync.capture.base import ChangeSource
from optsync.capture.mysql.source import MySQLSource
from optsync.capture.postgres.source import PostgresSource
from optsync.capture.sqlite.source import SQLiteSource
from optsync.errors import Retryable

__all__ = ("KINDS", "make_source")

KINDS = ("mysql", "postgres", "sqlite")


def make_source(
    kind: str,
    target: str,
    tables: Sequence[str],
    *,
    chunk_size: int = 10_000,
    idle_wait: float = 0.05,
) -> ChangeSource:
    """The source of ``kind`` on ``target`` (URL, or file for sqlite), under its default name."""
    if kind == "mysql":
        return MySQLSource(target, tables, chunk_size=chunk_size, idle_wait=idle_wait)
    if kind == "postgres":
        return PostgresSource(target, tables, chunk_size=chunk_size, idle_wait=idle_wait)
    if kind == "sqlite":
        return SQLiteSource(target, tables, chunk_size=chunk_size, idle_wait=idle_wait)
    raise ValueError(f"unknown source kind {kind!r}: use one of {', '.join(KINDS)}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("target")
    parser.add_argument("folder", type=Path)
    parser.add_argument("tables", nargs="+")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--batch-delay", type=float, default=0.0)
    args = parser.parse_args()
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    pieces = Pieces(args.folder)
    source = make_source(args.kind, args.target, args.tables, chunk_size=args.chunk_size)
    last = pieces.checkpoint(source)
    # As the pipeline's capture does: a busy source (SQLite recovering the WAL of the process
    # this one replaces, while the application writes) is tried again, not a failure.
    for attempt in range(20):
        try:
            source.open(last)
            break
        except Retryable:
            if attempt == 19:
                raise
            time.sleep(0.5)
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
