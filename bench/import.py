"""Import: how fast a Pinpoint export loads into the embedded engine, beside the engine's own
write ceiling measured in the same run.

1. A Pinpoint export of ``--endpoints`` endpoints (1,000,000 by default) is generated as gzip
   NDJSON part files (100,000 lines each, EndpointResponse lines as CreateExportJob writes them:
   SMS and EMAIL, OptOut ALL/NONE, some INACTIVE, attributes, user attributes, metrics, an
   unknown key) in a temporary folder.
2. ``optsync import-pinpoint`` as it runs now (``migrate.overlapped.import_files``: the check
   pass in a child process one batch ahead of the write pass, one transaction) on a fresh
   SQLite engine, in-process (the CLI adds only its start-up). Endpoints/s of the whole import,
   and the peak resident memory of this process and of the check process.
3. The same import as two passes one after the other (``parse_files`` then ``import_parsed``,
   the path of ``--dry-run`` and of the CLI before): the check pass (read, parse, validate
   every line) and the write pass (``EndpointStore.import_endpoints``) timed apart.
4. Baselines on the first ``--baseline`` endpoints (100,000) of the same data, into fresh apps:
   ``write_endpoints`` in batches of 1,000 (the engine's write ceiling, what the apply worker
   and the API use) and ``import_endpoints`` alone (the bulk path without reading the files).

The target (>= 20,000 endpoints/s for the whole import) is reported, never asserted: the script
exits 0 whether it is met or not.

    .venv/bin/python bench/import.py                 # 1,000,000 endpoints, 1 run
    .venv/bin/python bench/import.py --quick         # 100,000 endpoints
    .venv/bin/python bench/import.py --runs 3        # the median of 3 imports
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from optsync.engine.models import Cause, CauseKind, EndpointPatch
from optsync.engine.sqlite import SQLiteStore
from optsync.migrate.importer import import_parsed, parse_files
from optsync.migrate.locations import staged_inputs
from optsync.migrate.overlapped import import_files

TARGET = 20_000.0  # endpoints/s
PART = 100_000
WRITE_BATCH = 1_000
CAUSE = Cause(CauseKind.IMPORT, "bench", "bench/import.py")


def export_line(i: int) -> dict[str, Any]:
    sms = i % 3 != 0
    line: dict[str, Any] = {
        "Id": f"ep-{i:08d}",
        "ApplicationId": "0123456789abcdef0123456789abcdef",
        "Address": f"+1206{i:07d}" if sms else f"user{i}@example.com",
        "ChannelType": "SMS" if sms else "EMAIL",
        "CohortId": str(i % 100),
        "CreationDate": "2021-03-04T05:06:07.890Z",
        "EffectiveDate": "2024-05-15T12:00:00.000Z",
        "EndpointStatus": "INACTIVE" if i % 11 == 0 else "ACTIVE",
        "OptOut": "ALL" if i % 7 == 0 else "NONE",
        "RequestId": f"req-{i}",
        "Location": {"Country": "US" if i % 2 else "CA", "City": "Seattle"},
        "Demographic": {"Platform": "ios"},
        "Attributes": {"source": ["pinpoint"], "plan": ["gold" if i % 4 else "free"]},
        "Metrics": {"score": i % 13},
        "User": {"UserId": f"user-{i}", "UserAttributes": {"tier": [str(i % 3)]}},
        "SomeFutureField": 1,
    }
    return line


def generate(folder: Path, count: int) -> None:
    for start in range(0, count, PART):
        lines = (json.dumps(export_line(i)) for i in range(start, min(count, start + PART)))
        body = ("\n".join(lines) + "\n").encode()
        (folder / f"part-{start // PART:05d}.gz").write_bytes(gzip.compress(body, 1))


def timed_import(folder: Path, work: Path) -> tuple[float, float, int]:
    """(check seconds, write seconds, endpoints) of one import into a fresh engine."""
    store = SQLiteStore(work / "engine.db")
    try:
        started = time.perf_counter()
        with staged_inputs((str(folder),), None) as files:
            parsed = parse_files(files)
        checked = time.perf_counter()
        assert not parsed.rejected, parsed.rejected[:3]
        summary = import_parsed(store, "bench", parsed, source=str(folder))
        done = time.perf_counter()
        assert summary.new == len(parsed.patches)
        return checked - started, done - checked, len(parsed.patches)
    finally:
        store.close()


def overlapped_import(folder: Path, work: Path) -> tuple[float, int]:
    """(seconds, endpoints) of one import with the passes overlapped, into a fresh engine."""
    store = SQLiteStore(work / "engine.db")
    try:
        started = time.perf_counter()
        with staged_inputs((str(folder),), None) as files:
            summary = import_files(store, "bench", files, source=str(folder))
        seconds = time.perf_counter() - started
        assert not summary.rejected, summary.rejected[:3]
        assert summary.new == summary.lines
        return seconds, summary.lines
    finally:
        store.close()


def baseline(folder: Path, work: Path, count: int) -> tuple[float, float]:
    """(write_endpoints endpoints/s, import_endpoints endpoints/s) on ``count`` endpoints."""
    with staged_inputs((str(folder / "part-00000.gz"),), None) as files:
        patches: list[EndpointPatch] = [p for p, _ in parse_files(files).patches[:count]]
    store = SQLiteStore(work / "baseline.db")
    try:
        app = store.create_app("write").id
        started = time.perf_counter()
        for i in range(0, len(patches), WRITE_BATCH):
            store.write_endpoints(app, patches[i : i + WRITE_BATCH], CAUSE)
        write_rate = len(patches) / (time.perf_counter() - started)
        app = store.create_app("import").id
        started = time.perf_counter()
        store.import_endpoints(app, patches, CAUSE)
        bulk_rate = len(patches) / (time.perf_counter() - started)
        return write_rate, bulk_rate
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100,000 endpoints")
    args = parser.parse_args()
    count = 100_000 if args.quick else args.endpoints
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"import: {count:,} endpoints, {args.runs} run(s); {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average {load:.1f}"
    )
    root = Path(tempfile.mkdtemp(prefix="optsync-bench-import-"))
    try:
        export = root / "export"
        export.mkdir()
        started = time.perf_counter()
        generate(export, count)
        size = sum(p.stat().st_size for p in export.iterdir())
        print(
            f"generated {count:,} export lines in {time.perf_counter() - started:.1f} s "
            f"({size / 1e6:.0f} MB gzip)"
        )
        overlapped: list[float] = []
        for run in range(args.runs):
            work = root / f"overlapped-{run}"
            work.mkdir()
            seconds, n = overlapped_import(export, work)
            overlapped.append(n / seconds)
            print(
                f"run {run + 1}, passes overlapped: {n:,} endpoints in {seconds:.1f} s: "
                f"{overlapped[-1]:,.0f} endpoints/s",
                flush=True,
            )
            shutil.rmtree(work)
        peak_overlapped = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        peak_checker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
        rates, checks, writes = [], [], []
        for run in range(args.runs):
            work = root / f"run-{run}"
            work.mkdir()
            check, write, n = timed_import(export, work)
            rates.append(n / (check + write))
            checks.append(n / check)
            writes.append(n / write)
            print(
                f"run {run + 1}, passes one after the other: {n:,} endpoints in "
                f"{check + write:.1f} s (check {check:.1f} s, write {write:.1f} s): "
                f"{rates[-1]:,.0f} endpoints/s",
                flush=True,
            )
            shutil.rmtree(work)
        work = root / "baseline"
        work.mkdir()
        write_rate, bulk_rate = baseline(export, work, min(args.baseline, count))
        rate = statistics.median(overlapped)
        sequential = statistics.median(rates)
        print()
        print(f"import-pinpoint (passes overlapped)   {rate:9,.0f} endpoints/s (median)")
        print(
            f"  same run, passes one after another  {sequential:9,.0f} endpoints/s "
            f"(overlapped: x{rate / sequential:.2f})"
        )
        print(f"  check pass alone (read, parse, validate)  {statistics.median(checks):9,.0f} /s")
        print(f"  write pass alone (import_endpoints)       {statistics.median(writes):9,.0f} /s")
        print(
            f"peak resident memory with the passes overlapped: {peak_overlapped:.2f} GB this "
            f"process, {peak_checker:.2f} GB the check process"
        )
        print(
            f"baseline on {min(args.baseline, count):,}: write_endpoints x{WRITE_BATCH} "
            f"{write_rate:9,.0f} /s; import_endpoints {bulk_rate:9,.0f} /s"
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
        print(f"peak resident memory of this process after the two-pass runs: {peak:.2f} GB")
        print(
            f"whole import / write_endpoints ceiling: {rate / write_rate:.2f}x; "
            f"target {TARGET:,.0f} endpoints/s: {'met' if rate >= TARGET else 'NOT met'}"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
