"""``optsync audit`` and the overdue opt-outs, with ``optsync run`` as a process delivering to the
stand-in EUM server (which a test makes refuse): an opt-out held back past ``[audit] deadline``
shows in ``optsync status``, ``/metrics`` and the audit export, and stops counting once it is
delivered."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from eum_server import EumServer, eum_server_fixture
from pinpoint_e2e import clean_env
from pipeline_e2e import Layout, Optsync, app_db, run_cli, wait_for
from ports import free_port

from optsync.sample import SAMPLE_TABLE

__all__ = ("eum_server_fixture",)  # registers the fixture ``eum_server``

pytestmark = pytest.mark.e2e

TIMEOUT = 60.0


def set_optin(layout: Layout, user: int, optin: int) -> None:
    with app_db(layout.source) as conn:
        conn.execute(
            f"UPDATE {SAMPLE_TABLE} SET optin = ?, lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', "
            "'now') WHERE userid = ?",
            (optin, f"user{user}"),
        )


def engine_opt_out(layout: Layout, user: int) -> str | None:
    path = layout.data / "engine.db"
    if not path.exists():
        return None
    with closing(sqlite3.connect(path, timeout=10)) as conn:
        try:
            row = conn.execute(
                "SELECT opt_out FROM endpoints WHERE id = ?", (f"user{user}_+1234111111{user}",)
            ).fetchone()
        except sqlite3.OperationalError as exc:  # the file exists, its schema not yet
            if "no such table" not in str(exc):
                raise
            return None
    return None if row is None else str(row[0])


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def audit(layout: Layout) -> list[dict[str, object]]:
    done = run_cli("audit", "--config", str(layout.config), "--format", "ndjson", cwd=layout.folder)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_an_opt_out_a_sink_refuses_turns_overdue_and_the_audit_shows_every_delivery(
    tmp_path: Path, eum_server: EumServer
) -> None:
    eum_server.now = datetime.now(UTC)
    layout = Layout(tmp_path)
    layout.create_source()
    port = free_port()
    layout.write_config(api_port=port)
    with layout.config.open("a") as config:
        config.write(
            '\n[[sink]]\nname = "eum"\ntype = "eum-sms"\nopt_out_list = "Default"\n'
            f'region = "us-east-1"\nendpoint_url = "{eum_server.url}"\n'
            '\n[audit]\ndeadline = "3s"\n'
        )
    env = clean_env(AWS_ACCESS_KEY_ID="AKIDOPTSYNCTEST", AWS_SECRET_ACCESS_KEY="test-secret")
    run = Optsync(["run", "--config", str(layout.config)], tmp_path / "run.log", tmp_path, env)
    run.start()
    try:
        wait_for(lambda: engine_opt_out(layout, 9) == "NONE", "the snapshot", TIMEOUT, run)
        set_optin(layout, 1, 0)
        wait_for(
            lambda: "+12341111111" in eum_server.numbers("Default"), "user1 listed", TIMEOUT, run
        )
        eum_server.refuse("PutOptedOutNumber", "AccessDeniedException", "not allowed")
        set_optin(layout, 2, 0)
        wait_for(lambda: engine_opt_out(layout, 2) == "ALL", "user2's opt-out", TIMEOUT, run)
        wait_for(lambda: metric(port, "optsync_optouts_overdue") == 1, "overdue = 1", TIMEOUT, run)
        assert metric(port, 'optsync_sink_lag_changes{sink="eum"}') >= 1
        status = run_cli("status", "--config", str(layout.config), cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert "1 opt-out(s) overdue" in status.stdout
        assert "sink eum" in status.stdout

        records = {r["endpoint_id"]: r for r in audit(layout) if r["opt_out_after"] == "ALL"}
        user1 = records["user1_***11"]
        user2 = records["user2_***12"]
        assert user1["sink:eum"] == "sent" and user1["delivered:eum"]
        assert user1["late"] is False
        assert user1["cause"] == "source" and user1["source_commit_time"]
        assert user2["sink:eum"] == "pending" and user2["delivered:eum"] is None
        assert user2["late"] is True
        assert "+12341111112" not in json.dumps(user2)  # masked without --reveal

        eum_server.clear_refusals()
        wait_for(
            lambda: "+12341111112" in eum_server.numbers("Default"), "user2 listed", TIMEOUT, run
        )
        wait_for(lambda: metric(port, "optsync_optouts_overdue") == 0, "overdue = 0", TIMEOUT, run)
        user2 = next(r for r in audit(layout) if r["endpoint_id"] == "user2_***12"
                     and r["opt_out_after"] == "ALL")  # fmt: skip
        assert user2["sink:eum"] == "sent" and user2["delivered:eum"]
        assert user2["late"] is True  # delivered, but after the deadline: the record says so
        assert "+12341111112" not in run.output()  # no phone number in the log
    finally:
        run.stop()
