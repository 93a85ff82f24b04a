"""The web chat page in a real headless Chromium (Debian's, driven by Playwright): send, stream,
system prompt, regenerate, clear; at a desktop's width and a phone's. CI installs chromium and a CJK
font; elsewhere the test skips without chromium. Screenshots go to CHATLORA_SCREENSHOTS (CI:
test-artifacts/), else a temporary folder."""

import os
import shutil
from pathlib import Path

import pytest
from helpers import local_client, running

from chatlora.config import ServeConfig
from chatlora.rundir import load_run, load_tuned_model
from chatlora.serve.app import Server, build_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                                reason="needs Debian's chromium (CI installs it)")
# Flags for a sandboxed, offline machine (no background network, no GPU, root).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tiny_run):
    run = load_run(tiny_run)
    server = Server(run, load_tuned_model(run, device="cpu"), ServeConfig())
    with running(server) as url:
        yield url, server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is not installed (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(site, browser):
    page = browser.new_page()
    page.goto(site[0])
    return page


def screenshot(page, name: str, tmp_path) -> Path:
    folder = Path(os.environ.get("CHATLORA_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))
    return folder / name


def inside(page, selector: str, width: int, height: int) -> bool:
    box = page.locator(selector).bounding_box()
    return bool(box) and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width \
        and box["y"] + box["height"] <= height


def api_reply(site, system: str, user: str) -> str:
    with local_client(build_app(Server(site[1].run, site[1].worker.model, ServeConfig()))) as client:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
                "temperature": 0, "max_tokens": 12}
        return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]


def send(page, text: str) -> str:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant').length > 0 && "
                           "!document.getElementById('send').disabled", timeout=30000)
    return page.locator(".msg.assistant").last.inner_text()


def test_page_chats_with_edited_system_prompt_and_controls(page, site, tmp_path):
    assert page.input_value("#system") == "现在你要扮演皇帝身边的女人--甄嬛"
    page.fill("#system", "你是华妃。")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    reply = send(page, "你好")
    assert reply == api_reply(site, "你是华妃。", "你好")
    assert page.locator(".msg.user").inner_text() == "你好"
    screenshot(page, "chat-desktop.png", tmp_path)
    page.click("#regenerate")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=30000)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant").inner_text() == reply  # greedy: the same reply again
    page.click("#clear")
    assert page.locator(".msg").count() == 0


def test_the_page_on_a_phone(site, browser, tmp_path):
    """At 390 x 800 CSS pixels the settings fold behind a toggle and the conversation, the input, Send
    and Stop take the width; a message streams its reply as on a desktop."""
    page = browser.new_page(viewport={"width": 390, "height": 800})
    page.goto(site[0])
    assert not page.is_visible("#system") and page.is_visible("#toggle")
    for selector in ("#input", "#send", "#stop", "#toggle"):
        assert inside(page, selector, 390, 800), selector
    assert page.locator("#input").bounding_box()["width"] >= 200   # room to type, not a strip
    page.click("#toggle")
    assert page.is_visible("#system") and page.get_attribute("#toggle", "aria-expanded") == "true"
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.click("#toggle")
    assert not page.is_visible("#system")
    reply = send(page, "你是谁？")
    assert reply == api_reply(site, "现在你要扮演皇帝身边的女人--甄嬛", "你是谁？")
    for selector in ("#input", "#send", "#stop"):
        assert inside(page, selector, 390, 800), selector
    screenshot(page, "chat-phone.png", tmp_path)
    page.set_viewport_size({"width": 360, "height": 640})   # the narrowest common phone
    for selector in ("#input", "#send", "#stop", "#toggle", ".msg.assistant"):
        assert inside(page, selector, 360, 640), selector
    page.close()


def test_the_page_works_whatever_the_system_prompt(tiny_run, browser):
    """A system prompt holding '<!--<script>' put the page's script into a state where it never ran."""
    run = load_run(tiny_run)
    hostile = "<!--<script>alert(1)</script>\u2028</script>"
    run.info = dict(run.info, system_prompt=hostile)
    with running(Server(run, load_tuned_model(run, device="cpu"), ServeConfig())) as url:
        page = browser.new_page()
        page.goto(url)
        assert page.input_value("#system") == hostile   # the script ran and filled the form
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "4")
        assert isinstance(send(page, "你好"), str) and page.locator(".msg.error").count() == 0
