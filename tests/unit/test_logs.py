import logging
import sys

import pytest

from optsync.logs import PersonalDataFilter, mask


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("endpoint user1_+12341111111 written", "endpoint user1_***11 written"),
        ("raw 2065550142 seen", "raw ***42 seen"),
        ("mail bob@example.com", "mail ***@example.com"),
        ("listening on 127.0.0.1:8080", "listening on 127.0.0.1:8080"),
        ("at 2026-11-27 14:25:27 took 12.5 ms", "at 2026-11-27 14:25:27 took 12.5 ms"),
        ('invalid dsn "postgresql://u:S3cret@h/db"', 'invalid dsn "postgresql://u:***@h/db"'),
        ("mysql://root@db:3306/app", "mysql://root@db:3306/app"),
    ],
)
def test_mask(text: str, expected: str) -> None:
    assert mask(text) == expected


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
