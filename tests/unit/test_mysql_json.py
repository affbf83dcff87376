"""MySQL binary JSON as the binlog library decodes it, printed as MySQL prints it."""

from __future__ import annotations

import datetime as dt
import decimal

from optsync.capture.mysql.values import _json_text


def test_dates_and_times_inside_json_are_printed_not_refused() -> None:
    """Found in review: a datetime inside a JSON value (JSON_OBJECT('at', NOW())) raised
    TypeError, which stopped the MySQL capture at that event every time it restarted."""
    value = {
        b"at": dt.datetime(2026, 11, 27, 23, 1, 2, 345678),  # noqa: DTZ001 - as the library gives it
        b"day": dt.date(2026, 11, 27),
        b"clock": dt.time(8, 30),
        b"took": -dt.timedelta(hours=1, minutes=2, seconds=3),
        b"price": decimal.Decimal("12.5"),
        b"tags": [b"a", 1, None, True],
    }
    assert _json_text(value) == (
        '{"at": "2026-11-27 23:01:02.345678", "day": "2026-11-27", "clock": "08:30:00.000000", '
        '"took": "-01:02:03.000000", "price": 12.5, "tags": ["a", 1, null, true]}'
    )
