"""The first hour of a new user (issue 13): what ``optsync up``, ``run`` and ``serve`` do at start.

A taken port, a start that fails, the app's channels and segments from the config, the restart
banner, and ``--help``. Every test runs the real ``optsync`` command on temporary folders.
"""

from __future__ import annotations

import re
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import click
import httpx
import pytest
from pinpoint_e2e import clean_env
from pipeline_e2e import APP_NAME, MAPPING, Layout, Optsync, app_db, run_cli, wait_for
from ports import free_port

from optsync.backends import store_settings
from optsync.capture.mysql.position import CaptureState, LogPosition
from optsync.cli import cli
from optsync.config import load_settings
from optsync.engine.models import ChannelType
from optsync.engine.sqlite import SQLiteStore
from optsync.sample import SAMPLE_TABLE, create_sample_database
from optsync.stream.base import Checkpoint
from optsync.stream.embedded import EmbeddedStream

pytestmark = pytest.mark.e2e

SEGMENTS = """
[[segment]]
name = "US-Segment"
definition = {Dimensions = {Location = {Country = {DimensionType = "INCLUSIVE", Values = ["US"]}}}}

[[segment]]
name = "US-short"
country = "US"
"""


@contextmanager
def taken_port() -> Iterator[int]:
    """A port another process listens on, for the length of the block."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def port_in_use_line(line: str, port: int) -> None:
    match = re.fullmatch(
        rf"Error: 127\.0\.0\.1:{port} is already in use: pick another with --port (\d+) "
        rf"\(or OPTSYNC_API_LISTEN=127\.0\.0\.1:(\d+)\)",
        line,
    )
    assert match is not None, line
    assert match.group(1) == match.group(2)
    assert int(match.group(1)) != port


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


# -- 1. a taken port ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["up", "run", "serve"])
def test_a_taken_port_exits_2_before_anything_is_made_or_printed(
    tmp_path: Path, command: str
) -> None:
    layout = Layout(tmp_path)
    with taken_port() as port:
        if command == "run":
            layout.create_source()
            args = ["run", "--config", str(layout.write_config(api_port=port))]
        else:
            args = [command, "--data-dir", str(layout.data), "--port", str(port)]
        result = run_cli(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    port_in_use_line(lines[0], port)
    assert result.stdout == ""  # no banner, no credentials, no snapshot bar
    assert not layout.data.exists()  # no data folder, engine or credentials


def test_run_port_overrides_the_config_listen_address(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create_source()
    port = free_port()
    with taken_port() as configured:
        config = layout.write_config(api_port=configured)
        run = Optsync(
            ["run", "--config", str(config), "--port", str(port)],
            log=tmp_path / "run.log",
            cwd=tmp_path,
            env=clean_env(OPTSYNC_API_CREDENTIALS="K:s"),
        ).start()
        try:
            wait_for(lambda: healthy(port), "GET /healthz on --port", 30, run)
            assert f"Pinpoint API on http://127.0.0.1:{port}" in run.output()
        finally:
            run.stop()


def test_a_port_taken_during_the_start_is_the_same_one_line_error(tmp_path: Path) -> None:
    """The race: the port is free at the check, taken before the API listens (here while the
    capture waits for the application's write lock)."""
    layout = Layout(tmp_path)
    layout.create_source()
    port = free_port()
    config = layout.write_config(api_port=port)
    log = tmp_path / "run.log"
    with closing(sqlite3.connect(layout.source, isolation_level=None)) as lock:
        lock.execute("BEGIN IMMEDIATE")  # capture cannot install its triggers yet
        run = Optsync(["run", "--config", str(config)], log=log, cwd=tmp_path).start()
        try:
            wait_for((layout.data / "stream.db").exists, "the pipeline to open", 30, run)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as thief:
                thief.bind(("127.0.0.1", port))
                thief.listen()
                lock.execute("COMMIT")
                assert run.process is not None
                code = run.process.wait(60)
        finally:
            run.stop()
    output = run.output()
    assert code == 2, output
    (line,) = [line for line in output.splitlines() if line.startswith("Error: ")]
    port_in_use_line(line, port)
    assert "Errno" not in output
    assert "Traceback" not in output
    assert "Pinpoint API on" not in output


# -- 4. a start that fails: one error line, before any banner ---------------------------------


def test_a_failed_start_prints_its_error_once_and_no_banner(tmp_path: Path) -> None:
    layout = Layout(tmp_path)  # no source database created
    config = layout.write_config(api_port=free_port())
    result = run_cli("run", "--config", str(config), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert output.count("does not exist; check the source path") == 1, output
    errors = [line for line in result.stderr.splitlines() if "does not exist" in line]
    assert errors == [errors[0]] and errors[0].startswith("Error: "), result.stderr
    assert "aws_access_key_id" not in output
    assert "API credentials" not in output
    assert "Pinpoint API on" not in output


# -- 2. channels and segments from the config --------------------------------------------------


def segment_row(status_stdout: str, name: str) -> tuple[int, int] | None:
    match = re.search(rf"│\s*{re.escape(name)}\s*│\s*(\d+)\s*│\s*(\d+)\s*│", status_stdout)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def engine_setup(data: Path) -> tuple[dict[ChannelType, tuple[bool, int]], dict[str, int]]:
    """(channel -> (enabled, version), segment name -> how many versions) of the app."""
    store = SQLiteStore(data / "engine.db", store_settings(load_settings(None, env={})))
    try:
        app = store.find_app(APP_NAME)
        assert app is not None
        channels = {c.channel_type: (c.enabled, c.version) for c in store.list_channels(app.id)}
        versions = {
            str(s.definition.name): len(store.list_segment_versions(app.id, s.id, 100, None).items)
            for s in store.list_segments(app.id, 100, None).items
        }
    finally:
        store.close()
    return channels, versions


def test_run_makes_the_configured_channels_and_segments_once(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    layout.create_source()
    config = layout.write_config(MAPPING + SEGMENTS)
    text = config.read_text().replace(
        'app = "optin-demo"\n', 'app = "optin-demo"\nchannels = ["SMS"]\n'
    )
    config.write_text(text)

    def nine_eligible() -> bool:
        status = run_cli("status", "--config", str(config), cwd=tmp_path)
        return segment_row(status.stdout, "US-Segment") == (9, 9) and segment_row(
            status.stdout, "US-short"
        ) == (9, 9)

    for _ in range(2):
        run = Optsync(["run", "--config", str(config)], log=tmp_path / "run.log", cwd=tmp_path)
        run.start()
        try:
            wait_for(nine_eligible, "US-Segment and US-short at 9 eligible", 60, run, 0.3)
        finally:
            run.stop()
        channels, versions = engine_setup(layout.data)
        assert channels == {ChannelType.SMS: (True, 1)}
        assert versions == {"US-Segment": 1, "US-short": 1}


def test_up_again_leaves_the_sms_channel_version_alone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seen = []
    for _ in range(2):
        port = free_port()
        up = Optsync(
            ["up", "--data-dir", str(data), "--port", str(port)],
            log=tmp_path / "up.log",
            cwd=tmp_path,
            env=clean_env(OPTSYNC_API_CREDENTIALS="K:s"),
        ).start()
        try:
            wait_for(lambda: healthy(port), "GET /healthz", 30, up, 0.1)  # noqa: B023
        finally:
            up.stop()
        seen.append(engine_setup(data))
    assert seen[0] == seen[1] == ({ChannelType.SMS: (True, 1)}, {"US-Segment": 1})


# -- 6. the restart banner names a user who is opted in ---------------------------------------


@pytest.mark.parametrize(
    ("opted_out", "expected"),
    [
        (("user1",), "SET optin = 0 WHERE userid = 'user2'"),
        (tuple(f"user{n}" for n in range(1, 10)), "SET optin = 1 WHERE userid = 'user1'"),
    ],
)
def test_up_suggests_a_change_that_changes_something(
    tmp_path: Path, opted_out: tuple[str, ...], expected: str
) -> None:
    data = tmp_path / "data"
    create_sample_database(data / "app.db")
    with app_db(data / "app.db") as conn:
        for user in opted_out:
            conn.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = ?", (user,))
    port = free_port()
    up = Optsync(
        ["up", "--data-dir", str(data), "--port", str(port)],
        log=tmp_path / "up.log",
        cwd=tmp_path,
        env=clean_env(OPTSYNC_API_CREDENTIALS="K:s"),
    ).start()
    try:
        wait_for(lambda: "status --data-dir" in up.output(), "the banner", 30, up)
    finally:
        up.stop()
    lines = [line.strip() for line in up.output().splitlines()]
    (command,) = [line for line in lines if line.startswith("sqlite3 ")]
    assert command.endswith(f'"UPDATE {SAMPLE_TABLE} {expected}"'), command
    if len(opted_out) == 9:
        assert "Every user is opted out now. Opt one back in, in another terminal:" in lines
    else:
        assert "Opt user2 out in the application database, in another terminal:" in lines


# -- 5. help and the serve data-folder rule ----------------------------------------------------


def commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def test_every_option_of_every_command_has_help(tmp_path: Path) -> None:
    walked = list(commands(cli))
    assert {path[0] for path, _ in walked} >= {
        "up",
        "run",
        "serve",
        "status",
        "capture",
        "apply",
        "demo",
    }
    for path, command in walked:
        result = run_cli(*path, "--help", cwd=tmp_path)
        assert result.returncode == 0, (path, result.stderr)
        assert command.help, path
        for param in command.params:
            if not isinstance(param, click.Option):
                continue
            assert param.help, f"optsync {' '.join(path)} {param.opts[0]} has no help"
            assert not param.show_default, f"{path} {param.opts[0]}: write [default: ...] in help"
            assert param.opts[0] in result.stdout, (path, param.opts)
            if param.name == "data_dir":
                assert "[default: ./optsync-data, or OPTSYNC_DATA_DIR]" in " ".join(
                    result.stdout.split()
                ), (path, result.stdout)
            if param.name == "config_path":
                assert param.help


def test_serve_refuses_a_folder_without_an_engine_unless_named(tmp_path: Path) -> None:
    result = run_cli("serve", "--port", str(free_port()), cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "optsync-data holds no optsync data" in lines[0], result.stderr
    assert not (tmp_path / "optsync-data").exists()

    config = tmp_path / "serve.toml"
    config.write_text(f'data_dir = "{tmp_path / "typo"}"\n')
    result = run_cli("serve", "--config", str(config), "--port", str(free_port()), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "typo holds no optsync data" in result.stderr
    assert not (tmp_path / "typo").exists()

    port = free_port()
    serve = Optsync(
        ["serve", "--data-dir", str(tmp_path / "new"), "--port", str(port)],
        log=tmp_path / "serve.log",
        cwd=tmp_path,
        env=clean_env(OPTSYNC_API_CREDENTIALS="K:s"),
    ).start()
    try:
        wait_for(lambda: healthy(port), "GET /healthz", 30, serve, 0.1)
    finally:
        serve.stop()
    assert (tmp_path / "new" / "engine.db").exists()


# -- 3. status --data-dir of a MySQL/MariaDB or PostgreSQL capture -----------------------------


@pytest.mark.parametrize(
    ("source", "state", "shown"),
    [
        (
            "mysql",
            CaptureState(phase="log", log=LogPosition("mysql-bin.000003", 1234, "0-1-57")).dump(),
            "log GTID 0-1-57",
        ),
        (
            "mysql",
            CaptureState(phase="log", log=LogPosition("mysql-bin.000003", 1234)).dump(),
            "log binlog mysql-bin.000003:1234",
        ),
        (
            "postgres",
            '{"v":1,"phase":"log","slot":"optsync_postgres","log_after":"0/16B3748",'
            '"snapshot_at":null,"table":null,"tables_done":["public.optin_status"]}',
            "log LSN 0/16B3748",
        ),
        (
            "sqlite",
            '{"phase":"log","log_after":42,"tables_done":["optin_status"]}',
            "log change 42",
        ),
    ],
)
def test_status_data_dir_shows_the_position_of_any_source(
    tmp_path: Path, source: str, state: str, shown: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store = SQLiteStore(data / "engine.db", store_settings(load_settings(None, env={})))
    store.create_app(APP_NAME)
    store.close()
    stream = EmbeddedStream(data / "stream.db")
    stream.append([], Checkpoint(source, state))
    stream.close()
    result = run_cli("status", "--data-dir", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    row = re.search(rf"│\s*capture {source}\s*│\s*([^│]*?)\s*│", result.stdout)
    assert row is not None, result.stdout
    assert row.group(1) == shown
    assert "not started" not in result.stdout
