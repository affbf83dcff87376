"""The checks ``open`` runs before it touches a SQLite source, and the captured tables it finds.

The application's SQLite runs the triggers, so it needs the JSON functions (built in since
SQLite 3.38) and at most 63 columns per captured table (``json_object`` takes 127 arguments
in SQLite builds before 3.48). A captured name must be a rowid table (not a view, a virtual
table or a ``WITHOUT ROWID`` table) that exists; names starting with ``sqlite_`` or
``_optsync_`` are SQLite's or optsync's own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from optsync.capture.sqlite.values import image_sql, quote
from optsync.errors import ConfigError

__all__ = (
    "ROWID_KEY",
    "SCHEMA",
    "TRIGGER_PREFIX",
    "Table",
    "check_json_functions",
    "check_names",
    "inspect",
)

TRIGGER_PREFIX: Final = "_optsync_"
"""optsync's triggers (and change table) have names that start with this."""
ROWID_KEY: Final = "rowid"
SCHEMA: Final = "main"
_MAX_COLUMNS: Final = 63
"""``json_object`` takes at most 127 arguments (SQLITE_MAX_FUNCTION_ARG before SQLite 3.48)."""


def _is_integer(declared: object) -> bool:
    return str(declared or "").strip().upper() == "INTEGER"


@dataclass(frozen=True)
class Table:
    """A captured table as ``open`` found it."""

    name: str
    """As configured; events carry this name."""
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    """PRIMARY KEY columns in key order; empty: the table is keyed by rowid."""
    rowid: str
    """A name of the rowid that no column shadows (rowid, oid or _rowid_)."""
    stable_rowid: bool = False
    """The rowid is an INTEGER PRIMARY KEY column: ``VACUUM`` leaves it alone."""

    def image(self, prefix: str) -> str:
        """``json_object`` of every column of the row ``prefix`` names (``NEW.``, ``OLD.``, "")."""
        return image_sql(self.columns, prefix)

    def key(self, rid: int | None, row: dict[str, Any]) -> dict[str, Any]:
        if not self.key_columns:
            return {ROWID_KEY: rid}
        return {column: row.get(column) for column in self.key_columns}


def check_names(name: str, table_names: Sequence[str]) -> None:
    """The configured table list of source ``name`` is usable, or ``ConfigError``."""
    if not table_names:
        raise ConfigError(f"source {name!r}: no tables to capture; list at least one")
    seen: set[str] = set()
    for table in table_names:
        folded = table.casefold()
        if folded in seen:
            raise ConfigError(f"source {name!r}: table {table!r} is listed twice")
        seen.add(folded)
        if folded.startswith((TRIGGER_PREFIX, "sqlite_")):
            raise ConfigError(
                f"source {name!r}: table {table!r} is internal to SQLite or optsync "
                "and cannot be captured; remove it from the table list"
            )


def check_json_functions(conn: sqlite3.Connection, name: str) -> None:
    """The SQLite library has ``json_object``, or ``ConfigError``."""
    try:
        conn.execute("SELECT json_object('a', 1)").fetchone()
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"source {name!r}: this SQLite ({sqlite3.sqlite_version}) has no JSON "
            "functions; use SQLite 3.38 or later (or a build with JSON1)"
        ) from exc


def inspect(conn: sqlite3.Connection, table: str, name: str, path: Path) -> Table:
    """Captured table ``table`` of source ``name``, or ``ConfigError`` saying why it cannot be."""
    row = conn.execute(
        "SELECT type, sql FROM sqlite_master WHERE name = ? COLLATE NOCASE "
        "AND type IN ('table', 'view')",
        (table,),
    ).fetchone()
    if row is None:
        raise ConfigError(
            f"source {name!r}: table {table!r} does not exist in {str(path)!r}; "
            "create it in the application database or remove it from the table list"
        )
    kind, sql = row
    if kind != "table" or str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL"):
        raise ConfigError(
            f"source {name!r}: {table!r} is a {'view' if kind == 'view' else 'virtual'}"
            " table, which cannot carry capture triggers; capture the table it reads from"
        )
    info = conn.execute(f"PRAGMA table_info({quote(table)})").fetchall()
    columns = tuple(str(c[1]) for c in info)
    keys = tuple(str(c[1]) for c in sorted((c for c in info if c[5]), key=lambda c: c[5]))
    if len(columns) > _MAX_COLUMNS:
        raise ConfigError(
            f"source {name!r}: table {table!r} has {len(columns)} columns; the SQLite "
            f"capture handles at most {_MAX_COLUMNS} (json_object's argument limit); "
            "move the columns optsync does not need to another table"
        )
    folded = {c.casefold() for c in columns}
    rowid = next((a for a in ("rowid", "oid", "_rowid_") if a not in folded), None)
    if rowid is None:
        raise ConfigError(
            f"source {name!r}: table {table!r} has columns named rowid, oid and "
            "_rowid_, so its rowid cannot be read; rename one of them"
        )
    try:
        conn.execute(f"SELECT {rowid} FROM {quote(table)} LIMIT 0").fetchall()
    except sqlite3.OperationalError as exc:
        raise ConfigError(
            f"source {name!r}: table {table!r} is a WITHOUT ROWID table; the SQLite "
            "capture reads tables in rowid order, so recreate it as a rowid table"
        ) from exc
    # A sole PRIMARY KEY column declared exactly INTEGER is the rowid, unless SQLite made it
    # an index of its own (INTEGER PRIMARY KEY DESC): then index_list shows a 'pk' index.
    integer_key = len(keys) == 1 and all(_is_integer(c[2]) for c in info if c[5])
    pk_index = any(row[3] == "pk" for row in conn.execute(f"PRAGMA index_list({quote(table)})"))
    return Table(table, columns, keys, rowid, stable_rowid=integer_key and not pk_index)
