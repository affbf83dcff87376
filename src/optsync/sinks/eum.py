"""``EumSmsSink``: keeps an AWS End User Messaging SMS opt-out list in step with the engine.

Since Pinpoint's endpoints ended, an EUM opt-out list is the one place AWS itself refuses to
send an SMS to a number. With boto3's ``pinpoint-sms-voice-v2`` client (the usual credential
chain; ``endpoint_url`` for VPC endpoints and tests):

- OptOut ALL (an opt-out, or an opted-out endpoint's new address) -> ``PutOptedOutNumber``;
  idempotent, so a change delivered twice does no harm.
- A deleted endpoint, or an opted-out endpoint that moved to another address: the number stays
  listed (skipped): nobody said that number may receive messages again.
- OptOut NONE, only with ``mirror_opt_in``: ``DeleteOptedOutNumber``, unless the person opted
  out by themselves (``EndUserOptedOut``, a STOP reply) and this opt-in is not an explicit new
  one made after that STOP. AWS lets a number leave a list at most once every 30 days; a removal
  refused for that reason waits (``Deferred``) and is tried again, and a newer change of the
  same number supersedes it.

Throttling, server errors, refused credentials and a missing list make the batch wait and be
retried (``SinkUnavailable``: nothing is dead-lettered for a fault of ours or AWS's); an input
AWS calls invalid is a dead letter with AWS's reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from optsync.engine.models import CauseKind, ConsentChange, OptOut
from optsync.sinks.base import Deferred, Outcome, Rejected, Sent, Sink, SinkUnavailable, Skipped
from optsync.sinks.settings import EumSinkSettings

if TYPE_CHECKING:
    from mypy_boto3_pinpoint_sms_voice_v2 import PinpointSMSVoiceV2Client

__all__ = ("EumSmsSink", "eum_client", "iso_ms")

logger = logging.getLogger(__name__)

DEFERRED_RETRY = 6 * 3600.0
"""Seconds before a removal AWS refused under its 30-day rule is tried again."""


def eum_client(region: str | None, endpoint_url: str | None) -> PinpointSMSVoiceV2Client:
    """A ``pinpoint-sms-voice-v2`` client: the usual credential chain, a few quick retries (the
    runner's backoff takes over beyond them)."""
    return boto3.client(
        "pinpoint-sms-voice-v2",
        region_name=region,
        endpoint_url=endpoint_url,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=15
        ),
    )


def iso_ms(moment: datetime) -> str:
    """A datetime as the engine writes times: ISO-8601 UTC with milliseconds and ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(exc: ClientError) -> tuple[str, str, str]:
    error: Any = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    reason = str(exc.response.get("Reason", "") or error.get("Reason", ""))
    return code, reason, str(error.get("Message", ""))


def _explicit_opt_in(change: ConsentChange) -> bool:
    """An opt-in that counts as the person's new consent: a new row, the source's opt-in column
    turned on, or an API/console write that gave its reason (the engine says so in detail)."""
    if change.opt_out_before is None:
        return True
    if change.opt_out_before is not OptOut.ALL:
        return False
    if change.cause.kind is CauseKind.SOURCE:
        return True
    return "explicit opt-in" in change.cause.detail or "opt-in reason" in change.cause.detail


class EumSmsSink(Sink):
    """Delivers opt-outs to an EUM SMS opt-out list; see the module docstring."""

    kind = "eum-sms"
    batch_size = 50

    def __init__(self, settings: EumSinkSettings, *, deferred_retry: float = DEFERRED_RETRY):
        self.name = settings.name
        self.channels = settings.channels
        self.settings = settings
        self.deferred_retry = deferred_retry
        self.target = f"opt-out list {settings.opt_out_list}" + (
            f" at {settings.endpoint_url}" if settings.endpoint_url else ""
        )
        self._client: PinpointSMSVoiceV2Client | None = None

    @property
    def client(self) -> PinpointSMSVoiceV2Client:
        if self._client is None:
            self._client = eum_client(self.settings.region, self.settings.endpoint_url)
        return self._client

    def takes(self, change: ConsentChange) -> bool:
        return super().takes(change) and bool(change.address)

    def wait_key(self, change: ConsentChange) -> str:
        """The number: the list holds numbers, so one number's changes stay in order."""
        return change.address or change.endpoint_id

    def deliver(self, changes: Sequence[ConsentChange]) -> Sequence[Outcome]:
        return [self._one(change) for change in changes]

    def _one(self, change: ConsentChange) -> Outcome:
        number = change.address
        if not number or not number.startswith("+"):
            return Skipped("not an E.164 number")
        after = change.opt_out_after
        if after is OptOut.ALL:
            return self._put(number)
        if after is None:
            return Skipped("endpoint deleted: the number stays listed")
        if change.opt_out_before is OptOut.NONE:
            return Skipped("an opted-in endpoint changed address: nothing to list")
        if not self.settings.mirror_opt_in:
            return Skipped("opt-in not mirrored (mirror_opt_in = false)")
        return self._remove(change, number)

    def _remove(self, change: ConsentChange, number: str) -> Outcome:
        try:
            found = self.client.describe_opted_out_numbers(
                OptOutListName=self.settings.opt_out_list, OptedOutNumbers=[number]
            )["OptedOutNumbers"]
        except ClientError as exc:
            code, _, _ = _error(exc)
            if code == "ResourceNotFoundException" and "number" in str(exc).lower():
                return Sent()  # not listed: nothing to remove
            return self._failed(exc, "DescribeOptedOutNumbers")
        except BotoCoreError as exc:
            raise SinkUnavailable(f"EUM DescribeOptedOutNumbers: {exc}") from None
        if not found:
            return Sent()
        listed = found[0]
        if listed.get("EndUserOptedOut"):
            when = change.source_time or change.at
            stopped = iso_ms(listed["OptedOutTimestamp"])
            if not _explicit_opt_in(change) or when <= stopped:
                return Skipped(
                    f"the person opted out by themselves at {stopped}: only an explicit new "
                    "opt-in made after that removes the number"
                )
        try:
            self.client.delete_opted_out_number(
                OptOutListName=self.settings.opt_out_list, OptedOutNumber=number
            )
        except ClientError as exc:
            code, reason, message = _error(exc)
            if code == "ConflictException" and reason == "RESOURCE_DELETION_NOT_ALLOWED":
                until = time.time() + self.deferred_retry
                return Deferred(
                    until,
                    "AWS removes a number from an opt-out list at most once every 30 days "
                    f"({message or reason}); tried again later",
                )
            if code == "ResourceNotFoundException" and "number" in message.lower():
                return Sent()
            return self._failed(exc, "DeleteOptedOutNumber")
        except BotoCoreError as exc:
            raise SinkUnavailable(f"EUM DeleteOptedOutNumber: {exc}") from None
        return Sent()

    def _put(self, number: str) -> Outcome:
        try:
            self.client.put_opted_out_number(
                OptOutListName=self.settings.opt_out_list, OptedOutNumber=number
            )
        except ClientError as exc:
            return self._failed(exc, "PutOptedOutNumber")
        except BotoCoreError as exc:
            raise SinkUnavailable(f"EUM PutOptedOutNumber: {exc}") from None
        return Sent()

    def _failed(self, exc: ClientError, operation: str) -> Rejected:
        """A Rejected for an error AWS gives for this input; raises for any other."""
        code, reason, message = _error(exc)
        text = f"EUM {operation}: {code}" + (f" ({reason})" if reason else "") + f": {message}"
        if code == "ValidationException":
            if operation == "PutOptedOutNumber":
                # An opt-out is never dropped quietly: it stays a dead letter, loud.
                logger.warning("EUM refused an opt-out sink=%s reason=%s", self.name, text)
            return Rejected(text)
        # Throttling, faults, credentials, a missing list, anything unknown: wait and retry.
        raise SinkUnavailable(text)
