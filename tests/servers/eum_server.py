"""A stand-in for AWS End User Messaging SMS opt-out lists (``pinpoint-sms-voice-v2``), for tests.

moto does not implement this service, so this is a real HTTP server on 127.0.0.1 that speaks the
service's JSON 1.0 protocol as botocore's own model describes it, driven by the real boto3 client:
``POST /`` with ``Content-Type: application/x-amz-json-1.0``, ``X-Amz-Target:
PinpointSMSVoiceV2.<Operation>`` and a JSON body. Errors are HTTP 400 (500 for the model's
``fault`` shapes) with ``{"__type": "<ErrorShape>", "message": ..., <modelled members>}``;
botocore's JSON parser takes the code from ``__type`` (this service is not "query compatible",
so no ``x-amzn-query-error`` header is involved) and raises ``client.exceptions.<ErrorShape>``,
with the modelled members (``Reason``, ``Fields``, ``ResourceType``, ``ResourceId``) at the top of
``error.response``. Timestamps go out as epoch seconds (numbers).

What it checks and decides:

- Authentication: a SigV4 ``Authorization`` header whose credential scope names the service
  ``sms-voice`` (the model's signing name). The signature itself is not verified. A request
  without the header gets 403 ``MissingAuthenticationTokenException``, a malformed one 403
  ``IncompleteSignatureException``, one scoped to another service 403
  ``InvalidSignatureException``: the codes AWS uses for these cases (none is modelled, so botocore
  raises a plain ``ClientError``).
- Validation: every request is checked against the operation's input shape in the model: required
  members, string length, pattern and enum, list length, integer range, JSON types. A violation is
  a ``ValidationException`` with ``Reason`` ``MISSING_PARAMETER`` (required member absent),
  ``FIELD_VALIDATION_FAILED`` (a constraint) or ``CANNOT_PARSE`` (not JSON, or a wrong JSON type),
  and ``Fields`` naming each member (``Filters[0].Values``). The model's patterns carry no
  anchors; here the whole value must match, so a malformed value fails here rather than in
  production. Members the model does not know are ignored, as the service ignores them.
- ``OptOutListName`` is a name or ``arn:aws:sms-voice:<region>:<account>:opt-out-list/<name>``;
  an ARN that does not parse is ``ValidationException`` ``INVALID_ARN``; an unknown list (or an
  ARN of another region or account) is ``ResourceNotFoundException`` with ``ResourceType``
  ``opt-out-list`` and ``ResourceId`` the value sent.
- ``PutOptedOutNumber`` is idempotent: a number put by the API has ``EndUserOptedOut`` false, a
  number the end user opted out stays true, and ``OptedOutTimestamp`` is when the number was first
  listed. Numbers are stored as sent (the model allows a missing ``+``; AWS documents no
  normalisation).
- ``DeleteOptedOutNumber``: a number not on the list is ``ResourceNotFoundException``
  (``opted-out-number``). AWS lets a number be removed from a list at most once every 30 days; a
  second removal within 30 days of the last one is ``ConflictException`` with ``Reason``
  ``RESOURCE_DELETION_NOT_ALLOWED``, ``ResourceType`` ``opted-out-number`` and ``ResourceId`` the
  number. Why that one: the model lists ``ConflictException`` for ``DeleteOptedOutNumber`` and for
  no other opted-out-number operation, and its documentation reads "the requested action isn't
  valid for the current state of the resource", which is what a time-based refusal is;
  ``ValidationException`` is about the input fields, which are valid here. Among the
  ``ConflictExceptionReason`` members, ``RESOURCE_DELETION_NOT_ALLOWED`` names the refused action
  on the resource (``PHONE_NUMBER_CANNOT_BE_OPTED_IN`` belongs to ``ValidationExceptionReason``).
  The response's ``OptedOutTimestamp`` is the removal time, as the API reference describes it.
- ``DescribeOptedOutNumbers``: ``OptedOutNumbers`` (up to 5) picks numbers; one that is not on the
  list is ``ResourceNotFoundException`` (``opted-out-number``, the first such number): the
  reference says an error is returned for such a number, and the operation's only modelled
  not-found error is this one. ``Filters`` with ``end-user-opted-out`` take ``["true"]``,
  ``["false"]`` or both (any other value is ``ValidationException`` ``INVALID_FILTER_VALUES``);
  filters are ANDed, values ORed. Numbers come sorted, ``MaxResults`` 1-100 (default 100), and
  ``NextToken`` resumes after the last number returned (a token this server did not issue for
  that list is ``INVALID_NEXT_TOKEN``).
- ``CreateOptOutList`` with a name that exists is ``ConflictException``
  ``RESOURCE_ALREADY_EXISTS``, unless it repeats the ``ClientToken`` that created the list, which
  returns the original answer (botocore fills ``ClientToken`` in itself). ``DeleteOptOutList``
  deletes the list with its numbers and removal history; ``DescribeOptOutLists`` pages by name and
  answers ``Owner=SHARED`` with no lists (nothing is shared here).
- Operations of the service that are not served here get 400 ``UnknownOperationException``.

Control from tests, not over HTTP: ``now`` (settable) and ``advance()`` move the clock, which
stands still otherwise and is used for every timestamp and the 30-day rule;
``inject_end_user_opt_out()`` lists a number as if the person had texted STOP; ``numbers()`` and
``lists()`` show the state; ``calls`` is the log of requests that reached an operation;
``refuse()`` makes an operation fail with a chosen error (``times`` failures, or until
``clear_refusals()``), for sinks that must keep being refused.

Use the fixture ``eum_server_fixture`` (import it into a test module to register it; it is named
``eum_server`` and gives each test a fresh server), or ``EumServer`` as a context manager.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple, TypeVar, cast

import botocore.session
import pytest
from botocore.model import ListShape, MapShape, ServiceModel, Shape, StructureShape
from ports import free_port

__all__ = (
    "Call",
    "EumServer",
    "OptOutList",
    "OptedOutNumber",
    "eum_server_fixture",
)

logger = logging.getLogger(__name__)

SERVICE_NAME = "pinpoint-sms-voice-v2"
SIGNING_NAME = "sms-voice"
TARGET_PREFIX = "PinpointSMSVoiceV2."
CONTENT_TYPE = "application/x-amz-json-1.0"
REMOVAL_INTERVAL = timedelta(days=30)
DEFAULT_MAX_RESULTS = 100
OPERATIONS = frozenset(
    {
        "CreateOptOutList",
        "DeleteOptOutList",
        "DeleteOptedOutNumber",
        "DescribeOptOutLists",
        "DescribeOptedOutNumbers",
        "PutOptedOutNumber",
    }
)
END_USER_OPTED_OUT = "end-user-opted-out"
# Error codes outside the model (authentication, and ones a test may ask refuse() for), with the
# status AWS gives them; an unlisted unmodelled code gets 400.
UNMODELLED_STATUS = {
    "MissingAuthenticationTokenException": 403,
    "IncompleteSignatureException": 403,
    "InvalidSignatureException": 403,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
}

_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9-]+)/aws4_request,\s*SignedHeaders=[a-z0-9;-]+,\s*Signature=[0-9a-f]{64}"
)
_LIST_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):sms-voice:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    r"opt-out-list/(?P<name>[A-Za-z0-9_-]{1,64})"
)

JsonObject = dict[str, Any]
T = TypeVar("T")


class Call(NamedTuple):
    """One request that reached an operation: its name and its JSON parameters."""

    operation: str
    params: JsonObject


@dataclass(frozen=True)
class OptedOutNumber:
    """An entry of an opt-out list."""

    number: str
    opted_out_at: datetime
    end_user_opted_out: bool


@dataclass(frozen=True)
class OptOutList:
    """An opt-out list, without its numbers."""

    name: str
    arn: str
    created_at: datetime
    tags: tuple[tuple[str, str], ...] = ()


@dataclass
class _ListState:
    info: OptOutList
    client_token: str | None
    numbers: dict[str, OptedOutNumber] = field(default_factory=dict)
    # When each number was last removed, kept after the removal: the 30-day rule needs it.
    removed_at: dict[str, datetime] = field(default_factory=dict)


@dataclass
class _Refusal:
    error_type: str
    message: str
    remaining: int | None


class _ApiError(Exception):
    """An error answer: ``__type``, ``message`` and the error shape's other members."""

    def __init__(self, error_type: str, message: str, **members: Any) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.members = members

    @property
    def status(self) -> int:
        return _status_of(self.error_type)

    def body(self) -> JsonObject:
        return {"__type": self.error_type, "message": self.message, **self.members}


@dataclass(frozen=True)
class _Violation:
    field: str
    constraint: str
    reason: str
    value: Any = None

    def describe(self) -> str:
        if self.reason == "MISSING_PARAMETER":
            return f"Value null at '{self.field}' failed to satisfy constraint: {self.constraint}"
        return (
            f"Value {_show(self.value)} at '{self.field}' failed to satisfy constraint: "
            f"{self.constraint}"
        )


@functools.cache
def service_model() -> ServiceModel:
    """botocore's model of ``pinpoint-sms-voice-v2`` (loaded once)."""
    return botocore.session.get_session().get_service_model(SERVICE_NAME)


@functools.cache
def _server_faults() -> frozenset[str]:
    """Error shapes the model marks ``fault`` (botocore's ``Shape.metadata`` leaves it out)."""
    loader = botocore.session.get_session().get_component("data_loader")
    shapes: dict[str, Any] = loader.load_service_model(SERVICE_NAME, "service-2")["shapes"]
    return frozenset(name for name, shape in shapes.items() if shape.get("fault"))


def _status_of(error_type: str) -> int:
    if error_type in UNMODELLED_STATUS:
        return UNMODELLED_STATUS[error_type]
    return 500 if error_type in _server_faults() else 400


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"'{text[:100]}'"


def _epoch(moment: datetime) -> float | int:
    seconds = moment.timestamp()
    return int(seconds) if seconds.is_integer() else seconds


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("the clock needs an aware datetime (tzinfo=UTC)")
    return moment.astimezone(UTC)


# --- validation against the model --------------------------------------------------------------


def validate(operation: str, params: Any) -> None:
    """Raise a ``ValidationException`` unless ``params`` satisfies the operation's input shape."""
    shape = service_model().operation_model(operation).input_shape
    violations: list[_Violation] = []
    if shape is not None:
        _check(shape, params, "", violations)
    if violations:
        count = len(violations)
        noun = "error" if count == 1 else "errors"
        raise _ApiError(
            "ValidationException",
            f"{count} validation {noun} detected: "
            + "; ".join(violation.describe() for violation in violations),
            Reason=violations[0].reason,
            Fields=[{"Name": v.field, "Message": v.describe()} for v in violations],
        )


def _check(shape: Shape, value: Any, path: str, out: list[_Violation]) -> None:
    kind = shape.type_name
    if kind == "structure":
        _check_structure(cast(StructureShape, shape), value, path, out)
    elif kind == "list":
        if not isinstance(value, list):
            out.append(_Violation(path, "Member must be a list", "CANNOT_PARSE", value))
            return
        _check_size(shape, len(value), value, path, "length", out)
        member = cast(ListShape, shape).member
        for index, item in enumerate(value):
            _check(member, item, f"{path}[{index}]", out)
    elif kind == "map":
        if not isinstance(value, dict):
            out.append(_Violation(path, "Member must be an object", "CANNOT_PARSE", value))
            return
        _check_size(shape, len(value), value, path, "length", out)
        map_shape = cast(MapShape, shape)
        for key, item in value.items():
            _check(map_shape.key, key, f"{path}.key", out)
            _check(map_shape.value, item, f"{path}[{key}]", out)
    elif kind == "string":
        _check_string(shape, value, path, out)
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            out.append(_Violation(path, "Member must be an integer", "CANNOT_PARSE", value))
            return
        _check_size(shape, value, value, path, "value", out)
    elif kind == "boolean":
        if not isinstance(value, bool):
            out.append(_Violation(path, "Member must be a boolean", "CANNOT_PARSE", value))
    elif kind in ("float", "double", "timestamp") and (
        isinstance(value, bool) or not isinstance(value, int | float)
    ):
        out.append(_Violation(path, "Member must be a number", "CANNOT_PARSE", value))


def _check_structure(shape: StructureShape, value: Any, path: str, out: list[_Violation]) -> None:
    if not isinstance(value, dict):
        out.append(_Violation(path or "body", "Member must be an object", "CANNOT_PARSE", value))
        return
    for name, member in shape.members.items():
        member_path = f"{path}.{name}" if path else name
        item = value.get(name)
        if item is None:
            if name in shape.required_members:
                out.append(_Violation(member_path, "Member must not be null", "MISSING_PARAMETER"))
            continue
        _check(member, item, member_path, out)


def _check_string(shape: Shape, value: Any, path: str, out: list[_Violation]) -> None:
    if not isinstance(value, str):
        out.append(_Violation(path, "Member must be a string", "CANNOT_PARSE", value))
        return
    _check_size(shape, len(value), value, path, "length", out)
    enum = cast(list[str], getattr(shape, "enum", None) or [])
    if enum and value not in enum:
        constraint = f"Member must satisfy enum value set: [{', '.join(enum)}]"
        out.append(_Violation(path, constraint, "FIELD_VALIDATION_FAILED", value))
    pattern = shape.metadata.get("pattern")
    if pattern is not None and _pattern(pattern).fullmatch(value) is None:
        constraint = f"Member must satisfy regular expression pattern: {pattern}"
        out.append(_Violation(path, constraint, "FIELD_VALIDATION_FAILED", value))


def _check_size(
    shape: Shape, size: int, value: Any, path: str, what: str, out: list[_Violation]
) -> None:
    low = shape.metadata.get("min")
    high = shape.metadata.get("max")
    if low is not None and size < low:
        constraint = f"Member must have {what} greater than or equal to {low}"
        out.append(_Violation(path, constraint, "FIELD_VALIDATION_FAILED", value))
    if high is not None and size > high:
        constraint = f"Member must have {what} less than or equal to {high}"
        out.append(_Violation(path, constraint, "FIELD_VALIDATION_FAILED", value))


@functools.cache
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


def _validation_error(reason: str, name: str, message: str) -> _ApiError:
    return _ApiError(
        "ValidationException", message, Reason=reason, Fields=[{"Name": name, "Message": message}]
    )


def _not_found(resource_type: str, resource_id: str) -> _ApiError:
    return _ApiError(
        "ResourceNotFoundException",
        f"The {resource_type} '{resource_id}' does not exist.",
        ResourceType=resource_type,
        ResourceId=resource_id,
    )


# --- the server ---------------------------------------------------------------------------------


class EumServer:
    """The stand-in server; ``url`` is its ``http://127.0.0.1:PORT`` endpoint."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        account: str = "123456789012",
        lists: Iterable[str] = ("Default",),
        now: datetime | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.region = region
        self.account = account
        self.host = host
        self.port = port if port is not None else free_port()
        self._lock = threading.RLock()
        self._now = _utc(now) if now is not None else datetime.now(UTC).replace(microsecond=0)
        self._lists: dict[str, _ListState] = {}
        self._calls: list[Call] = []
        self._refusals: dict[str, _Refusal] = {}
        self._http: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[str, Callable[[JsonObject], JsonObject]] = {
            "CreateOptOutList": self._create_opt_out_list,
            "DeleteOptOutList": self._delete_opt_out_list,
            "DeleteOptedOutNumber": self._delete_opted_out_number,
            "DescribeOptOutLists": self._describe_opt_out_lists,
            "DescribeOptedOutNumbers": self._describe_opted_out_numbers,
            "PutOptedOutNumber": self._put_opted_out_number,
        }
        for name in lists:
            self._add_list(name, tags=(), client_token=None)

    # lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for ``boto3.client("pinpoint-sms-voice-v2", ...)`` to reach us."""
        return {
            "endpoint_url": self.url,
            "region_name": self.region,
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
        }

    def start(self) -> None:
        """Listen on ``port`` and serve requests from a daemon thread."""
        if self._http is not None:
            raise RuntimeError("the server is running already")
        self._http = _HttpServer((self.host, self.port), _Handler, self)
        self._thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"eum-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("eum server started url=%s", self.url)

    def stop(self) -> None:
        """Stop serving and close the socket; the state stays, and ``start()`` serves it again."""
        http, self._http = self._http, None
        thread, self._thread = self._thread, None
        if http is None:
            return
        http.shutdown()
        http.server_close()
        if thread is not None:
            thread.join(5)
        logger.debug("eum server stopped url=%s", self.url)

    def __enter__(self) -> EumServer:
        if self._http is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # the clock

    @property
    def now(self) -> datetime:
        """The server's time: it stands still until a test sets it or calls ``advance()``."""
        with self._lock:
            return self._now

    @now.setter
    def now(self, moment: datetime) -> None:
        with self._lock:
            self._now = _utc(moment)

    def advance(
        self, *, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0
    ) -> datetime:
        """Move the clock forward; returns the new time."""
        step = timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
        if step < timedelta(0):
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._now += step
            return self._now

    # state

    def lists(self) -> dict[str, OptOutList]:
        """The opt-out lists by name."""
        with self._lock:
            return {name: state.info for name, state in self._lists.items()}

    def numbers(self, list_name: str) -> dict[str, OptedOutNumber]:
        """The entries of a list (name or ARN) by number; ``KeyError`` for an unknown list."""
        with self._lock:
            return dict(self._state_for_control(list_name).numbers)

    def inject_end_user_opt_out(
        self, list_name: str, number: str, at: datetime | None = None
    ) -> OptedOutNumber:
        """List ``number`` as if the person had texted STOP (``EndUserOptedOut`` true).

        A number already listed keeps its first ``OptedOutTimestamp`` (the earlier of it and
        ``at``); ``at`` defaults to ``now``.
        """
        number_shape = service_model().shape_for("PhoneNumber")
        if _pattern(number_shape.metadata["pattern"]).fullmatch(number) is None:
            raise ValueError("not a phone number the service accepts (E.164)")
        with self._lock:
            state = self._state_for_control(list_name)
            moment = _utc(at) if at is not None else self._now
            existing = state.numbers.get(number)
            if existing is not None:
                moment = min(moment, existing.opted_out_at)
            entry = OptedOutNumber(number=number, opted_out_at=moment, end_user_opted_out=True)
            state.numbers[number] = entry
            return entry

    # the call log

    @property
    def calls(self) -> list[Call]:
        """Every request that reached an operation, in arrival order (refused ones included)."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, operation: str) -> list[JsonObject]:
        """The parameters of every call to ``operation``, in arrival order."""
        with self._lock:
            return [call.params for call in self._calls if call.operation == operation]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    # refusals

    def refuse(
        self, operation: str, error_type: str, message: str, times: int | None = None
    ) -> None:
        """Answer ``operation`` with ``error_type`` (HTTP status as the model gives it) for the
        next ``times`` calls, or until ``clear_refusals()`` when ``times`` is None."""
        if operation not in OPERATIONS:
            raise ValueError(f"{operation} is not served here; one of {sorted(OPERATIONS)}")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1, or None")
        with self._lock:
            self._refusals[operation] = _Refusal(error_type, message, times)

    def clear_refusals(self) -> None:
        with self._lock:
            self._refusals.clear()

    # one request, as the HTTP handler hands it over

    def handle(self, operation: str, params: Any) -> JsonObject:
        """Log, refuse, validate and run one call; raises ``_ApiError`` for an error answer."""
        with self._lock:
            self._calls.append(Call(operation, params if isinstance(params, dict) else {}))
            refusal = self._refusals.get(operation)
            if refusal is not None:
                if refusal.remaining is not None:
                    refusal.remaining -= 1
                    if refusal.remaining == 0:
                        del self._refusals[operation]
                raise _ApiError(refusal.error_type, refusal.message)
            validate(operation, params)
            return self._handlers[operation](params)

    # operations (called with the lock held and valid params)

    def _create_opt_out_list(self, params: JsonObject) -> JsonObject:
        name: str = params["OptOutListName"]
        token: str | None = params.get("ClientToken")
        tags = tuple((tag["Key"], tag["Value"]) for tag in params.get("Tags") or ())
        state = self._lists.get(name)
        if state is not None:
            if token is None or token != state.client_token:
                raise _ApiError(
                    "ConflictException",
                    f"The opt-out list '{name}' exists already.",
                    Reason="RESOURCE_ALREADY_EXISTS",
                    ResourceType="opt-out-list",
                    ResourceId=name,
                )
        else:
            state = self._add_list(name, tags=tags, client_token=token)
        info = state.info
        return {
            "OptOutListArn": info.arn,
            "OptOutListName": info.name,
            "Tags": [{"Key": key, "Value": value} for key, value in info.tags],
            "CreatedTimestamp": _epoch(info.created_at),
        }

    def _delete_opt_out_list(self, params: JsonObject) -> JsonObject:
        state = self._resolve(params["OptOutListName"])
        del self._lists[state.info.name]
        return self._list_summary(state.info)

    def _describe_opt_out_lists(self, params: JsonObject) -> JsonObject:
        if params.get("Owner") == "SHARED":
            return {"OptOutLists": []}
        if params.get("OptOutListNames"):
            chosen = {self._resolve(name).info.name for name in params["OptOutListNames"]}
        else:
            chosen = set(self._lists)
        page, token = _page(
            sorted(chosen),
            params,
            scope=f"lists/{self.account}",
            key=lambda name: name,
        )
        return {
            "OptOutLists": [self._list_summary(self._lists[name].info) for name in page],
            **({"NextToken": token} if token else {}),
        }

    def _put_opted_out_number(self, params: JsonObject) -> JsonObject:
        state = self._resolve(params["OptOutListName"])
        number: str = params["OptedOutNumber"]
        entry = state.numbers.get(number)
        if entry is None:
            entry = OptedOutNumber(number=number, opted_out_at=self._now, end_user_opted_out=False)
            state.numbers[number] = entry
        return {
            "OptOutListArn": state.info.arn,
            "OptOutListName": state.info.name,
            **_number_json(entry),
        }

    def _delete_opted_out_number(self, params: JsonObject) -> JsonObject:
        state = self._resolve(params["OptOutListName"])
        number: str = params["OptedOutNumber"]
        entry = state.numbers.get(number)
        if entry is None:
            raise _not_found("opted-out-number", number)
        last = state.removed_at.get(number)
        if last is not None and self._now < last + REMOVAL_INTERVAL:
            allowed = last + REMOVAL_INTERVAL
            raise _ApiError(
                "ConflictException",
                f"A number can be removed from an opt-out list once every 30 days; it was "
                f"removed from '{state.info.name}' at {last.isoformat()} and can be removed "
                f"again from {allowed.isoformat()}.",
                Reason="RESOURCE_DELETION_NOT_ALLOWED",
                ResourceType="opted-out-number",
                ResourceId=number,
            )
        del state.numbers[number]
        state.removed_at[number] = self._now
        return {
            "OptOutListArn": state.info.arn,
            "OptOutListName": state.info.name,
            **_number_json(replace(entry, opted_out_at=self._now)),
        }

    def _describe_opted_out_numbers(self, params: JsonObject) -> JsonObject:
        state = self._resolve(params["OptOutListName"])
        wanted: list[bool] | None = None
        for index, opt_filter in enumerate(params.get("Filters") or ()):
            values = opt_filter["Values"]
            if opt_filter["Name"] == END_USER_OPTED_OUT:
                if any(value not in ("true", "false") for value in values):
                    raise _validation_error(
                        "INVALID_FILTER_VALUES",
                        f"Filters[{index}].Values",
                        f"The filter {END_USER_OPTED_OUT} takes the values true or false.",
                    )
                allowed = [value == "true" for value in values]
                wanted = allowed if wanted is None else [v for v in wanted if v in allowed]
        if params.get("OptedOutNumbers"):
            for number in params["OptedOutNumbers"]:
                if number not in state.numbers:
                    raise _not_found("opted-out-number", number)
            entries = [state.numbers[number] for number in set(params["OptedOutNumbers"])]
        else:
            entries = list(state.numbers.values())
        if wanted is not None:
            entries = [entry for entry in entries if entry.end_user_opted_out in wanted]
        entries.sort(key=lambda entry: entry.number)
        page, token = _page(
            entries, params, scope=f"numbers/{state.info.arn}", key=lambda entry: entry.number
        )
        return {
            "OptOutListArn": state.info.arn,
            "OptOutListName": state.info.name,
            "OptedOutNumbers": [_number_json(entry) for entry in page],
            **({"NextToken": token} if token else {}),
        }

    # helpers

    def _add_list(
        self, name: str, *, tags: tuple[tuple[str, str], ...], client_token: str | None
    ) -> _ListState:
        arn = f"arn:aws:sms-voice:{self.region}:{self.account}:opt-out-list/{name}"
        info = OptOutList(name=name, arn=arn, created_at=self._now, tags=tags)
        state = _ListState(info=info, client_token=client_token)
        self._lists[name] = state
        return state

    def _resolve(self, name_or_arn: str) -> _ListState:
        name = name_or_arn
        if name_or_arn.startswith("arn:"):
            match = _LIST_ARN.fullmatch(name_or_arn)
            if match is None:
                raise _validation_error(
                    "INVALID_ARN",
                    "OptOutListName",
                    f"'{name_or_arn}' is not an opt-out list ARN "
                    "(arn:aws:sms-voice:<region>:<account>:opt-out-list/<name>).",
                )
            if (match["partition"], match["region"], match["account"]) != (
                "aws",
                self.region,
                self.account,
            ):
                raise _not_found("opt-out-list", name_or_arn)
            name = match["name"]
        state = self._lists.get(name)
        if state is None:
            raise _not_found("opt-out-list", name_or_arn)
        return state

    def _state_for_control(self, list_name: str) -> _ListState:
        try:
            return self._resolve(list_name)
        except _ApiError as exc:
            raise KeyError(list_name) from exc

    @staticmethod
    def _list_summary(info: OptOutList) -> JsonObject:
        return {
            "OptOutListArn": info.arn,
            "OptOutListName": info.name,
            "CreatedTimestamp": _epoch(info.created_at),
        }


def _number_json(entry: OptedOutNumber) -> JsonObject:
    return {
        "OptedOutNumber": entry.number,
        "OptedOutTimestamp": _epoch(entry.opted_out_at),
        "EndUserOptedOut": entry.end_user_opted_out,
    }


def _page(
    items: list[T], params: JsonObject, *, scope: str, key: Callable[[T], str]
) -> tuple[list[T], str | None]:
    """One page of ``items`` (sorted by ``key``) after ``NextToken``, and the next token."""
    limit: int = params.get("MaxResults") or DEFAULT_MAX_RESULTS
    token = params.get("NextToken")
    if token is not None:
        after = _read_token(token, scope)
        items = [item for item in items if key(item) > after]
    page = items[:limit]
    if len(items) <= limit:
        return page, None
    return page, _make_token(scope, key(page[-1]))


def _make_token(scope: str, after: str) -> str:
    raw = json.dumps({"scope": scope, "after": after}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _read_token(token: str, scope: str) -> str:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        if decoded["scope"] == scope and isinstance(decoded["after"], str):
            return decoded["after"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        pass
    raise _validation_error(
        "INVALID_NEXT_TOKEN", "NextToken", "The NextToken was not issued for this request."
    )


# --- HTTP ---------------------------------------------------------------------------------------


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], eum: EumServer
    ) -> None:
        self.eum = eum
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    timeout = 30  # an idle kept-alive connection is closed after this long

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, delayed ACKs cost ~40 ms a call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            self._answer(200, self._serve(body))
        except _ApiError as error:
            logger.debug("eum error type=%s status=%d", error.error_type, error.status)
            self._answer(error.status, error.body(), error_type=error.error_type)

    def do_GET(self) -> None:
        self._answer(
            404,
            {"__type": "UnknownOperationException", "message": "POST / is the only request."},
            error_type="UnknownOperationException",
        )

    def _serve(self, body: bytes) -> JsonObject:
        _authenticate(self.headers.get("Authorization"))
        target = self.headers.get("X-Amz-Target") or ""
        operation = target.removeprefix(TARGET_PREFIX)
        if self.path != "/" or not target.startswith(TARGET_PREFIX) or operation not in OPERATIONS:
            raise _ApiError(
                "UnknownOperationException",
                f"The operation '{target}' is not served by this stand-in.",
            )
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != CONTENT_TYPE:
            raise _ApiError(
                "UnknownOperationException", f"The Content-Type must be {CONTENT_TYPE}."
            )
        try:
            params = json.loads(body) if body.strip() else {}
        except ValueError as exc:
            raise _validation_error(
                "CANNOT_PARSE", "body", f"The request body is not JSON: {exc}"
            ) from exc
        return cast(_HttpServer, self.server).eum.handle(operation, params)

    def _answer(self, status: int, payload: JsonObject, error_type: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        if error_type is not None:
            self.send_header("x-amzn-ErrorType", error_type)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("eum http " + format, *args)


def _authenticate(header: str | None) -> None:
    """Check that a SigV4 credential scope names ``sms-voice``; the signature is not verified."""
    if not header:
        raise _ApiError("MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTHORIZATION.match(header)
    if match is None:
        raise _ApiError(
            "IncompleteSignatureException",
            "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            "in AWS4-HMAC-SHA256 form.",
        )
    if match["service"] != SIGNING_NAME:
        raise _ApiError(
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{SIGNING_NAME}'.",
        )


@pytest.fixture(name="eum_server")
def eum_server_fixture() -> Iterator[EumServer]:
    """A started stand-in with the ``Default`` list, fresh for each test."""
    with EumServer() as server:
        yield server
