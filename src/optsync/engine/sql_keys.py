"""``SqlApiKeys``: scoped API keys (``optsync.engine.api_keys``) in the engine's SQL database,
mixed into ``SqlStore``, which supplies the hooks declared at the top of the class.

One row per key in ``api_keys``; a revoked key keeps its row (with ``revoked_at``) so that
``optsync keys list`` still shows who had access. Every lookup reads the row: a key revoked
through one server is refused by the others on their next request.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from optsync.engine.api_keys import ApiKey, ApiKeyStore
from optsync.engine.models import App, iso_now
from optsync.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor

__all__ = ("KEY_ID_PREFIX", "SqlApiKeys", "keys_schema")

KEY_ID_PREFIX = "OPTSYNCK"
"""Scoped key ids start so (20 characters, as AWS access key ids), apart from generated
full-access ids (``OPTSYNC`` and 12 hex digits)."""

_COLUMNS = "key_id, secret, app_ids, read_only, created_at, revoked_at"


def keys_schema(text: str) -> str:
    """The ``api_keys`` table; ``text`` is the text type. App ids are kept one per line."""
    return f"""CREATE TABLE IF NOT EXISTS api_keys (
    key_id {text} PRIMARY KEY,
    secret {text} NOT NULL,
    app_ids {text} NOT NULL,
    read_only integer NOT NULL,
    created_at {text} NOT NULL,
    revoked_at {text}
)"""


def _row_to_key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        key_id=row[0],
        secret=row[1],
        app_ids=tuple(i for i in row[2].split("\n") if i),
        read_only=bool(row[3]),
        created_at=row[4],
        revoked_at=row[5],
    )


class SqlApiKeys(ApiKeyStore, ABC):
    """Scoped API keys on a SQL database; see the module docstring."""

    # hooks (``SqlStore`` implements them) -----------------------------------------------------
    @abstractmethod
    def _write(self, *, durable: bool = True) -> AbstractContextManager[Cursor]: ...

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]: ...

    @abstractmethod
    def _exec(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    @abstractmethod
    def _get_app(self, cur: Cursor, app_id: str) -> App: ...

    def _protect_keys(self) -> None:
        """Hook: restrict who can read the stored secrets (SQLite: the file's mode)."""

    # keys -------------------------------------------------------------------------------------
    def create_api_key(self, app_ids: Sequence[str], *, read_only: bool) -> ApiKey:
        wanted = tuple(dict.fromkeys(app_ids))
        if not wanted:
            raise InvalidRequest("a scoped key needs at least one app")
        key = ApiKey(
            key_id=KEY_ID_PREFIX + secrets.token_hex(6).upper(),
            secret=secrets.token_urlsafe(30),
            app_ids=wanted,
            read_only=read_only,
            created_at=iso_now(),
        )
        with self._write() as cur:
            for app_id in wanted:
                self._get_app(cur, app_id)  # NotFound names it
            self._exec(
                cur,
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL)",
                (key.key_id, key.secret, "\n".join(wanted), int(read_only), key.created_at),
            )
        self._protect_keys()
        return key

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._read() as cur:
            row = self._exec(
                cur, f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return _row_to_key(row) if row else None

    def list_api_keys(self) -> list[ApiKey]:
        with self._read() as cur:
            rows = self._exec(
                cur, f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
        return [_row_to_key(r) for r in rows]

    def revoke_api_key(self, key_id: str) -> ApiKey:
        with self._write() as cur:
            self._exec(
                cur,
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (iso_now(), key_id),
            )
            row = self._exec(
                cur, f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"there is no API key {key_id!r}: see `optsync keys list`")
        return _row_to_key(row)
