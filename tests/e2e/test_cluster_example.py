"""``examples/cluster/run.py`` as a user runs it (``make cluster``): private nats-server,
PostgreSQL and MariaDB; one capture, two apply workers, two API servers; one worker and one API
server SIGKILLed half-way; the US segment's estimate must read 9 → 5 → 4 on both API servers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).parents[2] / "examples" / "cluster" / "run.py"


def test_the_cluster_walkthrough_shows_9_5_4_on_both_api_servers() -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=240, check=False
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "serve-1: 9 → 5 → 4" in output
    assert "serve-2: 9 → 5 → 4" in output
    assert "SIGKILL apply-2 and serve-2" in output
    # Everything it started is stopped: no private server left listening on its ports.
    servers = next(line for line in output.splitlines() if line.startswith("servers:"))
    ports = re.findall(r":(\d+) \(", servers)
    assert len(ports) == 3, servers
    for port in ports:
        probe = subprocess.run(
            ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
            capture_output=True,
            check=False,
        )
        assert probe.returncode != 0, f"port {port} still open after the script ended"
