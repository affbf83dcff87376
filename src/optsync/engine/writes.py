"""One write transaction of endpoints, worked out in memory before anything is written.

A ``WriteBatch`` starts from the rows the store read up front: the endpoints the writes name,
every ACTIVE endpoint at an address they touch, every endpoint at an address an ACTIVE endpoint
may leave, and every endpoint of a UserId they touch. That set is closed under the rules below
(same-address deactivation and fallback, the 15-per-user cap, UserAttributes kept equal across a
user), so the batch applies Pinpoint's rules one write after the other on
these rows alone, exactly as statement-by-statement execution would, and the store then writes
the outcome with a few bulk statements (``rows_to_write``, ``deleted_pks``, ``history`` ...).

No I/O here.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from optsync.engine.countries import to_alpha2
from optsync.engine.endpoints import (
    MAX_ATTRIBUTE_NAMES_PER_APP,
    MAX_ENDPOINTS_PER_USER,
    CountryDerivation,
    endpoint_key,
    merge,
    validate_patch,
)
from optsync.engine.models import (
    PUSH_TOKEN_CHANNELS,
    Cause,
    CauseKind,
    ChannelType,
    Endpoint,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    OptOut,
)
from optsync.errors import LimitExceeded

__all__ = ("Bucket", "HistoryRow", "Hold", "Peers", "Row", "WriteBatch", "bucket", "peers_to_read")

Bucket = tuple[str, str, str, str]
"""The rollup row an endpoint counts in: (country alpha-2 or '', channel, status, opt-out)."""

HistoryRow = tuple[
    str,  # app_id
    str,  # endpoint_key
    str,  # endpoint_id
    str,  # at
    str | None,  # opt_out_before (an OptOut)
    str | None,  # opt_out_after (an OptOut)
    str | None,  # address
    CauseKind,  # cause_kind
    str,  # cause_ref
    str,  # channel_type
    str | None,  # user_id
    str | None,  # source_time
    str,  # cause_detail
    str | None,  # address_before
]
"""A consent_history row; the enum members bind as their text."""


@dataclass
class Hold:
    """An end user's own opt-out (a STOP reply) holding one endpoint at OptOut ALL.

    Only an explicit new opt-in lifts it: a source change whose opt-in column itself turns
    from opted-out to opted-in after ``at`` (``source_opt_out`` follows what the source's column
    says since the hold began), or an API or console write that gives its reason. A source
    change that leaves a stale "opted in" column as it was keeps the endpoint opted out. The
    hold ends with the endpoint, or when its address changes (the person who said STOP was at
    the old address).
    """

    address: str
    at: str
    """When the person opted out (ISO-8601 UTC)."""
    source_opt_out: OptOut
    """What the source's opt-in column says now, as an OptOut."""
    detail: str = ""


def bucket(e: Endpoint) -> Bucket:
    country = to_alpha2(e.location.country) if e.location.country else None
    # The enum members are str already: no ``.value`` lookups on this hot path.
    return (country or "", e.channel_type, e.endpoint_status, e.opt_out)


@dataclass
class Peers:
    """What a batch must read beyond the endpoints its writes name (``peers_to_read``)."""

    addresses: set[str] = field(default_factory=set)
    """Addresses whose ACTIVE endpoints a write may deactivate."""
    left: set[str] = field(default_factory=set)
    """Addresses an ACTIVE endpoint may leave: every endpoint there is read (the fallback)."""
    users: set[str] = field(default_factory=set)
    """UserIds whose endpoints a write may meet (the cap, UserAttributes)."""


def peers_to_read(
    writes: Sequence[EndpointPatch | EndpointDelete], stored: Mapping[str, Endpoint]
) -> Peers:
    """The addresses and UserIds whose other endpoints the batch must read, given the stored
    endpoints the writes name (by id_key).

    An address is needed when a write leaves an endpoint at an address (and channel) it did not
    hold ACTIVE: only then are other endpoints there deactivated. At most one endpoint per
    address and channel is ACTIVE (every write deactivates the others), so an endpoint that
    stays where it held the address has no ACTIVE peer to read. An address an ACTIVE endpoint
    leaves (it moves, changes channel, is set INACTIVE or deleted) is read whole: the
    source-driven endpoint there may take it back (``WriteBatch._fall_back``). A UserId is
    needed when an endpoint joins it (the cap, the user's UserAttributes) or a write gives
    UserAttributes (kept equal across the user). A key written more than once is compared with
    what the batch did before, not with what is stored, so its addresses and users are always
    read, its addresses whole.
    """
    seen: Counter[str] = Counter(endpoint_key(w.id) for w in writes)
    peers = Peers()
    addresses, users, left = peers.addresses, peers.users, peers.left
    for w in writes:
        key = endpoint_key(w.id)
        s = stored.get(key)
        once = seen[key] == 1
        if not isinstance(w, EndpointPatch):
            if (s is not None and s.address is not None) and (
                not once or s.endpoint_status is EndpointStatus.ACTIVE
            ):
                left.add(s.address)
            continue
        address = w.address if w.address is not None else (s.address if s else None)
        channel = w.channel_type or (s.channel_type if s else None)
        user = w.user_id if w.user_id is not None else (s.user_id if s else None)
        stays = (
            s is not None
            and s.endpoint_status is EndpointStatus.ACTIVE
            and s.address == address
            and s.channel_type is channel
        )
        if address is not None and not (once and stays):
            addresses.add(address)
            if s is not None and s.address:
                addresses.add(s.address)
        if not once:
            left.update(a for a in (address, s.address if s else None) if a is not None)
        elif (
            s is not None
            and s.address is not None
            and s.endpoint_status is EndpointStatus.ACTIVE
            and (not stays or w.endpoint_status is EndpointStatus.INACTIVE)
        ):
            left.add(s.address)
        if user is not None and (not once or s is None or s.user_id != user or w.user_attributes):
            users.add(user)
            if s is not None and s.user_id:
                users.add(s.user_id)
    return peers


@dataclass
class Row:
    """An endpoint as the batch has left it, and as it was read."""

    pk: int
    endpoint: Endpoint
    stored: Endpoint | None
    """The endpoint as the database holds it under ``pk``; None: not written yet."""


@dataclass
class WriteBatch:
    """Pinpoint's write rules applied in memory to the rows one transaction read."""

    app_id: str
    now: str
    country: CountryDerivation
    next_pk: int
    """The first primary key free for new endpoints."""
    names: set[tuple[str, str]]
    """(kind, name) of every attribute and metric name the app has: A, U or M."""
    tombs: dict[str, str] = field(default_factory=dict)
    """id_key -> position of the delete that removed it."""
    rows: dict[str, Row] = field(default_factory=dict)
    deleted_pks: list[int] = field(default_factory=list)
    """Endpoints the database holds that the batch deleted."""
    new_names: list[tuple[str, str]] = field(default_factory=list)
    tombs_written: dict[str, str] = field(default_factory=dict)
    tombs_removed: set[str] = field(default_factory=set)
    history: list[HistoryRow] = field(default_factory=list)
    holds: dict[str, Hold] = field(default_factory=dict)
    """id_key -> the end-user opt-out holding it (read for the keys the writes name)."""
    holds_written: dict[str, Hold] = field(default_factory=dict)
    holds_removed: set[str] = field(default_factory=set)
    counts: Counter[Bucket] = field(default_factory=Counter)
    _by_address: dict[tuple[str, ChannelType], set[str]] = field(default_factory=dict)
    _by_user: dict[str, set[str]] = field(default_factory=dict)

    # loading ----------------------------------------------------------------------------------
    def load(self, rows: Iterable[tuple[int, Endpoint]]) -> None:
        """Take rows read from the database (a row already held is kept as the batch has it)."""
        for pk, endpoint in rows:
            key = endpoint_key(endpoint.id)
            if key not in self.rows:
                self.rows[key] = Row(pk, endpoint, endpoint)
                self._index(key, endpoint)

    def _index(self, key: str, e: Endpoint) -> None:
        if e.address is not None:
            self._by_address.setdefault((e.address, e.channel_type), set()).add(key)
        if e.user_id is not None:
            self._by_user.setdefault(e.user_id, set()).add(key)

    def _unindex(self, key: str, e: Endpoint) -> None:
        if e.address is not None:
            self._by_address.get((e.address, e.channel_type), set()).discard(key)
        if e.user_id is not None:
            self._by_user.get(e.user_id, set()).discard(key)

    def _set(self, key: str, endpoint: Endpoint) -> None:
        row = self.rows[key]
        old = row.endpoint
        if (old.address, old.channel_type, old.user_id) != (
            endpoint.address,
            endpoint.channel_type,
            endpoint.user_id,
        ):
            self._unindex(key, old)
            self._index(key, endpoint)
        self.counts[bucket(old)] -= 1
        self.counts[bucket(endpoint)] += 1
        row.endpoint = endpoint

    # what the store writes --------------------------------------------------------------------
    def changed_rows(self) -> list[Row]:
        """Rows to write: new ones and the ones whose endpoint differs from what is stored."""
        return [r for r in self.rows.values() if r.endpoint is not r.stored]

    # rules ------------------------------------------------------------------------------------
    def _record(
        self,
        e: Endpoint,
        before: OptOut | None,
        after: OptOut | None,
        cause: Cause,
        *,
        source_time: str | None = None,
        address_before: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.history.append(
            (
                self.app_id,
                endpoint_key(e.id),
                e.id,
                self.now,
                before,
                after,
                e.address,
                cause.kind,
                cause.ref,
                e.channel_type,
                e.user_id,
                source_time,
                cause.detail if detail is None else detail,
                address_before,
            )
        )

    # end-user opt-outs ------------------------------------------------------------------------
    def _drop_hold(self, key: str) -> None:
        if self.holds.pop(key, None) is not None:
            self.holds_written.pop(key, None)
            self.holds_removed.add(key)

    def _keep_hold(self, key: str, hold: Hold) -> None:
        self.holds[key] = self.holds_written[key] = hold
        self.holds_removed.discard(key)

    def _held(
        self, key: str, existing: Endpoint | None, patch: EndpointPatch, cause: Cause
    ) -> tuple[EndpointPatch, str | None]:
        """``patch`` as an end-user opt-out on the endpoint lets it be (see ``Hold``), and the
        history detail of an opt-in that lifts the hold."""
        hold = self.holds.get(key)
        if hold is None or existing is None:
            return patch, None
        address = patch.address if patch.address is not None else existing.address
        if address != hold.address:
            self._drop_hold(key)  # another address: that person's STOP is not about it
            return patch, None
        if patch.opt_out is None:
            return patch, None
        if cause.kind is CauseKind.SOURCE:
            if patch.opt_out is OptOut.ALL:
                if hold.source_opt_out is not OptOut.ALL:
                    self._keep_hold(key, dataclasses.replace(hold, source_opt_out=OptOut.ALL))
                return patch, None
            turned = hold.source_opt_out is OptOut.ALL
            after_stop = patch.source_time is None or patch.source_time > hold.at
            if turned and after_stop:
                self._drop_hold(key)
                return (
                    patch,
                    "explicit opt-in: the source's opt-in column turned on after the end "
                    "user's opt-out",
                )
            return msgspec.structs.replace(patch, opt_out=None), None
        if patch.opt_out is OptOut.NONE:
            if patch.opt_in_reason:
                self._drop_hold(key)
                return patch, f"explicit opt-in after the end user's opt-out: {patch.opt_in_reason}"
            return msgspec.structs.replace(patch, opt_out=None), None
        return patch, None

    def stop(self, key: str, at: str, cause: Cause) -> bool:
        """The person at this endpoint's address opted out themselves: OptOut ALL, held.

        False if the endpoint is not in the batch.
        """
        row = self.rows.get(key)
        if row is None or row.endpoint.address is None:
            return False
        existing = row.endpoint
        assert existing.address is not None
        held = self.holds.get(key)
        if held is not None and held.address == existing.address:
            hold = dataclasses.replace(held, at=max(held.at, at), detail=cause.detail)
        else:
            hold = Hold(existing.address, at, existing.opt_out, cause.detail)
        self._keep_hold(key, hold)
        if existing.opt_out is not OptOut.ALL:
            endpoint = dataclasses.replace(existing, opt_out=OptOut.ALL, effective_date=self.now)
            self._set(key, endpoint)
            # source_time: when the person opted out, where the deadline is counted from.
            self._record(endpoint, existing.opt_out, OptOut.ALL, cause, source_time=at)
        return True

    def _check_names(self, e: Endpoint) -> None:
        if not (e.attributes or e.user_attributes or e.metrics):
            return
        names = {("A", n) for n in e.attributes}
        names |= {("U", n) for n in e.user_attributes}
        names |= {("M", n) for n in e.metrics}
        new = names - self.names
        if not new:
            return
        if len(self.names) + len(new) > MAX_ATTRIBUTE_NAMES_PER_APP:
            raise LimitExceeded(
                f"Too many custom attributes: an app holds at most {MAX_ATTRIBUTE_NAMES_PER_APP} "
                "distinct Attributes, UserAttributes and Metrics names together"
            )
        self.names |= new
        self.new_names.extend(sorted(new))

    def _deactivate(self, key: str) -> None:
        e = self.rows[key].endpoint
        if e.endpoint_status is EndpointStatus.ACTIVE:
            self._set(key, dataclasses.replace(e, endpoint_status=EndpointStatus.INACTIVE))

    def _fall_back(self, e: Endpoint, key: str) -> None:
        """``e`` (``key``) held its address ACTIVE and has left it (moved, changed channel, was
        set INACTIVE or deleted): the source-driven endpoint there that the newest source
        change wrote takes the address back (ACTIVE).

        Pinpoint reactivates nobody; optsync mirrors a source, where the other row still has
        the number, so a person the source says is opted in stays eligible once nobody else
        holds their number. Endpoints written only through the API (no source position) stay
        INACTIVE, as in Pinpoint. The batch holds every endpoint at the address
        (``Peers.left``).
        """
        if e.address is None or e.endpoint_status is not EndpointStatus.ACTIVE:
            return
        best: tuple[str, int, str] | None = None
        for other in self._by_address.get((e.address, e.channel_type), ()):
            if other == key:
                continue
            row = self.rows[other]
            peer = row.endpoint
            if peer.endpoint_status is EndpointStatus.ACTIVE:
                return  # someone holds it already
            if peer.source_position is not None:
                rank = (peer.source_position, row.pk, other)
                best = rank if best is None or rank > best else best
        if best is not None:
            e = self.rows[best[2]].endpoint
            self._set(best[2], dataclasses.replace(e, endpoint_status=EndpointStatus.ACTIVE))

    def _user_peers(self, user_id: str, key: str) -> list[Row]:
        """The other endpoints of a user, oldest row first (the order the database keeps)."""
        keys = self._by_user.get(user_id)
        if not keys or (len(keys) == 1 and key in keys):
            return []  # the usual case: a user with one endpoint
        return sorted((self.rows[k] for k in keys if k != key), key=lambda r: r.pk)

    def _join_user(self, endpoint: Endpoint, key: str) -> Endpoint:
        """An endpoint joins a UserId: enforce 15 endpoints per user, take on its attributes.

        At the cap, push-token channels retire the user's oldest push endpoint (INACTIVE, no
        UserId); other channels are refused. The joining endpoint gets the user's
        UserAttributes, its own given ones winning.
        """
        assert endpoint.user_id is not None
        peers = self._user_peers(endpoint.user_id, key)
        if len(peers) >= MAX_ENDPOINTS_PER_USER:
            push = [r for r in peers if r.endpoint.channel_type in PUSH_TOKEN_CHANNELS]
            if endpoint.channel_type not in PUSH_TOKEN_CHANNELS or not push:
                raise LimitExceeded(
                    f"Exceeded maximum endpoint per user count: {MAX_ENDPOINTS_PER_USER} "
                    f"(endpoint {endpoint.id!r}); delete an endpoint of this user first"
                )
            oldest = min(push, key=lambda r: (r.endpoint.effective_date or "", r.pk))
            old_key = endpoint_key(oldest.endpoint.id)
            self._deactivate(old_key)
            self._set(old_key, dataclasses.replace(self.rows[old_key].endpoint, user_id=None))
            peers = [r for r in peers if r is not oldest]
        if not peers:
            return endpoint
        merged = {**peers[0].endpoint.user_attributes, **endpoint.user_attributes}
        return dataclasses.replace(endpoint, user_attributes=merged)

    def _sync_user_attributes(
        self, endpoint: Endpoint, given: Mapping[str, tuple[str, ...]]
    ) -> None:
        """Pinpoint keeps UserAttributes the same on every endpoint of one UserId."""
        assert endpoint.user_id is not None
        for peer in self._user_peers(endpoint.user_id, endpoint_key(endpoint.id)):
            other = peer.endpoint
            merged = {**other.user_attributes, **given}
            if merged != dict(other.user_attributes):
                self._set(
                    endpoint_key(other.id), dataclasses.replace(other, user_attributes=merged)
                )

    def upsert(self, patch: EndpointPatch, cause: Cause) -> bool:
        """Apply one UpdateEndpoint; False if a positioned write is older than what is held."""
        key = endpoint_key(patch.id)
        row = self.rows.get(key)
        existing = row.endpoint if row else None
        if patch.position is not None:
            held = [p for p in (existing and existing.source_position, self.tombs.get(key)) if p]
            if held and max(held) >= patch.position:
                return False
        opt_in_detail = None
        if self.holds:
            patch, opt_in_detail = self._held(key, existing, patch, cause)
        validate_patch(patch)
        request_id = cause.ref if cause.kind is CauseKind.API else os.urandom(16).hex()
        endpoint = merge(
            existing,
            patch,
            app_id=self.app_id,
            now=self.now,
            request_id=request_id,
            country=self.country,
        )
        if endpoint.user_id and (existing is None or existing.user_id != endpoint.user_id):
            endpoint = self._join_user(endpoint, key)
        self._check_names(endpoint)
        if row is None:
            self.rows[key] = Row(self.next_pk, endpoint, None)
            self.next_pk += 1
            self._index(key, endpoint)
            self.counts[bucket(endpoint)] += 1
        else:
            self._set(key, endpoint)
        # An endpoint that was ACTIVE at this address and channel already holds it alone: any
        # later write of another endpoint at the address would have made it INACTIVE.
        holds_address = (
            existing is not None
            and existing.endpoint_status is EndpointStatus.ACTIVE
            and existing.address == endpoint.address
            and existing.channel_type is endpoint.channel_type
        )
        if endpoint.address is not None and not holds_address:
            peers = self._by_address.get((endpoint.address, endpoint.channel_type), set())
            for other in sorted(peers - {key}):
                self._deactivate(other)
        if existing is not None and (
            existing.address != endpoint.address
            or existing.channel_type is not endpoint.channel_type
            or endpoint.endpoint_status is not EndpointStatus.ACTIVE
        ):
            self._fall_back(existing, key)
        if patch.user_attributes and endpoint.user_id:
            self._sync_user_attributes(endpoint, patch.user_attributes)
        before = existing.opt_out if existing else None
        moved = existing is not None and existing.address != endpoint.address
        if before is not endpoint.opt_out or moved:
            self._record(
                endpoint,
                before,
                endpoint.opt_out,
                cause,
                source_time=patch.source_time,
                address_before=existing.address if moved and existing else None,
                detail=_opt_in_detail(cause, patch, opt_in_detail),
            )
        if patch.position is not None and self.tombs.pop(key, None) is not None:
            self.tombs_written.pop(key, None)
            self.tombs_removed.add(key)
        return True

    def delete(self, delete: EndpointDelete, cause: Cause) -> Endpoint | bool | None:
        """The deleted endpoint; None if there was none; False if the delete is stale."""
        key = endpoint_key(delete.id)
        row = self.rows.get(key)
        if delete.position is not None:
            tomb = self.tombs.get(key)
            held = [p for p in (row and row.endpoint.source_position, tomb) if p]
            if held and max(held) >= delete.position:
                return False
            self.tombs[key] = self.tombs_written[key] = delete.position
            self.tombs_removed.discard(key)
        elif row is not None and row.endpoint.source_position is not None:
            # A delete without a position (the API's) leaves a tombstone at the source position
            # the endpoint held, so an older source record (a DLQ replay) cannot bring it back.
            self.tombs[key] = self.tombs_written[key] = row.endpoint.source_position
            self.tombs_removed.discard(key)
        if row is None:
            return None
        endpoint = row.endpoint
        del self.rows[key]
        self._unindex(key, endpoint)
        if row.stored is not None:
            self.deleted_pks.append(row.pk)
        self.counts[bucket(endpoint)] -= 1
        self._fall_back(endpoint, key)
        self._drop_hold(key)
        self._record(endpoint, endpoint.opt_out, None, cause, source_time=delete.source_time)
        return endpoint


def _opt_in_detail(cause: Cause, patch: EndpointPatch, lifted: str | None) -> str | None:
    """The history detail of an upsert: why a hold was lifted, or the opt-in reason given."""
    if lifted is not None:
        return f"{cause.detail}; {lifted}" if cause.detail else lifted
    if patch.opt_in_reason and patch.opt_out is OptOut.NONE:
        reason = f"opt-in reason: {patch.opt_in_reason}"
        return f"{cause.detail}; {reason}" if cause.detail else reason
    return None
