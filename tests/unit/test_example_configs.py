"""``examples/sqlite.toml`` shows every key optsync reads (README: "shows every key"), and every
example config loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from optsync import config
from optsync.config import load_settings
from optsync.sinks import settings as sink_settings

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_the_sqlite_example_names_every_key() -> None:
    text = (EXAMPLES / "sqlite.toml").read_text()
    named = set(re.findall(r"^#?\s*([a-z_]+) =", text, flags=re.M))
    known = (
        (
            set(config._TOP_KEYS)
            - {
                "source",
                "stream",
                "apply",
                "engine",
                "api",
                "mapping",
                "segment",
                "sink",
                "inbound",
                "audit",
            }
        )
        | set(config._API_KEYS)
        | set(config._ENGINE_KEYS)
        | set(config._STREAM_KEYS)
        | set(config._APPLY_KEYS)
    )
    known |= set(config._SOURCE_KEYS) | set(config._MAPPING_KEYS) | set(config._SEGMENT_KEYS)
    known |= (
        set(sink_settings._EUM_KEYS)
        | set(sink_settings._WEBHOOK_KEYS)
        | set(sink_settings._PINPOINT_KEYS)
        | set(sink_settings._INBOUND_KEYS)
        | set(sink_settings._AUDIT_KEYS)
    )
    assert known - named == set()


@pytest.mark.parametrize("name", ["sqlite.toml", "mariadb.toml", "postgres.toml"])
def test_every_example_loads(name: str) -> None:
    settings = load_settings(EXAMPLES / name, env={})
    assert settings.mappings and settings.source is not None
    assert [s.name for s in settings.segments] == ["US-Segment"]
