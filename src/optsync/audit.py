"""``optsync audit``: the consent ledger as a file a compliance reviewer can read.

One row per consent change (every app's, oldest first, from ``--since``): who (app, endpoint,
user, channel; the address, and any number inside the endpoint id, masked unless asked for),
what (OptOut before and after, an address change), how (the cause: a source change with its
position and commit time, an API call with its key, a console operator, an end user's STOP, an
import) and when (the engine's time, and the time it reached each sink, or its state there).
An opt-out delivered later than ``[audit] deadline`` after it happened, or not yet delivered
past it, is marked ``late``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

from optsync.engine.ledger import AuditRow
from optsync.engine.models import OptOut
from optsync.redaction import mask

__all__ = ("audit_records", "format_duration", "write_csv", "write_ndjson")


def format_duration(seconds: float) -> str:
    """``86400`` -> ``24h``; ``90`` -> ``90s``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0 and not (unit == "d" and seconds < 172800):
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _instant(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def audit_records(
    rows: Iterator[AuditRow],
    sinks: Sequence[str],
    deadline: float,
    now: float,
    *,
    reveal: bool = False,
) -> Iterator[dict[str, Any]]:
    """Each row as a flat record (see the module docstring)."""
    for row in rows:
        c = row.change
        late = False
        if c.opt_out_after is OptOut.ALL and sinks:
            due = _instant(c.source_time or c.at) + deadline
            for sink in sinks:
                if row.outcomes.get(sink) == "skipped":
                    continue
                delivered = row.deliveries.get(sink)
                late = late or (_instant(delivered) > due if delivered else now > due)
        address = c.address if reveal or c.address is None else mask(c.address)
        before = c.address_before
        if before is not None and not reveal:
            before = mask(before)
        record: dict[str, Any] = {
            "seq": c.seq,
            "app": c.app_id,
            "endpoint_id": c.endpoint_id if reveal else mask(c.endpoint_id),
            "user_id": c.user_id,
            "channel": c.channel_type.value if c.channel_type else None,
            "address": address,
            "address_before": before,
            "opt_out_before": c.opt_out_before.value if c.opt_out_before else None,
            "opt_out_after": c.opt_out_after.value if c.opt_out_after else None,
            "cause": c.cause.kind.value,
            "cause_ref": c.cause.ref,
            "cause_detail": c.cause.detail or None,
            "source_commit_time": c.source_time,
            "engine_time": c.at,
            "late": late,
        }
        for sink in sinks:
            record[f"sink:{sink}"] = row.outcomes.get(sink)
            record[f"delivered:{sink}"] = row.deliveries.get(sink)
        yield record


def write_ndjson(records: Iterator[dict[str, Any]], out: io.TextIOBase | Any) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        count += 1
    return count


def write_csv(records: Iterator[dict[str, Any]], out: io.TextIOBase | Any) -> int:
    writer: csv.DictWriter[str] | None = None
    count = 0
    for record in records:
        if writer is None:
            writer = csv.DictWriter(out, fieldnames=list(record))
            writer.writeheader()
        writer.writerow(record)
        count += 1
    return count
