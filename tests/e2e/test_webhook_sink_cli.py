"""``optsync run`` with a ``[[sink]] type = "webhook"``, SIGKILLed in the middle of a delivery.

The application (plain ``sqlite3`` connections) flips the opt-in of ~30 users a few hundred
times while a slow receiver (``tests/servers/webhook_receiver.py``, 50 ms a request) takes the
deliveries. The receiver checks every signature with its own code. The process is killed while
a request it sent is held unanswered, started again, and more flips follow; then every change
of the engine's consent history must have reached the receiver, each endpoint's changes in seq
order once deduplicated by ``id``, ending in the source row's final state.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from pinpoint_e2e import clean_env
from pipeline_e2e import MAPPING, Layout, Optsync, app_db, wait_for
from webhook_receiver import SECRET, WebhookReceiver
from webhook_receiver import webhook_receiver_fixture as _receiver_fixture  # noqa: F401 (the fixture)

from optsync.engine.models import OptOut
from optsync.engine.sqlite import SQLiteStore
from optsync.sample import SAMPLE_TABLE

pytestmark = pytest.mark.e2e

SECRET_ENV = "WEBHOOK_E2E_SECRET"
USERS = 30
"""The sample's nine users and 21 more."""
SINK = "hook"
RECEIVER_DELAY = 0.05


def sink_config(url: str) -> str:
    return f"""
[[sink]]
name = "{SINK}"
type = "webhook"
url = "{url}"
secret_env = "{SECRET_ENV}"
timeout = "5s"
"""


class Flipper(threading.Thread):
    """The application: ``count`` opt-in flips of random users, a few milliseconds apart."""

    def __init__(self, layout: Layout, rng: random.Random, users: list[str], count: int):
        super().__init__(name="app-flipper", daemon=True)
        self.layout = layout
        self.rng = rng
        self.users = users
        self.count = count
        self.done = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with app_db(self.layout.source) as app:
                for _ in range(self.count):
                    flip(app, self.rng.choice(self.users))
                    self.done += 1
                    time.sleep(self.rng.uniform(0.001, 0.012))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(60)
        assert not self.is_alive(), "the application's writes did not finish"
        assert self.error is None, self.error


def flip(app: sqlite3.Connection, userid: str) -> None:
    app.execute(
        f"UPDATE {SAMPLE_TABLE} SET optin = 1 - optin, "
        "lastupdate = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE userid = ?",
        (userid,),
    )


def history_size(layout: Layout) -> int:
    """Rows of the engine's consent history, read from its file (0 before it exists)."""
    path = layout.data / "engine.db"
    if not path.exists():
        return 0
    with closing(sqlite3.connect(path, timeout=10)) as conn:
        found = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'consent_history'"
        ).fetchone()
        if found is None:
            return 0
        return int(conn.execute("SELECT count(*) FROM consent_history").fetchone()[0])


@pytest.fixture
def receiver(webhook_receiver: WebhookReceiver) -> Iterator[WebhookReceiver]:
    webhook_receiver.delay = RECEIVER_DELAY
    yield webhook_receiver
    webhook_receiver.release()


def test_a_sigkill_mid_delivery_loses_no_change_and_keeps_per_endpoint_order(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    seed = int(os.environ.get("OPTSYNC_TEST_SEED") or random.randrange(2**32))
    print(f"seed={seed} (set OPTSYNC_TEST_SEED to repeat)")
    rng = random.Random(seed)
    layout = Layout(tmp_path)
    extra = [(f"w{n}", f"+1555020{n:04d}", n % 2) for n in range(USERS - 9)]
    layout.create_source(extra)
    with app_db(layout.source) as app:
        app.execute("PRAGMA journal_mode = WAL")
        users = [str(r[0]) for r in app.execute(f"SELECT userid FROM {SAMPLE_TABLE}")]
    assert len(users) == USERS
    config = layout.write_config(MAPPING + sink_config(receiver.url))
    env = clean_env(**{SECRET_ENV: SECRET})
    log = tmp_path / "optsync.log"
    started = time.monotonic()

    # 1. Flips while the sink delivers; a request is held unanswered and the process killed.
    first = Optsync(["run", "--config", str(config)], log=log, cwd=tmp_path, env=env).start()
    flipper = Flipper(layout, random.Random(rng.random()), users, 250)
    try:
        # Flips made before the snapshot reads the table would only show as its final state.
        wait_for(lambda: len(receiver.received) >= USERS, "the snapshot to arrive", 60, first)
        flipper.start()
        wait_for(lambda: len(receiver.received) >= 60, "the first flips to arrive", 60, first)
        receiver.hold()
        deadline = time.monotonic() + 30
        extra_flips = 0
        while not receiver.in_flight:
            first.check_alive()
            assert time.monotonic() < deadline, "no delivery came while the receiver held"
            if not flipper.is_alive():  # everything was delivered: give the sink another change
                with app_db(layout.source) as app:
                    flip(app, rng.choice(users))
                extra_flips += 1
            time.sleep(0.02)
        held = [i for ids in receiver.in_flight.values() for i in ids]
        first.kill()
        killed_at = time.monotonic()
        print(f"killed with {len(held)} changes in flight, {len(receiver.received)} received")
    finally:
        if first.alive():
            first.kill()
        receiver.release()
        if flipper.ident is not None:  # started
            flipper.finish()

    # 2. Started again, more flips, until the receiver has every change of the history.
    second = Optsync(["run", "--config", str(config)], log=log, cwd=tmp_path, env=env).start()
    more = Flipper(layout, random.Random(rng.random()), users, 100)
    more.start()
    try:
        more.finish()
        wait_for(layout.drained, "capture and apply to drain", 60, second)
        took = wait_for(
            lambda: len(receiver.received_ids()) == history_size(layout) and not receiver.in_flight,
            "the receiver to have every change",
            120,
            second,
            interval=0.1,
        )
        print(f"caught up {time.monotonic() - killed_at:.1f} s after the kill ({took:.1f} s wait)")
    finally:
        second.stop()
    assert second.process is not None
    assert second.process.returncode in (0, 130), second.output()[-4000:]
    print(f"total {time.monotonic() - started:.1f} s")

    # 3. What the receiver got, against the engine's history and the source.
    with closing(SQLiteStore(layout.data / "engine.db")) as store:
        rows = list(store.audit([SINK]))
    history = [row.change for row in rows]
    flips = flipper.done + more.done + extra_flips
    received = receiver.received
    firsts = receiver.first_arrivals()
    print(
        f"flips={flips} history={len(history)} requests={len(receiver.requests)} "
        f"received={len(received)} duplicates={len(received) - len(firsts)}"
    )
    assert len(history) > 300, "the workload hardly ran"
    assert receiver.refused == [], receiver.refused[:3]
    assert {r.status for r in receiver.requests} == {200}
    assert {c.change_id for c in history} == receiver.received_ids()
    assert {row.outcomes.get(SINK) for row in rows} == {"sent"}

    counts: dict[str, int] = {}
    for element in received:
        counts[element["id"]] = counts.get(element["id"], 0) + 1
    assert held and all(counts[i] >= 2 for i in held), "the held changes were not sent again"

    per_endpoint: dict[str, list[int]] = {}
    last: dict[str, str | None] = {}
    for element in firsts:
        per_endpoint.setdefault(element["endpoint_id"], []).append(element["seq"])
        last[element["endpoint_id"]] = element["opt_out"]
    for endpoint_id, seqs in per_endpoint.items():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), (endpoint_id, seqs)
    expected = {endpoint_id: opt_out for endpoint_id, _, opt_out in layout.source_rows()}
    assert len(expected) == USERS
    assert last == expected
    assert {c.endpoint_id: c.opt_out_after for c in history} == {
        k: OptOut(v) for k, v in expected.items()
    }
