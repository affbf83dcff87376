"""Engine benchmark: signed HTTP writes and reads, and segment estimates on a large store.

Every figure is printed beside a baseline measured in the same run, so the cost of a layer shows
as a ratio rather than as an absolute number that depends on the machine:

1. UpdateEndpointsBatch endpoints/s through ``optsync serve`` with the real boto3 pinpoint client
   (SigV4-signed, 100 items per call, 1 and 4 client threads); baseline: the same writes straight
   into ``SQLiteStore.write_endpoints`` in this process.
2. GetEndpoint p50/p99 over signed HTTP; baseline: ``SQLiteStore.get_endpoint`` in-process.
3. Segment estimates on a store of ``--endpoints`` endpoints (1,000,000 by default), in-process
   and through the signed estimate route; baseline: a bare ``SELECT COUNT(*)`` of the app's rows.
   ``EXPLAIN QUERY PLAN`` of each estimate statement is printed so the index use is visible.
4. One 100-item ``write_endpoints`` into that large app; baseline: the same with an index that
   serves the address-uniqueness UPDATE (the fix this benchmark proposes).

Targets (>= 10,000 endpoints/s written, <= 100 ms per estimate) are reported, never asserted:
the script exits 0 whether they are met or not.

    .venv/bin/python bench/engine.py [--quick] [--endpoints N] [--writes N] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import platform
import pstats
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from optsync.api.wire import endpoint_patch_from_wire
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.segments import definition_from_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.engine.store import Segment

KEY_ID = "BENCHKEY"
SECRET = "benchsecret"  # a throwaway key for the server this script starts
REGION = "us-east-1"
SERVICE = "mobiletargeting"
BATCH_ITEMS = 100  # UpdateEndpointsBatch takes at most 100 items per call
BUILD_BATCH = 5_000
WRITE_TARGET = 10_000.0  # endpoints/s
ESTIMATE_TARGET_MS = 100.0
ESTIMATE_RUNS = 9
CAUSE = Cause(CauseKind.API, "bench")

# The lookup same-address deactivation needs (SqlStore._begin_batch reads the ACTIVE endpoints
# at every address a batch touches): the large-store build checks the plan of this statement
# and, if no index serves it, adds one for the build only.
ADDRESS_UPDATE = (
    "UPDATE endpoints SET status = 'INACTIVE' WHERE app_id = ? AND address = ? AND "
    "channel_type = ? AND id_key <> ? AND status = 'ACTIVE'"
)
BENCH_ADDRESS_INDEX = "bench_endpoints_address_fix"

US_AREA_CODES = ("206", "212", "305", "415", "512", "617", "702", "808")
PLANS = ("gold", "silver", "bronze", "free")
PLAN_WEIGHTS = (10, 25, 30, 35)
COUNTRIES = (("US", 80), ("GB", 7), ("DE", 5), ("FR", 4), ("ES", 2), ("IT", 2))

SEGMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "a": (
        "Country US",
        {"Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}},
    ),
    "b": (
        "plan gold",
        {"Attributes": {"plan": {"AttributeType": "INCLUSIVE", "Values": ["gold"]}}},
    ),
    "c": (
        "plan gold + Country US",
        {
            "Attributes": {"plan": {"AttributeType": "INCLUSIVE", "Values": ["gold"]}},
            "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}},
        },
    ),
}
HTTP_SEGMENTS = ("a", "b")


@dataclass(frozen=True)
class Sizes:
    writes: int
    """Endpoints written per write run (HTTP and in-process alike)."""
    runs: int
    """Write runs per configuration; the median is reported."""
    gets: int
    """GetEndpoint calls timed, over HTTP and in-process each."""
    store: int
    """Endpoints in the segment-estimate store."""
    large_write: int = BATCH_ITEMS
    """Endpoints in the one batch written into the large app."""


FULL = Sizes(writes=5_000, runs=3, gets=2_000, store=1_000_000)
QUICK = Sizes(writes=1_000, runs=3, gets=500, store=100_000)


@dataclass
class Figure:
    """One line of the summary table."""

    name: str
    value: float
    unit: str
    target: str
    passed: bool | None
    baseline: float | None
    baseline_name: str

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


@dataclass
class WriteRun:
    endpoints: int
    seconds: float
    call_seconds: list[float]
    client_cpu: float
    server_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.endpoints / self.seconds


@dataclass
class Report:
    machine: dict[str, Any]
    sizes: dict[str, Any]
    command: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    plans: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# small helpers


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p95 of 9 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def timed_ms(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def fetch_one(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    return conn.execute(sql, list(params)).fetchone()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    for row in rows:
        pairs = zip(row, widths, strict=True)
        cells = [c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in pairs]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "endpoints/s" or abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------
# the server under test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``optsync serve`` in a subprocess on a free port, with the bench credentials."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        command = [
            str(Path(sys.executable).parent / "optsync"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSYNC_")}
        env["OPTSYNC_API_CREDENTIALS"] = f"{KEY_ID}:{SECRET}"
        log = open(self.log_path, "ab")  # the child keeps its own copy of the descriptor
        self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"optsync serve exited early; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"optsync serve did not answer /healthz in 30 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far."""
        if self._proc is None:
            return None
        try:
            stat = Path(f"/proc/{self._proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinpoint_client(url: str) -> Any:
    """A boto3 pinpoint client of its own session (sessions are not shared across threads)."""
    session = boto3.session.Session()
    return session.client(
        "pinpoint",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=4,
            connect_timeout=5,
            read_timeout=300,
        ),
    )


class SignedHttp:
    """GET requests signed with botocore's SigV4Auth, for routes boto3 does not model."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._auth = SigV4Auth(Credentials(KEY_ID, SECRET), SERVICE, REGION)
        self._http = httpx.Client(timeout=300)

    def get_json(self, path: str) -> Any:
        url = self.url + path
        request = AWSRequest(method="GET", url=url)
        self._auth.add_auth(request)
        response = self._http.get(url, headers=dict(request.headers.items()))
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self._http.close()


# ---------------------------------------------------------------------------------------------
# data


def signup_date(rng: random.Random) -> str:
    return (date(2019, 1, 1) + timedelta(days=rng.randrange(2_500))).isoformat()


def write_items(tag: str, count: int) -> list[dict[str, Any]]:
    """EndpointBatchItems: SMS, distinct US numbers, 30% opted out, plan and signup attributes.

    No Location: the server derives the country from the number, as it does for real clients.
    """
    rng = random.Random(f"writes-{tag}")
    return [
        {
            "Id": f"{tag}-{i:07d}",
            "ChannelType": "SMS",
            "Address": f"+1{US_AREA_CODES[i % len(US_AREA_CODES)]}{2_000_000 + i:07d}",
            "OptOut": "ALL" if rng.random() < 0.3 else "NONE",
            "Attributes": {
                "plan": [rng.choices(PLANS, PLAN_WEIGHTS)[0]],
                "signup": [signup_date(rng)],
            },
            "User": {"UserId": f"user-{tag}-{i}"},
        }
        for i in range(count)
    ]


def address_for(country: str, i: int) -> str:
    if country == "US":
        return f"+1{US_AREA_CODES[i % len(US_AREA_CODES)]}{i:07d}"
    return {
        "GB": f"+447{i:09d}",
        "DE": f"+49151{i:08d}",
        "FR": f"+336{i:08d}",
        "ES": f"+346{i:08d}",
        "IT": f"+393{i:09d}",
    }[country]


@dataclass
class Expected:
    """Counts the generator produced, to check the estimates against."""

    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEGMENTS, 0))
    eligible: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SEGMENTS, 0))

    def add(self, country: str, plan: str, eligible: bool) -> None:
        hits = {"a": country == "US", "b": plan == "gold", "c": country == "US" and plan == "gold"}
        for key, hit in hits.items():
            if hit:
                self.total[key] += 1
                self.eligible[key] += eligible


def large_patches(start: int, count: int, rng: random.Random, expected: Expected) -> list[Any]:
    """Endpoints of the estimate store: 80% US, 30% opted out, 5% INACTIVE, gold ~10%."""
    codes = [c for c, _ in COUNTRIES]
    weights = [w for _, w in COUNTRIES]
    out: list[Any] = []
    for i in range(start, start + count):
        country = rng.choices(codes, weights)[0]
        plan = rng.choices(PLANS, PLAN_WEIGHTS)[0]
        opted_out = rng.random() < 0.30
        inactive = rng.random() < 0.05
        expected.add(country, plan, not opted_out and not inactive)
        out.append(
            EndpointPatch(
                id=f"ep-{i:08d}",
                channel_type=ChannelType.SMS,
                address=address_for(country, i),
                opt_out=OptOut.ALL if opted_out else OptOut.NONE,
                endpoint_status=EndpointStatus.INACTIVE if inactive else None,
                user_id=f"user-{i}",
                attributes={"plan": (plan,), "signup": (signup_date(rng),)},
                # Given rather than derived from the number: same stored row, faster build.
                location=Location(country=country),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# 1. UpdateEndpointsBatch


def batches(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + BATCH_ITEMS] for i in range(0, len(items), BATCH_ITEMS)]


def http_write_run(
    clients: Sequence[Any], app_id: str, items: Sequence[dict[str, Any]], server: Server
) -> WriteRun:
    """Send the items as UpdateEndpointsBatch calls from one thread per client."""
    work = list(enumerate(batches(items)))
    call_seconds = [0.0] * len(work)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(client: Any) -> None:
        while True:
            with lock:
                if not work or errors:
                    return
                index, batch = work.pop(0)
            started = time.perf_counter()
            try:
                client.update_endpoints_batch(
                    ApplicationId=app_id, EndpointBatchRequest={"Item": list(batch)}
                )
            except Exception as exc:
                errors.append(exc)
                return
            call_seconds[index] = time.perf_counter() - started

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    server_after = server.cpu_seconds()
    server_used = None if server_cpu is None or server_after is None else server_after - server_cpu
    if errors:
        raise RuntimeError(f"UpdateEndpointsBatch failed: {errors[0]!r}") from errors[0]
    return WriteRun(
        endpoints=len(items),
        seconds=seconds,
        call_seconds=call_seconds,
        client_cpu=client_cpu,
        server_cpu=server_used,
    )


def store_write_run(store: SQLiteStore, app_id: str, patches: Sequence[EndpointPatch]) -> WriteRun:
    call_seconds = []
    cpu = time.process_time()
    started = time.perf_counter()
    for batch in batches(patches):
        t0 = time.perf_counter()
        store.write_endpoints(app_id, batch, CAUSE)
        call_seconds.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return WriteRun(len(patches), seconds, call_seconds, time.process_time() - cpu)


def run_summary(runs: Sequence[WriteRun]) -> dict[str, Any]:
    """Median of the runs, plus per-call figures that show how cost grows with the app."""
    calls = [s for r in runs for s in r.call_seconds]
    tenth = max(1, len(runs[0].call_seconds) // 10)
    first = [s for r in runs for s in r.call_seconds[:tenth]]
    last = [s for r in runs for s in r.call_seconds[-tenth:]]
    out: dict[str, Any] = {
        "endpoints_per_s_runs": [round(r.rate, 1) for r in runs],
        "endpoints_per_s_median": statistics.median(r.rate for r in runs),
        "call_ms_p50": percentile(calls, 50) * 1000,
        "call_ms_p99": percentile(calls, 99) * 1000,
        "call_ms_first_tenth_p50": percentile(first, 50) * 1000,
        "call_ms_last_tenth_p50": percentile(last, 50) * 1000,
        "client_cpu_ms_per_call": statistics.median(
            r.client_cpu / len(r.call_seconds) * 1000 for r in runs
        ),
    }
    if all(r.server_cpu is not None for r in runs):
        out["server_cpu_ms_per_call"] = statistics.median(
            (r.server_cpu or 0) / len(r.call_seconds) * 1000 for r in runs
        )
    return out


def bench_writes(sizes: Sizes, work: Path, report: Report, profile: bool) -> None:
    """Sections 1 and 2: UpdateEndpointsBatch and GetEndpoint, HTTP against in-process."""
    say(f"\n== 1. UpdateEndpointsBatch: {sizes.writes:,} endpoints per run, {sizes.runs} runs")
    http_dir, base_dir = work / "http-data", work / "inprocess-data"
    baseline = SQLiteStore(base_dir / "engine.db")
    results: dict[str, list[WriteRun]] = {"in-process": [], "http-1": [], "http-4": []}
    last_app: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    with Server(http_dir, work / "server-writes.log") as server:
        clients = [pinpoint_client(server.url) for _ in range(4)]
        # Warm-up: connections, imports and statement caches on both sides, untimed.
        warm = write_items("warm", 2 * BATCH_ITEMS)
        for client in clients:
            app = client.create_app(CreateApplicationRequest={"Name": "bench-warm"})
            http_write_run([client], app["ApplicationResponse"]["Id"], warm, server)
        store_write_run(
            baseline,
            baseline.create_app("bench-warm").id,
            [endpoint_patch_from_wire(i, i["Id"]) for i in warm],
        )
        # Interleaved so that noise on this shared machine spreads over every configuration.
        for run in range(sizes.runs):
            for config in results:
                tag = f"{config}-r{run}"
                items = write_items(tag, sizes.writes)
                if config == "in-process":
                    patches = [endpoint_patch_from_wire(i, i["Id"]) for i in items]
                    app_id = baseline.create_app(f"bench-{tag}").id
                    result = store_write_run(baseline, app_id, patches)
                else:
                    threads = 1 if config == "http-1" else 4
                    created = clients[0].create_app(CreateApplicationRequest={"Name": tag})
                    app_id = created["ApplicationResponse"]["Id"]
                    result = http_write_run(clients[:threads], app_id, items, server)
                results[config].append(result)
                last_app[config] = (app_id, items)
                say(f"  run {run + 1} {config:<10} {result.rate:>9,.0f} endpoints/s")
        summaries = {k: run_summary(v) for k, v in results.items()}
        report.details["writes"] = summaries
        say()
        rows = []
        for config, s in summaries.items():
            rows.append(
                [
                    config,
                    fmt(s["endpoints_per_s_median"], "endpoints/s").split()[0],
                    fmt(s["call_ms_p50"]),
                    fmt(s["call_ms_p99"]),
                    fmt(s["call_ms_first_tenth_p50"]),
                    fmt(s["call_ms_last_tenth_p50"]),
                    fmt(s["client_cpu_ms_per_call"]),
                    fmt(s.get("server_cpu_ms_per_call")),
                ]
            )
        say(
            table(
                [
                    "writer",
                    "endpoints/s",
                    "call p50 ms",
                    "call p99 ms",
                    "first 10% p50",
                    "last 10% p50",
                    "bench CPU ms/call",
                    "server CPU ms/call",
                ],
                rows,
            )
        )
        say(
            "  first/last 10%: per-call latency at the start and at the end of a run; a cost that\n"
            "  grows with the app means a statement scans more rows as the app fills up.\n"
            "  bench CPU: this process (the engine for in-process; boto3 serialization and\n"
            "  signing for HTTP); server CPU: the optsync serve process"
        )
        base_rate = summaries["in-process"]["endpoints_per_s_median"]
        for config, label in (("http-1", "1 thread"), ("http-4", "4 threads")):
            rate = summaries[config]["endpoints_per_s_median"]
            report.figures.append(
                Figure(
                    f"UpdateEndpointsBatch HTTP signed, {label}",
                    rate,
                    "endpoints/s",
                    f">= {WRITE_TARGET:,.0f}",
                    rate >= WRITE_TARGET,
                    base_rate,
                    "write_endpoints in-process",
                )
            )

        if profile:
            profile_writes(baseline, sizes.writes)

        # 2. GetEndpoint on the last apps written, over HTTP and in-process.
        say(f"\n== 2. GetEndpoint: {sizes.gets:,} calls on random existing ids")
        rng = random.Random("gets")
        http_app, http_items = last_app["http-1"]
        ids = [rng.choice(http_items)["Id"] for _ in range(sizes.gets)]
        client = clients[0]
        for endpoint_id in ids[:50]:
            client.get_endpoint(ApplicationId=http_app, EndpointId=endpoint_id)
        http_ms = []
        for endpoint_id in ids:
            started = time.perf_counter()
            client.get_endpoint(ApplicationId=http_app, EndpointId=endpoint_id)
            http_ms.append((time.perf_counter() - started) * 1000)
    base_app, base_items = last_app["in-process"]
    ids = [rng.choice(base_items)["Id"] for _ in range(sizes.gets)]
    for endpoint_id in ids[:50]:
        baseline.get_endpoint(base_app, endpoint_id)
    base_ms = []
    for endpoint_id in ids:
        started = time.perf_counter()
        baseline.get_endpoint(base_app, endpoint_id)
        base_ms.append((time.perf_counter() - started) * 1000)
    baseline.close()
    gets = {
        "http_ms_p50": percentile(http_ms, 50),
        "http_ms_p99": percentile(http_ms, 99),
        "inprocess_ms_p50": percentile(base_ms, 50),
        "inprocess_ms_p99": percentile(base_ms, 99),
    }
    report.details["get_endpoint"] = gets
    say(
        table(
            ["reader", "p50 ms", "p99 ms"],
            [
                ["HTTP signed (boto3)", fmt(gets["http_ms_p50"]), fmt(gets["http_ms_p99"])],
                [
                    "get_endpoint in-process",
                    fmt(gets["inprocess_ms_p50"]),
                    fmt(gets["inprocess_ms_p99"]),
                ],
            ],
        )
    )
    for p in ("p50", "p99"):
        report.figures.append(
            Figure(
                f"GetEndpoint HTTP signed {p}",
                gets[f"http_ms_{p}"],
                "ms",
                "-",
                None,
                gets[f"inprocess_ms_{p}"],
                "get_endpoint in-process",
            )
        )


def profile_writes(store: SQLiteStore, count: int) -> None:
    """cProfile one in-process write run and print where the time goes."""
    items = write_items("profile", count)
    patches = [endpoint_patch_from_wire(i, i["Id"]) for i in items]
    app_id = store.create_app("bench-profile").id
    profiler = cProfile.Profile()
    profiler.enable()
    store_write_run(store, app_id, patches)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    say(f"\n-- cProfile of one in-process write run ({count:,} endpoints), by own time")
    say(out.getvalue())


# ---------------------------------------------------------------------------------------------
# 3. segment estimates


def plan_text(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[str]:
    """EXPLAIN QUERY PLAN as indented lines."""
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, list(params)).fetchall()
    depth: dict[int, int] = {0: 0}
    lines = []
    for node, parent, _unused, detail in rows:
        depth[node] = depth.get(parent, 0) + 1
        lines.append("  " * depth[node] + str(detail))
    return lines


def estimate_statements(
    store: SQLiteStore, app_id: str, segment: Segment
) -> list[tuple[str, str, list[Any]]]:
    """The statement ``SqlStore.estimate`` runs (total and eligible in one)."""
    sql, params = store.estimate_sql(app_id, segment.id)
    return [("total+eligible", sql, params)]


def address_update_plan(conn: sqlite3.Connection) -> str:
    return " | ".join(plan_text(conn, ADDRESS_UPDATE, ("", "", "", ""))).strip()


def build_store(path: Path, count: int, report: Report) -> tuple[str, Expected]:
    """Fill a new store through ``write_endpoints``; returns the app id and expected counts."""
    say(f"\n== 3. Segment estimates: building a store of {count:,} endpoints in-process")
    store = SQLiteStore(path)
    side = sqlite3.connect(path, isolation_level=None)
    plan = address_update_plan(side)
    workaround = "address=?" not in plan
    if workaround:
        say(f"  address-uniqueness UPDATE plan: {plan}")
        say(
            "  -> it scans every ACTIVE SMS endpoint of the app on each write (O(n) per write, "
            f"O(n^2) per load); the build adds index {BENCH_ADDRESS_INDEX} and drops it after, "
            "so the estimates below run on the schema as shipped"
        )
        side.execute(
            f"CREATE INDEX {BENCH_ADDRESS_INDEX} ON endpoints "
            "(app_id, address, channel_type, status)"
        )
    report.details["build"] = {"address_update_plan": plan, "bench_index_added": workaround}
    app_id = store.create_app("bench-segments").id
    rng = random.Random("segments")
    expected = Expected()
    started = time.perf_counter()
    step = max(1, count // 10)
    done = 0
    next_report = step
    while done < count:
        n = min(BUILD_BATCH, count - done)
        store.write_endpoints(app_id, large_patches(done, n, rng, expected), CAUSE)
        done += n
        if done >= next_report or done == count:
            elapsed = time.perf_counter() - started
            say(
                f"  {done:>10,}/{count:,} ({done / count:4.0%})  {done / elapsed:8,.0f} "
                f"endpoints/s  {elapsed:6.1f} s"
            )
            next_report += step
    seconds = time.perf_counter() - started
    store.close()
    if workaround:
        side.execute(f"DROP INDEX {BENCH_ADDRESS_INDEX}")
    side.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    side.close()
    rate = count / seconds
    size_mb = path.stat().st_size / 1e6
    say(
        f"  loaded {count:,} endpoints in {seconds:.1f} s: {rate:,.0f} endpoints/s, "
        f"database {size_mb:,.0f} MB"
    )
    report.details["build"].update({"seconds": seconds, "endpoints_per_s": rate, "db_mb": size_mb})
    report.figures.append(
        Figure(
            f"Load {count:,} endpoints (write_endpoints x{BUILD_BATCH:,}"
            + (", +address index)" if workaround else ")"),
            rate,
            "endpoints/s",
            "-",
            None,
            None,
            "-",
        )
    )
    return app_id, expected


def bench_segments(sizes: Sizes, work: Path, report: Report) -> None:
    data_dir = work / "segment-data"
    path = data_dir / "engine.db"
    app_id, expected = build_store(path, sizes.store, report)

    store = SQLiteStore(path)
    segments = {
        key: store.create_segment(
            app_id,
            definition_from_wire({"Name": f"bench {name}", "Dimensions": dims}, require_name=True),
        )
        for key, (name, dims) in SEGMENTS.items()
    }
    count_ms = timed_ms(lambda: store.count_endpoints(app_id), ESTIMATE_RUNS)
    count_median = statistics.median(count_ms)
    say(
        f"\n  baseline SELECT COUNT(*) FROM endpoints WHERE app_id = ?: median "
        f"{count_median:.1f} ms, p95 {percentile(count_ms, 95):.1f} ms "
        f"({store.count_endpoints(app_id):,} rows)"
    )
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    report.plans["baseline count"] = plan_text(
        reader, "SELECT COUNT(*) FROM endpoints WHERE app_id = ?", [app_id]
    )
    rows = []
    estimates: dict[str, Any] = {}
    for key, segment in segments.items():
        name = SEGMENTS[key][0]
        result = store.estimate(app_id, segment.id)
        ms = timed_ms(partial(store.estimate, app_id, segment.id), ESTIMATE_RUNS)
        statements = {}
        for part, sql, params in estimate_statements(store, app_id, segment):
            report.plans[f"({key}) {name}: {part}"] = plan_text(reader, sql, params)
            statements[part] = statistics.median(
                timed_ms(partial(fetch_one, reader, sql, params), 5)
            )
        ok = (result.total, result.eligible) == (expected.total[key], expected.eligible[key])
        estimates[key] = {
            "name": name,
            "total": result.total,
            "eligible": result.eligible,
            "matches_generator": ok,
            "ms_median": statistics.median(ms),
            "ms_p95": percentile(ms, 95),
            "statement_ms_median": statements,
        }
        rows.append(
            [
                f"({key}) {name}",
                f"{result.total:,}",
                f"{result.eligible:,}",
                "yes" if ok else f"NO (want {expected.total[key]:,}/{expected.eligible[key]:,})",
                fmt(statistics.median(ms)),
                fmt(percentile(ms, 95)),
                fmt(statements["total+eligible"]),
            ]
        )
        for stat, value in (("median", statistics.median(ms)), ("p95", percentile(ms, 95))):
            report.figures.append(
                Figure(
                    f"Estimate ({key}) {name}, in-process {stat}",
                    value,
                    "ms",
                    f"<= {ESTIMATE_TARGET_MS:.0f}",
                    value <= ESTIMATE_TARGET_MS,
                    count_median,
                    "bare COUNT(*) median",
                )
            )
    say(
        table(
            [
                "segment",
                "total",
                "eligible",
                "counts match data",
                "median ms",
                "p95 ms",
                "statement ms",
            ],
            rows,
        )
    )
    say(f"  ({ESTIMATE_RUNS} runs after one warm-up; p95 is nearest-rank, i.e. the slowest run)")
    say("\n  EXPLAIN QUERY PLAN")
    for label, lines in report.plans.items():
        say(f"  {label}")
        for line in lines:
            say(f"  {line}")
    reader.close()
    store.close()
    report.details["estimates"] = estimates
    report.details["baseline_count_ms"] = {"median": count_median, "p95": percentile(count_ms, 95)}

    say("\n  estimates through the signed HTTP route (server on the same data dir)")
    rows = []
    with Server(data_dir, work / "server-segments.log") as server:
        http = SignedHttp(server.url)
        try:
            for key in HTTP_SEGMENTS:
                path_ = f"/v1/apps/{app_id}/segments/{segments[key].id}/estimate"
                answer = http.get_json(path_)
                ms = timed_ms(partial(http.get_json, path_), ESTIMATE_RUNS)
                name = SEGMENTS[key][0]
                same = answer == {
                    "TotalEndpoints": estimates[key]["total"],
                    "EligibleEndpoints": estimates[key]["eligible"],
                }
                estimates[key]["http_ms_median"] = statistics.median(ms)
                estimates[key]["http_ms_p95"] = percentile(ms, 95)
                rows.append(
                    [
                        f"({key}) {name}",
                        "yes" if same else f"NO: {answer}",
                        fmt(statistics.median(ms)),
                        fmt(percentile(ms, 95)),
                    ]
                )
                for stat, value in (("median", statistics.median(ms)), ("p95", percentile(ms, 95))):
                    report.figures.append(
                        Figure(
                            f"Estimate ({key}) {name}, HTTP signed {stat}",
                            value,
                            "ms",
                            f"<= {ESTIMATE_TARGET_MS:.0f}",
                            value <= ESTIMATE_TARGET_MS,
                            count_median,
                            "bare COUNT(*) median",
                        )
                    )
        finally:
            http.close()
    say(table(["segment", "same counts as in-process", "median ms", "p95 ms"], rows))

    bench_large_write(path, app_id, sizes, report)


def bench_large_write(path: Path, app_id: str, sizes: Sizes, report: Report) -> None:
    """One UpdateEndpointsBatch-sized write into the large app, as shipped and with an index."""
    say(
        f"\n== 4. write_endpoints of {sizes.large_write} new endpoints into the app of "
        f"{sizes.store:,}"
    )
    rng = random.Random("large-write")
    store = SQLiteStore(path)
    side = sqlite3.connect(path, isolation_level=None)
    rates = {}
    start = sizes.store
    for variant in ("as shipped", "with address index"):
        added = variant != "as shipped" and "address=?" not in address_update_plan(side)
        if added:
            side.execute(
                f"CREATE INDEX {BENCH_ADDRESS_INDEX} ON endpoints "
                "(app_id, address, channel_type, status)"
            )
        patches = large_patches(start, sizes.large_write, rng, Expected())
        start += sizes.large_write
        started = time.perf_counter()
        store.write_endpoints(app_id, patches, CAUSE)
        seconds = time.perf_counter() - started
        rates[variant] = sizes.large_write / seconds
        say(f"  {variant:<20} {seconds * 1000:9.1f} ms  {rates[variant]:9,.0f} endpoints/s")
        if added:
            side.execute(f"DROP INDEX {BENCH_ADDRESS_INDEX}")
    side.close()
    store.close()
    report.details["large_write"] = rates
    report.figures.append(
        Figure(
            f"write_endpoints {sizes.large_write} into {sizes.store:,}-endpoint app",
            rates["as shipped"],
            "endpoints/s",
            f">= {WRITE_TARGET:,.0f}",
            rates["as shipped"] >= WRITE_TARGET,
            rates["with address index"],
            "same, with address index",
        )
    )


# ---------------------------------------------------------------------------------------------
# summary


def summary(report: Report) -> None:
    say("\n== Summary (ratio = value / baseline, both measured in this run)")
    rows = []
    for f in report.figures:
        verdict = "n/a" if f.passed is None else ("pass" if f.passed else "MISS")
        rows.append(
            [
                f.name,
                fmt(f.value, f.unit),
                f.target,
                verdict,
                f"{fmt(f.baseline)} ({f.baseline_name})" if f.baseline is not None else "-",
                f"x{f.ratio:.2f}" if f.ratio is not None else "-",
            ]
        )
    say(table(["figure", "value", "target", "result", "baseline", "ratio"], rows))
    missed = [f.name for f in report.figures if f.passed is False]
    if missed:
        say(f"\nTARGETS MISSED ({len(missed)}):")
        for name in missed:
            say(f"  - {name}")
    else:
        say("\nAll targets met.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark optsync's engine: signed HTTP writes/reads and segment estimates.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run of about a minute ({QUICK.writes:,} writes per run, {QUICK.store:,} "
        "endpoints in the estimate store)",
    )
    parser.add_argument(
        "--endpoints",
        type=int,
        metavar="N",
        help=f"endpoints in the segment-estimate store [default: {FULL.store:,}; "
        f"--quick: {QUICK.store:,}]",
    )
    parser.add_argument(
        "--writes",
        type=int,
        metavar="N",
        help=f"endpoints per UpdateEndpointsBatch run [default: {FULL.writes:,}; "
        f"--quick: {QUICK.writes:,}]",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile one in-process write run and print it"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.endpoints is not None:
        if args.endpoints < 1_000:
            parser.error("--endpoints must be at least 1000")
        sizes = Sizes(sizes.writes, sizes.runs, sizes.gets, args.endpoints)
    if args.writes is not None:
        if args.writes < BATCH_ITEMS:
            parser.error(f"--writes must be at least {BATCH_ITEMS}")
        sizes = Sizes(args.writes, sizes.runs, sizes.gets, sizes.store)

    report = Report(
        machine=machine(),
        sizes=asdict(sizes),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
    )
    m = report.machine
    say("optsync engine benchmark")
    say(f"  machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}")
    say(f"  Python {m['python']}, SQLite {m['sqlite']}, load average {m['load_average_at_start']}")
    say(f"  sizes: {report.sizes}")
    work = Path(tempfile.mkdtemp(prefix="optsync-bench-"))
    started = time.perf_counter()
    try:
        section = time.perf_counter()
        bench_writes(sizes, work, report, args.profile)
        say(f"  [sections 1-2: {time.perf_counter() - section:.0f} s]")
        section = time.perf_counter()
        bench_segments(sizes, work, report)
        say(f"  [sections 3-4: {time.perf_counter() - section:.0f} s]")
    finally:
        if args.keep:
            say(f"  data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.details["seconds"] = time.perf_counter() - started
    report.machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    summary(report)
    say(
        f"\nTotal {report.details['seconds']:.0f} s; load average at start "
        f"{m['load_average_at_start']}, at end {m['load_average_at_end']} (2 cores: above ~1 "
        "means other work competed with this run)"
    )
    if args.json:
        out = asdict(report)
        out["figures"] = [{**asdict(f), "ratio": f.ratio} for f in report.figures]
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        say(f"Figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
