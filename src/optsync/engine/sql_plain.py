"""Captured changes in one pass: plain writes as rows, the others through ``WriteBatch``.

The ``SqlStore`` half of ``engine/plain_writes.py``: the narrow reads a batch of captured
changes needs (the endpoints it names, their end-user holds and tombstones, and the stored
endpoints its plain candidates would meet at an address or a UserId), the pass over the writes
in their order, and the bulk statements that write the outcome. ``SqlStore`` supplies the hooks
declared at the top of the class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from optsync.engine.endpoints import endpoint_key
from optsync.engine.models import Cause, EndpointDelete, EndpointPatch, WriteResult, iso_now
from optsync.engine.plain_writes import (
    INSERTED,
    STORED_COLUMNS,
    UPDATABLE,
    NewRow,
    PlainPlan,
    Sharing,
    Stored,
    share,
)
from optsync.engine.sql_rows import _HISTORY_COLUMNS
from optsync.engine.writes import Bucket, Row, WriteBatch

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor, StoreSettings

__all__ = ("SqlPlainWrites",)


class SqlPlainWrites(ABC):
    """Writes a batch of captured changes; see the module docstring."""

    settings: StoreSettings
    _written: int

    # hooks (``SqlStore`` implements them) -----------------------------------------------------
    @abstractmethod
    def _exec(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    @abstractmethod
    def _sql(self, sql: str) -> str: ...

    @abstractmethod
    def _chunks(self, values: Sequence[Any]) -> list[Sequence[Any]]: ...

    @abstractmethod
    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]: ...

    @abstractmethod
    def _insert(
        self, cur: Cursor, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None: ...

    @abstractmethod
    def _next_pk(self, cur: Cursor) -> int: ...

    @abstractmethod
    def _number_new_rows(self, cur: Cursor, changed: Sequence[Row | NewRow]) -> None: ...

    @abstractmethod
    def _begin_batch(
        self, cur: Cursor, app_id: str, writes: Sequence[EndpointPatch | EndpointDelete]
    ) -> WriteBatch: ...

    @abstractmethod
    def _finish_batch(self, cur: Cursor, batch: WriteBatch, *, numbered: bool = False) -> None: ...

    @staticmethod
    @abstractmethod
    def _apply_one(
        batch: WriteBatch, write: EndpointPatch | EndpointDelete, cause: Cause
    ) -> Literal["applied", "stale", "missing"]: ...

    @abstractmethod
    def _write_tombstones(
        self, cur: Cursor, app_id: str, removed: set[str], written: Mapping[str, str]
    ) -> None: ...

    @abstractmethod
    def _add_counts(self, cur: Cursor, app_id: str, counts: Mapping[Bucket, int]) -> None: ...

    @abstractmethod
    def _update_endpoints(
        self, cur: Cursor, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None: ...

    # the pass ---------------------------------------------------------------------------------
    def _write_source(
        self,
        cur: Cursor,
        app_id: str,
        writes: Sequence[EndpointPatch | EndpointDelete],
        cause: Cause,
    ) -> WriteResult:
        """Captured changes in one pass, in their order: the plain ones (``plain_writes``) as
        rows from a narrow read, the others through ``WriteBatch``; they share no endpoint,
        address or user, and append to one history list."""
        keys = [endpoint_key(w.id) for w in writes]
        stored: dict[str, Stored] = {}
        held: set[str] = set()
        for chunk in self._chunks(sorted(set(keys))):
            test, params = self._in("id_key", chunk)
            for row in self._exec(
                cur,
                f"SELECT {STORED_COLUMNS} FROM endpoints WHERE app_id = ? AND {test}",
                (app_id, *params),
            ).fetchall():
                found = Stored._make(row)
                stored[found.key] = found
            held.update(
                k
                for (k,) in self._exec(
                    cur,
                    f"SELECT id_key FROM end_user_holds WHERE app_id = ? AND {test}",
                    (app_id, *params),
                ).fetchall()
            )
        sharing = share(writes, keys, stored, held)
        self._settle(cur, app_id, sharing)
        plain = sharing.plain
        general = [w for w, p in zip(writes, plain, strict=True) if not p]
        batch = self._begin_batch(cur, app_id, general) if general else None
        tombs: dict[str, str] = {}
        plain_keys = sorted({k for k, p in zip(keys, plain, strict=True) if p})
        for chunk in self._chunks(plain_keys):
            test, params = self._in("id_key", chunk)
            tombs.update(
                self._exec(
                    cur,
                    f"SELECT id_key, position FROM tombstones WHERE app_id = ? AND {test}",
                    (app_id, *params),
                ).fetchall()
            )
        plan = PlainPlan(
            app_id=app_id,
            now=batch.now if batch else iso_now(),
            country=self.settings.country,
            stored=stored,
            tombs=tombs,
            next_pk=batch.next_pk if batch else self._next_pk(cur),
            history=batch.history if batch else [],
        )
        outcomes: Counter[str] = Counter()
        for write, key, is_plain in zip(writes, keys, plain, strict=True):
            if is_plain:
                if isinstance(write, EndpointDelete):
                    done = plan.delete(write, key)
                    outcomes["missing" if done is None else "applied" if done else "stale"] += 1
                else:
                    outcomes["applied" if plan.upsert(write, key) else "stale"] += 1
                continue
            assert batch is not None
            batch.next_pk = plan.next_pk  # one numbering: rows in the order they were created
            outcomes[self._apply_one(batch, write, cause)] += 1
            plan.next_pk = batch.next_pk
        self._finish_plain(cur, plan, batch)
        return WriteResult(
            applied=outcomes["applied"], stale=outcomes["stale"], missing=outcomes["missing"]
        )

    def _settle(self, cur: Cursor, app_id: str, sharing: Sharing) -> None:
        """Check the plain candidates against the stored endpoints at the addresses they are
        given or may leave and of the UserIds they join (``Sharing.settle``)."""
        active: dict[str, set[str]] = {}
        present: dict[str, set[str]] = {}
        for chunk in self._chunks(sorted(sharing.addresses.keys() | sharing.left.keys())):
            test, params = self._in("address", chunk)
            for address, key, status in self._exec(
                cur,
                f"SELECT address, id_key, status FROM endpoints WHERE app_id = ? AND {test}",
                (app_id, *params),
            ).fetchall():
                present.setdefault(address, set()).add(key)
                if status == "ACTIVE":
                    active.setdefault(address, set()).add(key)
        members: dict[str, set[str]] = {}
        for chunk in self._chunks(sorted(sharing.users)):
            test, params = self._in("user_id", chunk)
            for user, key in self._exec(
                cur,
                f"SELECT user_id, id_key FROM endpoints WHERE app_id = ? AND {test}",
                (app_id, *params),
            ).fetchall():
                members.setdefault(user, set()).add(key)
        if present or members:
            sharing.settle(active, present, members)

    def _finish_plain(self, cur: Cursor, plan: PlainPlan, batch: WriteBatch | None) -> None:
        """Write the plain writes' rows, then the batch's (with the shared history)."""
        app_id = plan.app_id
        inserts, updates = plan.outcome()
        changed = batch.changed_rows() if batch else []
        self._number_new_rows(cur, [*inserts, *changed])
        for chunk in self._chunks(sorted(plan.deleted_pks)):
            test, params = self._in("pk", chunk)
            self._exec(cur, f"DELETE FROM endpoints WHERE {test}", params)
        for which, params in updates.items():
            self._update_endpoints(cur, [UPDATABLE[i] for i in which], params)
        if inserts:
            self._insert(cur, "endpoints", INSERTED, [(r.pk, *r.values) for r in inserts])
        self._write_tombstones(cur, app_id, plan.tombs_removed, plan.tombs_written)
        self._written += len(inserts) + len(plan.deleted_pks)
        self._written += sum(len(rows) for rows in updates.values())
        if batch is not None:
            batch.counts.update(plan.counts)
            self._finish_batch(cur, batch, numbered=True)
            return
        if plan.history:
            self._insert(cur, "consent_history", _HISTORY_COLUMNS, plan.history)
        self._add_counts(cur, app_id, plan.counts)
