"""Segment definitions as the engine stores them: optsync's own form, not Pinpoint's.

``encode_definition`` writes a ``SegmentDefinition`` as msgspec JSON of the model dataclasses
(field names as in ``model.py``, enums as their values) inside an envelope with a format
version: ``{"v": 1, "definition": {...}}``. ``decode_definition`` reads it back with msgspec's
type checks only: the Pinpoint rules of ``wire.py`` (required names, dimension limits, the
quirks of its JSON) are not run again, and a change to the API codec never reinterprets a
stored row. Decisions:

- the whole definition is stored (name, tags and ``members`` included), so a row is complete by
  itself; the store still takes name, tags and membership from its own columns when it reads;
- a format newer than ``FORMAT_VERSION`` raises ``ConfigError`` naming the version and the fix
  (upgrade optsync), as a schema newer than known does; a value that is not a stored definition
  at all raises ``Fatal`` (a row changed by hand);
- ``upgrade_definition`` turns a row of schema 4 and older (Pinpoint wire JSON of the
  ``Dimensions``/``SegmentGroups`` members, read by ``wire.py`` one last time) into the stored
  form; a row already in the stored form (an object with a ``v`` member: wire JSON has none)
  comes back unchanged, so the migrations that call it can run twice without harm.

A new field of the model with a default reads older rows unchanged; any other change to the
model's shape needs ``FORMAT_VERSION`` + 1 and a conversion here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from optsync.engine.segments.model import SegmentDefinition
from optsync.engine.segments.wire import definition_from_wire
from optsync.errors import ConfigError, Fatal, InvalidRequest

__all__ = ("FORMAT_VERSION", "decode_definition", "encode_definition", "upgrade_definition")

FORMAT_VERSION = 1
"""The format ``encode_definition`` writes; 1: the model dataclasses of schema 5."""


@dataclass(frozen=True)
class _Envelope:
    v: int
    definition: SegmentDefinition


class _Version(msgspec.Struct):
    v: int


_ENCODER = msgspec.json.Encoder()
_ENVELOPE = msgspec.json.Decoder(_Envelope)
_VERSION = msgspec.json.Decoder(_Version)


def encode_definition(definition: SegmentDefinition) -> str:
    """``definition`` in the stored form (JSON text)."""
    return _ENCODER.encode(_Envelope(FORMAT_VERSION, definition)).decode()


def decode_definition(text: str | bytes) -> SegmentDefinition:
    """The definition ``encode_definition`` wrote (this version or an older one)."""
    try:
        version = _VERSION.decode(text).v
    except msgspec.DecodeError as exc:
        raise Fatal(
            f"stored segment definition is not optsync's stored form ({exc}): "
            "the row was changed by hand, or written by an optsync older than schema 5"
        ) from None
    if version > FORMAT_VERSION or version < 1:
        raise ConfigError(
            f"stored segment definition has format version {version}, not one this optsync "
            f"knows (1 to {FORMAT_VERSION}): upgrade optsync"
        )
    try:
        return _ENVELOPE.decode(text).definition
    except msgspec.DecodeError as exc:
        raise Fatal(
            f"stored segment definition of format {version} does not read ({exc}): "
            "the row was changed by hand; report it"
        ) from None


def upgrade_definition(
    text: str, *, name: str | None, tags: Mapping[str, str], members: str | None
) -> str:
    """The stored form of a ``definition`` column written by schema 4 or older.

    ``name``, ``tags`` and ``members`` come from the row's other columns (the old column held
    only the filter). A column already in the stored form is returned as it is.
    """
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise Fatal(f"stored segment definition is not JSON ({exc}): report it") from None
    if isinstance(value, dict) and "v" in value:
        decode_definition(text)  # a newer format stops the migration here
        return text
    try:
        parsed = definition_from_wire(value, require_name=False)
    except InvalidRequest as exc:
        raise Fatal(
            f"stored segment definition of schema 4 does not read ({exc}): report it"
        ) from None
    return encode_definition(
        SegmentDefinition(
            name=name,
            dimensions=parsed.dimensions,
            groups=parsed.groups,
            tags=dict(tags),
            members=members,
        )
    )
