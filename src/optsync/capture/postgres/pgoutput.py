"""The pgoutput logical replication protocol, version 1: bytes -> message values.

Only what protocol 1 sends with text tuples: Begin, Commit, Origin, Relation, Type, Insert,
Update, Delete, Truncate (and logical decoding Messages, ignored). A tuple column is NULL
(``None``), unchanged TOAST (``UNCHANGED``: the server did not send the value because the update
did not touch it and it is stored out of line), or the text of the type's output function.
Times are microseconds since 2000-01-01 UTC, as the server sends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from struct import Struct
from struct import error as StructError
from typing import Final

__all__ = (
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "ProtocolError",
    "Relation",
    "Truncate",
    "Unchanged",
    "Update",
    "decode",
)


class Unchanged:
    """The marker of an unchanged TOAST value (pgoutput's ``u``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged()

Value = str | None | Unchanged
"""One column of a tuple: its text, NULL, or UNCHANGED."""


class ProtocolError(ValueError):
    """A message that is not valid pgoutput protocol 1."""


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    """The LSN of the transaction's commit record."""
    commit_time: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    """The end of the commit record: restarting the log here skips this transaction."""
    commit_time: int


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    key: bool
    """Part of the replica identity (every column under REPLICA IDENTITY FULL)."""


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    identity: str
    """``d`` default (primary key), ``f`` full, ``i`` index, ``n`` nothing."""
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Insert:
    relation: int
    new: list[Value]


@dataclass(frozen=True, slots=True)
class Update:
    relation: int
    old: list[Value] | None
    """The old key (``old_kind`` K), the whole old row (O), or None when neither was sent."""
    old_kind: str | None
    new: list[Value]


@dataclass(frozen=True, slots=True)
class Delete:
    relation: int
    old: list[Value]
    old_kind: str


@dataclass(frozen=True, slots=True)
class Truncate:
    relations: tuple[int, ...]
    cascade: bool
    restart_identity: bool


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | None
"""A decoded message; None for those capture has no use for (Origin, Type, Message)."""

_INT16: Final = Struct(">h")
_INT32: Final = Struct(">i")
_UINT32: Final = Struct(">I")
_BEGIN: Final = Struct(">QqI")
_COMMIT: Final = Struct(">BQQq")
_REL_COLUMN: Final = Struct(">Ii")


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def _tuple(buf: bytes, pos: int) -> tuple[list[Value], int]:
    (count,) = _INT16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack_length = _INT32.unpack_from
    for _ in range(count):
        kind = buf[pos]
        pos += 1
        if kind == 116:  # t: text
            (length,) = unpack_length(buf, pos)
            pos += 4
            append(buf[pos : pos + length].decode())
            pos += length
        elif kind == 110:  # n: NULL
            append(None)
        elif kind == 117:  # u: unchanged TOAST
            append(UNCHANGED)
        else:
            raise ProtocolError(f"tuple column kind {chr(kind)!r} is not text, NULL or unchanged")
    return values, pos


def _relation(buf: bytes) -> Relation:
    (oid,) = _UINT32.unpack_from(buf, 1)
    schema, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity = chr(buf[pos])
    (count,) = _INT16.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        column, pos = _string(buf, pos + 1)
        type_oid, _typmod = _REL_COLUMN.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(column, type_oid, bool(flags & 1)))
    return Relation(oid, schema, name, identity, tuple(columns))


def decode(buf: bytes) -> Message:
    """One pgoutput message; ``ProtocolError`` when it cannot be read."""
    try:
        kind = buf[0]
        if kind == 73:  # I
            (relation,) = _UINT32.unpack_from(buf, 1)
            if buf[5] != 78:  # N
                raise ProtocolError("Insert without a new tuple")
            new, _ = _tuple(buf, 6)
            return Insert(relation, new)
        if kind == 85:  # U
            (relation,) = _UINT32.unpack_from(buf, 1)
            pos = 5
            old: list[Value] | None = None
            old_kind = None
            if buf[pos] in (75, 79):  # K, O
                old_kind = chr(buf[pos])
                old, pos = _tuple(buf, pos + 1)
            if buf[pos] != 78:
                raise ProtocolError("Update without a new tuple")
            new, _ = _tuple(buf, pos + 1)
            return Update(relation, old, old_kind, new)
        if kind == 68:  # D
            (relation,) = _UINT32.unpack_from(buf, 1)
            old_kind = chr(buf[5])
            if old_kind not in ("K", "O"):
                raise ProtocolError("Delete without an old key or row")
            old, _ = _tuple(buf, 6)
            return Delete(relation, old, old_kind)
        if kind == 66:  # B
            final_lsn, commit_time, xid = _BEGIN.unpack_from(buf, 1)
            return Begin(final_lsn, commit_time, xid)
        if kind == 67:  # C
            _flags, commit_lsn, end_lsn, commit_time = _COMMIT.unpack_from(buf, 1)
            return Commit(commit_lsn, end_lsn, commit_time)
        if kind == 82:  # R
            return _relation(buf)
        if kind == 84:  # T
            (count,) = _INT32.unpack_from(buf, 1)
            options = buf[5]
            relations = tuple(_UINT32.unpack_from(buf, 6 + 4 * i)[0] for i in range(count))
            return Truncate(relations, bool(options & 1), bool(options & 2))
        if kind in (79, 89, 77):  # O origin, Y type, M message
            return None
    except (IndexError, ValueError, StructError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"message {chr(buf[0]) if buf else '?'!r} is truncated: {exc}") from exc
    raise ProtocolError(f"unknown message type {chr(kind)!r}")
