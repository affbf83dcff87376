"""Settings: a TOML file plus ``OPTSYNC_*`` environment overrides, validated once at start.

Every error names the key and the fix; the CLI prints it in one line and exits with code 2.
A key or section that no version of optsync knows is refused the same way (a misspelt key would
otherwise fall back to a default without a word).

Environment overrides: ``OPTSYNC_DATA_DIR``, ``OPTSYNC_API_LISTEN`` (host:port),
``OPTSYNC_API_CREDENTIALS`` (KEYID:SECRET[,KEYID:SECRET]), ``OPTSYNC_CONSOLE_SECRET``,
``OPTSYNC_SOURCE_URL``, ``OPTSYNC_STREAM_URL``, ``OPTSYNC_ENGINE_URL``.

Which backends the URLs select is decided in ``optsync.backends`` (the composition root); this
module only checks that each URL has a known scheme.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from optsync.apply.mapping import MappingRule
from optsync.credentials import parse_credentials
from optsync.engine.endpoints import CountryDerivation
from optsync.engine.models import ChannelType
from optsync.engine.phone import PhonePolicy
from optsync.engine.segments import SegmentDefinition, definition_from_wire
from optsync.engine.sql import StoreSettings
from optsync.errors import ConfigError, InvalidRequest
from optsync.redaction import redact_url
from optsync.sinks.settings import (
    AuditSettings,
    EumInboundSettings,
    SinkSettings,
    parse_audit,
    parse_inbound,
    parse_sinks,
)

__all__ = (
    "ApiSettings",
    "SegmentSettings",
    "Settings",
    "SourceSettings",
    "StreamSettings",
    "load_settings",
    "parse_listen",
    "parse_mappings",
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
    console_secret: str | None = None
    """Signs console sessions; set it alike on every API server behind one address, so a
    session works against any of them [default: DATA_DIR/console-secret, made once]."""


@dataclass(frozen=True)
class SourceSettings:
    url: str
    """``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``."""
    tables: tuple[str, ...]
    """The captured tables."""
    name: str | None = None
    """Name the stream keeps this source's checkpoint under [default: the database kind]."""
    server_id: int | None = None
    """MySQL/MariaDB: the replica server id capture uses (must be unique among replicas)."""
    slot: str | None = None
    """PostgreSQL: the replication slot [default: optsync_<name>]."""
    publication: str | None = None
    """PostgreSQL: the publication [default: derived from the slot]."""

    @property
    def scheme(self) -> str:
        return self.url.split(":", 1)[0].lower()

    @property
    def redacted_url(self) -> str:
        """The URL with its password replaced, for banners, logs and error messages."""
        return redact_url(self.url)

    @property
    def source_name(self) -> str:
        if self.name:
            return self.name
        return {"mariadb": "mysql", "postgresql": "postgres"}.get(self.scheme, self.scheme)

    @property
    def sqlite_path(self) -> Path:
        if self.scheme != "sqlite":
            raise ConfigError(f"[source] url {self.url!r} is not a sqlite:/// URL")
        return _sqlite_path(self.url, "[source] url")


def _sqlite_path(url: str, key: str) -> Path:
    if ":///" not in url:
        raise ConfigError(
            f"{key} = {url!r}: write sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(url.split(":///", 1)[1])


@dataclass(frozen=True)
class SegmentSettings:
    """A ``[[segment]]`` of the config: made in the pipeline's app at start if missing."""

    name: str
    definition: SegmentDefinition
    """Pinpoint's WriteSegmentRequest (``Dimensions`` or ``SegmentGroups``), validated."""


STREAM_SCHEMES = ("embedded", "nats", "kinesis")
ENGINE_SCHEMES = ("sqlite", "postgresql", "postgres")


@dataclass(frozen=True)
class StreamSettings:
    url: str = "embedded"
    """``embedded`` (DATA_DIR/stream.db), ``nats://HOST:PORT`` (NATS JetStream) or
    ``kinesis://STREAM`` (an Amazon Kinesis data stream, e.g. the one a DMS task writes to)."""
    name: str = "optsync"
    """NATS: the JetStream stream's name (its subjects are NAME.p.N)."""
    partitions: int | None = None
    """How many partitions records are spread over [default: 8 on NATS, 1 embedded]."""
    replicas: int = 1
    """NATS: how many servers keep each message (3 on a 3-node cluster: a quorum acknowledges).
    Used when the stream is created."""
    region: str | None = None
    """Kinesis: the stream's AWS region [default: the AWS SDK's (AWS_DEFAULT_REGION, profile)]."""
    endpoint_url: str | None = None
    """Kinesis: another endpoint than AWS's (a VPC endpoint, a local Kinesis-compatible server)."""

    @property
    def kinesis_name(self) -> str:
        """Kinesis: the data stream's name (the part of ``url`` after ``kinesis://``)."""
        return self.url.split("://", 1)[-1]

    @property
    def scheme(self) -> str:
        return "embedded" if self.url == "embedded" else self.url.split(":", 1)[0].lower()

    @property
    def redacted_url(self) -> str:
        return redact_url(self.url)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("optsync-data")
    """Folder for the embedded engine, stream, DLQ and generated credentials."""
    api: ApiSettings = field(default_factory=ApiSettings)
    engine: StoreSettings = field(default_factory=StoreSettings)
    engine_url: str | None = None
    """``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` [default: sqlite in
    DATA_DIR/engine.db]. The dead-letter queue lives in the same database when it is
    PostgreSQL, else in DATA_DIR/dlq.db."""
    app: str = "optin-demo"
    """The engine app the mapping writes into; created if missing."""
    source: SourceSettings | None = None
    stream: StreamSettings = field(default_factory=StreamSettings)
    mappings: tuple[MappingRule, ...] = ()
    channels: tuple[ChannelType, ...] = ()
    """Channels enabled in the app at start (``[engine] channels``)."""
    segments: tuple[SegmentSettings, ...] = ()
    """Segments made in the app at start when missing (``[[segment]]``)."""
    serve_api: bool = True
    """Serve the API in ``optsync run`` (true when the file has an [api] table)."""
    sinks: tuple[SinkSettings, ...] = ()
    """Where every consent change is delivered (``[[sink]]``)."""
    inbound: tuple[EumInboundSettings, ...] = ()
    """Where end users' own opt-outs are read from (``[[inbound]]``)."""
    audit: AuditSettings = field(default_factory=AuditSettings)

    @property
    def engine_path(self) -> Path:
        """The SQLite engine file (``engine_url`` when it is a sqlite:/// URL)."""
        if self.engine_url is not None and self.engine_url.lower().startswith("sqlite:"):
            return _sqlite_path(self.engine_url, "[engine] url")
        return self.data_dir / "engine.db"

    @property
    def engine_scheme(self) -> str:
        """``sqlite`` or ``postgresql``."""
        if self.engine_url is None:
            return "sqlite"
        scheme = self.engine_url.split(":", 1)[0].lower()
        return "postgresql" if scheme == "postgres" else scheme

    @property
    def redacted_engine_url(self) -> str:
        return redact_url(self.engine_url) if self.engine_url else f"sqlite:///{self.engine_path}"

    @property
    def stream_path(self) -> Path:
        return self.data_dir / "stream.db"

    @property
    def dlq_path(self) -> Path:
        return self.data_dir / "dlq.db"


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
        shown = "a secret" if key == "credentials" else repr(value)
        raise ConfigError(f"{where}{key} must be a {kind.__name__}, not {shown}")
    return value


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the file (if any), apply the environment, validate everything."""
    env = os.environ if env is None else env
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a folder: give the .toml file") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _refuse_unknown(doc, _TOP_KEYS, "")
    data_dir = Path(
        env.get("OPTSYNC_DATA_DIR") or _typed(doc, "data_dir", str, "") or "optsync-data"
    )
    api = _section(doc, "api")
    _refuse_unknown(api, _API_KEYS, "[api] ")
    host, port = parse_listen(
        env.get("OPTSYNC_API_LISTEN") or _typed(api, "listen", str, "[api] ") or "127.0.0.1:8080",
        "OPTSYNC_API_LISTEN" if env.get("OPTSYNC_API_LISTEN") else "[api] listen",
    )
    credentials: dict[str, str] = {}
    if env.get("OPTSYNC_API_CREDENTIALS"):
        credentials = parse_credentials(env["OPTSYNC_API_CREDENTIALS"])
    elif _typed(api, "credentials", str, "[api] "):
        credentials = parse_credentials(api["credentials"], source="[api] credentials")
    console_secret = env.get("OPTSYNC_CONSOLE_SECRET") or _typed(
        api, "console_secret", str, "[api] "
    )
    if console_secret is not None and len(console_secret) < 16:
        raise ConfigError(
            "[api] console_secret (or OPTSYNC_CONSOLE_SECRET) is too short: use at least 16 "
            "random characters, e.g. from `openssl rand -hex 32`"
        )
    engine = _section(doc, "engine")
    _refuse_unknown(engine, _ENGINE_KEYS, "[engine] ")
    policy_text = _typed(engine, "phone_policy", str, "[engine] ") or PhonePolicy.POSSIBLE.value
    try:
        policy = PhonePolicy(policy_text)
    except ValueError:
        raise ConfigError(
            f"[engine] phone_policy = {policy_text!r}: use 'possible' or 'valid'"
        ) from None
    derive = _typed(engine, "derive_country", bool, "[engine] ")
    engine_url = _engine_url(engine, env)
    app = _typed(engine, "app", str, "[engine] ") or "optin-demo"
    channels = _channels(engine)
    segments = _segments(doc)
    source = _source(doc, env)
    stream = _stream(doc, env)
    mappings = _mappings(doc, policy)
    if source is not None:
        for rule in mappings:
            if rule.table not in source.tables:
                raise ConfigError(
                    f"[[mapping]] table = {rule.table!r} is not in [source] tables "
                    f"{list(source.tables)}: add it there or fix the name"
                )
    return Settings(
        data_dir=data_dir,
        api=ApiSettings(
            host=host, port=port, credentials=credentials, console_secret=console_secret
        ),
        engine=StoreSettings(
            country=CountryDerivation(enabled=True if derive is None else derive, policy=policy)
        ),
        engine_url=engine_url,
        app=app,
        source=source,
        stream=stream,
        mappings=mappings,
        channels=channels,
        segments=segments,
        serve_api="api" in doc,
        sinks=parse_sinks(doc, env),
        inbound=parse_inbound(doc),
        audit=parse_audit(doc),
    )


_TOP_KEYS = (
    "data_dir",
    "source",
    "stream",
    "engine",
    "api",
    "mapping",
    "segment",
    "sink",
    "inbound",
    "audit",
)
_API_KEYS = ("listen", "credentials", "console_secret")
_ENGINE_KEYS = ("url", "store", "app", "phone_policy", "derive_country", "channels")
_STREAM_KEYS = ("url", "name", "partitions", "replicas", "region", "endpoint_url")


def _refuse_unknown(table: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            what = "section" if isinstance(table[key], dict | list) and not where else "key"
            raise ConfigError(
                f"{where or 'the config file '}has unknown {what} {key!r}: fix the spelling or "
                "remove it; "
                f"known: {', '.join(known)}"
            )


def _channels(engine: Mapping[str, Any]) -> tuple[ChannelType, ...]:
    raw = engine.get("channels", [])
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ConfigError('[engine] channels must list channel types, e.g. ["SMS"]')
    channels: list[ChannelType] = []
    for name in raw:
        try:
            channel = ChannelType(name.upper())
        except ValueError:
            raise ConfigError(
                f"[engine] channels: {name!r} is no channel type; use "
                f"{', '.join(c.value for c in ChannelType)}"
            ) from None
        if channel not in channels:
            channels.append(channel)
    return tuple(channels)


_SEGMENT_KEYS = ("name", "definition", "country")


def _segments(doc: Mapping[str, Any]) -> tuple[SegmentSettings, ...]:
    raw = doc.get("segment", [])
    if not isinstance(raw, list):
        raise ConfigError(
            "[[segment]] must be an array of tables: write [[segment]], not [segment]"
        )
    segments: list[SegmentSettings] = []
    for i, item in enumerate(raw):
        where = f"[[segment]] #{i + 1} "
        if not isinstance(item, dict):
            raise ConfigError(f"{where}must be a table of keys (name, definition or country)")
        _refuse_unknown(item, _SEGMENT_KEYS, where)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f'{where}needs name = "..." (the segment\'s name in the app)')
        where = f"[[segment]] {name!r} "
        if any(s.name == name for s in segments):
            raise ConfigError(f"{where}is declared twice: give each segment its own name")
        if ("definition" in item) == ("country" in item):
            raise ConfigError(
                f'{where}needs either country = "US" or definition = {{Dimensions = ...}} '
                "(Pinpoint's segment JSON), one of the two"
            )
        if "country" in item:
            countries = item["country"]
            if isinstance(countries, str):
                countries = [countries]
            if (
                not isinstance(countries, list)
                or not countries
                or not all(isinstance(c, str) and c for c in countries)
            ):
                raise ConfigError(f'{where}country must be a country code, e.g. "US", or a list')
            wire: dict[str, Any] = {
                "Dimensions": {
                    "Location": {
                        "Country": {"DimensionType": "INCLUSIVE", "Values": list(countries)}
                    }
                }
            }
        else:
            wire = item["definition"]
            if not isinstance(wire, dict):
                raise ConfigError(
                    f"{where}definition must be a table: Pinpoint's segment JSON, e.g. "
                    '{Dimensions = {Location = {Country = {DimensionType = "INCLUSIVE", '
                    'Values = ["US"]}}}}'
                )
            if "Name" in wire:
                raise ConfigError(f"{where}definition has Name: the segment's name is name")
        try:
            definition = definition_from_wire({**wire, "Name": name}, require_name=True)
        except InvalidRequest as exc:
            raise ConfigError(f"{where}definition: {exc}") from None
        segments.append(SegmentSettings(name=name, definition=definition))
    return tuple(segments)


def _engine_url(engine: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    store = _typed(engine, "store", str, "[engine] ")
    url = env.get("OPTSYNC_ENGINE_URL") or _typed(engine, "url", str, "[engine] ")
    if store is not None and store not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"[engine] store = {store!r}: use 'sqlite' (DATA_DIR/engine.db) or set "
            '[engine] url = "postgresql://USER:PASSWORD@HOST:PORT/DB"'
        )
    if url is None:
        if store == "postgresql":
            raise ConfigError(
                '[engine] store = "postgresql" needs [engine] url = '
                '"postgresql://USER:PASSWORD@HOST:PORT/DB" (or OPTSYNC_ENGINE_URL)'
            )
        return None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ENGINE_SCHEMES:
        raise ConfigError(
            f"[engine] url = {redact_url(url)!r}: use sqlite:///DATA_DIR/engine.db or "
            "postgresql://USER:PASSWORD@HOST:PORT/DB"
        )
    if scheme == "sqlite":
        _sqlite_path(url, "[engine] url")
    else:
        _check_host_port(url, "[engine] url")
    if store is not None and (store == "sqlite") != (scheme == "sqlite"):
        raise ConfigError(
            f"[engine] store = {store!r} does not match [engine] url {redact_url(url)!r}: "
            "remove store (the url decides)"
        )
    return url


def _stream(doc: Mapping[str, Any], env: Mapping[str, str]) -> StreamSettings:
    table = _section(doc, "stream")
    _refuse_unknown(table, _STREAM_KEYS, "[stream] ")
    url = env.get("OPTSYNC_STREAM_URL") or _typed(table, "url", str, "[stream] ") or "embedded"
    name = _typed(table, "name", str, "[stream] ") or "optsync"
    partitions = table.get("partitions")
    if partitions is not None and (
        not isinstance(partitions, int)
        or isinstance(partitions, bool)
        or not 1 <= partitions <= 1024
    ):
        raise ConfigError(
            f"[stream] partitions = {partitions!r}: use a whole number from 1 to 1024"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ConfigError(
            f"[stream] name = {name!r}: use letters, digits, - and _ (a JetStream stream name)"
        )
    replicas = table.get("replicas", 1)
    if replicas not in (1, 3, 5) or isinstance(replicas, bool):
        raise ConfigError(f"[stream] replicas = {replicas!r}: use 1, 3 or 5 (JetStream replicas)")
    region = _typed(table, "region", str, "[stream] ")
    endpoint_url = _typed(table, "endpoint_url", str, "[stream] ")
    settings = StreamSettings(
        url=url,
        name=name,
        partitions=partitions,
        replicas=replicas,
        region=region,
        endpoint_url=endpoint_url,
    )
    if settings.scheme == "kinesis":
        _check_kinesis(table, settings)
    elif region is not None or endpoint_url is not None:
        raise ConfigError(
            "[stream] region and endpoint_url are for a Kinesis stream (url = "
            f'"kinesis://STREAM"), not {redact_url(url)!r}: remove them'
        )
    if settings.scheme not in STREAM_SCHEMES or (
        settings.scheme == "nats" and not url.lower().startswith("nats://")
    ):
        raise ConfigError(
            f'[stream] url = {redact_url(url)!r}: use "embedded" (DATA_DIR/stream.db), '
            "nats://HOST:PORT (NATS JetStream) or kinesis://STREAM (a Kinesis data stream)"
        )
    if settings.scheme == "nats":
        _check_host_port(url, "[stream] url")
    return settings


def _check_kinesis(table: Mapping[str, Any], settings: StreamSettings) -> None:
    """A ``kinesis://STREAM`` url: a valid stream name, and no NATS-only keys."""
    for key in ("partitions", "replicas", "name"):
        if key in table:
            raise ConfigError(
                f"[stream] {key} does not apply to a Kinesis stream (the stream's shards and "
                "their replication are set in Kinesis): remove it"
            )
    if not settings.url.lower().startswith("kinesis://") or not re.fullmatch(
        r"[A-Za-z0-9_.-]{1,128}", settings.kinesis_name
    ):
        raise ConfigError(
            f"[stream] url = {settings.url!r}: write kinesis://STREAM, where STREAM is the "
            "Kinesis data stream's name (letters, digits, _ . -)"
        )
    if settings.region is not None and not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", settings.region):
        raise ConfigError(
            f"[stream] region = {settings.region!r}: write an AWS region such as us-east-1"
        )
    if settings.endpoint_url is not None and not settings.endpoint_url.lower().startswith(
        ("http://", "https://")
    ):
        raise ConfigError(
            f"[stream] endpoint_url = {redact_url(settings.endpoint_url)!r}: write "
            "http(s)://HOST[:PORT]"
        )


def _check_host_port(url: str, key: str) -> None:
    try:
        urlsplit(url).port  # noqa: B018 - parses host and port: a bad one raises here
    except ValueError as exc:
        raise ConfigError(
            f"{key} = {redact_url(url)!r} is not a valid URL ({exc}): check the host and "
            "port, and percent-encode special characters in the user name and password"
        ) from None


_SOURCE_KEYS = {
    "url": str,
    "tables": list,
    "name": str,
    "server_id": int,
    "slot": str,
    "publication": str,
}
SOURCE_SCHEMES = ("sqlite", "mysql", "mariadb", "postgresql", "postgres")


def _source(doc: Mapping[str, Any], env: Mapping[str, str]) -> SourceSettings | None:
    table = _section(doc, "source")
    for key, value in table.items():
        kind = _SOURCE_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"[source] has unknown key {key!r}; known: {', '.join(_SOURCE_KEYS)}")
        if not isinstance(value, kind) or isinstance(value, bool):
            shown = f"a {type(value).__name__}" if key == "url" else repr(value)
            raise ConfigError(f"[source] {key} must be a {kind.__name__}, not {shown}")
    url = env.get("OPTSYNC_SOURCE_URL") or table.get("url")
    if not url:
        return None
    tables = table.get("tables")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, str) for t in tables):
        raise ConfigError('[source] tables must list the captured tables, e.g. ["optin_status"]')
    settings = SourceSettings(
        url=url,
        tables=tuple(tables),
        name=table.get("name"),
        server_id=table.get("server_id"),
        slot=table.get("slot"),
        publication=table.get("publication"),
    )
    if settings.scheme not in SOURCE_SCHEMES or (settings.scheme == "sqlite" and ":///" not in url):
        raise ConfigError(
            f"[source] url = {redact_url(url)!r}: use sqlite:///path/app.db, "
            "mysql://user:pass@host:3306/db, mariadb://..., or postgresql://user:pass@host:5432/db"
        )
    _check_host_port(url, "[source] url")
    return settings


_MAPPING_KEYS = {
    "table": str,
    "channel": str,
    "address": str,
    "user_id": str,
    "opt_in": str,
    "endpoint_id": str,
    "opt_in_true": list,
    "opt_in_false": list,
    "attributes": list,
    "user_attributes": list,
    "effective_date": str,
    "schema": str,
    "phone_policy": str,
    "default_region": str,
}


def _mappings(doc: Mapping[str, Any], policy: PhonePolicy) -> tuple[MappingRule, ...]:
    raw = doc.get("mapping", [])
    if not isinstance(raw, list):
        raise ConfigError(
            "[[mapping]] must be an array of tables: write [[mapping]], not [mapping]"
        )
    rules = []
    for i, item in enumerate(raw):
        where = f"[[mapping]] #{i + 1} "
        if not isinstance(item, dict):
            raise ConfigError(f"{where}must be a table of keys (table, address, opt_in, ...)")
        for key, value in item.items():
            kind = _MAPPING_KEYS.get(key)
            if kind is None:
                raise ConfigError(
                    f"{where}has unknown key {key!r}; known: {', '.join(_MAPPING_KEYS)}"
                )
            if not isinstance(value, kind):
                raise ConfigError(f"{where}{key} must be a {kind.__name__}, not {value!r}")
        for key in ("table", "address", "opt_in"):
            if not item.get(key):
                raise ConfigError(f"{where}needs {key} (the column or table name)")
        try:
            channel = ChannelType(str(item.get("channel", "SMS")).upper())
        except ValueError:
            raise ConfigError(
                f"{where}channel = {item.get('channel')!r}: use SMS, EMAIL, VOICE, ..."
            ) from None
        try:
            rule_policy = PhonePolicy(item.get("phone_policy", policy.value))
        except ValueError:
            raise ConfigError(f"{where}phone_policy: use 'possible' or 'valid'") from None
        extra: dict[str, Any] = {}
        for key in ("opt_in_true", "opt_in_false"):
            if key in item:
                extra[key] = frozenset(str(v).strip().lower() for v in item[key])
        rules.append(
            MappingRule(
                table=item["table"],
                channel=channel,
                address=item["address"],
                opt_in=item["opt_in"],
                user_id=item.get("user_id"),
                endpoint_id=item.get("endpoint_id"),
                attributes=tuple(str(a) for a in item.get("attributes", ())),
                user_attributes=tuple(str(a) for a in item.get("user_attributes", ())),
                effective_date=item.get("effective_date"),
                schema=item.get("schema"),
                phone_policy=rule_policy,
                default_region=item.get("default_region"),
                **extra,
            )
        )
    return tuple(rules)


def parse_mappings(
    raw: object, policy: PhonePolicy = PhonePolicy.POSSIBLE
) -> tuple[MappingRule, ...]:
    """Mapping rules from a list of ``[[mapping]]`` tables given some other way (the Lambda's
    ``OPTSYNC_MAPPING`` JSON), with the same keys and checks as the config file."""
    return _mappings({"mapping": raw}, policy)
