"""Optional dependencies, installed as pip extras, and the one-line error when one is missing.

``pip install optsync`` runs the embedded system (SQLite source, embedded stream, SQLite engine):
``optsync up``, ``run`` and ``demo``. Each other backend needs its driver, named by an extra:

==============  =================================================  ==============================
extra           packages                                           needed for
==============  =================================================  ==============================
``mysql``       mysql-replication, PyMySQL                         MySQL/MariaDB capture, write-back
``postgres``    psycopg, psycopg-pool, psycopg2-binary             PostgreSQL capture, engine, DLQ
``nats``        nats-py                                            the NATS JetStream stream
``fast``        uvloop, httptools                                  about twice the API's throughput
``all``         every one above
==============  =================================================  ==============================

A backend imports its driver only when it is configured, inside ``requires_extra``, which turns
the ``ModuleNotFoundError`` of a missing driver into a ``ConfigError`` (exit code 2) naming the
``pip install`` to run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from optsync.errors import ConfigError

__all__ = ("DRIVER_EXTRAS", "has_fast_server", "requires_extra")

DRIVER_EXTRAS = {
    "pymysql": "mysql",
    "pymysqlreplication": "mysql",
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "psycopg2": "postgres",
    "nats": "nats",
}
"""Top-level module of a driver -> the extra that installs it."""


@contextmanager
def requires_extra(what: str) -> Iterator[None]:
    """Import ``what``'s driver inside this block: a missing one is a ``ConfigError`` naming the
    extra (any other missing module is re-raised as it is: that is a broken installation)."""
    try:
        yield
    except ModuleNotFoundError as exc:
        extra = DRIVER_EXTRAS.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        raise ConfigError(
            f"{what} needs the optsync[{extra}] extra, which is not installed: "
            f"pip install 'optsync[{extra}]'"
        ) from None


def has_fast_server() -> bool:
    """Whether uvloop and httptools (the ``fast`` extra) can be imported."""
    try:
        import httptools  # noqa: F401, PLC0415
        import uvloop  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True
