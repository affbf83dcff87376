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
===================  ==========================================  ===============================
"""

from __future__ import annotations

from optsync.apply.dlq import DeadLetterQueue, SQLiteDeadLetterQueue
from optsync.capture.base import ChangeSource
from optsync.config import Settings
from optsync.engine.store import EndpointStore
from optsync.errors import ConfigError
from optsync.stream.base import ChangeStream

__all__ = (
    "DEFAULT_NATS_PARTITIONS",
    "open_dlq",
    "open_source",
    "open_store",
    "open_stream",
    "require_data",
)

DEFAULT_NATS_PARTITIONS = 8


def open_source(settings: Settings) -> ChangeSource:
    """The capture for ``[source] url``."""
    source = settings.source
    if source is None:
        raise ConfigError("[source] url is missing: say which database to capture")
    name = source.source_name
    if source.scheme == "sqlite":
        from optsync.capture.sqlite import SQLiteSource  # noqa: PLC0415

        return SQLiteSource(source.sqlite_path, source.tables, name=name)
    if source.scheme in ("mysql", "mariadb"):
        from optsync.capture.mysql import MySQLSource  # noqa: PLC0415

        return MySQLSource(source.url, source.tables, name=name, server_id=source.server_id)
    from optsync.capture.postgres import PostgresSource  # noqa: PLC0415

    return PostgresSource(
        source.url, source.tables, name=name, slot=source.slot, publication=source.publication
    )


def open_stream(settings: Settings) -> ChangeStream:
    """The stream of ``[stream] url``: embedded (DATA_DIR/stream.db) or NATS JetStream."""
    stream = settings.stream
    if stream.scheme == "nats":
        from optsync.stream.nats import NatsStream  # noqa: PLC0415

        return NatsStream(
            stream.url,
            name=stream.name,
            partitions=stream.partitions or DEFAULT_NATS_PARTITIONS,
            replicas=stream.replicas,
        )
    from optsync.stream.embedded import EmbeddedStream  # noqa: PLC0415

    return EmbeddedStream(settings.stream_path, partitions=stream.partitions)


def open_store(settings: Settings) -> EndpointStore:
    """The engine store of ``[engine] url``: SQLite (default) or PostgreSQL."""
    if settings.engine_scheme == "postgresql":
        from optsync.engine.postgres import PostgresStore  # noqa: PLC0415

        assert settings.engine_url is not None
        return PostgresStore(settings.engine_url, settings.engine)
    from optsync.engine.sqlite import SQLiteStore  # noqa: PLC0415

    return SQLiteStore(settings.engine_path, settings.engine)


def open_dlq(settings: Settings) -> DeadLetterQueue:
    """The dead-letter queue: in the engine's PostgreSQL database, else DATA_DIR/dlq.db."""
    if settings.engine_scheme == "postgresql":
        from optsync.apply.dlq.postgres import PostgresDeadLetterQueue  # noqa: PLC0415

        assert settings.engine_url is not None
        return PostgresDeadLetterQueue(settings.engine_url)
    return SQLiteDeadLetterQueue(settings.dlq_path)


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
