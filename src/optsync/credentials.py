"""The API's key pairs: ``KEYID:SECRET[,KEYID:SECRET...]`` text, and ``DATA_DIR/credentials``.

Read from ``OPTSYNC_API_CREDENTIALS``, ``[api] credentials`` or the data folder's file (created
once, mode 600, with one generated pair); SigV4 verification (``api.sigv4``) gets the parsed
mapping. Error messages name an item by its position only: an item may be a secret typed in the
wrong place.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from optsync.errors import ConfigError

__all__ = ("CREDENTIALS_FORM", "KEY_ID", "load_or_create_credentials", "parse_credentials")

CREDENTIALS_FORM = "KEYID:SECRET[,KEYID:SECRET...]"
KEY_ID = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
"""An access key id, as botocore allows one."""


def parse_credentials(text: str, source: str = "OPTSYNC_API_CREDENTIALS") -> dict[str, str]:
    """Parse ``KEYID:SECRET[,KEYID:SECRET]`` into a mapping of access key id to secret.

    Messages name the item by position only: an item may be a secret typed in the wrong place.
    """
    if not text.strip():
        raise ConfigError(f"{source} is empty: expected {CREDENTIALS_FORM}")
    keys: dict[str, str] = {}
    positions: dict[str, int] = {}
    for position, item in enumerate(text.split(","), start=1):
        key_id, separator, secret = item.strip().partition(":")
        if not separator:
            problem = "is empty" if not item.strip() else "has no ':' between key id and secret"
        elif not KEY_ID.fullmatch(key_id):
            problem = "has an invalid key id (use 1-128 of A-Z a-z 0-9 _ . -)"
        elif not secret or any(character.isspace() for character in secret):
            problem = "has an empty secret or one containing spaces"
        elif key_id in keys:
            problem = f"repeats the key id of item {positions[key_id]}"
        else:
            keys[key_id] = secret
            positions[key_id] = position
            continue
        raise ConfigError(f"{source}: item {position} {problem}; expected {CREDENTIALS_FORM}")
    return keys


def load_or_create_credentials(data_dir: Path) -> tuple[dict[str, str], bool]:
    """Key pairs from ``DATA_DIR/credentials``, generating one pair the first time.

    Returns the pairs and whether they were just created.
    """
    path = data_dir / "credentials"
    if path.exists():
        return parse_credentials(path.read_text().strip(), source=str(path)), False
    data_dir.mkdir(parents=True, exist_ok=True)
    key_id = "OPTSYNC" + secrets.token_hex(6).upper()
    secret = secrets.token_urlsafe(30)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{key_id}:{secret}\n")
    return {key_id: secret}, True
