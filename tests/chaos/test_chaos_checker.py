"""The chaos checker itself: it must see a lost endpoint, a divergent one and a history out of
source order, or a clean chaos run would prove nothing. Fast: an in-memory SQLite engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from harness import APP, Figures, check_history, differences, history_problem

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    ConsentChange,
    EndpointDelete,
    EndpointPatch,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore


def change(seq: int, position: str, after: OptOut | None) -> ConsentChange:
    return ConsentChange(
        endpoint_id="u1_+12065550001",
        at="2026-12-03T00:00:00.000Z",
        opt_out_before=None,
        opt_out_after=after,
        address="+12065550001",
        cause=Cause(CauseKind.SOURCE, position),
        seq=seq,
    )


def test_a_history_in_source_order_passes() -> None:
    history = [change(1, "a1", OptOut.NONE), change(2, "a2", OptOut.ALL), change(3, "a3", None)]
    assert history_problem(history) is None


def test_a_position_recorded_twice_or_backwards_is_out_of_order() -> None:
    assert history_problem([change(1, "a2", OptOut.ALL), change(2, "a2", OptOut.ALL)])
    assert history_problem([change(1, "a2", OptOut.ALL), change(2, "a1", OptOut.ALL)])


def test_an_older_opt_in_after_a_newer_opt_out_is_out_of_order() -> None:
    problem = history_problem([change(1, "a5", OptOut.ALL), change(2, "a3", OptOut.NONE)])
    assert problem is not None and "OptOut NONE at a3" in problem


def test_entries_are_judged_by_seq_and_other_causes_are_ignored() -> None:
    api = ConsentChange(
        endpoint_id="u1_+12065550001",
        at="2026-12-03T00:00:00.000Z",
        opt_out_before=OptOut.NONE,
        opt_out_after=OptOut.ALL,
        address=None,
        cause=Cause(CauseKind.API, "zzz-request"),
        seq=2,
    )
    history = [change(3, "a2", OptOut.NONE), api, change(1, "a1", OptOut.ALL)]
    assert history_problem(history) is None


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    made = SQLiteStore(":memory:")
    try:
        yield made
    finally:
        made.close()


def test_differences_name_lost_and_divergent_endpoints(store: SQLiteStore) -> None:
    app = store.create_app(APP)
    cause = Cause(CauseKind.SOURCE, "p1")

    def patch(key: str, address: str, opt_out: OptOut, user: str, position: str) -> EndpointPatch:
        return EndpointPatch(
            id=key,
            channel_type=ChannelType.SMS,
            address=address,
            opt_out=opt_out,
            user_id=user,
            position=position,
        )

    store.write_endpoints(
        app.id,
        [
            patch("u1_+12065550001", "+12065550001", OptOut.NONE, "u1", "p1"),
            patch("u2_+12065550002", "+12065550002", OptOut.NONE, "u2", "p2"),
            patch("u3_+12065550003", "+12065550033", OptOut.ALL, "u33", "p3"),
            patch("u9_+12065550009", "+12065550009", OptOut.ALL, "u9", "p4"),
        ],
        cause,
    )
    source = {
        "u1_+12065550001": ("u1", "+12065550001", 1),
        "u2_+12065550002": ("u2", "+12065550002", 0),  # opted out in the source
        "u3_+12065550003": ("u3", "+12065550003", 0),
        "u4_+12065550004": ("u4", "+12065550004", 1),  # never arrived
    }
    lost, divergent = differences(source, store)
    assert sorted(lost) == ["u4_+12065550004: no endpoint", "u9_+12065550009: no source row"]
    assert divergent == [
        "u2_+12065550002: OptOut NONE but optin=0",
        "u3_+12065550003: the address differs",
        "u3_+12065550003: UserId u33 but userid=u3",
    ]
    store.write_endpoints(app.id, [EndpointDelete(id="u9_+12065550009", position="p5")], cause)
    store.write_endpoints(
        app.id,
        [
            patch("u2_+12065550002", "+12065550002", OptOut.ALL, "u2", "p6"),
            patch("u3_+12065550003", "+12065550003", OptOut.ALL, "u3", "p7"),
        ],
        cause,
    )
    clean = {k: v for k, v in source.items() if k != "u4_+12065550004"}
    assert differences(clean, store) == ([], [])
    problems, entries = check_history(store, set(clean) | {"u9_+12065550009"})
    assert problems == [] and entries >= 5


@pytest.mark.parametrize(
    ("exit_code", "said", "agrees"),
    [
        (0, "reconcile: 9 source rows, 9 engine endpoints: 0 drifting; 0 changing", True),
        (1, "reconcile: 9 source rows, 9 engine endpoints: 1 drifting (inactive 1); 0", False),
        (
            1,
            "reconcile: 9 source rows, 9 engine endpoints: 3 drifting (missing 1, opt_out 2)",
            False,
        ),
        (1, "reconcile: 9 source rows: 2 drifting (inactive 1, opt_out 1); 0 changing", False),
        (2, "Error: no app", False),
    ],
)
def test_reconcile_agrees_only_without_real_drift(exit_code: int, said: str, agrees: bool) -> None:
    figures = Figures(reconcile_exit=exit_code, reconcile_said=said)
    assert figures.reconcile_agrees is agrees
    assert figures.clean is agrees
    assert not dataclasses.replace(figures, reconcile_exit=0, inactive=1).clean
