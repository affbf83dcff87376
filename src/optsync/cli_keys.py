"""``optsync keys create|list|revoke``: scoped API keys, kept in the engine (``engine.api_keys``).

Registered on ``optsync.cli.cli``. The keys live in the engine's database, so every ``optsync
serve`` of that engine honours a new or revoked key on its next request; nothing restarts.
A missing app or key exits 2 with one ``Error:`` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from optsync.backends import open_store, require_data
from optsync.config import Settings
from optsync.engine.api_keys import ApiKey
from optsync.engine.models import App
from optsync.engine.store import EndpointStore
from optsync.errors import ConfigError, NotFound

__all__ = ("register",)

CONFIG_HELP = "The TOML config file: the keys go into its [engine] [default: the data folder's]."
DATA_DIR_HELP = "Data folder of the engine [default: ./optsync-data, or OPTSYNC_DATA_DIR]."


def _app(store: EndpointStore, wanted: str) -> App:
    """The app with this id, else the oldest app with this name."""
    try:
        return store.get_app(wanted)
    except NotFound:
        found = store.find_app(wanted)
    if found is None:
        raise ConfigError(
            f"--app {wanted!r}: the engine has no app with that name or id; create it first "
            "(CreateApp, or the pipeline's [app] name) or pick one from GetApps"
        )
    return found


def _access(key: ApiKey) -> str:
    return "read-only" if key.read_only else "read-write"


def register(cli: click.Group, settings_for: object) -> None:
    """Add the ``keys`` group to ``cli``; ``settings_for(config, data_dir)`` reads the settings."""
    load = settings_for
    assert callable(load)

    def open_engine(config_path: Path | None, data_dir: Path | None) -> EndpointStore:
        settings: Settings = require_data(load(config_path, data_dir))
        return open_store(settings)

    @cli.group()
    def keys() -> None:
        """API keys scoped to some apps, optionally read-only, kept in the engine."""

    @keys.command("create")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
    @click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
    @click.option(
        "--app",
        "apps",
        multiple=True,
        required=True,
        help="The app the key may use, by name or id; repeat for several.",
    )
    @click.option(
        "--read-only",
        is_flag=True,
        help="The key may read but not write (GET, PhoneNumberValidate) [default: off: both].",
    )
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help='Print one JSON object {"key_id": ..., "secret": ...} [default: text].',
    )
    def keys_create(
        config_path: Path | None,
        data_dir: Path | None,
        apps: tuple[str, ...],
        read_only: bool,
        as_json: bool,
    ) -> None:
        """Create a key pair that reaches only the given apps; prints its id and secret."""
        store = open_engine(config_path, data_dir)
        try:
            found = [_app(store, wanted) for wanted in apps]
            key = store.create_api_key([a.id for a in found], read_only=read_only)
        finally:
            store.close()
        if as_json:
            click.echo(json.dumps({"key_id": key.key_id, "secret": key.secret}))
            return
        names = ", ".join(f"{a.name} ({a.id})" for a in found)
        click.echo(f"aws_access_key_id={key.key_id}")
        click.echo(f"aws_secret_access_key={key.secret}")
        click.echo(f"{_access(key)}, scoped to {names}", err=True)

    @keys.command("list")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
    @click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON object a line, without secrets [default: a table].",
    )
    def keys_list(config_path: Path | None, data_dir: Path | None, as_json: bool) -> None:
        """Every scoped key (never its secret): apps, access, created, revoked."""
        store = open_engine(config_path, data_dir)
        try:
            listed = store.list_api_keys()
        finally:
            store.close()
        if as_json:
            for key in listed:
                click.echo(
                    json.dumps(
                        {
                            "key_id": key.key_id,
                            "app_ids": list(key.app_ids),
                            "read_only": key.read_only,
                            "created_at": key.created_at,
                            "revoked_at": key.revoked_at,
                        }
                    )
                )
            return
        plural = "" if len(listed) == 1 else "s"
        table = Table(title=f"{len(listed)} scoped API key{plural}")
        table.add_column("key id", no_wrap=True)
        for column in ("apps", "access", "created", "revoked"):
            table.add_column(column, overflow="fold")  # ids whole, never cut with "…"

        for key in listed:
            table.add_row(
                key.key_id,
                ", ".join(key.app_ids),
                _access(key),
                key.created_at,
                key.revoked_at or "-",
            )
        Console().print(table)

    @keys.command("revoke")
    @click.option("--config", "config_path", type=click.Path(path_type=Path), help=CONFIG_HELP)
    @click.option("--data-dir", type=click.Path(path_type=Path), help=DATA_DIR_HELP)
    @click.argument("key_id")
    def keys_revoke(config_path: Path | None, data_dir: Path | None, key_id: str) -> None:
        """Refuse KEY_ID from now on, on every API server of this engine."""
        store = open_engine(config_path, data_dir)
        try:
            key = store.revoke_api_key(key_id)
        except NotFound as exc:
            raise ConfigError(f"KEY_ID: {exc}") from None
        finally:
            store.close()
        click.echo(f"revoked {key.key_id} at {key.revoked_at}")
