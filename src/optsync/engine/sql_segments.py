"""``SqlSegments``: the segment half of ``SqlStore``: segment versions and estimates.

``SqlStore`` (``sql.py``) inherits it and supplies the hooks declared at the top of the class.
``estimate_query`` picks the one statement that counts a segment (see ``docs/engine.md``).

IMPORT segments (static, from an endpoint file) keep their member list in ``segment_members``:
one row per endpoint key (``endpoint_key``: the id case-folded), primary key (app_id,
segment_id, id_key), so the estimate and ``iter_endpoints`` walk the members in key order and
join each to ``endpoints`` through its (app_id, id_key) unique index. Members are not versioned
(every version of the segment has the same list) and are not tied to an endpoint row: a deleted
endpoint is simply not found by the join, and comes back if it is created again.
``SegmentDefinition.members`` marks an IMPORT segment's definition, so that a DIMENSIONAL
segment can use it as a source segment (the compiler turns it into a membership test).

The ``definition`` column holds optsync's stored form (``segments/stored.py``), not Pinpoint's
JSON: reading a segment runs no API validation, and a change to the API codec never
reinterprets a stored row. Name, tags and membership are read from their own columns.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import App, Endpoint, Estimate, Page, iso_now
from optsync.engine.segments import (
    Dialect,
    SegmentDefinition,
    compile_driven,
    compile_filter,
    compile_segment,
)
from optsync.engine.segments.stored import (
    decode_definition,
    encode_definition,
    upgrade_definition,
)
from optsync.engine.sql_rows import _COLUMN_NAMES, _dumps, _offset, _row_to_endpoint
from optsync.engine.store import ImportDefinition, Segment
from optsync.errors import InvalidRequest, NotFound

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor

__all__ = ("DEFINITION_ROWS", "DEFINITION_UPDATE", "SqlSegments", "upgraded_definitions")

_ROLLUP_COLUMNS = frozenset({"country_code", "channel_type"})

IMPORT = "IMPORT"
DIMENSIONAL = "DIMENSIONAL"
IMPORT_FORMATS = ("CSV", "JSON")

MEMBER_BATCH = 10_000
"""Member ids inserted per statement batch by ``create_import_segment``."""

DEFINITION_ROWS = "SELECT app_id, id, version, segment_type, definition, name, tags FROM segments"
"""The rows ``upgraded_definitions`` reads: every version of every segment."""
DEFINITION_UPDATE = "UPDATE segments SET definition = ? WHERE app_id = ? AND id = ? AND version = ?"
"""Writes one row of ``upgraded_definitions`` back (``?`` placeholders)."""


def upgraded_definitions(rows: Iterable[Sequence[Any]]) -> list[tuple[str, str, str, int]]:
    """(definition, app_id, id, version) for each row of ``DEFINITION_ROWS`` still in
    Pinpoint's wire JSON (schema 4 and older), its definition in the stored form.

    Used by both stores' migrations to schema 5; rows already converted are left out.
    """
    changed = []
    for app_id, segment_id, version, segment_type, text, name, tags in rows:
        stored = upgrade_definition(
            text,
            name=name,
            tags=json.loads(tags),
            members=segment_id if segment_type == IMPORT else None,
        )
        if stored != text:
            changed.append((stored, app_id, segment_id, int(version)))
    return changed


_E_COLUMNS = ", ".join(f"e.{c}" for c in _COLUMN_NAMES)
_ELIGIBLE = "e.status = 'ACTIVE' AND e.opt_out = 'NONE'"


class SqlSegments(ABC):
    """Segment CRUD and estimates on a SQL database, mixed into ``SqlStore``."""

    # hooks (``SqlStore`` implements them) -----------------------------------------------------
    dialect: Dialect

    @abstractmethod
    def _write(self, *, durable: bool = True) -> AbstractContextManager[Cursor]:
        """A cursor inside a write transaction that commits on success."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]:
        """A cursor for consistent reads."""

    @abstractmethod
    def _sql(self, sql: str) -> str:
        """``sql`` in the driver's paramstyle."""

    @abstractmethod
    def _exec(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor:
        """Run one statement on ``cur``."""

    @abstractmethod
    def _lock_apps(self, cur: Cursor, app_ids: Sequence[str]) -> None:
        """Keep other writers off these apps until the transaction ends."""

    @abstractmethod
    def _get_app(self, cur: Cursor, app_id: str) -> App:
        """Raise ``NotFound`` if there is no such app."""

    @abstractmethod
    def _app_arn(self, app_id: str) -> str: ...

    def _insert_members(
        self, cur: Cursor, app_id: str, segment_id: str, keys: Sequence[str]
    ) -> None:
        """Add member keys to an IMPORT segment; a key already there is skipped."""
        cur.executemany(
            self._sql(
                "INSERT INTO segment_members (app_id, segment_id, id_key) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING"
            ),
            [(app_id, segment_id, key) for key in keys],
        )

    # segments ---------------------------------------------------------------------------------
    _SEGMENT_SELECT = (
        "SELECT app_id, id, version, segment_type, creation_date, last_modified_date, "
        "definition, name, tags, import_format, import_url, import_external_id, import_size "
        "FROM segments"
    )

    def _row_to_segment(self, row: Sequence[Any]) -> Segment:
        definition = decode_definition(row[6])
        imported = row[3] == IMPORT
        definition = SegmentDefinition(
            name=row[7],
            dimensions=definition.dimensions,
            groups=definition.groups,
            tags=json.loads(row[8]),
            members=row[1] if imported else None,
        )
        source = None
        if imported:
            source = ImportDefinition(
                format=row[9], s3_url=row[10], external_id=row[11], size=int(row[12])
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
            import_definition=source,
        )

    def _insert_segment(self, cur: Cursor, segment: Segment) -> None:
        d = segment.definition
        source = segment.import_definition
        self._exec(
            cur,
            "INSERT INTO segments (app_id, id, version, segment_type, creation_date, "
            "last_modified_date, definition, name, tags, import_format, import_url, "
            "import_external_id, import_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                segment.app_id,
                segment.id,
                segment.version,
                segment.segment_type,
                segment.creation_date,
                segment.last_modified_date,
                encode_definition(d),
                d.name,
                _dumps(dict(d.tags)),
                source.format if source else None,
                source.s3_url if source else None,
                source.external_id if source else None,
                source.size if source else None,
            ),
        )

    def _counted(self, cur: Cursor, segment: Segment) -> Segment:
        """An IMPORT segment with its ChannelCounts: members that exist now, per channel."""
        source = segment.import_definition
        if source is None:
            return segment
        rows = self._exec(
            cur,
            "SELECT e.channel_type, COUNT(*) FROM segment_members m JOIN endpoints e "
            "ON e.app_id = m.app_id AND e.id_key = m.id_key WHERE m.app_id = ? AND "
            "m.segment_id = ? GROUP BY e.channel_type ORDER BY e.channel_type",
            (segment.app_id, segment.id),
        ).fetchall()
        counts = {str(channel): int(n) for channel, n in rows}
        return dataclasses.replace(
            segment, import_definition=dataclasses.replace(source, channel_counts=counts)
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
            self._lock_apps(cur, [app_id])
            self._get_app(cur, app_id)
            self._check_sources(cur, app_id, definition)
            segment_id = uuid.uuid4().hex
            segment = Segment(
                app_id=app_id,
                id=segment_id,
                arn=f"{self._app_arn(app_id)}/segments/{segment_id}",
                version=1,
                segment_type=DIMENSIONAL,
                creation_date=now,
                last_modified_date=now,
                definition=definition,
            )
            self._insert_segment(cur, segment)
        return segment

    def create_import_segment(
        self, app_id: str, name: str, endpoint_ids: Iterable[str], source: ImportDefinition
    ) -> Segment:
        if source.format not in IMPORT_FORMATS:
            raise InvalidRequest(
                f"ImportDefinition.Format must be CSV or JSON, not {source.format!r}"
            )
        if not name:
            raise InvalidRequest("Name is required: give the imported segment a name")
        now = iso_now()
        segment_id = uuid.uuid4().hex
        segment = Segment(
            app_id=app_id,
            id=segment_id,
            arn=f"{self._app_arn(app_id)}/segments/{segment_id}",
            version=1,
            segment_type=IMPORT,
            creation_date=now,
            last_modified_date=now,
            definition=SegmentDefinition(name=name, members=segment_id),
            import_definition=dataclasses.replace(source, channel_counts={}),
        )
        ids = iter(endpoint_ids)
        with self._write() as cur:
            self._lock_apps(cur, [app_id])
            self._get_app(cur, app_id)
            self._insert_segment(cur, segment)
            while batch := list(itertools.islice(ids, MEMBER_BATCH)):
                keys = []
                for endpoint_id in batch:
                    if not isinstance(endpoint_id, str) or not endpoint_id:
                        raise InvalidRequest(
                            f"endpoint ids of segment {name!r} must be non-empty strings, "
                            f"not {endpoint_id!r}"
                        )
                    keys.append(endpoint_key(endpoint_id))
                self._insert_members(cur, app_id, segment_id, keys)
            return self._counted(cur, segment)

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
            self._lock_apps(cur, [app_id])
            self._get_app(cur, app_id)
            latest = self._get_segment(cur, app_id, segment_id, None)
            old = latest.definition
            if latest.segment_type == IMPORT:
                for field, given in (
                    ("Dimensions", definition.dimensions),
                    ("SegmentGroups", definition.groups),
                ):
                    if given is not None:
                        raise InvalidRequest(
                            f"{field}: segment {segment_id!r} is an IMPORT segment, whose "
                            "members are the imported endpoints; only its Name and tags can "
                            "change. Create a segment with SegmentGroups whose SourceSegments "
                            "names this one to filter its members"
                        )
            keep_filter = definition.dimensions is None and definition.groups is None
            merged = SegmentDefinition(
                name=definition.name if definition.name is not None else old.name,
                dimensions=old.dimensions if keep_filter else definition.dimensions,
                groups=old.groups if keep_filter else definition.groups,
                tags=definition.tags or old.tags,
                members=old.members,
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
                import_definition=latest.import_definition,
            )
            self._insert_segment(cur, segment)
            return self._counted(cur, segment)

    def get_segment(self, app_id: str, segment_id: str, version: int | None = None) -> Segment:
        with self._read() as cur:
            self._get_app(cur, app_id)
            return self._counted(cur, self._get_segment(cur, app_id, segment_id, version))

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
            items = tuple(self._counted(cur, self._row_to_segment(r)) for r in rows[:page_size])
        more = len(rows) > page_size
        return Page(items, str(offset + page_size) if more else None)

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
            items = tuple(self._counted(cur, self._row_to_segment(r)) for r in rows[:page_size])
        more = len(rows) > page_size
        return Page(items, str(offset + page_size) if more else None)

    def delete_segment(self, app_id: str, segment_id: str) -> Segment:
        with self._write() as cur:
            self._lock_apps(cur, [app_id])
            self._get_app(cur, app_id)
            segment = self._counted(cur, self._get_segment(cur, app_id, segment_id, None))
            self._exec(
                cur, "DELETE FROM segments WHERE app_id = ? AND id = ?", (app_id, segment_id)
            )
            self._exec(
                cur,
                "DELETE FROM segment_members WHERE app_id = ? AND segment_id = ?",
                (app_id, segment_id),
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
        if segment.segment_type == IMPORT:
            # Members in key order, each joined to its endpoint by the (app_id, id_key) index.
            sql = (
                f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN {_ELIGIBLE} THEN 1 ELSE 0 END), 0) "
                "FROM segment_members m JOIN endpoints e ON e.app_id = m.app_id AND "
                "e.id_key = m.id_key WHERE m.app_id = ? AND m.segment_id = ?"
            )
            return sql, [app_id, segment_id]
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

    def _endpoint_page_query(
        self, cur: Cursor, app_id: str, segment_id: str | None, eligible_only: bool
    ) -> tuple[str, list[Any]]:
        """The keyset page statement of ``iter_endpoints`` and its parameters before the last
        key seen and the page size."""
        eligible = f" AND {_ELIGIBLE}" if eligible_only else ""
        self._get_app(cur, app_id)
        if segment_id is None:
            where, params = "", []
        else:
            segment = self._get_segment(cur, app_id, segment_id, None)
            if segment.segment_type == IMPORT:
                sql = (
                    f"SELECT e.id_key, {_E_COLUMNS} FROM segment_members m JOIN endpoints e ON "
                    "e.app_id = m.app_id AND e.id_key = m.id_key WHERE m.app_id = ? AND "
                    f"m.segment_id = ?{eligible} AND m.id_key > ? ORDER BY m.id_key LIMIT ?"
                )
                return sql, [app_id, segment_id]
            # The filter the estimate counts with, over ``endpoints e``.
            compiled = compile_segment(
                segment.definition,
                app_id=app_id,
                resolve=lambda sid, v: self._get_segment(cur, app_id, sid, v).definition,
                dialect=self.dialect,
            )
            where, params = f" AND ({compiled.sql})", compiled.params
        sql = (
            f"SELECT e.id_key, {_E_COLUMNS} FROM endpoints e WHERE e.app_id = ?{where}"
            f"{eligible} AND e.id_key > ? ORDER BY e.id_key LIMIT ?"
        )
        return sql, [app_id, *params]

    def iter_endpoints(
        self,
        app_id: str,
        *,
        segment_id: str | None = None,
        eligible_only: bool = False,
        batch: int = 1000,
    ) -> Iterator[Endpoint]:
        if batch < 1:
            raise InvalidRequest(f"batch must be at least 1, not {batch}")
        with self._read() as cur:
            sql, params = self._endpoint_page_query(cur, app_id, segment_id, eligible_only)
        return self._endpoint_pages(sql, params, batch)

    def _endpoint_pages(self, sql: str, params: list[Any], batch: int) -> Iterator[Endpoint]:
        last = ""  # ids are never empty: every key sorts after this one
        while True:
            # One read per page, ended before the caller sees its rows: nothing (SQLite's
            # lock, a pooled connection) is held while the caller works.
            with self._read() as cur:
                rows = self._exec(cur, sql, [*params, last, batch]).fetchall()
            for row in rows:
                yield _row_to_endpoint(row[1:])
            if len(rows) < batch:
                return
            last = rows[-1][0]
