"""Records that break mapping in ways no rule foresaw go to the DLQ; their neighbours apply.

Found in review: an epoch ``lastupdate`` far out of range raised ``OverflowError`` out of the
mapper, which stopped the apply thread before the acknowledgement, so the same record stopped
it again at every start and every later opt-out waited behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from optsync.apply.dlq import DeadLetterQueue, SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapped, Mapper, MappingRule
from optsync.apply.worker import ApplyWorker
from optsync.backends import mapping_rules
from optsync.cli import SAMPLE_RULE
from optsync.engine.models import ChannelType, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent, Op, position_of
from optsync.stream.memory import MemoryStream


def change(
    n: int, optin: int = 0, lastupdate: object = None, *, at: int = 0, **more: object
) -> ChangeEvent:
    row = {"userid": f"user{n}", "phone": f"+1206555{n:04d}", "optin": optin, **more}
    return ChangeEvent(
        op=Op.INSERT if not at else Op.UPDATE,
        table="optin_status",
        key={"rowid": n},
        position=position_of(at or n),
        after={**row, "lastupdate": lastupdate},
        before={**row, "lastupdate": lastupdate} if at else None,
        schema="main",
    )


NOTE_RULE = MappingRule(
    table="optin_status",
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    attributes=("note",),
)
"""The sample rule with an attribute, for values over Pinpoint's limits (100 characters)."""


class BrokenOnUser2(Mapper):
    """The real mapper, except that user2's record raises what no rule expects."""

    def map(self, event: ChangeEvent) -> Mapped:
        if event.after and event.after.get("userid") == "user2":
            raise RuntimeError("a defect in a mapping rule")
        return super().map(event)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[MemoryStream, SQLiteStore, DeadLetterQueue]]:
    stream, store, dlq = (
        MemoryStream(),
        SQLiteStore(tmp_path / "engine.db"),
        SQLiteDeadLetterQueue(":memory:"),
    )
    yield stream, store, dlq
    stream.close()
    store.close()
    dlq.close()


def opt_outs(store: SQLiteStore, app_id: str) -> dict[str, str]:
    rows = store._conn.execute(
        "SELECT id, opt_out FROM endpoints WHERE app_id = ?", (app_id,)
    ).fetchall()
    return dict(rows)


@pytest.mark.parametrize("lastupdate", [1.7e18, -1e17])  # nanoseconds; before year 1
def test_an_epoch_out_of_range_goes_to_the_dlq_and_the_rest_applies(
    parts: tuple[MemoryStream, SQLiteStore, DeadLetterQueue], lastupdate: float
) -> None:
    stream, store, dlq = parts
    app = store.create_app("a")
    worker = ApplyWorker(stream, Mapper(mapping_rules([SAMPLE_RULE])), store, app.id, dlq)
    stream.append([change(1), change(2, lastupdate=lastupdate), change(3)])

    assert worker.step(limit=10, wait=0) == 3
    assert opt_outs(store, app.id) == {
        "user1_+12065550001": OptOut.ALL.value,
        "user3_+12065550003": OptOut.ALL.value,
    }
    (entry,) = dlq.list()
    assert entry.stream_offset == 2
    assert "'lastupdate'" in entry.reason and "epoch time" in entry.reason
    assert stream.stats().consumers == {"apply": 3}


def test_an_unexpected_mapping_failure_goes_to_the_dlq_and_the_rest_applies(
    parts: tuple[MemoryStream, SQLiteStore, DeadLetterQueue],
) -> None:
    stream, store, dlq = parts
    app = store.create_app("a")
    worker = ApplyWorker(stream, BrokenOnUser2(mapping_rules([SAMPLE_RULE])), store, app.id, dlq)
    stream.append([change(1), change(2), change(3)])

    assert worker.step(limit=10, wait=0) == 3
    assert sorted(opt_outs(store, app.id)) == ["user1_+12065550001", "user3_+12065550003"]
    (entry,) = dlq.list()
    assert entry.stream_offset == 2
    assert "RuntimeError" in entry.reason and "report it as a defect" in entry.reason
    assert worker.stats.dead == 1


def test_an_opt_out_the_engine_refuses_still_opts_the_endpoint_out(
    parts: tuple[MemoryStream, SQLiteStore, DeadLetterQueue],
) -> None:
    """A value over Pinpoint's limits (an attribute of 150 characters) makes the engine refuse
    the whole change; its opt-out is applied alone and the record waits in the DLQ."""
    stream, store, dlq = parts
    app = store.create_app("a")
    worker = ApplyWorker(stream, Mapper([NOTE_RULE]), store, app.id, dlq)
    endpoint = "user1_+12065550001"
    stream.append([change(1, optin=1, note="short")])
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {endpoint: OptOut.NONE.value}

    stream.append([change(1, optin=0, note="x" * 150, at=20)])
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {endpoint: OptOut.ALL.value}
    held = store.get_endpoint(app.id, endpoint)
    assert held.source_position == position_of(20)
    assert held.attributes == {"note": ("short",)}  # the rest of the change is not applied
    (entry,) = dlq.list()
    assert "OptOut ALL holds, applied alone" in entry.reason

    stream.append([change(1, optin=0, note="x" * 150, at=10)])  # an older change: no effect
    stream.append([change(1, optin=1, note="back", at=30)])  # a newer one applies whole
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {endpoint: OptOut.NONE.value}
    assert store.get_endpoint(app.id, endpoint).attributes == {"note": ("back",)}


def test_a_refused_opt_out_of_an_endpoint_that_does_not_exist_creates_nothing(
    parts: tuple[MemoryStream, SQLiteStore, DeadLetterQueue],
) -> None:
    stream, store, dlq = parts
    app = store.create_app("a")
    worker = ApplyWorker(stream, Mapper([NOTE_RULE]), store, app.id, dlq)
    stream.append([change(1, optin=0, note="x" * 150)])
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {}
    (entry,) = dlq.list()
    assert "applied alone" not in entry.reason


def test_a_refused_address_change_with_an_opt_out_still_removes_the_old_endpoint(
    parts: tuple[MemoryStream, SQLiteStore, DeadLetterQueue],
) -> None:
    """Found in review: the opt-out was applied alone but not the delete of the endpoint the
    address change leaves behind, so the old number stayed opted in."""
    stream, store, dlq = parts
    app = store.create_app("a")
    worker = ApplyWorker(stream, Mapper([NOTE_RULE]), store, app.id, dlq)
    stream.append([change(1, optin=1, note="short")])
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {"user1_+12065550001": OptOut.NONE.value}

    before = {"userid": "user1", "phone": "+12065550001", "optin": 1, "note": "short"}
    after = {"userid": "user1", "phone": "+12065550099", "optin": 0, "note": "x" * 150}
    moved = ChangeEvent(
        op=Op.UPDATE,
        table="optin_status",
        key={"rowid": 1},
        position=position_of(20),
        before={**before, "lastupdate": None},
        after={**after, "lastupdate": None},
        schema="main",
    )
    stream.append([moved])
    worker.step(limit=10, wait=0)
    assert opt_outs(store, app.id) == {}  # the old number is gone; the new one never existed
    (entry,) = dlq.list()
    assert entry.stream_offset == 2
