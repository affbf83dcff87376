"""Every way the store counts a segment gives the counts of a plain COUNT over ``endpoints``.

``SqlStore.estimate`` answers from the rollup (Country/channel only), from the attribute table
(a driving attribute condition) or from ``endpoints``; the reference here is always the last.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    Demographic,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
)
from optsync.engine.segments import compile_filter, definition_from_wire
from optsync.engine.sqlite import SCHEMA_VERSION, SQLiteStore

SEGMENTS: list[dict[str, Any]] = [
    {"Dimensions": {"Attributes": {"plan": {"Values": ["gold"]}}}},
    {"Dimensions": {"Attributes": {"plan": {"Values": ["gold", "silver"]}}}},
    {"Dimensions": {"Attributes": {"tags": {"Values": ["a", "b"]}}}},
    {
        "Dimensions": {
            "Attributes": {"plan": {"Values": ["gold"]}},
            "Location": {"Country": {"Values": ["USA"]}},
        }
    },
    {
        "Dimensions": {
            "Attributes": {"plan": {"Values": ["gold"]}},
            "Location": {"Country": {"Values": ["US"], "DimensionType": "EXCLUSIVE"}},
            "Demographic": {"Channel": {"Values": ["sms"]}},
        }
    },
    {
        "Dimensions": {
            "Attributes": {
                "plan": {"Values": ["free"], "AttributeType": "EXCLUSIVE"},
                "tags": {"Values": ["b"]},
            }
        }
    },
    {"Dimensions": {"Attributes": {"plan": {"Values": ["go"], "AttributeType": "CONTAINS"}}}},
    {
        "Dimensions": {
            "Attributes": {"signup": {"Values": ["2025-06-01T00:00:00Z"], "AttributeType": "AFTER"}}
        }
    },
    {"Dimensions": {"UserAttributes": {"team": {"Values": ["red"]}}}},
    {
        "Dimensions": {
            "Attributes": {"plan": {"Values": ["gold"]}},
            "Metrics": {"score": {"ComparisonOperator": "GREATER_THAN", "Value": 2}},
        }
    },
    {
        "Dimensions": {
            "Attributes": {"plan": {"Values": ["gold"]}},
            "Demographic": {"Platform": {"Values": ["ios"]}},
        }
    },
    {
        "SegmentGroups": {
            "Include": "ALL",
            "Groups": [
                {
                    "Type": "ALL",
                    "Dimensions": [
                        {"Attributes": {"plan": {"Values": ["gold", "silver"]}}},
                        {"Location": {"Country": {"Values": ["GB"]}}},
                    ],
                },
                {"Type": "ANY", "Dimensions": [{"UserAttributes": {"team": {"Values": ["red"]}}}]},
            ],
        }
    },
    {
        "SegmentGroups": {
            "Include": "ANY",
            "Groups": [
                {
                    "Type": "ANY",
                    "Dimensions": [
                        {"Attributes": {"plan": {"Values": ["gold"]}}},
                        {"Location": {"Country": {"Values": ["GB"]}}},
                    ],
                }
            ],
        }
    },
    {
        "SegmentGroups": {
            "Include": "NONE",
            "Groups": [{"Dimensions": [{"Attributes": {"plan": {"Values": ["gold"]}}}]}],
        }
    },
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[SQLiteStore, str]:
    rng = random.Random(11)
    store = SQLiteStore(Path(tmp_path_factory.mktemp("estimates")) / "engine.db")
    app = store.create_app("a").id
    writes = []
    for i in range(600):
        channel = rng.choice([ChannelType.SMS, ChannelType.EMAIL])
        writes.append(
            EndpointPatch(
                id=f"e{i}",
                channel_type=channel,
                address=f"+1206555{i:04d}" if channel is ChannelType.SMS else f"u{i}@x.org",
                opt_out=rng.choice([OptOut.ALL, OptOut.NONE, OptOut.NONE]),
                endpoint_status=rng.choice([EndpointStatus.INACTIVE, None, None, None, None]),
                location=Location(country=rng.choice(["US", "GB", None])),
                demographic=Demographic(platform=rng.choice(["ios", "android", None])),
                attributes={
                    "plan": (rng.choice(["gold", "silver", "free", "gold"]),),
                    "tags": tuple(rng.sample(["a", "b", "c"], rng.randint(1, 3))),
                    "signup": (f"2025-{rng.randint(1, 12):02d}-10T00:00:00Z",),
                },
                user_id=f"user{i % 50}",
                user_attributes={"team": (rng.choice(["red", "blue"]),)} if i % 50 < 25 else None,
                metrics={"score": float(rng.randint(0, 4))},
            )
        )
    for start in range(0, len(writes), 100):
        store.write_endpoints(app, writes[start : start + 100], Cause(CauseKind.API, "r"))
    # Flip some opt-outs and statuses afterwards: the attribute rows' copies must follow.
    flips = [EndpointPatch(id=f"e{i}", opt_out=OptOut.ALL) for i in range(0, 600, 7)]
    store.write_endpoints(app, flips, Cause(CauseKind.API, "r"))
    return store, app


@pytest.mark.parametrize("body", SEGMENTS, ids=[str(i) for i in range(len(SEGMENTS))])
def test_estimate_equals_plain_count(store: tuple[SQLiteStore, str], body: dict[str, Any]) -> None:
    engine, app = store
    definition = definition_from_wire({"Name": "s", **body}, require_name=True)
    segment = engine.create_segment(app, definition)
    found = engine.estimate(app, segment.id)
    where, params = compile_filter(definition, app_id=app, resolve=lambda s, v: definition)
    total, eligible = engine._conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(status = 'ACTIVE' AND opt_out = 'NONE'), 0) "
        f"FROM endpoints e WHERE e.app_id = ? AND ({where})",
        (app, *params),
    ).fetchone()
    assert total > 0, "the segment matches nothing: it tests nothing"
    assert (found.total, found.eligible) == (total, eligible)


def test_attribute_segment_is_counted_from_the_attribute_table(
    store: tuple[SQLiteStore, str],
) -> None:
    engine, app = store
    definition = definition_from_wire({"Name": "gold", **SEGMENTS[3]}, require_name=True)
    segment = engine.create_segment(app, definition)
    sql, _ = engine.estimate_sql(app, segment.id)
    assert "FROM endpoint_attributes d" in sql
    assert " endpoints " not in sql


def test_engine_file_of_schema_1_gets_its_attribute_rows_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    engine = SQLiteStore(path)
    app = engine.create_app("a").id
    engine.write_endpoints(
        app,
        [
            EndpointPatch(id="x", channel_type=ChannelType.EMAIL, address="x@y.org",
                          attributes={"plan": ("gold",)}),
            EndpointPatch(id="z", channel_type=ChannelType.EMAIL, address="z@y.org",
                          attributes={"plan": ("free",)}),
        ],
        Cause(CauseKind.API, "r"),
    )  # fmt: skip
    segment = engine.create_segment(
        app, definition_from_wire({"Name": "g", **SEGMENTS[0]}, require_name=True)
    )
    engine.close()
    # What version 1 had on disk: attribute rows without the rollup copies, user_version 0.
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE endpoint_attributes; CREATE TABLE endpoint_attributes (endpoint_pk INTEGER, "
        "app_id TEXT, kind TEXT, name TEXT, value TEXT, value_ts INTEGER); PRAGMA user_version = 0;"
    )
    conn.close()
    reopened = SQLiteStore(path)
    found = reopened.estimate(app, segment.id)
    assert (found.total, found.eligible) == (1, 1)
    assert reopened._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
