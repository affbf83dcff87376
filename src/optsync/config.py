"""Settings: a TOML file plus ``OPTSYNC_*`` environment overrides, validated once at start.

Every error names the key and the fix; the CLI prints it in one line and exits with code 2.
A key or section that no version of optsync knows is refused the same way (a misspelt key would
otherwise fall back to a default without a word): the file is decoded into msgspec Structs with
``forbid_unknown_fields``, and msgspec's errors are translated here into the key's own name
(``[stream] has unknown key 'partition'``, ``[[mapping]] #2 needs opt_in``).

Defaults live in one place: the field defaults of the settings Structs below. ``[source]``,
``[stream]`` and ``[[mapping]]`` are decoded straight into theirs; the tables written otherwise
than they are kept (``[api] listen`` is host and port, ``[engine]`` is spread over ``Settings``)
leave a key ``None`` when it is not given, and only given keys reach the settings Structs.

Environment overrides: ``OPTSYNC_DATA_DIR``, ``OPTSYNC_API_LISTEN`` (host:port),
``OPTSYNC_API_CREDENTIALS`` (KEYID:SECRET[,KEYID:SECRET]), ``OPTSYNC_CONSOLE_SECRET``,
``OPTSYNC_SOURCE_URL``, ``OPTSYNC_STREAM_URL``, ``OPTSYNC_ENGINE_URL``.

What this module may import (issue 16): only leaf modules (``errors``, ``redaction``,
``credentials``, the ``ChannelType`` enum of ``engine.models``, and ``sinks.settings``, pure
parsing of the same kind). Settings hold config's own plain values: a mapping rule's columns, a
segment's Pinpoint JSON, the phone policy's name. The engine's and apply's objects built from
them (``StoreSettings``, ``MappingRule``, ``SegmentDefinition``) are made in
``optsync.backends`` (the composition root), and ``backends.check_settings`` makes them all once
so that a rule or a segment definition their own modules refuse is still a one-line
``ConfigError`` naming the key at start: the CLI runs it right after ``load_settings``. Which
backends the URLs select is decided there too; this module only checks that each URL has a
known scheme.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from optsync.credentials import parse_credentials
from optsync.engine.models import ChannelType
from optsync.errors import ConfigError
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
    "PHONE_POLICIES",
    "ApiSettings",
    "EngineSettings",
    "MappingSettings",
    "SegmentSettings",
    "Settings",
    "SourceSettings",
    "StreamSettings",
    "load_settings",
    "parse_listen",
    "parse_mappings",
)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
PHONE_POLICIES: Final = ("possible", "valid")
"""The values of ``optsync.engine.phone.PhonePolicy`` (a test keeps the two alike)."""
PhonePolicyName = Literal["possible", "valid"]


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8080
    """TCP port to listen on."""
    credentials: Mapping[str, str] = {}
    """Access key id -> secret; requests must be SigV4-signed with one of them."""
    console_secret: str | None = None
    """Signs console sessions; set it alike on every API server behind one address, so a
    session works against any of them [default: DATA_DIR/console-secret, made once]."""


class SourceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[source]``: decoded from the file as it is (its keys are its fields)."""

    url: str = ""
    """``sqlite:///relative/path.db``, ``mysql://…``, ``mariadb://…``, ``postgresql://…``
    (empty only in a file whose URL comes from OPTSYNC_SOURCE_URL)."""
    tables: tuple[str, ...] = ()
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


class MappingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A ``[[mapping]]`` rule as the file says it; ``optsync.backends.mapping_rules`` makes the
    apply stage's ``MappingRule`` of it (whose checks run at start, see the module notes)."""

    table: str
    channel: str = "SMS"
    """A channel type; upper case once loaded."""
    address: str
    """Column holding the address (phone number, e-mail address, token)."""
    opt_in: str
    """Column holding the opt-in flag."""
    user_id: str | None = None
    endpoint_id: str | None = None
    """``str.format`` template over column names [default: ``{user_id}_{address}``]."""
    opt_in_true: tuple[str | int | float | bool, ...] | None = None
    """Values of ``opt_in`` that mean opted in [default: the mapping's own list]."""
    opt_in_false: tuple[str | int | float | bool, ...] | None = None
    attributes: tuple[str, ...] = ()
    user_attributes: tuple[str, ...] = ()
    effective_date: str | None = None
    schema: str | None = None
    phone_policy: PhonePolicyName | None = None
    """``possible`` or ``valid`` [default: ``[engine] phone_policy``; set once loaded]."""
    default_region: str | None = None


class SegmentSettings(msgspec.Struct, frozen=True):
    """A ``[[segment]]`` of the config: made in the pipeline's app at start if missing."""

    name: str
    definition: Mapping[str, Any]
    """Pinpoint's WriteSegmentRequest (``Dimensions`` or ``SegmentGroups``, ``Name`` = name);
    ``optsync.backends.segment_definition`` reads it with the API's own checks."""


STREAM_SCHEMES = ("embedded", "nats", "kinesis")
ENGINE_SCHEMES = ("sqlite", "postgresql", "postgres")


class StreamSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[stream]``: decoded from the file as it is (its keys are its fields)."""

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


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the engine treats what it stores; ``optsync.backends.store_settings`` makes the
    store's ``StoreSettings`` of it."""

    phone_policy: PhonePolicyName = "possible"
    """Which phone numbers the engine accepts: ``possible`` (length and prefix) or ``valid``
    (a number assigned in its country's plan)."""
    derive_country: bool = True
    """Fill an SMS/VOICE endpoint's Location.Country from its number when not given."""


class ApplySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[apply]``: how the apply stage runs (decoded from the file as it is)."""

    mapping_process: bool | None = None
    """Decode and map records in a child process one batch ahead of the engine writes
    (``optsync.apply.stage``) [default: when the machine has two cores or more]. It pays when
    a core is free for it; turn it off on a machine whose cores are busy with other work."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Path = Path("optsync-data")
    """Folder for the embedded engine, stream, DLQ and generated credentials."""
    api: ApiSettings = msgspec.field(default_factory=ApiSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    engine_url: str | None = None
    """``sqlite:///PATH`` or ``postgresql://USER:PASSWORD@HOST:PORT/DB`` [default: sqlite in
    DATA_DIR/engine.db]. The dead-letter queue lives in the same database when it is
    PostgreSQL, else in DATA_DIR/dlq.db."""
    app: str = "optin-demo"
    """The engine app the mapping writes into; created if missing."""
    source: SourceSettings | None = None
    stream: StreamSettings = msgspec.field(default_factory=StreamSettings)
    apply: ApplySettings = msgspec.field(default_factory=ApplySettings)
    mappings: tuple[MappingSettings, ...] = ()
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
    audit: AuditSettings = msgspec.field(default_factory=AuditSettings)

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


# -- the file as written: None is "not given" ---------------------------------------------------


class _ApiTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    listen: str | None = None
    credentials: str | None = None
    console_secret: str | None = None


class _EngineTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str | None = None
    store: str | None = None
    app: str | None = None
    phone_policy: str | None = None
    derive_country: bool | None = None
    channels: Any = None
    """Checked by ``_channels`` (its message shows the form to write)."""


class _SegmentTable(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Any = None
    definition: Any = None
    country: Any = None


class _File(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str | None = None
    source: SourceSettings | None = None
    stream: StreamSettings | None = None
    apply: ApplySettings | None = None
    engine: _EngineTable | None = None
    api: _ApiTable | None = None
    mapping: tuple[MappingSettings, ...] = ()
    segment: tuple[_SegmentTable, ...] = ()
    sink: Any = None
    """``[[sink]]``, ``[[inbound]]`` and ``[audit]``: read by ``optsync.sinks.settings``."""
    inbound: Any = None
    audit: Any = None


_TABLES: Final[Mapping[str, type[msgspec.Struct]]] = {
    "api": _ApiTable,
    "engine": _EngineTable,
    "source": SourceSettings,
    "stream": StreamSettings,
    "apply": ApplySettings,
    "mapping": MappingSettings,
    "segment": _SegmentTable,
}
_TOP_KEYS: Final = _File.__struct_fields__
_API_KEYS: Final = _ApiTable.__struct_fields__
_ENGINE_KEYS: Final = _EngineTable.__struct_fields__
_STREAM_KEYS: Final = StreamSettings.__struct_fields__
_APPLY_KEYS: Final = ApplySettings.__struct_fields__
_SOURCE_KEYS: Final = SourceSettings.__struct_fields__
_MAPPING_KEYS: Final = MappingSettings.__struct_fields__
_SEGMENT_KEYS: Final = _SegmentTable.__struct_fields__
"""Every key each table knows (the example config names them all, a test checks)."""
_ARRAYS: Final = ("mapping", "segment", "sink", "inbound")
"""Sections written as arrays of tables (``[[mapping]]``)."""


def _given(**values: Any) -> dict[str, Any]:
    """Keyword arguments of the values given, so the Struct's own defaults fill the rest."""
    return {key: value for key, value in values.items() if value is not None}


def parse_listen(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key} = {value!r}: write host:port, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read the file (if any), apply the environment, validate everything config can check
    itself (``optsync.backends.check_settings`` does the rest)."""
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
    file = _decode(doc)
    api_table = file.api or _ApiTable()
    listen = env.get("OPTSYNC_API_LISTEN") or api_table.listen
    api = ApiSettings()
    if listen is not None:
        host, port = parse_listen(
            listen, "OPTSYNC_API_LISTEN" if env.get("OPTSYNC_API_LISTEN") else "[api] listen"
        )
        api = ApiSettings(host=host, port=port)
    credentials: dict[str, str] = {}
    if env.get("OPTSYNC_API_CREDENTIALS"):
        credentials = parse_credentials(env["OPTSYNC_API_CREDENTIALS"])
    elif api_table.credentials:
        credentials = parse_credentials(api_table.credentials, source="[api] credentials")
    console_secret = env.get("OPTSYNC_CONSOLE_SECRET") or api_table.console_secret
    if console_secret is not None and len(console_secret) < 16:
        raise ConfigError(
            "[api] console_secret (or OPTSYNC_CONSOLE_SECRET) is too short: use at least 16 "
            "random characters, e.g. from `openssl rand -hex 32`"
        )
    api = msgspec.structs.replace(api, credentials=credentials, console_secret=console_secret)
    engine_table = file.engine or _EngineTable()
    if engine_table.phone_policy not in (None, *PHONE_POLICIES):
        raise ConfigError(
            f"[engine] phone_policy = {engine_table.phone_policy!r}: use 'possible' or 'valid'"
        )
    engine = EngineSettings(
        **_given(phone_policy=engine_table.phone_policy, derive_country=engine_table.derive_country)
    )
    source = _source(file.source, env)
    mappings = _mappings(file.mapping, engine.phone_policy)
    if source is not None:
        for rule in mappings:
            if rule.table not in source.tables:
                raise ConfigError(
                    f"[[mapping]] table = {rule.table!r} is not in [source] tables "
                    f"{list(source.tables)}: add it there or fix the name"
                )
    data_dir = env.get("OPTSYNC_DATA_DIR") or file.data_dir
    return Settings(
        **_given(
            data_dir=Path(data_dir) if data_dir else None,
            engine_url=_engine_url(engine_table, env),
            app=engine_table.app or None,
        ),
        api=api,
        engine=engine,
        source=source,
        stream=_stream(file.stream or StreamSettings(), doc.get("stream") or {}, env),
        apply=file.apply or ApplySettings(),
        mappings=mappings,
        channels=_channels(engine_table.channels),
        segments=_segments(file.segment),
        serve_api="api" in doc,
        sinks=parse_sinks(doc, env),
        inbound=parse_inbound(doc),
        audit=parse_audit(doc),
    )


# -- msgspec's errors in the file's own words -----------------------------------------------

_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_KINDS: Final = {"object": "table", "array": "list", "null": "nothing"}


def _decode(doc: Mapping[str, Any]) -> _File:
    """The TOML document as written; a ConfigError naming the key when it is not."""
    try:
        return msgspec.convert(doc, _File)
    except msgspec.ValidationError as exc:
        raise _translated(str(exc), doc) from None


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def _translated(error: str, doc: Mapping[str, Any]) -> ConfigError:
    """msgspec's ``Expected `int`, got `bool` - at `$.stream.partitions``` as the file says
    it: ``[stream] partitions must be an int, not a bool``."""
    match = _AT.match(error)
    assert match is not None  # the pattern matches any text
    message, path = match["message"], match["path"] or ""
    steps: list[str | int] = [name if name else int(index) for name, index in _STEP.findall(path)]
    where, key = "", ""
    table: type[msgspec.Struct] | None = _File
    section = steps[0] if steps else None
    if isinstance(section, str):
        steps = steps[1:]
        if not steps and not message.startswith("Object"):
            key = section  # a top-level key (data_dir) or a section of the wrong kind
        elif section in _ARRAYS and steps and isinstance(steps[0], int):
            where = f"[[{section}]] #{int(steps.pop(0)) + 1} "
            table = _TABLES.get(section)
        else:
            where = f"[{section}] "
            table = _TABLES.get(section)
    if steps:  # the key in the table, with the item's number when it is in a list
        key = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps).lstrip(".")
    unknown = re.match(r"Object contains unknown field `(.+)`$", message)
    if unknown:
        name = unknown[1]
        known = ", ".join(table.__struct_fields__) if table is not None else ""
        value = None if where else doc.get(name)
        what = "section" if isinstance(value, dict | list) else "key"
        return ConfigError(
            f"{where or 'the config file '}has unknown {what} {name!r}: fix the spelling or "
            f"remove it; known: {known}"
        )
    missing = re.match(r"Object missing required field `(.+)`$", message)
    if missing:
        return ConfigError(f"{where}needs {missing[1]} (the column or table name)")
    expected = re.match(r"Expected `(.+?)`, got `(.+?)`$", message)
    if expected:
        want = " or ".join(_KINDS.get(k, k) for k in expected[1].split(" | ") if k != "null")
        got = _KINDS.get(expected[2], expected[2])
        if not key and where.startswith("[["):
            return ConfigError(f"{where}must be a table of keys, not {_a(got)}")
        if not key and where.startswith("["):
            return ConfigError(f"{where.strip()} must be a table, not {_a(got)}")
        if key in _ARRAYS and want == "list":
            return ConfigError(
                f"[[{key}]] must be an array of tables: write [[{key}]], not [{key}]"
            )
        if key in _TABLES and want == "table":
            return ConfigError(f"[{key}] must be a table, not {_a(got)}")
        return ConfigError(f"{where}{key} must be {_a(want)}, not {_a(got)}")
    if key == "phone_policy":
        return ConfigError(f"{where}phone_policy: use 'possible' or 'valid' ({message})")
    return ConfigError(f"{where}{key}: {message}" if key else f"{where}{message}")


# -- checks of meaning, section by section ----------------------------------------------------


def _channels(raw: Any) -> tuple[ChannelType, ...]:
    raw = [] if raw is None else raw
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise ConfigError('[engine] channels must list channel types, e.g. ["SMS"]')
    channels: list[ChannelType] = []
    for name in raw:
        channel = _channel(name, f"[engine] channels: {name!r} is no channel type")
        if channel not in channels:
            channels.append(channel)
    return tuple(channels)


def _channel(name: str, problem: str) -> ChannelType:
    try:
        return ChannelType(name.upper())
    except ValueError:
        raise ConfigError(f"{problem}; use {', '.join(c.value for c in ChannelType)}") from None


def _segments(tables: tuple[_SegmentTable, ...]) -> tuple[SegmentSettings, ...]:
    segments: list[SegmentSettings] = []
    for i, item in enumerate(tables):
        name = item.name
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f'[[segment]] #{i + 1} needs name = "..." (the segment\'s name in the app)'
            )
        where = f"[[segment]] {name!r} "
        if any(s.name == name for s in segments):
            raise ConfigError(f"{where}is declared twice: give each segment its own name")
        if (item.definition is None) == (item.country is None):
            raise ConfigError(
                f'{where}needs either country = "US" or definition = {{Dimensions = ...}} '
                "(Pinpoint's segment JSON), one of the two"
            )
        if item.country is not None:
            countries = [item.country] if isinstance(item.country, str) else item.country
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
            wire = item.definition
            if not isinstance(wire, dict):
                raise ConfigError(
                    f"{where}definition must be a table: Pinpoint's segment JSON, e.g. "
                    '{Dimensions = {Location = {Country = {DimensionType = "INCLUSIVE", '
                    'Values = ["US"]}}}}'
                )
            if "Name" in wire:
                raise ConfigError(f"{where}definition has Name: the segment's name is name")
        segments.append(SegmentSettings(name=name, definition={**wire, "Name": name}))
    return tuple(segments)


def _engine_url(engine: _EngineTable, env: Mapping[str, str]) -> str | None:
    store = engine.store
    url = env.get("OPTSYNC_ENGINE_URL") or engine.url
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


def _stream(
    table: StreamSettings, given: Mapping[str, Any], env: Mapping[str, str]
) -> StreamSettings:
    """``[stream]`` with OPTSYNC_STREAM_URL applied, checked; ``given`` is the table as written
    (which keys it names)."""
    settings = msgspec.structs.replace(table, url=env.get("OPTSYNC_STREAM_URL") or table.url)
    url, partitions, replicas = settings.url, settings.partitions, settings.replicas
    if partitions is not None and not 1 <= partitions <= 1024:
        raise ConfigError(
            f"[stream] partitions = {partitions!r}: use a whole number from 1 to 1024"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", settings.name):
        raise ConfigError(
            f"[stream] name = {settings.name!r}: use letters, digits, - and _ (a JetStream "
            "stream name)"
        )
    if replicas not in (1, 3, 5):
        raise ConfigError(f"[stream] replicas = {replicas!r}: use 1, 3 or 5 (JetStream replicas)")
    if settings.scheme == "kinesis":
        _check_kinesis(given, settings)
    elif settings.region is not None or settings.endpoint_url is not None:
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


SOURCE_SCHEMES = ("sqlite", "mysql", "mariadb", "postgresql", "postgres")


def _source(table: SourceSettings | None, env: Mapping[str, str]) -> SourceSettings | None:
    table = table or SourceSettings()
    url = env.get("OPTSYNC_SOURCE_URL") or table.url
    if not url:
        return None
    if not table.tables or not all(table.tables):
        raise ConfigError('[source] tables must list the captured tables, e.g. ["optin_status"]')
    settings = msgspec.structs.replace(table, url=url)
    if settings.scheme not in SOURCE_SCHEMES or (settings.scheme == "sqlite" and ":///" not in url):
        raise ConfigError(
            f"[source] url = {redact_url(url)!r}: use sqlite:///path/app.db, "
            "mysql://user:pass@host:3306/db, mariadb://..., or postgresql://user:pass@host:5432/db"
        )
    _check_host_port(url, "[source] url")
    return settings


def _mappings(
    rules: tuple[MappingSettings, ...], policy: PhonePolicyName
) -> tuple[MappingSettings, ...]:
    """The rules with their channel in upper case and their phone policy set."""
    checked = []
    for i, rule in enumerate(rules):
        where = f"[[mapping]] #{i + 1} "
        for key in ("table", "address", "opt_in"):
            if not getattr(rule, key):
                raise ConfigError(f"{where}needs {key} (the column or table name)")
        channel = _channel(rule.channel, f"{where}channel = {rule.channel!r} is no channel type")
        checked.append(
            msgspec.structs.replace(
                rule, channel=channel.value, phone_policy=rule.phone_policy or policy
            )
        )
    return tuple(checked)


def parse_mappings(
    raw: object, policy: PhonePolicyName = "possible"
) -> tuple[MappingSettings, ...]:
    """Mapping rules from a list of ``[[mapping]]`` tables given some other way (the Lambda's
    ``OPTSYNC_MAPPING`` JSON), with the same keys and checks as the config file."""
    return _mappings(_decode({"mapping": raw}).mapping, policy)
