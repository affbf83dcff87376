"""Pinpoint endpoint files into the engine: ``optsync import-pinpoint``.

Two passes. The first reads every line of every file, with the API's own checks
(``endpoint_patch_from_wire`` and ``validate_patch``), and collects each rejected line as
``file:line: reason``. If any line is rejected nothing is written unless the caller asked to
continue (then the good lines are imported and the rejected ones listed). The second pass hands
the parsed lines to ``EndpointStore.import_endpoints``: one transaction, so a failure part-way
(a rule only the engine can check, such as 15 endpoints per UserId) leaves nothing behind.
``migrate.overlapped.import_files`` runs the two passes at once (the check in a child process,
a batch ahead) and is what the CLI uses to import; ``parse_files`` then ``import_parsed`` is the
dry run.

Decisions:
- The dry run keeps the parsed lines in memory between its passes (about 2.5 KB per endpoint)
  to count new and updated endpoints; the overlapped import keeps only the ids.
- Both passes run with Python's cyclic garbage collector paused (see ``_collector_paused``) and
  JSON lines are decoded by msgspec: together the check pass is twice as fast. Checking files in
  a process pool was measured and not kept: on two shared vCPUs it bought nothing
  (bench/README.md, "Import").
- A line without ``Id`` gets ``stable_endpoint_id(ChannelType, Address)``, so importing the same
  file again updates the same endpoints; Pinpoint's import generated ids of its own.
- ``CreationDate`` and ``CohortId`` of an export line are not kept: the engine sets them when it
  creates an endpoint (the API gives no way to set them either). Everything an EndpointRequest
  carries is kept: OptOut, EndpointStatus, EffectiveDate, RequestId, Attributes, User,
  Metrics, Demographic, Location.
- Each line is written with cause ``import``, ref ``file:line``, so the consent history of an
  endpoint says which line of which file set its OptOut.
- Lines are applied in file order with UpdateEndpoint's rules: a later line for the same Id
  merges into the earlier one, and lines sharing an Address and ChannelType leave the last one
  ACTIVE. An end user's own opt-out (STOP) stays: an import's OptOut NONE does not lift it.
- ``--segment`` creates an IMPORT segment whose members are the imported Ids (Pinpoint's
  ``DefineSegment``); it is created after the endpoints are committed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import msgspec

from optsync.api.wire import endpoint_patch_from_wire
from optsync.engine.endpoints import endpoint_key, validate_patch
from optsync.engine.models import App, Cause, CauseKind, EndpointPatch
from optsync.engine.store import EndpointStore, ImportDefinition, Segment
from optsync.errors import InvalidRequest
from optsync.formats.pinpoint_export import EndpointLine, csv_rows, json_line, stable_endpoint_id
from optsync.migrate.locations import InputFile, open_text

__all__ = ("ImportSummary", "ParsedFiles", "Rejected", "import_parsed", "parse_files")

CAUSE_DETAIL = "optsync import-pinpoint"
SHOWN_REJECTS = 20
"""Rejected lines listed in the summary; the rest are counted."""


@dataclass(frozen=True)
class Rejected:
    """A line that cannot be imported, and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ParsedFiles:
    """What the first pass read: the endpoints to write (with their causes) and the rejects."""

    patches: list[tuple[EndpointPatch, Cause]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    formats: set[str] = field(default_factory=set)
    """``CSV`` and/or ``JSON``."""

    def keys(self) -> list[str]:
        """The distinct endpoint ids of the accepted lines (compared form), in file order."""
        return list(dict.fromkeys(endpoint_key(p.id) for p, _ in self.patches))


def _patch(line: EndpointLine) -> EndpointPatch:
    endpoint_id = line.endpoint_id
    if not endpoint_id:
        channel, address = line.request.get("ChannelType"), line.request.get("Address")
        if not (isinstance(channel, str) and channel and isinstance(address, str) and address):
            raise InvalidRequest(
                "a line without Id needs ChannelType and Address (a new endpoint); give Id to "
                "update an endpoint"
            )
        endpoint_id = stable_endpoint_id(channel, address)
    patch = endpoint_patch_from_wire(line.request, endpoint_id)
    validate_patch(patch)
    return patch


def _is_csv(file: InputFile) -> bool:
    if file.name.lower().endswith((".csv", ".csv.gz")):
        return True
    if file.name.lower().endswith((".json", ".json.gz", ".jsonl", ".ndjson")):
        return False
    try:
        with open_text(file.path) as text:
            for raw in text:
                if raw.strip():
                    return not raw.lstrip().startswith("{")
    except (UnicodeDecodeError, OSError, EOFError):
        pass  # read as JSON lines, whose pass reports the error on its line
    return False


def _json_lines(text: Iterator[str]) -> Iterator[tuple[int, EndpointLine | InvalidRequest]]:
    # msgspec's decoder gives the same dict as ``json.loads``, in a fraction of the time.
    loads = msgspec.json.Decoder().decode
    for n, raw in enumerate(text, 1):
        if not raw.strip():
            continue
        try:
            yield n, json_line(loads(raw))
        except (ValueError, msgspec.DecodeError) as exc:
            yield n, InvalidRequest(f"not JSON: {exc}")
        except InvalidRequest as exc:
            yield n, exc


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one pass of an import.

    Each pass allocates millions of objects and keeps most of them: every collection of the
    oldest generation walks all of them again: a third of the check pass's time was spent so.
    The objects of an import form no cycles, so nothing is left behind while it is paused.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_files(
    files: Sequence[InputFile], on_progress: Callable[[int], None] | None = None
) -> ParsedFiles:
    """Read and check every line of ``files`` (the first pass)."""
    with _collector_paused():
        return _parse_files(files, on_progress)


def _parse_files(
    files: Sequence[InputFile], on_progress: Callable[[int], None] | None
) -> ParsedFiles:
    parsed = ParsedFiles(formats={"CSV" if _is_csv(f) else "JSON" for f in files})
    append, reject = parsed.patches.append, parsed.rejected.append
    done = 0
    for index, n, item in checked_lines(files):
        done += 1
        if done % 10_000 == 0 and on_progress:
            on_progress(10_000)
        if isinstance(item, Rejected):
            reject(item)
        else:
            append((item, Cause(CauseKind.IMPORT, f"{files[index].name}:{n}", CAUSE_DETAIL)))
    if on_progress:
        on_progress(done % 10_000)
    return parsed


def checked_lines(
    files: Sequence[InputFile],
) -> Iterator[tuple[int, int, EndpointPatch | Rejected]]:
    """Every line of ``files``, read and checked: (file index, line number, the endpoint patch
    or why the line is rejected). A file that cannot be read is one rejected line."""
    for index, file in enumerate(files):
        csv_file = _is_csv(file)
        done = 0
        with open_text(file.path) as text:
            try:
                lines = csv_rows(text) if csv_file else _json_lines(iter(text))
                for n, item in lines:
                    done += 1
                    if isinstance(item, InvalidRequest):
                        yield index, n, Rejected(file.name, n, str(item))
                        continue
                    try:
                        patch = _patch(item)
                    except InvalidRequest as exc:
                        yield index, n, Rejected(file.name, n, str(exc))
                        continue
                    yield index, n, patch
            except InvalidRequest as exc:  # a CSV header: the file cannot be read at all
                yield index, 1, Rejected(file.name, 1, str(exc))
            except (UnicodeDecodeError, OSError, EOFError) as exc:
                yield index, done + 1, Rejected(file.name, done + 1, f"cannot read the file: {exc}")


@dataclass
class ImportSummary:
    """What an import did (or, in a dry run, would do)."""

    lines: int
    rejected: list[Rejected]
    new: int
    updated: int
    app: App | None
    app_created: bool
    segment: Segment | None = None
    segment_size: int = 0
    dry_run: bool = False

    def lines_out(self) -> list[str]:
        """The summary, one fact per line; rejected lines first."""
        out = [str(r) for r in self.rejected[:SHOWN_REJECTS]]
        if len(self.rejected) > SHOWN_REJECTS:
            out.append(f"... and {len(self.rejected) - SHOWN_REJECTS} more rejected lines")
        verb = "would import" if self.dry_run else "imported"
        out.append(
            f"{verb} {self.lines - len(self.rejected)} of {self.lines} lines: {self.new} new "
            f"endpoints, {self.updated} updated; {len(self.rejected)} lines rejected"
        )
        if self.app_created:
            out.append(f"app {self.app.name if self.app else ''!r} created" + _id(self.app))
        elif self.dry_run and self.app is None:
            out.append("the app does not exist: it would be created")
        if self.segment is not None:
            out.append(
                f"segment {self.segment.definition.name!r} (IMPORT, Id {self.segment.id}) "
                f"with {self.segment_size} endpoints"
            )
        elif self.segment_size:
            out.append(f"a segment of {self.segment_size} endpoints would be created")
        return out


def _id(app: App | None) -> str:
    return f" (Id {app.id})" if app else ""


def existing_keys(store: EndpointStore, app: App | None, keys: Sequence[str]) -> int:
    """How many of ``keys`` are endpoints of ``app`` already."""
    if app is None or store.count_endpoints(app.id) == 0:
        return 0
    wanted = set(keys)
    return sum(1 for e in store.iter_endpoints(app.id, batch=5000) if endpoint_key(e.id) in wanted)


def import_parsed(
    store: EndpointStore,
    app_name: str,
    parsed: ParsedFiles,
    *,
    source: str,
    segment: str | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """The second pass: write ``parsed`` (unless ``dry_run``) and define the segment."""
    app = store.find_app(app_name)
    keys = parsed.keys()
    updated = existing_keys(store, app, keys)
    summary = ImportSummary(
        lines=len(parsed.patches) + len(parsed.rejected),
        rejected=parsed.rejected,
        new=len(keys) - updated,
        updated=updated,
        app=app,
        app_created=False,
        segment_size=len(keys) if segment else 0,
        dry_run=dry_run,
    )
    if dry_run:
        return summary
    if app is None:
        app = summary.app = store.create_app(app_name)
        summary.app_created = True
    cause = Cause(CauseKind.IMPORT, source, CAUSE_DETAIL)
    with _collector_paused():
        store.import_endpoints(app.id, _counted(parsed.patches, on_progress), cause)
    if segment:
        fmt = "CSV" if parsed.formats == {"CSV"} else "JSON"
        definition = ImportDefinition(format=fmt, s3_url=source, size=len(keys))
        summary.segment = store.create_import_segment(app.id, segment, keys, definition)
    return summary


def _counted(
    patches: list[tuple[EndpointPatch, Cause]], on_progress: Callable[[int], None] | None
) -> Iterator[tuple[EndpointPatch, Cause]]:
    step = 5_000
    for start in range(0, len(patches), step):
        yield from patches[start : start + step]
        if on_progress:
            on_progress(min(step, len(patches) - start))
