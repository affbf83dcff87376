"""Logging set-up for the command line, with personal data masked.

Library modules only call ``logging.getLogger(__name__)``; the CLI installs ``PersonalDataFilter``
so that a phone number or e-mail address that slips into a message at INFO or above is masked.
"""

from __future__ import annotations

import logging
import re

__all__ = ("PersonalDataFilter", "configure_logging", "mask")

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


class PersonalDataFilter(logging.Filter):
    """Masks phone numbers, e-mail addresses and URL passwords in records at INFO and above,
    in the message and in the traceback of an exception logged with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            record.msg = mask(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                # Formatters use exc_text when it is set: the exception's text is masked too.
                record.exc_text = mask(_TRACEBACKS.formatException(record.exc_info))
        return True


_TRACEBACKS = logging.Formatter()


def configure_logging(level: int = logging.INFO) -> None:
    """Key=value lines on stderr, personal data masked."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(PersonalDataFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # psycopg's pool logs every failed reconnect attempt as a WARNING (several a second during
    # an outage); optsync's own retry loop logs one line per outage instead (``Backoff``).
    logging.getLogger("psycopg").setLevel(logging.ERROR)
