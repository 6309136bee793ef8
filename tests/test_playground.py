"""The playground page at `/`: its HTML over plain httpx, then a click-through in headless
Chromium (Debian's package, driven by Playwright) against a real server on a tiny family.

The browser tests install what is missing (apt-get chromium, pip playwright; never
Playwright's own browser download) and skip, with the reason, only where that fails.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from flash.tiny import write_tiny_family
from service.app import create_app
from service.config import Settings
from service.testing import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
# What these machines need: no sandbox as root, no GPU, and no background traffic (the network is closed).
# --headless comes from headless=True and --user-data-dir from launch_persistent_context.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "playground-test-key"
MAX_PROMPT = 100
BIG_SEED = 2**63 - 2  # past 2**53: the page must send it digit for digit
INSTALL_TIMEOUT_S = 600
# Whichever browser test runs first pays a fresh machine's install (see docs/playground.md).
pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT_S + 120)


# ---- the page over HTTP, no browser -------------------------------------------------------


class Controls(HTMLParser):
    """Ids, label targets, form fields and outside URLs of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.label_for, self.fields, self.urls, self.in_label = set(), set(), [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "label":
            self.in_label += 1
            if "for" in a:
                self.label_for.add(a["for"])
        if tag in ("input", "select", "textarea"):
            self.fields.append((a.get("id"), self.in_label > 0))
        self.urls += [a[k] for k in ("src", "href") if k in a]

    def handle_endtag(self, tag):
        if tag == "label":
            self.in_label -= 1


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_tiny_family(tmp_path_factory.mktemp("playground") / "tiny")


def test_page_is_served_with_its_controls_without_a_key(family):
    # No lifespan: the page and its assets need no loaded models, and no API key either.
    app = create_app(Settings(model_dir=family, api_keys=[KEY], log_level="warning"))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assets = [await c.get(p) for p in ("/", "/static/app.js", "/static/style.css", "/static/nope.js")]
            return [*assets, await c.get("/v1/models"), await c.get("/openapi.json")]

    page, js, css, missing, models, openapi = asyncio.run(go())
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert models.status_code == 401  # the API still wants the key
    assert "/" not in openapi.json()["paths"]

    html = Controls()
    html.feed(page.text)
    wanted = {"prompt", "model", "teacher-steps", "guidance", "seed", "n", "mode-compare", "api-key"}
    assert wanted <= html.ids, wanted - html.ids
    assert {"generate", "error", "results"} <= html.ids and 'role="alert"' in page.text
    for field_id, wrapped in html.fields:  # every field has a label
        assert wrapped or field_id in html.label_for, field_id
    assert html.label_for <= html.ids
    assert "static/app.js" in html.urls and "static/style.css" in html.urls
    for text in (page.text, js.text, css.text):  # offline machines: nothing from elsewhere
        assert not re.search(r"https?://|url\(\s*['\"]?//|@import", text)


# ---- Chromium: install what is missing --------------------------------------------------------


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=env)


def _tail(r: subprocess.CompletedProcess) -> str:
    return " ".join((r.stderr or r.stdout).strip().splitlines()[-3:])


def install_chromium() -> str | None:
    """Debian's chromium at /usr/bin/chromium, installed if missing. None, or why it cannot be."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium"
    if os.geteuid() == 0:
        sudo = []
    elif shutil.which("sudo") and _run(["sudo", "-n", "true"]).returncode == 0:
        sudo = ["sudo", "-n"]
    else:
        return f"{CHROMIUM} is missing and installing it needs root (apt-get install chromium)"
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    r = _run(install)
    if r.returncode != 0:  # package lists missing or stale
        update = _run([*sudo, "apt-get", "update"])
        if update.returncode != 0:
            return f"apt-get update failed: {_tail(update)}"
        r = _run(install)
    if r.returncode != 0 or not CHROMIUM.exists():
        return f"apt-get install chromium failed: {_tail(r)}"
    return None


def install_playwright() -> str | None:
    """The playwright Python package (its driver only: the browser is Debian's)."""
    try:
        importlib.import_module("playwright.sync_api")
        return None
    except ImportError:
        pass
    r = _run([sys.executable, "-m", "pip", "install", "-q", "playwright>=1.40"])
    if r.returncode != 0:
        return f"pip install playwright failed: {_tail(r)}"
    importlib.invalidate_caches()
    importlib.import_module("playwright.sync_api")
    return None


@pytest.fixture(scope="session")
def chromium_ready():
    """Idempotent and quick once installed; a fresh machine pays the apt and pip downloads."""
    for install in (install_chromium, install_playwright):
        why = install()
        if why:
            pytest.skip(f"no browser for the playground tests: {why}")


@pytest.fixture(scope="module")
def server(family, chromium_ready):
    settings = Settings(
        model_dir=family, api_keys=[KEY], max_prompt_chars=MAX_PROMPT, max_wait_ms=5, log_level="warning"
    )
    with serve_in_thread(settings) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(chromium_ready, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(30_000)
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    """A new tab on the playground; fails the test on any uncaught script error or outside request."""
    tab = browser.new_page()
    script_errors, outside = [], []
    tab.on("pageerror", lambda e: script_errors.append(e))
    tab.on("request", lambda r: r.url.startswith((server, "data:")) or outside.append(r.url))
    tab.goto(f"{server}/")
    yield tab
    tab.close()
    assert not script_errors, script_errors
    assert not outside, outside


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("playground-screenshots")


def field(page, label: str):
    return page.get_by_label(label, exact=True)


def enter_key(page, key=KEY):
    field(page, "API key").fill(key)
    page.get_by_role("button", name="Use key").click()


def wait_for_images(page, count: int):
    page.wait_for_function(
        """n => [...document.querySelectorAll('#results img')]
                 .filter(img => img.complete && img.naturalWidth > 0).length === n""",
        arg=count,
    )


def captions(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#results figure",
        """figs => figs.map(f => ({
            label: f.querySelector('.label').textContent,
            detail: f.querySelector('.detail').textContent,
            latency: f.querySelector('.latency').textContent,
            src: f.querySelector('img').src,
            width: f.querySelector('img').naturalWidth,
        }))""",
    )


def error_text(page) -> str:
    box = page.get_by_role("alert")
    box.wait_for(state="visible")
    return box.inner_text()


def test_generate_shows_the_images_with_their_latency(page, server, shots):
    enter_key(page)
    model = field(page, "Model (steps)")
    page.wait_for_function("() => document.getElementById('model').options.length === 4")
    assert model.locator("option").all_inner_texts() == [
        "1 step: flash-1step",
        "2 steps: flash-2step",
        "3 steps: flash-3step",
        "Teacher (1 to 100 steps): teacher",
    ]
    assert field(page, "Teacher steps").is_hidden()  # students have no such knobs

    field(page, "Prompt").fill("a red circle above a blue square")
    model.select_option("flash-2step")
    field(page, "Seed").fill(str(BIG_SEED))
    field(page, "Images").fill("2")
    page.get_by_role("button", name="Generate").click()
    wait_for_images(page, 2)

    got = captions(page)
    assert [c["label"] for c in got] == ["2 steps", "2 steps"]
    assert [c["detail"] for c in got] == [f"flash-2step · seed {s}" for s in (BIG_SEED, BIG_SEED + 1)]
    latency = re.compile(r"round trip [\d.]+ m?s · server [\d.]+ m?s \(compute .+, queue .+\)")
    assert all(latency.fullmatch(c["latency"]) for c in got), got
    assert {c["width"] for c in got} == {32}  # the tiny family's size, scaled up by CSS
    assert page.get_by_role("alert").is_hidden()
    page.screenshot(path=shots / "single.png", full_page=True)

    # The page sent what the form said, seed digit for digit: the API gives the same PNG.
    body = {"prompt": "a red circle above a blue square", "model": "flash-2step", "seed": BIG_SEED, "n": 2}
    r = httpx.post(f"{server}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert [c["src"] for c in got] == [f"data:image/png;base64,{d['b64_json']}" for d in r.json()["data"]]


def test_compare_shows_every_model_on_one_seed(page, shots):
    enter_key(page)
    field(page, "Prompt").fill("a green triangle")
    page.get_by_role("radio", name=re.compile("^Compare")).check()
    assert field(page, "Model (steps)").is_hidden() and field(page, "Teacher steps").is_visible()
    page.get_by_role("button", name="Compare").click()  # no seed given: the page draws one for all four
    wait_for_images(page, 4)

    got = captions(page)
    assert [c["label"] for c in got] == ["1 step", "2 steps", "3 steps", "teacher, 25 steps, guidance 5"]
    seeds = {c["detail"].split(" · seed ")[1] for c in got}
    assert len(seeds) == 1, got
    assert [c["detail"].split(" · ")[0] for c in got] == [*(f"flash-{n}step" for n in (1, 2, 3)), "teacher"]
    assert all(c["latency"].startswith("round trip ") for c in got)
    assert len({c["src"] for c in got}) == 4  # four models, four different images
    assert page.locator("#summary").inner_text().startswith(f"Compared 4 models on seed {seeds.pop()}")
    page.screenshot(path=shots / "compare.png", full_page=True)


def test_errors_are_shown_in_words(page, server, shots):
    # Keys are on: the page asks for one, and says when it is wrong.
    assert "missing or invalid API key" in error_text(page)
    assert field(page, "API key").is_visible()
    with page.expect_response("**/v1/models") as wrong:
        enter_key(page, "not-the-key")
    assert wrong.value.status == 401
    assert "missing or invalid API key" in error_text(page)
    assert field(page, "Model (steps)").is_disabled()
    enter_key(page)
    page.get_by_role("alert").wait_for(state="hidden")

    # The API's own message: a prompt over the limit...
    field(page, "Prompt").fill("x" * (MAX_PROMPT + 1))
    page.get_by_role("button", name="Generate").click()
    too_long = f"prompt must be 1 to {MAX_PROMPT} characters (not blank), got {MAX_PROMPT + 1}"
    assert too_long in error_text(page)
    assert page.locator("#results figure.failed").count() == 1
    assert page.locator("#summary").inner_text() == "No images: see the error above."

    # ...and a step count the teacher does not take.
    field(page, "Prompt").fill("a square")
    field(page, "Model (steps)").select_option("teacher")
    field(page, "Teacher steps").fill("101")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.getElementById('error').innerText.includes('steps=101')")
    assert "steps=101 is not available for model 'teacher'; allowed: 1 to 100" in error_text(page)
    page.screenshot(path=shots / "error.png", full_page=True)

    # A network failure says so too.
    page.route("**/v1/images/generations", lambda route: route.abort())
    field(page, "Teacher steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("() => document.getElementById('error').innerText.includes('Could not reach')")
    assert "Could not reach the service" in error_text(page)
