"""Logging set-up for the command line, with personal data masked.

Library modules only call ``logging.getLogger(__name__)``; the CLI installs ``PersonalDataFilter``
so that a phone number or e-mail address that slips into a message at INFO or above is masked.
"""

from __future__ import annotations

import logging
import re

__all__ = ("PersonalDataFilter", "configure_logging", "mask")

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
# An E.164 number (the form optsync stores), or a bare run of 10 or more digits.
_PHONE = re.compile(r"\+\d{7,15}(?!\d)|(?<![\d.])\d{10,}(?![\d.])")


# The password of a URL (scheme://user:password@host), however it is written.
_URL_PASSWORD = re.compile(r"(?i)([a-z][a-z0-9+.-]*://[^:\s/@]*):[^@\s]*@")


def mask(text: str) -> str:
    """Replace e-mail addresses and phone numbers, keeping the last two digits as a hint, and
    the password of any URL."""
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    text = _EMAIL.sub(lambda m: "***@" + m.group(0).split("@", 1)[1], text)
    return _PHONE.sub(lambda m: "***" + re.sub(r"\D", "", m.group(0))[-2:], text)


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
