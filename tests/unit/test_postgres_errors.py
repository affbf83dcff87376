"""Connection errors of the PostgreSQL engine: a server that is starting up or shutting down is
a reason to retry, not a missing database (found by the chaos run, tests/chaos)."""

from __future__ import annotations

import psycopg
import pytest

from optsync.engine.postgres_database import translate_error
from optsync.errors import ConfigError, Retryable

URL = "postgresql://optsync:secret@127.0.0.1:5432/engine"
PREFIX = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: FATAL:  '


@pytest.mark.parametrize(
    "message",
    [
        "the database system is shutting down",
        "the database system is starting up",
        "the database system is in recovery mode",
        "the database system is not yet accepting connections",
    ],
)
def test_a_server_starting_or_stopping_is_retried(message: str) -> None:
    error = translate_error(psycopg.OperationalError(PREFIX + message), URL, "engine database")
    assert isinstance(error, Retryable), error
    assert "createdb" not in str(error)
    assert "secret" not in str(error)


def test_a_missing_database_is_still_a_config_error() -> None:
    exc = psycopg.OperationalError(PREFIX + 'database "engine" does not exist')
    error = translate_error(exc, URL, "engine database")
    assert isinstance(error, ConfigError)
    assert "createdb" in str(error)
