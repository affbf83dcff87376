"""API under load: concurrent signed clients of writes, reads and estimates on ``optsync serve``.

One ``optsync serve`` on a fresh data folder (SQLite engine) holds an app with an SMS channel, a
segment (Country US) and ``SEED`` endpoints written first through UpdateEndpointsBatch. Then
``--clients`` worker processes (16 by default) each loop for ``--seconds`` (60 by default) over
the mix 1 UpdateEndpointsBatch (100 SMS endpoints: half new, half updates of seeded ones, ~30 %
OptOut ALL) : 4 GetEndpoint (a random seeded id) : 1 segment estimate (optsync's signed
extension route). Every call goes through the real boto3 ``pinpoint`` client or, for the
estimate, botocore's SigV4Auth, so the server sees exactly what a real client sends.

Workers are processes, not threads: a boto3 call costs a few milliseconds of client CPU under
the GIL (signing, model serialisation), so 16 threads in one interpreter would measure the
client's GIL rather than the server.

Baseline in the same run: the same loop from ONE client for the same time, on the same server,
so the ratio shows what concurrency costs per call. Reported per operation: calls, errors
(any exception or non-2xx; the target is 0), p50/p95/p99 latency, and the endpoints/s written;
for the server: peak RSS (VmRSS of the server and its children, sampled every 0.5 s) and CPU.
Nothing is asserted: the script exits 0 whether the targets are met or not.

    .venv/bin/python bench/api_load.py [--quick] [--seconds S] [--clients N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import (  # bench/ is not a package; reuse the engine bench's server and helpers
    BATCH_ITEMS,
    KEY_ID,
    REGION,
    SECRET,
    SERVICE,
    US_AREA_CODES,
    Server,
    fmt,
    machine,
    percentile,
    pinpoint_client,
    say,
    table,
)

SEED = 20_000
SEED_THREADS = 4
MIX = ("upsert", "get", "get", "estimate", "get", "get")  # 1 upsert : 4 GetEndpoint : 1 estimate
OPERATIONS = ("upsert", "get", "estimate")
OPT_OUT_SHARE = 0.3
SAMPLE_SECONDS = 0.5
START_DELAY = 3.0  # seconds for every worker to import boto3 and build its client before the start
# Each worker slot writes new numbers from its own block, so numbers are distinct over the run.
SLOT_BLOCK = 150_000
SEED_BASE = 2_000_000
NEW_BASE = SEED_BASE + SEED


@dataclass(frozen=True)
class Job:
    """What one worker process runs."""

    url: str
    app_id: str
    segment_id: str
    slot: int
    start_at: float
    stop_at: float


@dataclass
class Ops:
    """Latencies (seconds) and error texts per operation, from one worker or merged."""

    seconds: dict[str, list[float]] = field(default_factory=lambda: {o: [] for o in OPERATIONS})
    errors: dict[str, list[str]] = field(default_factory=lambda: {o: [] for o in OPERATIONS})
    written: int = 0
    cpu_s: float = 0.0
    """CPU time of the client processes while timing (they share the cores with the server)."""

    def merge(self, other: Ops) -> None:
        for op in OPERATIONS:
            self.seconds[op].extend(other.seconds[op])
            self.errors[op].extend(other.errors[op])
        self.written += other.written
        self.cpu_s += other.cpu_s


@dataclass
class Phase:
    """One timed phase: its clients, merged calls, and the server's resources during it."""

    name: str
    clients: int
    seconds: float
    ops: Ops
    peak_rss_mb: float
    server_cpu_s: float | None

    def row(self, op: str) -> dict[str, Any]:
        times = self.ops.seconds[op]
        out: dict[str, Any] = {
            "calls": len(times) + len(self.ops.errors[op]),
            "errors": len(self.ops.errors[op]),
            "calls_per_s": len(times) / self.seconds,
        }
        for p in (50, 95, 99):
            out[f"p{p}_ms"] = percentile(times, p) * 1000 if times else None
        return out


# ---------------------------------------------------------------------------------------------
# data


def address(index: int) -> str:
    """A distinct, valid US number for each index below 8,000,000."""
    return f"+1{US_AREA_CODES[index % len(US_AREA_CODES)]}{index:07d}"


def seed_id(i: int) -> str:
    return f"seed-{i:06d}"


def item(endpoint_id: str, index: int, rng: random.Random) -> dict[str, Any]:
    return {
        "Id": endpoint_id,
        "ChannelType": "SMS",
        "Address": address(index),
        "OptOut": "ALL" if rng.random() < OPT_OUT_SHARE else "NONE",
        "Attributes": {"plan": [rng.choice(("gold", "silver", "free"))]},
        "User": {"UserId": f"user-{endpoint_id}"},
    }


def upsert_items(slot: int, serial: int, rng: random.Random) -> list[dict[str, Any]]:
    """Half new endpoints (numbers of the slot's block), half seeded ones updated in place."""
    half = BATCH_ITEMS // 2
    base = NEW_BASE + slot * SLOT_BLOCK + serial * half
    new = [item(f"w{slot:02d}-{serial * half + k:06d}", base + k, rng) for k in range(half)]
    updated = [item(seed_id(i), SEED_BASE + i, rng) for i in rng.sample(range(SEED), half)]
    return new + updated


# ---------------------------------------------------------------------------------------------
# the worker process


def run_worker(job: Job) -> Ops:
    """Loop over MIX from ``start_at`` to ``stop_at``; runs in its own process."""
    ops = Ops()
    rng = random.Random(f"worker-{job.slot}")
    client = pinpoint_client(job.url)
    auth = SigV4Auth(Credentials(KEY_ID, SECRET), SERVICE, REGION)
    http = httpx.Client(timeout=60)
    estimate_url = f"{job.url}/v1/apps/{job.app_id}/segments/{job.segment_id}/estimate"
    serial = 0
    time.sleep(max(0.0, job.start_at - time.time()))
    cpu = time.process_time()
    try:
        step = 0
        while time.time() < job.stop_at:
            op = MIX[step % len(MIX)]
            step += 1
            items = upsert_items(job.slot, serial, rng) if op == "upsert" else []
            started = time.perf_counter()
            try:
                if op == "upsert":
                    client.update_endpoints_batch(
                        ApplicationId=job.app_id, EndpointBatchRequest={"Item": items}
                    )
                elif op == "get":
                    client.get_endpoint(
                        ApplicationId=job.app_id, EndpointId=seed_id(rng.randrange(SEED))
                    )
                else:
                    request = AWSRequest(method="GET", url=estimate_url)
                    auth.add_auth(request)
                    response = http.get(estimate_url, headers=dict(request.headers.items()))
                    if response.status_code // 100 != 2:
                        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                    response.json()
            except Exception as exc:  # every failure is counted and reported, never raised
                ops.errors[op].append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            ops.seconds[op].append(time.perf_counter() - started)
            if op == "upsert":
                serial += 1
                ops.written += len(items)
    finally:
        ops.cpu_s = time.process_time() - cpu
        http.close()
    return ops


# ---------------------------------------------------------------------------------------------
# the server's resources


def descendants(pid: int) -> list[int]:
    """The process and every process below it, found through /proc/*/stat."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU of the processes (children that exited are counted by their parent)."""
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak VmRSS of a process tree, sampled every SAMPLE_SECONDS on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(rss_kb(p) for p in descendants(self.pid)))
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_pid(server: Server) -> int:
    proc = server._proc  # the bench's own Server keeps its Popen private; read-only use here
    if proc is None:
        raise RuntimeError("optsync serve is not running")
    return proc.pid


# ---------------------------------------------------------------------------------------------
# phases


def setup(url: str) -> tuple[str, str]:
    """App, SMS channel, segment Country US and SEED endpoints, all through boto3."""
    client = pinpoint_client(url)
    app_id = client.create_app(CreateApplicationRequest={"Name": "bench-api-load"})[
        "ApplicationResponse"
    ]["Id"]
    client.update_sms_channel(ApplicationId=app_id, SMSChannelRequest={"Enabled": True})
    segment_id = client.create_segment(
        ApplicationId=app_id,
        WriteSegmentRequest={
            "Name": "Country US",
            "Dimensions": {
                "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
            },
        },
    )["SegmentResponse"]["Id"]
    rng = random.Random("seed")
    chunks = [
        [item(seed_id(i), SEED_BASE + i, rng) for i in range(start, start + BATCH_ITEMS)]
        for start in range(0, SEED, BATCH_ITEMS)
    ]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def seed(worker: Any) -> None:
        while True:
            with lock:
                if not chunks or failures:
                    return
                chunk = chunks.pop()
            try:
                worker.update_endpoints_batch(
                    ApplicationId=app_id, EndpointBatchRequest={"Item": chunk}
                )
            except Exception as exc:
                failures.append(exc)

    started = time.perf_counter()
    threads = [
        threading.Thread(target=seed, args=(pinpoint_client(url),)) for _ in range(SEED_THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"seeding failed: {failures[0]!r}") from failures[0]
    seconds = time.perf_counter() - started
    say(f"  seeded {SEED:,} endpoints in {seconds:.1f} s ({SEED / seconds:,.0f} endpoints/s)")
    return app_id, segment_id


def run_phase(
    name: str,
    server: Server,
    app_id: str,
    segment_id: str,
    clients: int,
    seconds: float,
    first: int,
) -> Phase:
    """``clients`` worker processes for ``seconds``; slots from ``first`` keep numbers distinct."""
    say(f"\n== {name}: {clients} client process(es) for {seconds:.0f} s")
    pid = server_pid(server)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=clients, mp_context=context) as pool:
        start_at = time.time() + START_DELAY + 0.25 * clients
        jobs = [
            Job(server.url, app_id, segment_id, first + k, start_at, start_at + seconds)
            for k in range(clients)
        ]
        futures = [pool.submit(run_worker, job) for job in jobs]
        time.sleep(max(0.0, start_at - time.time()))
        cpu_before = cpu_seconds(descendants(pid))
        with RssSampler(pid) as sampler:
            ops = Ops()
            for future in futures:
                try:
                    ops.merge(future.result())
                except Exception:  # a crashed worker is an error of the run, not of the bench
                    ops.errors["upsert"].append("worker crashed: " + traceback.format_exc()[-300:])
        cpu_after = cpu_seconds(descendants(pid))
    phase = Phase(name, clients, seconds, ops, sampler.peak_kb / 1024, cpu_after - cpu_before)
    rows = []
    for op in OPERATIONS:
        r = phase.row(op)
        rows.append(
            [
                op,
                f"{r['calls']:,}",
                str(r["errors"]),
                fmt(r["calls_per_s"]),
                fmt(r["p50_ms"]),
                fmt(r["p95_ms"]),
                fmt(r["p99_ms"]),
            ]
        )
    say(table(["operation", "calls", "errors", "calls/s", "p50 ms", "p95 ms", "p99 ms"], rows))
    cpu = phase.server_cpu_s or 0.0
    say(
        f"  written {ops.written:,} endpoints ({ops.written / seconds:,.0f} endpoints/s); server "
        f"peak RSS {phase.peak_rss_mb:,.0f} MB, CPU {cpu:.1f} s ({cpu / seconds:.0%} of one core); "
        f"clients' CPU {ops.cpu_s:.1f} s ({ops.cpu_s / seconds:.0%} of one core)"
    )
    for op in OPERATIONS:
        for text in ops.errors[op][:3]:
            say(f"  error ({op}): {text}")
    return phase


# ---------------------------------------------------------------------------------------------
# summary


def summary(baseline: Phase, load: Phase) -> list[dict[str, Any]]:
    say("\n== Summary (ratio = under load / one client, both measured in this run)")
    figures: list[dict[str, Any]] = []
    rows = []
    for op in OPERATIONS:
        one, many = baseline.row(op), load.row(op)
        for key, unit in (("errors", ""), ("p99_ms", "ms")):
            passed: bool | None
            value, base = many[key], one[key]
            if key == "errors":
                target, passed = "0", value == 0 and base == 0
            else:
                target, passed = "reported", None
            ratio = value / base if value is not None and base else None
            figures.append(
                {"figure": f"{op} {key}", "value": value, "baseline": base, "target": target}
            )
            rows.append(
                [
                    f"{op} {key.replace('_ms', '')}",
                    str(value) if key == "errors" else fmt(value, unit),
                    str(base) if key == "errors" else fmt(base, unit),
                    f"x{ratio:.2f}" if ratio is not None else "-",
                    target,
                    "n/a" if passed is None else ("pass" if passed else "MISS"),
                ]
            )
    for label, many_v, one_v, unit in (
        (
            "endpoints written",
            load.ops.written / load.seconds,
            baseline.ops.written / baseline.seconds,
            "endpoints/s",
        ),
        ("server peak RSS", load.peak_rss_mb, baseline.peak_rss_mb, "MB"),
        (
            "server CPU",
            (load.server_cpu_s or 0) / load.seconds * 100,
            (baseline.server_cpu_s or 0) / baseline.seconds * 100,
            "% of a core",
        ),
        (
            "clients' CPU",
            load.ops.cpu_s / load.seconds * 100,
            baseline.ops.cpu_s / baseline.seconds * 100,
            "% of a core",
        ),
    ):
        figures.append({"figure": label, "value": many_v, "baseline": one_v, "target": "-"})
        ratio = many_v / one_v if one_v else None
        rows.append(
            [
                label,
                fmt(many_v, unit),
                fmt(one_v, unit),
                f"x{ratio:.2f}" if ratio is not None else "-",
                "-",
                "n/a",
            ]
        )
    headers = ["figure", f"{load.clients} clients", "1 client", "ratio", "target", "result"]
    say(table(headers, rows))
    errors = sum(len(p.ops.errors[op]) for p in (baseline, load) for op in OPERATIONS)
    say("\nNo errors." if errors == 0 else f"\nERRORS: {errors} calls failed (target 0).")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Load optsync serve with concurrent signed clients of writes, reads and "
        "segment estimates; compare with one client.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 15 s per phase, 4 clients")
    parser.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        help="length of each phase (one client, then --clients) [default: 60; --quick: 15]",
    )
    parser.add_argument(
        "--clients",
        type=int,
        metavar="N",
        help="worker processes in the load phase [default: 16; --quick: 4]",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (15.0 if args.quick else 60.0)
    clients = args.clients if args.clients is not None else (4 if args.quick else 16)
    if seconds < 1:
        parser.error("--seconds must be at least 1")
    if not 1 <= clients <= 40:
        parser.error("--clients must be between 1 and 40")

    m = machine()
    say("optsync API under load")
    say(f"  machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}")
    say(f"  Python {m['python']}, SQLite {m['sqlite']}, load average {m['load_average_at_start']}")
    say(f"  {SEED:,} seeded endpoints; phases of {seconds:.0f} s: 1 client, then {clients}")
    say(f"  mix per client: {' '.join(MIX)} (UpdateEndpointsBatch of {BATCH_ITEMS})")
    work = Path(tempfile.mkdtemp(prefix="optsync-bench-load-"))
    started = time.perf_counter()
    try:
        with Server(work / "data", work / "server.log") as server:
            app_id, segment_id = setup(server.url)
            baseline = run_phase("Baseline", server, app_id, segment_id, 1, seconds, first=0)
            load = run_phase("Under load", server, app_id, segment_id, clients, seconds, first=1)
    finally:
        if args.keep:
            say(f"  data kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    figures = summary(baseline, load)
    m["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    total = time.perf_counter() - started
    say(
        f"\nTotal {total:.0f} s; load average at start {m['load_average_at_start']}, at end "
        f"{m['load_average_at_end']} (the clients share the machine's cores with the server)"
    )
    if args.json:
        out = {
            "machine": m,
            "seconds": seconds,
            "clients": clients,
            "figures": figures,
            "phases": {
                p.name: {
                    "clients": p.clients,
                    "written": p.ops.written,
                    "peak_rss_mb": p.peak_rss_mb,
                    "server_cpu_s": p.server_cpu_s,
                    "operations": {op: p.row(op) for op in OPERATIONS},
                }
                for p in (baseline, load)
            },
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        say(f"Figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
