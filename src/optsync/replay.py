"""Replay recorded change records from files into the pipeline's stream.

``optsync replay --format dms|debezium|kinesis-event PATH...`` reads each PATH (a file, a
``.gz`` file, or a folder: its files in name order), turns every record into a ``ChangeEvent``
and appends it to the stream as optsync's DMS record, keyed by the event's partition key, so
``optsync run``/``apply`` applies it with the same mapping rules as captured changes.

Formats:

- ``dms``: NDJSON of AWS DMS -> Kinesis records (``optsync.formats.dms``), blank lines skipped.
- ``debezium``: NDJSON of Debezium record values, with or without the JSON converter's
  ``schema``/``payload`` wrapper. Tombstones (a ``null`` value) and heartbeats are skipped.
- ``kinesis-event``: a Lambda Kinesis event (``{"Records": [{"kinesis": {"data": base64,
  "sequenceNumber": ...}}]}``) whose data are DMS records.

Control records (DMS ``create-table``, ``drop-table``, ``awsdms_apply_exceptions``, Debezium
schema changes and transaction markers) are skipped and counted; a record that cannot be read
goes to the dead-letter queue with its reason and ``file:line`` (for a Kinesis event,
``file#index``), and the replay goes on.

Positions: a real DMS record carries no optsync position, so one is derived that orders one
row's changes:

1. the record's ``stream-position`` when present (``dms.decode`` zero-pads it);
2. else, for ``kinesis-event``, the shard's ``sequenceNumber`` zero-padded to 64 digits;
3. else, for NDJSON, the commit time (``commit-timestamp``, or DMS's ``timestamp``), then the
   file's index among the PATHs and the record's line number, zero-padded.

Guaranteed order: the changes of one row within one file (or one Kinesis shard) apply in the
order they were written; across files, in the order the files are named (folders in name
order). Records without a stream position whose commit times go backwards across files are
ordered by commit time, not by file. Mixing records with and without ``stream-position`` for
one row gives no order between the two kinds.

Partition keys: a DMS record does not say which columns form the key, so a replayed DMS
record's key is empty and its partition key is ``schema.table.``: every change of a table goes
to one partition, in file order. Records are appended as they are (``append_raw``), so a file
replayed twice is stored twice; the engine's position guard makes the second copy harmless.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, cast

import msgspec

from optsync.apply.dlq import DeadLetterQueue
from optsync.errors import ConfigError
from optsync.events import ChangeEvent
from optsync.formats import dms
from optsync.formats.debezium import decode_debezium
from optsync.stream.base import ChangeStream

__all__ = (
    "DLQ_CONSUMER",
    "InputFormat",
    "ReplaySummary",
    "count_records",
    "input_files",
    "replay",
)

logger = logging.getLogger(__name__)

DLQ_CONSUMER = "replay"
"""The DLQ consumer name of records ``optsync replay`` could not read."""
BATCH_SIZE = 1000
SEQUENCE_WIDTH = 64
"""Digits of a zero-padded Kinesis sequence number (they have up to 56)."""
_SKIPPED_DEBEZIUM = frozenset({"tombstone", "heartbeat"})
_DECODER = msgspec.json.Decoder()


class InputFormat(StrEnum):
    DMS = "dms"
    DEBEZIUM = "debezium"
    KINESIS_EVENT = "kinesis-event"


@dataclass
class ReplaySummary:
    """What a replay did."""

    appended: int = 0
    control: int = 0
    """Control records skipped (DMS control, Debezium schema change or transaction marker)."""
    tombstones: int = 0
    """Debezium tombstones and heartbeats skipped."""
    dead_letters: int = 0
    files: list[Path] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"replay: {self.appended} records appended, {self.control} control records "
            f"skipped, {self.tombstones} tombstones/heartbeats skipped, "
            f"{self.dead_letters} dead letters"
        )


@dataclass(frozen=True)
class _Raw:
    """One record as read from a file, before decoding."""

    where: str
    """``file:line`` or ``file#index``: what a dead letter names."""
    data: bytes
    fallback: str | None


def input_files(paths: Sequence[Path]) -> list[Path]:
    """The files of ``paths`` (a folder: its files in name order); ``ConfigError`` if missing."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"replay: {path} does not exist: name a file or a folder of files")
    return files


def _open(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return cast("IO[bytes]", gzip.open(path, "rb"))
    return path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            stripped = line.strip()
            if stripped:
                yield number, stripped


def _ndjson(path: Path, index: int, fmt: InputFormat) -> Iterator[_Raw]:
    for number, line in _lines(path):
        fallback = _ndjson_fallback(line, index, number) if fmt is InputFormat.DMS else None
        yield _Raw(f"{path}:{number}", line, fallback)


def _ndjson_fallback(line: bytes, index: int, number: int) -> str | None:
    """Commit time, file index and line number: the position of a record without one."""
    try:
        record = _DECODER.decode(line)
    except (msgspec.DecodeError, ValueError):
        return None  # dms.decode says what is wrong
    metadata = record.get("metadata") if isinstance(record, dict) else None
    if not isinstance(metadata, dict):
        return None
    moment = metadata.get("commit-timestamp") or metadata.get("timestamp")
    if not isinstance(moment, str) or not moment:
        return None
    return f"{moment}:{index:06d}:{number:012d}"


def _kinesis_event(path: Path) -> Iterator[_Raw]:
    try:
        with _open(path) as handle:
            event: Any = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"replay: {path} is not a Kinesis event JSON document ({exc})") from None
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list):
        raise ConfigError(f"replay: {path} has no Records list: it is not a Kinesis event")
    for index, item in enumerate(records):
        where = f"{path}#{index}"
        kinesis = item.get("kinesis") if isinstance(item, dict) else None
        if not isinstance(kinesis, dict) or not isinstance(kinesis.get("data"), str):
            yield _Raw(where, json.dumps(item).encode(), None)  # dms.decode refuses it
            continue
        try:
            data = base64.b64decode(kinesis["data"], validate=True)
        except (binascii.Error, ValueError):
            yield _Raw(where, kinesis["data"].encode(), None)
            continue
        sequence = kinesis.get("sequenceNumber")
        fallback = (
            sequence.zfill(SEQUENCE_WIDTH)
            if isinstance(sequence, str) and sequence.isdigit()
            else None
        )
        yield _Raw(where, data, fallback)


def _records(files: Sequence[Path], fmt: InputFormat) -> Iterator[_Raw]:
    for index, path in enumerate(files):
        if fmt is InputFormat.KINESIS_EVENT:
            yield from _kinesis_event(path)
        else:
            yield from _ndjson(path, index, fmt)


def _decode(raw: _Raw, fmt: InputFormat) -> ChangeEvent:
    if fmt is InputFormat.DEBEZIUM:
        if raw.data == b"null":
            raise dms.ControlRecord("tombstone", "")
        return decode_debezium(raw.data)
    return dms.decode(raw.data, fallback_position=raw.fallback)


def replay(
    files: Sequence[Path],
    fmt: InputFormat,
    stream: ChangeStream,
    dlq: DeadLetterQueue,
    *,
    on_progress: Callable[[int], None] | None = None,
    batch_size: int = BATCH_SIZE,
) -> ReplaySummary:
    """Append the records of ``files`` to ``stream``; unreadable ones go to ``dlq``.

    ``on_progress(n)`` is called after each batch with the records read in it.
    """
    summary = ReplaySummary(files=list(files))
    batch: list[tuple[str, bytes]] = []
    dead: list[tuple[int, str, bytes, str]] = []
    read = 0

    def flush() -> None:
        nonlocal read
        if batch:
            stream.append_raw(batch)
            summary.appended += len(batch)
            batch.clear()
        if dead:
            dlq.add(DLQ_CONSUMER, dead)
            summary.dead_letters += len(dead)
            dead.clear()
        if on_progress is not None and read:
            on_progress(read)
        read = 0

    for raw in _records(files, fmt):
        read += 1
        try:
            event = _decode(raw, fmt)
            batch.append((event.partition_key, dms.encode(event)))
        except dms.ControlRecord as exc:
            if fmt is InputFormat.DEBEZIUM and exc.operation in _SKIPPED_DEBEZIUM:
                summary.tombstones += 1
            else:
                summary.control += 1
        except dms.FormatError as exc:
            logger.debug("replay dead letter where=%s", raw.where)
            dead.append((0, "", raw.data, f"{raw.where}: malformed record: {exc.reason}"))
        if len(batch) + len(dead) >= batch_size:
            flush()
    flush()
    logger.info(
        "replay done appended=%d control=%d tombstones=%d dead_letters=%d",
        summary.appended,
        summary.control,
        summary.tombstones,
        summary.dead_letters,
    )
    return summary


def count_records(files: Iterable[Path], fmt: InputFormat) -> int | None:
    """How many records the files hold (for a progress bar), or None when unknown cheaply."""
    if fmt is InputFormat.KINESIS_EVENT:
        return None
    total = 0
    for path in files:
        total += sum(1 for _ in _lines(path))
    return total
