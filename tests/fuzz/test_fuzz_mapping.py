"""Mapping rules on any row: endpoint writes of the right shape, or ``MappingError``.

The worker dead-letters an unexpected exception too, but with a reason that says "defect": a
value a source can hold must get a reason that names the column and the fix.
"""

from __future__ import annotations

from typing import Any

from fuzz_strategies import JSON, POSITIONS, ROWS, SAMPLE_RULE, TEXT
from hypothesis import example, given
from hypothesis import strategies as st

from optsync.apply.mapping import UNCHANGED_TOAST, Mapped, Mapper, MappingError, MappingRule
from optsync.engine.models import ChannelType, EndpointDelete, EndpointPatch, OptOut
from optsync.engine.phone import PhonePolicy
from optsync.events import ChangeEvent, Op

EMAIL_RULE = MappingRule(
    table="optin_status",
    channel=ChannelType.EMAIL,
    address="email",
    opt_in="optin",
    endpoint_id="mail-{userid:>8}",
    opt_in_true=frozenset({"yes", "1"}),
    opt_in_false=frozenset({"no", "0"}),
    attributes=("note", "lastupdate"),
    user_attributes=("phone",),
    effective_date="lastupdate",
)
STRICT_RULE = MappingRule(
    table="optin_status",
    channel=ChannelType.VOICE,
    address="phone",
    opt_in="optin",
    user_id="userid",
    endpoint_id="{userid}",
    phone_policy=PhonePolicy.VALID,
    default_region="US",
    schema="main",
)
MAPPERS = [
    Mapper([SAMPLE_RULE]),
    Mapper([SAMPLE_RULE, EMAIL_RULE, STRICT_RULE], unmapped="skip"),
    Mapper([EMAIL_RULE]),
]


@st.composite
def events(draw: st.DrawFn) -> ChangeEvent:
    op = draw(st.sampled_from(list(Op)))
    row = draw(ROWS)
    before = draw(st.one_of(st.none(), ROWS))
    extra: dict[str, Any] = {}
    if draw(st.booleans()):
        extra[UNCHANGED_TOAST] = draw(st.lists(st.sampled_from(list(row) or ["note"]), max_size=2))
    return ChangeEvent(
        op=op,
        table=draw(st.sampled_from(["optin_status", "optin_status", "other"])),
        key={},
        position=draw(POSITIONS),
        before=row if op is Op.DELETE else before,
        after=None if op is Op.DELETE else row,
        schema=draw(st.sampled_from(["main", "", "blog_db"])),
        commit_time=draw(st.one_of(st.none(), TEXT)),
        extra=extra,
    )


def check(mapped: Mapped, event: ChangeEvent) -> None:
    assert isinstance(mapped, Mapped)
    assert mapped.failed is None or (isinstance(mapped.failed, str) and mapped.failed)
    for write in mapped.writes:
        assert isinstance(write, EndpointPatch | EndpointDelete)
        assert isinstance(write.id, str) and write.id.strip()
        assert write.position == event.position  # the guard needs it on every write
        if isinstance(write, EndpointPatch):
            assert write.address is None or isinstance(write.address, str)
            assert write.opt_out is None or isinstance(write.opt_out, OptOut)
            assert write.user_id is None or isinstance(write.user_id, str)
            assert write.effective_date is None or isinstance(write.effective_date, str)
            for values in (write.attributes or {}).values():
                assert all(isinstance(v, str) for v in values)


@given(events(), st.sampled_from(range(len(MAPPERS))))
@example(
    ChangeEvent(
        op=Op.INSERT,
        table="optin_status",
        key={},
        position="1",
        after={"userid": "u", "phone": "+12065550100", "optin": 1, "lastupdate": 1e308},
    ),
    0,
)
@example(
    ChangeEvent(
        op=Op.UPDATE,
        table="optin_status",
        key={},
        position="1",
        before={"userid": "u", "phone": "+12065550100", "optin": 1},
        after={"userid": "u", "phone": float("inf"), "optin": float("nan")},
    ),
    0,
)
def test_mapping_any_event(event: ChangeEvent, which: int) -> None:
    try:
        mapped = MAPPERS[which].map(event)
    except MappingError as exc:
        assert exc.reason
        assert "+1206555" not in exc.reason  # reasons go to logs: no phone number in them
        return
    check(mapped, event)


@given(st.dictionaries(st.sampled_from(["userid", "phone", "optin", "lastupdate"]), JSON))
def test_mapping_any_json_values(row: dict[str, Any]) -> None:
    event = ChangeEvent(op=Op.UPDATE, table="optin_status", key={}, position="7", after=row)
    try:
        check(MAPPERS[0].map(event), event)
    except MappingError as exc:
        assert exc.reason
