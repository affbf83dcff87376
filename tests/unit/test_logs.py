import logging
import random
import re
import sys
import uuid

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
        ("call (555) 123-4567 now", "call ***67 now"),
        ("call 555-123-4567 or 555.123.4568", "call ***67 or ***68"),
        ("to +1 234 111 1116.", "to ***16."),
        ("to +1 (234) 111-1116, +44 20 7123 4567", "to ***16, ***67"),
        ("to 1-555-123-4567", "to ***67"),
        ("request_id=12345678-1234-4234-8234-123456789012", None),
        ("request_id=5f0c1d2e-8a7b-4b44d-9d2e-a1b2c3d457fb", None),
        ("trace=0a1234567890ff span=5F0C1D2E8A7B4B44", None),
        ("at 2026-12-03T06:45:49.123Z and 2026-12-03T06:45:49+00:00", None),
        ("user1_2065550142 and id=7-2065550142", "user1_***42 and id=7-***42"),
        ("x=ab-555-123-4567 y=12-555-123-4567", "x=ab-***67 y=12-***67"),
        ("GET /v1/apps/a/endpoints/u1_%2B12065550101", "GET /v1/apps/a/endpoints/u1_%2B***01"),
        ("url=/e/u1_%2b12065550101?x=1", "url=/e/u1_%2B***01?x=1"),
    ],
)
def test_mask(text: str, expected: str | None) -> None:
    """``expected`` None: the text is left as it is."""
    assert mask(text) == (text if expected is None else expected)


def test_request_ids_survive_masking() -> None:
    """Issue 13: a UUID with ten digits in a row lost them, so it no longer matched the client's."""
    rng = random.Random(13)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2000)]
    assert any(re.search(r"\d{10}", i) for i in ids)  # the case that was mangled is here
    line = " ".join(f"request_id={i}" for i in ids)
    assert mask(line) == line


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
