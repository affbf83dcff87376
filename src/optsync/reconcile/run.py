"""One reconciliation: the engine's endpoints against the source's rows, then the drifting ones
checked again, then (``repair``) the source's truth written through the position guard.

Order of the passes, and why:

1. The engine's endpoints of the app, in id order, in keyset pages (``iter_endpoints``); the
   compared fields of each are held in memory (``Held``), keyed the engine's way.
2. The source's rows, table by table in key order, in chunks (``SourceReader.chunks``); each is
   mapped as a ``load`` event and compared with the endpoint held for its id, which is then
   taken out. What remains, if it holds a source position, is EXTRA (endpoints created through
   the API without one are not the source's).
3. The re-check: the log's position P is read first, then every drifting row is read again
   (a keyless table: the whole table again, since a row cannot be found by key) and its
   endpoint too. What no longer differs was moving while the passes ran and is counted as
   ``changing``, not drift. An EXTRA endpoint whose source position moved meanwhile is changing.
4. ``repair``: the re-read rows as endpoint writes at ``P + REPAIR_SUFFIX`` (see
   ``optsync.reconcile.base``), EXTRA endpoints as deletes at that position, all with a SOURCE
   cause whose detail names reconcile, through ``EndpointStore.write_endpoints``: the position
   guard decides as for any captured change.

An endpoint whose OptOut ALL comes from the end user's own opt-out (a STOP reply, which holds it
opted out until an explicit opt-in) is not drift, though the source still says opted in.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from optsync.apply.mapping import Mapper, MappingError
from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import Cause, CauseKind, EndpointDelete, EndpointPatch, OptOut
from optsync.engine.store import EndpointStore
from optsync.errors import NotFound
from optsync.events import ChangeEvent
from optsync.reconcile.base import REPAIR_SUFFIX, SourceReader, TableRef
from optsync.reconcile.compare import (
    Drift,
    DriftKind,
    Expected,
    Held,
    differences,
    may_be_inactive,
    mysql_lineage,
)

__all__ = ("REPAIR_DETAIL", "Progress", "RepairResult", "Report", "reconcile", "repair")

logger = logging.getLogger(__name__)

REPAIR_DETAIL: Final = "optsync reconcile --repair"
"""The consent history's detail of every write a repair makes."""
WRITE_BATCH: Final = 500

Progress = Callable[[str, int, int | None], None]
"""(what is read, items done, items expected or None)."""


@dataclass
class Report:
    """What one reconciliation found."""

    rows: int = 0
    """Source rows read."""
    endpoints: int = 0
    """Engine endpoints of the app read."""
    unmappable: int = 0
    """Rows the mapping rules refuse (their reasons go to the DLQ when captured)."""
    duplicates: int = 0
    """Rows that map to an endpoint id an earlier row mapped to (the later change wins there)."""
    changing: int = 0
    """Differences seen by the passes that were gone at the re-check."""
    held_by_end_user: int = 0
    """Endpoints opted out by the end user (STOP) while the source says opted in: not drift."""
    drifts: list[Drift] = field(default_factory=list)
    position: str = ""
    """The repair position: the log's position at the re-check plus ``REPAIR_SUFFIX``."""

    def counts(self) -> Counter[DriftKind]:
        """Drifting endpoints per kind (an endpoint may count under several)."""
        return Counter(kind for d in self.drifts for kind in d.kinds)


@dataclass(frozen=True)
class RepairResult:
    written: int
    """Writes the engine applied."""
    stale: int
    """Writes the position guard skipped: the endpoint holds a newer position (a change that
    committed after the re-check, or a position from a reset source log)."""
    missing: int
    """Deletes of endpoints already gone."""


def reconcile(
    store: EndpointStore,
    app_id: str,
    reader: SourceReader,
    mapper: Mapper,
    *,
    chunk: int = 1000,
    progress: Progress | None = None,
) -> Report:
    """Compare the engine's endpoints of ``app_id`` with the source's rows (see the module)."""
    report = Report()
    held: dict[str, Held] = {}
    lineage: int | None = None
    total = store.count_endpoints(app_id)
    for e in store.iter_endpoints(app_id, batch=chunk):
        held[endpoint_key(e.id)] = Held.of(e)
        found = mysql_lineage(e.source_position)
        if found is not None and (lineage is None or found > lineage):
            lineage = found
        report.endpoints += 1
        if progress is not None and report.endpoints % chunk == 0:
            progress("engine", report.endpoints, total)
    if progress is not None:
        progress("engine", report.endpoints, report.endpoints)

    seen: set[str] = set()
    candidates: dict[str, Expected | None] = {}
    first: dict[str, Held | None] = {}
    for table in reader.tables():
        expected_rows = reader.count(table)
        done = 0
        for events in reader.chunks(table, chunk):
            for event in events:
                for patch in _patches(mapper, event, report):
                    key = endpoint_key(patch.id)
                    if key in seen:
                        report.duplicates += 1
                        continue
                    seen.add(key)
                    h = held.pop(key, None)
                    kinds = differences(patch, h)
                    if kinds or (h is not None and may_be_inactive(patch, h)):
                        candidates[key] = Expected(patch, table, event.key)
                        first[key] = h
            done += len(events)
            report.rows += len(events)
            if progress is not None:
                progress(table.name, done, expected_rows)
    for key, h in held.items():
        if h.position is not None:
            candidates[key] = None
            first[key] = h
    del held, seen

    report.position = reader.position(lineage) + REPAIR_SUFFIX
    again = _read_again(reader, mapper, [e for e in candidates.values() if e is not None])
    for key, expected in candidates.items():
        drift = _check(store, app_id, key, expected, first[key], again, report)
        if drift is not None:
            report.drifts.append(drift)
    logger.info(
        "reconcile done rows=%d endpoints=%d drifting=%d changing=%d",
        report.rows,
        report.endpoints,
        len(report.drifts),
        report.changing,
    )
    return report


def _patches(mapper: Mapper, event: ChangeEvent, report: Report) -> list[EndpointPatch]:
    try:
        mapped = mapper.map(event)
    except MappingError:
        report.unmappable += 1
        return []
    if mapped.failed:
        report.unmappable += 1
    return [w for w in mapped.writes if isinstance(w, EndpointPatch)]


def _read_again(
    reader: SourceReader, mapper: Mapper, expected: Sequence[Expected]
) -> dict[str, Expected | None]:
    """endpoint key -> what the source's rows say now (None: no row maps to it any more)."""
    wanted = {endpoint_key(e.patch.id) for e in expected}
    now: dict[str, Expected | None] = dict.fromkeys(wanted)
    scratch = Report()
    keyless: set[TableRef] = set()
    for e in expected:
        if not e.table.keyed:
            keyless.add(e.table)
            continue
        event = reader.row(e.table, e.key)
        if event is not None:
            _take(mapper, event, e.table, wanted, now, scratch)
    for table in keyless:
        for events in reader.chunks(table, 1000):
            for event in events:
                _take(mapper, event, table, wanted, now, scratch)
    return now


def _take(
    mapper: Mapper,
    event: ChangeEvent,
    table: TableRef,
    wanted: set[str],
    now: dict[str, Expected | None],
    scratch: Report,
) -> None:
    for patch in _patches(mapper, event, scratch):
        key = endpoint_key(patch.id)
        if key in wanted and now.get(key) is None:
            now[key] = Expected(patch, table, event.key)


def _check(
    store: EndpointStore,
    app_id: str,
    key: str,
    expected: Expected | None,
    seen_first: Held | None,
    again: dict[str, Expected | None],
    report: Report,
) -> Drift | None:
    """The drift of one endpoint after reading it and its row again; None if there is none."""
    endpoint_id = expected.patch.id if expected else seen_first.id if seen_first else key
    try:
        h: Held | None = Held.of(store.get_endpoint(app_id, endpoint_id))
    except NotFound:
        h = None
    if expected is None:  # EXTRA: no row mapped to it during the pass
        if h is None or seen_first is None or h.position != seen_first.position:
            report.changing += 1
            return None
        return Drift(h.id, (DriftKind.EXTRA,), None, h)
    now = again.get(key)
    kinds = differences(now.patch if now else None, h)
    if now is not None and h is not None:
        if DriftKind.OPT_OUT in kinds and _held_by_end_user(store, app_id, h):
            kinds.remove(DriftKind.OPT_OUT)
            report.held_by_end_user += 1
        if not kinds and may_be_inactive(now.patch, h) and _address_free(store, app_id, h):
            kinds.append(DriftKind.INACTIVE)
    if not kinds:
        report.changing += 1
        return None
    return Drift(h.id if h else endpoint_id, tuple(kinds), now, h)


def _held_by_end_user(store: EndpointStore, app_id: str, h: Held) -> bool:
    """The endpoint's OptOut ALL came from the end user's own opt-out (a STOP reply)."""
    if h.opt_out is not OptOut.ALL:
        return False
    changes = [
        c for c in store.consent_history(app_id, h.id) if c.opt_out_before != c.opt_out_after
    ]
    return bool(changes) and changes[-1].cause.kind is CauseKind.END_USER


def _address_free(store: EndpointStore, app_id: str, h: Held) -> bool:
    """No other endpoint holds the address ACTIVE on the endpoint's channel."""
    assert h.address is not None
    mine = endpoint_key(h.id)
    return not any(
        endpoint_key(e.id) != mine and e.channel_type is h.channel and Held.of(e).active
        for e in store.find_endpoints(app_id, h.address, limit=1000)
    )


def repair(
    store: EndpointStore,
    app_id: str,
    report: Report,
    on_written: Callable[[int], None] | None = None,
) -> RepairResult:
    """Write the source's truth for every drift of ``report`` through the position guard."""
    position = report.position
    deletes: list[EndpointPatch | EndpointDelete] = [
        EndpointDelete(d.endpoint_id, position=position)
        for d in report.drifts
        if d.expected is None
    ]
    upserts: list[EndpointPatch | EndpointDelete] = [
        msgspec.structs.replace(d.expected.patch, position=position)
        for d in report.drifts
        if d.expected is not None
    ]
    cause = Cause(CauseKind.SOURCE, position, REPAIR_DETAIL)
    written = stale = missing = 0
    # Deletes first: an address an EXTRA endpoint held ACTIVE is free for the rows' endpoints.
    for batch in _batches([*deletes, *upserts]):
        result = store.write_endpoints(app_id, batch, cause)
        written, stale, missing = (
            written + result.applied,
            stale + result.stale,
            missing + result.missing,
        )
        if on_written is not None:
            on_written(len(batch))
    logger.info(
        "reconcile repair written=%d stale=%d missing=%d position=%s",
        written,
        stale,
        missing,
        position,
    )
    return RepairResult(written, stale, missing)


def _batches(
    writes: Sequence[EndpointPatch | EndpointDelete],
) -> Iterable[Sequence[EndpointPatch | EndpointDelete]]:
    for start in range(0, len(writes), WRITE_BATCH):
        yield writes[start : start + WRITE_BATCH]
