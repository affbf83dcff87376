"""Reads of a file engine on their own connections (``SQLiteStore._read``): an API read does not
queue behind a write transaction, sees only committed writes, and the pool stays bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, OptOut
from optsync.engine.sqlite import READERS, SQLiteStore

API = Cause(CauseKind.API, "req")


def _store(tmp_path: Path) -> tuple[SQLiteStore, str]:
    store = SQLiteStore(tmp_path / "engine.db")
    app_id = store.create_app("readers").id
    patch = EndpointPatch("e1", ChannelType.SMS, address="+12341111111")
    store.write_endpoints(app_id, [patch], API)
    return store, app_id


def test_a_read_does_not_wait_for_a_write_transaction(tmp_path: Path) -> None:
    store, app_id = _store(tmp_path)
    holding, release = threading.Event(), threading.Event()

    def long_write() -> None:
        with store._write() as cur:
            cur.execute("UPDATE endpoints SET opt_out = 'ALL' WHERE id = 'e1'")
            holding.set()
            release.wait(60)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert holding.wait(30)
        with ThreadPoolExecutor(1) as pool:
            # The writer holds its transaction (and the lock) until released below, so a read
            # that queued behind it could not finish within the wait.
            seen = pool.submit(store.get_endpoint, app_id, "e1").result(timeout=30)
        assert writer.is_alive()
        assert seen.opt_out is OptOut.NONE  # the uncommitted change is not visible
    finally:
        release.set()
        writer.join(30)
    assert store.get_endpoint(app_id, "e1").opt_out is OptOut.ALL  # committed: visible
    store.close()


def test_concurrent_reads_share_a_bounded_pool_of_connections(tmp_path: Path) -> None:
    store, app_id = _store(tmp_path)
    start = threading.Barrier(8)

    def read(_: int) -> str:
        start.wait(30)
        return store.get_endpoint(app_id, "e1").id

    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(read, range(8)))
        found += pool.map(lambda _: store.get_endpoint(app_id, "e1").id, range(40))
    assert found == ["e1"] * 48
    assert 1 <= store._reader_count <= READERS
    store.close()
    assert store._readers.empty()  # closed with the store


def test_a_write_is_visible_to_the_next_read_of_another_thread(tmp_path: Path) -> None:
    store, app_id = _store(tmp_path)
    for n in range(20):
        opt_out = OptOut.ALL if n % 2 else OptOut.NONE
        store.write_endpoints(app_id, [EndpointPatch("e1", opt_out=opt_out)], API)
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(store.get_endpoint, app_id, "e1").result(30).opt_out is opt_out
    store.close()


def test_an_in_memory_engine_reads_on_its_one_connection() -> None:
    store = SQLiteStore(":memory:")
    app_id = store.create_app("memory").id
    store.write_endpoints(app_id, [EndpointPatch("e1", ChannelType.EMAIL, address="a@b.c")], API)
    assert store.get_endpoint(app_id, "e1").address == "a@b.c"
    assert store._reader_count == 0
    store.close()
