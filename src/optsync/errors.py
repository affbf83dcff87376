"""The optsync exception tree.

Every error says whether trying again can help, and its message says what to do next::

    OptsyncError
    ├── Retryable                 a later attempt may succeed (server down, lock timeout)
    └── Fatal                     the same input will fail again; a person must act
        ├── ConfigError           a setting is missing or wrong (CLI exit code 2)
        └── EngineError           a request to the engine was refused
            ├── InvalidRequest    bad input: names the field and the fix (HTTP 400)
            ├── NotFound          the app, endpoint, segment or version does not exist (HTTP 404)
            └── LimitExceeded     a Pinpoint quota would be broken (HTTP 400)

The HTTP layer (``optsync.api``) turns ``EngineError`` into Pinpoint's error shapes; the CLI turns
``ConfigError`` into one readable line and exit code 2.
"""

from __future__ import annotations

__all__ = (
    "ConfigError",
    "EngineError",
    "Fatal",
    "InvalidRequest",
    "LimitExceeded",
    "NotFound",
    "OptsyncError",
    "Retryable",
)


class OptsyncError(Exception):
    """Root of every error optsync raises on purpose."""


class Retryable(OptsyncError):
    """The operation may succeed if tried again later."""


class Fatal(OptsyncError):
    """The operation will fail again with the same input; the message says what to change."""


class ConfigError(Fatal):
    """A configuration value is missing or invalid."""


class EngineError(Fatal):
    """The engine refused a request."""


class InvalidRequest(EngineError):
    """The request is malformed; the message names the field and the fix."""


class NotFound(EngineError):
    """The addressed resource does not exist."""


class LimitExceeded(InvalidRequest):
    """A Pinpoint limit (batch size, endpoints per user, attribute sizes) would be exceeded."""
