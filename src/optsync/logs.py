"""Logging set-up for the command line, with personal data masked.

Library modules only call ``logging.getLogger(__name__)``; the CLI installs ``PersonalDataFilter``
so that a phone number or e-mail address that slips into a message at INFO or above is masked.
"""

from __future__ import annotations

import logging

from optsync.redaction import mask

__all__ = ("PersonalDataFilter", "configure_logging")


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
