"""``SqlStore``: the ``EndpointStore`` logic shared by the SQL databases.

Subclasses supply a connection (``_write``/``_read`` context managers yielding a DB-API cursor)
and a ``Dialect``; statements are written once, with ``?`` placeholders, and subclasses whose
driver wants another paramstyle rewrite them in ``_sql``. A database with several writers at once
(PostgreSQL) also overrides ``_lock_apps`` (every write that touches an app takes it first),
``_APP_SEQ``, ``_next_pk``/``_number_new_rows`` (primary keys) and ``_translate_error``; and may
spell value lists (``_chunks``/``_in``) and bulk inserts (``_insert``) its own faster way.

This file holds apps, channels and endpoints (the batched write path and group commit; captured
changes take the plain path of ``sql_plain.py``, ``SqlPlainWrites``);
segments and estimates are in ``sql_segments.py`` (``SqlSegments``, which ``SqlStore``
inherits), and the endpoint row conversions and statements in ``sql_rows.py``.
"""

from __future__ import annotations

import json
import threading
import uuid
from abc import abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from optsync.engine.endpoints import (
    CountryDerivation,
    check_nul,
    endpoint_key,
    has_nul,
)
from optsync.engine.models import (
    App,
    Cause,
    CauseKind,
    Channel,
    ChannelType,
    ConsentChange,
    Endpoint,
    EndpointDelete,
    EndpointPatch,
    OptOut,
    Page,
    WriteResult,
    iso_now,
)
from optsync.engine.plain_writes import NewRow
from optsync.engine.segments import Dialect
from optsync.engine.sql_bulk import SqlBulkImport
from optsync.engine.sql_keys import SqlApiKeys
from optsync.engine.sql_ledger import _CHANGE_COLUMNS, SqlLedger, _row_to_change
from optsync.engine.sql_plain import SqlPlainWrites
from optsync.engine.sql_rows import (
    _ATTRIBUTE_COLUMNS,
    _COLUMN_NAMES,
    _ENDPOINT_COLUMNS,
    _ENDPOINT_INSERT_COLUMNS,
    _HISTORY_COLUMNS,
    _attribute_rows,
    _chunks,
    _dumps,
    _endpoint_values,
    _insert_statement,
    _offset,
    _row_to_endpoint,
    _side_of,
)
from optsync.engine.sql_segments import SqlSegments
from optsync.engine.store import EndpointStore
from optsync.engine.writes import Bucket, Hold, Row, WriteBatch, peers_to_read
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


class SqlStore(SqlBulkImport, SqlSegments, SqlLedger, SqlApiKeys, SqlPlainWrites, EndpointStore):
    """Engine storage on a SQL database; see the module docstring."""

    dialect = Dialect()
    plain_writes = True
    """Write plain captured changes as rows (``plain_writes``); False sends every write through
    ``WriteBatch``, the reference the contract suite compares the plain path with."""

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

    def _chunks(self, values: Sequence[Any]) -> list[Sequence[Any]]:
        """``values`` cut into the lists one ``_in`` test takes (SQLite: 500 parameters)."""
        return _chunks(values)

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """The SQL test that ``column`` is one of ``values``, with its parameters."""
        return f"{column} IN ({', '.join('?' for _ in values)})", list(values)

    def _insert(
        self, cur: Cursor, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """INSERT ``rows`` into ``table`` (a store may have a faster bulk path)."""
        cur.executemany(self._sql(_insert_statement(table, tuple(columns))), rows)

    def _lock_apps(self, cur: Cursor, app_ids: Sequence[str]) -> None:
        """Hook: keep other writers off these apps until the transaction ends.

        Called first in every write transaction that reads and then writes an app's rows.
        SQLite needs nothing here: ``BEGIN IMMEDIATE`` already admits one writer at a time.
        """

    def _translate_error(self, exc: Exception) -> Exception:
        """Hook: the optsync error for a driver error raised inside one request."""
        return exc

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

    _APP_SEQ = "(SELECT COALESCE(MAX(seq), 0) + 1 FROM apps)"
    """The next creation-order number of ``apps`` (one writer at a time: the largest plus one)."""

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
                f"INSERT INTO apps (id, name, creation_date, tags, seq) VALUES (?, ?, ?, ?, "
                f"{self._APP_SEQ})",
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
            self._lock_apps(cur, [app_id])
            app = self._get_app(cur, app_id)
            for table in (
                "endpoint_attributes",
                "endpoint_metrics",
                "endpoints",
                "tombstones",
                "end_user_holds",
                "sink_waiting",
                "segments",
                "segment_members",
                "channels",
                "attribute_names",
                "endpoint_counts",
            ):
                self._exec(cur, f"DELETE FROM {table} WHERE app_id = ?", (app_id,))
            # The consent history and end users' opt-out reports stay: they are the evidence of
            # consent a sender must keep for years (docs/sinks.md).
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
            self._lock_apps(cur, [app_id])
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

    def _get_channel(self, cur: Cursor, app_id: str, channel_type: ChannelType) -> Channel:
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

    def get_channel(self, app_id: str, channel_type: ChannelType) -> Channel:
        with self._read() as cur:
            return self._get_channel(cur, app_id, channel_type)

    def list_channels(self, app_id: str) -> list[Channel]:
        with self._read() as cur:
            self._get_app(cur, app_id)
            rows = self._exec(
                cur, f"{self._CHANNEL_SELECT} WHERE app_id = ? ORDER BY channel_type", (app_id,)
            ).fetchall()
        return [self._row_to_channel(r) for r in rows]

    def delete_channel(self, app_id: str, channel_type: ChannelType) -> Channel:
        with self._write() as cur:
            self._lock_apps(cur, [app_id])
            channel = self._get_channel(cur, app_id, channel_type)
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
        for chunk in self._chunks(sorted(values)):
            test, params = self._in(column, chunk)
            rows = self._exec(
                cur,
                f"SELECT pk, {_ENDPOINT_COLUMNS} FROM endpoints WHERE app_id = ? AND {test}{extra}",
                (app_id, *params),
            ).fetchall()
            found.extend((int(r[0]), _row_to_endpoint(r[1:])) for r in rows if r[3] not in held)
        return found

    def _next_pk(self, cur: Cursor) -> int:
        """The first primary key free for new endpoints (the write transaction holds the lock).

        The batch numbers its new endpoints from here, in the order it creates them; a store
        whose keys come from elsewhere renumbers them in ``_number_new_rows``.
        """
        row = self._exec(cur, "SELECT COALESCE(MAX(pk), 0) + 1 FROM endpoints").fetchone()
        return int(row[0])

    def _number_new_rows(self, cur: Cursor, changed: Sequence[Row | NewRow]) -> None:
        """Hook: give the new rows among ``changed`` their final primary keys, in pk order.

        SQLite keeps the numbers ``_next_pk`` started: one writer at a time, so they are free.
        """

    def _begin_batch(
        self, cur: Cursor, app_id: str, writes: Sequence[EndpointPatch | EndpointDelete]
    ) -> WriteBatch:
        """Read every row the writes can touch (see ``optsync.engine.writes``), in a few statements.

        The endpoints named by the writes; every ACTIVE endpoint at an address they set or
        hold (same-address deactivation), every endpoint at an address an ACTIVE one may leave
        (the fallback); every endpoint of a UserId they set or hold (the
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
        peers = peers_to_read(writes, {endpoint_key(e.id): e for _, e in named})
        if peers.left:
            batch.load(self._select_in(cur, app_id, "address", peers.left, "", batch.rows))
        if addresses := peers.addresses - peers.left:
            active = " AND status = 'ACTIVE'"
            batch.load(self._select_in(cur, app_id, "address", addresses, active, batch.rows))
        if peers.users:
            batch.load(self._select_in(cur, app_id, "user_id", peers.users, "", batch.rows))
        positioned = sorted({endpoint_key(w.id) for w in writes if w.position is not None})
        for chunk in self._chunks(positioned):
            test, params = self._in("id_key", chunk)
            for key, position in self._exec(
                cur,
                f"SELECT id_key, position FROM tombstones WHERE app_id = ? AND {test}",
                (app_id, *params),
            ).fetchall():
                batch.tombs[key] = position
        keys_named = sorted(keys)
        for chunk in self._chunks(keys_named):
            test, params = self._in("id_key", chunk)
            for key, address, at, source_opt_out, detail in self._exec(
                cur,
                "SELECT id_key, address, at, source_opt_out, detail FROM end_user_holds "
                f"WHERE app_id = ? AND {test}",
                (app_id, *params),
            ).fetchall():
                batch.holds[key] = Hold(address, at, OptOut(source_opt_out), detail)
        return batch

    def _rebuild_attribute_rows(self, cur: Cursor) -> None:
        """Write the attribute rows of every endpoint into an empty ``endpoint_attributes``."""
        rows = self._exec(cur, f"SELECT pk, {_ENDPOINT_COLUMNS} FROM endpoints").fetchall()
        attributes = [a for r in rows for a in _attribute_rows(int(r[0]), _row_to_endpoint(r[1:]))]
        if attributes:
            self._insert(cur, "endpoint_attributes", _ATTRIBUTE_COLUMNS, attributes)

    def _finish_batch(self, cur: Cursor, batch: WriteBatch, *, numbered: bool = False) -> None:
        """Write the batch's outcome: endpoints, side rows, tombstones, history, rollup.

        ``numbered``: its new rows have their final keys already (``_finish_plain``)."""
        app_id = batch.app_id
        changed = batch.changed_rows()
        if not numbered:
            self._number_new_rows(cur, changed)
        resided = [
            r for r in changed if r.stored is None or _side_of(r.stored) != _side_of(r.endpoint)
        ]
        stale_side = [r.pk for r in resided if r.stored is not None] + batch.deleted_pks
        for chunk in self._chunks(sorted(stale_side)):
            test, params = self._in("endpoint_pk", chunk)
            for table in ("endpoint_attributes", "endpoint_metrics"):
                self._exec(cur, f"DELETE FROM {table} WHERE {test}", params)
        for chunk in self._chunks(sorted(batch.deleted_pks)):
            test, params = self._in("pk", chunk)
            self._exec(cur, f"DELETE FROM endpoints WHERE {test}", params)
        # UPDATE sets only the columns that changed, so untouched indexes are left alone.
        updates: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for r in changed:
            if r.stored is not None:
                new, old = _endpoint_values(r.endpoint), _endpoint_values(r.stored)
                which = tuple(i for i, (a, b) in enumerate(zip(new, old, strict=True)) if a != b)
                if which:
                    updates.setdefault(which, []).append((*(new[i] for i in which), r.pk))
        for which, params in updates.items():
            self._update_endpoints(cur, [_COLUMN_NAMES[i] for i in which], params)
        inserts = [(r.pk, *_endpoint_values(r.endpoint)) for r in changed if r.stored is None]
        if inserts:
            self._insert(cur, "endpoints", _ENDPOINT_INSERT_COLUMNS, inserts)
        for r in changed:
            r.stored = r.endpoint
        attributes = [row for r in resided for row in _attribute_rows(r.pk, r.endpoint)]
        if attributes:
            self._insert(cur, "endpoint_attributes", _ATTRIBUTE_COLUMNS, attributes)
        metrics = [(r.pk, app_id, n, v) for r in resided for n, v in r.endpoint.metrics.items()]
        if metrics:
            self._insert(
                cur, "endpoint_metrics", ("endpoint_pk", "app_id", "name", "value"), metrics
            )
        if batch.new_names:
            cur.executemany(
                self._sql("INSERT INTO attribute_names (app_id, kind, name) VALUES (?, ?, ?)"),
                [(app_id, k, n) for k, n in batch.new_names],
            )
        self._write_tombstones(cur, app_id, batch.tombs_removed, batch.tombs_written)
        if batch.history:
            self._insert(cur, "consent_history", _HISTORY_COLUMNS, batch.history)
        for chunk in self._chunks(sorted(batch.holds_removed)):
            test, params = self._in("id_key", chunk)
            self._exec(
                cur, f"DELETE FROM end_user_holds WHERE app_id = ? AND {test}", (app_id, *params)
            )
        if batch.holds_written:
            cur.executemany(
                self._sql(
                    "INSERT INTO end_user_holds (app_id, id_key, address, at, source_opt_out, "
                    "detail) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, id_key) DO UPDATE "
                    "SET address = excluded.address, at = excluded.at, source_opt_out = "
                    "excluded.source_opt_out, detail = excluded.detail"
                ),
                [
                    (app_id, k, h.address, h.at, h.source_opt_out, h.detail)
                    for k, h in sorted(batch.holds_written.items())
                ],
            )
        self._add_counts(cur, app_id, batch.counts)
        self._written += len(changed)

    def _write_tombstones(
        self, cur: Cursor, app_id: str, removed: set[str], written: Mapping[str, str]
    ) -> None:
        for chunk in self._chunks(sorted(removed)):
            test, params = self._in("id_key", chunk)
            self._exec(
                cur, f"DELETE FROM tombstones WHERE app_id = ? AND {test}", (app_id, *params)
            )
        if written:
            self._upsert_tombstones(cur, app_id, sorted(written.items()))

    def _upsert_tombstones(
        self, cur: Cursor, app_id: str, written: Sequence[tuple[str, str]]
    ) -> None:
        """Hook: write (id_key, position) tombstones; a tombstone never moves back."""
        cur.executemany(
            self._sql(
                "INSERT INTO tombstones (app_id, id_key, position) VALUES (?, ?, ?) "
                "ON CONFLICT (app_id, id_key) DO UPDATE SET "
                f"position = {self.dialect.greatest}(tombstones.position, excluded.position)"
            ),
            [(app_id, k, p) for k, p in written],
        )

    def _update_endpoints(
        self, cur: Cursor, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Hook: set ``columns`` of endpoints, each row holding their values then the pk."""
        sets = ", ".join(f"{c} = ?" for c in columns)
        cur.executemany(self._sql(f"UPDATE endpoints SET {sets} WHERE pk = ?"), rows)

    def _add_counts(self, cur: Cursor, app_id: str, counts: Mapping[Bucket, int]) -> None:
        """Move the rollup rows by ``counts``."""
        deltas = [(app_id, *b, n) for b, n in sorted(counts.items()) if n]
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

    def _apply(
        self, batch: WriteBatch, writes: Sequence[EndpointPatch | EndpointDelete], cause: Cause
    ) -> WriteResult:
        outcomes = Counter(self._apply_one(batch, write, cause) for write in writes)
        return WriteResult(
            applied=outcomes["applied"], stale=outcomes["stale"], missing=outcomes["missing"]
        )

    @staticmethod
    def _apply_one(
        batch: WriteBatch, write: EndpointPatch | EndpointDelete, cause: Cause
    ) -> Literal["applied", "stale", "missing"]:
        why = cause
        if write.position is not None and cause.kind is CauseKind.SOURCE:
            why = Cause(CauseKind.SOURCE, write.position)
        if isinstance(write, EndpointDelete):
            outcome = batch.delete(write, why)
            if outcome is False:
                return "stale"
            return "missing" if outcome is None else "applied"
        return "applied" if batch.upsert(write, why) else "stale"

    def _write_job(self, cur: Cursor, job: _Job) -> WriteResult:
        self._get_app(cur, job.app_id)
        for write in job.writes:  # before any statement: PostgreSQL refuses NUL in a parameter
            if isinstance(write, EndpointPatch):
                check_nul(write)
            elif has_nul(write.id):
                raise InvalidRequest("Id must not contain a NUL character (\\u0000)")
        if job.cause.kind is CauseKind.SOURCE and self.plain_writes:
            return self._write_source(cur, job.app_id, job.writes, job.cause)
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
                # Every app of the group at once, before any row is read (see ``_lock_apps``).
                self._lock_apps(cur, [job.app_id for job in jobs])
                if len(jobs) == 1:
                    jobs[0].result = self._write_job(cur, jobs[0])
                    return
                for job in jobs:
                    self._exec(cur, "SAVEPOINT optsync_job")
                    try:
                        job.result = self._write_job(cur, job)
                    except Exception as exc:  # this request's error; the others go on
                        self._exec(cur, "ROLLBACK TO optsync_job")
                        job.error = self._translate_error(exc)
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
            self._lock_apps(cur, [app_id])
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
            self._lock_apps(cur, [app_id])
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
                f"SELECT {_CHANGE_COLUMNS} FROM consent_history WHERE app_id = ? AND "
                "endpoint_key = ? ORDER BY seq",
                (app_id, endpoint_key(endpoint_id)),
            ).fetchall()
        if not rows:
            raise NotFound(
                f"Resource not found: app {app_id!r} has no history for endpoint {endpoint_id!r}"
            )
        return [_row_to_change(r) for r in rows]

    def count_endpoints(self, app_id: str) -> int:
        with self._read() as cur:
            row = self._exec(
                cur, "SELECT COUNT(*) FROM endpoints WHERE app_id = ?", (app_id,)
            ).fetchone()
        return int(row[0])
