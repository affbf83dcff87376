"""The consent commands of the CLI: ``optsync audit`` and ``optsync sinks list|replay``.

Registered on ``optsync.cli.cli``; they read the engine (any process can: sinks keep their state
there), so they work while ``optsync run`` or ``optsync apply`` delivers.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from optsync.audit import audit_records, format_duration, write_csv, write_ndjson
from optsync.backends import open_store, require_data
from optsync.config import Settings
from optsync.errors import ConfigError

__all__ = ("register",)

console = Console(stderr=True)


def _since(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--since {text!r} is not a date: write e.g. 2026-12-01 or 2026-12-01T10:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sink_names(settings: Settings, named: tuple[str, ...]) -> list[str]:
    names = [s.name for s in settings.sinks]
    for name in named:
        if name not in names:
            raise ConfigError(
                f"no [[sink]] named {name!r} in the config: use one of {', '.join(names) or '-'}"
            )
    return list(named) or names


def register(cli: click.Group, settings_for: object) -> None:
    """Add the commands to ``cli``; ``settings_for(config, data_dir)`` reads the settings."""
    load = settings_for
    assert callable(load)

    @cli.command()
    @click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
                  help="The TOML config file (its [[sink]] and [audit] sections).")  # fmt: skip
    @click.option("--since", help="Only changes from this date or time on (UTC).")
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(["csv", "ndjson"]),
        default="csv",
        help="csv (a header row) or ndjson (one JSON object a line) [default: csv].",
    )
    @click.option("--output", "-o", type=click.Path(path_type=Path), help="File [default: stdout].")
    @click.option("--reveal", is_flag=True, help="Write addresses whole (they are masked).")
    def audit(
        config_path: Path, since: str | None, fmt: str, output: Path | None, reveal: bool
    ) -> None:
        """Every consent change with its cause and the time it reached each sink."""
        settings: Settings = require_data(load(config_path, None))
        sinks = [s.name for s in settings.sinks]
        store = open_store(settings)
        out = output.open("w", newline="", encoding="utf-8") if output else sys.stdout
        try:
            records = audit_records(
                store.audit(sinks, _since(since)),
                sinks,
                settings.audit.deadline,
                time.time(),
                reveal=reveal,
            )
            count = (write_csv if fmt == "csv" else write_ndjson)(records, out)
        finally:
            if output:
                out.close()
            store.close()
        console.print(
            f"{count} consent changes; deadline {format_duration(settings.audit.deadline)}; "
            f"sinks: {', '.join(sinks) or 'none configured'}"
        )

    @cli.group()
    def sinks() -> None:
        """Where consent changes are delivered: state, dead letters, replay."""

    @sinks.command("list")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
                  help="The TOML config file (its [[sink]] sections).")  # fmt: skip
    def sinks_list(config_path: Path) -> None:
        """Each sink's cursor, lag, dead letters and waiting changes."""
        from optsync.status import sink_statuses  # noqa: PLC0415

        settings: Settings = require_data(load(config_path, None))
        store = open_store(settings)
        try:
            statuses, overdue = sink_statuses(settings, store)
            letters = {s.name: store.sink_dead_letters(s.name, 20) for s in settings.sinks}
        finally:
            store.close()
        table = Table(title="sinks")
        for column in ("sink", "type", "behind", "lag s", "dead letters", "waiting", "holder"):
            table.add_column(column)
        for s in statuses:
            table.add_row(
                s.name, s.kind, str(s.behind), f"{s.lag_seconds:.3f}", str(s.dead_letters),
                str(s.waiting), s.holder or "-",
            )  # fmt: skip
        Console().print(table)
        for name, entries in letters.items():
            for e in entries:
                Console().print(f"  {name} dead letter seq {e.seq} ({e.at}): {e.reason}")
        Console().print(
            f"opt-outs overdue: {overdue} (deadline {format_duration(settings.audit.deadline)})"
        )

    @sinks.command("replay")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
                  help="The TOML config file (its [[sink]] sections).")  # fmt: skip
    @click.argument("sink")
    @click.argument("seqs", nargs=-1, type=int)
    def sinks_replay(config_path: Path, sink: str, seqs: tuple[int, ...]) -> None:
        """Send a sink's dead letters (all, or the given seqs) again at its next step."""
        settings: Settings = require_data(load(config_path, None))
        _sink_names(settings, (sink,))
        store = open_store(settings)
        try:
            count = store.retry_sink_dead_letters(sink, list(seqs) or None)
        finally:
            store.close()
        click.echo(f"{count} dead letter(s) of sink {sink!r} will be delivered again")
