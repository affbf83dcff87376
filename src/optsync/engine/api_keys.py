"""Scoped API keys: key pairs limited to some apps, optionally read-only, kept in the engine.

They live in the engine's database (not a file of one server) so that every ``optsync serve``
sharing the engine sees a new or revoked key on its next request. SigV4 needs the server to
compute the same HMAC as the client, so the secret itself is stored: a signing key derived
per date cannot be kept instead, since the date of the requests changes every day. Access to
the engine's database therefore grants every secret; ``docs/keys.md`` says how to protect it.

Keys from ``OPTSYNC_API_CREDENTIALS``, ``[api] credentials`` or ``DATA_DIR/credentials`` are
not here: they reach every app and can write.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ("ApiKey", "ApiKeyStore")


@dataclass(frozen=True)
class ApiKey:
    """One scoped key pair."""

    key_id: str
    secret: str
    app_ids: tuple[str, ...]
    """The apps it may use (their ids); any other app answers 403."""
    read_only: bool
    created_at: str
    revoked_at: str | None = None
    """Set once ``revoke_api_key`` ran: from then on every request signed with it is refused."""

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class ApiKeyStore(ABC):
    """Where scoped keys are kept (the engine's store implements it)."""

    @abstractmethod
    def create_api_key(self, app_ids: Sequence[str], *, read_only: bool) -> ApiKey:
        """A new key pair for these apps, which must exist (``NotFound`` otherwise)."""

    @abstractmethod
    def get_api_key(self, key_id: str) -> ApiKey | None:
        """The key, revoked or not, read from the database on every call (never cached)."""

    @abstractmethod
    def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""

    @abstractmethod
    def revoke_api_key(self, key_id: str) -> ApiKey:
        """Refuse the key from now on (``NotFound`` if there is none); revoking twice keeps the
        first time."""
