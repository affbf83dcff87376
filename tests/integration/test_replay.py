"""``optsync replay``: recorded DMS, Debezium and Kinesis-event files through the real CLI into
the embedded stream, then applied by a real apply worker into the SQLite engine."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_pieces import Pieces

from optsync.apply.dlq import DeadLetter
from optsync.engine.models import OptOut
from optsync.errors import NotFound
from optsync.replay import DLQ_CONSUMER

TABLE = "optin_status"
MAPPING = f"""
[[mapping]]
table = "{TABLE}"
channel = "SMS"
address = "phone"
user_id = "userid"
opt_in = "optin"
"""


def optsync(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = shutil.which("optsync", path=os.path.dirname(sys.executable))
    assert script is not None, f"the optsync console script is not next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSYNC_")}
    return subprocess.run(
        [script, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env | {"COLUMNS": "400"},
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "optsync.toml"
    path.write_text(
        f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n\n"
        "[source]\n"
        f"url = {json.dumps('sqlite:///' + str(tmp_path / 'app.db'))}\n"
        f'tables = ["{TABLE}"]\n\n'
        '[stream]\nurl = "embedded"\n\n'
        '[engine]\nstore = "sqlite"\napp = "optin-demo"\n'
        f"{MAPPING}"
    )
    (tmp_path / "data").mkdir()
    return path


@pytest.fixture
def pieces(config: Path) -> Iterator[Pieces]:
    """Engine, stream, DLQ and apply worker over the config's data folder."""
    made = Pieces(config.parent / "data")
    yield made
    made.close()


def dms_record(
    op: str,
    row: dict[str, Any],
    *,
    at: str,
    before: dict[str, Any] | None = None,
    position: str | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "timestamp": at,
        "record-type": "data",
        "operation": op,
        "partition-key-type": "schema-table",
        "schema-name": "app",
        "table-name": TABLE,
    }
    if position is not None:
        metadata["stream-position"] = position
    record: dict[str, Any] = {"data": row, "metadata": metadata}
    if before is not None:
        record["before-image"] = before
    return record


CONTROL = {
    "control": {},
    "metadata": {
        "timestamp": "2026-12-01T10:00:00.000000Z",
        "record-type": "control",
        "operation": "create-table",
        "partition-key-type": "task-id",
        "schema-name": "",
        "table-name": "awsdms_apply_exceptions",
    },
}


def ndjson(path: Path, records: list[Any], *, gz: bool = False) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def endpoint_state(pieces: Pieces, endpoint_id: str) -> tuple[str | None, OptOut] | None:
    try:
        endpoint = pieces.store.get_endpoint(pieces.app_id, endpoint_id)
    except NotFound:
        return None
    return endpoint.address, endpoint.opt_out


def dead_letters(pieces: Pieces) -> list[DeadLetter]:
    return [e for e in pieces.dlq.list(limit=100) if e.consumer == DLQ_CONSUMER]


def test_dms_ndjson_and_gzip_replay_and_apply(tmp_path: Path, config: Path, pieces: Pieces) -> None:
    first = ndjson(
        tmp_path / "a-first.ndjson",
        [
            CONTROL,
            dms_record(
                "load",
                {"userid": "u1", "phone": "+12065550101", "optin": 1},
                at="2026-12-01T10:00:01.000000Z",
            ),
            dms_record(
                "insert",
                {"userid": "u2", "phone": "+12065550102", "optin": 1},
                at="2026-12-01T10:00:02.000000Z",
            ),
            # Same timestamp: the line number orders the update after the load.
            dms_record(
                "update",
                {"userid": "u1", "phone": "+12065550101", "optin": 0},
                before={"userid": "u1", "phone": "+12065550101", "optin": 1},
                at="2026-12-01T10:00:02.000000Z",
            ),
            "{not json",
        ],
    )
    second = ndjson(
        tmp_path / "b-second.ndjson.gz",
        [
            # An omitted NULL column (lastupdate) is tolerated.
            dms_record(
                "insert",
                {"userid": "u3", "phone": "+12065550103", "optin": 1},
                at="2026-12-01T10:00:03.000000Z",
                position="mysql-bin-changelog.000002:120",
            ),
            dms_record(
                "delete",
                {"userid": "u2", "phone": "+12065550102", "optin": 1},
                at="2026-12-01T10:00:04.000000Z",
            ),
            dms_record("truncate", {"userid": "u9"}, at="2026-12-01T10:00:05.000000Z"),
        ],
        gz=True,
    )

    result = optsync(
        "replay", "--config", str(config), "--format", "dms", str(first), str(second), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert (
        "replay: 5 records appended, 1 control records skipped, "
        "0 tombstones/heartbeats skipped, 2 dead letters"
    ) in result.stdout
    assert pieces.apply_all() == 5
    assert endpoint_state(pieces, "u1_+12065550101") == ("+12065550101", OptOut.ALL)
    assert endpoint_state(pieces, "u2_+12065550102") is None
    assert endpoint_state(pieces, "u3_+12065550103") == ("+12065550103", OptOut.NONE)
    reasons = sorted(e.reason for e in dead_letters(pieces))
    assert reasons[0].startswith(f"{first}:5: malformed record: record is not JSON")
    assert reasons[1].startswith(f"{second}:3: malformed record: metadata.operation is 'truncate'")


def debezium(op: str, before: Any, after: Any, lsn: int, *, wrapped: bool = False) -> Any:
    payload = {
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": 1764583200000 + lsn,
        "source": {
            "connector": "postgresql",
            "lsn": lsn,
            "schema": "public",
            "table": TABLE,
            "ts_ms": 1764583200000 + lsn,
        },
    }
    return {"schema": {"type": "struct"}, "payload": payload} if wrapped else payload


def test_debezium_ndjson_replay_and_apply(tmp_path: Path, config: Path, pieces: Pieces) -> None:
    u10 = {"userid": "u10", "phone": "+12065550110", "optin": 1}
    u11 = {"userid": "u11", "phone": "+12065550111", "optin": 1}
    path = ndjson(
        tmp_path / "debezium.ndjson",
        [
            debezium("r", None, u10, 100),
            debezium("c", None, u11, 200, wrapped=True),
            debezium("u", u10, u10 | {"optin": 0}, 300),
            debezium("d", u11, None, 400, wrapped=True),
            "null",
            {"schema": None, "payload": None},
            {"ts_ms": 1764583200999},
            {"op": "x", "source": {"connector": "postgresql", "lsn": 5, "table": TABLE}},
        ],
    )

    result = optsync(
        "replay",
        "--config",
        str(config),
        "--format",
        "debezium",
        str(tmp_path / "debezium.ndjson"),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert (
        "replay: 4 records appended, 0 control records skipped, "
        "3 tombstones/heartbeats skipped, 1 dead letters"
    ) in result.stdout
    assert pieces.apply_all() == 4
    assert endpoint_state(pieces, "u10_+12065550110") == ("+12065550110", OptOut.ALL)
    assert endpoint_state(pieces, "u11_+12065550111") is None
    [letter] = dead_letters(pieces)
    assert letter.reason.startswith(f"{path}:8: malformed record: op is 'x'")


def test_kinesis_event_replay_orders_by_sequence_number(
    tmp_path: Path, config: Path, pieces: Pieces
) -> None:
    row = {"userid": "u20", "phone": "+12065550120", "optin": 1}
    records = [
        (dms_record("insert", row, at="2026-12-01T10:00:09.000000Z"), "9" * 20),
        # A later sequence number with an earlier timestamp: the sequence number wins.
        (
            dms_record("update", row | {"optin": 0}, before=row, at="2026-12-01T10:00:01.000000Z"),
            "1" + "0" * 20,
        ),
        (CONTROL, "1" + "0" * 19 + "1"),
    ]
    event = {
        "Records": [
            {
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": "app.optin_status",
                    "sequenceNumber": sequence,
                    "data": base64.b64encode(json.dumps(record).encode()).decode(),
                    "approximateArrivalTimestamp": 1764583200.5,
                },
                "eventID": f"shardId-000000000000:{sequence}",
                "eventSource": "aws:kinesis",
            }
            for record, sequence in records
        ]
        + [{"kinesis": {"data": "!!not base64!!", "sequenceNumber": "5"}}]
    }
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))

    result = optsync(
        "replay", "--config", str(config), "--format", "kinesis-event", str(path), cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert "2 records appended, 1 control records skipped" in result.stdout
    assert "1 dead letters" in result.stdout
    assert pieces.apply_all() == 2
    assert endpoint_state(pieces, "u20_+12065550120") == ("+12065550120", OptOut.ALL)
    [letter] = dead_letters(pieces)
    assert letter.reason.startswith(f"{path}#3: malformed record:")


def test_a_missing_file_or_a_wrong_format_is_one_line_and_exit_code_2(
    tmp_path: Path, config: Path
) -> None:
    missing = optsync(
        "replay", "--config", str(config), str(tmp_path / "nope.ndjson"), cwd=tmp_path
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"Error: replay: {tmp_path / 'nope.ndjson'} does not exist: "
        "name a file or a folder of files"
    ]
    (tmp_path / "x.ndjson").write_text("")
    wrong = optsync(
        "replay",
        "--config",
        str(config),
        "--format",
        "avro",
        str(tmp_path / "x.ndjson"),
        cwd=tmp_path,
    )
    assert wrong.returncode == 2
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert "--format 'avro' is not one of dms, debezium, kinesis-event" in wrong.stderr
