from __future__ import annotations

import dataclasses

import pytest

from optsync.engine.phone import (
    NormalizedPhone,
    PhonePolicy,
    PhoneType,
    PhoneValidation,
    country_for_address,
    normalize,
    validate_number,
)

WIRE_KEYS = {
    "Carrier",
    "City",
    "CleansedPhoneNumberE164",
    "CleansedPhoneNumberNational",
    "Country",
    "CountryCodeIso2",
    "CountryCodeNumeric",
    "County",
    "OriginalCountryCodeIso2",
    "OriginalPhoneNumber",
    "PhoneType",
    "PhoneTypeCode",
    "Timezone",
    "ZipCode",
}


# normalize


def test_possible_but_invalid_number_keeps_calling_code_country() -> None:
    # +1 234 is an unassigned area code: possible length, not valid.
    assert normalize("+12341111111") == NormalizedPhone("+12341111111", "US")


def test_valid_policy_rejects_possible_but_invalid_number() -> None:
    assert normalize("+12341111111", PhonePolicy.VALID) is None


def test_normalize_strips_formatting() -> None:
    assert normalize("+1 (206) 555-0142") == NormalizedPhone("+12065550142", "US")


def test_normalize_uk_landline() -> None:
    assert normalize("+442079460000") == NormalizedPhone("+442079460000", "GB")


def test_valid_policy_accepts_valid_number() -> None:
    assert normalize("+442079460000", PhonePolicy.VALID) == NormalizedPhone("+442079460000", "GB")


def test_policy_accepts_plain_string_value() -> None:
    assert normalize("+12341111111", PhonePolicy("valid")) is None


@pytest.mark.parametrize("address", ["12", "not a number", "", "+", "+1 12", "+999 1234567"])
def test_normalize_rejects_unparseable_or_impossible(address: str) -> None:
    assert normalize(address) is None


def test_default_region_applies_to_numbers_without_plus() -> None:
    assert normalize("2065550142", default_region="US") == NormalizedPhone("+12065550142", "US")


def test_default_region_accepts_alpha3() -> None:
    assert normalize("020 7946 0000", default_region="GBR") == NormalizedPhone(
        "+442079460000", "GB"
    )


def test_default_region_does_not_override_plus() -> None:
    assert normalize("+442079460000", default_region="US") == NormalizedPhone("+442079460000", "GB")


def test_number_without_plus_needs_a_region() -> None:
    assert normalize("2065550142") is None


def test_local_only_number_is_rejected() -> None:
    # Seven digits can be dialled locally in the US but have no E.164 form.
    assert normalize("555-0142", default_region="US") is None


def test_non_geographic_calling_code_has_no_country() -> None:
    assert normalize("+80012345678") == NormalizedPhone("+80012345678", None)
    assert normalize("+80012345678", PhonePolicy.VALID) == NormalizedPhone("+80012345678", None)


def test_crown_dependency_range_maps_to_its_own_region() -> None:
    assert normalize("+447781123456") == NormalizedPhone("+447781123456", "GG")


def test_country_for_address() -> None:
    assert country_for_address("+442079460000", PhonePolicy.POSSIBLE) == "GB"
    assert country_for_address("+12341111111", PhonePolicy.POSSIBLE) == "US"
    assert country_for_address("+12341111111", PhonePolicy.VALID) is None
    assert country_for_address("garbage", PhonePolicy.POSSIBLE) is None


# PhoneType


def test_phone_type_codes() -> None:
    assert {t: t.code for t in PhoneType} == {
        PhoneType.MOBILE: 0,
        PhoneType.LANDLINE: 1,
        PhoneType.VOIP: 2,
        PhoneType.INVALID: 3,
        PhoneType.OTHER: 4,
        PhoneType.PREPAID: 5,
    }
    assert PhoneType.LANDLINE == "LANDLINE"


# validate_number


def test_validate_us_number_is_mobile() -> None:
    result = validate_number("+12065550142")
    assert result.phone_type is PhoneType.MOBILE
    assert result.phone_type_code == 0
    assert result.country_code_iso2 == "US"
    assert result.country_code_numeric == "1"
    assert result.country == "United States"
    assert result.timezone == "America/Los_Angeles"
    assert result.cleansed_phone_number_e164 == "+12065550142"
    assert result.cleansed_phone_number_national == "2065550142"
    assert result.original_phone_number == "+12065550142"
    assert result.original_country_code_iso2 is None
    assert result.county is None
    assert result.zip_code is None


def test_validate_city_keeps_part_before_comma() -> None:
    # libphonenumber describes 212 as "New York, NY".
    assert validate_number("+12125550142").city == "New York"


def test_validate_possible_but_invalid_number() -> None:
    result = validate_number("+12341111111")
    assert result.phone_type is PhoneType.INVALID
    assert result.phone_type_code == 3
    assert result.cleansed_phone_number_e164 == "+12341111111"
    assert result.cleansed_phone_number_national == "2341111111"
    assert result.country_code_iso2 == "US"
    assert result.country_code_numeric == "1"
    assert result.city is None
    assert result.timezone is None
    assert result.carrier is None
    assert result.country is None


def test_validate_toll_free_is_other() -> None:
    result = validate_number("+18005550199")
    assert result.phone_type is PhoneType.OTHER
    assert result.phone_type_code == 4
    assert result.country_code_iso2 == "US"


def test_validate_garbage_is_invalid() -> None:
    result = validate_number("garbage")
    assert result == PhoneValidation(
        original_phone_number="garbage",
        phone_type=PhoneType.INVALID,
        phone_type_code=3,
    )


def test_validate_uk_mobile() -> None:
    result = validate_number("+447400123456")
    assert result.phone_type is PhoneType.MOBILE
    assert result.phone_type_code == 0
    assert result.country_code_iso2 == "GB"
    assert result.country_code_numeric == "44"
    assert result.country == "United Kingdom"
    assert result.cleansed_phone_number_national == "7400123456"
    # The geocoder only says "United Kingdom", which repeats the country.
    assert result.city is None
    assert result.carrier  # libphonenumber knows the range's original carrier


def test_validate_uk_landline() -> None:
    result = validate_number("+442079460000")
    assert result.phone_type is PhoneType.LANDLINE
    assert result.phone_type_code == 1
    assert result.city == "London"
    assert result.timezone == "Europe/London"


def test_validate_with_alpha3_hint() -> None:
    result = validate_number("2065550142", "USA")
    assert result.phone_type is PhoneType.MOBILE
    assert result.cleansed_phone_number_e164 == "+12065550142"
    assert result.original_country_code_iso2 == "US"
    assert result.original_phone_number == "2065550142"


def test_validate_with_lowercase_alpha2_hint() -> None:
    result = validate_number("020 7946 0000", "gb")
    assert result.cleansed_phone_number_e164 == "+442079460000"
    assert result.original_country_code_iso2 == "GB"


def test_validate_without_hint_or_plus_is_invalid() -> None:
    result = validate_number("2065550142")
    assert result.phone_type is PhoneType.INVALID
    assert result.cleansed_phone_number_e164 is None


def test_validate_non_geographic_number_has_no_country() -> None:
    result = validate_number("+80012345678")
    assert result.phone_type is PhoneType.OTHER
    assert result.country_code_numeric == "800"
    assert result.country_code_iso2 is None
    assert result.country is None


# PhoneValidation.to_wire


def test_wire_keys_cover_every_field() -> None:
    full = PhoneValidation(
        carrier="x",
        city="x",
        cleansed_phone_number_e164="x",
        cleansed_phone_number_national="x",
        country="x",
        country_code_iso2="x",
        country_code_numeric="x",
        county="x",
        original_country_code_iso2="x",
        original_phone_number="x",
        phone_type=PhoneType.OTHER,
        phone_type_code=4,
        timezone="x",
        zip_code="x",
    )
    # Every dataclass field has a wire key: a new field cannot be forgotten in to_wire.
    assert len(dataclasses.fields(PhoneValidation)) == len(WIRE_KEYS)
    wire = full.to_wire()
    assert set(wire) == WIRE_KEYS
    assert wire["PhoneType"] == "OTHER"
    assert type(wire["PhoneType"]) is str
    assert wire["PhoneTypeCode"] == 4


def test_wire_leaves_out_none() -> None:
    wire = validate_number("+12341111111").to_wire()
    assert wire == {
        "CleansedPhoneNumberE164": "+12341111111",
        "CleansedPhoneNumberNational": "2341111111",
        "CountryCodeIso2": "US",
        "CountryCodeNumeric": "1",
        "OriginalPhoneNumber": "+12341111111",
        "PhoneType": "INVALID",
        "PhoneTypeCode": 3,
    }


def test_wire_of_valid_number() -> None:
    wire = validate_number("+12065550142").to_wire()
    assert set(wire) <= WIRE_KEYS
    assert wire["PhoneType"] == "MOBILE"
    assert wire["PhoneTypeCode"] == 0
    assert wire["CountryCodeIso2"] == "US"
    assert "County" not in wire
    assert "ZipCode" not in wire


def test_mismatched_phone_type_code_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        PhoneValidation(phone_type=PhoneType.MOBILE, phone_type_code=3)


def test_e164_fast_parse_equals_libphonenumber_parse() -> None:
    """The split shortcut gives libphonenumber's own parse, neighbours included."""
    import random

    import phonenumbers

    from optsync.engine import phone

    rng = random.Random(5)
    codes = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
    shortcut = 0
    for _ in range(600):
        code = rng.choice(codes)
        head = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 8)))
        for _ in range(5):  # neighbours: only the last four digits differ
            text = f"+{code}{head}{rng.randint(0, 9999):04d}"
            fast = phone._parse_e164(text)
            try:
                expected = phonenumbers.parse(text, None)
            except phonenumbers.NumberParseException:
                expected = None
            if fast is not None:  # None: the caller parses with libphonenumber
                shortcut += 1
                assert fast == expected, text
    assert shortcut > 1000, "the shortcut was hardly exercised"
