"""The ``optsync reconcile`` command: the engine checked against the source, and repaired.

Registered on ``optsync.cli.cli``; the work is in ``optsync.reconcile`` (see docs/reconcile.md).
Exit status: 0 when the engine matches the source (or ``--repair`` wrote every difference), 1
when drift remains, 2 for bad usage or configuration. Addresses and endpoint ids (which often
hold a phone number) are masked in every line printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from optsync.apply.mapping import Mapper
from optsync.backends import mapping_rules, open_store, require_data
from optsync.config import Settings
from optsync.errors import ConfigError, Fatal, Retryable
from optsync.reconcile import Drift, Report, open_reader, reconcile, repair
from optsync.reconcile.compare import Held
from optsync.redaction import mask_address, mask_text

__all__ = ("register",)

console = Console(stderr=True)
DEFAULT_CHUNK = 1000


def _progress() -> Progress:
    return Progress(
        TextColumn("reconcile {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=False,
    )


def summary(report: Report) -> str:
    """The one-line summary of a reconciliation."""
    counts = report.counts()
    kinds = ", ".join(f"{kind.value} {n}" for kind, n in sorted(counts.items()))
    drift = f"{len(report.drifts)} drifting ({kinds})" if report.drifts else "0 drifting"
    extra = [f"{report.changing} changing during the run", f"{report.unmappable} unmappable rows"]
    if report.held_by_end_user:
        extra.append(f"{report.held_by_end_user} opted out by the end user (not drift)")
    if report.duplicates:
        extra.append(f"{report.duplicates} rows sharing an endpoint id")
    return (
        f"reconcile: {report.rows} source rows, {report.endpoints} engine endpoints: {drift}; "
        + ", ".join(extra)
    )


def _side(held: Held | None) -> str:
    if held is None:
        return "absent"
    status = "ACTIVE" if held.active else "INACTIVE"
    user = f" user {mask_text(held.user_id)}" if held.user_id else ""
    return f"{mask_address(held.address)} OptOut {held.opt_out.value} {status}{user}"


def detail(drift: Drift) -> str:
    """One drifting endpoint, masked: its id, what differs, the engine's and the source's side."""
    kinds = ",".join(kind.value for kind in drift.kinds)
    if drift.expected is None:
        source = "no row"
    else:
        patch = drift.expected.patch
        optout = patch.opt_out.value if patch.opt_out else "-"
        user = f" user {mask_text(patch.user_id)}" if patch.user_id else ""
        source = f"{mask_address(patch.address)} OptOut {optout}{user}"
    return (
        f"  {kinds:<10} endpoint {mask_text(drift.endpoint_id)}: engine {_side(drift.held)}; "
        f"source {source}"
    )


def register(cli: click.Group, settings_for: object) -> None:
    """Add ``reconcile`` to ``cli``; ``settings_for(config, data_dir)`` reads the settings."""
    load = settings_for
    assert callable(load)

    @cli.command("reconcile")
    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        required=True,
        help="The TOML config file: its [source], [[mapping]] rules and [engine] app are compared.",
    )
    @click.option(
        "--repair",
        "repair_flag",
        is_flag=True,
        help="Write the source's truth for every difference through the position guard, and "
        "say what was written [default: off: only report].",
    )
    @click.option(
        "--verbose",
        "-v",
        is_flag=True,
        help="List every drifting endpoint, addresses masked [default: the summary only].",
    )
    @click.option(
        "--chunk",
        type=click.IntRange(min=1),
        default=DEFAULT_CHUNK,
        help=f"Rows and endpoints read per query [default: {DEFAULT_CHUNK}].",
    )
    def reconcile_command(config_path: Path, repair_flag: bool, verbose: bool, chunk: int) -> None:
        """Compare the source's rows with the engine's endpoints; exit 1 on drift."""
        settings: Settings = require_data(load(config_path, None))
        if not settings.mappings:
            raise ConfigError(
                f"{config_path}: no [[mapping]] rule: reconcile compares what the rules make of "
                "the source's rows, so add the rules the pipeline runs with"
            )
        mapper = Mapper(mapping_rules(settings.mappings))
        try:
            _run(settings, mapper, chunk=chunk, verbose=verbose, repair_flag=repair_flag)
        except Retryable as exc:  # a server down or busy: a later run may succeed
            raise Fatal(f"reconcile stopped: {exc}") from exc


def _run(
    settings: Settings, mapper: Mapper, *, chunk: int, verbose: bool, repair_flag: bool
) -> None:
    """Reconcile (and repair), print, exit 1 on drift left; the source and store are closed."""
    reader = open_reader(settings)
    try:
        store = open_store(settings)
    except BaseException:
        reader.close()
        raise
    try:
        app = store.find_app(settings.app)
        if app is None:
            raise ConfigError(
                f"[engine] app {settings.app!r} does not exist in the engine: check the "
                "config, or run the pipeline first (it creates the app)"
            )
        progress = _progress()
        tasks: dict[str, TaskID] = {}

        def report_progress(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = progress.add_task(what, total=total)
            progress.update(tasks[what], completed=done, total=total)

        with progress:
            report = reconcile(store, app.id, reader, mapper, chunk=chunk, progress=report_progress)
        click.echo(summary(report))
        if verbose:
            for drift in report.drifts:
                click.echo(detail(drift))
        if not report.drifts:
            return
        if not repair_flag:
            click.echo("drift found: run with --repair to write the source's truth")
            sys.exit(1)
        result = repair(store, app.id, report)
        click.echo(
            f"repaired: {result.written} writes applied, {result.stale} skipped by the "
            f"position guard, {result.missing} deletes of endpoints already gone "
            f"(position {report.position})"
        )
        if result.stale:
            click.echo(
                "some writes were older than what the engine holds: a change arrived "
                "meanwhile, or the source's log was reset; run reconcile again"
            )
            sys.exit(1)
    finally:
        store.close()
        reader.close()
