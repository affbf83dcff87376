"""The drop-in Lambda ``optsync.aws.lambda_handler`` against a real ``optsync serve``.

A Kinesis event of AWS DMS records (as a real DMS task writes them: pretty-printed, no
``stream-position``) is handed to the handler in-process, the way the Lambda runtime calls it;
the endpoints are then read back with boto3's ``pinpoint`` client. The last tests build the
deployment zip with ``optsync lambda package`` and call the handler from the unzipped folder
in a Python that sees only that folder, the standard library and the runtime's boto3.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore
import pytest
from pinpoint_e2e import KEY_ID, SECRET, Server, clean_env, optsync_command
from ports import free_port

import optsync.aws
from optsync.aws.lambda_handler import ENV_NAMES
from optsync.errors import ConfigError

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e

BASE_SEQUENCE = 49590338271490256608559692538361571095921575989136588802
STREAM_ARN = "arn:aws:kinesis:us-east-1:123456789012:stream/blogstream"
PHONES = {f"user{i}": f"+1206555010{i}" for i in range(1, 6)}
LAMBDA_RUNTIME_MODULES = (
    "boto3",
    "botocore",
    "jmespath",
    "dateutil",
    "six",
    "urllib3",
    "s3transfer",
)
"""What the Lambda Python runtime provides besides the standard library."""


def dms_record(operation: str, row: dict[str, Any], table: str = "optin_status") -> bytes:
    """A DMS -> Kinesis data record as DMS writes it (MessageFormat JSON: pretty-printed)."""
    record = {
        "data": row,
        "metadata": {
            "timestamp": "2026-12-03T10:00:00.123456Z",
            "record-type": "data",
            "operation": operation,
            "partition-key-type": "schema-table",
            "schema-name": "blog_db",
            "table-name": table,
        },
    }
    return json.dumps(record, indent=4).encode()


def control_record() -> bytes:
    record = {
        "control": {},
        "metadata": {
            "timestamp": "2026-12-03T09:59:59.000001Z",
            "record-type": "control",
            "operation": "create-table",
            "partition-key-type": "task-id",
            "schema-name": "",
            "table-name": "awsdms_apply_exceptions",
        },
    }
    return json.dumps(record, indent=4).encode()


def row(user: str, optin: int, *, phone: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "userid": user,
        "phone": PHONES[user] if phone is None else phone,
        "optin": optin,
        "lastupdate": "2026-12-03T10:00:00Z",
        **extra,
    }


def kinesis_event(payloads: list[bytes]) -> tuple[dict[str, Any], list[str]]:
    """A Lambda Kinesis event holding ``payloads`` in order, and their sequence numbers."""
    sequences = [str(BASE_SEQUENCE + 1000 * i) for i in range(len(payloads))]
    records = [
        {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": "blog_db.optin_status",
                "sequenceNumber": sequence,
                "data": base64.b64encode(payload).decode(),
                "approximateArrivalTimestamp": 1796292000.123,
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": f"shardId-000000000000:{sequence}",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::123456789012:role/optsync-lambda",
            "awsRegion": "us-east-1",
            "eventSourceARN": STREAM_ARN,
        }
        for sequence, payload in zip(sequences, payloads, strict=True)
    ]
    return {"Records": records}, sequences


def failures(result: dict[str, list[dict[str, str]]]) -> list[str]:
    return [item["itemIdentifier"] for item in result["batchItemFailures"]]


def endpoint(pinpoint: PinpointClient, app_id: str, user: str) -> dict[str, Any]:
    found = pinpoint.get_endpoint(ApplicationId=app_id, EndpointId=f"{user}_{PHONES[user]}")
    return dict(found["EndpointResponse"])


def lambda_env(server_url: str, app_id: str) -> dict[str, str]:
    return {
        "OPTSYNC_API_URL": server_url,
        "OPTSYNC_APPLICATION_ID": app_id,
        "OPTSYNC_ACCESS_KEY_ID": KEY_ID,
        "OPTSYNC_SECRET_ACCESS_KEY": SECRET,
        # The function's own role credentials: they must not be used for optsync serve.
        "AWS_ACCESS_KEY_ID": "ASIAROLEKEYNOTFOROPTSYNC",
        "AWS_SECRET_ACCESS_KEY": "role-secret-not-for-optsync",
        "AWS_SESSION_TOKEN": "role-session-token",
    }


@pytest.fixture
def env(server: Server, app_id: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The function's environment for the test's app; every other OPTSYNC_* variable unset."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    values = lambda_env(server.url, app_id)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_good_control_and_poison_records(
    env: dict[str, str],
    pinpoint: PinpointClient,
    app_id: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    payloads = [
        control_record(),
        dms_record("insert", row("user1", 1)),
        dms_record("insert", row("user2", 1)),
        b'{"data": {"userid": "user9", "optin": 1}, "metadata": ',  # poison: cut-off JSON
        dms_record("update", row("user2", 0)),  # the same endpoint again in one batch
        dms_record("insert", row("user3", 1)),
        dms_record("insert", row("user5", 1, phone="12345")),  # poison: no phone number
        dms_record("delete", row("user3", 1)),
        dms_record("delete", row("user4", 1)),  # never created: a 404 is success
        dms_record("load", row("user4", 0)),
    ]
    event, sequences = kinesis_event(payloads)
    caplog.set_level(logging.INFO, logger="optsync")

    result = optsync.aws.lambda_handler(event, None)

    assert failures(result) == [sequences[3], sequences[6]]
    one, two, four = (endpoint(pinpoint, app_id, u) for u in ("user1", "user2", "user4"))
    assert (one["OptOut"], one["Address"], one["ChannelType"]) == ("NONE", PHONES["user1"], "SMS")
    assert one["User"]["UserId"] == "user1"
    assert one["Location"]["Country"] == "US"  # derived by optsync serve, not hard-coded
    assert one["EffectiveDate"].startswith("2026-12-03T10:00:00")
    assert two["OptOut"] == "ALL"
    assert four["OptOut"] == "ALL"
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        endpoint(pinpoint, app_id, "user3")
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lambda batch")]
    assert summary == ["lambda batch records=10 applied=7 control=1 poison=2 unavailable=0 calls=5"]
    for phone in PHONES.values():
        assert phone[2:] not in caplog.text, "a phone number reached the log"


def test_an_item_the_api_refuses_fails_only_its_record(
    env: dict[str, str], pinpoint: PinpointClient, app_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = {"table": "optin_status", "address": "phone", "opt_in": "optin", "user_id": "userid"}
    monkeypatch.setenv("OPTSYNC_MAPPING", json.dumps([{**rule, "attributes": ["note"]}]))
    event, sequences = kinesis_event(
        [
            dms_record("insert", row("user1", 1, note="short")),
            dms_record("insert", row("user2", 1, note="x" * 101)),  # over Pinpoint's 100
            dms_record("insert", row("user3", 0, note="short")),
        ]
    )

    result = optsync.aws.lambda_handler(event, None)

    assert failures(result) == [sequences[1]]
    assert endpoint(pinpoint, app_id, "user1")["Attributes"] == {"note": ["short"]}
    assert endpoint(pinpoint, app_id, "user3")["OptOut"] == "ALL"
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        endpoint(pinpoint, app_id, "user2")


def test_api_down_reports_every_record(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPTSYNC_API_URL", f"http://127.0.0.1:{free_port()}")
    event, sequences = kinesis_event(
        [
            dms_record("insert", row("user1", 1)),
            dms_record("update", row("user1", 0)),
            dms_record("delete", row("user2", 0)),
        ]
    )

    assert failures(optsync.aws.lambda_handler(event, None)) == sequences
    assert "optsync API unavailable: GetApp at http://127.0.0.1:" in caplog.text
    assert "unavailable=3" in caplog.text


def test_api_gone_between_invocations_reports_the_unsent_records(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """A second ``optsync serve``, stopped after the first invocation (the app is checked)."""
    port = free_port()
    log = tmp_path / "serve.log"
    command = [*optsync_command(), "serve", "--port", str(port), "--data-dir", str(tmp_path)]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}"),
        )
    other = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        other.wait_healthy()
        client = boto3.client(
            "pinpoint",
            endpoint_url=other.url,
            region_name="us-east-1",
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
        )
        app = client.create_app(CreateApplicationRequest={"Name": "lambda-outage"})
        monkeypatch.setenv("OPTSYNC_API_URL", other.url)
        monkeypatch.setenv("OPTSYNC_APPLICATION_ID", app["ApplicationResponse"]["Id"])
        first, _ = kinesis_event([dms_record("insert", row("user1", 1))])
        assert failures(optsync.aws.lambda_handler(first, None)) == []
    finally:
        other.stop()
    caplog.set_level(logging.INFO, logger="optsync")
    event, sequences = kinesis_event(
        [
            control_record(),
            dms_record("delete", row("user1", 1)),
            dms_record("insert", row("user2", 1)),
            b"[]",  # poison, whatever the API does
        ]
    )

    assert failures(optsync.aws.lambda_handler(event, None)) == sequences[1:]
    assert "optsync API unavailable: DeleteEndpoint at http://127.0.0.1:" in caplog.text
    assert "control=1 poison=1 unavailable=2 calls=1" in caplog.text
    for phone in PHONES.values():
        assert phone[2:] not in caplog.text, "a phone number reached the log"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OPTSYNC_API_URL", "", "OPTSYNC_API_URL is not set: set it to the URL of optsync serve"),
        ("OPTSYNC_API_URL", "optsync:8080", "OPTSYNC_API_URL must start with http://"),
        ("OPTSYNC_SECRET_ACCESS_KEY", "", "OPTSYNC_SECRET_ACCESS_KEY is not set"),
        ("OPTSYNC_MAPPING", "[{table: 1}]", "OPTSYNC_MAPPING is not JSON"),
        (
            "OPTSYNC_MAPPING",
            '[{"table": "t"}]',
            r"OPTSYNC_MAPPING: \[\[mapping\]\] #1 needs address",
        ),
        ("OPTSYNC_MAPPING", '[{"table": "t", "adress": "p"}]', "has unknown key 'adress'"),
        ("OPTSYNC_UNMAPPED", "maybe", "OPTSYNC_UNMAPPED = 'maybe': use 'fail'"),
        ("OPTSYNC_APPLICATION_ID", "0" * 32, "OPTSYNC_APPLICATION_ID: optsync serve at http"),
        ("OPTSYNC_SECRET_ACCESS_KEY", "wrong", "refused the keys in OPTSYNC_ACCESS_KEY_ID"),
    ],
)
def test_bad_environment_is_one_clear_error_before_any_record(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    event, _ = kinesis_event([dms_record("insert", row("user1", 1))])
    with pytest.raises(ConfigError, match=message):
        optsync.aws.lambda_handler(event, None)


# --- the deployment zip --------------------------------------------------------------------

CALL_HANDLER = textwrap.dedent(
    """
    import json, sys
    sys.path[:] = [p for p in sys.path if p and "site-packages" not in p] + sys.argv[1:3]
    import optsync.aws
    event = json.loads(open(sys.argv[3]).read())
    result = optsync.aws.lambda_handler(event, None)
    outside = sorted(
        {m.split(".")[0] for m in sys.modules if not m.startswith("__")}
        - set(sys.stdlib_module_names)
    )
    print(json.dumps({"result": result, "modules": outside, "file": optsync.__file__}))
    """
)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``optsync lambda package`` for this interpreter's version, unzipped (one build)."""
    folder = tmp_path_factory.mktemp("lambda-package")
    out = folder / "optsync-lambda.zip"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    done = subprocess.run(
        [*optsync_command(), "lambda", "package", str(out), "--python", python],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: ")
    assert f"for Python {python} x86_64, compiled, boto3 from the Lambda runtime" in done.stdout
    unzipped = folder / "unzipped"
    with zipfile.ZipFile(out) as archive:
        archive.extractall(unzipped)
    yield unzipped


@pytest.fixture(scope="module")
def lambda_runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only what the Lambda runtime adds to the standard library (boto3)."""
    folder = tmp_path_factory.mktemp("lambda-runtime")
    site = Path(boto3.__file__).parent.parent
    assert Path(botocore.__file__).parent.parent == site
    for name in LAMBDA_RUNTIME_MODULES:
        path = site / name if (site / name).is_dir() else site / f"{name}.py"
        assert path.exists(), f"{name} is not installed next to boto3"
        (folder / path.name).symlink_to(path)
    return folder


def test_package_holds_the_handler_and_only_its_dependencies(
    package: Path,
    lambda_runtime: Path,
    server: Server,
    app_id: str,
    pinpoint: PinpointClient,
    tmp_path: Path,
) -> None:
    top = {p.name.split("-")[0] for p in package.iterdir()}
    assert top == {"optsync", "msgspec", "phonenumbers", "pycountry"}
    event, sequences = kinesis_event(
        [control_record(), dms_record("insert", row("user1", 0)), b"not json"]
    )
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(event))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTSYNC_", "PYTHON"))}
    env |= lambda_env(server.url, app_id)

    done = subprocess.run(
        [sys.executable, "-S", "-c", CALL_HANDLER, str(package), str(lambda_runtime), event_file],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["file"].startswith(str(package))
    assert failures(answer["result"]) == [sequences[2]]
    assert set(answer["modules"]) <= {
        "optsync",
        "msgspec",
        "phonenumbers",
        "pycountry",
        *LAMBDA_RUNTIME_MODULES,
    }
    assert endpoint(pinpoint, app_id, "user1")["OptOut"] == "ALL"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "sparc"], "--arch 'sparc': use x86_64 or arm64"),
        (["--python", "3.9"], "--python '3.9': give a Lambda Python runtime version"),
    ],
)
def test_package_refuses_a_bad_option_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [*optsync_command(), "lambda", "package", str(tmp_path / "f.zip"), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"Error: lambda package: {message}")
