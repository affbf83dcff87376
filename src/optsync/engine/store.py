"""The ``EndpointStore`` interface: the engine's storage, one implementation per database.

Every implementation passes ``tests/contract/test_store_contract.py``. Writes are atomic per
call (a batch applies whole or not at all); segment filters and estimates run in SQL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from optsync.engine.api_keys import ApiKeyStore
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

__all__ = ("EndpointStore", "ImportDefinition", "Segment")


@dataclass(frozen=True)
class ImportDefinition:
    """Where the members of an IMPORT segment came from (Pinpoint's SegmentImportResource)."""

    format: str
    """``CSV`` or ``JSON`` (newline-delimited), as Pinpoint's ``Format``."""
    s3_url: str
    """The file the endpoints were read from: a path or an ``s3://`` URL."""
    external_id: str = ""
    size: int = 0
    """Endpoints listed in the file."""
    channel_counts: Mapping[str, int] = field(default_factory=dict)
    """Members that exist, per channel type, when the segment was read (filled in by the
    store's get/list/update/delete of segments; ignored by ``create_import_segment``)."""


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
    import_definition: ImportDefinition | None = None
    """Set on IMPORT segments (``segment_type == "IMPORT"``), whose members are a fixed list."""


class EndpointStore(ConsentLedger, ApiKeyStore, ABC):
    """Apps, channels, endpoints, segments and consent history of the engine, the consent
    ledger built on that history (``optsync.engine.ledger``) and the scoped API keys
    (``optsync.engine.api_keys``)."""

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
    def import_endpoints(
        self,
        app_id: str,
        patches: Iterable[EndpointPatch | tuple[EndpointPatch, Cause]],
        cause: Cause,
    ) -> WriteResult:
        """Bulk load of an import file: the same rules and consent history as
        ``write_endpoints``, all in one transaction; an item may carry its own cause (its file
        and line). Endpoints that are new and touch no other endpoint are inserted set-based."""

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
    def create_import_segment(
        self, app_id: str, name: str, endpoint_ids: Iterable[str], source: ImportDefinition
    ) -> Segment:
        """A new IMPORT segment whose members are exactly ``endpoint_ids`` (compared
        case-insensitively, repeats counted once), in one transaction: it exists with all its
        members or not at all. The ids are read from the iterable in batches, never held whole.

        Members need not exist as endpoints: the estimate and ``iter_endpoints`` count those
        that exist when asked, so a deleted endpoint drops out and one created again with the
        same id comes back.
        """

    @abstractmethod
    def update_segment(
        self, app_id: str, segment_id: str, definition: SegmentDefinition
    ) -> Segment:
        """Add a new version; fields the definition leaves out are kept from the latest.

        An IMPORT segment takes a new name and tags only: its members are the imported list,
        so Dimensions or SegmentGroups are refused (``InvalidRequest`` naming the field). A
        DIMENSIONAL segment may use it as a source segment instead.
        """

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
    def delete_segment(self, app_id: str, segment_id: str) -> Segment:
        """Delete every version of the segment, and the member list of an IMPORT segment."""

    @abstractmethod
    def estimate(self, app_id: str, segment_id: str, version: int | None = None) -> Estimate:
        """Endpoints matching the segment, and how many of them are eligible.

        An IMPORT segment: its members that exist as endpoints, and how many are eligible.
        """

    @abstractmethod
    def iter_endpoints(
        self,
        app_id: str,
        *,
        segment_id: str | None = None,
        eligible_only: bool = False,
        batch: int = 1000,
    ) -> Iterator[Endpoint]:
        """Every endpoint of the app, or of the segment's latest version, by id (as compared:
        case-insensitively), read in keyset pages of ``batch`` rows, each page in a read of its
        own (an endpoint written meanwhile may or may not be seen).

        A DIMENSIONAL segment: the endpoints its filter matches now (the estimate's filter); an
        IMPORT segment: its members that exist. ``eligible_only``: only those the estimate
        counts as eligible (ACTIVE and OptOut NONE). The app and the segment are looked up at
        the call (``NotFound``), before the first endpoint is read.
        """

    @abstractmethod
    def close(self) -> None: ...
