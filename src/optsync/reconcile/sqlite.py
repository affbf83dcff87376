"""Reads a SQLite source for ``optsync reconcile``: capture's ``inspect`` and row images.

The log's position is the largest change number issued (``issued``), read in the same read
transaction as the row, as the snapshot does: the row holds exactly the changes up to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from optsync.capture.sqlite.connection import connect, translated
from optsync.capture.sqlite.log import issued
from optsync.capture.sqlite.preflight import SCHEMA, check_names, inspect
from optsync.capture.sqlite.snapshot import load_event
from optsync.capture.sqlite.values import quote
from optsync.errors import ConfigError
from optsync.events import ChangeEvent, Row, position_of
from optsync.reconcile.base import SourceReader, TableRef

__all__ = ("SQLiteReader",)


class SQLiteReader(SourceReader):
    """Rows of the captured tables of a SQLite source, in rowid order."""

    def __init__(self, path: Path, table_names: Sequence[str], name: str) -> None:
        check_names(name, table_names)
        if not path.is_file():
            raise ConfigError(
                f"source {name!r}: the SQLite database {str(path)!r} does not exist; "
                "check [source] url"
            )
        self.name = name
        self._conn = connect(path, name)
        with translated(name, "inspect tables"):
            self._tables = {t: inspect(self._conn, t, name, path) for t in table_names}

    def tables(self) -> Sequence[TableRef]:
        return [TableRef(SCHEMA, t.name, keyed=True) for t in self._tables.values()]

    def count(self, table: TableRef) -> int | None:
        with translated(self.name, "count rows"):
            return int(
                self._conn.execute(f"SELECT count(*) FROM {quote(table.name)}").fetchone()[0]
            )

    def chunks(self, table: TableRef, size: int) -> Iterator[list[ChangeEvent]]:
        info = self._tables[table.name]
        select = (
            f"SELECT {info.rowid}, {info.image('')} FROM {quote(info.name)} "
            f"WHERE {info.rowid} > ? ORDER BY {info.rowid} LIMIT ?"
        )
        after = 0
        while True:
            with translated(self.name, "read rows"):
                rows = self._conn.execute(select, (after, size)).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            yield [load_event(info, rid, image, "") for rid, image in rows]
            if len(rows) < size:
                return

    def row(self, table: TableRef, key: Row) -> ChangeEvent | None:
        info = self._tables[table.name]
        if info.key_columns:
            where = " AND ".join(f"{quote(c)} IS ?" for c in info.key_columns)
            params = [key.get(c) for c in info.key_columns]
        else:
            where, params = f"{info.rowid} = ?", [key.get("rowid")]
        sql = f"SELECT {info.rowid}, {info.image('')} FROM {quote(info.name)} WHERE {where}"
        with translated(self.name, "read a row"):
            found = self._conn.execute(sql, params).fetchone()
        return None if found is None else load_event(info, found[0], found[1], "")

    def position(self, lineage: int | None) -> str:
        with translated(self.name, "read the change table's position"):
            return position_of(issued(self._conn))

    def close(self) -> None:
        self._conn.close()
