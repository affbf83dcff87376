"""``pip install optsync`` without extras: the embedded system runs; other backends name their
extra.

A real installation without the extras is played by a ``sitecustomize`` that makes every driver
of an extra (psycopg, psycopg2, PyMySQL, mysql-replication, nats-py, uvloop, httptools) fail to
import in the ``optsync`` processes these tests start, as it fails where it is not installed.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest
from pinpoint_e2e import clean_env, optsync_command
from pipeline_e2e import Optsync, wait_for
from ports import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("psycopg", "psycopg2", "psycopg_pool", "pymysql", "pymysqlreplication", "nats",
           "uvloop", "httptools")  # fmt: skip
EXTRA_PACKAGES = {"mysql-replication", "pymysql", "psycopg2-binary", "psycopg", "psycopg-pool",
                  "nats-py", "uvloop", "httptools"}  # fmt: skip

SITECUSTOMIZE = f'''
import sys

class _NotInstalled:
    """Finds the extras' drivers first and says they are not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
'''


@pytest.fixture
def without_extras(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot import any extra's driver."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return clean_env(PYTHONPATH=str(folder), COLUMNS="400")


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*optsync_command(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


def test_core_dependencies_hold_no_driver_of_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("[")[0].split("=")[0].strip().lower()
            for dep in project["dependencies"]}  # fmt: skip
    assert not core & EXTRA_PACKAGES
    extras = project["optional-dependencies"]
    assert set(extras) >= {"mysql", "postgres", "nats", "fast", "all"}


def test_demo_runs_without_extras(tmp_path: Path, without_extras: dict[str, str]) -> None:
    probe = subprocess.run(
        [str(Path(optsync_command()[0]).parent / "python"), "-c", "import psycopg"],
        capture_output=True,
        text=True,
        env=without_extras,
        check=False,
    )
    assert "No module named 'psycopg'" in probe.stderr  # the blocker works
    result = run(["demo"], without_extras, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 → 5 → 4" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr


def test_up_serves_without_extras(tmp_path: Path, without_extras: dict[str, str]) -> None:
    port = free_port()
    up = Optsync(
        ["up", "--data-dir", str(tmp_path / "data"), "--port", str(port)],
        log=tmp_path / "up.log",
        cwd=tmp_path,
        env=without_extras,
    ).start()
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, "GET /healthz", 30, up, interval=0.1)
        assert "pip install 'optsync[fast]'" in up.output()
    finally:
        up.stop()


@pytest.mark.parametrize(
    ("section", "extra"),
    [
        ('[source]\nurl = "mariadb://optsync@127.0.0.1:1/blog_db"\ntables = ["optin_status"]',
         "mysql"),
        ('[source]\nurl = "postgresql://optsync@127.0.0.1:1/app"\ntables = ["optin_status"]',
         "postgres"),
        ('[stream]\nurl = "nats://127.0.0.1:1"', "nats"),
    ],
)  # fmt: skip
def test_a_backend_without_its_extra_is_one_line_naming_the_pip_install(
    tmp_path: Path, without_extras: dict[str, str], section: str, extra: str
) -> None:
    config = tmp_path / "optsync.toml"
    mapping = '[[mapping]]\ntable = "optin_status"\naddress = "phone"\nopt_in = "optin"\n'
    config.write_text(f"{section}\n\n{mapping}")
    command = "capture" if section.startswith("[source]") else "apply"
    result = run([command, "--config", str(config)], without_extras, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"pip install 'optsync[{extra}]'" in lines[0]
