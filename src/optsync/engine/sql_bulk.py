"""``SqlBulkImport``: ``EndpointStore.import_endpoints`` for ``SqlStore``, the bulk load of an
import file.

Most lines of a migration file create an endpoint that is not there yet, at an address no other
endpoint holds, for a UserId nobody has: Pinpoint's rules then reduce to "insert it". Those
endpoints ("plain new") skip the read-merge-write of ``WriteBatch.upsert`` and are built straight
from the patch (the same values ``merge`` gives a new endpoint; ``merge`` itself when the endpoint
is large enough for its size limit to matter), and their rows are built here rather than by
``SqlStore._finish_batch``, which compares each endpoint with its stored self: the same rows,
attribute rows, names, consent history (created, with its OptOut) and rollup counts as the
normal path writes (tests/contract/test_store_import.py compares them), set-based (executemany,
or COPY on PostgreSQL). What repeats from line to line (a map column's JSON, a value read as a
date, a set of attribute names) is worked out once per chunk or memo; attribute rows go in in
their table's key order, so each insert lands beside the previous one.

Every other line goes through the normal rules (``WriteBatch``) in the same transaction: an
endpoint that exists, an id or address or UserId repeated within a chunk, an ACTIVE endpoint or
an end user's hold at the address, a UserId that other endpoints have, a positioned write or an
explicit opt-in reason. The two sets of a chunk touch disjoint endpoints, so applying the plain
ones first gives the same result as applying the lines in file order.

The whole call is one transaction: an import is in or not at all (a crash or an error part-way
leaves nothing). It holds the app's write lock meanwhile, so other writers of the store wait.
A store may widen its connection settings for that transaction (``_import_session``: SQLite
raises its page cache to 256 MiB, as the transaction dirties far more pages than 64 MiB).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import operator
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from optsync.engine.endpoints import (
    MAX_ATTRIBUTE_NAMES_PER_APP,
    MAX_ENDPOINT_BYTES,
    _rough_size,
    endpoint_key,
    merge,
    validate_patch,
)
from optsync.engine.models import (
    Cause,
    ChannelType,
    Demographic,
    Endpoint,
    EndpointPatch,
    EndpointStatus,
    Location,
    OptOut,
    WriteResult,
    iso_now,
)
from optsync.engine.phone import country_for_address
from optsync.engine.segments import iso_instant_ms
from optsync.engine.sql_rows import (
    _ATTRIBUTE_COLUMNS,
    _ENDPOINT_INSERT_COLUMNS,
    _HISTORY_COLUMNS,
    _dump_lists,
    _dumps,
    _endpoint_values,
)
from optsync.engine.writes import Bucket, Row, WriteBatch, bucket
from optsync.errors import LimitExceeded

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor, SqlStore

__all__ = ("IMPORT_CHUNK", "SqlBulkImport")

IMPORT_CHUNK = 5_000
"""Lines read and written together: large enough for set-based statements, small enough that
the rows of one chunk stay a few MB."""

_ATTRIBUTE_KEY = operator.itemgetter(2, 3, 4)
"""kind, name, value: ``endpoint_attributes``' primary key after its app_id, before endpoint_pk."""
_EMPTY_DEMOGRAPHIC = Demographic()
_EMPTY_LOCATION = Location()
_COUNTRY_CHANNELS = (ChannelType.SMS, ChannelType.VOICE)


class SqlBulkImport:
    """Mixin of ``SqlStore``: ``import_endpoints``."""

    def import_endpoints(
        self,
        app_id: str,
        patches: Iterable[EndpointPatch | tuple[EndpointPatch, Cause]],
        cause: Cause,
    ) -> WriteResult:
        """Apply ``patches`` in order with UpdateEndpoint's rules, in one transaction; see the
        module docstring. An item may carry its own cause (the file and line it came from)."""
        store: SqlStore = self  # type: ignore[assignment]
        items = iter(patches)
        applied = 0
        with store._import_session(), store._write() as cur:
            store._lock_apps(cur, [app_id])
            store._get_app(cur, app_id)
            # The addresses of the app's end-user holds, read once: ``end_user_holds`` has no
            # index on address, so a lookup per chunk would scan them all every time.
            held = {
                r[0]
                for r in store._exec(
                    cur, "SELECT address FROM end_user_holds WHERE app_id = ?", (app_id,)
                ).fetchall()
            }
            while chunk := [
                item if isinstance(item, tuple) else (item, cause)
                for item in itertools.islice(items, IMPORT_CHUNK)
            ]:
                applied += _import_chunk(store, cur, app_id, chunk, held)
        store._after_writes()
        return WriteResult(applied=applied)

    def _import_session(self) -> AbstractContextManager[None]:
        """Hook: connection settings for the length of one import (SQLite: a larger cache)."""
        return contextlib.nullcontext()


def _existing(
    store: SqlStore, cur: Cursor, app_id: str, select: str, column: str, values: set[str]
) -> set[str]:
    found: set[str] = set()
    for part in store._chunks(sorted(values)):
        test, params = store._in(column, part)
        rows = store._exec(cur, f"{select} WHERE app_id = ? AND {test}", (app_id, *params))
        found.update(r[0] for r in rows.fetchall())
    return found


def _import_chunk(
    store: SqlStore,
    cur: Cursor,
    app_id: str,
    chunk: list[tuple[EndpointPatch, Cause]],
    held: set[str],
) -> int:
    """Write one chunk; ``held`` holds (at least) the addresses of the app's end-user holds."""
    keys = Counter(endpoint_key(p.id) for p, _ in chunk)
    addresses = Counter(p.address for p, _ in chunk if p.address is not None)
    users = Counter(p.user_id for p, _ in chunk if p.user_id is not None)
    stored = _existing(store, cur, app_id, "SELECT id_key FROM endpoints", "id_key", set(keys))
    busy = _existing(
        store,
        cur,
        app_id,
        "SELECT address FROM endpoints",
        "status = 'ACTIVE' AND address",
        set(addresses),
    )
    busy |= held.intersection(addresses)
    joined = _existing(store, cur, app_id, "SELECT user_id FROM endpoints", "user_id", set(users))
    plain: list[tuple[EndpointPatch, Cause]] = []
    ruled: list[tuple[EndpointPatch, Cause]] = []
    for patch, why in chunk:
        address, user = patch.address, patch.user_id
        if (
            patch.channel_type is None
            or patch.position is not None
            or patch.opt_in_reason
            or keys[endpoint_key(patch.id)] > 1
            or endpoint_key(patch.id) in stored
            or (address is not None and (addresses[address] > 1 or address in busy))
            or (user is not None and (users[user] > 1 or user in joined))
        ):
            ruled.append((patch, why))
        else:
            plain.append((patch, why))
    if plain:
        _write_plain(store, cur, app_id, plain)
    if ruled:
        batch = store._begin_batch(cur, app_id, [p for p, _ in ruled])
        for patch, why in ruled:
            batch.upsert(patch, why)
        store._finish_batch(cur, batch)
        held.update(h.address for h in batch.holds_written.values())
    return len(chunk)


def _write_plain(
    store: SqlStore, cur: Cursor, app_id: str, plain: list[tuple[EndpointPatch, Cause]]
) -> None:
    names = {
        (k, n)
        for k, n in store._exec(
            cur, "SELECT kind, name FROM attribute_names WHERE app_id = ?", (app_id,)
        ).fetchall()
    }
    batch = WriteBatch(
        app_id=app_id,
        now=iso_now(),
        country=store.settings.country,
        next_pk=store._next_pk(cur),
        names=set(names),
    )
    # Cohorts only spread endpoints evenly (Pinpoint's CohortId): a seeded generator will do.
    cohorts = random.Random(os.urandom(16))  # noqa: S311
    rows: list[Row] = []
    history: list[tuple[Any, ...]] = []
    counts: Counter[Bucket] = Counter()
    known: set[tuple[tuple[str, ...], ...]] = set()
    for patch, why in plain:
        validate_patch(patch)
        endpoint = _new_endpoint(batch, patch, cohorts)
        a, u, m = endpoint.attributes, endpoint.user_attributes, endpoint.metrics
        # Lines of a file mostly repeat one set of names: each set is checked once.
        if (a or u or m) and (named := (tuple(a), tuple(u), tuple(m))) not in known:
            known.add(named)
            given = {("A", n) for n in endpoint.attributes}
            given |= {("U", n) for n in endpoint.user_attributes}
            given |= {("M", n) for n in endpoint.metrics}
            new = given - batch.names
            if new:
                if len(batch.names) + len(new) > MAX_ATTRIBUTE_NAMES_PER_APP:
                    raise LimitExceeded(
                        "Too many custom attributes: an app holds at most "
                        f"{MAX_ATTRIBUTE_NAMES_PER_APP} distinct Attributes, UserAttributes and "
                        "Metrics names together"
                    )
                batch.names |= new
                batch.new_names.extend(sorted(new))
        rows.append(Row(batch.next_pk, endpoint, None))
        batch.next_pk += 1
        history.append(
            (
                app_id,
                endpoint_key(endpoint.id),
                endpoint.id,
                batch.now,
                None,
                endpoint.opt_out,
                endpoint.address,
                why.kind,
                why.ref,
                endpoint.channel_type,
                endpoint.user_id,
                patch.source_time,
                why.detail,
                None,
            )
        )
    store._number_new_rows(cur, rows)
    # The rows ``_finish_batch`` writes for new endpoints, built by ``_RowBuilder``'s memos.
    build = _RowBuilder()
    endpoints: list[tuple[Any, ...]] = []
    attributes: list[tuple[Any, ...]] = []
    metrics: list[tuple[Any, ...]] = []
    for r in rows:
        pk, e = r.pk, r.endpoint
        values, side = build.endpoint(pk, e)
        endpoints.append(values)
        counts[side] += 1
        if e.attributes or e.user_attributes:
            attributes.extend(build.attributes(pk, e, side))
        if e.metrics:
            metrics.extend((pk, app_id, n, v) for n, v in e.metrics.items())
    store._insert(cur, "endpoints", _ENDPOINT_INSERT_COLUMNS, endpoints)
    del endpoints
    if attributes:
        # In the table's key order (a stable sort keeps pk order within a value): each insert
        # lands beside the previous one in the b-tree, about 20 % cheaper on SQLite.
        attributes.sort(key=_ATTRIBUTE_KEY)
        store._insert(cur, "endpoint_attributes", _ATTRIBUTE_COLUMNS, attributes)
    if metrics:
        store._insert(cur, "endpoint_metrics", ("endpoint_pk", "app_id", "name", "value"), metrics)
    if batch.new_names:
        cur.executemany(
            store._sql("INSERT INTO attribute_names (app_id, kind, name) VALUES (?, ?, ?)"),
            [(app_id, k, n) for k, n in batch.new_names],
        )
    store._insert(cur, "consent_history", _HISTORY_COLUMNS, history)
    cur.executemany(
        store._sql(
            "INSERT INTO endpoint_counts (app_id, country_code, channel_type, status, "
            "opt_out, n) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, country_code, "
            "channel_type, status, opt_out) DO UPDATE SET n = endpoint_counts.n + "
            "excluded.n"
        ),
        [(app_id, *b, n) for b, n in sorted(counts.items())],
    )
    store._written += len(rows)


class _RowBuilder:
    """``_endpoint_values`` and ``_attribute_rows`` for new endpoints, with the work that
    repeats from line to line of a chunk memoized: the JSON of a map column, whether an
    attribute value reads as a date. The rows are the same."""

    MEMO = 50_000
    """Entries per memo before it is emptied (a file of unique values must not grow it)."""

    def __init__(self) -> None:
        self.lists: dict[tuple[tuple[str, Any], ...], str] = {}
        self.numbers: dict[tuple[tuple[str, float], ...], str] = {}
        self.instants: dict[str, int | None] = {}

    def _lists(self, values: Mapping[str, Sequence[str]]) -> str:
        if not values:
            return "{}"
        key = tuple(values.items())
        try:
            return self.lists[key]
        except KeyError:
            pass
        except TypeError:  # a list value (not hashable): no memo
            return _dump_lists(values)
        if len(self.lists) >= self.MEMO:
            self.lists.clear()
        text = self.lists[key] = _dump_lists(values)
        return text

    def _metrics(self, values: Mapping[str, float]) -> str:
        if not values:
            return "{}"
        if any(type(v) is not float for v in values.values()):
            return _dumps(dict(values))  # 1 == 1.0 == True: a memo would mix their JSON
        key = tuple(values.items())
        text = self.numbers.get(key)
        if text is None:
            if len(self.numbers) >= self.MEMO:
                self.numbers.clear()
            text = self.numbers[key] = _dumps(dict(values))
        return text

    def instant(self, value: str) -> int | None:
        try:
            return self.instants[value]
        except KeyError:
            if len(self.instants) >= self.MEMO:
                self.instants.clear()
            ms = self.instants[value] = iso_instant_ms(value)
            return ms

    def endpoint(self, pk: int, e: Endpoint) -> tuple[tuple[Any, ...], Bucket]:
        """The ``endpoints`` row (pk first) and the endpoint's rollup bucket."""
        return (pk, *_endpoint_values(e, self._lists, self._metrics)), bucket(e)

    def attributes(self, pk: int, e: Endpoint, side: Bucket) -> list[tuple[Any, ...]]:
        """The ``endpoint_attributes`` rows, as ``_attribute_rows`` gives them."""
        country, channel, status, opt_out = side
        app_id, instant = e.app_id, self.instant
        return [
            (pk, app_id, kind, name, value, instant(value), country, channel, status, opt_out)
            for kind, values in (("A", e.attributes), ("U", e.user_attributes))
            for name, items in values.items()
            for value in dict.fromkeys(items)
        ]


def _small(e: Endpoint) -> bool:
    """Far below the endpoint size limit, from counts alone (``validate_patch`` holds names to
    50 characters and values to 100): an upper bound of ``_rough_size`` that costs no loop over
    the values."""
    a, u = e.attributes, e.user_attributes
    names = len(a) + len(u)
    values = sum(map(len, a.values())) + sum(map(len, u.values())) if names else 0
    bound = len(e.address or "") + 56 * names + 103 * values + 80 * len(e.metrics)
    return 4 * bound + 1024 <= MAX_ENDPOINT_BYTES // 2


def _new_endpoint(batch: WriteBatch, patch: EndpointPatch, cohorts: random.Random) -> Endpoint:
    """What ``merge(None, patch, ...)`` returns, built in one step."""
    assert patch.channel_type is not None
    request_id = patch.request_id or os.urandom(16).hex()
    location = patch.location or _EMPTY_LOCATION
    country = batch.country
    if (
        country.enabled
        and location.country is None
        and patch.address
        and patch.channel_type in _COUNTRY_CHANNELS
    ):
        derived = country_for_address(patch.address, country.policy)
        if derived is not None:
            location = dataclasses.replace(location, country=derived)
    endpoint = Endpoint(
        app_id=batch.app_id,
        id=patch.id,
        channel_type=patch.channel_type,
        address=patch.address,
        opt_out=patch.opt_out or OptOut.NONE,
        endpoint_status=patch.endpoint_status or EndpointStatus.ACTIVE,
        creation_date=batch.now,
        effective_date=patch.effective_date or batch.now,
        cohort_id=str(cohorts.randrange(100)),
        request_id=request_id,
        user_id=patch.user_id,
        user_attributes=dict(patch.user_attributes) if patch.user_attributes else {},
        attributes=dict(patch.attributes) if patch.attributes else {},
        metrics=dict(patch.metrics) if patch.metrics else {},
        demographic=patch.demographic or _EMPTY_DEMOGRAPHIC,
        location=location,
        source_position=patch.position,
    )
    if not _small(endpoint) and _rough_size(endpoint) > MAX_ENDPOINT_BYTES // 2:
        # Near the size limit: merge's exact check (and its error) decide.
        return merge(
            None,
            patch,
            app_id=batch.app_id,
            now=batch.now,
            request_id=request_id,
            country=country,
        )
    return endpoint
