"""JSON that parses yet cannot be taken: checks shared by every reader of outside JSON.

Python's JSON readers accept three things that later fail far from the reader: nesting deeper
than the interpreter's recursion limit (``RecursionError``), integers of more than 4,300 digits
(``ValueError`` from ``int``), and ``\\ud800``-style escapes of lone UTF-16 surrogates, which
read as a ``str`` that no UTF-8 database column or log line can hold (``UnicodeEncodeError`` in
the engine). Each reader turns them into its own refusal (a DLQ reason, a 400) with these words.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ("LONE_SURROGATE", "TOO_DEEP", "TOO_LONG_NUMBER", "has_lone_surrogate")

TOO_DEEP = "nests arrays or objects too deeply to read"
TOO_LONG_NUMBER = "holds an integer of thousands of digits, which no column holds"
LONE_SURROGATE = (
    "holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair), which is not "
    "text: fix the producer's JSON encoder"
)

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(value: Any, data: bytes) -> bool:
    """Whether a string of ``value`` (parsed from ``data``) holds a lone surrogate.

    Only values whose bytes hold a surrogate escape are walked, so the usual document costs one
    regex search; the walk keeps its own stack, as ``value`` may nest deeply.
    """
    if not _SURROGATE_ESCAPE.search(data):
        return False
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return True
    return False
