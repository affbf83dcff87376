from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from optsync.apply.mapping import Mapped, Mapper, MappingError, MappingRule
from optsync.engine.models import ChannelType, EndpointDelete, EndpointPatch, OptOut
from optsync.engine.phone import PhonePolicy
from optsync.errors import ConfigError, Fatal
from optsync.events import ChangeEvent, Op

PHONE = "+12341111111"
NEW_PHONE = "+12342222222"
ROW = {"userid": "user1", "phone": PHONE, "optin": 1, "lastupdate": "2021-01-01T00:00:00Z"}
POSITION = "mysql-bin.000003:00000000000000004242:000000"

SAMPLE = MappingRule(
    "optin_status", address="phone", opt_in="optin", user_id="userid", effective_date="lastupdate"
)


def event(op: Op = Op.INSERT, after: Any = ROW, before: Any = None, **kw: Any) -> ChangeEvent:
    fields: dict[str, Any] = {"table": "optin_status", "schema": "blog_db", "key": {}}
    fields.update(kw)
    return ChangeEvent(op=op, position=POSITION, before=before, after=after, **fields)


def upsert(rule: MappingRule = SAMPLE, **row: Any) -> EndpointPatch:
    mapped = Mapper([rule]).map(event(after={**ROW, **row}))
    assert mapped.failed is None
    (patch,) = mapped.writes
    assert isinstance(patch, EndpointPatch)
    return patch


def reason_of(mapper: Mapper, change: ChangeEvent) -> str:
    with pytest.raises(MappingError) as caught:
        mapper.map(change)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# upserts


def test_insert_becomes_the_sample_endpoint() -> None:
    mapped = Mapper([SAMPLE]).map(event())
    assert mapped == Mapped(
        (
            EndpointPatch(
                id="user1_+12341111111",
                channel_type=ChannelType.SMS,
                address=PHONE,
                opt_out=OptOut.NONE,
                user_id="user1",
                effective_date="2021-01-01T00:00:00Z",
                position=POSITION,
            ),
        )
    )


@pytest.mark.parametrize("op", [Op.LOAD, Op.INSERT, Op.UPDATE])
def test_load_insert_and_update_are_the_same_upsert(op: Op) -> None:
    (patch,) = Mapper([SAMPLE]).map(event(op)).writes
    assert patch == upsert()


def test_endpoint_id_uses_raw_values_and_the_address_is_e164() -> None:
    patch = upsert(phone="+1 (234) 111-1111")
    assert patch.id == "user1_+1 (234) 111-1111"  # as the AWS sample builds it
    assert patch.address == PHONE


def test_user_id_is_a_string() -> None:
    patch = upsert(userid=42)
    assert patch.user_id == "42"
    assert patch.id == "42_+12341111111"


@pytest.mark.parametrize(
    ("value", "opt_out"),
    [
        (1, OptOut.NONE),
        (0, OptOut.ALL),
        (True, OptOut.NONE),
        (False, OptOut.ALL),
        (1.0, OptOut.NONE),
        ("1", OptOut.NONE),
        ("0", OptOut.ALL),
        (" TRUE ", OptOut.NONE),
        ("f", OptOut.ALL),
        ("yes", OptOut.NONE),
        ("N", OptOut.ALL),
        ("on", OptOut.NONE),
        ("off", OptOut.ALL),
    ],
)
def test_opt_in_values(value: object, opt_out: OptOut) -> None:
    assert upsert(optin=value).opt_out is opt_out


def test_unknown_opt_in_value_names_column_and_fix() -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "optin": 2}))
    assert reason == (
        "column 'optin' has value 2, which is neither opt-in (1, true, ...) nor opt-out "
        "(0, false, ...): set opt_in_true/opt_in_false in the [[mapping]] rule"
    )


@pytest.mark.parametrize("value", [-1, "maybe", 0.5, ""])
def test_other_opt_in_values_are_refused(value: object) -> None:
    with pytest.raises(MappingError, match="neither opt-in"):
        Mapper([SAMPLE]).map(event(after={**ROW, "optin": value}))


def test_custom_opt_in_values() -> None:
    rule = MappingRule(
        "optin_status",
        address="phone",
        opt_in="optin",
        user_id="userid",
        opt_in_true=frozenset({"Subscribed"}),
        opt_in_false=frozenset({"unsubscribed", "bounced"}),
    )
    assert upsert(rule, optin="subscribed").opt_out is OptOut.NONE
    assert upsert(rule, optin="BOUNCED").opt_out is OptOut.ALL
    with pytest.raises(MappingError, match=r"opt-in \(subscribed\)"):
        upsert(rule, optin=1)


@pytest.mark.parametrize(
    "row", [{**ROW, "optin": None}, {k: v for k, v in ROW.items() if k != "optin"}]
)
def test_null_or_omitted_opt_in_is_an_error(row: dict[str, Any]) -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after=row))
    assert reason.startswith("column 'optin' (opt-in) is NULL or missing")


@pytest.mark.parametrize("value", [None, "", "   "])
def test_null_or_empty_address_is_an_error(value: object) -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "phone": value}))
    assert reason.startswith("column 'phone' (the address) is NULL or empty")


def test_invalid_phone_reason_names_the_policy_not_the_number() -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "phone": "+1234"}))
    assert reason == (
        "column 'phone' does not hold a valid phone number under phone_policy='possible'"
    )


def test_phone_without_plus_needs_a_default_region() -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "phone": "2025550123"}))
    assert "default_region" in reason
    rule = MappingRule(
        "optin_status", address="phone", opt_in="optin", user_id="userid", default_region="US"
    )
    assert upsert(rule, phone="(202) 555-0123").address == "+12025550123"


def test_valid_policy_refuses_numbers_that_are_only_possible() -> None:
    rule = MappingRule(
        "optin_status",
        address="phone",
        opt_in="optin",
        user_id="userid",
        phone_policy=PhonePolicy.VALID,
    )
    reason = reason_of(Mapper([rule]), event())  # +1 234 is an unassigned area code
    assert "phone_policy='valid'" in reason
    assert upsert(rule, phone="+12025550123").address == "+12025550123"


def test_voice_channel_normalizes_phones_too() -> None:
    rule = MappingRule("optin_status", channel=ChannelType.VOICE, address="phone", opt_in="optin")
    patch = upsert(rule, phone="+1 234 111 1111")
    assert (patch.channel_type, patch.address, patch.id) == (
        ChannelType.VOICE,
        PHONE,
        "+1 234 111 1111",
    )


EMAIL_RULE = MappingRule(
    "users", channel=ChannelType.EMAIL, address="email", opt_in="newsletter", user_id="userid"
)


def email_event(email: object, **kw: Any) -> ChangeEvent:
    return event(table="users", after={"userid": "u1", "email": email, "newsletter": True}, **kw)


def test_email_channel_lowercases_and_strips() -> None:
    (patch,) = Mapper([EMAIL_RULE]).map(email_event("  Ann@Example.COM ")).writes
    assert isinstance(patch, EndpointPatch)
    assert patch.channel_type is ChannelType.EMAIL
    assert patch.address == "ann@example.com"
    assert patch.id == "u1_  Ann@Example.COM "


@pytest.mark.parametrize("email", ["ann.example.com", "ann@@example.com", "@example.com", "ann@"])
def test_email_address_needs_one_at_sign(email: str) -> None:
    reason = reason_of(Mapper([EMAIL_RULE]), email_event(email))
    assert reason.startswith("column 'email' does not hold an e-mail address")
    assert email not in reason


def test_other_channels_keep_the_address_as_it_is() -> None:
    rule = MappingRule("devices", channel=ChannelType.CUSTOM, address="token", opt_in="push")
    change = event(table="devices", after={"token": " AbC ", "push": 1})
    (patch,) = Mapper([rule]).map(change).writes
    assert isinstance(patch, EndpointPatch)
    assert patch.address == " AbC "
    assert patch.channel_type is ChannelType.CUSTOM


def test_attributes_and_user_attributes_skip_nulls() -> None:
    rule = MappingRule(
        "optin_status",
        address="phone",
        opt_in="optin",
        user_id="userid",
        attributes=("plan", "region", "missing"),
        user_attributes=("tier", "vip"),
    )
    patch = upsert(rule, plan="gold", region=None, tier=3, vip=False)
    assert patch.attributes == {"plan": ("gold",)}
    assert patch.user_attributes == {"tier": ("3",), "vip": ("False",)}


def test_no_attribute_columns_leave_attributes_untouched() -> None:
    patch = upsert()
    assert patch.attributes is None
    assert patch.user_attributes is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2021-01-01T00:00:00Z", "2021-01-01T00:00:00Z"),
        (1609459200123, "2021-01-01T00:00:00.123Z"),  # epoch milliseconds
        (1609459200, "2021-01-01T00:00:00.000Z"),  # epoch seconds
        (1609459200123456, "2021-01-01T00:00:00.123Z"),  # epoch microseconds
        (None, None),
    ],
)
def test_effective_date(value: object, expected: str | None) -> None:
    assert upsert(lastupdate=value).effective_date == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1796280349", "2026-12-03T06:45:49.000Z"),  # SQLite TEXT column: epoch seconds
        (" 1796280349 ", "2026-12-03T06:45:49.000Z"),
        ("1796280349.25", "2026-12-03T06:45:49.250Z"),
        ("1796280349123", "2026-12-03T06:45:49.123Z"),  # milliseconds
        (1796280349, "2026-12-03T06:45:49.000Z"),  # INTEGER
        (1796280349.0, "2026-12-03T06:45:49.000Z"),  # REAL
        ("20261203", "20261203"),  # eight digits: ISO 8601's basic date, not an epoch time
        ("2026-12-03T06:45:49Z", "2026-12-03T06:45:49Z"),
    ],
)
def test_epoch_time_as_text_becomes_iso_8601(value: object, expected: str) -> None:
    """Issue 13: a TEXT column of epoch seconds gave EffectiveDate "1796280349"."""
    assert upsert(lastupdate=value).effective_date == expected


@pytest.mark.parametrize("value", [10**20, "100000000000000000000", 1e300, float("nan")])
def test_an_epoch_time_out_of_range_is_a_mapping_error(value: object) -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "lastupdate": value}))
    assert reason.startswith("column 'lastupdate' holds a number that is no epoch time")


def test_without_user_id_the_id_is_the_raw_address() -> None:
    rule = MappingRule("optin_status", address="phone", opt_in="optin")
    patch = upsert(rule)
    assert patch.id == PHONE
    assert patch.user_id is None


# updates that change the endpoint id (AWS sample bug B4)


def test_address_change_deletes_the_old_endpoint_first() -> None:
    before = {**ROW, "optin": 1}
    after = {**ROW, "phone": NEW_PHONE}
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after=after, before=before))
    assert mapped.failed is None
    delete, patch = mapped.writes
    assert delete == EndpointDelete("user1_+12341111111", position=POSITION)
    assert isinstance(patch, EndpointPatch)
    assert patch.id == "user1_+12342222222"
    assert patch.address == NEW_PHONE


def test_user_id_change_deletes_the_old_endpoint_first() -> None:
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after={**ROW, "userid": "user2"}, before=ROW))
    assert [type(w) for w in mapped.writes] == [EndpointDelete, EndpointPatch]
    assert mapped.writes[0].id == "user1_+12341111111"
    assert mapped.writes[1].id == "user2_+12341111111"


def test_update_keeping_the_id_is_a_plain_upsert() -> None:
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after={**ROW, "optin": 0}, before=ROW))
    (patch,) = mapped.writes
    assert isinstance(patch, EndpointPatch)
    assert patch.opt_out is OptOut.ALL


def test_an_id_value_equal_but_of_another_type_is_another_endpoint() -> None:
    # 1 == 1.0, yet "{userid}" makes "1" of one and "1.0" of the other: two endpoint ids.
    mapped = Mapper([SAMPLE]).map(
        event(Op.UPDATE, after={**ROW, "userid": 1.0}, before={**ROW, "userid": 1})
    )
    assert [type(w) for w in mapped.writes] == [EndpointDelete, EndpointPatch]
    assert [w.id for w in mapped.writes] == ["1_+12341111111", "1.0_+12341111111"]


def test_ids_differing_only_in_case_are_one_endpoint() -> None:
    change = email_event("ann@example.com", op=Op.UPDATE, before={
        "userid": "u1", "email": "Ann@Example.com", "newsletter": True})  # fmt: skip
    (patch,) = Mapper([EMAIL_RULE]).map(change).writes
    assert isinstance(patch, EndpointPatch)


def test_update_without_before_image_is_a_plain_upsert() -> None:
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after={**ROW, "phone": NEW_PHONE}))
    assert [type(w) for w in mapped.writes] == [EndpointPatch]


@pytest.mark.parametrize("before", [{}, {"userid": "user1"}, {"userid": "user1", "phone": None}])
def test_before_image_without_the_id_columns_is_a_plain_upsert(before: dict[str, Any]) -> None:
    mapped = Mapper([SAMPLE]).map(
        event(Op.UPDATE, after={**ROW, "phone": NEW_PHONE}, before=before)
    )
    assert [type(w) for w in mapped.writes] == [EndpointPatch]


def test_invalid_new_row_still_deletes_the_old_endpoint() -> None:
    after = {**ROW, "phone": "+1234"}
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after=after, before=ROW))
    assert mapped.writes == (EndpointDelete("user1_+12341111111", position=POSITION),)
    assert mapped.failed is not None
    assert mapped.failed.startswith("column 'phone' does not hold a valid phone number")


def test_new_row_without_id_columns_still_deletes_the_old_endpoint() -> None:
    after = {**ROW, "userid": None}
    mapped = Mapper([SAMPLE]).map(event(Op.UPDATE, after=after, before=ROW))
    assert mapped.writes == (EndpointDelete("user1_+12341111111", position=POSITION),)
    assert mapped.failed is not None
    assert "'userid'" in mapped.failed


def test_invalid_new_row_with_the_same_id_is_an_error() -> None:
    after = {**ROW, "optin": 2}
    reason = reason_of(Mapper([SAMPLE]), event(Op.UPDATE, after=after, before=ROW))
    assert "neither opt-in" in reason


# deletes


def test_delete_uses_the_before_image() -> None:
    mapped = Mapper([SAMPLE]).map(event(Op.DELETE, after=None, before={**ROW, "optin": "junk"}))
    assert mapped == Mapped((EndpointDelete("user1_+12341111111", position=POSITION),))


def test_delete_with_a_key_only_before_image_names_the_fix() -> None:
    change = event(Op.DELETE, after=None, before={"id": 7})
    reason = reason_of(Mapper([SAMPLE]), change)
    assert "'userid', 'phone'" in reason
    assert "REPLICA IDENTITY FULL" in reason
    assert "binlog_row_image=FULL" in reason


# rule selection


def test_unmapped_table_goes_to_the_dlq_by_default() -> None:
    reason = reason_of(Mapper([SAMPLE]), event(table="orders"))
    assert reason.startswith("no [[mapping]] rule for table 'blog_db.orders'")


def test_unmapped_table_can_be_skipped() -> None:
    assert Mapper([SAMPLE], unmapped="skip").map(event(table="orders")) == Mapped(())


def test_unknown_unmapped_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Mapper([SAMPLE], unmapped="drop")  # type: ignore[arg-type]


def test_rule_schema_must_match_when_set() -> None:
    rule = MappingRule(
        "optin_status", schema="other_db", address="phone", opt_in="optin", user_id="userid"
    )
    with pytest.raises(MappingError, match="no \\[\\[mapping\\]\\] rule"):
        Mapper([rule]).map(event())
    assert Mapper([rule]).map(event(schema="other_db")).writes


def test_every_matching_rule_applies() -> None:
    sms = MappingRule("users", address="phone", opt_in="sms_optin", user_id="userid")
    email = MappingRule(
        "users", channel=ChannelType.EMAIL, address="email", opt_in="mail_optin", user_id="userid"
    )
    row = {"userid": "u1", "phone": PHONE, "sms_optin": 0, "email": "a@b.c", "mail_optin": 1}
    mapped = Mapper([sms, email]).map(event(table="users", after=row))
    assert [(w.id, w.opt_out) for w in mapped.writes if isinstance(w, EndpointPatch)] == [
        ("u1_+12341111111", OptOut.ALL),
        ("u1_a@b.c", OptOut.NONE),
    ]
    partial = Mapper([sms, email]).map(event(table="users", after={**row, "email": "nope"}))
    assert len(partial.writes) == 1
    assert partial.failed is not None
    assert partial.failed.startswith("column 'email'")


# endpoint id templates


def test_custom_template() -> None:
    rule = MappingRule(
        "optin_status", address="phone", opt_in="optin", endpoint_id="sms-{userid}-{id:06d}"
    )
    assert upsert(rule, id=42).id == "sms-user1-000042"


def test_template_column_missing_from_the_row_is_named() -> None:
    rule = MappingRule("optin_status", address="phone", opt_in="optin", endpoint_id="{account}")
    reason = reason_of(Mapper([rule]), event())
    assert reason.startswith("column(s) 'account' used by the endpoint id template '{account}'")


def test_template_that_does_not_fit_the_value() -> None:
    rule = MappingRule("optin_status", address="phone", opt_in="optin", endpoint_id="{userid:d}")
    reason = reason_of(Mapper([rule]), event())
    assert "does not fit the row's values" in reason
    assert "user1" not in reason


def test_template_giving_a_forbidden_id() -> None:
    reason = reason_of(Mapper([SAMPLE]), event(after={**ROW, "userid": "a{b}"}))
    assert "Pinpoint forbids" in reason


@pytest.mark.parametrize(
    "template", ["{}", "{0}", "{a.b}", "{a[0]}", "{a!r}", "no fields", "{a", "{a:{b}}"]
)
def test_bad_templates_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError, match="endpoint_id"):
        MappingRule("t", address="phone", opt_in="optin", endpoint_id=template)


def test_rule_defaults_and_validation() -> None:
    assert SAMPLE.endpoint_id == "{userid}_{phone}"
    assert SAMPLE.channel is ChannelType.SMS
    assert MappingRule("t", address="phone", opt_in="o").endpoint_id == "{phone}"
    with pytest.raises(ConfigError, match="share 1"):
        MappingRule("t", address="phone", opt_in="o", opt_in_false=frozenset({"1", "0"}))
    with pytest.raises(ConfigError):
        MappingRule("t", address="", opt_in="o")


def test_mapping_error_is_fatal() -> None:
    assert issubclass(MappingError, Fatal)


# no personal data in reasons


def test_no_reason_contains_the_phone_number() -> None:
    digits = "2341111111"
    rule_with_template = MappingRule(
        "optin_status", address="phone", opt_in="optin", endpoint_id="{phone:d}"
    )
    changes: list[tuple[MappingRule, ChangeEvent]] = [
        (SAMPLE, event(after={**ROW, "optin": 2})),
        (SAMPLE, event(after={**ROW, "optin": PHONE})),  # opt_in pointed at the wrong column
        (SAMPLE, event(after={**ROW, "optin": None})),
        (SAMPLE, event(after={**ROW, "phone": "+1234111111199999"})),
        (SAMPLE, event(after={**ROW, "phone": "234111111"})),
        (SAMPLE, event(after={**ROW, "userid": None})),
        (SAMPLE, event(Op.DELETE, after=None, before={"phone": PHONE})),
        (SAMPLE, event(table="other", after=ROW)),
        (rule_with_template, event()),
    ]
    reasons: list[str] = []
    for rule, change in changes:
        with pytest.raises(MappingError) as caught:
            Mapper([rule]).map(change)
        reasons.append(caught.value.reason)
    failed = Mapper([SAMPLE]).map(event(Op.UPDATE, after={**ROW, "phone": "+1234"}, before=ROW))
    assert failed.failed is not None
    reasons.append(failed.failed)
    for reason in reasons:
        assert digits not in reason, reason


def test_unchanged_toast_columns_keep_their_stored_value() -> None:
    rule = MappingRule(
        table="optin_status", address="phone", user_id="userid", opt_in="optin",
        attributes=("bio",),
    )  # fmt: skip
    event = ChangeEvent(
        op=Op.UPDATE,
        table="optin_status",
        key={"userid": "user1"},
        position="0005",
        after={"userid": "user1", "phone": "+12341111111", "optin": 0},
        extra={"unchanged_toast": ["bio"]},
    )
    (patch,) = Mapper([rule]).map(event).writes
    assert isinstance(patch, EndpointPatch)
    assert patch.opt_out is OptOut.ALL
    assert patch.attributes is None  # "bio" was not sent: the stored value stays

    hidden_opt_in = ChangeEvent(
        op=Op.UPDATE,
        table="optin_status",
        key={"userid": "user1"},
        position="0006",
        after={"userid": "user1", "phone": "+12341111111"},
        extra={"unchanged_toast": ["optin"]},
    )
    (patch,) = Mapper([rule]).map(hidden_opt_in).writes
    assert isinstance(patch, EndpointPatch)
    assert patch.opt_out is None  # not "opted in", not "opted out": unchanged


def test_unchanged_toast_in_the_id_is_refused_with_the_fix() -> None:
    rule = MappingRule(table="t", address="phone", user_id="userid", opt_in="optin")
    event = ChangeEvent(
        op=Op.UPDATE,
        table="t",
        key={"id": 1},
        position="0007",
        after={"userid": "user1", "optin": 1},
        extra={"unchanged_toast": ["phone"]},
    )
    with pytest.raises(MappingError, match="REPLICA IDENTITY FULL"):
        Mapper([rule]).map(event)


@pytest.mark.parametrize("value", [2065550100.0, "2065550100.00", 2065550100, "2065550100"])
def test_a_phone_number_in_a_number_column_keeps_its_digits(value: object) -> None:
    """Found in review: ``str(2065550100.0)`` is ``"2065550100.0"``, which phone parsing read
    as the number +1 20655501000: another person's. DECIMAL(p, 2) prints ``.00`` the same way."""
    rule = replace(SAMPLE, default_region="US")
    assert upsert(rule, phone=value).address == "+12065550100"


def test_a_phone_number_with_a_fraction_goes_to_the_dlq() -> None:
    rule = replace(SAMPLE, default_region="US")
    reason = reason_of(Mapper([rule]), event(after={**ROW, "phone": 2065550100.5}))
    assert "'phone'" in reason and "fraction" in reason
