"""The short form of ``make chaos``, part of ``make test``: 10 SIGKILLs of capture, apply and
serve on each source (MariaDB, then PostgreSQL; both through NATS into the PostgreSQL engine),
with a source database restart and a nats-server restart, under random inserts, opt-in flips,
address changes, user-id changes and deletes. Then nothing lost, nothing divergent, no consent
history out of source order, no opted-in endpoint left INACTIVE at a free address. The full
run is ``make chaos`` (tests/chaos/run.py)."""

from __future__ import annotations

from pathlib import Path

import mariadb_server
import nats_server
import postgres_server
import pytest
from harness import ChaosPlan, run_chaos

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("source", ["mariadb", "postgres"])
def test_chaos_loses_and_reorders_nothing(source: str, tmp_path: Path) -> None:
    nats_server.require_binary()
    postgres_server.require_binaries()
    if source == "mariadb":
        mariadb_server.require_binaries()
    plan = ChaosPlan(source=source, kills=10, rows=120, seed=7, kill_gap=(0.3, 1.2), catch_up=90)
    figures = run_chaos(plan, tmp_path, say=lambda _: None)
    report = "\n".join([figures.line(), figures.detail(), *figures.problems])
    assert figures.kills == 10, report
    assert figures.restarts == 2, report
    assert figures.changes > figures.kills, report
    assert figures.history_entries >= figures.endpoints > 0, report
    zeros = (figures.lost, figures.divergent, figures.out_of_order, figures.inactive)
    assert zeros == (0, 0, 0, 0), report
    # optsync reconcile agrees with the checker above: no drift either.
    assert f"{figures.endpoints} source rows" in figures.reconcile_said, report
    assert figures.reconcile_exit == 0, report
    assert figures.clean, report
