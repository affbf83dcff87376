"""Values of SQLite capture: SQL text the triggers and the snapshot use, and row images decoded.

Values are the JSON values ``json_object`` gives: integers, text, reals (with the 15
significant digits SQLite renders; the snapshot reads rows through the same ``json_object`` so
loads and log events agree). ``json_object`` refuses BLOBs, and a trigger that failed would
fail the application's write, so a BLOB is captured as its upper-case hex text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

import msgspec

__all__ = ("decode_image", "image_sql", "literal", "quote")

_IMAGES: Final = msgspec.json.Decoder()


def quote(name: str) -> str:
    """An SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """An SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def image_sql(columns: Iterable[str], prefix: str) -> str:
    """``json_object`` of every column of the row ``prefix`` names (``NEW.``, ``OLD.``, "")."""
    parts = []
    for column in columns:
        ref = prefix + quote(column)
        value = f"CASE typeof({ref}) WHEN 'blob' THEN hex({ref}) ELSE {ref} END"
        parts.append(f"{literal(column)}, {value}")
    return f"json_object({', '.join(parts)})"


def decode_image(text: str) -> dict[str, Any]:
    """A row image ``json_object`` wrote, as a dict."""
    try:
        row: dict[str, Any] = _IMAGES.decode(text)
    except ValueError:  # msgspec refuses 9.0e+999, SQLite's text of an infinite REAL
        row = json.loads(text)
    return row
