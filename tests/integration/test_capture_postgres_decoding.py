"""The PostgreSQL capture's pure parts: pgoutput framing, value texts, positions (no server)."""

from __future__ import annotations

import struct

import pytest

from optsync.capture.postgres import pgoutput as pgoutput
from optsync.capture.postgres.position import format_lsn, load_position, log_position, parse_lsn
from optsync.capture.postgres.values import TypeCatalog, TypeInfo, parse_array, parse_copy_line


def test_positions_sort_as_the_log_does() -> None:
    lsn = parse_lsn("16/B374D848")
    assert format_lsn(lsn) == "16/B374D848"
    assert lsn == (0x16 << 32) | 0xB374D848
    load = load_position(lsn)
    keyless = load_position(lsn, 12)
    same_commit = log_position(lsn, 1)
    assert log_position(lsn - 1, 99) < load < keyless < same_commit < log_position(lsn, 2)
    assert log_position(0xF, 1) < log_position(0x10, 1) < log_position(1 << 32, 1)
    assert same_commit == "00000016/B374D848.0000000001"
    with pytest.raises(ValueError):
        parse_lsn("16-B374")


def test_arrays_nested_quoted_and_null() -> None:
    assert parse_array("{}", int) == []
    assert parse_array("{1,NULL,3}", int) == [1, None, 3]
    assert parse_array("{{1,2},{3,4}}", int) == [[1, 2], [3, 4]]
    assert parse_array('{"a b","q\\"x","NULL",NULL,"c,d"}', str) == [
        "a b",
        'q"x',
        "NULL",
        None,
        "c,d",
    ]
    assert parse_array("[0:1]={7,8}", int) == [7, 8]
    assert parse_array("{(0,0),(1,1);(2,2),(3,3)}", str, ";") == ["(0,0),(1,1)", "(2,2),(3,3)"]
    with pytest.raises(ValueError):
        parse_array("1,2", int)


def test_copy_text_lines() -> None:
    assert parse_copy_line("1\tabc\t\\N") == ["1", "abc", None]
    assert parse_copy_line("a\\tb\t\\\\x\tline\\nnext") == ["a\tb", "\\x", "line\nnext"]


def test_type_catalog_resolves_domains_and_arrays() -> None:
    fetched: list[list[int]] = []
    types = {
        9001: TypeInfo(9001, "positive", "d", "N", 0, ",", 23),
        9002: TypeInfo(9002, "_positive", "b", "A", 9001, ",", 0),
        1015: TypeInfo(1015, "_varchar", "b", "A", 1043, ",", 0),
        1043: TypeInfo(1043, "varchar", "b", "S", 0, ",", 0),
    }

    def fetch(oids: object) -> list[TypeInfo]:
        wanted = list(oids)  # type: ignore[call-overload]
        fetched.append(wanted)
        return [types[o] for o in wanted if o in types]

    catalog = TypeCatalog(fetch)
    positive, arr, texts, numeric = catalog.converters([9001, 9002, 1015, 1700])
    assert positive("7") == 7
    assert arr("{1,NULL}") == [1, None]
    assert texts('{"a,b",c}') == ["a,b", "c"]
    assert numeric("1.10") == "1.10"
    catalog.converters([9001, 9002])
    assert sum(len(f) for f in fetched) <= 5  # looked up once


def _tuple(*values: bytes | None) -> bytes:
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value == b"<u>":
            out += b"u"
        else:
            out += b"t" + struct.pack(">i", len(value)) + value
    return out


def test_pgoutput_messages() -> None:
    begin = pgoutput.decode(b"B" + struct.pack(">QqI", 0x1000, 12345, 77))
    assert begin == pgoutput.Begin(0x1000, 12345, 77)
    commit = pgoutput.decode(b"C" + struct.pack(">BQQq", 0, 0x1000, 0x1030, 12345))
    assert commit == pgoutput.Commit(0x1000, 0x1030, 12345)
    relation = pgoutput.decode(
        b"R" + struct.pack(">I", 16384) + b"public\x00t\x00f" + struct.pack(">h", 2)
        + b"\x01id\x00" + struct.pack(">Ii", 23, -1) + b"\x00v\x00" + struct.pack(">Ii", 25, -1)
    )  # fmt: skip
    assert relation == pgoutput.Relation(
        16384,
        "public",
        "t",
        "f",
        (pgoutput.Column("id", 23, True), pgoutput.Column("v", 25, False)),
    )
    update = pgoutput.decode(
        b"U" + struct.pack(">I", 16384) + b"O" + _tuple(b"1", b"old") + b"N" + _tuple(b"1", b"<u>")
    )
    assert isinstance(update, pgoutput.Update)
    assert update.old == ["1", "old"] and update.old_kind == "O"
    assert update.new == ["1", pgoutput.UNCHANGED]
    delete = pgoutput.decode(b"D" + struct.pack(">I", 16384) + b"K" + _tuple(b"1", None))
    assert delete == pgoutput.Delete(16384, ["1", None], "K")
    assert pgoutput.decode(b"Y" + struct.pack(">I", 1) + b"s\x00n\x00") is None
    with pytest.raises(pgoutput.ProtocolError):
        pgoutput.decode(b"I" + struct.pack(">I", 1) + b"N" + b"\x00")
    with pytest.raises(pgoutput.ProtocolError):
        pgoutput.decode(b"Z")
