"""Personal data and secrets out of sight: phone numbers, e-mail addresses, URL passwords.

One module for every place that shows text a person or a secret may be in. Three forms:

- ``mask(text)`` is how logs show it (``PersonalDataFilter`` at INFO and above, audit files,
  error texts from libraries): a phone number becomes its last two digits (``***42``), however
  it is written (E.164, ``(555) 123-4567``, ``1-555-123-4567``, a bare run of ten digits, or
  percent-encoded in a URL as ``%2B1206...``), an e-mail address keeps only its domain
  (``***@example.com``), and the password of any URL becomes ``***``. ISO-8601 timestamps and
  hex ids (request ids are UUIDs) are left as they are, digits and all.
- ``mask_address(address)`` and ``mask_text(text)`` are how the console and the preference
  center show an address until the operator asks to see it: a phone number keeps its first five
  and last two characters (``+1234•••••11``), an e-mail address the
  first letter of its local part and its domain (``j•••@example.com``), anything
  else (push tokens) its first four and last two characters.
- ``redact_url(url)`` is how configuration errors, status lines and connection banners name a
  database or server: the password after ``user:`` and any ``password=`` value become ``***``.
"""

from __future__ import annotations

import re

__all__ = ("DOT", "mask", "mask_address", "mask_text", "redact_url")

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# Tried at each place before the phone numbers, so that their digits are left alone:
_KEEP = (
    # an ISO-8601 date or timestamp (2026-12-03T06:45:49.123Z, 2026-12-03 06:45:49+00:00);
    r"(?P<time>(?<!\d)\d{4}-\d{2}-\d{2}"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?)"
    # a hex id (request ids are UUIDs): hex groups joined by dashes, holding a letter a-f or
    # in a UUID's 8-4-4-4-12 shape; its length is checked in ``_masked``.
    r"|(?P<hexid>(?<![0-9A-Za-z])(?:[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
    r"|(?=(?:[0-9]|-(?=[0-9A-Fa-f]))*[A-Fa-f])[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*)(?![0-9A-Za-z]))"
)
_PHONES = (
    # E.164 (the form optsync stores), or written with spaces, dots, dashes or brackets;
    r"\+\d{7,15}(?!\d)"
    r"|\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]\d{1,4}){2,6}(?!\d|[.-]\d)"
    # a national number as people write it: (555) 123-4567, 1-555-123-4567, 555.123.4567;
    r"|(?<![\d.])(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[.-])\d{3}[ .-]\d{4}(?!\d|[.-]\d)"
    # a bare run of 10 or more digits.
    r"|(?<![\d.])\d{10,}(?![\d.])"
)
_PHONE = re.compile(_PHONES)
_PHONE_OR_KEPT = re.compile(f"{_KEEP}|(?P<phone>{_PHONES})")
_MIN_HEX_ID = 8
"""Hex characters a hex id has at least (twice that with dashes: 'ab-555-123-4567' is no id)."""


# A phone number percent-encoded in a URL (an endpoint id such as u1_%2B12065550101): ``%2B``
# would otherwise join its digits into a hex id.
_ENCODED_PHONE = re.compile(r"(?i)%2B(\d{7,15})(?!\d)")

# The password of a URL (scheme://user:password@host), however it is written.
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:\s/@]*):[^@\s]*@")


def _hidden(number: str) -> str:
    """A phone number as logs show it: its last two digits."""
    digits = re.sub(r"\D", "", number)
    return "***" + digits[-2:] if len(digits) >= 7 else number


def _masked(match: re.Match[str]) -> str:
    text = match.group(0)
    if match.group("time") is not None:
        return text
    if match.group("phone") is not None:
        return _hidden(text)
    hex_digits = len(text) - text.count("-")
    if hex_digits >= (2 * _MIN_HEX_ID if "-" in text else _MIN_HEX_ID):
        return text
    return _PHONE.sub(lambda m: _hidden(m.group(0)), text)  # too short for an id


def mask(text: str) -> str:
    """Replace e-mail addresses and phone numbers, keeping the last two digits as a hint, and
    the password of any URL; hex ids (UUIDs) and ISO-8601 timestamps are left as they are."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _ENCODED_PHONE.sub(lambda m: "%2B" + _hidden(m.group(1)), text)
    text = _EMAIL.sub(lambda m: "***@" + m.group(0).split("@", 1)[1], text)
    return _PHONE_OR_KEPT.sub(_masked, text)


def redact_url(url: str) -> str:
    """``url`` with the password after ``user:`` and any ``password=`` value replaced by ***.

    Text that is no valid URL is redacted the same way, never quoted whole.
    """
    text = re.sub(r"(?i)(password=)[^&;\s]*", r"\1***", url)
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@?#]*):[^@/?#]*@", r"\1:***@", text, flags=re.I)


DOT = "\u2022"

_SHOWN_PHONE = re.compile(r"\+\d{7,15}(?!\d)|(?<![\d.])\d{10,}(?![\d.])")


def mask_address(address: str | None) -> str:
    """The address with its middle hidden (empty text for no address)."""
    if not address:
        return ""
    if "@" in address:
        local, _, domain = address.rpartition("@")
        return f"{local[:1]}{DOT * 3}@{domain}"
    keep_head = 5 if address[:1] == "+" or address[:1].isdigit() else 4
    if len(address) <= keep_head + 2:
        return DOT * max(len(address) - 2, 1) + address[-2:]
    hidden = len(address) - keep_head - 2
    return address[:keep_head] + DOT * min(hidden, 12) + address[-2:]


def mask_text(text: str) -> str:
    """``text`` with every phone number and e-mail address in it masked (endpoint ids)."""
    text = _EMAIL.sub(lambda m: mask_address(m.group(0)), text)
    return _SHOWN_PHONE.sub(lambda m: mask_address(m.group(0)), text)
