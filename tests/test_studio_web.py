"""`chatlora studio` in a real headless Chromium, as a person uses it, on the offline demo model (the
form's default, SmolLM2-135M-Instruct): check a data file with a bad row and see the error; estimate
the run's memory; start a run from the form; watch its loss and learning-rate curves get points; stop
it; resume it; chat with it; evaluate it; export it and download the file.
Saves a screenshot (CHATLORA_SCREENSHOTS=DIR keeps it). CI installs chromium; elsewhere it skips."""

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from chatlora.studio.app import build_app
from chatlora.studio.runs import RunsDir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,   # about a minute of training, evaluating and exporting through the page
              pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                                 reason="needs Debian's chromium (CI installs it)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def studio_server(root: Path):
    import uvicorn

    from chatlora.serve.guard import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(RunsDir(root)), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        for record in (root / ".studio").glob("*.json"):   # a failed test leaves no process behind
            pid = json.loads(record.read_text() or "{}").get("pid")
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def points(page) -> int:
    return int(page.get_attribute("#r-chart", "data-points") or 0)


def test_check_start_watch_stop_resume(tmp_path, tiny_data):
    from playwright.sync_api import sync_playwright

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n', encoding="utf-8")
    with studio_server(tmp_path / "runs") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)

        page.click("nav button[data-tab=data]")
        page.fill("#d-path", str(bad))
        assert page.input_value("#d-model") == "smollm2-demo"
        page.click("#d-check")
        page.wait_for_selector("#d-out pre.error", timeout=60000)
        assert f"{bad}:2: output: missing" in page.inner_text("#d-out")

        page.click("nav button[data-tab=train]")
        page.wait_for_selector("#f-train-max_steps")
        page.fill("#t-id", "web-1")
        assert page.input_value("#f-model-path") == "smollm2-demo"
        page.fill("#f-data-path", str(tiny_data))
        page.fill("#f-data-max_seq_tokens", "128")
        page.fill("#f-train-examples_per_step", "2")
        page.fill("#f-train-micro_batch_examples", "2")
        page.fill("#f-train-max_steps", "100000")
        page.fill("#f-train-eval_every", "4")
        page.fill("#f-train-save_every", "0")
        command = page.inner_text("#t-command")
        assert command.startswith("chatlora train --output RUNS/web-1") and "train.max_steps=100000" in command
        page.click("#t-estimate")
        page.wait_for_function("document.getElementById('t-memory').textContent.includes('peak GPU memory about')",
                               timeout=60000)
        assert "with the lowmem preset: about" in page.inner_text("#t-memory")
        page.click("#t-start")

        try:
            page.wait_for_function("Number(document.getElementById('r-chart').dataset.points || 0) >= 8",
                                   timeout=120000)
        except Exception:
            raise AssertionError(f"start: {page.inner_text('#t-out')}\nstate: {page.inner_text('#r-state')}\nmessage: {page.inner_text('#r-msg')}\n"
                                 f"log: {page.inner_text('#r-log')[-1500:]}\nlist: {page.inner_text('#r-list')}")
        assert page.inner_text("#r-title") == "web-1" and page.inner_text("#r-state").startswith("running")
        assert int(page.get_attribute("#r-lr", "data-points") or 0) >= 8
        page.wait_for_function("document.getElementById('r-log').textContent.includes('held-out loss')")
        page.screenshot(path=str(tmp_path / "studio.png"), full_page=True)
        page.click("#r-stop")
        page.wait_for_function("document.getElementById('r-state').textContent.startsWith('stopped')",
                               timeout=60000)
        stopped_at = points(page)
        page.click("#r-resume")
        page.wait_for_function(f"Number(document.getElementById('r-chart').dataset.points || 0) > {stopped_at}",
                               timeout=120000)
        assert "web-1" in page.inner_text("#r-list")
        page.click("#r-stop")
        page.wait_for_function("document.getElementById('r-state').textContent.startsWith('stopped')",
                               timeout=60000)
        page.fill("#c-max", "8")
        page.fill("#c-input", "你是谁？")
        page.click("#c-send")
        page.wait_for_function("document.querySelector('#c-log .msg.assistant, #c-log .msg.error') && "
                               "!document.getElementById('c-send').disabled", timeout=120000)
        assert page.locator("#c-log .msg.error").count() == 0, page.inner_text("#c-log")
        assert page.locator("#c-log .msg.user").inner_text() == "你是谁？"
        page.fill("#e-limit", "2")
        page.click("#e-start")
        page.wait_for_selector("#e-out table", timeout=120000)
        assert "held_out" not in page.inner_text("#e-out") and "bleu4" in page.inner_text("#e-out")
        page.select_option("#x-quant", "f16")
        page.click("#x-start")
        page.wait_for_selector("#x-link", timeout=120000)
        with page.expect_download() as download:
            page.click("#x-link")
        assert Path(download.value.path()).read_bytes()[:4] == b"GGUF"
        page.screenshot(path=str(tmp_path / "studio-eval-export.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 800})   # a phone: every control within the width
        for selector in ("#r-stop", "#r-resume", "#c-send", "#c-input", "#x-start", "nav button[data-tab=train]"):
            box = page.locator(selector).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, (selector, box)
        browser.close()
    keep = os.environ.get("CHATLORA_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "studio.png", Path(keep) / "studio.png")
