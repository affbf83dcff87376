"""The ``store`` fixture: one ``EndpointStore`` per backend, closed after each test.

A new backend (PostgreSQL) is one more entry in ``BACKENDS``; every test of the contract suite
then runs against it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from optsync.engine.sql import StoreSettings
from optsync.engine.sqlite import SQLiteStore
from optsync.engine.store import EndpointStore

Backend = Callable[[Path, StoreSettings], EndpointStore]
"""Opens an empty store; the folder is the test's own, for backends that keep files."""

StoreFactory = Callable[[StoreSettings], EndpointStore]

BACKENDS: dict[str, Backend] = {
    "sqlite-memory": lambda _folder, settings: SQLiteStore(":memory:", settings),
    "sqlite-file": lambda folder, settings: SQLiteStore(folder / "engine.db", settings),
}


@pytest.fixture(params=list(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of the parametrized backend with given settings; closes them all after."""
    backend = BACKENDS[request.param]
    opened: list[EndpointStore] = []

    def make(settings: StoreSettings) -> EndpointStore:
        # The first store lives in tmp_path itself; any further one gets a folder of its own.
        folder = tmp_path if not opened else tmp_path / f"store{len(opened)}"
        store = backend(folder, settings)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> EndpointStore:
    """An empty store with default settings."""
    return make_store(StoreSettings())
