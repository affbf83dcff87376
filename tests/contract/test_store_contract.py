"""The ``EndpointStore`` contract: every backend (see ``conftest.BACKENDS``) must pass all of it."""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pytest

from optsync.engine.endpoints import (
    MAX_ATTRIBUTE_NAME,
    MAX_ATTRIBUTE_VALUE,
    MAX_VALUES_PER_ATTRIBUTE,
    CountryDerivation,
    validate_patch,
)
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    ConsentChange,
    Demographic,
    Endpoint,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    Estimate,
    Location,
    OptOut,
    WriteResult,
)
from optsync.engine.segments import SegmentDefinition, definition_from_wire
from optsync.engine.sql import SqlStore, StoreSettings
from optsync.engine.store import EndpointStore, ImportDefinition, Segment
from optsync.engine.writes import WriteBatch
from optsync.errors import InvalidRequest, LimitExceeded, NotFound

StoreFactory = Callable[[StoreSettings], EndpointStore]  # the make_store fixture of conftest
API = Cause(CauseKind.API, "req-1")
US_NUMBER = "+12341111111"  # +1 234 is unassigned but of possible length
GB_NUMBER = "+447400123456"


def source(position: str) -> Cause:
    return Cause(CauseKind.SOURCE, position)


def sms(endpoint_id: str, address: str = US_NUMBER, **fields: Any) -> EndpointPatch:
    return EndpointPatch(id=endpoint_id, channel_type=ChannelType.SMS, address=address, **fields)


def write(
    store: EndpointStore,
    app_id: str,
    *writes: EndpointPatch | EndpointDelete,
    cause: Cause = API,
) -> WriteResult:
    return store.write_endpoints(app_id, list(writes), cause)


def definition(wire: Mapping[str, Any], name: str = "segment") -> SegmentDefinition:
    return definition_from_wire({"Name": name, **wire}, require_name=True)


def create_segment(
    store: EndpointStore, app_id: str, wire: Mapping[str, Any], name: str = "segment"
) -> Segment:
    return store.create_segment(app_id, definition(wire, name))


def country_segment(*codes: str, kind: str = "INCLUSIVE") -> dict[str, Any]:
    return {"Dimensions": {"Location": {"Country": {"DimensionType": kind, "Values": list(codes)}}}}


@pytest.fixture
def app_id(store: EndpointStore) -> str:
    return store.create_app("contract").id


# apps -----------------------------------------------------------------------------------------


def test_create_app_then_get_returns_it(store: EndpointStore) -> None:
    app = store.create_app("shop", {"team": "growth"})
    assert app.name == "shop"
    assert dict(app.tags) == {"team": "growth"}
    assert app.arn.endswith(f"apps/{app.id}")
    assert store.get_app(app.id) == app


def test_find_app_returns_oldest_with_that_name(store: EndpointStore) -> None:
    first = store.create_app("shop")
    # Creation dates have millisecond precision; apps of the same millisecond are unordered.
    time.sleep(0.003)
    store.create_app("shop")
    store.create_app("other")
    found = store.find_app("shop")
    assert found is not None
    assert found.id == first.id
    assert store.find_app("missing") is None


def test_list_apps_pages_through_every_app_once(store: EndpointStore) -> None:
    created = {store.create_app(f"app{i}").id for i in range(5)}
    seen: list[str] = []
    sizes: list[int] = []
    token: str | None = None
    for _ in range(10):
        page = store.list_apps(page_size=2, token=token)
        seen.extend(a.id for a in page.items)
        sizes.append(len(page.items))
        token = page.next_token
        if token is None:
            break
    assert sizes == [2, 2, 1]
    assert sorted(seen) == sorted(created)


def test_list_apps_refuses_a_foreign_token(store: EndpointStore) -> None:
    with pytest.raises(InvalidRequest):
        store.list_apps(page_size=2, token="not-a-token")


def test_delete_app_removes_its_endpoints_and_segments(store: EndpointStore) -> None:
    doomed = store.create_app("doomed").id
    kept = store.create_app("kept").id
    for app in (doomed, kept):
        write(store, app, sms("e1", user_id="u1"))
        store.put_channel(app, ChannelType.SMS, True, {})
    segment = create_segment(store, doomed, country_segment("US"))

    deleted = store.delete_app(doomed)

    assert deleted.id == doomed
    assert store.count_endpoints(doomed) == 0
    for call in (
        lambda: store.get_app(doomed),
        lambda: store.get_endpoint(doomed, "e1"),
        lambda: store.get_segment(doomed, segment.id),
        lambda: store.get_channel(doomed, ChannelType.SMS),
        lambda: store.delete_app(doomed),
    ):
        with pytest.raises(NotFound):
            call()
    assert store.get_endpoint(kept, "e1").address == US_NUMBER
    assert store.count_endpoints(kept) == 1
    assert store.get_channel(kept, ChannelType.SMS).enabled is True


UNKNOWN_APP_CALLS: dict[str, Callable[[EndpointStore, str, str], object]] = {
    "get_app": lambda s, a, _seg: s.get_app(a),
    "delete_app": lambda s, a, _seg: s.delete_app(a),
    "put_channel": lambda s, a, _seg: s.put_channel(a, ChannelType.SMS, True, {}),
    "get_channel": lambda s, a, _seg: s.get_channel(a, ChannelType.SMS),
    "list_channels": lambda s, a, _seg: s.list_channels(a),
    "delete_channel": lambda s, a, _seg: s.delete_channel(a, ChannelType.SMS),
    "write_endpoints": lambda s, a, _seg: s.write_endpoints(a, [sms("e1")], API),
    "get_endpoint": lambda s, a, _seg: s.get_endpoint(a, "e1"),
    "delete_endpoint": lambda s, a, _seg: s.delete_endpoint(a, "e1", API),
    "get_user_endpoints": lambda s, a, _seg: s.get_user_endpoints(a, "u1"),
    "delete_user_endpoints": lambda s, a, _seg: s.delete_user_endpoints(a, "u1", API),
    "consent_history": lambda s, a, _seg: s.consent_history(a, "e1"),
    "create_segment": lambda s, a, _seg: s.create_segment(a, definition(country_segment("US"))),
    "update_segment": lambda s, a, seg: s.update_segment(a, seg, definition({})),
    "get_segment": lambda s, a, seg: s.get_segment(a, seg),
    "list_segments": lambda s, a, _seg: s.list_segments(a, 10, None),
    "list_segment_versions": lambda s, a, seg: s.list_segment_versions(a, seg, 10, None),
    "delete_segment": lambda s, a, seg: s.delete_segment(a, seg),
    "estimate": lambda s, a, seg: s.estimate(a, seg),
    "create_import_segment": lambda s, a, _seg: s.create_import_segment(
        a, "imported", ["e1"], ImportDefinition("CSV", "file.csv")
    ),
    "iter_endpoints": lambda s, a, _seg: s.iter_endpoints(a),
}


@pytest.mark.parametrize("call", list(UNKNOWN_APP_CALLS))
def test_unknown_app_is_not_found(store: EndpointStore, app_id: str, call: str) -> None:
    # The real app holds everything the call names, so only the app id can make it fail.
    write(store, app_id, sms("e1", user_id="u1"))
    store.put_channel(app_id, ChannelType.SMS, True, {})
    segment = create_segment(store, app_id, country_segment("US"))
    with pytest.raises(NotFound):
        UNKNOWN_APP_CALLS[call](store, "no-such-app", segment.id)
    assert store.count_endpoints(app_id) == 1


# channels -------------------------------------------------------------------------------------


def test_put_channel_creates_version_one(store: EndpointStore, app_id: str) -> None:
    channel = store.put_channel(app_id, ChannelType.SMS, True, {"SenderId": "SHOP"})
    assert channel.version == 1
    assert channel.enabled is True
    assert dict(channel.settings) == {"SenderId": "SHOP"}
    assert store.get_channel(app_id, ChannelType.SMS) == channel


def test_put_channel_again_bumps_version_and_merges_settings(
    store: EndpointStore, app_id: str
) -> None:
    first = store.put_channel(app_id, ChannelType.SMS, True, {"SenderId": "SHOP", "Keyword": "A"})
    second = store.put_channel(app_id, ChannelType.SMS, None, {"Keyword": "B", "ShortCode": 7})
    assert second.version == 2
    assert second.enabled is True  # None keeps the previous value
    assert dict(second.settings) == {"SenderId": "SHOP", "Keyword": "B", "ShortCode": 7}
    assert second.creation_date == first.creation_date
    third = store.put_channel(app_id, ChannelType.SMS, False, {})
    assert (third.version, third.enabled) == (3, False)
    assert store.get_channel(app_id, ChannelType.SMS) == third


def test_list_and_delete_channels(store: EndpointStore, app_id: str) -> None:
    sms_channel = store.put_channel(app_id, ChannelType.SMS, True, {})
    email_channel = store.put_channel(app_id, ChannelType.EMAIL, False, {"FromAddress": "a@b.c"})
    listed = store.list_channels(app_id)
    assert sorted(c.channel_type for c in listed) == [ChannelType.EMAIL, ChannelType.SMS]

    assert store.delete_channel(app_id, ChannelType.SMS) == sms_channel
    assert store.list_channels(app_id) == [email_channel]
    with pytest.raises(NotFound):
        store.get_channel(app_id, ChannelType.SMS)
    with pytest.raises(NotFound):
        store.delete_channel(app_id, ChannelType.SMS)


def test_unknown_channel_is_not_found(store: EndpointStore, app_id: str) -> None:
    store.put_channel(app_id, ChannelType.SMS, True, {})
    with pytest.raises(NotFound):
        store.get_channel(app_id, ChannelType.VOICE)
    with pytest.raises(NotFound):
        store.delete_channel(app_id, ChannelType.VOICE)


# endpoints: creation and merge ----------------------------------------------------------------


def test_new_endpoint_needs_channel_type(store: EndpointStore, app_id: str) -> None:
    with pytest.raises(InvalidRequest, match="Missing ChannelType"):
        write(store, app_id, EndpointPatch(id="e1", address=US_NUMBER))
    assert store.count_endpoints(app_id) == 0


def test_existing_endpoint_needs_no_channel_type(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1"))
    write(store, app_id, EndpointPatch(id="e1", opt_out=OptOut.ALL))
    endpoint = store.get_endpoint(app_id, "e1")
    assert (endpoint.channel_type, endpoint.opt_out) == (ChannelType.SMS, OptOut.ALL)


def test_write_merges_field_by_field(store: EndpointStore, app_id: str) -> None:
    write(
        store,
        app_id,
        sms(
            "e1",
            user_id="u1",
            user_attributes={"Tier": ("gold",)},
            attributes={"Plan": ("a", "b"), "Team": ("x",)},
            metrics={"visits": 1.0, "score": 2.0},
            demographic=Demographic(platform="android", make="Google"),
            location=Location(city="Berlin", country="DE"),
        ),
    )
    write(store, app_id, EndpointPatch(id="e1", opt_out=OptOut.ALL))

    kept = store.get_endpoint(app_id, "e1")
    assert kept.opt_out is OptOut.ALL
    assert kept.address == US_NUMBER
    assert kept.user_id == "u1"
    assert dict(kept.user_attributes) == {"Tier": ("gold",)}
    assert dict(kept.attributes) == {"Plan": ("a", "b"), "Team": ("x",)}
    assert dict(kept.metrics) == {"visits": 1.0, "score": 2.0}
    assert kept.demographic == Demographic(platform="android", make="Google")
    assert kept.location == Location(city="Berlin", country="DE")

    write(
        store,
        app_id,
        EndpointPatch(
            id="e1",
            attributes={"Plan": ("c",), "New": ("n",)},
            metrics={"score": 5.0, "level": 3.0},
            demographic=Demographic(model="Pixel"),
            location=Location(city="Paris"),
        ),
    )
    merged = store.get_endpoint(app_id, "e1")
    assert dict(merged.attributes) == {"Plan": ("c",), "Team": ("x",), "New": ("n",)}
    assert dict(merged.metrics) == {"visits": 1.0, "score": 5.0, "level": 3.0}
    assert merged.demographic == Demographic(platform="android", make="Google", model="Pixel")
    assert merged.location == Location(city="Paris", country="DE")
    assert merged.opt_out is OptOut.ALL
    assert merged.creation_date == kept.creation_date


def test_write_makes_endpoint_active_unless_status_given(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", endpoint_status=EndpointStatus.INACTIVE))
    assert store.get_endpoint(app_id, "e1").endpoint_status is EndpointStatus.INACTIVE
    write(store, app_id, EndpointPatch(id="e1", attributes={"Plan": ("a",)}))
    assert store.get_endpoint(app_id, "e1").endpoint_status is EndpointStatus.ACTIVE
    write(store, app_id, EndpointPatch(id="e1", endpoint_status=EndpointStatus.INACTIVE))
    assert store.get_endpoint(app_id, "e1").endpoint_status is EndpointStatus.INACTIVE


def test_one_batch_updates_many_endpoints_column_by_column(
    store: EndpointStore, app_id: str
) -> None:
    """Many stored endpoints changed in one batch (PostgreSQL joins arrays for that, one per
    column: text and double precision), each in other columns, with source positions."""
    ids = [f"m{n:02d}" for n in range(12)]
    write(store, app_id, *(sms(i, address=f"+1234555{n:04d}") for n, i in enumerate(ids)))
    changes = [
        EndpointPatch(
            id=i,
            opt_out=OptOut.ALL if n % 2 else None,
            location=Location(latitude=47.5 + n, longitude=-122.25 - n, city=f"c{n}")
            if n % 3
            else None,
            position=f"{n + 1:08d}",
        )
        for n, i in enumerate(ids)
    ]
    assert write(store, app_id, *changes, cause=source("batch")).applied == 12
    for n, i in enumerate(ids):
        got = store.get_endpoint(app_id, i)
        assert got.opt_out is (OptOut.ALL if n % 2 else OptOut.NONE)
        assert got.source_position == f"{n + 1:08d}"
        if n % 3:
            assert (got.location.latitude, got.location.longitude) == (47.5 + n, -122.25 - n)
            assert got.location.city == f"c{n}"
        else:
            assert got.location.latitude is None
    # And deleted together: their tombstones hold their positions (a later replay is stale).
    deletes = [EndpointDelete(i, position=f"{n + 20:08d}") for n, i in enumerate(ids)]
    assert write(store, app_id, *deletes, cause=source("batch")).applied == 12
    replay = [EndpointPatch(id=i, opt_out=OptOut.NONE, position="00000019") for i in ids]
    assert write(store, app_id, *replay, cause=source("replay")).stale == 12


def test_batch_applies_in_order(store: EndpointStore, app_id: str) -> None:
    result = write(
        store,
        app_id,
        sms("e1"),
        EndpointPatch(id="E1", opt_out=OptOut.ALL),
        EndpointDelete("e1"),
        sms("e1", address=GB_NUMBER),
    )
    assert result == WriteResult(applied=4)
    endpoint = store.get_endpoint(app_id, "e1")
    assert (endpoint.address, endpoint.opt_out) == (GB_NUMBER, OptOut.NONE)
    assert transitions(store.consent_history(app_id, "e1")) == [
        (None, OptOut.NONE),
        (OptOut.NONE, OptOut.ALL),
        (OptOut.ALL, None),
        (None, OptOut.NONE),
    ]


def test_endpoint_ids_are_case_insensitive(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("User1_X"))
    write(store, app_id, EndpointPatch(id="USER1_x", opt_out=OptOut.ALL))
    endpoint = store.get_endpoint(app_id, "user1_x")
    assert endpoint.id == "User1_X"
    assert endpoint.opt_out is OptOut.ALL
    assert store.count_endpoints(app_id) == 1
    assert store.delete_endpoint(app_id, "USER1_X", API).id == "User1_X"
    assert store.count_endpoints(app_id) == 0


# endpoints: country ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "address", "country"),
    [
        (ChannelType.SMS, US_NUMBER, "US"),
        (ChannelType.SMS, GB_NUMBER, "GB"),
        (ChannelType.VOICE, GB_NUMBER, "GB"),
        (ChannelType.EMAIL, "someone@example.com", None),
    ],
)
def test_country_is_derived_from_phone_number(
    store: EndpointStore, app_id: str, channel: ChannelType, address: str, country: str | None
) -> None:
    write(store, app_id, EndpointPatch(id="e1", channel_type=channel, address=address))
    assert store.get_endpoint(app_id, "e1").location.country == country


def test_given_country_is_kept_and_matches_its_alpha2(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", address=GB_NUMBER, location=Location(country="USA")))
    assert store.get_endpoint(app_id, "e1").location.country == "USA"
    us = create_segment(store, app_id, country_segment("US"))
    gb = create_segment(store, app_id, country_segment("GB"))
    assert store.estimate(app_id, us.id) == Estimate(total=1, eligible=1)
    assert store.estimate(app_id, gb.id) == Estimate(total=0, eligible=0)


def test_no_country_derived_when_disabled(make_store: StoreFactory) -> None:
    store = make_store(StoreSettings(country=CountryDerivation(enabled=False)))
    app_id = store.create_app("no-derivation").id
    write(store, app_id, sms("e1"))
    assert store.get_endpoint(app_id, "e1").location.country is None
    segment = create_segment(store, app_id, country_segment("US"))
    assert store.estimate(app_id, segment.id) == Estimate(total=0, eligible=0)


# endpoints: same address, user cap, user attributes ------------------------------------------


def test_same_address_on_same_channel_deactivates_the_older_endpoint(
    store: EndpointStore, app_id: str
) -> None:
    write(store, app_id, sms("a"))
    write(store, app_id, sms("b"))
    assert store.get_endpoint(app_id, "a").endpoint_status is EndpointStatus.INACTIVE
    assert store.get_endpoint(app_id, "b").endpoint_status is EndpointStatus.ACTIVE


def test_same_address_on_another_channel_changes_nothing(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("a"))
    write(store, app_id, EndpointPatch(id="v", channel_type=ChannelType.VOICE, address=US_NUMBER))
    assert store.get_endpoint(app_id, "a").endpoint_status is EndpointStatus.ACTIVE
    assert store.get_endpoint(app_id, "v").endpoint_status is EndpointStatus.ACTIVE


def statuses(store: EndpointStore, app_id: str, *ids: str) -> list[str]:
    return [store.get_endpoint(app_id, i).endpoint_status.value for i in ids]


OTHER_NUMBER = "+12341119998"


@pytest.mark.parametrize("batched", [False, True], ids=["one-per-batch", "one-batch"])
@pytest.mark.parametrize("leaves", ["moves", "deleted", "set-inactive", "changes-channel"])
def test_a_source_endpoint_takes_its_address_back_when_the_holder_leaves(
    store: EndpointStore, app_id: str, leaves: str, batched: bool
) -> None:
    """The fallback rule (``WriteBatch._fall_back``): when the ACTIVE holder of an address
    leaves it, the source-driven endpoint there that the newest source change wrote becomes
    ACTIVE again; API-only endpoints stay INACTIVE, as in Pinpoint."""
    write(store, app_id, sms("api-only"))
    write(store, app_id, sms("older", position="00000001"), cause=source("00000001"))
    write(store, app_id, sms("newer", position="00000003"), cause=source("00000003"))
    write(store, app_id, sms("holder", position="00000004"), cause=source("00000004"))
    assert statuses(store, app_id, "api-only", "older", "newer", "holder") == [
        "INACTIVE", "INACTIVE", "INACTIVE", "ACTIVE",
    ]  # fmt: skip
    away: EndpointPatch | EndpointDelete = {
        "moves": EndpointPatch(id="holder", address=OTHER_NUMBER, position="00000006"),
        "deleted": EndpointDelete("holder", position="00000006"),
        "set-inactive": EndpointPatch(id="holder", endpoint_status=EndpointStatus.INACTIVE),
        "changes-channel": EndpointPatch(id="holder", channel_type=ChannelType.VOICE),
    }[leaves]
    cause = source("00000006") if away.position else API
    writes: list[EndpointPatch | EndpointDelete] = [away]
    if batched:  # the holder written twice in the batch, and a bystander
        flip = EndpointPatch(id="holder", opt_out=OptOut.ALL, position=away.position and "00000005")
        writes = [sms("bystander", address="+12341117777"), flip, away]
    assert write(store, app_id, *writes, cause=cause).applied == len(writes)
    assert statuses(store, app_id, "api-only", "older", "newer") == [
        "INACTIVE", "INACTIVE", "ACTIVE",
    ]  # fmt: skip
    # The address is held again: the next holder to leave hands it on the same way. A holder
    # set INACTIVE through the API is still source-driven: the newest there, it comes first
    # (any write makes an endpoint ACTIVE again, in Pinpoint too).
    write(store, app_id, EndpointDelete("newer", position="00000007"), cause=source("00000007"))
    if leaves == "set-inactive":
        assert statuses(store, app_id, "holder", "older") == ["ACTIVE", "INACTIVE"]
        write(store, app_id, EndpointDelete("holder", position="00000008"), cause=source("8"))
    assert statuses(store, app_id, "api-only", "older") == ["INACTIVE", "ACTIVE"]
    # Nobody source-driven is left: the API-only endpoint stays INACTIVE (Pinpoint's rule).
    write(store, app_id, EndpointDelete("older", position="00000009"), cause=source("00000009"))
    assert statuses(store, app_id, "api-only") == ["INACTIVE"]


def test_sixteenth_sms_endpoint_of_a_user_is_refused_atomically(
    store: EndpointStore, app_id: str
) -> None:
    fifteen = [sms(f"e{i}", address=f"+1234111{i:04d}", user_id="u1") for i in range(15)]
    assert write(store, app_id, *fifteen).applied == 15
    with pytest.raises(LimitExceeded, match="Exceeded maximum endpoint per user count: 15"):
        write(
            store,
            app_id,
            sms("bystander", address="+12342220000"),
            EndpointPatch(id="e0", opt_out=OptOut.ALL),
            sms("e15", address="+12341119999", user_id="u1"),
        )
    assert store.count_endpoints(app_id) == 15
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "bystander")
    assert store.get_endpoint(app_id, "e0").opt_out is OptOut.NONE
    assert len(store.get_user_endpoints(app_id, "u1")) == 15


def test_sixteen_sms_endpoints_in_one_batch_write_nothing(
    store: EndpointStore, app_id: str
) -> None:
    sixteen = [sms(f"e{i}", address=f"+1234111{i:04d}", user_id="u1") for i in range(16)]
    with pytest.raises(LimitExceeded):
        write(store, app_id, *sixteen)
    assert store.count_endpoints(app_id) == 0


def test_sixteenth_push_endpoint_retires_the_oldest(store: EndpointStore, app_id: str) -> None:
    for i in range(15):
        write(
            store,
            app_id,
            EndpointPatch(
                id=f"p{i}", channel_type=ChannelType.GCM, address=f"token-{i}", user_id="u1"
            ),
        )
    result = write(
        store,
        app_id,
        EndpointPatch(id="p15", channel_type=ChannelType.GCM, address="token-15", user_id="u1"),
    )
    assert result.applied == 1
    oldest = store.get_endpoint(app_id, "p0")
    assert oldest.endpoint_status is EndpointStatus.INACTIVE
    assert oldest.user_id is None
    user = store.get_user_endpoints(app_id, "u1")
    assert sorted(e.id for e in user) == sorted(f"p{i}" for i in range(1, 16))
    assert all(e.endpoint_status is EndpointStatus.ACTIVE for e in user)


def test_user_attributes_sync_across_the_users_endpoints(store: EndpointStore, app_id: str) -> None:
    write(
        store,
        app_id,
        sms("a", user_id="u1"),
        EndpointPatch(id="b", channel_type=ChannelType.EMAIL, address="u1@x.com", user_id="u1"),
        sms("c", address="+12349990000", user_id="u2"),
    )
    write(store, app_id, EndpointPatch(id="a", user_attributes={"Tier": ("gold",)}))
    assert dict(store.get_endpoint(app_id, "b").user_attributes) == {"Tier": ("gold",)}

    write(store, app_id, EndpointPatch(id="b", user_attributes={"Lang": ("en",)}))
    both = {"Tier": ("gold",), "Lang": ("en",)}
    assert dict(store.get_endpoint(app_id, "a").user_attributes) == both
    assert dict(store.get_endpoint(app_id, "b").user_attributes) == both

    write(store, app_id, EndpointPatch(id="a", user_attributes={"Tier": ("silver",)}))
    assert dict(store.get_endpoint(app_id, "b").user_attributes) == {
        "Tier": ("silver",),
        "Lang": ("en",),
    }
    assert dict(store.get_endpoint(app_id, "c").user_attributes) == {}
    # Segments see the synced values, not only the stored maps.
    silver = create_segment(
        store, app_id, {"Dimensions": {"UserAttributes": {"Tier": {"Values": ["silver"]}}}}
    )
    gold = create_segment(
        store, app_id, {"Dimensions": {"UserAttributes": {"Tier": {"Values": ["gold"]}}}}
    )
    assert store.estimate(app_id, silver.id).total == 2
    assert store.estimate(app_id, gold.id).total == 0


def test_endpoint_joining_a_user_gets_the_users_attributes(
    store: EndpointStore, app_id: str
) -> None:
    # Pinpoint keeps UserAttributes the same on every endpoint of one UserId.
    write(store, app_id, sms("a", user_id="u1", user_attributes={"Tier": ("gold",)}))
    write(store, app_id, EndpointPatch(id="b", channel_type=ChannelType.EMAIL, user_id="u1"))
    assert dict(store.get_endpoint(app_id, "b").user_attributes) == {"Tier": ("gold",)}


# limits ---------------------------------------------------------------------------------------


LONG_NAME = "n" * (MAX_ATTRIBUTE_NAME + 1)
LONG_VALUE = "v" * (MAX_ATTRIBUTE_VALUE + 1)
MANY_VALUES = tuple(str(i) for i in range(MAX_VALUES_PER_ATTRIBUTE + 1))


@pytest.mark.parametrize(
    "patch",
    [
        sms("e1", attributes={LONG_NAME: ("v",)}),
        sms("e1", attributes={"a": (LONG_VALUE,)}),
        sms("e1", attributes={"a": MANY_VALUES}),
        sms("e1", user_attributes={LONG_NAME: ("v",)}),
        sms("e1", user_attributes={"a": (LONG_VALUE,)}),
        sms("e1", user_attributes={"a": MANY_VALUES}),
        sms("e1", metrics={LONG_NAME: 1.0}),
    ],
    ids=[
        "attribute-name-51",
        "attribute-value-101",
        "attribute-51-values",
        "user-attribute-name-51",
        "user-attribute-value-101",
        "user-attribute-51-values",
        "metric-name-51",
    ],
)
def test_validate_patch_refuses_attributes_over_the_limits(patch: EndpointPatch) -> None:
    with pytest.raises(LimitExceeded):
        validate_patch(patch)


def test_validate_patch_accepts_attributes_at_the_limits() -> None:
    at_limit = tuple("v" * MAX_ATTRIBUTE_VALUE for _ in range(MAX_VALUES_PER_ATTRIBUTE))
    validate_patch(
        sms(
            "e1",
            attributes={"n" * MAX_ATTRIBUTE_NAME: at_limit},
            user_attributes={"n" * MAX_ATTRIBUTE_NAME: at_limit},
            metrics={"n" * MAX_ATTRIBUTE_NAME: 1.0},
        )
    )


def test_oversized_endpoint_is_refused_atomically(store: EndpointStore, app_id: str) -> None:
    # Each attribute is 50 values of 100 characters (~5 KB); the limit is 15 KB per endpoint.
    big = tuple("v" * MAX_ATTRIBUTE_VALUE for _ in range(MAX_VALUES_PER_ATTRIBUTE))
    write(store, app_id, sms("e1", attributes={"a": big, "b": big}))
    with pytest.raises(LimitExceeded, match="bytes per endpoint"):
        write(
            store,
            app_id,
            sms("e2", address="+12342220000"),
            EndpointPatch(id="e1", attributes={"c": big, "d": big}),
        )
    assert sorted(store.get_endpoint(app_id, "e1").attributes) == ["a", "b"]
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "e2")


def test_app_holds_at_most_250_attribute_names(store: EndpointStore, app_id: str) -> None:
    names = {f"attr{i:03d}": ("v",) for i in range(250)}
    write(store, app_id, sms("e1", attributes=names))
    # Names already known stay usable.
    write(store, app_id, sms("e2", address="+12342220000", attributes={"attr000": ("w",)}))
    with pytest.raises(LimitExceeded, match="Too many custom attributes"):
        write(store, app_id, sms("e3", address="+12343330000", attributes={"attr250": ("v",)}))
    with pytest.raises(LimitExceeded, match="Too many custom attributes"):
        write(store, app_id, sms("e3", address="+12343330000", metrics={"m": 1.0}))
    assert store.count_endpoints(app_id) == 2


def test_refused_batch_registers_no_attribute_names(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", attributes={f"attr{i:03d}": ("v",) for i in range(249)}))
    with pytest.raises(LimitExceeded, match="Too many custom attributes"):
        write(
            store,
            app_id,
            sms("e2", address="+12342220000", attributes={"first": ("v",)}),
            sms("e3", address="+12343330000", attributes={"second": ("v",)}),
        )
    # "first" was rolled back with its batch, so "second" is still the 250th name.
    write(store, app_id, sms("e3", address="+12343330000", attributes={"second": ("v",)}))
    assert store.count_endpoints(app_id) == 2


# positions (exactly-once effect) --------------------------------------------------------------


def test_positions_make_replays_harmless(store: EndpointStore, app_id: str) -> None:
    first = write(store, app_id, sms("e1", position="0005"), cause=source("0005"))
    assert first == WriteResult(applied=1)
    assert store.get_endpoint(app_id, "e1").source_position == "0005"

    replay = write(
        store, app_id, sms("e1", opt_out=OptOut.ALL, position="0005"), cause=source("0005")
    )
    older = write(
        store, app_id, sms("e1", opt_out=OptOut.ALL, position="0003"), cause=source("0003")
    )
    assert replay == WriteResult(stale=1)
    assert older == WriteResult(stale=1)
    unchanged = store.get_endpoint(app_id, "e1")
    assert (unchanged.opt_out, unchanged.source_position) == (OptOut.NONE, "0005")

    newer = write(
        store, app_id, sms("e1", opt_out=OptOut.ALL, position="0007"), cause=source("0007")
    )
    assert newer == WriteResult(applied=1)
    applied = store.get_endpoint(app_id, "e1")
    assert (applied.opt_out, applied.source_position) == (OptOut.ALL, "0007")


def test_positioned_delete_leaves_a_tombstone(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", position="0007"), cause=source("0007"))
    stale_delete = write(store, app_id, EndpointDelete("e1", "0006"), cause=source("0006"))
    assert stale_delete == WriteResult(stale=1)
    assert store.count_endpoints(app_id) == 1

    deleted = write(store, app_id, EndpointDelete("e1", "0009"), cause=source("0009"))
    assert deleted == WriteResult(applied=1)
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "e1")

    late = write(store, app_id, sms("e1", position="0008"), cause=source("0008"))
    assert late == WriteResult(stale=1)
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "e1")

    recreated = write(store, app_id, sms("e1", position="0010"), cause=source("0010"))
    assert recreated == WriteResult(applied=1)
    assert store.get_endpoint(app_id, "e1").source_position == "0010"


def test_api_delete_keeps_the_source_position_as_a_tombstone(
    store: EndpointStore, app_id: str
) -> None:
    """An older source record replayed after an API delete (a dead letter, say) must not bring
    back the endpoint: found in review, the delete used to forget the position it held."""
    write(store, app_id, sms("e1", opt_out=OptOut.ALL, position="0009"), cause=source("0009"))
    store.delete_endpoint(app_id, "e1", API)

    replayed = write(store, app_id, sms("e1", opt_out=OptOut.NONE, position="0007"))
    assert replayed == WriteResult(stale=1)
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "e1")

    newer = write(store, app_id, sms("e1", opt_out=OptOut.NONE, position="0010"))
    assert newer == WriteResult(applied=1)
    assert store.get_endpoint(app_id, "e1").source_position == "0010"


def test_delete_of_a_missing_endpoint_counts_missing(store: EndpointStore, app_id: str) -> None:
    result = write(
        store,
        app_id,
        EndpointDelete("ghost"),
        EndpointDelete("phantom", "0004"),
        cause=source("0004"),
    )
    assert result == WriteResult(missing=2)
    # The positioned one still guards against an older upsert.
    assert write(store, app_id, sms("phantom", position="0003")) == WriteResult(stale=1)


def test_one_batch_counts_each_outcome(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", position="0005"), cause=source("0005"))
    result = write(
        store,
        app_id,
        sms("e1", opt_out=OptOut.ALL, position="0004"),
        sms("e2", address="+12342220000", position="0006"),
        EndpointDelete("ghost", "0006"),
        EndpointDelete("e1", "0007"),
        cause=source("0007"),
    )
    assert result == WriteResult(applied=2, stale=1, missing=1)
    assert store.count_endpoints(app_id) == 1


def test_api_write_without_position_applies_and_keeps_the_position(
    store: EndpointStore, app_id: str
) -> None:
    write(store, app_id, sms("e1", position="0010"), cause=source("0010"))
    assert write(store, app_id, EndpointPatch(id="e1", opt_out=OptOut.ALL)) == WriteResult(
        applied=1
    )
    endpoint = store.get_endpoint(app_id, "e1")
    assert (endpoint.opt_out, endpoint.source_position) == (OptOut.ALL, "0010")
    # The kept position still guards the endpoint against replays.
    replay = write(store, app_id, sms("e1", opt_out=OptOut.NONE, position="0010"))
    assert replay == WriteResult(stale=1)
    assert store.get_endpoint(app_id, "e1").opt_out is OptOut.ALL


# delete and user endpoints --------------------------------------------------------------------


def test_delete_endpoint_returns_it(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", attributes={"Plan": ("gold",)}))
    before = store.get_endpoint(app_id, "e1")
    assert store.delete_endpoint(app_id, "e1", API) == before
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "e1")
    with pytest.raises(NotFound):
        store.delete_endpoint(app_id, "e1", API)
    # Its attribute rows went with it.
    plan = create_segment(
        store, app_id, {"Dimensions": {"Attributes": {"Plan": {"Values": ["gold"]}}}}
    )
    assert store.estimate(app_id, plan.id).total == 0


def test_get_and_delete_user_endpoints(store: EndpointStore, app_id: str) -> None:
    write(
        store,
        app_id,
        sms("a", user_id="u1"),
        EndpointPatch(id="b", channel_type=ChannelType.EMAIL, address="x@y.z", user_id="u1"),
        sms("c", address="+12342220000", user_id="u2"),
    )
    assert sorted(e.id for e in store.get_user_endpoints(app_id, "u1")) == ["a", "b"]
    with pytest.raises(NotFound):
        store.get_user_endpoints(app_id, "nobody")
    with pytest.raises(NotFound):
        store.delete_user_endpoints(app_id, "nobody", API)

    deleted = store.delete_user_endpoints(app_id, "u1", API)
    assert sorted(e.id for e in deleted) == ["a", "b"]
    with pytest.raises(NotFound):
        store.get_user_endpoints(app_id, "u1")
    with pytest.raises(NotFound):
        store.get_endpoint(app_id, "a")
    assert [e.id for e in store.get_user_endpoints(app_id, "u2")] == ["c"]
    assert store.count_endpoints(app_id) == 1


# consent history ------------------------------------------------------------------------------


def transitions(history: Sequence[ConsentChange]) -> list[tuple[OptOut | None, OptOut | None]]:
    return [(c.opt_out_before, c.opt_out_after) for c in history]


def test_consent_history_records_every_opt_out_change(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1"), cause=Cause(CauseKind.API, "req-create"))
    write(
        store,
        app_id,
        EndpointPatch(id="e1", opt_out=OptOut.ALL, position="0042"),
        cause=source("0042"),
    )
    write(store, app_id, EndpointPatch(id="e1", attributes={"Plan": ("gold",)}))
    write(store, app_id, EndpointPatch(id="e1", opt_out=OptOut.ALL))  # the same value again
    store.delete_endpoint(app_id, "e1", Cause(CauseKind.API, "req-delete"))

    history = store.consent_history(app_id, "E1")
    assert transitions(history) == [
        (None, OptOut.NONE),
        (OptOut.NONE, OptOut.ALL),
        (OptOut.ALL, None),
    ]
    assert [c.cause for c in history] == [
        Cause(CauseKind.API, "req-create"),
        Cause(CauseKind.SOURCE, "0042"),
        Cause(CauseKind.API, "req-delete"),
    ]
    assert {c.endpoint_id for c in history} == {"e1"}
    assert {c.address for c in history} == {US_NUMBER}
    assert [c.at for c in history] == sorted(c.at for c in history)


def test_consent_history_of_positioned_delete(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("e1", opt_out=OptOut.ALL, position="0001"), cause=source("0001"))
    write(store, app_id, EndpointDelete("e1", "0002"), cause=source("0002"))
    history = store.consent_history(app_id, "e1")
    assert transitions(history) == [(None, OptOut.ALL), (OptOut.ALL, None)]
    assert history[-1].cause == source("0002")


def test_consent_history_of_unknown_endpoint_is_not_found(
    store: EndpointStore, app_id: str
) -> None:
    write(store, app_id, sms("e1"))
    with pytest.raises(NotFound):
        store.consent_history(app_id, "e2")


# segments: lifecycle --------------------------------------------------------------------------


def test_create_segment(store: EndpointStore, app_id: str) -> None:
    segment = create_segment(store, app_id, country_segment("US"), name="americans")
    assert segment.version == 1
    assert segment.segment_type == "DIMENSIONAL"
    assert segment.definition.name == "americans"
    assert segment.arn.endswith(segment.id)
    fetched = store.get_segment(app_id, segment.id)
    assert fetched.version == 1
    assert fetched.definition.name == "americans"
    assert fetched.definition.dimensions == segment.definition.dimensions


def test_update_segment_adds_a_version(store: EndpointStore, app_id: str) -> None:
    write(store, app_id, sms("us"), sms("gb", address=GB_NUMBER))
    first = create_segment(store, app_id, country_segment("US"), name="by-country")
    update = definition_from_wire(country_segment("GB"), require_name=False)
    second = store.update_segment(app_id, first.id, update)

    assert second.version == 2
    assert second.id == first.id
    assert second.definition.name == "by-country"
    assert second.creation_date == first.creation_date
    assert store.get_segment(app_id, first.id).version == 2
    old = store.get_segment(app_id, first.id, version=1)
    assert old.definition.dimensions == first.definition.dimensions
    assert store.get_segment(app_id, first.id, version=2).definition.name == "by-country"

    renamed = store.update_segment(
        app_id, first.id, definition_from_wire({"Name": "x"}, require_name=False)
    )
    assert renamed.version == 3
    assert renamed.definition.name == "x"
    assert renamed.definition.dimensions == second.definition.dimensions

    # Version 1 selects the US endpoint; the latest selects GB ones, including new ones.
    assert store.estimate(app_id, first.id, version=1) == Estimate(total=1, eligible=1)
    assert store.estimate(app_id, first.id) == Estimate(total=1, eligible=1)
    write(store, app_id, sms("gb2", address="+447400123457"))
    assert store.estimate(app_id, first.id) == Estimate(total=2, eligible=2)
    assert store.estimate(app_id, first.id, version=1) == Estimate(total=1, eligible=1)


def test_list_segments_shows_latest_versions_in_pages(store: EndpointStore, app_id: str) -> None:
    created = [create_segment(store, app_id, country_segment("US"), name=f"s{i}") for i in range(5)]
    store.update_segment(app_id, created[1].id, definition({}, name="s1-renamed"))
    seen: list[Segment] = []
    token: str | None = None
    for _ in range(10):
        page = store.list_segments(app_id, page_size=2, token=token)
        assert len(page.items) <= 2
        seen.extend(page.items)
        token = page.next_token
        if token is None:
            break
    assert sorted(s.id for s in seen) == sorted(s.id for s in created)
    by_id = {s.id: s for s in seen}
    assert by_id[created[1].id].version == 2
    assert by_id[created[1].id].definition.name == "s1-renamed"
    assert by_id[created[0].id].version == 1


def test_list_segment_versions(store: EndpointStore, app_id: str) -> None:
    segment = create_segment(store, app_id, country_segment("US"))
    for code in ("GB", "DE"):
        store.update_segment(app_id, segment.id, definition(country_segment(code)))
    first = store.list_segment_versions(app_id, segment.id, page_size=2, token=None)
    assert [s.version for s in first.items] == [1, 2]
    assert first.next_token is not None
    rest = store.list_segment_versions(app_id, segment.id, page_size=2, token=first.next_token)
    assert [s.version for s in rest.items] == [3]
    assert rest.next_token is None


def test_delete_segment(store: EndpointStore, app_id: str) -> None:
    segment = create_segment(store, app_id, country_segment("US"))
    store.update_segment(app_id, segment.id, definition(country_segment("GB")))
    other = create_segment(store, app_id, country_segment("DE"))
    deleted = store.delete_segment(app_id, segment.id)
    assert (deleted.id, deleted.version) == (segment.id, 2)
    for call in (
        lambda: store.get_segment(app_id, segment.id),
        lambda: store.get_segment(app_id, segment.id, version=1),
        lambda: store.estimate(app_id, segment.id),
        lambda: store.delete_segment(app_id, segment.id),
    ):
        with pytest.raises(NotFound):
            call()
    assert [s.id for s in store.list_segments(app_id, 10, None).items] == [other.id]


SEGMENT_CALLS: dict[str, Callable[[EndpointStore, str, str], object]] = {
    "get_segment": lambda s, a, seg: s.get_segment(a, seg),
    "update_segment": lambda s, a, seg: s.update_segment(a, seg, definition({})),
    "list_segment_versions": lambda s, a, seg: s.list_segment_versions(a, seg, 10, None),
    "delete_segment": lambda s, a, seg: s.delete_segment(a, seg),
    "estimate": lambda s, a, seg: s.estimate(a, seg),
    "iter_endpoints": lambda s, a, seg: s.iter_endpoints(a, segment_id=seg),
}


@pytest.mark.parametrize("call", list(SEGMENT_CALLS))
def test_unknown_segment_is_not_found(store: EndpointStore, app_id: str, call: str) -> None:
    create_segment(store, app_id, country_segment("US"))
    with pytest.raises(NotFound):
        SEGMENT_CALLS[call](store, app_id, "no-such-segment")


def test_unknown_segment_version_is_not_found(store: EndpointStore, app_id: str) -> None:
    segment = create_segment(store, app_id, country_segment("US"))
    with pytest.raises(NotFound):
        store.get_segment(app_id, segment.id, version=2)
    with pytest.raises(NotFound):
        store.estimate(app_id, segment.id, version=2)


def test_segment_of_another_app_is_not_found(store: EndpointStore, app_id: str) -> None:
    other = store.create_app("other").id
    segment = create_segment(store, other, country_segment("US"))
    with pytest.raises(NotFound):
        store.get_segment(app_id, segment.id)


def test_unknown_source_segment_is_refused_at_write(store: EndpointStore, app_id: str) -> None:
    wire = {"SegmentGroups": {"Groups": [{"SourceSegments": [{"Id": "no-such-segment"}]}]}}
    with pytest.raises(NotFound):
        create_segment(store, app_id, wire)
    base = create_segment(store, app_id, country_segment("US"))
    with pytest.raises(NotFound):
        store.update_segment(app_id, base.id, definition(wire))
    pinned = {"SegmentGroups": {"Groups": [{"SourceSegments": [{"Id": base.id, "Version": 5}]}]}}
    with pytest.raises(NotFound):
        create_segment(store, app_id, pinned)
    assert [s.id for s in store.list_segments(app_id, 10, None).items] == [base.id]
    assert store.get_segment(app_id, base.id).version == 1


# segments: estimates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One endpoint of the estimate fixture, and what the store should file it under."""

    id: str
    channel: ChannelType
    address: str
    country_given: str | None
    opt_out: OptOut
    status: EndpointStatus
    user: str | None
    platform: str | None = None
    make: str | None = None
    model: str | None = None
    app_version: str | None = None
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    user_attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def country(self) -> str | None:
        """The alpha-2 country the endpoint is filed under: given, or from its number."""
        if self.country_given is not None:
            return {"USA": "US", "DEU": "DE", "GB": "GB"}[self.country_given]
        if self.channel in (ChannelType.SMS, ChannelType.VOICE):
            return "US" if self.address.startswith("+1") else "GB"
        return None

    @property
    def eligible(self) -> bool:
        return self.status is EndpointStatus.ACTIVE and self.opt_out is OptOut.NONE

    def values(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name, ())

    def patch(self) -> EndpointPatch:
        return EndpointPatch(
            id=self.id,
            channel_type=self.channel,
            address=self.address,
            opt_out=self.opt_out,
            endpoint_status=self.status,
            user_id=self.user,
            user_attributes=self.user_attributes or None,
            attributes=self.attributes or None,
            metrics=self.metrics or None,
            demographic=Demographic(
                platform=self.platform,
                make=self.make,
                model=self.model,
                app_version=self.app_version,
            ),
            location=Location(country=self.country_given),
        )


CHANNELS = (
    ChannelType.SMS,
    ChannelType.EMAIL,
    ChannelType.GCM,
    ChannelType.SMS,
    ChannelType.APNS,
    ChannelType.VOICE,
)
USER_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "u0": {"Tier": ("vip",)},
    "u1": {"Tier": ("regular",)},
    "u2": {"Tier": ("vip", "beta")},
    "u3": {},
}
SPECIAL_DATES = {
    1: "2024-01-12",  # BETWEEN's lower bound, as a date
    2: "2024-01-18T12:00:00Z",  # BETWEEN's upper bound
    5: "2024-01-15T00:00:00Z",  # neither BEFORE nor AFTER 2024-01-15T00:00:00Z
    7: "2024-01-18T22:00:00-05:00",  # the 18th locally, the 19th in UTC: not ON the 18th
}


def _address(i: int, channel: ChannelType) -> str:
    if channel is ChannelType.EMAIL:
        return f"user{i}@example.com"
    if channel in (ChannelType.SMS, ChannelType.VOICE):
        return f"+4474001234{i:02d}" if i % 4 == 3 else f"+1234555{i:04d}"
    return f"token-{i}"


def _signup(i: int) -> tuple[str, ...]:
    if i in SPECIAL_DATES:
        return (SPECIAL_DATES[i],)
    if i % 10 == 9:
        return ("n/a",)  # not a date: matches no date comparison
    if i % 10 == 4:
        return ()
    # Every third one carries an offset, some of which move the UTC date back a day.
    suffix = "+05:00" if i % 3 == 0 else "Z"
    return (f"2024-01-{10 + i % 12:02d}T{i * 7 % 24:02d}:00:00{suffix}",)


def _spec(i: int) -> Spec:
    channel = CHANNELS[i % 6]
    push = channel in (ChannelType.GCM, ChannelType.APNS)
    user = f"u{i % 4}" if i % 3 != 2 else None
    attributes: dict[str, tuple[str, ...]] = {}
    plan = (("gold",), ("silver", "bronze"), ())[i // 2 % 3]
    interests = (("Sports", "Music"), ("music",), ("Movies",), ())[i % 4]
    for name, values in (("Plan", plan), ("Interests", interests), ("SignupDate", _signup(i))):
        if values:
            attributes[name] = values
    if push:
        attributes["DeviceType"] = ("phone",) if i % 4 == 0 else ("tablet",)
    metrics: dict[str, float] = {}
    if i % 8 != 7:
        metrics["score"] = float(i * 3 % 11 * 5)
    if i % 2 == 0:
        metrics["visits"] = float(i)
    return Spec(
        id=f"ep{i:02d}",
        channel=channel,
        address=_address(i, channel),
        country_given={0: "USA", 2: "DEU", 3: "GB"}.get(i % 5),
        opt_out=OptOut.ALL if i % 4 == 1 else OptOut.NONE,
        status=EndpointStatus.INACTIVE if i % 7 == 4 else EndpointStatus.ACTIVE,
        user=user,
        platform={ChannelType.GCM: "android", ChannelType.APNS: "ios"}.get(channel),
        make={ChannelType.GCM: "Google", ChannelType.APNS: "Apple"}.get(channel),
        model=f"M{i % 5}" if push else None,
        app_version=f"2.{i % 4}" if push else None,
        attributes=attributes,
        user_attributes=USER_ATTRIBUTES[user] if user else {},
        metrics=metrics,
    )


SPECS = tuple(_spec(i) for i in range(30))


def expected(match: Callable[[Spec], bool]) -> Estimate:
    matching = [s for s in SPECS if match(s)]
    return Estimate(total=len(matching), eligible=sum(s.eligible for s in matching))


@pytest.fixture
def population(store: EndpointStore, app_id: str) -> str:
    """The app holding every endpoint of ``SPECS``."""
    result = write(store, app_id, *(s.patch() for s in SPECS))
    assert result == WriteResult(applied=len(SPECS))
    return app_id


def instant(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def dates(spec: Spec, name: str = "SignupDate") -> list[datetime]:
    return [d for d in map(instant, spec.values(name)) if d is not None]


def at(value: str) -> datetime:
    parsed = instant(value)
    assert parsed is not None
    return parsed


def dims(**parts: Any) -> dict[str, Any]:
    return {"Dimensions": parts}


def attr(kind: str, *values: str) -> dict[str, Any]:
    return {"AttributeType": kind, "Values": list(values)}


def demo(name: str, *values: str, kind: str = "INCLUSIVE") -> dict[str, Any]:
    return {"Demographic": {name: {"DimensionType": kind, "Values": list(values)}}}


def metric(name: str, operator: str, value: float) -> dict[str, Any]:
    return {"Metrics": {name: {"ComparisonOperator": operator, "Value": value}}}


def group(*dimensions: Mapping[str, Any], kind: str = "ALL") -> dict[str, Any]:
    return {"Dimensions": list(dimensions), "Type": kind}


def groups(*items: Mapping[str, Any], include: str = "ALL") -> dict[str, Any]:
    return {"SegmentGroups": {"Groups": list(items), "Include": include}}


SMS_ONLY = demo("Channel", "SMS")
GOLD = {"Attributes": {"Plan": attr("INCLUSIVE", "gold")}}
IOS = demo("Platform", "ios")
IN_US = {"Location": {"Country": {"Values": ["US"]}}}


def is_sms(s: Spec) -> bool:
    return s.channel is ChannelType.SMS


def is_gold(s: Spec) -> bool:
    return "gold" in s.values("Plan")


def is_ios(s: Spec) -> bool:
    return s.platform == "ios"


def is_us(s: Spec) -> bool:
    return s.country == "US"


def score(s: Spec) -> float | None:
    return s.metrics.get("score")


ESTIMATE_CASES: dict[str, tuple[dict[str, Any], Callable[[Spec], bool]]] = {
    "everyone": (dims(), lambda s: True),
    "country-alpha2": (country_segment("US"), is_us),
    "country-alpha3": (country_segment("USA"), is_us),
    "country-mixed-codes": (country_segment("GBR", "DE"), lambda s: s.country in ("GB", "DE")),
    "country-exclusive": (country_segment("US", kind="EXCLUSIVE"), lambda s: s.country != "US"),
    "channel": (dims(**SMS_ONLY), is_sms),
    "channel-several": (
        dims(**demo("Channel", "EMAIL", "VOICE")),
        lambda s: s.channel in (ChannelType.EMAIL, ChannelType.VOICE),
    ),
    "channel-exclusive": (
        dims(**demo("Channel", "SMS", kind="EXCLUSIVE")),
        lambda s: not is_sms(s),
    ),
    "platform": (dims(**demo("Platform", "android")), lambda s: s.platform == "android"),
    "platform-exclusive": (
        dims(**demo("Platform", "ios", kind="EXCLUSIVE")),
        lambda s: not is_ios(s),
    ),
    "make": (dims(**demo("Make", "Apple")), lambda s: s.make == "Apple"),
    "model": (dims(**demo("Model", "M1", "M2")), lambda s: s.model in ("M1", "M2")),
    "app-version": (dims(**demo("AppVersion", "2.0")), lambda s: s.app_version == "2.0"),
    "device-type": (
        dims(**demo("DeviceType", "phone")),
        lambda s: "phone" in s.values("DeviceType"),
    ),
    "device-type-exclusive": (
        dims(**demo("DeviceType", "phone", kind="EXCLUSIVE")),
        lambda s: "phone" not in s.values("DeviceType"),
    ),
    "attribute-inclusive": (
        dims(Attributes={"Plan": attr("INCLUSIVE", "gold", "bronze")}),
        lambda s: bool({"gold", "bronze"} & set(s.values("Plan"))),
    ),
    "attribute-exclusive": (
        dims(Attributes={"Plan": attr("EXCLUSIVE", "gold", "bronze")}),
        lambda s: not {"gold", "bronze"} & set(s.values("Plan")),
    ),
    "attribute-contains-is-case-sensitive": (
        dims(Attributes={"Interests": attr("CONTAINS", "Mus")}),
        lambda s: any("Mus" in v for v in s.values("Interests")),
    ),
    "attribute-contains-any-value": (
        dims(Attributes={"Interests": attr("CONTAINS", "usi", "vie")}),
        lambda s: any("usi" in v or "vie" in v for v in s.values("Interests")),
    ),
    "attribute-before": (
        dims(Attributes={"SignupDate": attr("BEFORE", "2024-01-15T00:00:00Z")}),
        lambda s: any(d < at("2024-01-15T00:00:00Z") for d in dates(s)),
    ),
    "attribute-after": (
        dims(Attributes={"SignupDate": attr("AFTER", "2024-01-15T00:00:00Z")}),
        lambda s: any(d > at("2024-01-15T00:00:00Z") for d in dates(s)),
    ),
    "attribute-on-compares-utc-date": (
        dims(Attributes={"SignupDate": attr("ON", "2024-01-18")}),
        lambda s: any(d.astimezone(UTC).date() == date(2024, 1, 18) for d in dates(s)),
    ),
    "attribute-between-is-inclusive": (
        dims(Attributes={"SignupDate": attr("BETWEEN", "2024-01-12", "2024-01-18T12:00:00Z")}),
        lambda s: any(at("2024-01-12") <= d <= at("2024-01-18T12:00:00Z") for d in dates(s)),
    ),
    "user-attribute": (
        dims(UserAttributes={"Tier": attr("INCLUSIVE", "vip")}),
        lambda s: "vip" in s.user_attributes.get("Tier", ()),
    ),
    "user-attribute-exclusive": (
        dims(UserAttributes={"Tier": attr("EXCLUSIVE", "vip")}),
        lambda s: "vip" not in s.user_attributes.get("Tier", ()),
    ),
    "metric-greater-than": (
        dims(**metric("score", "GREATER_THAN", 25)),
        lambda s: (v := score(s)) is not None and v > 25,
    ),
    "metric-greater-than-or-equal": (
        dims(**metric("score", "GREATER_THAN_OR_EQUAL", 25)),
        lambda s: (v := score(s)) is not None and v >= 25,
    ),
    "metric-less-than": (
        dims(**metric("score", "LESS_THAN", 25)),
        lambda s: (v := score(s)) is not None and v < 25,
    ),
    "metric-less-than-or-equal": (
        dims(**metric("score", "LESS_THAN_OR_EQUAL", 25)),
        lambda s: (v := score(s)) is not None and v <= 25,
    ),
    "metric-equal": (dims(**metric("score", "EQUAL", 25)), lambda s: score(s) == 25),
    "all-dimensions-and": (
        dims(**IN_US, **SMS_ONLY, **GOLD, **metric("score", "GREATER_THAN_OR_EQUAL", 10)),
        lambda s: is_us(s) and is_sms(s) and is_gold(s) and (score(s) or 0) >= 10,
    ),
    "group-type-all": (
        groups(group(SMS_ONLY, GOLD, kind="ALL")),
        lambda s: is_sms(s) and is_gold(s),
    ),
    "group-type-any": (
        groups(group(SMS_ONLY, GOLD, kind="ANY")),
        lambda s: is_sms(s) or is_gold(s),
    ),
    "group-type-none": (
        groups(group(SMS_ONLY, GOLD, kind="NONE")),
        lambda s: not (is_sms(s) or is_gold(s)),
    ),
    "include-all": (
        groups(group(SMS_ONLY), group(GOLD), include="ALL"),
        lambda s: is_sms(s) and is_gold(s),
    ),
    "include-any": (
        groups(group(SMS_ONLY), group(GOLD), include="ANY"),
        lambda s: is_sms(s) or is_gold(s),
    ),
    "include-none": (
        groups(group(SMS_ONLY), group(GOLD), include="NONE"),
        lambda s: not (is_sms(s) or is_gold(s)),
    ),
    "include-any-of-mixed-groups": (
        groups(group(IN_US, GOLD, kind="ALL"), group(IOS, SMS_ONLY, kind="ANY"), include="ANY"),
        lambda s: (is_us(s) and is_gold(s)) or is_ios(s) or is_sms(s),
    ),
    # Endpoints without a country or platform match none of the dimensions below, so NONE
    # must keep them.
    "group-type-none-over-missing-fields": (
        groups(group(IN_US, IOS, kind="NONE")),
        lambda s: not (is_us(s) or is_ios(s)),
    ),
    "include-none-over-missing-fields": (
        groups(group(IN_US), group(IOS), include="NONE"),
        lambda s: not (is_us(s) or is_ios(s)),
    ),
}


def test_population_is_varied() -> None:
    # Guards the fixture itself: every estimate case must split the endpoints.
    for name, (_wire, match) in ESTIMATE_CASES.items():
        if name == "everyone":
            continue
        hits = expected(match)
        assert 0 < hits.total < len(SPECS), name
    assert any(not s.eligible and s.status is EndpointStatus.ACTIVE for s in SPECS)
    assert any(s.status is EndpointStatus.INACTIVE and s.opt_out is OptOut.NONE for s in SPECS)


@pytest.mark.parametrize("case", list(ESTIMATE_CASES))
def test_estimate(store: EndpointStore, population: str, case: str) -> None:
    wire, match = ESTIMATE_CASES[case]
    segment = create_segment(store, population, wire)
    assert store.estimate(population, segment.id) == expected(match)


def test_estimate_eligible_excludes_inactive_and_opted_out(
    store: EndpointStore, app_id: str
) -> None:
    write(
        store,
        app_id,
        sms("ok", address="+12341110001"),
        sms("out", address="+12341110002", opt_out=OptOut.ALL),
        sms("off", address="+12341110003", endpoint_status=EndpointStatus.INACTIVE),
        sms(
            "both",
            address="+12341110004",
            opt_out=OptOut.ALL,
            endpoint_status=EndpointStatus.INACTIVE,
        ),
    )
    segment = create_segment(store, app_id, country_segment("US"))
    assert store.estimate(app_id, segment.id) == Estimate(total=4, eligible=1)


def test_estimate_follows_writes(store: EndpointStore, population: str) -> None:
    segment = create_segment(store, population, dims(**GOLD))
    before = store.estimate(population, segment.id)
    gold = next(s for s in SPECS if is_gold(s))
    write(store, population, EndpointPatch(id=gold.id, attributes={"Plan": ("silver",)}))
    assert store.estimate(population, segment.id).total == before.total - 1


def source_group(
    *refs: Mapping[str, Any], how: str, extra: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    return groups(
        {"SourceSegments": list(refs), "SourceType": how, "Dimensions": list(extra), "Type": "ALL"}
    )


def test_source_segments_any_is_a_union(store: EndpointStore, population: str) -> None:
    us = create_segment(store, population, country_segment("US"))
    sms_seg = create_segment(store, population, dims(**SMS_ONLY))
    union = create_segment(
        store, population, source_group({"Id": us.id}, {"Id": sms_seg.id}, how="ANY")
    )
    assert store.estimate(population, union.id) == expected(lambda s: is_us(s) or is_sms(s))


def test_source_segments_all_is_an_intersection(store: EndpointStore, population: str) -> None:
    us = create_segment(store, population, country_segment("US"))
    sms_seg = create_segment(store, population, dims(**SMS_ONLY))
    both = create_segment(
        store, population, source_group({"Id": us.id}, {"Id": sms_seg.id}, how="ALL")
    )
    assert store.estimate(population, both.id) == expected(lambda s: is_us(s) and is_sms(s))


def test_source_segment_and_group_dimensions_combine(store: EndpointStore, population: str) -> None:
    us = create_segment(store, population, country_segment("US"))
    narrowed = create_segment(
        store, population, source_group({"Id": us.id}, how="ANY", extra=[GOLD])
    )
    assert store.estimate(population, narrowed.id) == expected(lambda s: is_us(s) and is_gold(s))


def test_source_segment_version_is_respected(store: EndpointStore, population: str) -> None:
    base = create_segment(store, population, country_segment("US"))
    store.update_segment(population, base.id, definition(country_segment("GB")))
    pinned = create_segment(
        store, population, source_group({"Id": base.id, "Version": 1}, how="ANY")
    )
    latest = create_segment(store, population, source_group({"Id": base.id}, how="ANY"))
    assert store.estimate(population, pinned.id) == expected(is_us)
    assert store.estimate(population, latest.id) == expected(lambda s: s.country == "GB")


def test_nested_source_segments(store: EndpointStore, population: str) -> None:
    us = create_segment(store, population, country_segment("US"))
    us_gold = create_segment(
        store, population, source_group({"Id": us.id}, how="ANY", extra=[GOLD])
    )
    outer = create_segment(
        store, population, source_group({"Id": us_gold.id}, how="ANY", extra=[SMS_ONLY])
    )
    assert store.estimate(population, outer.id) == expected(
        lambda s: is_us(s) and is_gold(s) and is_sms(s)
    )


# the AWS sample flow --------------------------------------------------------------------------


def test_aws_sample_flow(store: EndpointStore, app_id: str) -> None:
    users = [f"user{n}" for n in range(1, 10)]
    write(
        store,
        app_id,
        *(
            sms(user, address=f"+1234111111{n}", user_id=user, opt_out=OptOut.NONE)
            for n, user in enumerate(users, start=1)
        ),
    )
    segment = create_segment(store, app_id, country_segment("US"), name="US")
    assert store.estimate(app_id, segment.id) == Estimate(total=9, eligible=9)

    write(store, app_id, *(EndpointPatch(id=u, opt_out=OptOut.ALL) for u in users[:4]))
    assert store.estimate(app_id, segment.id) == Estimate(total=9, eligible=5)

    write(store, app_id, EndpointPatch(id="user5", opt_out=OptOut.ALL))
    assert store.estimate(app_id, segment.id) == Estimate(total=9, eligible=4)


def test_find_endpoints_by_exact_address(store: EndpointStore, app_id: str) -> None:
    cause = Cause(CauseKind.API, "r")
    store.write_endpoints(
        app_id,
        [
            EndpointPatch(id="b-sms", channel_type=ChannelType.SMS, address="+12065550100"),
            EndpointPatch(id="a-voice", channel_type=ChannelType.VOICE, address="+12065550100"),
            EndpointPatch(id="c", channel_type=ChannelType.SMS, address="+12065550101"),
        ],
        cause,
    )
    found = store.find_endpoints(app_id, "+12065550100")
    assert [e.id for e in found] == ["a-voice", "b-sms"]
    assert store.find_endpoints(app_id, "+12065550100", limit=1)[0].id == "a-voice"
    assert store.find_endpoints(app_id, "+19999999999") == []
    with pytest.raises(NotFound):
        store.find_endpoints("no-such-app", "+12065550100")


# ordering: bytes, as SQLite compares text -----------------------------------------------------

# Byte order of these strings: "-" (0x2D) < "1" (0x31) < "B" (0x42) < "_" (0x5F) < "a" (0x61).
# A locale collation orders them otherwise: ICU en-US puts "_" before "-" and "a" before "B";
# glibc's en_US ignores the punctuation at first. Positions, ids and every ORDER BY of the
# engine compare by bytes on every backend.


def test_positions_compare_by_bytes(store: EndpointStore, app_id: str) -> None:
    assert write(store, app_id, sms("e1", position="p-a"), cause=source("p-a")).applied == 1
    # "p-B" < "p-a" in bytes (en-US: after it): an older position, so a stale write.
    older = write(store, app_id, sms("e1", opt_out=OptOut.ALL, position="p-B"))
    assert older == WriteResult(stale=1)
    # "p_a" > "p-a" in bytes (en-US: before it): a newer position, applied.
    newer = write(store, app_id, sms("e1", opt_out=OptOut.ALL, position="p_a"))
    assert newer == WriteResult(applied=1)
    assert store.get_endpoint(app_id, "e1").source_position == "p_a"
    # The tombstone of a delete compares the same way.
    assert write(store, app_id, EndpointDelete("e1", "q-a")) == WriteResult(applied=1)
    assert write(store, app_id, sms("e1", position="q-B")) == WriteResult(stale=1)
    assert write(store, app_id, sms("e1", position="q_1")) == WriteResult(applied=1)


def test_endpoints_are_listed_in_byte_order_of_their_ids(store: EndpointStore, app_id: str) -> None:
    ids = ["a_1", "a1", "a-1", "aB", "a_B", "a-b"]
    write(store, app_id, *(sms(i, user_id="u1") for i in ids))
    by_bytes = sorted(i.casefold() for i in ids)
    assert by_bytes == ["a-1", "a-b", "a1", "a_1", "a_b", "ab"]
    assert [e.id.casefold() for e in store.find_endpoints(app_id, US_NUMBER)] == by_bytes
    # One batch: one creation date, so the user's endpoints come in id order.
    assert [e.id.casefold() for e in store.get_user_endpoints(app_id, "u1")] == by_bytes


# a batch leaves what one write at a time leaves -----------------------------------------------

# ``WriteBatch`` works a transaction out in memory from the rows read up front; random workloads
# sent once as batches and once one write per call pin that it reads every row the rules can
# reach: same-address deactivation, the per-user cap with push rollover, UserAttributes kept
# equal across a user, positions and tombstones, deletes and re-creates within one batch. The
# side rows (attribute rows with their rollup copies, metrics) and the rollup are checked
# against the endpoints they come from.

ROLLUP = (
    "SELECT country_code, channel_type, status, opt_out, n FROM endpoint_counts "
    "WHERE app_id = ? AND n <> 0 ORDER BY 1, 2, 3, 4"
)
CHANNELS = [ChannelType.SMS, ChannelType.EMAIL, ChannelType.GCM, ChannelType.APNS]
ADDRESSES = {
    ChannelType.SMS: ["+12065550100", "+12065550101", "+447400123456"],
    ChannelType.EMAIL: ["a@example.com", "b@example.com"],
    ChannelType.GCM: ["tok1", "tok2", "tok3"],
    ChannelType.APNS: ["tok1", "tok4"],
}


def rows(store: EndpointStore, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a statement (``?`` placeholders) on a SQL store's tables."""
    assert isinstance(store, SqlStore), "the table checks apply to SQL stores"
    with store._read() as cur:
        return [tuple(r) for r in store._exec(cur, sql, params).fetchall()]


def _user(rng: random.Random, eid: str, channel: ChannelType) -> str | None:
    """Push endpoints crowd into user0 (the rollover at 15 is exercised); the others spread
    over users of at most 7 ids each, so no write is refused for the cap."""
    if channel in (ChannelType.GCM, ChannelType.APNS):
        return rng.choice(["user0", "user0", None])
    return f"user{1 + int(eid[2:]) % 6}"


def _workload(seed: int, positioned: bool) -> list[list[EndpointPatch | EndpointDelete]]:
    rng = random.Random(seed)
    batches: list[list[EndpointPatch | EndpointDelete]] = []
    position = 0
    for _ in range(25):
        batch: list[EndpointPatch | EndpointDelete] = []
        for _ in range(rng.randint(1, 30)):
            eid = f"EP{rng.randint(0, 40)}" if rng.random() < 0.5 else f"ep{rng.randint(0, 40)}"
            position += rng.choice([1, 1, 1, -3]) if positioned else 0
            where = f"{position:08d}" if positioned and position > 0 else None
            if rng.random() < 0.15:
                batch.append(EndpointDelete(eid, position=where))
                continue
            channel = rng.choice(CHANNELS)
            batch.append(
                EndpointPatch(
                    id=eid,
                    channel_type=channel,
                    address=rng.choice([*ADDRESSES[channel], None]),
                    opt_out=rng.choice([OptOut.ALL, OptOut.NONE, None]),
                    endpoint_status=rng.choice([EndpointStatus.INACTIVE, None, None, None]),
                    user_id=_user(rng, eid, channel),
                    user_attributes=rng.choice(
                        [None, {"tier": (rng.choice(["x", "y"]),)}, {"n": ("1", "2", "1")}]
                    ),
                    attributes=rng.choice([None, {"plan": (rng.choice(["gold", "free"]),)}]),
                    metrics=rng.choice([None, {"score": float(rng.randint(0, 5))}]),
                    position=where,
                )
            )
        batches.append(batch)
    return batches


def _count_fallbacks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the endpoints ``WriteBatch._fall_back`` makes ACTIVE again (one cell, updated)."""
    taken = [0]
    fall_back = WriteBatch._fall_back

    def counting(batch: WriteBatch, e: Endpoint, key: str) -> None:
        at = batch._by_address.get((e.address or "", e.channel_type), set()) - {key}
        before = {k for k in at if batch.rows[k].endpoint.endpoint_status is EndpointStatus.ACTIVE}
        fall_back(batch, e, key)
        after = {k for k in at if batch.rows[k].endpoint.endpoint_status is EndpointStatus.ACTIVE}
        taken[0] += len(after - before)

    monkeypatch.setattr(WriteBatch, "_fall_back", counting)
    return taken


def _state(store: EndpointStore, app_id: str) -> dict[str, Any]:
    endpoints = {
        row[0]: row[1:]
        for row in rows(
            store,
            "SELECT id_key, channel_type, address, opt_out, status, user_id, country_code, "
            "attributes, user_attributes, metrics, source_position FROM endpoints "
            "WHERE app_id = ?",
            app_id,
        )
    }
    history = rows(
        store,
        "SELECT endpoint_key, opt_out_before, opt_out_after, address, cause_kind, cause_ref "
        "FROM consent_history WHERE app_id = ? ORDER BY seq",
        app_id,
    )
    tombstones = rows(
        store, "SELECT id_key, position FROM tombstones WHERE app_id = ? ORDER BY id_key", app_id
    )
    rollup = rows(store, ROLLUP, app_id)
    return {"endpoints": endpoints, "history": history, "tombs": tombstones, "rollup": rollup}


def _check_side_rows(store: EndpointStore, app_id: str) -> None:
    expected = set()
    metrics = set()
    for pk, attributes, user_attributes, metric_text, *rollup in rows(
        store,
        "SELECT pk, attributes, user_attributes, metrics, COALESCE(country_code, ''), "
        "channel_type, status, opt_out FROM endpoints WHERE app_id = ?",
        app_id,
    ):
        for kind, text in (("A", attributes), ("U", user_attributes)):
            for name, values in json.loads(text).items():
                expected |= {(pk, kind, name, v, *rollup) for v in values}
        metrics |= {(pk, n, v) for n, v in json.loads(metric_text).items()}
    found = rows(
        store,
        "SELECT endpoint_pk, kind, name, value, country_code, channel_type, status, opt_out "
        "FROM endpoint_attributes WHERE app_id = ?",
        app_id,
    )
    assert sorted(found) == sorted(expected)
    found_metrics = rows(
        store, "SELECT endpoint_pk, name, value FROM endpoint_metrics WHERE app_id = ?", app_id
    )
    assert sorted(found_metrics) == sorted(metrics)
    grouped = rows(
        store,
        "SELECT COALESCE(country_code, ''), channel_type, status, opt_out, COUNT(*) "
        "FROM endpoints WHERE app_id = ? GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        app_id,
    )
    assert rows(store, ROLLUP, app_id) == grouped


@pytest.mark.parametrize("positioned", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_batched_writes_equal_one_at_a_time(
    make_store: StoreFactory, seed: int, positioned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallbacks = _count_fallbacks(monkeypatch)
    batched, single = make_store(StoreSettings()), make_store(StoreSettings())
    app_b, app_s = batched.create_app("b").id, single.create_app("s").id
    kind = CauseKind.SOURCE if positioned else CauseKind.API
    cause = Cause(kind, "request")
    applied = 0
    for batch in _workload(seed, positioned):
        result = batched.write_endpoints(app_b, batch, cause)
        for one in batch:
            applied += single.write_endpoints(app_s, [one], cause).applied
        assert result.applied <= len(batch)
    assert applied > 0
    state_b, state_s = _state(batched, app_b), _state(single, app_s)
    assert state_b["endpoints"], "the workload left no endpoint: it tests nothing"
    assert state_b == state_s
    # Same-address deactivation (and the push rollover at the user cap) happened, and for
    # source writes the fallback to the newest source-driven endpoint at a left address.
    assert any(v[3] == "INACTIVE" for v in state_b["endpoints"].values())
    assert fallbacks[0] > 0 or not positioned
    _check_side_rows(batched, app_b)
    _check_side_rows(single, app_s)


# IMPORT segments and iter_endpoints -----------------------------------------------------------

FILE = ImportDefinition("CSV", "s3://bucket/endpoints.csv", external_id="ext", size=6)


def import_fixture(store: EndpointStore, app_id: str) -> Segment:
    """Five endpoints (one opted out, one inactive, one e-mail) and an IMPORT segment of four
    of them plus an id no endpoint has, one id given twice in another case."""
    write(
        store,
        app_id,
        sms("a-1", "+12341111111"),
        sms("A-2", "+12341111112", opt_out=OptOut.ALL),
        sms("a-3", "+12341111113", endpoint_status=EndpointStatus.INACTIVE),
        EndpointPatch(id="a-4", channel_type=ChannelType.EMAIL, address="a4@example.com"),
        sms("b-5", "+12341111115"),
    )
    ids = ["A-1", "a-2", "a-3", "a-4", "ghost", "a-1"]
    return store.create_import_segment(app_id, "imported", iter(ids), FILE)


def ids_of(endpoints: Iterable[Any]) -> list[str]:
    return [e.id for e in endpoints]


def member_rows(store: EndpointStore) -> int:
    """Rows of the store's member table: the interface cannot show stray members."""
    assert isinstance(store, SqlStore)
    with store._read() as cur:
        return int(cur.execute("SELECT COUNT(*) FROM segment_members").fetchone()[0])


def test_import_segment_has_its_type_source_and_channel_counts(
    store: EndpointStore, app_id: str
) -> None:
    segment = import_fixture(store, app_id)

    for got in (
        segment,
        store.get_segment(app_id, segment.id),
        store.get_segment(app_id, segment.id, version=1),
        store.list_segments(app_id, 10, None).items[0],
        store.list_segment_versions(app_id, segment.id, 10, None).items[0],
    ):
        assert got.segment_type == "IMPORT"
        assert got.definition.name == "imported"
        assert got.definition.dimensions is None and got.definition.groups is None
        source = got.import_definition
        assert source is not None
        assert (source.format, source.s3_url, source.external_id, source.size) == (
            "CSV", "s3://bucket/endpoints.csv", "ext", 6,
        )  # fmt: skip
        assert dict(source.channel_counts) == {"SMS": 3, "EMAIL": 1}


def test_import_segment_estimate_counts_existing_members_and_eligible_ones(
    store: EndpointStore, app_id: str
) -> None:
    segment = import_fixture(store, app_id)

    # a-1 and a-4 eligible; A-2 (opted out) and a-3 (inactive) stay members; ghost is missing.
    assert store.estimate(app_id, segment.id) == Estimate(total=4, eligible=2)


def test_import_segment_members_follow_deletion_and_recreation(
    store: EndpointStore, app_id: str
) -> None:
    segment = import_fixture(store, app_id)

    store.delete_endpoint(app_id, "a-1", API)
    assert store.estimate(app_id, segment.id) == Estimate(total=3, eligible=1)
    write(store, app_id, sms("GHOST", "+12341111119"), sms("A-1", "+12341111111"))
    assert store.estimate(app_id, segment.id) == Estimate(total=5, eligible=3)
    assert ids_of(store.iter_endpoints(app_id, segment_id=segment.id)) == [
        "A-1", "A-2", "a-3", "a-4", "GHOST",
    ]  # fmt: skip
    source = store.get_segment(app_id, segment.id).import_definition
    assert source is not None and dict(source.channel_counts) == {"SMS": 4, "EMAIL": 1}


def test_iter_endpoints_walks_the_app_a_segment_or_an_import(
    store: EndpointStore, app_id: str
) -> None:
    segment = import_fixture(store, app_id)
    write(store, app_id, sms("c-6", GB_NUMBER))
    us = create_segment(store, app_id, country_segment("US"))

    def walk(segment_id: str | None, eligible_only: bool = False) -> list[str]:
        found = store.iter_endpoints(app_id, segment_id=segment_id, eligible_only=eligible_only)
        return ids_of(found)

    assert walk(None) == ["a-1", "A-2", "a-3", "a-4", "b-5", "c-6"]
    assert walk(None, eligible_only=True) == ["a-1", "a-4", "b-5", "c-6"]
    assert walk(us.id) == ["a-1", "A-2", "a-3", "b-5"]
    assert walk(us.id, eligible_only=True) == ["a-1", "b-5"]
    assert walk(segment.id) == ["a-1", "A-2", "a-3", "a-4"]
    assert walk(segment.id, eligible_only=True) == ["a-1", "a-4"]
    # The same filter as the estimate: the two agree.
    for seg in (us.id, segment.id):
        assert store.estimate(app_id, seg) == Estimate(len(walk(seg)), len(walk(seg, True)))


@pytest.mark.parametrize("batch", [1, 2, 3, 7])
def test_iter_endpoints_pages_across_batch_boundaries(
    store: EndpointStore, app_id: str, batch: int
) -> None:
    ids = [f"E-{i:02d}" for i in range(12)]
    write(store, app_id, *(sms(i, f"+123411111{n:02d}") for n, i in enumerate(ids)))
    segment = store.create_import_segment(app_id, "all", ids[::-1], FILE)

    assert ids_of(store.iter_endpoints(app_id, batch=batch)) == ids
    assert ids_of(store.iter_endpoints(app_id, segment_id=segment.id, batch=batch)) == ids
    with pytest.raises(InvalidRequest, match="batch"):
        store.iter_endpoints(app_id, batch=0)


def test_import_segment_is_created_whole_or_not_at_all(store: EndpointStore, app_id: str) -> None:
    def ids() -> Iterator[str]:
        for i in range(10_050):  # past the first batch of 10,000
            yield f"id-{i}"
        raise RuntimeError("the file broke off")

    with pytest.raises(RuntimeError, match="broke off"):
        store.create_import_segment(app_id, "broken", ids(), FILE)
    with pytest.raises(InvalidRequest, match="non-empty"):
        store.create_import_segment(app_id, "empty id", ["a", ""], FILE)
    with pytest.raises(InvalidRequest, match="Format"):
        store.create_import_segment(app_id, "xml", ["a"], ImportDefinition("XML", "f.xml"))

    assert store.list_segments(app_id, 10, None).items == ()
    assert member_rows(store) == 0


def test_import_segment_takes_a_new_name_but_no_filter(store: EndpointStore, app_id: str) -> None:
    segment = import_fixture(store, app_id)

    renamed = store.update_segment(app_id, segment.id, definition({}, name="renamed"))

    assert (renamed.version, renamed.segment_type, renamed.definition.name) == (
        2, "IMPORT", "renamed",
    )  # fmt: skip
    assert renamed.import_definition is not None
    assert renamed.import_definition.s3_url == FILE.s3_url
    assert store.estimate(app_id, segment.id) == Estimate(total=4, eligible=2)
    assert store.estimate(app_id, segment.id, version=1) == Estimate(total=4, eligible=2)
    for field_name, wire in (
        ("Dimensions", country_segment("US")),
        ("SegmentGroups", {"SegmentGroups": {"Groups": []}}),
    ):
        with pytest.raises(InvalidRequest, match=field_name):
            store.update_segment(app_id, segment.id, definition(wire))
    assert store.get_segment(app_id, segment.id).version == 2


def test_dimensional_segment_can_filter_an_import(store: EndpointStore, app_id: str) -> None:
    segment = import_fixture(store, app_id)
    channel = {"Demographic": {"Channel": {"Values": ["SMS"]}}}
    group = {"SourceSegments": [{"Id": segment.id}], "Dimensions": [channel]}
    sms_members = create_segment(store, app_id, {"SegmentGroups": {"Groups": [group]}})

    assert store.estimate(app_id, sms_members.id) == Estimate(total=3, eligible=1)
    assert ids_of(store.iter_endpoints(app_id, segment_id=sms_members.id)) == [
        "a-1", "A-2", "a-3",
    ]  # fmt: skip


def test_delete_segment_and_delete_app_remove_members(store: EndpointStore) -> None:
    app_id = store.create_app("members").id
    other = store.create_app("other").id
    segment = import_fixture(store, app_id)
    kept = store.create_import_segment(other, "kept", ["x", "y"], FILE)

    deleted = store.delete_segment(app_id, segment.id)
    assert deleted.segment_type == "IMPORT"
    with pytest.raises(NotFound):
        store.estimate(app_id, segment.id)
    assert member_rows(store) == 2

    again = store.create_import_segment(app_id, "again", ["a-1"], FILE)
    assert store.estimate(app_id, again.id) == Estimate(total=1, eligible=1)
    store.delete_app(app_id)
    assert member_rows(store) == 2
    assert store.estimate(other, kept.id) == Estimate(total=0, eligible=0)


# plain captured changes (engine/plain_writes.py) against WriteBatch ------------------------------

PLAIN_NUMBERS = [f"+1206555{n:04d}" for n in range(60)]


def _source_workload(seed: int) -> list[list[EndpointPatch | EndpointDelete]]:
    """Captured changes as the mapper makes them: mostly plain (address, OptOut, UserId), some
    repeated keys in a batch, shared numbers and users, stale and re-delivered positions,
    deletes and re-creations, and a few writes that need WriteBatch (attributes, no channel
    for a new endpoint, an INACTIVE status)."""
    rng = random.Random(seed)
    batches: list[list[EndpointPatch | EndpointDelete]] = []
    position = 0
    for _ in range(30):
        batch: list[EndpointPatch | EndpointDelete] = []
        for _ in range(rng.randint(1, 40)):
            eid = rng.choice(["s", "S"]) + str(rng.randint(0, 25))
            position += rng.choice([1, 1, 1, 1, 1, -2])
            where = f"{max(position, 1):08d}"
            roll = rng.random()
            if roll < 0.12:
                batch.append(
                    EndpointDelete(eid, position=where, source_time="2026-12-01T00:00:00Z")
                )
                continue
            batch.append(
                EndpointPatch(
                    id=eid,
                    channel_type=rng.choice([ChannelType.SMS] * 12 + [None, ChannelType.VOICE]),
                    address=rng.choice([*PLAIN_NUMBERS, None]) if roll < 0.9 else None,
                    opt_out=rng.choice([OptOut.ALL, OptOut.NONE, None]),
                    user_id=rng.choice([None, None, *[f"user{eid[1:]}"] * 12, "shared"]),
                    attributes={"plan": ("gold",)} if rng.random() < 0.04 else None,
                    endpoint_status=EndpointStatus.INACTIVE if rng.random() < 0.03 else None,
                    position=where,
                    source_time="2026-12-01T00:00:00Z",
                )
            )
        batches.append(batch)
    return batches


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15, 16])
def test_plain_source_writes_equal_write_batch_one_at_a_time(
    make_store: StoreFactory, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optsync.engine import sql_plain as sql_module

    plain_count = 0
    share = sql_module.share

    def counting_share(*args: Any) -> Any:
        nonlocal plain_count
        sharing = share(*args)
        plain_count += sum(sharing.plain)
        return sharing

    monkeypatch.setattr(sql_module, "share", counting_share)
    fallbacks = _count_fallbacks(monkeypatch)
    batched, reference = make_store(StoreSettings()), make_store(StoreSettings())
    assert isinstance(reference, SqlStore)
    reference.plain_writes = False  # every write through WriteBatch, one at a time
    app_b, app_r = batched.create_app("b").id, reference.create_app("r").id
    cause = Cause(CauseKind.SOURCE, "")
    totals = [0, 0, 0]
    for batch in _source_workload(seed):
        try:
            got = batched.write_endpoints(app_b, batch, cause)
        except InvalidRequest:
            got = None  # a refused batch: the reference must refuse one of its writes too
        refused = False
        for one in batch:
            try:
                r = reference.write_endpoints(app_r, [one], cause)
            except InvalidRequest:
                refused = True
                continue
            if got is not None:
                totals = [totals[0] + r.applied, totals[1] + r.stale, totals[2] + r.missing]
        if got is None:
            assert refused
            # The reference applied the batch's other writes: apply them to the batched store
            # one at a time too, so both go on from the same state.
            for one in batch:
                with contextlib.suppress(InvalidRequest):
                    batched.write_endpoints(app_b, [one], cause)
    written = sum(len(b) for b in _source_workload(seed))
    assert plain_count > written // 4, "the workload took the plain path too rarely to test it"
    state_b, state_r = _state(batched, app_b), _state(reference, app_r)
    assert state_b["endpoints"], "the workload left no endpoint: it tests nothing"
    assert state_b == state_r
    assert any(v[3] == "INACTIVE" for v in state_b["endpoints"].values())
    assert totals[1] > 0, "no stale write: the guard was not exercised"
    assert fallbacks[0] > 0, "no endpoint took an address back: the fallback was not exercised"
    _check_side_rows(batched, app_b)


@pytest.mark.parametrize("kind", [CauseKind.SOURCE, CauseKind.API])
def test_a_nul_character_is_refused_before_any_statement(
    store: EndpointStore, kind: CauseKind
) -> None:
    """PostgreSQL cannot store NUL: a write holding one is an InvalidRequest on every store (a
    retryable driver error would block the stream partition for good), and nothing changes."""
    app_id = store.create_app("nul").id
    cause = Cause(kind, "ref")
    position = "00000001" if kind is CauseKind.SOURCE else None
    for bad in (
        EndpointPatch(id="a\x00b", channel_type=ChannelType.SMS, position=position),
        EndpointDelete(id="a\x00b", position=position),
        EndpointPatch(
            id="ok", channel_type=ChannelType.SMS, address="+1206555\x000", position=position
        ),
        EndpointPatch(id="ok", channel_type=ChannelType.SMS, user_id="u\x00", position=position),
        EndpointPatch(
            id="ok",
            channel_type=ChannelType.SMS,
            attributes={"plan": ("g\x00",)},
            position=position,
        ),
    ):
        with pytest.raises(InvalidRequest, match="NUL"):
            store.write_endpoints(app_id, [bad], cause)
    assert store.count_endpoints(app_id) == 0
