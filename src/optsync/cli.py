"""The ``optsync`` command line.

Exit codes: 0 success, 1 a failure at run time (the message says which stage and why), 2 bad
usage or configuration (one readable line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import shutil
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import click
import msgspec
import uvicorn
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from starlette.types import ASGIApp

from optsync.api.app import PinpointApi
from optsync.api.sigv4 import SignatureVerifier
from optsync.apply.mapping import Mapper
from optsync.apply.worker import ApplyStats, ApplyWorker
from optsync.audit import format_duration
from optsync.backends import (
    check_settings,
    mapping_rules,
    open_dlq,
    open_source,
    open_store,
    open_stream,
    require_data,
    segment_definition,
)
from optsync.capture.states import NOT_STARTED
from optsync.cli_consent import register as register_consent_commands
from optsync.cli_keys import register as register_keys_commands
from optsync.cli_lambda import register as register_lambda_commands
from optsync.cli_migrate import register as register_migrate_commands
from optsync.cli_reconcile import register as register_reconcile_command
from optsync.cli_replay import register as register_replay_command
from optsync.config import (
    LOOPBACK_HOSTS,
    ApiSettings,
    MappingSettings,
    SegmentSettings,
    Settings,
    SourceSettings,
    load_settings,
)
from optsync.console import console_context, create_console
from optsync.credentials import load_or_create_credentials
from optsync.engine.models import App, ChannelType
from optsync.engine.segments import definition_to_wire
from optsync.engine.store import EndpointStore, Segment
from optsync.errors import ConfigError, Fatal, Retryable
from optsync.extras import has_fast_server
from optsync.logs import configure_logging
from optsync.metrics import Metrics
from optsync.pipeline import Pipeline, ensure_app
from optsync.prefcenter import create_prefcenter, prefs_context
from optsync.retry import Backoff
from optsync.runtime import tune_gc
from optsync.sample import SAMPLE_TABLE, create_sample_database
from optsync.status import Status, read_status
from optsync.stream.base import Checkpoint

__all__ = ("main",)

logger = logging.getLogger("optsync")
T = TypeVar("T")
console = Console()

SAMPLE_SEGMENT = "US-Segment"
SAMPLE_SEGMENTS = (
    SegmentSettings(
        SAMPLE_SEGMENT,
        {
            "Name": SAMPLE_SEGMENT,
            "Dimensions": {
                "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
            },
        },
    ),
)
DATA_DIR_HELP = "Data folder [default: ./optsync-data, or OPTSYNC_DATA_DIR]."
CONFIG_HELP = "The TOML config file (see examples/)."
SAMPLE_RULE = MappingSettings(
    table=SAMPLE_TABLE,
    channel=ChannelType.SMS.value,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optsync")
def cli() -> None:
    """Keep messaging opt-in/opt-out state in sync with the database that owns it."""


# --------------------------------------------------------------------------------------------
# shared pieces


def _verifier(
    settings: Settings, insecure_no_auth: bool
) -> tuple[SignatureVerifier | None, list[str]]:
    """Signature checking for the API, and the banner lines saying where the credentials are
    (printed with the rest of the banner, once the start has succeeded)."""
    if insecure_no_auth:
        if settings.api.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"--insecure-no-auth is refused on {settings.api.host}: listen on 127.0.0.1, "
                "or configure OPTSYNC_API_CREDENTIALS"
            )
        logger.warning("authentication is OFF (--insecure-no-auth): any local process may write")
        return None, []
    credentials = dict(settings.api.credentials)
    if credentials:
        return SignatureVerifier(credentials), [
            "API credentials: from OPTSYNC_API_CREDENTIALS / the config file"
        ]
    credentials, created = load_or_create_credentials(settings.data_dir)
    where = settings.data_dir / "credentials"
    lines = [f"API credentials ({'created in' if created else 'from'} {where}):"]
    for key_id, secret in credentials.items():
        lines.append(f"  aws_access_key_id={key_id}\n  aws_secret_access_key={secret}")
    return SignatureVerifier(credentials), lines


def _listen_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _listener(api: ApiSettings) -> socket.socket:
    """A socket listening on the API's address, or a ConfigError naming ``--port`` and
    ``OPTSYNC_API_LISTEN`` (exit 2, not uvicorn's late ``[Errno 98]`` and exit 3)."""
    family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR as uvicorn sets it: a port whose old connections linger in TIME_WAIT is
        # free; one another process listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((api.host, api.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise _listen_error(api, exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_error(api: ApiSettings, exc: OSError) -> ConfigError:
    where = _listen_text(api.host, api.port)
    if exc.errno != errno.EADDRINUSE:
        return ConfigError(
            f"cannot listen on {where} ({exc.strerror}): pick another address with --host and "
            "--port (or OPTSYNC_API_LISTEN=HOST:PORT)"
        )
    other = _free_port_near(api.host, api.port)
    return ConfigError(
        f"{where} is already in use: pick another with --port {other} "
        f"(or OPTSYNC_API_LISTEN={_listen_text(api.host, other)})"
    )


def _free_port_near(host: str, port: int) -> int:
    """The first port after ``port`` that is free on ``host`` (``port + 1`` if none is)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in range(port + 1, min(port + 100, 65536)):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, candidate))
            except OSError:
                continue
            return candidate
    return port + 1 if port < 65535 else port - 1


def _check_listen(api: ApiSettings) -> None:
    """Refuse a taken address before anything is created, printed or snapshotted."""
    _listener(api).close()


def _serve(
    settings: Settings,
    store: EndpointStore,
    verifier: SignatureVerifier | None,
    listener: socket.socket,
    pipeline: Pipeline | None = None,
    prefs: ASGIApp | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run the API (console at /console, preference center at /prefs if given) on
    ``listener`` (from ``_listener``) until Ctrl-C or until the pipeline fails."""
    metrics = Metrics() if metrics is None else metrics
    if pipeline is not None:

        def status() -> Status:
            found = read_status(settings, store, pipeline.stream, pipeline.dlq)
            return dataclasses.replace(found, capture_waiting=pipeline.capture_waiting)

        def apply_stats() -> list[ApplyStats]:
            return [] if pipeline.worker is None else [pipeline.worker.stats]

        metrics.watch(status, apply_stats)

    console_app = create_console(
        console_context(
            settings,
            store,
            pipeline=pipeline is not None,
            stream=None if pipeline is None else pipeline.stream,
            dlq=None if pipeline is None else pipeline.dlq,
            capture_waiting=None if pipeline is None else (lambda: pipeline.capture_waiting),
        ),
        sinks=settings.sinks,
        audit=settings.audit,
    )
    mounts = {"/console": console_app}
    if prefs is not None:
        mounts["/prefs"] = prefs
    fast = has_fast_server()
    if not fast:
        logger.info(
            "uvloop and httptools are not installed: the API runs on asyncio and h11 at about "
            "half the throughput; pip install 'optsync[fast]' to speed it up"
        )
    config = uvicorn.Config(
        PinpointApi(store, verifier, metrics, mounts),
        host=settings.api.host,
        port=settings.api.port,
        # Named, not "auto", when the fast extra is there; else the pure-Python pair, said once.
        loop="uvloop" if fast else "asyncio",
        http="httptools" if fast else "h11",
        access_log=False,
        log_config=None,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    tune_gc()
    if pipeline is not None:

        def watch() -> None:
            while not server.should_exit:
                if pipeline.failure is not None:
                    server.should_exit = True
                time.sleep(0.2)

        threading.Thread(target=watch, name="watch", daemon=True).start()
    try:
        server.run(sockets=[listener])
    except SystemExit as exc:  # uvicorn's start-up failure (3): not one of our exit codes
        if exc.code in (0, None):
            raise
        raise Fatal(
            f"the API server on {_listen_text(settings.api.host, settings.api.port)} could not "
            "start: the log above says why"
        ) from None
    finally:
        listener.close()


@contextmanager
def _snapshot_progress() -> Iterator[Progress]:
    progress = Progress(
        TextColumn("snapshot {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield progress


def _when_up(stage: str, open_: Callable[[], T]) -> T:
    """``open_()`` once the servers it needs answer.

    A role started before its NATS server or its PostgreSQL engine is up (a reboot, a
    supervisor starting everything at once) waits and retries with backoff, one WARNING line
    naming what it waits for, instead of exiting; Ctrl-C stops it. A setting that cannot work
    (``ConfigError``) still ends it at once with exit code 2.
    """
    backoff = Backoff(stage)
    while True:
        try:
            opened = open_()
        except Retryable as exc:
            time.sleep(backoff.failed(exc))
            continue
        backoff.succeeded()
        return opened


def _run_pipeline(
    settings: Settings,
    store: EndpointStore | None,
    verifier: SignatureVerifier | None,
    banner: list[str],
    prefs: ASGIApp | None = None,
    stages: tuple[str, ...] = ("capture", "apply"),
) -> None:
    tasks: dict[str, TaskID] = {}
    metrics = Metrics()
    with _snapshot_progress() as bar:

        def progress(table: str, done: int, expected: int | None) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=expected)
            bar.update(tasks[table], completed=done, total=expected)

        pipeline = _when_up(
            "/".join(stages),
            lambda: Pipeline(
                settings,
                store,
                progress=progress,
                on_applied=metrics.observe_applied,
                stages=stages,
            ),
        )
        pipeline.start()
        try:
            # Serve as soon as the snapshot is taken, or at once while the source cannot be
            # reached (capture keeps trying; status and console say "waiting for source").
            while not pipeline.snapshot_done.wait(0.1):
                if pipeline.failure is not None or pipeline.capture_waiting is not None:
                    break
        except KeyboardInterrupt:
            pipeline.stop()
            return
    try:
        pipeline.check()
        # Bound by us before the banner, not by uvicorn after it: a port taken since the check
        # at start (a race) is the same one-line error and exit 2, not [Errno 98] and exit 3.
        listener = _listener(settings.api) if settings.serve_api else None
        for line in banner:
            click.echo(line)
        if listener is not None:
            assert store is not None
            _serve(settings, store, verifier, listener, pipeline, prefs, metrics)
        else:
            while pipeline.failure is None:
                time.sleep(0.2)
        pipeline.check()
    except KeyboardInterrupt:
        pass
    finally:
        pipeline.stop()


def _prepare_app(store: EndpointStore, settings: Settings) -> App:
    """The pipeline's app with ``[engine] channels`` enabled and every ``[[segment]]`` made.

    Idempotent: a channel enabled already is not written (its version stays), and a segment
    whose definition is the configured one gets no new version; one that differs gets a new
    version with the configured definition (the config file owns what it declares).
    """
    app = ensure_app(store, settings.app)
    enabled = {c.channel_type for c in store.list_channels(app.id) if c.enabled}
    for channel in settings.channels:
        if channel not in enabled:
            store.put_channel(app.id, channel, True, {})
            logger.info("channel enabled app=%s channel=%s", settings.app, channel.value)
    if settings.segments:
        existing: dict[str | None, Segment] = {}
        for segment in _segments_of(store, app.id):
            existing.setdefault(segment.definition.name, segment)
        for wanted in settings.segments:
            definition = segment_definition(wanted)
            found = existing.get(wanted.name)
            if found is None:
                created = store.create_segment(app.id, definition)
                # Several apply processes may start at once: the oldest segment of the name
                # stays, and one that lost the race deletes its own (as ``ensure_app`` does).
                same = [s for s in _segments_of(store, app.id) if s.definition.name == wanted.name]
                oldest = min(same, key=lambda s: (s.creation_date, s.id), default=created)
                if oldest.id != created.id:
                    store.delete_segment(app.id, created.id)
                else:
                    logger.info("segment created app=%s segment=%s", settings.app, wanted.name)
            elif definition_to_wire(found.definition) != definition_to_wire(definition):
                store.update_segment(app.id, found.id, definition)
                logger.info(
                    "segment updated from the config app=%s segment=%s", settings.app, wanted.name
                )
    return app


def _segments_of(store: EndpointStore, app_id: str) -> Iterator[Segment]:
    token: str | None = None
    while True:
        page = store.list_segments(app_id, 1000, token)
        yield from page.items
        if page.next_token is None:
            return
        token = page.next_token


def _me() -> str:
    """How the user started optsync (``.venv/bin/optsync`` under ``make run``)."""
    return sys.argv[0] if sys.argv and sys.argv[0].endswith("optsync") else "optsync"


def _sample_settings(data_dir: Path, host: str, port: int, base: Settings) -> Settings:
    return msgspec.structs.replace(
        base,
        data_dir=data_dir,
        api=ApiSettings(host=host, port=port, credentials=base.api.credentials),
        source=SourceSettings(url=f"sqlite:///{data_dir / 'app.db'}", tables=(SAMPLE_TABLE,)),
        mappings=(SAMPLE_RULE,),
        channels=(ChannelType.SMS,),
        segments=SAMPLE_SEGMENTS,
        serve_api=True,
    )


# --------------------------------------------------------------------------------------------
# commands


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option(
    "--host",
    help="Address to listen on [default: OPTSYNC_API_LISTEN or [api] listen, else 127.0.0.1].",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port [default: OPTSYNC_API_LISTEN or [api] listen, else 8080].",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Data folder; a new, empty engine is created there if it has none "
    "[default: ./optsync-data, or OPTSYNC_DATA_DIR].",
)
@click.option("--insecure-no-auth", is_flag=True, help="Accept unsigned requests (loopback only).")
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    insecure_no_auth: bool,
) -> None:
    """Serve the engine through Pinpoint's REST API (boto3 works with endpoint_url).

    Needs only the engine ([engine] url): run several behind one address for availability.
    A SQLite engine must exist already (made by `optsync up`, `run` or `apply`), unless
    --data-dir names the folder explicitly: then a new, empty engine is created in it. A
    PostgreSQL engine is checked when it is opened.
    """
    base = check_settings(load_settings(config_path))
    settings = msgspec.structs.replace(
        base,
        data_dir=data_dir or base.data_dir,
        api=ApiSettings(
            host=host or base.api.host,
            port=port or base.api.port,
            credentials=base.api.credentials,
            console_secret=base.api.console_secret,
        ),
    )
    _check_listen(settings.api)
    if data_dir is None or settings.engine_url is not None:
        require_data(settings)
    store = _when_up("serve", lambda: open_store(settings))
    try:
        verifier, lines = _verifier(settings, insecure_no_auth)
        listener = _listener(settings.api)
        for line in lines:
            click.echo(line)
        click.echo(f"Pinpoint API on http://{settings.api.host}:{settings.api.port}")
        click.echo(f"Console on http://{settings.api.host}:{settings.api.port}/console")
        _serve(settings, store, verifier, listener)
    finally:
        store.close()


def _try_out_lines(app_db: Path) -> list[str]:
    """What to type to see a change flow through: opt out a user who is opted in now, or opt
    one in when every user is opted out already."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{app_db}?mode=ro", uri=True)) as conn:
            row = conn.execute(
                f"SELECT userid, optin FROM {SAMPLE_TABLE} WHERE userid IS NOT NULL "
                "ORDER BY optin = 0, length(userid), userid LIMIT 1"
            ).fetchone()
    except sqlite3.Error:
        row = None
    if row is None:
        return [f"Add a user to {SAMPLE_TABLE} in {app_db} and watch the segment change:"]
    userid, optin = str(row[0]).replace("'", "''"), row[1]
    if optin in (0, "0"):
        return [
            "Every user is opted out now. Opt one back in, in another terminal:",
            f"  sqlite3 {app_db} \"UPDATE {SAMPLE_TABLE} SET optin = 1 WHERE userid = '{userid}'\"",
        ]
    return [
        f"Opt {row[0]} out in the application database, in another terminal:",
        f"  sqlite3 {app_db} \"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE userid = '{userid}'\"",
    ]


@cli.command()
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
@click.option("--host", help="Address to listen on [default: 127.0.0.1, or OPTSYNC_API_LISTEN].")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port to listen on [default: 8080, or OPTSYNC_API_LISTEN].",
)
@click.option(
    "--prefs/--no-prefs",
    default=True,
    help="Serve the sample preference center (the demo app) at /prefs [default: --prefs].",
)
def up(data_dir: Path | None, host: str | None, port: int | None, prefs: bool) -> None:
    """Everything from one command on embedded parts, seeded with the AWS sample's nine users."""
    base = load_settings(None)
    data_dir = data_dir or base.data_dir
    host = host or base.api.host
    port = port or base.api.port
    settings = _sample_settings(data_dir, host, port, base)
    _check_listen(settings.api)
    app_db = data_dir / "app.db"
    created = create_sample_database(app_db)
    store = open_store(settings)
    try:
        _prepare_app(store, settings)
        verifier, credentials = _verifier(settings, insecure_no_auth=False)
        banner = [
            *credentials,
            f"{'Created' if created else 'Using'} the source database {app_db} "
            f"(table {SAMPLE_TABLE}).",
            f"Pinpoint API on http://{host}:{port}  (app {settings.app!r}, segment "
            f"{SAMPLE_SEGMENT!r})",
            f"Console on http://{host}:{port}/console  (sign in with the API key pair)",
            *([f"Preference center (sample app) on http://{host}:{port}/prefs"] if prefs else []),
            "",
            *_try_out_lines(app_db),
            "and watch the segment's eligible count change:",
            f"  {_me()} status --data-dir {data_dir}",
            "",
        ]
        prefs_app = create_prefcenter(prefs_context(settings)) if prefs else None
        _run_pipeline(settings, store, verifier, banner, prefs_app)
    finally:
        store.close()


@cli.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.option("--host", help="Address the API listens on [default: [api] listen].")
@click.option("--port", type=click.IntRange(1, 65535), help="Port [default: [api] listen].")
@click.option("--insecure-no-auth", is_flag=True, help="Accept unsigned requests (loopback only).")
@click.option(
    "--prefs", is_flag=True, help="Serve the sample preference center at /prefs (needs [api])."
)
def run(
    config_path: Path, host: str | None, port: int | None, insecure_no_auth: bool, prefs: bool
) -> None:
    """The pipeline from a config file; serves the API too when the file has [api].

    At start, the app gets the channels of [engine] channels and the segments of [[segment]]
    when it lacks them; nothing is written when they are as configured (a segment whose
    definition differs from the file's gets a new version).
    """
    settings = check_settings(load_settings(config_path))
    source = settings.source
    if source is None:
        raise ConfigError(f"{config_path}: [source] url is missing: say which database to capture")
    if prefs and not settings.serve_api:
        raise ConfigError(f"{config_path}: --prefs needs an [api] table: the page is served there")
    if (host or port) and not settings.serve_api:
        raise ConfigError(f"{config_path}: --host/--port need an [api] table: nothing listens")
    settings = msgspec.structs.replace(
        settings,
        api=msgspec.structs.replace(
            settings.api, host=host or settings.api.host, port=port or settings.api.port
        ),
    )
    if settings.serve_api:
        _check_listen(settings.api)
    prefs_app = create_prefcenter(prefs_context(settings)) if prefs else None
    store = open_store(settings)
    try:
        _prepare_app(store, settings)
        verifier, credentials = (
            _verifier(settings, insecure_no_auth) if settings.serve_api else (None, [])
        )
        banner = [
            *credentials,
            f"Capturing {source.redacted_url} tables {', '.join(source.tables)}",
        ]
        if settings.serve_api:
            url = f"http://{settings.api.host}:{settings.api.port}"
            banner.append(f"Pinpoint API on {url}, console on {url}/console")
            if prefs_app is not None:
                banner.append(f"Preference center (sample app) on {url}/prefs")
        _run_pipeline(settings, store, verifier, banner, prefs_app)
    finally:
        store.close()


@cli.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
@click.option("--resnapshot", is_flag=True, help="Forget the saved position; snapshot again.")
@click.option("--drop-slot", is_flag=True, help="PostgreSQL: drop the replication slot and exit.")
@click.option(
    "--start-position",
    metavar="POSITION",
    help="MySQL/MariaDB: read the log from this GTID position (0-1-57) or FILE:POS, without a "
    "snapshot; changes before it are not captured.",
)
def capture(
    config_path: Path, resnapshot: bool, drop_slot: bool, start_position: str | None
) -> None:
    """Run only the capture stage: the source into the stream (never opens the engine).

    Needs [source] and [stream]; `optsync apply` processes read what it captures.
    """
    settings = check_settings(load_settings(config_path))
    if settings.source is None:
        raise ConfigError(
            f"{config_path}: [source] url is missing: the capture stage reads that database"
        )
    source = open_source(settings)
    if drop_slot:
        source.drop_slot()
        click.echo(f"dropped the replication slot of {source.name}")
        return
    if resnapshot and start_position:
        raise ConfigError("--resnapshot and --start-position are two ways out: pick one")
    if start_position:
        state = source.state_at(start_position)
        stream = open_stream(settings)
        try:
            stream.append([], Checkpoint(source.name, state))
        finally:
            stream.close()
        click.echo(f"{source.name}: the next start reads the log from {start_position}")
    if resnapshot:
        fresh = source.resnapshot_state()
        stream = open_stream(settings)
        try:
            stream.append([], Checkpoint(source.name, fresh))
        finally:
            stream.close()
        click.echo(f"{source.name}: the next start takes a new snapshot")
    source.close()
    _run_pipeline(
        msgspec.structs.replace(settings, serve_api=False),
        None,
        None,
        [f"Capturing {settings.source.redacted_url} into {_stream_text(settings)}"],
        stages=("capture",),
    )


def _stream_text(settings: Settings) -> str:
    if settings.stream.scheme == "embedded":
        return str(settings.stream_path)
    return f"{settings.stream.redacted_url} (stream {settings.stream.name})"


@cli.command()
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help=CONFIG_HELP
)
def apply(config_path: Path) -> None:
    """Run only the apply stage: the stream into the engine (never opens the source).

    Needs [stream], [engine] and [[mapping]]. Start several against one NATS stream: they share
    its partitions, and take over those of one that stops.
    """
    settings = check_settings(load_settings(config_path))
    if not settings.mappings:
        raise ConfigError(
            f"{config_path}: no [[mapping]] section: the apply stage needs the rules that turn "
            "rows into endpoints"
        )
    store = _when_up("apply", lambda: open_store(settings))
    try:
        _when_up("apply", lambda: _prepare_app(store, settings))
        _run_pipeline(
            msgspec.structs.replace(settings, serve_api=False),
            store,
            None,
            [
                f"Applying {_stream_text(settings)} into app {settings.app!r} of "
                f"{settings.redacted_engine_url}"
            ],
            stages=("apply",),
        )
    finally:
        store.close()


def _settings_for(config_path: Path | None, data_dir: Path | None) -> Settings:
    if config_path is not None:
        settings = check_settings(load_settings(config_path))
        return msgspec.structs.replace(settings, data_dir=data_dir) if data_dir else settings
    base = load_settings(None)
    return _sample_settings(data_dir or base.data_dir, base.api.host, base.api.port, base)


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
def status(config_path: Path | None, data_dir: Path | None) -> None:
    """Positions, lag per stage, DLQ size and segment estimates."""
    settings = require_data(_settings_for(config_path, data_dir))
    store = open_store(settings)
    try:
        report = read_status(settings, store)
    finally:
        store.close()
    table = Table(title="optsync status", show_header=True)
    table.add_column("stage")
    table.add_column("position")
    table.add_column("lag")
    for name, view in report.captures or (("", NOT_STARTED),):
        table.add_row(f"capture {name}".strip(), view.line(), "-")
    table.add_row("stream", f"head {report.stream_head}", "-")
    table.add_row(
        "apply",
        f"offset {report.apply_offset}",
        f"{report.lag_events} events, {report.lag_seconds:.3f} s",
    )
    table.add_row("dlq", f"{report.dlq_size} entries", "-")
    for sink in report.sinks:
        extra = [f"{sink.dead_letters} dead letters"] if sink.dead_letters else []
        if sink.waiting:
            extra.append(f"{sink.waiting} waiting")
        table.add_row(
            f"sink {sink.name}",
            f"{sink.kind}, last delivery {sink.last_delivery or '-'}"
            + (f" ({', '.join(extra)})" if extra else ""),
            f"{sink.behind} changes, {sink.lag_seconds:.3f} s",
        )
    console.print(table)
    if report.sinks:
        deadline = format_duration(report.audit_deadline)
        if report.optouts_overdue:
            console.print(
                f"[bold red]{report.optouts_overdue} opt-out(s) overdue[/]: not delivered to "
                f"every sink within {deadline}; see `optsync audit` and the console's Sinks page"
            )
        else:
            console.print(f"opt-outs overdue: 0 (deadline {deadline})")
    segments = Table(title=f"app {settings.app!r}: {report.endpoints} endpoints")
    for column in ("segment", "total", "eligible"):
        segments.add_column(column)
    for s in report.segments:
        segments.add_row(s.name, str(s.total), str(s.eligible))
    console.print(segments)


@cli.group()
def dlq() -> None:
    """The dead-letter queue: records apply could not use, with their reasons."""


@dlq.command("list")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
@click.option("--all", "include_replayed", is_flag=True, help="Include replayed entries.")
def dlq_list(config_path: Path | None, data_dir: Path | None, include_replayed: bool) -> None:
    """List dead letters (id, stream offset, reason)."""
    settings = require_data(_settings_for(config_path, data_dir))
    queue = open_dlq(settings)
    try:
        entries = queue.list(include_replayed=include_replayed, limit=1000)
    finally:
        queue.close()
    table = Table(title=f"{len(entries)} dead letters")
    for column in ("id", "offset", "key", "reason", "replayed"):
        table.add_column(column)
    for e in entries:
        table.add_row(
            str(e.id),
            str(e.stream_offset),
            e.partition_key,
            e.reason,
            "yes" if e.replayed_at else "",
        )
    console.print(table)


@dlq.command("replay")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
@click.argument("ids", nargs=-1, type=int)
def dlq_replay(config_path: Path | None, data_dir: Path | None, ids: tuple[int, ...]) -> None:
    """Run dead letters (all, or the given ids) through mapping and engine again."""
    settings = require_data(_settings_for(config_path, data_dir))
    store = open_store(settings)
    stream = open_stream(settings)
    queue = open_dlq(settings)
    try:
        app = ensure_app(store, settings.app)
        worker = ApplyWorker(stream, Mapper(mapping_rules(settings.mappings)), store, app.id, queue)
        replayed, failed = worker.replay_dead_letters(list(ids) or None)
    finally:
        queue.close()
        stream.close()
        store.close()
    click.echo(f"replayed {replayed}, still failing {failed} (see `optsync dlq list`)")
    if failed:
        sys.exit(1)


@cli.command()
@click.option(
    "--keep",
    is_flag=True,
    help="Keep the temporary data folder (source database, engine, stream) and print its path, "
    "to look at it afterwards with `optsync status --data-dir PATH`; without it the folder is "
    "deleted.",
)
def demo(keep: bool) -> None:
    """The AWS blog's walkthrough, scripted: 9 users in, 4 opt out, then a fifth."""
    workdir = Path(tempfile.mkdtemp(prefix="optsync-demo-"))
    settings = _sample_settings(workdir, "127.0.0.1", 0, load_settings(None, env={}))
    create_sample_database(workdir / "app.db")
    store = open_store(settings)
    app = _prepare_app(store, settings)
    segment = next(
        s for s in store.list_segments(app.id, 1000, None).items
        if s.definition.name == SAMPLE_SEGMENT
    )  # fmt: skip
    pipeline = Pipeline(settings, store)
    pipeline.start()
    results: list[tuple[str, int, int, float]] = []
    ok = True

    def wait_for(eligible: int) -> tuple[int, int, float]:
        started = time.perf_counter()
        while time.perf_counter() - started < 10:
            pipeline.check()
            estimate = store.estimate(app.id, segment.id)
            if estimate.eligible == eligible and estimate.total == 9:
                return estimate.total, estimate.eligible, time.perf_counter() - started
            time.sleep(0.001)
        estimate = store.estimate(app.id, segment.id)
        return estimate.total, estimate.eligible, time.perf_counter() - started

    try:
        total, eligible, _ = wait_for(9)
        results.append(("nine users captured (snapshot)", total, eligible, float("nan")))
        ok &= eligible == 9
        source = sqlite3.connect(workdir / "app.db")
        steps = [
            ("user1-user4 opt out", "userid IN ('user1','user2','user3','user4')", 5),
            ("user5 opts out", "userid = 'user5'", 4),
        ]
        for label, where, expected in steps:
            committed = time.perf_counter()
            with source:
                source.execute(f"UPDATE {SAMPLE_TABLE} SET optin = 0 WHERE {where}")
            total, eligible, _ = wait_for(expected)
            results.append((label, total, eligible, (time.perf_counter() - committed) * 1000))
            ok &= eligible == expected
        source.close()
    finally:
        pipeline.stop()
        store.close()
    table = Table(title=f"{SAMPLE_SEGMENT} (Country US)")
    for column in ("step", "total", "eligible", "commit → applied"):
        table.add_column(column)
    for label, total, eligible, ms in results:
        table.add_row(label, str(total), str(eligible), "-" if math.isnan(ms) else f"{ms:.1f} ms")
    console.print(table)
    console.print(" → ".join(str(r[2]) for r in results))
    if keep:
        click.echo(f"data folder: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        click.echo("demo FAILED: the eligible counts are not 9 → 5 → 4", err=True)
        sys.exit(1)


register_consent_commands(cli, _settings_for)
register_replay_command(cli, _settings_for)
register_migrate_commands(cli, _settings_for)
register_reconcile_command(cli, _settings_for)
register_keys_commands(cli, _settings_for)
register_lambda_commands(cli)


def main() -> None:
    configure_logging()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except Fatal as exc:  # needs a person; the log above holds the traceback
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
