"""What the engine should hold for a source row, and how an endpoint differs from it. Pure.

The expected endpoint is what the mapping rules make of the row as a ``load`` event: its id,
Address, OptOut and UserId. A UserId is compared only when the row gives one: a NULL user id
column leaves the endpoint's UserId as it was in the apply path too, so it cannot be drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from optsync.engine.models import ChannelType, Endpoint, EndpointPatch, EndpointStatus, OptOut
from optsync.events import Row
from optsync.reconcile.base import TableRef

__all__ = (
    "Drift",
    "DriftKind",
    "Expected",
    "Held",
    "differences",
    "may_be_inactive",
    "mysql_lineage",
)

_MYSQL_POSITION: Final = re.compile(r"^([0-9]{10}):[0-9]{10}:[0-9]{10}")


class DriftKind(StrEnum):
    MISSING = "missing"
    """A source row maps to an endpoint the engine does not have."""
    EXTRA = "extra"
    """A source-driven endpoint (it holds a source position) that no source row maps to."""
    ADDRESS = "address"
    OPT_OUT = "opt_out"
    USER_ID = "user_id"
    INACTIVE = "inactive"
    """Opted in at the source, INACTIVE in the engine, and no other ACTIVE endpoint holds its
    address: nothing makes it eligible again (it lost its address to an endpoint that has
    moved away or was deleted)."""


@dataclass(frozen=True)
class Held:
    """The fields of an engine endpoint that reconcile compares (kept small: one per endpoint
    of the app is held in memory)."""

    id: str
    address: str | None
    opt_out: OptOut
    user_id: str | None
    active: bool
    channel: ChannelType
    position: str | None

    @classmethod
    def of(cls, e: Endpoint) -> Held:
        return cls(
            e.id,
            e.address,
            e.opt_out,
            e.user_id,
            e.endpoint_status is EndpointStatus.ACTIVE,
            e.channel_type,
            e.source_position,
        )


@dataclass(frozen=True)
class Expected:
    """The endpoint a source row maps to, and the row (to read it again)."""

    patch: EndpointPatch
    table: TableRef
    key: Row


@dataclass(frozen=True)
class Drift:
    """One endpoint that differs from the source, as confirmed by the re-check."""

    endpoint_id: str
    kinds: tuple[DriftKind, ...]
    expected: Expected | None
    """None: no source row maps to the endpoint (EXTRA)."""
    held: Held | None
    """None: the engine has no such endpoint (MISSING)."""


def differences(patch: EndpointPatch | None, held: Held | None) -> list[DriftKind]:
    """How ``held`` differs from what ``patch`` (the mapped source row) says; INACTIVE is
    decided by the caller, who can look at the address's other endpoints."""
    if patch is None:
        return [DriftKind.EXTRA] if held is not None and held.position is not None else []
    if held is None:
        return [DriftKind.MISSING]
    kinds = []
    if patch.address is not None and patch.address != held.address:
        kinds.append(DriftKind.ADDRESS)
    if patch.opt_out is not None and patch.opt_out is not held.opt_out:
        kinds.append(DriftKind.OPT_OUT)
    if patch.user_id is not None and patch.user_id != held.user_id:
        kinds.append(DriftKind.USER_ID)
    return kinds


def may_be_inactive(patch: EndpointPatch, held: Held) -> bool:
    """The endpoint is INACTIVE at the row's address though the row is opted in: a candidate
    for ``DriftKind.INACTIVE`` if no other endpoint holds the address ACTIVE."""
    return (
        not held.active
        and patch.opt_out is OptOut.NONE
        and held.address is not None
        and held.address == patch.address
    )


def mysql_lineage(position: str | None) -> int | None:
    """The lineage of a MySQL/MariaDB position (``optsync.capture.mysql.position``), else None."""
    if position is None:
        return None
    match = _MYSQL_POSITION.match(position)
    return int(match.group(1)) if match else None
