"""Settings: a TOML file plus ``OPTSYNC_*`` environment overrides, validated once at start.

Every error names the key and the fix; the CLI prints it in one line and exits with code 2.
Environment overrides: ``OPTSYNC_DATA_DIR``, ``OPTSYNC_API_LISTEN`` (host:port),
``OPTSYNC_API_CREDENTIALS`` (KEYID:SECRET[,KEYID:SECRET]).
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optsync.api.sigv4 import parse_credentials
from optsync.engine.endpoints import CountryDerivation
from optsync.engine.phone import PhonePolicy
from optsync.engine.sql import StoreSettings
from optsync.errors import ConfigError

__all__ = (
    "ApiSettings",
    "Settings",
    "load_settings",
    "load_or_create_credentials",
    "parse_listen",
)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8080
    """TCP port to listen on."""
    credentials: Mapping[str, str] = field(default_factory=dict)
    """Access key id -> secret; requests must be SigV4-signed with one of them."""


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("optsync-data")
    """Folder for the embedded engine database and generated credentials."""
    api: ApiSettings = field(default_factory=ApiSettings)
    engine: StoreSettings = field(default_factory=StoreSettings)

    @property
    def engine_path(self) -> Path:
        return self.data_dir / "engine.db"


def parse_listen(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} = {value!r}: write host:port, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def _section(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _typed(table: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = table.get(key)
    if value is not None and not isinstance(value, kind):
        raise ConfigError(f"{where}{key} must be a {kind.__name__}, not {value!r}")
    return value


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the file (if any), apply the environment, validate everything."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data_dir = Path(
        env.get("OPTSYNC_DATA_DIR") or _typed(doc, "data_dir", str, "") or "optsync-data"
    )
    api = _section(doc, "api")
    host, port = parse_listen(
        env.get("OPTSYNC_API_LISTEN") or _typed(api, "listen", str, "[api] ") or "127.0.0.1:8080",
        "OPTSYNC_API_LISTEN" if env.get("OPTSYNC_API_LISTEN") else "[api] listen",
    )
    credentials: dict[str, str] = {}
    if env.get("OPTSYNC_API_CREDENTIALS"):
        credentials = parse_credentials(env["OPTSYNC_API_CREDENTIALS"])
    elif _typed(api, "credentials", str, "[api] "):
        credentials = parse_credentials(api["credentials"], source="[api] credentials")
    engine = _section(doc, "engine")
    policy_text = _typed(engine, "phone_policy", str, "[engine] ") or PhonePolicy.POSSIBLE.value
    try:
        policy = PhonePolicy(policy_text)
    except ValueError:
        raise ConfigError(
            f"[engine] phone_policy = {policy_text!r}: use 'possible' or 'valid'"
        ) from None
    derive = _typed(engine, "derive_country", bool, "[engine] ")
    store = _typed(engine, "store", str, "[engine] ") or "sqlite"
    if store != "sqlite":
        raise ConfigError(f"[engine] store = {store!r}: this version has the 'sqlite' store only")
    return Settings(
        data_dir=data_dir,
        api=ApiSettings(host=host, port=port, credentials=credentials),
        engine=StoreSettings(
            country=CountryDerivation(enabled=True if derive is None else derive, policy=policy)
        ),
    )


def load_or_create_credentials(data_dir: Path) -> tuple[dict[str, str], bool]:
    """Key pairs from ``DATA_DIR/credentials``, generating one pair the first time.

    Returns the pairs and whether they were just created.
    """
    path = data_dir / "credentials"
    if path.exists():
        return parse_credentials(path.read_text().strip(), source=str(path)), False
    data_dir.mkdir(parents=True, exist_ok=True)
    key_id = "OPTSYNC" + secrets.token_hex(6).upper()
    secret = secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{key_id}:{secret}\n")
    return {key_id: secret}, True
