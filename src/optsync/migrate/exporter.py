"""Engine endpoints out to files: ``optsync export``.

``pinpoint-ndjson`` writes what Pinpoint's CreateExportJob wrote: gzip files of one
EndpointResponse per line (``endpoint_to_wire``, the API's own shape), named
``part-00000.json.gz``, ``part-00001.json.gz`` ... of at most ``part_size`` endpoints each.
``csv`` writes Pinpoint's import CSV (dotted headers, a repeated header per extra value),
uncompressed since Pinpoint's import refused compressed files, named ``part-00000.csv`` ...

Both re-import with ``optsync import-pinpoint`` to the same endpoints (same Ids and fields; the
engine sets CreationDate and CohortId anew).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from optsync.api.wire import endpoint_to_wire
from optsync.engine.models import App, Endpoint
from optsync.engine.store import EndpointStore, Segment
from optsync.errors import ConfigError
from optsync.formats.pinpoint_export import csv_lines, line_to_export
from optsync.migrate.locations import Output

__all__ = ("DEFAULT_PART_SIZE", "ExportFormat", "ExportSummary", "export_endpoints", "find_segment")

DEFAULT_PART_SIZE = 100_000

_NOT_IN_REQUEST = ("ApplicationId", "CohortId", "CreationDate", "Id")


class ExportFormat(StrEnum):
    PINPOINT_NDJSON = "pinpoint-ndjson"
    CSV = "csv"


@dataclass(frozen=True)
class ExportSummary:
    endpoints: int
    files: list[str]

    def line(self) -> str:
        where = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files"
        return f"exported {self.endpoints} endpoints to {where}"


def find_segment(store: EndpointStore, app: App, name: str) -> Segment:
    """The app's oldest segment called ``name``; ``ConfigError`` if there is none."""
    token: str | None = None
    while True:
        page = store.list_segments(app.id, 100, token)
        for segment in page.items:
            if segment.definition.name == name:
                return segment
        token = page.next_token
        if token is None:
            raise ConfigError(
                f"export: app {app.name!r} has no segment named {name!r}; list them with "
                "GetSegments or the console"
            )


def _parts(endpoints: Iterator[Endpoint], size: int) -> Iterator[list[Endpoint]]:
    part: list[Endpoint] = []
    for endpoint in endpoints:
        part.append(endpoint)
        if len(part) >= size:
            yield part
            part = []
    if part:
        yield part


def _ndjson(part: list[Endpoint]) -> bytes:
    return gzip.compress(b"".join(line_to_export(endpoint_to_wire(e)) for e in part), 6)


def _csv(part: list[Endpoint]) -> bytes:
    rows: list[tuple[str, dict[str, Any]]] = []
    for e in part:
        wire = endpoint_to_wire(e)
        rows.append((e.id, {k: v for k, v in wire.items() if k not in _NOT_IN_REQUEST}))
    return csv_lines(rows).encode()


def export_endpoints(
    store: EndpointStore,
    app: App,
    output: Output,
    *,
    segment: Segment | None = None,
    eligible_only: bool = False,
    fmt: ExportFormat = ExportFormat.PINPOINT_NDJSON,
    part_size: int = DEFAULT_PART_SIZE,
    on_progress: Callable[[int], None] | None = None,
) -> ExportSummary:
    """Write the app's (or the segment's) endpoints as ``fmt`` files into ``output``."""
    if part_size < 1:
        raise ConfigError(f"export: --part-size must be at least 1, not {part_size}")
    endpoints = store.iter_endpoints(
        app.id,
        segment_id=segment.id if segment else None,
        eligible_only=eligible_only,
        batch=5000,
    )
    encode, suffix = (_csv, "csv") if fmt is ExportFormat.CSV else (_ndjson, "json.gz")
    files: list[str] = []
    count = 0
    for n, part in enumerate(_parts(endpoints, part_size)):
        files.append(output.write(f"part-{n:05d}.{suffix}", encode(part)))
        count += len(part)
        if on_progress:
            on_progress(len(part))
    return ExportSummary(count, files)
