"""``optsync import-pinpoint`` and ``optsync export`` driven as a user runs them (the console
script), against files written the way Pinpoint's CreateExportJob writes them, a local folder and
S3 (moto_server)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aws_server import AwsServer, aws_server_fixture  # noqa: F401  (the fixture)
from pinpoint_e2e import clean_env, optsync_command

from optsync.backends import open_store
from optsync.config import load_settings
from optsync.engine.models import Endpoint
from optsync.engine.store import EndpointStore

pytestmark = pytest.mark.e2e

APP = "migrated"


def export_line(i: int) -> dict[str, Any]:
    """One endpoint as Pinpoint's export writes it, unknown keys included."""
    sms = i % 3 != 0
    line: dict[str, Any] = {
        "Id": f"ep-{i:05d}",
        "ApplicationId": "0123456789abcdef0123456789abcdef",
        "Address": f"+1206{i:07d}" if sms else f"user{i}@example.com",
        "ChannelType": "SMS" if sms else "EMAIL",
        "CohortId": str(i % 100),
        "CreationDate": "2021-03-04T05:06:07.890Z",
        "EffectiveDate": f"2024-0{1 + i % 9}-15T12:00:00.000Z",
        "EndpointStatus": "INACTIVE" if i % 11 == 0 else "ACTIVE",
        "OptOut": "ALL" if i % 7 == 0 else "NONE",
        "RequestId": f"req-{i}",
        "Location": {"Country": "US" if i % 2 else "CA", "City": "Seattle", "Latitude": 47.6},
        "Demographic": {"Platform": "ios", "Timezone": "America/Los_Angeles"},
        "Attributes": {"source": ["pinpoint"], "tags": ["a", "b"] if i % 5 == 0 else ["c"]},
        "Metrics": {"score": i % 13, "visits": str(i % 4)},
        "User": {"UserId": f"user-{i}", "UserAttributes": {"plan": ["gold" if i % 4 else "free"]}},
        "SomeFutureField": {"x": 1},
    }
    if i % 10 == 9:
        del line["User"]
    return line


def write_export(folder: Path, count: int, parts: int = 2) -> list[dict[str, Any]]:
    """``count`` endpoints as gzip NDJSON part files in ``folder``; the lines written."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [export_line(i) for i in range(count)]
    size = -(-count // parts)
    for n in range(parts):
        body = "".join(json.dumps(x) + "\n" for x in lines[n * size : (n + 1) * size])
        (folder / f"{n:04d}-export.gz").write_bytes(gzip.compress(body.encode()))
    return lines


def eligible(lines: list[dict[str, Any]]) -> int:
    return sum(1 for x in lines if x["EndpointStatus"] == "ACTIVE" and x["OptOut"] == "NONE")


@dataclasses.dataclass(frozen=True)
class Setup:
    config: Path
    folder: Path

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*optsync_command(), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=240,
            env=clean_env(**(env or {})),
            cwd=self.folder,
            check=False,
        )

    @contextmanager
    def store(self) -> Iterator[EndpointStore]:
        store = open_store(load_settings(self.config))
        try:
            yield store
        finally:
            store.close()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    config = tmp_path / "optsync.toml"
    config.write_text(f"data_dir = {json.dumps(str(tmp_path / 'data'))}\n")
    (tmp_path / "data").mkdir()
    return Setup(config, tmp_path)


def comparable(e: Endpoint) -> Endpoint:
    """What an export carries back in: all but the app and what the engine sets on create."""
    return dataclasses.replace(e, app_id="", creation_date="", cohort_id="")


def endpoints(store: EndpointStore, app_name: str) -> dict[str, Endpoint]:
    app = store.find_app(app_name)
    assert app is not None
    return {e.id: comparable(e) for e in store.iter_endpoints(app.id)}


def test_a_10000_endpoint_export_imports_with_its_segment_and_exports_back(setup: Setup) -> None:
    lines = write_export(setup.folder / "export", 10_000)
    result = setup.run(
        "import-pinpoint", "--app", APP, "--segment", "all", str(setup.folder / "export")
    )
    assert result.returncode == 0, result.stderr
    assert "imported 10000 of 10000 lines: 10000 new endpoints, 0 updated" in result.stdout
    assert f"app {APP!r} created" in result.stdout
    with setup.store() as store:
        app = store.find_app(APP)
        assert app is not None
        (segment,) = store.list_segments(app.id, 10, None).items
        assert segment.segment_type == "IMPORT"
        estimate = store.estimate(app.id, segment.id)
        assert (estimate.total, estimate.eligible) == (10_000, eligible(lines))
        first = store.get_endpoint(app.id, "ep-00007")  # SMS, OptOut ALL
        assert (first.opt_out.value, first.address, first.user_id) == (
            "ALL",
            "+12060000007",
            "user-7",
        )
        assert dict(first.metrics) == {"score": 7.0, "visits": 3.0}
        assert dict(first.attributes) == {"source": ("pinpoint",), "tags": ("c",)}
        assert first.demographic.timezone == "America/Los_Angeles"
        assert first.effective_date == "2024-08-15T12:00:00.000Z"
        (change,) = store.consent_history(app.id, "ep-00007")
        assert change.cause.kind.value == "import"
        assert change.cause.ref == f"{setup.folder / 'export' / '0000-export.gz'}:8"
        inactive = store.get_endpoint(app.id, "ep-00011")
        assert inactive.endpoint_status.value == "INACTIVE"
        imported = endpoints(store, APP)

    for fmt in ("pinpoint-ndjson", "csv"):
        out = setup.folder / f"out-{fmt}"
        result = setup.run("export", "--app", APP, "--format", fmt, "--part-size", "4000", str(out))
        assert result.returncode == 0, result.stderr
        assert "exported 10000 endpoints to 3 files" in result.stdout
        again = f"again-{fmt}"
        result = setup.run("import-pinpoint", "--app", again, str(out))
        assert result.returncode == 0, result.stderr
        with setup.store() as store:
            assert endpoints(store, again) == imported

    # The segment's eligible endpoints only, the file a sender would be given.
    out = setup.folder / "eligible"
    result = setup.run("export", "--app", APP, "--segment", "all", "--eligible-only", str(out))
    assert result.returncode == 0, result.stderr
    with gzip.open(out / "part-00000.json.gz", "rt") as f:
        exported = [json.loads(x) for x in f]
    assert len(exported) == eligible(lines)
    assert {x["OptOut"] for x in exported} == {"NONE"}


def test_an_export_on_s3_imports_and_exports_back_to_s3(
    setup: Setup, aws_server: AwsServer
) -> None:
    lines = write_export(setup.folder / "export", 10_000, parts=3)
    s3 = aws_server.client("s3")
    s3.create_bucket(Bucket="pinpoint-exports")
    for path in sorted((setup.folder / "export").iterdir()):
        s3.put_object(
            Bucket="pinpoint-exports", Key=f"exports/job-1/{path.name}", Body=path.read_bytes()
        )
    env = aws_server.env() | {"AWS_ENDPOINT_URL_S3": aws_server.endpoint_url}
    result = setup.run(
        "import-pinpoint",
        "--app",
        APP,
        "--segment",
        "s3",
        "s3://pinpoint-exports/exports/job-1/",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    with setup.store() as store:
        app = store.find_app(APP)
        assert app is not None
        (segment,) = store.list_segments(app.id, 10, None).items
        assert segment.import_definition is not None
        assert segment.import_definition.s3_url == "s3://pinpoint-exports/exports/job-1/"
        estimate = store.estimate(app.id, segment.id)
        assert (estimate.total, estimate.eligible) == (10_000, eligible(lines))
        change = store.consent_history(app.id, "ep-00000")[0]
        assert change.cause.ref == "s3://pinpoint-exports/exports/job-1/0000-export.gz:1"
    result = setup.run("export", "--app", APP, "s3://pinpoint-exports/out", env=env)
    assert result.returncode == 0, result.stderr
    body = s3.get_object(Bucket="pinpoint-exports", Key="out/part-00000.json.gz")["Body"].read()
    assert len(gzip.decompress(body).splitlines()) == 10_000


def test_a_csv_import_file_with_dotted_and_repeated_headers(setup: Setup) -> None:
    csv_file = setup.folder / "import.csv"
    csv_file.write_text(
        "ChannelType,Address,Location.Country,Demographic.Platform,User.UserId,"
        "User.UserAttributes.FirstName,Attributes.interests,Attributes.interests,Metrics.score,"
        "OptOut\n"
        "SMS,+12065550142,US,android,u1,Ana,golf,tennis,4.5,NONE\n"
        "EMAIL,ana@example.com,,,u1,Ana,golf,,1,ALL\n"
    )
    result = setup.run("import-pinpoint", "--app", APP, "--segment", "csv", str(csv_file))
    assert result.returncode == 0, result.stderr
    with setup.store() as store:
        app = store.find_app(APP)
        assert app is not None
        sms = store.find_endpoints(app.id, "+12065550142")[0]
        assert sms.id.startswith("import-")
        assert dict(sms.attributes) == {"interests": ("golf", "tennis")}
        assert dict(sms.user_attributes) == {"FirstName": ("Ana",)}
        assert (sms.location.country, sms.demographic.platform, dict(sms.metrics)) == (
            "US",
            "android",
            {"score": 4.5},
        )
        email = store.find_endpoints(app.id, "ana@example.com")[0]
        assert email.opt_out.value == "ALL"
        assert dict(email.attributes) == {"interests": ("golf",)}
        (segment,) = store.list_segments(app.id, 10, None).items
        assert segment.import_definition is not None
        assert segment.import_definition.format == "CSV"
        assert store.estimate(app.id, segment.id).eligible == 1
    # The same file again updates the same two endpoints (ids from channel and address).
    result = setup.run("import-pinpoint", "--app", APP, str(csv_file))
    assert "0 new endpoints, 2 updated" in result.stdout
    with setup.store() as store:
        app = store.find_app(APP)
        assert app is not None
        assert store.count_endpoints(app.id) == 2


BAD_LINES = [
    json.dumps({"Id": "ok-1", "ChannelType": "SMS", "Address": "+12065550100"}),
    json.dumps(
        {"Id": "bad-opt-out", "ChannelType": "SMS", "Address": "+12065550101", "OptOut": "MAYBE"}
    ),
    "{not json",
    json.dumps({"ChannelType": "SMS"}),
    json.dumps(
        {"Id": "ok-2", "ChannelType": "EMAIL", "Address": "b@example.com", "Metrics": {"m": "x"}}
    ),
    json.dumps({"Id": "ok-3", "ChannelType": "EMAIL", "Address": "c@example.com"}),
]


def test_a_bad_file_writes_nothing_and_names_each_line(setup: Setup) -> None:
    bad = setup.folder / "bad.json"
    bad.write_text("\n".join(BAD_LINES) + "\n")
    result = setup.run("import-pinpoint", "--app", APP, str(bad))
    assert result.returncode == 2, result
    assert f"{bad}:2: OptOut must be one of ALL | NONE, not 'MAYBE'" in result.stdout
    assert f"{bad}:3: not JSON" in result.stdout
    assert f"{bad}:4: a line without Id needs ChannelType and Address" in result.stdout
    assert f"{bad}:5: Metrics.m must be a number" in result.stdout
    errors = [x for x in result.stderr.splitlines() if x.startswith("Error: ")]
    assert errors == [
        "Error: import-pinpoint: 4 of 6 lines rejected (listed above); nothing was written. "
        "Fix them, or pass --continue-on-error to import the rest"
    ]
    assert "Traceback" not in result.stderr
    with setup.store() as store:
        assert store.find_app(APP) is None

    result = setup.run("import-pinpoint", "--app", APP, "--dry-run", str(bad))
    assert result.returncode == 0, result.stderr
    assert (
        "would import 2 of 6 lines: 2 new endpoints, 0 updated; 4 lines rejected" in result.stdout
    )
    with setup.store() as store:
        assert store.find_app(APP) is None

    result = setup.run("import-pinpoint", "--app", APP, "--continue-on-error", str(bad))
    assert result.returncode == 0, result.stderr
    assert "imported 2 of 6 lines" in result.stdout
    with setup.store() as store:
        app = store.find_app(APP)
        assert app is not None
        assert sorted(e.id for e in store.iter_endpoints(app.id)) == ["ok-1", "ok-3"]


def test_export_of_a_missing_app_or_segment_exits_2(setup: Setup) -> None:
    result = setup.run("export", "--app", "nope", str(setup.folder / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["Error: export: there is no app named 'nope'"]
    csv_file = setup.folder / "one.csv"
    csv_file.write_text("ChannelType,Address\nSMS,+12065550142\n")
    assert setup.run("import-pinpoint", "--app", APP, str(csv_file)).returncode == 0
    result = setup.run("export", "--app", APP, "--segment", "nope", str(setup.folder / "out"))
    assert result.returncode == 2
    assert "has no segment named 'nope'" in result.stderr
