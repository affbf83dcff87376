"""Sessions: a signed cookie (itsdangerous, through Starlette's ``SessionMiddleware``), HttpOnly,
SameSite=Strict, scoped to the mount path, valid for ``SESSION_SECONDS``. The signing key comes
from ``DATA_DIR/console-secret`` (created once, mode 600), so sessions survive a restart; each
sub-application derives its own key from it (``derive_key``), so one cookie cannot pass for
another."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from optsync.errors import ConfigError
from optsync.web.csrf import CSRF_SESSION_KEY

__all__ = (
    "MIN_SECRET_CHARS",
    "SECRET_FILE",
    "SESSION_SECONDS",
    "derive_key",
    "load_or_create_secret",
    "rotate_session",
)

logger = logging.getLogger(__name__)

SECRET_FILE = "console-secret"  # noqa: S105 - a file name, not a secret
SESSION_SECONDS = 8 * 60 * 60
MIN_SECRET_CHARS = 32


def load_or_create_secret(data_dir: Path) -> str:
    """The console's cookie-signing secret from ``DATA_DIR/console-secret``, created once."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48) + "\n")
    secret = path.read_text().strip()
    if len(secret) < MIN_SECRET_CHARS:
        # An empty or short key would let anyone forge a session cookie.
        raise ConfigError(
            f"{path} holds no usable secret (under {MIN_SECRET_CHARS} characters): delete it "
            "and start again, and optsync writes a new one"
        )
    if path.stat().st_mode & 0o077:
        logger.warning("console secret is readable by other users path=%s fix='chmod 600'", path)
    return secret


def derive_key(secret: str, purpose: str) -> str:
    """A key for one purpose (``console``, ``prefs``), so one cookie cannot pass for another."""
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def rotate_session(session: dict[str, Any], **values: Any) -> None:
    """Start a fresh session (new CSRF token) holding ``values``: done at every sign-in."""
    session.clear()
    session.update(values)
    session[CSRF_SESSION_KEY] = secrets.token_urlsafe(32)
