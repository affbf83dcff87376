"""The consent ledger's contract (``optsync.engine.ledger``), on every store backend.

End users' own opt-outs and the rule that only an explicit new opt-in lifts them; the history
as an outbox (seq order, address changes, source commit times); sinks' cursors, deliveries,
dead letters, waits and leases; overdue opt-outs and the audit trail.
"""

from __future__ import annotations

import time

import pytest

from optsync.engine.ledger import Delivered, SinkProgress, SinkWaiting
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointDelete,
    EndpointPatch,
    OptOut,
)
from optsync.engine.store import EndpointStore

SOURCE = Cause(CauseKind.SOURCE, "")
API = Cause(CauseKind.API, "req-1", "key AKIDEXAMPLE")
NUMBER = "+12065550101"
STOP_AT = "2026-12-01T10:00:00.000Z"


@pytest.fixture
def app_id(store: EndpointStore) -> str:
    return store.create_app("ledger").id


def source(
    store: EndpointStore,
    app_id: str,
    position: str,
    opt_out: OptOut | None,
    *,
    at: str | None = None,
    endpoint: str = "u1",
    address: str = NUMBER,
) -> None:
    """A captured change of the user's row: its opt-in column read as ``opt_out``."""
    store.write_endpoints(
        app_id,
        [
            EndpointPatch(
                id=endpoint,
                channel_type=ChannelType.SMS,
                address=address,
                opt_out=opt_out,
                user_id=endpoint,
                position=position,
                source_time=at,
            )
        ],
        SOURCE,
    )


def opt_out(store: EndpointStore, app_id: str, endpoint: str = "u1") -> OptOut:
    return store.get_endpoint(app_id, endpoint).opt_out


# end users' opt-outs ---------------------------------------------------------------------------


def test_a_stop_opts_out_every_endpoint_at_the_number_and_is_recorded_once(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.NONE, at="2026-11-30T00:00:00.000Z")
    store.write_endpoints(
        app_id,
        [
            EndpointPatch(id="v1", channel_type=ChannelType.VOICE, address=NUMBER),
            EndpointPatch(id="e1", channel_type=ChannelType.EMAIL, address="a@example.com"),
        ],
        API,
    )
    report = store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default", "STOP")
    assert report is not None
    assert set(report.endpoint_ids) == {"u1", "v1"}
    assert opt_out(store, app_id, "u1") is OptOut.ALL
    assert opt_out(store, app_id, "v1") is OptOut.ALL
    assert opt_out(store, app_id, "e1") is OptOut.NONE
    last = store.consent_history(app_id, "u1")[-1]
    assert last.cause.kind is CauseKind.END_USER
    assert last.cause.ref == "eum-sms:Default"
    assert "STOP" in last.cause.detail
    # The same report again (a second poll) changes nothing.
    assert store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default") is None
    assert store.known_end_user_opt_outs(app_id, "eum-sms:Default") == {(NUMBER, STOP_AT)}
    assert [r.address for r in store.end_user_opt_outs(app_id, pending_writeback=True)] == [NUMBER]
    store.mark_written_back(report.seq, "2026-12-01T10:00:01.000Z")
    assert store.end_user_opt_outs(app_id, pending_writeback=True) == []


def test_a_stale_opted_in_column_does_not_resubscribe_a_person_who_said_stop(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.NONE, at="2026-11-30T00:00:00.000Z")
    store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default")
    # The application writes the row again (another column) with its stale "opted in".
    source(store, app_id, "002", OptOut.NONE, at="2026-12-02T00:00:00.000Z")
    assert opt_out(store, app_id) is OptOut.ALL
    assert store.get_endpoint(app_id, "u1").source_position == "002"  # the rest applied
    # An API write without a reason does not either.
    store.write_endpoints(app_id, [EndpointPatch(id="u1", opt_out=OptOut.NONE)], API)
    assert opt_out(store, app_id) is OptOut.ALL


def test_the_opt_in_column_turning_on_after_the_stop_is_an_explicit_opt_in(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.NONE, at="2026-11-30T00:00:00.000Z")
    store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default")
    source(store, app_id, "002", OptOut.ALL, at="2026-12-02T00:00:00.000Z")
    assert opt_out(store, app_id) is OptOut.ALL
    source(store, app_id, "003", OptOut.NONE, at="2026-12-02T00:01:00.000Z")
    assert opt_out(store, app_id) is OptOut.NONE
    last = store.consent_history(app_id, "u1")[-1]
    assert last.opt_out_after is OptOut.NONE
    assert "explicit opt-in" in last.cause.detail
    # Lifted: the column's next change acts as usual.
    source(store, app_id, "004", OptOut.ALL, at="2026-12-02T00:02:00.000Z")
    source(store, app_id, "005", OptOut.NONE, at="2026-12-02T00:03:00.000Z")
    assert opt_out(store, app_id) is OptOut.NONE


def test_a_flip_committed_before_the_stop_but_applied_after_it_does_not_lift_it(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.NONE, at="2026-11-30T00:00:00.000Z")
    store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default")
    # Capture was behind: these two were committed before the person texted STOP.
    source(store, app_id, "002", OptOut.ALL, at="2026-12-01T09:00:00.000Z")
    source(store, app_id, "003", OptOut.NONE, at="2026-12-01T09:30:00.000Z")
    assert opt_out(store, app_id) is OptOut.ALL


def test_an_api_opt_in_with_its_reason_lifts_the_stop(store: EndpointStore, app_id: str) -> None:
    source(store, app_id, "001", OptOut.NONE)
    store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default")
    store.write_endpoints(
        app_id,
        [EndpointPatch(id="u1", opt_out=OptOut.NONE, opt_in_reason="texted START")],
        API,
    )
    assert opt_out(store, app_id) is OptOut.NONE
    assert "texted START" in store.consent_history(app_id, "u1")[-1].cause.detail


def test_a_new_address_ends_the_hold_and_a_delete_keeps_the_history(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.NONE)
    store.record_end_user_opt_out(app_id, NUMBER, STOP_AT, "eum-sms:Default")
    source(store, app_id, "002", OptOut.NONE, address="+12065550199")
    endpoint = store.get_endpoint(app_id, "u1")
    assert (endpoint.address, endpoint.opt_out) == ("+12065550199", OptOut.NONE)
    moved = store.consent_history(app_id, "u1")[-1]
    assert (moved.address_before, moved.address) == (NUMBER, "+12065550199")
    store.write_endpoints(app_id, [EndpointDelete("u1", position="003")], SOURCE)
    history = store.consent_history(app_id, "u1")
    assert history[-1].opt_out_after is None
    assert len(history) == 4  # created, STOP, address change, delete


# the outbox ------------------------------------------------------------------------------------


def test_changes_come_in_seq_order_with_what_sinks_need(store: EndpointStore, app_id: str) -> None:
    source(store, app_id, "001", OptOut.NONE, at="2026-12-02T00:00:00.000Z")
    source(store, app_id, "002", OptOut.ALL, at="2026-12-02T00:00:01.000Z")
    source(store, app_id, "003", OptOut.ALL, endpoint="u2", address="+12065550102")
    changes = store.consent_changes(app_id, 0, 10)
    assert [c.seq for c in changes] == sorted(c.seq for c in changes)
    first, second, third = changes
    assert (first.opt_out_before, first.opt_out_after) == (None, OptOut.NONE)
    assert (second.opt_out_before, second.opt_out_after) == (OptOut.NONE, OptOut.ALL)
    assert second.source_time == "2026-12-02T00:00:01.000Z"
    assert second.cause.ref == "002"
    assert (second.channel_type, second.user_id, second.app_id) == (ChannelType.SMS, "u1", app_id)
    assert third.endpoint_id == "u2"
    assert second.change_id == f"{app_id}-{second.seq}"
    assert store.consent_changes(app_id, second.seq, 10) == [third]
    assert store.consent_changes(app_id, 0, 0, seqs=[third.seq]) == [third]


def test_a_lease_has_one_holder_until_it_runs_out(store: EndpointStore) -> None:
    assert store.claim_lease("sink:x", "a", 60)
    assert not store.claim_lease("sink:x", "b", 60)
    assert store.claim_lease("sink:x", "a", 60)  # renewed
    store.release_lease("sink:x", "a")
    assert store.claim_lease("sink:x", "b", 0.05)
    time.sleep(0.1)
    assert store.claim_lease("sink:x", "a", 60)


def test_sink_progress_moves_the_cursor_and_keeps_deliveries_dead_letters_and_waits(
    store: EndpointStore, app_id: str
) -> None:
    for n in range(1, 5):
        source(store, app_id, f"00{n}", OptOut.ALL if n % 2 else OptOut.NONE)
    seqs = [c.seq for c in store.consent_changes(app_id, 0, 10)]
    assert store.claim_lease("sink:s", "me", 60)
    progress = SinkProgress(
        app_id=app_id,
        cursor=seqs[-1],
        delivered=[(seqs[0], seqs[1], Delivered.SENT)],
        dead=[(seqs[2], "refused: 400")],
        waiting=[SinkWaiting("s", app_id, "k", seqs[3], time.time() + 60, "30-day rule", "t")],
    )
    assert not store.save_sink_progress("s", "someone else", progress)
    assert store.sink_cursor("s", app_id) == 0
    assert store.save_sink_progress("s", "me", progress)
    assert store.sink_cursor("s", app_id) == seqs[-1]
    (state,) = store.sink_states("s")
    assert (state.behind, state.dead_letters, state.waiting) == (0, 1, 1)
    assert [d.reason for d in store.sink_dead_letters("s")] == ["refused: 400"]
    assert [w.reason for w in store.sink_waiting("s")] == ["30-day rule"]
    rows = {r.change.seq: r for r in store.audit(["s"], app_id=app_id)}
    assert rows[seqs[0]].outcomes["s"] == "sent"
    assert rows[seqs[0]].deliveries["s"] is not None
    assert rows[seqs[2]].outcomes["s"] == "dead letter"
    assert rows[seqs[3]].outcomes["s"] == "waiting"
    assert store.retry_sink_dead_letters("s") == 1
    assert {w.key for w in store.sink_waiting("s")} == {"k", f"retry:{seqs[2]}"}


def test_overdue_counts_opt_outs_no_sink_delivered_in_time(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.ALL)
    source(store, app_id, "002", OptOut.NONE, endpoint="u2", address="+12065550102")
    later = "9999-01-01T00:00:00.000Z"
    sms = frozenset({ChannelType.SMS})
    assert store.overdue_opt_outs([("s", sms)], later) == 1  # the opt-in does not count
    assert store.overdue_opt_outs([("s", frozenset({ChannelType.EMAIL}))], later) == 0
    assert store.overdue_opt_outs([("s", sms)], "2000-01-01T00:00:00.000Z") == 0
    assert store.claim_lease("sink:s", "me", 60)
    head = store.consent_changes(app_id, 0, 10)[-1].seq
    store.save_sink_progress("s", "me", SinkProgress(app_id=app_id, cursor=head))
    assert store.overdue_opt_outs([("s", sms)], later) == 0


def test_deleting_an_app_keeps_its_consent_history_for_the_audit(
    store: EndpointStore, app_id: str
) -> None:
    source(store, app_id, "001", OptOut.ALL)
    store.delete_app(app_id)
    rows = list(store.audit([]))
    assert [r.change.app_id for r in rows] == [app_id]
