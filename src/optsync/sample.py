"""The demo source's seed: the AWS sample's ``optin_status`` table and its nine users.

The table is the sample's, on purpose without a primary key (the SQLite capture keys its rows by
rowid). ``optsync up`` seeds a fresh application database with it, so the pipeline has something
to snapshot before anybody touches the preference page.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

__all__ = ("SAMPLE_DDL", "SAMPLE_ROWS", "SAMPLE_TABLE", "create_sample_database")

SAMPLE_TABLE = "optin_status"

SAMPLE_DDL = """
CREATE TABLE optin_status (
    userid TEXT,
    phone TEXT,
    optin INTEGER,
    lastupdate TEXT DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
)
"""

SAMPLE_ROWS: tuple[tuple[str, str, int], ...] = tuple(
    (f"user{n}", f"+1234111111{n}", 1) for n in range(1, 10)
)
"""(userid, phone, optin): user1 +12341111111 ... user9 +12341111119, all opted in."""


def create_sample_database(path: str | Path) -> bool:
    """Create ``optin_status`` with the sample users unless the table exists; True if created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        # WAL from the start, so the application's writes and capture never block each other.
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (SAMPLE_TABLE,)
            ).fetchone()
            if exists is None:
                conn.execute(SAMPLE_DDL)
                conn.executemany(
                    "INSERT INTO optin_status (userid, phone, optin) VALUES (?, ?, ?)",
                    SAMPLE_ROWS,
                )
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
    return exists is None
