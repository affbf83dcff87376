"""``optsync reconcile``: check the engine against the source, and repair it through the
position guard (``run``); one reader per source kind, like capture's layout."""

from __future__ import annotations

from optsync.config import Settings
from optsync.errors import ConfigError
from optsync.extras import requires_extra
from optsync.reconcile.base import REPAIR_SUFFIX, SourceReader, TableRef
from optsync.reconcile.compare import Drift, DriftKind
from optsync.reconcile.run import RepairResult, Report, reconcile, repair

__all__ = (
    "REPAIR_SUFFIX",
    "Drift",
    "DriftKind",
    "RepairResult",
    "Report",
    "SourceReader",
    "TableRef",
    "open_reader",
    "reconcile",
    "repair",
)


def open_reader(settings: Settings) -> SourceReader:
    """The reader of ``[source] url`` (drivers imported only for the configured kind)."""
    source = settings.source
    if source is None:
        raise ConfigError("[source] url is missing: say which database to reconcile with")
    name = source.source_name
    if source.scheme == "sqlite":
        from optsync.reconcile.sqlite import SQLiteReader  # noqa: PLC0415

        return SQLiteReader(source.sqlite_path, source.tables, name)
    if source.scheme in ("mysql", "mariadb"):
        with requires_extra("MySQL/MariaDB capture"):
            from optsync.reconcile.mysql import MySQLReader  # noqa: PLC0415

        return MySQLReader(source.url, source.tables, name)
    with requires_extra("PostgreSQL capture"):
        from optsync.reconcile.postgres import PostgresReader  # noqa: PLC0415

    # The publication capture uses (its default is the slot's name, optsync_<source name>).
    slot = source.slot if source.slot is not None else f"optsync_{name}"
    return PostgresReader(source.url, source.tables, name, source.publication or slot)
