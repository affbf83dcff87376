"""Plain source writes: the usual captured change, worked out as rows, without ``Endpoint`` values.

Most changes a source sends touch one endpoint and nothing else: an opt-in flips, a user is
added with a number nobody else holds, a row is deleted. For those, Pinpoint's rules (the
position guard, same-address deactivation, the per-user cap, UserAttributes kept equal across a
user, end-user holds) have nothing to do beyond the endpoint itself, so the store can write
them with a few bulk statements from the narrow rows it read, instead of decoding each stored
endpoint, merging a full ``Endpoint`` and encoding it again (``WriteBatch``).

A write is **plain** when:

- every write of the batch to its endpoint is positioned (a captured change) and is a delete
  or a patch that gives at most the channel, address, OptOut, UserId, EffectiveDate and
  RequestId (no attributes, metrics, demographic, location or status);
- no end-user opt-out holds the endpoint, and the stored endpoint has no attribute or metric
  rows (their copies of the rollup columns would have to follow);
- no write of the batch to another endpoint touches its addresses or UserIds (stored or
  given), no other stored endpoint is ACTIVE at an address its writes give (unless it
  holds that address ACTIVE itself: at most one endpoint per address and channel is) or is
  at all at an address it may leave (deleted, moved, another channel: a source-driven
  endpoint there would take the address back), or belongs to a UserId it joins (the store
  checks the addresses in one statement and the UserIds in another).

An endpoint written several times in a batch is worked out write after write, so the guard,
the consent history and the rollup see each step, as they would one write at a time. Every
other write goes through ``WriteBatch``. The two sets share no endpoint, address or user, so
the outcome is the same whichever order they run in; the history rows are still appended in
the order of the writes (both append to one list). The randomized contract test (batched ==
one at a time) checks the two paths against each other.

No I/O here.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from optsync.engine.countries import to_alpha2
from optsync.engine.endpoints import (
    FORBIDDEN_ID_CHARS,
    MAX_ENDPOINT_BYTES,
    CountryDerivation,
)
from optsync.engine.models import (
    CauseKind,
    ChannelType,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    OptOut,
)
from optsync.engine.phone import country_for_address
from optsync.engine.writes import Bucket, HistoryRow

__all__ = (
    "INSERTED",
    "STORED_COLUMNS",
    "UPDATABLE",
    "NewRow",
    "PlainPlan",
    "Sharing",
    "Stored",
    "share",
)

STORED_COLUMNS = (
    "pk, id_key, id, channel_type, address, opt_out, status, user_id, country, country_code, "
    "source_position, (attributes <> '{}' OR user_attributes <> '{}' OR metrics <> '{}')"
)
"""The narrow read of an endpoint a plain write needs (``Stored``)."""

INSERTED = (
    "pk", "app_id", "id", "id_key", "channel_type", "address", "opt_out", "status",
    "creation_date", "effective_date", "cohort_id", "request_id", "user_id", "country",
    "country_code", "attributes", "user_attributes", "metrics", "source_position",
)  # fmt: skip
"""The ``endpoints`` columns a plain write fills when it creates an endpoint (``NewRow``);
the others stay NULL. Binding only these makes the INSERT about a third cheaper than binding
NULL into the 13 location and demographic columns (measured on the 2-core test machine)."""

UPDATABLE = (
    "channel_type", "address", "opt_out", "status", "effective_date", "request_id", "user_id",
    "country", "country_code", "source_position",
)  # fmt: skip
"""The ``endpoints`` columns a plain write can change, in ``PlainPlan.updates`` order."""

_DERIVED = frozenset({ChannelType.SMS, ChannelType.VOICE})
_LONGEST_ADDRESS = (MAX_ENDPOINT_BYTES // 2 - 1024) // 4
"""Beyond this, ``merge`` measures the endpoint's size exactly: leave such writes to it."""
_SIDE_FREE = ("{}", "{}", "{}")


class Stored(NamedTuple):
    """What a plain write reads of a stored endpoint (``STORED_COLUMNS``, in order)."""

    pk: int
    key: str
    id: str
    channel: str
    address: str | None
    opt_out: str
    status: str
    user_id: str | None
    country: str | None
    country_code: str | None
    position: str | None
    side: int
    """Non-zero when it has attribute or metric rows."""


@dataclass
class NewRow:
    """An endpoint the plan creates; ``pk`` may be renumbered before it is written."""

    pk: int
    values: tuple[Any, ...]
    """The ``endpoints`` row without its pk (``INSERTED`` order)."""
    stored: None = None


@dataclass(slots=True)
class _Current:
    """An endpoint as the plan has left it so far."""

    pk: int
    id: str
    channel: str
    address: str | None
    opt_out: str
    status: str
    user_id: str | None
    country: str | None
    country_code: str | None
    position: str | None
    effective_date: str | None
    request_id: str | None
    origin: Stored | None
    """The stored row it started from; None: created by the plan."""
    cohort_id: str = ""

    def updatable(self) -> tuple[Any, ...]:
        """Its values of ``UPDATABLE``."""
        return (
            self.channel, self.address, self.opt_out, self.status, self.effective_date,
            self.request_id, self.user_id, self.country, self.country_code, self.position,
        )  # fmt: skip


def _current(s: Stored) -> _Current:
    return _Current(
        s.pk, s.id, s.channel, s.address, s.opt_out, s.status, s.user_id, s.country,
        s.country_code, s.position, None, None, s,
    )  # fmt: skip


@dataclass
class Sharing:
    """Which writes of a batch may be plain, and what the store must check for them."""

    plain: list[bool]
    """Per write: a plain candidate."""
    addresses: dict[str, set[str]] = field(default_factory=dict)
    """Address -> the candidate endpoints (keys) whose writes give it: no other stored
    endpoint may hold it ACTIVE."""
    left: dict[str, set[str]] = field(default_factory=dict)
    """Address -> the candidate endpoints (keys) that may leave it: no other stored endpoint
    may be there (a source-driven one would take the address back)."""
    users: dict[str, set[str]] = field(default_factory=dict)
    """UserId -> the candidate endpoints (keys) that join it: no other stored endpoint may
    belong to it."""
    writes_of: dict[str, list[int]] = field(default_factory=dict)
    """Endpoint key -> the indexes of its writes."""

    def settle(
        self,
        active: Mapping[str, set[str]],
        present: Mapping[str, set[str]],
        members: Mapping[str, set[str]],
    ) -> None:
        """Drop the candidates that another stored endpoint would meet: one ACTIVE at an
        address they give (``active``: address -> keys), any at an address they may leave
        (``present``), or one of a UserId they join (``members``: user -> keys)."""
        dropped: set[str] = set()
        wants = ((active, self.addresses), (present, self.left), (members, self.users))
        for found, wanted in wants:
            for value, keys in found.items():
                for key in wanted.get(value, ()):
                    if keys - {key}:
                        dropped.add(key)
        for key in dropped:
            for i in self.writes_of[key]:
                self.plain[i] = False


def _is_plain_patch(w: EndpointPatch) -> bool:
    return (
        w.attributes is None
        and w.user_attributes is None
        and w.metrics is None
        and w.demographic is None
        and w.location is None
        and w.endpoint_status is None
        and w.opt_in_reason is None
        and (w.address is None or len(w.address) <= _LONGEST_ADDRESS)
    )


def _plain_sequence(writes: Sequence[EndpointPatch | EndpointDelete], exists: bool) -> bool:
    """Whether one endpoint's writes can all be plain: positioned, with an id Pinpoint takes,
    plain patches, and none that would create it without a channel (``validate_patch`` and
    ``merge`` word those errors)."""
    for w in writes:
        if w.position is None or not w.id.strip() or not FORBIDDEN_ID_CHARS.isdisjoint(w.id):
            return False
        if isinstance(w, EndpointDelete):
            exists = False
            continue
        if not _is_plain_patch(w) or (not exists and w.channel_type is None):
            return False
        exists = True
    return True


def share(
    writes: Sequence[EndpointPatch | EndpointDelete],
    keys: Sequence[str],
    stored: Mapping[str, Stored],
    held: set[str],
) -> Sharing:
    """Mark the plain candidates of ``writes`` (``keys``: their endpoint keys; see the module
    docstring)."""
    sharing = Sharing(plain=[False] * len(writes))
    writes_of = sharing.writes_of
    for i, key in enumerate(keys):
        found = writes_of.get(key)
        if found is None:
            writes_of[key] = [i]
        else:
            found.append(i)
    # Which endpoint each address and UserId belongs to in this batch; a second one shares it.
    address_owner: dict[str, str] = {}
    user_owner: dict[str, str] = {}
    sharing_keys: set[str] = set()

    def claim(owners: dict[str, str], value: str, key: str) -> None:
        owner = owners.setdefault(value, key)
        if owner != key:
            sharing_keys.add(key)
            sharing_keys.add(owner)

    for key, indexes in writes_of.items():
        s = stored.get(key)
        if s is not None:
            if s.address is not None:
                claim(address_owner, s.address, key)
            if s.user_id is not None:
                claim(user_owner, s.user_id, key)
        for i in indexes:
            w = writes[i]
            if type(w) is EndpointPatch:
                if w.address is not None:
                    claim(address_owner, w.address, key)
                if w.user_id is not None:
                    claim(user_owner, w.user_id, key)
    for key, indexes in writes_of.items():
        s = stored.get(key)
        if key in sharing_keys or key in held or (s is not None and s.side):
            continue
        if len(indexes) == 1:
            if _share_one(sharing, key, writes[indexes[0]], s):
                sharing.plain[indexes[0]] = True
            continue
        mine = [writes[i] for i in indexes]
        if not _plain_sequence(mine, s is not None):
            continue
        patches = [w for w in mine if isinstance(w, EndpointPatch)]
        # Every address it is given, but the one it holds ACTIVE already (nobody else can).
        holds = (
            s is not None
            and s.status == EndpointStatus.ACTIVE
            and all(w.channel_type in (None, s.channel) for w in patches)
        )
        held_address = s.address if holds and s is not None else None
        stays = s.user_id if s is not None else None
        # Deleted and created again, it joins its UserId anew.
        leaves = len(patches) < len(mine) or any(w.user_id not in (None, stays) for w in patches)
        # The addresses it may leave (deleted, moved, another channel): while it holds one
        # ACTIVE, a source-driven endpoint there would take it back (``WriteBatch._fall_back``).
        places = {w.address for w in patches if w.address is not None}
        channels: set[str] = {w.channel_type for w in patches if w.channel_type is not None}
        if s is not None:
            places.update((s.address,) if s.address is not None else ())
            channels.add(s.channel)
        if len(patches) < len(mine) or len(places) > 1 or len(channels) > 1:
            for address in places:
                sharing.left.setdefault(address, set()).add(key)
        for w in patches:
            if w.address is not None and w.address != held_address:
                sharing.addresses.setdefault(w.address, set()).add(key)
            # A UserId it joins; its own too, once it leaves it (it may come back to it).
            if w.user_id is not None and (w.user_id != stays or leaves):
                sharing.users.setdefault(w.user_id, set()).add(key)
        for i in indexes:
            sharing.plain[i] = True
    return sharing


def _share_one(
    sharing: Sharing, key: str, w: EndpointPatch | EndpointDelete, s: Stored | None
) -> bool:
    """``share`` for an endpoint written once in the batch (the usual case): the same rules
    as for several writes, without building their lists; True if the write is a candidate."""
    if w.position is None or not w.id.strip() or not FORBIDDEN_ID_CHARS.isdisjoint(w.id):
        return False
    if type(w) is not EndpointPatch:  # a delete: it leaves the address it holds
        if s is not None and s.address is not None:
            sharing.left.setdefault(s.address, set()).add(key)
        return True
    if not _is_plain_patch(w) or (s is None and w.channel_type is None):
        return False
    address, user = w.address, w.user_id
    if s is None:
        if address is not None:
            sharing.addresses.setdefault(address, set()).add(key)
        if user is not None:
            sharing.users.setdefault(user, set()).add(key)
        return True
    channel = w.channel_type
    same_channel = channel is None or channel == s.channel
    moves = address is not None and s.address is not None and address != s.address
    if moves or not same_channel:
        for place in (s.address, address):
            if place is not None:
                sharing.left.setdefault(place, set()).add(key)
    if address is not None and not (
        same_channel and s.status == EndpointStatus.ACTIVE and address == s.address
    ):
        sharing.addresses.setdefault(address, set()).add(key)
    if user is not None and user != s.user_id:
        sharing.users.setdefault(user, set()).add(key)
    return True


@dataclass
class PlainPlan:
    """The rows plain writes leave, worked out one write after the other.

    ``next_pk`` is shared with the ``WriteBatch`` of the same transaction (the caller passes
    it back and forth) so new endpoints are numbered in the order they were created.
    """

    app_id: str
    now: str
    country: CountryDerivation
    stored: Mapping[str, Stored]
    tombs: dict[str, str]
    next_pk: int
    history: list[HistoryRow]
    """The transaction's history rows, shared with its ``WriteBatch``."""
    rows: dict[str, _Current | None] = field(default_factory=dict)
    """Endpoint key -> the endpoint as the plan left it (None: deleted)."""
    deleted_pks: list[int] = field(default_factory=list)
    tombs_written: dict[str, str] = field(default_factory=dict)
    tombs_removed: set[str] = field(default_factory=set)
    counts: Counter[Bucket] = field(default_factory=Counter)
    _ids: list[str] = field(default_factory=list)

    def _now_at(self, key: str) -> _Current | None:
        if key in self.rows:
            return self.rows[key]
        s = self.stored.get(key)
        current = self.rows[key] = _current(s) if s is not None else None
        return current

    def _stale(self, key: str, position: str, c: _Current | None) -> bool:
        tomb = self.tombs.get(key)
        return (c is not None and c.position is not None and c.position >= position) or (
            tomb is not None and tomb >= position
        )

    def _country(self, address: str | None, channel: str) -> str | None:
        if not (self.country.enabled and address and channel in _DERIVED):
            return None
        return country_for_address(address, self.country.policy)

    def _request_id(self) -> str:
        """A random request id (what ``merge`` gives a source write), 64 per system call."""
        if not self._ids:
            pool = os.urandom(16 * 64).hex()
            self._ids = [pool[i : i + 32] for i in range(0, len(pool), 32)]
        return self._ids.pop()

    def upsert(self, w: EndpointPatch, key: str) -> bool:
        """Apply one plain patch (``key``: its endpoint key); False if it is stale. ``share``
        checked what ``validate_patch`` would (a plain patch has no attributes)."""
        assert w.position is not None
        c = self._now_at(key)
        if self._stale(key, w.position, c):
            return False
        request_id = w.request_id or self._request_id()
        effective = w.effective_date or self.now
        if c is None:
            assert w.channel_type is not None  # ``share`` leaves that error to ``merge``
            opt_out: str = w.opt_out or OptOut.NONE
            country = self._country(w.address, w.channel_type)
            c = self.rows[key] = _Current(
                self.next_pk, w.id, w.channel_type, w.address, opt_out, EndpointStatus.ACTIVE,
                w.user_id, country, to_alpha2(country) if country else None, w.position,
                effective, request_id, None, str(random.randrange(100)),  # noqa: S311 (a cohort)
            )  # fmt: skip
            self.next_pk += 1
            self.counts[(c.country_code or "", c.channel, c.status, c.opt_out)] += 1
            self._history(key, c, w, None, None)
        else:
            before, address_before = c.opt_out, c.address
            self.counts[(c.country_code or "", c.channel, c.status, c.opt_out)] -= 1
            c.channel = w.channel_type or c.channel
            if w.address is not None:
                c.address = w.address
            c.opt_out = w.opt_out or c.opt_out
            c.status = EndpointStatus.ACTIVE
            if w.user_id is not None:
                c.user_id = w.user_id
            if c.country is None:
                c.country = self._country(c.address, c.channel)
                c.country_code = to_alpha2(c.country) if c.country else None
            c.position, c.effective_date, c.request_id = w.position, effective, request_id
            self.counts[(c.country_code or "", c.channel, c.status, c.opt_out)] += 1
            moved = address_before != c.address
            if before != c.opt_out or moved:
                self._history(key, c, w, before, address_before if moved else None)
        if self.tombs.pop(key, None) is not None:
            self.tombs_written.pop(key, None)
            self.tombs_removed.add(key)
        return True

    def delete(self, w: EndpointDelete, key: str) -> bool | None:
        """Apply one plain delete: True if it removed an endpoint, None if there was none,
        False if it is stale."""
        assert w.position is not None
        c = self._now_at(key)
        if self._stale(key, w.position, c):
            return False
        self.tombs[key] = self.tombs_written[key] = w.position
        self.tombs_removed.discard(key)
        if c is None:
            return None
        self.rows[key] = None
        if c.origin is not None:
            self.deleted_pks.append(c.pk)
        self.counts[(c.country_code or "", c.channel, c.status, c.opt_out)] -= 1
        self.history.append(
            (
                self.app_id,
                key,
                c.id,
                self.now,
                c.opt_out,
                None,
                c.address,
                CauseKind.SOURCE,
                w.position,
                c.channel,
                c.user_id,
                w.source_time,
                "",
                None,
            )
        )
        return True

    def _history(
        self,
        key: str,
        c: _Current,
        w: EndpointPatch,
        before: str | None,
        address_before: str | None,
    ) -> None:
        assert w.position is not None
        self.history.append(
            (
                self.app_id,
                key,
                c.id,
                self.now,
                before,
                c.opt_out,
                c.address,
                CauseKind.SOURCE,
                w.position,
                c.channel,
                c.user_id,
                w.source_time,
                "",
                address_before,
            )
        )

    def outcome(self) -> tuple[list[NewRow], dict[tuple[int, ...], list[tuple[Any, ...]]]]:
        """The endpoints to insert, and the updates: column indexes into ``UPDATABLE`` ->
        (values..., pk) rows. Deletes are in ``deleted_pks``."""
        inserts: list[NewRow] = []
        updates: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for key, c in self.rows.items():
            if c is None:
                continue
            s = c.origin
            if s is None:
                inserts.append(
                    NewRow(
                        c.pk,
                        (
                            self.app_id,
                            c.id,
                            key,
                            c.channel,
                            c.address,
                            c.opt_out,
                            c.status,
                            self.now,
                            c.effective_date,
                            c.cohort_id,
                            c.request_id,
                            c.user_id,
                            c.country,
                            c.country_code,
                            *_SIDE_FREE,
                            c.position,
                        ),
                    )
                )
                continue
            if c.request_id is None:
                continue  # every write to it was stale
            new = c.updatable()
            # As stored, in ``UPDATABLE`` order; EffectiveDate and RequestId always change.
            old = (
                s.channel, s.address, s.opt_out, s.status, None, None, s.user_id, s.country,
                s.country_code, s.position,
            )  # fmt: skip
            which = tuple([i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b])
            updates.setdefault(which, []).append((*(new[i] for i in which), c.pk))
        inserts.sort(key=lambda r: r.pk)
        return inserts, updates
