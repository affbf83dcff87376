"""An engine file written before the consent ledger (schema 2) opens, keeps its history rows and
gains the ledger's columns and tables; one written before IMPORT segments (schema 3) keeps its
segments and gains the member table and the import columns; one of schema 4 gets its segment
definitions in optsync's stored form."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, Estimate, OptOut
from optsync.engine.segments import definition_from_wire, definition_to_wire
from optsync.engine.segments.stored import FORMAT_VERSION
from optsync.engine.sqlite import SCHEMA_VERSION, SQLiteStore
from optsync.engine.store import ImportDefinition

OLD_HISTORY = """
CREATE TABLE consent_history (
    seq INTEGER PRIMARY KEY, app_id TEXT NOT NULL, endpoint_key TEXT NOT NULL,
    endpoint_id TEXT NOT NULL, at TEXT NOT NULL, opt_out_before TEXT, opt_out_after TEXT,
    address TEXT, cause_kind TEXT NOT NULL, cause_ref TEXT NOT NULL
)
"""

OLD_SEGMENTS = """
CREATE TABLE segments (
    app_id TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    segment_type TEXT NOT NULL, creation_date TEXT NOT NULL, last_modified_date TEXT NOT NULL,
    definition TEXT NOT NULL, name TEXT, tags TEXT NOT NULL,
    PRIMARY KEY (app_id, id, version)
)
"""


def test_a_schema_2_engine_file_gets_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    with closing(SQLiteStore(path)) as store:
        app = store.create_app("old").id
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE consent_history")
        conn.execute(OLD_HISTORY)
        conn.execute(
            "INSERT INTO consent_history (app_id, endpoint_key, endpoint_id, at, opt_out_before, "
            "opt_out_after, address, cause_kind, cause_ref) VALUES (?, 'e1', 'e1', "
            "'2026-01-01T00:00:00.000Z', NULL, 'ALL', '+12065550100', 'api', 'r1')",
            (app,),
        )
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
    with closing(SQLiteStore(path)) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        (old,) = store.consent_changes(app, 0, 10)
        assert (old.opt_out_after, old.cause.detail, old.channel_type) == (OptOut.ALL, "", None)
        store.write_endpoints(
            app,
            [EndpointPatch(id="e2", channel_type=ChannelType.SMS, address="+12065550101")],
            Cause(CauseKind.API, "r2"),
        )
        assert [c.channel_type for c in store.consent_changes(app, old.seq, 10)] == [
            ChannelType.SMS
        ]
        assert store.claim_lease("sink:x", "me", 10)


def test_a_schema_3_engine_file_gets_import_segments(tmp_path: Path) -> None:
    path = tmp_path / "engine.db"
    with closing(SQLiteStore(path)) as store:
        app = store.create_app("old").id
        store.write_endpoints(
            app,
            [EndpointPatch(id="e1", channel_type=ChannelType.SMS, address="+12065550101")],
            Cause(CauseKind.API, "r1"),
        )
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE segments")
        conn.execute("DROP TABLE segment_members")
        conn.execute(OLD_SEGMENTS)
        conn.execute(
            "INSERT INTO segments (app_id, id, version, segment_type, creation_date, "
            "last_modified_date, definition, name, tags) VALUES (?, 's1', 1, 'DIMENSIONAL', "
            "'2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z', '{}', 'all', '{}')",
            (app,),
        )
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    with closing(SQLiteStore(path)) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        old = store.get_segment(app, "s1")
        assert (old.segment_type, old.definition.name, old.import_definition) == (
            "DIMENSIONAL", "all", None,
        )  # fmt: skip
        assert store.estimate(app, "s1") == Estimate(total=1, eligible=1)
        imported = store.create_import_segment(
            app, "list", ["E1", "e2"], ImportDefinition("JSON", "endpoints.json", size=2)
        )
        assert store.estimate(app, imported.id) == Estimate(total=1, eligible=1)
        renamed = store.update_segment(
            app, "s1", definition_from_wire({"Name": "everyone"}, require_name=False)
        )
        assert renamed.version == 2


def test_a_schema_4_engine_file_gets_segments_in_the_stored_form(tmp_path: Path) -> None:
    """Every segment version written as Pinpoint's JSON reads back equal, estimates unchanged."""
    path = tmp_path / "engine.db"
    with closing(SQLiteStore(path)) as store:
        app = store.create_app("old").id
        store.write_endpoints(
            app,
            [
                EndpointPatch(id="e1", channel_type=ChannelType.SMS, address="+12065550101"),
                EndpointPatch(id="e2", channel_type=ChannelType.SMS, address="+33612345678"),
                EndpointPatch(id="e3", channel_type=ChannelType.SMS, address="+12065550103"),
            ],
            Cause(CauseKind.API, "r1"),
        )
        imported = store.create_import_segment(
            app, "list", ["E1", "e2"], ImportDefinition("CSV", "s3://b/k", size=2)
        )
        us = {"Location": {"Country": {"Values": ["US"]}}}
        dimensional = store.create_segment(
            app, definition_from_wire({"Name": "us", "Dimensions": us}, require_name=True)
        )
        groups = {"Include": "ALL", "Groups": [{"SourceSegments": [{"Id": imported.id}],
                                                "Dimensions": [us], "Type": "ALL"}]}  # fmt: skip
        store.update_segment(
            app,
            dimensional.id,
            definition_from_wire({"SegmentGroups": groups, "tags": {"t": "2"}}, require_name=False),
        )
        segments = [
            store.get_segment(app, dimensional.id, 1),
            store.get_segment(app, dimensional.id, 2),
            store.get_segment(app, imported.id),
        ]
        estimates = [store.estimate(app, s.id, s.version) for s in segments]
    assert [e.total for e in estimates] == [2, 1, 2]
    with closing(sqlite3.connect(path)) as conn:
        # Back to schema 4: the definition column as Pinpoint's JSON of the filter.
        for segment in segments:
            conn.execute(
                "UPDATE segments SET definition = ? WHERE id = ? AND version = ?",
                (
                    json.dumps(definition_to_wire(segment.definition), sort_keys=True),
                    segment.id,
                    segment.version,
                ),
            )
        conn.execute("PRAGMA user_version = 4")
        conn.commit()
    with closing(SQLiteStore(path)) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        stored = store._conn.execute("SELECT definition FROM segments").fetchall()
        assert len(stored) == 3
        assert all(json.loads(text)["v"] == FORMAT_VERSION for (text,) in stored)
        again = [store.get_segment(app, s.id, s.version) for s in segments]
        assert again == segments
        assert [store.estimate(app, s.id, s.version) for s in segments] == estimates
