"""The console and the preference center in a real browser, against a real ``optsync up``.

Debian's Chromium (``/usr/bin/chromium``), driven through Playwright's sync API; no browser is
downloaded. Without Chromium or Playwright the tests are skipped, except under ``CI=true``, where
they fail: a CI run must not pass without having looked at the pages.

The story is the AWS blog's, seen from both sides: an operator creates ``US-Segment`` in the
console and watches its estimate; user1..user4 opt out on the preference page, which writes the
application database; the console's live estimate drops from 9 to 5 without a reload, and
user1's endpoint page shows the opt-out in its consent history. Screenshots go to
``artifacts/screenshots/`` (ignored by git); with ``OPTSYNC_PUBLISH_SCREENSHOTS=1`` the two the
README shows are copied to ``docs/images/`` too (a plain test run leaves tracked files alone).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import httpx
import pytest
from pinpoint_e2e import REGION, Server, clean_env, optsync_command
from ports import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY_ID, SECRET = "CONSOLEKEY", "consolesecret"
USERS_OPTING_OUT = ("user1", "user2", "user3", "user4")
PIPELINE_TIMEOUT_MS = 20_000
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "artifacts" / "screenshots"
DOC_IMAGES = REPO / "docs" / "images"
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


def require_browser() -> None:
    """Skip without Chromium or Playwright; under CI=true, fail instead."""
    missing = []
    if sync_playwright is None:
        missing.append("Playwright for Python (pip install playwright)")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if not missing:
        return
    message = "browser tests need " + " and ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(message + "; CI=true, so this fails rather than skips")
    pytest.skip(message)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``optsync up`` with the console key pair, once the snapshot has reached the engine, and
    with the sample's own ``US-Segment`` deleted: the test creates it through the console."""
    require_browser()
    folder = tmp_path_factory.mktemp("optsync-up")
    port = free_port()
    log = folder / "up.log"
    command = [*optsync_command(), "up", "--data-dir", str(folder / "data"), "--port", str(port)]
    env = clean_env(OPTSYNC_API_CREDENTIALS=f"{KEY_ID}:{SECRET}")
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder
        )
    server = Server(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        server.wait_healthy()
        delete_sample_segment(server.url)
        yield server
    finally:
        server.stop()


def delete_sample_segment(url: str) -> None:
    pinpoint = boto3.client(
        "pinpoint",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    apps = pinpoint.get_apps()["ApplicationsResponse"]["Item"]
    app_id = next(a["Id"] for a in apps if a["Name"] == "optin-demo")
    deadline = time.monotonic() + PIPELINE_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:  # the nine sample users are in the engine
        if pinpoint.get_user_endpoints(ApplicationId=app_id, UserId="user9")["EndpointsResponse"]:
            break
        time.sleep(0.1)
    segments = pinpoint.get_segments(ApplicationId=app_id)["SegmentsResponse"]["Item"]
    for segment in segments:
        if segment["Name"] == "US-Segment":
            pinpoint.delete_segment(ApplicationId=app_id, SegmentId=segment["Id"])


@pytest.fixture(scope="module")
def browser(up: Server) -> Iterator[Browser]:
    assert sync_playwright is not None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


class Pages:
    """Browser contexts for one test, each failing the test on a script error."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []

    def open(self, **options: Any) -> Page:
        context = self.browser.new_context(**({"viewport": LAPTOP} | options))
        context.set_default_timeout(PIPELINE_TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser) -> Iterator[Pages]:
    opened = Pages(browser)
    yield opened
    opened.close()
    assert opened.errors == [], f"script errors in the pages: {opened.errors}"


def sign_in(page: Page, url: str) -> None:
    page.goto(url + "/console/")
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    page.get_by_label("Access key id").fill(KEY_ID)
    page.get_by_label("Secret access key").fill(SECRET)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Apps")).to_be_visible()


def screenshot(page: Page, name: str, *, publish: bool) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if publish and os.environ.get("OPTSYNC_PUBLISH_SCREENSHOTS") == "1":
        DOC_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOC_IMAGES / f"{name}.png")


def opt_out_on_the_preference_page(page: Page, url: str, user: str) -> None:
    page.goto(url + "/prefs/")
    expect(page.get_by_text("Demo sample app.")).to_be_visible()
    page.get_by_label("User id").fill(user)
    page.get_by_role("button", name="Sign in").click()
    switch = page.get_by_role("switch")
    expect(switch).to_have_attribute("aria-checked", "true")
    switch.click()
    expect(page.get_by_role("switch")).to_have_attribute("aria-checked", "false")
    expect(page.get_by_role("status")).to_contain_text("off")


def test_an_opt_out_travels_from_the_preference_page_to_the_console(
    up: Server, pages: Pages
) -> None:
    console = pages.open()
    sign_in(console, up.url)

    console.get_by_role("link", name="Segments", exact=True).click()
    console.get_by_role(
        "link", name=re.compile("New segment|Create the first segment")
    ).first.click()
    console.get_by_label("Name", exact=True).fill("US-Segment")
    console.get_by_label("Country", exact=True).fill("US")
    console.get_by_role("button", name="Create segment").click()
    expect(console.get_by_role("heading", name="US-Segment")).to_be_visible()
    eligible, total = console.locator("#eligible"), console.locator("#total")
    expect(eligible).to_have_text("9", timeout=PIPELINE_TIMEOUT_MS)
    expect(total).to_have_text("9")
    console.evaluate("window.stillTheSamePage = true")  # gone if anything reloads the page

    prefs = pages.open()
    for user in USERS_OPTING_OUT:
        opt_out_on_the_preference_page(prefs, up.url, user)
        if user == "user1":
            screenshot(prefs, "prefs", publish=True)
        prefs.get_by_role("button", name="Sign out").click()

    expect(eligible).to_have_text("5", timeout=PIPELINE_TIMEOUT_MS)
    expect(total).to_have_text("9")
    assert console.evaluate("window.stillTheSamePage") is True
    expect(console.locator("#chart path.line")).to_have_count(1)
    console.wait_for_timeout(1500)  # one more reading, so the chart shows the step down
    screenshot(console, "console-segment", publish=True)

    console.get_by_role("link", name="Endpoints", exact=True).click()
    console.get_by_label("User id, address or endpoint id").fill("user1")
    console.get_by_role("button", name="Search").click()
    console.get_by_role("link", name="user1_+1234•••••11").click()
    expect(console.get_by_role("heading", name="Consent history")).to_be_visible()
    newest = console.locator("#history tbody tr").first
    expect(newest).to_contain_text("NONE")
    expect(newest.locator(".optout.out")).to_have_text("ALL")
    expect(newest).to_contain_text("source")
    expect(newest).to_contain_text(re.compile(r"position \d+"))
    expect(console.locator("main")).to_contain_text("+1234•••••11")
    assert "+12341111111" not in console.locator("main").inner_text()  # masked by default
    console.get_by_role("button", name="Show addresses").click()
    expect(console.locator("main")).to_contain_text("+12341111111")
    screenshot(console, "console-endpoint", publish=False)


def test_the_pages_read_well_on_a_phone(up: Server, pages: Pages) -> None:
    phone = pages.open(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    sign_in(phone, up.url)
    phone.goto(up.url + "/console/segments")
    expect(phone.get_by_role("heading", name="Segments")).to_be_visible()
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width}px)"
    screenshot(phone, "console-segments-phone", publish=False)
    phone.goto(up.url + "/prefs/")
    phone.get_by_label("User id").fill("user9")
    phone.get_by_role("button", name="Sign in").click()
    expect(phone.get_by_role("switch")).to_be_visible()
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(phone, "prefs-phone", publish=False)


def test_a_request_without_a_session_gets_the_login_page(up: Server, pages: Pages) -> None:
    page = pages.open()
    page.goto(up.url + "/console/pipeline")
    expect(page).to_have_url(re.compile(r"/console/login\?next=/console/pipeline$"))
    expect(page.get_by_label("Secret access key")).to_be_visible()
    expect(page.get_by_role("link", name="Pipeline")).to_have_count(0)
    raw = httpx.get(up.url + "/console/segments", follow_redirects=False)
    assert raw.status_code == 303
    assert raw.headers["location"].startswith("/console/login")


def test_a_form_post_without_the_csrf_token_is_refused(up: Server, pages: Pages) -> None:
    page = pages.open()
    sign_in(page, up.url)
    page.get_by_role("link", name="Segments", exact=True).click()
    page.get_by_role("link", name=re.compile("New segment|Create the first segment")).first.click()
    page.get_by_label("Name", exact=True).fill("Forged-Segment")
    page.get_by_label("Country", exact=True).fill("US")
    page.locator("form.segment-form input[name=csrf_token]").evaluate("field => field.remove()")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Create segment").click()
    assert posted.value.status == 403
    expect(page.get_by_role("heading", name="Form refused")).to_be_visible()
    page.goto(up.url + "/console/segments")
    expect(page.get_by_text("Forged-Segment")).to_have_count(0)

    # The same with a request built by hand, on the console and on the preference page.
    request = page.context.request
    refused = request.post(up.url + "/console/reveal", form={"reveal": "on", "next": "/console/"})
    assert refused.status == 403
    prefs = request.post(
        up.url + "/prefs/optin",
        form={"channel": "SMS", "address": "+12341111119", "optin": "0"},
    )
    assert prefs.status == 403


def test_the_segment_form_adds_rows_and_shows_the_api_s_errors(up: Server, pages: Pages) -> None:
    page = pages.open()
    sign_in(page, up.url)
    page.get_by_role("link", name="Segments", exact=True).click()
    page.get_by_role("link", name=re.compile("New segment|Create the first segment")).first.click()
    page.get_by_label("Name", exact=True).fill("Gold-Segment")
    page.get_by_label("Country", exact=True).fill("XX")
    page.get_by_role("button", name="Add attribute").click()
    expect(page.locator("#attr-rows .attr-row")).to_have_count(2)
    page.locator("input[name=attr-1-name]").fill("plan")
    page.locator("select[name=attr-1-type]").select_option("CONTAINS")
    page.locator("input[name=attr-1-values]").fill("gold")
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.get_by_role("button", name="Create segment").click()
    assert posted.value.status == 400
    expect(page.get_by_role("alert")).to_contain_text("'XX' is not an ISO 3166-1")
    expect(page.locator("input[name=attr-0-name]")).to_have_value("plan")  # input kept
    page.get_by_label("Country", exact=True).fill("US")
    page.get_by_role("button", name="Create segment").click()
    expect(page.get_by_role("heading", name="Gold-Segment")).to_be_visible()
    expect(page.locator(".conditions")).to_contain_text("Attribute plan contains gold")


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true, so this fails"):
        require_browser()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_browser()
