import logging

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
