"""The web chat page in a real headless Chromium (Debian's, driven by Playwright): send, stream,
system prompt, regenerate, clear. CI installs chromium; elsewhere the test skips without it."""

import os
import shutil

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


def test_page_chats_with_edited_system_prompt_and_controls(page, site):
    assert page.input_value("#system") == "现在你要扮演皇帝身边的女人--甄嬛"
    page.fill("#system", "你是华妃。")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    reply = send(page, "你好")
    assert reply == api_reply(site, "你是华妃。", "你好")
    assert page.locator(".msg.user").inner_text() == "你好"
    page.click("#regenerate")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=30000)
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant").inner_text() == reply  # greedy: the same reply again
    page.click("#clear")
    assert page.locator(".msg").count() == 0


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
