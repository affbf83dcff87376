"""The console in-process (httpx's ASGI transport, mounted in ``PinpointApi`` as ``serve`` does):
sign-in, sessions, CSRF, masking, segment forms, the pipeline page."""

from __future__ import annotations

import asyncio
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from optsync.api.app import PinpointApi
from optsync.apply.dlq import DeadLetter
from optsync.capture.mysql.position import CaptureState as MySQLState
from optsync.capture.mysql.position import LogPosition
from optsync.capture.postgres.position import CaptureState as PostgresState
from optsync.capture.postgres.position import parse_lsn
from optsync.capture.sqlite.position import CaptureState as SQLiteState
from optsync.capture.states import describe_state
from optsync.console import ConsoleContext, create_console
from optsync.console.app import COOKIE
from optsync.console.auth import key_pair_matches
from optsync.console.pipeline import ThroughputMeter
from optsync.console.search import address_forms, find_endpoints
from optsync.console.segments import SegmentForm
from optsync.engine.models import (
    Cause,
    CauseKind,
    ChannelType,
    EndpointPatch,
    OptOut,
)
from optsync.engine.segments import definition_from_wire, definition_to_wire
from optsync.engine.sqlite import SQLiteStore
from optsync.errors import ConfigError
from optsync.redaction import mask_address, mask_text
from optsync.status import SegmentCount, Status
from optsync.web.session import load_or_create_secret

BASE = "http://testserver"
KEY_ID, SECRET = "CONSOLEKEY", "console-secret-1"
CREDENTIALS = {KEY_ID: SECRET, "OTHERKEY": "other-secret"}
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Client:
    """A cookie-keeping client over the ASGI app, with blocking calls for readable tests."""

    def __init__(self, app: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._runner.run(self._client.request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, data: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, data=data, **kwargs)

    def token(self, path: str = "/console/login") -> str:
        """The CSRF token of the form on ``path``."""
        found = CSRF.search(self.get(path).text)
        assert found, path
        return found.group(1)

    def sign_in(self, key_id: str = KEY_ID, secret: str = SECRET) -> httpx.Response:
        return self.post(
            "/console/login",
            {"key_id": key_id, "secret": secret, "csrf_token": self.token(), "next": "/console/"},
        )

    @property
    def cookies(self) -> httpx.Cookies:
        return self._client.cookies

    def close(self) -> None:
        self._runner.run(self._client.aclose())
        self._runner.close()


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    yield s
    s.close()


@pytest.fixture
def app_id(store: SQLiteStore) -> str:
    """An app with SMS enabled, user1..user3 (user3 opted out) and US-Segment."""
    app = store.create_app("optin-demo")
    store.put_channel(app.id, ChannelType.SMS, True, {})
    writes = [
        EndpointPatch(
            id=f"user{n}_+1234111111{n}",
            channel_type=ChannelType.SMS,
            address=f"+1234111111{n}",
            opt_out=OptOut.ALL if n == 3 else OptOut.NONE,
            user_id=f"user{n}",
            position=f"{n:020d}",
        )
        for n in (1, 2, 3)
    ]
    store.write_endpoints(app.id, writes, Cause(CauseKind.SOURCE, ""))
    wire = {"Name": "US-Segment", "Dimensions": {"Location": {"Country": {"Values": ["US"]}}}}
    store.create_segment(app.id, definition_from_wire(wire, require_name=True))
    return app.id


def make_client(context: ConsoleContext) -> Client:
    api = PinpointApi(context.store, None, mounts={"/console": create_console(context)})
    return Client(api)


@pytest.fixture
def context(store: SQLiteStore, app_id: str) -> ConsoleContext:
    return ConsoleContext(store=store, credentials=CREDENTIALS, secret="s" * 40)


@pytest.fixture
def client(context: ConsoleContext) -> Iterator[Client]:
    c = make_client(context)
    yield c
    c.close()


@pytest.fixture
def operator(client: Client) -> Client:
    """A client signed in with the first key pair."""
    assert client.sign_in().status_code == 303
    return client


def segment_id(store: SQLiteStore, app_id: str, name: str) -> str:
    return next(
        s.id for s in store.list_segments(app_id, 100, None).items if s.definition.name == name
    )


# --------------------------------------------------------------------------------------------
# sign-in and sessions


def test_a_page_without_a_session_redirects_to_the_sign_in_page(
    client: Client, app_id: str
) -> None:
    response = client.get(f"/console/apps/{app_id}/segments")
    assert response.status_code == 303
    assert response.headers["location"] == f"/console/login?next=/console/apps/{app_id}/segments"
    login = client.get(response.headers["location"])
    assert login.status_code == 200
    assert 'name="key_id"' in login.text and 'type="password"' in login.text
    assert f'value="/console/apps/{app_id}/segments"' in login.text  # comes back after sign-in
    assert "optin-demo" not in login.text


def test_page_scripts_without_a_session_get_401(
    client: Client, store: SQLiteStore, app_id: str
) -> None:
    seg = segment_id(store, app_id, "US-Segment")
    response = client.get(f"/console/apps/{app_id}/segments/{seg}/estimate")
    assert response.status_code == 401
    assert response.json() == {"error": "signed out"}


def test_sign_in_sets_a_signed_httponly_samesite_cookie_scoped_to_the_console(
    client: Client,
) -> None:
    response = client.sign_in()
    assert response.status_code == 303
    assert response.headers["location"] == "/console/"
    cookie = next(v for k, v in response.headers.multi_items() if k == "set-cookie")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert cookie.startswith(f"{COOKIE}=")
    assert {"httponly", "samesite", "path", "max-age"} <= attributes
    assert "samesite=strict" in cookie.lower() and "path=/console;" in cookie.lower()
    assert SECRET not in cookie
    home = client.get("/console/")
    assert home.status_code == 200
    assert "optin-demo" in home.text and KEY_ID in home.text


@pytest.mark.parametrize(
    ("key_id", "secret"),
    [(KEY_ID, "wrong"), ("NOSUCHKEY", SECRET), (KEY_ID, "other-secret"), ("", "")],
)
def test_a_wrong_key_pair_is_refused(client: Client, key_id: str, secret: str) -> None:
    response = client.sign_in(key_id, secret)
    assert response.status_code == 401
    assert "do not match a configured key pair" in response.text
    assert client.get("/console/").status_code == 303


def test_key_pairs_are_compared_whole() -> None:
    assert key_pair_matches(CREDENTIALS, KEY_ID, SECRET)
    assert key_pair_matches(CREDENTIALS, "OTHERKEY", "other-secret")
    assert not key_pair_matches(CREDENTIALS, KEY_ID, "other-secret")
    assert not key_pair_matches(CREDENTIALS, KEY_ID, SECRET + "x")
    assert not key_pair_matches(CREDENTIALS, KEY_ID + "\0" + SECRET[:3], SECRET[3:])
    assert not key_pair_matches({}, KEY_ID, SECRET)


def test_sign_in_starts_a_new_session_with_a_new_form_token(client: Client) -> None:
    before = client.token()
    client.sign_in()
    after = client.token("/console/")
    assert before != after


def test_sign_out_ends_the_session(operator: Client) -> None:
    response = operator.post("/console/logout", {"csrf_token": operator.token("/console/")})
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"
    assert operator.get("/console/").status_code == 303


def test_a_tampered_cookie_is_no_session(operator: Client) -> None:
    value = operator.cookies[COOKIE]
    operator.cookies.clear()
    operator.cookies.set(COOKIE, value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert operator.get("/console/").status_code == 303


def test_a_session_whose_key_pair_is_gone_is_signed_out(
    operator: Client, context: ConsoleContext
) -> None:
    cookie = operator.cookies[COOKIE]
    narrower = ConsoleContext(context.store, {"OTHERKEY": "other-secret"}, context.secret)
    other = make_client(narrower)
    try:
        other.cookies.set(COOKIE, cookie)
        assert other.get("/console/").status_code == 303
    finally:
        other.close()


@pytest.mark.parametrize("target", ["//evil.example/x", "https://evil.example/", "/elsewhere"])
def test_sign_in_never_redirects_out_of_the_console(client: Client, target: str) -> None:
    response = client.post(
        "/console/login",
        {"key_id": KEY_ID, "secret": SECRET, "csrf_token": client.token(), "next": target},
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/console/"


def test_the_cookie_secret_is_created_once_with_mode_600(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path)
    assert len(first) >= 40
    assert stat.S_IMODE((tmp_path / "console-secret").stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path) == first


def test_an_empty_secret_file_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "console-secret").write_text("\n")
    with pytest.raises(ConfigError, match="holds no usable secret"):
        load_or_create_secret(tmp_path)


# --------------------------------------------------------------------------------------------
# CSRF


def test_a_form_post_without_the_csrf_token_is_refused(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    form = {"name": "Sneaky", "country-type": "INCLUSIVE", "country-values": "US"}
    response = operator.post(f"/console/apps/{app_id}/segments", form)
    assert response.status_code == 403
    assert "the form has no token" in response.text
    assert "<html" in response.text  # the 403 page, not a bare string
    forged = operator.post(f"/console/apps/{app_id}/segments", form | {"csrf_token": "forged"})
    assert forged.status_code == 403
    names = {s.definition.name for s in store.list_segments(app_id, 100, None).items}
    assert "Sneaky" not in names


def test_sign_in_itself_needs_the_csrf_token(client: Client) -> None:
    response = client.post("/console/login", {"key_id": KEY_ID, "secret": SECRET})
    assert response.status_code == 403
    assert client.get("/console/").status_code == 303


def test_a_post_from_another_site_is_refused_even_with_the_token(
    operator: Client, app_id: str
) -> None:
    token = operator.token("/console/")
    response = operator.post(
        "/console/reveal",
        {"csrf_token": token, "reveal": "on", "next": "/console/"},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert "another site" in response.text


def test_every_form_of_a_page_carries_the_token(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    seg = segment_id(store, app_id, "US-Segment")
    for path in (f"/console/apps/{app_id}/segments/{seg}", f"/console/apps/{app_id}/segments/new"):
        html = operator.get(path).text
        forms = re.findall(r"<form[^>]*method=\"post\".*?</form>", html, flags=re.S)
        assert forms, path
        assert all('name="csrf_token"' in f for f in forms), path


# --------------------------------------------------------------------------------------------
# masking and endpoints


def test_addresses_are_masked_keeping_a_hint() -> None:
    assert mask_address("+12341111111") == "+1234•••••11"
    assert mask_address("jane.doe@example.com") == "j•••@example.com"
    assert mask_address("abcdefghijklmnop") == "abcd••••••••••op"
    assert mask_address("12") == "•12"
    assert mask_address(None) == ""
    assert mask_text("user1_+12341111111") == "user1_+1234•••••11"
    assert mask_text("bad phone 12341111111 for x@y.org") == "bad phone 12341••••11 for x•••@y.org"


def test_search_masks_addresses_until_the_operator_asks(operator: Client, app_id: str) -> None:
    page = operator.get(f"/console/apps/{app_id}/endpoints", params={"q": "user1"})
    assert page.status_code == 200
    assert "+1234•••••11" in page.text
    assert "+12341111111" not in page.text
    token = CSRF.search(page.text)
    assert token
    here = f"/console/apps/{app_id}/endpoints?q=user1"
    shown = operator.post(
        "/console/reveal", {"csrf_token": token.group(1), "reveal": "on", "next": here}
    )
    assert shown.status_code == 303 and shown.headers["location"] == here
    assert "+12341111111" in operator.get(here).text
    operator.post("/console/reveal", {"csrf_token": token.group(1), "reveal": "off", "next": here})
    assert "+12341111111" not in operator.get(here).text


@pytest.mark.parametrize(
    "query", ["+12341111112", "+1 (234) 111-1112", "12341111112", "USER2_+12341111112"]
)
def test_search_finds_by_address_in_any_spelling_and_by_id(
    operator: Client, app_id: str, query: str
) -> None:
    page = operator.get(f"/console/apps/{app_id}/endpoints", params={"q": query})
    assert "user2_+1234•••••12" in page.text
    assert "user1_" not in page.text


@pytest.fixture
def user6(store: SQLiteStore, app_id: str) -> str:
    """user6 of the AWS sample, beside user1..user3."""
    patch = EndpointPatch(
        id="user6_+12341111116",
        channel_type=ChannelType.SMS,
        address="+12341111116",
        opt_out=OptOut.NONE,
        user_id="user6",
        position=f"{6:020d}",
    )
    store.write_endpoints(app_id, [patch], Cause(CauseKind.SOURCE, ""))
    return patch.id


@pytest.mark.parametrize(
    "query",
    [
        "(234) 111-1116",
        "2341111116",
        "234-111-1116",
        "234 111 1116",
        "1 234 111 1116",
        "+1 234 111 1116",
        "USER6",
        "User6",
        " user6 ",
        "USER6_+12341111116",
    ],
)
def test_search_finds_user6_as_people_type_it(
    store: SQLiteStore, app_id: str, user6: str, query: str
) -> None:
    """Issue 13: national numbers were read as +234 (Nigeria), user ids only in their own case."""
    assert [e.id for e in find_endpoints(store, app_id, query)] == [user6]


def test_the_search_page_finds_a_national_number(operator: Client, app_id: str, user6: str) -> None:
    page = operator.get(f"/console/apps/{app_id}/endpoints", params={"q": "(234) 111-1116"})
    assert "user6_+1234•••••16" in page.text
    assert "No endpoint of" not in page.text


def test_address_forms() -> None:
    assert address_forms("+1 (234) 111-1111") == ["+1 (234) 111-1111", "+12341111111"]
    assert address_forms("Jane@Example.com") == ["Jane@Example.com", "jane@example.com"]
    assert address_forms("user1") == ["user1"]
    assert address_forms("(234) 111-1116") == ["(234) 111-1116", "+12341111116"]  # US
    assert address_forms("442071234567") == ["442071234567", "+442071234567"]  # not US: +44
    assert address_forms("(234) 111-1116", "GB") == ["(234) 111-1116", "+442341111116"]


def test_the_endpoint_page_shows_attributes_and_consent_history(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    endpoint_id = "user1_+12341111111"
    store.write_endpoints(
        app_id,
        [EndpointPatch(id=endpoint_id, opt_out=OptOut.ALL, position=f"{42:020d}")],
        Cause(CauseKind.SOURCE, ""),
    )
    page = operator.get(f"/console/apps/{app_id}/endpoints/user1_%2B12341111111")
    assert page.status_code == 200
    history = page.text.split('id="history"', 1)[1].split("<tbody>", 1)[1]
    rows = re.findall(r"<tr>(.*?)</tr>", history, flags=re.S)
    assert len(rows) == 2
    newest = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", rows[0]))
    assert "NONE → ALL" in newest
    assert "source" in newest and "position 42" in newest
    assert "+1234•••••11" in newest
    assert "opted out" in page.text and "user1" in page.text and "US" in page.text


def test_an_endpoint_id_with_a_slash_has_its_page(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    store.write_endpoints(
        app_id,
        [EndpointPatch(id="team/a", channel_type=ChannelType.EMAIL, address="a@example.com")],
        Cause(CauseKind.API, "req-1"),
    )
    search = operator.get(f"/console/apps/{app_id}/endpoints", params={"q": "team/a"})
    assert f"/console/apps/{app_id}/endpoints/team%2Fa" in search.text
    page = operator.get(f"/console/apps/{app_id}/endpoints/team%2Fa")
    assert page.status_code == 200
    assert "a•••@example.com" in page.text and "req-1" in page.text


def test_an_unknown_endpoint_is_a_404_page(operator: Client, app_id: str) -> None:
    page = operator.get(f"/console/apps/{app_id}/endpoints/nobody")
    assert page.status_code == 404
    assert "No such endpoint" in page.text


# --------------------------------------------------------------------------------------------
# segments


def test_a_segment_created_through_the_form_is_the_api_s_segment(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    token = operator.token(f"/console/apps/{app_id}/segments/new")
    form = {
        "csrf_token": token,
        "name": "US SMS gold",
        "country-type": "INCLUSIVE",
        "country-values": "us",
        "demo-Channel-type": "INCLUSIVE",
        "demo-Channel-values": ["SMS", "EMAIL"],
        "demo-Platform-type": "EXCLUSIVE",
        "demo-Platform-values": "ios",
        "attr-0-scope": "Attributes",
        "attr-0-name": "plan",
        "attr-0-type": "CONTAINS",
        "attr-0-values": "gold, plat",
        "attr-1-scope": "Attributes",
        "attr-1-name": "",
        "attr-1-type": "INCLUSIVE",
        "attr-1-values": "",
        "metric-0-name": "purchases",
        "metric-0-operator": "GREATER_THAN_OR_EQUAL",
        "metric-0-value": "2",
    }
    response = operator.post(f"/console/apps/{app_id}/segments", form)
    assert response.status_code == 303, response.text
    created = segment_id(store, app_id, "US SMS gold")
    assert response.headers["location"] == f"/console/apps/{app_id}/segments/{created}"
    wire = definition_to_wire(store.get_segment(app_id, created).definition)
    assert wire == {
        "Dimensions": {
            "Location": {"Country": {"DimensionType": "INCLUSIVE", "Values": ["US"]}},
            "Demographic": {
                "Channel": {"DimensionType": "INCLUSIVE", "Values": ["SMS", "EMAIL"]},
                "Platform": {"DimensionType": "EXCLUSIVE", "Values": ["ios"]},
            },
            "Attributes": {"plan": {"AttributeType": "CONTAINS", "Values": ["gold", "plat"]}},
            "Metrics": {"purchases": {"ComparisonOperator": "GREATER_THAN_OR_EQUAL", "Value": 2.0}},
        }
    }
    page = operator.get(response.headers["location"])
    assert "Attribute plan contains gold, plat" in page.text
    assert "Metric purchases ≥ 2" in page.text


def test_the_live_estimate_answers_small_json(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    seg = segment_id(store, app_id, "US-Segment")
    body = operator.get(f"/console/apps/{app_id}/segments/{seg}/estimate").json()
    assert (body["total"], body["eligible"]) == (3, 2)
    store.write_endpoints(
        app_id,
        [EndpointPatch(id="user1_+12341111111", opt_out=OptOut.ALL)],
        Cause(CauseKind.API, "r"),
    )
    body = operator.get(f"/console/apps/{app_id}/segments/{seg}/estimate").json()
    assert (body["total"], body["eligible"]) == (3, 1)
    page = operator.get(f"/console/apps/{app_id}/segments/{seg}")
    assert 'id="eligible"' in page.text and 'id="chart"' in page.text
    assert f'data-url="/console/apps/{app_id}/segments/{seg}/estimate"' in page.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"country-values": "ZZZ"}, "is not an ISO 3166-1 alpha-2 or alpha-3 country code"),
        ({"name": ""}, "Name is required"),
        ({"attr-0-name": "", "attr-0-values": "x"}, "Attribute row 1: give the attribute"),
        ({"attr-0-name": "since", "attr-0-type": "BEFORE", "attr-0-values": "soon"}, "ISO-8601"),
        ({"metric-0-name": "n", "metric-0-value": "many"}, "Metric row 1: 'many' is not a number"),
        ({"metric-0-name": "n", "metric-0-value": "nan"}, "Metric row 1: 'nan' is not a number"),
    ],
)
def test_form_errors_are_the_api_s_and_keep_the_input(
    operator: Client, app_id: str, fields: dict[str, str], message: str
) -> None:
    form = {
        "csrf_token": operator.token(f"/console/apps/{app_id}/segments/new"),
        "name": "Kept name",
        "country-type": "INCLUSIVE",
        "country-values": "",
        "attr-0-scope": "Attributes",
        "attr-0-name": "",
        "attr-0-type": "INCLUSIVE",
        "attr-0-values": "",
        "metric-0-name": "",
        "metric-0-operator": "EQUAL",
        "metric-0-value": "",
    } | fields
    response = operator.post(f"/console/apps/{app_id}/segments", form)
    assert response.status_code == 400
    assert message in response.text.replace("&#39;", "'")
    if form["name"]:
        assert 'value="Kept name"' in response.text


def test_editing_a_segment_adds_a_version(
    operator: Client, store: SQLiteStore, app_id: str
) -> None:
    seg = segment_id(store, app_id, "US-Segment")
    edit = operator.get(f"/console/apps/{app_id}/segments/{seg}/edit")
    assert 'value="US"' in edit.text and 'value="US-Segment"' in edit.text
    form = {
        "csrf_token": CSRF.search(edit.text).group(1),  # type: ignore[union-attr]
        "name": "US-Segment",
        "country-type": "EXCLUSIVE",
        "country-values": "US",
    }
    response = operator.post(f"/console/apps/{app_id}/segments/{seg}", form)
    assert response.status_code == 303
    latest = store.get_segment(app_id, seg)
    assert latest.version == 2
    assert latest.definition.dimensions is not None
    assert latest.definition.dimensions.country is not None
    assert latest.definition.dimensions.country.dimension_type.value == "EXCLUSIVE"


def test_deleting_a_segment(operator: Client, store: SQLiteStore, app_id: str) -> None:
    seg = segment_id(store, app_id, "US-Segment")
    token = operator.token(f"/console/apps/{app_id}/segments/{seg}")
    response = operator.post(f"/console/apps/{app_id}/segments/{seg}/delete", {"csrf_token": token})
    assert response.status_code == 303
    assert store.list_segments(app_id, 100, None).items == ()


def test_rows_added_by_the_page_script_start_empty(operator: Client, app_id: str) -> None:
    page = operator.get(f"/console/apps/{app_id}/segments/new").text
    template = page.split('<template id="attr-template">', 1)[1].split("</template>", 1)[0]
    assert 'name="attr-__i__-name" value=""' in template
    assert 'name="attr-__i__-values" value=""' in template
    metric = page.split('<template id="metric-template">', 1)[1].split("</template>", 1)[0]
    assert 'name="metric-__i__-value" value=""' in metric


def test_the_form_reproduces_every_dimension_it_offers() -> None:
    wire = {
        "Name": "all",
        "Dimensions": {
            "Location": {"Country": {"DimensionType": "EXCLUSIVE", "Values": ["US", "CA"]}},
            "Demographic": {
                "Channel": {"DimensionType": "INCLUSIVE", "Values": ["SMS"]},
                "Make": {"DimensionType": "INCLUSIVE", "Values": ["apple"]},
            },
            "Attributes": {
                "a": {"AttributeType": "BETWEEN", "Values": ["2026-01-01", "2026-02-01"]}
            },
            "UserAttributes": {"b": {"AttributeType": "EXCLUSIVE", "Values": ["x"]}},
            "Metrics": {"m": {"ComparisonOperator": "LESS_THAN", "Value": 1.5}},
        },
    }
    definition = definition_from_wire(wire, require_name=True)
    again = SegmentForm.of(definition).with_blank_rows().definition()
    assert definition_to_wire(again) == definition_to_wire(definition)


# --------------------------------------------------------------------------------------------
# pipeline, apps, wiring


def test_serve_has_no_pipeline_and_says_so(operator: Client) -> None:
    page = operator.get("/console/pipeline")
    assert page.status_code == 200
    assert "No pipeline in this process" in page.text


def test_the_pipeline_page_shows_stages_and_replays_dead_letters(
    store: SQLiteStore, app_id: str
) -> None:
    status = Status(
        capture=describe_state(SQLiteState(phase="log", log_after=17).dump()),
        stream_head=20,
        apply_offset=18,
        lag_events=2,
        lag_seconds=0.25,
        dlq_size=1,
        endpoints=3,
        segments=(SegmentCount("US-Segment", 3, 2),),
    )
    letter = DeadLetter(
        7, 1_700_000_000.0, "apply", 12, "rowid:4", "invalid phone number '+1999'", b"{}"
    )
    replayed: list[Sequence[int] | None] = []

    def replay(ids: Sequence[int] | None) -> tuple[int, int]:
        replayed.append(ids)
        return 1, 0

    context = ConsoleContext(
        store=store,
        credentials=CREDENTIALS,
        secret="s" * 40,
        status=lambda: status,
        dead_letters=lambda limit: [letter],
        replay=replay,
    )
    client = make_client(context)
    try:
        client.sign_in()
        page = client.get("/console/pipeline")
        text = re.sub(r"\s+", " ", page.text)
        assert "log change 17" in text
        assert "2 events, 0.25 s" in text
        assert "invalid phone number" in text and "rowid:4" in text
        assert "Replay all" in text
        live = client.get("/console/pipeline/status").json()
        assert live["apply.lag"] == "2 events, 0.25 s"
        assert live["dlq"] == "1" and live["segment.US-Segment"] == "2 / 3"
        token = CSRF.search(page.text)
        assert token
        response = client.post(
            "/console/pipeline/replay", {"csrf_token": token.group(1), "id": "7"}
        )
        assert response.status_code == 303
        assert replayed == [[7]]
        assert "Replayed 1 dead letter." in client.get("/console/pipeline").text
        client.post("/console/pipeline/replay", {"csrf_token": token.group(1)})
        assert replayed == [[7], None]
    finally:
        client.close()


def test_throughput_is_measured_over_a_window() -> None:
    now = [100.0]
    meter = ThroughputMeter(window=10.0, clock=lambda: now[0])
    assert meter.add(0, 0).captured is None
    now[0] = 102.0
    rates = meter.add(100, 50)
    assert (rates.captured, rates.applied) == (50.0, 25.0)
    now[0] = 120.0
    rates = meter.add(100, 100)
    assert rates.captured == 0.0 and rates.applied == 50 / 18


def test_apps_page_lists_channels_and_counts(operator: Client) -> None:
    text = re.sub(r"\s+", " ", operator.get("/console/").text)
    assert "optin-demo" in text and "SMS" in text and "enabled" in text
    assert '>3</span><span class="stat-l">endpoints' in text


def test_pages_are_not_cached_and_allow_no_foreign_scripts(operator: Client) -> None:
    page = operator.get("/console/")
    assert page.headers["cache-control"] == "no-store"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    css = operator.get("/console/static/console.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "no-store" not in css.headers.get("cache-control", "")


def test_the_api_keeps_every_other_path(client: Client) -> None:
    assert client.get("/healthz").text == "ok\n"
    apps = client.get("/v1/apps")
    assert apps.status_code == 200 and "optin-demo" in apps.text
    near_miss = client.get("/consolex")
    assert near_miss.status_code == 404
    assert near_miss.headers["x-amzn-ErrorType"] == "NotFoundException"
    assert client.get("/console").status_code in (303, 307)


def pipeline_page(
    store: SQLiteStore, state: str | None, waiting: str | None = None
) -> tuple[str, dict[str, str]]:
    """The pipeline page's text (white space folded) and its live values, for a status with
    this capture state."""
    status = Status(
        capture=describe_state(state),
        stream_head=0,
        apply_offset=0,
        lag_events=0,
        lag_seconds=0.0,
        dlq_size=0,
        endpoints=0,
        segments=(),
        capture_waiting=waiting,
    )
    context = ConsoleContext(
        store=store, credentials=CREDENTIALS, secret="s" * 40, status=lambda: status
    )
    client = make_client(context)
    try:
        client.sign_in()
        text = re.sub(r"\s+", " ", client.get("/console/pipeline").text)
        live: dict[str, str] = client.get("/console/pipeline/status").json()
    finally:
        client.close()
    return text, live


MARIADB_LOG = LogPosition("b.000002", 4, "0-1-57")


@pytest.mark.parametrize(
    ("state", "shown"),
    [
        (MySQLState(phase="log", log=MARIADB_LOG).dump(), "log GTID 0-1-57"),
        (MySQLState(phase="log", log=LogPosition("b.000002", 4)).dump(), "log binlog b.000002:4"),
        (
            MySQLState(
                phase="snapshot",
                log=MARIADB_LOG,
                table="blog_db.optin_status",
                tables_done=("blog_db.prefs",),
                loaded=1200,
            ).dump(),
            "snapshot blog_db.optin_status, 1,200 rows loaded (1 table done) then log from "
            "GTID 0-1-57",
        ),
        (
            PostgresState(phase="log", log_after=parse_lsn("0/16B3748")).dump("optsync_postgres"),
            "log LSN 0/16B3748",
        ),
        (
            PostgresState(
                phase="snapshot",
                log_after=parse_lsn("0/16B3748"),
                table="public.optin_status",
                rows=250,
            ).dump("optsync_postgres"),
            "snapshot public.optin_status, 250 rows loaded then log from LSN",
        ),
        (
            SQLiteState(phase="snapshot", table="optin_status", after_rowid=40).dump(),
            "snapshot optin_status, after rowid 40",
        ),
        # A state saved before states named their source is read by its shape.
        (
            '{"phase":"log","snapshot_s":null,"table":null,"after_rowid":0,"tables_done":[],'
            '"log_after":17}',
            "log change 17",
        ),
    ],
)
def test_the_pipeline_page_shows_each_source_in_its_own_terms(
    store: SQLiteStore, state: str, shown: str
) -> None:
    """Found in review: a MySQL or PostgreSQL source read "after source change ?" here."""
    text, live = pipeline_page(store, state)
    assert shown in text
    assert shown in live["capture.position"]
    assert "?" not in live["capture.position"]


def test_the_pipeline_page_says_when_capture_waits_for_its_source(store: SQLiteStore) -> None:
    reason = "connect to mariadb://optsync@db:3306/blog_db: unreachable"
    text, live = pipeline_page(store, None, waiting=reason)
    assert f"waiting for source: {reason}" in text
    assert live["capture.position"] == f"waiting for source: {reason}"
