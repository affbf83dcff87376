"""Apps, channels and PhoneNumberValidate through boto3's ``pinpoint`` client, unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from pinpoint_e2e import (
    HEX_ID,
    ISO_MILLIS_Z,
    OTHER_KEY_ID,
    OTHER_SECRET,
    ClientFactory,
    unique,
)

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient

pytestmark = pytest.mark.e2e


# apps -------------------------------------------------------------------------------------------


def test_create_app_answers_201_with_the_application(pinpoint: PinpointClient) -> None:
    name = unique("created")
    response = pinpoint.create_app(
        CreateApplicationRequest={"Name": name, "tags": {"team": "growth"}}
    )
    try:
        assert response["ResponseMetadata"]["HTTPStatusCode"] == 201
        app = response["ApplicationResponse"]
        assert app["Name"] == name
        assert HEX_ID.fullmatch(app["Id"])
        assert app["Arn"].startswith("arn:aws:mobiletargeting:")
        assert app["Arn"].endswith(f":apps/{app['Id']}")
        assert app["tags"] == {"team": "growth"}
        assert ISO_MILLIS_Z.fullmatch(app["CreationDate"])
        assert pinpoint.get_app(ApplicationId=app["Id"])["ApplicationResponse"] == app
    finally:
        pinpoint.delete_app(ApplicationId=response["ApplicationResponse"]["Id"])


def test_success_responses_carry_a_request_id(pinpoint: PinpointClient, app_id: str) -> None:
    response = pinpoint.get_app(ApplicationId=app_id)
    metadata = response["ResponseMetadata"]
    assert metadata["HTTPStatusCode"] == 200
    assert metadata["RequestId"]
    assert metadata["HTTPHeaders"]["x-amzn-requestid"] == metadata["RequestId"]
    assert response["ApplicationResponse"]["Id"] == app_id


def test_get_apps_pages_with_page_size_and_token(pinpoint: PinpointClient) -> None:
    mine = [
        pinpoint.create_app(CreateApplicationRequest={"Name": unique(f"paged{i}")})[
            "ApplicationResponse"
        ]["Id"]
        for i in range(3)
    ]
    try:
        seen: list[str] = []
        pages = 0
        token: str | None = None
        while True:
            if token is None:
                response = pinpoint.get_apps(PageSize="2")
            else:
                response = pinpoint.get_apps(PageSize="2", Token=token)
            page = response["ApplicationsResponse"]
            assert 1 <= len(page["Item"]) <= 2
            seen += [item["Id"] for item in page["Item"]]
            pages += 1
            token = page.get("NextToken")
            if token is None:
                break
            assert len(page["Item"]) == 2
            assert pages < 100, "GetApps never stopped returning NextToken"
        assert pages >= 2
        assert len(seen) == len(set(seen)), "an app came back on two pages"
        assert [i for i in seen if i in mine] == mine, "apps are listed oldest first, once each"
    finally:
        for created in mine:
            pinpoint.delete_app(ApplicationId=created)


def test_delete_app_returns_it_and_then_it_is_gone(pinpoint: PinpointClient) -> None:
    name = unique("doomed")
    created = pinpoint.create_app(CreateApplicationRequest={"Name": name})["ApplicationResponse"]
    deleted = pinpoint.delete_app(ApplicationId=created["Id"])
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert deleted["ApplicationResponse"]["Id"] == created["Id"]
    assert deleted["ApplicationResponse"]["Name"] == name
    with pytest.raises(pinpoint.exceptions.NotFoundException):
        pinpoint.get_app(ApplicationId=created["Id"])
    listed = pinpoint.get_apps(PageSize="1000")["ApplicationsResponse"]["Item"]
    assert created["Id"] not in {a["Id"] for a in listed}


def test_second_configured_key_pair_is_accepted(make_client: ClientFactory, app_id: str) -> None:
    other = make_client(OTHER_KEY_ID, OTHER_SECRET)
    assert other.get_app(ApplicationId=app_id)["ApplicationResponse"]["Id"] == app_id


def test_session_credentials_and_any_region_are_accepted(
    make_client: ClientFactory, app_id: str
) -> None:
    with_token = make_client(session_token="FwoGZXIvYXdzEXAMPLETOKEN")
    assert with_token.get_app(ApplicationId=app_id)["ApplicationResponse"]["Id"] == app_id
    elsewhere = make_client(region="eu-central-1")
    assert elsewhere.get_app(ApplicationId=app_id)["ApplicationResponse"]["Id"] == app_id


# channels ---------------------------------------------------------------------------------------


def test_sms_channel_update_and_get_count_versions(pinpoint: PinpointClient, app_id: str) -> None:
    first = pinpoint.update_sms_channel(
        ApplicationId=app_id, SMSChannelRequest={"Enabled": True, "SenderId": "OPTSYNC"}
    )["SMSChannelResponse"]
    assert first["ApplicationId"] == app_id
    assert first["Platform"] == "SMS"
    assert first["Enabled"] is True
    assert first["SenderId"] == "OPTSYNC"
    assert first["Version"] == 1
    assert ISO_MILLIS_Z.fullmatch(first["CreationDate"])

    second = pinpoint.update_sms_channel(
        ApplicationId=app_id, SMSChannelRequest={"Enabled": False}
    )["SMSChannelResponse"]
    assert second["Version"] == 2
    assert second["Enabled"] is False
    assert second["CreationDate"] == first["CreationDate"]

    got = pinpoint.get_sms_channel(ApplicationId=app_id)["SMSChannelResponse"]
    assert got["Version"] == 2
    assert got["Enabled"] is False
    assert got["Platform"] == "SMS"


def test_email_channel_needs_from_address_and_identity(
    pinpoint: PinpointClient, make_client: ClientFactory, app_id: str
) -> None:
    identity = "arn:aws:ses:us-east-1:000000000000:identity/example.com"
    updated = pinpoint.update_email_channel(
        ApplicationId=app_id,
        EmailChannelRequest={
            "Enabled": True,
            "FromAddress": "news@example.com",
            "Identity": identity,
        },
    )["EmailChannelResponse"]
    assert updated["Platform"] == "EMAIL"
    assert updated["FromAddress"] == "news@example.com"
    assert updated["Identity"] == identity
    assert updated["Enabled"] is True
    assert updated["Version"] == 1
    got = pinpoint.get_email_channel(ApplicationId=app_id)["EmailChannelResponse"]
    assert got["FromAddress"] == "news@example.com"
    assert got["Identity"] == identity

    # botocore itself refuses the missing member; switch its check off to reach the server.
    unchecked = make_client(parameter_validation=False)
    with pytest.raises(unchecked.exceptions.BadRequestException) as excinfo:
        unchecked.update_email_channel(
            ApplicationId=app_id,
            EmailChannelRequest={"Enabled": True, "FromAddress": "news@example.com"},  # type: ignore[typeddict-item]
        )
    assert "Identity" in excinfo.value.response["Error"]["Message"]
    after = pinpoint.get_email_channel(ApplicationId=app_id)["EmailChannelResponse"]
    assert after["Version"] == 1, "a refused update must not change the channel"


def test_voice_channel_update_and_get(pinpoint: PinpointClient, app_id: str) -> None:
    updated = pinpoint.update_voice_channel(
        ApplicationId=app_id, VoiceChannelRequest={"Enabled": True}
    )["VoiceChannelResponse"]
    assert updated["Platform"] == "VOICE"
    assert updated["Enabled"] is True
    assert updated["ApplicationId"] == app_id
    got = pinpoint.get_voice_channel(ApplicationId=app_id)["VoiceChannelResponse"]
    assert got["Enabled"] is True
    assert got["Version"] == updated["Version"] == 1


def test_get_channels_maps_channel_type_to_channel(pinpoint: PinpointClient, app_id: str) -> None:
    pinpoint.update_sms_channel(ApplicationId=app_id, SMSChannelRequest={"Enabled": True})
    pinpoint.update_sms_channel(ApplicationId=app_id, SMSChannelRequest={"Enabled": True})
    pinpoint.update_voice_channel(ApplicationId=app_id, VoiceChannelRequest={"Enabled": False})
    pinpoint.update_email_channel(
        ApplicationId=app_id,
        EmailChannelRequest={"FromAddress": "a@example.com", "Identity": "example.com"},
    )
    channels = pinpoint.get_channels(ApplicationId=app_id)["ChannelsResponse"]["Channels"]
    assert {"SMS", "VOICE", "EMAIL"} <= set(channels)
    assert channels["SMS"]["Enabled"] is True
    assert channels["SMS"]["Version"] == 2
    assert channels["VOICE"]["Enabled"] is False
    assert channels["VOICE"]["Version"] == 1
    assert channels["EMAIL"]["Version"] == 1
    assert all(c["ApplicationId"] == app_id for c in channels.values())


# PhoneNumberValidate ----------------------------------------------------------------------------


def test_phone_number_validate_us_mobile(pinpoint: PinpointClient) -> None:
    response = pinpoint.phone_number_validate(NumberValidateRequest={"PhoneNumber": "+12065550142"})
    result = response["NumberValidateResponse"]
    assert result["PhoneType"] == "MOBILE"
    assert result["PhoneTypeCode"] == 0
    assert result["CountryCodeIso2"] == "US"
    assert result["Country"] == "United States"
    assert result["CountryCodeNumeric"] == "1"
    assert result["Timezone"] == "America/Los_Angeles"
    assert result["CleansedPhoneNumberE164"] == "+12065550142"
    assert result["OriginalPhoneNumber"] == "+12065550142"


def test_phone_number_validate_unassigned_area_code_is_invalid(pinpoint: PinpointClient) -> None:
    response = pinpoint.phone_number_validate(NumberValidateRequest={"PhoneNumber": "+12341111111"})
    result = response["NumberValidateResponse"]
    assert result["PhoneType"] == "INVALID"
    assert result["PhoneTypeCode"] == 3
    assert result["OriginalPhoneNumber"] == "+12341111111"
    for absent in ("Carrier", "City", "Timezone", "Country", "ZipCode"):
        assert absent not in result, f"an INVALID answer carries no {absent}"


def test_phone_number_validate_national_number_with_country_hint(
    pinpoint: PinpointClient,
) -> None:
    response = pinpoint.phone_number_validate(
        NumberValidateRequest={"PhoneNumber": "(206) 555-0142", "IsoCountryCode": "US"}
    )
    result = response["NumberValidateResponse"]
    assert result["CleansedPhoneNumberE164"] == "+12065550142"
    assert result["OriginalCountryCodeIso2"] == "US"
    assert result["OriginalPhoneNumber"] == "(206) 555-0142"
    assert result["PhoneType"] == "MOBILE"
