"""A source that cannot be reached at start: capture retries with backoff (0.5 s doubling to
30 s, one log line per outage at most every 30 s), the API is served meanwhile and says
"waiting for source", and Ctrl-C ends it cleanly."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command
from ports import free_port

pytestmark = pytest.mark.e2e


def get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return str(reply.read().decode()).strip()
    except OSError:
        return None


def test_an_unreachable_source_waits_serves_the_api_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port, dead_port = free_port(), free_port()
    config = tmp_path / "optsync.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[source]\nurl = "mariadb://optsync:secret@127.0.0.1:{dead_port}/blog_db"\n'
        'tables = ["optin_status"]\n'
        f'[api]\nlisten = "127.0.0.1:{port}"\n'
        '[[mapping]]\ntable = "optin_status"\naddress = "phone"\nopt_in = "optin"\n'
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*optsync_command(), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(OPTSYNC_API_CREDENTIALS="K:s"),
            cwd=tmp_path,
        )
    try:
        deadline = time.monotonic() + 30
        while get(f"http://127.0.0.1:{port}/healthz") != "ok":
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"API not served meanwhile:\n{log.read_text()}"
            time.sleep(0.2)
        metrics = get(f"http://127.0.0.1:{port}/metrics")
        assert metrics is not None and "optsync_capture_waiting 1" in metrics
        time.sleep(6)  # attempts at about 0.5, 1, 2 and 4 s: one WARNING line for the outage
        retries = [line for line in log.read_text().splitlines() if "capture retry" in line]
        assert len(retries) == 1, retries
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert code in (0, 130), output
    assert "Traceback" not in output
    assert "exited (code" not in output
    assert "secret" not in output  # the URL's password is never printed
