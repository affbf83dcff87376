"""``SqlStore``: the ``EndpointStore`` logic shared by the SQL databases.

Subclasses supply a connection (``_write``/``_read`` context managers yielding a DB-API cursor)
and a ``Dialect``; statements are written once, with ``?`` placeholders, and subclasses whose
driver wants another paramstyle rewrite them in ``_sql``.
"""

from __future__ import annotations

import json
import threading
import uuid
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from optsync.engine.countries import to_alpha2
from optsync.engine.endpoints import (
    CountryDerivation,
    endpoint_key,
)
from optsync.engine.models import (
    App,
    Cause,
    CauseKind,
    Channel,
    ChannelType,
    ConsentChange,
    Demographic,
    Endpoint,
    EndpointDelete,
    EndpointPatch,
    EndpointStatus,
    Estimate,
    Location,
    OptOut,
    Page,
    WriteResult,
    iso_now,
)
from optsync.engine.segments import (
    Dialect,
    SegmentDefinition,
    compile_driven,
    compile_filter,
    compile_segment,
    definition_from_wire,
    definition_to_wire,
    iso_instant_ms,
)
from optsync.engine.store import EndpointStore, Segment
from optsync.engine.writes import WriteBatch, bucket, peers_to_read
from optsync.errors import InvalidRequest, NotFound

__all__ = ("Cursor", "SqlStore", "StoreSettings")


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...
    def executemany(self, sql: str, params: Sequence[Sequence[Any]], /) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


@dataclass(frozen=True)
class StoreSettings:
    """How the engine fills in what requests leave out."""

    country: CountryDerivation = field(default_factory=CountryDerivation)
    """Derive Location.Country of SMS/VOICE endpoints from the number."""
    region: str = "us-east-1"
    """Region written into ARNs."""
    account: str = "000000000000"
    """Account id written into ARNs."""


_ENDPOINT_COLUMNS = (
    "app_id, id, id_key, channel_type, address, opt_out, status, creation_date, effective_date, "
    "cohort_id, request_id, user_id, country, country_code, city, region, postal_code, latitude, "
    "longitude, app_version, locale, make, model, model_version, platform, platform_version, "
    "timezone, attributes, user_attributes, metrics, source_position"
)


_COLUMN_NAMES = tuple(c.strip() for c in _ENDPOINT_COLUMNS.split(","))
_INSERT_ENDPOINT = "INSERT INTO endpoints (pk, {}) VALUES (?, {})".format(
    _ENDPOINT_COLUMNS, ", ".join("?" for _ in _ENDPOINT_COLUMNS.split(","))
)
_INSERT_ATTRIBUTE = (
    "INSERT INTO endpoint_attributes (endpoint_pk, app_id, kind, name, value, value_ts, "
    "country_code, channel_type, status, opt_out) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def _dump_lists(values: Mapping[str, Sequence[str]]) -> str:
    return _dumps({k: list(v) for k, v in values.items()}) if values else "{}"


def _lists(text: str | None) -> dict[str, tuple[str, ...]]:
    if not text or text == "{}":
        return {}
    return {k: tuple(v) for k, v in json.loads(text).items()}


# Enum members by value: a dict lookup instead of EnumType.__call__ for every row read.
_CHANNELS = {c.value: c for c in ChannelType}
_OPT_OUTS = {o.value: o for o in OptOut}
_STATUSES = {s.value: s for s in EndpointStatus}
_EMPTY_LOCATION = Location()
_EMPTY_DEMOGRAPHIC = Demographic()


def _row_to_endpoint(row: Sequence[Any]) -> Endpoint:
    app_id, eid, _key, channel, address, opt_out, status, created, effective, cohort, req = row[:11]
    location = (
        _EMPTY_LOCATION
        if row[12] is None and all(v is None for v in row[14:19])
        else Location(
            country=row[12],
            city=row[14],
            region=row[15],
            postal_code=row[16],
            latitude=row[17],
            longitude=row[18],
        )
    )
    demographic = (
        _EMPTY_DEMOGRAPHIC
        if all(v is None for v in row[19:27])
        else Demographic(
            app_version=row[19],
            locale=row[20],
            make=row[21],
            model=row[22],
            model_version=row[23],
            platform=row[24],
            platform_version=row[25],
            timezone=row[26],
        )
    )
    metrics = row[29]
    return Endpoint(
        app_id=app_id,
        id=eid,
        channel_type=_CHANNELS[channel],
        address=address,
        opt_out=_OPT_OUTS[opt_out],
        endpoint_status=_STATUSES[status],
        creation_date=created,
        effective_date=effective,
        cohort_id=cohort,
        request_id=req,
        user_id=row[11],
        location=location,
        demographic=demographic,
        attributes=_lists(row[27]),
        user_attributes=_lists(row[28]),
        metrics={}
        if not metrics or metrics == "{}"
        else {k: float(v) for k, v in json.loads(metrics).items()},
        source_position=row[30],
    )


def _endpoint_values(e: Endpoint) -> tuple[Any, ...]:
    loc, demo = e.location, e.demographic
    return (
        e.app_id,
        e.id,
        endpoint_key(e.id),
        # StrEnum members bind as their text; no ``.value`` lookup on this hot path.
        e.channel_type,
        e.address,
        e.opt_out,
        e.endpoint_status,
        e.creation_date,
        e.effective_date,
        e.cohort_id,
        e.request_id,
        e.user_id,
        loc.country,
        to_alpha2(loc.country) if loc.country else None,
        loc.city,
        loc.region,
        loc.postal_code,
        loc.latitude,
        loc.longitude,
        demo.app_version,
        demo.locale,
        demo.make,
        demo.model,
        demo.model_version,
        demo.platform,
        demo.platform_version,
        demo.timezone,
        _dump_lists(e.attributes),
        _dump_lists(e.user_attributes),
        _dumps(dict(e.metrics)) if e.metrics else "{}",
        e.source_position,
    )


_ROLLUP_COLUMNS = frozenset({"country_code", "channel_type"})
_CHUNK = 500


def _side_of(e: Endpoint) -> tuple[object, ...]:
    """What an endpoint's attribute and metric rows hold; they are rewritten when it changes."""
    return (e.attributes, e.user_attributes, e.metrics, bucket(e))


def _attribute_rows(pk: int, e: Endpoint) -> list[tuple[Any, ...]]:
    """One row per attribute value, each with the endpoint's rollup columns copied in.

    The copies let an attribute segment be counted from the attribute index alone.
    """
    country, channel, status, opt_out = bucket(e)
    return [
        (pk, e.app_id, kind, name, value, iso_instant_ms(value), country, channel, status, opt_out)
        for kind, values in (("A", e.attributes), ("U", e.user_attributes))
        for name, items in values.items()
        for value in dict.fromkeys(items)
    ]


def _chunks(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]


@dataclass
class _Job:
    """One caller's write_endpoints, waiting for (or done in) a group transaction."""

    app_id: str
    writes: Sequence[EndpointPatch | EndpointDelete]
    cause: Cause
    durable: bool = True
    result: WriteResult | None = None
    error: BaseException | None = None
    done: bool = False


def _offset(token: str | None) -> int:
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidRequest(f"token {token!r} is not a NextToken this server returned")
    return int(token)


class SqlStore(EndpointStore):
    """Engine storage on a SQL database; see the module docstring."""

    dialect = Dialect()

    def __init__(self, settings: StoreSettings | None = None) -> None:
        self.settings = settings or StoreSettings()
        self._written = 0
        self._group = threading.Condition()
        self._queue: list[_Job] = []
        self._leading = False

    # hooks ------------------------------------------------------------------------------------
    @abstractmethod
    def _write(self, *, durable: bool = True) -> AbstractContextManager[Cursor]:
        """A cursor inside a write transaction that commits on success.

        ``durable=False``: the commit need not wait for the disk (see ``write_endpoints``).
        """

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for consistent reads."""

    def _sql(self, sql: str) -> str:
        return sql

    def _exec(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur.execute(self._sql(sql), params)
        return cur

    # apps -------------------------------------------------------------------------------------
    def _app_arn(self, app_id: str) -> str:
        s = self.settings
        return f"arn:aws:mobiletargeting:{s.region}:{s.account}:apps/{app_id}"

    def _row_to_app(self, row: Sequence[Any]) -> App:
        return App(
            id=row[0],
            name=row[1],
            arn=self._app_arn(row[0]),
            creation_date=row[2],
            tags=json.loads(row[3]),
        )

    def create_app(self, name: str, tags: Mapping[str, str] | None = None) -> App:
        app = App(
            id=uuid.uuid4().hex,
            name=name,
            arn="",
            creation_date=iso_now(),
            tags=dict(tags or {}),
        )
        with self._write() as cur:
            self._exec(
                cur,
                "INSERT INTO apps (id, name, creation_date, tags, seq) VALUES (?, ?, ?, ?, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 FROM apps))",
                (app.id, app.name, app.creation_date, _dumps(dict(app.tags))),
            )
        return App(app.id, app.name, self._app_arn(app.id), app.creation_date, app.tags)

    def _get_app(self, cur: Cursor, app_id: str) -> App:
        row = self._exec(
            cur, "SELECT id, name, creation_date, tags FROM apps WHERE id = ?", (app_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"Resource not found: there is no app with Id {app_id!r}")
        return self._row_to_app(row)

    def get_app(self, app_id: str) -> App:
        with self._read() as cur:
            return self._get_app(cur, app_id)

    def find_app(self, name: str) -> App | None:
        with self._read() as cur:
            row = self._exec(
                cur,
                "SELECT id, name, creation_date, tags FROM apps WHERE name = ? "
                "ORDER BY seq LIMIT 1",
                (name,),
            ).fetchone()
        return self._row_to_app(row) if row else None

    def list_apps(self, page_size: int, token: str | None) -> Page[App]:
        offset = _offset(token)
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT id, name, creation_date, tags FROM apps ORDER BY seq LIMIT ? OFFSET ?",
                (page_size + 1, offset),
            ).fetchall()
        more = len(rows) > page_size
        return Page(
            tuple(self._row_to_app(r) for r in rows[:page_size]),
            str(offset + page_size) if more else None,
        )

    def delete_app(self, app_id: str) -> App:
        with self._write() as cur:
            app = self._get_app(cur, app_id)
            for table in (
                "endpoint_attributes",
                "endpoint_metrics",
                "endpoints",
                "tombstones",
                "consent_history",
                "segments",
                "channels",
                "attribute_names",
                "endpoint_counts",
            ):
                self._exec(cur, f"DELETE FROM {table} WHERE app_id = ?", (app_id,))
            self._exec(cur, "DELETE FROM apps WHERE id = ?", (app_id,))
        return app

    # channels ---------------------------------------------------------------------------------
    def _row_to_channel(self, row: Sequence[Any]) -> Channel:
        return Channel(
            app_id=row[0],
            channel_type=ChannelType(row[1]),
            enabled=bool(row[2]),
            creation_date=row[3],
            last_modified_date=row[4],
            version=int(row[5]),
            settings=json.loads(row[6]),
        )

    _CHANNEL_SELECT = (
        "SELECT app_id, channel_type, enabled, creation_date, last_modified_date, version, "
        "settings FROM channels"
    )

    def put_channel(
        self,
        app_id: str,
        channel_type: ChannelType,
        enabled: bool | None,
        settings: Mapping[str, str | int | bool],
    ) -> Channel:
        now = iso_now()
        with self._write() as cur:
            self._get_app(cur, app_id)
            row = self._exec(
                cur,
                f"{self._CHANNEL_SELECT} WHERE app_id = ? AND channel_type = ?",
                (app_id, channel_type.value),
            ).fetchone()
            if row is None:
                channel = Channel(app_id, channel_type, bool(enabled), now, now, 1, dict(settings))
            else:
                old = self._row_to_channel(row)
                channel = Channel(
                    app_id,
                    channel_type,
                    old.enabled if enabled is None else enabled,
                    old.creation_date,
                    now,
                    old.version + 1,
                    {**old.settings, **settings},
                )
            self._exec(
                cur, "DELETE FROM channels WHERE app_id = ? AND channel_type = ?",
                (app_id, channel_type.value),
            )  # fmt: skip
            self._exec(
                cur,
                "INSERT INTO channels (app_id, channel_type, enabled, creation_date, "
                "last_modified_date, version, settings) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    app_id,
                    channel_type.value,
                    int(channel.enabled),
                    channel.creation_date,
                    channel.last_modified_date,
                    channel.version,
                    _dumps(dict(channel.settings)),
                ),
            )
        return channel

    def get_channel(self, app_id: str, channel_type: ChannelType) -> Channel:
        with self._read() as cur:
            self._get_app(cur, app_id)
            row = self._exec(
                cur,
                f"{self._CHANNEL_SELECT} WHERE app_id = ? AND channel_type = ?",
                (app_id, channel_type.value),
            ).fetchone()
        if row is None:
            raise NotFound(
                f"Resource not found: app {app_id!r} has no {channel_type.value} channel; "
                "create it with the Update...Channel operation"
            )
        return self._row_to_channel(row)

    def list_channels(self, app_id: str) -> list[Channel]:
        with self._read() as cur:
            self._get_app(cur, app_id)
            rows = self._exec(
                cur, f"{self._CHANNEL_SELECT} WHERE app_id = ? ORDER BY channel_type", (app_id,)
            ).fetchall()
        return [self._row_to_channel(r) for r in rows]

    def delete_channel(self, app_id: str, channel_type: ChannelType) -> Channel:
        channel = self.get_channel(app_id, channel_type)
        with self._write() as cur:
            self._exec(
                cur, "DELETE FROM channels WHERE app_id = ? AND channel_type = ?",
                (app_id, channel_type.value),
            )  # fmt: skip
        return channel

    # endpoints --------------------------------------------------------------------------------
    def _load(self, cur: Cursor, app_id: str, key: str) -> tuple[int, Endpoint] | None:
        row = self._exec(
            cur,
            f"SELECT pk, {_ENDPOINT_COLUMNS} FROM endpoints WHERE app_id = ? AND id_key = ?",
            (app_id, key),
        ).fetchone()
        return (int(row[0]), _row_to_endpoint(row[1:])) if row else None

    def _select_in(
        self,
        cur: Cursor,
        app_id: str,
        column: str,
        values: set[str],
        extra: str = "",
        held: Mapping[str, object] | None = None,
    ) -> list[tuple[int, Endpoint]]:
        """Endpoints of the app whose ``column`` is one of ``values``, in chunks.

        Rows whose id_key is in ``held`` are not decoded again.
        """
        held = held or {}
        found: list[tuple[int, Endpoint]] = []
        for chunk in _chunks(sorted(values)):
            marks = ", ".join("?" for _ in chunk)
            rows = self._exec(
                cur,
                f"SELECT pk, {_ENDPOINT_COLUMNS} FROM endpoints WHERE app_id = ? AND "
                f"{column} IN ({marks}){extra}",
                (app_id, *chunk),
            ).fetchall()
            found.extend((int(r[0]), _row_to_endpoint(r[1:])) for r in rows if r[3] not in held)
        return found

    def _next_pk(self, cur: Cursor) -> int:
        """The first primary key free for new endpoints (the write transaction holds the lock)."""
        row = self._exec(cur, "SELECT COALESCE(MAX(pk), 0) + 1 FROM endpoints").fetchone()
        return int(row[0])

    def _begin_batch(
        self, cur: Cursor, app_id: str, writes: Sequence[EndpointPatch | EndpointDelete]
    ) -> WriteBatch:
        """Read every row the writes can touch (see ``optsync.engine.writes``), in a few statements.

        The endpoints named by the writes; every ACTIVE endpoint at an address they set or
        hold (same-address deactivation); every endpoint of a UserId they set or hold (the
        per-user cap and UserAttributes); their tombstones and the app's attribute names.
        """
        names = {
            (k, n)
            for k, n in self._exec(
                cur, "SELECT kind, name FROM attribute_names WHERE app_id = ?", (app_id,)
            ).fetchall()
        }
        batch = WriteBatch(
            app_id=app_id,
            now=iso_now(),
            country=self.settings.country,
            next_pk=self._next_pk(cur),
            names=names,
        )
        keys = {endpoint_key(w.id) for w in writes}
        named = self._select_in(cur, app_id, "id_key", keys)
        batch.load(named)
        addresses, users = peers_to_read(writes, {endpoint_key(e.id): e for _, e in named})
        if addresses:
            active = " AND status = 'ACTIVE'"
            batch.load(self._select_in(cur, app_id, "address", addresses, active, batch.rows))
        if users:
            batch.load(self._select_in(cur, app_id, "user_id", users, "", batch.rows))
        positioned = sorted({endpoint_key(w.id) for w in writes if w.position is not None})
        for chunk in _chunks(positioned):
            marks = ", ".join("?" for _ in chunk)
            for key, position in self._exec(
                cur,
                f"SELECT id_key, position FROM tombstones WHERE app_id = ? AND id_key IN ({marks})",
                (app_id, *chunk),
            ).fetchall():
                batch.tombs[key] = position
        return batch

    def _rebuild_attribute_rows(self, cur: Cursor) -> None:
        """Write the attribute rows of every endpoint into an empty ``endpoint_attributes``."""
        rows = self._exec(cur, f"SELECT pk, {_ENDPOINT_COLUMNS} FROM endpoints").fetchall()
        attributes = [a for r in rows for a in _attribute_rows(int(r[0]), _row_to_endpoint(r[1:]))]
        if attributes:
            cur.executemany(self._sql(_INSERT_ATTRIBUTE), attributes)

    def _finish_batch(self, cur: Cursor, batch: WriteBatch) -> None:
        """Write the batch's outcome: endpoints, side rows, tombstones, history, rollup."""
        app_id = batch.app_id
        changed = batch.changed_rows()
        resided = [
            r for r in changed if r.stored is None or _side_of(r.stored) != _side_of(r.endpoint)
        ]
        stale_side = [r.pk for r in resided if r.stored is not None] + batch.deleted_pks
        for chunk in _chunks(sorted(stale_side)):
            marks = ", ".join("?" for _ in chunk)
            for table in ("endpoint_attributes", "endpoint_metrics"):
                self._exec(cur, f"DELETE FROM {table} WHERE endpoint_pk IN ({marks})", chunk)
        for chunk in _chunks(sorted(batch.deleted_pks)):
            marks = ", ".join("?" for _ in chunk)
            self._exec(cur, f"DELETE FROM endpoints WHERE pk IN ({marks})", chunk)
        # UPDATE sets only the columns that changed, so untouched indexes are left alone.
        updates: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for r in changed:
            if r.stored is not None:
                new, old = _endpoint_values(r.endpoint), _endpoint_values(r.stored)
                which = tuple(i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b)
                if which:
                    updates.setdefault(which, []).append((*(new[i] for i in which), r.pk))
        for which, params in updates.items():
            sets = ", ".join(f"{_COLUMN_NAMES[i]} = ?" for i in which)
            cur.executemany(self._sql(f"UPDATE endpoints SET {sets} WHERE pk = ?"), params)
        inserts = [(r.pk, *_endpoint_values(r.endpoint)) for r in changed if r.stored is None]
        if inserts:
            cur.executemany(self._sql(_INSERT_ENDPOINT), inserts)
        for r in changed:
            r.stored = r.endpoint
        attributes = [row for r in resided for row in _attribute_rows(r.pk, r.endpoint)]
        if attributes:
            cur.executemany(self._sql(_INSERT_ATTRIBUTE), attributes)
        metrics = [(r.pk, app_id, n, v) for r in resided for n, v in r.endpoint.metrics.items()]
        if metrics:
            cur.executemany(
                self._sql(
                    "INSERT INTO endpoint_metrics (endpoint_pk, app_id, name, value) "
                    "VALUES (?, ?, ?, ?)"
                ),
                metrics,
            )
        if batch.new_names:
            cur.executemany(
                self._sql("INSERT INTO attribute_names (app_id, kind, name) VALUES (?, ?, ?)"),
                [(app_id, k, n) for k, n in batch.new_names],
            )
        for chunk in _chunks(sorted(batch.tombs_removed)):
            marks = ", ".join("?" for _ in chunk)
            self._exec(
                cur,
                f"DELETE FROM tombstones WHERE app_id = ? AND id_key IN ({marks})",
                (app_id, *chunk),
            )
        if batch.tombs_written:
            cur.executemany(
                self._sql(
                    "INSERT INTO tombstones (app_id, id_key, position) VALUES (?, ?, ?) "
                    "ON CONFLICT (app_id, id_key) DO UPDATE SET position = excluded.position"
                ),
                [(app_id, k, p) for k, p in sorted(batch.tombs_written.items())],
            )
        if batch.history:
            cur.executemany(
                self._sql(
                    "INSERT INTO consent_history (app_id, endpoint_key, endpoint_id, at, "
                    "opt_out_before, opt_out_after, address, cause_kind, cause_ref) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                batch.history,
            )
        deltas = [(app_id, *b, n) for b, n in sorted(batch.counts.items()) if n]
        if deltas:
            cur.executemany(
                self._sql(
                    "INSERT INTO endpoint_counts (app_id, country_code, channel_type, status, "
                    "opt_out, n) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, country_code, "
                    "channel_type, status, opt_out) DO UPDATE SET n = endpoint_counts.n + "
                    "excluded.n"
                ),
                deltas,
            )
        self._written += len(changed)

    def _apply(
        self, batch: WriteBatch, writes: Sequence[EndpointPatch | EndpointDelete], cause: Cause
    ) -> WriteResult:
        applied = stale = missing = 0
        for write in writes:
            why = cause
            if write.position is not None and cause.kind is CauseKind.SOURCE:
                why = Cause(CauseKind.SOURCE, write.position)
            if isinstance(write, EndpointDelete):
                outcome = batch.delete(write, why)
                if outcome is False:
                    stale += 1
                elif outcome is None:
                    missing += 1
                else:
                    applied += 1
            elif batch.upsert(write, why):
                applied += 1
            else:
                stale += 1
        return WriteResult(applied=applied, stale=stale, missing=missing)

    def _write_job(self, cur: Cursor, job: _Job) -> WriteResult:
        self._get_app(cur, job.app_id)
        batch = self._begin_batch(cur, job.app_id, job.writes)
        result = self._apply(batch, job.writes, job.cause)
        self._finish_batch(cur, batch)
        return result

    def write_endpoints(
        self,
        app_id: str,
        writes: Sequence[EndpointPatch | EndpointDelete],
        cause: Cause,
        *,
        durable: bool = True,
    ) -> WriteResult:
        """Apply ``writes`` in one transaction; concurrent callers share one commit.

        Group commit: the first caller to find no transaction running takes every write
        request queued so far and applies each in a savepoint of one transaction (a request
        that fails is rolled back alone and gets its error); every caller returns once that
        transaction has committed. With one caller at a time this is one transaction per call.
        The shared commit waits for the disk when any of its requests is ``durable``.
        """
        job = _Job(app_id, writes, cause, durable)
        with self._group:
            self._queue.append(job)
            while not job.done:
                if self._leading:
                    self._group.wait()
                    continue
                self._leading = True
                jobs, self._queue = self._queue, []
                self._group.release()
                try:
                    self._run_group(jobs)
                finally:
                    self._group.acquire()
                    self._leading = False
                    self._group.notify_all()
        self._after_writes()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _run_group(self, jobs: list[_Job]) -> None:
        try:
            with self._write(durable=any(job.durable for job in jobs)) as cur:
                if len(jobs) == 1:
                    jobs[0].result = self._write_job(cur, jobs[0])
                    return
                for job in jobs:
                    self._exec(cur, "SAVEPOINT optsync_job")
                    try:
                        job.result = self._write_job(cur, job)
                    except Exception as exc:  # this request's error; the others go on
                        self._exec(cur, "ROLLBACK TO optsync_job")
                        job.error = exc
                    self._exec(cur, "RELEASE optsync_job")
        except BaseException as exc:  # the transaction failed: no request was applied
            for job in jobs:
                job.result, job.error = None, job.error or exc
        finally:
            for job in jobs:
                job.done = True

    def _after_writes(self) -> None:
        """Hook: a store may refresh planner statistics now and then."""

    def get_endpoint(self, app_id: str, endpoint_id: str) -> Endpoint:
        with self._read() as cur:
            self._get_app(cur, app_id)
            loaded = self._load(cur, app_id, endpoint_key(endpoint_id))
        if loaded is None:
            raise NotFound(f"Resource not found: app {app_id!r} has no endpoint {endpoint_id!r}")
        return loaded[1]

    def delete_endpoint(self, app_id: str, endpoint_id: str, cause: Cause) -> Endpoint:
        delete = EndpointDelete(endpoint_id)
        with self._write() as cur:
            self._get_app(cur, app_id)
            batch = self._begin_batch(cur, app_id, [delete])
            outcome = batch.delete(delete, cause)
            self._finish_batch(cur, batch)
        if not isinstance(outcome, Endpoint):
            raise NotFound(f"Resource not found: app {app_id!r} has no endpoint {endpoint_id!r}")
        return outcome

    def _user_endpoints(self, cur: Cursor, app_id: str, user_id: str) -> list[Endpoint]:
        rows = self._exec(
            cur,
            f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE app_id = ? AND user_id = ? "
            "ORDER BY creation_date, id_key",
            (app_id, user_id),
        ).fetchall()
        return [_row_to_endpoint(r) for r in rows]

    def get_user_endpoints(self, app_id: str, user_id: str) -> list[Endpoint]:
        with self._read() as cur:
            self._get_app(cur, app_id)
            found = self._user_endpoints(cur, app_id, user_id)
        if not found:
            raise NotFound(f"Resource not found: app {app_id!r} has no endpoints for that user")
        return found

    def delete_user_endpoints(self, app_id: str, user_id: str, cause: Cause) -> list[Endpoint]:
        with self._write() as cur:
            self._get_app(cur, app_id)
            found = self._user_endpoints(cur, app_id, user_id)
            if not found:
                raise NotFound(f"Resource not found: app {app_id!r} has no endpoints for that user")
            deletes = [EndpointDelete(e.id) for e in found]
            batch = self._begin_batch(cur, app_id, deletes)
            for delete in deletes:
                batch.delete(delete, cause)
            self._finish_batch(cur, batch)
        return found

    def find_endpoints(self, app_id: str, address: str, limit: int = 100) -> list[Endpoint]:
        with self._read() as cur:
            self._get_app(cur, app_id)
            rows = self._exec(
                cur,
                f"SELECT {_ENDPOINT_COLUMNS} FROM endpoints WHERE app_id = ? AND address = ? "
                "ORDER BY id_key LIMIT ?",
                (app_id, address, limit),
            ).fetchall()
        return [_row_to_endpoint(r) for r in rows]

    def consent_history(self, app_id: str, endpoint_id: str) -> list[ConsentChange]:
        with self._read() as cur:
            self._get_app(cur, app_id)
            rows = self._exec(
                cur,
                "SELECT endpoint_id, at, opt_out_before, opt_out_after, address, cause_kind, "
                "cause_ref FROM consent_history WHERE app_id = ? AND endpoint_key = ? ORDER BY seq",
                (app_id, endpoint_key(endpoint_id)),
            ).fetchall()
        if not rows:
            raise NotFound(
                f"Resource not found: app {app_id!r} has no history for endpoint {endpoint_id!r}"
            )
        return [
            ConsentChange(
                endpoint_id=r[0],
                at=r[1],
                opt_out_before=OptOut(r[2]) if r[2] else None,
                opt_out_after=OptOut(r[3]) if r[3] else None,
                address=r[4],
                cause=Cause(CauseKind(r[5]), r[6]),
            )
            for r in rows
        ]

    def count_endpoints(self, app_id: str) -> int:
        with self._read() as cur:
            row = self._exec(
                cur, "SELECT COUNT(*) FROM endpoints WHERE app_id = ?", (app_id,)
            ).fetchone()
        return int(row[0])

    # segments ---------------------------------------------------------------------------------
    _SEGMENT_SELECT = (
        "SELECT app_id, id, version, segment_type, creation_date, last_modified_date, "
        "definition, name, tags FROM segments"
    )

    def _row_to_segment(self, row: Sequence[Any]) -> Segment:
        definition = definition_from_wire(json.loads(row[6]), require_name=False)
        definition = SegmentDefinition(
            name=row[7],
            dimensions=definition.dimensions,
            groups=definition.groups,
            tags=json.loads(row[8]),
        )
        return Segment(
            app_id=row[0],
            id=row[1],
            arn=f"{self._app_arn(row[0])}/segments/{row[1]}",
            version=int(row[2]),
            segment_type=row[3],
            creation_date=row[4],
            last_modified_date=row[5],
            definition=definition,
        )

    def _insert_segment(self, cur: Cursor, segment: Segment) -> None:
        d = segment.definition
        self._exec(
            cur,
            "INSERT INTO segments (app_id, id, version, segment_type, creation_date, "
            "last_modified_date, definition, name, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                segment.app_id,
                segment.id,
                segment.version,
                segment.segment_type,
                segment.creation_date,
                segment.last_modified_date,
                _dumps(definition_to_wire(d)),
                d.name,
                _dumps(dict(d.tags)),
            ),
        )

    def _check_sources(self, cur: Cursor, app_id: str, definition: SegmentDefinition) -> None:
        """Compile once so that unknown source segments and cycles fail at write time."""
        compile_filter(
            definition,
            app_id=app_id,
            resolve=lambda sid, version: self._get_segment(cur, app_id, sid, version).definition,
            dialect=self.dialect,
        )

    def create_segment(self, app_id: str, definition: SegmentDefinition) -> Segment:
        now = iso_now()
        with self._write() as cur:
            self._get_app(cur, app_id)
            self._check_sources(cur, app_id, definition)
            segment_id = uuid.uuid4().hex
            segment = Segment(
                app_id=app_id,
                id=segment_id,
                arn=f"{self._app_arn(app_id)}/segments/{segment_id}",
                version=1,
                segment_type="DIMENSIONAL",
                creation_date=now,
                last_modified_date=now,
                definition=definition,
            )
            self._insert_segment(cur, segment)
        return segment

    def _get_segment(
        self, cur: Cursor, app_id: str, segment_id: str, version: int | None
    ) -> Segment:
        if version is None:
            row = self._exec(
                cur,
                f"{self._SEGMENT_SELECT} WHERE app_id = ? AND id = ? ORDER BY version DESC LIMIT 1",
                (app_id, segment_id),
            ).fetchone()
        else:
            row = self._exec(
                cur,
                f"{self._SEGMENT_SELECT} WHERE app_id = ? AND id = ? AND version = ?",
                (app_id, segment_id, version),
            ).fetchone()
        if row is None:
            what = f"segment {segment_id!r}" + (f" version {version}" if version else "")
            raise NotFound(f"Resource not found: app {app_id!r} has no {what}")
        return self._row_to_segment(row)

    def update_segment(
        self, app_id: str, segment_id: str, definition: SegmentDefinition
    ) -> Segment:
        with self._write() as cur:
            self._get_app(cur, app_id)
            latest = self._get_segment(cur, app_id, segment_id, None)
            old = latest.definition
            keep_filter = definition.dimensions is None and definition.groups is None
            merged = SegmentDefinition(
                name=definition.name if definition.name is not None else old.name,
                dimensions=old.dimensions if keep_filter else definition.dimensions,
                groups=old.groups if keep_filter else definition.groups,
                tags=definition.tags or old.tags,
            )
            self._check_sources(cur, app_id, merged)
            segment = Segment(
                app_id=app_id,
                id=segment_id,
                arn=latest.arn,
                version=latest.version + 1,
                segment_type=latest.segment_type,
                creation_date=latest.creation_date,
                last_modified_date=iso_now(),
                definition=merged,
            )
            self._insert_segment(cur, segment)
        return segment

    def get_segment(self, app_id: str, segment_id: str, version: int | None = None) -> Segment:
        with self._read() as cur:
            self._get_app(cur, app_id)
            return self._get_segment(cur, app_id, segment_id, version)

    def list_segments(self, app_id: str, page_size: int, token: str | None) -> Page[Segment]:
        offset = _offset(token)
        with self._read() as cur:
            self._get_app(cur, app_id)
            rows = self._exec(
                cur,
                f"{self._SEGMENT_SELECT} s WHERE app_id = ? AND version = (SELECT MAX(version) "
                "FROM segments x WHERE x.app_id = s.app_id AND x.id = s.id) "
                "ORDER BY creation_date, id LIMIT ? OFFSET ?",
                (app_id, page_size + 1, offset),
            ).fetchall()
        more = len(rows) > page_size
        return Page(
            tuple(self._row_to_segment(r) for r in rows[:page_size]),
            str(offset + page_size) if more else None,
        )

    def list_segment_versions(
        self, app_id: str, segment_id: str, page_size: int, token: str | None
    ) -> Page[Segment]:
        offset = _offset(token)
        with self._read() as cur:
            self._get_app(cur, app_id)
            self._get_segment(cur, app_id, segment_id, None)
            rows = self._exec(
                cur,
                f"{self._SEGMENT_SELECT} WHERE app_id = ? AND id = ? ORDER BY version "
                "LIMIT ? OFFSET ?",
                (app_id, segment_id, page_size + 1, offset),
            ).fetchall()
        more = len(rows) > page_size
        return Page(
            tuple(self._row_to_segment(r) for r in rows[:page_size]),
            str(offset + page_size) if more else None,
        )

    def delete_segment(self, app_id: str, segment_id: str) -> Segment:
        with self._write() as cur:
            self._get_app(cur, app_id)
            segment = self._get_segment(cur, app_id, segment_id, None)
            self._exec(
                cur, "DELETE FROM segments WHERE app_id = ? AND id = ?", (app_id, segment_id)
            )
        return segment

    def estimate_query(
        self, cur: Cursor, app_id: str, segment_id: str, version: int | None = None
    ) -> tuple[str, list[Any]]:
        """The one statement that counts a segment: (total, eligible).

        A filter on Country and channel only is answered from the ``endpoint_counts`` rollup
        (a handful of rows per app); any other filter counts ``endpoints`` through its indexes.
        """
        segment = self._get_segment(cur, app_id, segment_id, version)
        compiled = compile_segment(
            segment.definition,
            app_id=app_id,
            resolve=lambda sid, v: self._get_segment(cur, app_id, sid, v).definition,
            dialect=self.dialect,
        )
        driven = None
        if not compiled.reads_only(_ROLLUP_COLUMNS):
            driven = compile_driven(
                segment.definition,
                app_id=app_id,
                resolve=lambda sid, v: self._get_segment(cur, app_id, sid, v).definition,
                dialect=self.dialect,
            )
        if driven is not None and driven.rest.columns <= _ROLLUP_COLUMNS:
            # Every match has a row of the driving attribute, and each such row carries the
            # columns the rest of the filter and the eligibility test read.
            distinct = "DISTINCT " if driven.distinct else ""
            sql = (
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN e.status = 'ACTIVE' AND "
                "e.opt_out = 'NONE' THEN 1 ELSE 0 END), 0) FROM (SELECT "
                f"{distinct}d.endpoint_pk AS pk, d.country_code, d.channel_type, d.status, "
                f"d.opt_out FROM endpoint_attributes d WHERE {driven.driver_sql}) e "
                f"WHERE {driven.rest.sql}"
            )
            return sql, [*driven.driver_params, *driven.rest.params]
        if compiled.reads_only(_ROLLUP_COLUMNS):
            sql = (
                "SELECT COALESCE(SUM(e.n), 0), COALESCE(SUM(CASE WHEN e.status = 'ACTIVE' AND "
                "e.opt_out = 'NONE' THEN e.n ELSE 0 END), 0) FROM endpoint_counts e "
                f"WHERE e.app_id = ? AND ({compiled.sql})"
            )
        else:
            sql = (
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN e.status = 'ACTIVE' AND "
                "e.opt_out = 'NONE' THEN 1 ELSE 0 END), 0) FROM endpoints e "
                f"WHERE e.app_id = ? AND ({compiled.sql})"
            )
        return sql, [app_id, *compiled.params]

    def estimate_sql(
        self, app_id: str, segment_id: str, version: int | None = None
    ) -> tuple[str, list[Any]]:
        """The statement ``estimate`` runs, for EXPLAIN and benchmarks."""
        with self._read() as cur:
            self._get_app(cur, app_id)
            return self.estimate_query(cur, app_id, segment_id, version)

    def estimate(self, app_id: str, segment_id: str, version: int | None = None) -> Estimate:
        with self._read() as cur:
            self._get_app(cur, app_id)
            sql, params = self.estimate_query(cur, app_id, segment_id, version)
            total, eligible = self._exec(cur, sql, params).fetchone()
        return Estimate(total=int(total), eligible=int(eligible))
