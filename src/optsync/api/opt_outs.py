"""Extension: ``POST /v1/apps/{app}/opt-outs``, an end user's own opt-out reported by any
other system (a carrier or Twilio webhook adapter, a help desk), signed like every route.

Body: ``{"Address": "+12065550100", "Keyword": "STOP", "OptedOutAt": "2026-12-03T10:00:00Z",
"Source": "twilio"}`` (only ``Address`` is required; ``OptedOutAt`` defaults to now). Every SMS
and VOICE endpoint at the number is opted out and held until an explicit new opt-in, the report
is kept for the audit and, where ``writeback`` is configured, written back to the source. The
same report sent twice (address, time, source) is recorded once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from optsync.api.errors import ApiError
from optsync.api.routing import Call, Reply, Route
from optsync.engine.models import iso_now
from optsync.engine.phone import normalize

__all__ = ("ROUTES",)

_FIELDS = frozenset({"Address", "Keyword", "OptedOutAt", "Source"})
_SOURCE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _text(body: dict[str, object], name: str, limit: int) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ApiError.bad_request(f"{name} must be a non-empty string of at most {limit}")
    return value.strip()


def _when(text: str | None) -> str:
    if text is None:
        return iso_now()
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError.bad_request(
            f"OptedOutAt = {text!r} is not an ISO-8601 time: write e.g. 2026-12-03T10:00:00Z"
        ) from None
    if moment.tzinfo is None:
        raise ApiError.bad_request("OptedOutAt needs a time zone: end it with Z or +HH:MM")
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def report_opt_out(call: Call) -> Reply:
    body = call.json()
    if not isinstance(body, dict):
        raise ApiError.bad_request("The body must be a JSON object with Address")
    unknown = set(body) - _FIELDS
    if unknown:
        raise ApiError.bad_request(
            f"{sorted(unknown)[0]} is not a field of this request; known: "
            f"{', '.join(sorted(_FIELDS))}"
        )
    address = _text(body, "Address", 32)
    if address is None:
        raise ApiError.bad_request("Address is required: the number that opted out, in E.164")
    phone = normalize(address)
    if phone is None:
        raise ApiError.bad_request(
            "Address is not a phone number: write it in E.164, e.g. +12065550100"
        )
    source = _text(body, "Source", 64)
    if source is not None and not _SOURCE.match(source):
        raise ApiError.bad_request("Source may hold letters, digits and _ . : - (at most 64)")
    key_id = call.context.get("key_id")
    via = f"api:{source or key_id or 'unsigned'}"
    recorded = call.store.record_end_user_opt_out(
        call.params["app"],
        phone.e164,
        _when(_text(body, "OptedOutAt", 40)),
        via,
        _text(body, "Keyword", 32),
    )
    return Reply(
        202,
        {
            "RequestID": call.request_id,
            "Recorded": recorded is not None,
            "EndpointIds": list(recorded.endpoint_ids) if recorded else [],
        },
    )


ROUTES = [Route("POST", "/v1/apps/{app}/opt-outs", report_opt_out)]
