"""Log sequence numbers (LSNs) and the order-preserving positions built from them.

A PostgreSQL LSN is a 64-bit byte offset into the WAL, shown by the server as ``16/B374D848``
(two hex halves without padding). Positions pad both halves to 8 upper-case hex digits, so
text order is LSN order, and append a per-transaction ordinal:

- a log event: ``<commit LSN>.<ordinal>``, ordinals from 1 in transaction order, e.g.
  ``00000016/B374D848.0000000003``;
- a ``load`` event: ``<consistent point>.0000000000``, which sorts before every change that
  committed at or after the snapshot's consistent point and after every change before it. A
  load of a table without a key appends ``.<row number>`` to keep one event id per row (the
  stream stores one event per partition key and position).
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ("format_lsn", "load_position", "log_position", "parse_lsn")

_LSN: Final = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_ORDINAL_DIGITS: Final = 10
_ROW_DIGITS: Final = 12


def parse_lsn(text: str) -> int:
    """``16/B374D848`` -> its 64-bit number; ``ValueError`` for anything else."""
    match = _LSN.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not an LSN (like 16/B374D848)")
    return (int(match[1], 16) << 32) | int(match[2], 16)


def format_lsn(lsn: int) -> str:
    """The server's own spelling of an LSN (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _padded(lsn: int) -> str:
    return f"{lsn >> 32:08X}/{lsn & 0xFFFFFFFF:08X}"


def log_position(commit_lsn: int, ordinal: int) -> str:
    """The position of the ``ordinal``-th change (from 1) of the transaction committed there."""
    return f"{_padded(commit_lsn)}.{ordinal:0{_ORDINAL_DIGITS}d}"


def load_position(consistent_point: int, row: int | None = None) -> str:
    """The position of a snapshot row; ``row`` numbers the rows of a table without a key."""
    base = f"{_padded(consistent_point)}.{0:0{_ORDINAL_DIGITS}d}"
    return base if row is None else f"{base}.{row:0{_ROW_DIGITS}d}"
