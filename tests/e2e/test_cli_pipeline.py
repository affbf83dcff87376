"""The pipeline commands as a user runs them: ``demo``, ``up``, ``run``, ``status``, ``dlq``.

Every test starts its own ``optsync`` process on a temporary data folder (and a free port when
it serves the API) and checks the engine's files or the API afterwards; nothing is mocked.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import sqlite3
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import boto3
import botocore.config
import httpx
import pytest
from pinpoint_e2e import REGION, Signed, clean_env
from pipeline_e2e import (
    MAPPING,
    Layout,
    Optsync,
    app_db,
    optsync_command,
    require_sqlite3_binary,
    run_cli,
    wait_for,
)
from ports import free_port

from optsync.sample import SAMPLE_TABLE

pytestmark = pytest.mark.e2e

KEY_ID, SECRET = "K", "s"


def phone(n: int) -> str:
    """A distinct possible US number (+1 234 5xx xxxx) for each ``n`` < 1,000,000."""
    return f"+12345{n:06d}"


# -- 6. demo ---------------------------------------------------------------------------------


def test_demo_prints_the_eligible_counts(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_cli("demo", cwd=tmp_path)
    print(f"optsync demo took {time.monotonic() - started:.2f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 → 5 → 4" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


# -- 7. optsync up: an UPDATE in the source reaches the segment estimate ---------------------


def test_up_applies_the_printed_update_to_the_segment_estimate(tmp_path: Path) -> None:
    require_sqlite3_binary()
    port = free_port()
    data = tmp_path / "data"
    up = Optsync(
        ["up", "--data-dir", str(data), "--port", str(port)],
        log=tmp_path / "up.log",
        cwd=tmp_path,
        env=clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}"),
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "GET /healthz", 30, up, interval=0.1)
        wait_for(lambda: "sqlite3 " in up.output(), "the printed sqlite3 line", 10, up)
        lines = [line.strip() for line in up.output().splitlines()]
        (command,) = [line for line in lines if line.startswith("sqlite3 ")]
        assert "UPDATE" in command and "user1" in command, command

        client = boto3.client(
            "pinpoint",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            config=botocore.config.Config(retries={"max_attempts": 1}),
        )
        try:
            apps = client.get_apps()["ApplicationsResponse"].get("Item", [])
            (app_id,) = [a["Id"] for a in apps if a["Name"] == "optin-demo"]
            segments = client.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"]
            (segment_id,) = [s["Id"] for s in segments if s.get("Name") == "US-Segment"]
        finally:
            client.close()
        signed = Signed(url, KEY_ID, SECRET)
        assert signed.estimate(app_id, segment_id) == (9, 9)

        updated = subprocess.run(
            shlex.split(command), capture_output=True, text=True, timeout=10, check=False
        )
        returned = time.monotonic()
        assert updated.returncode == 0, updated.stderr
        seen: list[tuple[int, int]] = []
        # A deadline poll: how soon the change shows is a figure (printed here, measured by
        # bench/pipeline.py); a bound of 1 s failed on a busy 2-core machine.
        while True:
            estimate = signed.estimate(app_id, segment_id)
            elapsed = time.monotonic() - returned  # when the answer was in hand
            seen.append(estimate)
            if estimate[1] == 8 or elapsed > 30.0:
                break
            time.sleep(0.01)
        print(f"UPDATE -> EligibleEndpoints 8 seen after {elapsed * 1000:.1f} ms")
        assert estimate == (9, 8), f"after {elapsed:.3f} s: {seen[-5:]}"
        assert {e[1] for e in seen} <= {9, 8}
    finally:
        up.stop()
    assert up.process is not None
    assert up.process.returncode in (0, 130), up.output()
    assert "+12341111111" not in up.output()  # no phone numbers in the logs


# -- 8. SIGKILL at random points loses nothing ------------------------------------------------


class Workload(threading.Thread):
    """The application: inserts, opt-in flips, phone changes, deletes, some in one transaction."""

    def __init__(self, layout: Layout, rng: random.Random, first: int, users: dict[str, str]):
        super().__init__(name="app-writer", daemon=True)
        self.layout = layout
        self.rng = rng
        self.next_number = first
        self.users = users
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.counts = {"insert": 0, "flip": 0, "address": 0, "delete": 0, "transaction": 0}

    def run(self) -> None:
        try:
            with app_db(self.layout.source) as app:
                while not self.stop.is_set():
                    if self.rng.random() < 0.1:
                        app.execute("BEGIN IMMEDIATE")
                        for _ in range(self.rng.randint(2, 5)):
                            self.change(app)
                        app.execute("COMMIT")
                        self.counts["transaction"] += 1
                    else:
                        self.change(app)
                    time.sleep(self.rng.uniform(0, 0.004))
        except BaseException as exc:
            self.error = exc

    def change(self, app: sqlite3.Connection) -> None:
        op = self.rng.choices(("insert", "flip", "address", "delete"), (30, 40, 15, 15))[0]
        if op == "insert" or not self.users:
            op = "insert"
            userid = f"k{self.next_number}"
            self.users[userid] = phone(self.next_number)
            app.execute(
                f"INSERT INTO {SAMPLE_TABLE} (userid, phone, optin) VALUES (?, ?, ?)",
                (userid, self.users[userid], self.rng.randint(0, 1)),
            )
        else:
            userid = self.rng.choice(list(self.users))
            if op == "flip":
                app.execute(
                    f"UPDATE {SAMPLE_TABLE} SET optin = 1 - optin WHERE userid = ?", (userid,)
                )
            elif op == "address":
                self.users[userid] = phone(self.next_number)
                app.execute(
                    f"UPDATE {SAMPLE_TABLE} SET phone = ? WHERE userid = ?",
                    (self.users[userid], userid),
                )
            else:
                del self.users[userid]
                app.execute(f"DELETE FROM {SAMPLE_TABLE} WHERE userid = ?", (userid,))
        self.next_number += 1
        self.counts[op] += 1


def opened_more_than(log: Path, count: int) -> bool:
    """Whether the log shows more than ``count`` opened captures."""
    return log.read_text(errors="replace").count("capture opened") > count


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    seed = int(os.environ.get("OPTSYNC_TEST_SEED") or random.randrange(2**32))
    print(f"seed={seed} (set OPTSYNC_TEST_SEED to repeat)")
    rng = random.Random(seed)
    layout = Layout(tmp_path)
    initial = [(f"i{n}", phone(n), n % 2) for n in range(300)]
    layout.create_source(initial)
    config = layout.write_config()
    users = {userid: number for userid, number, _ in initial}
    with app_db(layout.source) as app:
        # WAL from the start: switching while the application writes is another test's subject
        app.execute("PRAGMA journal_mode = WAL")
    writer = Workload(layout, random.Random(rng.random()), 10_000, users)
    log = tmp_path / "optsync.log"
    kills: list[str] = []
    started = time.monotonic()
    writer.start()
    try:
        for i in range(10):
            opened = log.read_text().count("capture opened") if log.exists() else 0
            run = Optsync(["run", "--config", str(config)], log=log, cwd=tmp_path).start()
            if i % 2:  # counted from the opened capture: lands in the snapshot or the log
                wait_for(partial(opened_more_than, log, opened), "capture to open", 20, run)
            delay = rng.uniform(0.1, 1.5)
            time.sleep(delay)
            run.check_alive()  # it must not have stopped by itself
            run.kill()
            head, acked = layout.stream_offsets()
            kills.append(f"{'opened+' if i % 2 else ''}{delay:.2f}s head={head} apply={acked}")
            assert writer.error is None, writer.error
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    print("SIGKILLs:\n  " + "\n  ".join(kills))
    print(f"workload {writer.counts}")
    assert sum(writer.counts.values()) > 200, "the workload hardly ran"

    final = Optsync(["run", "--config", str(config)], log=log, cwd=tmp_path).start()
    try:
        took = wait_for(layout.drained, "lag 0 and an empty change table", 30, final)
        print(f"drained {took:.2f} s after the last start")
        status = run_cli("status", "--config", str(config), cwd=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"│\s*apply\s*│[^\n]*│\s*0 events", status.stdout), status.stdout
        assert re.search(r"│\s*dlq\s*│\s*0 entries", status.stdout), status.stdout
    finally:
        final.stop()
    print(f"total {time.monotonic() - started:.1f} s")

    expected = layout.source_rows()
    actual = layout.engine_rows()
    assert len(expected) == 9 + len(initial) + writer.counts["insert"] - writer.counts["delete"]
    assert expected - actual == set(), f"lost: {sorted(expected - actual)[:10]}"
    assert actual - expected == set(), f"stale or extra: {sorted(actual - expected)[:10]}"
    assert layout.dead_letters() == []
    output = log.read_text(errors="replace")
    leaked = [n for n in list(users.values())[:200] if n in output]
    assert not leaked, "phone numbers in the logs"


# -- 9. bad configuration ---------------------------------------------------------------------


def test_run_with_an_unknown_mapping_key_exits_2(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create_source()
    config = layout.write_config(MAPPING.replace('address = "phone"', 'adress = "phone"'))
    result = run_cli("run", "--config", str(config), cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'adress'" in lines[0]
    assert "[[mapping]]" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (layout.data / "engine.db").exists()


def test_status_of_an_empty_data_dir_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("status", "--data-dir", str(empty), cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(empty) in lines[0]
    assert list(empty.iterdir()) == []  # status created nothing


# -- 10. optsync dlq ----------------------------------------------------------------------------


def test_dlq_lists_a_poison_row_and_replay_fails_until_the_mapping_is_fixed(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    layout.create_source([("poison", phone(1), 7), ("fine", phone(2), 1)])
    config = layout.write_config()
    run = Optsync(["run", "--config", str(config)], log=tmp_path / "run.log", cwd=tmp_path)
    run.start()
    try:
        wait_for(lambda: len(layout.dead_letters()) == 1, "the dead letter", 30, run)
        wait_for(layout.drained, "the pipeline to drain", 30, run)
    finally:
        run.stop()
    assert ("fine_" + phone(2), phone(2), "NONE") in layout.engine_rows()
    assert len(layout.engine_rows()) == 10

    listed = run_cli("dlq", "list", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    text = " ".join(listed.stdout.split())
    assert "1 dead letters" in text, listed.stdout
    assert "column 'optin' has value 7" in text, listed.stdout
    assert phone(1) not in listed.stdout + listed.stderr

    replay = run_cli("dlq", "replay", "--config", str(config), cwd=tmp_path)
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert "still failing 1" in replay.stdout
    assert len(layout.dead_letters()) == 1

    fixed = MAPPING + 'opt_in_true = ["1", "7"]\nopt_in_false = ["0"]\n'
    layout.write_config(fixed)
    replay = run_cli("dlq", "replay", "--config", str(config), cwd=tmp_path)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert "replayed 1, still failing 0" in replay.stdout
    assert layout.dead_letters() == []
    assert ("poison_" + phone(1), phone(1), "NONE") in layout.engine_rows()
    listed = run_cli("dlq", "list", "--all", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 0
    assert "yes" in listed.stdout  # shown as replayed


def test_sigterm_to_the_process_group_stops_up_cleanly(tmp_path: Path) -> None:
    """A service manager's stop (SIGTERM to every process of the group) is a clean shutdown."""
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [*optsync_command(), "up", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}"),
            cwd=tmp_path,
            start_new_session=True,
        )
    try:

        def serving() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        deadline = time.monotonic() + 30
        while not serving():
            assert process.poll() is None, log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "optsync up did not serve within 30 s"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGTERM)
        # uvicorn shuts down, then re-raises the signal: ending by SIGTERM is the normal end.
        code = process.wait(20)
        assert code in (0, -signal.SIGTERM), log.read_text(errors="replace")[-4000:]
        output = log.read_text(errors="replace")
        assert "capture process exited" not in output, output[-4000:]
        assert "Traceback" not in output, output[-4000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
