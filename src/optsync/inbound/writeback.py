"""``Writeback``: tells the source database that a person opted out by themselves.

The configured statement (``[[inbound]] writeback``, say ``UPDATE optin_status SET optin = 0
WHERE phone = :address``) runs on the source with ``:address`` bound to the E.164 number, in
its own autocommit transaction. The change then comes back through capture like any other, and
is harmless: the endpoint is opted out already, and the end user's hold keeps it so.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from typing import Any

from optsync.config import SourceSettings
from optsync.errors import OptsyncError
from optsync.extras import requires_extra

__all__ = ("Writeback", "WritebackFailed")

_ADDRESS = re.compile(r"(?<!:):address\b")


class WritebackFailed(OptsyncError):
    """The statement could not run; retried with backoff, shown in status."""


class Writeback:
    """Runs the write-back statement on the ``[source]`` database."""

    def __init__(self, source: SourceSettings, sql: str) -> None:
        self.source = source
        self.sql = sql
        self._conn: Any = None

    def _connect(self) -> Any:
        scheme = self.source.scheme
        if scheme == "sqlite":
            conn = sqlite3.connect(
                self.source.sqlite_path, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout = 10000")
            return conn
        if scheme in ("mysql", "mariadb"):
            with requires_extra("Write-back to MySQL/MariaDB"):
                from optsync.capture.mysql.connection import SourceURL, connect  # noqa: PLC0415

            mysql: Any = connect(
                SourceURL.parse(self.source.url, self.source.source_name), "writeback"
            )
            mysql.autocommit(True)
            return mysql
        with requires_extra("Write-back to PostgreSQL"):
            from optsync.capture.postgres.connection import connect as pg_connect  # noqa: PLC0415

        return pg_connect(self.source.url, "optsync-writeback")

    def run(self, address: str) -> int:
        """Run the statement for ``address``; the number of rows it changed."""
        try:
            if self._conn is None:
                self._conn = self._connect()
            if self.source.scheme == "sqlite":
                cur = self._conn.execute(self.sql, {"address": address})
                return int(cur.rowcount)
            statement = _ADDRESS.sub("%(address)s", self.sql.replace("%", "%%"))
            with self._conn.cursor() as cur:
                cur.execute(statement, {"address": address})
                return int(cur.rowcount)
        except Exception as exc:
            self.close()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WritebackFailed(
                f"[[inbound]] writeback failed on source {self.source.source_name!r}: {first}; "
                "check the statement and the source user's UPDATE privilege"
            ) from None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection
                self._conn.close()
            self._conn = None
