"""The ``optsync`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import uvicorn

from optsync.api.app import PinpointApi
from optsync.api.sigv4 import SignatureVerifier
from optsync.config import LOOPBACK_HOSTS, load_or_create_credentials, load_settings
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import ConfigError
from optsync.logs import configure_logging

__all__ = ("main",)

logger = logging.getLogger("optsync")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="optsync")
def cli() -> None:
    """Keep messaging opt-in/opt-out state in sync with the database that owns it."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML file.")
@click.option("--host", help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=click.IntRange(1, 65535), help="Port [default: 8080].")
@click.option("--data-dir", type=click.Path(path_type=Path), help="[default: ./optsync-data]")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Accept unsigned requests (only allowed when listening on loopback).",
)
def serve(
    config_path: Path | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    insecure_no_auth: bool,
) -> None:
    """Serve the engine through Pinpoint's REST API (boto3 works with endpoint_url)."""
    settings = load_settings(config_path)
    host = host or settings.api.host
    port = port or settings.api.port
    data_dir = data_dir or settings.data_dir
    verifier = None
    if insecure_no_auth:
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"--insecure-no-auth is refused on {host}: listen on 127.0.0.1, or configure "
                "OPTSYNC_API_CREDENTIALS"
            )
        logger.warning("authentication is OFF (--insecure-no-auth): any local process may write")
    else:
        credentials = dict(settings.api.credentials)
        if not credentials:
            credentials, created = load_or_create_credentials(data_dir)
            where = data_dir / "credentials"
            click.echo(f"API credentials ({'created in' if created else 'from'} {where}):")
            for key_id, secret in credentials.items():
                click.echo(f"  aws_access_key_id={key_id}\n  aws_secret_access_key={secret}")
        verifier = SignatureVerifier(credentials)
    store = SQLiteStore(data_dir / "engine.db", settings.engine)
    click.echo(f"Pinpoint API on http://{host}:{port}  (region: any; service: mobiletargeting)")
    try:
        uvicorn.run(
            PinpointApi(store, verifier),
            host=host,
            port=port,
            access_log=False,
            log_config=None,
            lifespan="off",
        )
    finally:
        store.close()


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
