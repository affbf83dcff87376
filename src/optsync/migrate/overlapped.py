"""``import_files``: an import whose check pass runs in a process of its own, one batch ahead
of the write pass.

``Checker(files)`` starts a child that reads, parses and checks every line of ``files``
(``importer.checked_lines``: the API's own checks) and sends them back in batches of
``BATCH_LINES`` (msgpack, the endpoint patches as Structs): accepted lines with their line
numbers, rejected ones with their reason. The importer writes batch n while the child checks
the batches after it, so the whole import takes about as long as the longer of its two passes
instead of their sum, and no pass holds every line in memory. Nothing is written for good
before the check has read the last line: the write pass is one transaction, rolled back when
a rejected line ends the import.

If the child dies, ``batches`` raises ``Fatal`` (the import is then rolled back).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import queue
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec

from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import Cause, CauseKind, EndpointPatch
from optsync.engine.store import EndpointStore, ImportDefinition
from optsync.errors import Fatal
from optsync.migrate.importer import (
    CAUSE_DETAIL,
    ImportSummary,
    Rejected,
    _collector_paused,
    _is_csv,
    checked_lines,
)
from optsync.migrate.locations import InputFile

__all__ = ("BATCH_LINES", "CheckedBatch", "Checker", "ImportRejected", "import_files")

BATCH_LINES = 2_000
"""Lines per batch sent back: large enough that the trip costs little per line, small enough
that the write pass starts at once."""
QUEUE_BATCHES = 8
"""Batches the child may check ahead of the write pass (a few MB)."""


class CheckedBatch(msgspec.Struct, array_like=True):
    """Lines of one file, in order: the accepted ones and the rejected ones."""

    file: int
    """Index of the file in the list given to ``Checker``."""
    patches: list[EndpointPatch]
    lines: list[int]
    """The line number of each patch."""
    rejected: list[tuple[int, str]]
    """(line number, reason) of each rejected line."""
    final: bool = False
    """The last message: every line was checked (``patches`` and ``rejected`` are empty)."""
    error: str | None = None
    """The check stopped on an unexpected error (with ``final``)."""


class Checker:
    """A child process checking the lines of ``files``; see the module docstring."""

    def __init__(self, files: Sequence[InputFile]) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy the engine's connections
        self._queue: multiprocessing.Queue[bytes] = context.Queue(maxsize=QUEUE_BATCHES)
        self._process: BaseProcess = context.Process(
            target=_check,
            args=([(f.name, str(f.path)) for f in files], self._queue),
            name="optsync-import-check",
            daemon=True,
        )
        self._process.start()

    def batches(self) -> Iterator[CheckedBatch]:
        """The checked batches in file and line order, until every line was checked."""
        decode = msgspec.msgpack.Decoder(CheckedBatch).decode
        while True:
            try:
                data = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    raise Fatal(
                        "import-pinpoint: the check process stopped (exit code "
                        f"{self._process.exitcode}); nothing was written"
                    ) from None
                continue
            batch = decode(data)
            if batch.error is not None:
                raise Fatal(f"import-pinpoint: the check stopped: {batch.error}")
            if batch.final:
                return
            yield batch

    def close(self) -> None:
        """Stop the child (at once if it is still checking)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)
        self._queue.close()
        self._queue.join_thread()


def _check(files: list[tuple[str, str]], out: multiprocessing.Queue[bytes]) -> None:
    """The child: check every line, send the batches, then a final message."""
    gc.disable()  # millions of short-lived objects and no cycles (see importer)
    encode = msgspec.msgpack.Encoder().encode
    inputs = [InputFile(name, Path(path)) for name, path in files]
    batch = CheckedBatch(0, [], [], [])

    def send(message: Any) -> None:
        out.put(encode(message))

    try:
        for index, line, item in checked_lines(inputs):
            if index != batch.file or len(batch.lines) + len(batch.rejected) >= BATCH_LINES:
                if batch.lines or batch.rejected:
                    send(batch)
                batch = CheckedBatch(index, [], [], [])
            if isinstance(item, Rejected):
                batch.rejected.append((line, item.reason))
            else:
                batch.patches.append(item)
                batch.lines.append(line)
        if batch.lines or batch.rejected:
            send(batch)
        send(CheckedBatch(0, [], [], [], final=True))
    except Exception as exc:  # reported to the parent, which rolls back
        send(CheckedBatch(0, [], [], [], final=True, error=f"{type(exc).__name__}: {exc}"))
    out.close()
    out.join_thread()


class ImportRejected(Fatal):
    """Lines were rejected and the import was rolled back (``rejected``: all of them)."""

    def __init__(self, rejected: list[Rejected], lines: int) -> None:
        super().__init__(f"{len(rejected)} of {lines} lines rejected; nothing was written")
        self.rejected = rejected
        self.lines = lines


def import_files(
    store: EndpointStore,
    app_name: str,
    files: Sequence[InputFile],
    *,
    source: str,
    segment: str | None = None,
    continue_on_error: bool = False,
    on_checked: Callable[[int], None] | None = None,
    on_written: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Check and write ``files`` into the app (created if missing) with the two passes
    overlapped (``Checker``); one transaction, as ``import_parsed``.

    A rejected line, unless ``continue_on_error``, rolls the import back once every line was
    checked (``ImportRejected`` lists them all), and an app the import created is removed.
    """
    app = store.find_app(app_name)
    before: set[str] = set()
    if app is not None and store.count_endpoints(app.id):
        before = {endpoint_key(e.id) for e in store.iter_endpoints(app.id, batch=5000)}
    created = app is None
    if app is None:
        app = store.create_app(app_name)
    keys: dict[str, None] = {}
    rejected: list[Rejected] = []
    counted = [0]
    checker = Checker(files)

    def accepted(batches: Iterator[CheckedBatch]) -> Iterator[tuple[EndpointPatch, Cause]]:
        for batch in batches:
            name = files[batch.file].name
            counted[0] += len(batch.lines) + len(batch.rejected)
            rejected.extend(Rejected(name, line, reason) for line, reason in batch.rejected)
            if on_checked:
                on_checked(len(batch.lines) + len(batch.rejected))
            if rejected and not continue_on_error:
                for rest in batches:  # read on, to list every rejected line
                    counted[0] += len(rest.lines) + len(rest.rejected)
                    rejected.extend(
                        Rejected(files[rest.file].name, line, reason)
                        for line, reason in rest.rejected
                    )
                raise ImportRejected(rejected, counted[0])
            for patch, line in zip(batch.patches, batch.lines, strict=True):
                keys[endpoint_key(patch.id)] = None
                yield patch, Cause(CauseKind.IMPORT, f"{name}:{line}", CAUSE_DETAIL)
            if on_written:
                on_written(len(batch.lines))

    cause = Cause(CauseKind.IMPORT, source, CAUSE_DETAIL)
    try:
        with _collector_paused():
            store.import_endpoints(app.id, accepted(checker.batches()), cause)
    except BaseException:
        if created:  # the import wrote nothing else; if even this fails, an empty app stays
            with contextlib.suppress(Exception):
                store.delete_app(app.id)
        raise
    finally:
        checker.close()
    updated = len(before.intersection(keys))
    summary = ImportSummary(
        lines=counted[0],
        rejected=rejected,
        new=len(keys) - updated,
        updated=updated,
        app=app,
        app_created=created,
        segment_size=len(keys) if segment else 0,
    )
    if segment:
        formats = {"CSV" if _is_csv(f) else "JSON" for f in files}
        definition = ImportDefinition(
            format="CSV" if formats == {"CSV"} else "JSON", s3_url=source, size=len(keys)
        )
        summary.segment = store.create_import_segment(app.id, segment, list(keys), definition)
    return summary
