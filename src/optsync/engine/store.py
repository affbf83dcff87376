"""The ``EndpointStore`` interface: the engine's storage, one implementation per database.

Every implementation passes ``tests/contract/test_store_contract.py``. Writes are atomic per
call (a batch applies whole or not at all); segment filters and estimates run in SQL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optsync.engine.ledger import ConsentLedger
from optsync.engine.models import (
    App,
    Cause,
    Channel,
    ChannelType,
    ConsentChange,
    Endpoint,
    EndpointDelete,
    EndpointPatch,
    Estimate,
    Page,
    WriteResult,
)
from optsync.engine.segments import SegmentDefinition

__all__ = ("EndpointStore", "Segment")


@dataclass(frozen=True)
class Segment:
    """One version of a segment."""

    app_id: str
    id: str
    arn: str
    version: int
    segment_type: str
    creation_date: str
    last_modified_date: str
    definition: SegmentDefinition


class EndpointStore(ConsentLedger, ABC):
    """Apps, channels, endpoints, segments and consent history of the engine, and the consent
    ledger built on that history (``optsync.engine.ledger``)."""

    # apps -------------------------------------------------------------------------------------
    @abstractmethod
    def create_app(self, name: str, tags: Mapping[str, str] | None = None) -> App: ...

    @abstractmethod
    def get_app(self, app_id: str) -> App:
        """Raise ``NotFound`` if there is no such app."""

    @abstractmethod
    def find_app(self, name: str) -> App | None:
        """The oldest app with this name, if any."""

    @abstractmethod
    def list_apps(self, page_size: int, token: str | None) -> Page[App]: ...

    @abstractmethod
    def delete_app(self, app_id: str) -> App:
        """Delete the app with its channels, endpoints, segments and history."""

    # channels ---------------------------------------------------------------------------------
    @abstractmethod
    def put_channel(
        self,
        app_id: str,
        channel_type: ChannelType,
        enabled: bool | None,
        settings: Mapping[str, str | int | bool],
    ) -> Channel:
        """Create or update a channel; settings merge by key, the version goes up by one."""

    @abstractmethod
    def get_channel(self, app_id: str, channel_type: ChannelType) -> Channel: ...

    @abstractmethod
    def list_channels(self, app_id: str) -> list[Channel]: ...

    @abstractmethod
    def delete_channel(self, app_id: str, channel_type: ChannelType) -> Channel: ...

    # endpoints --------------------------------------------------------------------------------
    @abstractmethod
    def write_endpoints(
        self,
        app_id: str,
        writes: Sequence[EndpointPatch | EndpointDelete],
        cause: Cause,
        *,
        durable: bool = True,
    ) -> WriteResult:
        """Apply upserts and deletes atomically, in order.

        A write with a ``position`` is skipped (counted ``stale``) when the endpoint, or the
        tombstone of its deletion, already holds an equal or newer position. With a SOURCE
        cause, each positioned write is recorded in the consent history under its own position.

        ``durable=False`` returns once the writes are committed and visible to every reader,
        possibly before they reached the disk: they survive a crash of this process but maybe
        not a power cut, until the next ``sync``. Only a caller that can write them again after
        a power cut uses it: the apply worker, which acknowledges the stream after ``sync``.
        """

    @abstractmethod
    def sync(self) -> None:
        """Make every write committed so far durable (those written with ``durable=False``)."""

    @abstractmethod
    def get_endpoint(self, app_id: str, endpoint_id: str) -> Endpoint: ...

    @abstractmethod
    def delete_endpoint(self, app_id: str, endpoint_id: str, cause: Cause) -> Endpoint:
        """Delete and return the endpoint; raise ``NotFound`` if there is none."""

    @abstractmethod
    def get_user_endpoints(self, app_id: str, user_id: str) -> list[Endpoint]: ...

    @abstractmethod
    def delete_user_endpoints(self, app_id: str, user_id: str, cause: Cause) -> list[Endpoint]: ...

    @abstractmethod
    def find_endpoints(self, app_id: str, address: str, limit: int = 100) -> list[Endpoint]:
        """Endpoints whose Address is exactly ``address`` (any channel), by id."""

    @abstractmethod
    def consent_history(self, app_id: str, endpoint_id: str) -> list[ConsentChange]:
        """Every OptOut change of the endpoint, oldest first (kept after deletion)."""

    @abstractmethod
    def count_endpoints(self, app_id: str) -> int: ...

    # segments ---------------------------------------------------------------------------------
    @abstractmethod
    def create_segment(self, app_id: str, definition: SegmentDefinition) -> Segment: ...

    @abstractmethod
    def update_segment(
        self, app_id: str, segment_id: str, definition: SegmentDefinition
    ) -> Segment:
        """Add a new version; fields the definition leaves out are kept from the latest."""

    @abstractmethod
    def get_segment(self, app_id: str, segment_id: str, version: int | None = None) -> Segment: ...

    @abstractmethod
    def list_segments(self, app_id: str, page_size: int, token: str | None) -> Page[Segment]:
        """The latest version of each segment."""

    @abstractmethod
    def list_segment_versions(
        self, app_id: str, segment_id: str, page_size: int, token: str | None
    ) -> Page[Segment]: ...

    @abstractmethod
    def delete_segment(self, app_id: str, segment_id: str) -> Segment: ...

    @abstractmethod
    def estimate(self, app_id: str, segment_id: str, version: int | None = None) -> Estimate:
        """Endpoints matching the segment, and how many of them are eligible."""

    @abstractmethod
    def close(self) -> None: ...
