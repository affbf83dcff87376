"""``SqlLedger``: the consent ledger (``optsync.engine.ledger``) on a SQL database, mixed into
``SqlStore``, which supplies the hooks declared at the top of the class.

The tables (``ledger_schema``) live beside the endpoints, so a sink's cursor, its deliveries and
its dead letters are written in one transaction, and an end user's opt-out changes endpoints
and keeps its report in one transaction too.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from optsync.engine.endpoints import endpoint_key
from optsync.engine.ledger import (
    AuditRow,
    ConsentLedger,
    EndUserOptOut,
    SinkDeadLetter,
    SinkProgress,
    SinkState,
    SinkWaiting,
)
from optsync.engine.models import (
    App,
    Cause,
    CauseKind,
    ChannelType,
    ConsentChange,
    EndpointDelete,
    EndpointPatch,
    OptOut,
    iso_now,
)
from optsync.engine.writes import WriteBatch

if TYPE_CHECKING:
    from optsync.engine.sql import Cursor

__all__ = ("LEDGER_HISTORY_COLUMNS", "SqlLedger", "ledger_schema")

LEDGER_HISTORY_COLUMNS = (
    "channel_type {text}",
    "user_id {text}",
    "source_time {text}",
    "cause_detail {text} NOT NULL DEFAULT ''",
    "address_before {text}",
)
"""Columns the consent ledger added to ``consent_history`` (for ``ALTER TABLE ... ADD``; format
``text`` with the text type)."""


def ledger_schema(text: str, serial: str) -> str:
    """The ledger's tables: ``text`` is the text type, ``serial`` an auto-numbered key column.

    Statements end with ``;`` each (a store that runs them one by one splits there).
    """
    return f"""
CREATE TABLE IF NOT EXISTS end_user_holds (
    app_id {text} NOT NULL,
    id_key {text} NOT NULL,
    address {text} NOT NULL,
    at {text} NOT NULL,
    source_opt_out {text} NOT NULL,
    detail {text} NOT NULL,
    PRIMARY KEY (app_id, id_key)
);
CREATE TABLE IF NOT EXISTS end_user_opt_outs (
    seq {serial},
    app_id {text} NOT NULL,
    address {text} NOT NULL,
    at {text} NOT NULL,
    via {text} NOT NULL,
    keyword {text},
    recorded_at {text} NOT NULL,
    endpoint_ids {text} NOT NULL,
    written_back_at {text},
    writeback_error {text},
    UNIQUE (app_id, address, at, via)
);
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink {text} NOT NULL,
    app_id {text} NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (sink, app_id)
);
CREATE TABLE IF NOT EXISTS sink_leases (
    name {text} PRIMARY KEY,
    holder {text} NOT NULL,
    until_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS sink_deliveries (
    sink {text} NOT NULL,
    app_id {text} NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    outcome {text} NOT NULL,
    at {text} NOT NULL
);
CREATE INDEX IF NOT EXISTS sink_deliveries_seq ON sink_deliveries (sink, app_id, last_seq);
CREATE TABLE IF NOT EXISTS sink_dead_letters (
    sink {text} NOT NULL,
    app_id {text} NOT NULL,
    seq bigint NOT NULL,
    reason {text} NOT NULL,
    at {text} NOT NULL,
    PRIMARY KEY (sink, app_id, seq)
);
CREATE TABLE IF NOT EXISTS sink_waiting (
    sink {text} NOT NULL,
    app_id {text} NOT NULL,
    wait_key {text} NOT NULL,
    seq bigint NOT NULL,
    not_before double precision NOT NULL,
    reason {text} NOT NULL,
    since {text} NOT NULL,
    PRIMARY KEY (sink, app_id, wait_key)
);
"""


_CHANGE_COLUMNS = (
    "seq, app_id, endpoint_id, at, opt_out_before, opt_out_after, address, cause_kind, "
    "cause_ref, channel_type, user_id, source_time, cause_detail, address_before"
)
_CHANNELS = {c.value: c for c in ChannelType}


def _row_to_change(r: Sequence[Any]) -> ConsentChange:
    return ConsentChange(
        seq=int(r[0]),
        app_id=r[1],
        endpoint_id=r[2],
        at=r[3],
        opt_out_before=OptOut(r[4]) if r[4] else None,
        opt_out_after=OptOut(r[5]) if r[5] else None,
        address=r[6],
        cause=Cause(CauseKind(r[7]), r[8], r[12] or ""),
        channel_type=_CHANNELS.get(r[9]) if r[9] else None,
        user_id=r[10],
        source_time=r[11],
        address_before=r[13],
    )


def _row_to_report(r: Sequence[Any]) -> EndUserOptOut:
    return EndUserOptOut(
        seq=int(r[0]),
        app_id=r[1],
        address=r[2],
        at=r[3],
        via=r[4],
        keyword=r[5],
        recorded_at=r[6],
        endpoint_ids=tuple(i for i in r[7].split("\n") if i),
        written_back_at=r[8],
        writeback_error=r[9],
    )


_REPORT_COLUMNS = (
    "seq, app_id, address, at, via, keyword, recorded_at, endpoint_ids, written_back_at, "
    "writeback_error"
)


class SqlLedger(ConsentLedger, ABC):
    """The consent ledger on a SQL database; see the module docstring."""

    # hooks (``SqlStore`` implements them) -----------------------------------------------------
    @abstractmethod
    def _write(self, *, durable: bool = True) -> AbstractContextManager[Cursor]: ...

    @abstractmethod
    def _read(self) -> AbstractContextManager[Cursor]: ...

    @abstractmethod
    def _exec(self, cur: Cursor, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    @abstractmethod
    def _sql(self, sql: str) -> str: ...

    @abstractmethod
    def _lock_apps(self, cur: Cursor, app_ids: Sequence[str]) -> None: ...

    @abstractmethod
    def _get_app(self, cur: Cursor, app_id: str) -> App: ...

    @abstractmethod
    def _begin_batch(
        self, cur: Cursor, app_id: str, writes: Sequence[EndpointPatch | EndpointDelete]
    ) -> WriteBatch: ...

    @abstractmethod
    def _finish_batch(self, cur: Cursor, batch: WriteBatch) -> None: ...

    # end users' opt-outs ----------------------------------------------------------------------
    def record_end_user_opt_out(
        self,
        app_id: str,
        address: str,
        at: str,
        via: str,
        keyword: str | None = None,
        channels: Sequence[ChannelType] = (ChannelType.SMS, ChannelType.VOICE),
    ) -> EndUserOptOut | None:
        detail = f"{via}" + (f", keyword {keyword}" if keyword else "") + f", opted out at {at}"
        cause = Cause(CauseKind.END_USER, via, detail)
        with self._write() as cur:
            self._lock_apps(cur, [app_id])
            self._get_app(cur, app_id)
            known = self._exec(
                cur,
                "SELECT 1 FROM end_user_opt_outs WHERE app_id = ? AND address = ? AND at = ? "
                "AND via = ?",
                (app_id, address, at, via),
            ).fetchone()
            if known is not None:
                return None
            ids = [
                r[0]
                for r in self._exec(
                    cur,
                    "SELECT id FROM endpoints WHERE app_id = ? AND address = ? ORDER BY id_key",
                    (app_id, address),
                ).fetchall()
            ]
            batch = self._begin_batch(cur, app_id, [EndpointPatch(id=i) for i in ids])
            stopped = [
                e.endpoint.id
                for e in list(batch.rows.values())
                if e.endpoint.address == address and e.endpoint.channel_type in channels
            ]
            for endpoint_id in stopped:
                batch.stop(endpoint_key(endpoint_id), at, cause)
            self._finish_batch(cur, batch)
            recorded_at = iso_now()
            self._exec(
                cur,
                "INSERT INTO end_user_opt_outs (app_id, address, at, via, keyword, recorded_at, "
                "endpoint_ids) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (app_id, address, at, via, keyword, recorded_at, "\n".join(sorted(stopped))),
            )
            row = self._exec(
                cur,
                f"SELECT {_REPORT_COLUMNS} FROM end_user_opt_outs WHERE app_id = ? AND "
                "address = ? AND at = ? AND via = ?",
                (app_id, address, at, via),
            ).fetchone()
        return _row_to_report(row)

    def end_user_opt_outs(
        self, app_id: str, *, pending_writeback: bool = False, limit: int = 1000
    ) -> list[EndUserOptOut]:
        pending = " AND written_back_at IS NULL" if pending_writeback else ""
        with self._read() as cur:
            rows = self._exec(
                cur,
                f"SELECT {_REPORT_COLUMNS} FROM end_user_opt_outs WHERE app_id = ?{pending} "
                "ORDER BY seq LIMIT ?",
                (app_id, limit),
            ).fetchall()
        return [_row_to_report(r) for r in rows]

    def known_end_user_opt_outs(self, app_id: str, via: str) -> set[tuple[str, str]]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT address, at FROM end_user_opt_outs WHERE app_id = ? AND via = ?",
                (app_id, via),
            ).fetchall()
        return {(r[0], r[1]) for r in rows}

    def mark_written_back(self, seq: int, at: str | None, error: str | None = None) -> None:
        with self._write() as cur:
            self._exec(
                cur,
                "UPDATE end_user_opt_outs SET written_back_at = ?, writeback_error = ? "
                "WHERE seq = ?",
                (at, error, seq),
            )

    # the outbox -------------------------------------------------------------------------------
    def consent_changes(
        self, app_id: str, after: int, limit: int, seqs: Sequence[int] | None = None
    ) -> list[ConsentChange]:
        with self._read() as cur:
            if seqs is not None:
                if not seqs:
                    return []
                marks = ", ".join("?" for _ in seqs)
                rows = self._exec(
                    cur,
                    f"SELECT {_CHANGE_COLUMNS} FROM consent_history WHERE app_id = ? AND "
                    f"seq IN ({marks}) ORDER BY seq",
                    (app_id, *seqs),
                ).fetchall()
            else:
                rows = self._exec(
                    cur,
                    f"SELECT {_CHANGE_COLUMNS} FROM consent_history WHERE app_id = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (app_id, after, limit),
                ).fetchall()
        return [_row_to_change(r) for r in rows]

    def claim_lease(self, name: str, holder: str, ttl: float) -> bool:
        now_ms = int(time.time() * 1000)
        with self._write() as cur:
            row = self._exec(
                cur, "SELECT holder, until_ms FROM sink_leases WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                self._exec(
                    cur,
                    "INSERT INTO sink_leases (name, holder, until_ms) VALUES (?, ?, ?) "
                    "ON CONFLICT (name) DO NOTHING",
                    (name, holder, now_ms + int(ttl * 1000)),
                )
            elif row[0] == holder or int(row[1]) < now_ms:
                self._exec(
                    cur,
                    "UPDATE sink_leases SET holder = ?, until_ms = ? WHERE name = ? AND "
                    "holder = ? AND until_ms = ?",
                    (holder, now_ms + int(ttl * 1000), name, row[0], row[1]),
                )
            else:
                return False
            held = self._exec(
                cur, "SELECT holder FROM sink_leases WHERE name = ?", (name,)
            ).fetchone()
        return held is not None and held[0] == holder

    def release_lease(self, name: str, holder: str) -> None:
        with self._write() as cur:
            self._exec(cur, "DELETE FROM sink_leases WHERE name = ? AND holder = ?", (name, holder))

    def sink_cursor(self, sink: str, app_id: str) -> int:
        with self._read() as cur:
            return self._cursor(cur, sink, app_id)

    def _cursor(self, cur: Cursor, sink: str, app_id: str) -> int:
        row = self._exec(
            cur, "SELECT seq FROM sink_cursors WHERE sink = ? AND app_id = ?", (sink, app_id)
        ).fetchone()
        return int(row[0]) if row else 0

    def save_sink_progress(self, sink: str, holder: str, progress: SinkProgress) -> bool:
        p = progress
        now = iso_now()
        with self._write() as cur:
            lease = self._exec(
                cur, "SELECT holder FROM sink_leases WHERE name = ?", (f"sink:{sink}",)
            ).fetchone()
            if lease is None or lease[0] != holder:
                return False
            if p.cursor > self._cursor(cur, sink, p.app_id):
                self._exec(
                    cur,
                    "INSERT INTO sink_cursors (sink, app_id, seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (sink, app_id) DO UPDATE SET seq = excluded.seq",
                    (sink, p.app_id, p.cursor),
                )
            if p.delivered:
                cur.executemany(
                    self._sql(
                        "INSERT INTO sink_deliveries (sink, app_id, first_seq, last_seq, "
                        "outcome, at) VALUES (?, ?, ?, ?, ?, ?)"
                    ),
                    [(sink, p.app_id, a, b, str(o), now) for a, b, o in p.delivered],
                )
            if p.done_dead:
                cur.executemany(
                    self._sql(
                        "DELETE FROM sink_dead_letters WHERE sink = ? AND app_id = ? AND seq = ?"
                    ),
                    [(sink, p.app_id, s) for s in p.done_dead],
                )
            if p.dead:
                cur.executemany(
                    self._sql(
                        "INSERT INTO sink_dead_letters (sink, app_id, seq, reason, at) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (sink, app_id, seq) DO UPDATE SET "
                        "reason = excluded.reason, at = excluded.at"
                    ),
                    [(sink, p.app_id, s, reason, now) for s, reason in p.dead],
                )
            if p.done_waiting:
                cur.executemany(
                    self._sql(
                        "DELETE FROM sink_waiting WHERE sink = ? AND app_id = ? AND wait_key = ?"
                    ),
                    [(sink, p.app_id, k) for k in p.done_waiting],
                )
            if p.waiting:
                cur.executemany(
                    self._sql(
                        "INSERT INTO sink_waiting (sink, app_id, wait_key, seq, not_before, "
                        "reason, since) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sink, app_id, "
                        "wait_key) DO UPDATE SET seq = excluded.seq, not_before = "
                        "excluded.not_before, reason = excluded.reason"
                    ),
                    [
                        (sink, p.app_id, w.key, w.seq, w.not_before, w.reason, w.since)
                        for w in p.waiting
                    ],
                )
        return True

    def sink_states(self, sink: str) -> list[SinkState]:
        states: list[SinkState] = []
        with self._read() as cur:
            apps = [r[0] for r in self._exec(cur, "SELECT id FROM apps ORDER BY seq").fetchall()]
            lease = self._exec(
                cur,
                "SELECT holder, until_ms FROM sink_leases WHERE name = ?",
                (f"sink:{sink}",),
            ).fetchone()
            holder = lease[0] if lease and int(lease[1]) >= time.time() * 1000 else None
            for app_id in apps:
                cursor = self._cursor(cur, sink, app_id)
                head, behind, oldest = self._exec(
                    cur,
                    "SELECT (SELECT COALESCE(MAX(seq), 0) FROM consent_history WHERE app_id = ?), "
                    "COUNT(*), MIN(at) FROM consent_history WHERE app_id = ? AND seq > ?",
                    (app_id, app_id, cursor),
                ).fetchone()
                dead = self._exec(
                    cur,
                    "SELECT COUNT(*) FROM sink_dead_letters WHERE sink = ? AND app_id = ?",
                    (sink, app_id),
                ).fetchone()[0]
                waiting, next_end = self._exec(
                    cur,
                    "SELECT COUNT(*), MIN(not_before) FROM sink_waiting WHERE sink = ? AND "
                    "app_id = ?",
                    (sink, app_id),
                ).fetchone()
                last = self._exec(
                    cur,
                    "SELECT MAX(at) FROM sink_deliveries WHERE sink = ? AND app_id = ?",
                    (sink, app_id),
                ).fetchone()[0]
                states.append(
                    SinkState(
                        sink=sink,
                        app_id=app_id,
                        cursor=cursor,
                        head=int(head),
                        behind=int(behind),
                        oldest_behind=oldest,
                        dead_letters=int(dead),
                        waiting=int(waiting),
                        next_wait_end=float(next_end) if next_end is not None else None,
                        last_delivery=last,
                        holder=holder,
                    )
                )
        return states

    def sink_dead_letters(self, sink: str, limit: int = 100) -> list[SinkDeadLetter]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT app_id, seq, reason, at FROM sink_dead_letters WHERE sink = ? "
                "ORDER BY app_id, seq LIMIT ?",
                (sink, limit),
            ).fetchall()
        letters: list[SinkDeadLetter] = []
        for app_id, seq, reason, at in rows:
            found = self.consent_changes(app_id, 0, 1, seqs=[int(seq)])
            letters.append(
                SinkDeadLetter(sink, app_id, int(seq), reason, at, found[0] if found else None)
            )
        return letters

    def sink_waiting(self, sink: str, limit: int = 100) -> list[SinkWaiting]:
        with self._read() as cur:
            rows = self._exec(
                cur,
                "SELECT app_id, wait_key, seq, not_before, reason, since FROM sink_waiting "
                "WHERE sink = ? ORDER BY not_before LIMIT ?",
                (sink, limit),
            ).fetchall()
        return [SinkWaiting(sink, r[0], r[1], int(r[2]), float(r[3]), r[4], r[5]) for r in rows]

    def retry_sink_dead_letters(self, sink: str, seqs: Sequence[int] | None = None) -> int:
        now = iso_now()
        with self._write() as cur:
            rows = self._exec(
                cur, "SELECT app_id, seq FROM sink_dead_letters WHERE sink = ?", (sink,)
            ).fetchall()
            chosen = [(a, int(s)) for a, s in rows if seqs is None or int(s) in seqs]
            if chosen:
                cur.executemany(
                    self._sql(
                        "INSERT INTO sink_waiting (sink, app_id, wait_key, seq, not_before, "
                        "reason, since) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sink, app_id, "
                        "wait_key) DO UPDATE SET not_before = excluded.not_before"
                    ),
                    [
                        (sink, a, f"retry:{s}", s, 0.0, "dead letter sent again", now)
                        for a, s in chosen
                    ],
                )
        return len(chosen)

    # audit ------------------------------------------------------------------------------------
    def overdue_opt_outs(
        self, sinks: Sequence[tuple[str, frozenset[ChannelType] | None]], before: str
    ) -> int:
        overdue: set[tuple[str, int]] = set()
        with self._read() as cur:
            apps = [r[0] for r in self._exec(cur, "SELECT id FROM apps").fetchall()]
            for sink, channels in sinks:
                only = ""
                params: list[Any] = []
                if channels is not None:
                    only = f" AND channel_type IN ({', '.join('?' for _ in channels)})"
                    params = sorted(c.value for c in channels)
                for app_id in apps:
                    cursor = self._cursor(cur, sink, app_id)
                    rows = self._exec(
                        cur,
                        "SELECT seq FROM consent_history WHERE app_id = ? AND seq > ? AND "
                        f"opt_out_after = 'ALL' AND COALESCE(source_time, at) < ?{only}",
                        (app_id, cursor, before, *params),
                    ).fetchall()
                    overdue.update((app_id, int(r[0])) for r in rows)
                    rows = self._exec(
                        cur,
                        "SELECT h.seq FROM sink_dead_letters d JOIN consent_history h ON "
                        "h.app_id = d.app_id AND h.seq = d.seq WHERE d.sink = ? AND d.app_id = ? "
                        "AND h.opt_out_after = 'ALL' AND COALESCE(h.source_time, h.at) < ?",
                        (sink, app_id, before),
                    ).fetchall()
                    overdue.update((app_id, int(r[0])) for r in rows)
        return len(overdue)

    def audit(
        self, sinks: Sequence[str], since: str | None = None, app_id: str | None = None
    ) -> Iterator[AuditRow]:
        with self._read() as cur:
            # From the history, not ``apps``: a deleted app's consent history stays.
            apps = (
                [app_id]
                if app_id is not None
                else [
                    r[0]
                    for r in self._exec(
                        cur, "SELECT DISTINCT app_id FROM consent_history ORDER BY app_id"
                    ).fetchall()
                ]
            )
        for app in apps:
            yield from self._audit_app(app, sinks, since)

    def _audit_app(
        self, app_id: str, sinks: Sequence[str], since: str | None
    ) -> Iterator[AuditRow]:
        after = 0
        while True:
            with self._read() as cur:
                where = "app_id = ? AND seq > ?" + (" AND at >= ?" if since else "")
                params: list[Any] = [app_id, after] + ([since] if since else [])
                rows = self._exec(
                    cur,
                    f"SELECT {_CHANGE_COLUMNS} FROM consent_history WHERE {where} ORDER BY seq "
                    "LIMIT 1000",
                    params,
                ).fetchall()
                if not rows:
                    return
                changes = [_row_to_change(r) for r in rows]
                first, last = changes[0].seq, changes[-1].seq
                ranges: dict[str, list[tuple[int, int, str, str]]] = {}
                marks: dict[str, dict[int, str]] = {}
                cursors: dict[str, int] = {}
                for sink in sinks:
                    cursors[sink] = self._cursor(cur, sink, app_id)
                    ranges[sink] = [
                        (int(a), int(b), o, at)
                        for a, b, o, at in self._exec(
                            cur,
                            "SELECT first_seq, last_seq, outcome, at FROM sink_deliveries WHERE "
                            "sink = ? AND app_id = ? AND last_seq >= ? AND first_seq <= ? "
                            "ORDER BY at",
                            (sink, app_id, first, last),
                        ).fetchall()
                    ]
                    mark = marks.setdefault(sink, {})
                    for (seq,) in self._exec(
                        cur,
                        "SELECT seq FROM sink_dead_letters WHERE sink = ? AND app_id = ? AND "
                        "seq BETWEEN ? AND ?",
                        (sink, app_id, first, last),
                    ).fetchall():
                        mark[int(seq)] = "dead letter"
                    for (seq,) in self._exec(
                        cur,
                        "SELECT seq FROM sink_waiting WHERE sink = ? AND app_id = ? AND "
                        "seq BETWEEN ? AND ?",
                        (sink, app_id, first, last),
                    ).fetchall():
                        mark[int(seq)] = "waiting"
            for change in changes:
                deliveries: dict[str, str | None] = {}
                outcomes: dict[str, str] = {}
                for sink in sinks:
                    hit = next(
                        ((o, at) for a, b, o, at in ranges[sink] if a <= change.seq <= b), None
                    )
                    if hit is not None and hit[0] == "skipped":
                        outcomes[sink] = "skipped"
                        continue
                    if hit is not None:
                        deliveries[sink], outcomes[sink] = hit[1], "sent"
                        continue
                    deliveries[sink] = None
                    outcomes[sink] = marks[sink].get(
                        change.seq, "pending" if change.seq > cursors[sink] else "superseded"
                    )
                yield AuditRow(change, deliveries, outcomes)
            after = last
