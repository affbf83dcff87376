"""Phone numbers: E.164 normalization for endpoint addresses and an offline PhoneNumberValidate.

Built on `phonenumbers` (libphonenumber's metadata); nothing here touches the network.

Policies:

- `normalize` accepts, under `PhonePolicy.POSSIBLE` (the default), every number whose length is
  possible for its calling code, even when libphonenumber calls it invalid (for instance the
  unassigned +1 234 area code); its country is then the calling code's main region (+1 -> "US").
  Numbers that are possible only for local dialling (a seven-digit US number) are rejected: they
  have no E.164 form. Under `PhonePolicy.VALID` only numbers libphonenumber calls valid pass.
  Calling codes without a single region (+800, +979, ...) give a number with country None.
- `validate_number` maps libphonenumber's number type onto Pinpoint's PhoneType. Invalid or
  unparseable input is INVALID and carries no carrier, city, time zone or country name.
  FIXED_LINE_OR_MOBILE becomes MOBILE: NANP and some other plans cannot tell mobile from landline
  offline, and Pinpoint's carrier data reports most consumer NANP numbers as MOBILE; a LANDLINE
  verdict would block SMS to every US number. TOLL_FREE, PREMIUM_RATE, SHARED_COST,
  PERSONAL_NUMBER, PAGER, UAN, VOICEMAIL and UNKNOWN become OTHER. PREPAID is never reported.
  County and ZipCode are never filled: they need carrier data that is not available offline.
  City is libphonenumber's geocoder description up to the first ", " ("New York, NY" ->
  "New York"), left out when it merely repeats the country; it may name a state or a region.
  Timezone is the first zone libphonenumber lists for the number; where a range spans several
  zones that is merely the alphabetically first ("Europe/Guernsey" for a GB mobile,
  "America/Adak" for a NANP toll-free number).

Known divergences from Pinpoint:

- libphonenumber calls the fictional US 555-01xx numbers valid (so MOBILE here); Pinpoint
  reports them as OTHER.
- Some +44 ranges belong to Guernsey, Jersey or the Isle of Man, so CountryCodeIso2 is "GG",
  "JE" or "IM" where Pinpoint may say "GB".
- Carrier names come from libphonenumber's original-allocation tables: number portability is
  invisible, and NANP numbers have no carrier at all.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import phonenumbers
from phonenumbers import (
    NumberParseException,
    PhoneNumber,
    PhoneNumberFormat,
    PhoneNumberType,
    ValidationResult,
)

from optsync.engine.countries import country_name, to_alpha2

__all__ = (
    "NormalizedPhone",
    "PhonePolicy",
    "PhoneType",
    "PhoneValidation",
    "country_for_address",
    "normalize",
    "validate_number",
)

# libphonenumber's answers for "no region": unknown ("ZZ") and non-geographic entity ("001").
_NO_REGION = frozenset({phonenumbers.UNKNOWN_REGION, phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY})


class PhonePolicy(StrEnum):
    """Which numbers `normalize` accepts."""

    POSSIBLE = "possible"
    VALID = "valid"


@dataclass(frozen=True)
class NormalizedPhone:
    """A number in E.164 form and its country (alpha-2), None for non-geographic codes."""

    e164: str
    country: str | None


class PhoneType(StrEnum):
    """Pinpoint's PhoneType; `code` is its PhoneTypeCode."""

    MOBILE = "MOBILE"
    LANDLINE = "LANDLINE"
    VOIP = "VOIP"
    INVALID = "INVALID"
    OTHER = "OTHER"
    PREPAID = "PREPAID"

    @property
    def code(self) -> int:
        """Pinpoint's numeric PhoneTypeCode for this type."""
        return _PHONE_TYPE_CODES[self]


_PHONE_TYPE_CODES: dict[PhoneType, int] = {
    PhoneType.MOBILE: 0,
    PhoneType.LANDLINE: 1,
    PhoneType.VOIP: 2,
    PhoneType.INVALID: 3,
    PhoneType.OTHER: 4,
    PhoneType.PREPAID: 5,
}

# Types missing here (toll free, premium rate, shared cost, pager, UAN, ...) are OTHER.
_NUMBER_TYPES: dict[int, PhoneType] = {
    PhoneNumberType.MOBILE: PhoneType.MOBILE,
    PhoneNumberType.FIXED_LINE: PhoneType.LANDLINE,
    PhoneNumberType.FIXED_LINE_OR_MOBILE: PhoneType.MOBILE,
    PhoneNumberType.VOIP: PhoneType.VOIP,
}

# (attribute, Pinpoint's JSON key), in Pinpoint's order.
_WIRE_KEYS = (
    ("carrier", "Carrier"),
    ("city", "City"),
    ("cleansed_phone_number_e164", "CleansedPhoneNumberE164"),
    ("cleansed_phone_number_national", "CleansedPhoneNumberNational"),
    ("country", "Country"),
    ("country_code_iso2", "CountryCodeIso2"),
    ("country_code_numeric", "CountryCodeNumeric"),
    ("county", "County"),
    ("original_country_code_iso2", "OriginalCountryCodeIso2"),
    ("original_phone_number", "OriginalPhoneNumber"),
    ("phone_type", "PhoneType"),
    ("phone_type_code", "PhoneTypeCode"),
    ("timezone", "Timezone"),
    ("zip_code", "ZipCode"),
)


@dataclass(frozen=True, kw_only=True)
class PhoneValidation:
    """Pinpoint's NumberValidateResponse, field for field."""

    carrier: str | None = None
    city: str | None = None
    cleansed_phone_number_e164: str | None = None
    cleansed_phone_number_national: str | None = None
    country: str | None = None
    country_code_iso2: str | None = None
    country_code_numeric: str | None = None
    county: str | None = None
    original_country_code_iso2: str | None = None
    original_phone_number: str | None = None
    phone_type: PhoneType
    phone_type_code: int
    timezone: str | None = None
    zip_code: str | None = None

    def __post_init__(self) -> None:
        if self.phone_type_code != PhoneType(self.phone_type).code:
            raise ValueError(
                f"phone_type_code {self.phone_type_code} does not match phone_type "
                f"{self.phone_type}"
            )

    def to_wire(self) -> dict[str, str | int]:
        """Return the PascalCase JSON object Pinpoint sends, without the fields that are None."""
        wire: dict[str, str | int] = {}
        for attribute, key in _WIRE_KEYS:
            value: str | int | None = getattr(self, attribute)
            if value is None:
                continue
            # A StrEnum is a str; send its plain value so encoders need no special case.
            wire[key] = value.value if isinstance(value, PhoneType) else value
        return wire


@functools.lru_cache(maxsize=65_536)  # the same numbers come back with every opt-in change
def normalize(
    address: str,
    policy: PhonePolicy = PhonePolicy.POSSIBLE,
    default_region: str | None = None,
) -> NormalizedPhone | None:
    """Return `address` in E.164 form with its country, or None if unparseable or rejected.

    `default_region` (alpha-2 or alpha-3) is used for numbers written without a leading '+'.
    """
    policy = PhonePolicy(policy)
    region = to_alpha2(default_region) if default_region else None
    number = _parse_e164(address) or _parse(address, region)
    if number is None:
        return None
    region_code, valid = _region_and_validity(number)
    if policy == PhonePolicy.VALID and not valid:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != ValidationResult.IS_POSSIBLE:
        return None
    country = _region(region_code) if valid else _calling_code_region(number)
    result = NormalizedPhone(_e164(number), country)
    if len(_COUNTRY_BY_E164) >= _PREFIX_CACHE_LIMIT:
        _COUNTRY_BY_E164.clear()
    _COUNTRY_BY_E164[(result.e164, policy)] = country
    return result


# (calling code, national number without its last four digits) -> region of a valid number.
_REGION_BY_PREFIX: dict[tuple[int, str], str] = {}
_PREFIX_CACHE_LIMIT = 100_000


def _region_and_validity(number: phonenumbers.PhoneNumber) -> tuple[str | None, bool]:
    """``region_code_for_number`` and ``is_valid_number`` in one pass, usually one region check.

    Finding the region of a +1 number tests it against every NANP region (about 25). Numbers
    that share all but their last four digits share their region, so a region found once is
    tried first for its neighbours; it is used only if the number is valid there, and
    otherwise the full search runs, so the answer is the same as libphonenumber's.
    """
    national = phonenumbers.national_significant_number(number)
    key = (number.country_code or 0, national[:-4])
    hint = _REGION_BY_PREFIX.get(key)
    if hint is not None and phonenumbers.is_valid_number_for_region(number, hint):
        return hint, True
    region_code = phonenumbers.region_code_for_number(number)
    valid = region_code is not None and phonenumbers.is_valid_number_for_region(number, region_code)
    if valid and region_code is not None:
        if len(_REGION_BY_PREFIX) >= _PREFIX_CACHE_LIMIT:
            _REGION_BY_PREFIX.clear()
        _REGION_BY_PREFIX[key] = region_code
    return region_code, valid


# (E.164 number, policy) -> country, filled by ``normalize``: the mapper normalises a number and
# the engine then derives the country of the same E.164 string without parsing it again.
_COUNTRY_BY_E164: dict[tuple[str, PhonePolicy], str | None] = {}


def remember_countries(found: Sequence[tuple[str, str | None]], policy: PhonePolicy) -> None:
    """Take (E.164 number, country) pairs another process derived with
    ``country_for_address(number, policy)``, so this process answers them from memory (apply's
    mapping stage parses the numbers; the engine, in the apply process, only looks them up)."""
    if len(_COUNTRY_BY_E164) + len(found) >= _PREFIX_CACHE_LIMIT:
        _COUNTRY_BY_E164.clear()
    policy = PhonePolicy(policy)
    for number, country in found:
        _COUNTRY_BY_E164[(number, policy)] = country


def country_for_address(address: str, policy: PhonePolicy = PhonePolicy.POSSIBLE) -> str | None:
    """Return the alpha-2 country of a phone address, or None if unknown or rejected."""
    key = (address, PhonePolicy(policy))
    if key in _COUNTRY_BY_E164:
        return _COUNTRY_BY_E164[key]
    normalized = normalize(address, policy)
    return normalized.country if normalized is not None else None


def validate_number(phone_number: str, iso_country_code: str | None = None) -> PhoneValidation:
    """Answer Pinpoint's PhoneNumberValidate offline; see the module docstring for the rules.

    `iso_country_code` (alpha-2 or alpha-3) is the region for numbers written without '+'.
    """
    hint = (iso_country_code or "").strip()
    hint_alpha2 = to_alpha2(hint) if hint else None
    # Pinpoint echoes the hint it was sent; an unknown one is echoed as given.
    original_iso2 = hint_alpha2 or hint.upper() or None
    number = _parse(phone_number, hint_alpha2)
    if number is None:
        return PhoneValidation(
            original_phone_number=phone_number,
            original_country_code_iso2=original_iso2,
            phone_type=PhoneType.INVALID,
            phone_type_code=PhoneType.INVALID.code,
        )
    numeric = str(number.country_code) if number.country_code is not None else None
    if not phonenumbers.is_valid_number(number):
        return PhoneValidation(
            cleansed_phone_number_e164=_e164(number),
            cleansed_phone_number_national=phonenumbers.national_significant_number(number),
            country_code_iso2=_calling_code_region(number),
            country_code_numeric=numeric,
            original_country_code_iso2=original_iso2,
            original_phone_number=phone_number,
            phone_type=PhoneType.INVALID,
            phone_type_code=PhoneType.INVALID.code,
        )
    # Carrier, geocoder and time-zone data take about 110 MB once imported: only the
    # PhoneNumberValidate route needs them, so every other process (capture, apply, mapping)
    # leaves them out.
    from phonenumbers import carrier  # noqa: PLC0415

    phone_type = _NUMBER_TYPES.get(phonenumbers.number_type(number), PhoneType.OTHER)
    iso2 = _region(phonenumbers.region_code_for_number(number))
    country = country_name(iso2) if iso2 is not None else None
    return PhoneValidation(
        carrier=carrier.name_for_number(number, "en") or None,
        city=_city(number, country),
        cleansed_phone_number_e164=_e164(number),
        cleansed_phone_number_national=phonenumbers.national_significant_number(number),
        country=country,
        country_code_iso2=iso2,
        country_code_numeric=numeric,
        original_country_code_iso2=original_iso2,
        original_phone_number=phone_number,
        phone_type=phone_type,
        phone_type_code=phone_type.code,
        timezone=_timezone(number),
    )


_E164_TEXT = re.compile(r"\+[1-9][0-9]{6,14}")
# (calling code, national number without its last four digits, its length) of numbers whose
# parse was seen to be the plain split of their E.164 text into calling code and digits.
_PLAIN_SPLITS: set[tuple[int, str, int]] = set()


def _parse_e164(text: str) -> PhoneNumber | None:
    """Parse canonical E.164 text (``+`` and digits) without libphonenumber's parser.

    ``phonenumbers.parse`` costs about 10 µs, most of a new number's normalisation. For text
    that is already E.164, the parse is usually just the split into calling code and national
    number; the split is used once libphonenumber's own parse of a neighbour (same calling code,
    same digits but the last four, same length) gave exactly that split, so national-prefix
    stripping and leading zeros, which depend on the leading digits, are still libphonenumber's
    call. Returns None when the caller must parse.
    """
    if not _E164_TEXT.fullmatch(text):
        return None
    digits = text[1:]
    for length in (1, 2, 3):
        calling_code = int(digits[:length])
        if calling_code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            national = digits[length:]
            break
    else:
        return None
    key = (calling_code, national[:-4], len(national))
    plain = PhoneNumber(country_code=calling_code, national_number=int(national))
    if key in _PLAIN_SPLITS:
        return plain
    parsed = _parse(text, None)
    if parsed is not None and parsed == plain:
        if len(_PLAIN_SPLITS) >= _PREFIX_CACHE_LIMIT:
            _PLAIN_SPLITS.clear()
        _PLAIN_SPLITS.add(key)
    return parsed


def _parse(text: str, region: str | None) -> PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except NumberParseException:
        return None


def _e164(number: PhoneNumber) -> str:
    return phonenumbers.format_number(number, PhoneNumberFormat.E164)


def _region(code: str | None) -> str | None:
    return None if code is None or code in _NO_REGION else code


def _calling_code_region(number: PhoneNumber) -> str | None:
    if number.country_code is None:
        return None
    return _region(phonenumbers.region_code_for_country_code(number.country_code))


def _city(number: PhoneNumber, country: str | None) -> str | None:
    from phonenumbers import geocoder  # noqa: PLC0415 (see validate_number)

    description = geocoder.description_for_number(number, "en")
    if not description or description == country:
        return None
    city = description.split(", ", 1)[0]
    return city if city and city != country else None


def _timezone(number: PhoneNumber) -> str | None:
    from phonenumbers import timezone as phone_timezone  # noqa: PLC0415 (see validate_number)

    zones = phone_timezone.time_zones_for_number(number)
    if not zones or zones[0] == phone_timezone.UNKNOWN_TIMEZONE:
        return None
    return zones[0]
