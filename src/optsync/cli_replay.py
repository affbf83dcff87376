"""The ``optsync replay`` command: recorded DMS, Debezium or Kinesis-event files into the stream.

Registered on ``optsync.cli.cli``; the records it appends are applied by ``optsync run`` or
``optsync apply`` like captured ones (see ``optsync.replay``).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from optsync.backends import open_dlq, open_stream
from optsync.config import Settings
from optsync.errors import ConfigError
from optsync.replay import InputFormat, count_records, input_files, replay

__all__ = ("register",)

console = Console(stderr=True)
FORMATS = ", ".join(f.value for f in InputFormat)


def _format(text: str) -> InputFormat:
    try:
        return InputFormat(text)
    except ValueError:
        raise ConfigError(f"replay: --format {text!r} is not one of {FORMATS}") from None


def register(cli: click.Group, settings_for: object) -> None:
    """Add ``replay`` to ``cli``; ``settings_for(config, data_dir)`` reads the settings."""
    load = settings_for
    assert callable(load)

    @cli.command("replay")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        required=True,
        help="The TOML config file: its [stream] (in its data_dir) receives the records.",
    )
    @click.option(
        "--format",
        "fmt",
        default="dms",
        help=f"How the files are written: {FORMATS} [default: dms].",
    )
    @click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
    def replay_command(config_path: Path, fmt: str, paths: tuple[Path, ...]) -> None:
        """Append recorded change records (NDJSON, .gz, folders) to the pipeline's stream."""
        input_format = _format(fmt)
        files = input_files(paths)
        settings: Settings = load(config_path, None)
        total = count_records(files, input_format)
        stream = open_stream(settings)
        dlq = open_dlq(settings)
        started = time.monotonic()
        try:
            progress = Progress(
                TextColumn("replay {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=False,
            )
            with progress:
                task = progress.add_task(input_format.value, total=total)
                summary = replay(
                    files,
                    input_format,
                    stream,
                    dlq,
                    on_progress=lambda n: progress.advance(task, n),
                )
        finally:
            dlq.close()
            stream.close()
        seconds = time.monotonic() - started
        rate = summary.appended / seconds if seconds > 0 else 0.0
        click.echo(f"{summary.line()} ({len(files)} files, {seconds:.1f} s, {rate:.0f} records/s)")
