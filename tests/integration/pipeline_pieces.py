"""The real pipeline pieces shared by the capture drivers: stream, engine, DLQ, apply worker.

The capture tests and the source contract suite run every source against these, in-process
or as a process they SIGKILL (``source_driver.py``).
"""

from __future__ import annotations

from pathlib import Path

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper, MappingRule
from optsync.apply.worker import ApplyWorker
from optsync.capture.base import CaptureBatch, ChangeSource
from optsync.engine.models import ChannelType
from optsync.engine.segments import definition_from_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.pipeline import SYNC_SECONDS
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
        self.dlq = SQLiteDeadLetterQueue(folder / "dlq.db")
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
        self.worker = ApplyWorker(
            self.stream, Mapper(rules), self.store, app.id, self.dlq, sync_interval=SYNC_SECONDS
        )

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
