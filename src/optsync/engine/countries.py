"""ISO 3166-1 country codes: alpha-3 to alpha-2, and the English names Pinpoint prints.

Backed by `pycountry`; lookups are cached because the same few codes recur on every request.
"""

from __future__ import annotations

from functools import lru_cache

import pycountry

__all__ = ("country_name", "to_alpha2")

# Pinpoint prints these short names; pycountry's may differ between releases.
_NAME_OVERRIDES = {"US": "United States", "GB": "United Kingdom"}


@lru_cache(maxsize=512)
def to_alpha2(code: str) -> str | None:
    """Return the upper-case alpha-2 code for an alpha-2 or alpha-3 `code`, or None if unknown."""
    key = code.strip()
    if not key.isascii() or not key.isalpha():
        return None
    if len(key) == 2:
        country = pycountry.countries.get(alpha_2=key)
    elif len(key) == 3:
        country = pycountry.countries.get(alpha_3=key)
    else:
        return None
    if country is None:
        return None
    return str(country.alpha_2).upper()


@lru_cache(maxsize=512)
def country_name(alpha2: str) -> str | None:
    """Return the English short name for an alpha-2 code ("US" -> "United States"), or None."""
    key = alpha2.strip().upper()
    if key in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[key]
    if len(key) != 2 or not key.isascii() or not key.isalpha():
        return None
    country = pycountry.countries.get(alpha_2=key)
    if country is None:
        return None
    common = getattr(country, "common_name", None)
    return str(common) if common else str(country.name)
