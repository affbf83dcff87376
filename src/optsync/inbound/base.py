"""The ``InboundSource`` interface: where end users' own opt-outs are read from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ("InboundSource", "StopReport")


@dataclass(frozen=True)
class StopReport:
    """One person's own opt-out: their number, when they opted out, and how we know."""

    address: str
    """E.164 phone number."""
    at: str
    """When they opted out: ISO-8601 UTC with milliseconds."""
    keyword: str | None = None


class InboundSource(ABC):
    """A place that knows who opted out by themselves; polled every ``interval`` seconds."""

    name: str
    via: str
    """How reports from here are labelled in the consent history (``eum-sms:<list>``)."""
    interval: float

    @abstractmethod
    def reports(self) -> Iterator[StopReport]:
        """Every end-user opt-out known there now (the caller skips those it recorded)."""

    def close(self) -> None:  # noqa: B027 - most sources hold nothing to release
        """Release connections."""
