"""``[[sink]]``, ``[[inbound]]`` and ``[audit]`` of the config file, checked and typed.

Pure parsing: nothing here opens a connection (``optsync.backends`` does, from these).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optsync.engine.models import ChannelType
from optsync.errors import ConfigError

__all__ = (
    "AuditSettings",
    "EumInboundSettings",
    "EumSinkSettings",
    "PinpointApiSinkSettings",
    "SinkSettings",
    "WebhookSinkSettings",
    "parse_audit",
    "parse_duration",
    "parse_inbound",
    "parse_sinks",
)

SINK_TYPES = ("eum-sms", "webhook", "pinpoint-api")
_COMMON_KEYS = ("name", "type", "channels")
_EUM_KEYS = (*_COMMON_KEYS, "opt_out_list", "region", "endpoint_url", "mirror_opt_in")
_WEBHOOK_KEYS = (*_COMMON_KEYS, "url", "secret", "secret_env", "timeout")
_PINPOINT_KEYS = (
    *_COMMON_KEYS,
    "url",
    "app",
    "region",
    "access_key_id",
    "secret_access_key",
    "secret_access_key_env",
)
_INBOUND_KEYS = ("name", "type", "opt_out_list", "region", "endpoint_url", "interval", "writeback")
_AUDIT_KEYS = ("deadline",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LIST_NAME = re.compile(r"^([A-Za-z0-9_-]{1,64}|arn:[^\s]+:opt-out-list/[A-Za-z0-9_-]{1,64})$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


@dataclass(frozen=True)
class SinkSettings:
    name: str
    channels: frozenset[ChannelType] | None
    """The channels whose changes the sink takes (None: every channel)."""


@dataclass(frozen=True)
class EumSinkSettings(SinkSettings):
    opt_out_list: str
    region: str | None
    endpoint_url: str | None
    mirror_opt_in: bool


@dataclass(frozen=True)
class WebhookSinkSettings(SinkSettings):
    url: str
    secret: str
    timeout: float


@dataclass(frozen=True)
class PinpointApiSinkSettings(SinkSettings):
    url: str
    app: str
    """The app on the other side: its id, or a name (created there if missing)."""
    region: str
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class EumInboundSettings:
    name: str
    opt_out_list: str
    region: str | None
    endpoint_url: str | None
    interval: float
    writeback: str | None
    """SQL run on the source for each end-user opt-out, ``:address`` bound to the number."""


@dataclass(frozen=True)
class AuditSettings:
    deadline: float = 24 * 3600.0
    """Seconds an opt-out may take to reach every sink before it counts as overdue."""


def parse_duration(value: object, key: str) -> float:
    """``"24h"``, ``"90s"``, ``"500ms"``, ``"2d"`` or a number of seconds, as seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f'{key} = {value!r}: write a duration such as "24h", "90s" or "2d"')
    return float(match.group(1)) * _UNITS[match.group(2)]


def _refuse(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(
                f"{where}has unknown key {key!r}: fix the spelling or remove it; "
                f"known: {', '.join(known)}"
            )


def _str(table: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise ConfigError(f'{where}needs {key} = "..."')
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}{key} must be a non-empty string")
    return value


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key} must be true or false")
    return value


def _channels(
    table: Mapping[str, Any], where: str, default: frozenset[ChannelType] | None
) -> frozenset[ChannelType] | None:
    raw = table.get("channels")
    if raw is None:
        return default
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
        raise ConfigError(f'{where}channels must list channel types, e.g. ["SMS", "VOICE"]')
    try:
        return frozenset(ChannelType(c.upper()) for c in raw)
    except ValueError:
        raise ConfigError(
            f"{where}channels: use channel types among {', '.join(c.value for c in ChannelType)}"
        ) from None


def _secret(
    table: Mapping[str, Any], key: str, env_key: str, where: str, env: Mapping[str, str]
) -> str:
    inline = _str(table, key, where)
    env_name = _str(table, env_key, where)
    if (inline is None) == (env_name is None):
        raise ConfigError(
            f'{where}needs {env_key} = "NAME" (an environment variable holding the secret) '
            f'or {key} = "...", one of the two'
        )
    if env_name is not None:
        value = env.get(env_name)
        if not value:
            raise ConfigError(
                f"{where}{env_key} = {env_name!r}, but that environment variable is not set: "
                "export it before starting optsync"
            )
        return value
    assert inline is not None
    return inline


def _check_url(url: str, where: str, key: str = "url") -> str:
    if not re.match(r"^https?://[^\s/]+", url):
        raise ConfigError(f"{where}{key} = {url!r}: write an http:// or https:// URL")
    return url.rstrip("/")


def _list_name(table: Mapping[str, Any], where: str) -> str:
    name = _str(table, "opt_out_list", where) or "Default"
    if not _LIST_NAME.match(name):
        raise ConfigError(
            f"{where}opt_out_list = {name!r}: give the list's name (letters, digits, _ and -, "
            "up to 64) or its ARN"
        )
    return name


def _named(item: object, i: int, section: str, names: set[str]) -> tuple[Mapping[str, Any], str]:
    where = f"[[{section}]] #{i + 1} "
    if not isinstance(item, dict):
        raise ConfigError(f"{where}must be a table of keys")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f'{where}needs name = "..." (letters, digits, _ . -; up to 64): it names the '
            "cursor, the metrics and the console page"
        )
    if name in names:
        raise ConfigError(f"[[{section}]] {name!r} is declared twice: give each its own name")
    names.add(name)
    return item, f"[[{section}]] {name!r} "


def parse_sinks(doc: Mapping[str, Any], env: Mapping[str, str]) -> tuple[SinkSettings, ...]:
    raw = doc.get("sink", [])
    if not isinstance(raw, list):
        raise ConfigError("[[sink]] must be an array of tables: write [[sink]], not [sink]")
    sinks: list[SinkSettings] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        table, where = _named(item, i, "sink", names)
        kind = table.get("type")
        name = table["name"]
        if kind == "eum-sms":
            _refuse(table, _EUM_KEYS, where)
            sinks.append(
                EumSinkSettings(
                    name=name,
                    channels=_channels(
                        table, where, frozenset({ChannelType.SMS, ChannelType.VOICE})
                    ),
                    opt_out_list=_list_name(table, where),
                    region=_str(table, "region", where),
                    endpoint_url=_optional_url(table, where),
                    mirror_opt_in=_bool(table, "mirror_opt_in", where),
                )
            )
        elif kind == "webhook":
            _refuse(table, _WEBHOOK_KEYS, where)
            url = _str(table, "url", where, required=True)
            assert url is not None
            timeout = parse_duration(table.get("timeout", 10), f"{where}timeout")
            sinks.append(
                WebhookSinkSettings(
                    name=name,
                    channels=_channels(table, where, None),
                    url=_check_url(url, where),
                    secret=_secret(table, "secret", "secret_env", where, env),
                    timeout=timeout,
                )
            )
        elif kind == "pinpoint-api":
            _refuse(table, _PINPOINT_KEYS, where)
            url = _str(table, "url", where, required=True)
            app = _str(table, "app", where, required=True)
            key_id = _str(table, "access_key_id", where, required=True)
            assert url is not None and app is not None and key_id is not None
            sinks.append(
                PinpointApiSinkSettings(
                    name=name,
                    channels=_channels(table, where, None),
                    url=_check_url(url, where),
                    app=app,
                    region=_str(table, "region", where) or "us-east-1",
                    access_key_id=key_id,
                    secret_access_key=_secret(
                        table, "secret_access_key", "secret_access_key_env", where, env
                    ),
                )
            )
        else:
            raise ConfigError(f"{where}type = {kind!r}: use one of {', '.join(SINK_TYPES)}")
    return tuple(sinks)


def _optional_url(table: Mapping[str, Any], where: str) -> str | None:
    url = _str(table, "endpoint_url", where)
    return _check_url(url, where, "endpoint_url") if url is not None else None


def parse_inbound(doc: Mapping[str, Any]) -> tuple[EumInboundSettings, ...]:
    raw = doc.get("inbound", [])
    if not isinstance(raw, list):
        raise ConfigError("[[inbound]] must be an array of tables: write [[inbound]]")
    inbound: list[EumInboundSettings] = []
    names: set[str] = set()
    for i, given in enumerate(raw):
        item = given
        if isinstance(given, dict) and "name" not in given:
            item = {**given, "name": f"{given.get('type', 'inbound')}-{i + 1}"}
        table, where = _named(item, i, "inbound", names)
        if table.get("type") != "eum-sms":
            raise ConfigError(f"{where}type = {table.get('type')!r}: use 'eum-sms'")
        _refuse(table, _INBOUND_KEYS, where)
        writeback = _str(table, "writeback", where)
        if writeback is not None and ":address" not in writeback:
            raise ConfigError(
                f"{where}writeback must use :address for the phone number, e.g. "
                '"UPDATE optin_status SET optin = 0 WHERE phone = :address"'
            )
        inbound.append(
            EumInboundSettings(
                name=table["name"],
                opt_out_list=_list_name(table, where),
                region=_str(table, "region", where),
                endpoint_url=_optional_url(table, where),
                interval=parse_duration(table.get("interval", 60), f"{where}interval"),
                writeback=writeback,
            )
        )
    if sum(1 for i in inbound if i.writeback) > 1:
        raise ConfigError(
            "[[inbound]]: writeback is set in more than one entry; set it in one (it runs for "
            "every end-user opt-out of the app, whichever way it came)"
        )
    return tuple(inbound)


def parse_audit(doc: Mapping[str, Any]) -> AuditSettings:
    table = doc.get("audit", {})
    if not isinstance(table, dict):
        raise ConfigError("[audit] must be a table")
    _refuse(table, _AUDIT_KEYS, "[audit] ")
    return AuditSettings(deadline=parse_duration(table.get("deadline", "24h"), "[audit] deadline"))
