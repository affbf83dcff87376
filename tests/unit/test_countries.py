from __future__ import annotations

import pytest

from optsync.engine.countries import country_name, to_alpha2


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("US", "US"),
        ("us", "US"),
        ("USA", "US"),
        ("usa", "US"),
        ("GBR", "GB"),
        ("gb", "GB"),
        ("  deu ", "DE"),
        (" fr", "FR"),
    ],
)
def test_to_alpha2_accepts_alpha2_and_alpha3(code: str, expected: str) -> None:
    assert to_alpha2(code) == expected


@pytest.mark.parametrize("code", ["", "   ", "ZZ", "XXX", "U", "UNITED", "840", "U1", "ÜS"])
def test_to_alpha2_returns_none_for_unknown_codes(code: str) -> None:
    assert to_alpha2(code) is None


@pytest.mark.parametrize(
    ("alpha2", "expected"),
    [
        ("US", "United States"),
        ("us", "United States"),
        ("GB", "United Kingdom"),
        ("DE", "Germany"),
        ("FR", "France"),
        # pycountry's common_name is preferred over its formal name.
        ("KR", "South Korea"),
        ("TW", "Taiwan"),
        ("BO", "Bolivia"),
    ],
)
def test_country_name(alpha2: str, expected: str) -> None:
    assert country_name(alpha2) == expected


@pytest.mark.parametrize("alpha2", ["", "ZZ", "USA", "1", "00"])
def test_country_name_returns_none_for_unknown_codes(alpha2: str) -> None:
    assert country_name(alpha2) is None
