"""The composition root: configuration (URLs) in, the source, stream, engine store and DLQ out.

No other module names a concrete backend class, so every role opens only what it needs:
``optsync capture`` a source and a stream, ``optsync apply`` a stream, a store and a DLQ,
``optsync serve`` a store. Drivers are imported only when their backend is configured.

===================  ==========================================  ===============================
setting              value                                       backend
===================  ==========================================  ===============================
``[source] url``     ``sqlite:///…``, ``mysql://…``,             SQLite, MySQL/MariaDB,
                     ``mariadb://…``, ``postgresql://…``         PostgreSQL capture
``[stream] url``     ``embedded`` (default), ``nats://HOST:PORT``  DATA_DIR/stream.db, JetStream
``[engine] url``     ``sqlite:///…`` (default DATA_DIR/engine.db),  SQLite, PostgreSQL store
                     ``postgresql://…``
DLQ                  follows the engine                          DATA_DIR/dlq.db, or a table in
                                                                 the engine's PostgreSQL
``[[sink]] type``    ``eum-sms``, ``webhook``, ``pinpoint-api``   EUM opt-out list, signed POST,
                                                                 UpdateEndpointsBatch
``[[inbound]]``      ``eum-sms``                                 EUM opt-out list poller
===================  ==========================================  ===============================

It also makes the engine's and apply's objects out of config's plain values (``store_settings``,
``mapping_rules``, ``segment_definition``); ``check_settings`` makes them all once, so a rule or a
segment definition their own modules refuse stops the CLI at start (exit 2, naming the key).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from optsync.apply.dlq import DeadLetterQueue, SQLiteDeadLetterQueue
from optsync.apply.mapping import MappingRule
from optsync.capture.base import ChangeSource
from optsync.config import MappingSettings, SegmentSettings, Settings
from optsync.engine.endpoints import CountryDerivation
from optsync.engine.models import ChannelType
from optsync.engine.phone import PhonePolicy
from optsync.engine.segments import SegmentDefinition, definition_from_wire
from optsync.engine.sql import StoreSettings
from optsync.engine.store import EndpointStore
from optsync.errors import ConfigError, InvalidRequest
from optsync.extras import requires_extra
from optsync.sinks.base import Sink
from optsync.sinks.settings import (
    EumSinkSettings,
    PinpointApiSinkSettings,
    WebhookSinkSettings,
)
from optsync.stream.base import ChangeStream

if TYPE_CHECKING:
    from optsync.inbound.base import InboundSource
    from optsync.inbound.writeback import Writeback

__all__ = (
    "DEFAULT_NATS_PARTITIONS",
    "check_settings",
    "mapping_rules",
    "segment_definition",
    "store_settings",
    "open_dlq",
    "open_inbound",
    "open_sinks",
    "open_writeback",
    "open_source",
    "open_store",
    "open_stream",
    "require_data",
)

DEFAULT_NATS_PARTITIONS = 8


def store_settings(settings: Settings) -> StoreSettings:
    """The engine store's settings of ``[engine]`` (phone policy, country derivation)."""
    engine = settings.engine
    return StoreSettings(
        country=CountryDerivation(
            enabled=engine.derive_country, policy=PhonePolicy(engine.phone_policy)
        )
    )


def mapping_rules(mappings: Sequence[MappingSettings]) -> tuple[MappingRule, ...]:
    """The apply stage's rules of ``[[mapping]]`` (or the Lambda's ``OPTSYNC_MAPPING``); a rule
    ``MappingRule`` refuses is a ConfigError naming its table."""
    rules = []
    for rule in mappings:
        given = {
            key: frozenset(str(v).strip().lower() for v in values)
            for key, values in (
                ("opt_in_true", rule.opt_in_true),
                ("opt_in_false", rule.opt_in_false),
            )
            if values is not None
        }
        rules.append(
            MappingRule(
                table=rule.table,
                channel=ChannelType(rule.channel),
                address=rule.address,
                opt_in=rule.opt_in,
                user_id=rule.user_id,
                endpoint_id=rule.endpoint_id,
                attributes=rule.attributes,
                user_attributes=rule.user_attributes,
                effective_date=rule.effective_date,
                schema=rule.schema,
                phone_policy=PhonePolicy(rule.phone_policy or PhonePolicy.POSSIBLE.value),
                default_region=rule.default_region,
                **given,
            )
        )
    return tuple(rules)


def segment_definition(segment: SegmentSettings) -> SegmentDefinition:
    """The engine's definition of a ``[[segment]]``, checked as the API checks one."""
    try:
        return definition_from_wire(dict(segment.definition), require_name=True)
    except InvalidRequest as exc:
        raise ConfigError(f"[[segment]] {segment.name!r} definition: {exc}") from None


def check_settings(settings: Settings) -> Settings:
    """``settings``, once every object made of them has been made: what config cannot check
    itself (a rule's endpoint id template, a segment's dimensions) is refused here, at start.
    The CLI calls it right after ``load_settings``."""
    store_settings(settings)
    mapping_rules(settings.mappings)
    for segment in settings.segments:
        segment_definition(segment)
    return settings


def open_source(settings: Settings) -> ChangeSource:
    """The capture for ``[source] url``."""
    source = settings.source
    if source is None:
        raise ConfigError("[source] url is missing: say which database to capture")
    name = source.source_name
    if source.scheme == "sqlite":
        from optsync.capture.sqlite.source import SQLiteSource  # noqa: PLC0415

        return SQLiteSource(source.sqlite_path, source.tables, name=name)
    if source.scheme in ("mysql", "mariadb"):
        with requires_extra("MySQL/MariaDB capture"):
            from optsync.capture.mysql.source import MySQLSource  # noqa: PLC0415

        return MySQLSource(source.url, source.tables, name=name, server_id=source.server_id)
    with requires_extra("PostgreSQL capture"):
        from optsync.capture.postgres.source import PostgresSource  # noqa: PLC0415

    return PostgresSource(
        source.url, source.tables, name=name, slot=source.slot, publication=source.publication
    )


def open_stream(settings: Settings) -> ChangeStream:
    """The stream of ``[stream] url``: embedded (DATA_DIR/stream.db), NATS JetStream or Kinesis."""
    stream = settings.stream
    if stream.scheme == "nats":
        with requires_extra("The NATS JetStream stream"):
            from optsync.stream.nats import NatsStream  # noqa: PLC0415

        return NatsStream(
            stream.url,
            name=stream.name,
            partitions=stream.partitions or DEFAULT_NATS_PARTITIONS,
            replicas=stream.replicas,
        )
    if stream.scheme == "kinesis":
        from optsync.stream.kinesis import KinesisStream  # noqa: PLC0415
        from optsync.stream.kinesis_state import open_kinesis_state  # noqa: PLC0415

        return KinesisStream(
            stream.kinesis_name,
            open_kinesis_state(settings),
            region=stream.region,
            endpoint_url=stream.endpoint_url,
        )
    from optsync.stream.embedded import EmbeddedStream  # noqa: PLC0415

    return EmbeddedStream(settings.stream_path, partitions=stream.partitions)


def open_store(settings: Settings) -> EndpointStore:
    """The engine store of ``[engine] url``: SQLite (default) or PostgreSQL."""
    if settings.engine_scheme == "postgresql":
        with requires_extra("The PostgreSQL engine"):
            from optsync.engine.postgres import PostgresStore  # noqa: PLC0415

        assert settings.engine_url is not None
        return PostgresStore(settings.engine_url, store_settings(settings))
    from optsync.engine.sqlite import SQLiteStore  # noqa: PLC0415

    return SQLiteStore(settings.engine_path, store_settings(settings))


def open_dlq(settings: Settings) -> DeadLetterQueue:
    """The dead-letter queue: in the engine's PostgreSQL database, else DATA_DIR/dlq.db."""
    if settings.engine_scheme == "postgresql":
        with requires_extra("The PostgreSQL dead-letter queue"):
            from optsync.apply.dlq.postgres import PostgresDeadLetterQueue  # noqa: PLC0415

        assert settings.engine_url is not None
        return PostgresDeadLetterQueue(settings.engine_url)
    return SQLiteDeadLetterQueue(settings.dlq_path)


def open_sinks(settings: Settings, store: EndpointStore) -> list[Sink]:
    """A ``Sink`` for each ``[[sink]]``; ``store`` is the engine they deliver from (the
    pinpoint-api sink reads each changed endpoint's whole state there)."""
    sinks: list[Sink] = []
    for sink in settings.sinks:
        if isinstance(sink, EumSinkSettings):
            from optsync.sinks.eum import EumSmsSink  # noqa: PLC0415

            sinks.append(EumSmsSink(sink))
        elif isinstance(sink, WebhookSinkSettings):
            from optsync.sinks.webhook import WebhookSink  # noqa: PLC0415

            sinks.append(WebhookSink(sink))
        else:
            assert isinstance(sink, PinpointApiSinkSettings)
            from optsync.sinks.pinpoint import PinpointApiSink  # noqa: PLC0415

            sinks.append(PinpointApiSink(sink, store))
    return sinks


def open_inbound(settings: Settings) -> list[InboundSource]:
    """A poller for each ``[[inbound]]``."""
    from optsync.inbound.eum import EumInbound  # noqa: PLC0415

    return [EumInbound(inbound) for inbound in settings.inbound]


def open_writeback(settings: Settings) -> Writeback | None:
    """The source write-back of end users' opt-outs (``[[inbound]] writeback``), if set."""
    sql = next((i.writeback for i in settings.inbound if i.writeback), None)
    if sql is None:
        return None
    if settings.source is None:
        raise ConfigError(
            "[[inbound]] writeback needs [source] url: the database it writes end users' "
            "opt-outs back to"
        )
    from optsync.inbound.writeback import Writeback  # noqa: PLC0415

    return Writeback(settings.source, sql)


def require_data(settings: Settings) -> Settings:
    """``settings`` if its engine holds optsync's data already; else a ConfigError naming it.

    Commands that only read (status, dlq) must not create an empty engine in a mistyped folder.
    A PostgreSQL engine is checked when it is opened (a missing database is named there).
    """
    if settings.engine_scheme == "sqlite" and not settings.engine_path.exists():
        where = (
            settings.data_dir
            if settings.engine_url is None
            else f"[engine] url {settings.redacted_engine_url}"
        )
        raise ConfigError(
            f"{where} holds no optsync data: check --data-dir (or data_dir / [engine] url in the "
            "config), or start `optsync up` first"
        )
    return settings
