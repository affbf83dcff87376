"""``import_files``: the check pass in a child process, overlapped with the write pass, on a real
SQLite engine. A line rejected after batches were written rolls the whole import back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.migrate.locations import InputFile
from optsync.migrate.overlapped import BATCH_LINES, ImportRejected, import_files

API = Cause(CauseKind.API, "req")


def line(n: int, opt_out: str = "NONE") -> str:
    return json.dumps(
        {"Id": f"ep-{n}", "ChannelType": "SMS", "Address": f"+1206{n:07d}", "OptOut": opt_out}
    )


def write_file(folder: Path, name: str, lines: list[str]) -> InputFile:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return InputFile(str(path), path)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    made = SQLiteStore(tmp_path / "engine.db")
    yield made  # type: ignore[misc]
    made.close()


def test_a_line_rejected_after_written_batches_rolls_everything_back(
    store: SQLiteStore, tmp_path: Path
) -> None:
    good = [line(n) for n in range(BATCH_LINES * 2 + 500)]
    bad = '{"Id": "bad", "ChannelType": "SMS", "Address": "+12065550000", "OptOut": "MAYBE"}'
    files = [
        write_file(tmp_path, "a.json", good),
        write_file(tmp_path, "b.json", [line(90_000), bad, line(90_001)]),
    ]
    with pytest.raises(ImportRejected) as raised:
        import_files(store, "new-app", files, source="test")
    assert [(r.file, r.line) for r in raised.value.rejected] == [(files[1].name, 2)]
    assert "OptOut must be one of ALL | NONE" in raised.value.rejected[0].reason
    assert raised.value.lines == len(good) + 3
    assert store.find_app("new-app") is None  # created by the import, removed with it


def test_a_rejected_import_leaves_an_existing_app_as_it_was(
    store: SQLiteStore, tmp_path: Path
) -> None:
    app_id = store.create_app("kept").id
    store.write_endpoints(
        app_id, [EndpointPatch("ep-1", ChannelType.SMS, address="+12060000001")], API
    )
    lines = [line(n, "ALL") for n in range(BATCH_LINES + 10)] + ["not json"]
    with pytest.raises(ImportRejected):
        import_files(store, "kept", [write_file(tmp_path, "x.json", lines)], source="test")
    assert store.find_app("kept") is not None
    assert store.count_endpoints(app_id) == 1
    assert store.get_endpoint(app_id, "ep-1").opt_out is OptOut.NONE


def test_new_and_updated_are_counted_and_the_segment_holds_every_id(
    store: SQLiteStore, tmp_path: Path
) -> None:
    app_id = store.create_app("app").id
    existing = [EndpointPatch(f"ep-{n}", ChannelType.SMS, address=f"+1206{n:07d}") for n in (3, 7)]
    store.write_endpoints(app_id, existing, API)
    count = BATCH_LINES + 1_000
    files = [write_file(tmp_path, "e.json", [line(n, "ALL") for n in range(count)])]
    checked: list[int] = []
    written: list[int] = []
    summary = import_files(
        store,
        "app",
        files,
        source="s3://bucket/e.json",
        segment="imported",
        on_checked=checked.append,
        on_written=written.append,
    )
    assert (summary.lines, summary.new, summary.updated) == (count, count - 2, 2)
    assert not summary.app_created and not summary.rejected
    assert sum(checked) == sum(written) == count
    assert store.count_endpoints(app_id) == count
    assert store.get_endpoint(app_id, "ep-3").opt_out is OptOut.ALL
    assert summary.segment is not None and summary.segment_size == count
    assert store.estimate(app_id, summary.segment.id).total == count
    history = store.consent_history(app_id, "ep-9")
    assert history[-1].cause.ref == f"{files[0].name}:10"


def test_continue_on_error_writes_the_good_lines_and_lists_the_rest(
    store: SQLiteStore, tmp_path: Path
) -> None:
    lines = [line(1), "{", line(2), '{"ChannelType": "SMS"}', line(3)]
    summary = import_files(
        store,
        "app",
        [write_file(tmp_path, "c.json", lines)],
        source="test",
        continue_on_error=True,
    )
    assert [r.line for r in summary.rejected] == [2, 4]
    assert (summary.lines, summary.new, summary.app_created) == (5, 3, True)
    app = store.find_app("app")
    assert app is not None
    assert sorted(e.id for e in store.iter_endpoints(app.id)) == ["ep-1", "ep-2", "ep-3"]
