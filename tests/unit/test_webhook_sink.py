"""The webhook sink: its signature, its body, what each answer means, and a ``SinkRunner`` over a
real ``SQLiteStore`` delivering to a real receiver on the loopback address.

The receiver (``tests/servers/webhook_receiver.py``) checks each signature with its own code,
not with ``optsync.sinks.webhook.verify``, so the sender is checked independently.
"""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import itertools
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import pytest
from ports import free_port
from webhook_receiver import SECRET, Element, WebhookReceiver
from webhook_receiver import webhook_receiver_fixture as _receiver_fixture  # noqa: F401 (the fixture)

from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    ConsentChange,
    EndpointDelete,
    EndpointPatch,
    OptOut,
)
from optsync.engine.sqlite import SQLiteStore
from optsync.sinks.base import Rejected, Sent, SinkUnavailable
from optsync.sinks.runner import SinkRunner
from optsync.sinks.settings import WebhookSinkSettings
from optsync.sinks.webhook import WebhookChange, WebhookEvent, WebhookSink, sign, verify

BODY = b'[{"id":"app-1","seq":1}]'
NOW = 1_767_225_600
FIELDS = [
    "id",
    "seq",
    "app",
    "endpoint_id",
    "channel",
    "address",
    "address_before",
    "user_id",
    "opt_out",
    "opt_out_before",
    "event",
    "cause",
    "source_position",
    "source_commit_time",
    "engine_time",
]
TIMEOUT = 30.0
CAPTURED = Cause(CauseKind.SOURCE, "0000000042")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> float:
    """Poll until ``condition`` holds; the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    deadline = started + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - started


def settings(url: str, secret: str = SECRET, timeout: float = 5.0) -> WebhookSinkSettings:
    return WebhookSinkSettings(name="hook", channels=None, url=url, secret=secret, timeout=timeout)


def change(
    seq: int,
    before: OptOut | None = OptOut.NONE,
    after: OptOut | None = OptOut.ALL,
    *,
    address: str = "+15550001",
    address_before: str | None = None,
    cause: Cause = CAPTURED,
) -> ConsentChange:
    return ConsentChange(
        endpoint_id=f"user{seq}_+15550001",
        at="2026-01-01T00:00:01.000Z",
        opt_out_before=before,
        opt_out_after=after,
        address=address,
        cause=cause,
        seq=seq,
        app_id="app",
        channel_type=ChannelType.SMS,
        user_id=f"user{seq}",
        source_time="2026-01-01T00:00:00.500Z",
        address_before=address_before,
    )


# -- sign and verify ---------------------------------------------------------------------------


def test_sign_is_the_documented_hmac_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"s3cret", b"%d.%s" % (NOW, BODY), hashlib.sha256).hexdigest()
    assert sign("s3cret", BODY, NOW) == f"t={NOW},v1={expected}"


def test_verify_accepts_a_good_signature_within_the_tolerance() -> None:
    header = sign("s3cret", BODY, NOW)
    assert verify("s3cret", BODY, header, now=NOW)
    assert verify("s3cret", BODY, header, now=NOW + 299)
    assert verify("s3cret", BODY, header, now=NOW - 299)


def test_verify_refuses_a_tampered_body() -> None:
    header = sign("s3cret", BODY, NOW)
    assert not verify("s3cret", BODY.replace(b"1", b"2"), header, now=NOW)
    assert not verify("s3cret", BODY + b" ", header, now=NOW)


def test_verify_refuses_another_secret() -> None:
    assert not verify("other", BODY, sign("s3cret", BODY, NOW), now=NOW)


@pytest.mark.parametrize("offset", [-301, 301, -86400])
def test_verify_refuses_a_timestamp_outside_the_tolerance(offset: int) -> None:
    header = sign("s3cret", BODY, NOW)
    assert not verify("s3cret", BODY, header, now=NOW + offset)
    assert verify("s3cret", BODY, header, now=NOW + offset, tolerance=abs(offset))


def test_verify_uses_the_clock_when_now_is_not_given() -> None:
    assert verify("s3cret", BODY, sign("s3cret", BODY, int(time.time())))
    assert not verify("s3cret", BODY, sign("s3cret", BODY, int(time.time()) - 3600))


def test_verify_accepts_any_of_several_v1_values() -> None:
    """A receiver rotating its secret can accept the old and the new one."""
    good = sign("s3cret", BODY, NOW).split(",")[1]
    header = f"t={NOW},v1={'0' * 64},{good}"
    assert verify("s3cret", BODY, header, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"t={NOW}",
        f"v1={'0' * 64}",
        f"t=,v1={'0' * 64}",
        f"t=1_767_225_600,v1={'0' * 64}",
        f"t=-5,v1={'0' * 64}",
        f"t={NOW},t={NOW},v1={'0' * 64}",
        f"t={NOW},v1=é",  # non-ASCII: compare_digest on str would raise
    ],
)
def test_verify_refuses_a_malformed_header(header: str) -> None:
    assert not verify("s3cret", BODY, header, now=NOW)


# -- the body ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "address_before", "event"),
    [
        (None, OptOut.NONE, None, WebhookEvent.CREATED),
        (OptOut.NONE, OptOut.ALL, None, WebhookEvent.OPT_OUT),
        (OptOut.ALL, OptOut.NONE, None, WebhookEvent.OPT_IN),
        (OptOut.ALL, None, None, WebhookEvent.DELETED),
        (OptOut.ALL, OptOut.ALL, "+15550009", WebhookEvent.ADDRESS_CHANGED),
        (OptOut.NONE, OptOut.ALL, "+15550009", WebhookEvent.OPT_OUT),
    ],
)
def test_each_change_names_its_event(
    before: OptOut | None, after: OptOut | None, address_before: str | None, event: WebhookEvent
) -> None:
    element = WebhookChange.of(change(1, before, after, address_before=address_before))
    assert element.event is event
    assert element.opt_out is after
    assert element.opt_out_before is before
    assert element.address_before == address_before


def test_an_element_has_the_documented_fields() -> None:
    decoded = msgspec.json.decode(msgspec.json.encode([WebhookChange.of(change(7))]))
    assert decoded == [
        {
            "id": "app-7",
            "seq": 7,
            "app": "app",
            "endpoint_id": "user7_+15550001",
            "channel": "SMS",
            "address": "+15550001",
            "address_before": None,
            "user_id": "user7",
            "opt_out": "ALL",
            "opt_out_before": "NONE",
            "event": "opt-out",
            "cause": {"kind": "source", "ref": "0000000042", "detail": ""},
            "source_position": "0000000042",
            "source_commit_time": "2026-01-01T00:00:00.500Z",
            "engine_time": "2026-01-01T00:00:01.000Z",
        }
    ]
    assert list(decoded[0]) == FIELDS


def test_source_position_is_only_given_for_a_captured_change() -> None:
    api = WebhookChange.of(change(1, cause=Cause(CauseKind.API, "req-1", "key K")))
    assert api.source_position is None
    assert (api.cause.kind, api.cause.ref, api.cause.detail) == (CauseKind.API, "req-1", "key K")


# -- deliver against a real receiver -----------------------------------------------------------


@pytest.fixture
def sink(webhook_receiver: WebhookReceiver) -> Iterator[WebhookSink]:
    hook = WebhookSink(settings(webhook_receiver.url))
    yield hook
    hook.close()


def test_a_2xx_answer_sends_the_batch_as_one_signed_array_in_order(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    batch = [change(3), change(4, OptOut.ALL, OptOut.NONE), change(5, None, OptOut.NONE)]
    assert sink.deliver(batch) == [Sent(), Sent(), Sent()]
    assert webhook_receiver.refused == []
    (request,) = webhook_receiver.requests
    assert request.ids == ("app-3", "app-4", "app-5")
    assert [e["event"] for e in webhook_receiver.received] == ["opt-out", "opt-in", "created"]
    assert request.headers["content-type"] == "application/json"
    assert uuid.UUID(request.headers["optsync-delivery"]).version == 4


def test_every_request_gets_its_own_delivery_id_over_one_connection(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    for seq in range(1, 6):
        assert sink.deliver([change(seq)]) == [Sent()]
    requests = webhook_receiver.requests
    assert len({r.headers["optsync-delivery"] for r in requests}) == 5
    assert len({r.client for r in requests}) == 1, "a new connection per request"


def test_an_empty_batch_sends_nothing(sink: WebhookSink, webhook_receiver: WebhookReceiver) -> None:
    assert sink.deliver([]) == []
    assert webhook_receiver.requests == []


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_a_retryable_answer_makes_the_batch_wait(
    sink: WebhookSink, webhook_receiver: WebhookReceiver, status: int
) -> None:
    webhook_receiver.answer(status, body=b"busy, come back later")
    with pytest.raises(SinkUnavailable) as raised:
        sink.deliver([change(1)])
    assert f"answered {status} " in str(raised.value)
    assert "busy, come back later" in str(raised.value)
    assert raised.value.retry_after is None
    assert sink.deliver([change(1)]) == [Sent()]  # the connection is still usable


def test_retry_after_in_seconds_is_honoured(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.answer(429, retry_after="7")
    with pytest.raises(SinkUnavailable) as raised:
        sink.deliver([change(1)])
    assert raised.value.retry_after == 7.0


def test_retry_after_as_an_http_date_is_honoured(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.answer(503, retry_after=email.utils.formatdate(time.time() + 120, usegmt=True))
    with pytest.raises(SinkUnavailable) as raised:
        sink.deliver([change(1)])
    assert raised.value.retry_after is not None
    assert 115 <= raised.value.retry_after <= 121


def test_a_huge_retry_after_is_capped_at_an_hour(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.answer(503, retry_after="999999999")
    with pytest.raises(SinkUnavailable) as raised:
        sink.deliver([change(1)])
    assert raised.value.retry_after == 3600.0


@pytest.mark.parametrize("status", [400, 409, 410, 422])
def test_another_4xx_rejects_each_change_naming_the_status_and_the_body(
    sink: WebhookSink, webhook_receiver: WebhookReceiver, status: int
) -> None:
    answer = "x" * 190 + "0123456789" + "never shown"
    webhook_receiver.answer(status, body=answer.encode())
    outcomes = sink.deliver([change(1), change(2)])
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert isinstance(outcome, Rejected)
        assert outcome.reason.startswith(f"the receiver answered {status} ")
        assert outcome.reason.endswith(answer[:200])
        assert "never shown" not in outcome.reason


@pytest.mark.parametrize("status", [401, 403, 404, 301])
def test_an_answer_that_says_the_configuration_is_wrong_waits_instead_of_dead_letters(
    sink: WebhookSink, webhook_receiver: WebhookReceiver, status: int
) -> None:
    """Wrong secret or URL: the changes are fine, so nothing becomes a dead letter."""
    webhook_receiver.answer(status)
    with pytest.raises(SinkUnavailable, match=f"answered {status} "):
        sink.deliver([change(1)])


def test_a_wrong_secret_is_refused_by_the_receiver_and_waits(
    webhook_receiver: WebhookReceiver,
) -> None:
    sink = WebhookSink(settings(webhook_receiver.url, secret="not-the-one"))
    with closing(sink), pytest.raises(SinkUnavailable, match="answered 401 Unauthorized"):
        sink.deliver([change(1)])
    (refusal,) = webhook_receiver.refused
    assert "does not match" in refusal.reason
    assert webhook_receiver.received == []


def test_connection_refused_makes_the_batch_wait() -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    sink = WebhookSink(settings(url))
    with closing(sink), pytest.raises(SinkUnavailable, match="unreachable"):
        sink.deliver([change(1)])


def test_a_receiver_slower_than_the_timeout_makes_the_batch_wait(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.delay = 2.0
    with closing(WebhookSink(settings(webhook_receiver.url, timeout=0.3))) as sink:
        started = time.monotonic()
        with pytest.raises(SinkUnavailable, match=r"no answer within 0\.3 s"):
            sink.deliver([change(1)])
    assert time.monotonic() - started < 1.5


def test_the_sink_reconnects_after_the_receiver_restarts(
    sink: WebhookSink, webhook_receiver: WebhookReceiver
) -> None:
    assert sink.deliver([change(1)]) == [Sent()]
    webhook_receiver.stop()
    with pytest.raises(SinkUnavailable):
        sink.deliver([change(2)])
    webhook_receiver.start()
    assert sink.deliver([change(2)]) == [Sent()]
    assert [e["seq"] for e in webhook_receiver.received] == [1, 2]


def test_credentials_in_the_url_go_as_basic_auth_and_never_into_target(
    webhook_receiver: WebhookReceiver,
) -> None:
    url = webhook_receiver.url.replace("http://", "http://ops%40acme:p%3Ass@") + "?token=abc"
    webhook_receiver.path += "?token=abc"
    with closing(WebhookSink(settings(url))) as sink:
        assert sink.target == webhook_receiver.url.removesuffix("?token=abc")
        assert "p%3Ass" not in sink.target and "token" not in sink.target
        assert sink.deliver([change(1)]) == [Sent()]
    (request,) = webhook_receiver.requests
    assert request.headers["authorization"] == "Basic b3BzQGFjbWU6cDpzcw=="  # ops@acme:p:ss


# -- the receiver example of docs/sinks.md ----------------------------------------------------

DOCS = Path(__file__).parents[2] / "docs" / "sinks.md"


def docs_receiver() -> dict[str, Any]:
    """The names the Python block of the ``## Webhook`` section defines, run as written."""
    text = DOCS.read_text()
    start = text.index("\n## Webhook\n")
    end = text.find("\n## ", start + 1)
    (block,) = re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)
    names: dict[str, Any] = {"__name__": "docs_receiver"}
    exec(compile(block, str(DOCS), "exec"), names)
    return names


def test_the_docs_receiver_checks_signatures_as_optsync_makes_them() -> None:
    verified = docs_receiver()["verified"]
    now = int(time.time())
    assert verified("s3cret", BODY, sign("s3cret", BODY, now))
    assert not verified("s3cret", BODY + b" ", sign("s3cret", BODY, now))
    assert not verified("other", BODY, sign("s3cret", BODY, now))
    assert not verified("s3cret", BODY, sign("s3cret", BODY, now - 301))
    assert not verified("s3cret", BODY, f"t={now},v1=é")


def test_the_docs_receiver_takes_a_delivery_and_refuses_a_wrong_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver = docs_receiver()["Receiver"]
    receiver.secret = SECRET
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        with closing(WebhookSink(settings(url))) as sink:
            assert sink.deliver([change(1), change(2)]) == [Sent(), Sent()]
            assert sink.deliver([change(2), change(3)]) == [Sent(), Sent()]
        wrong = WebhookSink(settings(url, secret="wrong"))
        with closing(wrong), pytest.raises(SinkUnavailable, match="answered 401"):
            wrong.deliver([change(4)])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"opt-out user{n}_+15550001 ALL" for n in (1, 2, 3)]


# -- a SinkRunner over a real store -------------------------------------------------------------

SOURCE = Cause(CauseKind.SOURCE, "")


class App:
    """An app in a real SQLite engine, written to as the apply worker would."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.id = store.create_app("hooks").id
        self._positions = itertools.count(1)

    def write(self, *writes: tuple[int, OptOut | None]) -> None:
        """(user, OptOut) pairs, in one transaction; None deletes the user's endpoint."""
        batch: list[EndpointPatch | EndpointDelete] = []
        for user, opt_out in writes:
            position = f"{next(self._positions):012d}"
            if opt_out is None:
                batch.append(EndpointDelete(id=endpoint(user), position=position))
            else:
                batch.append(
                    EndpointPatch(
                        id=endpoint(user),
                        channel_type=ChannelType.SMS,
                        address=number(user),
                        opt_out=opt_out,
                        user_id=f"user{user}",
                        position=position,
                    )
                )
        self.store.write_endpoints(self.id, batch, SOURCE)

    def history(self) -> list[ConsentChange]:
        return self.store.consent_changes(self.id, 0, 1_000_000)

    def caught_up(self, sink: str = "hook") -> bool:
        return all(s.behind == 0 for s in self.store.sink_states(sink))


def endpoint(user: int) -> str:
    return f"user{user}_{number(user)}"


def number(user: int) -> str:
    return f"+1555010{user:04d}"


def flips(users: Sequence[int], rounds: int) -> list[tuple[int, OptOut | None]]:
    """Each user created opted in, then flipped ``rounds`` times."""
    writes: list[tuple[int, OptOut | None]] = [(u, OptOut.NONE) for u in users]
    for r in range(rounds):
        writes += [(u, OptOut.ALL if r % 2 == 0 else OptOut.NONE) for u in users]
    return writes


def per_endpoint_seqs(elements: Sequence[Element]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = {}
    for element in elements:
        seqs.setdefault(element["endpoint_id"], []).append(element["seq"])
    return seqs


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with closing(SQLiteStore(tmp_path / "engine.db")) as opened:
        yield opened


@pytest.fixture
def app(store: SQLiteStore) -> App:
    return App(store)


@pytest.fixture
def runner(store: SQLiteStore, webhook_receiver: WebhookReceiver) -> Iterator[SinkRunner]:
    running = SinkRunner(store, WebhookSink(settings(webhook_receiver.url)), "test", poll=0.02)
    running.start()
    yield running
    running.stop()


def test_the_runner_delivers_every_change_once_in_seq_order(
    app: App, runner: SinkRunner, webhook_receiver: WebhookReceiver
) -> None:
    for start in range(0, 30, 10):  # three commits, as three source transactions
        app.write(*flips(range(start, start + 10), 5))
    wait_until(app.caught_up, "the sink to catch up")
    history = app.history()
    assert len(history) == 30 * 6
    assert [e["id"] for e in webhook_receiver.received] == [c.change_id for c in history]
    assert webhook_receiver.refused == []
    assert len(webhook_receiver.requests) >= 2  # 180 changes, batches of 100 at most
    assert max(len(r.ids) for r in webhook_receiver.requests) <= 100
    rows = list(app.store.audit(["hook"], app_id=app.id))
    assert {r.outcomes["hook"] for r in rows} == {"sent"}


def test_an_outage_loses_nothing_and_keeps_per_endpoint_order(
    app: App, runner: SinkRunner, webhook_receiver: WebhookReceiver
) -> None:
    app.write(*flips(range(5), 1))
    wait_until(app.caught_up, "the first changes")
    webhook_receiver.stop()
    app.write(*flips(range(5, 10), 2))
    app.write((0, OptOut.NONE), (1, OptOut.NONE), (2, None))
    wait_until(lambda: runner.stats.failures >= 2, "two failed attempts")
    assert not app.caught_up()
    webhook_receiver.start()
    took = wait_until(app.caught_up, "the sink to recover")
    print(f"caught up {took:.2f} s after the receiver came back")

    history = app.history()
    assert [e["id"] for e in webhook_receiver.first_arrivals()] == [c.change_id for c in history]
    for seqs in per_endpoint_seqs(webhook_receiver.received).values():
        assert seqs == sorted(seqs)
    assert [e["event"] for e in webhook_receiver.received[-3:]] == ["opt-in", "opt-in", "deleted"]
    assert app.store.sink_dead_letters("hook") == []


def test_failing_answers_are_retried_after_the_backoff_or_retry_after(
    app: App, runner: SinkRunner, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.answer(500)
    webhook_receiver.answer(429, retry_after="2")
    app.write(*flips(range(5), 2))
    wait_until(app.caught_up, "the sink to deliver")

    first, second, third = webhook_receiver.requests
    assert [first.status, second.status, third.status] == [500, 429, 200]
    assert first.ids == second.ids == third.ids
    backoff, told = second.at - first.at, third.at - second.at
    print(f"retried after {backoff:.2f} s (backoff), then {told:.2f} s (Retry-After: 2)")
    assert backoff < 1.5
    assert told >= 1.95, f"Retry-After: 2 not honoured: the next attempt came {told:.2f} s later"
    assert [e["id"] for e in webhook_receiver.received] == [c.change_id for c in app.history()]


def test_a_400_leaves_dead_letters_that_can_be_delivered_again(
    app: App, runner: SinkRunner, webhook_receiver: WebhookReceiver
) -> None:
    app.write(*flips(range(3), 1))
    wait_until(app.caught_up, "the first changes")
    webhook_receiver.answer(400, body=b'{"error":"unknown channel"}')
    app.write((10, OptOut.ALL), (11, OptOut.NONE))  # one commit: one batch, refused
    wait_until(lambda: len(app.store.sink_dead_letters("hook")) == 2, "two dead letters")
    app.write((0, OptOut.NONE))  # the sink moves on past them
    wait_until(app.caught_up, "the next change")

    letters = app.store.sink_dead_letters("hook")
    assert [letter.change.endpoint_id for letter in letters if letter.change] == [
        endpoint(10),
        endpoint(11),
    ]
    for letter in letters:
        assert (
            "answered 400 Bad Request" in letter.reason
            and '{"error":"unknown channel"}' in letter.reason
        )
    rejected_ids = {
        c.change_id for c in app.history() if c.endpoint_id in {endpoint(10), endpoint(11)}
    }
    assert not rejected_ids & webhook_receiver.received_ids()

    assert app.store.retry_sink_dead_letters("hook") == 2
    wait_until(lambda: app.store.sink_dead_letters("hook") == [], "the dead letters to go")
    assert rejected_ids <= webhook_receiver.received_ids()
    assert webhook_receiver.received_ids() == {c.change_id for c in app.history()}
    rows = {r.change.change_id: r for r in app.store.audit(["hook"], app_id=app.id)}
    assert {rows[i].outcomes["hook"] for i in rejected_ids} == {"sent"}
