"""Hypothesis strategies shared by the fuzzers: JSON values, rows and near-valid records."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from optsync.apply.mapping import MappingRule
from optsync.engine.models import ChannelType
from optsync.events import Op

SAMPLE_RULE = MappingRule(
    table="optin_status",
    channel=ChannelType.SMS,
    address="phone",
    user_id="userid",
    opt_in="optin",
    effective_date="lastupdate",
)
"""The sample app's rule (``optsync up``): the table the fuzzed rows are shaped after."""

# Text that reaches parsers: any code point (lone surrogates included) now and then.
TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "0", "1", "true", "null", "\x00", "\ud800", "+12065550100"]),
)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 2**63, 1e300, 1.5, 1.7e18, -1e17]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
"""Any JSON value (no NaN or infinity: ``json.dumps`` would write them as non-JSON words)."""

COLUMNS = ("userid", "phone", "optin", "lastupdate", "email", "note")
COLUMN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "userid": st.one_of(st.from_regex(r"user[0-9]{1,3}", fullmatch=True), SCALARS),
    "phone": st.one_of(
        st.from_regex(r"\+1206555[0-9]{4}", fullmatch=True),
        st.from_regex(r"[0-9 ()+-]{0,16}", fullmatch=True),
        NUMBERS,
        SCALARS,
    ),
    "optin": st.one_of(st.sampled_from([0, 1, "0", "1", "yes", "no", True, False]), SCALARS),
    "lastupdate": st.one_of(st.sampled_from(["2021-01-01T00:00:00Z", "1700000000"]), NUMBERS),
    "email": st.one_of(st.emails(), TEXT),
    "note": st.one_of(TEXT, st.text(min_size=90, max_size=120)),
}
ROWS = st.fixed_dictionaries({}, optional=COLUMN_VALUES)
"""Rows of the sample table: plausible values most of the time, any JSON value now and then."""

POSITIONS = st.one_of(
    st.from_regex(r"[0-9]{20}", fullmatch=True),
    st.from_regex(r"mysql-bin\.[0-9]{6}:[0-9]{1,12}(:[0-9]{1,6})?", fullmatch=True),
    TEXT,
)


@st.composite
def dms_records(draw: st.DrawFn) -> dict[str, Any]:
    """A DMS record that is valid, or valid but for a few fields dropped or replaced."""
    op = draw(st.sampled_from([*Op, "control"]))
    metadata: dict[str, Any] = {
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "record-type": "control" if op == "control" else "data",
        "operation": "create-table" if op == "control" else str(op),
        "partition-key-type": "primary-key",
        "schema-name": draw(st.sampled_from(["", "main", "blog_db"])),
        "table-name": draw(st.sampled_from(["optin_status", "optin_status", "other", ""])),
        "stream-position": draw(POSITIONS),
    }
    if draw(st.booleans()):
        metadata["optsync-key-columns"] = draw(st.lists(st.sampled_from(COLUMNS), max_size=2))
    if draw(st.booleans()):
        metadata["transaction-id"] = draw(SCALARS)
    record: dict[str, Any] = {"data": draw(ROWS), "metadata": metadata}
    if op == Op.UPDATE and draw(st.booleans()):
        record[draw(st.sampled_from(["before-image", "BI"]))] = draw(ROWS)
    for _ in range(draw(st.integers(0, 3))):
        where = record.get("metadata") if draw(st.booleans()) else record
        if not isinstance(where, dict):
            break
        key = draw(st.sampled_from([*list(where), "optsync-extra", "data", "_doc"]))
        if draw(st.booleans()):
            where.pop(key, None)
        else:
            where[key] = draw(JSON)
    return record


@st.composite
def debezium_records(draw: st.DrawFn) -> dict[str, Any]:
    """A Debezium envelope that is valid, or valid but for a few fields dropped or replaced."""
    connector = draw(st.sampled_from(["mysql", "mariadb", "postgresql", "oracle"]))
    source: dict[str, Any] = {"connector": connector, "table": "optin_status", "ts_ms": 1}
    if connector == "postgresql":
        source |= {"schema": "public", "lsn": draw(st.integers(-5, 2**64)), "txId": 7}
    else:
        source |= {"db": "blog_db", "file": "mysql-bin.000003", "pos": draw(NUMBERS), "row": 0}
    payload: dict[str, Any] = {
        "op": draw(st.sampled_from(["c", "u", "d", "r", "t", "m", "x"])),
        "before": draw(st.one_of(st.none(), ROWS)),
        "after": draw(st.one_of(st.none(), ROWS)),
        "source": source,
        "ts_ms": 1,
    }
    for _ in range(draw(st.integers(0, 3))):
        where = payload.get("source") if draw(st.booleans()) else payload
        if not isinstance(where, dict):
            break
        key = draw(st.sampled_from([*list(where), "transaction", "gtid", "ddl"]))
        if draw(st.booleans()):
            where.pop(key, None)
        else:
            where[key] = draw(JSON)
    if draw(st.booleans()):
        return {"schema": {}, "payload": payload}
    return payload


def dumps(value: Any) -> bytes:
    """JSON bytes the way a producer may write them: escaped or raw UTF-8 (with surrogates
    kept as escapes, since UTF-8 cannot carry them)."""
    return json.dumps(value, ensure_ascii=True).encode()
