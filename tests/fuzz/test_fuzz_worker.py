"""The apply worker over a stream of fuzzed records: none lost, none stops it.

Every record ends in exactly one place: applied to the engine, skipped as a control record, or
in the DLQ with a reason; the consumer is acknowledged past the last one either way.
"""

from __future__ import annotations

import json

from fuzz_strategies import JSON, ROWS, SAMPLE_RULE, dms_records, dumps
from hypothesis import given, settings
from hypothesis import strategies as st

from optsync.apply.dlq import SQLiteDeadLetterQueue
from optsync.apply.mapping import Mapper, MappingError
from optsync.apply.worker import ApplyWorker
from optsync.engine.sqlite import SQLiteStore
from optsync.events import ChangeEvent, Op
from optsync.formats.dms import ControlRecord, FormatError, decode, encode
from optsync.stream.memory import MemoryStream


@st.composite
def sample_changes(draw: st.DrawFn) -> bytes:
    """A record optsync itself would write for the sample table (valid, or with odd values)."""
    op = draw(st.sampled_from(list(Op)))
    row = draw(ROWS)
    event = ChangeEvent(
        op=op,
        table="optin_status",
        key={"userid": row.get("userid")},
        position=f"{draw(st.integers(0, 10**6)):020d}",
        before=row if op is Op.DELETE else draw(st.one_of(st.none(), ROWS)),
        after=None if op is Op.DELETE else row,
        schema="main",
    )
    try:
        return encode(event)
    except FormatError:
        return dumps({"data": row})


RECORDS = st.one_of(
    sample_changes(),
    dms_records().map(dumps),
    JSON.map(dumps),
    st.binary(max_size=60),
    st.just(b"[" * 100_000),
)


def expected(data: bytes, offset: int) -> str:
    """What the worker must do with a record: control, dead, or apply (the engine may still
    refuse it, which makes it dead too)."""
    try:
        event = decode(data, fallback_position=f"{offset:020d}")
    except ControlRecord:
        return "control"
    except FormatError:
        return "dead"
    try:
        mapped = Mapper([SAMPLE_RULE]).map(event)
    except MappingError:
        return "dead"
    return "dead" if mapped.failed else "apply"


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(st.lists(RECORDS, min_size=1, max_size=12))
def test_every_record_is_applied_skipped_or_dead_lettered(records: list[bytes]) -> None:
    stream, store, dlq = MemoryStream(), SQLiteStore(":memory:"), SQLiteDeadLetterQueue(":memory:")
    try:
        app = store.create_app("fuzz")
        worker = ApplyWorker(stream, Mapper([SAMPLE_RULE]), store, app.id, dlq)
        head = stream.append_raw([(f"k{i}", data) for i, data in enumerate(records)])
        offsets = list(range(head - len(records) + 1, head + 1))

        handled = 0
        while handled < len(records):
            got = worker.step(limit=5, wait=0)
            assert got > 0
            handled += got

        dead = {entry.stream_offset: entry.reason for entry in dlq.list(limit=100)}
        assert len(dead) == len(dlq.list(limit=100))  # one entry per record at most
        assert all(reason.strip() for reason in dead.values())
        assert not [r for r in dead.values() if "report it as a defect" in r], dead
        plan = {
            offset: expected(data, offset) for offset, data in zip(offsets, records, strict=True)
        }
        controls = [o for o, what in plan.items() if what == "control"]
        assert worker.stats.control == len(controls)
        assert not set(controls) & set(dead)
        for offset, what in plan.items():
            if what == "dead":
                assert offset in dead, f"record {offset} is neither applied nor in the DLQ"
        assert worker.stats.records == len(records)
        assert stream.stats().consumers == {"apply": head}
    finally:
        stream.close()
        store.close()
        dlq.close()


def test_a_record_that_nests_too_deep_goes_to_the_dlq() -> None:
    """Found by the fuzzer: it raised RecursionError out of the decoder and stopped the worker
    at the same record on every start."""
    stream, store, dlq = MemoryStream(), SQLiteStore(":memory:"), SQLiteDeadLetterQueue(":memory:")
    try:
        app = store.create_app("fuzz")
        worker = ApplyWorker(stream, Mapper([SAMPLE_RULE]), store, app.id, dlq)
        surrogate = json.dumps({"data": {"userid": "\ud800"}}).encode()
        stream.append_raw([("a", b"[" * 100_000), ("b", surrogate)])
        assert worker.step(limit=10, wait=0) == 2
        reasons = [entry.reason for entry in dlq.list()]
        assert len(reasons) == 2
        assert "too deeply" in reasons[0]
        assert "lone UTF-16 surrogate" in reasons[1]
    finally:
        stream.close()
        store.close()
        dlq.close()
