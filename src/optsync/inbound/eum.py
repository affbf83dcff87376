"""``EumInbound``: reads the people who texted STOP from an AWS End User Messaging opt-out list.

``DescribeOptedOutNumbers`` with the ``end-user-opted-out`` filter, every page, each poll; the
runner records the ones it has not recorded before (known by number and opt-out time, so a
person who opts out again later is recorded again). The list gives no keyword, so none is
kept. A poll reads the whole filtered list: about one call per 100 such numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from optsync.errors import Retryable
from optsync.inbound.base import InboundSource, StopReport
from optsync.sinks.eum import eum_client, iso_ms
from optsync.sinks.settings import EumInboundSettings

if TYPE_CHECKING:
    from mypy_boto3_pinpoint_sms_voice_v2 import PinpointSMSVoiceV2Client

__all__ = ("EumInbound",)


class EumInbound(InboundSource):
    """End users' opt-outs of one EUM opt-out list; see the module docstring."""

    def __init__(self, settings: EumInboundSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self.interval = settings.interval
        self.via = f"eum-sms:{settings.opt_out_list}"
        self._client: PinpointSMSVoiceV2Client | None = None

    @property
    def client(self) -> PinpointSMSVoiceV2Client:
        if self._client is None:
            self._client = eum_client(self.settings.region, self.settings.endpoint_url)
        return self._client

    def reports(self) -> Iterator[StopReport]:
        pages = self.client.get_paginator("describe_opted_out_numbers").paginate(
            OptOutListName=self.settings.opt_out_list,
            Filters=[{"Name": "end-user-opted-out", "Values": ["true"]}],
        )
        try:
            for page in pages:
                for number in page.get("OptedOutNumbers", []):
                    if not number.get("EndUserOptedOut", True):
                        continue
                    yield StopReport(
                        address=number["OptedOutNumber"], at=iso_ms(number["OptedOutTimestamp"])
                    )
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise Retryable(
                f"EUM DescribeOptedOutNumbers on list {self.settings.opt_out_list!r}: "
                f"{error.get('Code')}: {error.get('Message')}"
            ) from None
        except BotoCoreError as exc:
            raise Retryable(f"EUM DescribeOptedOutNumbers: {exc}") from None
