"""The drop-in Lambda: a Kinesis event of AWS DMS records in, Pinpoint API calls out.

``lambda_handler(event, context)`` replaces the AWS sample's function behind DMS -> Kinesis: it
reads the DMS records of the batch (``optsync.formats.dms``), maps them with the same rules as
``[[mapping]]`` (``optsync.apply.mapping``) and writes the endpoints through a
Pinpoint-compatible API (a reachable ``optsync serve``) with boto3's own ``pinpoint`` client.
It returns Lambda's partial batch response, ``{"batchItemFailures": [{"itemIdentifier":
sequenceNumber}, ...]}``, instead of failing the batch. See docs/lambda.md.

Decisions:

- Settings come from ``OPTSYNC_*`` environment variables, read and checked once per container
  (on the first invocation, before any record): a missing or bad one raises ``ConfigError``
  naming the variable and the fix, so the whole batch fails loudly instead of record by record.
  The container's ``AWS_*`` variables are its IAM role's and are never used for the API: the
  client is given optsync's own keys. The first invocation also reads the app (GetApp), so a
  wrong app id or refused keys is that same loud error, not a stream of 404s and 403s.
- Per record, in event order: a control record is skipped and counted; a record that cannot be
  read or mapped (poison) is reported by its ``sequenceNumber``; the rest become writes.
  An update whose new row cannot be mapped but whose old endpoint can still be deleted has the
  delete applied and is reported too (removing an endpoint that could be messaged is the safe
  direction, as ``Mapper`` decides).
- Writes go out in event order: upserts in ``UpdateEndpointsBatch`` calls of at most 100 items,
  a delete as ``DeleteEndpoint`` (a 404 is success: the end state is the same). A call ends
  before a delete, and before a second write of an endpoint already in it, so one endpoint's
  changes arrive in their order. A 400/413 for a call is split in halves until the refused
  items are found (the API applies a call whole or not at all): only their records are
  reported. Throttling, 5xx, a connection error, a 403 or a vanished app means the API is
  unavailable: that call's records and every later record with writes are reported, and no
  more calls are made (Lambda retries from the lowest reported sequence number anyway).
- Good records after a poison record are applied in the same invocation. Lambda retries from
  the poison record, so they come again; upserts and deletes are idempotent and arrive in the
  same order, so the end state is the same, and a later record is applied even if the poison
  record's retries run out.
- The API takes no source position, so the engine's position guard does not apply here:
  per-key order comes from the shard (one invocation per shard at a time, so
  ``ParallelizationFactor`` must stay 1) and from the event order kept above.
- Logs: one summary line per invocation (counts) at INFO; a poison record's sequence number and
  reason at WARNING. Reasons from ``dms`` and ``mapping`` never quote a phone number or e-mail
  address; nothing else from a record is logged.
- Only what the handler needs is imported: msgspec, phonenumbers, pycountry and boto3 (present
  in the Lambda runtime); no server dependency (``optsync lambda package`` checks it).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from optsync.apply.mapping import Mapper, MappingError, MappingRule
from optsync.backends import mapping_rules
from optsync.config import parse_mappings
from optsync.engine.endpoints import MAX_BATCH_ITEMS, endpoint_key
from optsync.engine.models import EndpointDelete, EndpointPatch
from optsync.errors import ConfigError
from optsync.formats import dms
from optsync.redaction import mask

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient
    from mypy_boto3_pinpoint.type_defs import EndpointBatchItemTypeDef

__all__ = (
    "DEFAULT_MAPPING",
    "BatchSummary",
    "KinesisHandler",
    "LambdaSettings",
    "lambda_handler",
)

logger = logging.getLogger(__name__)

ENV_API_URL = "OPTSYNC_API_URL"
ENV_APPLICATION_ID = "OPTSYNC_APPLICATION_ID"
ENV_ACCESS_KEY_ID = "OPTSYNC_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY = "OPTSYNC_SECRET_ACCESS_KEY"  # noqa: S105 - a variable's name
ENV_REGION = "OPTSYNC_REGION"
ENV_MAPPING = "OPTSYNC_MAPPING"
ENV_UNMAPPED = "OPTSYNC_UNMAPPED"
ENV_LOG_LEVEL = "OPTSYNC_LOG_LEVEL"
ENV_NAMES = (
    ENV_API_URL,
    ENV_APPLICATION_ID,
    ENV_ACCESS_KEY_ID,
    ENV_SECRET_ACCESS_KEY,
    ENV_REGION,
    ENV_MAPPING,
    ENV_UNMAPPED,
    ENV_LOG_LEVEL,
)

DEFAULT_MAPPING: list[dict[str, str]] = [
    {
        "table": "optin_status",
        "channel": "SMS",
        "address": "phone",
        "user_id": "userid",
        "opt_in": "optin",
        "effective_date": "lastupdate",
    }
]
"""The sample's table ``optin_status(userid, phone, optin, lastupdate)``, as ``optsync up``
maps it: endpoint id ``{userid}_{phone}`` (the sample's), the phone in E.164."""

SEQUENCE_WIDTH = 64
"""Digits a Kinesis sequence number is zero-padded to as a fallback position (as ``optsync
replay --format kinesis-event`` does; they have up to 56)."""
_REFUSED = (400, 413)
"""Statuses that refuse a call's content: split it to find the items refused."""


@dataclass(frozen=True)
class LambdaSettings:
    """The handler's settings, read from ``OPTSYNC_*`` environment variables."""

    api_url: str
    application_id: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"
    rules: tuple[MappingRule, ...] = ()
    unmapped: Literal["dlq", "skip"] = "dlq"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LambdaSettings:
        """Read and check the variables; ``ConfigError`` names the first bad one and the fix."""
        env = os.environ if env is None else env
        api_url = _required(env, ENV_API_URL, "the URL of optsync serve, e.g. https://optsync:8080")
        if not api_url.lower().startswith(("http://", "https://")):
            raise ConfigError(
                f"{ENV_API_URL} must start with http:// or https:// (the URL of optsync serve)"
            )
        application_id = _required(
            env,
            ENV_APPLICATION_ID,
            "the Id of the app in optsync serve (its console's Apps page or boto3 get_apps)",
        )
        access_key_id = _required(
            env, ENV_ACCESS_KEY_ID, "a key id of optsync serve's [api] credentials"
        )
        secret = _required(
            env, ENV_SECRET_ACCESS_KEY, "the secret of that key (not the Lambda role's)"
        )
        region = env.get(ENV_REGION, "").strip() or "us-east-1"
        unmapped_text = env.get(ENV_UNMAPPED, "").strip().lower() or "fail"
        if unmapped_text not in ("fail", "skip"):
            raise ConfigError(
                f"{ENV_UNMAPPED} = {unmapped_text!r}: use 'fail' (report records of tables "
                "without a rule) or 'skip' (ignore them)"
            )
        return cls(
            api_url=api_url.rstrip("/"),
            application_id=application_id,
            access_key_id=access_key_id,
            secret_access_key=secret,
            region=region,
            rules=_rules(env.get(ENV_MAPPING, "")),
            unmapped="skip" if unmapped_text == "skip" else "dlq",
        )


def _required(env: Mapping[str, str], name: str, what: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: set it to {what} in the function's environment")
    return value


def _rules(text: str) -> tuple[MappingRule, ...]:
    if not text.strip():
        return mapping_rules(parse_mappings(DEFAULT_MAPPING))
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{ENV_MAPPING} is not JSON ({exc.msg} at column {exc.colno}): write a list of rule "
            'objects, e.g. [{"table": "optin_status", "address": "phone", "opt_in": "optin", '
            '"user_id": "userid"}]'
        ) from None
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{ENV_MAPPING} must be a non-empty JSON list of rule objects with the [[mapping]] "
            "keys (table, address, opt_in, user_id, ...)"
        )
    try:
        return mapping_rules(parse_mappings(raw))
    except ConfigError as exc:
        raise ConfigError(f"{ENV_MAPPING}: {exc}") from None


@dataclass
class BatchSummary:
    """What one invocation did (logged as one line, counts only)."""

    records: int = 0
    applied: int = 0
    """Records whose writes all reached the API (or that had none to make)."""
    control: int = 0
    poison: int = 0
    """Records that could not be read or mapped, or whose item the API refused."""
    unavailable: int = 0
    """Records not applied because the API was unavailable."""
    calls: int = 0

    def line(self) -> str:
        return (
            f"records={self.records} applied={self.applied} control={self.control} "
            f"poison={self.poison} unavailable={self.unavailable} calls={self.calls}"
        )


class _Unavailable(Exception):
    """The API cannot take writes now (throttling, 5xx, connection, 403, app gone)."""


@dataclass
class _Record:
    sequence: str
    writes: tuple[EndpointPatch | EndpointDelete, ...] = ()
    failed: bool = False


@dataclass
class _Call:
    """The upserts of one UpdateEndpointsBatch call: (record index, item)."""

    items: list[tuple[int, EndpointBatchItemTypeDef]] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)


def patch_item(patch: EndpointPatch) -> EndpointBatchItemTypeDef:
    """An ``EndpointBatchItem`` holding what ``patch`` sets; what it leaves ``None`` stays as
    it is on the other side (the merge of UpdateEndpoint), as the engine applies a patch."""
    item: dict[str, Any] = {"Id": patch.id}
    if patch.channel_type is not None:
        item["ChannelType"] = patch.channel_type.value
    if patch.address is not None:
        item["Address"] = patch.address
    if patch.opt_out is not None:
        item["OptOut"] = patch.opt_out.value
    if patch.endpoint_status is not None:
        item["EndpointStatus"] = patch.endpoint_status.value
    if patch.effective_date is not None:
        item["EffectiveDate"] = patch.effective_date
    if patch.request_id is not None:
        item["RequestId"] = patch.request_id
    attributes = {k: list(v) for k, v in (patch.attributes or {}).items()}
    if patch.opt_in_reason:
        attributes["OptsyncOptInReason"] = [patch.opt_in_reason]
    if attributes:
        item["Attributes"] = attributes
    user: dict[str, Any] = {}
    if patch.user_id is not None:
        user["UserId"] = patch.user_id
    if patch.user_attributes:
        user["UserAttributes"] = {k: list(v) for k, v in patch.user_attributes.items()}
    if user:
        item["User"] = user
    return cast("EndpointBatchItemTypeDef", item)


class KinesisHandler:
    """Applies Kinesis events of DMS records through a Pinpoint-compatible API."""

    def __init__(self, settings: LambdaSettings) -> None:
        self.settings = settings
        self.mapper = Mapper(settings.rules, unmapped=settings.unmapped)
        self._client: PinpointClient | None = None
        self._app_checked = False

    @property
    def client(self) -> PinpointClient:
        if self._client is None:
            s = self.settings
            # Explicit keys: the container's AWS_* credentials are its role's, not optsync's.
            self._client = boto3.session.Session().client(
                "pinpoint",
                endpoint_url=s.api_url,
                region_name=s.region,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                aws_session_token=None,
                config=Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=3,
                    read_timeout=20,
                ),
            )
        return self._client

    def __call__(self, event: Mapping[str, Any]) -> dict[str, list[dict[str, str]]]:
        records = event.get("Records") if isinstance(event, Mapping) else None
        if not isinstance(records, list):
            raise ConfigError(
                "the event has no Records list: invoke the function from a Kinesis event "
                "source mapping"
            )
        summary = BatchSummary(records=len(records))
        read = [self._read(index, raw, summary) for index, raw in enumerate(records)]
        try:
            self._check_app()
        except _Unavailable as exc:
            logger.error("optsync API unavailable: %s", exc)
            for record in read:
                if record.writes and not record.failed:
                    record.failed = True
                    summary.unavailable += 1
        else:
            self._apply(read, summary)
        summary.applied = sum(1 for r in read if not r.failed) - summary.control
        logger.info("lambda batch %s", summary.line())
        return {"batchItemFailures": [{"itemIdentifier": r.sequence} for r in read if r.failed]}

    # reading ----------------------------------------------------------------------------------
    def _read(self, index: int, raw: Any, summary: BatchSummary) -> _Record:
        kinesis = raw.get("kinesis") if isinstance(raw, dict) else None
        if not isinstance(kinesis, dict):
            kinesis = {}
        sequence = kinesis.get("sequenceNumber")
        if not isinstance(sequence, str) or not sequence:
            # Without its sequence number a record cannot be reported: fail the whole batch.
            raise ConfigError(
                f"Records[{index}] has no kinesis.sequenceNumber: the event is not a Kinesis "
                "event; invoke the function from a Kinesis event source mapping"
            )
        record = _Record(sequence)
        try:
            data = base64.b64decode(kinesis.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            return self._poison(record, "kinesis.data is not base64", summary)
        fallback = sequence.zfill(SEQUENCE_WIDTH) if sequence.isdigit() else None
        try:
            change = dms.decode(data, fallback_position=fallback)
        except dms.ControlRecord:
            summary.control += 1
            return record
        except dms.FormatError as exc:
            return self._poison(record, exc.reason, summary)
        try:
            mapped = self.mapper.map(change)
        except MappingError as exc:
            return self._poison(record, exc.reason, summary)
        record.writes = mapped.writes
        if mapped.failed:
            return self._poison(record, mapped.failed, summary)
        return record

    @staticmethod
    def _poison(record: _Record, reason: str, summary: BatchSummary) -> _Record:
        logger.warning("record refused sequence=%s reason=%s", record.sequence, reason)
        record.failed = True
        summary.poison += 1
        return record

    # writing ----------------------------------------------------------------------------------
    def _check_app(self) -> None:
        """Read the app once per container: a wrong id or refused keys is a setting to fix."""
        if self._app_checked:
            return
        s = self.settings
        try:
            self.client.get_app(ApplicationId=s.application_id)
        except ClientError as exc:
            status = _status(exc)
            if status in (400, 404):
                raise ConfigError(
                    f"{ENV_APPLICATION_ID}: optsync serve at {s.api_url} has no app with that "
                    "id: set it to an app's Id (the console's Apps page, or boto3 get_apps)"
                ) from None
            if status == 403:
                raise ConfigError(
                    f"optsync serve at {s.api_url} refused the keys in {ENV_ACCESS_KEY_ID} / "
                    f"{ENV_SECRET_ACCESS_KEY} ({_message(exc)}): set a key pair of its [api] "
                    "credentials"
                ) from None
            raise _Unavailable(f"GetApp: {status} {_message(exc)}") from None
        except BotoCoreError as exc:
            raise _Unavailable(f"GetApp at {s.api_url}: {_transport(exc)}") from None
        self._app_checked = True

    def _apply(self, records: Sequence[_Record], summary: BatchSummary) -> None:
        call = _Call()
        down = False
        for index, record in enumerate(records):
            for write in record.writes:
                if down:
                    break
                try:
                    if isinstance(write, EndpointDelete):
                        self._flush(call, records, summary)
                        call = _Call()
                        self._delete(index, write, records, summary)
                        continue
                    key = endpoint_key(write.id)
                    if key in call.keys or len(call.items) >= MAX_BATCH_ITEMS:
                        self._flush(call, records, summary)
                        call = _Call()
                    call.items.append((index, patch_item(write)))
                    call.keys.add(key)
                except _Unavailable as exc:
                    down = self._down(exc, call, index, records, summary)
            if down and record.writes and not record.failed:
                record.failed = True
                summary.unavailable += 1
        if not down:
            try:
                self._flush(call, records, summary)
            except _Unavailable as exc:
                self._down(exc, call, len(records), records, summary)

    def _down(
        self,
        exc: _Unavailable,
        call: _Call,
        index: int,
        records: Sequence[_Record],
        summary: BatchSummary,
    ) -> bool:
        """Report the records of the failed call (and of any delete at ``index``)."""
        logger.error("optsync API unavailable: %s", exc)
        failing = {i for i, _ in call.items}
        if index < len(records):
            failing.add(index)
        for i in sorted(failing):
            if not records[i].failed:
                records[i].failed = True
                summary.unavailable += 1
        return True

    def _flush(self, call: _Call, records: Sequence[_Record], summary: BatchSummary) -> None:
        if not call.items:
            return
        for index, status, reason in self._update(call.items, summary):
            logger.warning(
                "record refused by the API sequence=%s status=%d reason=%s",
                records[index].sequence,
                status,
                reason,
            )
            if not records[index].failed:
                records[index].failed = True
                summary.poison += 1

    def _update(
        self, items: Sequence[tuple[int, EndpointBatchItemTypeDef]], summary: BatchSummary
    ) -> list[tuple[int, int, str]]:
        """Send ``items`` in one call; the items the API refused: (record index, status,
        reason)."""
        summary.calls += 1
        try:
            self.client.update_endpoints_batch(
                ApplicationId=self.settings.application_id,
                EndpointBatchRequest={"Item": [item for _, item in items]},
            )
        except ClientError as exc:
            status = _status(exc)
            if status not in _REFUSED:
                if status == 404:
                    self._app_checked = False  # the app is gone: the next invocation says so
                raise _Unavailable(f"UpdateEndpointsBatch: {status} {_message(exc)}") from None
            if len(items) == 1:
                return [(items[0][0], status, _message(exc))]
            half = len(items) // 2
            return self._update(items[:half], summary) + self._update(items[half:], summary)
        except BotoCoreError as exc:
            raise _Unavailable(
                f"UpdateEndpointsBatch at {self.settings.api_url}: {_transport(exc)}"
            ) from None
        return []

    def _delete(
        self,
        index: int,
        write: EndpointDelete,
        records: Sequence[_Record],
        summary: BatchSummary,
    ) -> None:
        summary.calls += 1
        try:
            self.client.delete_endpoint(
                ApplicationId=self.settings.application_id, EndpointId=write.id
            )
        except ClientError as exc:
            status = _status(exc)
            if status == 404:
                return  # not there: the end state is the same
            if status in _REFUSED:
                logger.warning(
                    "record refused by the API sequence=%s status=%d reason=%s",
                    records[index].sequence,
                    status,
                    _message(exc),
                )
                if not records[index].failed:
                    records[index].failed = True
                    summary.poison += 1
                return
            raise _Unavailable(f"DeleteEndpoint: {status} {_message(exc)}") from None
        except BotoCoreError as exc:
            raise _Unavailable(
                f"DeleteEndpoint at {self.settings.api_url}: {_transport(exc)}"
            ) from None


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _transport(exc: BotoCoreError) -> str:
    """What went wrong on the way, without botocore's message: it holds the request URL, whose
    endpoint id may hold a phone number or an e-mail address in any encoding; the class says
    enough (connection refused, timeout)."""
    return f"{type(exc).__name__}, the request did not get through"


def _message(exc: ClientError) -> str:
    """The API's error message, with any phone number or e-mail address in it masked."""
    error: Any = exc.response.get("Error", {})
    return mask(str(error.get("Message") or error.get("Code") or exc))


_handler: tuple[tuple[str, ...], KinesisHandler] | None = None
"""The handler of this container and the environment it was built from."""


def _current_handler() -> KinesisHandler:
    """The container's handler, built on the first invocation (the environment does not change
    in Lambda; a test that changes it gets a new one)."""
    global _handler  # noqa: PLW0603 - one handler (and boto3 client) per Lambda container
    env_key = tuple(os.environ.get(name, "") for name in ENV_NAMES)
    if _handler is None or _handler[0] != env_key:
        _set_log_level(os.environ.get(ENV_LOG_LEVEL, ""))
        _handler = (env_key, KinesisHandler(LambdaSettings.from_env()))
    return _handler[1]


def _set_log_level(text: str) -> None:
    level = (text.strip() or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{ENV_LOG_LEVEL} = {text!r}: use DEBUG, INFO, WARNING or ERROR")
    # The Lambda runtime's root logger shows WARNING and up; the summary line is INFO.
    logging.getLogger("optsync").setLevel(level)


def lambda_handler(event: Mapping[str, Any], context: object) -> dict[str, list[dict[str, str]]]:
    """The Lambda entry point: apply a Kinesis event of DMS records; see the module docstring.

    Returns ``{"batchItemFailures": [{"itemIdentifier": sequenceNumber}, ...]}`` (enable
    ``ReportBatchItemFailures`` on the event source mapping).
    """
    return _current_handler()(event)
