"""Engine storage, PostgreSQL against SQLite: write rates and segment estimates on 1,000,000
endpoints, both stores in the same run.

Both stores receive the same endpoints (``bench/engine.py``'s generator: 80 % US, 30 % opted
out, 5 % INACTIVE, plan "gold" about 10 %) through ``write_endpoints``; SQLite is the baseline
and every PostgreSQL figure is printed with its ratio to it:

1. load: new endpoints/s in 5,000-item batches, durable commits (the time of the
   ``write_endpoints`` calls only, not of generating the endpoints);
2. updates: OptOut flips of existing endpoints in 1,000-item batches with ``durable=False`` and a
   ``sync()`` after each batch, as the apply worker writes;
3. estimates (median and p95 of 9 runs after one warm-up) of "Country US" (answered from the
   rollup), "plan gold" and "plan gold + Country US" (from the attribute index), checked against
   the generator's counts. PostgreSQL's are measured right after the load and again after
   ``VACUUM (ANALYZE)`` (what autovacuum does by itself soon after a bulk load: statistics, and
   the visibility map that lets the attribute count be an index-only scan). ``EXPLAIN ANALYZE``
   of each PostgreSQL statement is printed.

The PostgreSQL server is private (``tests/servers/postgres_server.py``): ``fsync=on``,
``synchronous_commit=on``, ``shared_buffers=1GB``, ``max_wal_size=4GB``, on the same disk as the
SQLite file. Targets (<= 100 ms per estimate) are reported, never asserted.

    .venv/bin/python bench/engine_postgres.py [--endpoints N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "servers"))

from postgres_server import running_server

import engine as engine_bench
from optsync.engine.models import EndpointPatch, OptOut
from optsync.engine.postgres import PostgresStore
from optsync.engine.segments import definition_from_wire
from optsync.engine.sql import SqlStore
from optsync.engine.sqlite import SQLiteStore

say = engine_bench.say
LOAD_BATCH = engine_bench.BUILD_BATCH  # 5,000
UPDATE_BATCH = 1_000
RUNS = engine_bench.ESTIMATE_RUNS
TARGET_MS = engine_bench.ESTIMATE_TARGET_MS
PG_SETTINGS = ("shared_buffers=1GB", "max_wal_size=4GB", "synchronous_commit=on")


@dataclass
class Result:
    """The figures of one store."""

    name: str
    load_rate: float = 0.0
    update_rate: float = 0.0
    size_mb: float = 0.0
    estimates: dict[str, tuple[float, float, bool]] = field(default_factory=dict)
    """label -> (median ms, p95 ms, counts match the generator)."""


def load(store: SqlStore, app_id: str, count: int) -> tuple[float, engine_bench.Expected]:
    """Write ``count`` generated endpoints; the rate (endpoints/s of write time) and counts."""
    rng = random.Random("segments")  # the same endpoints in every store
    expected = engine_bench.Expected()
    spent = 0.0
    done = 0
    step = max(LOAD_BATCH, count // 10)
    while done < count:
        n = min(LOAD_BATCH, count - done)
        patches = engine_bench.large_patches(done, n, rng, expected)
        started = time.perf_counter()
        store.write_endpoints(app_id, patches, engine_bench.CAUSE)
        spent += time.perf_counter() - started
        done += n
        if done % step == 0 or done == count:
            say(f"    {done:>10,}/{count:,}  {done / spent:8,.0f} endpoints/s  {spent:6.1f} s")
    return count / spent, expected


def update(store: SqlStore, app_id: str, count: int, total: int) -> float:
    """Flip the OptOut of ``count`` random existing endpoints; endpoints/s."""
    rng = random.Random("updates")
    picks = rng.sample(range(total), count)
    spent = 0.0
    for start in range(0, count, UPDATE_BATCH):
        batch = [
            EndpointPatch(id=f"ep-{i:08d}", opt_out=rng.choice([OptOut.ALL, OptOut.NONE]))
            for i in picks[start : start + UPDATE_BATCH]
        ]
        started = time.perf_counter()
        store.write_endpoints(app_id, batch, engine_bench.CAUSE, durable=False)
        store.sync()
        spent += time.perf_counter() - started
    return count / spent


def estimates(
    store: SqlStore,
    app_id: str,
    segments: dict[str, Any],
    expected: engine_bench.Expected,
    result: Result,
    label: str,
) -> None:
    for key, segment in segments.items():
        name = engine_bench.SEGMENTS[key][0]
        answer = store.estimate(app_id, segment.id)
        ms = engine_bench.timed_ms(partial(store.estimate, app_id, segment.id), RUNS)
        ok = (answer.total, answer.eligible) == (expected.total[key], expected.eligible[key])
        result.estimates[f"({key}) {name}{label}"] = (
            statistics.median(ms),
            engine_bench.percentile(ms, 95),
            ok,
        )


def create_segments(store: SqlStore, app_id: str) -> dict[str, Any]:
    return {
        key: store.create_segment(
            app_id,
            definition_from_wire({"Name": f"bench {name}", "Dimensions": dims}, require_name=True),
        )
        for key, (name, dims) in engine_bench.SEGMENTS.items()
    }


def explain(url: str, store: PostgresStore, app_id: str, segments: dict[str, Any]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for key, segment in segments.items():
            sql, params = store.estimate_sql(app_id, segment.id)
            say(f"  ({key}) {engine_bench.SEGMENTS[key][0]}")
            rows = conn.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {store._sql(sql)}", params)
            for (line,) in rows.fetchall():
                say(f"      {line}")


def run_store(
    name: str,
    open_store: Callable[[], SqlStore],
    count: int,
    updates: int,
    size: Callable[[], float],
    after_load: Callable[[SqlStore, str, dict[str, Any], engine_bench.Expected, Result], None]
    | None = None,
) -> Result:
    result = Result(name)
    say(f"\n== {name}: loading {count:,} endpoints ({LOAD_BATCH:,} per write_endpoints)")
    store = open_store()
    try:
        app_id = store.create_app("bench").id
        result.load_rate, expected = load(store, app_id, count)
        segments = create_segments(store, app_id)
        estimates(store, app_id, segments, expected, result, "")
        if after_load is not None:
            after_load(store, app_id, segments, expected, result)
        say(
            f"  updates: {updates:,} OptOut flips, {UPDATE_BATCH:,} per batch, durable=False + sync"
        )
        result.update_rate = update(store, app_id, updates, count)
        result.size_mb = size()
    finally:
        store.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", type=int, default=1_000_000, metavar="N")
    parser.add_argument("--updates", type=int, default=50_000, metavar="N")
    parser.add_argument("--quick", action="store_true", help="100,000 endpoints, 10,000 updates")
    args = parser.parse_args(argv)
    count, updates = (100_000, 10_000) if args.quick else (args.endpoints, args.updates)
    m = engine_bench.machine()
    say("optsync engine storage benchmark: PostgreSQL against SQLite")
    say(f"  machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}")
    say(f"  Python {m['python']}, SQLite {m['sqlite']}, load average {m['load_average_at_start']}")
    say(f"  command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="optsync-bench-pg-"))
    started = time.perf_counter()
    try:
        path = work / "engine.db"
        sqlite = run_store(
            "SQLite",
            lambda: SQLiteStore(path),
            count,
            updates,
            lambda: (path.stat().st_size + Path(f"{path}-wal").stat().st_size) / 1e6,
        )
        with running_server(PG_SETTINGS) as server:
            version = server.sql("SHOW server_version")[0][0]
            say(f"\n  PostgreSQL {version}, {', '.join(PG_SETTINGS)}")
            server.sql("CREATE DATABASE bench")
            url = server.url(db="bench")

            def vacuumed(
                store: SqlStore,
                app_id: str,
                segments: dict[str, Any],
                expected: engine_bench.Expected,
                result: Result,
            ) -> None:
                assert isinstance(store, PostgresStore)
                began = time.perf_counter()
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute("VACUUM (ANALYZE)")
                say(f"  VACUUM (ANALYZE): {time.perf_counter() - began:.1f} s")
                estimates(store, app_id, segments, expected, result, ", after VACUUM")
                say("  EXPLAIN ANALYZE of the estimate statements")
                explain(url, store, app_id, segments)

            postgres = run_store(
                "PostgreSQL",
                lambda: PostgresStore(url),
                count,
                updates,
                lambda: float(server.sql("SELECT pg_database_size('bench')")[0][0]) / 1e6,
                vacuumed,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(sqlite, postgres, count)
    say(
        f"\nTotal {time.perf_counter() - started:.0f} s; load average at end "
        f"{[round(x, 2) for x in os.getloadavg()]} (2 cores: above ~1 means other "
        "work competed with this run)"
    )
    return 0


def report(sqlite: Result, postgres: Result, count: int) -> None:
    say(f"\n== Summary ({count:,} endpoints; ratio = PostgreSQL / SQLite, measured in this run)")
    rows = [
        [
            f"load, endpoints/s ({LOAD_BATCH:,} per batch)",
            f"{sqlite.load_rate:,.0f}",
            f"{postgres.load_rate:,.0f}",
            f"x{postgres.load_rate / sqlite.load_rate:.2f}",
            "",
        ],
        [
            f"updates, endpoints/s ({UPDATE_BATCH:,} per batch + sync)",
            f"{sqlite.update_rate:,.0f}",
            f"{postgres.update_rate:,.0f}",
            f"x{postgres.update_rate / sqlite.update_rate:.2f}",
            "",
        ],
        ["database size, MB", f"{sqlite.size_mb:,.0f}", f"{postgres.size_mb:,.0f}", "", ""],
    ]
    for label, (pg_median, pg_p95, pg_ok) in postgres.estimates.items():
        base = label.removesuffix(", after VACUUM")
        sq_median, sq_p95, sq_ok = sqlite.estimates[base]
        rows.append(
            [
                f"estimate {label}, median (p95) ms",
                f"{sq_median:.2f} ({sq_p95:.2f})" + ("" if sq_ok else " WRONG COUNTS"),
                f"{pg_median:.2f} ({pg_p95:.2f})" + ("" if pg_ok else " WRONG COUNTS"),
                f"x{pg_median / sq_median:.1f}",
                "pass" if pg_median <= TARGET_MS and sq_median <= TARGET_MS else "MISS",
            ]
        )
    say(
        engine_bench.table(
            ["figure", "SQLite", "PostgreSQL", "ratio", f"<= {TARGET_MS:.0f} ms"], rows
        )
    )


if __name__ == "__main__":
    sys.exit(main())
