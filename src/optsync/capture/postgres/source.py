"""``PostgresSource``: change capture from PostgreSQL by logical replication (pgoutput).

The log is the WAL, decoded on the server by the ``pgoutput`` plugin through a replication slot
(``optsync_<name>``) and read over the replication protocol (protocol version 1, text tuples),
decoded in ``postgres_pgoutput``. The snapshot reads the tables in an exported snapshot that
is exactly consistent with where the slot starts. Module layout, as for every source:
``postgres_connection`` (connections, errors), ``postgres_preflight`` (settings, privileges,
publication), ``postgres_snapshot`` (chunked reads), ``postgres_pgoutput`` (the protocol),
``postgres_values`` (types), ``postgres_position`` (LSNs and positions), ``postgres_log``
(the replication connection's read loop, transaction assembly, LSN feedback).

Why it cannot lose a change
---------------------------
- **The slot keeps every change until capture confirms it.** The server retains the WAL from
  the slot's ``restart_lsn`` and streams, from the slot's confirmed flush LSN, every transaction
  that touched a published table, in commit order. The confirmed flush LSN moves only in
  ``acknowledge(state)``, i.e. after the stream holds the events up to it durably; it is the
  end LSN of the last transaction wholly in the stream. A transaction split over several
  batches is re-sent from its start after a restart (the stream drops the duplicates by event
  id). psycopg2 also forwards the flush position to a keepalive's ``wal_end`` on its own, but
  only when every data message it received has been confirmed, so it never releases a change
  the stream does not hold: that is what keeps an idle slot from pinning WAL.
- **Positions are commit order.** A log event's position is its transaction's commit LSN and
  its ordinal in the transaction (``postgres_position``); commit LSNs of streamed transactions
  strictly increase.
- **The snapshot and the log meet without a gap.** ``CREATE_REPLICATION_SLOT ... LOGICAL
  pgoutput EXPORT_SNAPSHOT`` returns the slot's consistent point L and a snapshot that sees
  exactly the transactions that committed before L; the slot streams exactly those that commit
  at or after L. The snapshot reads every table in a ``REPEATABLE READ`` transaction that
  imports it (``SET TRANSACTION SNAPSHOT``). Loads carry position (L, 0); every streamed change
  has (commit LSN >= L, ordinal >= 1), so the engine's position guard keeps the log's version
  whatever order the two arrive in. The publication exists before the slot, so the slot
  decodes every change after L.
- **Restart in the middle of a snapshot.** The exported snapshot dies with its session. Each
  snapshot batch's state records the table and the last key read (or, for a table without a
  key, the next heap page, with the table's ``relfilenode``), and the log's start L (the slot is
  not confirmed past L until the snapshot ends). After a restart, a *temporary* slot exports a
  new snapshot at L' >= L; the snapshot continues after the cursor with loads at (L', 0), and
  the log still starts at L. A change in [L, L') to a row before the cursor comes from the log
  (the row was loaded at L); the same change to a row after the cursor is older than that
  row's load at L', which already shows it. Rows of a keyless table that move pages between
  the two snapshots were changed after L, so the log carries them whole (REPLICA IDENTITY FULL
  fills unchanged TOAST values from the old row); a rewritten table (new ``relfilenode``:
  VACUUM FULL, CLUSTER) is read again from its first page.
- **A table added to the configuration later** is added to the publication, then snapshotted
  from a temporary slot's snapshot while the log waits at its position.
- **Loud where silence would lose data.** A slot that was invalidated (``wal_status = lost``,
  ``max_slot_wal_keep_size``), dropped, or is missing while the saved state expects it raises
  ``SlotLost`` naming the ways out, at ``open`` and when the stream breaks. A slot whose
  confirmed position is ahead of the saved state is reported (a warning: capture cannot tell an
  idle keepalive confirmation at the moment of a crash from someone else advancing the slot).

Operations
----------
- ``open`` checks the server (``postgres_preflight``): PostgreSQL 14+, ``wal_level =
  logical``, the REPLICATION attribute, a free WAL sender and replication slot, each table's
  existence, SELECT privilege and replica identity (a key or FULL; a warning for partial
  before images), then creates or completes the publication (``optsync_<name>``, or the one
  configured) and, on the first start, the slot. Nothing is dropped except by ``drop_slot``.
- Replica identity: with DEFAULT (the primary key) an UPDATE that keeps the key carries no
  before image and a DELETE only the key columns, so an address change can delete the old
  endpoint only when the endpoint id's columns are in the key (then the update changes the
  key and carries the old key). With FULL every before image is whole.
- The snapshot's ``REPEATABLE READ`` transaction holds an ACCESS SHARE lock on each table it
  has read until it ends: an ``ALTER TABLE`` on such a table waits for the snapshot.
- Connections use ``SESSION_OPTIONS`` (UTC, ISO dates, hex bytea, no statement timeouts) and
  the application name ``optsync-<name>``. A broken stream is reconnected for up to
  ``RECONNECT_FOR`` seconds (``Retryable`` after that); a slot in use by another process is
  waited for up to ``SLOT_BUSY_WAIT`` seconds (a killed capture's session ends by itself).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import psycopg2
import psycopg2.extensions
from msgspec.structs import replace

from optsync.capture.base import CaptureBatch, ChangeSource, Progress, check_arguments
from optsync.capture.postgres.connection import check_url, connect, masked, quote_ident
from optsync.capture.postgres.log import UNCHANGED_TOAST, LogReading, SlotLost
from optsync.capture.postgres.position import CaptureState, format_lsn, parse_lsn
from optsync.capture.postgres.preflight import (
    ServerFacts,
    TableInfo,
    check_free_slots,
    check_server,
    describe_tables,
    ensure_publication,
    parse_table,
    publication_columns,
    slot_info,
)
from optsync.capture.postgres.snapshot import TableReader, load_events
from optsync.capture.postgres.values import TypeCatalog, TypeInfo
from optsync.errors import ConfigError, Retryable

__all__ = ("UNCHANGED_TOAST", "PostgresSource", "SlotLost")

logger = logging.getLogger(__name__)

SLOT_BUSY_WAIT: Final = 15.0
_SLOT_NAME: Final = re.compile(r"^[a-z0-9_]{1,63}$")


class PostgresSource(LogReading, ChangeSource):
    """Snapshot + pgoutput log of a PostgreSQL database (see the module notes).

    ``tables`` are ``table`` (schema public) or ``schema.table``. ``chunk_size`` rows are read
    per snapshot query (yielded in batches of at most ``max_events``); ``idle_wait`` is how long
    the log waits for a change before it yields an empty batch.
    """

    def __init__(
        self,
        url: str,
        tables: Sequence[str],
        *,
        name: str = "postgres",
        slot: str | None = None,
        publication: str | None = None,
        chunk_size: int = 10_000,
        idle_wait: float = 0.2,
    ) -> None:
        check_arguments(tables, chunk_size, idle_wait)
        check_url(url)
        refs = [parse_table(t) for t in tables]
        if not refs:
            raise ConfigError("[source] tables is empty: list the tables to capture")
        self.name = name
        self.url = url
        self.tables = tuple(dict.fromkeys(r.qualified for r in refs))
        self._refs = {r.qualified: r for r in refs}
        self.slot = slot if slot is not None else f"optsync_{name}"
        if not _SLOT_NAME.match(self.slot):
            raise ConfigError(
                f"replication slot name {self.slot!r} is not allowed: use lower-case letters, "
                "digits and underscores, at most 63 (set the source name or slot)"
            )
        self._own_publication_name = publication is None
        self.publication = publication if publication is not None else self.slot
        self.chunk_size = chunk_size
        self.idle_wait = idle_wait
        self._application = f"optsync-{name}"[:63]
        self._state = CaptureState()
        self._conn: Any = None
        self._snap: Any = None
        self._repl: Any = None
        self._cur: Any = None
        """The replication cursor of ``_repl``."""
        self._facts: ServerFacts | None = None
        self._info: dict[str, TableInfo] = {}
        self._catalog = TypeCatalog(self._fetch_types)
        self._relations = {}
        self._acked = 0
        self._confirmed = 0
        self._last_forced = 0.0

    # -- open -------------------------------------------------------------------------------

    def open(self, state: str | None) -> None:
        """Preflight, publication and slot; prepare to resume from ``state`` (None: start)."""
        if self._conn is not None:
            raise RuntimeError(f"source {self.name!r} is already open")
        saved = CaptureState.parse(state, self.name) if state is not None else CaptureState()
        with self._translated("connect"):
            self._conn = connect(self.url, self._application)
        try:
            self._open(saved)
        except BaseException:
            self.close()
            raise

    def _open(self, saved: CaptureState) -> None:
        with self._translated("preflight"):
            cur = self._conn.cursor()
            facts = self._facts = check_server(cur)
            infos = describe_tables(cur, [self._refs[t] for t in self.tables])
            self._info = {i.ref.qualified: i for i in infos}
            slot = self._existing_slot(cur, facts, saved.log_after)
        state = self._plan(saved, slot)
        needs_snapshot = state.phase == "snapshot"
        with self._translated("preflight"):
            check_free_slots(facts, 1 if (slot is None or needs_snapshot) else 0, cur)
            # The publication must exist before the slot: the slot decodes changes against it.
            ensure_publication(cur, self.publication, infos, facts.user)
        if needs_snapshot:
            state = self._begin_snapshot(state, create_slot=slot is None)
        self._state = state
        self._acked = self._confirmed = state.log_after or 0
        logger.info(
            "capture opened source=%s url=%s slot=%s publication=%s phase=%s log_after=%s",
            self.name,
            masked(self.url),
            self.slot,
            self.publication,
            state.phase,
            format_lsn(state.log_after) if state.log_after is not None else "-",
        )

    def _existing_slot(
        self, cur: Any, facts: ServerFacts, expected: int | None
    ) -> dict[str, Any] | None:
        """The slot's row if it exists, after checking it is ours, usable and free."""
        deadline = time.monotonic() + SLOT_BUSY_WAIT
        while True:
            slot = slot_info(cur, self.slot)
            if slot is None:
                return None
            if slot.get("plugin") != "pgoutput" or slot.get("database") != facts.database:
                raise ConfigError(
                    f"replication slot {self.slot!r} exists but is not a pgoutput slot of database "
                    f"{facts.database!r} (plugin {slot.get('plugin')!r}, database "
                    f"{slot.get('database')!r}): give this source another name or slot"
                )
            self._check_not_lost(slot, expected)
            pid = slot.get("active_pid")
            if not slot.get("active") or pid is None:
                return slot
            if time.monotonic() > deadline:
                raise Retryable(
                    f"source {self.name!r}: replication slot {self.slot!r} is in use by server "
                    f"process {pid}: another capture with this name is running; stop it first"
                )
            time.sleep(0.1)

    def _plan(self, saved: CaptureState, slot: dict[str, Any] | None) -> CaptureState:
        """The state to start from: what to snapshot and where the log starts."""
        confirmed = slot.get("confirmed_flush_lsn") if slot else None
        flushed = parse_lsn(confirmed) if confirmed else None
        if saved.log_after is None:
            # Nothing captured yet (or --resnapshot): every table, and the log from the slot.
            if slot is not None:
                logger.info(
                    "snapshot of every table source=%s slot=%s exists log_after=%s",
                    self.name,
                    self.slot,
                    confirmed,
                )
            return CaptureState(phase="snapshot", log_after=flushed)
        if slot is None:
            raise self._slot_lost("does not exist", saved.log_after)
        if flushed is not None and flushed > saved.log_after:
            logger.warning(
                "slot ahead of checkpoint source=%s slot=%s confirmed=%s saved=%s bytes=%d: "
                "either capture confirmed WAL without captured changes just before it stopped "
                "(harmless), or another client advanced or re-created the slot and the changes "
                "in between are lost to optsync; if in doubt, re-snapshot "
                "(optsync capture --resnapshot)",
                self.name,
                self.slot,
                confirmed,
                format_lsn(saved.log_after),
                flushed - saved.log_after,
            )
        done = tuple(t for t in saved.tables_done if t in self._info)
        if saved.phase == "log":
            missing = [t for t in self.tables if t not in done]
            if not missing:
                return replace(saved, tables_done=done)
            logger.info(
                "snapshot of added tables source=%s tables=%s", self.name, ",".join(missing)
            )
            return replace(saved, phase="snapshot", tables_done=done, table=None, rows=0)
        table = saved.table if saved.table in self._info else None
        return replace(saved, tables_done=done, table=table, rows=saved.rows if table else 0)

    def _begin_snapshot(self, state: CaptureState, *, create_slot: bool) -> CaptureState:
        """Export a snapshot (from the new slot, or a temporary one) and import it."""
        name = self.slot if create_slot else f"{self.slot[:48]}_snap_{secrets.token_hex(4)}"
        temporary = "" if create_slot else " TEMPORARY"
        with self._translated("snapshot start"):
            repl = connect(self.url, self._application, replication=True)
            try:
                cur = repl.cursor()
                cur.execute(
                    f"CREATE_REPLICATION_SLOT {name}{temporary} LOGICAL pgoutput EXPORT_SNAPSHOT"
                )
                _, consistent_point, snapshot, _ = cur.fetchone()
                snap = connect(self.url, self._application)
                snap.autocommit = False
                snap.set_session(
                    isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                    readonly=True,
                )
                snap.cursor().execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
            finally:
                repl.close()  # the snapshot now lives in our transaction; a temporary slot goes
        self._snap = snap
        point = parse_lsn(consistent_point)
        if create_slot:
            logger.info(
                "replication slot created source=%s slot=%s consistent_point=%s",
                self.name,
                self.slot,
                consistent_point,
            )
        log_after = state.log_after if state.log_after is not None else point
        return replace(state, phase="snapshot", log_after=log_after, snapshot_at=point)

    # -- batches ----------------------------------------------------------------------------

    def batches(self, max_events: int, progress: Progress | None = None) -> Iterator[CaptureBatch]:
        """Snapshot batches, a batch that switches the state to the log, then log batches."""
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        if self._conn is None:
            raise RuntimeError(f"source {self.name!r} is not open")
        if self._state.phase == "snapshot":
            yield from self._snapshot(max_events, progress)
        yield from self._log(max_events)

    def _snapshot(self, max_events: int, progress: Progress | None) -> Iterator[CaptureBatch]:
        state = self._state
        assert state.snapshot_at is not None and state.log_after is not None
        at = state.snapshot_at
        pending = [t for t in self.tables if t not in state.tables_done]
        if state.table in pending:
            pending.remove(state.table)
            pending.insert(0, state.table)
        limit = min(self.chunk_size, max_events)
        logger.info(
            "snapshot started source=%s at=%s log_after=%s tables=%s",
            self.name,
            format_lsn(state.snapshot_at),
            format_lsn(state.log_after),
            ",".join(pending),
        )
        for name in pending:
            info = self._info[name]
            if state.table == name and state.relfilenode not in (None, info.relfilenode):
                logger.info("snapshot restarts rewritten table source=%s table=%s", self.name, name)
                state = replace(state, after_key=None, page=0, rows=0)
            if state.table != name:
                state = replace(state, table=name, after_key=None, page=0, rows=0)
            state = replace(state, relfilenode=info.relfilenode)
            with self._translated("snapshot"):
                cur = self._snap.cursor()
                columns, row_filter = publication_columns(cur, self.publication, info)
                types = dict(zip(info.columns, info.column_types, strict=True))
                converters = self._catalog.converters(types[c] for c in columns)
                reader = TableReader(cur, info, columns, converters, row_filter)
                expected = info.estimated_rows
                if expected is None and progress is not None:
                    expected = reader.count()  # never analyzed: usually small, count it
            if progress is not None:
                progress(name, state.rows, expected)
            finished = False
            while not finished:
                with self._translated("snapshot"):
                    chunk = reader.read(state.after_key, state.page, self.chunk_size)
                finished = chunk.done
                rows = chunk.rows
                for start in range(0, len(rows), limit):
                    part = rows[start : start + limit]
                    last = start + len(part) == len(rows)
                    events = load_events(info, part, at, state.rows)
                    state = replace(
                        state,
                        rows=state.rows + len(part),
                        after_key=chunk.key(start + len(part) - 1),
                        page=chunk.next_page if last else state.page,
                    )
                    if last and finished:
                        state = replace(
                            state,
                            table=None,
                            after_key=None,
                            page=0,
                            relfilenode=None,
                            tables_done=(*state.tables_done, name),
                        )
                    self._state = state
                    if progress is not None:
                        progress(name, state.rows, expected)
                    yield CaptureBatch(events, state.dump(self.slot))
                if not rows and finished:
                    state = replace(
                        state,
                        table=None,
                        after_key=None,
                        page=0,
                        relfilenode=None,
                        tables_done=(*state.tables_done, name),
                    )
                elif not rows:
                    state = replace(state, page=chunk.next_page)
            if progress is not None:
                progress(name, state.rows, state.rows)
        with self._translated("snapshot end"):
            self._snap.commit()
            self._snap.close()
        self._snap = None
        state = replace(state, phase="log", table=None, rows=0, resnapshot=False)
        self._state = state
        logger.info(
            "snapshot done source=%s at=%s log_after=%s",
            self.name,
            format_lsn(state.snapshot_at or 0),
            format_lsn(state.log_after or 0),
        )
        yield CaptureBatch((), state.dump(self.slot))

    # -- acknowledge, close, slot management ------------------------------------------------

    def acknowledge(self, state: str) -> None:
        """The stream holds everything up to ``state``: let the slot release the WAL before it.

        Only records the position (safe from any thread); the log loop confirms it to the
        server at its next turn, and ``close`` confirms what is left.
        """
        acked = CaptureState.parse(state, self.name)
        if acked.phase == "log" and acked.log_after is not None:
            self._acked = max(self._acked, acked.log_after)

    def table_columns(self) -> Mapping[tuple[str, str], tuple[str, ...]]:
        return {(i.ref.schema, i.ref.name): i.columns for i in self._info.values()}

    def close(self) -> None:
        """Confirm what was acknowledged, then close every connection (the slot stays)."""
        if self._repl is not None and self._acked > self._confirmed:
            with contextlib.suppress(psycopg2.Error):
                self._cur.send_feedback(write_lsn=self._acked, flush_lsn=self._acked, force=True)
        self._close_stream()
        for attribute in ("_snap", "_conn"):
            conn = getattr(self, attribute)
            setattr(self, attribute, None)
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()

    def resnapshot_state(self) -> str:
        """A state that makes ``open`` snapshot every table again and read the log from the
        slot's confirmed position (the slot is created if missing)."""
        return CaptureState(phase="snapshot", resnapshot=True).dump(self.slot)

    def drop_slot(self) -> None:
        """Drop the replication slot, and the publication when capture owns it under its
        default name. The saved state can no longer be resumed afterwards."""
        with self._translated("drop slot"):
            conn = connect(self.url, self._application)
        try:
            with self._translated("drop slot"):
                cur = conn.cursor()
                deadline = time.monotonic() + SLOT_BUSY_WAIT
                while True:
                    slot = slot_info(cur, self.slot)
                    if slot is None or not slot.get("active"):
                        break
                    if time.monotonic() > deadline:
                        raise Retryable(
                            f"source {self.name!r}: replication slot {self.slot!r} is in use by "
                            f"server process {slot.get('active_pid')}: stop that capture first"
                        )
                    time.sleep(0.1)
                if slot is not None:
                    cur.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
                    logger.info("replication slot dropped source=%s slot=%s", self.name, self.slot)
                if self._own_publication_name:
                    cur.execute(
                        "SELECT 1 FROM pg_publication WHERE pubname = %s AND pubowner = "
                        "(SELECT oid FROM pg_roles WHERE rolname = current_user)",
                        (self.publication,),
                    )
                    if cur.fetchone() is not None:
                        cur.execute(f"DROP PUBLICATION {quote_ident(self.publication)}")
                        logger.info(
                            "publication dropped source=%s publication=%s",
                            self.name,
                            self.publication,
                        )
        finally:
            conn.close()

    # -- helpers ----------------------------------------------------------------------------

    def _fetch_types(self, oids: Iterable[int]) -> list[TypeInfo]:
        cur = self._conn.cursor()
        cur.execute(
            "SELECT oid, typname, typtype, typcategory, typelem, typdelim, typbasetype "
            "FROM pg_type WHERE oid = ANY(%s)",
            (list(oids),),
        )
        return [
            TypeInfo(int(o), n, k, c, int(e), d, int(b)) for o, n, k, c, e, d, b in cur.fetchall()
        ]
