"""The console's Sinks pages and the endpoint page's deliveries, over a real ``SQLiteStore`` with
sink progress written as a runner writes it (``claim_lease`` + ``save_sink_progress``)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pytest
from test_console import CREDENTIALS, CSRF, Client

from optsync.api.app import PinpointApi
from optsync.config import Settings, load_settings
from optsync.console import ConsoleContext, create_console
from optsync.console import sinks as console_sinks
from optsync.console.sinks import endpoint_journeys
from optsync.engine.ledger import AuditRow, Delivered, SinkProgress, SinkWaiting
from optsync.engine.models import Cause, CauseKind, ChannelType, EndpointPatch, OptOut, iso_now
from optsync.engine.sqlite import SQLiteStore
from optsync.sinks.settings import EumSinkSettings, WebhookSinkSettings

SOURCE_DAY = datetime.now(UTC).date().isoformat()
"""The source commits of the fixture: today just after midnight, less than 24 hours ago."""
STOPPED_AT = iso_now()
"""When user2 texted STOP: now, so only a passed deadline makes it overdue (it counts from it)."""
REFUSED = "EUM PutOptedOutNumber: ValidationException: +12341111113 is not a valid number"
DEFERRED = "AWS removes a number from an opt-out list at most once every 30 days; tried later"


def when(iso: str) -> str:
    """As the pages show an engine time (``web._when``)."""
    return iso.replace("T", " ").removesuffix("Z") + " UTC"


def folded(html: str) -> str:
    """The page's text without tags, white space folded."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@dataclass(frozen=True)
class Ledger:
    """The app and its changes' seqs: 1-3 user1..user3 created (user3 opted out), 4 user2's own
    STOP (an old one), 5 user3 opted in again through the API, 6 user1's new number."""

    app_id: str
    seqs: tuple[int, ...]


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    yield s
    s.close()


@pytest.fixture
def settings() -> Settings:
    return msgspec.structs.replace(
        load_settings(None, env={}),
        sinks=(
            WebhookSinkSettings(
                name="hook",
                channels=None,
                url="https://ops:pw-in-url@hooks.example/consent?token=tok-in-url",
                secret="hook-signing-secret",
                timeout=10.0,
            ),
            EumSinkSettings(
                name="eum",
                channels=frozenset({ChannelType.SMS, ChannelType.VOICE}),
                opt_out_list="OptOutList",
                region="us-east-1",
                endpoint_url=None,
                mirror_opt_in=True,
            ),
        ),
    )


@pytest.fixture
def ledger(store: SQLiteStore) -> Ledger:
    """Changes 1-6 (see ``Ledger``); "hook" delivered 1-3 and is behind; "eum" skipped 1-2,
    refused 3 (a dead letter), sent 4 and 6, and waits with 5."""
    app = store.create_app("optin-demo")
    store.put_channel(app.id, ChannelType.SMS, True, {})
    store.write_endpoints(
        app.id,
        [
            EndpointPatch(
                id=f"user{n}_+1234111111{n}",
                channel_type=ChannelType.SMS,
                address=f"+1234111111{n}",
                opt_out=OptOut.ALL if n == 3 else OptOut.NONE,
                user_id=f"user{n}",
                position=f"{n:020d}",
                source_time=f"{SOURCE_DAY}T00:00:0{n}.000Z",
            )
            for n in (1, 2, 3)
        ],
        Cause(CauseKind.SOURCE, ""),
    )
    store.record_end_user_opt_out(
        app.id, "+12341111112", STOPPED_AT, "eum-sms:OptOutList", keyword="STOP"
    )
    store.write_endpoints(
        app.id,
        [EndpointPatch(id="user3_+12341111113", opt_out=OptOut.NONE, opt_in_reason="web form")],
        Cause(CauseKind.API, "req-42", "key CONSOLEKEY"),
    )
    store.write_endpoints(
        app.id,
        [EndpointPatch(id="user1_+12341111111", address="+12341111119")],
        Cause(CauseKind.API, "req-43", "key CONSOLEKEY"),
    )
    seqs = tuple(c.seq for c in store.consent_changes(app.id, 0, 100))
    assert len(seqs) == 6, seqs
    s1, s2, s3, s4, s5, s6 = seqs

    assert store.claim_lease("sink:hook", "worker-a", 60)
    assert store.save_sink_progress(
        "hook", "worker-a", SinkProgress(app.id, s3, delivered=[(s1, s3, Delivered.SENT)])
    )
    assert store.claim_lease("sink:eum", "worker-b", 60)
    wait = SinkWaiting("eum", app.id, "+12341111113", s5, time.time() + 3600, DEFERRED, iso_now())
    assert store.save_sink_progress(
        "eum",
        "worker-b",
        SinkProgress(
            app.id,
            s6,
            delivered=[
                (s1, s2, Delivered.SKIPPED),
                (s4, s4, Delivered.SENT),
                (s6, s6, Delivered.SENT),
            ],
            dead=[(s3, REFUSED)],
            waiting=[wait],
        ),
    )
    return Ledger(app.id, seqs)


@pytest.fixture
def operator(store: SQLiteStore, settings: Settings, ledger: Ledger) -> Iterator[Client]:
    context = ConsoleContext(store=store, credentials=CREDENTIALS, secret="s" * 40)
    console = create_console(context, sinks=settings.sinks, audit=settings.audit)
    client = Client(PinpointApi(store, None, mounts={"/console": console}))
    assert client.sign_in().status_code == 303
    yield client
    client.close()


def section(html: str, anchor: str) -> str:
    """The text of the ``<section>`` with id ``anchor``, folded."""
    found = re.search(rf'<section[^>]* id="{anchor}">(.*?)</section>', html, flags=re.S)
    assert found, anchor
    return folded(found.group(1))


def history_rows(html: str) -> list[str]:
    """The endpoint page's consent history, newest first, one folded text per change."""
    body = html.split('id="history"', 1)[1].split("<tbody>", 1)[1]
    return [folded(r) for r in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S)]


def delivered_at(store: SQLiteStore, ledger: Ledger, sink: str, seq: int) -> str:
    row = next(r for r in store.audit([sink], app_id=ledger.app_id) if r.change.seq == seq)
    at = row.deliveries[sink]
    assert at is not None
    return at


# --------------------------------------------------------------------------------------------
# the Sinks page


def test_the_sinks_page_shows_each_sink_s_numbers(operator: Client, ledger: Ledger) -> None:
    page = operator.get("/console/sinks")
    assert page.status_code == 200
    assert 'href="/console/sinks" aria-current="page"' in page.text
    _, _, s3, _, _, s6 = ledger.seqs

    hook = section(page.text, "sink-hook")
    assert "webhook" in hook and "https://hooks.example/consent?…" in hook
    assert "delivered by worker-a" in hook
    cells = re.sub(r"\s+", " ", page.text.split('id="sink-hook"', 1)[1].split("</section>")[0])
    assert f'data-label="cursor">{s3}<' in cells and f'data-label="head">{s6}<' in cells
    assert 'data-label="behind">3<' in cells
    assert " s ago" in hook and "never" not in hook

    eum = section(page.text, "sink-eum")
    assert "eum-sms" in eum and "opt-out list OptOutList in us-east-1" in eum
    assert "Channels: SMS, VOICE" in eum and "delivered by worker-b" in eum
    assert "1 dead letters 1 waiting" in eum
    assert "caught up" in eum and re.search(r"1, next try \d{4}-\d\d-\d\d \d\d:\d\d", eum)


def test_the_sinks_page_shows_no_secret_of_a_sink(operator: Client) -> None:
    text = operator.get("/console/sinks").text
    for secret in ("pw-in-url", "tok-in-url", "hook-signing-secret", "ops:"):
        assert secret not in text


def test_the_sinks_page_says_when_nobody_delivers(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    store.release_lease("sink:hook", "worker-a")
    hook = section(operator.get("/console/sinks").text, "sink-hook")
    assert "no process holds it" in hook


def test_the_overdue_count_is_on_the_sinks_and_pipeline_pages(
    store: SQLiteStore, settings: Settings, ledger: Ledger
) -> None:
    """Overdue: user2's STOP (4) that "hook" has not reached, user3's opt-out (3) that "eum"
    refused; none while the deadline (24h) is ahead, both once it has passed."""
    for deadline, shown, css in ((86400.0, "0 (deadline 24h)", "muted"), (0.005, "2", "alert")):
        time.sleep(0.01)
        audit = dataclasses.replace(settings.audit, deadline=deadline)
        context = ConsoleContext(store=store, credentials=CREDENTIALS, secret="s" * 40)
        console = create_console(context, sinks=settings.sinks, audit=audit)
        client = Client(PinpointApi(store, None, mounts={"/console": console}))
        try:
            client.sign_in()
            for path in ("/console/sinks", "/console/pipeline"):
                line = re.search(r'<p class="(\w+)" id="overdue">(.*?)</p>', client.get(path).text)
                assert line, path
                assert line.group(1) == css
                assert f"opt-outs overdue: {shown}" in folded(line.group(2))
        finally:
            client.close()


def test_without_sinks_the_pages_say_how_to_add_one(store: SQLiteStore, ledger: Ledger) -> None:
    context = ConsoleContext(store=store, credentials=CREDENTIALS, secret="s" * 40)
    client = Client(PinpointApi(store, None, mounts={"/console": create_console(context)}))
    try:
        client.sign_in()
        assert "No sinks configured" in client.get("/console/sinks").text
        assert "opt-outs overdue" not in client.get("/console/pipeline").text
        page = client.get(f"/console/apps/{ledger.app_id}/endpoints/user3_%2B12341111113")
        assert page.status_code == 200 and "<th>Sinks</th>" not in page.text
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# one sink's page: dead letters and waits


def test_a_sink_page_lists_its_dead_letters_masked(operator: Client, ledger: Ledger) -> None:
    page = operator.get("/console/sinks/eum")
    assert page.status_code == 200
    dead = section(page.text, "dead")
    _, _, s3, _, s5, _ = ledger.seqs
    assert f"{s3} user3_+1234•••••13 +1234•••••13 (new) → ALL" in dead
    assert "ValidationException: +1234•••••13 is not a valid number" in dead
    assert "Send again" in dead and "Send all again" in dead
    waiting = section(page.text, "waiting")
    assert f"{s5} user3_+1234•••••13" in waiting and "at most once every 30 days" in waiting
    assert "+12341111113" not in page.text
    assert f'href="/console/apps/{ledger.app_id}/endpoints/user3_%2B12341111113"' in page.text


def test_a_sink_page_of_a_sink_without_trouble(operator: Client) -> None:
    page = operator.get("/console/sinks/hook")
    assert "None: the sink took every change it was given." in page.text
    assert "Nothing waits." in page.text and "Send all again" not in page.text


def test_an_unknown_sink_is_a_404_page(operator: Client) -> None:
    page = operator.get("/console/sinks/nope")
    assert page.status_code == 404 and "No such sink" in page.text


def test_send_again_needs_the_csrf_token(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    s3 = ledger.seqs[2]
    refused = operator.post("/console/sinks/eum/retry", {"seq": str(s3)})
    assert refused.status_code == 403
    refused = operator.post("/console/sinks/eum/retry", {"seq": str(s3), "csrf_token": "forged"})
    assert refused.status_code == 403
    assert [w.seq for w in store.sink_waiting("eum")] == [ledger.seqs[4]]


def test_send_again_moves_a_dead_letter_to_waiting(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    s3, s5 = ledger.seqs[2], ledger.seqs[4]
    token = CSRF.search(operator.get("/console/sinks/eum").text)
    assert token
    sent = operator.post("/console/sinks/eum/retry", {"seq": str(s3), "csrf_token": token[1]})
    assert sent.status_code == 303 and sent.headers["location"] == "/console/sinks/eum"
    waits = {w.seq: w for w in store.sink_waiting("eum")}
    assert set(waits) == {s3, s5} and waits[s3].not_before <= time.time()
    assert [d.seq for d in store.sink_dead_letters("eum")] == [s3]  # until the runner delivers
    page = operator.get("/console/sinks/eum")
    assert "Sent 1 dead letter again" in page.text
    dead = section(page.text, "dead")
    assert "sent again" in dead and ">Send again<" not in page.text
    assert f"{s3} user3_+1234•••••13" in section(page.text, "waiting")
    assert "at the next step" in section(page.text, "waiting")


def test_send_all_again_and_nothing_to_send(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    token = CSRF.search(operator.get("/console/sinks/eum").text)
    assert token
    assert operator.post("/console/sinks/eum/retry", {"csrf_token": token[1]}).status_code == 303
    assert ledger.seqs[2] in {w.seq for w in store.sink_waiting("eum")}
    operator.post("/console/sinks/hook/retry", {"csrf_token": token[1]})
    assert "No such dead letter" in operator.get("/console/sinks/hook").text
    bad = operator.post("/console/sinks/eum/retry", {"csrf_token": token[1], "seq": "3; drop"})
    assert bad.status_code == 400


# --------------------------------------------------------------------------------------------
# the endpoint page: causes and deliveries


def test_the_endpoint_page_shows_when_each_change_reached_each_sink(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    page = operator.get(f"/console/apps/{ledger.app_id}/endpoints/user3_%2B12341111113")
    assert page.status_code == 200 and "<th>Sinks</th>" in page.text
    newest, created = history_rows(page.text)
    assert "ALL → NONE" in newest and "api" in newest and "req-42" in newest
    assert "key CONSOLEKEY; opt-in reason: web form" in newest
    assert "hook : pending" in newest and "eum : waiting" in newest
    hook_at = delivered_at(store, ledger, "hook", ledger.seqs[2])
    assert "(new) → ALL" in created and "position 3" in created
    assert f"{SOURCE_DAY} 00:00:03.000 UTC" in created  # the source's commit time
    assert f"hook : {when(hook_at)}" in created and "eum : dead letter" in created
    assert "+12341111113" not in page.text


def test_the_endpoint_page_shows_an_end_user_s_stop_and_an_address_change(
    operator: Client, store: SQLiteStore, ledger: Ledger
) -> None:
    user2 = operator.get(f"/console/apps/{ledger.app_id}/endpoints/user2_%2B12341111112")
    stop = history_rows(user2.text)[0]
    assert "NONE → ALL" in stop and "end user" in stop
    assert f"keyword STOP, opted out at {STOPPED_AT}" in stop
    eum_at = delivered_at(store, ledger, "eum", ledger.seqs[3])
    assert f"eum : {when(eum_at)}" in stop and "hook : pending" in stop

    user1 = operator.get(f"/console/apps/{ledger.app_id}/endpoints/user1_%2B12341111111")
    moved, created = history_rows(user1.text)
    assert "+1234•••••11 → +1234•••••19" in moved
    assert "eum : skipped" in created
    assert "+12341111119" not in user1.text


def test_an_endpoint_s_journeys_are_the_audit_s_rows(
    store: SQLiteStore, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Walks split where the endpoint's changes are far apart find the same rows as one walk
    through everything, and read fewer of the app's other changes."""
    app_id = ledger.app_id
    for n in range(20):  # other changes between user1's
        store.write_endpoints(
            app_id,
            [EndpointPatch(id="user2_+12341111112", opt_out=OptOut.ALL if n % 2 else OptOut.NONE)],
            Cause(CauseKind.API, f"req-{n}"),
        )
    store.write_endpoints(
        app_id,
        [EndpointPatch(id="user1_+12341111111", opt_out=OptOut.ALL)],
        Cause(CauseKind.API, ""),
    )
    sinks = ["hook", "eum"]
    history = store.consent_history(app_id, "user1_+12341111111")
    assert len(history) == 3
    expected = {
        r.change.seq: r
        for r in store.audit(sinks, app_id=app_id)
        if r.change.endpoint_id == "user1_+12341111111"
    }
    walked: list[int] = []
    audit = store.audit

    def counting(
        sinks: Sequence[str], since: str | None = None, app_id: str | None = None
    ) -> Iterator[AuditRow]:
        for row in audit(sinks, since, app_id):
            walked.append(row.change.seq)
            yield row

    monkeypatch.setattr(store, "audit", counting)
    assert endpoint_journeys(store, sinks, app_id, history) == expected
    everything = len(walked)
    walked.clear()
    monkeypatch.setattr(console_sinks, "AUDIT_GAP", 3)
    assert endpoint_journeys(store, sinks, app_id, history) == expected
    assert len(walked) < everything
