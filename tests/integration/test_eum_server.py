"""The EUM SMS stand-in (``tests/servers/eum_server.py``) driven by the real boto3 client.

What the other tests take on trust: every opt-out list operation answers as botocore's model says,
in the name and ARN forms; errors come back as the modelled ``client.exceptions.X`` with their
members; the 30-day removal rule, the ``end-user-opted-out`` filter and botocore's paginator work;
unsigned requests and refusals fail the way a sink will meet them.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from eum_server import EumServer, eum_server_fixture

__all__ = ("eum_server_fixture",)  # registers the fixture ``eum_server``

pytestmark = pytest.mark.integration

# No type stubs for this service's client are installed: boto3 builds it from the model.
SmsClient = Any

ALICE = "+14255550101"
BOB = "+14255550102"
CAROL = "+14255550103"


def make_client(server: EumServer, **config: Any) -> SmsClient:
    return boto3.client(
        "pinpoint-sms-voice-v2",
        endpoint_url=server.url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(**config),
    )


@pytest.fixture
def client(eum_server: EumServer) -> Iterator[SmsClient]:
    """A client that does not retry, so each call is one request."""
    sms = make_client(eum_server, retries={"total_max_attempts": 1})
    yield sms
    sms.close()


def raw_post(
    server: EumServer, target: str, body: bytes = b"{}", *, service: str | None = "sms-voice"
) -> tuple[int, dict[str, Any]]:
    """POST / with the protocol's headers, signed for ``service`` (unsigned for None)."""
    request = AWSRequest(
        method="POST",
        url=server.url + "/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": target},
    )
    if service is not None:
        SigV4Auth(Credentials("test", "test"), service, "us-east-1").add_auth(request)
    prepared = urllib.request.Request(
        server.url + "/", data=body, headers=dict(request.headers.items()), method="POST"
    )
    try:
        with urllib.request.urlopen(prepared, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def listed(client: SmsClient, list_name: str = "Default", **params: Any) -> dict[str, bool]:
    answer = client.describe_opted_out_numbers(OptOutListName=list_name, **params)
    return {item["OptedOutNumber"]: item["EndUserOptedOut"] for item in answer["OptedOutNumbers"]}


# --- opt-out lists ------------------------------------------------------------------------------


def test_create_describe_and_delete_a_list(eum_server: EumServer, client: SmsClient) -> None:
    created = client.create_opt_out_list(
        OptOutListName="marketing", Tags=[{"Key": "team", "Value": "growth"}]
    )
    arn = "arn:aws:sms-voice:us-east-1:123456789012:opt-out-list/marketing"
    assert created["OptOutListArn"] == arn
    assert created["OptOutListName"] == "marketing"
    assert created["Tags"] == [{"Key": "team", "Value": "growth"}]
    assert created["CreatedTimestamp"] == eum_server.now
    assert eum_server.lists()["marketing"].tags == (("team", "growth"),)

    names = [item["OptOutListName"] for item in client.describe_opt_out_lists()["OptOutLists"]]
    assert names == ["Default", "marketing"]
    by_arn = client.describe_opt_out_lists(OptOutListNames=[arn])["OptOutLists"]
    assert [item["OptOutListName"] for item in by_arn] == ["marketing"]
    assert client.describe_opt_out_lists(Owner="SHARED")["OptOutLists"] == []

    client.put_opted_out_number(OptOutListName="marketing", OptedOutNumber=ALICE)
    deleted = client.delete_opt_out_list(OptOutListName=arn)
    assert deleted["OptOutListName"] == "marketing"
    assert set(eum_server.lists()) == {"Default"}
    with pytest.raises(KeyError):
        eum_server.numbers("marketing")


def test_creating_a_list_that_exists_is_a_conflict(client: SmsClient) -> None:
    with pytest.raises(client.exceptions.ConflictException) as raised:
        client.create_opt_out_list(OptOutListName="Default")
    assert raised.value.response["Reason"] == "RESOURCE_ALREADY_EXISTS"
    assert raised.value.response["ResourceType"] == "opt-out-list"
    assert raised.value.response["ResourceId"] == "Default"


def test_create_repeated_with_its_client_token_returns_the_same_list(
    eum_server: EumServer, client: SmsClient
) -> None:
    first = client.create_opt_out_list(OptOutListName="retried", ClientToken="token-1")
    eum_server.advance(minutes=1)
    again = client.create_opt_out_list(OptOutListName="retried", ClientToken="token-1")
    assert again["CreatedTimestamp"] == first["CreatedTimestamp"]
    with pytest.raises(client.exceptions.ConflictException):
        client.create_opt_out_list(OptOutListName="retried", ClientToken="token-2")


def test_describe_opt_out_lists_pages(eum_server: EumServer, client: SmsClient) -> None:
    for index in range(6):
        client.create_opt_out_list(OptOutListName=f"list-{index}")
    pages = list(
        client.get_paginator("describe_opt_out_lists").paginate(PaginationConfig={"PageSize": 3})
    )
    assert [len(page["OptOutLists"]) for page in pages] == [3, 3, 1]
    names = [item["OptOutListName"] for page in pages for item in page["OptOutLists"]]
    assert sorted(names) == sorted(eum_server.lists())


def test_unknown_names_in_describe_opt_out_lists_are_not_found(client: SmsClient) -> None:
    with pytest.raises(client.exceptions.ResourceNotFoundException) as raised:
        client.describe_opt_out_lists(OptOutListNames=["Default", "missing"])
    assert raised.value.response["ResourceId"] == "missing"


# --- opted-out numbers --------------------------------------------------------------------------


def test_put_is_idempotent_and_keeps_the_first_timestamp(
    eum_server: EumServer, client: SmsClient
) -> None:
    first = client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert first["EndUserOptedOut"] is False
    assert first["OptedOutTimestamp"] == eum_server.now
    listed_at = eum_server.now

    eum_server.advance(days=3)
    again = client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert again["OptedOutTimestamp"] == listed_at
    assert eum_server.numbers("Default")[ALICE].opted_out_at == listed_at
    assert len(eum_server.numbers("Default")) == 1


def test_put_keeps_an_end_user_opt_out(eum_server: EumServer, client: SmsClient) -> None:
    stopped_at = eum_server.now - timedelta(days=10)
    eum_server.inject_end_user_opt_out("Default", BOB, at=stopped_at)
    answer = client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=BOB)
    assert answer["EndUserOptedOut"] is True
    assert answer["OptedOutTimestamp"] == stopped_at
    assert eum_server.numbers("Default")[BOB].end_user_opted_out is True


def test_an_end_user_stop_marks_a_number_put_by_the_api(
    eum_server: EumServer, client: SmsClient
) -> None:
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    put_at = eum_server.now
    eum_server.advance(hours=1)
    entry = eum_server.inject_end_user_opt_out("Default", ALICE)
    assert entry.end_user_opted_out is True
    assert entry.opted_out_at == put_at
    assert listed(client) == {ALICE: True}


def test_the_arn_and_the_name_reach_the_same_list(eum_server: EumServer, client: SmsClient) -> None:
    arn = eum_server.lists()["Default"].arn
    answer = client.put_opted_out_number(OptOutListName=arn, OptedOutNumber=ALICE)
    assert answer["OptOutListName"] == "Default"
    assert answer["OptOutListArn"] == arn
    assert listed(client, "Default") == {ALICE: False}
    assert listed(client, arn) == {ALICE: False}
    client.delete_opted_out_number(OptOutListName=arn, OptedOutNumber=ALICE)
    assert eum_server.numbers("Default") == {}


def test_delete_answers_with_the_removal_time(eum_server: EumServer, client: SmsClient) -> None:
    eum_server.inject_end_user_opt_out("Default", CAROL)
    removed_at = eum_server.advance(days=2)
    answer = client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=CAROL)
    assert answer["OptedOutNumber"] == CAROL
    assert answer["EndUserOptedOut"] is True
    assert answer["OptedOutTimestamp"] == removed_at
    assert CAROL not in eum_server.numbers("Default")


def test_deleting_a_number_not_listed_is_not_found(client: SmsClient) -> None:
    with pytest.raises(client.exceptions.ResourceNotFoundException) as raised:
        client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert raised.value.response["ResourceType"] == "opted-out-number"
    assert raised.value.response["ResourceId"] == ALICE


def test_a_number_is_removed_at_most_once_every_30_days(
    eum_server: EumServer, client: SmsClient
) -> None:
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    eum_server.advance(days=29, hours=23)
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)

    with pytest.raises(client.exceptions.ConflictException) as raised:
        client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert raised.value.response["Reason"] == "RESOURCE_DELETION_NOT_ALLOWED"
    assert raised.value.response["ResourceType"] == "opted-out-number"
    assert raised.value.response["ResourceId"] == ALICE
    assert "30 days" in raised.value.response["Error"]["Message"]
    assert ALICE in eum_server.numbers("Default")

    eum_server.advance(hours=1)  # 30 days after the first removal
    client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert ALICE not in eum_server.numbers("Default")


def test_the_30_day_rule_is_per_number(eum_server: EumServer, client: SmsClient) -> None:
    for number in (ALICE, BOB):
        client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=number)
    client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=BOB)
    assert eum_server.numbers("Default") == {}


def test_the_end_user_opted_out_filter(eum_server: EumServer, client: SmsClient) -> None:
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    eum_server.inject_end_user_opt_out("Default", BOB)
    eum_server.inject_end_user_opt_out("Default", CAROL)

    def filtered(*values: str) -> dict[str, bool]:
        return listed(client, Filters=[{"Name": "end-user-opted-out", "Values": list(values)}])

    assert filtered("true") == {BOB: True, CAROL: True}
    assert filtered("false") == {ALICE: False}
    assert filtered("true", "false") == {ALICE: False, BOB: True, CAROL: True}

    with pytest.raises(client.exceptions.ValidationException) as raised:
        filtered("yes")
    assert raised.value.response["Reason"] == "INVALID_FILTER_VALUES"
    assert raised.value.response["Fields"][0]["Name"] == "Filters[0].Values"


def test_describe_picks_numbers_and_refuses_one_not_listed(
    eum_server: EumServer, client: SmsClient
) -> None:
    for number in (ALICE, BOB):
        client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=number)
    eum_server.inject_end_user_opt_out("Default", CAROL)
    assert listed(client, OptedOutNumbers=[CAROL, ALICE]) == {ALICE: False, CAROL: True}
    assert listed(
        client,
        OptedOutNumbers=[CAROL, ALICE],
        Filters=[{"Name": "end-user-opted-out", "Values": ["false"]}],
    ) == {ALICE: False}

    with pytest.raises(client.exceptions.ResourceNotFoundException) as raised:
        listed(client, OptedOutNumbers=[ALICE, "+14255550199"])
    assert raised.value.response["ResourceType"] == "opted-out-number"
    assert raised.value.response["ResourceId"] == "+14255550199"


def test_botocore_paginates_250_numbers(eum_server: EumServer, client: SmsClient) -> None:
    numbers = {f"+1206555{index:04d}" for index in range(250)}
    for number in sorted(numbers)[:125]:
        client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=number)
    for number in sorted(numbers)[125:]:
        eum_server.inject_end_user_opt_out("Default", number)

    paginator = client.get_paginator("describe_opted_out_numbers")
    pages = list(paginator.paginate(OptOutListName="Default"))
    assert [len(page["OptedOutNumbers"]) for page in pages] == [100, 100, 50]
    seen = [item["OptedOutNumber"] for page in pages for item in page["OptedOutNumbers"]]
    assert len(seen) == len(set(seen)) == 250
    assert set(seen) == numbers

    small = list(paginator.paginate(OptOutListName="Default", PaginationConfig={"PageSize": 40}))
    assert len(small) == 7
    assert sum(len(page["OptedOutNumbers"]) for page in small) == 250

    end_users = paginator.paginate(
        OptOutListName="Default",
        Filters=[{"Name": "end-user-opted-out", "Values": ["true"]}],
        PaginationConfig={"PageSize": 50},
    ).build_full_result()
    assert len(end_users["OptedOutNumbers"]) == 125
    assert all(item["EndUserOptedOut"] for item in end_users["OptedOutNumbers"])
    assert end_users["OptOutListName"] == "Default"


def test_a_foreign_next_token_is_refused(client: SmsClient) -> None:
    with pytest.raises(client.exceptions.ValidationException) as raised:
        client.describe_opted_out_numbers(OptOutListName="Default", NextToken="made-up")
    assert raised.value.response["Reason"] == "INVALID_NEXT_TOKEN"


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "params"),
    [
        ("put_opted_out_number", {"OptedOutNumber": ALICE}),
        ("delete_opted_out_number", {"OptedOutNumber": ALICE}),
        ("describe_opted_out_numbers", {}),
        ("delete_opt_out_list", {}),
    ],
)
@pytest.mark.parametrize(
    "list_name",
    [
        "missing",
        "arn:aws:sms-voice:us-east-1:123456789012:opt-out-list/missing",
        "arn:aws:sms-voice:us-east-1:999999999999:opt-out-list/Default",  # another account
    ],
)
def test_an_unknown_list_is_not_found(
    client: SmsClient, operation: str, params: dict[str, str], list_name: str
) -> None:
    with pytest.raises(client.exceptions.ResourceNotFoundException) as raised:
        getattr(client, operation)(OptOutListName=list_name, **params)
    assert raised.value.response["ResourceType"] == "opt-out-list"
    assert raised.value.response["ResourceId"] == list_name
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_a_malformed_arn_is_invalid(client: SmsClient) -> None:
    with pytest.raises(client.exceptions.ValidationException) as raised:
        client.put_opted_out_number(
            OptOutListName="arn:aws:sms-voice:us-east-1:123456789012:pool/Default",
            OptedOutNumber=ALICE,
        )
    assert raised.value.response["Reason"] == "INVALID_ARN"


@pytest.mark.parametrize(
    ("operation", "params", "field", "constraint"),
    [
        (
            "put_opted_out_number",
            {"OptOutListName": "Default", "OptedOutNumber": "555-0101"},
            "OptedOutNumber",
            "regular expression pattern",
        ),
        (
            "create_opt_out_list",
            {"OptOutListName": "has space"},
            "OptOutListName",
            "regular expression pattern",
        ),
        (
            "create_opt_out_list",
            {"OptOutListName": "x" * 65},
            "OptOutListName",
            "length less than or equal to 64",
        ),
        (
            "describe_opted_out_numbers",
            {"OptOutListName": "Default", "OptedOutNumbers": [ALICE] * 6},
            "OptedOutNumbers",
            "length less than or equal to 5",
        ),
        (
            "describe_opted_out_numbers",
            {"OptOutListName": "Default", "MaxResults": 101},
            "MaxResults",
            "value less than or equal to 100",
        ),
        (
            "describe_opted_out_numbers",
            {"OptOutListName": "Default", "Filters": [{"Name": "country", "Values": ["US"]}]},
            "Filters[0].Name",
            "enum value set: [end-user-opted-out]",
        ),
        (
            "describe_opt_out_lists",
            {"Owner": "EVERYONE"},
            "Owner",
            "enum value set: [SELF, SHARED]",
        ),
    ],
)
def test_the_model_constraints_are_enforced(
    eum_server: EumServer,
    client: SmsClient,
    operation: str,
    params: dict[str, Any],
    field: str,
    constraint: str,
) -> None:
    with pytest.raises(client.exceptions.ValidationException) as raised:
        getattr(client, operation)(**params)
    response = raised.value.response
    assert response["Reason"] == "FIELD_VALIDATION_FAILED"
    assert response["Fields"][0]["Name"] == field
    assert constraint in response["Fields"][0]["Message"]
    assert constraint in response["Error"]["Message"]
    assert set(eum_server.lists()) == {"Default"}
    assert eum_server.numbers("Default") == {}


def test_checks_botocore_skips_are_made_by_the_server(eum_server: EumServer) -> None:
    """Required members and minimums, which botocore checks itself unless told not to."""
    sms = make_client(eum_server, parameter_validation=False, retries={"total_max_attempts": 1})
    with pytest.raises(sms.exceptions.ValidationException) as raised:
        sms.put_opted_out_number(OptOutListName="Default")
    assert raised.value.response["Reason"] == "MISSING_PARAMETER"
    assert raised.value.response["Fields"][0]["Name"] == "OptedOutNumber"

    with pytest.raises(sms.exceptions.ValidationException) as raised:
        sms.describe_opted_out_numbers(OptOutListName="Default", MaxResults=0)
    assert raised.value.response["Fields"][0]["Name"] == "MaxResults"

    with pytest.raises(sms.exceptions.ValidationException) as raised:
        sms.describe_opted_out_numbers(OptOutListName="Default", MaxResults="ten")
    assert raised.value.response["Reason"] == "CANNOT_PARSE"

    with pytest.raises(sms.exceptions.ValidationException) as raised:
        sms.describe_opted_out_numbers(
            OptOutListName="", Filters=[{"Name": "end-user-opted-out", "Values": []}]
        )
    fields = raised.value.response["Fields"]
    assert {item["Name"] for item in fields} == {"OptOutListName", "Filters[0].Values"}
    message = raised.value.response["Error"]["Message"]
    assert message.startswith(f"{len(fields)} validation errors detected")
    sms.close()


def test_an_unsigned_request_is_refused(eum_server: EumServer) -> None:
    sms = make_client(eum_server, signature_version=UNSIGNED, retries={"total_max_attempts": 1})
    with pytest.raises(ClientError) as raised:
        sms.describe_opt_out_lists()
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert raised.value.response["Error"]["Code"] == "MissingAuthenticationTokenException"
    assert eum_server.calls == []
    sms.close()


def test_a_request_signed_for_another_service_is_refused(eum_server: EumServer) -> None:
    status, body = raw_post(eum_server, "PinpointSMSVoiceV2.DescribeOptOutLists", service="sns")
    assert status == 403
    assert body["__type"] == "InvalidSignatureException"
    assert "sms-voice" in body["message"]
    assert eum_server.calls == []


def test_the_wire_format(eum_server: EumServer) -> None:
    status, body = raw_post(eum_server, "PinpointSMSVoiceV2.DescribeOptOutLists")
    assert status == 200
    timestamp = body["OptOutLists"][0]["CreatedTimestamp"]
    assert isinstance(timestamp, int | float)
    assert datetime.fromtimestamp(timestamp, UTC) == eum_server.now

    status, body = raw_post(eum_server, "PinpointSMSVoiceV2.PutOptedOutNumber", b"{not json")
    assert status == 400
    assert body["__type"] == "ValidationException"
    assert body["Reason"] == "CANNOT_PARSE"


@pytest.mark.parametrize(
    "target", ["PinpointSMSVoiceV2.SendTextMessage", "PinpointSMSVoiceV2.Bogus", "Other.Thing"]
)
def test_an_unknown_operation(eum_server: EumServer, target: str) -> None:
    status, body = raw_post(eum_server, target)
    assert status == 400
    assert body["__type"] == "UnknownOperationException"
    assert eum_server.calls == []


# --- control API --------------------------------------------------------------------------------


def test_the_call_log(eum_server: EumServer, client: SmsClient) -> None:
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    with pytest.raises(client.exceptions.ValidationException):
        client.put_opted_out_number(OptOutListName="Default", OptedOutNumber="nope")
    client.describe_opted_out_numbers(OptOutListName="Default")
    assert [call.operation for call in eum_server.calls] == [
        "PutOptedOutNumber",
        "PutOptedOutNumber",
        "DescribeOptedOutNumbers",
    ]
    operation, params = eum_server.calls[0]
    assert (operation, params) == (
        "PutOptedOutNumber",
        {"OptOutListName": "Default", "OptedOutNumber": ALICE},
    )
    assert [p["OptedOutNumber"] for p in eum_server.calls_to("PutOptedOutNumber")] == [
        ALICE,
        "nope",
    ]
    eum_server.clear_calls()
    assert eum_server.calls == []


def test_a_refusal_for_some_times(eum_server: EumServer, client: SmsClient) -> None:
    eum_server.refuse("PutOptedOutNumber", "ThrottlingException", "slow down", times=2)
    for _ in range(2):
        with pytest.raises(client.exceptions.ThrottlingException) as raised:
            client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
        assert raised.value.response["Error"]["Message"] == "slow down"
        assert ALICE not in eum_server.numbers("Default")
    client.put_opted_out_number(OptOutListName="Default", OptedOutNumber=ALICE)
    assert ALICE in eum_server.numbers("Default")
    assert len(eum_server.calls_to("PutOptedOutNumber")) == 3


def test_a_refusal_until_cleared(eum_server: EumServer, client: SmsClient) -> None:
    eum_server.refuse("DeleteOptedOutNumber", "AccessDeniedException", "account disabled")
    eum_server.inject_end_user_opt_out("Default", BOB)
    for _ in range(5):
        with pytest.raises(client.exceptions.AccessDeniedException):
            client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=BOB)
    assert listed(client) == {BOB: True}  # other operations still answer
    eum_server.clear_refusals()
    client.delete_opted_out_number(OptOutListName="Default", OptedOutNumber=BOB)
    assert eum_server.numbers("Default") == {}


def test_a_server_fault_refusal_is_a_500(eum_server: EumServer, client: SmsClient) -> None:
    eum_server.refuse("DescribeOptOutLists", "InternalServerException", "broken", times=1)
    with pytest.raises(client.exceptions.InternalServerException) as raised:
        client.describe_opt_out_lists()
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500


def test_botocore_retries_through_a_throttle(eum_server: EumServer) -> None:
    sms = make_client(eum_server, retries={"mode": "standard", "total_max_attempts": 3})
    eum_server.refuse("DescribeOptOutLists", "ThrottlingException", "slow down", times=1)
    answer = sms.describe_opt_out_lists()
    assert answer["ResponseMetadata"]["RetryAttempts"] == 1
    assert len(eum_server.calls_to("DescribeOptOutLists")) == 2
    sms.close()


def test_refuse_names_a_served_operation(eum_server: EumServer) -> None:
    with pytest.raises(ValueError, match="not served"):
        eum_server.refuse("SendTextMessage", "ThrottlingException", "no")


def test_the_clock(eum_server: EumServer) -> None:
    start = eum_server.now
    assert eum_server.advance(days=30) == start + timedelta(days=30)
    eum_server.now = datetime(2027, 1, 1, tzinfo=UTC)
    assert eum_server.now == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        eum_server.now = datetime(2027, 1, 1)  # noqa: DTZ001 (a naive time is refused)
    with pytest.raises(ValueError):
        eum_server.inject_end_user_opt_out("Default", "not a number")
    with pytest.raises(KeyError):
        eum_server.inject_end_user_opt_out("missing", ALICE)


def test_region_account_and_lists_at_start() -> None:
    with EumServer(region="eu-west-1", account="111122223333", lists=("a", "b")) as server:
        sms = boto3.client("pinpoint-sms-voice-v2", **server.client_kwargs())
        lists = sms.describe_opt_out_lists()["OptOutLists"]
        assert [item["OptOutListArn"] for item in lists] == [
            "arn:aws:sms-voice:eu-west-1:111122223333:opt-out-list/a",
            "arn:aws:sms-voice:eu-west-1:111122223333:opt-out-list/b",
        ]
        sms.close()
        server.stop()
        server.start()  # same port, same state
        assert set(server.lists()) == {"a", "b"}
