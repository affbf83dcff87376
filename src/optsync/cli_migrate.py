"""``optsync import-pinpoint`` and ``optsync export``: Pinpoint endpoint files in and out.

Registered on ``optsync.cli.cli``; the work is in ``optsync.migrate`` (see docs/migrate.md).
Rejected lines, a missing app or segment, and unreadable locations exit 2 with one ``Error:``
line; the summary goes to stdout.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from optsync.backends import open_store
from optsync.config import Settings
from optsync.errors import ConfigError, EngineError
from optsync.migrate.exporter import (
    DEFAULT_PART_SIZE,
    ExportFormat,
    export_endpoints,
    find_segment,
)
from optsync.migrate.importer import ImportSummary, import_parsed, parse_files
from optsync.migrate.locations import InputFile, Output, staged_inputs
from optsync.migrate.overlapped import ImportRejected, import_files

__all__ = ("register",)

console = Console(stderr=True)

S3_HELP = (
    "S3 endpoint URL for s3:// locations (MinIO, a local S3-compatible server); boto3 also "
    "reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL [default: AWS's endpoint]."
)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )


def register(cli: click.Group, settings_for: object) -> None:
    """Add ``import-pinpoint`` and ``export`` to ``cli``; ``settings_for(config, data_dir)``
    reads the settings."""
    load = settings_for
    assert callable(load)

    @cli.command("import-pinpoint")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        required=True,
        help="The TOML config file: its [engine] receives the endpoints.",
    )
    @click.option("--app", "app_name", required=True, help="The app (created if missing).")
    @click.option(
        "--segment",
        default=None,
        help="Also define a static (IMPORT) segment of the imported endpoints, as Pinpoint's "
        "DefineSegment did [default: none].",
    )
    @click.option(
        "--dry-run",
        is_flag=True,
        help="Check every line and say what would happen; write nothing [default: off].",
    )
    @click.option(
        "--continue-on-error",
        is_flag=True,
        help="Import the good lines even if some are rejected (they are listed) "
        "[default: off: any rejected line and nothing is written].",
    )
    @click.option("--s3-endpoint-url", default=None, help=S3_HELP)
    @click.argument("locations", nargs=-1, required=True)
    def import_pinpoint(
        config_path: Path,
        app_name: str,
        segment: str | None,
        dry_run: bool,
        continue_on_error: bool,
        s3_endpoint_url: str | None,
        locations: tuple[str, ...],
    ) -> None:
        """Load Pinpoint endpoint exports (gzip NDJSON) and import files (CSV, JSON lines).

        LOCATIONS are files, folders or s3://bucket/prefix.
        """
        settings: Settings = load(config_path, None)
        started = time.monotonic()
        with staged_inputs(locations, s3_endpoint_url) as files:
            if dry_run:
                summary, lines = _dry_run(settings, app_name, files, locations, segment)
            else:
                summary, lines = _import(
                    settings, app_name, files, locations, segment, continue_on_error
                )
        seconds = time.monotonic() - started
        for line in summary.lines_out():
            click.echo(line)
        rate = lines / seconds if seconds > 0 else 0.0
        click.echo(f"{len(files)} files, {seconds:.1f} s, {rate:.0f} endpoints/s")

    def _dry_run(
        settings: Settings,
        app_name: str,
        files: list[InputFile],
        locations: tuple[str, ...],
        segment: str | None,
    ) -> tuple[ImportSummary, int]:
        """Check every line, then say what would be written (nothing is)."""
        with _progress() as progress:
            task = progress.add_task("check", total=None)
            parsed = parse_files(files, lambda n: progress.advance(task, n))
        store = open_store(settings)
        try:
            summary = import_parsed(
                store, app_name, parsed, source=" ".join(locations), segment=segment, dry_run=True
            )
        finally:
            store.close()
        return summary, len(parsed.patches)

    def _import(
        settings: Settings,
        app_name: str,
        files: list[InputFile],
        locations: tuple[str, ...],
        segment: str | None,
        continue_on_error: bool,
    ) -> tuple[ImportSummary, int]:
        """Check and write at once (``import_files``): one transaction, rolled back when a
        line is rejected (unless --continue-on-error)."""
        store = open_store(settings)
        try:
            with _progress() as progress:
                checked = progress.add_task("check", total=None)
                written = progress.add_task("import", total=None)
                summary = import_files(
                    store,
                    app_name,
                    files,
                    source=" ".join(locations),
                    segment=segment,
                    continue_on_error=continue_on_error,
                    on_checked=lambda n: progress.advance(checked, n),
                    on_written=lambda n: progress.advance(written, n),
                )
        except ImportRejected as exc:
            for reject in exc.rejected[:20]:
                click.echo(str(reject))
            if len(exc.rejected) > 20:
                click.echo(f"... and {len(exc.rejected) - 20} more rejected lines")
            raise ConfigError(
                f"import-pinpoint: {len(exc.rejected)} of {exc.lines} lines rejected (listed "
                "above); nothing was written. Fix them, or pass --continue-on-error to import "
                "the rest"
            ) from None
        except EngineError as exc:
            raise ConfigError(f"import-pinpoint: nothing was written: {exc}") from exc
        finally:
            store.close()
        return summary, summary.lines - len(summary.rejected)

    @cli.command("export")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        required=True,
        help="The TOML config file: its [engine] holds the endpoints.",
    )
    @click.option("--app", "app_name", required=True, help="The app to export (must exist).")
    @click.option(
        "--segment",
        default=None,
        help="Only this segment's endpoints (by name) [default: the whole app].",
    )
    @click.option(
        "--eligible-only",
        is_flag=True,
        help="Only endpoints a message may be sent to: ACTIVE and OptOut NONE [default: off].",
    )
    @click.option(
        "--format",
        "fmt",
        type=click.Choice([f.value for f in ExportFormat]),
        default=ExportFormat.PINPOINT_NDJSON.value,
        help="pinpoint-ndjson: gzip EndpointResponse lines as Pinpoint's export; csv: Pinpoint's "
        "import CSV [default: pinpoint-ndjson].",
    )
    @click.option(
        "--part-size",
        type=int,
        default=DEFAULT_PART_SIZE,
        help=f"Endpoints per file [default: {DEFAULT_PART_SIZE}].",
    )
    @click.option("--s3-endpoint-url", default=None, help=S3_HELP)
    @click.argument("location")
    def export_command(
        config_path: Path,
        app_name: str,
        segment: str | None,
        eligible_only: bool,
        fmt: str,
        part_size: int,
        s3_endpoint_url: str | None,
        location: str,
    ) -> None:
        """Write an app's or a segment's endpoints to a folder or s3://bucket/prefix."""
        settings: Settings = load(config_path, None)
        store = open_store(settings)
        try:
            app = store.find_app(app_name)
            if app is None:
                raise ConfigError(f"export: there is no app named {app_name!r}")
            found = find_segment(store, app, segment) if segment else None
            if found is not None:
                estimate = store.estimate(app.id, found.id)
                total = estimate.eligible if eligible_only else estimate.total
            else:
                total = store.count_endpoints(app.id)
            output = Output(location, s3_endpoint_url)
            with _progress() as progress:
                task = progress.add_task("export", total=total)
                summary = export_endpoints(
                    store,
                    app,
                    output,
                    segment=found,
                    eligible_only=eligible_only,
                    fmt=ExportFormat(fmt),
                    part_size=part_size,
                    on_progress=lambda n: progress.advance(task, n),
                )
        finally:
            store.close()
        click.echo(summary.line())
