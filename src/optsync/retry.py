"""``Backoff``: how every stage waits between retries of a failure a retry may fix."""

from __future__ import annotations

import logging
import random
import time

__all__ = ("RETRY_MAX_SECONDS", "RETRY_SECONDS", "Backoff")

logger = logging.getLogger("optsync.pipeline")

RETRY_SECONDS = 0.5
"""The first wait after a failure a retry may fix; it doubles up to ``RETRY_MAX_SECONDS``."""
RETRY_MAX_SECONDS = 30.0


class Backoff:
    """Waits between retries: ``RETRY_SECONDS`` doubling to ``RETRY_MAX_SECONDS``, with jitter;
    one WARNING when an outage starts, then at most one every 30 s, and an INFO when it ends."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.failures = 0
        self._logged_at = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failure; returns how long to wait before the next attempt."""
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self._logged_at >= RETRY_MAX_SECONDS:
            self._logged_at = now
            logger.warning("%s retry attempt=%d reason=%s", self.stage, self.failures, exc)
        delay = min(RETRY_SECONDS * 2 ** (self.failures - 1), RETRY_MAX_SECONDS)
        return float(delay * random.uniform(0.8, 1.0))  # noqa: S311 - jitter, not secrecy

    def succeeded(self) -> None:
        if self.failures:
            logger.info("%s recovered after attempts=%d", self.stage, self.failures)
            self.failures = 0
