"""The preference center's reads and writes, on the SOURCE database (never on the engine).

The page stands in for the application that owns consent: it updates the captured table
(``UPDATE optin_status SET optin = ?, lastupdate = ? WHERE userid = ? AND rowid = ?``), so a
change travels capture, stream and apply like any other. A preference is named by its row's
rowid, so the page never has to send the address back (it shows it masked); the user id in the
``WHERE`` keeps a user to their own rows. The columns come from the mapping
rules: each rule on the table with a ``user_id`` column is one preference (SMS, EMAIL, ...).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from optsync.apply.mapping import MappingRule
from optsync.backends import mapping_rules
from optsync.config import Settings
from optsync.engine.models import ChannelType, iso_now
from optsync.errors import ConfigError

__all__ = ("Preference", "PreferenceColumns", "PreferenceStore", "SourceTable", "source_table")

BUSY_TIMEOUT_SECONDS = 10.0
EMAIL_COLUMNS = ("email", "email_address")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _stored_form(values: frozenset[str]) -> int | str:
    """The value to write for opted in (or out): ``1``/``0`` as integers where the rule allows."""
    for number in ("1", "0"):
        if number in values:
            return int(number)
    return sorted(values)[0]


@dataclass(frozen=True)
class PreferenceColumns:
    """One mapping rule as the page uses it: the address and opt-in columns of a channel."""

    channel: ChannelType
    address: str
    opt_in: str
    true_values: frozenset[str]
    false_values: frozenset[str]

    @classmethod
    def of(cls, rule: MappingRule) -> PreferenceColumns:
        return cls(rule.channel, rule.address, rule.opt_in, rule.opt_in_true, rule.opt_in_false)

    def reads(self, value: object) -> bool | None:
        """True opted in, False opted out, None for a value the mapping would dead-letter."""
        text = "" if value is None else str(value).strip().lower()
        if text in self.true_values:
            return True
        if text in self.false_values:
            return False
        return None

    def writes(self, opted_in: bool) -> int | str:
        return _stored_form(self.true_values if opted_in else self.false_values)


@dataclass(frozen=True)
class SourceTable:
    """Where the preferences live: one table of a SQLite source."""

    path: Path
    table: str
    user_column: str
    updated_column: str | None
    preferences: tuple[PreferenceColumns, ...]


@dataclass(frozen=True)
class Preference:
    """One address of the user and whether they accept messages on it."""

    channel: ChannelType
    address: str
    opted_in: bool | None
    updated: str | None
    row: int
    """The rowid of the source row holding it (what the page's form sends back)."""


def source_table(settings: Settings) -> SourceTable:
    """The table the preference center edits, from ``[source]`` and the mapping rules."""
    if settings.source is None or settings.source.scheme != "sqlite":
        raise ConfigError(
            "the preference center edits a SQLite source: set [source] url = "
            '"sqlite:///path/app.db", or leave --prefs off'
        )
    rules: Sequence[MappingRule] = [r for r in mapping_rules(settings.mappings) if r.user_id]
    if not rules:
        raise ConfigError(
            "the preference center signs users in by user id: give a [[mapping]] rule a "
            "user_id column, or leave --prefs off"
        )
    first = next((r for r in rules if r.channel is ChannelType.SMS), rules[0])
    same = [r for r in rules if r.table == first.table and r.user_id == first.user_id]
    assert first.user_id is not None
    return SourceTable(
        path=settings.source.sqlite_path,
        table=first.table,
        user_column=first.user_id,
        updated_column=first.effective_date,
        preferences=tuple(PreferenceColumns.of(r) for r in same),
    )


class PreferenceStore:
    """Reads and writes one user's preferences in the source table (blocking calls)."""

    def __init__(self, table: SourceTable) -> None:
        self.table = table

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.table.path.exists():
            raise ConfigError(f"the source database {self.table.path} does not exist")
        conn = sqlite3.connect(self.table.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            yield conn
        finally:
            conn.close()

    def _columns(self, conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(f"PRAGMA table_info({_quote(self.table.table)})").fetchall()
        return [str(r[1]) for r in rows]

    def user_exists(self, user_id: str) -> bool:
        t = self.table
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT 1 FROM {_quote(t.table)} WHERE {_quote(t.user_column)} = ? LIMIT 1",
                (user_id,),
            ).fetchone()
        return row is not None

    def preferences(self, user_id: str) -> list[Preference]:
        """Every address of the user, one per channel and row, in row order."""
        t = self.table
        updated = _quote(t.updated_column) if t.updated_column else "NULL"
        found: list[Preference] = []
        with self._connect() as conn:
            for columns in t.preferences:
                rows = conn.execute(
                    f"SELECT {_quote(columns.address)}, {_quote(columns.opt_in)}, {updated}, "
                    f"rowid FROM {_quote(t.table)} WHERE {_quote(t.user_column)} = ? "
                    f"AND {_quote(columns.address)} IS NOT NULL ORDER BY rowid",
                    (user_id,),
                ).fetchall()
                found.extend(
                    Preference(
                        columns.channel,
                        str(address),
                        columns.reads(value),
                        None if when is None else str(when),
                        int(row),
                    )
                    for address, value, when, row in rows
                )
        return found

    def other_emails(self, user_id: str) -> list[str]:
        """E-mail addresses in the table that no mapping rule captures (shown, not editable)."""
        t = self.table
        captured = {c.address for c in t.preferences}
        with self._connect() as conn:
            column = next(
                (
                    c
                    for c in self._columns(conn)
                    if c.lower() in EMAIL_COLUMNS and c not in captured
                ),
                None,
            )
            if column is None:
                return []
            rows = conn.execute(
                f"SELECT DISTINCT {_quote(column)} FROM {_quote(t.table)} "
                f"WHERE {_quote(t.user_column)} = ? AND {_quote(column)} IS NOT NULL",
                (user_id,),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def set_opt_in(
        self, user_id: str, channel: ChannelType, row: int, opted_in: bool
    ) -> str | None:
        """Write the user's choice for the address in ``row``; return that address, or None
        if the user has no such row or it holds no address for ``channel``."""
        t = self.table
        columns = next((c for c in t.preferences if c.channel is channel), None)
        if columns is None:
            return None
        assignments = f"{_quote(columns.opt_in)} = ?"
        values: list[object] = [columns.writes(opted_in)]
        if t.updated_column:
            assignments += f", {_quote(t.updated_column)} = ?"
            values.append(iso_now())
        with self._connect() as conn:
            changed = conn.execute(
                f"UPDATE {_quote(t.table)} SET {assignments} "
                f"WHERE {_quote(t.user_column)} = ? AND rowid = ? "
                f"AND {_quote(columns.address)} IS NOT NULL RETURNING {_quote(columns.address)}",
                (*values, user_id, row),
            ).fetchone()
        return None if changed is None else str(changed[0])
