"""``optsync.logs``: the filter that masks personal data in log records at INFO and above."""

import logging
import sys

from optsync.logs import PersonalDataFilter


def test_filter_masks_info_but_not_debug() -> None:
    f = PersonalDataFilter()
    info = logging.LogRecord("x", logging.INFO, __file__, 1, "addr=%s", ("+12065550142",), None)
    debug = logging.LogRecord("x", logging.DEBUG, __file__, 1, "addr=%s", ("+12065550142",), None)
    assert f.filter(info) and f.filter(debug)
    assert info.getMessage() == "addr=***42"
    assert debug.getMessage() == "addr=+12065550142"


def test_filter_masks_the_traceback_of_a_logged_exception() -> None:
    """Found in review: only the message was masked, not the exception text under it."""
    try:
        raise ValueError("bad address +15551234567 of bob@example.com via mysql://u:pw@db/x")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "stopped", None, sys.exc_info())
    handler = logging.StreamHandler()
    handler.addFilter(PersonalDataFilter())
    assert handler.filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert "ValueError: bad address ***67 of ***@example.com via mysql://u:***@db/x" in text
    assert "+15551234567" not in text and "bob@" not in text and ":pw@" not in text
