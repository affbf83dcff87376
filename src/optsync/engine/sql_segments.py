"""``SqlSegments``: the segment half of ``SqlStore``: segment versions and estimates.

``SqlStore`` (``sql.py``) inherits it and supplies the hooks declared at the top of the class.
``estimate_query`` picks the one statement that counts a segment (see ``docs/engine.md``).
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from optsync.engine.models import App, Estimate, Page, iso_now
from optsync.engine.segments import (
    Dialect,
    SegmentDefinition,
    compile_driven,
    compile_filter,
    compile_segment,
    definition_from_wire,
    definition_to_wire,
)
from optsync.engine.sql_rows import _dumps, _offset
from optsync.engine.store import Segment
from optsync.errors import NotFound

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor

__all__ = ("SqlSegments",)

_ROLLUP_COLUMNS = frozenset({"country_code", "channel_type"})


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
            self._lock_apps(cur, [app_id])
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
            self._lock_apps(cur, [app_id])
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
            self._lock_apps(cur, [app_id])
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
