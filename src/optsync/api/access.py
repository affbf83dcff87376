"""What a signed request may do: every app, or the apps of a scoped key, read-only or not.

Keys from ``OPTSYNC_API_CREDENTIALS`` (and the config or ``DATA_DIR/credentials``) have full
access; scoped keys (``optsync keys create``, kept in the engine: ``engine.api_keys``) reach
only their apps. The check runs on the route template before the handler, so no handler can
forget it; GetApps is the one handler that reads ``Access`` itself, to list only the key's apps.
"""

from __future__ import annotations

from dataclasses import dataclass

from optsync.api.errors import ApiError
from optsync.engine.api_keys import ApiKey

__all__ = ("FULL_ACCESS", "Access", "authorize")

_APP_PREFIX = "/v1/apps/{app}"
_READS = frozenset({"GET", "HEAD"})
_READ_POSTS = frozenset({"/v1/phone/number/validate"})
"""POST routes that change nothing (a read-only key may call them)."""


@dataclass(frozen=True)
class Access:
    """The caller's reach: ``app_ids`` None means every app."""

    key_id: str | None
    app_ids: frozenset[str] | None = None
    read_only: bool = False

    @classmethod
    def of(cls, key: ApiKey) -> Access:
        return cls(key.key_id, frozenset(key.app_ids), key.read_only)

    def may_use(self, app_id: str) -> bool:
        return self.app_ids is None or app_id in self.app_ids

    def scope_text(self) -> str:
        ids = sorted(self.app_ids or ())
        return f"app {ids[0]}" if len(ids) == 1 else f"apps {', '.join(ids)}"


FULL_ACCESS = Access(None)
"""No authentication (``--insecure-no-auth``) or a full-access key."""


def authorize(access: Access, method: str, template: str, params: dict[str, str]) -> None:
    """Raise ``ApiError.access_denied`` (403) naming why, if ``access`` does not cover the call."""
    if access.read_only and method not in _READS and template not in _READ_POSTS:
        raise ApiError.access_denied(
            f"this key ({access.key_id}) is read-only: {method} {template} writes; sign with a "
            "key created without --read-only"
        )
    if access.app_ids is None:
        return
    if template.startswith(_APP_PREFIX):
        app_id = params["app"]
        if not access.may_use(app_id):
            raise ApiError.access_denied(
                f"this key ({access.key_id}) is scoped to {access.scope_text()}, not app "
                f"{app_id}; sign with a key for that app or a full-access key"
            )
    elif method == "POST" and template == "/v1/apps":
        raise ApiError.access_denied(
            f"this key ({access.key_id}) is scoped to {access.scope_text()}: creating an app "
            "needs a full-access key"
        )
