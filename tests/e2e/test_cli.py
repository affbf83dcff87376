"""``optsync serve`` refuses unsafe settings before it listens."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env, optsync_command
from ports import free_port

pytestmark = pytest.mark.e2e


def test_insecure_no_auth_on_a_public_address_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *optsync_command(),
            "serve",
            "--insecure-no-auth",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("Error: ")
    assert "--insecure-no-auth" in error_lines[0]
    assert "0.0.0.0" in error_lines[0]
    assert "Traceback" not in result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_a_data_folder_without_optsync_data_exits_2(tmp_path: Path) -> None:
    """Found in review: ``dlq list`` created a mistyped folder and showed an empty table."""
    missing = tmp_path / "no-such-folder"
    for command in (["dlq", "list"], ["dlq", "replay"], ["status"]):
        result = subprocess.run(
            [*optsync_command(), *command, "--data-dir", str(missing)],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 2, (command, result)
        assert result.stderr.strip().splitlines() == [
            f"Error: {missing} holds no optsync data: check --data-dir (or data_dir / [engine] "
            "url in the config), or start `optsync up` first"
        ]
        assert not missing.exists()
