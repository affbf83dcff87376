"""PhoneNumberValidate, answered offline by libphonenumber (see ``optsync.engine.phone``)."""

from __future__ import annotations

from optsync.api.errors import ApiError
from optsync.api.routing import Call, Reply, Route
from optsync.engine.phone import validate_number

__all__ = ("ROUTES",)


def phone_number_validate(call: Call) -> Reply:
    body = call.json()
    if not isinstance(body, dict):
        raise ApiError.bad_request("NumberValidateRequest must be a JSON object")
    number, hint = body.get("PhoneNumber"), body.get("IsoCountryCode")
    if not isinstance(number, str) or not number.strip():
        raise ApiError.bad_request("PhoneNumber is required, e.g. +12065550142")
    if hint is not None and not isinstance(hint, str):
        raise ApiError.bad_request("IsoCountryCode must be a string such as US")
    return Reply(200, validate_number(number, hint).to_wire())


ROUTES = [Route("POST", "/v1/phone/number/validate", phone_number_validate)]
