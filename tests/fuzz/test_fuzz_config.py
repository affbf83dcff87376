"""The config loader on any TOML document: ``Settings``, or ``ConfigError`` (the CLI's exit 2).

Documents are the example configs with keys dropped, added or given other values, so most of
them get past the first check and reach the deeper ones; arbitrary text covers the TOML reader.
"""

from __future__ import annotations

import json
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from optsync.config import Settings, load_settings
from optsync.errors import ConfigError

EXAMPLES = Path(__file__).parents[2] / "examples"
SEEDS = [tomllib.loads(p.read_text()) for p in sorted(EXAMPLES.rglob("*.toml"))]
KNOWN_TEXT = [
    "",
    "x",
    "127.0.0.1:8080",
    "[::1]:0",
    "sqlite:///d/app.db",
    "sqlite://",
    "mysql://u:p@127.0.0.1:3306/db",
    "mariadb://u@h:99999/db",
    "postgresql://u:p@[::1]x/db",
    "nats://127.0.0.1:4222",
    "kinesis://stream",
    "embedded",
    "KEY:secret",
    "K1:s1,K2",
    "SMS",
    "EMAIL",
    "valid",
    "1 s",
    "-5m",
    "9999999999d",
]

SCALARS = st.one_of(
    st.sampled_from(KNOWN_TEXT),
    st.text(max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([0, 1, 3, 1024, 1025, -1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _value(value: Any) -> str:
    """A TOML value (inline form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        return repr(value).replace("e+", "e")
    if isinstance(value, str):
        return json.dumps(value)  # TOML's basic strings take JSON's escapes
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items()) + "}"


def toml_text(doc: dict[str, Any]) -> str:
    """``doc`` as TOML: scalars first, then tables and arrays of tables."""
    lines = [f"{json.dumps(k)} = {_value(v)}" for k, v in doc.items() if not _nested(v)]
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            lines.append(f"[{json.dumps(key)}]")
            lines.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in value.items())
        elif _nested(value):
            for table in value:
                lines.append(f"[[{json.dumps(key)}]]")
                lines.extend(f"{json.dumps(k)} = {_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _nested(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """An example config with a few keys (at any depth) dropped, replaced or added."""
    doc = json.loads(json.dumps(draw(st.sampled_from(SEEDS))))  # a deep copy
    for _ in range(draw(st.integers(1, 4))):
        tables: list[dict[str, Any]] = [doc]
        for value in doc.values():
            if isinstance(value, dict):
                tables.append(value)
            elif isinstance(value, list):
                tables.extend(v for v in value if isinstance(v, dict))
        table = draw(st.sampled_from(tables))
        action = draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop" and table:
            table.pop(draw(st.sampled_from(sorted(table))))
        elif action == "replace" and table:
            table[draw(st.sampled_from(sorted(table)))] = draw(VALUES)
        else:
            table[draw(st.sampled_from([*sorted(table), "x", "mapping", "sink"]))] = draw(VALUES)
    return doc


def load(text: str) -> Settings | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "optsync.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_settings(path, env={})
        except ConfigError as exc:
            message = str(exc)
            assert message and "\n" not in message.strip()  # the CLI prints one line
            return None


def test_the_seeds_load() -> None:
    assert len(SEEDS) >= 3
    for seed in SEEDS:
        assert isinstance(load(toml_text(seed)), Settings)


@given(documents())
def test_any_changed_example_config(doc: dict[str, Any]) -> None:
    load(toml_text(doc))


@given(st.text(max_size=200))
def test_any_text(text: str) -> None:
    load(text)
