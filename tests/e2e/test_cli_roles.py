"""Each role opens only what it needs, and says in one line (exit 2) what it is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command
from ports import free_port
from postgres_server import PostgresServer
from postgres_server import postgres_fixture as _postgres_fixture  # noqa: F401 (the fixture)

pytestmark = pytest.mark.e2e


def run_optsync(
    tmp_path: Path, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*optsync_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("role", "text", "fragment"),
    [
        ("capture", '[stream]\nurl = "embedded"\n', "[source] url is missing"),
        ("apply", '[stream]\nurl = "embedded"\n', "no [[mapping]] section"),
        ("run", '[stream]\nurl = "embedded"\n', "[source] url is missing"),
        ("serve", '[engin]\nurl = "sqlite:///e.db"\n', "unknown section 'engin'"),
        ("apply", '[stream]\nurl = "kafka://k:9092"\n', "[stream] url"),
    ],
)
def test_a_role_missing_what_it_needs_exits_2_naming_the_section(
    tmp_path: Path, role: str, text: str, fragment: str
) -> None:
    config = tmp_path / "optsync.toml"
    config.write_text(text)
    line = one_error_line(run_optsync(tmp_path, role, "--config", str(config)))
    assert fragment in line


def test_apply_needs_no_source_and_capture_never_opens_the_engine(tmp_path: Path) -> None:
    """apply: a config without [source] starts; capture: the engine file is never created."""
    source = tmp_path / "app.db"
    subprocess.run(
        ["sqlite3", str(source), "CREATE TABLE optin_status (userid TEXT, phone TEXT, optin INT)"],
        check=True,
    )
    capture = tmp_path / "capture.toml"
    capture.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[source]\nurl = "sqlite:///{source}"\ntables = ["optin_status"]\n'
    )
    process = subprocess.Popen(
        [*optsync_command(), "capture", "--config", str(capture)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Capturing"):
                break
        else:
            raise AssertionError("capture did not start")
        assert (tmp_path / "data" / "stream.db").exists()
        assert not (tmp_path / "data" / "engine.db").exists()
        assert not (tmp_path / "data" / "dlq.db").exists()
    finally:
        process.terminate()
        process.wait(20)
        process.stdout.close()


def test_a_wrong_engine_password_is_one_line_naming_the_fix(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    postgres.sql("DO $$ BEGIN CREATE ROLE pwcheck LOGIN PASSWORD 'right'; "
                 "EXCEPTION WHEN duplicate_object THEN NULL; END $$")  # fmt: skip
    postgres.require_password("pwcheck")
    url = postgres.url("pwcheck", "WrongPassw0rd")
    config = tmp_path / "serve.toml"
    config.write_text(f'[engine]\nurl = "{url}"\n')
    result = run_optsync(tmp_path, "serve", "--config", str(config), "--port", str(free_port()))
    line = one_error_line(result)
    assert "password" in line
    assert "WrongPassw0rd" not in result.stderr + result.stdout
