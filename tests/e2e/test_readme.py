"""The README's quick start, walked through as written: ``optsync up`` (what ``make run``
starts), the boto3 and extension-route snippets extracted from the README and run against the
app it made, then the ``sqlite3`` and ``status`` commands it prints.

Only the port and the key pair are put in (a test cannot take 8080, nor know the generated key
pair in advance); every other character of the snippets is the README's.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command
from ports import free_port

pytestmark = pytest.mark.e2e

README = Path(__file__).parents[2] / "README.md"
TIMEOUT = 60.0


def section(title: str) -> str:
    """The README's text from the heading ``## title`` to the next ``## `` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    """``optsync up --port P`` in a fresh folder, as ``make run`` starts it; its stdout lines."""
    port = free_port()
    process = subprocess.Popen(
        [*optsync_command(), "up", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
    )
    lines: list[str] = []
    assert process.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    for line in process.stdout:  # the banner ends with the status command and a blank line
        lines.append(line.rstrip("\n"))
        if " status --data-dir " in line or time.monotonic() > deadline:
            break
    try:
        yield process, port, lines
    finally:
        process.terminate()
        process.wait(20)
        process.stdout.close()


def test_the_quick_start_runs_as_written(
    running_up: tuple[subprocess.Popen[str], int, list[str]], tmp_path: Path
) -> None:
    _, port, banner = running_up
    text = "\n".join(banner)
    key_id = re.search(r"aws_access_key_id=(\S+)", text)
    secret = re.search(r"aws_secret_access_key=(\S+)", text)
    assert key_id and secret, text
    snippets = python_blocks(section("Pointing boto3 at optsync"))
    snippets += python_blocks(section("Extension routes (not in Pinpoint's model)"))
    assert len(snippets) == 3, "the README's boto3, write and estimate snippets"
    placeholder = 'key_id, secret = "OPTSYNC...", "..."'
    assert placeholder in snippets[0]
    ready = [
        snippet.replace(placeholder, f'key_id, secret = "{key_id[1]}", "{secret[1]}"').replace(
            "127.0.0.1:8080", f"127.0.0.1:{port}"
        )
        for snippet in snippets
    ]
    namespace: dict[str, object] = {}
    printed = io.StringIO()
    deadline = time.monotonic() + TIMEOUT
    while True:  # the snapshot is applied within moments of the banner
        try:
            with contextlib.redirect_stdout(printed):
                exec(ready[0], namespace)
            break
        except Exception:  # the app or user1 not there yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert printed.getvalue().splitlines()[-1] == "+12341111111 NONE"
    for snippet in ready[1:]:
        with contextlib.redirect_stdout(printed):
            exec(snippet, namespace)
    assert printed.getvalue().splitlines()[-1] == "{'TotalEndpoints': 9, 'EligibleEndpoints': 9}"

    # The two commands the banner prints, as a user pastes them into a second terminal.
    sqlite_line = next(line.strip() for line in banner if line.strip().startswith("sqlite3 "))
    status_line = next(line.strip() for line in banner if " status --data-dir " in line)
    subprocess.run(shlex.split(sqlite_line), cwd=tmp_path, check=True, timeout=30)
    deadline = time.monotonic() + TIMEOUT
    while True:
        status = subprocess.run(
            shlex.split(status_line),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(),
            check=True,
        )
        row = re.search(r"US-Segment\s*│\s*(\d+)\s*│\s*(\d+)", status.stdout)
        if row and (row[1], row[2]) == ("9", "8"):
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(0.2)
