"""``EndpointStore.import_endpoints`` on every backend: the bulk path ends where
``write_endpoints`` ends (endpoints, consent history, estimates), keeps end users' holds, updates
existing endpoints by the normal rules, and writes all or nothing."""

from __future__ import annotations

import dataclasses

import pytest

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    Demographic,
    Endpoint,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.segments import definition_from_wire
from optsync.engine.sql_bulk import IMPORT_CHUNK
from optsync.engine.store import EndpointStore
from optsync.errors import InvalidRequest

IMPORT = Cause(CauseKind.IMPORT, "export.json.gz", "test import")


def _patches(n: int) -> list[EndpointPatch]:
    out = []
    for i in range(n):
        sms = i % 2 == 0
        out.append(
            EndpointPatch(
                id=f"ep-{i}",
                channel_type=ChannelType.SMS if sms else ChannelType.EMAIL,
                address=f"+1206555{i:04d}" if sms else f"user{i}@example.com",
                opt_out=OptOut.ALL if i % 3 == 0 else OptOut.NONE,
                endpoint_status=EndpointStatus.INACTIVE if i % 5 == 0 else None,
                effective_date="2025-06-01T10:00:00.000Z",
                request_id=f"req-{i}",
                user_id=f"user-{i}" if i % 4 else None,
                user_attributes={"plan": ("gold", "trial")} if i % 4 else None,
                attributes={"source": ("pinpoint",)},
                metrics={"score": float(i % 7)},
                demographic=Demographic(platform="ios") if i % 6 == 0 else None,
                # Every other SMS endpoint has no Country: the engine derives it from the number.
                location=Location(country="US", city="Seattle") if i % 4 == 2 else None,
            )
        )
    return out


def _comparable(e: Endpoint) -> Endpoint:
    return dataclasses.replace(e, app_id="", creation_date="", cohort_id="")


def _state(store: EndpointStore, app_id: str) -> dict[str, Endpoint]:
    return {e.id: _comparable(e) for e in store.iter_endpoints(app_id)}


def _history(store: EndpointStore, app_id: str, endpoint_id: str) -> list[tuple[object, ...]]:
    return [
        (c.opt_out_before, c.opt_out_after, c.address, c.cause, c.channel_type, c.user_id)
        for c in store.consent_history(app_id, endpoint_id)
    ]


def test_import_of_new_endpoints_ends_as_write_endpoints_does(store: EndpointStore) -> None:
    patches = _patches(60)
    written = store.create_app("written").id
    imported = store.create_app("imported").id
    store.write_endpoints(written, patches, IMPORT)
    result = store.import_endpoints(imported, patches, IMPORT)
    assert result.applied == len(patches)
    assert _state(store, imported) == _state(store, written)
    for p in patches:
        assert _history(store, imported, p.id) == _history(store, written, p.id)
    segment = definition_from_wire(
        {
            "Name": "us",
            "Dimensions": {
                "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}}
            },
        },
        require_name=True,
    )
    a = store.create_segment(written, segment)
    b = store.create_segment(imported, segment)
    assert store.estimate(imported, b.id) == store.estimate(written, a.id)
    assert store.estimate(imported, b.id).total == 30  # every SMS endpoint: given or derived


def test_each_line_can_carry_its_own_cause(store: EndpointStore) -> None:
    app_id = store.create_app("app").id
    patches = _patches(3)
    causes = [Cause(CauseKind.IMPORT, f"export.json.gz:{n + 1}", "test import") for n in range(3)]
    store.import_endpoints(app_id, list(zip(patches, causes, strict=True)), IMPORT)
    for patch, cause in zip(patches, causes, strict=True):
        (change,) = store.consent_history(app_id, patch.id)
        assert change.cause == cause
        assert change.opt_out_after is patch.opt_out


def test_an_end_users_stop_is_not_lifted_by_an_import(store: EndpointStore) -> None:
    app_id = store.create_app("app").id
    number = "+12065550100"
    store.write_endpoints(
        app_id, [EndpointPatch("held", ChannelType.SMS, number, OptOut.NONE)], IMPORT
    )
    store.record_end_user_opt_out(app_id, number, "2026-01-01T00:00:00.000Z", "eum-sms:Default")
    store.import_endpoints(
        app_id, [EndpointPatch("held", ChannelType.SMS, number, OptOut.NONE)], IMPORT
    )
    assert store.get_endpoint(app_id, "held").opt_out is OptOut.ALL


def test_existing_endpoints_are_updated_by_the_normal_rules(store: EndpointStore) -> None:
    app_id = store.create_app("app").id
    store.write_endpoints(
        app_id,
        [
            EndpointPatch("old", ChannelType.SMS, "+12065550101", attributes={"a": ("1",)}),
            EndpointPatch("peer", ChannelType.SMS, "+12065550102"),
        ],
        IMPORT,
    )
    store.import_endpoints(
        app_id,
        [
            EndpointPatch("old", attributes={"b": ("2",)}, opt_out=OptOut.ALL),
            # A new endpoint at the peer's address: the peer goes INACTIVE, as UpdateEndpoint does.
            EndpointPatch("new", ChannelType.SMS, "+12065550102"),
        ],
        IMPORT,
    )
    old = store.get_endpoint(app_id, "old")
    assert dict(old.attributes) == {"a": ("1",), "b": ("2",)}
    assert old.opt_out is OptOut.ALL
    assert store.get_endpoint(app_id, "peer").endpoint_status is EndpointStatus.INACTIVE
    assert store.get_endpoint(app_id, "new").endpoint_status is EndpointStatus.ACTIVE
    assert [c.opt_out_after for c in store.consent_history(app_id, "old")] == [
        OptOut.NONE,
        OptOut.ALL,
    ]


def test_a_failing_line_leaves_nothing_written(store: EndpointStore) -> None:
    app_id = store.create_app("app").id
    good = _patches(IMPORT_CHUNK + 10)
    # Past the first chunk: a new endpoint without ChannelType is refused by the engine.
    bad = [*good, EndpointPatch("no-channel", address="+12065550199")]
    with pytest.raises(InvalidRequest, match="ChannelType"):
        store.import_endpoints(app_id, bad, IMPORT)
    assert store.count_endpoints(app_id) == 0


def test_rows_built_for_repeated_values_match_write_endpoints(store: EndpointStore) -> None:
    # The bulk path memoizes what repeats across lines (a map's JSON, a value read as a date):
    # attribute and metric rows must count exactly as the normal path's.
    patches = [
        EndpointPatch(
            f"ep-{i}",
            ChannelType.SMS,
            f"+1206555{i:04d}",
            OptOut.ALL if i % 5 == 0 else OptOut.NONE,
            effective_date="2025-06-01T10:00:00.000Z",
            request_id=f"req-{i}",
            attributes={"signup": (f"2025-06-0{i % 3 + 1}T00:00:00Z",), "plan": ("gold", "gold")},
            user_attributes={"tier": (str(i % 2),)},
            # 1 and 1.0 are equal keys of a memo but not the same JSON.
            metrics={"score": i % 2 if i % 4 else float(i % 2)},
        )
        for i in range(40)
    ]
    written = store.create_app("written").id
    imported = store.create_app("imported").id
    store.write_endpoints(written, patches, IMPORT)
    store.import_endpoints(imported, patches, IMPORT)
    assert _state(store, imported) == _state(store, written)
    for dimensions in (
        {"Attributes": {"signup": {"Values": ["2025-06-01T12:00:00Z"], "AttributeType": "AFTER"}}},
        {"Attributes": {"plan": {"Values": ["gold"]}}},
        {"UserAttributes": {"tier": {"Values": ["1"]}}},
        {"Metrics": {"score": {"ComparisonOperator": "GREATER_THAN", "Value": 0.5}}},
    ):
        segment = definition_from_wire({"Name": "s", "Dimensions": dimensions}, require_name=True)
        a = store.create_segment(written, segment)
        b = store.create_segment(imported, segment)
        assert store.estimate(imported, b.id) == store.estimate(written, a.id)
        assert store.estimate(imported, b.id).total > 0


def test_a_new_endpoint_at_a_held_address_ends_as_write_endpoints_does(
    store: EndpointStore,
) -> None:
    # A new endpoint at the address of an end user's STOP (held addresses are read once per
    # import): the same end as write_endpoints, and the held endpoint stays opted out.
    number = "+12065550100"
    ends = []
    for name in ("written", "imported"):
        app_id = store.create_app(name).id
        held = EndpointPatch(
            "held",
            ChannelType.SMS,
            number,
            OptOut.NONE,
            # INACTIVE: only the hold, not an ACTIVE endpoint, marks the address as taken.
            endpoint_status=EndpointStatus.INACTIVE,
            effective_date="2025-06-01T10:00:00.000Z",
            request_id="req-held",
        )
        store.write_endpoints(app_id, [held], IMPORT)
        store.record_end_user_opt_out(app_id, number, "2026-01-01T00:00:00.000Z", "eum-sms:x")
        patches = [
            *_patches(3),
            EndpointPatch(
                "newcomer",
                ChannelType.SMS,
                number,
                OptOut.NONE,
                effective_date="2025-06-01T10:00:00.000Z",
                request_id="req-newcomer",
            ),
        ]
        if name == "written":
            store.write_endpoints(app_id, patches, IMPORT)
        else:
            store.import_endpoints(app_id, patches, IMPORT)
        # The held endpoint's EffectiveDate is the time of the write that deactivates it.
        state = {
            k: dataclasses.replace(e, effective_date="") for k, e in _state(store, app_id).items()
        }
        ends.append(
            (
                state,
                _history(store, app_id, "held"),
                _history(store, app_id, "newcomer"),
            )
        )
    assert ends[1] == ends[0]
    assert ends[1][0]["held"].opt_out is OptOut.ALL
