"""The ``store`` fixture: one ``EndpointStore`` per backend, closed after each test.

A new backend is one more entry in ``BACKENDS``; every test of the contract suite then runs
against it too. PostgreSQL runs on one private server for the session (started only when a
PostgreSQL case runs) and gives each store a database of its own, copied from a template that
already holds the schema. That template is created with an ICU ``en-US`` collation, as many
production servers are, so a text comparison that is not ``COLLATE "C"`` shows up as a failure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from postgres_server import PostgresServer, require_binaries, running_server

from optsync.engine.postgres import PostgresStore
from optsync.engine.sql import StoreSettings
from optsync.engine.sqlite import SQLiteStore
from optsync.engine.store import EndpointStore

Backend = Callable[
    [pytest.FixtureRequest, Path, StoreSettings], AbstractContextManager[EndpointStore]
]
"""Opens an empty store and closes it on exit; the folder is the store's own, for backends
that keep files; the request gives the backend its session fixtures."""

StoreFactory = Callable[[StoreSettings], EndpointStore]

# Test speed only: a crash of this throwaway server loses nothing anyone needs.
FAST_SETTINGS = ("fsync=off", "full_page_writes=off", "max_connections=200")


@dataclass
class PostgresDatabases:
    """Hands out empty databases on the session's server, one per store."""

    server: PostgresServer
    template: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def database(self) -> Iterator[str]:
        """The URL of a new database copied from the template; dropped on exit."""
        name = f"t_{next(self._names)}"
        url = self.server.create_database(name, template=self.template)
        try:
            yield url
        finally:
            self.server.drop_database(name)


def _collation_options(server: PostgresServer) -> str:
    """ICU en-US when the server has ICU (PostgreSQL 15+ built with it), else the default."""
    rows = server.sql("SELECT 1 FROM pg_collation WHERE collprovider = 'i' LIMIT 1")
    if rows and int(server.sql("SHOW server_version_num")[0][0]) >= 150000:
        return "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    return ""


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    """One private PostgreSQL for the session, with a template database holding the schemas."""
    require_binaries()
    with running_server(FAST_SETTINGS) as server:
        server.sql(f"CREATE DATABASE optsync_template {_collation_options(server)}")
        # Migrated once here; every test database is a copy (CREATE DATABASE ... TEMPLATE).
        PostgresStore(server.url(db="optsync_template")).close()
        yield PostgresDatabases(server, "optsync_template")


@contextmanager
def _sqlite_memory(
    _request: pytest.FixtureRequest, _folder: Path, settings: StoreSettings
) -> Iterator[EndpointStore]:
    with closing(SQLiteStore(":memory:", settings)) as store:
        yield store


@contextmanager
def _sqlite_file(
    _request: pytest.FixtureRequest, folder: Path, settings: StoreSettings
) -> Iterator[EndpointStore]:
    with closing(SQLiteStore(folder / "engine.db", settings)) as store:
        yield store


@contextmanager
def _postgres(
    request: pytest.FixtureRequest, _folder: Path, settings: StoreSettings
) -> Iterator[EndpointStore]:
    databases: PostgresDatabases = request.getfixturevalue("postgres_databases")
    with databases.database() as url, closing(PostgresStore(url, settings, pool_size=2)) as store:
        yield store


BACKENDS: dict[str, Backend] = {
    "sqlite-memory": _sqlite_memory,
    "sqlite-file": _sqlite_file,
    "postgres": _postgres,
}


@pytest.fixture(params=list(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of the parametrized backend with given settings; closes them all after."""
    backend = BACKENDS[request.param]
    with ExitStack() as opened:
        count = 0

        def make(settings: StoreSettings) -> EndpointStore:
            nonlocal count
            # The first store lives in tmp_path itself; any further one gets a folder of its own.
            folder = tmp_path if count == 0 else tmp_path / f"store{count}"
            folder.mkdir(parents=True, exist_ok=True)
            count += 1
            return opened.enter_context(backend(request, folder, settings))

        yield make


@pytest.fixture
def store(make_store: StoreFactory) -> EndpointStore:
    """An empty store with default settings."""
    return make_store(StoreSettings())
