"""``optsync.reconcile`` without a server: the comparison, the repair position's order against
every source's positions, and a whole run over a reader of rows in memory and a SQLite engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from optsync.apply.mapping import Mapper, MappingRule
from optsync.capture.mysql.position import load_position as mysql_load
from optsync.capture.mysql.position import row_position
from optsync.capture.postgres.position import load_position as pg_load
from optsync.capture.postgres.position import log_position
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointPatch,
    EndpointStatus,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent, Op, Row, position_of
from optsync.reconcile import (
    REPAIR_SUFFIX,
    DriftKind,
    SourceReader,
    TableRef,
    reconcile,
    repair,
)
from optsync.reconcile.compare import mysql_lineage

RULE = MappingRule(table="optin_status", address="phone", user_id="userid", opt_in="optin")
TABLE = TableRef("main", "optin_status", keyed=True)
API = Cause(CauseKind.API, "req-1")


class MemoryReader(SourceReader):
    """Rows keyed by ``id``; ``seq`` plays the log's position."""

    def __init__(self, rows: dict[int, dict[str, object]]) -> None:
        self.name = "memory"
        self.rows = rows
        self.seq = 10
        self.reads_again: list[Row] = []
        self.between: dict[int, dict[str, object] | None] = {}
        """Changes made after the first pass, before the re-check (a row changing meanwhile)."""

    def _event(self, key: int) -> ChangeEvent:
        return ChangeEvent(
            Op.LOAD, TABLE.name, {"id": key}, "", after=self.rows[key], schema=TABLE.schema
        )

    def tables(self) -> Sequence[TableRef]:
        return [TABLE]

    def count(self, table: TableRef) -> int | None:
        return len(self.rows)

    def chunks(self, table: TableRef, size: int) -> Iterator[list[ChangeEvent]]:
        keys = sorted(self.rows)
        for start in range(0, len(keys), size):
            yield [self._event(k) for k in keys[start : start + size]]

    def row(self, table: TableRef, key: Row) -> ChangeEvent | None:
        for k, row in self.between.items():
            if row is None:
                self.rows.pop(k, None)
            else:
                self.rows[k] = row
        self.between = {}
        self.reads_again.append(key)
        found = key["id"]
        assert isinstance(found, int)
        return self._event(found) if found in self.rows else None

    def position(self, lineage: int | None) -> str:
        return position_of(self.seq)

    def close(self) -> None:
        pass


def user(n: int, optin: int = 1, phone: str | None = None) -> dict[str, object]:
    return {"userid": f"user{n}", "phone": phone or f"+1234111111{n}", "optin": optin}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    made = SQLiteStore(tmp_path / "engine.db")
    yield made
    made.close()


def load(store: SQLiteStore, app_id: str, reader: MemoryReader, at: int = 5) -> None:
    """What capture and apply made of the rows: loads at position ``at``."""
    mapper = Mapper([RULE])
    writes = []
    for events in reader.chunks(TABLE, 100):
        for event in events:
            moved = ChangeEvent(
                event.op, event.table, event.key, position_of(at), after=event.after
            )
            writes.extend(mapper.map(moved).writes)
    store.write_endpoints(app_id, writes, Cause(CauseKind.SOURCE, position_of(at)))


def test_repair_position_sorts_between_the_log_positions_around_it() -> None:
    now = position_of(42) + REPAIR_SUFFIX
    assert position_of(42) < now < position_of(43)
    assert position_of(42) + ".1" < now  # a restarted snapshot's loads at the same change
    lineage = 1_700_000_000
    mysql = mysql_load(lineage, "mysql-bin.000007", 1200) + REPAIR_SUFFIX
    assert mysql_load(lineage, "mysql-bin.000007", 1200) < mysql
    assert row_position(lineage, 7, 1100, 3) < mysql < row_position(lineage, 7, 1300, 0)
    assert mysql < mysql_load(lineage, "mysql-bin.000008", 4)
    assert mysql < row_position(lineage + 1, 1, 4, 0)  # a new lineage outranks it
    assert mysql_lineage(mysql) == lineage
    assert mysql_lineage(position_of(42)) is None
    lsn = (0x1A << 32) | 0x2B3C4D50
    pg = pg_load(lsn) + REPAIR_SUFFIX
    assert pg_load(lsn) < pg and pg_load(lsn, row=12) < pg  # keyless loads at that point
    assert log_position(lsn - 1, 99) < pg < log_position(lsn, 1)


def test_finds_each_kind_and_repair_removes_it(store: SQLiteStore) -> None:
    app_id = store.create_app("optin-demo").id
    reader = MemoryReader({n: user(n) for n in range(1, 7)})
    load(store, app_id, reader)
    mapper = Mapper([RULE])
    assert not reconcile(store, app_id, reader, mapper, chunk=2).drifts

    store.write_endpoints(app_id, [EndpointPatch("user1_+12341111111", opt_out=OptOut.ALL)], API)
    # user2 INACTIVE while nobody holds its number (as a store written before the fallback
    # rule may hold it: now an endpoint that leaves the number hands it back to user2).
    store.write_endpoints(
        app_id, [EndpointPatch("x", ChannelType.SMS, address="+12341111112")], API
    )
    store.delete_endpoint(app_id, "x", API)
    assert store.get_endpoint(app_id, "user2_+12341111112").endpoint_status is EndpointStatus.ACTIVE
    store.write_endpoints(
        app_id,
        [EndpointPatch("user2_+12341111112", endpoint_status=EndpointStatus.INACTIVE)],
        API,
    )
    store.write_endpoints(
        app_id, [EndpointPatch("api-only", ChannelType.SMS, address="+1555")], API
    )
    reader.rows[3] = user(3, optin=0)
    reader.rows[4] = user(4, phone="+12349999994")
    del reader.rows[5]
    reader.rows[7] = user(7)

    report = reconcile(store, app_id, reader, mapper, chunk=2)
    kinds = {d.endpoint_id: d.kinds for d in report.drifts}
    assert kinds == {
        "user1_+12341111111": (DriftKind.OPT_OUT,),
        "user2_+12341111112": (DriftKind.INACTIVE,),
        "user3_+12341111113": (DriftKind.OPT_OUT,),
        "user4_+12341111114": (DriftKind.EXTRA,),  # the old address's endpoint
        "user4_+12349999994": (DriftKind.MISSING,),
        "user5_+12341111115": (DriftKind.EXTRA,),
        "user7_+12341111117": (DriftKind.MISSING,),
    }
    assert len(report.drifts) == 7
    assert report.position == position_of(10) + REPAIR_SUFFIX

    result = repair(store, app_id, report)
    assert (result.written, result.stale) == (7, 0)
    assert not reconcile(store, app_id, reader, mapper, chunk=2).drifts
    user2 = store.get_endpoint(app_id, "user2_+12341111112")
    assert user2.eligible
    assert store.get_endpoint(app_id, "api-only").address == "+1555"  # not the source's


def test_a_row_changing_during_the_run_is_not_drift(store: SQLiteStore) -> None:
    app_id = store.create_app("optin-demo").id
    reader = MemoryReader({n: user(n) for n in range(1, 4)})
    load(store, app_id, reader)
    reader.rows[2] = user(2, optin=0)  # the pass sees the change; capture has not applied it
    # ...which capture applies before the re-check reads the row and the endpoint again:
    change = EndpointPatch("user2_+12341111112", opt_out=OptOut.ALL, position=position_of(8))
    reader.between = {2: user(2, optin=0)}
    real_row = reader.row

    def row_then_apply(table: TableRef, key: Row) -> ChangeEvent | None:
        store.write_endpoints(app_id, [change], Cause(CauseKind.SOURCE, position_of(8)))
        return real_row(table, key)

    reader.row = row_then_apply  # type: ignore[method-assign]
    report = reconcile(store, app_id, reader, Mapper([RULE]))
    assert report.drifts == []
    assert report.changing == 1


def test_a_later_change_wins_over_a_repair(store: SQLiteStore) -> None:
    app_id = store.create_app("optin-demo").id
    reader = MemoryReader({1: user(1)})
    load(store, app_id, reader, at=10)  # the engine holds the log's current position
    store.write_endpoints(app_id, [EndpointPatch("user1_+12341111111", opt_out=OptOut.ALL)], API)
    report = reconcile(store, app_id, reader, Mapper([RULE]))
    assert repair(store, app_id, report).written == 1  # newer than position 10 itself
    assert store.get_endpoint(app_id, "user1_+12341111111").opt_out is OptOut.NONE
    later = EndpointPatch("user1_+12341111111", opt_out=OptOut.ALL, position=position_of(11))
    applied = store.write_endpoints(app_id, [later], Cause(CauseKind.SOURCE, position_of(11)))
    assert applied.applied == 1
    assert store.get_endpoint(app_id, "user1_+12341111111").opt_out is OptOut.ALL


def test_an_end_users_own_opt_out_is_not_drift(store: SQLiteStore) -> None:
    app_id = store.create_app("optin-demo").id
    reader = MemoryReader({1: user(1)})
    load(store, app_id, reader)
    store.record_end_user_opt_out(app_id, "+12341111111", "2026-01-01T00:00:00.000Z", "test")
    assert store.get_endpoint(app_id, "user1_+12341111111").opt_out is OptOut.ALL
    report = reconcile(store, app_id, reader, Mapper([RULE]))
    assert report.drifts == []
    assert report.held_by_end_user == 1


def test_address_and_user_id_drift_under_an_id_template_without_them(store: SQLiteStore) -> None:
    rule = MappingRule(
        table="optin_status", address="phone", user_id="userid", opt_in="optin", endpoint_id="e{id}"
    )
    app_id = store.create_app("optin-demo").id
    reader = MemoryReader({n: {**user(n), "id": n} for n in (1, 2)})
    mapper = Mapper([rule])
    writes = [
        w
        for events in reader.chunks(TABLE, 10)
        for e in events
        for w in mapper.map(ChangeEvent(e.op, e.table, e.key, position_of(5), after=e.after)).writes
    ]
    store.write_endpoints(app_id, writes, Cause(CauseKind.SOURCE, position_of(5)))
    store.write_endpoints(app_id, [EndpointPatch("e1", address="+12345550001")], API)
    store.write_endpoints(app_id, [EndpointPatch("e2", user_id="someone-else")], API)
    report = reconcile(store, app_id, reader, mapper)
    assert {d.endpoint_id: d.kinds for d in report.drifts} == {
        "e1": (DriftKind.ADDRESS,),
        "e2": (DriftKind.USER_ID,),
    }
    assert repair(store, app_id, report).written == 2
    assert store.get_endpoint(app_id, "e1").address == "+12341111111"
    assert store.get_endpoint(app_id, "e2").user_id == "user2"
    assert not reconcile(store, app_id, reader, mapper).drifts
