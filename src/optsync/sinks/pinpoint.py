"""``PinpointApiSink``: keeps an app of another Pinpoint-compatible API holding the engine's
endpoints (another ``optsync serve``, or anything boto3's ``pinpoint`` client talks to).

For each batch of consent changes, every endpoint they name is read from the local engine as it
is now, so several changes of one endpoint send its state once:

- it exists -> an item of ``UpdateEndpointsBatch`` (at most 100 per call) with its Address,
  ChannelType, OptOut, EndpointStatus, EffectiveDate, Attributes, Demographic, Location, Metrics
  and User, ``RequestId`` the newest change's ``change_id``; items go in the order of their
  newest change, as the engine wrote them, so the other side's same-address rule agrees;
- it is gone -> ``DeleteEndpoint`` (a 404 is success: the end state is the same). An endpoint
  deleted and created again in the batch is deleted there first, so no attribute of its former
  life survives the merge of UpdateEndpoint.

A 400 (or 413) for a call is split in halves until the items the other side refuses are found:
those are ``Rejected`` with its message, the rest ``Sent``. Throttling, 5xx, refused credentials,
a missing app and connection errors raise ``SinkUnavailable``; botocore retries a few times
first, the runner's backoff beyond that. Every call is idempotent, so a batch sent twice does
no harm.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from optsync.api.wire import endpoint_to_wire
from optsync.engine.endpoints import MAX_BATCH_ITEMS, endpoint_key
from optsync.engine.models import ConsentChange, Endpoint
from optsync.engine.store import EndpointStore
from optsync.errors import NotFound
from optsync.sinks.base import Outcome, Rejected, Sent, Sink, SinkUnavailable
from optsync.sinks.settings import PinpointApiSinkSettings

if TYPE_CHECKING:
    from mypy_boto3_pinpoint import PinpointClient
    from mypy_boto3_pinpoint.type_defs import (
        EndpointBatchItemTypeDef,
    )

__all__ = ("PinpointApiSink", "endpoint_item")

logger = logging.getLogger(__name__)

_APP_ID = re.compile(r"^[0-9a-f]{32}$")
"""How Pinpoint (and optsync) spell an app id: a configured ``app`` of this shape is never
created as a name."""
_REFUSED = (400, 413)
"""Statuses that say the request's content is refused (split the call to find which item)."""


_BATCH_ITEM_KEYS = (
    "Address",
    "Attributes",
    "ChannelType",
    "Demographic",
    "EffectiveDate",
    "EndpointStatus",
    "Id",
    "Location",
    "Metrics",
    "OptOut",
    "User",
)
"""The fields of an EndpointResponse that an EndpointBatchItem carries (RequestId is ours)."""


def endpoint_item(endpoint: Endpoint, request_id: str) -> EndpointBatchItemTypeDef:
    """An ``EndpointBatchItem`` holding the whole state of ``endpoint``: the API's own
    EndpointResponse, without the fields a request cannot set and the empty maps."""
    wire = endpoint_to_wire(endpoint)
    item = {k: wire[k] for k in _BATCH_ITEM_KEYS if wire.get(k) not in (None, {})}
    item["RequestId"] = request_id
    return cast("EndpointBatchItemTypeDef", item)


@dataclass
class _Target:
    """One endpoint of a batch: its changes (indexes into the batch) and what to do with it."""

    key: str
    endpoint_id: str
    indexes: list[int] = field(default_factory=list)
    newest: ConsentChange | None = None
    deleted_in_batch: bool = False
    item: EndpointBatchItemTypeDef | None = None
    """Its state to send; None: it is gone locally, delete it there."""


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _message(exc: ClientError) -> str:
    error: Any = exc.response.get("Error", {})
    return str(error.get("Message") or error.get("Code") or exc)


def _retry_after(exc: ClientError) -> float | None:
    headers: Any = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    value = headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class PinpointApiSink(Sink):
    """Mirrors endpoints into an app of a Pinpoint-compatible API; see the module docstring."""

    kind = "pinpoint-api"
    batch_size = 500
    """Changes per delivery; sent in calls of at most ``MAX_BATCH_ITEMS`` endpoints."""

    def __init__(self, settings: PinpointApiSinkSettings, store: EndpointStore) -> None:
        self.name = settings.name
        self.channels = settings.channels
        self.settings = settings
        self.store = store
        self.target = settings.url
        self._client: PinpointClient | None = None
        self._app_id: str | None = None

    @property
    def client(self) -> PinpointClient:
        if self._client is None:
            # A session of its own: boto3's default session is not safe across sink threads.
            self._client = boto3.session.Session().client(
                "pinpoint",
                endpoint_url=self.settings.url,
                region_name=self.settings.region,
                aws_access_key_id=self.settings.access_key_id,
                aws_secret_access_key=self.settings.secret_access_key,
                config=Config(
                    retries={"max_attempts": 3, "mode": "standard"},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # the remote app ---------------------------------------------------------------------------
    @property
    def app_id(self) -> str:
        """The other side's app id, resolved once: by id, else by name, else created."""
        if self._app_id is None:
            self._app_id = self._resolve_app()
        return self._app_id

    def _resolve_app(self) -> str:
        wanted = self.settings.app
        try:
            return self.client.get_app(ApplicationId=wanted)["ApplicationResponse"]["Id"]
        except ClientError as exc:
            if _status(exc) not in (400, 404):
                raise self._unavailable("GetApp", exc) from None
        except BotoCoreError as exc:
            raise SinkUnavailable(f"pinpoint-api GetApp at {self.target}: {exc}") from None
        found: list[tuple[str, str]] = []
        token: str | None = None
        try:
            while True:
                page = (
                    self.client.get_apps(PageSize="100", Token=token)
                    if token
                    else self.client.get_apps(PageSize="100")
                )["ApplicationsResponse"]
                found += [
                    (a.get("CreationDate", ""), a["Id"])
                    for a in page.get("Item", [])
                    if a.get("Name") == wanted
                ]
                token = page.get("NextToken")
                if not token:
                    break
            if found:
                return min(found)[1]  # the oldest of that name, as the engine picks its own
            if _APP_ID.match(wanted):
                raise SinkUnavailable(
                    f"pinpoint-api: no app {wanted!r} at {self.target}: create it there or set "
                    "[[sink]] app to an existing app's id or to a name (created if missing)"
                )
            created = self.client.create_app(CreateApplicationRequest={"Name": wanted})
        except ClientError as exc:
            raise self._unavailable("GetApps/CreateApp", exc) from None
        except BotoCoreError as exc:
            raise SinkUnavailable(f"pinpoint-api GetApps at {self.target}: {exc}") from None
        app_id = created["ApplicationResponse"]["Id"]
        logger.info("pinpoint-api app created sink=%s app=%s id=%s", self.name, wanted, app_id)
        return app_id

    # delivery ---------------------------------------------------------------------------------
    def deliver(self, changes: Sequence[ConsentChange]) -> Sequence[Outcome]:
        targets = self._targets(changes)
        app_id = self.app_id
        done: dict[str, Outcome] = {}
        for target in targets:
            if target.item is None or target.deleted_in_batch:
                outcome = self._delete(app_id, target.endpoint_id)
                if target.item is None or isinstance(outcome, Rejected):
                    done[target.key] = outcome
        items = [t for t in targets if t.item is not None and t.key not in done]
        for start in range(0, len(items), MAX_BATCH_ITEMS):
            done |= self._update(app_id, items[start : start + MAX_BATCH_ITEMS])
        outcomes: list[Outcome] = [Sent()] * len(changes)
        for target in targets:
            for i in target.indexes:
                outcomes[i] = done[target.key]
        return outcomes

    def _targets(self, changes: Sequence[ConsentChange]) -> list[_Target]:
        """The endpoints of the batch with their local state, in the order of their newest
        change."""
        by_key: dict[str, _Target] = {}
        for i, change in enumerate(changes):
            key = endpoint_key(change.endpoint_id)
            target = by_key.pop(key, None) or _Target(key, change.endpoint_id)
            target.indexes.append(i)
            target.newest = change
            target.deleted_in_batch |= change.opt_out_after is None
            by_key[key] = target  # re-inserted: dict order is the order of the newest change
        for target in by_key.values():
            assert target.newest is not None
            try:
                endpoint = self.store.get_endpoint(target.newest.app_id, target.endpoint_id)
            except NotFound:
                continue
            target.item = endpoint_item(endpoint, target.newest.change_id)
        return list(by_key.values())

    def _delete(self, app_id: str, endpoint_id: str) -> Outcome:
        try:
            self.client.delete_endpoint(ApplicationId=app_id, EndpointId=endpoint_id)
        except ClientError as exc:
            status = _status(exc)
            if status == 404:
                return Sent()  # not there: the end state is the same
            if status in _REFUSED:
                return Rejected(_message(exc))
            raise self._unavailable("DeleteEndpoint", exc) from None
        except BotoCoreError as exc:
            raise SinkUnavailable(f"pinpoint-api DeleteEndpoint at {self.target}: {exc}") from None
        return Sent()

    def _update(self, app_id: str, targets: Sequence[_Target]) -> dict[str, Outcome]:
        """Send ``targets`` in one call; on a refusal, each half on its own to find the items
        refused (the other side applies a batch whole or not at all)."""
        items = [t.item for t in targets if t.item is not None]
        try:
            self.client.update_endpoints_batch(
                ApplicationId=app_id, EndpointBatchRequest={"Item": items}
            )
        except ClientError as exc:
            if _status(exc) not in _REFUSED:
                raise self._unavailable("UpdateEndpointsBatch", exc) from None
            if len(targets) == 1:
                return {targets[0].key: Rejected(_message(exc))}
            half = len(targets) // 2
            return self._update(app_id, targets[:half]) | self._update(app_id, targets[half:])
        except BotoCoreError as exc:
            raise SinkUnavailable(
                f"pinpoint-api UpdateEndpointsBatch at {self.target}: {exc}"
            ) from None
        return {t.key: Sent() for t in targets}

    def _unavailable(self, operation: str, exc: ClientError) -> SinkUnavailable:
        status = _status(exc)
        if status == 404:
            self._app_id = None  # the app is gone there: look it up again on the next try
        error: Any = exc.response.get("Error", {})
        return SinkUnavailable(
            f"pinpoint-api {operation} at {self.target}: {status} {error.get('Code', '')}: "
            f"{_message(exc)}",
            retry_after=_retry_after(exc),
        )
