"""Process-wide settings of optsync's long-running processes (the pipeline, the API server).

Garbage collection: a full pass of CPython's cyclic collector walks every live object, and a
streaming process holds hundreds of thousands (phone-number and mapping caches, stream and
engine state). Left at the defaults, such a pass ran every few seconds under load and stalled
the apply loop for 50-300 ms (``bench/pipeline.py``: commit -> applied p99 212 ms at 1,000
changes/s, 5.9 ms with full passes kept out of the way). ``tune_gc`` freezes what start-up
allocated (never walked again) and makes full passes rare; ``IdleCollector`` runs them when the
process has nothing else to do, so memory held by garbage cycles stays bounded.
"""

from __future__ import annotations

import gc
import time

__all__ = ("GC_THRESHOLDS", "IdleCollector", "tune_gc")

GC_THRESHOLDS = (10_000, 10, 1_000)
"""Young passes every 10,000 net allocations (default 700); a full pass only after 1,000 middle
passes (default 10), i.e. about every 100 million allocations."""


def tune_gc() -> None:
    """Freeze the objects alive now and set ``GC_THRESHOLDS`` (idempotent)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class IdleCollector:
    """Run a full collection when idle, at most once every ``every`` seconds."""

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._last = time.monotonic()

    def idle(self) -> None:
        """Call when a loop found no work."""
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            gc.collect()
